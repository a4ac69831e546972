//! Dynamic routes: a request whose model is `dynamic/NAME` follows the gateway's route NAME, a
//! fallback chain (`steps`) or a weighted split whose arms are chains (`[[arms]]`), each arm with
//! optional conditions on the request's metadata (`when`) and the split optionally sticky per
//! caller. A step names a provider and a model; the request goes to it through the API for every
//! provider ([`crate::translate`]), so a step to Anthropic or Gemini is translated.
//!
//! A route's version is a short hash of its definition: it changes when the route does (a reload
//! that edits it), is the same on every replica with the same file, and is recorded with each
//! request as `NAME@VERSION`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use serde_json::{Map, Value};

use super::{draw, Chain, Metadata, RetryOverride, Step, Sticky, MAX_STEPS};
use crate::config::{RetrySettings, RouteConfig, StepConfig};
use crate::error::GatewayError;

/// The model prefix that names a route.
pub const PREFIX: &str = "dynamic/";

/// A validated route.
#[derive(Debug)]
pub struct DynamicRoute {
    /// Its name.
    pub name: String,
    /// A short hash of its definition.
    pub version: String,
    sticky: Option<Sticky>,
    arms: Vec<Arm>,
}

#[derive(Debug)]
struct Arm {
    weight: u32,
    when: Vec<(String, String)>,
    steps: Vec<RouteStep>,
}

#[derive(Debug)]
struct RouteStep {
    provider: String,
    model: String,
    timeout: Option<Duration>,
    max_attempts: Option<u32>,
}

impl DynamicRoute {
    /// Validates `[gateways.GW.routes.NAME]`; `key` names it in errors, `known` says whether a
    /// provider is configured.
    pub fn validate(
        name: &str,
        rc: &RouteConfig,
        key: &str,
        known: &dyn Fn(&str) -> bool,
    ) -> Result<DynamicRoute, String> {
        let version = {
            let text = serde_json::to_vec(rc).map_err(|e| format!("{key}: {e}"))?;
            blake3::hash(&text).to_hex()[..8].to_owned()
        };
        let arms = match (rc.steps.is_empty(), rc.arms.is_empty()) {
            (false, true) => {
                vec![Arm { weight: 1, when: Vec::new(), steps: steps(&rc.steps, &format!("{key}.steps"), known)? }]
            }
            (true, false) => {
                let mut arms = Vec::with_capacity(rc.arms.len());
                for (i, a) in rc.arms.iter().enumerate() {
                    let k = format!("{key}.arms[{i}]");
                    let weight = a.weight.unwrap_or(1);
                    if !(1..=10_000).contains(&weight) {
                        return Err(format!("{k}.weight: {weight} is not between 1 and 10000"));
                    }
                    let mut when = Vec::with_capacity(a.when.len());
                    for (field, value) in &a.when {
                        let Some(meta) = field.strip_prefix("metadata.").filter(|m| !m.is_empty()) else {
                            return Err(format!("{k}.when: {field:?} is not \"metadata.KEY\""));
                        };
                        when.push((meta.to_owned(), value.clone()));
                    }
                    arms.push(Arm { weight, when, steps: steps(&a.steps, &format!("{k}.steps"), known)? });
                }
                arms
            }
            _ => return Err(format!("{key}: give either steps = [...] or [[arms]], not both or neither")),
        };
        let sticky = rc.sticky.as_deref().map(Sticky::parse).transpose().map_err(|e| format!("{key}.sticky: {e}"))?;
        Ok(DynamicRoute { name: name.to_owned(), version, sticky, arms })
    }

    /// One line: each arm's weight, condition and steps.
    pub fn describe(&self) -> String {
        let chain = |steps: &[RouteStep]| {
            steps.iter().map(|s| format!("{}/{}", s.provider, s.model)).collect::<Vec<_>>().join(" → ")
        };
        if let [only] = self.arms.as_slice() {
            return chain(&only.steps);
        }
        self.arms
            .iter()
            .map(|a| {
                let when: Vec<String> = a.when.iter().map(|(k, v)| format!("metadata.{k} = {v:?}")).collect();
                let when = if when.is_empty() { String::new() } else { format!(" when {}", when.join(", ")) };
                format!("[weight {}{when}: {}]", a.weight, chain(&a.steps))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `NAME@VERSION`.
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// The chain for a request: the arm its metadata and the split choose, each step's body the
    /// request with `model` set to `provider/model`. Arms whose `when` the request's metadata meets
    /// share it by weight; when none does, the arms without `when` do.
    pub fn chain(&self, req: &Map<String, Value>, headers: &HeaderMap) -> Result<Chain, GatewayError> {
        let mut metadata = Metadata::of(headers);
        // Arms with conditions the request meets take it; without one, the unconditional arms.
        let mut eligible: Vec<&Arm> = Vec::with_capacity(self.arms.len());
        for arm in self.arms.iter().filter(|a| !a.when.is_empty()) {
            if arm.when.iter().all(|(k, v)| metadata.get(k).as_deref() == Some(v.as_str())) {
                eligible.push(arm);
            }
        }
        if eligible.is_empty() {
            eligible.extend(self.arms.iter().filter(|a| a.when.is_empty()));
        }
        let arm = match eligible.as_slice() {
            [] => {
                return Err(GatewayError::BadRequest(format!(
                    "model: no arm of route {:?} matches this request's cf-aig-metadata",
                    self.name
                )))
            }
            [one] => *one,
            many => {
                let total: u32 = many.iter().map(|a| a.weight).sum();
                let point = draw(self.sticky.as_ref(), &self.name, headers, &mut metadata) * f64::from(total);
                let mut acc = 0.0;
                many.iter()
                    .find(|a| {
                        acc += f64::from(a.weight);
                        point < acc
                    })
                    .copied()
                    .unwrap_or(many[many.len() - 1])
            }
        };
        let mut req = req.clone();
        let mut steps = Vec::with_capacity(arm.steps.len());
        for s in &arm.steps {
            req.insert("model".into(), Value::String(format!("{}/{}", s.provider, s.model)));
            let body = serde_json::to_vec(&req).map_err(|_| GatewayError::Internal)?;
            steps.push(Step {
                provider: "compat".into(),
                endpoint: String::new(),
                body: Bytes::from(body),
                headers: Vec::new(),
                timeout: s.timeout,
                retry: RetryOverride { max_attempts: s.max_attempts, ..RetryOverride::default() },
                model: Some(s.model.clone()),
            });
        }
        Ok(Chain { steps, route: Some(self.label()) })
    }
}

fn steps(list: &[StepConfig], key: &str, known: &dyn Fn(&str) -> bool) -> Result<Vec<RouteStep>, String> {
    if list.is_empty() || list.len() > MAX_STEPS {
        return Err(format!("{key}: give 1 to {MAX_STEPS} steps"));
    }
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            let k = format!("{key}[{i}]");
            if !known(&s.provider) {
                return Err(format!("{k}.provider: {:?} is not a configured provider", s.provider));
            }
            if s.model.is_empty() {
                return Err(format!("{k}.model: must not be empty"));
            }
            let timeout = s
                .timeout
                .as_deref()
                .map(|t| humantime::parse_duration(t.trim()).map_err(|e| format!("{k}.timeout: {t:?}: {e}")))
                .transpose()?;
            if timeout.is_some_and(|t| t.is_zero()) {
                return Err(format!("{k}.timeout: must be greater than zero"));
            }
            if let Some(n) = s.max_attempts {
                if !(1..=RetrySettings::MAX_ATTEMPTS).contains(&n) {
                    return Err(format!("{k}.max_attempts: {n} is not between 1 and 5"));
                }
            }
            Ok(RouteStep {
                provider: s.provider.clone(),
                model: s.model.clone(),
                timeout,
                max_attempts: s.max_attempts,
            })
        })
        .collect()
}

/// The route a model names, if it names one: `dynamic/NAME`.
pub fn route_name(model: &str) -> Option<&str> {
    model.strip_prefix(PREFIX)
}

/// Looks a route up; unknown: 400 listing the gateway's routes.
pub fn find<'g>(
    routes: &'g HashMap<String, Arc<DynamicRoute>>,
    gateway: &str,
    name: &str,
) -> Result<&'g Arc<DynamicRoute>, GatewayError> {
    routes.get(name).ok_or_else(|| {
        let mut names: Vec<&str> = routes.keys().map(String::as_str).collect();
        names.sort_unstable();
        let known = if names.is_empty() { "none".to_owned() } else { names.join(", ") };
        GatewayError::BadRequest(format!(
            "model: route {name:?} is not configured on gateway {gateway:?}; its routes: {known}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(toml_text: &str) -> DynamicRoute {
        let rc: RouteConfig = toml::from_str(toml_text).unwrap();
        DynamicRoute::validate("r", &rc, "routes.r", &|p| p == "openai" || p == "anthropic").unwrap()
    }

    #[test]
    fn split_follows_weights_and_conditions() {
        let r = route(
            r#"
            [[arms]]
            weight = 90
            steps = [{ provider = "openai", model = "a" }]
            [[arms]]
            weight = 10
            steps = [{ provider = "openai", model = "b" }]
            [[arms]]
            when = { "metadata.tier" = "free" }
            steps = [{ provider = "anthropic", model = "c" }]
            "#,
        );
        let req: Map<String, Value> = serde_json::from_str(r#"{"model":"dynamic/r","messages":[]}"#).unwrap();
        let h = HeaderMap::new();
        let n = 5000;
        let b = (0..n).filter(|_| r.chain(&req, &h).unwrap().steps[0].model.as_deref() == Some("b")).count();
        assert!((350..650).contains(&b), "{b}");
        let mut free = HeaderMap::new();
        free.insert("cf-aig-metadata", r#"{"tier":"free"}"#.parse().unwrap());
        // The conditional arm takes every request that meets its condition.
        let c = (0..100).filter(|_| r.chain(&req, &free).unwrap().steps[0].model.as_deref() == Some("c")).count();
        assert_eq!(c, 100);
        let step = &r.chain(&req, &h).unwrap().steps[0];
        let body: Value = serde_json::from_slice(&step.body).unwrap();
        assert!(body["model"].as_str().unwrap().starts_with("openai/"));
    }

    #[test]
    fn errors_name_the_field() {
        let rc: RouteConfig = toml::from_str(r#"steps = [{ provider = "nope", model = "m" }]"#).unwrap();
        let e = DynamicRoute::validate("r", &rc, "gateways.g.routes.r", &|p| p == "openai").unwrap_err();
        assert!(e.contains("gateways.g.routes.r.steps[0].provider"), "{e}");
        let rc: RouteConfig = toml::from_str("").unwrap();
        assert!(DynamicRoute::validate("r", &rc, "k", &|_| true).unwrap_err().contains("either"));
        let a = route(r#"steps = [{ provider = "openai", model = "a" }]"#);
        let b = route(r#"steps = [{ provider = "openai", model = "b" }]"#);
        assert_ne!(a.version, b.version);
    }
}
