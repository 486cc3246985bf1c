//! Group commit, shared by both stores: one writer task owns the database's write connection.
//! It takes whatever operations are waiting (up to [`MAX_BATCH`]), runs them in one
//! transaction, commits once, and only then answers their callers: a caller never hears "done"
//! for a write that is not durable, and a burst of submits, dispatches and results costs one
//! commit instead of hundreds. Each operation of a batch of several runs under a savepoint: one
//! that fails is rolled back to it alone, its caller gets its own error, and the rest of the batch
//! commits, so no half-done operation is ever committed and one bad write (a value the database
//! refuses) costs nobody else theirs. A gathered batch ([`Gather`]) the database refuses is
//! written again one call at a time, so only the bad call fails. Being the only writer also makes
//! the submit's cache and single-flight checks race-free.
//!
//! When the connection breaks (the database restarted), the batch's callers get an error and the
//! writer connects again, with backoff, before the next batch.

use std::time::Duration;

use sqlx::Connection;
use tokio::sync::{mpsc, oneshot, watch};

use super::{BoxFut, StoreError};

/// Most operations one transaction takes.
pub const MAX_BATCH: usize = 512;

/// How often a busy writer runs [`WriteConn::UPKEEP`], and how long it waits, idle after a
/// write, before it runs it once more. Every caller waits while it runs (SQLite's checkpoint
/// waits for two flushes to disk), so more often costs a busy farm jobs (see `docs/benchmarks.md`).
pub const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// A write: runs on the writer's connection inside the batch's transaction.
pub type OpFn<C, T> = Box<dyn for<'c> FnOnce(&'c mut C) -> BoxFut<'c, Result<T, StoreError>> + Send>;

/// Makes the writer's connection (again, after it broke).
pub type Connect<C> = Box<dyn Fn() -> BoxFut<'static, Result<C, StoreError>> + Send + Sync>;

/// A connection the writer can run transactions on.
pub trait WriteConn: Connection + Send + 'static {
    /// How a batch's transaction starts.
    const BEGIN: &'static str;
    /// Upkeep the writer runs between batches, once their callers have their answers: at most
    /// every [`UPKEEP_EVERY`] while it is busy, and once when it has been idle that long after
    /// a write (SQLite: a checkpoint).
    const UPKEEP: Option<&'static str> = None;
    /// Runs one statement that returns nothing.
    fn exec<'c>(&'c mut self, sql: &'static str) -> BoxFut<'c, Result<(), sqlx::Error>>;
    /// Runs statements separated by `;` in one round trip (no parameters).
    fn exec_many<'c>(&'c mut self, sql: &'static str) -> BoxFut<'c, Result<(), sqlx::Error>>;
}

/// One queued write: runs inside the batch's transaction, answers after the commit.
trait WriteOp<C>: Send {
    /// Runs the write; `false` when it failed and the batch must be rolled back.
    fn run<'c>(&'c mut self, conn: &'c mut C) -> BoxFut<'c, bool>;
    /// Answers the caller: its own result if the commit held, else the commit's error.
    fn finish(self: Box<Self>, commit: Result<(), String>);
}

struct Op<C, T> {
    f: Option<OpFn<C, T>>,
    out: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<C: Send + 'static, T: Send + 'static> WriteOp<C> for Op<C, T> {
    fn run<'c>(&'c mut self, conn: &'c mut C) -> BoxFut<'c, bool> {
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
            (Err(e), Some(Ok(_)) | None) => Err(StoreError::RolledBack(e)),
            (Ok(()), None) => Err(StoreError::Closed),
        };
        let _ = self.reply.send(out);
    }
}

/// Seconds the store's group-commit writer spent writing: a rate near 1 is a writer saturated.
pub const STORE_WRITER_BUSY_SECONDS: &str = "kiln_store_writer_busy_seconds_total";
/// Writes the store's writer ran.
pub const STORE_WRITES: &str = "kiln_store_writes_total";
/// Transactions the store's writer committed.
pub const STORE_COMMITS: &str = "kiln_store_commits_total";
/// Writes waiting for the store's writer when its latest batch began.
pub const STORE_WRITES_WAITING: &str = "kiln_store_writes_waiting";

/// What the writer has done since it started, for the metrics: how long it spent writing (a
/// writer busy nearly all the time is the farm's bound), the writes and transactions, and how
/// many writes wait for it now.
#[derive(Clone)]
pub struct WriterMetrics {
    /// Seconds spent running batches.
    pub busy: prometheus::Counter,
    /// Writes run.
    pub writes: prometheus::IntCounter,
    /// Transactions committed.
    pub commits: prometheus::IntCounter,
    /// Writes queued for the next batch when the last one began.
    pub waiting: prometheus::IntGauge,
}

impl WriterMetrics {
    fn new() -> WriterMetrics {
        WriterMetrics {
            busy: prometheus::Counter::new(STORE_WRITER_BUSY_SECONDS, "Seconds the store's writer spent writing")
                .expect("valid metric"),
            writes: prometheus::IntCounter::new(STORE_WRITES, "Writes the store's writer ran").expect("valid metric"),
            commits: prometheus::IntCounter::new(STORE_COMMITS, "Transactions the store's writer committed")
                .expect("valid metric"),
            waiting: prometheus::IntGauge::new(STORE_WRITES_WAITING, "Writes waiting for the store's writer")
                .expect("valid metric"),
        }
    }

    /// Every metric, to register.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.busy.clone()),
            Box::new(self.writes.clone()),
            Box::new(self.commits.clone()),
            Box::new(self.waiting.clone()),
        ]
    }
}

/// The handle callers send writes through; cheap to clone.
pub struct Writer<C> {
    tx: mpsc::Sender<Box<dyn WriteOp<C>>>,
    commits: watch::Receiver<u64>,
    metrics: WriterMetrics,
}

impl<C> Clone for Writer<C> {
    fn clone(&self) -> Self {
        Writer { tx: self.tx.clone(), commits: self.commits.clone(), metrics: self.metrics.clone() }
    }
}

impl<C: WriteConn> Writer<C> {
    /// Starts the writer task on `conn`; `connect` makes a new connection when it breaks.
    pub fn spawn(conn: C, connect: Connect<C>) -> Writer<C> {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let (committed, commits) = watch::channel(0);
        let metrics = WriterMetrics::new();
        tokio::spawn(run(conn, connect, rx, committed, metrics.clone()));
        Writer { tx, commits, metrics }
    }

    /// The writer's metrics.
    pub fn metrics(&self) -> &WriterMetrics {
        &self.metrics
    }

    /// How many transactions have committed: changes after each, and ends (`changed` fails)
    /// once the writer has stopped.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.commits.clone()
    }

    /// Runs `f` in the next batch; answers once its transaction has committed (or failed).
    pub async fn write<T: Send + 'static>(&self, f: OpFn<C, T>) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let op: Box<dyn WriteOp<C>> = Box::new(Op { f: Some(f), out: None, reply });
        self.tx.send(op).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// A set-based write: runs a whole gathered batch of calls of one kind (in the order they came)
/// on the writer's connection and answers each, in the same order.
pub type BatchFn<C, I, O> = for<'c> fn(&'c mut C, Vec<I>) -> BoxFut<'c, Result<Vec<O>, StoreError>>;

/// Calls of one kind, gathered while the writer is busy and handed to it as one operation: a
/// batch of submits (or results) becomes a few set-based statements instead of a round trip
/// each. One batch is with the writer at a time; the next gathers meanwhile. The batch is one
/// operation of the writer's transaction, so it commits, or fails, with the rest.
pub struct Gather<I, O> {
    tx: mpsc::Sender<(I, oneshot::Sender<Result<O, StoreError>>)>,
}

impl<I, O> Clone for Gather<I, O> {
    fn clone(&self) -> Self {
        Gather { tx: self.tx.clone() }
    }
}

impl<I: Clone + Send + 'static, O: Send + 'static> Gather<I, O> {
    /// Starts gathering for `writer`; `f` writes a batch. It stops when every handle is dropped.
    /// A batch the database refuses (an error of the database's own, not of the connection) is
    /// written again one call at a time, so the one that is bad fails alone.
    pub fn spawn<C: WriteConn>(writer: Writer<C>, f: BatchFn<C, I, O>) -> Gather<I, O> {
        let (tx, mut rx) = mpsc::channel::<(I, oneshot::Sender<Result<O, StoreError>>)>(4 * MAX_BATCH);
        tokio::spawn(async move {
            let mut got = Vec::with_capacity(MAX_BATCH);
            while rx.recv_many(&mut got, MAX_BATCH).await > 0 {
                let (items, replies): (Vec<I>, Vec<_>) = got.drain(..).unzip();
                let n = items.len();
                // Kept only to write them again one at a time, should the batch be refused.
                let again = (n > 1).then(|| items.clone());
                match writer.write(Box::new(move |c| f(c, items))).await {
                    Ok(outs) if outs.len() == n => {
                        for (reply, out) in replies.into_iter().zip(outs) {
                            let _ = reply.send(Ok(out));
                        }
                    }
                    Err(e) if refused_by_database(&e) && again.is_some() => {
                        tracing::warn!(error = %e, calls = n, "store: a gathered batch was refused; writing its calls one at a time");
                        let items = again.unwrap_or_default();
                        let alone = items.into_iter().map(|item| writer.write(Box::new(move |c| f(c, vec![item]))));
                        let answers = futures_util::future::join_all(alone).await;
                        for (reply, answer) in replies.into_iter().zip(answers) {
                            let _ = reply.send(answer.and_then(|mut outs| outs.pop().ok_or(StoreError::Closed)));
                        }
                    }
                    answer => {
                        let why = match answer {
                            Ok(outs) => format!("a batch of {n} writes answered {} of them", outs.len()),
                            Err(StoreError::RolledBack(why)) => why,
                            Err(e) if n == 1 => {
                                if let Some(reply) = replies.into_iter().next() {
                                    let _ = reply.send(Err(e));
                                }
                                continue;
                            }
                            Err(e) => e.to_string(),
                        };
                        for reply in replies {
                            let _ = reply.send(Err(StoreError::RolledBack(why.clone())));
                        }
                    }
                }
            }
        });
        Gather { tx }
    }

    /// Writes `item` with the next batch; answers once that batch has committed (or failed).
    pub async fn call(&self, item: I) -> Result<O, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((item, reply)).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

async fn run<C: WriteConn>(
    conn: C,
    connect: Connect<C>,
    mut rx: mpsc::Receiver<Box<dyn WriteOp<C>>>,
    committed: watch::Sender<u64>,
    metrics: WriterMetrics,
) {
    let mut conn = Some(conn);
    let mut batch: Vec<Box<dyn WriteOp<C>>> = Vec::with_capacity(MAX_BATCH);
    let (mut busy, mut ops, mut batches, started) = (0f64, 0usize, 0usize, std::time::Instant::now());
    let mut backoff = Duration::from_millis(100);
    // Upkeep is owed after a committed write (and only where the connection has some).
    let (mut last_upkeep, mut owed) = (started, false);
    loop {
        let received = if owed {
            // `recv_many` is cancel-safe: a timeout loses nothing.
            match tokio::time::timeout(UPKEEP_EVERY, rx.recv_many(&mut batch, MAX_BATCH)).await {
                Ok(n) => n,
                Err(_) => {
                    upkeep(conn.as_mut()).await;
                    (last_upkeep, owed) = (std::time::Instant::now(), false);
                    continue;
                }
            }
        } else {
            rx.recv_many(&mut batch, MAX_BATCH).await
        };
        if received == 0 {
            break;
        }
        let t = std::time::Instant::now();
        metrics.waiting.set(rx.len() as i64);
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match connect().await {
                Ok(c) => {
                    tracing::info!("store: the writer is connected again");
                    backoff = Duration::from_millis(100);
                    conn.insert(c)
                }
                Err(e) => {
                    let message = format!("the database is unreachable: {e}");
                    tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "store: cannot connect");
                    for op in batch.drain(..) {
                        op.finish(Err(message.clone()));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        let commit = run_batch(c, &mut batch).await.map_err(|e| e.to_string());
        let spent = t.elapsed().as_secs_f64();
        busy += spent;
        ops += batch.len();
        batches += 1;
        metrics.busy.inc_by(spent);
        metrics.writes.inc_by(batch.len() as u64);
        if let Err(e) = &commit {
            tracing::error!(error = %e, ops = batch.len(), "store: a transaction rolled back; its callers are told");
            if c.ping().await.is_err() {
                tracing::warn!("store: the write connection is gone; reconnecting before the next batch");
                conn = None;
            }
        }
        if commit.is_ok() {
            committed.send_modify(|n| *n += 1);
            metrics.commits.inc();
        }
        owed |= C::UPKEEP.is_some() && commit.is_ok();
        for op in batch.drain(..) {
            op.finish(commit.clone());
        }
        if owed && last_upkeep.elapsed() >= UPKEEP_EVERY {
            upkeep(conn.as_mut()).await;
            (last_upkeep, owed) = (std::time::Instant::now(), false);
        }
    }
    let up = started.elapsed().as_secs_f64();
    tracing::info!(busy_seconds = busy, up_seconds = up, ops, batches, "store writer stopped");
    if let Some(c) = conn {
        let _ = c.close().await;
    }
}

/// Runs [`WriteConn::UPKEEP`] on `conn`, if it has any and is connected. A failure is left for
/// the next time: upkeep is never a caller's answer.
async fn upkeep<C: WriteConn>(conn: Option<&mut C>) {
    if let (Some(sql), Some(c)) = (C::UPKEEP, conn)
        && let Err(e) = c.exec(sql).await
    {
        tracing::debug!(error = %e, "store: upkeep failed; it runs again after the next write");
    }
}

/// Whether the database itself refused a write (a value it does not take, a constraint): the
/// same write would fail again, and others beside it need not.
pub fn refused_by_database(e: &StoreError) -> bool {
    matches!(e, StoreError::Db(sqlx::Error::Database(_)))
}

/// Runs a batch in one transaction. With more than one operation, each runs under the savepoint
/// `op`: a failed one is rolled back to it (its caller keeps its own error) and the next runs
/// under the same savepoint; after one that held, the savepoint is released and set again, in
/// the same round trip. A lone operation needs none: its failure rolls back the transaction.
async fn run_batch<C: WriteConn>(conn: &mut C, batch: &mut [Box<dyn WriteOp<C>>]) -> Result<(), sqlx::Error> {
    let isolate = batch.len() > 1;
    conn.exec(C::BEGIN).await?;
    if isolate {
        conn.exec("SAVEPOINT op").await?;
    }
    let last = batch.len().saturating_sub(1);
    for (i, op) in batch.iter_mut().enumerate() {
        let ok = op.run(conn).await;
        if !isolate {
            if !ok {
                // The caller has its own error; nothing was written.
                conn.exec("ROLLBACK").await?;
                return Ok(());
            }
        } else if !ok {
            conn.exec("ROLLBACK TO SAVEPOINT op").await?;
        } else if i < last {
            conn.exec_many("RELEASE SAVEPOINT op; SAVEPOINT op").await?;
        }
    }
    if let Err(e) = conn.exec("COMMIT").await {
        let _ = conn.exec("ROLLBACK").await;
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use sqlx::{Connection, SqliteConnection};

    use super::*;

    async fn table() -> Writer<SqliteConnection> {
        let mut c = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        sqlx::query("CREATE TABLE t (x INTEGER PRIMARY KEY, y TEXT NOT NULL)").execute(&mut c).await.unwrap();
        Writer::spawn(c, Box::new(|| Box::pin(async { Err(StoreError::Closed) })))
    }

    fn insert(x: i64, y: Option<&'static str>) -> OpFn<SqliteConnection, ()> {
        Box::new(move |c| {
            Box::pin(async move {
                sqlx::query("INSERT INTO t VALUES (?, ?)").bind(x).bind(y).execute(c).await?;
                Ok(())
            })
        })
    }

    async fn rows(w: &Writer<SqliteConnection>) -> Vec<i64> {
        w.write(Box::new(|c| {
            Box::pin(async move { Ok(sqlx::query_scalar("SELECT x FROM t ORDER BY x").fetch_all(c).await?) })
        }))
        .await
        .unwrap()
    }

    /// Writes that queue behind a slow one, so the writer takes them as one batch.
    async fn one_batch(
        w: &Writer<SqliteConnection>,
        ops: Vec<OpFn<SqliteConnection, ()>>,
    ) -> Vec<Result<(), StoreError>> {
        let slow: OpFn<SqliteConnection, ()> = Box::new(|_| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(())
            })
        });
        let first = w.write(slow);
        let rest = futures_util::future::join_all(ops.into_iter().map(|op| w.write(op)));
        let (first, rest) = tokio::join!(first, rest);
        first.unwrap();
        rest
    }

    #[tokio::test]
    async fn a_write_the_database_refuses_fails_alone_and_the_rest_of_its_batch_commits() {
        let w = table().await;
        let answers = one_batch(&w, vec![insert(1, Some("a")), insert(2, None), insert(3, Some("c"))]).await;
        assert!(answers[0].is_ok() && answers[2].is_ok(), "{answers:?}");
        match &answers[1] {
            Err(e) => assert!(refused_by_database(e) && e.to_string().contains("NOT NULL"), "{e}"),
            Ok(()) => panic!("a NULL went into a NOT NULL column"),
        }
        assert_eq!(rows(&w).await, [1, 3]);
        // The metrics count them: the slow write, the three and the read of the rows, in fewer
        // transactions than writes (the three go in one batch, with the slow one or after it).
        let m = w.metrics();
        assert_eq!(m.writes.get(), 5);
        assert!((2..=3).contains(&m.commits.get()), "{} commits", m.commits.get());
        assert!(m.busy.get() >= 0.05, "the slow write took 50 ms: {}", m.busy.get());
    }

    #[tokio::test]
    async fn a_lone_write_that_fails_leaves_nothing_behind() {
        let w = table().await;
        let two_then_fail: OpFn<SqliteConnection, ()> = Box::new(|c| {
            Box::pin(async move {
                sqlx::query("INSERT INTO t VALUES (1, 'a')").execute(&mut *c).await?;
                sqlx::query("INSERT INTO t VALUES (1, 'again')").execute(&mut *c).await?;
                Ok(())
            })
        });
        assert!(w.write(two_then_fail).await.is_err());
        assert_eq!(rows(&w).await, Vec::<i64>::new());
        assert_eq!(one_batch(&w, vec![insert(5, Some("e"))]).await.len(), 1);
        assert_eq!(rows(&w).await, [5]);
    }

    fn insert_all(
        c: &mut SqliteConnection,
        items: Vec<(i64, Option<String>)>,
    ) -> BoxFut<'_, Result<Vec<i64>, StoreError>> {
        Box::pin(async move {
            let mut q = sqlx::QueryBuilder::new("INSERT INTO t ");
            q.push_values(&items, |mut b, (x, y)| {
                b.push_bind(*x).push_bind(y.clone());
            });
            q.build().execute(c).await?;
            Ok(items.iter().map(|(x, _)| *x).collect())
        })
    }

    #[tokio::test]
    async fn a_gathered_batch_the_database_refuses_is_written_again_one_call_at_a_time() {
        let w = table().await;
        let g = Gather::spawn(w.clone(), insert_all);
        let calls = (1..=20).map(|x| g.call((x, (x != 13).then(|| format!("v{x}")))));
        let answers = futures_util::future::join_all(calls).await;
        for (x, a) in (1..=20).zip(&answers) {
            match a {
                Ok(got) => assert!(x != 13 && *got == x, "{x}: {got}"),
                Err(e) => assert!(x == 13 && refused_by_database(e), "{x}: {e}"),
            }
        }
        assert_eq!(rows(&w).await, (1..=20).filter(|x| *x != 13).collect::<Vec<_>>());
    }
}
