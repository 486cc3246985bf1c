//! `kiln`: the Kiln command line. `kiln up` runs the whole farm in one process; the other
//! commands talk to it, or run the engine directly. See `kiln --help`.

mod cli;
mod studio;
mod up;

use clap::Parser;

#[global_allocator]
static ALLOC: kiln_common::Allocator = kiln_common::Allocator;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let global = cli.global.clone();
    kiln_common::run_main(&global, || cli::run(cli))
}
