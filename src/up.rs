//! `kiln up`: the whole farm in this process, with an embedded MQTT broker and the simulated
//! studio ([`crate::studio`]) unless the config names a broker of its own or `--no-devices`.

use std::collections::HashMap;

use clap::Args;
use kiln_protocol::Secret;
use kiln_protocol::fleet::MqttEndpoint;
use kiln_scheduler::config::FarmConfig;
use kiln_scheduler::farm::{Farm, ServeArgs, open_farm_backend, serve};

use crate::studio::{AGENT_USER, BRIDGE_USER, Studio, broker_password, start_broker};

/// Where `kiln up`'s embedded MQTT broker listens unless `--mqtt-listen` says otherwise (not 1883,
/// which a Mosquitto on the same machine would hold).
pub const DEFAULT_MQTT_LISTEN: &str = "127.0.0.1:7883";

/// `kiln up`'s arguments.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the API listens, the workers, the backend.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Where the embedded MQTT broker listens, for outside MQTT clients to watch the studio
    /// (unused when scheduler.fleet.mqtt_url / KILN_MQTT_URL names a broker of your own).
    #[arg(long, env = "KILN_MQTT_LISTEN", default_value = DEFAULT_MQTT_LISTEN)]
    pub mqtt_listen: std::net::SocketAddr,
    /// No simulated devices (a real fleet talks to this farm).
    #[arg(long)]
    pub no_devices: bool,
    /// Where the simulated studio's agent serves its own `/metrics` and `/healthz`, as a
    /// kiln-edge on a Pi does with `metrics_listen` (off unless given).
    #[arg(long, env = "KILN_STUDIO_METRICS_LISTEN")]
    pub studio_metrics_listen: Option<std::net::SocketAddr>,
}

/// Runs the farm until SIGINT or SIGTERM, then drains and stops.
pub async fn up(mut cfg: FarmConfig, args: &UpArgs) -> anyhow::Result<()> {
    let (backend, device) = open_farm_backend(&cfg)?;
    // The studio's agent logs in to the embedded broker as itself; to a broker of the operator's
    // own, with the bridge's login from scheduler.fleet.mqtt_url.
    let (embedded, agent_mqtt) = match &cfg.scheduler.fleet.mqtt_url {
        Some(url) => (false, MqttEndpoint::parse(url.expose()).map_err(anyhow::Error::msg)?),
        None => {
            let data = cfg.data_dir();
            let bridge = broker_password(data, BRIDGE_USER)?;
            let agent = broker_password(data, AGENT_USER)?;
            let logins =
                HashMap::from([(BRIDGE_USER.to_owned(), bridge.clone()), (AGENT_USER.to_owned(), agent.clone())]);
            let addr = start_broker(args.mqtt_listen, logins)?;
            cfg.scheduler.fleet.mqtt_url = Some(format!("mqtt://{BRIDGE_USER}:{bridge}@{addr}").into());
            let login = Some((AGENT_USER.to_owned(), Secret::new(agent)));
            (true, MqttEndpoint { host: addr.ip().to_string(), port: addr.port(), login, tls: false })
        }
    };
    let farm = Farm::build(&cfg, backend).await?;
    let url = farm.url()?;
    let studio = match args.no_devices {
        false => {
            let metrics = args.studio_metrics_listen;
            Some(Studio::start(farm.scheduler(), cfg.data_dir(), &agent_mqtt, &url, metrics).await?)
        }
        true => None,
    };
    let mut extra = Vec::new();
    if embedded {
        let logins = cfg.data_dir().join("mqtt");
        let at = format!("{}:{}", agent_mqtt.host, agent_mqtt.port);
        extra.push(format!("  mqtt     mqtt://{at} (embedded broker; logins in {})", logins.display()));
    } else if let Some(mqtt) = &cfg.scheduler.fleet.mqtt_url {
        extra.push(format!("  mqtt     {mqtt}"));
    }
    if let Some(s) = &studio {
        let gallery = s.gallery.display();
        extra.push(format!("  studio   printer, lights, camera, display (simulated); the display shows {gallery}"));
        if let Some(addr) = args.studio_metrics_listen {
            extra.push(format!("  agent    http://{addr}/metrics (the studio agent's own)"));
        }
    }
    extra.push("Try: kiln submit \"ember kaleidoscope\" --wait --out art.png      Ctrl-C drains and stops.".into());
    extra.push("     kiln devices;  kiln task printer print --asset HASH --wait".into());
    let served = serve(farm, &cfg, "kiln up", &device, &extra).await;
    if let Some(s) = studio {
        s.stop().await;
    }
    served?;
    println!("kiln up: stopped");
    Ok(())
}
