//! `kiln-worker run`: the worker daemon of the distributed farm. This module holds its session
//! and consume loop; beside it are its settings ([`config`]), its conversation with the scheduler
//! ([`control`]: heartbeats, drain and resume), its health endpoint ([`health`]), the asset
//! hand-over ([`upload`]) and the result publisher ([`publish`]).
//!
//! It consumes the tier queues its config names (a channel per tier, each with its own
//! prefetch), renders with the engine at most `concurrency` jobs at once, hands each new asset to
//! the scheduler unless the asset store is shared (a small one inside its result message, held in
//! memory and never stored here; a larger one by `PUT /v1/assets/{hash}` with a worker token),
//! publishes the result with a publisher confirm, and only then acks the delivery (through the
//! session's [`Settler`], which folds a run of them into one frame). A crash anywhere before the
//! ack hands the job back to the broker, which delivers it again; the scheduler records only the
//! first result of an attempt, so a repeat is harmless. A message delivered again is counted
//! ([`Daemon::put_back`]): past `delivery_limit` unsettled deliveries it is dead-lettered rather
//! than rendered, so a render that kills its worker cannot loop for ever.
//!
//! A message that does not decode, has an unknown schema version or asks for a render outside
//! this worker's tier limits is dead-lettered with the reason and counted; the worker carries on.
//! When the broker goes away the worker reconnects with backoff. `SIGTERM` drains: it stops
//! consuming, finishes what it has in hand within `grace_seconds`, and hands the rest back.

mod config;
mod control;
mod health;
mod publish;
mod upload;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use kiln_common::amqp;
use kiln_common::client::{Client, Secret};
use kiln_common::host_name;
use kiln_protocol::wire::{self, AttemptOutcome, JOB_TYPE, JobMessage, MessageKey, Names, ResultMessage};
use kiln_protocol::{RenderRequest, now_ms};
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::attempt::{Failure, attempt};
use crate::settle::{Settle, Settler, Tag};
use crate::worker::Worker;
pub use config::RunConfig;
use publish::{Results, result_id};
use upload::{Inline, UploadError};

/// The running daemon's shared state.
struct Daemon {
    worker: Arc<Worker>,
    cfg: RunConfig,
    names: Names,
    id: String,
    host: String,
    upload: Option<Client>,
    /// What its results and heartbeats are signed with (from its worker token).
    key: MessageKey,
    in_flight: AtomicU32,
    draining: AtomicBool,
    /// Whether a broker session is up.
    connected: AtomicBool,
    /// Why the scheduler drained this worker, while it is drained.
    drained: std::sync::Mutex<Option<String>>,
    /// Whether the broker refused this worker's user a declare: from then on the topology is
    /// checked, not declared (see [`Daemon::topology`]).
    may_not_declare: AtomicBool,
}

/// How a stretch of consuming ended.
enum Ended {
    /// `stop` fired; the work in hand is done or handed back.
    Stopped,
    /// The scheduler drained this worker; the work in hand is done or handed back.
    Drained,
}

/// Runs the daemon until `stop` fires, then drains.
pub async fn run(worker: Arc<Worker>, cfg: RunConfig, stop: CancellationToken) -> anyhow::Result<()> {
    let Some(token) = cfg.token.clone() else { anyhow::bail!("run.token: {}", config::TOKEN_NEEDED) };
    let key = MessageKey::from_token(&token);
    let upload = (!cfg.shared_assets).then(|| Client::new(&cfg.scheduler_url, Some(Secret::new(token))));
    let d = Arc::new(Daemon {
        key,
        names: Names::new(&cfg.amqp_prefix),
        id: cfg.id(),
        host: host_name(),
        worker,
        upload,
        cfg,
        in_flight: AtomicU32::new(0),
        draining: AtomicBool::new(false),
        connected: AtomicBool::new(false),
        drained: std::sync::Mutex::new(None),
        may_not_declare: AtomicBool::new(false),
    });
    if let Some(addr) = d.cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("run.metrics_listen: cannot listen on {addr}: {e}"))?;
        tracing::info!(%addr, "serving /metrics and /healthz");
        tokio::spawn(d.clone().serve_http(listener, stop.clone()));
    }
    tracing::info!(worker_id = d.id, tiers = ?d.cfg.tiers, concurrency = d.cfg.concurrency, "worker daemon starting");
    loop {
        let Some(conn) = amqp::connect_with_backoff(d.cfg.amqp_url.expose(), &d.id, stop.cancelled()).await else {
            return Ok(());
        };
        match d.clone().session(&conn, &stop).await {
            Ok(()) => {
                let _ = conn.close(200, "drained".into()).await;
                tracing::info!(worker_id = d.id, "worker daemon stopped");
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(error = %e, "lost the broker; reconnecting (deliveries in hand go back to the queue)");
                let _ = conn.close(320, "reconnecting".into()).await;
            }
        }
    }
}
impl Daemon {
    fn drained_reason(&self) -> Option<String> {
        self.drained.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_drained(&self, reason: Option<String>) {
        *self.drained.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }

    /// A confirm channel, once the broker topology is there: declared, or, where this worker's
    /// broker user may not configure it (`kiln worker add`), checked without declaring (a passive
    /// declare needs no permission). A refused declare closes its channel and lapin logs that
    /// once; after it the worker only checks.
    async fn topology(&self, conn: &Connection, stop: &CancellationToken) -> anyhow::Result<Channel> {
        let publ = amqp::confirm_channel(conn).await?;
        if !self.may_not_declare.load(Ordering::Relaxed) {
            match amqp::declare_topology(&publ, &self.names).await {
                Ok(()) => return Ok(publ),
                Err(e) => {
                    tracing::info!(refused = %e, "this worker's broker user may not declare the topology; checking the scheduler's")
                }
            }
            self.may_not_declare.store(true, Ordering::Relaxed);
        }
        let publ = if publ.status().connected() { publ } else { amqp::confirm_channel(conn).await? };
        if let Err(e) = amqp::check_topology(&publ, &self.names).await {
            // Back to declaring next time: the user may have been given the permission.
            self.may_not_declare.store(false, Ordering::Relaxed);
            tracing::warn!(missing = %e, "the broker topology is not there and this worker may not declare it: start the scheduler first (it declares it)");
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            }
            return Err(e.into());
        }
        Ok(publ)
    }

    /// One connection's life: `Ok` when stopped and drained, `Err` when the broker went away.
    async fn session(self: Arc<Self>, conn: &Connection, stop: &CancellationToken) -> anyhow::Result<()> {
        let publ = self.topology(conn, stop).await?;
        let mut control = self.control_consumer(conn).await?;
        self.connected.store(true, Ordering::Relaxed);
        let session = stop.child_token();
        let beat = tokio::spawn(self.clone().heartbeats(publ.clone(), session.clone()));
        let result = loop {
            if self.drained_reason().is_some() {
                // Drained: take no work; wait to be resumed (or stopped).
                tokio::select! {
                    () = stop.cancelled() => break Ok(()),
                    m = control.next() => match self.control(m) {
                        Ok(()) => continue,
                        Err(e) => break Err(e),
                    },
                }
            }
            match self.clone().consume(conn, &publ, &mut control, stop).await {
                Ok(Ended::Stopped) => break Ok(()),
                Ok(Ended::Drained) => {
                    tracing::warn!(
                        reason = self.drained_reason(),
                        "drained by the scheduler; taking no work until resumed"
                    );
                    self.send_heartbeat(&publ).await;
                }
                Err(e) => break Err(e),
            }
        };
        self.connected.store(false, Ordering::Relaxed);
        if result.is_ok() {
            self.send_heartbeat(&publ).await;
        }
        session.cancel();
        let _ = beat.await;
        amqp::close_channels(&[&publ], "stopped").await;
        result
    }

    /// Consumes the tier queues until stopped, drained or the broker goes away. Stopped or
    /// drained, it stops taking work, finishes what is in hand within the grace period and hands
    /// back what the broker sent ahead.
    async fn consume(
        self: Arc<Self>,
        conn: &Connection,
        publ: &Channel,
        control: &mut Consumer,
        stop: &CancellationToken,
    ) -> anyhow::Result<Ended> {
        let mut consumers = Vec::new();
        let mut channels = Vec::new();
        for tier in &self.cfg.tiers {
            let ch = conn.create_channel().await?;
            ch.basic_qos(self.cfg.prefetch, BasicQosOptions::default()).await?;
            let tag = format!("{}-{tier}", self.id);
            let c = ch
                .basic_consume(
                    self.names.tier_queue(*tier).into(),
                    tag.clone().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            consumers.push(c);
            channels.push((ch, tag));
        }
        tracing::info!(worker_id = self.id, "consuming");
        let mut deliveries = futures_util::stream::select_all(
            consumers.into_iter().enumerate().map(|(ch, c)| c.map(move |d| d.map(|d| (ch, d)))),
        );
        let (settler, settling) = Settler::start(channels.len(), self.worker.metrics.clone());
        let (results, publisher) = Results::start(
            publ.clone(),
            self.names.results_queue(),
            self.key.clone(),
            settler.clone(),
            self.worker.metrics.clone(),
        );
        let slots = Arc::new(Semaphore::new(self.cfg.concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        let ended = loop {
            let permit = tokio::select! {
                () = stop.cancelled() => break Ok(Ended::Stopped),
                m = control.next() => match self.stop_consuming(m) {
                    Some(r) => break r,
                    None => continue,
                },
                p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            let delivery = tokio::select! {
                () = stop.cancelled() => break Ok(Ended::Stopped),
                m = control.next() => match self.stop_consuming(m) {
                    Some(r) => break r,
                    None => continue,
                },
                d = deliveries.next() => d,
            };
            match delivery {
                Some(Ok((ch, delivery))) => {
                    let me = self.clone();
                    let (publ, results, settler) = (publ.clone(), results.clone(), settler.clone());
                    settler.taken(Tag { ch, tag: delivery.delivery_tag });
                    tasks.spawn(async move {
                        me.handle(&publ, &results, &settler, ch, delivery).await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => break Err(anyhow::Error::from(e)),
                None => break Err(anyhow::anyhow!("the broker closed the consumers")),
            }
            while tasks.try_join_next().is_some() {}
        };
        let ended = match ended {
            Ok(e) => e,
            Err(e) => {
                tasks.abort_all();
                publisher.abort();
                settling.abort();
                return Err(e);
            }
        };
        // Stop taking work, finish what is in hand, hand back what the broker sent ahead.
        if matches!(ended, Ended::Stopped) {
            self.draining.store(true, Ordering::Relaxed);
        }
        for (ch, tag) in &channels {
            let _ = ch.basic_cancel(tag.clone().into(), BasicCancelOptions::default()).await;
        }
        let grace = Duration::from_secs(self.cfg.grace_seconds);
        tracing::info!(in_hand = tasks.len(), grace_seconds = grace.as_secs(), "draining");
        let finished = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if finished.is_err() {
            tracing::warn!(left = tasks.len(), "grace period over; handing the renders still in hand back");
            tasks.abort_all();
        }
        // Every render's result is published (or handed back): the publisher ends with its last
        // sender, then the settler, once it has sent every ack and nack it was given.
        drop(results);
        let _ = publisher.await;
        drop(settler);
        let _ = settling.await;
        for (ch, _) in channels {
            // Everything still unacked on the channel (sent ahead, or cut off by the grace
            // period) goes back to the queue now, before the channel closes.
            let back = BasicNackOptions { multiple: true, requeue: true };
            let _ = ch.basic_nack(0, back).await;
            amqp::close_channels(&[&ch], "draining").await;
        }
        Ok(ended)
    }

    /// Checks a job message: it decodes, and its request is one this worker's tier limits allow.
    fn check(&self, delivery: &lapin::message::Delivery) -> Result<JobMessage, String> {
        let msg: JobMessage = amqp::decode(delivery, JOB_TYPE).map_err(|e| e.to_string())?;
        let r = &msg.request;
        RenderRequest::resolve(
            &r.model,
            &r.prompt,
            r.seed,
            r.tier,
            Some(r.width),
            Some(r.height),
            Some(r.samples),
            self.worker.tier_limits(),
        )
        .map_err(|e| format!("request outside this worker's limits: {e}"))?;
        Ok(msg)
    }

    /// A job message the broker delivered before and got back unsettled: a worker died or lost
    /// the broker with it in hand, or handed it back. Classic queues count no deliveries, so the
    /// count travels in the message: a copy goes back to the `tier` queue (same priority) with
    /// the count one higher, to be rendered by whoever takes it; past `run.delivery_limit`
    /// deliveries it is dead-lettered instead, signed, and the scheduler fails its job with the
    /// reason. Either way the caller acks this delivery once it returns `Ok`. A render that kills
    /// every worker that takes it thus kills at most `delivery_limit` of them.
    async fn put_back(
        &self,
        publ: &Channel,
        tier: kiln_protocol::Tier,
        delivery: &lapin::message::Delivery,
    ) -> Result<(), amqp::PublishError> {
        let unsettled = amqp::unsettled_deliveries(delivery);
        let limit = self.cfg.delivery_limit;
        if unsettled >= limit {
            let reason = format!(
                "delivered {unsettled} times without being settled (run.delivery_limit = {limit}): its render may kill the worker that takes it, or its workers keep losing the broker"
            );
            tracing::warn!(reason, routing_key = %delivery.routing_key, "dead-lettering a job message past its delivery limit");
            amqp::dead_letter(publ, &self.names, &delivery.data, &delivery.properties, &reason, Some(&self.key))
                .await?;
            self.worker.metrics.redeliveries.with_label_values(&["dead_lettered"]).inc();
        } else {
            tracing::info!(unsettled, limit, routing_key = %delivery.routing_key, "a job message came back unsettled; putting it back counted");
            let props = amqp::with_deliveries(&delivery.properties, unsettled);
            amqp::publish_confirmed(publ, "", &self.names.tier_queue(tier), &delivery.data, props).await?;
            self.worker.metrics.redeliveries.with_label_values(&["put_back"]).inc();
        }
        Ok(())
    }

    /// One delivery: checked, rendered, its asset handed over, its result published (and then
    /// acked), or dead-lettered with the reason.
    #[tracing::instrument(level = "debug", skip_all, fields(job_id = tracing::field::Empty, attempt = tracing::field::Empty))]
    async fn handle(
        &self,
        publ: &Channel,
        results: &Results,
        settler: &Settler,
        ch: usize,
        delivery: lapin::message::Delivery,
    ) {
        let settle = || Settle { at: Tag { ch, tag: delivery.delivery_tag }, acker: delivery.acker.clone() };
        if delivery.redelivered {
            let done = self.put_back(publ, self.cfg.tiers[ch], &delivery).await;
            // Not lost either way: handed back, it is counted again by whoever takes it.
            ack_or_hand_back(settler, settle(), done, "put a redelivered job message back");
            return;
        }
        let msg = match self.check(&delivery) {
            Ok(m) => m,
            Err(reason) => {
                self.worker.metrics.bad_messages.inc();
                tracing::warn!(reason, routing_key = %delivery.routing_key, "dead-lettering a bad job message");
                let dl = amqp::dead_letter(
                    publ,
                    &self.names,
                    &delivery.data,
                    &delivery.properties,
                    &reason,
                    Some(&self.key),
                )
                .await;
                // Not lost: back to the queue until the dead-letter exchange takes it.
                ack_or_hand_back(settler, settle(), dl, "dead-letter");
                return;
            }
        };
        let span = tracing::Span::current();
        span.record("job_id", msg.job_id.as_str());
        span.record("attempt", msg.attempt);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let started_ms = now_ms();
        let inline_max = self.upload.as_ref().map(|_| self.cfg.inline_asset_bytes);
        let req = msg.request.clone();
        let take = move |w: &Worker, mut r: crate::worker::Rendered| {
            let inline = inline_max.map(|max| Inline::take(w.store(), &req, &mut r, max)).unwrap_or_default();
            (r, inline)
        };
        let result = attempt(&self.worker, msg.request.clone(), inline_max.unwrap_or(0), |_| {}, take).await;
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let outcome = match result {
            Ok((r, inline)) => {
                match self.upload(&r.asset, &inline, &msg.job_id, msg.attempt).await {
                    Ok(()) => AttemptOutcome::Succeeded {
                        asset: r.asset,
                        bytes: r.bytes,
                        png: inline.png,
                        provenance: inline.provenance,
                    },
                    // The scheduler said no (too large, a bad token): this attempt fails, and the
                    // scheduler's retry, quarantine and drain rules decide what comes next (a
                    // misconfigured worker gets drained; the job goes to another).
                    Err(UploadError::Refused(error)) => AttemptOutcome::Failed { error, transient: true },
                    Err(UploadError::Failed(e)) => {
                        tracing::error!(job_id = msg.job_id, error = %e, "cannot upload the asset; handing the job back");
                        settler.nack(settle());
                        return;
                    }
                }
            }
            Err(Failure { error, transient }) => AttemptOutcome::Failed { error, transient },
        };
        let result = ResultMessage {
            v: wire::SCHEMA_VERSION,
            backend: format!(
                "{} ({})",
                self.worker.engine().backend.name(),
                self.worker.engine().backend.device_name()
            ),
            worker: self.id.clone(),
            started_ms,
            finished_ms: now_ms(),
            outcome,
            job: msg,
        };
        let id = result_id(&result);
        // Once the result is confirmed, the publisher has the delivery acked.
        if let Err(e) = results.publish(result, settle()).await {
            // Unacked: the broker hands the job out again and the result is made again.
            tracing::error!(job = id, error = %e, "cannot publish the result; the job goes back to the queue");
            settler.nack(settle());
        }
    }
}

/// Acks a delivery once what was published in its place is confirmed (`done`); else hands it
/// back to the queue, saying what could not be done.
fn ack_or_hand_back(settler: &Settler, settle: Settle, done: Result<(), amqp::PublishError>, what: &str) {
    match done {
        Ok(()) => settler.ack(vec![settle]),
        Err(e) => {
            tracing::error!(error = %e, "cannot {what}; handing the message back");
            settler.nack(settle);
        }
    }
}
