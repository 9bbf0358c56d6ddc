-- Cross-node delivery latency through Redis: node A publishes timestamped
-- messages; node B (a second process) delivers them to a WebSocket
-- subscriber, which is a client in this process, so both ends read the same
-- monotonic clock. Prints median, p99 and max for a paced run (one message
-- per millisecond: latency when idle) and a burst (all at once: latency
-- while Redis and node B catch up).
--
--   lua5.4 bench/redis_latency.lua [--redis redis://127.0.0.1:6379] [--count 1000]
--
-- Without --redis it starts its own redis-server on a free port and stops
-- it afterwards.
local root = arg[0]:match("^(.*)/bench/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/build/?.so;" .. package.cpath

local duplex = require "duplex"
local core = require "duplex.core"
local pubsub = require "duplex.pubsub"
local redis = require "duplex.redis"

local opts = { count = 1000 }
local i = 1
while i <= #arg do
  local a, v = arg[i], arg[i + 1]
  if a == "--redis" then opts.redis = v
  elseif a == "--count" then opts.count = math.tointeger(tonumber(v)) or error("bad --count")
  elseif a == "--node-b" then opts.node_b = true; i = i - 1
  else
    io.stderr:write("usage: lua5.4 bench/redis_latency.lua [--redis URL] [--count N]\n")
    os.exit(2)
  end
  i = i + 2
end

local function broker(url)
  local b = assert(redis.broker { url = url, on_status = function(s, detail)
    if s == "down" then io.stderr:write("redis_latency: broker down: ", detail, "\n") end
  end })
  return b
end

-- Node B: subscribe one WebSocket client to "bench", exit when it leaves.
if opts.node_b then
  local hub = pubsub.new { broker = broker(opts.redis) }
  local server = assert(duplex.listen { host = "127.0.0.1", port = 0, ping_interval = 0, handler = function(ws)
    hub:subscribe(ws, "bench")
    for _ in ws:messages() do end
    hub:unsubscribe_all(ws)
    duplex.stop()
  end })
  print(server:url("/"))
  io.stdout:flush()
  duplex.run()
  os.exit(0)
end

-- Our own redis-server, in the foreground (so that it is our child and
-- gets reaped), stopped by SHUTDOWN.
local redis_proc, redis_port
if not opts.redis then
  local l = assert(core.listen { host = "127.0.0.1", port = 0 })
  redis_port = select(2, l:address())
  l:close()
  redis_proc = assert(io.popen(("exec redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no" ..
    " --dir /tmp"):format(redis_port)))
  repeat
    local line = redis_proc:read("l")
    if not line then error("redis-server did not start") end
  until line:find("Ready to accept connections", 1, true)
  opts.redis = "redis://127.0.0.1:" .. redis_port
end

local function stop_redis()
  if redis_proc then
    os.execute(("redis-cli -p %d shutdown nosave >/dev/null 2>&1"):format(redis_port))
    redis_proc:read("a")
    redis_proc:close()
  end
end

local function percentile(sorted, p)
  return sorted[math.max(1, math.ceil(#sorted * p))]
end

local function run()
  local node_b = assert(io.popen(("lua5.4 %s/bench/redis_latency.lua --node-b --redis %s")
    :format(root, opts.redis)))
  local url = node_b:read("l")
  assert(url and url:match("^ws://"), "node B did not start")
  local hub = pubsub.new { broker = broker(opts.redis) }
  local ws = assert(duplex.connect(url, { ping_interval = 0 }))

  -- Until node B has subscribed in Redis, messages pass it by.
  local deadline = duplex.now() + 10
  repeat
    assert(duplex.now() < deadline, "no message went through Redis within 10 s")
    hub:publish("bench", "warmup")
  until ws:receive(0.05) == "warmup"
  while ws:receive(0.2) do end

  local function measure(gap)
    local lat, n = {}, opts.count
    duplex.spawn(function()
      for k = 1, n do
        hub:publish("bench", string.format("%d %.9f", k, duplex.now()))
        if gap > 0 then duplex.sleep(gap) end
      end
    end)
    while #lat < n do
      local m = ws:receive(10)
      if not m then error("lost messages: got " .. #lat .. " of " .. n) end
      local sent = tonumber(m:match(" (%S+)$"))
      if sent then lat[#lat + 1] = (duplex.now() - sent) * 1e3 end
    end
    table.sort(lat)
    return lat
  end

  local results = {
    { "paced (1 per ms)", measure(0.001) },
    { "burst", measure(0) },
  }
  print(string.format("cross-node delivery through Redis (%s), %d messages, ms:", opts.redis, opts.count))
  for _, r in ipairs(results) do
    local lat = r[2]
    print(string.format("  %-17s median %.3f  p90 %.3f  p99 %.3f  max %.3f", r[1], percentile(lat, 0.5),
      percentile(lat, 0.9), percentile(lat, 0.99), lat[#lat]))
  end
  ws:close()
  node_b:close()
end

local ok, err = pcall(run)
stop_redis()
if not ok then
  io.stderr:write("redis_latency: ", tostring(err), "\n")
  os.exit(1)
end
