//! The scheduler's logic, the same in both modes: admit jobs (validate, key, cache, single
//! flight), hand the outbox to the worker queue, run workers, record results, retry, cancel, and
//! tell listeners about each durable change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use kiln_protocol::{JobRequest, JobState, RenderRequest, RequestError, Tier};
use kiln_worker::engine::cppn::MODEL_ID;
use kiln_worker::prng::Rng;
use kiln_worker::render::{Backend, own_thumbnail};
use kiln_worker::store::SPILL_BYTES;
use kiln_worker::worker::{Rendered, Worker};
use serde::Serialize;
use tokio::sync::{Notify, broadcast, oneshot};
use tokio_util::sync::CancellationToken;

use crate::auth::{Caller, Role, Secret, new_token, token_hash};
use crate::config::SchedulerConfig;
use crate::metrics::Metrics;
use crate::queue::JobQueue;
use crate::retry::Decision;
use crate::store::{Admission, Dispatch, Event, Job, JobReads, NewJob, Outcome, Store, StoreError, TokenRow};
use crate::time::now_ms;

/// An in-process render of fewer samples than this (width × height × samples²) writes its `running`
/// event with its result, in one write, instead of one write before the render and one after (a job
/// otherwise costs four writes: its submit, dispatch, start and result). The event keeps the time
/// the render started; the job shows `dispatched` meanwhile, for a moment, and a job cancelled
/// meanwhile is rendered (for nothing) but stays cancelled. A larger render writes its start first,
/// so it shows `running` while it renders and is skipped once cancelled.
const START_WITH_RESULT_BELOW_SAMPLES: u64 = 64 * 64;

/// Renders the in-process workers have done whose small PNGs are still being recorded, at most,
/// shared out among the workers. More lengthens the queue each write ends and the wait of the
/// jobs at its back: when these PNGs were files, with 32 a worker, 128 workers ran tiny jobs
/// about as fast, and two runs in eight had a p99 over 300 ms (one over a second).
const FINISHING_PER_FARM: usize = 256;

/// A render on the CPU of fewer samples than this runs on the worker's task, not on a blocking
/// thread ([`renders_inline`]): a hand-off to the blocking pool and back costs two thread wakes
/// and their context switches, for a 16×16 render of about 50 µs (on the 2-core machine of the
/// farm benchmark, where tiny jobs went 4–13% faster without it). At this bound a render holds
/// its runtime thread for a few times that, well under a millisecond.
const INLINE_BELOW_SAMPLES: u64 = 32 * 32;

/// Whether a render runs on the task that asked for it: a tiny one on the CPU, whose PNG is
/// small and its own thumbnail, so held in memory (no file is written on a runtime thread).
fn renders_inline(worker: &Worker, req: &RenderRequest) -> bool {
    matches!(worker.engine().backend, Backend::Cpu { .. })
        && req.sample_count() < INLINE_BELOW_SAMPLES
        && own_thumbnail(req.width, req.height)
}

/// What a caught panic said.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let said = payload.downcast_ref::<&str>().copied().or_else(|| payload.downcast_ref::<String>().map(String::as_str));
    said.unwrap_or("(no message)").to_owned()
}

/// The outcome of a render: its asset a file in the asset store, or (small, held in memory) a
/// PNG to keep with the asset's row.
fn succeeded(r: Rendered) -> Outcome {
    // The render wrote its provenance as JSON text.
    Outcome::Succeeded { asset: r.asset, bytes: r.bytes, provenance: r.provenance, png: r.png }
}

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
    /// The store failed.
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

/// The scheduler: shared by the API, the dispatcher and the workers.
pub struct Scheduler {
    /// Durable state.
    pub store: Arc<dyn Store>,
    /// The render engine and asset store (the embedded farm's workers share it).
    pub worker: Arc<Worker>,
    /// The in-process worker queue.
    pub queue: JobQueue,
    /// Metrics.
    pub metrics: Metrics,
    /// Settings.
    pub cfg: SchedulerConfig,
    /// Workers heard from over the broker (distributed mode).
    pub registry: crate::broker::Registry,
    live: broadcast::Sender<Arc<Live>>,
    /// Long polls' reads of their jobs, gathered.
    reads: JobReads,
    waiters: Arc<Waiters>,
    tokens: RwLock<HashMap<String, Caller>>,
    pub(crate) dispatch_wake: Notify,
    /// Wakes the fleet bridge's sender (a task was created, a device came back).
    pub fleet_wake: Notify,
    rng: Mutex<Rng>,
    tiers: kiln_protocol::TierLimits,
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
            queue: JobQueue::default(),
            metrics: Metrics::new(),
            registry: crate::broker::Registry::new(Duration::from_secs(cfg.broker.lost_after_seconds)),
            cfg,
            live,
            waiters: Arc::default(),
            tokens: RwLock::new(HashMap::new()),
            dispatch_wake: Notify::new(),
            fleet_wake: Notify::new(),
            rng: Mutex::new(Rng::new(seed)),
            tiers,
        };
        s.reload_tokens().await?;
        for (tier, state, n) in s.store.counts().await? {
            s.metrics.jobs.with_label_values(&[tier.as_str(), state.as_str()]).set(n);
        }
        Ok(Arc::new(s))
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
            }
            if self.live.receiver_count() > 0 {
                let _ = self.live.send(Arc::new(Live::Event(e)));
            }
        }
    }

    fn random(&self) -> u64 {
        self.rng.lock().unwrap_or_else(|p| p.into_inner()).next_u64()
    }

    /// A new job id: creation time and randomness, so ids sort roughly by age and never collide.
    fn new_id(&self) -> String {
        format!("j{:011x}{:012x}", now_ms(), self.random() >> 16)
    }

    async fn reload_tokens(&self) -> Result<(), StoreError> {
        let rows = self.store.tokens().await?;
        let map = rows.into_iter().map(|t| (t.token_hash, Caller { name: t.name, role: t.role })).collect();
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }

    /// Who a bearer token belongs to.
    pub fn authenticate(&self, token: &str) -> Option<Caller> {
        self.tokens.read().unwrap_or_else(|p| p.into_inner()).get(&token_hash(token)).cloned()
    }

    /// Creates a token; the secret is returned once and never stored.
    pub async fn create_token(&self, name: &str, role: Role) -> Result<Secret, StoreError> {
        let secret = new_token().map_err(|e| StoreError::Corrupt { what: "random source", message: e.to_string() })?;
        let row = TokenRow { token_hash: token_hash(secret.expose()), name: name.to_owned(), role };
        self.store.add_token(row, now_ms()).await?;
        self.reload_tokens().await?;
        Ok(secret)
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
    pub async fn submit_watching(
        &self,
        caller: &Caller,
        request: RenderRequest,
        idempotency_key: Option<String>,
        watch: bool,
    ) -> Result<(Job, Admission, Option<Watch>), SubmitError> {
        let id = self.new_id();
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
        let s = self.store.submit(new).await?;
        let tier = s.job.tier.as_str();
        match s.admission {
            Admission::Queued => self.dispatch_wake.notify_one(),
            Admission::Cached => self.metrics.cache_hits.with_label_values(&[tier]).inc(),
            Admission::Attached => self.metrics.coalesced.with_label_values(&[tier]).inc(),
            Admission::Existing => {}
        }
        self.publish(s.events);
        Ok((s.job, s.admission, watch))
    }

    /// Cancels a job; a client may cancel only its own. `Ok(None)`: no such job (or not theirs).
    pub async fn cancel(&self, caller: &Caller, id: &str) -> Result<Option<Job>, StoreError> {
        if caller.role != Role::Operator && self.job(caller, id).await?.is_none() {
            return Ok(None);
        }
        let Some((job, events)) = self.store.cancel(id, &caller.name, now_ms()).await? else { return Ok(None) };
        if events.iter().any(|e| e.state == JobState::Queued) {
            self.dispatch_wake.notify_one();
        }
        self.publish(events);
        Ok(Some(job))
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

    /// Moves due outbox rows to the worker queue until cancelled.
    pub async fn run_dispatcher(self: Arc<Self>, stop: CancellationToken) {
        const BATCH: u32 = 512;
        loop {
            let now = now_ms();
            let next_due = match self.store.take_due(now, BATCH).await {
                Ok(due) => {
                    let full = due.jobs.len() == BATCH as usize;
                    self.publish(due.events);
                    self.queue.push_all(due.jobs);
                    if full {
                        continue;
                    }
                    due.next_due_ms
                }
                Err(e) => {
                    tracing::error!(error = %e, "dispatch: cannot read the outbox; trying again in 1 s");
                    Some(now + 1000)
                }
            };
            let sleep = next_due.map_or(Duration::from_secs(3600), |t| Duration::from_millis((t - now).max(1) as u64));
            tokio::select! {
                () = self.dispatch_wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// One in-process worker: takes jobs of `tiers` until cancelled, finishing the one in hand.
    /// A render's small PNG is stored and its result recorded while the worker renders the next
    /// (its share of [`FINISHING_PER_FARM`] at once): the syncs that store an asset take longer
    /// than a tiny render. Those it has begun are finished before it returns.
    pub async fn run_worker(self: Arc<Self>, n: usize, tiers: Vec<Tier>, stop: CancellationToken) {
        let mut finishing = tokio::task::JoinSet::new();
        let most = (FINISHING_PER_FARM / self.cfg.workers.max(1)).max(1);
        loop {
            while finishing.len() >= most {
                finishing.join_next().await;
            }
            // Finished ones are let go of as the worker goes.
            while finishing.try_join_next().is_some() {}
            let d = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                d = self.queue.pop(&tiers) => d,
            };
            let started_ms = now_ms();
            // A tiny render's start is written with its result instead.
            if d.request.sample_count() >= START_WITH_RESULT_BELOW_SAMPLES {
                let started = match self.store.start(&d, started_ms).await {
                    Ok(Some(e)) => e,
                    Ok(None) => continue,
                    Err(e) => {
                        // The job stays dispatched; the next start of the farm runs it.
                        tracing::error!(job_id = d.job_id, error = %e, "worker: cannot mark the job running");
                        continue;
                    }
                };
                self.publish(vec![started]);
            }
            let outcome = self.render(n, &d).await;
            // A small PNG held in memory, which the outcome carries to the asset's row, is
            // recorded while the worker goes on to its next render.
            if matches!(outcome, Outcome::Succeeded { png: Some(_), .. }) {
                let this = self.clone();
                finishing.spawn(async move { this.record(&d, started_ms, outcome).await });
            } else {
                self.record(&d, started_ms, outcome).await;
            }
        }
        while finishing.join_next().await.is_some() {}
    }

    async fn render(&self, n: usize, job: &Dispatch) -> Outcome {
        let attempt = job.attempt;
        self.metrics.in_flight.inc();
        let (worker, req, live, id) = (self.worker.clone(), job.request.clone(), self.live.clone(), job.job_id.clone());
        // Per job at debug: the job's events record it, and a line per job floods a busy farm's log.
        tracing::debug!(job_id = id, worker = n, attempt, tier = %req.tier, "rendering");
        let inline = renders_inline(&worker, &req);
        let render = move || {
            let mut last = 0;
            let progress = &mut |p: kiln_worker::render::Progress| {
                // Progress is for people: at most every 2% and the end.
                if p.rows_done == p.rows || p.rows_done * 50 / p.rows.max(1) > last {
                    last = p.rows_done * 50 / p.rows.max(1);
                    let _ = live.send(Arc::new(Live::Progress {
                        job_id: id.clone(),
                        rows_done: p.rows_done,
                        rows: p.rows,
                    }));
                }
            };
            worker.render_holding(&req, progress, SPILL_BYTES as u64)
        };
        let result = if inline {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(render)).map_err(|p| panic_message(&*p))
        } else {
            tokio::task::spawn_blocking(render).await.map_err(|e| e.to_string())
        };
        self.metrics.in_flight.dec();
        let (error, transient) = match result {
            Ok(Ok(r)) => return succeeded(r),
            Ok(Err(e)) => (e.to_string(), e.is_transient()),
            Err(e) => (format!("the render panicked: {e}"), true),
        };
        self.failure_outcome(job, error, transient)
    }

    /// What a failed attempt leads to: a retry after a backoff with jitter, or giving up.
    pub(crate) fn failure_outcome(&self, job: &Dispatch, error: String, transient: bool) -> Outcome {
        let attempt = job.attempt;
        let jitter = (self.random() >> 11) as f64 / (1u64 << 53) as f64;
        match self.cfg.retry.decide(attempt, transient, jitter) {
            Decision::RetryAfter(wait) => {
                tracing::warn!(
                    job_id = job.job_id,
                    attempt,
                    error,
                    retry_in_ms = wait.as_millis() as u64,
                    "render failed; will retry"
                );
                Outcome::Retry { error, retry_at_ms: now_ms() + wait.as_millis() as i64 }
            }
            Decision::GiveUp => {
                tracing::error!(job_id = job.job_id, attempt, error, "render failed; giving up");
                Outcome::Failed { error }
            }
        }
    }

    /// Counts an attempt's outcome.
    pub(crate) fn count_attempt(&self, job: &Dispatch, outcome: &str) {
        self.metrics.attempts.with_label_values(&[job.tier.as_str(), outcome]).inc();
    }

    /// Records an in-process attempt that started at `started_ms` ([`Store::record`]: its start
    /// too, unless that was written before the render; a start no longer allowed, the job
    /// cancelled meanwhile, records nothing of it but its asset).
    async fn record(&self, job: &Dispatch, started_ms: i64, outcome: Outcome) {
        self.count_attempt(job, outcome.label());
        let retry = matches!(outcome, Outcome::Retry { .. });
        // The result is worth keeping: a few tries before leaving the job to the next start.
        for wait_ms in [0, 100, 1000, 5000] {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            match self.store.record(job, started_ms, outcome.clone(), now_ms()).await {
                Ok(events) => {
                    self.publish(events);
                    if retry {
                        self.dispatch_wake.notify_one();
                    }
                    return;
                }
                Err(e) => tracing::error!(job_id = job.job_id, error = %e, "cannot record the result; trying again"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FarmConfig;
    use crate::store::SqliteStore;

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
        let me = Caller { name: "ana".into(), role: Role::Client };
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

    #[test]
    fn a_caught_panic_says_what_it_said() {
        let caught = |f: fn()| panic_message(&*std::panic::catch_unwind(f).unwrap_err());
        assert_eq!(caught(|| panic!("a literal")), "a literal");
        assert_eq!(caught(|| panic!("formatted {}", 7)), "formatted 7");
        assert_eq!(caught(|| std::panic::panic_any(7u8)), "(no message)");
    }
}
