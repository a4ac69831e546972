#!/usr/bin/env python3
"""Reads `oha --output-format csv` (one row per request) on stdin, writes the latencies of the
successful requests (ms, one per line) to --samples, and prints the summary bench/run.sh uses, in
the same shape as bench/rate.py: {"requests", "errors", "non2xx", "rps", "p50_ms", "p99_ms"}.

oha leaves failed requests out of its CSV, so requests missing against the schedule
(--expected) count as errors."""

import argparse
import csv
import json
import sys

from stats import percentile

ap = argparse.ArgumentParser()
ap.add_argument("--samples", required=True, help="file to write the 2xx latencies to, in ms")
ap.add_argument("--expected", type=int, default=0, help="requests the schedule should have sent")
a = ap.parse_args()

rows = list(csv.DictReader(sys.stdin))
if not rows:
    sys.exit("oha printed no request rows (is the target up?)")
ok, non2xx, first, last = [], 0, None, None
for r in rows:
    start, dur = float(r["request-start"]), float(r["request-duration"])
    first = start if first is None else min(first, start)
    last = start + dur if last is None else max(last, start + dur)
    if 200 <= int(r["status"]) < 300:
        ok.append(dur * 1e3)
    else:
        non2xx += 1
ok.sort()
with open(a.samples, "w") as f:
    f.writelines(f"{v:.6f}\n" for v in ok)
print(json.dumps({
    "requests": len(rows),
    "errors": max(0, a.expected - len(rows)),
    "non2xx": non2xx,
    "rps": len(rows) / max(last - first, 1e-9),
    "p50_ms": percentile(ok, 50),
    "p99_ms": percentile(ok, 99),
}))
