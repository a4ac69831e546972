//! The file form of the configuration: the TOML a user writes, as serde structs. Every struct
//! denies unknown fields, so a typo is an error at start naming the key and line; every field
//! documents its default.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::providers::AuthStyle;

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
    /// Connections the listen queue holds before they are accepted (capped by the kernel's
    /// `net.core.somaxconn`). Default 4096.
    #[serde(default)]
    pub listen_backlog: Option<u32>,
    /// Longest time to receive a request body. Default `60s`; slower uploads get 408.
    #[serde(default)]
    pub request_body_timeout: Option<DurationValue>,
    /// Longest time to receive a request head (and longest idle time of a kept-alive connection
    /// between requests). Default `30s`.
    #[serde(default)]
    pub header_read_timeout: Option<DurationValue>,
    /// Most threads for blocking work (the SQLite log store, the disk cache, DNS lookups); more
    /// such work waits for a free thread. Default 16.
    #[serde(default)]
    pub blocking_threads: Option<usize>,
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
    /// The web console at `/dashboard`.
    #[serde(default)]
    pub dashboard: DashboardConfig,
    /// OpenTelemetry export (OTLP/HTTP): a span per request and periodic metrics.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// `[telemetry]`: OpenTelemetry export over OTLP/HTTP (protobuf). Off unless `otlp_endpoint` is
/// set. Read at start only: a change applies after a restart.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The collector's base URL, e.g. `http://127.0.0.1:4318`; spans go to `/v1/traces` and
    /// metrics to `/v1/metrics` under it. Default: none (export off).
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported resource. Default `aigate`.
    pub service_name: Option<String>,
    /// Headers sent with every export, e.g. `authorization = "env:OTLP_AUTH"` (secrets: `env:NAME`
    /// or a path to a file holding the value). Default none.
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
    /// Most spans in one export request. Default 512.
    pub batch_size: Option<usize>,
    /// Spans waiting for the exporter; when full, new spans are dropped and counted. Default 4096.
    pub queue: Option<usize>,
    /// How often metrics are exported. Default `60s`.
    pub export_interval: Option<DurationValue>,
    /// Longest time one export request may take before it is abandoned. Default `10s`.
    pub timeout: Option<DurationValue>,
}

/// `[dashboard]`: the web console (served whenever `[admin] token` is set).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardConfig {
    /// Show settings without letting them be changed (replicas managed by deployment). Default false.
    pub read_only: Option<bool>,
    /// How long a login lasts. Default `12h`.
    pub session_ttl: Option<DurationValue>,
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
    /// Exceptions to these defaults, tried in order; the first that matches wins.
    #[serde(default)]
    pub rules: Vec<CacheRuleConfig>,
}

/// `[[gateways.NAME.cache.rules]]`: requests it matches get their own TTL, or bypass the cache.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRuleConfig {
    /// Its name in the `aigate-cache-rule` header and metrics. Default `#N` (its 1-based position).
    #[serde(default)]
    pub name: Option<String>,
    /// Conditions, all of which must hold: `endpoint` (`chat`, `embeddings`, …), `model`,
    /// `metadata.KEY`, `path_prefix` (of the provider path). Checked by `validate` so an error
    /// names the rule.
    #[serde(default, rename = "match")]
    pub matches: toml::Table,
    /// TTL of the entries it stores, 60s to 30 days. Default: the gateway's.
    #[serde(default)]
    pub ttl: Option<toml::Value>,
    /// `false`: matching requests bypass the cache. Default true.
    #[serde(default)]
    pub enabled: Option<bool>,
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

impl CacheMode {
    /// The value as the configuration writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::On => "on",
            CacheMode::Shadow => "shadow",
            CacheMode::Off => "off",
        }
    }
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

impl CacheScope {
    /// The value as the configuration writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheScope::Credential => "credential",
            CacheScope::Gateway => "gateway",
        }
    }
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
    /// Most connections open to one upstream host at once; more requests wait for one within
    /// their timeout. Default 1024.
    pub max_connections_per_host: Option<usize>,
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
    /// Retries of a failed upstream request.
    #[serde(default)]
    pub retries: RetriesConfig,
    /// Dynamic routes by name: a request whose model is `dynamic/NAME` follows route NAME.
    #[serde(default)]
    pub routes: BTreeMap<String, RouteConfig>,
    /// A share of this gateway's traffic served with another gateway's settings.
    #[serde(default)]
    pub canary: Option<CanaryConfig>,
    /// Skip an upstream that keeps failing.
    #[serde(default)]
    pub breaker: Option<BreakerConfig>,
}

/// `[gateways.NAME.routes.ROUTE]`: either `steps` (a fallback chain) or `[[arms]]` (a weighted
/// split, each arm its own chain).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Steps tried in order until one answers 2xx.
    #[serde(default)]
    pub steps: Vec<StepConfig>,
    /// Weighted arms; the first arm whose `when` matches the request's metadata takes part.
    #[serde(default)]
    pub arms: Vec<ArmConfig>,
    /// `"credential"` or `"metadata.KEY"`: the same caller always gets the same arm.
    #[serde(default)]
    pub sticky: Option<String>,
}

/// One arm of a dynamic route.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ArmConfig {
    /// Relative weight (1 to 10,000). Default 1.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Metadata the request must carry for the arm to take part, e.g. `{ "metadata.tier" = "free" }`.
    #[serde(default)]
    pub when: BTreeMap<String, String>,
    /// The arm's steps, tried in order.
    pub steps: Vec<StepConfig>,
}

/// One step of a dynamic route.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// A configured provider.
    pub provider: String,
    /// The provider's model name.
    pub model: String,
    /// Time to the first byte for this step (default: the gateway's `request_timeout`).
    #[serde(default)]
    pub timeout: Option<String>,
    /// Attempts for this step, 1 to 5 (default: the gateway's retries).
    #[serde(default)]
    pub max_attempts: Option<u32>,
}

/// `[gateways.NAME.canary]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// The gateway whose settings serve the canary share (it logs those requests).
    pub gateway: String,
    /// The share of traffic, 0 to 100 (fractions allowed).
    pub percent: f64,
    /// `"credential"` or `"metadata.KEY"`: a caller stays on one side. Default: per request.
    #[serde(default)]
    pub sticky: Option<String>,
}

/// `[gateways.NAME.breaker]`: a circuit breaker per provider.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Failures in a row (5xx, unreachable, timeout) that open the breaker. Default 5.
    pub failures: Option<u32>,
    /// Window those failures must fall in. Default `60s`.
    pub window: Option<DurationValue>,
    /// How long an open breaker skips the provider before one probe request. Default `30s`.
    pub cool_off: Option<DurationValue>,
}

/// `[gateways.NAME.retries]`: Cloudflare's retry settings for the gateway (a request's
/// `cf-aig-max-attempts`, `cf-aig-retry-delay` and `cf-aig-backoff` headers override them).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetriesConfig {
    /// Attempts in all, 1 to 5. Default 1 (no retry).
    pub max_attempts: Option<u32>,
    /// Wait before the first retry (later ones follow `backoff`), up to `5s`. Default `0s`.
    pub delay: Option<DurationValue>,
    /// `constant` (default), `linear` or `exponential`.
    pub backoff: Option<Backoff>,
}

/// How the wait grows between retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backoff {
    /// The same wait every time.
    #[default]
    Constant,
    /// The wait times the retry's number.
    Linear,
    /// The wait doubled at each retry.
    Exponential,
}

impl Backoff {
    /// The value as the configuration and `cf-aig-backoff` write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Backoff::Constant => "constant",
            Backoff::Linear => "linear",
            Backoff::Exponential => "exponential",
        }
    }
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
