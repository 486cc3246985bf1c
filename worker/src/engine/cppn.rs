//! The built-in CPPN: a per-pixel MLP (11 → 4×32 → 3) over x, y, radius and an 8-d latent.
//!
//! Weights and latent come from (seed, prompt style) through the pinned PRNG. This file also holds
//! the fused CPU evaluator (a lane-blocked loop the compiler vectorises) and the activation
//! approximations that the fused WGSL kernel (`shaders/cppn.wgsl`) mirrors line for line.

use std::sync::OnceLock;

use serde::Serialize;

use super::style::{Style, Symmetry};
use crate::prng::{Rng, splitmix64};

/// The model id that enters the cache key.
pub const MODEL_ID: &str = "cppn";
/// Inputs per sample: x, y, r and the latent.
pub const INPUTS: usize = 3 + LATENT;
/// Latent dimensions.
pub const LATENT: usize = 8;
/// Hidden width.
pub const HIDDEN: usize = 32;
/// Hidden layers.
pub const HIDDEN_LAYERS: usize = 4;
/// Multiply-adds per sample: 11·32 + 3·32·32 + 32·3.
pub const MACS_PER_SAMPLE: u64 = (INPUTS * HIDDEN + (HIDDEN_LAYERS - 1) * HIDDEN * HIDDEN + HIDDEN * 3) as u64;
/// FLOPs per sample, counting a multiply-add as two (the benchmark's "effective GFLOP/s").
pub const FLOPS_PER_SAMPLE: u64 = 2 * MACS_PER_SAMPLE;

/// Bumped whenever the weight generator or the evaluator changes a pixel; enters the model version.
const GENERATOR_REVISION: u32 = 1;

/// A hidden-layer activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Act {
    /// Hyperbolic tangent.
    Tanh,
    /// Sine: periodic bands.
    Sin,
    /// exp(-x²): soft blobs.
    Gauss,
}

impl Act {
    /// The code the WGSL kernel switches on.
    pub fn code(self) -> u32 {
        match self {
            Act::Tanh => 0,
            Act::Sin => 1,
            Act::Gauss => 2,
        }
    }
}

/// One instance of the CPPN: the weights for one (seed, prompt).
/// Weight matrices are `[out][in]`; the output layer is padded to 4 rows (the 4th is zero).
#[derive(Debug, Clone)]
pub struct Cppn {
    /// The style the prompt asked for.
    pub style: Style,
    /// The latent vector, constant over the image.
    pub latent: [f32; LATENT],
    /// Activation of each hidden layer.
    pub acts: [Act; HIDDEN_LAYERS],
    /// Input layer, `[32][11]`.
    pub w0: [[f32; INPUTS]; HIDDEN],
    /// Input layer bias.
    pub b0: [f32; HIDDEN],
    /// Hidden layers 1..=3, `[3][32][32]`.
    pub wh: [[[f32; HIDDEN]; HIDDEN]; HIDDEN_LAYERS - 1],
    /// Hidden biases.
    pub bh: [[f32; HIDDEN]; HIDDEN_LAYERS - 1],
    /// Output layer, `[4][32]`, row 3 zero.
    pub wo: [[f32; HIDDEN]; 4],
    /// Output bias, element 3 zero.
    pub bo: [f32; 4],
}

/// A rectangle of samples inside a full sample grid (`full_w × full_h`, the image size times the
/// supersampling factor). Pixels depend only on their absolute position, so any tiling of the grid
/// gives bit-identical values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleTile {
    /// First column.
    pub x0: u32,
    /// First row.
    pub y0: u32,
    /// Columns.
    pub w: u32,
    /// Rows.
    pub h: u32,
    /// Width of the whole sample grid.
    pub full_w: u32,
    /// Height of the whole sample grid.
    pub full_h: u32,
}

impl SampleTile {
    /// Samples in the tile.
    pub fn len(&self) -> usize {
        self.w as usize * self.h as usize
    }

    /// Whether the tile is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Cppn {
    /// Draws the network for a seed and a style. The seed and the prompt's non-vocabulary words
    /// pick the structure; the style's palette and tone are applied in post-processing.
    pub fn new(seed: u64, style: Style) -> Cppn {
        let mut state = seed ^ style.rest_hash.rotate_left(17);
        let mut rng = Rng::new(splitmix64(&mut state));
        let mut latent = [0.0; LATENT];
        for z in &mut latent {
            *z = rng.range(-1.0, 1.0);
        }
        let first = [Act::Sin, Act::Sin, Act::Tanh, Act::Gauss, Act::Tanh];
        let later = [Act::Tanh, Act::Tanh, Act::Tanh, Act::Sin, Act::Gauss];
        let acts = [
            first[rng.below(first.len())],
            later[rng.below(later.len())],
            later[rng.below(later.len())],
            later[rng.below(later.len())],
        ];
        let mut w0 = [[0.0; INPUTS]; HIDDEN];
        for row in &mut w0 {
            for (i, w) in row.iter_mut().enumerate() {
                // Coordinates get larger weights than the latent: they carry the structure.
                *w = rng.normal() * if i < 3 { 3.2 } else { 1.0 };
            }
        }
        let mut b0 = [0.0; HIDDEN];
        b0.iter_mut().for_each(|b| *b = rng.normal() * 0.5);
        let gain = 2.4 / (HIDDEN as f32).sqrt();
        let mut wh = [[[0.0; HIDDEN]; HIDDEN]; HIDDEN_LAYERS - 1];
        let mut bh = [[0.0; HIDDEN]; HIDDEN_LAYERS - 1];
        for (w, b) in wh.iter_mut().zip(bh.iter_mut()) {
            w.iter_mut().flatten().for_each(|x| *x = rng.normal() * gain);
            b.iter_mut().for_each(|x| *x = rng.normal() * 0.3);
        }
        let mut wo = [[0.0; HIDDEN]; 4];
        let mut bo = [0.0; 4];
        for (row, b) in wo.iter_mut().zip(bo.iter_mut()).take(3) {
            row.iter_mut().for_each(|x| *x = rng.normal() * 3.2 / (HIDDEN as f32).sqrt());
            *b = rng.normal() * 0.3;
        }
        Cppn { style, latent, acts, w0, b0, wh, bh, wo, bo }
    }

    /// Every weight and bias, flattened in the order the WGSL kernel reads them:
    /// w0 `[32][11]`, b0, then for each hidden layer w `[32][32]` and b, then wo `[4][32]`, bo.
    pub fn flat_weights(&self) -> Vec<f32> {
        let mut v = Vec::with_capacity(4096);
        v.extend(self.w0.iter().flatten());
        v.extend(self.b0);
        for (w, b) in self.wh.iter().zip(&self.bh) {
            v.extend(w.iter().flatten());
            v.extend(b);
        }
        v.extend(self.wo.iter().flatten());
        v.extend(self.bo);
        v
    }

    /// The (x, y, r) inputs of one sample, after symmetry and frequency.
    pub fn coords(&self, sx: u32, sy: u32, full_w: u32, full_h: u32) -> [f32; 3] {
        let long = full_w.max(full_h) as f32;
        // Exact integer arithmetic, then one division: the same bits whatever the tiling.
        let mut x = (2 * i64::from(sx) + 1 - i64::from(full_w)) as f32 / long;
        let mut y = (i64::from(full_h) - 2 * i64::from(sy) - 1) as f32 / long;
        match self.style.symmetry {
            Symmetry::None => {}
            Symmetry::Mirror => x = x.abs(),
            Symmetry::Quad => {
                x = x.abs();
                y = y.abs();
            }
            Symmetry::Kaleidoscope => {
                let (ax, ay) = (x.abs(), y.abs());
                x = if ax > ay { ax } else { ay };
                y = if ax > ay { ay } else { ax };
            }
        }
        let f = self.style.frequency;
        [x * f, y * f, (x * x + y * y).sqrt() * f]
    }
}

/// The model version: a hash of the weights the generator draws for a fixed probe (seed 0, empty
/// prompt) and of the generator revision. Any change to the generator moves it, and with it every
/// cache key, without anyone remembering to bump a number.
pub fn model_version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        let probe = Cppn::new(0, Style::from_prompt(""));
        let mut h = blake3::Hasher::new();
        h.update(&GENERATOR_REVISION.to_le_bytes());
        for w in probe.flat_weights().iter().chain(&probe.latent) {
            h.update(&w.to_le_bytes());
        }
        for a in probe.acts {
            h.update(&a.code().to_le_bytes());
        }
        h.finalize().to_hex()[..16].to_owned()
    })
}

// ---- activation approximations, mirrored in shaders/cppn.wgsl ------------------------------------

const TANH_CLAMP: f32 = 7.998_811_7;
const PI: f32 = std::f32::consts::PI;
const HALF_PI: f32 = std::f32::consts::FRAC_PI_2;
const TAU: f32 = std::f32::consts::TAU;

/// `a < b ? a : b` written as a select so it vectorises to one instruction.
#[inline(always)]
fn min_sel(a: f32, b: f32) -> f32 {
    if a < b { a } else { b }
}

#[inline(always)]
fn max_sel(a: f32, b: f32) -> f32 {
    if a > b { a } else { b }
}

/// tanh by a 13/6 rational approximation (Eigen's), max error about 1e-6.
#[inline(always)]
pub fn tanh_approx(x: f32) -> f32 {
    tanh_g::<false>(x)
}

#[inline(always)]
fn tanh_g<const FMA: bool>(x: f32) -> f32 {
    let x = max_sel(min_sel(x, TANH_CLAMP), -TANH_CLAMP);
    let x2 = x * x;
    let mut p = madd::<FMA>(x2, -2.760_768_5e-16, 2.000_188e-13);
    p = madd::<FMA>(x2, p, -8.604_672e-11);
    p = madd::<FMA>(x2, p, 5.122_297e-8);
    p = madd::<FMA>(x2, p, 1.485_722_4e-5);
    p = madd::<FMA>(x2, p, 6.372_619_3e-4);
    p = madd::<FMA>(x2, p, 4.893_524_6e-3);
    p *= x;
    let mut q = madd::<FMA>(x2, 1.198_258_4e-6, 1.185_347_1e-4);
    q = madd::<FMA>(x2, q, 2.268_434_6e-3);
    q = madd::<FMA>(x2, q, 4.893_525e-3);
    p / q
}

/// sin by reduction to [-π/2, π/2] and an odd polynomial of degree 11, max error about 1e-7
/// for the arguments a CPPN sees (|x| below a few hundred).
#[inline(always)]
pub fn sin_approx(x: f32) -> f32 {
    sin_g::<false>(x)
}

#[inline(always)]
fn sin_g<const FMA: bool>(x: f32) -> f32 {
    let k = (x * (1.0 / TAU) + 0.5).floor();
    let r = x - k * TAU;
    let r = if r > HALF_PI {
        PI - r
    } else if r < -HALF_PI {
        -PI - r
    } else {
        r
    };
    let r2 = r * r;
    let mut p = madd::<FMA>(r2, -2.505_210_8e-8, 2.755_731_9e-6);
    p = madd::<FMA>(r2, p, -1.984_127e-4);
    p = madd::<FMA>(r2, p, 8.333_333e-3);
    p = madd::<FMA>(r2, p, -1.666_666_7e-1);
    r + r * r2 * p
}

/// exp by splitting into 2^k · 2^f with |f| ≤ 1/2 and a degree-6 polynomial, relative error about 1e-7.
#[inline(always)]
pub fn exp_approx(v: f32) -> f32 {
    exp_g::<false>(v)
}

#[inline(always)]
fn exp_g<const FMA: bool>(v: f32) -> f32 {
    let v = max_sel(min_sel(v, 87.0), -87.0);
    let t = v * std::f32::consts::LOG2_E;
    let k = (t + 0.5).floor();
    let f = (t - k) * std::f32::consts::LN_2;
    let mut p = madd::<FMA>(f, 1.388_888_9e-3, 8.333_333e-3);
    p = madd::<FMA>(f, p, 4.166_666_8e-2);
    p = madd::<FMA>(f, p, 1.666_666_7e-1);
    p = madd::<FMA>(f, p, 0.5);
    p = madd::<FMA>(f, p, 1.0);
    p = madd::<FMA>(f, p, 1.0);
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    p * scale
}

/// The logistic sigmoid on top of [`exp_approx`].
#[inline(always)]
pub fn sigmoid_approx(x: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-x))
}

/// An activation evaluated by the approximations above.
#[inline(always)]
pub fn activate(act: Act, x: f32) -> f32 {
    match act {
        Act::Tanh => tanh_approx(x),
        Act::Sin => sin_approx(x),
        Act::Gauss => exp_approx(-x * x),
    }
}

// ---- fused CPU evaluator ------------------------------------------------------------------------

/// Samples evaluated together: one vector register row per neuron.
const L: usize = 16;
type Lanes = [f32; L];

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `y = W·x + b` over a block of lanes, four outputs at a time so their accumulators stay in registers.
#[inline(always)]
fn dense<const IN: usize, const OUT: usize, const FMA: bool>(
    w: &[[f32; IN]; OUT],
    b: &[f32; OUT],
    x: &[Lanes; IN],
    y: &mut [Lanes; OUT],
) {
    for j in (0..OUT).step_by(4) {
        let mut acc = [[0.0f32; L]; 4];
        for k in 0..4 {
            acc[k] = [b[j + k]; L];
        }
        for (i, xi) in x.iter().enumerate() {
            for k in 0..4 {
                let wv = w[j + k][i];
                for l in 0..L {
                    acc[k][l] = madd::<FMA>(wv, xi[l], acc[k][l]);
                }
            }
        }
        y[j..j + 4].copy_from_slice(&acc);
    }
}

/// Applies `act` to every lane. Plain loops, no closures, here and in everything the fused
/// path calls: a closure is a function of its own, which the compiler may leave out of line and
/// then build without the caller's `avx2,fma`. That happened in one build: `mul_add` and
/// `floor` became calls into software routines, and a 2048×2048 final render took minutes.
#[inline(always)]
fn activate_all<const FMA: bool>(act: Act, y: &mut [Lanes; HIDDEN]) {
    let all = y.as_flattened_mut();
    match act {
        Act::Tanh => {
            for v in all {
                *v = tanh_g::<FMA>(*v);
            }
        }
        Act::Sin => {
            for v in all {
                *v = sin_g::<FMA>(*v);
            }
        }
        Act::Gauss => {
            for v in all {
                *v = exp_g::<FMA>(-*v * *v);
            }
        }
    }
}

#[inline(always)]
fn eval_block<const FMA: bool>(c: &Cppn, input: &[Lanes; INPUTS], out: &mut [Lanes; 4]) {
    let mut a = [[0.0f32; L]; HIDDEN]; // [32, L]
    let mut b = [[0.0f32; L]; HIDDEN];
    dense::<INPUTS, HIDDEN, FMA>(&c.w0, &c.b0, input, &mut a);
    activate_all::<FMA>(c.acts[0], &mut a);
    dense::<HIDDEN, HIDDEN, FMA>(&c.wh[0], &c.bh[0], &a, &mut b);
    activate_all::<FMA>(c.acts[1], &mut b);
    dense::<HIDDEN, HIDDEN, FMA>(&c.wh[1], &c.bh[1], &b, &mut a);
    activate_all::<FMA>(c.acts[2], &mut a);
    dense::<HIDDEN, HIDDEN, FMA>(&c.wh[2], &c.bh[2], &a, &mut b);
    activate_all::<FMA>(c.acts[3], &mut b);
    dense::<HIDDEN, 4, FMA>(&c.wo, &c.bo, &b, out); // [4, L], row 3 is padding
    for row in out.iter_mut().take(3) {
        for v in row.iter_mut() {
            *v = 1.0 / (1.0 + exp_g::<FMA>(-*v));
        }
    }
}

// The lane loops index several arrays with one lane number; iterators would hide that shape.
#[allow(clippy::needless_range_loop)]
/// Evaluates rows `rows` of `tile` into `out` (3 floats per sample, row-major within the tile).
#[inline(always)]
fn render_rows<const FMA: bool>(c: &Cppn, tile: &SampleTile, rows: std::ops::Range<u32>, out: &mut [f32]) {
    let mut input = [[0.0f32; L]; INPUTS];
    for (i, z) in c.latent.iter().enumerate() {
        input[3 + i] = [*z; L];
    }
    let mut res = [[0.0f32; L]; 4];
    let w = tile.w as usize;
    for (r, row) in rows.enumerate() {
        let sy = tile.y0 + row;
        let row_out = &mut out[r * w * 3..(r + 1) * w * 3];
        for x0 in (0..w).step_by(L) {
            let n = L.min(w - x0);
            for l in 0..L {
                // Lanes past the end repeat the last sample; their results are dropped.
                let sx = tile.x0 + (x0 + l.min(n - 1)) as u32;
                let [x, y, rr] = c.coords(sx, sy, tile.full_w, tile.full_h);
                input[0][l] = x;
                input[1][l] = y;
                input[2][l] = rr;
            }
            eval_block::<FMA>(c, &input, &mut res);
            for l in 0..n {
                let o = (x0 + l) * 3;
                row_out[o] = res[0][l];
                row_out[o + 1] = res[1][l];
                row_out[o + 2] = res[2][l];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn render_rows_avx2(c: &Cppn, tile: &SampleTile, rows: std::ops::Range<u32>, out: &mut [f32]) {
    render_rows::<true>(c, tile, rows, out)
}

/// The AVX2 path's code with 512-bit registers: a block of [`L`] lanes is one register, so each
/// layer takes half the instructions. The same operations on each lane in the same order (no
/// instruction here rounds differently from its AVX2 form), so the same bits as
/// [`render_rows_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn render_rows_avx512(c: &Cppn, tile: &SampleTile, rows: std::ops::Range<u32>, out: &mut [f32]) {
    render_rows::<true>(c, tile, rows, out)
}

/// The fused paths of an x86-64 CPU, best first.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum X86Path {
    Avx512,
    Avx2,
}

#[cfg(target_arch = "x86_64")]
fn x86_path() -> Option<X86Path> {
    use std::arch::is_x86_feature_detected as has;
    let avx2 = has!("avx2") && has!("fma");
    if avx2 && has!("avx512f") && has!("avx512vl") {
        Some(X86Path::Avx512)
    } else if avx2 {
        Some(X86Path::Avx2)
    } else {
        None
    }
}

/// Evaluates rows with `path`.
///
/// # Safety
/// The CPU must have every instruction set `path` is built for: `path` is what [`x86_path`]
/// found, or [`X86Path::Avx2`] where it found [`X86Path::Avx512`].
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
unsafe fn render_rows_x86(path: X86Path, c: &Cppn, tile: &SampleTile, rows: std::ops::Range<u32>, out: &mut [f32]) {
    // SAFETY: the caller vouches for the CPU (above).
    unsafe {
        match path {
            X86Path::Avx512 => render_rows_avx512(c, tile, rows, out),
            X86Path::Avx2 => render_rows_avx2(c, tile, rows, out),
        }
    }
}

/// Evaluates rows with the best code path this CPU has. The path depends only on the CPU, so a
/// machine always produces the same bits; paths differ from each other by rounding only (the
/// two x86 paths not even by that).
#[allow(unsafe_code)]
fn render_rows_best(c: &Cppn, tile: &SampleTile, rows: std::ops::Range<u32>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(path) = x86_path() {
        // SAFETY: `x86_path` found the path's instruction sets on this CPU.
        return unsafe { render_rows_x86(path, c, tile, rows, out) };
    }
    // aarch64 has fused multiply-add in its base instruction set.
    render_rows::<{ cfg!(target_arch = "aarch64") }>(c, tile, rows, out)
}

/// The CPU path's name, for provenance.
pub fn cpu_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    match x86_path() {
        Some(X86Path::Avx512) => return "fused-avx512-fma",
        Some(X86Path::Avx2) => return "fused-avx2-fma",
        None => {}
    }
    "fused-portable"
}

/// Evaluates a tile on all cores: linear RGB in (0, 1), 3 floats per sample, row-major.
pub fn render_tile_cpu(c: &Cppn, tile: &SampleTile, threads: usize, out: &mut [f32]) {
    assert_eq!(out.len(), tile.len() * 3, "output buffer does not match the tile");
    if tile.is_empty() {
        return;
    }
    let threads = threads.clamp(1, tile.h as usize);
    let rows_per = (tile.h as usize).div_ceil(threads);
    let row_len = tile.w as usize * 3;
    run_parts(out.chunks_mut(rows_per * row_len).enumerate(), |(t, chunk)| {
        let first = (t * rows_per) as u32;
        let rows = first..first + (chunk.len() / row_len) as u32;
        render_rows_best(c, tile, rows, chunk);
    });
}

/// Runs `work` on every part at once: the last part on this thread, the others on scoped
/// threads. One part (a small image, or one thread) spawns nothing: starting a thread costs
/// more than rendering a thumbnail-sized band.
pub fn run_parts<T: Send>(parts: impl IntoIterator<Item = T>, work: impl Fn(T) + Sync) {
    let work = &work;
    std::thread::scope(|s| {
        let mut parts = parts.into_iter().peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                work(part);
            } else {
                s.spawn(move || work(part));
            }
        }
    });
}

/// The reference evaluation of one sample in plain scalar code with exact `std` functions:
/// what the fused paths and the burn path are checked against.
pub fn eval_reference(c: &Cppn, sx: u32, sy: u32, full_w: u32, full_h: u32) -> [f32; 3] {
    let [x, y, r] = c.coords(sx, sy, full_w, full_h);
    let mut input = vec![x, y, r];
    input.extend(c.latent);
    let exact = |act: Act, v: f32| match act {
        Act::Tanh => v.tanh(),
        Act::Sin => v.sin(),
        Act::Gauss => (-v * v).exp(),
    };
    let layer = |w: &[f32], b: &[f32], x: &[f32], act: Option<Act>| -> Vec<f32> {
        b.iter()
            .enumerate()
            .map(|(j, bj)| {
                let s = x.iter().enumerate().map(|(i, xi)| w[j * x.len() + i] * xi).sum::<f32>() + bj;
                act.map_or(s, |a| exact(a, s))
            })
            .collect()
    };
    let mut h = layer(c.w0.as_flattened(), &c.b0, &input, Some(c.acts[0]));
    for k in 0..HIDDEN_LAYERS - 1 {
        h = layer(c.wh[k].as_flattened(), &c.bh[k], &h, Some(c.acts[k + 1]));
    }
    let o = layer(c.wo.as_flattened(), &c.bo, &h, None);
    [0, 1, 2].map(|i| 1.0 / (1.0 + (-o[i]).exp()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(seed: u64, prompt: &str) -> Cppn {
        Cppn::new(seed, Style::from_prompt(prompt))
    }

    #[test]
    fn the_activation_approximations_are_within_their_stated_error() {
        let mut worst = [0.0f64; 3];
        for i in -40_000..=40_000 {
            let x = i as f32 * 0.00025 * 40.0; // [-400, 400] for sin, beyond the clamp for tanh
            let t = (tanh_approx(x / 40.0 * 10.0) as f64 - ((x / 40.0 * 10.0) as f64).tanh()).abs();
            let s = (sin_approx(x) as f64 - (x as f64).sin()).abs();
            let g = x / 40.0 * 5.0;
            let e = (exp_approx(-g * g) as f64 - (-(g as f64) * (g as f64)).exp()).abs();
            worst = [worst[0].max(t), worst[1].max(s), worst[2].max(e)];
        }
        assert!(worst[0] < 2e-6, "tanh error {}", worst[0]);
        // Range reduction at |x| = 400 costs a few ulp of 2π.
        assert!(worst[1] < 5e-5, "sin error {}", worst[1]);
        assert!(worst[2] < 2e-7, "exp error {}", worst[2]);
        for v in [-80.0f32, -3.0, 0.0, 2.5, 80.0] {
            let rel = ((exp_approx(v) as f64 - (v as f64).exp()) / (v as f64).exp()).abs();
            assert!(rel < 1e-6, "exp({v}) relative error {rel}");
        }
    }

    #[test]
    fn the_fused_cpu_path_matches_the_scalar_reference() {
        for (seed, prompt) in [(1, "ember"), (2, "kaleidoscope ocean"), (3, "busy neon mirror")] {
            let c = net(seed, prompt);
            let tile = SampleTile { x0: 3, y0: 5, w: 37, h: 9, full_w: 64, full_h: 48 };
            let mut out = vec![0.0; tile.len() * 3];
            render_tile_cpu(&c, &tile, 2, &mut out);
            let mut worst = 0.0f32;
            for yy in 0..tile.h {
                for xx in 0..tile.w {
                    let r = eval_reference(&c, tile.x0 + xx, tile.y0 + yy, 64, 48);
                    let o = ((yy * tile.w + xx) * 3) as usize;
                    for ch in 0..3 {
                        worst = worst.max((out[o + ch] - r[ch]).abs());
                    }
                }
            }
            assert!(worst < 1e-4, "seed {seed}: fused vs reference max difference {worst}");
        }
    }

    #[test]
    fn tiles_are_bit_identical_to_the_whole() {
        let c = net(9, "quad dusk");
        let full = SampleTile { x0: 0, y0: 0, w: 50, h: 30, full_w: 50, full_h: 30 };
        let mut whole = vec![0.0; full.len() * 3];
        render_tile_cpu(&c, &full, 2, &mut whole);
        let mut tiled = vec![0.0; full.len() * 3];
        for (y0, h) in [(0u32, 7u32), (7, 16), (23, 7)] {
            for (x0, w) in [(0u32, 19u32), (19, 31)] {
                let t = SampleTile { x0, y0, w, h, full_w: 50, full_h: 30 };
                let mut part = vec![0.0; t.len() * 3];
                render_tile_cpu(&c, &t, 1, &mut part);
                for yy in 0..h {
                    for xx in 0..w {
                        let src = ((yy * w + xx) * 3) as usize;
                        let dst = (((y0 + yy) * 50 + x0 + xx) * 3) as usize;
                        tiled[dst..dst + 3].copy_from_slice(&part[src..src + 3]);
                    }
                }
            }
        }
        assert!(whole.iter().zip(&tiled).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    /// Where the CPU has AVX-512 (as the machines CI runs on do), its path gives the bits of the
    /// AVX2 path: an image must not change with the machine's vector width. Every activation,
    /// and rows that fill a block of lanes and rows that do not.
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[allow(unsafe_code)]
    fn the_avx512_path_gives_the_avx2_path_s_bits() {
        if x86_path() != Some(X86Path::Avx512) {
            eprintln!("this CPU has no AVX-512; nothing to compare");
            return;
        }
        let mut acts: Vec<Act> = Vec::new();
        for (seed, prompt) in (0..24).map(|s| (s, ["ember", "quad dusk", "mirror forest"][s as usize % 3])) {
            let c = net(seed, prompt);
            for a in c.acts {
                if !acts.contains(&a) {
                    acts.push(a);
                }
            }
            for tile in [
                SampleTile { x0: 0, y0: 0, w: 16, h: 16, full_w: 16, full_h: 16 },
                SampleTile { x0: 3, y0: 5, w: 37, h: 9, full_w: 64, full_h: 48 },
            ] {
                let rows = 0..tile.h;
                let mut wide = vec![0.0f32; tile.len() * 3];
                let mut narrow = vec![0.0f32; tile.len() * 3];
                // SAFETY: this CPU has AVX-512 (checked at the top), and so AVX2 and FMA.
                unsafe {
                    render_rows_x86(X86Path::Avx512, &c, &tile, rows.clone(), &mut wide);
                    render_rows_x86(X86Path::Avx2, &c, &tile, rows, &mut narrow);
                }
                let same = wide.iter().zip(&narrow).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "seed {seed} {prompt:?}, tile {tile:?}: the paths' bits differ");
            }
        }
        assert_eq!(acts.len(), 3, "the seeds cover every activation: {acts:?}");
    }

    #[test]
    fn the_weights_are_a_pure_function_of_seed_and_prompt() {
        assert_eq!(net(5, "ember").flat_weights(), net(5, "ember").flat_weights());
        assert_ne!(net(5, "ember").flat_weights(), net(6, "ember").flat_weights());
        assert_ne!(net(5, "ember rock").flat_weights(), net(5, "ember pool").flat_weights());
        assert_eq!(model_version().len(), 16);
    }
}
