//! Kiln's wire types and contracts: render requests, tiers, prompt normalisation, the cache key,
//! the broker messages and names ([`wire`]), and the edge fleet's MQTT topics and payloads ([`fleet`]).
//!
//! Serde only, no I/O: everything here is shared by the scheduler, the workers and the CLI, and a
//! change to the cache key or a payload is a versioned contract change (see DESIGN.md).

pub mod fleet;
mod job;
mod key;
mod prompt;
mod request;
pub mod wire;

pub use job::{JobRequest, JobState, ParseStateError};
pub use key::{CacheKey, KeyInput, ParseKeyError};
pub use prompt::normalise_prompt;
pub use request::{RenderRequest, RequestError, Tier, TierLimits, TierSpec};
