//! The worker's Prometheus metrics. Names are constants with the `kiln_` prefix; labels are
//! low-cardinality (tier, model, backend), never a job or a seed.

use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

/// Seconds per render (model, post chain and encoding), by tier, model and backend.
pub const RENDER_SECONDS: &str = "kiln_render_seconds";
/// Output pixels rendered, by tier.
pub const PIXELS_RENDERED: &str = "kiln_pixels_rendered_total";
/// Requests answered from the cache.
pub const CACHE_HITS: &str = "kiln_cache_hits_total";
/// Requests that had to render.
pub const CACHE_MISSES: &str = "kiln_cache_misses_total";

/// Broker messages refused (dead-lettered) by the worker daemon.
pub const BAD_MESSAGES: &str = "kiln_worker_bad_messages_total";
/// Job messages the worker daemon got back from the broker unsettled (a worker died or lost the
/// broker with them in hand, or handed them back), by what it did: `put_back` (counted in the
/// message and queued again) or `dead_lettered` (past `run.delivery_limit`).
pub const REDELIVERIES: &str = "kiln_worker_redeliveries_total";
/// Result messages the worker daemon published (confirmed); one carries one or more results.
pub const RESULT_MESSAGES: &str = "kiln_worker_result_messages_total";
/// Results the worker daemon published (confirmed), over all its result messages.
pub const RESULTS: &str = "kiln_worker_results_total";
/// Ack frames the worker daemon sent; one `multiple` ack settles a run of deliveries.
pub const ACK_FRAMES: &str = "kiln_worker_ack_frames_total";
/// Assets the worker daemon handed to the scheduler, by how: `inline` (inside the result) or
/// `upload` (`PUT`). Nothing is counted when the asset folder is shared.
pub const ASSETS_HANDED: &str = "kiln_worker_assets_handed_total";

/// The GPU's memory, bytes, by adapter, where its driver says (NVML on NVIDIA).
pub const GPU_MEMORY: &str = "kiln_worker_gpu_memory_bytes";
/// The GPU's memory in use (by every process on it), bytes, by adapter, where its driver says.
pub const GPU_MEMORY_USED: &str = "kiln_worker_gpu_memory_used_bytes";
/// The share of the driver's last sample period in which the GPU ran a kernel (0 to 1), by
/// adapter, where its driver says.
pub const GPU_UTILIZATION: &str = "kiln_worker_gpu_utilization_ratio";

/// The worker's metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// [`RENDER_SECONDS`].
    pub render_seconds: HistogramVec,
    /// [`PIXELS_RENDERED`].
    pub pixels: IntCounterVec,
    /// [`CACHE_HITS`].
    pub cache_hits: IntCounter,
    /// [`CACHE_MISSES`].
    pub cache_misses: IntCounter,
    /// [`BAD_MESSAGES`].
    pub bad_messages: IntCounter,
    /// [`REDELIVERIES`], by `outcome`.
    pub redeliveries: IntCounterVec,
    /// [`RESULT_MESSAGES`].
    pub result_messages: IntCounter,
    /// [`RESULTS`].
    pub results: IntCounter,
    /// [`ACK_FRAMES`].
    pub ack_frames: IntCounter,
    /// [`ASSETS_HANDED`], by `how`.
    pub assets_handed: IntCounterVec,
    /// [`GPU_MEMORY`], [`GPU_MEMORY_USED`] and [`GPU_UTILIZATION`], by `adapter`: no series
    /// until the driver reports them.
    gpu: [GaugeVec; 3],
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let buckets = vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0];
        let render_seconds = HistogramVec::new(
            HistogramOpts::new(RENDER_SECONDS, "Seconds per render, model to PNG").buckets(buckets),
            &["tier", "model", "backend"],
        )
        .expect("valid metric");
        let pixels =
            IntCounterVec::new(Opts::new(PIXELS_RENDERED, "Output pixels rendered"), &["tier"]).expect("valid metric");
        let cache_hits = IntCounter::new(CACHE_HITS, "Render requests answered from the cache").expect("valid metric");
        let cache_misses = IntCounter::new(CACHE_MISSES, "Render requests that had to render").expect("valid metric");
        let bad_messages =
            IntCounter::new(BAD_MESSAGES, "Job messages refused and dead-lettered").expect("valid metric");
        let redeliveries = IntCounterVec::new(
            Opts::new(REDELIVERIES, "Job messages delivered again unsettled: put back counted, or dead-lettered"),
            &["outcome"],
        )
        .expect("valid metric");
        let result_messages =
            IntCounter::new(RESULT_MESSAGES, "Result messages published, each with one or more results")
                .expect("valid metric");
        let results = IntCounter::new(RESULTS, "Results published").expect("valid metric");
        let ack_frames =
            IntCounter::new(ACK_FRAMES, "Ack frames sent; one may settle a run of deliveries").expect("valid metric");
        let assets_handed = IntCounterVec::new(
            Opts::new(ASSETS_HANDED, "Assets handed to the scheduler, inside the result or uploaded"),
            &["how"],
        )
        .expect("valid metric");
        let gpu = [
            (GPU_MEMORY, "The GPU's memory, bytes, where its driver says"),
            (GPU_MEMORY_USED, "The GPU's memory in use by every process on it, bytes, where its driver says"),
            (GPU_UTILIZATION, "Share of the driver's last sample period the GPU ran a kernel, where it says"),
        ]
        .map(|(name, help)| GaugeVec::new(Opts::new(name, help), &["adapter"]).expect("valid metric"));
        register_all(
            &registry,
            vec![
                Box::new(gpu[0].clone()),
                Box::new(gpu[1].clone()),
                Box::new(gpu[2].clone()),
                Box::new(render_seconds.clone()),
                Box::new(pixels.clone()),
                Box::new(cache_hits.clone()),
                Box::new(cache_misses.clone()),
                Box::new(bad_messages.clone()),
                Box::new(redeliveries.clone()),
                Box::new(result_messages.clone()),
                Box::new(results.clone()),
                Box::new(ack_frames.clone()),
                Box::new(assets_handed.clone()),
            ],
        );
        // A series for each known label from the start, so a dashboard shows 0 rather than nothing.
        for outcome in ["put_back", "dead_lettered"] {
            redeliveries.with_label_values(&[outcome]).reset();
        }
        for how in ["inline", "upload"] {
            assets_handed.with_label_values(&[how]).reset();
        }
        Metrics {
            registry,
            render_seconds,
            pixels,
            cache_hits,
            cache_misses,
            bad_messages,
            redeliveries,
            result_messages,
            results,
            ack_frames,
            assets_handed,
            gpu,
        }
    }

    /// The GPU's memory and load as last read.
    pub fn gpu(&self, adapter: &str, u: &crate::gpu_usage::GpuUsage) {
        self.gpu[0].with_label_values(&[adapter]).set(u.memory_total_bytes as f64);
        self.gpu[1].with_label_values(&[adapter]).set(u.memory_used_bytes as f64);
        self.gpu[2].with_label_values(&[adapter]).set(f64::from(u.utilization_percent) / 100.0);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

/// Registers metrics whose names are constants, so a clash is a programming error.
pub fn register_all(registry: &Registry, collectors: Vec<Box<dyn prometheus::core::Collector>>) {
    for c in collectors {
        registry.register(c).expect("metric names are unique");
    }
}

/// A registry's metrics in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    TextEncoder::new().encode_to_string(&registry.gather()).unwrap_or_default()
}
