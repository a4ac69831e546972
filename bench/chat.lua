-- wrk script for bench/run.sh: POST a non-streaming chat completion and print one
-- machine-readable summary line at the end.
--
-- The request body is read from the file named by BENCH_BODY_FILE (bench/request.json).
-- Extra request headers can be given in BENCH_HEADERS as "name: value" pairs separated by "|".

local path = os.getenv("BENCH_BODY_FILE") or "bench/request.json"
local f = assert(io.open(path, "rb"), "cannot open request body " .. path)
local body = f:read("*a")
f:close()

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-not-a-real-key"

local extra = os.getenv("BENCH_HEADERS") or ""
for pair in string.gmatch(extra, "[^|]+") do
  local name, value = string.match(pair, "^%s*([^:]+):%s*(.-)%s*$")
  if name then
    wrk.headers[name] = value
  end
end

-- One line that bench/run.sh parses. Latencies are in microseconds (wrk's unit).
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d rps=%.2f p50_us=%.1f p99_us=%.1f socket_errors=%d non2xx=%d\n",
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
