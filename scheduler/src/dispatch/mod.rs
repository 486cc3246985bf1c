//! Handing the outbox to workers: one loop ([`run_outbox`]) reads the due rows and offers them to
//! a transport behind [`Dispatch`]: the embedded farm's in-process queue ([`local`]) or RabbitMQ
//! ([`crate::broker`]). Each transport marks the rows sent once it holds them, in the order its
//! durability needs; a row not marked stays due and is offered again.

pub mod local;
pub mod queue;

use std::collections::HashSet;
use std::time::Duration;

use kiln_protocol::now_ms;
use tokio_util::sync::CancellationToken;

use crate::scheduler::Scheduler;
use crate::store::{BoxFut, Outgoing, StoreError};

/// Why a round of dispatch failed.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The store failed; the round is tried again after a pause.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The transport failed (the broker went away): the loop ends, for its caller to reconnect.
    #[error("the transport failed: {0}")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Marks outbox rows sent for a transport, and publishes the events that makes.
pub struct Marker<'a> {
    sched: &'a Scheduler,
    /// The jobs moved to `dispatched` when the round's rows were marked as they were read.
    marked: Option<HashSet<String>>,
}

impl Marker<'_> {
    /// Marks `ids` sent; the jobs that moved to `dispatched` (those that still waited for that
    /// attempt: not one cancelled, or whose result came first). For a transport that
    /// [marks as it reads](Dispatch::marks_as_it_reads) the round's rows are marked already.
    pub async fn mark(&self, ids: Vec<i64>) -> Result<HashSet<String>, StoreError> {
        if let Some(moved) = &self.marked {
            return Ok(moved.clone());
        }
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let events = self.sched.store.mark_sent(ids, now_ms()).await?;
        Ok(self.sched.publish_moved(events))
    }
}

impl Scheduler {
    /// Publishes `dispatched` events; the jobs they moved.
    fn publish_moved(&self, events: Vec<crate::store::Event>) -> HashSet<String> {
        let moved = events.iter().map(|e| e.job_id.clone()).collect();
        self.publish(events);
        moved
    }
}

/// A transport that carries jobs to workers.
pub trait Dispatch: Send + Sync {
    /// Due rows read at a time.
    fn window(&self) -> u32;

    /// Whether the rows are marked sent in the same write that reads them, before the transport
    /// holds them: for a transport that cannot lose what it takes short of the process dying (the
    /// next start queues such jobs again). One write a round instead of a read and a write.
    fn marks_as_it_reads(&self) -> bool {
        false
    }

    /// Hands `rows` to workers and marks sent (with `marker`) those it now holds, in the order
    /// its transport's durability needs; a row whose job no longer waits for it (`live` false) is
    /// only marked. Answers how many rows it marked: fewer than it was given means some must be
    /// offered again (after a pause).
    fn send<'a>(&'a self, rows: Vec<Outgoing>, marker: &'a Marker<'a>) -> BoxFut<'a, Result<usize, DispatchError>>;
}

/// Hands `rows` on: a job cut into tiles to its own task here ([`Scheduler::spawn_tiled`]),
/// once its row is marked sent (its tiles are jobs of their own, dispatched as any); the rest
/// to `via`. Answers how many rows were marked.
async fn send(
    sched: &Scheduler,
    via: &dyn Dispatch,
    rows: Vec<Outgoing>,
    marker: &Marker<'_>,
    stop: &CancellationToken,
) -> Result<usize, DispatchError> {
    let (tiled, rest): (Vec<Outgoing>, Vec<Outgoing>) =
        rows.into_iter().partition(|o| sched.is_tiled(&o.dispatch.request));
    let mut marked = 0;
    if !tiled.is_empty() {
        let moved = marker.mark(tiled.iter().map(|o| o.id).collect()).await?;
        marked += tiled.len();
        for o in tiled {
            if o.live && moved.contains(&o.dispatch.job_id) {
                sched.spawn_tiled(o.dispatch, stop);
            }
        }
    }
    if !rest.is_empty() {
        marked += via.send(rest, marker).await?;
    }
    Ok(marked)
}

/// Offers due outbox rows to `via` until `stop`, sleeping until the next row falls due or a new
/// one is written. Ends with an error only when the transport fails.
pub async fn run_outbox(sched: &Scheduler, via: &dyn Dispatch, stop: &CancellationToken) -> Result<(), DispatchError> {
    loop {
        let now = now_ms();
        let window = via.window();
        let read = if via.marks_as_it_reads() {
            sched
                .store
                .read_and_mark(now, window)
                .await
                .map(|(pending, events)| (pending, Marker { sched, marked: Some(sched.publish_moved(events)) }))
        } else {
            sched.store.pending(now, window).await.map(|pending| (pending, Marker { sched, marked: None }))
        };
        let pause = match read {
            Ok((pending, _)) if pending.rows.is_empty() => pending.next_due_ms,
            Ok((pending, marker)) => {
                let (offered, full) = (pending.rows.len(), pending.rows.len() == window as usize);
                match send(sched, via, pending.rows, &marker, stop).await {
                    // More may be due already.
                    Ok(marked) if marked == offered && full => continue,
                    Ok(marked) if marked == offered => pending.next_due_ms,
                    Ok(marked) => {
                        tracing::warn!(unsent = offered - marked, "dispatch: rows were not taken; they go again");
                        Some(now + 500)
                    }
                    Err(DispatchError::Store(e)) => {
                        tracing::error!(error = %e, "dispatch: cannot mark rows sent; they go again in 1 s");
                        Some(now + 1000)
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "dispatch: cannot read the outbox; trying again in 1 s");
                Some(now + 1000)
            }
        };
        let sleep = pause.map_or(Duration::from_secs(3600), |t| Duration::from_millis((t - now).max(1) as u64));
        tokio::select! {
            () = sched.dispatch_wake.notified() => {}
            () = tokio::time::sleep(sleep) => {}
            () = stop.cancelled() => return Ok(()),
        }
    }
}
