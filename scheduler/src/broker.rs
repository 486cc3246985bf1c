//! RabbitMQ I/O for the distributed farm: the transport the outbox loop publishes through
//! ([`Relay`]: publish with confirms, mark sent only after the confirm), the results consumer
//! (each worker's result settled, then acked), the heartbeat listener that feeds the registry,
//! and the control messages to workers. Reconnects with backoff when the broker goes away; rows
//! not yet confirmed stay unsent and are published again, and a result is acked only once it is
//! durable in the store, so nothing is lost and a repeat changes nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kiln_common::amqp::{self, PublishError};
use kiln_protocol::JobState;
use kiln_protocol::now_ms;
use kiln_protocol::wire::{
    self, CONTROL_TYPE, HEARTBEAT_TYPE, Heartbeat, JOB_TYPE, JobMessage, MessageError, Names, REASON_HEADER,
    RESULT_TYPE, RESULTS_TYPE, ResultBatch, ResultMessage,
};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use tokio_util::sync::CancellationToken;

use crate::config::BrokerConfig;
use crate::dispatch::{Dispatch, DispatchError, Marker, run_outbox};
use crate::results::{Refusal, Settled, open_attempt};
use crate::scheduler::Scheduler;
use crate::store::writer::MAX_BATCH;
use crate::store::{BoxFut, Dispatch as Attempt, Job, ListQuery, Outgoing};

/// Runs the relay, the results consumer and the heartbeat listener until `stop`, reconnecting
/// whenever the broker goes away.
pub async fn run(sched: Arc<Scheduler>, cfg: BrokerConfig, stop: CancellationToken) {
    let Some(url) = cfg.amqp_url.clone() else { return };
    let names = Names::new(&cfg.prefix);
    loop {
        let Some(conn) = amqp::connect_with_backoff(url.expose(), "kiln-scheduler", stop.cancelled()).await else {
            return;
        };
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
    let watch = conn.create_channel().await?;
    watch.basic_qos(64, BasicQosOptions::default()).await?;
    let control = amqp::confirm_channel(conn).await?;
    let depth = conn.create_channel().await?;
    sched.registry.set_drained(sched.store.drained().await?);
    let relay = Relay { ch: &publ, names, window: cfg.window, sched };
    let result = tokio::select! {
        r = run_outbox(sched, &relay, &stop) => r.map_err(anyhow::Error::from),
        r = consume_results(sched, names, &results, &dead) => r,
        r = consume_heartbeats(sched, names, &beats) => r,
        r = watch_dead_letters(sched, names, &watch) => r,
        r = send_commands(sched, names, &control) => r,
        r = redispatch_lost(sched, names, &depth) => r,
        () = stop.cancelled() => Ok(()),
    };
    amqp::close_channels(&[&publ, &results, &beats, &dead, &watch, &control, &depth], "bye").await;
    result
}

/// Jobs dispatched `redispatch_after_seconds` ago and still not started while their tier's queue
/// holds no ready message: their message is gone (purged, or lost by a broker that kept no copy),
/// not waiting behind others. Each goes through the retry policy: sent again as its next attempt,
/// or failed with the reason once its attempts are spent; the jobs waiting on it follow.
async fn redispatch_lost(sched: &Scheduler, names: &Names, ch: &Channel) -> anyhow::Result<()> {
    let after = sched.cfg.broker.redispatch_after_seconds;
    if after == 0 {
        return std::future::pending().await;
    }
    let after_ms = i64::try_from(after.saturating_mul(1000)).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(Duration::from_secs((after / 4).clamp(1, 60)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let cutoff = now_ms().saturating_sub(after_ms);
        // Dispatched before the cutoff means created before it too.
        let q =
            ListQuery { state: Some(JobState::Dispatched), until_ms: Some(cutoff), limit: 500, ..Default::default() };
        let page = match sched.store.list(q).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for jobs whose message was lost");
                continue;
            }
        };
        let stuck: Vec<Job> = page.jobs.into_iter().filter(|j| j.follows.is_none() && j.updated_ms < cutoff).collect();
        let mut empty = HashMap::new();
        for job in stuck {
            let drained = match empty.get(&job.tier) {
                Some(e) => *e,
                None => {
                    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
                    let q = ch.queue_declare(names.tier_queue(job.tier).into(), passive, FieldTable::default()).await?;
                    *empty.entry(job.tier).or_insert(q.message_count() == 0)
                }
            };
            if !drained {
                continue; // its message may be waiting its turn
            }
            let d = Attempt {
                job_id: job.id.clone(),
                tier: job.tier,
                client: job.client.clone(),
                attempt: job.attempt + 1,
                request: job.request.clone(),
                cache_key: job.cache_key.clone(),
                created_ms: job.created_ms,
            };
            let reason = format!(
                "its message was not taken by any worker within {after} s while its queue held nothing \
                 (scheduler.broker.redispatch_after_seconds): purged, or lost by the broker"
            );
            tracing::warn!(job_id = job.id, attempt = d.attempt, "a dispatched job's message is gone; retrying it");
            if sched.settle_undelivered(&d, reason, true).await != Settled::Again {
                sched.metrics.undelivered.with_label_values(&["lost"]).inc();
            }
        }
    }
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

/// RabbitMQ as the outbox's transport: due rows are published, up to `window` ahead of their
/// confirms, to the jobs exchange by tier, and exactly those the broker confirmed are marked sent.
struct Relay<'a> {
    ch: &'a Channel,
    names: &'a Names,
    window: u32,
    sched: &'a Scheduler,
}

impl Dispatch for Relay<'_> {
    fn window(&self) -> u32 {
        self.window
    }

    fn send<'a>(&'a self, rows: Vec<Outgoing>, marker: &'a Marker<'a>) -> BoxFut<'a, Result<usize, DispatchError>> {
        Box::pin(async move {
            let transport = |e: lapin::Error| DispatchError::Transport(Box::new(e));
            let exchange = self.names.jobs_exchange();
            let mut confirms = Vec::with_capacity(rows.len());
            let mut done = Vec::with_capacity(rows.len());
            for o in &rows {
                if !o.live {
                    done.push(o.id);
                    continue;
                }
                let msg = job_message(&o.dispatch);
                // Serializing this plain struct cannot fail; an empty body would be dead-lettered.
                let body = serde_json::to_vec(&msg).unwrap_or_default();
                let props = amqp::properties(JOB_TYPE, &format!("{}:{}", msg.job_id, msg.attempt))
                    .with_priority(msg.priority());
                let confirm = self
                    .ch
                    .basic_publish(
                        exchange.clone().into(),
                        msg.request.tier.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        props,
                    )
                    .await
                    .map_err(transport)?;
                confirms.push((o.id, confirm));
            }
            let mut broken = None;
            for (id, confirm) in confirms {
                match confirm.await {
                    Ok(c) if c.is_ack() => done.push(id),
                    Ok(_) => {}
                    // The channel is gone: mark what was confirmed, then reconnect.
                    Err(e) => {
                        broken = Some(e);
                        break;
                    }
                }
            }
            let confirmed = done.len();
            if confirmed > 0 {
                self.sched.metrics.relayed.inc_by(confirmed as u64);
                // Not lost if this fails: the rows stay unsent and are published again; a repeat
                // is harmless.
                marker.mark(done).await?;
            }
            match broken {
                Some(e) => Err(transport(e)),
                None => Ok(confirmed),
            }
        })
    }
}

/// The message a worker gets for a dispatch.
pub fn job_message(d: &Attempt) -> JobMessage {
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
        let ids: Vec<String> =
            batch.iter().flat_map(|(read, _)| read.iter().flatten()).map(|m| m.job.job_id.clone()).collect();
        let recorded = match sched.store.jobs(ids).await {
            Ok(jobs) => {
                let jobs: HashMap<String, Job> = jobs.into_iter().map(|j| (j.id.clone(), j)).collect();
                let jobs = &jobs;
                futures_util::future::join_all(
                    batch.iter().map(|(read, d)| record_delivery(sched, names, dead, d, read.as_deref(), jobs)),
                )
                .await
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the jobs results answer");
                vec![false; batch.len()]
            }
        };
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
/// that did not decode is dead-lettered with the reason; so is each result refused
/// ([`Refusal`]), alone, while the rest of its message is recorded. `jobs` holds the jobs the
/// results name, as stored.
async fn record_delivery(
    sched: &Scheduler,
    names: &Names,
    dead: &Channel,
    d: &lapin::message::Delivery,
    read: Result<&[ResultMessage], &MessageError>,
    jobs: &HashMap<String, Job>,
) -> bool {
    if let Err(why) = sched.signed_by(&d.data, amqp::signature(d)).await {
        let n = read.map_or(1, <[ResultMessage]>::len) as u64;
        return refuse(sched, names, dead, &Refusal::Unproven(why), n, &d.data, &d.properties).await;
    }
    let results = match read {
        Ok(r) => r,
        Err(e) => {
            sched.metrics.bad_messages.with_label_values(&["result"]).inc();
            let reason = e.to_string();
            tracing::warn!(reason, "dead-lettering a bad result message");
            return dead_letter(dead, names, &d.data, &d.properties, &reason).await;
        }
    };
    // Recording is idempotent by job and attempt: when some fail, the whole message comes again.
    let recorded = futures_util::future::join_all(results.iter().map(|m| async move {
        let refusal = match open_attempt(jobs.get(&m.job.job_id), &m.job) {
            Err(refusal) => refusal,
            Ok(attempt) => match sched.accept(m, attempt).await {
                Ok(report) => match sched.settle(&report).await {
                    Settled::Recorded => return true,
                    Settled::Again => return false,
                    Settled::Refused(why) => Refusal::StoreRefused(why),
                },
                Err(e) => {
                    tracing::error!(job_id = m.job.job_id, error = %e, "cannot look up a reported asset");
                    return false;
                }
            },
        };
        // Serializing this plain struct cannot fail.
        let body = serde_json::to_vec(m).unwrap_or_default();
        let props = amqp::properties(RESULT_TYPE, &format!("{}:{}", m.job.job_id, m.job.attempt));
        refuse(sched, names, dead, &refusal, 1, &body, &props).await
    }));
    recorded.await.into_iter().all(|ok| ok)
}

/// Counts `n` refused results and dead-letters the message that carries them (`body`, `props`)
/// with the reason; `false` when the broker did not take it (it comes again).
async fn refuse(
    sched: &Scheduler,
    names: &Names,
    dead: &Channel,
    why: &Refusal,
    n: u64,
    body: &[u8],
    props: &BasicProperties,
) -> bool {
    sched.metrics.results_refused.with_label_values(&[why.label()]).inc_by(n);
    let reason = format!("result refused ({}): {why}", why.label());
    tracing::warn!(reason, "refusing a result");
    // The operator hears of it once a day per reason; the metric counts every one.
    let day = crate::time::rfc3339(now_ms()).chars().take(10).collect::<String>();
    let cause = format!("result-refused:{}:{day}", why.label());
    let summary = format!(
        "results were dead-lettered to {} on {day}, the first: {reason} (kiln_scheduler_results_refused_total counts them)",
        names.dead_queue()
    );
    if let Err(e) = sched.raise_incident("result_refused", why.label(), &cause, &summary).await {
        tracing::error!(error = %e, "cannot raise an incident");
    }
    dead_letter(dead, names, body, props, &reason).await
}

/// Dead-letters a message with `reason`; `false` when the broker did not take it.
async fn dead_letter(dead: &Channel, names: &Names, body: &[u8], props: &BasicProperties, reason: &str) -> bool {
    match amqp::dead_letter(dead, names, body, props, reason, None).await {
        Ok(()) => true,
        Err(PublishError::Broker(e)) => {
            tracing::error!(error = %e, "cannot dead-letter a refused message");
            false
        }
        Err(PublishError::Nacked) => false,
    }
}

/// Settles the job of every job message dead-lettered ([`Names::dead_watch_queue`]), so none
/// stays `dispatched` waiting for a render that will not come. A worker's refusal (its reason in
/// `x-kiln-reason`: a request outside its limits, a message it cannot read), signed with a
/// worker token over the reason and the body, fails the job with that reason (unsigned, it is
/// counted and ignored); the broker's own dead letters (`x-death`: expired, over a queue's length) are
/// failures that may pass, under the retry policy. A message of an attempt no longer open, and
/// every other kind, is only acked: the operator's copy stays in [`Names::dead_queue`].
async fn watch_dead_letters(sched: &Arc<Scheduler>, names: &Names, ch: &Channel) -> anyhow::Result<()> {
    let mut consumer = ch
        .basic_consume(
            names.dead_watch_queue().into(),
            "kiln-scheduler-dead".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(d) = consumer.next().await {
        let d = d?;
        let done = match undelivered(&d) {
            Some(u) => match &u.cause {
                // A worker's refusal counts only when a worker token signed its words and the body.
                Cause::Worker(said) => {
                    match sched.signed_by(&amqp::dead_letter_payload(said, &d.data), amqp::signature(&d)).await {
                        Ok(_) => settle_dead_job(sched, u).await,
                        Err(why) => {
                            sched.metrics.bad_messages.with_label_values(&["dead_letter"]).inc();
                            tracing::warn!(
                                job_id = u.msg.job_id,
                                why,
                                "ignoring a worker's refusal no worker token signed"
                            );
                            true
                        }
                    }
                }
                Cause::Broker(_) => settle_dead_job(sched, u).await,
            },
            None => true,
        };
        if done {
            d.ack(BasicAckOptions::default()).await?;
        } else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            d.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await?;
        }
    }
    anyhow::bail!("the dead-letter consumer was closed")
}

/// A dead-lettered job message, why it died, and whether that may pass; `None` for any other
/// message.
fn undelivered(d: &lapin::message::Delivery) -> Option<Undelivered> {
    if d.properties.kind().as_ref().is_some_and(|k| k.as_str() != JOB_TYPE) {
        return None;
    }
    let msg: JobMessage = serde_json::from_slice(&d.data).ok()?;
    let headers = d.properties.headers().clone().unwrap_or_default();
    if let Some(said) = headers.inner().get(REASON_HEADER).and_then(amqp::text_of) {
        return Some(Undelivered { msg, cause: Cause::Worker(said) });
    }
    // The broker's own: the newest `x-death` entry says why.
    let death = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().first().and_then(|e| match e {
            AMQPValue::FieldTable(t) => t.inner().get("reason").and_then(amqp::text_of),
            _ => None,
        }),
        _ => None,
    };
    Some(Undelivered { msg, cause: Cause::Broker(death.unwrap_or_else(|| "unknown".into())) })
}

/// A job message that came back dead-lettered, and why.
struct Undelivered {
    msg: JobMessage,
    cause: Cause,
}

/// Who dead-lettered a job message.
enum Cause {
    /// A worker refused it, in these words (its `x-kiln-reason`, which its signature covers).
    Worker(String),
    /// The broker dropped it, for this `x-death` reason (`expired`, `maxlen`, `rejected`, …).
    Broker(String),
}

impl Cause {
    /// Why, for the job's error.
    fn reason(&self) -> String {
        match self {
            Cause::Worker(said) => format!("refused by a worker: {said}"),
            Cause::Broker(why) => format!("the broker dropped the job's message ({why})"),
        }
    }

    /// The metric's label: `worker_refused`, or the broker's reason.
    fn label(&self) -> &str {
        match self {
            Cause::Worker(_) => "worker_refused",
            Cause::Broker(why) => why,
        }
    }

    /// Whether another attempt may fare better: not after a worker's refusal (its limits will
    /// refuse it again), but after the broker's expiry or overflow.
    fn transient(&self) -> bool {
        matches!(self, Cause::Broker(why) if why == "expired" || why == "maxlen")
    }
}

/// Ends the attempt of a dead job message, if it is still open; `false` when the store failed.
async fn settle_dead_job(sched: &Scheduler, u: Undelivered) -> bool {
    let msg = &u.msg;
    let job = match sched.store.job(&msg.job_id).await {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(job_id = msg.job_id, error = %e, "cannot read a dead-lettered job");
            return false;
        }
    };
    let Ok(attempt) = open_attempt(job.as_ref(), msg) else { return true };
    let reason = u.cause.reason();
    tracing::warn!(job_id = msg.job_id, attempt = msg.attempt, reason, "a job's message was dead-lettered");
    if sched.settle_undelivered(&attempt, reason, u.cause.transient()).await == Settled::Again {
        return false;
    }
    sched.metrics.undelivered.with_label_values(&[u.cause.label()]).inc();
    true
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
        if let Err(why) = sched.signed_by(&d.data, amqp::signature(&d)).await {
            sched.metrics.bad_messages.with_label_values(&["heartbeat"]).inc();
            tracing::warn!(why, "ignoring an unproven heartbeat");
            continue;
        }
        match amqp::decode::<Heartbeat>(&d, HEARTBEAT_TYPE) {
            Ok(hb) => sched.registry.heard(hb, now_ms()),
            Err(e) => {
                sched.metrics.bad_messages.with_label_values(&["heartbeat"]).inc();
                tracing::warn!(error = %e, "ignoring a bad heartbeat");
            }
        }
    }
}
