//! The worker as a whole: resolve a request's cache key, answer from the cache or render,
//! store the asset with its provenance, and count it all in the metrics.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use kiln_protocol::{CacheKey, RenderRequest};
use serde::Serialize;

use crate::assets::AssetStore;
use crate::config::{BackendChoice, WorkerConfig};
use crate::engine::EngineError;
use crate::engine::cppn::{MODEL_ID, model_version};
use crate::gpu::Gpu;
use crate::metrics::Metrics;
use crate::post::post_chain_version;
use crate::render::{Backend, Engine, Progress, RenderError, RenderStats, render_to};

/// What can go wrong in the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The render failed.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// The engine could not be set up.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The asset store failed.
    #[error("asset store {path}: {source}")]
    Store {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The model is not one this worker has.
    #[error("model: unknown model {0:?}; this worker has \"cppn\"")]
    UnknownModel(String),
}

impl WorkerError {
    /// Whether another attempt may succeed: I/O and backend trouble may pass; a request the
    /// engine cannot serve will not.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            WorkerError::UnknownModel(_)
                | WorkerError::Engine(EngineError::NoAdapter)
                | WorkerError::Render(crate::render::RenderError::Tile(_))
        )
    }
}

/// The answer to a render request.
#[derive(Debug, Clone, Serialize)]
pub struct Rendered {
    /// BLAKE3 hex of the PNG.
    pub asset: String,
    /// The request's cache key.
    pub key: CacheKey,
    /// Whether it came from the cache (nothing rendered).
    pub cache_hit: bool,
    /// Where the PNG is stored (unless it is held in `png`).
    pub path: PathBuf,
    /// The PNG's size in bytes.
    pub bytes: u64,
    /// Timings, when it rendered.
    pub stats: Option<RenderStats>,
    /// This render's provenance record as JSON text (not on a cache hit). Where the store keeps
    /// provenance files, the first one of an asset is the one kept
    /// ([`AssetStore::provenance_path`]).
    #[serde(skip)]
    pub provenance: Option<String>,
    /// The PNG, held in memory and not stored ([`Worker::render_holding`]); `path` is then where
    /// it would be stored.
    #[serde(skip)]
    pub png: Option<Vec<u8>>,
}

/// A render's provenance record, written once per new asset. Its fields are in the order of
/// their names: the order the JSON map it was once built as wrote them in.
#[derive(Serialize)]
struct Record<'a> {
    asset: String,
    backend: &'a str,
    cache_key: &'a CacheKey,
    created_unix: u64,
    device: &'a str,
    host: &'a str,
    key_input: &'a kiln_protocol::KeyInput,
    kiln_version: &'static str,
    model: ModelRecord,
    post_chain_version: &'a str,
    request: &'a RenderRequest,
    thumbnail: String,
    timings: &'a crate::render::RenderStats,
}

/// The model a [`Record`] names.
#[derive(Serialize)]
struct ModelRecord {
    id: &'static str,
    path: crate::render::ModelPath,
    version: &'static str,
}

#[derive(Clone)]
struct Cached {
    hash: Arc<str>,
}

/// A worker: engine, store, cache and metrics.
pub struct Worker {
    engine: Engine,
    store: AssetStore,
    cache: moka::sync::Cache<CacheKey, Cached>,
    tiers: kiln_protocol::TierLimits,
    /// Whether it keeps its own records beside the assets ([`Worker::records_kept_by_caller`]).
    keeps_records: bool,
    /// The worker's metrics.
    pub metrics: Metrics,
}

/// Opens the backend a config asks for. `auto` takes wgpu when a hardware adapter exists and says
/// which; a software one (lavapipe) is slower than the fused CPU path, so `auto` leaves it alone.
pub fn open_backend(choice: BackendChoice, threads: usize) -> Result<Backend, EngineError> {
    match choice {
        BackendChoice::Cpu => Ok(Backend::Cpu { threads }),
        BackendChoice::Wgpu => Ok(Backend::Wgpu(Arc::new(Gpu::new()?))),
        BackendChoice::Auto => match Gpu::new() {
            Ok(g) if g.is_software() => {
                tracing::info!(
                    adapter = g.adapter_name(),
                    threads,
                    "backend auto: the only adapter is a software one, slower than the cpu path; using the cpu (--backend wgpu forces it)"
                );
                Ok(Backend::Cpu { threads })
            }
            Ok(g) => {
                tracing::info!(adapter = g.adapter_name(), kind = %g.adapter_kind(), "backend auto: using wgpu");
                Ok(Backend::Wgpu(Arc::new(g)))
            }
            Err(e) => {
                tracing::info!(reason = %e, threads, "backend auto: no usable wgpu adapter, using the cpu");
                Ok(Backend::Cpu { threads })
            }
        },
    }
}

/// Renders of fewer samples than this (width × height × samples²) stay out of the store's key
/// index, which lets a request be answered from the cache across restarts. An entry is a file
/// made, written back and looked up: about as much work as rendering a 64×64 image on the CPU
/// (see `docs/benchmarks.md`). Below this size a lost
/// repeat costs less to render again (to the same bytes, stored once) than every render costs to
/// index. The in-memory cache still answers repeats within a process, and the scheduler's own
/// cache answers them in a farm.
pub const KEY_INDEX_MIN_SAMPLES: u64 = 64 * 64;

impl Worker {
    /// A worker over a config's data dir, with a ready engine.
    pub fn new(cfg: &WorkerConfig, backend: Backend) -> Result<Worker, WorkerError> {
        let store = AssetStore::open(&cfg.data_dir)
            .map_err(|source| WorkerError::Store { path: cfg.data_dir.clone(), source })?;
        // Bounded by entries standing for bytes: each entry is a key and a hash (~200 bytes).
        let cache = moka::sync::Cache::builder()
            .weigher(|_k: &CacheKey, v: &Cached| (64 + 32 + v.hash.len()) as u32)
            .max_capacity(cfg.cache_bytes)
            .build();
        Ok(Worker {
            engine: Engine { backend, path: cfg.engine, band_samples: cfg.band_samples },
            store,
            cache,
            tiers: cfg.tiers.clone(),
            keeps_records: true,
            metrics: Metrics::new(),
        })
    }

    /// A worker whose caller keeps its records (the scheduler's farm, in its database): the store
    /// writes no provenance files (each render hands its record back in
    /// [`Rendered::provenance`]) and no key index, and the worker answers no repeats from a cache
    /// of its own (the caller's records answer them). A provenance file was one of the two
    /// files a small render made. Were it to answer a repeat that its caller has no record of
    /// (after a crash between storing an asset and recording it), it would have no provenance
    /// to hand back; rendering again makes the same bytes, stored once, and the record.
    pub fn records_kept_by_caller(mut self) -> Worker {
        self.keeps_records = false;
        self
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The tier limits this worker renders within.
    pub fn tier_limits(&self) -> &kiln_protocol::TierLimits {
        &self.tiers
    }

    /// The asset store.
    pub fn store(&self) -> &AssetStore {
        &self.store
    }

    /// The cache key of a request under this worker's model and post chain.
    pub fn key(&self, req: &RenderRequest) -> CacheKey {
        req.key_input(model_version(), &post_chain_version(req)).key()
    }

    /// The asset for a key, from memory or (when `indexed`) the store's key index, if there is one
    /// and the worker keeps its own records.
    fn cached(&self, key: &CacheKey, indexed: bool) -> Option<String> {
        if !self.keeps_records {
            return None;
        }
        if let Some(c) = self.cache.get(key) {
            if self.store.contains(&c.hash) {
                return Some(c.hash.to_string());
            }
            self.cache.invalidate(key);
        }
        if !indexed {
            return None;
        }
        let hash = self.store.lookup_key(key)?;
        self.cache.insert(*key, Cached { hash: hash.as_str().into() });
        Some(hash)
    }

    /// Answers a request: from the cache if its key has an asset, else by rendering it.
    pub fn render(&self, req: &RenderRequest, progress: &mut dyn FnMut(Progress)) -> Result<Rendered, WorkerError> {
        self.render_holding(req, progress, 0)
    }

    /// [`Self::render`], except that a new PNG of at most `hold` bytes that is its own thumbnail
    /// is not stored but handed back in [`Rendered::png`] with its provenance, for a caller that
    /// sends it on whole (a worker daemon puts it inside its result message) or stores it where
    /// waiting for the store holds no thread ([`AssetStore::put`]). `hold` is at most
    /// [`SPILL_BYTES`](crate::assets::SPILL_BYTES); 0 stores every asset.
    pub fn render_holding(
        &self,
        req: &RenderRequest,
        progress: &mut dyn FnMut(Progress),
        hold: u64,
    ) -> Result<Rendered, WorkerError> {
        if req.model != MODEL_ID {
            return Err(WorkerError::UnknownModel(req.model.clone()));
        }
        let key_input = req.key_input(model_version(), &post_chain_version(req));
        let key = key_input.key();
        let indexed = self.keeps_records && req.sample_count() >= KEY_INDEX_MIN_SAMPLES;
        if let Some(asset) = self.cached(&key, indexed) {
            self.metrics.cache_hits.inc();
            tracing::debug!(%key, asset, "cache hit");
            let path = self.store.path(&asset);
            let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
            return Ok(Rendered { path, bytes, asset, key, cache_hit: true, stats: None, provenance: None, png: None });
        }
        self.metrics.cache_misses.inc();
        let store_err = |source| WorkerError::Store { path: self.store.root().to_path_buf(), source };
        let started = Instant::now();
        let mut pending = self.store.begin().map_err(store_err)?;
        let (thumb, stats) = render_to(&self.engine, req, &mut pending, progress)?;
        let backend = self.engine.backend.name();
        let device = self.engine.backend.device_name();
        let host = std::env::var("HOSTNAME").unwrap_or_default();
        let record = |hash: &str| Record {
            asset: hash.to_owned(),
            backend,
            cache_key: &key,
            created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            device: &device,
            host: &host,
            key_input: &key_input,
            kiln_version: env!("CARGO_PKG_VERSION"),
            model: ModelRecord { id: MODEL_ID, path: self.engine.path, version: model_version() },
            post_chain_version: &key_input.post_chain_version,
            request: req,
            // An image no larger than a thumbnail is its own.
            thumbnail: thumb.as_ref().map_or_else(|| hash.to_owned(), |t| blake3::hash(t).to_hex().to_string()),
            timings: &stats,
        };
        // A record of strings and numbers always serializes; were it not to, the asset goes
        // without one, as a render whose provenance is lost would.
        let json = |r: &Record| serde_json::to_string(r).ok();
        let held = if thumb.is_none() { pending.take_held(hold) } else { None };
        let (asset, bytes, png, provenance) = match held {
            Some((asset, png)) => {
                let provenance = json(&record(&asset));
                (asset, png.len() as u64, Some(png), provenance)
            }
            None => {
                let hash = pending.hash();
                let r = record(&hash);
                let provenance = json(&r);
                let file = self.keeps_records.then(|| serde_json::to_string_pretty(&r).unwrap_or_default());
                let (asset, bytes) = self
                    .store
                    .commit(pending, thumb.as_deref(), file.as_deref().map(str::as_bytes))
                    .map_err(store_err)?;
                if indexed {
                    self.store.put_key(&key, &asset).map_err(store_err)?;
                }
                if self.keeps_records {
                    self.cache.insert(key, Cached { hash: asset.as_str().into() });
                }
                (asset, bytes, None, provenance)
            }
        };
        let tier = req.tier.as_str();
        self.metrics
            .render_seconds
            .with_label_values(&[tier, MODEL_ID, backend])
            .observe(started.elapsed().as_secs_f64());
        self.metrics.pixels.with_label_values(&[tier]).inc_by(u64::from(req.width) * u64::from(req.out_rows()));
        // Per job at debug (`KILN_LOG=kiln_worker=debug`): at info, a line per job floods a busy
        // farm's log and cost a tenth of its throughput; failures are logged where they happen.
        tracing::debug!(%key, asset, tier, backend, seconds = stats.total_seconds, "rendered");
        Ok(Rendered {
            path: self.store.path(&asset),
            bytes,
            asset,
            key,
            cache_hit: false,
            stats: Some(stats),
            provenance,
            png,
        })
    }
}
