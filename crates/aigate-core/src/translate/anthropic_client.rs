//! Anthropic's Messages format in front of an OpenAI-format provider: a tool that speaks only
//! Anthropic's API (`POST …/compat/v1/messages`, `…/ai/v1/messages`) reaches any model.
//!
//! The request becomes a chat completions request: `system` a system message, text and image
//! blocks parts, `tool_use` blocks assistant tool calls, `tool_result` blocks tool messages, tools
//! and `tool_choice` (with `disable_parallel_tool_use`), `max_tokens`, `temperature`, `top_p`,
//! `stop_sequences`, `metadata.user_id` (to `user`), `stream` (asking for the usage chunk). Dropped:
//! `top_k`, `thinking`. The answer, its stream and its errors come back in Anthropic's shapes.

use serde_json::{json, Map, Value};

/// The chat completions request of an Anthropic Messages request.
pub fn request(req: &Map<String, Value>, model: &str) -> Result<Value, String> {
    let mut messages: Vec<Value> = Vec::new();
    match req.get("system") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(Value::Array(blocks)) => {
            let text: Vec<&str> = blocks.iter().filter_map(|b| b.get("text").and_then(Value::as_str)).collect();
            messages.push(json!({"role": "system", "content": text.join("\n")}));
        }
        Some(_) => return Err("system must be a string or an array of text blocks".into()),
    }
    let msgs = req.get("messages").and_then(Value::as_array).ok_or("messages: an array of messages is required")?;
    for (i, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| format!("messages[{i}].role is missing"))?;
        let blocks: Vec<Value> = match m.get("content") {
            Some(Value::String(s)) => vec![json!({"type": "text", "text": s})],
            Some(Value::Array(a)) => a.clone(),
            _ => return Err(format!("messages[{i}].content must be a string or an array of blocks")),
        };
        let mut parts: Vec<Value> = Vec::new();
        let mut calls: Vec<Value> = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            match b.get("type").and_then(Value::as_str) {
                Some("text") => {
                    parts.push(json!({"type": "text", "text": b.get("text").cloned().unwrap_or(json!(""))}))
                }
                Some("image") => {
                    let src = &b["source"];
                    let url = match src.get("type").and_then(Value::as_str) {
                        Some("base64") => format!(
                            "data:{};base64,{}",
                            src.get("media_type").and_then(Value::as_str).unwrap_or("image/png"),
                            src.get("data").and_then(Value::as_str).unwrap_or("")
                        ),
                        Some("url") => src.get("url").and_then(Value::as_str).unwrap_or("").to_owned(),
                        _ => {
                            return Err(format!(
                                "messages[{i}].content[{j}].source: base64 or url images are translated"
                            ))
                        }
                    };
                    parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
                }
                Some("tool_use") => calls.push(json!({
                    "id": b.get("id").cloned().unwrap_or(Value::Null),
                    "type": "function",
                    "function": {
                        "name": b.get("name").cloned().unwrap_or(Value::Null),
                        "arguments": b.get("input").map_or_else(|| "{}".to_owned(), Value::to_string),
                    },
                })),
                Some("tool_result") => {
                    let content = match b.get("content") {
                        Some(Value::String(s)) => s.clone(),
                        Some(Value::Array(a)) => a
                            .iter()
                            .filter_map(|c| c.get("text").and_then(Value::as_str))
                            .collect::<Vec<_>>()
                            .join("\n"),
                        _ => String::new(),
                    };
                    messages.push(json!({"role": "tool", "tool_call_id": b.get("tool_use_id").cloned().unwrap_or(Value::Null), "content": content}));
                }
                Some("thinking" | "redacted_thinking") => {}
                other => return Err(format!("messages[{i}].content[{j}].type: {other:?} is not translated")),
            }
        }
        match role {
            "user" if !parts.is_empty() => messages.push(json!({"role": "user", "content": parts})),
            "user" => {}
            "assistant" => {
                let text: String = parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect();
                let mut msg =
                    json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) }});
                if !calls.is_empty() {
                    msg["tool_calls"] = Value::Array(calls);
                }
                messages.push(msg);
            }
            other => return Err(format!("messages[{i}].role: {other:?} is not user or assistant")),
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("messages".into(), Value::Array(messages));
    for k in ["max_tokens", "temperature", "top_p"] {
        if let Some(v) = req.get(k).filter(|v| !v.is_null()) {
            out.insert(k.into(), v.clone());
        }
    }
    if let Some(s) = req.get("stop_sequences").filter(|v| v.as_array().is_some_and(|a| !a.is_empty())) {
        out.insert("stop".into(), s.clone());
    }
    if let Some(u) = req.get("metadata").and_then(|m| m.get("user_id")) {
        out.insert("user".into(), u.clone());
    }
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), json!(true));
        // The usage of the stream is reported at its end (Anthropic's `message_delta`).
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(tools) = req.get("tools").and_then(Value::as_array) {
        let list: Vec<Value> = tools
            .iter()
            .map(|t| {
                let mut f = json!({"name": t.get("name").cloned().unwrap_or(Value::Null),
                    "parameters": t.get("input_schema").cloned().unwrap_or(json!({"type": "object"}))});
                if let Some(d) = t.get("description") {
                    f["description"] = d.clone();
                }
                json!({"type": "function", "function": f})
            })
            .collect();
        if !list.is_empty() {
            out.insert("tools".into(), Value::Array(list));
        }
    }
    if let Some(c) = req.get("tool_choice") {
        let choice = match c.get("type").and_then(Value::as_str) {
            Some("auto") => json!("auto"),
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => {
                json!({"type": "function", "function": {"name": c.get("name").cloned().unwrap_or(Value::Null)}})
            }
            other => return Err(format!("tool_choice.type: {other:?} is not auto, any, tool or none")),
        };
        out.insert("tool_choice".into(), choice);
        if c.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true) {
            out.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    Ok(Value::Object(out))
}

fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// Anthropic's usage object of an OpenAI usage object.
fn usage(u: Option<&Value>) -> Value {
    let n = |k: &str| u.and_then(|u| u.get(k)).and_then(Value::as_u64).unwrap_or(0);
    let cached = u
        .and_then(|u| u.get("prompt_tokens_details"))
        .and_then(|d| d.get("cached_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    json!({
        "input_tokens": n("prompt_tokens").saturating_sub(cached),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
        "output_tokens": n("completion_tokens"),
    })
}

/// A chat completion as an Anthropic message.
pub fn response(v: &Value) -> Value {
    let choice = v.get("choices").and_then(|c| c.get(0)).cloned().unwrap_or(Value::Null);
    let msg = &choice["message"];
    let mut content = Vec::new();
    if let Some(t) = msg.get("content").and_then(Value::as_str).filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": t}));
    }
    for c in msg.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
        let args = c["function"].get("arguments").and_then(Value::as_str).unwrap_or("{}");
        let input: Value = serde_json::from_str(args).unwrap_or_else(|_| json!({}));
        content.push(json!({"type": "tool_use", "id": c.get("id").cloned().unwrap_or(Value::Null),
            "name": c["function"].get("name").cloned().unwrap_or(Value::Null), "input": input}));
    }
    json!({
        "id": v.get("id").cloned().unwrap_or(json!("msg")),
        "type": "message",
        "role": "assistant",
        "model": v.get("model").cloned().unwrap_or(Value::Null),
        "content": content,
        "stop_reason": stop_reason(choice.get("finish_reason").and_then(Value::as_str)),
        "stop_sequence": null,
        "usage": usage(v.get("usage")),
    })
}

/// An OpenAI error answer in Anthropic's error shape.
pub fn error(v: &Value) -> Value {
    let e = v.get("error");
    let message = e.and_then(|e| e.get("message")).and_then(Value::as_str).unwrap_or("provider error");
    let kind = e.and_then(|e| e.get("type")).and_then(Value::as_str).unwrap_or("api_error");
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// Translates chat completion chunks into Anthropic's stream events as they arrive.
#[derive(Default)]
pub struct Stream {
    started: bool,
    /// The open content block: its index and whether it is text (else a tool use).
    open: Option<(usize, bool)>,
    blocks: usize,
    /// Anthropic block index of each OpenAI tool call index.
    tools: Vec<(u64, usize)>,
    stop: Option<&'static str>,
    usage: Option<Value>,
    done: bool,
}

fn event(out: &mut Vec<u8>, name: &str, v: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    let _ = serde_json::to_writer(&mut *out, v);
    out.extend_from_slice(b"\n\n");
}

impl Stream {
    /// One chunk (or `[DONE]`); appends the events it becomes to `out`.
    pub fn event(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if data == b"[DONE]" {
            return self.end(out);
        }
        let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
        if v.get("error").is_some() {
            event(out, "error", &error(&v));
            self.done = true;
            return;
        }
        if !self.started {
            self.started = true;
            let message = json!({"id": v.get("id").cloned().unwrap_or(json!("msg")), "type": "message", "role": "assistant",
                "model": v.get("model").cloned().unwrap_or(Value::Null), "content": [], "stop_reason": null,
                "stop_sequence": null, "usage": {"input_tokens": 0, "output_tokens": 0}});
            event(out, "message_start", &json!({"type": "message_start", "message": message}));
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(usage(Some(u)));
        }
        let Some(choice) = v.get("choices").and_then(|c| c.get(0)) else { return };
        let delta = &choice["delta"];
        if let Some(text) = delta.get("content").and_then(Value::as_str).filter(|t| !t.is_empty()) {
            if !matches!(self.open, Some((_, true))) {
                self.close(out);
                let index = self.open_block(true);
                event(
                    out,
                    "content_block_start",
                    &json!({"type": "content_block_start", "index": index,
                    "content_block": {"type": "text", "text": ""}}),
                );
            }
            let index = self.open.map_or(0, |(i, _)| i);
            event(
                out,
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "text_delta", "text": text}}),
            );
        }
        for tc in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            let ti = tc.get("index").and_then(Value::as_u64).unwrap_or(0);
            let index = match self.tools.iter().find(|(t, _)| *t == ti) {
                Some(&(_, b)) => b,
                None => {
                    self.close(out);
                    let b = self.open_block(false);
                    self.tools.push((ti, b));
                    event(
                        out,
                        "content_block_start",
                        &json!({"type": "content_block_start", "index": b,
                        "content_block": {"type": "tool_use", "id": tc.get("id").cloned().unwrap_or(Value::Null),
                            "name": tc["function"].get("name").cloned().unwrap_or(Value::Null), "input": {}}}),
                    );
                    b
                }
            };
            if let Some(args) = tc["function"].get("arguments").and_then(Value::as_str).filter(|a| !a.is_empty()) {
                event(
                    out,
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": args}}),
                );
            }
        }
        if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
            self.stop = Some(stop_reason(Some(f)));
        }
    }

    fn open_block(&mut self, text: bool) -> usize {
        let i = self.blocks;
        self.blocks += 1;
        self.open = Some((i, text));
        i
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if let Some((i, _)) = self.open.take() {
            event(out, "content_block_stop", &json!({"type": "content_block_stop", "index": i}));
        }
    }

    /// The end: the open block closed, `message_delta` with the stop reason and usage, then
    /// `message_stop`, once.
    pub fn end(&mut self, out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        self.done = true;
        if !self.started {
            return;
        }
        self.close(out);
        let usage = self.usage.take().unwrap_or_else(|| json!({"output_tokens": 0}));
        event(
            out,
            "message_delta",
            &json!({"type": "message_delta",
            "delta": {"stop_reason": self.stop.unwrap_or("end_turn"), "stop_sequence": null}, "usage": usage}),
        );
        event(out, "message_stop", &json!({"type": "message_stop"}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_messages_request_becomes_a_chat_request() {
        let req = json!({
            "model": "openai/gpt-4o-mini", "max_tokens": 100, "system": "Be brief.", "stream": true,
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                    {"type": "text", "text": "And tomorrow?"}]}
            ],
            "tools": [{"name": "weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "stop_sequences": ["END"], "metadata": {"user_id": "u1"}, "top_k": 5
        });
        let out =
            request(req.as_object().unwrap_or_else(|| unreachable!()), "gpt-4o-mini").unwrap_or_else(|e| panic!("{e}"));
        let m = out["messages"].as_array().unwrap_or_else(|| unreachable!());
        assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(m[2]["tool_calls"][0]["function"]["arguments"], "{\"city\":\"Paris\"}");
        assert_eq!(m[3], json!({"role": "tool", "tool_call_id": "toolu_1", "content": "18C"}));
        assert_eq!(m[4]["content"][0]["text"], "And tomorrow?");
        assert_eq!(out["tool_choice"], "required");
        assert_eq!(out["parallel_tool_calls"], false);
        assert_eq!(out["stream_options"]["include_usage"], true);
        assert_eq!((out["stop"].clone(), out["user"].clone()), (json!(["END"]), json!("u1")));
        assert!(out.get("top_k").is_none());
    }

    #[test]
    fn chunks_become_anthropic_events() {
        let mut s = Stream::default();
        let mut out = Vec::new();
        for c in [
            r#"{"id":"c1","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"id":"c1","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
            r#"{"id":"c1","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","function":{"name":"f","arguments":"{\"a\""}}]}}]}"#,
            r#"{"id":"c1","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]}}]}"#,
            r#"{"id":"c1","model":"gpt-4o-mini","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"id":"c1","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4}}"#,
            "[DONE]",
        ] {
            s.event(c.as_bytes(), &mut out);
        }
        let text = String::from_utf8(out).unwrap_or_default();
        let names: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert!(text.contains("\"stop_reason\":\"tool_use\"") && text.contains("\"input_tokens\":9"), "{text}");
    }
}
