//! What every end-to-end test uses: a mock upstream and a gateway on port 0 ([`Env`]), `aigate`
//! and `redis-server` processes of a test's own, one way to send a request ([`post`]), the admin
//! API and `/metrics`, and [`wait_until`] for what happens after a response (a cache write, a log
//! record, a settlement, a webhook): tests wait for the thing itself, not for a fixed time (a sleep
//! is left only where time itself must pass and no clock can be moved).

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aigate_core::{ServerHandle, Settings};
use aigate_testkit::{MockConfig, MockUpstream};
use tokio::sync::mpsc::error::TryRecvError;

/// A small chat completion request (the mock answers it with 19 prompt and 14 completion tokens).
pub const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

/// Config lines that turn the admin API on with [`ADMIN_TOKEN`].
pub const ADMIN: &str = "[admin]\ntoken = \"env:GW_TOKEN\"\n";
/// The value of `env:GW_TOKEN` in every test gateway: the admin token and gateway tokens.
pub const ADMIN_TOKEN: &str = "gw-secret-token";
/// The value of `env:STORED_KEY`: a stored provider key.
pub const STORED_KEY: &str = "sk-stored-key-123";

/// How long [`wait_until`] waits before it gives up.
const WAIT: Duration = Duration::from_secs(5);
/// How often [`wait_until`] checks.
const POLL: Duration = Duration::from_millis(10);

/// Waits until `cond` holds, checking every few ms; panics naming `what` after a few seconds.
pub async fn wait_until(what: &str, cond: impl AsyncFnMut() -> bool) {
    wait_until_within(WAIT, what, cond).await;
}

/// [`wait_until`] with a deadline of the caller's (for what is slow by design).
pub async fn wait_until_within(limit: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "gave up after {limit:?} waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Something a test sends requests to: a gateway in this process ([`Env`]) or an `aigate`
/// process ([`Aigate`]).
pub trait Target {
    /// The HTTP client to use.
    fn client(&self) -> &reqwest::Client;
    /// The URL of `path` on the gateway.
    fn url(&self, path: &str) -> String;
}

/// A mock upstream and a gateway in this process whose `openai`, `anthropic` and `local`
/// providers point at the mock.
pub struct Env {
    /// The mock upstream: its request count and the last request it received.
    pub mock: MockUpstream,
    /// The gateway: its address and its state (cache counters, clock, settings).
    pub gw: ServerHandle,
    /// A client without proxy for the tests' own requests.
    pub http: reqwest::Client,
    /// The gateway's config, to start it again.
    toml: String,
}

impl Target for Env {
    fn client(&self) -> &reqwest::Client {
        &self.http
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.gw.addr, path)
    }
}

impl Env {
    /// Stops the gateway (draining it) and starts it again on the same config, data directory
    /// and mock (on another port).
    pub async fn restart(self) -> Env {
        let Env { mock, gw, http, toml } = self;
        gw.shutdown();
        gw.wait().await;
        Env { mock, gw: start_gateway(&toml).await, http, toml }
    }
}

/// [`env_with`] with nothing added.
pub async fn env() -> Env {
    env_with("", MockConfig::default()).await
}

/// Starts a mock and a gateway on it with a fresh data directory; `extra` is added to the TOML
/// before the providers, `{mock}` in it replaced by the mock's URL (a `[gateways.default]` is
/// added when `extra` has none).
pub async fn env_with(extra: &str, mock_cfg: MockConfig) -> Env {
    let mock = MockUpstream::start(mock_cfg).await.unwrap();
    let extra = extra.replace("{mock}", &mock.url());
    let toml = format!(
        r#"
listen = "127.0.0.1:0"
shutdown_grace = "5s"
data_dir = "{data_dir}"
{extra}
[providers.openai]
base_url = "{m}/v1"
[providers.anthropic]
base_url = "{m}"
[providers.local]
base_url = "{m}/v1"
"#,
        m = mock.url(),
        data_dir = temp_dir("data").display()
    );
    let toml = if toml.contains("[gateways.default]") { toml } else { format!("{toml}\n[gateways.default]\n") };
    let gw = start_gateway(&toml).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    Env { mock, gw, http, toml }
}

/// Starts a gateway on port 0 from a whole config (`env:GW_TOKEN` and `env:STORED_KEY` resolve).
pub async fn start_gateway(toml: &str) -> ServerHandle {
    let settings = Settings::from_toml_with(toml, &|name| match name {
        "GW_TOKEN" => Some(ADMIN_TOKEN.into()),
        "STORED_KEY" => Some(STORED_KEY.into()),
        _ => None,
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    aigate_core::start_on(settings, listener).unwrap()
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "aigate-test-{}-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A name no other test or run uses (for what Redis and PostgreSQL share across runs): `tag` and
/// letters and digits, at most 60 characters.
pub fn unique_name(tag: &str) -> String {
    format!("{tag}{}", temp_dir(tag).file_name().unwrap().to_string_lossy().replace(['-', '.'], ""))
        .chars()
        .take(60)
        .collect()
}

/// A port nothing listens on (free a moment ago).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// POSTs `body` to `path` with `headers` (and `content-type: application/json` unless `headers`
/// name a content type).
pub async fn post(to: &impl Target, path: &str, body: impl AsRef<[u8]>, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut rb = to.client().post(to.url(path)).body(body.as_ref().to_vec());
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
        rb = rb.header("content-type", "application/json");
    }
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    rb.send().await.unwrap()
}

/// [`post`], read to the end; returns the status.
pub async fn status_of(to: &impl Target, path: &str, body: &str, headers: &[(&str, &str)]) -> u16 {
    let r = post(to, path, body, headers).await;
    let s = r.status().as_u16();
    r.bytes().await.unwrap();
    s
}

/// Sends `n` POSTs of `body` to `path` at once, spread over `targets`; returns (200s, 429s).
pub async fn concurrent_statuses(targets: &[&impl Target], path: &str, body: &str, n: usize) -> (usize, usize) {
    let statuses =
        futures_util::future::join_all((0..n).map(|i| status_of(targets[i % targets.len()], path, body, &[]))).await;
    let count = |s| statuses.iter().filter(|&&x| x == s).count();
    assert_eq!(count(200) + count(429), n, "unexpected statuses: {statuses:?}");
    (count(200), count(429))
}

/// The body of an error response, checked to have OpenAI's error shape.
pub async fn error_body(resp: reqwest::Response) -> serde_json::Value {
    let v: serde_json::Value = resp.json().await.unwrap();
    let e = &v["error"];
    assert!(e["message"].is_string() && e["type"].is_string() && e["code"].is_string(), "not OpenAI error shape: {v}");
    v
}

/// Asserts the response carries a `cf-aig-log-id` that is a UUIDv7.
pub fn assert_log_id(resp: &reqwest::Response) {
    let id = resp.headers().get("cf-aig-log-id").expect("cf-aig-log-id").to_str().unwrap();
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(id, id.to_lowercase());
    assert_eq!(id[14..15].chars().next().unwrap().to_digit(16), Some(7), "log id {id} is not a UUIDv7");
}

/// GETs an admin API path with [`ADMIN_TOKEN`]; asserts 200.
pub async fn admin_get(env: &impl Target, path: &str) -> serde_json::Value {
    let r = env.client().get(env.url(path)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

/// Waits until gateway `gw` holds `n` log records (through the admin API) and returns them,
/// newest first. More than `n` fails.
pub async fn records(env: &impl Target, gw: &str, n: usize) -> Vec<serde_json::Value> {
    let path = format!("/admin/gateways/{gw}/logs?limit=1000");
    let mut recs = Vec::new();
    wait_until(&format!("{n} log records in gateway {gw}"), async || {
        recs = admin_get(env, &path).await["records"].as_array().unwrap().clone();
        recs.len() >= n
    })
    .await;
    assert_eq!(recs.len(), n, "records of {gw}: {recs:#?}");
    recs
}

/// The sum of a metric's samples (every label set) in `/metrics`; 0 when it has none.
pub async fn metric(to: &impl Target, name: &str) -> f64 {
    let text = to.client().get(to.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            (series.split('{').next() == Some(name)).then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}

/// Waits until `n` log records are stored (every gateway; from `/metrics`, no admin token needed).
/// A request's rate-limit reservations are settled as its record is finalised, before it is
/// stored: this is also how a test waits for settlement.
pub async fn records_stored(to: &impl Target, n: u64) {
    wait_until(&format!("{n} log records stored"), async || {
        metric(to, "aigate_log_records_written_total").await >= n as f64
    })
    .await;
}

/// Entries the gateway's cache has written to its store.
pub fn cache_writes(env: &Env) -> u64 {
    env.gw.state.cache.stats.writes.load(Ordering::Relaxed)
}

/// Waits until the gateway's cache has written `n` entries (writes land after the response).
pub async fn cache_written(env: &Env, n: u64) {
    wait_until(&format!("{n} cache writes"), async || cache_writes(env) >= n).await;
}

/// A webhook receiver: collects the JSON bodies POSTed to it.
pub async fn webhook_receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let g = g.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                loop {
                    let n = s.read(&mut tmp).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if buf.len() < end + 4 + len {
                        continue;
                    }
                    let body = buf[end + 4..end + 4 + len].to_vec();
                    g.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
                    buf.drain(..end + 4 + len);
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
                }
            });
        }
    });
    (url, got)
}

/// Redis tests run unless `AIGATE_SKIP_REDIS=1` (a missing Redis fails them otherwise).
pub fn skip_redis() -> bool {
    let skip = std::env::var("AIGATE_SKIP_REDIS").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("AIGATE_SKIP_REDIS=1: skipping a Redis test");
    }
    skip
}

/// PostgreSQL tests run unless `AIGATE_SKIP_POSTGRES=1` (a missing PostgreSQL fails them otherwise).
pub fn skip_postgres() -> bool {
    let skip = std::env::var("AIGATE_SKIP_POSTGRES").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("AIGATE_SKIP_POSTGRES=1: skipping a PostgreSQL test");
    }
    skip
}

/// The PostgreSQL the tests share: `AIGATE_TEST_POSTGRES_URL`, else the local `test` database.
pub fn postgres_url() -> String {
    std::env::var("AIGATE_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A `redis-server` of a test's own (so stopping it disturbs no other test); killed on drop.
pub struct RedisServer(Child);

impl RedisServer {
    /// Starts one on `port` and waits until it accepts connections.
    pub async fn start(port: u16) -> RedisServer {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let server = RedisServer(child);
        wait_until(&format!("redis-server on port {port}"), async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        server
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A PostgreSQL server of a test's own: a fresh cluster in a temporary directory, on a free port
/// (so stopping it disturbs no other test). PostgreSQL refuses to run as root: as root, its
/// programs run as the `postgres` user (`runuser`), the directory given to that user. Initialised
/// without fsync and with trust authentication (user `postgres`, database `postgres`); stopped
/// (immediately) and removed on drop.
pub struct PgServer {
    /// The data directory (also the directory of the Unix socket and of the server log).
    dir: PathBuf,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
}

/// Where Debian and Ubuntu install PostgreSQL's server programs (the newest version present).
fn pg_bin(name: &str) -> PathBuf {
    let root = std::path::Path::new("/usr/lib/postgresql");
    let mut versions: Vec<u32> = std::fs::read_dir(root)
        .expect("PostgreSQL server programs under /usr/lib/postgresql")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    let v = versions.last().expect("a PostgreSQL version under /usr/lib/postgresql");
    root.join(v.to_string()).join("bin").join(name)
}

/// Whether this process runs as root.
fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// A PostgreSQL program with `args`, run as `postgres` when this process is root.
fn pg_command(name: &str, args: &[&str]) -> Command {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(pg_bin(name));
        c
    } else {
        Command::new(pg_bin(name))
    };
    cmd.args(args).stdin(Stdio::null());
    cmd
}

/// Runs a PostgreSQL program to its end; panics with its output unless it succeeds.
fn pg_run(name: &str, args: &[&str]) {
    let out = pg_command(name, args).output().unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PgServer {
    /// Creates a cluster and starts it; returns once it accepts connections.
    pub async fn start() -> PgServer {
        let dir = temp_dir("pg");
        let port = free_port();
        let d = dir.display().to_string();
        tokio::task::spawn_blocking(move || {
            if is_root() {
                let st = Command::new("chown").args(["-R", "postgres:postgres", &d]).status().unwrap();
                assert!(st.success(), "chown {d} to postgres");
            }
            pg_run(
                "initdb",
                &["--no-sync", "--no-instructions", "-A", "trust", "-U", "postgres", "-E", "UTF8", "-D", &d],
            );
        })
        .await
        .unwrap();
        let server = PgServer { dir, port };
        server.start_again().await;
        server
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the (stopped) server again on the same port and data; returns once it accepts
    /// connections.
    pub async fn start_again(&self) {
        let (d, port) = (self.dir.display().to_string(), self.port);
        tokio::task::spawn_blocking(move || {
            let opts = format!("-p {port} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off");
            pg_run("pg_ctl", &["-D", &d, "-l", &format!("{d}/server.log"), "-o", &opts, "-w", "-t", "30", "start"]);
        })
        .await
        .unwrap();
        wait_until(&format!("PostgreSQL on port {port}"), async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
    }

    /// Stops the server (`fast`: open connections are closed, as on a restart) and waits until
    /// it has.
    pub async fn stop(&self) {
        let d = self.dir.display().to_string();
        tokio::task::spawn_blocking(move || pg_run("pg_ctl", &["-D", &d, "-m", "fast", "-w", "stop"])).await.unwrap();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let d = self.dir.display().to_string();
        // Already stopped is fine: pg_ctl fails and the directory goes anyway.
        let _ = pg_command("pg_ctl", &["-D", &d, "-m", "immediate", "-w", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An `aigate` process on a config file of its own, and what it writes to stderr; killed on drop.
pub struct Aigate {
    child: Child,
    pub port: u16,
    /// The config file (`listen` and `data_dir` on lines 1 and 2, then the test's TOML).
    pub config: PathBuf,
    http: reqwest::Client,
    stderr: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Target for Aigate {
    fn client(&self) -> &reqwest::Client {
        &self.http
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }
}

impl Aigate {
    /// Runs `aigate [args] serve --config <file>` on `toml` (see [`Aigate::write_config`]) and
    /// waits until it says it is listening.
    pub async fn serve(args: &[&str], toml: &str) -> Aigate {
        Aigate::serve_in(&temp_dir("proc"), args, toml).await
    }

    /// [`Aigate::serve`] in directory `dir` (its config file and data directory): a second
    /// process in the directory of a first one that stopped starts on the first one's data.
    pub async fn serve_in(dir: &std::path::Path, args: &[&str], toml: &str) -> Aigate {
        let port = free_port();
        let config = dir.join("aigate.toml");
        write_config(&config, port, toml);
        let mut child = Command::new(env!("CARGO_BIN_EXE_aigate"))
            .args(args)
            .args(["serve", "--config", config.to_str().unwrap()])
            .env_remove("AIGATE_CONFIG")
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut p = Aigate { child, port, config, http, stderr: rx };
        p.stderr_line("listening").await;
        p
    }

    /// Rewrites the config file: `listen` and `data_dir` as before, then `toml` from line 3 on.
    pub fn write_config(&self, toml: &str) {
        write_config(&self.config, self.port, toml);
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the process a signal (`"HUP"`, `"TERM"`).
    pub fn signal(&self, name: &str) {
        let st = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().unwrap();
        assert!(st.success(), "kill -{name}");
    }

    /// The directory of its config file, which is its data directory.
    pub fn dir(&self) -> PathBuf {
        self.config.parent().unwrap().to_path_buf()
    }

    /// Kills the process (SIGKILL: no shutdown of any kind) and reaps it.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits for a line on stderr that contains `needle` (the lines before it are passed over).
    pub async fn stderr_line(&mut self, needle: &str) -> String {
        let mut found = None;
        wait_until_within(Duration::from_secs(10), &format!("aigate to log {needle:?}"), async || loop {
            match self.stderr.try_recv() {
                Ok(line) if line.contains(needle) => {
                    found = Some(line);
                    return true;
                }
                Ok(_) => {}
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => panic!("aigate closed stderr before logging {needle:?}"),
            }
        })
        .await;
        found.unwrap()
    }

    /// Waits until the process exits.
    pub async fn exit_status(&mut self) -> ExitStatus {
        let mut status = None;
        wait_until_within(Duration::from_secs(10), "aigate to exit", async || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        })
        .await;
        status.unwrap()
    }
}

/// An `aigate` config: `listen` on `port` and `data_dir` beside the file, then `toml`.
fn write_config(path: &std::path::Path, port: u16, toml: &str) {
    let dir = path.parent().unwrap().display().to_string();
    std::fs::write(path, format!("listen = \"127.0.0.1:{port}\"\ndata_dir = {dir:?}\n{toml}")).unwrap();
}

impl Drop for Aigate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
