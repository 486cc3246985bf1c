// quantize.wgsl: linear RGB to 8-bit sRGB, rounded, or with an 8×8 ordered (Bayer) dither for print.
// Bindings: 0 uniform Post; 1 storage read pixels (3 f32 each, width × band rows);
// 2 storage read_write packed: one u32 per pixel, r | g << 8 | b << 16.
// CPU reference: post::quantize. Tolerance: 1 level per channel (pow differs by an ulp or two).

@group(0) @binding(1) var<storage, read> pixels: array<f32>;
@group(0) @binding(2) var<storage, read_write> packed: array<u32>;

fn bayer8(x: u32, y: u32) -> u32 {
    let z = x ^ y;
    return ((z & 1u) << 5u) | ((y & 1u) << 4u) | ((z & 2u) << 2u) | ((y & 2u) << 1u) | ((z & 4u) >> 1u) | ((y & 4u) >> 2u);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg);
    let w = post.dims.x;
    if (i >= w * post.dims.y) { return; }
    var threshold = 0.5;
    if ((post.dims2.y & 2u) != 0u) {
        threshold = (f32(bayer8(i % w, post.dims.w + i / w)) + 0.5) / 64.0;
    }
    var word = 0u;
    for (var c = 0u; c < 3u; c++) {
        let v = floor(linear_to_srgb(pixels[i * 3u + c]) * 255.0 + threshold);
        word |= u32(clamp(v, 0.0, 255.0)) << (8u * c);
    }
    packed[i] = word;
}
