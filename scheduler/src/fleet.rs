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
    DeviceKind, DeviceState, DeviceStatus, DeviceTask as WireTask, FLEET_VERSION, ReportState, SchedulerStatus,
    TaskReport, Telemetry, Topic, Topics, decode,
};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::FleetConfig;
use crate::scheduler::Scheduler;
use crate::store::fleet::{DeviceTask, TaskChange, TaskMove, TaskState};
use kiln_protocol::now_ms;

/// Runs the bridge until `stop`.
pub async fn run(sched: Arc<Scheduler>, cfg: FleetConfig, stop: CancellationToken) {
    let Some(url) = cfg.mqtt_url.clone() else { return };
    let (host, port) = match kiln_protocol::fleet::parse_mqtt_url(&url) {
        Ok(hp) => hp,
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
    let mut opts = MqttOptions::new(client_id, host, port);
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
    tracing::info!(broker = url, prefix = cfg.prefix, "fleet bridge starting");
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    tracing::info!(broker = url, "fleet bridge connected");
                    backoff = Duration::from_millis(100);
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

/// One message: Ok once it is stored or dropped (counted); Err only when the store failed.
async fn handle(sched: &Arc<Scheduler>, topics: &Topics, p: &Publish) -> Result<(), crate::store::StoreError> {
    let now = now_ms();
    if p.payload.is_empty() {
        return Ok(()); // a retained message being cleared
    }
    match topics.parse(&p.topic) {
        Some(Topic::Status(id)) => {
            let s: DeviceStatus = match decode(&p.payload) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(device = id, error = %e, "dropped a malformed status");
                    dropped(sched, "status", "malformed");
                    return Ok(());
                }
            };
            let (state, boot) = (s.state, s.boot_id.clone());
            let before = sched.store.announce(&id, s, now).await?;
            let reborn = before.as_ref().is_none_or(|b| b.boot_id != boot || b.state == DeviceState::Offline.as_str());
            if before.as_ref().is_none_or(|b| b.state != state.as_str()) {
                tracing::info!(device = id, state = %state, "device state");
            }
            if state != DeviceState::Offline && reborn {
                let n = sched.store.resend_now(&id).await?;
                if n > 0 {
                    tracing::info!(device = id, tasks = n, "device is back; sending its unanswered tasks again");
                }
                sched.fleet_wake.notify_one();
            }
        }
        Some(Topic::Telemetry(id)) => match decode::<Telemetry>(&p.payload) {
            Ok(t) => {
                let seq = i64::try_from(t.seq).unwrap_or(i64::MAX);
                if !sched.store.telemetry(&id, t, now).await? {
                    // A repeat (sent again after a broken connection) is expected; one older than
                    // what is stored arrived out of order.
                    let reason = match sched.store.device(&id).await? {
                        None => "unknown_device",
                        Some(d) if d.telemetry_seq == seq => "duplicate",
                        Some(_) => "stale",
                    };
                    dropped(sched, "telemetry", reason);
                }
            }
            Err(e) => {
                tracing::warn!(device = id, error = %e, "dropped malformed telemetry");
                dropped(sched, "telemetry", "malformed");
            }
        },
        Some(Topic::TaskReport(id, task_id)) => {
            let r = match decode::<TaskReport>(&p.payload) {
                Ok(r) if r.task_id == task_id => r,
                Ok(_) => {
                    dropped(sched, "report", "task_id_mismatch");
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(device = id, task = task_id, error = %e, "dropped a malformed task report");
                    dropped(sched, "report", "malformed");
                    return Ok(());
                }
            };
            let current = match sched.store.task_row(&task_id).await? {
                Some(t) if t.device_id == id => t.state,
                _ => {
                    dropped(sched, "report", "unknown_task");
                    return Ok(());
                }
            };
            let (to, detail) = match r.state {
                ReportState::Accepted => (TaskState::Accepted, r.detail),
                ReportState::Running => (TaskState::Running, r.detail),
                ReportState::Succeeded => (TaskState::Succeeded, r.detail),
                ReportState::Failed => (TaskState::Failed, r.detail),
                ReportState::Rejected => {
                    let d = r.detail.unwrap_or_default();
                    if d.contains("deadline") {
                        (TaskState::Expired, Some(format!("rejected by the device: {d}")))
                    } else {
                        (TaskState::Failed, Some(format!("rejected by the device: {d}")))
                    }
                }
            };
            let change = TaskChange { detail, output_asset: r.output_asset, next_send_ms: None };
            match sched.store.move_task(&task_id, to, change, now).await? {
                Some(m) => observe(sched, &m),
                // The same state again is a repeat (a redelivered task, a resent report); an
                // earlier one arrived out of order.
                None if current == to => dropped(sched, "report", "duplicate"),
                None => dropped(sched, "report", "stale"),
            }
        }
        Some(Topic::Tasks(_) | Topic::SchedulerStatus) | None => dropped(sched, "other", "unexpected_topic"),
    }
    Ok(())
}

/// Counts a task that ended.
fn observe(sched: &Scheduler, m: &TaskMove) {
    let t = &m.task;
    tracing::info!(task = t.id, device = t.device_id, from = %m.from, to = %t.state, "device task");
    if t.state.is_terminal() {
        let (kind, outcome) = (t.kind.as_str(), t.state.as_str());
        sched.metrics.device_tasks.with_label_values(&[kind, outcome]).inc();
        let secs = (t.updated_ms - t.created_ms).max(0) as f64 / 1000.0;
        sched.metrics.device_task_seconds.with_label_values(&[kind, outcome]).observe(secs);
    }
}

/// The task as the agent gets it.
pub fn wire_task(t: &DeviceTask) -> WireTask {
    WireTask {
        v: FLEET_VERSION,
        task_id: t.id.clone(),
        kind: t.kind,
        asset: t
            .asset
            .as_ref()
            .map(|h| kiln_protocol::fleet::AssetRef { hash: h.clone(), url: format!("/v1/assets/{h}") }),
        params: t.params.clone(),
        deadline_ms: t.deadline_ms,
    }
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
            let payload = serde_json::to_vec(&wire_task(&t)).unwrap_or_default();
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
