//! One image across the farm. A job that `[scheduler.tiles]` cuts up (a print, or any job over a
//! size) is not sent to a worker: the dispatcher hands it here ([`Scheduler::run_tiled`]), which
//! submits each tile as a job of its own (a [`kiln_protocol::Tile`] of the request, with its own
//! cache key), so the tiles go to whichever workers serve the tier, each retried, handed on from
//! a lost worker and quarantined as any job is, and each answered from the cache when it was
//! rendered before. When the last one ends, the tiles' rows are stitched in order into the one
//! PNG ([`kiln_worker::render::stitch`]), byte for byte the whole render's on the same backend,
//! and the job ends with it under its own cache key, its provenance listing the tiles and their
//! workers. A tile that fails for good (out of attempts, quarantined, cancelled) fails the job
//! with its reason; the tiles not started yet are cancelled with it. Cancelling the job cancels
//! the tiles not started; the ones rendering finish and stay cached for the next try.
//!
//! Nothing is held across a crash: the job was `running`, so the next start queues it again,
//! and its tiles are submitted again: each is answered from the cache, or attached to its own
//! earlier tile job (queued again too), so nothing done is rendered again.

use std::io::{BufReader, Cursor, Read, Seek, SeekFrom};
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use kiln_protocol::{JobState, Tile, now_ms};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::results::Settled;
use crate::scheduler::{Live, Scheduler};
use crate::store::{Dispatch, Job, NewJob, Outcome};

/// A tile's PNG: a file in the asset store, or (a small one) kept with the asset's row.
enum Source {
    File(std::fs::File),
    Held(Cursor<Vec<u8>>),
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::File(f) => f.read(buf),
            Source::Held(c) => c.read(buf),
        }
    }
}

impl Seek for Source {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        match self {
            Source::File(f) => f.seek(pos),
            Source::Held(c) => c.seek(pos),
        }
    }
}

/// A stitch under way ([`Scheduler::begin_stitch`]): where its tiles go, and its thread.
struct Stitching {
    tx: std::sync::mpsc::Sender<(Tile, BufReader<Source>)>,
    task: tokio::task::JoinHandle<Result<Stitched, String>>,
}

/// A stitched image, stored.
struct Stitched {
    asset: String,
    bytes: u64,
    thumb: Option<String>,
    stats: kiln_worker::render::StitchStats,
    store_seconds: f64,
}

/// A tile, as the stitch and the provenance need it.
struct Done {
    tile: Tile,
    job: Job,
}

impl Scheduler {
    /// Whether a request is cut into tiles rather than sent to one worker.
    pub fn is_tiled(&self, req: &kiln_protocol::RenderRequest) -> bool {
        !self.cfg.tiles.tiles(req).is_empty()
    }

    /// Runs attempt `d` of a job cut into tiles on a task of its own, until it ends or `stop`.
    pub(crate) fn spawn_tiled(&self, d: Dispatch, stop: &CancellationToken) {
        let Some(sched) = self.shared() else { return };
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = sched.run_tiled(d) => {}
            }
        });
    }

    /// Runs attempt `d` of a job cut into tiles: starts it, submits its tiles, follows them to
    /// their ends (telling listeners the tiles done), and records the job's end: the stitched
    /// image, or why a tile failed.
    #[tracing::instrument(level = "debug", skip_all, fields(job_id = %d.job_id, attempt = d.attempt))]
    pub async fn run_tiled(self: Arc<Self>, d: Dispatch) {
        let started_ms = now_ms();
        match self.store.start(&d, started_ms).await {
            Ok(Some(e)) => self.publish(vec![e]),
            // Cancelled, or this attempt is not the job's any more.
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, "tiles: cannot mark the job running; the next start runs it");
                return;
            }
        }
        let tiles = self.cfg.tiles.tiles(&d.request);
        let n = tiles.len() as u32;
        tracing::info!(job_id = d.job_id, tiles = n, "cutting a job into tiles");
        let mut jobs = Vec::with_capacity(tiles.len());
        for t in &tiles {
            let request = d.request.tile(*t);
            let new = NewJob {
                id: self.new_id(),
                cache_key: self.worker.key(&request).to_string(),
                request,
                client: d.client.clone(),
                idempotency_key: None,
                now_ms: now_ms(),
            };
            match self.admit(new).await {
                Ok((job, _)) => jobs.push(job),
                Err(e) => {
                    self.cancel_unstarted(&jobs, &d.job_id).await;
                    let why = format!("cannot submit tile at rows {}..{}: {e}", t.y0, t.y0 + t.rows);
                    self.settle_undelivered(&d, why, true).await;
                    return;
                }
            }
        }
        let mut open: FuturesUnordered<_> = jobs
            .iter()
            .zip(&tiles)
            .enumerate()
            .map(|(i, (j, t))| {
                let (sched, id, t) = (self.clone(), j.id.clone(), *t);
                async move { (i, t, sched.until_ended(&id).await) }
            })
            .collect();
        let parent = self.until_ended(&d.job_id);
        tokio::pin!(parent);
        // The stitch runs as the tiles arrive: each is handed over once those before it are.
        let mut stitching = Some(self.begin_stitch(&d.request));
        let mut done: Vec<Option<Done>> = (0..tiles.len()).map(|_| None).collect();
        let (mut finished, mut rows_done, mut handed) = (0u32, 0u32, 0usize);
        while finished < n {
            let (i, tile, job) = tokio::select! {
                Some(ended) = open.next() => ended,
                ended = &mut parent => {
                    // Only a cancel ends the job while its tiles run.
                    let state = ended.map_or_else(|| "gone".to_owned(), |j| j.state.to_string());
                    tracing::info!(job_id = d.job_id, state, "the job ended; cancelling its tiles not yet started");
                    self.cancel_unstarted(&jobs, &d.job_id).await;
                    return;
                }
            };
            let rows = format!("rows {}..{}", tile.y0, tile.y0 + tile.rows);
            let failed = match job {
                Some(j) if matches!(j.state, JobState::Succeeded | JobState::Cached) && j.asset.is_some() => {
                    finished += 1;
                    rows_done += tile.rows;
                    self.tell(Live::Progress {
                        job_id: d.job_id.clone(),
                        rows_done,
                        rows: d.request.height,
                        tiles: Some((finished, n)),
                    });
                    done[i] = Some(Done { tile, job: j });
                    while let Some(Some(next)) = done.get(handed) {
                        if let Some(s) = &stitching
                            && let Err(why) = self.hand_over(s, next).await
                        {
                            tracing::warn!(job_id = d.job_id, why, "tiles: cannot read a tile; stitching stops");
                            stitching = None;
                        }
                        handed += 1;
                    }
                    continue;
                }
                Some(j) => {
                    let why = j.error.clone().unwrap_or_else(|| j.state.to_string());
                    let quarantined = why.starts_with("quarantined");
                    (format!("tile {}/{n} ({rows}, job {}) {}: {why}", i + 1, j.id, j.state), quarantined)
                }
                None => (format!("tile {}/{n} ({rows}): its job is gone", i + 1), false),
            };
            // The stitch, short of tiles, ends with an error nobody reads; its file is let go.
            drop(stitching);
            self.cancel_unstarted(&jobs, &d.job_id).await;
            let (error, quarantined) = failed;
            let outcome = if quarantined { Outcome::Quarantined { error } } else { Outcome::Failed { error } };
            self.record_outcome(&d, started_ms, outcome).await;
            return;
        }
        let done: Vec<Done> = done.into_iter().flatten().collect();
        let outcome = match stitching {
            Some(s) => self.finish_stitch(&d, s, &done, started_ms).await,
            None => Err("a tile's PNG could not be read".to_owned()),
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(why) => {
                tracing::error!(job_id = d.job_id, why, "tiles: cannot stitch");
                // The tiles stay cached: another attempt only stitches again.
                self.settle_undelivered(&d, format!("cannot stitch the tiles: {why}"), true).await;
                return;
            }
        };
        if self.record_outcome(&d, started_ms, outcome).await != Settled::Recorded {
            tracing::error!(
                job_id = d.job_id,
                "tiles: cannot record the stitched image; the next start stitches again"
            );
        }
    }

    /// Cancels the tiles in `jobs` not yet started (queued or dispatched) for the end of `job_id`.
    async fn cancel_unstarted(&self, jobs: &[Job], job_id: &str) {
        let by = format!("the end of job {job_id}, of which it is a tile");
        // The tiles as they are now, in one read.
        let now = match self.store.jobs(jobs.iter().map(|j| j.id.clone()).collect()).await {
            Ok(now) => now,
            Err(e) => return tracing::warn!(job_id, error = %e, "tiles: cannot read the tiles to cancel them"),
        };
        for j in now.iter().filter(|j| matches!(j.state, JobState::Queued | JobState::Dispatched)) {
            if let Err(e) = self.cancel_by(&j.id, &by).await {
                tracing::warn!(job_id = j.id, error = %e, "tiles: cannot cancel a tile");
            }
        }
    }

    /// Starts the stitch of `req`'s image on a blocking thread: it writes each tile's rows as
    /// [`Self::hand_over`] hands the tile over, in order, and stores the image once the last has
    /// come (a stitch whose sender is dropped early ends with an error, and stores nothing).
    fn begin_stitch(&self, req: &kiln_protocol::RenderRequest) -> Stitching {
        let (tx, rx) = std::sync::mpsc::channel::<(Tile, BufReader<Source>)>();
        let worker = self.worker.clone();
        let (w, h) = (req.width, req.height);
        let task = tokio::task::spawn_blocking(move || {
            let store = worker.store();
            let mut pending = store.begin().map_err(|e| e.to_string())?;
            let (thumb, stats) = kiln_worker::render::stitch(w, h, rx, &mut pending)?;
            let t = std::time::Instant::now();
            let (asset, bytes) = store.commit(pending, thumb.as_deref(), None).map_err(|e| e.to_string())?;
            let thumb = thumb.map(|t| blake3::hash(&t).to_hex().to_string());
            Ok(Stitched { asset, bytes, thumb, stats, store_seconds: t.elapsed().as_secs_f64() })
        });
        Stitching { tx, task }
    }

    /// Hands tile `t`'s PNG to the stitch.
    async fn hand_over(&self, s: &Stitching, t: &Done) -> Result<(), String> {
        let asset = t.job.asset.clone().unwrap_or_default();
        let path = self.worker.store().path(&asset);
        let source = match std::fs::File::open(&path) {
            Ok(f) => Source::File(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match self.store.asset_png(&asset).await {
                Ok(Some(png)) => Source::Held(Cursor::new(png)),
                Ok(None) => return Err(format!("tile job {}: its asset {asset} is not here", t.job.id)),
                Err(e) => return Err(e.to_string()),
            },
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        // A stitch that stopped early says why when it is awaited.
        let _ = s.tx.send((t.tile, BufReader::new(source)));
        Ok(())
    }

    /// Waits for the stitch of the tiles `done` to store the image: the outcome to record,
    /// with the provenance (the tiles and their workers, the stitch's cost).
    async fn finish_stitch(
        &self,
        d: &Dispatch,
        s: Stitching,
        done: &[Done],
        started_ms: i64,
    ) -> Result<Outcome, String> {
        let Stitching { tx, task } = s;
        drop(tx);
        let last_tile = std::time::Instant::now();
        let Stitched { asset, bytes, thumb, stats, store_seconds } = task.await.map_err(|e| e.to_string())??;
        let tail = last_tile.elapsed().as_secs_f64();
        let mut listed = Vec::with_capacity(done.len());
        let (mut backends, mut devices, mut model) = (Vec::<String>::new(), Vec::<String>::new(), Value::Null);
        for t in done {
            let asset = t.job.asset.clone().unwrap_or_default();
            let record: Value = match self.asset_provenance(&asset).await {
                Ok(Some(json)) => serde_json::from_slice(&json).unwrap_or(Value::Null),
                _ => Value::Null,
            };
            let field = |k: &str| record.get(k).and_then(Value::as_str).map(str::to_owned);
            for (list, v) in [(&mut backends, field("backend")), (&mut devices, field("device"))] {
                if let Some(v) = v
                    && !list.contains(&v)
                {
                    list.push(v);
                }
            }
            if model.is_null() {
                model = record.get("model").cloned().unwrap_or(Value::Null);
            }
            // A tile attached to another job's render was rendered under that job's id.
            let rendered_by = t.job.follows.as_deref().unwrap_or(&t.job.id);
            listed.push(json!({
                "tile": t.tile,
                "job": t.job.id,
                "state": t.job.state,
                "asset": asset,
                "cache_key": t.job.cache_key,
                "worker": self.tile_workers.of(rendered_by),
                "host": field("host"),
                "backend": field("backend"),
                "device": field("device"),
                "seconds": record.get("timings").and_then(|t| t.get("total_seconds")).cloned(),
            }));
        }
        let key_input = d
            .request
            .key_input(kiln_worker::engine::cppn::model_version(), &kiln_worker::post::post_chain_version(&d.request));
        let busy = stats.decode_seconds + stats.encode_seconds + store_seconds;
        let record = json!({
            "asset": asset,
            "backend": backends.join("+"),
            "cache_key": d.cache_key,
            "created_unix": now_ms() / 1000,
            "device": devices.join(" + "),
            "host": kiln_common::host_name(),
            "key_input": key_input,
            "kiln_version": env!("CARGO_PKG_VERSION"),
            "model": model,
            "post_chain_version": key_input.post_chain_version,
            "request": d.request,
            "stitch": {
                "seconds": busy,
                "after_last_tile_seconds": tail,
                "decode_seconds": stats.decode_seconds,
                "encode_seconds": stats.encode_seconds,
                "store_seconds": store_seconds,
            },
            "thumbnail": thumb.unwrap_or_else(|| asset.clone()),
            "tiles": listed,
            "timings": { "total_seconds": (now_ms() - started_ms) as f64 / 1000.0 },
        });
        tracing::info!(job_id = d.job_id, asset, tiles = done.len(), busy, tail, "stitched the tiles");
        // The tiles were charged as they rendered; the stitch is the scheduler's own work.
        Ok(Outcome::Succeeded { asset, bytes, provenance: Some(record.to_string()), png: None, cost: None })
    }
}
