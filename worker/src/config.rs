//! Worker configuration: built-in defaults < TOML file < `KILN_*` environment variables.
//! A bad value fails with a message naming its key, before any work starts.

use std::path::{Path, PathBuf};

use kiln_protocol::TierLimits;
use serde::{Deserialize, Serialize};

use crate::render::ModelPath;

/// Which backend to render with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// wgpu on a hardware adapter (and say which), else the CPU: a software adapter such as
    /// lavapipe is slower than the CPU path.
    Auto,
    /// The CPU.
    Cpu,
    /// wgpu; an error if there is no adapter.
    Wgpu,
}

/// The worker's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Where assets, the cache index and the GPU caches live (`KILN_DATA_DIR`).
    pub data_dir: PathBuf,
    /// `auto`, `cpu` or `wgpu` (`KILN_BACKEND`).
    pub backend: BackendChoice,
    /// `fused` or `burn` (`KILN_ENGINE`).
    pub engine: ModelPath,
    /// CPU threads for the model; 0 means every core (`KILN_THREADS`).
    pub threads: usize,
    /// Bytes of rendered PNGs kept in memory by the cache (`KILN_CACHE_BYTES`).
    pub cache_bytes: u64,
    /// Samples per band: bounds a render's memory at about 40 bytes a sample (`KILN_BAND_SAMPLES`).
    pub band_samples: usize,
    /// Tier defaults and limits.
    pub tiers: TierLimits,
}

/// The default data directory: `$XDG_DATA_HOME/kiln`, else `~/.local/share/kiln`, else `./kiln-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("kiln");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/share/kiln"),
        None => PathBuf::from("kiln-data"),
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            data_dir: default_data_dir(),
            backend: BackendChoice::Auto,
            engine: ModelPath::Fused,
            threads: 0,
            cache_bytes: 256 << 20,
            band_samples: 1 << 21,
            tiers: TierLimits::default(),
        }
    }
}

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this config.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key and line.
        message: String,
    },
    /// An environment variable has a bad value.
    #[error("{key}={value:?}: {message}")]
    Env {
        /// The variable.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// A value out of range.
    #[error("{key}: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Reads and parses a TOML config file; errors name the file and, from the parser, the line.
pub fn read_toml(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    text.parse().map_err(|e: toml::de::Error| ConfigError::Parse { path: path.into(), message: e.to_string() })
}

/// A setting from the environment, parsed; the error names the variable.
pub fn env_parse<T: std::str::FromStr>(
    key: &'static str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match lookup(key) {
        None => Ok(None),
        Some(value) => {
            value.trim().parse().map(Some).map_err(|e: T::Err| ConfigError::Env { key, message: e.to_string(), value })
        }
    }
}

/// An enum setting from the environment; the error lists the accepted values.
pub fn env_enum<T: clap::ValueEnum>(
    key: &'static str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<T>, ConfigError> {
    let Some(value) = lookup(key) else { return Ok(None) };
    T::from_str(value.trim(), true).map(Some).map_err(|_| {
        let names: Vec<String> =
            T::value_variants().iter().filter_map(|v| v.to_possible_value()).map(|p| p.get_name().to_owned()).collect();
        ConfigError::Env { key, value, message: format!("expected one of {}", names.join(", ")) }
    })
}

impl WorkerConfig {
    /// Loads defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with(file, &|k| std::env::var(k).ok())
    }

    /// [`Self::load`] with an explicit environment (for tests).
    pub fn load_with(file: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut cfg = match file {
            None => WorkerConfig::default(),
            Some(path) => Self::from_table(read_toml(path)?, path)?,
        };
        cfg.apply_env(env)?;
        Ok(cfg)
    }

    /// The config a parsed TOML table gives (`path` names the file in errors).
    pub fn from_table(table: toml::Table, path: &Path) -> Result<Self, ConfigError> {
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse { path: path.into(), message: e.to_string() })
    }

    /// Applies the `KILN_*` environment on top, then checks the result.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(d) = env("KILN_DATA_DIR").filter(|d| !d.is_empty()) {
            self.data_dir = d.into();
        }
        self.backend = env_enum("KILN_BACKEND", env)?.unwrap_or(self.backend);
        self.engine = env_enum("KILN_ENGINE", env)?.unwrap_or(self.engine);
        self.threads = env_parse("KILN_THREADS", env)?.unwrap_or(self.threads);
        self.cache_bytes = env_parse("KILN_CACHE_BYTES", env)?.unwrap_or(self.cache_bytes);
        self.band_samples = env_parse("KILN_BAND_SAMPLES", env)?.unwrap_or(self.band_samples);
        self.validate()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.band_samples < 4096 {
            return Err(ConfigError::Invalid {
                key: "band_samples",
                message: format!("{} is below the minimum of 4096", self.band_samples),
            });
        }
        for tier in kiln_protocol::Tier::ALL {
            let s = self.tiers.spec(tier);
            if s.default_side == 0 || s.default_side > s.max_side {
                return Err(ConfigError::Invalid {
                    key: "tiers.*.default_side",
                    message: format!(
                        "{tier}: default_side {} must be in 1..=max_side ({})",
                        s.default_side, s.max_side
                    ),
                });
            }
            if s.default_samples == 0 || s.default_samples > s.max_samples {
                return Err(ConfigError::Invalid {
                    key: "tiers.*.default_samples",
                    message: format!(
                        "{tier}: default_samples {} must be in 1..=max_samples ({})",
                        s.default_samples, s.max_samples
                    ),
                });
            }
        }
        Ok(())
    }

    /// Threads to use: the setting, or every core.
    pub fn threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// The effective configuration as TOML (`--print-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print the config: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("w.toml");
        std::fs::write(&f, "threads = 3\nbackend = \"wgpu\"\n[tiers.preview]\ndefault_side = 256\nmax_side = 1024\nmax_pixels = 1048576\ndefault_samples = 1\nmax_samples = 2\nwatermark = true\ndither = false\n").unwrap();
        let cfg = WorkerConfig::load_with(Some(&f), &|k| (k == "KILN_BACKEND").then(|| "cpu".to_owned())).unwrap();
        assert_eq!(cfg.threads, 3);
        assert_eq!(cfg.backend, BackendChoice::Cpu);
        assert_eq!(cfg.tiers.preview.default_side, 256);
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let e = WorkerConfig::load_with(None, &|k| (k == "KILN_THREADS").then(|| "many".to_owned())).unwrap_err();
        assert!(e.to_string().starts_with("KILN_THREADS=\"many\""), "{e}");
        let e = WorkerConfig::load_with(None, &|k| (k == "KILN_BACKEND").then(|| "cuda".to_owned())).unwrap_err();
        assert!(e.to_string().contains("KILN_BACKEND"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("w.toml");
        std::fs::write(&f, "thread = 3\n").unwrap();
        let e = WorkerConfig::load_with(Some(&f), &|_| None).unwrap_err();
        assert!(e.to_string().contains("thread"), "{e}");
    }
}
