--- The loop as the rest of the Lua layer sees it: blocking calls from the
--- main chunk, the timer wheel that keeps the connections' clocks, and where
--- the errors nobody can receive go.
local core = require "duplex.core"

local runtime = {}

--- Where errors go that no caller can receive: a spawned coroutine's or a
--- timer's, and a server's failed handlers unless its `log` option says
--- otherwise. function(level, message); duplex.set_log replaces it.
local function stderr_log(level, message)
  io.stderr:write(string.format("duplex %s: %s\n", level, message))
end
local log_hook = stderr_log

---@param level string
---@param message string
function runtime.log(level, message) log_hook(level, message) end

---@param fn fun(level: string, message: string)|nil nil restores the default (stderr)
function runtime.set_log(fn)
  if fn ~= nil and type(fn) ~= "function" then error("set_log: a function or nil expected", 2) end
  log_hook = fn or stderr_log
end

-- The loop's own coroutines (duplex.spawn, timers, signal handlers) have no
-- caller to raise to; LuaJIT's core has no loop.
if core.on_error then
  core.on_error(function(_, traceback) runtime.log("error", "error in a coroutine: " .. traceback) end)
end

-- The host seam: how code that waits on more than one host (duplex.redis's
-- client) spawns, parks and wakes coroutines and reads the clock. duplex's
-- own loop by default; LuaJIT's core has none, so there the host must be
-- given (duplex.nginx gives nginx's light threads and semaphores). The
-- functions below stay the same whichever host is set, so a module may keep
-- them in locals before the host is known.
local function no_loop(name)
  return function()
    error("duplex.runtime: no event loop for " .. name .. " (LuaJIT's core has none): "
      .. "runtime.set_host, or require duplex.nginx inside nginx", 2)
  end
end

local function loop_host()
  return {
    spawn = core.spawn or no_loop("spawn"),
    park = core.park or no_loop("park"),
    wake = core.wake or no_loop("wake"),
    now = core.now,
  }
end

local host = loop_host()

--- Replace the host: { spawn = fn(f, ...) -> co (f starts later, not inside
--- spawn), park = fn(timeout|nil) -> values given to wake | nil, "timeout",
--- wake = fn(co, ...) -> true if co was parked (else false, and nothing
--- happens), now = fn() -> seconds of a monotonic clock }. nil restores
--- duplex's loop.
---@param h {spawn: function, park: function, wake: function, now: function}|nil
function runtime.set_host(h)
  if h == nil then host = loop_host(); return end
  for _, k in ipairs { "spawn", "park", "wake", "now" } do
    if type(h) ~= "table" or type(h[k]) ~= "function" then
      error("set_host: a table with functions spawn, park, wake and now expected", 2)
    end
  end
  host = { spawn = h.spawn, park = h.park, wake = h.wake, now = h.now }
end

---@return any co
function runtime.spawn(...) return host.spawn(...) end
---@return any ...
function runtime.park(...) return host.park(...) end
---@return boolean
function runtime.wake(...) return host.wake(...) end
---@return number
function runtime.now() return host.now() end

--- Run fn(...) where it may block. Inside a loop coroutine it is a plain call;
--- from the main chunk the loop runs until fn is done, so a script can call
--- duplex.connect and ws:receive straight down without spawning anything.
---@param fn function
---@return any ...
function runtime.blocking(fn, ...)
  local _, main = coroutine.running()
  if not main then return fn(...) end
  local result
  core.spawn(function(...)
    result = table.pack(xpcall(fn, debug.traceback, ...))
    core.stop()
  end, ...)
  core.run()
  if not result then error("the event loop stopped before the call finished", 2) end
  if not result[1] then error(result[2], 0) end
  return table.unpack(result, 2, result.n)
end

return runtime
