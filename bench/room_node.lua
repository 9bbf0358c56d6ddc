-- One node of bench/rooms.lua: a duplex server whose connections to /sub
-- subscribe to the room "room:bench" (recovering it with ?since= when the
-- room keeps history), and whose connections to /pub publish every message
-- they send into it; GET /stats tells the broker's counts. Prints
-- `LISTENING <port>` once it accepts connections; exits on SIGTERM.
--
--   lua5.4 bench/room_node.lua --redis URL [--cluster] [--history] [--node-id ID]
local root = arg[0]:match("^(.*)/bench/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/build/?.so;" .. package.cpath

local duplex = require "duplex"
local pubsub = require "duplex.pubsub"
local redis = require "duplex.redis"

local opts = {}
local i = 1
while i <= #arg do
  local a, v = arg[i], arg[i + 1]
  if a == "--redis" then opts.redis = v; i = i + 2
  elseif a == "--node-id" then opts.node_id = v; i = i + 2
  elseif a == "--cluster" then opts.cluster = true; i = i + 1
  elseif a == "--history" then opts.history = true; i = i + 1
  else
    io.stderr:write("usage: lua5.4 bench/room_node.lua --redis URL [--cluster] [--history] [--node-id ID]\n")
    os.exit(2)
  end
end

local function status(s, detail)
  if s ~= "up" then io.stderr:write("room_node ", tostring(opts.node_id), ": broker ", s, ": ", detail, "\n") end
end

local broker_opts = { node_id = opts.node_id, on_status = status,
  history = opts.history and { match = "^room:", size = 100000, ttl = 600 } or nil }
if opts.cluster then broker_opts.nodes = { opts.redis } else broker_opts.url = opts.redis end
local broker = assert(redis.broker(broker_opts))
local hub = pubsub.new { broker = broker, max_backlog = 64 << 20,
  format = opts.history and function(_, m, pos) return pos.offset .. " " .. m end or nil }

local ROOM = "room:bench"
local server = assert(duplex.listen {
  host = "127.0.0.1", port = 0, ping_interval = 0, max_connections = 100000,
  handler = function(ws, req)
    if req.path == "/pub" then
      for message in ws:messages() do hub:publish(ROOM, message) end
      return
    end
    if opts.history then
      assert(hub:recover(ws, ROOM, pubsub.parse_position(req.query.since)))
    else
      hub:subscribe(ws, ROOM)
    end
    ws:send("subscribed")
    for _ in ws:messages() do end
    hub:unsubscribe_all(ws)
  end,
  on_http = function(req)
    if req.path ~= "/stats" then return end
    local s = broker.stats
    return 200, { ["Content-Type"] = "text/plain" },
      ("published %d received %d dropped %d recovered %d gaps %d reconnects %d\n"):format(s.published,
        s.received, s.dropped, s.recovered, s.gaps, s.reconnects)
  end,
})

local function stop()
  server:shutdown(1)
  broker:close()
  duplex.stop()
end
duplex.signal("INT", stop)
duplex.signal("TERM", stop)
print("LISTENING " .. server.port)
io.stdout:flush()
duplex.run()
