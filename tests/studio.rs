//! `kiln up` grows a studio: an embedded MQTT broker that outside clients can watch, and a
//! simulated printer, light rig, camera and display driven by a kiln-edge agent, all worked from
//! the `kiln` CLI.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use kiln_common::client::Client;
use kiln_scheduler::auth::Secret;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

fn cli(url: &str, token: &str, args: &[&str]) -> Output {
    kiln().args(args).args(["--server", url, "--token", token]).output().expect("kiln runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_up_runs_a_studio_that_prints_photographs_and_shows_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let (child, url) = spawn_up(&data, &["--mqtt-listen", &listen]);
    let _up = Killed(vec![child]);
    let token = operator_token(&data);
    let c = Client::new(&url, Some(Secret::new(token.clone())));

    // Every simulated device announces itself.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let v = c.call(Method::GET, "/v1/devices", None).await.unwrap();
        let devices = v["devices"].as_array().unwrap();
        let online = devices.iter().filter(|d| d["state"] == "online").count();
        if online == 4 {
            for d in devices {
                assert!(d["id"].is_string() && d["kind"].is_string(), "{d}");
            }
            break;
        }
        assert!(Instant::now() < until, "the studio's devices did not come online: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = cli(&url, &token, &["devices"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.lines().filter(|l| l.contains("online")).count() == 4, "{text}");

    // The embedded broker asks for a login: none, or a wrong one, is refused at connect.
    for login in [None, Some(("kiln-scheduler", "wrong"))] {
        let e = mqtt_refused(port, login).await;
        // rumqttd closes the connection of a CONNECT it refuses, without a CONNACK.
        assert!(matches!(e, rumqttc::ConnectionError::MqttState(rumqttc::StateError::ConnectionAborted)), "{e:?}");
    }
    // Each login is a file of its own, readable by its owner only.
    let pw_file = data.join("mqtt/kiln-scheduler.password");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&pw_file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(data.join("mqtt/studio-agent.password").is_file());
    let password = std::fs::read_to_string(&pw_file).unwrap().trim().to_owned();

    // An outside MQTT client with a login watches the embedded broker: the retained statuses are there.
    let mut opts = MqttOptions::new("studio-watcher", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5)).set_credentials("kiln-scheduler", password.clone());
    let (watcher, mut events) = AsyncClient::new(opts, 16);
    watcher.subscribe("kiln/devices/+/status", QoS::AtLeastOnce).await.unwrap();
    watcher.subscribe("kiln/devices/lights/tasks/+", QoS::AtLeastOnce).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(10);
    while seen.len() < 4 {
        let left = until.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, events.poll()).await.expect("retained statuses").unwrap();
        if let Event::Incoming(Packet::Publish(p)) = ev {
            let status: Value = serde_json::from_slice(&p.payload).unwrap();
            assert_eq!(status["state"], "online", "{status}");
            seen.insert(p.topic.clone());
        }
    }
    // A login is not the scheduler's proof: a task it publishes is refused by the agent.
    let forged = r#"{"v":1,"task_id":"forged-up","kind":"lights","params":{"scene":9},"deadline_ms":9000000000000}"#;
    watcher.publish("kiln/devices/lights/tasks", QoS::AtLeastOnce, false, forged).await.unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    let report: Value = loop {
        let left = until.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, events.poll()).await.expect("the agent's report").unwrap();
        if let Event::Incoming(Packet::Publish(p)) = ev
            && p.topic.ends_with("/tasks/forged-up")
        {
            break serde_json::from_slice(&p.payload).unwrap();
        }
    };
    assert_eq!((&report["state"], &report["reason"]), (&serde_json::json!("rejected"), &serde_json::json!("unproven")));

    // The broker's limits hold against a logged-in client: a message over its 256 KiB payload
    // limit closes that client's connection, and nobody else's (the tasks below still run).
    let mut opts = MqttOptions::new("studio-flooder", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5)).set_credentials("kiln-scheduler", password);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (flooder, mut flood) = AsyncClient::new(opts, 4);
    flooder.publish("kiln/flood", QoS::AtMostOnce, false, vec![b'x'; 300 * 1024]).await.unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    let closed = loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, flood.poll()).await.expect("the broker closes an oversized sender") {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(matches!(closed, rumqttc::ConnectionError::Io(_) | rumqttc::ConnectionError::MqttState(_)), "{closed:?}");
    let v = c.call(Method::GET, "/v1/devices", None).await.unwrap();
    assert_eq!(v["devices"].as_array().unwrap().iter().filter(|d| d["state"] == "online").count(), 4, "{v:#}");

    // Render, then print → photograph → display from the CLI.
    let j = c.call(Method::POST, "/v1/jobs", Some(&job("studio piece", 3, "preview"))).await.unwrap();
    let done = c.call(Method::GET, &format!("/v1/jobs/{}?wait=60", j["id"].as_str().unwrap()), None).await.unwrap();
    let asset = done["asset"].as_str().unwrap().to_owned();
    for args in [
        vec!["task", "lights", "lights", "--param", "scene=2", "--param", "brightness=640", "--wait"],
        vec!["task", "printer", "print", "--asset", &asset, "--wait"],
        vec!["task", "camera", "capture", "--wait"],
        vec!["task", "display", "display", "--asset", &asset, "--wait"],
    ] {
        let out = cli(&url, &token, &args);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "kiln {args:?}: {stdout}\n{stderr}");
        assert!(stdout.contains("succeeded"), "{stdout}");
        for state in ["queued", "sent", "accepted", "running", "succeeded"] {
            assert!(stderr.contains(state), "every state shown: {stderr}");
        }
    }
    let shown = std::fs::read(data.join("studio/gallery/current.png")).unwrap();
    assert_eq!(blake3::hash(&shown).to_hex().as_str(), asset);
    let out = cli(&url, &token, &["tasks", "--device", "camera", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let photo = v["tasks"][0]["output_asset"].as_str().expect("the photo is linked to the task");
    let got = c.send(Method::GET, &format!("/v1/assets/{photo}"), None).await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(&got.body[..8], b"\x89PNG\r\n\x1a\n", "the camera photographed the print");

    // A bad task is refused with the field named.
    let out = cli(&url, &token, &["task", "printer", "capture"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kind"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_up_runs_a_gallery_print_order_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Small renders at every tier, so the whole order runs in seconds on a CPU.
    let config = small_tiers();
    let config_file = dir.path().join("kiln.toml");
    std::fs::write(&config_file, config).unwrap();
    let (child, url) = spawn_up(&data, &["--config", config_file.to_str().unwrap()]);
    let _up = Killed(vec![child]);
    let token = operator_token(&data);
    let c = Client::new(&url, Some(Secret::new(token.clone())));
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let v = c.call(Method::GET, "/v1/devices", None).await.unwrap();
        if v["devices"].as_array().unwrap().iter().filter(|d| d["state"] == "online").count() == 4 {
            break;
        }
        assert!(Instant::now() < until, "the studio's devices did not come online: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = cli(&url, &token, &["order", "create", "a kiln at dusk", "--seeds", "3,4,5", "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("5 renders") && text.contains("nothing placed"), "{text}");
    let out = cli(&url, &token, &["order", "create", "a kiln at dusk", "--seeds", "3,4,5", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let placed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = placed["id"].as_str().unwrap().to_owned();
    let wait_for = |state: &'static str| {
        let (c, id) = (&c, &id);
        async move {
            let until = Instant::now() + Duration::from_secs(90);
            loop {
                let o = c.call(Method::GET, &format!("/v1/orders/{id}"), None).await.unwrap();
                if o["state"] == state {
                    return o;
                }
                assert!(
                    Instant::now() < until && ["running", "awaiting_approval"].contains(&o["state"].as_str().unwrap()),
                    "{o:#}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for("awaiting_approval").await;
    let out = cli(&url, &token, &["approvals", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let approval = list["approvals"][0]["id"].as_str().expect("an approval waits").to_owned();
    let out = cli(&url, &token, &["approvals"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("option 2") && text.contains("seed 4"), "{text}");
    let out = cli(&url, &token, &["approve", &approval, "--option", "2", "--reason", "the warmest"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let o = wait_for("succeeded").await;
    assert_eq!(o["chosen_seed"], 4);
    let shown = o["outputs"]["shown"].as_str().unwrap();
    let on_screen = std::fs::read(data.join("studio/gallery/current.png")).unwrap();
    assert_eq!(blake3::hash(&on_screen).to_hex().as_str(), shown, "the chosen seed's final render is on the gallery");
    let photo = o["outputs"]["photo"].as_str().unwrap();
    assert_eq!(c.send(Method::GET, &format!("/v1/assets/{photo}"), None).await.unwrap().status, 200);
    let out = cli(&url, &token, &["order", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("succeeded") && text.contains("output photo"), "{text}");
    let out = cli(&url, &token, &["orders"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id));
    // The shown asset's provenance names the order, and it reproduces from that record alone:
    // the same bytes on the backend that made it.
    let p = c.call(Method::GET, &format!("/v1/assets/{shown}/provenance"), None).await.unwrap();
    assert_eq!((p["orders"][0]["order"].as_str(), p["orders"][0]["step"].as_str()), (Some(id.as_str()), Some("final")));
    let printed =
        o["steps"].as_array().unwrap().iter().find(|s| s["name"] == "print_render").unwrap()["assets"][0].clone();
    let p = c.call(Method::GET, &format!("/v1/assets/{}/provenance", printed.as_str().unwrap()), None).await.unwrap();
    let by = &p["orders"][0];
    assert_eq!((by["order"].as_str(), by["step"].as_str()), (Some(id.as_str()), Some("print_render")), "{p:#}");
    assert_eq!((by["approval"]["decided_by"].as_str(), by["approval"]["option"].as_u64()), (Some("operator"), Some(2)));
    let out = cli(&url, &token, &["reproduce", shown]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.starts_with("identical"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    // An asset the farm does not have: nothing to reproduce it from, and the exit says so.
    let out = cli(&url, &token, &["reproduce", &"0".repeat(64)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no asset"), "{err}");
    // What the renders cost, per tier.
    let out = cli(&url, &token, &["usage"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for tier in ["preview", "final", "print"] {
        assert!(text.contains(tier), "{text}");
    }
}
