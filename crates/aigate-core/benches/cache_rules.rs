//! What matching cache rules costs on the request path: ten rules over endpoint, model, metadata
//! and path prefix, against a typical chat request that matches none of them (the worst case:
//! every rule is tried) and one that matches the last. Target: under 1 µs for ten rules.
//!
//! ```text
//! cargo bench -p aigate-core --bench cache_rules
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use aigate_core::cache::rules::{CacheRules, RuleInput};
use aigate_core::config::CacheRuleConfig;
use aigate_core::endpoint::Endpoint;
use criterion::{criterion_group, criterion_main, Criterion};

const RULES: &str = r#"
[[rules]]
match = { endpoint = "embeddings" }
ttl = "30d"
[[rules]]
match = { model = "gpt-4o" }
enabled = false
[[rules]]
match = { metadata.feature = "resume" }
ttl = "7d"
[[rules]]
match = { path_prefix = "v1/responses" }
ttl = "2h"
[[rules]]
match = { model = "claude-sonnet-4-5", metadata.tier = "free" }
ttl = "1d"
[[rules]]
match = { endpoint = "messages", model = "claude-haiku-4-5" }
ttl = "3h"
[[rules]]
match = { metadata.user = "batch-jobs" }
ttl = "30d"
[[rules]]
match = { model = "o3-mini" }
enabled = false
[[rules]]
match = { endpoint = "chat", metadata.feature = "search", metadata.locale = "en" }
ttl = "10m"
[[rules]]
name = "last"
match = { endpoint = "chat", model = "gpt-4o-mini", metadata.feature = "summary" }
ttl = "12h"
"#;

/// About 1 KB, `model` first as most clients write it.
const BODY: &str = r#"{"model":"gpt-4o-mini","temperature":0.2,"messages":[{"role":"system","content":"You are a concise assistant for a travel company. Answer in two sentences at most and never invent prices."},{"role":"user","content":"I want to visit Lisbon in March. What is the weather like, and what should I pack for a week of walking? Also tell me about trains to Sintra and Cascais, and whether I need to book ahead, and what the museums charge on Sundays, please, in detail, thank you very much for your help."},{"role":"assistant","content":"March in Lisbon is mild, around 15 to 19 C with some rain. Pack layers, a light rain jacket and comfortable shoes."},{"role":"user","content":"Great. Can you check the forecast for the first week of March and suggest two day trips that are easy by train?"}]}"#;

fn bench(c: &mut Criterion) {
    #[derive(serde::Deserialize)]
    struct W {
        rules: Vec<CacheRuleConfig>,
    }
    let w: W = toml::from_str(RULES).unwrap();
    let rules = CacheRules::validate(&w.rules, "gateways.bench.cache").unwrap();
    assert_eq!(rules.rules().len(), 10);
    let input = |md: &'static str| RuleInput {
        endpoint: Endpoint::ChatCompletions,
        path: "v1/chat/completions",
        body: BODY.as_bytes(),
        metadata: Some(md.as_bytes()),
    };
    let none = input(r#"{"feature":"chat","user":"u-123","tier":"pro"}"#);
    let last = input(r#"{"feature":"summary","user":"u-123","tier":"pro"}"#);
    assert!(rules.find(&none).is_none());
    assert_eq!(rules.find(&last).map(|r| &*r.name), Some("last"));
    c.bench_function("cache_rules/10_rules_no_match", |b| b.iter(|| rules.find(black_box(&none)).is_some()));
    c.bench_function("cache_rules/10_rules_last_matches", |b| b.iter(|| rules.find(black_box(&last)).is_some()));
    // The parts: the walk over the body for its model, the first rule alone.
    c.bench_function("cache_rules/part_body_model_walk", |b| {
        b.iter(|| aigate_core::meter::usage::member_value(black_box(BODY.as_bytes()), "model").is_some())
    });
    let empty = CacheRules::none();
    c.bench_function("cache_rules/no_rules", |b| b.iter(|| empty.find(black_box(&none)).is_some()));
}

criterion_group!(benches, bench);
criterion_main!(benches);
