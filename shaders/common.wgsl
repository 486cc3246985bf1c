// common.wgsl: declarations shared by the post-processing kernels (prepended to each of them).
// The Post uniform at group 0 binding 0:
//   dims  = (width px, band rows, samples per axis, first row of the band)
//   dims2 = (height px, flags: bit 0 watermark, bit 1 dither, thumbnail factor, thumbnail width)
//   tone  = (contrast, _, _, _)
//   palette = 5 stops, linear RGB in xyz
// CPU references: worker/src/post.rs, one function per kernel.

struct Post {
    dims: vec4<u32>,
    dims2: vec4<u32>,
    tone: vec4<f32>,
    palette: array<vec4<f32>, 5>,
}

@group(0) @binding(0) var<uniform> post: Post;

fn flat_id(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 64u;
}

fn linear_to_srgb(l: f32) -> f32 {
    let c = clamp(l, 0.0, 1.0);
    if (c <= 0.0031308) { return c * 12.92; }
    return 1.055 * pow(c, 1.0 / 2.4) - 0.055;
}
