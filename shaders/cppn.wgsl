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

const HIDDEN: u32 = 32u;
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

    var a: array<f32, 32>;
    var b: array<f32, 32>;
    // Input layer: w0 [32][11] at 0, b0 at 352.
    for (var j = 0u; j < HIDDEN; j++) {
        var s = wts_at(352u + j);
        for (var k = 0u; k < INPUTS; k++) { s = fma(wts_at(j * INPUTS + k), inp[k], s); }
        a[j] = activate(p.acts.x, s);
    }
    // Hidden layers: each w [32][32] then b [32], starting at 384.
    var base = 384u;
    for (var layer = 0u; layer < 3u; layer++) {
        let code = p.acts[layer + 1u];
        for (var j = 0u; j < HIDDEN; j++) {
            var s = wts_at(base + 1024u + j);
            for (var k = 0u; k < HIDDEN; k++) { s = fma(wts_at(base + j * HIDDEN + k), a[k], s); }
            b[j] = activate(code, s);
        }
        a = b;
        base += 1056u;
    }
    // Output layer: wo [4][32] at 3552, bo at 3680; three channels, sigmoid.
    for (var c = 0u; c < 3u; c++) {
        var s = wts_at(3680u + c);
        for (var k = 0u; k < HIDDEN; k++) { s = fma(wts_at(3552u + c * HIDDEN + k), a[k], s); }
        out[i * 3u + c] = 1.0 / (1.0 + exp_approx(-s));
    }
}
