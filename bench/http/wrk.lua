-- wrk script for bench/http (run.py drives it; see README.md). Every request is
-- `POST /payments` with the same JSON body; what differs is the Idempotency-Key:
--
--   BENCH_MODE=new     a new key per request: BENCH_KEY_PREFIX, a random part per thread,
--                      64 random bits per request, then a per-thread counter (run.py gives
--                      every wrk run its own prefix, so a measured run never meets a key of
--                      its warm-up). Random, as clients send them (the Idempotency-Key
--                      draft recommends UUIDs): keys that only counted up would land on one
--                      B-tree leaf of a table indexed by the raw key (pg-floor), a locality
--                      real traffic does not give, while our stores index a hash anyway
--   BENCH_MODE=replay  the fixed key BENCH_KEY, stored beforehand by one request
--
-- BENCH_BODY is the request body, BENCH_COOKIE an optional Cookie header (the peer caches
-- only for a request that carries its session cookie). `done` prints one line,
-- `BENCH_RESULT {json}`, with the counts and latency percentiles (microseconds) that
-- run.py reads.

local mode = os.getenv("BENCH_MODE") or "new"
local body = os.getenv("BENCH_BODY")
    or '{"amount":1250,"currency":"EUR","reference":"order-8e03978e","customer":"cus_4f1c2a9b","method":"sepa_dd"}'
local cookie = os.getenv("BENCH_COOKIE")

wrk.method = "POST"
wrk.path = "/payments"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
if cookie and cookie ~= "" then
  wrk.headers["Cookie"] = cookie
end

local next_thread = 0
function setup(thread)
  next_thread = next_thread + 1
  thread:set("thread_id", next_thread)
end

if mode == "replay" then
  local key = os.getenv("BENCH_KEY")
  if not key or key == "" then
    error("BENCH_MODE=replay needs BENCH_KEY")
  end
  -- A static request: wrk sends the same bytes every time.
  wrk.headers["Idempotency-Key"] = key
else
  local prefix = os.getenv("BENCH_KEY_PREFIX") or "k-"
  local counter = 0

  function init(args)
    math.randomseed(os.time() * 1000 + (thread_id or 0))
    prefix = string.format("%s%d-%08x-", prefix, thread_id or 0, math.random(0, 0x7fffffff))
  end

  function request()
    counter = counter + 1
    wrk.headers["Idempotency-Key"] = string.format("%s%08x%08x-%d", prefix,
      math.random(0, 0x7fffffff), math.random(0, 0x7fffffff), counter)
    return wrk.format()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
