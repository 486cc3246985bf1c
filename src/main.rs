//! `kiln`: the Kiln command line. Today it carries the worker's commands (`render`, `bench`);
//! `kiln up` (the whole farm in one process) arrives with the scheduler.

use clap::{CommandFactory, FromArgMatches};
use kiln_worker::cli::{Cli, main_with};

fn main() -> std::process::ExitCode {
    let matches = Cli::command()
        .name("kiln")
        .bin_name("kiln")
        .about(
            "Kiln, a render farm for generative-art studios: renders (prompt, seed, tier) to the same PNG every time",
        )
        .get_matches();
    match Cli::from_arg_matches(&matches) {
        Ok(cli) => main_with(cli),
        Err(e) => e.exit(),
    }
}
