//! A batch of submits, decided the same way by both stores: each store reads what its database
//! knows about the batch's cache keys and idempotency keys (one statement each), the rules run
//! here in the batch's order (so a later submit sees an earlier one: it attaches to the render
//! an earlier one leads, or gets the job that took its idempotency key), and each store then
//! writes the new jobs in one statement ([`new_rows`]) and answers with [`answer`].

use std::collections::HashMap;

use kiln_protocol::JobState;

use super::rows::{Cols, admitted, corrupt, job_from_row};
use super::{Admission, Job, NewJob, StoreError, Submitted};

/// What the database holds for one cache key: its asset, and the live job that leads its render.
pub(super) type KeyState = (Option<String>, Option<String>);

/// What a submit decided before it writes: a job that already holds the idempotency key, the
/// same key taken earlier in the batch, or a new job (answered from the cache with `asset`,
/// attached to the render `follows` leads, or leading one of its own).
pub(super) enum Admit {
    Existing(Box<Job>),
    SameAs(usize),
    New { follows: Option<String>, asset: Option<String> },
}

/// A new job's first state and the note of its first event.
fn first_event(follows: Option<&str>, asset: Option<&str>) -> (JobState, String) {
    match (asset, follows) {
        (Some(_), _) => (JobState::Cached, "answered from the cache".into()),
        (None, Some(leader)) => (JobState::Queued, format!("attached to the render of job {leader}")),
        (None, None) => (JobState::Queued, "queued".into()),
    }
}

/// The batch's cache keys, each once, sorted.
pub(super) fn cache_keys(jobs: &[NewJob]) -> Vec<String> {
    let mut keys: Vec<String> = jobs.iter().map(|j| j.cache_key.clone()).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// The batch's (client, idempotency key) pairs, for the submits that carry one.
pub(super) fn idempotency_keys(jobs: &[NewJob]) -> Vec<(String, String)> {
    jobs.iter().filter_map(|j| Some((j.client.clone(), j.idempotency_key.clone()?))).collect()
}

/// What the database holds for each cache key, from rows of `key, asset, leader`.
pub(super) fn key_states(rows: &[impl Cols]) -> Result<HashMap<String, KeyState>, StoreError> {
    rows.iter().map(|r| Ok((r.col("key")?, (r.col("asset")?, r.col("leader")?)))).collect()
}

/// The stored jobs that hold idempotency keys, by (client, key), from rows of `jobs`.
pub(super) fn taken_keys(rows: &[impl Cols]) -> Result<HashMap<(String, String), Job>, StoreError> {
    rows.iter()
        .map(|r| {
            let job = job_from_row(r)?;
            Ok(((job.client.clone(), job.idempotency_key.clone().unwrap_or_default()), job))
        })
        .collect()
}

/// Runs the rules over the batch in order. `known` has every cache key of the batch; `taken`
/// the stored jobs that hold one of its idempotency keys, by (client, key).
pub(super) fn decide(
    jobs: &[NewJob],
    mut known: HashMap<String, KeyState>,
    taken: &HashMap<(String, String), Job>,
) -> Result<Vec<Admit>, StoreError> {
    let mut taken_here: HashMap<(String, String), usize> = HashMap::new();
    let mut admits = Vec::with_capacity(jobs.len());
    for (i, j) in jobs.iter().enumerate() {
        if let Some(idem) = &j.idempotency_key {
            let key = (j.client.clone(), idem.clone());
            if let Some(job) = taken.get(&key) {
                admits.push(Admit::Existing(Box::new(job.clone())));
                continue;
            }
            if let Some(&first) = taken_here.get(&key) {
                admits.push(Admit::SameAs(first));
                continue;
            }
            taken_here.insert(key, i);
        }
        let (asset, leader) = known
            .get_mut(&j.cache_key)
            .ok_or_else(|| corrupt("submit", format!("cache key {} was not looked up", j.cache_key)))?;
        let follows = if asset.is_some() { None } else { leader.clone() };
        if asset.is_none() && leader.is_none() {
            // It leads the render of its key; later submits in the batch attach to it.
            *leader = Some(j.id.clone());
        }
        admits.push(Admit::New { follows, asset: asset.clone() });
    }
    Ok(admits)
}

/// A new job to write: its row, its first event, and whether it gets an outbox row.
pub(super) struct NewRow<'a> {
    pub job: &'a NewJob,
    pub request: String,
    pub follows: Option<&'a str>,
    pub asset: Option<&'a str>,
    pub state: JobState,
    pub detail: String,
    /// It leads a render of its own: it gets an outbox row.
    pub leads: bool,
}

/// The new jobs of the batch, in its order.
pub(super) fn new_rows<'a>(jobs: &'a [NewJob], admits: &'a [Admit]) -> Result<Vec<NewRow<'a>>, StoreError> {
    jobs.iter()
        .zip(admits)
        .filter_map(|(job, admit)| match admit {
            Admit::New { follows, asset } => Some((job, follows.as_deref(), asset.as_deref())),
            _ => None,
        })
        .map(|(job, follows, asset)| {
            let (state, detail) = first_event(follows, asset);
            let request = serde_json::to_string(&job.request).map_err(|e| corrupt("request", e))?;
            Ok(NewRow {
                job,
                request,
                follows,
                asset,
                state,
                detail,
                leads: state == JobState::Queued && follows.is_none(),
            })
        })
        .collect()
}

/// Each submit's answer, given the `seq` of each new job's first event, by job id.
pub(super) fn answer(
    jobs: Vec<NewJob>,
    admits: Vec<Admit>,
    seqs: &HashMap<String, i64>,
) -> Result<Vec<Submitted>, StoreError> {
    let mut out: Vec<Submitted> = Vec::with_capacity(jobs.len());
    for (new, admit) in jobs.into_iter().zip(admits) {
        let submitted = match admit {
            Admit::Existing(job) => Submitted { job: *job, admission: Admission::Existing, events: vec![] },
            Admit::SameAs(first) => {
                Submitted { job: out[first].job.clone(), admission: Admission::Existing, events: vec![] }
            }
            Admit::New { follows, asset } => {
                let seq = *seqs.get(&new.id).ok_or_else(|| corrupt("event", format!("job {} got none", new.id)))?;
                let (state, detail) = first_event(follows.as_deref(), asset.as_deref());
                admitted(new, seq, state, follows, asset, &detail)
            }
        };
        out.push(submitted);
    }
    Ok(out)
}
