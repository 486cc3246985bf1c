// tone.wgsl: palette tone map, in place, one invocation per sample.
// Bindings: 0 uniform Post (common.wgsl); 1 storage read_write samples: 3 f32 per sample, the
// CPPN's outputs in, linear RGB out. Sample count = (width·s) × (rows·s).
// CPU reference: post::tone. Tolerance: 1e-5 per channel.

@group(0) @binding(1) var<storage, read_write> samples: array<f32>;

fn gradient(t: f32) -> vec3<f32> {
    let s = clamp(t, 0.0, 1.0) * 4.0;
    let i = min(u32(floor(s)), 3u);
    let f = s - f32(i);
    return mix(post.palette[i].xyz, post.palette[i + 1u].xyz, f);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg);
    let s = post.dims.z;
    if (i >= post.dims.x * s * post.dims.y * s) { return; }
    let o = vec3<f32>(samples[i * 3u], samples[i * 3u + 1u], samples[i * 3u + 2u]);
    let t = 0.5 + (o.x - 0.5) * post.tone.x * 2.2;
    let base = gradient(t);
    let accent = gradient(1.0 - o.y);
    let c = clamp(mix(base, accent, 0.3 * o.z) * (0.8 + 0.4 * o.y), vec3<f32>(0.0), vec3<f32>(1.0));
    samples[i * 3u] = c.x;
    samples[i * 3u + 1u] = c.y;
    samples[i * 3u + 2u] = c.z;
}
