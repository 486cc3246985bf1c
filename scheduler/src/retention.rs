//! Retention (`[scheduler.retention]`): every `interval_seconds`, the jobs and device tasks that
//! ended more than `jobs_days` ago are deleted with their events, then the assets made more than
//! `assets_days` ago that no job or task left names: their rows, and their files (PNG, thumbnail,
//! provenance) in the asset store, photos and uploads no record names included. An asset a live
//! job or any kept job or task names is never touched.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::scheduler::Scheduler;
use crate::store::StoreError;

const DAY_MS: i64 = 24 * 3600 * 1000;

/// What one pass deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Jobs.
    pub jobs: u64,
    /// Device tasks.
    pub tasks: u64,
    /// Assets (rows, files, or both).
    pub assets: u64,
}

/// Runs a pass every `interval_seconds` until `stop`; nothing when both ages are 0.
pub async fn run(sched: Arc<Scheduler>, stop: CancellationToken) {
    let cfg = sched.cfg.retention.clone();
    if cfg.jobs_days == 0 && cfg.assets_days == 0 {
        return;
    }
    loop {
        match prune(&sched, kiln_protocol::now_ms()).await {
            Ok(r) if r == Report::default() => {}
            Ok(r) => {
                tracing::info!(jobs = r.jobs, tasks = r.tasks, assets = r.assets, "retention: deleted old records")
            }
            Err(e) => tracing::warn!(error = %e, "retention: the pass failed; trying again next time"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(cfg.interval_seconds)) => {}
        }
    }
}

/// One pass as of `now_ms`.
pub async fn prune(sched: &Scheduler, now_ms: i64) -> Result<Report, StoreError> {
    let cfg = &sched.cfg.retention;
    let cutoff = |days: u64| if days == 0 { i64::MIN } else { now_ms - days as i64 * DAY_MS };
    let (jobs_before, assets_before) = (cutoff(cfg.jobs_days), cutoff(cfg.assets_days));
    let pruned = sched.store.prune(jobs_before, assets_before).await?;
    let store = sched.worker.store().clone();
    let mut gone = pruned.assets;
    if cfg.assets_days > 0 {
        // Files no row stands for (photos, uploads whose job went another way), old enough.
        let before = SystemTime::UNIX_EPOCH + Duration::from_millis(assets_before.max(0) as u64);
        let lister = store.clone();
        let old = tokio::task::spawn_blocking(move || lister.stored_before(before)).await.unwrap_or_default();
        let rows: std::collections::HashSet<String> = gone.iter().cloned().collect();
        gone.extend(old.into_iter().filter(|h| !rows.contains(h)));
    }
    // Asked again just before the files go: a job admitted meanwhile may name one (a repeat of an
    // old request renders the same bytes again).
    let named: std::collections::HashSet<String> = sched.store.assets_named(gone.clone()).await?.into_iter().collect();
    gone.retain(|h| !named.contains(h));
    let assets = gone.len() as u64;
    tokio::task::spawn_blocking(move || {
        for hash in &gone {
            if let Err(e) = store.remove(hash) {
                tracing::warn!(hash, error = %e, "retention: cannot delete an asset's files");
            }
        }
    })
    .await
    .ok();
    Ok(Report { jobs: pruned.jobs, tasks: pruned.tasks, assets })
}
