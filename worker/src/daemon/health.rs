//! The daemon's own `/metrics` and `/healthz` (`run.metrics_listen`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Daemon;

impl Daemon {
    /// Serves `/metrics` (the worker's Prometheus metrics) and `/healthz` (200 while connected
    /// to the broker and taking work; 503 with the reason otherwise) until `stop`.
    pub(super) async fn serve_http(self: Arc<Self>, listener: tokio::net::TcpListener, stop: CancellationToken) {
        loop {
            let stream = tokio::select! {
                () = stop.cancelled() => return,
                s = listener.accept() => match s {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let me = self.clone();
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let me = me.clone();
                async move { Ok::<_, std::convert::Infallible>(me.http_answer(req.uri().path())) }
            });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    }

    pub(super) fn http_answer(&self, path: &str) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
        let (status, kind, body) = match path {
            "/metrics" => {
                // The GPU's memory and load as of this scrape, where its driver says.
                let engine = self.worker.engine();
                if let Some(u) = engine.backend.usage() {
                    self.worker.metrics.gpu(&engine.backend.device_name(), &u);
                }
                (200, "text/plain; version=0.0.4", self.worker.metrics.encode())
            }
            "/healthz" => {
                let drained = self.drained_reason();
                let (ok, status) = if !self.connected.load(Ordering::Relaxed) {
                    (false, "not connected to the broker")
                } else if drained.is_some() {
                    (false, "drained by the scheduler")
                } else if self.draining.load(Ordering::Relaxed) {
                    (false, "draining")
                } else {
                    (true, "ok")
                };
                let body = serde_json::json!({
                    "status": status,
                    "worker_id": self.id,
                    "in_flight": self.in_flight.load(Ordering::Relaxed),
                    "drained": drained,
                });
                (if ok { 200 } else { 503 }, "application/json", body.to_string())
            }
            _ => (404, "text/plain", "not found: try /metrics or /healthz\n".to_owned()),
        };
        hyper::Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, kind)
            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
            .unwrap_or_default()
    }
}
