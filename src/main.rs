//! `kiln`: the Kiln command line. Today it carries the worker's commands (`render`, `bench`);
//! `kiln up` (the whole farm in one process) arrives with the scheduler.

use clap::{CommandFactory, FromArgMatches};
use kiln_worker::cli::{Cli, run};

fn main() -> std::process::ExitCode {
    let matches = Cli::command()
        .name("kiln")
        .bin_name("kiln")
        .about(
            "Kiln, a render farm for generative-art studios: renders (prompt, seed, tier) to the same PNG every time",
        )
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| "info,wgpu=warn,naga=warn,cubecl=warn".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
