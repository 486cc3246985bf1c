//! The farm's doors tried from outside, the way a careless or hostile client would: each
//! refusal is exact (the status, and the field it names), and the farm goes on serving ordinary
//! jobs meanwhile. The broker's doors (forged and refused results, dead-lettered jobs) are tried
//! in `distributed.rs`, beside the farm they need.

mod common;

use common::{TestFarm, job};
use hyper::Method;
use serde_json::Value;

/// A raw call's status and JSON body.
async fn call(farm: &TestFarm, method: Method, path: &str, body: &str) -> (u16, Value) {
    let reply = farm.raw(method, path, body).await;
    let v = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    (reply.status.as_u16(), v)
}

/// The farm still takes and renders an ordinary job.
async fn still_serving(farm: &TestFarm, seed: u64) {
    let j = farm.submit(job("still serving", seed, "preview")).await;
    let done = farm.wait(j["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "succeeded", "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_any_string_of_a_body_is_refused_naming_where_it_is() {
    let farm = TestFarm::start().await;
    let cases = [
        ("/v1/jobs", r#"{"prompt":"a kiln\u0000","seed":1,"tier":"preview"}"#, "prompt"),
        ("/v1/jobs", r#"{"jobs":[{"prompt":"ok","seed":1},{"prompt":"ok","model":"cppn\u0000"}]}"#, "jobs[1].model"),
        ("/v1/jobs", r#"{"prompt":"ok","seed":1,"idempotency_key":"k\u0000"}"#, "idempotency_key"),
        ("/v1/tokens", r#"{"name":"evil\u0000","role":"client"}"#, "name"),
    ];
    for (path, body, field) in cases {
        let (status, v) = call(&farm, Method::POST, path, body).await;
        assert_eq!(status, 400, "{path} {body}: {v}");
        assert_eq!(v["error"]["field"], field, "{path} {body}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert_eq!(message, format!("{field}: holds a NUL character, which Kiln does not store"));
    }
    let (_, listed) = call(&farm, Method::GET, "/v1/jobs", "").await;
    assert_eq!(listed["jobs"].as_array().map(Vec::len), Some(0), "nothing was admitted: {listed}");
    still_serving(&farm, 1).await;
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multibyte_character_in_a_query_is_a_clear_refusal_not_a_dropped_connection() {
    let farm = TestFarm::start().await;
    for since in ["%E2%82%AC", "2026-11-2%E2%82%ACT10:00:00Z", "2026-11-22T10:00:00%C3%A9", "%C7%85"] {
        let (status, v) = call(&farm, Method::GET, &format!("/v1/jobs?since={since}"), "").await;
        assert_eq!((status, &v["error"]["field"]), (400, &Value::from("since")), "{since}: {v}");
    }
    for (query, field) in [("state=%E2%82%AC", "state"), ("tier=pr%C3%A9view", "tier"), ("until=%F0%9F%94%A5", "until")]
    {
        let (status, v) = call(&farm, Method::GET, &format!("/v1/jobs?{query}"), "").await;
        assert_eq!(status, 400, "{query}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().starts_with(field), "{query}: {v}");
    }
    still_serving(&farm, 2).await;
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_serves_devices_only_as_a_device_token_and_each_device_once() {
    let farm = TestFarm::start().await;
    let cases = [
        (r#"{"name":"c","role":"client","devices":["printer-1"]}"#, 400, "devices"),
        (r#"{"name":"d","role":"device","devices":["ok","a/b"]}"#, 400, "devices[1]"),
        (r#"{"name":"d","role":"device","devices":["p","p"]}"#, 400, "devices[1]"),
        (r#"{"name":"d","role":"device","devices":["kiln/#"]}"#, 400, "devices[0]"),
    ];
    for (body, status, field) in cases {
        let (got, v) = call(&farm, Method::POST, "/v1/tokens", body).await;
        assert_eq!((got, &v["error"]["field"]), (status, &Value::from(field)), "{body}: {v}");
    }
    let (got, v) =
        call(&farm, Method::POST, "/v1/tokens", r#"{"name":"pi-1","role":"device","devices":["p1","c1"]}"#).await;
    assert_eq!((got, &v["devices"]), (201, &serde_json::json!(["p1", "c1"])), "{v}");
    let (got, v) = call(&farm, Method::POST, "/v1/tokens", r#"{"name":"pi-2","role":"device","devices":["c1"]}"#).await;
    assert_eq!(got, 409, "{v}");
    assert_eq!(v["error"]["message"], "devices: \"c1\" is served by the token \"pi-1\" already");
    still_serving(&farm, 2).await;
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expires_on_time_and_a_revoked_one_is_refused_at_once() {
    let farm = TestFarm::start().await;
    let (status, v) =
        call(&farm, Method::POST, "/v1/tokens", r#"{"name":"brief","role":"client","expires_in_seconds":0}"#).await;
    assert_eq!((status, &v["error"]["field"]), (400, &Value::from("expires_in_seconds")), "{v}");
    let (status, brief) =
        call(&farm, Method::POST, "/v1/tokens", r#"{"name":"brief","role":"client","expires_in_seconds":1}"#).await;
    assert_eq!(status, 201, "{brief}");
    let (status, lasting) = call(&farm, Method::POST, "/v1/tokens", r#"{"name":"lasting","role":"client"}"#).await;
    assert_eq!(status, 201, "{lasting}");
    let as_caller = |v: &Value| farm.client_with(Some(v["token"].as_str().unwrap()));
    as_caller(&brief).call(Method::GET, "/v1/jobs", None).await.expect("a fresh token works");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let e = as_caller(&brief).call(Method::GET, "/v1/jobs", None).await.unwrap_err();
    assert!(e.to_string().contains("unknown, revoked or expired token"), "{e}");
    let (_, list) = call(&farm, Method::GET, "/v1/tokens", "").await;
    let expired: Vec<(&str, bool)> = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["expired"] == true))
        .collect();
    assert_eq!(expired, [("operator", false), ("brief", true), ("lasting", false)], "{list}");
    assert!(!list.to_string().contains("kiln_"), "no secret is listed: {list}");

    // Revoked with the CLI: refused at once; the name is free again.
    let out = common::kiln()
        .args(["token", "revoke", "lasting", "--server", &farm.url, "--token", &farm.token])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e = as_caller(&lasting).call(Method::GET, "/v1/jobs", None).await.unwrap_err();
    assert!(e.to_string().contains("401"), "{e}");
    let (status, v) = call(&farm, Method::DELETE, "/v1/tokens/lasting", "").await;
    assert_eq!((status, &v["error"]["code"]), (404, &Value::from("not_found")), "{v}");
    let (status, _) = call(&farm, Method::POST, "/v1/tokens", r#"{"name":"lasting","role":"client"}"#).await;
    assert_eq!(status, 201);
    still_serving(&farm, 3).await;
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_holding_every_connection_are_cut_off_and_the_farm_serves_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::test_config(dir.path());
    cfg.scheduler.limits.header_read_timeout_seconds = 1;
    cfg.scheduler.limits.max_connections = 4;
    let farm = TestFarm::start_with(dir, cfg).await;
    let addr = farm.url.trim_start_matches("http://").to_owned();
    // Every connection the farm will serve, each with half a request head and then silence.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET /v1/jobs HTTP/1.1\r\nHost: kiln\r\n").await.unwrap();
        slow.push(c);
    }
    // An ordinary call waits its turn, and is answered once the slow ones are cut off.
    let started = std::time::Instant::now();
    let (status, _) = call(&farm, Method::GET, "/v1/jobs", "").await;
    assert_eq!(status, 200);
    let waited = started.elapsed();
    assert!(waited < std::time::Duration::from_secs(5), "answered after {waited:?}");
    for mut c in slow {
        let mut buf = [0u8; 512];
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), c.read(&mut buf)).await;
        match read {
            Ok(Ok(n)) => {
                assert!(n == 0 || buf[..n].starts_with(b"HTTP/1.1 408"), "{:?}", String::from_utf8_lossy(&buf[..n]))
            }
            Ok(Err(_)) => {} // reset
            Err(_) => panic!("a slow client still holds its connection after 5 s"),
        }
    }
    still_serving(&farm, 4).await;
    farm.stop().await;
}
