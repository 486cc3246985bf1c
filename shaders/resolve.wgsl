// resolve.wgsl: supersample resolve, a box filter over each pixel's s × s samples.
// Bindings: 0 uniform Post; 1 storage read samples (3 f32 each, rows of width·s);
// 2 storage read_write pixels (3 f32 each, width × band rows). Sums run dy then dx, like the CPU.
// CPU reference: post::resolve. Tolerance: 1e-6 per channel.

@group(0) @binding(1) var<storage, read> samples: array<f32>;
@group(0) @binding(2) var<storage, read_write> pixels: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg);
    let w = post.dims.x;
    let s = post.dims.z;
    if (i >= w * post.dims.y) { return; }
    let px = i % w;
    let py = i / w;
    let sw = w * s;
    var acc = vec3<f32>(0.0);
    for (var dy = 0u; dy < s; dy++) {
        for (var dx = 0u; dx < s; dx++) {
            let j = ((py * s + dy) * sw + px * s + dx) * 3u;
            acc += vec3<f32>(samples[j], samples[j + 1u], samples[j + 2u]);
        }
    }
    acc = acc / f32(s * s);
    pixels[i * 3u] = acc.x;
    pixels[i * 3u + 1u] = acc.y;
    pixels[i * 3u + 2u] = acc.z;
}
