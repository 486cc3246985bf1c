//! `kiln-scheduler`: the scheduler as its own binary. In embedded mode it runs the whole farm,
//! as `kiln up` does: the API, the SQLite store, dispatch and in-process workers.

use clap::Parser;
use kiln_common::GlobalArgs;
use kiln_scheduler::cli::{Cli, Command, UpArgs, main_with};

#[global_allocator]
static ALLOC: kiln_common::Allocator = kiln_common::Allocator;

/// Kiln's scheduler: the job API, the durable store, the cache, dispatch to workers.
#[derive(Debug, Parser)]
#[command(name = "kiln-scheduler", version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(flatten)]
    up: UpArgs,
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    main_with(Cli { global: a.global, command: Some(Command::Up(a.up)) })
}
