//! What a request is: one [`Endpoint`], decided once by the route phase from the provider, the
//! method and the provider path, and asked by every later phase instead of looking at the path
//! again (is it cacheable? which event ends its stream? may aigate ask for streamed usage? which
//! usage format does its answer carry? does it generate tokens?).

use http::Method;

/// The kind of request, by the API it calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST …/chat/completions`: OpenAI and every OpenAI-compatible provider.
    ChatCompletions,
    /// `POST …/completions` (legacy text completions, Mistral FIM).
    Completions,
    /// `POST …/embeddings`.
    Embeddings,
    /// `POST …/responses`: the OpenAI Responses API.
    Responses,
    /// `POST …/v1/messages`: Anthropic Messages.
    AnthropicMessages,
    /// `POST …:generateContent` / `…:streamGenerateContent`: Google AI Studio.
    GeminiGenerateContent,
    /// `GET …/models`: the model list.
    Models,
    /// Anything else (files, batches, fine-tuning, count_tokens, Workers AI runs, …): relayed and
    /// logged, never cached, no usage read.
    Other,
}

/// How the token counts of a response are written (see [`crate::meter::usage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageFormat {
    /// `usage` with input including cached tokens and output including reasoning (OpenAI and the
    /// OpenAI-compatible providers, the Responses API).
    OpenAi,
    /// `usage` with input excluding cache reads and writes (Anthropic).
    Anthropic,
    /// `usageMetadata` (Google).
    Google,
}

impl Endpoint {
    /// The names of the cacheable endpoints, as configuration and admin queries write them.
    pub const NAMES: [&'static str; 7] =
        ["chat", "completions", "embeddings", "responses", "messages", "generate_content", "models"];

    /// The endpoint's name (`other` for what is never cached).
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::AnthropicMessages => "messages",
            Endpoint::GeminiGenerateContent => "generate_content",
            Endpoint::Models => "models",
            Endpoint::Other => "other",
        }
    }

    /// The cacheable endpoint named `name` (see [`Endpoint::NAMES`]).
    pub fn from_name(name: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|&e| e != Endpoint::Other && e.as_str() == name)
    }

    /// Every endpoint.
    pub const ALL: [Endpoint; 8] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Responses,
        Endpoint::AnthropicMessages,
        Endpoint::GeminiGenerateContent,
        Endpoint::Models,
        Endpoint::Other,
    ];

    /// Classifies a request: the provider name, the method and the provider path the client sent
    /// (percent-encoded, no leading slash needed; a query string is ignored).
    pub fn classify(provider: &str, method: &Method, path: &str) -> Endpoint {
        let path = path.split(['?', '#']).next().unwrap_or("").trim_matches('/');
        if method == Method::GET {
            return if ends_with_segments(path, "models") { Endpoint::Models } else { Endpoint::Other };
        }
        if method != Method::POST {
            return Endpoint::Other;
        }
        // Google's methods follow a colon (`models/gemini-2.5-flash:generateContent`), which
        // clients may percent-encode.
        let last = path.rsplit('/').next().unwrap_or("");
        let verb = match last.split_once(':') {
            Some((_, verb)) => Some(verb),
            None => find_ascii_ci(last, "%3a").map(|i| &last[i + 3..]),
        };
        if let Some(verb) = verb {
            let gemini =
                verb.eq_ignore_ascii_case("generateContent") || verb.eq_ignore_ascii_case("streamGenerateContent");
            return if gemini { Endpoint::GeminiGenerateContent } else { Endpoint::Other };
        }
        if ends_with_segments(path, "chat/completions") {
            Endpoint::ChatCompletions
        } else if ends_with_segments(path, "completions") {
            Endpoint::Completions
        } else if ends_with_segments(path, "embeddings") {
            Endpoint::Embeddings
        } else if ends_with_segments(path, "responses") {
            Endpoint::Responses
        } else if ends_with_segments(path, "v1/messages") || (provider == "anthropic" && path == "messages") {
            Endpoint::AnthropicMessages
        } else {
            Endpoint::Other
        }
    }

    /// Whether a response may be cached: the answer is a function of the request alone.
    pub fn cacheable(self) -> bool {
        self != Endpoint::Other
    }

    /// The bytes that must appear in a streamed answer for it to have ended cleanly (a stream cut
    /// before them is never cached). `None`: the endpoint does not stream.
    pub fn terminal_event(self) -> Option<&'static [u8]> {
        match self {
            Endpoint::ChatCompletions | Endpoint::Completions => Some(b"[DONE]"),
            Endpoint::Responses => Some(b"response.completed"),
            Endpoint::AnthropicMessages => Some(b"message_stop"),
            // Gemini sends no end event: its last chunk is the one with a finish reason.
            Endpoint::GeminiGenerateContent => Some(b"\"finishReason\""),
            Endpoint::Embeddings | Endpoint::Models | Endpoint::Other => None,
        }
    }

    /// Whether the request may carry `stream_options.include_usage` (if its provider accepts it).
    pub fn accepts_stream_options(self) -> bool {
        matches!(self, Endpoint::ChatCompletions | Endpoint::Completions)
    }

    /// The usage format of the answer, `None` when the answer carries no usage.
    pub fn usage_format(self) -> Option<UsageFormat> {
        match self {
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Embeddings | Endpoint::Responses => {
                Some(UsageFormat::OpenAi)
            }
            Endpoint::AnthropicMessages => Some(UsageFormat::Anthropic),
            Endpoint::GeminiGenerateContent => Some(UsageFormat::Google),
            Endpoint::Models | Endpoint::Other => None,
        }
    }

    /// Whether the answer is generated token by token (so output tokens are estimated from
    /// `max_tokens` when a token or cost limit reserves).
    pub fn generates_tokens(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions
                | Endpoint::Completions
                | Endpoint::Responses
                | Endpoint::AnthropicMessages
                | Endpoint::GeminiGenerateContent
        )
    }
}

/// `path` is `suffix` or ends with `/suffix`.
fn ends_with_segments(path: &str, suffix: &str) -> bool {
    path.strip_suffix(suffix).is_some_and(|p| p.is_empty() || p.ends_with('/'))
}

/// Byte offset of `needle` (ASCII) in `hay`, ignoring ASCII case.
fn find_ascii_ci(hay: &str, needle: &str) -> Option<usize> {
    hay.as_bytes().windows(needle.len()).position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify() {
        use Endpoint::*;
        let post = Method::POST;
        let get = Method::GET;
        let cases = [
            ("openai", &post, "chat/completions", ChatCompletions),
            ("openai", &post, "/v1/chat/completions", ChatCompletions),
            ("azure-openai", &post, "res/dep/chat/completions?api-version=2024-10-21", ChatCompletions),
            ("google-ai-studio", &post, "v1beta/openai/chat/completions", ChatCompletions),
            ("openai", &post, "completions", Completions),
            ("mistral", &post, "v1/fim/completions", Completions),
            ("openai", &post, "embeddings", Embeddings),
            ("openai", &post, "responses", Responses),
            ("anthropic", &post, "v1/messages", AnthropicMessages),
            ("anthropic", &post, "messages", AnthropicMessages),
            ("anthropic", &post, "v1/messages/count_tokens", Other),
            ("anthropic", &post, "v1/messages/batches", Other),
            ("openai", &post, "threads/thread_1/messages", Other),
            ("google-ai-studio", &post, "v1beta/models/gemini-2.5-flash:generateContent", GeminiGenerateContent),
            (
                "google-ai-studio",
                &post,
                "v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                GeminiGenerateContent,
            ),
            ("google-ai-studio", &post, "v1beta/models/gemini-2.5-flash%3AgenerateContent", GeminiGenerateContent),
            ("google-ai-studio", &post, "v1beta/models/gemini-2.5-flash:countTokens", Other),
            ("openai", &get, "models", Models),
            ("openai", &get, "v1/models", Models),
            ("openai", &get, "models/gpt-4o", Other),
            ("openai", &get, "chat/completions", Other),
            ("openai", &Method::DELETE, "chat/completions", Other),
            ("openai", &post, "fine_tuning/jobs", Other),
            ("openai", &post, "images/generations", Other),
            ("workers-ai", &post, "@cf/meta/llama-3.1-8b-instruct", Other),
        ];
        for (provider, method, path, want) in cases {
            assert_eq!(Endpoint::classify(provider, method, path), want, "{provider} {method} {path}");
        }
    }

    #[test]
    fn answers() {
        assert!(Endpoint::Models.cacheable() && !Endpoint::Other.cacheable());
        assert_eq!(Endpoint::ChatCompletions.terminal_event(), Some(&b"[DONE]"[..]));
        assert!(Endpoint::Completions.accepts_stream_options() && !Endpoint::Responses.accepts_stream_options());
        assert_eq!(Endpoint::Embeddings.usage_format(), Some(UsageFormat::OpenAi));
        assert!(!Endpoint::Embeddings.generates_tokens() && Endpoint::GeminiGenerateContent.generates_tokens());
        assert_eq!(Endpoint::Models.usage_format(), None);
    }
}
