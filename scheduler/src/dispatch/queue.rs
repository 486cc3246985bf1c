//! The embedded farm's worker queue: tier priority (preview before final before print) and, within
//! a tier, round robin over clients, so one client's batch of a thousand prints does not starve
//! another's one. In memory only: the database's outbox is the durable queue, and a restart
//! rebuilds this from it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use kiln_protocol::Tier;
use tokio::sync::Notify;

use crate::store::Dispatch;

/// One tier's lane: a queue per client and the order clients take turns in.
#[derive(Default)]
struct Lane {
    by_client: HashMap<String, VecDeque<Dispatch>>,
    turns: VecDeque<String>,
}

impl Lane {
    fn push(&mut self, d: Dispatch) {
        let q = self.by_client.entry(d.client.clone()).or_default();
        if q.is_empty() {
            self.turns.push_back(d.client.clone());
        }
        q.push_back(d);
    }

    fn pop(&mut self) -> Option<Dispatch> {
        let client = self.turns.pop_front()?;
        let q = self.by_client.get_mut(&client)?;
        let d = q.pop_front();
        if q.is_empty() {
            self.by_client.remove(&client);
        } else {
            self.turns.push_back(client);
        }
        d
    }

    fn len(&self) -> usize {
        self.by_client.values().map(VecDeque::len).sum()
    }
}

/// Pure queue state (no waiting), tested on its own.
#[derive(Default)]
pub struct Lanes {
    lanes: [Lane; 3],
}

fn lane_index(t: Tier) -> usize {
    match t {
        Tier::Preview => 0,
        Tier::Final => 1,
        Tier::Print => 2,
    }
}

impl Lanes {
    /// Adds a job behind its client's earlier ones.
    pub fn push(&mut self, d: Dispatch) {
        self.lanes[lane_index(d.tier)].push(d);
    }

    /// The next job among `tiers`: the highest-priority tier that has one, the next client in turn.
    pub fn pop(&mut self, tiers: &[Tier]) -> Option<Dispatch> {
        self.lanes
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| tiers.iter().any(|t| lane_index(*t) == *i))
            .find_map(|(_, l)| l.pop())
    }

    /// Jobs waiting in a tier.
    pub fn len(&self, tier: Tier) -> usize {
        self.lanes[lane_index(tier)].len()
    }
}

/// The shared queue workers wait on.
#[derive(Default)]
pub struct JobQueue {
    lanes: Mutex<Lanes>,
    ready: Notify,
}

impl JobQueue {
    /// Adds jobs and wakes workers.
    pub fn push_all(&self, ds: impl IntoIterator<Item = Dispatch>) {
        let mut n = 0;
        {
            let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
            for d in ds {
                lanes.push(d);
                n += 1;
            }
        }
        for _ in 0..n {
            self.ready.notify_one();
        }
    }

    /// Waits for the next job among `tiers`.
    pub async fn pop(&self, tiers: &[Tier]) -> Dispatch {
        loop {
            let notified = self.ready.notified();
            if let Some(d) = self.lanes.lock().unwrap_or_else(|p| p.into_inner()).pop(tiers) {
                return d;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: &str, tier: Tier, client: &str) -> Dispatch {
        let request =
            kiln_protocol::RenderRequest::resolve("cppn", "q", 1, tier, Some(8), None, None, &Default::default())
                .expect("a valid request");
        Dispatch {
            job_id: id.into(),
            tier,
            client: client.into(),
            attempt: 1,
            request,
            cache_key: String::new(),
            created_ms: 0,
        }
    }

    #[test]
    fn previews_go_before_finals_before_prints() {
        let mut l = Lanes::default();
        l.push(d("p1", Tier::Print, "a"));
        l.push(d("f1", Tier::Final, "a"));
        l.push(d("v1", Tier::Preview, "a"));
        let all = [Tier::Preview, Tier::Final, Tier::Print];
        let order: Vec<_> = std::iter::from_fn(|| l.pop(&all)).map(|d| d.job_id).collect();
        assert_eq!(order, ["v1", "f1", "p1"]);
    }

    #[test]
    fn clients_take_turns_within_a_tier() {
        let mut l = Lanes::default();
        for i in 0..3 {
            l.push(d(&format!("a{i}"), Tier::Final, "alice"));
        }
        l.push(d("b0", Tier::Final, "bob"));
        l.push(d("b1", Tier::Final, "bob"));
        let order: Vec<_> = std::iter::from_fn(|| l.pop(&[Tier::Final])).map(|d| d.job_id).collect();
        assert_eq!(order, ["a0", "b0", "a1", "b1", "a2"]);
    }

    #[test]
    fn a_worker_only_takes_the_tiers_it_serves() {
        let mut l = Lanes::default();
        l.push(d("v", Tier::Preview, "a"));
        assert!(l.pop(&[Tier::Print]).is_none());
        assert_eq!(l.len(Tier::Preview), 1);
        assert_eq!(l.pop(&[Tier::Preview, Tier::Print]).unwrap().job_id, "v");
    }

    #[tokio::test]
    async fn a_waiting_worker_wakes_when_a_job_arrives() {
        let q = std::sync::Arc::new(JobQueue::default());
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.pop(&[Tier::Preview]).await }
        });
        tokio::task::yield_now().await;
        q.push_all([d("x", Tier::Preview, "a")]);
        assert_eq!(waiter.await.unwrap().job_id, "x");
    }
}
