-- Connections and servers a spec file opens, closed after each test (and
-- the servers after the file): an open connection keeps the loop's heartbeat
-- timer armed, and every later core.run() in this busted process would then
-- wait forever.
--
--   local connect, listen = require("support.tracked").install(after_each, teardown)
-- (busted's hooks live in the spec file's environment, so they are passed in)
local duplex = require "duplex"

local tracked = {}

-- Call at the top level of a spec file: registers the busted hooks.
function tracked.install(after_each, teardown)
  local open_ws, open_servers = {}, {}
  local function connect(url, opts)
    local ws, err, res = duplex.connect(url, opts)
    if ws then open_ws[#open_ws + 1] = ws end
    return ws, err, res
  end
  local function listen(opts)
    local srv = assert(duplex.listen(opts))
    open_servers[#open_servers + 1] = srv
    return srv
  end
  after_each(function()
    for _, ws in ipairs(open_ws) do ws:abort("test over") end
    open_ws = {}
  end)
  teardown(function()
    for _, srv in ipairs(open_servers) do srv:shutdown(0.5) end
    open_servers = {}
  end)
  return connect, listen
end

return tracked
