//! Faults under load, each with its expected outcome asserted (issue 19): Redis killed and
//! restarted, PostgreSQL stopped and started, the spill disk full, upstream failures, SIGTERM under
//! streaming load, `kill -9` and a restart. Every test runs its own Redis, PostgreSQL, mock and
//! gateway (ports and directories of its own), so they run in parallel with the rest. The load is a
//! few tasks sending requests back to back ([`Load`]); each response is counted under the phase
//! (before, during, after the fault) in which it was sent and answered. `docs/testing.md`
//! ("Faults") lists the outcomes and the figures of a run.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

use super::*;

/// A phase's responses by status.
type Tally = BTreeMap<u16, u64>;

/// Where a response whose request began in one phase and ended in another is counted.
const TRANSITION: usize = usize::MAX;

/// Requests sent back to back by a few tasks until stopped, each response counted by phase and
/// status.
struct Load {
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<BTreeMap<usize, Tally>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts `tasks` senders; `send(n)` sends the `n`-th request (numbered across all tasks) and
    /// returns its status (asserting what it needs to of the response).
    fn start<F, Fut>(tasks: usize, send: F) -> Load
    where
        F: Fn(u64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = u16> + Send,
    {
        let load = Load {
            phase: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            tally: Arc::default(),
            tasks: Vec::new(),
        };
        let (send, next) = (Arc::new(send), Arc::new(AtomicU64::new(0)));
        let tasks = (0..tasks)
            .map(|_| {
                let (send, next, phase, stop, tally) =
                    (send.clone(), next.clone(), load.phase.clone(), load.stop.clone(), load.tally.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let before = phase.load(Ordering::SeqCst);
                        let status = send(next.fetch_add(1, Ordering::SeqCst)).await;
                        let after = phase.load(Ordering::SeqCst);
                        let p = if before == after { before } else { TRANSITION };
                        *tally.lock().unwrap().entry(p).or_default().entry(status).or_default() += 1;
                        // A breath between requests: the suite runs beside the other tests,
                        // some of which count on a store answering within 250 ms.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            })
            .collect();
        Load { tasks, ..load }
    }

    /// Moves to the next phase; returns its number.
    fn next_phase(&self) -> usize {
        self.phase.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The responses of `phase` so far.
    fn tally(&self, phase: usize) -> Tally {
        self.tally.lock().unwrap().get(&phase).cloned().unwrap_or_default()
    }

    /// Waits until `phase` has at least `n` responses.
    async fn responses(&self, phase: usize, n: u64) {
        wait_until_within(Duration::from_secs(30), &format!("{n} responses in phase {phase}"), async || {
            self.tally(phase).values().sum::<u64>() >= n
        })
        .await;
    }

    /// Stops the senders (each finishes its request; a panic in one fails the test); returns the
    /// responses by phase.
    async fn stop(self) -> BTreeMap<usize, Tally> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.tally.lock().unwrap().clone()
    }
}

/// Responses by phase, for a test's figures.
fn show(by: &BTreeMap<usize, Tally>) -> String {
    let phase = |p: usize| if p == TRANSITION { "across phases".to_string() } else { format!("phase {p}") };
    by.iter().map(|(&p, t)| format!("{}: {t:?}", phase(p))).collect::<Vec<_>>().join(", ")
}

/// All responses of all phases.
fn total(by_phase: &BTreeMap<usize, Tally>) -> u64 {
    by_phase.values().flat_map(|t| t.values()).sum()
}

/// A chat request no other request of any test sends (a cache miss), numbered `n`.
fn unique_chat(tag: &str, n: u64) -> String {
    format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{tag} {n}"}}]}}"#)
}

/// The response's `cf-aig-cache-status`.
fn cache_status(r: &reqwest::Response) -> String {
    r.headers().get("cf-aig-cache-status").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

/// Every log record of gateway `gw`, page by page through the admin API.
async fn all_records(to: &impl Target, gw: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let v = admin_get(to, &format!("/admin/gateways/{gw}/logs?limit=500{cursor}")).await;
        out.extend(v["records"].as_array().unwrap().iter().cloned());
        match v["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return out,
        }
    }
}

/// [`records_stored`] with a deadline for a loaded machine (a store reconnecting, a replay).
async fn stored(to: &impl Target, n: u64) {
    wait_until_within(Duration::from_secs(30), &format!("{n} log records stored"), async || {
        metric(to, "aigate_log_records_written_total").await >= n as f64
    })
    .await;
}

/// The peak resident memory of process `pid` so far, in MiB (`VmHWM`).
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

/// A file holding [`ADMIN_TOKEN`] (an `aigate` process cannot be given `env:GW_TOKEN`).
fn admin_token_file() -> String {
    let path = temp_dir("token").join("admin-token");
    std::fs::write(&path, format!("{ADMIN_TOKEN}\n")).unwrap();
    format!("[admin]\ntoken = {:?}\n", path.display().to_string())
}

/// Redis is killed (SIGKILL) under load and started again on the same port, with empty data. Two
/// gateways share it for their cache and limits, one with `on_store_error = "allow"`, one with
/// `"deny"`. Down: every request is answered from upstream (200) with `allow`, refused with 503
/// `limit_store_unavailable` with `deny`, none hangs. Back: within seconds both answer 200 again,
/// an entry cached through one is a HIT through the other (the cache is on Redis again) and a
/// limit of 5 counts again (the sixth request is 429).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load() {
    if skip_redis() {
        return;
    }
    let port = free_port();
    let redis = RedisServer::start(port).await;
    let url = format!("redis://127.0.0.1:{port}");
    let mut envs = Vec::new();
    for policy in ["allow", "deny"] {
        // `default`: cache and a limit no test reaches, so every request uses both stores.
        // `small_<policy>`: 5 requests an hour.
        let extra = format!(
            "[storage]\ncache = \"{url}\"\nlimits = \"{url}\"\n[limits]\non_store_error = \"{policy}\"\n\
             [gateways.default]\n[gateways.default.cache]\nenabled = true\n\
             [gateways.default.rate_limit]\nlimit = 1000000\nperiod = \"1h\"\n\
             [gateways.small_{policy}]\n[gateways.small_{policy}.rate_limit]\nlimit = 5\nperiod = \"1h\"\n"
        );
        envs.push(Arc::new(env_with(&extra, MockConfig::default()).await));
    }
    let [allow, deny] = [envs[0].clone(), envs[1].clone()];
    // Both connected before the load (a first connection slower than the 250 ms operation timeout
    // on a loaded machine would be a store error).
    wait_until_within(Duration::from_secs(20), "the deny gateway to reach Redis", async || {
        status_of(&*deny, "/v1/chat/completions", &unique_chat(&unique_name("warm"), 0), &[]).await == 200
    })
    .await;
    let load = |env: &Arc<Env>, tag: String| {
        let env = env.clone();
        Load::start(3, move |n| {
            let (env, tag) = (env.clone(), tag.clone());
            async move {
                let t0 = Instant::now();
                let r = post(&*env, "/v1/chat/completions", unique_chat(&tag, n), &[]).await;
                let status = r.status().as_u16();
                // None hangs on the dead store (a generous bound: the machine is shared).
                assert!(t0.elapsed() < Duration::from_secs(5), "{tag}: a request took {:?}", t0.elapsed());
                if status == 503 {
                    assert_eq!(error_body(r).await["error"]["code"], "limit_store_unavailable", "{tag}");
                } else {
                    r.bytes().await.unwrap();
                }
                status
            }
        })
    };
    let tag = unique_name("rk");
    let (load_a, load_d) = (load(&allow, format!("{tag}a")), load(&deny, format!("{tag}d")));

    // Phase 0: Redis up.
    load_a.responses(0, 20).await;
    load_d.responses(0, 20).await;
    // Phase 1: Redis killed.
    drop(redis);
    let down = load_a.next_phase();
    assert_eq!(load_d.next_phase(), down);
    load_a.responses(down, 20).await;
    load_d.responses(down, 20).await;
    // Phase 2: Redis back (empty); the stores reconnect by themselves.
    let redis = RedisServer::start(port).await;
    let restarted = Instant::now();
    let back = load_a.next_phase();
    assert_eq!(load_d.next_phase(), back);
    let mut probe = 0;
    wait_until_within(Duration::from_secs(15), "both gateways to use Redis again", async || {
        probe += 1;
        let body = unique_chat(&format!("{tag}probe"), probe);
        let first = post(&*allow, "/v1/chat/completions", &body, &[]).await;
        let first_ok = first.status() == 200;
        let first_body = first.bytes().await.unwrap();
        if !first_ok || !load_d.tally(back).contains_key(&200) {
            return false;
        }
        // Written to Redis through `allow`, read through `deny`: its first request for this body
        // (its memory tier never saw it) is a HIT only from Redis. (A MISS: `allow`'s write had
        // not landed yet; the next probe tries a new body.)
        let r = post(&*deny, "/v1/chat/completions", &body, &[]).await;
        let hit = cache_status(&r) == "HIT";
        let b = r.bytes().await.unwrap();
        assert!(!hit || b == first_body, "a HIT through Redis answers the cached body");
        hit
    })
    .await;
    let reconnect = restarted.elapsed();
    // Phase 3: after the reconnection.
    let after = load_a.next_phase();
    assert_eq!(load_d.next_phase(), after);
    load_a.responses(after, 20).await;
    load_d.responses(after, 20).await;
    let (by_a, by_d) = (load_a.stop().await, load_d.stop().await);
    eprintln!("redis fault: reconnected {reconnect:?} after the restart; allow {}; deny {}", show(&by_a), show(&by_d));

    // Limits count again: 5 pass, the sixth is refused, for both policies.
    for (policy, env) in [("allow", &allow), ("deny", &deny)] {
        let path = format!("/small_{policy}/openai/chat/completions");
        let mut statuses = Vec::new();
        for _ in 0..6 {
            statuses.push(status_of(&**env, &path, CHAT, &[]).await);
        }
        assert_eq!(statuses, [200, 200, 200, 200, 200, 429], "{policy}: limits count after the restart");
    }

    let only = |t: &Tally, s: u16| t.keys().all(|&k| k == s) && t.get(&s).is_some_and(|&n| n > 0);
    // With Redis up, `deny` refuses only what a store operation slower than its 250 ms timeout
    // fails (rare, on a loaded machine): at most one request in ten.
    let mostly_200 = |t: &Tally| {
        let n: u64 = t.values().sum();
        t.keys().all(|k| [200, 503].contains(k)) && t.get(&200).is_some_and(|&ok| ok * 10 >= n * 9)
    };
    assert!(only(&by_a[&0], 200) && only(&by_a[&after], 200), "allow with Redis up: {by_a:?}");
    assert!(mostly_200(&by_d[&0]) && mostly_200(&by_d[&after]), "deny with Redis up: {by_d:?}");
    for (policy, by) in [("allow", &by_a), ("deny", &by_d)] {
        // Reconnecting: requests fail over like phase 1 until the stores are back, then 200.
        assert!(by[&back].keys().all(|s| [200, 503].contains(s)), "{policy} reconnecting: {by:?}");
        assert!(by.get(&TRANSITION).is_none_or(|t| t.keys().all(|s| [200, 503].contains(s))), "{by:?}");
    }
    assert!(only(&by_a[&down], 200), "allow with Redis down: served from upstream: {by_a:?}");
    assert!(only(&by_d[&down], 503), "deny with Redis down: refused: {by_d:?}");
    assert!(!by_a[&back].contains_key(&503), "allow never refuses: {by_a:?}");
    for env in [&allow, &deny] {
        assert!(metric(&**env, "aigate_limit_store_errors_total").await > 0.0);
    }
    assert!(allow.gw.state.cache.stats.store_errors.load(Ordering::Relaxed) > 0, "the cache saw Redis fail");
    assert!(reconnect < Duration::from_secs(15));
    drop(redis);
}

/// PostgreSQL (the log store) is stopped under load and started again: requests keep succeeding,
/// records spill to disk while it is down and are replayed once it is back: every request is one
/// record (none lost, none stored twice) and counts once in the analytics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_started_under_load() {
    if skip_postgres() {
        return;
    }
    let pg = PgServer::start().await;
    let env = Arc::new(env_with(&format!("{ADMIN}[storage]\nlogs = \"{}\"\n", pg.url()), MockConfig::default()).await);
    let e = env.clone();
    let load = Load::start(3, move |_| {
        let e = e.clone();
        async move { status_of(&*e, "/v1/chat/completions", CHAT, &[]).await }
    });
    load.responses(0, 30).await;
    stored(&*env, 1).await;
    pg.stop().await;
    let down = load.next_phase();
    let e = env.clone();
    wait_until_within(Duration::from_secs(30), "records spilled while PostgreSQL is down", async || {
        metric(&*e, "aigate_log_records_spilled_total").await >= 20.0
    })
    .await;
    load.responses(down, 30).await;
    pg.start_again().await;
    let back = load.next_phase();
    load.responses(back, 30).await;
    let by = load.stop().await;
    let sent = total(&by);
    assert!(by.values().all(|t| t.keys().all(|&s| s == 200)), "every request answered 200: {by:?}");
    wait_until_within(Duration::from_secs(30), &format!("{sent} records written"), async || {
        metric(&*env, "aigate_log_records_written_total").await >= sent as f64
    })
    .await;
    let recs = all_records(&*env, "default").await;
    let ids: HashSet<&str> = recs.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!((recs.len() as u64, ids.len() as u64), (sent, sent), "records of {sent} requests, each once");
    let v = admin_get(&*env, "/admin/gateways/default/analytics?since=2h").await;
    assert_eq!(v["totals"]["requests"], sent, "analytics count each request once: {v}");
    let spilled = metric(&*env, "aigate_log_records_spilled_total").await;
    assert_eq!(metric(&*env, "aigate_log_records_replayed_total").await, spilled);
    assert_eq!(metric(&*env, "aigate_log_records_written_total").await, sent as f64);
    assert_eq!(metric(&*env, "aigate_log_records_dropped_total").await, 0.0);
    eprintln!(
        "postgres fault: {sent} requests ({}), {spilled} records spilled and replayed, {} stored",
        show(&by),
        recs.len()
    );
}

/// A tmpfs of a test's own mounted on a directory; unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`"64k"`) on `dir`; `None` where this process may not mount.
    fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .ok()?;
        out.status.success().then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: a process still holding a file there does not keep it mounted.
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The spill directory is on a full disk (a 64 KiB tmpfs; where mounting is not permitted, a
/// `log_spill_max` of 64 KiB stands in for it) while the log store is stalled under load:
/// requests keep succeeding, a record that cannot be spilled is dropped, counted
/// (`aigate_log_records_dropped_total`) and reported on stderr, nothing panics; once the store is
/// back the spilled records are replayed and every request is either a stored record or a
/// counted drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spill_disk_full_under_load() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let dir = temp_dir("spillfull");
    let tmpfs = Tmpfs::mount(&dir.join(aigate_core::logs::SPILL_DIR), "64k");
    let cap = if tmpfs.is_some() {
        ""
    } else {
        eprintln!("spill disk full: mounting a tmpfs is not permitted here; log_spill_max = 64KiB stands in for it");
        "log_spill_max = \"64KiB\"\n"
    };
    let toml = format!(
        "{}[storage]\nlog_queue = 4\n{cap}[providers.openai]\nbase_url = \"{}/v1\"\n[gateways.default]\n",
        admin_token_file(),
        mock.url()
    );
    let mut gw = Aigate::serve_in(&dir, &[], &toml).await;
    assert_eq!(status_of(&gw, "/v1/chat/completions", CHAT, &[]).await, 200);
    stored(&gw, 1).await;
    // Another process holds the log database's write lock: the writer stalls, the queue (4)
    // fills, and records go to the spill files until the disk is full.
    let lock = rusqlite::Connection::open(dir.join(aigate_store::LOG_SQLITE_FILE)).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let (http, url) = (gw.client().clone(), gw.url("/v1/chat/completions"));
    let load = Load::start(3, move |_| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let r = http.post(url).header("content-type", "application/json").body(CHAT).send().await.unwrap();
            let s = r.status().as_u16();
            r.bytes().await.unwrap();
            s
        }
    });
    wait_until_within(Duration::from_secs(60), "records dropped on the full spill disk", async || {
        metric(&gw, "aigate_log_records_dropped_total").await >= 20.0
    })
    .await;
    let reported = gw.stderr_line("log spill: records dropped").await;
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    let by = load.stop().await;
    let sent = 1 + total(&by);
    assert!(by.values().all(|t| t.keys().all(|&s| s == 200)), "every request answered 200: {by:?}");
    // Every request is a stored record or a counted drop, and no spill file is left (the wait
    // gives up with the figures).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (written, dropped) = loop {
        let written = metric(&gw, "aigate_log_records_written_total").await;
        let dropped = metric(&gw, "aigate_log_records_dropped_total").await;
        let spill_bytes = metric(&gw, "aigate_log_spill_bytes").await;
        if (written + dropped >= sent as f64 && spill_bytes == 0.0) || Instant::now() > deadline {
            assert_eq!(
                (written + dropped, spill_bytes),
                (sent as f64, 0.0),
                "{sent} requests: written {written} + dropped {dropped}, spilled {}, replayed {}, spill bytes left",
                metric(&gw, "aigate_log_records_spilled_total").await,
                metric(&gw, "aigate_log_records_replayed_total").await
            );
            break (written, dropped);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let spilled = metric(&gw, "aigate_log_records_spilled_total").await;
    assert!(spilled > 0.0 && metric(&gw, "aigate_log_records_replayed_total").await == spilled);
    assert_eq!(all_records(&gw, "default").await.len() as f64, written, "the store holds what was written");
    // Still serving and logging.
    assert_eq!(status_of(&gw, "/v1/chat/completions", CHAT, &[]).await, 200);
    stored(&gw, written as u64 + 1).await;
    eprintln!(
        "spill disk full: {sent} requests, {spilled} spilled and replayed, {dropped} dropped, peak RSS {:.1} MiB; {reported}",
        peak_rss_mib(gw.pid())
    );
    gw.kill();
    drop(tmpfs);
}

/// Upstream failures under load, side by side with healthy requests on one cached gateway: a 5xx
/// passes through with the provider's OpenAI-shaped error, a provider too slow for the request
/// timeout is a 504 `upstream_timeout`, a connection closed without an answer is a 502
/// `upstream_unreachable`, a stream cut mid-way ends in an error at the client (never a clean
/// end). Nothing of them is cached: each went upstream (or, for a cut stream, joined an identical
/// one in flight and was cut with it), and their requests sent again without the fault miss; the
/// healthy requests are cached meanwhile (HITs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_under_load() {
    let env = Arc::new(
        env_with("[gateways.default]\n[gateways.default.cache]\nenabled = true\n", MockConfig::default()).await,
    );
    let tag = unique_name("up");
    // Name, body (the same for every request of the kind: a cached fault would be a HIT; its
    // message's content is `<tag> <name>`), fault headers, expected status and error code.
    type Kind = (&'static str, String, Vec<(&'static str, &'static str)>, u16, &'static str);
    let body = |name: &str, stream: bool| {
        format!(
            r#"{{"model":"gpt-4o-mini","stream":{stream},"messages":[{{"role":"user","content":"{tag} {name}"}}]}}"#
        )
    };
    let kinds: Arc<Vec<Kind>> = Arc::new(vec![
        ("5xx", body("5xx", false), vec![("x-mock-status", "503")], 503, ""),
        (
            "slow",
            body("slow", false),
            vec![("x-mock-latency-ms", "3000"), ("cf-aig-request-timeout", "200")],
            504,
            "upstream_timeout",
        ),
        ("reset", body("reset", false), vec![("x-mock-drop", "true")], 502, "upstream_unreachable"),
        ("cut", body("cut", true), vec![("x-mock-cut-after", "3")], 200, ""),
        ("ok", body("ok", false), vec![], 200, ""),
        ("ok-stream", body("ok-stream", true), vec![], 200, ""),
    ]);
    // Responses and cache HITs by kind.
    let counts: Arc<Mutex<BTreeMap<&'static str, (u64, u64)>>> = Arc::default();
    let (e, k, c) = (env.clone(), kinds.clone(), counts.clone());
    let load = Load::start(6, move |n| {
        let (env, kinds, counts) = (e.clone(), k.clone(), c.clone());
        async move {
            let (name, body, headers, status, code) = &kinds[n as usize % kinds.len()];
            let r = post(&*env, "/v1/chat/completions", body, headers).await;
            let (got, cache) = (r.status().as_u16(), cache_status(&r));
            assert_eq!(got, *status, "{name}");
            if *name == "cut" {
                // The client sees the stream fail, not end.
                let mut s = r.bytes_stream();
                let mut failed = false;
                while let Some(chunk) = s.next().await {
                    if chunk.is_err() {
                        failed = true;
                        break;
                    }
                }
                assert!(failed, "a cut stream ended cleanly at the client");
            } else if code.is_empty() && got >= 400 {
                // The provider's own error, passed through unchanged.
                let v: serde_json::Value = r.json().await.unwrap();
                assert_eq!(v["error"]["message"], format!("mock failure with status {got}"), "{name}");
            } else if got >= 400 {
                // aigate's own error: OpenAI's shape, its code.
                let v = error_body(r).await;
                assert_eq!(v["error"]["code"], *code, "{name}: {v}");
            } else {
                let text = r.text().await.unwrap();
                let whole = if name.ends_with("stream") {
                    text.ends_with("data: [DONE]\n\n")
                } else {
                    text.contains("This is the aigate mock")
                };
                assert!(whole, "{name}: {text}");
            }
            if got >= 400 {
                assert_ne!(cache, "HIT", "{name} served from the cache");
            }
            let mut c = counts.lock().unwrap();
            let e = c.entry(name).or_default();
            e.0 += 1;
            e.1 += u64::from(cache == "HIT");
            got
        }
    });
    load.responses(0, 120).await;
    let by = load.stop().await;
    let counts = counts.lock().unwrap().clone();
    // Each failed request went upstream itself: a follower of an identical request in flight is
    // sent upstream when that one fails before its head. A stream cut after its head is relayed
    // cut to the requests that joined it (labelled HIT: answered without going upstream); those
    // are the only HITs of a fault.
    let recorded = env.mock.stats.recorded.lock().unwrap().clone();
    for (name, ..) in kinds.iter() {
        // (The body sent upstream may differ: a stream is asked for its usage.)
        let content = format!("\"{tag} {name}\"");
        let upstream = recorded.iter().filter(|r| String::from_utf8_lossy(&r.body).contains(&content)).count() as u64;
        let (responses, hits) = counts[name];
        if name.starts_with("ok") {
            assert!(
                hits > 0 && upstream < responses,
                "{name}: {responses} responses, {hits} HITs, {upstream} upstream"
            );
        } else if *name == "cut" {
            assert_eq!(upstream + hits, responses, "{name}: each went upstream or joined one that did");
        } else {
            assert_eq!((upstream, hits), (responses, 0), "{name}: every request went upstream");
        }
    }
    // Sent again without the fault: a miss (no entry was written for it; the cache key does not
    // hold the mock's fault headers).
    for (name, body, ..) in kinds.iter().filter(|k| !k.0.starts_with("ok")) {
        let r = post(&*env, "/v1/chat/completions", body, &[]).await;
        assert_eq!((r.status().as_u16(), cache_status(&r).as_str()), (200, "MISS"), "{name} was cached");
        r.bytes().await.unwrap();
    }
    eprintln!("upstream faults: {} requests ({}); by kind (responses, HITs): {counts:?}", total(&by), show(&by));
}

/// SIGTERM while 50 slow streams are in flight: the listener closes (new connections are
/// refused), every stream runs to its end (all events and `[DONE]`, byte for byte the stream of
/// an undisturbed request) within the grace period, every request is logged and the process
/// exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_streaming_load_drops_no_stream() {
    const STREAMS: usize = 50;
    let mock = MockUpstream::start(MockConfig { chunk_delay: Duration::from_millis(100), ..Default::default() })
        .await
        .unwrap();
    let toml =
        format!("shutdown_grace = \"30s\"\n[providers.openai]\nbase_url = \"{}/v1\"\n[gateways.default]\n", mock.url());
    let mut gw = Aigate::serve(&[], &toml).await;
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    // 30 events 100 ms apart: about 3 s a stream.
    let headers = [("x-mock-chunks", "30"), ("cf-aig-skip-cache", "true")];
    let reference = post(&gw, "/v1/chat/completions", body, &[("x-mock-chunks", "30"), ("x-mock-chunk-delay-ms", "0")])
        .await
        .text()
        .await
        .unwrap();
    assert!(reference.ends_with("data: [DONE]\n\n"));
    let started = Arc::new(AtomicUsize::new(0));
    let streams: Vec<_> = (0..STREAMS)
        .map(|_| {
            let (http, url, started) = (gw.client().clone(), gw.url("/v1/chat/completions"), started.clone());
            tokio::spawn(async move {
                let mut rb = http.post(url).header("content-type", "application/json").body(body);
                for (k, v) in headers {
                    rb = rb.header(k, v);
                }
                let r = rb.send().await.unwrap();
                assert_eq!(r.status(), 200);
                let mut s = r.bytes_stream();
                let mut text = s.next().await.unwrap().unwrap().to_vec();
                started.fetch_add(1, Ordering::SeqCst);
                while let Some(chunk) = s.next().await {
                    text.extend_from_slice(&chunk.expect("a stream was cut by the shutdown"));
                }
                String::from_utf8(text).unwrap()
            })
        })
        .collect();
    wait_until_within(Duration::from_secs(20), "every stream to begin", async || {
        started.load(Ordering::SeqCst) == STREAMS
    })
    .await;
    let in_flight = mock.stats.completed_streams.load(Ordering::SeqCst);
    let rss = peak_rss_mib(gw.pid());
    let t0 = Instant::now();
    gw.signal("TERM");
    let port = gw.port;
    wait_until("the listener to close after SIGTERM", async || {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err()
    })
    .await;
    let mut completed = 0;
    for s in streams {
        assert_eq!(s.await.unwrap(), reference, "a stream differs from an undisturbed one");
        completed += 1;
    }
    let drained = t0.elapsed();
    let status = gw.exit_status().await;
    assert!(status.success(), "exit status {status}");
    assert!(t0.elapsed() < Duration::from_secs(30), "exited after {:?}, past the grace period", t0.elapsed());
    // Streams still running at the signal: all of them (the mock had finished only the reference).
    assert_eq!(in_flight, 1);
    assert_eq!(completed, STREAMS);
    use aigate_store::LogStore as _;
    let store = aigate_store::SqliteLogStore::open(&gw.dir().join(aigate_store::LOG_SQLITE_FILE)).unwrap();
    assert_eq!(store.count("default").await.unwrap(), 1 + STREAMS as u64, "every stream logged");
    eprintln!(
        "sigterm: {STREAMS} streams in flight, all complete {drained:?} after the signal, 0 dropped, peak RSS {rss:.1} MiB"
    );
}

/// `kill -9` of a process with the embedded stores (disk cache, SQLite logs) right after a burst
/// of requests, then a start on the same data directory: the stores open (no repair, no error),
/// every answer cached before is a HIT with the same body, every record stored before the burst
/// is there, and of the burst's records at most those still queued are missing (documented in
/// `docs/testing.md`, "Faults").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_then_restart_keeps_stores_consistent() {
    const STORED: u64 = 20;
    const BURST: u64 = 20;
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let dir = temp_dir("kill9");
    let toml = format!(
        "{}[storage]\ncache = \"disk\"\nlogs = \"sqlite\"\n[providers.openai]\nbase_url = \"{}/v1\"\n\
         [gateways.default]\n[gateways.default.cache]\nenabled = true\n",
        admin_token_file(),
        mock.url()
    );
    let tag = unique_name("k9");
    let mut gw = Aigate::serve_in(&dir, &[], &toml).await;
    let mut answers = Vec::new();
    let mut ids = Vec::new();
    for n in 0..STORED + BURST {
        let r = post(&gw, "/v1/chat/completions", unique_chat(&tag, n), &[]).await;
        assert_eq!((r.status().as_u16(), cache_status(&r).as_str()), (200, "MISS"));
        ids.push(r.headers()["cf-aig-log-id"].to_str().unwrap().to_string());
        answers.push(r.bytes().await.unwrap());
        if n + 1 == STORED {
            // Everything so far is stored: records and cache entries.
            stored(&gw, STORED).await;
            wait_until_within(Duration::from_secs(30), "the cache writes", async || {
                metric(&gw, "aigate_cache_writes_total").await >= STORED as f64
            })
            .await;
        }
    }
    // Killed right after the burst's last answer: its records may still be queued.
    let rss = peak_rss_mib(gw.pid());
    gw.kill();
    let gw = Aigate::serve_in(&dir, &[], &toml).await;
    let recs = all_records(&gw, "default").await;
    let found: HashSet<&str> = recs.iter().map(|r| r["id"].as_str().unwrap()).collect();
    let sent: HashSet<&str> = ids.iter().map(String::as_str).collect();
    assert!(found.is_subset(&sent), "records of requests never sent");
    assert_eq!(found.len(), recs.len(), "a record stored twice");
    assert!(
        ids[..STORED as usize].iter().all(|id| found.contains(id.as_str())),
        "a record stored before the kill is lost"
    );
    let lost = STORED + BURST - recs.len() as u64;
    // The cache: each answer stored before the kill is a HIT with its body; the burst's are a
    // HIT or a MISS (a write still queued), never a wrong body.
    let mut hits = 0;
    for (n, answer) in answers.iter().enumerate() {
        let r = post(&gw, "/v1/chat/completions", unique_chat(&tag, n as u64), &[]).await;
        let cache = cache_status(&r);
        assert_eq!(r.status(), 200);
        assert_eq!(&r.bytes().await.unwrap(), answer, "request {n} answered with another body");
        assert!(cache == "HIT" || (n as u64 >= STORED && cache == "MISS"), "request {n}: {cache}");
        hits += u64::from(cache == "HIT");
    }
    // The restarted stores take new records.
    stored(&gw, STORED + BURST).await;
    eprintln!(
        "kill -9: {} requests, {} records survived ({lost} of the last {BURST} lost), {hits} cache HITs after the restart, peak RSS {rss:.1} MiB",
        STORED + BURST,
        recs.len()
    );
}
