//! The scheduler's durable state behind one trait: jobs and their append-only event log, the
//! outbox of jobs to hand to workers, assets and API tokens. SQLite here (embedded mode);
//! PostgreSQL implements the same trait for the distributed mode.
//!
//! Every method that changes a job appends events and updates the job row (their projection) in
//! one transaction, and returns the events so the caller can publish them once they are durable.

mod admit;
pub mod costs;
pub mod fleet;
pub mod orders;
pub mod postgres;
mod reads;
mod rows;
mod shared;
pub mod sqlite;
pub mod writer;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;

use kiln_protocol::{JobState, RenderRequest, Tier};
use serde::Serialize;

pub use postgres::PgStore;
pub use reads::JobReads;
pub use sqlite::SqliteStore;

/// A boxed future, so the trait stays usable as `dyn Store`.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value does not parse (a corrupt or newer database).
    #[error("database holds a bad {what}: {message}")]
    Corrupt {
        /// Which value.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// The writer task is gone (the store is shutting down).
    #[error("the store is shut down")]
    Closed,
    /// The write was rolled back with the rest of its transaction; trying again may work.
    #[error("database write rolled back: {0}")]
    RolledBack(String),
    /// A read shared with other callers failed ([`JobReads`]).
    #[error("database read: {0}")]
    Read(String),
    /// A name that must be unique is taken.
    #[error("{0} already exists")]
    Conflict(String),
}

/// A job as stored: the projection of its events.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    /// Its id.
    pub id: String,
    /// Its state.
    pub state: JobState,
    /// Its tier.
    pub tier: Tier,
    /// The resolved request (sizes, samples, normalised prompt, seed).
    pub request: RenderRequest,
    /// The cache key.
    pub cache_key: String,
    /// The name of the token that submitted it.
    pub client: String,
    /// The submitter's idempotency key.
    pub idempotency_key: Option<String>,
    /// The job whose render this one is attached to (single flight).
    pub follows: Option<String>,
    /// Attempts made (0 before the first).
    pub attempt: u32,
    /// The asset, once succeeded or cached.
    pub asset: Option<String>,
    /// The last error.
    pub error: Option<String>,
    /// Creation time, unix milliseconds.
    pub created_ms: i64,
    /// Last change, unix milliseconds.
    pub updated_ms: i64,
    /// When the render started, unix milliseconds.
    pub started_ms: Option<i64>,
    /// When it ended, unix milliseconds.
    pub finished_ms: Option<i64>,
}

/// One transition in a job's life.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Order of events across all jobs.
    pub seq: i64,
    /// The job.
    pub job_id: String,
    /// The job's tier (not stored with the event; carried for metrics).
    #[serde(skip)]
    pub tier: Tier,
    /// The state before (not stored; carried for metrics). `None` for a new job.
    #[serde(skip)]
    pub from: Option<JobState>,
    /// When the job was created, unix milliseconds (not stored with the event; for metrics).
    #[serde(skip)]
    pub created_ms: i64,
    /// When, unix milliseconds.
    pub at_ms: i64,
    /// The state it moved to.
    pub state: JobState,
    /// The attempt.
    pub attempt: u32,
    /// A short human note: why, or what happened.
    pub detail: String,
    /// The asset, for `succeeded` and `cached`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asset: Option<String>,
    /// The error, for `failed` and retries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A job to create.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Its id.
    pub id: String,
    /// The resolved request.
    pub request: RenderRequest,
    /// Its cache key.
    pub cache_key: String,
    /// The submitting token's name.
    pub client: String,
    /// The idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// Creation time, unix milliseconds.
    pub now_ms: i64,
}

/// How a submit was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A new job, queued for a render.
    Queued,
    /// A new job answered at once from an asset already stored for its key.
    Cached,
    /// A new job attached to a live render of the same key.
    Attached,
    /// The idempotency key matched an earlier job, which is returned.
    Existing,
}

/// The result of [`Store::submit`].
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The job.
    pub job: Job,
    /// How it was admitted.
    pub admission: Admission,
    /// Events written.
    pub events: Vec<Event>,
}

/// A job handed to the worker queue, with what the worker needs to run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    /// The job.
    pub job_id: String,
    /// Its tier.
    pub tier: Tier,
    /// Who submitted it (for fairness within the tier).
    pub client: String,
    /// The attempt the worker makes.
    pub attempt: u32,
    /// The resolved request.
    pub request: RenderRequest,
    /// Its cache key.
    pub cache_key: String,
    /// When the job was created, unix milliseconds.
    pub created_ms: i64,
}

/// How a render ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// It made an asset.
    Succeeded {
        /// BLAKE3 of the PNG.
        asset: String,
        /// Its size.
        bytes: u64,
        /// Its provenance record (JSON), kept with the asset's row; the first one recorded for
        /// an asset stays. `None` where it is kept elsewhere (a file in the asset store).
        provenance: Option<String>,
        /// The PNG itself where it is kept with the asset's row (a small one, held in memory:
        /// see [`kiln_worker::assets::SPILL_BYTES`]); the first one recorded for an asset stays.
        /// `None` where it is a file in the asset store.
        png: Option<Vec<u8>>,
        /// What it cost, charged to its client in the transaction that records it; `None` for
        /// nothing charged.
        cost: Option<Cost>,
    },
    /// It failed and will be tried again at `retry_at_ms`.
    Retry {
        /// The error.
        error: String,
        /// When, unix milliseconds.
        retry_at_ms: i64,
    },
    /// It failed for good.
    Failed {
        /// The error.
        error: String,
    },
    /// It failed on too many distinct workers: the job is poison, and fails for good.
    Quarantined {
        /// Why, naming the workers, and the last error.
        error: String,
    },
}

/// What a render cost ([`Outcome::Succeeded`]): a row of `render_costs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// The device time it took on its worker, milliseconds.
    pub device_ms: i64,
    /// That time weighed by its tier (`[scheduler.costs]`), milliseconds.
    pub cost_ms: i64,
}

impl Outcome {
    /// Its name in the attempts metric: succeeded, retry, failed or quarantined.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Succeeded { .. } => "succeeded",
            Outcome::Retry { .. } => "retry",
            Outcome::Failed { .. } => "failed",
            Outcome::Quarantined { .. } => "quarantined",
        }
    }
}

/// Outbox rows a transport marked sent, as jobs for workers.
#[derive(Debug, Clone, Default)]
pub struct Due {
    /// The jobs, now `dispatched`.
    pub jobs: Vec<Dispatch>,
    /// When the next row not yet due falls due, unix milliseconds.
    pub next_due_ms: Option<i64>,
}

impl Due {
    /// The live rows of `pending` whose jobs the mark moved to `dispatched` (`moved`), each once.
    pub fn of(pending: Pending, moved: &std::collections::HashSet<String>) -> Due {
        let mut seen = std::collections::HashSet::new();
        let jobs = pending
            .rows
            .into_iter()
            .filter(|o| o.live && moved.contains(o.dispatch.job_id.as_str()) && seen.insert(o.dispatch.job_id.clone()))
            .map(|o| o.dispatch)
            .collect();
        Due { jobs, next_due_ms: pending.next_due_ms }
    }
}

/// A worker's result to record: the arguments of [`Store::record`].
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    /// The attempt.
    pub d: Dispatch,
    /// When the worker started it, unix milliseconds.
    pub started_ms: i64,
    /// How it ended.
    pub outcome: Outcome,
    /// Now, unix milliseconds.
    pub now_ms: i64,
}

/// An outbox row due for the broker.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The row.
    pub id: i64,
    /// Whether its job still waits for it; a row whose job was cancelled (or moved on) is only
    /// marked sent.
    pub live: bool,
    /// What the worker gets.
    pub dispatch: Dispatch,
}

/// What [`Store::pending`] found.
#[derive(Debug, Clone, Default)]
pub struct Pending {
    /// The due rows, oldest first.
    pub rows: Vec<Outgoing>,
    /// When the next row not yet due falls due, unix milliseconds.
    pub next_due_ms: Option<i64>,
}

/// A job as a change left it, with the events written; `None` when there was nothing to change.
pub type JobChange = Option<(Job, Vec<Event>)>;

/// How many jobs a tier has in a state.
pub type StateCount = (Tier, JobState, i64);

/// Filters and page for [`Store::list`].
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only jobs of this tier.
    pub tier: Option<Tier>,
    /// Only jobs created at or after (unix ms).
    pub since_ms: Option<i64>,
    /// Only jobs created before (unix ms).
    pub until_ms: Option<i64>,
    /// Only this client's jobs.
    pub client: Option<String>,
    /// Page size.
    pub limit: u32,
    /// Continue after this cursor (from the previous page), newest first.
    pub before_seq: Option<i64>,
}

/// A page of jobs.
#[derive(Debug, Clone)]
pub struct Page {
    /// The jobs, newest first.
    pub jobs: Vec<Job>,
    /// The cursor for the next page, if there may be one.
    pub next: Option<i64>,
}

/// A stored API token (its hash, never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    /// BLAKE3 hex of the secret.
    pub token_hash: String,
    /// A unique name: who holds it.
    pub name: String,
    /// Its role.
    pub role: crate::auth::Role,
    /// The devices it serves (a device token); empty for others.
    pub devices: Vec<String>,
    /// When it was made (as read; a new token's is the time it is added).
    pub created_ms: i64,
    /// When it stops working; never when `None`.
    pub expires_ms: Option<i64>,
    /// What it may spend; no limit when `None`.
    pub budget: Option<crate::costs::Budget>,
}

/// The scheduler's durable state.
pub trait Store: fleet::FleetStore + orders::OrderStore + costs::CostStore + Send + Sync + 'static {
    /// Admits a job in one transaction: an earlier job with the same idempotency key, else a
    /// `cached` job when an asset exists for the key, else a job attached to a live render of the
    /// same key, else a new `queued` job with an outbox row.
    fn submit(&self, job: NewJob) -> BoxFut<'_, Result<Submitted, StoreError>>;

    /// Reads up to `limit` due outbox rows without changing them (a transport takes them, then
    /// calls [`Store::mark_sent`]: see [`crate::dispatch`]).
    fn pending(&self, now_ms: i64, limit: u32) -> BoxFut<'_, Result<Pending, StoreError>>;

    /// [`Store::pending`] and [`Store::mark_sent`] of the rows it found, in one write: for a
    /// transport that marks rows before it hands them over (the in-process queue).
    fn read_and_mark(&self, now_ms: i64, limit: u32) -> BoxFut<'_, Result<(Pending, Vec<Event>), StoreError>>;

    /// Marks outbox rows sent and moves each job still waiting for that attempt to `dispatched`.
    fn mark_sent(&self, ids: Vec<i64>, now_ms: i64) -> BoxFut<'_, Result<Vec<Event>, StoreError>>;

    /// Moves a job waiting for the dispatch's attempt (`queued` with the row sent but not yet
    /// marked, or `dispatched`) to `running`; `None` when it is no longer that attempt's to run
    /// (cancelled, or a stale delivery).
    fn start(&self, d: &Dispatch, now_ms: i64) -> BoxFut<'_, Result<Option<Event>, StoreError>>;

    /// Records how `attempt` of a job ended, and moves every job attached to it. Idempotent by
    /// job id and attempt: a second report changes nothing. A stored asset is recorded even when
    /// the job was cancelled meanwhile.
    fn finish(&self, d: &Dispatch, outcome: Outcome, now_ms: i64) -> BoxFut<'_, Result<Vec<Event>, StoreError>>;

    /// A worker's whole attempt reported at once (distributed mode): [`Store::start`] at
    /// `started_ms` (unless the start is recorded already) and then [`Store::finish`], in one
    /// write. Idempotent by job id and attempt, as both are.
    fn record(
        &self,
        d: &Dispatch,
        started_ms: i64,
        outcome: Outcome,
        now_ms: i64,
    ) -> BoxFut<'_, Result<Vec<Event>, StoreError>>;

    /// Cancels a live job. A cancelled job's attached jobs pass to the oldest of them, which is
    /// queued for its own render. Returns the job as it now is, or `None` if there is no such job.
    fn cancel(&self, job_id: &str, by: &str, now_ms: i64) -> BoxFut<'_, Result<JobChange, StoreError>>;

    /// After a restart of the embedded farm: every job that was dispatched or running is queued
    /// again with a fresh outbox row (its worker died with the process).
    fn resume(&self, now_ms: i64) -> BoxFut<'_, Result<Vec<Event>, StoreError>>;

    /// One job.
    fn job(&self, id: &str) -> BoxFut<'_, Result<Option<Job>, StoreError>>;
    /// The jobs among `ids` that exist, in no particular order (a few reads for many jobs).
    fn jobs(&self, ids: Vec<String>) -> BoxFut<'_, Result<Vec<Job>, StoreError>>;
    /// A page of jobs.
    fn list(&self, q: ListQuery) -> BoxFut<'_, Result<Page, StoreError>>;
    /// A job's events after `after_seq`, in order.
    fn events(&self, job_id: &str, after_seq: i64) -> BoxFut<'_, Result<Vec<Event>, StoreError>>;
    /// The provenance recorded with an asset: `None` when the asset has no row, or its row has
    /// none (its provenance, if any, is a file in the asset store).
    fn provenance(&self, hash: &str) -> BoxFut<'_, Result<Option<String>, StoreError>>;
    /// The PNG kept with an asset's row: `None` when the asset has no row, or its PNG is a
    /// file in the asset store.
    fn asset_png(&self, hash: &str) -> BoxFut<'_, Result<Option<Vec<u8>>, StoreError>>;
    /// Whether an asset is one `client` may read (a job of theirs has it: its render, or a cached
    /// answer) or one any of `devices` may (a task of theirs works on it).
    fn asset_readable(
        &self,
        hash: &str,
        client: Option<String>,
        devices: Vec<String>,
    ) -> BoxFut<'_, Result<bool, StoreError>>;
    /// Jobs by tier and state, for the metrics.
    fn counts(&self) -> BoxFut<'_, Result<Vec<StateCount>, StoreError>>;

    /// The group-commit writer's metrics (its load: see [`writer::WriterMetrics`]).
    fn writer_metrics(&self) -> writer::WriterMetrics;

    /// Answers when the database does (for `/healthz`).
    fn ping(&self) -> BoxFut<'_, Result<(), StoreError>>;

    /// Every token that is not revoked.
    fn tokens(&self) -> BoxFut<'_, Result<Vec<TokenRow>, StoreError>>;
    /// Adds a token; a taken name is a [`StoreError::Conflict`].
    fn add_token(&self, token: TokenRow, now_ms: i64) -> BoxFut<'_, Result<(), StoreError>>;
    /// Revokes the token named `name` (its name is then free); `false` when there is none.
    fn revoke_token(&self, name: String, now_ms: i64) -> BoxFut<'_, Result<bool, StoreError>>;

    /// Records a worker's failed attempt (once per job and attempt: a repeat changes nothing)
    /// and tallies what the quarantine and drain rules weigh: the distinct workers this job has
    /// failed on, and the distinct jobs this worker has failed since `since_ms` (or since the
    /// operator last resumed it, if later).
    fn record_failure(&self, f: AttemptFailure, since_ms: i64) -> BoxFut<'_, Result<FailureTally, StoreError>>;
    /// Drains a worker (`Some(reason)`; `true` when it was not drained already) or resumes it
    /// (`None`; `true` when it was drained).
    fn set_drained(&self, worker: &str, reason: Option<&str>, now_ms: i64) -> BoxFut<'_, Result<bool, StoreError>>;
    /// The workers drained now, by id.
    fn drained(&self) -> BoxFut<'_, Result<Vec<DrainedWorker>, StoreError>>;

    /// Retention: deletes the jobs that ended before `jobs_before_ms` (with their events, outbox
    /// rows and failures) and the device tasks that ended before it (with their events), then the
    /// asset rows made before `assets_before_ms` that no job or task left names. Returns what went.
    fn prune(&self, jobs_before_ms: i64, assets_before_ms: i64) -> BoxFut<'_, Result<Pruned, StoreError>>;
    /// Which of `hashes` a job or device task names (an asset still needed).
    fn assets_named(&self, hashes: Vec<String>) -> BoxFut<'_, Result<Vec<String>, StoreError>>;
}

/// What [`Store::prune`] deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Jobs.
    pub jobs: u64,
    /// Device tasks.
    pub tasks: u64,
    /// The asset rows, by hash: their files go too.
    pub assets: Vec<String>,
}

/// A worker's failed attempt at a job (distributed mode).
#[derive(Debug, Clone)]
pub struct AttemptFailure {
    /// The job.
    pub job_id: String,
    /// The attempt that failed.
    pub attempt: u32,
    /// The worker it failed on.
    pub worker: String,
    /// What went wrong.
    pub error: String,
    /// When, unix milliseconds.
    pub at_ms: i64,
}

/// What the quarantine and drain rules weigh after a failure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailureTally {
    /// The distinct workers the job has failed on, by id.
    pub job_workers: Vec<String>,
    /// The distinct jobs the worker has failed within the window.
    pub worker_jobs: u32,
}

/// A worker the scheduler drained.
pub use kiln_protocol::api::DrainedWorker;
