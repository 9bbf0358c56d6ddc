-- Server memory per connection with permessage-deflate, by mode: N clients
-- connect, exchange one JSON chat message each (so that every stream that
-- context takeover keeps has been allocated), then stay idle; the server's
-- RSS growth divided by N is the per-connection cost.
--
--   lua5.4 bench/deflate_memory.lua [--conns 10000]
--
-- The server is a child process (this script with --serve MODE); the
-- clients live in this process.
local root = arg[0]:match("^(.*)/bench/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/build/?.so;" .. package.cpath

local duplex = require "duplex"
local core = require "duplex.core"

-- mode -> server policy (nil: deflate off) and client offer
local MODES = {
  { name = "deflate off" },
  { name = "no context takeover (server default)", server = true,
    offer = { client_max_window_bits = true, client_no_context_takeover = true } },
  { name = "context takeover, window 15, memLevel 5", server = { mem_level = 5 },
    offer = { client_max_window_bits = true } },
  { name = "context takeover, window 12, memLevel 5", server = { mem_level = 5,
    server_max_window_bits = 12, client_max_window_bits = 12 }, offer = { client_max_window_bits = true } },
}

local MESSAGE = '{"type":"message","room":"lobby","user":"alice","text":"hello everyone, how is it going today?"}'

if arg[1] == "--serve" then
  local mode = MODES[tonumber(arg[2])]
  local srv = assert(duplex.listen { host = "127.0.0.1", port = 0, max_connections = 100000,
    deflate = mode.server, ping_interval = 0, compress_threshold = 0,
    handler = function(ws) for m, k in ws:messages() do ws:send(m, k) end end })
  print(srv.port)
  io.stdout:flush()
  duplex.signal("TERM", function() duplex.stop() end)
  duplex.run()
  os.exit(0)
end

local conns = 10000
if arg[1] == "--conns" then conns = tonumber(arg[2]) end

local function rss_kb(pid)
  local f = io.open("/proc/" .. pid .. "/status")
  local kb = tonumber(f:read("a"):match("VmRSS:%s*(%d+)"))
  f:close()
  return kb
end

local function measure(index, mode)
  local p = io.popen("echo $$; exec lua5.4 " .. arg[0] .. " --serve " .. index)
  local pid = tonumber(p:read("l"))
  local port = tonumber(p:read("l"))
  local url = "ws://127.0.0.1:" .. port .. "/"
  local before = rss_kb(pid)
  local clients, failed = {}, 0
  duplex.run { setup = function()
    duplex.spawn(function()
      local done, workers = 0, 20
      for w = 1, workers do
        duplex.spawn(function()
          for i = w, conns, workers do
            local ws = duplex.connect(url, { deflate = mode.offer or false, ping_interval = 0, timeout = 30 })
            if ws and ws:send(MESSAGE) and ws:receive(30) == MESSAGE then clients[i] = ws
            else failed = failed + 1 end
          end
          done = done + 1
        end)
      end
      while done < workers do duplex.sleep(0.05) end
      duplex.sleep(1) -- let the server settle
      duplex.stop()
    end)
  end }
  local after = rss_kb(pid)
  local deflated = clients[1] and clients[1].deflate
  print(string.format("%-42s %6d conns  %8.0f B/conn  (RSS %d -> %d KiB, deflate %s%s)", mode.name, conns,
    (after - before) * 1024 / conns, before, after, tostring(deflated),
    failed > 0 and (", " .. failed .. " failed") or ""))
  io.stdout:flush()
  for _, ws in pairs(clients) do ws:abort() end
  core.kill(pid, "TERM")
  p:close()
  collectgarbage()
end

print(string.format("server RSS per connection after one %d-byte JSON message each way, then idle:", #MESSAGE))
for i, mode in ipairs(MODES) do measure(i, mode) end
