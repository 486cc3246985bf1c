//! `kiln-scheduler`: the scheduler as its own binary. With no broker configured it runs the whole
//! farm in one process (the API, the store, dispatch and in-process workers), as `kiln up` does
//! without its studio; with `KILN_AMQP_URL` and `KILN_DATABASE_URL` it is the distributed farm's
//! scheduler. See `kiln_scheduler::farm::run_scheduler`.

use clap::Parser;
use kiln_common::{GlobalArgs, run_main};
use kiln_scheduler::farm::{ServeArgs, run_scheduler};

#[global_allocator]
static ALLOC: kiln_common::Allocator = kiln_common::Allocator;

/// Kiln's scheduler: the job API, the durable store, the cache, dispatch to workers.
#[derive(Debug, Parser)]
#[command(name = "kiln-scheduler", version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(flatten)]
    serve: ServeArgs,
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    run_main(&a.global, || run_scheduler(&a.global, &a.serve))
}
