--- Several worker processes sharing a port (SO_REUSEPORT), supervised.
---
--- The parent forks opts.workers children; each runs opts.setup(index) —
--- which should call duplex.listen{ ..., reuseport = true } on a fixed port —
--- and then its own event loop, so every core serves connections. The parent
--- only supervises: a worker that dies is replaced; SIGTERM or SIGINT stops
--- every worker gracefully (each worker's own TERM handler, given as
--- opts.on_stop, typically calls server:shutdown(): 1001 to its clients,
--- what is queued on its listener still served), waiting up to
--- opts.stop_timeout seconds before SIGKILL; SIGHUP (also what a closing
--- terminal sends) reloads: a new set of workers starts, and after
--- opts.reload_grace seconds (1) the old ones are stopped the same graceful
--- way. Workers get SIGTERM when the supervisor dies, even by SIGKILL, and
--- ignore SIGHUP themselves: the supervisor decides.
---
--- Forks happen from the main thread between turns of the loop, never inside
--- a coroutine, so a child starts with a clean stack.
local core = require "duplex.core"

local workers = {}

local function log(opts, msg)
  (opts.log or function(_, m) io.stderr:write("duplex workers: ", m, "\n") end)("info", msg)
end

-- In a new worker: forget the supervisor's signal handlers and timer, set up
-- the server, run until stopped, exit (never return into the parent's code).
local function child_main(opts, index, keepalive)
  keepalive:cancel()
  for _, sig in ipairs { "CHLD", "TERM", "INT", "HUP" } do core.signal(sig, nil) end
  -- never outlive the supervisor (it died between fork and here: go now)
  if not core.die_with_parent("TERM") then os.exit(1, true) end
  core.signal("HUP", function() end)
  local ok, err = xpcall(function()
    local ctx = opts.setup(index)
    local function stop()
      if opts.on_stop then opts.on_stop(ctx, index) end
      core.stop()
    end
    core.signal("TERM", stop)
    core.signal("INT", stop)
    core.run()
  end, debug.traceback)
  if not ok then io.stderr:write("duplex worker ", index, ": ", tostring(err), "\n") end
  os.exit(ok and 0 or 1, true)
end

-- What duplex.run hands over: the supervisor's part of duplex.RunOptions.
---@class duplex.WorkersOptions
---@field workers integer
---@field setup fun(index: integer): any
---@field on_stop? fun(ctx: any, index: integer)
---@field stop_timeout? number
---@field reload_grace? number
---@field log? fun(level: string, message: string)

--- Run the supervisor; returns when every worker has stopped.
---@param opts duplex.WorkersOptions
---@return true
function workers.run(opts)
  if type(opts.setup) ~= "function" then error("run: workers need a setup function", 3) end
  local children, events, started, pending = {}, {}, {}, {}
  local retiring = {} -- pid -> deadline: an old generation, stopping
  local keepalive = core.timer(1, function() core.stop() end, 1)
  local function start(index)
    local pid, err = core.fork()
    if pid == 0 then child_main(opts, index, keepalive) end
    if not pid then
      log(opts, "fork failed: " .. tostring(err))
      return
    end
    children[pid] = index
    started[pid] = core.now()
  end
  local function retire(pids)
    local deadline = core.now() + (opts.stop_timeout or 10)
    for pid in pairs(pids) do
      core.kill(pid, "TERM")
      retiring[pid] = deadline
    end
  end
  core.signal("CHLD", function() events.chld = true; core.stop() end)
  core.signal("TERM", function() events.stop = true; core.stop() end)
  core.signal("INT", function() events.stop = true; core.stop() end)
  core.signal("HUP", function() events.reload = true; core.stop() end)
  for i = 1, opts.workers do start(i) end

  local stopping, old, old_at = false, nil, nil
  while true do
    core.run()
    -- reap every child that ended, whatever woke us
    while true do
      local pid, how, code = core.waitpid(-1, true)
      if not pid or pid <= 0 then break end
      local index, born = children[pid], started[pid]
      children[pid], started[pid], retiring[pid] = nil, nil, nil
      if old then old[pid] = nil end
      if index and not stopping then
        log(opts, string.format("worker %d (pid %d) %s %s: starting a new one", index, pid, how, tostring(code)))
        -- a worker that dies at once (bad setup) is restarted once a second,
        -- not in a tight fork loop
        pending[index] = core.now() - born < 1 and core.now() + 1 or 0
      end
    end
    for index, at in pairs(pending) do
      if not stopping and core.now() >= at then
        pending[index] = nil
        start(index)
      end
    end
    if events.reload and not stopping then
      -- the new generation first; the old one serves until it is up
      log(opts, "reload: starting " .. opts.workers .. " new workers")
      old = old or {}
      for pid in pairs(children) do
        old[pid] = true
        children[pid], started[pid] = nil, nil -- no longer replaced when it ends
      end
      for i = 1, opts.workers do start(i) end
      old_at = core.now() + (opts.reload_grace or 1)
    end
    if old and core.now() >= old_at then
      retire(old)
      old = nil
    end
    if events.stop and not stopping then
      stopping = true
      if old then retire(old); old = nil end
      retire(children)
    end
    events.chld, events.stop, events.reload = nil, nil, nil
    for pid, deadline in pairs(retiring) do
      if core.now() > deadline then core.kill(pid, "KILL") end
    end
    if stopping and next(retiring) == nil then break end
  end
  keepalive:cancel()
  for _, sig in ipairs { "CHLD", "TERM", "INT", "HUP" } do core.signal(sig, nil) end
  return true
end

return workers
