//! RabbitMQ I/O for the distributed farm: the transport the outbox loop publishes through
//! ([`Relay`]: publish with confirms, mark sent only after the confirm), the results consumer
//! (each worker's result settled, then acked), the heartbeat listener that feeds the registry,
//! and the control messages to workers. Reconnects with backoff when the broker goes away; rows
//! not yet confirmed stay unsent and are published again, and a result is acked only once it is
//! durable in the store, so nothing is lost and a repeat changes nothing.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kiln_common::amqp::{self, PublishError};
use kiln_protocol::now_ms;
use kiln_protocol::wire::{
    self, CONTROL_TYPE, HEARTBEAT_TYPE, Heartbeat, JOB_TYPE, JobMessage, MessageError, Names, RESULT_TYPE,
    RESULTS_TYPE, ResultBatch, ResultMessage,
};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;

use crate::config::BrokerConfig;
use crate::dispatch::{Dispatch, DispatchError, Marker, run_outbox};
use crate::scheduler::Scheduler;
use crate::store::writer::MAX_BATCH;
use crate::store::{BoxFut, Dispatch as Job, Outgoing};

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
    let control = amqp::confirm_channel(conn).await?;
    sched.registry.set_drained(sched.store.drained().await?);
    let relay = Relay { ch: &publ, names, window: cfg.window, sched };
    let result = tokio::select! {
        r = run_outbox(sched, &relay, &stop) => r.map_err(anyhow::Error::from),
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
pub fn job_message(d: &Job) -> JobMessage {
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

fn dispatch_of(m: &JobMessage) -> Job {
    Job {
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
    let recorded = futures_util::future::join_all(results.iter().map(|m| async move {
        match sched.accept(m, dispatch_of(&m.job)).await {
            Ok(report) => sched.settle(&report).await,
            Err(e) => {
                tracing::error!(job_id = m.job.job_id, error = %e, "cannot look up a reported asset");
                false
            }
        }
    }));
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
