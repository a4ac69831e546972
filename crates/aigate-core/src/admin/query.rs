//! The query strings of the admin API: log filters, time bounds, analytics and report
//! parameters. Every bad value is an error naming the parameter.

use aigate_store::{AnalyticsQuery, Granularity, GroupBy, LogFilter, MetaValue};

use crate::report::Thresholds;

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

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
