//! Post-processing: the parameters shared by the WGSL kernels in `shaders/` and the CPU reference
//! of each kernel. The CPU backend runs these references; the wgpu backend runs the kernels, and the
//! tests in `gpu.rs` hold each kernel to its reference within the tolerance its header states.

use bytemuck::{Pod, Zeroable};
use kiln_protocol::RenderRequest;

use crate::engine::style::Style;

/// The version of a request's post chain: enters the cache key. It hashes the WGSL sources and a
/// revision number (bump it when a CPU reference changes a pixel), so an edited kernel cannot serve
/// stale art, and names the optional stages the request runs, so a watermarked preview and an
/// unmarked final of the same size never share a cache entry.
pub fn post_chain_version(req: &RenderRequest) -> String {
    static BASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    const REVISION: u32 = 1;
    let base = BASE.get_or_init(|| {
        let mut h = blake3::Hasher::new();
        h.update(&REVISION.to_le_bytes());
        for (_, src) in crate::shaders::SHADERS {
            h.update(src.as_bytes());
        }
        format!("post{REVISION}-{}", &h.finalize().to_hex()[..12])
    });
    let mut v = base.clone();
    if req.watermark {
        v.push_str("+watermark");
    }
    if req.dither {
        v.push_str("+dither");
    }
    v
}

/// The post-chain flags (`FLAG_*`) a request asks for.
pub fn flags(req: &RenderRequest) -> u32 {
    (if req.watermark { FLAG_WATERMARK } else { 0 }) | (if req.dither { FLAG_DITHER } else { 0 })
}

/// The `Post` uniform of `shaders/common.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct PostParams {
    /// width px, band rows, samples per axis, first row of the band.
    pub dims: [u32; 4],
    /// height px, flags (bit 0 watermark, bit 1 dither), thumbnail factor, thumbnail width.
    pub dims2: [u32; 4],
    /// contrast, unused ×3.
    pub tone: [f32; 4],
    /// Five palette stops, linear RGB in the first three lanes.
    pub palette: [[f32; 4]; 5],
}

/// Flag bit: blend the preview watermark.
pub const FLAG_WATERMARK: u32 = 1;
/// Flag bit: ordered dither when quantising.
pub const FLAG_DITHER: u32 = 2;

impl PostParams {
    /// Parameters for one band.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        style: &Style,
        width: u32,
        height: u32,
        rows: u32,
        y0: u32,
        samples: u32,
        flags: u32,
        thumb: (u32, u32),
    ) -> Self {
        PostParams {
            dims: [width, rows, samples, y0],
            dims2: [height, flags, thumb.0, thumb.1],
            tone: [style.contrast, 0.0, 0.0, 0.0],
            palette: style.palette.map(|c| [c[0], c[1], c[2], 0.0]),
        }
    }
    /// The same band restricted to `rows` rows starting `row0` rows into it.
    pub fn sub_rows(&self, row0: u32, rows: u32) -> Self {
        let mut p = *self;
        p.dims[1] = rows;
        p.dims[3] += row0;
        p
    }
    fn width(&self) -> usize {
        self.dims[0] as usize
    }
    fn rows(&self) -> usize {
        self.dims[1] as usize
    }
}

/// "KILN PREVIEW" in a 5×7 font: 12 characters × 7 rows, bit 4 the leftmost column.
pub const GLYPHS: [u32; 84] = [
    0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001, // K
    0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, // I
    0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111, // L
    0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001, 0b10001, // N
    0, 0, 0, 0, 0, 0, 0, // space
    0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000, // P
    0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001, // R
    0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111, // E
    0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100, // V
    0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, // I
    0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111, // E
    0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010, // W
];

/// sRGB transfer function, encoding: linear light to an sRGB component, clamped to [0, 1].
pub fn linear_to_srgb(l: f32) -> f32 {
    let c = l.clamp(0.0, 1.0);
    if c <= 0.003_130_8 { c * 12.92 } else { 1.055 * c.powf(1.0 / 2.4) - 0.055 }
}

/// The 8×8 Bayer index (0..64) of a pixel.
pub fn bayer8(x: u32, y: u32) -> u32 {
    let z = x ^ y;
    ((z & 1) << 5) | ((y & 1) << 4) | ((z & 2) << 2) | ((y & 2) << 1) | ((z & 4) >> 1) | ((y & 4) >> 2)
}

fn mix(a: f32, b: f32, t: f32) -> f32 {
    a * (1.0 - t) + b * t
}

fn gradient(p: &PostParams, t: f32) -> [f32; 3] {
    let s = t.clamp(0.0, 1.0) * 4.0;
    let i = (s.floor() as usize).min(3);
    let f = s - i as f32;
    [0, 1, 2].map(|c| mix(p.palette[i][c], p.palette[i + 1][c], f))
}

/// Reference of `tone.wgsl`: CPPN outputs to linear RGB, in place.
pub fn tone(p: &PostParams, samples: &mut [f32]) {
    let n = p.width() * p.rows() * (p.dims[2] as usize).pow(2);
    for o in samples[..n * 3].chunks_exact_mut(3) {
        let t = 0.5 + (o[0] - 0.5) * p.tone[0] * 2.2;
        let base = gradient(p, t);
        let accent = gradient(p, 1.0 - o[1]);
        let (mz, shade) = (0.3 * o[2], 0.8 + 0.4 * o[1]);
        for c in 0..3 {
            o[c] = (mix(base[c], accent[c], mz) * shade).clamp(0.0, 1.0);
        }
    }
}

/// Reference of `resolve.wgsl`: box-filters s × s samples into each pixel.
pub fn resolve(p: &PostParams, samples: &[f32], pixels: &mut [f32]) {
    let (w, rows, s) = (p.width(), p.rows(), p.dims[2] as usize);
    let sw = w * s;
    for py in 0..rows {
        for px in 0..w {
            let mut acc = [0.0f32; 3];
            for dy in 0..s {
                for dx in 0..s {
                    let j = ((py * s + dy) * sw + px * s + dx) * 3;
                    for c in 0..3 {
                        acc[c] += samples[j + c];
                    }
                }
            }
            let i = (py * w + px) * 3;
            for c in 0..3 {
                pixels[i + c] = acc[c] / (s * s) as f32;
            }
        }
    }
}

/// Reference of `watermark.wgsl`.
pub fn watermark(p: &PostParams, pixels: &mut [f32]) {
    if p.dims2[1] & FLAG_WATERMARK == 0 {
        return;
    }
    let w = p.dims[0];
    let unit = (w.max(p.dims2[0]) / 128).max(1);
    for i in 0..p.width() * p.rows() {
        let (px, py) = (i as u32 % w, p.dims[3] + i as u32 / w);
        let (gx, gy) = (px / unit, py / unit);
        let (tile_row, row) = (gy / 32, gy % 32);
        let col = (gx + (tile_row % 2) * 55) % 110;
        let (ch, cx) = (col / 6, col % 6);
        if row < 7 && cx < 5 && ch < 12 && (GLYPHS[(ch * 7 + row) as usize] >> (4 - cx)) & 1 == 1 {
            for v in &mut pixels[i * 3..i * 3 + 3] {
                *v = mix(*v, 1.0, 0.3);
            }
        }
    }
}

/// Reference of `quantize.wgsl`: linear pixels to packed 8-bit sRGB (`r | g << 8 | b << 16`).
pub fn quantize(p: &PostParams, pixels: &[f32], packed: &mut [u32]) {
    let w = p.dims[0];
    for (i, word) in packed[..p.width() * p.rows()].iter_mut().enumerate() {
        let threshold = if p.dims2[1] & FLAG_DITHER != 0 {
            (bayer8(i as u32 % w, p.dims[3] + i as u32 / w) as f32 + 0.5) / 64.0
        } else {
            0.5
        };
        *word = (0..3).fold(0, |acc, c| {
            let v = (linear_to_srgb(pixels[i * 3 + c]) * 255.0 + threshold).floor();
            acc | (v.clamp(0.0, 255.0) as u32) << (8 * c)
        });
    }
}

/// Reference of `thumbnail.wgsl`: f × f box average (clipped at the edges), rounded sRGB.
pub fn thumbnail(p: &PostParams, pixels: &[f32], thumb: &mut [u32]) {
    let (w, rows) = (p.width(), p.rows());
    let (f, tw) = (p.dims2[2] as usize, p.dims2[3] as usize);
    let th = rows.div_ceil(f);
    for (i, word) in thumb[..tw * th].iter_mut().enumerate() {
        let (tx, ty) = (i % tw, i / tw);
        let (x1, y1) = (((tx + 1) * f).min(w), ((ty + 1) * f).min(rows));
        let mut acc = [0.0f32; 3];
        for y in ty * f..y1 {
            for x in tx * f..x1 {
                for c in 0..3 {
                    acc[c] += pixels[(y * w + x) * 3 + c];
                }
            }
        }
        let count = ((x1 - tx * f) * (y1 - ty * f)) as f32;
        *word = (0..3).fold(0, |a, c| {
            let v = (linear_to_srgb(acc[c] / count) * 255.0 + 0.5).floor();
            a | (v.clamp(0.0, 255.0) as u32) << (8 * c)
        });
    }
}

/// Unpacks `r | g << 8 | b << 16` words into RGB bytes.
pub fn unpack_rgb(words: &[u32], out: &mut Vec<u8>) {
    out.clear();
    out.extend(words.iter().flat_map(|w| [*w as u8, (*w >> 8) as u8, (*w >> 16) as u8]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bayer_matrix_holds_every_threshold_once() {
        let mut seen = [false; 64];
        for y in 0..8 {
            for x in 0..8 {
                seen[bayer8(x, y) as usize] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
        // Neighbours are far apart in the ordering: the point of an ordered dither.
        assert_eq!(bayer8(0, 0), 0);
        assert_eq!(bayer8(1, 1), 16);
    }

    #[test]
    fn dither_preserves_the_mean_level_of_a_flat_field() {
        let style = Style::from_prompt("mono");
        let p = PostParams::new(&style, 8, 8, 8, 0, 1, FLAG_DITHER, (8, 8));
        // A level that falls between two 8-bit codes: sRGB 100.3 / 255.
        let lin = crate::engine::style::srgb_to_linear(100.3 / 255.0);
        let pixels = vec![lin; 64 * 3];
        let mut packed = vec![0u32; 64];
        quantize(&p, &pixels, &mut packed);
        let mean = packed.iter().map(|w| (w & 0xff) as f32).sum::<f32>() / 64.0;
        assert!((mean - 100.3).abs() < 0.05, "dithered mean {mean}");
        let p = PostParams::new(&style, 8, 8, 8, 0, 1, 0, (8, 8));
        quantize(&p, &pixels, &mut packed);
        assert!(packed.iter().all(|w| w & 0xff == 100), "rounding without dither");
    }

    #[test]
    fn the_watermark_marks_a_visible_share_of_a_preview_only() {
        let style = Style::from_prompt("mono");
        let mut pixels = vec![0.0f32; 512 * 64 * 3];
        let p = PostParams::new(&style, 512, 512, 64, 0, 1, 0, (256, 256));
        watermark(&p, &mut pixels);
        assert!(pixels.iter().all(|v| *v == 0.0));
        let p = PostParams::new(&style, 512, 512, 64, 0, 1, FLAG_WATERMARK, (256, 256));
        watermark(&p, &mut pixels);
        let marked = pixels.chunks(3).filter(|c| c[0] > 0.2).count() as f32 / (512.0 * 64.0);
        assert!((0.01..0.2).contains(&marked), "watermarked share {marked}");
    }

    #[test]
    fn resolve_averages_each_pixel_s_by_s_block() {
        let style = Style::from_prompt("mono");
        let p = PostParams::new(&style, 2, 2, 1, 0, 2, 0, (2, 1));
        // 4×2 samples; pixel 0 covers samples (0,0),(1,0),(0,1),(1,1).
        let mut samples = vec![0.0f32; 4 * 2 * 3];
        for (k, v) in [0usize, 1, 4, 5].iter().zip([0.1f32, 0.2, 0.3, 0.4]) {
            samples[k * 3] = v;
        }
        let mut pixels = vec![0.0; 2 * 3];
        resolve(&p, &samples, &mut pixels);
        assert!((pixels[0] - 0.25).abs() < 1e-7);
        assert_eq!(pixels[3], 0.0);
    }
}
