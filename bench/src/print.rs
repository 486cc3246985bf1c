//! `kiln bench print`: one print-size render on the embedded farm with 1, 2 and 4 in-process
//! workers (`--workers`), cut into tiles the workers share and stitched by the scheduler; with
//! `--distributed`, on PostgreSQL and RabbitMQ with that many `kiln-worker` daemons (in this
//! process, sharing the scheduler's asset folder; a scratch schema and queue prefix each). For
//! each count: the wall time from submit to the stitched asset, the speedup over one worker, its
//! ratio to the ideal N, and the stitch's time after the last tile and its share (the stitch runs
//! as the tiles arrive; only what is left when the last one ends adds to the wall time). Beside
//! them, the same image rendered whole and stored by one worker in this process, to show what
//! cutting it up costs. Each figure
//! is the median of `--runs` runs, each a new seed (nothing answered from the cache).

use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use hyper::Method;
use kiln_protocol::{RenderRequest, Tier};
use kiln_worker::render::Backend;
use kiln_worker::worker::Worker;
use serde_json::{Value, json};

use kiln_protocol::wire::Names;
use kiln_scheduler::auth::Role;
use kiln_scheduler::config::FarmConfig;
use kiln_worker::daemon::RunConfig;

use crate::dispatch::{delete_queues, scratch_name};
use crate::farm::{BenchFarm, Cleanup};
use crate::stats::median;

/// `kiln bench print`'s arguments.
#[derive(Debug, Args)]
pub struct PrintBenchArgs {
    /// The print's side in pixels (a square; the print tier allows up to 16384).
    #[arg(long, default_value_t = 4096)]
    pub side: u32,
    /// Supersampling per axis.
    #[arg(long, default_value_t = 1)]
    pub samples: u32,
    /// Worker counts to measure, each on a farm of its own (one thread a worker).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub workers: Vec<usize>,
    /// Runs per count; the figures are their medians.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Pixels a tile holds at most (`scheduler.tiles.tile_pixels`).
    #[arg(long, default_value_t = 4 << 20)]
    pub tile_pixels: u64,
    /// Worker daemons over RabbitMQ, the store on PostgreSQL, instead of in-process workers.
    #[arg(long)]
    pub distributed: bool,
    /// The PostgreSQL database, with `--distributed` (a scratch schema is made and dropped).
    #[arg(long, env = "KILN_DATABASE_URL", default_value = kiln_testenv::DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// The RabbitMQ broker, with `--distributed` (queues under a scratch prefix, deleted after).
    #[arg(long, env = "KILN_AMQP_URL", default_value = kiln_testenv::DEFAULT_AMQP_URL)]
    pub amqp_url: String,
}

/// The aims: N workers at least 0.8 × N times one worker's speed; the stitch under 10%.
const AIM_EFFICIENCY: f64 = 0.8;
const AIM_STITCH_SHARE: f64 = 0.10;

/// One run: wall seconds, the stitch's seconds after the last tile, tiles.
async fn one(farm: &BenchFarm, a: &PrintBenchArgs, seed: u64) -> anyhow::Result<(f64, f64, usize)> {
    let body = json!({ "prompt": "bench print harbour", "seed": seed, "tier": "print", "width": a.side, "height": a.side, "samples": a.samples });
    let t = Instant::now();
    let job: Value = farm.client.call(Method::POST, "/v1/jobs", Some(&body)).await?;
    let id = job["id"].as_str().context("no job id")?.to_owned();
    let done = loop {
        let j: Value = farm.client.call(Method::GET, &format!("/v1/jobs/{id}?wait=60"), None).await?;
        if j["state"] == "succeeded" {
            break j;
        }
        if ["failed", "cancelled", "cached"].contains(&j["state"].as_str().unwrap_or_default()) {
            bail!("the print ended {}: {}", j["state"], j["error"]);
        }
    };
    let wall = t.elapsed().as_secs_f64();
    let asset = done["asset"].as_str().context("no asset")?;
    let p: Value = farm.client.call(Method::GET, &format!("/v1/assets/{asset}/provenance"), None).await?;
    let stitch = p["stitch"]["after_last_tile_seconds"].as_f64().context("the provenance has no stitch time")?;
    let tiles = p["tiles"].as_array().map_or(0, Vec::len);
    Ok((wall, stitch, tiles))
}

/// Runs of one worker count: wall seconds, stitch seconds, tiles.
type Runs = (Vec<f64>, Vec<f64>, usize);

/// `a.runs` prints on `farm`, each a new seed.
async fn runs(farm: &BenchFarm, a: &PrintBenchArgs, n: usize) -> anyhow::Result<Runs> {
    let (mut walls, mut stitches, mut tiles) = (vec![], vec![], 0);
    for run in 0..a.runs.max(1) {
        let (wall, stitch, t) = one(farm, a, (n * 1000 + run) as u64).await?;
        walls.push(wall);
        stitches.push(stitch);
        tiles = t;
    }
    Ok((walls, stitches, tiles))
}

/// The embedded farm with `n` in-process workers, one thread each.
async fn in_process(cfg: &FarmConfig, a: &PrintBenchArgs, n: usize) -> anyhow::Result<Runs> {
    let farm = BenchFarm::start(cfg, &format!("print-{n}"), |c| {
        c.scheduler.workers = n;
        c.scheduler.worker_tiers = vec![Tier::Print];
        c.scheduler.tiles.tile_pixels = a.tile_pixels;
    })
    .await?;
    let ran = runs(&farm, a, n).await;
    farm.stop(None).await?;
    ran
}

/// The distributed farm on `db` and the queues under `prefix`, with `n` worker daemons in this
/// process (one render at a time each, one thread), sharing the scheduler's asset folder.
async fn distributed(cfg: &FarmConfig, a: &PrintBenchArgs, n: usize, db: &str, prefix: &str) -> anyhow::Result<Runs> {
    let farm = BenchFarm::start(cfg, &format!("print-d{n}"), |c| {
        c.scheduler.database_url = Some(db.into());
        c.scheduler.broker.amqp_url = Some(a.amqp_url.as_str().into());
        c.scheduler.broker.prefix = prefix.to_owned();
        c.scheduler.tiles.tile_pixels = a.tile_pixels;
    })
    .await?;
    let token = farm.sched.create_token(&format!("bench-print-{n}"), Role::Worker, &[], None, None).await?;
    let mut daemons = Vec::new();
    for i in 0..n {
        let rc = RunConfig {
            amqp_url: a.amqp_url.as_str().into(),
            amqp_prefix: prefix.to_owned(),
            tiers: vec![Tier::Print],
            prefetch: 1,
            concurrency: 1,
            scheduler_url: farm.client.base().to_owned(),
            token: Some(token.expose().to_owned()),
            shared_assets: true,
            worker_id: Some(format!("bench-print-{i}")),
            ..RunConfig::default()
        };
        daemons.push(tokio::spawn(kiln_worker::daemon::run(farm.sched.worker.clone(), rc, farm.stop.clone())));
    }
    let ran = runs(&farm, a, n).await;
    farm.stop.cancel();
    for d in daemons {
        d.await.context("a worker daemon panicked")??;
    }
    farm.stop(None).await?;
    ran
}

/// Runs the benchmark and prints its figures.
pub async fn run(cfg: &FarmConfig, a: &PrintBenchArgs) -> anyhow::Result<()> {
    let _cleanup = Cleanup;
    if a.workers.is_empty() || a.workers.contains(&0) {
        bail!("--workers: give counts of at least 1, e.g. 1,2,4");
    }
    let request = RenderRequest::resolve(
        "cppn",
        "bench print harbour",
        0,
        Tier::Print,
        Some(a.side),
        Some(a.side),
        Some(a.samples),
        &cfg.worker.tiers,
    )?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let how = if a.distributed { "worker daemons over RabbitMQ, PostgreSQL" } else { "in-process workers" };
    println!(
        "print {0}×{0}, {1} sample(s)/axis, cpu backend, {how}, one thread a worker, {cores} cores here; median of {2} runs",
        a.side, a.samples, a.runs
    );
    // The same image whole, by one worker (one thread), stored with its thumbnail as a farm's
    // worker stores it; a new seed each run.
    let dir = crate::farm::bench_dir("print-whole");
    let mut wc = cfg.worker.clone();
    wc.data_dir = dir.clone();
    let worker = Worker::new(&wc, Backend::Cpu { threads: 1 })?.records_kept_by_caller();
    let runs_whole = a.runs.max(1);
    // The store waits for its writes on a blocking thread, as a worker does.
    let whole = tokio::task::spawn_blocking(move || {
        let mut whole = Vec::new();
        for run in 0..runs_whole {
            let r = RenderRequest { seed: run as u64 + 1, ..request.clone() };
            let t = Instant::now();
            worker.render(&r, &mut |_| {})?;
            whole.push(t.elapsed().as_secs_f64());
        }
        anyhow::Ok(whole)
    })
    .await??;
    let _ = std::fs::remove_dir_all(&dir);
    let whole = median(whole);
    println!("  whole, one worker, not cut:  {whole:>8.2} s");
    let mut one_worker = None;
    for &n in &a.workers {
        let ran = match a.distributed {
            false => in_process(cfg, a, n).await,
            true => {
                let (schema, prefix) =
                    (scratch_name(&format!("print_db_{n}"), 0), scratch_name(&format!("print_mq_{n}"), 0));
                let db =
                    kiln_testenv::create_schema(&a.database_url, &schema).await.context("making a scratch schema")?;
                let ran = distributed(cfg, a, n, &db, &prefix).await;
                let _ = kiln_testenv::drop_schema(&a.database_url, &schema).await;
                delete_queues(&a.amqp_url, &Names::new(&prefix)).await?;
                ran
            }
        };
        let (walls, stitches, tiles) = ran?;
        let (wall, stitch) = (median(walls), median(stitches));
        let base = *one_worker.get_or_insert(wall);
        let speedup = base / wall;
        let efficiency = speedup / n as f64;
        println!(
            "  {n} worker(s), {tiles} tiles: {wall:>8.2} s  speedup {speedup:.2}× ({:.0}% of {n}×, aim {:.0}%; {:.2}× the whole render)  stitch after the last tile {stitch:.2} s ({:.1}% of the wall time, aim < {:.0}%)",
            efficiency * 100.0,
            AIM_EFFICIENCY * 100.0,
            whole / wall,
            stitch / wall * 100.0,
            AIM_STITCH_SHARE * 100.0,
        );
        if n > cores {
            println!("    bound: {n} workers on {cores} cores; the speedup cannot pass {cores}×");
        }
    }
    Ok(())
}
