#!/usr/bin/env python3
"""The dashboard's data at 1M records, through HTTP.

    cargo build --release --workspace --bins --examples && bench/dashboard.py

Seeds 1,000,000 log records over 30 days into a SQLite store (the `analytics_bench` example with
AIGATE_BENCH_KEEP; AIGATE_BENCH_RECORDS changes the count), starts a release `aigate` on that data
directory with the records' gateway `bench`, logs into the dashboard like a browser (form, cookie,
CSRF token) and times every data call the overview, gateway and logs pages make: 7 runs each, the
median and the slowest. Target: the median of each under 300 ms.

Then it checks that dashboard traffic does not slow the proxy path: the p50 of chat requests through
the gateway (to the mock upstream, no cache) alone, then while a client polls the overview and the
30-day gateway analytics without pause.
"""

import http.cookiejar
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
TARGET_MS = 300.0
RUNS = 7


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url):
    for _ in range(600):
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.1)
    sys.exit(f"{url} did not become ready")


def main():
    tmp = Path(tempfile.mkdtemp(prefix="aigate-dashboard-bench-"))
    records = os.environ.get("AIGATE_BENCH_RECORDS", "1000000")
    print(f"seeding {records} records (SQLite) into {tmp}", flush=True)
    t0 = time.time()
    subprocess.run([BIN / "examples" / "analytics_bench"], check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, AIGATE_SKIP_POSTGRES="1", AIGATE_BENCH_KEEP=str(tmp / "logs.sqlite3")))
    print(f"seeded in {time.time() - t0:.0f} s", flush=True)
    port, mock_port = free_port(), free_port()
    (tmp / "token").write_text("bench-admin-token\n")
    (tmp / "aigate.toml").write_text(f"""listen = "127.0.0.1:{port}"
data_dir = "{tmp}"
default_gateway = "bench"
[providers.openai]
base_url = "http://127.0.0.1:{mock_port}/v1"
[gateways.bench]
[gateways.bench.logs]
max_records = 2_000_000
[admin]
token = "{tmp / 'token'}"
""")
    procs = [subprocess.Popen([BIN / "aigate-mock", "--listen", f"127.0.0.1:{mock_port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([BIN / "aigate", "serve", "--config", str(tmp / "aigate.toml")],
                              stdout=subprocess.DEVNULL, stderr=open(tmp / "gw.log", "w"))]
    try:
        base = f"http://127.0.0.1:{port}"
        t0 = time.time()
        wait_ready(base + "/readyz")
        print(f"aigate ready in {time.time() - t0:.1f} s on 1M records", flush=True)
        run(base)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
        subprocess.run(["rm", "-rf", str(tmp)])


def run(base):
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    form = urllib.parse.urlencode({"token": "bench-admin-token", "next": "/dashboard"}).encode()
    page = opener.open(base + "/dashboard/login", data=form).read().decode()
    csrf = re.search(r'name="csrf-token" content="([0-9a-f]+)"', page).group(1)
    assert csrf

    now = int(time.time() * 1000)
    day = 86_400_000
    calls = [
        ("overview page (HTML shell)", "/dashboard"),
        ("overview data, 1h", "/dashboard/api/overview?range=1h"),
        ("overview data, 24h", "/dashboard/api/overview?range=24h"),
        ("overview data, 7d", "/dashboard/api/overview?range=7d"),
        ("overview data, 30d", "/dashboard/api/overview?range=30d"),
        ("gateway charts, 7d by hour", f"/dashboard/api/gateways/bench/analytics?from={now - 7 * day}&to={now}&granularity=hour"),
        ("gateway charts, 30d by day", f"/dashboard/api/gateways/bench/analytics?from={now - 30 * day}&to={now}&granularity=day"),
        ("breakdown by model, 30d", f"/dashboard/api/gateways/bench/analytics?from={now - 30 * day}&to={now}&granularity=day&group_by=model"),
        ("breakdown by metadata.user, 30d", f"/dashboard/api/gateways/bench/analytics?from={now - 30 * day}&to={now}&granularity=day&group_by=metadata.user"),
        ("report, 30d", "/dashboard/api/gateways/bench/report?since=30d"),
        ("logs, first page", "/dashboard/api/gateways/bench/logs?limit=50"),
        ("logs, model filter", "/dashboard/api/gateways/bench/logs?limit=50&model=claude-3-5-sonnet"),
        ("logs, cached=true", "/dashboard/api/gateways/bench/logs?limit=50&cached=true"),
        ("logs, metadata.user=user-7", "/dashboard/api/gateways/bench/logs?limit=50&metadata.user=user-7"),
        ("logs, errors over 24h", f"/dashboard/api/gateways/bench/logs?limit=50&success=false&from={now - 2 * day}"),
    ]
    print(f"\n{'call':<36} {'median':>10} {'slowest':>10}")
    worst = ("", 0.0)
    for name, path in calls:
        times = []
        for _ in range(RUNS):
            t0 = time.perf_counter()
            body = opener.open(base + path).read()
            times.append((time.perf_counter() - t0) * 1000)
        if path.startswith("/dashboard/api/"):
            json.loads(body)
        med = statistics.median(times)
        print(f"{name:<36} {med:>7.1f} ms {max(times):>7.1f} ms", flush=True)
        if med > worst[1]:
            worst = (name, med)
    verdict = "PASS" if worst[1] < TARGET_MS else "FAIL"
    print(f"{verdict}: every dashboard call over 1M records: slowest median {worst[1]:.1f} ms ({worst[0]}); "
          f"target < {TARGET_MS:.0f} ms")

    # The proxy path while the dashboard is busy.
    chat = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()

    def proxy_p50(n=400):
        times = []
        for _ in range(n):
            req = urllib.request.Request(base + "/v1/chat/completions", data=chat, headers={
                "authorization": "Bearer sk-bench", "content-type": "application/json"})
            t0 = time.perf_counter()
            urllib.request.urlopen(req).read()
            times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times)

    quiet = proxy_p50()
    stop = threading.Event()
    polls = [0]

    def poll():
        while not stop.is_set():
            opener.open(base + "/dashboard/api/overview?range=30d").read()
            opener.open(base + f"/dashboard/api/gateways/bench/analytics?from={now - 30 * day}&to={now}&granularity=day&group_by=model").read()
            polls[0] += 2

    t = threading.Thread(target=poll)
    t.start()
    try:
        busy = proxy_p50()
    finally:
        stop.set()
        t.join()
    print(f"proxy p50 alone {quiet:.2f} ms, with the dashboard polling ({polls[0]} calls meanwhile) {busy:.2f} ms")


if __name__ == "__main__":
    main()
