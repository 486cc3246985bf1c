//! `kiln-edge`: the agent binary for a Pi. See the library's docs.

use std::path::PathBuf;

use clap::Parser;
use kiln_edge::config::Config;
use tokio_util::sync::CancellationToken;

/// kiln-edge: drives the devices in its config (printer, lights, camera, display) for a Kiln
/// scheduler, over MQTT (status, telemetry, tasks) and Modbus. Spool, journal and fetched assets
/// live in the config's data_dir.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The TOML config listing the devices (see the README's fleet section).
    #[arg(long, short, env = "KILN_EDGE_CONFIG", default_value = "/etc/kiln/edge.toml")]
    config: PathBuf,
    /// Print the config as it will be used (file and environment) and exit.
    #[arg(long)]
    print_config: bool,
    /// Log filter, such as `info` or `kiln_edge=debug`.
    #[arg(long, env = "KILN_LOG", default_value = "info")]
    log: String,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let cfg = match Config::load(&cli.config, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kiln-edge: bad config: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if cli.print_config {
        let mut shown = cfg.clone();
        shown.scheduler.token = "(set)".into();
        shown.mqtt.url = kiln_protocol::SecretUrl::from(shown.mqtt.url.as_str()).to_string();
        if shown.mqtt.password.is_some() {
            shown.mqtt.password = Some("(set)".into());
        }
        print!("{}", toml::to_string(&shown).unwrap_or_default());
        return std::process::ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln-edge: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let stop = CancellationToken::new();
        let on_signal = stop.clone();
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let term = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = term => {}
            }
            tracing::info!("stopping: saying goodbye to the broker");
            on_signal.cancel();
        });
        kiln_edge::run(cfg, stop).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-edge: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
