//! The conductor: runs studio orders, each a plan of steps (`render`, `approve`, `device`) kept as
//! one durable document with a checkpoint per step.
//!
//! It is event-driven. [`advance`] looks at an order, does what its current step needs (submits
//! its renders, opens its approval, sends its device task), and says what the order now waits on
//! in [`crate::waits::OrderWaits`]; a job or task ending, a device announcing itself, an approval
//! decided or a timer wakes it again. Nothing polls, and an order waiting holds no worker.
//!
//! Steps are idempotent by order + step + attempt: a render is submitted with the idempotency key
//! `order-{id}-{step}-{attempt}-{n}` and a device task has the id `t-{id}-{step}-{attempt}`, so
//! after a crash between doing a step and writing its checkpoint, doing it again finds what was
//! done (the same jobs, the same task) instead of doing it twice. Every change is a
//! compare-and-set of the order's document with the events that say what changed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::api::{self, NewOrder};
use kiln_protocol::fleet::{TaskKind, TaskState};
use kiln_protocol::{JobRequest, JobState, Tier, now_ms};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::auth::{Caller, Role};
use crate::scheduler::Scheduler;
use crate::store::StoreError;
use crate::store::fleet::NewTask;
use crate::store::orders::{NewOrderEvent, OrderRow};

/// The plan built in.
pub const GALLERY_PRINT: &str = "gallery-print";

/// Most seeds an order may preview.
pub const MAX_SEEDS: usize = 16;

/// What a step does.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    /// Render the order's prompt at a tier: every seed, or the one the approval chose.
    Render { tier: Tier, chosen: bool },
    /// The operator chooses one of the previous render's assets, or rejects them all.
    Approve,
    /// A device task: on the asset of the named render step, with these parameters.
    Device { task: TaskKind, asset_of: Option<String>, params: Map<String, Value> },
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Render { .. } => "render",
            Kind::Approve => "approve",
            Kind::Device { .. } => "device",
        }
    }
}

/// A step of a plan.
#[derive(Debug, Clone)]
struct PlanStep {
    name: String,
    kind: Kind,
}

/// `gallery-print`: preview each seed → approve one → final render → print render → print →
/// lights for photography → photograph the print → show the final asset on the gallery display.
fn gallery_print(cfg: &crate::config::OrdersConfig) -> Vec<PlanStep> {
    let render = |name: &str, tier, chosen| PlanStep { name: name.into(), kind: Kind::Render { tier, chosen } };
    let device = |name: &str, task, asset_of: Option<&str>, params: Value| PlanStep {
        name: name.into(),
        kind: Kind::Device {
            task,
            asset_of: asset_of.map(str::to_owned),
            params: params.as_object().cloned().unwrap_or_default(),
        },
    };
    vec![
        render("preview", Tier::Preview, false),
        PlanStep { name: "approve".into(), kind: Kind::Approve },
        render("final", Tier::Final, true),
        render("print_render", Tier::Print, true),
        device("print", TaskKind::Print, Some("print_render"), json!({})),
        device(
            "lights",
            TaskKind::Lights,
            None,
            json!({ "scene": cfg.photo_scene, "brightness": cfg.photo_brightness }),
        ),
        device("photo", TaskKind::Capture, None, json!({})),
        device("display", TaskKind::Display, Some("final"), json!({})),
    ]
}

/// A plan by name: the built-in one, or one of the config's `[[plans]]` (checked at start, so
/// every step here is well formed).
fn plan(name: &str, cfg: &crate::config::SchedulerConfig) -> Option<Vec<PlanStep>> {
    if name == GALLERY_PRINT {
        return Some(gallery_print(&cfg.orders));
    }
    let p = cfg.plans.iter().find(|p| p.name == name)?;
    p.steps
        .iter()
        .map(|s| {
            let kind = match s.kind.as_str() {
                "render" => Kind::Render { tier: s.tier?, chosen: s.chosen },
                "approve" => Kind::Approve,
                _ => Kind::Device {
                    task: s.task.as_deref()?.parse().ok()?,
                    asset_of: s.asset.clone(),
                    params: s.params.clone(),
                },
            };
            Some(PlanStep { name: s.name.clone(), kind })
        })
        .collect()
}

/// The plans an order may name.
fn plan_names(cfg: &crate::config::SchedulerConfig) -> String {
    let mut names = vec![GALLERY_PRINT];
    names.extend(cfg.plans.iter().map(|p| p.name.as_str()));
    names.join(", ")
}

/// An order's document: what it asked, and each step's checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Doc {
    prompt: String,
    seeds: Vec<u64>,
    model: Option<String>,
    steps: Vec<Step>,
    /// The step under way (steps before it ended).
    current: usize,
    /// The index into `seeds` the approval chose.
    chosen: Option<usize>,
    approval: Option<ApprovalDoc>,
    outputs: BTreeMap<String, String>,
    error: Option<String>,
    expires_ms: i64,
    approval_timeout_ms: Option<i64>,
    /// What its renders were estimated to cost when it was placed, weighted device-ms.
    #[serde(default)]
    estimate_ms: Option<i64>,
}

/// A step's checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Step {
    name: String,
    kind: String,
    state: String,
    attempt: u32,
    jobs: Vec<String>,
    assets: Vec<String>,
    task: Option<String>,
    device: Option<String>,
    started_ms: Option<i64>,
    ended_ms: Option<i64>,
    detail: Option<String>,
    /// When a retry may go (a device step's backoff).
    retry_at_ms: Option<i64>,
    /// Since when it waits for a ready device.
    waiting_since_ms: Option<i64>,
    /// The attempts made before the operator last retried it: its attempts go on counting from
    /// there (each attempt's job keys and task id stay its own), its tries start over.
    #[serde(default)]
    retried: u32,
}

impl Step {
    /// The attempts made since the step started, or since the operator last retried it.
    fn tries(&self) -> u32 {
        self.attempt.saturating_sub(self.retried)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ApprovalDoc {
    step: String,
    state: String,
    options: Vec<api::ApprovalOption>,
    created_ms: i64,
    due_ms: Option<i64>,
    decided_by: Option<String>,
    decided_ms: Option<i64>,
    option: Option<u32>,
    reason: Option<String>,
}

/// Why an order call was refused.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// The request is wrong: the message starts with the field.
    #[error("{0}")]
    Invalid(String),
    /// No such order or approval (or not the caller's).
    #[error("{0}")]
    NotFound(String),
    /// It cannot be done in its present state.
    #[error("{0}")]
    Conflict(String),
    /// Its renders would pass the token's budget.
    #[error(transparent)]
    OverBudget(#[from] crate::costs::OverBudget),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a step's look at the world came to.
enum Progress {
    /// The step is done: on to the next.
    Next,
    /// Waiting (on what is registered); look again at `Some(ms)` by the clock too.
    Wait(Option<i64>),
    /// The order ends so: its state and why.
    End(&'static str, String),
}

/// One change being made to an order: its document and the events that say what changed.
struct Change<'a> {
    id: &'a str,
    doc: Doc,
    state: String,
    events: Vec<NewOrderEvent>,
    now: i64,
}

impl Change<'_> {
    fn event(&mut self, step: Option<&str>, state: &str, detail: impl Into<String>) {
        self.events.push(NewOrderEvent {
            step: step.map(str::to_owned),
            state: state.to_owned(),
            detail: detail.into(),
        });
    }

    fn step_state(&mut self, i: usize, state: &str, detail: Option<String>) {
        let now = self.now;
        let s = &mut self.doc.steps[i];
        if s.state == state && s.detail == detail {
            return;
        }
        s.state = state.to_owned();
        s.detail.clone_from(&detail);
        if state == "running" && s.started_ms.is_none() {
            s.started_ms = Some(now);
        }
        if ["succeeded", "failed", "skipped", "cancelled"].contains(&state) {
            s.ended_ms = Some(now);
        }
        let name = s.name.clone();
        self.event(Some(&name), state, detail.unwrap_or_default());
    }

    /// Ends the order: the current step (if one) as `step_end`, the rest skipped.
    fn end(&mut self, state: &str, why: String, step_end: &str) {
        let from = self.doc.current;
        for i in from..self.doc.steps.len() {
            let s = if i == from { step_end } else { "skipped" };
            if !["succeeded", "failed", "skipped", "cancelled"].contains(&self.doc.steps[i].state.as_str()) {
                let detail = (i == from).then(|| why.clone()).or_else(|| Some(format!("skipped: the order {state}")));
                self.step_state(i, s, detail);
            }
        }
        if state != "succeeded" {
            self.doc.error = Some(why.clone());
        }
        self.state = state.to_owned();
        self.event(None, state, why);
    }
}

/// What an order of `req` would be: its plan's steps and the renders it would make (every seed
/// previewed, one carried on), each checked as a render of it would be.
fn planned(
    sched: &Scheduler,
    req: &NewOrder,
) -> Result<(Vec<PlanStep>, Vec<kiln_protocol::RenderRequest>), OrderError> {
    let steps = plan(&req.plan, &sched.cfg).ok_or_else(|| {
        OrderError::Invalid(format!("plan: {:?} is not a plan here (known: {})", req.plan, plan_names(&sched.cfg)))
    })?;
    if req.seeds.is_empty() || req.seeds.len() > MAX_SEEDS {
        return Err(OrderError::Invalid(format!("seeds: give 1 to {MAX_SEEDS} seeds, not {}", req.seeds.len())));
    }
    if let Some(dup) = req.seeds.iter().enumerate().find(|(i, s)| req.seeds[..*i].contains(s)) {
        return Err(OrderError::Invalid(format!("seeds: {} is given twice", dup.1)));
    }
    // The prompt and model are checked as a render of them would be, before anything starts.
    let probe = JobRequest {
        prompt: req.prompt.clone(),
        seed: Some(req.seeds[0]),
        tier: Tier::Preview,
        width: None,
        height: None,
        samples: None,
        model: req.model.clone(),
        idempotency_key: None,
    };
    sched.resolve(&probe).map_err(|e| OrderError::Invalid(e.to_string()))?;
    let mut renders = Vec::new();
    for step in &steps {
        if let Kind::Render { tier, chosen } = step.kind {
            let seeds = if chosen { &req.seeds[..1] } else { &req.seeds[..] };
            for seed in seeds {
                let r = JobRequest { seed: Some(*seed), tier, ..probe.clone() };
                renders.push(sched.resolve(&r).map_err(|e| OrderError::Invalid(e.to_string()))?);
            }
        }
    }
    Ok((steps, renders))
}

/// What an order of `req` is estimated to cost, placing nothing: `POST /v1/orders?dry_run=true`.
pub fn estimate(sched: &Scheduler, req: &NewOrder) -> Result<api::OrderEstimate, OrderError> {
    let (_, renders) = planned(sched, req)?;
    let estimated_cost_ms = sched.estimate_all_ms(&renders).round() as i64;
    Ok(api::OrderEstimate { plan: req.plan.clone(), renders: renders.len(), estimated_cost_ms })
}

/// Places an order: checked whole (plan, seeds, prompt, model, the token's budget) before
/// anything starts; then written and started. Returns its id.
pub async fn create(sched: &Arc<Scheduler>, who: &Caller, req: NewOrder) -> Result<String, OrderError> {
    let (steps, renders) = planned(sched, &req)?;
    // What its renders would cost, checked against the token's budget before anything is placed.
    let estimate_ms = sched.estimate_all_ms(&renders).round() as i64;
    let _budget = sched.within_budget(who, &renders).await.map_err(|e| match e {
        crate::scheduler::SubmitError::OverBudget(o) => OrderError::OverBudget(o),
        crate::scheduler::SubmitError::Store(s) => OrderError::Store(s),
        e => OrderError::Invalid(e.to_string()),
    })?;
    let now = now_ms();
    let secs = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
    let id = format!("o{:011x}{:012x}", now, sched.random() >> 16);
    let doc = Doc {
        prompt: req.prompt,
        seeds: req.seeds,
        model: req.model,
        steps: steps
            .iter()
            .map(|p| Step {
                name: p.name.to_owned(),
                kind: p.kind.name().to_owned(),
                state: "pending".into(),
                attempt: 0,
                jobs: Vec::new(),
                assets: Vec::new(),
                task: None,
                device: None,
                started_ms: None,
                ended_ms: None,
                detail: None,
                retry_at_ms: None,
                waiting_since_ms: None,
                retried: 0,
            })
            .collect(),
        current: 0,
        chosen: None,
        approval: None,
        outputs: BTreeMap::new(),
        error: None,
        expires_ms: now.saturating_add(secs(req.expires_in_seconds.unwrap_or(30 * 24 * 3600))),
        approval_timeout_ms: req.approval_timeout_seconds.map(secs),
        estimate_ms: Some(estimate_ms),
    };
    let row = OrderRow {
        id: id.clone(),
        plan: req.plan,
        client: who.name.clone(),
        state: "running".into(),
        doc: serde_json::to_string(&doc).unwrap_or_default(),
        version: 1,
        created_ms: now,
        updated_ms: now,
    };
    let placed = NewOrderEvent { step: None, state: "running".into(), detail: format!("placed by {}", who.name) };
    store_order(sched, row, 0, vec![placed]).await?;
    tracing::info!(order = id, by = who.name, "order placed");
    sched.order_waits.wake(&id);
    Ok(id)
}

/// An order as the API shows it, if the caller may see it.
pub async fn view(sched: &Scheduler, who: &Caller, id: &str, events: bool) -> Result<Option<api::Order>, StoreError> {
    let Some(row) = sched.store.order(id).await?.filter(|r| who.may_see(&r.client)) else { return Ok(None) };
    let mut order = order_view(&row)?;
    if events {
        let list = sched.store.order_events(id).await?;
        order.events = Some(
            list.into_iter()
                .map(|e| api::OrderEvent {
                    at: crate::time::rfc3339(e.at_ms),
                    step: e.step,
                    state: e.state,
                    detail: e.detail,
                })
                .collect(),
        );
    }
    Ok(Some(order))
}

fn parse_doc(row: &OrderRow) -> Result<Doc, StoreError> {
    serde_json::from_str(&row.doc).map_err(|e| StoreError::Corrupt { what: "order document", message: e.to_string() })
}

/// The API's view of an order row.
pub fn order_view(row: &OrderRow) -> Result<api::Order, StoreError> {
    let doc = parse_doc(row)?;
    let at = |ms: Option<i64>| ms.map(crate::time::rfc3339);
    Ok(api::Order {
        id: row.id.clone(),
        plan: row.plan.clone(),
        state: row.state.clone(),
        client: row.client.clone(),
        prompt: doc.prompt.clone(),
        seeds: doc.seeds.clone(),
        chosen_seed: doc.chosen.and_then(|i| doc.seeds.get(i).copied()),
        steps: doc
            .steps
            .iter()
            .map(|s| api::OrderStep {
                name: s.name.clone(),
                kind: s.kind.clone(),
                state: s.state.clone(),
                attempt: s.attempt,
                jobs: s.jobs.clone(),
                assets: s.assets.clone(),
                task: s.task.clone(),
                device: s.device.clone(),
                started_at: at(s.started_ms),
                ended_at: at(s.ended_ms),
                detail: s.detail.clone(),
            })
            .collect(),
        approval: doc.approval.as_ref().map(|a| approval_view(row, &doc, a)),
        outputs: doc.outputs.clone(),
        error: doc.error.clone(),
        created_at: crate::time::rfc3339(row.created_ms),
        updated_at: crate::time::rfc3339(row.updated_ms),
        expires_at: crate::time::rfc3339(doc.expires_ms),
        estimated_cost_ms: doc.estimate_ms,
        events: None,
    })
}

fn approval_view(row: &OrderRow, doc: &Doc, a: &ApprovalDoc) -> api::Approval {
    api::Approval {
        id: approval_id(&row.id, &a.step),
        order: row.id.clone(),
        step: a.step.clone(),
        state: a.state.clone(),
        prompt: doc.prompt.clone(),
        options: a.options.clone(),
        created_at: crate::time::rfc3339(a.created_ms),
        due_at: a.due_ms.map(crate::time::rfc3339),
        decided_by: a.decided_by.clone(),
        decided_at: a.decided_ms.map(crate::time::rfc3339),
        option: a.option,
        reason: a.reason.clone(),
        estimated_cost_ms: None,
    }
}

/// The order, step and attempt an order's render job was submitted for, from its idempotency
/// key (`order-{order}-{step}-{attempt}-{n}`).
fn order_of_key(key: &str) -> Option<(&str, &str)> {
    let (order, rest) = key.strip_prefix("order-")?.split_once('-')?;
    let mut back = rest.rsplitn(3, '-');
    let (_n, _attempt, step) = (back.next()?, back.next()?, back.next()?);
    Some((order, step))
}

/// What an asset's provenance adds to the worker's record: who asked for it (the first job that
/// has it) and, for each order whose render made or was answered by it, the order, its step and
/// its approval (who decided, when, which option, why).
pub async fn provenance_of(sched: &Scheduler, hash: &str) -> Result<Map<String, Value>, StoreError> {
    let jobs = sched.store.asset_jobs(hash, 50).await?;
    let mut out = Map::new();
    if let Some(first) = jobs.first() {
        out.insert(
            "asked_by".into(),
            json!({ "client": first.client, "job": first.id, "at": crate::time::rfc3339(first.created_ms) }),
        );
    }
    let mut orders = Vec::new();
    let mut seen = BTreeSet::new();
    for j in &jobs {
        let Some((order, step)) = j.idempotency_key.as_deref().and_then(order_of_key) else { continue };
        // Only the order's own renders: a key is the client's to choose.
        let Some(row) = sched.store.order(order).await?.filter(|r| r.client == j.client) else { continue };
        if !seen.insert((order.to_owned(), step.to_owned())) {
            continue;
        }
        let doc = parse_doc(&row)?;
        let approval = doc.approval.as_ref().filter(|a| a.decided_by.is_some()).map(|a| {
            json!({
                "id": approval_id(&row.id, &a.step),
                "state": a.state,
                "decided_by": a.decided_by,
                "decided_at": a.decided_ms.map(crate::time::rfc3339),
                "option": a.option,
                "reason": a.reason,
            })
        });
        orders.push(json!({
            "order": row.id,
            "plan": row.plan,
            "client": row.client,
            "step": step,
            "job": j.id,
            "approval": approval,
        }));
    }
    if !orders.is_empty() {
        out.insert("orders".into(), Value::Array(orders));
    }
    Ok(out)
}

fn approval_id(order: &str, step: &str) -> String {
    format!("{order}.{step}")
}

/// The approvals of orders awaiting one (pending), oldest first; the caller's orders only,
/// unless an operator.
pub async fn pending_approvals(sched: &Scheduler, who: &Caller) -> Result<Vec<api::Approval>, StoreError> {
    let client = (who.role != Role::Operator).then(|| who.name.clone());
    let pending = pending(sched, client).await?;
    let view = |(row, doc): &(OrderRow, Doc)| {
        let a = doc.approval.as_ref()?;
        Some(api::Approval { estimated_cost_ms: approving_costs(sched, row, doc, a), ..approval_view(row, doc, a) })
    };
    Ok(pending.iter().filter_map(view).collect())
}

/// What approving starts is estimated to cost, weighted device-ms: the renders of the chosen
/// seed that the plan's steps after the approval make. `None` when the plan is no longer known.
fn approving_costs(sched: &Scheduler, row: &OrderRow, doc: &Doc, a: &ApprovalDoc) -> Option<i64> {
    let steps = plan(&row.plan, &sched.cfg)?;
    let after = steps.iter().position(|p| p.name == a.step)? + 1;
    let seed = a.options.first().map_or(0, |o| o.seed);
    let renders: Vec<_> = steps[after..]
        .iter()
        .filter_map(|p| match p.kind {
            Kind::Render { tier, .. } => {
                let r = JobRequest {
                    prompt: doc.prompt.clone(),
                    seed: Some(seed),
                    tier,
                    width: None,
                    height: None,
                    samples: None,
                    model: doc.model.clone(),
                    idempotency_key: None,
                };
                sched.resolve(&r).ok()
            }
            _ => None,
        })
        .collect();
    Some(sched.estimate_all_ms(&renders).round() as i64)
}

/// When each pending approval opened, unix ms, oldest first (for the metrics).
pub async fn approvals_waiting_since(sched: &Scheduler) -> Result<Vec<i64>, StoreError> {
    let pending = pending(sched, None).await?;
    Ok(pending.iter().filter_map(|(_, doc)| doc.approval.as_ref().map(|a| a.created_ms)).collect())
}

/// The orders with a pending approval, oldest first; `client`'s only, if given.
async fn pending(sched: &Scheduler, client: Option<String>) -> Result<Vec<(OrderRow, Doc)>, StoreError> {
    // Only the orders awaiting one are read (an index on state).
    let q = crate::store::orders::OrderQuery {
        state: Some("awaiting_approval".into()),
        client,
        limit: u32::MAX,
        before: None,
    };
    let mut rows = sched.store.orders(q).await?;
    rows.reverse();
    let mut out = Vec::new();
    for row in rows {
        let doc = parse_doc(&row)?;
        if doc.approval.as_ref().is_some_and(|a| a.state == "pending") {
            out.push((row, doc));
        }
    }
    Ok(out)
}

/// Decides an approval: `approve` one option (from 1) or `reject` them all, with a reason.
pub async fn decide(
    sched: &Arc<Scheduler>,
    who: &Caller,
    id: &str,
    d: api::Decision,
) -> Result<api::Order, OrderError> {
    let (order_id, step) = id.rsplit_once('.').ok_or_else(|| OrderError::NotFound(format!("no approval {id:?}")))?;
    let reason = d.reason.filter(|r| !r.trim().is_empty());
    let option = match d.decision.as_str() {
        "approve" => Some(
            d.option.ok_or_else(|| OrderError::Invalid("option: approving needs the option chosen (from 1)".into()))?,
        ),
        "reject" if reason.is_none() => return Err(OrderError::Invalid("reason: rejecting needs a reason".into())),
        "reject" => None,
        other => return Err(OrderError::Invalid(format!("decision: {other:?} is not approve or reject"))),
    };
    let held = sched.order_waits.lock().await;
    let row = sched.store.order(order_id).await?.ok_or_else(|| OrderError::NotFound(format!("no approval {id:?}")))?;
    let mut doc = parse_doc(&row)?;
    let Some(a) = doc.approval.as_mut().filter(|a| a.step == step) else {
        return Err(OrderError::NotFound(format!("no approval {id:?}")));
    };
    if a.state != "pending" {
        return Err(OrderError::Conflict(format!(
            "approval {id} was {} by {} already",
            a.state,
            a.decided_by.as_deref().unwrap_or("?")
        )));
    }
    if let Some(n) = option
        && (n == 0 || n as usize > a.options.len())
    {
        return Err(OrderError::Invalid(format!("option: {n} is not one of 1 to {}", a.options.len())));
    }
    let now = now_ms();
    a.state = if option.is_some() { "approved" } else { "rejected" }.into();
    a.decided_by = Some(who.name.clone());
    a.decided_ms = Some(now);
    a.option = option;
    a.reason.clone_from(&reason);
    let detail = match option {
        Some(n) => format!(
            "{} approved option {n}{}",
            who.name,
            reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
        ),
        None => format!("{} rejected every option: {}", who.name, reason.unwrap_or_default()),
    };
    let event = NewOrderEvent { step: Some(step.to_owned()), state: a.state.clone(), detail };
    let next = OrderRow {
        doc: serde_json::to_string(&doc).unwrap_or_default(),
        version: row.version + 1,
        updated_ms: now,
        ..row.clone()
    };
    if !store_order(sched, next, row.version, vec![event]).await? {
        return Err(OrderError::Conflict(format!("order {order_id} changed meanwhile; try again")));
    }
    tracing::info!(order = order_id, by = who.name, option, "approval decided");
    drop(held);
    sched.order_waits.wake(order_id);
    view(sched, who, order_id, false).await?.ok_or_else(|| OrderError::NotFound(format!("no order {order_id}")))
}

/// Cancels an order at whatever step it is: its live renders are cancelled, and what follows
/// is skipped (an order cancelled after its print skips the photo and the display, and says so).
pub async fn cancel(sched: &Arc<Scheduler>, who: &Caller, id: &str) -> Result<api::Order, OrderError> {
    let held = sched.order_waits.lock().await;
    let row = sched
        .store
        .order(id)
        .await?
        .filter(|r| who.may_see(&r.client))
        .ok_or_else(|| OrderError::NotFound(format!("no order {id:?}")))?;
    if !is_live(&row.state) {
        return Err(OrderError::Conflict(format!("order {id} has ended ({})", row.state)));
    }
    let doc = parse_doc(&row)?;
    let now = now_ms();
    let mut c = Change { id, doc, state: row.state.clone(), events: Vec::new(), now };
    let at = c.doc.steps.get(c.doc.current).map(|s| s.name.clone()).unwrap_or_default();
    let done: Vec<String> =
        c.doc.steps[..c.doc.current].iter().filter(|s| s.kind == "device").map(|s| s.name.clone()).collect();
    for job in c.doc.steps.get(c.doc.current).map(|s| s.jobs.clone()).unwrap_or_default() {
        let _ = sched
            .cancel(&Caller { name: row.client.clone(), role: Role::Operator, devices: Vec::new(), budget: None }, &job)
            .await;
    }
    let why = if done.is_empty() {
        format!("cancelled by {} at step {at}", who.name)
    } else {
        format!("cancelled by {} at step {at}, after {}; the steps after it were skipped", who.name, done.join(", "))
    };
    c.end("cancelled", why, "cancelled");
    if !save(sched, &row, c).await? {
        return Err(OrderError::Conflict(format!("order {id} changed meanwhile; try again")));
    }
    sched.order_waits.forget(id);
    drop(held);
    view(sched, who, id, false).await?.ok_or_else(|| OrderError::NotFound(format!("no order {id:?}")))
}

/// Runs the failed step of a failed order again (an incident's `retry`): its tries start over,
/// under new attempt numbers, so no job key or task id of an attempt made is used again.
pub async fn retry(sched: &Arc<Scheduler>, id: &str, who: &str) -> Result<(), OrderError> {
    let held = sched.order_waits.lock().await;
    let row = sched.store.order(id).await?.ok_or_else(|| OrderError::NotFound(format!("no order {id:?}")))?;
    if row.state != "failed" {
        return Err(OrderError::Conflict(format!("order {id} is {}, not failed", row.state)));
    }
    let doc = parse_doc(&row)?;
    let mut c = Change { id, doc, state: "running".into(), events: Vec::new(), now: now_ms() };
    let from = c.doc.current;
    for i in from..c.doc.steps.len() {
        let s = &mut c.doc.steps[i];
        // Fresh tries under new attempt numbers: the attempts made keep their jobs and tasks.
        if s.attempt > 0 {
            (s.retried, s.attempt) = (s.attempt, s.attempt + 1);
        }
        (s.state, s.detail, s.ended_ms, s.retry_at_ms, s.waiting_since_ms) = ("pending".into(), None, None, None, None);
        (s.jobs, s.task, s.device) = (Vec::new(), None, None);
    }
    c.doc.error = None;
    c.event(None, "running", format!("{who} retried it from step {}", c.doc.steps[from].name));
    if !save(sched, &row, c).await? {
        return Err(OrderError::Conflict(format!("order {id} changed meanwhile; try again")));
    }
    drop(held);
    sched.order_waits.wake(id);
    Ok(())
}

fn is_live(state: &str) -> bool {
    state == "running" || state == "awaiting_approval"
}

/// Writes a change as a compare-and-set on the row it was made from.
async fn save(sched: &Scheduler, row: &OrderRow, c: Change<'_>) -> Result<bool, StoreError> {
    let next = OrderRow {
        state: c.state,
        doc: serde_json::to_string(&c.doc).unwrap_or_default(),
        version: row.version + 1,
        updated_ms: c.now,
        ..row.clone()
    };
    store_order(sched, next, row.version, c.events).await
}

/// Writes `next` over version `version` with its events, and announces it once written.
async fn store_order(
    sched: &Scheduler,
    next: OrderRow,
    version: i64,
    events: Vec<NewOrderEvent>,
) -> Result<bool, StoreError> {
    let change =
        crate::scheduler::OrderChange { id: next.id.clone(), client: next.client.clone(), state: next.state.clone() };
    let saved = sched.store.save_order(next, version, events).await?;
    if saved {
        sched.order_changed(change);
    }
    Ok(saved)
}

/// Runs the conductor until `stop`: every live order is looked at once at start (it resumes
/// from its checkpoint), then each as something it waits on happens, or its timer comes due.
pub async fn run(sched: Arc<Scheduler>, stop: CancellationToken) {
    let Some(mut woken) = sched.order_waits.receiver() else {
        tracing::error!("the conductor is already running");
        return;
    };
    let mut timers: BTreeSet<(i64, String)> = BTreeSet::new();
    match sched.store.live_orders().await {
        Ok(rows) => {
            if !rows.is_empty() {
                tracing::info!(orders = rows.len(), "resuming live orders");
            }
            for r in rows {
                sched.order_waits.wake(&r.id);
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read the live orders; they wait for their next event"),
    }
    loop {
        let next_timer = timers.first().map(|(ms, _)| *ms);
        let sleep = async {
            match next_timer {
                Some(ms) => tokio::time::sleep(Duration::from_millis(u64::try_from(ms - now_ms()).unwrap_or(0))).await,
                None => std::future::pending().await,
            }
        };
        let id = tokio::select! {
            () = stop.cancelled() => return,
            id = woken.recv() => match id { Some(id) => id, None => return },
            () = sleep => match timers.pop_first() { Some((_, id)) => id, None => continue },
        };
        let held = sched.order_waits.lock().await;
        let wake = advance_held(&sched, &id).await;
        drop(held);
        match wake {
            Ok(Some(ms)) => {
                timers.insert((ms, id));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(order = id, error = %e, "could not advance the order; trying again shortly");
                timers.insert((now_ms() + 2000, id));
            }
        }
    }
}

/// Advances an order as far as it goes now (the order lock held). Returns when, by the clock, it
/// must be looked at again, if ever (besides what it waits on).
async fn advance_held(sched: &Arc<Scheduler>, id: &str) -> Result<Option<i64>, StoreError> {
    // A change another writer made first is read again and redone (twice at most).
    for _ in 0..3 {
        let Some(row) = sched.store.order(id).await? else { return Ok(None) };
        sched.order_waits.forget(id);
        if !is_live(&row.state) {
            return Ok(None);
        }
        let doc = parse_doc(&row)?;
        let Some(steps) = plan(&row.plan, &sched.cfg) else {
            tracing::error!(order = id, plan = row.plan, "an order of a plan this farm does not know; left as it is");
            return Ok(None);
        };
        if steps.len() != doc.steps.len() || steps.iter().zip(&doc.steps).any(|(p, s)| p.name != s.name) {
            let summary = format!(
                "order {id}: plan {:?} in the config no longer has the steps the order was placed with; it waits until the plan is put back or the order is cancelled",
                row.plan
            );
            sched.raise_incident("order_plan_changed", id, &format!("order:{id}:plan"), &summary).await?;
            return Ok(None);
        }
        let mut c = Change { id, doc: doc.clone(), state: row.state.clone(), events: Vec::new(), now: now_ms() };
        let wake = step_through(sched, &row, &steps, &mut c).await?;
        if c.doc == doc && c.state == row.state {
            return Ok(wake);
        }
        if save(sched, &row, c).await? {
            return Ok(wake);
        }
    }
    Ok(Some(now_ms() + 1000))
}

/// Steps the order forward until it waits or ends.
async fn step_through(
    sched: &Arc<Scheduler>,
    row: &OrderRow,
    steps: &[PlanStep],
    c: &mut Change<'_>,
) -> Result<Option<i64>, StoreError> {
    loop {
        if c.now > c.doc.expires_ms {
            let why = format!("expired at {} before it was done", crate::time::rfc3339(c.doc.expires_ms));
            sched
                .raise_incident(
                    "order_expired",
                    c.id,
                    &format!("order:{}:expired", c.id),
                    &format!("order {}: {why}", c.id),
                )
                .await?;
            c.end("failed", why, "failed");
            return Ok(None);
        }
        let i = c.doc.current;
        let Some(plan_step) = steps.get(i) else {
            let outputs: Vec<String> = c.doc.outputs.iter().map(|(k, v)| format!("{k} {v}")).collect();
            c.state = "succeeded".into();
            c.event(None, "succeeded", format!("done: {}", outputs.join(", ")));
            return Ok(None);
        };
        if c.doc.steps[i].attempt == 0 {
            c.doc.steps[i].attempt = 1;
        }
        let progress = match &plan_step.kind {
            Kind::Render { tier, chosen } => render(sched, row, c, i, *tier, *chosen).await?,
            Kind::Approve => approve(sched, c, i).await?,
            Kind::Device { task, asset_of, params } => device(sched, c, i, *task, asset_of.as_deref(), params).await?,
        };
        match progress {
            Progress::Next => {
                let detail = c.doc.steps[i].detail.clone();
                c.step_state(i, "succeeded", detail);
                if c.state == "awaiting_approval" {
                    c.state = "running".into();
                }
                c.doc.current += 1;
            }
            Progress::Wait(wake) => return Ok([wake, Some(c.doc.expires_ms)].into_iter().flatten().min()),
            Progress::End(state, why) => {
                c.end(state, why, if state == "cancelled" { "cancelled" } else { "failed" });
                return Ok(None);
            }
        }
    }
}

/// A step out of attempts: an incident, and the order fails.
async fn out_of_attempts(sched: &Scheduler, c: &Change<'_>, i: usize, why: String) -> Result<Progress, StoreError> {
    let s = &c.doc.steps[i];
    let cause = format!("order:{}:{}:{}", c.id, s.name, s.attempt);
    let summary = format!("order {}: step {} failed after {} attempts: {why}", c.id, s.name, s.tries());
    sched.raise_incident("order_step", c.id, &cause, &summary).await?;
    Ok(Progress::End("failed", format!("step {}: {why}", s.name)))
}

async fn render(
    sched: &Arc<Scheduler>,
    row: &OrderRow,
    c: &mut Change<'_>,
    i: usize,
    tier: Tier,
    chosen: bool,
) -> Result<Progress, StoreError> {
    if c.doc.steps[i].jobs.is_empty() {
        let seeds: Vec<u64> = match (chosen, c.doc.chosen) {
            (false, _) => c.doc.seeds.clone(),
            (true, Some(n)) => c.doc.seeds.get(n).copied().into_iter().collect(),
            (true, None) => {
                return Ok(Progress::End("failed", "no option was chosen before a chosen-seed render".into()));
            }
        };
        let client = Caller { name: row.client.clone(), role: Role::Client, devices: Vec::new(), budget: None };
        let attempt = c.doc.steps[i].attempt;
        let name = c.doc.steps[i].name.clone();
        let mut jobs = Vec::with_capacity(seeds.len());
        for (n, seed) in seeds.iter().enumerate() {
            let req = JobRequest {
                prompt: c.doc.prompt.clone(),
                seed: Some(*seed),
                tier,
                width: None,
                height: None,
                samples: None,
                model: c.doc.model.clone(),
                idempotency_key: Some(format!("order-{}-{name}-{attempt}-{n}", c.id)),
            };
            match sched.submit(&client, &req).await {
                Ok((job, _)) => jobs.push(job.id),
                Err(crate::scheduler::SubmitError::Store(e)) => return Err(e),
                Err(e) => return Ok(Progress::End("failed", format!("step {name}: the render was refused: {e}"))),
            }
        }
        c.doc.steps[i].jobs = jobs;
        let detail = format!("rendering {} at the {tier} tier", plural(seeds.len(), "seed"));
        c.step_state(i, "running", Some(detail));
    }
    let ids = c.doc.steps[i].jobs.clone();
    // Waits are said before the jobs are read: a job that ends in between still wakes the order.
    for id in &ids {
        sched.order_waits.wait(c.id, id);
    }
    let found = sched.store.jobs(ids.clone()).await?;
    let by_id: BTreeMap<&str, &crate::store::Job> = found.iter().map(|j| (j.id.as_str(), j)).collect();
    let mut live = Vec::new();
    let mut assets = Vec::new();
    let mut failed = None;
    for id in &ids {
        match by_id.get(id.as_str()) {
            None => failed = Some(format!("job {id} is gone")),
            Some(j) if !j.state.is_terminal() => live.push(id.clone()),
            Some(j) if matches!(j.state, JobState::Succeeded | JobState::Cached) && j.asset.is_some() => {
                assets.push(j.asset.clone().unwrap_or_default());
            }
            Some(j) => {
                failed = Some(format!("job {id} {}: {}", j.state, j.error.as_deref().unwrap_or("no reason given")))
            }
        }
    }
    if !live.is_empty() {
        return Ok(Progress::Wait(None));
    }
    if let Some(why) = failed {
        if c.doc.steps[i].tries() < sched.cfg.orders.step_attempts {
            let s = &mut c.doc.steps[i];
            s.attempt += 1;
            s.jobs.clear();
            let detail = format!("attempt {} after: {why}", s.attempt);
            c.step_state(i, "running", Some(detail));
            return Box::pin(render(sched, row, c, i, tier, chosen)).await;
        }
        return out_of_attempts(sched, c, i, why).await;
    }
    let made = plural(assets.len(), "render");
    c.doc.steps[i].assets = assets;
    c.doc.steps[i].detail = Some(format!("{made} at the {tier} tier"));
    Ok(Progress::Next)
}

async fn approve(sched: &Arc<Scheduler>, c: &mut Change<'_>, i: usize) -> Result<Progress, StoreError> {
    let name = c.doc.steps[i].name.clone();
    if c.doc.approval.as_ref().is_none_or(|a| a.step != name) {
        // The options are the renders of the step before.
        let Some(before) = c.doc.steps[..i].iter().rev().find(|s| s.kind == "render") else {
            return Ok(Progress::End("failed", format!("step {name}: no render before it to approve")));
        };
        let options = before
            .jobs
            .iter()
            .zip(&before.assets)
            .zip(&c.doc.seeds)
            .enumerate()
            .map(|(n, ((job, asset), seed))| api::ApprovalOption {
                option: u32::try_from(n + 1).unwrap_or(u32::MAX),
                seed: *seed,
                asset: asset.clone(),
                job: job.clone(),
            })
            .collect();
        c.doc.approval = Some(ApprovalDoc {
            step: name.clone(),
            state: "pending".into(),
            options,
            created_ms: c.now,
            due_ms: c.doc.approval_timeout_ms.map(|t| c.now.saturating_add(t)),
            decided_by: None,
            decided_ms: None,
            option: None,
            reason: None,
        });
        c.state = "awaiting_approval".into();
        c.step_state(i, "waiting", Some("awaiting the operator's choice".into()));
        c.event(None, "awaiting_approval", format!("approval {} opened", approval_id(c.id, &name)));
    }
    let Some(a) = c.doc.approval.clone() else { return Ok(Progress::Wait(None)) };
    match a.state.as_str() {
        "approved" => {
            let n = a.option.unwrap_or(1).saturating_sub(1) as usize;
            c.doc.chosen = Some(n);
            let seed = c.doc.seeds.get(n).copied().unwrap_or_default();
            c.doc.steps[i].detail =
                Some(format!("option {} (seed {seed}) approved by {}", n + 1, a.decided_by.as_deref().unwrap_or("?")));
            Ok(Progress::Next)
        }
        "rejected" => Ok(Progress::End(
            "cancelled",
            format!(
                "rejected at {name} by {}: {}; nothing was rendered final",
                a.decided_by.as_deref().unwrap_or("?"),
                a.reason.as_deref().unwrap_or("")
            ),
        )),
        _ => match a.due_ms {
            Some(due) if c.now >= due => {
                let cause = format!("approval:{}", approval_id(c.id, &name));
                let summary = format!(
                    "order {}: approval {} has waited past its timeout ({}); the order waits for a decision",
                    c.id,
                    approval_id(c.id, &name),
                    crate::time::rfc3339(due)
                );
                sched.raise_incident("approval_timeout", c.id, &cause, &summary).await?;
                c.step_state(
                    i,
                    "waiting",
                    Some("awaiting the operator's choice (past its timeout: incident raised)".into()),
                );
                Ok(Progress::Wait(None))
            }
            due => Ok(Progress::Wait(due)),
        },
    }
}

/// Whether a device's latest readings say it can take a task of `kind` now: a printer must say
/// it is ready with media in it.
fn ready(d: &crate::store::fleet::Device, kind: TaskKind) -> bool {
    if d.state == "offline" {
        return false;
    }
    if kind != TaskKind::Print {
        return true;
    }
    let t = d.telemetry.as_ref();
    let state = t.and_then(|t| t.get("printer_state")).and_then(Value::as_str);
    let media = t.and_then(|t| t.get("media")).and_then(Value::as_u64);
    let ink = t.and_then(|t| t.get("ink_percent")).and_then(Value::as_u64);
    state == Some("ready") && media.is_none_or(|m| m > 0) && ink.is_none_or(|i| i > 0)
}

async fn device(
    sched: &Arc<Scheduler>,
    c: &mut Change<'_>,
    i: usize,
    kind: TaskKind,
    asset_of: Option<&str>,
    params: &Map<String, Value>,
) -> Result<Progress, StoreError> {
    let name = c.doc.steps[i].name.clone();
    if c.doc.steps[i].task.is_none() {
        if sched.cfg.fleet.mqtt_url.is_none() {
            return Ok(Progress::End(
                "failed",
                format!("step {name}: the fleet bridge is off (scheduler.fleet.mqtt_url), so no device can {kind}"),
            ));
        }
        if let Some(at) = c.doc.steps[i].retry_at_ms.filter(|at| *at > c.now) {
            return Ok(Progress::Wait(Some(at)));
        }
        let asset = match asset_of {
            Some(step) => match c.doc.steps.iter().find(|s| s.name == step).and_then(|s| s.assets.first()) {
                Some(a) => Some(a.clone()),
                None => return Ok(Progress::End("failed", format!("step {name}: step {step} made no asset"))),
            },
            None => None,
        };
        // Waits are said before the devices are read for the last time: an announcement or a
        // reading that comes in between still wakes the order.
        let of_kind = || async {
            let all = sched.store.devices().await?;
            Ok::<_, StoreError>(all.into_iter().filter(|d| d.kind == kind.device_kind().as_str()).collect::<Vec<_>>())
        };
        sched.order_waits.wait(c.id, &format!("kind:{}", kind.device_kind()));
        for d in of_kind().await? {
            sched.order_waits.wait(c.id, &format!("device:{}", d.id));
        }
        let devices = of_kind().await?;
        let Some(chosen) = devices.iter().find(|d| ready(d, kind)) else {
            // None can take it now: wait for one to announce itself or report its readings.
            let since = *c.doc.steps[i].waiting_since_ms.get_or_insert(c.now);
            let why = match devices.first() {
                None => format!("no {} is known to the fleet", kind.device_kind()),
                Some(d) if d.state == "offline" => format!("{} {} is offline", d.kind, d.id),
                Some(d) => format!("{} {} is not ready ({})", d.kind, d.id, readings_note(d)),
            };
            if let Some(end) = past_wait(sched, c, &name, since, &why).await? {
                return Ok(end);
            }
            c.step_state(i, "waiting", Some(format!("waiting for a ready {}: {why}", kind.device_kind())));
            return Ok(Progress::Wait(Some(since.saturating_add(device_wait_ms(sched)))));
        };
        let task_id = format!("t-{}-{name}-{}", c.id, c.doc.steps[i].attempt);
        if sched.store.task_row(&task_id).await?.is_none() {
            let deadline =
                i64::try_from(sched.cfg.fleet.default_deadline_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
            let task = NewTask {
                id: task_id.clone(),
                device_id: chosen.id.clone(),
                kind,
                asset: asset.clone(),
                params: params.clone(),
                deadline_ms: c.now.saturating_add(deadline),
                created_by: format!("order {}", c.id),
            };
            sched.store.create_task(task, c.now).await?;
            sched.fleet_wake.notify_one();
        }
        let s = &mut c.doc.steps[i];
        s.task = Some(task_id.clone());
        s.device = Some(chosen.id.clone());
        s.assets = asset.into_iter().collect();
        let detail = format!("task {task_id} on {}", chosen.id);
        c.step_state(i, "running", Some(detail));
    }
    let task_id = c.doc.steps[i].task.clone().unwrap_or_default();
    // Said before the task is read: a task that ends in between still wakes the order.
    sched.order_waits.wait(c.id, &task_id);
    let Some(t) = sched.store.task_row(&task_id).await? else {
        return Ok(Progress::End("failed", format!("step {name}: task {task_id} is gone")));
    };
    if !t.state.is_terminal() {
        return Ok(Progress::Wait(None));
    }
    if t.state == TaskState::Succeeded {
        match kind {
            TaskKind::Capture => {
                if let Some(photo) = &t.output_asset {
                    c.doc.outputs.insert("photo".into(), photo.clone());
                    c.doc.steps[i].assets = vec![photo.clone()];
                }
            }
            TaskKind::Display => {
                if let Some(a) = &t.asset {
                    c.doc.outputs.insert("shown".into(), a.clone());
                }
            }
            _ => {}
        }
        c.doc.steps[i].detail =
            Some(format!("task {task_id} on {}: {}", t.device_id, t.detail.as_deref().unwrap_or("done")));
        return Ok(Progress::Next);
    }
    let why = format!("task {task_id} on {} {}: {}", t.device_id, t.state, t.detail.as_deref().unwrap_or("no detail"));
    let not_ready = kind == TaskKind::Print && t.detail.as_deref().is_some_and(|d| d.contains("not ready"));
    if not_ready {
        // Nothing was printed: wait for the printer to be ready again, up to the deadline of
        // the wait (which a ready-looking printer that refuses does not reset).
        let since = *c.doc.steps[i].waiting_since_ms.get_or_insert(c.now);
        if let Some(end) = past_wait(sched, c, &name, since, &why).await? {
            return Ok(end);
        }
        let s = &mut c.doc.steps[i];
        s.task = None;
        s.attempt += 1;
        let at =
            c.now.saturating_add(i64::try_from(sched.cfg.orders.retry_base_seconds.saturating_mul(1000)).unwrap_or(0));
        s.retry_at_ms = Some(at);
        c.step_state(i, "waiting", Some(format!("waiting for a ready printer: {why}")));
        return Ok(Progress::Wait(Some(at)));
    }
    let s = &mut c.doc.steps[i];
    if s.tries() < sched.cfg.orders.step_attempts {
        let backoff = sched.cfg.orders.retry_base_seconds.saturating_mul(1 << s.tries().min(10)).saturating_mul(1000);
        let at = c.now.saturating_add(i64::try_from(backoff).unwrap_or(i64::MAX));
        s.task = None;
        s.attempt += 1;
        s.retry_at_ms = Some(at);
        let detail = format!("attempt {} at {} after: {why}", s.attempt, crate::time::rfc3339(at));
        c.step_state(i, "waiting", Some(detail));
        return Ok(Progress::Wait(Some(at)));
    }
    let why = match kind {
        TaskKind::Display => format!("{why}; the gallery keeps showing what it showed before"),
        _ => why,
    };
    out_of_attempts(sched, c, i, why).await
}

/// How long a device step waits for a ready device (`printer_wait_seconds`), ms.
fn device_wait_ms(sched: &Scheduler) -> i64 {
    i64::try_from(sched.cfg.orders.printer_wait_seconds.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// A step that has waited for a ready device since `since` past [`device_wait_ms`]: raises the
/// incident (once for that wait) and ends the order; `None` while it may wait on.
async fn past_wait(
    sched: &Scheduler,
    c: &Change<'_>,
    name: &str,
    since: i64,
    why: &str,
) -> Result<Option<Progress>, StoreError> {
    let wait_ms = device_wait_ms(sched);
    if c.now.saturating_sub(since) < wait_ms {
        return Ok(None);
    }
    let waited = format!("waited {} s for a ready device: {why}", wait_ms / 1000);
    let cause = format!("order:{}:{name}:wait:{since}", c.id);
    sched.raise_incident("device_not_ready", c.id, &cause, &format!("order {}: step {name} {waited}", c.id)).await?;
    Ok(Some(Progress::End("failed", format!("step {name}: {waited}"))))
}

fn readings_note(d: &crate::store::fleet::Device) -> String {
    let t = d.telemetry.as_ref();
    let get = |k: &str| t.and_then(|t| t.get(k)).map(|v| v.to_string()).unwrap_or_else(|| "?".into());
    match d.kind.as_str() {
        "printer" => format!("state {}, media {}", get("printer_state").trim_matches('"'), get("media")),
        _ => d.state.clone(),
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 { format!("1 {what}") } else { format!("{n} {what}s") }
}
