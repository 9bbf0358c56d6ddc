-- An echo client: sends every message it receives back to the server with
-- its type; exits 0 when the server closes normally (1000 or 1001).
--   lua5.4 examples/echo_client.lua ws://127.0.0.1:9001/ [--deflate]
--        [--protocol NAME] [--insecure] [--ca FILE]
local root = arg[0]:match("^(.*)/examples/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
-- DUPLEX_CPATH (set by scripts/asan-env) runs the examples on the sanitized build
package.cpath = (os.getenv("DUPLEX_CPATH") or root .. "/build/?.so") .. ";" .. package.cpath

local duplex = require "duplex"

local url
local opts = {}
local i = 1
while i <= #arg do
  local a = arg[i]
  if a == "--deflate" then opts.deflate = true
  elseif a == "--protocol" then opts.protocols = { arg[i + 1] }; i = i + 1
  elseif a == "--insecure" then opts.tls = { verify = false }
  elseif a == "--ca" then opts.tls = { ca = arg[i + 1] }; i = i + 1
  elseif not url and not a:match("^%-") then url = a
  else
    io.stderr:write("usage: lua5.4 examples/echo_client.lua URL [--deflate] [--protocol P] [--insecure] [--ca FILE]\n")
    os.exit(2)
  end
  i = i + 1
end
if not url then
  io.stderr:write("usage: lua5.4 examples/echo_client.lua URL [--deflate]\n")
  os.exit(2)
end

local ws, err = duplex.connect(url, opts)
if not ws then
  io.stderr:write("echo_client: ", tostring(err), "\n")
  os.exit(1)
end

local count = 0
while true do
  local message, kind, code, reason = ws:receive()
  if message == nil then
    if code == 1000 or code == 1001 then
      print(string.format("echo_client: server closed (%d %s) after %d messages", code, reason or "", count))
      os.exit(0)
    end
    io.stderr:write(string.format("echo_client: connection ended: %s (code %s, %s)\n",
      tostring(kind), tostring(code), tostring(reason)))
    os.exit(1)
  end
  count = count + 1
  local ok, serr = ws:send(message, kind)
  if not ok then
    io.stderr:write("echo_client: send failed: ", tostring(serr), "\n")
  end
end
