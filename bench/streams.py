#!/usr/bin/env python3
"""Streamed chat completions for bench/scale.sh: time to first event, and many streams at once.

    streams.py ttfe --target NAME=URL ... [--hit NAME] [--n N] [--warmup W]
        N streams per target, one at a time: every round sends one stream to each target in turn
        (the order rotated each round, so that no target always follows the same one), each target
        on its own kept-alive connection (raw socket, TCP_NODELAY). Times each from the request's
        send to the first bytes of a `data:` event, and reads the rest of the stream. Prints JSON:
        per target the streams timed, requests sent (warm-up included), errors, p50/p90/p99 ms;
        per target other than the first, its p50 - the first's p50 with a 95 % bootstrap interval.
        Responses of the --hit target must carry `aigate-cache: HIT`.

    streams.py concurrent --url URL [--n 1000] [--chunk-delay-ms 300]
        One stream alone (the reference, without the delay), then N streams at once, each on its
        own connection, with `x-mock-chunk-delay-ms` so that they last. A stream is complete when
        it answers 200 and its body is the reference's byte for byte (every event, ending with
        `data: [DONE]`).
        Prints JSON: streams, complete, errors (and a few of their texts), events per stream, the
        most streams open at once (from each one's send to its last byte), the spread of the
        sends, time to first event and total time (p50, max).

Time is the client's own clock (time.perf_counter); the load generator runs on its own CPU.
"""

import argparse
import asyncio
import json
import random
import socket
import sys
import time
import urllib.parse

from stats import bootstrap_medians, interval, percentile

BODY = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"stream me"}]}'
AUTH = "Bearer sk-bench-not-a-real-key"


def request_bytes(url, extra=()):
    u = urllib.parse.urlsplit(url)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    head = [f"POST {path} HTTP/1.1", f"Host: {u.netloc}", "Content-Type: application/json",
            f"Authorization: {AUTH}", f"Content-Length: {len(BODY)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + BODY, (u.hostname, u.port or 80)


def parse_head(head):
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers


def check_events(body):
    """The number of `data:` events of an SSE body; raises unless the last is `data: [DONE]`."""
    events = [e for e in body.split(b"\n\n") if e.strip()]
    if not events or events[-1].strip() != b"data: [DONE]":
        raise ValueError(f"stream does not end with data: [DONE] ({len(events)} events)")
    return sum(e.startswith(b"data:") for e in events)


# ------------------------------------------------------------------------------------------------
# Time to first event: one stream at a time on a kept-alive connection
# ------------------------------------------------------------------------------------------------

class Conn:
    """A kept-alive HTTP/1.1 connection that sends one streamed request at a time."""

    def __init__(self, url):
        self.req, self.addr = request_bytes(url)
        self.sock = None

    def connect(self):
        if self.sock:
            self.sock.close()
        self.sock = socket.create_connection(self.addr)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def stream(self):
        """Sends the request; returns (seconds to the first `data:` bytes, headers, events)."""
        if self.sock is None:
            self.connect()
        buf = bytearray()
        t0 = time.perf_counter()
        self.sock.sendall(self.req)
        first = None
        head_end = -1
        while True:  # the head, and the first event's bytes if they come with it
            data = self.sock.recv(65536)
            now = time.perf_counter()
            if not data:
                raise ConnectionError("connection closed before the response")
            buf += data
            if head_end < 0:
                head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0 and buf.find(b"data:", head_end) >= 0:
                first = now - t0
                break
            if head_end >= 0 and len(buf) > head_end + 4 + 16:
                # Something else than an event: read the rest of the body, and report it below.
                break
        status, headers = parse_head(bytes(buf[:head_end]))
        body = self.read_body(buf[head_end + 4:], headers)
        if headers.get("connection", "").lower() == "close":
            self.sock.close()
            self.sock = None
        if status != 200:
            raise ValueError(f"status {status}: {bytes(body[:200])!r}")
        if first is None:
            raise ValueError(f"no data: event at the start of the body: {bytes(body[:200])!r}")
        return first, headers, check_events(bytes(body))

    def read_body(self, rest, headers):
        """The body after the head (chunked or with a content-length); `rest` is what was read."""
        buf = bytearray(rest)

        def need(n):
            while len(buf) < n:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("connection closed in the body")
                buf.extend(data)

        if "content-length" in headers:
            need(int(headers["content-length"]))
            return buf
        if "chunked" not in headers.get("transfer-encoding", "").lower():
            raise ValueError("a body with neither content-length nor chunked encoding")
        body, pos = bytearray(), 0
        while True:
            while (eol := buf.find(b"\r\n", pos)) < 0:
                need(len(buf) + 1)
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            need(eol + 2 + size + 2)
            body += buf[eol + 2:eol + 2 + size]
            pos = eol + 2 + size + 2
            if size == 0:
                return body


def ttfe(args):
    names, conns = [], {}
    for spec in args.target:
        name, _, url = spec.partition("=")
        names.append(name)
        conns[name] = Conn(url)
    times = {n: [] for n in names}
    sent = dict.fromkeys(names, 0)
    errors = dict.fromkeys(names, 0)
    error_texts = {}
    for i in range(args.warmup + args.n):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            sent[name] += 1
            try:
                first, headers, _ = conns[name].stream()
                if name == args.hit and headers.get("aigate-cache", "").upper() != "HIT" and i >= args.warmup:
                    raise ValueError(f"aigate-cache: {headers.get('aigate-cache')!r}, not HIT")
            except (OSError, ValueError) as e:
                errors[name] += 1
                error_texts.setdefault(name, str(e))
                conns[name].sock = None
                continue
            if i >= args.warmup:
                times[name].append(first * 1000)
    rng = random.Random(20250101)
    out = {"targets": {}, "errors": error_texts}
    medians = {}
    for name in names:
        s = sorted(times[name])
        out["targets"][name] = {"streams": len(s), "sent": sent[name], "errors": errors[name],
                                "p50_ms": round(percentile(s, 50), 3), "p90_ms": round(percentile(s, 90), 3),
                                "p99_ms": round(percentile(s, 99), 3)}
        medians[name] = bootstrap_medians(s, 2000, rng) if s else []
    base = names[0]
    for name in names[1:]:
        t = out["targets"][name]
        t["p50_minus_first_ms"] = round(t["p50_ms"] - out["targets"][base]["p50_ms"], 3)
        t["p50_minus_first_ci"] = (interval(a - b for a, b in zip(medians[name], medians[base]))
                                   if medians[name] and medians[base] else [float("nan")] * 2)
    print(json.dumps(out))


# ------------------------------------------------------------------------------------------------
# Many streams at once, a connection each
# ------------------------------------------------------------------------------------------------

async def one_stream(req, addr):
    """(send time, first event time, end time, body) of one stream on a new connection."""
    reader, writer = await asyncio.open_connection(*addr)
    try:
        t_sent = time.perf_counter()
        writer.write(req)
        status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
        if status != 200:
            raise ValueError(f"status {status}: {(await reader.read(200))!r}")
        if "chunked" not in headers.get("transfer-encoding", "").lower():
            raise ValueError("the stream is not chunked")
        body, t_first = bytearray(), None
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            if t_first is None:
                t_first = time.perf_counter()
            body += chunk[:-2]
        return t_sent, t_first, time.perf_counter(), bytes(body)
    finally:
        writer.close()


async def concurrent(args):
    req, addr = request_bytes(args.url, [f"x-mock-chunk-delay-ms: {args.chunk_delay_ms}"])
    # The reference without the delay: the same bytes, sooner.
    ref = (await one_stream(request_bytes(args.url, ["x-mock-chunk-delay-ms: 0"])[0], addr))[3]
    events = check_events(ref)
    results = await asyncio.gather(*(one_stream(req, addr) for _ in range(args.n)), return_exceptions=True)
    ok, error_texts, marks = [], {}, []
    for r in results:
        if isinstance(r, BaseException):
            text = f"{type(r).__name__}: {r}"
        elif r[3] != ref:
            text = f"body differs from the reference ({len(r[3])} bytes, {r[3].count(b'data:')} events)"
        else:
            ok.append(r)
            marks += [(r[0], 1), (r[2], -1)]
            continue
        error_texts[text] = error_texts.get(text, 0) + 1
    open_now = peak = 0
    for _, step in sorted(marks):
        open_now += step
        peak = max(peak, open_now)
    first = sorted((r[1] - r[0]) * 1000 for r in ok)
    total = sorted((r[2] - r[0]) * 1000 for r in ok)
    sends = [r[0] for r in ok]
    print(json.dumps({
        "streams": args.n, "complete": len(ok), "errors": args.n - len(ok),
        "error_texts": dict(list(error_texts.items())[:5]), "events_per_stream": events,
        "peak_open": peak, "send_spread_ms": round((max(sends) - min(sends)) * 1000, 1) if sends else None,
        "ttfe_p50_ms": round(percentile(first, 50), 3), "ttfe_max_ms": round(first[-1], 3) if first else None,
        "total_p50_ms": round(percentile(total, 50), 1), "total_max_ms": round(total[-1], 1) if total else None,
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("ttfe")
    t.add_argument("--target", action="append", required=True, help="NAME=URL; the first is the baseline")
    t.add_argument("--hit", help="the target whose answers must be cache hits")
    t.add_argument("--n", type=int, default=1000)
    t.add_argument("--warmup", type=int, default=50)
    c = sub.add_parser("concurrent")
    c.add_argument("--url", required=True)
    c.add_argument("--n", type=int, default=1000)
    c.add_argument("--chunk-delay-ms", type=int, default=300)
    args = p.parse_args()
    if args.mode == "ttfe":
        ttfe(args)
    else:
        asyncio.run(concurrent(args))


if __name__ == "__main__":
    sys.exit(main())
