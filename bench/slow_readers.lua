#!/usr/bin/env lua5.4
-- Slow readers against examples/echo.lua: PEERS clients each push SIZE-byte
-- messages as fast as the server takes them and never read a byte, while a
-- fresh client every 100 ms connects, echoes 32 B and leaves. Reports the
-- server's RSS growth (peak over the run, per peer) against what the limits
-- promise (high_water + one message per connection), and the fresh
-- clients' latency (connect + handshake + echo), p50 and p99.
--
--   lua5.4 bench/slow_readers.lua [--peers 200] [--size 1048576] [--seconds 8]
local ROOT = arg[0]:match("^(.*)/bench/[^/]*$") or "."
package.path = ROOT .. "/lua/?.lua;" .. ROOT .. "/lua/?/init.lua;" .. package.path
package.cpath = (os.getenv("DUPLEX_CPATH") or ROOT .. "/build/?.so") .. ";" .. package.cpath
local duplex = require "duplex"
local core = require "duplex.core"

local opts = { peers = 200, size = 1 << 20, seconds = 8 }
for i = 1, #arg, 2 do
  local k = arg[i]:match("^%-%-(%w+)$")
  if not (k and opts[k] and tonumber(arg[i + 1])) then
    io.stderr:write("usage: lua5.4 bench/slow_readers.lua [--peers N] [--size BYTES] [--seconds S]\n")
    os.exit(2)
  end
  opts[k] = tonumber(arg[i + 1])
end

local function rss_kb(pid)
  local f = io.open("/proc/" .. pid .. "/status")
  if not f then return nil end
  local kb = tonumber(f:read("a"):match("VmRSS:%s*(%d+)"))
  f:close()
  return kb
end

-- the server, as a child whose first line names its port
local out = os.tmpname()
local p = io.popen(string.format("cd %s && lua5.4 examples/echo.lua --port 0 > %s 2>&1 & echo $!", ROOT, out))
local pid = p:read("l")
p:close()
local port
for _ = 1, 100 do
  local f = io.open(out)
  port = f:read("a"):match("listening on ws://127%.0%.0%.1:(%d+)")
  f:close()
  if port then break end
  os.execute("sleep 0.1")
end
assert(port and pid, "the echo server did not start")
port = tonumber(port)

local result = {}
duplex.spawn(function()
  core.sleep(0.3)
  local base = rss_kb(pid)
  local stop = false
  -- the pushing peers run in a process of their own, so that their work
  -- does not delay the fresh clients measured here
  local pusher = io.popen(string.format("cd %s && exec lua5.4 spec/support/flood.lua %d push %d %d & echo $!",
    ROOT, port, opts.peers, opts.size))
  local pusher_pid = pusher:read("l")
  local peak, lat = base, {}
  local deadline = core.now() + opts.seconds
  core.spawn(function()
    while not stop do
      local t0 = core.now()
      local ws = duplex.connect("ws://127.0.0.1:" .. port .. "/", { timeout = 10 })
      if ws then
        ws:send(string.rep("p", 32))
        if ws:receive(10) then lat[#lat + 1] = core.now() - t0 end
        ws:abort("done")
      end
      core.sleep(0.1)
    end
  end)
  while core.now() < deadline do
    local r = rss_kb(pid)
    if r and r > peak then peak = r end
    core.sleep(0.1)
  end
  stop = true
  os.execute("kill " .. pusher_pid)
  pusher:close()
  if os.getenv("SLOW_READERS_TRACE") then
    for _, l in ipairs(lat) do io.stderr:write(string.format("%.1f ", l * 1000)) end
    io.stderr:write("\n")
  end
  table.sort(lat)
  result.base, result.peak, result.lat = base, peak, lat
  core.sleep(1.2)
end)
duplex.run()
os.execute("kill " .. pid)
os.remove(out)

local grown = result.peak - result.base
local promised = 1024 + opts.size / 1024 -- high_water (1 MiB) + one message, KiB
local lat = result.lat
local function pct(frac) return lat[math.max(1, math.ceil(#lat * frac))] end
print(string.format("slow readers: %d peers x %d B messages, %d s", opts.peers, opts.size, opts.seconds))
print(string.format("server RSS: base %.1f MiB, peak %.1f MiB, growth %.1f MiB = %.2f MiB per peer"
  .. " (limits promise %.2f MiB + fixed)",
  result.base / 1024, result.peak / 1024, grown / 1024, grown / 1024 / opts.peers, promised / 1024))
if #lat > 0 then
  print(string.format("fresh clients: %d served, p50 %.1f ms, p99 %.1f ms", #lat, pct(0.5) * 1000, pct(0.99) * 1000))
else
  print("fresh clients: none served")
end
