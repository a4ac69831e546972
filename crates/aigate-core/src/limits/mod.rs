//! Rate limits and budgets, the machinery shared by every request: the limit store, the options,
//! and what happens after a request (the limits phase, [`crate::phases::limits`], reserves).
//!
//! - When the response ends, the log pipeline's writer settles every reservation to the actual
//!   amount ([`LimitLayer::settle`]: usage from the response, its cost; 0 for a cache hit or a
//!   failed request), so concurrent requests overshoot a limit by at most what is in flight.
//! - Budgets then check their alert thresholds; each fires once per period (deduplicated through
//!   the same store, so once across replicas): a log line, a metric and a JSON POST to the
//!   configured webhook, delivered in order by one task through a bounded queue
//!   ([`WEBHOOK_QUEUE`]; a full queue drops the POST, counted).
//! - Budgets run over UTC calendar periods (hour, day, week from Monday, month) or a rolling
//!   duration. A calendar budget's key carries its window start, so it starts from zero at each
//!   boundary.
//! - A failing store follows `on_store_error`: allow (counted, logged once per 10 s) or deny (503).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aigate_store::{LimitSpec, RateLimitStore, Reservation, Technique};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};

use crate::client::HttpClient;
use crate::clock::Clock;
use crate::metrics::Metrics;

pub mod rules;

pub use rules::{Budget, BudgetPeriod, LimitKey, LimitOptions, Measure, OnStoreError, Rule};

/// `x-ratelimit-*` response headers, as OpenAI sends them.
pub mod headers {
    use http::HeaderName;
    /// Request limit of the tightest request rule.
    pub const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
    /// Requests left under it.
    pub const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
    /// When it frees capacity (`1s`, `6m0s`).
    pub const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
    /// Token limit of the tightest token rule.
    pub const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
    /// Tokens left under it.
    pub const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
    /// When it frees capacity.
    pub const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
}

/// Micro-USD per USD: costs are counted in whole micro-dollars by the store.
pub const MICROS_PER_USD: f64 = 1_000_000.0;

/// A reservation held by a request until its response ends.
#[derive(Debug, Clone)]
pub struct Held {
    /// The rule.
    pub rule: Rule,
    /// The gateway.
    pub gateway: Arc<str>,
    /// The reservation.
    pub reservation: Reservation,
    /// The calendar window of a budget.
    pub window: Option<(u64, u64)>,
}

/// What the limits phase let through: reservations to settle and the headers to send.
#[derive(Debug, Default)]
pub struct Admission {
    /// Reservations, settled when the response ends.
    pub held: Vec<Held>,
    /// `x-ratelimit-*` headers of the tightest request and token rules.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// USD as whole micro-dollars, rounded up.
pub fn usd_to_micros(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * MICROS_PER_USD).ceil() as u64
    } else {
        0
    }
}

/// Counters of the limit stage.
#[derive(Debug, Default)]
pub struct LimitStats {
    /// Store errors.
    pub store_errors: AtomicU64,
    /// Requests refused.
    pub limited: AtomicU64,
    /// Alerts sent.
    pub alerts: AtomicU64,
    /// Webhook deliveries that failed.
    pub webhook_failures: AtomicU64,
    last_warn_ms: AtomicU64,
}

/// The limit stage's shared state.
pub struct LimitLayer {
    /// The store.
    pub store: Arc<dyn RateLimitStore>,
    /// Counters.
    pub stats: Arc<LimitStats>,
    pub(crate) opts: ArcSwap<LimitOptions>,
    pub(crate) clock: Clock,
    pub(crate) metrics: Arc<Metrics>,
    /// Settlements may be requested from the log spill thread, outside the runtime.
    runtime: Option<tokio::runtime::Handle>,
    /// Alert deliveries, POSTed in order by one task.
    webhook_tx: Option<tokio::sync::mpsc::Sender<(http::Uri, Bytes)>>,
    /// Settlements, joined into batches by the settler task ([`LimitLayer::start_settler`]).
    settle_tx: std::sync::OnceLock<tokio::sync::mpsc::Sender<Vec<(Held, u64)>>>,
}

/// Alerts waiting for webhook delivery; beyond, an alert's POST is dropped (and counted).
pub const WEBHOOK_QUEUE: usize = 256;

/// Records' settlements waiting for the settler task; beyond, a record's are settled on their own.
pub const SETTLE_QUEUE: usize = 4096;

/// Most records' settlements joined into one store call.
pub const SETTLE_BATCH: usize = 256;

/// Delivers alerts one after the other, so a receiver sees them in the order they fired.
async fn deliver_webhooks(
    mut rx: tokio::sync::mpsc::Receiver<(http::Uri, Bytes)>,
    client: HttpClient,
    stats: Arc<LimitStats>,
) {
    while let Some((url, body)) = rx.recv().await {
        let mut req = http::Request::new(http_body_util::Full::new(body));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = url;
        req.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(10), client.request(req)).await,
            Ok(Ok(r)) if r.status().is_success()
        );
        if !ok {
            stats.webhook_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("budget alert webhook delivery failed");
        }
    }
}

impl std::fmt::Debug for LimitLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitLayer").field("store", &self.store.kind()).finish_non_exhaustive()
    }
}

/// `37s`, `1m5s`, `250ms`: durations as OpenAI writes them in `x-ratelimit-reset-*`.
pub fn format_reset(ms: u64) -> String {
    // Pieced together rather than with `format!`: it runs for every rule of every request (the
    // `x-ratelimit-reset-*` headers), and the formatting machinery cost more than the rest of them.
    let mut out = String::with_capacity(16);
    let mut put = |n: u64, unit: &str| {
        out.push_str(itoa::Buffer::new().format(n));
        out.push_str(unit);
    };
    if ms < 1000 {
        put(ms, "ms");
    } else {
        let s = ms.div_ceil(1000);
        let (h, m, s) = (s / 3600, s % 3600 / 60, s % 60);
        if h > 0 {
            put(h, "h");
        }
        if h > 0 || m > 0 {
            put(m, "m");
        }
        put(s, "s");
    }
    out
}

impl LimitLayer {
    /// The layer over `store`.
    pub fn new(
        store: Arc<dyn RateLimitStore>,
        opts: LimitOptions,
        stats: Arc<LimitStats>,
        clock: Clock,
        client: HttpClient,
        metrics: Arc<Metrics>,
    ) -> LimitLayer {
        let runtime = tokio::runtime::Handle::try_current().ok();
        let webhook_tx = runtime.as_ref().map(|rt| {
            let (tx, rx) = tokio::sync::mpsc::channel(WEBHOOK_QUEUE);
            rt.spawn(deliver_webhooks(rx, client.clone(), stats.clone()));
            tx
        });
        LimitLayer {
            store,
            stats,
            opts: ArcSwap::from_pointee(opts),
            clock,
            metrics,
            runtime,
            webhook_tx,
            settle_tx: std::sync::OnceLock::new(),
        }
    }

    /// Applies reloaded options.
    pub fn configure(&self, opts: LimitOptions) {
        self.opts.store(Arc::new(opts));
    }

    /// The options in force.
    pub fn options(&self) -> Arc<LimitOptions> {
        self.opts.load_full()
    }

    /// Gives reservations back before returning (a fallback step failed: the next step reserves
    /// again, and must see them gone).
    pub(crate) async fn release_now(&self, held: Vec<Held>) {
        let back: Vec<_> = held.into_iter().map(|h| (h.reservation, 0)).collect();
        let _ = self.store.settle_all(&back).await;
    }

    /// Settles reservations to the actual amounts and checks budget alerts (spawned: the caller is
    /// the log writer, which must not wait on the network per record).
    pub fn settle(self: &Arc<Self>, settlements: Vec<(Held, u64)>) {
        if settlements.is_empty() {
            return;
        }
        // Queued for the settler task, which joins what arrives together into one store call;
        // when it is behind (or absent: no runtime when the layer was built), settled on its own.
        let settlements = match self.settle_tx.get() {
            None => settlements,
            Some(tx) => match tx.try_send(settlements) {
                Ok(()) => return,
                Err(e) => e.into_inner(),
            },
        };
        let this = self.clone();
        let Some(rt) = tokio::runtime::Handle::try_current().ok().or_else(|| self.runtime.clone()) else { return };
        rt.spawn(async move { this.settle_now(settlements).await });
    }

    /// Settles in one store call what differs from its reservation (an exact reservation, as every
    /// request rule's, needs none), then checks the budgets' alerts.
    async fn settle_now(&self, settlements: Vec<(Held, u64)>) {
        let changed: Vec<(Reservation, u64)> = settlements
            .iter()
            .filter(|(h, actual)| *actual != h.reservation.amount())
            .map(|(h, actual)| (h.reservation.clone(), *actual))
            .collect();
        if let Err(e) = self.store.settle_all(&changed).await {
            self.store_error(&e);
        }
        for (h, _) in &settlements {
            if h.rule.budget.is_some() {
                self.check_alerts(h).await;
            }
        }
    }

    /// Starts the settler task (once; needs a runtime): settlements queued by [`LimitLayer::settle`]
    /// go to the store in batches of up to [`SETTLE_BATCH`] records.
    pub fn start_settler(self: &Arc<Self>) {
        let Some(rt) = tokio::runtime::Handle::try_current().ok().or_else(|| self.runtime.clone()) else { return };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<(Held, u64)>>(SETTLE_QUEUE);
        if self.settle_tx.set(tx).is_err() {
            return;
        }
        // A weak reference: the task ends with the layer (its sender is dropped with it).
        let weak = Arc::downgrade(self);
        rt.spawn(async move {
            let mut batch = Vec::new();
            while rx.recv_many(&mut batch, SETTLE_BATCH).await > 0 {
                let Some(this) = weak.upgrade() else { return };
                this.settle_now(batch.drain(..).flatten().collect()).await;
            }
        });
    }

    async fn check_alerts(&self, h: &Held) {
        let Some(budget) = &h.rule.budget else { return };
        let Ok(d) = self.store.peek(h.reservation.key(), h.reservation.spec()).await else { return };
        let fraction = d.used as f64 / h.rule.limit.max(1) as f64;
        for &t in &budget.alerts {
            if fraction + 1e-12 < t {
                continue;
            }
            // Once per threshold and period, across replicas: a limit of 1 in the same store.
            let dedupe = format!("alert:{}:{t}", h.reservation.key());
            let spec = match h.window {
                Some((start, end)) => LimitSpec { limit: 1, period_ms: end - start, technique: Technique::Sliding },
                None => LimitSpec { limit: 1, period_ms: h.rule.period_ms, technique: Technique::Fixed },
            };
            match self.store.acquire(&dedupe, &spec, 1).await {
                Ok(first) if first.allowed => self.fire_alert(h, budget, t, d.used),
                Ok(_) => {}
                Err(e) => self.store_error(&e),
            }
        }
    }

    fn fire_alert(&self, h: &Held, budget: &Budget, threshold: f64, used: u64) {
        self.stats.alerts.fetch_add(1, Ordering::Relaxed);
        self.metrics.record_alert(&h.gateway, &h.rule.name, threshold);
        let used_usd = used as f64 / MICROS_PER_USD;
        tracing::warn!(
            gateway = %h.gateway,
            budget = %h.rule.name,
            threshold,
            used_usd,
            limit_usd = budget.limit_usd,
            "budget alert: {:.0} % of ${:.2} per {} reached",
            threshold * 100.0,
            budget.limit_usd,
            budget.period.label()
        );
        let Some(url) = self.webhook_url() else { return };
        let payload = serde_json::json!({
            "type": "budget_alert",
            "gateway": &*h.gateway,
            "budget": &*h.rule.name,
            "threshold": threshold,
            "used_usd": used_usd,
            "limit_usd": budget.limit_usd,
            "period": budget.period.label(),
            "window_start_ms": h.window.map(|w| w.0),
            "window_end_ms": h.window.map(|w| w.1),
            "at_ms": self.clock.now_ms(),
        });
        let queued =
            self.webhook_tx.as_ref().is_some_and(|tx| tx.try_send((url, Bytes::from(payload.to_string()))).is_ok());
        if !queued {
            self.stats.webhook_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("budget alert webhook queue full: alert not delivered");
        }
    }

    fn webhook_url(&self) -> Option<http::Uri> {
        self.opts.load().alert_webhook.clone()
    }

    pub(crate) fn store_error(&self, e: &aigate_store::StoreError) {
        self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
        let now = self.clock.now_ms();
        let last = self.stats.last_warn_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 10_000
            && self.stats.last_warn_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            tracing::warn!(store = self.store.kind(), error = %e, "rate-limit store failing");
        }
    }
}

/// The amount to settle a reservation to, from the finished request.
pub fn actual_amount(
    measure: Measure,
    reserved: u64,
    hit: bool,
    success: bool,
    tokens: Option<u64>,
    cost_usd: Option<f64>,
    count_cache_hits: bool,
) -> u64 {
    match measure {
        Measure::Requests if hit && !count_cache_hits => 0,
        Measure::Requests => 1,
        _ if hit => 0,
        Measure::Tokens => tokens.unwrap_or(if success { reserved } else { 0 }),
        Measure::CostUsd => cost_usd.map_or(if success { reserved } else { 0 }, usd_to_micros),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_format_and_amounts() {
        assert_eq!(format_reset(250), "250ms");
        assert_eq!(format_reset(37_000), "37s");
        assert_eq!(format_reset(65_001), "1m6s");
        assert_eq!(format_reset(3_600_000), "1h0m0s");
        assert_eq!(
            (format_reset(0), format_reset(999), format_reset(1000)),
            ("0ms".into(), "999ms".into(), "1s".into())
        );
        assert_eq!((format_reset(60_000), format_reset(3_599_001)), ("1m0s".into(), "1h0m0s".into()));
        assert_eq!(format_reset(90_061_000), "25h1m1s");
        assert_eq!(usd_to_micros(0.0000011), 2);
        assert_eq!(actual_amount(Measure::Requests, 1, true, true, None, None, false), 0);
        assert_eq!(actual_amount(Measure::Tokens, 900, false, true, Some(120), None, false), 120);
        assert_eq!(actual_amount(Measure::Tokens, 900, false, false, None, None, false), 0);
        assert_eq!(actual_amount(Measure::CostUsd, 50, false, true, None, Some(0.00002), false), 20);
    }
}
