-- Worker processes sharing a port (SO_REUSEPORT) under a supervisor:
-- connections are served, a dead worker is replaced, SIGTERM stops all.
local duplex = require "duplex"
local core = require "duplex.core"
local proc = require "support.proc"

local function free_port()
  local l = assert(core.listen { host = "127.0.0.1", port = 0 })
  local _, port = l:address()
  l:close()
  return port
end

-- pid -> ppid of every process running echo.lua on this port
local function processes(port)
  local found = {}
  -- (without the ASan runtime that scripts/asan-env preloads: pgrep deadlocks under it)
  local p = io.popen("env -u LD_PRELOAD pgrep -f 'examples/echo.lua --port " .. port .. " ' || true")
  for pid in p:lines() do
    local c = io.open("/proc/" .. pid .. "/comm")
    local comm = c and c:read("l")
    if c then c:close() end
    local f = comm == "lua5.4" and io.open("/proc/" .. pid .. "/stat")
    if f then
      local stat = f:read("a")
      f:close()
      local state, ppid = stat:match("%) (%a) (%d+)")
      if state ~= "Z" then found[tonumber(pid)] = tonumber(ppid) end
    end
  end
  p:close()
  return found
end

local function workers_of(port)
  local all, parent, list = processes(port), nil, {}
  for pid, ppid in pairs(all) do
    if all[ppid] then list[#list + 1] = pid else parent = pid end
  end
  table.sort(list)
  return parent, list
end

local function echo_once(url)
  local ws, err = duplex.connect(url, { timeout = 5 })
  if not ws then return nil, err end
  ws:send("hi")
  local m = ws:receive(5)
  ws:close()
  return m
end

describe("workers", function()
  teardown(proc.killall)

  it("serve one port from several processes, replace a dead one, and stop on SIGTERM", function()
    local port = free_port()
    local h = proc.spawn { "lua5.4", "examples/echo.lua", "--port", tostring(port), "--workers", "2" }
    assert.matches("with 2 workers", assert(h:read_line(10)))
    local url = "ws://127.0.0.1:" .. port .. "/"
    local parent, list
    for _ = 1, 50 do
      parent, list = workers_of(port)
      if #list == 2 and echo_once(url) then break end
      proc.sleep(0.1)
    end
    assert.equal(2, #list)
    for _ = 1, 10 do assert.equal("hi", echo_once(url)) end

    -- a worker dies: the supervisor starts another one in its place
    local victim = list[1]
    core.kill(victim, "KILL")
    local replaced
    for _ = 1, 50 do
      local _, now = workers_of(port)
      if #now == 2 and now[1] ~= victim and now[2] ~= victim then replaced = now break end
      proc.sleep(0.1)
    end
    assert.is_truthy(replaced, "no replacement worker")
    for _ = 1, 10 do assert.equal("hi", echo_once(url)) end

    -- SIGTERM to the supervisor: open clients see 1001, everything exits
    local ws = assert(duplex.connect(url))
    core.kill(parent, "TERM")
    local _, _, code = ws:receive(5)
    assert.equal(1001, code)
    assert.equal(0, h:wait(10))
    assert.same({}, processes(port))
  end)
end)
