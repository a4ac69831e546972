#!/usr/bin/env bash
# Soak: aigate under a steady mixed load for SOAK_DURATION seconds, on loopback only, then checks
# that (1) nothing failed that was not injected, (2) RSS and thread count stayed flat after the
# warm-up, (3) every request's record was stored. Prints a summary; exits 1 when a check fails.
#
#   scripts/soak.sh                      # 600 s, release build
#   SOAK_DURATION=60 scripts/soak.sh     # the short version
#   SOAK_PROFILE=debug SOAK_DURATION=60 scripts/soak.sh   # on the debug binaries (CI)
#
# Variables: SOAK_DURATION (600 s), SOAK_RATE (50 requests/s), SOAK_PROFILE (release | debug),
# SOAK_SKIP_BUILD (1: use the binaries already built), SOAK_RSS_BOUND (0.15: the last third's
# peak RSS may exceed the first third's by at most this fraction), SOAK_KEEP_TMP (1: keep the
# temporary directory: config, aigate's log, the load's JSON), SOAK_THREAD_SLACK (2: threads the
# last third may have beyond the first third's peak: tokio's blocking pool starts a thread when
# disk work is waiting and lets it go after 10 s idle, so the count moves by one or two; a leak of
# a thread per request or connection would add hundreds).
#
# Load (scripts/soak_load.py, open loop at a fixed rate): 40 % cache misses, 35 % cache hits, 15 %
# streams, 10 % upstream errors injected with `x-mock-status: 503`. The gateway runs with the cache
# on (disk store, memory tier capped at 1 MB so it fills in the first 20 s and RSS can level
# off) and logs in SQLite.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${SOAK_DURATION:-600}
RATE=${SOAK_RATE:-50}
PROFILE=${SOAK_PROFILE:-release}
RSS_BOUND=${SOAK_RSS_BOUND:-0.15}
THREAD_SLACK=${SOAK_THREAD_SLACK:-2}
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE
TOKEN=soak-admin-token

log() { printf '[soak] %s\n' "$*" >&2; }

if [[ ${SOAK_SKIP_BUILD:-0} != 1 ]]; then
    flag=()
    [[ $PROFILE == release ]] && flag=(--release)
    log "cargo build ${flag[*]} -p aigate -p aigate-testkit --bins"
    cargo build "${flag[@]}" -p aigate -p aigate-testkit --bins
fi
[[ -x $BIN/aigate && -x $BIN/aigate-mock ]] || { log "missing $BIN/aigate or $BIN/aigate-mock"; exit 2; }

TMP=$(mktemp -d /tmp/aigate-soak.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ ${SOAK_KEEP_TMP:-0} == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # url: until it answers, at most 20 s
    for _ in $(seq 200); do
        python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    log "nothing answers at $1"
    exit 2
}

MOCK_PORT=$(free_port)
GW_PORT=$(free_port)
"$BIN/aigate-mock" --listen "127.0.0.1:$MOCK_PORT" >"$TMP/mock.log" 2>&1 &
PIDS+=($!)
cat >"$TMP/aigate.toml" <<EOF
listen = "127.0.0.1:$GW_PORT"
data_dir = "$TMP/data"

[storage]
cache_memory = "1MB"

[admin]
token = "env:SOAK_ADMIN_TOKEN"

[providers.openai]
base_url = "http://127.0.0.1:$MOCK_PORT/v1"

[gateways.default]
[gateways.default.cache]
enabled = true
EOF
SOAK_ADMIN_TOKEN=$TOKEN RUST_LOG=warn "$BIN/aigate" serve --config "$TMP/aigate.toml" >"$TMP/aigate.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
wait_http "http://127.0.0.1:$GW_PORT/healthz"
log "aigate ($PROFILE, pid $GW_PID) on 127.0.0.1:$GW_PORT, mock on $MOCK_PORT: ${DURATION}s at ${RATE}/s"

python3 "$ROOT/scripts/soak_load.py" --url "http://127.0.0.1:$GW_PORT/v1/chat/completions" --pid "$GW_PID" \
    --duration "$DURATION" --rate "$RATE" >"$TMP/load.json"

# Every request's record stored: /metrics counts what the log writer stored; the admin API's
# analytics count what the store holds. Records are written in batches after the responses: wait.
python3 - "$TMP/load.json" "http://127.0.0.1:$GW_PORT" "$TOKEN" "$TMP/aigate.log" "$RSS_BOUND" "$PROFILE" "$THREAD_SLACK" <<'EOF'
import json, sys, time, urllib.request

load_file, base, token, log_file, rss_bound, profile, thread_slack = sys.argv[1:]
thread_slack = int(thread_slack)
rss_bound = float(rss_bound)
L = json.load(open(load_file))
expected = L["sent"] + L["primed"]

def metrics():
    text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        name = series.split("{")[0]
        out[name] = out.get(name, 0) + float(value)
    return out

def analytics():
    req = urllib.request.Request(base + "/admin/gateways/default/analytics?since=1d",
                                 headers={"authorization": f"Bearer {token}"})
    return json.load(urllib.request.urlopen(req, timeout=10))["totals"]["requests"]

deadline = time.time() + 60
while True:
    m = metrics()
    stored = int(m.get("aigate_log_records_written_total", 0))
    counted = analytics()
    if (stored >= expected and counted >= expected) or time.time() > deadline:
        break
    time.sleep(0.5)

samples = L["samples"]  # [t, rss_kb, threads]
span = L["duration_s"]
first = [s for s in samples if s[0] <= span / 3]
last = [s for s in samples if s[0] >= 2 * span / 3]
rss_warm = max(s[1] for s in first)
rss_last = max(s[1] for s in last)
thr_warm = max(s[2] for s in first)
thr_last = max(s[2] for s in last)
# Requests between the first third's end and the run's end: what a per-request leak would scale with.
per_req = (rss_last - rss_warm) * 1024 / max(1, L["sent"] * 2 / 3)
log_lines = open(log_file, errors="replace").read().splitlines()
bad_log = [l for l in log_lines if "ERROR" in l or "panicked" in l]

checks = [
    ("no unexpected response", L["unexpected"] == 0, f'{L["unexpected"]} unexpected {L["examples"]}'),
    ("errors only where injected", L["by_kind"]["e"]["ok"] == L["by_kind"]["e"]["sent"]
        and int(m.get("aigate_requests_total", 0)) == expected, f'{L["by_kind"]["e"]["ok"]} of {L["by_kind"]["e"]["sent"]} injected 503s; aigate_requests_total {int(m.get("aigate_requests_total", 0))} of {expected}'),
    ("no ERROR line or panic in aigate's log", not bad_log, "; ".join(bad_log[:3])),
    ("every record stored (/metrics)", stored == expected, f"{stored} of {expected}"),
    ("every record in the store (analytics)", counted == expected, f"{counted} of {expected}"),
    ("no record dropped", int(m.get("aigate_log_records_dropped_total", 0)) == 0,
        f'{int(m.get("aigate_log_records_dropped_total", 0))} dropped'),
    (f"RSS flat (last third's peak within {rss_bound:.0%} of the first third's)",
        rss_last <= rss_warm * (1 + rss_bound), f"{rss_warm / 1024:.1f} MB -> {rss_last / 1024:.1f} MB"),
    (f"threads flat (last third's peak at most the first third's + {thread_slack})", thr_last <= thr_warm + thread_slack,
        f"{thr_warm} -> {thr_last}"),
]

k = L["by_kind"]
print(f"== soak: {profile} build, {L['duration_s']} s at {L['rate']:.0f} requests/s")
print(f"requests   {L['sent']} (+{L['primed']} priming the hits): "
      + ", ".join(f"{name} {k[c]['sent']} (p50 {k[c]['p50_ms']} ms, p99 {k[c]['p99_ms']} ms)"
                  for c, name in [("m", "misses"), ("h", "hits"), ("s", "streams"), ("e", "503s")]))
print(f"unexpected {L['unexpected']}; generator late starts {L['late_starts']}; max in flight {L['max_in_flight']}; connections {L['connections']}")
print(f"records    {stored} stored (/metrics), {counted} in analytics, of {expected} requests; spilled {int(m.get('aigate_log_records_spilled_total', 0))}")
print(f"cache      hits {int(m.get('aigate_cache_hits_total', 0))}, misses {int(m.get('aigate_cache_misses_total', 0))}, writes {int(m.get('aigate_cache_writes_total', 0))}, memory tier {int(m.get('aigate_cache_memory_bytes', 0)) / 1e6:.1f} MB")
print(f"RSS        first third peak {rss_warm / 1024:.1f} MB, last third peak {rss_last / 1024:.1f} MB "
      f"({(rss_last / rss_warm - 1) * 100:+.1f} %, {per_req:+.1f} bytes per request after the first third); "
      f"min {min(s[1] for s in samples) / 1024:.1f} MB, max {max(s[1] for s in samples) / 1024:.1f} MB")
print(f"threads    first third peak {thr_warm}, last third peak {thr_last}; samples {len(samples)} every ~{samples[1][0] - samples[0][0] if len(samples) > 1 else 0:.0f} s")
ok = True
for name, good, detail in checks:
    print(f"{'PASS' if good else 'FAIL'} {name}: {detail}")
    ok &= good
print("soak: OK" if ok else "soak: FAILED")
sys.exit(0 if ok else 1)
EOF
