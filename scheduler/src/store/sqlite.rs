//! The SQLite store: WAL, one writer connection with group commit, a pool of readers.
//!
//! Every change goes through one writer task. It takes whatever operations are waiting (up to
//! [`MAX_BATCH`]), runs each inside its own savepoint of one transaction, commits once, and only
//! then answers their callers: a caller never hears "done" for a write that is not durable, and a
//! burst of submits costs one commit instead of hundreds. Being the only writer also makes the
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
    Admission, AssetRow, BoxFut, Dispatch, Due, Event, Job, JobChange, ListQuery, NewJob, Outcome, Page, StateCount,
    Store, StoreError, Submitted, TokenRow,
};

/// Most operations one transaction takes.
pub const MAX_BATCH: usize = 512;

type OpFn<T> = Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFut<'c, Result<T, StoreError>> + Send>;

/// One queued write: runs in a savepoint, answers after the commit.
trait WriteOp: Send {
    /// Runs the write; `false` when it failed and its savepoint must be rolled back.
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
            (Err(e), Some(Ok(_))) => Err(StoreError::Corrupt { what: "commit", message: e }),
            (_, None) => Err(StoreError::Closed),
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
        let mut conn = options(path).connect().await?;
        sqlx::migrate!("./migrations/sqlite").run(&mut conn).await?;
        let read =
            SqlitePoolOptions::new().max_connections(4).connect_with(options(path).create_if_missing(false)).await?;
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(writer(conn, rx));
        Ok(SqliteStore { writer: tx, read })
    }

    async fn write<T: Send + 'static>(&self, f: OpFn<T>) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let op: Box<dyn WriteOp> = Box::new(Op { f: Some(f), out: None, reply });
        self.writer.send(op).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

async fn writer(mut conn: SqliteConnection, mut rx: mpsc::Receiver<Box<dyn WriteOp>>) {
    let mut batch: Vec<Box<dyn WriteOp>> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let commit = run_batch(&mut conn, &mut batch).await.map_err(|e| e.to_string());
        if let Err(e) = &commit {
            tracing::error!(error = %e, ops = batch.len(), "store: a transaction failed; its writes are refused");
        }
        for op in batch.drain(..) {
            op.finish(commit.clone());
        }
    }
    let _ = conn.close().await;
}

async fn run_batch(conn: &mut SqliteConnection, batch: &mut [Box<dyn WriteOp>]) -> Result<(), sqlx::Error> {
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    for op in batch.iter_mut() {
        sqlx::query("SAVEPOINT op").execute(&mut *conn).await?;
        if !op.run(conn).await {
            sqlx::query("ROLLBACK TO op").execute(&mut *conn).await?;
        }
        sqlx::query("RELEASE op").execute(&mut *conn).await?;
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

fn job_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Job, StoreError> {
    let state: String = row.try_get("state")?;
    let tier: String = row.try_get("tier")?;
    let request: String = row.try_get("request")?;
    let attempt: i64 = row.try_get("attempt")?;
    Ok(Job {
        id: row.try_get("id")?,
        state: JobState::from_str(&state).map_err(|e| corrupt("job state", e))?,
        tier: Tier::from_str(&tier).map_err(|e| corrupt("job tier", e))?,
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
    let state: String = row.try_get("state")?;
    let attempt: i64 = row.try_get("attempt")?;
    Ok(Event {
        seq: row.try_get("seq")?,
        job_id: row.try_get("job_id")?,
        tier,
        from: None,
        created_ms: 0,
        at_ms: row.try_get("at_ms")?,
        state: JobState::from_str(&state).map_err(|e| corrupt("event state", e))?,
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

/// Appends an event and projects it onto the job row; the single place a job changes.
async fn transition(
    conn: &mut SqliteConnection,
    job: &mut Job,
    to: JobState,
    change: Change<'_>,
    now_ms: i64,
) -> Result<Event, StoreError> {
    let from = job.state;
    let attempt = change.attempt.unwrap_or(job.attempt);
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO job_events (job_id, at_ms, state, attempt, detail, asset, error) \
         VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING seq",
    )
    .bind(&job.id)
    .bind(now_ms)
    .bind(to.as_str())
    .bind(i64::from(attempt))
    .bind(change.detail)
    .bind(change.asset)
    .bind(change.error)
    .fetch_one(&mut *conn)
    .await?;
    job.state = to;
    job.attempt = attempt;
    job.updated_ms = now_ms;
    if let Some(a) = change.asset {
        job.asset = Some(a.to_owned());
    }
    if let Some(e) = change.error {
        job.error = Some(e.to_owned());
    }
    if to == JobState::Running {
        job.started_ms = Some(now_ms);
    }
    if to.is_terminal() {
        job.finished_ms = Some(now_ms);
    }
    sqlx::query(
        "UPDATE jobs SET state = ?, attempt = ?, asset = ?, error = ?, updated_ms = ?, started_ms = ?, \
         finished_ms = ?, follows = ? WHERE id = ?",
    )
    .bind(to.as_str())
    .bind(i64::from(attempt))
    .bind(&job.asset)
    .bind(&job.error)
    .bind(now_ms)
    .bind(job.started_ms)
    .bind(job.finished_ms)
    .bind(&job.follows)
    .bind(&job.id)
    .execute(&mut *conn)
    .await?;
    Ok(Event {
        seq,
        job_id: job.id.clone(),
        tier: job.tier,
        from: Some(from),
        created_ms: job.created_ms,
        at_ms: now_ms,
        state: to,
        attempt,
        detail: change.detail.to_owned(),
        asset: change.asset.map(str::to_owned),
        error: change.error.map(str::to_owned),
    })
}

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
    let asset: Option<String> = sqlx::query_scalar("SELECT hash FROM assets WHERE cache_key = ? LIMIT 1")
        .bind(&new.cache_key)
        .fetch_optional(&mut *conn)
        .await?;
    let leader: Option<String> = if asset.is_some() {
        None
    } else {
        sqlx::query_scalar(
            "SELECT id FROM jobs WHERE cache_key = ? AND follows IS NULL \
             AND state IN ('queued', 'dispatched', 'running') ORDER BY seq LIMIT 1",
        )
        .bind(&new.cache_key)
        .fetch_optional(&mut *conn)
        .await?
    };
    let request = serde_json::to_string(&new.request).map_err(|e| corrupt("request", e))?;
    let mut job = Job {
        id: new.id,
        state: JobState::Queued,
        tier: new.request.tier,
        request: new.request,
        cache_key: new.cache_key,
        client: new.client,
        idempotency_key: new.idempotency_key,
        follows: leader.clone(),
        attempt: 0,
        asset: None,
        error: None,
        created_ms: new.now_ms,
        updated_ms: new.now_ms,
        started_ms: None,
        finished_ms: None,
    };
    let (first, admission, detail) = match (&asset, &leader) {
        (Some(_), _) => (JobState::Cached, Admission::Cached, "answered from the cache".to_owned()),
        (None, Some(l)) => (JobState::Queued, Admission::Attached, format!("attached to the render of job {l}")),
        (None, None) => (JobState::Queued, Admission::Queued, "queued".to_owned()),
    };
    sqlx::query(
        "INSERT INTO jobs (id, state, tier, request, cache_key, client, idempotency_key, follows, attempt, \
         created_ms, updated_ms) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, 0, ?, ?)",
    )
    .bind(&job.id)
    .bind(job.tier.as_str())
    .bind(&request)
    .bind(&job.cache_key)
    .bind(&job.client)
    .bind(&job.idempotency_key)
    .bind(&job.follows)
    .bind(job.created_ms)
    .bind(job.created_ms)
    .execute(&mut *conn)
    .await?;
    let change = Change { detail: &detail, asset: asset.as_deref(), ..Change::default() };
    let mut event = transition(conn, &mut job, first, change, new.now_ms).await?;
    event.from = None;
    if admission == Admission::Queued {
        insert_outbox(conn, &job, new.now_ms).await?;
    }
    Ok(Submitted { job, admission, events: vec![event] })
}

async fn take_due_op(conn: &mut SqliteConnection, now_ms: i64, limit: u32) -> Result<Due, StoreError> {
    let rows = sqlx::query(
        "SELECT id, job_id, tier, client, attempt FROM outbox WHERE sent_ms IS NULL AND not_before <= ? \
         ORDER BY id LIMIT ?",
    )
    .bind(now_ms)
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let outbox_id: i64 = row.try_get("id")?;
        let job_id: String = row.try_get("job_id")?;
        let attempt = u32::try_from(row.try_get::<i64, _>("attempt")?).map_err(|e| corrupt("outbox attempt", e))?;
        sqlx::query("UPDATE outbox SET sent_ms = ? WHERE id = ?")
            .bind(now_ms)
            .bind(outbox_id)
            .execute(&mut *conn)
            .await?;
        let Some(mut job) = load_job(conn, &job_id).await? else { continue };
        // A job cancelled (or finished) since its row was written is not handed out.
        if job.state != JobState::Queued {
            continue;
        }
        let detail = format!("to the {} queue", job.tier);
        events.push(
            transition(conn, &mut job, JobState::Dispatched, Change { detail: &detail, ..Change::default() }, now_ms)
                .await?,
        );
        let tier: String = row.try_get("tier")?;
        out.push(Dispatch {
            job_id,
            tier: Tier::from_str(&tier).map_err(|e| corrupt("outbox tier", e))?,
            client: row.try_get("client")?,
            attempt,
        });
    }
    let next: Option<i64> =
        sqlx::query_scalar("SELECT MIN(not_before) FROM outbox WHERE sent_ms IS NULL").fetch_one(&mut *conn).await?;
    Ok(Due { jobs: out, events, next_due_ms: next })
}

async fn start_op(
    conn: &mut SqliteConnection,
    job_id: &str,
    attempt: u32,
    now_ms: i64,
) -> Result<JobChange, StoreError> {
    let Some(mut job) = load_job(conn, job_id).await? else { return Ok(None) };
    if job.state != JobState::Dispatched || job.attempt + 1 != attempt {
        return Ok(None);
    }
    let detail = format!("attempt {attempt}");
    let change = Change { attempt: Some(attempt), detail: &detail, ..Change::default() };
    let e = transition(conn, &mut job, JobState::Running, change, now_ms).await?;
    Ok(Some((job, vec![e])))
}

async fn finish_op(
    conn: &mut SqliteConnection,
    job_id: &str,
    attempt: u32,
    outcome: Outcome,
    now_ms: i64,
) -> Result<Vec<Event>, StoreError> {
    let Some(mut job) = load_job(conn, job_id).await? else { return Ok(vec![]) };
    if let Outcome::Succeeded { asset, bytes } = &outcome {
        sqlx::query("INSERT OR IGNORE INTO assets (hash, cache_key, bytes, created_ms) VALUES (?, ?, ?, ?)")
            .bind(asset)
            .bind(&job.cache_key)
            .bind(i64::try_from(*bytes).unwrap_or(i64::MAX))
            .bind(now_ms)
            .execute(&mut *conn)
            .await?;
    }
    // Idempotent by job id + attempt: only the running attempt's first report counts.
    if job.state != JobState::Running || job.attempt != attempt {
        return Ok(vec![]);
    }
    let mut events = Vec::new();
    match &outcome {
        Outcome::Succeeded { asset, .. } => {
            let change = Change { detail: "rendered", asset: Some(asset), ..Change::default() };
            events.push(transition(conn, &mut job, JobState::Succeeded, change, now_ms).await?);
            let detail = format!("served by the render of job {job_id}");
            for mut f in followers(conn, job_id).await? {
                let change = Change { detail: &detail, asset: Some(asset), ..Change::default() };
                events.push(transition(conn, &mut f, JobState::Succeeded, change, now_ms).await?);
            }
        }
        Outcome::Retry { error, retry_at_ms } => {
            let detail = format!("attempt {attempt} failed; retrying");
            let change = Change { detail: &detail, error: Some(error), ..Change::default() };
            events.push(transition(conn, &mut job, JobState::Queued, change, now_ms).await?);
            insert_outbox(conn, &job, *retry_at_ms).await?;
        }
        Outcome::Failed { error } => {
            let detail = format!("attempt {attempt} failed; giving up");
            let change = Change { detail: &detail, error: Some(error), ..Change::default() };
            events.push(transition(conn, &mut job, JobState::Failed, change, now_ms).await?);
            let detail = format!("the render of job {job_id} failed");
            for mut f in followers(conn, job_id).await? {
                let change = Change { detail: &detail, error: Some(error), ..Change::default() };
                events.push(transition(conn, &mut f, JobState::Failed, change, now_ms).await?);
            }
        }
    }
    Ok(events)
}

async fn cancel_op(conn: &mut SqliteConnection, job_id: &str, by: &str, now_ms: i64) -> Result<JobChange, StoreError> {
    let Some(mut job) = load_job(conn, job_id).await? else { return Ok(None) };
    if job.state.is_terminal() {
        return Ok(Some((job, vec![])));
    }
    let detail = format!("cancelled by {by}");
    let mut events = vec![
        transition(conn, &mut job, JobState::Cancelled, Change { detail: &detail, ..Change::default() }, now_ms)
            .await?,
    ];
    if job.follows.is_none() {
        // The render this job led goes on for those attached to it: the oldest leads a new one.
        let mut attached = followers(conn, job_id).await?.into_iter();
        if let Some(mut heir) = attached.next() {
            heir.follows = None;
            let detail = format!("leads the render after job {job_id} was cancelled");
            events.push(
                transition(conn, &mut heir, JobState::Queued, Change { detail: &detail, ..Change::default() }, now_ms)
                    .await?,
            );
            insert_outbox(conn, &heir, now_ms).await?;
            sqlx::query("UPDATE jobs SET follows = ? WHERE follows = ? AND id != ?")
                .bind(&heir.id)
                .bind(job_id)
                .bind(&heir.id)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(Some((job, events)))
}

async fn resume_op(conn: &mut SqliteConnection, now_ms: i64) -> Result<Vec<Event>, StoreError> {
    let rows =
        sqlx::query("SELECT * FROM jobs WHERE state IN ('dispatched', 'running') AND follows IS NULL ORDER BY seq")
            .fetch_all(&mut *conn)
            .await?;
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut job = job_from_row(row)?;
        let detail = format!("resumed after a restart (was {})", job.state);
        events.push(
            transition(conn, &mut job, JobState::Queued, Change { detail: &detail, ..Change::default() }, now_ms)
                .await?,
        );
        insert_outbox(conn, &job, now_ms).await?;
    }
    // Outbox rows marked sent whose jobs never left `queued` (a crash between the two) go again.
    sqlx::query(
        "UPDATE outbox SET sent_ms = NULL WHERE sent_ms IS NOT NULL AND id IN (SELECT o.id FROM outbox o \
         JOIN jobs j ON j.id = o.job_id WHERE j.state = 'queued' AND j.follows IS NULL AND o.attempt = j.attempt + 1)",
    )
    .execute(&mut *conn)
    .await?;
    Ok(events)
}

impl Store for SqliteStore {
    fn submit(&self, job: NewJob) -> BoxFut<'_, Result<Submitted, StoreError>> {
        Box::pin(self.write(Box::new(move |c| Box::pin(submit_op(c, job)))))
    }

    fn take_due(&self, now_ms: i64, limit: u32) -> BoxFut<'_, Result<Due, StoreError>> {
        Box::pin(self.write(Box::new(move |c| Box::pin(take_due_op(c, now_ms, limit)))))
    }

    fn start(&self, job_id: &str, attempt: u32, now_ms: i64) -> BoxFut<'_, Result<JobChange, StoreError>> {
        let id = job_id.to_owned();
        Box::pin(self.write(Box::new(move |c| Box::pin(async move { start_op(c, &id, attempt, now_ms).await }))))
    }

    fn finish(
        &self,
        job_id: &str,
        attempt: u32,
        outcome: Outcome,
        now_ms: i64,
    ) -> BoxFut<'_, Result<Vec<Event>, StoreError>> {
        let id = job_id.to_owned();
        Box::pin(
            self.write(Box::new(move |c| Box::pin(async move { finish_op(c, &id, attempt, outcome, now_ms).await }))),
        )
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
            rows.iter()
                .map(|r| {
                    let tier: String = r.try_get("tier")?;
                    let state: String = r.try_get("state")?;
                    Ok((
                        Tier::from_str(&tier).map_err(|e| corrupt("job tier", e))?,
                        JobState::from_str(&state).map_err(|e| corrupt("job state", e))?,
                        r.try_get("n")?,
                    ))
                })
                .collect()
        })
    }

    fn asset(&self, hash: &str) -> BoxFut<'_, Result<Option<AssetRow>, StoreError>> {
        let hash = hash.to_owned();
        Box::pin(async move {
            let row = sqlx::query("SELECT hash, cache_key, bytes FROM assets WHERE hash = ?")
                .bind(hash)
                .fetch_optional(&self.read)
                .await?;
            row.map(|r| {
                let bytes: i64 = r.try_get("bytes")?;
                Ok(AssetRow {
                    hash: r.try_get("hash")?,
                    cache_key: r.try_get("cache_key")?,
                    bytes: u64::try_from(bytes).map_err(|e| corrupt("asset size", e))?,
                })
            })
            .transpose()
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
        Box::pin(self.write(Box::new(move |c| {
            Box::pin(async move {
                let taken: Option<i64> = sqlx::query_scalar("SELECT 1 FROM api_tokens WHERE name = ?")
                    .bind(&token.name)
                    .fetch_optional(&mut *c)
                    .await?;
                if taken.is_some() {
                    return Err(StoreError::Conflict(format!("a token named {:?}", token.name)));
                }
                sqlx::query("INSERT INTO api_tokens (token_hash, name, role, created_ms) VALUES (?, ?, ?, ?)")
                    .bind(&token.token_hash)
                    .bind(&token.name)
                    .bind(token.role.as_str())
                    .bind(now_ms)
                    .execute(&mut *c)
                    .await?;
                Ok(())
            })
        })))
    }
}
