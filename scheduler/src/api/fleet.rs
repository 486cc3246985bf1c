//! The fleet's part of the API: devices and their tasks. It is the operator's alone: a client
//! sees its own jobs and assets, not the studio's devices, their tasks or their photos; creating
//! a task (a physical act: print, photograph, show, light) needs an operator's token too.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_protocol::fleet::valid_hash;
use kiln_protocol::{api, now_ms};
use serde::Deserialize;
use utoipa::IntoParams;

use super::callers::Operator;
use super::{ApiError, AppState, body_bytes, query_error};
use crate::store::fleet::{Device, DeviceTask, NewTask, TaskEvent, TaskState};
use crate::time::rfc3339;

/// The longest deadline a task may be given.
const MAX_DEADLINE_SECONDS: u64 = 7 * 24 * 3600;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/{id}", get(get_device))
        .route("/v1/devices/{id}/tasks", post(create_task))
        .route("/v1/tasks", get(list_tasks))
        .route("/v1/tasks/{id}", get(get_task))
}

/// A device as the API shows it; `full` adds its latest readings.
pub fn device_view(d: &Device, now: i64, full: bool) -> api::Device {
    api::Device {
        id: d.id.clone(),
        kind: d.kind.clone(),
        state: d.state.clone(),
        detail: d.detail.clone(),
        boot_id: d.boot_id.clone(),
        version: d.version.clone(),
        capabilities: d.capabilities.clone(),
        last_seen_at: rfc3339(d.last_seen_ms),
        telemetry_seq: d.telemetry_seq,
        telemetry_at: d.telemetry_ms.map(rfc3339),
        seconds_since_telemetry: d.telemetry_ms.map(|at| (now - at).max(0) as f64 / 1000.0),
        spool_dropped: d.spool_dropped,
        telemetry: full.then(|| d.telemetry.clone().unwrap_or(serde_json::Value::Null)),
        links: api::DeviceLinks { self_: format!("/v1/devices/{}", d.id), tasks: format!("/v1/tasks?device={}", d.id) },
    }
}

/// A task as the API shows it, with its events when given.
pub fn task_view(t: &DeviceTask, events: Option<&[TaskEvent]>) -> api::Task {
    api::Task {
        id: t.id.clone(),
        device_id: t.device_id.clone(),
        kind: t.kind,
        state: t.state,
        params: t.params.clone(),
        sends: t.sends,
        deadline_at: rfc3339(t.deadline_ms),
        created_by: t.created_by.clone(),
        created_at: rfc3339(t.created_ms),
        updated_at: rfc3339(t.updated_ms),
        asset: t.asset.clone(),
        detail: t.detail.clone(),
        output_asset: t.output_asset.clone(),
        events: events.map(|events| {
            let event =
                |e: &TaskEvent| api::TaskEvent { state: e.state, at: rfc3339(e.at_ms), detail: e.detail.clone() };
            events.iter().map(event).collect()
        }),
        links: api::TaskLinks {
            self_: format!("/v1/tasks/{}", t.id),
            device: format!("/v1/devices/{}", t.device_id),
            output_asset: t.output_asset.as_ref().map(|a| format!("/v1/assets/{a}")),
        },
    }
}

/// `GET /v1/devices`: every device the fleet bridge has heard of, with its state.
#[utoipa::path(get, path = "/v1/devices", tag = "fleet",
    responses(
        (status = 200, body = api::Devices),
        super::openapi::OperatorOnly,
    ))]
pub(super) async fn list_devices(State(s): State<AppState>, _: Operator) -> Result<Json<api::Devices>, ApiError> {
    let now = now_ms();
    let devices = s.store.devices().await?.iter().map(|d| device_view(d, now, false)).collect();
    Ok(Json(api::Devices { devices }))
}

/// `GET /v1/devices/{id}`: one device with its latest telemetry.
#[utoipa::path(get, path = "/v1/devices/{id}", tag = "fleet",
    params(("id" = String, Path, description = "The device's id")),
    responses(
        (status = 200, body = api::Device),
        super::openapi::OperatorOnly,
        (status = 404, description = "No such device", body = api::ErrorBody),
    ))]
pub(super) async fn get_device(
    State(s): State<AppState>,
    _: Operator,
    Path(id): Path<String>,
) -> Result<Json<api::Device>, ApiError> {
    let d = s.store.device(&id).await?.ok_or_else(|| ApiError::not_found(format!("no device {id:?}")))?;
    Ok(Json(device_view(&d, now_ms(), true)))
}

/// `POST /v1/devices/{id}/tasks` (operator): a task for a device. 201 with the task, queued; the
/// bridge sends it when the device is online.
#[utoipa::path(post, path = "/v1/devices/{id}/tasks", tag = "fleet",
    params(("id" = String, Path, description = "The device's id")), request_body = api::NewTask,
    responses(
        (status = 201, body = api::Task),
        (status = 400, description = "A kind the device does not do, a missing or unknown asset, or a deadline outside 1 s to a week", body = api::ErrorBody),
        super::openapi::OperatorOnly,
        (status = 404, description = "No such device", body = api::ErrorBody),
        (status = 409, description = "The fleet bridge is off", body = api::ErrorBody),
        (status = 413, body = api::ErrorBody),
    ))]
pub(super) async fn create_task(
    State(s): State<AppState>,
    Operator(who): Operator,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if s.cfg.fleet.mqtt_url.is_none() {
        return Err(ApiError::conflict("the fleet bridge is off: set scheduler.fleet.mqtt_url (KILN_MQTT_URL)"));
    }
    let body = body_bytes(&s, body)?;
    let b: api::NewTask = ApiError::parse_json(&body)?;
    let device = s.store.device(&id).await?.ok_or_else(|| ApiError::not_found(format!("no device {id:?}")))?;
    if device.kind != b.kind.device_kind().as_str() {
        return Err(ApiError::invalid(
            "kind",
            format!("device {id:?} is a {}; it cannot do a {} task", device.kind, b.kind),
        ));
    }
    match (&b.asset, b.kind.needs_asset()) {
        (None, true) => return Err(ApiError::invalid("asset", format!("a {} task needs an asset (its hash)", b.kind))),
        (Some(a), _) if !valid_hash(a) => return Err(ApiError::invalid("asset", "must be 64 hex digits (BLAKE3)")),
        (Some(a), _) if !s.has_asset(a).await? => {
            return Err(ApiError::invalid("asset", format!("no asset {a} is stored here")));
        }
        _ => {}
    }
    let secs = b.deadline_seconds.unwrap_or(s.cfg.fleet.default_deadline_seconds);
    if secs == 0 || secs > MAX_DEADLINE_SECONDS {
        return Err(ApiError::invalid("deadline_seconds", format!("must be from 1 to {MAX_DEADLINE_SECONDS}")));
    }
    let now = now_ms();
    let rand = crate::auth::os_random::<8>().map_err(|e| ApiError::internal(&e))?;
    let task = NewTask {
        id: format!("t-{:016x}", u64::from_le_bytes(rand)),
        device_id: id,
        kind: b.kind,
        asset: b.asset,
        params: b.params,
        deadline_ms: now + i64::try_from(secs * 1000).unwrap_or(i64::MAX),
        created_by: who.name,
    };
    let t = s.store.create_task(task, now).await?;
    tracing::info!(task = t.id, device = t.device_id, kind = %t.kind, by = t.created_by, "device task created");
    s.fleet_wake.notify_one();
    Ok((StatusCode::CREATED, Json(task_view(&t, None))).into_response())
}

/// `GET /v1/tasks`' query.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct TaskListParams {
    /// Only this device's tasks.
    device: Option<String>,
    /// Only tasks in this state.
    #[param(value_type = Option<TaskState>)]
    state: Option<String>,
    /// How many, 1 to `scheduler.limits.max_page` (500); default 100.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

/// `GET /v1/tasks?device=&state=&limit=`: tasks, newest first.
#[utoipa::path(get, path = "/v1/tasks", tag = "fleet", params(TaskListParams),
    responses(
        (status = 200, body = api::Tasks),
        (status = 400, description = "An unknown state, or `limit` outside 1..=max_page", body = api::ErrorBody),
        super::openapi::OperatorOnly,
    ))]
pub(super) async fn list_tasks(
    State(s): State<AppState>,
    _: Operator,
    q: Result<Query<TaskListParams>, QueryRejection>,
) -> Result<Json<api::Tasks>, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let state =
        q.state.as_deref().map(str::parse::<TaskState>).transpose().map_err(|e| ApiError::invalid("state", e))?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > s.cfg.limits.max_page {
        return Err(ApiError::invalid("limit", format!("must be from 1 to {}", s.cfg.limits.max_page)));
    }
    let tasks = s.store.tasks(q.device, state, limit).await?.iter().map(|t| task_view(t, None)).collect();
    Ok(Json(api::Tasks { tasks }))
}

/// `GET /v1/tasks/{id}`: one task with every state it went through.
#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "fleet",
    params(("id" = String, Path, description = "The task's id")),
    responses(
        (status = 200, body = api::Task),
        super::openapi::OperatorOnly,
        (status = 404, description = "No such task", body = api::ErrorBody),
    ))]
pub(super) async fn get_task(
    State(s): State<AppState>,
    _: Operator,
    Path(id): Path<String>,
) -> Result<Json<api::Task>, ApiError> {
    let (t, events) = s.store.task(&id).await?.ok_or_else(|| ApiError::not_found(format!("no task {id:?}")))?;
    Ok(Json(task_view(&t, Some(&events))))
}
