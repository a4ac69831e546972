#!/usr/bin/env bash
# All of aigate's tests: the Rust workspace (unit, integration through real sockets, CLI), the
# real-client test with the official openai Python SDK, and the dashboard in headless Chromium
# (Debian's chromium package). This is the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
cargo test --workspace
tests/python/run.sh target/debug
tests/browser/run.sh target/debug
