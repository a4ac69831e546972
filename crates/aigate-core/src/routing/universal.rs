//! Cloudflare's Universal Endpoint: `POST /v1/{account}/{gateway}` (or `/{gateway}`) with a JSON
//! array of requests, `{provider, endpoint, headers, query, config?}`, tried in order until one
//! answers 2xx. A step's `headers` override the request's (which override the gateway's
//! settings), so `cf-aig-cache-ttl: "0"` inside one step turns the cache off for that step only;
//! `config` (`requestTimeout`, `maxAttempts`, `retryDelay`, `backoff`) overrides both.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use serde_json::Value;

use super::{Chain, RetryOverride, Step, MAX_STEPS};
use crate::config::{Backoff, RetrySettings};
use crate::error::GatewayError;

/// The chain a Universal request's body describes; a malformed body is a 400 naming the step and
/// the field.
pub fn chain(body: &[u8]) -> Result<Chain, GatewayError> {
    let bad = |m: String| GatewayError::BadRequest(m);
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(body) else {
        return Err(bad(
            "the Universal Endpoint takes a JSON array of steps: [{\"provider\", \"endpoint\", \"headers\", \"query\"}, …]"
                .into(),
        ));
    };
    if items.is_empty() || items.len() > MAX_STEPS {
        return Err(bad(format!("the Universal Endpoint takes 1 to {MAX_STEPS} steps; this body has {}", items.len())));
    }
    let mut steps = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        steps.push(step(item).map_err(|m| bad(format!("step {i}: {m}")))?);
    }
    Ok(Chain { steps, route: None })
}

fn step(item: Value) -> Result<Step, String> {
    let Value::Object(mut o) = item else {
        return Err("must be an object {\"provider\", \"endpoint\", \"headers\", \"query\"}".into());
    };
    let text = |o: &serde_json::Map<String, Value>, k: &str| -> Result<String, String> {
        match o.get(k) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(_) => Err(format!("{k}: must be a non-empty string")),
            None => Err(format!("{k}: missing")),
        }
    };
    let provider = text(&o, "provider")?;
    let endpoint = text(&o, "endpoint")?.trim_start_matches('/').to_owned();
    let mut headers = Vec::new();
    match o.remove("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(h)) => {
            for (k, v) in h {
                let v = match v {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return Err(format!("headers.{k}: must be a string")),
                };
                let name =
                    HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("headers: {k:?} is not a header name"))?;
                let mut value = HeaderValue::from_str(&v)
                    .map_err(|_| format!("headers.{k}: the value is not a valid header value"))?;
                value.set_sensitive(true);
                headers.push((name, value));
            }
        }
        Some(_) => return Err("headers: must be an object of header names to values".into()),
    }
    let body = match o.remove("query") {
        None => return Err("query: missing (the request body for the provider)".into()),
        Some(q) => Bytes::from(serde_json::to_vec(&q).map_err(|e| format!("query: {e}"))?),
    };
    let mut timeout = None;
    let mut retry = RetryOverride::default();
    match o.remove("config") {
        None | Some(Value::Null) => {}
        Some(Value::Object(c)) => {
            for (k, v) in c {
                match k.as_str() {
                    "requestTimeout" => {
                        let ms = v
                            .as_u64()
                            .filter(|ms| *ms > 0)
                            .ok_or("config.requestTimeout: must be a positive number of milliseconds")?;
                        timeout = Some(Duration::from_millis(ms));
                    }
                    "maxAttempts" => {
                        let n = v
                            .as_u64()
                            .and_then(|n| u32::try_from(n).ok())
                            .filter(|n| (1..=RetrySettings::MAX_ATTEMPTS).contains(n))
                            .ok_or("config.maxAttempts: must be a number from 1 to 5")?;
                        retry.max_attempts = Some(n);
                    }
                    "retryDelay" => {
                        let ms = v
                            .as_u64()
                            .filter(|ms| *ms <= 5000)
                            .ok_or("config.retryDelay: must be a number of milliseconds from 0 to 5000")?;
                        retry.delay = Some(Duration::from_millis(ms));
                    }
                    "backoff" => {
                        retry.backoff = Some(match v.as_str() {
                            Some("constant") => Backoff::Constant,
                            Some("linear") => Backoff::Linear,
                            Some("exponential") => Backoff::Exponential,
                            _ => {
                                return Err("config.backoff: must be \"constant\", \"linear\" or \"exponential\"".into())
                            }
                        })
                    }
                    other => {
                        return Err(format!(
                            "config.{other}: unknown; known: requestTimeout, maxAttempts, retryDelay, backoff"
                        ))
                    }
                }
            }
        }
        Some(_) => return Err("config: must be an object".into()),
    }
    Ok(Step { provider, endpoint, body, headers, timeout, retry, model: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_steps_and_names_bad_fields() {
        let c = chain(
            br#"[{"provider":"openai","endpoint":"chat/completions","headers":{"authorization":"Bearer k","cf-aig-cache-ttl":0},
                 "query":{"model":"gpt-4o-mini"},"config":{"requestTimeout":1000,"maxAttempts":2}},
                {"provider":"anthropic","endpoint":"/v1/messages","query":{"model":"claude"}}]"#,
        )
        .unwrap();
        assert_eq!(c.steps.len(), 2);
        assert_eq!(c.steps[0].headers.len(), 2);
        assert_eq!(c.steps[0].timeout, Some(Duration::from_millis(1000)));
        assert_eq!(c.steps[1].endpoint, "v1/messages");
        let e = chain(br#"[{"provider":"openai","endpoint":"x","query":{}},{"provider":"openai","query":{}}]"#)
            .unwrap_err();
        assert_eq!(e.to_string(), "step 1: endpoint: missing");
        let e = chain(br#"[{"provider":"openai","endpoint":"x","query":{},"config":{"maxAttempts":9}}]"#).unwrap_err();
        assert!(e.to_string().starts_with("step 0: config.maxAttempts"), "{e}");
        assert!(chain(b"{}").is_err() && chain(b"[]").is_err());
    }
}
