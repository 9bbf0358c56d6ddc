-- A WebSocket echo server inside a cqueues controller, beside other
-- cqueues work (here a ticker that would stall if anything blocked).
--
--   lua5.4 examples/cqueues/echo.lua [--port 8080] [--deflate] [--ping-interval S]
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path
package.cpath = "./build/?.so;" .. package.cpath
local cqueues = require "cqueues"
local dcq = require "duplex.cqueues"

local opts = { port = 8080, ping_interval = 20 }
local i = 1
while arg[i] do
  local a = arg[i]
  if a == "--port" then opts.port = tonumber(arg[i + 1]); i = i + 1
  elseif a == "--deflate" then opts.deflate = true
  elseif a == "--ping-interval" then opts.ping_interval = tonumber(arg[i + 1]); i = i + 1
  else io.stderr:write("unknown option ", a, "\n"); os.exit(2) end
  i = i + 1
end

local cq = cqueues.new()
local ticks = 0
local server = assert(dcq.listen(cq, {
  port = opts.port,
  deflate = opts.deflate,
  ping_interval = opts.ping_interval,
  max_message = 4 * 1024 * 1024,
  handler = function(ws)
    for message, kind in ws:messages() do
      if message == "ticks?" then ws:send(tostring(ticks)) else ws:send(message, kind) end
    end
  end,
}))
cq:wrap(function()
  while true do cqueues.sleep(0.01); ticks = ticks + 1 end
end)
print("cqueues echo server listening on " .. server.url("/"))
io.stdout:flush()
local ok, err = cq:loop()
if not ok then io.stderr:write("cqueues: ", tostring(err), "\n"); os.exit(1) end
