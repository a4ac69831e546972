//! The query strings of the admin API: log filters, time bounds, analytics, report and
//! comparison parameters. Every bad value is an error naming the parameter.

use aigate_store::{AnalyticsQuery, Granularity, GroupBy, LogFilter, MetaValue};

use crate::report::{Margins, Thresholds};

/// Unix ms from `1700000000000` or an RFC 3339 time.
pub fn parse_time_ms(v: &str) -> Result<u64, String> {
    if let Ok(ms) = v.trim().parse::<u64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(v.trim())
        .map_err(|_| format!("invalid time {v:?}: expected Unix milliseconds or RFC 3339"))?;
    let d = t.duration_since(std::time::UNIX_EPOCH).map_err(|_| format!("time {v:?} is before 1970"))?;
    Ok(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Parses the log filters of a query string.
pub fn parse_filter(query: &str) -> Result<LogFilter, String> {
    let mut f = LogFilter::default();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let num = |name: &str| v.trim().parse::<f64>().map_err(|_| format!("{name}: {v:?} is not a number"));
        let int = |name: &str| v.trim().parse::<u64>().map_err(|_| format!("{name}: {v:?} is not a whole number"));
        let boolean = |name: &str| match v.as_ref() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(format!("{name}: {v:?} is not true or false")),
        };
        match k.as_ref() {
            "from" => f.from_ms = Some(parse_time_ms(&v)?),
            "to" => f.to_ms = Some(parse_time_ms(&v)?),
            "status" => f.status = Some(v.trim().parse().map_err(|_| format!("status: {v:?} is not a status code"))?),
            "success" => f.success = Some(boolean("success")?),
            "cached" => f.cached = Some(boolean("cached")?),
            "provider" => f.provider = Some(v.into_owned()),
            "model" => f.model = Some(v.into_owned()),
            "min_cost" => f.min_cost_usd = Some(num("min_cost")?),
            "max_cost" => f.max_cost_usd = Some(num("max_cost")?),
            "min_tokens" => f.min_tokens = Some(int("min_tokens")?),
            "max_tokens" => f.max_tokens = Some(int("max_tokens")?),
            "min_duration_ms" => f.min_duration_ms = Some(num("min_duration_ms")?),
            "max_duration_ms" => f.max_duration_ms = Some(num("max_duration_ms")?),
            "event_id" => f.event_id = Some(v.into_owned()),
            "route" => f.route = Some(v.into_owned()),
            "step" => f.step = Some(u32::try_from(int("step")?).map_err(|_| format!("step: {v:?} is too large"))?),
            "limit" => f.limit = Some(u32::try_from(int("limit")?).unwrap_or(u32::MAX)),
            "cursor" => f.cursor = Some(v.into_owned()),
            key => match key.strip_prefix("metadata.") {
                Some(mk) if !mk.is_empty() => {
                    let value = serde_json::from_str::<serde_json::Value>(&v)
                        .ok()
                        .and_then(|j| MetaValue::from_json(&j))
                        .unwrap_or_else(|| MetaValue::String(v.clone().into_owned()));
                    f.metadata = Some((mk.to_owned(), value));
                }
                _ => return Err(format!("unknown filter {key:?}")),
            },
        }
    }
    f.validate()?;
    Ok(f)
}

/// The query of the analytics and report endpoints, and the report thresholds it sets.
pub fn parse_analytics_query(query: &str, now_ms: u64) -> Result<(AnalyticsQuery, Thresholds), String> {
    let mut from = None;
    let mut to = None;
    let mut since = None;
    let mut granularity = Granularity::Hour;
    let mut group_by = GroupBy::None;
    let mut t = Thresholds::default();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let num = |name: &str| v.trim().parse::<f64>().map_err(|_| format!("{name}: {v:?} is not a number"));
        match k.as_ref() {
            "from" => from = Some(parse_time_ms(&v)?),
            "to" => to = Some(parse_time_ms(&v)?),
            "since" => {
                let d = humantime::parse_duration(v.trim())
                    .map_err(|_| format!("since: {v:?} is not a duration like \"7d\" or \"24h\""))?;
                since = Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            }
            "granularity" => granularity = v.parse().map_err(|e| format!("granularity: {e}"))?,
            "group_by" => group_by = v.parse().map_err(|e| format!("group_by: {e}"))?,
            "min_hit_rate" => t.min_hit_rate = Some(num("min_hit_rate")?),
            "max_error_rate" => t.max_error_rate = Some(num("max_error_rate")?),
            "max_p95_ms" => t.max_p95_ms = Some(num("max_p95_ms")?),
            "min_requests" => {
                t.min_requests =
                    Some(v.trim().parse().map_err(|_| format!("min_requests: {v:?} is not a whole number"))?)
            }
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    let to_ms = to.unwrap_or(now_ms);
    let from_ms = match (from, since) {
        (Some(_), Some(_)) => return Err("give from or since, not both".into()),
        (Some(f), None) => f,
        (None, Some(s)) => to_ms.saturating_sub(s),
        (None, None) => to_ms.saturating_sub(86_400_000),
    };
    let q = AnalyticsQuery { from_ms, to_ms, granularity, group_by };
    q.validate()?;
    Ok((q, t))
}

/// The query of the report endpoint: the window and thresholds as for analytics, and what to
/// compare with.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportQuery {
    /// The (candidate's) window.
    pub window: AnalyticsQuery,
    /// Thresholds set by the query.
    pub thresholds: Thresholds,
    /// `compare`: the candidate gateway, compared with the gateway in the path over one window.
    pub compare: Option<String>,
    /// `baseline_from` / `baseline_to` (default: the window's start): the baseline's own window.
    pub baseline: Option<(u64, u64)>,
    /// Margins, the defaults replaced by `max_error_rate_increase` / `max_p95_increase`.
    pub margins: Margins,
}

impl ReportQuery {
    /// Whether a comparison is asked for rather than a report.
    pub fn is_comparison(&self) -> bool {
        self.compare.is_some() || self.baseline.is_some()
    }
}

/// Parses the report endpoint's query: `compare`, `baseline_from`, `baseline_to` and the margins,
/// the rest as [`parse_analytics_query`].
pub fn parse_report_query(query: &str, now_ms: u64) -> Result<ReportQuery, String> {
    let mut rest = form_urlencoded::Serializer::new(String::new());
    let (mut compare, mut baseline_from, mut baseline_to) = (None, None, None);
    let mut margins = Margins::default();
    let mut margin_set = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let margin = |name: &str| match v.trim().parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(x),
            _ => Err(format!("{name}: {v:?} is not a finite number")),
        };
        match k.as_ref() {
            "compare" if v.is_empty() => return Err("compare: name the candidate gateway".into()),
            "compare" => compare = Some(v.into_owned()),
            "baseline_from" => baseline_from = Some(parse_time_ms(&v).map_err(|e| format!("baseline_from: {e}"))?),
            "baseline_to" => baseline_to = Some(parse_time_ms(&v).map_err(|e| format!("baseline_to: {e}"))?),
            "max_error_rate_increase" => {
                margins.max_error_rate_increase = margin("max_error_rate_increase")?;
                margin_set = Some("max_error_rate_increase");
            }
            "max_p95_increase" => {
                margins.max_p95_increase = margin("max_p95_increase")?;
                margin_set = Some("max_p95_increase");
            }
            _ => {
                rest.append_pair(&k, &v);
            }
        }
    }
    let (window, thresholds) = parse_analytics_query(&rest.finish(), now_ms)?;
    let baseline = match (baseline_from, baseline_to) {
        (None, None) => None,
        (None, Some(_)) => return Err("baseline_to needs baseline_from".into()),
        (Some(f), t) => {
            let t = t.unwrap_or(window.from_ms);
            if f > t {
                return Err(format!("baseline_from {f} is after baseline_to {t}"));
            }
            Some((f, t))
        }
    };
    let q = ReportQuery { window, thresholds, compare, baseline, margins };
    if let Some(name) = margin_set.filter(|_| !q.is_comparison()) {
        return Err(format!("{name} applies to a comparison: add compare=GATEWAY or baseline_from"));
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_query_forms() {
        let now = 10 * 86_400_000;
        let q = parse_report_query("since=24h&min_requests=5", now).unwrap();
        assert!(!q.is_comparison());
        assert_eq!((q.window.from_ms, q.thresholds.min_requests), (9 * 86_400_000, Some(5)));
        let q = parse_report_query("compare=prod-canary&since=1h&max_p95_increase=0.5", now).unwrap();
        assert_eq!(q.compare.as_deref(), Some("prod-canary"));
        assert_eq!(q.margins, Margins { max_p95_increase: 0.5, ..Margins::default() });
        // The baseline ends where the window starts unless told.
        let q = parse_report_query("since=1h&baseline_from=1970-01-10T20:00:00Z", now).unwrap();
        assert_eq!(q.baseline, Some((9 * 86_400_000 + 20 * 3_600_000, now - 3_600_000)));
        let q = parse_report_query("from=5000&to=9000&baseline_from=1000&baseline_to=2000", now).unwrap();
        assert_eq!(q.baseline, Some((1000, 2000)));
        for (bad, why) in [
            ("baseline_to=5", "baseline_to needs baseline_from"),
            ("baseline_from=9&baseline_to=5", "is after"),
            ("baseline_from=yesterday", "baseline_from: invalid time"),
            ("max_error_rate_increase=0.02", "applies to a comparison"),
            ("compare=x&max_p95_increase=inf", "not a finite number"),
            ("compare=", "name the candidate"),
            ("compare=x&bogus=1", "unknown parameter"),
        ] {
            let e = parse_report_query(bad, now).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn route_and_step_filters() {
        let f = parse_filter("route=support&step=2").unwrap();
        assert_eq!((f.route.as_deref(), f.step), (Some("support"), Some(2)));
        let f = parse_filter("route=support%403").unwrap();
        assert_eq!(f.route.as_deref(), Some("support@3"));
        for bad in ["step=-1", "step=x", "step=4294967296"] {
            assert!(parse_filter(bad).unwrap_err().starts_with("step: "), "{bad}");
        }
    }
}
