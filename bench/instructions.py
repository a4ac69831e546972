#!/usr/bin/env python3
"""Instructions per request, counted by valgrind's callgrind: deterministic where a timed run is not.

    bench/instructions.py BASE_AIGATE NEW_AIGATE [--mock target/release/aigate-mock] [--path /v1/chat/completions]
                          [--reps 3] [--logs on|off] [--base-extra TOML] [--new-extra TOML]

Each binary (release builds; see docs/benchmarks.md) serves one gateway in front of aigate-mock, on
one worker thread, under callgrind; N sequential non-streamed chat requests go through it on one
keep-alive connection, then it is stopped. Two runs (200 and 1,200 requests) give
(Ir(1200) - Ir(200)) / 1000 for the whole process (request path, log writer, timers) and for the
request path alone (the inclusive cost of `service::handle`, up to the response head). The
whole-process figure varies by a few per cent with the log writer's batching, the request-path
figure by 1-2 % (allocator and timer state). The binaries alternate, `--reps` times each, and the
medians are printed. `--base-extra` / `--new-extra` append TOML to one side's config (`{mock}` is
the mock's port): the same binary twice with a setting off and on, e.g. telemetry:

    bench/instructions.py B B --new-extra $'[telemetry]\notlp_endpoint = "http://127.0.0.1:{mock}/otlp"'
"""
import argparse, http.client, json, os, re, signal, socket, statistics, subprocess, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("base"); ap.add_argument("new")
ap.add_argument("--mock", default="target/release/aigate-mock")
ap.add_argument("--path", default="/v1/chat/completions")
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--logs", choices=["on", "off"], default="on")
ap.add_argument("--base-extra", default="")
ap.add_argument("--new-extra", default="")
args = ap.parse_args()
N1, N2 = 200, 1200
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]})


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def run(binary, mport, n, extra):
    tmp = tempfile.mkdtemp(prefix="aigate-cg-")
    port = free_port()
    logs = "" if args.logs == "on" else "[gateways.default.logs]\nenabled = false\n"
    open(f"{tmp}/c.toml", "w").write(
        f'listen = "127.0.0.1:{port}"\ndata_dir = "{tmp}/data"\n[providers.openai]\n'
        f'base_url = "http://127.0.0.1:{mport}/v1"\n[gateways.default]\n{logs}'
        + "\n" + extra.replace("{mock}", str(mport)) + "\n")
    out = f"{tmp}/cg.out"
    p = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", binary, "serve",
                          "--config", f"{tmp}/c.toml", "--worker-threads", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/healthz"); c.getresponse().read(); break
            except OSError:
                time.sleep(0.2)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(n):
            c.request("POST", args.path, BODY, {"content-type": "application/json", "authorization": "Bearer sk-x"})
            r = c.getresponse(); r.read()
            assert r.status == 200, r.status
        c.close()
        time.sleep(1)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=300)
    total = int(re.search(r"^(?:summary|totals): (\d+)", open(out).read(), re.M).group(1))
    ann = subprocess.run(["callgrind_annotate", "--inclusive=yes", out], capture_output=True, text=True).stdout
    m = re.search(r"^\s*([\d,]+) .*aigate_core::service::handle::\{\{closure\}\}", ann, re.M)
    path = int(m.group(1).replace(",", "")) if m else 0
    print("kept", binary, n, out, flush=True) if os.environ.get("KEEP") else subprocess.run(["rm", "-rf", tmp])
    return total, path


mport = free_port()
mock = subprocess.Popen([args.mock, "--listen", f"127.0.0.1:{mport}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.5)
results = {"base": [], "new": []}
try:
    for _ in range(args.reps):
        for name in ("base", "new"):
            binary, extra = getattr(args, name), getattr(args, f"{name}_extra")
            (t1, p1), (t2, p2) = run(binary, mport, N1, extra), run(binary, mport, N2, extra)
            results[name].append(((t2 - t1) / (N2 - N1), (p2 - p1) / (N2 - N1)))
            print(f"{name}: process {results[name][-1][0]:.0f}, request path {results[name][-1][1]:.0f}", flush=True)
finally:
    mock.kill()
print(f"\n{args.path}, logs {args.logs}, medians of {args.reps}: instructions per request")
for name in ("base", "new"):
    proc = statistics.median(r[0] for r in results[name]); path = statistics.median(r[1] for r in results[name])
    print(f"  {name:4}  process {proc:9.0f}   request path (service::handle) {path:8.0f}")
