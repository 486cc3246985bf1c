//! Studio orders and incidents. An order's row is the projection of its events: the conductor
//! ([`crate::orders`]) keeps its steps, checkpoints and approval as one JSON document and writes
//! each change as a compare-and-set on `version`, with the events that say what changed, in one
//! transaction. An incident is raised once per cause. Same SQL for SQLite and PostgreSQL, stamped
//! out by [`orders_impl`] like the fleet's.

use serde::Serialize;

use super::rows::Cols;
use super::{BoxFut, StoreError};

/// An order as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRow {
    /// Its id.
    pub id: String,
    /// The plan it runs.
    pub plan: String,
    /// The token that placed it.
    pub client: String,
    /// Its state: running, awaiting_approval, succeeded, failed or cancelled.
    pub state: String,
    /// The conductor's document (JSON): request, steps with checkpoints, approval, outputs.
    pub doc: String,
    /// Bumped by each change.
    pub version: i64,
    /// Placed, unix ms.
    pub created_ms: i64,
    /// Last changed, unix ms.
    pub updated_ms: i64,
}

/// One change in an order's life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OrderEvent {
    /// Order of events across all orders.
    pub seq: i64,
    /// When, unix ms.
    pub at_ms: i64,
    /// The step it is about, if one.
    pub step: Option<String>,
    /// The order's or the step's new state.
    pub state: String,
    /// What happened.
    pub detail: String,
}

/// An event to write with a change (at the change's `updated_ms`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrderEvent {
    /// The step it is about, if one.
    pub step: Option<String>,
    /// The new state.
    pub state: String,
    /// What happened.
    pub detail: String,
}

/// Filters and page for [`OrderStore::orders`].
#[derive(Debug, Clone, Default)]
pub struct OrderQuery {
    /// Only orders in this state.
    pub state: Option<String>,
    /// Only this client's orders.
    pub client: Option<String>,
    /// Page size.
    pub limit: u32,
    /// Continue after this order (created ms, id), newest first.
    pub before: Option<(i64, String)>,
}

/// Something that needs the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Incident {
    /// Its id.
    pub id: String,
    /// What raised it, once: a second raise of the same cause is the same incident.
    pub cause: String,
    /// What sort: `order_step`, `order_expired`, `approval_timeout`, `device_not_ready`,
    /// `job_failed`, `job_quarantined`, `task_failed`, `task_timed_out`, `task_expired`.
    pub kind: String,
    /// What it concerns: an order, job or device task id.
    pub subject: String,
    /// open or resolved.
    pub state: String,
    /// What happened, for the operator.
    pub summary: String,
    /// Raised, unix ms.
    pub created_ms: i64,
    /// Last changed, unix ms.
    pub updated_ms: i64,
    /// Who resolved it.
    pub resolved_by: Option<String>,
    /// Their note.
    pub note: Option<String>,
}

/// The orders' and incidents' durable state.
pub trait OrderStore {
    /// Writes `row` if the stored order is at `expect_version` (0: there is none yet), with its
    /// events; `false` when it is not (another change came first), and nothing is written.
    fn save_order(
        &self,
        row: OrderRow,
        expect_version: i64,
        events: Vec<NewOrderEvent>,
    ) -> BoxFut<'_, Result<bool, StoreError>>;
    /// One order.
    fn order(&self, id: &str) -> BoxFut<'_, Result<Option<OrderRow>, StoreError>>;
    /// A page of orders, newest first.
    fn orders(&self, q: OrderQuery) -> BoxFut<'_, Result<Vec<OrderRow>, StoreError>>;
    /// The orders not ended (running or awaiting approval), oldest first.
    fn live_orders(&self) -> BoxFut<'_, Result<Vec<OrderRow>, StoreError>>;
    /// How many orders are in each state (for the metrics).
    fn order_counts(&self) -> BoxFut<'_, Result<Vec<(String, i64)>, StoreError>>;
    /// How many incidents of each kind are open (for the metrics).
    fn open_incident_counts(&self) -> BoxFut<'_, Result<Vec<(String, i64)>, StoreError>>;
    /// An order's events, in order.
    fn order_events(&self, id: &str) -> BoxFut<'_, Result<Vec<OrderEvent>, StoreError>>;
    /// Raises an incident; `false` when one of the same cause was raised before (nothing changes).
    fn raise_incident(&self, i: Incident) -> BoxFut<'_, Result<bool, StoreError>>;
    /// Incidents, open first, then newest first; optionally in one state.
    fn incidents(&self, state: Option<String>, limit: u32) -> BoxFut<'_, Result<Vec<Incident>, StoreError>>;
    /// One incident.
    fn incident(&self, id: &str) -> BoxFut<'_, Result<Option<Incident>, StoreError>>;
    /// Resolves an open incident; `None` when there is no such open incident.
    fn resolve_incident(
        &self,
        id: &str,
        by: &str,
        note: Option<String>,
        now_ms: i64,
    ) -> BoxFut<'_, Result<Option<Incident>, StoreError>>;
}

pub(super) fn order_from_row(r: &impl Cols) -> Result<OrderRow, StoreError> {
    Ok(OrderRow {
        id: r.col("id")?,
        plan: r.col("plan")?,
        client: r.col("client")?,
        state: r.col("state")?,
        doc: r.col("doc")?,
        version: r.col("version")?,
        created_ms: r.col("created_ms")?,
        updated_ms: r.col("updated_ms")?,
    })
}

pub(super) fn order_event_from_row(r: &impl Cols) -> Result<OrderEvent, StoreError> {
    Ok(OrderEvent {
        seq: r.col("seq")?,
        at_ms: r.col("at_ms")?,
        step: r.col("step")?,
        state: r.col("state")?,
        detail: r.col("detail")?,
    })
}

pub(super) fn incident_from_row(r: &impl Cols) -> Result<Incident, StoreError> {
    Ok(Incident {
        id: r.col("id")?,
        cause: r.col("cause")?,
        kind: r.col("kind")?,
        subject: r.col("subject")?,
        state: r.col("state")?,
        summary: r.col("summary")?,
        created_ms: r.col("created_ms")?,
        updated_ms: r.col("updated_ms")?,
        resolved_by: r.col("resolved_by")?,
        note: r.col("note")?,
    })
}

/// `impl OrderStore` for a store with a group-commit `write` and a `read` pool.
macro_rules! orders_impl {
    ($store:ty, $conn:ty) => {
        impl $crate::store::orders::OrderStore for $store {
            fn save_order(
                &self,
                row: $crate::store::orders::OrderRow,
                expect_version: i64,
                events: Vec<$crate::store::orders::NewOrderEvent>,
            ) -> BoxFut<'_, Result<bool, StoreError>> {
                Box::pin(self.write(Box::new(move |c| {
                    Box::pin(async move {
                        let done = if expect_version == 0 {
                            sqlx::query(
                                "INSERT INTO orders (id, plan, client, state, doc, version, created_ms, updated_ms) \
                                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
                            )
                            .bind(&row.id)
                            .bind(&row.plan)
                            .bind(&row.client)
                            .bind(&row.state)
                            .bind(&row.doc)
                            .bind(row.version)
                            .bind(row.created_ms)
                            .bind(row.updated_ms)
                            .execute(&mut *c)
                            .await?
                        } else {
                            sqlx::query(
                                "UPDATE orders SET state = $2, doc = $3, version = $4, updated_ms = $5 \
                                 WHERE id = $1 AND version = $6",
                            )
                            .bind(&row.id)
                            .bind(&row.state)
                            .bind(&row.doc)
                            .bind(row.version)
                            .bind(row.updated_ms)
                            .bind(expect_version)
                            .execute(&mut *c)
                            .await?
                        };
                        if done.rows_affected() != 1 {
                            return Ok(false);
                        }
                        for e in &events {
                            sqlx::query(
                                "INSERT INTO order_events (order_id, at_ms, step, state, detail) VALUES ($1, $2, $3, $4, $5)",
                            )
                            .bind(&row.id)
                            .bind(row.updated_ms)
                            .bind(&e.step)
                            .bind(&e.state)
                            .bind(&e.detail)
                            .execute(&mut *c)
                            .await?;
                        }
                        Ok(true)
                    })
                })))
            }

            fn order(&self, id: &str) -> BoxFut<'_, Result<Option<$crate::store::orders::OrderRow>, StoreError>> {
                let id = id.to_owned();
                Box::pin(async move {
                    let row = sqlx::query("SELECT * FROM orders WHERE id = $1").bind(id).fetch_optional(&self.read).await?;
                    row.as_ref().map($crate::store::orders::order_from_row).transpose()
                })
            }

            fn orders(
                &self,
                q: $crate::store::orders::OrderQuery,
            ) -> BoxFut<'_, Result<Vec<$crate::store::orders::OrderRow>, StoreError>> {
                Box::pin(async move {
                    let (before_ms, before_id) = q.before.map_or((None, None), |(ms, id)| (Some(ms), Some(id)));
                    let rows = sqlx::query(
                        "SELECT * FROM orders WHERE (CAST($1 AS TEXT) IS NULL OR state = $1) \
                         AND (CAST($2 AS TEXT) IS NULL OR client = $2) \
                         AND (CAST($3 AS BIGINT) IS NULL OR created_ms < $3 OR (created_ms = $3 AND id < $4)) \
                         ORDER BY created_ms DESC, id DESC LIMIT $5",
                    )
                    .bind(q.state)
                    .bind(q.client)
                    .bind(before_ms)
                    .bind(before_id)
                    .bind(i64::from(q.limit.max(1)))
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter().map($crate::store::orders::order_from_row).collect()
                })
            }

            fn live_orders(&self) -> BoxFut<'_, Result<Vec<$crate::store::orders::OrderRow>, StoreError>> {
                Box::pin(async move {
                    let rows = sqlx::query(
                        "SELECT * FROM orders WHERE state IN ('running', 'awaiting_approval') ORDER BY created_ms, id",
                    )
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter().map($crate::store::orders::order_from_row).collect()
                })
            }

            fn order_counts(&self) -> BoxFut<'_, Result<Vec<(String, i64)>, StoreError>> {
                Box::pin(async move {
                    let rows = sqlx::query("SELECT state AS k, COUNT(*) AS n FROM orders GROUP BY state")
                        .fetch_all(&self.read)
                        .await?;
                    rows.iter().map(|r| Ok((r.col("k")?, r.col("n")?))).collect()
                })
            }

            fn open_incident_counts(&self) -> BoxFut<'_, Result<Vec<(String, i64)>, StoreError>> {
                Box::pin(async move {
                    let rows = sqlx::query(
                        "SELECT kind AS k, COUNT(*) AS n FROM incidents WHERE state = 'open' GROUP BY kind",
                    )
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter().map(|r| Ok((r.col("k")?, r.col("n")?))).collect()
                })
            }

            fn order_events(
                &self,
                id: &str,
            ) -> BoxFut<'_, Result<Vec<$crate::store::orders::OrderEvent>, StoreError>> {
                let id = id.to_owned();
                Box::pin(async move {
                    let rows = sqlx::query("SELECT * FROM order_events WHERE order_id = $1 ORDER BY seq")
                        .bind(id)
                        .fetch_all(&self.read)
                        .await?;
                    rows.iter().map($crate::store::orders::order_event_from_row).collect()
                })
            }

            fn raise_incident(&self, i: $crate::store::orders::Incident) -> BoxFut<'_, Result<bool, StoreError>> {
                Box::pin(self.write(Box::new(move |c| {
                    Box::pin(async move {
                        let done = sqlx::query(
                            "INSERT INTO incidents (id, cause, kind, subject, state, summary, created_ms, updated_ms) \
                             VALUES ($1, $2, $3, $4, 'open', $5, $6, $6) ON CONFLICT (cause) DO NOTHING",
                        )
                        .bind(&i.id)
                        .bind(&i.cause)
                        .bind(&i.kind)
                        .bind(&i.subject)
                        .bind(&i.summary)
                        .bind(i.created_ms)
                        .execute(&mut *c)
                        .await?;
                        Ok(done.rows_affected() == 1)
                    })
                })))
            }

            fn incidents(
                &self,
                state: Option<String>,
                limit: u32,
            ) -> BoxFut<'_, Result<Vec<$crate::store::orders::Incident>, StoreError>> {
                Box::pin(async move {
                    let rows = sqlx::query(
                        "SELECT * FROM incidents WHERE (CAST($1 AS TEXT) IS NULL OR state = $1) \
                         ORDER BY CASE WHEN state = 'open' THEN 0 ELSE 1 END, created_ms DESC, id DESC LIMIT $2",
                    )
                    .bind(state)
                    .bind(i64::from(limit.max(1)))
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter().map($crate::store::orders::incident_from_row).collect()
                })
            }

            fn incident(&self, id: &str) -> BoxFut<'_, Result<Option<$crate::store::orders::Incident>, StoreError>> {
                let id = id.to_owned();
                Box::pin(async move {
                    let row =
                        sqlx::query("SELECT * FROM incidents WHERE id = $1").bind(id).fetch_optional(&self.read).await?;
                    row.as_ref().map($crate::store::orders::incident_from_row).transpose()
                })
            }

            fn resolve_incident(
                &self,
                id: &str,
                by: &str,
                note: Option<String>,
                now_ms: i64,
            ) -> BoxFut<'_, Result<Option<$crate::store::orders::Incident>, StoreError>> {
                let (id, by) = (id.to_owned(), by.to_owned());
                Box::pin(self.write(Box::new(move |c| {
                    Box::pin(async move {
                        let row = sqlx::query(
                            "UPDATE incidents SET state = 'resolved', resolved_by = $2, note = $3, updated_ms = $4 \
                             WHERE id = $1 AND state = 'open' RETURNING *",
                        )
                        .bind(&id)
                        .bind(&by)
                        .bind(&note)
                        .bind(now_ms)
                        .fetch_optional(&mut *c)
                        .await?;
                        row.as_ref().map($crate::store::orders::incident_from_row).transpose()
                    })
                })))
            }
        }
    };
}

pub(super) use orders_impl;
