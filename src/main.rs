//! `kiln`: the Kiln command line. `kiln up` runs the whole farm in one process; the other
//! commands talk to it, or run the engine directly. See `kiln --help`.

use clap::Parser;
use kiln_scheduler::cli::{Cli, main_with};

#[global_allocator]
static ALLOC: kiln_worker::Allocator = kiln_worker::Allocator;

fn main() -> std::process::ExitCode {
    main_with(Cli::parse())
}
