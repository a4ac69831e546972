//! Phase 5, limits: rate limits and spend limits (budgets), checked after the cache lookup (a hit
//! that does not count never reserves anything) and before anything goes upstream.
//!
//! Every rule of the gateway that applies to the request reserves its cost, all of them in one
//! atomic check-and-reserve of the [`aigate_store::RateLimitStore`] (memory, or Redis shared by
//! replicas, one round trip): 1 for request rules, an estimate for token rules (prompt bytes / 4 plus
//! `max_tokens`, else `default_max_tokens`) and for cost rules and budgets (that estimate priced,
//! in micro-USD). The reservations ride on the request's meter; when the response ends, the log
//! writer settles each to the actual amount ([`crate::limits::LimitLayer::settle`]).
//!
//! Reads: the gateway's rules, the request body (model, `max_tokens`), `cf-aig-metadata`, the
//! caller's credentials. Writes: the meter's reservations and `x-ratelimit-*` headers. Fails
//! closed with 429 naming the rule, the limit, what was used and when it resets (and nothing
//! reserved under any rule); a failing store follows `on_store_error`: allow (counted,
//! logged once per 10 s) or deny with 503.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aigate_store::{Check, Decision, LimitSpec, Technique};
use http::HeaderValue;
use serde::Deserialize;

use super::Call;
use crate::error::{GatewayError, RateHeaders};
use crate::limits::headers;
use crate::limits::{
    format_reset, usd_to_micros, Admission, Held, LimitKey, LimitLayer, Measure, OnStoreError, Rule, MICROS_PER_USD,
};
use crate::meter::usage::Usage;
use crate::meter::Meter;
use crate::state::AppState;

/// Reserves what the request may use under every rule of its gateway. `hit`: the answer comes
/// from the cache.
pub async fn limits(state: &AppState, call: &Call<'_>, hit: bool, meter: &mut Meter) -> Result<(), GatewayError> {
    let gateway = &call.route.gateway;
    if gateway.rules.is_empty() {
        return Ok(());
    }
    let mut facts = Facts::new(call);
    meter.admitted(reserve(&state.limits, &gateway.name, &gateway.rules, &mut facts, hit).await?);
    Ok(())
}

/// What the limits phase reads of a request, computed only when a rule needs it.
struct Facts<'a> {
    call: &'a Call<'a>,
    probe: Option<Probe>,
    metadata: Option<Vec<(String, aigate_store::MetaValue)>>,
}

#[derive(Debug, Default, Deserialize)]
struct Probe {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
}

impl<'a> Facts<'a> {
    fn new(call: &'a Call<'a>) -> Facts<'a> {
        Facts { call, probe: None, metadata: None }
    }

    fn probe(&mut self) -> &Probe {
        self.probe.get_or_insert_with(|| serde_json::from_slice(self.call.body).unwrap_or_default())
    }

    fn key_value(&mut self, key: &LimitKey) -> Option<String> {
        match key {
            LimitKey::Gateway => Some(String::new()),
            LimitKey::Credential => {
                let mut h = blake3::Hasher::new();
                for c in self.call.caller.credentials() {
                    h.update(&(c.len() as u64).to_le_bytes());
                    h.update(c);
                }
                let hex = h.finalize().to_hex();
                Some(hex.as_str()[..32].to_owned())
            }
            LimitKey::Model => self.probe().model.clone(),
            LimitKey::Metadata(k) => {
                let headers = &self.call.head.headers;
                let md = self.metadata.get_or_insert_with(|| {
                    headers
                        .get(crate::headers::CF_AIG_METADATA)
                        .and_then(|v| crate::logs::parse_metadata(v.as_bytes()))
                        .unwrap_or_default()
                });
                md.iter().find(|(name, _)| name == k).map(|(_, v)| match v {
                    aigate_store::MetaValue::String(s) => s.clone(),
                    other => other.to_json().to_string(),
                })
            }
        }
    }

    /// Estimated input and output tokens: the body's bytes / 4 in, and out what the request may
    /// generate (`max_tokens`, `max_completion_tokens` or `max_output_tokens`, else
    /// `default_max_tokens`), only for an endpoint that generates tokens.
    fn token_estimate(&mut self, default_max_tokens: u64) -> (u64, u64) {
        let input = (self.call.body.len() as u64).div_ceil(4);
        if !self.call.route.endpoint.generates_tokens() {
            return (input, 0);
        }
        let p = self.probe();
        let output = p.max_tokens.or(p.max_completion_tokens).or(p.max_output_tokens).unwrap_or(default_max_tokens);
        (input, output)
    }

    /// Whether the output estimate is `default_max_tokens` because the request sets no maximum.
    fn assumes_default_output(&mut self) -> bool {
        if !self.call.route.endpoint.generates_tokens() {
            return false;
        }
        let p = self.probe();
        p.max_tokens.or(p.max_completion_tokens).or(p.max_output_tokens).is_none()
    }

    fn cost_estimate_micros(&mut self, default_max_tokens: u64) -> u64 {
        let (input, output) = self.token_estimate(default_max_tokens);
        let model = self.probe().model.clone();
        let usage = Usage { input_tokens: input, output_tokens: output, model, ..Usage::default() };
        self.call.settings.prices.cost_for(&self.call.route.provider.name, &usage, None).map_or(0, usd_to_micros)
    }
}

/// Checks and reserves every rule of `rules` that applies. `hit`: the response comes from the
/// cache (only request rules, and only when cache hits count).
async fn reserve(
    layer: &LimitLayer,
    gateway: &Arc<str>,
    rules: &[Rule],
    facts: &mut Facts<'_>,
    hit: bool,
) -> Result<Admission, GatewayError> {
    let mut adm = Admission::default();
    if rules.is_empty() {
        return Ok(adm);
    }
    let opts = layer.opts.load();
    if hit && !opts.count_cache_hits {
        return Ok(adm);
    }
    let now = layer.clock.now_ms();
    // Every rule that applies, then one check-and-reserve for all of them (one round trip to a
    // shared store; all or nothing, so a refusal leaves nothing to give back).
    let mut planned = Vec::with_capacity(rules.len());
    for rule in rules {
        if hit && rule.measure != Measure::Requests {
            continue;
        }
        // A request whose answer carries no usage (a model list, a file upload) spends no tokens.
        if rule.measure != Measure::Requests && facts.call.route.endpoint.usage_format().is_none() {
            continue;
        }
        if let Some(m) = &rule.model {
            if facts.probe().model.as_deref() != Some(m.as_str()) {
                continue;
            }
        }
        let Some(value) = facts.key_value(&rule.key) else { continue };
        let estimate = match rule.measure {
            Measure::Requests => 1,
            Measure::Tokens => {
                let (i, o) = facts.token_estimate(opts.default_max_tokens);
                i + o
            }
            Measure::CostUsd => facts.cost_estimate_micros(opts.default_max_tokens),
        };
        let window = rule.budget.as_ref().and_then(|b| b.period.window(now));
        let (key, spec) = store_key(gateway, rule, &value, window);
        planned.push(Planned { rule, key, spec, estimate, window });
    }
    let checks: Vec<Check<'_>> = planned
        .iter()
        // An estimate above the whole limit reserves the limit: the request passes on an empty
        // window and is settled to what it used, instead of being refused forever.
        .map(|p| Check { key: &p.key, spec: p.spec, cost: p.estimate.min(p.rule.limit) })
        .collect();
    let decisions = match layer.store.acquire_all(&checks).await {
        Ok(d) => d,
        Err(e) => {
            layer.store_error(&e);
            if opts.on_store_error == OnStoreError::Deny {
                return Err(GatewayError::LimitStoreUnavailable);
            }
            return Ok(adm);
        }
    };
    let mut tightest: [Option<Decision>; 2] = [None, None];
    for (p, d) in planned.iter().zip(decisions) {
        let rule = p.rule;
        if !d.allowed {
            layer.stats.limited.fetch_add(1, Ordering::Relaxed);
            layer.metrics.record_limited(gateway, &rule.name);
            let assumed = (rule.measure != Measure::Requests && facts.assumes_default_output())
                .then_some(opts.default_max_tokens);
            return Err(denied(rule, &d, (p.estimate, assumed), p.window, now));
        }
        let slot = match rule.measure {
            Measure::Requests => Some(0),
            Measure::Tokens => Some(1),
            Measure::CostUsd => None,
        };
        let reservation = d.reservation.clone();
        if let Some(i) = slot {
            if tightest[i].as_ref().is_none_or(|t| d.remaining < t.remaining) {
                tightest[i] = Some(d);
            }
        }
        if let Some(reservation) = reservation {
            adm.held.push(Held { rule: rule.clone(), gateway: gateway.clone(), reservation, window: p.window });
        }
    }
    let names = [
        [headers::LIMIT_REQUESTS, headers::REMAINING_REQUESTS, headers::RESET_REQUESTS],
        [headers::LIMIT_TOKENS, headers::REMAINING_TOKENS, headers::RESET_TOKENS],
    ];
    for (d, [l, r, t]) in tightest.iter().zip(names) {
        if let Some(d) = d {
            adm.headers.push((l, HeaderValue::from(d.limit)));
            adm.headers.push((r, HeaderValue::from(d.remaining)));
            if let Ok(v) = HeaderValue::from_str(&format_reset(d.reset_ms)) {
                adm.headers.push((t, v));
            }
        }
    }
    Ok(adm)
}

/// A rule that applies to the request, with what it would reserve.
struct Planned<'r> {
    rule: &'r Rule,
    key: String,
    spec: LimitSpec,
    estimate: u64,
    window: Option<(u64, u64)>,
}

/// The store key and spec of a rule for a key value (and a budget's calendar window).
fn store_key(gateway: &str, rule: &Rule, value: &str, window: Option<(u64, u64)>) -> (String, LimitSpec) {
    match window {
        // A calendar window: its own key, counted over the whole window.
        Some((start, end)) => (
            format!("{gateway}:{}:{value}:{start}", rule.name),
            LimitSpec { limit: rule.limit, period_ms: end - start, technique: Technique::Sliding },
        ),
        None => (
            format!("{gateway}:{}:{value}", rule.name),
            LimitSpec { limit: rule.limit, period_ms: rule.period_ms, technique: rule.technique },
        ),
    }
}

/// The refusal of `rule`: `estimate` is what the request would have reserved, and `assumed` the
/// output tokens assumed for a request that sets no maximum.
fn denied(
    rule: &Rule,
    d: &Decision,
    (estimate, assumed): (u64, Option<u64>),
    window: Option<(u64, u64)>,
    now: u64,
) -> GatewayError {
    // Nothing counted in a window is older than the window: no wait is longer than it (a sliding
    // window's sub-windows may put the store's figure a little past it).
    let (reset_ms, retry_ms) = match window {
        Some((_, end)) => (end.saturating_sub(now), end.saturating_sub(now)),
        None => (d.reset_ms.min(rule.period_ms), d.retry_after_ms.min(rule.period_ms)),
    };
    let (reset_ms, retry_ms) = (reset_ms.max(1), retry_ms.max(1));
    let what = if rule.budget.is_some() { "budget" } else { "rate limit" };
    let per = match &rule.budget {
        Some(b) => b.period.label(),
        None => format!(
            "{} ({})",
            humantime::format_duration(Duration::from_millis(rule.period_ms)),
            rule.technique.as_str()
        ),
    };
    let mut needs = if estimate > 1 {
        format!(", this request needs about {}", amount(rule.measure, estimate))
    } else {
        String::new()
    };
    if let Some(n) = assumed {
        needs.push_str(&format!(
            " (it sets no max_tokens, so {n} output tokens are assumed: send max_tokens, or lower [limits] default_max_tokens)"
        ));
    }
    let message = format!(
        "{what} {:?} reached: {} per {per}, {} used{needs}; resets in {}",
        &*rule.name,
        amount(rule.measure, rule.limit),
        amount(rule.measure, d.used),
        format_reset(reset_ms),
    );
    GatewayError::RateLimited {
        message,
        code: if rule.budget.is_some() { "budget_exceeded" } else { "rate_limit_exceeded" },
        retry_after_ms: retry_ms,
        limit: rule.limit,
        remaining: d.remaining,
        reset_ms,
        headers: match rule.measure {
            Measure::Requests => Some(RateHeaders::Requests),
            Measure::Tokens => Some(RateHeaders::Tokens),
            // OpenAI's headers count requests and tokens; a spend limit has none of its own.
            Measure::CostUsd => None,
        },
    }
}

/// An amount of a rule's measure as a person reads it: `12 requests`, `500 tokens`, `$1.50`,
/// `$0.00001` (a cost keeps the digits it needs, up to a micro-dollar).
fn amount(measure: Measure, v: u64) -> String {
    match measure {
        Measure::Requests => format!("{v} requests"),
        Measure::Tokens => format!("{v} tokens"),
        Measure::CostUsd => usd(v),
    }
}

/// Micro-dollars as dollars: two decimals from a cent up, else as many as a micro-dollar needs.
fn usd(micros: u64) -> String {
    if micros.is_multiple_of(10_000) || micros >= 1_000_000 {
        return format!("${:.2}", micros as f64 / MICROS_PER_USD);
    }
    let s = format!("{:.6}", micros as f64 / MICROS_PER_USD);
    format!("${}", s.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_read_as_written() {
        assert_eq!(usd(10), "$0.00001");
        assert_eq!(usd(12), "$0.000012");
        assert_eq!(usd(1_500_000), "$1.50");
        assert_eq!(usd(50_000), "$0.05");
        assert_eq!(usd(0), "$0.00");
        assert_eq!(amount(Measure::Tokens, 500), "500 tokens");
    }
}
