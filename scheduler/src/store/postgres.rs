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
    Admission, AttemptFailure, BoxFut, Dispatch, DrainedWorker, Due, Event, FailureTally, Job, JobChange, ListQuery,
    NewJob, Outcome, Page, Pending, StateCount, Store, StoreError, Submitted, TokenRow,
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

    /// Creates the schema `name` in the database at `base` and returns a URL whose connections
    /// use it: a private namespace for a test or a benchmark on a shared server. `name` must be
    /// a plain identifier (letters, digits, `_`).
    pub async fn create_schema(base: &str, name: &str) -> Result<String, StoreError> {
        check_identifier(name)?;
        let mut conn = PgConnectOptions::from_str(base)?.connect().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}"))).execute(&mut conn).await?;
        let sep = if base.contains('?') { '&' } else { '?' };
        Ok(format!("{base}{sep}options=-csearch_path%3D{name}"))
    }

    /// Drops the schema `name` (and everything in it) from the database at `base`.
    pub async fn drop_schema(base: &str, name: &str) -> Result<(), StoreError> {
        check_identifier(name)?;
        let mut conn = PgConnectOptions::from_str(base)?.connect().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {name} CASCADE"))).execute(&mut conn).await?;
        Ok(())
    }

    async fn write<T: Send + 'static>(&self, f: OpFn<PgConnection, T>) -> Result<T, StoreError> {
        self.writer.write(f).await
    }
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
        // Every lookup goes from the given ids by primary key (`OFFSET 0` keeps each lateral
        // subquery a per-row index probe): under a burst the planner's statistics lag, and a scan
        // of the state index would visit every job that was ever queued.
        "WITH u AS (UPDATE outbox SET sent_ms = $1 WHERE id IN (SELECT x.id FROM unnest($2::BIGINT[]) AS i (id) \
           CROSS JOIN LATERAL (SELECT id, sent_ms FROM outbox WHERE id = i.id OFFSET 0) x WHERE x.sent_ms IS NULL)), \
         ins AS (INSERT INTO job_events (job_id, at_ms, state, attempt, detail) \
           SELECT j.id, $1, 'dispatched', j.attempt, 'to the ' || j.tier || ' queue' \
           FROM (SELECT DISTINCT o.job_id, o.attempt FROM unnest($2::BIGINT[]) AS i (id) \
             CROSS JOIN LATERAL (SELECT job_id, attempt FROM outbox WHERE id = i.id OFFSET 0) o) o \
           CROSS JOIN LATERAL (SELECT id, attempt, tier, state, follows FROM jobs WHERE id = o.job_id OFFSET 0) j \
           WHERE j.state = 'queued' AND j.follows IS NULL AND j.attempt + 1 = o.attempt \
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

/// A worker's whole attempt in one statement (the start unless recorded already, the asset, the
/// outcome, a retry's outbox row, the attached jobs), so a result costs the writer one round
/// trip instead of five. The same rules as `start_op` and `finish_op`: the job must lead its
/// render and wait for exactly this attempt (or be running it). The events are inserted in
/// order, and the projection trigger applies them in that order at the end of the statement.
async fn record_op(
    conn: &mut PgConnection,
    d: &Dispatch,
    started_ms: i64,
    outcome: Outcome,
    now_ms: i64,
) -> Result<Vec<Event>, StoreError> {
    let f = Finish::new(d, &outcome);
    let start_detail = format!("attempt {}", d.attempt);
    let rows = sqlx::query(
        "WITH j AS (SELECT id, state, attempt, follows FROM jobs WHERE id = $1), \
         ok AS (SELECT j.id, j.state AS from_state, \
                  (j.state IN ('queued', 'dispatched') AND j.follows IS NULL AND j.attempt + 1 = $2) AS starts \
                FROM j WHERE (j.state IN ('queued', 'dispatched') AND j.follows IS NULL AND j.attempt + 1 = $2) \
                  OR (j.state = 'running' AND j.attempt = $2)), \
         a AS (INSERT INTO assets (hash, cache_key, bytes, created_ms) \
               SELECT CAST($8 AS TEXT), $11, CAST($10 AS BIGINT), $4 \
               WHERE CAST($8 AS TEXT) IS NOT NULL AND CAST($10 AS BIGINT) IS NOT NULL ON CONFLICT DO NOTHING), \
         ev AS (INSERT INTO job_events (job_id, at_ms, state, attempt, detail, asset, error) \
                SELECT ok.id, x.at_ms, x.state, $2, x.detail, x.asset, x.error FROM ok CROSS JOIN \
                  (VALUES (1, CAST($3 AS BIGINT), 'running', CAST($5 AS TEXT), CAST(NULL AS TEXT), CAST(NULL AS TEXT)), \
                          (2, CAST($4 AS BIGINT), CAST($6 AS TEXT), CAST($7 AS TEXT), CAST($8 AS TEXT), CAST($9 AS TEXT))) \
                    AS x (ord, at_ms, state, detail, asset, error) \
                WHERE x.ord = 2 OR ok.starts ORDER BY x.ord RETURNING seq, state), \
         o AS (INSERT INTO outbox (job_id, tier, client, attempt, not_before) \
               SELECT ok.id, $13, $14, $2 + 1, CAST($12 AS BIGINT) FROM ok WHERE CAST($12 AS BIGINT) IS NOT NULL), \
         fl AS (INSERT INTO job_events (job_id, at_ms, state, attempt, detail, asset, error) \
                SELECT f.id, $4, CAST($15 AS TEXT), f.attempt, $16, CAST($8 AS TEXT), CAST($9 AS TEXT) FROM jobs f \
                WHERE CAST($15 AS TEXT) IS NOT NULL AND EXISTS (SELECT 1 FROM ok) AND f.follows = $1 AND f.state = 'queued' \
                RETURNING seq, job_id) \
         SELECT ev.seq, ev.state, CAST(NULL AS TEXT) AS job_id, CAST(NULL AS BIGINT) AS created_ms, \
           (SELECT from_state FROM ok) AS from_state FROM ev \
         UNION ALL SELECT fl.seq, NULL, fl.job_id, jf.created_ms, NULL FROM fl JOIN jobs jf ON jf.id = fl.job_id",
    )
    .bind(&d.job_id)
    .bind(i64::from(d.attempt))
    .bind(started_ms)
    .bind(now_ms)
    .bind(&start_detail)
    .bind(f.to.as_str())
    .bind(f.detail)
    .bind(f.asset)
    .bind(f.error)
    .bind(f.bytes)
    .bind(&d.cache_key)
    .bind(f.retry_at)
    .bind(d.tier.as_str())
    .bind(&d.client)
    .bind(f.followers_to.map(JobState::as_str))
    .bind(&f.followers_detail)
    .fetch_all(&mut *conn)
    .await?;
    let mut events = Vec::with_capacity(rows.len());
    for r in &rows {
        let seq: i64 = r.col("seq")?;
        match r.col::<Option<String>>("job_id")? {
            Some(job_id) => events.push(f.follower_event(d, seq, &job_id, r.col("created_ms")?, now_ms)),
            None if r.col::<Option<String>>("state")?.as_deref() == Some("running") => {
                let from: Option<String> = r.col("from_state")?;
                let from = from.map(|s| s.parse::<JobState>()).transpose().map_err(|e| corrupt("job state", e))?;
                let change = Change { attempt: Some(d.attempt), detail: &start_detail, ..Change::default() };
                let (id, a) = (&d.job_id, d.attempt);
                events.push(event(seq, id, d.tier, from, d.created_ms, JobState::Running, a, &change, started_ms));
            }
            None => events.push(f.lead_event(d, seq, now_ms)),
        }
    }
    // The statement returns the lead's events before the followers'; keep the log's order.
    events.sort_by_key(|e| e.seq);
    Ok(events)
}

super::shared::shared_ops!(PgConnection);
super::shared::store_impl!(PgStore, PgConnection);
super::fleet::fleet_impl!(PgStore, PgConnection);

fn check_identifier(name: &str) -> Result<(), StoreError> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(StoreError::BadName(format!("schema name {name:?}: only letters, digits and '_'")));
    }
    Ok(())
}
