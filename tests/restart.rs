//! `kiln up` as a process: killed with jobs queued and running, started again, every job ends
//! `succeeded` and none twice; the operator token file; and the CLI against it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use kiln_common::client::Client;
use kiln_scheduler::auth::Secret;
use serde_json::{Value, json};

async fn job_now(c: &Client, id: &str) -> Value {
    c.call(Method::GET, &format!("/v1/jobs/{id}"), None).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_farm_resumes_every_job_and_finishes_none_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // One worker on one thread, and renders big enough to be caught in the act.
    let (mut child, url) = spawn_up(&data, &["--workers", "1"]);
    let mut c = Client::new(&url, Some(Secret::new(operator_token(&data))));
    // A small render's PNG, kept with its asset's row, outlives the kill as a file would.
    let tiny = json!({ "prompt": "kill test", "seed": 99, "tier": "preview", "width": 16 });
    let tiny = c.call(Method::POST, "/v1/jobs?wait=60", Some(&tiny)).await.unwrap();
    assert_eq!(tiny["state"], "succeeded", "{tiny}");
    let tiny = tiny["asset"].as_str().unwrap().to_owned();
    let mut ids = Vec::new();
    for seed in 0..6 {
        let body = json!({ "prompt": "kill test", "seed": seed, "tier": "final", "width": 1024, "samples": 2 });
        ids.push(c.call(Method::POST, "/v1/jobs", Some(&body)).await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let first = job_now(&c, &ids[0]).await;
        if first["state"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "the first job never started: {first}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before: Vec<String> = {
        let mut v = Vec::new();
        for id in &ids {
            v.push(job_now(&c, id).await["state"].as_str().unwrap().to_owned());
        }
        v
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(before.iter().any(|s| s == "running"), "{before:?}");
    assert!(before.iter().any(|s| s == "queued" || s == "dispatched"), "{before:?}");

    let (mut child, url) = spawn_up(&data, &["--workers", "2"]);
    c = Client::new(&url, Some(Secret::new(operator_token(&data))));
    let mut assets = std::collections::BTreeSet::new();
    for id in &ids {
        let j = c.call(Method::GET, &format!("/v1/jobs/{id}?wait=60"), None).await.unwrap();
        assert_eq!(j["state"], "succeeded", "{j}");
        assets.insert(j["asset"].as_str().unwrap().to_owned());
        // The log: exactly one `succeeded`, and a resume for each job that was in hand.
        let mut states = Vec::new();
        c.follow(id, |kind, d| {
            if kind == "state" {
                states.push(d["state"].as_str().unwrap().to_owned());
            }
            true
        })
        .await
        .unwrap();
        assert_eq!(states.iter().filter(|s| *s == "succeeded").count(), 1, "{id}: {states:?}");
        assert_eq!(states.last().map(String::as_str), Some("succeeded"));
    }
    assert_eq!(assets.len(), ids.len(), "six seeds, six assets");
    let png = c.bytes(&format!("/v1/assets/{tiny}")).await.unwrap();
    assert_eq!(blake3::hash(&png).to_hex().as_str(), tiny, "the small PNG after the restart");
    let all = c.call(Method::GET, "/v1/jobs?limit=100", None).await.unwrap();
    assert_eq!(all["jobs"].as_array().unwrap().len(), ids.len() + 1, "no job was duplicated (six and the small one)");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_submits_waits_and_fetches_and_the_token_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut child, _url) = spawn_up(&data, &[]);
    let token_file = data.join("operator.token");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let out = dir.path().join("art.png");
    // The CLI finds the server and the token from the data dir.
    let run = kiln()
        .args(["submit", "ember kaleidoscope", "--seed", "7", "--tier", "preview", "--json", "--out"])
        .arg(&out)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let job: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(job["state"], "succeeded");
    let png = std::fs::read(&out).unwrap();
    assert_eq!(blake3::hash(&png).to_hex().as_str(), job["asset"].as_str().unwrap());

    // A run of seeds in one request: seed 7 again (from the cache), 8 and 9, each PNG fetched.
    let many = dir.path().join("seeds");
    let run = kiln()
        .args(["submit", "ember kaleidoscope", "--seed", "7", "--count", "3", "--json", "--out"])
        .arg(&many)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let batch: Value = serde_json::from_slice(&run.stdout).unwrap();
    let got: Vec<(u64, &str)> = batch["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["seed"].as_u64().unwrap(), j["state"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [(7, "cached"), (8, "succeeded"), (9, "succeeded")]);
    for j in batch["jobs"].as_array().unwrap() {
        let png = std::fs::read(many.join(format!("{}.png", j["seed"]))).unwrap();
        assert_eq!(blake3::hash(&png).to_hex().as_str(), j["asset"].as_str().unwrap());
    }
    let refused = kiln()
        .args(["submit", "x", "--count", "2", "--idempotency-key", "k", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--idempotency-key"));

    let listed = kiln().args(["jobs", "--data"]).arg(&data).output().unwrap();
    assert!(listed.status.success());
    assert!(String::from_utf8_lossy(&listed.stdout).contains(job["id"].as_str().unwrap()));
    let list = |filters: &[&str]| {
        let out = kiln().arg("jobs").args(filters).arg("--data").arg(&data).output().unwrap();
        assert!(out.status.success(), "kiln jobs {filters:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let cached = list(&["--state", "cached", "--tier", "preview"]);
    assert!(cached.contains(batch["jobs"][0]["id"].as_str().unwrap()), "{cached}");
    assert!(!cached.contains(job["id"].as_str().unwrap()), "the filters reach the API: {cached}");
    assert_eq!(list(&["--tier", "print"]).trim(), "no jobs");
    let shown = kiln().args(["job", job["id"].as_str().unwrap(), "--data-dir"]).arg(&data).output().unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("succeeded") && text.contains("running"), "{text}");
    let bad = kiln().args(["job", "nope", "--data-dir"]).arg(&data).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no job"), "{}", String::from_utf8_lossy(&bad.stderr));

    // SIGTERM drains and exits cleanly; a restart keeps the token.
    let token = operator_token(&data);
    let term = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "kiln up exits 0 after SIGTERM: {status:?}");
    assert!(!data.join("api.url").exists(), "a clean stop removes api.url");
    let (mut child, _url) = spawn_up(&data, &[]);
    assert_eq!(operator_token(&data), token);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_bad_config_fails_naming_the_key_before_binding_a_port() {
    let dir = tempfile::tempdir().unwrap();
    let out = kiln()
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("KILN_WORKERS", "lots")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("KILN_WORKERS"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dir.path().join("kiln.db").exists(), "nothing was started");
}

/// A studio's `kiln up` on a headless box (no display session, default logging), stopped
/// cleanly once its simulated devices are online, writes no error: not libwayland's about
/// `XDG_RUNTIME_DIR` (Mesa's Vulkan device-select layer looking for a display), nor the
/// embedded broker's about clients that disconnected cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_of_a_headless_studio_logs_no_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("stderr.log");
    let mut cmd = kiln();
    // The backend's default (auto) probes Vulkan, as on a user's machine.
    cmd.args(["up", "--listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0", "--data-dir"]).arg(&data);
    for var in ["KILN_LOG", "XDG_RUNTIME_DIR", "WAYLAND_DISPLAY", "WAYLAND_SOCKET", "NODEVICE_SELECT"] {
        cmd.env_remove(var);
    }
    cmd.stderr(std::fs::File::create(&log).unwrap());
    let (mut child, url) = spawn_farm(cmd);
    let c = Client::new(&url, Some(Secret::new(operator_token(&data))));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = c.call(Method::GET, "/v1/devices", None).await.unwrap();
        let devices = v["devices"].as_array().unwrap();
        if devices.len() == 4 && devices.iter().all(|d| d["state"] == "online") {
            break;
        }
        assert!(Instant::now() < deadline, "the studio's devices came online: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let term = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    assert!(child.wait().unwrap().success());
    let stderr = std::fs::read_to_string(&log).unwrap();
    let errors: Vec<&str> =
        stderr.lines().filter(|l| l.contains("ERROR") || l.to_lowercase().starts_with("error")).collect();
    assert!(errors.is_empty(), "a clean stop logged errors:\n{}", errors.join("\n"));
}
