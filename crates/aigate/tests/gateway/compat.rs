//! One OpenAI-format API for every provider: `provider/model` through the compat entry points,
//! translated to Anthropic's format and back, or passed to an OpenAI-compatible provider with the
//! prefix removed.

use super::*;

const CLAUDE: &str = r#"{"model":"anthropic/claude-sonnet-4-5","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"hi"}]}"#;

fn compat_env_toml() -> String {
    format!("{ADMIN}[gateways.default]\n[gateways.default.cache]\nenabled = true\n[gateways.prod]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_entry_point_reaches_anthropic_in_its_own_format() {
    let env = env_with(&compat_env_toml(), MockConfig::default()).await;
    for (path, headers) in [
        ("/v1/chat/completions", vec![]),
        ("/v1/acct/default/compat/chat/completions", vec![]),
        ("/default/compat/chat/completions", vec![]),
        ("/client/v4/accounts/acct/ai/v1/chat/completions", vec![("cf-aig-gateway-id", "prod")]),
    ] {
        let mut h = vec![("authorization", "Bearer sk-ant-client")];
        h.extend(headers);
        let body = CLAUDE.replace("hi", path); // a distinct request each time: no cache hits
        let r = post(&env, path, &body, &h).await;
        assert_eq!(r.status(), 200, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion", "{path}: {v}");
        assert_eq!(v["model"], "claude-sonnet-4-5");
        assert_eq!(v["choices"][0]["message"]["content"], "Hello! This is the aigate mock upstream. How can I help?");
        assert_eq!(v["usage"]["prompt_tokens"], 12);
        let sent = env.mock.last_request().unwrap();
        assert_eq!(sent.path_and_query, "/v1/messages", "{path}");
        assert_eq!(sent.headers["x-api-key"], "sk-ant-client", "the client's key in Anthropic's header");
        assert!(sent.headers.get("authorization").is_none());
        assert_eq!(sent.headers["anthropic-version"], "2023-06-01");
        let b: serde_json::Value = serde_json::from_slice(&sent.body).unwrap();
        assert_eq!(b["model"], "claude-sonnet-4-5");
        assert_eq!(b["system"], serde_json::json!([{"type": "text", "text": "Be brief."}]));
        assert_eq!(b["max_tokens"], 1024, "Anthropic needs max_tokens: the configured default");
    }
    // The REST layout's gateway came from cf-aig-gateway-id.
    let recs = records(&env, "prod", 1).await;
    assert_eq!(recs[0]["provider"], "anthropic");
    assert_eq!(recs[0]["served_model"], "claude-sonnet-4-5");
    assert_eq!(recs[0]["requested_model"], "anthropic/claude-sonnet-4-5");
    assert_eq!(recs[0]["path"], "compat/chat/completions", "the record says the request was translated");
    let recs = records(&env, "default", 3).await;
    assert!(
        recs.iter().all(|r| r["provider"] == "anthropic" && r["tokens_in"] == 12 && r["tokens_out"] == 14),
        "{recs:#?}"
    );
    assert!(recs.iter().all(|r| r["cost_usd"].as_f64().unwrap() > 0.0), "priced as the provider's model: {recs:#?}");
    // A model without a provider prefix on /v1/chat/completions still goes to OpenAI, untouched.
    assert_eq!(post(&env, "/v1/chat/completions", CHAT, &[]).await.status(), 200);
    assert_eq!(env.mock.last_request().unwrap().path_and_query, "/v1/chat/completions");
    assert_eq!(env.mock.last_request().unwrap().body, CHAT.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_translated_as_it_arrives_and_cached_translated() {
    let env = env_with(&compat_env_toml(), MockConfig::default()).await;
    let body = r#"{"model":"anthropic/claude-sonnet-4-5","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let read = async |r: reqwest::Response| {
        assert_eq!(r.headers()["content-type"], "text/event-stream; charset=utf-8");
        let status = r.headers()["cf-aig-cache-status"].to_str().unwrap().to_owned();
        (status, r.text().await.unwrap())
    };
    let (status, text) = read(post(&env, "/v1/chat/completions", body, &[]).await).await;
    assert_eq!(status, "MISS");
    let chunks: Vec<serde_json::Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, "Hello! This is the aigate mock upstream"); // the mock's 8 chunks
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
    assert!(chunks.iter().all(|c| !c["choices"].as_array().unwrap().is_empty()), "no usage chunk unless asked: {text}");
    cache_written(&env, 1).await;
    let (status, again) = read(post(&env, "/v1/chat/completions", body, &[]).await).await;
    assert_eq!(status, "HIT");
    assert_eq!(again, text.replace("\r", ""), "the hit replays the translated stream");
    assert_eq!(env.mock.requests(), 1);
    // The meter saw the usage the client did not.
    let recs = records(&env, "default", 2).await;
    assert!(recs.iter().all(|r| r["tokens_in"] == 12 && r["tokens_out"] == 8), "{recs:#?}");

    let with_usage = body.replace("\"stream\":true", "\"stream\":true,\"stream_options\":{\"include_usage\":true}");
    let (_, text) = read(post(&env, "/v1/chat/completions", &with_usage, &[]).await).await;
    let last = text.split("\n\n").filter(|e| e.starts_with("data: {")).last().unwrap();
    let usage: serde_json::Value = serde_json::from_str(&last[6..]).unwrap();
    assert_eq!(usage["choices"], serde_json::json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_errors_and_what_cannot_be_translated() {
    let env = env_with(
        &format!("{}[gateways.default.provider_keys]\nanthropic = \"env:STORED_KEY\"\n", compat_env_toml()),
        MockConfig::default(),
    )
    .await;
    let tools = r#"{"model":"anthropic/claude-sonnet-4-5","messages":[{"role":"user","content":"Weather in Paris?"}],
        "tools":[{"type":"function","function":{"name":"weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}],
        "tool_choice":"auto"}"#;
    let r = post(&env, "/default/compat/chat/completions", tools, &[]).await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "weather");
    let args: serde_json::Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args["city"], "Paris");
    let sent = env.mock.last_request().unwrap();
    assert_eq!(sent.headers["x-api-key"], STORED_KEY, "the gateway's stored key");
    let b: serde_json::Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(b["tools"][0]["input_schema"]["properties"]["city"]["type"], "string");
    assert_eq!(b["tool_choice"], serde_json::json!({"type": "auto"}));

    // The provider's error, in OpenAI's shape with its status.
    let r = post(&env, "/default/compat/chat/completions", CLAUDE, &[("x-mock-status", "529")]).await;
    assert_eq!(r.status(), 529);
    let v = error_body(r).await;
    assert_eq!(v["error"]["message"], "mock failure with status 529");
    assert_eq!(v["error"]["type"], "api_error");

    // What cannot be translated: a 400 naming the field, nothing sent.
    let before = env.mock.requests();
    for (body, field) in [
        (CLAUDE.replace("\"messages\"", "\"n\":3,\"messages\""), "n:"),
        (CLAUDE.replace("anthropic/", ""), "model:"),
        (CLAUDE.replace("anthropic/", "nosuch/"), "model:"),
        ("not json".to_owned(), "the body"),
    ] {
        let r = post(&env, "/default/compat/chat/completions", &body, &[]).await;
        assert_eq!(r.status(), 400, "{body}");
        let msg = error_body(r).await["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.starts_with(field), "{msg}");
    }
    let r = env.http.get(env.url("/default/compat/models")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(env.mock.requests(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_compatible_provider_gets_the_model_without_its_prefix() {
    let mock = aigate_testkit::MockUpstream::start(MockConfig::default()).await.unwrap();
    let env =
        env_with(&format!("{ADMIN}[providers.groq]\nbase_url = \"{}/v1\"\n", mock.url()), MockConfig::default()).await;
    let body = r#"{"model":"groq/llama-3.3-70b-versatile","messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(&env, "/v1/chat/completions", body, &[("authorization", "Bearer gsk-client")]).await;
    assert_eq!(r.status(), 200);
    let sent = mock.last_request().unwrap();
    assert_eq!(sent.path_and_query, "/v1/chat/completions");
    assert_eq!(sent.headers["authorization"], "Bearer gsk-client");
    let b: serde_json::Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(b["model"], "llama-3.3-70b-versatile");
    assert_eq!(env.mock.requests(), 0, "nothing went to OpenAI");
    let recs = records(&env, "default", 1).await;
    assert_eq!(recs[0]["provider"], "groq");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_is_reached_in_its_own_format() {
    let mock = aigate_testkit::MockUpstream::start(MockConfig::default()).await.unwrap();
    let env = env_with(
        &format!("{ADMIN}[providers.google-ai-studio]\nbase_url = \"{}\"\n", mock.url()),
        MockConfig::default(),
    )
    .await;
    let body = r#"{"model":"google-ai-studio/gemini-2.5-flash","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"hi"}],"max_tokens":50}"#;
    let r = post(&env, "/default/compat/chat/completions", body, &[("authorization", "Bearer goog-client")]).await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello! This is the aigate mock upstream. How can I help?");
    assert_eq!(v["model"], "gemini-2.5-flash");
    assert_eq!(v["usage"]["prompt_tokens"], 11);
    let sent = mock.last_request().unwrap();
    assert_eq!(sent.path_and_query, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(sent.headers["x-goog-api-key"], "goog-client");
    assert!(sent.headers.get("authorization").is_none());
    let b: serde_json::Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(b["systemInstruction"]["parts"][0]["text"], "Be brief.");
    assert_eq!(b["generationConfig"]["maxOutputTokens"], 50);

    // Streamed, with a tool call.
    let body = r#"{"model":"google-ai-studio/gemini-2.5-flash","stream":true,"stream_options":{"include_usage":true},
        "messages":[{"role":"user","content":"Weather?"}],
        "tools":[{"type":"function","function":{"name":"weather","parameters":{"type":"object"}}}]}"#;
    let r = post(&env, "/default/compat/chat/completions", body, &[]).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert_eq!(
        mock.last_request().unwrap().path_and_query,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    );
    assert!(text.contains("\"name\":\"weather\"") && text.contains("\"finish_reason\":\"tool_calls\""), "{text}");
    assert!(text.contains("\"prompt_tokens\":30") && text.ends_with("data: [DONE]\n\n"), "{text}");

    // An error in Google's shape comes back in OpenAI's.
    let r = post(
        &env,
        "/default/compat/chat/completions",
        &body.replace("\"stream\":true,", ""),
        &[("x-mock-status", "503")],
    )
    .await;
    assert_eq!(r.status(), 503);
    assert_eq!(error_body(r).await["error"]["code"], "UNAVAILABLE");
    let recs = records(&env, "default", 3).await;
    assert!(recs.iter().all(|r| r["provider"] == "google-ai-studio"), "{recs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropics_format_reaches_openai_format_providers() {
    let env = env_with(&compat_env_toml(), MockConfig::default()).await;
    let body = r#"{"model":"openai/gpt-4o-mini","max_tokens":100,"system":"Be brief.",
        "messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#;
    for (path, h) in [
        ("/default/compat/v1/messages", vec![]),
        ("/client/v4/accounts/acct/ai/v1/messages", vec![("cf-aig-gateway-id", "default")]),
    ] {
        let mut headers = vec![("x-api-key", "sk-openai-client"), ("anthropic-version", "2023-06-01")];
        headers.extend(h);
        let r = post(&env, path, body.replace("hi", path), &headers).await;
        assert_eq!(r.status(), 200, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["type"], "message", "{v}");
        assert_eq!(v["content"][0]["text"], "Hello! This is the aigate mock upstream. How can I help?");
        assert_eq!(v["stop_reason"], "end_turn");
        assert_eq!(v["usage"]["input_tokens"], 19);
        let sent = env.mock.last_request().unwrap();
        assert_eq!(sent.path_and_query, "/v1/chat/completions");
        assert_eq!(sent.headers["authorization"], "Bearer sk-openai-client", "{path}");
        let b: serde_json::Value = serde_json::from_slice(&sent.body).unwrap();
        assert_eq!(b["messages"][0], serde_json::json!({"role": "system", "content": "Be brief."}));
        assert_eq!(b["model"], "gpt-4o-mini");
    }

    // Streamed: Anthropic's events, with the usage the meter reads.
    let stream = body.replace("\"max_tokens\":100", "\"max_tokens\":100,\"stream\":true");
    let r = post(&env, "/default/compat/v1/messages", &stream, &[("x-api-key", "sk-openai-client")]).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let names: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(&names[names.len() - 2..], ["message_delta", "message_stop"], "{text}");
    assert!(text.contains("\"text_delta\"") && text.contains("\"output_tokens\":8"), "{text}");
    let b: serde_json::Value = serde_json::from_slice(&env.mock.last_request().unwrap().body).unwrap();
    assert_eq!(b["stream_options"]["include_usage"], true);
    let recs = records(&env, "default", 3).await;
    assert!(recs.iter().all(|r| r["provider"] == "openai" && r["tokens_in"] == 19), "{recs:#?}");

    // To Anthropic itself the request passes in its own format, the prefix removed; the
    // Responses API reaches OpenAI-format providers.
    let r =
        post(&env, "/default/compat/v1/messages", body.replace("openai/gpt-4o-mini", "anthropic/claude-x"), &[]).await;
    assert_eq!(r.status(), 200);
    let sent = env.mock.last_request().unwrap();
    assert_eq!(sent.path_and_query, "/v1/messages");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&sent.body).unwrap()["model"], "claude-x");
    let r = post(&env, "/default/compat/responses", r#"{"model":"openai/gpt-4o-mini","input":"hi"}"#, &[]).await;
    assert_eq!(env.mock.last_request().unwrap().path_and_query, "/v1/responses", "{}", r.status());
    let r = post(&env, "/default/compat/responses", r#"{"model":"anthropic/claude-x","input":"hi"}"#, &[]).await;
    assert_eq!(r.status(), 400);
}
