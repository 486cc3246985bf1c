//! The distributed farm under faults, each with a few hundred jobs in flight: `kill -9` of the
//! scheduler, RabbitMQ stopped and started (`rabbitmqctl stop_app` / `start_app`), PostgreSQL
//! restarted. Each ends by checking that every job succeeded and that each has exactly one
//! `succeeded` event: nothing lost, nothing done twice.
//!
//! The scheduler (`kiln-scheduler`) and two workers (`kiln-worker run`) are processes of their
//! own. These tests stop services, so they live in this test target alone (cargo runs test
//! targets one after another) and take one lock, so they never overlap each other. The RabbitMQ
//! test stops the shared broker's app and a guard starts it again, pass or fail; the PostgreSQL
//! test restarts a private cluster it makes in a temp dir on a port of its own, so the shared
//! server is never touched.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{WorkerEnv, job, metric_in, operator_token, sibling, spawn_farm, spawn_worker};
use hyper::Method;
use kiln_common::client::Client;
use kiln_protocol::wire::Names;
use kiln_scheduler::auth::Secret;
use kiln_scheduler::store::Store;
use kiln_scheduler::store::postgres::PgStore;
use kiln_testenv as testenv;
use serde_json::{Value, json};

/// One fault test at a time (an async lock: it is held across awaits, and a failed test does
/// not poison it for the next).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Jobs each test submits.
const JOBS: u64 = 300;

/// A free loopback port (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The scheduler process, two worker processes, and what they share.
struct Fleet {
    data: tempfile::TempDir,
    port: u16,
    db: String,
    amqp_url: String,
    prefix: String,
    sched: Option<Child>,
    client: Client,
    worker_token: String,
    workers: Vec<(Child, tempfile::TempDir)>,
}

impl Fleet {
    /// `None` (the test skips) when a service is missing and not required.
    async fn start(db: String) -> Option<Fleet> {
        let (amqp_url, prefix) = testenv::amqp().await?;
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut fleet = Fleet {
            data,
            port,
            db,
            amqp_url,
            prefix,
            sched: None,
            client: Client::new("http://127.0.0.1:1", None),
            worker_token: String::new(),
            workers: Vec::new(),
        };
        fleet.start_scheduler();
        let created = fleet
            .client
            .call(Method::POST, "/v1/tokens", Some(&json!({ "name": "fault-workers", "role": "worker" })))
            .await
            .unwrap();
        fleet.worker_token = created["token"].as_str().unwrap().to_owned();
        for id in ["w-fault-1", "w-fault-2"] {
            let env = WorkerEnv {
                amqp_url: &fleet.amqp_url,
                prefix: &fleet.prefix,
                scheduler_url: &format!("http://127.0.0.1:{}", fleet.port),
                token: &fleet.worker_token,
            };
            fleet.workers.push(spawn_worker(&env, id));
        }
        Some(fleet)
    }

    /// Starts `kiln-scheduler` on the fleet's port, data dir, database and broker.
    fn start_scheduler(&mut self) {
        let mut cmd = sibling("kiln-scheduler");
        cmd.args(["--backend", "cpu", "--listen", &format!("127.0.0.1:{}", self.port), "--data-dir"])
            .arg(self.data.path())
            .env("KILN_DATABASE_URL", &self.db)
            .env("KILN_AMQP_URL", &self.amqp_url)
            .env("KILN_AMQP_PREFIX", &self.prefix);
        let (child, url) = spawn_farm(cmd);
        self.sched = Some(child);
        self.client = Client::new(&url, Some(Secret::new(operator_token(self.data.path()))));
    }

    fn kill_scheduler(&mut self) {
        if let Some(mut c) = self.sched.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn kill_all(&mut self) {
        self.kill_scheduler();
        for (c, _) in &mut self.workers {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Submits `JOBS` small distinct jobs, 32 at a time; returns their ids.
    async fn submit(&self) -> Vec<String> {
        let mut ids = Vec::new();
        let seeds: Vec<u64> = (0..JOBS).collect();
        for chunk in seeds.chunks(32) {
            let calls = chunk.iter().map(|&seed| {
                let mut body = job("a fault test", seed, "preview");
                body["width"] = 128.into();
                let c = self.client.clone();
                async move { c.call(Method::POST, "/v1/jobs", Some(&body)).await.unwrap() }
            });
            for j in futures_util::future::join_all(calls).await {
                ids.push(j["id"].as_str().unwrap().to_owned());
            }
        }
        ids
    }

    /// Jobs succeeded so far, by the scheduler's `/metrics` (0 while it cannot be asked).
    async fn succeeded(&self) -> f64 {
        match self.client.send(Method::GET, "/metrics", None).await {
            Ok(r) if r.status.is_success() => {
                metric_in(&String::from_utf8_lossy(&r.body), "kiln_jobs", "state=\"succeeded\"")
            }
            _ => 0.0,
        }
    }

    /// Waits until some jobs have succeeded and most are still to do: the moment for a fault.
    async fn wait_for_progress(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let done = self.succeeded().await;
            if done >= 10.0 {
                assert!(done < (JOBS / 2) as f64, "the fault must come with most jobs in flight ({done} done)");
                return;
            }
            assert!(Instant::now() < deadline, "no progress before the fault");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for every job to end (riding out the fault's aftermath: calls that fail are tried
    /// again); returns each job's last state.
    async fn wait_all(&self, ids: &[String], within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        for id in ids {
            loop {
                let got = self.client.call(Method::GET, &format!("/v1/jobs/{id}?wait=20"), None).await;
                if let Ok(j) = got
                    && ["succeeded", "failed", "cancelled", "cached"].contains(&j["state"].as_str().unwrap_or(""))
                {
                    out.push(j);
                    break;
                }
                assert!(Instant::now() < deadline, "job {id} did not end within {within:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        out
    }

    /// Every job succeeded, each with exactly one `succeeded` event in its log, and the store
    /// holds no job but these.
    async fn check_exactly_once(&self, ids: &[String]) {
        let jobs = self.wait_all(ids, Duration::from_secs(300)).await;
        let not_ok: Vec<&Value> = jobs.iter().filter(|j| j["state"] != "succeeded").collect();
        assert!(not_ok.is_empty(), "every job succeeded; these did not: {not_ok:?}");
        let store = PgStore::open(&self.db).await.unwrap();
        let mut counts = HashMap::new();
        for id in ids {
            let events = store.events(id, 0).await.unwrap();
            counts.insert(id.clone(), events.iter().filter(|e| e.state.as_str() == "succeeded").count());
        }
        let wrong: HashMap<_, _> = counts.iter().filter(|(_, n)| **n != 1).collect();
        assert!(wrong.is_empty(), "exactly one succeeded event per job; not so for {wrong:?}");
        let listed = self.client.call(Method::GET, "/v1/jobs?limit=500", None).await.unwrap();
        assert_eq!(listed["jobs"].as_array().unwrap().len(), ids.len(), "no job was made twice");
    }

    /// Stops the processes and deletes the test's queues.
    async fn stop(mut self) {
        self.kill_all();
        if let Ok(conn) = kiln_common::amqp::connect(&self.amqp_url, "kiln-test").await
            && let Ok(ch) = conn.create_channel().await
        {
            let _ = kiln_common::amqp::delete_queues(&ch, &Names::new(&self.prefix)).await;
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_scheduler_loses_nothing_and_repeats_nothing() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let Some(db) = testenv::fresh_database().await else { return };
    let Some(mut fleet) = Fleet::start(db).await else { return };
    let ids = fleet.submit().await;
    fleet.wait_for_progress().await;
    fleet.kill_scheduler();
    // Workers go on rendering and publishing results while it is gone; their uploads wait.
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.start_scheduler();
    fleet.check_exactly_once(&ids).await;
    fleet.stop().await;
}

/// Starts RabbitMQ's app again when dropped, pass or fail, and waits for its port.
struct StartAppGuard;

impl Drop for StartAppGuard {
    fn drop(&mut self) {
        let ok = Command::new("rabbitmqctl").arg("start_app").stdout(Stdio::null()).status();
        if !ok.is_ok_and(|s| s.success()) {
            eprintln!("rabbitmqctl start_app failed: start RabbitMQ by hand (rabbitmq-server -detached)");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect("127.0.0.1:5672").is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Runs `rabbitmqctl ARG`; `None` when it cannot be run here (the test then skips, unless
/// services are required).
fn rabbitmqctl(arg: &str) -> Option<()> {
    match Command::new("rabbitmqctl").arg(arg).stdout(Stdio::null()).status() {
        Ok(s) if s.success() => Some(()),
        other => {
            assert!(
                !testenv::services_required(),
                "rabbitmqctl {arg} failed ({other:?}); it needs root or the rabbitmq user"
            );
            eprintln!("skipping: rabbitmqctl {arg} failed ({other:?})");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_stopped_and_started_loses_nothing_and_repeats_nothing() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let Some(db) = testenv::fresh_database().await else { return };
    let Some(fleet) = Fleet::start(db).await else { return };
    let ids = fleet.submit().await;
    fleet.wait_for_progress().await;
    {
        let _restart = StartAppGuard;
        if rabbitmqctl("stop_app").is_none() {
            return;
        }
        let during = fleet.succeeded().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(fleet.succeeded().await, during, "nothing is recorded while the broker is down");
    }
    fleet.check_exactly_once(&ids).await;
    fleet.stop().await;
}

/// A PostgreSQL cluster of this test's own, in a temp dir, on a port of its own; stopped when
/// dropped. PostgreSQL will not run as root, so as root it runs as the `postgres` user.
struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl Cluster {
    fn start() -> Option<Cluster> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.flatten().map(|e| e.path().join("bin")).filter(|b| b.join("initdb").is_file()).max());
        let Some(bin) = bin else {
            assert!(!testenv::services_required(), "no PostgreSQL server binaries under /usr/lib/postgresql");
            eprintln!("skipping: no PostgreSQL server binaries under /usr/lib/postgresql");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let c = Cluster { dir, bin, port: free_port() };
        if is_root() {
            let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(c.dir.path()).status().unwrap();
            assert!(ok.success(), "chown the cluster dir to postgres");
        }
        let pgdata = c.pgdata();
        c.pg("initdb", &["-D", &pgdata, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]);
        c.ctl(&["start"]);
        Some(c)
    }

    fn pgdata(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// One of the server's programs, to run as `postgres` when root.
    fn program(&self, name: &str) -> Command {
        let exe = self.bin.join(name);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        }
    }

    /// Runs one of the server's programs; panics unless it succeeds.
    fn pg(&self, program: &str, args: &[&str]) {
        let out = self.program(program).args(args).output().unwrap();
        assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `pg_ctl ACTION` with this cluster's data dir, port and log, waiting until it is done.
    fn ctl(&self, action: &[&str]) {
        let pgdata = self.pgdata();
        let log = self.dir.path().join("log").display().to_string();
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.path().display());
        let mut args = vec!["-D", &pgdata, "-l", &log, "-o", &opts, "-w", "-t", "60"];
        args.extend_from_slice(action);
        self.pg("pg_ctl", &args);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let pgdata = self.pgdata();
        let stop = self.program("pg_ctl").args(["-D", &pgdata, "-m", "immediate", "-w", "stop"]).output();
        if !stop.is_ok_and(|o| o.status.success()) {
            eprintln!("could not stop the test's PostgreSQL cluster in {pgdata}");
        }
    }
}

fn is_root() -> bool {
    Path::new("/proc/self").metadata().is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restarted_loses_nothing_and_repeats_nothing() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let Some(cluster) = Cluster::start() else { return };
    let Some(fleet) = Fleet::start(cluster.url()).await else { return };
    let ids = fleet.submit().await;
    fleet.wait_for_progress().await;
    // An immediate shutdown is a crash as far as the server's clients and its WAL are concerned.
    cluster.ctl(&["-m", "immediate", "restart"]);
    fleet.check_exactly_once(&ids).await;
    fleet.stop().await;
}
