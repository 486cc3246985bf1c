//! `kiln-worker`: parse the command line and run it; see `kiln_worker::cli`.

use clap::Parser;

#[global_allocator]
static ALLOC: kiln_common::Allocator = kiln_common::Allocator;

fn main() -> std::process::ExitCode {
    kiln_worker::cli::main_with(kiln_worker::cli::Cli::parse())
}
