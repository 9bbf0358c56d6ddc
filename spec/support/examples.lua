-- The example servers as child processes, started the way a user starts
-- them (from the repository root, inheriting the environment, so under
-- scripts/asan-env they run on the sanitized build too).
--
--   local examples = require "support.examples"
--   local h, url, port = examples.echo({"--port", "0"})
--   local h, url, port = examples.serve({"--port", "0"})   -- bin/duplex serve
--   local code, out, err = examples.run({"lua5.4", "examples/echo_client.lua", url})
--   examples.rss_kb(h)                   -- its resident memory, KiB
--   teardown(require("support.proc").killall)
local proc = require "support.proc"
local peers = require "support.peers"
local loop = require "support.loop"

local examples = {}

examples.LUA = "lua5.4"

function examples.spawn(argv, opts)
  opts = opts or {}
  return proc.spawn(argv, { cwd = peers.root, limit = opts.limit or 120, env = opts.env, stdin = opts.stdin })
end

--- Run a program to its end while the loop keeps running (in-process
--- servers serve it); returns exit status (nil if it outlived
--- opts.timeout, default 20 s), stdout, stderr.
function examples.run(argv, opts)
  opts = opts or {}
  local h = examples.spawn(argv, {limit = opts.limit or 60, env = opts.env, stdin = opts.stdin})
  loop.wait_for(function() return not h:running() end, opts.timeout or 20)
  local code, out, err = h:exit_code(), h:stdout(), h:stderr()
  h:cleanup(1)
  return code, out, err
end

--- Start a server program; returns its handle and the captures of pattern
--- matched against the first line it prints.
function examples.start(argv, pattern, opts)
  local h = examples.spawn(argv, opts)
  local line, why = h:read_line(15)
  local a, b = (line or ""):match(pattern)
  if not a then
    local out = h:output()
    h:cleanup()
    error(string.format("%s: expected a line like %q, got %s: %s", table.concat(argv, " "), pattern,
      tostring(line or why), out), 2)
  end
  return h, a, b
end

--- examples/echo.lua with args; returns handle, url, port.
function examples.echo(args, opts)
  local argv = { examples.LUA, "examples/echo.lua" }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  return examples.start(argv, "^echo server listening on (wss?://127%.0%.0%.1:(%d+)/?.*)$", opts)
end

--- examples/chat/server.lua with args; returns handle, page url, port.
function examples.chat(args, opts)
  local argv = { examples.LUA, "examples/chat/server.lua" }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  return examples.start(argv, "^chat server: open (http://127%.0%.0%.1:(%d+)/) in a browser$", opts)
end

--- bin/duplex serve with args; returns handle, url, port.
function examples.serve(args, opts)
  local argv = { examples.LUA, "bin/duplex", "serve" }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  return examples.start(argv, "^listening on (wss?://127%.0%.0%.1:(%d+)/?.*)$", opts)
end

--- Resident memory of a running child, in KiB (nil once it has exited).
function examples.rss_kb(h)
  local f = io.open("/proc/" .. h:pid() .. "/status")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return tonumber(s:match("VmRSS:%s*(%d+)"))
end

return examples
