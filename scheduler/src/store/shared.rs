//! What the SQLite and PostgreSQL stores share to the letter: the SQL both dialects accept
//! (`$N` parameters, `CAST`, `ON CONFLICT`), written once and stamped out for each connection
//! type by two macros. What differs (the set-based submits, dispatch and results, opening,
//! checkpoints) stays in `sqlite.rs` and `postgres.rs`; the rules a batch of submits follows are
//! in `admit.rs`.

/// The writes both stores make the same way, as free functions over `$conn`.
macro_rules! shared_ops {
    ($conn:ty) => {
        async fn load_job(conn: &mut $conn, id: &str) -> Result<Option<Job>, StoreError> {
            let row = sqlx::query("SELECT * FROM jobs WHERE id = $1").bind(id).fetch_optional(&mut *conn).await?;
            row.as_ref().map(job_from_row).transpose()
        }

        /// Appends an event for a job that must exist; the trigger projects it onto the job row.
        async fn append_event(
            conn: &mut $conn,
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
            conn: &mut $conn,
            job: &Job,
            to: JobState,
            change: Change<'_>,
            now_ms: i64,
        ) -> Result<Event, StoreError> {
            let attempt = change.attempt.unwrap_or(job.attempt);
            let seq = append_event(conn, &job.id, to, attempt, &change, now_ms).await?;
            Ok(event(seq, &job.id, job.tier, Some(job.state), job.created_ms, to, attempt, &change, now_ms))
        }

        async fn insert_outbox(conn: &mut $conn, job: &Job, not_before: i64) -> Result<(), StoreError> {
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

        /// Live jobs attached to `leader`, oldest first.
        async fn followers(conn: &mut $conn, leader: &str) -> Result<Vec<Job>, StoreError> {
            let rows = sqlx::query(
                "SELECT * FROM jobs WHERE follows = $1 AND state NOT IN ('succeeded', 'failed', 'cancelled', 'cached') \
                 ORDER BY seq",
            )
            .bind(leader)
            .fetch_all(&mut *conn)
            .await?;
            rows.iter().map(job_from_row).collect()
        }

        async fn cancel_op(conn: &mut $conn, job_id: &str, by: &str, now_ms: i64) -> Result<JobChange, StoreError> {
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

        async fn resume_op(conn: &mut $conn, now_ms: i64) -> Result<Vec<Event>, StoreError> {
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
    };
}

/// Most ids one read of [`Store::jobs`] (or [`Store::assets_named`]) binds.
pub(super) const JOBS_CHUNK: usize = 256;

/// A chunk of at most [`JOBS_CHUNK`] keys as the parameters of an `IN (…)` list: the marks
/// `$1, …, $N` for a power of two N, and the keys to bind, the last repeated to fill it, so the
/// statement cache holds nine statements, not one per count of keys asked.
pub(super) fn in_list(chunk: &[String]) -> (String, Vec<&String>) {
    let width = chunk.len().next_power_of_two();
    let marks = (1..=width).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
    (marks, (0..width).map(|k| &chunk[k.min(chunk.len() - 1)]).collect())
}

/// `impl Store` for a store with a group-commit `writer`, a `read` pool, the `*_op` functions
/// in scope, and its own `submit_one`, `start_one`, `finish_one` and `record_one` (one at a
/// time, or gathered into sets).
macro_rules! store_impl {
    ($store:ty, $conn:ty) => {
        impl Store for $store {
            fn submit(&self, job: NewJob) -> BoxFut<'_, Result<Submitted, StoreError>> {
                Box::pin(self.submit_one(job))
            }

            fn pending(&self, now_ms: i64, limit: u32) -> BoxFut<'_, Result<Pending, StoreError>> {
                Box::pin(async move {
                    let mut conn = self.read.acquire().await?;
                    pending_op(&mut conn, now_ms, limit).await
                })
            }

            fn read_and_mark(
                &self,
                now_ms: i64,
                limit: u32,
            ) -> BoxFut<'_, Result<(Pending, Vec<Event>), StoreError>> {
                Box::pin(self.write(Box::new(move |c| {
                    Box::pin(async move {
                        let pending = pending_op(&mut *c, now_ms, limit).await?;
                        let ids: Vec<i64> = pending.rows.iter().map(|o| o.id).collect();
                        let events = if ids.is_empty() { Vec::new() } else { mark_sent_op(c, &ids, now_ms).await? };
                        Ok((pending, events))
                    })
                })))
            }

            fn mark_sent(&self, ids: Vec<i64>, now_ms: i64) -> BoxFut<'_, Result<Vec<Event>, StoreError>> {
                Box::pin(self.write(Box::new(move |c| Box::pin(async move { mark_sent_op(c, &ids, now_ms).await }))))
            }

            fn start(&self, d: &Dispatch, now_ms: i64) -> BoxFut<'_, Result<Option<Event>, StoreError>> {
                Box::pin(self.start_one(d.clone(), now_ms))
            }

            fn finish(&self, d: &Dispatch, outcome: Outcome, now_ms: i64) -> BoxFut<'_, Result<Vec<Event>, StoreError>> {
                Box::pin(self.finish_one(d.clone(), outcome, now_ms))
            }

            fn record(
                &self,
                d: &Dispatch,
                started_ms: i64,
                outcome: Outcome,
                now_ms: i64,
            ) -> BoxFut<'_, Result<Vec<Event>, StoreError>> {
                Box::pin(self.record_one(Recorded { d: d.clone(), started_ms, outcome, now_ms }))
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

            fn jobs(&self, mut ids: Vec<String>) -> BoxFut<'_, Result<Vec<Job>, StoreError>> {
                Box::pin(async move {
                    // An id asked twice would otherwise come back from two chunks.
                    ids.sort_unstable();
                    ids.dedup();
                    let mut jobs = Vec::with_capacity(ids.len());
                    // A statement per chunk (both dialects cap a statement's parameters), of
                    // a few widths (gathered reads ask for any count, and a new statement is
                    // parsed and planned).
                    for chunk in ids.chunks(super::shared::JOBS_CHUNK) {
                        let (marks, keys) = super::shared::in_list(chunk);
                        // Safe: the statement is built from parameter numbers only.
                        let sql = sqlx::AssertSqlSafe(format!("SELECT * FROM jobs WHERE id IN ({marks})"));
                        let mut q = sqlx::query(sql);
                        for k in keys {
                            q = q.bind(k);
                        }
                        for row in q.fetch_all(&self.read).await? {
                            jobs.push(job_from_row(&row)?);
                        }
                    }
                    Ok(jobs)
                })
            }

            fn list(&self, q: ListQuery) -> BoxFut<'_, Result<Page, StoreError>> {
                Box::pin(async move {
                    let limit = q.limit.max(1);
                    let rows = sqlx::query(
                        "SELECT * FROM jobs WHERE (CAST($1 AS TEXT) IS NULL OR state = $1) \
                         AND (CAST($2 AS TEXT) IS NULL OR tier = $2) \
                         AND (CAST($3 AS BIGINT) IS NULL OR created_ms >= $3) AND (CAST($4 AS BIGINT) IS NULL OR created_ms < $4) \
                         AND (CAST($5 AS TEXT) IS NULL OR client = $5) AND (CAST($6 AS BIGINT) IS NULL OR seq < $6) \
                         ORDER BY seq DESC LIMIT $7",
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

            fn provenance(&self, hash: &str) -> BoxFut<'_, Result<Option<String>, StoreError>> {
                let hash = hash.to_owned();
                Box::pin(async move {
                    let found: Option<Option<String>> = sqlx::query_scalar("SELECT provenance FROM assets WHERE hash = $1")
                        .bind(&hash)
                        .fetch_optional(&self.read)
                        .await?;
                    Ok(found.flatten())
                })
            }

            fn asset_png(&self, hash: &str) -> BoxFut<'_, Result<Option<Vec<u8>>, StoreError>> {
                let hash = hash.to_owned();
                Box::pin(async move {
                    let found: Option<Option<Vec<u8>>> = sqlx::query_scalar("SELECT png FROM assets WHERE hash = $1")
                        .bind(&hash)
                        .fetch_optional(&self.read)
                        .await?;
                    Ok(found.flatten())
                })
            }

            fn asset_readable(
                &self,
                hash: &str,
                client: Option<String>,
                devices: Vec<String>,
            ) -> BoxFut<'_, Result<bool, StoreError>> {
                let hash = hash.to_owned();
                Box::pin(async move {
                    if let Some(client) = client {
                        let mine: Option<i64> =
                            sqlx::query_scalar("SELECT seq FROM jobs WHERE asset = $1 AND client = $2 LIMIT 1")
                                .bind(&hash)
                                .bind(&client)
                                .fetch_optional(&self.read)
                                .await?;
                        if mine.is_some() {
                            return Ok(true);
                        }
                    }
                    if devices.is_empty() {
                        return Ok(false);
                    }
                    let on: Vec<String> = sqlx::query_scalar("SELECT DISTINCT device_id FROM device_tasks WHERE asset = $1")
                        .bind(&hash)
                        .fetch_all(&self.read)
                        .await?;
                    Ok(on.iter().any(|d| devices.contains(d)))
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

            fn writer_metrics(&self) -> $crate::store::writer::WriterMetrics {
                self.writer.metrics().clone()
            }

            fn ping(&self) -> BoxFut<'_, Result<(), StoreError>> {
                Box::pin(async move {
                    sqlx::query("SELECT 1").execute(&self.read).await?;
                    Ok(())
                })
            }

            fn tokens(&self) -> BoxFut<'_, Result<Vec<TokenRow>, StoreError>> {
                Box::pin(async move {
                    let rows = sqlx::query(
                        "SELECT token_hash, name, role, devices, created_ms, expires_ms, budget_seconds, budget_period FROM api_tokens \
                         WHERE revoked_ms IS NULL \
                         ORDER BY created_ms, name",
                    )
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter().map(token_from_row).collect()
                })
            }

            fn add_token(&self, token: TokenRow, now_ms: i64) -> BoxFut<'_, Result<(), StoreError>> {
                // A taken name is a refusal that writes nothing: an answer, not a failed write.
                let op: OpFn<$conn, Result<(), StoreError>> = Box::new(move |c| {
                    Box::pin(async move {
                        let inserted = sqlx::query(
                            "INSERT INTO api_tokens (token_hash, name, role, created_ms, devices, expires_ms, budget_seconds, \
                               budget_period) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (name) DO NOTHING",
                        )
                        .bind(&token.token_hash)
                        .bind(&token.name)
                        .bind(token.role.as_str())
                        .bind(now_ms)
                        .bind(token.devices.join(","))
                        .bind(token.expires_ms)
                        .bind(token.budget.map(|b| i64::try_from(b.seconds).unwrap_or(i64::MAX)))
                        .bind(token.budget.map(|b| b.period.as_str()))
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

            fn prune(
                &self,
                jobs_before_ms: i64,
                assets_before_ms: i64,
            ) -> BoxFut<'_, Result<$crate::store::Pruned, StoreError>> {
                let op: OpFn<$conn, Result<$crate::store::Pruned, StoreError>> = Box::new(move |c| {
                    Box::pin(async move {
                        // Ended jobs (and tasks) before the cutoff, their rows in every table,
                        // the jobs and tasks themselves last; not those of a live order.
                        let mut deleted = [0u64; 6];
                        for (n, sql) in [
                            concat!("DELETE FROM outbox WHERE job_id IN (", super::shared::ended_jobs!(), ")"),
                            concat!("DELETE FROM attempt_failures WHERE job_id IN (", super::shared::ended_jobs!(), ")"),
                            concat!("DELETE FROM job_events WHERE job_id IN (", super::shared::ended_jobs!(), ")"),
                            concat!("DELETE FROM jobs WHERE id IN (", super::shared::ended_jobs!(), ")"),
                            concat!("DELETE FROM device_task_events WHERE task_id IN (", super::shared::ended_tasks!(), ")"),
                            concat!("DELETE FROM device_tasks WHERE id IN (", super::shared::ended_tasks!(), ")"),
                        ]
                        .into_iter()
                        .enumerate()
                        {
                            deleted[n] = sqlx::query(sql).bind(jobs_before_ms).execute(&mut *c).await?.rows_affected();
                        }
                        let (jobs, tasks) = (deleted[3], deleted[5]);
                        let assets: Vec<String> = sqlx::query_scalar(
                            "DELETE FROM assets WHERE created_ms < $1 \
                             AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.asset = assets.hash) \
                             AND NOT EXISTS (SELECT 1 FROM device_tasks t \
                                             WHERE t.asset = assets.hash OR t.output_asset = assets.hash) \
                             RETURNING hash",
                        )
                        .bind(assets_before_ms)
                        .fetch_all(&mut *c)
                        .await?;
                        Ok(Ok($crate::store::Pruned { jobs, tasks, assets }))
                    })
                });
                Box::pin(async move { self.write(op).await? })
            }

            fn assets_named(&self, hashes: Vec<String>) -> BoxFut<'_, Result<Vec<String>, StoreError>> {
                Box::pin(async move {
                    let mut named = std::collections::HashSet::new();
                    // A statement per chunk of hashes, as `jobs` reads, not one per hash.
                    for chunk in hashes.chunks(super::shared::JOBS_CHUNK) {
                        let (marks, keys) = super::shared::in_list(chunk);
                        // Safe: the statement is built from parameter numbers only.
                        let sql = sqlx::AssertSqlSafe(format!(
                            "SELECT asset FROM jobs WHERE asset IN ({marks}) \
                             UNION SELECT hash FROM assets WHERE hash IN ({marks}) \
                             UNION SELECT asset FROM device_tasks WHERE asset IN ({marks}) \
                             UNION SELECT output_asset FROM device_tasks WHERE output_asset IN ({marks})"
                        ));
                        let mut q = sqlx::query_scalar::<_, String>(sql);
                        for k in keys {
                            q = q.bind(k);
                        }
                        named.extend(q.fetch_all(&self.read).await?);
                    }
                    Ok(hashes.into_iter().filter(|h| named.contains(h)).collect())
                })
            }

            fn revoke_token(&self, name: String, now_ms: i64) -> BoxFut<'_, Result<bool, StoreError>> {
                // The row stays, renamed, so the name is free for a new token.
                let op: OpFn<$conn, Result<bool, StoreError>> = Box::new(move |c| {
                    Box::pin(async move {
                        let revoked = sqlx::query(
                            "UPDATE api_tokens SET revoked_ms = $1, name = name || ' (revoked ' || CAST($1 AS TEXT) || ')' \
                             WHERE name = $2 AND revoked_ms IS NULL",
                        )
                        .bind(now_ms)
                        .bind(&name)
                        .execute(&mut *c)
                        .await?;
                        Ok(Ok(revoked.rows_affected() > 0))
                    })
                });
                Box::pin(async move { self.write(op).await? })
            }

            fn record_failure(
                &self,
                f: AttemptFailure,
                since_ms: i64,
            ) -> BoxFut<'_, Result<FailureTally, StoreError>> {
                Box::pin(self.write(Box::new(move |c| {
                    Box::pin(async move {
                        sqlx::query(
                            "INSERT INTO attempt_failures (job_id, attempt, worker, error, at_ms) \
                             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (job_id, attempt) DO NOTHING",
                        )
                        .bind(&f.job_id)
                        .bind(i64::from(f.attempt))
                        .bind(&f.worker)
                        .bind(&f.error)
                        .bind(f.at_ms)
                        .execute(&mut *c)
                        .await?;
                        let job_workers: Vec<String> = sqlx::query_scalar(
                            "SELECT DISTINCT worker FROM attempt_failures WHERE job_id = $1 ORDER BY worker",
                        )
                        .bind(&f.job_id)
                        .fetch_all(&mut *c)
                        .await?;
                        let worker_jobs: i64 = sqlx::query_scalar(
                            "SELECT COUNT(DISTINCT job_id) FROM attempt_failures WHERE worker = $1 AND at_ms >= $2 \
                             AND at_ms >= COALESCE((SELECT changed_ms FROM worker_controls \
                               WHERE worker = $1 AND drained IS NULL), 0)",
                        )
                        .bind(&f.worker)
                        .bind(since_ms)
                        .fetch_one(&mut *c)
                        .await?;
                        Ok(FailureTally { job_workers, worker_jobs: u32::try_from(worker_jobs).unwrap_or(u32::MAX) })
                    })
                })))
            }

            fn set_drained(
                &self,
                worker: &str,
                reason: Option<&str>,
                now_ms: i64,
            ) -> BoxFut<'_, Result<bool, StoreError>> {
                let (worker, reason) = (worker.to_owned(), reason.map(str::to_owned));
                Box::pin(self.write(Box::new(move |c| {
                    Box::pin(async move {
                        let done = match &reason {
                            Some(reason) => {
                                sqlx::query(
                                    "INSERT INTO worker_controls (worker, drained, changed_ms) VALUES ($1, $2, $3) \
                                     ON CONFLICT (worker) DO UPDATE SET drained = excluded.drained, \
                                     changed_ms = excluded.changed_ms WHERE worker_controls.drained IS NULL",
                                )
                                .bind(&worker)
                                .bind(reason)
                                .bind(now_ms)
                                .execute(&mut *c)
                                .await?
                            }
                            None => {
                                sqlx::query(
                                    "UPDATE worker_controls SET drained = NULL, changed_ms = $2 \
                                     WHERE worker = $1 AND drained IS NOT NULL",
                                )
                                .bind(&worker)
                                .bind(now_ms)
                                .execute(&mut *c)
                                .await?
                            }
                        };
                        Ok(done.rows_affected() > 0)
                    })
                })))
            }

            fn drained(&self) -> BoxFut<'_, Result<Vec<DrainedWorker>, StoreError>> {
                Box::pin(async move {
                    let rows = sqlx::query(
                        "SELECT worker, drained, changed_ms FROM worker_controls WHERE drained IS NOT NULL ORDER BY worker",
                    )
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter()
                        .map(|r| {
                            Ok(DrainedWorker { worker_id: r.col("worker")?, reason: r.col("drained")?, at_ms: r.col("changed_ms")? })
                        })
                        .collect()
                })
            }
        }
    };
}

/// The ended jobs retention deletes (before `$1`), sparing a live order's renders: their ids
/// are in its checkpoints, and their assets are its approval's options.
macro_rules! ended_jobs {
    () => {
        "SELECT id FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled', 'cached') AND finished_ms < $1 \
         AND NOT (idempotency_key LIKE 'order-%' AND EXISTS (SELECT 1 FROM orders o \
           WHERE o.state IN ('running', 'awaiting_approval') AND jobs.idempotency_key LIKE 'order-' || o.id || '-%'))"
    };
}

/// The ended device tasks retention deletes (before `$1`), sparing a live order's.
macro_rules! ended_tasks {
    () => {
        "SELECT id FROM device_tasks WHERE state IN ('succeeded', 'failed', 'timed_out', 'expired') AND updated_ms < $1 \
         AND NOT (id LIKE 't-%' AND EXISTS (SELECT 1 FROM orders o \
           WHERE o.state IN ('running', 'awaiting_approval') AND device_tasks.id LIKE 't-' || o.id || '-%'))"
    };
}

pub(super) use {ended_jobs, ended_tasks, shared_ops, store_impl};
