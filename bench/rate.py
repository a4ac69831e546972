#!/usr/bin/env python3
"""Open-loop HTTP/1.1 POST load at a set mean rate, for bench/run.sh's added-latency points.

Requests start on a schedule fixed in advance, whatever the earlier ones are doing (open loop: a
slow server does not slow the load down), over a pool of keep-alive connections opened before the
warm-up. The gaps between requests are exponential (Poisson arrivals, mean rate --rate) unless
--fixed-interval is given.

Why Poisson: the mock's `x-mock-latency-ms` wait is rounded up to tokio's 1 ms timer tick. A load
with an exact 20 ms period keeps the same phase against that tick for a whole run, so each run's
median moves by up to tenths of a millisecond with the phase it happened to start at, and
concurrent fixed-period loads on one mock order their requests the same way every period. With
random arrival times every request lands at a random point of the tick, the rounding is the same
for every target, and the difference of two medians is down to sampling noise (a few hundredths of
a ms with 1500 requests each).

Latency runs from the request's write to the last byte of its response. Prints one JSON object:
{"requests", "errors", "non2xx", "rps", "p50_ms", "p99_ms"}; --samples FILE also writes every
successful request's latency (ms, one per line).
"""

import argparse
import asyncio
import collections
import json
import random
import socket
import time
import urllib.parse

from stats import percentile


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip().lower()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # chunk data + CRLF (or the final empty line)
            if size == 0:
                break
    return status, headers.get("connection") != "close"


class Load:
    def __init__(self, url, body, headers):
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        head = [f"POST {path} HTTP/1.1", f"Host: {u.netloc}", "Content-Type: application/json",
                f"Content-Length: {len(body)}"] + headers
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        # FIFO: every connection is used in turn, so none sits idle long enough to be closed.
        self.idle = collections.deque()

    async def connect(self):
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def open(self, n):
        for _ in range(n):
            self.idle.append(await self.connect())

    async def one(self, out):
        try:
            # More in flight than the pool holds (rare): a new connection, counted in the latency.
            t0 = time.perf_counter()
            reader, writer = self.idle.popleft() if self.idle else await self.connect()
            writer.write(self.request)
            await writer.drain()
            status, keep = await asyncio.wait_for(read_response(reader), 30)
            out.append((time.perf_counter() - t0, status))
            if keep:
                self.idle.append((reader, writer))
            else:
                writer.close()
        except Exception:  # noqa: BLE001 - any failure counts as an error
            out.append((None, 0))

    async def run(self, rate, seconds, poisson, rng):
        out, tasks = [], []
        n = int(rate * seconds)
        start = time.perf_counter()
        at = 0.0
        for i in range(n):
            at = at + rng.expovariate(rate) if poisson else i / rate
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(self.one(out)))
        await asyncio.gather(*tasks)
        return out, time.perf_counter() - start


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--body-file", required=True)
    ap.add_argument("--rate", type=float, default=50, help="mean requests per second")
    ap.add_argument("--duration", type=float, default=10, help="seconds measured")
    ap.add_argument("--warmup", type=float, default=2, help="seconds of load before, not measured")
    ap.add_argument("--connections", type=int, default=32, help="keep-alive connections opened up front")
    ap.add_argument("--fixed-interval", action="store_true", help="exactly 1/rate s between requests")
    ap.add_argument("-H", "--header", action="append", default=[])
    ap.add_argument("--samples", help="file to write the 2xx latencies to, in ms")
    a = ap.parse_args()
    with open(a.body_file, "rb") as f:
        body = f.read()
    load = Load(a.url, body, a.header)
    rng = random.Random()  # seeded from the OS: concurrent loads must not share a schedule
    await load.open(a.connections)
    if a.warmup > 0:
        await load.run(a.rate, a.warmup, not a.fixed_interval, rng)
    out, elapsed = await load.run(a.rate, a.duration, not a.fixed_interval, rng)
    ok = sorted(t * 1e3 for t, s in out if t is not None and 200 <= s < 300)
    if a.samples:
        with open(a.samples, "w") as f:
            f.writelines(f"{v:.6f}\n" for v in ok)
    print(json.dumps({
        "requests": len(out),
        "errors": sum(1 for t, _ in out if t is None),
        "non2xx": sum(1 for t, s in out if t is not None and not 200 <= s < 300),
        "rps": len(out) / elapsed,
        "p50_ms": percentile(ok, 50),
        "p99_ms": percentile(ok, 99),
    }))


if __name__ == "__main__":
    asyncio.run(main())
