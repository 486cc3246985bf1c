//! The `kiln-worker` command line: `render` one image, `bench` the engine.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use kiln_protocol::{RenderRequest, Tier};

use crate::config::{BackendChoice, WorkerConfig};
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

/// Options every Kiln binary takes, on any subcommand.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// TOML config file (defaults < file < KILN_* environment).
    #[arg(long, global = true, env = "KILN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory: database, assets, cache index, operator token [default: ~/.local/share/kiln; env KILN_DATA_DIR].
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long, global = true)]
    pub print_config: bool,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    pub log_json: bool,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Render one image (or answer it from the cache) and copy the PNG to --out.
    Render(RenderArgs),
    /// Measure the engine: megapixels/s, effective GFLOP/s and peak memory per backend and tier.
    Bench(crate::bench::BenchArgs),
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

/// Reports progress: a redrawn line on a terminal, a log line every quarter otherwise.
pub fn progress_reporter(label: String) -> impl FnMut(Progress) {
    let tty = std::io::stderr().is_terminal();
    let mut last_quarter = 0;
    move |p: Progress| {
        let pct = u64::from(p.rows_done) * 100 / u64::from(p.rows.max(1));
        if tty {
            eprint!("\r{label}: {pct:3}% ({}/{} rows)", p.rows_done, p.rows);
            if p.rows_done == p.rows {
                eprintln!();
            }
        } else if pct / 25 > last_quarter {
            last_quarter = pct / 25;
            tracing::info!(rows_done = p.rows_done, rows = p.rows, "{label}: {pct}%");
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
        std::fs::copy(worker.store().thumb_path(&done.asset), t)
            .with_context(|| format!("failed to write --thumb {}", t.display()))?;
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

/// The whole of a binary's `main` after parsing: logging (`KILN_LOG` filter, JSON on request),
/// the command, and its error printed once with its whole chain, as an exit code.
pub fn run_main(global: &GlobalArgs, run: impl FnOnce() -> anyhow::Result<()>) -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| "info,wgpu=warn,naga=warn,cubecl=warn,sqlx=warn".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if global.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `kiln-worker`'s `main` after parsing.
pub fn main_with(cli: Cli) -> std::process::ExitCode {
    let global = cli.global.clone();
    run_main(&global, || run(cli))
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = load_config(&cli)?;
    if cli.global.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    match &cli.command {
        Some(Command::Render(args)) => render(&cfg, args),
        Some(Command::Bench(args)) => crate::bench::run(&cfg, args),
        None => bail!("no command given; try `kiln-worker render --help` or `kiln-worker bench --help`"),
    }
}
