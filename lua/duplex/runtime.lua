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

--- The connections' clocks (heartbeats, close deadlines): a timer wheel.
--- Each member sits in the slot of its next due time and is looked at only
--- when that slot comes, so an idle connection costs one look per ping
--- interval, not one per tick; one loop timer ticks while anything is
--- scheduled, so an idle program's loop can end. A slot is a list threaded
--- through its members (fields _slot, _next, _prev, false when unused):
--- scheduling allocates nothing, so thousands of connections rescheduled
--- at once leave no garbage behind. A member also has :_on_due(now).
local TICK = 0.25
local slots, scheduled, last, ticker = {}, 0, nil, nil

local function unlink(m)
  local prev, nxt = m._prev, m._next
  if prev then prev._next = nxt else slots[m._slot] = nxt or nil end
  if nxt then nxt._prev = prev end
  m._slot, m._next, m._prev = false, false, false
  scheduled = scheduled - 1
end

local function tick()
  local t = core.now()
  local now_slot = math.floor(t / TICK)
  while last < now_slot do
    last = last + 1
    -- one at a time from the head: a member's _on_due may reschedule or
    -- unschedule others of the same slot
    local m = slots[last]
    while m do
      unlink(m)
      m:_on_due(t)
      m = slots[last]
    end
  end
  if scheduled == 0 and ticker then
    ticker:cancel()
    ticker = nil
  end
end

--- Schedule m for time due (core.now() seconds), or unschedule it (nil).
---@param m {_slot: integer|false, _next: table|false, _prev: table|false, _on_due: fun(self: any, now: number)}
---@param due number|nil
function runtime.schedule(m, due)
  local slot = false
  if due then
    if not ticker then
      last = math.floor(core.now() / TICK)
      ticker = core.timer(TICK, tick, TICK)
    end
    slot = math.max(math.ceil(due / TICK), last + 1) -- already due: the next tick
  end
  if m._slot == slot then return end
  if m._slot then unlink(m) end
  if not slot then return end
  local head = slots[slot]
  m._slot, m._next, m._prev = slot, head or false, false
  if head then head._prev = m end
  slots[slot] = m
  scheduled = scheduled + 1
end

--- Whether m is unscheduled or due after time t: what a member asks before
--- moving its time earlier (scheduling reads the slot, never the clock).
---@param m {_slot: integer|false}
---@param t number
---@return boolean
function runtime.due_after(m, t)
  local slot = m._slot
  return not slot or slot > t / TICK
end

return runtime
