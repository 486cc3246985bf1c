//! Handing an asset to the scheduler: inside its result message when it is small and its own
//! thumbnail ([`Inline`]), else uploaded (`PUT /v1/assets/{hash}?job=&attempt=`, with its
//! provenance; the scheduler makes the thumbnail itself), trying again while the scheduler is
//! away.

use std::time::Duration;

use kiln_common::client::Client;
use kiln_protocol::RenderRequest;

use super::Daemon;

impl Daemon {
    /// Uploads to the scheduler what of an asset does not travel with its result (`inline`): the
    /// PNG and its provenance, as the render of `attempt` of `job_id` (the scheduler takes a
    /// worker's upload only for an attempt it handed out). Nothing when the store is shared.
    pub(super) async fn upload(
        &self,
        hash: &str,
        inline: &Inline,
        job_id: &str,
        attempt: u32,
    ) -> Result<(), UploadError> {
        let Some(client) = &self.upload else { return Ok(()) };
        let handed = &self.worker.metrics.assets_handed;
        if inline.png.is_some() {
            // Only an image that is its own thumbnail travels; without a readable provenance the
            // scheduler keeps what the result says.
            handed.with_label_values(&["inline"]).inc();
            return Ok(());
        }
        let store = self.worker.store();
        let of = format!("job={}&attempt={attempt}", kiln_protocol::url_component(job_id));
        put_with_retry(client, &format!("/v1/assets/{hash}?{of}"), &store.path(hash)).await?;
        // A cached asset from before provenance was kept has none.
        let provenance = store.provenance_path(hash);
        if inline.provenance.is_none() && provenance.is_file() {
            put_with_retry(client, &format!("/v1/assets/{hash}/provenance?{of}"), &provenance).await?;
        }
        handed.with_label_values(&["upload"]).inc();
        Ok(())
    }
}

/// What of an asset travels inside its result message instead of being uploaded.
#[derive(Debug, Default)]
pub(super) struct Inline {
    /// The PNG, when it is small and its own thumbnail.
    pub(super) png: Option<Vec<u8>>,
    /// The provenance record.
    pub(super) provenance: Option<serde_json::Value>,
}

impl Inline {
    /// Takes what of `r`'s asset goes with its result (in the render's blocking task): its
    /// provenance (from the render, else from the store), and the PNG when it is at most `max`
    /// bytes and an image no larger than a thumbnail (so no thumbnail file goes beside it): the
    /// render held it in memory, or (an asset this worker had already) it is read from the store.
    /// A part that cannot be read is uploaded instead.
    pub(super) fn take(
        store: &crate::assets::AssetStore,
        req: &RenderRequest,
        r: &mut crate::worker::Rendered,
        max: u64,
    ) -> Inline {
        let provenance = r
            .provenance
            .take()
            .map(String::into_bytes)
            .or_else(|| std::fs::read(store.provenance_path(&r.asset)).ok())
            .and_then(|text| serde_json::from_slice(&text).ok());
        let png = r.png.take().or_else(|| {
            let small = r.bytes <= max && crate::render::own_thumbnail(req.width, req.height);
            small.then(|| std::fs::read(&r.path).ok()).flatten().filter(|b| b.len() as u64 == r.bytes)
        });
        Inline { png, provenance }
    }
}

/// Why an upload did not happen.
#[derive(Debug, thiserror::Error)]
pub(super) enum UploadError {
    /// The scheduler refused it (a 4xx): final.
    #[error("{0}")]
    Refused(String),
    /// It could not be done now (the scheduler unreachable or failing, the file unreadable).
    #[error("{0}")]
    Failed(String),
}

/// PUTs a file (streamed from disk), trying again with backoff for up to two minutes (the
/// scheduler may be restarting); a 4xx is final.
pub(super) async fn put_with_retry(client: &Client, path: &str, file: &std::path::Path) -> Result<(), UploadError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut backoff = Duration::from_millis(100);
    loop {
        let err = match client.put_file(path, file).await {
            Ok(r) if r.status.is_success() => return Ok(()),
            Ok(r) if r.status.is_client_error() => {
                let why = String::from_utf8_lossy(&r.body);
                return Err(UploadError::Refused(format!(
                    "the scheduler refused the upload {path}: {} {why}",
                    r.status
                )));
            }
            Ok(r) => r.status.to_string(),
            Err(kiln_common::client::DownloadError::Io(e)) => {
                return Err(UploadError::Failed(format!("reading {}: {e}", file.display())));
            }
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() + backoff > deadline {
            return Err(UploadError::Failed(format!("PUT {path}: {err}")));
        }
        tracing::warn!(path, error = err, retry_in_ms = backoff.as_millis() as u64, "upload failed; trying again");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
