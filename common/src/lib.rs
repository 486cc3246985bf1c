//! The plumbing every Kiln binary shares: the options and `main` wrapper (logging, the error
//! printed once with its chain), the shutdown signal, the allocator, the RabbitMQ connection and
//! topology ([`amqp`]), the client of the scheduler's API ([`client`]) and the command line's
//! progress bars ([`progress`]), and TLS ([`tls`]).

pub mod amqp;
pub mod client;
mod process;
pub mod progress;
pub mod tls;

pub use process::{GlobalArgs, cancel_on_signal, host_name, run_main, runtime};

/// The allocator Kiln's binaries install (`#[global_allocator] static A: Allocator = Allocator;`
/// in each `main.rs`): jemalloc (the system's where jemalloc does not build, on MSVC). A busy
/// farm allocates and frees small buffers on many threads (HTTP bodies, JSON, rows, PNGs), which
/// glibc's malloc serves slowly (see `docs/benchmarks.md`). Linking it also makes jemalloc the C
/// code's `malloc` (the crate's `unprefixed_malloc_on_supported_platforms`), so SQLite's
/// allocations take it too.
#[cfg(target_env = "msvc")]
pub use std::alloc::System as Allocator;
#[cfg(not(target_env = "msvc"))]
pub use tikv_jemallocator::Jemalloc as Allocator;
