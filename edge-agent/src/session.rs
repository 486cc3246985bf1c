//! One device's life: its MQTT session, its task executor and its telemetry.
//!
//! Each device has its own MQTT connection (so its own last will), client id `{prefix}-edge-{id}`,
//! clean session. On every connect it publishes its birth (retained status, QoS 1) and subscribes
//! to its tasks and to the scheduler's status.
//!
//! The spool is sent only while the scheduler's retained status says it is online: a broker
//! accepts (and acknowledges) a message nobody is subscribed to and drops it, so a broker that
//! restarted without its sessions, or a scheduler that is away, would otherwise swallow reports
//! the agent has already let go of. The scheduler subscribes before it announces itself, and its
//! last will says offline, so the gate opens only when someone is listening. The spool goes one
//! message at a time: the next leaves only when the broker has acknowledged the one before (QoS 1
//! PUBACK), so telemetry and reports arrive in the order they were made, across outages and
//! restarts. A message in flight when the connection breaks is sent again on the next one (at
//! least once; the scheduler drops what it has seen). Tasks that arrive while the agent is away
//! are not queued by the broker (clean session): the scheduler sends again what it has not heard
//! accepted, and does so at once when the device is born again.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_protocol::fleet::{
    DeviceKind, DeviceState, DeviceStatus, DeviceTask, FLEET_VERSION, RejectReason, ReportState, SchedulerStatus,
    TASK_REPORT_VERSION, TaskReport, Telemetry, Topics, decode, valid_id,
};
use kiln_protocol::now_ms;
use kiln_protocol::wire::MessageKey;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DeviceConfig};
use crate::drivers::{Driver, TaskCtx};
use crate::http::Http;
use crate::journal::{Journal, Record};
use crate::metrics::{DeviceMetrics, cpu_temp_c};
use crate::spool::{Kind, Spool, write_synced};

/// The device's health as its status shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    /// Online or degraded.
    pub state: DeviceState,
    /// Why, when degraded.
    pub detail: Option<String>,
}

/// What a device's tasks share.
struct Shared {
    id: String,
    /// A fresh id for this start of the agent, in the status and the telemetry alike.
    boot_id: String,
    kind: DeviceKind,
    topics: Topics,
    spool: Arc<Mutex<Spool>>,
    wake: Notify,
    /// The scheduler's clock less this agent's, milliseconds, from the last proven task's
    /// `sent_ms` (a Pi has no real-time clock and may boot with any time): deadlines are checked,
    /// and reports stamped, by the scheduler's time.
    clock_offset_ms: std::sync::atomic::AtomicI64,
    health: watch::Sender<Health>,
    /// The key of the agent's device token: the scheduler signs this device's tasks with it.
    key: MessageKey,
    /// What the device did, for `/metrics` (and the counts its telemetry carries).
    metrics: Arc<DeviceMetrics>,
}

impl Shared {
    /// Now, by the scheduler's clock as far as this agent knows it.
    fn now_ms(&self) -> i64 {
        now_ms().saturating_add(self.clock_offset_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Spools a message, synced on a blocking thread: the agent's runtime has one thread, and an
    /// SD card's fsync can take long enough to miss a keepalive.
    async fn spool(&self, kind: Kind, topic: String, payload: Vec<u8>) {
        let spool = self.spool.clone();
        let pushed = tokio::task::spawn_blocking(move || {
            let mut s = spool.lock().map_err(|_| "poisoned".to_owned())?;
            s.push(kind, &topic, &payload).map_err(|e| e.to_string())?;
            Ok((s.len(), s.dropped()))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match pushed {
            Ok((len, dropped)) => {
                self.metrics.spool(len, dropped);
                self.wake.notify_one();
            }
            Err(e) => tracing::error!(device = self.id, error = e, "could not spool a message; it is lost"),
        }
    }

    async fn report(&self, r: &Record) {
        self.send_report(TaskReport {
            v: TASK_REPORT_VERSION,
            task_id: r.task.task_id.clone(),
            state: r.state,
            at_ms: r.at_ms,
            detail: r.detail.clone(),
            reason: r.reason,
            output_asset: r.output_asset.clone(),
        })
        .await;
    }

    async fn send_report(&self, report: TaskReport) {
        let payload = serde_json::to_vec(&report).unwrap_or_default();
        self.spool(Kind::Report, self.topics.task_report(&self.id, &report.task_id), payload).await;
    }

    fn set_health(&self, state: DeviceState, detail: Option<String>) {
        self.metrics.set_degraded(state == DeviceState::Degraded);
        let next = Health { state, detail };
        self.health.send_if_modified(|h| {
            let changed = *h != next;
            *h = next;
            changed
        });
    }
}

/// Runs one device until `stop`.
pub async fn run_device(
    cfg: Arc<Config>,
    dev: DeviceConfig,
    driver: Driver,
    tls: Arc<rustls::ClientConfig>,
    metrics: Arc<DeviceMetrics>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let dir = cfg.data_dir.join("devices").join(&dev.id);
    let spool = Spool::open(&dir.join("spool"), cfg.spool.max_entries)?;
    metrics.spool(spool.len(), spool.dropped());
    let journal = Journal::open(&dir.join("journal"))?;
    let pruned = journal.prune(now_ms() - JOURNAL_KEEP_MS, JOURNAL_MAX_ENDED)?;
    if pruned > 0 {
        tracing::debug!(device = dev.id, pruned, "forgot ended tasks");
    }
    // Telemetry seq = (starts of this device << 32) + messages this start: it increases across
    // restarts with one synced write per start, not one per message.
    let boots: u64 =
        std::fs::read_to_string(dir.join("boots")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0) + 1;
    write_synced(&dir, "boots", boots.to_string().as_bytes())?;
    let (health, _) = watch::channel(Health { state: DeviceState::Online, detail: None });
    let shared = Arc::new(Shared {
        id: dev.id.clone(),
        boot_id: boot_id(),
        kind: dev.kind,
        topics: Topics::new(&cfg.mqtt.prefix),
        spool: Arc::new(Mutex::new(spool)),
        wake: Notify::new(),
        clock_offset_ms: Default::default(),
        health,
        key: MessageKey::from_token(&cfg.scheduler.token),
        metrics,
    });
    let timeout = Duration::from_millis(dev.step_timeout_ms);
    let http = Http::new(&cfg.scheduler.url, &cfg.scheduler.token, timeout, tls.clone())
        .max_download(cfg.scheduler.max_download_bytes);
    let (task_tx, task_rx) = mpsc::channel(256);
    let executor = Executor {
        shared: shared.clone(),
        journal,
        driver: Arc::new(tokio::sync::Mutex::new(driver)),
        http,
        assets_dir: cfg.data_dir.join("assets"),
        work_dir: dir.join("work"),
    };
    let driver = executor.driver.clone();
    let exec = tokio::spawn(executor.run(task_rx, stop.clone()));
    let telemetry =
        tokio::spawn(telemetry(shared.clone(), driver, boots << 32, cfg.telemetry_interval_ms, stop.clone()));
    let session = mqtt(&cfg, &dev, shared, task_tx, tls, stop).await;
    let _ = telemetry.await;
    let _ = exec.await;
    session
}

/// What the MQTT session hears: from the broker (through rumqttc's event loop), from the
/// device's health, and from the loop itself (a publish it queued).
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The broker accepted the connection; the device's health is as given.
    Connected(Health),
    /// A message on a topic the session subscribed to.
    Message {
        /// Its topic.
        topic: String,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// A QoS 1 publish was queued with the client: a spooled message (its seq) or a status.
    Queued(Option<u64>),
    /// rumqttc sent a PUBLISH with this packet id (our publishes go out in the order queued).
    Sent(u16),
    /// The broker acknowledged the QoS 1 PUBLISH with this packet id.
    Acked(u16),
    /// The connection failed or broke.
    Lost(String),
    /// The device's health changed.
    Health(Health),
}

/// What the session asks its loop to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Publish the device's status (retained, QoS 1) with this health, then say [`Input::Queued`].
    PublishStatus(Health),
    /// Subscribe (QoS 1).
    Subscribe(String),
    /// Hand a task payload to the executor.
    TakeTask(Vec<u8>),
    /// The broker has the spooled message with this seq: remove it from the spool.
    Unspool(u64),
    /// A scheduler status that did not parse: count it and drop it.
    Malformed(String),
    /// Wait this long before polling the connection again.
    Backoff(Duration),
}

/// A device's MQTT session as pure state: [`SessionState::handle`] takes what happened and says
/// what to do, with no I/O (rumqttc's `MqttState` is the model), and [`SessionState::may_send`]
/// says when the spool's front may go. The loop in [`mqtt`] only carries it out.
///
/// The spool goes one message at a time, and only while the scheduler's retained status says it
/// is online: the next leaves when the broker has acknowledged the one before, so reports arrive
/// in order; one in flight when the connection breaks goes again on the next connection.
#[derive(Debug)]
pub struct SessionState {
    device: String,
    tasks_topic: String,
    scheduler_topic: String,
    connected: bool,
    /// Whether the scheduler's retained status, as heard on this connection, says it is online.
    scheduler_online: bool,
    /// The scheduler's boot id as last heard online: a new one means it was reborn.
    scheduler_boot: Option<String>,
    /// The device's health as last published.
    health: Health,
    /// Our QoS 1 publishes in the order queued, so the next [`Input::Sent`] names the packet id
    /// of the front one: `Some(seq)` for a spooled message, `None` for a status.
    expect: VecDeque<Option<u64>>,
    /// The spooled message in flight: its seq and, once sent, its packet id.
    inflight: Option<(u64, Option<u16>)>,
    backoff: Duration,
    max_backoff: Duration,
}

/// The first wait after the connection fails; it doubles up to `mqtt.reconnect_max_ms`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

impl SessionState {
    /// The session of device `device` under `topics`, not yet connected.
    pub fn new(device: &str, topics: &Topics, max_backoff: Duration) -> SessionState {
        SessionState {
            device: device.to_owned(),
            tasks_topic: topics.tasks(device),
            scheduler_topic: topics.scheduler_status(),
            connected: false,
            scheduler_online: false,
            scheduler_boot: None,
            health: Health { state: DeviceState::Online, detail: None },
            expect: VecDeque::new(),
            inflight: None,
            backoff: FIRST_BACKOFF,
            max_backoff,
        }
    }

    /// Whether the connection is up.
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Whether the spool's front message may be published now: connected, the scheduler
    /// listening, and nothing of the spool's in flight.
    pub fn may_send(&self) -> bool {
        self.connected && self.scheduler_online && self.inflight.is_none()
    }

    /// Takes in what happened; returns what to do, in order.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        match input {
            Input::Connected(health) => {
                tracing::info!(device = self.device, "connected to the broker");
                self.connected = true;
                self.scheduler_online = false;
                self.backoff = FIRST_BACKOFF;
                self.expect.clear();
                self.inflight = None;
                self.health = health.clone();
                vec![
                    Action::PublishStatus(health),
                    Action::Subscribe(self.tasks_topic.clone()),
                    Action::Subscribe(self.scheduler_topic.clone()),
                ]
            }
            Input::Message { topic, payload } if topic == self.tasks_topic => vec![Action::TakeTask(payload)],
            Input::Message { topic, payload } if topic == self.scheduler_topic => self.scheduler_status(&payload),
            Input::Message { .. } => vec![],
            Input::Queued(seq) => {
                self.expect.push_back(seq);
                if let Some(seq) = seq {
                    self.inflight = Some((seq, None));
                }
                vec![]
            }
            Input::Sent(pkid) => {
                if let Some(Some(seq)) = self.expect.pop_front()
                    && let Some((s, id)) = self.inflight.as_mut()
                    && *s == seq
                {
                    *id = Some(pkid);
                }
                vec![]
            }
            Input::Acked(pkid) => match self.inflight {
                Some((seq, Some(sent))) if sent == pkid => {
                    self.inflight = None;
                    vec![Action::Unspool(seq)]
                }
                _ => vec![],
            },
            Input::Lost(error) => {
                if self.connected {
                    tracing::warn!(device = self.device, error, "lost the broker; reconnecting");
                } else if self.backoff == FIRST_BACKOFF {
                    // Once per run of failures: a wrong login is refused on every try.
                    tracing::warn!(device = self.device, error, "cannot connect to the broker; retrying");
                } else {
                    tracing::debug!(device = self.device, error, "broker unreachable");
                }
                self.connected = false;
                self.expect.clear();
                self.inflight = None;
                let wait = self.backoff;
                self.backoff = (self.backoff * 2).min(self.max_backoff);
                vec![Action::Backoff(wait)]
            }
            Input::Health(h) if self.connected && h != self.health => {
                let detail = h.detail.as_deref().unwrap_or("");
                tracing::info!(device = self.device, state = %h.state, detail, "health changed");
                self.health = h.clone();
                vec![Action::PublishStatus(h)]
            }
            Input::Health(_) => vec![],
        }
    }

    /// The scheduler's retained status: the spool's gate, and a rebirth to announce to.
    fn scheduler_status(&mut self, payload: &[u8]) -> Vec<Action> {
        let s = match decode::<SchedulerStatus>(payload) {
            Ok(s) => s,
            Err(e) => return vec![Action::Malformed(e.to_string())],
        };
        let online = s.state == DeviceState::Online;
        if online != self.scheduler_online {
            tracing::info!(device = self.device, online, "the scheduler's status");
        }
        self.scheduler_online = online;
        if !online || self.scheduler_boot.as_deref() == Some(&s.boot_id) {
            return vec![];
        }
        let reborn = self.scheduler_boot.replace(s.boot_id).is_some();
        if reborn {
            tracing::info!(device = self.device, "the scheduler was reborn; announcing again");
            return vec![Action::PublishStatus(self.health.clone())];
        }
        vec![]
    }
}

/// The MQTT session: connect, birth, subscribe, send the spool in order, take tasks in. It carries
/// out what [`SessionState`] decides.
async fn mqtt(
    cfg: &Config,
    dev: &DeviceConfig,
    shared: Arc<Shared>,
    tasks: mpsc::Sender<DeviceTask>,
    tls: Arc<rustls::ClientConfig>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let boot_id = shared.boot_id.clone();
    let broker = cfg.mqtt.endpoint().map_err(anyhow::Error::msg)?;
    let topics = shared.topics.clone();
    let clock = shared.clone();
    let status = |health: &Health| DeviceStatus {
        v: FLEET_VERSION,
        state: health.state,
        boot_id: boot_id.clone(),
        kind: dev.kind,
        capabilities: vec![capability(dev.kind).to_owned()],
        version: env!("CARGO_PKG_VERSION").to_owned(),
        at_ms: clock.now_ms(),
        detail: health.detail.clone(),
    };
    let will = status(&Health { state: DeviceState::Offline, detail: Some("the agent's connection was lost".into()) });
    // The prefix is in the client id so farms (or tests) sharing a broker do not take over each
    // other's sessions: a broker drops the older connection of a client id it sees twice.
    let client_id = format!("{}-edge-{}", cfg.mqtt.prefix.replace('/', "_"), dev.id);
    let mut opts = MqttOptions::new(client_id, broker.host, broker.port);
    if broker.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls)));
    }
    opts.set_keep_alive(Duration::from_secs(cfg.mqtt.keepalive_s))
        .set_clean_session(true)
        .set_max_packet_size(256 * 1024, 256 * 1024)
        .set_last_will(LastWill::new(topics.status(&dev.id), serde_json::to_vec(&will)?, QoS::AtLeastOnce, true));
    // The login in `[mqtt]`, else one in the URL (`mqtt://user:password@host`).
    let url_login = broker.login.as_ref().map(|(u, p)| (u.clone(), p.expose().to_owned()));
    let login = cfg.mqtt.username.clone().map(|u| (u, cfg.mqtt.password.clone().unwrap_or_default())).or(url_login);
    if let Some((user, password)) = login {
        opts.set_credentials(user, password);
    }
    let (client, mut events) = AsyncClient::new(opts, 64);
    let mut health = shared.health.subscribe();
    let mut state = SessionState::new(&dev.id, &topics, Duration::from_millis(cfg.mqtt.reconnect_max_ms));
    let metrics = shared.metrics.clone();
    'session: loop {
        let input = tokio::select! {
            () = stop.cancelled() => break,
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => Some(Input::Connected(health.borrow_and_update().clone())),
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    Some(Input::Message { topic: p.topic, payload: p.payload.to_vec() })
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Some(Input::Sent(pkid)),
                Ok(Event::Incoming(Packet::PubAck(ack))) => Some(Input::Acked(ack.pkid)),
                Ok(_) => None,
                Err(e) => Some(Input::Lost(e.to_string())),
            },
            // Something was spooled: only a look at whether it may go.
            () = shared.wake.notified(), if state.connected() => None,
            Ok(()) = health.changed(), if state.connected() => Some(Input::Health(health.borrow_and_update().clone())),
        };
        if let Some(Input::Connected(_)) = input {
            metrics.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let actions = input.map(|i| state.handle(i)).unwrap_or_default();
        metrics.connected.store(state.connected(), std::sync::atomic::Ordering::Relaxed);
        for action in actions {
            match action {
                Action::PublishStatus(h) => {
                    let payload = serde_json::to_vec(&status(&h)).unwrap_or_default();
                    if client.try_publish(topics.status(&dev.id), QoS::AtLeastOnce, true, payload).is_ok() {
                        state.handle(Input::Queued(None));
                    }
                }
                Action::Subscribe(topic) => {
                    let _ = client.try_subscribe(topic, QoS::AtLeastOnce);
                }
                Action::TakeTask(payload) => take_task(&shared, &tasks, &payload).await,
                Action::Unspool(seq) => {
                    let removed = shared.spool.lock().map_err(|_| "poisoned".to_owned()).and_then(|mut s| {
                        s.remove(seq).map_err(|e| e.to_string())?;
                        metrics.spool(s.len(), s.dropped());
                        Ok(())
                    });
                    if let Err(e) = removed {
                        tracing::error!(device = dev.id, error = e, "could not remove a sent message from the spool");
                    }
                }
                Action::Malformed(error) => {
                    metrics.malformed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(device = dev.id, error, "dropped a scheduler status");
                }
                Action::Backoff(wait) => tokio::select! {
                    () = stop.cancelled() => break 'session,
                    () = tokio::time::sleep(wait) => {}
                },
            }
        }
        if state.may_send() {
            let front = shared.spool.lock().ok().and_then(|mut s| s.front().ok().flatten());
            if let Some(entry) = front
                && client.try_publish(entry.topic, QoS::AtLeastOnce, false, entry.payload).is_ok()
            {
                state.handle(Input::Queued(Some(entry.seq)));
            }
        }
    }
    // A clean goodbye: offline (retained) so the scheduler need not wait for the keepalive.
    if state.connected() {
        let bye = status(&Health { state: DeviceState::Offline, detail: Some("the agent stopped".into()) });
        let _ = client.try_publish(topics.status(&dev.id), QoS::AtLeastOnce, true, serde_json::to_vec(&bye)?);
        let _ = client.try_disconnect();
        // Until the broker closes the connection after the DISCONNECT: closing it first, with
        // the broker's last acks still unread, would reset it, which brokers log as an error.
        let drain = async { while events.poll().await.is_ok() {} };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    }
    metrics.connected.store(false, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// A task from the broker: to the executor, or rejected (with a report when it names its id).
/// One without the scheduler's proof is rejected before anything else is looked at, and not
/// journalled: the scheduler's own task of that id, when it comes, still runs.
async fn take_task(shared: &Shared, tasks: &mpsc::Sender<DeviceTask>, payload: &[u8]) {
    let task = match decode::<DeviceTask>(payload) {
        Ok(t) => t,
        Err(e) => {
            let id = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| v.get("task_id").and_then(|t| t.as_str()).map(str::to_owned))
                .filter(|id| valid_id(id));
            match id {
                Some(task_id) => {
                    tracing::warn!(device = shared.id, task = task_id, error = %e, "rejected a malformed task");
                    shared
                        .send_report(TaskReport {
                            v: TASK_REPORT_VERSION,
                            task_id,
                            state: ReportState::Rejected,
                            at_ms: shared.now_ms(),
                            detail: Some(e.to_string()),
                            reason: Some(RejectReason::Malformed),
                            output_asset: None,
                        })
                        .await;
                }
                None => {
                    shared.metrics.malformed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(device = shared.id, error = %e, "dropped a task payload with no usable task_id");
                }
            }
            return;
        }
    };
    if !task.proven(&shared.id, &shared.key) {
        shared.metrics.unproven.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let why = if task.mac.is_some() { "its proof does not match" } else { "it carries no proof" };
        tracing::warn!(device = shared.id, task = task.task_id, why, "rejected a task the scheduler did not send");
        shared
            .send_report(TaskReport {
                v: TASK_REPORT_VERSION,
                task_id: task.task_id,
                state: ReportState::Rejected,
                at_ms: shared.now_ms(),
                detail: Some(format!("not run: {why} that the scheduler sent it to this device")),
                reason: Some(RejectReason::Unproven),
                output_asset: None,
            })
            .await;
        return;
    }
    // Proven, so its time is the scheduler's: from now on the agent goes by that clock.
    if let Some(sent) = task.sent_ms {
        let offset = sent.saturating_sub(now_ms());
        let before = shared.clock_offset_ms.swap(offset, std::sync::atomic::Ordering::Relaxed);
        if (offset - before).abs() > 60_000 {
            tracing::info!(device = shared.id, offset_ms = offset, "going by the scheduler's clock");
        }
    }
    if let Err(mpsc::error::TrySendError::Full(t)) = tasks.try_send(task) {
        // The scheduler sends again what it does not hear accepted.
        tracing::warn!(device = shared.id, task = t.task_id, "256 tasks wait already; this one is left for a resend");
    }
}

/// Carries out tasks one at a time, journalled.
struct Executor {
    shared: Arc<Shared>,
    journal: Journal,
    driver: Arc<tokio::sync::Mutex<Driver>>,
    http: Http,
    assets_dir: PathBuf,
    work_dir: PathBuf,
}

impl Executor {
    async fn record(
        &self,
        task: &DeviceTask,
        state: ReportState,
        detail: Option<String>,
        output_asset: Option<String>,
    ) -> bool {
        let at_ms = self.shared.now_ms();
        self.keep(Record { task: task.clone(), state, detail, reason: None, output_asset, at_ms }).await
    }

    /// Records and reports a task refused without running it, and why.
    async fn reject(&self, task: &DeviceTask, reason: RejectReason, detail: String) -> bool {
        let state = ReportState::Rejected;
        let at_ms = self.shared.now_ms();
        self.keep(Record {
            task: task.clone(),
            state,
            detail: Some(detail),
            reason: Some(reason),
            output_asset: None,
            at_ms,
        })
        .await
    }

    /// Journals a task's step (synced on a blocking thread), then reports it; `false` when the
    /// journal could not be written.
    async fn keep(&self, r: Record) -> bool {
        let journal = self.journal.clone();
        let task = r.task.task_id.clone();
        let written = tokio::task::spawn_blocking(move || journal.put(&r).map(|()| r))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match written {
            Ok(r) => {
                if r.state.is_terminal() {
                    self.shared.metrics.task_ended(r.state);
                }
                self.shared.report(&r).await;
                true
            }
            Err(e) => {
                // Without the journal a redelivery could run the task twice: refuse to go on.
                tracing::error!(device = self.shared.id, task, error = %e, "could not write the task journal");
                false
            }
        }
    }

    async fn run(self, mut rx: mpsc::Receiver<DeviceTask>, stop: CancellationToken) {
        // What a previous run left: a task cut off mid-way is not run again; one only accepted is.
        let mut backlog: VecDeque<DeviceTask> = VecDeque::new();
        match self.journal.unfinished() {
            Ok(records) => {
                for r in records {
                    if r.state == ReportState::Running {
                        self.record(
                            &r.task,
                            ReportState::Failed,
                            Some(
                                "interrupted: the agent stopped while this ran; not run again (check the device)"
                                    .into(),
                            ),
                            None,
                        )
                        .await;
                    } else {
                        backlog.push_back(r.task);
                    }
                }
            }
            Err(e) => tracing::error!(device = self.shared.id, error = %e, "could not read the task journal"),
        }
        // Ended tasks are forgotten after a week, and past a count, while the agent runs for
        // months as well as at each start.
        let mut prune = tokio::time::interval(Duration::from_secs(3600));
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        prune.tick().await;
        loop {
            let (task, fresh) = match backlog.pop_front() {
                Some(t) => (t, false),
                None => tokio::select! {
                    () = stop.cancelled() => return,
                    _ = prune.tick() => {
                        self.prune().await;
                        continue;
                    }
                    t = rx.recv() => match t { Some(t) => (t, true), None => return },
                },
            };
            if fresh {
                match self.journal.get(&task.task_id) {
                    Ok(Some(r)) => {
                        // A redelivery: say again where it stands, do nothing else.
                        self.shared.report(&r).await;
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(device = self.shared.id, task = task.task_id, error = %e, "journal unreadable; not running");
                        continue;
                    }
                }
            }
            if task.kind.device_kind() != self.shared.kind {
                let why = format!("a {} cannot do a {} task", self.shared.kind, task.kind);
                self.reject(&task, RejectReason::WrongKind, why).await;
                continue;
            }
            // By the scheduler's clock: the Pi's may be anything after a boot without network.
            let late = self.shared.now_ms() - task.deadline_ms;
            if late > 0 {
                self.reject(&task, RejectReason::Deadline, format!("past its deadline by {late} ms; not run")).await;
                continue;
            }
            if let Some(Err(e)) = task.asset.as_ref().map(|a| self.http.on_scheduler(&a.url)) {
                self.reject(&task, RejectReason::Malformed, format!("asset.url: {e}")).await;
                continue;
            }
            if (fresh && !self.record(&task, ReportState::Accepted, None, None).await)
                || !self.record(&task, ReportState::Running, None, None).await
            {
                continue;
            }
            let ctx = TaskCtx {
                http: &self.http,
                assets_dir: &self.assets_dir,
                work_dir: &self.work_dir,
                // The drivers look at the agent's own clock.
                deadline_ms: task.deadline_ms.saturating_sub(self.shared.now_ms() - now_ms()),
            };
            let started = std::time::Instant::now();
            let result = self.driver.lock().await.run(&task, &ctx).await;
            self.shared.metrics.task_ran(started.elapsed());
            match result {
                Ok(done) => {
                    if self.shared.health.borrow().state == DeviceState::Degraded {
                        self.shared.set_health(DeviceState::Online, None);
                    }
                    self.record(&task, ReportState::Succeeded, Some(done.detail), done.output_asset).await;
                }
                Err(e) => {
                    if e.device_fault {
                        self.shared.set_health(DeviceState::Degraded, Some(e.message.clone()));
                    }
                    self.record(&task, ReportState::Failed, Some(e.message), None).await;
                }
            }
        }
    }
}

impl Executor {
    /// Forgets ended tasks past [`JOURNAL_KEEP_MS`] or [`JOURNAL_MAX_ENDED`], on a blocking thread.
    async fn prune(&self) {
        let journal = self.journal.clone();
        let before = now_ms() - JOURNAL_KEEP_MS;
        let pruned = tokio::task::spawn_blocking(move || journal.prune(before, JOURNAL_MAX_ENDED)).await;
        match pruned {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(device = self.shared.id, pruned = n, "forgot ended tasks"),
            Ok(Err(e)) => tracing::warn!(device = self.shared.id, error = %e, "could not prune the task journal"),
            Err(e) => tracing::warn!(device = self.shared.id, error = %e, "could not prune the task journal"),
        }
    }
}

/// How long the journal keeps an ended task: a redelivery comes within minutes (the scheduler
/// gives up on a task long before), so a week is ample.
const JOURNAL_KEEP_MS: i64 = 7 * 24 * 3600 * 1000;

/// The most ended tasks the journal keeps (the oldest go first), however many came in the week.
const JOURNAL_MAX_ENDED: usize = 10_000;

/// Sends the device's readings every interval, through the spool.
async fn telemetry(
    shared: Arc<Shared>,
    driver: Arc<tokio::sync::Mutex<Driver>>,
    mut seq: u64,
    interval_ms: u64,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A task under way holds the driver; its telemetry waits for the next tick.
        let readings = match driver.try_lock() {
            Ok(mut d) => Some(d.readings().await),
            Err(_) => None,
        };
        let mut values = match readings {
            Some(Ok(r)) => {
                shared.metrics.read(true);
                if shared.health.borrow().state == DeviceState::Degraded {
                    shared.set_health(DeviceState::Online, None);
                }
                r
            }
            Some(Err(e)) => {
                shared.metrics.read(false);
                if e.device_fault {
                    shared.set_health(DeviceState::Degraded, Some(e.message.clone()));
                }
                let mut r = std::collections::BTreeMap::new();
                r.insert("error".into(), serde_json::Value::from(e.message));
                r
            }
            None => {
                let mut r = std::collections::BTreeMap::new();
                r.insert("busy".into(), serde_json::Value::from(true));
                r
            }
        };
        let (depth, dropped) = shared.spool.lock().map(|s| (s.len(), s.dropped())).unwrap_or((0, 0));
        values.insert("spool_depth".into(), depth.into());
        let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        values.insert("malformed_dropped".into(), count(&shared.metrics.malformed).into());
        values.insert("unproven_rejected".into(), count(&shared.metrics.unproven).into());
        if let Some(t) = cpu_temp_c() {
            values.insert("cpu_temp_c".into(), t.into());
        }
        seq += 1;
        let t = Telemetry {
            v: FLEET_VERSION,
            boot_id: shared.boot_id.clone(),
            seq,
            at_ms: shared.now_ms(),
            readings: values,
            spool_dropped: dropped,
        };
        shared
            .spool(Kind::Telemetry, shared.topics.telemetry(&shared.id), serde_json::to_vec(&t).unwrap_or_default())
            .await;
    }
}

fn capability(kind: DeviceKind) -> &'static str {
    match kind {
        DeviceKind::Printer => "print",
        DeviceKind::Lights => "lights",
        DeviceKind::Camera => "capture",
        DeviceKind::Display => "display",
    }
}

/// A fresh boot id: 8 bytes from the kernel's random source (the clock where there is none).
fn boot_id() -> String {
    use std::io::Read;
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_err() {
        b = now_ms().to_le_bytes();
    }
    format!("{:016x}", u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONLINE: Health = Health { state: DeviceState::Online, detail: None };

    fn state() -> SessionState {
        SessionState::new("p1", &Topics::new("kiln"), Duration::from_millis(1000))
    }

    fn scheduler(state: DeviceState, boot: &str) -> Input {
        let s = SchedulerStatus { v: FLEET_VERSION, state, boot_id: boot.into(), at_ms: 1 };
        Input::Message { topic: "kiln/scheduler/status".into(), payload: serde_json::to_vec(&s).unwrap() }
    }

    /// What a connection does first: announce the device with `health` and subscribe.
    fn birth(health: Health) -> Vec<Action> {
        vec![
            Action::PublishStatus(health),
            Action::Subscribe("kiln/devices/p1/tasks".into()),
            Action::Subscribe("kiln/scheduler/status".into()),
        ]
    }

    fn degraded(why: &str) -> Health {
        Health { state: DeviceState::Degraded, detail: Some(why.into()) }
    }

    /// Runs `steps` in order: each input, the actions it must give, and whether the spool's front
    /// may go after it.
    fn run(s: &mut SessionState, steps: Vec<(Input, Vec<Action>, bool)>) {
        for (i, (input, want, may_send)) in steps.into_iter().enumerate() {
            let said = format!("{input:?}");
            assert_eq!(s.handle(input), want, "step {i}: {said}");
            assert_eq!(s.may_send(), may_send, "step {i}: {said}: may the spool's front go?");
        }
    }

    #[test]
    fn a_connection_announces_subscribes_and_opens_the_spool_only_when_the_scheduler_is_online() {
        let mut s = state();
        run(
            &mut s,
            vec![
                (Input::Connected(ONLINE), birth(ONLINE), false),
                (Input::Queued(None), vec![], false),
                (Input::Sent(1), vec![], false),
                (scheduler(DeviceState::Offline, "b1"), vec![], false),
                // The first birth heard: the status just published stands.
                (scheduler(DeviceState::Online, "b1"), vec![], true),
                (scheduler(DeviceState::Online, "b1"), vec![], true),
                (scheduler(DeviceState::Offline, "b1"), vec![], false),
                (scheduler(DeviceState::Online, "b1"), vec![], true),
                // Born again: the device announces itself again.
                (scheduler(DeviceState::Online, "b2"), vec![Action::PublishStatus(ONLINE)], true),
            ],
        );
    }

    #[test]
    fn the_spool_goes_one_message_at_a_time_and_each_leaves_when_the_broker_acks_it() {
        let mut s = state();
        s.handle(Input::Connected(ONLINE));
        s.handle(Input::Queued(None));
        s.handle(scheduler(DeviceState::Online, "b1"));
        run(
            &mut s,
            vec![
                (Input::Queued(Some(7)), vec![], false),
                // The status queued first is sent first, then the spooled message.
                (Input::Sent(1), vec![], false),
                (Input::Sent(2), vec![], false),
                (Input::Acked(1), vec![], false),
                (Input::Acked(9), vec![], false),
                (Input::Acked(2), vec![Action::Unspool(7)], true),
                (Input::Acked(2), vec![], true),
                (Input::Queued(Some(8)), vec![], false),
                (Input::Sent(3), vec![], false),
                (Input::Acked(3), vec![Action::Unspool(8)], true),
            ],
        );
    }

    #[test]
    fn a_message_in_flight_when_the_connection_breaks_goes_again_on_the_next() {
        let mut s = state();
        s.handle(Input::Connected(ONLINE));
        s.handle(scheduler(DeviceState::Online, "b1"));
        run(
            &mut s,
            vec![
                (Input::Queued(Some(7)), vec![], false),
                (Input::Sent(4), vec![], false),
                (Input::Lost("reset".into()), vec![Action::Backoff(Duration::from_millis(100))], false),
                // An ack from the old connection is not this one's.
                (Input::Acked(4), vec![], false),
                (Input::Connected(ONLINE), birth(ONLINE), false),
                // The gate opens again only once the scheduler is heard on this connection.
                (scheduler(DeviceState::Online, "b1"), vec![], true),
                (Input::Queued(Some(7)), vec![], false),
            ],
        );
    }

    #[test]
    fn reconnects_back_off_doubling_to_the_limit_and_start_over_once_connected() {
        let mut s = state();
        let waits: Vec<Action> = (0..6).flat_map(|_| s.handle(Input::Lost("refused".into()))).collect();
        let ms = |m| Action::Backoff(Duration::from_millis(m));
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        s.handle(Input::Connected(ONLINE));
        assert_eq!(s.handle(Input::Lost("reset".into())), [ms(100)]);
    }

    #[test]
    fn health_is_published_when_it_changes_while_connected() {
        let mut s = state();
        run(
            &mut s,
            vec![
                // Not connected: the next connection's birth carries the health then.
                (Input::Health(degraded("no answer")), vec![], false),
                (Input::Connected(degraded("no answer")), birth(degraded("no answer")), false),
                (Input::Health(degraded("no answer")), vec![], false),
                (Input::Health(ONLINE), vec![Action::PublishStatus(ONLINE)], false),
            ],
        );
        s.handle(scheduler(DeviceState::Online, "b1"));
        assert_eq!(s.handle(scheduler(DeviceState::Online, "b2")), [Action::PublishStatus(ONLINE)]);
    }

    #[test]
    fn tasks_go_to_the_executor_and_a_bad_scheduler_status_is_dropped() {
        let mut s = state();
        s.handle(Input::Connected(ONLINE));
        let task = Input::Message { topic: "kiln/devices/p1/tasks".into(), payload: b"{...}".to_vec() };
        assert_eq!(s.handle(task), [Action::TakeTask(b"{...}".to_vec())]);
        let other = Input::Message { topic: "kiln/devices/p2/tasks".into(), payload: b"{}".to_vec() };
        assert_eq!(s.handle(other), []);
        let bad = Input::Message { topic: "kiln/scheduler/status".into(), payload: b"not json".to_vec() };
        assert!(matches!(s.handle(bad)[..], [Action::Malformed(ref e)] if e.contains("malformed")));
        assert!(!s.may_send(), "a status that did not parse opens nothing");
    }
}
