//! The `kiln` binary's library: its command line ([`cli`]), `kiln up` with its simulated studio,
//! and `kiln bench …` through kiln-bench. A library, so the binary stays a thin `main` and the
//! commands are compiled once.

pub mod cli;
mod studio;
mod up;

/// The whole of `main` after parsing: logging, the command, its error printed once.
pub fn main_with(cli: cli::Cli) -> std::process::ExitCode {
    let global = cli.global.clone();
    kiln_common::run_main(&global, || cli::run(cli))
}
