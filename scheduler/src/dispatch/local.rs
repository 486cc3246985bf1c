//! The embedded farm's transport and its workers: the in-process queue the outbox loop hands
//! jobs to ([`LocalQueue`]), and the workers that take them ([`run_worker`]), render through the
//! same attempt as a worker daemon ([`kiln_worker::attempt`]) and settle each end through the same
//! path as a daemon's result ([`Scheduler::settle`]), so the retry, quarantine and drain rules
//! hold in both modes.

use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::Tier;
use kiln_protocol::now_ms;
use kiln_protocol::wire::{self, Heartbeat};
use kiln_worker::assets::SPILL_BYTES;
use kiln_worker::attempt::attempt;
use kiln_worker::render::Progress;
use kiln_worker::worker::Rendered;
use tokio_util::sync::CancellationToken;

use super::queue::JobQueue;
use super::{Dispatch, DispatchError, Marker};
use crate::results::{Ended, Report, Settled};
use crate::scheduler::{Live, Scheduler};
use crate::store::{BoxFut, Dispatch as Job, Due, Outgoing, Pending};

/// An in-process render of fewer samples than this (width × height × samples²) writes its `running`
/// event with its result, in one write, instead of one write before the render and one after (a job
/// otherwise costs four writes: its submit, dispatch, start and result). The event keeps the time
/// the render started; the job shows `dispatched` meanwhile, for a moment, and a job cancelled
/// meanwhile is rendered (for nothing) but stays cancelled. A larger render writes its start first,
/// so it shows `running` while it renders and is skipped once cancelled.
const START_WITH_RESULT_BELOW_SAMPLES: u64 = 64 * 64;

/// Renders the in-process workers have done whose small PNGs are still being recorded, at most,
/// shared out among the workers. More lengthens the queue each write ends and the wait of the
/// jobs at its back (see `docs/benchmarks.md`).
const FINISHING_PER_FARM: usize = 256;

/// The id of the `n`th in-process worker, as the registry, the failure tally and a quarantined
/// job's error name it.
pub fn worker_id(n: usize) -> String {
    format!("in-process-{n}")
}

/// The in-process queue as a transport: rows are marked sent first (a crash before a worker takes
/// one leaves its job `dispatched`, and the next start queues it again), then the jobs the mark
/// moved to `dispatched` are queued, so a job's events come in order.
#[derive(Default)]
pub struct LocalQueue {
    queue: JobQueue,
}

impl LocalQueue {
    /// The queue the workers take from.
    pub fn jobs(&self) -> &JobQueue {
        &self.queue
    }
}

impl Dispatch for LocalQueue {
    fn window(&self) -> u32 {
        512
    }

    fn marks_as_it_reads(&self) -> bool {
        true
    }

    fn send<'a>(&'a self, rows: Vec<Outgoing>, marker: &'a Marker<'a>) -> BoxFut<'a, Result<usize, DispatchError>> {
        Box::pin(async move {
            let n = rows.len();
            let moved = marker.mark(rows.iter().map(|o| o.id).collect()).await?;
            let due = Due::of(Pending { rows, next_due_ms: None }, &moved);
            self.queue.push_all(due.jobs);
            Ok(n)
        })
    }
}

/// Puts in-process worker `n` in the registry, before the farm answers its first request (so
/// `GET /v1/workers` lists it from the start).
pub fn join(sched: &Scheduler, n: usize, tiers: &[Tier]) {
    let engine = sched.worker.engine();
    sched.registry.join_local(Heartbeat {
        v: wire::SCHEMA_VERSION,
        worker_id: worker_id(n),
        host: kiln_common::host_name(),
        backend: engine.backend.name().to_owned(),
        adapter: engine.backend.device_name(),
        // The GPU's size; what is in use changes by the second, and this heartbeat is sent once.
        memory_bytes: engine.backend.usage().map(|u| u.memory_total_bytes),
        memory_used_bytes: None,
        utilization_percent: None,
        models: vec![kiln_worker::engine::cppn::MODEL_ID.to_owned()],
        tiers: tiers.to_vec(),
        in_flight: 0,
        concurrency: 1,
        draining: false,
        drained: None,
        at_ms: now_ms(),
        every_ms: None,
    });
}

/// One in-process worker, the `n`th: takes jobs of `tiers` from `queue` until cancelled, finishing
/// the one in hand, and takes none while it is drained. A render's small PNG is recorded while
/// the worker renders the next (its share of [`FINISHING_PER_FARM`] at once). Those it has begun
/// are finished before it returns.
pub async fn run_worker(
    sched: Arc<Scheduler>,
    queue: Arc<LocalQueue>,
    n: usize,
    tiers: Vec<Tier>,
    stop: CancellationToken,
) {
    let id = worker_id(n);
    let mut finishing = tokio::task::JoinSet::new();
    let most = (FINISHING_PER_FARM / sched.cfg.workers.max(1)).max(1);
    loop {
        while finishing.len() >= most {
            finishing.join_next().await;
        }
        // Finished ones are let go of as the worker goes.
        while finishing.try_join_next().is_some() {}
        if let Some(reason) = sched.registry.drained_reason(&id) {
            tracing::warn!(worker = id, reason, "drained: taking no work until the operator resumes this worker");
            tokio::select! {
                () = stop.cancelled() => break,
                () = sched.registry.until_not_drained(&id) => continue,
            }
        }
        let d = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            d = queue.jobs().pop(&tiers) => d,
        };
        let started_ms = now_ms();
        // A tiny render's start is written with its result instead.
        if d.request.sample_count() >= START_WITH_RESULT_BELOW_SAMPLES {
            match sched.store.start(&d, started_ms).await {
                Ok(Some(e)) => sched.publish(vec![e]),
                Ok(None) => continue,
                Err(e) => {
                    // The job stays dispatched; the next start of the farm runs it.
                    tracing::error!(job_id = d.job_id, error = %e, "worker: cannot mark the job running");
                    continue;
                }
            }
        }
        let ended = render(&sched, &id, &d).await;
        let report = Report { d, worker: id.clone(), started_ms, finished_ms: now_ms(), ended };
        // A small PNG held in memory, which the report carries to the asset's row, is recorded
        // while the worker goes on to its next render.
        if matches!(report.ended, Ended::Succeeded { png: Some(_), .. }) {
            let sched = sched.clone();
            finishing.spawn(async move { settle(&sched, &report).await });
        } else {
            settle(&sched, &report).await;
        }
    }
    while finishing.join_next().await.is_some() {}
}

/// Renders a job through the attempt every worker makes, telling listeners its progress.
#[tracing::instrument(level = "debug", skip_all, fields(job_id = %job.job_id, attempt = job.attempt, worker = %worker))]
async fn render(sched: &Arc<Scheduler>, worker: &str, job: &Job) -> Ended {
    sched.metrics.in_flight.inc();
    // Per job at debug: the job's events record it, and a line per job floods a busy farm's log.
    tracing::debug!(tier = %job.tier, "rendering");
    let (live, id) = (sched.live_sender(), job.job_id.clone());
    let mut last = 0;
    let progress = move |p: Progress| {
        // Progress is for people: at most every 2% and the end.
        if p.rows_done == p.rows || p.rows_done * 50 / p.rows.max(1) > last {
            last = p.rows_done * 50 / p.rows.max(1);
            let _ = live.send(Arc::new(Live::Progress {
                job_id: id.clone(),
                rows_done: p.rows_done,
                rows: p.rows,
                tiles: None,
            }));
        }
    };
    let done = attempt(&sched.worker, job.request.clone(), SPILL_BYTES as u64, progress, |_, r| r).await;
    sched.metrics.in_flight.dec();
    match done {
        // The render wrote its provenance as JSON text; a small PNG is held in memory.
        Ok(Rendered { asset, bytes, provenance, png, .. }) => Ended::Succeeded { asset, bytes, provenance, png },
        Err(f) => Ended::Failed { error: f.error, transient: f.transient },
    }
}

/// Settles an in-process attempt, trying the store a few times before leaving the job to the
/// next start (it stays `dispatched` or `running`, and is queued again then). An end the store
/// refuses outright is not tried again; the job is queued again at the next start.
async fn settle(sched: &Scheduler, report: &Report) {
    for wait_ms in [0, 100, 1000, 5000] {
        if wait_ms > 0 {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        }
        match sched.settle(report).await {
            Settled::Recorded => return,
            Settled::Again => {}
            Settled::Refused(why) => {
                tracing::error!(job_id = report.d.job_id, why, "the store refused an attempt's end");
                return;
            }
        }
    }
}
