#!/usr/bin/env python3
"""The load of scripts/soak.sh: a fixed-rate mix of cache misses, hits, streams and injected
upstream errors against one aigate, for a bounded time, while sampling the process's RSS and
thread count. Stops by itself; prints one JSON object (the figures scripts/soak.sh checks).

Open loop: request i starts at t0 + i / rate whatever the earlier ones are doing, over a pool of
keep-alive HTTP/1.1 connections (a new one when every pooled connection is busy). Kinds, by a
fixed pattern of 20 slots: 8 misses (a body never sent before), 7 hits (one of HIT_POOL bodies,
each sent once before the clock starts), 3 streams (`"stream": true`, unique), 2 errors
(`x-mock-status: 503`, unique). What is expected of each:

  miss   200, aigate-cache MISS            hit    200, aigate-cache HIT
  stream 200, SSE ending with data: [DONE] error  503 (the mock's, passed through)

Anything else (another status, a cut or failed connection, a wrong cache status, a stream without
its end) is unexpected and counted by kind, with the first few kept as examples.
"""

import argparse
import asyncio
import collections
import json
import socket
import time

PATTERN = "mmmmmmmmhhhhhhhsssee"  # m miss, h hit, s stream, e error: 20 slots
HIT_POOL = 20


def body(text, stream=False):
    extra = ',"stream":true' if stream else ""
    return ('{"model":"gpt-4o-mini"%s,"messages":[{"role":"user","content":"%s"}]}' % (extra, text)).encode()


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    data = b""
    if "content-length" in headers:
        data = await reader.readexactly(int(headers["content-length"]))
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(chunk[:-2])
        data = b"".join(parts)
    return status, headers, data, headers.get("connection", "").lower() != "close"


class Soak:
    def __init__(self, host, port, path):
        self.host, self.port, self.path = host, port, path
        self.idle = collections.deque()
        self.sent = collections.Counter()
        self.ok = collections.Counter()
        self.unexpected = collections.Counter()
        self.examples = []
        self.latencies = collections.defaultdict(list)
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections = 0

    async def connect(self):
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections += 1
        return reader, writer

    def request(self, payload, headers=()):
        head = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}", "Content-Type: application/json",
                f"Content-Length: {len(payload)}", *headers]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + payload

    async def send(self, raw):
        reader, writer = self.idle.popleft() if self.idle else await self.connect()
        try:
            writer.write(raw)
            await writer.drain()
            status, headers, data, keep = await read_response(reader)
        except BaseException:
            writer.close()
            raise
        if keep:
            self.idle.append((reader, writer))
        else:
            writer.close()
        return status, headers, data

    async def one(self, kind, i):
        headers = []
        if kind == "m":
            payload = body(f"soak miss {i}")
        elif kind == "h":
            payload = body(f"soak hit {i % HIT_POOL}")
        elif kind == "s":
            payload = body(f"soak stream {i}", stream=True)
        else:
            payload = body(f"soak error {i}")
            headers.append("x-mock-status: 503")
        self.sent[kind] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        t0 = time.perf_counter()
        try:
            status, h, data = await asyncio.wait_for(self.send(self.request(payload, headers)), 30)
            cache = h.get("aigate-cache", "")
            if kind == "m":
                problem = None if (status, cache) == (200, "MISS") else f"status {status}, aigate-cache {cache!r}"
            elif kind == "h":
                problem = None if (status, cache) == (200, "HIT") else f"status {status}, aigate-cache {cache!r}"
            elif kind == "s":
                good = status == 200 and data.rstrip().endswith(b"data: [DONE]")
                problem = None if good else f"status {status}, stream end {data[-40:]!r}"
            else:
                problem = None if status == 503 else f"status {status}"
        except Exception as e:  # a failed connection, a cut or late response
            problem = f"{type(e).__name__}: {e}"
        finally:
            self.in_flight -= 1
        if problem is None:
            self.ok[kind] += 1
            self.latencies[kind].append((time.perf_counter() - t0) * 1000)
        else:
            self.unexpected[kind] += 1
            if len(self.examples) < 10:
                self.examples.append(f"{kind} #{i}: {problem}")


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "Threads"):
                out[k] = int(v.split()[0])
    return out["VmRSS"], out["Threads"]


async def sample(pid, every, samples, t0, stop):
    while not stop.is_set():
        rss_kb, threads = proc_status(pid)
        samples.append((round(time.monotonic() - t0, 1), rss_kb, threads))
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p / 100 * len(xs)))], 2)


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True, help="http://127.0.0.1:PORT/v1/chat/completions")
    ap.add_argument("--pid", type=int, required=True, help="the aigate process to sample")
    ap.add_argument("--duration", type=float, required=True, help="seconds of load")
    ap.add_argument("--rate", type=float, default=50, help="requests per second")
    ap.add_argument("--sample-every", type=float, default=2, help="seconds between RSS/thread samples")
    ap.add_argument("--pool", type=int, default=16, help="keep-alive connections opened up front")
    a = ap.parse_args()
    rest = a.url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    soak = Soak(host, int(port or 80), "/" + path)
    for _ in range(a.pool):
        soak.idle.append(await soak.connect())
    # The hit pool, once each before the clock starts (misses, not counted in the mix).
    for k in range(HIT_POOL):
        status, h, _ = await soak.send(soak.request(body(f"soak hit {k}")))
        assert status == 200, f"priming the hit pool: status {status}"
    # Give the cache writer a moment to store them (a hit before its write would be a MISS).
    await asyncio.sleep(1)

    samples, stop = [], asyncio.Event()
    t0 = time.monotonic()
    sampler = asyncio.create_task(sample(a.pid, a.sample_every, samples, t0, stop))
    total = int(a.duration * a.rate)
    tasks, late = [], 0
    for i in range(total):
        due = t0 + i / a.rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.1:
            late += 1  # the generator itself fell behind (reported, not an aigate error)
        tasks.append(asyncio.create_task(soak.one(PATTERN[i % len(PATTERN)], i)))
        if len(tasks) >= 1000:
            tasks = [t for t in tasks if not t.done()]
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - t0
    stop.set()
    await sampler
    for _, w in soak.idle:
        w.close()
    print(json.dumps({
        "duration_s": round(elapsed, 1),
        "rate": a.rate,
        "sent": sum(soak.sent.values()),
        "primed": HIT_POOL,
        "by_kind": {k: {"sent": soak.sent[k], "ok": soak.ok[k], "unexpected": soak.unexpected[k],
                        "p50_ms": pct(soak.latencies[k], 50), "p99_ms": pct(soak.latencies[k], 99)}
                    for k in "mhse"},
        "unexpected": sum(soak.unexpected.values()),
        "examples": soak.examples,
        "late_starts": late,
        "max_in_flight": soak.max_in_flight,
        "connections": soak.connections,
        "samples": samples,
    }))


if __name__ == "__main__":
    asyncio.run(main())
