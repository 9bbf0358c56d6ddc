-- Run a test body on the event loop, with a time limit.
local core = require "duplex.core"

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

return loop
