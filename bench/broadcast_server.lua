-- Broadcast peer for `loadgen broadcast`, duplex's twin of
-- node_broadcast_server.js: every message from any client goes to every
-- connected client (the sender included), with its text/binary type.
-- Prints `LISTENING <port>` once it accepts connections; exits on SIGTERM/SIGINT.
--
--   lua5.4 bench/broadcast_server.lua [--host H] [--port N]
--
-- examples/chat/server.lua does the same for a room, but it also announces
-- every join to the whole room: opening 10,000 subscribers would cost
-- 50 million notices before the first measured message.
local root = arg[0]:match("^(.*)/bench/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/build/?.so;" .. package.cpath

local duplex = require "duplex"
local pubsub = require "duplex.pubsub"

local opts = { host = "127.0.0.1", port = 0 }
for i = 1, #arg, 2 do
  local flag, value = arg[i], arg[i + 1]
  if flag == "--host" and value then opts.host = value
  elseif flag == "--port" and tonumber(value) then opts.port = tonumber(value)
  else
    io.stderr:write("usage: lua5.4 bench/broadcast_server.lua [--host H] [--port N]\n")
    os.exit(2)
  end
end

local hub = pubsub.new()
local server, err = duplex.listen {
  host = opts.host,
  port = opts.port,
  max_connections = 100000, -- the file descriptor limit is the real bound
  handler = function(ws)
    hub:subscribe(ws, "all")
    for message, kind in ws:messages() do hub:publish("all", message, kind) end
    hub:unsubscribe_all(ws)
  end,
}
if not server then
  io.stderr:write("broadcast_server: ", err, "\n")
  os.exit(1)
end

local function stop()
  server:shutdown(1)
  duplex.stop()
end
duplex.signal("INT", stop)
duplex.signal("TERM", stop)

print("LISTENING " .. server.port)
io.stdout:flush()
duplex.run()
