//! Golden tests of the API for every provider: requests and answers in the shapes the providers
//! document (`tests/golden/*`: an OpenAI request with an image, a tool call and its result;
//! Anthropic's message with a tool use, its stream with a ping and a streamed tool input, its
//! error; Gemini's answer with a function call, its SSE stream, its error), each translated and
//! compared with a reviewed expected output (`tests/golden/expected/*.json`).
//!
//! After a deliberate change, `AIGATE_BLESS=1 cargo test -p aigate-core --test translate_golden`
//! rewrites the expected files, to be read and committed with the change.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use aigate_core::translate::{anthropic, gemini, Format, ResponseTranslator, Translation};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn input(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap()
}

/// Compares `got` with `expected/<name>.json`, or writes it there when blessing.
fn golden(name: &str, got: Value) {
    let path = dir().join("expected").join(format!("{name}.json"));
    if std::env::var_os("AIGATE_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
        return;
    }
    let expected: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(got, expected, "{name}: got\n{}", serde_json::to_string_pretty(&got).unwrap());
}

fn translation(format: Format, stream: bool) -> Translation {
    Translation { anthropic_client: false, format, stream, include_usage: true, model: "gemini-2.5-flash".into() }
}

/// The whole translated answer: a JSON body, or a stream as the list of its events' data.
fn answer(t: &Translation, status: u16, body: &[u8], stream: bool) -> Value {
    let mut r = ResponseTranslator::new(t, http::StatusCode::from_u16(status).unwrap(), stream, 1_767_225_600).unwrap();
    let mut out = Vec::new();
    // Fed in small pieces, as a network delivers it.
    for piece in body.chunks(37) {
        out.extend_from_slice(&r.data(piece));
    }
    out.extend_from_slice(&r.end());
    if !stream {
        return serde_json::from_slice(&out).unwrap();
    }
    let text = String::from_utf8(out).unwrap();
    Value::Array(
        text.split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap_or_else(|_| Value::String(d.to_owned())))
            .collect(),
    )
}

#[test]
fn an_openai_request_to_anthropic_and_gemini() {
    let req: Value = serde_json::from_slice(&input("openai_request.json")).unwrap();
    let req = req.as_object().unwrap();
    golden("anthropic_request", anthropic::request(req, "claude-sonnet-4-5", 1024).unwrap());
    golden("gemini_request", gemini::request(req).unwrap());
}

#[test]
fn anthropic_answers_to_openai() {
    let whole = translation(Format::Anthropic, false);
    golden("openai_from_anthropic_message", answer(&whole, 200, &input("anthropic_message.json"), false));
    golden("openai_from_anthropic_error", answer(&whole, 529, &input("anthropic_error.json"), false));
    let stream = translation(Format::Anthropic, true);
    golden("openai_from_anthropic_stream", answer(&stream, 200, &input("anthropic_stream.txt"), true));
}

#[test]
fn gemini_answers_to_openai() {
    let whole = translation(Format::Gemini, false);
    golden("openai_from_gemini_response", answer(&whole, 200, &input("gemini_response.json"), false));
    golden("openai_from_gemini_error", answer(&whole, 400, &input("gemini_error.json"), false));
    let stream = translation(Format::Gemini, true);
    golden("openai_from_gemini_stream", answer(&stream, 200, &input("gemini_stream.txt"), true));
}
