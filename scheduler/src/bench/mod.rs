//! `kiln bench farm`: the embedded farm end to end through HTTP, with the load on the same
//! machine. (a) Cache hits: one request rendered once, then submitted again and again; every
//! submit is answered `cached`. (b) Tiny renders: 16×16 jobs with distinct seeds, each submitted
//! and then awaited (`GET /v1/jobs/{id}?wait=`), so a job counts when it has succeeded; then
//! each submitted and awaited in one request (`POST /v1/jobs?wait=` with the one job), as a
//! client that wants the picture now does. (c) The same, `--batch` to a request, each array
//! submitted and awaited in one `POST /v1/jobs?wait=`.
//! Prints submits (or jobs) per second and p50/p99 latency, the median of `--runs` runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use hyper::Method;
use hyper::body::Bytes;
use kiln_worker::config::BackendChoice;
use kiln_worker::worker::open_backend;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::auth::Secret;
use crate::config::FarmConfig;
use crate::farm::Farm;
use crate::store::{NewJob, Outcome, PgStore, SqliteStore, Store};
use kiln_common::client::Client;
use kiln_protocol::{JobState, RenderRequest, Tier};

pub mod dispatch;
pub mod fleet;

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
    /// finish together share one, so many workers help a little: on 2 cores, one job to a
    /// request went 4,821 and 5,577/s at 16, 5,109 and 5,498 at 32, 5,765 and 5,775 at 128.
    #[arg(long, default_value_t = 128)]
    pub workers: usize,
    /// Keep each run's data dir (database, assets) for a look afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Runs; the figures are the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

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

/// One phase's figures.
#[derive(Debug, Clone, Copy)]
struct Figures {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU milliseconds per operation, whole machine and this process (Linux; else NaN).
    cpu: CpuTime,
    /// This process's threads' time per operation, by kind (Linux; else NaN).
    threads: ThreadTimes,
}

impl Figures {
    /// `  cpu 0.84 ms/op (machine), 0.61 in this process`, or nothing where it is unknown.
    fn cpu_line(&self, op: &str) -> String {
        if self.cpu.machine_ms.is_nan() {
            return String::new();
        }
        format!("  cpu {:.3} ms/{op} (machine), {:.3} in kiln", self.cpu.machine_ms, self.cpu.process_ms)
    }

    /// `    threads, ms/job running (waiting for a CPU): runtime 0.250 (0.230), …` on a line
    /// of its own, or nothing where it is unknown.
    fn threads_line(&self, op: &str) -> String {
        let t = &self.threads;
        if t.run_ms.iter().all(|v| v.is_nan()) {
            return String::new();
        }
        let kinds = THREAD_KINDS.iter().map(|(label, _)| *label).chain(["other"]);
        let each: Vec<String> =
            kinds.enumerate().map(|(i, k)| format!("{k} {:.3} ({:.3})", t.run_ms[i], t.wait_ms[i])).collect();
        format!("\n      threads, ms/{op} running (waiting for a CPU): {}", each.join(", "))
    }

    /// `  1234/s  p50 1.00 ms  p99 2.00 ms  cpu …`: one run's line.
    fn run_line(&self, op: &str) -> String {
        format!("{:>6.0}/s  p50 {:.2} ms  p99 {:.2} ms{}", self.per_second, self.p50_ms, self.p99_ms, self.cpu_line(op))
    }

    /// `1234/s, p50 1.00 ms, p99 2.00 ms`: the medians' line.
    fn summary(&self) -> String {
        format!("{:.0}/s, p50 {:.2} ms, p99 {:.2} ms", self.per_second, self.p50_ms, self.p99_ms)
    }

    /// Figures measured per request, with `k` jobs to a request on average, as rate and CPU per
    /// job (the latency stays the request's: from its submit to its last job's end).
    fn per_job(self, k: f64) -> Figures {
        Figures {
            per_second: self.per_second * k,
            cpu: CpuTime { machine_ms: self.cpu.machine_ms / k, process_ms: self.cpu.process_ms / k },
            threads: ThreadTimes {
                run_ms: self.threads.run_ms.map(|v| v / k),
                wait_ms: self.threads.wait_ms.map(|v| v / k),
            },
            ..self
        }
    }
}

/// CPU time: the whole machine's busy time (every process: the farm, its database and broker,
/// the load) and this process's, in milliseconds. Per job, it says whether a change saved work
/// or only moved the waiting, and how near the machine is to its bound (cores ÷ CPU per job).
#[derive(Debug, Clone, Copy)]
struct CpuTime {
    machine_ms: f64,
    process_ms: f64,
}

/// `/proc` counts in USER_HZ, which Linux fixes at 100 for user space.
const MS_PER_TICK: f64 = 10.0;

impl CpuTime {
    /// Now, from `/proc/stat` (busy: user, nice, system, irq, softirq; not idle, iowait or
    /// steal) and `/proc/self/stat` (utime, stime). NaN where `/proc` is not there.
    fn now() -> CpuTime {
        let machine = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            let f: Vec<f64> = s.lines().next()?.split_whitespace().skip(1).map_while(|v| v.parse().ok()).collect();
            Some(f.get(..3)?.iter().sum::<f64>() + f.get(5..7)?.iter().sum::<f64>())
        });
        let process = std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| {
            // After the command name, which may hold spaces: state is field 3, utime 14, stime 15.
            let f: Vec<&str> = s.get(s.rfind(')')? + 1..)?.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        });
        CpuTime {
            machine_ms: machine.map_or(f64::NAN, |t| t * MS_PER_TICK),
            process_ms: process.map_or(f64::NAN, |t| t * MS_PER_TICK),
        }
    }

    /// Per operation since `start`, over `n` operations.
    fn per_op_since(start: CpuTime, n: usize) -> CpuTime {
        let now = CpuTime::now();
        let n = n.max(1) as f64;
        CpuTime {
            machine_ms: (now.machine_ms - start.machine_ms) / n,
            process_ms: (now.process_ms - start.process_ms) / n,
        }
    }
}

/// The kinds of thread the farm's time is split into, by the start of the thread's name
/// (`/proc/self/task/*/comm`); the rest count as "other".
const THREAD_KINDS: [(&str, &str); 3] = [
    // The async runtime: HTTP both ways (the farm's and the load's), tiny renders, the rest.
    ("runtime", "tokio-rt-worker"),
    // SQLite's connections, each on a thread of its own: the writer and the readers.
    ("database", "sqlx-sqlite-wor"),
    // The asset store's landing thread: scratch files, renames, syncs.
    ("assets", "kiln-assets"),
];

/// The kinds [`ThreadTimes`] counts: [`THREAD_KINDS`], then "other".
const KINDS: usize = THREAD_KINDS.len() + 1;

/// Where one kind of thread's time went: on a CPU, and ready but waiting for one. Time spent
/// waiting says a thread was held up by the others, not by its own work: on a full machine a
/// serial stage (the database writer) waits for a CPU as long as it runs.
#[derive(Debug, Clone, Copy)]
struct ThreadTimes {
    /// Milliseconds on a CPU, by [`THREAD_KINDS`] and then "other".
    run_ms: [f64; KINDS],
    /// Milliseconds ready to run but waiting for a CPU, the same way.
    wait_ms: [f64; KINDS],
}

/// Each thread of this process at one moment, by id: its kind ([`thread_kind`]), nanoseconds
/// on a CPU and waiting for one (`/proc/self/task/*/schedstat`).
type ThreadSnapshot = std::collections::HashMap<u64, (usize, u64, u64)>;

/// This process's threads now.
fn thread_snapshot() -> ThreadSnapshot {
    let mut out = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return out };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else { continue };
        let (Ok(comm), Ok(stat)) =
            (std::fs::read_to_string(task.path().join("comm")), std::fs::read_to_string(task.path().join("schedstat")))
        else {
            continue;
        };
        if let Some((run, wait)) = parse_schedstat(&stat) {
            out.insert(tid, (thread_kind(comm.trim_end()), run, wait));
        }
    }
    out
}

/// A thread's kind by its name: the index into [`THREAD_KINDS`], or its length for "other".
fn thread_kind(comm: &str) -> usize {
    THREAD_KINDS.iter().position(|(_, prefix)| comm.starts_with(prefix)).unwrap_or(THREAD_KINDS.len())
}

/// `/proc/*/schedstat`: nanoseconds on a CPU, nanoseconds waiting for one, time slices.
fn parse_schedstat(s: &str) -> Option<(u64, u64)> {
    let mut f = s.split_whitespace().map(str::parse::<u64>);
    Some((f.next()?.ok()?, f.next()?.ok()?))
}

impl ThreadTimes {
    /// Per operation over `n` since `start` ([`thread_snapshot`]). A thread that ended meanwhile
    /// is not counted; one that began counts whole. NaN where `/proc` has no threads to read.
    fn per_op_since(start: &ThreadSnapshot, n: usize) -> ThreadTimes {
        let now = thread_snapshot();
        if now.is_empty() {
            return ThreadTimes { run_ms: [f64::NAN; KINDS], wait_ms: [f64::NAN; KINDS] };
        }
        let mut t = ThreadTimes { run_ms: [0.0; KINDS], wait_ms: [0.0; KINDS] };
        let n = n.max(1) as f64;
        for (tid, (kind, run, wait)) in now {
            let (run0, wait0) = start.get(&tid).map_or((0, 0), |(_, r, w)| (*r, *w));
            t.run_ms[kind] += run.saturating_sub(run0) as f64 / 1e6 / n;
            t.wait_ms[kind] += wait.saturating_sub(wait0) as f64 / 1e6 / n;
        }
        t
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    percentile(&xs, 0.5)
}

/// Each figure's median over runs.
fn medians<'a>(runs: impl Iterator<Item = &'a Figures> + Clone) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(runs.clone().map(f).collect());
    Figures {
        per_second: m(|f| f.per_second),
        p50_ms: m(|f| f.p50_ms),
        p99_ms: m(|f| f.p99_ms),
        cpu: CpuTime { machine_ms: m(|f| f.cpu.machine_ms), process_ms: m(|f| f.cpu.process_ms) },
        threads: ThreadTimes {
            run_ms: std::array::from_fn(|i| median(runs.clone().map(|f| f.threads.run_ms[i]).collect())),
            wait_ms: std::array::from_fn(|i| median(runs.clone().map(|f| f.threads.wait_ms[i]).collect())),
        },
    }
}

/// Runs `n` operations over `concurrency` clients; each returns its latency in seconds.
async fn drive<F, Fut>(n: usize, concurrency: usize, op: F) -> anyhow::Result<Figures>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<f64>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let cpu = CpuTime::now();
    let threads = thread_snapshot();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (op, next) = (op.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    return Ok::<_, anyhow::Error>(lat);
                }
                lat.push(op(i).await?);
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.context("a load task panicked")??);
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = CpuTime::per_op_since(cpu, n);
    let threads = ThreadTimes::per_op_since(&threads, n);
    all.sort_by(f64::total_cmp);
    Ok(Figures {
        per_second: n as f64 / wall,
        p50_ms: percentile(&all, 0.5) * 1e3,
        p99_ms: percentile(&all, 0.99) * 1e3,
        cpu,
        threads,
    })
}

/// What the load reads of a job in an answer; the rest is skipped, not built into a JSON tree
/// (a tree per answer was about 2% of this process's CPU in the tiny phase: the load's, on the
/// machine the farm shares with it).
#[derive(Debug, Deserialize)]
struct Seen {
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
struct SeenJobs {
    jobs: Vec<Seen>,
}

async fn submit(c: &Client, body: Bytes) -> anyhow::Result<Seen> {
    Ok(c.call_as(Method::POST, "/v1/jobs", Some(body)).await?)
}

/// Waits for a job to end; its state then.
async fn wait(c: &Client, id: &str) -> anyhow::Result<Seen> {
    Ok(c.call_as(Method::GET, &format!("/v1/jobs/{id}?wait=60"), None).await?)
}

/// A tiny 16×16 preview job's request.
fn tiny_job(prompt: &str, seed: u64) -> serde_json::Value {
    json!({ "prompt": prompt, "seed": seed, "tier": "preview", "width": 16 })
}

/// How a client of the tiny phase hands in a job and hears that it ended.
#[derive(Debug, Clone, Copy)]
enum Trips {
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
async fn tiny_jobs(
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
async fn tiny_batches(
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
struct BenchFarm {
    dir: std::path::PathBuf,
    client: Client,
    sched: Arc<crate::scheduler::Scheduler>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl BenchFarm {
    /// Starts one in `TMP/kiln-bench-{name}-PID`, with `cfg` changed by `change`.
    async fn start(cfg: &FarmConfig, name: &str, change: impl FnOnce(&mut FarmConfig)) -> anyhow::Result<BenchFarm> {
        let dir = std::env::temp_dir().join(format!("kiln-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfg = cfg.clone();
        cfg.worker.data_dir = dir.clone();
        cfg.worker.backend = BackendChoice::Cpu;
        cfg.worker.threads = 1;
        cfg.scheduler.listen = "127.0.0.1:0".parse().expect("valid address");
        change(&mut cfg);
        let farm = Farm::build(&cfg, open_backend(BackendChoice::Cpu, 1)?).await?;
        let url = format!("http://{}", farm.local_addr()?);
        let token = std::fs::read_to_string(cfg.token_path())?.trim().to_owned();
        let sched = farm.scheduler().clone();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let server = tokio::spawn(farm.run_until_stopped(async move { stopped.cancelled().await }));
        Ok(BenchFarm { dir, client: Client::new(&url, Some(Secret::new(token))), sched, stop, server })
    }

    /// Stops the farm; its data dir is removed when the benchmark ends ([`Cleanup`]), unless
    /// `kept` names the run (counted from 0) to print it kept for.
    async fn stop(self, kept: Option<usize>) -> anyhow::Result<()> {
        self.stop.cancel();
        self.server.await.context("the farm panicked")??;
        match kept {
            Some(run) => println!("  run {}: data kept in {}", run + 1, self.dir.display()),
            None => FINISHED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(self.dir),
        }
        Ok(())
    }
}

/// The data dirs of finished runs. They are removed when the whole benchmark ends, not between
/// runs: on ext4 without a journal (as on the machine these figures come from), creating files
/// within a minute or so of deleting thousands makes the kernel step over each recently deleted
/// inode (`recently_deleted`), which took a sixth of the CPU from the run after a removal.
static FINISHED: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Removes the finished runs' data dirs when dropped: at a benchmark's end, or its failure.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        for dir in FINISHED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One run's figures: cache hits at each client count, tiny jobs one at a time (each of
/// [`Trips::ALL`], in its order), and tiny jobs in batches (when asked for).
type RunFigures = (Vec<Figures>, Vec<Figures>, Option<Figures>);

async fn one_run(cfg: &FarmConfig, a: &FarmBenchArgs, run: usize) -> anyhow::Result<RunFigures> {
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

/// One run of the store alone: submit every job, dispatch them all, then record each result
/// (SQLite: a start and a finish, as the embedded farm does; PostgreSQL: one `record`, as the
/// distributed scheduler does).
async fn store_run(a: &StoreBenchArgs, run: usize) -> anyhow::Result<[f64; 3]> {
    let dir = std::env::temp_dir().join(format!("kiln-bench-store-{}-{run}", std::process::id()));
    let schema = format!("kiln_bench_store_{}_{run}", std::process::id());
    let store: Arc<dyn Store> = match &a.database_url {
        Some(base) => {
            let url = PgStore::create_schema(base, &schema).await.context("making a scratch schema")?;
            Arc::new(PgStore::open(&url).await?)
        }
        None => {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            Arc::new(SqliteStore::open(&dir.join(crate::farm::DB_FILE)).await?)
        }
    };
    let figures = store_phases(a, run, store).await;
    match &a.database_url {
        Some(base) => {
            let _ = PgStore::drop_schema(base, &schema).await;
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
    let mut due = Vec::with_capacity(n);
    loop {
        // As the in-process transport takes them: read, marked sent, the moved jobs kept.
        let pending = store.pending(now, 512).await?;
        if pending.rows.is_empty() {
            break;
        }
        let events = store.mark_sent(pending.rows.iter().map(|o| o.id).collect(), now).await?;
        let moved = events.into_iter().map(|e| e.job_id).collect();
        due.extend(crate::store::Due::of(pending, &moved).jobs);
    }
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
                let ok =
                    Outcome::Succeeded { asset, bytes: 800, provenance: Some(provenance.to_string()), png: Some(png) };
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
fn batched_medians(label: &str, runs: &[Figures]) -> Option<Figures> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_of_the_kind_its_name_starts_with() {
        // Linux cuts a thread's name to 15 bytes: sqlx's "sqlx-sqlite-worker-3" reads so.
        assert_eq!(THREAD_KINDS[thread_kind("sqlx-sqlite-wor")].0, "database");
        assert_eq!(THREAD_KINDS[thread_kind("tokio-rt-worker")].0, "runtime");
        assert_eq!(THREAD_KINDS[thread_kind("kiln-assets")].0, "assets");
        assert_eq!(thread_kind("kiln"), THREAD_KINDS.len(), "the main thread is other");
    }

    #[test]
    fn schedstat_gives_time_on_a_cpu_then_time_waiting_for_one() {
        assert_eq!(parse_schedstat("2790000000 2450000000 102734\n"), Some((2_790_000_000, 2_450_000_000)));
        assert_eq!(parse_schedstat("12 x 3"), None);
        assert_eq!(parse_schedstat(""), None);
    }

    #[test]
    fn this_process_threads_are_counted_by_kind() {
        let start = thread_snapshot();
        assert!(!start.is_empty(), "/proc/self/task lists this thread at least");
        // 50 ms on a CPU, by the thread's own count (on a busy machine that takes longer), on a
        // thread named as the asset store names its own; it stays alive until its time is read.
        let (worked, done) = std::sync::mpsc::channel();
        let spin = std::thread::Builder::new()
            .name("kiln-assets".into())
            .spawn(move || {
                let on_cpu = || {
                    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
                    parse_schedstat(&s).unwrap().0
                };
                let until = on_cpu() + 50_000_000;
                let mut x = 0u64;
                while on_cpu() < until {
                    for _ in 0..100_000 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                    }
                }
                worked.send(()).unwrap();
                std::thread::park();
                x
            })
            .unwrap();
        done.recv().unwrap();
        let t = ThreadTimes::per_op_since(&start, 10);
        spin.thread().unpark();
        spin.join().unwrap();
        // 50 ms over 10 operations: at least 5 ms each on a CPU, counted as assets. Other tests'
        // asset stores may add a little of theirs; a figure out of all bounds would be one in
        // other units (nanoseconds) or not divided by the operations.
        assert!(t.run_ms[2] >= 5.0, "{t:?}");
        assert!(t.run_ms[2] < 200.0, "{t:?}");
    }
}
