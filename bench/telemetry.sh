#!/usr/bin/env bash
# bench/telemetry.sh: telemetry off against on, in one run (release build first:
# cargo build --release -p aigate -p aigate-testkit). The mock (also the OTLP sink) and two aigate
# processes are pinned to CPU 0, wrk to CPU 1; ROUNDS rounds of DUR seconds, alternating the order.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd); BIN=$ROOT/target/release; W=$(mktemp -d /tmp/otelbench.XXXX)
ROUNDS=${ROUNDS:-5}; DUR=${DUR:-5}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
MP=$(port); OFF=$(port); ON=$(port)
taskset -c 0 "$BIN/aigate-mock" --listen 127.0.0.1:$MP --chunk-delay-ms 0 >"$W/mock.log" 2>&1 & pids+=($!)
for name in off on; do
  p=$OFF; [[ $name == on ]] && p=$ON
  mkdir -p "$W/$name"
  cat >"$W/$name/aigate.toml" <<TOML
listen = "127.0.0.1:$p"
data_dir = "$W/$name"
[providers.openai]
base_url = "http://127.0.0.1:$MP/v1"
[gateways.default]
TOML
  if [[ $name == on ]]; then
    printf '[telemetry]\notlp_endpoint = "http://127.0.0.1:%s/otlp"\nexport_interval = "5s"\n' "$MP" >>"$W/$name/aigate.toml"
  fi
  taskset -c 0 "$BIN/aigate" serve --config "$W/$name/aigate.toml" >"$W/$name.log" 2>&1 & pids+=($!)
done
sleep 1
export BENCH_BODY_FILE=$ROOT/bench/request.json
run() { taskset -c 1 wrk -t1 -c32 -d"$1"s --timeout 5s -s "$ROOT/bench/chat.lua" "http://127.0.0.1:$2/v1/chat/completions" | grep '^BENCH'; }
for r in $(seq 1 "$ROUNDS"); do
  order="off on"; (( r % 2 == 0 )) && order="on off"
  for name in $order; do
    p=$OFF; [[ $name == on ]] && p=$ON
    run 2 $p >/dev/null
    echo "round=$r $name $(run "$DUR" $p)"
  done
done
sleep 2
for name in off on; do
  p=$OFF; [[ $name == on ]] && p=$ON
  echo "$name: $(curl -s http://127.0.0.1:$p/metrics | grep -E '^aigate_otel|^aigate_log_records_(written|dropped|spilled)_total' | tr '\n' ' ')"
done
grep -ci "warn" "$W/on.log" || true
