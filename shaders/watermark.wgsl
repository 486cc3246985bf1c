// watermark.wgsl: the preview watermark, "KILN PREVIEW" in a 5×7 font, tiled and staggered,
// blended 30% toward white. Integer geometry only, so GPU and CPU agree exactly on its shape.
// Bindings: 0 uniform Post; 1 storage read_write pixels (3 f32 each, width × band rows);
// 2 storage read glyphs: 12 characters × 7 rows, 5 bits a row (bit 4 = leftmost column).
// CPU reference: post::watermark. Tolerance: 1e-6 per channel.

@group(0) @binding(1) var<storage, read_write> pixels: array<f32>;
@group(0) @binding(2) var<storage, read> glyphs: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg);
    let w = post.dims.x;
    if ((post.dims2.y & 1u) == 0u || i >= w * post.dims.y) { return; }
    let px = i % w;
    let py = post.dims.w + i / w;
    let unit = max(1u, max(w, post.dims2.x) / 128u);
    let gx = px / unit;
    let gy = py / unit;
    let tile_row = gy / 32u;
    let row = gy % 32u;
    let col = (gx + (tile_row % 2u) * 55u) % 110u;
    let ch = col / 6u;
    let cx = col % 6u;
    if (row < 7u && cx < 5u && ch < 12u) {
        if (((glyphs[ch * 7u + row] >> (4u - cx)) & 1u) == 1u) {
            for (var c = 0u; c < 3u; c++) {
                pixels[i * 3u + c] = mix(pixels[i * 3u + c], 1.0, 0.3);
            }
        }
    }
}
