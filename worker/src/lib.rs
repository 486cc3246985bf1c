//! Kiln's worker: the render engine (burn models and fused kernels), wgpu post-processing,
//! PNG encoding, the content-addressed asset store and the seed-keyed cache.

pub mod assets;
pub mod attempt;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod engine;
pub mod gpu;
pub mod gpu_usage;
pub mod metrics;
pub mod post;
pub mod prng;
pub mod render;
pub mod reproduce;
pub mod settle;
pub mod shaders;
pub mod worker;
