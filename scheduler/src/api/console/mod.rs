//! The operator's console, served at `/` by the scheduler: server-rendered HTML with a little
//! JavaScript, every file embedded in the binary (`scheduler/console/`), so it works on a studio
//! LAN without internet.
//!
//! Sign-in takes a token (operator or client) and opens a session ([`crate::auth::Sessions`]):
//! an `HttpOnly`, `SameSite=Strict` cookie (`Secure` under TLS) naming it, the token kept on the
//! server and checked again at every request. Every form that changes anything carries the
//! session's CSRF token, and so must every API call the console's script makes
//! ([`super::callers`]); sign-out ends the session. A client sees what the API lets it see.
//!
//! Views: the overview, the approvals (options side by side with what approving costs;
//! keyboard: ←/→ choose, `a` approve, `r` reject), the orders (each a timeline of its steps), the
//! incidents, and the farm's own ([`farm`]): jobs, fleet, gallery. The views follow the farm
//! live: `/console/events` is a Server-Sent Events stream of the orders' and jobs' changes, and
//! the page's script fetches its view again when something it shows changes.

mod farm;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kiln_protocol::{Tier, api, now_ms};

use super::AppState;
use super::callers::{SESSION_COOKIE, session_id};
use crate::auth::{Caller, Role, Session};
use crate::scheduler::Scheduler;

/// The console's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(overview))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/approvals", get(approvals))
        .route("/approvals/{id}", post(decide))
        .route("/incidents", get(incidents))
        .route("/incidents/{id}", post(act_on_incident))
        .route("/orders", get(orders))
        .route("/orders/{id}", get(order))
        .route("/orders/{id}/cancel", post(cancel_order))
        .route("/jobs", get(farm::jobs))
        .route("/jobs/{id}", get(farm::job))
        .route("/jobs/{id}/cancel", post(farm::cancel_job))
        .route("/fleet", get(farm::fleet))
        .route("/fleet/workers/{id}", post(farm::act_on_worker))
        .route("/gallery", get(farm::gallery))
        .route("/gallery/{hash}", get(farm::asset_page))
        .route("/gallery/{hash}/reproduce", post(farm::reproduce))
        .route("/console/events", get(events))
        .route(
            "/console/console.css",
            get(|| async { asset("text/css", include_str!("../../../console/console.css")) }),
        )
        .route(
            "/console/console.js",
            get(|| async { asset("text/javascript", include_str!("../../../console/console.js")) }),
        )
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=300"));
    r
}

/// Text made safe for HTML, in an element or a quoted attribute.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An `application/x-www-form-urlencoded` body's fields.
fn form_fields(body: &[u8]) -> Vec<(String, String)> {
    let decode = |s: &str| -> String {
        let b = s.as_bytes();
        let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match (b[i], hex(i + 1), hex(i + 2)) {
                (b'+', ..) => out.push(b' '),
                (b'%', Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                (c, ..) => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// A page: the header with the views and sign-out (when signed in), then `body`.
fn page(status: StatusCode, title: &str, signed_in: Option<(&Caller, &Session)>, body: &str) -> Response {
    page_live(status, title, signed_in, body, "")
}

/// [`page`], its `main` carrying `live` (attributes that tell the script what to follow).
fn page_live(
    status: StatusCode,
    title: &str,
    signed_in: Option<(&Caller, &Session)>,
    body: &str,
    live: &str,
) -> Response {
    let nav = match signed_in {
        Some((who, session)) => {
            let operator = who.role == Role::Operator;
            let links: Vec<(&str, &str)> = [
                ("/", "Overview", true),
                ("/approvals", "Approvals", operator),
                ("/orders", "Orders", true),
                ("/incidents", "Incidents", operator),
                ("/jobs", "Jobs", true),
                ("/fleet", "Fleet", operator),
                ("/gallery", "Gallery", true),
            ]
            .into_iter()
            .filter_map(|(href, name, shown)| shown.then_some((href, name)))
            .collect();
            let links: String = links
                .iter()
                .map(|(href, name)| {
                    let current = if *name == title { r#" aria-current="page""# } else { "" };
                    format!(r#"<a href="{href}"{current}>{name}</a>"#)
                })
                .collect();
            format!(
                r#"<nav aria-label="Views">{links}</nav>
<form class="signout" method="post" action="/logout"><input type="hidden" name="csrf" value="{csrf}">
<span class="who">{name} ({role})</span> <button type="submit">Sign out</button></form>"#,
                csrf = esc(&session.csrf),
                name = esc(&who.name),
                role = who.role.as_str()
            )
        }
        None => String::new(),
    };
    let html = format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · Kiln</title>
<link rel="stylesheet" href="/console/console.css">
<script src="/console/console.js" defer></script>
</head><body>
<header><span class="brand">Kiln</span>{nav}</header>
<main id="main"{live}><h1>{title}</h1>
{body}
</main></body></html>
"#,
        title = esc(title)
    );
    let mut r = (status, html).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    r
}

fn see_other(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// The signed-in caller and session, or the way to the sign-in page.
fn signed_in(s: &Scheduler, headers: &HeaderMap) -> Result<(Caller, Session), Box<Response>> {
    let session = session_id(headers)
        .and_then(|id| s.sessions.get(&id, now_ms()))
        .ok_or_else(|| Box::new(see_other("/login")))?;
    let who = s.authenticate(session.token.expose()).ok_or_else(|| Box::new(see_other("/login?ended=1")))?;
    Ok((who, session))
}

/// A page that says what could not be read (500).
fn unreadable(title: &str, what: &str, e: impl std::fmt::Display, signed_in: (&Caller, &Session)) -> Response {
    let msg = format!(r#"<p role="alert">{what} could not be read: {}</p>"#, esc(&e.to_string()));
    page(StatusCode::INTERNAL_SERVER_ERROR, title, Some(signed_in), &msg)
}

/// A form's fields, in order.
type Fields = Vec<(String, String)>;

/// A form post from a signed-in session: the caller, the session and the form's fields, once its
/// CSRF token is the session's; else the refusal (or the way to the sign-in page).
fn posted(s: &Scheduler, headers: &HeaderMap, body: &[u8]) -> Result<(Caller, Session, Fields), Box<Response>> {
    let (who, session) = signed_in(s, headers)?;
    let fields = form_fields(body);
    if field(&fields, "csrf") != Some(session.csrf.as_str()) {
        let msg = r#"<p role="alert">This form did not carry the page's CSRF token, so nothing was done. Go back, reload the page and try again.</p>"#;
        return Err(Box::new(page(StatusCode::FORBIDDEN, "Refused", Some((&who, &session)), msg)));
    }
    Ok((who, session, fields))
}

/// A form post only the operator may make: [`posted`], then [`operator_only`].
fn operator_posted(
    s: &Scheduler,
    headers: &HeaderMap,
    body: &[u8],
    title: &str,
    why: &str,
) -> Result<(Caller, Session, Fields), Box<Response>> {
    let (who, session, fields) = posted(s, headers, body)?;
    operator_only(&who, &session, title, why)?;
    Ok((who, session, fields))
}

/// Nothing, for an operator; else the page `title` saying `why` (403).
fn operator_only(who: &Caller, session: &Session, title: &str, why: &str) -> Result<(), Box<Response>> {
    if who.role == Role::Operator {
        return Ok(());
    }
    let msg = format!(r#"<p role="alert">{}</p>"#, esc(why));
    Err(Box::new(page(StatusCode::FORBIDDEN, title, Some((who, session)), &msg)))
}

fn login_form(message: &str) -> String {
    format!(
        r#"{message}<form class="login" method="post" action="/login">
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<p class="hint">The operator's is in the data dir's <code>operator.token</code>; a client's comes from <code>kiln token create</code>.</p>
<button type="submit">Sign in</button></form>"#
    )
}

#[derive(serde::Deserialize)]
struct LoginParams {
    ended: Option<String>,
}

async fn login_page(Query(q): Query<LoginParams>) -> Response {
    let message = match q.ended {
        Some(_) => r#"<p role="alert">The session's token was revoked or has expired; sign in again.</p>"#,
        None => "",
    };
    page(StatusCode::OK, "Sign in", None, &login_form(message))
}

async fn login(State(s): State<AppState>, body: Bytes) -> Response {
    let fields = form_fields(&body);
    let token = field(&fields, "token").unwrap_or("").trim().to_owned();
    let Some(who) = s.authenticate(&token) else {
        let msg = r#"<p role="alert">Unknown, revoked or expired token.</p>"#;
        return page(StatusCode::UNAUTHORIZED, "Sign in", None, &login_form(msg));
    };
    if !matches!(who.role, Role::Operator | Role::Client) {
        let msg = r#"<p role="alert">The console is for operator and client tokens; this one is a worker's or a device's.</p>"#;
        return page(StatusCode::FORBIDDEN, "Sign in", None, &login_form(msg));
    }
    let (id, _) = match s.sessions.open(&token, now_ms()) {
        Ok(opened) => opened,
        Err(e) => {
            let msg = format!(r#"<p role="alert">No session could be made: {}</p>"#, esc(&e.to_string()));
            return page(StatusCode::INTERNAL_SERVER_ERROR, "Sign in", None, &login_form(&msg));
        }
    };
    tracing::info!(token = who.name, "console: signed in");
    let secure = if s.cfg.tls.cert_file.is_some() { "; Secure" } else { "" };
    let max_age = crate::auth::SESSION_MS / 1000;
    let cookie = format!("{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}");
    let mut r = see_other("/");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = posted(&s, &headers, &body) {
        return *r;
    }
    if let Some(id) = session_id(&headers) {
        s.sessions.close(&id);
    }
    let mut r = see_other("/login");
    let gone = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    if let Ok(v) = HeaderValue::from_str(&gone) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// A figure with its label, as the overview shows it.
fn tile(label: &str, value: String, href: Option<&str>) -> String {
    let value = match href {
        Some(h) => format!(r#"<a href="{h}">{value}</a>"#),
        None => value,
    };
    format!(r#"<div class="tile"><span class="value">{value}</span><span class="label">{}</span></div>"#, esc(label))
}

async fn overview(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let (who, session) = match signed_in(&s, &headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let body = match who.role {
        Role::Operator => operator_overview(&s).await,
        _ => client_overview(&s, &who).await,
    };
    page_live(StatusCode::OK, "Overview", Some((&who, &session)), &body, r#" data-live="overview""#)
}

async fn operator_overview(s: &Scheduler) -> String {
    let m = &s.metrics;
    let now = now_ms();
    let workers = s.registry.list(now);
    let serving = crate::registry::serving(&workers);
    let mut rows = String::new();
    for tier in Tier::ALL {
        let n = |state: &str| m.jobs.with_label_values(&[tier.as_str(), state]).get();
        let wait = m.queue_wait.with_label_values(&[tier.as_str()]);
        let mean = match wait.get_sample_count() {
            0 => "–".to_owned(),
            c => format!("{:.1} s", wait.get_sample_sum() / c as f64),
        };
        let serving = serving.iter().find(|(t, _)| *t == tier).map_or(0, |(_, n)| *n);
        rows.push_str(&format!(
            "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td><td>{mean}</td><td>{serving}</td></tr>",
            tier.as_str(),
            n("queued"),
            n("dispatched"),
            n("running"),
        ));
    }
    let counts = crate::registry::counts(&workers);
    let workers_line: Vec<String> = crate::metrics::WORKER_STATES
        .iter()
        .map(|st| format!("{} {st}", counts.get(st).copied().unwrap_or(0)))
        .collect();
    let mut devices = std::collections::BTreeMap::<String, i64>::new();
    for family in prometheus::core::Collector::collect(&m.devices) {
        for metric in family.get_metric() {
            let state = metric.get_label().iter().find(|l| l.name() == "state").map(|l| l.value().to_owned());
            *devices.entry(state.unwrap_or_default()).or_default() += metric.get_gauge().get_value() as i64;
        }
    }
    let devices_line: Vec<String> = devices.iter().map(|(st, n)| format!("{n} {st}")).collect();
    let incidents = match s.store.open_incident_counts().await {
        Ok(c) => c.into_iter().map(|(_, n)| n).sum::<i64>().to_string(),
        Err(e) => format!("unreadable ({e})"),
    };
    let operator = Caller { name: String::new(), role: Role::Operator, devices: Vec::new(), budget: None };
    let approvals = match crate::orders::pending_approvals(s, &operator).await {
        Ok(a) => a.len().to_string(),
        Err(e) => format!("unreadable ({e})"),
    };
    format!(
        r#"<section aria-labelledby="needs"><h2 id="needs">Needs you</h2><div class="tiles">{}{}</div></section>
<section aria-labelledby="queue"><h2 id="queue">Queue</h2>
<div class="scroll"><table><caption>Jobs by tier (mean wait since the scheduler started)</caption>
<thead><tr><th scope="col">Tier</th><th scope="col">Queued</th><th scope="col">Dispatched</th><th scope="col">Running</th><th scope="col">Mean wait</th><th scope="col">Workers</th></tr></thead>
<tbody>{rows}</tbody></table></div>
<div class="tiles">{}</div></section>
<section aria-labelledby="farm"><h2 id="farm">Farm</h2><div class="tiles">{}{}</div></section>"#,
        tile("approvals pending", approvals, Some("/approvals")),
        tile("incidents open", incidents, Some("/incidents")),
        tile("renders in flight", m.in_flight.get().to_string(), None),
        tile("workers", if workers_line.is_empty() { "none".into() } else { workers_line.join(", ") }, None),
        tile("devices", if devices_line.is_empty() { "none".into() } else { devices_line.join(", ") }, None),
    )
}

async fn client_overview(s: &Scheduler, who: &Caller) -> String {
    let q = crate::store::ListQuery {
        state: None,
        tier: None,
        since_ms: None,
        until_ms: None,
        client: Some(who.name.clone()),
        limit: 20,
        before_seq: None,
    };
    let rows: String = match s.store.list(q).await {
        Ok(page) => page
            .jobs
            .iter()
            .map(|j| {
                format!(
                    "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&j.id),
                    j.request.tier.as_str(),
                    j.state.as_str(),
                    esc(&j.request.prompt)
                )
            })
            .collect(),
        Err(e) => format!("<tr><td colspan=\"4\">unreadable: {}</td></tr>", esc(&e.to_string())),
    };
    format!(
        r#"<section aria-labelledby="yours"><h2 id="yours">Your latest jobs</h2>
<div class="scroll"><table><thead><tr><th scope="col">Job</th><th scope="col">Tier</th><th scope="col">State</th><th scope="col">Prompt</th></tr></thead>
<tbody>{rows}</tbody></table></div></section>"#
    )
}

#[derive(serde::Deserialize)]
struct ApprovalsParams {
    done: Option<String>,
    order: Option<String>,
}

async fn approvals(State(s): State<AppState>, headers: HeaderMap, Query(q): Query<ApprovalsParams>) -> Response {
    let (who, session) = match signed_in(&s, &headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    if let Err(r) = operator_only(&who, &session, "Approvals", "Approvals are the operator's to decide.") {
        return *r;
    }
    let pending = match crate::orders::pending_approvals(&s, &who).await {
        Ok(p) => p,
        Err(e) => return unreadable("Approvals", "The approvals", e, (&who, &session)),
    };
    let mut body = String::new();
    if let Some(done) = q.done {
        let follow =
            q.order.map(|o| format!(r#" <a href="/orders/{0}">Follow order {0}</a>"#, esc(&o))).unwrap_or_default();
        body.push_str(&format!(r#"<p class="done" role="status">{}{follow}</p>"#, esc(&done)));
    }
    if pending.is_empty() {
        body.push_str("<p>Nothing waits for a decision.</p>");
    } else {
        body.push_str(
            r#"<p class="hint">Keys: <kbd>←</kbd> <kbd>→</kbd> choose an option of the first approval, <kbd>a</kbd> approve it, <kbd>r</kbd> write why it is rejected.</p>"#,
        );
    }
    for a in &pending {
        body.push_str(&approval_card(a, &session.csrf));
    }
    page_live(StatusCode::OK, "Approvals", Some((&who, &session)), &body, r#" data-live="approvals""#)
}

fn approval_card(a: &api::Approval, csrf: &str) -> String {
    let id = esc(&a.id);
    let options: String = a
        .options
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let checked = if i == 0 { " checked" } else { "" };
            format!(
                r#"<label class="option"><input type="radio" name="option" value="{n}"{checked}>
<img src="/v1/assets/{asset}?variant=thumb" alt="Option {n}: seed {seed}" loading="lazy" width="256" height="256">
<span>Option {n} · seed {seed}</span></label>"#,
                n = o.option,
                asset = esc(&o.asset),
                seed = o.seed
            )
        })
        .collect();
    let due = a.due_at.as_deref().map(|d| format!(" · raises an incident at {}", esc(d))).unwrap_or_default();
    let cost = a
        .estimated_cost_ms
        .map(|ms| {
            format!(
                r#"<p class="cost">Approving starts about {:.1} device-seconds of rendering.</p>"#,
                ms as f64 / 1000.0
            )
        })
        .unwrap_or_default();
    format!(
        r#"<article class="approval" aria-labelledby="a-{id}">
<h2 id="a-{id}">{prompt}</h2>
<p class="meta">Order <a href="/orders/{order}"><code>{order}</code></a> · step {step} · opened {created}{due}</p>{cost}
<form class="approve" method="post" action="/approvals/{id}">
<input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="decision" value="approve">
<fieldset><legend>Choose one to render final and print</legend><div class="options">{options}</div></fieldset>
<button type="submit">Approve (a)</button></form>
<form class="reject" method="post" action="/approvals/{id}">
<input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="decision" value="reject">
<label for="r-{id}">Why reject them all</label><textarea id="r-{id}" name="reason" rows="2" required></textarea>
<button type="submit">Reject (r)</button></form>
</article>"#,
        prompt = esc(&a.prompt),
        order = esc(&a.order),
        step = esc(&a.step),
        created = esc(&a.created_at),
        csrf = esc(csrf),
    )
}

async fn decide(State(s): State<AppState>, headers: HeaderMap, Path(id): Path<String>, body: Bytes) -> Response {
    let (who, session, fields) =
        match operator_posted(&s, &headers, &body, "Approvals", "Approvals are the operator's to decide.") {
            Ok(x) => x,
            Err(r) => return *r,
        };
    let decision = api::Decision {
        decision: field(&fields, "decision").unwrap_or("").to_owned(),
        option: field(&fields, "option").and_then(|o| o.parse().ok()),
        reason: field(&fields, "reason").map(str::to_owned).filter(|r| !r.trim().is_empty()),
    };
    let what = match (&decision.decision[..], decision.option) {
        ("approve", Some(n)) => format!("approved option {n}"),
        _ => "rejected".to_owned(),
    };
    match crate::orders::decide(&s, &who, &id, decision).await {
        Ok(order) => {
            let done = query_value(&format!("Order {} {what}.", order.id));
            see_other(&format!("/approvals?done={done}&order={}", order.id))
        }
        Err(e) => {
            let (status, message) = api_error(e.into());
            let msg = format!(
                r#"<p role="alert">{}</p><p><a href="/approvals">Back to the approvals</a></p>"#,
                esc(&message)
            );
            page(status, "Approvals", Some((&who, &session)), &msg)
        }
    }
}

/// A state as a badge.
fn badge(state: &str) -> String {
    format!(r#"<span class="state state-{0}">{0}</span>"#, esc(state))
}

async fn orders(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let (who, session) = match signed_in(&s, &headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let client = (who.role != Role::Operator).then(|| who.name.clone());
    let q = crate::store::orders::OrderQuery { state: None, client, limit: 50, before: None };
    let rows = match s.store.orders(q).await {
        Ok(rows) => rows,
        Err(e) => return unreadable("Orders", "The orders", e, (&who, &session)),
    };
    let mut body = String::new();
    if rows.is_empty() {
        body.push_str("<p>No orders yet.</p>");
    } else {
        body.push_str(
            r#"<div class="scroll"><table><caption>The latest 50, newest first; they change here as they go</caption>
<thead><tr><th scope="col">Order</th><th scope="col">State</th><th scope="col">Plan</th><th scope="col">Prompt</th><th scope="col">Placed</th></tr></thead><tbody>"#,
        );
        for row in &rows {
            let Ok(o) = crate::orders::order_view(row) else { continue };
            body.push_str(&format!(
                r#"<tr><td><a href="/orders/{id}"><code>{id}</code></a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
                badge(&o.state),
                esc(&o.plan),
                esc(&o.prompt),
                esc(&o.created_at),
                id = esc(&o.id),
            ));
        }
        body.push_str("</tbody></table></div>");
    }
    page_live(StatusCode::OK, "Orders", Some((&who, &session)), &body, r#" data-live="orders""#)
}

async fn order(State(s): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let (who, session) = match signed_in(&s, &headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let o = match crate::orders::view(&s, &who, &id, false).await {
        Ok(Some(o)) => o,
        Ok(None) => {
            let msg = format!(r#"<p role="alert">No order {}.</p>"#, esc(&id));
            return page(StatusCode::NOT_FOUND, "Order", Some((&who, &session)), &msg);
        }
        Err(e) => return unreadable("Order", "The order", e, (&who, &session)),
    };
    let mut body = order_body(&o, &session.csrf);
    if who.role == Role::Operator {
        body.push_str(&order_incidents(&s, &o.id, &session.csrf).await);
    }
    let live = format!(r#" data-live="order" data-order="{}""#, esc(&o.id));
    page_live(StatusCode::OK, "Order", Some((&who, &session)), &body, &live)
}

/// The open incidents about order `id`, each with its retry where the step can try again.
async fn order_incidents(s: &Scheduler, id: &str, csrf: &str) -> String {
    let open = match s.store.incidents(Some("open".into()), 500).await {
        Ok(l) => l,
        Err(e) => return format!(r#"<p role="alert">Its incidents could not be read: {}</p>"#, esc(&e.to_string())),
    };
    let mut out = String::new();
    for i in open.into_iter().filter(|i| i.subject == id).map(super::orders::incident_view) {
        let retry = match i.actions.iter().any(|a| a == "retry") {
            true => format!(
                r#"<form class="retry" method="post" action="/incidents/{iid}"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="action" value="retry"><input type="hidden" name="back" value="/orders/{order}"><button type="submit">Retry the failed step</button></form>"#,
                iid = esc(&i.id),
                csrf = esc(csrf),
                order = esc(id)
            ),
            false => String::new(),
        };
        out.push_str(&format!(
            r#"<article class="incident" aria-labelledby="h-{iid}"><h2 id="h-{iid}">Incident: {kind}</h2><p>{summary}</p><p class="meta">raised {created} · <a href="/incidents#i-{iid}">in the incidents</a></p>{retry}</article>"#,
            iid = esc(&i.id),
            kind = esc(&i.kind),
            summary = esc(&i.summary),
            created = esc(&i.created_at),
        ));
    }
    out
}

fn thumb(asset: &str, alt: &str) -> String {
    format!(
        r#"<a href="/v1/assets/{a}"><img src="/v1/assets/{a}?variant=thumb" alt="{alt}" loading="lazy" width="128" height="128"></a>"#,
        a = esc(asset),
        alt = esc(alt)
    )
}

fn order_body(o: &api::Order, csrf: &str) -> String {
    let mut out = format!(
        r#"<p class="order-state" id="order-state">{state}</p>
<dl class="facts"><dt>Order</dt><dd><code>{id}</code></dd><dt>Prompt</dt><dd>{prompt}</dd><dt>Plan</dt><dd>{plan}</dd>
<dt>Seeds</dt><dd>{seeds}{chosen}</dd><dt>Placed</dt><dd>{created}</dd><dt>Changed</dt><dd>{updated}</dd>{estimate}</dl>"#,
        state = badge(&o.state),
        id = esc(&o.id),
        prompt = esc(&o.prompt),
        plan = esc(&o.plan),
        seeds = o.seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", "),
        chosen = o.chosen_seed.map(|s| format!(" (chosen: {s})")).unwrap_or_default(),
        created = esc(&o.created_at),
        updated = esc(&o.updated_at),
        estimate = o
            .estimated_cost_ms
            .map(|ms| format!("<dt>Estimated cost</dt><dd>{:.1} device-seconds</dd>", ms as f64 / 1000.0))
            .unwrap_or_default(),
    );
    if let Some(e) = &o.error {
        out.push_str(&format!(r#"<p role="alert">{}</p>"#, esc(e)));
    }
    out.push_str(r#"<h2>Steps</h2><ol class="timeline">"#);
    for step in &o.steps {
        let mut meta = vec![format!("{} step", esc(&step.kind))];
        if step.attempt > 0 {
            meta.push(format!("attempt {}", step.attempt));
        }
        if let Some(t) = &step.started_at {
            meta.push(format!("started {}", esc(t)));
        }
        if let Some(t) = &step.ended_at {
            meta.push(format!("ended {}", esc(t)));
        }
        if let Some(d) = &step.device {
            meta.push(format!("on {}", esc(d)));
        }
        let detail = step.detail.as_deref().map(|d| format!(r#"<p class="detail">{}</p>"#, esc(d))).unwrap_or_default();
        let assets: String = step.assets.iter().take(8).map(|a| thumb(a, &format!("{}: {a}", step.name))).collect();
        out.push_str(&format!(
            r#"<li class="step" data-step="{name}"><div><strong>{name}</strong> {state}</div><p class="meta">{meta}</p>{detail}<div class="assets">{assets}</div></li>"#,
            name = esc(&step.name),
            state = badge(&step.state),
            meta = meta.join(" · "),
        ));
    }
    out.push_str("</ol>");
    if !o.outputs.is_empty() {
        out.push_str(r#"<h2>Outputs</h2><div class="assets">"#);
        for (name, asset) in &o.outputs {
            out.push_str(&format!(r#"<figure>{}<figcaption>{}</figcaption></figure>"#, thumb(asset, name), esc(name)));
        }
        out.push_str("</div>");
    }
    if o.state == "running" || o.state == "awaiting_approval" {
        out.push_str(&format!(
            r#"<form class="cancel" method="post" action="/orders/{id}/cancel"><input type="hidden" name="csrf" value="{csrf}">
<button type="submit">Cancel this order</button> <span class="hint">the steps after the current one are skipped</span></form>"#,
            id = esc(&o.id),
            csrf = esc(csrf)
        ));
    }
    out
}

async fn cancel_order(State(s): State<AppState>, headers: HeaderMap, Path(id): Path<String>, body: Bytes) -> Response {
    let (who, session, _) = match posted(&s, &headers, &body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    match crate::orders::cancel(&s, &who, &id).await {
        Ok(o) => see_other(&format!("/orders/{}", o.id)),
        Err(e) => {
            let (status, message) = api_error(e.into());
            let msg = format!(r#"<p role="alert">{}</p>"#, esc(&message));
            page(status, "Order", Some((&who, &session)), &msg)
        }
    }
}

#[derive(serde::Deserialize)]
struct DoneParams {
    done: Option<String>,
}

/// `text` as a query parameter's value.
fn query_value(text: &str) -> String {
    text.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b == b'.' { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

async fn incidents(State(s): State<AppState>, headers: HeaderMap, Query(q): Query<DoneParams>) -> Response {
    let (who, session) = match signed_in(&s, &headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    if let Err(r) = operator_only(&who, &session, "Incidents", "Incidents are the operator's.") {
        return *r;
    }
    let list = match s.store.incidents(None, 100).await {
        Ok(l) => l,
        Err(e) => return unreadable("Incidents", "The incidents", e, (&who, &session)),
    };
    let mut body = String::new();
    if let Some(done) = q.done {
        body.push_str(&format!(r#"<p class="done" role="status">{}</p>"#, esc(&done)));
    }
    if list.is_empty() {
        body.push_str("<p>Nothing needs you.</p>");
    }
    let csrf = esc(&session.csrf);
    for i in list.into_iter().map(super::orders::incident_view) {
        let id = esc(&i.id);
        let subject = match i.subject.starts_with('o') {
            true => format!(r#"<a href="/orders/{0}"><code>{0}</code></a>"#, esc(&i.subject)),
            false => format!("<code>{}</code>", esc(&i.subject)),
        };
        let mut actions = String::new();
        if i.actions.iter().any(|a| a == "retry") {
            actions.push_str(&format!(
                r#"<form class="retry" method="post" action="/incidents/{id}"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="action" value="retry"><button type="submit">Retry the step</button></form>"#
            ));
        }
        if i.actions.iter().any(|a| a == "resolve") {
            actions.push_str(&format!(
                r#"<form class="resolve" method="post" action="/incidents/{id}"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="action" value="resolve">
<label for="n-{id}">Note</label><textarea id="n-{id}" name="note" rows="2"></textarea><button type="submit">Resolve</button></form>"#
            ));
        }
        let resolved = match &i.resolved_by {
            Some(by) => format!(
                r#"<p class="meta">resolved by {}{}</p>"#,
                esc(by),
                i.note.as_deref().map(|n| format!(": {}", esc(n))).unwrap_or_default()
            ),
            None => String::new(),
        };
        body.push_str(&format!(
            r#"<article class="incident" id="i-{id}" aria-labelledby="h-{id}"><h2 id="h-{id}">{kind} {state}</h2>
<p>{summary}</p><p class="meta">about {subject} · raised {created}</p>{resolved}{actions}</article>"#,
            kind = esc(&i.kind),
            state = badge(&i.state),
            summary = esc(&i.summary),
            created = esc(&i.created_at),
        ));
    }
    page(StatusCode::OK, "Incidents", Some((&who, &session)), &body)
}

async fn act_on_incident(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let (who, session, fields) =
        match operator_posted(&s, &headers, &body, "Incidents", "Incidents are the operator's.") {
            Ok(x) => x,
            Err(r) => return *r,
        };
    let action = api::IncidentAction {
        action: field(&fields, "action").unwrap_or("").to_owned(),
        note: field(&fields, "note").map(str::to_owned),
    };
    // From an order's page, back to it.
    let back = field(&fields, "back")
        .filter(|b| b.starts_with("/orders/o") && b[1..].bytes().all(|c| c.is_ascii_alphanumeric() || c == b'/'));
    match (super::orders::act(&s, &who, &id, action).await, back) {
        (Ok(_), Some(back)) => see_other(back),
        (Ok(i), None) => {
            see_other(&format!("/incidents?done={}", query_value(&format!("Incident {} resolved.", i.id))))
        }
        (Err(e), _) => {
            let (status, message) = api_error(e);
            let msg = format!(
                r#"<p role="alert">{}</p><p><a href="/incidents">Back to the incidents</a></p>"#,
                esc(&message)
            );
            page(status, "Incidents", Some((&who, &session)), &msg)
        }
    }
}

/// An API error's status and message, for a page.
fn api_error(e: super::ApiError) -> (StatusCode, String) {
    let status = e.status();
    match e {
        super::ApiError::Rejected { message, .. } | super::ApiError::Unexpected { message, .. } => (status, message),
    }
}

/// `/console/events`: each change of an order the session may see, as a Server-Sent Event
/// `order` (`{"id","client","state"}`), each job transition it may see as `job`
/// (`{"id","state"}`), and, for the operator, each device change as `device` (`{"id"}`), for the
/// views to follow. A stream that fell behind says so with an
/// `order` event `{}`, and the views fetch themselves again.
async fn events(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let (who, _) = match signed_in(&s, &headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let held = match s.event_streams.open(&who.name, s.cfg.limits.max_event_streams_per_token) {
        Ok(h) => h,
        Err(n) => {
            let msg = format!("the token {:?} has {n} event streams open already", who.name);
            return (StatusCode::TOO_MANY_REQUESTS, msg).into_response();
        }
    };
    let state = (s.subscribe_orders(), s.subscribe(), s.subscribe_devices(), held, who, s.clone());
    let stream = futures_util::stream::unfold(state, |(mut orders, mut jobs, mut devices, held, who, s)| async move {
        use tokio::sync::broadcast::error::RecvError;
        let lagged = || SseEvent::default().event("order").data("{}");
        loop {
            let event = tokio::select! {
                change = orders.recv() => match change {
                    Ok(change) if who.may_see(&change.client) => {
                        SseEvent::default().event("order").json_data(&*change).unwrap_or_default()
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(_)) => lagged(),
                    Err(RecvError::Closed) => return None,
                },
                live = jobs.recv() => match live.as_deref() {
                    Ok(crate::scheduler::Live::Event(e)) => {
                        // A client's session hears only of its own jobs.
                        if who.role != Role::Operator && !matches!(s.job(&who, &e.job_id).await, Ok(Some(_))) {
                            continue;
                        }
                        let change = serde_json::json!({ "id": e.job_id, "state": e.state.as_str() });
                        SseEvent::default().event("job").data(change.to_string())
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(_)) => lagged(),
                    Err(RecvError::Closed) => return None,
                },
                // The fleet is the operator's to see.
                device = devices.recv() => match device {
                    Ok(id) if who.role == Role::Operator => {
                        SseEvent::default().event("device").data(serde_json::json!({ "id": &*id }).to_string())
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(_)) => lagged(),
                    Err(RecvError::Closed) => return None,
                },
            };
            return Some((Ok::<_, std::convert::Infallible>(event), (orders, jobs, devices, held, who, s)));
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_bodies_decode_and_html_is_escaped() {
        let f = form_fields(b"token=kiln_ab%2Bc&reason=too+dark%21&empty=&bad=%zz&cut=%4");
        assert_eq!(field(&f, "token"), Some("kiln_ab+c"));
        assert_eq!(field(&f, "reason"), Some("too dark!"));
        assert_eq!(field(&f, "empty"), Some(""));
        assert_eq!(field(&f, "bad"), Some("%zz"));
        assert_eq!(field(&f, "cut"), Some("%4"));
        assert_eq!(esc(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }
}
