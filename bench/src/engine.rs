//! `kiln bench engine`: megapixels per second, effective GFLOP/s and peak memory for each backend
//! at the preview and final tier sizes, plus one large print render as the bounded-memory check.
//!
//! Effective GFLOP/s = the CPPN's multiply-add FLOPs per sample (2 × 3520) × samples / seconds in
//! the model and post chain (PNG encoding excluded). Figures are medians of `--runs` runs.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use kiln_protocol::{RenderRequest, Tier};

use kiln_worker::config::{BackendChoice, WorkerConfig};
use kiln_worker::engine::cppn::{Cppn, FLOPS_PER_SAMPLE, MODEL_ID, SampleTile, render_tile_cpu};
use kiln_worker::engine::style::Style;
use kiln_worker::gpu::{BandRenderer, Gpu};
use kiln_worker::render::{Backend, Engine, ModelPath, render_to};
use kiln_worker::worker::open_backend;

use crate::stats::{median, proc_status_mib};

/// `bench`'s arguments.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// cpu, wgpu, or both (all).
    #[arg(long, default_value = "all")]
    pub backend: String,
    /// Runs per case; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Side of the print-tier render (square, 1 sample per pixel); 0 skips it.
    #[arg(long, default_value_t = 8192)]
    pub print_side: u32,
    /// Side of the final-tier render [default: the tier's default, 2048].
    #[arg(long)]
    pub final_side: Option<u32>,
    /// Evaluate the model with the generic burn path instead of the fused kernels.
    #[arg(long)]
    pub burn: bool,
    /// Another version of the fused WGSL kernel (the bindings of shaders/cppn.wgsl) to time
    /// alone against the built-in one, with the largest difference of its samples from the
    /// built-in kernel's; repeatable. Nothing is rendered with it outside the benchmark.
    #[arg(long = "cppn-wgsl", value_name = "FILE")]
    pub cppn_wgsl: Vec<PathBuf>,
}

/// Peak resident memory since the last reset, in MiB (Linux; 0 elsewhere).
fn peak_rss_mib() -> f64 {
    proc_status_mib("self", "VmHWM:")
}

/// Resets the peak so the next reading covers one case only.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The fused model alone, without post chain, bands or read-back: where the rest of a render's
/// time goes. A GPU gets 16× the CPU's samples, so its run is not mostly launch and wait.
fn model_only(backend: &Backend, runs: usize, label: &str) -> anyhow::Result<()> {
    let c = bench_model();
    let (w, h) = match backend {
        Backend::Wgpu(g) if !g.is_software() => (4096, 4096),
        _ => (2048, 512),
    };
    let tile = SampleTile { x0: 0, y0: 0, w, h, full_w: w, full_h: h };
    let mut model: Box<dyn FnMut() -> anyhow::Result<()> + '_> = match backend {
        Backend::Wgpu(g) => {
            let bands = BandRenderer::new(g, &c, tile.len(), 1, 1);
            Box::new(move || Ok(bands.model_only(&tile, 1).map(drop)?))
        }
        Backend::Cpu { threads } => {
            let mut out = vec![0.0; tile.len() * 3];
            Box::new(move || {
                render_tile_cpu(&c, &tile, *threads, &mut out);
                Ok(())
            })
        }
    };
    let mut once = || -> anyhow::Result<f64> {
        let t = std::time::Instant::now();
        model()?;
        Ok(t.elapsed().as_secs_f64())
    };
    once()?; // warm: the buffers' first touch
    let secs = (0..runs).map(|_| once()).collect::<anyhow::Result<Vec<f64>>>()?;
    let s = median(secs);
    println!(
        "# {} model only ({label}, {w}x{h} samples): {:.1} GFLOP/s",
        backend.name(),
        tile.len() as f64 * FLOPS_PER_SAMPLE as f64 / s / 1e9
    );
    Ok(())
}

/// The request every case renders, and so the model the "model only" figures time.
const PROMPT: &str = "bench ember kaleidoscope";
const SEED: u64 = 7;

fn bench_model() -> Cppn {
    Cppn::new(SEED, Style::from_prompt(PROMPT))
}

/// Each `--cppn-wgsl` kernel: its samples against the built-in kernel's over one tile (largest
/// difference), then its "model only" figure.
fn other_kernels(files: &[PathBuf], builtin: &Gpu, runs: usize) -> anyhow::Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    let c = bench_model();
    let tile = SampleTile { x0: 0, y0: 0, w: 512, h: 512, full_w: 512, full_h: 512 };
    let reference = BandRenderer::new(builtin, &c, tile.len(), 1, 1).model_only(&tile, tile.len())?;
    for file in files {
        let what = format!("--cppn-wgsl {}", file.display());
        let src = std::fs::read_to_string(file).context(what.clone())?;
        let gpu = Gpu::with_cppn(Some(&src)).context(what)?;
        let got = BandRenderer::new(&gpu, &c, tile.len(), 1, 1).model_only(&tile, tile.len())?;
        let diff = reference.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let label = file.file_name().map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into_owned());
        println!("# wgpu {label}: largest sample difference from the built-in kernel {diff:e} (512x512 samples)");
        model_only(&Backend::Wgpu(std::sync::Arc::new(gpu)), runs, &label)?;
    }
    Ok(())
}

/// Runs the benchmark and prints a table.
pub fn run(cfg: &WorkerConfig, args: &BenchArgs) -> anyhow::Result<()> {
    let choices = match args.backend.as_str() {
        "all" => vec![BackendChoice::Cpu, BackendChoice::Wgpu],
        "cpu" => vec![BackendChoice::Cpu],
        "wgpu" => vec![BackendChoice::Wgpu],
        other => anyhow::bail!("--backend: unknown backend {other:?}; expected cpu, wgpu or all"),
    };
    if !args.cppn_wgsl.is_empty() && !choices.contains(&BackendChoice::Wgpu) {
        anyhow::bail!("--cppn-wgsl: other kernels run on wgpu; use --backend wgpu or all");
    }
    let runs = args.runs.max(1);
    let mut limits = cfg.tiers.clone();
    limits.print.max_side = limits.print.max_side.max(args.print_side);
    limits.print.max_pixels = limits.print.max_pixels.max(u64::from(args.print_side).pow(2));
    let final_side = args.final_side.unwrap_or(limits.r#final.default_side);
    let mut cases = vec![(Tier::Preview, limits.preview.default_side, runs), (Tier::Final, final_side, runs)];
    if args.print_side > 0 {
        cases.push((Tier::Print, args.print_side, 1));
    }
    println!(
        "# kiln bench engine: CPPN 11→4×32→3, {} FLOPs/sample; medians of {runs} runs; cpu threads {}",
        FLOPS_PER_SAMPLE,
        cfg.threads()
    );
    println!(
        "{:<6} {:<8} {:>11} {:>4} {:>4} {:>9} {:>8} {:>10} {:>8} {:>9}",
        "backend", "tier", "size", "spp", "runs", "median_s", "Mpx/s", "Msample/s", "GFLOP/s", "peak_MiB"
    );
    for choice in choices {
        let backend = match open_backend(choice, cfg.threads()) {
            Ok(b) => b,
            Err(e) => {
                println!("{:<6} skipped: {e}", format!("{choice:?}").to_lowercase());
                continue;
            }
        };
        println!("# {}: {}", backend.name(), backend.device_name());
        let path = if args.burn { ModelPath::Burn } else { ModelPath::Fused };
        let engine = Engine { backend, path, band_samples: cfg.band_samples };
        // One small render first: pipelines compile and lazy devices start outside the timings.
        let warm = RenderRequest::resolve(MODEL_ID, "warm up", 0, Tier::Preview, Some(64), None, None, &limits)?;
        render_to(&engine, &warm, std::io::sink(), &mut |_| {})?;
        for (tier, side, n) in &cases {
            let req = RenderRequest::resolve(MODEL_ID, PROMPT, SEED, *tier, Some(*side), None, None, &limits)?;
            reset_peak_rss();
            let mut secs = Vec::new();
            let mut samples = 0;
            for _ in 0..*n {
                let (_, stats) = render_to(&engine, &req, std::io::sink(), &mut |_| {})?;
                secs.push(stats.render_seconds);
                samples = stats.samples;
            }
            let s = median(secs);
            let px = f64::from(req.width) * f64::from(req.height);
            println!(
                "{:<6} {:<8} {:>11} {:>4} {:>4} {:>9.3} {:>8.2} {:>10.2} {:>8.1} {:>9.0}",
                engine.backend.name(),
                tier.as_str(),
                format!("{}x{}", req.width, req.height),
                req.samples * req.samples,
                n,
                s,
                px / s / 1e6,
                samples as f64 / s / 1e6,
                samples as f64 * FLOPS_PER_SAMPLE as f64 / s / 1e9,
                peak_rss_mib(),
            );
        }
        if path == ModelPath::Fused {
            model_only(&engine.backend, runs, "fused kernel")?;
        }
        if let Backend::Wgpu(g) = &engine.backend {
            other_kernels(&args.cppn_wgsl, g, runs)?;
        }
    }
    Ok(())
}
