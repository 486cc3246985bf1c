//! The PostgreSQL store (distributed mode): the same schema, rules and group-commit writer as
//! the SQLite store ([`super::writer`]), so a burst of submits, dispatches and results from many
//! workers costs one commit (one WAL flush) per batch, not one per job. Reads go through a pool.
//!
//! The database URL is an ordinary `postgres://` URL; a schema other than `public` is chosen
//! with the URL's `options=-csearch_path%3D<schema>` (the tests run each in its own schema).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection};

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
use kiln_protocol::{JobState, Tier};

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PgStore {
    writer: Writer<PgConnection>,
    read: PgPool,
    submits: Gather<NewJob, Submitted>,
    results: Gather<Recorded, Vec<Event>>,
}

impl WriteConn for PgConnection {
    const BEGIN: &'static str = "BEGIN";
    fn exec<'c>(&'c mut self, sql: &'static str) -> BoxFut<'c, Result<(), sqlx::Error>> {
        Box::pin(async move { sqlx::query(sql).execute(self).await.map(|_| ()) })
    }
    fn exec_many<'c>(&'c mut self, sql: &'static str) -> BoxFut<'c, Result<(), sqlx::Error>> {
        Box::pin(async move { sqlx::raw_sql(sql).execute(self).await.map(|_| ()) })
    }
}

impl PgStore {
    /// Connects to the database at `url` and brings its schema up to date.
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        let opts = PgConnectOptions::from_str(url)?;
        // The writer's session plans without sequential scans where an index will do: its
        // statements all look rows up by keys with an index. A generic plan (cached after a
        // statement's fifth run) keeps the estimates of its moment; made while the tables were
        // nearly empty (a fresh farm under its first burst), it scanned where it should probe until
        // the next `ANALYZE` (see `docs/benchmarks.md`). Planning every run instead
        // (`plan_cache_mode`) cost more than it saved.
        let writer_opts = opts.clone().options([("enable_seqscan", "off")]);
        let mut conn = writer_opts.connect().await?;
        sqlx::migrate!("./migrations/postgres").run(&mut conn).await?;
        let read = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts.clone())
            .await?;
        let connect: Connect<PgConnection> = Box::new(move || {
            let opts = writer_opts.clone();
            Box::pin(async move { Ok(opts.connect().await?) })
        });
        let writer = Writer::spawn(conn, connect);
        let submits = Gather::spawn(writer.clone(), |c, jobs| Box::pin(submit_many_op(c, jobs)));
        let results = Gather::spawn(writer.clone(), |c, results| Box::pin(record_many_op(c, results)));
        Ok(PgStore { writer, read, submits, results })
    }

    async fn write<T: Send + 'static>(&self, f: OpFn<PgConnection, T>) -> Result<T, StoreError> {
        self.writer.write(f).await
    }

    /// Submits `jobs` as one batch (tests: a batch the gathering would make only by chance).
    #[cfg(test)]
    pub(super) async fn submit_batch(&self, jobs: Vec<NewJob>) -> Result<Vec<Submitted>, StoreError> {
        self.write(Box::new(move |c| Box::pin(submit_many_op(c, jobs)))).await
    }

    /// Records `results` as one batch (tests).
    #[cfg(test)]
    pub(super) async fn record_batch(&self, results: Vec<Recorded>) -> Result<Vec<Vec<Event>>, StoreError> {
        self.write(Box::new(move |c| Box::pin(record_many_op(c, results)))).await
    }

    /// Gathered with the submits that arrive meanwhile: a few statements per batch.
    async fn submit_one(&self, job: NewJob) -> Result<Submitted, StoreError> {
        self.submits.call(job).await
    }

    /// Gathered with the results that arrive meanwhile: one statement per batch.
    async fn record_one(&self, r: Recorded) -> Result<Vec<Event>, StoreError> {
        self.results.call(r).await
    }

    async fn start_one(&self, d: Dispatch, now_ms: i64) -> Result<Option<Event>, StoreError> {
        self.write(Box::new(move |c| Box::pin(async move { start_op(c, &d, now_ms).await }))).await
    }

    async fn finish_one(&self, d: Dispatch, outcome: Outcome, now_ms: i64) -> Result<Vec<Event>, StoreError> {
        self.write(Box::new(move |c| Box::pin(async move { finish_op(c, &d, outcome, now_ms).await }))).await
    }
}

/// A batch of submits in two round trips, whatever its size (three when some carry an
/// idempotency key): one statement reads, for every cache key in the batch, its asset and its
/// live leader (another the jobs the idempotency keys name); the rules run in
/// [`admit::decide`]; one statement then writes every new job, its first event and its outbox
/// row. The projection trigger runs at the end of that statement and sees the new jobs.
async fn submit_many_op(conn: &mut PgConnection, jobs: Vec<NewJob>) -> Result<Vec<Submitted>, StoreError> {
    // Per key, an index probe each (see `mark_sent_op`).
    let rows = sqlx::query(
        "SELECT k.key, (SELECT hash FROM assets WHERE cache_key = k.key LIMIT 1) AS asset, \
           (SELECT id FROM jobs WHERE cache_key = k.key AND follows IS NULL \
              AND state IN ('queued', 'dispatched', 'running') ORDER BY seq LIMIT 1) AS leader \
         FROM unnest($1::TEXT[]) AS k (key)",
    )
    .bind(admit::cache_keys(&jobs))
    .fetch_all(&mut *conn)
    .await?;
    let known = admit::key_states(&rows)?;
    let (clients, idems): (Vec<String>, Vec<String>) = admit::idempotency_keys(&jobs).into_iter().unzip();
    let mut taken = HashMap::new();
    if !idems.is_empty() {
        let rows = sqlx::query(
            "SELECT j.* FROM unnest($1::TEXT[], $2::TEXT[]) AS i (client, key) \
             JOIN jobs j ON j.client = i.client AND j.idempotency_key = i.key",
        )
        .bind(&clients)
        .bind(&idems)
        .fetch_all(&mut *conn)
        .await?;
        taken = admit::taken_keys(&rows)?;
    }
    let admits = admit::decide(&jobs, known, &taken)?;
    let seqs = insert_new_jobs(conn, &admit::new_rows(&jobs, &admits)?).await?;
    admit::answer(jobs, admits, &seqs)
}

/// Writes the batch's new jobs with their first events and, for those that lead a render,
/// their outbox rows, in one statement; answers each event's `seq`.
async fn insert_new_jobs(
    conn: &mut PgConnection,
    new: &[admit::NewRow<'_>],
) -> Result<HashMap<String, i64>, StoreError> {
    if new.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query(
        "WITH x AS (SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], \
             $7::TEXT[], $8::BIGINT[], $9::TEXT[], $10::TEXT[], $11::TEXT[], $12::BOOLEAN[]) WITH ORDINALITY \
           AS x (id, tier, request, cache_key, client, idempotency_key, follows, now_ms, state, detail, asset, leads, ord)), \
         j AS (INSERT INTO jobs (id, state, tier, request, cache_key, client, idempotency_key, follows, attempt, \
                 created_ms, updated_ms, asset, finished_ms) \
               SELECT id, state, tier, request, cache_key, client, idempotency_key, follows, 0, now_ms, now_ms, asset, \
                 CASE WHEN state IN ('succeeded', 'failed', 'cancelled', 'cached') THEN now_ms END \
               FROM x ORDER BY ord), \
         e AS (INSERT INTO job_events (job_id, at_ms, state, attempt, detail, asset) \
               SELECT id, now_ms, state, 0, detail, asset FROM x ORDER BY ord RETURNING seq, job_id), \
         o AS (INSERT INTO outbox (job_id, tier, client, attempt, not_before) \
               SELECT id, tier, client, 1, now_ms FROM x WHERE leads ORDER BY ord) \
         SELECT seq, job_id FROM e",
    )
    .bind(new.iter().map(|n| n.job.id.as_str()).collect::<Vec<_>>())
    .bind(new.iter().map(|n| n.job.request.tier.as_str()).collect::<Vec<_>>())
    .bind(new.iter().map(|n| n.request.as_str()).collect::<Vec<_>>())
    .bind(new.iter().map(|n| n.job.cache_key.as_str()).collect::<Vec<_>>())
    .bind(new.iter().map(|n| n.job.client.as_str()).collect::<Vec<_>>())
    .bind(new.iter().map(|n| n.job.idempotency_key.as_deref()).collect::<Vec<_>>())
    .bind(new.iter().map(|n| n.follows).collect::<Vec<_>>())
    .bind(new.iter().map(|n| n.job.now_ms).collect::<Vec<_>>())
    .bind(new.iter().map(|n| n.state.as_str()).collect::<Vec<_>>())
    .bind(new.iter().map(|n| n.detail.as_str()).collect::<Vec<_>>())
    .bind(new.iter().map(|n| n.asset).collect::<Vec<_>>())
    .bind(new.iter().map(|n| n.leads).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(|r| Ok((r.col("job_id")?, r.col("seq")?))).collect()
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

async fn start_op(conn: &mut PgConnection, d: &Dispatch, now_ms: i64) -> Result<Option<Event>, StoreError> {
    let row = sqlx::query("SELECT state, attempt, follows FROM jobs WHERE id = $1")
        .bind(&d.job_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let (from, attempt, follows): (JobState, i64, Option<String>) =
        (state_of(&row)?, row.col("attempt")?, row.col("follows")?);
    if !start_allowed(from, attempt, follows.is_some(), d) {
        return Ok(None);
    }
    let detail = start_detail(d.attempt);
    let change = Change { attempt: Some(d.attempt), detail: &detail, ..Change::default() };
    let seq = append_event(conn, &d.job_id, JobState::Running, d.attempt, &change, now_ms).await?;
    Ok(Some(start_event(seq, d, Some(from), now_ms)))
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
            "INSERT INTO assets (hash, cache_key, bytes, created_ms, provenance, png) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (hash) DO UPDATE SET provenance = COALESCE(assets.provenance, EXCLUDED.provenance), \
               png = COALESCE(assets.png, EXCLUDED.png) \
             WHERE assets.provenance IS NULL OR (assets.png IS NULL AND EXCLUDED.png IS NOT NULL)",
        )
        .bind(asset)
        .bind(&d.cache_key)
        .bind(bytes)
        .bind(now_ms)
        .bind(f.provenance)
        .bind(f.png)
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
    charge(conn, Charge::of(d, &outcome, now_ms).into_iter().collect()).await?;
    Ok(events)
}

/// Charges each success that its job's row now shows, once (`render_costs`).
async fn charge(conn: &mut PgConnection, charges: Vec<Charge<'_>>) -> Result<(), StoreError> {
    if charges.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&Charge) -> i64| charges.iter().map(f).collect::<Vec<i64>>();
    sqlx::query(
        "INSERT INTO render_costs (job_id, client, tier, width, height, samples, device_ms, cost_ms, at_ms) \
         SELECT j.id, j.client, j.tier, x.w, x.h, x.s, x.device, x.cost, x.now \
         FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[], $6::BIGINT[], $7::BIGINT[], \
           $8::BIGINT[]) AS x (job, attempt, w, h, s, device, cost, now) \
         JOIN jobs j ON j.id = x.job WHERE j.state = 'succeeded' AND j.attempt = x.attempt \
         ON CONFLICT (job_id) DO NOTHING",
    )
    .bind(charges.iter().map(|c| c.job).collect::<Vec<&str>>())
    .bind(col(|c| c.attempt))
    .bind(col(|c| c.w))
    .bind(col(|c| c.h))
    .bind(col(|c| c.s))
    .bind(col(|c| c.device))
    .bind(col(|c| c.cost))
    .bind(col(|c| c.now))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A batch of workers' results. Each result is its whole attempt (the start unless recorded
/// already, the asset, the outcome, a retry's outbox row, the attached jobs), under the same
/// rules as `start_op` and `finish_op`: the job must lead its render and wait for exactly this
/// attempt (or be running it). Results for distinct jobs are written by one statement per
/// round; a second result for the same job (a redelivery) waits for the next round, so it
/// sees the first, as it would one at a time.
async fn record_many_op(conn: &mut PgConnection, results: Vec<Recorded>) -> Result<Vec<Vec<Event>>, StoreError> {
    let mut out = vec![Vec::new(); results.len()];
    let mut left: Vec<usize> = (0..results.len()).collect();
    while !left.is_empty() {
        let mut jobs = HashSet::new();
        let (round, later): (Vec<usize>, Vec<usize>) =
            left.into_iter().partition(|&i| jobs.insert(&results[i].d.job_id));
        record_round(conn, &results, &round, &mut out).await?;
        left = later;
    }
    charge(conn, results.iter().filter_map(|r| Charge::of(&r.d, &r.outcome, r.now_ms)).collect()).await?;
    Ok(out)
}

/// One round of [`record_many_op`]: the results `round` names, each for a job of its own. The
/// events are inserted in order (start before outcome), and the projection trigger applies them
/// in that order at the end of the statement.
async fn record_round(
    conn: &mut PgConnection,
    results: &[Recorded],
    round: &[usize],
    out: &mut [Vec<Event>],
) -> Result<(), StoreError> {
    let fins: Vec<Finish> = round.iter().map(|&i| Finish::new(&results[i].d, &results[i].outcome)).collect();
    let rs: Vec<&Recorded> = round.iter().map(|&i| &results[i]).collect();
    let starts: Vec<String> = rs.iter().map(|r| start_detail(r.d.attempt)).collect();
    let rows = sqlx::query(
        "WITH x AS (SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::TEXT[], $6::TEXT[], \
             $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::BIGINT[], $11::TEXT[], $12::BIGINT[], $13::TEXT[], $14::TEXT[], \
             $15::TEXT[], $16::TEXT[], $17::TEXT[], $18::BYTEA[]) WITH ORDINALITY \
           AS x (job_id, attempt, started_ms, now_ms, start_detail, to_state, detail, asset, error, bytes, cache_key, \
             retry_at, tier, client, followers_to, followers_detail, provenance, png, ord)), \
         ok AS (SELECT x.*, j.state AS from_state, \
                  (j.state IN ('queued', 'dispatched') AND j.follows IS NULL AND j.attempt + 1 = x.attempt) AS starts \
                FROM x CROSS JOIN LATERAL (SELECT state, attempt, follows FROM jobs WHERE id = x.job_id OFFSET 0) j \
                WHERE (j.state IN ('queued', 'dispatched') AND j.follows IS NULL AND j.attempt + 1 = x.attempt) \
                  OR (j.state = 'running' AND j.attempt = x.attempt)), \
         a AS (INSERT INTO assets (hash, cache_key, bytes, created_ms, provenance, png) \
               SELECT DISTINCT ON (asset) asset, cache_key, bytes, now_ms, provenance, png FROM x \
               WHERE asset IS NOT NULL AND bytes IS NOT NULL ORDER BY asset, provenance IS NULL, png IS NULL, ord \
               ON CONFLICT (hash) DO UPDATE SET provenance = COALESCE(assets.provenance, EXCLUDED.provenance), \
                 png = COALESCE(assets.png, EXCLUDED.png) \
               WHERE assets.provenance IS NULL OR (assets.png IS NULL AND EXCLUDED.png IS NOT NULL)), \
         ev AS (INSERT INTO job_events (job_id, at_ms, state, attempt, detail, asset, error) \
                SELECT ok.job_id, s.at_ms, s.state, ok.attempt, s.detail, s.asset, s.error FROM ok CROSS JOIN LATERAL \
                  (VALUES (1, ok.started_ms, 'running', ok.start_detail, CAST(NULL AS TEXT), CAST(NULL AS TEXT)), \
                          (2, ok.now_ms, ok.to_state, ok.detail, ok.asset, ok.error)) \
                    AS s (n, at_ms, state, detail, asset, error) \
                WHERE s.n = 2 OR ok.starts ORDER BY ok.ord, s.n RETURNING seq, job_id, state), \
         o AS (INSERT INTO outbox (job_id, tier, client, attempt, not_before) \
               SELECT job_id, tier, client, attempt + 1, retry_at FROM ok WHERE retry_at IS NOT NULL ORDER BY ord), \
         fl AS (INSERT INTO job_events (job_id, at_ms, state, attempt, detail, asset, error) \
                SELECT f.id, ok.now_ms, ok.followers_to, f.attempt, ok.followers_detail, ok.asset, ok.error FROM ok \
                CROSS JOIN LATERAL (SELECT id, attempt, seq FROM jobs WHERE follows = ok.job_id AND state = 'queued' \
                  OFFSET 0) f \
                WHERE ok.followers_to IS NOT NULL ORDER BY ok.ord, f.seq RETURNING seq, job_id) \
         SELECT ev.seq, ev.job_id, ev.state, CAST(NULL AS TEXT) AS leader, CAST(NULL AS BIGINT) AS created_ms, \
           ok.from_state FROM ev JOIN ok ON ok.job_id = ev.job_id \
         UNION ALL SELECT fl.seq, fl.job_id, NULL, jf.follows, jf.created_ms, NULL FROM fl JOIN jobs jf ON jf.id = fl.job_id",
    )
    .bind(rs.iter().map(|r| r.d.job_id.as_str()).collect::<Vec<_>>())
    .bind(rs.iter().map(|r| i64::from(r.d.attempt)).collect::<Vec<_>>())
    .bind(rs.iter().map(|r| r.started_ms).collect::<Vec<_>>())
    .bind(rs.iter().map(|r| r.now_ms).collect::<Vec<_>>())
    .bind(&starts)
    .bind(fins.iter().map(|f| f.to.as_str()).collect::<Vec<_>>())
    .bind(fins.iter().map(|f| f.detail).collect::<Vec<_>>())
    .bind(fins.iter().map(|f| f.asset).collect::<Vec<_>>())
    .bind(fins.iter().map(|f| f.error).collect::<Vec<_>>())
    .bind(fins.iter().map(|f| f.bytes).collect::<Vec<_>>())
    .bind(rs.iter().map(|r| r.d.cache_key.as_str()).collect::<Vec<_>>())
    .bind(fins.iter().map(|f| f.retry_at).collect::<Vec<_>>())
    .bind(rs.iter().map(|r| r.d.tier.as_str()).collect::<Vec<_>>())
    .bind(rs.iter().map(|r| r.d.client.as_str()).collect::<Vec<_>>())
    .bind(fins.iter().map(|f| f.followers_to.map(JobState::as_str)).collect::<Vec<_>>())
    .bind(fins.iter().map(|f| f.followers_detail.as_str()).collect::<Vec<_>>())
    .bind(fins.iter().map(|f| f.provenance).collect::<Vec<_>>())
    .bind(fins.iter().map(|f| f.png).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    let index: HashMap<&str, usize> = rs.iter().enumerate().map(|(k, r)| (r.d.job_id.as_str(), k)).collect();
    let at =
        |id: &str| index.get(id).copied().ok_or_else(|| corrupt("event", format!("job {id} was not in the batch")));
    for r in &rows {
        let seq: i64 = r.col("seq")?;
        let job_id: String = r.col("job_id")?;
        let (k, event) = match r.col::<Option<String>>("leader")? {
            Some(leader) => {
                let k = at(&leader)?;
                (k, fins[k].follower_event(&rs[k].d, seq, &job_id, r.col("created_ms")?, rs[k].now_ms))
            }
            None if r.col::<Option<String>>("state")?.as_deref() == Some("running") => {
                let k = at(&job_id)?;
                let from: Option<String> = r.col("from_state")?;
                let from = from.map(|s| s.parse::<JobState>()).transpose().map_err(|e| corrupt("job state", e))?;
                (k, start_event(seq, &rs[k].d, from, rs[k].started_ms))
            }
            None => {
                let k = at(&job_id)?;
                (k, fins[k].lead_event(&rs[k].d, seq, rs[k].now_ms))
            }
        };
        out[round[k]].push(event);
    }
    // The statement returns the leads' events before the followers'; keep the log's order.
    for &i in round {
        out[i].sort_by_key(|e| e.seq);
    }
    Ok(())
}

super::shared::shared_ops!(PgConnection);
super::shared::store_impl!(PgStore, PgConnection);
super::fleet::fleet_impl!(PgStore, PgConnection);
super::orders::orders_impl!(PgStore, PgConnection);
super::costs::costs_impl!(PgStore);
