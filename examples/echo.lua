-- An echo server: every message goes back with its type.
--   lua5.4 examples/echo.lua --port 9001 [--host 127.0.0.1] [--path /]
--        [--tls-cert cert.pem --tls-key key.pem] [--max-size BYTES]
--        [--deflate] [--deflate-takeover] [--deflate-window 8..15]
--        [--ping-interval SECONDS (0 = off)]
--        [--workers N (processes sharing the port; needs a fixed --port)]
--        [--callbacks (on_message instead of a handler: no coroutine per connection)]
local root = arg[0]:match("^(.*)/examples/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
-- DUPLEX_CPATH (set by scripts/asan-env) runs the examples on the sanitized build
package.cpath = (os.getenv("DUPLEX_CPATH") or root .. "/build/?.so") .. ";" .. package.cpath

local duplex = require "duplex"

local function usage(msg)
  io.stderr:write((msg and msg .. "\n" or "") .. [[
usage: lua5.4 examples/echo.lua --port N [--host H] [--path P]
       [--tls-cert FILE --tls-key FILE] [--max-size BYTES] [--deflate]
       [--deflate-takeover] [--deflate-window BITS]
       [--ping-interval SECONDS] [--workers N] [--max-connections N] [--callbacks]
]])
  os.exit(2)
end

local opts = { port = 9001, host = "127.0.0.1", path = "/" }
local i = 1
while i <= #arg do
  local a, v = arg[i], arg[i + 1]
  if a == "--port" then opts.port = tonumber(v) or usage("bad --port")
  elseif a == "--host" then opts.host = v
  elseif a == "--path" then opts.path = v
  elseif a == "--tls-cert" then opts.cert = v
  elseif a == "--tls-key" then opts.key = v
  elseif a == "--max-size" then opts.max_message = tonumber(v) or usage("bad --max-size")
  elseif a == "--ping-interval" then opts.ping_interval = tonumber(v) or usage("bad --ping-interval")
  elseif a == "--max-connections" then opts.max_connections = tonumber(v) or usage("bad --max-connections")
  elseif a == "--workers" then opts.workers = tonumber(v) or usage("bad --workers")
  elseif a == "--deflate" then opts.deflate = opts.deflate or true; i = i - 1
  elseif a == "--callbacks" then opts.callbacks = true; i = i - 1
  elseif a == "--deflate-takeover" then
    -- keep the server's compression context between messages (better ratio,
    -- more memory per connection); the default compresses each on its own
    opts.deflate = type(opts.deflate) == "table" and opts.deflate or {}
    opts.deflate.server_no_context_takeover = false
    i = i - 1
  elseif a == "--deflate-window" then
    opts.deflate = type(opts.deflate) == "table" and opts.deflate or { server_no_context_takeover = true }
    local bits = tonumber(v)
    if not bits or bits < 8 or bits > 15 then usage("--deflate-window must be 8..15") end
    opts.deflate.server_max_window_bits, opts.deflate.client_max_window_bits = bits, bits
  elseif a == "--help" or a == "-h" then usage()
  else usage("unknown option " .. tostring(a)) end
  i = i + 2
end
if (opts.cert == nil) ~= (opts.key == nil) then usage("--tls-cert and --tls-key go together") end

-- The same echo in both styles: a handler coroutine per connection, or a
-- callback for each message with none.
local function echo(ws)
  for message, kind in ws:messages() do
    if not ws:send(message, kind) then break end
  end
end
local function echo_message(ws, message, kind) ws:send(message, kind) end

local function start()
  local server, err = duplex.listen {
    host = opts.host,
    port = opts.port,
    reuseport = (opts.workers or 1) > 1,
    path = opts.path ~= "/" and opts.path or nil,
    tls = opts.cert and { cert = opts.cert, key = opts.key } or nil,
    max_message = opts.max_message,
    max_connections = opts.max_connections,
    ping_interval = opts.ping_interval,
    deflate = opts.deflate,
    handler = not opts.callbacks and echo or nil,
    on_message = opts.callbacks and echo_message or nil,
  }
  if not server then
    io.stderr:write("echo: ", err, "\n")
    os.exit(1)
  end
  return server
end

if opts.workers and opts.workers > 1 then
  if opts.port == 0 then usage("--workers needs a fixed --port") end
  print(string.format("echo server listening on %s://%s:%d%s with %d workers", opts.cert and "wss" or "ws",
    opts.host:find(":") and "[" .. opts.host .. "]" or opts.host, opts.port, opts.path, opts.workers))
  io.stdout:flush()
  duplex.run { workers = opts.workers, setup = start, on_stop = function(server) server:shutdown(2) end }
  os.exit(0)
end

local server = start()
local function stop()
  server:shutdown(2)
  duplex.stop()
end
duplex.signal("INT", stop)
duplex.signal("TERM", stop)

print("echo server listening on " .. server:url(opts.path))
io.stdout:flush()
duplex.run()
