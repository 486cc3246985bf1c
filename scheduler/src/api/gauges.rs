//! The gauges `/metrics` reads as of the scrape, brought up to date before each: workers, the
//! studio (orders, approvals, incidents, budgets) and the data dir's room.

use std::collections::BTreeMap;

use kiln_protocol::now_ms;

use crate::metrics::{INCIDENT_KINDS, ORDER_STATES, WORKER_STATES};
use crate::scheduler::Scheduler;

/// Brings the gauges a scrape reads up to date: workers by state and by tier, incidents open,
/// approvals waiting, budgets spent, the data dir's room. A read that fails leaves its gauges
/// as they were, and is logged: the scrape still answers.
pub async fn sample(sched: &Scheduler) {
    let (m, now) = (&sched.metrics, now_ms());
    let workers = sched.registry.list(now);
    let counts = crate::registry::counts(&workers);
    for state in WORKER_STATES {
        m.workers.with_label_values(&[state]).set(counts.get(state).copied().unwrap_or(0) as i64);
    }
    for (tier, n) in crate::registry::serving(&workers) {
        m.tier_workers.with_label_values(&[tier.as_str()]).set(n as i64);
    }
    m.worker_info.reset();
    m.worker_heartbeat_age.reset();
    m.worker_gpu.iter().for_each(|g| g.reset());
    for w in &workers {
        let hb = &w.heartbeat;
        m.worker_info.with_label_values(&[&hb.worker_id, &hb.host, &hb.backend, &hb.adapter, w.state]).set(1);
        let age = (now - w.last_seen_ms).max(0) as f64 / 1000.0;
        m.worker_heartbeat_age.with_label_values(&[&hb.worker_id]).set(age);
        let gpu = [hb.memory_bytes.map(|b| b as f64), hb.memory_used_bytes.map(|b| b as f64)];
        let load = hb.utilization_percent.map(|p| f64::from(p) / 100.0);
        for (gauge, value) in m.worker_gpu.iter().zip(gpu.into_iter().chain([load])) {
            if let Some(v) = value {
                gauge.with_label_values(&[&hb.worker_id]).set(v);
            }
        }
    }
    match sched.store.open_incident_counts().await {
        Ok(open) => set_counts(&m.incidents_open, &INCIDENT_KINDS, open),
        Err(e) => tracing::warn!(error = %e, "metrics: cannot count the open incidents"),
    }
    match sched.store.order_counts().await {
        Ok(counts) => set_counts(&m.orders, &ORDER_STATES, counts),
        Err(e) => tracing::warn!(error = %e, "metrics: cannot count the orders"),
    }
    match crate::orders::approvals_waiting_since(sched).await {
        Ok(since) => {
            m.approvals_waiting.set(since.len() as i64);
            let oldest = since.iter().min().map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0);
            m.approval_oldest_wait.set(oldest);
        }
        Err(e) => tracing::warn!(error = %e, "metrics: cannot read the approvals waiting"),
    }
    let mut budgets = Vec::new();
    for (client, budget) in sched.budgets() {
        let (start, _) = budget.period.bounds(now);
        match sched.store.spent(&client, start).await {
            Ok(ms) => budgets.push((client, budget, ms as f64 / 1000.0)),
            Err(e) => tracing::warn!(client, error = %e, "metrics: cannot read a budget's use"),
        }
    }
    m.budget.reset();
    m.budget_used.reset();
    for (client, budget, used) in budgets {
        m.budget.with_label_values(&[&client, budget.period.as_str()]).set(budget.seconds as f64);
        m.budget_used.with_label_values(&[&client, budget.period.as_str()]).set(used);
    }
    match rustix::fs::statvfs(sched.worker.store().root()) {
        Ok(fs) => {
            m.data_dir_free.set(fs.f_bavail.saturating_mul(fs.f_frsize).min(i64::MAX as u64) as i64);
            m.data_dir_size.set(fs.f_blocks.saturating_mul(fs.f_frsize).min(i64::MAX as u64) as i64);
        }
        Err(e) => {
            tracing::warn!(error = %e, dir = %sched.worker.store().root().display(), "metrics: cannot read the data dir's room")
        }
    }
}

/// Sets a gauge of one label to `counts`, and to 0 for each of `known` they leave out.
fn set_counts(gauge: &prometheus::IntGaugeVec, known: &[&str], counts: Vec<(String, i64)>) {
    let mut all: BTreeMap<String, i64> = known.iter().map(|k| (k.to_string(), 0)).collect();
    all.extend(counts);
    for (label, n) in all {
        gauge.with_label_values(&[&label]).set(n);
    }
}
