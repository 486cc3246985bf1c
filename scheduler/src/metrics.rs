//! The scheduler's Prometheus metrics. Names are constants with the `kiln_` prefix, in base
//! units; labels are tier and state, never a job id.

use kiln_worker::metrics::{encode, register_all};
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::store::Event;
use kiln_protocol::{JobState, Tier};

/// Jobs in each state, by tier (a gauge: moves as jobs move).
pub const JOBS: &str = "kiln_jobs";
/// Seconds from submit to the start of the render that served it, by tier.
pub const QUEUE_WAIT_SECONDS: &str = "kiln_job_queue_wait_seconds";
/// Seconds from submit to a terminal state, by tier and final state.
pub const JOB_SECONDS: &str = "kiln_job_seconds";
/// Submits answered from the cache, by tier.
pub const SUBMIT_CACHE_HITS: &str = "kiln_submit_cache_hits_total";
/// Submits attached to a render already in flight, by tier.
pub const SUBMIT_COALESCED: &str = "kiln_submit_coalesced_total";
/// Renders a worker has in hand right now.
pub const RENDERS_IN_FLIGHT: &str = "kiln_renders_in_flight";
/// Attempts that ended, by tier and outcome (succeeded, retry, failed).
pub const ATTEMPTS: &str = "kiln_render_attempts_total";

/// Outbox messages the broker confirmed (distributed mode).
pub const RELAYED: &str = "kiln_relay_messages_total";
/// Broker messages refused by the scheduler, by kind (result, heartbeat).
pub const BAD_MESSAGES: &str = "kiln_scheduler_bad_messages_total";
/// Results that decoded but were refused before anything was recorded, by reason (see
/// [`crate::results::Refusal`]); each is dead-lettered with its reason.
pub const RESULTS_REFUSED: &str = "kiln_scheduler_results_refused_total";
/// Job messages that came back dead-lettered while their attempt was open, by cause
/// (`worker_refused`, or the broker's: `expired`, `maxlen`, `rejected`, `delivery_limit`), and
/// those found gone (`lost`: see `scheduler.broker.redispatch_after_seconds`).
pub const UNDELIVERED: &str = "kiln_scheduler_jobs_undelivered_total";
/// Jobs quarantined for failing on too many distinct workers.
pub const QUARANTINED: &str = "kiln_jobs_quarantined_total";
/// Workers drained for failing too many distinct jobs.
pub const DRAINED: &str = "kiln_workers_drained_total";
/// Workers heard from, by state (active, draining, drained, lost), as of the scrape.
pub const WORKERS: &str = "kiln_workers";
/// One series per worker heard from (value 1), labelled with its host, backend, adapter (GPU or
/// CPU) and state, as of the scrape: the dashboards' table of workers.
pub const WORKER_INFO: &str = "kiln_worker_info";
/// Seconds since each worker's latest heartbeat (0 for an in-process worker), as of the scrape.
pub const WORKER_HEARTBEAT_AGE: &str = "kiln_worker_heartbeat_age_seconds";
/// Each worker's GPU memory, bytes, as its latest heartbeat says (where its driver reports it:
/// NVML on NVIDIA; no series for other workers).
pub const WORKER_GPU_MEMORY: &str = "kiln_worker_heartbeat_gpu_memory_bytes";
/// Each worker's GPU memory in use, bytes, as its latest heartbeat says (where reported).
pub const WORKER_GPU_MEMORY_USED: &str = "kiln_worker_heartbeat_gpu_memory_used_bytes";
/// Each worker's GPU load (0 to 1), as its latest heartbeat says (where reported).
pub const WORKER_GPU_UTILIZATION: &str = "kiln_worker_heartbeat_gpu_utilization_ratio";
/// Active workers serving each tier, as of the scrape: 0 for a tier whose jobs no worker takes.
pub const TIER_WORKERS: &str = "kiln_tier_workers";
/// Edge devices by kind and state (online, degraded, offline), as of the last sweep.
pub const DEVICES: &str = "kiln_devices";
/// Seconds since each device's latest telemetry, as of the last sweep.
pub const DEVICE_TELEMETRY_AGE: &str = "kiln_device_telemetry_age_seconds";
/// Telemetry each device's agent dropped because its spool was full (as the agent reports it).
pub const DEVICE_SPOOL_DROPPED: &str = "kiln_device_spool_dropped";
/// Device tasks that ended, by task kind and outcome.
pub const DEVICE_TASKS: &str = "kiln_device_tasks_total";
/// Seconds from a device task's creation to its end, by task kind and outcome.
pub const DEVICE_TASK_SECONDS: &str = "kiln_device_task_seconds";
/// Fleet messages the scheduler dropped, by topic kind and reason.
pub const FLEET_DROPPED: &str = "kiln_fleet_messages_dropped_total";
/// Incidents raised, by kind.
pub const INCIDENTS: &str = "kiln_incidents_raised_total";
/// Incidents open now, by kind, as of the scrape.
pub const INCIDENTS_OPEN: &str = "kiln_incidents_open";
/// Orders in each state, as of the scrape.
pub const ORDERS: &str = "kiln_orders";
/// The states an order can be in (each has a series from the start).
pub const ORDER_STATES: [&str; 5] = ["running", "awaiting_approval", "succeeded", "failed", "cancelled"];
/// Approvals waiting for a decision, as of the scrape.
pub const APPROVALS_WAITING: &str = "kiln_approvals_waiting";
/// Seconds the oldest approval still waiting has waited (0 when none waits), as of the scrape.
pub const APPROVAL_OLDEST_WAIT: &str = "kiln_approval_oldest_wait_seconds";
/// Each client token's budget for its period, weighted device-seconds.
pub const BUDGET: &str = "kiln_client_budget_seconds";
/// What each client token with a budget has spent of it this period, weighted device-seconds.
pub const BUDGET_USED: &str = "kiln_client_budget_used_seconds";
/// The store writer's metrics (named where the writer is, which this module's gauges read).
pub use crate::store::writer::{STORE_COMMITS, STORE_WRITER_BUSY_SECONDS, STORE_WRITES, STORE_WRITES_WAITING};
/// Bytes free to the scheduler on the file system of its data dir (the SQLite database and the
/// assets), as of the scrape.
pub const DATA_DIR_FREE: &str = "kiln_data_dir_free_bytes";
/// Bytes in all on the file system of the scheduler's data dir.
pub const DATA_DIR_SIZE: &str = "kiln_data_dir_size_bytes";
/// The kinds of incident the scheduler raises (each has a series from the start).
pub const INCIDENT_KINDS: [&str; 12] = [
    "approval_timeout",
    "device_not_ready",
    "device_offline",
    "job_failed",
    "job_quarantined",
    "order_expired",
    "order_plan_changed",
    "order_step",
    "result_refused",
    "task_expired",
    "task_failed",
    "task_timed_out",
];
/// Why the scheduler refuses a result: each [`crate::results::Refusal`]'s label (each has a
/// series from the start).
pub const REFUSAL_REASONS: [&str; 5] =
    ["unknown_job", "attempt_not_open", "not_its_request", "unproven", "store_refused"];
/// Why a job message comes back undelivered (each has a series from the start).
pub const UNDELIVERED_CAUSES: [&str; 6] = ["worker_refused", "expired", "maxlen", "rejected", "delivery_limit", "lost"];
/// The worker states [`WORKERS`] reports.
pub const WORKER_STATES: [&str; 4] = ["active", "draining", "drained", "lost"];

/// The scheduler's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// [`JOBS`].
    pub jobs: IntGaugeVec,
    /// [`QUEUE_WAIT_SECONDS`].
    pub queue_wait: HistogramVec,
    /// [`JOB_SECONDS`].
    pub job_seconds: HistogramVec,
    /// [`SUBMIT_CACHE_HITS`].
    pub cache_hits: IntCounterVec,
    /// [`SUBMIT_COALESCED`].
    pub coalesced: IntCounterVec,
    /// [`RENDERS_IN_FLIGHT`].
    pub in_flight: IntGauge,
    /// [`ATTEMPTS`].
    pub attempts: IntCounterVec,
    /// [`RELAYED`].
    pub relayed: IntCounter,
    /// [`BAD_MESSAGES`].
    pub bad_messages: IntCounterVec,
    /// [`RESULTS_REFUSED`].
    pub results_refused: IntCounterVec,
    /// [`UNDELIVERED`].
    pub undelivered: IntCounterVec,
    /// [`QUARANTINED`].
    pub jobs_quarantined: IntCounter,
    /// [`DRAINED`].
    pub workers_drained: IntCounter,
    /// [`WORKERS`].
    pub workers: IntGaugeVec,
    /// [`TIER_WORKERS`].
    pub tier_workers: IntGaugeVec,
    /// [`WORKER_INFO`].
    pub worker_info: IntGaugeVec,
    /// [`WORKER_HEARTBEAT_AGE`].
    pub worker_heartbeat_age: prometheus::GaugeVec,
    /// [`WORKER_GPU_MEMORY`], [`WORKER_GPU_MEMORY_USED`], [`WORKER_GPU_UTILIZATION`], by worker.
    pub worker_gpu: [prometheus::GaugeVec; 3],
    /// [`DEVICES`].
    pub devices: IntGaugeVec,
    /// [`DEVICE_TELEMETRY_AGE`].
    pub device_telemetry_age: prometheus::GaugeVec,
    /// [`DEVICE_SPOOL_DROPPED`].
    pub device_spool_dropped: IntGaugeVec,
    /// [`DEVICE_TASKS`].
    pub device_tasks: IntCounterVec,
    /// [`DEVICE_TASK_SECONDS`].
    pub device_task_seconds: HistogramVec,
    /// [`FLEET_DROPPED`].
    pub fleet_dropped: IntCounterVec,
    /// [`INCIDENTS`].
    pub incidents: IntCounterVec,
    /// [`INCIDENTS_OPEN`].
    pub incidents_open: IntGaugeVec,
    /// [`ORDERS`].
    pub orders: IntGaugeVec,
    /// [`APPROVALS_WAITING`].
    pub approvals_waiting: IntGauge,
    /// [`APPROVAL_OLDEST_WAIT`].
    pub approval_oldest_wait: prometheus::Gauge,
    /// [`BUDGET`].
    pub budget: prometheus::GaugeVec,
    /// [`BUDGET_USED`].
    pub budget_used: prometheus::GaugeVec,
    /// [`DATA_DIR_FREE`].
    pub data_dir_free: IntGauge,
    /// [`DATA_DIR_SIZE`].
    pub data_dir_size: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let buckets = vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0];
        let jobs = IntGaugeVec::new(Opts::new(JOBS, "Jobs in each state"), &["tier", "state"]).expect("valid metric");
        let queue_wait = HistogramVec::new(
            HistogramOpts::new(QUEUE_WAIT_SECONDS, "Seconds from submit to the start of its render")
                .buckets(buckets.clone()),
            &["tier"],
        )
        .expect("valid metric");
        let job_seconds = HistogramVec::new(
            HistogramOpts::new(JOB_SECONDS, "Seconds from submit to a terminal state").buckets(buckets),
            &["tier", "state"],
        )
        .expect("valid metric");
        let cache_hits = IntCounterVec::new(Opts::new(SUBMIT_CACHE_HITS, "Submits answered from the cache"), &["tier"])
            .expect("valid metric");
        let coalesced =
            IntCounterVec::new(Opts::new(SUBMIT_COALESCED, "Submits attached to a render in flight"), &["tier"])
                .expect("valid metric");
        let in_flight = IntGauge::new(RENDERS_IN_FLIGHT, "Renders in hand").expect("valid metric");
        let attempts = IntCounterVec::new(Opts::new(ATTEMPTS, "Render attempts that ended"), &["tier", "outcome"])
            .expect("valid metric");
        let relayed = IntCounter::new(RELAYED, "Outbox messages confirmed by the broker").expect("valid metric");
        let bad_messages =
            IntCounterVec::new(Opts::new(BAD_MESSAGES, "Broker messages refused"), &["kind"]).expect("valid metric");
        let results_refused =
            IntCounterVec::new(Opts::new(RESULTS_REFUSED, "Worker results refused unrecorded"), &["reason"])
                .expect("valid metric");
        let undelivered = IntCounterVec::new(
            Opts::new(UNDELIVERED, "Job messages dead-lettered while their attempt was open"),
            &["cause"],
        )
        .expect("valid metric");
        let jobs_quarantined = IntCounter::new(QUARANTINED, "Jobs quarantined (failed on too many distinct workers)")
            .expect("valid metric");
        let workers_drained =
            IntCounter::new(DRAINED, "Workers drained (failed too many distinct jobs)").expect("valid metric");
        let workers =
            IntGaugeVec::new(Opts::new(WORKERS, "Workers heard from, by state"), &["state"]).expect("valid metric");
        let tier_workers = IntGaugeVec::new(Opts::new(TIER_WORKERS, "Active workers serving each tier"), &["tier"])
            .expect("valid metric");
        let worker_info = IntGaugeVec::new(
            Opts::new(WORKER_INFO, "Each worker heard from, with its host, backend, adapter and state"),
            &["worker", "host", "backend", "adapter", "state"],
        )
        .expect("valid metric");
        let worker_heartbeat_age = prometheus::GaugeVec::new(
            Opts::new(WORKER_HEARTBEAT_AGE, "Seconds since each worker's latest heartbeat"),
            &["worker"],
        )
        .expect("valid metric");
        let worker_gpu = [
            (WORKER_GPU_MEMORY, "Each worker's GPU memory, bytes, as its heartbeat says"),
            (WORKER_GPU_MEMORY_USED, "Each worker's GPU memory in use, bytes, as its heartbeat says"),
            (WORKER_GPU_UTILIZATION, "Each worker's GPU load, 0 to 1, as its heartbeat says"),
        ]
        .map(|(name, help)| prometheus::GaugeVec::new(Opts::new(name, help), &["worker"]).expect("valid metric"));
        let devices = IntGaugeVec::new(Opts::new(DEVICES, "Edge devices by kind and state"), &["kind", "state"])
            .expect("valid metric");
        let device_telemetry_age = prometheus::GaugeVec::new(
            Opts::new(DEVICE_TELEMETRY_AGE, "Seconds since a device's latest telemetry"),
            &["device"],
        )
        .expect("valid metric");
        let device_spool_dropped = IntGaugeVec::new(
            Opts::new(DEVICE_SPOOL_DROPPED, "Telemetry an agent dropped from its full spool"),
            &["device"],
        )
        .expect("valid metric");
        let device_tasks = IntCounterVec::new(Opts::new(DEVICE_TASKS, "Device tasks that ended"), &["kind", "outcome"])
            .expect("valid metric");
        let device_task_seconds = HistogramVec::new(
            HistogramOpts::new(DEVICE_TASK_SECONDS, "Seconds from a device task's creation to its end")
                .buckets(vec![0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0]),
            &["kind", "outcome"],
        )
        .expect("valid metric");
        let fleet_dropped =
            IntCounterVec::new(Opts::new(FLEET_DROPPED, "Fleet messages dropped"), &["topic", "reason"])
                .expect("valid metric");
        let incidents = IntCounterVec::new(Opts::new(INCIDENTS, "Incidents raised"), &["kind"]).expect("valid metric");
        let incidents_open =
            IntGaugeVec::new(Opts::new(INCIDENTS_OPEN, "Incidents open"), &["kind"]).expect("valid metric");
        let orders = IntGaugeVec::new(Opts::new(ORDERS, "Orders in each state"), &["state"]).expect("valid metric");
        let approvals_waiting = IntGauge::new(APPROVALS_WAITING, "Approvals waiting").expect("valid metric");
        let approval_oldest_wait =
            prometheus::Gauge::new(APPROVAL_OLDEST_WAIT, "Seconds the oldest approval waiting has waited")
                .expect("valid metric");
        let budget = prometheus::GaugeVec::new(
            Opts::new(BUDGET, "Client budgets per period, weighted device-seconds"),
            &["client", "period"],
        )
        .expect("valid metric");
        let budget_used = prometheus::GaugeVec::new(
            Opts::new(BUDGET_USED, "Budget spent this period, weighted device-seconds"),
            &["client", "period"],
        )
        .expect("valid metric");
        let data_dir_free =
            IntGauge::new(DATA_DIR_FREE, "Bytes free on the data dir's file system").expect("valid metric");
        let data_dir_size =
            IntGauge::new(DATA_DIR_SIZE, "Bytes in all on the data dir's file system").expect("valid metric");
        register_all(
            &registry,
            vec![
                Box::new(jobs.clone()),
                Box::new(queue_wait.clone()),
                Box::new(job_seconds.clone()),
                Box::new(cache_hits.clone()),
                Box::new(coalesced.clone()),
                Box::new(in_flight.clone()),
                Box::new(attempts.clone()),
                Box::new(relayed.clone()),
                Box::new(bad_messages.clone()),
                Box::new(results_refused.clone()),
                Box::new(undelivered.clone()),
                Box::new(jobs_quarantined.clone()),
                Box::new(workers_drained.clone()),
                Box::new(workers.clone()),
                Box::new(tier_workers.clone()),
                Box::new(worker_info.clone()),
                Box::new(worker_heartbeat_age.clone()),
                Box::new(worker_gpu[0].clone()),
                Box::new(worker_gpu[1].clone()),
                Box::new(worker_gpu[2].clone()),
                Box::new(devices.clone()),
                Box::new(device_telemetry_age.clone()),
                Box::new(device_spool_dropped.clone()),
                Box::new(device_tasks.clone()),
                Box::new(device_task_seconds.clone()),
                Box::new(fleet_dropped.clone()),
                Box::new(incidents.clone()),
                Box::new(incidents_open.clone()),
                Box::new(orders.clone()),
                Box::new(approvals_waiting.clone()),
                Box::new(approval_oldest_wait.clone()),
                Box::new(budget.clone()),
                Box::new(budget_used.clone()),
                Box::new(data_dir_free.clone()),
                Box::new(data_dir_size.clone()),
            ],
        );
        for tier in Tier::ALL {
            for state in JobState::ALL {
                jobs.with_label_values(&[tier.as_str(), state.as_str()]).set(0);
            }
        }
        // A series for each known label from the start: an alert's `increase()` then sees the
        // first one, and a dashboard shows 0 rather than nothing.
        for kind in INCIDENT_KINDS {
            incidents.with_label_values(&[kind]).reset();
            incidents_open.with_label_values(&[kind]).set(0);
        }
        for state in ORDER_STATES {
            orders.with_label_values(&[state]).set(0);
        }
        for tier in Tier::ALL {
            cache_hits.with_label_values(&[tier.as_str()]).reset();
            coalesced.with_label_values(&[tier.as_str()]).reset();
        }
        for cause in UNDELIVERED_CAUSES {
            undelivered.with_label_values(&[cause]).reset();
        }
        for reason in REFUSAL_REASONS {
            results_refused.with_label_values(&[reason]).reset();
        }
        for kind in ["result", "heartbeat", "dead_letter"] {
            bad_messages.with_label_values(&[kind]).reset();
        }
        Metrics {
            registry,
            jobs,
            queue_wait,
            job_seconds,
            cache_hits,
            coalesced,
            in_flight,
            attempts,
            relayed,
            bad_messages,
            results_refused,
            undelivered,
            jobs_quarantined,
            workers_drained,
            workers,
            tier_workers,
            worker_info,
            worker_heartbeat_age,
            worker_gpu,
            devices,
            device_telemetry_age,
            device_spool_dropped,
            device_tasks,
            device_task_seconds,
            fleet_dropped,
            incidents,
            incidents_open,
            orders,
            approvals_waiting,
            approval_oldest_wait,
            budget,
            budget_used,
            data_dir_free,
            data_dir_size,
        }
    }

    /// Registers the store writer's metrics (see [`crate::store::writer::WriterMetrics`]).
    pub fn register_store(&self, writer: &crate::store::writer::WriterMetrics) {
        register_all(&self.registry, writer.collectors());
    }

    /// Moves the state gauge for an event that is now durable, and times the job when it starts
    /// or ends.
    pub fn observe(&self, e: &Event) {
        let tier = e.tier.as_str();
        if let Some(from) = e.from {
            self.jobs.with_label_values(&[tier, from.as_str()]).dec();
        }
        self.jobs.with_label_values(&[tier, e.state.as_str()]).inc();
        let secs = (e.at_ms - e.created_ms).max(0) as f64 / 1000.0;
        if e.state == JobState::Running {
            self.queue_wait.with_label_values(&[tier]).observe(secs);
        } else if e.state.is_terminal() {
            self.job_seconds.with_label_values(&[tier, e.state.as_str()]).observe(secs);
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}
