//! Kiln's benchmarks, behind `kiln bench …`: the engine ([`engine`]), the embedded farm end to end
//! ([`farm`]), the store's writes alone ([`store`]), the console's first paint ([`console`]), one print across the
//! farm's workers ([`print`]), the distributed farm on PostgreSQL and
//! RabbitMQ ([`dispatch`]) and a fleet of edge agents ([`fleet`]). Kept out of the services: no
//! binary that serves links this crate but `kiln`. What they have measured is in
//! `docs/benchmarks.md`.

pub mod console;
pub mod dispatch;
pub mod engine;
pub mod farm;
pub mod fleet;
pub mod orders;
pub mod print;
pub mod stats;
pub mod store;

use clap::Subcommand;
use kiln_scheduler::config::FarmConfig;

/// `kiln bench ...`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The render engine: megapixels/s, effective GFLOP/s and peak memory per backend and tier.
    Engine(engine::BenchArgs),
    /// The farm end to end through HTTP: cache-hit submits and tiny renders, per second and p50/p99.
    Farm(farm::FarmBenchArgs),
    /// The store alone: how many jobs/s its writes allow, without HTTP or rendering.
    Store(store::StoreBenchArgs),
    /// The distributed farm (PostgreSQL, RabbitMQ) end to end beside the broker's raw ceiling.
    Dispatch(dispatch::DispatchBenchArgs),
    /// Many kiln-edge agents against an MQTT broker and one scheduler: CPU, RSS, task round trips.
    Fleet(fleet::FleetBenchArgs),
    /// The console's first paint with 100,000 jobs and 1,000 assets: time to first byte, weight.
    Console(console::ConsoleBenchArgs),
    /// Studio orders waiting for approval on the embedded farm: RSS, idle CPU, time to approve all.
    Orders(orders::OrdersBenchArgs),
    /// One print cut into tiles across 1, 2 and 4 in-process workers: wall time, speedup, stitch.
    Print(print::PrintBenchArgs),
}

/// Runs a benchmark to its end, on a runtime of its own. A plain function: the benchmarks'
/// futures are polled here, so their bodies are compiled in this crate once and not again in the
/// `kiln` binary that calls it.
pub fn run(command: BenchCommand, cfg: &FarmConfig) -> anyhow::Result<()> {
    match command {
        BenchCommand::Engine(args) => engine::run(&cfg.worker, &args),
        BenchCommand::Farm(args) => kiln_common::runtime()?.block_on(farm::run(cfg, &args)),
        BenchCommand::Store(args) => kiln_common::runtime()?.block_on(store::run_store(&args)),
        BenchCommand::Dispatch(args) => kiln_common::runtime()?.block_on(dispatch::run(cfg, &args)),
        BenchCommand::Fleet(args) => kiln_common::runtime()?.block_on(fleet::run(cfg, &args)),
        BenchCommand::Orders(args) => kiln_common::runtime()?.block_on(orders::run(cfg, &args)),
        BenchCommand::Console(args) => kiln_common::runtime()?.block_on(console::run(cfg, &args)),
        BenchCommand::Print(args) => kiln_common::runtime()?.block_on(print::run(cfg, &args)),
    }
}
