//! `kiln-worker doctor`: what a new GPU box is checked for before it takes work, each on a line
//! with what to do when it fails: the config loads, the backend and its adapter and driver, a
//! short render and its speed, the scheduler answers, the broker lets this box in and the
//! scheduler's queues are there. Exits non-zero when a check fails; a warning (a CPU where a GPU
//! was hoped for) does not fail it.

use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_common::GlobalArgs;
use kiln_protocol::wire::Names;
use kiln_protocol::{RenderRequest, Tier};

use crate::config::{ConfigError, WorkerConfig};
use crate::daemon::RunConfig;
use crate::render::Backend;
use crate::worker::{Worker, open_backend};

/// How long the scheduler and the broker each have to answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// The side of the short render (a preview).
const SIDE: u32 = 256;

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    Ok(String),
    Warn(String),
    Fail(String),
}

/// The checks' findings, printed as they come.
#[derive(Default)]
struct Report {
    failed: usize,
}

impl Report {
    fn say(&mut self, what: &str, found: Found) {
        let (mark, text) = match found {
            Found::Ok(t) => ("ok  ", t),
            Found::Warn(t) => ("warn", t),
            Found::Fail(t) => {
                self.failed += 1;
                ("FAIL", t)
            }
        };
        println!("{mark}  {what:<10} {text}");
    }
}

/// `kiln-worker doctor`: runs every check with `loaded`, the configs `kiln-worker run` would use
/// (`crate::cli::load_configs`).
pub fn doctor(global: &GlobalArgs, loaded: Result<(WorkerConfig, RunConfig), ConfigError>) -> anyhow::Result<()> {
    let mut report = Report::default();
    let (mut cfg, run) = match loaded {
        Ok(c) => c,
        Err(e) => {
            report.say("config", Found::Fail(e.to_string()));
            anyhow::bail!("the config does not load");
        }
    };
    if let Some(d) = &global.data_dir {
        cfg.data_dir = d.clone();
    }
    let from =
        global.config.as_ref().map_or("defaults and KILN_* (no --config)".to_owned(), |p| p.display().to_string());
    report.say("config", Found::Ok(from));
    let backend = match open_backend(cfg.backend, cfg.threads()) {
        Ok(b) => {
            report.say("backend", backend_finding(&b));
            if let Backend::Wgpu(g) = &b {
                report.say("driver", Found::Ok(g.driver()));
            }
            Some(b)
        }
        Err(e) => {
            let hint = "install the GPU's Vulkan driver (NVIDIA: nvidia-vulkan-icd; AMD or Intel: mesa-vulkan-drivers) and libvulkan1, or set backend = \"cpu\"";
            report.say("backend", Found::Fail(format!("{e}: {hint}")));
            None
        }
    };
    if let Some(backend) = backend {
        report.say("render", short_render(&cfg, backend));
    }
    kiln_common::runtime()?.block_on(async {
        report.say("scheduler", scheduler(&run).await);
        report.say("broker", broker(&run).await);
    });
    // The config does not load without one (checked above); whether the scheduler knows it shows
    // on the first heartbeat.
    report.say(
        "token",
        match run.token {
            Some(_) => Found::Ok("set; the scheduler checks it on the first heartbeat and upload".into()),
            None => Found::Warn("none: set KILN_WORKER_TOKEN (from `kiln worker add`)".into()),
        },
    );
    match report.failed {
        0 => Ok(()),
        n => anyhow::bail!("{n} check(s) failed"),
    }
}

const GIB: f64 = (1u64 << 30) as f64;

fn backend_finding(b: &Backend) -> Found {
    match b {
        Backend::Wgpu(g) if g.is_software() => Found::Warn(format!(
            "wgpu on {}: a software adapter, slower than the CPU path; install the GPU's Vulkan driver",
            b.device_name()
        )),
        Backend::Wgpu(_) => {
            let usage = match b.usage() {
                Some(u) => format!(
                    "; {:.1} of {:.1} GiB in use, {}% busy (NVML)",
                    u.memory_used_bytes as f64 / GIB,
                    u.memory_total_bytes as f64 / GIB,
                    u.utilization_percent
                ),
                None => "; no memory or load figures from its driver (NVML is NVIDIA's)".into(),
            };
            Found::Ok(format!("wgpu on {}{usage}", b.device_name()))
        }
        Backend::Cpu { .. } => Found::Warn(format!(
            "cpu ({}): no hardware GPU adapter was found, or backend = \"cpu\" is set",
            b.device_name()
        )),
    }
}

/// A 256² preview rendered into a scratch store (nothing lands in the worker's own), timed from
/// the request: the shaders compile when the backend opens, before it.
fn short_render(cfg: &WorkerConfig, backend: Backend) -> Found {
    let scratch = std::env::temp_dir().join(format!("kiln-worker-doctor-{}", std::process::id()));
    let run = || -> anyhow::Result<Duration> {
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("no scratch folder for the test render: {}", scratch.display()))?;
        let cfg = WorkerConfig { data_dir: scratch.clone(), ..cfg.clone() };
        let worker = Worker::new(&cfg, backend)?;
        let req = RenderRequest::resolve(
            crate::engine::cppn::MODEL_ID,
            "kiln-worker doctor",
            1,
            Tier::Preview,
            Some(SIDE),
            Some(SIDE),
            Some(1),
            &cfg.tiers,
        )?;
        let t = Instant::now();
        worker.render(&req, &mut |_| {})?;
        Ok(t.elapsed())
    };
    let ran = run();
    let _ = std::fs::remove_dir_all(&scratch);
    match ran {
        Ok(took) => {
            let mpx = f64::from(SIDE * SIDE) / 1e6 / took.as_secs_f64().max(1e-9);
            Found::Ok(format!("{SIDE}×{SIDE} preview in {} ms ({mpx:.1} Mpx/s, shaders compiled)", took.as_millis()))
        }
        Err(e) => Found::Fail(format!("a {SIDE}×{SIDE} preview failed: {e:#}")),
    }
}

async fn scheduler(run: &RunConfig) -> Found {
    let url = &run.scheduler_url;
    let client = kiln_common::client::Client::new(url, None);
    match tokio::time::timeout(ANSWER_WITHIN, client.send(hyper::Method::GET, "/healthz", None)).await {
        Ok(Ok(r)) if r.status == 200 => Found::Ok(format!("{url} answers /healthz")),
        Ok(Ok(r)) => Found::Fail(format!("{url}/healthz answered {}: {}", r.status, String::from_utf8_lossy(&r.body))),
        Ok(Err(e)) => Found::Fail(format!("{url}: {e} (scheduler_url, KILN_SCHEDULER_URL)")),
        Err(_) => Found::Fail(format!("{url}: no answer within {} s", ANSWER_WITHIN.as_secs())),
    }
}

async fn broker(run: &RunConfig) -> Found {
    let names = Names::new(&run.amqp_prefix);
    let check = async {
        let conn = kiln_common::amqp::connect(run.amqp_url.expose(), "kiln-worker doctor").await?;
        let ch = conn.create_channel().await?;
        let found = kiln_common::amqp::check_topology(&ch, &names).await;
        let _ = conn.close(0, "doctor done".into()).await;
        found
    };
    match tokio::time::timeout(ANSWER_WITHIN, check).await {
        Ok(Ok(())) => {
            Found::Ok(format!("{} lets this box in; the {} queues are there", run.amqp_url.redacted(), names.prefix()))
        }
        Ok(Err(e)) => Found::Fail(format!(
            "{}: {e} (amqp_url, KILN_AMQP_URL; the login from `kiln worker add`; the scheduler declares the queues)",
            run.amqp_url.redacted()
        )),
        Err(_) => Found::Fail(format!("{}: no answer within {} s", run.amqp_url.redacted(), ANSWER_WITHIN.as_secs())),
    }
}
