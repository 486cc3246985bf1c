//! What the scheduler makes of an attempt's end, the same for the embedded farm's in-process
//! workers and the distributed farm's daemons: the checks a result from another machine must pass
//! ([`Scheduler::accept`]), the retry policy, the quarantine and drain rules ([`judge`], with no
//! I/O), and the one path that records it all ([`Scheduler::settle`]). Their spans (level
//! `debug`, as every per-job line) carry the job, the attempt and the worker.

use kiln_protocol::now_ms;
use kiln_protocol::wire::{AttemptOutcome, ResultMessage};
use kiln_worker::render::{THUMB_SIDE, own_thumbnail};

use crate::config::BrokerConfig;
use crate::retry::Decision;
use crate::scheduler::Scheduler;
use crate::store::{AttemptFailure, Dispatch, DrainedWorker, FailureTally, Outcome, StoreError};

/// How an attempt ended, as its worker says (before the scheduler's rules weigh it).
#[derive(Debug, Clone)]
pub enum Ended {
    /// It made an asset.
    Succeeded {
        /// BLAKE3 of the PNG.
        asset: String,
        /// Its size.
        bytes: u64,
        /// Its provenance record (JSON) to keep with the asset's row, where it is not a file.
        provenance: Option<String>,
        /// The PNG, where it is kept with the asset's row instead of as a file.
        png: Option<Vec<u8>>,
    },
    /// It failed.
    Failed {
        /// What went wrong.
        error: String,
        /// Whether another attempt may succeed.
        transient: bool,
    },
}

/// An attempt's end to record: whose attempt it was, on which worker, when, and how it ended.
#[derive(Debug, Clone)]
pub struct Report {
    /// The attempt.
    pub d: Dispatch,
    /// The worker that made it.
    pub worker: String,
    /// When the render started, unix milliseconds.
    pub started_ms: i64,
    /// When it ended, unix milliseconds.
    pub finished_ms: i64,
    /// How.
    pub ended: Ended,
}

/// What the quarantine and drain rules make of a failure: the job to quarantine and the worker
/// to drain, each with the reason the operator reads.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Why the job is quarantined (it ends failed), when it is.
    pub quarantine: Option<String>,
    /// Why the worker is drained, when it is.
    pub drain: Option<String>,
}

/// The rules, after a failure of job `job_id` (`error`) that left `tally`: the job is quarantined
/// once it has failed on `quarantine_after_workers` distinct workers; the worker is drained once it
/// has failed `drain_after_jobs` distinct jobs within `drain_window_seconds`.
pub fn judge(tally: &FailureTally, rules: &BrokerConfig, job_id: &str, error: &str) -> Verdict {
    let drain = (tally.worker_jobs >= rules.drain_after_jobs).then(|| {
        format!(
            "failed {} distinct jobs within {} s (last: job {job_id}: {error})",
            tally.worker_jobs, rules.drain_window_seconds
        )
    });
    let quarantine = (tally.job_workers.len() >= rules.quarantine_after_workers as usize).then(|| {
        format!(
            "quarantined: failed on {} distinct workers ({}); last: {error}",
            tally.job_workers.len(),
            tally.job_workers.join(", ")
        )
    });
    Verdict { quarantine, drain }
}

impl Scheduler {
    /// What a failed attempt leads to under the retry policy: a retry after a backoff with
    /// jitter, or giving up.
    fn retry_or_fail(&self, d: &Dispatch, error: String, transient: bool) -> Outcome {
        let attempt = d.attempt;
        let jitter = (self.random() >> 11) as f64 / (1u64 << 53) as f64;
        match self.cfg.retry.decide(attempt, transient, jitter) {
            Decision::RetryAfter(wait) => {
                let retry_in_ms = wait.as_millis() as u64;
                tracing::warn!(job_id = d.job_id, attempt, error, retry_in_ms, "render failed; will retry");
                Outcome::Retry { error, retry_at_ms: now_ms() + wait.as_millis() as i64 }
            }
            Decision::GiveUp => {
                tracing::error!(job_id = d.job_id, attempt, error, "render failed; giving up");
                Outcome::Failed { error }
            }
        }
    }

    /// Records a failed attempt, applies [`judge`], and drains the worker where it says so;
    /// the quarantine's outcome, where it says that.
    async fn weigh_failure(&self, r: &Report, error: &str) -> Result<Option<Outcome>, StoreError> {
        let rules = &self.cfg.broker;
        let failure = AttemptFailure {
            job_id: r.d.job_id.clone(),
            attempt: r.d.attempt,
            worker: r.worker.clone(),
            error: error.to_owned(),
            at_ms: r.finished_ms,
        };
        let since = now_ms() - (rules.drain_window_seconds * 1000) as i64;
        let tally = self.store.record_failure(failure, since).await?;
        let verdict = judge(&tally, rules, &r.d.job_id, error);
        if let Some(reason) = verdict.drain
            && self.store.set_drained(&r.worker, Some(&reason), now_ms()).await?
        {
            tracing::warn!(worker = r.worker, reason, "draining a worker");
            self.metrics.workers_drained.inc();
            self.registry.drain(DrainedWorker { worker_id: r.worker.clone(), reason, at_ms: now_ms() });
        }
        Ok(verdict.quarantine.map(|error| {
            tracing::error!(job_id = r.d.job_id, error, "quarantining a job");
            self.metrics.jobs_quarantined.inc();
            Outcome::Quarantined { error }
        }))
    }

    /// Records an attempt's end, whichever worker made it: a failure under the retry policy and
    /// the quarantine and drain rules, then the outcome in one write (the job moves to `running`
    /// first if its start was not written). `false` when the store failed: the caller tries again
    /// later (recording is idempotent by job and attempt). A repeat of an end already recorded,
    /// or of a stale attempt, changes nothing.
    #[tracing::instrument(level = "debug", skip_all, fields(job_id = %r.d.job_id, attempt = r.d.attempt, worker = %r.worker))]
    pub async fn settle(&self, r: &Report) -> bool {
        let mut outcome = match &r.ended {
            Ended::Succeeded { asset, bytes, provenance, png } => Outcome::Succeeded {
                asset: asset.clone(),
                bytes: *bytes,
                provenance: provenance.clone(),
                png: png.clone(),
            },
            Ended::Failed { error, transient } => self.retry_or_fail(&r.d, error.clone(), *transient),
        };
        if let Outcome::Retry { error, .. } | Outcome::Failed { error } = &outcome {
            match self.weigh_failure(r, error).await {
                Ok(Some(quarantined)) => outcome = quarantined,
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(job_id = r.d.job_id, error = %e, "cannot record a failed attempt");
                    return false;
                }
            }
        }
        let retry = matches!(outcome, Outcome::Retry { .. });
        let label = outcome.label();
        match self.store.record(&r.d, r.started_ms, outcome, now_ms()).await {
            Ok(events) => {
                // Nothing written: a repeat of an end already recorded (or a stale attempt).
                if !events.is_empty() {
                    self.metrics.attempts.with_label_values(&[r.d.tier.as_str(), label]).inc();
                }
                self.publish(events);
                if retry {
                    self.dispatch_wake.notify_one();
                }
                true
            }
            Err(e) => {
                tracing::error!(job_id = r.d.job_id, error = %e, "cannot record a result");
                false
            }
        }
    }

    /// A result from a worker over the broker, as a [`Report`] to settle: what it says, unless it
    /// fails the checks on what it carries ([`Self::check_inline`]) or names an asset that never
    /// arrived here, which fails the attempt (as a transient failure: another worker may do
    /// better). An error when the store cannot say whether the asset is here.
    #[tracing::instrument(level = "debug", skip_all, fields(job_id = %d.job_id, attempt = d.attempt, worker = %msg.worker))]
    pub async fn accept(&self, msg: &ResultMessage, d: Dispatch) -> Result<Report, StoreError> {
        let failed = |error| Ended::Failed { error, transient: true };
        let ended = match &msg.outcome {
            AttemptOutcome::Succeeded { asset, bytes, png, provenance } => {
                match self.check_inline(msg, asset, png.as_deref(), provenance.as_ref()) {
                    Err(error) => failed(error),
                    Ok(provenance) => {
                        let succeeded = |png: Option<&Vec<u8>>| Ended::Succeeded {
                            asset: asset.clone(),
                            bytes: png.map_or(*bytes, |p| p.len() as u64),
                            provenance,
                            png: png.cloned(),
                        };
                        if png.is_some() {
                            succeeded(png.as_ref())
                        } else if self.has_asset(asset).await? {
                            // Uploaded (or stored before) instead.
                            succeeded(None)
                        } else {
                            failed(format!("worker {} reported asset {asset}, which never arrived here", msg.worker))
                        }
                    }
                }
            }
            AttemptOutcome::Failed { error, transient } => {
                Ended::Failed { error: format!("on worker {}: {error}", msg.worker), transient: *transient }
            }
        };
        Ok(Report { d, worker: msg.worker.clone(), started_ms: msg.started_ms, finished_ms: msg.finished_ms, ended })
    }

    /// Checks what of an asset came inside its result instead of being uploaded: the PNG (against
    /// its hash and `limits.max_asset_bytes`), which is kept with the asset's row. Returns the
    /// provenance to record with the asset: the one the result carries, or for a PNG that came
    /// without one, what the result says of it; or why the attempt fails.
    fn check_inline(
        &self,
        msg: &ResultMessage,
        asset: &str,
        png: Option<&[u8]>,
        provenance: Option<&serde_json::Value>,
    ) -> Result<Option<String>, String> {
        let refused = |why: String| Err(format!("worker {} sent asset {asset} with its result, but {why}", msg.worker));
        if let Some(p) = provenance
            && p.get("asset").and_then(serde_json::Value::as_str) != Some(asset)
        {
            return refused("its provenance names another asset".into());
        }
        let record = match (png, provenance) {
            (_, Some(p)) => serde_json::to_string(p).ok(),
            (Some(_), None) => Some(
                serde_json::json!({
                    "asset": asset,
                    "request": msg.job.request,
                    "cache_key": msg.job.cache_key,
                    "worker": msg.worker,
                    "backend": msg.backend,
                    "started_ms": msg.started_ms,
                    "finished_ms": msg.finished_ms,
                })
                .to_string(),
            ),
            (None, None) => None,
        };
        let Some(png) = png else { return Ok(record) };
        let limit = self.cfg.limits.max_asset_bytes;
        if png.len() > limit {
            return refused(format!("its {} bytes are over limits.max_asset_bytes ({limit})", png.len()));
        }
        if blake3::hash(png).to_hex().as_str() != asset {
            return refused("its bytes do not hash to it (BLAKE3)".into());
        }
        // It is served as its own thumbnail too.
        match kiln_worker::assets::png_dimensions(png) {
            Some((w, h)) if own_thumbnail(w, h) => Ok(record),
            Some((w, h)) => refused(format!(
                "it is {w}×{h}: only an image that is its own thumbnail (at most {THUMB_SIDE} px a side) comes inline"
            )),
            None => refused("it is not a PNG".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(quarantine_after_workers: u32, drain_after_jobs: u32) -> BrokerConfig {
        BrokerConfig {
            quarantine_after_workers,
            drain_after_jobs,
            drain_window_seconds: 600,
            ..BrokerConfig::default()
        }
    }

    fn tally(workers: &[&str], worker_jobs: u32) -> FailureTally {
        FailureTally { job_workers: workers.iter().map(|w| (*w).to_owned()).collect(), worker_jobs }
    }

    #[test]
    fn a_job_that_failed_on_fewer_workers_than_the_rule_is_left_to_its_retries() {
        assert_eq!(judge(&tally(&["a", "b"], 1), &rules(3, 5), "j1", "boom"), Verdict::default());
    }

    #[test]
    fn a_job_that_failed_on_enough_distinct_workers_is_quarantined_naming_them() {
        let v = judge(&tally(&["a", "b", "c"], 1), &rules(3, 5), "j1", "boom");
        assert_eq!(v.quarantine.as_deref(), Some("quarantined: failed on 3 distinct workers (a, b, c); last: boom"));
        assert_eq!(v.drain, None);
    }

    #[test]
    fn a_worker_that_failed_enough_distinct_jobs_in_the_window_is_drained_naming_the_last() {
        let v = judge(&tally(&["a"], 5), &rules(3, 5), "j9", "no adapter");
        assert_eq!(v.drain.as_deref(), Some("failed 5 distinct jobs within 600 s (last: job j9: no adapter)"));
        assert_eq!(v.quarantine, None);
    }

    #[test]
    fn one_failure_can_both_quarantine_the_job_and_drain_the_worker() {
        let v = judge(&tally(&["a", "b"], 2), &rules(2, 2), "j1", "boom");
        assert!(v.quarantine.is_some() && v.drain.is_some(), "{v:?}");
    }
}
