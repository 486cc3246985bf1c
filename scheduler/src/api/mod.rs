//! The HTTP API under `/v1` (axum), plus `/healthz` and `/metrics`. The fixed points other tools
//! rely on: `POST /v1/jobs` answers 201 with the job (`id`, `state`); `GET /v1/jobs/{id}` carries
//! `asset` once succeeded; `GET /v1/assets/{hash}` answers the PNG; `GET /metrics` the Prometheus
//! text. The whole surface is described by the OpenAPI document derived from the handlers and
//! their types ([`openapi`]), served at `/v1/openapi.json`.

mod assets;
mod callers;
mod console;
pub mod error;
pub mod fleet;
mod gauges;
pub mod openapi;
mod orders;
pub mod serve;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures_util::Stream;
use kiln_protocol::{JobRequest, JobState, RenderRequest, Tier, api};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use utoipa::IntoParams;

use assets::{asset, provenance, put_asset, put_provenance};
use callers::{Operator, Person};
pub use error::ApiError;

use crate::auth::{Caller, Role};
use crate::scheduler::{Live, Scheduler, Watch};
use crate::store::{Admission, Job, ListQuery};
use crate::time::{parse_time, rfc3339};

type AppState = Arc<Scheduler>;

/// The API's router.
pub fn router(s: AppState) -> Router {
    let body_limit = s.cfg.limits.max_body_bytes;
    Router::new()
        .route("/v1/jobs", post(submit).get(list))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/events", get(events))
        .route(
            "/v1/assets/{hash}",
            get(asset).put(put_asset).layer(DefaultBodyLimit::max(s.cfg.limits.max_asset_bytes)),
        )
        .route("/v1/assets/{hash}/provenance", get(provenance).put(put_provenance))
        .route("/v1/workers", get(workers))
        .route("/v1/workers/{id}/resume", post(resume_worker))
        .route("/v1/workers/{id}/drain", post(drain_worker))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{name}", delete(revoke_token))
        .route("/v1/openapi.json", get(openapi_json))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(fleet::routes())
        .merge(orders::routes())
        .merge(console::routes())
        .fallback(|| async { ApiError::not_found("no such endpoint; see /v1/openapi.json") })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(s.clone(), request_timeout))
        .with_state(s)
}

/// Bounds how long a call may take, its body included: `scheduler.limits.request_timeout_seconds`,
/// `upload_timeout_seconds` for an asset upload, and a long poll's longest wait on top. An event
/// stream's handler returns as its stream starts, so the stream itself runs on. A call cut off is
/// answered 408, and its connection closed (its body may be half read).
async fn request_timeout(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let l = &s.cfg.limits;
    let upload = req.method() == axum::http::Method::PUT && req.uri().path().starts_with("/v1/assets/");
    let (key, mut secs) = match upload {
        true => ("upload_timeout_seconds", l.upload_timeout_seconds),
        false => ("request_timeout_seconds", l.request_timeout_seconds),
    };
    if req.uri().query().is_some_and(|q| q.split('&').any(|p| p.starts_with("wait="))) {
        secs += MAX_WAIT_SECONDS;
    }
    match tokio::time::timeout(Duration::from_secs(secs), next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            let mut r = ApiError::timed_out(secs, key).into_response();
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}

/// A job as the API shows it, written straight from the job: building a JSON tree first cost an
/// allocation and a copy per field on every answer. The keys come in the order a JSON object of
/// them would print in (sorted), so the bytes are those of that tree.
pub struct JobView(pub Job);

impl Serialize for JobView {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let (j, r) = (&self.0, &self.0.request);
        let mut m = ser.serialize_map(None)?;
        entry_if(&mut m, "asset", j.asset.as_deref())?;
        m.serialize_entry("attempt", &j.attempt)?;
        m.serialize_entry("cache_key", &j.cache_key)?;
        m.serialize_entry("client", &j.client)?;
        m.serialize_entry("created_at", &rfc3339(j.created_ms))?;
        m.serialize_entry("dither", &r.dither)?;
        entry_if(&mut m, "error", j.error.as_deref())?;
        entry_if(&mut m, "finished_at", j.finished_ms.map(rfc3339).as_deref())?;
        entry_if(&mut m, "follows", j.follows.as_deref())?;
        m.serialize_entry("height", &r.height)?;
        m.serialize_entry("id", &j.id)?;
        entry_if(&mut m, "idempotency_key", j.idempotency_key.as_deref())?;
        m.serialize_entry("links", &Links { id: &j.id, asset: j.asset.as_deref() })?;
        m.serialize_entry("model", &r.model)?;
        m.serialize_entry("prompt", &r.prompt)?;
        m.serialize_entry("samples", &r.samples)?;
        m.serialize_entry("seed", &r.seed)?;
        entry_if(&mut m, "started_at", j.started_ms.map(rfc3339).as_deref())?;
        m.serialize_entry("state", &j.state)?;
        m.serialize_entry("tier", &j.tier)?;
        entry_if(&mut m, "tile", r.tile.as_ref())?;
        m.serialize_entry("updated_at", &rfc3339(j.updated_ms))?;
        m.serialize_entry("watermark", &r.watermark)?;
        m.serialize_entry("width", &r.width)?;
        m.end()
    }
}

/// Writes `key` only when it has a value (a field a job has only once it moves on).
fn entry_if<M: SerializeMap, T: Serialize + ?Sized>(m: &mut M, key: &str, value: Option<&T>) -> Result<(), M::Error> {
    value.map_or(Ok(()), |v| m.serialize_entry(key, v))
}

/// A job's links: itself, its events, and once it has one, its asset's.
struct Links<'a> {
    id: &'a str,
    asset: Option<&'a str>,
}

impl Serialize for Links<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut m = ser.serialize_map(None)?;
        let asset = |m: &mut S::SerializeMap, key: &str, after: &str| match self.asset {
            Some(a) => m.serialize_entry(key, &format_args!("/v1/assets/{a}{after}")),
            None => Ok(()),
        };
        asset(&mut m, "asset", "")?;
        m.serialize_entry("events", &format_args!("/v1/jobs/{}/events", self.id))?;
        asset(&mut m, "provenance", "/provenance")?;
        m.serialize_entry("self", &format_args!("/v1/jobs/{}", self.id))?;
        asset(&mut m, "thumbnail", "?variant=thumb")?;
        m.end()
    }
}

/// A batch submit's answer ([`api::JobBatch`], written from the jobs).
#[derive(Serialize)]
struct Batch {
    jobs: Vec<JobView>,
}

/// A page of `GET /v1/jobs` ([`api::JobPage`], written from the jobs), with the cursor of the next.
#[derive(Serialize)]
struct Listing {
    jobs: Vec<JobView>,
    next: Option<String>,
}

/// A request body, or the error naming the size limit (or what else went wrong reading it).
fn body_bytes(s: &Scheduler, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::too_large(s.cfg.limits.max_body_bytes)
        }
        e => ApiError::invalid("body", e.body_text()),
    })
}

/// `POST /v1/jobs`: one job (a JSON object) or several (an array). 201 with the job(s); a repeat
/// of an idempotency key answers 200 with the first job. With `?wait=SECONDS`, the answer comes
/// when every job in the request has ended or the wait is up, with the jobs as they are then: a
/// batch is submitted and awaited in one round trip.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs",
    params(WaitParams, ("Idempotency-Key" = Option<String>, Header, description = "For a single job: a repeat with the same key answers 200 with the first job.")),
    request_body(content = openapi::SubmitBody, description = "One job, or an array of up to `scheduler.limits.max_jobs_per_request` (100)"),
    responses(
        (status = 201, description = "Created: the job, or `{jobs}` for an array, as they are (after the wait, if any)", body = openapi::Submitted),
        (status = 200, description = "The idempotency key matched an earlier job: that job", body = api::Job),
        (status = 400, description = "A field breaks a limit, names an unknown tier or model, or `wait` is outside 0..=60", body = api::ErrorBody),
        openapi::PersonOnly,
        (status = 413, description = "The body is over `scheduler.limits.max_body_bytes`", body = api::ErrorBody),
        (status = 429, description = "What it asks would pass the token's budget: the message says the budget, what is used and when it resets; nothing of it is queued", body = api::ErrorBody),
    ))]
async fn submit(
    State(s): State<AppState>,
    Person(who): Person,
    headers: HeaderMap,
    q: Result<Query<WaitParams>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let wait = wait_for(q.wait)?;
    let body = body_bytes(&s, body)?;
    let value: Value = ApiError::parse_json(&body)?;
    let header_key = headers.get("idempotency-key").map(|v| {
        v.to_str()
            .map(str::to_owned)
            .map_err(|_| ApiError::invalid("idempotency-key", "the header must be visible ASCII"))
    });
    match value {
        Value::Array(items) => {
            let limit = s.cfg.limits.max_jobs_per_request;
            if items.len() > limit {
                return Err(ApiError::invalid(
                    "jobs",
                    format!(
                        "{} jobs exceeds the limit of {limit} per request (scheduler.limits.max_jobs_per_request)",
                        items.len()
                    ),
                ));
            }
            if header_key.is_some() {
                return Err(ApiError::invalid(
                    "idempotency-key",
                    "the header is for a single job; give each job its own idempotency_key",
                ));
            }
            // Validate all before admitting any, so a bad item does not leave half a batch.
            let mut resolved = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                let req: JobRequest = kiln_protocol::decode_json_value(item)
                    .map_err(|e| ApiError::from(e).within(&format!("jobs[{i}].")))?;
                let request = s.resolve(&req).map_err(|e| ApiError::invalid_msg(format!("jobs[{i}].{e}")))?;
                resolved.push((request, req.idempotency_key));
            }
            // Nothing of a batch starts unless all of it fits the budget.
            let requests: Vec<RenderRequest> = resolved.iter().map(|(r, _)| r.clone()).collect();
            let budget = s.within_budget(&who, &requests).await?;
            // Submitted together, the batch shares the store's writes (one transaction).
            let admitted = futures_util::future::join_all(
                resolved.into_iter().map(|(r, key)| s.submit_watching(&who, r, key, wait.is_some())),
            )
            .await;
            drop(budget);
            // On an error the watches drop, and with them their waiters.
            let (mut jobs, watches): (Vec<Job>, Vec<Option<Watch>>) =
                admitted.into_iter().map(|a| a.map(|(job, _, watch)| (job, watch))).collect::<Result<_, _>>()?;
            if let Some(wait) = wait {
                s.wait_submitted(&who, &mut jobs, watches.into_iter().flatten().collect(), wait).await?;
            }
            let jobs = jobs.into_iter().map(JobView).collect();
            Ok((StatusCode::CREATED, Json(Batch { jobs })).into_response())
        }
        Value::Object(_) => {
            let mut req: JobRequest = kiln_protocol::decode_json_value(value)?;
            if let Some(k) = header_key {
                req.idempotency_key = Some(k?);
            }
            let request = s.resolve(&req)?;
            let budget = s.within_budget(&who, std::slice::from_ref(&request)).await?;
            let (mut job, admission, watch) =
                s.submit_watching(&who, request, req.idempotency_key, wait.is_some()).await?;
            drop(budget);
            if let Some(wait) = wait {
                s.wait_submitted(&who, std::slice::from_mut(&mut job), watch.into_iter().collect(), wait).await?;
            }
            let status = if admission == Admission::Existing { StatusCode::OK } else { StatusCode::CREATED };
            let location = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id));
            let mut resp = (status, Json(JobView(job))).into_response();
            if let Ok(loc) = location {
                resp.headers_mut().insert(header::LOCATION, loc);
            }
            Ok(resp)
        }
        _ => Err(ApiError::invalid("body", "expected a JSON object (one job) or an array of them")),
    }
}

/// A time query parameter: RFC 3339 or unix seconds, as unix ms.
pub(super) fn time_param(field: &str, v: Option<&str>) -> Result<Option<i64>, ApiError> {
    v.map(|t| parse_time(t).ok_or_else(|| ApiError::invalid(field, format!("{t:?} is not RFC 3339 or unix seconds"))))
        .transpose()
}

/// Whose records a `client` query parameter asks for: any token's (or all) for an operator, the
/// caller's own for a client, which may not name another (`what` says what it may do instead).
pub(super) fn scoped_client(who: &Caller, asked: Option<String>, what: &str) -> Result<Option<String>, ApiError> {
    match (who.role, asked) {
        (Role::Operator, c) => Ok(c),
        (_, Some(c)) if c != who.name => Err(ApiError::forbidden(format!("client: a client token {what}"))),
        _ => Ok(Some(who.name.clone())),
    }
}

/// `GET /v1/jobs`' query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListParams {
    /// Only jobs in this state.
    #[param(value_type = Option<JobState>)]
    state: Option<String>,
    /// Only jobs of this tier.
    #[param(value_type = Option<Tier>)]
    tier: Option<String>,
    /// Only jobs created at or after: RFC 3339 with its offset, or unix seconds.
    since: Option<String>,
    /// Only jobs created before: RFC 3339 with its offset, or unix seconds.
    until: Option<String>,
    /// Only this client's jobs (an operator's filter; a client sees only its own).
    client: Option<String>,
    /// Page size, 1 to `scheduler.limits.max_page` (500); default 50.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// The `next` of the previous page.
    cursor: Option<String>,
}

/// A 400 for a query string that does not decode, naming the parameter where axum does
/// (`limit: invalid digit found in string`), else `query`.
fn query_error(e: axum::extract::rejection::QueryRejection) -> ApiError {
    let text = e.body_text();
    let detail = text.strip_prefix("Failed to deserialize query string: ").unwrap_or(&text);
    match detail.split_once(": ") {
        Some((field, message)) if !field.is_empty() && !field.contains(' ') => ApiError::invalid(field, message),
        _ => ApiError::invalid("query", detail),
    }
}

/// `GET /v1/jobs`: newest first, filtered, a page at a time (`next` is the following page's cursor).
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(ListParams),
    responses(
        (status = 200, body = api::JobPage),
        (status = 400, description = "A filter that does not parse, or `limit` outside 1..=max_page", body = api::ErrorBody),
        (status = 401, body = api::ErrorBody),
        (status = 403, description = "A worker or device token, or a client asking for another's jobs", body = api::ErrorBody),
    ))]
async fn list(
    State(s): State<AppState>,
    Person(who): Person,
    q: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Listing>, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let time = |field: &str, v: &Option<String>| time_param(field, v.as_deref());
    let max = s.cfg.limits.max_page;
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > max {
        return Err(ApiError::invalid("limit", format!("{limit} is outside 1..={max} (scheduler.limits.max_page)")));
    }
    let client = scoped_client(&who, q.client, "lists only its own jobs")?;
    let query = ListQuery {
        state: q
            .state
            .as_deref()
            .map(str::parse::<JobState>)
            .transpose()
            .map_err(|e| ApiError::invalid_msg(e.to_string()))?,
        tier: q
            .tier
            .as_deref()
            .map(str::parse::<Tier>)
            .transpose()
            .map_err(|e| ApiError::invalid_msg(e.to_string()))?,
        since_ms: time("since", &q.since)?,
        until_ms: time("until", &q.until)?,
        client,
        limit,
        before_seq: q
            .cursor
            .as_deref()
            .map(|c| c.parse::<i64>().map_err(|_| ApiError::invalid("cursor", "use the `next` of the previous page")))
            .transpose()?,
    };
    let page = s.store.list(query).await?;
    let jobs = page.jobs.into_iter().map(JobView).collect();
    Ok(Json(Listing { jobs, next: page.next.map(|n| n.to_string()) }))
}

/// The query of `GET /v1/jobs/{id}` and `POST /v1/jobs`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct WaitParams {
    /// Seconds to wait for the job(s) to end before answering (long poll), 0 to 60; the answer
    /// carries the job(s) as they are then.
    #[param(minimum = 0, maximum = 60)]
    wait: Option<f64>,
}

/// `?wait=SECONDS` as a duration, or the error naming its range.
/// The longest `?wait=` a long poll may ask, seconds.
const MAX_WAIT_SECONDS: u64 = 60;

fn wait_for(wait: Option<f64>) -> Result<Option<Duration>, ApiError> {
    match wait {
        Some(w) if !(0.0..=MAX_WAIT_SECONDS as f64).contains(&w) => {
            Err(ApiError::invalid("wait", format!("{w} is outside 0..={MAX_WAIT_SECONDS} seconds")))
        }
        w => Ok(w.map(Duration::from_secs_f64)),
    }
}

/// `GET /v1/jobs/{id}`; with `?wait=SECONDS`, answers when the job ends or the wait is up.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job's id"), WaitParams),
    responses(
        (status = 200, body = api::Job),
        (status = 400, description = "`wait` outside 0..=60, or an unknown query field", body = api::ErrorBody),
        openapi::PersonOnly,
        (status = 404, description = "No such job, or another client's", body = api::ErrorBody),
    ))]
async fn get_job(
    State(s): State<AppState>,
    Person(who): Person,
    Path(id): Path<String>,
    q: Result<Query<WaitParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobView>, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let job = match wait_for(q.wait)? {
        Some(w) => s.wait_terminal(&who, std::slice::from_ref(&id), w).await?.remove(&id),
        None => s.job(&who, &id).await?,
    };
    job.map(|j| Json(JobView(j))).ok_or_else(|| ApiError::not_found(format!("id: no job {id:?}")))
}

/// `POST /v1/jobs/{id}/cancel`: a client may cancel only its own jobs. A cancelled job's
/// attached jobs pass to the oldest of them.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job as it now is (an ended job stays as it was)", body = api::Job),
        openapi::PersonOnly,
        (status = 404, description = "No such job, or another client's", body = api::ErrorBody),
    ))]
async fn cancel(
    State(s): State<AppState>,
    Person(who): Person,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    match s.cancel(&who, &id).await? {
        Some(j) => Ok(Json(JobView(j))),
        None => Err(ApiError::not_found(format!("id: no job {id:?}"))),
    }
}

/// `GET /v1/jobs/{id}/events`: Server-Sent Events. The job's stored events first (after
/// `Last-Event-ID` when given), then live ones and render progress, until it ends.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(("id" = String, Path, description = "The job's id"),
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event (its `seq`)")),
    responses(
        (status = 200, content_type = "text/event-stream", body = openapi::EventData,
            description = "Server-Sent Events until the job ends: `event: state` (id: its `seq`, data: a JobEvent) for each transition, stored ones first; `event: progress` (data: a JobProgress) as a render's rows finish"),
        openapi::PersonOnly,
        (status = 404, description = "No such job, or another client's", body = api::ErrorBody),
        (status = 429, description = "The token holds `scheduler.limits.max_event_streams_per_token` streams open already", body = api::ErrorBody),
    ))]
async fn events(
    State(s): State<AppState>,
    Person(who): Person,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let held = s.event_streams.open(&who.name, s.cfg.limits.max_event_streams_per_token).map_err(|n| {
        ApiError::too_many(format!(
            "events: the token {:?} has {n} event streams open already \
             (scheduler.limits.max_event_streams_per_token); close one, or follow jobs with ?wait=",
            who.name
        ))
    })?;
    // Subscribe before reading the log, so nothing falls between the two.
    let mut rx = s.subscribe();
    if s.job(&who, &id).await?.is_none() {
        return Err(ApiError::not_found(format!("id: no job {id:?}")));
    }
    let after = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
    let (tx, out) = tokio::sync::mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let send_event = |e: &crate::store::Event| {
            SseEvent::default().event("state").id(e.seq.to_string()).json_data(e).unwrap_or_default()
        };
        let (mut last, mut done, mut from_log) = (after, false, true);
        loop {
            // At the start, and whenever the live feed fell behind, the log has what was missed.
            if from_log {
                from_log = false;
                match s.store.events(&id, last).await {
                    Ok(events) => {
                        for e in &events {
                            last = e.seq;
                            done |= e.state.is_terminal();
                            if tx.send(send_event(e)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => tracing::warn!(job_id = id, error = %e, "events: cannot read the log"),
                }
            }
            if done {
                return;
            }
            // A client gone ends the feed at once, not at the job's next event.
            let received = tokio::select! {
                r = rx.recv() => r,
                () = tx.closed() => return,
            };
            let live = match received {
                Ok(l) => l,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    from_log = true;
                    continue;
                }
                Err(_) => return,
            };
            if live.job_id() != id {
                continue;
            }
            let msg = match &*live {
                Live::Event(e) if e.seq > last => {
                    last = e.seq;
                    done = e.state.is_terminal();
                    send_event(e)
                }
                Live::Event(_) => continue,
                Live::Progress { rows_done, rows, tiles, .. } => {
                    let p = api::JobProgress {
                        job_id: id.clone(),
                        rows_done: *rows_done,
                        rows: *rows,
                        tiles_done: tiles.map(|t| t.0),
                        tiles: tiles.map(|t| t.1),
                    };
                    SseEvent::default().event("progress").json_data(p).unwrap_or_default()
                }
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    });
    // The stream holds its place among the token's until the connection drops it.
    let stream = futures_util::stream::unfold((out, held), |(mut out, held)| async move {
        out.recv().await.map(|e| (Ok(e), (out, held)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// `GET /v1/workers` (operator): the workers heard from, with their state (`active`,
/// `draining`, `drained` with the reason, `lost`: no heartbeat for
/// `scheduler.broker.lost_after_seconds`, or three of its beats where that is longer), and every
/// drained worker, heard from or not.
#[utoipa::path(get, path = "/v1/workers", tag = "workers",
    responses(
        (status = 200, body = api::Workers),
        openapi::OperatorOnly,
    ))]
async fn workers(State(s): State<AppState>, _: Operator) -> Result<Json<api::Workers>, ApiError> {
    let drained = s.store.drained().await?;
    let workers = s.registry.list(kiln_protocol::now_ms()).into_iter().map(api::Worker::from).collect();
    Ok(Json(api::Workers { workers, drained }))
}

/// `POST /v1/workers/{id}/resume` (operator): a drained worker may take work again.
#[utoipa::path(post, path = "/v1/workers/{id}/resume", tag = "workers",
    params(("id" = String, Path, description = "The worker's id")),
    responses(
        (status = 200, body = api::Resumed),
        openapi::OperatorOnly,
        (status = 409, description = "The worker is not drained", body = api::ErrorBody),
    ))]
async fn resume_worker(
    State(s): State<AppState>,
    _: Operator,
    Path(id): Path<String>,
) -> Result<Json<api::Resumed>, ApiError> {
    resume(&s, &id).await?;
    Ok(Json(api::Resumed { worker_id: id, state: "resumed".into() }))
}

/// Lets drained worker `id` work again, at the operator's word.
pub(super) async fn resume(s: &Scheduler, id: &str) -> Result<(), ApiError> {
    if !s.store.set_drained(id, None, kiln_protocol::now_ms()).await? {
        return Err(ApiError::conflict(format!("worker {id:?} is not drained")));
    }
    tracing::info!(worker = id, "resumed by the operator");
    s.registry.resume(id);
    Ok(())
}

/// `POST /v1/workers/{id}/drain` (operator): a worker heard from takes no new work; what it has
/// in hand it finishes. It stays drained, across restarts, until resumed.
#[utoipa::path(post, path = "/v1/workers/{id}/drain", tag = "workers", request_body = api::Drain,
    params(("id" = String, Path, description = "The worker's id")),
    responses(
        (status = 200, body = api::Resumed),
        (status = 400, description = "A body that is not a drain", body = api::ErrorBody),
        openapi::OperatorOnly,
        (status = 404, description = "No worker of that id has been heard from", body = api::ErrorBody),
        (status = 409, description = "The worker is drained already", body = api::ErrorBody),
    ))]
async fn drain_worker(
    State(s): State<AppState>,
    _: Operator,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<api::Resumed>, ApiError> {
    let body = body_bytes(&s, body)?;
    let d: api::Drain = if body.is_empty() { api::Drain::default() } else { ApiError::parse_json(&body)? };
    drain(&s, &id, d.reason.as_deref()).await?;
    Ok(Json(api::Resumed { worker_id: id, state: "drained".into() }))
}

/// Drains worker `id` at the operator's word, `why` kept as its reason.
pub(super) async fn drain(s: &Scheduler, id: &str, why: Option<&str>) -> Result<(), ApiError> {
    let now = kiln_protocol::now_ms();
    if !s.registry.list(now).iter().any(|w| w.heartbeat.worker_id == id) {
        return Err(ApiError::not_found(format!("id: no worker {id:?} has been heard from")));
    }
    let reason = match why.map(str::trim).filter(|w| !w.is_empty()) {
        Some(w) => format!("drained by the operator: {w}"),
        None => "drained by the operator".to_owned(),
    };
    if !s.store.set_drained(id, Some(&reason), now).await? {
        return Err(ApiError::conflict(format!("worker {id:?} is drained already")));
    }
    tracing::info!(worker = id, reason, "drained by the operator");
    s.registry.drain(crate::store::DrainedWorker { worker_id: id.to_owned(), reason, at_ms: now });
    Ok(())
}

/// `POST /v1/tokens` (operator): a new token; its secret is shown this once.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = api::NewToken,
    responses(
        (status = 201, body = api::TokenCreated),
        (status = 400, description = "A bad name, role or device", body = api::ErrorBody),
        openapi::OperatorOnly,
        (status = 409, description = "The name is taken, or a device is served by another token", body = api::ErrorBody),
    ))]
async fn create_token(
    State(s): State<AppState>,
    _: Operator,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(&s, body)?;
    let req: api::NewToken = ApiError::parse_json(&body)?;
    if req.name.is_empty() || req.name.len() > 100 || req.name.chars().any(char::is_control) {
        return Err(ApiError::invalid("name", "must be 1 to 100 printable characters"));
    }
    /// Ten years: past that, no expiry at all is the honest setting.
    const MAX_EXPIRY_S: u64 = 10 * 365 * 24 * 3600;
    /// A year of one device, day and night: a budget past it limits nothing.
    const MAX_BUDGET_S: u64 = 366 * 24 * 3600;
    let expires_ms = match req.expires_in_seconds {
        None => None,
        Some(n) if (1..=MAX_EXPIRY_S).contains(&n) => Some(kiln_protocol::now_ms() + n as i64 * 1000),
        Some(n) => {
            return Err(ApiError::invalid(
                "expires_in_seconds",
                format!("{n} is outside 1..={MAX_EXPIRY_S} (ten years)"),
            ));
        }
    };
    let budget = match (req.budget_seconds, req.budget_period.as_deref()) {
        (None, None) => None,
        (None, Some(_)) => return Err(ApiError::invalid("budget_period", "needs budget_seconds")),
        (Some(seconds), period) => {
            if !(1..=MAX_BUDGET_S).contains(&seconds) {
                return Err(ApiError::invalid("budget_seconds", format!("{seconds} is outside 1..={MAX_BUDGET_S}")));
            }
            let period = period.unwrap_or("day").parse().map_err(|e| ApiError::invalid("budget_period", e))?;
            Some(crate::costs::Budget { seconds, period })
        }
    };
    let secret = s.create_token(&req.name, req.role, &req.devices, expires_ms, budget).await?;
    let token = secret.expose().to_owned();
    let made = api::TokenCreated {
        name: req.name,
        role: req.role,
        token,
        devices: req.devices,
        expires_ms,
        budget_seconds: budget.map(|b| b.seconds),
        budget_period: budget.map(|b| b.period.to_string()),
    };
    Ok((StatusCode::CREATED, Json(made)).into_response())
}

/// `GET /v1/tokens` (operator): the tokens not revoked, oldest first; never their secrets.
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    responses((status = 200, body = api::Tokens), openapi::OperatorOnly))]
async fn list_tokens(State(s): State<AppState>, _: Operator) -> Result<Json<api::Tokens>, ApiError> {
    let now = kiln_protocol::now_ms();
    let tokens = s
        .list_tokens()
        .await?
        .into_iter()
        .map(|t| api::TokenInfo {
            expired: t.expires_ms.is_some_and(|e| now >= e),
            name: t.name,
            role: t.role,
            devices: t.devices,
            created_ms: t.created_ms,
            expires_ms: t.expires_ms,
            budget_seconds: t.budget.map(|b| b.seconds),
            budget_period: t.budget.map(|b| b.period.to_string()),
        })
        .collect();
    Ok(Json(api::Tokens { tokens }))
}

/// `DELETE /v1/tokens/{name}` (operator): revokes a token. It is refused at once on this node
/// and within a second on every other node of the farm; its name is free again.
#[utoipa::path(delete, path = "/v1/tokens/{name}", tag = "tokens",
    params(("name" = String, Path, description = "The token's name")),
    responses(
        (status = 204, description = "Revoked"),
        openapi::OperatorOnly,
        (status = 404, description = "No token has that name", body = api::ErrorBody),
    ))]
async fn revoke_token(
    State(s): State<AppState>,
    _: Operator,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !s.revoke_token(&name).await? {
        return Err(ApiError::not_found(format!("name: no token named {name:?}")));
    }
    tracing::info!(token = name, "token revoked by the operator");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/openapi.json`: this API's OpenAPI document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
async fn openapi_json() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], openapi::document())
}

/// `GET /healthz`: 200 while the store answers, with a warning for each tier whose jobs wait
/// with no active worker to take them.
#[utoipa::path(get, path = "/healthz", tag = "meta", security(()),
    responses((status = 200, body = api::Health), (status = 503, description = "The database does not answer", body = api::Health)))]
async fn healthz(State(s): State<AppState>) -> Response {
    match s.store.ping().await {
        Ok(_) => {
            let warnings = s
                .registry
                .serving(kiln_protocol::now_ms())
                .into_iter()
                .filter(|(_, workers)| *workers == 0)
                .filter_map(|(tier, _)| {
                    let waiting: i64 = [JobState::Queued, JobState::Dispatched]
                        .iter()
                        .map(|st| s.metrics.jobs.with_label_values(&[tier.as_str(), st.as_str()]).get())
                        .sum();
                    (waiting > 0)
                        .then(|| format!("{waiting} {tier} job(s) waiting and no active worker serves the {tier} tier"))
                })
                .collect();
            Json(api::Health { status: "ok".into(), error: None, warnings }).into_response()
        }
        Err(e) => {
            let h = api::Health { status: "unavailable".into(), error: Some(e.to_string()), warnings: vec![] };
            (StatusCode::SERVICE_UNAVAILABLE, Json(h)).into_response()
        }
    }
}

/// `GET /metrics`: the scheduler's and the workers' metrics in the Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "meta", security(()),
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String)))]
async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    gauges::sample(&s).await;
    let mut text = s.metrics.encode();
    text.push_str(&s.worker.metrics.encode());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(ended: bool) -> Job {
        let request = kiln_protocol::RenderRequest::resolve(
            "cppn",
            "a \"quoted\" kiln",
            7,
            Tier::Final,
            Some(64),
            None,
            None,
            &Default::default(),
        )
        .unwrap();
        Job {
            id: "j1".into(),
            state: if ended { JobState::Succeeded } else { JobState::Queued },
            tier: Tier::Final,
            request,
            cache_key: "ck".into(),
            client: "ana".into(),
            idempotency_key: ended.then(|| "once".into()),
            follows: ended.then(|| "j0".into()),
            attempt: u32::from(ended),
            asset: ended.then(|| "ab12".into()),
            error: ended.then(|| "a hiccup".into()),
            created_ms: 1_000,
            updated_ms: 2_000,
            started_ms: ended.then_some(1_500),
            finished_ms: ended.then_some(2_000),
        }
    }

    /// A job's JSON is written field by field; it is the object a tree of its fields makes, to
    /// the byte (the keys sorted as such an object prints them), with and without the fields a
    /// job has only once it moves on.
    #[test]
    fn a_job_is_shown_as_the_object_of_its_fields() {
        for ended in [false, true] {
            let j = job(ended);
            let r = &j.request;
            let mut want = json!({
                "id": j.id, "state": j.state, "tier": j.tier, "model": r.model, "prompt": r.prompt,
                "seed": r.seed, "width": r.width, "height": r.height, "samples": r.samples,
                "watermark": r.watermark, "dither": r.dither, "cache_key": j.cache_key, "client": j.client,
                "attempt": j.attempt, "created_at": "1970-01-01T00:00:01.000Z", "updated_at": "1970-01-01T00:00:02.000Z",
                "links": { "self": "/v1/jobs/j1", "events": "/v1/jobs/j1/events" },
            });
            if ended {
                want["asset"] = "ab12".into();
                want["error"] = "a hiccup".into();
                want["follows"] = "j0".into();
                want["idempotency_key"] = "once".into();
                want["started_at"] = "1970-01-01T00:00:01.500Z".into();
                want["finished_at"] = "1970-01-01T00:00:02.000Z".into();
                want["links"]["asset"] = "/v1/assets/ab12".into();
                want["links"]["thumbnail"] = "/v1/assets/ab12?variant=thumb".into();
                want["links"]["provenance"] = "/v1/assets/ab12/provenance".into();
            }
            let got = serde_json::to_string(&JobView(j)).unwrap();
            assert_eq!(got, want.to_string());
        }
    }

    /// The answer is written from the job for speed, but it is the protocol's [`api::Job`] to
    /// the byte: it parses as one, and one writes the same bytes back.
    #[test]
    fn a_job_as_written_is_the_protocols_job() {
        for ended in [false, true] {
            let written = serde_json::to_string(&JobView(job(ended))).unwrap();
            let parsed: api::Job = serde_json::from_str(&written).unwrap();
            assert_eq!(serde_json::to_string(&parsed).unwrap(), written);
        }
    }
}
