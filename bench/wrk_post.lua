-- wrk script for bench/throughput.py: send pre-built raw HTTP requests, report
-- the latency histogram as one JSON line.
--
-- Environment:
--   WRK_REQUEST_FILES  ';'-separated files, each one complete raw HTTP/1.1
--                      request (head + body); they are sent in turn
--
-- done() prints "WRK_RESULT {...}" with the summary, the socket errors and
-- the latency histogram as [[microseconds, count], ...]. wrk 4 adds
-- synthetic samples to that histogram before done() runs (stats_correct, a
-- coordinated-omission guess); bench/wrk.py removes them again, so the
-- percentiles are those of the requests actually measured.

local files = os.getenv("WRK_REQUEST_FILES") or ""

local bodies = {}
for path in string.gmatch(files, "[^;]+") do
  local f = assert(io.open(path, "rb"))
  bodies[#bodies + 1] = f:read("*a")
  f:close()
end
assert(#bodies > 0, "WRK_REQUEST_FILES names no request file")

local sent = 0
function request()
  sent = sent + 1
  return bodies[(sent - 1) % #bodies + 1]
end

function done(summary, latency, requests)
  local hist = {}
  for i = 1, #latency do
    local value, count = latency(i)
    hist[#hist + 1] = string.format("[%d,%d]", value, count)
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},"hist":[%s]}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout, table.concat(hist, ",")))
end
