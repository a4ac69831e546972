//! The rollout report: one gateway's traffic over a period, what it cost, what the cache saved,
//! and a go / no-go verdict against thresholds (`aigate report`, `GET /admin/gateways/{id}/report`).
//!
//! Built from the analytics rollups ([`aigate_store::AnalyticsStats`]), so it answers in
//! milliseconds whatever the traffic. A shadow-mode gateway answers every request from upstream;
//! its report gives the would-be hit rate and savings, and the hit-rate threshold is checked
//! against the would-be rate (that is what a rollout decides on).

use std::fmt::Write as _;

use aigate_store::AnalyticsStats;
use serde::{Deserialize, Serialize};

use crate::config::CacheMode;

/// Go / no-go thresholds; unset ones are not checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Lowest acceptable cache hit rate (0..1; the would-be rate in shadow mode).
    pub min_hit_rate: Option<f64>,
    /// Highest acceptable error rate (0..1).
    pub max_error_rate: Option<f64>,
    /// Highest acceptable p95 duration, ms.
    pub max_p95_ms: Option<f64>,
    /// Fewest requests for the figures to count as evidence.
    pub min_requests: Option<u64>,
}

impl Thresholds {
    /// `self` with the thresholds `over` sets replacing these.
    pub fn overridden_by(self, over: Thresholds) -> Thresholds {
        Thresholds {
            min_hit_rate: over.min_hit_rate.or(self.min_hit_rate),
            max_error_rate: over.max_error_rate.or(self.max_error_rate),
            max_p95_ms: over.max_p95_ms.or(self.max_p95_ms),
            min_requests: over.min_requests.or(self.min_requests),
        }
    }
}

/// One threshold check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// What is checked (`hit_rate`, `error_rate`, `p95_ms`, `requests`).
    pub name: String,
    /// The measured value (`None`: nothing to measure, e.g. no requests for p95).
    pub value: Option<f64>,
    /// `>=` or `<=`.
    pub op: String,
    /// The threshold.
    pub threshold: f64,
    /// Whether it holds.
    pub ok: bool,
}

/// What the cache would have done, for a shadow-mode gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shadow {
    /// Requests the cache could have answered.
    pub would_be_hits: u64,
    /// `would_be_hits / requests`.
    pub would_be_hit_rate: f64,
    /// What those requests cost, USD: what the cache would have saved.
    pub would_be_saved_usd: f64,
    /// `would_be_saved_usd / cost_usd` (0 when nothing was paid).
    pub would_be_saved_pct: f64,
}

/// The report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Gateway.
    pub gateway: String,
    /// Period start, Unix ms.
    pub from_ms: u64,
    /// Period end, Unix ms.
    pub to_ms: u64,
    /// The gateway's cache mode (`on`, `shadow`, `off`).
    pub cache_mode: String,
    /// Requests.
    pub requests: u64,
    /// Requests answered from the cache.
    pub cache_hits: u64,
    /// `cache_hits / requests`.
    pub hit_rate: f64,
    /// Requests that went to a provider.
    pub upstream_calls: u64,
    /// Failed requests.
    pub errors: u64,
    /// `errors / requests`.
    pub error_rate: f64,
    /// Median duration, ms.
    pub p50_ms: Option<f64>,
    /// 95th percentile duration, ms.
    pub p95_ms: Option<f64>,
    /// Input tokens.
    pub tokens_in: u64,
    /// Output tokens.
    pub tokens_out: u64,
    /// Paid to providers, USD (known prices).
    pub cost_usd: f64,
    /// Requests whose cost is unknown (model without a price).
    pub cost_unknown: u64,
    /// Saved by cache hits, USD.
    pub saved_usd: f64,
    /// What the same traffic would have cost without the gateway, USD.
    pub cost_without_gateway_usd: f64,
    /// `saved_usd / cost_without_gateway_usd` (0 when nothing would have been paid).
    pub saved_pct: f64,
    /// Would-be figures of a shadow-mode gateway.
    pub shadow: Option<Shadow>,
    /// The thresholds applied.
    pub thresholds: Thresholds,
    /// The checks, one per threshold set.
    pub checks: Vec<Check>,
    /// `go` or `no-go`.
    pub verdict: String,
}

impl Report {
    /// Builds the report of `totals` and checks `thresholds`.
    pub fn build(
        gateway: &str,
        from_ms: u64,
        to_ms: u64,
        mode: CacheMode,
        t: &AnalyticsStats,
        thresholds: Thresholds,
    ) -> Report {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let requests = t.requests as f64;
        let shadow = (mode == CacheMode::Shadow || t.shadow_hits > 0).then(|| Shadow {
            would_be_hits: t.shadow_hits,
            would_be_hit_rate: ratio(t.shadow_hits as f64, requests),
            would_be_saved_usd: t.shadow_saved_usd,
            would_be_saved_pct: ratio(t.shadow_saved_usd, t.cost_usd),
        });
        let hit_rate = ratio(t.cache_hits as f64, requests);
        let error_rate = ratio(t.errors as f64, requests);
        let without = t.cost_usd + t.saved_usd;
        let mut checks = Vec::new();
        let mut check = |name: &str, value: Option<f64>, op: &str, threshold: f64| {
            let ok = match (value, op) {
                (Some(v), ">=") => v >= threshold,
                (Some(v), _) => v <= threshold,
                (None, _) => false,
            };
            checks.push(Check { name: name.into(), value, op: op.into(), threshold, ok });
        };
        if let Some(min) = thresholds.min_requests {
            check("requests", Some(requests), ">=", min as f64);
        }
        if let Some(min) = thresholds.min_hit_rate {
            let rate = match (&shadow, mode) {
                (Some(s), CacheMode::Shadow) => s.would_be_hit_rate,
                _ => hit_rate,
            };
            check(if mode == CacheMode::Shadow { "would_be_hit_rate" } else { "hit_rate" }, Some(rate), ">=", min);
        }
        if let Some(max) = thresholds.max_error_rate {
            check("error_rate", Some(error_rate), "<=", max);
        }
        if let Some(max) = thresholds.max_p95_ms {
            check("p95_ms", t.p95_ms, "<=", max);
        }
        let verdict = if checks.iter().all(|c| c.ok) { "go" } else { "no-go" };
        Report {
            gateway: gateway.to_owned(),
            from_ms,
            to_ms,
            cache_mode: match mode {
                CacheMode::On => "on",
                CacheMode::Shadow => "shadow",
                CacheMode::Off => "off",
            }
            .into(),
            requests: t.requests,
            cache_hits: t.cache_hits,
            hit_rate,
            upstream_calls: t.requests.saturating_sub(t.cache_hits),
            errors: t.errors,
            error_rate,
            p50_ms: t.p50_ms,
            p95_ms: t.p95_ms,
            tokens_in: t.tokens_in,
            tokens_out: t.tokens_out,
            cost_usd: t.cost_usd,
            cost_unknown: t.cost_unknown,
            saved_usd: t.saved_usd,
            cost_without_gateway_usd: without,
            saved_pct: ratio(t.saved_usd, without),
            shadow,
            thresholds,
            checks,
            verdict: verdict.into(),
        }
    }

    /// Whether every check holds.
    pub fn is_go(&self) -> bool {
        self.verdict == "go"
    }

    /// Plain text (`markdown = false`) or a markdown table.
    pub fn render(&self, markdown: bool) -> String {
        let date = |ms: u64| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
        };
        let pct = |v: f64| format!("{:.1} %", v * 100.0);
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
        let usd = |v: f64| format!("${v:.4}");
        let mut rows: Vec<(String, String)> = vec![
            ("Requests".into(), self.requests.to_string()),
            ("Cache hit rate".into(), format!("{} ({} hits)", pct(self.hit_rate), self.cache_hits)),
            ("Upstream calls".into(), self.upstream_calls.to_string()),
            ("Error rate".into(), format!("{} ({} errors)", pct(self.error_rate), self.errors)),
            ("Latency p50 / p95".into(), format!("{} / {}", ms(self.p50_ms), ms(self.p95_ms))),
            ("Tokens in / out".into(), format!("{} / {}", self.tokens_in, self.tokens_out)),
            ("Cost paid".into(), usd(self.cost_usd)),
            (
                "Cost saved by the cache".into(),
                format!("{} ({} of the total)", usd(self.saved_usd), pct(self.saved_pct)),
            ),
            ("Cost without the gateway".into(), usd(self.cost_without_gateway_usd)),
        ];
        if self.cost_unknown > 0 {
            rows.push(("Requests of unknown cost".into(), self.cost_unknown.to_string()));
        }
        if let Some(s) = &self.shadow {
            rows.push((
                "Shadow: would-be hit rate".into(),
                format!("{} ({} would-be hits)", pct(s.would_be_hit_rate), s.would_be_hits),
            ));
            rows.push((
                "Shadow: would-be savings".into(),
                format!("{} ({} of the cost)", usd(s.would_be_saved_usd), pct(s.would_be_saved_pct)),
            ));
        }
        let title = format!(
            "aigate report: gateway {} (cache {}), {} to {}",
            self.gateway,
            self.cache_mode,
            date(self.from_ms),
            date(self.to_ms)
        );
        let mut out = String::new();
        if markdown {
            let _ = writeln!(out, "## {title}\n\n| | |\n|---|---|");
            for (k, v) in &rows {
                let _ = writeln!(out, "| {k} | {v} |");
            }
        } else {
            let _ = writeln!(out, "{title}\n");
            let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (k, v) in &rows {
                let _ = writeln!(out, "  {k:<w$}  {v}");
            }
        }
        let _ = writeln!(out);
        if self.checks.is_empty() {
            let _ = writeln!(
                out,
                "No thresholds set: verdict GO by default (set them with flags or [gateways.NAME.report])."
            );
        } else {
            for c in &self.checks {
                let v = c.value.map_or("-".to_string(), |v| format!("{v:.4}"));
                let mark = if c.ok { "ok  " } else { "FAIL" };
                let line = format!("{mark} {} = {v} (threshold {} {})", c.name, c.op, c.threshold);
                let _ = if markdown { writeln!(out, "- {line}") } else { writeln!(out, "  {line}") };
            }
            let verdict = if self.is_go() { "GO" } else { "NO-GO" };
            let _ = if markdown {
                writeln!(out, "\n**Verdict: {verdict}**")
            } else {
                writeln!(out, "\nVerdict: {verdict}")
            };
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> AnalyticsStats {
        AnalyticsStats {
            requests: 1000,
            errors: 2,
            cache_hits: 700,
            tokens_in: 10_000,
            tokens_out: 5000,
            cost_usd: 3.0,
            saved_usd: 7.0,
            p50_ms: Some(12.0),
            p95_ms: Some(250.0),
            ..AnalyticsStats::default()
        }
    }

    #[test]
    fn figures_and_verdicts() {
        let t = Thresholds { min_hit_rate: Some(0.6), max_error_rate: Some(0.001), ..Thresholds::default() };
        let r = Report::build("prod", 0, 1, CacheMode::On, &stats(), t);
        assert_eq!(r.upstream_calls, 300);
        assert!((r.hit_rate - 0.7).abs() < 1e-12);
        assert!((r.cost_without_gateway_usd - 10.0).abs() < 1e-12);
        assert!((r.saved_pct - 0.7).abs() < 1e-12);
        // Error rate 0.002 > 0.001: no-go.
        assert_eq!(r.verdict, "no-go");
        assert!(r.checks.iter().any(|c| c.name == "error_rate" && !c.ok));
        let t = Thresholds { min_hit_rate: Some(0.6), max_p95_ms: Some(300.0), ..Thresholds::default() };
        let r = Report::build("prod", 0, 1, CacheMode::On, &stats(), t);
        assert!(r.is_go(), "{r:?}");
        assert!(r.render(false).contains("Verdict: GO"));
        assert!(r.render(true).contains("| Cache hit rate | 70.0 % (700 hits) |"));
    }

    #[test]
    fn shadow_mode_checks_the_would_be_rate() {
        let s = AnalyticsStats {
            requests: 100,
            shadow_hits: 65,
            cost_usd: 2.0,
            shadow_saved_usd: 1.3,
            p95_ms: Some(10.0),
            ..AnalyticsStats::default()
        };
        let t = Thresholds { min_hit_rate: Some(0.6), ..Thresholds::default() };
        let r = Report::build("stg", 0, 1, CacheMode::Shadow, &s, t);
        let sh = r.shadow.as_ref().unwrap();
        assert!((sh.would_be_hit_rate - 0.65).abs() < 1e-12);
        assert!((sh.would_be_saved_pct - 0.65).abs() < 1e-12);
        assert!(r.is_go());
        assert_eq!(r.checks[0].name, "would_be_hit_rate");
    }

    #[test]
    fn overrides() {
        let cfg = Thresholds { min_hit_rate: Some(0.5), max_p95_ms: Some(100.0), ..Thresholds::default() };
        let flags = Thresholds { min_hit_rate: Some(0.8), ..Thresholds::default() };
        let t = cfg.overridden_by(flags);
        assert_eq!(t.min_hit_rate, Some(0.8));
        assert_eq!(t.max_p95_ms, Some(100.0));
    }
}
