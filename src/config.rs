//! Typed settings: the embedded `config/default.toml`, then an optional `--config` file, then
//! `QUANTD_*` environment variables (`__` separates sections). Validated once at start-up so
//! the rest of the program can trust every field.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

/// The defaults shipped inside the binary, so `quantd serve` works from any directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// Empty: SQLite in `data_dir` (one process). `postgres://...`: PostgreSQL, shared by any
    /// number of replicas.
    pub database_url: String,
    /// Empty: blobs in `data_dir`. `s3://bucket/prefix`: in an S3-compatible object store,
    /// configured by the standard `AWS_*` variables.
    pub storage_url: String,
    /// With `storage_url`: where this replica keeps local copies (empty: `data_dir`).
    pub cache_dir: PathBuf,
    /// With `storage_url`: the most the local copies may take, in bytes (0: no limit).
    pub cache_max_bytes: u64,
    pub role: Role,
    pub log_format: LogFormat,
    pub server: ServerSettings,
    pub auth: AuthSettings,
    pub limits: LimitSettings,
    pub jobs: JobSettings,
    pub engine: EngineSettings,
}

/// What one `quantd serve` process does (several replicas on one PostgreSQL split the work).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The API, inference and job workers: the single-node service.
    All,
    /// The API and inference; jobs are queued for worker replicas.
    Api,
    /// Job workers; HTTP answers only /health, /ready and /metrics.
    Worker,
}

impl Role {
    pub fn serves_api(self) -> bool {
        self != Role::Worker
    }

    pub fn runs_jobs(self) -> bool {
        self != Role::Api
    }
}

/// How `quantd serve` writes its log lines to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (coloured only when stdout is a terminal).
    Text,
    /// One JSON object a line, for log shippers; span fields (`request_id`, `job_id`) included.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub host: IpAddr,
    pub port: u16,
    /// Names besides loopback ones (and `host`) that a server without API keys answers to.
    pub allowed_hosts: Vec<String>,
    pub allow_unauthenticated: bool,
    pub request_timeout_secs: u64,
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub admin_keys: Vec<String>,
    pub infer_keys: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    pub max_upload_bytes: u64,
    pub max_json_bytes: usize,
    pub max_safetensors_header_bytes: u64,
    pub max_tokenizer_bytes: u64,
    pub max_small_json_bytes: u64,
    pub max_dataset_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSettings {
    pub workers: usize,
    pub threads: usize,
    pub max_attempts: u32,
    pub progress_interval_ms: u64,
    /// How long a running job stays its worker's without a renewal (seconds).
    pub lease_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSettings {
    pub memory_budget_bytes: u64,
    pub max_batch: usize,
    pub queue_depth: usize,
    pub max_tokens: usize,
    pub max_context: usize,
    pub prefill_chunk: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Parse(#[from] Box<figment::Error>),
    #[error("configuration: {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl Settings {
    /// Layers defaults, the optional file and the environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment.merge(Self::env());
        let settings: Settings = figment.extract().map_err(Box::new)?;
        settings.validate()?;
        Ok(settings)
    }

    /// `QUANTD_*` variables that name a setting (`QUANTD_DATA_DIR`, `QUANTD_SERVER__PORT`, ...).
    /// Others sharing the prefix (the test suite's `QUANTD_FIXTURES`, say) are not settings and
    /// are ignored; a typo inside a section (`QUANTD_SERVER__PROT`) is still refused.
    fn env() -> Env {
        Env::prefixed("QUANTD_")
            .filter(|key| {
                let key = key.as_str().to_ascii_lowercase();
                key == "data_dir"
                    || key == "database_url"
                    || key == "storage_url"
                    || key == "cache_dir"
                    || key == "cache_max_bytes"
                    || key == "role"
                    || key == "log_format"
                    || ["server__", "auth__", "limits__", "jobs__", "engine__"]
                        .iter()
                        .any(|s| key.starts_with(s))
            })
            .split("__")
    }

    /// The embedded defaults alone (tests start from these and adjust fields).
    pub fn defaults() -> Self {
        Figment::from(Toml::string(DEFAULT_TOML))
            .extract()
            .expect("embedded default.toml is valid")
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: &str| {
            Err(ConfigError::Invalid {
                field,
                message: message.to_string(),
            })
        };
        if self.jobs.max_attempts == 0 {
            return invalid("jobs.max_attempts", "must be at least 1");
        }
        if !(1..=3600).contains(&self.jobs.lease_secs) {
            return invalid("jobs.lease_secs", "must be within 1..=3600");
        }
        if !self.database_url.is_empty()
            && !self.database_url.starts_with("postgres://")
            && !self.database_url.starts_with("postgresql://")
        {
            return invalid(
                "database_url",
                "must be empty (SQLite in data_dir) or a postgres:// URL",
            );
        }
        if !self.storage_url.is_empty() && !self.storage_url.starts_with("s3://") {
            return invalid(
                "storage_url",
                "must be empty (blobs in data_dir) or s3://bucket[/prefix]",
            );
        }
        if self.jobs.workers > 64 {
            return invalid("jobs.workers", "must be at most 64");
        }
        let e = &self.engine;
        if e.max_batch == 0 || e.max_batch > 256 {
            return invalid("engine.max_batch", "must be within 1..=256");
        }
        if e.queue_depth == 0 {
            return invalid("engine.queue_depth", "must be at least 1");
        }
        if e.max_tokens == 0 || e.max_context < 2 || e.prefill_chunk == 0 {
            return invalid(
                "engine",
                "max_tokens and prefill_chunk must be at least 1, max_context at least 2",
            );
        }
        if self.limits.max_json_bytes < 1024 {
            return invalid("limits.max_json_bytes", "must be at least 1024");
        }
        if self
            .auth
            .admin_keys
            .iter()
            .chain(&self.auth.infer_keys)
            .any(|k| k.len() < 8)
        {
            return invalid("auth", "API keys must be at least 8 characters long");
        }
        Ok(())
    }

    pub fn bind_addr(&self) -> SocketAddr {
        SocketAddr::new(self.server.host, self.server.port)
    }

    pub fn has_keys(&self) -> bool {
        !self.auth.admin_keys.is_empty() || !self.auth.infer_keys.is_empty()
    }

    /// Job workers: the configured count, or 1 on small machines (quantization saturates the
    /// cores on its own; two jobs at once only thrash the caches).
    pub fn worker_count(&self) -> usize {
        match self.jobs.workers {
            0 if cpu_count() <= 4 => 1,
            0 => 2,
            n => n,
        }
    }

    /// The job lease in milliseconds.
    pub fn lease_ms(&self) -> i64 {
        self.jobs.lease_secs as i64 * 1000
    }

    pub fn job_threads(&self) -> usize {
        match self.jobs.threads {
            0 => cpu_count(),
            n => n,
        }
    }
}

pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_listen_on_loopback_8080() {
        let s = Settings::defaults();
        assert_eq!(s.bind_addr().to_string(), "127.0.0.1:8080");
        assert!(!s.has_keys());
        assert_eq!(s.data_dir, PathBuf::from("./data"));
    }

    #[test]
    fn environment_overrides_nested_fields() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("QUANTD_SERVER__PORT", "9123");
            jail.set_env("QUANTD_AUTH__ADMIN_KEYS", "[\"secret-admin-key\"]");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.server.port, 9123);
            assert_eq!(s.auth.admin_keys, vec!["secret-admin-key".to_string()]);
            Ok(())
        });
    }

    #[test]
    fn unrelated_variables_with_the_prefix_are_ignored_but_typos_in_sections_are_not() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("QUANTD_FIXTURES", "/somewhere");
            Settings::load(None).map_err(|e| e.to_string())?;
            jail.set_env("QUANTD_SERVER__PROT", "1");
            assert!(Settings::load(None).is_err());
            Ok(())
        });
    }

    #[test]
    fn short_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("QUANTD_AUTH__INFER_KEYS", "[\"short\"]");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.contains("at least 8"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn scale_out_settings_are_checked_by_name() {
        for (var, value, field) in [
            ("QUANTD_DATABASE_URL", "mysql://x", "database_url"),
            ("QUANTD_STORAGE_URL", "gs://bucket", "storage_url"),
            ("QUANTD_JOBS__LEASE_SECS", "0", "jobs.lease_secs"),
        ] {
            figment::Jail::expect_with(|jail| {
                jail.set_env(var, value);
                let err = Settings::load(None).unwrap_err().to_string();
                assert!(err.contains(field), "{var}={value}: {err}");
                Ok(())
            });
        }
        figment::Jail::expect_with(|jail| {
            jail.set_env("QUANTD_DATABASE_URL", "postgres://q@db:5432/quantd");
            jail.set_env("QUANTD_STORAGE_URL", "s3://bucket/prefix");
            jail.set_env("QUANTD_ROLE", "worker");
            let s = Settings::load(None).unwrap();
            assert_eq!(s.role, Role::Worker);
            assert_eq!(s.lease_ms(), 30_000);
            Ok(())
        });
    }
}
