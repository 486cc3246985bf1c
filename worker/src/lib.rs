//! Kiln's worker: the render engine (burn models and fused kernels), wgpu post-processing,
//! PNG encoding, the content-addressed asset store and the seed-keyed cache.

pub mod amqp;
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
pub mod store;
pub mod worker;

/// The allocator Kiln's binaries install (`#[global_allocator] static A: Allocator = ALLOCATOR;`
/// in each `main.rs`): jemalloc. A busy farm allocates and frees small buffers on many threads
/// (HTTP bodies, JSON, rows, PNGs), and with glibc's malloc that was about an eighth of its CPU;
/// with jemalloc, `kiln bench farm`'s tiny jobs cost 15% less CPU each.
#[cfg(not(target_env = "msvc"))]
pub type Allocator = tikv_jemallocator::Jemalloc;
/// The allocator Kiln's binaries install: the system's, where jemalloc does not build.
#[cfg(target_env = "msvc")]
pub type Allocator = std::alloc::System;

/// The [`Allocator`] itself, for a binary's `#[global_allocator]`.
#[cfg(not(target_env = "msvc"))]
pub const ALLOCATOR: Allocator = tikv_jemallocator::Jemalloc;
/// The [`Allocator`] itself, for a binary's `#[global_allocator]`.
#[cfg(target_env = "msvc")]
pub const ALLOCATOR: Allocator = std::alloc::System;
