//! What the studio's orders wait on, and the channel that wakes the conductor ([`crate::orders`])
//! when it happens: a job or device task ending, a device announcing itself or reporting its
//! readings. The scheduler and the fleet bridge call [`OrderWaits::ended`] as they publish what
//! they heard, without knowing orders; an order nobody waits on costs nothing, however long it
//! waits (no task, no timer, no poll per order).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use tokio::sync::mpsc;

/// The conductor's index from what it waits on to the orders waiting, and its wake-up channel.
#[derive(Debug)]
pub struct OrderWaits {
    /// Held while an order is changed: the conductor and the API's decisions take turns.
    gate: tokio::sync::Mutex<()>,
    index: Mutex<Index>,
    tx: mpsc::UnboundedSender<String>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
}

#[derive(Debug, Default)]
struct Index {
    /// Each thing waited on (a job or task id, `device:ID`, `kind:KIND`), with its orders.
    on: HashMap<String, HashSet<String>>,
    /// Each order, with what it waits on.
    by: HashMap<String, HashSet<String>>,
}

impl Default for OrderWaits {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        OrderWaits { gate: tokio::sync::Mutex::new(()), index: Mutex::default(), tx, rx: Mutex::new(Some(rx)) }
    }
}

impl OrderWaits {
    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The turn to change an order (one change at a time, from the conductor or the API).
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.gate.lock().await
    }

    /// `order` waits on `on` (a job or task id, `device:ID`, `kind:KIND`).
    pub fn wait(&self, order: &str, on: &str) {
        let mut i = self.index();
        i.on.entry(on.to_owned()).or_default().insert(order.to_owned());
        i.by.entry(order.to_owned()).or_default().insert(on.to_owned());
    }

    /// `order` waits on nothing (it ended, or is about to say again what it waits on).
    pub fn forget(&self, order: &str) {
        let mut i = self.index();
        for on in i.by.remove(order).unwrap_or_default() {
            if let Some(orders) = i.on.get_mut(&on) {
                orders.remove(order);
                if orders.is_empty() {
                    i.on.remove(&on);
                }
            }
        }
    }

    /// `on` happened: wakes each order waiting on it. Cheap when none is (a lookup).
    pub fn ended(&self, on: &str) {
        let orders: Vec<String> = match self.index().on.get(on) {
            Some(orders) => orders.iter().cloned().collect(),
            None => return,
        };
        for order in orders {
            self.wake(&order);
        }
    }

    /// Wakes `order` (an approval decided, a cancel, a timer come due).
    pub fn wake(&self, order: &str) {
        let _ = self.tx.send(order.to_owned());
    }

    /// The conductor's end of the channel; `None` after the first call.
    pub fn receiver(&self) -> Option<mpsc::UnboundedReceiver<String>> {
        self.rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }

    /// How many orders wait on something (for the metrics and tests).
    pub fn waiting(&self) -> usize {
        self.index().by.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_end_wakes_only_the_orders_waiting_on_it() {
        let w = OrderWaits::default();
        let mut rx = w.receiver().unwrap();
        assert!(w.receiver().is_none());
        w.wait("o1", "j1");
        w.wait("o1", "j2");
        w.wait("o2", "j2");
        w.ended("j9");
        assert!(rx.try_recv().is_err());
        w.ended("j2");
        let mut woken = vec![rx.try_recv().unwrap(), rx.try_recv().unwrap()];
        woken.sort();
        assert_eq!(woken, ["o1", "o2"]);
        w.forget("o1");
        w.ended("j1");
        assert!(rx.try_recv().is_err(), "a forgotten order is not woken");
        assert_eq!(w.waiting(), 1);
        w.forget("o2");
        assert_eq!(w.waiting(), 0);
        assert!(w.index().on.is_empty());
    }
}
