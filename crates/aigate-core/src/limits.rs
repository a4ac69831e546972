//! The limit stage: rate limits and spend limits (budgets), checked after the cache lookup (a hit
//! that does not count never reaches it) and before anything goes upstream.
//!
//! - Every rule of the gateway that applies to the request reserves its cost with one atomic
//!   check-and-reserve in the [`RateLimitStore`] (memory, or Redis shared by replicas): 1 for
//!   request rules, an estimate for token rules (prompt bytes / 4 plus `max_tokens`, else
//!   `default_max_tokens`) and for cost rules and budgets (that estimate priced, in micro-USD). A
//!   denial undoes the reservations already taken and answers 429 naming the rule, the limit, what
//!   was used and when it resets.
//! - When the response ends, the log pipeline's writer settles every reservation to the actual
//!   amount (usage from the response, its cost; 0 for a cache hit or a failed request), so concurrent
//!   requests overshoot a limit by at most what is in flight. Budgets then check their alert
//!   thresholds; each fires once per period (deduplicated through the same store, so once across
//!   replicas): a log line, a metric and a JSON POST to the configured webhook.
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
use serde::Deserialize;

use crate::client::HttpClient;
use crate::clock::Clock;
use crate::metrics::Metrics;

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

/// What a rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Requests.
    Requests,
    /// Input plus output tokens.
    Tokens,
    /// Cost in USD.
    CostUsd,
}

/// What a rule counts per.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    /// The whole gateway.
    Gateway,
    /// Each client credential (provider key or gateway token), by digest.
    Credential,
    /// Each requested model.
    Model,
    /// Each value of a `cf-aig-metadata` entry; requests without it are not counted by the rule.
    Metadata(String),
}

impl std::str::FromStr for LimitKey {
    type Err = String;
    fn from_str(s: &str) -> Result<LimitKey, String> {
        match s.trim() {
            "gateway" => Ok(LimitKey::Gateway),
            "credential" => Ok(LimitKey::Credential),
            "model" => Ok(LimitKey::Model),
            other => match other.strip_prefix("metadata.") {
                Some(k) if !k.is_empty() => Ok(LimitKey::Metadata(k.to_owned())),
                _ => Err(format!(
                    "unknown key {other:?}: expected \"gateway\", \"credential\", \"model\" or \"metadata.NAME\""
                )),
            },
        }
    }
}

/// The period of a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetPeriod {
    /// UTC hour.
    Hour,
    /// UTC day.
    Day,
    /// UTC week, from Monday.
    Week,
    /// UTC calendar month.
    Month,
    /// Any window of this many ms ending now.
    Rolling(u64),
}

impl std::str::FromStr for BudgetPeriod {
    type Err = String;
    fn from_str(s: &str) -> Result<BudgetPeriod, String> {
        match s.trim() {
            "hour" => Ok(BudgetPeriod::Hour),
            "day" => Ok(BudgetPeriod::Day),
            "week" => Ok(BudgetPeriod::Week),
            "month" => Ok(BudgetPeriod::Month),
            other => humantime::parse_duration(other)
                .ok()
                .filter(|d| !d.is_zero())
                .map(|d| BudgetPeriod::Rolling(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
                .ok_or_else(|| {
                    format!("invalid period {other:?}: hour, day, week, month, or a rolling duration like \"24h\"")
                }),
        }
    }
}

impl BudgetPeriod {
    /// The calendar window holding `now_ms`: (start, end); `None` for rolling periods.
    pub fn window(self, now_ms: u64) -> Option<(u64, u64)> {
        const H: u64 = 3_600_000;
        const D: u64 = 24 * H;
        let day = now_ms / D;
        match self {
            BudgetPeriod::Hour => Some((now_ms / H * H, now_ms / H * H + H)),
            BudgetPeriod::Day => Some((day * D, day * D + D)),
            BudgetPeriod::Week => {
                // 1970-01-01 was a Thursday: Monday-based weekday = (days + 3) % 7.
                let start = day - (day + 3) % 7;
                Some((start * D, (start + 7) * D))
            }
            BudgetPeriod::Month => {
                let (y, m, _) = civil_from_days(day);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                Some((days_from_civil(y, m, 1) * D, days_from_civil(ny, nm, 1) * D))
            }
            BudgetPeriod::Rolling(_) => None,
        }
    }

    pub(crate) fn label(self) -> String {
        match self {
            BudgetPeriod::Hour => "hour".into(),
            BudgetPeriod::Day => "day".into(),
            BudgetPeriod::Week => "week".into(),
            BudgetPeriod::Month => "month".into(),
            BudgetPeriod::Rolling(ms) => humantime::format_duration(Duration::from_millis(ms)).to_string(),
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm; no date crate
/// is needed for this one conversion).
fn days_from_civil(y: i64, m: u32, d: u32) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    u64::try_from(era * 146_097 + doe - 719_468).unwrap_or(0)
}

/// The date of a day number (inverse of [`days_from_civil`]).
fn civil_from_days(days: u64) -> (i64, u32, u32) {
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A budget's own settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// Its period.
    pub period: BudgetPeriod,
    /// Alert thresholds, fractions of the limit.
    pub alerts: Vec<f64>,
    /// The limit in USD (for messages).
    pub limit_usd: f64,
}

/// One rule of a gateway (a rate limit or a budget).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Name, unique in the gateway (in 429 messages, metrics and keys).
    pub name: Arc<str>,
    /// What it counts per.
    pub key: LimitKey,
    /// What it counts.
    pub measure: Measure,
    /// Limit in units of the measure (micro-USD for cost).
    pub limit: u64,
    /// Window length, ms (for calendar budgets: the longest window, used for expiry).
    pub period_ms: u64,
    /// Fixed or sliding.
    pub technique: Technique,
    /// Only requests for this model (as requested).
    pub model: Option<String>,
    /// Set for budgets.
    pub budget: Option<Budget>,
}

/// What happens when the limit store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Let requests through (default).
    #[default]
    Allow,
    /// Refuse them with 503.
    Deny,
}

/// Global limit options (`[limits]`).
#[derive(Debug, Clone, PartialEq)]
pub struct LimitOptions {
    /// Behaviour when the store fails.
    pub on_store_error: OnStoreError,
    /// Whether cache hits count against request rules.
    pub count_cache_hits: bool,
    /// Where budget alerts are POSTed.
    pub alert_webhook: Option<http::Uri>,
    /// Output tokens assumed for a request without `max_tokens`.
    pub default_max_tokens: u64,
}

impl Default for LimitOptions {
    fn default() -> Self {
        LimitOptions {
            on_store_error: OnStoreError::Allow,
            count_cache_hits: false,
            alert_webhook: None,
            default_max_tokens: 1024,
        }
    }
}

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

/// What the limit stage let through: reservations to settle and the headers to send.
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
    pub(crate) clock: Arc<Clock>,
    pub(crate) metrics: Arc<Metrics>,
    /// Settlements may be requested from the log spill thread, outside the runtime.
    runtime: Option<tokio::runtime::Handle>,
    /// Alert deliveries, POSTed in order by one task.
    webhook_tx: Option<tokio::sync::mpsc::Sender<(http::Uri, Bytes)>>,
}

/// Alerts waiting for webhook delivery; beyond, an alert's POST is dropped (and counted).
pub const WEBHOOK_QUEUE: usize = 256;

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
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = ms.div_ceil(1000);
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}

impl LimitLayer {
    /// The layer over `store`.
    pub fn new(
        store: Arc<dyn RateLimitStore>,
        opts: LimitOptions,
        stats: Arc<LimitStats>,
        clock: Arc<Clock>,
        client: HttpClient,
        metrics: Arc<Metrics>,
    ) -> LimitLayer {
        let runtime = tokio::runtime::Handle::try_current().ok();
        let webhook_tx = runtime.as_ref().map(|rt| {
            let (tx, rx) = tokio::sync::mpsc::channel(WEBHOOK_QUEUE);
            rt.spawn(deliver_webhooks(rx, client.clone(), stats.clone()));
            tx
        });
        LimitLayer { store, stats, opts: ArcSwap::from_pointee(opts), clock, metrics, runtime, webhook_tx }
    }

    /// Applies reloaded options.
    pub fn configure(&self, opts: LimitOptions) {
        self.opts.store(Arc::new(opts));
    }

    /// The options in force.
    pub fn options(&self) -> Arc<LimitOptions> {
        self.opts.load_full()
    }

    /// Gives reservations back (a later rule refused the request).
    pub(crate) fn release(&self, held: Vec<Held>) {
        if held.is_empty() {
            return;
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            for h in held {
                let _ = store.settle(&h.reservation, 0).await;
            }
        });
    }

    /// Settles reservations to the actual amounts and checks budget alerts (spawned: the caller is
    /// the log writer, which must not wait on the network per record).
    pub fn settle(self: &Arc<Self>, settlements: Vec<(Held, u64)>) {
        if settlements.is_empty() {
            return;
        }
        let this = self.clone();
        let Some(rt) = tokio::runtime::Handle::try_current().ok().or_else(|| self.runtime.clone()) else { return };
        rt.spawn(async move {
            for (h, actual) in settlements {
                // A reservation that was exact (every request rule) needs no round trip.
                if actual != h.reservation.amount() {
                    if let Err(e) = this.store.settle(&h.reservation, actual).await {
                        this.store_error(&e);
                        continue;
                    }
                }
                if h.rule.budget.is_some() {
                    this.check_alerts(&h).await;
                }
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
    fn calendar_windows() {
        // 2026-11-26T08:41:00Z, a Thursday.
        let now = 1_795_682_460_000;
        let (s, e) = BudgetPeriod::Day.window(now).unwrap();
        assert_eq!((s, e), (1_795_651_200_000, 1_795_737_600_000));
        let (s, e) = BudgetPeriod::Week.window(now).unwrap();
        // Monday 2026-11-23 to Monday 2026-11-30.
        assert_eq!((s, e), (1_795_392_000_000, 1_795_996_800_000));
        let (s, e) = BudgetPeriod::Month.window(now).unwrap();
        // 2026-11-01 to 2026-12-01.
        assert_eq!((s, e), (1_793_491_200_000, 1_796_083_200_000));
        // December rolls into the next year.
        let (s, e) = BudgetPeriod::Month.window(1_796_083_200_000 + 5).unwrap();
        assert_eq!((s, e), (1_796_083_200_000, 1_798_761_600_000));
        assert_eq!(BudgetPeriod::Rolling(1).window(now), None);
        for d in [0u64, 59, 365, 10_957, 20_000, 20_418, 100_000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn parse_keys_and_periods() {
        assert_eq!("metadata.user".parse::<LimitKey>().unwrap(), LimitKey::Metadata("user".into()));
        assert!("metadata.".parse::<LimitKey>().is_err());
        assert!("bogus".parse::<LimitKey>().is_err());
        assert_eq!("24h".parse::<BudgetPeriod>().unwrap(), BudgetPeriod::Rolling(86_400_000));
        assert!("0s".parse::<BudgetPeriod>().is_err());
    }

    #[test]
    fn reset_format_and_amounts() {
        assert_eq!(format_reset(250), "250ms");
        assert_eq!(format_reset(37_000), "37s");
        assert_eq!(format_reset(65_001), "1m6s");
        assert_eq!(format_reset(3_600_000), "1h0m0s");
        assert_eq!(usd_to_micros(0.0000011), 2);
        assert_eq!(actual_amount(Measure::Requests, 1, true, true, None, None, false), 0);
        assert_eq!(actual_amount(Measure::Tokens, 900, false, true, Some(120), None, false), 120);
        assert_eq!(actual_amount(Measure::Tokens, 900, false, false, None, None, false), 0);
        assert_eq!(actual_amount(Measure::CostUsd, 50, false, true, None, Some(0.00002), false), 20);
    }
}
