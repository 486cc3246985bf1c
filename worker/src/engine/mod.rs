//! The render engine: models that turn a tile of sample positions into linear RGB.

pub mod burn_model;
pub mod cppn;
pub mod style;

/// What can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The GPU or a backend failed; the message says where.
    #[error("backend error: {0}")]
    Backend(String),
    /// No GPU adapter where one was required.
    #[error("no wgpu adapter found (install a Vulkan driver, e.g. Debian's mesa-vulkan-drivers, or use --backend cpu)")]
    NoAdapter,
}
