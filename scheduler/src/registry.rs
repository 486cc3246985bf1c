//! The workers the scheduler knows: the distributed farm's daemons, heard from by heartbeat, and
//! the embedded farm's own in-process workers; which of them are drained, and the commands
//! waiting to be sent to them. Pure state: the broker session feeds it heartbeats and sends its
//! commands, the in-process workers ask it whether they may work.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use kiln_protocol::Tier;
use kiln_protocol::wire::{self, Command, ControlMessage, Heartbeat};
use serde::Serialize;

use crate::store::DrainedWorker;

/// A worker as the registry knows it (the API shows it as a [`kiln_protocol::api::Worker`]).
#[derive(Debug, Clone, Serialize)]
pub struct WorkerEntry {
    /// Its last heartbeat (an in-process worker's: what it was started with).
    #[serde(flatten)]
    pub heartbeat: Heartbeat,
    /// `active`, `draining`, `drained` or `lost`.
    pub state: &'static str,
    /// Why the scheduler drained it, while it is drained.
    pub drained_reason: Option<String>,
    /// When it was last heard from, unix milliseconds (an in-process worker: now).
    pub last_seen_ms: i64,
}

impl From<WorkerEntry> for kiln_protocol::api::Worker {
    fn from(e: WorkerEntry) -> Self {
        let WorkerEntry { heartbeat, state, drained_reason, last_seen_ms } = e;
        kiln_protocol::api::Worker { heartbeat, state: state.to_owned(), drained_reason, last_seen_ms }
    }
}

/// A worker silent this long (a day) is forgotten by the registry.
pub const FORGET_AFTER_MS: i64 = 24 * 3600 * 1000;

/// A worker heard from: its last heartbeat, when, and whether it runs in this process.
#[derive(Debug)]
struct Known {
    heartbeat: Heartbeat,
    seen_ms: i64,
    /// An in-process worker: never lost, and told nothing over the broker.
    local: bool,
}

/// The workers, kept in memory: after a restart of the scheduler the registry fills again within
/// one heartbeat period (the drained ones come from the store).
#[derive(Debug, Default)]
pub struct Registry {
    workers: Mutex<HashMap<String, Known>>,
    drained: Mutex<HashMap<String, DrainedWorker>>,
    commands: Mutex<Vec<ControlMessage>>,
    /// Workers already reported lost (reported once; cleared when heard from again).
    reported_lost: Mutex<HashSet<String>>,
    /// Woken when a command is waiting.
    pub(crate) command_wake: tokio::sync::Notify,
    /// Woken when a worker is resumed (in-process workers wait on it while drained).
    resumed: tokio::sync::Notify,
    lost_after_ms: i64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// A registry that shows a worker unheard for `lost_after` as lost.
    pub fn new(lost_after: Duration) -> Registry {
        Registry { lost_after_ms: lost_after.as_millis() as i64, ..Registry::default() }
    }

    /// How long `hb`'s worker may be silent before it is shown lost: the lost period, or three
    /// of its beats where that is longer, so that one late beat never shows a working worker lost.
    fn silence_allowed_ms(&self, hb: &Heartbeat) -> i64 {
        let beats = hb.every_ms.map_or(0, |ms| i64::try_from(ms.saturating_mul(3)).unwrap_or(i64::MAX));
        self.lost_after_ms.max(beats)
    }

    /// Records a heartbeat; a worker whose view of its drain differs from the scheduler's is
    /// told again (it restarted, or a command was lost).
    pub fn heard(&self, hb: Heartbeat, now_ms: i64) {
        let drained = lock(&self.drained).get(&hb.worker_id).map(|d| d.reason.clone());
        match (&drained, &hb.drained) {
            (Some(reason), None) => self.command(&hb.worker_id, Command::Drain { reason: reason.clone() }),
            (None, Some(_)) => self.command(&hb.worker_id, Command::Resume),
            _ => {}
        }
        if lock(&self.reported_lost).remove(&hb.worker_id) {
            tracing::info!(worker = hb.worker_id, "a lost worker is heard from again");
        }
        let mut w = lock(&self.workers);
        if !w.contains_key(&hb.worker_id) {
            tracing::info!(worker = hb.worker_id, host = hb.host, backend = hb.backend, "a worker joined");
            if self.silence_allowed_ms(&hb) > self.lost_after_ms {
                tracing::warn!(
                    worker = hb.worker_id,
                    every_ms = hb.every_ms,
                    lost_after_ms = self.lost_after_ms,
                    "a worker beats too seldom for lost_after_seconds; it is shown lost after three missed beats instead"
                );
            }
        }
        w.insert(hb.worker_id.clone(), Known { heartbeat: hb, seen_ms: now_ms, local: false });
    }

    /// Adds an in-process worker (the embedded farm's), described as its heartbeat would be: it
    /// is never lost, and its drain and resume take effect here instead of over the broker.
    pub fn join_local(&self, hb: Heartbeat) {
        let seen_ms = hb.at_ms;
        lock(&self.workers).insert(hb.worker_id.clone(), Known { heartbeat: hb, seen_ms, local: true });
    }

    fn is_local(&self, worker_id: &str) -> bool {
        lock(&self.workers).get(worker_id).is_some_and(|k| k.local)
    }

    /// Queues a command for a worker reached over the broker (an in-process one needs none).
    fn command(&self, worker_id: &str, command: Command) {
        if self.is_local(worker_id) {
            return;
        }
        let msg = ControlMessage { v: wire::SCHEMA_VERSION, worker_id: worker_id.to_owned(), command };
        lock(&self.commands).push(msg);
        self.command_wake.notify_one();
    }

    /// The commands waiting to be sent.
    pub(crate) fn take_commands(&self) -> Vec<ControlMessage> {
        std::mem::take(&mut *lock(&self.commands))
    }

    /// Puts back commands that could not be sent, ahead of any queued since.
    pub(crate) fn put_back(&self, mut msgs: Vec<ControlMessage>) {
        let mut c = lock(&self.commands);
        msgs.append(&mut c);
        *c = msgs;
    }

    /// Replaces the drained workers (from the store, at the start of a broker session or farm).
    pub fn set_drained(&self, list: Vec<DrainedWorker>) {
        *lock(&self.drained) = list.into_iter().map(|d| (d.worker_id.clone(), d)).collect();
        self.resumed.notify_waiters();
    }

    /// Marks a worker drained and tells it.
    pub fn drain(&self, d: DrainedWorker) {
        self.command(&d.worker_id, Command::Drain { reason: d.reason.clone() });
        lock(&self.drained).insert(d.worker_id.clone(), d);
    }

    /// Lets a drained worker work again and tells it.
    pub fn resume(&self, worker_id: &str) {
        lock(&self.drained).remove(worker_id);
        self.command(worker_id, Command::Resume);
        self.resumed.notify_waiters();
    }

    /// Why a worker is drained, while it is.
    pub fn drained_reason(&self, worker_id: &str) -> Option<String> {
        lock(&self.drained).get(worker_id).map(|d| d.reason.clone())
    }

    /// Waits until `worker_id` is not drained (at once if it is not).
    pub async fn until_not_drained(&self, worker_id: &str) {
        loop {
            let resumed = self.resumed.notified();
            if self.drained_reason(worker_id).is_none() {
                return;
            }
            resumed.await;
        }
    }

    /// Every worker known, with its state as of `now_ms`, by id.
    pub fn list(&self, now_ms: i64) -> Vec<WorkerEntry> {
        let drained = lock(&self.drained);
        let w = lock(&self.workers);
        let mut out: Vec<WorkerEntry> = w
            .values()
            .map(|k| {
                let hb = &k.heartbeat;
                let reason = drained.get(&hb.worker_id).map(|d| d.reason.clone());
                let seen = if k.local { now_ms } else { k.seen_ms };
                WorkerEntry {
                    state: if now_ms - seen > self.silence_allowed_ms(hb) {
                        "lost"
                    } else if reason.is_some() {
                        "drained"
                    } else if hb.draining {
                        "draining"
                    } else {
                        "active"
                    },
                    drained_reason: reason,
                    heartbeat: hb.clone(),
                    last_seen_ms: seen,
                }
            })
            .collect();
        out.sort_by(|a, b| a.heartbeat.worker_id.cmp(&b.heartbeat.worker_id));
        out
    }

    /// Says once (a warning) of each worker that has become lost: no heartbeat for the lost
    /// period. Whatever it had in hand goes back to its queue when the broker sees its connection
    /// close. Returns the newly lost. A worker silent for [`FORGET_AFTER_MS`] is forgotten (no
    /// longer listed or counted; a drained one stays drained in the store).
    pub fn sweep(&self, now_ms: i64) -> Vec<String> {
        let gone: Vec<String> = {
            let mut workers = lock(&self.workers);
            let gone: Vec<String> = workers
                .iter()
                .filter(|(_, k)| !k.local && now_ms - k.seen_ms > FORGET_AFTER_MS)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &gone {
                workers.remove(id);
            }
            gone
        };
        for id in gone {
            lock(&self.reported_lost).remove(&id);
            tracing::info!(worker = id, "forgot a worker silent for a day");
        }
        let lost: Vec<WorkerEntry> = self.list(now_ms).into_iter().filter(|e| e.state == "lost").collect();
        let mut reported = lock(&self.reported_lost);
        let mut newly = Vec::new();
        for e in lost {
            if reported.insert(e.heartbeat.worker_id.clone()) {
                tracing::warn!(
                    worker = e.heartbeat.worker_id,
                    host = e.heartbeat.host,
                    silent_s = (now_ms - e.last_seen_ms) / 1000,
                    in_flight = e.heartbeat.in_flight,
                    "a worker is lost (no heartbeat); its unacked jobs return to the queue when its connection closes"
                );
                newly.push(e.heartbeat.worker_id);
            }
        }
        newly
    }

    /// Active workers (heard from, neither draining nor drained) serving each tier, for the
    /// `kiln_tier_workers` gauge and `/healthz`; every tier is there, 0 where none serves it.
    pub fn serving(&self, now_ms: i64) -> Vec<(Tier, usize)> {
        serving(&self.list(now_ms))
    }
}

/// Of `workers` (a [`Registry::list`]), the active ones serving each tier: every tier is
/// there, 0 where none serves it.
pub fn serving(workers: &[WorkerEntry]) -> Vec<(Tier, usize)> {
    let active = || workers.iter().filter(|e| e.state == "active");
    Tier::ALL.iter().map(|t| (*t, active().filter(|e| e.heartbeat.tiers.contains(t)).count())).collect()
}

/// Of `workers` (a [`Registry::list`]), how many are in each state.
pub fn counts(workers: &[WorkerEntry]) -> HashMap<&'static str, usize> {
    let mut n = HashMap::new();
    for e in workers {
        *n.entry(e.state).or_default() += 1;
    }
    n
}

/// The worker that rendered each recent tile job, by job id (noted as its success is settled):
/// for the provenance of the image the tiles are stitched into. Only in memory: a tile rendered
/// before a restart is listed without its worker.
#[derive(Debug, Default)]
pub struct TileWorkers(Mutex<HashMap<String, String>>);

/// Tile jobs' workers remembered, at most (a stitch reads them within moments of their end).
const TILE_WORKERS_KEPT: usize = 65_536;

impl TileWorkers {
    /// Notes that `worker` rendered tile job `job_id`.
    pub fn note(&self, job_id: &str, worker: &str) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= TILE_WORKERS_KEPT {
            m.clear();
        }
        m.insert(job_id.to_owned(), worker.to_owned());
    }

    /// The worker that rendered tile job `job_id`, if noted since this process started.
    pub fn of(&self, job_id: &str) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(job_id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(id: &str, every_ms: Option<u64>) -> Heartbeat {
        Heartbeat {
            v: wire::SCHEMA_VERSION,
            worker_id: id.into(),
            host: "h".into(),
            backend: "cpu".into(),
            adapter: "cpu".into(),
            memory_bytes: None,
            memory_used_bytes: None,
            utilization_percent: None,
            models: vec![],
            tiers: vec![],
            in_flight: 0,
            concurrency: 1,
            draining: false,
            drained: None,
            at_ms: 0,
            every_ms,
        }
    }

    fn drained(id: &str) -> DrainedWorker {
        DrainedWorker { worker_id: id.into(), reason: "failed 5 distinct jobs".into(), at_ms: 1 }
    }

    fn states(r: &Registry, now: i64) -> Vec<(String, &'static str)> {
        r.list(now).into_iter().map(|e| (e.heartbeat.worker_id, e.state)).collect()
    }

    #[test]
    fn a_worker_is_lost_after_the_lost_period_or_three_of_its_beats_whichever_is_longer() {
        let r = Registry::new(Duration::from_secs(5));
        // Beats as often as the lost period, every second, and an older worker that does not say.
        for (id, every) in [("slow", Some(5_000)), ("quick", Some(1_000)), ("old", None)] {
            r.heard(beat(id, every), 0);
        }
        assert_eq!(
            states(&r, 5_000),
            [("old".into(), "active"), ("quick".into(), "active"), ("slow".into(), "active")]
        );
        // One late beat: the slow worker is still active.
        assert_eq!(states(&r, 5_050), [("old".into(), "lost"), ("quick".into(), "lost"), ("slow".into(), "active")]);
        assert_eq!(r.sweep(5_050), ["old", "quick"], "each lost worker is reported once");
        assert_eq!(r.sweep(14_000), Vec::<String>::new());
        assert_eq!(states(&r, 15_001)[2], ("slow".into(), "lost"));
        assert_eq!(counts(&r.list(15_001)).get("lost"), Some(&3));
        // A day later, those still silent are forgotten; one heard from meanwhile stays.
        r.heard(beat("quick", Some(1_000)), 20_000);
        assert_eq!(r.sweep(5_001 + FORGET_AFTER_MS), ["quick"], "lost again, and said so");
        assert_eq!(states(&r, 5_001 + FORGET_AFTER_MS), [("quick".into(), "lost")]);
        r.join_local(beat("in-process-0", None));
        r.sweep(30_000 + 2 * FORGET_AFTER_MS);
        assert_eq!(states(&r, 30_000 + 2 * FORGET_AFTER_MS), [("in-process-0".into(), "active")], "never forgotten");
    }

    #[test]
    fn a_drained_worker_is_told_and_told_again_when_its_heartbeat_disagrees() {
        let r = Registry::new(Duration::from_secs(5));
        r.heard(beat("w", None), 0);
        r.drain(drained("w"));
        let told = r.take_commands();
        assert_eq!(told.len(), 1);
        assert_eq!(told[0].command, Command::Drain { reason: "failed 5 distinct jobs".into() });
        assert_eq!(states(&r, 1), [("w".into(), "drained")]);
        // It restarted and forgot: it beats undrained, and is told again.
        r.heard(beat("w", None), 2);
        assert!(matches!(r.take_commands()[..], [ControlMessage { command: Command::Drain { .. }, .. }]));
        // Resumed: told so, and a beat that agrees asks for nothing.
        r.resume("w");
        assert_eq!(r.take_commands()[0].command, Command::Resume);
        r.heard(beat("w", None), 3);
        assert!(r.take_commands().is_empty());
        assert_eq!(states(&r, 4), [("w".into(), "active")]);
    }

    #[test]
    fn commands_that_could_not_be_sent_go_back_ahead_of_newer_ones() {
        let r = Registry::new(Duration::from_secs(5));
        r.drain(drained("a"));
        let first = r.take_commands();
        r.drain(drained("b"));
        r.put_back(first);
        let ids: Vec<String> = r.take_commands().into_iter().map(|c| c.worker_id).collect();
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn an_in_process_worker_is_never_lost_and_is_sent_no_commands() {
        let r = Registry::new(Duration::from_secs(5));
        r.join_local(beat("in-process-0", None));
        assert_eq!(states(&r, 1_000_000), [("in-process-0".into(), "active")]);
        assert!(r.sweep(1_000_000).is_empty());
        r.drain(drained("in-process-0"));
        assert!(r.take_commands().is_empty(), "an in-process worker is drained here, not over the broker");
        assert_eq!(states(&r, 1_000_001), [("in-process-0".into(), "drained")]);
        assert_eq!(r.drained_reason("in-process-0").as_deref(), Some("failed 5 distinct jobs"));
        r.resume("in-process-0");
        assert!(r.take_commands().is_empty());
        assert_eq!(r.drained_reason("in-process-0"), None);
    }

    #[tokio::test]
    async fn a_drained_in_process_worker_waits_until_it_is_resumed() {
        let r = std::sync::Arc::new(Registry::new(Duration::from_secs(5)));
        r.join_local(beat("w", None));
        r.until_not_drained("w").await;
        r.drain(drained("w"));
        let waiting = tokio::spawn({
            let r = r.clone();
            async move { r.until_not_drained("w").await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "a drained worker waits");
        r.resume("w");
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("woken by the resume").unwrap();
    }
}
