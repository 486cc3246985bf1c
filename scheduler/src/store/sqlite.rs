//! The SQLite store: WAL, one writer connection with group commit, a pool of readers.
//!
//! Every change goes through the group-commit writer ([`super::writer`]); a refusal that writes
//! nothing (a taken token name) is an answer, not a failure. `synchronous = NORMAL` under WAL keeps
//! every committed transaction through a crash of the process; a power cut may lose the last
//! few (SQLite's documented trade), never corrupt the file.

use std::path::Path;
use std::time::Duration;

use kiln_protocol::{JobState, Tier};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, Row, SqliteConnection};

use super::rows::{
    Change, Cols, Finish, admitted, corrupt, dispatched_event, event, event_from_row, job_from_row, outgoing_from_row,
    start_allowed, state_of, token_from_row,
};
use super::writer::{Connect, OpFn, WeakWriter, WriteConn, Writer};
use super::{
    Admission, AttemptFailure, BoxFut, Dispatch, DrainedWorker, Due, Event, FailureTally, Job, JobChange, ListQuery,
    NewJob, Outcome, Page, Pending, Recorded, StateCount, Store, StoreError, Submitted, TokenRow,
};

/// The SQLite store.
#[derive(Clone)]
pub struct SqliteStore {
    writer: Writer<SqliteConnection>,
    read: SqlitePool,
}

impl WriteConn for SqliteConnection {
    const BEGIN: &'static str = "BEGIN IMMEDIATE";
    fn exec<'c>(&'c mut self, sql: &'static str) -> BoxFut<'c, Result<(), sqlx::Error>> {
        Box::pin(async move { sqlx::query(sql).execute(self).await.map(|_| ()) })
    }
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
        let path = path.to_path_buf();
        let connect: Connect<SqliteConnection> = Box::new(move || {
            let opts = options(&path).create_if_missing(false).pragma("wal_autocheckpoint", "0");
            Box::pin(async move { Ok(opts.connect().await?) })
        });
        let writer = Writer::spawn(conn, connect);
        tokio::spawn(checkpointer(checkpoints, writer.downgrade()));
        Ok(SqliteStore { writer, read })
    }

    async fn write<T: Send + 'static>(&self, f: OpFn<SqliteConnection, T>) -> Result<T, StoreError> {
        self.writer.write(f).await
    }

    /// One submit, one operation of the writer's batch (no round trips to save in-process).
    async fn submit_one(&self, job: NewJob) -> Result<Submitted, StoreError> {
        self.write(Box::new(move |c| Box::pin(submit_op(c, job)))).await
    }

    async fn record_one(&self, r: Recorded) -> Result<Vec<Event>, StoreError> {
        self.write(Box::new(move |c| Box::pin(record_op(c, r)))).await
    }
}

/// Copies the WAL back into the database every second without blocking the writer (`PASSIVE`),
/// until the store is dropped.
async fn checkpointer(mut conn: SqliteConnection, store: WeakWriter<SqliteConnection>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !store.is_alive() {
            break;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut conn).await {
            tracing::warn!(error = %e, "store: WAL checkpoint failed; trying again in a second");
        }
    }
    let _ = conn.close().await;
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
    let asset: Option<String> = first.try_get("asset")?;
    let follows: Option<String> = last.try_get("follows")?;
    let detail: String = first.try_get("detail")?;
    Ok(admitted(new, first.try_get("seq")?, state_of(first)?, follows, asset, &detail))
}

/// The due outbox rows in id order (by the `outbox_unsent_id` index), then when the next falls due.
const PENDING_SQL: &str = "SELECT o.id, o.job_id, o.tier, o.client, o.attempt, j.request, j.cache_key, j.created_ms, \
       (j.state = 'queued' AND j.follows IS NULL AND j.attempt + 1 = o.attempt) AS live \
     FROM outbox o JOIN jobs j ON j.id = o.job_id \
     WHERE o.sent_ms IS NULL AND o.not_before <= ?1 ORDER BY o.id LIMIT ?2; \
     SELECT MIN(not_before) AS next FROM outbox WHERE sent_ms IS NULL AND not_before > ?1";

/// The due outbox rows, oldest first, and when the next row not yet due falls due.
async fn pending_op(conn: &mut SqliteConnection, now_ms: i64, limit: u32) -> Result<Pending, StoreError> {
    let rows = sqlx::query(PENDING_SQL).bind(now_ms).bind(i64::from(limit)).fetch_all(&mut *conn).await?;
    let (next, due) = rows.split_last().ok_or_else(|| corrupt("outbox", "no MIN row"))?;
    let rows = due.iter().map(|r| outgoing_from_row(r, r.try_get("live")?)).collect::<Result<_, StoreError>>()?;
    Ok(Pending { rows, next_due_ms: next.try_get("next")? })
}

/// Marks the given outbox rows (`?2`, a JSON array of ids) sent and appends `dispatched` events.
const MARK_SENT_SQL: &str = "UPDATE outbox SET sent_ms = ?1 WHERE sent_ms IS NULL AND id IN (SELECT value FROM json_each(?2)); \
     INSERT INTO job_events (job_id, at_ms, state, attempt, detail) \
     SELECT j.id, ?1, 'dispatched', j.attempt, 'to the ' || j.tier || ' queue' \
     FROM (SELECT DISTINCT o.job_id, o.attempt FROM json_each(?2) v CROSS JOIN outbox o WHERE o.id = v.value) s \
       CROSS JOIN jobs j \
     WHERE j.id = s.job_id AND j.state = 'queued' AND j.follows IS NULL AND s.attempt = j.attempt + 1 \
     RETURNING seq, job_id, attempt, (SELECT tier FROM jobs WHERE id = job_id) AS tier, \
       (SELECT created_ms FROM jobs WHERE id = job_id) AS created_ms";

/// Marks outbox rows sent and moves each of their jobs that still waits for that attempt to
/// `dispatched` (a cancelled job, or one whose result came first, stays as it is). The jobs are
/// found from the given ids by key (`CROSS JOIN` fixes SQLite's join order): a scan of the queued
/// jobs, each checked against the list, cost a second per 512 with 10,000 queued.
async fn mark_sent_op(conn: &mut SqliteConnection, ids: &[i64], now_ms: i64) -> Result<Vec<Event>, StoreError> {
    let ids = serde_json::to_string(ids).map_err(|e| corrupt("outbox ids", e))?;
    let rows = sqlx::query(MARK_SENT_SQL).bind(now_ms).bind(ids).fetch_all(&mut *conn).await?;
    rows.iter().map(|r| dispatched_event(r, now_ms)).collect()
}

async fn take_due_op(conn: &mut SqliteConnection, now_ms: i64, limit: u32) -> Result<Due, StoreError> {
    let pending = pending_op(&mut *conn, now_ms, limit).await?;
    let ids: Vec<i64> = pending.rows.iter().map(|o| o.id).collect();
    let events = if ids.is_empty() { vec![] } else { mark_sent_op(conn, &ids, now_ms).await? };
    Ok(Due::new(pending, events))
}

async fn finish_op(
    conn: &mut SqliteConnection,
    d: &Dispatch,
    outcome: Outcome,
    now_ms: i64,
) -> Result<Vec<Event>, StoreError> {
    let f = Finish::new(d, &outcome);
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
    .bind(f.to.as_str())
    .bind(i64::from(d.attempt))
    .bind(f.detail)
    .bind(f.asset)
    .bind(f.error)
    .bind(&d.cache_key)
    .bind(f.bytes)
    .bind(f.followers_to.map(JobState::as_str))
    .bind(&f.followers_detail)
    .bind(f.retry_at)
    .bind(d.tier.as_str())
    .bind(&d.client)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            let seq = r.try_get("seq")?;
            let job_id: String = r.try_get("job_id")?;
            if r.try_get::<String, _>("from_state")? == "running" {
                return Ok(f.lead_event(d, seq, now_ms));
            }
            Ok(f.follower_event(d, seq, &job_id, r.try_get("created_ms")?, now_ms))
        })
        .collect()
}

/// Start and finish in one op (the same statements, one place in the batch).
async fn record_op(conn: &mut SqliteConnection, r: Recorded) -> Result<Vec<Event>, StoreError> {
    let mut events: Vec<Event> = start_op(&mut *conn, &r.d, r.started_ms).await?.into_iter().collect();
    events.extend(finish_op(conn, &r.d, r.outcome, r.now_ms).await?);
    Ok(events)
}

super::shared::shared_ops!(SqliteConnection);
super::shared::store_impl!(SqliteStore, SqliteConnection);
super::fleet::fleet_impl!(SqliteStore, SqliteConnection);

#[cfg(test)]
mod tests {
    use super::*;

    /// What SQLite plans for each statement of `sql` on a store's schema.
    async fn plans(conn: &mut SqliteConnection, sql: &str) -> Vec<String> {
        let mut out = Vec::new();
        for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {stmt}")))
                .fetch_all(&mut *conn)
                .await
                .unwrap();
            out.extend(rows.iter().map(|r| r.get::<String, _>("detail")));
        }
        out
    }

    #[tokio::test]
    async fn dispatch_reads_the_outbox_and_jobs_by_key_not_by_scanning_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        drop(SqliteStore::open(&path).await.unwrap());
        let mut conn = options(&path).connect().await.unwrap();
        let pending = plans(&mut conn, PENDING_SQL).await;
        assert!(pending.iter().any(|p| p == "SCAN o USING INDEX outbox_unsent_id"), "{pending:?}");
        // Marking walks the id list (json_each, then its distinct rows `s`) and finds each outbox
        // row and job by key: no `SCAN` of either table, which would visit every job ever queued.
        let marked = plans(&mut conn, MARK_SENT_SQL).await;
        let walked = |p: &&String| !p.starts_with("SCAN ") || p.contains("VIRTUAL TABLE") || *p == "SCAN s";
        assert!(marked.iter().all(|p| walked(&p)), "{marked:?}");
        assert!(marked.iter().any(|p| p.starts_with("SEARCH j USING INDEX")), "{marked:?}");
    }
}
