//! `kiln bench orders`: `--orders` studio orders in flight on the embedded farm, all waiting for
//! approval. Each runs a plan of three steps (preview its seed, the approval, render the chosen
//! seed final) at 16×16, so the renders cost next to nothing and what is measured is the orders:
//! the scheduler's RSS before and with them, its CPU while they wait (an order waiting costs no
//! task and no timer: this should stay near nothing), its live tasks, and the time to approve
//! them all (each decision, and until every order has ended). Figures are medians of `--runs`.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hyper::Method;
use kiln_protocol::Tier;
use kiln_scheduler::config::{FarmConfig, PlanConfig, PlanStepConfig};
use serde_json::json;

use crate::farm::{BenchFarm, Cleanup};
use crate::stats::{cpu_seconds, drive, median, proc_status_mib};

/// `kiln bench orders`' arguments.
#[derive(Debug, Args)]
pub struct OrdersBenchArgs {
    /// Orders in flight, each waiting for its approval.
    #[arg(long, default_value_t = 1000)]
    pub orders: usize,
    /// Seconds the scheduler's CPU is measured while they all wait.
    #[arg(long, default_value_t = 10)]
    pub idle_seconds: u64,
    /// Concurrent clients that place and approve them.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Runs; figures are medians.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

struct RunFigures {
    rss_before_mb: f64,
    rss_mb: f64,
    idle_cpu: f64,
    tasks_before: f64,
    tasks: f64,
    place_s: f64,
    approve_s: f64,
    done_s: f64,
}

/// The plan each order runs.
fn plan() -> PlanConfig {
    let step = |name: &str, kind: &str, tier: Option<Tier>, chosen: bool| PlanStepConfig {
        name: name.into(),
        kind: kind.into(),
        tier,
        chosen,
        task: None,
        asset: None,
        params: Default::default(),
    };
    PlanConfig {
        name: "bench".into(),
        steps: vec![
            step("look", "render", Some(Tier::Preview), false),
            step("pick", "approve", None, false),
            step("keep", "render", Some(Tier::Final), true),
        ],
    }
}

/// How many orders are in `state`, by the first page of at most 500.
async fn count(farm: &BenchFarm, state: &str) -> anyhow::Result<usize> {
    let mut n = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/orders?state={state}&limit=500");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={}", kiln_protocol::url_component(c)));
        }
        let page = farm.client.call(Method::GET, &path, None).await?;
        n += page["orders"].as_array().map_or(0, Vec::len);
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return Ok(n),
        }
    }
}

/// Waits until `n` orders are in `state`.
async fn until(farm: &BenchFarm, state: &str, n: usize, within: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + within;
    loop {
        let have = count(farm, state).await?;
        if have >= n {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("{have} of {n} orders are {state} after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn one_run(cfg: &FarmConfig, a: &OrdersBenchArgs, run: usize) -> anyhow::Result<RunFigures> {
    let farm = BenchFarm::start(cfg, &format!("orders-{run}"), |cfg| {
        cfg.scheduler.plans = vec![plan()];
        for spec in [&mut cfg.worker.tiers.preview, &mut cfg.worker.tiers.r#final] {
            (spec.default_side, spec.default_samples) = (16, 1);
        }
    })
    .await?;
    let me = std::process::id().to_string();
    let tasks = || tokio::runtime::Handle::current().metrics().num_alive_tasks() as f64;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_before_mb, tasks_before) = (proc_status_mib(&me, "VmRSS:"), tasks());

    let t0 = Instant::now();
    let c = farm.client.clone();
    drive(a.orders, a.clients, move |i| {
        let c = c.clone();
        async move {
            let t = Instant::now();
            let body = json!({ "plan": "bench", "prompt": "bench orders", "seeds": [i as u64] });
            c.call(Method::POST, "/v1/orders", Some(&body)).await?;
            Ok(t.elapsed().as_secs_f64())
        }
    })
    .await?;
    until(&farm, "awaiting_approval", a.orders, Duration::from_secs(600)).await?;
    let place_s = t0.elapsed().as_secs_f64();

    // All wait: settle, then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_mb, tasks_now) = (proc_status_mib(&me, "VmRSS:"), tasks());
    let c0 = cpu_seconds(&me)?;
    let w0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.idle_seconds)).await;
    let idle_cpu = (cpu_seconds(&me)? - c0) / w0.elapsed().as_secs_f64();

    let approvals = farm.client.call(Method::GET, "/v1/approvals?state=pending", None).await?;
    let ids: Vec<String> = approvals["approvals"]
        .as_array()
        .context("no approvals")?
        .iter()
        .filter_map(|ap| ap["id"].as_str().map(str::to_owned))
        .collect();
    if ids.len() != a.orders {
        bail!("{} approvals wait, not {}", ids.len(), a.orders);
    }
    let t1 = Instant::now();
    let c = farm.client.clone();
    let ids = std::sync::Arc::new(ids);
    drive(a.orders, a.clients, move |i| {
        let (c, ids) = (c.clone(), ids.clone());
        async move {
            let t = Instant::now();
            let body = json!({ "decision": "approve", "option": 1 });
            c.call(Method::POST, &format!("/v1/approvals/{}", ids[i]), Some(&body)).await?;
            Ok(t.elapsed().as_secs_f64())
        }
    })
    .await?;
    let approve_s = t1.elapsed().as_secs_f64();
    until(&farm, "succeeded", a.orders, Duration::from_secs(600)).await?;
    let done_s = t1.elapsed().as_secs_f64();
    farm.stop(None).await?;
    Ok(RunFigures { rss_before_mb, rss_mb, idle_cpu, tasks_before, tasks: tasks_now, place_s, approve_s, done_s })
}

/// Runs the orders benchmark and prints its figures.
pub async fn run(cfg: &FarmConfig, a: &OrdersBenchArgs) -> anyhow::Result<()> {
    let _cleanup = Cleanup;
    if a.orders == 0 || a.orders > 100_000 || a.runs == 0 || a.clients == 0 {
        bail!("--orders must be 1 to 100000; --runs and --clients at least 1");
    }
    println!(
        "kiln bench orders: {} orders (16×16 preview, approval, final) waiting for approval on the embedded farm, {} runs",
        a.orders, a.runs
    );
    let mut runs = Vec::new();
    for run in 1..=a.runs {
        let f = one_run(cfg, a, run).await.with_context(|| format!("run {run}"))?;
        println!(
            "  run {run}: placed in {:.1} s; waiting: RSS {:.0} MB (before {:.0} MB), CPU {:.2}% of a core, {} tasks (before {}); approved in {:.1} s, all done in {:.1} s",
            f.place_s,
            f.rss_mb,
            f.rss_before_mb,
            f.idle_cpu * 100.0,
            f.tasks,
            f.tasks_before,
            f.approve_s,
            f.done_s
        );
        runs.push(f);
    }
    let m = |f: fn(&RunFigures) -> f64| median(runs.iter().map(f).collect());
    let per_order_kib = (m(|f| f.rss_mb) - m(|f| f.rss_before_mb)) * 1024.0 / a.orders as f64;
    println!("median of {} runs:", runs.len());
    println!("  placed, previews rendered       {:.1} s", m(|f| f.place_s));
    println!("  RSS while they wait             {:.0} MB ({:+.1} KiB an order)", m(|f| f.rss_mb), per_order_kib);
    println!("  CPU while they wait             {:.2}% of a core", m(|f| f.idle_cpu) * 100.0);
    println!(
        "  live tokio tasks                {:.0} (before the orders {:.0})",
        m(|f| f.tasks),
        m(|f| f.tasks_before)
    );
    println!(
        "  every approval decided          {:.1} s ({:.0}/s)",
        m(|f| f.approve_s),
        a.orders as f64 / m(|f| f.approve_s)
    );
    println!("  every order ended after         {:.1} s", m(|f| f.done_s));
    Ok(())
}
