//! The distributed farm against the real PostgreSQL and RabbitMQ: the scheduler in this process
//! (PostgreSQL store, RabbitMQ dispatch), `kiln-worker run` as separate processes. Each test uses
//! its own database schema and its own exchange and queue prefix, and deletes its queues at the end.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{TestFarm, WorkerEnv, job, test_config};
use hyper::Method;
use kiln_common::amqp::lapin;
use kiln_protocol::wire::{
    AttemptOutcome, HEARTBEAT_TYPE, Heartbeat, JOB_TYPE, JobMessage, MessageKey, Names, REASON_HEADER, RESULTS_TYPE,
    ResultBatch, ResultMessage,
};
use kiln_scheduler::auth::Role;
use kiln_testenv as testenv;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use serde_json::Value;

/// A distributed farm for one test, and what it needs to clean up.
struct Distributed {
    farm: TestFarm,
    amqp_url: String,
    names: Names,
    worker_token: String,
    workers: Workers,
}

impl Distributed {
    /// `None` (the test skips) when a service is missing and not required.
    async fn start() -> Option<Distributed> {
        Self::start_with(|_| {}).await
    }

    /// [`Distributed::start`] with changes to the scheduler's config.
    async fn start_with(change: impl FnOnce(&mut kiln_scheduler::config::FarmConfig)) -> Option<Distributed> {
        let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        let db = testenv::fresh_database().await?;
        let (amqp_url, prefix) = testenv::amqp().await?;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(dir.path());
        cfg.scheduler.database_url = Some(db.into());
        cfg.scheduler.broker.amqp_url = Some(amqp_url.clone().into());
        cfg.scheduler.broker.prefix = prefix.clone();
        cfg.scheduler.broker.lost_after_seconds = 5;
        change(&mut cfg);
        let farm = TestFarm::start_with(dir, cfg).await;
        let worker_token =
            farm.sched.create_token("workers", Role::Worker, &[], None, None).await.unwrap().expose().to_owned();
        Some(Distributed { farm, amqp_url, names: Names::new(&prefix), worker_token, workers: Workers::default() })
    }

    /// Starts a `kiln-worker run` process.
    fn spawn_worker(&mut self, id: &str) {
        self.spawn_worker_with(id, &[]);
    }

    /// Starts a `kiln-worker run` process with more environment variables.
    fn spawn_worker_with(&mut self, id: &str, extra: &[(&str, &str)]) {
        self.spawn_worker_to(id, extra, std::process::Stdio::inherit());
    }

    fn spawn_worker_to(&mut self, id: &str, extra: &[(&str, &str)], stderr: std::process::Stdio) {
        let env = WorkerEnv {
            amqp_url: &self.amqp_url,
            prefix: self.names.prefix(),
            scheduler_url: &self.farm.url,
            token: &self.worker_token,
        };
        self.workers.push(common::spawn_worker_to(&env, id, extra, stderr));
    }

    /// Starts a misconfigured worker: it believes its asset folder is the scheduler's
    /// (`shared_assets`) but it is its own, so every asset it reports never arrives and each of
    /// its attempts fails on the scheduler's side, the way a badly set-up GPU box fails.
    fn spawn_bad_worker(&mut self, id: &str) {
        self.spawn_worker_with(id, &[("KILN_SHARED_ASSETS", "true")]);
    }

    /// The registry's entry for a worker, once `pred` holds for it.
    async fn worker_where(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let all = self.farm.client.call(Method::GET, "/v1/workers", None).await.unwrap();
            let entry = all["workers"].as_array().unwrap().iter().find(|w| w["worker_id"] == id).cloned();
            if let Some(w) = entry.filter(|w| pred(w)) {
                return w;
            }
            assert!(Instant::now() < deadline, "worker {id}: {what}; the registry says {all}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A connection (kept open while the channel is used) and a confirming channel on it.
    async fn channel(&self) -> (lapin::Connection, lapin::Channel) {
        let conn = kiln_common::amqp::connect(&self.amqp_url, "kiln-test").await.unwrap();
        let ch = kiln_common::amqp::confirm_channel(&conn).await.unwrap();
        (conn, ch)
    }

    /// Submits `n` tiny distinct jobs; returns their ids.
    async fn submit(&self, n: u64, seed0: u64) -> Vec<String> {
        let mut ids = Vec::new();
        for seed in seed0..seed0 + n {
            let mut body = job("a distributed test", seed, "preview");
            body["width"] = 24.into();
            let j = self.farm.submit(body).await;
            ids.push(j["id"].as_str().unwrap().to_owned());
        }
        ids
    }

    /// Waits for every job to end; returns them.
    async fn wait_all(&self, ids: &[String], within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        for id in ids {
            loop {
                let j = self.farm.wait(id).await;
                let state = j["state"].as_str().unwrap().to_owned();
                if ["succeeded", "failed", "cancelled", "cached"].contains(&state.as_str()) {
                    out.push(j);
                    break;
                }
                assert!(Instant::now() < deadline, "job {id} still {state}");
            }
        }
        out
    }

    /// How many `succeeded` events each job has.
    async fn succeeded_events(&self, ids: &[String]) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for id in ids {
            let events = self.farm.sched.store.events(id, 0).await.unwrap();
            out.insert(id.clone(), events.iter().filter(|e| e.state.as_str() == "succeeded").count());
        }
        out
    }

    async fn stop(mut self) {
        drop(std::mem::take(&mut self.workers));
        let (_conn, ch) = self.channel().await;
        let _ = kiln_common::amqp::delete_queues(&ch, &self.names).await;
        self.farm.stop().await;
    }
}

/// The worker processes a test started, killed when dropped: a test that fails before
/// [`Distributed::stop`] leaves none behind (one would hold the test run's output open).
#[derive(Default)]
struct Workers(Vec<(Child, tempfile::TempDir)>);

impl std::ops::Deref for Workers {
    type Target = Vec<(Child, tempfile::TempDir)>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Workers {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for (child, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "the worker did not drain within 30 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_separate_worker_renders_and_the_asset_downloads_intact() {
    let Some(mut d) = Distributed::start().await else { return };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("worker.log");
    let extra = [("KILN_METRICS_LISTEN", listen.as_str()), ("KILN_LOG", "info")];
    d.spawn_worker_to("w-e2e", &extra, std::fs::File::create(&log).unwrap().into());
    let ids = d.submit(3, 1).await;
    for j in d.wait_all(&ids, Duration::from_secs(120)).await {
        assert_eq!(j["state"], "succeeded", "{j}");
        let hash = j["asset"].as_str().unwrap();
        let png = d.farm.client.bytes(&format!("/v1/assets/{hash}")).await.unwrap();
        assert_eq!(blake3::hash(&png).to_hex().as_str(), hash, "the asset arrived intact");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let prov = d.farm.client.call(Method::GET, &format!("/v1/assets/{hash}/provenance"), None).await.unwrap();
        assert_eq!((&prov["asset"], &prov["backend"]), (&Value::from(hash), &Value::from("cpu")), "{prov}");
        // A 24×24 PNG travelled inside its result: the worker did not store it. It and its
        // provenance are kept in the scheduler's database, not in files.
        let own = kiln_worker::assets::AssetStore::open(d.workers[0].1.path()).unwrap();
        assert!(!own.contains(hash), "a small asset is sent with its result, not kept and uploaded");
        let scheduler_files = kiln_worker::assets::AssetStore::open(d.farm.dir.path()).unwrap();
        assert!(!scheduler_files.contains(hash) && !scheduler_files.provenance_path(hash).exists());
        assert_eq!(d.farm.sched.store.asset_png(hash).await.unwrap().as_deref(), Some(&png[..]));
    }
    // A batch submitted and awaited in one request: its results come back over the broker.
    let batch: Vec<Value> = (0..4).map(|i| job("a distributed batch", 40 + i, "preview")).collect();
    let r = d.farm.client.send(Method::POST, "/v1/jobs?wait=60", Some(Value::Array(batch).to_string().into()));
    let done: Value = r.await.unwrap().json().unwrap();
    let states: Vec<&str> = done["jobs"].as_array().unwrap().iter().map(|j| j["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["succeeded"; 4], "{done}");
    // Previews of 512 px are uploaded, with their thumbnails; their provenance came with the result.
    for j in done["jobs"].as_array().unwrap() {
        let hash = j["asset"].as_str().unwrap();
        let png = d.farm.client.bytes(&format!("/v1/assets/{hash}")).await.unwrap();
        assert_eq!(blake3::hash(&png).to_hex().as_str(), hash, "the upload arrived intact");
        let thumb = d.farm.client.bytes(&format!("/v1/assets/{hash}?variant=thumb")).await.unwrap();
        assert!(thumb.len() < png.len(), "a thumbnail of its own");
        let prov = d.farm.client.call(Method::GET, &format!("/v1/assets/{hash}/provenance"), None).await.unwrap();
        assert_eq!(prov["asset"], hash, "{prov}");
    }
    // The same request again is a cache hit; no worker involved.
    let mut again = job("a distributed test", 1, "preview");
    again["width"] = 24.into();
    assert_eq!(d.farm.submit(again).await["state"], "cached");
    let workers = d.farm.client.call(Method::GET, "/v1/workers", None).await.unwrap();
    let w = &workers["workers"][0];
    assert_eq!((w["worker_id"].as_str(), w["state"].as_str()), (Some("w-e2e"), Some("active")), "{workers}");
    assert_eq!(w["tiers"].as_array().unwrap().len(), 3);
    // The worker's own endpoint: healthy while connected, and its render metrics.
    let own = kiln_common::client::Client::new(&format!("http://{listen}"), None);
    let health = own.send(Method::GET, "/healthz", None).await.unwrap();
    assert_eq!(health.status, 200, "{:?}", String::from_utf8_lossy(&health.body));
    assert_eq!(health.json().unwrap()["worker_id"], "w-e2e");
    let metrics = String::from_utf8_lossy(&own.send(Method::GET, "/metrics", None).await.unwrap().body).into_owned();
    assert!(common::metric_in(&metrics, "kiln_render_seconds_count", "") >= 3.0, "{metrics}");
    let handed = |how: &str| common::metric_in(&metrics, "kiln_worker_assets_handed_total", &format!("how=\"{how}\""));
    assert_eq!((handed("inline"), handed("upload")), (3.0, 4.0), "{metrics}");
    common::promtool_check_metrics(metrics.as_bytes());
    // `kiln-worker doctor` with the worker's settings: every check passes.
    let scratch = tempfile::tempdir().unwrap();
    let out = common::sibling("kiln-worker")
        .arg("doctor")
        .env("KILN_DATA_DIR", scratch.path())
        .env("KILN_BACKEND", "cpu")
        .env("KILN_THREADS", "1")
        .env("KILN_AMQP_URL", &d.amqp_url)
        .env("KILN_AMQP_PREFIX", d.names.prefix())
        .env("KILN_SCHEDULER_URL", &d.farm.url)
        .env("KILN_WORKER_TOKEN", &d.worker_token)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    for check in ["config", "backend", "render", "scheduler", "broker", "token"] {
        assert!(said.lines().any(|l| l.split_whitespace().nth(1) == Some(check)), "{check}: {said}");
    }
    for check in ["render", "scheduler", "broker", "token"] {
        assert!(said.lines().any(|l| l.starts_with("ok") && l.contains(check)), "{check} passes: {said}");
    }
    if d.amqp_url.contains('@') {
        assert!(!said.contains(&d.amqp_url), "the broker's password is not shown: {said}");
    }
    // SIGTERM drains and exits cleanly, closing its connection without an error.
    let status = terminate(&mut d.workers[0].0);
    assert!(status.success(), "{status}");
    let logged = std::fs::read_to_string(&log).unwrap();
    let errors: Vec<&str> = logged.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "the worker's clean stop logged errors:\n{}", errors.join("\n"));
    assert!(logged.contains("worker daemon stopped"), "{logged}");
    // A worker token cannot use the job API.
    let as_worker = d.farm.client_with(Some(&d.worker_token));
    let e = as_worker.call(Method::GET, "/v1/jobs", None).await.unwrap_err();
    assert!(e.to_string().contains("403"), "{e}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_sharing_the_schedulers_store_keeps_each_provenance_there_and_it_is_served() {
    let Some(mut d) = Distributed::start().await else { return };
    let shared = d.farm.dir.path().to_str().unwrap().to_owned();
    d.spawn_worker_with("w-shared", &[("KILN_SHARED_ASSETS", "true"), ("KILN_DATA_DIR", &shared)]);
    let ids = d.submit(2, 70).await;
    let store = kiln_worker::assets::AssetStore::open(d.farm.dir.path()).unwrap();
    for j in d.wait_all(&ids, Duration::from_secs(120)).await {
        assert_eq!(j["state"], "succeeded", "{j}");
        let hash = j["asset"].as_str().unwrap();
        // The worker stored the PNG and its provenance file itself; its result carried neither.
        assert!(store.contains(hash) && store.provenance_path(hash).is_file());
        assert_eq!(d.farm.sched.store.provenance(hash).await.unwrap(), None, "no provenance in the database");
        let prov = d.farm.client.call(Method::GET, &format!("/v1/assets/{hash}/provenance"), None).await.unwrap();
        assert_eq!((&prov["asset"], &prov["backend"]), (&Value::from(hash), &Value::from("cpu")), "{prov}");
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_message_is_dead_lettered_with_its_reason_and_the_worker_carries_on() {
    let Some(mut d) = Distributed::start().await else { return };
    d.spawn_worker("w-dlq");
    let (_conn, ch) = d.channel().await;
    // The queues may not exist yet (the worker and the scheduler declare them as they connect).
    kiln_common::amqp::declare_topology(&ch, &d.names).await.unwrap();
    // Straight onto the preview queue, the way a broken tool would.
    for body in [&b"{not json"[..], br#"{"v": 99, "job_id": "x"}"#] {
        let confirm = ch
            .basic_publish(
                "".into(),
                d.names.tier_queue(kiln_protocol::Tier::Preview).into(),
                BasicPublishOptions::default(),
                body,
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
    let ids = d.submit(2, 100).await;
    for j in d.wait_all(&ids, Duration::from_secs(120)).await {
        assert_eq!(j["state"], "succeeded", "the worker carried on: {j}");
    }
    let reasons = dead_reasons(&d, &ch, 2).await;
    // Each reason names its field: the text that is not JSON as the body, the message that
    // lacks one by that field.
    assert!(reasons.iter().any(|r| r.starts_with("body: key must be a string")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.starts_with("attempt: missing field `attempt`")), "{reasons:?}");
    d.stop().await;
}

/// The dead-lettered messages' reasons, once `n` have arrived.
async fn dead_reasons(d: &Distributed, ch: &lapin::Channel, n: usize) -> Vec<String> {
    let mut reasons = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while reasons.len() < n {
        let got = ch.basic_get(d.names.dead_queue().into(), BasicGetOptions { no_ack: true }).await.unwrap();
        let Some(msg) = got else {
            assert!(Instant::now() < deadline, "{n} dead letters, got {reasons:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let headers = msg.delivery.properties.headers().clone().unwrap_or_default();
        let reason = match headers.inner().get(REASON_HEADER) {
            Some(lapin::types::AMQPValue::LongString(r)) => String::from_utf8_lossy(r.as_bytes()).into_owned(),
            other => panic!("no reason header: {other:?}"),
        };
        reasons.push(reason);
    }
    reasons
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_of_results_in_one_message_is_recorded_and_a_bad_batch_is_dead_lettered() {
    let Some(d) = Distributed::start().await else { return };
    let (_conn, ch) = d.channel().await;
    kiln_common::amqp::declare_topology(&ch, &d.names).await.unwrap();
    // No worker: this test takes the job messages off the queue itself and answers them all in
    // one batch, the way a busy worker does.
    let ids = d.submit(3, 300).await;
    let results: Vec<ResultMessage> = take_jobs(&d, &ch, ids.len())
        .await
        .into_iter()
        .map(|job| {
            let error = format!("answered by hand: {}", job.job_id);
            answer(job, AttemptOutcome::Failed { error, transient: false })
        })
        .collect();
    // A batch with one result of an unknown schema is refused whole, with the reason.
    let mut bad = ResultBatch { v: 1, results: results.clone() };
    bad.results[1].v = 2;
    publish_results(&d, &ch, &bad).await;
    let reasons = dead_reasons(&d, &ch, 1).await;
    assert!(reasons[0].contains("schema version 2"), "{reasons:?}");
    // The good batch: every result in it is recorded, each job with its own.
    publish_results(&d, &ch, &ResultBatch { v: 1, results }).await;
    for (id, j) in ids.iter().zip(d.wait_all(&ids, Duration::from_secs(60)).await) {
        assert_eq!(j["state"], "failed", "{j}");
        let error = j["error"].as_str().unwrap();
        assert!(error.contains(&format!("answered by hand: {id}")) && error.contains("w-by-hand"), "{j}");
    }
    let metrics = d.farm.client.send(Method::GET, "/metrics", None).await.unwrap().body;
    let metrics = String::from_utf8_lossy(&metrics);
    assert_eq!(common::metric_in(&metrics, "kiln_scheduler_bad_messages_total", "kind=\"result\""), 1.0, "{metrics}");
    d.stop().await;
}

/// Takes `n` job messages off the preview queue, as a worker would (no worker runs).
async fn take_jobs(d: &Distributed, ch: &lapin::Channel, n: usize) -> Vec<JobMessage> {
    let mut jobs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while jobs.len() < n {
        let queue = d.names.tier_queue(kiln_protocol::Tier::Preview);
        let Some(msg) = ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap() else {
            assert!(Instant::now() < deadline, "the relay published {} of {n} jobs", jobs.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        jobs.push(kiln_common::amqp::decode(&msg.delivery, JOB_TYPE).unwrap());
    }
    jobs
}

/// A result for `job` by a worker that is this test.
fn answer(job: JobMessage, outcome: AttemptOutcome) -> ResultMessage {
    let (started_ms, finished_ms) = (job.created_ms, job.created_ms + 1);
    ResultMessage { v: 1, worker: "w-by-hand".into(), backend: "none".into(), started_ms, finished_ms, outcome, job }
}

/// Publishes a batch of results to the results queue, confirmed, signed with the workers' token.
async fn publish_results(d: &Distributed, ch: &lapin::Channel, batch: &ResultBatch) {
    publish_signed(d, ch, batch, Some(&MessageKey::from_token(&d.worker_token))).await;
}

/// Publishes a batch of results signed with `key` (or not at all).
async fn publish_signed(d: &Distributed, ch: &lapin::Channel, batch: &ResultBatch, key: Option<&MessageKey>) {
    let body = serde_json::to_vec(batch).unwrap();
    let mut props = kiln_common::amqp::properties(RESULTS_TYPE, "by-hand");
    if let Some(key) = key {
        props = kiln_common::amqp::signed(props, key, &body);
    }
    kiln_common::amqp::publish_confirmed(ch, "", &d.names.results_queue(), &body, props).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_asset_inside_its_result_is_checked_stored_and_served_and_a_wrong_one_fails_the_attempt() {
    let Some(d) = Distributed::start_with(|cfg| cfg.scheduler.retry.max_attempts = 1).await else { return };
    let (_conn, ch) = d.channel().await;
    kiln_common::amqp::declare_topology(&ch, &d.names).await.unwrap();
    let ids = d.submit(4, 500).await;
    let jobs = take_jobs(&d, &ch, ids.len()).await;
    let png = |shade: u8| kiln_worker::render::encode_png(2, 2, &[shade; 12]).unwrap();
    // Too wide to be its own thumbnail, so it would be served as one: such a PNG is uploaded.
    let wide = kiln_worker::render::encode_png(257, 1, &[7; 257 * 3]).unwrap();
    let inline = |png: Vec<u8>, asset: String, provenance: Option<Value>| AttemptOutcome::Succeeded {
        asset,
        bytes: png.len() as u64,
        png: Some(png),
        provenance,
    };
    let hash = |png: &[u8]| blake3::hash(png).to_hex().to_string();
    let (good, lying) = (png(10), png(20));
    let by_job: HashMap<String, AttemptOutcome> = jobs
        .iter()
        .zip([
            // Whole, with its provenance.
            inline(good.clone(), hash(&good), Some(serde_json::json!({ "asset": hash(&good), "seed": 500 }))),
            // Bytes that are not the asset it names.
            inline(lying.clone(), hash(b"never sent"), None),
            // A provenance that names another asset.
            inline(lying.clone(), hash(&lying), Some(serde_json::json!({ "asset": hash(&good) }))),
            inline(wide.clone(), hash(&wide), Some(serde_json::json!({ "asset": hash(&wide), "wide": true }))),
        ])
        .map(|(j, o)| (j.job_id.clone(), o))
        .collect();
    let results = jobs.into_iter().map(|j| answer(j.clone(), by_job[&j.job_id].clone())).collect();
    publish_results(&d, &ch, &ResultBatch { v: 1, results }).await;
    let ended: HashMap<String, Value> = d
        .wait_all(&ids, Duration::from_secs(60))
        .await
        .into_iter()
        .map(|j| (j["id"].as_str().unwrap().into(), j))
        .collect();
    let mut seen = Vec::new();
    for (id, outcome) in &by_job {
        let j = &ended[id];
        let AttemptOutcome::Succeeded { asset, png, provenance, .. } = outcome else { unreachable!() };
        if provenance.as_ref().is_some_and(|p| p["seed"] == 500) {
            assert_eq!((j["state"].as_str(), j["asset"].as_str()), (Some("succeeded"), Some(asset.as_str())), "{j}");
            let served = d.farm.client.bytes(&format!("/v1/assets/{asset}")).await.unwrap();
            assert_eq!(&served[..], png.as_deref().unwrap(), "the asset is served as it came");
            let prov = d.farm.client.call(Method::GET, &format!("/v1/assets/{asset}/provenance"), None).await.unwrap();
            assert_eq!((prov["asset"].as_str(), &prov["seed"]), (Some(asset.as_str()), &Value::from(500)), "{prov}");
            seen.push("stored");
        } else {
            assert_eq!(j["state"], "failed", "{j}");
            let error = j["error"].as_str().unwrap();
            assert!(error.contains("w-by-hand") && error.contains(asset.as_str()), "{error}");
            match provenance {
                None => assert!(error.contains("do not hash to it"), "{error}"),
                Some(p) if p["wide"] == true => assert!(error.contains("it is 257×1"), "{error}"),
                Some(_) => assert!(error.contains("provenance names another asset"), "{error}"),
            }
            assert!(!d.farm.sched.has_asset(asset).await.unwrap(), "nothing stored under {asset}");
            seen.push("refused");
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, ["refused", "refused", "refused", "stored"]);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_worker_mid_render_loses_nothing_and_repeats_nothing() {
    let Some(mut d) = Distributed::start().await else { return };
    d.spawn_worker("w-victim");
    d.spawn_worker("w-survivor");
    let ids = d.submit(200, 1000).await;
    // Let some finish, then kill one worker with jobs in hand.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = d.farm.metric("kiln_jobs", "state=\"succeeded\"").await;
        if done >= 20.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress before the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d.workers[0].0.kill().unwrap();
    d.workers[0].0.wait().unwrap();
    let jobs = d.wait_all(&ids, Duration::from_secs(240)).await;
    assert!(jobs.iter().all(|j| j["state"] == "succeeded"), "every job succeeded");
    let counts = d.succeeded_events(&ids).await;
    assert!(counts.values().all(|&n| n == 1), "exactly one succeeded result per job: {counts:?}");
    // Silent for the lost period, the killed worker is shown lost, and counted so.
    d.worker_where("w-victim", "lost", |w| w["state"] == "lost").await;
    assert_eq!(d.farm.metric("kiln_workers", "state=\"lost\"").await, 1.0);
    assert_eq!(d.farm.metric("kiln_workers", "state=\"active\"").await, 1.0);
    d.stop().await;
}

/// Starts a worker with a delivery limit of 2 and its own `/healthz` and `/metrics`; returns
/// the client of that endpoint.
fn spawn_limited_worker(d: &mut Distributed, id: &str) -> kiln_common::client::Client {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let extra = [("KILN_DELIVERY_LIMIT", "2"), ("KILN_METRICS_LISTEN", listen.as_str()), ("KILN_CONCURRENCY", "1")];
    d.spawn_worker_with(id, &extra);
    kiln_common::client::Client::new(&format!("http://{listen}"), None)
}

/// The worker's `/metrics` text once `pred` holds of its `/healthz` (up to 60 s).
async fn worker_once(own: &kiln_common::client::Client, what: &str, pred: impl Fn(&Value) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = own.send(Method::GET, "/healthz", None).await
            && r.json().is_ok_and(|h| pred(&h))
        {
            let m = own.send(Method::GET, "/metrics", None).await.unwrap();
            return String::from_utf8_lossy(&m.body).into_owned();
        }
        assert!(Instant::now() < deadline, "the worker never was {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_render_that_kills_its_workers_is_dead_lettered_at_the_delivery_limit() {
    let Some(mut d) = Distributed::start().await else { return };
    // A render slow enough (seconds on one CPU thread) to kill its worker in the middle of it.
    let mut body = job("a render that kills its worker", 7, "final");
    (body["width"], body["height"], body["samples"]) = (1536.into(), 1536.into(), 4.into());
    let id = d.farm.submit(body).await["id"].as_str().unwrap().to_owned();
    let rendering = |h: &Value| h["in_flight"] == 1;
    let redeliveries = |m: &str, outcome: &str| {
        common::metric_in(m, "kiln_worker_redeliveries_total", &format!("outcome=\"{outcome}\""))
    };
    // The first delivery dies with its worker.
    let own = spawn_limited_worker(&mut d, "w-dies-1");
    worker_once(&own, "rendering", rendering).await;
    d.workers[0].0.kill().unwrap(); // SIGKILL
    d.workers[0].0.wait().unwrap();
    // The second worker gets it back from the broker: it puts it back counted, takes the copy,
    // and dies rendering it too.
    let own = spawn_limited_worker(&mut d, "w-dies-2");
    let metrics = worker_once(&own, "rendering", rendering).await;
    assert_eq!(redeliveries(&metrics, "put_back"), 1.0, "{metrics}");
    d.workers[1].0.kill().unwrap();
    d.workers[1].0.wait().unwrap();
    // Two deliveries unsettled: the third worker dead-letters it instead of rendering it, and
    // the scheduler fails the job with the reason and tells the operator.
    let own = spawn_limited_worker(&mut d, "w-lives");
    let j = &d.wait_all(std::slice::from_ref(&id), Duration::from_secs(60)).await[0];
    assert_eq!(j["state"], "failed", "{j}");
    let error = j["error"].as_str().unwrap();
    assert!(
        error.contains("delivered 2 times without being settled (run.delivery_limit = 2)"),
        "the job names the delivery limit: {error}"
    );
    let metrics = worker_once(&own, "idle", |h| h["in_flight"] == 0).await;
    assert_eq!((redeliveries(&metrics, "dead_lettered"), redeliveries(&metrics, "put_back")), (1.0, 0.0), "{metrics}");
    assert_eq!(common::metric_in(&metrics, "kiln_render_seconds_count", ""), 0.0, "it rendered nothing: {metrics}");
    let incident = common::open_incident(&d.farm.client, &id).await;
    assert_eq!(incident["kind"], "job_failed", "{incident}");
    assert!(incident["summary"].as_str().unwrap().contains("run.delivery_limit"), "{incident}");
    // The farm kept serving: the surviving worker renders an ordinary job at its first attempt.
    let more = d.submit(1, 5000).await;
    let j = &d.wait_all(&more, Duration::from_secs(60)).await[0];
    assert_eq!((j["state"].as_str(), j["attempt"].as_u64()), (Some("succeeded"), Some(1)), "{j}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tier_with_jobs_and_no_worker_is_said_by_healthz_and_a_metric() {
    let Some(mut d) = Distributed::start().await else { return };
    d.spawn_worker_with("w-previews", &[("KILN_WORKER_TIERS", "preview")]);
    d.worker_where("w-previews", "active", |w| w["state"] == "active").await;
    let health = d.farm.client.call(Method::GET, "/healthz", None).await.unwrap();
    assert!(health.get("warnings").is_none(), "nothing waits yet: {health}");
    // A preview renders; a print waits, and the farm says why.
    let preview = d.submit(1, 6000).await;
    let mut print = job("a print nobody takes", 6001, "print");
    (print["width"], print["height"]) = (64.into(), 64.into());
    let print_id = d.farm.submit(print).await["id"].as_str().unwrap().to_owned();
    assert_eq!(d.wait_all(&preview, Duration::from_secs(60)).await[0]["state"], "succeeded");
    let health = d.farm.client.call(Method::GET, "/healthz", None).await.unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(
        health["warnings"],
        serde_json::json!(["1 print job(s) waiting and no active worker serves the print tier"]),
        "{health}"
    );
    assert_eq!(d.farm.metric("kiln_tier_workers", "tier=\"print\"").await, 0.0);
    assert_eq!(d.farm.metric("kiln_tier_workers", "tier=\"preview\"").await, 1.0);
    // A print worker comes: the print renders and the warning is gone.
    d.spawn_worker_with("w-prints", &[("KILN_WORKER_TIERS", "print")]);
    let j = &d.wait_all(std::slice::from_ref(&print_id), Duration::from_secs(60)).await[0];
    assert_eq!(j["state"], "succeeded", "{j}");
    let health = d.farm.client.call(Method::GET, "/healthz", None).await.unwrap();
    assert!(health.get("warnings").is_none(), "{health}");
    assert_eq!(d.farm.metric("kiln_tier_workers", "tier=\"print\"").await, 1.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_that_fails_many_distinct_jobs_is_drained_until_resumed() {
    let Some(mut d) = Distributed::start_with(|cfg| {
        cfg.scheduler.broker.drain_after_jobs = 3;
        cfg.scheduler.retry.max_attempts = 20;
        cfg.scheduler.retry.max_ms = 200;
    })
    .await
    else {
        return;
    };
    // The bad worker alone first, so it is the one that gets the jobs.
    d.spawn_bad_worker("w-bad");
    d.worker_where("w-bad", "consuming", |w| w["state"] == "active").await;
    let ids = d.submit(20, 2000).await;
    let bad = d.worker_where("w-bad", "drained, and says so in its heartbeat", |w| !w["drained"].is_null()).await;
    // Then a good one, which does what the bad one failed.
    d.spawn_worker("w-good");
    for j in d.wait_all(&ids, Duration::from_secs(120)).await {
        assert_eq!(j["state"], "succeeded", "the good worker did what the bad one failed: {j}");
    }
    assert_eq!(bad["state"], "drained", "{bad}");
    let reason = bad["drained_reason"].as_str().unwrap();
    assert!(reason.contains("distinct jobs within") && reason.contains("never arrived"), "{reason}");
    let all = d.farm.client.call(Method::GET, "/v1/workers", None).await.unwrap();
    assert_eq!(all["drained"][0]["worker_id"], "w-bad", "{all}");
    let good = d.worker_where("w-good", "active", |w| w["state"] == "active").await;
    assert!(good["drained_reason"].is_null());
    assert_eq!(d.farm.metric("kiln_workers_drained_total", "").await, 1.0);
    // Drained, it takes no work: new jobs all succeed at their first attempt.
    let more = d.submit(8, 3000).await;
    for j in d.wait_all(&more, Duration::from_secs(60)).await {
        assert_eq!((j["state"].as_str(), j["attempt"].as_u64()), (Some("succeeded"), Some(1)), "{j}");
    }
    // The operator resumes it; it says so in its next heartbeat.
    let r = d.farm.client.call(Method::POST, "/v1/workers/w-bad/resume", None).await.unwrap();
    assert_eq!(r["state"], "resumed");
    d.worker_where("w-bad", "active again", |w| w["state"] == "active" && w["drained"].is_null()).await;
    let again = d.farm.client.call(Method::POST, "/v1/workers/w-bad/resume", None).await.unwrap_err();
    assert!(again.to_string().contains("409"), "{again}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_fails_on_several_distinct_workers_is_quarantined() {
    let Some(mut d) = Distributed::start_with(|cfg| {
        cfg.scheduler.broker.quarantine_after_workers = 2;
        cfg.scheduler.broker.drain_after_jobs = 100;
        cfg.scheduler.retry.max_attempts = 40;
        cfg.scheduler.retry.max_ms = 100;
    })
    .await
    else {
        return;
    };
    d.spawn_bad_worker("w-bad-1");
    d.spawn_bad_worker("w-bad-2");
    let ids = d.submit(1, 4000).await;
    let j = &d.wait_all(&ids, Duration::from_secs(120)).await[0];
    assert_eq!(j["state"], "failed", "{j}");
    let error = j["error"].as_str().unwrap();
    assert!(error.starts_with("quarantined: failed on 2 distinct workers (w-bad-1, w-bad-2); last: "), "{error}");
    let events = d.farm.sched.store.events(&ids[0], 0).await.unwrap();
    let last = events.last().unwrap();
    assert!(last.detail.starts_with("quarantined"), "{last:?}");
    assert_eq!(d.farm.metric("kiln_jobs_quarantined_total", "").await, 1.0);
    // It needs the operator: one incident, however many attempts it took.
    let until = Instant::now() + Duration::from_secs(10);
    let incidents = loop {
        let v = d.farm.client.call(Method::GET, "/v1/incidents?state=open", None).await.unwrap();
        let list = v["incidents"].as_array().unwrap().clone();
        if !list.is_empty() || Instant::now() > until {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(incidents.len(), 1, "{incidents:#?}");
    let i = &incidents[0];
    assert_eq!((i["kind"].as_str(), i["subject"].as_str()), (Some("job_quarantined"), Some(ids[0].as_str())));
    assert!(i["summary"].as_str().unwrap().contains("distinct workers"), "{i}");
    assert_eq!(i["actions"], serde_json::json!(["resolve"]));
    d.stop().await;
}

/// Takes the next delivery from `consumer`, waiting up to 10 s.
async fn next_delivery(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    use futures_util::StreamExt;
    let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await;
    d.expect("a delivery within 10 s").expect("the consumer is open").expect("a delivery")
}

/// Waits until the settler has sent `n` ack frames in all.
async fn ack_frames_reach(metrics: &kiln_worker::metrics::Metrics, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics.ack_frames.get() < n {
        assert!(Instant::now() < deadline, "{} ack frames, not {n}", metrics.ack_frames.get());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metrics.ack_frames.get(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_worker_acks_a_finished_run_in_one_frame_and_never_a_delivery_still_in_hand() {
    use futures_util::StreamExt;
    use kiln_worker::settle::{Settle, Settler, Tag};
    use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::FieldTable;
    let Some((url, prefix)) = testenv::amqp().await else { return };
    let conn = kiln_common::amqp::connect(&url, "kiln-test").await.unwrap();
    let publ = kiln_common::amqp::confirm_channel(&conn).await.unwrap();
    let queue = format!("{prefix}.settle");
    let declare = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    publ.queue_declare(queue.clone().into(), declare, FieldTable::default()).await.unwrap();
    for i in 1..=6 {
        let props = kiln_common::amqp::properties(JOB_TYPE, &format!("m{i}"));
        kiln_common::amqp::publish_confirmed(&publ, "", &queue, format!("m{i}").as_bytes(), props).await.unwrap();
    }
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let opts = BasicConsumeOptions::default();
    let mut consumer =
        ch.basic_consume(queue.clone().into(), "settle".into(), opts, FieldTable::default()).await.unwrap();
    let metrics = kiln_worker::metrics::Metrics::new();
    let (settler, task) = Settler::start(1, metrics.clone());
    let mut taken = Vec::new();
    for _ in 0..6 {
        let d = next_delivery(&mut consumer).await;
        settler.taken(Tag { ch: 0, tag: d.delivery_tag });
        taken.push(d);
    }
    let settle =
        |d: &lapin::message::Delivery| Settle { at: Tag { ch: 0, tag: d.delivery_tag }, acker: d.acker.clone() };
    // m3 and m6 still rendering; m1, m2, m4 and m5 done: m1..m2 in one multiple ack, m4 and m5
    // each alone (a multiple ack of m5 would have settled m3).
    settler.ack([0, 1, 3, 4].iter().map(|&i| settle(&taken[i])).collect());
    ack_frames_reach(&metrics, 3).await;
    // m3 goes back and comes again: it was not settled with the others.
    settler.nack(settle(&taken[2]));
    let again = next_delivery(&mut consumer).await;
    assert_eq!(again.data, b"m3");
    settler.taken(Tag { ch: 0, tag: again.delivery_tag });
    // m6 done: nothing below it unsettled but the m3 delivered again above it, so one frame.
    settler.ack(vec![settle(&taken[5])]);
    ack_frames_reach(&metrics, 4).await;
    settler.ack(vec![settle(&again)]);
    ack_frames_reach(&metrics, 5).await;
    drop(settler);
    task.await.unwrap();
    // Nothing more comes, and with the channel closed nothing goes back: every message is acked.
    let more = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await;
    assert!(more.is_err(), "an unexpected delivery: {more:?}");
    kiln_common::amqp::close_channels(&[&ch], "done").await;
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let q = publ.queue_declare(queue.clone().into(), passive, FieldTable::default()).await.unwrap();
    assert_eq!(q.message_count(), 0, "messages left on the queue");
    publ.queue_delete(queue.into(), QueueDeleteOptions::default()).await.unwrap();
}

/// Results nobody handed out: for an attempt not yet given, for a job that does not exist, with
/// another job's cache key, or another request. Each is dead-lettered alone, with its reason,
/// and counted; none changes a job, and a genuine result in the same message is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_for_a_job_or_attempt_not_handed_out_is_refused_and_changes_nothing() {
    let Some(d) = Distributed::start().await else { return };
    let (_conn, ch) = d.channel().await;
    kiln_common::amqp::declare_topology(&ch, &d.names).await.unwrap();
    let ids = d.submit(2, 700).await;
    let jobs = take_jobs(&d, &ch, ids.len()).await;
    let (a, b) = (jobs[0].clone(), jobs[1].clone());
    // The relay marks them sent once the broker confirmed them, which may come after the take.
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.farm.sched.store.job(&b.job_id).await.unwrap().unwrap().state.as_str() != "dispatched" {
        assert!(Instant::now() < deadline, "job {} never marked dispatched", b.job_id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let png = kiln_worker::render::encode_png(2, 2, &[99; 12]).unwrap();
    let forged = || AttemptOutcome::Succeeded {
        asset: blake3::hash(&png).to_hex().to_string(),
        bytes: png.len() as u64,
        png: Some(png.clone()),
        provenance: None,
    };
    let mut later = b.clone();
    later.attempt += 1;
    let mut ghost = b.clone();
    ghost.job_id = "j-ghost".into();
    let mut other_key = b.clone();
    other_key.cache_key = a.cache_key.clone();
    let mut other_request = b.clone();
    other_request.request.seed += 1;
    let refused = [later, ghost, other_key, other_request];
    let mut results: Vec<ResultMessage> = refused.into_iter().map(|j| answer(j, forged())).collect();
    results.push(answer(a.clone(), AttemptOutcome::Failed { error: "genuine".into(), transient: false }));
    publish_results(&d, &ch, &ResultBatch { v: 1, results }).await;
    let mut reasons = dead_reasons(&d, &ch, 4).await;
    reasons.sort();
    let id_b = &b.job_id;
    assert_eq!(
        reasons,
        [
            format!(
                "result refused (attempt_not_open): attempt 2 of job {id_b} is not open: the job is dispatched at attempt 0"
            ),
            format!("result refused (not_its_request): the result's cache key is not job {id_b}'s"),
            format!("result refused (not_its_request): the result's request is not job {id_b}'s"),
            "result refused (unknown_job): there is no job j-ghost".to_owned(),
        ]
    );
    let done = d.wait_all(&ids[..1], Duration::from_secs(30)).await;
    assert!(done[0]["error"].as_str().unwrap().contains("genuine"), "{}", done[0]);
    let job_b = d.farm.sched.store.job(id_b).await.unwrap().unwrap();
    assert_eq!((job_b.state.as_str(), job_b.asset), ("dispatched", None), "no forged result moved it");
    let metrics = d.farm.client.send(Method::GET, "/metrics", None).await.unwrap().body;
    let metrics = String::from_utf8_lossy(&metrics);
    let refused = |reason: &str| {
        common::metric_in(&metrics, "kiln_scheduler_results_refused_total", &format!("reason=\"{reason}\""))
    };
    assert_eq!((refused("attempt_not_open"), refused("not_its_request"), refused("unknown_job")), (1.0, 2.0, 1.0));
    // The operator hears of them: one incident per reason (a day), however many were refused.
    let v = d.farm.client.call(Method::GET, "/v1/incidents", None).await.unwrap();
    let mut subjects: Vec<&str> = v["incidents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["kind"] == "result_refused")
        .map(|i| i["subject"].as_str().unwrap())
        .collect();
    subjects.sort();
    assert_eq!(subjects, ["attempt_not_open", "not_its_request", "unknown_job"], "{v:#}");
    d.stop().await;
}

/// A worker whose tier limits are smaller than the scheduler's refuses the job's message and
/// dead-letters it. The scheduler hears of it through its copy of the dead letters and fails
/// the job with the worker's reason, and the identical request that waited on it ends with it:
/// nothing stays `dispatched`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_a_worker_refuses_fails_with_the_reason_and_nothing_stays_dispatched() {
    let Some(mut d) = Distributed::start_with(|cfg| cfg.scheduler.retry.max_attempts = 3).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.toml");
    std::fs::write(
        &small,
        "[tiers.preview]\ndefault_side = 16\nmax_side = 16\nmax_pixels = 256\ndefault_samples = 1\nmax_samples = 4\nwatermark = true\ndither = false\n",
    )
    .unwrap();
    d.spawn_worker_with("w-small", &[("KILN_CONFIG", small.to_str().unwrap())]);
    let mut body = job("too big for this worker", 900, "preview");
    body["width"] = 24.into();
    let first = d.farm.submit(body.clone()).await;
    let second = d.farm.submit(body).await;
    let ids: Vec<String> = [&first, &second].iter().map(|j| j["id"].as_str().unwrap().to_owned()).collect();
    for j in d.wait_all(&ids, Duration::from_secs(60)).await {
        assert_eq!(j["state"], "failed", "{j}");
        let error = j["error"].as_str().unwrap();
        assert!(error.contains("refused by a worker: request outside this worker's limits: width: 24 px"), "{j}");
    }
    // Refused for good: one attempt, not the three the retry policy allows. (Its `dispatched`
    // mark may be missing: a refusal that overtakes the relay's mark ends the job first.)
    let events = d.farm.sched.store.events(&ids[0], 0).await.unwrap();
    assert!(events.iter().filter(|e| e.state.as_str() == "dispatched").count() <= 1, "{events:?}");
    assert_eq!(events.iter().filter(|e| e.state.as_str() == "queued").count(), 1, "no retry: {events:?}");
    let metrics = d.farm.client.send(Method::GET, "/metrics", None).await.unwrap().body;
    let metrics = String::from_utf8_lossy(&metrics);
    let undelivered = common::metric_in(&metrics, "kiln_scheduler_jobs_undelivered_total", "cause=\"worker_refused\"");
    // Two when the second request came after the first had already failed (it was then its own).
    assert!((1.0..=2.0).contains(&undelivered), "{metrics}");
    d.stop().await;
}

/// Results from someone who is not a worker of this farm: unsigned, signed with a client's
/// token, or signed by a worker's token over another body. Each message is dead-lettered with
/// why and counted; the job waits for its real worker. A heartbeat nobody signed puts no
/// worker in the registry, and a signed one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_and_heartbeats_not_signed_by_a_worker_token_are_refused() {
    let Some(d) = Distributed::start().await else { return };
    let (_conn, ch) = d.channel().await;
    kiln_common::amqp::declare_topology(&ch, &d.names).await.unwrap();
    let ids = d.submit(1, 800).await;
    let job = take_jobs(&d, &ch, 1).await.remove(0);
    let batch = ResultBatch {
        v: 1,
        results: vec![answer(job.clone(), AttemptOutcome::Failed { error: "forged".into(), transient: false })],
    };
    publish_signed(&d, &ch, &batch, None).await;
    let client = d.farm.sched.create_token("a-client", Role::Client, &[], None, None).await.unwrap();
    publish_signed(&d, &ch, &batch, Some(&MessageKey::from_token(client.expose()))).await;
    // A worker's real signature, moved onto another body.
    let worker = MessageKey::from_token(&d.worker_token);
    let body = serde_json::to_vec(&batch).unwrap();
    let stolen = kiln_common::amqp::signed(kiln_common::amqp::properties(RESULTS_TYPE, "x"), &worker, b"{}");
    kiln_common::amqp::publish_confirmed(&ch, "", &d.names.results_queue(), &body, stolen).await.unwrap();
    let mut reasons = dead_reasons(&d, &ch, 3).await;
    reasons.sort();
    assert!(reasons[0].starts_with("result refused (unproven): it is not signed"), "{reasons:?}");
    assert_eq!(
        reasons[1],
        "result refused (unproven): its MAC does not match its body (signer: worker token \"workers\")"
    );
    assert!(
        reasons[2].starts_with("result refused (unproven): signer ")
            && reasons[2].ends_with("is no worker token of this farm (or its token was revoked)"),
        "{reasons:?}"
    );
    let j = d.farm.sched.store.job(&ids[0]).await.unwrap().unwrap();
    assert_ne!(j.state.as_str(), "failed", "no forged result ended it");
    // Heartbeats: a ghost's is ignored; a worker's is heard.
    for (id, key) in [("ghost", None), ("signed-by-hand", Some(&worker))] {
        let hb = Heartbeat {
            v: 1,
            worker_id: id.into(),
            host: "nowhere".into(),
            backend: "cpu".into(),
            adapter: "none".into(),
            memory_bytes: None,
            memory_used_bytes: None,
            utilization_percent: None,
            models: vec![],
            tiers: vec![kiln_protocol::Tier::Preview],
            in_flight: 0,
            concurrency: 1,
            draining: false,
            drained: None,
            at_ms: kiln_protocol::now_ms(),
            every_ms: Some(1000),
        };
        let body = serde_json::to_vec(&hb).unwrap();
        let mut props = kiln_common::amqp::properties(HEARTBEAT_TYPE, id);
        if let Some(key) = key {
            props = kiln_common::amqp::signed(props, key, &body);
        }
        kiln_common::amqp::publish_confirmed(&ch, "", &d.names.heartbeats_queue(), &body, props).await.unwrap();
    }
    d.worker_where("signed-by-hand", "heard", |_| true).await;
    let all = d.farm.client.call(Method::GET, "/v1/workers", None).await.unwrap();
    assert!(!all.to_string().contains("ghost"), "{all}");
    let metrics = d.farm.client.send(Method::GET, "/metrics", None).await.unwrap().body;
    let metrics = String::from_utf8_lossy(&metrics);
    assert_eq!(common::metric_in(&metrics, "kiln_scheduler_results_refused_total", "reason=\"unproven\""), 3.0);
    assert_eq!(common::metric_in(&metrics, "kiln_scheduler_bad_messages_total", "kind=\"heartbeat\""), 1.0);
    d.stop().await;
}

/// Deletes a RabbitMQ user when dropped.
struct BrokerUser(String);

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_user", &self.0]).output();
    }
}

/// A worker box added with `kiln worker add` and the rabbitmqctl lines it printed: it renders
/// as its own broker user, and that user can do nothing else on the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_with_its_own_broker_user_renders_and_may_do_nothing_else() {
    let Some(mut d) = Distributed::start().await else { return };
    let probe = Command::new("rabbitmqctl").arg("list_users").output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        assert!(!testenv::services_required(), "rabbitmqctl does not run here (it needs root): {probe:?}");
        eprintln!("skipping: rabbitmqctl does not run here (it needs root)");
        return d.stop().await;
    }
    let name = format!("{}-box", d.names.prefix());
    let out = common::kiln()
        .args(["worker", "add", &name, "--prefix", d.names.prefix(), "--json"])
        .args(["--server", &d.farm.url, "--token", &d.farm.token])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let added: Value = serde_json::from_slice(&out.stdout).unwrap();
    let _user = BrokerUser(name.clone());
    for cmd in added["broker_commands"].as_array().unwrap() {
        let ran = Command::new("sh").args(["-c", cmd.as_str().unwrap()]).output().unwrap();
        assert!(ran.status.success(), "{cmd}: {}", String::from_utf8_lossy(&ran.stderr));
    }
    let password = added["amqp_password"].as_str().unwrap();
    let url = format!("amqp://{name}:{password}@127.0.0.1:5672/%2f");

    // It renders, with its own token and user.
    let env = WorkerEnv {
        amqp_url: &url,
        prefix: d.names.prefix(),
        scheduler_url: &d.farm.url,
        token: added["token"].as_str().unwrap(),
    };
    d.workers.push(common::spawn_worker_to(&env, "w-own-user", &[], std::process::Stdio::inherit()));
    let ids = d.submit(2, 1100).await;
    for j in d.wait_all(&ids, Duration::from_secs(60)).await {
        assert_eq!(j["state"], "succeeded", "{j}");
    }

    // Nothing else: declare a queue, read the results, publish a job.
    let conn = kiln_common::amqp::connect(&url, "intruder").await.unwrap();
    let refused = |what: &str, e: Option<lapin::Error>| {
        let e = e.unwrap_or_else(|| panic!("{what} was allowed"));
        assert!(e.to_string().contains("ACCESS_REFUSED"), "{what}: {e}");
    };
    let ch = conn.create_channel().await.unwrap();
    let opts = lapin::options::QueueDeclareOptions::default();
    refused("declaring a queue", ch.queue_declare("stolen".into(), opts, Default::default()).await.err());
    let ch = conn.create_channel().await.unwrap();
    let consume =
        ch.basic_consume(d.names.results_queue().into(), "thief".into(), Default::default(), Default::default()).await;
    refused("consuming the results", consume.err());
    let ch = kiln_common::amqp::confirm_channel(&conn).await.unwrap();
    let props = kiln_common::amqp::properties(JOB_TYPE, "forged");
    let published = kiln_common::amqp::publish_confirmed(&ch, &d.names.jobs_exchange(), "preview", b"{}", props).await;
    let e = published.expect_err("publishing a job was allowed");
    assert!(format!("{e:?}").contains("ACCESS_REFUSED"), "{e:?}");
    let more = d.submit(1, 1200).await;
    assert_eq!(d.wait_all(&more, Duration::from_secs(60)).await[0]["state"], "succeeded");
    d.stop().await;
}

/// Waits until `f` says yes, or fails saying `what`.
async fn until<F: std::future::Future<Output = bool>>(what: &str, within: Duration, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Jobs whose message is purged from the queue are sent again, then failed with the reason
/// once their attempts are spent; jobs whose messages wait in a queue are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_whose_message_is_purged_is_sent_again_and_fails_once_its_attempts_are_spent() {
    let Some(mut d) = Distributed::start_with(|cfg| {
        cfg.scheduler.broker.redispatch_after_seconds = 2;
        cfg.scheduler.retry.max_attempts = 2;
    })
    .await
    else {
        return;
    };
    let ids = d.submit(2, 1300).await;
    let lost = || async { d.farm.metric("kiln_scheduler_jobs_undelivered_total", "cause=\"lost\"").await };
    let dispatches = |id: String| {
        let store = d.farm.sched.store.clone();
        async move { store.events(&id, 0).await.unwrap().iter().filter(|e| e.state.as_str() == "dispatched").count() }
    };
    until("both jobs dispatched", Duration::from_secs(10), || async {
        d.farm.sched.store.job(&ids[1]).await.unwrap().unwrap().state.as_str() == "dispatched"
    })
    .await;
    // Waiting in the queue, past the limit: not touched.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(lost().await, 0.0);
    let (_conn, ch) = d.channel().await;
    let purge = || async {
        let q = d.names.tier_queue(kiln_protocol::Tier::Preview);
        ch.queue_purge(q.into(), Default::default()).await.unwrap()
    };
    assert_eq!(purge().await, 2);
    until("both sent again", Duration::from_secs(15), || async { lost().await == 2.0 }).await;
    for id in &ids {
        until("dispatched a second time", Duration::from_secs(10), || async { dispatches(id.clone()).await == 2 })
            .await;
    }
    until("both back in the queue", Duration::from_secs(10), || async {
        let q = d.names.tier_queue(kiln_protocol::Tier::Preview);
        let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        ch.queue_declare(q.into(), passive, Default::default()).await.unwrap().message_count() == 2
    })
    .await;
    purge().await;
    for j in d.wait_all(&ids, Duration::from_secs(20)).await {
        assert_eq!(j["state"], "failed", "{j}");
        assert!(j["error"].as_str().unwrap().contains("purged, or lost by the broker"), "{j}");
    }
    d.spawn_worker("w-after");
    let more = d.submit(1, 1400).await;
    assert_eq!(d.wait_all(&more, Duration::from_secs(60)).await[0]["state"], "succeeded");
    d.stop().await;
}

/// Two schedulers on one database: a token made on one is taken by the other, and one revoked
/// on one is refused by the other within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_revoked_on_one_node_is_refused_on_another_within_a_second() {
    let Some(d) = Distributed::start().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.scheduler.database_url = d.farm.sched.cfg.database_url.clone();
    let other = TestFarm::start_with(dir, cfg).await;
    let made = d
        .farm
        .client
        .call(Method::POST, "/v1/tokens", Some(&serde_json::json!({ "name": "roaming", "role": "client" })))
        .await
        .unwrap();
    let there = other.client_with(Some(made["token"].as_str().unwrap()));
    until("the other node takes a token made here", Duration::from_secs(3), || async {
        there.call(Method::GET, "/v1/jobs", None).await.is_ok()
    })
    .await;
    d.farm.client.delete("/v1/tokens/roaming").await.unwrap();
    let here = d.farm.client_with(Some(made["token"].as_str().unwrap()));
    assert!(here.call(Method::GET, "/v1/jobs", None).await.is_err(), "refused at once where it was revoked");
    let revoked = Instant::now();
    until("the other node refuses it", Duration::from_secs(3), || async {
        there.send(Method::GET, "/v1/jobs", None).await.unwrap().status == 401
    })
    .await;
    eprintln!("refused on the other node {:?} after the revoke", revoked.elapsed());
    other.stop().await;
    d.stop().await;
}

/// A worker uploads only the render of a job it holds: named, open, a PNG of the job's size. The
/// scheduler makes the thumbnail itself; a client cannot read an asset no job of its has.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_uploads_only_the_render_of_an_open_job_and_the_thumbnail_is_the_schedulers() {
    let Some(mut d) = Distributed::start().await else { return };
    // No worker yet: the job waits, dispatched at attempt 0 (its first attempt is 1).
    let j = d.farm.submit(job("an upload to check", 1500, "preview")).await;
    let id = j["id"].as_str().unwrap().to_owned();
    let (w, h) = (j["width"].as_u64().unwrap() as u32, j["height"].as_u64().unwrap() as u32);
    until("the job dispatched", Duration::from_secs(10), || async {
        d.farm.sched.store.job(&id).await.unwrap().unwrap().state.as_str() == "dispatched"
    })
    .await;
    let scratch = tempfile::tempdir().unwrap();
    let png_of = |w: u32, h: u32, name: &str| {
        let rgb: Vec<u8> = (0..w * h).flat_map(|i| [(i % 251) as u8, (i / w % 253) as u8, 90]).collect();
        let png = kiln_worker::render::encode_png(w, h, &rgb).unwrap();
        let path = scratch.path().join(name);
        std::fs::write(&path, &png).unwrap();
        (blake3::hash(&png).to_hex().to_string(), path)
    };
    let (right, right_file) = png_of(w, h, "right.png");
    let (wrong, wrong_file) = png_of(w / 2, h, "wrong.png");
    let worker = d.farm.client_with(Some(&d.worker_token));
    let put = |path: String, file: std::path::PathBuf| {
        let worker = worker.clone();
        async move {
            let r = worker.put_file(&path, &file).await.unwrap();
            let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            (r.status.as_u16(), v["error"]["field"].as_str().unwrap_or("").to_owned(), v.to_string())
        }
    };
    let cases = [
        (format!("/v1/assets/{right}"), &right_file, 400, "job"),
        (format!("/v1/assets/{right}?job={id}"), &right_file, 400, "attempt"),
        (format!("/v1/assets/{right}?job=j-none&attempt=1"), &right_file, 404, ""),
        (format!("/v1/assets/{right}?job={id}&attempt=3"), &right_file, 409, ""),
        (format!("/v1/assets/{right}?task=t1"), &right_file, 400, "task"),
        (format!("/v1/assets/{wrong}?job={id}&attempt=1"), &wrong_file, 400, "body"),
    ];
    for (path, file, status, field) in cases {
        let (got, got_field, body) = put(path.clone(), file.clone()).await;
        assert_eq!((got, got_field.as_str()), (status, field), "{path}: {body}");
        if status == 400 && field == "body" {
            assert!(body.contains(&format!("a {}×{h} PNG; job {id} renders {w}×{h}", w / 2)), "{body}");
        }
    }
    let stored = kiln_worker::assets::AssetStore::open(d.farm.dir.path()).unwrap();
    assert!(!stored.contains(&right) && !stored.contains(&wrong), "nothing refused is kept");
    // The render of the open attempt is taken, and its thumbnail made here.
    let (got, _, body) = put(format!("/v1/assets/{right}?job={id}&attempt=1"), right_file.clone()).await;
    assert_eq!(got, 204, "{body}");
    let thumb = d.farm.client.bytes(&format!("/v1/assets/{right}?variant=thumb")).await.unwrap();
    let made = kiln_worker::render::thumbnail_of_png(&right_file).unwrap().unwrap();
    assert_eq!(thumb.as_ref(), &made[..], "the scheduler's own thumbnail");
    // No job has it yet, so no client may read it; the operator may.
    let body = serde_json::json!({"name": "c", "role": "client"});
    let made = d.farm.client.call(Method::POST, "/v1/tokens", Some(&body)).await.unwrap();
    let client = d.farm.client_with(made["token"].as_str());
    assert_eq!(client.send(Method::GET, &format!("/v1/assets/{right}"), None).await.unwrap().status, 404);
    // The worker that comes renders the job for real; the farm goes on.
    d.spawn_worker("w-upload");
    assert_eq!(d.wait_all(&[id], Duration::from_secs(120)).await[0]["state"], "succeeded");
    d.stop().await;
}

/// A farm whose broker and API speak only TLS: the scheduler and a worker on `amqps://` (a TLS
/// front for RabbitMQ), the worker uploading over `https://`, each trusting the farm's own CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_farm_and_its_worker_speak_tls_to_the_broker_and_the_api() {
    let certs = tempfile::tempdir().unwrap();
    let Some(files) = testenv::tls_files(certs.path()) else { return };
    let plain = testenv::amqp_url();
    let Some(proxy) = testenv::tls_proxy(&files, &testenv::amqp_addr(&plain)).await else { return };
    let login =
        plain.split("://").nth(1).and_then(|r| r.rsplit_once('@')).map(|(u, _)| format!("{u}@")).unwrap_or_default();
    let vhost = plain.rsplit_once('/').map(|(_, v)| v).unwrap_or("%2f");
    let secure = format!("amqps://{login}127.0.0.1:{}/{vhost}", proxy.port);
    let Some(mut d) = Distributed::start_with(|cfg| {
        cfg.scheduler.broker.amqp_url = Some(secure.clone().into());
        cfg.scheduler.tls.cert_file = Some(files.cert.clone());
        cfg.scheduler.tls.key_file = Some(files.key.clone());
        cfg.scheduler.tls.ca_file = Some(files.ca.clone());
    })
    .await
    else {
        return;
    };
    assert!(d.farm.url.starts_with("https://"), "{}", d.farm.url);
    let ca = files.ca.to_str().unwrap();
    d.spawn_worker_with("w-tls", &[("KILN_AMQP_URL", &secure), ("KILN_TLS_CA_FILE", ca)]);
    // Large enough to be uploaded, not carried in its result.
    let mut body = job("over tls", 1600, "preview");
    body["width"] = 320.into();
    let id = d.farm.submit(body).await["id"].as_str().unwrap().to_owned();
    let done = d.wait_all(&[id], Duration::from_secs(120)).await.remove(0);
    assert_eq!(done["state"], "succeeded", "{done}");
    let hash = done["asset"].as_str().unwrap();
    let png = d.farm.client.bytes(&format!("/v1/assets/{hash}")).await.unwrap();
    assert_eq!(blake3::hash(&png).to_hex().as_str(), hash);
    d.stop().await;
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_print_is_shared_by_the_worker_daemons_and_stitched_to_the_whole_render() {
    let Some(mut d) = Distributed::start().await else { return };
    d.spawn_worker("w-tile-1");
    d.spawn_worker("w-tile-2");
    let body =
        serde_json::json!({ "prompt": "pier at night", "seed": 5, "tier": "print", "width": 600, "height": 600 });
    let j = d.farm.submit(body).await;
    let done = d.wait_all(&[j["id"].as_str().unwrap().to_owned()], Duration::from_secs(120)).await.remove(0);
    assert_eq!(done["state"], "succeeded", "{done}");
    let hash = done["asset"].as_str().unwrap();
    let png = d.farm.client.bytes(&format!("/v1/assets/{hash}")).await.unwrap();
    let whole = common::whole_print("pier at night", 5, 600, 600, None);
    assert!(png.to_vec() == whole, "the tiles the daemons rendered stitch to the whole render");
    let prov = d.farm.client.call(Method::GET, &format!("/v1/assets/{hash}/provenance"), None).await.unwrap();
    let tiles = prov["tiles"].as_array().unwrap();
    assert_eq!(tiles.len(), 4, "{prov}");
    for t in tiles {
        let w = t["worker"].as_str().unwrap();
        assert!(w == "w-tile-1" || w == "w-tile-2", "{t}");
    }
    d.stop().await;
}
