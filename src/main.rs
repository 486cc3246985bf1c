//! `kiln`: the Kiln command line. `kiln up` runs the whole farm in one process; the other
//! commands talk to it, or run the engine directly. See `kiln --help` and the `kiln` library.

use clap::Parser;

#[global_allocator]
static ALLOC: kiln_common::Allocator = kiln_common::Allocator;

fn main() -> std::process::ExitCode {
    kiln::main_with(kiln::cli::Cli::parse())
}
