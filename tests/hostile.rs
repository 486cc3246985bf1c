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

/// A token of `role` made by the operator, and a client holding it.
async fn token_of(farm: &TestFarm, name: &str, role: &str) -> (String, kiln_common::client::Client) {
    let body = serde_json::json!({"name": name, "role": role});
    let made = farm.client.call(Method::POST, "/v1/tokens", Some(&body)).await.unwrap();
    let secret = made["token"].as_str().unwrap().to_owned();
    let client = farm.client_with(Some(&secret));
    (secret, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sees_only_its_own_jobs_assets_and_never_the_fleet() {
    let farm = TestFarm::start().await;
    let (_, alice) = token_of(&farm, "alice", "client").await;
    let (_, bob) = token_of(&farm, "bob", "client").await;
    let (_, worker) = token_of(&farm, "w", "worker").await;
    let body = job("alice's piece", 31, "preview").to_string();
    let made = alice.send(Method::POST, "/v1/jobs?wait=30", Some(body.clone().into())).await.unwrap();
    let done = made.json().unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");
    let asset = done["asset"].as_str().unwrap().to_owned();
    let parts = [
        format!("/v1/assets/{asset}"),
        format!("/v1/assets/{asset}?variant=thumb"),
        format!("/v1/assets/{asset}/provenance"),
    ];
    for path in &parts {
        assert_eq!(alice.send(Method::GET, path, None).await.unwrap().status, 200, "{path}");
        let r = bob.send(Method::GET, path, None).await.unwrap();
        let v = r.json().unwrap_or(Value::Null);
        assert_eq!((r.status.as_u16(), &v["error"]["code"]), (404, &Value::from("not_found")), "{path}: {v}");
        let r = worker.send(Method::GET, path, None).await.unwrap();
        assert_eq!(r.status, 403, "{path}: a worker token reads no assets");
        assert_eq!(farm.client.send(Method::GET, path, None).await.unwrap().status, 200, "{path}: the operator");
    }
    let id = done["id"].as_str().unwrap();
    assert_eq!(bob.send(Method::GET, &format!("/v1/jobs/{id}"), None).await.unwrap().status, 404);
    // Asking for the same piece makes it Bob's too: his job is answered from the cache.
    let same = bob.send(Method::POST, "/v1/jobs", Some(body.into())).await.unwrap().json().unwrap();
    assert_eq!(same["state"], "cached", "{same}");
    for path in &parts {
        assert_eq!(bob.send(Method::GET, path, None).await.unwrap().status, 200, "{path}");
    }
    // The fleet is the operator's.
    for path in ["/v1/devices", "/v1/devices/lights", "/v1/tasks", "/v1/tasks/t1"] {
        let r = alice.send(Method::GET, path, None).await.unwrap();
        assert_eq!(r.status, 403, "{path}: {:?}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(farm.client.send(Method::GET, "/v1/devices", None).await.unwrap().status, 200);
    still_serving(&farm, 32).await;
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_from_a_caller_who_may_not_upload_is_refused_before_its_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let farm = TestFarm::start().await;
    let (client_token, _) = token_of(&farm, "carol", "client").await;
    let (worker_token, _) = token_of(&farm, "w", "worker").await;
    let addr = farm.url.trim_start_matches("http://").to_owned();
    let hash = "ab".repeat(32);
    // A gigabyte announced and never sent: the refusal comes at once, from the head alone.
    let cases = [
        (None, "", 401, "authorization"),
        (Some(client_token.as_str()), "", 403, ""),
        (None, "Expect: 100-continue\r\n", 401, "authorization"),
        (Some(worker_token.as_str()), "", 400, "job"),
    ];
    for (token, extra, status, field) in cases {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let head = format!(
            "PUT /v1/assets/{hash} HTTP/1.1\r\nHost: kiln\r\n{auth}{extra}Content-Length: {}\r\n\r\n",
            1u64 << 30
        );
        c.write_all(head.as_bytes()).await.unwrap();
        if status == 400 {
            // An uploader naming no job hears why once it has sent its body, not before: send a little.
            c.write_all(&[0u8; 1024]).await.unwrap();
            c.shutdown().await.unwrap();
        }
        let mut got = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let mut buf = [0u8; 4096];
            loop {
                let n = c.read(&mut buf).await.unwrap_or(0);
                got.extend_from_slice(&buf[..n]);
                if n == 0 || got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") {
                    break;
                }
            }
        });
        read.await.unwrap_or_else(|_| panic!("{token:?} {extra:?}: no answer without the body"));
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(text.starts_with(&format!("HTTP/1.1 {status}")), "{token:?} {extra:?}: {text}");
        if status != 400 {
            assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
        }
        if !field.is_empty() {
            assert!(text.contains(&format!("\"field\":\"{field}\"")), "{text}");
        }
    }
    still_serving(&farm, 33).await;
    farm.stop().await;
}

/// Reads what a raw connection is answered, up to its close or 10 s.
async fn answer(c: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = c.read(&mut buf).await {
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_body_trickles_is_cut_off_and_event_streams_per_token_are_capped() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::test_config(dir.path());
    cfg.scheduler.limits.request_timeout_seconds = 1;
    cfg.scheduler.limits.max_event_streams_per_token = 2;
    // No worker takes prints: a print job waits, and its event stream stays open.
    cfg.scheduler.worker_tiers = vec![kiln_protocol::Tier::Preview];
    let farm = TestFarm::start_with(dir, cfg).await;
    let addr = farm.url.trim_start_matches("http://").to_owned();
    let token = common::operator_token(farm.dir.path());
    // A body promised and sent a few bytes at a time, never whole.
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {token}\r\nContent-Length: 200\r\n\r\n{{\"prompt\""
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let text = answer(&mut c).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("scheduler.limits.request_timeout_seconds"), "{text}");

    let waiting = farm.submit(job("a print nobody takes", 34, "print")).await;
    let path = format!("/v1/jobs/{}/events", waiting["id"].as_str().unwrap());
    let open = |addr: String, token: String, path: String| async move {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!("GET {path} HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {token}\r\n\r\n");
        c.write_all(head.as_bytes()).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = tokio::io::AsyncReadExt::read(&mut c, &mut buf).await.unwrap();
        (c, String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let (first, a) = open(addr.clone(), token.clone(), path.clone()).await;
    let (_second, b) = open(addr.clone(), token.clone(), path.clone()).await;
    assert!(a.starts_with("HTTP/1.1 200") && b.starts_with("HTTP/1.1 200"), "{a}\n{b}");
    // The stream outlives the request timeout.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (_, third) = open(addr.clone(), token.clone(), path.clone()).await;
    assert!(third.starts_with("HTTP/1.1 429"), "{third}");
    assert!(third.contains("max_event_streams_per_token"), "{third}");
    // Another token has streams of its own.
    let (alice, _) = token_of(&farm, "alice", "client").await;
    let mine =
        farm.client_with(Some(&alice)).call(Method::POST, "/v1/jobs", Some(&job("alice waits", 35, "print"))).await;
    let mine = format!("/v1/jobs/{}/events", mine.unwrap()["id"].as_str().unwrap());
    let (_theirs, other) = open(addr.clone(), alice, mine).await;
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");
    // A stream closed gives its place back (once the server notices, at its next keep-alive).
    drop(first);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        let (_c, again) = open(addr.clone(), token.clone(), path.clone()).await;
        if again.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the closed stream's place never came back: {again}");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    still_serving(&farm, 36).await;
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_https_with_its_certificate_and_nothing_in_the_clear() {
    use tokio::io::AsyncWriteExt;
    let certs = tempfile::tempdir().unwrap();
    let Some(files) = kiln_testenv::tls_files(certs.path()) else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::test_config(dir.path());
    cfg.scheduler.tls.cert_file = Some(files.cert.clone());
    cfg.scheduler.tls.key_file = Some(files.key.clone());
    cfg.scheduler.tls.ca_file = Some(files.ca.clone());
    let farm = TestFarm::start_with(dir, cfg).await;
    assert!(farm.url.starts_with("https://"), "{}", farm.url);
    // A job end to end over TLS, its PNG with it.
    still_serving(&farm, 37).await;
    // In the clear, the port answers no HTTP.
    let mut c = tokio::net::TcpStream::connect(farm.url.trim_start_matches("https://")).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: kiln\r\n\r\n").await.unwrap();
    let text = answer(&mut c).await;
    assert!(!text.starts_with("HTTP/"), "{text}");
    // The command line trusts the farm's CA only when told of it.
    let list = |ca: Option<&std::path::Path>| {
        let mut cmd = common::kiln();
        cmd.args(["jobs", "--server", &farm.url]).env("KILN_TOKEN", &farm.token).env_remove("KILN_TLS_CA_FILE");
        if let Some(ca) = ca {
            cmd.env("KILN_TLS_CA_FILE", ca);
        }
        cmd.output().unwrap()
    };
    let refused = list(None);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && said.contains("certificate"), "{said}");
    let listed = list(Some(&files.ca));
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    farm.stop().await;
}
