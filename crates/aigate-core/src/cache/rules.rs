//! Cache rules: per-request exceptions to a gateway's cache defaults, tried in order, the first
//! that matches wins (`[[gateways.NAME.cache.rules]]`). A rule matches on the endpoint, the model,
//! `cf-aig-metadata` entries and a provider path prefix (every condition it names must hold), and
//! either sets the TTL of what it stores or turns the cache off for the request (`enabled =
//! false`, a BYPASS like `cf-aig-skip-cache`).
//!
//! Rules are validated and compiled once per configuration ([`CacheRules::validate`]; a reload
//! builds new ones) into what the cache phase compares cheaply: an [`Endpoint`] compare, a byte
//! compare of the body's `model` (found by a walk over the top-level members, no parse), a walk of
//! the metadata header, a prefix compare. Nothing is allocated to match, and a gateway without
//! rules pays one length check.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use crate::cache::MAX_TTL;
use crate::endpoint::Endpoint;
use crate::meter::usage::{for_each_member, member_value, value_is};

/// Most rules per gateway (a rule list is walked on every request).
pub const MAX_RULES: usize = 64;

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct CacheRule {
    /// `name`, else `#N` (1-based position).
    pub name: Arc<str>,
    /// The name as an `aigate-cache-rule` header value (built once).
    pub header: HeaderValue,
    /// `match.endpoint`.
    pub endpoint: Option<Endpoint>,
    /// `match.model`: the body's top-level `model` (Gemini: the model in the path).
    pub model: Option<Box<str>>,
    /// `match.metadata.KEY = VALUE`: every entry must be in `cf-aig-metadata`.
    pub metadata: Box<[(Box<str>, Box<str>)]>,
    /// `match.path_prefix`: the provider path (`chat/completions`, no leading slash) starts with it.
    pub path_prefix: Option<Box<str>>,
    /// TTL of what the rule stores (`None`: the gateway's).
    pub ttl: Option<Duration>,
    /// `false`: matching requests bypass the cache.
    pub enabled: bool,
}

/// What a request shows the rules.
#[derive(Debug, Clone, Copy)]
pub struct RuleInput<'a> {
    /// Its endpoint.
    pub endpoint: Endpoint,
    /// The provider path (no leading slash).
    pub path: &'a str,
    /// The request body.
    pub body: &'a [u8],
    /// The `cf-aig-metadata` header, if any.
    pub metadata: Option<&'a [u8]>,
}

/// A gateway's compiled rules, in order. Cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct CacheRules(Arc<[CacheRule]>);

impl CacheRules {
    /// No rules.
    pub fn none() -> CacheRules {
        CacheRules::default()
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[CacheRule] {
        &self.0
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first rule `req` matches.
    #[inline]
    pub fn find(&self, req: &RuleInput<'_>) -> Option<&CacheRule> {
        if self.0.is_empty() {
            return None;
        }
        // The body's model and the metadata's entries are looked for once, by the first rule that
        // asks.
        let mut facts = Facts::default();
        self.0.iter().find(|r| r.matches_with(req, &mut facts))
    }

    /// Validates `[[...cache.rules]]` (`key` is `gateways.NAME.cache`): an unknown match key, an
    /// unknown endpoint, a bad TTL or a repeated name is an error naming the rule.
    pub fn validate(rules: &[crate::config::CacheRuleConfig], key: &str) -> Result<CacheRules, String> {
        if rules.len() > MAX_RULES {
            return Err(format!("{key}.rules: at most {MAX_RULES} rules"));
        }
        let mut out: Vec<CacheRule> = Vec::with_capacity(rules.len());
        for (i, rc) in rules.iter().enumerate() {
            let rule = compile(rc, i).map_err(|m| format!("{key}.rules[{i}] ({}): {m}", display_name(rc, i)))?;
            if out.iter().any(|r| r.name == rule.name) {
                return Err(format!("{key}.rules[{i}]: the name {:?} is used by an earlier rule", rule.name));
            }
            out.push(rule);
        }
        Ok(CacheRules(out.into()))
    }
}

impl CacheRule {
    /// Whether every condition of the rule holds for `req`.
    pub fn matches(&self, req: &RuleInput<'_>) -> bool {
        self.matches_with(req, &mut Facts::default())
    }

    /// [`CacheRule::matches`], with what costs a walk (the body's model, the metadata's entries)
    /// found once per request in `facts`. Cheapest conditions first.
    #[inline]
    fn matches_with<'a>(&self, req: &RuleInput<'a>, facts: &mut Facts<'a>) -> bool {
        if self.endpoint.is_some_and(|e| e != req.endpoint) {
            return false;
        }
        if let Some(p) = &self.path_prefix {
            if !req.path.starts_with(&**p) {
                return false;
            }
        }
        if !self.metadata.is_empty() {
            let md = facts.metadata.get_or_insert_with(|| Metadata::of(req.metadata));
            if !self.metadata.iter().all(|(k, v)| md.get(k).is_some_and(|raw| value_is(raw, v))) {
                return false;
            }
        }
        if let Some(m) = &self.model {
            if facts.model.get_or_insert_with(|| request_model(req)).as_deref() != Some(&**m) {
                return false;
            }
        }
        true
    }

    /// What the configuration says the rule matches, for `aigate check`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(e) = self.endpoint {
            parts.push(format!("endpoint = \"{}\"", e.as_str()));
        }
        if let Some(m) = &self.model {
            parts.push(format!("model = {m:?}"));
        }
        for (k, v) in &self.metadata {
            parts.push(format!("metadata.{k} = {v:?}"));
        }
        if let Some(p) = &self.path_prefix {
            parts.push(format!("path_prefix = {p:?}"));
        }
        let then = if !self.enabled {
            "enabled = false".to_owned()
        } else if let Some(t) = self.ttl {
            format!("ttl = \"{}\"", humantime::format_duration(t))
        } else {
            "the gateway's ttl".to_owned()
        };
        format!("{}: match {{ {} }} -> {then}", self.name, parts.join(", "))
    }
}

/// What the rules of one request look up once.
#[derive(Default)]
struct Facts<'a> {
    model: Option<Option<Cow<'a, str>>>,
    metadata: Option<Metadata<'a>>,
}

/// Entries of `cf-aig-metadata` kept, as raw JSON (Cloudflare keeps five; a header with more is
/// looked up by a walk for what is not here).
const METADATA_KEPT: usize = 8;

/// The raw members of the metadata header, split once: (quoted key, value).
struct Metadata<'a> {
    header: Option<&'a [u8]>,
    items: [(&'a [u8], &'a [u8]); METADATA_KEPT],
    len: usize,
    overflow: bool,
}

impl<'a> Metadata<'a> {
    fn of(header: Option<&'a [u8]>) -> Metadata<'a> {
        let mut md = Metadata { header, items: [(&[], &[]); METADATA_KEPT], len: 0, overflow: false };
        if let Some(h) = header {
            for_each_member(h, |k, v| {
                if md.len < METADATA_KEPT {
                    md.items[md.len] = (k, v);
                    md.len += 1;
                } else {
                    md.overflow = true;
                }
            });
        }
        md
    }

    /// The raw value of `key` (a repeated key: the last one).
    fn get(&self, key: &str) -> Option<&'a [u8]> {
        if self.overflow {
            return member_value(self.header?, key);
        }
        self.items[..self.len].iter().rev().find(|(k, _)| value_is(k, key)).map(|(_, v)| *v)
    }
}

/// The request's model: the body's `model`, or for Gemini the model its path names. Borrowed
/// unless the body's string has escapes.
fn request_model<'a>(req: &RuleInput<'a>) -> Option<Cow<'a, str>> {
    if req.endpoint == Endpoint::GeminiGenerateContent {
        // `…/models/gemini-2.5-flash:generateContent`
        if let Some((_, rest)) = req.path.rsplit_once("models/") {
            return Some(Cow::Borrowed(rest.split([':', '%']).next().unwrap_or(rest)));
        }
    }
    let raw = member_value(req.body, "model")?;
    match raw {
        [b'"', inner @ .., b'"'] if !inner.contains(&b'\\') => std::str::from_utf8(inner).ok().map(Cow::Borrowed),
        [b'"', ..] => serde_json::from_slice::<String>(raw).ok().map(Cow::Owned),
        _ => None,
    }
}

fn display_name(rc: &crate::config::CacheRuleConfig, i: usize) -> String {
    rc.name.clone().unwrap_or_else(|| format!("#{}", i + 1))
}

/// Match keys, as the error lists them.
const MATCH_KEYS: &str = "endpoint, model, metadata.KEY, path_prefix";

fn compile(rc: &crate::config::CacheRuleConfig, i: usize) -> Result<CacheRule, String> {
    let name = display_name(rc, i);
    if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
        return Err("name: 1 to 64 visible characters".into());
    }
    let header = HeaderValue::from_str(&name).map_err(|_| "name: must be visible ASCII".to_owned())?;
    let mut rule = CacheRule {
        name: Arc::from(name.as_str()),
        header,
        endpoint: None,
        model: None,
        metadata: Box::new([]),
        path_prefix: None,
        ttl: None,
        enabled: rc.enabled.unwrap_or(true),
    };
    if rc.matches.is_empty() {
        return Err(format!("match: name at least one of {MATCH_KEYS}"));
    }
    let string = |k: &str, v: &toml::Value| -> Result<String, String> {
        v.as_str().map(str::to_owned).ok_or_else(|| format!("match.{k}: expected a string"))
    };
    let mut metadata = Vec::new();
    for (k, v) in &rc.matches {
        match k.as_str() {
            "endpoint" => {
                let s = string(k, v)?;
                rule.endpoint = Some(Endpoint::from_name(&s).ok_or_else(|| {
                    format!("match.endpoint: unknown endpoint {s:?}; expected one of {}", Endpoint::NAMES.join(", "))
                })?);
            }
            "model" => rule.model = Some(string(k, v)?.into()),
            "path_prefix" => rule.path_prefix = Some(string(k, v)?.trim_start_matches('/').into()),
            "metadata" => {
                let t = v.as_table().ok_or("match.metadata: expected a table like metadata.feature = \"x\"")?;
                for (mk, mv) in t {
                    let text = match mv {
                        toml::Value::String(s) => s.clone(),
                        toml::Value::Integer(n) => n.to_string(),
                        toml::Value::Float(f) => f.to_string(),
                        toml::Value::Boolean(b) => b.to_string(),
                        _ => return Err(format!("match.metadata.{mk}: expected a string, number or boolean")),
                    };
                    metadata.push((Box::from(mk.as_str()), text.into_boxed_str()));
                }
            }
            other => return Err(format!("match: unknown key {other:?}; expected {MATCH_KEYS}")),
        }
    }
    rule.metadata = metadata.into_boxed_slice();
    if let Some(v) = &rc.ttl {
        if !rule.enabled {
            return Err("ttl: has no effect with enabled = false".into());
        }
        let text = v.as_str().ok_or("ttl: expected a duration like \"30d\"")?;
        let ttl = humantime::parse_duration(text).map_err(|e| format!("ttl: {text:?}: {e}"))?;
        if ttl < Duration::from_secs(60) || ttl > MAX_TTL {
            return Err(format!("ttl: {text:?} is outside 60s to 30 days"));
        }
        rule.ttl = Some(ttl);
    }
    Ok(rule)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheRuleConfig;

    fn rules(toml_text: &str) -> Result<CacheRules, String> {
        #[derive(serde::Deserialize)]
        struct W {
            rules: Vec<CacheRuleConfig>,
        }
        let w: W = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        CacheRules::validate(&w.rules, "gateways.prod.cache")
    }

    fn input<'a>(endpoint: Endpoint, path: &'a str, body: &'a str, md: Option<&'a str>) -> RuleInput<'a> {
        RuleInput { endpoint, path, body: body.as_bytes(), metadata: md.map(str::as_bytes) }
    }

    #[test]
    fn first_match_wins_and_names_default_to_position() {
        let r = rules(
            r#"
[[rules]]
match = { endpoint = "embeddings" }
ttl = "30d"
[[rules]]
name = "no-4o"
match = { model = "gpt-4o" }
enabled = false
[[rules]]
match = { metadata.feature = "resume", metadata.tier = 2 }
ttl = "2h"
[[rules]]
match = { path_prefix = "/v1/chat" }
"#,
        )
        .unwrap();
        let names: Vec<&str> = r.rules().iter().map(|r| &*r.name).collect();
        assert_eq!(names, ["#1", "no-4o", "#3", "#4"]);
        let emb = input(Endpoint::Embeddings, "embeddings", r#"{"model":"gpt-4o"}"#, None);
        assert_eq!(&*r.find(&emb).unwrap().name, "#1");
        assert_eq!(r.find(&emb).unwrap().ttl, Some(Duration::from_secs(30 * 86_400)));
        let chat = input(Endpoint::ChatCompletions, "chat/completions", r#"{"model":"gpt-4o","messages":[]}"#, None);
        assert!(!r.find(&chat).unwrap().enabled);
        let mini = r#"{"model":"gpt-4o-mini"}"#;
        let md = input(Endpoint::ChatCompletions, "x", mini, Some(r#"{"feature":"resume","tier":2}"#));
        assert_eq!(&*r.find(&md).unwrap().name, "#3");
        let md = input(Endpoint::ChatCompletions, "x", mini, Some(r#"{"feature":"resume","tier":"3"}"#));
        assert!(r.find(&md).is_none());
        // A repeated key: the last one; more entries than are split once: still found.
        let md = input(Endpoint::ChatCompletions, "x", mini, Some(r#"{"feature":"x","tier":2,"feature":"resume"}"#));
        assert_eq!(&*r.find(&md).unwrap().name, "#3");
        let many = r#"{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6,"g":7,"h":8,"tier":2,"feature":"resume"}"#;
        let md = input(Endpoint::ChatCompletions, "x", mini, Some(many));
        assert_eq!(&*r.find(&md).unwrap().name, "#3");
        let p = input(Endpoint::ChatCompletions, "v1/chat/completions", mini, None);
        assert_eq!(&*r.find(&p).unwrap().name, "#4");
        let gem = input(Endpoint::GeminiGenerateContent, "v1beta/models/gpt-4o:generateContent", "{}", None);
        assert_eq!(&*r.find(&gem).unwrap().name, "no-4o");
        assert!(CacheRules::none().find(&chat).is_none());
    }

    #[test]
    fn errors_name_the_rule() {
        for (text, needles) in [
            ("[[rules]]\nmatch = { modle = \"x\" }\n", &["rules[0] (#1)", "unknown key \"modle\""][..]),
            ("[[rules]]\nmatch = { model = \"x\" }\n[[rules]]\nmatch = { model = \"y\" }\nttl = \"soon\"\n", &["rules[1] (#2)", "ttl"]),
            ("[[rules]]\nmatch = { endpoint = \"chats\" }\n", &["rules[0]", "embeddings"]),
            ("[[rules]]\nmatch = { model = \"x\" }\nttl = \"10s\"\n", &["rules[0]", "60s"]),
            ("[[rules]]\nmatch = {}\n", &["rules[0]", "at least one"]),
            ("[[rules]]\nmatch = { model = \"x\" }\nenabled = false\nttl = \"1h\"\n", &["no effect"]),
            ("[[rules]]\nname = \"a\"\nmatch = { model = \"x\" }\n[[rules]]\nname = \"a\"\nmatch = { model = \"y\" }\n", &["rules[1]", "earlier"]),
        ] {
            let e = rules(text).unwrap_err();
            for n in needles {
                assert!(e.contains(n), "{e} lacks {n}");
            }
        }
    }
}
