//! The daemon's settings: `[run]` in the worker's config file, under `KILN_*` overrides and its
//! flags; errors name the key.

use kiln_common::host_name;
use kiln_protocol::{SecretUrl, Tier};
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// The daemon's settings (`[run]` in the worker's config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// The broker [env KILN_AMQP_URL].
    pub amqp_url: SecretUrl,
    /// The prefix of the exchange and queue names [env KILN_AMQP_PREFIX].
    pub amqp_prefix: String,
    /// The tiers this worker serves [env KILN_WORKER_TIERS, comma separated].
    pub tiers: Vec<Tier>,
    /// Unacked deliveries the broker may hand this worker per tier [env KILN_PREFETCH].
    pub prefetch: u16,
    /// Renders at once [env KILN_CONCURRENCY].
    pub concurrency: usize,
    /// The scheduler's URL, for asset uploads [env KILN_SCHEDULER_URL].
    pub scheduler_url: String,
    /// A `worker` token [env KILN_WORKER_TOKEN]: it signs the results and heartbeats and uploads the assets; never printed.
    #[serde(skip_serializing)]
    pub token: Option<String>,
    /// The asset folder is shared with the scheduler (no upload) [env KILN_SHARED_ASSETS].
    pub shared_assets: bool,
    /// An asset no larger than this many bytes (and its own thumbnail) travels inside its result
    /// message instead of being uploaded; 0 uploads every asset. Each asset's provenance travels
    /// with its result either way. At most 64 KiB [env KILN_INLINE_ASSET_BYTES].
    pub inline_asset_bytes: u64,
    /// Seconds between heartbeats. The scheduler shows a worker lost after its
    /// `lost_after_seconds` or three of these, whichever is longer [env KILN_HEARTBEAT_SECONDS].
    pub heartbeat_seconds: u64,
    /// Seconds a drain waits for renders in hand before handing them back.
    pub grace_seconds: u64,
    /// How many times a job message may be delivered to workers (this one or any other) without
    /// being settled before this worker dead-letters it instead of rendering it: a render that
    /// kills its worker (a crash hands the message back unacked) stops there. Classic priority
    /// queues count no deliveries, so the workers count them in the message's
    /// `x-kiln-deliveries` header [env KILN_DELIVERY_LIMIT].
    pub delivery_limit: u32,
    /// This worker's id [default: host-pid; env KILN_WORKER_ID].
    pub worker_id: Option<String>,
    /// Where to serve `/metrics` and `/healthz`, e.g. `0.0.0.0:9464` [default: off; env
    /// KILN_METRICS_LISTEN].
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            amqp_prefix: "kiln".into(),
            tiers: Tier::ALL.to_vec(),
            prefetch: 32,
            concurrency: 1,
            scheduler_url: "http://127.0.0.1:7878".into(),
            token: None,
            shared_assets: false,
            inline_asset_bytes: 32 << 10,
            heartbeat_seconds: 5,
            grace_seconds: 30,
            delivery_limit: 5,
            worker_id: None,
            metrics_listen: None,
        }
    }
}

impl RunConfig {
    /// Applies the `KILN_*` overrides and checks the result; errors name the key.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        use crate::config::env_parse;
        if let Some(v) = env("KILN_AMQP_URL") {
            self.amqp_url = v.into();
        }
        if let Some(v) = env("KILN_AMQP_PREFIX") {
            self.amqp_prefix = v;
        }
        if let Some(v) = env("KILN_WORKER_TIERS") {
            self.tiers = v
                .split(',')
                .filter(|t| !t.trim().is_empty())
                .map(|t| t.trim().parse())
                .collect::<Result<_, _>>()
                .map_err(|e: kiln_protocol::RequestError| ConfigError::Env {
                    key: "KILN_WORKER_TIERS",
                    value: v.clone(),
                    message: e.to_string(),
                })?;
        }
        if let Some(v) = env("KILN_SCHEDULER_URL") {
            self.scheduler_url = v;
        }
        if let Some(v) = env("KILN_WORKER_TOKEN").filter(|v| !v.is_empty()) {
            self.token = Some(v);
        }
        if let Some(v) = env("KILN_WORKER_ID").filter(|v| !v.is_empty()) {
            self.worker_id = Some(v);
        }
        self.prefetch = env_parse("KILN_PREFETCH", env)?.unwrap_or(self.prefetch);
        self.concurrency = env_parse("KILN_CONCURRENCY", env)?.unwrap_or(self.concurrency);
        self.shared_assets = env_parse("KILN_SHARED_ASSETS", env)?.unwrap_or(self.shared_assets);
        self.inline_asset_bytes = env_parse("KILN_INLINE_ASSET_BYTES", env)?.unwrap_or(self.inline_asset_bytes);
        self.heartbeat_seconds = env_parse("KILN_HEARTBEAT_SECONDS", env)?.unwrap_or(self.heartbeat_seconds);
        self.delivery_limit = env_parse("KILN_DELIVERY_LIMIT", env)?.unwrap_or(self.delivery_limit);
        self.metrics_listen = env_parse("KILN_METRICS_LISTEN", env)?.or(self.metrics_listen);
        self.validate()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, message: String| Err(ConfigError::Invalid { key, message });
        let url = self.amqp_url.expose();
        if !url.starts_with("amqp://") && !url.starts_with("amqps://") {
            return bad("run.amqp_url", format!("{:?} is not an amqp:// URL", self.amqp_url));
        }
        if self.amqp_prefix.is_empty()
            || !self.amqp_prefix.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return bad("run.amqp_prefix", format!("{:?} must be letters, digits, '-', '_' or '.'", self.amqp_prefix));
        }
        if self.tiers.is_empty() {
            return bad("run.tiers", "must name at least one tier".into());
        }
        if self.prefetch == 0 {
            return bad("run.prefetch", "must be at least 1".into());
        }
        if self.concurrency == 0 || self.concurrency > 256 {
            return bad("run.concurrency", format!("{} is outside 1..=256", self.concurrency));
        }
        if self.inline_asset_bytes > MAX_INLINE_ASSET_BYTES {
            return bad(
                "run.inline_asset_bytes",
                format!(
                    "{} is over {MAX_INLINE_ASSET_BYTES} (64 KiB); larger assets are uploaded",
                    self.inline_asset_bytes
                ),
            );
        }
        if self.heartbeat_seconds == 0 {
            return bad("run.heartbeat_seconds", "must be at least 1".into());
        }
        if self.delivery_limit == 0 {
            return bad("run.delivery_limit", "must be at least 1 (the first delivery)".into());
        }
        if self.token.is_none() {
            return bad("run.token", TOKEN_NEEDED.into());
        }
        Ok(())
    }

    /// This worker's id.
    pub fn id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| format!("{}-{}", host_name(), std::process::id()))
    }
}

/// Why a worker needs its token.
pub const TOKEN_NEEDED: &str = "a worker token is needed: it signs this worker's results and heartbeats, which the scheduler takes from no one else, and uploads its assets (KILN_WORKER_TOKEN; make one with `kiln token create --role worker --name NAME`)";

/// The most `run.inline_asset_bytes` may be: what a render holds in memory before it writes
/// the PNG to a file. A full result batch of such assets is about 11 MiB.
const MAX_INLINE_ASSET_BYTES: u64 = crate::assets::SPILL_BYTES as u64;

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn the_inline_asset_limit_comes_from_the_environment_and_is_bounded() {
        let mut run = RunConfig { token: Some("t".into()), ..RunConfig::default() };
        assert_eq!(run.inline_asset_bytes, 32 << 10);
        run.apply_env(&env(&[("KILN_INLINE_ASSET_BYTES", "0")])).unwrap();
        assert_eq!(run.inline_asset_bytes, 0, "0 uploads every asset");
        let e = run.apply_env(&env(&[("KILN_INLINE_ASSET_BYTES", "65537")])).unwrap_err().to_string();
        assert!(e.contains("run.inline_asset_bytes") && e.contains("64 KiB"), "{e}");
        let e = run.apply_env(&env(&[("KILN_INLINE_ASSET_BYTES", "lots")])).unwrap_err().to_string();
        assert!(e.contains("KILN_INLINE_ASSET_BYTES"), "{e}");
        let e = toml::from_str::<RunConfig>("inline_asset_bytes = -1").unwrap_err().to_string();
        assert!(e.contains("inline_asset_bytes"), "{e}");
    }

    #[test]
    fn the_heartbeat_period_comes_from_the_environment_and_is_at_least_a_second() {
        let mut run = RunConfig { token: Some("t".into()), ..RunConfig::default() };
        assert_eq!(run.heartbeat_seconds, 5);
        run.apply_env(&env(&[("KILN_HEARTBEAT_SECONDS", "1")])).unwrap();
        assert_eq!(run.heartbeat_seconds, 1);
        let e = run.apply_env(&env(&[("KILN_HEARTBEAT_SECONDS", "0")])).unwrap_err().to_string();
        assert!(e.contains("heartbeat_seconds") && e.contains("at least 1"), "{e}");
        let e = run.apply_env(&env(&[("KILN_HEARTBEAT_SECONDS", "often")])).unwrap_err().to_string();
        assert!(e.contains("KILN_HEARTBEAT_SECONDS"), "{e}");
    }

    #[test]
    fn the_delivery_limit_comes_from_the_environment_and_is_at_least_one() {
        let mut run = RunConfig { token: Some("t".into()), ..RunConfig::default() };
        assert_eq!(run.delivery_limit, 5);
        run.apply_env(&env(&[("KILN_DELIVERY_LIMIT", "2")])).unwrap();
        assert_eq!(run.delivery_limit, 2);
        let e = run.apply_env(&env(&[("KILN_DELIVERY_LIMIT", "0")])).unwrap_err().to_string();
        assert!(e.contains("run.delivery_limit") && e.contains("at least 1"), "{e}");
        let e = run.apply_env(&env(&[("KILN_DELIVERY_LIMIT", "-1")])).unwrap_err().to_string();
        assert!(e.contains("KILN_DELIVERY_LIMIT"), "{e}");
    }

    #[test]
    fn a_worker_needs_its_token_even_with_a_shared_asset_store() {
        let mut run = RunConfig { shared_assets: true, ..RunConfig::default() };
        let e = run.apply_env(&env(&[])).unwrap_err().to_string();
        assert!(e.contains("run.token") && e.contains("signs this worker's results"), "{e}");
        run.apply_env(&env(&[("KILN_WORKER_TOKEN", "kiln_x")])).unwrap();
    }
}
