//! The edge fleet end to end: a farm with its fleet bridge on the local Mosquitto, simulated
//! devices (real Modbus TCP servers on loopback, or one RTU line through a socat pty), and a real
//! `kiln-edge` process driving them.
//! Each test has its own topic prefix, so they share the broker without seeing each other.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{TestFarm, free_port, job, kiln, metric_in, promtool_check_metrics, sibling, test_config};
use hyper::Method;
use kiln_edge::sim::{PrinterSetup, SimDevice, SimLine};
use kiln_protocol::fleet::{AssetRef, DeviceTask, FLEET_VERSION, TaskKind};
use kiln_protocol::wire::MessageKey;
use kiln_scheduler::auth::Role;
use kiln_scheduler::config::FarmConfig;
use kiln_testenv as testenv;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

/// A farm, a printer, a light rig, and an agent driving them plus a camera and a display.
struct Studio {
    farm: TestFarm,
    mqtt_url: String,
    prefix: String,
    printer: SimDevice,
    lights: SimDevice,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    agent: Option<Child>,
    /// The RTU line and the socat that makes it a terminal, when the Modbus devices are on one.
    line: Option<(SimLine, Child)>,
    /// The key of the agent's device token, as the scheduler signs its tasks.
    key: MessageKey,
    /// The agent's device token.
    token: String,
    /// Where the agent serves its own `/metrics` and `/healthz` (`metrics_listen`).
    metrics: String,
}

/// A farm whose fleet bridge uses the broker at `mqtt_url` under `prefix`.
async fn studio_farm(mqtt_url: &str, prefix: &str) -> TestFarm {
    studio_farm_with(mqtt_url, prefix, |_| {}).await
}

/// [`studio_farm`] with changes to its config.
async fn studio_farm_with(mqtt_url: &str, prefix: &str, change: impl FnOnce(&mut FarmConfig)) -> TestFarm {
    let filter = std::env::var("KILN_TEST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    let data = tempfile::tempdir().unwrap();
    let mut cfg = test_config(data.path());
    cfg.scheduler.fleet.mqtt_url = Some(mqtt_url.into());
    cfg.scheduler.fleet.prefix = prefix.to_owned();
    cfg.scheduler.fleet.resend_after_seconds = 2;
    change(&mut cfg);
    TestFarm::start_with(data, cfg).await
}

impl Drop for Studio {
    fn drop(&mut self) {
        let line = self.line.take().map(|(_, socat)| socat);
        for mut c in self.agent.take().into_iter().chain(line) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An agent's config for the studio's four devices: the printer and light rig at Modbus `buses`,
/// a camera that writes a distinct file each time, and a display folder, all in `dir`; `top` is
/// more top-level keys.
#[allow(clippy::too_many_arguments)]
fn agent_config(
    dir: &std::path::Path,
    mqtt_url: &str,
    prefix: &str,
    url: &str,
    token: &str,
    buses: (&str, &str),
    top: &str,
    login: &str,
) -> String {
    let (d, (pbus, lbus)) = (dir.display(), buses);
    format!(
        r#"{top}data_dir = "{d}/edge"
telemetry_interval_ms = 300
[mqtt]
url = "{mqtt_url}"
prefix = "{prefix}"
keepalive_s = 2
reconnect_max_ms = 500
{login}
[scheduler]
url = "{url}"
token = "{token}"
[[device]]
id = "printer"
kind = "printer"
folder = "{d}/print-spool"
modbus = {{ {pbus}, timeout_ms = 300, retries = 1 }}
[[device]]
id = "lights"
kind = "lights"
modbus = {{ {lbus}, timeout_ms = 300, retries = 1 }}
[[device]]
id = "camera"
kind = "camera"
command = ['sh', '-c', 'printf "photo %s" "$(date +%s%N)" > "$0"', '{{out}}']
[[device]]
id = "display"
kind = "display"
folder = "{d}/gallery"
"#
    )
}

/// How the agent reaches the printer and the light rig.
#[derive(Clone, Copy)]
enum Wiring {
    /// Each its own Modbus TCP server.
    Tcp,
    /// Both on one RTU serial line (units 1 and 2): the agent opens a pseudo-terminal that socat
    /// joins to the simulated line.
    Rtu,
}

impl Studio {
    async fn start(setup: PrinterSetup) -> Option<Studio> {
        let (mqtt_url, prefix) = testenv::mqtt().await?;
        Some(Studio::start_on(setup, mqtt_url, prefix, Wiring::Tcp).await)
    }

    async fn start_on(setup: PrinterSetup, mqtt_url: String, prefix: String, wiring: Wiring) -> Studio {
        Studio::start_configured(setup, mqtt_url, prefix, wiring, |_| {}).await
    }

    /// [`Studio::start_on`] with changes to the farm's config.
    async fn start_configured(
        setup: PrinterSetup,
        mqtt_url: String,
        prefix: String,
        wiring: Wiring,
        change: impl FnOnce(&mut FarmConfig),
    ) -> Studio {
        let farm = studio_farm_with(&mqtt_url, &prefix, change).await;
        let made = farm
            .client
            .call(Method::POST, "/v1/tokens", Some(&json!({ "name": "studio-pi", "role": "device", "devices": ALL })))
            .await
            .unwrap();
        let token = made["token"].as_str().unwrap().to_owned();
        Studio::around(farm, setup, mqtt_url, prefix, wiring, token, None).await
    }

    /// An agent with `token` (and, if given, an MQTT login) driving simulated devices for `farm`.
    async fn around(
        farm: TestFarm,
        setup: PrinterSetup,
        mqtt_url: String,
        prefix: String,
        wiring: Wiring,
        token: String,
        login: Option<(&str, &str)>,
    ) -> Studio {
        let printer = SimDevice::printer("127.0.0.1:0".parse().unwrap(), setup).await.unwrap();
        let lights = SimDevice::lights("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut line = None;
        let (pbus, lbus) = match wiring {
            Wiring::Tcp => (format!("address = \"{}\"", printer.addr()), format!("address = \"{}\"", lights.addr())),
            Wiring::Rtu => {
                let sim = SimLine::start("127.0.0.1:0".parse().unwrap(), &[(1, &printer), (2, &lights)]).await.unwrap();
                let tty = dir.path().join("ttyKILN0");
                let socat = std::process::Command::new("socat")
                    .arg(format!("pty,link={},raw,echo=0", tty.display()))
                    .arg(format!("tcp:{}", sim.addr()))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start socat");
                line = Some((sim, socat));
                let until = Instant::now() + Duration::from_secs(10);
                while !tty.exists() {
                    assert!(Instant::now() < until, "socat made no terminal at {}", tty.display());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // A pseudo-terminal takes no parity bit: the line runs 8N2.
                let serial = format!("serial = \"{}\", baud = 19200, parity = \"none\"", tty.display());
                (format!("{serial}, unit = 1"), format!("{serial}, unit = 2"))
            }
        };
        let config = dir.path().join("edge.toml");
        // The agent trusts the farm's own CA, where the farm has one (a studio over TLS).
        let ca = farm.sched.cfg.tls.ca_file.as_ref().map(|f| format!("tls_ca_file = \"{}\"\n", f.display()));
        let metrics = format!("127.0.0.1:{}", free_port());
        let top = format!("{}metrics_listen = \"{metrics}\"\n", ca.unwrap_or_default());
        let login = login.map(|(u, p)| format!("username = \"{u}\"\npassword = \"{p}\"")).unwrap_or_default();
        let text = agent_config(dir.path(), &mqtt_url, &prefix, &farm.url, &token, (&pbus, &lbus), &top, &login);
        std::fs::write(&config, text).unwrap();
        let key = MessageKey::from_token(&token);
        let mut s =
            Studio { farm, mqtt_url, prefix, printer, lights, dir, config, agent: None, line, key, token, metrics };
        s.spawn_agent();
        s
    }

    fn spawn_agent(&mut self) {
        let child = sibling("kiln-edge")
            .arg("--config")
            .arg(&self.config)
            .env("KILN_LOG", std::env::var("KILN_TEST_AGENT_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .spawn()
            .expect("start kiln-edge");
        self.agent = Some(child);
    }

    fn kill_agent(&mut self) {
        let mut a = self.agent.take().expect("an agent runs");
        a.kill().unwrap(); // SIGKILL
        a.wait().unwrap();
    }

    async fn devices(&self) -> Vec<Value> {
        let v = self.farm.client.call(Method::GET, "/v1/devices", None).await.unwrap();
        v["devices"].as_array().unwrap().clone()
    }

    /// Waits until `ids` all show `state`.
    async fn wait_state(&self, ids: &[&str], state: &str, within: Duration) {
        let until = Instant::now() + within;
        loop {
            let devices = self.devices().await;
            let ok = ids.iter().all(|id| devices.iter().any(|d| d["id"] == *id && d["state"] == state));
            if ok {
                return;
            }
            assert!(Instant::now() < until, "devices {ids:?} not all {state} within {within:?}: {devices:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn create(&self, device: &str, body: Value) -> String {
        let t = self.farm.client.call(Method::POST, &format!("/v1/devices/{device}/tasks"), Some(&body)).await.unwrap();
        assert_eq!(t["state"], "queued");
        t["id"].as_str().unwrap().to_owned()
    }

    async fn task(&self, id: &str) -> Value {
        self.farm.client.call(Method::GET, &format!("/v1/tasks/{id}"), None).await.unwrap()
    }

    /// Waits for a task to reach `state` (or end), and returns it.
    async fn wait_task(&self, id: &str, state: &str, within: Duration) -> Value {
        let until = Instant::now() + within;
        loop {
            let t = self.task(id).await;
            let ended = ["succeeded", "failed", "timed_out", "expired"].contains(&t["state"].as_str().unwrap());
            if t["state"] == state || ended {
                return t;
            }
            assert!(Instant::now() < until, "task {id} not {state} within {within:?}: {t:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates a task and waits for it to succeed through every state; returns it.
    async fn run_task(&self, device: &str, body: Value, within: Duration) -> Value {
        let id = self.create(device, body).await;
        let t = self.wait_task(&id, "succeeded", within).await;
        assert_eq!(states(&t), happy_path(), "{t:#}");
        t
    }

    /// Waits for the printer's telemetry to show `media` sheets; returns the device.
    async fn wait_printer_media(&self, media: u64) -> Value {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let d = self.farm.client.call(Method::GET, "/v1/devices/printer", None).await.unwrap();
            if d["telemetry"]["media"] == media {
                return d;
            }
            assert!(Instant::now() < until, "no printer telemetry showing {media} sheets: {d:#}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A rendered asset's hash.
    async fn render(&self, seed: u64) -> String {
        let j = self.farm.submit(job("kiln in the studio", seed, "preview")).await;
        let done = self.farm.wait(j["id"].as_str().unwrap()).await;
        assert_eq!(done["state"], "succeeded", "{done:#}");
        done["asset"].as_str().unwrap().to_owned()
    }

    /// A raw MQTT client on the test's broker, its event loop polled in the background; what it
    /// receives on its subscriptions comes out of the channel.
    async fn raw_client(
        &self,
        subscribe: &[String],
    ) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
        self.raw_client_as(subscribe, None).await
    }

    /// [`Studio::raw_client`], logged in as `login` (user, password).
    async fn raw_client_as(
        &self,
        subscribe: &[String],
        login: Option<(&str, &str)>,
    ) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
        let (host, port) = kiln_protocol::fleet::parse_mqtt_url(&self.mqtt_url).unwrap();
        let user = login.map_or("anon", |(u, _)| u);
        let mut opts = MqttOptions::new(format!("{}-raw-{user}-{}", self.prefix, std::process::id()), host, port);
        opts.set_keep_alive(Duration::from_secs(5));
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        let (client, mut events) = AsyncClient::new(opts, 64);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let subs = subscribe.to_vec();
        let sub_client = client.clone();
        tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            while let Ok(ev) = events.poll().await {
                match ev {
                    Event::Incoming(Packet::ConnAck(_)) => {
                        for s in &subs {
                            sub_client.subscribe(s.clone(), QoS::AtLeastOnce).await.unwrap();
                        }
                    }
                    Event::Incoming(Packet::SubAck(_)) | Event::Incoming(Packet::PingResp) if subs.is_empty() => {}
                    Event::Incoming(Packet::SubAck(_)) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(());
                        }
                    }
                    Event::Incoming(Packet::Publish(p)) => {
                        let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                    }
                    _ => {}
                }
                if subs.is_empty()
                    && let Some(r) = ready_tx.take()
                {
                    let _ = r.send(());
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready).await.expect("raw MQTT client ready").unwrap();
        (client, rx)
    }

    fn topic(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    /// `task` for `device` as JSON, signed as the scheduler signs it.
    fn signed(&self, device: &str, mut task: DeviceTask) -> String {
        task.sign(device, &self.key);
        serde_json::to_string(&task).unwrap()
    }

    /// Waits for the agent's report on task `id` of `device`, heard on `heard`.
    async fn report(
        heard: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
        device: &str,
        id: &str,
    ) -> Value {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let (topic, payload) = tokio::time::timeout(left, heard.recv()).await.expect("a report").unwrap();
            if topic.ends_with(&format!("/devices/{device}/tasks/{id}")) {
                return serde_json::from_slice(&payload).unwrap();
            }
        }
    }
}

/// A task as the wire carries it, not yet signed.
fn wire(id: &str, kind: TaskKind, asset: Option<(&str, &str)>, params: Value) -> DeviceTask {
    DeviceTask {
        v: FLEET_VERSION,
        task_id: id.into(),
        kind,
        asset: asset.map(|(hash, url)| AssetRef { hash: hash.into(), url: url.into() }),
        params: params.as_object().cloned().unwrap_or_default(),
        deadline_ms: i64::MAX,
        sent_ms: None,
        mac: None,
    }
}

const ALL: [&str; 4] = ["printer", "lights", "camera", "display"];

/// The states a task went through, a repeated `sent` (a resend) folded into one.
fn states(task: &Value) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in task["events"].as_array().unwrap() {
        let s = e["state"].as_str().unwrap().to_owned();
        if out.last() != Some(&s) {
            out.push(s);
        }
    }
    out
}

fn happy_path() -> Vec<String> {
    ["queued", "sent", "accepted", "running", "succeeded"].iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lights_print_capture_display_end_to_end_and_offline_when_the_agent_dies() {
    let Some(mut s) = Studio::start(PrinterSetup::default()).await else { return };
    s.wait_state(&ALL, "online", Duration::from_secs(20)).await;
    let asset = s.render(7).await;

    // Lights before the photo.
    s.run_task(
        "lights",
        json!({ "kind": "lights", "params": { "scene": 3, "brightness": 800 } }),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(&s.lights.registers()[..2], &[3, 800]);

    // Print the approved piece: the file lands in the printer's spool folder and the printer's
    // job counter moves once.
    let print = s.create("printer", json!({ "kind": "print", "asset": asset })).await;
    let t = s.wait_task(&print, "succeeded", Duration::from_secs(30)).await;
    assert_eq!(states(&t), happy_path(), "{t:#}");
    let regs = s.printer.registers();
    assert_eq!((regs[3], regs[1]), (1, 49), "one job, one sheet used: {regs:?}");
    let spooled: Vec<_> = std::fs::read_dir(s.dir.path().join("print-spool")).unwrap().collect();
    assert_eq!(spooled.len(), 1);

    // Photograph it: the photo is uploaded as an asset and linked to the task.
    let t = s.run_task("camera", json!({ "kind": "capture" }), Duration::from_secs(30)).await;
    let photo = t["output_asset"].as_str().expect("the capture names its photo").to_owned();
    let got = s.farm.raw(Method::GET, &format!("/v1/assets/{photo}"), "").await;
    assert_eq!(got.status, 200);
    assert!(got.body.starts_with(b"photo "));
    // Each token reads what is its own: the Pi the piece it printed (not the photo); another Pi,
    // and a client, neither. No Pi uploads but for a live task of its own devices.
    let made = json!({ "name": "other-pi", "role": "device", "devices": ["elsewhere"] });
    let other = s.farm.client.call(Method::POST, "/v1/tokens", Some(&made)).await.unwrap();
    let other = s.farm.client_with(other["token"].as_str());
    let made = s.farm.client.call(Method::POST, "/v1/tokens", Some(&json!({ "name": "c", "role": "client" }))).await;
    let client = s.farm.client_with(made.unwrap()["token"].as_str());
    let pi = s.farm.client_with(Some(&s.token));
    for (who, of, status) in [(&pi, &asset, 200), (&pi, &photo, 404), (&other, &asset, 404), (&client, &photo, 404)] {
        let r = who.send(Method::GET, &format!("/v1/assets/{of}"), None).await.unwrap();
        assert_eq!(r.status, status, "{of}: {:?}", String::from_utf8_lossy(&r.body));
    }
    let photo_file = s.dir.path().join("another.photo");
    std::fs::write(&photo_file, b"photo from elsewhere").unwrap();
    let upload = format!("/v1/assets/{}", blake3::hash(b"photo from elsewhere").to_hex());
    let capture = t["id"].as_str().unwrap();
    for (who, query, status) in [
        (&other, String::new(), 400),
        (&other, format!("?task={capture}"), 403),
        (&pi, format!("?task={capture}"), 409),
        (&pi, "?task=no-such-task".to_owned(), 404),
    ] {
        let r = who.put_file(&format!("{upload}{query}"), &photo_file).await.unwrap();
        assert_eq!(r.status, status, "{query}: {:?}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(s.farm.raw(Method::GET, &upload, "").await.status, 404, "nothing refused is kept");

    // Hang it on the gallery screen: the signage folder shows the asset, byte for byte.
    s.run_task("display", json!({ "kind": "display", "asset": asset }), Duration::from_secs(30)).await;
    let shown = std::fs::read(s.dir.path().join("gallery/current.png")).unwrap();
    assert_eq!(blake3::hash(&shown).to_hex().as_str(), asset);

    // A redelivered task is not run again: the same print task, straight to the agent.
    let (raw, _) = s.raw_client(&[]).await;
    let url = format!("/v1/assets/{asset}");
    let again = s.signed("printer", wire(&print, TaskKind::Print, Some((&asset, &url)), json!({})));
    raw.publish(s.topic("devices/printer/tasks"), QoS::AtLeastOnce, false, again).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.printer.registers()[3], 1, "the repeat was not printed");
    assert_eq!(s.task(&print).await["state"], "succeeded");

    // Telemetry arrives: the printer's registers, in order (nothing stale dropped).
    let d = s.wait_printer_media(49).await;
    assert_eq!(d["telemetry"]["printer_state"], "ready");
    assert_eq!(s.farm.metric("kiln_fleet_messages_dropped_total", "reason=\"stale\",topic=\"telemetry\"").await, 0.0);
    assert_eq!(s.farm.metric("kiln_device_tasks_total", "outcome=\"succeeded\"").await, 4.0);

    // The agent's own `/metrics` says the same from its side, and passes promtool's lint.
    let agent = kiln_common::client::Client::new(&format!("http://{}", s.metrics), None);
    let health = agent.send(Method::GET, "/healthz", None).await.unwrap();
    assert_eq!(health.status, 200, "{}", String::from_utf8_lossy(&health.body));
    let text = String::from_utf8(agent.send(Method::GET, "/metrics", None).await.unwrap().body.to_vec()).unwrap();
    for id in ALL {
        let of = format!("device=\"{id}\"");
        assert_eq!(metric_in(&text, "kiln_edge_broker_connected", &of), 1.0, "{id}:\n{text}");
        let ok = format!("{of},outcome=\"succeeded\"");
        assert_eq!(metric_in(&text, "kiln_edge_tasks_total", &ok), 1.0, "{id}:\n{text}");
        assert_eq!(metric_in(&text, "kiln_edge_task_duration_seconds_count", &of), 1.0, "{id}:\n{text}");
        assert_eq!(metric_in(&text, "kiln_edge_spool_dropped_total", &of), 0.0, "{id}:\n{text}");
    }
    assert!(metric_in(&text, "kiln_edge_device_reads_total", "device=\"printer\",result=\"ok\"") > 0.0, "{text}");
    assert!(metric_in(&text, "kiln_edge_task_duration_seconds_sum", "device=\"printer\"") > 0.0, "{text}");
    promtool_check_metrics(text.as_bytes());

    // The agent killed: its last will marks every device offline within the keepalive window
    // (2 s; the broker waits 1.5 of them).
    let killed = Instant::now();
    s.kill_agent();
    s.wait_state(&ALL, "offline", Duration::from_secs(6)).await;
    eprintln!("offline {:?} after the kill", killed.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_dropped_or_rejected_and_a_silent_printer_fails_cleanly() {
    let Some(s) = Studio::start(PrinterSetup::default()).await else { return };
    s.wait_state(&ALL, "online", Duration::from_secs(20)).await;
    let (raw, mut heard) = s.raw_client(&[s.topic("devices/printer/tasks/+")]).await;
    let garbage: [(&str, &[u8]); 5] = [
        ("devices/ghost/status", b"not json"),
        ("devices/printer/telemetry", b"{\"v\":1}"),
        ("devices/printer/tasks/t-nope", b"{}"),
        ("devices/printer/tasks", b"\xff\xfe"),
        // A task the agent can name but not use: rejected with a report.
        ("devices/printer/tasks", br#"{"v":1,"task_id":"bad-1","kind":"print","deadline_ms":1}"#),
    ];
    for (topic, payload) in garbage {
        raw.publish(s.topic(topic), QoS::AtLeastOnce, false, payload.to_vec()).await.unwrap();
    }
    let until = Instant::now() + Duration::from_secs(10);
    let rejected = loop {
        let remaining = until.saturating_duration_since(Instant::now());
        let (topic, payload) = tokio::time::timeout(remaining, heard.recv()).await.expect("a rejected report").unwrap();
        if topic.ends_with("/tasks/bad-1") {
            break serde_json::from_slice::<Value>(&payload).unwrap();
        }
    };
    assert_eq!(rejected["state"], "rejected");
    assert!(rejected["detail"].as_str().unwrap().contains("asset"), "{rejected}");
    assert_eq!((&rejected["v"], &rejected["reason"]), (&json!(2), &json!("malformed")), "{rejected}");
    // Tasks it can read but will not run say why, typed: past its deadline, or for another device.
    let hash = "ab".repeat(32);
    let late =
        DeviceTask { deadline_ms: 1, ..wire("late-1", TaskKind::Print, Some((&hash, "/v1/assets/x")), json!({})) };
    let wrong = wire("wrong-1", TaskKind::Lights, None, json!({}));
    for t in [late, wrong] {
        raw.publish(s.topic("devices/printer/tasks"), QoS::AtLeastOnce, false, s.signed("printer", t)).await.unwrap();
    }
    let mut reasons = std::collections::BTreeMap::new();
    let until = Instant::now() + Duration::from_secs(10);
    while reasons.len() < 2 {
        let remaining = until.saturating_duration_since(Instant::now());
        let (topic, payload) = tokio::time::timeout(remaining, heard.recv()).await.expect("two rejections").unwrap();
        let r: Value = serde_json::from_slice(&payload).unwrap();
        if let Some(id) = ["late-1", "wrong-1"].into_iter().find(|id| topic.ends_with(&format!("/tasks/{id}"))) {
            assert_eq!(r["state"], "rejected", "{r}");
            reasons.insert(id, r["reason"].as_str().unwrap_or_default().to_owned());
        }
    }
    assert_eq!(reasons["late-1"], "deadline");
    assert_eq!(reasons["wrong-1"], "wrong_kind");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let status = s.farm.metric("kiln_fleet_messages_dropped_total", "reason=\"malformed\",topic=\"status\"").await;
        let telemetry =
            s.farm.metric("kiln_fleet_messages_dropped_total", "reason=\"malformed\",topic=\"telemetry\"").await;
        let report = s.farm.metric("kiln_fleet_messages_dropped_total", "reason=\"malformed\",topic=\"report\"").await;
        let unknown =
            s.farm.metric("kiln_fleet_messages_dropped_total", "reason=\"unknown_task\",topic=\"report\"").await;
        if status >= 1.0 && telemetry >= 1.0 && report >= 1.0 && unknown >= 1.0 {
            break;
        }
        assert!(Instant::now() < until, "drops not counted: {status} {telemetry} {report} {unknown}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The agent counts the payload it could not read at all in its telemetry.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let d = s.farm.client.call(Method::GET, "/v1/devices/printer", None).await.unwrap();
        if d["telemetry"]["malformed_dropped"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(Instant::now() < until, "the agent did not count the unreadable task: {d:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The printer stops answering: the print fails cleanly and the device shows degraded.
    let asset = s.render(8).await;
    s.printer.set_answering(false);
    let print = s.create("printer", json!({ "kind": "print", "asset": asset })).await;
    let t = s.wait_task(&print, "failed", Duration::from_secs(30)).await;
    assert_eq!(t["state"], "failed", "{t:#}");
    assert!(t["detail"].as_str().unwrap().contains("no answer"), "{t:#}");
    assert_eq!(s.printer.registers()[3], 0, "nothing printed");
    // The failed task is an incident for the operator.
    let incident = common::open_incident(&s.farm.client, &print).await;
    assert_eq!(incident["kind"], "task_failed", "{incident}");
    assert!(incident["summary"].as_str().unwrap().contains("no answer"), "{incident}");
    s.wait_state(&["printer"], "degraded", Duration::from_secs(10)).await;
    let d = s.farm.client.call(Method::GET, "/v1/devices/printer", None).await.unwrap();
    assert!(d["detail"].as_str().unwrap().contains("no answer"), "{d:#}");
    // It answers again: back online.
    s.printer.set_answering(true);
    s.wait_state(&["printer"], "online", Duration::from_secs(15)).await;
    let healthz = s.farm.raw(Method::GET, "/healthz", "").await;
    assert_eq!(healthz.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_printer_and_a_light_rig_share_one_rtu_line() {
    let Some((mqtt_url, prefix)) = testenv::mqtt().await else { return };
    if !testenv::program("socat") {
        return;
    }
    let s = Studio::start_on(PrinterSetup::default(), mqtt_url, prefix, Wiring::Rtu).await;
    s.wait_state(&ALL, "online", Duration::from_secs(20)).await;
    let asset = s.render(11).await;

    // Both units answer on the one line, each to its own id.
    s.run_task(
        "lights",
        json!({ "kind": "lights", "params": { "scene": 2, "brightness": 640 } }),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(&s.lights.registers()[..2], &[2, 640]);
    assert_eq!(s.printer.registers()[..2], [0, 50], "the printer's registers were not touched by the lights");
    s.run_task("printer", json!({ "kind": "print", "asset": asset }), Duration::from_secs(30)).await;
    let regs = s.printer.registers();
    assert_eq!((regs[3], regs[1]), (1, 49), "one job, one sheet used: {regs:?}");
    s.wait_printer_media(49).await;

    // The printer falls silent on the line: its print fails cleanly and it shows degraded, while
    // the light rig on the same line still does its work.
    s.printer.set_answering(false);
    let print = s.create("printer", json!({ "kind": "print", "asset": asset })).await;
    let t = s.wait_task(&print, "failed", Duration::from_secs(30)).await;
    assert_eq!(t["state"], "failed", "{t:#}");
    assert!(t["detail"].as_str().unwrap().contains("no answer"), "{t:#}");
    assert!(t["detail"].as_str().unwrap().contains("modbus rtu"), "{t:#}");
    s.wait_state(&["printer"], "degraded", Duration::from_secs(10)).await;
    s.run_task("lights", json!({ "kind": "lights", "params": { "scene": 4 } }), Duration::from_secs(30)).await;
    assert_eq!(s.lights.registers()[0], 4);
    assert_eq!(s.printer.registers()[3], 1, "nothing more printed");

    // It answers again: back online, and it prints.
    s.printer.set_answering(true);
    s.wait_state(&["printer"], "online", Duration::from_secs(15)).await;
    s.run_task("printer", json!({ "kind": "print", "asset": asset }), Duration::from_secs(30)).await;
    assert_eq!(s.printer.registers()[3], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_print_does_not_print_again() {
    let setup = PrinterSetup { print_ms: 2_500, ..PrinterSetup::default() };
    let Some(mut s) = Studio::start(setup).await else { return };
    s.wait_state(&ALL, "online", Duration::from_secs(20)).await;
    let asset = s.render(9).await;
    let print = s.create("printer", json!({ "kind": "print", "asset": asset })).await;
    let t = s.wait_task(&print, "running", Duration::from_secs(20)).await;
    assert_eq!(t["state"], "running", "{t:#}");
    // The start coil is written just after `running` is reported; let it land.
    let until = Instant::now() + Duration::from_secs(5);
    while s.printer.registers()[0] != 1 {
        assert!(Instant::now() < until, "the printer never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.kill_agent();
    s.spawn_agent();
    let t = s.wait_task(&print, "failed", Duration::from_secs(20)).await;
    assert_eq!(t["state"], "failed", "{t:#}");
    assert!(t["detail"].as_str().unwrap().contains("interrupted"), "{t:#}");
    // The job the printer had started finishes; nothing starts it again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let regs = s.printer.registers();
    assert_eq!(regs[3], 1, "printed once: {regs:?}");
    s.wait_state(&ALL, "online", Duration::from_secs(10)).await;
    // The printer went offline while its task waited on it: one incident says so.
    let v = s.farm.client.call(Method::GET, "/v1/incidents", None).await.unwrap();
    let offline: Vec<&Value> =
        v["incidents"].as_array().unwrap().iter().filter(|i| i["kind"] == "device_offline").collect();
    assert_eq!(offline.len(), 1, "{v:#}");
    assert_eq!(offline[0]["subject"], print.as_str(), "{v:#}");
    assert!(offline[0]["summary"].as_str().unwrap().contains("printer went offline"), "{v:#}");
}

/// A private Mosquitto on a free port, so stopping it disturbs no other test.
struct PrivateBroker {
    child: Option<Child>,
}

impl PrivateBroker {
    /// Mosquitto as `infra/mosquitto/kiln.conf` sets it up (logins and ACL required), on `port`,
    /// with the password and ACL files given and no persistence.
    fn secured(port: u16, dir: &std::path::Path, passwd: &std::path::Path, acl: &std::path::Path) -> PrivateBroker {
        let shipped =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/infra/mosquitto/kiln.conf")).unwrap();
        let mut conf: String = shipped
            .lines()
            .filter(|l| !["persistence", "listener", "password_file", "acl_file"].iter().any(|k| l.starts_with(k)))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(conf.contains("allow_anonymous false"), "the shipped config refuses anonymous clients");
        // As root, Mosquitto would switch to its own user, which cannot read the test's files.
        conf.push_str(&format!(
            "listener {port} 127.0.0.1\npassword_file {}\nacl_file {}\nuser root\n",
            passwd.display(),
            acl.display()
        ));
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, conf).unwrap();
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (Debian's package) is installed");
        PrivateBroker::listening(child, port)
    }

    fn start(port: u16) -> PrivateBroker {
        let child = std::process::Command::new("mosquitto")
            .args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (Debian's package) is installed");
        PrivateBroker::listening(child, port)
    }

    fn listening(mut child: Child, port: u16) -> PrivateBroker {
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("mosquitto exited with {status} before listening on {port}");
            }
            assert!(Instant::now() < until, "mosquitto did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        PrivateBroker { child: Some(child) }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_nothing_and_runs_nothing_twice() {
    // The shared broker's presence says whether MQTT tests run here at all.
    if testenv::mqtt().await.is_none() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut broker = PrivateBroker::start(port);
    let setup = PrinterSetup { print_ms: 2_000, ..PrinterSetup::default() };
    let s = Studio::start_on(setup, format!("mqtt://127.0.0.1:{port}"), "kiln".into(), Wiring::Tcp).await;
    s.wait_state(&ALL, "online", Duration::from_secs(20)).await;
    let asset = s.render(10).await;
    let print = s.create("printer", json!({ "kind": "print", "asset": asset })).await;
    s.wait_task(&print, "running", Duration::from_secs(20)).await;
    let seq_before =
        s.farm.client.call(Method::GET, "/v1/devices/printer", None).await.unwrap()["telemetry_seq"].as_i64().unwrap();

    // The broker goes away while the printer prints; the job ends during the outage.
    broker.stop();
    let lights = s.create("lights", json!({ "kind": "lights", "params": { "scene": 5 } })).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(s.printer.registers()[3], 1, "the print finished while the broker was away");
    assert_ne!(s.task(&print).await["state"], "succeeded", "nothing can have been heard yet");
    let _broker = PrivateBroker::start(port);

    // Afterwards: the result and the telemetry of the outage arrive, in order; the task made
    // during the outage goes out; nothing ran twice.
    let t = s.wait_task(&print, "succeeded", Duration::from_secs(30)).await;
    assert_eq!(states(&t), happy_path(), "{t:#}");
    let t = s.wait_task(&lights, "succeeded", Duration::from_secs(30)).await;
    assert_eq!(t["state"], "succeeded", "{t:#}");
    assert_eq!(s.lights.registers()[0], 5);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let d = s.farm.client.call(Method::GET, "/v1/devices/printer", None).await.unwrap();
        // 300 ms telemetry over a 4 s outage: at least 8 spooled messages, delivered after it.
        if d["telemetry_seq"].as_i64().unwrap() >= seq_before + 8 {
            assert_eq!(d["spool_dropped"], 0);
            break;
        }
        assert!(Instant::now() < until, "the outage's telemetry did not arrive: {d:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        s.farm.metric("kiln_fleet_messages_dropped_total", "reason=\"stale\",topic=\"telemetry\"").await,
        0.0,
        "telemetry arrived in order"
    );
    assert_eq!(
        s.farm.metric("kiln_fleet_messages_dropped_total", "reason=\"stale\",topic=\"report\"").await,
        0.0,
        "reports in order"
    );
    assert_eq!(s.printer.registers()[3], 1, "printed once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_without_the_schedulers_proof_runs_nothing_and_the_farm_keeps_serving() {
    let Some(s) = Studio::start(PrinterSetup::default()).await else { return };
    s.wait_state(&ALL, "online", Duration::from_secs(20)).await;
    let asset = s.render(11).await;
    let lights_before = s.lights.registers();
    // A stranger's server, which the agent must never call (it would send its token there).
    let stranger = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let foreign = format!("http://{}/v1/assets/{asset}", stranger.local_addr().unwrap());
    let called = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = called.clone();
    tokio::spawn(async move {
        while stranger.accept().await.is_ok() {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let (raw, mut heard) = s.raw_client(&[s.topic("devices/+/tasks/+")]).await;
    let scene = |id: &str| wire(id, TaskKind::Lights, None, json!({ "scene": 9, "brightness": 1000 }));
    let print = |id: &str| wire(id, TaskKind::Print, Some((&asset, &foreign)), json!({}));
    let other = MessageKey::from_token("kiln_ffeeddccbbaa99887766554433221100");
    let mut by_other = scene("forged-2");
    by_other.sign("lights", &other);
    let plain = |t: DeviceTask| serde_json::to_string(&t).unwrap();
    let cases = [
        ("lights", "forged-1", plain(scene("forged-1")), "unproven", "carries no proof"),
        ("lights", "forged-2", plain(by_other), "unproven", "its proof does not match"),
        ("lights", "forged-3", s.signed("printer", scene("forged-3")), "unproven", "its proof does not match"),
        ("printer", "forged-4", plain(print("forged-4")), "unproven", "carries no proof"),
        // Signed, as a scheduler gone wrong might send it: still refused before any fetch.
        ("printer", "foreign-1", s.signed("printer", print("foreign-1")), "malformed", "fetches only from there"),
    ];
    for (device, id, payload, reason, says) in cases {
        raw.publish(s.topic(&format!("devices/{device}/tasks")), QoS::AtLeastOnce, false, payload).await.unwrap();
        let r = Studio::report(&mut heard, device, id).await;
        assert_eq!((r["state"].as_str(), r["reason"].as_str()), (Some("rejected"), Some(reason)), "{id}: {r}");
        assert!(r["detail"].as_str().unwrap().contains(says), "{id}: {r}");
    }
    assert_eq!(s.lights.registers(), lights_before, "the lights did not change");
    assert_eq!(s.printer.registers()[3], 0, "nothing printed");
    assert!(!called.load(std::sync::atomic::Ordering::SeqCst), "the agent called a stranger's server");

    // A forged task that reuses a real task's id neither runs nor moves the real one.
    let real = s
        .run_task(
            "lights",
            json!({ "kind": "lights", "params": { "scene": 4, "brightness": 300 } }),
            Duration::from_secs(20),
        )
        .await;
    let id = real["id"].as_str().unwrap();
    raw.publish(s.topic("devices/lights/tasks"), QoS::AtLeastOnce, false, plain(scene(id))).await.unwrap();
    loop {
        let r = Studio::report(&mut heard, "lights", id).await;
        if r["reason"] == "unproven" {
            break;
        }
    }
    let until = Instant::now() + Duration::from_secs(10);
    while s.farm.metric("kiln_fleet_messages_dropped_total", "reason=\"unproven_task\",topic=\"report\"").await < 1.0 {
        assert!(Instant::now() < until, "the scheduler did not count the refused forgery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.task(id).await["state"], "succeeded");
    assert_eq!(&s.lights.registers()[..2], &[4, 300]);
    // The agent counts what it refused in its telemetry.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let d = s.farm.client.call(Method::GET, "/v1/devices/lights", None).await.unwrap();
        if d["telemetry"]["unproven_rejected"].as_u64() == Some(4) {
            break;
        }
        assert!(Instant::now() < until, "the agent did not count 4 refused lights tasks: {d:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_shipped_mosquitto_config_only_logged_in_pis_speak_and_only_for_their_devices() {
    if testenv::mqtt().await.is_none() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let conf = tempfile::tempdir().unwrap();
    let (passwd, acl) = (conf.path().join("kiln.passwd"), conf.path().join("kiln.acl"));
    let bridge = "bridge-pw-1";
    let farm = studio_farm(&format!("mqtt://kiln-scheduler:{bridge}@127.0.0.1:{port}"), "kiln").await;
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/infra/mosquitto/kiln.acl"), &acl).unwrap();
    let ok = |c: &mut std::process::Command| {
        let out = c.output().unwrap();
        assert!(out.status.success(), "{c:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    ok(std::process::Command::new("mosquitto_passwd").args(["-c", "-b"]).arg(&passwd).args(["kiln-scheduler", bridge]));
    // What `kiln device add` prints for the broker host, run as printed.
    let add = |name: &str, devices: &str| -> Value {
        let out = ok(kiln()
            .args(["device", "add", name, "--devices", devices, "--json", "--passwd-file"])
            .arg(&passwd)
            .arg("--acl-file")
            .arg(&acl)
            .args(["--server", &farm.url, "--token", &farm.token]));
        let added: Value = serde_json::from_slice(&out).unwrap();
        for cmd in added["broker_commands"].as_array().unwrap().iter().filter_map(|c| c.as_str()) {
            if !cmd.starts_with("pkill") {
                ok(std::process::Command::new("sh").args(["-c", cmd]));
            }
        }
        added
    };
    let pi = add("studio-pi", "printer,lights,camera,display");
    let other = add("other-pi", "ghost");
    let acl_text = std::fs::read_to_string(&acl).unwrap();
    assert!(
        acl_text.contains("user other-pi\ntopic read kiln/scheduler/status\ntopic write kiln/devices/ghost/status"),
        "{acl_text}"
    );
    // A device served already is refused, naming the token that serves it.
    let dup = kiln()
        .args(["device", "add", "third-pi", "--devices", "lights", "--server", &farm.url, "--token", &farm.token])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&dup.stderr);
    assert!(!dup.status.success() && said.contains("\"lights\" is served by the token \"studio-pi\""), "{said}");

    let _broker = PrivateBroker::secured(port, conf.path(), &passwd, &acl);
    let (token, password) = (pi["token"].as_str().unwrap(), pi["mqtt_password"].as_str().unwrap());
    let mqtt = format!("mqtt://127.0.0.1:{port}");
    let s = Studio::around(
        farm,
        PrinterSetup::default(),
        mqtt,
        "kiln".into(),
        Wiring::Tcp,
        token.into(),
        Some(("studio-pi", password)),
    )
    .await;
    // The bridge and the Pi, each with its own login, work within their ACLs.
    s.wait_state(&ALL, "online", Duration::from_secs(20)).await;

    // No login, or a wrong one: refused at connect.
    use rumqttc::{ConnectReturnCode, ConnectionError};
    for login in [None, Some(("studio-pi", "wrong")), Some(("nobody", "x"))] {
        let e = common::mqtt_refused(port, login).await;
        assert!(
            matches!(
                e,
                ConnectionError::ConnectionRefused(
                    ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword
                )
            ),
            "{login:?}: {e:?}"
        );
    }

    // Another Pi speaks for the printer and commands the lights: the broker drops both, while
    // what it says for its own device is heard.
    let lights_before = s.lights.registers();
    let (watch, mut reports) =
        s.raw_client_as(&["kiln/devices/+/tasks/+".to_owned()], Some(("kiln-scheduler", bridge))).await;
    let other_pw = other["mqtt_password"].as_str().unwrap();
    let (intruder, _) = s.raw_client_as(&[], Some(("other-pi", other_pw))).await;
    let status = |state: &str, kind: &str| {
        json!({ "v": 1, "state": state, "boot_id": "b-other", "kind": kind, "capabilities": [],
                "version": "0", "at_ms": 1 })
        .to_string()
    };
    intruder
        .publish("kiln/devices/printer/status", QoS::AtLeastOnce, true, status("offline", "printer"))
        .await
        .unwrap();
    let scene = serde_json::to_string(&wire("from-other", TaskKind::Lights, None, json!({ "scene": 9 }))).unwrap();
    intruder.publish("kiln/devices/lights/tasks", QoS::AtLeastOnce, false, scene).await.unwrap();
    intruder.publish("kiln/devices/ghost/status", QoS::AtLeastOnce, true, status("online", "camera")).await.unwrap();
    s.wait_state(&["ghost"], "online", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.wait_state(&ALL, "online", Duration::from_secs(1)).await;
    while let Ok((topic, _)) = reports.try_recv() {
        assert!(!topic.ends_with("/from-other"), "the lights heard another Pi's task");
    }
    assert_eq!(s.lights.registers(), lights_before);
    drop(watch);

    // The farm serves on: a real task, signed, runs.
    s.run_task(
        "lights",
        json!({ "kind": "lights", "params": { "scene": 6, "brightness": 500 } }),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(&s.lights.registers()[..2], &[6, 500]);
}

/// A studio whose broker and scheduler speak only TLS: the bridge and the agent on `mqtts://`
/// (a TLS front for the broker), the agent fetching and uploading over `https://`, each
/// trusting the studio's own CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_studio_over_mqtts_and_https_prints_and_photographs() {
    let certs = tempfile::tempdir().unwrap();
    let Some(files) = testenv::tls_files(certs.path()) else { return };
    let Some((mqtt_url, prefix)) = testenv::mqtt().await else { return };
    let (host, port) = kiln_protocol::fleet::parse_mqtt_url(&mqtt_url).unwrap();
    let Some(proxy) = testenv::tls_proxy(&files, &format!("{host}:{port}")).await else { return };
    let secure = format!("mqtts://127.0.0.1:{}", proxy.port);
    let farm = studio_farm_with(&secure, &prefix, |cfg| {
        cfg.scheduler.tls.cert_file = Some(files.cert.clone());
        cfg.scheduler.tls.key_file = Some(files.key.clone());
        cfg.scheduler.tls.ca_file = Some(files.ca.clone());
    })
    .await;
    assert!(farm.url.starts_with("https://"), "{}", farm.url);
    let made = json!({ "name": "studio-pi", "role": "device", "devices": ALL });
    let token =
        farm.client.call(Method::POST, "/v1/tokens", Some(&made)).await.unwrap()["token"].as_str().unwrap().to_owned();
    let s = Studio::around(farm, PrinterSetup::default(), secure, prefix, Wiring::Tcp, token, None).await;
    s.wait_state(&ALL, "online", Duration::from_secs(20)).await;
    let asset = s.render(11).await;
    let print = s.create("printer", json!({ "kind": "print", "asset": asset })).await;
    let t = s.wait_task(&print, "succeeded", Duration::from_secs(30)).await;
    assert_eq!(states(&t), happy_path(), "{t:#}");
    let t = s.run_task("camera", json!({ "kind": "capture" }), Duration::from_secs(30)).await;
    let photo = t["output_asset"].as_str().expect("the capture names its photo");
    assert!(s.farm.raw(Method::GET, &format!("/v1/assets/{photo}"), "").await.body.starts_with(b"photo "));
    drop(s);
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_checks_deadlines_and_stamps_reports_by_the_schedulers_clock() {
    let Some(s) = Studio::start(PrinterSetup::default()).await else { return };
    s.wait_state(&["lights"], "online", Duration::from_secs(20)).await;
    let (raw, mut heard) = s.raw_client(&[s.topic("devices/lights/tasks/+")]).await;
    let now = kiln_protocol::now_ms();
    let hour = 3_600_000;
    // The scheduler's clock two hours behind the Pi's (the Pi booted with a wrong time): a task
    // whose deadline is an hour past by the Pi's clock has an hour left by the scheduler's.
    let mut early = wire("clock-1", TaskKind::Lights, None, json!({ "scene": 6, "brightness": 120 }));
    (early.deadline_ms, early.sent_ms) = (now - hour, Some(now - 2 * hour));
    raw.publish(s.topic("devices/lights/tasks"), QoS::AtLeastOnce, false, s.signed("lights", early)).await.unwrap();
    let r = loop {
        let r = Studio::report(&mut heard, "lights", "clock-1").await;
        if r["state"] != "accepted" && r["state"] != "running" {
            break r;
        }
    };
    assert_eq!(r["state"], "succeeded", "{r}");
    let at = r["at_ms"].as_i64().unwrap();
    assert!((now - 2 * hour..now - hour).contains(&at), "stamped by the scheduler's clock: {at} (now {now})");
    assert_eq!(&s.lights.registers()[..2], &[6, 120]);
    // The scheduler's clock two hours ahead: an hour left by the Pi's clock is an hour late.
    let mut late = wire("clock-2", TaskKind::Lights, None, json!({ "scene": 7, "brightness": 130 }));
    (late.deadline_ms, late.sent_ms) = (now + hour, Some(now + 2 * hour));
    raw.publish(s.topic("devices/lights/tasks"), QoS::AtLeastOnce, false, s.signed("lights", late)).await.unwrap();
    let r = Studio::report(&mut heard, "lights", "clock-2").await;
    assert_eq!((r["state"].as_str(), r["reason"].as_str()), (Some("rejected"), Some("deadline")), "{r}");
    assert_eq!(&s.lights.registers()[..2], &[6, 120], "the late task changed nothing");
    // A real task from the scheduler sets the clock back, and runs.
    let real = s
        .run_task(
            "lights",
            json!({ "kind": "lights", "params": { "scene": 2, "brightness": 50 } }),
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(real["state"], "succeeded", "{real}");
    assert_eq!(&s.lights.registers()[..2], &[2, 50]);
}

/// A studio for orders: small renders at every tier, so a whole `gallery-print` runs in seconds.
async fn order_studio(setup: PrinterSetup, change: impl FnOnce(&mut FarmConfig)) -> Option<Studio> {
    let (mqtt_url, prefix) = testenv::mqtt().await?;
    Some(
        Studio::start_configured(setup, mqtt_url, prefix, Wiring::Tcp, |cfg| {
            let t = &mut cfg.worker.tiers;
            for (spec, side) in [(&mut t.preview, 48), (&mut t.r#final, 64), (&mut t.print, 96)] {
                (spec.default_side, spec.default_samples) = (side, 1);
            }
            cfg.scheduler.orders.retry_base_seconds = 1;
            change(cfg);
        })
        .await,
    )
}

impl Studio {
    async fn order(&self, id: &str) -> Value {
        self.farm.client.call(Method::GET, &format!("/v1/orders/{id}"), None).await.unwrap()
    }

    /// Waits until order `id` is in `state`; fails at once if it ends in another.
    async fn wait_order(&self, id: &str, state: &str, within: Duration) -> Value {
        let until = Instant::now() + within;
        loop {
            let o = self.order(id).await;
            if o["state"] == state {
                return o;
            }
            let ended = ["succeeded", "failed", "cancelled"].contains(&o["state"].as_str().unwrap());
            assert!(!ended && Instant::now() < until, "order {id} is not {state}: {o:#}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn place(&self, body: Value) -> String {
        let o = self.farm.client.call(Method::POST, "/v1/orders", Some(&body)).await.unwrap();
        o["id"].as_str().unwrap().to_owned()
    }

    async fn decide(&self, approval: &str, body: Value) -> Value {
        self.farm.client.call(Method::POST, &format!("/v1/approvals/{approval}"), Some(&body)).await.unwrap()
    }

    async fn incidents(&self) -> Vec<Value> {
        let v = self.farm.client.call(Method::GET, "/v1/incidents", None).await.unwrap();
        v["incidents"].as_array().unwrap().clone()
    }
}

fn step<'a>(order: &'a Value, name: &str) -> &'a Value {
    order["steps"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gallery_print_order_waits_for_approval_then_prints_photographs_and_shows_the_choice() {
    let Some(s) = order_studio(PrinterSetup::default(), |_| {}).await else { return };
    s.wait_state(&ALL, "online", Duration::from_secs(20)).await;
    let id = s.place(json!({ "plan": "gallery-print", "prompt": "a kiln at dusk", "seeds": [3, 4, 5] })).await;
    let o = s.wait_order(&id, "awaiting_approval", Duration::from_secs(60)).await;
    assert_eq!(step(&o, "preview")["state"], "succeeded", "{o:#}");
    assert_eq!(step(&o, "final")["state"], "pending", "nothing past the gate runs before it: {o:#}");
    assert!(o["estimated_cost_ms"].as_i64() > Some(0), "its cost was estimated before it started: {o:#}");
    let list = s.farm.client.call(Method::GET, "/v1/approvals?state=pending", None).await.unwrap();
    let approvals = list["approvals"].as_array().unwrap();
    assert_eq!(approvals.len(), 1, "{list:#}");
    let a = &approvals[0];
    assert_eq!(a["order"], id.as_str());
    let options = a["options"].as_array().unwrap();
    assert_eq!(options.iter().map(|o| o["seed"].as_u64().unwrap()).collect::<Vec<_>>(), [3, 4, 5]);
    let previews: std::collections::BTreeSet<&str> = options.iter().map(|o| o["asset"].as_str().unwrap()).collect();
    assert_eq!(previews.len(), 3, "three different previews: {a:#}");
    for o in options {
        let thumb =
            s.farm.raw(Method::GET, &format!("/v1/assets/{}?variant=thumb", o["asset"].as_str().unwrap()), "").await;
        assert_eq!(thumb.status, 200, "each option's thumbnail is there to show");
    }
    // Decisions are checked before anything moves.
    let approval = a["id"].as_str().unwrap();
    for (body, field) in [
        (json!({ "decision": "approve" }), "option"),
        (json!({ "decision": "approve", "option": 4 }), "option"),
        (json!({ "decision": "reject" }), "reason"),
        (json!({ "decision": "maybe" }), "decision"),
    ] {
        let r = s.farm.raw(Method::POST, &format!("/v1/approvals/{approval}"), &body.to_string()).await;
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!((r.status.as_u16(), &v["error"]["field"]), (400, &json!(field)), "{body}: {v}");
    }
    let decided = s.decide(approval, json!({ "decision": "approve", "option": 2, "reason": "the warmest" })).await;
    assert_eq!(decided["approval"]["state"], "approved", "{decided:#}");
    let again =
        s.farm.raw(Method::POST, &format!("/v1/approvals/{approval}"), r#"{"decision":"approve","option":1}"#).await;
    assert_eq!(again.status, 409, "an approval is decided once");

    let o = s.wait_order(&id, "succeeded", Duration::from_secs(90)).await;
    assert_eq!(o["chosen_seed"], 4, "{o:#}");
    for st in o["steps"].as_array().unwrap() {
        assert_eq!(st["state"], "succeeded", "{o:#}");
    }
    let ap = &o["approval"];
    assert_eq!(
        (ap["decided_by"].as_str(), ap["option"].as_u64(), ap["reason"].as_str()),
        (Some("operator"), Some(2), Some("the warmest"))
    );
    // The chosen seed, rendered final and print size.
    for (name, tier) in [("final", "final"), ("print_render", "print")] {
        let job_id = step(&o, name)["jobs"][0].as_str().unwrap();
        let job = s.farm.client.call(Method::GET, &format!("/v1/jobs/{job_id}"), None).await.unwrap();
        assert_eq!((job["seed"].as_u64(), job["tier"].as_str()), (Some(4), Some(tier)), "{job:#}");
    }
    // The final and print assets' provenance names the order, its step and who approved.
    for name in ["final", "print_render"] {
        let asset = step(&o, name)["assets"][0].as_str().unwrap();
        let p = s.farm.client.call(Method::GET, &format!("/v1/assets/{asset}/provenance"), None).await.unwrap();
        assert_eq!(p["asset"], asset, "the worker's record is there: {p:#}");
        assert_eq!(p["asked_by"]["client"], "operator", "{p:#}");
        let by = &p["orders"][0];
        assert_eq!((by["order"].as_str(), by["step"].as_str()), (Some(id.as_str()), Some(name)), "{p:#}");
        assert_eq!(by["job"], step(&o, name)["jobs"][0], "{p:#}");
        let ap = &by["approval"];
        assert_eq!(
            (ap["decided_by"].as_str(), ap["option"].as_u64(), ap["reason"].as_str()),
            (Some("operator"), Some(2), Some("the warmest")),
            "{p:#}"
        );
        assert!(ap["decided_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{p:#}");
    }
    // Printed once, photographed, and the final asset on the gallery display.
    assert_eq!(s.printer.registers()[3], 1, "one print");
    let shown = o["outputs"]["shown"].as_str().unwrap();
    assert_eq!(shown, step(&o, "final")["assets"][0].as_str().unwrap());
    let on_screen = std::fs::read(s.dir.path().join("gallery/current.png")).unwrap();
    assert_eq!(blake3::hash(&on_screen).to_hex().as_str(), shown);
    let photo = o["outputs"]["photo"].as_str().unwrap();
    assert_eq!(s.farm.raw(Method::GET, &format!("/v1/assets/{photo}"), "").await.status, 200);
    assert_eq!(&s.lights.registers()[..2], &[2, 640], "the lights were set for the photo");
    // Its events tell the story.
    let states: Vec<&str> = o["events"].as_array().unwrap().iter().map(|e| e["state"].as_str().unwrap()).collect();
    for want in ["running", "awaiting_approval", "approved", "succeeded"] {
        assert!(states.contains(&want), "{states:?}");
    }
    let listed = s.farm.client.call(Method::GET, "/v1/orders?state=succeeded", None).await.unwrap();
    assert_eq!(listed["orders"][0]["id"], id.as_str());
    assert!(s.incidents().await.is_empty(), "nothing needed the operator");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_print_waits_for_a_printer_out_of_media_and_past_its_deadline_raises_an_incident() {
    let empty = PrinterSetup { media: 0, ..PrinterSetup::default() };
    let Some(s) = order_studio(empty, |cfg| cfg.scheduler.orders.printer_wait_seconds = 20).await else { return };
    s.wait_state(&ALL, "online", Duration::from_secs(20)).await;
    let studio = &s;
    let approve = |id: String| async move {
        let o = studio.wait_order(&id, "awaiting_approval", Duration::from_secs(60)).await;
        studio.decide(o["approval"]["id"].as_str().unwrap(), json!({ "decision": "approve", "option": 1 })).await;
        id
    };
    let id = approve(s.place(json!({ "prompt": "paper first", "seeds": [7] })).await).await;
    // It waits at the print step, saying why, and prints nothing.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let o = s.order(&id).await;
        let print = step(&o, "print");
        if print["state"] == "waiting" {
            assert!(print["detail"].as_str().unwrap().contains("not ready"), "{print}");
            break;
        }
        // Running, or still as the approval left it until the conductor takes it up.
        assert!(
            Instant::now() < until && ["running", "awaiting_approval"].contains(&o["state"].as_str().unwrap()),
            "{o:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(s.printer.registers()[3], 0, "nothing printed without paper");
    s.printer.refill(10, 100);
    let o = s.wait_order(&id, "succeeded", Duration::from_secs(60)).await;
    assert_eq!(s.printer.registers()[3], 1, "printed once, once refilled: {o:#}");
    assert!(s.incidents().await.is_empty());

    // Empty again, and left so past the wait: one incident, and the order fails saying why.
    s.printer.refill(0, 100);
    let id = approve(s.place(json!({ "prompt": "no paper", "seeds": [8] })).await).await;
    let o = s.wait_order(&id, "failed", Duration::from_secs(90)).await;
    assert!(o["error"].as_str().unwrap().contains("not ready"), "{o:#}");
    assert_eq!(step(&o, "photo")["state"], "skipped");
    let incidents = s.incidents().await;
    assert_eq!(incidents.len(), 1, "{incidents:#?}");
    let i = &incidents[0];
    assert_eq!(
        (i["kind"].as_str(), i["subject"].as_str(), i["state"].as_str()),
        (Some("device_not_ready"), Some(id.as_str()), Some("open"))
    );
    assert_eq!(i["actions"], json!(["retry", "resolve"]));
    // Refilled, the operator retries it from the incident, and it finishes.
    s.printer.refill(10, 100);
    let acted = s
        .farm
        .client
        .call(
            Method::POST,
            &format!("/v1/incidents/{}", i["id"].as_str().unwrap()),
            Some(&json!({ "action": "retry" })),
        )
        .await
        .unwrap();
    assert_eq!(acted["state"], "resolved", "{acted}");
    s.wait_order(&id, "succeeded", Duration::from_secs(60)).await;
    assert_eq!(s.printer.registers()[3], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_approval_renders_nothing_final_and_a_timeout_raises_one_incident() {
    let Some(s) = order_studio(PrinterSetup::default(), |_| {}).await else { return };
    s.wait_state(&ALL, "online", Duration::from_secs(20)).await;
    let id = s.place(json!({ "prompt": "not this one", "seeds": [1, 2] })).await;
    let o = s.wait_order(&id, "awaiting_approval", Duration::from_secs(60)).await;
    s.decide(o["approval"]["id"].as_str().unwrap(), json!({ "decision": "reject", "reason": "too dark" })).await;
    let o = s.wait_order(&id, "cancelled", Duration::from_secs(20)).await;
    assert!(o["error"].as_str().unwrap().contains("too dark"), "{o:#}");
    for name in ["final", "print_render", "print", "display"] {
        let st = step(&o, name);
        assert_eq!(st["state"], "skipped", "{o:#}");
        assert!(st["jobs"].is_null() && st["task"].is_null(), "{st}");
    }
    let finals = s.farm.client.call(Method::GET, "/v1/jobs?tier=final", None).await.unwrap();
    assert_eq!(finals["jobs"].as_array().unwrap().len(), 0, "no final render: {finals}");

    // An approval past its timeout raises one incident, however long it then waits.
    let id = s.place(json!({ "prompt": "waiting", "seeds": [5], "approval_timeout_seconds": 1 })).await;
    s.wait_order(&id, "awaiting_approval", Duration::from_secs(60)).await;
    let until = Instant::now() + Duration::from_secs(20);
    while s.incidents().await.is_empty() {
        assert!(Instant::now() < until, "no incident for the approval past its timeout");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let incidents = s.incidents().await;
    assert_eq!(incidents.len(), 1, "{incidents:#?}");
    assert_eq!(
        (incidents[0]["kind"].as_str(), incidents[0]["subject"].as_str()),
        (Some("approval_timeout"), Some(id.as_str()))
    );
    assert_eq!(s.order(&id).await["state"], "awaiting_approval", "the order waits; it does not decide on its own");
    // Cancelled while it waits.
    let c = s.farm.client.call(Method::POST, &format!("/v1/orders/{id}/cancel"), None).await.unwrap();
    assert_eq!(c["state"], "cancelled", "{c:#}");
    let list = s.farm.client.call(Method::GET, "/v1/approvals", None).await.unwrap();
    assert_eq!(list["approvals"].as_array().unwrap().len(), 0, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_killed_while_an_order_waits_on_the_printer_resumes_and_prints_once() {
    let Some((mqtt_url, prefix)) = testenv::mqtt().await else { return };
    // A print takes 3 s: long enough to kill the scheduler while the order waits on it.
    let printer =
        SimDevice::printer("127.0.0.1:0".parse().unwrap(), PrinterSetup { print_ms: 3_000, ..PrinterSetup::default() })
            .await
            .unwrap();
    let lights = SimDevice::lights("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = format!(
        "[scheduler]\nlisten = \"127.0.0.1:{port}\"\n[scheduler.orders]\nretry_base_seconds = 1\n\
         [scheduler.fleet]\nmqtt_url = \"{mqtt_url}\"\nprefix = \"{prefix}\"\nresend_after_seconds = 2\n{}",
        common::small_tiers()
    );
    let config_file = dir.path().join("kiln.toml");
    std::fs::write(&config_file, config).unwrap();
    let scheduler = || {
        let mut cmd = sibling("kiln-scheduler");
        cmd.arg("--config").arg(&config_file).arg("--data-dir").arg(&data).args(["--backend", "cpu"]);
        common::spawn_farm(cmd)
    };
    let (child, url) = scheduler();
    let mut procs = common::Killed(vec![child]);
    let op = common::operator_token(&data);
    let c = kiln_common::client::Client::new(&url, Some(kiln_protocol::Secret::new(op.clone())));
    let made = c
        .call(Method::POST, "/v1/tokens", Some(&json!({ "name": "studio-pi", "role": "device", "devices": ALL })))
        .await
        .unwrap();
    let buses = (format!("address = \"{}\"", printer.addr()), format!("address = \"{}\"", lights.addr()));
    let edge = dir.path().join("edge.toml");
    let token = made["token"].as_str().unwrap();
    std::fs::write(&edge, agent_config(dir.path(), &mqtt_url, &prefix, &url, token, (&buses.0, &buses.1), "", ""))
        .unwrap();
    let agent = sibling("kiln-edge").arg("--config").arg(&edge).env("KILN_LOG", "warn").stdout(Stdio::null()).spawn();
    procs.0.push(agent.expect("start kiln-edge"));
    let get = |path: String| {
        let c = &c;
        async move { c.call(Method::GET, &path, None).await }
    };
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let v = get("/v1/devices".into()).await.unwrap();
        if v["devices"].as_array().unwrap().iter().filter(|d| d["state"] == "online").count() == 4 {
            break;
        }
        assert!(Instant::now() < until, "the studio's devices did not come online: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let placed = c
        .call(Method::POST, "/v1/orders", Some(&json!({ "plan": "gallery-print", "prompt": "ash", "seeds": [1, 2] })))
        .await
        .unwrap();
    let id = placed["id"].as_str().unwrap().to_owned();
    let until = Instant::now() + Duration::from_secs(60);
    while get(format!("/v1/orders/{id}")).await.unwrap()["state"] != "awaiting_approval" {
        assert!(Instant::now() < until, "the order never asked for approval");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.call(Method::POST, &format!("/v1/approvals/{id}.approve"), Some(&json!({ "decision": "approve", "option": 1 })))
        .await
        .unwrap();
    // The printer starts: the order waits on it. The scheduler is killed there.
    let until = Instant::now() + Duration::from_secs(60);
    while printer.registers()[0] != 1 {
        assert!(Instant::now() < until, "the printer never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let o = get(format!("/v1/orders/{id}")).await.unwrap();
    assert_eq!(step(&o, "print")["state"], "running", "the order waits on the print: {o:#}");
    let mut first = procs.0.remove(0);
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    // The print finishes while no scheduler runs; one starts again on the same data.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (child, again) = scheduler();
    procs.0.push(child);
    assert_eq!(again, url);
    let until = Instant::now() + Duration::from_secs(90);
    let o = loop {
        let o = get(format!("/v1/orders/{id}")).await.unwrap();
        if o["state"] == "succeeded" {
            break o;
        }
        assert!(Instant::now() < until && o["state"] == "running", "the order did not finish: {o:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(printer.registers()[3], 1, "printed once: {:?}", printer.registers());
    let print = step(&o, "print");
    assert_eq!(print["attempt"], 1, "the print step ran once: {o:#}");
    let t = get(format!("/v1/tasks/{}", print["task"].as_str().unwrap())).await.unwrap();
    assert_eq!(t["state"], "succeeded", "{t:#}");
    let tasks = get("/v1/tasks?device=printer".into()).await.unwrap();
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 1, "one print task: {tasks:#}");
    for name in ["final", "print_render"] {
        assert_eq!(step(&o, name)["jobs"].as_array().unwrap().len(), 1, "rendered once: {o:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gallery_print_order_runs_the_same_on_a_distributed_farm() {
    let Some(db) = testenv::fresh_database().await else { return };
    let Some((amqp_url, amqp_prefix)) = testenv::amqp().await else { return };
    let (url, prefix) = (amqp_url.clone(), amqp_prefix.clone());
    let Some(s) = order_studio(PrinterSetup::default(), move |cfg| {
        cfg.scheduler.database_url = Some(db.into());
        cfg.scheduler.broker.amqp_url = Some(url.into());
        cfg.scheduler.broker.prefix = prefix;
    })
    .await
    else {
        return;
    };
    let token = s.farm.sched.create_token("workers", Role::Worker, &[], None, None).await.unwrap();
    let env = common::WorkerEnv {
        amqp_url: &amqp_url,
        prefix: &amqp_prefix,
        scheduler_url: &s.farm.url,
        token: token.expose(),
    };
    let (worker, _worker_dir) = common::spawn_worker(&env, "w-orders");
    let workers = common::Killed(vec![worker]);
    s.wait_state(&ALL, "online", Duration::from_secs(20)).await;
    let id = s.place(json!({ "plan": "gallery-print", "prompt": "a kiln at dusk", "seeds": [3, 4] })).await;
    s.wait_order(&id, "awaiting_approval", Duration::from_secs(60)).await;
    let decided = s.decide(&format!("{id}.approve"), json!({ "decision": "approve", "option": 2 })).await;
    assert_eq!(decided["approval"]["state"], "approved", "{decided:#}");
    let o = s.wait_order(&id, "succeeded", Duration::from_secs(90)).await;
    assert_eq!(o["chosen_seed"], 4, "{o:#}");
    assert_eq!(s.printer.registers()[3], 1, "one print");
    let shown = o["outputs"]["shown"].as_str().unwrap();
    let on_screen = std::fs::read(s.dir.path().join("gallery/current.png")).unwrap();
    assert_eq!(blake3::hash(&on_screen).to_hex().as_str(), shown);
    // The renders ran on the kiln-worker, and what they took on it is charged.
    let p = s.farm.client.call(Method::GET, &format!("/v1/assets/{shown}/provenance"), None).await.unwrap();
    assert_eq!(p["orders"][0]["order"], id.as_str(), "{p:#}");
    let usage = s.farm.client.call(Method::GET, "/v1/usage", None).await.unwrap();
    let renders: u64 = usage["days"].as_array().unwrap().iter().map(|d| d["renders"].as_u64().unwrap()).sum();
    assert_eq!(renders, 7, "two previews, a final and a print in 4 tiles: {usage:#}");
    drop(workers);
    let conn = kiln_common::amqp::connect(&amqp_url, "kiln-test").await.unwrap();
    let ch = kiln_common::amqp::confirm_channel(&conn).await.unwrap();
    let _ = kiln_common::amqp::delete_queues(&ch, &kiln_protocol::wire::Names::new(&amqp_prefix)).await;
}
