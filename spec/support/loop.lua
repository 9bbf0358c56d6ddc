-- Run a test body on the event loop, with a time limit; or wait, with the
-- loop running, for something a child process or a peer does.
local core = require "duplex.core"
local runtime = require "duplex.runtime"

local loop = {}

-- Run fn in a loop coroutine; stop the loop when it returns (or after
-- `limit` seconds, default 20, which fails the test).
function loop.run(fn, limit)
  local done, err = false, nil
  core.spawn(function()
    local ok, e = xpcall(fn, debug.traceback)
    done, err = true, not ok and e or nil
    core.stop()
  end)
  local guard = core.timer(limit or 20, core.stop)
  core.run()
  guard:cancel()
  if err then error(err, 0) end
  assert(done, "the test did not finish in time")
end

-- Wait, with the loop running (in-process servers keep serving), until
-- pred() is true or timeout seconds pass; returns pred()'s last value.
function loop.wait_for(pred, timeout)
  return runtime.blocking(function()
    local deadline = core.now() + timeout
    while not pred() and core.now() < deadline do core.sleep(0.02) end
    return pred()
  end)
end

-- The same, failing the spec with what it waited for when time runs out.
function loop.wait_until(what, timeout, pred)
  runtime.blocking(function()
    local deadline = core.now() + timeout
    while not pred() do
      if core.now() > deadline then error("timed out waiting for " .. what, 0) end
      core.sleep(0.01)
    end
  end)
end

return loop
