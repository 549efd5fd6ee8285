-- wrk script for vecshim benchmarks: POST /vectors, one text per request, no
-- Content-Type (as Weaviate's Go client sends it). Bodies come from the file
-- named by the environment variable VECSHIM_WRK_BODIES, one JSON body per line
-- (bench/wrkload.py writes it; VECSHIM_WRK_PATH picks /vectors or /v1/embeddings); each wrk thread walks its own slice, so with
-- a unique corpus no text repeats within a run. At the end a JSON summary line
-- is printed, prefixed with "WRKJSON ".
local bodies = {}
local threads = {}
local counter = 0

local function load_bodies()
  local path = os.getenv("VECSHIM_WRK_BODIES")
  for line in io.lines(path) do bodies[#bodies + 1] = line end
end

function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
  table.insert(threads, thread)
end

function init(args)
  load_bodies()
  local n = tonumber(os.getenv("VECSHIM_WRK_THREADS") or "1")
  local per = math.floor(#bodies / n)
  first = (id - 1) * per + 1
  last = first + per - 1
  pos = first
  bad = 0
  wrk.method = "POST"
  wrk.path = os.getenv("VECSHIM_WRK_PATH") or "/vectors"
  wrk.headers["User-Agent"] = "Go-http-client/1.1"
  wrk.headers["Accept-Encoding"] = "gzip"
end

function request()
  local body = bodies[pos]
  pos = pos + 1
  if pos > last then pos = first end
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  if status ~= 200 or string.sub(body, 1, 1) ~= "{" or not (string.find(body, '"vector":[', 1, true)
      or string.find(body, '"embedding":[', 1, true)) then
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local bad_total = 0
  for _, t in ipairs(threads) do bad_total = bad_total + (t:get("bad") or 0) end
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bad":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"timeouts":%d,"status_errors":%d,"p50_ms":%.3f,"p95_ms":%.3f,"p99_ms":%.3f}\n',
    summary.requests, summary.duration, bad_total, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, summary.errors.status,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000))
end
