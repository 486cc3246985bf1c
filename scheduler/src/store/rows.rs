//! Decoding rows into the store's types, the same for SQLite and PostgreSQL: both stores keep
//! the same columns under the same names.

use std::str::FromStr;

use kiln_protocol::{JobState, RenderRequest, Tier};
use sqlx::Row;

use super::{Admission, Dispatch, Event, Job, NewJob, Outcome, Outgoing, StoreError, Submitted, TokenRow};

/// A column type both databases decode.
pub(super) trait ColType:
    for<'r> sqlx::Decode<'r, sqlx::Sqlite>
    + sqlx::Type<sqlx::Sqlite>
    + for<'r> sqlx::Decode<'r, sqlx::Postgres>
    + sqlx::Type<sqlx::Postgres>
{
}
impl<T> ColType for T where
    T: for<'r> sqlx::Decode<'r, sqlx::Sqlite>
        + sqlx::Type<sqlx::Sqlite>
        + for<'r> sqlx::Decode<'r, sqlx::Postgres>
        + sqlx::Type<sqlx::Postgres>
{
}

/// A row of either database.
pub(super) trait Cols {
    /// The column named `c`.
    fn col<T: ColType>(&self, c: &str) -> Result<T, sqlx::Error>;
}

impl Cols for sqlx::sqlite::SqliteRow {
    fn col<T: ColType>(&self, c: &str) -> Result<T, sqlx::Error> {
        self.try_get(c)
    }
}

impl Cols for sqlx::postgres::PgRow {
    fn col<T: ColType>(&self, c: &str) -> Result<T, sqlx::Error> {
        self.try_get(c)
    }
}

fn attempt_of(row: &impl Cols, what: &'static str) -> Result<u32, StoreError> {
    u32::try_from(row.col::<i64>("attempt")?).map_err(|e| corrupt(what, e))
}

/// An outbox row with its job, as the dispatcher reads it.
pub(super) fn outgoing_from_row(row: &impl Cols, live: bool) -> Result<Outgoing, StoreError> {
    let request: String = row.col("request")?;
    Ok(Outgoing {
        id: row.col("id")?,
        live,
        dispatch: Dispatch {
            job_id: row.col("job_id")?,
            tier: tier_of(row)?,
            client: row.col("client")?,
            attempt: attempt_of(row, "outbox attempt")?,
            request: serde_json::from_str(&request).map_err(|e| corrupt("job request", e))?,
            cache_key: row.col("cache_key")?,
            created_ms: row.col("created_ms")?,
        },
    })
}

/// A `dispatched` event from the columns `seq, job_id, attempt, tier, created_ms`.
pub(super) fn dispatched_event(row: &impl Cols, now_ms: i64) -> Result<Event, StoreError> {
    let tier = tier_of(row)?;
    let detail = format!("to the {tier} queue");
    let change = Change { detail: &detail, ..Change::default() };
    let job_id: String = row.col("job_id")?;
    let attempt = attempt_of(row, "event attempt")?;
    let created_ms = row.col("created_ms")?;
    Ok(event(
        row.col("seq")?,
        &job_id,
        tier,
        Some(JobState::Queued),
        created_ms,
        JobState::Dispatched,
        attempt,
        &change,
        now_ms,
    ))
}

/// A token row.
pub(super) fn token_from_row(row: &impl Cols) -> Result<TokenRow, StoreError> {
    let role: String = row.col("role")?;
    Ok(TokenRow {
        token_hash: row.col("token_hash")?,
        name: row.col("name")?,
        role: role.parse().map_err(|e| corrupt("token role", e))?,
        devices: row.col::<String>("devices")?.split(',').filter(|d| !d.is_empty()).map(str::to_owned).collect(),
        created_ms: row.col("created_ms")?,
        expires_ms: row.col("expires_ms")?,
        budget: match (row.col::<Option<i64>>("budget_seconds")?, row.col::<Option<String>>("budget_period")?) {
            (Some(seconds), Some(period)) => Some(crate::costs::Budget {
                seconds: u64::try_from(seconds).map_err(|e| corrupt("token budget", e))?,
                period: period.parse().map_err(|e| corrupt("token budget period", e))?,
            }),
            _ => None,
        },
    })
}

pub(super) fn corrupt(what: &'static str, message: impl ToString) -> StoreError {
    StoreError::Corrupt { what, message: message.to_string() }
}

pub(super) fn tier_of(row: &impl Cols) -> Result<Tier, StoreError> {
    Tier::from_str(&row.col::<String>("tier")?).map_err(|e| corrupt("tier", e))
}

pub(super) fn state_of(row: &impl Cols) -> Result<JobState, StoreError> {
    JobState::from_str(&row.col::<String>("state")?).map_err(|e| corrupt("state", e))
}

pub(super) fn job_from_row(row: &impl Cols) -> Result<Job, StoreError> {
    let request: String = row.col("request")?;
    let attempt: i64 = row.col("attempt")?;
    Ok(Job {
        id: row.col("id")?,
        state: state_of(row)?,
        tier: tier_of(row)?,
        request: serde_json::from_str::<RenderRequest>(&request).map_err(|e| corrupt("job request", e))?,
        cache_key: row.col("cache_key")?,
        client: row.col("client")?,
        idempotency_key: row.col("idempotency_key")?,
        follows: row.col("follows")?,
        attempt: u32::try_from(attempt).map_err(|e| corrupt("job attempt", e))?,
        asset: row.col("asset")?,
        error: row.col("error")?,
        created_ms: row.col("created_ms")?,
        updated_ms: row.col("updated_ms")?,
        started_ms: row.col("started_ms")?,
        finished_ms: row.col("finished_ms")?,
    })
}

pub(super) fn event_from_row(row: &impl Cols, tier: Tier) -> Result<Event, StoreError> {
    let attempt: i64 = row.col("attempt")?;
    Ok(Event {
        seq: row.col("seq")?,
        job_id: row.col("job_id")?,
        tier,
        from: None,
        created_ms: 0,
        at_ms: row.col("at_ms")?,
        state: state_of(row)?,
        attempt: u32::try_from(attempt).map_err(|e| corrupt("event attempt", e))?,
        detail: row.col("detail")?,
        asset: row.col("asset")?,
        error: row.col("error")?,
    })
}

/// What a transition writes besides its state.
#[derive(Default)]
pub(super) struct Change<'a> {
    /// The attempt, when it changes.
    pub attempt: Option<u32>,
    /// The event's note.
    pub detail: &'a str,
    /// The asset.
    pub asset: Option<&'a str>,
    /// The error.
    pub error: Option<&'a str>,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn event(
    seq: i64,
    job_id: &str,
    tier: Tier,
    from: Option<JobState>,
    created_ms: i64,
    to: JobState,
    attempt: u32,
    change: &Change<'_>,
    now_ms: i64,
) -> Event {
    Event {
        seq,
        job_id: job_id.to_owned(),
        tier,
        from,
        created_ms,
        at_ms: now_ms,
        state: to,
        attempt,
        detail: change.detail.to_owned(),
        asset: change.asset.map(str::to_owned),
        error: change.error.map(str::to_owned),
    }
}

/// A new job as its submit wrote it: its row (queued, attached to `follows`, or answered from the
/// cache with `asset`) and its first event, number `seq`.
pub(super) fn admitted(
    new: NewJob,
    seq: i64,
    state: JobState,
    follows: Option<String>,
    asset: Option<String>,
    detail: &str,
) -> Submitted {
    let admission = match (state, &follows) {
        (JobState::Cached, _) => Admission::Cached,
        (_, Some(_)) => Admission::Attached,
        _ => Admission::Queued,
    };
    let change = Change { detail, asset: asset.as_deref(), ..Change::default() };
    let event = event(seq, &new.id, new.request.tier, None, new.now_ms, state, 0, &change, new.now_ms);
    let job = Job {
        id: new.id,
        state,
        tier: new.request.tier,
        request: new.request,
        cache_key: new.cache_key,
        client: new.client,
        idempotency_key: new.idempotency_key,
        follows,
        attempt: 0,
        asset,
        error: None,
        created_ms: new.now_ms,
        updated_ms: new.now_ms,
        started_ms: None,
        finished_ms: state.is_terminal().then_some(new.now_ms),
    };
    Submitted { job, admission, events: vec![event] }
}

/// The note of the `running` event that starts `attempt`.
pub(super) fn start_detail(attempt: u32) -> String {
    format!("attempt {attempt}")
}

/// The `running` event, number `seq`, that started `d`'s attempt at `at_ms` (its note is
/// [`start_detail`]); the job was `from` before.
pub(super) fn start_event(seq: i64, d: &Dispatch, from: Option<JobState>, at_ms: i64) -> Event {
    let detail = start_detail(d.attempt);
    let change = Change { attempt: Some(d.attempt), detail: &detail, ..Change::default() };
    event(seq, &d.job_id, d.tier, from, d.created_ms, JobState::Running, d.attempt, &change, at_ms)
}

/// Whether a job (in `state` at `attempt`, attached to another or not) may start `d`: it leads
/// its render and waits for exactly that attempt, dispatched or (its result overtaking the
/// relay's bookkeeping) still queued.
pub(super) fn start_allowed(state: JobState, attempt: i64, attached: bool, d: &Dispatch) -> bool {
    matches!(state, JobState::Queued | JobState::Dispatched) && !attached && attempt + 1 == i64::from(d.attempt)
}

/// What recording an attempt's outcome writes: the leader's event, a retry's outbox row, and
/// the events of the jobs attached to it.
pub(super) struct Finish<'a> {
    pub to: JobState,
    pub detail: &'static str,
    pub asset: Option<&'a str>,
    pub bytes: Option<i64>,
    pub provenance: Option<&'a str>,
    /// The PNG kept with the asset's row, if it is.
    pub png: Option<&'a [u8]>,
    pub error: Option<&'a str>,
    pub retry_at: Option<i64>,
    pub followers_to: Option<JobState>,
    pub followers_detail: String,
}

/// A success's row of `render_costs`, as the statements that write it read it (the job's client
/// and tier come from its row, where it is still `succeeded` at this attempt).
#[derive(Debug, Clone, serde::Serialize)]
pub(super) struct Charge<'a> {
    pub job: &'a str,
    pub attempt: i64,
    pub w: i64,
    pub h: i64,
    pub s: i64,
    pub device: i64,
    pub cost: i64,
    pub now: i64,
}

impl<'a> Charge<'a> {
    /// The charge for attempt `d`'s end, if it cost anything.
    pub fn of(d: &'a Dispatch, outcome: &Outcome, now_ms: i64) -> Option<Charge<'a>> {
        let Outcome::Succeeded { cost: Some(c), .. } = outcome else { return None };
        Some(Charge {
            job: &d.job_id,
            attempt: i64::from(d.attempt),
            w: i64::from(d.request.width),
            h: i64::from(d.request.out_rows()),
            s: i64::from(d.request.samples),
            device: c.device_ms,
            cost: c.cost_ms,
            now: now_ms,
        })
    }
}

impl<'a> Finish<'a> {
    pub fn new(d: &Dispatch, outcome: &'a Outcome) -> Finish<'a> {
        let png = match outcome {
            Outcome::Succeeded { png, .. } => png.as_deref(),
            _ => None,
        };
        let (to, detail, asset, bytes, provenance, error, retry_at, followers_to) = match outcome {
            Outcome::Succeeded { asset, bytes, provenance, .. } => {
                let bytes = i64::try_from(*bytes).unwrap_or(i64::MAX);
                (
                    JobState::Succeeded,
                    "rendered",
                    Some(asset.as_str()),
                    Some(bytes),
                    provenance.as_deref(),
                    None,
                    None,
                    Some(JobState::Succeeded),
                )
            }
            Outcome::Retry { error, retry_at_ms } => (
                JobState::Queued,
                "attempt failed; retrying",
                None,
                None,
                None,
                Some(error.as_str()),
                Some(*retry_at_ms),
                None,
            ),
            Outcome::Failed { error } | Outcome::Quarantined { error } => (
                JobState::Failed,
                if matches!(outcome, Outcome::Quarantined { .. }) {
                    "quarantined: failed on too many distinct workers"
                } else {
                    "attempt failed; giving up"
                },
                None,
                None,
                None,
                Some(error.as_str()),
                None,
                Some(JobState::Failed),
            ),
        };
        let followers_detail = match followers_to {
            Some(JobState::Succeeded) => format!("served by the render of job {}", d.job_id),
            _ => format!("the render of job {} failed", d.job_id),
        };
        Finish { to, detail, asset, bytes, provenance, png, error, retry_at, followers_to, followers_detail }
    }

    /// The event of the job that ran.
    pub fn lead_event(&self, d: &Dispatch, seq: i64, now_ms: i64) -> Event {
        let change = Change { detail: self.detail, asset: self.asset, error: self.error, attempt: None };
        event(seq, &d.job_id, d.tier, Some(JobState::Running), d.created_ms, self.to, d.attempt, &change, now_ms)
    }

    /// The event of a job attached to it.
    pub fn follower_event(&self, d: &Dispatch, seq: i64, job_id: &str, created_ms: i64, now_ms: i64) -> Event {
        let change = Change { detail: &self.followers_detail, asset: self.asset, error: self.error, attempt: None };
        let state = self.followers_to.unwrap_or(self.to);
        event(seq, job_id, d.tier, Some(JobState::Queued), created_ms, state, 0, &change, now_ms)
    }
}
