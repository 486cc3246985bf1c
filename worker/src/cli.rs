//! The `kiln-worker` command line: `render` one image, `bench` the engine.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use kiln_common::{GlobalArgs, run_main};
use kiln_protocol::{RenderRequest, Tier};

use crate::config::{BackendChoice, WorkerConfig};
use crate::daemon::RunConfig;
use crate::engine::cppn::MODEL_ID;
use crate::render::{ModelPath, Progress};
use crate::worker::{Worker, open_backend};

/// Kiln's GPU worker: renders (prompt, seed, tier) to the same PNG every time.
#[derive(Debug, Parser)]
#[command(name = "kiln-worker", version, about, long_about = None)]
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Render one image (or answer it from the cache) and copy the PNG to --out.
    Render(RenderArgs),
    /// Run as a daemon of the distributed farm: take jobs from RabbitMQ, render, upload the
    /// asset to the scheduler, publish the result. Settings: `[run]` in the config file, KILN_*
    /// environment, these flags. SIGTERM drains (finishes what is in hand, hands back the rest).
    Run(RunArgs),
    /// Check this box before it takes work: the config, the backend with its adapter and driver, a
    /// short render's speed, the scheduler and the broker (with `run`'s settings). Exits non-zero
    /// when a check fails, with what to do on its line.
    Doctor,
}

/// `run`'s arguments (each overrides `[run]` and the environment).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The broker, e.g. amqp://user:pass@host:5672/%2f [env KILN_AMQP_URL].
    #[arg(long)]
    pub amqp_url: Option<String>,
    /// Tiers to serve, comma separated, e.g. preview,final [default: all; env KILN_WORKER_TIERS].
    #[arg(long)]
    pub tiers: Option<String>,
    /// The scheduler, for asset uploads [default: http://127.0.0.1:7878; env KILN_SCHEDULER_URL].
    #[arg(long)]
    pub scheduler_url: Option<String>,
    /// Renders at once [default: 1; env KILN_CONCURRENCY].
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Deliveries the broker may send ahead per tier [default: 32; env KILN_PREFETCH].
    #[arg(long)]
    pub prefetch: Option<u16>,
    /// auto, cpu or wgpu [default: auto; env KILN_BACKEND].
    #[arg(long, value_enum)]
    pub backend: Option<BackendChoice>,
    /// Serve /metrics and /healthz here, e.g. 0.0.0.0:9464 [default: off; env KILN_METRICS_LISTEN].
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// `render`'s arguments.
#[derive(Debug, Args)]
pub struct RenderArgs {
    /// The prompt; its words steer palette, symmetry, frequency and contrast.
    #[arg(long)]
    pub prompt: String,
    /// The seed.
    #[arg(long, allow_negative_numbers = true)]
    pub seed: u64,
    /// preview (512 px, watermarked), final (2048 px, 4×4 supersampled) or print (8192 px, dithered).
    #[arg(long, default_value = "preview")]
    pub tier: String,
    /// Width in pixels [default: the tier's; alone, makes a square].
    #[arg(long, allow_negative_numbers = true)]
    pub width: Option<u32>,
    /// Height in pixels [default: the tier's; alone, makes a square].
    #[arg(long, allow_negative_numbers = true)]
    pub height: Option<u32>,
    /// Supersampling per axis (samples × samples per pixel) [default: the tier's].
    #[arg(long, allow_negative_numbers = true)]
    pub samples: Option<u32>,
    /// auto, cpu or wgpu [default: auto; env KILN_BACKEND].
    #[arg(long, value_enum)]
    pub backend: Option<BackendChoice>,
    /// fused (fast built-in kernels) or burn (the generic burn Module) [env KILN_ENGINE].
    #[arg(long, value_enum)]
    pub engine: Option<ModelPath>,
    /// Where to write the PNG.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the thumbnail here.
    #[arg(long)]
    pub thumb: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Loads the engine's config and the daemon's (`[run]`): defaults < file < environment.
pub fn load_configs(
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(WorkerConfig, RunConfig), crate::config::ConfigError> {
    use crate::config::{ConfigError, read_toml};
    let (mut cfg, mut run) = (WorkerConfig::default(), RunConfig::default());
    if let Some(path) = file {
        let mut table = read_toml(path)?;
        if let Some(r) = table.remove("run") {
            run = r.try_into().map_err(|e: toml::de::Error| ConfigError::Parse {
                path: path.into(),
                message: format!("in [run]: {e}"),
            })?;
        }
        cfg = WorkerConfig::from_table(table, path)?;
    }
    cfg.apply_env(env)?;
    run.apply_env(env)?;
    Ok((cfg, run))
}

/// Loads the config with the command line's overrides on top.
pub fn load_config(cli: &Cli) -> anyhow::Result<WorkerConfig> {
    let mut cfg = WorkerConfig::load(cli.global.config.as_deref())?;
    if let Some(d) = &cli.global.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Some(Command::Render(r)) = &cli.command {
        cfg.backend = r.backend.unwrap_or(cfg.backend);
        cfg.engine = r.engine.unwrap_or(cfg.engine);
    }
    Ok(cfg)
}

/// Reports progress: a bar on a terminal, a log line every quarter otherwise.
pub fn progress_reporter(label: String) -> impl FnMut(Progress) {
    let bar = kiln_common::progress::rows_bar(&label, 1, false);
    let mut last_quarter = 0;
    move |p: Progress| {
        if bar.is_hidden() {
            let pct = u64::from(p.rows_done) * 100 / u64::from(p.rows.max(1));
            if pct / 25 > last_quarter {
                last_quarter = pct / 25;
                tracing::info!(rows_done = p.rows_done, rows = p.rows, "{label}: {pct}%");
            }
            return;
        }
        bar.set_length(u64::from(p.rows));
        bar.set_position(u64::from(p.rows_done));
        if p.rows_done == p.rows {
            bar.finish();
        }
    }
}

fn check_writable(out: &Path) -> anyhow::Result<()> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("--out {}: the directory {} does not exist", out.display(), parent.display());
    }
    if out.is_dir() {
        bail!("--out {}: is a directory; give a file name ending in .png", out.display());
    }
    Ok(())
}

/// `kiln-worker render`.
pub fn render(cfg: &WorkerConfig, args: &RenderArgs) -> anyhow::Result<()> {
    let tier: Tier = args.tier.parse()?;
    let req = RenderRequest::resolve(
        MODEL_ID,
        &args.prompt,
        args.seed,
        tier,
        args.width,
        args.height,
        args.samples,
        &cfg.tiers,
    )?;
    // Fail on an unwritable output before spending minutes on the render.
    check_writable(&args.out)?;
    if let Some(t) = &args.thumb {
        check_writable(t)?;
    }
    let backend = open_backend(cfg.backend, cfg.threads()).context("failed to open the backend")?;
    let worker = Worker::new(cfg, backend)?;
    let label = format!("rendering {}×{} {} on {}", req.width, req.height, req.tier, worker.engine().backend.name());
    let done = worker.render(&req, &mut progress_reporter(label))?;
    std::fs::copy(&done.path, &args.out).with_context(|| format!("failed to write --out {}", args.out.display()))?;
    if let Some(t) = &args.thumb {
        // An image no larger than a thumbnail is its own; a larger asset found in the store
        // from an upload without its thumbnail has none.
        let thumb = worker.store().thumbnail(&done.asset).with_context(|| {
            format!("--thumb: asset {} in {} has no thumbnail", done.asset, worker.store().root().display())
        })?;
        std::fs::copy(thumb, t).with_context(|| format!("failed to write --thumb {}", t.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else {
        println!("asset {}", done.asset);
        println!("key   {}", done.key);
        println!("cache {}", if done.cache_hit { "hit" } else { "miss" });
        println!("out   {}", args.out.display());
        if let Some(s) = &done.stats {
            println!(
                "took  {:.2} s ({} on {})",
                s.total_seconds,
                worker.engine().backend.name(),
                worker.engine().backend.device_name()
            );
        }
    }
    Ok(())
}

/// `kiln-worker`'s `main` after parsing.
pub fn main_with(cli: Cli) -> std::process::ExitCode {
    let global = cli.global.clone();
    run_main(&global, || run(cli))
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Some(Command::Run(args)) => return run_daemon(&cli.global, args),
        Some(Command::Doctor) if !cli.global.print_config => {
            let env = |k: &str| std::env::var(k).ok();
            return crate::doctor::doctor(&cli.global, load_configs(cli.global.config.as_deref(), &env));
        }
        _ => {}
    }
    let cfg = load_config(&cli)?;
    if cli.global.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    match &cli.command {
        Some(Command::Render(args)) => render(&cfg, args),
        Some(Command::Run(_) | Command::Doctor) => unreachable!("handled above"),
        None => bail!(
            "no command given; try `kiln-worker run --help` or `kiln-worker render --help` (the engine's benchmark is `kiln bench engine`)"
        ),
    }
}

/// `kiln-worker run`.
fn run_daemon(global: &GlobalArgs, args: &RunArgs) -> anyhow::Result<()> {
    let env = |k: &str| std::env::var(k).ok();
    let (mut cfg, mut run) = load_configs(global.config.as_deref(), &env)?;
    if let Some(d) = &global.data_dir {
        cfg.data_dir = d.clone();
    }
    cfg.backend = args.backend.unwrap_or(cfg.backend);
    let flags = |k: &str| match k {
        "KILN_AMQP_URL" => args.amqp_url.clone(),
        "KILN_WORKER_TIERS" => args.tiers.clone(),
        "KILN_SCHEDULER_URL" => args.scheduler_url.clone(),
        "KILN_CONCURRENCY" => args.concurrency.map(|c| c.to_string()),
        "KILN_PREFETCH" => args.prefetch.map(|c| c.to_string()),
        "KILN_METRICS_LISTEN" => args.metrics_listen.map(|a| a.to_string()),
        _ => None,
    };
    run.apply_env(&flags).map_err(|e| {
        let flag = |s: String| {
            [
                ("KILN_AMQP_URL", "--amqp-url"),
                ("KILN_WORKER_TIERS", "--tiers"),
                ("KILN_SCHEDULER_URL", "--scheduler-url"),
                ("KILN_CONCURRENCY", "--concurrency"),
                ("KILN_PREFETCH", "--prefetch"),
                ("KILN_METRICS_LISTEN", "--metrics-listen"),
            ]
            .iter()
            .fold(s, |s, (k, f)| s.replace(k, f))
        };
        anyhow::anyhow!(flag(e.to_string()))
    })?;
    if global.print_config {
        let mut wrapped = toml::Table::new();
        wrapped.insert("run".into(), toml::Value::try_from(&run)?);
        print!("{}\n{}", cfg.to_toml(), toml::to_string_pretty(&wrapped)?);
        return Ok(());
    }
    kiln_common::runtime()?.block_on(async move {
        let backend = open_backend(cfg.backend, cfg.threads()).context("failed to open the backend")?;
        let worker = std::sync::Arc::new(Worker::new(&cfg, backend)?);
        crate::daemon::run(worker, run, kiln_common::cancel_on_signal()).await
    })
}
