//! One trait for every versioned payload, on the broker and over MQTT alike: its schema version,
//! the versions a receiver reads, and the checks of its fields that serde cannot make.

use std::ops::RangeInclusive;

/// A payload with a schema version (`v`).
pub trait Versioned {
    /// The schema versions this build reads (an older one it still understands, the newest it
    /// writes).
    const READS: RangeInclusive<u32>;

    /// Its `v`.
    fn version(&self) -> u32;

    /// Whether this build reads its version.
    fn readable(&self) -> bool {
        Self::READS.contains(&self.version())
    }

    /// Checks the fields serde cannot.
    fn check(&self) -> Result<(), FieldError> {
        Ok(())
    }
}

/// A field that parses but cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field {field}: {message}")]
pub struct FieldError {
    /// The field.
    pub field: &'static str,
    /// Why.
    pub message: String,
}
