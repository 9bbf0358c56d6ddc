--- The loop as the rest of the Lua layer sees it: blocking calls from the
--- main chunk, the one sweep timer that drives heartbeats and close deadlines.
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

--- Things that need checking now and then (heartbeats, close deadlines):
--- one timer for all of them instead of a timer per connection. Each member
--- has a :_sweep(now) method; the timer runs only while there are members, so
--- an idle program's loop can end.
local members, count, timer = {}, 0, nil
local TICK = 0.25

local function sweep()
  local now = core.now()
  for m in pairs(members) do m:_sweep(now) end
end

---@param m {_sweep: fun(self: any, now: number)}
function runtime.watch(m)
  if members[m] then return end
  members[m] = true
  count = count + 1
  if not timer then timer = core.timer(TICK, sweep, TICK) end
end

---@param m table
function runtime.unwatch(m)
  if not members[m] then return end
  members[m] = nil
  count = count - 1
  if count == 0 then
    -- A Lua table keeps its peak size when emptied: start afresh so that
    -- memory returns to its idle level after a burst of connections.
    members = {}
    if timer then
      timer:cancel()
      timer = nil
    end
  end
end

return runtime
