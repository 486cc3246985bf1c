//! Kiln's wire types and contracts: render requests, tiers, prompt normalisation, the cache key,
//! the broker messages and names ([`wire`]), and the edge fleet's MQTT topics and payloads ([`fleet`]).
//!
//! Serde only, no I/O (the clock aside): everything here is shared by the scheduler, the workers and the CLI, and a
//! change to the cache key or a payload is a versioned contract change (see DESIGN.md).

pub mod api;
pub mod fleet;
mod job;
mod key;
mod prompt;
mod request;
mod secret;
mod text;
mod versioned;
pub mod wire;

pub use job::{JobRequest, JobState, ParseStateError};
pub use key::{CacheKey, KeyInput, ParseKeyError};
pub use prompt::normalise_prompt;
pub use request::{RenderRequest, RequestError, Tier, TierLimits, TierSpec, Tile};
pub use secret::{Secret, SecretUrl};
pub use text::{JsonError, decode_json, decode_json_value, nul_in_json, nul_in_value, refuse_nul};
pub use versioned::{FieldError, Versioned};

/// Now, in unix milliseconds: the one clock every Kiln timestamp is read from.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `s` as one URL path segment or query value: bytes other than `A-Z a-z 0-9 - . _ ~`
/// percent-encoded.
pub fn url_component(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
