//! The PostgreSQL store (distributed mode): the same schema, rules and group-commit writer as
//! the SQLite store ([`super::writer`]), so a burst of submits, dispatches and results from many
//! workers costs one commit (one WAL flush) per batch, not one per job. Reads go through a pool.
//!
//! The database URL is an ordinary `postgres://` URL; a schema other than `public` is chosen
//! with the URL's `options=-csearch_path%3D<schema>` (the tests run each in its own schema).

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection};

use super::rows::{
    Change, Cols, Finish, corrupt, dispatched_event, event, event_from_row, job_from_row, outgoing_from_row,
    start_allowed, state_of, token_from_row,
};
use super::writer::{Connect, OpFn, WriteConn, Writer};
use super::{
    Admission, BoxFut, Dispatch, Due, Event, Job, JobChange, ListQuery, NewJob, Outcome, Page, Pending, StateCount,
    Store, StoreError, Submitted, TokenRow,
};
use kiln_protocol::{JobState, Tier};

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PgStore {
    writer: Writer<PgConnection>,
    read: PgPool,
}

impl WriteConn for PgConnection {
    const BEGIN: &'static str = "BEGIN";
    fn exec<'c>(&'c mut self, sql: &'static str) -> BoxFut<'c, Result<(), sqlx::Error>> {
        Box::pin(async move { sqlx::query(sql).execute(self).await.map(|_| ()) })
    }
}

impl PgStore {
    /// Connects to the database at `url` and brings its schema up to date.
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        let opts = PgConnectOptions::from_str(url)?;
        let mut conn = opts.connect().await?;
        sqlx::migrate!("./migrations/postgres").run(&mut conn).await?;
        let read = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts.clone())
            .await?;
        let connect: Connect<PgConnection> = Box::new(move || {
            let opts = opts.clone();
            Box::pin(async move { Ok(opts.connect().await?) })
        });
        Ok(PgStore { writer: Writer::spawn(conn, connect), read })
    }

    async fn write<T: Send + 'static>(&self, f: OpFn<PgConnection, T>) -> Result<T, StoreError> {
        self.writer.write(f).await
    }
}

async fn load_job(conn: &mut PgConnection, id: &str) -> Result<Option<Job>, StoreError> {
    let row = sqlx::query("SELECT * FROM jobs WHERE id = $1").bind(id).fetch_optional(&mut *conn).await?;
    row.as_ref().map(job_from_row).transpose()
}

/// Appends an event for a job that must exist; the trigger projects it onto the job row.
async fn append_event(
    conn: &mut PgConnection,
    job_id: &str,
    to: JobState,
    attempt: u32,
    change: &Change<'_>,
    now_ms: i64,
) -> Result<i64, StoreError> {
    let seq: Option<i64> = sqlx::query_scalar(
        "INSERT INTO job_events (job_id, at_ms, state, attempt, detail, asset, error) \
         SELECT id, $2, $3, $4, $5, $6, $7 FROM jobs WHERE id = $1 RETURNING seq",
    )
    .bind(job_id)
    .bind(now_ms)
    .bind(to.as_str())
    .bind(i64::from(attempt))
    .bind(change.detail)
    .bind(change.asset)
    .bind(change.error)
    .fetch_optional(&mut *conn)
    .await?;
    seq.ok_or_else(|| corrupt("event", format!("job {job_id} is missing")))
}

async fn transition(
    conn: &mut PgConnection,
    job: &Job,
    to: JobState,
    change: Change<'_>,
    now_ms: i64,
) -> Result<Event, StoreError> {
    let attempt = change.attempt.unwrap_or(job.attempt);
    let seq = append_event(conn, &job.id, to, attempt, &change, now_ms).await?;
    Ok(event(seq, &job.id, job.tier, Some(job.state), job.created_ms, to, attempt, &change, now_ms))
}

async fn insert_outbox(conn: &mut PgConnection, job: &Job, not_before: i64) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO outbox (job_id, tier, client, attempt, not_before) VALUES ($1, $2, $3, $4, $5)")
        .bind(&job.id)
        .bind(job.tier.as_str())
        .bind(&job.client)
        .bind(i64::from(job.attempt + 1))
        .bind(not_before)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn submit_op(conn: &mut PgConnection, new: NewJob) -> Result<Submitted, StoreError> {
    if let Some(idem) = &new.idempotency_key {
        let row = sqlx::query("SELECT * FROM jobs WHERE client = $1 AND idempotency_key = $2")
            .bind(&new.client)
            .bind(idem)
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = row {
            return Ok(Submitted { job: job_from_row(&row)?, admission: Admission::Existing, events: vec![] });
        }
    }
    let request = serde_json::to_string(&new.request).map_err(|e| corrupt("request", e))?;
    // One statement: the job (attached to a live render of its key unless the key has an
    // asset), its first event (`cached` when there is an asset), and an outbox row when it
    // leads a render. The trigger runs at the end of the statement and sees the new job.
    let row = sqlx::query(
        "WITH a AS (SELECT hash FROM assets WHERE cache_key = $4 LIMIT 1), \
         l AS (SELECT id FROM jobs WHERE cache_key = $4 AND follows IS NULL \
               AND state IN ('queued', 'dispatched', 'running') ORDER BY seq LIMIT 1), \
         j AS (INSERT INTO jobs (id, state, tier, request, cache_key, client, idempotency_key, follows, attempt, \
                 created_ms, updated_ms) \
               SELECT $1, 'queued', $2, $3, $4, $5, $6, \
                 CASE WHEN EXISTS (SELECT 1 FROM a) THEN NULL ELSE (SELECT id FROM l) END, 0, $7, $7 \
               RETURNING id, tier, client, follows), \
         e AS (INSERT INTO job_events (job_id, at_ms, state, attempt, detail, asset) \
               SELECT j.id, $7, CASE WHEN a.hash IS NULL THEN 'queued' ELSE 'cached' END, 0, \
                 CASE WHEN a.hash IS NOT NULL THEN 'answered from the cache' \
                      WHEN j.follows IS NOT NULL THEN 'attached to the render of job ' || j.follows \
                      ELSE 'queued' END, a.hash \
               FROM j LEFT JOIN a ON true RETURNING seq, state, detail, asset), \
         o AS (INSERT INTO outbox (job_id, tier, client, attempt, not_before) \
               SELECT j.id, j.tier, j.client, 1, $7 FROM j WHERE j.follows IS NULL AND NOT EXISTS (SELECT 1 FROM a)) \
         SELECT e.seq, e.state, e.detail, e.asset, j.follows FROM e, j",
    )
    .bind(&new.id)
    .bind(new.request.tier.as_str())
    .bind(&request)
    .bind(&new.cache_key)
    .bind(&new.client)
    .bind(&new.idempotency_key)
    .bind(new.now_ms)
    .fetch_one(&mut *conn)
    .await?;
    let state = state_of(&row)?;
    let follows: Option<String> = row.col("follows")?;
    let asset: Option<String> = row.col("asset")?;
    let detail: String = row.col("detail")?;
    let admission = match (state, &follows) {
        (JobState::Cached, _) => Admission::Cached,
        (_, Some(_)) => Admission::Attached,
        _ => Admission::Queued,
    };
    let change = Change { detail: &detail, asset: asset.as_deref(), ..Change::default() };
    let event = event(row.col("seq")?, &new.id, new.request.tier, None, new.now_ms, state, 0, &change, new.now_ms);
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
    Ok(Submitted { job, admission, events: vec![event] })
}

async fn pending_op(conn: &mut PgConnection, now_ms: i64, limit: u32) -> Result<Pending, StoreError> {
    let rows = sqlx::query(
        "SELECT o.id, o.job_id, o.tier, o.client, o.attempt, j.request, j.cache_key, j.created_ms, \
           (j.state = 'queued' AND j.follows IS NULL AND j.attempt + 1 = o.attempt) AS live \
         FROM outbox o JOIN jobs j ON j.id = o.job_id \
         WHERE o.sent_ms IS NULL AND o.not_before <= $1 ORDER BY o.id LIMIT $2",
    )
    .bind(now_ms)
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await?;
    let next_due_ms: Option<i64> =
        sqlx::query_scalar("SELECT MIN(not_before) FROM outbox WHERE sent_ms IS NULL AND not_before > $1")
            .bind(now_ms)
            .fetch_one(&mut *conn)
            .await?;
    let rows = rows.iter().map(|r| outgoing_from_row(r, r.col("live")?)).collect::<Result<_, StoreError>>()?;
    Ok(Pending { rows, next_due_ms })
}

async fn mark_sent_op(conn: &mut PgConnection, ids: &[i64], now_ms: i64) -> Result<Vec<Event>, StoreError> {
    let rows = sqlx::query(
        "WITH u AS (UPDATE outbox SET sent_ms = $1 WHERE sent_ms IS NULL AND id = ANY($2)), \
         ins AS (INSERT INTO job_events (job_id, at_ms, state, attempt, detail) \
           SELECT j.id, $1, 'dispatched', j.attempt, 'to the ' || j.tier || ' queue' FROM jobs j \
           WHERE j.state = 'queued' AND j.follows IS NULL AND j.id IN (SELECT o.job_id FROM outbox o \
             WHERE o.id = ANY($2) AND o.attempt = j.attempt + 1) \
           RETURNING seq, job_id, attempt) \
         SELECT ins.seq, ins.job_id, ins.attempt, j.tier, j.created_ms FROM ins JOIN jobs j ON j.id = ins.job_id",
    )
    .bind(now_ms)
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(|r| dispatched_event(r, now_ms)).collect()
}

async fn take_due_op(conn: &mut PgConnection, now_ms: i64, limit: u32) -> Result<Due, StoreError> {
    let pending = pending_op(&mut *conn, now_ms, limit).await?;
    let ids: Vec<i64> = pending.rows.iter().map(|o| o.id).collect();
    let events = if ids.is_empty() { vec![] } else { mark_sent_op(conn, &ids, now_ms).await? };
    Ok(Due::new(pending, events))
}

async fn start_op(conn: &mut PgConnection, d: &Dispatch, now_ms: i64) -> Result<Option<Event>, StoreError> {
    let row = sqlx::query("SELECT state, attempt, follows FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(&d.job_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let (from, attempt, follows): (JobState, i64, Option<String>) =
        (state_of(&row)?, row.col("attempt")?, row.col("follows")?);
    if !start_allowed(from, attempt, follows.is_some(), d) {
        return Ok(None);
    }
    let detail = format!("attempt {}", d.attempt);
    let change = Change { attempt: Some(d.attempt), detail: &detail, ..Change::default() };
    let seq = append_event(conn, &d.job_id, JobState::Running, d.attempt, &change, now_ms).await?;
    Ok(Some(event(seq, &d.job_id, d.tier, Some(from), d.created_ms, JobState::Running, d.attempt, &change, now_ms)))
}

async fn finish_op(
    conn: &mut PgConnection,
    d: &Dispatch,
    outcome: Outcome,
    now_ms: i64,
) -> Result<Vec<Event>, StoreError> {
    let f = Finish::new(d, &outcome);
    // The asset is recorded even when the job was cancelled meanwhile.
    if let (Some(asset), Some(bytes)) = (f.asset, f.bytes) {
        sqlx::query(
            "INSERT INTO assets (hash, cache_key, bytes, created_ms) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(asset)
        .bind(&d.cache_key)
        .bind(bytes)
        .bind(now_ms)
        .execute(&mut *conn)
        .await?;
    }
    // Only the running attempt's first report moves the job (idempotent by job id + attempt).
    let seq: Option<i64> = sqlx::query_scalar(
        "INSERT INTO job_events (job_id, at_ms, state, attempt, detail, asset, error) \
         SELECT id, $2, $3, $4, $5, $6, $7 FROM jobs WHERE id = $1 AND state = 'running' AND attempt = $4 \
         RETURNING seq",
    )
    .bind(&d.job_id)
    .bind(now_ms)
    .bind(f.to.as_str())
    .bind(i64::from(d.attempt))
    .bind(f.detail)
    .bind(f.asset)
    .bind(f.error)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(seq) = seq else { return Ok(vec![]) };
    let mut events = vec![f.lead_event(d, seq, now_ms)];
    if let Some(retry_at) = f.retry_at {
        sqlx::query("INSERT INTO outbox (job_id, tier, client, attempt, not_before) VALUES ($1, $2, $3, $4, $5)")
            .bind(&d.job_id)
            .bind(d.tier.as_str())
            .bind(&d.client)
            .bind(i64::from(d.attempt) + 1)
            .bind(retry_at)
            .execute(&mut *conn)
            .await?;
    }
    if let Some(to) = f.followers_to {
        let rows = sqlx::query(
            "WITH ins AS (INSERT INTO job_events (job_id, at_ms, state, attempt, detail, asset, error) \
               SELECT f.id, $2, $3, f.attempt, $4, $5, $6 FROM jobs f WHERE f.follows = $1 AND f.state = 'queued' \
               RETURNING seq, job_id) \
             SELECT ins.seq, ins.job_id, j.created_ms FROM ins JOIN jobs j ON j.id = ins.job_id",
        )
        .bind(&d.job_id)
        .bind(now_ms)
        .bind(to.as_str())
        .bind(&f.followers_detail)
        .bind(f.asset)
        .bind(f.error)
        .fetch_all(&mut *conn)
        .await?;
        for r in &rows {
            let job_id: String = r.col("job_id")?;
            events.push(f.follower_event(d, r.col("seq")?, &job_id, r.col("created_ms")?, now_ms));
        }
    }
    Ok(events)
}

/// Live jobs attached to `leader`, oldest first.
async fn followers(conn: &mut PgConnection, leader: &str) -> Result<Vec<Job>, StoreError> {
    let rows = sqlx::query(
        "SELECT * FROM jobs WHERE follows = $1 AND state NOT IN ('succeeded', 'failed', 'cancelled', 'cached') \
         ORDER BY seq",
    )
    .bind(leader)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(job_from_row).collect()
}

async fn cancel_op(conn: &mut PgConnection, job_id: &str, by: &str, now_ms: i64) -> Result<JobChange, StoreError> {
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
        sqlx::query("UPDATE jobs SET follows = CASE WHEN id = $1 THEN NULL ELSE $1 END WHERE follows = $2")
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

async fn resume_op(conn: &mut PgConnection, now_ms: i64) -> Result<Vec<Event>, StoreError> {
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

impl Store for PgStore {
    fn submit(&self, job: NewJob) -> BoxFut<'_, Result<Submitted, StoreError>> {
        Box::pin(self.write(Box::new(move |c| Box::pin(submit_op(c, job)))))
    }

    fn take_due(&self, now_ms: i64, limit: u32) -> BoxFut<'_, Result<Due, StoreError>> {
        Box::pin(self.write(Box::new(move |c| Box::pin(take_due_op(c, now_ms, limit)))))
    }

    fn pending(&self, now_ms: i64, limit: u32) -> BoxFut<'_, Result<Pending, StoreError>> {
        Box::pin(async move {
            let mut conn = self.read.acquire().await?;
            pending_op(&mut conn, now_ms, limit).await
        })
    }

    fn mark_sent(&self, ids: Vec<i64>, now_ms: i64) -> BoxFut<'_, Result<Vec<Event>, StoreError>> {
        Box::pin(self.write(Box::new(move |c| Box::pin(async move { mark_sent_op(c, &ids, now_ms).await }))))
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
            let row = sqlx::query("SELECT * FROM jobs WHERE id = $1").bind(id).fetch_optional(&self.read).await?;
            row.as_ref().map(job_from_row).transpose()
        })
    }

    fn list(&self, q: ListQuery) -> BoxFut<'_, Result<Page, StoreError>> {
        Box::pin(async move {
            let limit = q.limit.max(1);
            let rows = sqlx::query(
                "SELECT * FROM jobs WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR tier = $2) \
                 AND ($3::bigint IS NULL OR created_ms >= $3) AND ($4::bigint IS NULL OR created_ms < $4) \
                 AND ($5::text IS NULL OR client = $5) AND ($6::bigint IS NULL OR seq < $6) ORDER BY seq DESC LIMIT $7",
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
            let next =
                if rows.len() == limit as usize { rows.last().map(|r| r.col::<i64>("seq")).transpose()? } else { None };
            Ok(Page { jobs: rows.iter().map(job_from_row).collect::<Result<_, _>>()?, next })
        })
    }

    fn events(&self, job_id: &str, after_seq: i64) -> BoxFut<'_, Result<Vec<Event>, StoreError>> {
        let id = job_id.to_owned();
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT e.*, j.tier FROM job_events e JOIN jobs j ON j.id = e.job_id \
                 WHERE e.job_id = $1 AND e.seq > $2 ORDER BY e.seq",
            )
            .bind(&id)
            .bind(after_seq)
            .fetch_all(&self.read)
            .await?;
            rows.iter().map(|r| event_from_row(r, super::rows::tier_of(r)?)).collect()
        })
    }

    fn counts(&self) -> BoxFut<'_, Result<Vec<StateCount>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT tier, state, COUNT(*) AS n FROM jobs GROUP BY tier, state")
                .fetch_all(&self.read)
                .await?;
            rows.iter().map(|r| Ok((super::rows::tier_of(r)?, state_of(r)?, r.col("n")?))).collect()
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
            rows.iter().map(token_from_row).collect()
        })
    }

    fn add_token(&self, token: TokenRow, now_ms: i64) -> BoxFut<'_, Result<(), StoreError>> {
        // A taken name is a refusal that writes nothing: an answer, not a failed write.
        let op: OpFn<PgConnection, Result<(), StoreError>> = Box::new(move |c| {
            Box::pin(async move {
                let inserted = sqlx::query(
                    "INSERT INTO api_tokens (token_hash, name, role, created_ms) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (name) DO NOTHING",
                )
                .bind(&token.token_hash)
                .bind(&token.name)
                .bind(token.role.as_str())
                .bind(now_ms)
                .execute(&mut *c)
                .await?;
                if inserted.rows_affected() == 0 {
                    return Ok(Err(StoreError::Conflict(format!("a token named {:?}", token.name))));
                }
                Ok(Ok(()))
            })
        });
        Box::pin(async move { self.write(op).await? })
    }
}
