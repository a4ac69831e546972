#!/usr/bin/env bash
# bench/scale.sh: streams and scale, the targets of issue 20 that bench/run.sh's throughput points
# do not measure. bench/run.sh runs it after its throughput points and puts its section and target
# lines in its report; it also runs alone:
#
#   bench/scale.sh                                              # builds the release binaries first
#   CARGO_TARGET_DIR=DIR BENCH_SKIP_BUILD=1 bench/scale.sh      # the binaries already in DIR/release
#
# About 1.5 minutes. Its own servers, pinned to CPU 0 (the load generators to CPU 1), every process
# with the open-file limit raised to the hard limit (or to what BENCH_CONNECTIONS needs):
#   direct            aigate-mock (no delay between events unless a request asks for one with
#                     x-mock-chunk-delay-ms, which aigate passes on)
#   nginx             as in bench/run.sh (bench/nginx.conf.template)
#   aigate-nolog      aigate, cache off, request logs off: every request a miss
#   aigate-nolog-hit  a second aigate process, cache on, logs off: every request after the first
#                     a memory-tier hit
#
# Measured (CPU: the aigate process's user + system time, /proc/PID/stat, over the point, per
# request or stream; for nginx, master and worker):
#   1. time to first event of a streamed chat completion (`"stream": true`), bench/streams.py ttfe:
#      BENCH_TTFE_N streams to each of direct, aigate-nolog (miss) and aigate-nolog-hit (hit), one
#      at a time and in turn, each target on one kept-alive connection, timed from the request's
#      send to the first `data:` bytes; p50 - direct p50 with a 95 % bootstrap interval;
#   2. BENCH_STREAMS streams at once through aigate-nolog (bench/streams.py concurrent), the mock
#      waiting BENCH_STREAM_DELAY_MS between events so that they are all open together: each must
#      answer the reference stream byte for byte, ending with `data: [DONE]`;
#   3. req/s of aigate-nolog and nginx at concurrency 32 and 1024 (wrk -t1, a warm-up, then
#      BENCH_DURATION s), BENCH_SCALE_ROUNDS rounds, even rounds in reverse order; figures are the
#      means over the rounds;
#   4. BENCH_CONNECTIONS (10,000) keep-alive connections, each with a request in flight, against
#      aigate-nolog: wrk -t1 -c10000 for BENCH_CONN_DURATION s; every 0.5 s aigate's VmRSS, the
#      connections established on its side and on wrk's, and its open files; VmHWM after; the
#      kernel's listen queue overflows; the reasons of aigate's upstream failures (aigate-nolog
#      logs them at debug level for this).
#
# Output: a markdown report on stdout, also written to bench/results/scale.md (raw output in
# bench/results/scale-raw.log). With BENCH_SCALE_OUT=DIR (bench/run.sh), DIR/section.md (the
# section), DIR/targets.md (the PASS/FAIL lines) and DIR/raw.log instead, nothing on stdout.
#
# Environment (the others as in bench/run.sh: BENCH_DURATION, BENCH_WARMUP, BENCH_SKIP_BUILD,
# BENCH_SERVER_CPU, BENCH_CLIENT_CPU, BENCH_KEEP_TMP, BENCH_STRICT):
#   BENCH_TTFE_N           streams timed per target for the time to first event (default 2000)
#   BENCH_STREAMS          streams at once (default 1000)
#   BENCH_STREAM_DELAY_MS  the mock's wait between their events (default 300: 11 events, 3 s)
#   BENCH_SCALE_ROUNDS     rounds of the c=32 / c=1024 points (default 2)
#   BENCH_CONNECTIONS      connections of the connection point (default 10000)
#   BENCH_CONN_DURATION    seconds of the connection point (default 10)

set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
DURATION=${BENCH_DURATION:-5}
WARMUP=${BENCH_WARMUP:-2}
TTFE_N=${BENCH_TTFE_N:-2000}
STREAMS=${BENCH_STREAMS:-1000}
STREAM_DELAY_MS=${BENCH_STREAM_DELAY_MS:-300}
ROUNDS=${BENCH_SCALE_ROUNDS:-2}
CONNECTIONS=${BENCH_CONNECTIONS:-10000}
CONN_DURATION=${BENCH_CONN_DURATION:-10}
SERVER_CPU=${BENCH_SERVER_CPU:-0}
CLIENT_CPU=${BENCH_CLIENT_CPU:-1}
OUT=${BENCH_SCALE_OUT:-}
BODY_FILE=$BENCH/request.json
NGINX=/usr/sbin/nginx
CONCURRENCIES=(32 1024)

TARGET_TTFE_SLACK_MS=0.1     # aigate-nolog and aigate-nolog-hit p50 <= direct p50 + 0.1 ms
TARGET_CONN_RSS_KIB=153600   # aigate VmHWM < 150 MiB with BENCH_CONNECTIONS connections, 0 errors
TARGET_C1024_RATIO=0.9       # aigate-nolog req/s at c=1024 >= 0.9 x at c=32

WORK=""
PIDS=()
LOAD_PID=""  # wrk of the connection point while it runs
declare -A URL PORT PID RPS P50 P99 ERRS CPU_US ROUND_RPS
CLK_TCK=$(getconf CLK_TCK)

log() { printf '[scale %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
calc() { awk "BEGIN { printf \"%.3f\", $* }"; }
is_true() { awk "BEGIN { exit !($*) }"; }
kib() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
# utime + stime of process $1 in clock ticks (as bench/run.sh).
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
# CPU ticks of a target's server: the aigate process, or nginx's master and worker.
target_ticks() {
    local total pid
    total=$(cpu_ticks "${PID[$1]}")
    if [[ $1 == nginx ]]; then
        for pid in $(cat "/proc/${PID[nginx]}/task/${PID[nginx]}/children"); do total=$((total + $(cpu_ticks "$pid"))); done
    fi
    echo "$total"
}
us_per() { calc "$1 * 1000000 / $CLK_TCK / $2"; }  # ticks $1 over $2 requests, in µs
field() { tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1 == k { print $2 }'; }
jget() { python3 -c 'import json,sys; v=json.loads(sys.argv[1]); [v := v[k] for k in sys.argv[2:]]; print(v)' "$@"; }

cleanup() {
    local rc=$? pid _
    trap - EXIT INT TERM
    if [[ -n $LOAD_PID ]]; then kill -TERM "$LOAD_PID" 2>/dev/null || true; fi
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $rc -ne 0 ]]; then
            for f in "$WORK"/*.log "$WORK"/nginx/error.log; do
                [[ -s $f ]] && { log "--- tail of $f"; tail -n 20 "$f" >&2; }
            done
        fi
        if [[ ${BENCH_KEEP_TMP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    fi
    exit "$rc"
}

# Starts "$@" in the background pinned to the server CPU as target $1, and waits until it listens
# on PORT[$1].
start_server() {
    local name=$1 _
    shift
    taskset -c "$SERVER_CPU" "$@" >"$WORK/$name.log" 2>&1 &
    PID[$name]=$!
    PIDS+=("$!")
    for _ in $(seq 100); do
        kill -0 "${PID[$name]}" 2>/dev/null || die "$name exited before listening (see $WORK/$name.log)"
        if ss -Hltn "sport = :${PORT[$name]}" | grep -q .; then return 0; fi
        sleep 0.1
    done
    die "$name: nothing listens on port ${PORT[$name]} after 10 s"
}

# An aigate process, target $1: logs off, the cache on or off ($2).
start_aigate() {
    cat >"$WORK/$1.toml" <<EOF
listen = "127.0.0.1:${PORT[$1]}"
data_dir = "$WORK/$1-data"

[providers.openai]
base_url = "http://127.0.0.1:${PORT[direct]}/v1"

[gateways.default]
[gateways.default.cache]
enabled = $2
[gateways.default.logs]
enabled = false
EOF
    # Upstream failures are logged at debug level only: their reasons for the connection point.
    RUST_LOG=info,aigate_core::phases::upstream=debug start_server "$1" "$BIN/aigate" serve --config "$WORK/$1.toml"
}

start_servers() {
    read -r PORT[direct] PORT[nginx] PORT[aigate-nolog] PORT[aigate-nolog-hit] < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
    start_server direct "$BIN/aigate-mock" --listen "127.0.0.1:${PORT[direct]}" --chunk-delay-ms 0
    mkdir -p "$WORK/nginx"
    sed -e "s|@WORK@|$WORK|g" -e "s|@MOCK_PORT@|${PORT[direct]}|g" -e "s|@NGINX_PORT@|${PORT[nginx]}|g" \
        "$BENCH/nginx.conf.template" >"$WORK/nginx/nginx.conf"
    start_server nginx "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" -g 'daemon off;'
    start_aigate aigate-nolog false
    start_aigate aigate-nolog-hit true
    local t
    for t in direct nginx aigate-nolog aigate-nolog-hit; do
        URL[$t]="http://127.0.0.1:${PORT[$t]}/v1/chat/completions"
        [[ $(curl -sS -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
            -H 'authorization: Bearer sk-bench-not-a-real-key' --data-binary @"$BODY_FILE" "${URL[$t]}") == 200 ]] ||
            die "$t: POST ${URL[$t]} did not answer 200"
    done
    log "servers: direct ${PORT[direct]}, nginx ${PORT[nginx]}, aigate-nolog ${PORT[aigate-nolog]}," \
        "aigate-nolog-hit ${PORT[aigate-nolog-hit]}; open-file limit $(ulimit -n); work dir $WORK"
}

# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------

measure_ttfe() {
    log "time to first event: $TTFE_N streams to each of direct, aigate-nolog, aigate-nolog-hit, in turn"
    local t0m t0h
    t0m=$(cpu_ticks "${PID[aigate-nolog]}") t0h=$(cpu_ticks "${PID[aigate-nolog-hit]}")
    TTFE=$(taskset -c "$CLIENT_CPU" python3 "$BENCH/streams.py" ttfe --n "$TTFE_N" --hit aigate-nolog-hit \
        --target "direct=${URL[direct]}" --target "aigate-nolog=${URL[aigate-nolog]}" \
        --target "aigate-nolog-hit=${URL[aigate-nolog-hit]}")
    printf '### streams.py ttfe\n%s\n\n' "$TTFE" >>"$RAW"
    CPU_US[ttfe,aigate-nolog]=$(us_per "$(($(cpu_ticks "${PID[aigate-nolog]}") - t0m))" "$(jget "$TTFE" targets aigate-nolog sent)")
    CPU_US[ttfe,aigate-nolog-hit]=$(us_per "$(($(cpu_ticks "${PID[aigate-nolog-hit]}") - t0h))" "$(jget "$TTFE" targets aigate-nolog-hit sent)")
    local t
    for t in direct aigate-nolog aigate-nolog-hit; do
        log "$(printf '%-17s TTFE p50 %s ms  p99 %s ms  errors %s  aigate CPU %s us/stream' "$t" \
            "$(jget "$TTFE" targets "$t" p50_ms)" "$(jget "$TTFE" targets "$t" p99_ms)" \
            "$(jget "$TTFE" targets "$t" errors)" "${CPU_US[ttfe,$t]:--}")"
    done
}

measure_streams() {
    log "$STREAMS streams at once through aigate-nolog, ${STREAM_DELAY_MS} ms between events"
    local t0
    t0=$(cpu_ticks "${PID[aigate-nolog]}")
    CONC=$(taskset -c "$CLIENT_CPU" python3 "$BENCH/streams.py" concurrent --url "${URL[aigate-nolog]}" \
        --n "$STREAMS" --chunk-delay-ms "$STREAM_DELAY_MS")
    printf '### streams.py concurrent\n%s\n\n' "$CONC" >>"$RAW"
    CPU_US[streams]=$(us_per "$(($(cpu_ticks "${PID[aigate-nolog]}") - t0))" $((STREAMS + 1)))
    log "streams: $(jget "$CONC" complete) complete, $(jget "$CONC" errors) errors, $(jget "$CONC" peak_open)" \
        "open at once; aigate CPU ${CPU_US[streams]} us/stream"
}

# wrk -t1 -c$2 against target $1 after a warm-up; adds the round's figures to the lists of
# ROUND_RPS and the sums of RPS, P50, P99, ERRS and CPU_US.
measure_wrk() {
    local t=$1 c=$2 out line ticks0
    local -a wrk=(taskset -c "$CLIENT_CPU" wrk -t1 -c"$c" --timeout 5s -s "$BENCH/chat.lua")
    BENCH_BODY_FILE=$BODY_FILE "${wrk[@]}" -d"${WARMUP}s" "${URL[$t]}" >/dev/null
    ticks0=$(target_ticks "$t")
    out=$(BENCH_BODY_FILE=$BODY_FILE "${wrk[@]}" -d"${DURATION}s" --latency "${URL[$t]}")
    printf '### wrk %s c=%s\n%s\n\n' "$t" "$c" "$out" >>"$RAW"
    line=$(grep '^BENCH ' <<<"$out") || die "no summary line in the wrk output for $t c=$c"
    local k=$t,$c cpu
    cpu=$(us_per "$(($(target_ticks "$t") - ticks0))" "$(field "$line" requests)")
    ROUND_RPS[$k]+="${ROUND_RPS[$k]:+ / }$(printf '%.0f' "$(field "$line" rps)")"
    RPS[$k]=$(calc "${RPS[$k]:-0} + $(field "$line" rps)")
    P50[$k]=$(calc "${P50[$k]:-0} + $(field "$line" p50_us) / 1000")
    P99[$k]=$(calc "${P99[$k]:-0} + $(field "$line" p99_us) / 1000")
    CPU_US[$k]=$(calc "${CPU_US[$k]:-0} + $cpu")
    ERRS[$k]=$((${ERRS[$k]:-0} + $(field "$line" socket_errors) + $(field "$line" non2xx)))
    log "$(printf '%-13s c=%-5s %8.0f req/s  p50 %7.3f ms  p99 %8.3f ms  errors %s  CPU %s us/request' "$t" "$c" \
        "$(field "$line" rps)" "$(calc "$(field "$line" p50_us) / 1000")" "$(calc "$(field "$line" p99_us) / 1000")" \
        "$(($(field "$line" socket_errors) + $(field "$line" non2xx)))" "$cpu")"
}

measure_concurrency() {
    local -a order=() points=()
    local r p t c
    for t in aigate-nolog nginx; do for c in "${CONCURRENCIES[@]}"; do points+=("$t,$c"); done; done
    for ((r = 1; r <= ROUNDS; r++)); do
        order=("${points[@]}")
        if ((r % 2 == 0)); then
            order=()
            for ((p = ${#points[@]} - 1; p >= 0; p--)); do order+=("${points[p]}"); done
        fi
        for p in "${order[@]}"; do measure_wrk "${p%,*}" "${p#*,}"; done
    done
    for p in "${points[@]}"; do  # sums to means
        RPS[$p]=$(calc "${RPS[$p]} / $ROUNDS") P50[$p]=$(calc "${P50[$p]} / $ROUNDS")
        P99[$p]=$(calc "${P99[$p]} / $ROUNDS") CPU_US[$p]=$(calc "${CPU_US[$p]} / $ROUNDS")
    done
}

# TcpExtListenOverflows of the kernel (all sockets): connections a full accept queue turned away.
listen_overflows() { awk '$1 == "TcpExt:" { if (!n) { split($0, k); n = 1 } else { for (i in k) if (k[i] == "ListenOverflows") print $i } }' /proc/net/netstat; }

# BENCH_CONNECTIONS connections against aigate-nolog, a request in flight on each. Every 0.5 s
# while wrk runs: aigate's VmRSS, the connections established on its side (accepted, or in its
# accept queue) and on wrk's side, and its open files.
measure_connections() {
    local pid=${PID[aigate-nolog]} port=${PORT[aigate-nolog]} line ticks0 fails ovf0
    log "$CONNECTIONS connections against aigate-nolog for ${CONN_DURATION} s (wrk -t1 -c$CONNECTIONS)"
    CONN_RSS0=$(kib "$pid" VmRSS)
    CONN_BACKLOG=$(ss -Hltn "sport = :$port" | awk '{ print $3 }')
    ticks0=$(cpu_ticks "$pid")
    ovf0=$(listen_overflows)
    BENCH_BODY_FILE=$BODY_FILE taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"${CONN_DURATION}s" \
        --timeout 10s --latency -s "$BENCH/chat.lua" "${URL[aigate-nolog]}" >"$WORK/conn-wrk.txt" &
    LOAD_PID=$!
    # The sampler (a subshell on the client CPU too) ends with wrk.
    (
        taskset -pc "$CLIENT_CPU" $BASHPID >/dev/null
        start=$EPOCHREALTIME
        while kill -0 "$LOAD_PID" 2>/dev/null; do
            echo "$(calc "$EPOCHREALTIME - $start") $(kib "$pid" VmRSS)" \
                "$(ss -Htn state established "sport = :$port" | wc -l)" \
                "$(ss -Htn state established "dport = :$port" | wc -l)" \
                "$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 | wc -l)"
            sleep 0.5
        done >"$WORK/conn-samples.txt"
    ) &
    wait "$LOAD_PID" || die "wrk failed at $CONNECTIONS connections: $(tail -n 3 "$WORK/conn-wrk.txt")"
    LOAD_PID=""
    wait $!
    CONN_HWM=$(kib "$pid" VmHWM)
    CONN_OVERFLOWS=$(($(listen_overflows) - ovf0))
    printf '### wrk aigate-nolog c=%s\n%s\n\n### samples: seconds, aigate VmRSS KiB, established aigate side, wrk side, aigate open files\n%s\n\n' \
        "$CONNECTIONS" "$(<"$WORK/conn-wrk.txt")" "$(<"$WORK/conn-samples.txt")" >>"$RAW"
    line=$(grep '^BENCH ' "$WORK/conn-wrk.txt") || die "no summary line in the wrk output at $CONNECTIONS connections"
    CONN_LINE=$line
    CPU_US[conn]=$(us_per "$(($(cpu_ticks "$pid") - ticks0))" "$(field "$line" requests)")
    # Most seen of each sample column, and when aigate's side first held them all ("-": never).
    read -r CONN_RSS_MAX CONN_SRV_MAX CONN_CLI_MAX CONN_FDS_MAX CONN_ALL_AT < <(awk -v n="$CONNECTIONS" '
        $2 > r { r = $2 } $3 > s { s = $3 } $4 > c { c = $4 } $5 > f { f = $5 }
        $3 >= n && at == "" { at = sprintf("%.1f s", $1) }
        END { print r + 0, s + 0, c + 0, f + 0, (at == "" ? "never" : at) }' "$WORK/conn-samples.txt")
    CONN_FD_LIMIT=$(awk '/^Max open files/ { print $4 }' "/proc/$pid/limits")
    CONN_ERRS=$(($(field "$line" socket_errors) + $(field "$line" non2xx)))
    # The reasons aigate gave for its upstream failures (debug lines), counted by text.
    fails=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/aigate-nolog.log" | awk -F'error=' '/upstream request failed/ {
        sub(/ *$/, "", $2); n[$2]++ } END { for (e in n) printf "%s%d x `%s`", (s++ ? "; " : ""), n[e], e }')
    CONN_FAILS=${fails:-none}
    CONN_ALIVE=""
    local t
    for t in direct aigate-nolog; do
        kill -0 "${PID[$t]}" 2>/dev/null || CONN_ALIVE+="$t exited; "
    done
    CONN_WARN=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/aigate-nolog.log" "$WORK/direct.log" | grep -cE ' (WARN|ERROR) ' || true)
    log "connections: $(field "$line" rps) req/s, errors $CONN_ERRS, RSS max sampled $CONN_RSS_MAX KiB," \
        "VmHWM $CONN_HWM KiB, established max $CONN_SRV_MAX on aigate's side (all at: $CONN_ALL_AT), $CONN_CLI_MAX on" \
        "wrk's; open files max $CONN_FDS_MAX of $CONN_FD_LIMIT; listen overflows $CONN_OVERFLOWS; upstream failures: $CONN_FAILS"
}

# ------------------------------------------------------------------------------------------------
# Report: the section (section.md) and the PASS/FAIL lines (targets.md)
# ------------------------------------------------------------------------------------------------

section() {
    local t d ci cpu
    echo "## Streams and scale (bench/scale.sh)"
    echo
    echo "Own servers, pinned to CPU $SERVER_CPU (the load generators to CPU $CLIENT_CPU), open-file limit" \
        "$(ulimit -n): the mock (\`direct\`), nginx, and two aigate processes with request logs off," \
        "aigate-nolog (cache off: every request a miss) and aigate-nolog-hit (cache on: a memory-tier hit)." \
        "CPU: the aigate process's user + system time over the point (all threads; in ${CLK_TCK}ths of a" \
        "second), per request or stream; for nginx, master and worker."
    echo
    echo "**Time to first event** of a streamed chat completion (\`\"stream\": true\`, bench/streams.py):" \
        "$TTFE_N streams per target after 50 of warm-up, one at a time, the three targets in turn, each on" \
        "one kept-alive connection; from the request's send to the first \`data:\` bytes."
    echo
    echo "| target | streams | p50 ms | p90 ms | p99 ms | p50 - direct p50 | 95% interval | errors | aigate CPU µs/stream |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for t in direct aigate-nolog aigate-nolog-hit; do
        d="-" ci="-" cpu="-"
        if [[ $t != direct ]]; then
            d=$(printf '%+.3f ms' "$(jget "$TTFE" targets "$t" p50_minus_first_ms)")
            ci=$(python3 -c 'import json,sys; lo, hi = json.loads(sys.argv[1])["targets"][sys.argv[2]]["p50_minus_first_ci"]; print(f"[{lo:+.3f}, {hi:+.3f}]")' "$TTFE" "$t")
            cpu=$(printf '%.1f' "${CPU_US[ttfe,$t]}")
        fi
        printf '| %s | %s | %.3f | %.3f | %.3f | %s | %s | %s | %s |\n' "$t" "$(jget "$TTFE" targets "$t" streams)" \
            "$(jget "$TTFE" targets "$t" p50_ms)" "$(jget "$TTFE" targets "$t" p90_ms)" "$(jget "$TTFE" targets "$t" p99_ms)" \
            "$d" "$ci" "$(jget "$TTFE" targets "$t" errors)" "$cpu"
    done
    echo
    echo "**$STREAMS streams at once** through aigate-nolog (cache miss), a connection each, the mock waiting" \
        "$STREAM_DELAY_MS ms between events; complete: status 200 and the body of a stream sent alone, byte for" \
        "byte, ending with \`data: [DONE]\`. Open at once: the most streams between their send and last byte."
    echo
    echo "| streams | complete | errors | events each | most open at once | sends spread over | first event p50 / max | stream p50 / max | aigate CPU µs/stream |"
    echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    printf '| %s | %s | %s | %s | %s | %s ms | %s / %s ms | %s / %s ms | %.1f |\n' "$STREAMS" "$(jget "$CONC" complete)" \
        "$(jget "$CONC" errors)" "$(jget "$CONC" events_per_stream)" "$(jget "$CONC" peak_open)" "$(jget "$CONC" send_spread_ms)" \
        "$(jget "$CONC" ttfe_p50_ms)" "$(jget "$CONC" ttfe_max_ms)" "$(jget "$CONC" total_p50_ms)" "$(jget "$CONC" total_max_ms)" \
        "${CPU_US[streams]}"
    if [[ $(jget "$CONC" errors) != 0 ]]; then echo; echo "Stream errors: $(jget "$CONC" error_texts)"; fi
    echo
    echo "**Concurrency 32 against 1024** (wrk -t1, keep-alive, ${WARMUP} s warm-up, then ${DURATION} s): means of" \
        "$ROUNDS rounds (even rounds in reverse order); the last column lists each round's req/s."
    echo
    echo "| target | concurrency | req/s | p50 ms | p99 ms | errors | proxy CPU µs/request | req/s vs c=32 | req/s per round |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    for t in aigate-nolog nginx; do
        for c in "${CONCURRENCIES[@]}"; do
            printf '| %s | %s | %.0f | %.3f | %.3f | %s | %.1f | %.3fx | %s |\n' "$t" "$c" "${RPS[$t,$c]}" "${P50[$t,$c]}" \
                "${P99[$t,$c]}" "${ERRS[$t,$c]}" "${CPU_US[$t,$c]}" "$(calc "${RPS[$t,$c]} / ${RPS[$t,32]}")" "${ROUND_RPS[$t,$c]}"
        done
    done
    echo
    echo "**$CONNECTIONS connections** against aigate-nolog (cache miss), each with a request in flight:" \
        "wrk -t1 -c$CONNECTIONS for ${CONN_DURATION} s (the connections opened within it); every 0.5 s aigate's" \
        "VmRSS, the connections established on its side and on wrk's, and its open files; VmHWM after."
    echo
    echo "| connections | most established, aigate's side / wrk's | all on aigate's side after | req/s | p50 ms | p99 ms | errors | RSS before | most VmRSS | VmHWM after | most open files / limit | aigate CPU µs/request |"
    echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    printf '| %s | %s / %s | %s | %.0f | %.1f | %.1f | %s | %s MiB | %s MiB | %s MiB | %s / %s | %.1f |\n' "$CONNECTIONS" \
        "$CONN_SRV_MAX" "$CONN_CLI_MAX" "$CONN_ALL_AT" "$(field "$CONN_LINE" rps)" "$(calc "$(field "$CONN_LINE" p50_us) / 1000")" \
        "$(calc "$(field "$CONN_LINE" p99_us) / 1000")" "$CONN_ERRS" "$(mib "$CONN_RSS0")" "$(mib "$CONN_RSS_MAX")" \
        "$(mib "$CONN_HWM")" "$CONN_FDS_MAX" "$CONN_FD_LIMIT" "${CPU_US[conn]}"
    echo
    echo "Established on aigate's side: accepted or in its accept queue (listen backlog $CONN_BACKLOG); on wrk's" \
        "side a connection counts once its handshake is answered, even when aigate's full accept queue dropped" \
        "the final ACK (SYN cookies). Listen queue overflows during the point (the kernel's" \
        "TcpExtListenOverflows, all sockets): $CONN_OVERFLOWS."
    echo
    echo "Upstream failures of aigate-nolog during the run (its debug log): $CONN_FAILS." \
        "WARN/ERROR lines of aigate-nolog and the mock: $CONN_WARN.${CONN_ALIVE:+ $CONN_ALIVE}"
}

targets() {
    local t v p50 d ratio nratio
    for t in aigate-nolog aigate-nolog-hit; do
        d=$(jget "$TTFE" targets "$t" p50_minus_first_ms)
        if is_true "$d <= $TARGET_TTFE_SLACK_MS" && [[ $(jget "$TTFE" targets "$t" errors) == 0 ]]; then v=PASS; else v=FAIL; fi
        p50=$(printf '%.3f' "$(jget "$TTFE" targets "$t" p50_ms)")
        echo "- $v: streamed time to first event, $([[ $t == aigate-nolog ]] && echo "cache miss" || echo "cache hit") ($t):" \
            "p50 $p50 ms, direct $(printf '%.3f' "$(jget "$TTFE" targets direct p50_ms)") ms, $(printf '%+.3f' "$d") ms" \
            "(95% interval $(python3 -c 'import json,sys; lo, hi = json.loads(sys.argv[1])["targets"][sys.argv[2]]["p50_minus_first_ci"]; print(f"[{lo:+.3f}, {hi:+.3f}]")' "$TTFE" "$t") ms;" \
            "target <= +$TARGET_TTFE_SLACK_MS ms, no errors)"
    done
    if [[ $(jget "$CONC" complete) == "$STREAMS" && $(jget "$CONC" peak_open) == "$STREAMS" ]]; then v=PASS; else v=FAIL; fi
    echo "- $v: $STREAMS streams at once through aigate-nolog (cache miss): $(jget "$CONC" complete) complete with every" \
        "event and \`data: [DONE]\`, $(jget "$CONC" errors) errors, $(jget "$CONC" peak_open) open at once" \
        "(target: all complete, all open at once)"
    if ((CONN_HWM < TARGET_CONN_RSS_KIB && CONN_ERRS == 0 && CONN_SRV_MAX >= CONNECTIONS)) && [[ -z $CONN_ALIVE ]]; then
        v=PASS
    else
        v=FAIL
    fi
    echo "- $v: $CONNECTIONS keep-alive connections against aigate-nolog: VmHWM $(mib "$CONN_HWM") MiB (most VmRSS" \
        "sampled $(mib "$CONN_RSS_MAX") MiB), $CONN_ERRS errors, at most $CONN_SRV_MAX held on aigate's side" \
        "(all after: $CONN_ALL_AT) (target < $((TARGET_CONN_RSS_KIB / 1024)) MiB, no errors, all held)${CONN_ALIVE:+; $CONN_ALIVE}"
    ratio=$(calc "${RPS[aigate-nolog,1024]} / ${RPS[aigate-nolog,32]}")
    nratio=$(calc "${RPS[nginx,1024]} / ${RPS[nginx,32]}")
    if is_true "$ratio >= $TARGET_C1024_RATIO"; then v=PASS; else v=FAIL; fi
    echo "- $v: aigate-nolog req/s at concurrency 1024 is ${ratio}x its req/s at 32 ($(printf '%.0f' "${RPS[aigate-nolog,1024]}")" \
        "/ $(printf '%.0f' "${RPS[aigate-nolog,32]}"), means of $ROUNDS rounds; target >= ${TARGET_C1024_RATIO}x);" \
        "nginx ${nratio}x ($(printf '%.0f' "${RPS[nginx,1024]}") / $(printf '%.0f' "${RPS[nginx,32]}"))"
}

# ------------------------------------------------------------------------------------------------

main() {
    local t cmd
    for cmd in wrk taskset ss curl python3; do command -v "$cmd" >/dev/null || die "$cmd not found (bench/run.sh installs it)"; done
    [[ -x $NGINX ]] || die "nginx not found at $NGINX (apt-get install nginx-light)"
    if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
        log "cargo build --release -p aigate -p aigate-testkit"
        (cd "$ROOT" && cargo build --release -p aigate -p aigate-testkit)
    fi
    [[ -x $BIN/aigate && -x $BIN/aigate-mock ]] || die "release binaries missing in $BIN"
    # A connection in flight through aigate holds two files (client and upstream): raise the limit
    # for every process started here, as far as the hard limit allows.
    local want=$((2 * CONNECTIONS + 4096)) hard
    hard=$(ulimit -Hn)
    if [[ $hard != unlimited ]] && ((hard < want)); then
        log "warning: the hard open-file limit is $hard, under the $want that $CONNECTIONS connections through aigate may need"
        want=$hard
    fi
    ulimit -n "$want"

    WORK=$(mktemp -d "${TMPDIR:-/tmp}/aigate-scale.XXXXXX")
    chmod 755 "$WORK"  # the nginx worker may run as another user
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    if [[ -n $OUT ]]; then mkdir -p "$OUT"; RAW=$OUT/raw.log; else mkdir -p "$BENCH/results"; RAW=$BENCH/results/scale-raw.log; fi
    : >"$RAW"

    start_servers
    measure_ttfe
    measure_concurrency
    measure_streams
    measure_connections

    if [[ -n $OUT ]]; then
        section >"$OUT/section.md"
        targets >"$OUT/targets.md"
        t=$OUT/targets.md
    else
        {
            echo "# aigate streams and scale: $(date -u '+%Y-%m-%d %H:%M UTC')"
            echo
            echo "- machine: $(nproc) CPUs, $(lscpu | awk -F: '/Model name/ { gsub(/^[ \t]+/, "", $2); print $2; exit }')," \
                "Linux $(uname -r); aigate commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
            echo "- load average before the run: $LOADAVG"
            echo
            section
            echo
            echo "## Targets"
            echo
            targets
        } >"$BENCH/results/scale.md"
        cat "$BENCH/results/scale.md"
        log "wrote $BENCH/results/scale.md and $RAW"
        t=$BENCH/results/scale.md
    fi
    if grep -q '^- FAIL' "$t" && [[ ${BENCH_STRICT:-0} == 1 ]]; then exit 1; fi
}

LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
main "$@"
