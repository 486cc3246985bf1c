//! The scheduler's logic, the same in both modes: admit jobs (validate, key, cache, single
//! flight), hand the outbox to the worker queue, run workers, record results, retry, cancel, and
//! tell listeners about each durable change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use kiln_protocol::now_ms;
use kiln_protocol::wire::MessageKey;
use kiln_protocol::{JobRequest, JobState, RenderRequest, RequestError};
use kiln_worker::engine::cppn::MODEL_ID;
use kiln_worker::prng::Rng;
use kiln_worker::worker::Worker;
use serde::Serialize;
use tokio::sync::{Notify, broadcast, oneshot};

use crate::auth::{Caller, Role, Secret, new_token, token_hash};
use crate::config::SchedulerConfig;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::{Admission, Event, Job, JobReads, NewJob, Store, StoreError, TokenRow};

/// Who waits for which job's end (long polls): each is woken only by its own job's end.
#[derive(Debug, Default)]
struct Waiters(Mutex<HashMap<String, Vec<oneshot::Sender<()>>>>);

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<oneshot::Sender<()>>>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A waiter on each of `ids`' ends (one each), registered now.
    fn watch<'a>(&self, ids: impl IntoIterator<Item = &'a String>) -> HashMap<String, oneshot::Receiver<()>> {
        let mut woken = HashMap::new();
        let mut waiters = self.lock();
        for id in ids {
            if !woken.contains_key(id) {
                woken.insert(id.clone(), add_waiter(&mut waiters, id));
            }
        }
        woken
    }

    /// A waiter on `id`'s end, registered now.
    fn watch_one(&self, id: &str) -> oneshot::Receiver<()> {
        add_waiter(&mut self.lock(), id)
    }

    /// Wakes (and forgets) every waiter on `id`'s end.
    fn wake(&self, id: &str) {
        for w in self.lock().remove(id).into_iter().flatten() {
            let _ = w.send(());
        }
    }

    /// Forgets the waiters of `ids` whose callers are done with them (each dropped its
    /// receiver), and any others whose callers have gone.
    fn forget<'a>(&self, ids: impl IntoIterator<Item = &'a String>) {
        let mut waiters = self.lock();
        for id in ids {
            if let Some(list) = waiters.get_mut(id) {
                list.retain(|w| !w.is_closed());
                if list.is_empty() {
                    waiters.remove(id);
                }
            }
        }
    }
}

/// Registers a waiter on `id`'s end in `waiters` (held locked).
fn add_waiter(waiters: &mut HashMap<String, Vec<oneshot::Sender<()>>>, id: &str) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    waiters.entry(id.to_owned()).or_default().push(tx);
    rx
}

/// A submitted job's end, watched from before the job was stored ([`Scheduler::submit_watching`]).
/// Dropped, it forgets its waiter (a submit that failed, or whose caller is done).
#[derive(Debug)]
pub struct Watch {
    /// The id the submit gave its new job (a submit that found an earlier job returns that one).
    id: String,
    woken: Option<oneshot::Receiver<()>>,
    waiters: Arc<Waiters>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.woken = None;
        self.waiters.forget([&self.id]);
    }
}

/// What a submit may get wrong; each names the field.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The request breaks a tier limit or names an unknown tier.
    #[error(transparent)]
    Invalid(#[from] RequestError),
    /// The idempotency key is too long.
    #[error("idempotency_key: {len} bytes exceeds the limit of {limit} (scheduler.limits.max_idempotency_key)")]
    IdempotencyKey {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The model is not one this farm has.
    #[error("model: unknown model {0:?}; this farm has \"cppn\"")]
    UnknownModel(String),
    /// It would pass the token's budget.
    #[error(transparent)]
    OverBudget(#[from] crate::costs::OverBudget),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a token was not made.
#[derive(Debug, thiserror::Error)]
pub enum TokenRefusal {
    /// A field of the request is wrong.
    #[error("{field}: {message}")]
    Field {
        /// The field (`devices[1]`).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A device is served by another token already.
    #[error("devices: {device:?} is served by the token {holder:?} already")]
    Served {
        /// The device.
        device: String,
        /// The token that serves it.
        holder: String,
    },
    /// The store refused it (a taken name or device) or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Something a listener hears about a job: a durable event, or render progress.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Live {
    /// A transition, already durable.
    Event(Event),
    /// Rows done so far in a render (not stored).
    Progress {
        /// The job.
        job_id: String,
        /// Rows finished.
        rows_done: u32,
        /// Rows in all.
        rows: u32,
        /// For a job cut into tiles: tiles finished, and in all.
        tiles: Option<(u32, u32)>,
    },
}

impl Live {
    /// The job it is about.
    pub fn job_id(&self) -> &str {
        match self {
            Live::Event(e) => &e.job_id,
            Live::Progress { job_id, .. } => job_id,
        }
    }
}

/// What a token has used of its budget ([`Scheduler::budget_use`]).
pub struct BudgetUse {
    /// Spent this period, weighted device-seconds.
    pub used: f64,
    /// Estimated for its live renders.
    pub in_flight: f64,
    /// Those renders.
    pub live: Vec<RenderRequest>,
    /// When the period ends, unix ms.
    pub resets_ms: i64,
}

/// Renders the estimates start from.
const ESTIMATE_FROM: u32 = 2000;

/// The scheduler: shared by the API, the dispatcher and the workers.
pub struct Scheduler {
    /// Durable state.
    pub store: Arc<dyn Store>,
    /// The render engine and asset store (the embedded farm's workers share it).
    pub worker: Arc<Worker>,
    /// Metrics.
    pub metrics: Metrics,
    /// Settings.
    pub cfg: SchedulerConfig,
    /// The workers: heard from over the broker, or in process.
    pub registry: Registry,
    live: broadcast::Sender<Arc<Live>>,
    /// Long polls' reads of their jobs, gathered.
    reads: JobReads,
    waiters: Arc<Waiters>,
    /// The tokens not revoked, by hash, with when each expires.
    tokens: RwLock<HashMap<String, (Caller, Option<i64>)>>,
    /// The worker tokens' message keys by signer id (see [`MessageKey`]), with the token's name.
    signers: RwLock<HashMap<String, (String, MessageKey)>>,
    /// When the tokens were last read on account of an unknown signer or an unserved device (at
    /// most once a second).
    signers_read: Mutex<Option<std::time::Instant>>,
    /// The key of the device token that serves each device, by device id: its tasks are signed
    /// with it (see [`kiln_protocol::fleet::DeviceTask::sign`]).
    device_keys: RwLock<HashMap<String, (String, MessageKey)>>,
    pub(crate) dispatch_wake: Notify,
    /// Wakes the fleet bridge's sender (a task was created, a device came back).
    pub fleet_wake: Notify,
    /// The API's event streams open, by token.
    pub(crate) event_streams: EventStreams,
    /// What the studio's orders wait on; jobs ending wake them.
    pub order_waits: crate::waits::OrderWaits,
    /// The recent renders' device times, to estimate costs from.
    pub estimates: crate::costs::Estimates,
    budget_locks: crate::costs::BudgetLocks,
    rng: Mutex<Rng>,
    tiers: kiln_protocol::TierLimits,
    /// The console's signed-in browsers.
    pub sessions: crate::auth::Sessions,
    /// Each change of an order, once durable (the console's live views follow it).
    order_changes: broadcast::Sender<Arc<OrderChange>>,
    /// Itself, for the tasks it starts (a job cut into tiles runs on its own task).
    me: std::sync::OnceLock<std::sync::Weak<Scheduler>>,
    /// The worker that rendered each recent tile, by job id, for the provenance of the image
    /// they are stitched into (see [`crate::tiles`]).
    pub(crate) tile_workers: crate::registry::TileWorkers,
    /// The id of each device whose state, telemetry or task changed, once stored (the console's
    /// fleet view follows it).
    device_changes: broadcast::Sender<Arc<str>>,
}

/// An order that changed: written, then announced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OrderChange {
    /// The order.
    pub id: String,
    /// The token that placed it (who may see it).
    pub client: String,
    /// Its state now.
    pub state: String,
}

impl Scheduler {
    /// A scheduler over a store and a worker. Loads the tokens and the job counts.
    pub async fn new(
        store: Arc<dyn Store>,
        worker: Arc<Worker>,
        cfg: SchedulerConfig,
        tiers: kiln_protocol::TierLimits,
    ) -> Result<Arc<Scheduler>, StoreError> {
        let seed = crate::auth::os_random::<8>().map(u64::from_le_bytes).unwrap_or_else(|_| now_ms() as u64);
        let (live, _) = broadcast::channel(16 * 1024);
        let s = Scheduler {
            reads: JobReads::spawn(store.clone()),
            store,
            worker,
            metrics: Metrics::new(),
            registry: Registry::new(Duration::from_secs(cfg.broker.lost_after_seconds)),
            cfg,
            live,
            waiters: Arc::default(),
            tokens: RwLock::new(HashMap::new()),
            signers: RwLock::new(HashMap::new()),
            signers_read: Mutex::new(None),
            device_keys: RwLock::new(HashMap::new()),
            dispatch_wake: Notify::new(),
            fleet_wake: Notify::new(),
            event_streams: EventStreams::default(),
            order_waits: Default::default(),
            estimates: Default::default(),
            budget_locks: Default::default(),
            rng: Mutex::new(Rng::new(seed)),
            tiers,
            sessions: Default::default(),
            order_changes: broadcast::channel(1024).0,
            me: std::sync::OnceLock::new(),
            tile_workers: Default::default(),
            device_changes: broadcast::channel(256).0,
        };
        s.reload_tokens().await?;
        // Estimates start from the latest renders, oldest noted first.
        for c in s.store.recent_charges(ESTIMATE_FROM).await?.iter().rev() {
            s.estimates.note_size((c.tier, c.width, c.height, c.samples), c.device_ms);
        }
        for (tier, state, n) in s.store.counts().await? {
            s.metrics.jobs.with_label_values(&[tier.as_str(), state.as_str()]).set(n);
        }
        s.metrics.register_store(&s.store.writer_metrics());
        let s = Arc::new(s);
        let _ = s.me.set(Arc::downgrade(&s));
        Ok(s)
    }

    /// Itself, shared (`None` only while it is being dropped).
    pub(crate) fn shared(&self) -> Option<Arc<Scheduler>> {
        self.me.get().and_then(std::sync::Weak::upgrade)
    }

    /// The tokens (not revoked) that carry a budget, by name.
    pub fn budgets(&self) -> Vec<(String, crate::costs::Budget)> {
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = tokens.values().filter_map(|(c, _)| Some((c.name.clone(), c.budget?))).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Raises an incident: something that needs the operator, once per `cause` (a second raise
    /// of the same cause changes nothing). Logged and counted when new.
    pub async fn raise_incident(
        &self,
        kind: &str,
        subject: &str,
        cause: &str,
        summary: &str,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let incident = crate::store::orders::Incident {
            id: format!("i{:011x}{:012x}", now, self.random() >> 16),
            cause: cause.to_owned(),
            kind: kind.to_owned(),
            subject: subject.to_owned(),
            state: "open".into(),
            summary: summary.to_owned(),
            created_ms: now,
            updated_ms: now,
            resolved_by: None,
            note: None,
        };
        if self.store.raise_incident(incident).await? {
            tracing::warn!(kind, subject, summary, "incident raised");
            self.metrics.incidents.with_label_values(&[kind]).inc();
        }
        Ok(())
    }

    /// Listens to every job's events and progress from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Live>> {
        self.live.subscribe()
    }

    pub(crate) fn publish(&self, events: Vec<Event>) {
        for e in events {
            self.metrics.observe(&e);
            if e.state.is_terminal() {
                self.waiters.wake(&e.job_id);
                self.order_waits.ended(&e.job_id);
            }
            if self.live.receiver_count() > 0 {
                let _ = self.live.send(Arc::new(Live::Event(e)));
            }
        }
    }

    /// Where render progress goes (not stored).
    /// The orders' changes from now on.
    pub fn subscribe_orders(&self) -> broadcast::Receiver<Arc<OrderChange>> {
        self.order_changes.subscribe()
    }

    /// Each device change from now on: the device's id.
    pub fn subscribe_devices(&self) -> broadcast::Receiver<Arc<str>> {
        self.device_changes.subscribe()
    }

    /// Announces that device `id` changed (its state, telemetry or a task), once stored.
    pub(crate) fn device_changed(&self, id: &str) {
        if self.device_changes.receiver_count() > 0 {
            let _ = self.device_changes.send(Arc::from(id));
        }
    }

    /// Announces a change of an order, once it is durable.
    pub(crate) fn order_changed(&self, change: OrderChange) {
        if self.order_changes.receiver_count() > 0 {
            let _ = self.order_changes.send(Arc::new(change));
        }
    }

    /// Tells listeners something not stored (progress).
    pub(crate) fn tell(&self, live: Live) {
        if self.live.receiver_count() > 0 {
            let _ = self.live.send(Arc::new(live));
        }
    }

    pub(crate) fn live_sender(&self) -> broadcast::Sender<Arc<Live>> {
        self.live.clone()
    }

    pub(crate) fn random(&self) -> u64 {
        self.rng.lock().unwrap_or_else(|p| p.into_inner()).next_u64()
    }

    /// A new job id: creation time and randomness, so ids sort roughly by age and never collide.
    pub(crate) fn new_id(&self) -> String {
        format!("j{:011x}{:012x}", now_ms(), self.random() >> 16)
    }

    async fn reload_tokens(&self) -> Result<(), StoreError> {
        let rows = self.store.tokens().await?;
        let signers = rows
            .iter()
            .filter(|t| t.role == Role::Worker)
            .map(|t| {
                let key = MessageKey::from_token_hash(&t.token_hash);
                (key.signer().to_owned(), (t.name.clone(), key))
            })
            .collect();
        // Rows come oldest first: a device named by two tokens is served by the newer.
        let device_keys = rows
            .iter()
            .filter(|t| t.role == Role::Device)
            .flat_map(|t| {
                let key = MessageKey::from_token_hash(&t.token_hash);
                t.devices.iter().map(move |d| (d.clone(), (t.name.clone(), key.clone())))
            })
            .collect();
        let map = rows
            .into_iter()
            .map(|t| {
                (
                    t.token_hash,
                    (Caller { name: t.name, role: t.role, devices: t.devices, budget: t.budget }, t.expires_ms),
                )
            })
            .collect();
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = map;
        *self.signers.write().unwrap_or_else(|p| p.into_inner()) = signers;
        *self.device_keys.write().unwrap_or_else(|p| p.into_inner()) = device_keys;
        Ok(())
    }

    /// Reads the tokens again if they were not read in the last second: something named a token
    /// made on another node, perhaps.
    async fn reload_tokens_at_most_each_second(&self) {
        let due = {
            let mut last = self.signers_read.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        if due && let Err(e) = self.reload_tokens().await {
            tracing::warn!(error = %e, "cannot read the tokens again");
        }
    }

    /// The name and key of the device token that serves `device`, which signs its tasks; `None`
    /// when no token serves it (`kiln device add NAME --devices DEVICE` makes one).
    pub async fn device_key(&self, device: &str) -> Option<(String, MessageKey)> {
        let known = |s: &Self| s.device_keys.read().unwrap_or_else(|p| p.into_inner()).get(device).cloned();
        if let Some(k) = known(self) {
            return Some(k);
        }
        self.reload_tokens_at_most_each_second().await;
        known(self)
    }

    /// The name of the worker token that signed `body` (`signature`: the signer and MAC headers
    /// it came with), or why it is not proven. An unknown signer makes the tokens be read again
    /// (a token made on another node), at most once a second.
    pub async fn signed_by(&self, body: &[u8], signature: Option<(String, String)>) -> Result<String, String> {
        let Some((signer, mac)) = signature else {
            return Err("it is not signed: a worker signs its results and heartbeats with its token".into());
        };
        let known = |s: &Self| s.signers.read().unwrap_or_else(|p| p.into_inner()).get(&signer).cloned();
        let found = match known(self) {
            Some(k) => Some(k),
            None => {
                self.reload_tokens_at_most_each_second().await;
                known(self)
            }
        };
        match found {
            None => Err(format!("signer {signer} is no worker token of this farm (or its token was revoked)")),
            Some((name, key)) if key.verify(body, &mac) => Ok(name),
            Some((name, _)) => Err(format!("its MAC does not match its body (signer: worker token {name:?})")),
        }
    }

    /// Who a bearer token belongs to, while it is neither revoked nor expired.
    pub fn authenticate(&self, token: &str) -> Option<Caller> {
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        match tokens.get(&token_hash(token)) {
            Some((caller, expires)) if expires.is_none_or(|e| now_ms() < e) => Some(caller.clone()),
            _ => None,
        }
    }

    /// Reads the tokens every `every` until `stop`, so a token revoked (or made) on another node
    /// of the farm is refused (or taken) here within that time.
    pub async fn watch_tokens(self: Arc<Self>, every: Duration, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.reload_tokens().await {
                tracing::debug!(error = %e, "cannot read the tokens again");
            }
        }
    }

    /// The tokens not revoked, oldest first.
    pub async fn list_tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        self.store.tokens().await
    }

    /// Revokes the token named `name`: refused here at once (and on other nodes within a second);
    /// `false` when there is no such token.
    pub async fn revoke_token(&self, name: &str) -> Result<bool, StoreError> {
        let revoked = self.store.revoke_token(name.to_owned(), now_ms()).await?;
        self.reload_tokens().await?;
        Ok(revoked)
    }

    /// Creates a token; the secret is returned once and never stored. `devices` (a device token
    /// only) are the devices its agent serves: each may be served by one token, checked against
    /// the tokens as last read.
    pub async fn create_token(
        &self,
        name: &str,
        role: Role,
        devices: &[String],
        expires_ms: Option<i64>,
        budget: Option<crate::costs::Budget>,
    ) -> Result<Secret, TokenRefusal> {
        if budget.is_some() && role != Role::Client {
            let message = format!("only a client token carries a budget, not a {role} token");
            return Err(TokenRefusal::Field { field: "budget_seconds".into(), message });
        }
        if !devices.is_empty() && role != Role::Device {
            let message = format!("only a device token serves devices, not a {role} token");
            return Err(TokenRefusal::Field { field: "devices".into(), message });
        }
        for (i, d) in devices.iter().enumerate() {
            if !kiln_protocol::fleet::valid_id(d) {
                let message = format!("{d:?} is not a device id (1 to 64 of A-Z a-z 0-9 - _ .)");
                return Err(TokenRefusal::Field { field: format!("devices[{i}]"), message });
            }
            if devices[..i].contains(d) {
                return Err(TokenRefusal::Field {
                    field: format!("devices[{i}]"),
                    message: format!("{d:?} is named twice"),
                });
            }
        }
        self.reload_tokens().await?;
        for d in devices {
            if let Some((holder, _)) = self.device_keys.read().unwrap_or_else(|p| p.into_inner()).get(d) {
                return Err(TokenRefusal::Served { device: d.clone(), holder: holder.clone() });
            }
        }
        let secret = new_token().map_err(|e| StoreError::Corrupt { what: "random source", message: e.to_string() })?;
        let row = TokenRow {
            token_hash: token_hash(secret.expose()),
            name: name.to_owned(),
            role,
            devices: devices.to_vec(),
            created_ms: now_ms(),
            expires_ms,
            budget,
        };
        self.store.add_token(row, now_ms()).await?;
        self.reload_tokens().await?;
        Ok(secret)
    }

    /// What `r` is expected to cost, weighted device-milliseconds (before the cache is asked).
    pub fn estimate_ms(&self, r: &RenderRequest) -> f64 {
        self.estimates.device_ms(r, &self.cfg.costs) * self.cfg.costs.weight(r.tier)
    }

    /// What `renders` are expected to cost together, weighted device-milliseconds (0 for none;
    /// a float `sum` of nothing is -0).
    pub fn estimate_all_ms(&self, renders: &[RenderRequest]) -> f64 {
        renders.iter().fold(0.0, |sum, r| sum + self.estimate_ms(r))
    }

    /// What `client` has spent of `budget` in the period `now_ms` falls in, and has in flight.
    pub async fn budget_use(
        &self,
        client: &str,
        budget: crate::costs::Budget,
        now_ms: i64,
    ) -> Result<BudgetUse, StoreError> {
        let (start, resets_ms) = budget.period.bounds(now_ms);
        let used = self.store.spent(client, start).await? as f64 / 1000.0;
        let mut live = self.store.live_requests(client).await?;
        // A print cut into tiles is counted once, by its whole request.
        live.retain(|r| r.tile.is_none());
        let in_flight = self.estimate_all_ms(&live) / 1000.0;
        Ok(BudgetUse { used, in_flight, live, resets_ms })
    }

    /// What a render that took `device_ms` on its worker costs.
    pub fn cost_of(&self, tier: kiln_protocol::Tier, device_ms: i64) -> crate::store::Cost {
        let device_ms = device_ms.max(0);
        let cost_ms = (device_ms as f64 * self.cfg.costs.weight(tier)).round() as i64;
        crate::store::Cost { device_ms, cost_ms }
    }

    /// Whether `caller` may ask for `asked` within its budget: what it spent this period, what
    /// it has in flight and what this asks (a render the cache or a live job of its own answers
    /// costs nothing) must fit. The token's lock comes back held: keep it until what was let
    /// through is stored, so two calls of one token cannot both take the same room. `None`
    /// for a token without a budget.
    pub async fn within_budget(
        &self,
        caller: &Caller,
        asked: &[RenderRequest],
    ) -> Result<Option<tokio::sync::OwnedMutexGuard<()>>, SubmitError> {
        let Some(budget) = caller.budget else { return Ok(None) };
        let guard = self.budget_locks.lock(&caller.name).await;
        let BudgetUse { used, in_flight, live, resets_ms } = self.budget_use(&caller.name, budget, now_ms()).await?;
        let mut free: std::collections::HashSet<String> = live.iter().map(|r| self.worker.key(r).to_string()).collect();
        let keys: Vec<String> = asked.iter().map(|r| self.worker.key(r).to_string()).collect();
        free.extend(self.store.cached(keys.clone()).await?);
        let mut asked_s = 0.0;
        for (r, key) in asked.iter().zip(keys) {
            // The second of two alike in one call is attached to the first.
            if free.insert(key) {
                asked_s += self.estimate_ms(r) / 1000.0;
            }
        }
        if asked_s > 0.0 && used + in_flight + asked_s > budget.seconds as f64 {
            return Err(SubmitError::OverBudget(crate::costs::OverBudget {
                client: caller.name.clone(),
                budget: budget.seconds,
                period: budget.period,
                used,
                in_flight,
                asked: asked_s,
                resets: crate::time::rfc3339(resets_ms),
                resets_ms,
            }));
        }
        Ok(Some(guard))
    }

    /// Resolves and validates a request as the farm would run it.
    pub fn resolve(&self, req: &JobRequest) -> Result<RenderRequest, SubmitError> {
        let model = req.model.as_deref().unwrap_or(MODEL_ID);
        if model != MODEL_ID {
            return Err(SubmitError::UnknownModel(model.to_owned()));
        }
        if let Some(k) = &req.idempotency_key {
            let limit = self.cfg.limits.max_idempotency_key;
            if k.len() > limit {
                return Err(SubmitError::IdempotencyKey { len: k.len(), limit });
            }
        }
        let seed = req.seed.unwrap_or_else(|| self.random() >> 11);
        Ok(RenderRequest::resolve(model, &req.prompt, seed, req.tier, req.width, req.height, req.samples, &self.tiers)?)
    }

    /// Admits a job: an earlier one for the same idempotency key, the cache, a render in flight,
    /// or a new render. Returns the job and how it was admitted.
    pub async fn submit(&self, caller: &Caller, req: &JobRequest) -> Result<(Job, Admission), SubmitError> {
        let request = self.resolve(req)?;
        let (job, admission, _) = self.submit_watching(caller, request, req.idempotency_key.clone(), false).await?;
        Ok((job, admission))
    }

    /// [`Self::submit`] for a request already resolved (a batch is resolved whole before any of
    /// it is admitted), and with `watch` (for a caller that waits for the job to end) the job's
    /// end is watched from before the job is stored, so [`Self::wait_submitted`] need not read
    /// it first.
    #[tracing::instrument(level = "debug", skip_all, fields(job_id = tracing::field::Empty))]
    pub async fn submit_watching(
        &self,
        caller: &Caller,
        request: RenderRequest,
        idempotency_key: Option<String>,
        watch: bool,
    ) -> Result<(Job, Admission, Option<Watch>), SubmitError> {
        let id = self.new_id();
        tracing::Span::current().record("job_id", id.as_str());
        let watch = watch.then(|| Watch {
            woken: Some(self.waiters.watch_one(&id)),
            id: id.clone(),
            waiters: self.waiters.clone(),
        });
        let new = NewJob {
            id,
            cache_key: self.worker.key(&request).to_string(),
            request,
            client: caller.name.clone(),
            idempotency_key,
            now_ms: now_ms(),
        };
        let (job, admission) = self.admit(new).await?;
        Ok((job, admission, watch))
    }

    /// Stores a new job as [`Store::submit`] admits it, counts how, and tells listeners.
    pub(crate) async fn admit(&self, new: NewJob) -> Result<(Job, Admission), StoreError> {
        let s = self.store.submit(new).await?;
        let tier = s.job.tier.as_str();
        match s.admission {
            Admission::Queued => self.dispatch_wake.notify_one(),
            Admission::Cached => self.metrics.cache_hits.with_label_values(&[tier]).inc(),
            Admission::Attached => self.metrics.coalesced.with_label_values(&[tier]).inc(),
            Admission::Existing => {}
        }
        self.publish(s.events);
        Ok((s.job, s.admission))
    }

    /// Waits for job `id` to end, and returns it as it ended (`None`: there is no such job).
    /// Woken by its end; reads it again at least every minute whatever happens.
    pub(crate) async fn until_ended(&self, id: &str) -> Option<Job> {
        let id_owned = id.to_owned();
        loop {
            let mut woken = Some(self.waiters.watch_one(id));
            // Read on a task of its own: a caller that drops this wait (a tiled job that ended)
            // must not drop a read in flight, which would keep its pooled connection from the
            // pool (four reads dropped so starved a farm's SQLite reads for good).
            let (store, job_id) = (self.store.clone(), id_owned.clone());
            let read = tokio::spawn(async move { store.job(&job_id).await })
                .await
                .unwrap_or_else(|e| Err(StoreError::Read(format!("the read's task failed: {e}"))));
            let ended = match read {
                Ok(Some(j)) if j.state.is_terminal() => Some(Some(j)),
                Ok(Some(_)) => {
                    if let Some(w) = woken.take() {
                        let _ = tokio::time::timeout(Duration::from_secs(60), w).await;
                    }
                    None
                }
                Ok(None) => Some(None),
                Err(e) => {
                    tracing::warn!(job_id = id, error = %e, "cannot read a job waited on; trying again in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    None
                }
            };
            // Its waiter, whose receiver is gone now, is not left behind.
            drop(woken);
            self.waiters.forget([&id_owned]);
            if let Some(job) = ended {
                return job;
            }
        }
    }

    /// Cancels a job; a client may cancel only its own. `Ok(None)`: no such job (or not theirs).
    #[tracing::instrument(level = "debug", skip_all, fields(job_id = id))]
    pub async fn cancel(&self, caller: &Caller, id: &str) -> Result<Option<Job>, StoreError> {
        if caller.role != Role::Operator && self.job(caller, id).await?.is_none() {
            return Ok(None);
        }
        self.cancel_by(id, &caller.name).await
    }

    /// Cancels job `id` in `by`'s name, wakes the dispatcher for an attached job that now leads
    /// its render, and tells listeners. `Ok(None)`: no such job.
    pub(crate) async fn cancel_by(&self, id: &str, by: &str) -> Result<Option<Job>, StoreError> {
        let Some((job, events)) = self.store.cancel(id, by, now_ms()).await? else { return Ok(None) };
        if events.iter().any(|e| e.state == JobState::Queued) {
            self.dispatch_wake.notify_one();
        }
        self.publish(events);
        Ok(Some(job))
    }

    /// An asset's provenance record as stored: with its row, or (recorded before 0005, or
    /// uploaded) a file beside it. `None` when it has none.
    pub async fn asset_provenance(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(json) = self.store.provenance(hash).await? {
            return Ok(Some(json.into_bytes()));
        }
        let path = self.worker.store().provenance_path(hash);
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Read(format!("{}: {e}", path.display()))),
        }
    }

    /// One job, if the caller may see it.
    pub async fn job(&self, caller: &Caller, id: &str) -> Result<Option<Job>, StoreError> {
        Ok(self.store.job(id).await?.filter(|j| caller.may_see(&j.client)))
    }

    /// Whether an asset is stored here: a file in the asset store, or a small PNG kept with the
    /// asset's row.
    pub async fn has_asset(&self, hash: &str) -> Result<bool, StoreError> {
        Ok(self.worker.store().contains(hash) || self.store.asset_png(hash).await?.is_some())
    }

    /// Waits up to `wait` for each of the jobs `ids` to reach a terminal state; returns those
    /// the caller may see, as they are then, by id. Each waiter is woken only by its own job's
    /// end (no thundering herd of long polls), and the reads are one batch before the wait and
    /// one after, however many jobs.
    pub async fn wait_terminal(
        &self,
        caller: &Caller,
        ids: &[String],
        wait: Duration,
    ) -> Result<HashMap<String, Job>, StoreError> {
        // Watch before reading, so an end between the two is not missed.
        let woken = self.waiters.watch(ids);
        let jobs = async {
            let seen = self.visible(caller, ids.to_vec()).await?;
            self.wait_woken(caller, seen, woken, wait).await
        }
        .await;
        self.waiters.forget(ids);
        jobs
    }

    /// Waits up to `wait` for jobs just submitted to end, each with the watch its submit began
    /// ([`Self::submit_watching`]), and updates them to how they are then. A job watched from
    /// before it was stored is not read before the wait: its end cannot have come unseen. One
    /// the submit found instead (by its idempotency key) is watched, then read, as in
    /// [`Self::wait_terminal`]. `watches` are the jobs', in order.
    pub async fn wait_submitted(
        &self,
        caller: &Caller,
        jobs: &mut [Job],
        mut watches: Vec<Watch>,
        wait: Duration,
    ) -> Result<(), StoreError> {
        let mut woken = HashMap::with_capacity(jobs.len());
        let mut found = Vec::new();
        let mut seen = HashMap::with_capacity(jobs.len());
        for (job, w) in jobs.iter().zip(&mut watches) {
            if job.state.is_terminal() {
                continue;
            }
            match w.woken.take() {
                Some(rx) if w.id == job.id => {
                    woken.insert(w.id.clone(), rx);
                    seen.insert(job.id.clone(), job.clone());
                }
                // Left as admitted if the caller cannot read it (another client's earlier job
                // under the same idempotency key).
                _ => found.push(job.id.clone()),
            }
        }
        woken.extend(self.waiters.watch(&found));
        let now = async {
            if !found.is_empty() {
                seen.extend(self.visible(caller, found.clone()).await?);
            }
            self.wait_woken(caller, seen, woken, wait).await
        }
        .await;
        // Done with their waiters: the watches forget theirs as they drop.
        drop(watches);
        self.waiters.forget(&found);
        let mut now = now?;
        for j in jobs.iter_mut() {
            if let Some(n) = now.remove(&j.id) {
                *j = n;
            }
        }
        Ok(())
    }

    /// Waits for the jobs of `woken` that `seen` has open, then reads those again.
    async fn wait_woken(
        &self,
        caller: &Caller,
        mut seen: HashMap<String, Job>,
        mut woken: HashMap<String, oneshot::Receiver<()>>,
        wait: Duration,
    ) -> Result<HashMap<String, Job>, StoreError> {
        woken.retain(|id, _| seen.get(id).is_some_and(|j| !j.state.is_terminal()));
        if !woken.is_empty() {
            let open: Vec<String> = woken.keys().cloned().collect();
            let _ = tokio::time::timeout(wait, futures_util::future::join_all(woken.into_values())).await;
            seen.extend(self.visible(caller, open).await?);
        }
        Ok(seen)
    }

    /// The jobs among `ids` the caller may see, by id.
    async fn visible(&self, caller: &Caller, ids: Vec<String>) -> Result<HashMap<String, Job>, StoreError> {
        let jobs = self.reads.jobs(ids).await?;
        Ok(jobs.into_iter().filter(|j| caller.may_see(&j.client)).map(|j| (j.id.clone(), j)).collect())
    }

    /// Resumes after a restart: jobs that were dispatched or running are queued again.
    pub async fn resume(&self) -> Result<usize, StoreError> {
        let events = self.store.resume(now_ms()).await?;
        let n = events.len();
        self.publish(events);
        self.dispatch_wake.notify_one();
        Ok(n)
    }
}

/// The API's event streams open, counted by token name.
#[derive(Debug, Default)]
pub struct EventStreams(Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>);

impl EventStreams {
    /// Counts one more stream of `token`, unless it holds `max` already (then how many it holds).
    pub fn open(&self, token: &str, max: usize) -> Result<StreamHeld, usize> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(token.to_owned()).or_default();
        if *n >= max {
            return Err(*n);
        }
        *n += 1;
        Ok(StreamHeld { open: self.0.clone(), token: token.to_owned() })
    }
}

/// One open event stream's place in [`EventStreams`], given back when dropped.
pub struct StreamHeld {
    open: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    token: String,
}

impl Drop for StreamHeld {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.token) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FarmConfig;
    use crate::store::SqliteStore;
    use kiln_worker::render::Backend;

    /// A scheduler on a SQLite store in `dir`, with no dispatcher or workers: jobs stay queued.
    async fn idle_scheduler(dir: &std::path::Path) -> Arc<Scheduler> {
        let mut cfg = FarmConfig::load_with(None, &|_| None).unwrap();
        cfg.worker.data_dir = dir.to_path_buf();
        let store = SqliteStore::open(&dir.join("kiln.db")).await.unwrap();
        let worker = Worker::new(&cfg.worker, Backend::Cpu { threads: 1 }).unwrap().records_kept_by_caller();
        Scheduler::new(Arc::new(store), Arc::new(worker), cfg.scheduler.clone(), cfg.worker.tiers.clone())
            .await
            .unwrap()
    }

    fn waiting(s: &Scheduler) -> usize {
        s.waiters.lock().len()
    }

    #[tokio::test]
    async fn a_submit_watched_from_before_it_is_stored_wakes_at_its_end_and_leaves_no_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let s = idle_scheduler(dir.path()).await;
        let me = Caller { name: "ana".into(), role: Role::Client, devices: vec![], budget: None };
        let req = |key: &str| JobRequest {
            idempotency_key: Some(key.into()),
            ..serde_json::from_value(
                serde_json::json!({ "prompt": "watched", "seed": 1, "tier": "preview", "width": 16 }),
            )
            .unwrap()
        };
        let submit = |key: &str| {
            let (s, me, request) = (s.clone(), me.clone(), s.resolve(&req(key)).unwrap());
            let key = key.to_owned();
            async move { s.submit_watching(&me, request, Some(key), true).await.unwrap() }
        };
        // A new job, then the same key again: the second finds the first (another id).
        let (first, admitted, watch) = submit("k").await;
        assert_eq!(admitted, Admission::Queued);
        let (again, admitted, again_watch) = submit("k").await;
        assert_eq!((admitted, &again.id), (Admission::Existing, &first.id));
        let mut jobs = vec![first, again];
        let t = std::time::Instant::now();
        s.wait_submitted(&me, &mut jobs, vec![watch.unwrap(), again_watch.unwrap()], Duration::from_millis(100))
            .await
            .unwrap();
        assert!(t.elapsed() >= Duration::from_millis(100), "nothing ended, so the wait ran out");
        assert!(jobs.iter().all(|j| j.state == JobState::Queued), "{jobs:?}");
        assert_eq!(waiting(&s), 0, "a wait that ran out leaves no waiter behind");

        // A waiter wakes when its job ends (here, cancelled), long before its wait is up.
        let (job, _, watch) = submit("other").await;
        let id = job.id.clone();
        let waited = tokio::spawn({
            let (s, me) = (s.clone(), me.clone());
            async move {
                let mut jobs = vec![job];
                s.wait_submitted(&me, &mut jobs, vec![watch.unwrap()], Duration::from_secs(30)).await.unwrap();
                jobs.remove(0)
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.cancel(&me, &id).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), waited).await.expect("woken by the end").unwrap();
        assert_eq!(ended.state, JobState::Cancelled);
        assert_eq!(waiting(&s), 0);

        // Watches of submits not waited for are dropped.
        let (_, _, watch) = submit("third").await;
        drop(watch);
        assert_eq!(waiting(&s), 0);
    }
}
