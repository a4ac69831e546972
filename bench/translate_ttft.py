#!/usr/bin/env python3
"""Time to first token of a translated stream against the same stream untranslated, in one run.

    cargo build --release --workspace --bins && bench/translate_ttft.py

Starts the mock upstream and a release aigate (cache off, logs on), then sends, one at a time and
alternating, N streamed requests (default 400 of each, BENCH_TTFT_N) that reach the same mock
Anthropic stream:
  untranslated  POST /default/anthropic/v1/messages        Anthropic's format, relayed as it is
  translated    POST /default/compat/chat/completions      OpenAI's format, translated both ways
and times, on a kept-alive connection, from sending the request to reading the first token (the
first `text_delta` event, or the first chunk with content). Reports p50 and p90 of each and the
p50 difference with a 95 % bootstrap interval. Target: the translated p50 within 0.1 ms of the
untranslated one.
"""

import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
N = int(os.environ.get("BENCH_TTFT_N", "400"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_token(conn, path, body, marker):
    """Sends a streamed request and returns the seconds to the first token; reads the rest."""
    t0 = time.perf_counter()
    conn.request("POST", path, body=body, headers={"content-type": "application/json", "x-api-key": "k",
                                                   "authorization": "Bearer k"})
    resp = conn.getresponse()
    ttft = None
    buf = b""
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            break
        if ttft is None:
            buf += chunk
            if marker in buf:
                ttft = time.perf_counter() - t0
    if resp.status != 200 or ttft is None:
        sys.exit(f"{path}: status {resp.status}, no token")
    return ttft


def main():
    tmp = Path(tempfile.mkdtemp(prefix="aigate-ttft-"))
    mock_port, port = free_port(), free_port()
    (tmp / "aigate.toml").write_text(f"""listen = "127.0.0.1:{port}"
data_dir = "{tmp / 'data'}"
[providers.anthropic]
base_url = "http://127.0.0.1:{mock_port}"
[storage]
cache = "memory"
[gateways.default]
""")
    procs = [subprocess.Popen([BIN / "aigate-mock", "--listen", f"127.0.0.1:{mock_port}", "--chunk-delay-ms", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([BIN / "aigate", "serve", "--config", str(tmp / "aigate.toml")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port)
        messages = [{"role": "user", "content": "hi"}]
        plain = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True, "messages": messages})
        compat = json.dumps({"model": "anthropic/claude-sonnet-4-5", "max_tokens": 64, "stream": True, "messages": messages})
        runs = {"untranslated": [], "translated": []}
        for i in range(N + 20):
            a = first_token(conn, "/default/anthropic/v1/messages", plain, b"text_delta")
            b = first_token(conn, "/default/compat/chat/completions", compat, b'"content":"Hello"')
            if i >= 20:  # warm-up
                runs["untranslated"].append(a * 1000)
                runs["translated"].append(b * 1000)
        q = lambda xs, p: sorted(xs)[int(p * (len(xs) - 1))]
        for name, xs in runs.items():
            print(f"{name:<13} p50 {statistics.median(xs):.3f} ms  p90 {q(xs, 0.9):.3f} ms  ({len(xs)} streams)")
        rng = random.Random(1)
        u, t = runs["untranslated"], runs["translated"]
        diffs = sorted(statistics.median(rng.choices(t, k=len(t))) - statistics.median(rng.choices(u, k=len(u)))
                       for _ in range(2000))
        d = statistics.median(t) - statistics.median(u)
        lo, hi = diffs[int(0.025 * len(diffs))], diffs[int(0.975 * len(diffs))]
        verdict = "PASS" if d <= 0.1 else "FAIL"
        print(f"{verdict}: translated p50 - untranslated p50 = {d:+.3f} ms, 95% interval [{lo:+.3f}, {hi:+.3f}] ms "
              f"(target <= +0.1 ms)")
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        subprocess.run(["rm", "-rf", str(tmp)])


if __name__ == "__main__":
    main()
