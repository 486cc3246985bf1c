//! The fleet bridge: the scheduler's MQTT session with the edge agents (DESIGN.md, "Edge fleet").
//!
//! - It announces itself on `{p}/scheduler/status` (retained; its last will says offline) once
//!   it has subscribed, so agents re-announce when it is born again, and send their spools only
//!   while it is there to hear them. Its session is persistent (client id `kiln-scheduler-{prefix}`),
//!   so a broker that keeps sessions queues what arrives while the scheduler reconnects.
//! - It takes in every device's status, telemetry and task reports, with manual acks: a message
//!   is acknowledged only once the store has it, so a crash does not lose a report the agent has
//!   already dropped from its spool. Malformed or stale messages are dropped and counted
//!   ([`crate::metrics::FLEET_DROPPED`]); nothing from outside can stop the bridge.
//! - It sends queued tasks to devices that are not offline (QoS 1), sends again what is not
//!   accepted within `resend_after_seconds` (and at once when the device is born again), fails a
//!   task sent `max_sends` times without an answer, expires a task whose deadline passes before it
//!   is accepted, and times out one accepted but not ended by its deadline plus `run_grace_seconds`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kiln_protocol::fleet::{
    DeviceKind, DeviceState, DeviceStatus, DeviceTask as WireTask, FLEET_VERSION, RejectReason, ReportState,
    SchedulerStatus, TaskReport, Telemetry, Topic, Topics, decode,
};
use kiln_protocol::now_ms;
use kiln_protocol::wire::MessageKey;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::FleetConfig;
use crate::scheduler::Scheduler;
use crate::store::fleet::{Device, DeviceTask, TaskChange, TaskMove, TaskState};

/// Runs the bridge until `stop`.
pub async fn run(sched: Arc<Scheduler>, cfg: FleetConfig, stop: CancellationToken) {
    let Some(url) = cfg.mqtt_url.clone() else { return };
    let endpoint = match kiln_protocol::fleet::MqttEndpoint::parse(url.expose()) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = e, "scheduler.fleet.mqtt_url: no fleet bridge");
            return;
        }
    };
    let topics = Topics::new(&cfg.prefix);
    let boot_id = format!("{:016x}", crate::auth::os_random::<8>().map(u64::from_le_bytes).unwrap_or(now_ms() as u64));
    let status = |state| SchedulerStatus { v: FLEET_VERSION, state, boot_id: boot_id.clone(), at_ms: now_ms() };
    let will = serde_json::to_vec(&status(DeviceState::Offline)).unwrap_or_default();
    let client_id = format!("kiln-scheduler-{}", cfg.prefix.replace('/', "_"));
    let mut opts = MqttOptions::new(client_id, endpoint.host, endpoint.port);
    if endpoint.tls {
        let tls = rumqttc::TlsConfiguration::Rustls(kiln_common::tls::client_config());
        opts.set_transport(rumqttc::Transport::tls_with_config(tls));
    }
    if let Some((user, password)) = endpoint.login {
        opts.set_credentials(user, password.expose());
    }
    opts.set_keep_alive(Duration::from_secs(cfg.keepalive_seconds))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(256 * 1024, 256 * 1024)
        .set_last_will(LastWill::new(topics.scheduler_status(), will, QoS::AtLeastOnce, true));
    let (client, mut events) = AsyncClient::new(opts, 1024);
    let connected = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<Publish>(4096);
    let handler = tokio::spawn(handle_incoming(sched.clone(), topics.clone(), client.clone(), rx, stop.clone()));
    let sender = tokio::spawn(send_tasks(
        sched.clone(),
        cfg.clone(),
        topics.clone(),
        client.clone(),
        connected.clone(),
        stop.clone(),
    ));
    let sweeper = tokio::spawn(sweep(sched.clone(), cfg.clone(), stop.clone()));
    tracing::info!(broker = %url, prefix = cfg.prefix, "fleet bridge starting");
    let mut backoff = Duration::from_millis(100);
    let mut told = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    tracing::info!(broker = %url, "fleet bridge connected");
                    backoff = Duration::from_millis(100);
                    told = false;
                    connected.store(true, Ordering::SeqCst);
                    // Subscribed first: a broker handles a client's packets in order, so agents that
                    // hear "online" are heard.
                    for filter in topics.scheduler_filters() {
                        let _ = client.try_subscribe(filter, QoS::AtLeastOnce);
                    }
                    let birth = serde_json::to_vec(&status(DeviceState::Online)).unwrap_or_default();
                    let _ = client.try_publish(topics.scheduler_status(), QoS::AtLeastOnce, true, birth);
                    sched.fleet_wake.notify_one();
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if connected.swap(false, Ordering::SeqCst) {
                        tracing::warn!(error = %e, "fleet bridge lost the broker; reconnecting");
                    } else if !told {
                        // Once per run of failures: a wrong login is refused on every try.
                        tracing::warn!(broker = %url, error = %e, "fleet bridge cannot connect to the broker; retrying");
                        told = true;
                    } else {
                        tracing::debug!(error = %e, "fleet broker unreachable");
                    }
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            },
        }
    }
    if connected.load(Ordering::SeqCst) {
        let bye = serde_json::to_vec(&status(DeviceState::Offline)).unwrap_or_default();
        let _ = client.try_publish(topics.scheduler_status(), QoS::AtLeastOnce, true, bye);
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(ev) = events.poll().await {
                if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
    drop(tx);
    let _ = handler.await;
    let _ = sender.await;
    let _ = sweeper.await;
}

/// Takes in what the agents say, one message at a time, acking each once it is stored.
async fn handle_incoming(
    sched: Arc<Scheduler>,
    topics: Topics,
    client: AsyncClient,
    mut rx: mpsc::Receiver<Publish>,
    stop: CancellationToken,
) {
    while let Some(p) = rx.recv().await {
        let mut wait = Duration::from_millis(100);
        loop {
            match handle(&sched, &topics, &p).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(topic = p.topic, error = %e, "could not store a fleet message; trying again");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
        let _ = client.ack(&p).await;
    }
}

fn dropped(sched: &Scheduler, topic: &str, reason: &str) {
    sched.metrics.fleet_dropped.with_label_values(&[topic, reason]).inc();
}

/// A fleet message, read: what it says.
#[derive(Debug, Clone, PartialEq)]
enum Heard {
    /// A retained message being cleared: nothing to do.
    Cleared,
    /// A device's status.
    Status(String, DeviceStatus),
    /// A device's telemetry.
    Telemetry(String, Telemetry),
    /// A device's report on one of its tasks.
    Report(String, TaskReport),
}

/// Why a message is dropped: the topic kind and reason [`crate::metrics::FLEET_DROPPED`] counts
/// it under, and what to log, where there is something to say.
#[derive(Debug, Clone, PartialEq)]
struct Dropped {
    topic: &'static str,
    reason: &'static str,
    error: Option<String>,
}

impl Dropped {
    fn new(topic: &'static str, reason: &'static str) -> Dropped {
        Dropped { topic, reason, error: None }
    }

    fn malformed(topic: &'static str, e: impl std::fmt::Display) -> Dropped {
        Dropped { topic, reason: "malformed", error: Some(e.to_string()) }
    }
}

/// Reads a message from the agents: its topic and payload, decoded and checked.
fn read(topics: &Topics, topic: &str, payload: &[u8]) -> Result<Heard, Dropped> {
    if payload.is_empty() {
        return Ok(Heard::Cleared);
    }
    match topics.parse(topic) {
        Some(Topic::Status(id)) => {
            decode(payload).map(|s| Heard::Status(id, s)).map_err(|e| Dropped::malformed("status", e))
        }
        Some(Topic::Telemetry(id)) => {
            decode(payload).map(|t| Heard::Telemetry(id, t)).map_err(|e| Dropped::malformed("telemetry", e))
        }
        Some(Topic::TaskReport(id, task_id)) => match decode::<TaskReport>(payload) {
            Ok(r) if r.task_id == task_id => Ok(Heard::Report(id, r)),
            Ok(_) => Err(Dropped::new("report", "task_id_mismatch")),
            Err(e) => Err(Dropped::malformed("report", e)),
        },
        Some(Topic::Tasks(_) | Topic::SchedulerStatus) | None => Err(Dropped::new("other", "unexpected_topic")),
    }
}

/// Whether a status says the device is back (a new start of its agent, or online again after
/// being offline): its unanswered tasks then go again at once.
fn is_back(before: Option<&Device>, status: &DeviceStatus) -> bool {
    status.state != DeviceState::Offline
        && before.is_none_or(|b| b.boot_id != status.boot_id || b.state == DeviceState::Offline.as_str())
}

/// Why telemetry the store did not keep is dropped: `stored` is its device as stored.
fn telemetry_unkept(stored: Option<&Device>, seq: i64) -> &'static str {
    match stored {
        None => "unknown_device",
        // A repeat (sent again after a broken connection) is expected.
        Some(d) if d.telemetry_seq == seq => "duplicate",
        // One older than what is stored arrived out of order.
        Some(_) => "stale",
    }
}

/// Where device `device`'s report moves its task, whose device and state are `current` as stored.
/// A rejection is the device's refusal to run it: past its deadline it expires, else it fails.
fn report_move(
    device: &str,
    current: Option<(&str, TaskState)>,
    r: TaskReport,
) -> Result<(TaskState, TaskChange), Dropped> {
    match current {
        Some((owner, _)) if owner == device => {}
        _ => return Err(Dropped::new("report", "unknown_task")),
    }
    if r.state == ReportState::Rejected && r.reason == Some(RejectReason::Unproven) {
        // The device refused a task of this id that someone else published unsigned: what the
        // scheduler sent is not touched.
        return Err(Dropped {
            topic: "report",
            reason: "unproven_task",
            error: Some(format!(
                "device {device} refused a task without the scheduler's proof: someone else publishes on its tasks topic"
            )),
        });
    }
    let (to, detail) = match r.state {
        ReportState::Accepted => (TaskState::Accepted, r.detail),
        ReportState::Running => (TaskState::Running, r.detail),
        ReportState::Succeeded => (TaskState::Succeeded, r.detail),
        ReportState::Failed => (TaskState::Failed, r.detail),
        ReportState::Rejected => {
            let to = if r.reason == Some(RejectReason::Deadline) { TaskState::Expired } else { TaskState::Failed };
            (to, Some(format!("rejected by the device: {}", r.detail.unwrap_or_default())))
        }
    };
    Ok((to, TaskChange { detail, output_asset: r.output_asset, next_send_ms: None }))
}

/// Why a report that moved nothing is dropped: the same state again is a repeat (a redelivered
/// task, a resent report); an earlier one arrived out of order.
fn unmoved(current: TaskState, to: TaskState) -> &'static str {
    if current == to { "duplicate" } else { "stale" }
}

/// One message: Ok once it is stored or dropped (counted); Err only when the store failed.
async fn handle(sched: &Arc<Scheduler>, topics: &Topics, p: &Publish) -> Result<(), crate::store::StoreError> {
    let now = now_ms();
    let heard = match read(topics, &p.topic, &p.payload) {
        Ok(h) => h,
        Err(d) => {
            if let Some(error) = &d.error {
                tracing::warn!(topic = p.topic, error, "dropped a malformed fleet message");
            }
            dropped(sched, d.topic, d.reason);
            return Ok(());
        }
    };
    match heard {
        Heard::Cleared => {}
        Heard::Status(id, s) => {
            let state = s.state;
            let before = sched.store.announce(&id, s.clone(), now).await?;
            if before.as_ref().is_none_or(|b| b.state != state.as_str()) {
                tracing::info!(device = id, state = %state, "device state");
                sched.order_waits.ended(&format!("device:{id}"));
                sched.order_waits.ended(&format!("kind:{}", s.kind));
                if state == DeviceState::Offline {
                    went_offline(sched, &id).await?;
                }
            }
            if is_back(before.as_ref(), &s) {
                let n = sched.store.resend_now(&id).await?;
                if n > 0 {
                    tracing::info!(device = id, tasks = n, "device is back; sending its unanswered tasks again");
                }
                sched.fleet_wake.notify_one();
            }
            sched.device_changed(&id);
        }
        Heard::Telemetry(id, t) => {
            let seq = i64::try_from(t.seq).unwrap_or(i64::MAX);
            if !sched.store.telemetry(&id, t, now).await? {
                dropped(sched, "telemetry", telemetry_unkept(sched.store.device(&id).await?.as_ref(), seq));
            } else {
                // An order waiting for this device to be ready (a printer refilled) looks again.
                sched.order_waits.ended(&format!("device:{id}"));
                sched.device_changed(&id);
            }
        }
        Heard::Report(id, r) => {
            let task_id = r.task_id.clone();
            let stored = sched.store.task_row(&task_id).await?;
            let current = stored.as_ref().map(|t| (t.device_id.as_str(), t.state));
            match report_move(&id, current, r) {
                Err(d) => {
                    if let Some(error) = &d.error {
                        tracing::warn!(device = id, task = task_id, error, "dropped a task report");
                    }
                    dropped(sched, d.topic, d.reason)
                }
                Ok((to, change)) => match sched.store.move_task(&task_id, to, change, now).await? {
                    Some(m) => {
                        observe(sched, &m);
                        sched.device_changed(&id);
                    }
                    None => dropped(sched, "report", unmoved(current.map_or(to, |(_, s)| s), to)),
                },
            }
        }
    }
    Ok(())
}

/// A device gone offline while tasks waited on it: one incident per task, however often the
/// device comes and goes. The tasks go again when it is back, until their deadlines.
async fn went_offline(sched: &Arc<Scheduler>, id: &str) -> Result<(), crate::store::StoreError> {
    for t in sched.store.live_tasks().await?.into_iter().filter(|t| t.device_id == id) {
        let summary = format!(
            "device {id} went offline while task {} ({}, {}) waited on it; it goes again when the device is back, until its deadline at {}",
            t.id,
            t.kind,
            t.state,
            crate::time::rfc3339(t.deadline_ms)
        );
        sched.raise_incident("device_offline", &t.id, &format!("device-offline:{}", t.id), &summary).await?;
    }
    Ok(())
}

/// Counts a task that ended.
fn observe(sched: &Arc<Scheduler>, m: &TaskMove) {
    let t = &m.task;
    tracing::info!(task = t.id, device = t.device_id, from = %m.from, to = %t.state, "device task");
    if t.state.is_terminal() {
        sched.order_waits.ended(&t.id);
        // A task that failed needs the operator, unless an order sent it (the order retries,
        // and raises its own incident when it cannot go on).
        if t.state != TaskState::Succeeded && !t.created_by.starts_with("order ") {
            let (s, t) = (sched.clone(), t.clone());
            tokio::spawn(async move {
                let summary = format!(
                    "device task {} ({} on {}) {}: {}",
                    t.id,
                    t.kind,
                    t.device_id,
                    t.state,
                    t.detail.as_deref().unwrap_or("no detail")
                );
                let (kind, cause) = (format!("task_{}", t.state), format!("task:{}", t.id));
                if let Err(e) = s.raise_incident(&kind, &t.id, &cause, &summary).await {
                    tracing::error!(task = t.id, error = %e, "cannot raise an incident");
                }
            });
        }
        let (kind, outcome) = (t.kind.as_str(), t.state.as_str());
        sched.metrics.device_tasks.with_label_values(&[kind, outcome]).inc();
        let secs = (t.updated_ms - t.created_ms).max(0) as f64 / 1000.0;
        sched.metrics.device_task_seconds.with_label_values(&[kind, outcome]).observe(secs);
    }
}

/// The task as the agent gets it, stamped with the time it is sent and signed with the key of
/// the token that serves its device.
pub fn wire_task(t: &DeviceTask, key: &MessageKey) -> WireTask {
    let mut wire = WireTask {
        v: FLEET_VERSION,
        task_id: t.id.clone(),
        kind: t.kind,
        asset: t
            .asset
            .as_ref()
            .map(|h| kiln_protocol::fleet::AssetRef { hash: h.clone(), url: format!("/v1/assets/{h}") }),
        params: t.params.clone(),
        deadline_ms: t.deadline_ms,
        sent_ms: Some(now_ms()),
        mac: None,
    };
    wire.sign(&t.device_id, key);
    wire
}

/// Publishes due tasks while connected: when woken (a new task, a device back) or every 500 ms.
async fn send_tasks(
    sched: Arc<Scheduler>,
    cfg: FleetConfig,
    topics: Topics,
    client: AsyncClient,
    connected: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let resend = i64::try_from(cfg.resend_after_seconds * 1000).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = sched.fleet_wake.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if !connected.load(Ordering::SeqCst) {
            continue;
        }
        let due = match sched.store.due_tasks(now_ms(), 200).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the due device tasks");
                continue;
            }
        };
        for t in due {
            if t.sends >= i64::from(cfg.max_sends) {
                continue; // the sweep fails it
            }
            let Some((_, key)) = sched.device_key(&t.device_id).await else {
                // Unsigned, the agent would refuse it: say why here, where the operator looks.
                let detail = format!(
                    "no device token serves device {:?}, so the task cannot be signed; \
                     `kiln device add NAME --devices {}` makes one",
                    t.device_id, t.device_id
                );
                tracing::warn!(task = t.id, device = t.device_id, "{detail}");
                let change = TaskChange { detail: Some(detail), ..TaskChange::default() };
                match sched.store.move_task(&t.id, TaskState::Failed, change, now_ms()).await {
                    Ok(Some(m)) => observe(&sched, &m),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(task = t.id, error = %e, "could not fail an unsignable task"),
                }
                continue;
            };
            let payload = serde_json::to_vec(&wire_task(&t, &key)).unwrap_or_default();
            if client.publish(topics.tasks(&t.device_id), QoS::AtLeastOnce, false, payload).await.is_err() {
                break;
            }
            let now = now_ms();
            let detail = Some(format!("send {}", t.sends + 1));
            let change = TaskChange { detail, output_asset: None, next_send_ms: Some(now + resend) };
            match sched.store.move_task(&t.id, TaskState::Sent, change, now).await {
                Ok(Some(m)) => observe(&sched, &m),
                Ok(None) => {}
                Err(e) => tracing::warn!(task = t.id, error = %e, "could not mark a task sent; it goes again"),
            }
        }
    }
}

/// Once a second: ends tasks past their time, and updates the device gauges.
async fn sweep(sched: Arc<Scheduler>, cfg: FleetConfig, stop: CancellationToken) {
    let grace = i64::try_from(cfg.run_grace_seconds * 1000).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let now = now_ms();
        if let Ok(live) = sched.store.live_tasks().await {
            for t in live {
                let end = match t.state {
                    TaskState::Queued | TaskState::Sent if now > t.deadline_ms => {
                        Some((TaskState::Expired, "its deadline passed before the device accepted it".to_owned()))
                    }
                    TaskState::Sent if t.sends >= i64::from(cfg.max_sends) && now >= t.next_send_ms => {
                        Some((TaskState::Failed, format!("sent {} times without an answer from the device", t.sends)))
                    }
                    TaskState::Accepted | TaskState::Running if now > t.deadline_ms.saturating_add(grace) => {
                        Some((TaskState::TimedOut, format!("not ended {} s past its deadline", cfg.run_grace_seconds)))
                    }
                    _ => None,
                };
                if let Some((to, detail)) = end {
                    let change = TaskChange { detail: Some(detail), ..TaskChange::default() };
                    if let Ok(Some(m)) = sched.store.move_task(&t.id, to, change, now).await {
                        observe(&sched, &m);
                    }
                }
            }
        }
        if let Ok(devices) = sched.store.devices().await {
            sched.metrics.devices.reset();
            for kind in DeviceKind::ALL {
                for state in DeviceState::ALL {
                    sched.metrics.devices.with_label_values(&[kind.as_str(), state.as_str()]).set(0);
                }
            }
            for d in &devices {
                sched.metrics.devices.with_label_values(&[d.kind.as_str(), d.state.as_str()]).inc();
                if let Some(at) = d.telemetry_ms {
                    let age = (now - at).max(0) as f64 / 1000.0;
                    sched.metrics.device_telemetry_age.with_label_values(&[d.id.as_str()]).set(age);
                }
                sched.metrics.device_spool_dropped.with_label_values(&[d.id.as_str()]).set(d.spool_dropped);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: DeviceState, boot: &str) -> DeviceStatus {
        DeviceStatus {
            v: FLEET_VERSION,
            state,
            boot_id: boot.into(),
            kind: DeviceKind::Printer,
            capabilities: vec!["print".into()],
            version: "1".into(),
            at_ms: 1,
            detail: None,
        }
    }

    fn device(state: &str, boot: &str, telemetry_seq: i64) -> Device {
        Device {
            id: "p1".into(),
            kind: "printer".into(),
            state: state.into(),
            detail: None,
            boot_id: boot.into(),
            version: "1".into(),
            capabilities: vec![],
            status_ms: 1,
            last_seen_ms: 1,
            telemetry: None,
            telemetry_seq,
            telemetry_ms: None,
            spool_dropped: 0,
        }
    }

    fn report(state: ReportState, detail: Option<&str>, reason: Option<RejectReason>) -> TaskReport {
        TaskReport {
            v: kiln_protocol::fleet::TASK_REPORT_VERSION,
            task_id: "t1".into(),
            state,
            at_ms: 5,
            detail: detail.map(str::to_owned),
            reason,
            output_asset: None,
        }
    }

    #[test]
    fn each_message_is_read_by_its_topic_or_dropped_with_the_reason_it_is_counted_under() {
        let topics = Topics::new("kiln");
        let st = status(DeviceState::Online, "b1");
        let r = report(ReportState::Accepted, None, None);
        // A topic, a payload, and what is heard (or the topic kind and reason it is dropped under).
        type Case = (&'static str, Vec<u8>, Result<Heard, (&'static str, &'static str)>);
        let cases: Vec<Case> = vec![
            ("kiln/devices/p1/status", json(&st), Ok(Heard::Status("p1".into(), st.clone()))),
            ("kiln/devices/p1/status", vec![], Ok(Heard::Cleared)),
            ("kiln/devices/p1/status", b"{".to_vec(), Err(("status", "malformed"))),
            ("kiln/devices/p1/telemetry", b"{\"v\":1}".to_vec(), Err(("telemetry", "malformed"))),
            ("kiln/devices/p1/tasks/t1", json(&r), Ok(Heard::Report("p1".into(), r.clone()))),
            ("kiln/devices/p1/tasks/t2", json(&r), Err(("report", "task_id_mismatch"))),
            ("kiln/devices/p1/tasks/t1", b"[]".to_vec(), Err(("report", "malformed"))),
            ("kiln/devices/p1/tasks", json(&r), Err(("other", "unexpected_topic"))),
            ("kiln/scheduler/status", b"{}".to_vec(), Err(("other", "unexpected_topic"))),
            ("other/devices/p1/status", json(&st), Err(("other", "unexpected_topic"))),
        ];
        for (topic, payload, want) in cases {
            let got = read(&topics, topic, &payload).map_err(|d| (d.topic, d.reason));
            assert_eq!(got, want, "{topic} {}", String::from_utf8_lossy(&payload));
        }
    }

    fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    #[test]
    fn a_device_is_back_when_its_agent_restarted_or_it_was_offline_and_says_it_is_not() {
        let cases = [
            (None, DeviceState::Online, true),
            (None, DeviceState::Offline, false),
            (Some(device("online", "b1", 0)), DeviceState::Online, false),
            (Some(device("online", "b1", 0)), DeviceState::Degraded, false),
            (Some(device("offline", "b1", 0)), DeviceState::Online, true),
            (Some(device("offline", "b1", 0)), DeviceState::Degraded, true),
            (Some(device("online", "b0", 0)), DeviceState::Online, true),
            (Some(device("online", "b0", 0)), DeviceState::Offline, false),
        ];
        for (before, state, back) in cases {
            assert_eq!(is_back(before.as_ref(), &status(state, "b1")), back, "{before:?} then {state}");
        }
    }

    #[test]
    fn telemetry_not_kept_is_a_repeat_an_old_one_or_from_a_stranger() {
        assert_eq!(telemetry_unkept(None, 5), "unknown_device");
        assert_eq!(telemetry_unkept(Some(&device("online", "b", 5)), 5), "duplicate");
        assert_eq!(telemetry_unkept(Some(&device("online", "b", 9)), 5), "stale");
    }

    #[test]
    fn a_report_moves_its_task_and_a_rejection_past_its_deadline_expires_it() {
        let ours = Some(("p1", TaskState::Sent));
        let change = |detail: Option<&str>| TaskChange { detail: detail.map(str::to_owned), ..TaskChange::default() };
        let cases = [
            (report(ReportState::Accepted, None, None), TaskState::Accepted, change(None)),
            (report(ReportState::Running, None, None), TaskState::Running, change(None)),
            (report(ReportState::Succeeded, Some("printed"), None), TaskState::Succeeded, change(Some("printed"))),
            (report(ReportState::Failed, Some("jammed"), None), TaskState::Failed, change(Some("jammed"))),
            (
                report(ReportState::Rejected, Some("past its deadline; not run"), Some(RejectReason::Deadline)),
                TaskState::Expired,
                change(Some("rejected by the device: past its deadline; not run")),
            ),
            (
                report(ReportState::Rejected, Some("a camera cannot do a print task"), Some(RejectReason::WrongKind)),
                TaskState::Failed,
                change(Some("rejected by the device: a camera cannot do a print task")),
            ),
            // A version 1 report says no reason: the detail is not read for one.
            (
                report(ReportState::Rejected, Some("past its deadline"), None),
                TaskState::Failed,
                change(Some("rejected by the device: past its deadline")),
            ),
        ];
        for (r, to, c) in cases {
            let said = format!("{r:?}");
            assert_eq!(report_move("p1", ours, r), Ok((to, c)), "{said}");
        }
    }

    #[test]
    fn a_report_on_a_task_the_device_does_not_have_is_dropped_and_a_repeat_is_told_from_a_late_one() {
        let r = || report(ReportState::Accepted, None, None);
        assert_eq!(report_move("p1", None, r()).unwrap_err().reason, "unknown_task");
        assert_eq!(report_move("p1", Some(("p2", TaskState::Sent)), r()).unwrap_err().reason, "unknown_task");
        // Someone published a task of this id unsigned and the device refused it: ours stands.
        let forged = report(ReportState::Rejected, Some("no proof"), Some(RejectReason::Unproven));
        let dropped = report_move("p1", Some(("p1", TaskState::Sent)), forged).unwrap_err();
        assert_eq!(dropped.reason, "unproven_task");
        assert!(dropped.error.unwrap().contains("someone else publishes on its tasks topic"));
        assert_eq!(unmoved(TaskState::Accepted, TaskState::Accepted), "duplicate");
        assert_eq!(unmoved(TaskState::Succeeded, TaskState::Running), "stale");
    }
}
