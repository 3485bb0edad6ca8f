-- wrk script: POST each image of $BENCH_IMAGES (colon-separated paths) in turn
-- as a multipart upload (field "image"), and print a JSON summary at the end.
--   BENCH_IMAGES=images/chelsea.png:images/rocket.jpg wrk -c32 -d30s -s bench/multipart.lua URL
local boundary = "keras-server-bench-boundary"
local requests_built = {}
local next_one = 0

local function multipart(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  local name = path:match("([^/]+)$")
  return "--" .. boundary .. "\r\n"
    .. 'Content-Disposition: form-data; name="image"; filename="' .. name .. '"\r\n'
    .. "Content-Type: application/octet-stream\r\n\r\n"
    .. data .. "\r\n--" .. boundary .. "--\r\n"
end

function init(args)
  local headers = { ["Content-Type"] = "multipart/form-data; boundary=" .. boundary }
  for path in string.gmatch(os.getenv("BENCH_IMAGES"), "[^:]+") do
    requests_built[#requests_built + 1] = wrk.format("POST", nil, headers, multipart(path))
  end
end

function request()
  next_one = next_one % #requests_built + 1
  return requests_built[next_one]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, '
      .. '"p99_us": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, '
      .. '"timeouts": %d, "status_errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), e.connect, e.read, e.write, e.timeout, e.status))
end
