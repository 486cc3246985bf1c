//! Settling deliveries with the broker: the worker daemon's acks and nacks, in one task per
//! broker session, so that a run of deliveries finished together costs one `multiple` ack
//! instead of one frame each.
//!
//! A `multiple` ack of tag `t` settles every delivery on its channel up to `t` that is still
//! unsettled, including any still rendering, so it is only safe when everything below `t` is
//! settled. The settler knows: the consume loop tells it each delivery it takes, in the order the
//! channel delivered them, and every ack and nack goes through it, sent in the order it decides.
//! Nothing is held back: what cannot be folded into a `multiple` ack (a delivery finished while
//! an earlier one is still rendering) is acked alone at once, so a slow render never keeps the
//! broker from sending more.

use std::collections::{BTreeMap, BTreeSet};

use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// A delivery's place: the index of its channel in the session and its tag there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// The channel, by index.
    pub ch: usize,
    /// The delivery tag on it.
    pub tag: u64,
}

/// A delivery to settle, and the handle to settle it with.
pub struct Settle {
    /// Where it is.
    pub at: Tag,
    /// Its acker.
    pub acker: Acker,
}

enum Msg {
    Taken(Tag),
    Acks(Vec<Settle>),
    Nack(Settle),
}

/// The handle to a session's settler; cheap to clone. The task ends once every handle is gone,
/// having sent everything it was given.
#[derive(Clone)]
pub struct Settler(mpsc::UnboundedSender<Msg>);

impl Settler {
    /// Starts the settler for a session of `channels` consuming channels.
    pub fn start(channels: usize, metrics: Metrics) -> (Settler, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Settler(tx), tokio::spawn(run(rx, channels, metrics)))
    }

    /// The consume loop took this delivery; called in delivery order, before it is settled.
    pub fn taken(&self, at: Tag) {
        let _ = self.0.send(Msg::Taken(at));
    }

    /// Acks these deliveries (their results are safe).
    pub fn ack(&self, done: Vec<Settle>) {
        let _ = self.0.send(Msg::Acks(done));
    }

    /// Hands this delivery back to its queue.
    pub fn nack(&self, back: Settle) {
        let _ = self.0.send(Msg::Nack(back));
    }
}

/// How a channel's finished deliveries are acked: `multiple` is the highest tag below every
/// delivery still unsettled (acked with `multiple`, it settles all of them up to it), `single` the
/// rest, each alone.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    multiple: Option<u64>,
    single: Vec<u64>,
}

/// The plan for acking `done` (tags, already removed from `unsettled`) on a channel where
/// `unsettled` are the deliveries taken and not yet settled. Every tag taken below the lowest
/// unsettled one is settled, so one `multiple` ack covers the finished ones below it.
fn plan(unsettled: &BTreeSet<u64>, done: &[u64]) -> Plan {
    let low = unsettled.first().copied().unwrap_or(u64::MAX);
    let multiple = done.iter().copied().filter(|&t| t < low).max();
    let single = done.iter().copied().filter(|&t| t > low).collect();
    Plan { multiple, single }
}

async fn run(mut rx: mpsc::UnboundedReceiver<Msg>, channels: usize, metrics: Metrics) {
    let mut unsettled = vec![BTreeSet::new(); channels];
    while let Some(first) = rx.recv().await {
        // Each channel's finished deliveries in this round, by tag.
        let mut done: Vec<BTreeMap<u64, Acker>> = vec![BTreeMap::new(); channels];
        let mut next = Some(first);
        while let Some(m) = next.take().or_else(|| rx.try_recv().ok()) {
            match m {
                Msg::Taken(at) => {
                    if let Some(u) = unsettled.get_mut(at.ch) {
                        u.insert(at.tag);
                    }
                }
                // Sent before any `multiple` ack that relies on it being settled.
                Msg::Nack(s) => {
                    if let Some(u) = unsettled.get_mut(s.at.ch) {
                        u.remove(&s.at.tag);
                    }
                    let _ = s.acker.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
                }
                Msg::Acks(list) => {
                    for s in list {
                        if let (Some(u), Some(d)) = (unsettled.get_mut(s.at.ch), done.get_mut(s.at.ch)) {
                            u.remove(&s.at.tag);
                            d.insert(s.at.tag, s.acker);
                        }
                    }
                }
            }
        }
        for (mut ackers, unsettled) in done.into_iter().zip(&unsettled) {
            let tags: Vec<u64> = ackers.keys().copied().collect();
            let p = plan(unsettled, &tags);
            let frames = p.multiple.map(|t| (t, true)).into_iter().chain(p.single.into_iter().map(|t| (t, false)));
            for (tag, multiple) in frames {
                if let Some(acker) = ackers.remove(&tag) {
                    metrics.ack_frames.inc();
                    let _ = acker.ack(BasicAckOptions { multiple }).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(tags: &[u64]) -> BTreeSet<u64> {
        tags.iter().copied().collect()
    }

    #[test]
    fn finished_deliveries_below_every_unsettled_one_share_one_multiple_ack() {
        // 1 and 2 settled earlier; 3..=6 finished now; 7 still rendering.
        let p = plan(&set(&[7]), &[4, 3, 6, 5]);
        assert_eq!(p, Plan { multiple: Some(6), single: vec![] });
        // Nothing left unsettled: all of them at once.
        assert_eq!(plan(&set(&[]), &[9, 8]), Plan { multiple: Some(9), single: vec![] });
    }

    #[test]
    fn a_delivery_finished_above_one_still_rendering_is_acked_alone_and_at_once() {
        // 3 is still rendering: a multiple ack of 5 would settle it too.
        let p = plan(&set(&[3, 8]), &[2, 4, 5]);
        assert_eq!(p, Plan { multiple: Some(2), single: vec![4, 5] });
        let p = plan(&set(&[1]), &[4]);
        assert_eq!(p, Plan { multiple: None, single: vec![4] });
    }
}
