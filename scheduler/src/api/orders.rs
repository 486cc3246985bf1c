//! Orders, approvals, incidents and usage: the studio's calls. An order runs a plan
//! (`gallery-print`) through [`crate::orders`]; an approval is decided here; an incident is what
//! needs the operator; usage is what renders cost, against the tokens' budgets.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kiln_protocol::api;
use serde::Deserialize;
use utoipa::IntoParams;

use super::callers::{Operator, Person};
use super::{ApiError, AppState, body_bytes, query_error, scoped_client, time_param};
use crate::orders::{self, OrderError};
use crate::store::orders::OrderQuery;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/orders", post(create_order).get(list_orders))
        .route("/v1/orders/{id}", get(get_order))
        .route("/v1/orders/{id}/cancel", post(cancel_order))
        .route("/v1/approvals", get(list_approvals))
        .route("/v1/approvals/{id}", post(decide))
        .route("/v1/incidents", get(list_incidents))
        .route("/v1/incidents/{id}", get(get_incident).post(act_on_incident))
        .route("/v1/usage", get(usage))
}

impl From<OrderError> for ApiError {
    fn from(e: OrderError) -> Self {
        match e {
            OrderError::Invalid(m) => ApiError::invalid_msg(m),
            OrderError::NotFound(m) => ApiError::not_found(m),
            OrderError::Conflict(m) => ApiError::conflict(m),
            OrderError::OverBudget(o) => o.into(),
            OrderError::Store(s) => s.into(),
        }
    }
}

/// `POST /v1/orders`' query.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct PlaceParams {
    /// Check the order and say what it would cost (`200` with the estimate), placing nothing.
    dry_run: Option<bool>,
}

/// `POST /v1/orders`: places an order; it starts at once (its previews are submitted). With
/// `dry_run=true`, says what it would cost instead.
#[utoipa::path(post, path = "/v1/orders", tag = "orders", request_body = api::NewOrder, params(PlaceParams),
    responses(
        (status = 201, description = "The order as placed", body = api::Order),
        (status = 200, description = "`dry_run`: what it would cost; nothing is placed", body = api::OrderEstimate),
        (status = 400, description = "A field that does not check (the message names it)", body = api::ErrorBody),
        super::openapi::PersonOnly,
        (status = 429, description = "Its renders would pass the token's budget: the message says the budget, what is used and when it resets; nothing is placed", body = api::ErrorBody),
    ))]
pub(super) async fn create_order(
    State(s): State<AppState>,
    Person(who): Person,
    q: Result<Query<PlaceParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let body = body_bytes(&s, body)?;
    let req: api::NewOrder = ApiError::parse_json(&body)?;
    if q.dry_run == Some(true) {
        return Ok(Json(orders::estimate(&s, &req)?).into_response());
    }
    let id = orders::create(&s, &who, req).await?;
    let order =
        orders::view(&s, &who, &id, false).await?.ok_or_else(|| ApiError::not_found(format!("no order {id}")))?;
    Ok((StatusCode::CREATED, Json(order)).into_response())
}

/// `GET /v1/orders`' query.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct OrderListParams {
    /// Only orders in this state (`running`, `awaiting_approval`, `succeeded`, `failed`, `cancelled`).
    state: Option<String>,
    /// How many, 1 to `scheduler.limits.max_page` (500); default 50.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// The `next` of the previous page.
    cursor: Option<String>,
}

const ORDER_STATES: [&str; 5] = ["running", "awaiting_approval", "succeeded", "failed", "cancelled"];

/// `GET /v1/orders`: newest first, a page at a time; a client sees its own.
#[utoipa::path(get, path = "/v1/orders", tag = "orders", params(OrderListParams),
    responses(
        (status = 200, body = api::OrderPage),
        (status = 400, description = "An unknown state, a bad cursor, or `limit` outside 1..=max_page", body = api::ErrorBody),
        super::openapi::PersonOnly,
    ))]
pub(super) async fn list_orders(
    State(s): State<AppState>,
    Person(who): Person,
    q: Result<Query<OrderListParams>, QueryRejection>,
) -> Result<Json<api::OrderPage>, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    if let Some(state) = q.state.as_deref().filter(|st| !ORDER_STATES.contains(st)) {
        return Err(ApiError::invalid("state", format!("{state:?} is not one of {}", ORDER_STATES.join(", "))));
    }
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > s.cfg.limits.max_page {
        return Err(ApiError::invalid("limit", format!("must be from 1 to {}", s.cfg.limits.max_page)));
    }
    let before = match q.cursor.as_deref() {
        None => None,
        Some(c) => {
            let parsed = c.split_once('.').and_then(|(ms, id)| Some((ms.parse::<i64>().ok()?, id.to_owned())));
            Some(parsed.ok_or_else(|| ApiError::invalid("cursor", "not a cursor this API gave"))?)
        }
    };
    let client = (who.role != crate::auth::Role::Operator).then(|| who.name.clone());
    let rows = s.store.orders(OrderQuery { state: q.state, client, limit, before }).await?;
    let next =
        (rows.len() == limit as usize).then(|| rows.last().map(|r| format!("{}.{}", r.created_ms, r.id))).flatten();
    let orders = rows.iter().map(orders::order_view).collect::<Result<_, _>>()?;
    Ok(Json(api::OrderPage { orders, next }))
}

/// `GET /v1/orders/{id}`: one order with its steps, approval, outputs and every event.
#[utoipa::path(get, path = "/v1/orders/{id}", tag = "orders",
    params(("id" = String, Path, description = "The order's id")),
    responses(
        (status = 200, body = api::Order),
        super::openapi::PersonOnly,
        (status = 404, description = "No such order, or another client's", body = api::ErrorBody),
    ))]
pub(super) async fn get_order(
    State(s): State<AppState>,
    Person(who): Person,
    Path(id): Path<String>,
) -> Result<Json<api::Order>, ApiError> {
    let order = orders::view(&s, &who, &id, true).await?;
    order.map(Json).ok_or_else(|| ApiError::not_found(format!("id: no order {id:?}")))
}

/// `POST /v1/orders/{id}/cancel`: at whatever step; its live renders are cancelled and the
/// steps after it skipped.
#[utoipa::path(post, path = "/v1/orders/{id}/cancel", tag = "orders",
    params(("id" = String, Path, description = "The order's id")),
    responses(
        (status = 200, description = "The order, cancelled", body = api::Order),
        super::openapi::PersonOnly,
        (status = 404, description = "No such order, or another client's", body = api::ErrorBody),
        (status = 409, description = "The order has ended", body = api::ErrorBody),
    ))]
pub(super) async fn cancel_order(
    State(s): State<AppState>,
    Person(who): Person,
    Path(id): Path<String>,
) -> Result<Json<api::Order>, ApiError> {
    Ok(Json(orders::cancel(&s, &who, &id).await?))
}

/// `GET /v1/approvals`' query.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct ApprovalParams {
    /// `pending` (the default; the only state listed: a decided approval is in its order).
    state: Option<String>,
}

/// `GET /v1/approvals?state=pending`: approvals waiting for a decision, oldest first, each with
/// its options' seeds and assets (their thumbnails side by side).
#[utoipa::path(get, path = "/v1/approvals", tag = "orders", params(ApprovalParams),
    responses(
        (status = 200, body = api::Approvals),
        (status = 400, description = "A state other than pending", body = api::ErrorBody),
        super::openapi::PersonOnly,
    ))]
pub(super) async fn list_approvals(
    State(s): State<AppState>,
    Person(who): Person,
    q: Result<Query<ApprovalParams>, QueryRejection>,
) -> Result<Json<api::Approvals>, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    if let Some(state) = q.state.as_deref().filter(|st| *st != "pending") {
        return Err(ApiError::invalid("state", format!("{state:?}: only pending approvals are listed")));
    }
    Ok(Json(api::Approvals { approvals: orders::pending_approvals(&s, &who).await? }))
}

/// `POST /v1/approvals/{id}`: `{"decision":"approve","option":N}` or
/// `{"decision":"reject","reason":"…"}`. Who decided, when and why is kept with the order.
#[utoipa::path(post, path = "/v1/approvals/{id}", tag = "orders", request_body = api::Decision,
    params(("id" = String, Path, description = "The approval's id")),
    responses(
        (status = 200, description = "The order, as the decision left it (the conductor goes on from there)", body = api::Order),
        (status = 400, description = "No option to approve, no reason to reject, an option out of range", body = api::ErrorBody),
        super::openapi::OperatorOnly,
        (status = 404, description = "No such approval", body = api::ErrorBody),
        (status = 409, description = "Decided already", body = api::ErrorBody),
    ))]
pub(super) async fn decide(
    State(s): State<AppState>,
    Operator(who): Operator,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<api::Order>, ApiError> {
    let body = body_bytes(&s, body)?;
    let d: api::Decision = ApiError::parse_json(&body)?;
    Ok(Json(orders::decide(&s, &who, &id, d).await?))
}

/// `GET /v1/incidents`' query.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct IncidentParams {
    /// Only `open` or `resolved` ones.
    state: Option<String>,
    /// How many, 1 to `scheduler.limits.max_page` (500); default 100.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

/// Whether an incident's subject can try again: an order's failed step, while it is open.
fn retriable(i: &crate::store::orders::Incident) -> bool {
    i.state == "open" && ["order_step", "device_not_ready"].contains(&i.kind.as_str())
}

pub(super) fn incident_view(i: crate::store::orders::Incident) -> api::Incident {
    let mut actions = Vec::new();
    if retriable(&i) {
        actions.push("retry".to_owned());
    }
    if i.state == "open" {
        actions.push("resolve".to_owned());
    }
    api::Incident {
        id: i.id,
        kind: i.kind,
        subject: i.subject,
        state: i.state,
        summary: i.summary,
        actions,
        created_at: crate::time::rfc3339(i.created_ms),
        updated_at: crate::time::rfc3339(i.updated_ms),
        resolved_by: i.resolved_by,
        note: i.note,
    }
}

/// `GET /v1/incidents?state=open`: what needs the operator, open first.
#[utoipa::path(get, path = "/v1/incidents", tag = "incidents", params(IncidentParams),
    responses(
        (status = 200, body = api::Incidents),
        (status = 400, description = "A state other than open or resolved, or `limit` outside 1..=max_page", body = api::ErrorBody),
        super::openapi::OperatorOnly,
    ))]
pub(super) async fn list_incidents(
    State(s): State<AppState>,
    _: Operator,
    q: Result<Query<IncidentParams>, QueryRejection>,
) -> Result<Json<api::Incidents>, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    if let Some(state) = q.state.as_deref().filter(|st| !["open", "resolved"].contains(st)) {
        return Err(ApiError::invalid("state", format!("{state:?} is not open or resolved")));
    }
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > s.cfg.limits.max_page {
        return Err(ApiError::invalid("limit", format!("must be from 1 to {}", s.cfg.limits.max_page)));
    }
    let incidents = s.store.incidents(q.state, limit).await?.into_iter().map(incident_view).collect();
    Ok(Json(api::Incidents { incidents }))
}

/// `GET /v1/incidents/{id}`.
#[utoipa::path(get, path = "/v1/incidents/{id}", tag = "incidents",
    params(("id" = String, Path, description = "The incident's id")),
    responses(
        (status = 200, body = api::Incident),
        super::openapi::OperatorOnly,
        (status = 404, description = "No such incident", body = api::ErrorBody),
    ))]
pub(super) async fn get_incident(
    State(s): State<AppState>,
    _: Operator,
    Path(id): Path<String>,
) -> Result<Json<api::Incident>, ApiError> {
    let i = s.store.incident(&id).await?.ok_or_else(|| ApiError::not_found(format!("id: no incident {id:?}")))?;
    Ok(Json(incident_view(i)))
}

/// `POST /v1/incidents/{id}`: `{"action":"retry"|"resolve","note":"…"}`. `retry` runs the failed
/// step of its order again (and resolves the incident); `resolve` closes it with the note.
#[utoipa::path(post, path = "/v1/incidents/{id}", tag = "incidents", request_body = api::IncidentAction,
    params(("id" = String, Path, description = "The incident's id")),
    responses(
        (status = 200, description = "The incident, resolved", body = api::Incident),
        (status = 400, description = "An action other than retry or resolve, or retry where it cannot", body = api::ErrorBody),
        super::openapi::OperatorOnly,
        (status = 404, description = "No such incident", body = api::ErrorBody),
        (status = 409, description = "Resolved already, or its order is not failed", body = api::ErrorBody),
    ))]
pub(super) async fn act_on_incident(
    State(s): State<AppState>,
    Operator(who): Operator,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<api::Incident>, ApiError> {
    let body = body_bytes(&s, body)?;
    let a: api::IncidentAction = ApiError::parse_json(&body)?;
    Ok(Json(act(&s, &who, &id, a).await?))
}

/// Carries out an operator's action on incident `id` (the API's and the console's).
pub(super) async fn act(
    s: &AppState,
    who: &crate::auth::Caller,
    id: &str,
    a: api::IncidentAction,
) -> Result<api::Incident, ApiError> {
    let i = s.store.incident(id).await?.ok_or_else(|| ApiError::not_found(format!("id: no incident {id:?}")))?;
    if i.state != "open" {
        return Err(ApiError::conflict(format!("incident {id} was resolved by {}", i.resolved_by.unwrap_or_default())));
    }
    let note = a.note.filter(|n| !n.trim().is_empty());
    match a.action.as_str() {
        "resolve" => {}
        "retry" if retriable(&i) => {
            orders::retry(s, &i.subject, &who.name).await?;
        }
        "retry" => {
            return Err(ApiError::invalid("action", format!("a {} incident cannot be retried; resolve it", i.kind)));
        }
        other => return Err(ApiError::invalid("action", format!("{other:?} is not retry or resolve"))),
    }
    let note = note.or_else(|| (a.action == "retry").then(|| "retried".to_owned()));
    let done = s.store.resolve_incident(id, &who.name, note, kiln_protocol::now_ms()).await?;
    let done = done.ok_or_else(|| ApiError::conflict(format!("incident {id} was resolved meanwhile")))?;
    Ok(incident_view(done))
}

/// `GET /v1/usage`' query.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct UsageParams {
    /// Only this token's use (an operator's choice: a client sees its own).
    client: Option<String>,
    /// From: RFC 3339 or unix seconds; default the UTC midnight 29 days before today's.
    since: Option<String>,
    /// Until, not included: RFC 3339 or unix seconds; default now.
    until: Option<String>,
}

/// `GET /v1/usage`: what renders cost per token, tier and UTC day, and each budget's state.
#[utoipa::path(get, path = "/v1/usage", tag = "orders", params(UsageParams),
    responses(
        (status = 200, body = api::Usage),
        (status = 400, description = "A time that does not parse, or `since` not before `until`", body = api::ErrorBody),
        super::openapi::PersonOnly,
        (status = 403, description = "A client asking for another token's use", body = api::ErrorBody),
    ))]
pub(super) async fn usage(
    State(s): State<AppState>,
    Person(who): Person,
    q: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Json<api::Usage>, ApiError> {
    use crate::store::costs::DAY_MS;
    let Query(q) = q.map_err(query_error)?;
    let now = kiln_protocol::now_ms();
    let until = time_param("until", q.until.as_deref())?.unwrap_or(now);
    let since = time_param("since", q.since.as_deref())?.unwrap_or((now.div_euclid(DAY_MS) - 29) * DAY_MS);
    if since >= until {
        return Err(ApiError::invalid("since", "must be before until"));
    }
    let client = scoped_client(&who, q.client, "sees its own use only")?;
    let mut days = Vec::new();
    for l in s.store.usage(client.clone(), since, until).await? {
        days.push(api::UsageDay {
            tier: l.tier.parse().map_err(|e: kiln_protocol::RequestError| ApiError::internal(&e))?,
            day: crate::time::rfc3339(l.day_ms).chars().take(10).collect(),
            client: l.client,
            renders: u64::try_from(l.renders).unwrap_or(0),
            device_seconds: l.device_ms as f64 / 1000.0,
            cost_seconds: l.cost_ms as f64 / 1000.0,
        });
    }
    let mut budgets = Vec::new();
    for t in s.list_tokens().await? {
        let Some(budget) = t.budget.filter(|_| client.as_ref().is_none_or(|c| *c == t.name)) else { continue };
        let u = s.budget_use(&t.name, budget, now).await?;
        budgets.push(api::BudgetUse {
            client: t.name,
            budget_seconds: budget.seconds,
            period: budget.period.to_string(),
            used_seconds: u.used,
            in_flight_seconds: u.in_flight,
            resets_at: crate::time::rfc3339(u.resets_ms),
        });
    }
    Ok(Json(api::Usage { since: crate::time::rfc3339(since), until: crate::time::rfc3339(until), days, budgets }))
}
