//! The retry policy: which failures are worth another attempt, and how long to wait before it
//! (exponential backoff with jitter, so a burst of failures does not come back as a burst).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Retry settings (`[retry]` in the config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (`retry.max_attempts`, `KILN_MAX_ATTEMPTS`).
    pub max_attempts: u32,
    /// Wait before the second attempt, in milliseconds; doubles each time (`retry.base_ms`).
    pub base_ms: u64,
    /// The longest wait, in milliseconds (`retry.max_ms`).
    pub max_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 4, base_ms: 500, max_ms: 60_000 }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try again after this long.
    RetryAfter(Duration),
    /// Give up: the error is permanent or the attempts are spent.
    GiveUp,
}

impl RetryPolicy {
    /// The decision after `attempt` (1-based) failed. `jitter` in [0, 1) picks the wait within
    /// the upper half of the backoff window ("equal jitter"): never less than half the backoff.
    pub fn decide(&self, attempt: u32, transient: bool, jitter: f64) -> Decision {
        if !transient || attempt >= self.max_attempts {
            return Decision::GiveUp;
        }
        let backoff = self.base_ms.saturating_mul(1u64 << (attempt - 1).min(32)).min(self.max_ms);
        let half = backoff / 2;
        let wait = half + ((backoff - half) as f64 * jitter.clamp(0.0, 1.0)) as u64;
        Decision::RetryAfter(Duration::from_millis(wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_and_jitter_stays_in_the_upper_half() {
        let p = RetryPolicy { max_attempts: 100, base_ms: 100, max_ms: 1000 };
        let wait = |a, j| match p.decide(a, true, j) {
            Decision::RetryAfter(d) => d.as_millis() as u64,
            Decision::GiveUp => panic!("gave up"),
        };
        assert_eq!((wait(1, 0.0), wait(1, 0.999)), (50, 99));
        assert_eq!((wait(2, 0.0), wait(3, 0.0)), (100, 200));
        assert_eq!(wait(9, 0.0), 500, "capped at max_ms");
        assert_eq!(wait(70, 0.999), 999, "no overflow past the cap");
    }

    #[test]
    fn permanent_errors_and_spent_attempts_give_up() {
        let p = RetryPolicy { max_attempts: 3, ..RetryPolicy::default() };
        assert_eq!(p.decide(1, false, 0.5), Decision::GiveUp);
        assert!(matches!(p.decide(2, true, 0.5), Decision::RetryAfter(_)));
        assert_eq!(p.decide(3, true, 0.5), Decision::GiveUp);
    }
}
