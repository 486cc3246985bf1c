//! The asset calls. Reading an asset, its thumbnail or its provenance is for those it was made
//! for: anyone with `scheduler.public_assets`; else an operator, a client with a job that has
//! it (its render, or a cached answer), a device token whose devices have a task on it. Uploads
//! name what they are for: a worker's render of a job it holds (`?job=&attempt=`), a device's
//! photo for a live task of its own (`?task=`), or (an operator) anything. The scheduler makes
//! each uploaded PNG's thumbnail itself rather than take one. A caller who may not upload at all
//! is answered from the request head, before its body is read ([`unread`]).

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_protocol::api;
use serde::Deserialize;
use serde_json::Value;
use utoipa::IntoParams;

use super::callers::{caller, uploader};
use super::{ApiError, AppState, body_bytes, openapi, query_error};
use crate::auth::{Caller, Role};
use crate::scheduler::Scheduler;

/// `GET /v1/assets/{hash}`'s query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct AssetParams {
    /// `full` (the default) or `thumb` for the thumbnail (long side at most 256 px; an image no
    /// larger is its own).
    variant: Option<String>,
}

/// What an upload is for (`PUT /v1/assets/{hash}` and its provenance).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct UploadParams {
    /// The job whose render this is: a worker must name it, with `attempt`, while that attempt
    /// is open (handed out, not superseded, the job not ended).
    job: Option<String>,
    /// The attempt of `job`.
    attempt: Option<u32>,
    /// The device task whose output (a photo) this is: a device must name it, a live task of one
    /// of its devices. Not for provenance.
    task: Option<String>,
}

pub(super) fn check_hash(hash: &str) -> Result<(), ApiError> {
    if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(ApiError::invalid("hash", "expected 64 lower-case hex digits (BLAKE3)"))
    }
}

/// Whether the caller may read asset `hash` (see the module's note). An asset the caller may not
/// see is a 404, as one that is not there: whose a hash is is not for every token to learn.
pub(super) async fn may_read(s: &Scheduler, headers: &HeaderMap, hash: &str) -> Result<(), ApiError> {
    if s.cfg.public_assets {
        return Ok(());
    }
    let who = caller(s, &axum::http::Method::GET, headers)?;
    let readable = match who.role {
        Role::Operator => true,
        Role::Worker => return Err(ApiError::forbidden("a worker token reads no assets; it uploads those it renders")),
        Role::Client => s.store.asset_readable(hash, Some(who.name.clone()), Vec::new()).await?,
        Role::Device => s.store.asset_readable(hash, None, who.devices.clone()).await?,
    };
    if readable {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("hash: no asset {hash} that the token {:?} may read", who.name)))
    }
}

/// What an upload is for, checked before its body is read.
enum Purpose {
    /// An operator's upload that names nothing.
    Any,
    /// A render of this job (its id, width and height), at an open attempt.
    Render(String, u32, u32),
    /// A device task's output.
    Output,
}

/// What `who`'s upload is for, from its query: a worker must name an open attempt of a job, a
/// device a live task of one of its devices; an operator may name either, or nothing.
async fn purpose(s: &Scheduler, who: &Caller, q: UploadParams) -> Result<Purpose, ApiError> {
    match (&q.job, &q.task) {
        (Some(_), Some(_)) => return Err(ApiError::invalid("task", "name a job or a task, not both")),
        (None, None) if who.role == Role::Worker => {
            return Err(ApiError::invalid(
                "job",
                "a worker uploads only the render of a job it holds: name it with ?job=ID&attempt=N",
            ));
        }
        (None, None) if who.role == Role::Device => {
            return Err(ApiError::invalid(
                "task",
                "a device uploads only what a task of its devices made: name it with ?task=ID",
            ));
        }
        (Some(_), None) if who.role == Role::Device => {
            return Err(ApiError::invalid("job", "a device token uploads no renders; name its task with ?task=ID"));
        }
        (None, Some(_)) if who.role == Role::Worker => {
            return Err(ApiError::invalid("task", "a worker token uploads no device output; name its job"));
        }
        _ => {}
    }
    if let Some(id) = q.job {
        let Some(attempt) = q.attempt else {
            return Err(ApiError::invalid("attempt", "the attempt of the job is needed with job"));
        };
        let Some(job) = s.store.job(&id).await? else {
            return Err(ApiError::not_found(format!("job: no job {id}")));
        };
        crate::results::attempt_open(&job, attempt)
            .and_then(|()| match job.state.is_terminal() {
                true => Err(format!("job {id} has ended ({})", job.state)),
                false => Ok(()),
            })
            .map_err(|why| ApiError::conflict(format!("job: {why}; its render is not taken")))?;
        return Ok(Purpose::Render(job.id, job.request.width, job.request.out_rows()));
    }
    if q.attempt.is_some() {
        return Err(ApiError::invalid("attempt", "is only for an upload that names its job"));
    }
    let Some(id) = q.task else { return Ok(Purpose::Any) };
    let Some(task) = s.store.task_row(&id).await? else {
        return Err(ApiError::not_found(format!("task: no task {id}")));
    };
    if who.role == Role::Device && !who.devices.contains(&task.device_id) {
        return Err(ApiError::forbidden(format!(
            "task: task {id} is for the device {:?}, which the token {:?} does not serve",
            task.device_id, who.name
        )));
    }
    if task.state.is_terminal() {
        return Err(ApiError::conflict(format!("task: task {id} has ended ({}); its output is not taken", task.state)));
    }
    Ok(Purpose::Output)
}

/// A refusal sent before the request's body is read: the answer goes at once, with `Connection:
/// close`, while at most [`LINGER_BYTES`] of the body are read and dropped for at most
/// [`LINGER`] behind it (a lingering close, as nginx does), so that a sender still writing a
/// modest body hears the refusal rather than a reset. None of it is kept.
fn unread(e: ApiError, body: Body) -> Response {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(LINGER, discard(body.into_data_stream(), LINGER_BYTES)).await;
    });
    let mut r = e.into_response();
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// How much of a refused upload's body is read and dropped behind its refusal, at most.
const LINGER_BYTES: usize = 256 * 1024;
/// And for how long.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// `PUT /v1/assets/{hash}` (worker, device or operator token): stores an asset; the body must
/// hash to `{hash}` (BLAKE3). A worker's is the render of the job it names, a PNG of the job's
/// size; a device's is what a task of its devices made. The thumbnail is made here.
#[utoipa::path(put, path = "/v1/assets/{hash}", tag = "assets",
    params(("hash" = String, Path, description = "The BLAKE3 of the PNG, 64 lower-case hex digits"), UploadParams),
    request_body(content = Vec<u8>, content_type = "image/png"),
    responses(
        (status = 204, description = "Stored"),
        (status = 400, description = "The bytes do not hash to the path's BLAKE3, the hash is not 64 hex digits, the job or task is not named, or a render is not a readable PNG of its job's size", body = api::ErrorBody),
        openapi::UploaderOnly,
        (status = 404, description = "No such job or task", body = api::ErrorBody),
        (status = 409, description = "The job's attempt is not open, or the task has ended", body = api::ErrorBody),
        (status = 413, description = "Over `scheduler.limits.max_asset_bytes`", body = api::ErrorBody),
    ))]
pub(super) async fn put_asset(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(hash): Path<String>,
    q: Result<Query<UploadParams>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let who = match uploader(&s, &headers) {
        Ok(who) => who,
        Err(e) => return Ok(unread(e, body)),
    };
    let checked = match check_hash(&hash).and_then(|()| q.map_err(query_error)) {
        Ok(Query(q)) => purpose(&s, &who, q).await,
        Err(e) => Err(e),
    };
    let purpose = match checked {
        Ok(p) => p,
        Err(e) => {
            discard(body.into_data_stream(), s.cfg.limits.max_asset_bytes.saturating_mul(4)).await;
            return Err(e);
        }
    };
    // Streamed to a scratch file while hashed, so a print-sized PNG never sits in memory.
    let scratch = s.worker.store().scratch_path();
    let stored = async {
        let got = receive(body, &scratch, s.cfg.limits.max_asset_bytes).await?;
        if got != hash {
            return Err(ApiError::invalid("body", "the bytes do not hash to the asset's BLAKE3 in the path"));
        }
        let thumb = thumbnail(scratch.clone(), &purpose).await?;
        s.worker.store().import_file(&hash, scratch.clone(), thumb).await.map_err(|e| ApiError::internal(&e))
    };
    let result = stored.await;
    if scratch.exists() {
        let _ = tokio::fs::remove_file(&scratch).await;
    }
    result.map(|()| StatusCode::NO_CONTENT.into_response())
}

/// The thumbnail of the upload at `path`, made here (`None`: the image is its own, or is no PNG
/// this reads). A render must be a readable PNG of its job's size, or it is refused.
async fn thumbnail(path: std::path::PathBuf, purpose: &Purpose) -> Result<Option<Vec<u8>>, ApiError> {
    let size = match purpose {
        Purpose::Render(id, w, h) => Some((id.clone(), *w, *h)),
        Purpose::Any | Purpose::Output => None,
    };
    let made = tokio::task::spawn_blocking(move || {
        let Some((id, w, h)) = size else { return Ok(kiln_worker::render::thumbnail_of_png(&path).ok().flatten()) };
        match kiln_worker::assets::png_size(&path) {
            Ok(got) if got == (w, h) => {}
            Ok((gw, gh)) => return Err(format!("a {gw}×{gh} PNG; job {id} renders {w}×{h}")),
            Err(_) => return Err("not a PNG".to_owned()),
        }
        kiln_worker::render::thumbnail_of_png(&path)
    });
    made.await.map_err(|e| ApiError::internal(&e))?.map_err(|why| ApiError::invalid("body", why))
}

/// Reads and drops the rest of an upload, up to `left` more bytes: so the sender of a refused
/// upload hears the 4xx instead of a broken pipe, and does not take it for a fault worth retrying.
async fn discard(mut stream: axum::body::BodyDataStream, mut left: usize) {
    use futures_util::StreamExt;
    while let Some(Ok(chunk)) = stream.next().await {
        let Some(rest) = left.checked_sub(chunk.len()) else { return };
        left = rest;
    }
}

/// Writes an upload to `path` (not synced), counting it against `limit`; returns its BLAKE3.
async fn receive(body: Body, path: &std::path::Path, limit: usize) -> Result<String, ApiError> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::File::create(path).await.map_err(|e| ApiError::internal(&e))?;
    let mut hasher = blake3::Hasher::new();
    let (mut n, mut stream) = (0usize, body.into_data_stream());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid("body", format!("the upload broke off: {e}")))?;
        n += chunk.len();
        if n > limit {
            discard(stream, limit.saturating_mul(3)).await;
            return Err(ApiError::too_large(limit));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(|e| ApiError::internal(&e))?;
    }
    // Synced by the asset store as it moves the file in.
    file.flush().await.map_err(|e| ApiError::internal(&e))?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// `PUT /v1/assets/{hash}/provenance` (worker or operator token): an uploaded asset's
/// provenance; a worker names the job whose render it describes.
#[utoipa::path(put, path = "/v1/assets/{hash}/provenance", tag = "assets",
    params(("hash" = String, Path, description = "The asset's BLAKE3"), UploadParams),
    request_body(content = Object, description = "The provenance record; its `asset` is the hash in the path"),
    responses(
        (status = 204, description = "Stored"),
        (status = 400, description = "Not JSON, its `asset` is not the path's, or the job is not named", body = api::ErrorBody),
        openapi::UploaderOnly,
        (status = 404, description = "No such job", body = api::ErrorBody),
        (status = 409, description = "The job's attempt is not open", body = api::ErrorBody),
        (status = 413, body = api::ErrorBody),
    ))]
pub(super) async fn put_provenance(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(hash): Path<String>,
    q: Result<Query<UploadParams>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> Result<Response, ApiError> {
    let who = match uploader(&s, &headers) {
        Ok(who) if who.role == Role::Device => {
            let e = ApiError::forbidden("a device token uploads what its tasks make, not provenance");
            return Ok(unread(e, req.into_body()));
        }
        Ok(who) => who,
        Err(e) => return Ok(unread(e, req.into_body())),
    };
    check_hash(&hash)?;
    let Query(q) = q.map_err(query_error)?;
    if q.task.is_some() {
        return Err(ApiError::invalid("task", "provenance is a render's; name its job"));
    }
    purpose(&s, &who, q).await?;
    let body = body_bytes(&s, Bytes::from_request(req, &s).await)?;
    let v: Value = ApiError::parse_json(&body)?;
    if v.get("asset").and_then(Value::as_str) != Some(hash.as_str()) {
        return Err(ApiError::invalid("asset", "must equal the hash in the path"));
    }
    s.worker.store().import_provenance(&hash, body.to_vec()).await.map_err(|e| ApiError::internal(&e))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/assets/{hash}`: the PNG (or `?variant=thumb`), immutable, with its hash as ETag: a
/// file in the asset store, or a small PNG (its own thumbnail) kept with the asset's row.
#[utoipa::path(get, path = "/v1/assets/{hash}", tag = "assets",
    params(("hash" = String, Path, description = "The BLAKE3 of the PNG, 64 lower-case hex digits"), AssetParams,
        ("If-None-Match" = Option<String>, Header, description = "The ETag held: 304 when it is this one")),
    responses(
        (status = 200, description = "The PNG (immutable; ETag: its hash)", content_type = "image/png", body = Vec<u8>),
        (status = 304, description = "Not modified"),
        (status = 400, description = "Not 64 hex digits, or an unknown variant", body = api::ErrorBody),
        (status = 401, description = "No token, unless `scheduler.public_assets`", body = api::ErrorBody),
        (status = 403, description = "A worker token", body = api::ErrorBody),
        (status = 404, description = "No such asset, or not one this token may read", body = api::ErrorBody),
    ))]
pub(super) async fn asset(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(hash): Path<String>,
    q: Result<Query<AssetParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    check_hash(&hash)?;
    may_read(&s, &headers, &hash).await?;
    let Query(q) = q.map_err(query_error)?;
    let (path, etag) = match q.variant.as_deref() {
        None | Some("full") => (Some(s.worker.store().path(&hash)), format!("\"{hash}\"")),
        Some("thumb") => {
            let (store, h) = (s.worker.store().clone(), hash.clone());
            let found = tokio::task::spawn_blocking(move || store.thumbnail(&h)).await;
            (found.map_err(|e| ApiError::internal(&e))?, format!("\"{hash}.thumb\""))
        }
        Some(v) => return Err(ApiError::invalid("variant", format!("unknown variant {v:?}; expected full or thumb"))),
    };
    let file = match path {
        Some(path) => match tokio::fs::File::open(&path).await {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(ApiError::internal(&e)),
        },
        None => None,
    };
    let (len, body) = match file {
        Some(file) => {
            let len = file.metadata().await.map_err(|e| ApiError::internal(&e))?.len();
            (len, Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024)))
        }
        None => match s.store.asset_png(&hash).await? {
            Some(png) => (png.len() as u64, Body::from(png)),
            None => return Err(ApiError::not_found(format!("hash: no asset {hash}"))),
        },
    };
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag))
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    Ok((
        [
            (header::CONTENT_TYPE, "image/png".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable".to_owned()),
        ],
        body,
    )
        .into_response())
}

/// `GET /v1/assets/{hash}/provenance`: who asked, model and version, parameters, backend, timings.
#[utoipa::path(get, path = "/v1/assets/{hash}/provenance", tag = "assets",
    params(("hash" = String, Path, description = "The asset's BLAKE3")),
    responses(
        (status = 200, description = "The provenance record", body = Object),
        (status = 400, description = "Not 64 hex digits", body = api::ErrorBody),
        (status = 401, description = "No token, unless `scheduler.public_assets`", body = api::ErrorBody),
        (status = 403, description = "A worker token", body = api::ErrorBody),
        (status = 404, description = "No such asset, or not one this token may read", body = api::ErrorBody),
    ))]
pub(super) async fn provenance(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    check_hash(&hash)?;
    may_read(&s, &headers, &hash).await?;
    Ok(Json(provenance_record(&s, &hash).await?).into_response())
}

/// An asset's provenance: the worker's record, with who asked and the orders it served added.
pub(super) async fn provenance_record(
    s: &crate::scheduler::Scheduler,
    hash: &str,
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let Some(record) = s.asset_provenance(hash).await? else {
        return Err(ApiError::not_found(format!("hash: no asset {hash}")));
    };
    let mut record: serde_json::Map<String, Value> = match serde_json::from_slice(&record) {
        Ok(m) => m,
        Err(e) => return Err(ApiError::internal(&e)),
    };
    record.extend(crate::orders::provenance_of(s, hash).await?);
    Ok(record)
}

/// An asset's whole PNG, from its file or its row.
pub(super) async fn asset_bytes(s: &crate::scheduler::Scheduler, hash: &str) -> Result<Vec<u8>, ApiError> {
    match tokio::fs::read(s.worker.store().path(hash)).await {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            s.store.asset_png(hash).await?.ok_or_else(|| ApiError::not_found(format!("hash: no asset {hash}")))
        }
        Err(e) => Err(ApiError::internal(&e)),
    }
}
