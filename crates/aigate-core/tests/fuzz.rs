//! Fuzzing of everything that parses untrusted input (issue 19), with proptest on stable Rust.
//!
//! One property test per parser, each fed both arbitrary input (bytes, strings, JSON) and input
//! generated from valid seeds (real paths, real streams, the example configuration) then mutated.
//! Every target must never panic, never hang, and answer a malformed input with an `Err` that has
//! a message; where a stronger property holds it is checked too:
//! - routing: the upstream URI never leaves the provider's base URL, for any path, method, header
//!   and Universal or dynamic step (scheme, host and base path kept; no `.`/`..` segment, plain or
//!   percent-encoded, and no encoded separator below it);
//! - SSE: a stream split at any byte boundaries gives the same usage, model, filtered stream and
//!   translated stream as the same stream in one piece, and a valid stream's usage is the one it
//!   states;
//! - `cf-aig-*` headers: an accepted value is within the documented bounds.
//!
//! Case counts: `AIGATE_FUZZ_CASES` cases per target (default 192, about 6 s for the whole file
//! in a debug build, part of `cargo test --workspace`). The long run is `scripts/fuzz.sh`
//! (release build with overflow checks, `--profile fuzz`). A case slower than
//! `AIGATE_FUZZ_CASE_MS` (default 5000) fails as a hang; one still running after 60 s aborts the
//! process with the target's name. Failures are kept by proptest in
//! `proptest-regressions/fuzz.txt` (committed) and replayed first on every run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, OnceLock};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use aigate_core::config::{Settings, EMBEDDED_DEFAULT};
use aigate_core::endpoint::Endpoint;
use aigate_core::headers;
use aigate_core::logs::parse_metadata;
use aigate_core::meter::cost::CustomCost;
use aigate_core::meter::usage::{self, InjectedUsageFilter, SseUsage, Usage};
use aigate_core::meter::Meter;
use aigate_core::phases::cache::CacheOptions;
use aigate_core::phases::route::{self, Route};
use aigate_core::phases::upstream::{request_timeout, retry_policy};
use aigate_core::providers::{check_segment, Provider};
use aigate_core::routing::{self, universal, Canary, MAX_STEPS};
use aigate_core::translate::{
    self, anthropic, anthropic_client, gemini, Compat, Format, ResponseTranslator, Translation,
};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{json, Map, Value};
#[path = "fuzz/config.rs"]
mod config_targets;
#[path = "fuzz/inputs.rs"]
mod inputs;
#[path = "fuzz/routing.rs"]
mod route_targets;
#[path = "fuzz/streams.rs"]
mod stream_targets;

use inputs::*;
use route_targets::check_route;

// ---------------------------------------------------------------------------------------------
// Harness: case counts, the per-case time check and the hang watchdog.

/// Cases per target: `AIGATE_FUZZ_CASES`, divided by `div` for the costly targets.
fn config(div: u32) -> ProptestConfig {
    let cases: u32 = std::env::var("AIGATE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(192);
    ProptestConfig {
        cases: (cases / div).max(4),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/fuzz.txt"))),
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    }
}

/// Cases running now, by thread: when each started and its target.
static RUNNING: LazyLock<Mutex<HashMap<ThreadId, (Instant, &'static str)>>> = LazyLock::new(Mutex::default);
static WATCHDOG: OnceLock<()> = OnceLock::new();
/// A case still running after this is a hang: the process is aborted, naming the target.
const HANG: Duration = Duration::from_secs(60);

fn case_limit() -> Duration {
    let ms = std::env::var("AIGATE_FUZZ_CASE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    Duration::from_millis(ms)
}

/// Runs one case of `target`: a case slower than [`case_limit`] fails (proptest then shrinks
/// it), one that never ends is reported by the watchdog.
fn timed(target: &'static str, f: impl FnOnce() -> Result<(), TestCaseError>) -> Result<(), TestCaseError> {
    WATCHDOG.get_or_init(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_secs(1));
            let running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, (_, target))) = running.iter().find(|(_, (t, _))| t.elapsed() > HANG) {
                eprintln!("fuzz: a case of {target} has run for more than {HANG:?}: a hang");
                std::process::abort();
            }
        });
    });
    let id = std::thread::current().id();
    let start = Instant::now();
    RUNNING.lock().unwrap_or_else(|e| e.into_inner()).insert(id, (start, target));
    let out = f();
    RUNNING.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    let took = start.elapsed();
    assert!(took <= case_limit(), "{target}: a case took {took:?} (limit {:?})", case_limit());
    out
}
