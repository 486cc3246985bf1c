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
    /// The request's tile is not one of its image.
    #[error("tile: {0}")]
    Tile(String),
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

/// The rows a request renders, `y0 .. y1` of its image: its tile's, which must lie in the image
/// and start on a thumbnail row (a multiple of `thumb_factor`), or all of them.
pub fn rows_of(req: &RenderRequest, thumb_factor: u32) -> Result<(u32, u32), RenderError> {
    let Some(t) = req.tile else { return Ok((0, req.height)) };
    let end = u64::from(t.y0) + u64::from(t.rows);
    if t.rows == 0 || end > u64::from(req.height) {
        return Err(RenderError::Tile(format!(
            "rows {}..{end} are not within the image's {} rows, or none",
            t.y0, req.height
        )));
    }
    if !t.y0.is_multiple_of(thumb_factor) {
        return Err(RenderError::Tile(format!(
            "it starts at row {}, not a multiple of the thumbnail factor {thumb_factor}",
            t.y0
        )));
    }
    Ok((t.y0, t.y0 + t.rows))
}

/// The size of the encoder's buffer for a `width` × `height` PNG: one IDAT chunk of compressed
/// data, zeroed when made: at most a megabyte, and no more than the whole image could compress to
/// (its filtered rows plus deflate's worst-case overhead), so a small image gets a small buffer
/// and the same bytes. The chunking is part of the bytes: a stitched image uses the same.
fn stream_bytes(width: u32, height: u32) -> usize {
    let raw = (width as usize * 3 + 1) * height as usize;
    (raw + raw / 64 + 1024).min(1 << 20)
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

/// A thumbnail made from an image's 8-bit RGB rows as they pass, one row of it held: a box
/// average in linear light over [`Plan`]'s factor, rounded sRGB, as a render makes it (from the
/// 8-bit pixels rather than the linear ones). For the scheduler, which makes the thumbnails of
/// uploaded and stitched assets itself.
pub struct ThumbRows {
    width: usize,
    height: usize,
    f: usize,
    tw: usize,
    th: usize,
    linear: Vec<f32>,
    acc: Vec<f32>,
    rgb: Vec<u8>,
    y: usize,
}

impl ThumbRows {
    /// For a `width` × `height` image; `None` when it is its own thumbnail.
    pub fn new(width: u32, height: u32) -> Option<ThumbRows> {
        if own_thumbnail(width, height) {
            return None;
        }
        let plan = Plan::new(width, height, 1, 1);
        let (f, tw, th) = (plan.thumb_factor as usize, plan.thumb_w as usize, plan.thumb_h as usize);
        Some(ThumbRows {
            width: width as usize,
            height: height as usize,
            f,
            tw,
            th,
            linear: (0..=255u8).map(|v| crate::engine::style::srgb_to_linear(f32::from(v) / 255.0)).collect(),
            acc: vec![0.0; tw * 3],
            rgb: Vec::with_capacity(tw * th * 3),
            y: 0,
        })
    }

    /// Takes the next row: `channels` samples a pixel (grey, and grey with alpha, stand for all
    /// three; alpha is left out).
    pub fn push(&mut self, row: &[u8], channels: usize) {
        let (w, f) = (self.width, self.f);
        for (x, px) in row.chunks_exact(channels).take(w).enumerate() {
            let at = (x / f) * 3;
            for c in 0..3 {
                self.acc[at + c] += self.linear[usize::from(px[if channels < 3 { 0 } else { c }])];
            }
        }
        let y = self.y;
        self.y += 1;
        if (y + 1).is_multiple_of(f) || y + 1 == self.height {
            let rows = y % f + 1;
            for (tx, sums) in self.acc.chunks_exact_mut(3).enumerate() {
                let count = (w.min((tx + 1) * f) - tx * f) * rows;
                for sum in sums.iter_mut() {
                    let v = (post::linear_to_srgb(*sum / count as f32) * 255.0 + 0.5).floor();
                    self.rgb.push(v.clamp(0.0, 255.0) as u8);
                    *sum = 0.0;
                }
            }
        }
    }

    /// The thumbnail's PNG, once every row has passed.
    pub fn finish(self) -> Result<Vec<u8>, png::EncodingError> {
        encode_png(self.tw as u32, self.th as u32, &self.rgb)
    }
}

/// The thumbnail of a PNG file, made as [`ThumbRows`] makes it. `None` when the image is its
/// own thumbnail. Reads one row at a time (memory of one row, at most 64 MiB in the decoder);
/// an interlaced or unreadable PNG is an error that says why.
pub fn thumbnail_of_png(path: &std::path::Path) -> Result<Option<Vec<u8>>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut reader = row_reader(std::io::BufReader::new(file))?;
    let (w, h) = (reader.info().width, reader.info().height);
    let Some(mut thumb) = ThumbRows::new(w, h) else { return Ok(None) };
    let channels = reader.output_color_type().0.samples();
    for _ in 0..h {
        let row = reader.next_row().map_err(|e| format!("not a readable PNG: {e}"))?;
        thumb.push(row.ok_or("not a readable PNG: its image data ends early")?.data(), channels);
    }
    thumb.finish().map(Some).map_err(|e| e.to_string())
}

/// A PNG reader that hands out 8-bit rows one at a time (at most 64 MiB in the decoder); an
/// interlaced PNG is refused.
fn row_reader<R: std::io::BufRead + std::io::Seek>(r: R) -> Result<png::Reader<R>, String> {
    let mut decoder = png::Decoder::new_with_limits(r, png::Limits { bytes: 64 << 20 });
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let reader = decoder.read_info().map_err(|e| format!("not a readable PNG: {e}"))?;
    if reader.info().interlaced {
        return Err("an interlaced PNG; only non-interlaced ones are read".into());
    }
    Ok(reader)
}

/// What stitching cost ([`stitch`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StitchStats {
    /// Tiles read.
    pub tiles: u32,
    /// Seconds decoding the tiles.
    pub decode_seconds: f64,
    /// Seconds encoding the whole image (and its thumbnail).
    pub encode_seconds: f64,
}

/// Stitches the tiles of a `width` × `height` image into its PNG, streamed into `out` one row at
/// a time: `tiles` are each tile's rows (in order, covering the image) and its PNG. The bytes are
/// those [`render_to`] writes for the whole image on the same backend: the same encoder, the
/// same buffer, the same rows. Returns the thumbnail ([`ThumbRows`]; `None` for an image that is
/// its own) and the costs, or why a tile does not fit.
pub fn stitch<W: Write, R: std::io::BufRead + std::io::Seek>(
    width: u32,
    height: u32,
    tiles: impl IntoIterator<Item = (kiln_protocol::Tile, R)>,
    out: W,
) -> Result<(Option<Vec<u8>>, StitchStats), String> {
    let encode = |e: png::EncodingError| format!("cannot write the PNG: {e}");
    let mut writer = png_encoder(out, width, height).write_header().map_err(encode)?;
    let mut stream = writer.stream_writer_with_size(stream_bytes(width, height)).map_err(encode)?;
    let mut thumb = ThumbRows::new(width, height);
    let mut stats = StitchStats::default();
    let mut next = 0u32;
    for (tile, r) in tiles {
        let name = format!("tile at rows {}..{}", tile.y0, u64::from(tile.y0) + u64::from(tile.rows));
        if tile.y0 != next {
            return Err(format!("{name}: the tiles before it end at row {next}"));
        }
        let t = std::time::Instant::now();
        let mut reader = row_reader(r).map_err(|e| format!("{name}: {e}"))?;
        let (w, h) = (reader.info().width, reader.info().height);
        if (w, h) != (width, tile.rows) || reader.output_color_type() != (png::ColorType::Rgb, png::BitDepth::Eight) {
            return Err(format!("{name}: a {w}×{h} PNG that is not 8-bit RGB; it must be {width}×{} RGB", tile.rows));
        }
        stats.decode_seconds += t.elapsed().as_secs_f64();
        for _ in 0..h {
            let t = std::time::Instant::now();
            let row = reader.next_row().map_err(|e| format!("{name}: not a readable PNG: {e}"))?;
            let row = row.ok_or_else(|| format!("{name}: its image data ends early"))?.data();
            stats.decode_seconds += t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            stream.write_all(row).map_err(|e| encode(e.into()))?;
            if let Some(th) = &mut thumb {
                th.push(row, 3);
            }
            stats.encode_seconds += t.elapsed().as_secs_f64();
        }
        next = tile.y0 + tile.rows;
        stats.tiles += 1;
    }
    if next != height {
        return Err(format!("the tiles end at row {next} of {height}"));
    }
    let t = std::time::Instant::now();
    stream.finish().map_err(encode)?;
    writer.finish().map_err(encode)?;
    let thumb = thumb.map(ThumbRows::finish).transpose().map_err(encode)?;
    stats.encode_seconds += t.elapsed().as_secs_f64();
    Ok((thumb, stats))
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
    let (first, end) = rows_of(req, plan.thumb_factor)?;
    let out_rows = end - first;
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
    let mut writer = png_encoder(out, w, out_rows).write_header()?;
    let mut stream = writer.stream_writer_with_size(stream_bytes(w, out_rows))?;
    // A tile of an image that has a thumbnail has the rows of it that its own rows make.
    let own_thumb = own_thumbnail(w, h);
    let thumb_rows = out_rows.div_ceil(plan.thumb_factor);
    let mut thumb_rgb = Vec::with_capacity(if own_thumb { 0 } else { (plan.thumb_w * thumb_rows * 3) as usize });
    let mut stats = RenderStats::default();
    let mut samples_buf = Vec::new();
    let mut rgb = Vec::new();
    let mut y0 = first;
    while y0 < end {
        let rows = plan.band_rows.min(end - y0);
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
        progress(Progress { rows_done: y0 - first, rows: out_rows });
    }
    let encode_start = Instant::now();
    stream.finish()?;
    writer.finish()?;
    let thumb_png = if own_thumb { None } else { Some(encode_png(plan.thumb_w, thumb_rows, &thumb_rgb)?) };
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
