//! The agent's own `/metrics` and `/healthz` (`metrics_listen`, off by default): what each
//! device's session, tasks, reads and spool did, in Prometheus's text format. Written by hand
//! rather than with the prometheus crate: a dozen series do not need it, and the Pi's binary
//! stays small.
//!
//! The scheduler already reports the fleet as it sees it (devices by state, telemetry age, task
//! outcomes); these are the agent's side, which the scheduler cannot see while the agent is cut
//! off from it: whether the broker is reached, what waits in the spool, how long tasks take.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_protocol::fleet::{DeviceKind, ReportState};
use tokio_util::sync::CancellationToken;

/// The task duration histogram's upper bounds, seconds: a light scene takes milliseconds, a
/// print minutes.
const BUCKETS: [f64; 12] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0];

/// How a task ended, as counted.
const OUTCOMES: [ReportState; 3] = [ReportState::Succeeded, ReportState::Failed, ReportState::Rejected];

/// Every device's figures.
#[derive(Default)]
pub struct Metrics {
    devices: Mutex<Vec<Arc<DeviceMetrics>>>,
}

/// One device's figures, updated by its session, executor and telemetry.
pub struct DeviceMetrics {
    id: String,
    kind: DeviceKind,
    /// Whether its MQTT session is connected now.
    pub connected: AtomicBool,
    /// Connections the broker accepted.
    pub connections: AtomicU64,
    degraded: AtomicBool,
    /// Tasks ended, by [`OUTCOMES`].
    tasks: [AtomicU64; OUTCOMES.len()],
    /// Runs of the driver per bucket (not cumulative; the last is past the largest bound).
    buckets: [AtomicU64; BUCKETS.len() + 1],
    duration_us: AtomicU64,
    reads_ok: AtomicU64,
    reads_failed: AtomicU64,
    spool_messages: AtomicU64,
    spool_dropped: AtomicU64,
    /// Payloads dropped because they could not be read (no task id to reject).
    pub malformed: AtomicU64,
    /// Tasks rejected because they carried no valid proof that the scheduler sent them.
    pub unproven: AtomicU64,
}

impl DeviceMetrics {
    /// A task's end, journalled and reported.
    pub fn task_ended(&self, state: ReportState) {
        if let Some(i) = OUTCOMES.iter().position(|s| *s == state) {
            self.tasks[i].fetch_add(1, Relaxed);
        }
    }

    /// How long the driver took over a task.
    pub fn task_ran(&self, took: Duration) {
        let s = took.as_secs_f64();
        let i = BUCKETS.iter().position(|b| s <= *b).unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.duration_us.fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    /// A reading of the device for telemetry: answered or not.
    pub fn read(&self, ok: bool) {
        if ok { &self.reads_ok } else { &self.reads_failed }.fetch_add(1, Relaxed);
    }

    /// The spool as it stands: messages waiting, and telemetry dropped over its life.
    pub fn spool(&self, messages: usize, dropped: u64) {
        self.spool_messages.store(messages as u64, Relaxed);
        self.spool_dropped.store(dropped, Relaxed);
    }

    /// Whether the device says it is degraded.
    pub fn set_degraded(&self, degraded: bool) {
        self.degraded.store(degraded, Relaxed);
    }
}

impl Metrics {
    /// The figures of device `id`, made and listed.
    pub fn device(&self, id: &str, kind: DeviceKind) -> Arc<DeviceMetrics> {
        let d = Arc::new(DeviceMetrics {
            id: id.to_owned(),
            kind,
            connected: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            degraded: AtomicBool::new(false),
            tasks: Default::default(),
            buckets: Default::default(),
            duration_us: AtomicU64::new(0),
            reads_ok: AtomicU64::new(0),
            reads_failed: AtomicU64::new(0),
            spool_messages: AtomicU64::new(0),
            spool_dropped: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            unproven: AtomicU64::new(0),
        });
        if let Ok(mut all) = self.devices.lock() {
            all.push(d.clone());
        }
        d
    }

    fn devices(&self) -> Vec<Arc<DeviceMetrics>> {
        self.devices.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// The exposition, in Prometheus's text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let devices = self.devices();
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in rows {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let each = |f: &dyn Fn(&DeviceMetrics) -> String| -> Vec<(String, String)> {
            devices.iter().map(|d| (format!("{{device=\"{}\"}}", d.id), f(d))).collect()
        };
        let n = |a: &AtomicU64| a.load(Relaxed).to_string();
        let flag = |a: &AtomicBool| u8::from(a.load(Relaxed)).to_string();
        family(
            "kiln_edge_info",
            "gauge",
            "The agent's version; always 1.",
            vec![(format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")), "1".into())],
        );
        family(
            "kiln_edge_device_info",
            "gauge",
            "Each device the agent drives, with its kind; always 1.",
            devices.iter().map(|d| (format!("{{device=\"{}\",kind=\"{}\"}}", d.id, d.kind), "1".into())).collect(),
        );
        family(
            "kiln_edge_broker_connected",
            "gauge",
            "1 while the device's MQTT session is connected to the broker.",
            each(&|d| flag(&d.connected)),
        );
        family(
            "kiln_edge_broker_connections_total",
            "counter",
            "MQTT connections the broker accepted, per device: more than one means reconnects.",
            each(&|d| n(&d.connections)),
        );
        family(
            "kiln_edge_device_degraded",
            "gauge",
            "1 while the device says it is degraded (its last read or task failed on the device).",
            each(&|d| flag(&d.degraded)),
        );
        let mut tasks = Vec::new();
        for d in &devices {
            for (i, s) in OUTCOMES.iter().enumerate() {
                tasks.push((format!("{{device=\"{}\",outcome=\"{s}\"}}", d.id), n(&d.tasks[i])));
            }
        }
        family("kiln_edge_tasks_total", "counter", "Tasks ended, by outcome.", tasks);
        let mut hist = Vec::new();
        for d in &devices {
            let mut cumulative = 0;
            for (i, b) in BUCKETS.iter().map(|b| b.to_string()).chain(["+Inf".to_owned()]).enumerate() {
                cumulative += d.buckets[i].load(Relaxed);
                hist.push((format!("_bucket{{device=\"{}\",le=\"{b}\"}}", d.id), cumulative.to_string()));
            }
            let secs = d.duration_us.load(Relaxed) as f64 / 1e6;
            hist.push((format!("_sum{{device=\"{}\"}}", d.id), secs.to_string()));
            hist.push((format!("_count{{device=\"{}\"}}", d.id), cumulative.to_string()));
        }
        family(
            "kiln_edge_task_duration_seconds",
            "histogram",
            "How long the device took over a task (the driver's run, from start to its end).",
            hist,
        );
        let mut reads = Vec::new();
        for d in &devices {
            reads.push((format!("{{device=\"{}\",result=\"ok\"}}", d.id), n(&d.reads_ok)));
            reads.push((format!("{{device=\"{}\",result=\"error\"}}", d.id), n(&d.reads_failed)));
        }
        family("kiln_edge_device_reads_total", "counter", "Readings of the device for telemetry, by result.", reads);
        family(
            "kiln_edge_spool_messages",
            "gauge",
            "Telemetry and task reports waiting in the device's spool for the broker.",
            each(&|d| n(&d.spool_messages)),
        );
        family(
            "kiln_edge_spool_dropped_total",
            "counter",
            "Telemetry dropped because the spool was full, over the spool's life (kept on disk).",
            each(&|d| n(&d.spool_dropped)),
        );
        let mut dropped = Vec::new();
        for d in &devices {
            dropped.push((format!("{{device=\"{}\",reason=\"malformed\"}}", d.id), n(&d.malformed)));
            dropped.push((format!("{{device=\"{}\",reason=\"unproven\"}}", d.id), n(&d.unproven)));
        }
        family(
            "kiln_edge_messages_refused_total",
            "counter",
            "Messages refused: unreadable payloads, and tasks without the scheduler's proof.",
            dropped,
        );
        if let Some(t) = cpu_temp_c() {
            family(
                "kiln_edge_cpu_temperature_celsius",
                "gauge",
                "The Pi's CPU temperature (thermal zone 0).",
                vec![(String::new(), t.to_string())],
            );
        }
        out
    }

    /// `/healthz`: 200 while every device's session is connected, else 503 naming those that are not.
    fn health(&self) -> (u16, String) {
        let devices = self.devices();
        let away: Vec<&str> = devices.iter().filter(|d| !d.connected.load(Relaxed)).map(|d| d.id.as_str()).collect();
        let status = match away.is_empty() {
            true => "ok".to_owned(),
            false => format!("not connected to the broker: {}", away.join(", ")),
        };
        let per_device: serde_json::Map<String, serde_json::Value> = devices
            .iter()
            .map(|d| {
                let v = serde_json::json!({
                    "connected": d.connected.load(Relaxed),
                    "degraded": d.degraded.load(Relaxed),
                    "spool_messages": d.spool_messages.load(Relaxed),
                });
                (d.id.clone(), v)
            })
            .collect();
        let body = serde_json::json!({ "status": status, "devices": per_device });
        (if away.is_empty() { 200 } else { 503 }, body.to_string())
    }

    fn answer(&self, path: &str) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
        let (status, kind, body) = match path {
            "/metrics" => (200, "text/plain; version=0.0.4", self.encode()),
            "/healthz" => {
                let (status, body) = self.health();
                (status, "application/json", body)
            }
            _ => (404, "text/plain", "not found: try /metrics or /healthz\n".to_owned()),
        };
        hyper::Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, kind)
            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
            .unwrap_or_default()
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `stop`.
pub async fn serve(metrics: Arc<Metrics>, listener: tokio::net::TcpListener, stop: CancellationToken) {
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
        let m = metrics.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let answer = m.answer(req.uri().path());
            async move { Ok::<_, std::convert::Infallible>(answer) }
        });
        let stop = stop.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(Duration::from_secs(10))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(io, service);
            tokio::select! {
                _ = conn => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// The Pi's CPU temperature, where the kernel reports one.
pub fn cpu_temp_c() -> Option<f64> {
    let milli: f64 = std::fs::read_to_string("/sys/class/thermal/thermal_zone0/temp").ok()?.trim().parse().ok()?;
    Some(milli / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_counts_what_happened() {
        let m = Metrics::default();
        let p = m.device("printer-1", DeviceKind::Printer);
        m.device("lights", DeviceKind::Lights);
        p.connected.store(true, Relaxed);
        p.connections.fetch_add(2, Relaxed);
        p.task_ended(ReportState::Succeeded);
        p.task_ended(ReportState::Rejected);
        p.task_ended(ReportState::Running);
        p.task_ran(Duration::from_millis(300));
        p.task_ran(Duration::from_secs(4000));
        p.read(true);
        p.read(false);
        p.spool(7, 3);
        let text = m.encode();
        for line in [
            "kiln_edge_device_info{device=\"printer-1\",kind=\"printer\"} 1",
            "kiln_edge_broker_connected{device=\"printer-1\"} 1",
            "kiln_edge_broker_connected{device=\"lights\"} 0",
            "kiln_edge_broker_connections_total{device=\"printer-1\"} 2",
            "kiln_edge_tasks_total{device=\"printer-1\",outcome=\"succeeded\"} 1",
            "kiln_edge_tasks_total{device=\"printer-1\",outcome=\"failed\"} 0",
            "kiln_edge_tasks_total{device=\"printer-1\",outcome=\"rejected\"} 1",
            "kiln_edge_task_duration_seconds_bucket{device=\"printer-1\",le=\"0.25\"} 0",
            "kiln_edge_task_duration_seconds_bucket{device=\"printer-1\",le=\"0.5\"} 1",
            "kiln_edge_task_duration_seconds_bucket{device=\"printer-1\",le=\"1800\"} 1",
            "kiln_edge_task_duration_seconds_bucket{device=\"printer-1\",le=\"+Inf\"} 2",
            "kiln_edge_task_duration_seconds_sum{device=\"printer-1\"} 4000.3",
            "kiln_edge_task_duration_seconds_count{device=\"printer-1\"} 2",
            "kiln_edge_device_reads_total{device=\"printer-1\",result=\"error\"} 1",
            "kiln_edge_spool_messages{device=\"printer-1\"} 7",
            "kiln_edge_spool_dropped_total{device=\"printer-1\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} is not in\n{text}");
        }
        assert_eq!(text.matches("# TYPE kiln_edge_tasks_total counter").count(), 1);
        let (status, body) = m.health();
        assert_eq!(status, 503);
        assert!(body.contains("not connected to the broker: lights"), "{body}");
    }
}
