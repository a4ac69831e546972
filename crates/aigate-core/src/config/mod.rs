//! Configuration: the TOML file a user writes (`*Config` structs, serde input) and its validation
//! into the runtime [`Settings`] the request path reads.
//!
//! Every struct denies unknown fields, so a typo is an error at start naming the key and line
//! (the `toml` crate reports both). Secrets (gateway tokens, provider keys) are written as
//! `env:NAME` or a path to a file holding the value; they are resolved here, once, and a missing
//! variable or file is reported with the key and the line it was written on. Resolved secrets live
//! in [`Secret`], whose `Debug` never prints the value.
//!
//! Validation is pure apart from the secret lookup, which is injected (`validate_with`) so tests
//! do not have to touch the process environment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::providers::Provider;

mod file;
mod validate;

pub use file::*;

/// The configuration embedded in the binary: what `aigate serve` runs with no `--config`.
pub const EMBEDDED_DEFAULT: &str = r#"
listen = "127.0.0.1:8787"
data_dir = "./aigate-data"
default_gateway = "default"

[gateways.default]

[gateways.default.cache]
enabled = true
"#;

/// Gateway names that would clash with aigate's own routes.
pub const RESERVED_GATEWAY_NAMES: &[&str] = &["v1", "admin", "metrics", "healthz", "readyz", "dashboard"];

/// An error in the configuration, with enough context for a user to find the line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is not valid TOML or does not match the schema (unknown key, wrong type).
    #[error("{0}")]
    Parse(String),
    /// A value is well-formed but not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The file could not be read.
    #[error("cannot read config file {path}: {error}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// Why (shown in the message, not chained again).
        error: std::io::Error,
    },
}

/// A resolved secret. Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Secret(value.into())
    }
    /// The value, for the one place that has to send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Validated settings: what the request path reads.
#[derive(Debug)]
pub struct Settings {
    /// Listen address.
    pub listen: SocketAddr,
    /// Embedded storage directory.
    pub data_dir: PathBuf,
    /// Gateway serving the plain OpenAI layout.
    pub default_gateway: Arc<str>,
    /// Required account id in Cloudflare-layout URLs, if any.
    pub account_id: Option<String>,
    /// Largest request body, bytes.
    pub max_request_body: u64,
    /// Grace period for in-flight requests at shutdown.
    pub shutdown_grace: Duration,
    /// Most client connections served at once.
    pub max_connections: usize,
    /// Connections the listen queue holds before they are accepted.
    pub listen_backlog: u32,
    /// Longest time to receive a request body.
    pub request_body_timeout: Duration,
    /// Longest time to receive a request head.
    pub header_read_timeout: Duration,
    /// Most threads of the runtime's blocking pool.
    pub blocking_threads: usize,
    /// Upstream connection settings.
    pub upstream: UpstreamSettings,
    /// Providers by name (built-in merged with configured).
    pub providers: HashMap<String, Arc<Provider>>,
    /// Gateways by name.
    pub gateways: HashMap<String, Arc<Gateway>>,
    /// Storage backends.
    pub storage: StorageSettings,
    /// Admin token; `None` disables the admin API.
    pub admin_token: Option<Secret>,
    /// Model prices (built-in table with the configured file and overrides applied).
    pub prices: Arc<crate::meter::cost::PriceTable>,
    /// Options of rate limits and budgets.
    pub limits: crate::limits::LimitOptions,
    /// The web console.
    pub dashboard: DashboardSettings,
    /// OpenTelemetry export; `None` when off.
    pub telemetry: Option<TelemetrySettings>,
    /// The file these settings were read from (`None`: the embedded default or text).
    pub source: Option<PathBuf>,
}

/// `[telemetry]` with an endpoint: where and how spans and metrics are exported.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySettings {
    /// The base URL as written (for `aigate check`).
    pub endpoint: String,
    /// `{endpoint}/v1/traces`.
    pub traces_url: http::Uri,
    /// `{endpoint}/v1/metrics`.
    pub metrics_url: http::Uri,
    /// `service.name` of the resource.
    pub service_name: String,
    /// Headers sent with every export (values are secrets).
    pub headers: Vec<(http::HeaderName, Secret)>,
    /// Most spans per export request.
    pub batch_size: usize,
    /// Spans waiting for the exporter.
    pub queue: usize,
    /// Metrics export period.
    pub export_interval: Duration,
    /// Longest export request.
    pub timeout: Duration,
}

/// `[dashboard]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DashboardSettings {
    /// Settings are shown, never changed.
    pub read_only: bool,
    /// Lifetime of a login session.
    pub session_ttl: Duration,
}

/// Storage backends.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageSettings {
    /// The backend of each store (cache, limits, logs).
    pub backends: aigate_store::Backends,
    /// Log queue capacity (records).
    pub log_queue: usize,
    /// Spill files cap, bytes.
    pub log_spill_max: u64,
}

/// A gateway's log settings.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Records are kept (analytics and metrics count every request regardless).
    pub enabled: bool,
    /// Bodies are stored.
    pub bodies: bool,
    /// Cap of each stored body, bytes.
    pub max_body_size: usize,
    /// Retention applied by the store.
    pub retention: aigate_store::Retention,
}

/// A gateway's cache settings.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Effective mode (`Off` when `enabled = false`).
    pub mode: CacheMode,
    /// Default TTL.
    pub ttl: Duration,
    /// Key scope.
    pub scope: CacheScope,
    /// Largest stored response, bytes.
    pub max_entry_size: u64,
    /// Coalesce identical in-flight requests.
    pub coalesce: bool,
    /// Longest wait for a coalesced leader's response head.
    pub coalesce_wait: Duration,
    /// Exceptions to these defaults, first match wins.
    pub rules: crate::cache::rules::CacheRules,
}

/// Upstream connection settings.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Idle pooled connection lifetime.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per host.
    pub pool_max_idle_per_host: usize,
    /// Most connections open to one host at once.
    pub max_connections_per_host: usize,
}

/// One gateway: its own auth, keys and (in later stages) cache, limits and logs.
#[derive(Debug)]
pub struct Gateway {
    /// The gateway id as it appears in URLs.
    pub name: Arc<str>,
    /// Whether `cf-aig-authorization` is required.
    pub authentication: bool,
    /// Accepted tokens.
    pub tokens: Vec<Secret>,
    /// Stored provider keys by provider name.
    pub provider_keys: HashMap<String, Secret>,
    /// Default time to first byte.
    pub request_timeout: Duration,
    /// Response cache.
    pub cache: CacheSettings,
    /// Request logs.
    pub logs: LogSettings,
    /// Thresholds of the rollout report.
    pub report: crate::report::Thresholds,
    /// Rate limits and budgets, in the order they are checked.
    pub rules: Vec<crate::limits::Rule>,
    /// Retries of a failed upstream request.
    pub retries: RetrySettings,
    /// Dynamic routes by name (`model: "dynamic/NAME"`).
    pub routes: HashMap<String, Arc<crate::routing::dynamic::DynamicRoute>>,
    /// A share of the traffic served by another gateway.
    pub canary: Option<crate::routing::Canary>,
    /// The circuit breaker, when configured.
    pub breaker: Option<crate::routing::breaker::BreakerSettings>,
}

/// When and how a failed upstream request is sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySettings {
    /// Attempts in all (1: no retry), at most [`RetrySettings::MAX_ATTEMPTS`].
    pub max_attempts: u32,
    /// The wait before the first retry, at most [`RetrySettings::MAX_DELAY`].
    pub delay: Duration,
    /// How the wait grows.
    pub backoff: file::Backoff,
}

impl RetrySettings {
    /// The most attempts (Cloudflare's limit).
    pub const MAX_ATTEMPTS: u32 = 5;
    /// The longest wait between attempts (Cloudflare's limit).
    pub const MAX_DELAY: Duration = Duration::from_secs(5);

    /// No retry.
    pub const NONE: RetrySettings =
        RetrySettings { max_attempts: 1, delay: Duration::ZERO, backoff: file::Backoff::Constant };

    /// The wait before retry `n` (1 for the first), at most [`RetrySettings::MAX_DELAY`].
    pub fn wait(&self, n: u32) -> Duration {
        let factor = match self.backoff {
            file::Backoff::Constant => 1,
            file::Backoff::Linear => n,
            file::Backoff::Exponential => 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX),
        };
        self.delay.saturating_mul(factor).min(Self::MAX_DELAY)
    }
}

impl Settings {
    /// Default request body limit: 25 MB, as Cloudflare's cacheable request size.
    pub const DEFAULT_MAX_REQUEST_BODY: u64 = 25_000_000;
    /// Default time to first byte from the upstream.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

    /// Parses and validates TOML text, resolving secrets from the process environment and files.
    pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        Self::from_toml_with(text, &|name| std::env::var(name).ok())
    }

    /// Reads a file, then as [`Settings::from_toml`].
    pub fn from_file(path: &std::path::Path) -> Result<Settings, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|error| ConfigError::Io { path: path.to_path_buf(), error })?;
        Self::from_file_text(path, &text)
    }

    /// The settings of `text`, the contents (current or about to be written) of the file `path`.
    pub fn from_file_text(path: &std::path::Path, text: &str) -> Result<Settings, ConfigError> {
        let mut settings = Self::from_toml(text).map_err(|e| match e {
            ConfigError::Parse(m) => ConfigError::Parse(format!("{}: {m}", path.display())),
            ConfigError::Invalid(m) => ConfigError::Invalid(format!("{}: {m}", path.display())),
            other => other,
        })?;
        settings.source = Some(path.to_path_buf());
        Ok(settings)
    }

    /// The embedded default configuration.
    pub fn embedded_default() -> Result<Settings, ConfigError> {
        Self::from_toml(EMBEDDED_DEFAULT)
    }

    /// Parses and validates, looking environment variables up with `env`.
    pub fn from_toml_with(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
        let file: FileConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse(format!("invalid configuration: {e}")))?;
        file.validate_with(text, env)
    }
}

/// Default log and cache settings (cache off), for unit tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn validate_logs_for_tests() -> LogSettings {
    validate::validate_logs(&LogsConfig::default(), "test").unwrap_or_else(|_| unreachable!())
}

#[cfg(test)]
pub(crate) fn validate_cache_for_tests() -> CacheSettings {
    validate::validate_cache(&CacheConfig::default(), "test").unwrap_or_else(|_| unreachable!())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
listen = "127.0.0.1:8787"
data_dir = "./aigate-data"
default_gateway = "default"

[providers.openai]
base_url = "https://api.openai.com/v1"      # override to point at any compatible server

[providers.local-vllm]                        # any extra provider: a name and a base URL
base_url = "http://127.0.0.1:8000/v1"

[gateways.default]

[gateways.prod]
authentication = true                         # requests need cf-aig-authorization: Bearer <token>
tokens = ["env:PROD_GATEWAY_TOKEN"]

[gateways.prod.provider_keys]                 # stored provider keys: clients need not send one
openai = "env:OPENAI_API_KEY"
"#;

    fn env_ok(name: &str) -> Option<String> {
        match name {
            "PROD_GATEWAY_TOKEN" => Some("tok-123".into()),
            "OPENAI_API_KEY" => Some("sk-test".into()),
            _ => None,
        }
    }

    #[test]
    fn example_config_validates() {
        let s = Settings::from_toml_with(EXAMPLE, &env_ok).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:8787");
        assert_eq!(&*s.default_gateway, "default");
        let prod = &s.gateways["prod"];
        assert!(prod.authentication);
        assert_eq!(prod.tokens[0].expose(), "tok-123");
        assert_eq!(prod.provider_keys["openai"].expose(), "sk-test");
        assert!(s.providers.contains_key("local-vllm"));
        assert!(s.providers.contains_key("anthropic"));
        assert_eq!(s.max_request_body, 25_000_000);
    }

    #[test]
    fn missing_env_names_key_and_line() {
        let err = Settings::from_toml_with(EXAMPLE, &|n| if n == "OPENAI_API_KEY" { Some("x".into()) } else { None })
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 16"), "{msg}");
        assert!(msg.contains("gateways.prod.tokens[0]"), "{msg}");
        assert!(msg.contains("PROD_GATEWAY_TOKEN"), "{msg}");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err =
            Settings::from_toml_with("listen = \"127.0.0.1:1\"\n[gateways.default]\nauthentcation = true\n", &env_ok)
                .unwrap_err()
                .to_string();
        assert!(err.contains("authentcation"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_values_refused() {
        for (text, needle) in [
            ("listen = \"nope\"", "listen"),
            ("[gateways.v1]", "reserved"),
            ("[gateways.admin]", "reserved"),
            ("default_gateway = \"x\"\n[gateways.y]", "default_gateway"),
            ("[gateways.default]\nrequest_timeout = \"soon\"", "invalid duration"),
            ("max_request_body = \"12 parsecs\"", "size"),
            ("[providers.x]\nbase_url = \"ftp://h/\"", "providers.x.base_url"),
            ("[gateways.default]\nauthentication = true", "token"),
            ("[gateways.default.provider_keys]\nnosuch = \"env:X\"", "unknown provider"),
        ] {
            let err = Settings::from_toml_with(text, &env_ok).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?} gave {err}");
        }
    }

    #[test]
    fn telemetry_validated() {
        assert!(Settings::from_toml_with("", &env_ok).unwrap().telemetry.is_none(), "off by default");
        let s = Settings::from_toml_with(
            "[telemetry]\notlp_endpoint = \"https://otel.example:4318/base/\"\n[telemetry.headers]\nauthorization = \"env:PROD_GATEWAY_TOKEN\"\n",
            &env_ok,
        )
        .unwrap();
        let t = s.telemetry.unwrap();
        assert_eq!(t.traces_url.to_string(), "https://otel.example:4318/base/v1/traces");
        assert_eq!(t.metrics_url.to_string(), "https://otel.example:4318/base/v1/metrics");
        assert_eq!((t.service_name.as_str(), t.batch_size, t.queue), ("aigate", 512, 4096));
        assert_eq!((t.export_interval, t.timeout), (Duration::from_secs(60), Duration::from_secs(10)));
        assert_eq!(t.headers[0].0.as_str(), "authorization");
        assert_eq!(t.headers[0].1.expose(), "tok-123");
        for (text, needle) in [
            ("otlp_endpoint = \"localhost:4318\"", "telemetry.otlp_endpoint"),
            ("otlp_endpoint = \"ftp://h:4318\"", "telemetry.otlp_endpoint"),
            ("otlp_endpoint = \"http://u:p@h:4318\"", "credentials"),
            ("otlp_endpoint = \"http://h:4318\"\nqueue = 0", "telemetry.queue"),
            ("otlp_endpoint = \"http://h:4318\"\nbatch_size = 0", "telemetry.batch_size"),
            ("otlp_endpoint = \"http://h:4318\"\nexport_interval = \"1ms\"", "telemetry.export_interval"),
            ("otlp_endpoint = \"http://h:4318\"\n[telemetry.headers]\nx = \"env:NOPE\"", "telemetry.headers.x"),
            ("otlp_endpoint = \"http://h:4318\"\nendpoint = \"x\"", "endpoint"),
        ] {
            let text = format!("[telemetry]\n{text}");
            let err = Settings::from_toml_with(&text, &env_ok).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?} gave {err}");
        }
    }

    #[test]
    fn secrets_from_files_and_never_debug_printed() {
        let dir = std::env::temp_dir().join(format!("aigate-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("tok");
        std::fs::write(&f, "file-token\n").unwrap();
        let text = format!("[gateways.default]\nauthentication = true\ntokens = [{:?}]\n", f.display().to_string());
        let s = Settings::from_toml_with(&text, &env_ok).unwrap();
        assert_eq!(s.gateways["default"].tokens[0].expose(), "file-token");
        assert!(!format!("{s:?}").contains("file-token"));
    }

    #[test]
    fn embedded_default_runs_default_gateway() {
        let s = Settings::embedded_default().unwrap();
        assert_eq!(s.gateways.len(), 1);
        assert!(s.gateways.contains_key("default"));
        assert!(s.providers.len() >= 12);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_byte_size("25MB").unwrap(), 25_000_000);
        assert_eq!(parse_byte_size("1 MiB").unwrap(), 1 << 20);
        assert_eq!(parse_byte_size("100").unwrap(), 100);
        assert!(parse_byte_size("x").is_err());
    }
}
