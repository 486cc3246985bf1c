//! Reads of jobs by id, gathered. Every long poll (`GET /v1/jobs/{id}?wait=`, `POST /v1/jobs?wait=`)
//! reads its jobs when it starts and again when they end, and under load hundreds start and end
//! at once: read one by one, each was a statement and a round trip to a database connection (on
//! SQLite, a hand-off to that connection's thread), about as costly as the job's own writes.
//! Reads that wait meanwhile are answered by one read of all their ids, like the writes'
//! [`Gather`](super::writer::Gather); an idle farm's read goes at once.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Job, Store, StoreError};

/// Most callers one gathered read answers.
const MAX_CALLERS: usize = 256;

/// Gathered reads in flight at once: the next gathers while these run.
const IN_FLIGHT: usize = 2;

/// One caller's ids and where its jobs go.
type Read = (Vec<String>, oneshot::Sender<Result<Vec<Job>, StoreError>>);

/// The handle callers read jobs through; cheap to clone.
#[derive(Clone)]
pub struct JobReads {
    tx: mpsc::Sender<Read>,
}

impl JobReads {
    /// Starts gathering reads of `store`'s jobs. It stops when every handle is dropped.
    pub fn spawn(store: Arc<dyn Store>) -> JobReads {
        let (tx, mut rx) = mpsc::channel::<Read>(4 * MAX_CALLERS);
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(IN_FLIGHT));
            let mut got = Vec::new();
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else { break };
                if rx.recv_many(&mut got, MAX_CALLERS).await == 0 {
                    break;
                }
                let (store, reads) = (store.clone(), std::mem::take(&mut got));
                tokio::spawn(async move {
                    answer(store.as_ref(), reads).await;
                    drop(slot);
                });
            }
        });
        JobReads { tx }
    }

    /// The jobs among `ids` that exist, each once, as [`Store::jobs`] answers them.
    pub async fn jobs(&self, ids: Vec<String>) -> Result<Vec<Job>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((ids, reply)).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// Reads every caller's ids at once and answers each with its own jobs.
async fn answer(store: &dyn Store, mut reads: Vec<Read>) {
    if reads.len() == 1 {
        let (ids, reply) = reads.remove(0);
        let _ = reply.send(store.jobs(ids).await);
        return;
    }
    let all = reads.iter().flat_map(|(ids, _)| ids.iter().cloned()).collect();
    match store.jobs(all).await {
        Ok(jobs) => {
            let by_id: HashMap<&str, &Job> = jobs.iter().map(|j| (j.id.as_str(), j)).collect();
            for (mut ids, reply) in reads {
                ids.sort_unstable();
                ids.dedup();
                let _ =
                    reply.send(Ok(ids.iter().filter_map(|id| by_id.get(id.as_str()).map(|&j| j.clone())).collect()));
            }
        }
        Err(e) => {
            let why = e.to_string();
            for (_, reply) in reads {
                let _ = reply.send(Err(StoreError::Read(why.clone())));
            }
        }
    }
}
