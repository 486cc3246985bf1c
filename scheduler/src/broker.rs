//! Distributed dispatch over RabbitMQ: the outbox relay (publish with confirms, mark sent only
//! after the confirm), the results consumer (record each worker's result, then ack), and the
//! worker registry fed by heartbeats. Reconnects with backoff when the broker goes away; rows not
//! yet confirmed stay unsent and are published again, and a result is acked only once it is
//! durable in the store, so nothing is lost and a repeat changes nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use kiln_protocol::wire::{
    self, AttemptOutcome, CONTROL_TYPE, Command, ControlMessage, HEARTBEAT_TYPE, Heartbeat, JOB_TYPE, JobMessage,
    MessageError, Names, RESULT_TYPE, RESULTS_TYPE, ResultBatch, ResultMessage,
};
use kiln_worker::amqp::{self, PublishError};
use kiln_worker::render::{THUMB_SIDE, own_thumbnail};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::BrokerConfig;
use crate::scheduler::Scheduler;
use crate::store::writer::MAX_BATCH;
use crate::store::{AttemptFailure, Dispatch, DrainedWorker, Outcome};
use crate::time::now_ms;

/// A worker as the registry knows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerEntry {
    /// Its last heartbeat.
    #[serde(flatten)]
    pub heartbeat: Heartbeat,
    /// `active`, `draining`, `drained` or `lost`.
    pub state: &'static str,
    /// Why the scheduler drained it, while it is drained.
    pub drained_reason: Option<String>,
    /// When it was last heard from, unix milliseconds.
    pub last_seen_ms: i64,
}

/// The workers heard from (by heartbeat), kept in memory: after a restart of the scheduler the
/// registry fills again within one heartbeat period. It also holds the drained workers (a
/// mirror of the store's) and the control messages waiting to be sent to workers.
#[derive(Debug, Default)]
pub struct Registry {
    workers: Mutex<HashMap<String, (Heartbeat, i64)>>,
    drained: Mutex<HashMap<String, DrainedWorker>>,
    commands: Mutex<Vec<ControlMessage>>,
    /// Workers already reported lost (reported once; cleared when heard from again).
    reported_lost: Mutex<std::collections::HashSet<String>>,
    /// Woken when a command is waiting.
    pub(crate) command_wake: tokio::sync::Notify,
    lost_after_ms: i64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// A registry that shows a worker unheard for `lost_after` as lost.
    pub fn new(lost_after: Duration) -> Registry {
        Registry { lost_after_ms: lost_after.as_millis() as i64, ..Registry::default() }
    }

    /// How long `hb`'s worker may be silent before it is shown lost: the lost period, or three
    /// of its beats where that is longer, so that one late beat never shows a working worker lost.
    fn silence_allowed_ms(&self, hb: &Heartbeat) -> i64 {
        let beats = hb.every_ms.map_or(0, |ms| i64::try_from(ms.saturating_mul(3)).unwrap_or(i64::MAX));
        self.lost_after_ms.max(beats)
    }

    /// Records a heartbeat; a worker whose view of its drain differs from the scheduler's is
    /// told again (it restarted, or a command was lost).
    pub fn heard(&self, hb: Heartbeat, now_ms: i64) {
        let drained = lock(&self.drained).get(&hb.worker_id).map(|d| d.reason.clone());
        match (&drained, &hb.drained) {
            (Some(reason), None) => self.command(&hb.worker_id, Command::Drain { reason: reason.clone() }),
            (None, Some(_)) => self.command(&hb.worker_id, Command::Resume),
            _ => {}
        }
        if lock(&self.reported_lost).remove(&hb.worker_id) {
            tracing::info!(worker = hb.worker_id, "a lost worker is heard from again");
        }
        let mut w = lock(&self.workers);
        if !w.contains_key(&hb.worker_id) {
            tracing::info!(worker = hb.worker_id, host = hb.host, backend = hb.backend, "a worker joined");
            if self.silence_allowed_ms(&hb) > self.lost_after_ms {
                tracing::warn!(
                    worker = hb.worker_id,
                    every_ms = hb.every_ms,
                    lost_after_ms = self.lost_after_ms,
                    "a worker beats too seldom for lost_after_seconds; it is shown lost after three missed beats instead"
                );
            }
        }
        w.insert(hb.worker_id.clone(), (hb, now_ms));
    }

    /// Queues a command for a worker.
    fn command(&self, worker_id: &str, command: Command) {
        let msg = ControlMessage { v: wire::SCHEMA_VERSION, worker_id: worker_id.to_owned(), command };
        lock(&self.commands).push(msg);
        self.command_wake.notify_one();
    }

    /// The commands waiting to be sent.
    fn take_commands(&self) -> Vec<ControlMessage> {
        std::mem::take(&mut *lock(&self.commands))
    }

    /// Puts back commands that could not be sent.
    fn put_back(&self, mut msgs: Vec<ControlMessage>) {
        let mut c = lock(&self.commands);
        msgs.append(&mut c);
        *c = msgs;
    }

    /// Replaces the drained workers (from the store, at the start of a broker session).
    pub fn set_drained(&self, list: Vec<DrainedWorker>) {
        *lock(&self.drained) = list.into_iter().map(|d| (d.worker_id.clone(), d)).collect();
    }

    /// Marks a worker drained and tells it.
    pub fn drain(&self, d: DrainedWorker) {
        self.command(&d.worker_id, Command::Drain { reason: d.reason.clone() });
        lock(&self.drained).insert(d.worker_id.clone(), d);
    }

    /// Lets a drained worker work again and tells it.
    pub fn resume(&self, worker_id: &str) {
        lock(&self.drained).remove(worker_id);
        self.command(worker_id, Command::Resume);
    }

    /// Every worker heard from, with its state as of `now_ms`, by id.
    pub fn list(&self, now_ms: i64) -> Vec<WorkerEntry> {
        let drained = lock(&self.drained);
        let w = lock(&self.workers);
        let mut out: Vec<WorkerEntry> = w
            .values()
            .map(|(hb, seen)| {
                let reason = drained.get(&hb.worker_id).map(|d| d.reason.clone());
                WorkerEntry {
                    state: if now_ms - seen > self.silence_allowed_ms(hb) {
                        "lost"
                    } else if reason.is_some() {
                        "drained"
                    } else if hb.draining {
                        "draining"
                    } else {
                        "active"
                    },
                    drained_reason: reason,
                    heartbeat: hb.clone(),
                    last_seen_ms: *seen,
                }
            })
            .collect();
        out.sort_by(|a, b| a.heartbeat.worker_id.cmp(&b.heartbeat.worker_id));
        out
    }

    /// Says once (a warning) of each worker that has become lost: no heartbeat for the lost
    /// period. Whatever it had in hand goes back to its queue when the broker sees its connection
    /// close. Returns the newly lost.
    pub fn sweep(&self, now_ms: i64) -> Vec<String> {
        let lost: Vec<WorkerEntry> = self.list(now_ms).into_iter().filter(|e| e.state == "lost").collect();
        let mut reported = lock(&self.reported_lost);
        let mut newly = Vec::new();
        for e in lost {
            if reported.insert(e.heartbeat.worker_id.clone()) {
                tracing::warn!(
                    worker = e.heartbeat.worker_id,
                    host = e.heartbeat.host,
                    silent_s = (now_ms - e.last_seen_ms) / 1000,
                    in_flight = e.heartbeat.in_flight,
                    "a worker is lost (no heartbeat); its unacked jobs return to the queue when its connection closes"
                );
                newly.push(e.heartbeat.worker_id);
            }
        }
        newly
    }

    /// Workers by state, for the `kiln_workers` gauge.
    pub fn counts(&self, now_ms: i64) -> HashMap<&'static str, usize> {
        let mut n = HashMap::new();
        for e in self.list(now_ms) {
            *n.entry(e.state).or_default() += 1;
        }
        n
    }
}

/// Runs the relay, the results consumer and the heartbeat listener until `stop`, reconnecting
/// whenever the broker goes away.
pub async fn run(sched: Arc<Scheduler>, cfg: BrokerConfig, stop: CancellationToken) {
    let Some(url) = cfg.amqp_url.clone() else { return };
    let names = Names::new(&cfg.prefix);
    loop {
        let Some(conn) = amqp::connect_with_backoff(&url, "kiln-scheduler", stop.cancelled()).await else { return };
        tracing::info!(prefix = names.prefix(), "connected to RabbitMQ");
        let session = stop.child_token();
        // The session ends itself on `stop`, closing its channels on the way out.
        let result = run_session(&sched, &cfg, &names, &conn, session.clone()).await;
        session.cancel();
        let _ = conn.close(200, "bye".into()).await;
        match result {
            Ok(()) if stop.is_cancelled() => return,
            Ok(()) => tracing::warn!("the broker session ended; reconnecting"),
            Err(e) => tracing::warn!(error = %e, "lost the broker; reconnecting"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn run_session(
    sched: &Arc<Scheduler>,
    cfg: &BrokerConfig,
    names: &Names,
    conn: &Connection,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let publ = amqp::confirm_channel(conn).await?;
    amqp::declare_topology(&publ, names).await?;
    let results = conn.create_channel().await?;
    results.basic_qos(1024, BasicQosOptions::default()).await?;
    let beats = conn.create_channel().await?;
    let dead = amqp::confirm_channel(conn).await?;
    let control = amqp::confirm_channel(conn).await?;
    sched.registry.set_drained(sched.store.drained().await?);
    let result = tokio::select! {
        r = relay(sched, cfg, names, &publ, &stop) => r,
        r = consume_results(sched, names, &results, &dead) => r,
        r = consume_heartbeats(sched, names, &beats) => r,
        r = send_commands(sched, names, &control) => r,
        () = stop.cancelled() => Ok(()),
    };
    amqp::close_channels(&[&publ, &results, &beats, &dead, &control], "bye").await;
    result
}

/// Sends the registry's commands to their workers as they come.
async fn send_commands(sched: &Scheduler, names: &Names, ch: &Channel) -> anyhow::Result<()> {
    let exchange = names.control_exchange();
    loop {
        let msgs = sched.registry.take_commands();
        for (i, m) in msgs.iter().enumerate() {
            let body = serde_json::to_vec(m)?;
            let props = amqp::properties(CONTROL_TYPE, &format!("{}:{}", m.worker_id, now_ms()));
            if let Err(e) = amqp::publish_confirmed(ch, &exchange, &m.worker_id, &body, props).await {
                sched.registry.put_back(msgs[i..].to_vec());
                anyhow::bail!("cannot send a control message: {e}");
            }
            tracing::info!(worker = m.worker_id, command = ?m.command, "told a worker");
        }
        sched.registry.command_wake.notified().await;
    }
}

/// Publishes due outbox rows, up to `window` ahead of their confirms, and marks sent exactly
/// those the broker confirmed.
async fn relay(
    sched: &Arc<Scheduler>,
    cfg: &BrokerConfig,
    names: &Names,
    ch: &Channel,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let exchange = names.jobs_exchange();
    loop {
        let now = now_ms();
        let pending = match sched.store.pending(now, cfg.window).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "relay: cannot read the outbox; trying again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if pending.rows.is_empty() {
            let sleep = pending
                .next_due_ms
                .map_or(Duration::from_secs(3600), |t| Duration::from_millis((t - now).max(1) as u64));
            tokio::select! {
                () = sched.dispatch_wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
                () = stop.cancelled() => return Ok(()),
            }
            continue;
        }
        let mut confirms = Vec::with_capacity(pending.rows.len());
        let mut done = Vec::with_capacity(pending.rows.len());
        for o in &pending.rows {
            if !o.live {
                done.push(o.id);
                continue;
            }
            let msg = job_message(&o.dispatch);
            let body = serde_json::to_vec(&msg)?;
            let props =
                amqp::properties(JOB_TYPE, &format!("{}:{}", msg.job_id, msg.attempt)).with_priority(msg.priority());
            let confirm = ch
                .basic_publish(
                    exchange.clone().into(),
                    msg.request.tier.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await?;
            confirms.push((o.id, confirm));
        }
        let mut refused = 0;
        for (id, confirm) in confirms {
            match confirm.await {
                Ok(c) if c.is_ack() => done.push(id),
                Ok(_) => refused += 1,
                Err(e) => {
                    // The channel is gone: mark what was confirmed, then reconnect.
                    mark_sent(sched, done).await;
                    return Err(e.into());
                }
            }
        }
        if refused > 0 {
            tracing::warn!(refused, "relay: the broker refused messages; they go again");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        mark_sent(sched, done).await;
    }
}

async fn mark_sent(sched: &Scheduler, ids: Vec<i64>) {
    if ids.is_empty() {
        return;
    }
    sched.metrics.relayed.inc_by(ids.len() as u64);
    match sched.store.mark_sent(ids, now_ms()).await {
        Ok(events) => sched.publish(events),
        // Not lost: the rows stay unsent and are published again; a repeat is harmless.
        Err(e) => tracing::error!(error = %e, "relay: cannot mark rows sent; they will be published again"),
    }
}

/// The message a worker gets for a dispatch.
pub fn job_message(d: &Dispatch) -> JobMessage {
    JobMessage {
        v: wire::SCHEMA_VERSION,
        job_id: d.job_id.clone(),
        attempt: d.attempt,
        client: d.client.clone(),
        cache_key: d.cache_key.clone(),
        created_ms: d.created_ms,
        request: d.request.clone(),
    }
}

fn dispatch_of(m: &JobMessage) -> Dispatch {
    Dispatch {
        job_id: m.job_id.clone(),
        tier: m.request.tier,
        client: m.client.clone(),
        attempt: m.attempt,
        request: m.request.clone(),
        cache_key: m.cache_key.clone(),
        created_ms: m.created_ms,
    }
}

/// Records workers' results. The deliveries at hand, up to a store batch of results, are
/// recorded concurrently (one transaction for the lot, by the store's group commit), then acked.
async fn consume_results(sched: &Arc<Scheduler>, names: &Names, ch: &Channel, dead: &Channel) -> anyhow::Result<()> {
    let mut consumer = ch
        .basic_consume(
            names.results_queue().into(),
            "kiln-scheduler-results".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let Some(first) = consumer.next().await else { anyhow::bail!("the results consumer was closed") };
        let first = first?;
        let mut batch = vec![(read_results(&first), first)];
        // Counted in results, not messages: one message may carry a worker's whole batch.
        let mut results = batch[0].0.as_ref().map_or(1, Vec::len);
        while results < MAX_BATCH {
            match futures_util::FutureExt::now_or_never(consumer.next()) {
                Some(Some(d)) => {
                    let d = d?;
                    let read = read_results(&d);
                    results += read.as_ref().map_or(1, Vec::len);
                    batch.push((read, d));
                }
                _ => break,
            }
        }
        let recorded = futures_util::future::join_all(
            batch.iter().map(|(read, d)| record_delivery(sched, names, dead, d, read.as_deref())),
        )
        .await;
        if recorded.iter().all(|ok| *ok) {
            // The channel is this consumer's alone and a batch is every delivery not yet answered,
            // in order: one ack of the last with `multiple` answers the lot.
            if let Some((_, last)) = batch.last() {
                last.ack(BasicAckOptions { multiple: true }).await?;
            }
            continue;
        }
        // The store is down: what failed goes back to the queue and comes again, after a pause so
        // a store that is down is not asked hundreds of times a second.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for ((_, d), ok) in batch.iter().zip(recorded) {
            if ok {
                d.ack(BasicAckOptions::default()).await?;
            } else {
                d.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await?;
            }
        }
    }
}

/// The results a delivery carries: one result, or a worker's batch of them.
fn read_results(d: &lapin::message::Delivery) -> Result<Vec<ResultMessage>, MessageError> {
    if d.properties.kind().as_ref().is_some_and(|k| k.as_str() == RESULTS_TYPE) {
        amqp::decode::<ResultBatch>(d, RESULTS_TYPE).map(|b| b.results)
    } else {
        amqp::decode::<ResultMessage>(d, RESULT_TYPE).map(|m| vec![m])
    }
}

/// Records a delivery's results; `false` when it must come again (the store failed). A message
/// that did not decode is dead-lettered with the reason.
async fn record_delivery(
    sched: &Scheduler,
    names: &Names,
    dead: &Channel,
    d: &lapin::message::Delivery,
    read: Result<&[ResultMessage], &MessageError>,
) -> bool {
    let results = match read {
        Ok(r) => r,
        Err(e) => {
            sched.metrics.bad_messages.with_label_values(&["result"]).inc();
            let reason = e.to_string();
            tracing::warn!(reason, "dead-lettering a bad result message");
            return match amqp::dead_letter(dead, names, &d.data, &d.properties, &reason).await {
                Ok(()) => true,
                Err(PublishError::Broker(e)) => {
                    tracing::error!(error = %e, "cannot dead-letter a bad result");
                    false
                }
                Err(PublishError::Nacked) => false,
            };
        }
    };
    // Recording is idempotent by job and attempt: when some fail, the whole message comes again.
    let recorded = futures_util::future::join_all(results.iter().map(|m| sched.record_result(dispatch_of(&m.job), m)));
    recorded.await.into_iter().all(|ok| ok)
}

async fn consume_heartbeats(sched: &Arc<Scheduler>, names: &Names, ch: &Channel) -> anyhow::Result<()> {
    let opts = BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() };
    let mut consumer = ch
        .basic_consume(names.heartbeats_queue().into(), "kiln-scheduler-heartbeats".into(), opts, FieldTable::default())
        .await?;
    let mut sweep = tokio::time::interval(Duration::from_secs(sched.cfg.broker.lost_after_seconds.clamp(1, 10)));
    loop {
        let d = tokio::select! {
            d = consumer.next() => d,
            _ = sweep.tick() => {
                sched.registry.sweep(now_ms());
                continue;
            }
        };
        let Some(d) = d else { anyhow::bail!("the heartbeat consumer was closed") };
        let d = d?;
        match amqp::decode::<Heartbeat>(&d, HEARTBEAT_TYPE) {
            Ok(hb) => sched.registry.heard(hb, now_ms()),
            Err(e) => {
                sched.metrics.bad_messages.with_label_values(&["heartbeat"]).inc();
                tracing::warn!(error = %e, "ignoring a bad heartbeat");
            }
        }
    }
}

impl Scheduler {
    /// Checks what of an asset came inside its result instead of being uploaded: the PNG (against
    /// its hash and `limits.max_asset_bytes`), which is kept with the asset's row. Returns the
    /// provenance to record with the asset: the one the result carries, or for a PNG that came
    /// without one, what the result says of it; or why the attempt fails.
    fn check_inline(
        &self,
        msg: &ResultMessage,
        asset: &str,
        png: Option<&[u8]>,
        provenance: Option<&serde_json::Value>,
    ) -> Result<Option<String>, String> {
        let refused = |why: String| Err(format!("worker {} sent asset {asset} with its result, but {why}", msg.worker));
        if let Some(p) = provenance
            && p.get("asset").and_then(serde_json::Value::as_str) != Some(asset)
        {
            return refused("its provenance names another asset".into());
        }
        let record = match (png, provenance) {
            (_, Some(p)) => serde_json::to_string(p).ok(),
            (Some(_), None) => Some(
                serde_json::json!({
                    "asset": asset,
                    "request": msg.job.request,
                    "cache_key": msg.job.cache_key,
                    "worker": msg.worker,
                    "backend": msg.backend,
                    "started_ms": msg.started_ms,
                    "finished_ms": msg.finished_ms,
                })
                .to_string(),
            ),
            (None, None) => None,
        };
        let Some(png) = png else { return Ok(record) };
        let limit = self.cfg.limits.max_asset_bytes;
        if png.len() > limit {
            return refused(format!("its {} bytes are over limits.max_asset_bytes ({limit})", png.len()));
        }
        if blake3::hash(png).to_hex().as_str() != asset {
            return refused("its bytes do not hash to it (BLAKE3)".into());
        }
        // It is served as its own thumbnail too.
        match kiln_worker::store::png_dimensions(png) {
            Some((w, h)) if own_thumbnail(w, h) => Ok(record),
            Some((w, h)) => refused(format!(
                "it is {w}×{h}: only an image that is its own thumbnail (at most {THUMB_SIDE} px a side) comes inline"
            )),
            None => refused("it is not a PNG".into()),
        }
    }

    /// Records a failed attempt and applies the rules: the job is quarantined (the returned
    /// outcome) once it has failed on `quarantine_after_workers` distinct workers; the worker is
    /// drained once it has failed `drain_after_jobs` distinct jobs within the window.
    async fn weigh_failure(
        &self,
        d: &Dispatch,
        msg: &ResultMessage,
        error: &str,
    ) -> Result<Option<Outcome>, crate::store::StoreError> {
        let b = &self.cfg.broker;
        let failure = AttemptFailure {
            job_id: d.job_id.clone(),
            attempt: d.attempt,
            worker: msg.worker.clone(),
            error: error.to_owned(),
            at_ms: msg.finished_ms,
        };
        let since = now_ms() - (b.drain_window_seconds * 1000) as i64;
        let tally = self.store.record_failure(failure, since).await?;
        if tally.worker_jobs >= b.drain_after_jobs {
            let reason = format!(
                "failed {} distinct jobs within {} s (last: job {}: {error})",
                tally.worker_jobs, b.drain_window_seconds, d.job_id
            );
            if self.store.set_drained(&msg.worker, Some(&reason), now_ms()).await? {
                tracing::warn!(worker = msg.worker, reason, "draining a worker");
                self.metrics.workers_drained.inc();
                self.registry.drain(DrainedWorker { worker_id: msg.worker.clone(), reason, at_ms: now_ms() });
            }
        }
        if tally.job_workers.len() >= b.quarantine_after_workers as usize {
            let error = format!(
                "quarantined: failed on {} distinct workers ({}); last: {error}",
                tally.job_workers.len(),
                tally.job_workers.join(", ")
            );
            tracing::error!(job_id = d.job_id, error, "quarantining a job");
            self.metrics.jobs_quarantined.inc();
            return Ok(Some(Outcome::Quarantined { error }));
        }
        Ok(None)
    }

    /// Records a worker's result for `d`: the job moves to `running` (if the worker's start was
    /// not seen yet) and then to its outcome. `false` when the store failed (try again later).
    pub(crate) async fn record_result(&self, d: Dispatch, msg: &ResultMessage) -> bool {
        let mut outcome = match &msg.outcome {
            AttemptOutcome::Succeeded { asset, bytes, png, provenance } => {
                let succeeded = |provenance, png: Option<&Vec<u8>>| Outcome::Succeeded {
                    asset: asset.clone(),
                    bytes: png.map_or(*bytes, |p| p.len() as u64),
                    provenance,
                    png: png.cloned(),
                };
                match self.check_inline(msg, asset, png.as_deref(), provenance.as_ref()) {
                    Err(error) => self.failure_outcome(&d, error, true),
                    Ok(provenance) if png.is_some() => succeeded(provenance, png.as_ref()),
                    // Uploaded (or stored before) instead.
                    Ok(provenance) => match self.has_asset(asset).await {
                        Ok(true) => succeeded(provenance, None),
                        Ok(false) => {
                            let error =
                                format!("worker {} reported asset {asset}, which never arrived here", msg.worker);
                            self.failure_outcome(&d, error, true)
                        }
                        Err(e) => {
                            tracing::error!(job_id = d.job_id, asset, error = %e, "cannot look up a reported asset");
                            return false;
                        }
                    },
                }
            }
            AttemptOutcome::Failed { error, transient } => {
                self.failure_outcome(&d, format!("on worker {}: {error}", msg.worker), *transient)
            }
        };
        if let Outcome::Retry { error, .. } | Outcome::Failed { error } = &outcome {
            match self.weigh_failure(&d, msg, error).await {
                Ok(Some(quarantined)) => outcome = quarantined,
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(job_id = d.job_id, error = %e, "cannot record a failed attempt");
                    return false;
                }
            }
        }
        let retry = matches!(outcome, Outcome::Retry { .. });
        let label = outcome.label();
        match self.store.record(&d, msg.started_ms, outcome, now_ms()).await {
            Ok(events) => {
                // Nothing written: a repeat of a result already recorded (or a stale attempt).
                if !events.is_empty() {
                    self.count_attempt(&d, label);
                }
                self.publish(events);
                if retry {
                    self.dispatch_wake.notify_one();
                }
                true
            }
            Err(e) => {
                tracing::error!(job_id = d.job_id, error = %e, "cannot record a result");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(id: &str, every_ms: Option<u64>) -> Heartbeat {
        Heartbeat {
            v: wire::SCHEMA_VERSION,
            worker_id: id.into(),
            host: "h".into(),
            backend: "cpu".into(),
            adapter: "cpu".into(),
            memory_bytes: None,
            models: vec![],
            tiers: vec![],
            in_flight: 0,
            concurrency: 1,
            draining: false,
            drained: None,
            at_ms: 0,
            every_ms,
        }
    }

    #[test]
    fn a_worker_is_lost_after_the_lost_period_or_three_of_its_beats_whichever_is_longer() {
        let r = Registry::new(Duration::from_secs(5));
        // Beats as often as the lost period, every second, and an older worker that does not say.
        for (id, every) in [("slow", Some(5_000)), ("quick", Some(1_000)), ("old", None)] {
            r.heard(beat(id, every), 0);
        }
        let states = |now| r.list(now).into_iter().map(|e| (e.heartbeat.worker_id, e.state)).collect::<Vec<_>>();
        assert_eq!(states(5_000), [("old".into(), "active"), ("quick".into(), "active"), ("slow".into(), "active")]);
        // One late beat: the slow worker is still active.
        assert_eq!(states(5_050), [("old".into(), "lost"), ("quick".into(), "lost"), ("slow".into(), "active")]);
        assert_eq!(r.sweep(5_050), ["old", "quick"], "each lost worker is reported once");
        assert_eq!(r.sweep(14_000), Vec::<String>::new());
        assert_eq!(states(15_001)[2], ("slow".into(), "lost"));
        assert_eq!(r.counts(15_001).get("lost"), Some(&3));
    }
}
