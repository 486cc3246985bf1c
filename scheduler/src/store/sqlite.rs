//! The SQLite store: WAL, one writer connection with group commit, a pool of readers.
//!
//! Every change goes through the group-commit writer ([`super::writer`]); submits, starts and
//! results are gathered into sets on the way ([`super::writer::Gather`]), since each statement
//! costs a round trip to SQLite's own thread. A refusal that writes nothing (a taken token name)
//! is an answer, not a failure. `synchronous = NORMAL` under WAL keeps every committed
//! transaction through a crash of the process; a power cut may lose the last quarter second of
//! them ([`sync_wal`]), never corrupt the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_protocol::{JobState, Tier};
use serde::Serialize;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Row, SqliteConnection};
use tokio::sync::watch;

use super::admit;
use super::rows::{
    Change, Charge, Cols, Finish, corrupt, dispatched_event, event, event_from_row, job_from_row, outgoing_from_row,
    start_allowed, start_detail, start_event, state_of, token_from_row,
};
use super::writer::{Connect, Gather, OpFn, WriteConn, Writer};
use super::{
    AttemptFailure, BoxFut, Dispatch, DrainedWorker, Event, FailureTally, Job, JobChange, ListQuery, NewJob, Outcome,
    Page, Pending, Recorded, StateCount, Store, StoreError, Submitted, TokenRow,
};

/// The SQLite store.
#[derive(Clone)]
pub struct SqliteStore {
    writer: Writer<SqliteConnection>,
    read: SqlitePool,
    submits: Gather<NewJob, Submitted>,
    starts: Gather<(Dispatch, i64), Option<Event>>,
    results: Gather<Ending, Vec<Event>>,
}

/// A result to write: a whole attempt (`record`: its start too, unless that is recorded
/// already) or the end of one that is running (`finish`).
#[derive(Clone)]
struct Ending {
    r: Recorded,
    may_start: bool,
}

impl WriteConn for SqliteConnection {
    const BEGIN: &'static str = "BEGIN IMMEDIATE";
    /// The writer copies the WAL back into the database itself (`PASSIVE`: it waits for no
    /// reader), between batches and once it falls idle: a checkpoint from another connection
    /// runs while commits go on, so it never catches up with the WAL's end, and SQLite starts
    /// the WAL over only once a checkpoint has. Under steady load the WAL then grew without end
    /// (900 MB in a 20 s benchmark): every commit appended to new file blocks, which the kernel
    /// zeroes first, and every page read searched a longer WAL index.
    const UPKEEP: Option<&'static str> = Some("PRAGMA wal_checkpoint(PASSIVE)");
    fn exec<'c>(&'c mut self, sql: &'static str) -> BoxFut<'c, Result<(), sqlx::Error>> {
        Box::pin(async move { sqlx::query(sql).execute(self).await.map(|_| ()) })
    }
    fn exec_many<'c>(&'c mut self, sql: &'static str) -> BoxFut<'c, Result<(), sqlx::Error>> {
        Box::pin(async move { sqlx::raw_sql(sql).execute(self).await.map(|_| ()) })
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
        // A statement that writes a set (hundreds of rows from one JSON array) keeps a statement
        // journal to undo itself; past 64 KiB SQLite spills it to a temporary file, a busy farm's
        // time in `pwrite`. In memory it is a few MB at most (a set's rows).
        .pragma("temp_store", "memory")
        // Rows come back from SQLite's thread through a bounded channel (50 by default): a batch
        // statement that answers hundreds of rows stalled that thread every 50 until the caller
        // took them, two context switches each time. A whole batch's rows now fit.
        .row_buffer_size(4 * super::writer::MAX_BATCH)
}

/// How long a committed transaction may wait for its write-ahead log to be flushed to disk.
const WAL_SYNC_EVERY: Duration = Duration::from_millis(250);

/// The write-ahead log of the database at `db`: SQLite names it after the database.
fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// Flushes the write-ahead log to disk at most every [`WAL_SYNC_EVERY`] while transactions
/// commit, and once more when the writer stops. Under `synchronous = NORMAL` SQLite flushes
/// the log only in a checkpoint, so a power cut could lose every commit since the last one.
/// The writer checkpoints only every [`UPKEEP_EVERY`](super::writer::UPKEEP_EVERY): each
/// checkpoint waits for two flushes (the log, then the database) and every caller waits with
/// it. This flush runs on a thread of its own while commits go on, so a power cut loses at most
/// the last quarter of a second of commits, as it did when the writer checkpointed that often.
/// A flush of the log in any state is safe: SQLite's recovery keeps the frames up to the last
/// whole commit whose checksums hold, as it must after the kernel's own writeback at any moment.
async fn sync_wal(wal: PathBuf, mut commits: watch::Receiver<u64>) {
    let mut open = true;
    while open {
        open = commits.changed().await.is_ok();
        commits.borrow_and_update();
        let file = wal.clone();
        let synced = tokio::task::spawn_blocking(move || match std::fs::File::open(&file) {
            Ok(f) => f.sync_data(),
            // No log yet, or none any more (the last connection closed and SQLite removed it).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        })
        .await;
        match synced {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, wal = %wal.display(), "store: cannot flush the write-ahead log"),
            Err(e) => tracing::warn!(error = %e, "store: the write-ahead log's flush did not finish"),
        }
        if open {
            tokio::time::sleep(WAL_SYNC_EVERY).await;
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        // The writer never checkpoints inside a commit (that would stall every caller in the
        // batch); it does between batches and once it falls idle (`UPKEEP`).
        let mut conn = options(path).pragma("wal_autocheckpoint", "0").connect().await?;
        sqlx::migrate!("./migrations/sqlite").run(&mut conn).await?;
        let read =
            SqlitePoolOptions::new().max_connections(4).connect_with(options(path).create_if_missing(false)).await?;
        let wal = wal_path(path);
        let path = path.to_path_buf();
        let connect: Connect<SqliteConnection> = Box::new(move || {
            let opts = options(&path).create_if_missing(false).pragma("wal_autocheckpoint", "0");
            Box::pin(async move { Ok(opts.connect().await?) })
        });
        let writer = Writer::spawn(conn, connect);
        tokio::spawn(sync_wal(wal, writer.commits()));
        let submits = Gather::spawn(writer.clone(), |c, jobs| Box::pin(submit_many_op(c, jobs)));
        let starts = Gather::spawn(writer.clone(), |c, starts| Box::pin(start_many_op(c, starts)));
        let results = Gather::spawn(writer.clone(), |c, ends| Box::pin(end_many_op(c, ends)));
        Ok(SqliteStore { writer, read, submits, starts, results })
    }

    async fn write<T: Send + 'static>(&self, f: OpFn<SqliteConnection, T>) -> Result<T, StoreError> {
        self.writer.write(f).await
    }

    /// Submits, starts and results are gathered while the writer is busy and written as sets:
    /// each statement is a round trip to SQLite's own thread, which under load costs more than
    /// the statement itself, so a batch costs a few round trips instead of a few per job.
    async fn submit_one(&self, job: NewJob) -> Result<Submitted, StoreError> {
        self.submits.call(job).await
    }

    async fn start_one(&self, d: Dispatch, now_ms: i64) -> Result<Option<Event>, StoreError> {
        self.starts.call((d, now_ms)).await
    }

    async fn finish_one(&self, d: Dispatch, outcome: Outcome, now_ms: i64) -> Result<Vec<Event>, StoreError> {
        let r = Recorded { d, started_ms: now_ms, outcome, now_ms };
        self.results.call(Ending { r, may_start: false }).await
    }

    async fn record_one(&self, r: Recorded) -> Result<Vec<Event>, StoreError> {
        self.results.call(Ending { r, may_start: true }).await
    }

    /// Submits `jobs` as one batch (tests: a batch the gathering would make only by chance).
    #[cfg(test)]
    pub(super) async fn submit_batch(&self, jobs: Vec<NewJob>) -> Result<Vec<Submitted>, StoreError> {
        self.write(Box::new(move |c| Box::pin(submit_many_op(c, jobs)))).await
    }

    /// Records `results` as one batch (tests).
    #[cfg(test)]
    pub(super) async fn record_batch(&self, results: Vec<Recorded>) -> Result<Vec<Vec<Event>>, StoreError> {
        let ends = results.into_iter().map(|r| Ending { r, may_start: true }).collect();
        self.write(Box::new(move |c| Box::pin(end_many_op(c, ends)))).await
    }
}

/// JSON text of `v`, for a statement that walks it with `jsonb_each`. Not `json_each`: that
/// hands each element of the array back as JSON text, so every `x.value ->> 'field'` printed the
/// element (a result's carries its provenance, about a kilobyte) and parsed it again, once per
/// field and statement; `jsonb_each` hands it back in SQLite's binary form, read as it is.
fn json(what: &'static str, v: &impl Serialize) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| corrupt(what, e))
}

/// For each cache key in `?1` (a JSON array), its asset and the live job that leads its render.
const KEYS_SQL: &str = "SELECT k.value AS key, (SELECT hash FROM assets WHERE cache_key = k.value LIMIT 1) AS asset, \
       (SELECT id FROM jobs WHERE cache_key = k.value AND follows IS NULL \
          AND state IN ('queued', 'dispatched', 'running') ORDER BY seq LIMIT 1) AS leader \
     FROM jsonb_each(?1) k";

/// The jobs that hold the (client, idempotency key) pairs of `?1`.
const TAKEN_SQL: &str = "SELECT j.* FROM jsonb_each(?1) i CROSS JOIN jobs j \
     WHERE j.client = i.value ->> 0 AND j.idempotency_key = i.value ->> 1";

/// A batch of submits in two round trips (three when some carry an idempotency key): what the
/// database holds for the batch's keys, the rules ([`admit::decide`]), then every new job, its
/// first event and its outbox row in one.
async fn submit_many_op(conn: &mut SqliteConnection, jobs: Vec<NewJob>) -> Result<Vec<Submitted>, StoreError> {
    let keys = json("cache keys", &admit::cache_keys(&jobs))?;
    let known = admit::key_states(&sqlx::query(KEYS_SQL).bind(keys).fetch_all(&mut *conn).await?)?;
    let idems = admit::idempotency_keys(&jobs);
    let taken = if idems.is_empty() {
        HashMap::new()
    } else {
        let pairs = json("idempotency keys", &idems)?;
        admit::taken_keys(&sqlx::query(TAKEN_SQL).bind(pairs).fetch_all(&mut *conn).await?)?
    };
    let admits = admit::decide(&jobs, known, &taken)?;
    let seqs = insert_new_jobs(conn, &admit::new_rows(&jobs, &admits)?).await?;
    admit::answer(jobs, admits, &seqs)
}

/// A new job as [`INSERT_JOBS_SQL`] reads it.
#[derive(Serialize)]
struct NewJson<'a> {
    id: &'a str,
    tier: &'static str,
    request: &'a str,
    key: &'a str,
    client: &'a str,
    idem: Option<&'a str>,
    follows: Option<&'a str>,
    now: i64,
    state: &'static str,
    detail: &'a str,
    asset: Option<&'a str>,
    leads: bool,
}

/// The new jobs of `?1` (a JSON array, in the batch's order), their first events (answering
/// their `seq`) and the outbox rows of those that lead a render. A row is written as its first
/// event leaves it (`queued`, or `cached` with its asset), so the projection skips that event
/// instead of rewriting the row it just wrote (and, for a cache hit, taking it out of the live
/// jobs' index it had just put it in).
const INSERT_JOBS_SQL: &str = "INSERT INTO jobs (id, state, tier, request, cache_key, client, idempotency_key, \
       follows, attempt, created_ms, updated_ms, asset, finished_ms) \
     SELECT x.value ->> 'id', x.value ->> 'state', x.value ->> 'tier', x.value ->> 'request', x.value ->> 'key', \
       x.value ->> 'client', x.value ->> 'idem', x.value ->> 'follows', 0, x.value ->> 'now', x.value ->> 'now', \
       x.value ->> 'asset', \
       CASE WHEN x.value ->> 'state' IN ('succeeded', 'failed', 'cancelled', 'cached') THEN x.value ->> 'now' END \
     FROM jsonb_each(?1) x ORDER BY x.key; \
     INSERT INTO job_events (job_id, at_ms, state, attempt, detail, asset) \
     SELECT x.value ->> 'id', x.value ->> 'now', x.value ->> 'state', 0, x.value ->> 'detail', x.value ->> 'asset' \
     FROM jsonb_each(?1) x ORDER BY x.key RETURNING seq, job_id; \
     INSERT INTO outbox (job_id, tier, client, attempt, not_before) \
     SELECT x.value ->> 'id', x.value ->> 'tier', x.value ->> 'client', 1, x.value ->> 'now' \
     FROM jsonb_each(?1) x WHERE x.value ->> 'leads' ORDER BY x.key";

async fn insert_new_jobs(
    conn: &mut SqliteConnection,
    new: &[admit::NewRow<'_>],
) -> Result<HashMap<String, i64>, StoreError> {
    if new.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<NewJson> = new
        .iter()
        .map(|n| NewJson {
            id: &n.job.id,
            tier: n.job.request.tier.as_str(),
            request: &n.request,
            key: &n.job.cache_key,
            client: &n.job.client,
            idem: n.job.idempotency_key.as_deref(),
            follows: n.follows,
            now: n.job.now_ms,
            state: n.state.as_str(),
            detail: &n.detail,
            asset: n.asset,
            leads: n.leads,
        })
        .collect();
    let rows = sqlx::query(INSERT_JOBS_SQL).bind(json("new jobs", &rows)?).fetch_all(&mut *conn).await?;
    rows.iter().map(|r| Ok((r.col("job_id")?, r.col("seq")?))).collect()
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
const MARK_SENT_SQL: &str = "UPDATE outbox SET sent_ms = ?1 WHERE sent_ms IS NULL AND id IN (SELECT value FROM jsonb_each(?2)); \
     INSERT INTO job_events (job_id, at_ms, state, attempt, detail) \
     SELECT j.id, ?1, 'dispatched', j.attempt, 'to the ' || j.tier || ' queue' \
     FROM (SELECT DISTINCT o.job_id, o.attempt FROM jsonb_each(?2) v CROSS JOIN outbox o WHERE o.id = v.value) s \
       CROSS JOIN jobs j \
     WHERE j.id = s.job_id AND j.state = 'queued' AND j.follows IS NULL AND s.attempt = j.attempt + 1 \
     RETURNING seq, job_id, attempt, (SELECT tier FROM jobs WHERE id = job_id) AS tier, \
       (SELECT created_ms FROM jobs WHERE id = job_id) AS created_ms";

/// Marks outbox rows sent and moves each of their jobs that still waits for that attempt to
/// `dispatched` (a cancelled job, or one whose result came first, stays as it is). The jobs are
/// found from the given ids by key (`CROSS JOIN` fixes SQLite's join order): a scan of the queued
/// jobs, each checked against the list, grows with the queue (see `docs/benchmarks.md`).
async fn mark_sent_op(conn: &mut SqliteConnection, ids: &[i64], now_ms: i64) -> Result<Vec<Event>, StoreError> {
    let rows = sqlx::query(MARK_SENT_SQL).bind(now_ms).bind(json("outbox ids", &ids)?).fetch_all(&mut *conn).await?;
    rows.iter().map(|r| dispatched_event(r, now_ms)).collect()
}

/// What a job is now: its state, its attempt, and whether it is attached to another's render.
type JobNow = (JobState, i64, bool);

/// The jobs named in `?1` (a JSON array of ids) as they are now.
const JOBS_NOW_SQL: &str = "SELECT j.id, j.state, j.attempt, j.follows IS NOT NULL AS attached \
     FROM jsonb_each(?1) v CROSS JOIN jobs j WHERE j.id = v.value";

async fn jobs_now<'a>(
    conn: &mut SqliteConnection,
    ids: impl Iterator<Item = &'a str>,
) -> Result<HashMap<String, JobNow>, StoreError> {
    let ids = json("job ids", &ids.collect::<Vec<_>>())?;
    let rows = sqlx::query(JOBS_NOW_SQL).bind(ids).fetch_all(&mut *conn).await?;
    rows.iter().map(|r| Ok((r.col("id")?, (state_of(r)?, r.col("attempt")?, r.col("attached")?)))).collect()
}

/// A start as [`START_SQL`] reads it.
#[derive(Serialize)]
struct StartJson<'a> {
    job: &'a str,
    at: i64,
    attempt: u32,
    detail: String,
}

/// The `running` events of `?1`, in its order.
const START_SQL: &str = "INSERT INTO job_events (job_id, at_ms, state, attempt, detail) \
     SELECT x.value ->> 'job', x.value ->> 'at', 'running', x.value ->> 'attempt', x.value ->> 'detail' \
     FROM jsonb_each(?1) x ORDER BY x.key RETURNING seq";

/// A batch of starts in two round trips: the jobs as they are, the rule ([`start_allowed`]) for
/// each start in order (a second start of the same job sees the first), then the events of
/// those allowed. Each gets its event, or `None`.
async fn start_many_op(
    conn: &mut SqliteConnection,
    starts: Vec<(Dispatch, i64)>,
) -> Result<Vec<Option<Event>>, StoreError> {
    let mut now = jobs_now(&mut *conn, starts.iter().map(|(d, _)| d.job_id.as_str())).await?;
    let mut allowed = Vec::new();
    for (k, (d, _)) in starts.iter().enumerate() {
        if let Some(job) = now.get_mut(&d.job_id)
            && start_allowed(job.0, job.1, job.2, d)
        {
            allowed.push((k, job.0));
            *job = (JobState::Running, i64::from(d.attempt), job.2);
        }
    }
    let mut out = vec![None; starts.len()];
    if allowed.is_empty() {
        return Ok(out);
    }
    let rows: Vec<StartJson> = allowed
        .iter()
        .map(|(k, _)| {
            let (d, at) = &starts[*k];
            StartJson { job: &d.job_id, at: *at, attempt: d.attempt, detail: start_detail(d.attempt) }
        })
        .collect();
    let seqs = sorted_seqs(sqlx::query(START_SQL).bind(json("starts", &rows)?).fetch_all(&mut *conn).await?)?;
    if seqs.len() != allowed.len() {
        return Err(corrupt("event", format!("{} starts wrote {} events", allowed.len(), seqs.len())));
    }
    for ((k, from), seq) in allowed.into_iter().zip(seqs) {
        let (d, at) = &starts[k];
        out[k] = Some(start_event(seq, d, Some(from), *at));
    }
    Ok(out)
}

/// The `seq` of each row, smallest first: the order the rows were inserted in.
fn sorted_seqs(rows: Vec<SqliteRow>) -> Result<Vec<i64>, StoreError> {
    let mut seqs = rows.iter().map(|r| r.col("seq")).collect::<Result<Vec<i64>, _>>()?;
    seqs.sort_unstable();
    Ok(seqs)
}

/// A result as [`END_SQL`] reads it.
#[derive(Serialize)]
struct EndJson<'a> {
    job: &'a str,
    attempt: u32,
    tier: &'static str,
    client: &'a str,
    key: &'a str,
    started: i64,
    now: i64,
    /// Its start's note, when its start is written with it.
    start_detail: Option<String>,
    /// It moves its job (the running attempt's first report, or a whole attempt that may start).
    ok: bool,
    to: &'static str,
    detail: &'static str,
    asset: Option<&'a str>,
    error: Option<&'a str>,
    retry_at: Option<i64>,
    f_state: Option<&'static str>,
    f_detail: &'a str,
}

/// An asset a result stored, as [`END_SQL`] reads it (`?2`). Apart from the results (`?1`):
/// its provenance (about a kilobyte, as JSON text inside JSON) is most of a result's bytes, and
/// each statement that walks `?1` parsed it again, and copied it with its result's element at
/// every field it read.
#[derive(Serialize)]
struct AssetJson<'a> {
    asset: &'a str,
    key: &'a str,
    bytes: i64,
    now: i64,
    provenance: Option<&'a str>,
    /// Where its PNG, when it is kept with its row, starts in `?3` (from 1, as `substr` counts),
    /// and its length: the batch's PNGs go as one blob beside the JSON, which would carry each
    /// as text (hex or base64) for SQLite to decode.
    png_at: Option<usize>,
    png_len: Option<usize>,
}

/// A batch of results, `?1` in its order: every asset (`?2`, recorded even when its job was
/// cancelled meanwhile, with the first provenance and the first PNG, in `?3`, that came for it);
/// for those that move their job, the start (when it is written with it) and the outcome, a
/// retry's outbox row, and the events of the jobs attached to it. Answers the events, each with
/// the leader it was written for (`NULL` for a leader's own). The asset insert's `WHERE true` is
/// there for SQLite's parser: an upsert whose rows come from a `SELECT` needs a `WHERE` before
/// its `ON CONFLICT`.
const END_SQL: &str = "INSERT INTO assets (hash, cache_key, bytes, created_ms, provenance, png) \
     SELECT a.value ->> 'asset', a.value ->> 'key', a.value ->> 'bytes', a.value ->> 'now', a.value ->> 'provenance', \
       CASE WHEN a.value ->> 'png_len' IS NOT NULL THEN substr(?3, a.value ->> 'png_at', a.value ->> 'png_len') END \
     FROM jsonb_each(?2) a WHERE true ORDER BY a.key \
     ON CONFLICT (hash) DO UPDATE SET provenance = coalesce(assets.provenance, excluded.provenance), \
       png = coalesce(assets.png, excluded.png) \
     WHERE assets.provenance IS NULL OR (assets.png IS NULL AND excluded.png IS NOT NULL); \
     INSERT INTO job_events (job_id, at_ms, state, attempt, detail, asset, error) \
     SELECT job, at, state, attempt, detail, asset, error FROM ( \
       SELECT x.key AS ord, 1 AS n, x.value ->> 'job' AS job, x.value ->> 'started' AS at, 'running' AS state, \
         x.value ->> 'attempt' AS attempt, x.value ->> 'start_detail' AS detail, NULL AS asset, NULL AS error \
       FROM jsonb_each(?1) x WHERE x.value ->> 'start_detail' IS NOT NULL \
       UNION ALL \
       SELECT x.key, 2, x.value ->> 'job', x.value ->> 'now', x.value ->> 'to', x.value ->> 'attempt', \
         x.value ->> 'detail', x.value ->> 'asset', x.value ->> 'error' \
       FROM jsonb_each(?1) x WHERE x.value ->> 'ok') \
     ORDER BY ord, n RETURNING seq, job_id, NULL AS leader, NULL AS created_ms; \
     INSERT INTO outbox (job_id, tier, client, attempt, not_before) \
     SELECT x.value ->> 'job', x.value ->> 'tier', x.value ->> 'client', x.value ->> 'attempt' + 1, \
       x.value ->> 'retry_at' \
     FROM jsonb_each(?1) x WHERE x.value ->> 'ok' AND x.value ->> 'retry_at' IS NOT NULL ORDER BY x.key; \
     INSERT INTO job_events (job_id, at_ms, state, attempt, detail, asset, error) \
     SELECT f.id, x.value ->> 'now', x.value ->> 'f_state', f.attempt, x.value ->> 'f_detail', x.value ->> 'asset', \
       x.value ->> 'error' \
     FROM jsonb_each(?1) x CROSS JOIN jobs f \
     WHERE x.value ->> 'ok' AND x.value ->> 'f_state' IS NOT NULL AND f.follows = x.value ->> 'job' \
       AND f.state = 'queued' \
     ORDER BY x.key, f.seq \
     RETURNING seq, job_id, (SELECT follows FROM jobs WHERE id = job_id) AS leader, \
       (SELECT created_ms FROM jobs WHERE id = job_id) AS created_ms";

/// What one of [`END_SQL`]'s own events is, in the order they are written.
enum Written {
    Start { k: usize, from: JobState },
    Outcome(usize),
}

/// A batch of results in two round trips: the jobs as they are, the rules for each result in
/// order (a start only where [`start_allowed`]; an outcome only for the attempt that is running
/// or starts with it, so a repeat in the same batch sees the first and changes nothing), then
/// everything they write in one ([`END_SQL`]).
async fn end_many_op(conn: &mut SqliteConnection, ends: Vec<Ending>) -> Result<Vec<Vec<Event>>, StoreError> {
    let mut now = jobs_now(&mut *conn, ends.iter().map(|e| e.r.d.job_id.as_str())).await?;
    let fins: Vec<Finish> = ends.iter().map(|e| Finish::new(&e.r.d, &e.r.outcome)).collect();
    let mut written = Vec::new();
    let mut items = Vec::with_capacity(ends.len());
    for (k, (e, f)) in ends.iter().zip(&fins).enumerate() {
        let d = &e.r.d;
        let attempt = i64::from(d.attempt);
        let (mut starts, mut ok) = (false, false);
        if let Some(job) = now.get_mut(&d.job_id) {
            starts = e.may_start && start_allowed(job.0, job.1, job.2, d);
            ok = starts || (job.0 == JobState::Running && job.1 == attempt);
            if starts {
                written.push(Written::Start { k, from: job.0 });
            }
            if ok {
                written.push(Written::Outcome(k));
                *job = (f.to, attempt, job.2);
            }
        }
        items.push(EndJson {
            job: &d.job_id,
            attempt: d.attempt,
            tier: d.tier.as_str(),
            client: &d.client,
            key: &d.cache_key,
            started: e.r.started_ms,
            now: e.r.now_ms,
            start_detail: starts.then(|| start_detail(d.attempt)),
            ok,
            to: f.to.as_str(),
            detail: f.detail,
            asset: f.asset,
            error: f.error,
            retry_at: f.retry_at,
            f_state: f.followers_to.map(JobState::as_str),
            f_detail: &f.followers_detail,
        });
    }
    let mut pngs = Vec::new();
    let assets: Vec<AssetJson> = ends
        .iter()
        .zip(&fins)
        .filter_map(|(e, f)| {
            let (asset, bytes) = (f.asset?, f.bytes?);
            let png_at = f.png.map(|png| {
                pngs.extend_from_slice(png);
                pngs.len() - png.len() + 1
            });
            Some(AssetJson {
                asset,
                key: &e.r.d.cache_key,
                bytes,
                now: e.r.now_ms,
                provenance: f.provenance,
                png_at,
                png_len: f.png.map(<[u8]>::len),
            })
        })
        .collect();
    let rows = sqlx::query(END_SQL)
        .bind(json("results", &items)?)
        .bind(json("assets", &assets)?)
        .bind(pngs)
        .fetch_all(&mut *conn)
        .await?;
    let mut out = vec![Vec::new(); ends.len()];
    let (own, attached): (Vec<SqliteRow>, Vec<SqliteRow>) =
        rows.into_iter().partition(|r| matches!(r.col::<Option<String>>("leader"), Ok(None)));
    let seqs = sorted_seqs(own)?;
    if seqs.len() != written.len() {
        return Err(corrupt("event", format!("{} results wrote {} events", written.len(), seqs.len())));
    }
    // A leader moves its attached jobs once (its outcome is final for them), so each leader
    // names one result of the batch.
    let mut leaders: HashMap<&str, usize> = HashMap::new();
    for (w, seq) in written.into_iter().zip(seqs) {
        match w {
            Written::Start { k, from } => {
                let r = &ends[k].r;
                out[k].push(start_event(seq, &r.d, Some(from), r.started_ms));
            }
            Written::Outcome(k) => {
                let r = &ends[k].r;
                out[k].push(fins[k].lead_event(&r.d, seq, r.now_ms));
                if fins[k].followers_to.is_some() {
                    leaders.insert(r.d.job_id.as_str(), k);
                }
            }
        }
    }
    for r in &attached {
        let leader: String = r.col("leader")?;
        let job_id: String = r.col("job_id")?;
        let k = *leaders
            .get(leader.as_str())
            .ok_or_else(|| corrupt("event", format!("job {job_id} follows {leader}, not in the batch")))?;
        out[k].push(fins[k].follower_event(
            &ends[k].r.d,
            r.col("seq")?,
            &job_id,
            r.col("created_ms")?,
            ends[k].r.now_ms,
        ));
    }
    for events in &mut out {
        events.sort_by_key(|e| e.seq);
    }
    let charges: Vec<Charge> = ends.iter().filter_map(|e| Charge::of(&e.r.d, &e.r.outcome, e.r.now_ms)).collect();
    if !charges.is_empty() {
        sqlx::query(CHARGE_SQL).bind(json("charges", &charges)?).execute(&mut *conn).await?;
    }
    Ok(out)
}

/// Each success of a batch that its job's row now shows, charged once (`render_costs`). A
/// `CROSS JOIN`, so SQLite walks the batch and finds each job by id: with a plain join it chose
/// to walk every succeeded job by the state index instead (1.4 s a batch at 100,000 jobs).
const CHARGE_SQL: &str = "INSERT INTO render_costs (job_id, client, tier, width, height, samples, device_ms, cost_ms, at_ms) \
     SELECT j.id, j.client, j.tier, x.value ->> 'w', x.value ->> 'h', x.value ->> 's', x.value ->> 'device', \
       x.value ->> 'cost', x.value ->> 'now' \
     FROM jsonb_each(?1) x CROSS JOIN jobs j \
     WHERE j.id = x.value ->> 'job' AND j.state = 'succeeded' AND j.attempt = x.value ->> 'attempt' \
     ON CONFLICT (job_id) DO NOTHING";

super::shared::shared_ops!(SqliteConnection);
super::shared::store_impl!(SqliteStore, SqliteConnection);
super::fleet::fleet_impl!(SqliteStore, SqliteConnection);
super::orders::orders_impl!(SqliteStore, SqliteConnection);
super::costs::costs_impl!(SqliteStore);

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
    async fn every_batch_statement_finds_its_rows_by_key_not_by_scanning_a_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        drop(SqliteStore::open(&path).await.unwrap());
        // Without the foreign-key checks' plans: a new job's insert shows how SQLite would look
        // for orphans that name its id, which it skips at run time unless a statement left some.
        let mut conn = options(&path).foreign_keys(false).connect().await.unwrap();
        let pending = plans(&mut conn, PENDING_SQL).await;
        assert!(pending.iter().any(|p| p == "SCAN o USING INDEX outbox_unsent_id"), "{pending:?}");
        // Each statement walks its batch (jsonb_each, or rows made from it) and finds each job,
        // outbox row and asset by key: a `SCAN` of a table would visit every job ever queued.
        let walked = |p: &String| {
            !p.starts_with("SCAN ")
                || p.contains("VIRTUAL TABLE")
                || p.contains("USING INDEX")
                || p.starts_with("SCAN (")
                || p == "SCAN s"
        };
        for sql in [KEYS_SQL, TAKEN_SQL, INSERT_JOBS_SQL, MARK_SENT_SQL, JOBS_NOW_SQL, START_SQL, END_SQL, CHARGE_SQL] {
            let plan = plans(&mut conn, sql).await;
            assert!(plan.iter().all(walked), "{sql}\n{plan:?}");
        }
        let marked = plans(&mut conn, MARK_SENT_SQL).await;
        assert!(marked.iter().any(|p| p.starts_with("SEARCH j USING INDEX")), "{marked:?}");
        // Not by the state index: that walks every succeeded job.
        let charged = plans(&mut conn, CHARGE_SQL).await;
        assert!(charged.iter().any(|p| p.starts_with("SEARCH j USING INDEX sqlite_autoindex_jobs")), "{charged:?}");
        let ended = plans(&mut conn, END_SQL).await;
        assert!(ended.iter().any(|p| p == "SEARCH f USING INDEX jobs_follows (follows=?)"), "{ended:?}");
    }

    #[tokio::test]
    async fn the_log_flushed_between_checkpoints_is_the_one_sqlite_writes_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        let store = SqliteStore::open(&path).await.unwrap();
        let commits = store.writer.commits();
        let before = *commits.borrow();
        let row = TokenRow {
            token_hash: "ab".repeat(32),
            name: "ops".into(),
            role: crate::auth::Role::Operator,
            devices: vec![],
            created_ms: 1,
            expires_ms: None,
            budget: None,
        };
        store.add_token(row, 1).await.unwrap();
        // The flusher wakes on this count and opens the log by name: a wrong name would find
        // no file and, taking that for a log not made yet, flush nothing.
        assert!(*commits.borrow() > before, "a committed write moves the count the flusher waits on");
        let wal = std::fs::metadata(wal_path(&path)).unwrap();
        assert!(wal.len() > 0, "SQLite's log for {} is {}", path.display(), wal_path(&path).display());
    }
}
