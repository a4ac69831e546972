//! Prometheus metrics, served at `GET /metrics` in the text exposition format.
//!
//! Per-request metrics are recorded by the log pipeline's writer when a request's record is
//! finalised ([`Metrics::record`]), never on the request path. Gauges and counters that live
//! elsewhere (cache store size, log queue depth, spills) are read at scrape time by a collector.
//!
//! Label values come from requests (model names), so their number is bounded: past
//! [`MAX_MODEL_LABELS`] distinct models, further ones are counted under `model="other"`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use aigate_store::{CacheStore, LogRecord};

use crate::cache::CacheLayer;
use crate::limits::LimitStats;
use crate::logs::LogStats;
use crate::telemetry::TelemetryStats;

/// Distinct model label values kept before new ones are folded into `other`.
pub const MAX_MODEL_LABELS: usize = 500;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    gateway: String,
    provider: String,
    model: String,
    status_class: &'static str,
    cache_status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    gateway: String,
    provider: String,
    model: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    gateway: String,
    provider: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    gateway: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheRuleLabels {
    gateway: String,
    rule: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    gateway: String,
    budget: String,
    threshold: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GatewayLabels {
    gateway: String,
    provider: String,
}

type HistogramFamily = Family<GatewayLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~65 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

fn overhead_histogram() -> Histogram {
    // 10 µs .. ~80 ms: the gateway's own time.
    Histogram::new(exponential_buckets(0.000_01, 2.0, 14))
}

/// The metrics registry and the per-request families.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<ModelLabels, Counter<f64, AtomicU64>>,
    saved: Family<ModelLabels, Counter<f64, AtomicU64>>,
    duration: HistogramFamily,
    ttfb: HistogramFamily,
    overhead: HistogramFamily,
    limited: Family<RuleLabels, Counter>,
    alerts: Family<AlertLabels, Counter>,
    retries: Family<GatewayLabels, Counter>,
    breaker_state: Family<GatewayLabels, Gauge>,
    breaker_skips: Family<GatewayLabels, Counter>,
    fallbacks: Family<GatewayLabels, Counter>,
    cache_rules: Family<CacheRuleLabels, Counter>,
    models: Mutex<HashSet<String>>,
    handles: Mutex<HandleCache>,
}

/// Label combinations whose handles are kept; past it the cache starts over (the families keep
/// every series; only the shortcut is dropped).
const MAX_HANDLE_SETS: usize = 4096;

/// Handles of the per-request metrics for one label combination (each an `Arc` to the series).
struct Handles {
    requests: Counter,
    tokens: [Counter; 4],
    cost: Counter<f64, AtomicU64>,
    saved: Counter<f64, AtomicU64>,
    duration: Histogram,
    ttfb: Histogram,
    overhead: Histogram,
}

#[derive(Default)]
struct HandleCache {
    /// Reused buffer of the lookup key.
    key: String,
    map: std::collections::HashMap<String, Handles>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry with aigate's metrics; `cache` and `logs` are read at scrape time.
    pub fn new(
        cache: Arc<CacheLayer>,
        logs: Arc<LogStats>,
        limits: Arc<LimitStats>,
        telemetry: Option<Arc<TelemetryStats>>,
    ) -> Arc<Metrics> {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("aigate_requests", "Requests through a gateway", requests.clone());
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "aigate_tokens",
            "Tokens reported by providers (kind: input, output, cached_input, reasoning); cache hits excluded",
            tokens.clone(),
        );
        let cost = Family::<ModelLabels, Counter<f64, AtomicU64>>::default();
        registry.register("aigate_cost_usd", "Cost paid to providers, USD (known prices only)", cost.clone());
        let saved = Family::<ModelLabels, Counter<f64, AtomicU64>>::default();
        registry.register("aigate_cost_saved_usd", "Cost saved by cache hits, USD", saved.clone());
        let duration = HistogramFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "aigate_request_duration_seconds",
            "Request duration, arrival to last byte",
            duration.clone(),
        );
        let ttfb = HistogramFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register("aigate_time_to_first_byte_seconds", "Arrival to first response byte", ttfb.clone());
        let overhead = HistogramFamily::new_with_constructor(overhead_histogram as fn() -> Histogram);
        registry.register(
            "aigate_gateway_overhead_seconds",
            "Time spent in aigate itself (before the upstream call and relaying its head)",
            overhead.clone(),
        );
        let limited = Family::<RuleLabels, Counter>::default();
        registry.register("aigate_rate_limited", "Requests refused by a rate limit or budget", limited.clone());
        let alerts = Family::<AlertLabels, Counter>::default();
        registry.register(
            "aigate_budget_alerts",
            "Budget alerts fired (threshold: fraction of the limit)",
            alerts.clone(),
        );
        let retries = Family::<GatewayLabels, Counter>::default();
        registry.register(
            "aigate_upstream_retries",
            "Upstream requests sent again after a failed attempt",
            retries.clone(),
        );
        let breaker_state = Family::<GatewayLabels, Gauge>::default();
        registry.register(
            "aigate_breaker_state",
            "Circuit breaker of a provider: 0 closed, 1 open, 2 half-open (a probe is in flight)",
            breaker_state.clone(),
        );
        let breaker_skips = Family::<GatewayLabels, Counter>::default();
        registry.register(
            "aigate_breaker_skips",
            "Requests not sent to a provider because its circuit breaker was open",
            breaker_skips.clone(),
        );
        let fallbacks = Family::<GatewayLabels, Counter>::default();
        registry.register(
            "aigate_fallbacks",
            "Fallback steps that failed or were skipped, so the next step was tried (by the step's provider)",
            fallbacks.clone(),
        );
        let cache_rules = Family::<CacheRuleLabels, Counter>::default();
        registry.register(
            "aigate_cache_rule_requests",
            "Requests a cache rule applied to, by cache status (HIT, MISS, BYPASS, SHADOW-HIT)",
            cache_rules.clone(),
        );
        registry.register_collector(Box::new(StateCollector { cache, logs, limits, telemetry }));
        Arc::new(Metrics {
            registry,
            requests,
            tokens,
            cost,
            saved,
            duration,
            ttfb,
            overhead,
            limited,
            alerts,
            retries,
            breaker_state,
            breaker_skips,
            fallbacks,
            cache_rules,
            models: Mutex::new(HashSet::new()),
            handles: Mutex::new(HandleCache::default()),
        })
    }

    /// Records one finished request. The metric handles of a label combination are looked up
    /// once and kept, so a record costs one map lookup (no label allocations) after the first.
    pub fn record(&self, r: &LogRecord) {
        let status_class = match r.status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let model = r.served_model.as_deref().or(r.requested_model.as_deref()).unwrap_or("");
        let mut cache = self.handles.lock().unwrap_or_else(PoisonError::into_inner);
        let cache = &mut *cache;
        cache.key.clear();
        for part in [r.gateway.as_str(), r.provider.as_str(), model, status_class, r.cache_status.as_str()] {
            cache.key.push_str(part);
            cache.key.push('\0');
        }
        let h = match cache.map.get(cache.key.as_str()) {
            Some(h) => h,
            None => {
                let h = self.handles_for(r, status_class, model);
                if cache.map.len() >= MAX_HANDLE_SETS {
                    cache.map.clear();
                }
                cache.map.entry(cache.key.clone()).or_insert(h)
            }
        };
        h.requests.inc();
        if r.cache_status != "HIT" {
            for (c, v) in h.tokens.iter().zip([r.tokens_in, r.tokens_out, r.cached_tokens_in, r.reasoning_tokens]) {
                if let Some(v) = v.filter(|&v| v > 0) {
                    c.inc_by(v);
                }
            }
        }
        if let Some(c) = r.cost_usd.filter(|c| *c > 0.0) {
            h.cost.inc_by(c);
        }
        if let Some(s) = r.saved_usd.filter(|c| *c > 0.0) {
            h.saved.inc_by(s);
        }
        h.duration.observe(r.duration_ms / 1000.0);
        if let Some(t) = r.ttfb_ms {
            h.ttfb.observe(t / 1000.0);
        }
        if let Some(o) = r.overhead_ms {
            h.overhead.observe(o / 1000.0);
        }
    }

    /// The metric handles of one label combination (created in the families if new).
    fn handles_for(&self, r: &LogRecord, status_class: &'static str, model: &str) -> Handles {
        let model = self.model_label(model);
        let (gateway, provider) = (r.gateway.clone(), r.provider.clone());
        let requests = self
            .requests
            .get_or_create(&RequestLabels {
                gateway: gateway.clone(),
                provider: provider.clone(),
                model: model.clone(),
                status_class,
                cache_status: r.cache_status.clone(),
            })
            .clone();
        let tokens = ["input", "output", "cached_input", "reasoning"].map(|kind| {
            self.tokens
                .get_or_create(&TokenLabels {
                    gateway: gateway.clone(),
                    provider: provider.clone(),
                    model: model.clone(),
                    kind,
                })
                .clone()
        });
        let ml = ModelLabels { gateway: gateway.clone(), provider: provider.clone(), model };
        let gl = GatewayLabels { gateway, provider };
        Handles {
            requests,
            tokens,
            cost: self.cost.get_or_create(&ml).clone(),
            saved: self.saved.get_or_create(&ml).clone(),
            duration: self.duration.get_or_create(&gl).clone(),
            ttfb: self.ttfb.get_or_create(&gl).clone(),
            overhead: self.overhead.get_or_create(&gl).clone(),
        }
    }

    /// A request refused by `rule`.
    pub fn record_limited(&self, gateway: &str, rule: &str) {
        self.limited.get_or_create(&RuleLabels { gateway: gateway.to_owned(), rule: rule.to_owned() }).inc();
    }

    /// A request a cache rule applied to (rule names are bounded by the configuration).
    pub fn record_cache_rule(&self, gateway: &str, rule: &str, status: &'static str) {
        self.cache_rules
            .get_or_create(&CacheRuleLabels { gateway: gateway.to_owned(), rule: rule.to_owned(), status })
            .inc();
    }

    /// An upstream request about to be sent again.
    pub fn record_retry(&self, gateway: &str, provider: &str) {
        self.retries.get_or_create(&GatewayLabels { gateway: gateway.to_owned(), provider: provider.to_owned() }).inc();
    }

    /// A circuit breaker changed state ([`crate::routing::breaker::State::code`]).
    pub fn record_breaker(&self, gateway: &str, provider: &str, state: i64) {
        self.breaker_state
            .get_or_create(&GatewayLabels { gateway: gateway.to_owned(), provider: provider.to_owned() })
            .set(state);
    }

    /// A request not sent to a provider whose breaker is open.
    pub fn record_breaker_skip(&self, gateway: &str, provider: &str) {
        self.breaker_skips
            .get_or_create(&GatewayLabels { gateway: gateway.to_owned(), provider: provider.to_owned() })
            .inc();
    }

    /// A chain's step failed or was skipped; the next is tried.
    pub fn record_fallback(&self, gateway: &str, provider: &str) {
        self.fallbacks
            .get_or_create(&GatewayLabels { gateway: gateway.to_owned(), provider: provider.to_owned() })
            .inc();
    }

    /// A budget alert.
    pub fn record_alert(&self, gateway: &str, budget: &str, threshold: f64) {
        let l =
            AlertLabels { gateway: gateway.to_owned(), budget: budget.to_owned(), threshold: threshold.to_string() };
        self.alerts.get_or_create(&l).inc();
    }

    fn model_label(&self, model: &str) -> String {
        let mut seen = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(model) {
            return model.to_owned();
        }
        if seen.len() >= MAX_MODEL_LABELS {
            return "other".to_owned();
        }
        seen.insert(model.to_owned());
        model.to_owned()
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Values owned by other parts of the gateway, read at scrape time.
struct StateCollector {
    cache: Arc<CacheLayer>,
    logs: Arc<LogStats>,
    limits: Arc<LimitStats>,
    /// Only when OpenTelemetry export is on.
    telemetry: Option<Arc<TelemetryStats>>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCollector").finish_non_exhaustive()
    }
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.cache.store.stats();
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        gauge(&mut enc, "aigate_cache_entries", "Entries in the cache store", i(s.entries))?;
        gauge(&mut enc, "aigate_cache_bytes", "Bytes in the cache store", i(s.bytes))?;
        counter(&mut enc, "aigate_cache_evictions", "Cache entries evicted for size", s.evictions)?;
        let m = self.cache.store.memory_stats();
        gauge(&mut enc, "aigate_cache_memory_entries", "Entries in the in-process memory tier", i(m.entries))?;
        gauge(
            &mut enc,
            "aigate_cache_memory_bytes",
            "Bytes the memory tier's entries hold (what cache_memory caps)",
            i(m.bytes),
        )?;
        let c = &self.cache.stats;
        counter(&mut enc, "aigate_cache_hits", "Responses served from the cache store", load(&c.hits))?;
        counter(
            &mut enc,
            "aigate_cache_coalesced",
            "Responses served from an identical request in flight",
            load(&c.coalesced),
        )?;
        counter(&mut enc, "aigate_cache_misses", "Cache lookups that missed", load(&c.misses))?;
        counter(&mut enc, "aigate_cache_shadow_hits", "Would-be hits of shadow-mode gateways", load(&c.shadow_hits))?;
        counter(&mut enc, "aigate_cache_writes", "Entries written to the cache store", load(&c.writes))?;
        counter(&mut enc, "aigate_cache_write_drops", "Entries not written (write queue full)", load(&c.write_drops))?;
        counter(&mut enc, "aigate_cache_store_errors", "Cache store errors (served as misses)", load(&c.store_errors))?;
        let l = &self.logs;
        gauge(&mut enc, "aigate_log_queue_depth", "Records waiting for the log writer", i(l.queue_depth()))?;
        counter(&mut enc, "aigate_log_records_written", "Log records stored", load(&l.written))?;
        counter(
            &mut enc,
            "aigate_log_records_spilled",
            "Log records spilled to disk (queue full or store failing)",
            load(&l.spilled),
        )?;
        counter(
            &mut enc,
            "aigate_log_records_replayed",
            "Spilled log records replayed into the store",
            load(&l.replayed),
        )?;
        counter(
            &mut enc,
            "aigate_log_records_dropped",
            "Log records lost (spill full or unwritable)",
            load(&l.dropped),
        )?;
        counter(&mut enc, "aigate_log_store_errors", "Log store errors", load(&l.store_errors))?;
        gauge(&mut enc, "aigate_log_spill_bytes", "Bytes in log spill files", i(load(&l.spill_bytes)))?;
        counter(
            &mut enc,
            "aigate_log_invalid_metadata",
            "Requests whose cf-aig-metadata was ignored",
            load(&l.invalid_metadata),
        )?;
        let r = &self.limits;
        counter(
            &mut enc,
            "aigate_limit_store_errors",
            "Rate-limit store errors (requests follow on_store_error)",
            load(&r.store_errors),
        )?;
        counter(&mut enc, "aigate_limit_refused", "Requests refused by a rate limit or budget", load(&r.limited))?;
        counter(
            &mut enc,
            "aigate_alert_webhook_failures",
            "Budget alert webhook deliveries that failed",
            load(&r.webhook_failures),
        )?;
        if let Some(t) = &self.telemetry {
            counter(
                &mut enc,
                "aigate_otel_exported_spans",
                "Spans the OTLP collector accepted",
                load(&t.exported_spans),
            )?;
            counter(
                &mut enc,
                "aigate_otel_dropped_spans",
                "Spans lost (export queue full or export failed)",
                load(&t.dropped_spans),
            )?;
            counter(
                &mut enc,
                "aigate_otel_export_errors",
                "OTLP export requests that failed or timed out",
                load(&t.export_errors),
            )?;
            gauge(&mut enc, "aigate_otel_queue_depth", "Spans waiting for the OTLP exporter", i(load(&t.queued)))?;
        }
        Ok(())
    }
}
