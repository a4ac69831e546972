//! OpenAI chat completions → Google AI Studio (Gemini) `generateContent` and
//! `streamGenerateContent?alt=sse`, and the answers back.
//!
//! What maps: system and developer messages (to `systemInstruction`), the history (`assistant`
//! becomes `model`), text and image parts (data URLs inline, https URLs as file data), tools (to
//! `functionDeclarations`) and `tool_choice` (to `functionCallingConfig`), assistant tool calls and
//! tool results (a result names its function, found by its call id), `response_format` (JSON mode
//! and JSON schema), `temperature`, `top_p`, `stop`, `max_tokens` / `max_completion_tokens`,
//! `reasoning_effort` (to a thinking budget), `seed`, `presence_penalty`, `frequency_penalty`.
//! `n` other than 1 is refused (400); `user`, `logit_bias` and `logprobs` are dropped.

use serde_json::{json, Map, Value};

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::openai::{self, push_turn, Part as RequestPart, ToolChoice};
use super::{chunk, end_stream, AssistantMessage, Choice, Completion, Function, ToolCall, Usage};

/// The request body for `…/models/{model}:generateContent` (or its streaming form).
pub fn request(req: &Map<String, Value>) -> Result<Value, String> {
    openai::one_choice(req)?;
    let msgs = req.get("messages").and_then(Value::as_array).ok_or("messages: an array of messages is required")?;
    let mut system: Vec<Value> = Vec::new();
    let mut contents: Vec<Value> = Vec::new();
    // The function name of each tool call id, for the results that answer them.
    let mut names: Vec<(&str, &str)> = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| format!("messages[{i}].role is missing"))?;
        match role {
            "system" | "developer" => system.extend(parts(m.get("content"), i)?),
            "user" => push_turn(&mut contents, "parts", "user", parts(m.get("content"), i)?),
            "assistant" => {
                let mut p = parts(m.get("content"), i)?;
                for c in openai::tool_calls(m, i)? {
                    if let Some(id) = c.id {
                        names.push((id, c.name));
                    }
                    p.push(json!({"functionCall": {"name": c.name, "args": c.args}}));
                }
                if !p.is_empty() {
                    push_turn(&mut contents, "parts", "model", p);
                }
            }
            "tool" | "function" => {
                let id = m.get("tool_call_id").and_then(Value::as_str).unwrap_or("");
                let name = names
                    .iter()
                    .find(|(k, _)| *k == id)
                    .map(|(_, n)| *n)
                    .or_else(|| m.get("name").and_then(Value::as_str))
                    .ok_or_else(|| format!("messages[{i}].tool_call_id: no earlier tool call has the id {id:?}"))?;
                let text = openai::text(m.get("content"), i)?;
                // Gemini wants an object: a JSON object result as it is, anything else wrapped.
                let response = match serde_json::from_str::<Value>(&text) {
                    Ok(v @ Value::Object(_)) => v,
                    _ => json!({"content": text}),
                };
                let part = json!({"functionResponse": {"name": name, "response": response}});
                push_turn(&mut contents, "parts", "user", vec![part]);
            }
            other => {
                return Err(format!("messages[{i}].role: {other:?} is not system, developer, user, assistant or tool"))
            }
        }
    }
    let mut out = Map::new();
    out.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({"parts": system}));
    }
    let mut config = Map::new();
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ] {
        if let Some(v) = req.get(from).filter(|v| !v.is_null()) {
            config.insert(to.into(), v.clone());
        }
    }
    if let Some(n) = openai::max_tokens(req) {
        config.insert("maxOutputTokens".into(), json!(n));
    }
    if let Some(stop) = openai::stop(req) {
        config.insert("stopSequences".into(), stop);
    }
    if let Some(f) = req.get("response_format") {
        match f.get("type").and_then(Value::as_str) {
            None | Some("text") => {}
            Some("json_object") => {
                config.insert("responseMimeType".into(), json!("application/json"));
            }
            Some("json_schema") => {
                let schema = f
                    .get("json_schema")
                    .and_then(|s| s.get("schema"))
                    .ok_or("response_format.json_schema.schema is missing")?;
                config.insert("responseMimeType".into(), json!("application/json"));
                config.insert("responseJsonSchema".into(), schema.clone());
            }
            Some(other) => {
                return Err(format!("response_format.type: {other:?} is not text, json_object or json_schema"))
            }
        }
    }
    if let Some(effort) = req.get("reasoning_effort").and_then(Value::as_str) {
        let budget: u64 = match effort {
            "minimal" => 0,
            "low" => 1024,
            "medium" => 8192,
            "high" => 24576,
            other => return Err(format!("reasoning_effort: {other:?} is not minimal, low, medium or high")),
        };
        config.insert("thinkingConfig".into(), json!({"thinkingBudget": budget}));
    }
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }
    let decls: Vec<Value> = openai::tools(req)?
        .into_iter()
        .map(|t| {
            let mut d = json!({"name": t.name});
            if let Some(desc) = t.description {
                d["description"] = desc.clone();
            }
            if let Some(p) = t.parameters {
                d["parametersJsonSchema"] = p.clone();
            }
            d
        })
        .collect();
    if !decls.is_empty() {
        out.insert("tools".into(), json!([{"functionDeclarations": decls}]));
    }
    if let Some(c) = openai::tool_choice(req)? {
        let mode = match c {
            ToolChoice::Auto => json!({"mode": "AUTO"}),
            ToolChoice::Required => json!({"mode": "ANY"}),
            ToolChoice::None => json!({"mode": "NONE"}),
            ToolChoice::Function(name) => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
        };
        out.insert("toolConfig".into(), json!({"functionCallingConfig": mode}));
    }
    Ok(Value::Object(out))
}

/// The content of message `i` as Gemini parts.
fn parts(content: Option<&Value>, i: usize) -> Result<Vec<Value>, String> {
    Ok(openai::content(content, i)?
        .into_iter()
        .map(|p| match p {
            RequestPart::Text(t) => json!({"text": t}),
            RequestPart::InlineImage { mime, data } => json!({"inlineData": {"mimeType": mime, "data": data}}),
            RequestPart::ImageUrl(url) => json!({"fileData": {"mimeType": image_type(url), "fileUri": url}}),
        })
        .collect())
}

/// The image type of a URL, by its extension (Gemini needs one for file data).
fn image_type(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or(url).to_ascii_lowercase();
    match path.rsplit('.').next() {
        Some("png") => "image/png",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("heic") => "image/heic",
        _ => "image/jpeg",
    }
}

fn finish_reason(reason: Option<&str>, called: bool) -> Option<&'static str> {
    Some(match reason? {
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => "content_filter",
        _ if called => "tool_calls",
        _ => "stop",
    })
}

fn usage_of(u: Option<&Value>) -> Usage {
    let n = |k: &str| u.and_then(|u| u.get(k)).and_then(Value::as_u64).unwrap_or(0);
    Usage {
        prompt: n("promptTokenCount"),
        completion: n("candidatesTokenCount") + n("thoughtsTokenCount"),
        cached: n("cachedContentTokenCount"),
        reasoning: n("thoughtsTokenCount"),
    }
}

/// The visible text and the function calls of a candidate's parts (thoughts left out).
fn split_parts(candidate: &Value) -> (String, Vec<(String, String)>) {
    let mut text = String::new();
    let mut calls = Vec::new();
    for p in candidate.get("content").and_then(|c| c.get("parts")).and_then(Value::as_array).into_iter().flatten() {
        if p.get("thought").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        if let Some(t) = p.get("text").and_then(Value::as_str) {
            text.push_str(t);
        }
        if let Some(f) = p.get("functionCall") {
            let name = f.get("name").and_then(Value::as_str).unwrap_or("").to_owned();
            let args = f.get("args").map_or_else(|| "{}".to_owned(), Value::to_string);
            calls.push((name, args));
        }
    }
    (text, calls)
}

/// A whole `generateContent` answer, as read (strings borrowed, call arguments kept as text).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Generated<'a> {
    #[serde(borrow, default)]
    candidates: Vec<Candidate<'a>>,
    #[serde(default)]
    usage_metadata: Metadata,
    #[serde(borrow, default)]
    model_version: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    response_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate<'a> {
    #[serde(borrow, default)]
    content: Option<Content<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Content<'a> {
    #[serde(borrow, default)]
    parts: Vec<Part<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(default)]
    thought: bool,
    #[serde(borrow, default)]
    function_call: Option<Call<'a>>,
}

#[derive(Deserialize)]
struct Call<'a> {
    #[serde(borrow, default)]
    name: Cow<'a, str>,
    #[serde(borrow, default)]
    args: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    thoughts_token_count: u64,
    #[serde(default)]
    cached_content_token_count: u64,
}

/// A whole `generateContent` answer (the body) as an OpenAI chat completion; an error when the
/// body is not one.
pub fn response(body: &[u8], model: &str, created: u64) -> Result<Vec<u8>, serde_json::Error> {
    let g: Generated<'_> = serde_json::from_slice(body)?;
    let mut text = String::new();
    let mut calls = Vec::new();
    let candidate = g.candidates.first();
    for p in candidate.and_then(|c| c.content.as_ref()).map_or(&[][..], |c| &c.parts) {
        if p.thought {
            continue;
        }
        if let Some(t) = &p.text {
            text.push_str(t);
        }
        if let Some(f) = &p.function_call {
            calls.push(ToolCall {
                id: Cow::Owned(format!("call_{}", calls.len())),
                kind: "function",
                function: Function { name: &f.name, arguments: f.args.map_or("{}", RawValue::get) },
            });
        }
    }
    let reason = candidate.and_then(|c| c.finish_reason.as_deref());
    let finish = finish_reason(reason, !calls.is_empty()).unwrap_or("stop");
    let u = &g.usage_metadata;
    let usage = Usage {
        prompt: u.prompt_token_count,
        completion: u.candidates_token_count + u.thoughts_token_count,
        cached: u.cached_content_token_count,
        reasoning: u.thoughts_token_count,
    };
    let out = Completion {
        id: g
            .response_id
            .as_deref()
            .map_or(Cow::Borrowed("chatcmpl-gemini"), |id| Cow::Owned(format!("chatcmpl-{id}"))),
        object: "chat.completion",
        created,
        model: g.model_version.as_deref().unwrap_or(model),
        choices: [Choice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content: (!text.is_empty() || calls.is_empty()).then_some(text),
                tool_calls: calls,
            },
            finish_reason: finish,
            logprobs: None,
        }],
        usage: usage.out(),
    };
    serde_json::to_vec(&out)
}

/// A Google error answer (`{"error":{"code","message","status"}}`) in OpenAI's shape.
pub fn error(v: &Value) -> Value {
    let e = v.get("error").or_else(|| v.get(0).and_then(|x| x.get("error")));
    let message = e.and_then(|e| e.get("message")).and_then(Value::as_str).unwrap_or("provider error");
    let status = e.and_then(|e| e.get("status")).and_then(Value::as_str).unwrap_or("UNKNOWN");
    json!({"error": {"message": message, "type": status.to_ascii_lowercase(), "code": status, "param": null}})
}

/// Translates Gemini's streamed chunks into chat completion chunks as they arrive. Gemini sends
/// no end event: the end of the body ends the translated stream.
pub struct Stream {
    id: String,
    model: String,
    created: u64,
    started: bool,
    usage: Usage,
    calls: usize,
    finish: Option<&'static str>,
    done: bool,
}

impl Stream {
    /// A translator for one stream of `model`.
    pub fn new(model: &str, created: u64) -> Stream {
        Stream {
            id: "chatcmpl-gemini".into(),
            model: model.to_owned(),
            created,
            started: false,
            usage: Usage::default(),
            calls: 0,
            finish: None,
            done: false,
        }
    }

    /// One chunk (a `GenerateContentResponse`); appends the chunks it becomes to `out`.
    pub fn event(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
        if v.get("error").is_some() {
            super::event(out, &error(&v));
            self.done = true;
            return;
        }
        if !self.started {
            self.started = true;
            if let Some(id) = v.get("responseId").and_then(Value::as_str) {
                self.id = format!("chatcmpl-{id}");
            }
            if let Some(m) = v.get("modelVersion").and_then(Value::as_str) {
                self.model = m.to_owned();
            }
            chunk(out, &self.id, &self.model, self.created, json!({"role": "assistant", "content": ""}), None);
        }
        if v.get("usageMetadata").is_some() {
            self.usage = usage_of(v.get("usageMetadata"));
        }
        let candidate = v.get("candidates").and_then(|c| c.get(0)).cloned().unwrap_or(Value::Null);
        let (text, calls) = split_parts(&candidate);
        if !text.is_empty() {
            chunk(out, &self.id, &self.model, self.created, json!({"content": text}), None);
        }
        for (name, args) in calls {
            let call = json!({"index": self.calls, "id": format!("call_{}", self.calls), "type": "function",
                "function": {"name": name, "arguments": args}});
            self.calls += 1;
            chunk(out, &self.id, &self.model, self.created, json!({"tool_calls": [call]}), None);
        }
        if let Some(f) = finish_reason(candidate.get("finishReason").and_then(Value::as_str), self.calls > 0) {
            self.finish = Some(f);
        }
    }

    /// The end of the body: the finish chunk, the usage chunk and `[DONE]`, once.
    pub fn end(&mut self, out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        self.done = true;
        end_stream(out, &self.id, &self.model, self.created, self.finish.unwrap_or("stop"), &self.usage);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> Result<Value, String> {
        request(v.as_object().unwrap_or_else(|| unreachable!()))
    }

    #[test]
    fn a_conversation_with_tools_translates() {
        let out = req(json!({
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/sky.png"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_9", "type": "function",
                    "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_9", "content": "{\"temp\":18}"}
            ],
            "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "weather"}},
            "max_tokens": 100, "temperature": 0.5, "stop": ["x"],
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out["systemInstruction"], json!({"parts": [{"text": "Be brief."}]}));
        let c = out["contents"].as_array().unwrap_or_else(|| unreachable!());
        assert_eq!(
            c[0]["parts"][1],
            json!({"fileData": {"mimeType": "image/png", "fileUri": "https://example.com/sky.png"}})
        );
        assert_eq!(
            c[1],
            json!({"role": "model", "parts": [{"functionCall": {"name": "weather", "args": {"city": "Paris"}}}]})
        );
        assert_eq!(c[2]["parts"][0], json!({"functionResponse": {"name": "weather", "response": {"temp": 18}}}));
        let g = &out["generationConfig"];
        assert_eq!((g["maxOutputTokens"].clone(), g["temperature"].clone()), (json!(100), json!(0.5)));
        assert_eq!(g["stopSequences"], json!(["x"]));
        assert_eq!(g["responseMimeType"], "application/json");
        assert_eq!(
            out["toolConfig"],
            json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["weather"]}})
        );
        assert_eq!(out["tools"][0]["functionDeclarations"][0]["name"], "weather");
    }

    #[test]
    fn a_result_without_its_call_is_refused() {
        let e = req(json!({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "1"}]}))
            .err()
            .unwrap_or_default();
        assert!(e.starts_with("messages[0].tool_call_id"), "{e}");
    }

    #[test]
    fn answers_and_streams_come_back_in_openai_shape() {
        let body = json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "Sunny", "thought": false},
            {"functionCall": {"name": "weather", "args": {"city": "Paris"}}}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 3, "thoughtsTokenCount": 2},
            "modelVersion": "gemini-2.5-flash", "responseId": "r1"});
        let out = response(body.to_string().as_bytes(), "gemini-2.5-flash", 1).unwrap_or_default();
        let v: Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], "{\"city\":\"Paris\"}");
        assert_eq!(v["usage"]["completion_tokens"], 5);
        assert_eq!(v["usage"]["completion_tokens_details"]["reasoning_tokens"], 2);

        let mut s = Stream::new("gemini-2.5-flash", 1);
        let mut out = Vec::new();
        s.event(
            br#"{"candidates":[{"content":{"parts":[{"text":"Hel"}],"role":"model"}}],"responseId":"r2"}"#,
            &mut out,
        );
        s.event(br#"{"candidates":[{"content":{"parts":[{"text":"lo"}],"role":"model"},"finishReason":"MAX_TOKENS"}],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":2}}"#, &mut out);
        s.end(&mut out);
        let text = String::from_utf8(out).unwrap_or_default();
        assert!(text.contains("\"content\":\"Hel\"") && text.contains("\"content\":\"lo\""), "{text}");
        assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
        assert!(text.contains("\"prompt_tokens\":4") && text.ends_with("data: [DONE]\n\n"), "{text}");
    }
}
