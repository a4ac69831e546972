//! Rollout comparisons end to end: a canary gateway against its baseline over one window, and one
//! gateway after a change against before, through the admin API and `aigate report`.

use super::*;

/// `aigate report` with `args`, against `env`.
fn report(env: &Env, args: &[&str]) -> std::process::Output {
    let base = format!("http://{}", env.gw.addr);
    std::process::Command::new(env!("CARGO_BIN_EXE_aigate"))
        .arg("report")
        .args(args)
        .args(["--url", &base, "--token", ADMIN_TOKEN])
        .output()
        .unwrap()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends `n` chats to gateway `gw`, the first `failing` answered 503 by the mock.
async fn traffic(env: &Env, gw: &str, n: usize, failing: usize) {
    let path = format!("/v1/acct/{gw}/openai/chat/completions");
    for i in 0..n {
        let mut headers = vec![("x-mock-latency-ms", "20")];
        if i < failing {
            headers.push(("x-mock-status", "503"));
        }
        let status = status_of(env, &path, CHAT, &headers).await;
        assert_eq!(status, if i < failing { 503 } else { 200 });
    }
}

/// Waits until `path` (a report or comparison) counts `n` requests at `pointer`.
async fn counted(env: &Env, path: &str, pointer: &str, n: u64) -> serde_json::Value {
    let mut v = serde_json::Value::Null;
    wait_until(&format!("{n} requests at {pointer} of {path}"), async || {
        v = admin_get(env, path).await;
        v.pointer(pointer).and_then(|x| x.as_u64()) >= Some(n)
    })
    .await;
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_against_its_baseline() {
    let env = env_with(
        &format!("{ADMIN}[gateways.default]\n[gateways.prod]\n[gateways.prod-canary]\n"),
        MockConfig::default(),
    )
    .await;
    traffic(&env, "prod", 20, 0).await;
    // The canary fails 3 requests in 10: 30 points worse than prod.
    traffic(&env, "prod-canary", 10, 3).await;
    let path = "/admin/gateways/prod/report?compare=prod-canary&since=1h&min_requests=5";
    counted(&env, path, "/baseline/requests", 20).await;
    let api = counted(&env, path, "/candidate/requests", 10).await;

    let out = report(&env, &["--gateway", "prod", "--compare", "prod-canary", "--since", "1h", "--min-requests", "5"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let text = stdout(&out);
    assert!(text.contains("aigate report: prod-canary against prod"), "{text}");
    let requests = text.lines().find(|l| l.trim_start().starts_with("Requests")).unwrap();
    assert_eq!(requests.split_whitespace().collect::<Vec<_>>(), ["Requests", "20", "10", "-50.0", "%"], "{text}");
    let errors = text.lines().find(|l| l.trim_start().starts_with("Error rate")).unwrap();
    assert!(errors.contains("0.0 %") && errors.contains("30.0 %") && errors.ends_with("+30.0 pt"), "{text}");
    assert!(text.contains("Latency p99") && text.contains("Upstream calls") && text.contains("Cost paid"), "{text}");
    assert!(
        text.contains("FAIL error_rate_increase: error rate 30.0 % on prod-canary against 0.0 % on prod (+30.0 points"),
        "{text}"
    );
    assert!(text.contains("aigate logs --gateway prod-canary --errors"), "{text}");
    assert!(text.contains("Verdict for prod-canary: NO-GO"), "{text}");

    // JSON: the whole comparison, the same figures as the admin API's.
    let out = report(
        &env,
        &["--gateway", "prod", "--compare", "prod-canary", "--since", "1h", "--min-requests", "5", "--format", "json"],
    );
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"], "no-go");
    assert_eq!(
        (v["baseline"]["gateway"].as_str(), v["candidate"]["gateway"].as_str()),
        (Some("prod"), Some("prod-canary"))
    );
    assert_eq!((&v["candidate"]["errors"], &v["candidate"]["upstream_calls"]), (&3.into(), &10.into()));
    assert_eq!(v["changes"], api["changes"]);
    assert_eq!(v["margins"], serde_json::json!({"max_error_rate_increase": 0.01, "max_p95_increase": 0.2}));
    let failed: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(failed.contains(&"error_rate_increase"), "{v:#}");
    assert!(v["candidate"]["p99_ms"].as_f64().unwrap() >= 20.0, "{v:#}");

    // Within wider margins the canary passes. (Its p95 is one of ten requests; the wide p95 margin
    // keeps a scheduling hiccup on a busy machine from deciding the test.)
    let out = report(
        &env,
        &[
            "--gateway",
            "prod",
            "--compare",
            "prod-canary",
            "--since",
            "1h",
            "--min-requests",
            "5",
            "--max-error-rate-increase",
            "0.35",
            "--max-p95-increase",
            "2",
            "--format",
            "markdown",
        ],
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("| Requests | 20 | 10 | -50.0 % |") && text.contains("**Verdict for prod-canary: GO**"),
        "{text}"
    );

    // Without min_requests, 100 requests a side are needed: too few here.
    let v = admin_get(&env, "/admin/gateways/prod/report?compare=prod-canary&since=1h").await;
    let requests = v["checks"].as_array().unwrap().iter().find(|c| c["name"] == "requests").unwrap();
    assert_eq!((&requests["ok"], requests["limit"].as_f64()), (&false.into(), Some(100.0)), "{v:#}");

    // An unknown candidate: 404 naming the gateways there are; the CLI exits 2.
    let r = env.http.get(env.url("/admin/gateways/prod/report?compare=nope")).bearer_auth(ADMIN_TOKEN);
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 404);
    let e = error_body(r).await;
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("nope") && msg.contains("prod-canary"), "{msg}");
    let out = report(&env, &["--gateway", "prod", "--compare", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("prod-canary"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gateway_after_against_before() {
    let env = env_with(ADMIN, MockConfig::default()).await;
    let clock = env.gw.state.clock.clone();
    let before = clock.now_ms();
    traffic(&env, "default", 10, 0).await;
    records(&env, "default", 10).await;
    // Two hours on, the "rollout" fails half of the requests.
    clock.advance(Duration::from_secs(2 * 3600));
    traffic(&env, "default", 10, 5).await;
    let (from, to) = ((before - 3_600_000).to_string(), (before + 3_600_000).to_string());
    let path = format!("/admin/gateways/default/report?since=1h&baseline_from={from}&baseline_to={to}&min_requests=5");
    let api = counted(&env, &path, "/candidate/requests", 10).await;
    assert_eq!(api["baseline"]["requests"], 10, "{api:#}");
    assert_eq!((&api["baseline"]["errors"], &api["candidate"]["errors"]), (&0.into(), &5.into()));

    let args = [
        "--gateway",
        "default",
        "--since",
        "1h",
        "--baseline-from",
        &from,
        "--baseline-to",
        &to,
        "--min-requests",
        "5",
    ];
    let out = report(&env, &args);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let text = stdout(&out);
    assert!(text.contains("aigate report: default after against default before"), "{text}");
    assert!(
        text.contains("FAIL error_rate_increase: error rate 50.0 % on default after against 0.0 % on default before"),
        "{text}"
    );
    let out = report(&env, &[&args[..], &["--format", "json"]].concat());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["changes"], api["changes"]);
    assert_eq!(v["baseline"]["to_ms"].as_u64(), Some(before + 3_600_000));

    // The default baseline ends where the window starts: the hour before it holds no traffic.
    let path = format!("/admin/gateways/default/report?since=1h&baseline_from={}", clock.now_ms() - 2 * 3_600_000);
    let v = admin_get(&env, &path).await;
    assert_eq!(v["baseline"]["requests"], 0, "{v:#}");
    assert_eq!(v["verdict"], "no-go");
}
