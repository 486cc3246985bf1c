//! `kiln bench fleet`: many edge agents against a real MQTT broker and one scheduler.
//!
//! The scheduler (SQLite store, fleet bridge) runs in this process on a fresh data dir; the agents
//! are one `kiln-edge` child process driving `--agents` display devices, each with an MQTT session
//! of its own (its own connection, last will, spool and journal), all under a topic prefix of
//! this run's. Each run:
//! 1. waits until every device is online, then measures `--idle-seconds` of telemetry alone (one
//!    message per device every 5 s);
//! 2. creates `--tasks` display tasks through the API at `--rate` per second, round robin over the
//!    devices, and waits until every one has ended. A task's round trip is from its creation to
//!    its `succeeded`, both stamped by the scheduler: sent over MQTT, accepted, the asset fetched
//!    over HTTP and checked, shown (copied into the device's folder), reported back.
//!
//! The scheduler's CPU (user + system, as a share of one core) and RSS are this process's, read
//! from /proc; the agents' process is shown beside it. Figures are medians over `--runs`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hyper::Method;
use serde_json::json;

use kiln_scheduler::config::FarmConfig;
use kiln_scheduler::store::fleet::TaskState;

use crate::farm::{BenchFarm, Cleanup, Trips, tiny_jobs};
use crate::stats::{cpu_seconds, median, percentile, proc_status_mib};

/// `kiln bench fleet`'s arguments.
#[derive(Debug, Args)]
pub struct FleetBenchArgs {
    /// Simulated agents (display devices, each with its own MQTT session).
    #[arg(long, default_value_t = 500)]
    pub agents: usize,
    /// Display tasks per run.
    #[arg(long, default_value_t = 1000)]
    pub tasks: usize,
    /// Tasks created per second.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Seconds of telemetry alone measured before the tasks.
    #[arg(long, default_value_t = 10)]
    pub idle_seconds: u64,
    /// Runs; figures are medians.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// The MQTT broker.
    #[arg(long, env = "KILN_BENCH_MQTT_URL", default_value = "mqtt://127.0.0.1:1883")]
    pub mqtt_url: String,
}

struct RunFigures {
    idle_cpu: f64,
    idle_agents_cpu: f64,
    load_cpu: f64,
    load_agents_cpu: f64,
    rss_mb: f64,
    agents_rss_mb: f64,
    p50_ms: f64,
    p99_ms: f64,
    online_s: f64,
}

fn agent_config(dir: &Path, a: &FleetBenchArgs, prefix: &str, api: &str, token: &str) -> String {
    let mut text = format!(
        "data_dir = \"{}\"\n[mqtt]\nurl = \"{}\"\nprefix = \"{prefix}\"\n[scheduler]\nurl = \"{api}\"\ntoken = \"{token}\"\n",
        dir.join("edge").display(),
        a.mqtt_url
    );
    for i in 0..a.agents {
        text.push_str(&format!(
            "[[device]]\nid = \"d{i:04}\"\nkind = \"display\"\nfolder = \"{}\"\n",
            dir.join("screens").join(format!("d{i:04}")).display()
        ));
    }
    text
}

async fn one_run(cfg: &FarmConfig, a: &FleetBenchArgs, run: usize) -> anyhow::Result<RunFigures> {
    let prefix = format!("kbench{}-{run}", std::process::id());
    let farm = BenchFarm::start(cfg, &format!("fleet-{run}"), |cfg| {
        cfg.scheduler.workers = 1;
        cfg.scheduler.fleet.mqtt_url = Some(a.mqtt_url.as_str().into());
        cfg.scheduler.fleet.prefix = prefix.clone();
    })
    .await?;
    let c = farm.client.clone();
    tiny_jobs(&c, "fleet bench", 1, 1, 1, Trips::SubmitThenWait).await?;
    let asset = farm.sched.store.list(kiln_scheduler::store::ListQuery { limit: 1, ..Default::default() }).await?.jobs
        [0]
    .asset
    .clone()
    .context("the bench's asset")?;
    let devices: Vec<String> = (0..a.agents).map(|i| format!("d{i:04}")).collect();
    let made = c
        .call(
            Method::POST,
            "/v1/tokens",
            Some(&json!({ "name": "bench-agents", "role": "device", "devices": devices })),
        )
        .await?;
    let token = made["token"].as_str().context("no token")?.to_owned();
    let config = farm.dir.join("edge.toml");
    std::fs::write(&config, agent_config(&farm.dir, a, &prefix, c.base(), &token))?;
    let exe = std::env::current_exe()?.with_file_name("kiln-edge");
    if !exe.is_file() {
        bail!("{} is missing: build it with `cargo build --release --workspace`", exe.display());
    }
    let mut agents = tokio::process::Command::new(&exe)
        .arg("--config")
        .arg(&config)
        .env("KILN_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .context("failed to start kiln-edge")?;
    let agent_pid = agents.id().context("kiln-edge has no pid")?.to_string();
    let me = std::process::id().to_string();

    let started = Instant::now();
    loop {
        let online = farm.sched.store.devices().await?.iter().filter(|d| d.state == "online").count();
        if online == a.agents {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("only {online} of {} devices came online in 120 s", a.agents);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let online_s = started.elapsed().as_secs_f64();
    eprintln!("  run {run}: {} devices online in {online_s:.1} s", a.agents);

    let (c0, a0, t0) = (cpu_seconds(&me)?, cpu_seconds(&agent_pid)?, Instant::now());
    tokio::time::sleep(Duration::from_secs(a.idle_seconds)).await;
    let wall = t0.elapsed().as_secs_f64();
    let idle_cpu = (cpu_seconds(&me)? - c0) / wall;
    let idle_agents_cpu = (cpu_seconds(&agent_pid)? - a0) / wall;

    let (c0, a0, t0) = (cpu_seconds(&me)?, cpu_seconds(&agent_pid)?, Instant::now());
    let mut ids = Vec::with_capacity(a.tasks);
    let gap = Duration::from_secs_f64(1.0 / f64::from(a.rate.max(1)));
    let mut tick = tokio::time::interval(gap);
    for i in 0..a.tasks {
        tick.tick().await;
        let body = json!({ "kind": "display", "asset": asset });
        let t = c.call(Method::POST, &format!("/v1/devices/d{:04}/tasks", i % a.agents), Some(&body)).await?;
        ids.push(t["id"].as_str().context("no task id")?.to_owned());
    }
    let mut lat = Vec::with_capacity(ids.len());
    for id in &ids {
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            let t = farm.sched.store.task_row(id).await?.context("a task vanished")?;
            if t.state.is_terminal() {
                if t.state != TaskState::Succeeded {
                    bail!("task {id} ended {}: {}", t.state, t.detail.unwrap_or_default());
                }
                lat.push((t.updated_ms - t.created_ms) as f64);
                break;
            }
            if Instant::now() > until {
                bail!("task {id} still {} after 120 s", t.state);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let load_cpu = (cpu_seconds(&me)? - c0) / wall;
    let load_agents_cpu = (cpu_seconds(&agent_pid)? - a0) / wall;
    let (rss_mb, agents_rss_mb) = (proc_status_mib(&me, "VmRSS:"), proc_status_mib(&agent_pid, "VmRSS:"));
    lat.sort_by(f64::total_cmp);
    let _ = agents.kill().await;
    farm.stop(None).await?;
    Ok(RunFigures {
        idle_cpu,
        idle_agents_cpu,
        load_cpu,
        load_agents_cpu,
        rss_mb,
        agents_rss_mb,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        online_s,
    })
}

/// Runs the fleet benchmark and prints its figures.
pub async fn run(cfg: &FarmConfig, a: &FleetBenchArgs) -> anyhow::Result<()> {
    let _cleanup = Cleanup;
    if a.agents == 0 || a.agents > 10_000 || a.tasks == 0 || a.runs == 0 {
        bail!("--agents must be 1 to 10000; --tasks and --runs at least 1");
    }
    println!(
        "kiln bench fleet: {} agents (display devices, one MQTT session each) on {}, {} tasks at {}/s, {} runs",
        a.agents, a.mqtt_url, a.tasks, a.rate, a.runs
    );
    let mut runs = Vec::new();
    for run in 1..=a.runs {
        let f = one_run(cfg, a, run).await.with_context(|| format!("run {run}"))?;
        println!(
            "  run {run}: idle CPU {:.1}% (agents {:.1}%), under tasks {:.1}% (agents {:.1}%), RSS {:.0} MB (agents {:.0} MB), round trip p50 {:.0} ms p99 {:.0} ms",
            f.idle_cpu * 100.0,
            f.idle_agents_cpu * 100.0,
            f.load_cpu * 100.0,
            f.load_agents_cpu * 100.0,
            f.rss_mb,
            f.agents_rss_mb,
            f.p50_ms,
            f.p99_ms
        );
        runs.push(f);
    }
    let m = |f: fn(&RunFigures) -> f64| median(runs.iter().map(f).collect());
    println!("median of {} runs:", runs.len());
    println!("  devices online after      {:.1} s", m(|f| f.online_s));
    println!("  scheduler CPU, telemetry  {:.1}% of a core", m(|f| f.idle_cpu) * 100.0);
    println!("  scheduler CPU, tasks      {:.1}% of a core", m(|f| f.load_cpu) * 100.0);
    println!("  scheduler RSS             {:.0} MB", m(|f| f.rss_mb));
    println!(
        "  agents' process           {:.1}% CPU under tasks, {:.0} MB RSS",
        m(|f| f.load_agents_cpu) * 100.0,
        m(|f| f.agents_rss_mb)
    );
    println!("  task round trip           p50 {:.0} ms, p99 {:.0} ms", m(|f| f.p50_ms), m(|f| f.p99_ms));
    Ok(())
}
