#!/usr/bin/env python3
"""Percentiles and bootstrap confidence intervals for bench/run.sh.

    stats.py added DIR    reads DIR/{direct,nginx}.samples and those of the aigate targets
                          present (aigate, aigate-nolog; latencies in ms, one per line) and prints,
                          as JSON, 95% bootstrap intervals of the added p50 of nginx and of each
                          aigate target (proxy p50 - direct p50), and each aigate target's p50 -
                          nginx p50 with its interval (keys "<target>_added_p50_ci",
                          "<target>_minus_nginx_p50", "<target>_minus_nginx_p50_ci").

At 50 req/s the mock's 200 ms wait is rounded to tokio's 1 ms timer tick, which spreads every
target's latencies over about 1 ms, so a median of 1500 requests moves by a few hundredths of a
millisecond from run to run; these intervals show by how much. They assume the requests are
independent, which holds for bench/rate.py's Poisson arrivals and not for a fixed-period load
(oha -q), whose phase against the tick is the same for a whole run.
"""

import json
import os
import random
import sys


def percentile(sorted_values, p):
    """Nearest-rank percentile of an ascending list; NaN when empty."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(-(-p * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


def load(path):
    with open(path) as f:
        return sorted(float(line) for line in f if line.strip())


def bootstrap_medians(values, rounds, rng):
    n = len(values)
    return [percentile(sorted(rng.choices(values, k=n)), 50) for _ in range(rounds)]


def interval(diffs):
    diffs = sorted(diffs)
    return [round(percentile(diffs, 2.5), 3), round(percentile(diffs, 97.5), 3)]


AIGATE_TARGETS = ("aigate", "aigate-nolog")


def added(directory, rounds=2000):
    rng = random.Random(20250101)
    targets = ["direct", "nginx"] + [t for t in AIGATE_TARGETS if os.path.exists(f"{directory}/{t}.samples")]
    s = {t: load(f"{directory}/{t}.samples") for t in targets}
    m = {t: bootstrap_medians(v, rounds, rng) for t, v in s.items()}
    p50 = {t: percentile(v, 50) for t, v in s.items()}
    out = {"nginx_added_p50_ci": interval(a - d for a, d in zip(m["nginx"], m["direct"]))}
    for t in targets[2:]:
        out[f"{t}_added_p50_ci"] = interval(a - d for a, d in zip(m[t], m["direct"]))
        out[f"{t}_minus_nginx_p50"] = round(p50[t] - p50["nginx"], 3)
        out[f"{t}_minus_nginx_p50_ci"] = interval(a - n for a, n in zip(m[t], m["nginx"]))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "added":
        sys.exit(__doc__)
    print(json.dumps(added(sys.argv[2])))
