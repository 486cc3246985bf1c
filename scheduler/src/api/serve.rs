//! The API's HTTP/1.1 server: axum's router on hyper's connection builder, with what
//! `axum::serve` does not give: a header-read timeout (a client that holds a connection open
//! without finishing its request head is cut off, kept-alive idle ones too) and a cap on the
//! connections served at once (past it, new ones wait in the kernel's backlog, costing nothing
//! here), and TLS when the farm has a certificate (the handshake, too, within the header-read
//! timeout). On `stop` it takes no new connections and lets each open one finish its request.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Limits;

/// Serves `app` on `listener` (over TLS with `tls`) until `stop`, then until its open
/// connections end.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: CancellationToken,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let header_timeout = Duration::from_secs(limits.header_read_timeout_seconds);
    let connections = TaskTracker::new();
    let mut full_said = false;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !full_said {
                    tracing::warn!(
                        max = limits.max_connections,
                        "HTTP connections at scheduler.limits.max_connections; new ones wait"
                    );
                    full_said = true;
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                }
            }
        };
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: wait a little rather than spin.
                tracing::warn!(error = %e, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if permits.available_permits() > 0 {
            full_said = false;
        }
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            let _permit = permit;
            match acceptor {
                None => connection(TokioIo::new(stream), service, header_timeout, stop).await,
                Some(acceptor) => match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => connection(TokioIo::new(tls), service, header_timeout, stop).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "a TLS handshake failed"),
                    Err(_) => tracing::debug!("a TLS handshake did not finish in time"),
                },
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// Serves one connection until it ends, or (on `stop`) until its request in hand is answered.
async fn connection<I>(io: I, service: TowerToHyperService<Router>, header_timeout: Duration, stop: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "an HTTP connection ended with an error");
            }
        }
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
