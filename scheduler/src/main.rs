//! `kiln-scheduler`: the scheduler as its own binary. With no broker configured it runs the whole
//! farm in one process (the API, the store, dispatch and in-process workers), as `kiln up` does
//! without its studio; with `KILN_AMQP_URL` and `KILN_DATABASE_URL` it is the distributed farm's
//! scheduler.

use anyhow::Context;
use clap::Parser;
use kiln_common::{GlobalArgs, run_main, shutdown_signal};
use kiln_scheduler::config::FarmConfig;
use kiln_scheduler::farm::{Farm, ServeArgs, open_farm_backend, serve};

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
    run_main(&a.global, || {
        let mut cfg = FarmConfig::load_for(&a.global)?;
        a.serve.apply(&mut cfg)?;
        if a.global.print_config {
            print!("{}", cfg.to_toml());
            return Ok(());
        }
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build();
        rt.context("failed to start the async runtime")?.block_on(async {
            let (backend, device) = open_farm_backend(&cfg)?;
            let farm = Farm::build(&cfg, backend).await?;
            serve(farm, &cfg, "kiln-scheduler", &device, &[], shutdown_signal()).await?;
            println!("kiln-scheduler: stopped");
            Ok(())
        })
    })
}
