-- POSTs a JSON body with a Bearer token and random keys; BENCH_SCENARIO picks the body.
-- Every answer's status is counted, so anything but 2xx is reported, not only wrk's >= 400.
-- At the end one line `BENCH_JSON {...}` carries the numbers for bench/wrk.py.

local scenario = os.getenv("BENCH_SCENARIO") or "foo"
local token = os.getenv("BENCH_TOKEN") or ""
local BATCH = tonumber(os.getenv("BENCH_BATCH") or "100")
local key_prefix = os.getenv("BENCH_KEY_PREFIX") or ""
local ROWS = 1000000
local RANGE = 10000
-- A batch of upserts takes one key from each of BATCH equal slices, in ascending order: every
-- transaction locks its rows in the same order, so two never deadlock (bench/pgbench.py alike).
local SLICE = math.floor(ROWS / BATCH)

local function upsert_body(aid)
  return string.format('{"aid":%d,"bid":%d,"abalance":%d}', aid, math.floor((aid - 1) / 100000) + 1,
    math.random(-5000, 5000))
end

local function batch(action, body)
  local steps = {}
  for i = 1, BATCH do
    steps[i] = string.format('{"action":"%s","body":%s}', action, body(i))
  end
  return '{"actions":[' .. table.concat(steps, ",") .. ']}'
end

local bodies = {
  foo = function()
    return string.format('{"name":"user%d","email":"user%d@example.com"}', math.random(ROWS), math.random(ROWS))
  end,
  read = function() return string.format('{"aid":%d}', math.random(ROWS)) end,
  upsert = function() return upsert_body(math.random(ROWS)) end,
  rows = function() return string.format('{"first":%d}', math.random(ROWS - RANGE + 1)) end,
  batch_read = function()
    return batch("bench/read_tx", function() return string.format('{"aid":%d}', math.random(ROWS)) end)
  end,
  batch_upsert = function()
    return batch("bench/upsert", function(i) return upsert_body((i - 1) * SLICE + math.random(SLICE)) end)
  end,
}
bodies.upsert_keyed = bodies.upsert
bodies.upsert_event = bodies.upsert
local make_body = bodies[scenario]
if make_body == nil then error("unknown BENCH_SCENARIO " .. scenario) end
local keyed = scenario == "upsert_keyed"

local threads = {}
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("id", next_id)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() * 1000 + id)
  non2xx = 0
  replayed = 0
  sent = 0
  statuses = {}
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. token
end

function request()
  if keyed then
    -- Unique in the run: the run's prefix, this thread, this thread's count of requests.
    sent = sent + 1
    wrk.headers["Idempotency-Key"] = string.format("%s-%d-%d", key_prefix, id, sent)
  end
  return wrk.format(nil, nil, nil, make_body())
end

function response(status, headers, body)
  if headers["Idempotent-Replayed"] then
    replayed = replayed + 1
  end
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    statuses[status] = (statuses[status] or 0) + 1
  end
end

function done(summary, latency, requests)
  local non2xx_total = 0
  local replayed_total = 0
  local seen = {}
  for _, thread in ipairs(threads) do
    non2xx_total = non2xx_total + thread:get("non2xx")
    replayed_total = replayed_total + thread:get("replayed")
    for status, count in pairs(thread:get("statuses")) do
      seen[#seen + 1] = string.format('"%d":%d', status, count)
    end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"timeouts":%d,"non2xx":%d,"replayed":%d,"statuses":{%s},' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.timeout, non2xx_total, replayed_total,
    table.concat(seen, ","), latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
