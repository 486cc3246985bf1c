//! `kiln bench dispatch`: the distributed farm end to end against the real PostgreSQL and
//! RabbitMQ, beside the broker's own ceiling on this machine.
//!
//! Each run, in a schema and under a queue prefix of its own (both removed afterwards):
//! 1. **Raw ceiling**: a bare lapin loop publishes persistent messages the size of a job message
//!    to the preview tier queue (the same exchange, queue arguments and durability as the farm's),
//!    awaiting confirms under a window, while a consumer with a large prefetch acks them in
//!    batches. Messages per second, from the first publish to the last ack.
//! 2. **End to end**: the scheduler (PostgreSQL store, relay, results consumer) and worker
//!    daemons in this process, sharing the asset folder (no upload), or with `--uploads` each with
//!    a folder of its own, handing its assets to the scheduler as a worker on another machine
//!    does (inside the result, or `PUT`). Each HTTP client submits a
//!    tiny 16×16 job with a fresh seed and waits for it (`GET /v1/jobs/{id}?wait=`), so a job
//!    counts once its result is recorded. Jobs per second and p50/p99 latency. Then the same
//!    with `--batch` jobs to a request, each array submitted and awaited in one
//!    `POST /v1/jobs?wait=`.
//!
//! A job costs its job message and its share of a result message (workers batch their results),
//! counted in each run, so the farm's share of the ceiling is `ceiling / messages per job` jobs per
//! second.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use futures_util::StreamExt;
use kiln_common::amqp::{self, lapin};
use kiln_protocol::wire::{self, JOB_TYPE, JobMessage, Names};
use kiln_protocol::{RenderRequest, Tier, TierLimits};
use kiln_worker::config::BackendChoice;
use kiln_worker::daemon::RunConfig;
use kiln_worker::worker::{Worker, open_backend};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;

use kiln_scheduler::auth::Role;
use kiln_scheduler::config::FarmConfig;

use crate::farm::{BenchFarm, Cleanup, Trips, batched_medians, tiny_batches, tiny_jobs};
use crate::stats::{Figures, median, medians};

/// The broker messages a job cost in a run: its job message and its share of a result message.
fn messages_per_job(result_messages: u64, results: u64) -> f64 {
    1.0 + result_messages as f64 / results.max(1) as f64
}

/// `kiln bench dispatch`'s arguments.
#[derive(Debug, Args)]
pub struct DispatchBenchArgs {
    /// Tiny (16×16) jobs per run.
    #[arg(long, default_value_t = 5_000)]
    pub jobs: usize,
    /// Concurrent HTTP clients, each submitting a job and waiting for it.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Jobs to a request in a second end-to-end phase, where each client submits an array and
    /// waits for all of it in the same request (`POST /v1/jobs?wait=`); 0 leaves it out.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Concurrent HTTP clients for the batched jobs.
    #[arg(long, default_value_t = 4)]
    pub batch_clients: usize,
    /// Worker daemons (in this process).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Each worker daemon keeps its own asset folder and hands each asset to the scheduler over
    /// HTTP with a worker token, as a worker on another machine does. Without it they share the
    /// scheduler's folder (`run.shared_assets`) and nothing is uploaded.
    #[arg(long)]
    pub uploads: bool,
    /// Renders at once per worker daemon.
    #[arg(long, default_value_t = 64)]
    pub worker_concurrency: usize,
    /// Each worker's prefetch per tier.
    #[arg(long, default_value_t = 256)]
    pub prefetch: u16,
    /// Messages for the raw broker ceiling per run.
    #[arg(long, default_value_t = 20_000)]
    pub raw_messages: usize,
    /// The PostgreSQL database (a scratch schema is made in it and dropped).
    #[arg(long, env = "KILN_DATABASE_URL", default_value = kiln_testenv::DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// The RabbitMQ broker (queues under a scratch prefix, deleted afterwards).
    #[arg(long, env = "KILN_AMQP_URL", default_value = kiln_testenv::DEFAULT_AMQP_URL)]
    pub amqp_url: String,
    /// Runs; the figures are the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Keep each run's data dir (its assets) instead of removing it at the end. On ext4 without
    /// a journal, making files within a minute or so of removing thousands is slow, so a
    /// benchmark started right after another that removed its dirs measured about 1.8 ms of
    /// kiln's CPU per job instead of 1.0.
    #[arg(long)]
    pub keep: bool,
}

/// A job message as the relay sends it for a tiny job: the raw loop's payload.
fn sample_job_message() -> anyhow::Result<Vec<u8>> {
    let request = RenderRequest::resolve(
        "cppn",
        "bench dispatch",
        1,
        Tier::Preview,
        Some(16),
        None,
        None,
        &TierLimits::default(),
    )?;
    let msg = JobMessage {
        v: wire::SCHEMA_VERSION,
        job_id: "01JBENCHDISPATCHSAMPLEJOB0".into(),
        attempt: 1,
        client: "operator".into(),
        cache_key: "0".repeat(64),
        created_ms: kiln_protocol::now_ms(),
        request,
    };
    Ok(serde_json::to_vec(&msg)?)
}

/// A fresh prefix for a run's queues.
pub(crate) fn scratch_name(what: &str, run: usize) -> String {
    format!("kiln_bench_{what}_{}_{run}", std::process::id())
}

/// Deletes the queues a run made.
pub(crate) async fn delete_queues(url: &str, names: &Names) -> anyhow::Result<()> {
    let conn = amqp::connect(url, "kiln-bench-cleanup").await?;
    let ch = conn.create_channel().await?;
    amqp::delete_queues(&ch, names).await?;
    amqp::close_channels(&[&ch], "done").await;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// The bare broker loop: `n` persistent messages of `body`'s size published with confirms
/// (at most `window` unconfirmed) while a consumer acks them in batches. Messages per second.
async fn raw_ceiling(
    url: &str,
    names: &Names,
    body: &[u8],
    n: usize,
    window: usize,
    prefetch: u16,
) -> anyhow::Result<f64> {
    let conn = amqp::connect(url, "kiln-bench-raw").await.context("connecting to RabbitMQ")?;
    let publ = amqp::confirm_channel(&conn).await?;
    amqp::declare_topology(&publ, names).await?;
    let cons = conn.create_channel().await?;
    cons.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = cons
        .basic_consume(
            names.tier_queue(Tier::Preview).into(),
            "kiln-bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let consume = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            // What is at hand (up to 64 deliveries), acked with one `multiple` ack.
            let Some(first) = consumer.next().await else { bail!("the consumer was closed after {got} messages") };
            let mut last = first?;
            got += 1;
            while got < n && got % 64 != 0 {
                match futures_util::FutureExt::now_or_never(consumer.next()) {
                    Some(Some(d)) => {
                        last = d?;
                        got += 1;
                    }
                    Some(None) => bail!("the consumer was closed after {got} messages"),
                    None => break,
                }
            }
            last.ack(BasicAckOptions { multiple: true }).await?;
        }
        Ok::<_, anyhow::Error>(())
    });
    let exchange = names.jobs_exchange();
    let mut confirms = VecDeque::with_capacity(window);
    for i in 0..n {
        let props = amqp::properties(JOB_TYPE, &format!("raw:{i}"));
        let c = publ
            .basic_publish(
                exchange.clone().into(),
                Tier::Preview.as_str().into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await?;
        confirms.push_back(c);
        if confirms.len() >= window
            && let Some(c) = confirms.pop_front()
            && !c.await?.is_ack()
        {
            bail!("the broker refused a message");
        }
    }
    for c in confirms {
        if !c.await?.is_ack() {
            bail!("the broker refused a message");
        }
    }
    consume.await.context("the consumer panicked")??;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    amqp::close_channels(&[&publ, &cons], "done").await;
    let _ = conn.close(200, "done".into()).await;
    Ok(rate)
}

/// One end-to-end run: a farm on PostgreSQL and RabbitMQ with worker daemons in this process;
/// jobs one to a request, then (when asked for) in batches.
async fn end_to_end(
    cfg: &FarmConfig,
    a: &DispatchBenchArgs,
    run: usize,
    db: &str,
    prefix: &str,
) -> anyhow::Result<(Figures, Option<Figures>, f64)> {
    let farm = BenchFarm::start(cfg, &format!("dispatch-{run}"), |cfg| {
        cfg.scheduler.database_url = Some(db.into());
        cfg.scheduler.broker.amqp_url = Some(a.amqp_url.as_str().into());
        cfg.scheduler.broker.prefix = prefix.to_owned();
    })
    .await?;
    let stop = farm.stop.clone();
    // Every daemon signs its results and heartbeats with it, and uploads with it where it uploads.
    let token = Some(
        farm.sched
            .create_token(&format!("bench-workers-{run}"), Role::Worker, &[], None, None)
            .await?
            .expose()
            .to_owned(),
    );
    // The workers whose asset folders (and metrics) the daemons use: one each, or the farm's own.
    let workers: Vec<Arc<Worker>> = match a.uploads {
        true => (0..a.workers)
            .map(|i| {
                let mut wc = cfg.worker.clone();
                wc.data_dir = farm.dir.join(format!("worker-{i}"));
                anyhow::Ok(Arc::new(Worker::new(&wc, open_backend(BackendChoice::Cpu, 1)?)?))
            })
            .collect::<Result<_, _>>()?,
        false => vec![farm.sched.worker.clone()],
    };
    let mut daemons = Vec::new();
    for i in 0..a.workers {
        let rc = RunConfig {
            amqp_url: a.amqp_url.as_str().into(),
            amqp_prefix: prefix.to_owned(),
            tiers: vec![Tier::Preview],
            prefetch: a.prefetch,
            concurrency: a.worker_concurrency,
            scheduler_url: farm.client.base().to_owned(),
            token: token.clone(),
            shared_assets: !a.uploads,
            worker_id: Some(format!("bench-{run}-{i}")),
            ..RunConfig::default()
        };
        let worker = workers[i % workers.len()].clone();
        daemons.push(tokio::spawn(kiln_worker::daemon::run(worker, rc, stop.clone())));
    }
    let sent = |workers: &[Arc<Worker>]| {
        workers.iter().fold((0, 0, 0), |(m, r, a), w| {
            let w = &w.metrics;
            (m + w.result_messages.get(), r + w.results.get(), a + w.ack_frames.get())
        })
    };
    let (messages0, results0, acks0) = sent(&workers);
    let base = 1_000_000 * (run as u64 + 1) + u64::from(std::process::id()) * 1_000_000_000;
    let figures = async {
        let one = tiny_jobs(&farm.client, "bench dispatch", base, a.jobs, a.concurrency, Trips::SubmitThenWait).await?;
        let seed0 = base + a.jobs as u64;
        let batched = tiny_batches(&farm.client, "bench dispatch", seed0, a.jobs, a.batch, a.batch_clients).await?;
        anyhow::Ok((one, batched))
    }
    .await;
    stop.cancel();
    for d in daemons {
        d.await.context("a worker daemon panicked")??;
    }
    let (messages, results, acks) = sent(&workers);
    let (messages, results, acks) = (messages - messages0, results - results0, acks - acks0);
    farm.stop(a.keep.then_some(run)).await?;
    let (one, batched) = figures?;
    println!("  run {}: {results} results in {messages} result messages, their jobs acked in {acks} frames", run + 1);
    Ok((one, batched, messages_per_job(messages, results)))
}

/// Runs `kiln bench dispatch` and prints its figures.
pub async fn run(cfg: &FarmConfig, a: &DispatchBenchArgs) -> anyhow::Result<()> {
    let _cleanup = Cleanup;
    let body = sample_job_message()?;
    let shown_db = kiln_protocol::SecretUrl::from(a.database_url.as_str());
    let shown_mq = kiln_protocol::SecretUrl::from(a.amqp_url.as_str());
    println!(
        "kiln bench dispatch: PostgreSQL {shown_db}, RabbitMQ {shown_mq}; per run {} raw {}-byte messages, then {} tiny 16×16 jobs over {} clients, {} worker daemons × {} renders, prefetch {}; {} runs (medians)",
        a.raw_messages,
        body.len(),
        a.jobs,
        a.concurrency,
        a.workers,
        a.worker_concurrency,
        a.prefetch,
        a.runs
    );
    let window = cfg.scheduler.broker.window as usize;
    let (mut raws, mut e2es, mut batches, mut per_job) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let batched = format!("{} jobs to a request over {} clients", a.batch, a.batch_clients);
    for run in 0..a.runs.max(1) {
        let names = Names::new(&scratch_name("raw", run));
        let raw = raw_ceiling(&a.amqp_url, &names, &body, a.raw_messages, window, a.prefetch).await;
        delete_queues(&a.amqp_url, &names).await?;
        let raw = raw?;
        let schema = scratch_name("db", run);
        let db = kiln_testenv::create_schema(&a.database_url, &schema).await.context("making a scratch schema")?;
        let prefix = scratch_name("mq", run);
        let e2e = end_to_end(cfg, a, run, &db, &prefix).await;
        let _ = kiln_testenv::drop_schema(&a.database_url, &schema).await;
        delete_queues(&a.amqp_url, &Names::new(&prefix)).await?;
        let (e2e, batch, messages) = e2e?;
        per_job.push(messages);
        println!("  run {}: raw ceiling {raw:.0} msgs/s; end to end {}", run + 1, e2e.run_line("job"));
        if let Some(f) = batch {
            println!("  run {}: end to end, {batched}: {}", run + 1, f.run_line("job"));
            batches.push(f);
        }
        raws.push(raw);
        e2es.push(e2e);
    }
    let raw = median(raws);
    let e2e = medians(e2es.iter());
    let jobs_s = e2e.per_second;
    let messages = median(per_job);
    let share = raw / messages;
    println!("raw broker ceiling: {raw:.0} msgs/s ({} B persistent, confirms, batched acks)", body.len());
    println!("end to end, {} clients: {} (aim: >= 5000 jobs/s){}", a.concurrency, e2e.summary(), e2e.cpu_line("job"));
    if let Some(line) = services_bound(&e2e) {
        println!("{line}");
    }
    let best =
        batched_medians(&format!("end to end, {batched}"), &batches).map_or(jobs_s, |b| b.per_second.max(jobs_s));
    println!(
        "ceiling / {messages:.2} messages per job = {share:.0} jobs/s; one job to a request is {:.2} of it, the best {:.2} (aim: >= 0.5)",
        jobs_s / share,
        best / share
    );
    Ok(())
}

/// What the rest of the machine cost a job (the broker, the database, the kernel's own threads:
/// the machine's CPU less kiln's) and the rate this machine's cores would bound the farm at for
/// that alone, were kiln's own CPU nothing; `None` where the CPU time is unknown.
fn services_bound(e2e: &Figures) -> Option<String> {
    let outside = e2e.cpu.machine_ms - e2e.cpu.process_ms;
    let cores = std::thread::available_parallelism().ok()?.get();
    (outside.is_finite() && outside > 0.0).then(|| {
        format!(
            "outside kiln (broker, database, kernel): {outside:.3} ms/job; for that alone {cores} cores bound the farm at {:.0} jobs/s",
            cores as f64 * 1e3 / outside
        )
    })
}
