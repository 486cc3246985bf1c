//! The WGSL sources in `shaders/`, in one table: the GPU pipelines compile them and the post
//! chain's version hashes them (so an edited kernel changes the cache key).

/// Every WGSL source, by name, in the order the post chain's version hashes them. `common` is
/// prepended to each post-processing kernel.
pub const SHADERS: [(&str, &str); 7] = [
    ("common", include_str!("../../shaders/common.wgsl")),
    ("cppn", include_str!("../../shaders/cppn.wgsl")),
    ("tone", include_str!("../../shaders/tone.wgsl")),
    ("resolve", include_str!("../../shaders/resolve.wgsl")),
    ("watermark", include_str!("../../shaders/watermark.wgsl")),
    ("quantize", include_str!("../../shaders/quantize.wgsl")),
    ("thumbnail", include_str!("../../shaders/thumbnail.wgsl")),
];

/// The source of the kernel `name` as a pipeline compiles it: the fused CPPN alone, a
/// post-processing kernel after `common`. `None` for a name not in the table.
pub fn pipeline_source(name: &str) -> Option<String> {
    let (_, src) = SHADERS.iter().find(|(n, _)| *n == name)?;
    Some(if name == "cppn" { (*src).to_owned() } else { format!("{}\n{}", SHADERS[0].1, src) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_post_kernel_is_compiled_after_common_and_the_cppn_alone() {
        let tone = pipeline_source("tone").unwrap();
        assert!(tone.starts_with(SHADERS[0].1) && tone.ends_with(SHADERS[2].1));
        assert_eq!(pipeline_source("cppn").unwrap(), SHADERS[1].1);
        assert_eq!(pipeline_source("nope"), None);
    }
}
