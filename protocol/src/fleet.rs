//! The edge fleet's MQTT contract: topic names and the payloads agents and the scheduler
//! exchange (DESIGN.md, "Edge fleet"). Every payload is JSON and carries its schema version `v`;
//! a receiver that gets anything else drops it and counts it (or, for a task, rejects it).
//!
//! | topic | from | QoS / retain |
//! |---|---|---|
//! | `{p}/devices/{id}/status` | agent | 1, retained; the last will says `offline` |
//! | `{p}/devices/{id}/telemetry` | agent | 1 (through the agent's spool) |
//! | `{p}/devices/{id}/tasks` | scheduler | 1 |
//! | `{p}/devices/{id}/tasks/{task}` | agent | 1 (through the agent's spool) |
//! | `{p}/scheduler/status` | scheduler | 1, retained; agents re-announce when it is (re)born |

use std::collections::BTreeMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{FieldError, Versioned};

/// The schema version of every fleet payload but the task report.
pub const FLEET_VERSION: u32 = 1;

/// The schema version of a task report: 2 added the rejection's typed [`RejectReason`]. A
/// receiver reads version 1 too (a rejection without a reason).
pub const TASK_REPORT_VERSION: u32 = 2;

/// The longest device or task id (they are topic levels, so they are kept short and plain).
pub const MAX_ID_LEN: usize = 64;

/// Whether `id` may name a device or a task: 1 to 64 of `A-Z a-z 0-9 - _ .`, so it is one MQTT
/// topic level with no wildcard in it.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Where an MQTT broker is and how to log in to it.
#[derive(Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    /// Its host.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// User and password, from `mqtt://user:password@host:port`.
    pub login: Option<(String, crate::Secret)>,
    /// Whether it speaks TLS (`mqtts://`).
    pub tls: bool,
}

impl fmt::Debug for MqttEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = self.login.as_ref().map(|(u, _)| u.as_str());
        f.debug_struct("MqttEndpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &user)
            .field("tls", &self.tls)
            .finish()
    }
}

impl MqttEndpoint {
    /// `mqtt://host:port` (or `tcp://`, or a bare `host:port`; the port defaults to 1883), or
    /// `mqtts://host:port` over TLS (or `ssl://`; the port defaults to 8883), with an optional
    /// `user:password@` before the host (taken as written, no percent-decoding).
    pub fn parse(url: &str) -> Result<MqttEndpoint, String> {
        // The password never goes into an error: the URL is shown as SecretUrl shows it.
        let shown = match url.contains("://") {
            true => crate::SecretUrl::from(url).to_string(),
            false if url.contains('@') => "(a URL with a login needs mqtt:// before it)".to_owned(),
            false => url.to_owned(),
        };
        let secure = url.strip_prefix("mqtts://").or_else(|| url.strip_prefix("ssl://"));
        let tls = secure.is_some();
        let rest = secure.or_else(|| url.strip_prefix("mqtt://")).or_else(|| url.strip_prefix("tcp://")).unwrap_or(url);
        let rest = rest.trim_end_matches('/');
        let (login, rest) = match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                if user.is_empty() {
                    return Err(format!("{shown:?}: the user before '@' is empty"));
                }
                (Some((user.to_owned(), crate::Secret::new(password.to_owned()))), host)
            }
            None => (None, rest),
        };
        if rest.is_empty() || rest.contains('/') || rest.contains("://") {
            return Err(format!("{shown:?} is not mqtt[s]://[user:password@]host:port"));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(':') => {
                let port = port.parse().map_err(|_| format!("{shown:?}: the port {port:?} is not a number"))?;
                (host.trim_matches(['[', ']']).to_owned(), port)
            }
            _ => (rest.to_owned(), if tls { 8883 } else { 1883 }),
        };
        Ok(MqttEndpoint { host, port, login, tls })
    }
}

/// `mqtt://host:port`'s host and port (see [`MqttEndpoint::parse`]).
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), String> {
    MqttEndpoint::parse(url).map(|e| (e.host, e.port))
}

/// The fleet's topic names, all under one prefix (`kiln` unless configured otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics::new("kiln")
    }
}

/// What a fleet topic names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// A device's retained status.
    Status(String),
    /// A device's telemetry.
    Telemetry(String),
    /// Tasks for a device.
    Tasks(String),
    /// A device's report on one task: (device, task).
    TaskReport(String, String),
    /// The scheduler's retained status.
    SchedulerStatus,
}

impl Topics {
    /// Topics under `prefix`.
    pub fn new(prefix: &str) -> Topics {
        Topics { prefix: prefix.trim_end_matches('/').to_owned() }
    }
    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// `{p}/devices/{id}/status`.
    pub fn status(&self, device: &str) -> String {
        format!("{}/devices/{device}/status", self.prefix)
    }
    /// `{p}/devices/{id}/telemetry`.
    pub fn telemetry(&self, device: &str) -> String {
        format!("{}/devices/{device}/telemetry", self.prefix)
    }
    /// `{p}/devices/{id}/tasks`.
    pub fn tasks(&self, device: &str) -> String {
        format!("{}/devices/{device}/tasks", self.prefix)
    }
    /// `{p}/devices/{id}/tasks/{task}`.
    pub fn task_report(&self, device: &str, task: &str) -> String {
        format!("{}/devices/{device}/tasks/{task}", self.prefix)
    }
    /// `{p}/scheduler/status`.
    pub fn scheduler_status(&self) -> String {
        format!("{}/scheduler/status", self.prefix)
    }
    /// The filters the scheduler subscribes to: every device's status, telemetry and task reports.
    pub fn scheduler_filters(&self) -> [String; 3] {
        let p = &self.prefix;
        [format!("{p}/devices/+/status"), format!("{p}/devices/+/telemetry"), format!("{p}/devices/+/tasks/+")]
    }
    /// The Mosquitto ACL lines of an agent that logs in as `user` and serves `devices`: it may
    /// publish only its own devices' status, telemetry and task reports, and read only their tasks
    /// and the scheduler's status. One Pi cannot speak for another's devices.
    pub fn agent_acl(&self, user: &str, devices: &[String]) -> Vec<String> {
        let p = &self.prefix;
        let mut lines = vec![format!("user {user}"), format!("topic read {p}/scheduler/status")];
        for d in devices {
            lines.push(format!("topic write {p}/devices/{d}/status"));
            lines.push(format!("topic write {p}/devices/{d}/telemetry"));
            lines.push(format!("topic write {p}/devices/{d}/tasks/+"));
            lines.push(format!("topic read {p}/devices/{d}/tasks"));
        }
        lines
    }

    /// The Mosquitto ACL lines of the scheduler's bridge, logged in as `user`: it announces
    /// itself, hears every device and sends every device its tasks.
    pub fn bridge_acl(&self, user: &str) -> Vec<String> {
        let p = &self.prefix;
        vec![
            format!("user {user}"),
            format!("topic readwrite {p}/scheduler/status"),
            format!("topic read {p}/devices/+/status"),
            format!("topic read {p}/devices/+/telemetry"),
            format!("topic read {p}/devices/+/tasks/+"),
            format!("topic write {p}/devices/+/tasks"),
        ]
    }

    /// What `topic` names, if it is one of ours (with valid ids).
    pub fn parse(&self, topic: &str) -> Option<Topic> {
        let rest = topic.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?;
        if rest == "scheduler/status" {
            return Some(Topic::SchedulerStatus);
        }
        let parts: Vec<&str> = rest.strip_prefix("devices/")?.split('/').collect();
        let topic = match parts.as_slice() {
            [id, "status"] => Topic::Status((*id).to_owned()),
            [id, "telemetry"] => Topic::Telemetry((*id).to_owned()),
            [id, "tasks"] => Topic::Tasks((*id).to_owned()),
            [id, "tasks", task] if valid_id(task) => Topic::TaskReport((*id).to_owned(), (*task).to_owned()),
            _ => return None,
        };
        valid_id(parts[0]).then_some(topic)
    }
}

macro_rules! wire_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($(#[$vdoc:meta])* $variant:ident = $s:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every value, in order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// Its wire name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $s),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok($name::$variant),)+
                    _ => {
                        let all: Vec<&str> = $name::ALL.iter().map(|v| v.as_str()).collect();
                        Err(format!(concat!("unknown ", $what, " {:?}; expected one of {}"), s, all.join(", ")))
                    }
                }
            }
        }
    };
}

wire_enum!(
    /// What a device is.
    DeviceKind, "device kind" {
        /// A printer (Modbus status and coils; the file goes by a command or a spool folder).
        Printer = "printer",
        /// A studio light rig (Modbus holding registers for scene and brightness).
        Lights = "lights",
        /// A camera (a command or an HTTP snapshot URL).
        Camera = "camera",
        /// A gallery display (a command, or a folder a signage player watches).
        Display = "display",
    }
);

wire_enum!(
    /// A device's state as its status says (the scheduler adds `offline` from the last will).
    DeviceState, "device state" {
        /// Up and answering.
        Online = "online",
        /// Up, but its hardware is failing (a Modbus device that stopped answering, say).
        Degraded = "degraded",
        /// Gone: the agent's last will, or its clean goodbye.
        Offline = "offline",
    }
);

wire_enum!(
    /// What a task asks of a device.
    TaskKind, "task kind" {
        /// Print an asset.
        Print = "print",
        /// Take a photo; it is uploaded as an asset.
        Capture = "capture",
        /// Show an asset on a display.
        Display = "display",
        /// Set a light scene and brightness.
        Lights = "lights",
    }
);

impl TaskKind {
    /// The device kind that carries out this task.
    pub fn device_kind(self) -> DeviceKind {
        match self {
            TaskKind::Print => DeviceKind::Printer,
            TaskKind::Capture => DeviceKind::Camera,
            TaskKind::Display => DeviceKind::Display,
            TaskKind::Lights => DeviceKind::Lights,
        }
    }
    /// Whether the task needs an asset to work on.
    pub fn needs_asset(self) -> bool {
        matches!(self, TaskKind::Print | TaskKind::Display)
    }
}

wire_enum!(
    /// A task's state as the agent reports it.
    ReportState, "report state" {
        /// Taken into the agent's journal; it will be carried out.
        Accepted = "accepted",
        /// Under way.
        Running = "running",
        /// Done.
        Succeeded = "succeeded",
        /// Tried and failed (the detail says why).
        Failed = "failed",
        /// Refused without being tried: past its deadline, malformed, or not for this device.
        Rejected = "rejected",
    }
);

impl ReportState {
    /// Whether nothing follows this state.
    pub fn is_terminal(self) -> bool {
        matches!(self, ReportState::Succeeded | ReportState::Failed | ReportState::Rejected)
    }
}

/// `{p}/devices/{id}/status`, retained. The agent's birth (and its last will, with `offline`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// Schema version.
    pub v: u32,
    /// The state.
    pub state: DeviceState,
    /// A fresh id for each start of the agent.
    pub boot_id: String,
    /// What the device is.
    pub kind: DeviceKind,
    /// The task kinds (and extras) it supports.
    pub capabilities: Vec<String>,
    /// The agent's version.
    pub version: String,
    /// When, unix milliseconds.
    pub at_ms: i64,
    /// Why, for `degraded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `{p}/devices/{id}/telemetry`: the device's readings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// Schema version.
    pub v: u32,
    /// The agent start that sent it.
    pub boot_id: String,
    /// Increases with every telemetry message of a device, across restarts: the high 32 bits count
    /// the device's starts (kept on disk), the low ones its messages since.
    pub seq: u64,
    /// When the readings were taken, unix milliseconds.
    pub at_ms: i64,
    /// Named readings: Modbus registers, CPU temperature, free disk, spool depth, what is shown.
    pub readings: BTreeMap<String, serde_json::Value>,
    /// Spooled messages the agent dropped so far because its spool was full (telemetry only).
    pub spool_dropped: u64,
}

/// An asset a task works on: its BLAKE3 and where to fetch it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssetRef {
    /// The BLAKE3 of its bytes, hex.
    pub hash: String,
    /// Where the agent fetches it (`GET`, with the agent's device token).
    pub url: String,
}

/// `{p}/devices/{id}/tasks`: one task for the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceTask {
    /// Schema version.
    pub v: u32,
    /// Its id: the agent's journal key, so a redelivered task is not run twice.
    pub task_id: String,
    /// What to do.
    pub kind: TaskKind,
    /// The asset, for print and display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset: Option<AssetRef>,
    /// Task parameters (lights: `scene`, `brightness`).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// After this (unix milliseconds, the scheduler's clock) the task is rejected, not run.
    pub deadline_ms: i64,
    /// When the scheduler sent it, by its own clock (unix milliseconds). A Pi has no real-time
    /// clock: the agent keeps the difference between this and its own clock, and checks
    /// deadlines and stamps its reports by the scheduler's time. Absent from older schedulers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_ms: Option<i64>,
    /// The scheduler's proof that it sent this task to this device: the keyed BLAKE3 of the task
    /// (this field left out) and the device id, with the key of the device token that serves the
    /// device ([`DeviceTask::sign`]). An agent runs nothing without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl DeviceTask {
    /// What the MAC covers: a context, the device and the task as JSON without its MAC. Both
    /// sides serialize the same struct, so the bytes agree after a round trip through JSON.
    fn signed_bytes(&self, device: &str) -> Vec<u8> {
        let unsigned = DeviceTask { mac: None, ..self.clone() };
        let mut bytes = format!("kiln device task\n{device}\n").into_bytes();
        bytes.extend(serde_json::to_vec(&unsigned).unwrap_or_default());
        bytes
    }

    /// Signs the task for `device` with the key of the token that serves it.
    pub fn sign(&mut self, device: &str, key: &crate::wire::MessageKey) {
        self.mac = Some(key.mac(&self.signed_bytes(device)));
    }

    /// Whether the task carries the scheduler's proof that it is for `device`, signed with `key`.
    pub fn proven(&self, device: &str, key: &crate::wire::MessageKey) -> bool {
        self.mac.as_deref().is_some_and(|mac| key.verify(&self.signed_bytes(device), mac))
    }
}

wire_enum!(
    /// A device task's state as the scheduler keeps it. It moves forward only: queued → sent →
    /// accepted → running → succeeded | failed | timed_out | expired; `sent` may repeat (an
    /// unanswered send is sent again).
    TaskState, "task state" {
        /// Created; not yet sent (its device is offline, or the bridge has not got to it).
        Queued = "queued",
        /// Published to the device; not yet accepted.
        Sent = "sent",
        /// The agent took it into its journal.
        Accepted = "accepted",
        /// Under way.
        Running = "running",
        /// Done.
        Succeeded = "succeeded",
        /// Failed on the device, was rejected by it, or was sent too often without an answer.
        Failed = "failed",
        /// Accepted but not ended by its deadline (plus `fleet.run_grace_seconds`).
        TimedOut = "timed_out",
        /// Its deadline passed before the device accepted it.
        Expired = "expired",
    }
);

impl TaskState {
    /// Whether nothing follows.
    pub fn is_terminal(self) -> bool {
        self.rank() == 4
    }

    fn rank(self) -> u8 {
        match self {
            TaskState::Queued => 0,
            TaskState::Sent => 1,
            TaskState::Accepted => 2,
            TaskState::Running => 3,
            _ => 4,
        }
    }

    /// Whether a task in `self` may move to `to` (forward, or a resend).
    pub fn may_move_to(self, to: TaskState) -> bool {
        to.rank() > self.rank() || (self == TaskState::Sent && to == TaskState::Sent)
    }
}

wire_enum!(
    /// Why a device rejected a task without running it (task reports from version 2).
    RejectReason, "reject reason" {
        /// Its deadline had passed.
        Deadline = "deadline",
        /// It is a task for another kind of device.
        WrongKind = "wrong_kind",
        /// Its payload did not parse or check.
        Malformed = "malformed",
        /// It carried no valid proof that the scheduler sent it (someone else published it on
        /// the device's tasks topic): never run, and the scheduler does not let it move the task
        /// of the same id.
        Unproven = "unproven",
    }
);

/// `{p}/devices/{id}/tasks/{task}`: how a task is going.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskReport {
    /// Schema version.
    pub v: u32,
    /// The task.
    pub task_id: String,
    /// Its state.
    pub state: ReportState,
    /// When, unix milliseconds.
    pub at_ms: i64,
    /// A short note: why it failed or was rejected, or what was done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Why it was rejected (a rejection from version 2; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<RejectReason>,
    /// An asset the task made (a capture's photo), already uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_asset: Option<String>,
}

/// `{p}/scheduler/status`, retained: the scheduler's birth. Agents re-announce when its boot id
/// changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerStatus {
    /// Schema version.
    pub v: u32,
    /// `online`, or `offline` from its last will.
    pub state: DeviceState,
    /// A fresh id for each start of the scheduler.
    pub boot_id: String,
    /// When, unix milliseconds.
    pub at_ms: i64,
}

/// Why a payload was refused.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// Not JSON of the expected shape, or a string with a NUL: the error names the field.
    #[error("malformed payload: field {0}")]
    Malformed(#[from] crate::JsonError),
    /// A schema version this side does not read.
    #[error("field v: unsupported schema version {0}")]
    Version(u32),
    /// A field that parses but cannot be used.
    #[error("field {field}: {message}")]
    Field {
        /// The field.
        field: &'static str,
        /// Why.
        message: String,
    },
}

/// Parses a fleet payload and checks its version and fields.
pub fn decode<T: serde::de::DeserializeOwned + Versioned>(bytes: &[u8]) -> Result<T, PayloadError> {
    let value: T = crate::decode_json(bytes)?;
    if !value.readable() {
        return Err(PayloadError::Version(value.version()));
    }
    value.check()?;
    Ok(value)
}

impl From<FieldError> for PayloadError {
    fn from(e: FieldError) -> Self {
        PayloadError::Field { field: e.field, message: e.message }
    }
}

fn id_field(field: &'static str, id: &str) -> Result<(), FieldError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(FieldError { field, message: format!("{id:?} is not 1 to {MAX_ID_LEN} of A-Z a-z 0-9 - _ .") })
    }
}

/// Whether `hash` looks like a BLAKE3 hex digest.
pub fn valid_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Versioned for DeviceStatus {
    const READS: RangeInclusive<u32> = FLEET_VERSION..=FLEET_VERSION;
    fn version(&self) -> u32 {
        self.v
    }
}

impl Versioned for Telemetry {
    const READS: RangeInclusive<u32> = FLEET_VERSION..=FLEET_VERSION;
    fn version(&self) -> u32 {
        self.v
    }
}

impl Versioned for SchedulerStatus {
    const READS: RangeInclusive<u32> = FLEET_VERSION..=FLEET_VERSION;
    fn version(&self) -> u32 {
        self.v
    }
}

impl Versioned for DeviceTask {
    const READS: RangeInclusive<u32> = FLEET_VERSION..=FLEET_VERSION;
    fn version(&self) -> u32 {
        self.v
    }
    fn check(&self) -> Result<(), FieldError> {
        id_field("task_id", &self.task_id)?;
        match &self.asset {
            Some(a) if !valid_hash(&a.hash) => {
                Err(FieldError { field: "asset.hash", message: "must be 64 hex digits (BLAKE3)".into() })
            }
            None if self.kind.needs_asset() => {
                Err(FieldError { field: "asset", message: format!("a {} task needs an asset", self.kind) })
            }
            _ => Ok(()),
        }
    }
}

impl Versioned for TaskReport {
    const READS: RangeInclusive<u32> = 1..=TASK_REPORT_VERSION;
    fn version(&self) -> u32 {
        self.v
    }
    fn check(&self) -> Result<(), FieldError> {
        id_field("task_id", &self.task_id)?;
        match &self.output_asset {
            Some(h) if !valid_hash(h) => {
                Err(FieldError { field: "output_asset", message: "must be 64 hex digits (BLAKE3)".into() })
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mqtt_url_gives_host_port_and_login_and_never_shows_its_password() {
        let e = MqttEndpoint::parse("mqtt://kiln-scheduler:s3cr3t@broker.lan:8883").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("broker.lan", 8883));
        let (user, password) = e.login.as_ref().unwrap();
        assert_eq!((user.as_str(), password.expose()), ("kiln-scheduler", "s3cr3t"));
        assert!(!format!("{e:?}").contains("s3cr3t"));
        assert_eq!(parse_mqtt_url("tcp://127.0.0.1"), Ok(("127.0.0.1".into(), 1883)));
        assert_eq!(parse_mqtt_url("[::1]:1884"), Ok(("::1".into(), 1884)));
        assert_eq!(MqttEndpoint::parse("mqtt://h:1").unwrap().login, None);
        for (url, port, tls) in [("mqtts://h", 8883, true), ("ssl://h:8884", 8884, true), ("mqtt://h", 1883, false)] {
            let e = MqttEndpoint::parse(url).unwrap();
            assert_eq!((e.port, e.tls), (port, tls), "{url}");
        }
        for bad in ["mqtt://u:s3cr3t@h:port", "mqtt://:s3cr3t@h", "mqtt://u:s3cr3t@h/x", "http://h:1", ""] {
            let e = MqttEndpoint::parse(bad).unwrap_err();
            assert!(!e.contains("s3cr3t"), "{bad}: {e}");
        }
    }

    #[test]
    fn topics_round_trip_and_refuse_strangers() {
        let t = Topics::new("studio");
        assert_eq!(t.parse(&t.status("p1")), Some(Topic::Status("p1".into())));
        assert_eq!(t.parse(&t.telemetry("p1")), Some(Topic::Telemetry("p1".into())));
        assert_eq!(t.parse(&t.tasks("p1")), Some(Topic::Tasks("p1".into())));
        assert_eq!(t.parse(&t.task_report("p1", "t-9")), Some(Topic::TaskReport("p1".into(), "t-9".into())));
        assert_eq!(t.parse(&t.scheduler_status()), Some(Topic::SchedulerStatus));
        for bad in ["kiln/devices/p1/status", "studio/devices/p1", "studio/devices//status", "studio/devices/p+/status"]
        {
            assert_eq!(t.parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn payloads_check_their_version_and_fields() {
        let task = DeviceTask {
            v: FLEET_VERSION,
            task_id: "t1".into(),
            kind: TaskKind::Lights,
            asset: None,
            params: serde_json::Map::new(),
            deadline_ms: 5,
            sent_ms: None,
            mac: None,
        };
        let bytes = serde_json::to_vec(&task).unwrap();
        assert_eq!(decode::<DeviceTask>(&bytes).unwrap(), task);
        let print = br#"{"v":1,"task_id":"t2","kind":"print","deadline_ms":1}"#;
        assert!(matches!(decode::<DeviceTask>(print), Err(PayloadError::Field { field: "asset", .. })));
        let v2 = br#"{"v":2,"task_id":"t2","kind":"lights","deadline_ms":1}"#;
        assert!(matches!(decode::<DeviceTask>(v2), Err(PayloadError::Version(2))));
        assert!(matches!(decode::<DeviceTask>(b"\xff{"), Err(PayloadError::Malformed(_))));
        let bad_id = br#"{"v":1,"task_id":"a/b","kind":"lights","deadline_ms":1}"#;
        assert!(matches!(decode::<DeviceTask>(bad_id), Err(PayloadError::Field { field: "task_id", .. })));
        assert_eq!("camera".parse::<DeviceKind>(), Ok(DeviceKind::Camera));
        assert!("toaster".parse::<DeviceKind>().unwrap_err().contains("printer, lights, camera, display"));
    }

    #[test]
    fn a_task_is_proven_only_for_its_device_with_its_token_and_unchanged() {
        let sched = crate::wire::MessageKey::from_token_hash(
            blake3::hash(b"kiln_00112233445566778899aabbccddeeff").to_hex().as_str(),
        );
        let agent = crate::wire::MessageKey::from_token("kiln_00112233445566778899aabbccddeeff");
        let mut params = serde_json::Map::new();
        params.insert("scene".into(), "dusk".into());
        params.insert("brightness".into(), 0.35.into());
        params.insert("zones".into(), serde_json::json!([1, 2.5e-7, {"b": null, "a": "é\u{1F525}"}]));
        let mut task = DeviceTask {
            v: FLEET_VERSION,
            task_id: "t1".into(),
            kind: TaskKind::Lights,
            asset: None,
            params,
            deadline_ms: 1_900_000_000_000,
            sent_ms: None,
            mac: None,
        };
        assert!(!task.proven("lights-1", &agent), "no MAC, no proof");
        task.sign("lights-1", &sched);
        // What the agent checks is what it decoded from the wire.
        let heard: DeviceTask = decode(&serde_json::to_vec(&task).unwrap()).unwrap();
        assert!(heard.proven("lights-1", &agent));
        assert!(!heard.proven("lights-2", &agent), "signed for another device");
        let other = crate::wire::MessageKey::from_token("kiln_ffeeddccbbaa99887766554433221100");
        assert!(!heard.proven("lights-1", &other), "another token's key");
        let mut changed = heard.clone();
        changed.params.insert("brightness".into(), 1.0.into());
        assert!(!changed.proven("lights-1", &agent), "a changed parameter");
        let later = DeviceTask { deadline_ms: heard.deadline_ms + 1, ..heard.clone() };
        assert!(!later.proven("lights-1", &agent), "a moved deadline");
        let garbage = DeviceTask { mac: Some("zz".into()), ..heard };
        assert!(!garbage.proven("lights-1", &agent));
    }

    #[test]
    fn a_rejection_says_why_in_a_version_2_report_and_a_version_1_report_still_reads() {
        let v2 =
            br#"{"v":2,"task_id":"t1","state":"rejected","at_ms":5,"detail":"past its deadline","reason":"deadline"}"#;
        let r = decode::<TaskReport>(v2).unwrap();
        assert_eq!((r.state, r.reason), (ReportState::Rejected, Some(RejectReason::Deadline)));
        let v1 = br#"{"v":1,"task_id":"t1","state":"rejected","at_ms":5,"detail":"past its deadline"}"#;
        assert_eq!(decode::<TaskReport>(v1).unwrap().reason, None);
        let v3 = br#"{"v":3,"task_id":"t1","state":"rejected","at_ms":5}"#;
        assert!(matches!(decode::<TaskReport>(v3), Err(PayloadError::Version(3))));
        let odd = br#"{"v":2,"task_id":"t1","state":"rejected","at_ms":5,"reason":"bored"}"#;
        assert!(matches!(decode::<TaskReport>(odd), Err(PayloadError::Malformed(_))));
        let back = TaskReport { reason: Some(RejectReason::WrongKind), ..r };
        assert!(serde_json::to_string(&back).unwrap().contains(r#""reason":"wrong_kind""#));
        // Other payloads stay at version 1.
        let status = br#"{"v":2,"state":"online","boot_id":"b","at_ms":1}"#;
        assert!(matches!(decode::<SchedulerStatus>(status), Err(PayloadError::Version(2))));
    }
}
