// cppn.wgsl: the built-in CPPN evaluated whole, one invocation per sample.
// Bindings (group 0):
//   0 uniform  CppnParams: tile (x0, y0, w, h), grid (full_w, full_h, symmetry, _), acts (4 codes),
//              style (frequency, _, _, _), latent (2 × vec4)
//   1 uniform  wv: the weights, 3684 f32 (921 vec4) in the order of Cppn::flat_weights; a uniform
//              buffer, because llvmpipe reads it 1.8x faster than a storage buffer
//   2 storage, read_write  out: 3 f32 per sample (sigmoid outputs), row-major within the tile
// CPU reference: worker/src/engine/cppn.rs (render_tile_cpu and eval_reference); the activation
// approximations below are the same formulas as tanh_approx, sin_approx and exp_approx there.

struct CppnParams {
    tile: vec4<u32>,
    grid: vec4<u32>,
    acts: vec4<u32>,
    style: vec4<f32>,
    latent0: vec4<f32>,
    latent1: vec4<f32>,
}

@group(0) @binding(0) var<uniform> p: CppnParams;
@group(0) @binding(1) var<uniform> wv: array<vec4<f32>, 921>;
fn wts_at(i: u32) -> f32 { return wv[i / 4u][i % 4u]; }
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

const INPUTS: u32 = 11u;
const TANH_CLAMP: f32 = 7.9988117;
const PI: f32 = 3.14159265358979;
const HALF_PI: f32 = 1.57079632679490;
const TAU: f32 = 6.28318530717959;

fn tanh_approx(x0: f32) -> f32 {
    let x = clamp(x0, -TANH_CLAMP, TANH_CLAMP);
    let x2 = x * x;
    var p = fma(x2, -2.7607685e-16, 2.0001879e-13);
    p = fma(x2, p, -8.6046715e-11);
    p = fma(x2, p, 5.122297e-8);
    p = fma(x2, p, 1.4857224e-5);
    p = fma(x2, p, 6.3726193e-4);
    p = fma(x2, p, 4.8935246e-3);
    p = p * x;
    var q = fma(x2, 1.1982584e-6, 1.1853471e-4);
    q = fma(x2, q, 2.2684346e-3);
    q = fma(x2, q, 4.893525e-3);
    return p / q;
}

fn sin_approx(x: f32) -> f32 {
    let k = floor(x * (1.0 / TAU) + 0.5);
    var r = x - k * TAU;
    if (r > HALF_PI) { r = PI - r; } else if (r < -HALF_PI) { r = -PI - r; }
    let r2 = r * r;
    var p = fma(r2, -2.5052108e-8, 2.7557319e-6);
    p = fma(r2, p, -1.984127e-4);
    p = fma(r2, p, 8.333333e-3);
    p = fma(r2, p, -1.6666667e-1);
    return r + r * r2 * p;
}

fn exp_approx(v0: f32) -> f32 {
    let v = clamp(v0, -87.0, 87.0);
    let t = v * 1.44269504;
    let k = floor(t + 0.5);
    let f = (t - k) * 0.693147181;
    var p = fma(f, 1.3888889e-3, 8.333333e-3);
    p = fma(f, p, 4.1666668e-2);
    p = fma(f, p, 1.6666667e-1);
    p = fma(f, p, 0.5);
    p = fma(f, p, 1.0);
    p = fma(f, p, 1.0);
    return p * bitcast<f32>(u32(i32(k) + 127) << 23u);
}

fn activate(code: u32, x: f32) -> f32 {
    switch code {
        case 0u: { return tanh_approx(x); }
        case 1u: { return sin_approx(x); }
        default: { return exp_approx(-x * x); }
    }
}

// The layers below are written out rather than looped. The weight layout puts every 32-wide row
// and every bias block on a vec4 boundary, so the 32-input layers read whole vec4s of weights
// against the activations held as 8 vec4, at constant indices. On an NVIDIA H200 (Vulkan, driver
// 580) this form ran the model at 6.7 TFLOP/s effective; the earlier scalar loops over f32 arrays
// at 1.4; the same vec4 form with row32 and the neuron blocks as loops at 4.7; and with the layer
// loop written out as well at 5.0, so that one is not taken. Each sum is the same fma chain, in
// the same order, as before: the samples are bit-identical to the scalar version's on the H200
// and on lavapipe. `kiln-worker bench --cppn-wgsl FILE` times another version against this one.

// One invocation's activations of the layer just computed: 32 values as 8 vec4.
var<private> h: array<vec4<f32>, 8>;

// bias + row · h, the row being the 8 vec4 of weights from `row`, summed in index order (the
// same fma chain as the CPU reference).
fn row32(row: u32, bias: f32) -> f32 {
    var s = bias;
    { let w = wv[row + 0u]; let v = h[0]; s = fma(w.x, v.x, s); s = fma(w.y, v.y, s); s = fma(w.z, v.z, s); s = fma(w.w, v.w, s); }
    { let w = wv[row + 1u]; let v = h[1]; s = fma(w.x, v.x, s); s = fma(w.y, v.y, s); s = fma(w.z, v.z, s); s = fma(w.w, v.w, s); }
    { let w = wv[row + 2u]; let v = h[2]; s = fma(w.x, v.x, s); s = fma(w.y, v.y, s); s = fma(w.z, v.z, s); s = fma(w.w, v.w, s); }
    { let w = wv[row + 3u]; let v = h[3]; s = fma(w.x, v.x, s); s = fma(w.y, v.y, s); s = fma(w.z, v.z, s); s = fma(w.w, v.w, s); }
    { let w = wv[row + 4u]; let v = h[4]; s = fma(w.x, v.x, s); s = fma(w.y, v.y, s); s = fma(w.z, v.z, s); s = fma(w.w, v.w, s); }
    { let w = wv[row + 5u]; let v = h[5]; s = fma(w.x, v.x, s); s = fma(w.y, v.y, s); s = fma(w.z, v.z, s); s = fma(w.w, v.w, s); }
    { let w = wv[row + 6u]; let v = h[6]; s = fma(w.x, v.x, s); s = fma(w.y, v.y, s); s = fma(w.z, v.z, s); s = fma(w.w, v.w, s); }
    { let w = wv[row + 7u]; let v = h[7]; s = fma(w.x, v.x, s); s = fma(w.y, v.y, s); s = fma(w.z, v.z, s); s = fma(w.w, v.w, s); }
    return s;
}

// bias + row · inp for the input layer's row j (11 weights from j * 11, not vec4-aligned).
fn row11(j: u32, inp: array<f32, 11>, bias: f32) -> f32 {
    var s = bias;
    for (var k = 0u; k < INPUTS; k++) { s = fma(wts_at(j * INPUTS + k), inp[k], s); }
    return s;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    let tw = p.tile.z;
    if (i >= tw * p.tile.w) { return; }
    let sx = p.tile.x + i % tw;
    let sy = p.tile.y + i / tw;
    let fw = p.grid.x;
    let fh = p.grid.y;
    let long = f32(max(fw, fh));
    var x = f32(2 * i32(sx) + 1 - i32(fw)) / long;
    var y = f32(i32(fh) - 2 * i32(sy) - 1) / long;
    switch p.grid.z {
        case 1u: { x = abs(x); }
        case 2u: { x = abs(x); y = abs(y); }
        case 3u: {
            let ax = abs(x);
            let ay = abs(y);
            x = select(ay, ax, ax > ay);
            y = select(ax, ay, ax > ay);
        }
        default: {}
    }
    let f = p.style.x;
    var inp: array<f32, 11>;
    inp[0] = x * f;
    inp[1] = y * f;
    inp[2] = sqrt(x * x + y * y) * f;
    inp[3] = p.latent0.x; inp[4] = p.latent0.y; inp[5] = p.latent0.z; inp[6] = p.latent0.w;
    inp[7] = p.latent1.x; inp[8] = p.latent1.y; inp[9] = p.latent1.z; inp[10] = p.latent1.w;

    // Input layer: w0 [32][11] at 0, b0 at 352 (vec4 88), four neurons to a block.
    let c0 = p.acts.x;
    { let b = wv[88u]; h[0] = vec4<f32>(activate(c0, row11(0u, inp, b.x)), activate(c0, row11(1u, inp, b.y)), activate(c0, row11(2u, inp, b.z)), activate(c0, row11(3u, inp, b.w))); }
    { let b = wv[89u]; h[1] = vec4<f32>(activate(c0, row11(4u, inp, b.x)), activate(c0, row11(5u, inp, b.y)), activate(c0, row11(6u, inp, b.z)), activate(c0, row11(7u, inp, b.w))); }
    { let b = wv[90u]; h[2] = vec4<f32>(activate(c0, row11(8u, inp, b.x)), activate(c0, row11(9u, inp, b.y)), activate(c0, row11(10u, inp, b.z)), activate(c0, row11(11u, inp, b.w))); }
    { let b = wv[91u]; h[3] = vec4<f32>(activate(c0, row11(12u, inp, b.x)), activate(c0, row11(13u, inp, b.y)), activate(c0, row11(14u, inp, b.z)), activate(c0, row11(15u, inp, b.w))); }
    { let b = wv[92u]; h[4] = vec4<f32>(activate(c0, row11(16u, inp, b.x)), activate(c0, row11(17u, inp, b.y)), activate(c0, row11(18u, inp, b.z)), activate(c0, row11(19u, inp, b.w))); }
    { let b = wv[93u]; h[5] = vec4<f32>(activate(c0, row11(20u, inp, b.x)), activate(c0, row11(21u, inp, b.y)), activate(c0, row11(22u, inp, b.z)), activate(c0, row11(23u, inp, b.w))); }
    { let b = wv[94u]; h[6] = vec4<f32>(activate(c0, row11(24u, inp, b.x)), activate(c0, row11(25u, inp, b.y)), activate(c0, row11(26u, inp, b.z)), activate(c0, row11(27u, inp, b.w))); }
    { let b = wv[95u]; h[7] = vec4<f32>(activate(c0, row11(28u, inp, b.x)), activate(c0, row11(29u, inp, b.y)), activate(c0, row11(30u, inp, b.z)), activate(c0, row11(31u, inp, b.w))); }
    // Hidden layers: each w [32][32] then b [32], the first at 384 (vec4 96), 1056 (264 vec4) apart.
    var base = 96u;
    for (var layer = 0u; layer < 3u; layer++) {
        let code = p.acts[layer + 1u];
        var next: array<vec4<f32>, 8>;
        { let b = wv[base + 256u]; let r = base + 0u; next[0] = vec4<f32>(activate(code, row32(r, b.x)), activate(code, row32(r + 8u, b.y)), activate(code, row32(r + 16u, b.z)), activate(code, row32(r + 24u, b.w))); }
        { let b = wv[base + 257u]; let r = base + 32u; next[1] = vec4<f32>(activate(code, row32(r, b.x)), activate(code, row32(r + 8u, b.y)), activate(code, row32(r + 16u, b.z)), activate(code, row32(r + 24u, b.w))); }
        { let b = wv[base + 258u]; let r = base + 64u; next[2] = vec4<f32>(activate(code, row32(r, b.x)), activate(code, row32(r + 8u, b.y)), activate(code, row32(r + 16u, b.z)), activate(code, row32(r + 24u, b.w))); }
        { let b = wv[base + 259u]; let r = base + 96u; next[3] = vec4<f32>(activate(code, row32(r, b.x)), activate(code, row32(r + 8u, b.y)), activate(code, row32(r + 16u, b.z)), activate(code, row32(r + 24u, b.w))); }
        { let b = wv[base + 260u]; let r = base + 128u; next[4] = vec4<f32>(activate(code, row32(r, b.x)), activate(code, row32(r + 8u, b.y)), activate(code, row32(r + 16u, b.z)), activate(code, row32(r + 24u, b.w))); }
        { let b = wv[base + 261u]; let r = base + 160u; next[5] = vec4<f32>(activate(code, row32(r, b.x)), activate(code, row32(r + 8u, b.y)), activate(code, row32(r + 16u, b.z)), activate(code, row32(r + 24u, b.w))); }
        { let b = wv[base + 262u]; let r = base + 192u; next[6] = vec4<f32>(activate(code, row32(r, b.x)), activate(code, row32(r + 8u, b.y)), activate(code, row32(r + 16u, b.z)), activate(code, row32(r + 24u, b.w))); }
        { let b = wv[base + 263u]; let r = base + 224u; next[7] = vec4<f32>(activate(code, row32(r, b.x)), activate(code, row32(r + 8u, b.y)), activate(code, row32(r + 16u, b.z)), activate(code, row32(r + 24u, b.w))); }
        h = next;
        base += 264u;
    }
    // Output layer: wo [4][32] at 3552 (vec4 888), bo at 3680 (vec4 920); three channels, sigmoid.
    let bo = wv[920u];
    out[i * 3u] = 1.0 / (1.0 + exp_approx(-row32(888u, bo.x)));
    out[i * 3u + 1u] = 1.0 / (1.0 + exp_approx(-row32(896u, bo.y)));
    out[i * 3u + 2u] = 1.0 / (1.0 + exp_approx(-row32(904u, bo.z)));
}
