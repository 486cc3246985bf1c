// thumbnail.wgsl: thumbnail downsample, an f × f box average of the band's linear pixels
// (clipped at the image's right and bottom edges), then rounded 8-bit sRGB.
// Bands hold whole multiples of f rows, so each thumbnail pixel lies inside one band.
// Bindings: 0 uniform Post; 1 storage read pixels (3 f32 each, width × band rows);
// 2 storage read_write thumb: one u32 per thumbnail pixel, r | g << 8 | b << 16.
// CPU reference: post::thumbnail. Tolerance: 1 level per channel.

@group(0) @binding(1) var<storage, read> pixels: array<f32>;
@group(0) @binding(2) var<storage, read_write> thumb: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg);
    let w = post.dims.x;
    let rows = post.dims.y;
    let f = post.dims2.z;
    let tw = post.dims2.w;
    let th = (rows + f - 1u) / f;
    if (i >= tw * th) { return; }
    let tx = i % tw;
    let ty = i / tw;
    let x1 = min((tx + 1u) * f, w);
    let y1 = min((ty + 1u) * f, rows);
    var acc = vec3<f32>(0.0);
    for (var y = ty * f; y < y1; y++) {
        for (var x = tx * f; x < x1; x++) {
            let j = (y * w + x) * 3u;
            acc += vec3<f32>(pixels[j], pixels[j + 1u], pixels[j + 2u]);
        }
    }
    acc = acc / f32((x1 - tx * f) * (y1 - ty * f));
    var word = 0u;
    for (var c = 0u; c < 3u; c++) {
        word |= u32(clamp(floor(linear_to_srgb(acc[c]) * 255.0 + 0.5), 0.0, 255.0)) << (8u * c);
    }
    thumb[i] = word;
}
