//! Reading an OpenAI chat completions request, for the translators that write it in another
//! provider's format: the parts of a message, its tool calls, the tools, `tool_choice`, `stop`,
//! `max_tokens`. Each error names the field.

use serde_json::{json, Map, Value};

/// A part of a message's content.
pub enum Part<'a> {
    /// Text.
    Text(&'a str),
    /// An image given inline (a `data:` URL).
    InlineImage {
        /// Its media type.
        mime: &'a str,
        /// Its base64 data.
        data: &'a str,
    },
    /// An image at an https URL.
    ImageUrl(&'a str),
}

/// The content of message `i` (a string, or an array of text and image parts).
pub fn content(content: Option<&Value>, i: usize) -> Result<Vec<Part<'_>>, String> {
    match content {
        Some(Value::String(s)) => Ok(vec![Part::Text(s)]),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(j, p)| match p.get("type").and_then(Value::as_str) {
                Some("text") => Ok(Part::Text(p.get("text").and_then(Value::as_str).unwrap_or(""))),
                Some("image_url") => {
                    let url = p
                        .get("image_url")
                        .and_then(|u| u.get("url").or(Some(u)))
                        .and_then(Value::as_str)
                        .ok_or_else(|| format!("messages[{i}].content[{j}].image_url.url is missing"))?;
                    if let Some((mime, data)) = super::data_url(url) {
                        Ok(Part::InlineImage { mime, data })
                    } else if url.starts_with("https://") {
                        Ok(Part::ImageUrl(url))
                    } else {
                        Err(format!(
                            "messages[{i}].content[{j}].image_url: expected a data: URL with base64 data or an https URL"
                        ))
                    }
                }
                other => Err(format!("messages[{i}].content[{j}].type: {other:?} is not translated (text, image_url)")),
            })
            .collect(),
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(_) => Err(format!("messages[{i}].content must be a string or an array of parts")),
    }
}

/// The text of message `i`'s content (its text parts joined).
pub fn text(c: Option<&Value>, i: usize) -> Result<String, String> {
    Ok(content(c, i)?
        .iter()
        .filter_map(|p| match p {
            Part::Text(t) => Some(*t),
            _ => None,
        })
        .collect())
}

/// One tool call of an assistant message.
pub struct Call<'a> {
    /// Its id.
    pub id: Option<&'a str>,
    /// The function's name.
    pub name: &'a str,
    /// Its arguments, parsed.
    pub args: Value,
}

/// The tool calls of assistant message `i`.
pub fn tool_calls(m: &Value, i: usize) -> Result<Vec<Call<'_>>, String> {
    let Some(calls) = m.get("tool_calls").and_then(Value::as_array) else { return Ok(Vec::new()) };
    calls
        .iter()
        .enumerate()
        .map(|(j, c)| {
            let f = c.get("function").ok_or_else(|| format!("messages[{i}].tool_calls[{j}].function is missing"))?;
            let args = f.get("arguments").and_then(Value::as_str).unwrap_or("{}");
            let args = serde_json::from_str(if args.trim().is_empty() { "{}" } else { args })
                .map_err(|_| format!("messages[{i}].tool_calls[{j}].function.arguments is not JSON"))?;
            Ok(Call {
                id: c.get("id").and_then(Value::as_str),
                name: f.get("name").and_then(Value::as_str).unwrap_or(""),
                args,
            })
        })
        .collect()
}

/// A function the model may call.
pub struct Tool<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its description.
    pub description: Option<&'a Value>,
    /// The JSON schema of its arguments.
    pub parameters: Option<&'a Value>,
}

/// The request's tools (function tools only).
pub fn tools(req: &Map<String, Value>) -> Result<Vec<Tool<'_>>, String> {
    let Some(tools) = req.get("tools").and_then(Value::as_array) else { return Ok(Vec::new()) };
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let f = t.get("function").ok_or_else(|| format!("tools[{i}]: only function tools are translated"))?;
            let name =
                f.get("name").and_then(Value::as_str).ok_or_else(|| format!("tools[{i}].function.name is missing"))?;
            Ok(Tool { name, description: f.get("description"), parameters: f.get("parameters") })
        })
        .collect()
}

/// `tool_choice`.
pub enum ToolChoice<'a> {
    /// The model decides.
    Auto,
    /// The model must call a tool.
    Required,
    /// The model must not call a tool.
    None,
    /// The model must call this function.
    Function(&'a str),
}

/// The request's `tool_choice`, if any.
pub fn tool_choice(req: &Map<String, Value>) -> Result<Option<ToolChoice<'_>>, String> {
    Ok(match req.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            "none" => ToolChoice::None,
            other => return Err(format!("tool_choice: {other:?} is not auto, required or none")),
        }),
        Some(v) => Some(ToolChoice::Function(
            v.get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or("tool_choice: expected {\"type\":\"function\",\"function\":{\"name\":...}}")?,
        )),
    })
}

/// `stop` as a list of sequences, if it has any.
pub fn stop(req: &Map<String, Value>) -> Option<Value> {
    match req.get("stop") {
        Some(Value::String(s)) => Some(json!([s])),
        Some(Value::Array(a)) if !a.is_empty() => Some(Value::Array(a.clone())),
        _ => None,
    }
}

/// `max_completion_tokens`, else `max_tokens`.
pub fn max_tokens(req: &Map<String, Value>) -> Option<u64> {
    req.get("max_completion_tokens").or_else(|| req.get("max_tokens")).and_then(Value::as_u64)
}

/// Refuses `n` other than 1.
pub fn one_choice(req: &Map<String, Value>) -> Result<(), String> {
    match req.get("n").and_then(Value::as_u64) {
        Some(n) if n != 1 => Err("n: one choice is translated; n must be 1".into()),
        _ => Ok(()),
    }
}

/// Appends a turn (`key` holding its list: `content` or `parts`), merging it into the previous
/// one of the same role: the other providers want the roles to alternate, OpenAI allows several
/// tool results or user messages in a row.
pub fn push_turn(turns: &mut Vec<Value>, key: &str, role: &str, items: Vec<Value>) {
    if let Some(last) = turns.last_mut() {
        if last["role"] == role {
            if let Some(list) = last[key].as_array_mut() {
                list.extend(items);
                return;
            }
        }
    }
    let mut turn = Map::new();
    turn.insert("role".into(), json!(role));
    turn.insert(key.into(), Value::Array(items));
    turns.push(Value::Object(turn));
}
