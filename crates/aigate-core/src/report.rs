//! The rollout report: one gateway's traffic over a period, what it cost, what the cache saved,
//! and a go / no-go verdict against thresholds (`aigate report`, `GET /admin/gateways/{id}/report`).
//!
//! Built from the analytics rollups ([`aigate_store::AnalyticsStats`]), so it answers in
//! milliseconds whatever the traffic. A shadow-mode gateway answers every request from upstream;
//! its report gives the would-be hit rate and savings, and the hit-rate threshold is checked
//! against the would-be rate (that is what a rollout decides on).
//!
//! A [`Comparison`] sets two such reports side by side: a candidate against a baseline, either
//! two gateways over one window (a canary against the gateway whose traffic it takes a share of)
//! or one gateway over two windows (after a rollout stage against before). Its verdict holds the
//! candidate to the baseline within [`Margins`], to a least number of requests on both sides, and
//! to the thresholds.
//!
//! A window is summed from minute rollups when it spans at most [`MINUTE_WINDOW_MAX_MS`] and
//! starts within their retention, so its edges fall on the minute (a before / after cut at a
//! rollout time stays clean); otherwise from hour rollups, its edges rounded up to the hour.

use std::fmt::Write as _;

use aigate_store::{AnalyticsQuery, AnalyticsStats, Granularity, GroupBy, MINUTE_ROLLUP_RETENTION_MS};
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
    /// 99th percentile duration, ms.
    #[serde(default)]
    pub p99_ms: Option<f64>,
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
            p99_ms: t.p99_ms,
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

/// Longest window summed from minute rollups (2880 rows at most); longer ones use hour rollups.
pub const MINUTE_WINDOW_MAX_MS: u64 = 2 * 86_400_000;

/// The totals-only analytics query of a report window `[from_ms, to_ms)` (see the module docs for
/// the granularity it picks).
pub fn totals_query(from_ms: u64, to_ms: u64, now_ms: u64) -> AnalyticsQuery {
    let fine = to_ms.saturating_sub(from_ms) <= MINUTE_WINDOW_MAX_MS
        && from_ms >= now_ms.saturating_sub(MINUTE_ROLLUP_RETENTION_MS);
    let granularity = if fine { Granularity::Minute } else { Granularity::Hour };
    AnalyticsQuery { from_ms, to_ms, granularity, group_by: GroupBy::None }
}

/// Fewest requests on each side of a comparison when no `min_requests` threshold is set: below
/// this, a few slow or failed requests swing the rates and percentiles more than a rollout does.
pub const DEFAULT_COMPARE_MIN_REQUESTS: u64 = 100;

/// How much worse than its baseline a candidate may be.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Margins {
    /// Largest rise of the error rate, as a rate (0.01: one percentage point).
    pub max_error_rate_increase: f64,
    /// Largest rise of p95 latency, relative to the baseline's (0.2: 20 % slower).
    pub max_p95_increase: f64,
}

impl Default for Margins {
    fn default() -> Margins {
        Margins { max_error_rate_increase: 0.01, max_p95_increase: 0.2 }
    }
}

/// One side of a comparison: a gateway's totals over a window.
#[derive(Debug, Clone, Copy)]
pub struct Window<'a> {
    /// Gateway.
    pub gateway: &'a str,
    /// Window start, Unix ms.
    pub from_ms: u64,
    /// Window end, Unix ms.
    pub to_ms: u64,
    /// The gateway's cache mode.
    pub mode: CacheMode,
    /// Its totals over the window.
    pub stats: &'a AnalyticsStats,
}

/// One figure on both sides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// What is compared (`requests`, `p50_ms`, `p95_ms`, `p99_ms`, `error_rate`, `hit_rate`,
    /// `upstream_calls`, `cost_usd`, `saved_usd`).
    pub metric: String,
    /// The baseline's value (`None`: nothing measured, e.g. a percentile without requests).
    pub baseline: Option<f64>,
    /// The candidate's value.
    pub candidate: Option<f64>,
    /// `candidate - baseline`, in the metric's unit.
    pub difference: Option<f64>,
    /// `difference / baseline * 100` (`None` when the baseline is 0 or missing).
    pub change_pct: Option<f64>,
}

/// One check of a comparison's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareCheck {
    /// What is checked: `requests` and `baseline_requests` (at least `limit`),
    /// `error_rate_increase` and `p95_increase` (the margins), and the thresholds on the
    /// candidate (`hit_rate` or `would_be_hit_rate`, `error_rate`, `p95_ms`).
    pub name: String,
    /// Whether it holds.
    pub ok: bool,
    /// The limit: the margin or threshold, in the unit of `name`.
    pub limit: f64,
    /// What was found, in one line for a person (with what to do when it fails).
    pub message: String,
}

/// A candidate against a baseline, and the candidate's go / no-go verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The baseline's report (its checks and verdict as a report alone).
    pub baseline: Report,
    /// The candidate's report.
    pub candidate: Report,
    /// The figures side by side.
    pub changes: Vec<Change>,
    /// The margins applied.
    pub margins: Margins,
    /// The checks, in order: requests, margins, thresholds.
    pub checks: Vec<CompareCheck>,
    /// The candidate's verdict, `go` or `no-go`.
    pub verdict: String,
}

impl Comparison {
    /// Compares `candidate` with `baseline`. Both reports apply `thresholds`, whose
    /// `min_requests` (else [`DEFAULT_COMPARE_MIN_REQUESTS`]) both sides must reach.
    pub fn build(baseline: Window<'_>, candidate: Window<'_>, thresholds: Thresholds, margins: Margins) -> Comparison {
        let min_requests = thresholds.min_requests.unwrap_or(DEFAULT_COMPARE_MIN_REQUESTS);
        let thresholds = Thresholds { min_requests: Some(min_requests), ..thresholds };
        let report = |w: Window<'_>| Report::build(w.gateway, w.from_ms, w.to_ms, w.mode, w.stats, thresholds);
        let (b, c) = (report(baseline), report(candidate));
        let (bn, cn) = labels(&b, &c);
        let pct = |v: f64| format!("{:.1} %", v * 100.0);
        let ms = |v: f64| format!("{v:.1} ms");
        let mut checks = Vec::new();
        let mut check = |name: &str, ok: bool, limit: f64, message: String| {
            checks.push(CompareCheck { name: name.into(), ok, limit, message });
        };

        let enough = |r: &Report, side: &str, n: &str| {
            if r.requests >= min_requests {
                format!("{side} {n} served {} requests (at least {min_requests} needed)", r.requests)
            } else {
                format!(
                    "{side} {n} served {} requests, fewer than the {min_requests} a verdict needs: \
                     widen its window or wait for traffic (or lower min_requests)",
                    r.requests
                )
            }
        };
        check("requests", c.requests >= min_requests, min_requests as f64, enough(&c, "candidate", &cn));
        check("baseline_requests", b.requests >= min_requests, min_requests as f64, enough(&b, "baseline", &bn));

        let rise = c.error_rate - b.error_rate;
        let max = margins.max_error_rate_increase;
        let ok = rise <= max + 1e-12;
        let found = format!(
            "error rate {} on {cn} against {} on {bn} ({:+.1} points, at most {:+.1} allowed)",
            pct(c.error_rate),
            pct(b.error_rate),
            rise * 100.0,
            max * 100.0
        );
        let gw = &c.gateway;
        check(
            "error_rate_increase",
            ok,
            max,
            if ok {
                found
            } else {
                format!("{found}: see why with `aigate logs --gateway {gw} --errors` (margin max_error_rate_increase)")
            },
        );

        let max = margins.max_p95_increase;
        let (ok, message) = match (b.p95_ms, c.p95_ms) {
            (Some(bp), Some(cp)) => {
                let ok = cp <= bp * (1.0 + max) + 1e-9;
                let rise = match (bp > 0.0, cp > 0.0) {
                    (true, _) => format!("{:+.0} %", (cp / bp - 1.0) * 100.0),
                    (false, true) => "up from 0".into(),
                    (false, false) => "+0 %".into(),
                };
                let found = format!(
                    "p95 {} on {cn} against {} on {bn} ({rise}, at most {:+.0} % allowed)",
                    ms(cp),
                    ms(bp),
                    max * 100.0
                );
                if ok {
                    (true, found)
                } else {
                    let m = format!(
                        "{found}: find the slow provider or model with the analytics of {gw} \
                         grouped by model (margin max_p95_increase)"
                    );
                    (false, m)
                }
            }
            (bp, _) => {
                let n = if bp.is_none() { &bn } else { &cn };
                (false, format!("no p95 on {n} (no requests), so latency cannot be compared: wait for traffic"))
            }
        };
        check("p95_increase", ok, max, message);

        for t in &c.checks {
            let v = t.value.unwrap_or(f64::NAN);
            let message = match t.name.as_str() {
                "requests" => continue,
                "error_rate" if t.ok => format!("error rate {} on {cn}, at most {} allowed", pct(v), pct(t.threshold)),
                "error_rate" => format!(
                    "error rate {} on {cn}, above the {} allowed: see why with `aigate logs --gateway {gw} --errors` \
                     (threshold max_error_rate)",
                    pct(v),
                    pct(t.threshold)
                ),
                "p95_ms" if t.value.is_none() => format!("no p95 on {cn} (no requests): wait for traffic"),
                "p95_ms" if t.ok => format!("p95 {} on {cn}, at most {} allowed", ms(v), ms(t.threshold)),
                "p95_ms" => format!(
                    "p95 {} on {cn}, above the {} allowed: find the slow provider or model in its analytics \
                     (threshold max_p95_ms)",
                    ms(v),
                    ms(t.threshold)
                ),
                name if t.ok => {
                    format!("{} {} on {cn}, at least {} needed", name.replace('_', " "), pct(v), pct(t.threshold))
                }
                name => {
                    let on_baseline = b.checks.iter().find(|x| x.name == name).and_then(|x| x.value);
                    format!(
                        "{} {} on {cn}, below the {} needed{}: check its cache settings (threshold min_hit_rate)",
                        name.replace('_', " "),
                        pct(v),
                        pct(t.threshold),
                        on_baseline.map_or(String::new(), |r| format!(" ({} on {bn})", pct(r)))
                    )
                }
            };
            check(&t.name, t.ok, t.threshold, message);
        }

        let verdict = if checks.iter().all(|c| c.ok) { "go" } else { "no-go" };
        Comparison { changes: changes(&b, &c), baseline: b, candidate: c, margins, checks, verdict: verdict.into() }
    }

    /// Whether every check holds.
    pub fn is_go(&self) -> bool {
        self.verdict == "go"
    }

    /// Plain text (`markdown = false`) or a markdown table: the figures in two columns and a
    /// change column, then the checks and the verdict.
    pub fn render(&self, markdown: bool) -> String {
        let (b, c) = (&self.baseline, &self.candidate);
        let (bn, cn) = labels(b, c);
        let date = |ms: u64| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
        };
        let window = |r: &Report| format!("{} to {}, cache {}", date(r.from_ms), date(r.to_ms), r.cache_mode);
        let title = format!("aigate report: {cn} against {bn}");
        let mut rows: Vec<[String; 4]> = vec![["".into(), bn.clone(), cn.clone(), "change".into()]];
        for ch in &self.changes {
            let (label, fmt): (&str, fn(f64) -> String) = match ch.metric.as_str() {
                "requests" => ("Requests", |v| format!("{v:.0}")),
                "p50_ms" => ("Latency p50", |v| format!("{v:.1} ms")),
                "p95_ms" => ("Latency p95", |v| format!("{v:.1} ms")),
                "p99_ms" => ("Latency p99", |v| format!("{v:.1} ms")),
                "error_rate" => ("Error rate", |v| format!("{:.1} %", v * 100.0)),
                "hit_rate" => ("Cache hit rate", |v| format!("{:.1} %", v * 100.0)),
                "upstream_calls" => ("Upstream calls", |v| format!("{v:.0}")),
                "cost_usd" => ("Cost paid", |v| format!("${v:.4}")),
                "saved_usd" => ("Saved by the cache", |v| format!("${v:.4}")),
                other => (other, |v| format!("{v}")),
            };
            let cell = |v: Option<f64>| v.map_or("-".to_string(), fmt);
            // A rate's change reads in points: 0.5 % to 1.0 % is +0.5 points, not +100 %.
            let change = if ch.metric.ends_with("_rate") {
                ch.difference.map_or("-".into(), |d| format!("{:+.1} pt", d * 100.0))
            } else {
                ch.change_pct.map_or("-".into(), |p| format!("{p:+.1} %"))
            };
            rows.push([label.into(), cell(ch.baseline), cell(ch.candidate), change]);
        }
        let mut out = String::new();
        if markdown {
            let _ = writeln!(
                out,
                "## {title}
"
            );
            let _ = writeln!(
                out,
                "- baseline {bn}: {}
- candidate {cn}: {}
",
                window(b),
                window(c)
            );
            let head = &rows[0];
            let _ = writeln!(
                out,
                "| | {} | {} | {} |
|---|---:|---:|---:|",
                head[1], head[2], head[3]
            );
            for r in &rows[1..] {
                let _ = writeln!(out, "| {} | {} | {} | {} |", r[0], r[1], r[2], r[3]);
            }
        } else {
            let _ = writeln!(
                out,
                "{title}
  baseline   {bn}: {}
  candidate  {cn}: {}
",
                window(b),
                window(c)
            );
            let w: Vec<usize> = (0..4).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
            for r in &rows {
                let _ = writeln!(
                    out,
                    "  {:<w0$}  {:>w1$}  {:>w2$}  {:>w3$}",
                    r[0],
                    r[1],
                    r[2],
                    r[3],
                    w0 = w[0],
                    w1 = w[1],
                    w2 = w[2],
                    w3 = w[3]
                );
            }
        }
        let _ = writeln!(out);
        for ch in &self.checks {
            let mark = if ch.ok { "ok  " } else { "FAIL" };
            let line = format!("{mark} {}: {}", ch.name, ch.message);
            let _ = if markdown { writeln!(out, "- {line}") } else { writeln!(out, "  {line}") };
        }
        let verdict = if self.is_go() { "GO" } else { "NO-GO" };
        let _ = if markdown {
            writeln!(out, "\n**Verdict for {cn}: {verdict}**")
        } else {
            writeln!(out, "\nVerdict for {cn}: {verdict}")
        };
        out
    }
}

/// What to call each side: the gateway names, or `NAME before` / `NAME after` when one gateway is
/// compared with itself.
fn labels(b: &Report, c: &Report) -> (String, String) {
    if b.gateway == c.gateway {
        (format!("{} before", b.gateway), format!("{} after", c.gateway))
    } else {
        (b.gateway.clone(), c.gateway.clone())
    }
}

/// The figures of both reports side by side.
fn changes(b: &Report, c: &Report) -> Vec<Change> {
    let both = |metric: &str, f: &dyn Fn(&Report) -> Option<f64>| {
        let (bv, cv) = (f(b), f(c));
        let difference = bv.zip(cv).map(|(x, y)| y - x);
        let change_pct = bv.zip(difference).and_then(|(x, d)| (x != 0.0).then(|| d / x * 100.0));
        Change { metric: metric.into(), baseline: bv, candidate: cv, difference, change_pct }
    };
    vec![
        both("requests", &|r| Some(r.requests as f64)),
        both("p50_ms", &|r| r.p50_ms),
        both("p95_ms", &|r| r.p95_ms),
        both("p99_ms", &|r| r.p99_ms),
        both("error_rate", &|r| Some(r.error_rate)),
        both("hit_rate", &|r| Some(r.hit_rate)),
        both("upstream_calls", &|r| Some(r.upstream_calls as f64)),
        both("cost_usd", &|r| Some(r.cost_usd)),
        both("saved_usd", &|r| Some(r.saved_usd)),
    ]
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

    fn side<'a>(gateway: &'a str, stats: &'a AnalyticsStats) -> Window<'a> {
        Window { gateway, from_ms: 0, to_ms: 1, mode: CacheMode::On, stats }
    }

    fn compare(base: &AnalyticsStats, cand: &AnalyticsStats, t: Thresholds) -> Comparison {
        Comparison::build(side("prod", base), side("prod-canary", cand), t, Margins::default())
    }

    fn failed(c: &Comparison) -> Vec<&str> {
        c.checks.iter().filter(|c| !c.ok).map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn a_candidate_like_its_baseline_is_go() {
        let cand = AnalyticsStats { requests: 100, errors: 0, cache_hits: 70, p95_ms: Some(260.0), ..stats() };
        let c = compare(&stats(), &cand, Thresholds::default());
        assert!(c.is_go(), "{c:#?}");
        let requests = &c.changes[0];
        assert_eq!((requests.baseline, requests.candidate), (Some(1000.0), Some(100.0)));
        assert!((requests.change_pct.unwrap() + 90.0).abs() < 1e-9);
        let text = c.render(false);
        assert!(text.contains("aigate report: prod-canary against prod"), "{text}");
        assert!(text.contains("Verdict for prod-canary: GO"), "{text}");
        // A rate's change in points, the rest relative.
        assert!(text.lines().any(|l| l.contains("Error rate") && l.ends_with("-0.2 pt")), "{text}");
        assert!(text.lines().any(|l| l.contains("Latency p95") && l.ends_with("+4.0 %")), "{text}");
        assert!(c.render(true).contains("| Requests | 1000 | 100 | -90.0 % |"), "{}", c.render(true));
    }

    #[test]
    fn margins_at_their_edges() {
        // Error rate 0.2 %: +1 point exactly is allowed, a request more is not.
        let at = AnalyticsStats { requests: 1000, errors: 12, ..stats() };
        assert!(compare(&stats(), &at, Thresholds::default()).is_go());
        let over = AnalyticsStats { errors: 13, ..at.clone() };
        let c = compare(&stats(), &over, Thresholds::default());
        assert_eq!(failed(&c), ["error_rate_increase"]);
        let msg = &c.checks.iter().find(|c| !c.ok).unwrap().message;
        assert!(
            msg.contains("1.3 % on prod-canary against 0.2 % on prod (+1.1 points, at most +1.0 allowed)"),
            "{msg}"
        );
        assert!(msg.contains("aigate logs --gateway prod-canary --errors"), "{msg}");
        // p95 250 ms: 300 ms (+20 %) is allowed, 301 ms is not.
        let at = AnalyticsStats { p95_ms: Some(300.0), ..stats() };
        assert!(compare(&stats(), &at, Thresholds::default()).is_go());
        let over = AnalyticsStats { p95_ms: Some(301.0), ..stats() };
        let c = compare(&stats(), &over, Thresholds::default());
        assert_eq!(failed(&c), ["p95_increase"]);
        assert_eq!(c.verdict, "no-go");
        // Wider margins let both through.
        let worse = AnalyticsStats { errors: 50, p95_ms: Some(400.0), ..stats() };
        let wide = Margins { max_error_rate_increase: 0.05, max_p95_increase: 0.6 };
        let c = Comparison::build(side("prod", &stats()), side("prod-canary", &worse), Thresholds::default(), wide);
        assert!(c.is_go(), "{c:#?}");
        // A candidate better than its baseline passes whatever the margins.
        let better = AnalyticsStats { errors: 0, p95_ms: Some(100.0), ..stats() };
        let tight = Margins { max_error_rate_increase: 0.0, max_p95_increase: 0.0 };
        let c = Comparison::build(side("prod", &stats()), side("prod-canary", &better), Thresholds::default(), tight);
        assert!(c.is_go(), "{c:#?}");
    }

    #[test]
    fn too_few_requests_and_no_latency() {
        let none = AnalyticsStats::default();
        let c = compare(&stats(), &none, Thresholds::default());
        assert_eq!(failed(&c), ["requests", "p95_increase"]);
        assert!(c.checks[0].message.contains("served 0 requests, fewer than the 100"), "{:?}", c.checks[0]);
        assert!(c.checks[3].message.contains("no p95 on prod-canary"), "{:?}", c.checks[3]);
        let p95 = c.changes.iter().find(|ch| ch.metric == "p95_ms").unwrap();
        assert_eq!((p95.candidate, p95.difference, p95.change_pct), (None, None, None));
        // Nothing paid on the baseline: no relative change, no division by zero.
        let cost = c.changes.iter().find(|ch| ch.metric == "cost_usd").unwrap();
        assert_eq!(cost.change_pct, Some(-100.0));
        let c = compare(&none, &stats(), Thresholds::default());
        assert_eq!(failed(&c), ["baseline_requests", "p95_increase"]);
        let cost = c.changes.iter().find(|ch| ch.metric == "cost_usd").unwrap();
        assert_eq!((cost.difference, cost.change_pct), (Some(3.0), None));
        assert!(c.render(false).contains("Verdict for prod-canary: NO-GO"));
        // Both empty, min_requests 0: nothing to hold against, but latency cannot be compared.
        let t = Thresholds { min_requests: Some(0), ..Thresholds::default() };
        let c = compare(&none, &none, t);
        assert_eq!(failed(&c), ["p95_increase"]);
        // The threshold replaces the default.
        let few = AnalyticsStats { requests: 20, ..stats() };
        let t = Thresholds { min_requests: Some(20), ..Thresholds::default() };
        assert!(compare(&few, &few, t).is_go());
    }

    #[test]
    fn thresholds_hold_the_candidate() {
        let t = Thresholds {
            min_hit_rate: Some(0.6),
            max_error_rate: Some(0.01),
            max_p95_ms: Some(200.0),
            ..Thresholds::default()
        };
        let cand = AnalyticsStats { cache_hits: 500, ..stats() };
        let c = compare(&stats(), &cand, t);
        // The baseline's p95 of 250 ms is over 200 too; only the candidate's verdict counts.
        assert_eq!(failed(&c), ["hit_rate", "p95_ms"]);
        let hit = c.checks.iter().find(|c| c.name == "hit_rate").unwrap();
        assert_eq!(hit.message, "hit rate 50.0 % on prod-canary, below the 60.0 % needed (70.0 % on prod): check its cache settings (threshold min_hit_rate)");
        assert_eq!(c.baseline.verdict, "no-go");
        assert!(c.checks.iter().any(|c| c.name == "error_rate" && c.ok));
    }

    #[test]
    fn one_gateway_before_and_after() {
        let after = AnalyticsStats { p95_ms: Some(500.0), ..stats() };
        let c = Comparison::build(
            Window { gateway: "prod", from_ms: 0, to_ms: 10, mode: CacheMode::On, stats: &stats() },
            Window { gateway: "prod", from_ms: 10, to_ms: 20, mode: CacheMode::On, stats: &after },
            Thresholds::default(),
            Margins::default(),
        );
        assert_eq!(failed(&c), ["p95_increase"]);
        let text = c.render(false);
        assert!(text.contains("aigate report: prod after against prod before"), "{text}");
        assert!(
            text.contains("p95 500.0 ms on prod after against 250.0 ms on prod before (+100 %, at most +20 % allowed)"),
            "{text}"
        );
        assert_eq!((c.baseline.to_ms, c.candidate.from_ms), (10, 10));
    }

    #[test]
    fn short_recent_windows_count_by_the_minute() {
        let now = 100 * 86_400_000;
        assert_eq!(totals_query(now - 86_400_000, now, now).granularity, Granularity::Minute);
        assert_eq!(totals_query(now - 7 * 86_400_000, now, now).granularity, Granularity::Hour);
        // Older than the minute rollups' retention.
        let old = now - 9 * 86_400_000;
        assert_eq!(totals_query(old, old + 3_600_000, now).granularity, Granularity::Hour);
    }
}
