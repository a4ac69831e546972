//! Cache rules, insight and purges by filter, end to end on every cache store (memory, disk,
//! Redis): through real sockets, the admin API and the `aigate` CLI.

use super::*;
use aigate_store::CacheKey;

/// The cache stores a test runs on: `[storage] cache = …` lines (Redis unless skipped).
fn stores() -> Vec<&'static str> {
    let mut s = vec!["memory", "disk"];
    if !skip_redis() {
        s.push("redis://127.0.0.1:6379");
    }
    s
}

/// A gateway of a unique name (Redis is shared by every test and run) with the cache on `store`,
/// the admin API, and `rules` under it.
fn config(store: &str, gw: &str, rules: &str) -> String {
    format!(
        "{ADMIN}[storage]\ncache = \"{store}\"\n[gateways.default]\n[gateways.{gw}]\n[gateways.{gw}.logs]\nbodies = true\n\
         [gateways.{gw}.cache]\nenabled = true\nttl = \"1h\"\n{rules}"
    )
}

const RULES: &str = r#"
[[gateways.GW.cache.rules]]
name = "emb"
match = { endpoint = "embeddings" }
ttl = "30d"
[[gateways.GW.cache.rules]]
match = { model = "gpt-4o" }
enabled = false
[[gateways.GW.cache.rules]]
match = { metadata.feature = "resume" }
ttl = "2h"
"#;

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers().get(name).map(|v| v.to_str().unwrap().to_owned())
}

/// Posts, reads the body; returns (aigate-cache, aigate-cache-rule, aigate-cache-key).
async fn send(env: &Env, path: &str, body: &str, headers: &[(&str, &str)]) -> (String, Option<String>, Option<String>) {
    let r = post(env, path, body, headers).await;
    assert_eq!(r.status(), 200, "{path} {body}");
    let out = (header(&r, "aigate-cache").unwrap(), header(&r, "aigate-cache-rule"), header(&r, "aigate-cache-key"));
    r.bytes().await.unwrap();
    out
}

/// The lifetime the store gave the entry under `key` (hex), once it is written.
async fn stored_ttl(env: &Env, gw: &str, key: &str) -> Duration {
    let key = CacheKey::from_hex(key).unwrap();
    let mut found = None;
    wait_until("the entry to be stored", async || {
        found = env.gw.state.cache.lookup(gw, &key).await;
        found.is_some()
    })
    .await;
    let e = found.unwrap();
    Duration::from_millis(e.expires_at_ms - e.created_at_ms)
}

/// The value of one series of `/metrics` (`name{labels}` as written), 0 when absent.
async fn series(env: &Env, name_and_labels: &str) -> f64 {
    let text = env.http.get(env.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_set_the_ttl_or_bypass_and_name_themselves_on_every_store() {
    for store in stores() {
        let gw = unique_name("rules");
        let env = env_with(&config(store, &gw, &RULES.replace("GW", &gw)), MockConfig::default()).await;
        let chat_path = format!("/{gw}/openai/chat/completions");
        let emb_path = format!("/{gw}/openai/embeddings");
        let emb = format!(r#"{{"model":"text-embedding-3-small","input":"{gw}"}}"#);

        // Embeddings: the first rule, 30 days; the second request is a hit naming the rule too.
        let (status, rule, key) = send(&env, &emb_path, &emb, &[]).await;
        assert_eq!((status.as_str(), rule.as_deref()), ("MISS", Some("emb")), "{store}");
        assert_eq!(stored_ttl(&env, &gw, &key.unwrap()).await, Duration::from_secs(30 * 86_400), "{store}");
        let (status, rule, _) = send(&env, &emb_path, &emb, &[]).await;
        assert_eq!((status.as_str(), rule.as_deref()), ("HIT", Some("emb")), "{store}");

        // gpt-4o: bypassed by rule #2, twice upstream.
        let before = env.mock.requests();
        let four_o = format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{gw}"}}]}}"#);
        for _ in 0..2 {
            let (status, rule, key) = send(&env, &chat_path, &four_o, &[]).await;
            assert_eq!((status.as_str(), rule.as_deref(), key), ("BYPASS", Some("#2"), None), "{store}");
        }
        assert_eq!(env.mock.requests(), before + 2, "{store}");

        // Metadata: rule #3, 2 hours; a request-level TTL header still wins over the rule.
        let mini = format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{gw}"}}]}}"#);
        let md = [("cf-aig-metadata", r#"{"feature":"resume","user":7}"#)];
        let (status, rule, key) = send(&env, &chat_path, &mini, &md).await;
        assert_eq!((status.as_str(), rule.as_deref()), ("MISS", Some("#3")), "{store}");
        assert_eq!(stored_ttl(&env, &gw, &key.unwrap()).await, Duration::from_secs(7200), "{store}");
        let other = mini.replace("gpt-4o-mini", "gpt-4.1-mini");
        let with_ttl = [md[0], ("cf-aig-cache-ttl", "600")];
        let (_, rule, key) = send(&env, &chat_path, &other, &with_ttl).await;
        assert_eq!(rule.as_deref(), Some("#3"), "{store}");
        assert_eq!(stored_ttl(&env, &gw, &key.unwrap()).await, Duration::from_secs(600), "{store}");

        // No rule: the gateway's TTL, and no header.
        let plain = mini.replace("gpt-4o-mini", "gpt-4.1-nano");
        let (status, rule, key) = send(&env, &chat_path, &plain, &[]).await;
        assert_eq!((status.as_str(), rule), ("MISS", None), "{store}");
        assert_eq!(stored_ttl(&env, &gw, &key.unwrap()).await, Duration::from_secs(3600), "{store}");

        // Counted per rule and status, once the records are finalised.
        let bypassed = format!("aigate_cache_rule_requests_total{{gateway=\"{gw}\",rule=\"#2\",status=\"BYPASS\"}}");
        let hits = format!("aigate_cache_rule_requests_total{{gateway=\"{gw}\",rule=\"emb\",status=\"HIT\"}}");
        wait_until("per-rule counters", async || {
            series(&env, &bypassed).await == 2.0 && series(&env, &hits).await == 1.0
        })
        .await;
    }
}

#[test]
fn check_prints_the_rules_and_refuses_a_bad_one() {
    let dir = temp_dir("rules-check");
    let path = dir.join("aigate.toml");
    let run = |toml: &str| {
        std::fs::write(&path, toml).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_aigate"))
            .args(["check", "--config", path.to_str().unwrap()])
            .env_remove("AIGATE_CONFIG")
            .output()
            .unwrap()
    };
    let good = format!(
        "default_gateway = \"prod\"\n[gateways.prod]\n[gateways.prod.cache]\nenabled = true\n{}",
        RULES.replace("GW", "prod")
    );
    let out = run(&good);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for needle in [
        "cache rule emb: match { endpoint = \"embeddings\" } -> ttl = \"30days\"",
        "cache rule #2: match { model = \"gpt-4o\" } -> enabled = false",
        "cache rule #3: match { metadata.feature = \"resume\" } -> ttl = \"2h\"",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in {text}");
    }
    let bad = good.replace("ttl = \"2h\"", "ttl = \"2 fortnights\"");
    let out = run(&bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("gateways.prod.cache.rules[2] (#3): ttl"), "{err}");
    let bad = good.replace("match = { endpoint", "match = { endpont");
    let err = String::from_utf8_lossy(&run(&bad).stderr).to_string();
    assert!(err.contains("gateways.prod.cache.rules[0] (emb): match: unknown key \"endpont\""), "{err}");
}

/// A chat request for `model`, unique to `tag`.
fn chat(model: &str, tag: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"question {tag}"}}]}}"#)
}

/// Sends a request that must miss and waits until its entry is written.
async fn fill(env: &Env, path: &str, body: &str, headers: &[(&str, &str)]) {
    let writes = cache_writes(env);
    let (status, _, _) = send(env, path, body, headers).await;
    assert_eq!(status, "MISS", "{path} {body}");
    cache_written(env, writes + 1).await;
}

/// `DELETE /admin/gateways/{gw}/cache?{query}`: (status, body).
async fn purge(env: &Env, gw: &str, query: &str) -> (u16, serde_json::Value) {
    let r = env
        .http
        .delete(env.url(&format!("/admin/gateways/{gw}/cache?{query}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// Runs `aigate` with `args` against the gateway of `env`.
async fn cli(env: &Env, args: &[&str]) -> std::process::Output {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.extend(["--url".into(), format!("http://{}", env.gw.addr), "--token".into(), ADMIN_TOKEN.into()]);
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_aigate"))
            .args(&all)
            .env_remove("AIGATE_CONFIG")
            .env_remove("AIGATE_ADMIN_TOKEN")
            .current_dir(temp_dir("cli"))
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_filter_on_every_store() {
    for store in stores() {
        let gw = unique_name("purge");
        let env = env_with(&config(store, &gw, ""), MockConfig::default()).await;
        let (chat_path, emb_path) = (format!("/{gw}/openai/chat/completions"), format!("/{gw}/openai/embeddings"));
        let (a, b) = (chat("gpt-4o-mini", &gw), chat("gpt-4.1-mini", &gw));
        let emb = format!(r#"{{"model":"text-embedding-3-small","input":"{gw}"}}"#);
        let resume = [("cf-aig-metadata", r#"{"feature":"resume"}"#)];
        let other = [("cf-aig-metadata", r#"{"feature":"chat","n":3}"#)];
        fill(&env, &chat_path, &a, &resume).await;
        fill(&env, &chat_path, &b, &other).await;
        fill(&env, &emb_path, &emb, &[]).await;

        let (s, v) = purge(&env, &gw, "model=gpt-4o-mini").await;
        assert_eq!((s, &v["purged"]), (200, &1.into()), "{store}: {v}");
        assert_eq!(send(&env, &chat_path, &b, &other).await.0, "HIT", "{store}");
        assert_eq!(send(&env, &emb_path, &emb, &[]).await.0, "HIT", "{store}");
        fill(&env, &chat_path, &a, &resume).await;

        // Metadata: strings as they are, numbers as JSON text; every condition must hold.
        assert_eq!(purge(&env, &gw, "metadata.feature=chat&metadata.n=4").await.1["purged"], 0, "{store}");
        assert_eq!(purge(&env, &gw, "metadata.feature=chat&metadata.n=3").await.1["purged"], 1, "{store}");
        assert_eq!(send(&env, &chat_path, &a, &resume).await.0, "HIT", "{store}");

        // Age: nothing is older than an hour, until the clock moves on (the entries live 1h, so
        // the TTL is moved past by less).
        assert_eq!(purge(&env, &gw, "endpoint=embeddings&older_than=10m").await.1["purged"], 0, "{store}");
        env.gw.state.clock.advance(Duration::from_secs(20 * 60));
        let (s, v) = purge(&env, &gw, "endpoint=embeddings&older_than=10m").await;
        assert_eq!((s, &v["purged"]), (200, &1.into()), "{store}: {v}");
        assert_eq!(send(&env, &chat_path, &a, &resume).await.0, "HIT", "{store}");

        // The CLI, with the same filters.
        let out =
            cli(&env, &["cache", "purge", "--gateway", &gw, "--metadata", "feature=resume", "--endpoint", "chat"])
                .await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{store}: {text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("purged 1 entry"), "{store}: {text}");
        assert_eq!(send(&env, &chat_path, &a, &resume).await.0, "MISS", "{store}");

        // Bad filters: 400 in OpenAI's shape, naming the parameter.
        for (q, needle) in [
            ("endpoint=chats", "endpoint"),
            ("older_than=soon", "older_than"),
            ("modle=x", "modle"),
            (&format!("key={}&model=x", "ab".repeat(32)), "filter"),
        ] {
            let r = env
                .http
                .delete(env.url(&format!("/admin/gateways/{gw}/cache?{q}")))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{q}");
            let v = error_body(r).await;
            assert!(v["error"]["message"].as_str().unwrap().contains(needle), "{q}: {v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_filter_reaches_every_replica_on_redis() {
    if skip_redis() {
        return;
    }
    let gw = unique_name("replica");
    let extra = config("redis://127.0.0.1:6379", &gw, "");
    let (a, b) = (env_with(&extra, MockConfig::default()).await, env_with(&extra, MockConfig::default()).await);
    let path = format!("/{gw}/openai/chat/completions");
    let body = chat("gpt-4o-mini", &gw);
    fill(&a, &path, &body, &[]).await;
    // Replica B copies the entry into its memory tier.
    assert_eq!(send(&b, &path, &body, &[]).await.0, "HIT");
    assert!(b
        .gw
        .state
        .cache
        .store
        .memory_get(&CacheKey::from_hex(&send(&b, &path, &body, &[]).await.2.unwrap()).unwrap())
        .is_some());
    let (s, v) = purge(&a, &gw, "model=gpt-4o-mini").await;
    assert_eq!((s, &v["purged"]), (200, &1.into()), "{v}");
    assert_eq!(send(&b, &path, &body, &[]).await.0, "MISS", "replica B still served its memory copy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_what_repeats_with_totals_and_expired_misses() {
    for store in stores() {
        let gw = unique_name("top");
        let env = env_with(&config(store, &gw, ""), MockConfig::default()).await;
        let path = format!("/{gw}/openai/chat/completions");
        let (x, y) = (chat("gpt-4o-mini", &format!("x {gw}")), chat("gpt-4o-mini", &format!("y {gw}")));
        fill(&env, &path, &x, &[("cf-aig-metadata", r#"{"feature":"resume"}"#)]).await;
        for _ in 0..2 {
            assert_eq!(send(&env, &path, &x, &[]).await.0, "HIT", "{store}");
        }
        fill(&env, &path, &y, &[]).await;
        let top_path = format!("/admin/gateways/{gw}/cache/top?since=1h&limit=10");
        let mut top = serde_json::Value::Null;
        wait_until("the cache index to count 4 lookups", async || {
            top = admin_get(&env, &top_path).await;
            top["totals"]["hits"] == 2 && top["totals"]["misses"] == 2
        })
        .await;
        let first = &top["entries"][0];
        assert_eq!((&first["hits"], &first["misses"]), (&2.into(), &1.into()), "{store}: {top:#}");
        assert_eq!(first["preview"], format!("question x {gw}"), "{store}");
        assert_eq!((&first["model"], &first["endpoint"]), (&"gpt-4o-mini".into(), &"chat".into()), "{store}");
        assert_eq!(first["metadata"], serde_json::json!([["feature", "resume"]]), "{store}");
        assert!(first["bytes"].as_u64().unwrap() > 0 && first["age_s"].is_u64(), "{store}: {first}");
        assert!(first["log_id"].is_string(), "{store}");
        assert_eq!(top["totals"]["entries"], 2, "{store}");
        assert_eq!(top["totals"]["hit_rate"], 0.5, "{store}");

        // Two hours on, both entries have expired: a miss on one counts as an expired miss.
        env.gw.state.clock.advance(Duration::from_secs(2 * 3600));
        assert_eq!(send(&env, &path, &y, &[]).await.0, "MISS", "{store}");
        wait_until("an expired miss", async || admin_get(&env, &top_path).await["totals"]["expired_misses"] == 1).await;

        // The CLI prints the same.
        let out = cli(&env, &["cache", "top", "--gateway", &gw, "--since", "24h"]).await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            text.contains(&format!("question x {gw}")) && text.contains("would have added 1 hits"),
            "{store}: {text}"
        );

        // Bad queries.
        for q in ["since=forever", "limit=0", "limt=3"] {
            let r = env
                .http
                .get(env.url(&format!("/admin/gateways/{gw}/cache/top?{q}")))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{q}");
            error_body(r).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_from_logs_and_from_a_file_through_the_gateway() {
    let gw = unique_name("warm");
    let env = env_with(&config("memory", &gw, ""), MockConfig::default()).await;
    let path = format!("/{gw}/openai/chat/completions");
    let (x, y) = (chat("gpt-4o-mini", &format!("x {gw}")), chat("gpt-4o-mini", &format!("y {gw}")));
    let md = [("cf-aig-metadata", r#"{"feature":"resume"}"#)];
    fill(&env, &path, &x, &md).await;
    assert_eq!(send(&env, &path, &x, &md).await.0, "HIT");
    fill(&env, &path, &y, &[]).await;
    wait_until("the index to count 3 lookups", async || {
        admin_get(&env, &format!("/admin/gateways/{gw}/cache/top")).await["totals"]["misses"] == 2
    })
    .await;
    assert_eq!(purge(&env, &gw, "").await.1["purged"], 2);

    // Dry run: what would be sent, most repeated first, with the cost priced when it was logged.
    let upstream = env.mock.requests();
    let out = cli(&env, &["cache", "warm", "--gateway", &gw, "--from-logs", "--since", "1h", "--dry-run"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with(&format!("POST {path}  $")) && lines[0].contains(&format!("question x {gw}")),
        "{text}"
    );
    assert!(lines[2].starts_with("would send 2 requests, estimated cost $"), "{text}");
    assert_eq!(env.mock.requests(), upstream, "a dry run sends nothing");

    // The real run fills the cache (with the logged metadata, so rules would match the same).
    let out = cli(&env, &["cache", "warm", "--gateway", &gw, "--from-logs", "--top", "5"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("2 sent upstream, 0 already cached"), "{text}");
    assert_eq!(env.mock.requests(), upstream + 2);
    assert_eq!(env.mock.last_request().unwrap().headers.get("cf-aig-metadata"), None, "gateway headers stay here");
    cache_written(&env, cache_writes(&env)).await;
    wait_until("the warmed entries", async || send(&env, &path, &x, &md).await.0 == "HIT").await;

    // A file: a path under the gateway, a body, headers; then a failing line stops the run.
    let file = temp_dir("warm").join("requests.jsonl");
    let z = chat("gpt-4o-mini", &format!("z {gw}"));
    std::fs::write(
        &file,
        format!(
            "{{\"path\": \"openai/chat/completions\", \"body\": {z}}}\n\n\
             {{\"path\": \"nosuch/chat/completions\", \"body\": {z}}}\n\
             {{\"path\": \"openai/chat/completions\", \"body\": {x}}}\n"
        ),
    )
    .unwrap();
    let out = cli(&env, &["cache", "warm", "--gateway", &gw, "--file", file.to_str().unwrap()]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("stopped at request 2 of 3") && err.contains("400"), "{err}");
    wait_until("the file's entry", async || send(&env, &path, &z, &[]).await.0 == "HIT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_from_logs_says_when_bodies_are_not_logged() {
    let gw = unique_name("warmnb");
    let toml = format!("{ADMIN}[gateways.default]\n[gateways.{gw}]\n[gateways.{gw}.cache]\nenabled = true\n");
    let env = env_with(&toml, MockConfig::default()).await;
    fill(&env, &format!("/{gw}/openai/chat/completions"), &chat("gpt-4o-mini", &gw), &[]).await;
    wait_until("the index", async || {
        admin_get(&env, &format!("/admin/gateways/{gw}/cache/top")).await["totals"]["misses"] == 1
    })
    .await;
    let out = cli(&env, &["cache", "warm", "--gateway", &gw, "--from-logs", "--dry-run"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("[gateways.{gw}.logs] bodies = true")), "{err}");
}
