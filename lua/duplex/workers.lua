--- Several worker processes sharing a port (SO_REUSEPORT), supervised.
---
--- The parent forks opts.workers children; each runs opts.setup(index) —
--- which should call duplex.listen{ ..., reuseport = true } on a fixed port —
--- and then its own event loop, so every core serves connections. The parent
--- only supervises: a worker that dies is replaced, and SIGTERM or SIGINT
--- stops every worker gracefully (each worker's own TERM handler, given as
--- opts.on_stop, typically calls server:shutdown()), waiting up to
--- opts.stop_timeout seconds before SIGKILL.
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

--- Run the supervisor; returns when every worker has stopped.
---@param opts {workers: integer, setup: fun(index: integer): any, on_stop: function|nil, stop_timeout: number|nil, log: function|nil}
function workers.run(opts)
  if type(opts.setup) ~= "function" then error("run: workers need a setup function", 3) end
  local children, events, started, pending = {}, {}, {}, {}
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
  core.signal("CHLD", function() events.chld = true; core.stop() end)
  core.signal("TERM", function() events.stop = true; core.stop() end)
  core.signal("INT", function() events.stop = true; core.stop() end)
  for i = 1, opts.workers do start(i) end

  local stopping, deadline = false, nil
  while true do
    core.run()
    -- reap every child that ended, whatever woke us
    while true do
      local pid, how, code = core.waitpid(-1, true)
      if not pid or pid <= 0 then break end
      local index, born = children[pid], started[pid]
      children[pid], started[pid] = nil, nil
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
    if events.stop and not stopping then
      stopping = true
      deadline = core.now() + (opts.stop_timeout or 10)
      for pid in pairs(children) do core.kill(pid, "TERM") end
    end
    events.chld, events.stop = nil, nil
    if stopping then
      if next(children) == nil then break end
      if core.now() > deadline then
        for pid in pairs(children) do core.kill(pid, "KILL") end
      end
    end
  end
  keepalive:cancel()
  for _, sig in ipairs { "CHLD", "TERM", "INT" } do core.signal(sig, nil) end
  return true
end

return workers
