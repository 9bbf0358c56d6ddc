-- Hostile WebSocket clients, run as a child process by the specs and
-- bench/slow_readers.lua:
--   lua5.4 spec/support/flood.lua PORT pings
--     one connection to 127.0.0.1:PORT writing small pings as fast as the
--     server takes them, never reading a byte (its pongs pile up)
--   lua5.4 spec/support/flood.lua PORT push PEERS SIZE
--     PEERS connections each writing SIZE-byte messages (in writes of at
--     least 64 KiB) as fast as the server takes them, never reading a byte
--     (their echoes pile up)
-- Prints "flooding" once every handshake is done and goes on until killed.
package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;" .. package.path
package.cpath = (os.getenv("DUPLEX_CPATH") or "build/?.so") .. ";" .. package.cpath
local core = require "duplex.core"
local raw = require "support.raw"

local port, mode = tonumber(arg[1]), arg[2]
local peers, size = tonumber(arg[3] or 1), tonumber(arg[4] or 0)
if not port or (mode ~= "pings" and mode ~= "push") then
  io.stderr:write("usage: flood.lua PORT pings | flood.lua PORT push PEERS SIZE\n")
  os.exit(2)
end

local e = core.engine { role = "client" }
if mode == "pings" then
  for i = 1, 4096 do assert(e:ping(tostring(i % 10))) end
else
  local message = string.rep("m", size)
  repeat assert(e:send(message, "binary")) until e:pending() >= 65536
end
local burst = e:data_to_send()

core.spawn(function()
  local ready = 0
  for _ = 1, peers do
    core.spawn(function()
      local sock = raw.upgrade(port, "/", 30)
      ready = ready + 1
      while sock:write(burst) and sock:flush(3600) do end
    end)
  end
  while ready < peers do core.sleep(0.01) end
  print("flooding")
  io.stdout:flush()
end)
core.run()
