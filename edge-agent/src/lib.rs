//! kiln-edge: the agent on a Raspberry Pi beside a printer, a camera, a light rig or a gallery
//! display. It reports each device's health over MQTT (retained status with a last will,
//! telemetry), reads its device over Modbus, and carries out the scheduler's tasks: print an
//! asset, take a photo, show an asset, set the lights.
//!
//! Nothing is lost and nothing is done twice: telemetry and task reports go through an on-disk
//! spool ([`spool`]) that survives broker outages and reboots, and a journal of task ids
//! ([`journal`]) turns a redelivered task into a repeat of its report. See DESIGN.md, "Edge fleet",
//! for the topics, and [`session`] for how a device's session runs.

pub mod config;
pub mod drivers;
pub mod http;
pub mod journal;
pub mod metrics;
pub mod modbus;
pub mod session;
#[cfg(feature = "sim")]
pub mod sim;
pub mod spool;
pub mod tls;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::drivers::Driver;
use crate::modbus::Buses;

/// [`run`] on a task of its own, as `kiln up`'s studio runs an agent: the agent's future is
/// polled here, so its body is compiled in this crate once and not again in the caller's.
pub fn spawn(cfg: Config, stop: CancellationToken) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(run(cfg, stop))
}

/// Runs every configured device until `stop`; then each says goodbye (offline) and stops.
pub async fn run(cfg: Config, stop: CancellationToken) -> anyhow::Result<()> {
    // Fetches a crash cut short.
    if let Ok(entries) = std::fs::read_dir(cfg.data_dir.join("assets")) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "part") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let tls = tls::client_config(cfg.tls_ca_file.as_deref())?;
    let metrics = Arc::new(metrics::Metrics::default());
    if let Some(addr) = cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("metrics_listen: cannot listen on {addr}: {e}"))?;
        tracing::info!(addr = %listener.local_addr()?, "serving /metrics and /healthz");
        tokio::spawn(metrics::serve(metrics.clone(), listener, stop.clone()));
    }
    let cfg = Arc::new(cfg);
    let mut buses = Buses::default();
    let mut devices = Vec::new();
    for dev in &cfg.devices {
        let state_dir = cfg.data_dir.join("devices").join(&dev.id);
        std::fs::create_dir_all(&state_dir)?;
        let driver = Driver::new(dev, &mut buses, &state_dir);
        let name = dev.id.clone();
        let figures = metrics.device(&dev.id, dev.kind);
        let run = session::run_device(cfg.clone(), dev.clone(), driver, tls.clone(), figures, stop.clone());
        devices.push((name, tokio::spawn(run)));
    }
    let broker = kiln_protocol::SecretUrl::from(cfg.mqtt.url.as_str()).to_string();
    tracing::info!(devices = devices.len(), broker, "kiln-edge running");
    let mut first_error = None;
    for (name, handle) in devices {
        match handle.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(device = name, error = %format!("{e:#}"), "the device stopped");
                first_error.get_or_insert(e.context(format!("device {name}")));
            }
            Err(e) => {
                first_error.get_or_insert(anyhow::anyhow!("device {name}: {e}"));
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}
