//! One render, start to finish: the image is cut into full-width bands whose size is bounded by a
//! sample budget; each band runs model → tone → resolve → watermark → quantise → thumbnail on the
//! chosen backend and its rows stream into the PNG encoder. Peak memory is a few bands, whatever
//! the image size.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::Device;
use kiln_protocol::RenderRequest;
use serde::{Deserialize, Serialize};

use crate::engine::EngineError;
use crate::engine::burn_model::CppnModule;
use crate::engine::cppn::{Cppn, SampleTile, render_tile_cpu, run_parts};
use crate::engine::style::Style;
use crate::gpu::{BandRenderer, Gpu, Samples};
use crate::post::{self, PostParams};

/// Long side of a thumbnail, at most.
pub const THUMB_SIDE: u32 = 256;

/// Whether an image of this size is its own thumbnail (its long side is at most [`THUMB_SIDE`]:
/// a thumbnail factor of 1), so it has no thumbnail of its own.
pub fn own_thumbnail(width: u32, height: u32) -> bool {
    width.max(height) <= THUMB_SIDE
}

/// Where the arithmetic runs.
#[derive(Clone)]
pub enum Backend {
    /// The CPU, on this many threads; post-processing by the CPU references of the kernels.
    Cpu {
        /// Threads for the model.
        threads: usize,
    },
    /// A wgpu adapter: the fused kernel and the post-processing pipelines run there.
    Wgpu(Arc<Gpu>),
}

impl Backend {
    /// `cpu` or `wgpu`.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Cpu { .. } => "cpu",
            Backend::Wgpu(_) => "wgpu",
        }
    }

    /// The GPU's memory and load, where its driver says (see [`Gpu::usage`]); `None` on the CPU.
    pub fn usage(&self) -> Option<crate::gpu_usage::GpuUsage> {
        match self {
            Backend::Cpu { .. } => None,
            Backend::Wgpu(g) => g.usage(),
        }
    }

    /// What actually ran: the adapter for wgpu, the code path for the CPU.
    pub fn device_name(&self) -> String {
        match self {
            Backend::Cpu { threads } => format!("{} on {threads} threads", crate::engine::cppn::cpu_path()),
            Backend::Wgpu(g) => format!("{} ({})", g.adapter_name(), g.adapter_kind()),
        }
    }
}

/// How the model is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelPath {
    /// The fused evaluator of the built-in CPPN (a WGSL kernel on wgpu, a vectorised loop on CPU).
    Fused,
    /// The generic burn `Module` (burn's wgpu or flex backend), as loaded weights would run.
    Burn,
}

/// The engine a worker renders with.
#[derive(Clone)]
pub struct Engine {
    /// The backend.
    pub backend: Backend,
    /// Fused or burn.
    pub path: ModelPath,
    /// Samples per band, at most: bounds memory (about 40 bytes a sample, all buffers together).
    pub band_samples: usize,
}

/// What went wrong in a render.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Writing the PNG failed.
    #[error("cannot write the PNG: {0}")]
    Encode(#[from] png::EncodingError),
}

/// Timings and counts of one render.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RenderStats {
    /// Model evaluations (pixels × samples²).
    pub samples: u64,
    /// Bands the image was cut into.
    pub bands: u32,
    /// Seconds in the model and post chain (everything before the PNG encoder).
    pub render_seconds: f64,
    /// Seconds in the PNG encoder.
    pub encode_seconds: f64,
    /// Wall-clock seconds in all.
    pub total_seconds: f64,
}

/// Progress of a render, reported after each band.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Rows finished.
    pub rows_done: u32,
    /// Rows in all.
    pub rows: u32,
}

/// The band plan of an image: rows per band and the thumbnail geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Rows per band (the last may be shorter); a multiple of the thumbnail factor.
    pub band_rows: u32,
    /// Thumbnail box size in pixels.
    pub thumb_factor: u32,
    /// Thumbnail width.
    pub thumb_w: u32,
    /// Thumbnail height.
    pub thumb_h: u32,
}

impl Plan {
    /// Plans bands of at most `band_samples` samples (at least one thumbnail row of pixels).
    pub fn new(width: u32, height: u32, samples: u32, band_samples: usize) -> Plan {
        let f = width.max(height).div_ceil(THUMB_SIDE).max(1);
        let row_samples = width as usize * (samples * samples) as usize;
        let budget_rows = (band_samples / row_samples.max(1)).max(1) as u32;
        let band_rows = ((budget_rows / f) * f).max(f).min(height.next_multiple_of(f));
        Plan { band_rows, thumb_factor: f, thumb_w: width.div_ceil(f), thumb_h: height.div_ceil(f) }
    }
}

fn png_encoder<W: Write>(w: W, width: u32, height: u32) -> png::Encoder<'static, W> {
    let mut e = png::Encoder::new(w, width, height);
    e.set_color(png::ColorType::Rgb);
    e.set_depth(png::BitDepth::Eight);
    e.set_source_srgb(png::SrgbRenderingIntent::Perceptual);
    e.set_compression(png::Compression::Fast);
    e
}

/// Encodes a small RGB8 image (the thumbnail) to PNG bytes.
pub fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut w = png_encoder(&mut out, width, height).write_header()?;
    w.write_image_data(rgb)?;
    w.finish()?;
    Ok(out)
}

/// The thumbnail of a PNG file, made as a render makes it (a box average in linear light over
/// [`Plan`]'s factor, rounded sRGB), from the file's 8-bit RGB: for the scheduler, which makes
/// the thumbnails of uploaded assets itself rather than take them from the uploader. `None`
/// when the image is its own thumbnail. Reads one row at a time (memory of one row, at most
/// 64 MiB in the decoder); an interlaced or unreadable PNG is an error that says why.
pub fn thumbnail_of_png(path: &std::path::Path) -> Result<Option<Vec<u8>>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut decoder = png::Decoder::new_with_limits(std::io::BufReader::new(file), png::Limits { bytes: 64 << 20 });
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(|e| format!("not a readable PNG: {e}"))?;
    let (w, h, interlaced) = (reader.info().width, reader.info().height, reader.info().interlaced);
    if own_thumbnail(w, h) {
        return Ok(None);
    }
    if interlaced {
        return Err("an interlaced PNG; the scheduler reads only non-interlaced ones".into());
    }
    let channels = reader.output_color_type().0.samples();
    let plan = Plan::new(w, h, 1, 1);
    let (f, tw, th) = (plan.thumb_factor as usize, plan.thumb_w as usize, plan.thumb_h as usize);
    let linear: Vec<f32> = (0..=255u8).map(|v| crate::engine::style::srgb_to_linear(f32::from(v) / 255.0)).collect();
    let (mut acc, mut rgb) = (vec![0.0f32; tw * 3], Vec::with_capacity(tw * th * 3));
    for y in 0..h as usize {
        let row = reader.next_row().map_err(|e| format!("not a readable PNG: {e}"))?;
        let data = row.ok_or("not a readable PNG: its image data ends early")?.data();
        for (x, px) in data.chunks_exact(channels).take(w as usize).enumerate() {
            // Grey (and grey with alpha) stands for all three; alpha is left out.
            let at = (x / f) * 3;
            for c in 0..3 {
                acc[at + c] += linear[usize::from(px[if channels < 3 { 0 } else { c }])];
            }
        }
        if (y + 1) % f == 0 || y + 1 == h as usize {
            let rows = y % f + 1;
            for (tx, sums) in acc.chunks_exact_mut(3).enumerate() {
                let count = ((w as usize).min((tx + 1) * f) - tx * f) * rows;
                for sum in sums.iter_mut() {
                    let v = (post::linear_to_srgb(*sum / count as f32) * 255.0 + 0.5).floor();
                    rgb.push(v.clamp(0.0, 255.0) as u8);
                    *sum = 0.0;
                }
            }
        }
    }
    encode_png(tw as u32, th as u32, &rgb).map(Some).map_err(|e| e.to_string())
}

/// Renders `req` and streams its PNG into `out`. Returns the thumbnail PNG (`None` when the image
/// is no larger than a thumbnail: it is its own) and the stats.
pub fn render_to<W: Write>(
    engine: &Engine,
    req: &RenderRequest,
    out: W,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Option<Vec<u8>>, RenderStats), RenderError> {
    let started = Instant::now();
    let style = Style::from_prompt(&req.prompt);
    let model = Cppn::new(req.seed, style);
    let (w, h, s) = (req.width, req.height, req.samples);
    let plan = Plan::new(w, h, s, engine.band_samples);
    let flags = post::flags(req);
    let max_band_pixels = (w * plan.band_rows) as usize;
    let max_band_samples = max_band_pixels * (s * s) as usize;
    let max_thumb = (plan.thumb_w * plan.band_rows.div_ceil(plan.thumb_factor)) as usize;

    let burn_device = match (&engine.path, &engine.backend) {
        (ModelPath::Fused, _) => None,
        (ModelPath::Burn, Backend::Cpu { .. }) => Some(Device::flex()),
        (ModelPath::Burn, Backend::Wgpu(_)) => Some(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
    };
    let burn_module = burn_device.as_ref().map(|d| CppnModule::from_cppn(&model, d));
    let gpu_bands = match &engine.backend {
        Backend::Wgpu(g) => Some(BandRenderer::new(g, &model, max_band_samples, max_band_pixels, max_thumb)),
        Backend::Cpu { .. } => None,
    };

    let threads = match &engine.backend {
        Backend::Cpu { threads } => *threads,
        Backend::Wgpu(_) => 1,
    };
    let mut writer = png_encoder(out, w, h).write_header()?;
    // The encoder's buffer is one IDAT chunk of compressed data, zeroed when made: at most a
    // megabyte, and no more than the whole image could compress to (its filtered rows plus
    // deflate's worst-case overhead), so a small image gets a small buffer and the same bytes.
    let raw = (w as usize * 3 + 1) * h as usize;
    let stream_bytes = (raw + raw / 64 + 1024).min(1 << 20);
    let mut stream = writer.stream_writer_with_size(stream_bytes)?;
    let own_thumb = own_thumbnail(w, h);
    let mut thumb_rgb = Vec::with_capacity(if own_thumb { 0 } else { (plan.thumb_w * plan.thumb_h * 3) as usize });
    let mut stats = RenderStats::default();
    let mut samples_buf = Vec::new();
    let mut rgb = Vec::new();
    let mut y0 = 0;
    while y0 < h {
        let rows = plan.band_rows.min(h - y0);
        let band_start = Instant::now();
        let tile = SampleTile { x0: 0, y0: y0 * s, w: w * s, h: rows * s, full_w: w * s, full_h: h * s };
        let params = PostParams::new(&model.style, w, h, rows, y0, s, flags, (plan.thumb_factor, plan.thumb_w));
        if burn_module.is_some() || gpu_bands.is_none() {
            samples_buf.resize(tile.len() * 3, 0.0);
        }
        if let (Some(m), Some(d)) = (&burn_module, &burn_device) {
            m.render_tile(&model, &tile, d, &mut samples_buf)?;
        }
        let (packed, thumb) = match &gpu_bands {
            Some(bands) => {
                let src = if burn_module.is_some() { Samples::Given(&samples_buf) } else { Samples::Fused };
                bands.run(&tile, &params, src)?
            }
            None => {
                if burn_module.is_none() {
                    render_tile_cpu(&model, &tile, threads, &mut samples_buf);
                }
                cpu_post(&params, &mut samples_buf, threads, !own_thumb)
            }
        };
        stats.render_seconds += band_start.elapsed().as_secs_f64();
        let encode_start = Instant::now();
        post::unpack_rgb(&packed, &mut rgb);
        stream.write_all(&rgb).map_err(png::EncodingError::from)?;
        stats.encode_seconds += encode_start.elapsed().as_secs_f64();
        if !own_thumb {
            post::unpack_rgb(&thumb, &mut rgb);
            thumb_rgb.extend_from_slice(&rgb);
        }
        stats.samples += tile.len() as u64;
        stats.bands += 1;
        y0 += rows;
        progress(Progress { rows_done: y0, rows: h });
    }
    let encode_start = Instant::now();
    stream.finish()?;
    writer.finish()?;
    let thumb_png = if own_thumb { None } else { Some(encode_png(plan.thumb_w, plan.thumb_h, &thumb_rgb)?) };
    stats.encode_seconds += encode_start.elapsed().as_secs_f64();
    stats.total_seconds = started.elapsed().as_secs_f64();
    Ok((thumb_png, stats))
}

/// The post chain on the CPU: the references of the kernels, in the kernels' order, on `threads`
/// threads over row chunks that hold whole thumbnail rows (so the split changes no bit). The
/// thumbnail is left out (zeros) unless `want_thumb`: an image that is its own has no use for it.
fn cpu_post(p: &PostParams, samples: &mut [f32], threads: usize, want_thumb: bool) -> (Vec<u32>, Vec<u32>) {
    let (w, rows, s, f, tw) = (p.dims[0] as usize, p.dims[1], p.dims[2] as usize, p.dims2[2], p.dims2[3] as usize);
    let mut pixels = vec![0.0f32; w * rows as usize * 3];
    let mut packed = vec![0u32; w * rows as usize];
    let mut thumb = vec![0u32; tw * rows.div_ceil(f) as usize];
    let chunk = rows.div_ceil(threads.max(1) as u32).next_multiple_of(f) as usize;
    let parts = samples
        .chunks_mut(chunk * s * w * s * 3)
        .zip(pixels.chunks_mut(chunk * w * 3))
        .zip(packed.chunks_mut(chunk * w))
        .zip(thumb.chunks_mut(chunk / f as usize * tw));
    run_parts(parts.enumerate(), |(k, (((sm, px), pk), th))| {
        let sub = p.sub_rows((k * chunk) as u32, (pk.len() / w) as u32);
        post::tone(&sub, sm);
        post::resolve(&sub, sm, px);
        post::watermark(&sub, px);
        post::quantize(&sub, px, pk);
        if want_thumb {
            post::thumbnail(&sub, px, th);
        }
    });
    (packed, thumb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_hold_whole_thumbnail_rows_and_respect_the_budget() {
        let p = Plan::new(8192, 8192, 1, 1 << 20);
        assert_eq!(p.thumb_factor, 32);
        assert_eq!(p.band_rows % 32, 0);
        assert!(8192 * p.band_rows as usize <= 1 << 20);
        assert_eq!((p.thumb_w, p.thumb_h), (256, 256));
        // A tiny image is one band.
        let p = Plan::new(16, 16, 1, 1 << 20);
        assert_eq!((p.band_rows, p.thumb_factor), (16, 1));
        // A budget below one thumbnail row still makes progress.
        let p = Plan::new(4096, 300, 4, 10);
        assert_eq!(p.band_rows, p.thumb_factor);
    }
}
