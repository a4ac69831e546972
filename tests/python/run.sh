#!/usr/bin/env bash
# Runs the official SDKs through aigate against the mock upstream: openai and anthropic for
# Python, and openai for Node (tests/node/sdk_test.cjs).
# Usage: tests/python/run.sh [target-dir]   (expects debug binaries already built)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${1:-$root/target/debug}
venv=$root/target/sdk-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check "openai>=1.40,<3" "anthropic>=0.34,<1"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mock_port=$(free_port)
gw_port=$(free_port)
tmp=$(mktemp -d)
cat > "$tmp/aigate.toml" <<TOML
listen = "127.0.0.1:$gw_port"
data_dir = "$tmp/data"
[providers.openai]
base_url = "http://127.0.0.1:$mock_port/v1"
[providers.anthropic]
base_url = "http://127.0.0.1:$mock_port"
[providers.google-ai-studio]
base_url = "http://127.0.0.1:$mock_port"
[providers.broken]
base_url = "http://127.0.0.1:$mock_port/status-503/v1"
[storage]
cache = "memory"
[gateways.default]
[gateways.default.cache]
enabled = true
[gateways.default.routes.support]
steps = [ { provider = "broken", model = "gpt-4o-mini" },
          { provider = "anthropic", model = "claude-3-5-haiku-latest" } ]
[gateways.limited]
[gateways.limited.rate_limit]
limit = 2
period = "1h"
TOML
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
"$bin/aigate-mock" --listen "127.0.0.1:$mock_port" --chunk-delay-ms 2 >"$tmp/mock.log" 2>&1 & pids+=($!)
"$bin/aigate" serve --config "$tmp/aigate.toml" >"$tmp/gw.log" 2>&1 & pids+=($!)
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$gw_port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
AIGATE_URL="http://127.0.0.1:$gw_port" "$venv/bin/python" "$root/tests/python/sdk_test.py" || { echo "--- gateway log"; cat "$tmp/gw.log"; exit 1; }
node_sdk=$root/target/node-sdk
if [ ! -d "$node_sdk/node_modules/openai" ]; then
  npm install --silent --no-audit --no-fund --prefix "$node_sdk" "openai@5" >/dev/null
fi
AIGATE_URL="http://127.0.0.1:$gw_port" SDK_DIR="$node_sdk" node "$root/tests/node/sdk_test.cjs" || { echo "--- gateway log"; cat "$tmp/gw.log"; exit 1; }
