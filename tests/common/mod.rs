//! Starting a farm for a test: in process on port 0 in a fresh data dir, or as the `kiln`
//! binary (for the tests that kill it).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Method;
use kiln_common::client::{Client, Reply};
use kiln_scheduler::auth::Secret;
use kiln_scheduler::config::FarmConfig;
use kiln_scheduler::farm::Farm;
use kiln_scheduler::scheduler::Scheduler;
use kiln_worker::config::BackendChoice;
use kiln_worker::worker::open_backend;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A farm running inside the test process.
pub struct TestFarm {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub token: String,
    pub client: Client,
    pub sched: Arc<Scheduler>,
    stop: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// The config a test farm runs with: CPU backend, port 0, the given data dir.
pub fn test_config(data: &Path) -> FarmConfig {
    let mut cfg = FarmConfig::load_with(None, &|_| None).expect("default config");
    cfg.worker.data_dir = data.to_path_buf();
    cfg.worker.backend = BackendChoice::Cpu;
    cfg.worker.threads = 2;
    cfg.scheduler.listen = "127.0.0.1:0".parse().unwrap();
    cfg.scheduler.workers = 2;
    cfg.scheduler.retry.base_ms = 50;
    cfg
}

impl TestFarm {
    /// Starts a farm with the default test config.
    pub async fn start() -> TestFarm {
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_config(dir.path());
        Self::start_with(dir, cfg).await
    }

    /// Starts a farm with a config (its data dir inside `dir`).
    pub async fn start_with(dir: tempfile::TempDir, cfg: FarmConfig) -> TestFarm {
        let backend = open_backend(BackendChoice::Cpu, cfg.worker.threads()).unwrap();
        let farm = Farm::build(&cfg, backend).await.unwrap();
        let url = farm.url().unwrap();
        let token = std::fs::read_to_string(cfg.token_path()).unwrap().trim().to_owned();
        let sched = farm.scheduler().clone();
        let stop = CancellationToken::new();
        let handle = farm.spawn(stop.clone());
        let client = Client::new(&url, Some(Secret::new(token.clone())));
        TestFarm { dir, url, token, client, sched, stop, handle: Some(handle) }
    }

    /// A client with another token (or none).
    pub fn client_with(&self, token: Option<&str>) -> Client {
        Client::new(&self.url, token.map(|t| Secret::new(t.to_owned())))
    }

    /// Submits one job; panics unless the answer is 2xx.
    pub async fn submit(&self, body: Value) -> Value {
        self.client.call(Method::POST, "/v1/jobs", Some(&body)).await.unwrap()
    }

    /// Waits for a job to end and returns it.
    pub async fn wait(&self, id: &str) -> Value {
        self.client.call(Method::GET, &format!("/v1/jobs/{id}?wait=60"), None).await.unwrap()
    }

    /// A raw call.
    pub async fn raw(&self, method: Method, path: &str, body: &str) -> Reply {
        let body = (!body.is_empty()).then(|| hyper::body::Bytes::from(body.to_owned()));
        self.client.send(method, path, body).await.unwrap()
    }

    /// A counter or gauge from `/metrics` (the sum over its label sets that contain `labels`).
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = self.client.send(Method::GET, "/metrics", None).await.unwrap().body;
        metric_in(&String::from_utf8_lossy(&text), name, labels)
    }

    /// Stops the farm and waits for it.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
        self.dir
    }
}

/// Sums a metric's samples whose labels contain `labels`.
pub fn metric_in(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A port free on loopback now (for a child that must be told its port before it starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A job request body.
pub fn job(prompt: &str, seed: u64, tier: &str) -> Value {
    json!({ "prompt": prompt, "seed": seed, "tier": tier })
}

/// The `kiln` binary.
pub fn kiln() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env_remove("KILN_CONFIG").env_remove("KILN_DATA_DIR").env_remove("KILN_SERVER").env_remove("KILN_TOKEN");
    c.env("KILN_LOG", "warn");
    c
}

/// `kiln up` as a child process; returns it with the API URL it printed.
pub fn spawn_up(data: &Path, extra: &[&str]) -> (Child, String) {
    let mut cmd = kiln();
    cmd.args(["up", "--listen", "127.0.0.1:0", "--backend", "cpu", "--data-dir"]).arg(data);
    if !extra.contains(&"--mqtt-listen") {
        // Tests run side by side: each embedded broker on a port of its own.
        cmd.args(["--mqtt-listen", "127.0.0.1:0"]);
    }
    cmd.args(extra);
    spawn_farm(cmd)
}

/// Starts a farm binary (`kiln up`, `kiln-scheduler`); returns it with the API URL it printed.
/// Its log goes where `cmd` says (the test's, unless set).
pub fn spawn_farm(mut cmd: Command) -> (Child, String) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("the farm starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut url = None;
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        if let Some(rest) = line.trim().strip_prefix("API") {
            url = rest.split_whitespace().next().map(|u| u.trim_end_matches("/v1").to_owned());
            break;
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, url.expect("the farm printed its API URL"))
}

/// A binary built next to `kiln` by `cargo test --workspace` (`kiln-worker`, `kiln-scheduler`).
pub fn sibling(name: &str) -> Command {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_kiln")).with_file_name(name);
    assert!(exe.is_file(), "{} is not built (cargo test --workspace builds it)", exe.display());
    let mut c = Command::new(exe);
    c.env_remove("KILN_CONFIG").env("KILN_LOG", "warn");
    c
}

/// Where a `kiln-worker run` finds the broker and the scheduler.
pub struct WorkerEnv<'a> {
    pub amqp_url: &'a str,
    pub prefix: &'a str,
    pub scheduler_url: &'a str,
    pub token: &'a str,
}

/// `kiln-worker run` as a child process: CPU, one thread, two renders at once; with its data dir.
pub fn spawn_worker(env: &WorkerEnv, id: &str) -> (Child, tempfile::TempDir) {
    spawn_worker_with(env, id, &[])
}

/// [`spawn_worker`] with more environment variables.
pub fn spawn_worker_with(env: &WorkerEnv, id: &str, extra: &[(&str, &str)]) -> (Child, tempfile::TempDir) {
    spawn_worker_to(env, id, extra, Stdio::inherit())
}

/// [`spawn_worker_with`], its log going to `stderr`.
pub fn spawn_worker_to(env: &WorkerEnv, id: &str, extra: &[(&str, &str)], stderr: Stdio) -> (Child, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let child = sibling("kiln-worker")
        .arg("run")
        .env("KILN_DATA_DIR", data.path())
        .env("KILN_BACKEND", "cpu")
        .env("KILN_THREADS", "1")
        .env("KILN_AMQP_URL", env.amqp_url)
        .env("KILN_AMQP_PREFIX", env.prefix)
        .env("KILN_SCHEDULER_URL", env.scheduler_url)
        .env("KILN_WORKER_TOKEN", env.token)
        .env("KILN_WORKER_ID", id)
        .env("KILN_CONCURRENCY", "2")
        // A beat a second: the distributed tests' lost period (5 s) is then five missed beats,
        // not one late one.
        .env("KILN_HEARTBEAT_SECONDS", "1")
        .envs(extra.iter().copied())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("kiln-worker starts");
    (child, data)
}

/// The operator token of a data dir.
pub fn operator_token(data: &Path) -> String {
    std::fs::read_to_string(data.join("operator.token")).unwrap().trim().to_owned()
}

/// A path inside a temp dir.
pub fn file_in(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// The connection error an MQTT client gets from the broker on `port`, logging in as `login`
/// (user, password); it fails if the broker lets the client in.
pub async fn mqtt_refused(port: u16, login: Option<(&str, &str)>) -> rumqttc::ConnectionError {
    let mut opts = rumqttc::MqttOptions::new(format!("intruder-{}", std::process::id()), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    let (_client, mut events) = rumqttc::AsyncClient::new(opts, 8);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await.expect("an answer") {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => panic!("{login:?} was let in: {a:?}"),
            Ok(_) => {}
            Err(e) => return e,
        }
    }
}

/// A config file's tiers, small at every tier (48, 64 and 96 px, one sample), so a whole order
/// renders in seconds on a CPU.
pub fn small_tiers() -> String {
    let mut config = String::new();
    for (tier, side) in [("preview", 48), ("final", 64), ("print", 96)] {
        config.push_str(&format!(
            "[tiers.{tier}]\ndefault_side = {side}\nmax_side = 1024\nmax_pixels = 1048576\n\
             default_samples = 1\nmax_samples = 2\nwatermark = false\ndither = false\n"
        ));
    }
    config
}

/// Child processes killed when the test ends, however it ends (a failed assertion too).
pub struct Killed(pub Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The open incident about `subject`, once the farm behind `client` has raised it (up to 10 s).
pub async fn open_incident(client: &Client, subject: &str) -> Value {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let v = client.call(Method::GET, "/v1/incidents?state=open", None).await.unwrap();
        if let Some(i) = v["incidents"].as_array().unwrap().iter().find(|i| i["subject"] == subject) {
            return i.clone();
        }
        assert!(Instant::now() < until, "no open incident about {subject}: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `tool --version` runs; when it does not, says so and returns false, or fails when
/// services are required (CI installs `package`, which brings it).
pub fn tool_runs(tool: &str, package: &str) -> bool {
    let ran = Command::new(tool).arg("--version").output();
    if ran.as_ref().is_ok_and(|o| o.status.success()) {
        return true;
    }
    let why = format!("{tool} does not run ({:?})", ran.map(|o| o.status));
    assert!(!kiln_testenv::services_required(), "KILN_TEST_REQUIRE_SERVICES=1 but {why}; install {package}");
    eprintln!("skipping: {why}; install {package}, or KILN_TEST_REQUIRE_SERVICES=1 to fail");
    false
}

/// `promtool check metrics` passes `text` (a Prometheus exposition), where promtool runs (see
/// [`tool_runs`]).
pub fn promtool_check_metrics(text: &[u8]) {
    use std::io::Write;
    if !tool_runs("promtool", "prometheus") {
        return;
    }
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin.take().unwrap().write_all(text).unwrap();
    let out = lint.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check metrics:\n{said}");
}

/// The PNG one CPU worker renders of the whole print-tier request: what a print cut into tiles
/// must stitch to.
pub fn whole_print(prompt: &str, seed: u64, w: u32, h: u32, samples: Option<u32>) -> Vec<u8> {
    let r = kiln_protocol::RenderRequest::resolve(
        "cppn",
        prompt,
        seed,
        kiln_protocol::Tier::Print,
        Some(w),
        Some(h),
        samples,
        &kiln_protocol::TierLimits::default(),
    )
    .unwrap();
    let engine = kiln_worker::render::Engine {
        backend: kiln_worker::render::Backend::Cpu { threads: 2 },
        path: kiln_worker::render::ModelPath::Fused,
        band_samples: 1 << 20,
    };
    let mut out = Vec::new();
    kiln_worker::render::render_to(&engine, &r, &mut out, &mut |_| {}).unwrap();
    out
}
