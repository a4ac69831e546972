//! Validation: the file form ([`FileConfig`]) becomes the runtime [`Settings`]. Pure apart from
//! reading secrets (environment lookup injected, files read) and a LiteLLM price file.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use super::file::*;
use super::*;
use crate::providers::{self, AuthStyle, Provider};

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
                retries: validate_retries(&gc.retries, &key("retries"))?,
                routes: validate_routes(&gc.routes, &key("routes"), &providers)?,
                canary: validate_canary(gc.canary.as_ref(), &name, &key("canary"))?,
                breaker: gc
                    .breaker
                    .as_ref()
                    .map(|b| crate::routing::breaker::BreakerSettings::validate(b, &key("breaker")))
                    .transpose()
                    .map_err(invalid)?,
            };
            gateways.insert(name, Arc::new(gw));
        }
        check_canaries(&gateways)?;
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
            max_connections_per_host: match self.upstream.max_connections_per_host {
                Some(0) => return Err(invalid("upstream.max_connections_per_host: must be greater than zero".into())),
                n => n.unwrap_or(1024),
            },
        };
        let disk_bytes = self.storage.cache_disk.map_or(2_000_000_000, |b| b.0);
        let cache_spec = self.storage.cache.as_deref().unwrap_or("disk");
        let cache_backend = aigate_store::CacheBackend::parse(cache_spec, &self.data_dir.join("cache"), disk_bytes)
            .map_err(|e| invalid(format!("storage.cache: {e}")))?;
        let logs_spec = self.storage.logs.as_deref().unwrap_or("sqlite");
        let logs_backend = aigate_store::LogBackend::parse(logs_spec, &self.data_dir)
            .map_err(|e| invalid(format!("storage.logs: {e}")))?;
        let limits_spec = self.storage.limits.as_deref().unwrap_or("memory");
        let limits_backend =
            aigate_store::LimitBackend::parse(limits_spec).map_err(|e| invalid(format!("storage.limits: {e}")))?;
        let storage = StorageSettings {
            backends: aigate_store::Backends {
                cache: cache_backend,
                cache_memory: self.storage.cache_memory.map_or(256_000_000, |b| b.0),
                limits: limits_backend,
                logs: logs_backend,
            },
            log_queue: match self.storage.log_queue {
                Some(0) => return Err(invalid("storage.log_queue: must be greater than zero".into())),
                Some(n) => n,
                None => 10_000,
            },
            log_spill_max: self.storage.log_spill_max.map_or(1_000_000_000, |b| b.0),
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
        let telemetry = validate_telemetry(&self.telemetry, source, env)?;
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
            listen_backlog: match self.listen_backlog {
                Some(0) => return Err(invalid("listen_backlog: must be greater than zero".into())),
                n => n.unwrap_or(4096),
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
            blocking_threads: match self.blocking_threads {
                Some(0) => return Err(invalid("blocking_threads: must be greater than zero".into())),
                Some(n) => n,
                None => 16,
            },
            upstream,
            providers,
            gateways,
            storage,
            admin_token,
            prices: Arc::new(prices),
            limits,
            dashboard: DashboardSettings {
                read_only: self.dashboard.read_only.unwrap_or(false),
                session_ttl: match self.dashboard.session_ttl {
                    Some(d) if d.0 < Duration::from_secs(60) => {
                        return Err(invalid("dashboard.session_ttl: must be at least 60s".into()))
                    }
                    Some(d) => d.0,
                    None => Duration::from_secs(12 * 3600),
                },
            },
            telemetry,
            source: None,
        })
    }
}

/// Validates `[telemetry]`: `None` when no endpoint is set (export off).
fn validate_telemetry(
    t: &TelemetryConfig,
    source: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<TelemetrySettings>, ConfigError> {
    let invalid = |m: String| ConfigError::Invalid(m);
    let Some(endpoint) = t.otlp_endpoint.as_deref().map(str::trim) else {
        return Ok(None);
    };
    let base = endpoint
        .parse::<http::Uri>()
        .ok()
        .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some_and(|h| !h.is_empty()))
        .filter(|u| u.query().is_none())
        .ok_or_else(|| {
            invalid(format!(
                "telemetry.otlp_endpoint: {endpoint:?} is not an http(s) URL like \"http://127.0.0.1:4318\""
            ))
        })?;
    // `aigate check` prints the endpoint: credentials go in headers, which are secrets.
    if base.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(invalid(
            "telemetry.otlp_endpoint: credentials in the URL are not accepted; put them in [telemetry.headers] as env:NAME"
                .into(),
        ));
    }
    // The OTLP exporter convention: signal paths are appended to the base URL's path.
    let path = base.path().trim_end_matches('/');
    let url = |signal: &str| -> Result<http::Uri, ConfigError> {
        let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
        format!("{}://{authority}{path}/v1/{signal}", base.scheme_str().unwrap_or("http"))
            .parse()
            .map_err(|_| invalid(format!("telemetry.otlp_endpoint: {endpoint:?} is not a usable URL")))
    };
    let mut headers = Vec::with_capacity(t.headers.len());
    for (name, value) in &t.headers {
        let key = format!("telemetry.headers.{name}");
        let header = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid(format!("{key}: {name:?} is not a valid header name")))?;
        let secret = resolve_secret(source, value, &key, env)?;
        if http::HeaderValue::from_str(secret.expose()).is_err() {
            return Err(invalid(format!("{key}: the value is not a valid header value")));
        }
        headers.push((header, secret));
    }
    let positive = |v: Option<usize>, default: usize, key: &str| match v {
        Some(0) => Err(invalid(format!("telemetry.{key}: must be greater than zero"))),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    let at_least = |v: Option<DurationValue>, default: Duration, min: Duration, key: &str| match v {
        Some(d) if d.0 < min => {
            Err(invalid(format!("telemetry.{key}: must be at least {}", humantime::format_duration(min))))
        }
        Some(d) => Ok(d.0),
        None => Ok(default),
    };
    let service_name = t.service_name.as_deref().map(str::trim).unwrap_or("aigate");
    if service_name.is_empty() {
        return Err(invalid("telemetry.service_name: must not be empty".into()));
    }
    Ok(Some(TelemetrySettings {
        endpoint: endpoint.to_owned(),
        traces_url: url("traces")?,
        metrics_url: url("metrics")?,
        service_name: service_name.to_owned(),
        headers,
        batch_size: positive(t.batch_size, 512, "batch_size")?,
        queue: positive(t.queue, 4096, "queue")?,
        export_interval: at_least(
            t.export_interval,
            Duration::from_secs(60),
            Duration::from_millis(100),
            "export_interval",
        )?,
        timeout: at_least(t.timeout, Duration::from_secs(10), Duration::from_millis(10), "timeout")?,
    }))
}

/// Validates `[gateways.NAME.routes]`.
fn validate_routes(
    routes: &std::collections::BTreeMap<String, RouteConfig>,
    key: &str,
    providers: &HashMap<String, Arc<Provider>>,
) -> Result<HashMap<String, Arc<crate::routing::dynamic::DynamicRoute>>, ConfigError> {
    let known = |p: &str| providers.contains_key(p);
    let mut out = HashMap::with_capacity(routes.len());
    for (name, rc) in routes {
        validate_name("routes", name)?;
        let r = crate::routing::dynamic::DynamicRoute::validate(name, rc, &format!("{key}.{name}"), &known)
            .map_err(ConfigError::Invalid)?;
        out.insert(name.clone(), Arc::new(r));
    }
    Ok(out)
}

/// Validates `[gateways.NAME.canary]` on its own; [`check_canaries`] checks the gateway it names.
fn validate_canary(
    c: Option<&CanaryConfig>,
    gateway: &str,
    key: &str,
) -> Result<Option<crate::routing::Canary>, ConfigError> {
    let Some(c) = c else { return Ok(None) };
    if !(0.0..=100.0).contains(&c.percent) {
        return Err(ConfigError::Invalid(format!("{key}.percent: {} is not between 0 and 100", c.percent)));
    }
    if c.gateway == gateway {
        return Err(ConfigError::Invalid(format!("{key}.gateway: a gateway cannot be its own canary")));
    }
    let sticky = c
        .sticky
        .as_deref()
        .map(crate::routing::Sticky::parse)
        .transpose()
        .map_err(|e| ConfigError::Invalid(format!("{key}.sticky: {e}")))?;
    Ok(Some(crate::routing::Canary { gateway: c.gateway.clone(), percent: c.percent, sticky }))
}

/// A canary names a configured gateway that has no canary of its own.
fn check_canaries(gateways: &HashMap<String, Arc<Gateway>>) -> Result<(), ConfigError> {
    for (name, g) in gateways {
        let Some(c) = &g.canary else { continue };
        match gateways.get(&c.gateway) {
            None => {
                return Err(ConfigError::Invalid(format!(
                    "gateways.{name}.canary.gateway: {:?} is not a configured gateway; configured: {}",
                    c.gateway,
                    sorted_names(gateways)
                )))
            }
            Some(t) if t.canary.is_some() => {
                return Err(ConfigError::Invalid(format!(
                    "gateways.{name}.canary.gateway: {:?} has a canary of its own; a canary cannot have one",
                    c.gateway
                )))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Validates `[gateways.NAME.retries]`.
fn validate_retries(r: &RetriesConfig, key: &str) -> Result<RetrySettings, ConfigError> {
    let max_attempts = r.max_attempts.unwrap_or(1);
    if !(1..=RetrySettings::MAX_ATTEMPTS).contains(&max_attempts) {
        return Err(ConfigError::Invalid(format!("{key}.max_attempts: {max_attempts} is not between 1 and 5")));
    }
    let delay = r.delay.map_or(Duration::ZERO, |d| d.0);
    if delay > RetrySettings::MAX_DELAY {
        return Err(ConfigError::Invalid(format!("{key}.delay: at most 5s")));
    }
    Ok(RetrySettings { max_attempts, delay, backoff: r.backoff.unwrap_or_default() })
}

/// Validates `[gateways.NAME.cache]`.
pub(super) fn validate_cache(c: &CacheConfig, key: &str) -> Result<CacheSettings, ConfigError> {
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
        rules: crate::cache::rules::CacheRules::validate(&c.rules, key).map_err(ConfigError::Invalid)?,
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
pub(super) fn validate_logs(c: &LogsConfig, key: &str) -> Result<LogSettings, ConfigError> {
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
