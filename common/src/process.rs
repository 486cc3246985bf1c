//! A binary's life around its command: the options every binary takes, logging, the error
//! printed once, and the signal that stops it.

use std::path::PathBuf;

use clap::Args;

/// Options every Kiln binary takes, on any subcommand.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// TOML config file (defaults < file < KILN_* environment).
    #[arg(long, global = true, env = "KILN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory: database, assets, cache index, operator token [default: ~/.local/share/kiln; env KILN_DATA_DIR].
    #[arg(long, global = true, visible_alias = "data")]
    pub data_dir: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long, global = true)]
    pub print_config: bool,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    pub log_json: bool,
    /// PEM CA certificates to trust besides the system's, for an https:// farm, amqps:// and
    /// mqtts:// whose certificates the farm's own CA signed.
    #[arg(long, global = true, env = "KILN_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
}

/// Mesa's Vulkan device-select layer looks for a display when Vulkan starts; with no
/// `XDG_RUNTIME_DIR` (a service, ssh, CI) libwayland prints "error: XDG_RUNTIME_DIR is invalid
/// or not set in the environment." twice, on every start of a headless box with Mesa's Vulkan
/// drivers. The layer only reorders adapters for a desktop's display; wgpu picks its own. So
/// where there is no display session it is turned off (`NODEVICE_SELECT=1`), unless the
/// environment already says.
fn quiet_headless_vulkan() {
    let session =
        ["XDG_RUNTIME_DIR", "WAYLAND_DISPLAY", "WAYLAND_SOCKET"].iter().any(|v| std::env::var_os(v).is_some());
    if !session && std::env::var_os("NODEVICE_SELECT").is_none() {
        // SAFETY: only `run_main` calls this, first thing in a binary's `main`, before any
        // thread is started (the async runtime is built later, inside `run`).
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("NODEVICE_SELECT", "1")
        };
    }
}

/// The whole of a binary's `main` after parsing: logging (`KILN_LOG` filter, JSON on request),
/// the command, and its error printed once with its whole chain, as an exit code. Call it
/// first thing in `main`, before any thread is started.
pub fn run_main(global: &GlobalArgs, run: impl FnOnce() -> anyhow::Result<()>) -> std::process::ExitCode {
    quiet_headless_vulkan();
    // `kiln up`'s embedded MQTT broker (rumqttd 0.20) logs an error for every connection that
    // ends, even a client's clean DISCONNECT ("router-drop", "no-connection id N is already
    // gone"), so each clean stop ended in a column of errors. Its connections' own messages
    // are left out: the fleet shows each device's state, the agents log their own links, and
    // `KILN_LOG=info,rumqttd=info` brings them back.
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| {
        "info,wgpu=warn,naga=warn,cubecl=warn,sqlx=warn,rumqttd=warn,rumqttd::server::broker=off,rumqttd::router::routing=off".into()
    });
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if global.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    if let Some(ca) = &global.tls_ca_file
        && let Err(e) = crate::tls::trust_ca_file(ca)
    {
        eprintln!("error: --tls-ca-file (KILN_TLS_CA_FILE): {e}");
        return std::process::ExitCode::FAILURE;
    }
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A multi-threaded async runtime, as every binary's command runs on.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("failed to start the async runtime")
}

/// A token cancelled on SIGINT (Ctrl-C) or SIGTERM, watched by a task on the current runtime:
/// what a binary drains on.
pub fn cancel_on_signal() -> tokio_util::sync::CancellationToken {
    let stop = tokio_util::sync::CancellationToken::new();
    let signalled = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("signal received: draining");
        signalled.cancel();
    });
    stop
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// The machine's host name.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
