//! The fleet's part of the API: devices and their tasks. Reading needs an operator or client
//! token; creating a task (a physical act: print, photograph, show, light) needs an operator's.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_protocol::fleet::{TaskKind, valid_hash};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{ApiError, AppState, body_bytes, person, query_error};
use crate::auth::Role;
use crate::store::fleet::{Device, DeviceTask, NewTask, TaskEvent, TaskState};
use kiln_protocol::now_ms;

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
pub fn device_json(d: &Device, now: i64, full: bool) -> Value {
    let mut v = json!({
        "id": d.id,
        "kind": d.kind,
        "state": d.state,
        "boot_id": d.boot_id,
        "version": d.version,
        "capabilities": d.capabilities,
        "last_seen_at": rfc3339(d.last_seen_ms),
        "telemetry_seq": d.telemetry_seq,
        "spool_dropped": d.spool_dropped,
        "links": { "self": format!("/v1/devices/{}", d.id), "tasks": format!("/v1/tasks?device={}", d.id) },
    });
    if let Some(detail) = &d.detail {
        v["detail"] = detail.clone().into();
    }
    if let Some(at) = d.telemetry_ms {
        v["telemetry_at"] = rfc3339(at).into();
        v["seconds_since_telemetry"] = ((now - at).max(0) as f64 / 1000.0).into();
    }
    if full {
        v["telemetry"] = d.telemetry.clone().unwrap_or(Value::Null);
    }
    v
}

/// A task as the API shows it, with its events when given.
pub fn task_json(t: &DeviceTask, events: Option<&[TaskEvent]>) -> Value {
    let mut v = json!({
        "id": t.id,
        "device_id": t.device_id,
        "kind": t.kind,
        "state": t.state,
        "params": t.params,
        "sends": t.sends,
        "deadline_at": rfc3339(t.deadline_ms),
        "created_by": t.created_by,
        "created_at": rfc3339(t.created_ms),
        "updated_at": rfc3339(t.updated_ms),
        "links": { "self": format!("/v1/tasks/{}", t.id), "device": format!("/v1/devices/{}", t.device_id) },
    });
    if let Some(a) = &t.asset {
        v["asset"] = a.clone().into();
    }
    if let Some(d) = &t.detail {
        v["detail"] = d.clone().into();
    }
    if let Some(a) = &t.output_asset {
        v["output_asset"] = a.clone().into();
        v["links"]["output_asset"] = format!("/v1/assets/{a}").into();
    }
    if let Some(events) = events {
        v["events"] = events
            .iter()
            .map(|e| json!({ "state": e.state, "at": rfc3339(e.at_ms), "detail": e.detail }))
            .collect::<Vec<_>>()
            .into();
    }
    v
}

/// `GET /v1/devices`: every device the fleet bridge has heard of, with its state.
async fn list_devices(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    person(&s, &headers)?;
    let now = now_ms();
    let devices: Vec<Value> = s.store.devices().await?.iter().map(|d| device_json(d, now, false)).collect();
    Ok(Json(json!({ "devices": devices })).into_response())
}

/// `GET /v1/devices/{id}`: one device with its latest telemetry.
async fn get_device(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    person(&s, &headers)?;
    let d = s.store.device(&id).await?.ok_or_else(|| ApiError::not_found(format!("no device {id:?}")))?;
    Ok(Json(device_json(&d, now_ms(), true)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTaskBody {
    kind: TaskKind,
    #[serde(default)]
    asset: Option<String>,
    #[serde(default)]
    params: Map<String, Value>,
    #[serde(default)]
    deadline_seconds: Option<u64>,
}

/// `POST /v1/devices/{id}/tasks` (operator): a task for a device. 201 with the task, queued; the
/// bridge sends it when the device is online.
async fn create_task(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = person(&s, &headers)?;
    if who.role != Role::Operator {
        return Err(ApiError::forbidden("physical tasks need an operator token"));
    }
    if s.cfg.fleet.mqtt_url.is_none() {
        return Err(ApiError::conflict("the fleet bridge is off: set scheduler.fleet.mqtt_url (KILN_MQTT_URL)"));
    }
    let body = body_bytes(&s, body)?;
    let b: NewTaskBody = serde_json::from_slice(&body).map_err(|e| ApiError::from_json(&e))?;
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
    Ok((StatusCode::CREATED, Json(task_json(&t, None))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskListParams {
    device: Option<String>,
    state: Option<String>,
    limit: Option<u32>,
}

/// `GET /v1/tasks?device=&state=&limit=`: tasks, newest first.
async fn list_tasks(
    State(s): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<TaskListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    person(&s, &headers)?;
    let Query(q) = q.map_err(query_error)?;
    let state =
        q.state.as_deref().map(str::parse::<TaskState>).transpose().map_err(|e| ApiError::invalid("state", e))?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > s.cfg.limits.max_page {
        return Err(ApiError::invalid("limit", format!("must be from 1 to {}", s.cfg.limits.max_page)));
    }
    let tasks: Vec<Value> = s.store.tasks(q.device, state, limit).await?.iter().map(|t| task_json(t, None)).collect();
    Ok(Json(json!({ "tasks": tasks })).into_response())
}

/// `GET /v1/tasks/{id}`: one task with every state it went through.
async fn get_task(State(s): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    person(&s, &headers)?;
    let (t, events) = s.store.task(&id).await?.ok_or_else(|| ApiError::not_found(format!("no task {id:?}")))?;
    Ok(Json(task_json(&t, Some(&events))).into_response())
}
