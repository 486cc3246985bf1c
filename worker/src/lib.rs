//! Kiln's worker: the render engine (burn models and fused kernels), wgpu post-processing,
//! PNG encoding, the content-addressed asset store and the seed-keyed cache.

pub mod amqp;
pub mod attempt;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod consume;
pub mod engine;
pub mod gpu;
pub mod metrics;
pub mod post;
pub mod prng;
pub mod render;
pub mod settle;
pub mod shaders;
pub mod store;
pub mod worker;

/// The allocator Kiln's binaries install (`#[global_allocator] static A: Allocator = Allocator;`
/// in each `main.rs`): jemalloc (the system's where jemalloc does not build, on MSVC). A busy
/// farm allocates and frees small buffers on many threads (HTTP bodies, JSON, rows, PNGs), and
/// with glibc's malloc that was about an eighth of its CPU; with jemalloc, `kiln bench farm`'s
/// tiny jobs cost 15% less CPU each. Linking it also makes jemalloc the C code's `malloc` (the
/// crate's `unprefixed_malloc_on_supported_platforms`), so SQLite's allocations (a tenth of
/// the database thread's CPU under glibc) take it too.
#[cfg(target_env = "msvc")]
pub use std::alloc::System as Allocator;
#[cfg(not(target_env = "msvc"))]
pub use tikv_jemallocator::Jemalloc as Allocator;
