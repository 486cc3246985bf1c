//! The agent's configuration: one TOML file listing the devices it drives, with a few
//! `KILN_EDGE_*` environment variables over it. A bad file fails with a message naming the key,
//! before anything connects.
//!
//! ```toml
//! data_dir = "/var/lib/kiln-edge"
//! telemetry_interval_ms = 5000
//! [mqtt]
//! url = "mqtt://192.168.1.10:1883"
//! [scheduler]
//! url = "http://192.168.1.10:7070"
//! token = "…device token…"
//! [[device]]
//! id = "printer-1"
//! kind = "printer"
//! modbus = { address = "192.168.1.50:502", unit = 1 }
//! command = ["lp", "-d", "studio", "{file}"]
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_protocol::fleet::{DeviceKind, MqttEndpoint, valid_id};
use serde::{Deserialize, Serialize};

/// Everything the agent needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the spool, the task journal and fetched assets live (`KILN_EDGE_DATA_DIR`).
    pub data_dir: PathBuf,
    /// How often each device sends telemetry, milliseconds.
    #[serde(default = "defaults::telemetry_interval_ms")]
    pub telemetry_interval_ms: u64,
    /// The MQTT broker.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// The scheduler's HTTP API, for assets.
    pub scheduler: SchedulerConfig,
    /// The on-disk spool of telemetry and task reports.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// The devices this agent drives.
    #[serde(rename = "device", default)]
    pub devices: Vec<DeviceConfig>,
    /// PEM CA certificates to trust besides the system's, for `mqtts://` and an `https://`
    /// scheduler that the studio's own CA signed (`KILN_EDGE_TLS_CA_FILE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// Where to serve the agent's own `/metrics` and `/healthz` for Prometheus, such as
    /// `0.0.0.0:9465` (`KILN_EDGE_METRICS_LISTEN`). Off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// The MQTT session.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `mqtt://host:port` (`KILN_EDGE_MQTT_URL`).
    pub url: String,
    /// Topic prefix.
    pub prefix: String,
    /// Keepalive, seconds: the broker declares the device offline (its last will) after 1.5 of these
    /// without a word.
    pub keepalive_s: u64,
    /// User name, if the broker asks for one.
    pub username: Option<String>,
    /// Password (`KILN_EDGE_MQTT_PASSWORD`).
    pub password: Option<String>,
    /// The longest wait between reconnect attempts, milliseconds (the wait doubles from 100 ms).
    pub reconnect_max_ms: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: "mqtt://127.0.0.1:1883".into(),
            prefix: "kiln".into(),
            keepalive_s: 5,
            username: None,
            password: None,
            reconnect_max_ms: 10_000,
        }
    }
}

impl MqttConfig {
    /// The broker: host, port, and whether over TLS (`mqtts://`).
    pub fn endpoint(&self) -> Result<MqttEndpoint, String> {
        MqttEndpoint::parse(&self.url)
    }
}

/// The scheduler's HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Its base URL, `http://host:port` (`KILN_EDGE_SCHEDULER_URL`).
    pub url: String,
    /// A `device` token (`KILN_EDGE_TOKEN`): fetches assets, uploads photos. Required, from the
    /// file or (better: the file need not hold a secret) the environment.
    #[serde(default)]
    pub token: String,
    /// The largest download (an asset, a camera's snapshot) the agent takes, bytes; a larger one
    /// is cut off and its task fails, so a Pi's card never fills from one answer.
    #[serde(default = "defaults::max_download_bytes")]
    pub max_download_bytes: u64,
}

/// The spool's bound.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// At most this many messages wait per device; past it the oldest telemetry is dropped (and
    /// counted). Task reports are never dropped.
    pub max_entries: usize,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig { max_entries: 5_000 }
    }
}

/// One device and how to drive it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Its id: a topic level, so 1 to 64 of `A-Z a-z 0-9 - _ .`.
    pub id: String,
    /// What it is.
    pub kind: DeviceKind,
    /// Printer and lights: where its Modbus registers are.
    #[serde(default)]
    pub modbus: Option<ModbusConfig>,
    /// Printer: the register map.
    #[serde(default)]
    pub printer: PrinterMap,
    /// Lights: the register map.
    #[serde(default)]
    pub lights: LightsMap,
    /// A command to run: printer `{file}` (such as `["lp", "-d", "studio", "{file}"]`), camera
    /// `{out}` (such as `["libcamera-still", "-o", "{out}"]`), display `{file}`.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Printer: a spool folder the file is copied into; display: the folder a signage player
    /// watches (`current.png` and `current.json` are replaced atomically).
    #[serde(default)]
    pub folder: Option<PathBuf>,
    /// Camera: an HTTP URL that answers a snapshot.
    #[serde(default)]
    pub snapshot_url: Option<String>,
    /// The longest a command, a snapshot or a print may take, milliseconds.
    #[serde(default = "defaults::step_timeout_ms")]
    pub step_timeout_ms: u64,
}

/// Where a device's Modbus registers are: a TCP address or a serial line (RTU).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusConfig {
    /// `host:port` of a Modbus TCP device.
    #[serde(default)]
    pub address: Option<String>,
    /// A serial device (RTU), such as `/dev/ttyUSB0`. Devices on the same line share one bus
    /// task, which owns it.
    #[serde(default)]
    pub serial: Option<PathBuf>,
    /// The serial line's baud rate.
    #[serde(default = "defaults::baud")]
    pub baud: u32,
    /// The serial line's parity: `even` (the Modbus default), `odd`, or `none` (then two stop
    /// bits, as the Modbus serial line specification asks).
    #[serde(default)]
    pub parity: Parity,
    /// The unit (slave) id.
    #[serde(default = "defaults::unit")]
    pub unit: u8,
    /// Each call's timeout, milliseconds.
    #[serde(default = "defaults::modbus_timeout_ms")]
    pub timeout_ms: u64,
    /// Retries after a timeout or a broken connection (not after an exception reply).
    #[serde(default = "defaults::modbus_retries")]
    pub retries: u32,
}

impl ModbusConfig {
    /// Each call's timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// A serial line's parity; eight data bits always, one stop bit with parity, two without.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    /// Even parity, the Modbus default.
    #[default]
    Even,
    /// Odd parity.
    Odd,
    /// No parity, two stop bits.
    None,
}

impl std::fmt::Display for Parity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Parity::Even => "even",
            Parity::Odd => "odd",
            Parity::None => "none",
        })
    }
}

impl Parity {
    /// The stty settings for it.
    pub fn stty(self) -> [&'static str; 3] {
        match self {
            Parity::Even => ["parenb", "-parodd", "-cstopb"],
            Parity::Odd => ["parenb", "parodd", "-cstopb"],
            Parity::None => ["-parenb", "-parodd", "cstopb"],
        }
    }
}

/// A printer's registers (holding registers and coils, zero-based addresses) and status values.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrinterMap {
    /// Status register.
    pub status: u16,
    /// Media (sheets) left.
    pub media: u16,
    /// Ink left, percent.
    pub ink: u16,
    /// Jobs printed (a counter).
    pub jobs: u16,
    /// Error code (0: none; 1: out of paper; 2: out of ink; 3: jam).
    pub error_code: u16,
    /// Coil that starts the job handed over.
    pub start_coil: u16,
    /// Coil that aborts the job under way.
    pub abort_coil: u16,
    /// The status value meaning ready.
    pub ready_value: u16,
    /// The status value meaning printing.
    pub busy_value: u16,
    /// The status value meaning error.
    pub error_value: u16,
    /// How often a job under way is polled, milliseconds.
    pub poll_ms: u64,
}

impl Default for PrinterMap {
    fn default() -> Self {
        PrinterMap {
            status: 0,
            media: 1,
            ink: 2,
            jobs: 3,
            error_code: 4,
            start_coil: 0,
            abort_coil: 1,
            ready_value: 0,
            busy_value: 1,
            error_value: 2,
            poll_ms: 100,
        }
    }
}

/// A light rig's holding registers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LightsMap {
    /// Scene number register.
    pub scene: u16,
    /// Brightness register (0 to `max_brightness`).
    pub brightness: u16,
    /// The highest brightness the rig takes.
    pub max_brightness: u16,
}

impl Default for LightsMap {
    fn default() -> Self {
        LightsMap { scene: 0, brightness: 1, max_brightness: 1000 }
    }
}

mod defaults {
    pub fn max_download_bytes() -> u64 {
        2 << 30
    }
    pub fn telemetry_interval_ms() -> u64 {
        5_000
    }
    pub fn step_timeout_ms() -> u64 {
        600_000
    }
    pub fn baud() -> u32 {
        9_600
    }
    pub fn unit() -> u8 {
        1
    }
    pub fn modbus_timeout_ms() -> u64 {
        1_000
    }
    pub fn modbus_retries() -> u32 {
        2
    }
}

/// A config that cannot be used, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads `path`, applies `KILN_EDGE_*` from `env`, and checks it.
    pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        Config::parse(&text, env).map_err(|ConfigError(m)| ConfigError(format!("{}: {m}", path.display())))
    }

    /// Parses TOML, applies `KILN_EDGE_*` from `env`, and checks it.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        if let Some(v) = env("KILN_EDGE_DATA_DIR") {
            cfg.data_dir = v.into();
        }
        if let Some(v) = env("KILN_EDGE_MQTT_URL") {
            cfg.mqtt.url = v;
        }
        if let Some(v) = env("KILN_EDGE_MQTT_PASSWORD") {
            cfg.mqtt.password = Some(v);
        }
        if let Some(v) = env("KILN_EDGE_SCHEDULER_URL") {
            cfg.scheduler.url = v;
        }
        if let Some(v) = env("KILN_EDGE_TOKEN") {
            cfg.scheduler.token = v;
        }
        if let Some(v) = env("KILN_EDGE_TLS_CA_FILE").filter(|v| !v.is_empty()) {
            cfg.tls_ca_file = Some(v.into());
        }
        if let Some(v) = env("KILN_EDGE_METRICS_LISTEN") {
            let addr = v.parse().map_err(|e| ConfigError(format!("KILN_EDGE_METRICS_LISTEN: {v:?}: {e}")))?;
            cfg.metrics_listen = Some(addr);
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// Checks what serde cannot: ids, one way to reach each device, sane numbers.
    pub fn check(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        self.mqtt.endpoint().map_err(|m| ConfigError(format!("mqtt.url: {m}")))?;
        if self.mqtt.keepalive_s == 0 || self.mqtt.keepalive_s > 3600 {
            return err(format!("mqtt.keepalive_s: {} is not between 1 and 3600", self.mqtt.keepalive_s));
        }
        if self.scheduler.token.is_empty() {
            return err(
                "scheduler.token: a device token is needed (KILN_EDGE_TOKEN; `kiln device add` makes one)".into()
            );
        }
        if !self.scheduler.url.starts_with("http://") && !self.scheduler.url.starts_with("https://") {
            return err(format!("scheduler.url: {:?} must start with http:// or https://", self.scheduler.url));
        }
        if self.spool.max_entries < 10 {
            return err(format!("spool.max_entries: {} is below 10", self.spool.max_entries));
        }
        if self.telemetry_interval_ms < 100 {
            return err(format!("telemetry_interval_ms: {} is below 100", self.telemetry_interval_ms));
        }
        if self.devices.is_empty() {
            return err("device: no [[device]] is configured; the agent would have nothing to do".into());
        }
        let mut seen = std::collections::HashSet::new();
        let mut units = std::collections::HashMap::new();
        let mut lines = std::collections::HashMap::new();
        for (i, d) in self.devices.iter().enumerate() {
            let key = format!("device[{i}]");
            if !valid_id(&d.id) {
                return err(format!("{key}.id: {:?} is not 1 to 64 of A-Z a-z 0-9 - _ .", d.id));
            }
            if !seen.insert(&d.id) {
                return err(format!("{key}.id: {:?} is configured twice", d.id));
            }
            d.check().map_err(|m| ConfigError(format!("{key} ({}): {m}", d.id)))?;
            let Some(m) = &d.modbus else { continue };
            let bus = match (&m.address, &m.serial) {
                (Some(a), _) => format!("address {a}"),
                (None, Some(p)) => format!("serial {}", p.display()),
                (None, None) => continue,
            };
            if let Some(other) = units.insert((bus.clone(), m.unit), &d.id) {
                return err(format!("{key}.modbus.unit: {} on {bus} is also {other:?}'s", m.unit));
            }
            if m.serial.is_some()
                && let Some((other, baud, parity)) = lines.insert(bus.clone(), (&d.id, m.baud, m.parity))
                && (baud, parity) != (m.baud, m.parity)
            {
                return err(format!(
                    "{key}.modbus: {bus} is set to {} baud, parity {} here but {baud} baud, parity {parity} for {other:?}; devices on one line share its settings",
                    m.baud, m.parity
                ));
            }
        }
        Ok(())
    }
}

impl DeviceConfig {
    fn check(&self) -> Result<(), String> {
        let has_command = self.command.is_some();
        if let Some(c) = &self.command
            && c.is_empty()
        {
            return Err("command: is empty".into());
        }
        match self.kind {
            DeviceKind::Printer | DeviceKind::Lights => {
                let Some(m) = &self.modbus else {
                    return Err(format!("modbus: a {} needs its Modbus address or serial line", self.kind));
                };
                if m.address.is_some() == m.serial.is_some() {
                    return Err("modbus: give exactly one of address (TCP) or serial (RTU)".into());
                }
                if m.timeout_ms == 0 {
                    return Err("modbus.timeout_ms: must be above 0".into());
                }
                if self.kind == DeviceKind::Printer && has_command == self.folder.is_some() {
                    return Err("give exactly one of command (with {file}) or folder (a spool folder)".into());
                }
            }
            DeviceKind::Camera => {
                if has_command == self.snapshot_url.is_some() {
                    return Err("give exactly one of command (with {out}) or snapshot_url".into());
                }
                if let Some(c) = &self.command
                    && !c.iter().any(|a| a.contains("{out}"))
                {
                    return Err("command: must name the photo's path as {out}".into());
                }
            }
            DeviceKind::Display => {
                if has_command == self.folder.is_some() {
                    return Err("give exactly one of command (with {file}) or folder".into());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "data_dir = \"/tmp/x\"\n[scheduler]\nurl = \"http://127.0.0.1:7070\"\ntoken = \"t\"\n";

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("{BASE}{extra}"), &|_| None)
    }

    #[test]
    fn a_good_config_parses_and_the_environment_wins() {
        let text = format!(
            "{BASE}[[device]]\nid = \"p1\"\nkind = \"printer\"\nmodbus = {{ address = \"127.0.0.1:5020\" }}\nfolder = \"/tmp/spool\"\n"
        );
        let env = |k: &str| (k == "KILN_EDGE_MQTT_URL").then(|| "mqtt://10.0.0.2:1884".to_owned());
        let cfg = Config::parse(&text, &env).unwrap();
        // The token may come from the environment alone; with neither, the key is named.
        let tokenless = text.replace("token = \"t\"\n", "");
        let from_env = |k: &str| (k == "KILN_EDGE_TOKEN").then(|| "kiln_env".to_owned());
        assert_eq!(Config::parse(&tokenless, &from_env).unwrap().scheduler.token, "kiln_env");
        let e = Config::parse(&tokenless, &|_| None).unwrap_err().to_string();
        assert!(e.starts_with("scheduler.token:") && e.contains("KILN_EDGE_TOKEN"), "{e}");
        let broker = cfg.mqtt.endpoint().unwrap();
        assert_eq!((broker.host.as_str(), broker.port, broker.tls), ("10.0.0.2", 1884, false));
        assert_eq!(cfg.devices[0].modbus.as_ref().unwrap().retries, 2);
        assert_eq!(cfg.devices[0].printer.start_coil, 0);
    }

    #[test]
    fn bad_configs_name_the_key() {
        let cases = [
            ("", "no [[device]]"),
            ("[[device]]\nid = \"a/b\"\nkind = \"camera\"\nsnapshot_url = \"http://x\"\n", "device[0].id"),
            ("[[device]]\nid = \"p\"\nkind = \"printer\"\nfolder = \"/x\"\n", "modbus: a printer needs"),
            ("[[device]]\nid = \"c\"\nkind = \"camera\"\ncommand = [\"snap\"]\n", "{out}"),
            ("[[device]]\nid = \"c\"\nkind = \"toaster\"\n", "unknown variant `toaster`"),
            ("[[device]]\nid = \"c\"\nkind = \"display\"\nfolder = \"/x\"\ncolour = 1\n", "unknown field `colour`"),
            ("[mqtt]\nurl = \"mqtt://h:notaport\"\n", "mqtt.url"),
            (
                "[[device]]\nid = \"l\"\nkind = \"lights\"\nmodbus = { serial = \"/dev/ttyUSB0\", parity = \"mark\" }\n",
                "unknown variant `mark`",
            ),
            (
                "[[device]]\nid = \"l1\"\nkind = \"lights\"\nmodbus = { serial = \"/dev/ttyUSB0\" }\n\
                 [[device]]\nid = \"l2\"\nkind = \"lights\"\nmodbus = { serial = \"/dev/ttyUSB0\", unit = 2, baud = 19200 }\n",
                "device[1].modbus: serial /dev/ttyUSB0 is set to 19200 baud",
            ),
            (
                "[[device]]\nid = \"l1\"\nkind = \"lights\"\nmodbus = { address = \"10.0.0.9:502\" }\n\
                 [[device]]\nid = \"l2\"\nkind = \"lights\"\nmodbus = { address = \"10.0.0.9:502\" }\n",
                "device[1].modbus.unit: 1 on address 10.0.0.9:502 is also \"l1\"'s",
            ),
        ];
        for (extra, want) in cases {
            let e = parse(extra).unwrap_err().to_string();
            assert!(e.contains(want), "{extra:?}: {e}");
        }
    }
}
