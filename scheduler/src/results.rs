//! What the scheduler makes of an attempt's end, the same for the embedded farm's in-process
//! workers and the distributed farm's daemons: the checks a result from another machine must pass
//! ([`Scheduler::accept`]), the retry policy, the quarantine and drain rules ([`judge`], with no
//! I/O), and the one path that records it all ([`Scheduler::settle`]). Their spans (level
//! `debug`, as every per-job line) carry the job, the attempt and the worker.

use kiln_protocol::wire::{AttemptOutcome, JobMessage, ResultMessage};
use kiln_protocol::{JobState, now_ms};
use kiln_worker::render::{THUMB_SIDE, own_thumbnail};

use crate::config::BrokerConfig;
use crate::retry::Decision;
use crate::scheduler::Scheduler;
use crate::store::writer::refused_by_database;
use crate::store::{AttemptFailure, Dispatch, DrainedWorker, FailureTally, Job, Outcome, StoreError};

/// Why a result from the broker is refused before anything of it is recorded. Each is counted
/// (`kiln_scheduler_results_refused_total{reason}`) and the result dead-lettered with the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// It names a job this scheduler does not have.
    UnknownJob(String),
    /// The attempt it answers is not one this scheduler handed out and has not closed.
    AttemptNotOpen(String),
    /// It answers the job with another cache key, client or request than the job's own.
    NotItsRequest(String),
    /// Its sender is not a registered worker, or it does not prove it is.
    Unproven(String),
    /// The store refused to record it (a value the database does not take).
    StoreRefused(String),
}

impl Refusal {
    /// Its label in the metric.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::UnknownJob(_) => "unknown_job",
            Refusal::AttemptNotOpen(_) => "attempt_not_open",
            Refusal::NotItsRequest(_) => "not_its_request",
            Refusal::Unproven(_) => "unproven",
            Refusal::StoreRefused(_) => "store_refused",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::UnknownJob(s)
            | Refusal::AttemptNotOpen(s)
            | Refusal::NotItsRequest(s)
            | Refusal::Unproven(s)
            | Refusal::StoreRefused(s) => f.write_str(s),
        }
    }
}

/// The attempt a result answers, as the scheduler handed it out: `job` as stored (`None`: there
/// is no such job) must be the one the message names, with the same cache key, client and
/// request, and the attempt must be the job's current one (it started), or the next while the
/// job is `dispatched`, or `queued` with its message published but not yet marked sent (a
/// result may overtake the relay's mark, and a whole attempt is reported at once).
/// A result for the current attempt of a job that has ended since is let through: recording it
/// again changes nothing (at-least-once delivery repeats results), and an asset it made is kept.
pub fn open_attempt(job: Option<&Job>, m: &JobMessage) -> Result<Dispatch, Refusal> {
    let Some(job) = job else {
        return Err(Refusal::UnknownJob(format!("there is no job {}", m.job_id)));
    };
    attempt_open(job, m.attempt).map_err(Refusal::AttemptNotOpen)?;
    let differs = if m.cache_key != job.cache_key {
        Some("cache key")
    } else if m.client != job.client {
        Some("client")
    } else if m.request != job.request {
        Some("request")
    } else {
        None
    };
    if let Some(what) = differs {
        return Err(Refusal::NotItsRequest(format!("the result's {what} is not job {}'s", job.id)));
    }
    Ok(Dispatch {
        job_id: job.id.clone(),
        tier: job.tier,
        client: job.client.clone(),
        attempt: m.attempt,
        request: job.request.clone(),
        cache_key: job.cache_key.clone(),
        created_ms: job.created_ms,
    })
}

/// Whether `attempt` of `job` is one handed out and not superseded: the job's current attempt
/// (it started), or the next while the job is `dispatched`, or `queued` with its message
/// published but not yet marked sent. Else why not.
pub fn attempt_open(job: &Job, attempt: u32) -> Result<(), String> {
    // A job's `attempt` counts the attempts started: one handed out and not yet started is the
    // next one.
    let current = attempt == job.attempt && job.attempt > 0;
    let next = attempt == job.attempt + 1
        && matches!(job.state, JobState::Queued | JobState::Dispatched)
        && job.follows.is_none();
    if current || next {
        Ok(())
    } else {
        Err(format!(
            "attempt {attempt} of job {} is not open: the job is {} at attempt {}",
            job.id, job.state, job.attempt
        ))
    }
}

/// How [`Scheduler::settle`] went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Recorded (or a repeat that changed nothing).
    Recorded,
    /// The store failed: try again later (recording is idempotent by job and attempt).
    Again,
    /// The store refused it for good: trying again would fail again.
    Refused(String),
}

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

impl Settled {
    fn of(e: StoreError) -> Settled {
        if refused_by_database(&e) { Settled::Refused(format!("the store refused it: {e}")) } else { Settled::Again }
    }
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
    /// first if its start was not written). [`Settled::Again`] when the store failed: the caller
    /// tries again later (recording is idempotent by job and attempt); [`Settled::Refused`] when
    /// the database refused the write itself, which would fail again. A repeat of an end
    /// already recorded, or of a stale attempt, changes nothing.
    #[tracing::instrument(level = "debug", skip_all, fields(job_id = %r.d.job_id, attempt = r.d.attempt, worker = %r.worker))]
    pub async fn settle(&self, r: &Report) -> Settled {
        let mut outcome = match &r.ended {
            Ended::Succeeded { asset, bytes, provenance, png } => Outcome::Succeeded {
                asset: asset.clone(),
                bytes: *bytes,
                provenance: provenance.clone(),
                png: png.clone(),
                cost: Some(self.cost_of(r.d.tier, r.finished_ms - r.started_ms)),
            },
            Ended::Failed { error, transient } => self.retry_or_fail(&r.d, error.clone(), *transient),
        };
        if let Outcome::Succeeded { cost: Some(c), .. } = &outcome {
            self.estimates.note(&r.d.request, c.device_ms);
            if r.d.request.tile.is_some() {
                self.tile_workers.note(&r.d.job_id, &r.worker);
            }
        }
        if let Outcome::Retry { error, .. } | Outcome::Failed { error } = &outcome {
            match self.weigh_failure(r, error).await {
                Ok(Some(quarantined)) => outcome = quarantined,
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(job_id = r.d.job_id, error = %e, "cannot record a failed attempt");
                    return Settled::of(e);
                }
            }
        }
        self.record_outcome(&r.d, r.started_ms, outcome).await
    }

    /// Writes an attempt's outcome, counts it, tells listeners and, for a retry, wakes the
    /// dispatcher.
    pub(crate) async fn record_outcome(&self, d: &Dispatch, started_ms: i64, outcome: Outcome) -> Settled {
        let retry = matches!(outcome, Outcome::Retry { .. });
        let label = outcome.label();
        let gave_up = match &outcome {
            Outcome::Failed { error } => Some(("job_failed", error.clone())),
            Outcome::Quarantined { error } => Some(("job_quarantined", error.clone())),
            _ => None,
        };
        match self.store.record(d, started_ms, outcome, now_ms()).await {
            Ok(events) => {
                // Nothing written: a repeat of an end already recorded (or a stale attempt).
                if !events.is_empty() {
                    self.metrics.attempts.with_label_values(&[d.tier.as_str(), label]).inc();
                }
                let recorded = !events.is_empty();
                // A job out of attempts, or quarantined, needs the operator: raised before its end
                // is told, so whoever waits on the job finds the incident there.
                if let Some((kind, error)) = gave_up.filter(|_| recorded) {
                    let summary = format!(
                        "job {} {} at attempt {}: {error}",
                        d.job_id,
                        kind.trim_start_matches("job_"),
                        d.attempt
                    );
                    let cause = format!("job:{}", d.job_id);
                    if let Err(e) = self.raise_incident(kind, &d.job_id, &cause, &summary).await {
                        tracing::error!(job_id = d.job_id, error = %e, "cannot raise an incident");
                    }
                }
                self.publish(events);
                if retry {
                    self.dispatch_wake.notify_one();
                }
                Settled::Recorded
            }
            Err(e) => {
                tracing::error!(job_id = d.job_id, error = %e, "cannot record an attempt's end");
                Settled::of(e)
            }
        }
    }

    /// Ends attempt `d` whose message never reached a render: a worker refused it, or the broker
    /// dropped it (expired, over a length or delivery limit). Under the retry policy when the
    /// cause may pass (`transient`), failed at once otherwise; no worker is weighed for it. The
    /// jobs attached to it follow its end.
    #[tracing::instrument(level = "debug", skip_all, fields(job_id = %d.job_id, attempt = d.attempt))]
    pub async fn settle_undelivered(&self, d: &Dispatch, reason: String, transient: bool) -> Settled {
        let outcome = self.retry_or_fail(d, reason, transient);
        self.record_outcome(d, now_ms(), outcome).await
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

    #[test]
    fn every_refusal_has_a_series_in_the_metrics_from_the_start() {
        let all = [
            Refusal::UnknownJob(String::new()),
            Refusal::AttemptNotOpen(String::new()),
            Refusal::NotItsRequest(String::new()),
            Refusal::Unproven(String::new()),
            Refusal::StoreRefused(String::new()),
        ];
        let labels: Vec<&str> = all.iter().map(Refusal::label).collect();
        assert_eq!(labels, crate::metrics::REFUSAL_REASONS);
    }

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

    fn job(state: JobState, attempt: u32) -> Job {
        let request = kiln_protocol::RenderRequest::resolve(
            "cppn",
            "a kiln",
            7,
            kiln_protocol::Tier::Preview,
            Some(16),
            None,
            None,
            &kiln_protocol::TierLimits::default(),
        )
        .unwrap();
        Job {
            id: "j1".into(),
            state,
            tier: request.tier,
            request,
            cache_key: "k1".into(),
            client: "alice".into(),
            idempotency_key: None,
            follows: None,
            attempt,
            asset: None,
            error: None,
            created_ms: 1,
            updated_ms: 1,
            started_ms: None,
            finished_ms: None,
        }
    }

    fn answering(j: &Job, attempt: u32) -> JobMessage {
        JobMessage {
            v: kiln_protocol::wire::SCHEMA_VERSION,
            job_id: j.id.clone(),
            attempt,
            client: j.client.clone(),
            cache_key: j.cache_key.clone(),
            created_ms: j.created_ms,
            request: j.request.clone(),
        }
    }

    #[test]
    fn a_result_answers_only_the_attempt_handed_out_and_not_yet_superseded() {
        use JobState::*;
        // (job state, job attempt, result's attempt, let through)
        let cases = [
            (Dispatched, 0, 1, true),
            (Dispatched, 1, 2, true), // a retry, handed out
            (Running, 2, 2, true),
            (Queued, 0, 1, true),    // published, not yet marked sent
            (Queued, 1, 2, true),    // a retry's message, published, not yet marked
            (Succeeded, 1, 1, true), // a repeat: recording it again changes nothing
            (Cancelled, 1, 1, true), // its asset is still kept
            (Queued, 0, 0, false),
            (Queued, 0, 2, false),
            (Dispatched, 0, 2, false), // never handed out
            (Running, 2, 1, false),    // stale: a later attempt is out
            (Running, 1, 2, false),
            (Succeeded, 1, 2, false),
            (Failed, 3, 4, false),
        ];
        for (state, at, attempt, through) in cases {
            let j = job(state, at);
            let got = open_attempt(Some(&j), &answering(&j, attempt));
            match (&got, through) {
                (Ok(d), true) => assert_eq!((d.attempt, d.cache_key.as_str()), (attempt, "k1")),
                (Err(Refusal::AttemptNotOpen(why)), false) => {
                    assert!(why.starts_with(&format!("attempt {attempt} of job j1 is not open")), "{why}")
                }
                _ => panic!("{state} at attempt {at}, result for {attempt}: {got:?}"),
            }
        }
    }

    #[test]
    fn a_result_for_a_job_attached_to_another_or_unknown_is_refused() {
        let mut j = job(JobState::Queued, 0);
        j.follows = Some("j0".into());
        assert!(matches!(open_attempt(Some(&j), &answering(&j, 1)), Err(Refusal::AttemptNotOpen(_))));
        let got = open_attempt(None, &answering(&j, 1));
        assert_eq!(got, Err(Refusal::UnknownJob("there is no job j1".into())));
    }

    #[test]
    fn a_result_carrying_another_key_client_or_request_is_refused_naming_what_differs() {
        let j = job(JobState::Running, 1);
        let mut m = answering(&j, 1);
        m.cache_key = "forged".into();
        assert_eq!(
            open_attempt(Some(&j), &m),
            Err(Refusal::NotItsRequest("the result's cache key is not job j1's".into()))
        );
        let mut m = answering(&j, 1);
        m.client = "mallory".into();
        assert_eq!(
            open_attempt(Some(&j), &m),
            Err(Refusal::NotItsRequest("the result's client is not job j1's".into()))
        );
        let mut m = answering(&j, 1);
        m.request.seed += 1;
        assert_eq!(
            open_attempt(Some(&j), &m),
            Err(Refusal::NotItsRequest("the result's request is not job j1's".into()))
        );
        // The dispatch is the job's own, not the message's.
        let d = open_attempt(Some(&j), &answering(&j, 1)).unwrap();
        assert_eq!((d.client.as_str(), d.created_ms), ("alice", 1));
    }
}
