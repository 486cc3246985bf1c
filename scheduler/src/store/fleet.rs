//! The edge fleet's state: devices as their agents announced them, their latest telemetry, and
//! the physical tasks sent to them. Same SQL for SQLite and PostgreSQL, stamped out by
//! [`fleet_impl`] like the job store's shared half.
//!
//! A task moves forward only: queued → sent → accepted → running → succeeded | failed |
//! timed_out | expired. A report that would move it back (a duplicate, or one that arrives after
//! a later one) changes nothing. `sent` may repeat: an unanswered send is sent again.

pub use kiln_protocol::fleet::TaskState;
use kiln_protocol::fleet::{DeviceStatus, TaskKind, Telemetry};
use serde::Serialize;
use serde_json::{Map, Value};

use super::rows::{Cols, corrupt};
use super::{BoxFut, StoreError};

/// A device as the scheduler knows it.
#[derive(Debug, Clone, Serialize)]
pub struct Device {
    /// Its id.
    pub id: String,
    /// What it is.
    pub kind: String,
    /// online, degraded or offline.
    pub state: String,
    /// Why, for degraded and offline.
    pub detail: Option<String>,
    /// The agent start it last announced.
    pub boot_id: String,
    /// The agent's version.
    pub version: String,
    /// What it can do.
    pub capabilities: Vec<String>,
    /// When the agent last announced its status (the agent's clock), unix ms.
    pub status_ms: i64,
    /// When the scheduler last heard from it, unix ms.
    pub last_seen_ms: i64,
    /// Its latest readings.
    pub telemetry: Option<Value>,
    /// The sequence number of the latest telemetry.
    pub telemetry_seq: i64,
    /// When the latest telemetry arrived, unix ms.
    pub telemetry_ms: Option<i64>,
    /// Telemetry the agent dropped because its spool was full.
    pub spool_dropped: i64,
}

/// A device task.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceTask {
    /// Its id (the agent's journal key).
    pub id: String,
    /// The device.
    pub device_id: String,
    /// What it asks.
    pub kind: TaskKind,
    /// The asset it works on.
    pub asset: Option<String>,
    /// Its parameters.
    pub params: Map<String, Value>,
    /// Its state.
    pub state: TaskState,
    /// Times it was published.
    pub sends: i64,
    /// When an unanswered send goes again, unix ms.
    pub next_send_ms: i64,
    /// Its deadline, unix ms.
    pub deadline_ms: i64,
    /// The token that created it.
    pub created_by: String,
    /// Created, unix ms.
    pub created_ms: i64,
    /// Last changed, unix ms.
    pub updated_ms: i64,
    /// The latest detail.
    pub detail: Option<String>,
    /// An asset it made (a capture's photo).
    pub output_asset: Option<String>,
}

/// One state a task went through.
#[derive(Debug, Clone, Serialize)]
pub struct TaskEvent {
    /// 1, 2, ... per task.
    pub n: i64,
    /// The state.
    pub state: TaskState,
    /// When, unix ms.
    pub at_ms: i64,
    /// A note.
    pub detail: Option<String>,
}

/// A task to create.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Its id.
    pub id: String,
    /// The device.
    pub device_id: String,
    /// What it asks.
    pub kind: TaskKind,
    /// The asset.
    pub asset: Option<String>,
    /// Parameters.
    pub params: Map<String, Value>,
    /// Deadline, unix ms.
    pub deadline_ms: i64,
    /// The token's name.
    pub created_by: String,
}

/// A change to a task: where it goes, with what.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskChange {
    /// A note.
    pub detail: Option<String>,
    /// An asset it made.
    pub output_asset: Option<String>,
    /// For `sent`: when to send again.
    pub next_send_ms: Option<i64>,
}

/// A task that moved: it as it is now, and the state it left.
#[derive(Debug, Clone)]
pub struct TaskMove {
    /// The task after the move.
    pub task: DeviceTask,
    /// The state before.
    pub from: TaskState,
}

/// A task with every state it went through.
pub type TaskWithEvents = (DeviceTask, Vec<TaskEvent>);

/// The fleet half of the store.
pub trait FleetStore: Send + Sync {
    /// Records a device's status; the device as it was before (None for a new one).
    fn announce(&self, id: &str, status: DeviceStatus, now_ms: i64) -> BoxFut<'_, Result<Option<Device>, StoreError>>;
    /// Records telemetry unless it is older than what is stored (or the device is unknown): whether it was kept.
    fn telemetry(&self, id: &str, t: Telemetry, now_ms: i64) -> BoxFut<'_, Result<bool, StoreError>>;
    /// Every device, by id.
    fn devices(&self) -> BoxFut<'_, Result<Vec<Device>, StoreError>>;
    /// One device.
    fn device(&self, id: &str) -> BoxFut<'_, Result<Option<Device>, StoreError>>;
    /// Creates a task (queued).
    fn create_task(&self, t: NewTask, now_ms: i64) -> BoxFut<'_, Result<DeviceTask, StoreError>>;
    /// One task and its events.
    fn task(&self, id: &str) -> BoxFut<'_, Result<Option<TaskWithEvents>, StoreError>>;
    /// One task, without its events.
    fn task_row(&self, id: &str) -> BoxFut<'_, Result<Option<DeviceTask>, StoreError>>;
    /// Tasks, newest first, optionally of one device or state.
    fn tasks(
        &self,
        device: Option<String>,
        state: Option<TaskState>,
        limit: u32,
    ) -> BoxFut<'_, Result<Vec<DeviceTask>, StoreError>>;
    /// Tasks to publish now: queued, or sent and unanswered past `next_send_ms`, for devices
    /// that are not offline; oldest first.
    fn due_tasks(&self, now_ms: i64, limit: u32) -> BoxFut<'_, Result<Vec<DeviceTask>, StoreError>>;
    /// Tasks that are not ended: for the sweep that expires and times them out.
    fn live_tasks(&self) -> BoxFut<'_, Result<Vec<DeviceTask>, StoreError>>;
    /// Moves a task forward (or resends it), with an event; None if it may not move so.
    fn move_task(
        &self,
        id: &str,
        to: TaskState,
        change: TaskChange,
        now_ms: i64,
    ) -> BoxFut<'_, Result<Option<TaskMove>, StoreError>>;
    /// Makes a device's sent-but-unanswered tasks due now (the device was born again).
    fn resend_now(&self, device_id: &str) -> BoxFut<'_, Result<u64, StoreError>>;
}

pub(super) fn device_from_row(r: &impl Cols) -> Result<Device, StoreError> {
    let caps: String = r.col("capabilities")?;
    let telemetry: Option<String> = r.col("telemetry")?;
    Ok(Device {
        id: r.col("id")?,
        kind: r.col("kind")?,
        state: r.col("state")?,
        detail: r.col("detail")?,
        boot_id: r.col("boot_id")?,
        version: r.col("version")?,
        capabilities: serde_json::from_str(&caps).map_err(|e| corrupt("device capabilities", e))?,
        status_ms: r.col("status_ms")?,
        last_seen_ms: r.col("last_seen_ms")?,
        telemetry: telemetry
            .map(|t| serde_json::from_str(&t))
            .transpose()
            .map_err(|e| corrupt("device telemetry", e))?,
        telemetry_seq: r.col("telemetry_seq")?,
        telemetry_ms: r.col("telemetry_ms")?,
        spool_dropped: r.col("spool_dropped")?,
    })
}

pub(super) fn task_from_row(r: &impl Cols) -> Result<DeviceTask, StoreError> {
    let kind: String = r.col("kind")?;
    let state: String = r.col("state")?;
    let params: String = r.col("params")?;
    Ok(DeviceTask {
        id: r.col("id")?,
        device_id: r.col("device_id")?,
        kind: kind.parse().map_err(|e| corrupt("task kind", e))?,
        asset: r.col("asset")?,
        params: serde_json::from_str(&params).map_err(|e| corrupt("task params", e))?,
        state: state.parse().map_err(|e| corrupt("task state", e))?,
        sends: r.col("sends")?,
        next_send_ms: r.col("next_send_ms")?,
        deadline_ms: r.col("deadline_ms")?,
        created_by: r.col("created_by")?,
        created_ms: r.col("created_ms")?,
        updated_ms: r.col("updated_ms")?,
        detail: r.col("detail")?,
        output_asset: r.col("output_asset")?,
    })
}

pub(super) fn task_event_from_row(r: &impl Cols) -> Result<TaskEvent, StoreError> {
    let state: String = r.col("state")?;
    Ok(TaskEvent {
        n: r.col("n")?,
        state: state.parse().map_err(|e| corrupt("task event state", e))?,
        at_ms: r.col("at_ms")?,
        detail: r.col("detail")?,
    })
}

/// `impl FleetStore` for a store with a group-commit `write` and a `read` pool.
macro_rules! fleet_impl {
    ($store:ty, $conn:ty) => {
        impl $crate::store::fleet::FleetStore for $store {
            fn announce(
                &self,
                id: &str,
                s: kiln_protocol::fleet::DeviceStatus,
                now_ms: i64,
            ) -> BoxFut<'_, Result<Option<$crate::store::fleet::Device>, StoreError>> {
                let id = id.to_owned();
                Box::pin(self.write(Box::new(move |c| {
                    Box::pin(async move {
                        let before = sqlx::query("SELECT * FROM devices WHERE id = $1").bind(&id).fetch_optional(&mut *c).await?;
                        let before = before.as_ref().map($crate::store::fleet::device_from_row).transpose()?;
                        let caps = serde_json::to_string(&s.capabilities).unwrap_or_else(|_| "[]".into());
                        sqlx::query(
                            "INSERT INTO devices (id, kind, state, detail, boot_id, version, capabilities, status_ms, last_seen_ms) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO UPDATE SET \
                             kind = excluded.kind, state = excluded.state, detail = excluded.detail, boot_id = excluded.boot_id, \
                             version = excluded.version, capabilities = excluded.capabilities, status_ms = excluded.status_ms, \
                             last_seen_ms = excluded.last_seen_ms",
                        )
                        .bind(&id)
                        .bind(s.kind.as_str())
                        .bind(s.state.as_str())
                        .bind(&s.detail)
                        .bind(&s.boot_id)
                        .bind(&s.version)
                        .bind(caps)
                        .bind(s.at_ms)
                        .bind(now_ms)
                        .execute(&mut *c)
                        .await?;
                        Ok(before)
                    })
                })))
            }

            fn telemetry(
                &self,
                id: &str,
                t: kiln_protocol::fleet::Telemetry,
                now_ms: i64,
            ) -> BoxFut<'_, Result<bool, StoreError>> {
                let id = id.to_owned();
                Box::pin(self.write(Box::new(move |c| {
                    Box::pin(async move {
                        let readings = serde_json::to_string(&t.readings).unwrap_or_else(|_| "{}".into());
                        let seq = i64::try_from(t.seq).unwrap_or(i64::MAX);
                        let dropped = i64::try_from(t.spool_dropped).unwrap_or(i64::MAX);
                        let done = sqlx::query(
                            "UPDATE devices SET telemetry = $2, telemetry_seq = $3, telemetry_ms = $4, spool_dropped = $5, \
                             last_seen_ms = $4 WHERE id = $1 AND telemetry_seq < $3",
                        )
                        .bind(&id)
                        .bind(readings)
                        .bind(seq)
                        .bind(now_ms)
                        .bind(dropped)
                        .execute(&mut *c)
                        .await?;
                        Ok(done.rows_affected() > 0)
                    })
                })))
            }

            fn devices(&self) -> BoxFut<'_, Result<Vec<$crate::store::fleet::Device>, StoreError>> {
                Box::pin(async move {
                    let rows = sqlx::query("SELECT * FROM devices ORDER BY id").fetch_all(&self.read).await?;
                    rows.iter().map($crate::store::fleet::device_from_row).collect()
                })
            }

            fn device(&self, id: &str) -> BoxFut<'_, Result<Option<$crate::store::fleet::Device>, StoreError>> {
                let id = id.to_owned();
                Box::pin(async move {
                    let row = sqlx::query("SELECT * FROM devices WHERE id = $1").bind(id).fetch_optional(&self.read).await?;
                    row.as_ref().map($crate::store::fleet::device_from_row).transpose()
                })
            }

            fn create_task(
                &self,
                t: $crate::store::fleet::NewTask,
                now_ms: i64,
            ) -> BoxFut<'_, Result<$crate::store::fleet::DeviceTask, StoreError>> {
                Box::pin(self.write(Box::new(move |c| {
                    Box::pin(async move {
                        let params = serde_json::to_string(&t.params).unwrap_or_else(|_| "{}".into());
                        let row = sqlx::query(
                            "INSERT INTO device_tasks (id, device_id, kind, asset, params, state, deadline_ms, created_by, \
                             created_ms, updated_ms) VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, $8, $8) RETURNING *",
                        )
                        .bind(&t.id)
                        .bind(&t.device_id)
                        .bind(t.kind.as_str())
                        .bind(&t.asset)
                        .bind(params)
                        .bind(t.deadline_ms)
                        .bind(&t.created_by)
                        .bind(now_ms)
                        .fetch_one(&mut *c)
                        .await?;
                        sqlx::query("INSERT INTO device_task_events (task_id, n, state, at_ms) VALUES ($1, 1, 'queued', $2)")
                            .bind(&t.id)
                            .bind(now_ms)
                            .execute(&mut *c)
                            .await?;
                        $crate::store::fleet::task_from_row(&row)
                    })
                })))
            }

            fn task(
                &self,
                id: &str,
            ) -> BoxFut<'_, Result<Option<$crate::store::fleet::TaskWithEvents>, StoreError>> {
                let id = id.to_owned();
                Box::pin(async move {
                    let Some(task) = $crate::store::fleet::FleetStore::task_row(self, &id).await? else {
                        return Ok(None);
                    };
                    let events = sqlx::query("SELECT * FROM device_task_events WHERE task_id = $1 ORDER BY n")
                        .bind(&id)
                        .fetch_all(&self.read)
                        .await?;
                    let events = events.iter().map($crate::store::fleet::task_event_from_row).collect::<Result<_, _>>()?;
                    Ok(Some((task, events)))
                })
            }

            fn task_row(&self, id: &str) -> BoxFut<'_, Result<Option<$crate::store::fleet::DeviceTask>, StoreError>> {
                let id = id.to_owned();
                Box::pin(async move {
                    let row =
                        sqlx::query("SELECT * FROM device_tasks WHERE id = $1").bind(&id).fetch_optional(&self.read).await?;
                    row.as_ref().map($crate::store::fleet::task_from_row).transpose()
                })
            }

            fn tasks(
                &self,
                device: Option<String>,
                state: Option<$crate::store::fleet::TaskState>,
                limit: u32,
            ) -> BoxFut<'_, Result<Vec<$crate::store::fleet::DeviceTask>, StoreError>> {
                Box::pin(async move {
                    let rows = sqlx::query(
                        "SELECT * FROM device_tasks WHERE (CAST($1 AS TEXT) IS NULL OR device_id = $1) \
                         AND (CAST($2 AS TEXT) IS NULL OR state = $2) ORDER BY created_ms DESC, id DESC LIMIT $3",
                    )
                    .bind(device)
                    .bind(state.map(|s| s.as_str()))
                    .bind(i64::from(limit.max(1)))
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter().map($crate::store::fleet::task_from_row).collect()
                })
            }

            fn due_tasks(
                &self,
                now_ms: i64,
                limit: u32,
            ) -> BoxFut<'_, Result<Vec<$crate::store::fleet::DeviceTask>, StoreError>> {
                Box::pin(async move {
                    let rows = sqlx::query(
                        "SELECT t.* FROM device_tasks t JOIN devices d ON d.id = t.device_id \
                         WHERE (t.state = 'queued' OR (t.state = 'sent' AND t.next_send_ms <= $1)) \
                         AND t.deadline_ms > $1 AND d.state <> 'offline' ORDER BY t.created_ms LIMIT $2",
                    )
                    .bind(now_ms)
                    .bind(i64::from(limit.max(1)))
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter().map($crate::store::fleet::task_from_row).collect()
                })
            }

            fn live_tasks(&self) -> BoxFut<'_, Result<Vec<$crate::store::fleet::DeviceTask>, StoreError>> {
                Box::pin(async move {
                    let rows = sqlx::query(
                        "SELECT * FROM device_tasks WHERE state IN ('queued', 'sent', 'accepted', 'running') ORDER BY created_ms",
                    )
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter().map($crate::store::fleet::task_from_row).collect()
                })
            }

            fn move_task(
                &self,
                id: &str,
                to: $crate::store::fleet::TaskState,
                change: $crate::store::fleet::TaskChange,
                now_ms: i64,
            ) -> BoxFut<'_, Result<Option<$crate::store::fleet::TaskMove>, StoreError>> {
                let id = id.to_owned();
                Box::pin(self.write(Box::new(move |c| {
                    Box::pin(async move {
                        let Some(row) =
                            sqlx::query("SELECT * FROM device_tasks WHERE id = $1").bind(&id).fetch_optional(&mut *c).await?
                        else {
                            return Ok(None);
                        };
                        let before = $crate::store::fleet::task_from_row(&row)?;
                        if !before.state.may_move_to(to) {
                            return Ok(None);
                        }
                        let sent = i64::from(to == $crate::store::fleet::TaskState::Sent);
                        let row = sqlx::query(
                            "UPDATE device_tasks SET state = $2, updated_ms = $3, sends = sends + $4, \
                             next_send_ms = COALESCE($5, next_send_ms), detail = COALESCE($6, detail), \
                             output_asset = COALESCE($7, output_asset) WHERE id = $1 RETURNING *",
                        )
                        .bind(&id)
                        .bind(to.as_str())
                        .bind(now_ms)
                        .bind(sent)
                        .bind(change.next_send_ms)
                        .bind(&change.detail)
                        .bind(&change.output_asset)
                        .fetch_one(&mut *c)
                        .await?;
                        sqlx::query(
                            "INSERT INTO device_task_events (task_id, n, state, at_ms, detail) \
                             SELECT $1, COALESCE(MAX(n), 0) + 1, $2, $3, $4 FROM device_task_events WHERE task_id = $1",
                        )
                        .bind(&id)
                        .bind(to.as_str())
                        .bind(now_ms)
                        .bind(&change.detail)
                        .execute(&mut *c)
                        .await?;
                        Ok(Some($crate::store::fleet::TaskMove {
                            task: $crate::store::fleet::task_from_row(&row)?,
                            from: before.state,
                        }))
                    })
                })))
            }

            fn resend_now(&self, device_id: &str) -> BoxFut<'_, Result<u64, StoreError>> {
                let id = device_id.to_owned();
                Box::pin(self.write(Box::new(move |c| {
                    Box::pin(async move {
                        let done = sqlx::query("UPDATE device_tasks SET next_send_ms = 0 WHERE device_id = $1 AND state = 'sent'")
                            .bind(&id)
                            .execute(&mut *c)
                            .await?;
                        Ok(done.rows_affected())
                    })
                })))
            }
        }
    };
}

pub(super) use fleet_impl;
