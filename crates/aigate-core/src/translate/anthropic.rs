//! OpenAI chat completions ⇄ Anthropic Messages: the request there, the answer (plain, streamed,
//! or an error) back.
//!
//! What maps: system and developer messages (to `system`), the history with text and image parts
//! (data URLs and https URLs), tools and `tool_choice` (with `parallel_tool_calls = false`),
//! assistant tool calls and tool results, `max_tokens` / `max_completion_tokens` (Anthropic needs
//! one: the configured default otherwise), `temperature`, `top_p`, `stop`, `user` (to
//! `metadata.user_id`), `reasoning_effort` (to extended thinking with a token budget), `stream`.
//! What cannot: `n` other than 1 and a JSON `response_format` (Anthropic has no JSON mode) are
//! refused with a 400 naming the field; sampling options Anthropic lacks (`seed`,
//! `frequency_penalty`, `presence_penalty`, `logit_bias`, `logprobs`) are dropped.

use serde_json::{json, Map, Value};

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::openai::{self, push_turn, Part, ToolChoice};
use super::{chunk, end_stream, AssistantMessage, Choice, Completion, Function, ToolCall, Usage};

/// The request body for Anthropic's `POST /v1/messages`.
pub fn request(req: &Map<String, Value>, model: &str, default_max_tokens: u64) -> Result<Value, String> {
    openai::one_choice(req)?;
    match req.get("response_format").and_then(|f| f.get("type")).and_then(Value::as_str) {
        None | Some("text") => {}
        Some(other) => {
            return Err(format!(
                "response_format: {other:?} is not available on Anthropic models (no JSON mode); \
                 ask for JSON in the prompt, or use a tool"
            ))
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    let mut system: Vec<Value> = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    let msgs = req.get("messages").and_then(Value::as_array).ok_or("messages: an array of messages is required")?;
    for (i, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| format!("messages[{i}].role is missing"))?;
        match role {
            "system" | "developer" => {
                for part in openai::content(m.get("content"), i)? {
                    if let Part::Text(t) = part {
                        system.push(json!({"type": "text", "text": t}));
                    }
                }
            }
            "user" => push_turn(&mut messages, "content", "user", blocks(m.get("content"), i)?),
            "assistant" => {
                let mut b = blocks(m.get("content"), i)?;
                for (j, c) in openai::tool_calls(m, i)?.into_iter().enumerate() {
                    let id = c.id.map_or_else(|| format!("toolu_{i}_{j}"), str::to_owned);
                    b.push(json!({"type": "tool_use", "id": id, "name": c.name, "input": c.args}));
                }
                if !b.is_empty() {
                    push_turn(&mut messages, "content", "assistant", b);
                }
            }
            "tool" | "function" => {
                let id = m
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("messages[{i}].tool_call_id is missing"))?;
                let result = json!({"type": "tool_result", "tool_use_id": id, "content": blocks(m.get("content"), i)?});
                push_turn(&mut messages, "content", "user", vec![result]);
            }
            other => {
                return Err(format!("messages[{i}].role: {other:?} is not system, developer, user, assistant or tool"))
            }
        }
    }
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    out.insert("messages".into(), Value::Array(messages));
    let mut max_tokens = openai::max_tokens(req).unwrap_or(default_max_tokens);
    if let Some(effort) = req.get("reasoning_effort").and_then(Value::as_str) {
        let budget: u64 = match effort {
            "minimal" | "low" => 1024,
            "medium" => 4096,
            "high" => 16384,
            other => return Err(format!("reasoning_effort: {other:?} is not low, medium or high")),
        };
        // The thinking budget counts against max_tokens, which must stay above it.
        if max_tokens <= budget {
            max_tokens += budget;
        }
        out.insert("thinking".into(), json!({"type": "enabled", "budget_tokens": budget}));
    }
    out.insert("max_tokens".into(), json!(max_tokens));
    for k in ["temperature", "top_p", "stream"] {
        if let Some(v) = req.get(k).filter(|v| !v.is_null()) {
            out.insert(k.into(), v.clone());
        }
    }
    if let Some(stop) = openai::stop(req) {
        out.insert("stop_sequences".into(), stop);
    }
    if let Some(user) = req.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    let tools: Vec<Value> = openai::tools(req)?
        .into_iter()
        .map(|t| {
            let mut tool = json!({"name": t.name,
                "input_schema": t.parameters.cloned().unwrap_or(json!({"type": "object", "properties": {}}))});
            if let Some(d) = t.description {
                tool["description"] = d.clone();
            }
            tool
        })
        .collect();
    let has_tools = !tools.is_empty();
    if has_tools {
        out.insert("tools".into(), Value::Array(tools));
    }
    let mut choice = openai::tool_choice(req)?.map(|c| match c {
        ToolChoice::Auto => json!({"type": "auto"}),
        ToolChoice::Required => json!({"type": "any"}),
        ToolChoice::None => json!({"type": "none"}),
        ToolChoice::Function(name) => json!({"type": "tool", "name": name}),
    });
    if req.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false) && has_tools {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        c["disable_parallel_tool_use"] = json!(true);
    }
    if let Some(c) = choice {
        out.insert("tool_choice".into(), c);
    }
    Ok(Value::Object(out))
}

/// The content of message `i` as Anthropic content blocks.
fn blocks(content: Option<&Value>, i: usize) -> Result<Vec<Value>, String> {
    Ok(openai::content(content, i)?
        .into_iter()
        .map(|p| match p {
            Part::Text(t) => json!({"type": "text", "text": t}),
            Part::InlineImage { mime, data } => {
                json!({"type": "image", "source": {"type": "base64", "media_type": mime, "data": data}})
            }
            Part::ImageUrl(url) => json!({"type": "image", "source": {"type": "url", "url": url}}),
        })
        .collect())
}

/// OpenAI's `finish_reason` for Anthropic's `stop_reason`.
fn finish_reason(stop: Option<&str>) -> &'static str {
    match stop {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

fn usage_of(u: Option<&Value>) -> Usage {
    let n = |k: &str| u.and_then(|u| u.get(k)).and_then(Value::as_u64).unwrap_or(0);
    Usage {
        prompt: n("input_tokens") + n("cache_read_input_tokens") + n("cache_creation_input_tokens"),
        completion: n("output_tokens"),
        cached: n("cache_read_input_tokens"),
        reasoning: 0,
    }
}

/// A whole Anthropic message, as read: strings borrowed from the body, the tool inputs kept as
/// their JSON text (they become `arguments` as they are).
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Vec<Block<'a>>,
    #[serde(borrow, default)]
    stop_reason: Option<Cow<'a, str>>,
    #[serde(default)]
    usage: MessageUsage,
}

#[derive(Deserialize)]
struct Block<'a> {
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct MessageUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_read_input_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: u64,
}

/// A whole Anthropic message (the body) as an OpenAI chat completion; an error when the body is
/// not a message.
pub fn response(body: &[u8], created: u64) -> Result<Vec<u8>, serde_json::Error> {
    let m: Message<'_> = serde_json::from_slice(body)?;
    let mut text = String::new();
    let mut calls = Vec::new();
    for b in &m.content {
        match b.kind.as_ref() {
            "text" => text.push_str(b.text.as_deref().unwrap_or("")),
            "tool_use" => calls.push(ToolCall {
                id: Cow::Borrowed(b.id.as_deref().unwrap_or("")),
                kind: "function",
                function: Function {
                    name: b.name.as_deref().unwrap_or(""),
                    arguments: b.input.map_or("{}", RawValue::get),
                },
            }),
            _ => {}
        }
    }
    let u = &m.usage;
    let usage = Usage {
        prompt: u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens,
        completion: u.output_tokens,
        cached: u.cache_read_input_tokens,
        reasoning: 0,
    };
    let out = Completion {
        id: Cow::Borrowed(m.id.as_deref().unwrap_or("msg")),
        object: "chat.completion",
        created,
        model: m.model.as_deref().unwrap_or(""),
        choices: [Choice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content: (!text.is_empty() || calls.is_empty()).then_some(text),
                tool_calls: calls,
            },
            finish_reason: finish_reason(m.stop_reason.as_deref()),
            logprobs: None,
        }],
        usage: usage.out(),
    };
    serde_json::to_vec(&out)
}

/// An Anthropic error answer (`{"type":"error","error":{"type","message"}}`) in OpenAI's shape.
pub fn error(v: &Value) -> Value {
    let e = v.get("error");
    let message = e.and_then(|e| e.get("message")).and_then(Value::as_str).unwrap_or("provider error");
    let kind = e.and_then(|e| e.get("type")).and_then(Value::as_str).unwrap_or("api_error");
    json!({"error": {"message": message, "type": kind, "code": kind, "param": null}})
}

/// Translates Anthropic's stream events into chat completion chunks as they arrive.
#[derive(Default)]
pub struct Stream {
    id: String,
    model: String,
    created: u64,
    usage: Usage,
    /// The OpenAI tool-call index of each Anthropic content block that is a tool use.
    tool_index: Vec<(u64, usize)>,
    tools: usize,
    finish: Option<&'static str>,
    done: bool,
}

impl Stream {
    /// A translator for one stream.
    pub fn new(created: u64) -> Stream {
        Stream { created, ..Stream::default() }
    }

    /// One event (`event:` name, `data:` JSON); appends the chunks it becomes to `out`.
    pub fn event(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
        match v.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                let m = &v["message"];
                self.id = m.get("id").and_then(Value::as_str).unwrap_or("msg").to_owned();
                self.model = m.get("model").and_then(Value::as_str).unwrap_or("").to_owned();
                self.usage = usage_of(m.get("usage"));
                self.emit(out, json!({"role": "assistant", "content": ""}), None);
            }
            Some("content_block_start") => {
                let b = &v["content_block"];
                if b.get("type").and_then(Value::as_str) == Some("tool_use") {
                    let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                    let t = self.tools;
                    self.tools += 1;
                    self.tool_index.push((index, t));
                    let call = json!({"index": t, "id": b.get("id").cloned().unwrap_or(Value::Null), "type": "function",
                        "function": {"name": b.get("name").cloned().unwrap_or(Value::Null), "arguments": ""}});
                    self.emit(out, json!({"tool_calls": [call]}), None);
                }
            }
            Some("content_block_delta") => {
                let d = &v["delta"];
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        let text = d.get("text").cloned().unwrap_or(json!(""));
                        self.emit(out, json!({"content": text}), None);
                    }
                    Some("input_json_delta") => {
                        let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                        let part = d.get("partial_json").and_then(Value::as_str).unwrap_or("");
                        let tool = self.tool_index.iter().find(|(i, _)| *i == index);
                        // An empty piece (Anthropic sends one first) says nothing.
                        if let Some(&(_, t)) = tool.filter(|_| !part.is_empty()) {
                            self.emit(
                                out,
                                json!({"tool_calls": [{"index": t, "function": {"arguments": part}}]}),
                                None,
                            );
                        }
                    }
                    _ => {}
                }
            }
            Some("message_delta") => {
                self.finish = Some(finish_reason(v["delta"].get("stop_reason").and_then(Value::as_str)));
                if let Some(n) = v.get("usage").and_then(|u| u.get("output_tokens")).and_then(Value::as_u64) {
                    self.usage.completion = n;
                }
            }
            Some("message_stop") => self.end(out),
            Some("error") => {
                let e = error(&v);
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(e.to_string().as_bytes());
                out.extend_from_slice(b"\n\n");
                self.done = true;
            }
            _ => {}
        }
    }

    /// The end of the stream: the finish chunk, the usage chunk and `[DONE]`, once.
    pub fn end(&mut self, out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        self.done = true;
        let finish = self.finish.unwrap_or("stop");
        end_stream(out, &self.id, &self.model, self.created, finish, &self.usage);
    }

    fn emit(&self, out: &mut Vec<u8>, delta: Value, finish: Option<&str>) {
        chunk(out, &self.id, &self.model, self.created, delta, finish);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> Result<Value, String> {
        request(v.as_object().unwrap_or_else(|| unreachable!()), "claude-sonnet-4-5", 1024)
    }

    #[test]
    fn a_conversation_with_tools_translates() {
        let out = req(json!({
            "model": "anthropic/claude-sonnet-4-5",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                {"role": "user", "content": "Thanks"}
            ],
            "tools": [{"type": "function", "function": {"name": "weather", "description": "Weather by city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": "required", "parallel_tool_calls": false,
            "max_completion_tokens": 300, "temperature": 0.2, "stop": "END", "user": "u-1", "seed": 7
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out["model"], "claude-sonnet-4-5");
        assert_eq!(out["system"], json!([{"type": "text", "text": "Be brief."}]));
        assert_eq!(out["max_tokens"], 300);
        assert_eq!(out["stop_sequences"], json!(["END"]));
        assert_eq!(out["metadata"], json!({"user_id": "u-1"}));
        assert_eq!(out["tool_choice"], json!({"type": "any", "disable_parallel_tool_use": true}));
        assert_eq!(out["tools"][0]["input_schema"]["properties"]["city"]["type"], "string");
        assert!(out.get("seed").is_none());
        let m = out["messages"].as_array().unwrap_or_else(|| unreachable!());
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(
            m[0]["content"][1]["source"],
            json!({"type": "base64", "media_type": "image/png", "data": "iVBORw0"})
        );
        assert_eq!(
            m[1]["content"][0],
            json!({"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}})
        );
        // The tool result and the next user message share one user turn.
        assert_eq!(m[2]["role"], "user");
        assert_eq!(m[2]["content"][0]["type"], "tool_result");
        assert_eq!(m[2]["content"][0]["tool_use_id"], "call_1");
        assert_eq!(m[2]["content"][1], json!({"type": "text", "text": "Thanks"}));
    }

    #[test]
    fn what_cannot_be_translated_names_the_field() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        for (extra, field) in [
            (json!({"n": 2}), "n:"),
            (json!({"response_format": {"type": "json_object"}}), "response_format"),
            (json!({"reasoning_effort": "max"}), "reasoning_effort"),
            (json!({"tool_choice": "sometimes"}), "tool_choice"),
        ] {
            let mut v = extra;
            v["messages"] = msgs.clone();
            let e = req(v).err().unwrap_or_default();
            assert!(e.starts_with(field), "{e}");
        }
        let e = req(json!({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}))
            .err()
            .unwrap_or_default();
        assert!(e.starts_with("messages[0].content[0].type"), "{e}");
        assert_eq!(
            req(json!({"messages": msgs})).map(|v| v["max_tokens"].clone()).unwrap_or_default(),
            1024,
            "the configured default when absent"
        );
    }

    #[test]
    fn an_answer_with_a_tool_call_comes_back_in_openai_shape() {
        let body = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 4}});
        let out = response(body.to_string().as_bytes(), 1).unwrap_or_default();
        let v: Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(v["choices"][0]["message"]["content"], "Checking.");
        assert_eq!(v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], "{\"city\":\"Paris\"}");
        assert_eq!(v["usage"]["prompt_tokens"], 14);
        assert_eq!(v["usage"]["completion_tokens"], 5);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
        assert_eq!(v["usage"]["total_tokens"], 19);
    }

    #[test]
    fn a_stream_becomes_chunks_then_usage_then_done() {
        let mut s = Stream::new(1);
        let mut out = Vec::new();
        for ev in [
            json!({"type": "message_start", "message": {"id": "msg_1", "model": "claude-x", "usage": {"input_tokens": 9}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f"}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "1}"}}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 7}}),
            json!({"type": "message_stop"}),
        ] {
            s.event(ev.to_string().as_bytes(), &mut out);
        }
        let text = String::from_utf8(out).unwrap_or_default();
        let events: Vec<Value> = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap_or(Value::Null))
            .collect();
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(events[1]["choices"][0]["delta"]["content"], "Hi");
        assert_eq!(events[2]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"], "f");
        assert_eq!(events[3]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"], "{\"a\":");
        assert_eq!(events[5]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(events[6]["choices"], json!([]));
        assert_eq!(events[6]["usage"]["prompt_tokens"], 9);
        assert_eq!(events[6]["usage"]["completion_tokens"], 7);
        assert!(events.iter().all(|e| e["object"] == "chat.completion.chunk" && e["model"] == "claude-x"));
    }
}
