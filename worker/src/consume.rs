//! `kiln-worker run`: the worker daemon of the distributed farm.
//!
//! It consumes the tier queues its config names (a channel per tier, each with its own
//! prefetch), renders with the engine at most `concurrency` jobs at once, hands each new asset to
//! the scheduler unless the asset store is shared (a small one inside its result message, held in
//! memory and never stored here; a larger one by `PUT /v1/assets/{hash}` with a worker token),
//! publishes the result with a publisher confirm, and only then acks the delivery (through the
//! session's [`Settler`], which folds a run of them into one frame). A crash anywhere before the
//! ack hands the job back to the broker, which delivers it again; the scheduler records only the
//! first result of an attempt, so a repeat is harmless.
//!
//! A message that does not decode, has an unknown schema version or asks for a render outside
//! this worker's tier limits is dead-lettered with the reason and counted; the worker carries on.
//! When the broker goes away the worker reconnects with backoff. `SIGTERM` drains: it stops
//! consuming, finishes what it has in hand within `grace_seconds`, and hands the rest back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use kiln_common::host_name;
use kiln_protocol::wire::{
    self, AttemptOutcome, CONTROL_TYPE, Command, ControlMessage, HEARTBEAT_TYPE, Heartbeat, JOB_TYPE, JobMessage,
    Names, RESULT_TYPE, RESULTS_TYPE, ResultBatch, ResultMessage,
};
use kiln_protocol::{RenderRequest, Tier, now_ms};
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::attempt::{Failure, attempt};
use crate::config::ConfigError;
use crate::metrics::Metrics;
use crate::settle::{Settle, Settler, Tag};
use crate::worker::Worker;
use kiln_common::amqp;
use kiln_common::client::{Client, Secret};

/// The daemon's settings (`[run]` in the worker's config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// The broker [env KILN_AMQP_URL].
    pub amqp_url: String,
    /// The prefix of the exchange and queue names [env KILN_AMQP_PREFIX].
    pub amqp_prefix: String,
    /// The tiers this worker serves [env KILN_WORKER_TIERS, comma separated].
    pub tiers: Vec<Tier>,
    /// Unacked deliveries the broker may hand this worker per tier [env KILN_PREFETCH].
    pub prefetch: u16,
    /// Renders at once [env KILN_CONCURRENCY].
    pub concurrency: usize,
    /// The scheduler's URL, for asset uploads [env KILN_SCHEDULER_URL].
    pub scheduler_url: String,
    /// A `worker` token for the uploads [env KILN_WORKER_TOKEN]; never printed.
    #[serde(skip_serializing)]
    pub token: Option<String>,
    /// The asset folder is shared with the scheduler (no upload) [env KILN_SHARED_ASSETS].
    pub shared_assets: bool,
    /// An asset no larger than this many bytes (and its own thumbnail) travels inside its result
    /// message instead of being uploaded; 0 uploads every asset. Each asset's provenance travels
    /// with its result either way. At most 64 KiB [env KILN_INLINE_ASSET_BYTES].
    pub inline_asset_bytes: u64,
    /// Seconds between heartbeats. The scheduler shows a worker lost after its
    /// `lost_after_seconds` or three of these, whichever is longer [env KILN_HEARTBEAT_SECONDS].
    pub heartbeat_seconds: u64,
    /// Seconds a drain waits for renders in hand before handing them back.
    pub grace_seconds: u64,
    /// This worker's id [default: host-pid; env KILN_WORKER_ID].
    pub worker_id: Option<String>,
    /// Where to serve `/metrics` and `/healthz`, e.g. `0.0.0.0:9464` [default: off; env
    /// KILN_METRICS_LISTEN].
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            amqp_prefix: "kiln".into(),
            tiers: Tier::ALL.to_vec(),
            prefetch: 32,
            concurrency: 1,
            scheduler_url: "http://127.0.0.1:7878".into(),
            token: None,
            shared_assets: false,
            inline_asset_bytes: 32 << 10,
            heartbeat_seconds: 5,
            grace_seconds: 30,
            worker_id: None,
            metrics_listen: None,
        }
    }
}

impl RunConfig {
    /// Applies the `KILN_*` overrides and checks the result; errors name the key.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        use crate::config::env_parse;
        if let Some(v) = env("KILN_AMQP_URL") {
            self.amqp_url = v;
        }
        if let Some(v) = env("KILN_AMQP_PREFIX") {
            self.amqp_prefix = v;
        }
        if let Some(v) = env("KILN_WORKER_TIERS") {
            self.tiers = v
                .split(',')
                .filter(|t| !t.trim().is_empty())
                .map(|t| t.trim().parse())
                .collect::<Result<_, _>>()
                .map_err(|e: kiln_protocol::RequestError| ConfigError::Env {
                    key: "KILN_WORKER_TIERS",
                    value: v.clone(),
                    message: e.to_string(),
                })?;
        }
        if let Some(v) = env("KILN_SCHEDULER_URL") {
            self.scheduler_url = v;
        }
        if let Some(v) = env("KILN_WORKER_TOKEN").filter(|v| !v.is_empty()) {
            self.token = Some(v);
        }
        if let Some(v) = env("KILN_WORKER_ID").filter(|v| !v.is_empty()) {
            self.worker_id = Some(v);
        }
        self.prefetch = env_parse("KILN_PREFETCH", env)?.unwrap_or(self.prefetch);
        self.concurrency = env_parse("KILN_CONCURRENCY", env)?.unwrap_or(self.concurrency);
        self.shared_assets = env_parse("KILN_SHARED_ASSETS", env)?.unwrap_or(self.shared_assets);
        self.inline_asset_bytes = env_parse("KILN_INLINE_ASSET_BYTES", env)?.unwrap_or(self.inline_asset_bytes);
        self.heartbeat_seconds = env_parse("KILN_HEARTBEAT_SECONDS", env)?.unwrap_or(self.heartbeat_seconds);
        self.metrics_listen = env_parse("KILN_METRICS_LISTEN", env)?.or(self.metrics_listen);
        self.validate()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, message: String| Err(ConfigError::Invalid { key, message });
        if !self.amqp_url.starts_with("amqp://") && !self.amqp_url.starts_with("amqps://") {
            return bad("run.amqp_url", format!("{:?} is not an amqp:// URL", self.amqp_url));
        }
        if self.amqp_prefix.is_empty()
            || !self.amqp_prefix.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return bad("run.amqp_prefix", format!("{:?} must be letters, digits, '-', '_' or '.'", self.amqp_prefix));
        }
        if self.tiers.is_empty() {
            return bad("run.tiers", "must name at least one tier".into());
        }
        if self.prefetch == 0 {
            return bad("run.prefetch", "must be at least 1".into());
        }
        if self.concurrency == 0 || self.concurrency > 256 {
            return bad("run.concurrency", format!("{} is outside 1..=256", self.concurrency));
        }
        if self.inline_asset_bytes > MAX_INLINE_ASSET_BYTES {
            return bad(
                "run.inline_asset_bytes",
                format!(
                    "{} is over {MAX_INLINE_ASSET_BYTES} (64 KiB); larger assets are uploaded",
                    self.inline_asset_bytes
                ),
            );
        }
        if self.heartbeat_seconds == 0 {
            return bad("run.heartbeat_seconds", "must be at least 1".into());
        }
        if !self.shared_assets && self.token.is_none() {
            return bad(
                "run.token",
                "a worker token is needed to upload assets (KILN_WORKER_TOKEN; make one with `kiln token create --role worker NAME`), or set run.shared_assets".into(),
            );
        }
        Ok(())
    }

    /// This worker's id.
    pub fn id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| format!("{}-{}", host_name(), std::process::id()))
    }
}

/// The most `run.inline_asset_bytes` may be: what a render holds in memory before it writes
/// the PNG to a file. A full result batch of such assets is about 11 MiB.
const MAX_INLINE_ASSET_BYTES: u64 = crate::store::SPILL_BYTES as u64;

/// The running daemon's shared state.
struct Daemon {
    worker: Arc<Worker>,
    cfg: RunConfig,
    names: Names,
    id: String,
    host: String,
    upload: Option<Client>,
    in_flight: AtomicU32,
    draining: AtomicBool,
    /// Whether a broker session is up.
    connected: AtomicBool,
    /// Why the scheduler drained this worker, while it is drained.
    drained: std::sync::Mutex<Option<String>>,
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
    let upload = (!cfg.shared_assets).then(|| Client::new(&cfg.scheduler_url, cfg.token.clone().map(Secret::new)));
    let d = Arc::new(Daemon {
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
        let Some(conn) = amqp::connect_with_backoff(&d.cfg.amqp_url, &d.id, stop.cancelled()).await else {
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

    /// One connection's life: `Ok` when stopped and drained, `Err` when the broker went away.
    async fn session(self: Arc<Self>, conn: &Connection, stop: &CancellationToken) -> anyhow::Result<()> {
        let publ = amqp::confirm_channel(conn).await?;
        amqp::declare_topology(&publ, &self.names).await?;
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

    /// Serves `/metrics` (the worker's Prometheus metrics) and `/healthz` (200 while connected
    /// to the broker and taking work; 503 with the reason otherwise) until `stop`.
    async fn serve_http(self: Arc<Self>, listener: tokio::net::TcpListener, stop: CancellationToken) {
        loop {
            let stream = tokio::select! {
                () = stop.cancelled() => return,
                s = listener.accept() => match s {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let me = self.clone();
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let me = me.clone();
                async move { Ok::<_, std::convert::Infallible>(me.http_answer(req.uri().path())) }
            });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    }

    fn http_answer(&self, path: &str) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
        let (status, kind, body) = match path {
            "/metrics" => (200, "text/plain; version=0.0.4", self.worker.metrics.encode()),
            "/healthz" => {
                let drained = self.drained_reason();
                let (ok, status) = if !self.connected.load(Ordering::Relaxed) {
                    (false, "not connected to the broker")
                } else if drained.is_some() {
                    (false, "drained by the scheduler")
                } else if self.draining.load(Ordering::Relaxed) {
                    (false, "draining")
                } else {
                    (true, "ok")
                };
                let body = serde_json::json!({
                    "status": status,
                    "worker_id": self.id,
                    "in_flight": self.in_flight.load(Ordering::Relaxed),
                    "drained": drained,
                });
                (if ok { 200 } else { 503 }, "application/json", body.to_string())
            }
            _ => (404, "text/plain", "not found: try /metrics or /healthz\n".to_owned()),
        };
        hyper::Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, kind)
            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
            .unwrap_or_default()
    }

    /// A private queue bound to the control exchange by this worker's id.
    async fn control_consumer(&self, conn: &Connection) -> anyhow::Result<Consumer> {
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
    fn control(&self, m: Option<Result<lapin::message::Delivery, lapin::Error>>) -> anyhow::Result<()> {
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
    fn stop_consuming(
        &self,
        m: Option<Result<lapin::message::Delivery, lapin::Error>>,
    ) -> Option<anyhow::Result<Ended>> {
        match self.control(m) {
            Ok(()) if self.drained_reason().is_some() => Some(Ok(Ended::Drained)),
            Ok(()) => None,
            Err(e) => Some(Err(e)),
        }
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
        let (results, publisher) =
            Results::start(publ.clone(), self.names.results_queue(), settler.clone(), self.worker.metrics.clone());
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

    async fn heartbeats(self: Arc<Self>, publ: Channel, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(self.cfg.heartbeat_seconds));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => self.send_heartbeat(&publ).await,
            }
        }
    }

    async fn send_heartbeat(&self, publ: &Channel) {
        let engine = self.worker.engine();
        let hb = Heartbeat {
            v: wire::SCHEMA_VERSION,
            worker_id: self.id.clone(),
            host: self.host.clone(),
            backend: engine.backend.name().to_owned(),
            adapter: engine.backend.device_name(),
            memory_bytes: None,
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
        let props = amqp::properties(HEARTBEAT_TYPE, &format!("{}:{}", self.id, hb.at_ms));
        if let Err(e) = amqp::publish_confirmed(publ, "", &self.names.heartbeats_queue(), &body, props).await {
            tracing::warn!(error = %e, "cannot send a heartbeat");
        }
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

    async fn handle(
        &self,
        publ: &Channel,
        results: &Results,
        settler: &Settler,
        ch: usize,
        delivery: lapin::message::Delivery,
    ) {
        let settle = || Settle { at: Tag { ch, tag: delivery.delivery_tag }, acker: delivery.acker.clone() };
        let msg = match self.check(&delivery) {
            Ok(m) => m,
            Err(reason) => {
                self.worker.metrics.bad_messages.inc();
                tracing::warn!(reason, routing_key = %delivery.routing_key, "dead-lettering a bad job message");
                let dl = amqp::dead_letter(publ, &self.names, &delivery.data, &delivery.properties, &reason).await;
                match dl {
                    Ok(()) => settler.ack(vec![settle()]),
                    // Not lost: back to the queue until the dead-letter exchange takes it.
                    Err(e) => {
                        tracing::error!(error = %e, "cannot dead-letter; handing the message back");
                        settler.nack(settle());
                    }
                }
                return;
            }
        };
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
                match self.upload(&r.asset, &inline).await {
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

    /// Uploads to the scheduler what of an asset does not travel with its result (`inline`): the
    /// PNG, its thumbnail and its provenance. Nothing when the store is shared.
    async fn upload(&self, hash: &str, inline: &Inline) -> Result<(), UploadError> {
        let Some(client) = &self.upload else { return Ok(()) };
        let handed = &self.worker.metrics.assets_handed;
        if inline.png.is_some() {
            // Only an image that is its own thumbnail travels, so no thumbnail goes beside it;
            // without a readable provenance the scheduler keeps what the result says.
            handed.with_label_values(&["inline"]).inc();
            return Ok(());
        }
        let store = self.worker.store();
        let parts = [
            (store.path(hash), format!("/v1/assets/{hash}")),
            (store.thumb_path(hash), format!("/v1/assets/{hash}?variant=thumb")),
            (store.provenance_path(hash), format!("/v1/assets/{hash}/provenance")),
        ];
        for (i, (file, url)) in parts.iter().enumerate() {
            // An image no larger than a thumbnail has no thumbnail file (it is its own), and a
            // cached asset from before thumbnails and provenance were kept has neither.
            if (i == 2 && inline.provenance.is_some()) || (i > 0 && !file.is_file()) {
                continue;
            }
            put_with_retry(client, url, file).await?;
        }
        handed.with_label_values(&["upload"]).inc();
        Ok(())
    }
}

/// What of an asset travels inside its result message instead of being uploaded.
#[derive(Debug, Default)]
struct Inline {
    /// The PNG, when it is small and its own thumbnail.
    png: Option<Vec<u8>>,
    /// The provenance record.
    provenance: Option<serde_json::Value>,
}

impl Inline {
    /// Takes what of `r`'s asset goes with its result (in the render's blocking task): its
    /// provenance (from the render, else from the store), and the PNG when it is at most `max`
    /// bytes and an image no larger than a thumbnail (so no thumbnail file goes beside it): the
    /// render held it in memory, or (an asset this worker had already) it is read from the store.
    /// A part that cannot be read is uploaded instead.
    fn take(
        store: &crate::store::AssetStore,
        req: &RenderRequest,
        r: &mut crate::worker::Rendered,
        max: u64,
    ) -> Inline {
        let provenance = r
            .provenance
            .take()
            .map(String::into_bytes)
            .or_else(|| std::fs::read(store.provenance_path(&r.asset)).ok())
            .and_then(|text| serde_json::from_slice(&text).ok());
        let png = r.png.take().or_else(|| {
            let small = r.bytes <= max && crate::render::own_thumbnail(req.width, req.height);
            small.then(|| std::fs::read(&r.path).ok()).flatten().filter(|b| b.len() as u64 == r.bytes)
        });
        Inline { png, provenance }
    }
}

/// Why an upload did not happen.
#[derive(Debug, thiserror::Error)]
enum UploadError {
    /// The scheduler refused it (a 4xx): final.
    #[error("{0}")]
    Refused(String),
    /// It could not be done now (the scheduler unreachable or failing, the file unreadable).
    #[error("{0}")]
    Failed(String),
}

/// The most results the publisher puts in one [`ResultBatch`].
const MAX_RESULTS_PER_MESSAGE: usize = 128;

/// A result batch stops taking results once their inline PNGs come to this many bytes, so a
/// message stays small whatever `run.inline_asset_bytes` is (the scheduler prefetches a
/// thousand result messages).
const MAX_INLINE_BYTES_PER_MESSAGE: usize = 256 << 10;

/// The bytes of the PNG a result carries inline.
fn inline_bytes(r: &ResultMessage) -> usize {
    match &r.outcome {
        AttemptOutcome::Succeeded { png: Some(png), .. } => png.len(),
        _ => 0,
    }
}

/// What goes in one message: `first`, then the results already waiting, up to
/// [`MAX_RESULTS_PER_MESSAGE`] or [`MAX_INLINE_BYTES_PER_MESSAGE`].
fn gather(first: Outgoing, rx: &mut mpsc::UnboundedReceiver<Outgoing>) -> Vec<Outgoing> {
    let mut inline = inline_bytes(&first.0);
    let mut batch = vec![first];
    while batch.len() < MAX_RESULTS_PER_MESSAGE
        && inline < MAX_INLINE_BYTES_PER_MESSAGE
        && let Ok(next) = rx.try_recv()
    {
        inline += inline_bytes(&next.0);
        batch.push(next);
    }
    batch
}

/// A result on its way to the publisher, the delivery it answers, and where to say how it went.
type Outgoing = (ResultMessage, Settle, oneshot::Sender<Result<(), String>>);

/// The session's result publisher. Renders hand it their results; it publishes what has come in
/// while its last message was being confirmed as one message (a [`ResultBatch`] of at most
/// [`MAX_RESULTS_PER_MESSAGE`], or a plain result when one came alone), and once the broker
/// confirmed it, hands their deliveries to the settler to ack together, then tells each render.
/// Under load a job costs the broker about one message instead of two, and a run of results
/// about one ack frame; idle, a result goes out at once.
#[derive(Clone)]
struct Results(mpsc::UnboundedSender<Outgoing>);

impl Results {
    /// Starts the publisher on `publ` (a confirm channel); it ends once every sender is gone.
    fn start(
        publ: Channel,
        queue: String,
        settler: Settler,
        metrics: Metrics,
    ) -> (Results, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
        let task = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let batch = gather(first, &mut rx);
                let n = batch.len() as u64;
                let mut results = Vec::with_capacity(batch.len());
                let mut deliveries = Vec::with_capacity(batch.len());
                let mut replies = Vec::with_capacity(batch.len());
                for (r, d, reply) in batch {
                    results.push(r);
                    deliveries.push(d);
                    replies.push(reply);
                }
                let sent = publish_results(&publ, &queue, results).await.map_err(|e| e.to_string());
                if sent.is_ok() {
                    metrics.result_messages.inc();
                    metrics.results.inc_by(n);
                    settler.ack(deliveries);
                }
                for reply in replies {
                    let _ = reply.send(sent.clone());
                }
            }
        });
        (Results(tx), task)
    }

    /// Publishes a result; `Ok` once the broker confirmed the message that carried it, and its
    /// delivery is on its way to being acked. On `Err` the delivery is the caller's to settle.
    async fn publish(&self, result: ResultMessage, delivery: Settle) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.0.send((result, delivery, tx)).map_err(|_| "the result publisher has stopped".to_owned())?;
        rx.await.map_err(|_| "the result publisher stopped before the broker confirmed".to_owned())?
    }
}

/// A result's message id: its job and attempt.
fn result_id(r: &ResultMessage) -> String {
    format!("{}:{}", r.job.job_id, r.job.attempt)
}

/// Publishes results to the results queue in one confirmed message: a plain result message when
/// there is one, a batch otherwise.
async fn publish_results(
    publ: &Channel,
    queue: &str,
    mut results: Vec<ResultMessage>,
) -> Result<(), amqp::PublishError> {
    let (kind, id, body) = match results.len() {
        1 => {
            let r = results.remove(0);
            (RESULT_TYPE, result_id(&r), serde_json::to_vec(&r))
        }
        n => {
            let id = results.first().map(|r| format!("{}+{}", result_id(r), n - 1)).unwrap_or_default();
            (RESULTS_TYPE, id, serde_json::to_vec(&ResultBatch { v: wire::SCHEMA_VERSION, results }))
        }
    };
    // Serializing these plain structs cannot fail; an empty body would be dead-lettered, not lost.
    let body = body.unwrap_or_default();
    amqp::publish_confirmed(publ, "", queue, &body, amqp::properties(kind, &id)).await
}

/// PUTs a file (streamed from disk), trying again with backoff for up to two minutes (the
/// scheduler may be restarting); a 4xx is final.
async fn put_with_retry(client: &Client, path: &str, file: &std::path::Path) -> Result<(), UploadError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut backoff = Duration::from_millis(100);
    loop {
        let err = match client.put_file(path, file).await {
            Ok(r) if r.status.is_success() => return Ok(()),
            Ok(r) if r.status.is_client_error() => {
                let why = String::from_utf8_lossy(&r.body);
                return Err(UploadError::Refused(format!(
                    "the scheduler refused the upload {path}: {} {why}",
                    r.status
                )));
            }
            Ok(r) => r.status.to_string(),
            Err(kiln_common::client::DownloadError::Io(e)) => {
                return Err(UploadError::Failed(format!("reading {}: {e}", file.display())));
            }
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() + backoff > deadline {
            return Err(UploadError::Failed(format!("PUT {path}: {err}")));
        }
        tracing::warn!(path, error = err, retry_in_ms = backoff.as_millis() as u64, "upload failed; trying again");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn a_result_message_stops_at_128_results_or_256_kib_of_inline_pngs() {
        let result = |png: Option<usize>| {
            let request = RenderRequest::resolve(
                "cppn",
                "p",
                1,
                Tier::Preview,
                Some(16),
                None,
                None,
                &kiln_protocol::TierLimits::default(),
            )
            .unwrap();
            let job = JobMessage {
                v: 1,
                job_id: "j".into(),
                attempt: 1,
                client: "c".into(),
                cache_key: "k".into(),
                created_ms: 0,
                request,
            };
            let png = png.map(|n| vec![0; n]);
            let outcome = AttemptOutcome::Succeeded { asset: "h".into(), bytes: 0, png, provenance: None };
            let msg = ResultMessage {
                v: 1,
                job,
                worker: "w".into(),
                backend: "cpu".into(),
                started_ms: 0,
                finished_ms: 0,
                outcome,
            };
            let d = lapin::message::Delivery::mock(1, "".into(), "".into(), false, Vec::new());
            (msg, Settle { at: Tag { ch: 0, tag: 1 }, acker: d.acker }, oneshot::channel().0)
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        for _ in 0..300 {
            tx.send(result(None)).unwrap();
        }
        let sizes: Vec<usize> = std::iter::from_fn(|| rx.try_recv().ok().map(|f| gather(f, &mut rx).len())).collect();
        assert_eq!(sizes, [128, 128, 44]);
        for n in [100 << 10, 100 << 10, 100 << 10, 1, 60 << 10] {
            tx.send(result(Some(n))).unwrap();
        }
        let sizes: Vec<usize> = std::iter::from_fn(|| rx.try_recv().ok().map(|f| gather(f, &mut rx).len())).collect();
        assert_eq!(sizes, [3, 2], "300 KiB of PNGs fill a message; the rest go in the next");
    }

    #[test]
    fn the_inline_asset_limit_comes_from_the_environment_and_is_bounded() {
        let mut run = RunConfig { token: Some("t".into()), ..RunConfig::default() };
        assert_eq!(run.inline_asset_bytes, 32 << 10);
        run.apply_env(&env(&[("KILN_INLINE_ASSET_BYTES", "0")])).unwrap();
        assert_eq!(run.inline_asset_bytes, 0, "0 uploads every asset");
        let e = run.apply_env(&env(&[("KILN_INLINE_ASSET_BYTES", "65537")])).unwrap_err().to_string();
        assert!(e.contains("run.inline_asset_bytes") && e.contains("64 KiB"), "{e}");
        let e = run.apply_env(&env(&[("KILN_INLINE_ASSET_BYTES", "lots")])).unwrap_err().to_string();
        assert!(e.contains("KILN_INLINE_ASSET_BYTES"), "{e}");
        let e = toml::from_str::<RunConfig>("inline_asset_bytes = -1").unwrap_err().to_string();
        assert!(e.contains("inline_asset_bytes"), "{e}");
    }

    #[test]
    fn the_heartbeat_period_comes_from_the_environment_and_is_at_least_a_second() {
        let mut run = RunConfig { token: Some("t".into()), ..RunConfig::default() };
        assert_eq!(run.heartbeat_seconds, 5);
        run.apply_env(&env(&[("KILN_HEARTBEAT_SECONDS", "1")])).unwrap();
        assert_eq!(run.heartbeat_seconds, 1);
        let e = run.apply_env(&env(&[("KILN_HEARTBEAT_SECONDS", "0")])).unwrap_err().to_string();
        assert!(e.contains("heartbeat_seconds") && e.contains("at least 1"), "{e}");
        let e = run.apply_env(&env(&[("KILN_HEARTBEAT_SECONDS", "often")])).unwrap_err().to_string();
        assert!(e.contains("KILN_HEARTBEAT_SECONDS"), "{e}");
    }
}
