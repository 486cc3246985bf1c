//! `kiln up`'s studio: an MQTT broker embedded in the process (rumqttd), and simulated devices
//! driven by a real kiln-edge agent over it. The printer and the light rig are real Modbus TCP
//! servers on loopback ([`kiln_edge::sim`]); the camera photographs the printer's output tray (it
//! copies the latest print); the display shows assets in a folder, `DATA/studio/gallery`.
//!
//! rumqttd 0.20's `Broker::start` blocks and has no clean shutdown: it runs on a thread of its own
//! and ends with the process.
//!
//! The broker asks every client for a login: one for the scheduler's bridge and one for the
//! studio's agent, each a random password kept in `DATA/mqtt/USER.password` (mode 0600) and
//! made on the first start. rumqttd checks logins but has no per-topic ACLs, so any holder of a
//! login may publish anywhere under the prefix; tasks are signed, so none of them can make a
//! device act (README, "Trust").

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use kiln_edge::config::{Config as EdgeConfig, DeviceConfig, LightsMap, ModbusConfig, MqttConfig, Parity, PrinterMap};
use kiln_edge::sim::{PrinterSetup, SimDevice};
use kiln_protocol::fleet::{DeviceKind, MqttEndpoint};
use tokio_util::sync::CancellationToken;

use kiln_scheduler::auth::Role;
use kiln_scheduler::scheduler::Scheduler;

/// The embedded broker's users: the bridge's and the studio agent's.
pub const BRIDGE_USER: &str = "kiln-scheduler";
/// The studio agent's MQTT user.
pub const AGENT_USER: &str = "studio-agent";

/// The password of `user` on the embedded broker, kept in `DATA/mqtt/USER.password` (mode 0600)
/// and made there if missing.
pub fn broker_password(data: &Path, user: &str) -> anyhow::Result<String> {
    let dir = data.join("mqtt");
    let path = dir.join(format!("{user}.password"));
    if let Ok(p) = std::fs::read_to_string(&path)
        && !p.trim().is_empty()
    {
        return Ok(p.trim().to_owned());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let password = kiln_scheduler::auth::random_hex().context("no random source for an MQTT password")?;
    kiln_scheduler::farm::write_private(&path, &password)
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(password)
}

/// Starts the embedded broker on `listen` (port 0 picks one), taking only the given logins (user,
/// password); the address it listens on.
pub fn start_broker(listen: SocketAddr, logins: HashMap<String, String>) -> anyhow::Result<SocketAddr> {
    // rumqttd binds on its own thread and reports a taken port only in its log: bind here first,
    // so a taken port is an error that names the flag, and port 0 becomes a real port.
    let probe = std::net::TcpListener::bind(listen)
        .with_context(|| format!("the embedded MQTT broker cannot listen on {listen} (kiln up --mqtt-listen)"))?;
    let addr = probe.local_addr()?;
    drop(probe);
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 256 * 1024,
        max_inflight_count: 100,
        auth: Some(logins),
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let router = rumqttd::RouterConfig {
        max_connections: 10_010,
        max_outgoing_packet_count: 200,
        max_segment_size: 16 * 1024 * 1024,
        max_segment_count: 10,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let config = rumqttd::Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::Builder::new().name("mqtt-broker".into()).spawn(move || {
        let mut broker = rumqttd::Broker::new(config);
        if let Err(e) = broker.start() {
            tracing::error!(error = %e, "the embedded MQTT broker stopped");
        }
    })?;
    // Clients (the bridge, the agent) connect with retries while it binds.
    Ok(addr)
}

/// The studio's devices, as its agent's token serves them.
const DEVICES: [&str; 4] = ["printer", "lights", "camera", "display"];

/// The simulated devices and the agent driving them; dropping it stops the simulators.
pub struct Studio {
    _printer: SimDevice,
    _lights: SimDevice,
    agent: tokio::task::JoinHandle<anyhow::Result<()>>,
    stop: CancellationToken,
    /// Where the display's folder is.
    pub gallery: PathBuf,
}

impl Studio {
    /// Starts the simulators and an agent for them, talking to the broker at `mqtt` (logging in
    /// as it says) and the API at `api_url` with a device token kept in `DATA/studio/device.token`,
    /// which serves the four devices.
    pub async fn start(
        sched: &Arc<Scheduler>,
        data: &Path,
        mqtt: &MqttEndpoint,
        api_url: &str,
        metrics_listen: Option<SocketAddr>,
    ) -> anyhow::Result<Studio> {
        let dir = data.join("studio");
        std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
        let served: Vec<String> = DEVICES.iter().map(|d| (*d).to_owned()).collect();
        let token_path = dir.join("device.token");
        let (token, _) =
            kiln_scheduler::farm::ensure_token(sched, &token_path, "studio-agent", Role::Device, &served).await?;
        let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
        let printer = SimDevice::printer(loopback, PrinterSetup { print_ms: 1_500, ..PrinterSetup::default() }).await?;
        let lights = SimDevice::lights(loopback).await?;
        let modbus = |addr: SocketAddr| ModbusConfig {
            address: Some(addr.to_string()),
            serial: None,
            baud: 9_600,
            parity: Parity::default(),
            unit: 1,
            timeout_ms: 1_000,
            retries: 2,
        };
        let device = |id: &str, kind| DeviceConfig {
            id: id.into(),
            kind,
            modbus: None,
            printer: PrinterMap::default(),
            lights: LightsMap::default(),
            command: None,
            folder: None,
            snapshot_url: None,
            step_timeout_ms: 120_000,
        };
        let tray = dir.join("printer-tray");
        let gallery = dir.join("gallery");
        let take_photo = format!("cp \"$(ls -t '{}'/*.png | head -n 1)\" \"$0\"", tray.display());
        let devices = vec![
            DeviceConfig {
                modbus: Some(modbus(printer.addr())),
                folder: Some(tray),
                ..device("printer", DeviceKind::Printer)
            },
            DeviceConfig { modbus: Some(modbus(lights.addr())), ..device("lights", DeviceKind::Lights) },
            DeviceConfig {
                command: Some(vec!["sh".into(), "-c".into(), take_photo, "{out}".into()]),
                ..device("camera", DeviceKind::Camera)
            },
            DeviceConfig { folder: Some(gallery.clone()), ..device("display", DeviceKind::Display) },
        ];
        let cfg = EdgeConfig {
            data_dir: dir.join("edge"),
            telemetry_interval_ms: 5_000,
            mqtt: MqttConfig {
                url: format!("{}://{}:{}", if mqtt.tls { "mqtts" } else { "mqtt" }, mqtt.host, mqtt.port),
                prefix: sched.cfg.fleet.prefix.clone(),
                username: mqtt.login.as_ref().map(|(u, _)| u.clone()),
                password: mqtt.login.as_ref().map(|(_, p)| p.expose().to_owned()),
                ..MqttConfig::default()
            },
            scheduler: kiln_edge::config::SchedulerConfig { url: api_url.into(), token, max_download_bytes: 2 << 30 },
            spool: Default::default(),
            devices,
            tls_ca_file: sched.cfg.tls.ca_file.clone(),
            metrics_listen,
        };
        cfg.check().map_err(|e| anyhow::anyhow!("the studio's agent config: {e}"))?;
        let stop = CancellationToken::new();
        let agent = kiln_edge::spawn(cfg, stop.clone());
        Ok(Studio { _printer: printer, _lights: lights, agent, stop, gallery })
    }

    /// Stops the agent (its devices say goodbye).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), self.agent).await;
    }
}
