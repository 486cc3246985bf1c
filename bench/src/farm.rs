//! `kiln bench farm`: the embedded farm end to end through HTTP, with the load on the same
//! machine. (a) Cache hits: one request rendered once, then submitted again and again; every
//! submit is answered `cached`. (b) Tiny renders: 16×16 jobs with distinct seeds, each submitted
//! and then awaited (`GET /v1/jobs/{id}?wait=`), so a job counts when it has succeeded; then
//! each submitted and awaited in one request (`POST /v1/jobs?wait=` with the one job), as a
//! client that wants the picture now does. (c) The same, `--batch` to a request, each array
//! submitted and awaited in one `POST /v1/jobs?wait=`.
//! Prints submits (or jobs) per second and p50/p99 latency, the median of `--runs` runs.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use hyper::Method;
use hyper::body::Bytes;
use kiln_common::client::Client;
use kiln_protocol::{JobState, Secret};
use kiln_scheduler::config::FarmConfig;
use kiln_scheduler::farm::Farm;
use kiln_scheduler::scheduler::Scheduler;
use kiln_worker::config::BackendChoice;
use kiln_worker::worker::open_backend;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::stats::{Figures, drive, medians};
/// `kiln bench farm`'s arguments.
#[derive(Debug, Args)]
pub struct FarmBenchArgs {
    /// Cache-hit submits per run.
    #[arg(long, default_value_t = 20_000)]
    pub hits: usize,
    /// Tiny (16×16) jobs per run in each tiny phase (submitted then awaited, in one request, batched).
    #[arg(long, default_value_t = 10_000)]
    pub jobs: usize,
    /// Concurrent HTTP clients for the cache hits; each count is a separate measurement.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 64])]
    pub hit_clients: Vec<usize>,
    /// Concurrent HTTP clients for the tiny jobs, one job each at a time.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Jobs to a request in a second tiny phase, where each client submits an array and waits
    /// for all of it in the same request (`POST /v1/jobs?wait=`); 0 leaves that phase out.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Concurrent HTTP clients for the batched tiny jobs.
    #[arg(long, default_value_t = 16)]
    pub batch_clients: usize,
    /// In-process workers. A tiny render's job waits for its result's write, and renders that
    /// finish together share one, so many workers help a little (docs/benchmarks.md).
    #[arg(long, default_value_t = 128)]
    pub workers: usize,
    /// Keep each run's data dir (database, assets) for a look afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Runs; the figures are the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

/// What the load reads of a job in an answer; the rest is skipped, not built into a JSON tree
/// (a tree per answer was about 2% of this process's CPU in the tiny phase: the load's, on the
/// machine the farm shares with it).
#[derive(Debug, Deserialize)]
pub(crate) struct Seen {
    id: String,
    state: JobState,
    /// Why it failed, if it did.
    error: Option<String>,
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "job {} is {}", self.id, self.state)?;
        match &self.error {
            Some(e) => write!(f, " ({e})"),
            None => Ok(()),
        }
    }
}

/// A batch submit's answer, as the load reads it.
#[derive(Deserialize)]
pub(crate) struct SeenJobs {
    jobs: Vec<Seen>,
}

pub(crate) async fn submit(c: &Client, body: Bytes) -> anyhow::Result<Seen> {
    Ok(c.call_as(Method::POST, "/v1/jobs", Some(body)).await?)
}

/// Waits for a job to end; its state then.
pub(crate) async fn wait(c: &Client, id: &str) -> anyhow::Result<Seen> {
    Ok(c.call_as(Method::GET, &format!("/v1/jobs/{id}?wait=60"), None).await?)
}

/// A tiny 16×16 preview job's request.
pub(crate) fn tiny_job(prompt: &str, seed: u64) -> serde_json::Value {
    json!({ "prompt": prompt, "seed": seed, "tier": "preview", "width": 16 })
}

/// How a client of the tiny phase hands in a job and hears that it ended.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Trips {
    /// `POST /v1/jobs`, then `GET /v1/jobs/{id}?wait=`: two requests.
    SubmitThenWait,
    /// `POST /v1/jobs?wait=` with the one job: a single request answered once the job ended.
    One,
}

impl Trips {
    /// The ways `bench farm` measures one job at a time, in the order it runs them.
    const ALL: [Trips; 2] = [Trips::SubmitThenWait, Trips::One];

    fn label(self) -> &'static str {
        match self {
            Trips::SubmitThenWait => "submit then wait (2 requests a job)",
            Trips::One => "submit with ?wait= (1 request a job)",
        }
    }
}

/// `n` tiny 16×16 jobs with seeds from `seed0`, each submitted and awaited by one of
/// `concurrency` clients in `trips`; a job counts once it has succeeded.
pub(crate) async fn tiny_jobs(
    c: &Client,
    prompt: &str,
    seed0: u64,
    n: usize,
    concurrency: usize,
    trips: Trips,
) -> anyhow::Result<Figures> {
    let (c, prompt) = (c.clone(), prompt.to_owned());
    drive(n, concurrency, move |i| {
        let c = c.clone();
        let body = tiny_job(&prompt, seed0 + i as u64);
        async move {
            let t = Instant::now();
            let body = Bytes::from(body.to_string());
            let done: Seen = match trips {
                Trips::SubmitThenWait => wait(&c, &submit(&c, body).await?.id).await?,
                Trips::One => c.call_as(Method::POST, "/v1/jobs?wait=60", Some(body)).await?,
            };
            if done.state != JobState::Succeeded {
                bail!("a tiny job did not succeed: {done}");
            }
            Ok(t.elapsed().as_secs_f64())
        }
    })
    .await
}

/// `n` tiny 16×16 jobs with seeds from `seed0`, `batch` to a request, each request submitted
/// and awaited at once (`POST /v1/jobs?wait=`) by one of `concurrency` clients; a request counts
/// once all its jobs have succeeded. Figures per job; the latency is the request's. A `batch`
/// of 0 leaves the phase out (`None`).
pub(crate) async fn tiny_batches(
    c: &Client,
    prompt: &str,
    seed0: u64,
    n: usize,
    batch: usize,
    concurrency: usize,
) -> anyhow::Result<Option<Figures>> {
    if batch == 0 {
        return Ok(None);
    }
    let (c, prompt) = (c.clone(), prompt.to_owned());
    let requests = n.div_ceil(batch);
    let f = drive(requests, concurrency, move |i| {
        let c = c.clone();
        let seeds = (i * batch..n.min((i + 1) * batch)).map(|k| seed0 + k as u64);
        let body: Vec<serde_json::Value> = seeds.map(|seed| tiny_job(&prompt, seed)).collect();
        async move {
            let t = Instant::now();
            let bytes = Bytes::from(serde_json::to_vec(&body)?);
            let done: SeenJobs = c.call_as(Method::POST, "/v1/jobs?wait=60", Some(bytes)).await?;
            if done.jobs.len() != body.len() {
                bail!("a batch of {} tiny jobs was answered with {}", body.len(), done.jobs.len());
            }
            if let Some(j) = done.jobs.iter().find(|j| j.state != JobState::Succeeded) {
                bail!("a batch of tiny jobs did not all succeed: {j}");
            }
            Ok(t.elapsed().as_secs_f64())
        }
    })
    .await?;
    // The last request may be short.
    Ok(Some(f.per_job(n as f64 / requests.max(1) as f64)))
}

/// A farm a benchmark run serves on port 0 from a fresh data dir, on the CPU with one thread.
pub(crate) struct BenchFarm {
    pub(crate) dir: std::path::PathBuf,
    /// Where it listens.
    pub(crate) addr: std::net::SocketAddr,
    /// The operator's token.
    pub(crate) token: String,
    pub(crate) client: Client,
    pub(crate) sched: Arc<Scheduler>,
    pub(crate) stop: CancellationToken,
    pub(crate) server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl BenchFarm {
    /// Starts one in `TMP/kiln-bench-{name}-PID`, with `cfg` changed by `change`.
    pub(crate) async fn start(
        cfg: &FarmConfig,
        name: &str,
        change: impl FnOnce(&mut FarmConfig),
    ) -> anyhow::Result<BenchFarm> {
        let dir = bench_dir(name);
        let _ = std::fs::remove_dir_all(&dir);
        BenchFarm::start_in(cfg, dir, change).await
    }

    /// Starts one on the data dir `dir`, as it is.
    pub(crate) async fn start_in(
        cfg: &FarmConfig,
        dir: std::path::PathBuf,
        change: impl FnOnce(&mut FarmConfig),
    ) -> anyhow::Result<BenchFarm> {
        let mut cfg = cfg.clone();
        cfg.worker.data_dir = dir.clone();
        cfg.worker.backend = BackendChoice::Cpu;
        cfg.worker.threads = 1;
        cfg.scheduler.listen = "127.0.0.1:0".parse().expect("valid address");
        change(&mut cfg);
        let farm = Farm::build(&cfg, open_backend(BackendChoice::Cpu, 1)?).await?;
        let addr = farm.local_addr()?;
        let url = format!("http://{addr}");
        let token = std::fs::read_to_string(cfg.token_path())?.trim().to_owned();
        let sched = farm.scheduler().clone();
        let stop = CancellationToken::new();
        let server = farm.spawn(stop.clone());
        let client = Client::new(&url, Some(Secret::new(token.clone())));
        Ok(BenchFarm { dir, addr, token, client, sched, stop, server })
    }

    /// Stops the farm; its data dir is removed when the benchmark ends ([`Cleanup`]), unless
    /// `kept` names the run (counted from 0) to print it kept for.
    pub(crate) async fn stop(self, kept: Option<usize>) -> anyhow::Result<()> {
        self.stop.cancel();
        self.server.await.context("the farm panicked")??;
        match kept {
            Some(run) => println!("  run {}: data kept in {}", run + 1, self.dir.display()),
            None => FINISHED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(self.dir),
        }
        Ok(())
    }
}

/// A benchmark's data dir: `TMP/kiln-bench-{name}-PID`.
pub(crate) fn bench_dir(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("kiln-bench-{name}-{}", std::process::id()))
}

/// The data dirs of finished runs. They are removed when the whole benchmark ends, not between
/// runs: on ext4 without a journal (as on the machine these figures come from), creating files
/// within a minute or so of deleting thousands makes the kernel step over each recently deleted
/// inode (`recently_deleted`), which took a sixth of the CPU from the run after a removal.
static FINISHED: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Removes the finished runs' data dirs when dropped: at a benchmark's end, or its failure.
pub(crate) struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        for dir in FINISHED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One run's figures: cache hits at each client count, tiny jobs one at a time (each of
/// [`Trips::ALL`], in its order), and tiny jobs in batches (when asked for).
pub(crate) type RunFigures = (Vec<Figures>, Vec<Figures>, Option<Figures>);

pub(crate) async fn one_run(cfg: &FarmConfig, a: &FarmBenchArgs, run: usize) -> anyhow::Result<RunFigures> {
    let farm = BenchFarm::start(cfg, &format!("farm-{run}"), |cfg| cfg.scheduler.workers = a.workers).await?;
    let c = farm.client.clone();

    // (a) cache hits: render once, then the same request again and again.
    let hit = Bytes::from(tiny_job("bench cache hit", 1).to_string());
    let first = submit(&c, hit.clone()).await?;
    wait(&c, &first.id).await?;
    let mut hits = Vec::new();
    for &clients in &a.hit_clients {
        let (ch, hit) = (c.clone(), hit.clone());
        hits.push(
            drive(a.hits, clients, move |_| {
                let (c, body) = (ch.clone(), hit.clone());
                async move {
                    let t = Instant::now();
                    let j = submit(&c, body).await?;
                    if j.state != JobState::Cached {
                        bail!("a repeat was not answered from the cache: {j}");
                    }
                    Ok(t.elapsed().as_secs_f64())
                }
            })
            .await?,
        );
    }

    // (b) tiny renders, one at a time in each way, each way with seeds of its own.
    let mut seed0 = 1_000_000 * (run as u64 + 1);
    let mut tiny = Vec::with_capacity(Trips::ALL.len());
    for trips in Trips::ALL {
        tiny.push(tiny_jobs(&c, "bench tiny", seed0, a.jobs, a.concurrency, trips).await?);
        seed0 += a.jobs as u64;
    }
    // (c) the same, a batch to a request.
    let batched = tiny_batches(&c, "bench tiny", seed0, a.jobs, a.batch, a.batch_clients).await?;
    farm.stop(a.keep.then_some(run)).await?;
    Ok((hits, tiny, batched))
}

/// Runs the benchmark and prints its figures.
pub async fn run(cfg: &FarmConfig, a: &FarmBenchArgs) -> anyhow::Result<()> {
    let _cleanup = Cleanup;
    println!(
        "kiln bench farm: per run {} cache-hit submits at each of {:?} clients, {} tiny 16×16 jobs over {} clients submitted then awaited, {} more each in one request, and {} more {} to a request over {} clients; {} workers; {} runs (medians)",
        a.hits, a.hit_clients, a.jobs, a.concurrency, a.jobs, a.jobs, a.batch, a.batch_clients, a.workers, a.runs
    );
    let (mut h, mut t, mut b): (Vec<Vec<Figures>>, Vec<Vec<Figures>>, Vec<Figures>) =
        (Vec::new(), Vec::new(), Vec::new());
    let batched = format!("{} to a request, {:>3} clients", a.batch, a.batch_clients);
    let ways = Trips::ALL.map(|w| format!("{:>3} clients, {}", a.concurrency, w.label()));
    for run in 0..a.runs.max(1) {
        let (hits, tiny, batch) = one_run(cfg, a, run).await?;
        for (clients, f) in a.hit_clients.iter().zip(&hits) {
            println!("  run {}: cache hits, {clients:>3} clients: {}", run + 1, f.run_line("submit"));
        }
        for (way, f) in ways.iter().zip(&tiny) {
            println!("  run {}: tiny jobs, {way}: {}{}", run + 1, f.run_line("job"), f.threads_line("job"));
        }
        if let Some(f) = batch {
            println!("  run {}: tiny jobs, {batched}: {}{}", run + 1, f.run_line("job"), f.threads_line("job"));
            b.push(f);
        }
        h.push(hits);
        t.push(tiny);
    }
    for (i, clients) in a.hit_clients.iter().enumerate() {
        let m = medians(h.iter().map(|r| &r[i]));
        println!("cache-hit submits, {clients} clients: {} (aim: p99 < 5 ms){}", m.summary(), m.cpu_line("submit"));
    }
    for (i, way) in ways.iter().enumerate() {
        let m = medians(t.iter().map(|r| &r[i]));
        println!(
            "tiny jobs end to end, {way}: {} (aim: >= 5000/s){}{}",
            m.summary(),
            m.cpu_line("job"),
            m.threads_line("job")
        );
    }
    batched_medians(&format!("tiny jobs end to end, {batched}"), &b);
    Ok(())
}

/// Prints the medians of the batched phase's runs, when it ran, and returns them.
pub(crate) fn batched_medians(label: &str, runs: &[Figures]) -> Option<Figures> {
    if runs.is_empty() {
        return None;
    }
    let m = medians(runs.iter());
    println!(
        "{label}: {} (latency per request; aim: >= 5000 jobs/s){}{}",
        m.summary(),
        m.cpu_line("job"),
        m.threads_line("job")
    );
    Some(m)
}
