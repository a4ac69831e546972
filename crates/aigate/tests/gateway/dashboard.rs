//! The dashboard's HTTP surface: login and sessions, CSRF, the data API, settings written to the
//! configuration file. (The pages themselves are driven in a browser by tests/browser.)

use super::*;

/// A client that does not follow redirects, so the tests see them.
fn browser() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// GETs a dashboard API path with a session cookie; asserts 200.
async fn get_json(to: &impl Target, path: &str, cookie: &str) -> serde_json::Value {
    let r = browser().get(to.url(path)).header("cookie", cookie).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

/// Logs in with the admin token; answers the session cookie (`name=value`) and the page's CSRF token.
async fn log_in(to: &impl Target, token: &str) -> (String, String) {
    let http = browser();
    let r =
        http.post(to.url("/dashboard/login")).form(&[("token", token), ("next", "/dashboard")]).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    let cookie = set.split(';').next().unwrap().to_owned();
    let page = http.get(to.url("/dashboard")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    let csrf = html.split("name=\"csrf-token\" content=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    (cookie, csrf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_off_without_an_admin_token() {
    let env = env().await;
    let r = env.http.get(env.url("/dashboard")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v = error_body(r).await;
    assert!(v["error"]["message"].as_str().unwrap().contains("[admin] token"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_guard_every_page_and_change() {
    let env = env_with(&format!("{ADMIN}[gateways.default.logs]\nbodies = true\n"), MockConfig::default()).await;
    let http = browser();

    // Without a session: pages are the login form, data is refused.
    let r = http.get(env.url("/dashboard/gateways/default/logs?model=x")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/dashboard/login?next=%2Fdashboard%2Fgateways%2Fdefault%2Flogs%3Fmodel%3Dx");
    let r = http.get(env.url("/dashboard/api/overview")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(error_body(r).await["error"]["code"], "session_required");
    let login = http.get(env.url("/dashboard/login")).send().await.unwrap();
    assert_eq!(login.status(), 200);
    assert!(login.text().await.unwrap().contains("type=\"password\""));

    // A wrong token, a form from another site, a redirect out of the dashboard.
    let r = http.post(env.url("/dashboard/login")).form(&[("token", "guess")]).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    assert!(r.text().await.unwrap().contains("not the admin token"));
    let r = http
        .post(env.url("/dashboard/login"))
        .header("origin", "http://evil.example")
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(env.url("/dashboard/login"))
        .form(&[("token", ADMIN_TOKEN), ("next", "//evil.example/x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/dashboard");
    let set = r.headers()["set-cookie"].to_str().unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/dashboard", "Max-Age=43200"] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(!set.contains(ADMIN_TOKEN));

    let (cookie, csrf) = log_in(&env, ADMIN_TOKEN).await;
    let page = http.get(env.url("/dashboard/gateways/default")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"), "{csp}");
    assert!(!page.text().await.unwrap().contains(ADMIN_TOKEN));
    let r = http.get(env.url("/dashboard/gateways/nope")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // The data API answers what the admin API answers, and the dashboard's own views.
    assert_eq!(post(&env, "/v1/chat/completions", CHAT, &[]).await.status(), 200);
    let recs = records(&env, "default", 1).await;
    let overview = get_json(&env, "/dashboard/api/overview?range=1h", &cookie).await;
    assert_eq!(overview["gateways"][0]["name"], "default");
    assert_eq!(overview["gateways"][0]["analytics"]["totals"]["requests"], 1);
    let id = recs[0]["id"].as_str().unwrap();
    let one = get_json(&env, &format!("/dashboard/api/gateways/default/logs/{id}"), &cookie).await;
    assert_eq!(one["request"]["kind"], "json");
    assert!(one["request"]["text"].as_str().unwrap().contains("\n  \"messages\": ["), "{one}");
    assert!(one.get("request_body").is_none(), "no base64 body: {one}");
    let r = http.get(env.url("/dashboard/api/overview?range=2y")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 400);

    // Changes need the CSRF token.
    let purge = env.url("/dashboard/api/gateways/default/cache");
    let r = http.delete(&purge).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = http.delete(&purge).header("cookie", &cookie).header("x-csrf-token", "0".repeat(32)).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = http.delete(&purge).header("cookie", &cookie).header("x-csrf-token", &csrf).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // A gateway started without a configuration file shows its settings read-only.
    let s = get_json(&env, "/dashboard/api/gateways/default/settings", &cookie).await;
    assert_eq!(s["editable"], false);
    assert!(s["read_only_reason"].as_str().unwrap().contains("--config"), "{s}");
    assert_eq!(s["audit"][0]["action"], "cache purge");
    let r = http
        .put(env.url("/dashboard/api/gateways/default/settings"))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .body(r#"{"cache_mode":"off","cache_ttl":"1h","logs_enabled":true,"log_bodies":true,"rate_limit":null}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);

    // A tampered cookie is no session; logging out ends this one.
    let last = if cookie.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &cookie[..cookie.len() - 1]);
    let r = http.get(env.url("/dashboard/api/overview")).header("cookie", &forged).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r =
        http.post(env.url("/dashboard/logout")).header("cookie", &cookie).form(&[("csrf", "x")]).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(env.url("/dashboard/logout"))
        .header("cookie", &cookie)
        .form(&[("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    let r = http.get(env.url("/dashboard/api/overview")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_changed_in_the_dashboard_apply_live_and_keep_the_file() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let token_file = temp_dir("token").join("admin-token");
    std::fs::write(&token_file, "file-admin-token\n").unwrap();
    let toml = format!(
        "# team gateway\n[providers.openai]\nbase_url = \"{}/v1\"\n[storage]\ncache = \"memory\"\n\
         [gateways.default]            # the default\n[gateways.default.cache]\nenabled = true\n\
         mode = \"on\"                  # on | shadow | off\n[admin]\ntoken = \"{}\"\n",
        mock.url(),
        token_file.display()
    );
    let mut gw = Aigate::serve(&[], &toml).await;
    let (cookie, csrf) = log_in(&gw, "file-admin-token").await;
    let http = browser();
    let settings_url = gw.url("/dashboard/api/gateways/default/settings");
    let put = |body: &'static str| {
        http.put(&settings_url)
            .header("cookie", &cookie)
            .header("x-csrf-token", &csrf)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    let r = put(r#"{"cache_mode":"on","cache_ttl":"soon","logs_enabled":true,"log_bodies":false,"rate_limit":null}"#)
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(error_body(r).await["error"]["message"].as_str().unwrap().starts_with("cache_ttl"));
    let before = std::fs::read_to_string(&gw.config).unwrap();

    let r = put(r#"{"cache_mode":"off","cache_ttl":"1h","logs_enabled":true,"log_bodies":false,
            "rate_limit":{"limit":2,"period":"1h","technique":"fixed"}}"#)
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["settings"]["cache_mode"], "off");
    assert_eq!(v["settings"]["rate_limit"]["limit"], 2);
    assert_eq!(v["warnings"], serde_json::json!([]));
    let after = std::fs::read_to_string(&gw.config).unwrap();
    assert_ne!(before, after);
    for kept in ["# team gateway", "[gateways.default]            # the default", "# on | shadow | off"] {
        assert!(after.contains(kept), "{kept:?} lost:\n{after}");
    }
    assert!(after.contains("mode = \"off\"") && after.contains("limit = 2"), "{after}");

    // Live: the cache is off and the new rate limit holds.
    let first = post(&gw, "/v1/chat/completions", CHAT, &[]).await;
    assert_eq!(first.headers()["aigate-cache"], "OFF");
    assert_eq!(post(&gw, "/v1/chat/completions", CHAT, &[]).await.status(), 200);
    assert_eq!(post(&gw, "/v1/chat/completions", CHAT, &[]).await.status(), 429);

    let s = get_json(&gw, "/dashboard/api/gateways/default/settings", &cookie).await;
    assert_eq!(s["editable"], true);
    let actions: Vec<&str> = s["audit"].as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["rate_limit", "cache.mode"], "newest first: {s}");

    // Replicas managed by deployment: `[dashboard] read_only` (picked up by a reload) shows the
    // settings and refuses changes.
    std::fs::write(&gw.config, format!("{after}[dashboard]\nread_only = true\n")).unwrap();
    gw.signal("HUP");
    gw.stderr_line("configuration reloaded").await;
    let s = get_json(&gw, "/dashboard/api/gateways/default/settings", &cookie).await;
    assert_eq!(s["editable"], false);
    assert!(s["read_only_reason"].as_str().unwrap().contains("read_only = true"), "{s}");
    let r = put(r#"{"cache_mode":"on","cache_ttl":"1h","logs_enabled":true,"log_bodies":false,"rate_limit":null}"#)
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert!(std::fs::read_to_string(&gw.config).unwrap().contains("mode = \"off\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_page_shows_the_cache_top() {
    let env = env_with(
        &format!("{ADMIN}[gateways.default]\n[gateways.default.logs]\nbodies = true\n[gateways.default.cache]\nenabled = true\n"),
        MockConfig::default(),
    )
    .await;
    let (cookie, _) = log_in(&env, ADMIN_TOKEN).await;
    for _ in 0..3 {
        assert_eq!(post(&env, "/v1/chat/completions", CHAT, &[]).await.status(), 200);
        cache_written(&env, 1).await;
    }
    let mut top = serde_json::Value::Null;
    wait_until("the cache index", async || {
        top = get_json(&env, "/dashboard/api/gateways/default/cache/top?since=24h&limit=20", &cookie).await;
        top["totals"]["hits"] == 2
    })
    .await;
    assert_eq!(top["entries"][0]["preview"], "hi", "{top:#}");
    // The page's script asks for it and draws the table.
    let js = browser().get(env.url("/dashboard/assets/app.js")).header("cookie", &cookie).send().await.unwrap();
    let js = js.text().await.unwrap();
    assert!(js.contains("\"/cache/top\"") && js.contains("Most repeated requests"), "app.js has no cache table");
}
