//! The daemon's side of its conversation with the scheduler: heartbeats, and the control
//! messages that drain it and resume it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kiln_common::amqp;
use kiln_protocol::now_ms;
use kiln_protocol::wire::{self, CONTROL_TYPE, Command, ControlMessage, HEARTBEAT_TYPE, Heartbeat};
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio_util::sync::CancellationToken;

use super::{Daemon, Ended};

impl Daemon {
    /// A private queue bound to the control exchange by this worker's id.
    pub(super) async fn control_consumer(&self, conn: &Connection) -> anyhow::Result<Consumer> {
        let ch = conn.create_channel().await?;
        let private = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
        let q = ch.queue_declare("".into(), private, FieldTable::default()).await?;
        let (x, key) = (self.names.control_exchange(), self.id.clone());
        ch.queue_bind(q.name().clone(), x.into(), key.into(), QueueBindOptions::default(), FieldTable::default())
            .await?;
        let opts = BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() };
        let tag = format!("{}-control", self.id);
        Ok(ch.basic_consume(q.name().clone(), tag.into(), opts, FieldTable::default()).await?)
    }

    /// Applies a control message; an error when the broker closed the consumer. A bad message is
    /// counted and ignored (the scheduler sends its command again on the next heartbeat).
    pub(super) fn control(&self, m: Option<Result<lapin::message::Delivery, lapin::Error>>) -> anyhow::Result<()> {
        let d = m.ok_or_else(|| anyhow::anyhow!("the broker closed the control consumer"))??;
        match amqp::decode::<ControlMessage>(&d, CONTROL_TYPE) {
            Ok(c) if c.worker_id == self.id => match c.command {
                Command::Drain { reason } => self.set_drained(Some(reason)),
                Command::Resume => {
                    if self.drained_reason().is_some() {
                        tracing::info!("resumed by the scheduler; taking work again");
                    }
                    self.set_drained(None);
                }
            },
            Ok(c) => tracing::warn!(to = c.worker_id, "ignoring a control message for another worker"),
            Err(e) => {
                self.worker.metrics.bad_messages.inc();
                tracing::warn!(error = %e, "ignoring a bad control message");
            }
        }
        Ok(())
    }

    /// Applies a control message while consuming: `Some` when consuming must end (drained, or
    /// the broker went away).
    pub(super) fn stop_consuming(
        &self,
        m: Option<Result<lapin::message::Delivery, lapin::Error>>,
    ) -> Option<anyhow::Result<Ended>> {
        match self.control(m) {
            Ok(()) if self.drained_reason().is_some() => Some(Ok(Ended::Drained)),
            Ok(()) => None,
            Err(e) => Some(Err(e)),
        }
    }

    pub(super) async fn heartbeats(self: Arc<Self>, publ: Channel, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(self.cfg.heartbeat_seconds));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => self.send_heartbeat(&publ).await,
            }
        }
    }

    pub(super) async fn send_heartbeat(&self, publ: &Channel) {
        let engine = self.worker.engine();
        let usage = engine.backend.usage();
        if let Some(u) = usage {
            self.worker.metrics.gpu(&engine.backend.device_name(), &u);
        }
        let hb = Heartbeat {
            v: wire::SCHEMA_VERSION,
            worker_id: self.id.clone(),
            host: self.host.clone(),
            backend: engine.backend.name().to_owned(),
            adapter: engine.backend.device_name(),
            memory_bytes: usage.map(|u| u.memory_total_bytes),
            memory_used_bytes: usage.map(|u| u.memory_used_bytes),
            utilization_percent: usage.map(|u| u.utilization_percent),
            models: vec![crate::engine::cppn::MODEL_ID.to_owned()],
            tiers: self.cfg.tiers.clone(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            concurrency: self.cfg.concurrency as u32,
            draining: self.draining.load(Ordering::Relaxed) || self.drained_reason().is_some(),
            drained: self.drained_reason(),
            at_ms: now_ms(),
            every_ms: Some(self.cfg.heartbeat_seconds.saturating_mul(1000)),
        };
        let body = serde_json::to_vec(&hb).unwrap_or_default();
        let props =
            amqp::signed(amqp::properties(HEARTBEAT_TYPE, &format!("{}:{}", self.id, hb.at_ms)), &self.key, &body);
        if let Err(e) = amqp::publish_confirmed(publ, "", &self.names.heartbeats_queue(), &body, props).await {
            tracing::warn!(error = %e, "cannot send a heartbeat");
        }
    }
}
