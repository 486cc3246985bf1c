//! The farm's configuration: the worker's settings (top level of the file, as for
//! `kiln-worker`) and the scheduler's (`[scheduler]`). Built-in defaults < TOML file < `KILN_*`
//! environment; a bad value fails naming its key, before any port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kiln_protocol::{SecretUrl, Tier};
use kiln_worker::config::{ConfigError, WorkerConfig, env_parse, read_toml};
use serde::{Deserialize, Serialize};

use crate::retry::RetryPolicy;

/// Limits on what one API call may ask (`[scheduler.limits]`). Prompt length and pixels per tier
/// are the tiers' (`[tiers.*]`, `tiers.max_prompt_chars`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body in bytes (`scheduler.limits.max_body_bytes`, `KILN_MAX_BODY_BYTES`).
    pub max_body_bytes: usize,
    /// Most jobs one `POST /v1/jobs` may carry (`scheduler.limits.max_jobs_per_request`).
    pub max_jobs_per_request: usize,
    /// Largest page of `GET /v1/jobs` (`scheduler.limits.max_page`).
    pub max_page: u32,
    /// Longest idempotency key, in bytes (`scheduler.limits.max_idempotency_key`).
    pub max_idempotency_key: usize,
    /// Largest asset a worker may upload, in bytes.
    pub max_asset_bytes: usize,
    /// A client that has not sent a whole request head this long after connecting (or after
    /// its last answer, on a kept-alive connection) is cut off, seconds.
    pub header_read_timeout_seconds: u64,
    /// Most HTTP connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Longest a call may take, body included, before it is answered 408, seconds; a long poll
    /// gets its `wait` on top, and an event stream is not bounded once it has started.
    pub request_timeout_seconds: u64,
    /// The same for an asset upload (`PUT /v1/assets/...`), seconds.
    pub upload_timeout_seconds: u64,
    /// Most event streams (`GET /v1/jobs/{id}/events`) one token may hold open at once.
    pub max_event_streams_per_token: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 256 * 1024,
            max_jobs_per_request: 100,
            max_page: 500,
            max_idempotency_key: 200,
            max_asset_bytes: 1 << 30,
            header_read_timeout_seconds: 10,
            max_connections: 1024,
            request_timeout_seconds: 30,
            upload_timeout_seconds: 600,
            max_event_streams_per_token: 64,
        }
    }
}

/// The scheduler's settings (`[scheduler]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Where the API listens (`scheduler.listen`, `KILN_LISTEN`).
    pub listen: SocketAddr,
    /// In-process workers (`scheduler.workers`, `KILN_WORKERS`).
    pub workers: usize,
    /// Tiers the in-process workers serve (`scheduler.worker_tiers`).
    pub worker_tiers: Vec<Tier>,
    /// Whether `GET /v1/assets/...` needs no token (`scheduler.public_assets`, `KILN_PUBLIC_ASSETS`).
    pub public_assets: bool,
    /// Seconds a shutdown waits for renders in hand before leaving them to the next start
    /// (`scheduler.shutdown_grace_seconds`).
    pub shutdown_grace_seconds: u64,
    /// Request limits.
    pub limits: Limits,
    /// Retries of failed renders.
    pub retry: RetryPolicy,
    /// The database: unset for SQLite in the data dir, `sqlite://PATH`, or `postgres://…`
    /// (distributed mode) [env KILN_DATABASE_URL].
    pub database_url: Option<SecretUrl>,
    /// The broker (distributed mode: jobs go to `kiln-worker` daemons over RabbitMQ instead of
    /// in-process workers).
    pub broker: BrokerConfig,
    /// The edge fleet (MQTT).
    pub fleet: FleetConfig,
    /// TLS: the API's certificate, and the CA the farm's own services are signed by.
    pub tls: TlsConfig,
    /// What old records and assets are deleted.
    pub retention: RetentionConfig,
    /// Studio orders: how their steps retry and wait.
    pub orders: OrdersConfig,
    /// What renders cost, against the tokens' budgets.
    pub costs: CostsConfig,
    /// Which jobs are cut into tiles that several workers share.
    pub tiles: TilesConfig,
    /// The plans written in the config file (`[[plans]]`, at its top level), besides the
    /// built-in `gallery-print`.
    #[serde(skip)]
    pub plans: Vec<PlanConfig>,
}

/// `[[plans]]`: a plan an order may run. Its steps run in order; each is a `render` (the order's
/// prompt at a tier: every seed, or with `chosen` the one the approval chose), an `approve` (the
/// operator picks one of the renders of the render step before it) or a `device` task (on the
/// asset of an earlier render step, with parameters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// Its name, as `POST /v1/orders` gives it.
    pub name: String,
    /// Its steps.
    pub steps: Vec<PlanStepConfig>,
}

/// A step of a `[[plans]]` plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanStepConfig {
    /// Its name: letters, digits and `_`, unique in the plan.
    pub name: String,
    /// `render`, `approve` or `device`.
    pub kind: String,
    /// A render's tier.
    pub tier: Option<Tier>,
    /// A render of only the seed the approval before it chose (else every seed).
    #[serde(default)]
    pub chosen: bool,
    /// A device step's task: `print`, `capture`, `display` or `lights`.
    pub task: Option<String>,
    /// A device step's asset: the name of an earlier render step (a print or display needs one).
    pub asset: Option<String>,
    /// A device step's parameters (`lights`: `scene` and `brightness`).
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
}

impl PlanConfig {
    /// Checks the plan; the error names the field: `plans[1] ("print-only").steps[2] ("print").asset`.
    fn check(&self, at: usize, seen: &[PlanConfig]) -> Result<(), String> {
        let plan = format!("plans[{at}] ({:?})", self.name);
        let name_ok = |n: &str| {
            !n.is_empty() && n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !name_ok(&self.name) {
            return Err(format!("{plan}.name: use 1 to 64 of A-Z a-z 0-9 - _"));
        }
        if self.name == "gallery-print" || seen.iter().any(|p| p.name == self.name) {
            return Err(format!("{plan}.name: {:?} is taken (gallery-print is built in)", self.name));
        }
        if self.steps.is_empty() {
            return Err(format!("{plan}.steps: a plan needs at least one step"));
        }
        let mut approved = false;
        for (i, s) in self.steps.iter().enumerate() {
            let step = format!("{plan}.steps[{i}] ({:?})", s.name);
            let before = &self.steps[..i];
            // No `-` or `.`: a step's name goes into its renders' idempotency keys and its approval's id.
            if s.name.is_empty() || s.name.len() > 64 || !s.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(format!("{step}.name: use 1 to 64 of A-Z a-z 0-9 _"));
            }
            if before.iter().any(|b| b.name == s.name) {
                return Err(format!("{step}.name: {:?} is named twice", s.name));
            }
            let unused = |field: &str, set: bool| {
                if set { Err(format!("{step}.{field}: not for a {} step", s.kind)) } else { Ok(()) }
            };
            match s.kind.as_str() {
                "render" => {
                    if s.tier.is_none() {
                        return Err(format!("{step}.tier: a render step needs one (preview, final or print)"));
                    }
                    if s.chosen && !approved {
                        return Err(format!("{step}.chosen: no approve step comes before it to choose"));
                    }
                    unused("task", s.task.is_some())?;
                    unused("asset", s.asset.is_some())?;
                    unused("params", !s.params.is_empty())?;
                }
                "approve" => {
                    if approved {
                        return Err(format!("{step}.kind: a plan has one approve step at most"));
                    }
                    if before.iter().rev().find(|b| b.kind == "render").is_none_or(|b| b.chosen) {
                        return Err(format!("{step}.kind: an approve step needs a render of every seed before it"));
                    }
                    approved = true;
                    unused("tier", s.tier.is_some())?;
                    unused("chosen", s.chosen)?;
                    unused("task", s.task.is_some())?;
                    unused("asset", s.asset.is_some())?;
                    unused("params", !s.params.is_empty())?;
                }
                "device" => {
                    let task: kiln_protocol::fleet::TaskKind = s
                        .task
                        .as_deref()
                        .ok_or_else(|| {
                            format!("{step}.task: a device step needs one (print, capture, display or lights)")
                        })?
                        .parse()
                        .map_err(|e| format!("{step}.task: {e}"))?;
                    match &s.asset {
                        Some(a) => {
                            let Some(r) = before.iter().find(|b| b.name == *a && b.kind == "render") else {
                                return Err(format!("{step}.asset: {a:?} is not a render step before it"));
                            };
                            if !r.chosen {
                                return Err(format!(
                                    "{step}.asset: {a:?} renders every seed; name a render of the chosen one"
                                ));
                            }
                        }
                        None if task.needs_asset() => {
                            return Err(format!(
                                "{step}.asset: a {task} step needs the render step whose asset it takes"
                            ));
                        }
                        None => {}
                    }
                    unused("tier", s.tier.is_some())?;
                    unused("chosen", s.chosen)?;
                }
                other => return Err(format!("{step}.kind: {other:?} is not render, approve or device")),
            }
        }
        Ok(())
    }
}

/// `[scheduler.costs]`: a render costs the device time it took on its worker, times its tier's
/// weight, in device-seconds; a token's budget (`kiln token create --budget`) is counted in these.
/// A cache hit costs nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CostsConfig {
    /// The weight of a second of a preview render.
    pub preview_weight: f64,
    /// Of a final render.
    pub final_weight: f64,
    /// Of a print render: it holds the farm's largest slots longest.
    pub print_weight: f64,
    /// What a render is estimated to take, seconds, before the farm has rendered anything of its
    /// tier to go by.
    pub first_estimate_seconds: f64,
}

impl Default for CostsConfig {
    fn default() -> Self {
        CostsConfig { preview_weight: 1.0, final_weight: 1.0, print_weight: 2.0, first_estimate_seconds: 2.0 }
    }
}

impl CostsConfig {
    /// A tier's weight.
    pub fn weight(&self, tier: Tier) -> f64 {
        match tier {
            Tier::Preview => self.preview_weight,
            Tier::Final => self.final_weight,
            Tier::Print => self.print_weight,
        }
    }
}

/// `[scheduler.tiles]`: a print-tier job, and a job of any tier over `over_pixels`, is cut into
/// tiles (full-width strips of rows) that the workers of its tier share, each cached by its own
/// key; the scheduler stitches their rows into the one PNG, byte for byte the whole render's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TilesConfig {
    /// Pixels a tile holds, at most (a strip of whole rows, the last shorter).
    pub tile_pixels: u64,
    /// Tiles a print is cut into, at least (however small), so that this many workers share it.
    pub print_min_tiles: u32,
    /// A job of another tier is cut up when it has more pixels than this; 0 never.
    pub over_pixels: u64,
}

impl Default for TilesConfig {
    fn default() -> Self {
        TilesConfig { tile_pixels: 4 << 20, print_min_tiles: 4, over_pixels: 0 }
    }
}

impl TilesConfig {
    /// The tiles `req` is cut into: none for a job rendered whole (not a print, or not over
    /// `over_pixels`, or too small to cut). Each starts on a thumbnail row (the image's
    /// [`kiln_worker::render::Plan`] factor), so a tile's thumbnail rows are the image's.
    pub fn tiles(&self, req: &kiln_protocol::RenderRequest) -> Vec<kiln_protocol::Tile> {
        let pixels = u64::from(req.width) * u64::from(req.height);
        let cut =
            req.tile.is_none() && (req.tier == Tier::Print || (self.over_pixels > 0 && pixels > self.over_pixels));
        if !cut {
            return vec![];
        }
        let least = if req.tier == Tier::Print { self.print_min_tiles.max(1) } else { 2 };
        let f = kiln_worker::render::Plan::new(req.width, req.height, 1, 1).thumb_factor;
        let units = req.height.div_ceil(f);
        let by_size = u32::try_from(pixels.div_ceil(self.tile_pixels.max(1))).unwrap_or(u32::MAX);
        let n = by_size.max(least).min(units);
        let rows = units.div_ceil(n.max(1)) * f;
        let tiles: Vec<kiln_protocol::Tile> = (0..req.height)
            .step_by(rows as usize)
            .map(|y0| kiln_protocol::Tile { y0, rows: rows.min(req.height - y0) })
            .collect();
        if tiles.len() < 2 { vec![] } else { tiles }
    }
}

/// `[scheduler.orders]`: how the conductor runs orders' steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrdersConfig {
    /// Attempts of a step before it fails the order (and raises an incident); a render step's
    /// jobs retry on their own first (`scheduler.retry`).
    pub step_attempts: u32,
    /// First wait before a device step tries again, seconds; it doubles with each attempt.
    pub retry_base_seconds: u64,
    /// How long a print step waits for a ready printer (one out of media, say) before it raises
    /// an incident and fails the order, seconds.
    pub printer_wait_seconds: u64,
    /// The lights scene set for photographing a print (`gallery-print`'s `lights` step).
    pub photo_scene: u16,
    /// Its brightness.
    pub photo_brightness: u16,
}

impl Default for OrdersConfig {
    fn default() -> Self {
        OrdersConfig {
            step_attempts: 3,
            retry_base_seconds: 5,
            printer_wait_seconds: 3600,
            photo_scene: 2,
            photo_brightness: 640,
        }
    }
}

/// `[scheduler.retention]`: a background task deletes what is older than these ages. Off (0)
/// unless set: a studio's pictures are kept until it says otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Jobs that ended this many days ago, with their events, and device tasks likewise; 0 keeps
    /// them all.
    pub jobs_days: u64,
    /// Assets (PNGs, thumbnails, provenance, photos) made this many days ago that no job or device
    /// task left names; 0 keeps them all.
    pub assets_days: u64,
    /// How often it runs, seconds.
    pub interval_seconds: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig { jobs_days: 0, assets_days: 0, interval_seconds: 3600 }
    }
}

/// `[scheduler.tls]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// A PEM certificate chain: with `key_file`, the API serves HTTPS only [env KILN_TLS_CERT_FILE].
    pub cert_file: Option<std::path::PathBuf>,
    /// The PEM private key of `cert_file` [env KILN_TLS_KEY_FILE].
    pub key_file: Option<std::path::PathBuf>,
    /// PEM CA certificates to trust besides the system's, for `amqps://` and `mqtts://` (a farm
    /// whose brokers' certificates its own CA signed) [env KILN_TLS_CA_FILE].
    pub ca_file: Option<std::path::PathBuf>,
}

/// `[scheduler.fleet]`: the bridge to the edge agents over MQTT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// `mqtt://host:port` of the broker the agents use, with the bridge's login as
    /// `mqtt://user:password@host:port` when the broker asks for one (shown with the password as
    /// `***`); unset runs no fleet bridge (`kiln up` embeds a broker and sets it) [env KILN_MQTT_URL].
    pub mqtt_url: Option<SecretUrl>,
    /// The topic prefix [env KILN_MQTT_PREFIX].
    pub prefix: String,
    /// The scheduler's MQTT keepalive, seconds.
    pub keepalive_seconds: u64,
    /// A task sent but not accepted within this is sent again.
    pub resend_after_seconds: u64,
    /// Sends of a task without an answer before it fails.
    pub max_sends: u32,
    /// The deadline of a task created without one, seconds from its creation.
    pub default_deadline_seconds: u64,
    /// How long past its deadline an accepted task may run before it is timed out.
    pub run_grace_seconds: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            mqtt_url: None,
            prefix: "kiln".into(),
            keepalive_seconds: 5,
            resend_after_seconds: 10,
            max_sends: 5,
            default_deadline_seconds: 3600,
            run_grace_seconds: 120,
        }
    }
}

/// `[scheduler.broker]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `amqp://…`; unset runs the embedded in-process workers [env KILN_AMQP_URL].
    pub amqp_url: Option<SecretUrl>,
    /// The prefix of exchange and queue names [env KILN_AMQP_PREFIX].
    pub prefix: String,
    /// Outbox messages published ahead of their confirms.
    pub window: u32,
    /// A worker unheard for this long (or for three of its beats, where that is longer) is shown
    /// as lost.
    pub lost_after_seconds: u64,
    /// A job dispatched this long ago and not started while its tier's queue holds no ready
    /// message has lost its message (purged, or lost by the broker): it is retried, or failed
    /// with the reason once its attempts are spent. 0 turns the check off.
    pub redispatch_after_seconds: u64,
    /// A job that fails on this many distinct workers is quarantined (failed for good: the
    /// job, not the workers, is at fault).
    pub quarantine_after_workers: u32,
    /// A worker that fails this many distinct jobs within `drain_window_seconds` is drained
    /// (it takes no work until the operator resumes it: the worker is at fault).
    pub drain_after_jobs: u32,
    /// The window for `drain_after_jobs`.
    pub drain_window_seconds: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            amqp_url: None,
            prefix: "kiln".into(),
            window: 512,
            lost_after_seconds: 30,
            redispatch_after_seconds: 300,
            quarantine_after_workers: 3,
            drain_after_jobs: 5,
            drain_window_seconds: 600,
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            workers: 2,
            worker_tiers: Tier::ALL.to_vec(),
            public_assets: false,
            shutdown_grace_seconds: 30,
            limits: Limits::default(),
            retry: RetryPolicy::default(),
            database_url: None,
            broker: BrokerConfig::default(),
            fleet: FleetConfig::default(),
            tls: TlsConfig::default(),
            retention: RetentionConfig::default(),
            orders: OrdersConfig::default(),
            costs: CostsConfig::default(),
            tiles: TilesConfig::default(),
            plans: Vec::new(),
        }
    }
}

/// The variables that set a key [`FarmConfig::validate`] checks: a value out of range that came
/// from one is refused naming it, not only the key it set.
const ENV_KEYS: [(&str, &str); 5] = [
    ("scheduler.listen", "KILN_LISTEN"),
    ("scheduler.workers", "KILN_WORKERS"),
    ("scheduler.retry.max_attempts", "KILN_MAX_ATTEMPTS"),
    ("scheduler.limits.max_body_bytes", "KILN_MAX_BODY_BYTES"),
    ("scheduler.database_url", "KILN_DATABASE_URL"),
];

fn from_env(e: ConfigError, env: &dyn Fn(&str) -> Option<String>) -> ConfigError {
    match e {
        ConfigError::Invalid { key, message } => {
            let var = ENV_KEYS.iter().find(|(k, _)| *k == key).map(|(_, var)| *var);
            match var.and_then(|var| env(var).map(|value| (var, value))) {
                Some((var, value)) => ConfigError::Env { key: var, value, message: format!("{key}: {message}") },
                None => ConfigError::Invalid { key, message },
            }
        }
        e => e,
    }
}

/// The whole farm's settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FarmConfig {
    /// The worker's settings (data dir, backend, tiers...).
    pub worker: WorkerConfig,
    /// The scheduler's.
    pub scheduler: SchedulerConfig,
}

impl FarmConfig {
    /// Loads defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with(file, &|k| std::env::var(k).ok())
    }

    /// The config a binary runs with: defaults < its `--config` file < the environment, with its
    /// `--data-dir` on top.
    pub fn load_for(global: &kiln_common::GlobalArgs) -> Result<Self, ConfigError> {
        let mut cfg = Self::load(global.config.as_deref())?;
        if let Some(d) = &global.data_dir {
            cfg.worker.data_dir = d.clone();
        }
        Ok(cfg)
    }

    /// [`Self::load`] with an explicit environment (for tests).
    pub fn load_with(file: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut cfg = FarmConfig::default();
        if let Some(path) = file {
            let mut table = read_toml(path)?;
            if let Some(s) = table.remove("scheduler") {
                cfg.scheduler = s.try_into().map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: path.into(),
                    message: format!("in [scheduler]: {e}"),
                })?;
            }
            if let Some(p) = table.remove("plans") {
                let wrapped = toml::Table::from_iter([("plans".to_owned(), p)]);
                #[derive(Deserialize)]
                struct Plans {
                    plans: Vec<PlanConfig>,
                }
                let plans: Plans = toml::Value::Table(wrapped).try_into().map_err(|e: toml::de::Error| {
                    ConfigError::Parse { path: path.into(), message: format!("in [[plans]]: {e}") }
                })?;
                cfg.scheduler.plans = plans.plans;
            }
            cfg.worker = WorkerConfig::from_table(table, path)?;
        }
        cfg.worker.apply_env(env)?;
        let s = &mut cfg.scheduler;
        if let Some(v) = env("KILN_LISTEN") {
            s.listen = v.trim().parse().map_err(|e: std::net::AddrParseError| ConfigError::Env {
                key: "KILN_LISTEN",
                value: v.clone(),
                message: format!("{e}; expected HOST:PORT, e.g. 127.0.0.1:7878"),
            })?;
        }
        s.workers = env_parse("KILN_WORKERS", env)?.unwrap_or(s.workers);
        if let Some(v) = env("KILN_DATABASE_URL").filter(|v| !v.is_empty()) {
            s.database_url = Some(v.into());
        }
        if let Some(v) = env("KILN_AMQP_URL").filter(|v| !v.is_empty()) {
            s.broker.amqp_url = Some(v.into());
        }
        if let Some(v) = env("KILN_MQTT_URL").filter(|v| !v.is_empty()) {
            s.fleet.mqtt_url = Some(v.into());
        }
        if let Some(v) = env("KILN_MQTT_PREFIX").filter(|v| !v.is_empty()) {
            s.fleet.prefix = v;
        }
        if let Some(v) = env("KILN_AMQP_PREFIX").filter(|v| !v.is_empty()) {
            s.broker.prefix = v;
        }
        s.public_assets = env_parse("KILN_PUBLIC_ASSETS", env)?.unwrap_or(s.public_assets);
        for (key, field) in [
            ("KILN_TLS_CERT_FILE", &mut s.tls.cert_file),
            ("KILN_TLS_KEY_FILE", &mut s.tls.key_file),
            ("KILN_TLS_CA_FILE", &mut s.tls.ca_file),
        ] {
            if let Some(v) = env(key).filter(|v| !v.is_empty()) {
                *field = Some(v.into());
            }
        }
        s.retry.max_attempts = env_parse("KILN_MAX_ATTEMPTS", env)?.unwrap_or(s.retry.max_attempts);
        s.limits.max_body_bytes = env_parse("KILN_MAX_BODY_BYTES", env)?.unwrap_or(s.limits.max_body_bytes);
        cfg.validate().map_err(|e| from_env(e, env))?;
        Ok(cfg)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.scheduler;
        let bad = |key, message: String| Err(ConfigError::Invalid { key, message });
        if s.workers == 0 || s.workers > 256 {
            return bad("scheduler.workers", format!("{} is outside 1..=256", s.workers));
        }
        if s.worker_tiers.is_empty() {
            return bad("scheduler.worker_tiers", "must name at least one tier".into());
        }
        if s.tls.cert_file.is_some() != s.tls.key_file.is_some() {
            let missing = if s.tls.cert_file.is_some() { "scheduler.tls.key_file" } else { "scheduler.tls.cert_file" };
            return bad(missing, "HTTPS needs both cert_file and key_file".into());
        }
        if s.retry.max_attempts == 0 {
            return bad("scheduler.retry.max_attempts", "must be at least 1".into());
        }
        let l = &s.limits;
        for (key, v) in [
            ("scheduler.limits.header_read_timeout_seconds", l.header_read_timeout_seconds),
            ("scheduler.limits.max_connections", l.max_connections as u64),
            ("scheduler.limits.request_timeout_seconds", l.request_timeout_seconds),
            ("scheduler.limits.upload_timeout_seconds", l.upload_timeout_seconds),
            ("scheduler.limits.max_event_streams_per_token", l.max_event_streams_per_token as u64),
            ("scheduler.retention.interval_seconds", s.retention.interval_seconds),
            ("scheduler.orders.step_attempts", u64::from(s.orders.step_attempts)),
            ("scheduler.orders.printer_wait_seconds", s.orders.printer_wait_seconds),
            ("scheduler.tiles.tile_pixels", s.tiles.tile_pixels),
            ("scheduler.tiles.print_min_tiles", u64::from(s.tiles.print_min_tiles)),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        for (i, plan) in s.plans.iter().enumerate() {
            plan.check(i, &s.plans[..i]).map_err(|message| ConfigError::Invalid { key: "plans", message })?;
        }
        let c = &s.costs;
        for (key, v) in [
            ("scheduler.costs.preview_weight", c.preview_weight),
            ("scheduler.costs.final_weight", c.final_weight),
            ("scheduler.costs.print_weight", c.print_weight),
            ("scheduler.costs.first_estimate_seconds", c.first_estimate_seconds),
        ] {
            if !(0.0..=1e6).contains(&v) {
                return bad(key, format!("{v} is outside 0..=1000000"));
            }
        }
        if s.limits.max_body_bytes < 1024 {
            return bad(
                "scheduler.limits.max_body_bytes",
                format!("{} is below the minimum of 1024", s.limits.max_body_bytes),
            );
        }
        if let Some(url) = &s.database_url
            && !["sqlite:", "postgres://", "postgresql://"].iter().any(|p| url.expose().starts_with(p))
        {
            return bad("scheduler.database_url", format!("{url:?}: expected sqlite://PATH or postgres://…"));
        }
        if let Some(url) = &s.broker.amqp_url
            && !url.expose().starts_with("amqp://")
            && !url.expose().starts_with("amqps://")
        {
            return bad("scheduler.broker.amqp_url", format!("{url:?}: expected amqp://…"));
        }
        if let Some(url) = &s.fleet.mqtt_url
            && let Err(e) = kiln_protocol::fleet::MqttEndpoint::parse(url.expose())
        {
            return bad("scheduler.fleet.mqtt_url", e);
        }
        if s.fleet.keepalive_seconds == 0 || s.fleet.max_sends == 0 || s.fleet.resend_after_seconds == 0 {
            return bad(
                "scheduler.fleet",
                "keepalive_seconds, resend_after_seconds and max_sends must be at least 1".into(),
            );
        }
        if !kiln_protocol::fleet::valid_id(&s.fleet.prefix.replace('/', "_")) {
            return bad("scheduler.fleet.prefix", format!("{:?}: use letters, digits, - _ . and /", s.fleet.prefix));
        }
        if s.broker.window == 0 {
            return bad("scheduler.broker.window", "must be at least 1".into());
        }
        if s.broker.quarantine_after_workers < 2 {
            return bad("scheduler.broker.quarantine_after_workers", "must be at least 2 (distinct workers)".into());
        }
        if s.broker.drain_after_jobs < 2 {
            return bad("scheduler.broker.drain_after_jobs", "must be at least 2 (distinct jobs)".into());
        }
        if s.limits.max_jobs_per_request == 0 || s.limits.max_page == 0 {
            return bad("scheduler.limits", "max_jobs_per_request and max_page must be at least 1".into());
        }
        Ok(())
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.worker.data_dir
    }

    /// Where the operator token is kept.
    pub fn token_path(&self) -> PathBuf {
        self.worker.data_dir.join("operator.token")
    }

    /// The effective configuration as TOML (`--print-config`).
    pub fn to_toml(&self) -> String {
        let mut out = self.worker.to_toml();
        let mut wrapped = toml::Table::new();
        match toml::Value::try_from(&self.scheduler) {
            Ok(v) => {
                wrapped.insert("scheduler".into(), v);
                out.push('\n');
                out.push_str(&toml::to_string_pretty(&wrapped).unwrap_or_default());
            }
            Err(e) => out.push_str(&format!("# cannot print [scheduler]: {e}\n")),
        }
        if !self.scheduler.plans.is_empty() {
            let mut plans = toml::Table::new();
            match toml::Value::try_from(&self.scheduler.plans) {
                Ok(v) => {
                    plans.insert("plans".into(), v);
                    out.push('\n');
                    out.push_str(&toml::to_string_pretty(&plans).unwrap_or_default());
                }
                Err(e) => out.push_str(&format!("# cannot print [[plans]]: {e}\n")),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_sets_both_sections_and_the_environment_wins() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("kiln.toml");
        std::fs::write(
            &f,
            "threads = 1\n[scheduler]\nworkers = 3\nlisten = \"127.0.0.1:9000\"\n[scheduler.retry]\nmax_attempts = 2\n",
        )
        .unwrap();
        let cfg = FarmConfig::load_with(Some(&f), &|k| (k == "KILN_WORKERS").then(|| "5".to_owned())).unwrap();
        assert_eq!(cfg.worker.threads, 1);
        assert_eq!(cfg.scheduler.workers, 5);
        assert_eq!(cfg.scheduler.listen.port(), 9000);
        assert_eq!(cfg.scheduler.retry.max_attempts, 2);
        let again = FarmConfig::load_with(None, &|_| None).unwrap();
        assert_eq!(again.scheduler, SchedulerConfig::default());
    }

    #[test]
    fn bad_values_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("kiln.toml");
        std::fs::write(&f, "[scheduler]\nworkerz = 3\n").unwrap();
        let e = FarmConfig::load_with(Some(&f), &|_| None).unwrap_err().to_string();
        assert!(e.contains("workerz") && e.contains("[scheduler]"), "{e}");
        let e = FarmConfig::load_with(None, &|k| (k == "KILN_LISTEN").then(|| "localhost".to_owned())).unwrap_err();
        assert!(e.to_string().contains("KILN_LISTEN"), "{e}");
        let e = FarmConfig::load_with(None, &|k| (k == "KILN_WORKERS").then(|| "0".to_owned())).unwrap_err();
        assert!(e.to_string().contains("scheduler.workers"), "{e}");
    }

    #[test]
    fn the_printed_config_loads_back_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = FarmConfig::load_with(None, &|_| None).unwrap();
        let f = dir.path().join("printed.toml");
        std::fs::write(&f, cfg.to_toml()).unwrap();
        assert_eq!(FarmConfig::load_with(Some(&f), &|_| None).unwrap(), cfg);
    }

    /// A plan written in the config: preview every seed, pick one, render it final, show it.
    const PLAN: &str = "[[plans]]\nname = \"pick-and-show\"\n\
        [[plans.steps]]\nname = \"preview\"\nkind = \"render\"\ntier = \"preview\"\n\
        [[plans.steps]]\nname = \"pick\"\nkind = \"approve\"\n\
        [[plans.steps]]\nname = \"final\"\nkind = \"render\"\ntier = \"final\"\nchosen = true\n\
        [[plans.steps]]\nname = \"show\"\nkind = \"device\"\ntask = \"display\"\nasset = \"final\"\n";

    #[test]
    fn plans_in_the_config_are_read_printed_and_checked_naming_plan_and_step() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("kiln.toml");
        std::fs::write(&f, PLAN).unwrap();
        let cfg = FarmConfig::load_with(Some(&f), &|_| None).unwrap();
        let plan = &cfg.scheduler.plans[0];
        assert_eq!((plan.name.as_str(), plan.steps.len()), ("pick-and-show", 4));
        assert!(plan.steps[2].chosen && plan.steps[3].asset.as_deref() == Some("final"));
        let printed = dir.path().join("printed.toml");
        std::fs::write(&printed, cfg.to_toml()).unwrap();
        assert_eq!(FarmConfig::load_with(Some(&printed), &|_| None).unwrap(), cfg, "printed, it loads back the same");
        for (change, want) in [
            (("name = \"pick\"", "name = \"pick.me\""), "plans[0] (\"pick-and-show\").steps[1] (\"pick.me\").name:"),
            (
                ("asset = \"final\"", "asset = \"finale\""),
                ".steps[3] (\"show\").asset: \"finale\" is not a render step",
            ),
            (
                ("asset = \"final\"", "asset = \"preview\""),
                ".steps[3] (\"show\").asset: \"preview\" renders every seed",
            ),
            (("task = \"display\"", "task = \"dance\""), ".steps[3] (\"show\").task: unknown task kind \"dance\""),
            (
                ("task = \"display\"\nasset = \"final\"", "task = \"display\""),
                ".steps[3] (\"show\").asset: a display step needs",
            ),
            (("kind = \"approve\"", "kind = \"wait\""), ".steps[1] (\"pick\").kind: \"wait\" is not render"),
            (("chosen = true\n", ""), ".steps[3] (\"show\").asset: \"final\" renders every seed"),
            (("tier = \"preview\"\n", ""), ".steps[0] (\"preview\").tier: a render step needs one"),
            (
                ("name = \"pick-and-show\"", "name = \"gallery-print\""),
                "plans[0] (\"gallery-print\").name: \"gallery-print\" is taken",
            ),
        ] {
            std::fs::write(&f, PLAN.replacen(change.0, change.1, 1)).unwrap();
            let e = FarmConfig::load_with(Some(&f), &|_| None).unwrap_err().to_string();
            assert!(e.starts_with("plans: ") && e.contains(want), "{change:?}: {e}");
        }
        // A chosen render with no approval before it.
        std::fs::write(&f, PLAN.replacen("kind = \"approve\"", "kind = \"render\"\ntier = \"final\"", 1)).unwrap();
        let e = FarmConfig::load_with(Some(&f), &|_| None).unwrap_err().to_string();
        assert!(e.contains(".steps[2] (\"final\").chosen: no approve step"), "{e}");
        // A key no step has is named by the parser.
        std::fs::write(&f, PLAN.replacen("chosen = true", "chosen = true\ncolour = 3", 1)).unwrap();
        let e = FarmConfig::load_with(Some(&f), &|_| None).unwrap_err().to_string();
        assert!(e.contains("[[plans]]") && e.contains("colour"), "{e}");
    }
}
