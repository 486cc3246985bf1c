//! Kiln's worker: the render engine (burn models and fused kernels), wgpu post-processing,
//! PNG encoding, the content-addressed asset store and the seed-keyed cache.

pub mod engine;
pub mod prng;
