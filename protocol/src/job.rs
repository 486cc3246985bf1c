//! Jobs on the wire: what a client submits, the states a job moves through, and the job state
//! machine's rules. Pure: the scheduler's store writes each transition as an event, and the job row
//! is the projection of its events.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Tier;

/// What a client asks for (`POST /v1/jobs`). Unknown fields are refused by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// The prompt; its words steer the style.
    pub prompt: String,
    /// The seed; chosen by the scheduler and recorded when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The tier.
    pub tier: Tier,
    /// Width in pixels (default: the tier's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// Height in pixels (default: the tier's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Supersampling per axis (default: the tier's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<u32>,
    /// The model (default `cppn`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Idempotency key: a second submit with the same key returns the first job.
    /// The `Idempotency-Key` header does the same for a single job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Where a job is. `succeeded`, `failed`, `cancelled` and `cached` are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Accepted, waiting for a worker (or for the render it is attached to).
    Queued,
    /// Handed to a worker's queue.
    Dispatched,
    /// A worker is rendering it.
    Running,
    /// Rendered; the job carries its asset.
    Succeeded,
    /// Gave up; the job carries its error.
    Failed,
    /// Cancelled by a client or the operator.
    Cancelled,
    /// Answered from the cache at submit: nothing rendered.
    Cached,
    /// Waiting for the operator's approval.
    AwaitingApproval,
}

impl JobState {
    /// Every state, in the order a job moves through them.
    pub const ALL: [JobState; 8] = [
        JobState::Queued,
        JobState::Dispatched,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Cached,
        JobState::AwaitingApproval,
    ];

    /// The name used on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Dispatched => "dispatched",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Cached => "cached",
            JobState::AwaitingApproval => "awaiting_approval",
        }
    }

    /// Whether nothing more happens to a job in this state.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Cached)
    }

    /// Whether a job may move from `self` to `to`. Terminal states go nowhere; a live job may
    /// always fail or be cancelled, and goes back to `queued` to be retried or resumed.
    pub fn can_move_to(self, to: JobState) -> bool {
        use JobState::*;
        if self.is_terminal() {
            return false;
        }
        match to {
            Failed | Cancelled | Queued => true,
            Dispatched => self == Queued,
            Running => matches!(self, Queued | Dispatched),
            // A job attached to another's render succeeds straight from `queued`.
            Succeeded => matches!(self, Queued | Dispatched | Running),
            Cached => false,
            AwaitingApproval => self == Queued,
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A name that is not a job state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "state: unknown job state {0:?}; expected one of queued, dispatched, running, succeeded, failed, cancelled, cached, awaiting_approval"
)]
pub struct ParseStateError(pub String);

impl FromStr for JobState {
    type Err = ParseStateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| ParseStateError(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_go_nowhere() {
        for from in JobState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in JobState::ALL {
                assert!(!from.can_move_to(to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn a_job_runs_in_order_and_may_be_cancelled_or_retried_while_live() {
        use JobState::*;
        assert!(Queued.can_move_to(Dispatched));
        assert!(Dispatched.can_move_to(Running));
        assert!(Running.can_move_to(Succeeded));
        assert!(Running.can_move_to(Queued), "retry and resume go back to queued");
        assert!(!Running.can_move_to(Dispatched));
        assert!(!Queued.can_move_to(Cached), "cached is only ever a job's first state");
        for live in [Queued, Dispatched, Running, AwaitingApproval] {
            assert!(live.can_move_to(Cancelled));
            assert!(live.can_move_to(Failed));
        }
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("done".parse::<JobState>().unwrap_err().to_string().contains("state"));
    }

    #[test]
    fn a_request_with_an_unknown_field_is_refused_by_name() {
        let e = serde_json::from_str::<JobRequest>(r#"{"prompt":"a","tier":"preview","colour":"red"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");
        let ok: JobRequest = serde_json::from_str(r#"{"prompt":"a","tier":"final","seed":3}"#).unwrap();
        assert_eq!((ok.tier, ok.seed), (Tier::Final, Some(3)));
    }

    #[test]
    fn a_state_pads_to_a_column_as_a_string_does() {
        assert_eq!(format!("{:<10}|{:>8}|", JobState::Queued, crate::Tier::Final), "queued    |   final|");
    }
}
