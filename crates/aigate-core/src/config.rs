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

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::providers::{self, AuthStyle, Provider};

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
    #[error("cannot read config file {path}: {source}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

// ---------------------------------------------------------------------------------------------
// File form
// ---------------------------------------------------------------------------------------------

/// The top level of the TOML file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address the gateway listens on. Default `127.0.0.1:8787`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Directory for embedded storage (cache, logs). Default `./aigate-data`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Gateway that serves the plain OpenAI layout `/v1/...`. Default `default`.
    #[serde(default = "default_gateway_name")]
    pub default_gateway: String,
    /// When set, Cloudflare-layout URLs must carry this account id; any id is accepted otherwise.
    #[serde(default)]
    pub account_id: Option<String>,
    /// Largest request body accepted, e.g. `"25MB"`; larger bodies get 413. Default 25 MB.
    #[serde(default)]
    pub max_request_body: Option<ByteSizeValue>,
    /// How long in-flight requests may run after SIGTERM/Ctrl-C before the process exits. Default `30s`.
    #[serde(default)]
    pub shutdown_grace: Option<DurationValue>,
    /// Most client connections served at once; more wait in the listen backlog. Default 10000.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Longest time to receive a request body. Default `60s`; slower uploads get 408.
    #[serde(default)]
    pub request_body_timeout: Option<DurationValue>,
    /// Longest time to receive a request head (and longest idle time of a kept-alive connection
    /// between requests). Default `30s`.
    #[serde(default)]
    pub header_read_timeout: Option<DurationValue>,
    /// Upstream connection settings.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// Providers: overrides of built-in ones and extra ones.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Gateways, each isolated from the others.
    #[serde(default)]
    pub gateways: BTreeMap<String, GatewayConfig>,
    /// Where shared state lives (cache now; limits and logs later).
    #[serde(default)]
    pub storage: StorageConfig,
    /// The admin API (`/admin/...`).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Model prices used for cost (overrides and additions to the built-in table).
    #[serde(default)]
    pub pricing: PricingConfig,
    /// Options of rate limits and budgets.
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// `[limits]`: options shared by every gateway's rate limits and budgets.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// When the limit store fails: `allow` (default) or `deny` (503).
    pub on_store_error: Option<crate::limits::OnStoreError>,
    /// Whether cache hits count against request limits. Default false.
    pub count_cache_hits: Option<bool>,
    /// URL budget alerts are POSTed to (JSON).
    pub alert_webhook: Option<String>,
    /// Output tokens assumed for a request without `max_tokens` when reserving. Default 1024.
    pub default_max_tokens: Option<u64>,
}

/// `[gateways.NAME.rate_limit]`: Cloudflare's gateway rate limit (requests per period).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per period.
    pub limit: u64,
    /// The period, e.g. `"60s"`.
    pub period: DurationValue,
    /// `fixed` or `sliding` (default).
    pub technique: Option<aigate_store::Technique>,
}

/// `[[gateways.NAME.limits]]`: a finer rate limit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitRuleConfig {
    /// Name, unique in the gateway.
    pub name: String,
    /// `gateway` (default), `credential`, `model` or `metadata.NAME`.
    pub key: Option<String>,
    /// `requests` (default), `tokens` or `cost_usd`.
    pub measure: Option<crate::limits::Measure>,
    /// Units per period (USD for `cost_usd`).
    pub limit: f64,
    /// The period, e.g. `"1h"`.
    pub period: DurationValue,
    /// `fixed` or `sliding` (default).
    pub technique: Option<aigate_store::Technique>,
    /// Only requests for this model.
    pub model: Option<String>,
}

/// `[[gateways.NAME.budgets]]`: a spend limit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Name, unique in the gateway. Default `budget-N`.
    pub name: Option<String>,
    /// USD per period.
    pub limit_usd: f64,
    /// `hour`, `day`, `week`, `month` (UTC calendar) or a rolling duration like `"24h"`.
    pub period: String,
    /// Only requests for this model.
    pub model: Option<String>,
    /// Per `metadata.NAME` value (or `credential`, `model`); default the whole gateway.
    pub key: Option<String>,
    /// Alert thresholds as fractions of the limit. Default `[0.5, 0.8, 1.0]`.
    pub alerts: Option<Vec<f64>>,
}

/// `[pricing]`: where model prices come from besides the built-in table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingConfig {
    /// A LiteLLM `model_prices_and_context_window.json` file read at start (its prices replace the
    /// built-in ones for the models it lists).
    pub litellm_file: Option<PathBuf>,
    /// Prices by model name (USD per million tokens), applied last:
    /// `[pricing.models."gpt-4o"] input = 2.5, output = 10.0, cached_input = 1.25`.
    #[serde(default)]
    pub models: BTreeMap<String, crate::meter::cost::Price>,
}

/// `[storage]`: backends, chosen once for all gateways.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Cache backend: `memory`, `disk` (default; under `data_dir`) or `redis://host:port`.
    pub cache: Option<String>,
    /// Size of the in-process cache tier. Default 256MB.
    pub cache_memory: Option<ByteSizeValue>,
    /// Size cap of the disk cache. Default 2GB.
    pub cache_disk: Option<ByteSizeValue>,
    /// Log store: `sqlite` (default; a file under `data_dir`) or `postgres://user@host/db`.
    pub logs: Option<String>,
    /// Rate-limit store: `memory` (default) or `redis://host:port` (shared by replicas).
    pub limits: Option<String>,
    /// Records waiting for the log writer; when full, records spill to a file. Default 10000.
    pub log_queue: Option<usize>,
    /// Most bytes of spill files kept under `data_dir/log-spill`; beyond it records are dropped and
    /// counted. Default 1GB.
    pub log_spill_max: Option<ByteSizeValue>,
}

/// `[admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin token (secret), sent as `Authorization: Bearer <token>`. Without it the admin API is off.
    pub token: Option<Spanned<String>>,
}

/// `[gateways.NAME.cache]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Turn the cache on for this gateway. Default false (the embedded default config turns it on
    /// for `default`).
    #[serde(default)]
    pub enabled: bool,
    /// Default TTL, 60s to 30 days. Default `1h`.
    pub ttl: Option<DurationValue>,
    /// `on`, `shadow` (look up and store, but always answer from upstream) or `off`. Default `on`.
    pub mode: Option<CacheMode>,
    /// `credential` (default: the provider credential and gateway token are part of the key) or
    /// `gateway` (entries shared by every credential of the gateway).
    pub scope: Option<CacheScope>,
    /// Largest response stored. Default `10MB`.
    pub max_entry_size: Option<ByteSizeValue>,
    /// Identical requests in flight wait for the first one instead of going upstream. Default true.
    pub coalesce: Option<bool>,
    /// How long a waiting request waits for the first one's response head. Default `60s`.
    pub coalesce_wait: Option<DurationValue>,
}

/// Cache mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Serve hits.
    On,
    /// Count would-be hits, always answer from upstream.
    Shadow,
    /// No caching (except requests with `cf-aig-cache-key`).
    Off,
}

/// What the cache key covers besides the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    /// The provider credential and gateway token are part of the key.
    Credential,
    /// Entries are shared across credentials of the gateway.
    Gateway,
}

/// `[upstream]`: how aigate talks to providers.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// TCP+TLS connect timeout. Default `10s`.
    pub connect_timeout: Option<DurationValue>,
    /// How long an idle pooled connection is kept. Default `90s`.
    pub pool_idle_timeout: Option<DurationValue>,
    /// Idle connections kept per upstream host. Default 512.
    pub pool_max_idle_per_host: Option<usize>,
}

/// `[providers.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Base URL requests are appended to, e.g. `https://api.openai.com/v1`.
    pub base_url: Spanned<String>,
    /// How the provider credential is sent: `bearer`, `x-api-key`, `api-key`, `x-goog-api-key`.
    /// Built-in providers keep their own style unless this is given; extra providers default to bearer.
    #[serde(default)]
    pub auth: Option<AuthStyle>,
}

/// `[gateways.NAME]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Require `cf-aig-authorization: Bearer <token>` on every request. Default false.
    #[serde(default)]
    pub authentication: bool,
    /// Accepted gateway tokens (secrets: `env:NAME` or a file path).
    #[serde(default)]
    pub tokens: Vec<Spanned<String>>,
    /// Stored provider keys by provider name (secrets); injected so clients need not send one.
    #[serde(default)]
    pub provider_keys: BTreeMap<String, Spanned<String>>,
    /// Default time to the upstream's first byte before answering 504. Default `300s`.
    /// `cf-aig-request-timeout` (ms) overrides it per request.
    #[serde(default)]
    pub request_timeout: Option<DurationValue>,
    /// Response cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Request logs.
    #[serde(default)]
    pub logs: LogsConfig,
    /// Go / no-go thresholds of `aigate report`.
    #[serde(default)]
    pub report: crate::report::Thresholds,
    /// Cloudflare's gateway rate limit.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Finer rate limits.
    #[serde(default)]
    pub limits: Vec<LimitRuleConfig>,
    /// Spend limits.
    #[serde(default)]
    pub budgets: Vec<BudgetConfig>,
}

/// `at_cap` of `[gateways.NAME.logs]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AtCapValue {
    /// Keep inserting and delete the oldest records.
    DeleteOldest,
    /// Stop inserting until records age out or are deleted.
    StopInserting,
}

/// `[gateways.NAME.logs]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsConfig {
    /// Keep a record of every request. Default true.
    pub enabled: Option<bool>,
    /// Store request and response bodies (each capped at `max_body_size`). Default false.
    pub bodies: Option<bool>,
    /// Cap of each stored body. Default `1MB`.
    pub max_body_size: Option<ByteSizeValue>,
    /// Most records kept for the gateway. Default 1000000.
    pub max_records: Option<u64>,
    /// At the cap: `delete_oldest` (default) or `stop_inserting`.
    pub at_cap: Option<AtCapValue>,
    /// Records older than this are deleted, e.g. `"30d"`. Default: no age limit.
    pub max_age: Option<DurationValue>,
}

/// A duration written as `"90s"`, `"5m"`, `"1h"` (humantime syntax).
#[derive(Debug, Clone, Copy)]
pub struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim()).map(DurationValue).map_err(|e| {
            serde::de::Error::custom(format!("invalid duration {s:?} ({e}); write e.g. \"90s\", \"5m\", \"1h\""))
        })
    }
}

/// A size written as `"25MB"`, `"512KiB"` or a number of bytes.
#[derive(Debug, Clone, Copy)]
pub struct ByteSizeValue(pub u64);

impl<'de> Deserialize<'de> for ByteSizeValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSizeValue(n)),
            Raw::Str(s) => parse_byte_size(&s).map(ByteSizeValue).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `"25MB"`, `"10 MiB"`, `"512KB"`, `"100"` into bytes (KB/MB/GB are powers of 1000,
/// KiB/MiB/GiB of 1024).
pub fn parse_byte_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 =
        num.replace('_', "").parse().map_err(|_| format!("invalid size {s:?}; write e.g. \"25MB\" or \"512KiB\""))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => return Err(format!("invalid size unit {other:?} in {s:?}; use B, KB, MB, GB, KiB, MiB or GiB")),
    };
    Ok((num * mult as f64) as u64)
}

fn default_listen() -> String {
    "127.0.0.1:8787".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./aigate-data")
}
fn default_gateway_name() -> String {
    "default".into()
}

// ---------------------------------------------------------------------------------------------
// Runtime form
// ---------------------------------------------------------------------------------------------

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
    /// Longest time to receive a request body.
    pub request_body_timeout: Duration,
    /// Longest time to receive a request head.
    pub header_read_timeout: Duration,
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
}

/// Storage backends.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageSettings {
    /// Cache backend.
    pub cache: aigate_store::CacheBackend,
    /// In-process cache tier size, bytes.
    pub cache_memory: u64,
    /// Log store backend.
    pub logs: aigate_store::LogBackend,
    /// Log queue capacity (records).
    pub log_queue: usize,
    /// Spill files cap, bytes.
    pub log_spill_max: u64,
    /// Rate-limit store spec (`memory` or a Redis URL).
    pub limits: String,
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
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse(m) => ConfigError::Parse(format!("{}: {m}", path.display())),
            ConfigError::Invalid(m) => ConfigError::Invalid(format!("{}: {m}", path.display())),
            other => other,
        })
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

impl FileConfig {
    /// Turns the file form into [`Settings`]; `source` is the TOML text, used to name lines.
    pub fn validate_with(self, source: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(m);
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|_| invalid(format!("listen: {:?} is not an address like \"127.0.0.1:8787\"", self.listen)))?;

        // Providers: start from the built-in table, then apply overrides and additions.
        let mut providers: HashMap<String, Arc<Provider>> =
            providers::builtin().into_iter().map(|p| (p.name.to_string(), Arc::new(p))).collect();
        for (name, pc) in self.providers {
            validate_name("providers", &name)?;
            let line = line_of(source, pc.base_url.span().start);
            let auth = pc.auth.or_else(|| providers.get(&name).map(|p| p.auth)).unwrap_or(AuthStyle::Bearer);
            let p = Provider::new(&name, pc.base_url.get_ref(), auth)
                .map_err(|e| invalid(format!("line {line}: providers.{name}.base_url: {e}")))?;
            providers.insert(name, Arc::new(p));
        }

        let mut gateway_files = self.gateways;
        if gateway_files.is_empty() {
            gateway_files.insert(self.default_gateway.clone(), GatewayConfig::default());
        }
        let mut gateways = HashMap::new();
        for (name, gc) in gateway_files {
            validate_name("gateways", &name)?;
            if RESERVED_GATEWAY_NAMES.contains(&name.as_str()) {
                return Err(invalid(format!(
                    "gateways.{name}: the name {name:?} is reserved for aigate's own routes ({})",
                    RESERVED_GATEWAY_NAMES.join(", ")
                )));
            }
            let key = |field: &str| format!("gateways.{name}.{field}");
            let mut tokens = Vec::with_capacity(gc.tokens.len());
            for (i, t) in gc.tokens.iter().enumerate() {
                tokens.push(resolve_secret(source, t, &format!("{}[{i}]", key("tokens")), env)?);
            }
            if gc.authentication && tokens.is_empty() {
                return Err(invalid(format!("{}: authentication = true needs at least one token", key("tokens"))));
            }
            let mut provider_keys = HashMap::new();
            for (pname, v) in &gc.provider_keys {
                if !providers.contains_key(pname) {
                    let line = line_of(source, v.span().start);
                    return Err(invalid(format!(
                        "line {line}: {}: unknown provider {pname:?}; known providers: {}",
                        key("provider_keys"),
                        sorted_names(&providers)
                    )));
                }
                provider_keys.insert(
                    pname.clone(),
                    resolve_secret(source, v, &format!("{}.{pname}", key("provider_keys")), env)?,
                );
            }
            let request_timeout = gc.request_timeout.map_or(Settings::DEFAULT_REQUEST_TIMEOUT, |d| d.0);
            if request_timeout.is_zero() {
                return Err(invalid(format!("{}: must be greater than zero", key("request_timeout"))));
            }
            let gw = Gateway {
                name: Arc::from(name.as_str()),
                authentication: gc.authentication,
                tokens,
                provider_keys,
                request_timeout,
                cache: validate_cache(&gc.cache, &key("cache"))?,
                logs: validate_logs(&gc.logs, &key("logs"))?,
                report: validate_thresholds(gc.report, &key("report"))?,
                rules: validate_rules(&gc, &key(""))?,
            };
            gateways.insert(name, Arc::new(gw));
        }
        if !gateways.contains_key(&self.default_gateway) {
            return Err(invalid(format!(
                "default_gateway: {:?} is not a configured gateway; configured: {}",
                self.default_gateway,
                sorted_names(&gateways)
            )));
        }

        let max_request_body = self.max_request_body.map_or(Settings::DEFAULT_MAX_REQUEST_BODY, |b| b.0);
        if max_request_body == 0 {
            return Err(invalid("max_request_body: must be greater than zero".into()));
        }
        let upstream = UpstreamSettings {
            connect_timeout: self.upstream.connect_timeout.map_or(Duration::from_secs(10), |d| d.0),
            pool_idle_timeout: self.upstream.pool_idle_timeout.map_or(Duration::from_secs(90), |d| d.0),
            pool_max_idle_per_host: self.upstream.pool_max_idle_per_host.unwrap_or(512),
        };
        let disk_bytes = self.storage.cache_disk.map_or(2_000_000_000, |b| b.0);
        let cache_spec = self.storage.cache.as_deref().unwrap_or("disk");
        let cache_backend = aigate_store::CacheBackend::parse(cache_spec, &self.data_dir.join("cache"), disk_bytes)
            .map_err(|e| invalid(format!("storage.cache: {e}")))?;
        let logs_spec = self.storage.logs.as_deref().unwrap_or("sqlite");
        let logs_backend = aigate_store::LogBackend::parse(logs_spec, &self.data_dir)
            .map_err(|e| invalid(format!("storage.logs: {e}")))?;
        let storage = StorageSettings {
            cache: cache_backend,
            cache_memory: self.storage.cache_memory.map_or(256_000_000, |b| b.0),
            logs: logs_backend,
            log_queue: match self.storage.log_queue {
                Some(0) => return Err(invalid("storage.log_queue: must be greater than zero".into())),
                Some(n) => n,
                None => 10_000,
            },
            log_spill_max: self.storage.log_spill_max.map_or(1_000_000_000, |b| b.0),
            limits: {
                let spec = self.storage.limits.as_deref().unwrap_or("memory").trim().to_owned();
                if !(spec == "memory" || spec.starts_with("redis://") || spec.starts_with("rediss://")) {
                    return Err(invalid(format!(
                        "storage.limits: unknown backend {spec:?}: expected \"memory\" or a redis:// URL"
                    )));
                }
                spec
            },
        };
        let limits = crate::limits::LimitOptions {
            on_store_error: self.limits.on_store_error.unwrap_or_default(),
            count_cache_hits: self.limits.count_cache_hits.unwrap_or(false),
            alert_webhook: match &self.limits.alert_webhook {
                Some(u) => Some(
                    u.parse::<http::Uri>()
                        .ok()
                        .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
                        .ok_or_else(|| invalid(format!("limits.alert_webhook: {u:?} is not an http(s) URL")))?,
                ),
                None => None,
            },
            default_max_tokens: self.limits.default_max_tokens.unwrap_or(1024),
        };
        let mut prices = crate::meter::cost::PriceTable::builtin();
        if let Some(path) = &self.pricing.litellm_file {
            let bytes = std::fs::read(path)
                .map_err(|e| invalid(format!("pricing.litellm_file: cannot read {}: {e}", path.display())))?;
            let table = crate::meter::cost::PriceTable::load_litellm(&bytes)
                .map_err(|e| invalid(format!("pricing.litellm_file: {}: {e}", path.display())))?;
            prices = prices.with_overrides(table).map_err(|e| invalid(format!("pricing.litellm_file: {e}")))?;
        }
        let prices = prices.with_overrides(self.pricing.models).map_err(|e| invalid(format!("pricing.models: {e}")))?;
        let admin_token = match &self.admin.token {
            Some(t) => Some(resolve_secret(source, t, "admin.token", env)?),
            None => None,
        };
        Ok(Settings {
            listen,
            data_dir: self.data_dir,
            default_gateway: Arc::from(self.default_gateway.as_str()),
            account_id: self.account_id,
            max_request_body,
            shutdown_grace: self.shutdown_grace.map_or(Duration::from_secs(30), |d| d.0),
            max_connections: match self.max_connections {
                Some(0) => return Err(invalid("max_connections: must be greater than zero".into())),
                Some(n) => n,
                None => 10_000,
            },
            request_body_timeout: match self.request_body_timeout {
                Some(d) if d.0.is_zero() => {
                    return Err(invalid("request_body_timeout: must be greater than zero".into()))
                }
                Some(d) => d.0,
                None => Duration::from_secs(60),
            },
            header_read_timeout: match self.header_read_timeout {
                Some(d) if d.0.is_zero() => {
                    return Err(invalid("header_read_timeout: must be greater than zero".into()))
                }
                Some(d) => d.0,
                None => Duration::from_secs(30),
            },
            upstream,
            providers,
            gateways,
            storage,
            admin_token,
            prices: Arc::new(prices),
            limits,
        })
    }
}

/// Validates `[gateways.NAME.cache]`.
fn validate_cache(c: &CacheConfig, key: &str) -> Result<CacheSettings, ConfigError> {
    let ttl = c.ttl.map_or(Duration::from_secs(3600), |d| d.0);
    if ttl < Duration::from_secs(60) || ttl > Duration::from_secs(30 * 86_400) {
        return Err(ConfigError::Invalid(format!("{key}.ttl: must be between 60s and 30 days")));
    }
    let mode = if c.enabled { c.mode.unwrap_or(CacheMode::On) } else { CacheMode::Off };
    let max_entry_size = c.max_entry_size.map_or(10_000_000, |b| b.0);
    if max_entry_size == 0 {
        return Err(ConfigError::Invalid(format!("{key}.max_entry_size: must be greater than zero")));
    }
    Ok(CacheSettings {
        mode,
        ttl,
        scope: c.scope.unwrap_or(CacheScope::Credential),
        max_entry_size,
        coalesce: c.coalesce.unwrap_or(true),
        coalesce_wait: c.coalesce_wait.map_or(Duration::from_secs(60), |d| d.0),
    })
}

/// Validates a gateway's `rate_limit`, `limits` and `budgets` into rules (`prefix` is `gateways.NAME.`).
fn validate_rules(gc: &GatewayConfig, prefix: &str) -> Result<Vec<crate::limits::Rule>, ConfigError> {
    use crate::limits::{Budget, BudgetPeriod, LimitKey, Measure, Rule};
    use aigate_store::Technique;
    let invalid = |m: String| ConfigError::Invalid(m);
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let mut rules: Vec<Rule> = Vec::new();
    if let Some(rl) = &gc.rate_limit {
        if rl.limit == 0 || rl.period.0.is_zero() {
            return Err(invalid(format!("{prefix}rate_limit: limit and period must be greater than zero")));
        }
        rules.push(Rule {
            name: Arc::from("rate_limit"),
            key: LimitKey::Gateway,
            measure: Measure::Requests,
            limit: rl.limit,
            period_ms: ms(rl.period.0),
            technique: rl.technique.unwrap_or(Technique::Sliding),
            model: None,
            budget: None,
        });
    }
    for (i, l) in gc.limits.iter().enumerate() {
        let k = format!("{prefix}limits[{i}]");
        validate_name(&format!("{k}.name"), &l.name)?;
        let measure = l.measure.unwrap_or(Measure::Requests);
        if !l.limit.is_finite() || l.limit <= 0.0 || l.period.0.is_zero() {
            return Err(invalid(format!("{k}: limit and period must be greater than zero")));
        }
        let limit = match measure {
            Measure::CostUsd => crate::limits::usd_to_micros(l.limit),
            _ if l.limit.fract() != 0.0 => return Err(invalid(format!("{k}.limit: must be a whole number"))),
            _ => l.limit as u64,
        };
        rules.push(Rule {
            name: Arc::from(l.name.as_str()),
            key: l.key.as_deref().unwrap_or("gateway").parse().map_err(|e| invalid(format!("{k}.key: {e}")))?,
            measure,
            limit,
            period_ms: ms(l.period.0),
            technique: l.technique.unwrap_or(Technique::Sliding),
            model: l.model.clone(),
            budget: None,
        });
    }
    for (i, b) in gc.budgets.iter().enumerate() {
        let k = format!("{prefix}budgets[{i}]");
        let name = b.name.clone().unwrap_or_else(|| format!("budget-{}", i + 1));
        validate_name(&format!("{k}.name"), &name)?;
        if !b.limit_usd.is_finite() || b.limit_usd <= 0.0 {
            return Err(invalid(format!("{k}.limit_usd: must be greater than zero")));
        }
        let period: BudgetPeriod = b.period.parse().map_err(|e| invalid(format!("{k}.period: {e}")))?;
        let alerts = b.alerts.clone().unwrap_or_else(|| vec![0.5, 0.8, 1.0]);
        if alerts.iter().any(|a| !a.is_finite() || *a <= 0.0 || *a > 10.0) {
            return Err(invalid(format!("{k}.alerts: fractions of the limit between 0 and 10, e.g. [0.5, 0.8, 1.0]")));
        }
        let period_ms = match period {
            BudgetPeriod::Hour => 3_600_000,
            BudgetPeriod::Day => 86_400_000,
            BudgetPeriod::Week => 7 * 86_400_000,
            BudgetPeriod::Month => 31 * 86_400_000,
            BudgetPeriod::Rolling(ms) => ms,
        };
        rules.push(Rule {
            name: Arc::from(name.as_str()),
            key: b.key.as_deref().unwrap_or("gateway").parse().map_err(|e| invalid(format!("{k}.key: {e}")))?,
            measure: Measure::CostUsd,
            limit: crate::limits::usd_to_micros(b.limit_usd),
            period_ms,
            technique: Technique::Sliding,
            model: b.model.clone(),
            budget: Some(Budget { period, alerts, limit_usd: b.limit_usd }),
        });
    }
    let mut seen = std::collections::HashSet::new();
    for r in &rules {
        if !seen.insert(r.name.clone()) {
            return Err(invalid(format!("{prefix}: the rule name {:?} is used twice", &*r.name)));
        }
    }
    Ok(rules)
}

/// Validates `[gateways.NAME.report]`.
fn validate_thresholds(t: crate::report::Thresholds, key: &str) -> Result<crate::report::Thresholds, ConfigError> {
    for (name, v) in [("min_hit_rate", t.min_hit_rate), ("max_error_rate", t.max_error_rate)] {
        if v.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
            return Err(ConfigError::Invalid(format!("{key}.{name}: must be between 0 and 1")));
        }
    }
    if t.max_p95_ms.is_some_and(|v| !v.is_finite() || v <= 0.0) {
        return Err(ConfigError::Invalid(format!("{key}.max_p95_ms: must be a positive number of milliseconds")));
    }
    Ok(t)
}

/// Validates `[gateways.NAME.logs]`.
fn validate_logs(c: &LogsConfig, key: &str) -> Result<LogSettings, ConfigError> {
    let max_body_size = c.max_body_size.map_or(1_000_000, |b| b.0);
    let max_records = c.max_records.unwrap_or(1_000_000);
    if max_records == 0 {
        return Err(ConfigError::Invalid(format!("{key}.max_records: must be greater than zero")));
    }
    if c.max_age.is_some_and(|d| d.0.is_zero()) {
        return Err(ConfigError::Invalid(format!("{key}.max_age: must be greater than zero")));
    }
    Ok(LogSettings {
        enabled: c.enabled.unwrap_or(true),
        bodies: c.bodies.unwrap_or(false),
        max_body_size: usize::try_from(max_body_size).unwrap_or(usize::MAX),
        retention: aigate_store::Retention {
            max_records,
            at_cap: match c.at_cap {
                Some(AtCapValue::StopInserting) => aigate_store::AtCap::StopInserting,
                _ => aigate_store::AtCap::DeleteOldest,
            },
            max_age_ms: c.max_age.map(|d| u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX)),
        },
    })
}

/// Gateway and provider names: 1-64 characters of `[A-Za-z0-9_-]`.
fn validate_name(section: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "{section}.{name}: names are 1-64 characters of letters, digits, '-' and '_'"
        )))
    }
}

/// Resolves `env:NAME` or a file path into a [`Secret`]; errors name `key` and the line.
fn resolve_secret(
    source: &str,
    value: &Spanned<String>,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, ConfigError> {
    let line = line_of(source, value.span().start);
    let raw = value.get_ref().trim();
    let resolved = if let Some(var) = raw.strip_prefix("env:") {
        env(var)
            .ok_or_else(|| ConfigError::Invalid(format!("line {line}: {key}: environment variable {var} is not set")))?
    } else if raw.is_empty() {
        return Err(ConfigError::Invalid(format!("line {line}: {key}: empty; write env:NAME or a path to a file")));
    } else {
        std::fs::read_to_string(raw).map_err(|e| {
            ConfigError::Invalid(format!(
                "line {line}: {key}: secrets are written as env:NAME or a path to a file holding the value; reading the file failed ({})",
                e.kind()
            ))
        })?
    };
    let resolved = resolved.trim();
    if resolved.is_empty() {
        return Err(ConfigError::Invalid(format!("line {line}: {key}: the secret is empty")));
    }
    Ok(Secret::new(resolved))
}

/// 1-based line number of a byte offset.
fn line_of(source: &str, offset: usize) -> usize {
    source.as_bytes()[..offset.min(source.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

fn sorted_names<V>(m: &HashMap<String, V>) -> String {
    let mut v: Vec<&str> = m.keys().map(String::as_str).collect();
    v.sort_unstable();
    v.join(", ")
}

/// Default cache settings (cache off), for unit tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn validate_logs_for_tests() -> LogSettings {
    validate_logs(&LogsConfig::default(), "test").unwrap_or_else(|_| unreachable!())
}

#[cfg(test)]
pub(crate) fn validate_cache_for_tests() -> CacheSettings {
    validate_cache(&CacheConfig::default(), "test").unwrap_or_else(|_| unreachable!())
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
