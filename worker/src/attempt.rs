//! One attempt at a render, the same for the embedded farm's in-process workers and the worker
//! daemon: where it runs (a tiny render held in memory on the caller's task, any other on a
//! blocking thread), a panic caught and reported as a failure, and each failure classed as worth
//! another attempt or not. What comes of the failure (a retry, giving up, quarantine) is the
//! scheduler's to decide.

use std::sync::Arc;

use kiln_protocol::RenderRequest;

use crate::render::{Backend, Progress, own_thumbnail};
use crate::worker::{Rendered, Worker};

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong.
    pub error: String,
    /// Whether another attempt may succeed.
    pub transient: bool,
}

/// A render on the CPU of fewer samples than this (width × height × samples²) runs on the task
/// that asked for it, not on a blocking thread: a hand-off to the blocking pool and back costs
/// two thread wakes and their context switches, more than a 16×16 render takes (see
/// `docs/benchmarks.md`). At this bound a render holds its runtime thread for well under a
/// millisecond.
pub const INLINE_BELOW_SAMPLES: u64 = 32 * 32;

/// The least `hold` under which a render may run on the caller's task: a render under
/// [`INLINE_BELOW_SAMPLES`] makes a PNG of at most about 3.2 KiB (32×32 RGB is 3 KiB raw), so
/// with this much held it writes no file on a runtime thread.
pub const INLINE_MIN_HOLD: u64 = 8 << 10;

/// Whether `req` renders on the caller's task: a tiny render on the CPU whose PNG is its own
/// thumbnail and is held in memory (`hold`, as [`Worker::render_holding`] takes it).
pub fn runs_inline(worker: &Worker, req: &RenderRequest, hold: u64) -> bool {
    matches!(worker.engine().backend, Backend::Cpu { .. })
        && req.sample_count() < INLINE_BELOW_SAMPLES
        && own_thumbnail(req.width, req.height)
        && hold >= INLINE_MIN_HOLD
}

/// What a caught panic said.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let said = payload.downcast_ref::<&str>().copied().or_else(|| payload.downcast_ref::<String>().map(String::as_str));
    said.unwrap_or("(no message)").to_owned()
}

/// Renders `req` ([`Worker::render_holding`] with `hold`), telling `progress` as rows finish,
/// and hands the result to `then` on the same thread (for work that belongs with the render,
/// such as reading what of a cached asset travels with its result). A render that fails or
/// panics is a [`Failure`].
pub async fn attempt<T, P, F>(
    worker: &Arc<Worker>,
    req: RenderRequest,
    hold: u64,
    mut progress: P,
    then: F,
) -> Result<T, Failure>
where
    T: Send + 'static,
    P: FnMut(Progress) + Send + 'static,
    F: FnOnce(&Worker, Rendered) -> T + Send + 'static,
{
    let inline = runs_inline(worker, &req, hold);
    let w = worker.clone();
    let render = move || w.render_holding(&req, &mut progress, hold).map(|r| then(&w, r));
    let result = if inline {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(render)).map_err(|p| panic_message(&*p))
    } else {
        tokio::task::spawn_blocking(render).await.map_err(|e| match e.try_into_panic() {
            Ok(p) => panic_message(&*p),
            Err(e) => e.to_string(),
        })
    };
    match result {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(Failure { error: e.to_string(), transient: e.is_transient() }),
        Err(said) => Err(Failure { error: format!("the render panicked: {said}"), transient: true }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WorkerConfig;

    fn worker(dir: &std::path::Path) -> Arc<Worker> {
        let cfg = WorkerConfig { data_dir: dir.to_path_buf(), ..WorkerConfig::default() };
        Arc::new(Worker::new(&cfg, Backend::Cpu { threads: 1 }).unwrap())
    }

    fn request(model: &str, side: u32) -> RenderRequest {
        let limits = kiln_protocol::TierLimits::default();
        let mut r = RenderRequest::resolve(
            "cppn",
            "attempt",
            3,
            kiln_protocol::Tier::Preview,
            Some(side),
            Some(side),
            Some(1),
            &limits,
        )
        .unwrap();
        r.model = model.into();
        r
    }

    #[test]
    fn a_caught_panic_says_what_it_said() {
        let caught = |f: fn()| panic_message(&*std::panic::catch_unwind(f).unwrap_err());
        assert_eq!(caught(|| panic!("a literal")), "a literal");
        assert_eq!(caught(|| panic!("formatted {}", 7)), "formatted 7");
        assert_eq!(caught(|| std::panic::panic_any(7u8)), "(no message)");
    }

    #[test]
    fn only_a_tiny_cpu_render_held_in_memory_runs_on_the_callers_task() {
        let dir = tempfile::tempdir().unwrap();
        let w = worker(dir.path());
        assert!(runs_inline(&w, &request("cppn", 16), INLINE_MIN_HOLD));
        assert!(!runs_inline(&w, &request("cppn", 16), 0), "not held: its files would be written on the task");
        assert!(!runs_inline(&w, &request("cppn", 64), INLINE_MIN_HOLD), "too many samples");
    }

    #[tokio::test]
    async fn an_attempt_renders_and_hands_the_result_on_or_says_why_it_failed() {
        let dir = tempfile::tempdir().unwrap();
        let w = worker(dir.path());
        for side in [16, 64] {
            let asset = attempt(&w, request("cppn", side), INLINE_MIN_HOLD, |_| {}, |_, r| r.asset).await.unwrap();
            assert_eq!(asset.len(), 64, "a BLAKE3 hex");
        }
        let failed = attempt(&w, request("nope", 16), INLINE_MIN_HOLD, |_| {}, |_, r| r.asset).await.unwrap_err();
        assert!(failed.error.contains("unknown model") && !failed.transient, "{failed:?}");
    }
}
