//! Configuration targets: arbitrary text, and the example configurations mutated.

use super::*;

/// A TOML value that validation must refuse or bound.
pub(super) const TOML_VALUES: &[&str] = &[
    "\"0s\"",
    "\"-1s\"",
    "\"1ns\"",
    "\"18446744073709551615s\"",
    "\"99999999999999999999h\"",
    "\"30d\"",
    "\"31d\"",
    "0",
    "-1",
    "1",
    "5",
    "6",
    "10000",
    "10001",
    "65536",
    "4294967296",
    "18446744073709551615",
    "1e309",
    "nan",
    "inf",
    "-inf",
    "0.0",
    "-0.0",
    "1.5",
    "\"1e400MB\"",
    "\"999999999999GB\"",
    "\"18446744073709551615GiB\"",
    "\"1.5KiB\"",
    "\"\"",
    "\"env:NOPE\"",
    "\"env:\"",
    "\"dynamic/x\"",
    "[]",
    "{}",
    "true",
    "false",
    "\"metadata.\"",
    "\"metadata.x\"",
    "\"credential\"",
    "\"http://\"",
    "\"https://{x}.a/{y}\"",
    "\"http://h/{a}{b}\"",
    "\"https://{account_id}.x\"",
    "\"http://[::1]:0\"",
    "\"redis://\"",
    "\"postgres://\"",
    "\"memory\"",
    "\"disk\"",
    "\"sqlite\"",
    "\"shadow\"",
    "\"fixed\"",
    "\"day\"",
    "\"24h\"",
    "\"tokens\"",
    "\"cost_usd\"",
    "\"x-goog-api-key\"",
    "[0.5, 2.0]",
    "[-1]",
    "{ provider = \"openai\", model = \"\" }",
    "[ { provider = \"nope\", model = \"m\" } ]",
    "[ { provider = \"openai\", model = \"m\", timeout = \"0s\" } ]",
    "\"default\"",
    "\"prod\"",
    "\"nope\"",
    "\"a b\"",
    "\"..\"",
    "\"é\"",
];

/// Lines that add sections or keys the seeds may lack.
pub(super) const TOML_LINES: &[&str] = &[
    "[gateways.x]",
    "[gateways.\"\"]",
    "[gateways.prod.canary]",
    "gateway = \"prod\"",
    "gateway = \"default\"",
    "percent = 101",
    "percent = -1",
    "[gateways.default.routes.r]",
    "[[gateways.default.routes.r.arms]]",
    "weight = 0",
    "when = { \"tier\" = \"x\" }",
    "when = { \"metadata.\" = \"x\" }",
    "steps = []",
    "[[gateways.default.limits]]",
    "key = \"metadata.\"",
    "[[gateways.default.budgets]]",
    "alerts = [0.0]",
    "[providers.x]",
    "base_url = \"http://a/{b\"",
    "base_url = \"ftp://a\"",
    "base_url = \"http://a?x\"",
    "[gateways.default.breaker]",
    "failures = 0",
    "[pricing.models.\"x\"]",
    "input = -1.0",
    "output = nan",
    "[gateways.default.cache]",
    "ttl = \"1s\"",
    "[dashboard]",
    "session_ttl = \"1s\"",
    "account_id = \"\"",
    "default_gateway = \"nope\"",
    "[storage]",
    "cache = \"redis://\"",
    "[limits]",
    "alert_webhook = \"x\"",
];

#[derive(Debug, Clone)]
pub(super) enum Mutation {
    Delete(usize),
    Duplicate(usize),
    Swap(usize, usize),
    Value(usize, &'static str),
    Insert(usize, &'static str),
    Truncate(f64),
    Byte(f64, u8),
}

pub(super) fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => any::<usize>().prop_map(Mutation::Delete),
        1 => any::<usize>().prop_map(Mutation::Duplicate),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        5 => (any::<usize>(), proptest::sample::select(TOML_VALUES)).prop_map(|(i, v)| Mutation::Value(i, v)),
        2 => (any::<usize>(), proptest::sample::select(TOML_LINES)).prop_map(|(i, l)| Mutation::Insert(i, l)),
        1 => (0.0f64..1.0).prop_map(Mutation::Truncate),
        1 => (0.0f64..1.0, any::<u8>()).prop_map(|(f, b)| Mutation::Byte(f, b)),
    ]
}

pub(super) fn mutate(seed: &str, muts: &[Mutation]) -> String {
    let mut lines: Vec<String> = seed.lines().map(str::to_owned).collect();
    for m in muts {
        let n = lines.len().max(1);
        match m {
            Mutation::Delete(i) if !lines.is_empty() => {
                lines.remove(i % n);
            }
            Mutation::Duplicate(i) if !lines.is_empty() => {
                let l = lines[i % n].clone();
                lines.insert(i % n, l);
            }
            Mutation::Swap(a, b) if !lines.is_empty() => lines.swap(a % n, b % n),
            Mutation::Value(i, v) if !lines.is_empty() => {
                // The i-th line with a value, from i on.
                if let Some(k) = (0..n).map(|k| (i + k) % n).find(|&k| lines[k].contains(" = ")) {
                    let key = lines[k].split(" = ").next().unwrap_or("").to_owned();
                    lines[k] = format!("{key} = {v}");
                }
            }
            Mutation::Insert(i, l) => lines.insert(i % (lines.len() + 1), (*l).to_owned()),
            Mutation::Truncate(f) => {
                let text = lines.join("\n");
                let mut cut = (text.len() as f64 * f) as usize;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                lines = text[..cut].lines().map(str::to_owned).collect();
            }
            Mutation::Byte(f, b) => {
                let mut text = lines.join("\n").into_bytes();
                let at = (text.len() as f64 * f) as usize;
                text.insert(at.min(text.len()), *b);
                lines = String::from_utf8_lossy(&text).lines().map(str::to_owned).collect();
            }
            _ => {}
        }
    }
    lines.join("\n")
}

pub(super) fn seed_config() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(vec![
        include_str!("../../../../examples/aigate.toml"),
        include_str!("../../../../examples/quickstart.toml"),
        EMBEDDED_DEFAULT,
        FUZZ_TOML,
    ])
}

/// Only a fixed set of environment variables exists, so secrets resolve the same way everywhere.
pub(super) fn env(name: &str) -> Option<String> {
    matches!(name, "PROD_GATEWAY_TOKEN" | "OPENAI_API_KEY" | "AIGATE_ADMIN_TOKEN").then(|| "secret".to_owned())
}

proptest! {
    #![proptest_config(config(2))]

    /// Arbitrary text as a configuration file.
    #[test]
    fn config_any_text(text in prop_oneof![
        "\\PC{0,200}",
        proptest::collection::vec(prop_oneof![proptest::sample::select(TOML_LINES), proptest::sample::select(TOML_VALUES)], 0..20)
            .prop_map(|v| v.join("\n")),
    ]) {
        timed("config_text", || check_config(&text))?;
    }

    /// The example configurations, mutated: lines dropped, doubled, swapped, values replaced.
    #[test]
    fn config_mutated(seed in seed_config(), muts in proptest::collection::vec(mutation(), 1..8)) {
        timed("config_mutated", || check_config(&mutate(seed, &muts)))?;
    }
}

fn check_config(text: &str) -> Result<(), TestCaseError> {
    match Settings::from_toml_with(text, &env) {
        Ok(s) => {
            prop_assert!(s.gateways.contains_key(&*s.default_gateway));
            // The router works on whatever was accepted.
            for path in ["/v1/chat/completions", "/v1/a/default/openai/models", "/default/anthropic/v1/messages"] {
                let uri = Uri::from_static(path);
                check_route(&s, &Method::POST, &uri, &HeaderMap::new())?;
            }
            for gw in s.gateways.values() {
                for r in gw.routes.values() {
                    let _ = r.chain(&Map::new(), &HeaderMap::new());
                }
            }
        }
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}
