//! `kiln bench store`: the store's writes alone, without HTTP or rendering: how many jobs a
//! second its submits, dispatch marks and results allow (SQLite, or PostgreSQL in a scratch
//! schema).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use kiln_protocol::{RenderRequest, Tier};
use kiln_scheduler::store::{Cost, Due, NewJob, Outcome, PgStore, SqliteStore, Store};

use crate::stats::{drive, median};

/// `kiln bench store`'s arguments.
#[derive(Debug, Args)]
pub struct StoreBenchArgs {
    /// Jobs per run.
    #[arg(long, default_value_t = 10_000)]
    pub jobs: usize,
    /// Concurrent callers.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Runs; the figures are the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Bench the PostgreSQL store at this URL instead (in a scratch schema, dropped afterwards),
    /// recording results as the distributed scheduler does: one `record` per result.
    #[arg(long)]
    pub database_url: Option<String>,
}

/// One run of the store alone: submit every job, dispatch them all, then record each result
/// (SQLite: a start and a finish, as the embedded farm does; PostgreSQL: one `record`, as the
/// distributed scheduler does).
async fn store_run(a: &StoreBenchArgs, run: usize) -> anyhow::Result<[f64; 3]> {
    let dir = std::env::temp_dir().join(format!("kiln-bench-store-{}-{run}", std::process::id()));
    let schema = format!("kiln_bench_store_{}_{run}", std::process::id());
    let store: Arc<dyn Store> = match &a.database_url {
        Some(base) => {
            let url = kiln_testenv::create_schema(base, &schema).await.context("making a scratch schema")?;
            Arc::new(PgStore::open(&url).await?)
        }
        None => {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            Arc::new(SqliteStore::open(&dir.join(kiln_scheduler::farm::DB_FILE)).await?)
        }
    };
    let figures = store_phases(a, run, store).await;
    match &a.database_url {
        Some(base) => {
            let _ = kiln_testenv::drop_schema(base, &schema).await;
        }
        None => {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    figures
}

async fn store_phases(a: &StoreBenchArgs, run: usize, store: Arc<dyn Store>) -> anyhow::Result<[f64; 3]> {
    let limits = kiln_protocol::TierLimits::default();
    let (n, now) = (a.jobs, kiln_protocol::now_ms());
    let submit = {
        let store = store.clone();
        drive(n, a.concurrency, move |i| {
            let (store, limits) = (store.clone(), limits.clone());
            async move {
                let request =
                    RenderRequest::resolve("cppn", "bench", i as u64, Tier::Preview, Some(16), None, None, &limits)?;
                let job = NewJob {
                    id: format!("bench-{run}-{i}"),
                    request,
                    cache_key: format!("bench-key-{run}-{i}"),
                    client: "bench".into(),
                    idempotency_key: None,
                    now_ms: now,
                };
                let t = Instant::now();
                store.submit(job).await?;
                Ok(t.elapsed().as_secs_f64())
            }
        })
        .await?
    };
    let t = Instant::now();
    let due = take_all(store.as_ref(), now).await?;
    let take = n as f64 / t.elapsed().as_secs_f64();
    let due = Arc::new(due);
    let whole = a.database_url.is_some();
    let results = {
        let store = store.clone();
        drive(due.len(), a.concurrency, move |i| {
            let (store, due) = (store.clone(), due.clone());
            async move {
                let t = Instant::now();
                let asset = format!("{i:064x}");
                // About the size of a render's own record (which also has its key input and timings).
                let provenance = serde_json::json!({
                    "asset": asset, "thumbnail": asset, "request": due[i].request, "cache_key": due[i].cache_key,
                    "model": { "id": "cppn", "version": "bench", "path": "fused" }, "backend": "cpu",
                    "device": "bench", "kiln_version": env!("CARGO_PKG_VERSION"), "created_unix": now / 1000,
                });
                // And a PNG kept with the row, as a tiny render's is (16×16: 805 bytes on average).
                let png = vec![0x89; 800];
                let ok = Outcome::Succeeded {
                    asset,
                    bytes: 800,
                    provenance: Some(provenance.to_string()),
                    png: Some(png),
                    cost: Some(Cost { device_ms: 5, cost_ms: 5 }),
                };
                let events = if whole {
                    store.record(&due[i], now, ok, now).await?
                } else {
                    store.start(&due[i], now).await?.context("a dispatched job would not start")?;
                    store.finish(&due[i], ok, now).await?
                };
                if events.is_empty() {
                    bail!("the result of job {} was not recorded", due[i].job_id);
                }
                Ok(t.elapsed().as_secs_f64())
            }
        })
        .await?
    };
    Ok([submit.per_second, take, results.per_second])
}

/// Takes every queued job as the in-process transport takes them: read and marked sent in one
/// write, the moved jobs kept.
pub(crate) async fn take_all(store: &dyn Store, now: i64) -> anyhow::Result<Vec<kiln_scheduler::store::Dispatch>> {
    let mut due = Vec::new();
    loop {
        let (pending, events) = store.read_and_mark(now, 512).await?;
        if pending.rows.is_empty() {
            return Ok(due);
        }
        let moved = events.into_iter().map(|e| e.job_id).collect();
        due.extend(Due::of(pending, &moved).jobs);
    }
}

/// Runs `kiln bench store` and prints its figures.
pub async fn run_store(a: &StoreBenchArgs) -> anyhow::Result<()> {
    println!(
        "kiln bench store: the {} store alone, {} jobs over {} callers, {} runs (medians): the ceiling the farm's own writes put on jobs/s",
        if a.database_url.is_some() { "PostgreSQL" } else { "SQLite" },
        a.jobs,
        a.concurrency,
        a.runs
    );
    let mut runs = Vec::new();
    for run in 0..a.runs.max(1) {
        let r = store_run(a, run).await?;
        println!("  run {}: submit {:.0}/s, dispatch {:.0}/s, results {:.0}/s", run + 1, r[0], r[1], r[2]);
        runs.push(r);
    }
    let m = |i: usize| median(runs.iter().map(|r| r[i]).collect());
    let per_job = 1.0 / m(0) + 1.0 / m(1) + 1.0 / m(2);
    println!(
        "store: submit {:.0}/s, dispatch {:.0}/s, results {:.0}/s; a whole job's writes: {:.0} jobs/s",
        m(0),
        m(1),
        m(2),
        1.0 / per_job
    );
    Ok(())
}
