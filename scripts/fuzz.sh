#!/usr/bin/env bash
# The long fuzzing run of every parser of untrusted input (crates/aigate-core/tests/fuzz.rs):
# AIGATE_FUZZ_CASES cases per target (default 200000; 21 targets, the costly ones take a share),
# optimised with overflow checks (`--profile fuzz`). A failure is shrunk, printed and kept in
# crates/aigate-core/proptest-regressions/fuzz.txt: fix it, add a regression test, commit both.
#   scripts/fuzz.sh                          # about 15 minutes on 2 cores
#   AIGATE_FUZZ_CASES=1000000 scripts/fuzz.sh
#   scripts/fuzz.sh sse_usage                # one target (a test-name filter)
set -euo pipefail
cd "$(dirname "$0")/.."
export AIGATE_FUZZ_CASES="${AIGATE_FUZZ_CASES:-200000}"
export AIGATE_FUZZ_CASE_MS="${AIGATE_FUZZ_CASE_MS:-2000}"
start=$(date +%s)
cargo test --profile fuzz -p aigate-core --test fuzz -- "$@"
echo "fuzz: ${AIGATE_FUZZ_CASES} cases per target in $(( $(date +%s) - start )) s"
