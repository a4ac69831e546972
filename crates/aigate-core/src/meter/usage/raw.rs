//! Typed, lenient views of provider JSON: only the fields usage needs; the rest is skipped.

use super::*;

/// The top level of a response body or stream event, for every provider at once.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Envelope {
    model: Text,
    #[serde(rename = "modelVersion")]
    model_version: Text,
    usage: Obj<RawUsage>,
    #[serde(rename = "usageMetadata")]
    usage_metadata: Obj<RawUsage>,
    /// Groq streams.
    x_groq: Obj<Inner>,
    /// Anthropic `message_start`.
    message: Obj<Inner>,
    /// Responses API stream events.
    response: Obj<Inner>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Inner {
    model: Text,
    usage: Obj<RawUsage>,
}

impl Envelope {
    pub(super) fn pick(self, shape: Shape) -> (Option<String>, Option<RawUsage>) {
        let (message, response, x_groq) = (self.message.0.unwrap_or_default(), self.response.0, self.x_groq.0);
        let (response_model, response_usage) = response.map(|r| (r.model.0, r.usage.0)).unwrap_or_default();
        let model = self.model.0.or(self.model_version.0).or(message.model.0).or(response_model);
        let usage = match shape {
            Shape::Google => self.usage_metadata.0,
            _ => self.usage.0.or(x_groq.and_then(|x| x.usage.0)).or(message.usage.0).or(response_usage),
        };
        (model, usage)
    }
}

/// Every usage field of every provider; which ones mean what depends on the [`Shape`].
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(super) struct RawUsage {
    prompt_tokens: Count,
    completion_tokens: Count,
    total_tokens: Count,
    prompt_tokens_details: Obj<Details>,
    completion_tokens_details: Obj<Details>,
    prompt_cache_hit_tokens: Count,
    prompt_cache_miss_tokens: Count,
    input_tokens: Count,
    output_tokens: Count,
    input_tokens_details: Obj<Details>,
    output_tokens_details: Obj<Details>,
    cache_creation_input_tokens: Count,
    cache_read_input_tokens: Count,
    #[serde(rename = "promptTokenCount")]
    prompt_token_count: Count,
    #[serde(rename = "candidatesTokenCount")]
    candidates_token_count: Count,
    #[serde(rename = "cachedContentTokenCount")]
    cached_content_token_count: Count,
    #[serde(rename = "thoughtsTokenCount")]
    thoughts_token_count: Count,
    #[serde(rename = "toolUsePromptTokenCount")]
    tool_use_prompt_token_count: Count,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(super) struct Details {
    cached_tokens: Count,
    reasoning_tokens: Count,
}

macro_rules! usage_fields {
    ($m:ident) => {
        $m!(
            prompt_tokens,
            completion_tokens,
            total_tokens,
            prompt_tokens_details,
            completion_tokens_details,
            prompt_cache_hit_tokens,
            prompt_cache_miss_tokens,
            input_tokens,
            output_tokens,
            input_tokens_details,
            output_tokens_details,
            cache_creation_input_tokens,
            cache_read_input_tokens,
            prompt_token_count,
            candidates_token_count,
            cached_content_token_count,
            thoughts_token_count,
            tool_use_prompt_token_count
        )
    };
}

impl RawUsage {
    /// Later values replace earlier ones field by field (every provider streams cumulative counts).
    pub(super) fn merge(&mut self, new: RawUsage) {
        macro_rules! take {
            ($($f:ident),*) => { $( if new.$f.0.is_some() { self.$f = new.$f; } )* };
        }
        usage_fields!(take);
    }

    /// The usage object `buf` read by a walk over its members, for the common case of plain
    /// integer (or null) counts and plain keys, much cheaper than the typed parse, which would be
    /// most of the cost of metering a chat completion. `None` as soon as anything
    /// else appears (a float, a string count, an escaped or repeated key of interest): the typed
    /// parse then decides, so both always agree.
    pub(super) fn scan(buf: &[u8]) -> Option<RawUsage> {
        let mut raw = RawUsage::default();
        let mut seen = 0u32;
        let mut once = |bit: u32| {
            let fresh = seen & (1 << bit) == 0;
            seen |= 1 << bit;
            fresh
        };
        let close = walk_members(buf, |k, v| {
            let key = &buf[k.start + 1..k.end - 1];
            let value = &buf[v];
            let (bit, slot) = match key {
                b"prompt_tokens" => (0, &mut raw.prompt_tokens),
                b"completion_tokens" => (1, &mut raw.completion_tokens),
                b"total_tokens" => (2, &mut raw.total_tokens),
                b"prompt_cache_hit_tokens" => (3, &mut raw.prompt_cache_hit_tokens),
                b"prompt_cache_miss_tokens" => (4, &mut raw.prompt_cache_miss_tokens),
                b"input_tokens" => (5, &mut raw.input_tokens),
                b"output_tokens" => (6, &mut raw.output_tokens),
                b"cache_creation_input_tokens" => (7, &mut raw.cache_creation_input_tokens),
                b"cache_read_input_tokens" => (8, &mut raw.cache_read_input_tokens),
                b"promptTokenCount" => (9, &mut raw.prompt_token_count),
                b"candidatesTokenCount" => (10, &mut raw.candidates_token_count),
                b"cachedContentTokenCount" => (11, &mut raw.cached_content_token_count),
                b"thoughtsTokenCount" => (12, &mut raw.thoughts_token_count),
                b"toolUsePromptTokenCount" => (13, &mut raw.tool_use_prompt_token_count),
                b"prompt_tokens_details" => return once(14) && scan_details(value, &mut raw.prompt_tokens_details),
                b"completion_tokens_details" => {
                    return once(15) && scan_details(value, &mut raw.completion_tokens_details)
                }
                b"input_tokens_details" => return once(16) && scan_details(value, &mut raw.input_tokens_details),
                b"output_tokens_details" => return once(17) && scan_details(value, &mut raw.output_tokens_details),
                k => return !k.contains(&b'\\'),
            };
            once(bit) && scan_count(value, slot)
        })?;
        (close + 1 == buf.len()).then_some(raw)
    }

    pub(super) fn has_counts(&self) -> bool {
        macro_rules! any {
            ($($f:ident),*) => { false $( || self.$f.0.is_some() )* };
        }
        usage_fields!(any)
    }

    pub(super) fn normalise(&self, shape: Shape, model: Option<String>) -> Option<Usage> {
        let n = |c: &Count| c.0.unwrap_or(0);
        let detail = |d: &Obj<Details>, f: fn(&Details) -> &Count| d.0.as_ref().and_then(|d| f(d).0);
        match shape {
            Shape::OpenAi => {
                let (hit, miss) = (self.prompt_cache_hit_tokens.0, self.prompt_cache_miss_tokens.0);
                let input = self.prompt_tokens.0.or(self.input_tokens.0).or_else(|| {
                    (hit.is_some() || miss.is_some()).then(|| hit.unwrap_or(0).saturating_add(miss.unwrap_or(0)))
                });
                let output = self.completion_tokens.0.or(self.output_tokens.0);
                if input.is_none() && output.is_none() {
                    return None;
                }
                let (input, mut output) = (input.unwrap_or(0), output.unwrap_or(0));
                let cached = [
                    detail(&self.prompt_tokens_details, |d| &d.cached_tokens),
                    detail(&self.input_tokens_details, |d| &d.cached_tokens),
                    hit,
                ]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(0);
                let reasoning = detail(&self.completion_tokens_details, |d| &d.reasoning_tokens)
                    .or_else(|| detail(&self.output_tokens_details, |d| &d.reasoning_tokens))
                    .unwrap_or(0);
                // xAI: completion_tokens excludes reasoning; total = prompt + completion + reasoning.
                if reasoning > 0 && self.total_tokens.0 == Some(input.saturating_add(output).saturating_add(reasoning))
                {
                    output = output.saturating_add(reasoning);
                }
                Some(Usage::clamped(input, cached, 0, output, reasoning, model))
            }
            Shape::Anthropic => {
                let fields = [
                    &self.input_tokens,
                    &self.output_tokens,
                    &self.cache_read_input_tokens,
                    &self.cache_creation_input_tokens,
                ];
                if fields.iter().all(|c| c.0.is_none()) {
                    return None;
                }
                let (read, write) = (n(&self.cache_read_input_tokens), n(&self.cache_creation_input_tokens));
                let input = n(&self.input_tokens).saturating_add(read).saturating_add(write);
                Some(Usage::clamped(input, read, write, n(&self.output_tokens), 0, model))
            }
            Shape::Google => {
                if self.prompt_token_count.0.is_none() && self.candidates_token_count.0.is_none() {
                    return None;
                }
                let input = n(&self.prompt_token_count).saturating_add(n(&self.tool_use_prompt_token_count));
                let thoughts = n(&self.thoughts_token_count);
                let output = n(&self.candidates_token_count).saturating_add(thoughts);
                Some(Usage::clamped(input, n(&self.cached_content_token_count), 0, output, thoughts, model))
            }
        }
    }
}

/// Any JSON value, reduced to what the lenient fields below need.
#[derive(Debug, Default)]
pub(super) enum Loose {
    #[default]
    Other,
    Num(Option<u64>),
    Str(String),
    SeqLen(usize),
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Loose;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Loose, E> {
                Ok(Loose::Other)
            }
            fn visit_u64<E>(self, v: u64) -> Result<Loose, E> {
                Ok(Loose::Num(Some(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Loose, E> {
                Ok(Loose::Num(u64::try_from(v).ok()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Loose, E> {
                // `as` saturates; fractions are truncated.
                Ok(Loose::Num((v.is_finite() && v >= 0.0).then_some(v as u64)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Loose, E> {
                Ok(Loose::Str(v.to_owned()))
            }
            fn visit_unit<E>(self) -> Result<Loose, E> {
                Ok(Loose::Other)
            }
            fn visit_none<E>(self) -> Result<Loose, E> {
                Ok(Loose::Other)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Loose, D2::Error> {
                Loose::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Loose, A::Error> {
                let mut n = 0;
                while a.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Loose::SeqLen(n))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Loose, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Loose::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads a plain count (digits, or `null`) into `slot` for [`RawUsage::scan`]; false otherwise.
pub(super) fn scan_count(value: &[u8], slot: &mut Count) -> bool {
    if value == b"null" {
        *slot = Count(None);
        return true;
    }
    // Digits only, no leading zero (not JSON): at most 19 of them always fit in a u64.
    if value.is_empty()
        || value.len() > 19
        || !value.iter().all(u8::is_ascii_digit)
        || value.len() > 1 && value[0] == b'0'
    {
        return false;
    }
    *slot = Count(std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()));
    slot.0.is_some()
}

/// Reads a details object (or `null`) for [`RawUsage::scan`]; false on anything unusual.
pub(super) fn scan_details(value: &[u8], slot: &mut Obj<Details>) -> bool {
    if value == b"null" {
        *slot = Obj(None);
        return true;
    }
    let mut d = Details::default();
    let mut seen = [false; 2];
    let walked = walk_members(value, |k, v| {
        let (i, count) = match &value[k.start + 1..k.end - 1] {
            b"cached_tokens" => (0, &mut d.cached_tokens),
            b"reasoning_tokens" => (1, &mut d.reasoning_tokens),
            k => return !k.contains(&b'\\'),
        };
        !std::mem::replace(&mut seen[i], true) && scan_count(&value[v], count)
    });
    if walked.is_none_or(|close| close + 1 != value.len()) {
        return false;
    }
    *slot = Obj(Some(d));
    true
}

/// A token count: a non-negative number (or a numeric string); anything else is absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Count(pub(super) Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Count(match Loose::deserialize(d)? {
            Loose::Num(n) => n,
            Loose::Str(s) => s.trim().parse().ok(),
            _ => None,
        }))
    }
}

/// A string; anything else is absent.
#[derive(Debug, Clone, Default)]
pub(super) struct Text(pub(super) Option<String>);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Text(match Loose::deserialize(d)? {
            Loose::Str(s) if !s.is_empty() => Some(s),
            _ => None,
        }))
    }
}

/// An object read as `T`; any other JSON value is absent.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Obj<T>(pub(super) Option<T>);

impl<T> Default for Obj<T> {
    fn default() -> Self {
        Obj(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<Obj<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(a)).map(|t| Obj(Some(t)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_unit<E>(self) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_none<E>(self) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Obj<T>, D2::Error> {
                Obj::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Obj<T>, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Obj(None))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}
