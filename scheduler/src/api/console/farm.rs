//! The console's views of the farm itself: the jobs (a live list with filters, one job with its
//! events and asset), the fleet (devices with their telemetry and tasks; workers, drained and
//! resumed from here) and the gallery (the assets newest first, searched by the words of their
//! prompts; one asset with its provenance, reproduced on the scheduler's own engine).

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use kiln_protocol::{JobState, Tier, now_ms};
use serde_json::Value;

use super::{
    AppState, DoneParams, api_error, badge, esc, field, operator_only, operator_posted, page, page_live, posted,
    query_value, see_other, signed_in, unreadable,
};
use crate::auth::{Caller, Role, Session};
use crate::scheduler::Scheduler;
use crate::store::ListQuery;
use crate::store::costs::{GALLERY_WORDS, GalleryItem, GalleryQuery};
use crate::time::rfc3339;

/// Jobs a page of the jobs view lists.
const JOBS_PAGE: u32 = 50;

/// Assets a page of the gallery shows.
const GALLERY_PAGE: u32 = 48;

/// The largest render the console reproduces on the scheduler's own engine, in pixels (about
/// a final render); a larger one is for `kiln reproduce` on a machine with a GPU.
const REPRODUCE_MAX_PIXELS: u64 = 2048 * 2048;

/// How long ago `ms` was, in words.
fn ago(now: i64, ms: i64) -> String {
    let s = (now - ms).max(0) / 1000;
    match s {
        0..=89 => format!("{s} s ago"),
        90..=5399 => format!("{} min ago", (s + 30) / 60),
        5400..=129_599 => format!("{} h ago", (s + 1800) / 3600),
        _ => format!("{} days ago", (s + 43_200) / 86_400),
    }
}

/// A `<select>` of `options` (value, label), `chosen` selected, labelled `label`.
fn select(name: &str, label: &str, options: &[(&str, &str)], chosen: Option<&str>) -> String {
    let opts: String = options
        .iter()
        .map(|(v, l)| {
            let sel = if Some(*v) == chosen { " selected" } else { "" };
            format!(r#"<option value="{}"{sel}>{}</option>"#, esc(v), esc(l))
        })
        .collect();
    format!(
        r#"<span class="field"><label for="f-{name}">{label}</label><select id="f-{name}" name="{name}">{opts}</select></span>"#
    )
}

#[derive(serde::Deserialize)]
pub(super) struct JobsParams {
    state: Option<String>,
    tier: Option<String>,
    since: Option<String>,
    cursor: Option<String>,
}

/// The `since` choices: (value, label, milliseconds back).
const SINCE: [(&str, &str, i64); 3] =
    [("1h", "the last hour", 3_600_000), ("24h", "the last day", 86_400_000), ("7d", "the last week", 604_800_000)];

pub(super) async fn jobs(State(s): State<AppState>, headers: HeaderMap, Query(q): Query<JobsParams>) -> Response {
    let (who, session) = match signed_in(&s, &headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let some = |v: &Option<String>| v.as_deref().filter(|v| !v.is_empty()).map(str::to_owned);
    let (state_f, tier_f, since_f) = (some(&q.state), some(&q.tier), some(&q.since));
    let state = state_f.as_deref().and_then(|v| v.parse::<JobState>().ok());
    let tier = tier_f.as_deref().and_then(|v| v.parse::<Tier>().ok());
    let now = now_ms();
    let since_ms = since_f.as_deref().and_then(|v| SINCE.iter().find(|(k, ..)| *k == v)).map(|(.., back)| now - back);
    let query = ListQuery {
        state,
        tier,
        since_ms,
        until_ms: None,
        client: (who.role != Role::Operator).then(|| who.name.clone()),
        limit: JOBS_PAGE,
        before_seq: q.cursor.as_deref().and_then(|c| c.parse().ok()),
    };
    let listed = match s.store.list(query).await {
        Ok(p) => p,
        Err(e) => return unreadable("Jobs", "The jobs", e, (&who, &session)),
    };
    let states: Vec<(&str, &str)> =
        std::iter::once(("", "any")).chain(JobState::ALL.iter().map(|st| (st.as_str(), st.as_str()))).collect();
    let tiers: Vec<(&str, &str)> =
        std::iter::once(("", "any")).chain(Tier::ALL.iter().map(|t| (t.as_str(), t.as_str()))).collect();
    let since: Vec<(&str, &str)> =
        std::iter::once(("", "any time")).chain(SINCE.iter().map(|(v, l, _)| (*v, *l))).collect();
    let mut body = format!(
        r#"<form class="filters" method="get" action="/jobs" aria-label="Filter the jobs">{}{}{}<button type="submit">Filter</button></form>"#,
        select("state", "State", &states, state_f.as_deref()),
        select("tier", "Tier", &tiers, tier_f.as_deref()),
        select("since", "Since", &since, since_f.as_deref()),
    );
    if listed.jobs.is_empty() {
        body.push_str("<p>No jobs match.</p>");
    } else {
        let client_col = if who.role == Role::Operator { r#"<th scope="col" class="wide">Client</th>"# } else { "" };
        body.push_str(&format!(
            r#"<div class="scroll"><table><caption>Newest first, {JOBS_PAGE} a page; they change here as they go</caption>
<thead><tr><th scope="col">Job</th><th scope="col">State</th><th scope="col">Tier</th><th scope="col" class="wide">Size</th><th scope="col">Prompt</th><th scope="col" class="wide">Seed</th>{client_col}<th scope="col" class="wide">Submitted</th></tr></thead><tbody>"#
        ));
        for j in &listed.jobs {
            let r = &j.request;
            let client = if who.role == Role::Operator {
                format!(r#"<td class="wide">{}</td>"#, esc(&j.client))
            } else {
                String::new()
            };
            body.push_str(&format!(
                r#"<tr><td><a href="/jobs/{id}"><code>{id}</code></a></td><td>{}</td><td>{}</td><td class="wide">{}×{}</td><td>{}</td><td class="wide">{}</td>{client}<td class="wide">{}</td></tr>"#,
                badge(j.state.as_str()),
                j.tier.as_str(),
                r.width,
                r.height,
                esc(&r.prompt),
                r.seed,
                ago(now, j.created_ms),
                id = esc(&j.id),
            ));
        }
        body.push_str("</tbody></table></div>");
    }
    if let Some(next) = listed.next {
        let mut params: Vec<String> = [("state", &state_f), ("tier", &tier_f), ("since", &since_f)]
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", query_value(v))))
            .collect();
        params.push(format!("cursor={next}"));
        body.push_str(&format!(r#"<p><a href="/jobs?{}" rel="next">Older jobs</a></p>"#, params.join("&amp;")));
    }
    page_live(StatusCode::OK, "Jobs", Some((&who, &session)), &body, r#" data-live="jobs""#)
}

pub(super) async fn job(State(s): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let (who, session) = match signed_in(&s, &headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let j = match s.job(&who, &id).await {
        Ok(Some(j)) => j,
        Ok(None) => {
            let msg = format!(r#"<p role="alert">No job {}.</p>"#, esc(&id));
            return page(StatusCode::NOT_FOUND, "Job", Some((&who, &session)), &msg);
        }
        Err(e) => return unreadable("Job", "The job", e, (&who, &session)),
    };
    let events = match s.store.events(&j.id, 0).await {
        Ok(e) => e,
        Err(e) => return unreadable("Job", "The job's events", e, (&who, &session)),
    };
    let r = &j.request;
    let at = |ms: Option<i64>| ms.map(rfc3339).unwrap_or_else(|| "–".into());
    let mut body = format!(
        r#"<p class="order-state" id="job-state">{state}</p>
<dl class="facts"><dt>Job</dt><dd><code>{id}</code></dd><dt>Prompt</dt><dd>{prompt}</dd><dt>Seed</dt><dd>{seed}</dd>
<dt>Tier</dt><dd>{tier}</dd><dt>Size</dt><dd>{w}×{h}, samples per axis {samples}</dd><dt>Model</dt><dd>{model}</dd>
<dt>Client</dt><dd>{client}</dd><dt>Attempt</dt><dd>{attempt}</dd><dt>Submitted</dt><dd>{created}</dd>
<dt>Started</dt><dd>{started}</dd><dt>Ended</dt><dd>{ended}</dd>{follows}</dl>"#,
        state = badge(j.state.as_str()),
        id = esc(&j.id),
        prompt = esc(&r.prompt),
        seed = r.seed,
        tier = j.tier.as_str(),
        w = r.width,
        h = r.height,
        samples = r.samples,
        model = esc(&r.model),
        client = esc(&j.client),
        attempt = j.attempt,
        created = rfc3339(j.created_ms),
        started = at(j.started_ms),
        ended = at(j.finished_ms),
        follows = j
            .follows
            .as_deref()
            .map(|f| format!(r#"<dt>Waits on</dt><dd><a href="/jobs/{0}"><code>{0}</code></a></dd>"#, esc(f)))
            .unwrap_or_default(),
    );
    if let Some(e) = &j.error {
        body.push_str(&format!(r#"<p role="alert">{}</p>"#, esc(e)));
    }
    if let Some(asset) = &j.asset {
        body.push_str(&format!(
            r#"<h2>Asset</h2><figure><a href="/gallery/{a}"><img class="large" src="/v1/assets/{a}?variant=thumb" alt="The render of job {id}" width="256" height="256"></a>
<figcaption><code>{a}</code> · <a href="/v1/assets/{a}">the PNG</a> · <a href="/gallery/{a}">provenance</a></figcaption></figure>"#,
            a = esc(asset),
            id = esc(&j.id)
        ));
    }
    body.push_str(
        r#"<h2>Events</h2><div class="scroll"><table><thead><tr><th scope="col">When</th><th scope="col">State</th><th scope="col">Attempt</th><th scope="col">What</th></tr></thead><tbody>"#,
    );
    for e in &events {
        let what = match &e.error {
            Some(err) if e.detail.is_empty() => esc(err),
            Some(err) => format!("{}: {}", esc(&e.detail), esc(err)),
            None => esc(&e.detail),
        };
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{what}</td></tr>",
            rfc3339(e.at_ms),
            badge(e.state.as_str()),
            e.attempt
        ));
    }
    body.push_str("</tbody></table></div>");
    if !j.state.is_terminal() {
        body.push_str(&format!(
            r#"<form class="cancel" method="post" action="/jobs/{id}/cancel"><input type="hidden" name="csrf" value="{csrf}"><button type="submit">Cancel this job</button></form>"#,
            id = esc(&j.id),
            csrf = esc(&session.csrf)
        ));
    }
    let live = format!(r#" data-live="job" data-job="{}""#, esc(&j.id));
    page_live(StatusCode::OK, "Job", Some((&who, &session)), &body, &live)
}

pub(super) async fn cancel_job(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let (who, session, _) = match posted(&s, &headers, &body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    match s.cancel(&who, &id).await {
        Ok(Some(j)) => see_other(&format!("/jobs/{}", j.id)),
        Ok(None) => {
            let msg = format!(r#"<p role="alert">No job {}.</p>"#, esc(&id));
            page(StatusCode::NOT_FOUND, "Job", Some((&who, &session)), &msg)
        }
        Err(e) => unreadable("Job", "The job", e, (&who, &session)),
    }
}

/// A device's latest readings, as `key value` pairs (the scalar ones, at most eight).
fn readings(telemetry: Option<&Value>) -> String {
    let Some(Value::Object(m)) = telemetry else { return "–".into() };
    let pairs: Vec<String> = m
        .iter()
        .filter(|(_, v)| !v.is_object() && !v.is_array())
        .take(8)
        .map(|(k, v)| {
            let v = match v {
                // A hash or an id: its start says enough.
                Value::String(s) if s.chars().count() > 24 => format!("{}…", s.chars().take(12).collect::<String>()),
                Value::String(s) => s.clone(),
                Value::Number(n) => {
                    n.as_f64().map_or_else(|| n.to_string(), |f| format!("{}", (f * 100.0).round() / 100.0))
                }
                other => other.to_string(),
            };
            format!("{} {}", esc(k), esc(&v))
        })
        .collect();
    if pairs.is_empty() { "–".into() } else { pairs.join(" · ") }
}

pub(super) async fn fleet(State(s): State<AppState>, headers: HeaderMap, Query(q): Query<DoneParams>) -> Response {
    let (who, session) = match signed_in(&s, &headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    if let Err(r) = operator_only(&who, &session, "Fleet", "The fleet is the operator's.") {
        return *r;
    }
    let now = now_ms();
    let (devices, tasks, drained) =
        match (s.store.devices().await, s.store.tasks(None, None, 200).await, s.store.drained().await) {
            (Ok(d), Ok(t), Ok(w)) => (d, t, w),
            (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
                return unreadable("Fleet", "The fleet", e, (&who, &session));
            }
        };
    let mut body = String::new();
    if let Some(done) = q.done {
        body.push_str(&format!(r#"<p class="done" role="status">{}</p>"#, esc(&done)));
    }
    body.push_str(r#"<section aria-labelledby="devices"><h2 id="devices">Devices</h2>"#);
    if devices.is_empty() {
        body.push_str("<p>No device has reported yet.</p>");
    } else {
        body.push_str(
            r#"<div class="scroll"><table><thead><tr><th scope="col">Device</th><th scope="col">State</th><th scope="col">Last telemetry</th><th scope="col">Readings</th><th scope="col">Latest tasks</th></tr></thead><tbody>"#,
        );
        for d in &devices {
            let theirs: String = tasks
                .iter()
                .filter(|t| t.device_id == d.id)
                .take(3)
                .map(|t| {
                    format!(
                        r#"<li>{} {} <span class="meta">{}</span></li>"#,
                        t.kind.as_str(),
                        badge(t.state.as_str()),
                        ago(now, t.updated_ms)
                    )
                })
                .collect();
            let theirs = if theirs.is_empty() { "none".into() } else { format!(r#"<ul class="tasks">{theirs}</ul>"#) };
            let detail =
                d.detail.as_deref().map(|x| format!(r#"<span class="meta"> {}</span>"#, esc(x))).unwrap_or_default();
            let drops = if d.spool_dropped > 0 {
                format!(r#"<br><span class="meta">{} spooled readings dropped</span>"#, d.spool_dropped)
            } else {
                String::new()
            };
            body.push_str(&format!(
                r#"<tr data-device="{id}"><th scope="row"><code>{id}</code><br><span class="meta">{kind} · v{version}</span></th><td>{state}{detail}</td><td>{telemetry}{drops}</td><td>{readings}</td><td>{theirs}</td></tr>"#,
                id = esc(&d.id),
                kind = esc(&d.kind),
                version = esc(&d.version),
                state = badge(&d.state),
                telemetry = d.telemetry_ms.map_or_else(|| "never".to_owned(), |t| ago(now, t)),
                readings = readings(d.telemetry.as_ref()),
            ));
        }
        body.push_str("</tbody></table></div>");
    }
    body.push_str("</section>");
    body.push_str(&workers_section(&s, &session, now, &drained));
    page_live(StatusCode::OK, "Fleet", Some((&who, &session)), &body, r#" data-live="fleet""#)
}

fn workers_section(s: &Scheduler, session: &Session, now: i64, drained: &[crate::store::DrainedWorker]) -> String {
    let workers = s.registry.list(now);
    let csrf = esc(&session.csrf);
    let mut out = String::from(r#"<section aria-labelledby="workers"><h2 id="workers">Workers</h2>"#);
    if workers.is_empty() && drained.is_empty() {
        out.push_str("<p>No worker has been heard from.</p></section>");
        return out;
    }
    out.push_str(
        r#"<div class="scroll"><table><thead><tr><th scope="col">Worker</th><th scope="col">State</th><th scope="col">Backend</th><th scope="col">Tiers</th><th scope="col">In flight</th><th scope="col">GPU</th><th scope="col">Last heard</th><th scope="col">Action</th></tr></thead><tbody>"#,
    );
    for w in &workers {
        let hb = &w.heartbeat;
        let wid = esc(&hb.worker_id);
        let reason = w
            .drained_reason
            .as_deref()
            .map(|r| format!(r#"<br><span class="meta">{}</span>"#, esc(r)))
            .unwrap_or_default();
        let gpu = match (hb.memory_used_bytes, hb.memory_bytes, hb.utilization_percent) {
            (Some(used), Some(total), util) => format!(
                "{:.1} of {:.1} GiB{}",
                used as f64 / f64::from(1 << 30),
                total as f64 / f64::from(1 << 30),
                util.map(|u| format!(", {u}% busy")).unwrap_or_default()
            ),
            (None, Some(total), _) => format!("{:.1} GiB", total as f64 / f64::from(1 << 30)),
            _ => "–".into(),
        };
        let action = if w.drained_reason.is_some() {
            format!(
                r#"<form class="resume" method="post" action="/fleet/workers/{wid}"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="action" value="resume"><button type="submit">Resume</button></form>"#
            )
        } else {
            format!(
                r#"<form class="drain" method="post" action="/fleet/workers/{wid}"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="action" value="drain">
<label for="why-{wid}">Why</label><input type="text" id="why-{wid}" name="reason" maxlength="200"><button type="submit">Drain</button></form>"#
            )
        };
        let tiers: Vec<&str> = hb.tiers.iter().map(|t| t.as_str()).collect();
        out.push_str(&format!(
            r#"<tr data-worker="{wid}"><th scope="row"><code>{wid}</code><br><span class="meta">{host}</span></th><td>{state}{reason}</td><td>{backend}<br><span class="meta">{adapter}</span></td><td>{tiers}</td><td>{in_flight} of {concurrency}</td><td>{gpu}</td><td>{heard}</td><td>{action}</td></tr>"#,
            host = esc(&hb.host),
            state = badge(w.state),
            backend = esc(&hb.backend),
            adapter = esc(&hb.adapter),
            tiers = tiers.join(", "),
            in_flight = hb.in_flight,
            concurrency = hb.concurrency,
            heard = ago(now, w.last_seen_ms),
        ));
    }
    // Drained workers not heard from lately: resumable all the same.
    for d in drained.iter().filter(|d| !workers.iter().any(|w| w.heartbeat.worker_id == d.worker_id)) {
        let wid = esc(&d.worker_id);
        out.push_str(&format!(
            r#"<tr data-worker="{wid}"><th scope="row"><code>{wid}</code></th><td>{}<br><span class="meta">{}</span></td><td colspan="4">not heard from</td><td>{}</td><td><form class="resume" method="post" action="/fleet/workers/{wid}"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="action" value="resume"><button type="submit">Resume</button></form></td></tr>"#,
            badge("drained"),
            esc(&d.reason),
            ago(now, d.at_ms),
        ));
    }
    out.push_str("</tbody></table></div></section>");
    out
}

pub(super) async fn act_on_worker(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let (who, session, fields) = match operator_posted(&s, &headers, &body, "Fleet", "The fleet is the operator's.") {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let done = match field(&fields, "action") {
        Some("drain") => super::super::drain(&s, &id, field(&fields, "reason")).await.map(|()| "drained"),
        Some("resume") => super::super::resume(&s, &id).await.map(|()| "resumed"),
        other => Err(super::super::ApiError::invalid("action", format!("{other:?}: expected drain or resume"))),
    };
    match done {
        Ok(what) => see_other(&format!("/fleet?done={}", query_value(&format!("Worker {id} {what}.")))),
        Err(e) => {
            let (status, message) = api_error(e);
            let msg = format!(r#"<p role="alert">{}</p><p><a href="/fleet">Back to the fleet</a></p>"#, esc(&message));
            page(status, "Fleet", Some((&who, &session)), &msg)
        }
    }
}

#[derive(serde::Deserialize)]
pub(super) struct GalleryParams {
    q: Option<String>,
    before: Option<String>,
}

/// The gallery's assets: those whose prompt holds every word of `words`, newest first, after
/// `before`; at most a page, and whether more may follow.
async fn gallery_page(
    s: &Scheduler,
    who: &Caller,
    words: &[String],
    mut before: Option<(i64, String)>,
) -> Result<(Vec<GalleryItem>, bool), crate::store::StoreError> {
    let mut found = Vec::new();
    // The store matches the words anywhere in the request; the prompt is checked here, a few
    // pages at most.
    for _ in 0..8 {
        let q = GalleryQuery {
            client: (who.role != Role::Operator).then(|| who.name.clone()),
            words: words.iter().take(GALLERY_WORDS).cloned().collect(),
            before: before.clone(),
            limit: GALLERY_PAGE,
        };
        let got = s.store.gallery(q).await?;
        let full = got.len() == GALLERY_PAGE as usize;
        before = got.last().map(|g| (g.created_ms, g.asset.clone()));
        for g in got {
            let prompt = g.job.request.prompt.to_lowercase();
            if words.iter().all(|w| prompt.contains(w.as_str())) {
                found.push(g);
            }
        }
        if found.len() >= GALLERY_PAGE as usize {
            found.truncate(GALLERY_PAGE as usize);
            return Ok((found, true));
        }
        if !full {
            return Ok((found, false));
        }
    }
    Ok((found, true))
}

pub(super) async fn gallery(State(s): State<AppState>, headers: HeaderMap, Query(q): Query<GalleryParams>) -> Response {
    let (who, session) = match signed_in(&s, &headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let text = q.q.unwrap_or_default();
    let words: Vec<String> = text.split_whitespace().map(str::to_lowercase).collect();
    let before = q.before.as_deref().and_then(|b| {
        let (ms, hash) = b.split_once('-')?;
        Some((ms.parse().ok()?, hash.to_owned()))
    });
    let (items, more) = match gallery_page(&s, &who, &words, before).await {
        Ok(x) => x,
        Err(e) => return unreadable("Gallery", "The gallery", e, (&who, &session)),
    };
    let mut body = format!(
        r#"<form class="search" method="get" action="/gallery" role="search"><span class="field"><label for="q">Prompt words</label><input type="search" id="q" name="q" value="{}"></span><button type="submit">Search</button></form>"#,
        esc(&text)
    );
    if items.is_empty() {
        body.push_str(if words.is_empty() {
            "<p>Nothing rendered yet.</p>"
        } else {
            "<p>No asset's prompt has all those words.</p>"
        });
    }
    body.push_str(r#"<ul class="gallery">"#);
    for g in &items {
        let r = &g.job.request;
        body.push_str(&format!(
            r#"<li><a href="/gallery/{a}"><img src="/v1/assets/{a}?variant=thumb" alt="{prompt}, seed {seed}" loading="lazy" width="160" height="160"></a><span class="caption">{prompt}</span><span class="meta">seed {seed} · {tier} {w}×{h}</span></li>"#,
            a = esc(&g.asset),
            prompt = esc(&r.prompt),
            seed = r.seed,
            tier = g.job.tier.as_str(),
            w = r.width,
            h = r.height,
        ));
    }
    body.push_str("</ul>");
    if let (true, Some(last)) = (more, items.last()) {
        body.push_str(&format!(
            r#"<p><a href="/gallery?q={}&amp;before={}-{}" rel="next">Older</a></p>"#,
            query_value(&text),
            last.created_ms,
            esc(&last.asset)
        ));
    }
    page(StatusCode::OK, "Gallery", Some((&who, &session)), &body)
}

/// A provenance record's field at `path` (keys), as text.
fn at_path<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => esc(s),
        Some(Value::Null) | None => "–".into(),
        Some(other) => esc(&other.to_string()),
    }
}

/// The asset's page: the picture, its provenance (who asked, its orders and approvals, model,
/// seed, backend, timings) and a way to reproduce it.
pub(super) async fn asset_page(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(hash): Path<String>,
    Query(q): Query<DoneParams>,
) -> Response {
    let (who, session) = match signed_in(&s, &headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let record = match readable_record(&s, &headers, &hash).await {
        Ok(r) => Value::Object(r),
        Err(e) => {
            let (status, message) = api_error(e);
            let msg = format!(r#"<p role="alert">{}</p>"#, esc(&message));
            return page(status, "Asset", Some((&who, &session)), &msg);
        }
    };
    let a = esc(&hash);
    let mut body = String::new();
    if let Some(done) = q.done {
        body.push_str(&format!(r#"<p class="done" role="status">{}</p>"#, esc(&done)));
    }
    let req = |k: &str| text(at_path(&record, &["request", k]));
    let timings: String = match record.get("timings") {
        Some(Value::Object(t)) => {
            t.iter().map(|(k, v)| format!("{} {}", esc(k), esc(&v.to_string()))).collect::<Vec<_>>().join(" · ")
        }
        _ => "–".into(),
    };
    let asked = match record.get("asked_by") {
        Some(Value::Object(a)) => {
            let job = a.get("job").and_then(Value::as_str).unwrap_or_default();
            format!(r#"{} (job <a href="/jobs/{1}"><code>{1}</code></a>)"#, text(a.get("client")), esc(job))
        }
        _ => "–".into(),
    };
    body.push_str(&format!(
        r#"<figure class="hero"><a href="/v1/assets/{a}"><img src="/v1/assets/{a}?variant=thumb" alt="{prompt}" width="256" height="256"></a><figcaption><a href="/v1/assets/{a}">The whole PNG</a></figcaption></figure>
<dl class="facts"><dt>Asset</dt><dd><code>{a}</code></dd><dt>Prompt</dt><dd>{prompt}</dd><dt>Seed</dt><dd>{seed}</dd>
<dt>Tier</dt><dd>{tier}, {w}×{h}, samples per axis {samples}</dd><dt>Asked by</dt><dd>{asked}</dd>
<dt>Model</dt><dd>{model} {version} ({path})</dd><dt>Backend</dt><dd>{backend} on {device}</dd><dt>Post chain</dt><dd>{post}</dd><dt>Timings</dt><dd>{timings}</dd></dl>"#,
        prompt = req("prompt"),
        seed = req("seed"),
        tier = req("tier"),
        w = req("width"),
        h = req("height"),
        samples = req("samples"),
        model = text(at_path(&record, &["model", "id"])),
        version = text(at_path(&record, &["model", "version"])),
        path = text(at_path(&record, &["model", "path"])),
        backend = text(record.get("backend")),
        device = text(record.get("device")),
        post = text(record.get("post_chain_version")),
    ));
    if let Some(Value::Array(orders)) = record.get("orders") {
        body.push_str(r#"<h2>Orders</h2><ul class="orders">"#);
        for o in orders {
            let approval = match o.get("approval") {
                Some(ap) if ap.is_object() => format!(
                    " · approval: {} by {} at {}{}",
                    text(ap.get("state")),
                    text(ap.get("decided_by")),
                    text(ap.get("decided_at")),
                    ap.get("option").map(|n| format!(", option {}", text(Some(n)))).unwrap_or_default()
                ),
                _ => String::new(),
            };
            let id = o.get("order").and_then(Value::as_str).unwrap_or_default();
            body.push_str(&format!(
                r#"<li><a href="/orders/{0}"><code>{0}</code></a> · {1} · step {2}{approval}</li>"#,
                esc(id),
                text(o.get("plan")),
                text(o.get("step")),
            ));
        }
        body.push_str("</ul>");
    }
    body.push_str(&format!(
        r#"<h2>Reproduce</h2><p>On any machine with <code>kiln</code>: <code class="command">kiln reproduce {a}</code> renders it again from this record alone and compares the bytes.</p>
<form class="reproduce" method="post" action="/gallery/{a}/reproduce"><input type="hidden" name="csrf" value="{csrf}"><button type="submit">Reproduce on the scheduler</button> <span class="hint">renders it again here, on the scheduler's engine (up to 2048×2048)</span></form>
<details><summary>The whole record</summary><pre>{json}</pre></details>"#,
        csrf = esc(&session.csrf),
        json = esc(&serde_json::to_string_pretty(&record).unwrap_or_default()),
    ));
    page(StatusCode::OK, "Asset", Some((&who, &session)), &body)
}

/// The asset's provenance, when the caller may read it.
async fn readable_record(
    s: &Scheduler,
    headers: &HeaderMap,
    hash: &str,
) -> Result<serde_json::Map<String, Value>, super::super::ApiError> {
    super::super::assets::check_hash(hash)?;
    super::super::assets::may_read(s, headers, hash).await?;
    super::super::assets::provenance_record(s, hash).await
}

pub(super) async fn reproduce(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(hash): Path<String>,
    body: Bytes,
) -> Response {
    let (who, session, _) = match posted(&s, &headers, &body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let outcome = reproduce_here(&s, &headers, &hash).await;
    match outcome {
        Ok(said) => see_other(&format!("/gallery/{hash}?done={}", query_value(&said))),
        Err(e) => {
            let (status, message) = api_error(e);
            let msg = format!(
                r#"<p role="alert">{}</p><p><a href="/gallery/{}">Back to the asset</a></p>"#,
                esc(&message),
                esc(&hash)
            );
            page(status, "Asset", Some((&who, &session)), &msg)
        }
    }
}

/// Renders asset `hash` again from its provenance on the scheduler's engine; what it found.
async fn reproduce_here(s: &AppState, headers: &HeaderMap, hash: &str) -> Result<String, super::super::ApiError> {
    use super::super::ApiError;
    let record = Value::Object(readable_record(s, headers, hash).await?);
    let record = kiln_worker::reproduce::read_record(&record).map_err(|e| ApiError::conflict(e.to_string()))?;
    let pixels = u64::from(record.request.width) * u64::from(record.request.height);
    if pixels > REPRODUCE_MAX_PIXELS {
        return Err(ApiError::conflict(format!(
            "the asset is {}×{}, larger than the scheduler renders for the console (2048×2048); run `kiln reproduce {hash}` on a machine with a GPU",
            record.request.width, record.request.height
        )));
    }
    let original = super::super::assets::asset_bytes(s, hash).await?;
    let worker = s.worker.clone();
    let verdict = tokio::task::spawn_blocking(move || {
        kiln_worker::reproduce::reproduce(&record, &original, worker.engine(), &mut |_| {})
    })
    .await
    .map_err(|e| ApiError::internal(&e))?
    .map_err(|e| ApiError::conflict(e.to_string()))?;
    tracing::info!(asset = hash, verified = verdict.verified, "console: reproduced an asset");
    let said = if verdict.verified { "Reproduced" } else { "NOT reproduced" };
    Ok(format!("{said} on the scheduler's {}: {}", verdict.backend, verdict.summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_in_words() {
        assert_eq!(ago(100_000, 100_000), "0 s ago");
        assert_eq!(ago(100_000, 200_000), "0 s ago");
        assert_eq!(ago(600_000, 0), "10 min ago");
        assert_eq!(ago(7_200_000, 0), "2 h ago");
        assert_eq!(ago(3 * 86_400_000, 0), "3 days ago");
    }

    #[test]
    fn readings_show_the_scalars() {
        let t = serde_json::json!({ "temp_c": 41.234, "state": "idle", "nested": { "x": 1 } });
        assert_eq!(readings(Some(&t)), "state idle · temp_c 41.23");
        assert_eq!(readings(None), "–");
    }
}
