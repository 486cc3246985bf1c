//! The SQLite store: WAL, one writer connection with group commit, a pool of readers.
//!
//! Every change goes through one writer task. It takes whatever operations are waiting (up to
//! [`MAX_BATCH`]), runs them in one transaction, commits once, and only then answers their
//! callers: a caller never hears "done" for a write that is not durable, and a burst of submits
//! costs one commit instead of hundreds. If any operation in a batch fails, the whole batch rolls
//! back and every caller in it gets an error (a refusal that writes nothing, like a taken token
//! name, is an answer, not a failure), so no half-done operation is ever committed. Being the only writer also makes the
//! submit's cache and single-flight checks race-free. `synchronous = NORMAL` under WAL keeps
//! every committed transaction through a crash of the process; a power cut may lose the last
//! few (SQLite's documented trade), never corrupt the file.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use kiln_protocol::{JobState, RenderRequest, Tier};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, Row, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use super::{
    Admission, BoxFut, Dispatch, Due, Event, Job, JobChange, ListQuery, NewJob, Outcome, Page, StateCount, Store,
    StoreError, Submitted, TokenRow,
};

/// Most operations one transaction takes.
pub const MAX_BATCH: usize = 512;

type OpFn<T> = Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFut<'c, Result<T, StoreError>> + Send>;

/// One queued write: runs inside the batch's transaction, answers after the commit.
trait WriteOp: Send {
    /// Runs the write; `false` when it failed and the batch must be rolled back.
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFut<'c, bool>;
    /// Answers the caller: its own result if the commit held, else the commit's error.
    fn finish(self: Box<Self>, commit: Result<(), String>);
}

struct Op<T> {
    f: Option<OpFn<T>>,
    out: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T: Send + 'static> WriteOp for Op<T> {
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFut<'c, bool> {
        Box::pin(async move {
            let Some(f) = self.f.take() else { return false };
            let r = f(conn).await;
            let ok = r.is_ok();
            self.out = Some(r);
            ok
        })
    }

    fn finish(self: Box<Self>, commit: Result<(), String>) {
        let out = match (commit, self.out) {
            (_, Some(Err(e))) => Err(e),
            (Ok(()), Some(Ok(v))) => Ok(v),
            (Err(e), Some(Ok(_))) => Err(StoreError::RolledBack(e)),
            (Err(e), None) => Err(StoreError::RolledBack(e)),
            (Ok(()), None) => Err(StoreError::Closed),
        };
        let _ = self.reply.send(out);
    }
}

/// The SQLite store.
#[derive(Clone)]
pub struct SqliteStore {
    writer: mpsc::Sender<Box<dyn WriteOp>>,
    read: SqlitePool,
}

fn options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        // The writer never checkpoints inside a commit (that would stall every caller in the
        // batch); a background task checkpoints from its own connection instead.
        let mut conn = options(path).pragma("wal_autocheckpoint", "0").connect().await?;
        sqlx::migrate!("./migrations/sqlite").run(&mut conn).await?;
        let read =
            SqlitePoolOptions::new().max_connections(4).connect_with(options(path).create_if_missing(false)).await?;
        let checkpoints = options(path).create_if_missing(false).connect().await?;
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(writer(conn, rx));
        tokio::spawn(checkpointer(checkpoints, tx.downgrade()));
        Ok(SqliteStore { writer: tx, read })
    }

    async fn write<T: Send + 'static>(&self, f: OpFn<T>) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let op: Box<dyn WriteOp> = Box::new(Op { f: Some(f), out: None, reply });
        self.writer.send(op).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// Copies the WAL back into the database every second without blocking the writer (`PASSIVE`),
/// until the store is dropped.
async fn checkpointer(mut conn: SqliteConnection, store: mpsc::WeakSender<Box<dyn WriteOp>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if store.upgrade().is_none() {
            break;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut conn).await {
            tracing::warn!(error = %e, "store: WAL checkpoint failed; trying again in a second");
        }
    }
    let _ = conn.close().await;
}

async fn writer(mut conn: SqliteConnection, mut rx: mpsc::Receiver<Box<dyn WriteOp>>) {
    let mut batch: Vec<Box<dyn WriteOp>> = Vec::with_capacity(MAX_BATCH);
    let (mut busy, mut ops, mut batches, started) = (0f64, 0usize, 0usize, std::time::Instant::now());
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let t = std::time::Instant::now();
        let commit = run_batch(&mut conn, &mut batch).await.map_err(|e| e.to_string());
        busy += t.elapsed().as_secs_f64();
        ops += batch.len();
        batches += 1;
        if let Err(e) = &commit {
            tracing::error!(error = %e, ops = batch.len(), "store: a transaction rolled back; its callers are told");
        }
        for op in batch.drain(..) {
            op.finish(commit.clone());
        }
    }
    let up = started.elapsed().as_secs_f64();
    tracing::info!(busy_seconds = busy, up_seconds = up, ops, batches, "store writer stopped");
    let _ = conn.close().await;
}

async fn run_batch(conn: &mut SqliteConnection, batch: &mut [Box<dyn WriteOp>]) -> Result<(), sqlx::Error> {
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    for op in batch.iter_mut() {
        if !op.run(conn).await {
            sqlx::query("ROLLBACK").execute(&mut *conn).await?;
            return Err(sqlx::Error::Protocol(
                "another write in the same transaction failed; nothing was written".into(),
            ));
        }
    }
    if let Err(e) = sqlx::query("COMMIT").execute(&mut *conn).await {
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        return Err(e);
    }
    Ok(())
}

fn corrupt(what: &'static str, message: impl ToString) -> StoreError {
    StoreError::Corrupt { what, message: message.to_string() }
}

fn tier_of(row: &sqlx::sqlite::SqliteRow) -> Result<Tier, StoreError> {
    Tier::from_str(&row.try_get::<String, _>("tier")?).map_err(|e| corrupt("tier", e))
}

fn state_of(row: &sqlx::sqlite::SqliteRow) -> Result<JobState, StoreError> {
    JobState::from_str(&row.try_get::<String, _>("state")?).map_err(|e| corrupt("state", e))
}

fn job_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Job, StoreError> {
    let request: String = row.try_get("request")?;
    let attempt: i64 = row.try_get("attempt")?;
    Ok(Job {
        id: row.try_get("id")?,
        state: state_of(row)?,
        tier: tier_of(row)?,
        request: serde_json::from_str::<RenderRequest>(&request).map_err(|e| corrupt("job request", e))?,
        cache_key: row.try_get("cache_key")?,
        client: row.try_get("client")?,
        idempotency_key: row.try_get("idempotency_key")?,
        follows: row.try_get("follows")?,
        attempt: u32::try_from(attempt).map_err(|e| corrupt("job attempt", e))?,
        asset: row.try_get("asset")?,
        error: row.try_get("error")?,
        created_ms: row.try_get("created_ms")?,
        updated_ms: row.try_get("updated_ms")?,
        started_ms: row.try_get("started_ms")?,
        finished_ms: row.try_get("finished_ms")?,
    })
}

fn event_from_row(row: &sqlx::sqlite::SqliteRow, tier: Tier) -> Result<Event, StoreError> {
    let attempt: i64 = row.try_get("attempt")?;
    Ok(Event {
        seq: row.try_get("seq")?,
        job_id: row.try_get("job_id")?,
        tier,
        from: None,
        created_ms: 0,
        at_ms: row.try_get("at_ms")?,
        state: state_of(row)?,
        attempt: u32::try_from(attempt).map_err(|e| corrupt("event attempt", e))?,
        detail: row.try_get("detail")?,
        asset: row.try_get("asset")?,
        error: row.try_get("error")?,
    })
}

async fn load_job(conn: &mut SqliteConnection, id: &str) -> Result<Option<Job>, StoreError> {
    let row = sqlx::query("SELECT * FROM jobs WHERE id = ?").bind(id).fetch_optional(&mut *conn).await?;
    row.as_ref().map(job_from_row).transpose()
}

/// What a transition writes besides its state.
#[derive(Default)]
struct Change<'a> {
    attempt: Option<u32>,
    detail: &'a str,
    asset: Option<&'a str>,
    error: Option<&'a str>,
}

/// Appends an event moving `job` to `to`; the `job_events_project` trigger projects it onto the
/// job row (the one place that projection is written: read the row back for the job as it is now).
async fn transition(
    conn: &mut SqliteConnection,
    job: &Job,
    to: JobState,
    change: Change<'_>,
    now_ms: i64,
) -> Result<Event, StoreError> {
    let attempt = change.attempt.unwrap_or(job.attempt);
    let seq = append_event(conn, &job.id, to, attempt, &change, now_ms).await?;
    Ok(event(seq, &job.id, job.tier, Some(job.state), job.created_ms, to, attempt, &change, now_ms))
}

/// Appends an event for `job_id`; with a guard, only while the job is in that state at that
/// attempt (`None` when it is not). The trigger projects it onto the job row.
async fn insert_event(
    conn: &mut SqliteConnection,
    job_id: &str,
    to: JobState,
    attempt: u32,
    change: &Change<'_>,
    now_ms: i64,
    guard: Option<(JobState, u32)>,
) -> Result<Option<i64>, StoreError> {
    Ok(sqlx::query_scalar(
        "INSERT INTO job_events (job_id, at_ms, state, attempt, detail, asset, error) \
         SELECT id, ?2, ?3, ?4, ?5, ?6, ?7 FROM jobs \
         WHERE id = ?1 AND (?8 IS NULL OR (state = ?8 AND attempt = ?9)) RETURNING seq",
    )
    .bind(job_id)
    .bind(now_ms)
    .bind(to.as_str())
    .bind(i64::from(attempt))
    .bind(change.detail)
    .bind(change.asset)
    .bind(change.error)
    .bind(guard.map(|(s, _)| s.as_str()))
    .bind(guard.map(|(_, a)| i64::from(a)))
    .fetch_optional(&mut *conn)
    .await?)
}

/// [`insert_event`] for a job that must exist.
async fn append_event(
    conn: &mut SqliteConnection,
    job_id: &str,
    to: JobState,
    attempt: u32,
    change: &Change<'_>,
    now_ms: i64,
) -> Result<i64, StoreError> {
    insert_event(conn, job_id, to, attempt, change, now_ms, None)
        .await?
        .ok_or_else(|| corrupt("event", format!("job {job_id} is missing")))
}

/// Appends an event for a dispatched job only if it is still in `expect` at `attempt_now`.
async fn insert_event_if(
    conn: &mut SqliteConnection,
    d: &Dispatch,
    expect: JobState,
    attempt_now: u32,
    to: JobState,
    change: &Change<'_>,
    now_ms: i64,
) -> Result<Option<Event>, StoreError> {
    let attempt = change.attempt.unwrap_or(attempt_now);
    let seq = insert_event(conn, &d.job_id, to, attempt, change, now_ms, Some((expect, attempt_now))).await?;
    Ok(seq.map(|seq| event(seq, &d.job_id, d.tier, Some(expect), d.created_ms, to, attempt, change, now_ms)))
}

#[allow(clippy::too_many_arguments)]
fn event(
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

/// Queues a job's next attempt for a worker.
async fn insert_outbox(conn: &mut SqliteConnection, job: &Job, not_before: i64) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO outbox (job_id, tier, client, attempt, not_before) VALUES (?, ?, ?, ?, ?)")
        .bind(&job.id)
        .bind(job.tier.as_str())
        .bind(&job.client)
        .bind(i64::from(job.attempt + 1))
        .bind(not_before)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Live jobs attached to `leader`, oldest first.
async fn followers(conn: &mut SqliteConnection, leader: &str) -> Result<Vec<Job>, StoreError> {
    let rows = sqlx::query(
        "SELECT * FROM jobs WHERE follows = ? AND state NOT IN ('succeeded', 'failed', 'cancelled', 'cached') \
         ORDER BY seq",
    )
    .bind(leader)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(job_from_row).collect()
}

async fn submit_op(conn: &mut SqliteConnection, new: NewJob) -> Result<Submitted, StoreError> {
    if let Some(idem) = &new.idempotency_key {
        let row = sqlx::query("SELECT * FROM jobs WHERE client = ? AND idempotency_key = ?")
            .bind(&new.client)
            .bind(idem)
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = row {
            return Ok(Submitted { job: job_from_row(&row)?, admission: Admission::Existing, events: vec![] });
        }
    }
    let request = serde_json::to_string(&new.request).map_err(|e| corrupt("request", e))?;
    // One round trip: the job attached to a live render of its key unless the key has an asset;
    // its first event (`cached` when there is an asset); an outbox row when it leads a render.
    // Each statement names the same parameters in a `p` row: sqlx binds `?N` by number, but a
    // statement that skips a number shifts the binding of the ones after it.
    let rows = sqlx::query(
        "WITH p AS (SELECT ?1 AS id, ?2 AS tier, ?3 AS request, ?4 AS key, ?5 AS client, ?6 AS idem, ?7 AS now) \
         INSERT INTO jobs (id, state, tier, request, cache_key, client, idempotency_key, follows, attempt, \
           created_ms, updated_ms) \
         SELECT p.id, 'queued', p.tier, p.request, p.key, p.client, p.idem, \
           CASE WHEN EXISTS (SELECT 1 FROM assets WHERE cache_key = p.key) THEN NULL \
                ELSE (SELECT id FROM jobs WHERE cache_key = p.key AND follows IS NULL \
                      AND state IN ('queued', 'dispatched', 'running') ORDER BY seq LIMIT 1) END, \
           0, p.now, p.now FROM p; \
         WITH p AS (SELECT ?1 AS id, ?2 AS tier, ?3 AS request, ?4 AS key, ?5 AS client, ?6 AS idem, ?7 AS now) \
         INSERT INTO job_events (job_id, at_ms, state, attempt, detail, asset) \
         SELECT j.id, p.now, CASE WHEN a.hash IS NULL THEN 'queued' ELSE 'cached' END, 0, \
           CASE WHEN a.hash IS NOT NULL THEN 'answered from the cache' \
                WHEN j.follows IS NOT NULL THEN 'attached to the render of job ' || j.follows \
                ELSE 'queued' END, a.hash \
         FROM p JOIN jobs j ON j.id = p.id \
         LEFT JOIN assets a ON a.hash = (SELECT hash FROM assets WHERE cache_key = p.key LIMIT 1) \
         RETURNING seq, state, detail, asset; \
         WITH p AS (SELECT ?1 AS id, ?2 AS tier, ?3 AS request, ?4 AS key, ?5 AS client, ?6 AS idem, ?7 AS now) \
         INSERT INTO outbox (job_id, tier, client, attempt, not_before) \
         SELECT j.id, j.tier, j.client, 1, p.now FROM p JOIN jobs j ON j.id = p.id \
         WHERE j.state = 'queued' AND j.follows IS NULL; \
         SELECT follows FROM jobs WHERE id = ?1",
    )
    .bind(&new.id)
    .bind(new.request.tier.as_str())
    .bind(&request)
    .bind(&new.cache_key)
    .bind(&new.client)
    .bind(&new.idempotency_key)
    .bind(new.now_ms)
    .fetch_all(&mut *conn)
    .await?;
    let [first, last] = rows.as_slice() else {
        return Err(corrupt("submit", format!("expected 2 result rows, got {}", rows.len())));
    };
    let state = state_of(first)?;
    let asset: Option<String> = first.try_get("asset")?;
    let follows: Option<String> = last.try_get("follows")?;
    let admission = match (state, &follows) {
        (JobState::Cached, _) => Admission::Cached,
        (_, Some(_)) => Admission::Attached,
        _ => Admission::Queued,
    };
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
    let detail: String = first.try_get("detail")?;
    let change = Change { detail: &detail, asset: job.asset.as_deref(), ..Change::default() };
    let event = event(first.try_get("seq")?, &job.id, job.tier, None, job.created_ms, state, 0, &change, new.now_ms);
    Ok(Submitted { job, admission, events: vec![event] })
}

async fn take_due_op(conn: &mut SqliteConnection, now_ms: i64, limit: u32) -> Result<Due, StoreError> {
    // Round trip one: the due rows, and when the next row not yet due falls due.
    let rows = sqlx::query(
        "SELECT o.id, o.job_id, o.tier, o.client, o.attempt, j.state, j.request, j.cache_key, j.created_ms \
         FROM outbox o JOIN jobs j ON j.id = o.job_id \
         WHERE o.sent_ms IS NULL AND o.not_before <= ?1 ORDER BY o.id LIMIT ?2; \
         SELECT MIN(not_before) AS next FROM outbox WHERE sent_ms IS NULL AND not_before > ?1",
    )
    .bind(now_ms)
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await?;
    let (next, due_rows) = rows.split_last().ok_or_else(|| corrupt("outbox", "no MIN row"))?;
    let mut due = Due { next_due_ms: next.try_get("next")?, ..Due::default() };
    let (Some(first), Some(last)) = (due_rows.first(), due_rows.last()) else { return Ok(due) };
    let (first_id, last_id): (i64, i64) = (first.try_get("id")?, last.try_get("id")?);
    // Round trip two: mark exactly those rows sent (the writer is alone), and move each of
    // their jobs that is still queued (a cancelled one is not handed out) to `dispatched`.
    let moved = sqlx::query(
        "UPDATE outbox SET sent_ms = ?1 WHERE sent_ms IS NULL AND not_before <= ?1 AND id BETWEEN ?2 AND ?3; \
         INSERT INTO job_events (job_id, at_ms, state, attempt, detail) \
         SELECT j.id, ?1, 'dispatched', j.attempt, 'to the ' || j.tier || ' queue' FROM jobs j \
         WHERE j.state = 'queued' AND j.follows IS NULL \
           AND j.id IN (SELECT job_id FROM outbox WHERE sent_ms = ?1 AND id BETWEEN ?2 AND ?3) \
         RETURNING seq, job_id, attempt",
    )
    .bind(now_ms)
    .bind(first_id)
    .bind(last_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut moved: std::collections::HashMap<String, (i64, u32)> = moved
        .iter()
        .map(|r| {
            let attempt = u32::try_from(r.try_get::<i64, _>("attempt")?).map_err(|e| corrupt("event attempt", e))?;
            Ok((r.try_get("job_id")?, (r.try_get("seq")?, attempt)))
        })
        .collect::<Result<_, StoreError>>()?;
    for row in due_rows {
        let job_id: String = row.try_get("job_id")?;
        // Each moved job once, with its first due row.
        let Some((seq, attempt_now)) = moved.remove(&job_id) else { continue };
        let request: String = row.try_get("request")?;
        let d = Dispatch {
            job_id,
            tier: tier_of(row)?,
            client: row.try_get("client")?,
            attempt: u32::try_from(row.try_get::<i64, _>("attempt")?).map_err(|e| corrupt("outbox attempt", e))?,
            request: serde_json::from_str(&request).map_err(|e| corrupt("job request", e))?,
            cache_key: row.try_get("cache_key")?,
            created_ms: row.try_get("created_ms")?,
        };
        let detail = format!("to the {} queue", d.tier);
        let change = Change { detail: &detail, ..Change::default() };
        let dispatched = JobState::Dispatched;
        due.events.push(event(
            seq,
            &d.job_id,
            d.tier,
            Some(JobState::Queued),
            d.created_ms,
            dispatched,
            attempt_now,
            &change,
            now_ms,
        ));
        due.jobs.push(d);
    }
    Ok(due)
}

async fn start_op(conn: &mut SqliteConnection, d: &Dispatch, now_ms: i64) -> Result<Option<Event>, StoreError> {
    let detail = format!("attempt {}", d.attempt);
    let change = Change { attempt: Some(d.attempt), detail: &detail, ..Change::default() };
    insert_event_if(conn, d, JobState::Dispatched, d.attempt - 1, JobState::Running, &change, now_ms).await
}

async fn finish_op(
    conn: &mut SqliteConnection,
    d: &Dispatch,
    outcome: Outcome,
    now_ms: i64,
) -> Result<Vec<Event>, StoreError> {
    let attempt = d.attempt;
    let (to, detail, asset, bytes, error, retry_at, followers_to) = match &outcome {
        Outcome::Succeeded { asset, bytes } => {
            (JobState::Succeeded, "rendered", Some(asset.as_str()), Some(*bytes), None, None, Some(JobState::Succeeded))
        }
        Outcome::Retry { error, retry_at_ms } => {
            (JobState::Queued, "attempt failed; retrying", None, None, Some(error.as_str()), Some(*retry_at_ms), None)
        }
        Outcome::Failed { error } => (
            JobState::Failed,
            "attempt failed; giving up",
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
    // One round trip. The asset is recorded even when the job was cancelled meanwhile. Only the
    // running attempt's first report moves the job (idempotent by job id + attempt); a retry
    // gets its outbox row only then (`changes()`), and attached jobs move with their leader.
    let rows = sqlx::query(
        "WITH p AS (SELECT ?1 AS job, ?2 AS now, ?3 AS state, ?4 AS attempt, ?5 AS detail, ?6 AS asset, ?7 AS error, \
           ?8 AS key, ?9 AS bytes, ?10 AS f_state, ?11 AS f_detail, ?12 AS retry_at, ?13 AS tier, ?14 AS client) \
         INSERT OR IGNORE INTO assets (hash, cache_key, bytes, created_ms) \
         SELECT p.asset, p.key, p.bytes, p.now FROM p WHERE p.asset IS NOT NULL; \
         WITH p AS (SELECT ?1 AS job, ?2 AS now, ?3 AS state, ?4 AS attempt, ?5 AS detail, ?6 AS asset, ?7 AS error, \
           ?8 AS key, ?9 AS bytes, ?10 AS f_state, ?11 AS f_detail, ?12 AS retry_at, ?13 AS tier, ?14 AS client) \
         INSERT INTO job_events (job_id, at_ms, state, attempt, detail, asset, error) \
         SELECT j.id, p.now, p.state, p.attempt, p.detail, p.asset, p.error FROM p JOIN jobs j ON j.id = p.job \
         WHERE j.state = 'running' AND j.attempt = p.attempt \
         RETURNING seq, job_id, 'running' AS from_state, 0 AS created_ms; \
         WITH p AS (SELECT ?1 AS job, ?2 AS now, ?3 AS state, ?4 AS attempt, ?5 AS detail, ?6 AS asset, ?7 AS error, \
           ?8 AS key, ?9 AS bytes, ?10 AS f_state, ?11 AS f_detail, ?12 AS retry_at, ?13 AS tier, ?14 AS client) \
         INSERT INTO outbox (job_id, tier, client, attempt, not_before) \
         SELECT p.job, p.tier, p.client, p.attempt + 1, p.retry_at FROM p \
         WHERE p.retry_at IS NOT NULL AND changes() = 1; \
         WITH p AS (SELECT ?1 AS job, ?2 AS now, ?3 AS state, ?4 AS attempt, ?5 AS detail, ?6 AS asset, ?7 AS error, \
           ?8 AS key, ?9 AS bytes, ?10 AS f_state, ?11 AS f_detail, ?12 AS retry_at, ?13 AS tier, ?14 AS client) \
         INSERT INTO job_events (job_id, at_ms, state, attempt, detail, asset, error) \
         SELECT f.id, p.now, p.f_state, f.attempt, p.f_detail, p.asset, p.error FROM p JOIN jobs f ON f.follows = p.job \
         WHERE p.f_state IS NOT NULL AND f.state = 'queued' \
           AND EXISTS (SELECT 1 FROM jobs l WHERE l.id = p.job AND l.state = p.state AND l.attempt = p.attempt \
                       AND l.updated_ms = p.now) \
         RETURNING seq, job_id, 'queued' AS from_state, (SELECT created_ms FROM jobs WHERE id = job_id) AS created_ms",
    )
    .bind(&d.job_id)
    .bind(now_ms)
    .bind(to.as_str())
    .bind(i64::from(attempt))
    .bind(detail)
    .bind(asset)
    .bind(error)
    .bind(&d.cache_key)
    .bind(bytes.map(|b| i64::try_from(b).unwrap_or(i64::MAX)))
    .bind(followers_to.map(JobState::as_str))
    .bind(&followers_detail)
    .bind(retry_at)
    .bind(d.tier.as_str())
    .bind(&d.client)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            let seq = r.try_get("seq")?;
            let job_id: String = r.try_get("job_id")?;
            if r.try_get::<String, _>("from_state")? == "running" {
                let change = Change { detail, asset, error, attempt: None };
                return Ok(event(
                    seq,
                    &job_id,
                    d.tier,
                    Some(JobState::Running),
                    d.created_ms,
                    to,
                    attempt,
                    &change,
                    now_ms,
                ));
            }
            let change = Change { detail: &followers_detail, asset, error, attempt: None };
            let (state, created_ms) = (followers_to.unwrap_or(to), r.try_get("created_ms")?);
            Ok(event(seq, &job_id, d.tier, Some(JobState::Queued), created_ms, state, 0, &change, now_ms))
        })
        .collect()
}

async fn cancel_op(conn: &mut SqliteConnection, job_id: &str, by: &str, now_ms: i64) -> Result<JobChange, StoreError> {
    let Some(job) = load_job(conn, job_id).await? else { return Ok(None) };
    if job.state.is_terminal() {
        return Ok(Some((job, vec![])));
    }
    let detail = format!("cancelled by {by}");
    let mut events = vec![
        transition(conn, &job, JobState::Cancelled, Change { detail: &detail, ..Change::default() }, now_ms).await?,
    ];
    if job.follows.is_none()
        && let Some(heir) = followers(conn, job_id).await?.into_iter().next()
    {
        // The render this job led goes on for those attached to it: the oldest leads a new one.
        sqlx::query("UPDATE jobs SET follows = CASE WHEN id = ?1 THEN NULL ELSE ?1 END WHERE follows = ?2")
            .bind(&heir.id)
            .bind(job_id)
            .execute(&mut *conn)
            .await?;
        let detail = format!("leads the render after job {job_id} was cancelled");
        events.push(
            transition(conn, &heir, JobState::Queued, Change { detail: &detail, ..Change::default() }, now_ms).await?,
        );
        insert_outbox(conn, &heir, now_ms).await?;
    }
    let job = load_job(conn, job_id).await?.ok_or_else(|| corrupt("job", format!("{job_id} vanished")))?;
    Ok(Some((job, events)))
}

async fn resume_op(conn: &mut SqliteConnection, now_ms: i64) -> Result<Vec<Event>, StoreError> {
    // Outbox rows marked sent whose jobs never left `queued` (a crash between the two) go again.
    // This comes before the requeue below, whose fresh rows must not be doubled.
    sqlx::query(
        "UPDATE outbox SET sent_ms = NULL WHERE sent_ms IS NOT NULL AND id IN (SELECT o.id FROM outbox o \
         JOIN jobs j ON j.id = o.job_id WHERE j.state = 'queued' AND j.follows IS NULL AND o.attempt = j.attempt + 1)",
    )
    .execute(&mut *conn)
    .await?;
    let rows =
        sqlx::query("SELECT * FROM jobs WHERE state IN ('dispatched', 'running') AND follows IS NULL ORDER BY seq")
            .fetch_all(&mut *conn)
            .await?;
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let job = job_from_row(row)?;
        let detail = format!("resumed after a restart (was {})", job.state);
        let change = Change { detail: &detail, ..Change::default() };
        events.push(transition(conn, &job, JobState::Queued, change, now_ms).await?);
        insert_outbox(conn, &job, now_ms).await?;
    }
    Ok(events)
}

impl Store for SqliteStore {
    fn submit(&self, job: NewJob) -> BoxFut<'_, Result<Submitted, StoreError>> {
        Box::pin(self.write(Box::new(move |c| Box::pin(submit_op(c, job)))))
    }

    fn take_due(&self, now_ms: i64, limit: u32) -> BoxFut<'_, Result<Due, StoreError>> {
        Box::pin(self.write(Box::new(move |c| Box::pin(take_due_op(c, now_ms, limit)))))
    }

    fn start(&self, d: &Dispatch, now_ms: i64) -> BoxFut<'_, Result<Option<Event>, StoreError>> {
        let d = d.clone();
        Box::pin(self.write(Box::new(move |c| Box::pin(async move { start_op(c, &d, now_ms).await }))))
    }

    fn finish(&self, d: &Dispatch, outcome: Outcome, now_ms: i64) -> BoxFut<'_, Result<Vec<Event>, StoreError>> {
        let d = d.clone();
        Box::pin(self.write(Box::new(move |c| Box::pin(async move { finish_op(c, &d, outcome, now_ms).await }))))
    }

    fn cancel(&self, job_id: &str, by: &str, now_ms: i64) -> BoxFut<'_, Result<JobChange, StoreError>> {
        let (id, by) = (job_id.to_owned(), by.to_owned());
        Box::pin(self.write(Box::new(move |c| Box::pin(async move { cancel_op(c, &id, &by, now_ms).await }))))
    }

    fn resume(&self, now_ms: i64) -> BoxFut<'_, Result<Vec<Event>, StoreError>> {
        Box::pin(self.write(Box::new(move |c| Box::pin(resume_op(c, now_ms)))))
    }

    fn job(&self, id: &str) -> BoxFut<'_, Result<Option<Job>, StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            let row = sqlx::query("SELECT * FROM jobs WHERE id = ?").bind(id).fetch_optional(&self.read).await?;
            row.as_ref().map(job_from_row).transpose()
        })
    }

    fn list(&self, q: ListQuery) -> BoxFut<'_, Result<Page, StoreError>> {
        Box::pin(async move {
            let limit = q.limit.max(1);
            let rows = sqlx::query(
                "SELECT * FROM jobs WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR tier = ?2) \
                 AND (?3 IS NULL OR created_ms >= ?3) AND (?4 IS NULL OR created_ms < ?4) \
                 AND (?5 IS NULL OR client = ?5) AND (?6 IS NULL OR seq < ?6) ORDER BY seq DESC LIMIT ?7",
            )
            .bind(q.state.map(JobState::as_str))
            .bind(q.tier.map(Tier::as_str))
            .bind(q.since_ms)
            .bind(q.until_ms)
            .bind(q.client)
            .bind(q.before_seq)
            .bind(i64::from(limit))
            .fetch_all(&self.read)
            .await?;
            let next = if rows.len() == limit as usize {
                rows.last().map(|r| r.try_get::<i64, _>("seq")).transpose()?
            } else {
                None
            };
            Ok(Page { jobs: rows.iter().map(job_from_row).collect::<Result<_, _>>()?, next })
        })
    }

    fn events(&self, job_id: &str, after_seq: i64) -> BoxFut<'_, Result<Vec<Event>, StoreError>> {
        let id = job_id.to_owned();
        Box::pin(async move {
            let tier: Option<String> =
                sqlx::query_scalar("SELECT tier FROM jobs WHERE id = ?").bind(&id).fetch_optional(&self.read).await?;
            let Some(tier) = tier else { return Ok(vec![]) };
            let tier = Tier::from_str(&tier).map_err(|e| corrupt("job tier", e))?;
            let rows = sqlx::query("SELECT * FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq")
                .bind(&id)
                .bind(after_seq)
                .fetch_all(&self.read)
                .await?;
            rows.iter().map(|r| event_from_row(r, tier)).collect()
        })
    }

    fn counts(&self) -> BoxFut<'_, Result<Vec<StateCount>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT tier, state, COUNT(*) AS n FROM jobs GROUP BY tier, state")
                .fetch_all(&self.read)
                .await?;
            rows.iter().map(|r| Ok((tier_of(r)?, state_of(r)?, r.try_get("n")?))).collect()
        })
    }

    fn ping(&self) -> BoxFut<'_, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&self.read).await?;
            Ok(())
        })
    }

    fn tokens(&self) -> BoxFut<'_, Result<Vec<TokenRow>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT token_hash, name, role FROM api_tokens WHERE revoked_ms IS NULL")
                .fetch_all(&self.read)
                .await?;
            rows.iter()
                .map(|r| {
                    let role: String = r.try_get("role")?;
                    Ok(TokenRow {
                        token_hash: r.try_get("token_hash")?,
                        name: r.try_get("name")?,
                        role: role.parse().map_err(|e| corrupt("token role", e))?,
                    })
                })
                .collect()
        })
    }

    fn add_token(&self, token: TokenRow, now_ms: i64) -> BoxFut<'_, Result<(), StoreError>> {
        // A taken name is a refusal that writes nothing: an answer, not a failed write.
        let op: OpFn<Result<(), StoreError>> = Box::new(move |c| {
            Box::pin(async move {
                let taken: Option<i64> = sqlx::query_scalar("SELECT 1 FROM api_tokens WHERE name = ?")
                    .bind(&token.name)
                    .fetch_optional(&mut *c)
                    .await?;
                if taken.is_some() {
                    return Ok(Err(StoreError::Conflict(format!("a token named {:?}", token.name))));
                }
                sqlx::query("INSERT INTO api_tokens (token_hash, name, role, created_ms) VALUES (?, ?, ?, ?)")
                    .bind(&token.token_hash)
                    .bind(&token.name)
                    .bind(token.role.as_str())
                    .bind(now_ms)
                    .execute(&mut *c)
                    .await?;
                Ok(Ok(()))
            })
        });
        Box::pin(async move { self.write(op).await? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::TierLimits;

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("kiln.db")).await.unwrap();
        (dir, s)
    }

    fn new_job(id: &str, key: &str, seed: u64) -> NewJob {
        let request =
            RenderRequest::resolve("cppn", "test", seed, Tier::Preview, Some(16), None, None, &TierLimits::default())
                .unwrap();
        NewJob {
            id: id.into(),
            request,
            cache_key: key.into(),
            client: "tester".into(),
            idempotency_key: None,
            now_ms: 1000,
        }
    }

    /// The job row a fold of the events gives.
    fn fold(events: &[Event]) -> (JobState, u32, Option<String>, Option<String>) {
        let mut out = (JobState::Queued, 0, None, None);
        for e in events {
            out.0 = e.state;
            out.1 = e.attempt;
            if e.asset.is_some() {
                out.2 = e.asset.clone();
            }
            if e.error.is_some() {
                out.3 = e.error.clone();
            }
        }
        out
    }

    async fn check_projection(s: &SqliteStore, id: &str) {
        let job = s.job(id).await.unwrap().unwrap();
        let events = s.events(id, 0).await.unwrap();
        assert_eq!((job.state, job.attempt, job.asset.clone(), job.error.clone()), fold(&events), "{id}: {events:?}");
    }

    #[tokio::test]
    async fn the_job_row_is_the_projection_of_its_events_through_a_whole_life() {
        let (_d, s) = store().await;
        let sub = s.submit(new_job("a", "k1", 1)).await.unwrap();
        assert_eq!(sub.admission, Admission::Queued);
        check_projection(&s, "a").await;
        let due = s.take_due(2000, 10).await.unwrap();
        assert_eq!(due.jobs.len(), 1);
        let d = &due.jobs[0];
        assert_eq!((d.attempt, d.cache_key.as_str()), (1, "k1"));
        check_projection(&s, "a").await;
        assert!(s.start(d, 2001).await.unwrap().is_some());
        check_projection(&s, "a").await;
        let retry = Outcome::Retry { error: "disk hiccup".into(), retry_at_ms: 5000 };
        assert_eq!(s.finish(d, retry, 2002).await.unwrap().len(), 1);
        check_projection(&s, "a").await;
        let early = s.take_due(4000, 10).await.unwrap();
        assert!(early.jobs.is_empty(), "a retry waits for its backoff");
        assert_eq!(early.next_due_ms, Some(5000));
        let d2 = s.take_due(5000, 10).await.unwrap().jobs.remove(0);
        assert_eq!(d2.attempt, 2);
        s.start(&d2, 5001).await.unwrap().unwrap();
        s.finish(&d2, Outcome::Succeeded { asset: "h1".into(), bytes: 10 }, 5002).await.unwrap();
        check_projection(&s, "a").await;
        let job = s.job("a").await.unwrap().unwrap();
        assert_eq!((job.state, job.attempt, job.asset.as_deref()), (JobState::Succeeded, 2, Some("h1")));
        assert_eq!(job.error.as_deref(), Some("disk hiccup"), "a job keeps its last error");
        assert_eq!((job.started_ms, job.finished_ms), (Some(5001), Some(5002)));
    }

    #[tokio::test]
    async fn reports_are_idempotent_by_job_and_attempt() {
        let (_d, s) = store().await;
        s.submit(new_job("a", "k1", 1)).await.unwrap();
        let d = s.take_due(2000, 10).await.unwrap().jobs.remove(0);
        assert!(s.start(&d, 2001).await.unwrap().is_some());
        assert!(s.start(&d, 2002).await.unwrap().is_none(), "a second start of the same attempt is refused");
        let ok = Outcome::Succeeded { asset: "h1".into(), bytes: 10 };
        assert_eq!(s.finish(&d, ok.clone(), 2003).await.unwrap().len(), 1);
        assert!(s.finish(&d, ok, 2004).await.unwrap().is_empty(), "a redelivered result changes nothing");
        let stale = Dispatch { attempt: 7, ..d.clone() };
        assert!(s.finish(&stale, Outcome::Failed { error: "late".into() }, 2005).await.unwrap().is_empty());
        let events = s.events("a", 0).await.unwrap();
        assert_eq!(events.iter().filter(|e| e.state == JobState::Succeeded).count(), 1);
        check_projection(&s, "a").await;
    }

    #[tokio::test]
    async fn the_cache_and_single_flight_are_decided_in_the_writer() {
        let (_d, s) = store().await;
        s.submit(new_job("lead", "k", 1)).await.unwrap();
        let f = s.submit(new_job("follow", "k", 1)).await.unwrap();
        assert_eq!(f.admission, Admission::Attached);
        assert_eq!(f.job.follows.as_deref(), Some("lead"));
        let due = s.take_due(2000, 10).await.unwrap();
        assert_eq!(due.jobs.len(), 1, "only the leader goes to a worker");
        let d = &due.jobs[0];
        s.start(d, 2001).await.unwrap();
        let events = s.finish(d, Outcome::Succeeded { asset: "h".into(), bytes: 1 }, 2002).await.unwrap();
        assert_eq!(events.len(), 2, "the leader and its follower succeed together");
        check_projection(&s, "follow").await;
        let c = s.submit(new_job("later", "k", 1)).await.unwrap();
        assert_eq!(
            (c.admission, c.job.state, c.job.asset.as_deref()),
            (Admission::Cached, JobState::Cached, Some("h"))
        );
        let mut again = new_job("dup", "k2", 2);
        again.idempotency_key = Some("once".into());
        let first = s.submit(again.clone()).await.unwrap();
        again.id = "dup2".into();
        let second = s.submit(again).await.unwrap();
        assert_eq!((second.admission, second.job.id.as_str()), (Admission::Existing, first.job.id.as_str()));
    }

    #[tokio::test]
    async fn resume_requeues_jobs_in_hand_and_a_cancelled_job_is_never_handed_out() {
        let (_d, s) = store().await;
        for (id, seed) in [("a", 1), ("b", 2), ("c", 3)] {
            s.submit(new_job(id, &format!("k{seed}"), seed)).await.unwrap();
        }
        let due = s.take_due(2000, 2).await.unwrap();
        assert_eq!(due.jobs.len(), 2);
        s.start(&due.jobs[0], 2001).await.unwrap().unwrap();
        // "a" running, "b" dispatched, "c" queued; "c" is cancelled; then the process dies.
        s.cancel("c", "tester", 2002).await.unwrap().unwrap();
        let resumed = s.resume(3000).await.unwrap();
        let mut ids: Vec<_> = resumed.iter().map(|e| e.job_id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
        let due = s.take_due(3001, 10).await.unwrap();
        let mut ids: Vec<_> = due.jobs.iter().map(|d| (d.job_id.as_str(), d.attempt)).collect();
        ids.sort();
        assert_eq!(ids, [("a", 2), ("b", 1)], "the running one takes a new attempt, the dispatched one its first");
        for id in ["a", "b", "c"] {
            check_projection(&s, id).await;
        }
    }
}
