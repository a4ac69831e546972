#!/usr/bin/env bash
# bench/run.sh: aigate against nginx against no proxy at all, in one run, on the same mock upstream.
#
#   bench/run.sh                      # full run: about 8 minutes after the build (1.5 of them analytics,
#                                     # 1.5 streams and scale)
#   BENCH_DURATION=5 bench/run.sh     # shorter points
#
# Targets, each in front of the same `aigate-mock` (non-streaming chat completions):
#   direct         client -> mock
#   nginx          client -> nginx (1 worker, upstream keepalive 64) -> mock
#   aigate         client -> aigate serve -> mock (default config: request logs on, no bodies)
#   aigate-hit     the same aigate process, a gateway with the cache on (every request a hit)
#   aigate-nolog   client -> a second aigate process, `[gateways.default.logs] enabled = false`
#   aigate-nolog-hit  the aigate-nolog process, a gateway with the cache on and logs off
#   aigate-bodies  client -> a third aigate process, `[gateways.default.logs] bodies = true`
#   aigate-limit   client -> a fourth aigate process: the default config (logs on) plus a sliding
#                  gateway rate limit and a per-credential token rule, never reached but checked
#                  (and the token rule settled) on every request, in the in-memory limit store
#   aigate-limit-redis  the same rules in Redis (`[storage] limits = BENCH_REDIS_URL`), a fifth
#                  process, when Redis answers there
#   aigate-otel    client -> a sixth aigate process: the default config plus `[telemetry]` exporting
#                  a span per request to the mock (which answers the OTLP posts), measured right
#                  after aigate
# The aigate processes have their own port and data_dir (SQLite log file) in the temporary
# directory. The servers (mock, nginx, the aigate processes) are pinned to CPU 0, the load
# generators to CPU 1 (Redis, not started by this script, is not pinned); only one target is loaded
# at a time in the throughput points, the others idle.
#
# Measured:
#   1. throughput and latency (req/s, p50, p99) at concurrency 32 and 128, with wrk;
#   2. latency added at 50 req/s with the mock answering after 200 ms: p50/p99 of direct, nginx,
#      aigate-nolog and aigate, and proxy p50 - direct p50, with a 95% bootstrap interval
#      (bench/rate.py by default, see below);
#   3. aigate's idle RSS (after start, before any request) and peak RSS (VmHWM after the load);
#   4. the cost of request logging: aigate (logs on) and aigate-bodies (logs and bodies on) against
#      aigate-nolog in the throughput points of 1. (raw, and at equal machine speed: each point's
#      req/s scaled by the mock's CPU time per request during it), and the rows each logging
#      instance's SQLite log store holds after the load against the requests wrk completed;
#   5. the cost of the rate limiter: aigate-limit (and aigate-limit-redis) against aigate in the
#      throughput points of 1. (req/s, p50, p99, CPU per request); the same for OpenTelemetry
#      export (aigate-otel), with its target;
#   6. analytics query time over 1M log records: the `analytics_bench` example of aigate-store
#      (SQLite, and PostgreSQL when reachable at AIGATE_TEST_POSTGRES_URL, default 127.0.0.1:5432);
#   7. streams and scale, by bench/scale.sh (its own servers, after the added-latency points; see
#      its header): time to first event of a streamed completion direct, through aigate as a miss
#      and as a hit; 1,000 streams at once; req/s at concurrency 1024 against 32; 10,000 keep-alive
#      connections with aigate's RSS; CPU per request of each. Its section and PASS/FAIL lines go
#      in this report.
# Prints a markdown report with PASS/FAIL lines for the targets and writes it to
# bench/results/latest.md (raw load-generator output goes to bench/results/latest-raw.log; both are
# generated and not kept in git: docs/benchmarks.md holds the latest figures).
#
# Environment:
#   BENCH_DURATION       seconds per throughput point and round (default 5)
#   BENCH_ROUNDS         rounds of throughput points (default 5): every round measures every target
#                        at every concurrency, one after another; each figure reported is the
#                        round with the median req/s (one VM run to run moves req/s by +-5-8 %)
#   BENCH_RATE_DURATION  seconds of the 50 req/s points (default 30: a median of the 200 ms
#                        responses needs ~1500 samples to be good to a few hundredths of a ms)
#   BENCH_WARMUP         warm-up seconds before every point, not measured (default 2)
#   BENCH_RATE           requests per second of the added-latency points (default 50)
#   BENCH_RATE_CLIENT    load generator of the added-latency points:
#                          python (default): bench/rate.py, Poisson arrivals at a mean of
#                            BENCH_RATE, the four targets loaded at the same time;
#                          oha: oha -q BENCH_RATE (exact 20 ms period), one target after another
#                            (installed with `cargo install oha --locked` when missing). Its
#                            medians move by ~0.1 ms from run to run with the phase of its period
#                            against the mock's 1 ms timer tick: see docs/benchmarks.md.
#   BENCH_SKIP_BUILD=1   use the release binaries already built
#   BENCH_SKIP_ANALYTICS=1  skip the analytics benchmark (6.; about 15-40 s per backend)
#   BENCH_SKIP_SCALE=1   skip bench/scale.sh (7.); its own variables (BENCH_TTFE_N, BENCH_STREAMS,
#                        BENCH_CONNECTIONS, ...) are listed in its header
#   BENCH_REDIS_URL      Redis for aigate-limit-redis (default redis://127.0.0.1:6379)
#   BENCH_SKIP_REDIS=1   no aigate-limit-redis (also skipped when Redis does not answer PING)
#   AIGATE_SKIP_POSTGRES=1  run the analytics benchmark on SQLite only
#   BENCH_STRICT=1       exit 1 when a target is missed (default: report and exit 0)
#   BENCH_SERVER_CPU / BENCH_CLIENT_CPU   CPUs to pin to (default 0 and 1)
#   BENCH_KEEP_TMP=1     keep the temporary directory (configs and server logs)

set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ in bench/

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
RESULTS=$BENCH/results
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release

DURATION=${BENCH_DURATION:-5}
ROUNDS=${BENCH_ROUNDS:-5}
RATE_DURATION=${BENCH_RATE_DURATION:-30}
WARMUP=${BENCH_WARMUP:-2}
RATE=${BENCH_RATE:-50}
RATE_CLIENT=${BENCH_RATE_CLIENT:-python}
MOCK_LATENCY_MS=200
CONCURRENCIES=(32 128)
# The added-latency targets: the proxy path with request logs off (aigate-nolog, the target line)
# and the default configuration (aigate, logs on).
TARGETS=(direct nginx aigate-nolog aigate)
# Throughput also measures aigate's cache-hit path (a gateway with the cache on, every request after
# the first one answered from the memory tier; with logs on in the aigate process, off in the
# aigate-nolog one), the cost of request logging (aigate-nolog, aigate and aigate-bodies measured
# back to back) and the cost of the rate limiter (aigate-limit and aigate-limit-redis right after
# them, the same config as aigate plus rules). Even rounds run the list backwards, so that a
# machine slowing down (or speeding up) during a run favours neither side of a comparison.
TP_TARGETS=(direct nginx aigate-nolog aigate aigate-otel aigate-bodies aigate-limit aigate-limit-redis aigate-hit aigate-nolog-hit)
# The aigate processes (one per configuration) and the process behind each aigate target.
INSTANCES=(aigate aigate-nolog aigate-bodies aigate-limit aigate-limit-redis aigate-otel)
declare -A INSTANCE=([aigate]=aigate [aigate-hit]=aigate [aigate-nolog]=aigate-nolog
    [aigate-nolog-hit]=aigate-nolog [aigate-bodies]=aigate-bodies [aigate-limit]=aigate-limit
    [aigate-limit-redis]=aigate-limit-redis [aigate-otel]=aigate-otel)
# The aigate targets whose process stores request logs for the `default` gateway (records table).
LOGGED_TARGETS=(aigate aigate-otel aigate-limit aigate-limit-redis aigate-bodies)
# The limiter targets, compared with aigate (same config without rules).
LIMIT_TARGETS=(aigate-limit aigate-limit-redis)
REDIS_URL=${BENCH_REDIS_URL:-redis://127.0.0.1:6379}
SERVER_CPU=${BENCH_SERVER_CPU:-0}
CLIENT_CPU=${BENCH_CLIENT_CPU:-1}
BODY_FILE=$BENCH/request.json
AUTH_HEADER='authorization: Bearer sk-bench-not-a-real-key'

# Targets (see docs/benchmarks.md).
# The proxy and cache-path targets (throughput, added p50, cache hit) are taken on the logs-off
# process (aigate-nolog, aigate-nolog-hit): request logging, on by default, has its own target
# (TARGET_LOG_COST); the same ratios for the default config are reported for information.
TARGET_THROUGHPUT_RATIO=0.8     # aigate-nolog req/s >= 0.8 x nginx req/s at concurrency 32
TARGET_ADDED_P50_SLACK_MS=0.05  # aigate-nolog added p50 <= nginx added p50 + 0.05 ms at 50 req/s
TARGET_IDLE_RSS_KIB=20480       # aigate idle RSS <= 20 MiB
TARGET_HIT_RATIO=0.8            # aigate-nolog-hit req/s >= 0.8 x direct req/s at concurrency 32,
                                # and aigate-nolog-hit p99 <= nginx p99 at concurrency 32
TARGET_LOG_COST=0.10            # 1 - (aigate-bodies req/s / aigate-nolog req/s) <= 10% at equal machine speed, and the same
                                # for aigate (logs on, no bodies), at each concurrency
TARGET_ANALYTICS_MS=200         # every analytics query over 1M records (median of 7) < 200 ms
TARGET_OTEL_COST=0.05           # 1 - (aigate-otel req/s / aigate req/s) <= 5% at equal machine speed, concurrency 32

NGINX=/usr/sbin/nginx
OHA=""
OHA_OPTS=()
WORK=""
PIDS=()
declare -A URL RPS P50 P99 ERRS RATE_P50 RATE_P99 RATE_N RATE_ERRS
# Per aigate process: port, data_dir, pid, RSS. Per aigate target: requests wrk completed (warm-ups
# included), and the log rows and log writer counters read after the throughput points.
declare -A GW_PORT GW_DATA GW_PID GW_IDLE_RSS GW_PEAK_RSS SENT ROWS LOG_STATS
# Per limiter target: the probe's x-ratelimit-* headers and the process's limiter counters.
declare -A LIMIT_HEADERS LIMIT_STATS
# CPU time (user + system, all threads) an aigate process spent per request in a throughput point.
declare -A CPU_US MOCK_US ROUND_LINES ROUND_RPS ROUND_COST ROUND_NCOST
ROUND=0
CLK_TCK=$(getconf CLK_TCK)

log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
calc() { awk "BEGIN { printf \"%.3f\", $* }"; }
is_true() { awk "BEGIN { exit !($*) }"; }
kib() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/status"; }
# utime + stime of process $1 in clock ticks (fields 14 and 15 of /proc/PID/stat, after the
# parenthesised command name).
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
# A field of a "BENCH k=v k=v" line (wrk) or of a JSON object (rate points).
field() { tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1 == k { print $2 }'; }
jfield() {
    python3 -c 'import json,sys; v=json.loads(sys.argv[1])[sys.argv[2]]; print(f"{v:.3f}" if isinstance(v, float) else v)' "$1" "$2"
}
# A bootstrap interval from RATE_CI as "[lo, hi]".
ci() { python3 -c 'import json,sys; lo, hi = json.loads(sys.argv[1])[sys.argv[2]]; print(f"[{lo:+.3f}, {hi:+.3f}]")' "$RATE_CI" "$1"; }

# ------------------------------------------------------------------------------------------------
# Set-up and tear-down
# ------------------------------------------------------------------------------------------------

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid _ f
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do  # up to 5 s for a graceful exit, then SIGKILL
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $rc -ne 0 ]]; then
            for f in "$WORK"/*.log "$WORK"/nginx/error.log; do
                if [[ -s $f ]]; then
                    log "--- tail of $f"
                    tail -n 20 "$f" >&2
                fi
            done
        fi
        if [[ ${BENCH_KEEP_TMP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    fi
    exit "$rc"
}

apt_install() {
    log "installing $* with apt-get"
    command -v apt-get >/dev/null || die "apt-get not found; install $* by hand"
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

ensure_tools() {
    local missing=()
    [[ -x $NGINX ]] || missing+=(nginx-light)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v taskset >/dev/null || missing+=(util-linux)
    command -v ss >/dev/null || missing+=(iproute2)
    command -v curl >/dev/null || missing+=(curl)
    command -v python3 >/dev/null || missing+=(python3)
    if ((${#missing[@]})); then apt_install "${missing[@]}"; fi
    [[ -x $NGINX ]] || die "nginx not found at $NGINX after installing nginx-light"

    case $RATE_CLIENT in
        python) ;;
        oha) ensure_oha ;;
        *) die "BENCH_RATE_CLIENT must be python or oha, not $RATE_CLIENT" ;;
    esac
}

ensure_oha() {
    local cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
    if command -v oha >/dev/null; then
        OHA=$(command -v oha)
    elif [[ -x $cargo_bin/oha ]]; then
        OHA=$cargo_bin/oha
    else
        log "oha not found: cargo install oha --locked (once; several minutes on 2 cores)"
        cargo install oha --locked >"$WORK/oha-install.log" 2>&1 ||
            die "cargo install oha failed (see $WORK/oha-install.log); run with BENCH_RATE_CLIENT=python"
        OHA=$cargo_bin/oha
    fi
    # Per-request CSV output (for the bootstrap intervals) needs a recent oha; -w waits for the
    # requests in flight at the deadline instead of counting them as errors; one worker thread, as
    # the load generator has one CPU.
    local help
    help=$("$OHA" --help)
    grep -q 'possible values:.*csv' <<<"$help" ||
        die "$("$OHA" --version | head -n1) has no CSV output; upgrade it or run with BENCH_RATE_CLIENT=python"
    if grep -q -- '--wait-ongoing-requests-after-deadline' <<<"$help"; then OHA_OPTS+=(-w); fi
    if grep -q -- '--worker-threads' <<<"$help"; then OHA_OPTS+=(--worker-threads 1); fi
}

# Removes $1 from every list of targets and processes (an instance that cannot run here).
drop_target() {
    local arr i
    for arr in TP_TARGETS INSTANCES LOGGED_TARGETS LIMIT_TARGETS; do
        local -n list=$arr
        for i in "${!list[@]}"; do
            if [[ ${list[$i]} == "$1" ]]; then unset 'list[i]'; fi
        done
        list=("${list[@]}")  # renumber
        unset -n list
    done
}

# aigate-limit-redis needs a Redis at $REDIS_URL (not started by this script: it is the store under
# test, shared, not a server of this benchmark): a PING over a plain socket, or the target is dropped.
check_redis() {
    if [[ ${BENCH_SKIP_REDIS:-0} == 1 ]]; then
        log "BENCH_SKIP_REDIS=1: no aigate-limit-redis"
        drop_target aigate-limit-redis
        return
    fi
    if python3 - "$REDIS_URL" <<'EOF'; then
import socket, sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
try:
    with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=2) as s:
        s.sendall(b"PING\r\n")
        sys.exit(0 if s.recv(64).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
EOF
        log "Redis answers at $REDIS_URL: aigate-limit-redis included"
    else
        log "no Redis answering PING at $REDIS_URL: aigate-limit-redis skipped"
        drop_target aigate-limit-redis
    fi
}

build() {
    if [[ ${BENCH_SKIP_BUILD:-0} == 1 ]]; then
        log "BENCH_SKIP_BUILD=1: using the binaries in $BIN"
    else
        log "cargo build --release -p aigate -p aigate-testkit"
        (cd "$ROOT" && cargo build --release -p aigate -p aigate-testkit)
        if [[ ${BENCH_SKIP_ANALYTICS:-0} != 1 ]]; then
            log "cargo build --release -p aigate-store --example analytics_bench"
            (cd "$ROOT" && cargo build --release -p aigate-store --example analytics_bench)
        fi
    fi
    [[ -x $BIN/aigate && -x $BIN/aigate-mock ]] || die "release binaries missing in $BIN"
    if [[ ${BENCH_SKIP_ANALYTICS:-0} != 1 && ! -x $BIN/examples/analytics_bench ]]; then
        die "$BIN/examples/analytics_bench missing: cargo build --release -p aigate-store --example analytics_bench (or BENCH_SKIP_ANALYTICS=1)"
    fi
}

# $1 free TCP ports on 127.0.0.1, asked of the kernel at once so they differ.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

# Starts "$@" in the background pinned to the server CPU; sets STARTED_PID.
start_server() {
    local name=$1
    shift
    taskset -c "$SERVER_CPU" "$@" >"$WORK/$name.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

# Waits until something listens on 127.0.0.1:$2 (checked with ss: no connection is made, so the
# server has seen no traffic when its idle RSS is read).
wait_listening() {
    local pid=$1 port=$2 _
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || die "process $pid exited before listening on $port"
        if ss -Hltn "sport = :$port" | grep -q .; then return 0; fi
        sleep 0.1
    done
    die "nothing listens on port $port after 10 s"
}

# One request through a target: checks the status and logs the response size.
probe() {
    local name=$1 url=$2 out code size
    out=$(curl -sS -o /dev/null -w '%{http_code} %{size_download}' -X POST \
        -H 'content-type: application/json' -H "$AUTH_HEADER" --data-binary @"$BODY_FILE" "$url")
    read -r code size <<<"$out"
    [[ $code == 200 ]] || die "$name: POST $url answered $code"
    log "$name: POST $url -> 200, $size response bytes"
}

# The x-ratelimit-* response headers of one request through limiter target $1 (each rule shows
# there: proof that the rules are checked), as "name: value; ...".
limit_headers() {
    curl -sS -D - -o /dev/null -X POST -H 'content-type: application/json' -H "$AUTH_HEADER" \
        --data-binary @"$BODY_FILE" "${URL[$1]}" |
        tr -d '\r' | awk 'tolower($0) ~ /^x-ratelimit-/ { printf "%s%s", sep, $0; sep = "; " }'
}

# Sum of a /proc status field over the nginx master and its workers.
nginx_rss() {
    local master=$1 key=$2 total pid children=()
    total=$(kib "$master" "$key")
    read -ra children <"/proc/$master/task/$master/children" || true
    for pid in "${children[@]}"; do
        total=$((total + $(kib "$pid" "$key")))
    done
    echo "$total"
}

# Writes $WORK/$1.toml: an aigate listening on port $2 with its own data_dir, in front of the mock
# on port $3; the rest of stdin is appended (the gateways).
aigate_config() {
    local name=$1 port=$2 mock_port=$3
    GW_PORT[$name]=$port
    GW_DATA[$name]=$WORK/$name-data
    {
        cat <<EOF
listen = "127.0.0.1:$port"
data_dir = "${GW_DATA[$name]}"

[providers.openai]
base_url = "http://127.0.0.1:$mock_port/v1"

EOF
        cat
    } >"$WORK/$name.toml"
}

# Starts the aigate process $1 (config written by aigate_config) and waits until it listens.
start_aigate() {
    local name=$1
    start_server "$name" "$BIN/aigate" serve --config "$WORK/$name.toml"
    GW_PID[$name]=$STARTED_PID
    wait_listening "$STARTED_PID" "${GW_PORT[$name]}"
}

start_servers() {
    local mock_port nginx_port gw_port nolog_port bodies_port limit_port redis_port otel_port
    read -r mock_port nginx_port gw_port nolog_port bodies_port limit_port redis_port otel_port < <(free_ports 8)
    log "ports: mock $mock_port, nginx $nginx_port, aigate $gw_port, aigate-nolog $nolog_port," \
        "aigate-bodies $bodies_port, aigate-limit $limit_port, aigate-limit-redis $redis_port; work dir $WORK"

    start_server mock "$BIN/aigate-mock" --listen "127.0.0.1:$mock_port" --chunk-delay-ms 0
    MOCK_PID=$STARTED_PID
    wait_listening "$STARTED_PID" "$mock_port"
    URL[direct]="http://127.0.0.1:$mock_port/v1/chat/completions"

    mkdir -p "$WORK/nginx"
    sed -e "s|@WORK@|$WORK|g" -e "s|@MOCK_PORT@|$mock_port|g" -e "s|@NGINX_PORT@|$nginx_port|g" \
        "$BENCH/nginx.conf.template" >"$WORK/nginx/nginx.conf"
    local -a nginx=("$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log")
    "${nginx[@]}" -t -q -g 'daemon off;'
    start_server nginx "${nginx[@]}" -g 'daemon off;'
    NGINX_PID=$STARTED_PID
    wait_listening "$NGINX_PID" "$nginx_port"
    URL[nginx]="http://127.0.0.1:$nginx_port/v1/chat/completions"

    # aigate with the default configuration (request logs on, bodies off, the cache off) and a
    # second gateway with the cache on for the cache-hit path.
    aigate_config aigate "$gw_port" "$mock_port" <<EOF
[gateways.default]

[gateways.cached]
[gateways.cached.cache]
enabled = true
EOF
    # The same default gateway with request logs off: the baseline of the logging cost and the
    # proxy path of the throughput and added-latency targets. (The request is still metered and its
    # record finalised, for metrics and the analytics rollups; it is not stored.) Its `cached`
    # gateway, logs off too, is the cache-hit path of the targets (aigate-nolog-hit).
    aigate_config aigate-nolog "$nolog_port" "$mock_port" <<EOF
[gateways.default]

[gateways.default.logs]
enabled = false

[gateways.cached]
[gateways.cached.cache]
enabled = true
[gateways.cached.logs]
enabled = false
EOF
    # The same default gateway with request and response bodies stored in the log records.
    aigate_config aigate-bodies "$bodies_port" "$mock_port" <<EOF
[gateways.default]

[gateways.default.logs]
enabled = true
bodies = true
EOF
    # The default gateway (logs on, as aigate) plus rules that are checked on every request and
    # never refuse one during the run: a sliding gateway-wide request limit (one hot key) and a
    # per-credential token rule (a reservation estimated from the prompt, settled to the response's
    # usage). In the in-memory limit store (the default), and in Redis for aigate-limit-redis.
    local rules
    rules=$(cat <<EOF
[gateways.default]

[gateways.default.rate_limit]
limit = 1000000000
period = "1h"
technique = "sliding"

[[gateways.default.limits]]
name = "per-credential-tokens"
key = "credential"
measure = "tokens"
limit = 1000000000000
period = "1h"
EOF
)
    aigate_config aigate-limit "$limit_port" "$mock_port" <<<"$rules"
    aigate_config aigate-limit-redis "$redis_port" "$mock_port" <<EOF
[storage]
limits = "$REDIS_URL"

$rules
EOF
    # The default config plus OpenTelemetry: a span per request, batched and posted to the mock.
    aigate_config aigate-otel "$otel_port" "$mock_port" <<EOF
[gateways.default]

[telemetry]
otlp_endpoint = "http://127.0.0.1:$mock_port/otlp"
export_interval = "5s"
EOF
    local name
    for name in "${INSTANCES[@]}"; do start_aigate "$name"; done
    AIGATE_PID=${GW_PID[aigate]}
    URL[aigate]="http://127.0.0.1:$gw_port/v1/chat/completions"
    URL[aigate-hit]="http://127.0.0.1:$gw_port/cached/openai/chat/completions"
    URL[aigate-nolog]="http://127.0.0.1:$nolog_port/v1/chat/completions"
    URL[aigate-nolog-hit]="http://127.0.0.1:$nolog_port/cached/openai/chat/completions"
    URL[aigate-bodies]="http://127.0.0.1:$bodies_port/v1/chat/completions"
    URL[aigate-limit]="http://127.0.0.1:$limit_port/v1/chat/completions"
    URL[aigate-limit-redis]="http://127.0.0.1:$redis_port/v1/chat/completions"
    URL[aigate-otel]="http://127.0.0.1:$otel_port/v1/chat/completions"
}

# A sample of the Prometheus text of aigate process $1 (0 when absent); $2 is the metric name
# without the `_total` suffix of counters.
gw_metric() {
    # Read the whole text first: awk stops at the first match, which would cut curl's write short
    # (curl exit 23 under pipefail).
    local text
    text=$(curl -sS "http://127.0.0.1:${GW_PORT[$1]}/metrics")
    awk -v m="$2" '$1 == m || $1 == m"_total" { print $2; found = 1; exit } END { if (!found) print 0 }' <<<"$text"
}

# Waits (up to 180 s) until the log writer of aigate process $1 has nothing queued or spilled, then
# 1 s more for the last batch to commit: the records of one point are stored before the next point
# loads another process, so no point pays for an earlier one's log writes. (The cache-hit point of
# the logs-on process, aigate-hit, makes records faster than one core can store them next to the
# requests: its queue spills, and replaying that backlog takes tens of seconds of the idle process;
# until it is done it would be measured as the cost of the next logs-on point.)
log_settle() {
    local name=$1 _
    for _ in $(seq 360); do
        if [[ $(gw_metric "$name" aigate_log_queue_depth) == 0 && $(gw_metric "$name" aigate_log_spill_bytes) == 0 ]]; then
            break
        fi
        sleep 0.5
    done
    sleep 1
}

# Rows of gateway $2 in the SQLite file of aigate process $1: the rows of its partition tables
# (`log_parts`), counted in one read transaction (python3's sqlite3 module; the sqlite3 CLI may be
# missing). Read-only; WAL mode lets it read while the gateway writes.
log_rows() {
    python3 - "${GW_DATA[$1]}/logs.sqlite3" "$2" <<'EOF'
import sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, isolation_level=None)
db.execute("BEGIN")
seqs = [r[0] for r in db.execute(
    "SELECT seq FROM log_parts JOIN log_gateways ON log_gateways.no = log_parts.gateway WHERE log_gateways.name = ?",
    (sys.argv[2],))]
print(sum(db.execute(f"SELECT count(*) FROM logs_p{seq}").fetchone()[0] for seq in seqs))
EOF
}

# Streams and scale (7.): bench/scale.sh with the binaries of this run; its section, PASS/FAIL lines
# and raw output land in $WORK/scale (the raw output is appended to $RAW).
measure_scale() {
    if [[ ${BENCH_SKIP_SCALE:-0} == 1 ]]; then
        log "BENCH_SKIP_SCALE=1: streams and scale skipped"
        return
    fi
    log "streams and scale: bench/scale.sh"
    CARGO_TARGET_DIR=$TARGET_DIR BENCH_SKIP_BUILD=1 BENCH_STRICT=0 BENCH_SCALE_OUT=$WORK/scale "$BENCH/scale.sh" ||
        die "bench/scale.sh failed"
    cat "$WORK/scale/raw.log" >>"$RAW"
}

# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------

# wrk -t1 -cN on the client CPU, after a warm-up; fills RPS/P50/P99/ERRS[target,conc]. For an aigate
# target, adds the requests wrk completed (warm-up included) to SENT[target] and waits for its
# process's log writer to settle before the next point.
measure_throughput() {
    local target=$1 conc=$2 url=${URL[$1]} out line warm inst=${INSTANCE[$1]:-}
    local -a wrk=(taskset -c "$CLIENT_CPU" wrk -t1 -c"$conc" --timeout 5s -s "$BENCH/chat.lua")
    warm=$(BENCH_BODY_FILE=$BODY_FILE "${wrk[@]}" -d"${WARMUP}s" "$url" | grep '^BENCH ') ||
        die "no summary line in the warm-up wrk output for $target"
    # CPU time of an aigate process from the start of the measured load until its log writer has
    # settled (so it includes the writer's work for these requests, less what it still had from the
    # warm-up), per request: unlike req/s, hardly moved by other work on the machine.
    local ticks0="" mock0
    if [[ -n $inst ]]; then ticks0=$(cpu_ticks "${GW_PID[$inst]}"); fi
    # The mock's CPU time per request over the same load: the work it does per request is the same
    # for every target, so it gauges how fast the machine ran during this point (see the logging
    # cost in the report). It serves nothing while a log writer settles.
    mock0=$(cpu_ticks "$MOCK_PID")
    out=$(BENCH_BODY_FILE=$BODY_FILE "${wrk[@]}" -d"${DURATION}s" --latency "$url")
    printf '### wrk %s c=%s round %s\n%s\n\n' "$target" "$conc" "$ROUND" "$out" >>"$RAW"
    line=$(grep '^BENCH ' <<<"$out") || die "no summary line in the wrk output for $target"
    if [[ -n $inst ]]; then
        SENT[$target]=$((${SENT[$target]:-0} + $(field "$warm" requests) + $(field "$line" requests)))
        log_settle "$inst"
        CPU_US[$target,$conc]=$(calc "($(cpu_ticks "${GW_PID[$inst]}") - $ticks0) * 1000000 / $CLK_TCK / $(field "$line" requests)")
    fi
    MOCK_US[$target,$conc]=$(calc "($(cpu_ticks "$MOCK_PID") - $mock0) * 1000000 / $CLK_TCK / $(field "$line" requests)")
    local rps p50 p99 errs
    rps=$(field "$line" rps)
    p50=$(awk -v u="$(field "$line" p50_us)" 'BEGIN { printf "%.3f", u / 1000 }')
    p99=$(awk -v u="$(field "$line" p99_us)" 'BEGIN { printf "%.3f", u / 1000 }')
    errs=$(($(field "$line" socket_errors) + $(field "$line" non2xx)))
    # One line per round: "req/s p50 p99 cpu mock-cpu"; pick_medians chooses among them.
    ROUND_LINES[$target,$conc]+="$rps $p50 $p99 ${CPU_US[$target,$conc]:--} ${MOCK_US[$target,$conc]}"$'\n'
    ERRS[$target,$conc]=$((${ERRS[$target,$conc]:-0} + errs))
    log "$(printf '%-18s c=%-3s %10s req/s  p50 %7s ms  p99 %7s ms  errors %s%s  (round %s/%s)' "$target" "$conc" \
        "$rps" "$p50" "$p99" "$errs" "${inst:+  aigate CPU ${CPU_US[$target,$conc]} us/request}" "$ROUND" "$ROUNDS")  mock CPU ${MOCK_US[$target,$conc]} us/request"
}

# Each throughput figure: the round with the median req/s (its p50, p99 and CPU go with it).
pick_medians() {
    local key median
    for key in "${!ROUND_LINES[@]}"; do
        median=$(printf '%s' "${ROUND_LINES[$key]}" | sort -n -k1,1 | awk '{ l[NR] = $0 } END { print l[int((NR + 1) / 2)] }')
        read -r RPS[$key] P50[$key] P99[$key] CPU_US[$key] MOCK_US[$key] <<<"$median"
        if [[ ${CPU_US[$key]} == - ]]; then unset 'CPU_US[$key]'; fi
        ROUND_RPS[$key]=$(printf '%s' "${ROUND_LINES[$key]}" | awk '{ printf "%s%.0f", (NR > 1 ? " / " : ""), $1 }')
    done
}

# One added-latency load on one target: $RATE req/s for $RATE_DURATION s after a warm-up, the
# mock waiting $MOCK_LATENCY_MS ms before answering (x-mock-latency-ms, which nginx and aigate
# pass on). Writes a summary JSON to $2 and the latencies of the 2xx responses to
# $WORK/<target>.samples.
rate_load() {
    local target=$1 out=$2 url=${URL[$1]}
    local -a headers=(-H "$AUTH_HEADER" -H "x-mock-latency-ms: $MOCK_LATENCY_MS")
    if [[ $RATE_CLIENT == oha ]]; then
        local conns=$((RATE * (MOCK_LATENCY_MS + 100) / 1000 + 4))  # enough for the requests in flight
        local -a oha=(taskset -c "$CLIENT_CPU" "$OHA" --no-tui "${OHA_OPTS[@]}" -c "$conns" -q "$RATE" -m POST
            -H 'content-type: application/json' "${headers[@]}" -D "$BODY_FILE")
        "${oha[@]}" -z "${WARMUP}s" "$url" >/dev/null
        "${oha[@]}" -z "${RATE_DURATION}s" --output-format csv "$url" |
            python3 "$BENCH/oha_summary.py" --samples "$WORK/$target.samples" \
                --expected $((RATE * RATE_DURATION)) >"$out"
    else
        taskset -c "$CLIENT_CPU" python3 "$BENCH/rate.py" --url "$url" --body-file "$BODY_FILE" \
            --rate "$RATE" --duration "$RATE_DURATION" --warmup "$WARMUP" --samples "$WORK/$target.samples" \
            "${headers[@]}" >"$out"
    fi
}

# The added-latency points. With the python client the loads (one per target in TARGETS) run at the same time, each on
# its own target (independent Poisson arrivals, so they do not fall into step; the servers are
# idle >99% of the time at this rate, so they hardly meet); with oha one after another (oha's
# fixed-period loads would fall into step on the shared mock). Fills RATE_P50/RATE_P99/RATE_N/
# RATE_ERRS[target] and RATE_CI.
measure_rate() {
    local t json
    local -A pid
    if [[ $RATE_CLIENT == oha ]]; then
        log "added latency: oha, $RATE req/s to each target in turn for ${RATE_DURATION} s"
        for t in "${TARGETS[@]}"; do rate_load "$t" "$WORK/rate-$t.json"; done
    else
        log "added latency: bench/rate.py, $RATE req/s (Poisson) to each target at once for ${RATE_DURATION} s"
        for t in "${TARGETS[@]}"; do
            rate_load "$t" "$WORK/rate-$t.json" &
            pid[$t]=$!
        done
        for t in "${TARGETS[@]}"; do
            wait "${pid[$t]}" || die "the $RATE req/s load of $t failed"
        done
    fi
    for t in "${TARGETS[@]}"; do
        json=$(<"$WORK/rate-$t.json")
        printf '### %s req/s %s\n%s\n\n' "$RATE" "$t" "$json" >>"$RAW"
        RATE_P50[$t]=$(jfield "$json" p50_ms)
        RATE_P99[$t]=$(jfield "$json" p99_ms)
        RATE_N[$t]=$(jfield "$json" requests)
        RATE_ERRS[$t]=$(($(jfield "$json" errors) + $(jfield "$json" non2xx)))
        log "$(printf '%-18s %s req/s: %6s requests  p50 %8s ms  p99 %8s ms  errors %s' "$t" "$RATE" \
            "${RATE_N[$t]}" "${RATE_P50[$t]}" "${RATE_P99[$t]}" "${RATE_ERRS[$t]}")"
    done
    RATE_CI=$(python3 "$BENCH/stats.py" added "$WORK")
    printf '### %s req/s, 95%% bootstrap intervals\n%s\n\n' "$RATE" "$RATE_CI" >>"$RAW"
}

# After the throughput points: the rows of the `default` gateway in the SQLite log store of the
# aigate and aigate-bodies processes against the requests wrk completed on them (each point
# already waited for the writer to settle). They differ by the requests in flight when a wrk run
# stops (sent, answered and logged, but not counted by wrk: at most the concurrency per wrk run)
# and by records dropped. (The aigate process's `cached` gateway, loaded as aigate-hit, has rows of
# its own, not counted; the process's writer counters include them.) Fills ROWS and LOG_STATS.
count_log_rows() {
    local t inst written spilled dropped
    for t in "${LOGGED_TARGETS[@]}"; do
        inst=${INSTANCE[$t]}
        ROWS[$t]=$(log_rows "$inst" default)
        written=$(gw_metric "$inst" aigate_log_records_written)
        spilled=$(gw_metric "$inst" aigate_log_records_spilled)
        dropped=$(gw_metric "$inst" aigate_log_records_dropped)
        LOG_STATS[$t]="written $written, spilled $spilled, dropped $dropped"
        log "$t: ${ROWS[$t]} rows of gateway default, ${SENT[$t]} requests completed (wrk + probe);" \
            "process log writer: ${LOG_STATS[$t]}"
    done
}

# After the throughput points: each limiter process's counters of requests refused by a rule and of
# limit store errors (with the default on_store_error = "allow" a failing store lets requests
# through unchecked, which would make the limiter look free). Fills LIMIT_STATS.
count_limits() {
    local t refused errors
    for t in "${LIMIT_TARGETS[@]}"; do
        refused=$(gw_metric "$t" aigate_limit_refused)
        errors=$(gw_metric "$t" aigate_limit_store_errors)
        LIMIT_STATS[$t]="$refused refused, $errors store errors"
        log "$t: limiter ${LIMIT_STATS[$t]}"
    done
}

# The analytics benchmark of aigate-store (crates/aigate-store/examples/analytics_bench.rs): seeds
# 1M records over 30 days and times five 30-day analytics queries (median of 7 runs each), on
# SQLite and, when the example reaches it, on PostgreSQL. Unpinned: it runs alone, the servers are
# idle. Its output goes to $WORK/analytics.txt and the raw log; ANALYTICS_ROWS gets one
# "backend granularity group-by median min max" line per query and ANALYTICS_NOTES the seeding
# and PostgreSQL lines.
measure_analytics() {
    ANALYTICS_ROWS="" ANALYTICS_NOTES=""
    if [[ ${BENCH_SKIP_ANALYTICS:-0} == 1 ]]; then
        log "BENCH_SKIP_ANALYTICS=1: analytics benchmark skipped"
        return
    fi
    log "analytics: $BIN/examples/analytics_bench (1M records; SQLite, then PostgreSQL if reachable)"
    (cd "$WORK" && "$BIN/examples/analytics_bench") >"$WORK/analytics.txt" 2>&1 ||
        die "analytics_bench failed: $(tail -n 5 "$WORK/analytics.txt")"
    printf '### analytics_bench\n%s\n\n' "$(<"$WORK/analytics.txt")" >>"$RAW"
    ANALYTICS_ROWS=$(python3 - "$WORK/analytics.txt" <<'EOF'
import re, sys
backend = None
for line in open(sys.argv[1]):
    m = re.match(r"(\w+): seeding", line)
    if m:
        backend = m.group(1)
    m = re.search(r"30 days,\s*(\S+), group by (\S+)\s+([\d.]+) ms median \(\s*([\d.]+) min,\s*([\d.]+) max\)", line)
    if m and backend:
        print(backend, *m.groups())
EOF
)
    ANALYTICS_NOTES=$(grep -E '^(sqlite|postgres)(: seeded|: [0-9]+ rollup| at .* unreachable)' "$WORK/analytics.txt" || true)
    [[ -n $ANALYTICS_ROWS ]] || die "no query times in the analytics_bench output (see $RAW)"
    log "analytics: $(wc -l <<<"$ANALYTICS_ROWS") queries timed"
}

# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

machine() {
    local model mem
    model=$(lscpu | awk -F: '/Model name/ { gsub(/^[ \t]+/, "", $2); print $2; exit }')
    mem=$(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
    printf '%s CPUs (nproc), %s, %s RAM, Linux %s' "$(nproc)" "${model:-unknown CPU}" "$mem" "$(uname -r)"
}

# The source measured: commit, and whether the work tree differed from it (read-only git calls).
source_version() {
    local commit dirty=""
    commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) || { echo "unknown commit"; return; }
    if [[ -n $(git -C "$ROOT" --no-optional-locks status --porcelain --untracked-files=no -- crates Cargo.toml Cargo.lock 2>/dev/null) ]]; then
        dirty=" with uncommitted changes in crates/ or Cargo.*"
    fi
    echo "commit $commit$dirty"
}

report() {
    local c t v verdicts=() fails=0 ng_v wrk_v rate_tool
    ng_v=$($NGINX -v 2>&1 | sed 's|^nginx version: nginx/||')
    wrk_v=$(wrk -v 2>&1 | head -n1 | awk '{ print $2 }' || true)
    if [[ $RATE_CLIENT == oha ]]; then
        rate_tool="$("$OHA" --version | head -n1) -q $RATE (fixed ${RATE} req/s period), one target after another"
    else
        rate_tool="bench/rate.py, Poisson arrivals at a mean of $RATE req/s, the ${#TARGETS[@]} targets loaded at the same time"
    fi

    # The proxy and cache-path targets, on the logs-off process (aigate-nolog, aigate-nolog-hit);
    # ratio, added and hit_ratio keyed by target so the default config's (aigate, aigate-hit) are
    # reported beside them for information.
    local -A ratio added hit_ratio
    for t in aigate-nolog aigate; do
        ratio[$t]=$(calc "${RPS[$t,32]} / ${RPS[nginx,32]}")
        added[$t]=$(calc "${RATE_P50[$t]} - ${RATE_P50[direct]}")
    done
    added[nginx]=$(calc "${RATE_P50[nginx]} - ${RATE_P50[direct]}")
    for t in aigate-nolog-hit aigate-hit; do hit_ratio[$t]=$(calc "${RPS[$t,32]} / ${RPS[direct,32]}"); done
    if is_true "${ratio[aigate-nolog]} >= $TARGET_THROUGHPUT_RATIO"; then verdicts+=(PASS); else verdicts+=(FAIL); fi
    if is_true "${added[aigate-nolog]} <= ${added[nginx]} + $TARGET_ADDED_P50_SLACK_MS"; then verdicts+=(PASS); else verdicts+=(FAIL); fi
    if ((IDLE_RSS <= TARGET_IDLE_RSS_KIB)); then verdicts+=(PASS); else verdicts+=(FAIL); fi
    if is_true "${hit_ratio[aigate-nolog-hit]} >= $TARGET_HIT_RATIO"; then verdicts+=(PASS); else verdicts+=(FAIL); fi
    if is_true "${P99[aigate-nolog-hit,32]} <= ${P99[nginx,32]}"; then verdicts+=(PASS); else verdicts+=(FAIL); fi
    # Logging cost, for aigate (logs on) and aigate-bodies at each concurrency, per round (the two
    # points of a round were measured seconds apart) and the median over the rounds: raw,
    # 1 - req/s with logs / req/s without; and at the same machine speed, each point's req/s
    # scaled by the mock's CPU time per request during it (the servers share one saturated CPU, so
    # req/s x mock µs/request is the share of that CPU the mock got: it does not move when the
    # whole VM slows down or speeds up, which on one VM moved single rounds' raw cost from -74 to
    # +32 %).
    # The verdicts (5 onwards, in the order of log_lines) are on the latter.
    local -A cost ncost
    local -a log_lines=()
    # The median of awk expression $2 over the paired round lines of targets $1 and $4 (default
    # aigate-nolog) at concurrency $3 (fields 1-5: the target's "req/s p50 p99 cpu mock", 6-10: the
    # other's), and the per-round values as "a / b / c".
    round_costs() {
        local vals
        vals=$(paste -d' ' <(printf '%s' "${ROUND_LINES[$1,$3]}") <(printf '%s' "${ROUND_LINES[${4:-aigate-nolog},$3]}") |
            awk "{ printf \"%.3f\\n\", 100 * ($2) }")
        printf '%s|%s' "$(sort -g <<<"$vals" | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')" \
            "$(awk '{ printf "%s%.1f", (NR > 1 ? " / " : ""), $1 }' <<<"$vals")"
    }
    local out
    for c in "${CONCURRENCIES[@]}"; do
        for t in aigate aigate-bodies; do
            out=$(round_costs "$t" '1 - $1 / $6' "$c")
            cost[$t,$c]=${out%%|*} ROUND_COST[$t,$c]=${out#*|}
            out=$(round_costs "$t" '1 - ($1 * $5) / ($6 * $10)' "$c")
            ncost[$t,$c]=${out%%|*} ROUND_NCOST[$t,$c]=${out#*|}
            if is_true "${ncost[$t,$c]} <= 100 * $TARGET_LOG_COST"; then verdicts+=(PASS); else verdicts+=(FAIL); fi
            log_lines+=("$t,$c")
        done
    done
    # Telemetry export (aigate-otel against aigate, measured back to back), as the logging cost.
    local otel_cost otel_ncost otel_rounds otel_nrounds otel_v=""
    if [[ " ${TP_TARGETS[*]} " == *" aigate-otel "* ]]; then
        out=$(round_costs aigate-otel '1 - $1 / $6' 32 aigate)
        otel_cost=${out%%|*} otel_rounds=${out#*|}
        out=$(round_costs aigate-otel '1 - ($1 * $5) / ($6 * $10)' 32 aigate)
        otel_ncost=${out%%|*} otel_nrounds=${out#*|}
        if is_true "$otel_ncost <= 100 * $TARGET_OTEL_COST"; then otel_v=PASS; else otel_v=FAIL; fi
        verdicts+=("$otel_v")
    fi
    # Analytics: the slowest median per backend against the target.
    local -a an_lines=()
    local b slowest
    if [[ -n $ANALYTICS_ROWS ]]; then
        for b in $(awk '{ print $1 }' <<<"$ANALYTICS_ROWS" | uniq); do
            slowest=$(awk -v b="$b" '$1 == b && $4 > m { m = $4 } END { printf "%.2f", m }' <<<"$ANALYTICS_ROWS")
            if is_true "$slowest < $TARGET_ANALYTICS_MS"; then verdicts+=(PASS); else verdicts+=(FAIL); fi
            an_lines+=("$b $slowest $(awk -v b="$b" '$1 == b && $6 > m { m = $6 } END { printf "%.2f", m }' <<<"$ANALYTICS_ROWS")")
        done
    fi
    for v in "${verdicts[@]}"; do [[ $v == PASS ]] || fails=$((fails + 1)); done
    if [[ -s $WORK/scale/targets.md ]]; then fails=$((fails + $(grep -c '^- FAIL' "$WORK/scale/targets.md" || true))); fi
    FAILS=$fails

    echo "# aigate benchmark: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- machine: $(machine)"
    echo "- aigate $(source_version); nginx $ng_v; wrk $wrk_v"
    echo "- servers (mock, nginx, the aigate processes ${INSTANCES[*]}) pinned to CPU $SERVER_CPU," \
        "load generators to CPU $CLIENT_CPU;" \
        "throughput: ${ROUNDS} rounds of ${DURATION} s per point (every target once per round; the figures are the round with the median req/s)," \
        "${RATE_DURATION} s per added-latency point, ${WARMUP} s warm-up before each"
    echo "- request: POST /v1/chat/completions, $(wc -c <"$BODY_FILE")-byte JSON body, non-streaming;" \
        "response body ${RESPONSE_BYTES} bytes"
    echo "- command: \`${COMMAND_LINE}\`; load average before the run: ${LOADAVG}"
    echo
    echo "## Throughput (wrk, 1 thread, keep-alive)"
    echo
    echo "Each row is the median of ${ROUNDS} rounds (by req/s; its p50 and p99 go with it); every round"
    echo "measured every target once, in the order of the table. The last column lists each round's req/s."
    echo
    echo "| target | concurrency | req/s | p50 ms | p99 ms | req/s vs nginx | errors | req/s per round |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    for c in "${CONCURRENCIES[@]}"; do
        for t in "${TP_TARGETS[@]}"; do
            printf '| %s | %s | %.0f | %.3f | %.3f | %sx | %s | %s |\n' "$t" "$c" "${RPS[$t,$c]}" "${P50[$t,$c]}" \
                "${P99[$t,$c]}" "$(calc "${RPS[$t,$c]} / ${RPS[nginx,$c]}")" "${ERRS[$t,$c]}" "${ROUND_RPS[$t,$c]}"
        done
    done
    echo
    echo "At concurrency 128 nginx has more requests in flight than its \`keepalive 64\` keeps idle upstream" \
        "connections, so it opens and closes upstream connections as it goes; at 32 it reuses them all."
    echo
    echo "## Added latency at ${RATE} req/s, mock answering after ${MOCK_LATENCY_MS} ms"
    echo
    echo "Load: ${rate_tool}."
    echo
    echo "| target | requests | p50 ms | p99 ms | added p50 ms | added p50, 95% interval | added p99 ms | errors |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for t in "${TARGETS[@]}"; do
        local ap50="-" ap99="-" apci="-"
        if [[ $t != direct ]]; then
            ap50=$(calc "${RATE_P50[$t]} - ${RATE_P50[direct]}")
            ap99=$(calc "${RATE_P99[$t]} - ${RATE_P99[direct]}")
            apci=$(ci "${t}_added_p50_ci")
        fi
        printf '| %s | %s | %.3f | %.3f | %s | %s | %s | %s |\n' "$t" "${RATE_N[$t]}" "${RATE_P50[$t]}" \
            "${RATE_P99[$t]}" "$ap50" "$apci" "$ap99" "${RATE_ERRS[$t]}"
    done
    echo
    echo "The mock's ${MOCK_LATENCY_MS} ms wait is rounded to tokio's 1 ms timer tick, which spreads every" \
        "target's latencies over about 1 ms; the intervals (bootstrap over the requests) show how far that" \
        "moves a median. The p99 figures include the load generator's own scheduling noise."
    echo
    echo "## Memory (RSS)"
    echo
    echo "| process | idle (after start, before load) | peak (VmHWM after the load) |"
    echo "| --- | ---: | ---: |"
    printf '| aigate | %.1f MiB | %.1f MiB |\n' "$(calc "$IDLE_RSS / 1024")" "$(calc "$PEAK_RSS / 1024")"
    printf '| nginx (master + worker) | %.1f MiB | %.1f MiB |\n' "$(calc "$NGINX_IDLE_RSS / 1024")" \
        "$(calc "$NGINX_PEAK_RSS / 1024")"
    for t in "${INSTANCES[@]:1}"; do
        printf '| %s (peak after the throughput points) | %.1f MiB | %.1f MiB |\n' "$t" "$(calc "${GW_IDLE_RSS[$t]} / 1024")" \
            "$(calc "${GW_PEAK_RSS[$t]} / 1024")"
    done
    echo
    echo "## Logging cost"
    echo
    echo "The throughput points of aigate-nolog (\`[gateways.default.logs] enabled = false\`), aigate (the" \
        "default: logs on, bodies off) and aigate-bodies (\`bodies = true\`): three aigate processes with" \
        "their own data_dir (SQLite log file), measured back to back, each point after the previous" \
        "process's log writer had stored everything. Raw cost = 1 - req/s / aigate-nolog req/s of the same" \
        "round. The speed of this VM moves by up to a third within minutes (the mock's CPU time per" \
        "request, a fixed amount of work, went from 12 to 23 µs in one run), which moved single rounds'" \
        "raw cost from -4 to +14 %; so each point's req/s is also taken at the same machine speed:" \
        "multiplied by the mock's CPU time per request during that point (the servers share one saturated" \
        "CPU, so req/s x mock µs/request is the share of it the mock got, which a slower or faster VM does" \
        "not change). Cost at equal speed = 1 - (req/s x mock µs) / (aigate-nolog req/s x mock µs) of the" \
        "same round; the targets are checked on it. Both are the median over the rounds (each round's in" \
        "the last columns); the req/s shown are each target's median round. CPU: user + system time of the" \
        "aigate process (all threads, the log writer's included) from the start of the measured load until" \
        "its writer settled, per request; mock: the mock's, per request."
    echo
    echo "| target | concurrency | req/s | p50 ms | p99 ms | cost at equal speed | raw cost | p99 vs aigate-nolog | aigate CPU µs/request | CPU vs aigate-nolog | mock CPU µs/request | cost per round, equal speed | raw cost per round |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"
    for c in "${CONCURRENCIES[@]}"; do
        for t in aigate-nolog aigate aigate-bodies; do
            local cst="-" ncst="-" dp99="-" dcpu="-" rounds="-" nrounds="-"
            if [[ $t != aigate-nolog ]]; then
                rounds="${ROUND_COST[$t,$c]} %"
                nrounds="${ROUND_NCOST[$t,$c]} %"
                cst="$(printf '%.1f' "${cost[$t,$c]}") %"
                ncst="$(printf '%.1f' "${ncost[$t,$c]}") %"
                dp99="$(printf '%+.3f' "$(calc "${P99[$t,$c]} - ${P99[aigate-nolog,$c]}")") ms"
                dcpu="$(printf '%+.1f' "$(calc "${CPU_US[$t,$c]} - ${CPU_US[aigate-nolog,$c]}")") µs"
                dcpu+=" ($(printf '%+.0f' "$(calc "100 * (${CPU_US[$t,$c]} / ${CPU_US[aigate-nolog,$c]} - 1)")") %)"
            fi
            printf '| %s | %s | %.0f | %.3f | %.3f | %s | %s | %s | %.1f | %s | %.1f | %s | %s |\n' "$t" "$c" "${RPS[$t,$c]}" \
                "${P50[$t,$c]}" "${P99[$t,$c]}" "$ncst" "$cst" "$dp99" "${CPU_US[$t,$c]}" "$dcpu" "${MOCK_US[$t,$c]}" "$nrounds" "$rounds"
        done
    done
    echo
    echo "Records stored: rows of the \`default\` gateway in the process's SQLite log store after the" \
        "throughput points, against the requests wrk completed on it (warm-ups and the probe request" \
        "included; requests still in flight when a wrk run stops are answered and logged but not counted" \
        "by wrk). Past the retention cap (\`max_records\`, 1,000,000 by default) a gateway holds between" \
        "the cap less a sixteenth (and an eighth of that) and the cap: its oldest partition goes whole." \
        "The writer counters are the process's (\`/metrics\`); aigate's include its \`cached\`" \
        "gateway (aigate-hit)."
    echo
    echo "| target | rows stored | requests completed (wrk + probe) | rows - requests | process log writer |"
    echo "| --- | ---: | ---: | ---: | --- |"
    for t in "${LOGGED_TARGETS[@]}"; do
        printf '| %s | %s | %s | %+d | %s |\n' "$t" "${ROWS[$t]}" "${SENT[$t]}" "$((ROWS[$t] - SENT[$t]))" \
            "${LOG_STATS[$t]}"
    done
    echo
    echo "## Limiter and telemetry cost"
    echo
    local redis_note="No aigate-limit-redis in this run (no Redis answering at $REDIS_URL, or BENCH_SKIP_REDIS=1)."
    if [[ " ${LIMIT_TARGETS[*]} " == *" aigate-limit-redis "* ]]; then
        redis_note="aigate-limit-redis: the same rules in Redis (\`[storage] limits = \"$REDIS_URL\"\`; Redis"
        redis_note+=" is not pinned, and its CPU is not in the aigate CPU column)."
    fi
    echo "aigate-limit: the default config of aigate (logs on) plus a sliding gateway rate limit (10^9" \
        "requests per 1h) and a per-credential token rule (10^12 tokens per 1h): never reached, checked on" \
        "every request, the token reservation settled to the response's usage; in the in-memory limit" \
        "store. $redis_note Each is measured right after aigate (the same config without rules) at each" \
        "concurrency; CPU as in Logging cost. aigate-otel: aigate's config plus \`[telemetry]\`, every" \
        "request's span exported to the mock (on the servers' CPU)."
    echo
    echo "| target | concurrency | req/s | p50 ms | p99 ms | aigate CPU µs/request | req/s vs aigate | p50 vs aigate | p99 vs aigate | CPU vs aigate |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for c in "${CONCURRENCIES[@]}"; do
        for t in aigate "${LIMIT_TARGETS[@]}" aigate-otel; do
            [[ " ${TP_TARGETS[*]} " == *" $t "* ]] || continue
            local drps="-" dp50="-" dp99="-" dcpu="-"
            if [[ $t != aigate ]]; then
                drps="$(printf '%+.1f' "$(calc "100 * (${RPS[$t,$c]} / ${RPS[aigate,$c]} - 1)")") %"
                dp50="$(printf '%+.3f' "$(calc "${P50[$t,$c]} - ${P50[aigate,$c]}")") ms"
                dp99="$(printf '%+.3f' "$(calc "${P99[$t,$c]} - ${P99[aigate,$c]}")") ms"
                dcpu="$(printf '%+.1f' "$(calc "${CPU_US[$t,$c]} - ${CPU_US[aigate,$c]}")") µs"
            fi
            printf '| %s | %s | %.0f | %.3f | %.3f | %.1f | %s | %s | %s | %s |\n' "$t" "$c" "${RPS[$t,$c]}" \
                "${P50[$t,$c]}" "${P99[$t,$c]}" "${CPU_US[$t,$c]}" "$drps" "$dp50" "$dp99" "$dcpu"
        done
    done
    echo
    echo "| target | x-ratelimit headers of a probe request | limiter counters after the throughput points |"
    echo "| --- | --- | --- |"
    for t in "${LIMIT_TARGETS[@]}"; do
        printf '| %s | %s | %s |\n' "$t" "${LIMIT_HEADERS[$t]}" "${LIMIT_STATS[$t]}"
    done
    echo
    if [[ -s $WORK/scale/section.md ]]; then
        cat "$WORK/scale/section.md"
        echo
    fi
    echo "## Analytics queries over 1M log records"
    echo
    if [[ -z $ANALYTICS_ROWS ]]; then
        echo "Skipped (BENCH_SKIP_ANALYTICS=1)."
    else
        echo "\`target/release/examples/analytics_bench\` (\`crates/aigate-store/examples/analytics_bench.rs\`):" \
            "1,000,000 records over 30 days inserted in batches of 1000, then each 30-day query run 7 times;" \
            "median, fastest and slowest of the 7."
        echo
        echo "| backend | granularity | group by | median ms | min ms | max ms |"
        echo "| --- | --- | --- | ---: | ---: | ---: |"
        awk '{ printf "| %s | %s | %s | %.2f | %.2f | %.2f |\n", $1, $2, $3, $4, $5, $6 }' <<<"$ANALYTICS_ROWS"
        echo
        sed 's/^/- /' <<<"$ANALYTICS_NOTES"
    fi
    echo
    echo "## Targets"
    echo
    # The proxy and cache-path lines (0, 1, 3, 4) are on the logs-off process; the default config's
    # figures follow each as information, not as a verdict.
    local off="(request logs off: the proxy path; the default with logs on is in Logging cost)"
    local off_hit="(request logs off: the cache path; the default with logs on is in Logging cost)"
    echo "- ${verdicts[0]}: aigate-nolog throughput at concurrency 32 is ${ratio[aigate-nolog]}x nginx" \
        "(target >= ${TARGET_THROUGHPUT_RATIO}x) $off"
    echo "  - information, default config (logs on): aigate at concurrency 32 is ${ratio[aigate]}x nginx"
    echo "- ${verdicts[1]}: aigate-nolog added p50 at ${RATE} req/s is ${added[aigate-nolog]} ms, nginx ${added[nginx]} ms" \
        "(target <= nginx + ${TARGET_ADDED_P50_SLACK_MS} ms); aigate-nolog p50 - nginx p50 =" \
        "$(jfield "$RATE_CI" aigate-nolog_minus_nginx_p50) ms, 95% interval $(ci aigate-nolog_minus_nginx_p50_ci) ms $off"
    echo "  - information, default config (logs on): aigate added p50 ${added[aigate]} ms; aigate p50 - nginx p50 =" \
        "$(jfield "$RATE_CI" aigate_minus_nginx_p50) ms, 95% interval $(ci aigate_minus_nginx_p50_ci) ms"
    echo "- ${verdicts[2]}: aigate idle RSS is $(awk -v k="$IDLE_RSS" 'BEGIN { printf "%.1f", k / 1024 }') MiB" \
        "(target <= $((TARGET_IDLE_RSS_KIB / 1024)) MiB; the default config)"
    echo "- ${verdicts[3]}: aigate-nolog-hit cache-hit throughput at concurrency 32 is ${hit_ratio[aigate-nolog-hit]}x" \
        "direct-to-mock (target >= ${TARGET_HIT_RATIO}x) $off_hit"
    echo "  - information, default config (logs on): aigate-hit at concurrency 32 is ${hit_ratio[aigate-hit]}x direct-to-mock"
    echo "- ${verdicts[4]}: aigate-nolog-hit cache-hit p99 at concurrency 32 is ${P99[aigate-nolog-hit,32]} ms, nginx" \
        "${P99[nginx,32]} ms (target: no worse than nginx) $off_hit"
    echo "  - information, default config (logs on): aigate-hit p99 at concurrency 32 is ${P99[aigate-hit,32]} ms"
    local i=5 key what
    for key in "${log_lines[@]}"; do
        t=${key%,*} c=${key#*,}
        if [[ $t == aigate ]]; then what="logs on (aigate)"; else what="logs with bodies (aigate-bodies)"; fi
        echo "- ${verdicts[$i]}: logging cost at concurrency $c, $what: $(printf '%.1f' "${ncost[$t,$c]}") % at equal" \
            "machine speed, the median of the rounds' 1 - (req/s x mock µs/request) / (aigate-nolog's)" \
            "(${ROUND_NCOST[$t,$c]} %); raw $(printf '%.1f' "${cost[$t,$c]}") % (${ROUND_COST[$t,$c]} %)" \
            "(target <= $(calc "100 * $TARGET_LOG_COST" | sed 's/\.000$//') %)"
        i=$((i + 1))
    done
    if [[ -n $otel_v ]]; then
        echo "- ${verdicts[$i]}: telemetry cost at concurrency 32 (aigate-otel against aigate):" \
            "$(printf '%.1f' "$otel_ncost") % at equal machine speed ($otel_nrounds %); raw" \
            "$(printf '%.1f' "$otel_cost") % ($otel_rounds %) (target <= $(calc "100 * $TARGET_OTEL_COST" | sed 's/\.000$//') %);" \
            "spans exported $(gw_metric aigate-otel aigate_otel_exported_spans), dropped $(gw_metric aigate-otel aigate_otel_dropped_spans)"
        i=$((i + 1))
    fi
    for key in "${an_lines[@]}"; do
        read -r b slowest v <<<"$key"
        echo "- ${verdicts[$i]}: analytics over 1M records on $b: slowest query median $slowest ms, slowest single" \
            "run $v ms (target < ${TARGET_ANALYTICS_MS} ms per query, on the median)"
        i=$((i + 1))
    done
    if [[ -s $WORK/scale/targets.md ]]; then cat "$WORK/scale/targets.md"; fi
    # The limiter: information (issue #5's per-call target is the criterion benchmark's, see
    # docs/benchmarks.md).
    for t in "${LIMIT_TARGETS[@]}"; do
        echo
        echo "Limiter, $t against aigate:" \
            "$(for c in "${CONCURRENCIES[@]}"; do
                printf 'c=%s %+.1f %% req/s, %+.1f µs CPU/request; ' "$c" \
                    "$(calc "100 * (${RPS[$t,$c]} / ${RPS[aigate,$c]} - 1)")" "$(calc "${CPU_US[$t,$c]} - ${CPU_US[aigate,$c]}")"
            done)${LIMIT_STATS[$t]} (information, no target)."
    done

    local total_errors=0
    for c in "${CONCURRENCIES[@]}"; do for t in "${TP_TARGETS[@]}"; do total_errors=$((total_errors + ERRS[$t,$c])); done; done
    for t in "${TARGETS[@]}"; do total_errors=$((total_errors + RATE_ERRS[$t])); done
    if is_true "${LOADAVG%% *} > 0.5"; then
        echo
        echo "WARNING: the load average was ${LOADAVG} before the run: other work on the machine may have skewed it."
    fi
    if ((total_errors > 0)); then
        echo
        echo "WARNING: $total_errors failed or non-2xx requests; the figures above are not comparable."
    fi
}

# ------------------------------------------------------------------------------------------------

main() {
    COMMAND_LINE="$(env | { grep -E '^(BENCH_|AIGATE_SKIP_POSTGRES=)' || true; } | sort | tr '\n' ' ')bench/run.sh"
    LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/aigate-bench.XXXXXX")
    chmod 755 "$WORK"  # the nginx worker may run as another user
    trap cleanup EXIT
    trap 'exit 130' INT TERM

    (($(nproc) >= 2)) || log "warning: fewer than 2 CPUs; servers and load generators will share one"
    if is_true "${LOADAVG%% *} > 0.5"; then
        log "warning: load average is $LOADAVG; other work on this machine will skew the figures"
    fi
    ensure_tools
    check_redis
    build
    mkdir -p "$RESULTS"
    RAW=$RESULTS/latest-raw.log
    : >"$RAW"

    start_servers
    sleep 1  # let start-up settle before reading the idle RSS
    IDLE_RSS=$(kib "$AIGATE_PID" VmRSS)
    for t in "${INSTANCES[@]:1}"; do GW_IDLE_RSS[$t]=$(kib "${GW_PID[$t]}" VmRSS); done
    NGINX_IDLE_RSS=$(nginx_rss "$NGINX_PID" VmRSS)
    log "aigate idle RSS ${IDLE_RSS} KiB, nginx (master + worker) ${NGINX_IDLE_RSS} KiB"

    local t c
    for t in "${TP_TARGETS[@]}"; do
        probe "$t" "${URL[$t]}"
        SENT[$t]=1  # the probe: a request completed (and logged) like wrk's
    done
    # One more request through each limiter target, to read the x-ratelimit-* headers its rules set.
    for t in "${LIMIT_TARGETS[@]}"; do
        LIMIT_HEADERS[$t]=$(limit_headers "$t")
        SENT[$t]=$((SENT[$t] + 1))
        [[ -n ${LIMIT_HEADERS[$t]} ]] || die "$t: no x-ratelimit-* headers: are the rules applied?"
        log "$t: ${LIMIT_HEADERS[$t]}"
    done
    RESPONSE_BYTES=$(curl -s -X POST -H 'content-type: application/json' --data-binary @"$BODY_FILE" \
        "${URL[direct]}" | wc -c)

    for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
        for c in "${CONCURRENCIES[@]}"; do
            local -a order=("${TP_TARGETS[@]}")
            if ((ROUND % 2 == 0)); then
                local i
                order=()
                for ((i = ${#TP_TARGETS[@]} - 1; i >= 0; i--)); do order+=("${TP_TARGETS[i]}"); done
            fi
            for t in "${order[@]}"; do measure_throughput "$t" "$c"; done
        done
    done
    pick_medians
    count_log_rows
    count_limits
    # The processes other than aigate: peak RSS after the throughput points (aigate-nolog also
    # takes part in the added-latency points, which add little).
    for t in "${INSTANCES[@]:1}"; do GW_PEAK_RSS[$t]=$(kib "${GW_PID[$t]}" VmHWM); done
    measure_rate
    measure_scale

    PEAK_RSS=$(kib "$AIGATE_PID" VmHWM)
    NGINX_PEAK_RSS=$(nginx_rss "$NGINX_PID" VmHWM)
    log "aigate peak RSS (VmHWM) ${PEAK_RSS} KiB"
    measure_analytics

    report >"$RESULTS/latest.md"  # not in a pipe: report sets FAILS
    cat "$RESULTS/latest.md"
    log "wrote $RESULTS/latest.md and $RAW"
    if ((FAILS > 0)) && [[ ${BENCH_STRICT:-0} == 1 ]]; then exit 1; fi
}

main "$@"
