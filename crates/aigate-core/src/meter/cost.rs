//! Cost in USD of a request's [`Usage`], from a model price table or a per-request custom cost.
//!
//! The price table ([`PriceTable::builtin`]) ships in the binary (`prices.toml`, USD per million
//! tokens, list prices up to November 2025; see the comment at its top). Configuration can
//! override or add prices ([`PriceTable::with_overrides`]) and a LiteLLM
//! `model_prices_and_context_window.json` can be read ([`PriceTable::load_litellm`]).
//!
//! Model lookup ([`PriceTable::lookup`]) is case-insensitive and takes the longest key that is a
//! prefix of the model name ending at a `-`, `:` or `@` boundary, so dated snapshots and aliases
//! find their model (`gpt-4o-mini-2024-07-18` → `gpt-4o-mini`, `claude-3-5-haiku-20241022` →
//! `claude-3-5-haiku`, `mistral-large-latest` → `mistral-large`); if nothing matches, a leading
//! `provider/` is dropped and the lookup repeated (`openai/gpt-4o`, `models/gemini-2.5-pro`).
//! [`PriceTable::lookup_for`] first tries the provider-qualified name (`groq/llama-…`, as LiteLLM
//! keys many models). A variant priced differently from its prefix must be in the table itself,
//! or it is billed at the prefix's price.
//!
//! # Billing rules
//!
//! With the normalised [`Usage`] (each token in exactly one category, see [`crate::meter::usage`]):
//! - uncached input (`input - cached - cache_write`) at the input price;
//! - cache reads at the cached-input price, or the input price if the model has none;
//! - cache writes at the cache-write price, or the input price if the model has none;
//! - output, reasoning included, at the output price.
//!
//! A `cf-aig-custom-cost` header ([`CustomCost`], per-token USD) replaces the table for its
//! request, and then prices even unknown models.
//!
//! A response served from aigate's cache costs nothing upstream; the cost it saved is simply the
//! cost of the original response's usage, computed the same way.
//!
//! # Failure behaviour
//!
//! [`PriceTable::cost`] gives `None`, never 0, when the model is unknown (or the usage names no
//! model) and no custom cost applies. Loading a table or parsing a header never panics; bad input
//! is an error naming the problem. Negative or non-finite prices are refused.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use crate::meter::usage::Usage;

/// The built-in price table, USD per million tokens.
const BUILTIN_TOML: &str = include_str!("prices.toml");

static BUILTIN: LazyLock<PriceTable> = LazyLock::new(|| match PriceTable::from_toml(BUILTIN_TOML) {
    Ok(t) => t,
    Err(e) => {
        // Unreachable in a tested build (a unit test parses the table).
        tracing::error!(error = %e, "the built-in price table is invalid; costs are unknown");
        PriceTable::default()
    }
});

/// The price of one model, in USD per **million** tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Uncached input tokens.
    pub input: f64,
    /// Output tokens, reasoning included.
    pub output: f64,
    /// Prompt-cache reads; `None` bills them at `input`.
    #[serde(default, alias = "cache_read", skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<f64>,
    /// Prompt-cache writes; `None` bills them at `input`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write: Option<f64>,
}

impl Price {
    /// The cost in USD of `usage` at this price (the model named in `usage` is not looked at).
    pub fn cost(&self, usage: &Usage) -> f64 {
        let usd = |tokens: u64, per_million: f64| tokens as f64 * per_million / 1_000_000.0;
        usd(usage.uncached_input_tokens(), self.input)
            + usd(usage.cached_input_tokens, self.cached_input.unwrap_or(self.input))
            + usd(usage.cache_write_tokens, self.cache_write.unwrap_or(self.input))
            + usd(usage.output_tokens, self.output)
    }

    /// The first field that is negative or not finite.
    fn invalid_field(&self) -> Option<&'static str> {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        if !ok(self.input) {
            Some("input")
        } else if !ok(self.output) {
            Some("output")
        } else if self.cached_input.is_some_and(|v| !ok(v)) {
            Some("cached_input")
        } else if self.cache_write.is_some_and(|v| !ok(v)) {
            Some("cache_write")
        } else {
            None
        }
    }
}

/// Why a price table could not be loaded or extended.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PriceError {
    /// The document is not the expected TOML or JSON.
    #[error("invalid price table: {0}")]
    Parse(String),
    /// A price is negative or not finite.
    #[error("invalid price for {model:?}: {field} must be a finite, non-negative number")]
    Invalid {
        /// The model.
        model: String,
        /// The field.
        field: &'static str,
    },
    /// The same model is listed under two providers.
    #[error("the model {0:?} is listed twice")]
    Duplicate(String),
}

/// Model prices, keyed by lower-cased model name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable {
    models: HashMap<String, Price>,
}

impl PriceTable {
    /// The table shipped in the binary.
    pub fn builtin() -> PriceTable {
        BUILTIN.clone()
    }

    /// Reads a table in the built-in format: one TOML table per provider, mapping model names to
    /// [`Price`]s (USD per million tokens).
    pub fn from_toml(text: &str) -> Result<PriceTable, PriceError> {
        let sections: BTreeMap<String, BTreeMap<String, Price>> =
            toml::from_str(text).map_err(|e| PriceError::Parse(e.to_string()))?;
        let mut table = PriceTable::default();
        for (model, price) in sections.into_values().flatten() {
            let model = model.to_ascii_lowercase();
            if let Some(field) = price.invalid_field() {
                return Err(PriceError::Invalid { model, field });
            }
            if table.models.insert(model.clone(), price).is_some() {
                return Err(PriceError::Duplicate(model));
            }
        }
        Ok(table)
    }

    /// This table with `overrides` added, replacing the prices of models already present (keys as
    /// in the table: model names, optionally `provider/model`). Another [`PriceTable`] can be
    /// passed, e.g. one from [`PriceTable::load_litellm`].
    pub fn with_overrides<I, K>(mut self, overrides: I) -> Result<PriceTable, PriceError>
    where
        I: IntoIterator<Item = (K, Price)>,
        K: AsRef<str>,
    {
        for (model, price) in overrides {
            let model = model.as_ref().trim().to_ascii_lowercase();
            if let Some(field) = price.invalid_field() {
                return Err(PriceError::Invalid { model, field });
            }
            self.models.insert(model, price);
        }
        Ok(self)
    }

    /// Reads LiteLLM's `model_prices_and_context_window.json` (USD **per token**, converted to per
    /// million): `input_cost_per_token`, `output_cost_per_token`, and the optional
    /// `cache_read_input_token_cost` and `cache_creation_input_token_cost`. Entries without both
    /// input and output costs, with a cost that is not a non-negative number, and the
    /// `sample_spec` entry are skipped. Keys are kept as LiteLLM writes them (`gpt-4o`,
    /// `groq/llama-3.3-70b-versatile`, …): see [`PriceTable::lookup_for`].
    pub fn load_litellm(json: &[u8]) -> Result<PriceTable, PriceError> {
        let entries: HashMap<String, serde_json::Value> =
            serde_json::from_slice(json).map_err(|e| PriceError::Parse(e.to_string()))?;
        let mut table = PriceTable::default();
        for (model, entry) in entries {
            if model == "sample_spec" {
                continue;
            }
            let per_million = |field: &str| {
                let v = entry.get(field)?.as_f64()?;
                (v.is_finite() && v >= 0.0).then_some(v * 1_000_000.0)
            };
            let (Some(input), Some(output)) =
                (per_million("input_cost_per_token"), per_million("output_cost_per_token"))
            else {
                continue;
            };
            let price = Price {
                input,
                output,
                cached_input: per_million("cache_read_input_token_cost"),
                cache_write: per_million("cache_creation_input_token_cost"),
            };
            table.models.insert(model.to_ascii_lowercase(), price);
        }
        Ok(table)
    }

    /// Number of models.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// No models at all.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The price of `model` (see the module docs for the matching rules).
    pub fn lookup(&self, model: &str) -> Option<&Price> {
        self.lookup_matched(&lowercase(model.trim())).map(|(_, p)| p)
    }

    /// The price of `model` served by `provider` (aigate's provider name), also trying the
    /// provider-qualified key `provider/model` (and LiteLLM's name for the provider: `gemini/` for
    /// `google-ai-studio`, `xai/` for `grok`, `azure/` for `azure-openai`, …). The more specific
    /// match wins, a qualified one on a tie: with keys `azure/gpt-4o` and `gpt-4o-mini`,
    /// `gpt-4o-mini-2024-07-18` on Azure is priced as `gpt-4o-mini`.
    pub fn lookup_for(&self, provider: &str, model: &str) -> Option<&Price> {
        let model = lowercase(model.trim());
        let provider = lowercase(provider.trim());
        let alias = match &*provider {
            "google-ai-studio" => Some("gemini"),
            "grok" => Some("xai"),
            "azure-openai" => Some("azure"),
            "perplexity-ai" => Some("perplexity"),
            "workers-ai" => Some("cloudflare"),
            _ => None,
        };
        let mut best = self.lookup_matched(&model);
        for p in std::iter::once(&*provider).chain(alias) {
            let Some((len, price)) = self.longest_prefix(&format!("{p}/{model}")) else { continue };
            // How much of the model name the qualified key matched.
            let Some(specific) = len.checked_sub(p.len() + 1).filter(|&n| n > 0) else { continue };
            if specific >= best.map_or(0, |(b, _)| b) {
                best = Some((specific, price));
            }
        }
        best.map(|(_, p)| p)
    }

    /// The cost in USD of `usage`: by `custom` if given, else by the price of `usage.model`.
    /// `None` if there is no custom cost and the model is unknown or not named.
    pub fn cost(&self, usage: &Usage, custom: Option<&CustomCost>) -> Option<f64> {
        if let Some(c) = custom {
            return Some(c.cost(usage));
        }
        Some(self.lookup(usage.model.as_deref()?)?.cost(usage))
    }

    /// Like [`PriceTable::cost`], looking the model up with [`PriceTable::lookup_for`].
    pub fn cost_for(&self, provider: &str, usage: &Usage, custom: Option<&CustomCost>) -> Option<f64> {
        if let Some(c) = custom {
            return Some(c.cost(usage));
        }
        Some(self.lookup_for(provider, usage.model.as_deref()?)?.cost(usage))
    }

    /// [`PriceTable::longest_prefix`], dropping leading `provider/` segments until something
    /// matches. `name` is lower-case.
    fn lookup_matched(&self, name: &str) -> Option<(usize, &Price)> {
        let mut name = name;
        loop {
            if let Some(found) = self.longest_prefix(name) {
                return Some(found);
            }
            match name.split_once('/') {
                Some((_, rest)) if !rest.is_empty() => name = rest,
                _ => return None,
            }
        }
    }

    /// The exact key `name`, or the longest key that is a prefix of it ending at a boundary, with
    /// the length of the key.
    fn longest_prefix(&self, name: &str) -> Option<(usize, &Price)> {
        if let Some(p) = self.models.get(name) {
            return Some((name.len(), p));
        }
        let bytes = name.as_bytes();
        (1..bytes.len())
            .rev()
            .filter(|&i| matches!(bytes[i], b'-' | b':' | b'@'))
            // Slicing at an ASCII byte is always on a char boundary.
            .find_map(|i| self.models.get(&name[..i]).map(|p| (i, p)))
    }
}

impl IntoIterator for PriceTable {
    type Item = (String, Price);
    type IntoIter = std::collections::hash_map::IntoIter<String, Price>;

    fn into_iter(self) -> Self::IntoIter {
        self.models.into_iter()
    }
}

fn lowercase(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// A per-request price from the `cf-aig-custom-cost` header, in USD **per token**:
/// `{"per_token_in":0.000001,"per_token_out":0.000002}`, optionally with `per_cache_read_token`
/// and `per_cache_write_token`. Cache pricing applies when either cache field is given; an
/// omitted cache rate (and so both, when neither is given) is `per_token_in`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomCost {
    /// USD per uncached input token.
    pub per_token_in: f64,
    /// USD per output token (reasoning included).
    pub per_token_out: f64,
    /// USD per cache-read input token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_cache_read_token: Option<f64>,
    /// USD per cache-write input token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_cache_write_token: Option<f64>,
}

/// Why a `cf-aig-custom-cost` header was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CustomCostError {
    /// Not JSON, not an object, a missing or unknown field, or a field that is not a number.
    #[error(
        "invalid cf-aig-custom-cost header ({0}); expected JSON like \
         {{\"per_token_in\":0.000001,\"per_token_out\":0.000002}}"
    )]
    Json(String),
    /// A negative or non-finite rate.
    #[error("invalid cf-aig-custom-cost header: {0} must be a finite, non-negative number")]
    Invalid(&'static str),
}

impl CustomCost {
    /// Parses the header value.
    pub fn parse(header: &[u8]) -> Result<CustomCost, CustomCostError> {
        let c: CustomCost = serde_json::from_slice(header).map_err(|e| CustomCostError::Json(e.to_string()))?;
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        let fields = [
            ("per_token_in", Some(c.per_token_in)),
            ("per_token_out", Some(c.per_token_out)),
            ("per_cache_read_token", c.per_cache_read_token),
            ("per_cache_write_token", c.per_cache_write_token),
        ];
        match fields.into_iter().find(|(_, v)| v.is_some_and(|v| !ok(v))) {
            Some((name, _)) => Err(CustomCostError::Invalid(name)),
            None => Ok(c),
        }
    }

    /// The cost in USD of `usage` at these rates.
    pub fn cost(&self, usage: &Usage) -> f64 {
        let usd = |tokens: u64, per_token: f64| tokens as f64 * per_token;
        usd(usage.uncached_input_tokens(), self.per_token_in)
            + usd(usage.cached_input_tokens, self.per_cache_read_token.unwrap_or(self.per_token_in))
            + usd(usage.cache_write_tokens, self.per_cache_write_token.unwrap_or(self.per_token_in))
            + usd(usage.output_tokens, self.per_token_out)
    }
}

impl FromStr for CustomCost {
    type Err = CustomCostError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CustomCost::parse(s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Endpoint;
    use crate::meter::usage::{parse_json, SseUsage};

    /// Relative comparison for USD amounts.
    #[track_caller]
    fn assert_usd(got: Option<f64>, want: f64) {
        let got = got.expect("a price");
        assert!((got - want).abs() <= want.abs() * 1e-9 + 1e-15, "got {got}, want {want}");
    }

    fn usage(model: &str, input: u64, cached: u64, write: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: cached,
            cache_write_tokens: write,
            reasoning_tokens: 0,
            model: Some(model.to_string()),
        }
    }

    const M: f64 = 1_000_000.0;

    #[test]
    fn builtin_table_parses_and_covers_current_models() {
        let t = PriceTable::builtin();
        assert!(t.len() > 80, "{}", t.len());
        for model in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-4.1-mini",
            "gpt-4.1-nano",
            "o1",
            "o3",
            "o3-mini",
            "o4-mini",
            "gpt-5",
            "gpt-5-mini",
            "gpt-5-nano",
            "text-embedding-3-small",
            "text-embedding-3-large",
            "claude-3-5-haiku",
            "claude-3-5-sonnet",
            "claude-3-7-sonnet",
            "claude-sonnet-4",
            "claude-opus-4",
            "claude-opus-4-1",
            "claude-haiku-4-5",
            "claude-sonnet-4-5",
            "gemini-2.0-flash",
            "gemini-2.5-flash",
            "gemini-2.5-pro",
            "llama-3.3-70b-versatile",
            "llama-3.1-8b-instant",
            "mistral-large-latest",
            "mistral-small-latest",
            "deepseek-chat",
            "deepseek-reasoner",
            "grok-3",
            "grok-3-mini",
            "grok-4",
        ] {
            assert!(t.lookup(model).is_some(), "{model}");
        }
        // Anthropic: cache write 1.25x input, cache read 0.1x input. (Claude 3 Haiku is published
        // rounded, $0.30 and $0.03 for $0.25 input, and is left out.)
        let claude: Vec<(String, Price)> =
            t.clone().into_iter().filter(|(m, _)| m.starts_with("claude") && m != "claude-3-haiku").collect();
        assert!(claude.len() >= 10);
        for (model, p) in claude {
            assert!((p.cache_write.unwrap() - 1.25 * p.input).abs() < 1e-9, "{model}");
            assert!((p.cached_input.unwrap() - 0.1 * p.input).abs() < 1e-9, "{model}");
        }
        // A cache read never costs more than uncached input.
        assert!(t.into_iter().all(|(_, p)| p.cached_input.unwrap_or(0.0) <= p.input));
    }

    #[test]
    fn lookup_handles_snapshots_aliases_and_prefixes() {
        let t = PriceTable::builtin();
        let input = |m: &str| t.lookup(m).map(|p| p.input);
        assert_eq!(input("gpt-4o-mini-2024-07-18"), Some(0.15));
        assert_eq!(input("gpt-4o-2024-08-06"), Some(2.50));
        assert_eq!(input("gpt-4o-2024-05-13"), Some(5.00)); // listed itself: priced differently
        assert_eq!(input("gpt-4.1-2025-04-14"), Some(2.00)); // not `gpt-4`
        assert_eq!(input("gpt-4.1-mini-2025-04-14"), Some(0.40));
        assert_eq!(input("o3-mini-2025-01-31"), Some(1.10)); // not `o3`
        assert_eq!(input("o3-pro-2025-06-10"), Some(20.00));
        assert_eq!(input("gpt-5-2025-08-07"), Some(1.25));
        assert_eq!(input("gpt-5-chat-latest"), Some(1.25));
        assert_eq!(input("claude-3-5-haiku-20241022"), Some(0.80));
        assert_eq!(input("claude-3-5-sonnet-latest"), Some(3.00));
        assert_eq!(input("claude-sonnet-4-5-20250929"), Some(3.00));
        assert_eq!(input("claude-opus-4-1-20250805"), Some(15.00));
        assert_eq!(input("claude-opus-4-5-20251101"), Some(5.00)); // not `claude-opus-4`
        assert_eq!(input("claude-haiku-4-5-20251001"), Some(1.00));
        assert_eq!(input("gemini-2.0-flash-001"), Some(0.10));
        assert_eq!(input("gemini-2.0-flash-lite-001"), Some(0.075));
        assert_eq!(input("gemini-2.5-flash-preview-09-2025"), Some(0.30));
        assert_eq!(input("mistral-large-latest"), Some(2.00));
        assert_eq!(input("mistral-small-2506"), Some(0.10));
        assert_eq!(input("grok-4-0709"), Some(3.00));
        assert_eq!(input("grok-4-fast-reasoning"), Some(0.20));
        assert_eq!(input("grok-3-mini-beta"), Some(0.30));
        // Case, provider prefixes.
        assert_eq!(input("GPT-4o-Mini"), Some(0.15));
        assert_eq!(input("openai/gpt-4o"), Some(2.50));
        assert_eq!(input("models/gemini-2.5-pro"), Some(1.25));
        assert_eq!(input("openai/gpt-oss-120b"), Some(0.15)); // a Groq model whose name has a slash
                                                              // Not a boundary, or nothing known.
        assert_eq!(input("gpt-4omega"), None);
        assert_eq!(input("ft:gpt-4o-mini-2024-07-18:acme::abc123"), None);
        assert_eq!(input("my-local-llama"), None);
        assert_eq!(input(""), None);
        assert_eq!(input("/"), None);
    }

    #[test]
    fn unknown_model_costs_none_not_zero() {
        let t = PriceTable::builtin();
        assert_eq!(t.cost(&usage("my-local-llama", 100, 0, 0, 100), None), None);
        let mut nameless = usage("x", 100, 0, 0, 100);
        nameless.model = None;
        assert_eq!(t.cost(&nameless, None), None);
        assert_eq!(PriceTable::default().cost(&usage("gpt-4o", 1, 0, 0, 1), None), None);
        // A known model with zero tokens does cost exactly 0.
        assert_eq!(t.cost(&usage("gpt-4o", 0, 0, 0, 0), None), Some(0.0));
    }

    #[test]
    fn hand_computed_costs_from_fixtures() {
        let t = PriceTable::builtin();
        let plain = |e: Endpoint, body: &[u8]| parse_json(e, body).unwrap();
        let streamed = |e: Endpoint, body: &[u8]| {
            let mut s = SseUsage::new(e);
            s.feed(body);
            s.finish().unwrap()
        };

        // gpt-4o-mini: 1000 prompt incl. 400 cached, 200 completion.
        let u = plain(Endpoint::ChatCompletions, fixture!("openai_chat.json"));
        assert_usd(t.cost(&u, None), 600.0 * 0.15 / M + 400.0 * 0.075 / M + 200.0 * 0.60 / M);
        assert_usd(t.cost(&u, None), 0.000_24);

        // gpt-4o-mini stream: 2048 prompt incl. 1536 cached, 85 completion.
        let u = streamed(Endpoint::ChatCompletions, fixture!("openai_chat_stream.sse"));
        assert_usd(t.cost(&u, None), 512.0 * 0.15 / M + 1536.0 * 0.075 / M + 85.0 * 0.60 / M);

        // o4-mini chat: 1117 prompt incl. 1024 cached; 846 completion incl. 768 reasoning.
        let u = plain(Endpoint::ChatCompletions, fixture!("openai_chat_reasoning.json"));
        assert_usd(t.cost(&u, None), 93.0 * 1.10 / M + 1024.0 * 0.275 / M + 846.0 * 4.40 / M);

        // o4-mini Responses stream: 1337 input incl. 1024 cached; 300 output incl. 256 reasoning.
        let u = streamed(Endpoint::Responses, fixture!("openai_responses_stream.sse"));
        assert_usd(t.cost(&u, None), 313.0 * 1.10 / M + 1024.0 * 0.275 / M + 300.0 * 4.40 / M);
        assert_usd(t.cost(&u, None), 0.001_945_9);

        // claude-sonnet-4-5 stream: 21 uncached + 1800 cache writes + 12000 cache reads, 15 output.
        let u = streamed(Endpoint::AnthropicMessages, fixture!("anthropic_messages_stream.sse"));
        assert_usd(t.cost(&u, None), 21.0 * 3.0 / M + 1800.0 * 3.75 / M + 12_000.0 * 0.30 / M + 15.0 * 15.0 / M);
        assert_usd(t.cost(&u, None), 0.010_638);
        let u = plain(Endpoint::AnthropicMessages, fixture!("anthropic_messages.json"));
        assert_usd(t.cost(&u, None), 0.010_638);

        // deepseek-reasoner: 1024 cache hits + 176 misses, 600 output.
        let u = plain(Endpoint::ChatCompletions, fixture!("deepseek_chat.json"));
        assert_usd(t.cost(&u, None), 176.0 * 0.28 / M + 1024.0 * 0.028 / M + 600.0 * 0.42 / M);

        // grok-3-mini: 32 prompt incl. 6 cached; 9 completion + 94 reasoning.
        let u = plain(Endpoint::ChatCompletions, fixture!("xai_chat.json"));
        assert_usd(t.cost(&u, None), 26.0 * 0.30 / M + 6.0 * 0.075 / M + 103.0 * 0.50 / M);

        // gemini-2.5-flash: 4200 prompt incl. 4000 cached; 350 candidates + 1000 thoughts.
        let u = plain(Endpoint::GeminiGenerateContent, fixture!("google_generate.json"));
        assert_usd(t.cost(&u, None), 200.0 * 0.30 / M + 4000.0 * 0.03 / M + 1350.0 * 2.50 / M);

        // Groq llama-3.3-70b-versatile: 40 in, 10 out.
        let u = streamed(Endpoint::ChatCompletions, fixture!("groq_chat_stream.sse"));
        assert_usd(t.cost(&u, None), 40.0 * 0.59 / M + 10.0 * 0.79 / M);

        // mistral-small-latest: 16 in, 34 out.
        let u = plain(Endpoint::ChatCompletions, fixture!("mistral_chat.json"));
        assert_usd(t.cost(&u, None), 16.0 * 0.10 / M + 34.0 * 0.30 / M);

        // text-embedding-3-small: 8 tokens.
        let u = plain(Endpoint::Embeddings, fixture!("openai_embeddings.json"));
        assert_usd(t.cost(&u, None), 8.0 * 0.02 / M);
    }

    #[test]
    fn missing_cache_prices_fall_back_to_input() {
        let t = PriceTable::builtin();
        // gpt-4 has no cached price: cached tokens at input. gpt-4o has no cache-write price.
        assert_usd(t.cost(&usage("gpt-4-0613", 1000, 400, 0, 10), None), 1000.0 * 30.0 / M + 10.0 * 60.0 / M);
        assert_usd(
            t.cost(&usage("gpt-4o", 1000, 400, 100, 10), None),
            500.0 * 2.5 / M + 400.0 * 1.25 / M + 100.0 * 2.5 / M + 10.0 * 10.0 / M,
        );
    }

    #[test]
    fn custom_cost_header() {
        let t = PriceTable::builtin();
        let u = usage("gpt-4o-mini", 1000, 400, 0, 200);
        let c = CustomCost::parse(br#"{"per_token_in":0.000001,"per_token_out":0.000002}"#).unwrap();
        // No cache fields: every input token at per_token_in.
        assert_usd(t.cost(&u, Some(&c)), 1000.0 * 0.000_001 + 200.0 * 0.000_002);
        // It replaces the table, and prices unknown models too.
        assert_usd(t.cost(&usage("my-local-llama", 1000, 0, 0, 200), Some(&c)), 0.0014);
        assert_usd(t.cost_for("openai", &usage("my-local-llama", 1000, 0, 0, 200), Some(&c)), 0.0014);

        let c: CustomCost =
            r#" {"per_token_in":1e-6, "per_token_out":2e-6, "per_cache_read_token":1e-7} "#.parse().unwrap();
        assert_usd(t.cost(&u, Some(&c)), 600.0 * 1e-6 + 400.0 * 1e-7 + 200.0 * 2e-6);
        // Only a write rate: reads default to per_token_in.
        let c = CustomCost::parse(br#"{"per_token_in":3e-6,"per_token_out":15e-6,"per_cache_write_token":3.75e-6}"#)
            .unwrap();
        let a = usage("claude-sonnet-4-5", 13_821, 12_000, 1_800, 15);
        assert_usd(t.cost(&a, Some(&c)), 21.0 * 3e-6 + 12_000.0 * 3e-6 + 1_800.0 * 3.75e-6 + 15.0 * 15e-6);

        for bad in [
            &b""[..],
            b"{",
            b"per_token_in=1",
            b"[]",
            b"{}",
            br#"{"per_token_in":0.000001}"#,
            br#"{"per_token_in":"0.000001","per_token_out":0.000002}"#,
            br#"{"per_token_in":0.000001,"per_token_out":0.000002,"per_token_input":1}"#,
        ] {
            let err = CustomCost::parse(bad).unwrap_err();
            assert!(matches!(err, CustomCostError::Json(_)), "{err}");
            assert!(err.to_string().contains("cf-aig-custom-cost"), "{err}");
        }
        let err = CustomCost::parse(br#"{"per_token_in":-1,"per_token_out":0}"#).unwrap_err();
        assert_eq!(err, CustomCostError::Invalid("per_token_in"));
        let err =
            CustomCost::parse(br#"{"per_token_in":0,"per_token_out":0,"per_cache_read_token":-1e-9}"#).unwrap_err();
        assert_eq!(err, CustomCostError::Invalid("per_cache_read_token"));
        assert!(CustomCost::parse(br#"{"per_token_in":1e400,"per_token_out":0}"#).is_err());
    }

    #[test]
    fn overrides_replace_and_add() {
        let price = |input: f64, output: f64| Price { input, output, cached_input: None, cache_write: None };
        let t = PriceTable::builtin()
            .with_overrides([
                ("GPT-4o", price(1.0, 2.0)),
                ("acme-llm", price(0.5, 0.5)),
                ("groq/llama-3.1-8b-instant", price(9.0, 9.0)),
            ])
            .unwrap();
        assert_eq!(t.lookup("gpt-4o-2024-08-06").map(|p| p.input), Some(1.0));
        assert_eq!(t.lookup("acme-llm-v2").map(|p| p.output), Some(0.5));
        assert_usd(t.cost(&usage("acme-llm", 2_000_000, 0, 0, 0), None), 1.0);
        // Provider-qualified keys win through lookup_for only.
        assert_eq!(t.lookup("llama-3.1-8b-instant").map(|p| p.input), Some(0.05));
        assert_eq!(t.lookup_for("groq", "llama-3.1-8b-instant").map(|p| p.input), Some(9.0));
        assert_eq!(t.lookup_for("cerebras", "llama-3.1-8b-instant").map(|p| p.input), Some(0.05));

        let err = PriceTable::builtin().with_overrides([("x", price(-1.0, 0.0))]).unwrap_err();
        assert_eq!(err, PriceError::Invalid { model: "x".into(), field: "input" });
        let nan = Price { cache_write: Some(f64::NAN), ..price(1.0, 1.0) };
        assert!(PriceTable::default().with_overrides([("y", nan)]).is_err());
        // The same form a config file would use.
        let from_config: BTreeMap<String, Price> =
            toml::from_str("\"acme\" = { input = 1.0, output = 2.0, cache_read = 0.1 }").unwrap();
        let t = PriceTable::default().with_overrides(from_config).unwrap();
        assert_eq!(t.lookup("acme").and_then(|p| p.cached_input), Some(0.1));
        assert!(toml::from_str::<BTreeMap<String, Price>>("\"a\" = { input = 1.0, outptu = 2.0 }").is_err());
    }

    #[test]
    fn from_toml_refuses_duplicates_and_bad_prices() {
        let dup = "[a]\n\"m\" = { input = 1.0, output = 1.0 }\n[b]\n\"M\" = { input = 2.0, output = 2.0 }\n";
        assert_eq!(PriceTable::from_toml(dup), Err(PriceError::Duplicate("m".into())));
        let neg = "[a]\n\"m\" = { input = 1.0, output = -1.0 }\n";
        assert!(matches!(PriceTable::from_toml(neg), Err(PriceError::Invalid { field: "output", .. })));
        assert!(matches!(PriceTable::from_toml("[a]\n\"m\" = 3\n"), Err(PriceError::Parse(_))));
    }

    #[test]
    fn litellm_loader() {
        let json = br#"{
          "sample_spec": {"max_tokens": "LEGACY parameter", "input_cost_per_token": 0.0000, "output_cost_per_token": 0.0, "litellm_provider": "one of https://docs.litellm.ai/docs/providers", "mode": "one of: chat, embedding, completion, image_generation"},
          "gpt-4o-mini": {"max_tokens": 16384, "input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07, "cache_read_input_token_cost": 7.5e-08, "litellm_provider": "openai", "mode": "chat", "supports_vision": true},
          "claude-3-5-haiku-20241022": {"input_cost_per_token": 8e-07, "output_cost_per_token": 4e-06, "cache_creation_input_token_cost": 1e-06, "cache_read_input_token_cost": 8e-08, "litellm_provider": "anthropic", "mode": "chat"},
          "groq/llama-3.3-70b-versatile": {"input_cost_per_token": 5.9e-07, "output_cost_per_token": 7.9e-07, "litellm_provider": "groq", "mode": "chat"},
          "gemini/gemini-2.5-flash": {"input_cost_per_token": 3e-07, "output_cost_per_token": 2.5e-06, "cache_read_input_token_cost": 3e-08, "litellm_provider": "gemini"},
          "text-embedding-3-small": {"input_cost_per_token": 2e-08, "output_cost_per_token": 0.0, "litellm_provider": "openai", "mode": "embedding"},
          "dall-e-3": {"input_cost_per_pixel": 4.0054321e-08, "output_cost_per_pixel": 0.0, "litellm_provider": "openai", "mode": "image_generation"},
          "half-priced": {"input_cost_per_token": 1e-06, "litellm_provider": "x"},
          "weird": {"input_cost_per_token": "free", "output_cost_per_token": -1},
          "not-an-object": 3
        }"#;
        let t = PriceTable::load_litellm(json).unwrap();
        assert_eq!(t.len(), 5);
        assert!(
            t.lookup("sample_spec").is_none() && t.lookup("dall-e-3").is_none() && t.lookup("half-priced").is_none()
        );
        let p = t.lookup("gpt-4o-mini-2024-07-18").unwrap();
        assert!((p.input - 0.15).abs() < 1e-9 && (p.output - 0.60).abs() < 1e-9);
        assert!((p.cached_input.unwrap() - 0.075).abs() < 1e-9 && p.cache_write.is_none());
        let u = usage("claude-3-5-haiku-20241022", 1000, 500, 300, 100);
        assert_usd(t.cost(&u, None), 200.0 * 0.8 / M + 500.0 * 0.08 / M + 300.0 * 1.0 / M + 100.0 * 4.0 / M);
        // Provider-prefixed keys are found with the provider (LiteLLM's names for aigate's).
        assert!(t.lookup("llama-3.3-70b-versatile").is_none());
        assert_usd(
            t.cost_for("groq", &usage("llama-3.3-70b-versatile", 40, 0, 0, 10), None),
            40.0 * 0.59 / M + 10.0 * 0.79 / M,
        );
        assert!(t.lookup_for("google-ai-studio", "gemini-2.5-flash").is_some());
        // A qualified key that is only a shorter prefix loses to a more specific plain key.
        let azure = PriceTable::builtin()
            .with_overrides([(
                "azure/gpt-4o",
                Price { input: 2.75, output: 11.0, cached_input: None, cache_write: None },
            )])
            .unwrap();
        assert_eq!(azure.lookup_for("azure-openai", "gpt-4o-mini-2024-07-18").map(|p| p.input), Some(0.15));
        assert_eq!(azure.lookup_for("azure-openai", "gpt-4o-2024-11-20").map(|p| p.input), Some(2.75));
        assert_eq!(azure.lookup_for("openai", "gpt-4o-2024-11-20").map(|p| p.input), Some(2.50));
        assert_eq!(azure.lookup_for("azure-openai", "unknown-model"), None);
        // Layered over the built-in table.
        let merged = PriceTable::builtin().with_overrides(t).unwrap();
        assert!(merged.lookup("grok-4").is_some() && merged.lookup_for("groq", "llama-3.3-70b-versatile").is_some());

        assert!(matches!(PriceTable::load_litellm(b"{not json"), Err(PriceError::Parse(_))));
        assert!(matches!(PriceTable::load_litellm(b"[]"), Err(PriceError::Parse(_))));
    }
}
