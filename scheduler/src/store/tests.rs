//! One store test suite, run against both stores: SQLite in a temporary directory, and
//! PostgreSQL in a fresh schema of the test database (see [`kiln_testenv`]).

use super::*;
use kiln_protocol::TierLimits;

async fn sqlite_store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("kiln.db")).await.unwrap();
    (dir, s)
}

async fn pg_store() -> Option<PgStore> {
    let url = kiln_testenv::fresh_database().await?;
    Some(PgStore::open(&url).await.unwrap())
}

/// What the in-process transport does with due rows ([`crate::dispatch::local`]): reads them and
/// marks them sent in one write, and keeps the jobs the mark moved to `dispatched`.
trait TakeDue {
    fn take_due(&self, now_ms: i64, limit: u32) -> BoxFut<'_, Result<Due, StoreError>>;
}

impl<S: Store + ?Sized> TakeDue for S {
    fn take_due(&self, now_ms: i64, limit: u32) -> BoxFut<'_, Result<Due, StoreError>> {
        Box::pin(async move {
            let (pending, events) = self.read_and_mark(now_ms, limit).await?;
            let moved = events.iter().map(|e| e.job_id.clone()).collect();
            Ok(Due::of(pending, &moved))
        })
    }
}

/// Runs each case against both stores.
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test]
            async fn $name() {
                let (_dir, s) = super::sqlite_store().await;
                super::$name(&s).await;
            })*
        }
        mod on_postgres {
            $(#[tokio::test]
            async fn $name() {
                let Some(s) = super::pg_store().await else { return };
                super::$name(&s).await;
            })*
        }
    };
}

both_stores!(
    the_job_row_is_the_projection_of_its_events_through_a_whole_life,
    reports_are_idempotent_by_job_and_attempt,
    the_cache_and_single_flight_are_decided_in_the_writer,
    resume_requeues_jobs_in_hand_and_a_cancelled_job_is_never_handed_out,
    the_relay_marks_rows_sent_only_when_told_and_a_result_may_overtake_it,
    tokens_are_unique_by_name,
    failures_are_tallied_per_job_and_per_worker_and_a_resume_starts_the_count_afresh,
    a_whole_attempt_recorded_at_once_is_start_then_finish,
    devices_and_their_tasks_move_forward_only,
    concurrent_submits_and_results_keep_the_rules_of_one_at_a_time,
    a_job_starts_and_finishes_once_however_many_reports_come_together,
    batches_see_their_own_earlier_members,
    many_jobs_are_read_at_once,
    reads_gathered_from_many_callers_answer_each_its_own,
    an_asset_keeps_the_first_provenance_and_png_recorded_for_it,
    an_asset_is_readable_by_the_clients_whose_jobs_have_it_and_the_devices_that_work_on_it,
    retention_deletes_what_ended_long_ago_and_the_assets_nothing_names,
    an_order_changes_by_compare_and_set_and_an_incident_is_raised_once_per_cause,
    renders_are_charged_once_and_retention_spares_a_live_orders_renders,
    the_gallery_lists_assets_newest_first_by_client_and_words,
);

async fn the_gallery_lists_assets_newest_first_by_client_and_words(s: &dyn Store) {
    use super::costs::GalleryQuery;
    // A tile of a job cut up across the farm ("t") is no image of its own: never listed.
    for (i, (id, prompt)) in
        [("t", "kiln tile"), ("a", "Kiln at dusk"), ("b", "ember 100% glaze"), ("c", "kiln_glaze")].iter().enumerate()
    {
        let mut job = new_job(id, &format!("k{id}"), i as u64);
        job.request.prompt = (*prompt).to_owned();
        if *id == "t" {
            job.request.tile = Some(kiln_protocol::Tile { y0: 0, rows: 8 });
        }
        s.submit(job).await.unwrap();
        let due = s.take_due(2000, 10).await.unwrap();
        s.start(&due.jobs[0], 2001).await.unwrap();
        let ok = Outcome::Succeeded { asset: format!("h{id}"), bytes: 1, provenance: None, png: None, cost: None };
        s.finish(&due.jobs[0], ok, 3000 + i as i64).await.unwrap();
    }
    // A cache hit for another client makes the first asset theirs too.
    let mut theirs = new_job("a2", "ka", 0);
    theirs.client = "someone else".into();
    assert_eq!(s.submit(theirs).await.unwrap().admission, Admission::Cached);
    let gallery = |client: Option<&str>, words: &[&str], before: Option<(i64, &str)>, limit: u32| {
        let q = GalleryQuery {
            client: client.map(str::to_owned),
            words: words.iter().map(|w| (*w).to_owned()).collect(),
            before: before.map(|(ms, h)| (ms, h.to_owned())),
            limit,
        };
        async move { s.gallery(q).await.unwrap().into_iter().map(|g| (g.asset, g.job.id)).collect::<Vec<_>>() }
    };
    let pairs = |v: &[(&str, &str)]| v.iter().map(|(a, j)| ((*a).to_owned(), (*j).to_owned())).collect::<Vec<_>>();
    assert_eq!(gallery(None, &[], None, 10).await, pairs(&[("hc", "c"), ("hb", "b"), ("ha", "a")]));
    assert_eq!(gallery(None, &["kiln"], None, 10).await, pairs(&[("hc", "c"), ("ha", "a")]), "any case");
    assert_eq!(gallery(None, &["kiln", "dusk"], None, 10).await, pairs(&[("ha", "a")]), "every word");
    assert_eq!(gallery(None, &["_glaze"], None, 10).await, pairs(&[("hc", "c")]), "LIKE's wildcards are text");
    assert_eq!(gallery(None, &["100%"], None, 10).await, pairs(&[("hb", "b")]));
    assert_eq!(gallery(None, &[], None, 2).await, pairs(&[("hc", "c"), ("hb", "b")]));
    let hb_ms = s.gallery(GalleryQuery { limit: 2, ..Default::default() }).await.unwrap()[1].created_ms;
    assert_eq!(gallery(None, &[], Some((hb_ms, "hb")), 2).await, pairs(&[("ha", "a")]), "the next page");
    assert_eq!(gallery(Some("someone else"), &[], None, 10).await, pairs(&[("ha", "a2")]), "their own job");
    assert_eq!(gallery(Some("tester"), &[], None, 10).await.len(), 3);
    assert!(gallery(Some("nobody"), &[], None, 10).await.is_empty());
}

async fn renders_are_charged_once_and_retention_spares_a_live_orders_renders(s: &dyn Store) {
    use super::Cost;
    use super::costs::AssetJob;
    use super::orders::OrderRow;
    // A client's own job, and an order's render (its idempotency key names the order).
    let mut ordered = new_job("ordered", "k2", 2);
    ordered.idempotency_key = Some("order-o9-preview-1-0".into());
    s.submit(new_job("mine", "k1", 1)).await.unwrap();
    s.submit(ordered).await.unwrap();
    assert_eq!(s.live_requests("tester").await.unwrap().len(), 2, "both are in flight");
    let due = s.take_due(2000, 10).await.unwrap();
    for d in &due.jobs {
        let cost = Some(Cost { device_ms: 40, cost_ms: 80 });
        let ok = Outcome::Succeeded { asset: format!("h-{}", d.job_id), bytes: 1, provenance: None, png: None, cost };
        if d.job_id == "mine" {
            s.start(d, 2001).await.unwrap();
            s.finish(d, ok.clone(), 2002).await.unwrap();
        } else {
            s.record(d, 2001, ok.clone(), 2002).await.unwrap();
        }
        // A repeat changes nothing, and charges nothing more.
        s.record(d, 2001, ok, 2003).await.unwrap();
    }
    assert!(s.live_requests("tester").await.unwrap().is_empty());
    assert_eq!(s.spent("tester", 0).await.unwrap(), 160);
    assert_eq!((s.spent("tester", 2003).await.unwrap(), s.spent("other", 0).await.unwrap()), (0, 0));
    let usage = s.usage(None, 0, 10_000).await.unwrap();
    let u = &usage[0];
    assert_eq!((usage.len(), u.client.as_str(), u.tier.as_str(), u.day_ms), (1, "tester", "preview", 0));
    assert_eq!((u.renders, u.device_ms, u.cost_ms), (2, 80, 160));
    assert!(s.usage(Some("other".into()), 0, 10_000).await.unwrap().is_empty());
    let recent = s.recent_charges(10).await.unwrap();
    assert_eq!((recent.len(), recent[0].width, recent[0].device_ms), (2, 16, 40));
    assert_eq!(s.cached(vec!["k1".into(), "kx".into()]).await.unwrap(), ["k1"]);
    let asked = s.asset_jobs("h-ordered", 10).await.unwrap();
    let want = AssetJob {
        id: "ordered".into(),
        client: "tester".into(),
        idempotency_key: Some("order-o9-preview-1-0".into()),
        created_ms: 1000,
    };
    assert_eq!(asked, [want]);
    // Retention spares the renders of a live order; once it has ended, they go too.
    let order = |state: &str, version| OrderRow {
        id: "o9".into(),
        plan: "gallery-print".into(),
        client: "tester".into(),
        state: state.into(),
        doc: "{}".into(),
        version,
        created_ms: 1000,
        updated_ms: 1000,
    };
    assert!(s.save_order(order("awaiting_approval", 1), 0, vec![]).await.unwrap());
    assert_eq!(s.prune(i64::MAX, 0).await.unwrap().jobs, 1);
    assert!(s.job("mine").await.unwrap().is_none() && s.job("ordered").await.unwrap().is_some());
    assert!(s.save_order(order("succeeded", 2), 1, vec![]).await.unwrap());
    assert_eq!(s.prune(i64::MAX, 0).await.unwrap().jobs, 1);
    assert!(s.job("ordered").await.unwrap().is_none());
    // What was charged outlives the jobs.
    assert_eq!(s.spent("tester", 0).await.unwrap(), 160);
}

async fn an_order_changes_by_compare_and_set_and_an_incident_is_raised_once_per_cause(s: &dyn Store) {
    use super::orders::{Incident, NewOrderEvent, OrderQuery, OrderRow};
    let row = |id: &str, state: &str, version: i64, at: i64| OrderRow {
        id: id.into(),
        plan: "gallery-print".into(),
        client: "tester".into(),
        state: state.into(),
        doc: format!("{{\"v\":{version}}}"),
        version,
        created_ms: 1000,
        updated_ms: at,
    };
    let ev = |state: &str| NewOrderEvent { step: None, state: state.into(), detail: format!("to {state}") };
    assert!(s.save_order(row("o1", "running", 1, 1000), 0, vec![ev("running")]).await.unwrap());
    assert!(!s.save_order(row("o1", "running", 1, 1000), 0, vec![ev("running")]).await.unwrap(), "placed once");
    assert!(s.save_order(row("o1", "awaiting_approval", 2, 2000), 1, vec![ev("awaiting_approval")]).await.unwrap());
    // A writer that read version 1 comes second: nothing of it is written.
    assert!(!s.save_order(row("o1", "cancelled", 2, 2500), 1, vec![ev("cancelled")]).await.unwrap());
    let got = s.order("o1").await.unwrap().unwrap();
    assert_eq!((got.state.as_str(), got.version, got.doc.as_str()), ("awaiting_approval", 2, "{\"v\":2}"));
    let events: Vec<String> = s.order_events("o1").await.unwrap().into_iter().map(|e| e.state).collect();
    assert_eq!(events, ["running", "awaiting_approval"]);
    assert!(s.save_order(row("o2", "succeeded", 1, 1000), 0, vec![]).await.unwrap());
    let live: Vec<String> = s.live_orders().await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(live, ["o1"]);
    let mut counts = s.order_counts().await.unwrap();
    counts.sort();
    assert_eq!(counts, [("awaiting_approval".to_owned(), 1), ("succeeded".to_owned(), 1)]);
    let page =
        s.orders(OrderQuery { state: None, client: Some("tester".into()), limit: 1, before: None }).await.unwrap();
    assert_eq!(page.len(), 1);
    let rest = OrderQuery { limit: 5, before: Some((page[0].created_ms, page[0].id.clone())), ..OrderQuery::default() };
    let rest: Vec<String> = s.orders(rest).await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(rest.len(), 1, "the next page holds the other: {rest:?}");
    assert_ne!(rest[0], page[0].id);

    let incident = |id: &str, cause: &str| Incident {
        id: id.into(),
        cause: cause.into(),
        kind: "order_step".into(),
        subject: "o1".into(),
        state: "open".into(),
        summary: "it failed".into(),
        created_ms: 3000,
        updated_ms: 3000,
        resolved_by: None,
        note: None,
    };
    assert!(s.raise_incident(incident("i1", "order:o1:print:3")).await.unwrap());
    assert!(!s.raise_incident(incident("i2", "order:o1:print:3")).await.unwrap(), "once per cause");
    assert!(s.raise_incident(incident("i3", "order:o1:display:3")).await.unwrap());
    let resolved = s.resolve_incident("i1", "operator", Some("refilled".into()), 4000).await.unwrap().unwrap();
    assert_eq!((resolved.state.as_str(), resolved.note.as_deref()), ("resolved", Some("refilled")));
    assert!(s.resolve_incident("i1", "operator", None, 5000).await.unwrap().is_none(), "resolved once");
    let open: Vec<String> = s.incidents(Some("open".into()), 10).await.unwrap().into_iter().map(|i| i.id).collect();
    assert_eq!(open, ["i3"]);
    assert_eq!(s.open_incident_counts().await.unwrap(), [("order_step".to_owned(), 1)]);
    let all: Vec<String> = s.incidents(None, 10).await.unwrap().into_iter().map(|i| i.id).collect();
    assert_eq!(all, ["i3", "i1"], "open first");
}

/// The stores' set-based writes, handed whole batches (a batch the gathering makes only by
/// chance).
trait Batches: Store {
    fn submits(&self, jobs: Vec<NewJob>) -> BoxFut<'_, Result<Vec<Submitted>, StoreError>>;
    fn records(&self, results: Vec<Recorded>) -> BoxFut<'_, Result<Vec<Vec<Event>>, StoreError>>;
}

impl Batches for SqliteStore {
    fn submits(&self, jobs: Vec<NewJob>) -> BoxFut<'_, Result<Vec<Submitted>, StoreError>> {
        Box::pin(self.submit_batch(jobs))
    }
    fn records(&self, results: Vec<Recorded>) -> BoxFut<'_, Result<Vec<Vec<Event>>, StoreError>> {
        Box::pin(self.record_batch(results))
    }
}

impl Batches for PgStore {
    fn submits(&self, jobs: Vec<NewJob>) -> BoxFut<'_, Result<Vec<Submitted>, StoreError>> {
        Box::pin(self.submit_batch(jobs))
    }
    fn records(&self, results: Vec<Recorded>) -> BoxFut<'_, Result<Vec<Vec<Event>>, StoreError>> {
        Box::pin(self.record_batch(results))
    }
}

fn new_job(id: &str, key: &str, seed: u64) -> NewJob {
    let request =
        RenderRequest::resolve("cppn", "test", seed, Tier::Preview, Some(16), None, None, &TierLimits::default())
            .unwrap();
    NewJob {
        id: id.into(),
        request,
        cache_key: key.into(),
        client: "tester".into(),
        idempotency_key: None,
        now_ms: 1000,
    }
}

/// What of a job row its events make: state, attempt, asset, error, and the last change, start
/// and end times.
type Projected = (JobState, u32, Option<String>, Option<String>, i64, Option<i64>, Option<i64>);

/// The job row a fold of the events gives, one event at a time in order: what each store's
/// projection (a trigger per event, or per statement) must agree with.
fn fold(events: &[Event]) -> Projected {
    let mut out = (JobState::Queued, 0, None, None, 0, None, None);
    for e in events {
        out.0 = e.state;
        out.1 = e.attempt;
        if e.asset.is_some() {
            out.2 = e.asset.clone();
        }
        if e.error.is_some() {
            out.3 = e.error.clone();
        }
        out.4 = e.at_ms;
        if e.state == JobState::Running {
            out.5 = Some(e.at_ms);
        }
        if e.state.is_terminal() {
            out.6 = Some(e.at_ms);
        }
    }
    out
}

async fn check_projection(s: &dyn Store, id: &str) {
    let job = s.job(id).await.unwrap().unwrap();
    let events = s.events(id, 0).await.unwrap();
    let row =
        (job.state, job.attempt, job.asset.clone(), job.error.clone(), job.updated_ms, job.started_ms, job.finished_ms);
    assert_eq!(row, fold(&events), "{id}: {events:?}");
}

async fn the_job_row_is_the_projection_of_its_events_through_a_whole_life(s: &dyn Store) {
    let sub = s.submit(new_job("a", "k1", 1)).await.unwrap();
    assert_eq!(sub.admission, Admission::Queued);
    check_projection(s, "a").await;
    let due = s.take_due(2000, 10).await.unwrap();
    assert_eq!(due.jobs.len(), 1);
    let d = &due.jobs[0];
    assert_eq!((d.attempt, d.cache_key.as_str()), (1, "k1"));
    check_projection(s, "a").await;
    assert!(s.start(d, 2001).await.unwrap().is_some());
    check_projection(s, "a").await;
    let retry = Outcome::Retry { error: "disk hiccup".into(), retry_at_ms: 5000 };
    assert_eq!(s.finish(d, retry, 2002).await.unwrap().len(), 1);
    check_projection(s, "a").await;
    let early = s.take_due(4000, 10).await.unwrap();
    assert!(early.jobs.is_empty(), "a retry waits for its backoff");
    assert_eq!(early.next_due_ms, Some(5000));
    let d2 = s.take_due(5000, 10).await.unwrap().jobs.remove(0);
    assert_eq!(d2.attempt, 2);
    s.start(&d2, 5001).await.unwrap().unwrap();
    s.finish(&d2, Outcome::Succeeded { asset: "h1".into(), bytes: 10, provenance: None, png: None, cost: None }, 5002)
        .await
        .unwrap();
    check_projection(s, "a").await;
    let job = s.job("a").await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt, job.asset.as_deref()), (JobState::Succeeded, 2, Some("h1")));
    assert_eq!(job.error.as_deref(), Some("disk hiccup"), "a job keeps its last error");
    assert_eq!((job.started_ms, job.finished_ms), (Some(5001), Some(5002)));
}

async fn reports_are_idempotent_by_job_and_attempt(s: &dyn Store) {
    s.submit(new_job("a", "k1", 1)).await.unwrap();
    let d = s.take_due(2000, 10).await.unwrap().jobs.remove(0);
    assert!(s.start(&d, 2001).await.unwrap().is_some());
    assert!(s.start(&d, 2002).await.unwrap().is_none(), "a second start of the same attempt is refused");
    let ok = Outcome::Succeeded { asset: "h1".into(), bytes: 10, provenance: None, png: None, cost: None };
    assert_eq!(s.finish(&d, ok.clone(), 2003).await.unwrap().len(), 1);
    assert!(s.finish(&d, ok, 2004).await.unwrap().is_empty(), "a redelivered result changes nothing");
    let stale = Dispatch { attempt: 7, ..d.clone() };
    assert!(s.finish(&stale, Outcome::Failed { error: "late".into() }, 2005).await.unwrap().is_empty());
    let events = s.events("a", 0).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.state == JobState::Succeeded).count(), 1);
    check_projection(s, "a").await;
}

async fn many_jobs_are_read_at_once(s: &dyn Store) {
    // More than one statement's worth, so the chunks meet.
    let n = super::shared::JOBS_CHUNK + 44;
    let ids: Vec<String> = (0..n).map(|i| format!("m{i:04}")).collect();
    let submits = ids.iter().enumerate().map(|(i, id)| s.submit(new_job(id, &format!("key{i}"), i as u64)));
    futures_util::future::try_join_all(submits).await.unwrap();
    let mut asked = ids.clone();
    asked.push("absent".into());
    asked.push(ids[0].clone());
    let mut got = s.jobs(asked).await.unwrap();
    got.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(got.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ids, "each that exists, once");
    let one = s.job(&ids[7]).await.unwrap().unwrap();
    assert_eq!((got[7].request.seed, &got[7].cache_key, got[7].state), (one.request.seed, &one.cache_key, one.state));
    assert!(s.jobs(vec![]).await.unwrap().is_empty());
}

/// Long polls' reads, gathered ([`JobReads`]): callers that ask at once are answered by one read
/// of all their ids (more than one statement's worth here), each with its own jobs only.
async fn reads_gathered_from_many_callers_answer_each_its_own<S: Store + Clone + 'static>(s: &S) {
    let n = super::shared::JOBS_CHUNK + 44;
    let ids: Vec<String> = (0..n).map(|i| format!("g{i:04}")).collect();
    let submits = ids.iter().enumerate().map(|(i, id)| s.submit(new_job(id, &format!("key{i}"), i as u64)));
    futures_util::future::try_join_all(submits).await.unwrap();
    let reads = JobReads::spawn(std::sync::Arc::new(s.clone()));
    // Caller k asks for ten jobs from 5k on (overlapping its neighbours'), one twice, and one
    // that does not exist.
    let asked = |k: usize| {
        let mut a: Vec<String> = (5 * k..(5 * k + 10).min(n)).map(|i| ids[i].clone()).collect();
        a.push(ids[5 * k].clone());
        a.push(format!("absent{k}"));
        a
    };
    let callers = n / 5;
    let answers = futures_util::future::try_join_all((0..callers).map(|k| reads.jobs(asked(k)))).await.unwrap();
    for (k, got) in answers.into_iter().enumerate() {
        let mut got: Vec<String> = got.into_iter().map(|j| j.id).collect();
        got.sort();
        let want: Vec<String> = (5 * k..(5 * k + 10).min(n)).map(|i| ids[i].clone()).collect();
        assert_eq!(got, want, "caller {k}: its own jobs, each once");
    }
    let alone = reads.jobs(vec![ids[3].clone()]).await.unwrap();
    assert_eq!((alone.len(), alone[0].request.seed), (1, 3));
}

async fn an_asset_is_readable_by_the_clients_whose_jobs_have_it_and_the_devices_that_work_on_it(s: &dyn Store) {
    let readable = |client: Option<&str>, devices: &[&str]| {
        s.asset_readable("h", client.map(str::to_owned), devices.iter().map(|d| (*d).to_owned()).collect())
    };
    s.submit(new_job("lead", "k", 1)).await.unwrap();
    let due = s.take_due(2000, 10).await.unwrap();
    s.start(&due.jobs[0], 2001).await.unwrap();
    assert!(!readable(Some("tester"), &[]).await.unwrap(), "not before the job has it");
    let ok = Outcome::Succeeded { asset: "h".into(), bytes: 1, provenance: None, png: None, cost: None };
    s.finish(&due.jobs[0], ok, 2002).await.unwrap();
    assert!(readable(Some("tester"), &[]).await.unwrap());
    assert!(!readable(Some("someone else"), &[]).await.unwrap());
    // A cached answer makes it its client's too.
    let mut other = new_job("theirs", "k", 1);
    other.client = "someone else".into();
    assert_eq!(s.submit(other).await.unwrap().admission, Admission::Cached);
    assert!(readable(Some("someone else"), &[]).await.unwrap());
    assert!(!readable(None, &["p1"]).await.unwrap());
    let task = super::fleet::NewTask {
        id: "t1".into(),
        device_id: "p1".into(),
        kind: kiln_protocol::fleet::TaskKind::Print,
        asset: Some("h".into()),
        params: serde_json::Map::new(),
        deadline_ms: 1_000_000,
        created_by: "op".into(),
    };
    s.create_task(task, 3000).await.unwrap();
    assert!(readable(None, &["c1", "p1"]).await.unwrap());
    assert!(!readable(None, &["c1", "p2"]).await.unwrap());
    assert!(!readable(Some("nobody"), &["c1"]).await.unwrap());
}

async fn retention_deletes_what_ended_long_ago_and_the_assets_nothing_names(s: &dyn Store) {
    // Two jobs render (ending at 2002 and 2003); a third waits, live, behind nothing.
    for (id, key, seed) in [("old", "k1", 1), ("newer", "k2", 2), ("live", "k3", 3)] {
        s.submit(new_job(id, key, seed)).await.unwrap();
    }
    let due = s.take_due(2000, 10).await.unwrap();
    for (d, at) in due.jobs.iter().filter(|d| d.job_id != "live").zip([2002, 2003]) {
        s.start(d, 2001).await.unwrap();
        let ok =
            Outcome::Succeeded { asset: format!("h-{}", d.job_id), bytes: 1, provenance: None, png: None, cost: None };
        s.finish(d, ok, at).await.unwrap();
    }
    let task = |id: &str, asset: &str| super::fleet::NewTask {
        id: id.into(),
        device_id: "p1".into(),
        kind: kiln_protocol::fleet::TaskKind::Print,
        asset: Some(asset.into()),
        params: serde_json::Map::new(),
        deadline_ms: 1_000_000,
        created_by: "op".into(),
    };
    s.create_task(task("t-old", "h-old"), 2004).await.unwrap();
    // Nothing is old enough yet.
    assert_eq!(s.prune(1000, 1000).await.unwrap(), Pruned::default());
    // Jobs ended before 2003 go, with their events; the asset the queued task still names stays.
    let p = s.prune(2003, 10_000).await.unwrap();
    assert_eq!((p.jobs, p.tasks, p.assets.clone()), (1, 0, vec![]), "{p:?}");
    assert!(s.job("old").await.unwrap().is_none() && s.events("old", 0).await.unwrap().is_empty());
    assert!(s.job("newer").await.unwrap().is_some() && s.job("live").await.unwrap().is_some());
    assert_eq!(
        s.assets_named(vec!["h-old".into(), "h-newer".into(), "h-x".into()]).await.unwrap(),
        ["h-old", "h-newer"]
    );
    // The task ends; once it is old, it goes, and then nothing names h-old.
    s.move_task("t-old", super::fleet::TaskState::Expired, Default::default(), 2005).await.unwrap();
    let p = s.prune(3000, 10_000).await.unwrap();
    assert_eq!((p.jobs, p.tasks), (1, 1), "{p:?}");
    let mut gone = p.assets;
    gone.sort();
    assert_eq!(gone, ["h-newer", "h-old"]);
    // The live job is never pruned, however old.
    assert!(s.job("live").await.unwrap().is_some());
    assert_eq!(s.prune(i64::MAX, i64::MAX).await.unwrap().jobs, 0);
}

async fn the_cache_and_single_flight_are_decided_in_the_writer(s: &dyn Store) {
    s.submit(new_job("lead", "k", 1)).await.unwrap();
    let f = s.submit(new_job("follow", "k", 1)).await.unwrap();
    assert_eq!(f.admission, Admission::Attached);
    assert_eq!(f.job.follows.as_deref(), Some("lead"));
    let due = s.take_due(2000, 10).await.unwrap();
    assert_eq!(due.jobs.len(), 1, "only the leader goes to a worker");
    let d = &due.jobs[0];
    s.start(d, 2001).await.unwrap();
    let events = s
        .finish(d, Outcome::Succeeded { asset: "h".into(), bytes: 1, provenance: None, png: None, cost: None }, 2002)
        .await
        .unwrap();
    assert_eq!(events.len(), 2, "the leader and its follower succeed together");
    check_projection(s, "follow").await;
    let c = s.submit(new_job("later", "k", 1)).await.unwrap();
    assert_eq!((c.admission, c.job.state, c.job.asset.as_deref()), (Admission::Cached, JobState::Cached, Some("h")));
    let mut again = new_job("dup", "k2", 2);
    again.idempotency_key = Some("once".into());
    let first = s.submit(again.clone()).await.unwrap();
    again.id = "dup2".into();
    let second = s.submit(again).await.unwrap();
    assert_eq!((second.admission, second.job.id.as_str()), (Admission::Existing, first.job.id.as_str()));
}

async fn resume_requeues_jobs_in_hand_and_a_cancelled_job_is_never_handed_out(s: &dyn Store) {
    for (id, seed) in [("a", 1), ("b", 2), ("c", 3)] {
        s.submit(new_job(id, &format!("k{seed}"), seed)).await.unwrap();
    }
    let due = s.take_due(2000, 2).await.unwrap();
    assert_eq!(due.jobs.len(), 2);
    s.start(&due.jobs[0], 2001).await.unwrap().unwrap();
    // "a" running, "b" dispatched, "c" queued; "c" is cancelled; then the process dies.
    s.cancel("c", "tester", 2002).await.unwrap().unwrap();
    let resumed = s.resume(3000).await.unwrap();
    let mut ids: Vec<_> = resumed.iter().map(|e| e.job_id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["a", "b"]);
    let due = s.take_due(3001, 10).await.unwrap();
    let mut ids: Vec<_> = due.jobs.iter().map(|d| (d.job_id.as_str(), d.attempt)).collect();
    ids.sort();
    assert_eq!(ids, [("a", 2), ("b", 1)], "the running one takes a new attempt, the dispatched one its first");
    for id in ["a", "b", "c"] {
        check_projection(s, id).await;
    }
}

async fn the_relay_marks_rows_sent_only_when_told_and_a_result_may_overtake_it(s: &dyn Store) {
    for (id, seed) in [("a", 1), ("b", 2), ("c", 3)] {
        s.submit(new_job(id, &format!("k{seed}"), seed)).await.unwrap();
    }
    s.cancel("c", "tester", 1500).await.unwrap().unwrap();
    let p = s.pending(2000, 10).await.unwrap();
    assert_eq!(p.rows.len(), 3);
    let live: Vec<_> = p.rows.iter().map(|o| (o.dispatch.job_id.as_str(), o.live)).collect();
    assert_eq!(live, [("a", true), ("b", true), ("c", false)], "a cancelled job's row is only marked sent");
    assert_eq!(s.pending(2000, 10).await.unwrap().rows.len(), 3, "reading changes nothing");
    // "b" was published and its worker's result came back before the relay marked the row.
    let b = p.rows[1].dispatch.clone();
    let started = s.start(&b, 2001).await.unwrap().expect("a queued job whose row went out may start");
    assert_eq!(started.from, Some(JobState::Queued));
    s.finish(&b, Outcome::Succeeded { asset: "hb".into(), bytes: 3, provenance: None, png: None, cost: None }, 2002)
        .await
        .unwrap();
    let ids = p.rows.iter().map(|o| o.id).collect();
    let events = s.mark_sent(ids, 2003).await.unwrap();
    let moved: Vec<_> = events.iter().map(|e| (e.job_id.as_str(), e.state)).collect();
    assert_eq!(moved, [("a", JobState::Dispatched)], "only the job still waiting moves");
    assert!(s.pending(5000, 10).await.unwrap().rows.is_empty());
    assert_eq!(s.job("b").await.unwrap().unwrap().state, JobState::Succeeded);
    let a = p.rows[0].dispatch.clone();
    assert!(s.start(&a, 2004).await.unwrap().is_some());
    assert!(s.start(&a, 2005).await.unwrap().is_none(), "a duplicate delivery does not start twice");
    for id in ["a", "b", "c"] {
        check_projection(s, id).await;
    }
}

async fn tokens_are_unique_by_name(s: &dyn Store) {
    let row = |hash: &str| TokenRow {
        token_hash: hash.into(),
        name: "ops".into(),
        role: crate::auth::Role::Operator,
        devices: vec![],
        created_ms: 1,
        expires_ms: None,
        budget: None,
    };
    s.add_token(row("h1"), 1).await.unwrap();
    assert!(matches!(s.add_token(row("h2"), 2).await, Err(StoreError::Conflict(_))));
    let pi = TokenRow {
        token_hash: "h3".into(),
        name: "studio-pi".into(),
        role: crate::auth::Role::Device,
        devices: vec!["printer-1".into(), "camera-1".into()],
        created_ms: 3,
        expires_ms: Some(99),
        budget: Some(crate::costs::Budget { seconds: 3600, period: crate::costs::Period::Week }),
    };
    s.add_token(pi.clone(), 3).await.unwrap();
    let tokens = s.tokens().await.unwrap();
    assert_eq!((tokens.len(), tokens[0].token_hash.as_str()), (2, "h1"));
    assert_eq!(tokens[0].devices, Vec::<String>::new());
    assert_eq!(tokens.iter().find(|t| t.name == "studio-pi"), Some(&pi), "its devices are kept, in order");
    // Revoked, it is no longer read, and its name is free again.
    assert!(s.revoke_token("studio-pi".into(), 4).await.unwrap());
    assert!(!s.revoke_token("studio-pi".into(), 5).await.unwrap(), "revoked already");
    assert_eq!(s.tokens().await.unwrap().len(), 1);
    s.add_token(TokenRow { token_hash: "h4".into(), ..pi }, 6).await.unwrap();
    assert_eq!(s.tokens().await.unwrap().len(), 2);
    // The refusal did not roll back anything else.
    s.submit(new_job("x", "kx", 9)).await.unwrap();
}

async fn failures_are_tallied_per_job_and_per_worker_and_a_resume_starts_the_count_afresh(s: &dyn Store) {
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        s.submit(new_job(id, &format!("key-{id}"), i as u64)).await.unwrap();
    }
    let fail = |job: &str, attempt: u32, worker: &str, at_ms: i64| AttemptFailure {
        job_id: job.into(),
        attempt,
        worker: worker.into(),
        error: "boom".into(),
        at_ms,
    };
    let t = s.record_failure(fail("a", 1, "w2", 1000), 0).await.unwrap();
    assert_eq!((t.job_workers.clone(), t.worker_jobs), (vec!["w2".to_owned()], 1));
    // The same attempt reported again counts once.
    assert_eq!(s.record_failure(fail("a", 1, "w2", 1000), 0).await.unwrap(), t);
    // Another attempt on the same worker: still one distinct worker, one distinct job.
    let t = s.record_failure(fail("a", 2, "w2", 1100), 0).await.unwrap();
    assert_eq!((t.job_workers.len(), t.worker_jobs), (1, 1));
    let t = s.record_failure(fail("a", 3, "w1", 1200), 0).await.unwrap();
    assert_eq!(t.job_workers, vec!["w1".to_owned(), "w2".to_owned()], "distinct workers, by id");
    let t = s.record_failure(fail("b", 1, "w2", 1300), 0).await.unwrap();
    assert_eq!(t.worker_jobs, 2);
    // Only failures within the window count.
    assert_eq!(s.record_failure(fail("c", 1, "w2", 1400), 1250).await.unwrap().worker_jobs, 2);
    // Drained once; a second drain changes nothing; resumed, the count starts afresh.
    assert!(s.set_drained("w2", Some("failed 3 distinct jobs"), 1500).await.unwrap());
    assert!(!s.set_drained("w2", Some("again"), 1600).await.unwrap());
    let d = s.drained().await.unwrap();
    assert_eq!(d, vec![DrainedWorker { worker_id: "w2".into(), reason: "failed 3 distinct jobs".into(), at_ms: 1500 }]);
    assert!(s.set_drained("w2", None, 2000).await.unwrap());
    assert!(!s.set_drained("w2", None, 2100).await.unwrap(), "not drained any more");
    assert!(s.drained().await.unwrap().is_empty());
    assert_eq!(s.record_failure(fail("c", 2, "w2", 2500), 0).await.unwrap().worker_jobs, 1);
    assert!(s.set_drained("w2", Some("failed again"), 3000).await.unwrap(), "drained again");
}

async fn a_whole_attempt_recorded_at_once_is_start_then_finish(s: &dyn Store) {
    s.submit(new_job("lead", "k", 1)).await.unwrap();
    s.submit(new_job("follow", "k", 1)).await.unwrap();
    let d = s.take_due(2000, 10).await.unwrap().jobs.remove(0);
    // A failure first: started and queued again in one write, with a retry row.
    let retry = Outcome::Retry { error: "on worker w: boom".into(), retry_at_ms: 3000 };
    let events = s.record(&d, 2001, retry, 2002).await.unwrap();
    let states: Vec<(JobState, Option<JobState>, i64)> = events.iter().map(|e| (e.state, e.from, e.at_ms)).collect();
    assert_eq!(
        states,
        vec![(JobState::Running, Some(JobState::Dispatched), 2001), (JobState::Queued, Some(JobState::Running), 2002)]
    );
    assert!(events[0].seq < events[1].seq);
    check_projection(s, "lead").await;
    let d2 = s.take_due(3000, 10).await.unwrap().jobs.remove(0);
    assert_eq!(d2.attempt, 2);
    // The retry succeeds (its result overtaking the relay's mark would be the same: `queued`
    // at the attempt before also starts); the follower succeeds with it.
    let ok = Outcome::Succeeded { asset: "h".into(), bytes: 3, provenance: None, png: None, cost: None };
    let events = s.record(&d2, 3001, ok.clone(), 3002).await.unwrap();
    let ids: Vec<(&str, JobState)> = events.iter().map(|e| (e.job_id.as_str(), e.state)).collect();
    assert_eq!(ids, vec![("lead", JobState::Running), ("lead", JobState::Succeeded), ("follow", JobState::Succeeded)]);
    assert_eq!(s.job("lead").await.unwrap().unwrap().started_ms, Some(3001));
    check_projection(s, "lead").await;
    check_projection(s, "follow").await;
    // Repeats and stale attempts change nothing.
    assert!(s.record(&d2, 3001, ok, 3003).await.unwrap().is_empty());
    assert!(s.record(&d, 2001, Outcome::Failed { error: "late".into() }, 3004).await.unwrap().is_empty());
    let lead = s.events("lead", 0).await.unwrap();
    assert_eq!(lead.iter().filter(|e| e.state == JobState::Succeeded).count(), 1);
    // A start recorded on its own (an older scheduler, or the embedded path) is not repeated.
    s.submit(new_job("b", "k2", 2)).await.unwrap();
    let db = s.take_due(4000, 10).await.unwrap().jobs.remove(0);
    s.start(&db, 4001).await.unwrap().unwrap();
    let events = s.record(&db, 4001, Outcome::Failed { error: "bad".into() }, 4002).await.unwrap();
    assert_eq!(events.iter().map(|e| e.state).collect::<Vec<_>>(), vec![JobState::Failed]);
    check_projection(s, "b").await;
    assert_eq!(s.job("b").await.unwrap().unwrap().error.as_deref(), Some("bad"));
}

async fn devices_and_their_tasks_move_forward_only(s: &dyn Store) {
    use super::fleet::{NewTask, TaskChange, TaskState};
    use kiln_protocol::fleet::{DeviceKind, DeviceState, DeviceStatus, FLEET_VERSION, TaskKind, Telemetry};
    let status = |state, boot: &str| DeviceStatus {
        v: FLEET_VERSION,
        state,
        boot_id: boot.into(),
        kind: DeviceKind::Lights,
        capabilities: vec!["lights".into()],
        version: "1".into(),
        at_ms: 5,
        detail: None,
    };
    assert!(s.announce("l1", status(DeviceState::Online, "b1"), 10).await.unwrap().is_none(), "new");
    let telemetry = |seq| Telemetry {
        v: FLEET_VERSION,
        boot_id: "b1".into(),
        seq,
        at_ms: 11,
        readings: [("scene".to_owned(), serde_json::json!(seq))].into_iter().collect(),
        spool_dropped: 2,
    };
    assert!(s.telemetry("l1", telemetry(2), 11).await.unwrap());
    assert!(!s.telemetry("l1", telemetry(1), 12).await.unwrap(), "older telemetry is stale");
    assert!(!s.telemetry("nobody", telemetry(3), 12).await.unwrap(), "an unknown device");
    let d = s.device("l1").await.unwrap().unwrap();
    assert_eq!((d.state.as_str(), d.telemetry_seq, d.spool_dropped), ("online", 2, 2));
    assert_eq!(d.telemetry.unwrap()["scene"], 2);

    let new = NewTask {
        id: "t1".into(),
        device_id: "l1".into(),
        kind: TaskKind::Lights,
        asset: None,
        params: serde_json::Map::new(),
        deadline_ms: 1_000,
        created_by: "op".into(),
    };
    assert_eq!(s.create_task(new, 20).await.unwrap().state, TaskState::Queued);
    assert_eq!(s.due_tasks(30, 10).await.unwrap().len(), 1);
    let send = |n| TaskChange { next_send_ms: Some(n), ..TaskChange::default() };
    assert!(s.move_task("t1", TaskState::Sent, send(40), 30).await.unwrap().is_some());
    assert!(s.due_tasks(35, 10).await.unwrap().is_empty(), "not due before its resend time");
    assert_eq!(s.due_tasks(40, 10).await.unwrap().len(), 1);
    assert!(s.move_task("t1", TaskState::Sent, send(60), 40).await.unwrap().is_some(), "a resend");
    // The device goes offline and comes back: its unanswered task is due at once.
    s.announce("l1", status(DeviceState::Offline, "b1"), 41).await.unwrap();
    assert!(s.due_tasks(100, 10).await.unwrap().is_empty(), "nothing is sent to an offline device");
    let before = s.announce("l1", status(DeviceState::Online, "b2"), 42).await.unwrap().unwrap();
    assert_eq!((before.state.as_str(), before.boot_id.as_str()), ("offline", "b1"));
    assert_eq!(s.resend_now("l1").await.unwrap(), 1);
    assert_eq!(s.due_tasks(43, 10).await.unwrap().len(), 1);
    let step = |d: &str| TaskChange { detail: Some(d.into()), ..TaskChange::default() };
    let m = s.move_task("t1", TaskState::Running, step("go"), 50).await.unwrap().unwrap();
    assert_eq!((m.from, m.task.state, m.task.sends), (TaskState::Sent, TaskState::Running, 2));
    assert!(s.move_task("t1", TaskState::Accepted, step("late"), 51).await.unwrap().is_none(), "no going back");
    assert!(s.move_task("t1", TaskState::Succeeded, step("done"), 52).await.unwrap().is_some());
    assert!(s.move_task("t1", TaskState::Failed, step("dup"), 53).await.unwrap().is_none(), "ended is ended");
    let (t, events) = s.task("t1").await.unwrap().unwrap();
    assert_eq!(t.state, TaskState::Succeeded);
    let states: Vec<TaskState> = events.iter().map(|e| e.state).collect();
    assert_eq!(states, [TaskState::Queued, TaskState::Sent, TaskState::Sent, TaskState::Running, TaskState::Succeeded]);
    assert!(s.live_tasks().await.unwrap().is_empty());
    assert_eq!(s.tasks(Some("l1".into()), Some(TaskState::Succeeded), 10).await.unwrap().len(), 1);
}

/// Many callers at once (gathered into batches by the PostgreSQL store): one render per key,
/// one job per idempotency key, one recorded result per attempt.
async fn concurrent_submits_and_results_keep_the_rules_of_one_at_a_time(s: &dyn Store) {
    use futures_util::future::join_all;
    let subs = join_all((0..40).map(|i| {
        let mut j = new_job(&format!("j{i}"), if i % 2 == 0 { "even" } else { "odd" }, 1);
        if i % 10 == 0 {
            j.idempotency_key = Some("once".into());
        }
        s.submit(j)
    }))
    .await;
    let subs: Vec<Submitted> = subs.into_iter().map(Result::unwrap).collect();
    let count = |a: Admission| subs.iter().filter(|x| x.admission == a).count();
    assert_eq!(count(Admission::Queued), 2, "one leader per key");
    assert_eq!(count(Admission::Existing), 3, "the idempotency key took one job; the others get it");
    assert_eq!(count(Admission::Attached), 35);
    let once: Vec<&str> = subs.iter().filter(|x| x.job.idempotency_key.is_some()).map(|x| x.job.id.as_str()).collect();
    assert!(once.iter().all(|id| *id == once[0]), "{once:?}");
    let due = s.take_due(2000, 100).await.unwrap().jobs;
    assert_eq!(due.len(), 2);
    let ok = |h: &str| Outcome::Succeeded { asset: h.into(), bytes: 1, provenance: None, png: None, cost: None };
    // Each result delivered three times at once.
    let recs = join_all(
        due.iter().flat_map(|d| (0..3).map(move |_| (d, ok(&d.cache_key)))).map(|(d, o)| s.record(d, 2001, o, 2002)),
    )
    .await;
    let recorded: Vec<Vec<Event>> = recs.into_iter().map(Result::unwrap).collect();
    assert_eq!(recorded.iter().filter(|e| !e.is_empty()).count(), 2, "once per attempt");
    let succeeded = recorded.iter().flatten().filter(|e| e.state == JobState::Succeeded).count();
    assert_eq!(succeeded, 37, "2 leaders and the 35 attached to them");
    for x in &subs {
        check_projection(s, &x.job.id).await;
        assert_eq!(s.job(&x.job.id).await.unwrap().unwrap().state, JobState::Succeeded, "{}", x.job.id);
    }
    let again = join_all((0..4).map(|i| s.submit(new_job(&format!("c{i}"), "even", 1)))).await;
    assert!(again.into_iter().all(|x| x.unwrap().admission == Admission::Cached));
}

/// Starts and results that arrive together (gathered into one batch, or not): one start per
/// attempt, one recorded outcome, and the attached job moves with it once.
async fn a_job_starts_and_finishes_once_however_many_reports_come_together(s: &dyn Store) {
    use futures_util::future::join_all;
    s.submit(new_job("a", "k", 1)).await.unwrap();
    assert_eq!(s.submit(new_job("b", "k", 1)).await.unwrap().admission, Admission::Attached);
    let d = s.take_due(2000, 10).await.unwrap().jobs.remove(0);
    let starts = join_all((0..5).map(|_| s.start(&d, 2001))).await;
    let started: Vec<Event> = starts.into_iter().filter_map(Result::unwrap).collect();
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(
        (started[0].state, started[0].from, started[0].attempt),
        (JobState::Running, Some(JobState::Dispatched), 1)
    );
    let ok = Outcome::Succeeded { asset: "h".into(), bytes: 1, provenance: None, png: None, cost: None };
    let ends = join_all((0..3).map(|_| s.finish(&d, ok.clone(), 2002))).await;
    let ends: Vec<Vec<Event>> = ends.into_iter().map(Result::unwrap).filter(|e| !e.is_empty()).collect();
    assert_eq!(ends.len(), 1, "{ends:?}");
    let moved: Vec<(&str, JobState, Option<JobState>)> =
        ends[0].iter().map(|e| (e.job_id.as_str(), e.state, e.from)).collect();
    assert_eq!(
        moved,
        [("a", JobState::Succeeded, Some(JobState::Running)), ("b", JobState::Succeeded, Some(JobState::Queued))]
    );
    assert!(ends[0][0].seq < ends[0][1].seq);
    assert!(s.start(&d, 2003).await.unwrap().is_none(), "a finished job does not start again");
    for id in ["a", "b"] {
        check_projection(s, id).await;
    }
}

/// The set-based writes, given whole batches: the rules run in the batch's order.
async fn batches_see_their_own_earlier_members<S: Batches>(s: &S) {
    let idem = |mut j: NewJob, k: &str| {
        j.idempotency_key = Some(k.into());
        j
    };
    let batch = vec![
        new_job("a", "k", 1),
        new_job("b", "k", 1),
        idem(new_job("c", "k2", 2), "x"),
        idem(new_job("d", "k2", 2), "x"),
        idem(new_job("e", "k3", 3), "x"),
    ];
    let subs = s.submits(batch).await.unwrap();
    let got: Vec<(&str, Admission, Option<&str>)> =
        subs.iter().map(|x| (x.job.id.as_str(), x.admission, x.job.follows.as_deref())).collect();
    assert_eq!(
        got,
        [
            ("a", Admission::Queued, None),
            ("b", Admission::Attached, Some("a")),
            ("c", Admission::Queued, None),
            ("c", Admission::Existing, None),
            ("c", Admission::Existing, None)
        ]
    );
    let due = s.take_due(2000, 10).await.unwrap().jobs;
    let ids: Vec<&str> = due.iter().map(|d| d.job_id.as_str()).collect();
    assert_eq!(ids, ["a", "c"]);
    let (a, c) = (&due[0], &due[1]);
    let ok = |p: &str| Outcome::Succeeded {
        asset: "ha".into(),
        bytes: 1,
        provenance: Some(p.into()),
        png: None,
        cost: None,
    };
    let retry = Outcome::Retry { error: "boom".into(), retry_at_ms: 9000 };
    let rec = |d: &Dispatch, outcome: Outcome| Recorded { d: d.clone(), started_ms: 2001, outcome, now_ms: 2002 };
    let out = s.records(vec![rec(a, ok("{\"n\":1}")), rec(a, ok("{\"n\":2}")), rec(c, retry)]).await.unwrap();
    assert_eq!(s.provenance("ha").await.unwrap().as_deref(), Some("{\"n\":1}"), "the first in the batch");
    let states = |events: &[Event]| events.iter().map(|e| (e.job_id.clone(), e.state)).collect::<Vec<_>>();
    let (run, done) = (JobState::Running, JobState::Succeeded);
    assert_eq!(states(&out[0]), [("a".into(), run), ("a".into(), done), ("b".into(), done)]);
    assert!(out[1].is_empty(), "the repeat in the same batch sees the first");
    assert_eq!(states(&out[2]), [("c".into(), run), ("c".into(), JobState::Queued)]);
    assert_eq!(out[0][0].from, Some(JobState::Dispatched));
    let later = s.submits(vec![new_job("f", "k", 1), idem(new_job("g", "k9", 9), "x")]).await.unwrap();
    assert_eq!((later[0].admission, later[0].job.asset.as_deref()), (Admission::Cached, Some("ha")));
    assert_eq!((later[1].admission, later[1].job.id.as_str()), (Admission::Existing, "c"));
    for id in ["a", "b", "c", "f"] {
        check_projection(s, id).await;
    }
    assert_eq!(s.take_due(9000, 10).await.unwrap().jobs[0].attempt, 2, "the retry's row");
}

/// Under steady writes and reads the SQLite WAL starts over instead of growing: the writer
/// checkpoints between batches every `UPKEEP_EVERY`, so the WAL holds that long of writes, not
/// the run. Each start over bumps the checkpoint sequence number in the WAL's header (bytes
/// 12..16). The run lasts six checkpoints, so four starts over are seen with room to spare.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sqlite_wal_starts_over_under_steady_load() {
    let (dir, s) = sqlite_store().await;
    let s = std::sync::Arc::new(s);
    let wal = dir.path().join("kiln.db-wal");
    let run = super::writer::UPKEEP_EVERY * 6;
    let until = std::time::Instant::now() + run;
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while std::time::Instant::now() < until {
                let id = format!("w{t}-{i}");
                s.submit(new_job(&id, &format!("k{t}-{i}"), i)).await.unwrap();
                s.job(&id).await.unwrap().unwrap();
                i += 1;
            }
            i
        }));
    }
    let (mut largest, mut sequences) = (0, std::collections::BTreeSet::new());
    while std::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut head = [0u8; 16];
        if let Ok(mut f) = std::fs::File::open(&wal)
            && std::io::Read::read_exact(&mut f, &mut head).is_ok()
        {
            largest = largest.max(f.metadata().map(|m| m.len()).unwrap_or(0));
            sequences.insert(u32::from_be_bytes([head[12], head[13], head[14], head[15]]));
        }
    }
    let jobs: u64 = futures_util::future::join_all(tasks).await.into_iter().map(Result::unwrap).sum();
    println!("{jobs} jobs; the WAL started over {} times seen, held at most {} KiB", sequences.len(), largest / 1024);
    assert!(jobs > 1000, "the load ran ({jobs} jobs)");
    // Kept whole (before the writer checkpointed), it held every frame of the run: 730 MB for
    // 43,000 jobs here, and its sequence number never moved.
    assert!(sequences.len() >= 4, "the WAL started over only {} times in {run:?} ({largest} bytes)", sequences.len());
}

/// A burst's last writes are copied back into the database once the writer falls idle: the
/// WAL index in `kiln.db-shm` then says every frame was backfilled (`nBackfill`, at byte 96,
/// equals `mxFrame`, at byte 16; both in the machine's byte order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_writer_checkpoints_once_it_falls_idle() {
    let (dir, s) = sqlite_store().await;
    let shm = dir.path().join("kiln.db-shm");
    let frames = || {
        let b = std::fs::read(&shm).unwrap();
        let at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        (at(16), at(96))
    };
    // Long enough that a checkpoint between batches has run, then one write after it.
    let every = super::writer::UPKEEP_EVERY;
    let until = std::time::Instant::now() + every * 8 / 5;
    let mut i = 0;
    while std::time::Instant::now() < until {
        s.submit(new_job(&format!("b{i}"), &format!("kb{i}"), i)).await.unwrap();
        i += 1;
    }
    s.submit(new_job("last", "klast", 0)).await.unwrap();
    let (written, _) = frames();
    assert!(written > 0, "the burst is in the WAL");
    tokio::time::sleep(every * 16 / 5).await;
    let (mx, backfilled) = frames();
    assert_eq!((mx, backfilled), (written, written), "every frame copied back after the burst");
}

/// An asset's provenance and (a small one) its PNG are written with the result that made it,
/// the first of each that came stays, and an asset recorded without one takes the next that
/// comes.
async fn an_asset_keeps_the_first_provenance_and_png_recorded_for_it<S: Batches>(s: &S) {
    for (id, key) in [("a", "k1"), ("b", "k2"), ("c", "k3"), ("d", "k4"), ("e", "k5"), ("f", "k6"), ("g", "k7")] {
        s.submit(new_job(id, key, 1)).await.unwrap();
    }
    let due = s.take_due(2000, 10).await.unwrap().jobs;
    let ok = |asset: &str, p: Option<&str>, png: Option<&[u8]>| Outcome::Succeeded {
        asset: asset.into(),
        bytes: 1,
        provenance: p.map(str::to_owned),
        png: png.map(<[u8]>::to_vec),
        cost: None,
    };
    s.record(&due[0], 2001, ok("h1", None, None), 2002).await.unwrap();
    assert_eq!(s.provenance("h1").await.unwrap(), None, "recorded without one");
    assert_eq!(s.asset_png("h1").await.unwrap(), None, "a file in the asset store");
    s.record(&due[1], 2001, ok("h1", Some("{\"by\":\"b\"}"), Some(b"\x89PNG b\0\xff")), 2002).await.unwrap();
    assert_eq!(s.provenance("h1").await.unwrap().as_deref(), Some("{\"by\":\"b\"}"));
    assert_eq!(s.asset_png("h1").await.unwrap().as_deref(), Some(&b"\x89PNG b\0\xff"[..]), "every byte");
    s.start(&due[2], 2001).await.unwrap().unwrap();
    s.finish(&due[2], ok("h1", Some("{\"by\":\"c\"}"), Some(b"c")), 2002).await.unwrap();
    assert_eq!(s.provenance("h1").await.unwrap().as_deref(), Some("{\"by\":\"b\"}"), "the first stays");
    assert_eq!(s.asset_png("h1").await.unwrap().as_deref(), Some(&b"\x89PNG b\0\xff"[..]), "the first stays");
    // A job cancelled while it rendered still records its asset, with its provenance and PNG.
    s.cancel("d", "test", 2001).await.unwrap();
    assert!(s.record(&due[3], 2001, ok("h2", Some("{\"by\":\"d\"}"), Some(b"d")), 2002).await.unwrap().is_empty());
    assert_eq!(s.provenance("h2").await.unwrap().as_deref(), Some("{\"by\":\"d\"}"));
    assert_eq!(s.asset_png("h2").await.unwrap().as_deref(), Some(&b"d"[..]));
    assert_eq!(s.provenance("h3").await.unwrap(), None, "no such asset");
    assert_eq!(s.asset_png("h3").await.unwrap(), None, "no such asset");
    // In one batch, each asset gets its own PNG (SQLite's batch carries them as one blob).
    let batch = [("h4", Some(&b"four"[..])), ("h5", None), ("h6", Some(&b"six \0 six"[..]))];
    let recs = due[4..].iter().zip(batch).map(|(d, (h, png))| Recorded {
        d: d.clone(),
        started_ms: 2001,
        outcome: ok(h, None, png),
        now_ms: 2002,
    });
    let out = s.records(recs.collect()).await.unwrap();
    assert!(out.iter().all(|events| events.len() == 2), "each started and succeeded: {out:?}");
    for (h, png) in batch {
        assert_eq!(s.asset_png(h).await.unwrap().as_deref(), png, "{h}");
    }
}

/// One submit PostgreSQL refuses (a NUL in its idempotency key) among many gathered together: it fails
/// alone, naming the database's reason, and every other submit of its batch is admitted.
#[tokio::test]
async fn on_postgres_a_refused_submit_fails_alone_and_its_batch_commits() {
    use futures_util::future::join_all;
    let Some(s) = pg_store().await else { return };
    let subs = join_all((0..30).map(|i| {
        let mut j = new_job(&format!("n{i}"), &format!("key{i}"), i);
        if i == 7 {
            j.idempotency_key = Some("bad\0key".into());
        }
        s.submit(j)
    }))
    .await;
    for (i, sub) in subs.iter().enumerate() {
        match (i, sub) {
            (7, Err(e)) => assert!(super::writer::refused_by_database(e), "{e}"),
            (7, Ok(_)) => panic!("PostgreSQL took a NUL in a text column"),
            (_, Ok(x)) => assert_eq!(x.admission, Admission::Queued, "n{i}"),
            (_, Err(e)) => panic!("n{i} failed with the bad one: {e}"),
        }
    }
    assert!(s.job("n7").await.unwrap().is_none());
    assert_eq!(s.take_due(2000, 100).await.unwrap().jobs.len(), 29);
}
