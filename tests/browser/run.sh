#!/usr/bin/env bash
# The dashboard in a real browser: Debian's headless Chromium driven by Playwright (Python),
# against aigate and the mock upstream. Screenshots land in target/dashboard-screenshots/.
# Usage: tests/browser/run.sh [target-dir]   (expects debug binaries already built)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${1:-$root/target/debug}
chromium=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
if [ -z "$chromium" ]; then
  echo "tests/browser: Chromium is not installed; install Debian's package: apt-get install -y chromium" >&2
  exit 1
fi
venv=$root/target/browser-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# Playwright's Python package drives the system Chromium (its own browser download is not used).
"$venv/bin/pip" install --quiet --disable-pip-version-check "playwright>=1.45,<2" "openai>=1.40,<3"
# axe-core (npm) checks every page for accessibility problems: labels, contrast, roles.
axe=$root/target/browser-axe
if [ ! -f "$axe/node_modules/axe-core/axe.min.js" ]; then
  npm install --silent --no-audit --no-fund --prefix "$axe" "axe-core@4" >/dev/null
fi
rm -rf "$root/target/dashboard-screenshots"
mkdir -p "$root/target/dashboard-screenshots"
AXE="$axe/node_modules/axe-core/axe.min.js" CHROMIUM="$chromium" AIGATE_BIN="$bin" SCREENSHOTS="$root/target/dashboard-screenshots" \
  "$venv/bin/python" "$root/tests/browser/dashboard_test.py"
