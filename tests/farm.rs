//! The embedded farm end to end through HTTP: render and download, the cache and single flight,
//! a kill and restart, bad input, auth, events, assets, idempotency, listing, cancel and retry.

mod common;

use std::time::Duration;

use common::*;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_preview_renders_to_the_png_kiln_render_gives() {
    let farm = TestFarm::start().await;
    let created = farm.submit(job("ember kaleidoscope", 7, "preview")).await;
    assert_eq!(created["state"], "queued");
    let id = created["id"].as_str().unwrap();
    let done = farm.wait(id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let asset = done["asset"].as_str().unwrap();
    let png = farm.client.bytes(&format!("/v1/assets/{asset}")).await.unwrap();
    assert_eq!(blake3::hash(&png).to_hex().as_str(), asset, "the asset hash is the BLAKE3 of the bytes served");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // The same request through `kiln render`, in a data dir of its own.
    let other = tempfile::tempdir().unwrap();
    let out = other.path().join("art.png");
    let status = kiln()
        .args(["render", "--prompt", "ember kaleidoscope", "--seed", "7", "--tier", "preview", "--backend", "cpu"])
        .arg("--data-dir")
        .arg(other.path().join("data"))
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read(&out).unwrap(), png.to_vec(), "the farm and `kiln render` give the same PNG");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeat_is_cached_and_a_hundred_identical_submits_render_once() {
    let farm = TestFarm::start().await;
    let first = farm.submit(job("calm ocean", 3, "preview")).await;
    let done = farm.wait(first["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "succeeded");
    let renders = farm.metric("kiln_cache_misses_total", "").await;
    assert_eq!(renders, 1.0);

    let again = farm.submit(job("  Calm   OCEAN ", 3, "preview")).await;
    assert_eq!(again["state"], "cached", "a normalised repeat is answered at once: {again}");
    assert_eq!(again["asset"], done["asset"]);
    assert_ne!(again["id"], done["id"]);
    assert_eq!(farm.metric("kiln_cache_misses_total", "").await, renders, "the render counter did not move");
    assert_eq!(farm.metric("kiln_submit_cache_hits_total", "tier=\"preview\"").await, 1.0);

    // 100 identical submits at once: one render serves them all.
    let body = json!({ "prompt": "neon quad", "seed": 11, "tier": "preview", "width": 256 });
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (c, body) = (farm.client.clone(), body.clone());
        tasks.push(tokio::spawn(async move { c.call(Method::POST, "/v1/jobs", Some(&body)).await.unwrap() }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    let mut assets = std::collections::BTreeSet::new();
    for id in &ids {
        let j = farm.wait(id).await;
        assert!(j["state"] == "succeeded" || j["state"] == "cached", "{j}");
        assets.insert(j["asset"].as_str().unwrap().to_owned());
    }
    assert_eq!(assets.len(), 1, "every submit got the same asset");
    assert_eq!(farm.metric("kiln_cache_misses_total", "").await, renders + 1.0, "exactly one render for 100 submits");
    let attached = farm.metric("kiln_submit_coalesced_total", "").await;
    let cached = farm.metric("kiln_submit_cache_hits_total", "").await - 1.0;
    assert_eq!(attached + cached, 99.0, "the other 99 attached to the render or hit the cache");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clean_stop_records_every_render_its_workers_finished() {
    let farm = TestFarm::start().await;
    // A tiny render is stored and recorded while its worker renders the next: a stop must finish
    // those, or the next start renders them again.
    let mut ids = Vec::new();
    for batch in 0..6u64 {
        let jobs: Vec<Value> = (0..100)
            .map(|i| json!({ "prompt": "clean stop", "seed": batch * 100 + i, "tier": "preview", "width": 16, "height": 16 }))
            .collect();
        let r = farm.client.send(Method::POST, "/v1/jobs", Some(Value::Array(jobs).to_string().into())).await.unwrap();
        assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.body));
        let answer = r.json().unwrap();
        ids.extend(answer["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_owned()));
    }
    let renders =
        |sched: &std::sync::Arc<kiln_scheduler::scheduler::Scheduler>| sched.worker.metrics.cache_misses.get();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while renders(&farm.sched) < 20 {
        assert!(std::time::Instant::now() < deadline, "the farm never rendered 20 jobs");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let sched = farm.sched.clone();
    let dir = farm.stop().await;
    let before = renders(&sched);
    drop(sched);
    let cfg = test_config(dir.path());
    let farm = TestFarm::start_with(dir, cfg).await;
    for id in &ids {
        assert_eq!(farm.wait(id).await["state"], "succeeded", "{id}");
    }
    let after = renders(&farm.sched);
    assert_eq!(before + after, ids.len() as u64, "each job rendered once: {before} before the stop, {after} after");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_is_submitted_and_awaited_in_one_request() {
    let farm = TestFarm::start().await;
    // Six seeds and a repeat of the first: the repeat attaches to its render.
    let mut batch: Vec<Value> = (0..6).map(|i| job("harbour lights", 200 + i, "preview")).collect();
    batch.push(job("harbour lights", 200, "preview"));
    let r = farm.client.send(Method::POST, "/v1/jobs?wait=60", Some(Value::Array(batch).to_string().into())).await;
    let r = r.unwrap();
    assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.body));
    let jobs = r.json().unwrap()["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 7);
    for j in &jobs {
        assert_eq!(j["state"], "succeeded", "every job has ended when the answer comes: {j}");
        assert!(j["asset"].is_string(), "{j}");
    }
    let seeds: Vec<u64> = jobs.iter().map(|j| j["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds, [200, 201, 202, 203, 204, 205, 200], "in the order submitted");
    assert_eq!(jobs[6]["asset"], jobs[0]["asset"]);
    assert_ne!(jobs[6]["id"], jobs[0]["id"]);
    let stored = farm.wait(jobs[0]["id"].as_str().unwrap()).await;
    assert_eq!(stored["asset"], jobs[0]["asset"], "the answer is the job as stored");

    // One job waits the same way; a repeat is answered from the cache at once.
    let single = job("harbour lights", 300, "preview");
    let one = farm.client.call(Method::POST, "/v1/jobs?wait=60", Some(&single)).await.unwrap();
    assert_eq!(one["state"], "succeeded", "{one}");
    let again = farm.client.call(Method::POST, "/v1/jobs?wait=60", Some(&single)).await.unwrap();
    assert_eq!((again["state"].as_str(), &again["asset"]), (Some("cached"), &one["asset"]));
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_a_clear_4xx_and_the_farm_keeps_serving() {
    let farm = TestFarm::start().await;
    let expect = |r: &kiln_common::client::Reply, status: StatusCode, field: &str, words: &str| {
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
        let v: Value = r.json().unwrap();
        assert_eq!(v["error"]["field"], field, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(words), "{msg:?} should mention {words:?}");
    };
    let r = farm.raw(Method::POST, "/v1/jobs", "{\"prompt\": \"a\", ").await;
    expect(&r, StatusCode::BAD_REQUEST, "body", "JSON");
    let r = farm.raw(Method::POST, "/v1/jobs", r#"{"prompt":"a","tier":"preview","colour":"red"}"#).await;
    expect(&r, StatusCode::BAD_REQUEST, "colour", "unknown field");
    let r = farm.raw(Method::POST, "/v1/jobs", r#"{"prompt":"a"}"#).await;
    expect(&r, StatusCode::BAD_REQUEST, "tier", "missing field");
    let r = farm.raw(Method::POST, "/v1/jobs", r#"{"prompt":"a","tier":"poster"}"#).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let long = "word ".repeat(500);
    let r = farm.raw(Method::POST, "/v1/jobs", &json!({ "prompt": long, "tier": "preview" }).to_string()).await;
    expect(&r, StatusCode::BAD_REQUEST, "prompt", "limit of 2000");
    let r = farm.raw(Method::POST, "/v1/jobs", r#"{"prompt":"a","tier":"final","width":99999}"#).await;
    expect(&r, StatusCode::BAD_REQUEST, "width", "tiers.final.max_side");
    let r = farm
        .raw(Method::POST, "/v1/jobs", &json!({ "prompt": "x".repeat(400_000), "tier": "preview" }).to_string())
        .await;
    expect(&r, StatusCode::PAYLOAD_TOO_LARGE, "body", "max_body_bytes");
    let many: Vec<Value> = (0..101).map(|i| job("a", i, "preview")).collect();
    let r = farm.raw(Method::POST, "/v1/jobs", &Value::Array(many).to_string()).await;
    expect(&r, StatusCode::BAD_REQUEST, "jobs", "max_jobs_per_request");
    let r = farm.raw(Method::POST, "/v1/jobs?wait=61", &job("a", 1, "preview").to_string()).await;
    expect(&r, StatusCode::BAD_REQUEST, "wait", "0..=60");
    let r = farm.raw(Method::POST, "/v1/jobs?wiat=1", &job("a", 1, "preview").to_string()).await;
    expect(&r, StatusCode::BAD_REQUEST, "wiat", "wiat: unknown field `wiat`, expected `wait`");
    let r = farm.raw(Method::GET, "/v1/jobs?limit=0", "").await;
    expect(&r, StatusCode::BAD_REQUEST, "limit", "1..=500");
    let r = farm.raw(Method::GET, "/v1/jobs?state=done", "").await;
    expect(&r, StatusCode::BAD_REQUEST, "state", "unknown job state");
    // A multibyte character where an offset's colon would be: refused, not a dropped connection.
    let r = farm.raw(Method::GET, "/v1/jobs?since=2026-11-22T10:00:00%2B%E2%82%AC:0", "").await;
    expect(&r, StatusCode::BAD_REQUEST, "since", "RFC 3339");
    let r = farm.raw(Method::GET, "/v1/assets/not-a-hash", "").await;
    expect(&r, StatusCode::BAD_REQUEST, "hash", "hex");

    // Auth: none, a wrong one, and a client acting on another's job.
    let anon = farm
        .client_with(None)
        .send(Method::POST, "/v1/jobs", Some(job("a", 1, "preview").to_string().into()))
        .await
        .unwrap();
    expect(&anon, StatusCode::UNAUTHORIZED, "authorization", "Bearer");
    let wrong = farm.client_with(Some("kiln_0000")).send(Method::GET, "/v1/jobs", None).await.unwrap();
    expect(&wrong, StatusCode::UNAUTHORIZED, "authorization", "unknown");
    let made = farm
        .client
        .call(Method::POST, "/v1/tokens", Some(&json!({ "name": "alice", "role": "client" })))
        .await
        .unwrap();
    let alice = farm.client_with(made["token"].as_str());
    let r = alice.send(Method::POST, "/v1/tokens", Some(r#"{"name":"eve","role":"operator"}"#.into())).await.unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let ops_job = farm.submit(job("operator's", 5, "preview")).await;
    let r =
        alice.send(Method::POST, &format!("/v1/jobs/{}/cancel", ops_job["id"].as_str().unwrap()), None).await.unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND, "a client cannot see or cancel another's job");
    let r = farm.raw(Method::POST, "/v1/tokens", r#"{"name":"alice","role":"client"}"#).await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    // Still serving, and a client's own job works.
    let mine = alice.call(Method::POST, "/v1/jobs", Some(&job("alice's", 9, "preview"))).await.unwrap();
    assert_eq!(mine["client"], "alice");
    let listed = alice.call(Method::GET, "/v1/jobs", None).await.unwrap();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 1, "a client lists only its own jobs");
    assert_eq!(farm.client.call(Method::GET, "/healthz", None).await.unwrap()["status"], "ok");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_keys_listing_and_a_batch() {
    let farm = TestFarm::start().await;
    let mut body = job("forest mirror", 21, "preview");
    body["idempotency_key"] = "order-1".into();
    let a = farm.submit(body.clone()).await;
    let r = farm.raw(Method::POST, "/v1/jobs", &body.to_string()).await;
    assert_eq!(r.status, StatusCode::OK, "a repeat of the key answers the first job");
    assert_eq!(r.json().unwrap()["id"], a["id"]);
    // The header works the same.
    let plain = hyper::body::Bytes::from(job("forest mirror", 22, "preview").to_string());
    let h = [("idempotency-key", "order-2")];
    let first = farm.client.send_with(Method::POST, "/v1/jobs", Some(plain.clone()), &h).await.unwrap();
    let second = farm.client.send_with(Method::POST, "/v1/jobs", Some(plain), &h).await.unwrap();
    assert_eq!((first.status, second.status), (StatusCode::CREATED, StatusCode::OK));
    assert_eq!(first.json().unwrap()["id"], second.json().unwrap()["id"]);

    // A batch, then the list with filters and pages.
    let batch: Vec<Value> =
        (0..5).map(|i| json!({ "prompt": "dusk", "seed": 100 + i, "tier": "final", "width": 64 })).collect();
    let made = farm.client.call(Method::POST, "/v1/jobs", Some(&Value::Array(batch))).await.unwrap();
    let ids: Vec<String> =
        made["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), 5);
    for id in &ids {
        assert_eq!(farm.wait(id).await["state"], "succeeded");
    }
    let page1 = farm.client.call(Method::GET, "/v1/jobs?tier=final&limit=3", None).await.unwrap();
    let got1: Vec<&str> = page1["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(got1.len(), 3);
    let next = page1["next"].as_str().expect("a second page");
    let page2 =
        farm.client.call(Method::GET, &format!("/v1/jobs?tier=final&limit=3&cursor={next}"), None).await.unwrap();
    let got2: Vec<&str> = page2["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    let mut all: Vec<&str> = got1.iter().chain(got2.iter()).copied().collect();
    all.reverse();
    assert_eq!(all, ids.iter().map(String::as_str).collect::<Vec<_>>(), "newest first, no gaps, no repeats");
    let previews = farm.client.call(Method::GET, "/v1/jobs?tier=preview&state=succeeded", None).await.unwrap();
    assert!(previews["jobs"].as_array().unwrap().iter().all(|j| j["tier"] == "preview"));
    let future = farm.client.call(Method::GET, "/v1/jobs?since=2100-01-01T00:00:00Z", None).await.unwrap();
    assert!(future["jobs"].as_array().unwrap().is_empty());
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tiny_job_records_its_start_with_its_result_and_keeps_every_state() {
    let farm = TestFarm::start().await;
    // 16×16, one sample: its `running` event is written with its result (one write, not two).
    let j =
        farm.submit(json!({ "prompt": "tiny start", "seed": 5, "tier": "preview", "width": 16, "height": 16 })).await;
    let id = j["id"].as_str().unwrap().to_owned();
    let mut states = Vec::new();
    farm.client
        .follow(&id, |kind, data| {
            if kind == "state" {
                states.push(data["state"].as_str().unwrap().to_owned());
            }
            true
        })
        .await
        .unwrap();
    assert_eq!(states, ["queued", "dispatched", "running", "succeeded"], "the stream ends with the job");
    let done = farm.wait(&id).await;
    let (started, finished) = (done["started_at"].as_str().unwrap(), done["finished_at"].as_str().unwrap());
    assert!(started <= finished, "it started ({started}) before it ended ({finished}): {done}");
    assert_eq!(done["attempt"], 1, "{done}");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_stream_assets_and_provenance() {
    let farm = TestFarm::start().await;
    let j = farm.submit(json!({ "prompt": "pastel quad", "seed": 4, "tier": "final", "width": 512 })).await;
    let id = j["id"].as_str().unwrap().to_owned();
    let mut states = Vec::new();
    let mut progress = 0;
    farm.client
        .follow(&id, |kind, data| {
            match kind {
                "state" => states.push(data["state"].as_str().unwrap().to_owned()),
                "progress" => progress += 1,
                _ => {}
            }
            true
        })
        .await
        .unwrap();
    assert_eq!(states, ["queued", "dispatched", "running", "succeeded"], "the stream ends with the job");
    assert!(progress >= 1, "render progress is streamed");
    let done = farm.wait(&id).await;
    let asset = done["asset"].as_str().unwrap();

    let r = farm.raw(Method::GET, &format!("/v1/assets/{asset}"), "").await;
    assert_eq!(r.headers["content-type"], "image/png");
    let etag = r.headers["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{asset}\""));
    let c = farm.client.clone();
    let not_modified = c
        .send_with(Method::GET, &format!("/v1/assets/{asset}"), None, &[("if-none-match", &etag)])
        .await
        .unwrap()
        .status;
    assert_eq!(not_modified, StatusCode::NOT_MODIFIED);
    let thumb = c.bytes(&format!("/v1/assets/{asset}?variant=thumb")).await.unwrap();
    assert!(thumb.len() < r.body.len() && thumb.starts_with(b"\x89PNG"));
    let prov = c.call(Method::GET, &format!("/v1/assets/{asset}/provenance"), None).await.unwrap();
    assert_eq!(prov["thumbnail"], blake3::hash(&thumb).to_hex().as_str());
    assert_eq!((&prov["asset"], &prov["request"]["seed"], &prov["backend"]), (&json!(asset), &json!(4), &json!("cpu")));
    // The farm keeps it in its database, not in a file beside the PNG.
    let files = kiln_worker::assets::AssetStore::open(farm.dir.path()).unwrap();
    assert!(!files.provenance_path(asset).exists(), "recorded with the asset's row");
    // One uploaded on its own (a worker answering from a store of its own) is a file, served alike.
    let (png, record) = (b"\x89PNG uploaded".to_vec(), |h: &str| json!({ "asset": h, "by": "an upload" }));
    let uploaded = blake3::hash(&png).to_hex().to_string();
    assert_eq!(c.send(Method::PUT, &format!("/v1/assets/{uploaded}"), Some(png.into())).await.unwrap().status, 204);
    let path = format!("/v1/assets/{uploaded}/provenance");
    let put = c.send(Method::PUT, &path, Some(record(&uploaded).to_string().into())).await.unwrap();
    assert_eq!(put.status, StatusCode::NO_CONTENT);
    assert!(files.provenance_path(&uploaded).is_file());
    assert_eq!(c.call(Method::GET, &path, None).await.unwrap(), record(&uploaded));
    let none = c.send(Method::GET, &format!("/v1/assets/{}/provenance", "0".repeat(64)), None).await.unwrap();
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    // An image no larger than a thumbnail is its own.
    let small = farm.submit(json!({ "prompt": "pastel quad", "seed": 4, "tier": "preview", "width": 48 })).await;
    let small = farm.wait(small["id"].as_str().unwrap()).await;
    let small = small["asset"].as_str().unwrap();
    let (full, thumb) = (
        c.bytes(&format!("/v1/assets/{small}")).await.unwrap(),
        c.bytes(&format!("/v1/assets/{small}?variant=thumb")).await.unwrap(),
    );
    assert_eq!(thumb, full);
    // A PNG that small is kept with the asset's row, not as a file, and served alike.
    assert_eq!(blake3::hash(&full).to_hex().as_str(), small);
    assert!(!files.path(small).exists() && files.thumbnail(small).is_none(), "kept with the row");
    for (variant, etag) in [("", format!("\"{small}\"")), ("?variant=thumb", format!("\"{small}.thumb\""))] {
        let path = format!("/v1/assets/{small}{variant}");
        let r = farm.raw(Method::GET, &path, "").await;
        assert_eq!(
            (r.headers["content-type"].to_str().unwrap(), r.headers["etag"].to_str().unwrap()),
            ("image/png", &*etag)
        );
        assert_eq!(r.headers["content-length"].to_str().unwrap(), full.len().to_string());
        let again = c.send_with(Method::GET, &path, None, &[("if-none-match", &etag)]).await.unwrap();
        assert_eq!(again.status, StatusCode::NOT_MODIFIED, "{path}");
    }
    let small_prov = c.call(Method::GET, &format!("/v1/assets/{small}/provenance"), None).await.unwrap();
    assert_eq!(small_prov["thumbnail"], small);
    assert_eq!(prov["asset"], asset);
    assert_eq!(prov["request"]["seed"], 4);
    assert_eq!(prov["backend"], "cpu");
    let missing = farm.raw(Method::GET, &format!("/v1/assets/{}", "0".repeat(64)), "").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let anon = farm.client_with(None).send(Method::GET, &format!("/v1/assets/{asset}"), None).await.unwrap();
    assert_eq!(anon.status, StatusCode::UNAUTHORIZED, "assets are private unless scheduler.public_assets");

    let doc = c.call(Method::GET, "/v1/openapi.json", None).await.unwrap();
    for path in [
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/cancel",
        "/v1/jobs/{id}/events",
        "/v1/assets/{hash}",
        "/v1/workers",
        "/v1/workers/{id}/resume",
        "/healthz",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "OpenAPI documents {path}");
    }
    let metrics = String::from_utf8(farm.raw(Method::GET, "/metrics", "").await.body.to_vec()).unwrap();
    for name in [
        "kiln_jobs",
        "kiln_job_queue_wait_seconds",
        "kiln_job_seconds",
        "kiln_renders_in_flight",
        "kiln_render_seconds",
    ] {
        assert!(metrics.contains(name), "/metrics has {name}");
    }
    assert_eq!(metric_in(&metrics, "kiln_jobs", "state=\"succeeded\",tier=\"final\""), 1.0);
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_leader_hands_its_render_to_an_attached_job() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.scheduler.workers = 1;
    let farm = TestFarm::start_with(dir, cfg).await;
    // Keep the one worker busy so the next jobs wait in the queue.
    let busy = farm.submit(json!({ "prompt": "busy", "seed": 1, "tier": "final", "width": 2048 })).await;
    let body = json!({ "prompt": "ember mirror", "seed": 2, "tier": "print", "width": 64 });
    let leader = farm.submit(body.clone()).await;
    let follower = farm.submit(body).await;
    assert_eq!(follower["follows"], leader["id"], "the second attaches to the first's render");
    let cancelled = farm
        .client
        .call(Method::POST, &format!("/v1/jobs/{}/cancel", leader["id"].as_str().unwrap()), None)
        .await
        .unwrap();
    assert_eq!(cancelled["state"], "cancelled");
    let f = farm.wait(follower["id"].as_str().unwrap()).await;
    assert_eq!(f["state"], "succeeded", "the attached job took over the render: {f}");
    assert_eq!(farm.wait(busy["id"].as_str().unwrap()).await["state"], "succeeded");
    let l = farm.client.call(Method::GET, &format!("/v1/jobs/{}", leader["id"].as_str().unwrap()), None).await.unwrap();
    assert_eq!(l["state"], "cancelled", "a cancelled job stays cancelled");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transient_failure_is_retried_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    // Room for many attempts, so a slow machine cannot spend them all before the fix below.
    cfg.scheduler.retry.max_attempts = 50;
    cfg.scheduler.retry.max_ms = 200;
    let farm = TestFarm::start_with(dir, cfg).await;
    // The asset store's folder becomes a file: every render fails to store (root or not).
    let assets = farm.dir.path().join("assets");
    std::fs::remove_dir_all(&assets).unwrap();
    std::fs::write(&assets, b"in the way").unwrap();
    let j = farm.submit(job("retry me", 1, "preview")).await;
    let id = j["id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = farm.client.call(Method::GET, &format!("/v1/jobs/{id}"), None).await.unwrap();
        if now["attempt"].as_u64() >= Some(1) && now["error"].is_string() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the first attempt never failed: {now}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::remove_file(&assets).unwrap();
    std::fs::create_dir(&assets).unwrap();
    let done = farm.wait(&id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(done["attempt"].as_u64().unwrap() >= 2, "it took another attempt: {done}");
    assert!(farm.metric("kiln_render_attempts_total", "outcome=\"retry\"").await >= 1.0);
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attempts_run_out_and_the_job_keeps_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.scheduler.retry.max_attempts = 2;
    let farm = TestFarm::start_with(dir, cfg).await;
    let assets = farm.dir.path().join("assets");
    std::fs::remove_dir_all(&assets).unwrap();
    std::fs::write(&assets, b"in the way").unwrap();
    let j = farm.submit(job("doomed", 1, "preview")).await;
    let done = farm.wait(j["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "failed");
    assert_eq!(done["attempt"], 2);
    assert!(done["error"].as_str().unwrap().contains("asset store"), "{done}");
    farm.stop().await;
}

/// The asset store's folder becomes a file: every render that stores a file fails (root or not).
fn block_the_asset_store(farm: &TestFarm) {
    let assets = farm.dir.path().join("assets");
    std::fs::remove_dir_all(&assets).unwrap();
    std::fs::write(&assets, b"in the way").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_fails_on_enough_in_process_workers_is_quarantined_as_on_a_distributed_farm() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.scheduler.workers = 3;
    cfg.scheduler.broker.quarantine_after_workers = 2;
    // Attempts to spare: the job is quarantined long before they run out.
    cfg.scheduler.retry.max_attempts = 50;
    cfg.scheduler.retry.max_ms = 100;
    let farm = TestFarm::start_with(dir, cfg).await;
    block_the_asset_store(&farm);
    let j = farm.submit(job("poison", 1, "preview")).await;
    let done = farm.wait(j["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "failed", "{done}");
    let error = done["error"].as_str().unwrap();
    assert!(error.starts_with("quarantined: failed on 2 distinct workers (in-process-"), "{done}");
    assert!(error.contains("asset store"), "the last error is kept: {done}");
    assert!(done["attempt"].as_u64().unwrap() < 50, "{done}");
    assert_eq!(farm.metric("kiln_jobs_quarantined_total", "").await, 1.0);
    assert_eq!(farm.metric("kiln_render_attempts_total", "outcome=\"quarantined\"").await, 1.0);
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_in_process_worker_that_fails_enough_jobs_is_drained_until_the_operator_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.scheduler.workers = 1;
    cfg.scheduler.broker.drain_after_jobs = 2;
    cfg.scheduler.retry.max_attempts = 1;
    let farm = TestFarm::start_with(dir, cfg).await;
    let workers = farm.client.call(Method::GET, "/v1/workers", None).await.unwrap();
    assert_eq!(workers["workers"][0]["worker_id"], "in-process-0", "{workers}");
    assert_eq!(workers["workers"][0]["state"], "active", "{workers}");
    block_the_asset_store(&farm);
    for seed in [1, 2] {
        let j = farm.submit(job("bad disk", seed, "preview")).await;
        assert_eq!(farm.wait(j["id"].as_str().unwrap()).await["state"], "failed");
    }
    let workers = farm.client.call(Method::GET, "/v1/workers", None).await.unwrap();
    let w = &workers["workers"][0];
    assert_eq!(w["state"], "drained", "{workers}");
    assert!(w["drained_reason"].as_str().unwrap().starts_with("failed 2 distinct jobs"), "{workers}");
    assert_eq!(workers["drained"][0]["worker_id"], "in-process-0", "{workers}");
    assert_eq!(farm.metric("kiln_workers", "state=\"drained\"").await, 1.0);
    // The disk is mended, but a drained worker takes nothing until it is resumed.
    let assets = farm.dir.path().join("assets");
    std::fs::remove_file(&assets).unwrap();
    std::fs::create_dir(&assets).unwrap();
    let j = farm.submit(job("waits", 3, "preview")).await;
    let id = j["id"].as_str().unwrap();
    let waited = farm.client.call(Method::GET, &format!("/v1/jobs/{id}?wait=1"), None).await.unwrap();
    assert!(!waited["state"].as_str().unwrap().parse::<kiln_protocol::JobState>().unwrap().is_terminal(), "{waited}");
    let r = farm.client.call(Method::POST, "/v1/workers/in-process-0/resume", None).await.unwrap();
    assert_eq!(r["state"], "resumed");
    assert_eq!(farm.wait(id).await["state"], "succeeded");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn assets_can_be_public_by_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.scheduler.public_assets = true;
    let farm = TestFarm::start_with(dir, cfg).await;
    let j = farm.submit(job("mono", 1, "preview")).await;
    let asset = farm.wait(j["id"].as_str().unwrap()).await["asset"].as_str().unwrap().to_owned();
    let anon = farm.client_with(None);
    let png = anon.bytes(&format!("/v1/assets/{asset}")).await.unwrap();
    assert_eq!(blake3::hash(&png).to_hex().as_str(), asset);
    let r = anon.send(Method::GET, &format!("/v1/jobs/{}", j["id"].as_str().unwrap()), None).await.unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "jobs still need a token");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_uploaded_asset_is_streamed_checked_against_its_hash_and_limited() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.scheduler.limits.max_asset_bytes = 3 << 20;
    let farm = TestFarm::start_with(dir, cfg).await;
    let scratch = tempfile::tempdir().unwrap();
    // 2 MiB of bytes that do not repeat, uploaded from a file in many chunks.
    let mut bytes = Vec::with_capacity(2 << 20);
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    while bytes.len() < 2 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    let file = scratch.path().join("big.bin");
    std::fs::write(&file, &bytes).unwrap();
    let hash = blake3::hash(&bytes).to_hex().to_string();
    let path = format!("/v1/assets/{hash}");
    // Under the wrong hash: refused, nothing stored.
    let wrong = format!("/v1/assets/{}", "ab".repeat(32));
    let r = farm.client.put_file(&wrong, &file).await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("do not hash"));
    assert_eq!(farm.raw(Method::GET, &wrong, "").await.status, StatusCode::NOT_FOUND);
    // A client may not upload: answered from the request head (and a body this small read and
    // dropped behind the answer; see hostile.rs for one never sent).
    let client = farm.client.call(Method::POST, "/v1/tokens", Some(&json!({"name": "c", "role": "client"}))).await;
    let as_client = farm.client_with(client.unwrap()["token"].as_str());
    let small = scratch.path().join("small.bin");
    std::fs::write(&small, &bytes[..1000]).unwrap();
    assert_eq!(as_client.put_file(&path, &small).await.unwrap().status, StatusCode::FORBIDDEN);
    // Under its hash: stored, and it downloads intact.
    let r = farm.client.put_file(&path, &file).await.unwrap();
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(farm.client.bytes(&path).await.unwrap().as_ref(), &bytes[..]);
    // Over the limit: 413, and nothing stored.
    bytes.extend_from_slice(&bytes.clone());
    std::fs::write(&file, &bytes).unwrap();
    let big = format!("/v1/assets/{}", blake3::hash(&bytes).to_hex());
    let r = farm.client.put_file(&big, &file).await.unwrap();
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(farm.raw(Method::GET, &big, "").await.status, StatusCode::NOT_FOUND);
    // No scratch file is left behind.
    let left: Vec<_> = std::fs::read_dir(farm.dir.path().join("tmp")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_deletes_old_jobs_and_the_assets_nothing_names_any_more() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.scheduler.retention.jobs_days = 60;
    cfg.scheduler.retention.assets_days = 30;
    let farm = TestFarm::start_with(dir, cfg).await;
    let j = farm.submit(job("kept a while", 70, "preview")).await;
    let id = j["id"].as_str().unwrap().to_owned();
    let asset = farm.wait(&id).await["asset"].as_str().unwrap().to_owned();
    // An upload no job or task names (an operator's, say).
    let orphan = b"\x89PNG nobody's".to_vec();
    let orphan_hash = blake3::hash(&orphan).to_hex().to_string();
    let put = farm.client.send(Method::PUT, &format!("/v1/assets/{orphan_hash}"), Some(orphan.into())).await.unwrap();
    assert_eq!(put.status, StatusCode::NO_CONTENT);
    let files = kiln_worker::assets::AssetStore::open(farm.dir.path()).unwrap();
    assert!(files.contains(&asset) && files.contains(&orphan_hash));
    let day = 24 * 3600 * 1000;
    // A month on: the orphan goes; the job, and so its asset, stay.
    let now = kiln_protocol::now_ms();
    let r = kiln_scheduler::retention::prune(&farm.sched, now + 31 * day).await.unwrap();
    assert_eq!((r.jobs, r.assets), (0, 1), "{r:?}");
    assert!(!files.contains(&orphan_hash) && files.contains(&asset));
    assert_eq!(
        farm.client.bytes(&format!("/v1/assets/{asset}")).await.unwrap().len() as u64,
        std::fs::metadata(files.path(&asset)).unwrap().len()
    );
    // Two months on: the job goes, and its asset with it, files and all.
    let r = kiln_scheduler::retention::prune(&farm.sched, now + 61 * day).await.unwrap();
    assert_eq!((r.jobs, r.assets), (1, 1), "{r:?}");
    assert_eq!(farm.raw(Method::GET, &format!("/v1/jobs/{id}"), "").await.status, StatusCode::NOT_FOUND);
    assert_eq!(farm.raw(Method::GET, &format!("/v1/assets/{asset}"), "").await.status, StatusCode::NOT_FOUND);
    assert!(!files.contains(&asset) && !files.thumb_path(&asset).exists());
    // The same request again renders anew, and is served.
    let again = farm.submit(job("kept a while", 70, "preview")).await;
    let again = farm.wait(again["id"].as_str().unwrap()).await;
    assert_eq!((again["state"].as_str(), again["asset"].as_str()), (Some("succeeded"), Some(asset.as_str())));
    assert!(files.contains(&asset));
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_over_its_budget_gets_429_and_nothing_of_it_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    // A second of a final render weighs 1000: any render passes a budget of a second, and the
    // first is estimated at half of it (nothing rendered yet to go by).
    cfg.scheduler.costs.final_weight = 1000.0;
    cfg.scheduler.costs.first_estimate_seconds = 0.0005;
    let farm = TestFarm::start_with(dir, cfg).await;
    for (body, field) in [
        (json!({ "name": "w", "role": "worker", "budget_seconds": 5 }), "budget_seconds"),
        (json!({ "name": "c", "role": "client", "budget_seconds": 0 }), "budget_seconds"),
        (json!({ "name": "c", "role": "client", "budget_seconds": 5, "budget_period": "fortnight" }), "budget_period"),
        (json!({ "name": "c", "role": "client", "budget_period": "day" }), "budget_period"),
    ] {
        let r = farm.raw(Method::POST, "/v1/tokens", &body.to_string()).await;
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!((r.status, &v["error"]["field"]), (StatusCode::BAD_REQUEST, &json!(field)), "{body}: {v}");
    }
    let made = farm
        .client
        .call(Method::POST, "/v1/tokens", Some(&json!({ "name": "tight", "role": "client", "budget_seconds": 1 })))
        .await
        .unwrap();
    assert_eq!((made["budget_seconds"].as_u64(), made["budget_period"].as_str()), (Some(1), Some("day")), "{made}");
    let tight = farm.client_with(made["token"].as_str());

    // The first render fits; what it took is charged.
    let first = json!({ "prompt": "ember field", "seed": 1, "tier": "final", "width": 256, "samples": 2 });
    let one = tight.call(Method::POST, "/v1/jobs?wait=60", Some(&first)).await.unwrap();
    assert_eq!(one["state"], "succeeded", "{one}");
    let usage = tight.call(Method::GET, "/v1/usage", None).await.unwrap();
    let day = &usage["days"][0];
    assert_eq!(
        (day["client"].as_str(), day["tier"].as_str(), day["renders"].as_u64()),
        (Some("tight"), Some("final"), Some(1)),
        "{usage:#}"
    );
    let (device, cost) = (day["device_seconds"].as_f64().unwrap(), day["cost_seconds"].as_f64().unwrap());
    assert!(device > 0.0 && (cost - device * 1000.0).abs() < 1.0, "{usage:#}");
    let budget = &usage["budgets"][0];
    assert_eq!((budget["client"].as_str(), budget["used_seconds"].as_f64()), (Some("tight"), Some(cost)), "{usage:#}");

    // Past it: a new render, a batch with one, and an order are refused whole, saying why.
    let second = json!({ "prompt": "ember field", "seed": 2, "tier": "final", "width": 256, "samples": 2 });
    for (path, body) in [
        ("/v1/jobs", second.clone()),
        ("/v1/jobs", json!([first, second])),
        ("/v1/orders", json!({ "plan": "gallery-print", "prompt": "ember field", "seeds": [7, 8] })),
    ] {
        let r = tight.send(Method::POST, path, Some(body.to_string().into())).await.unwrap();
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{path} {body}: {v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert_eq!(v["error"]["field"], "budget", "{v}");
        for says in ["1 device-seconds a day", "has used", "resets at 20"] {
            assert!(m.contains(says), "{m:?} does not say {says:?}");
        }
    }
    let jobs = tight.call(Method::GET, "/v1/jobs", None).await.unwrap();
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 1, "nothing of a refusal was queued: {jobs:#}");
    let orders = tight.call(Method::GET, "/v1/orders", None).await.unwrap();
    assert_eq!(orders["orders"].as_array().unwrap().len(), 0, "{orders:#}");
    // A repeat costs nothing: the cache answers it.
    let again = tight.call(Method::POST, "/v1/jobs", Some(&first)).await.unwrap();
    assert_eq!((again["state"].as_str(), &again["asset"]), (Some("cached"), &one["asset"]));
    // The operator has no budget, and sees every token's use.
    farm.submit(second).await;
    let all = farm.client.call(Method::GET, "/v1/usage", None).await.unwrap();
    assert!(all["budgets"].as_array().unwrap().iter().any(|b| b["client"] == "tight"), "{all:#}");
    let r = tight.send(Method::GET, "/v1/usage?client=operator", None).await.unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN, "a client sees its own use only");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_runs_a_plan_written_in_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        "[[plans]]\nname = \"pick-final\"\n\
         [[plans.steps]]\nname = \"look\"\nkind = \"render\"\ntier = \"preview\"\n\
         [[plans.steps]]\nname = \"pick\"\nkind = \"approve\"\n\
         [[plans.steps]]\nname = \"keep\"\nkind = \"render\"\ntier = \"final\"\nchosen = true\n",
    )
    .unwrap();
    let cfg = kiln_scheduler::config::FarmConfig::load_with(Some(&config), &|_| None).unwrap();
    let mut base = test_config(dir.path());
    base.scheduler.plans = cfg.scheduler.plans;
    for (spec, side) in [(&mut base.worker.tiers.preview, 48), (&mut base.worker.tiers.r#final, 64)] {
        (spec.default_side, spec.default_samples) = (side, 1);
    }
    let farm = TestFarm::start_with(dir, base).await;
    let unknown = farm.raw(Method::POST, "/v1/orders", r#"{"plan":"nope","prompt":"p","seeds":[1]}"#).await;
    let v: Value = serde_json::from_slice(&unknown.body).unwrap();
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.starts_with("plan: ") && m.contains("gallery-print, pick-final"), "{m}");

    let body = json!({ "plan": "pick-final", "prompt": "salt flats", "seeds": [11, 12] });
    // What it would cost, first, placing nothing: two previews and one final render.
    let est = farm.client.call(Method::POST, "/v1/orders?dry_run=true", Some(&body)).await.unwrap();
    assert_eq!((est["plan"].as_str(), est["renders"].as_u64()), (Some("pick-final"), Some(3)), "{est}");
    assert!(est["estimated_cost_ms"].as_i64() > Some(0), "{est}");
    let none = farm.client.call(Method::GET, "/v1/orders", None).await.unwrap();
    assert_eq!(none["orders"].as_array().unwrap().len(), 0, "a dry run places nothing");
    let placed = farm.client.call(Method::POST, "/v1/orders", Some(&body)).await.unwrap();
    let id = placed["id"].as_str().unwrap();
    let names: Vec<&str> = placed["steps"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["look", "pick", "keep"]);
    let order = |state: &'static str| {
        let farm = &farm;
        async move {
            for _ in 0..600 {
                let o = farm.client.call(Method::GET, &format!("/v1/orders/{id}"), None).await.unwrap();
                if o["state"] == state {
                    return o;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("order {id} never {state}");
        }
    };
    order("awaiting_approval").await;
    let decided = farm
        .client
        .call(Method::POST, &format!("/v1/approvals/{id}.pick"), Some(&json!({ "decision": "approve", "option": 2 })))
        .await
        .unwrap();
    assert_eq!(decided["approval"]["state"], "approved", "{decided:#}");
    let o = order("succeeded").await;
    let keep = &o["steps"][2];
    let job = farm.wait(keep["jobs"][0].as_str().unwrap()).await;
    assert_eq!((job["seed"].as_u64(), job["tier"].as_str()), (Some(12), Some("final")), "{job:#}");
    farm.stop().await;
}
