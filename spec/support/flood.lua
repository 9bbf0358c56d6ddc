-- A hostile WebSocket client, run as a child process by the specs:
--   lua5.4 spec/support/flood.lua PORT pings
-- opens a connection to 127.0.0.1:PORT and writes small pings as fast as
-- the server takes them, never reading a byte (its pongs pile up). Prints
-- "flooding" once the handshake is done and keeps going until killed.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = (os.getenv("DUPLEX_CPATH") or "lua/?.so") .. ";" .. package.cpath
local core = require "duplex.core"

local port = assert(tonumber(arg[1]), "usage: flood.lua PORT pings")

core.spawn(function()
  local sock = assert(core.connect { host = "127.0.0.1", port = port, timeout = 10 })
  local hc = core.handshake_client { host = "127.0.0.1", port = port, target = "/" }
  sock:write(hc:request())
  repeat until hc:feed(assert(sock:read(nil, 10)))
  local e = core.engine { role = "client" }
  for i = 1, 4096 do assert(e:ping(tostring(i % 10))) end
  local burst = e:data_to_send()
  print("flooding")
  io.stdout:flush()
  while true do
    sock:write(burst)
    if not sock:flush(600) then break end
  end
end)
core.run()
