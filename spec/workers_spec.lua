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

-- "hi" echoed over a new connection, or nil, why, and the close code
local function echo_once(url)
  local ws, err = duplex.connect(url, { timeout = 5 })
  if not ws then return nil, err end
  ws:send("hi")
  local m, rerr, code = ws:receive(5)
  ws:close()
  return m, rerr, code
end

describe("workers", function()
  teardown(proc.killall)

  -- Starts echo.lua with 2 workers on a free port; returns handle, url, port,
  -- supervisor pid and worker pids once all serve.
  local function start_workers(through_shell)
    local port = free_port()
    local argv = { "lua5.4", "examples/echo.lua", "--port", tostring(port), "--workers", "2" }
    -- through a shell that exits 0 whatever happens to the supervisor: the
    -- spec's process wrapper then leaves its process group alone
    if through_shell then argv = { "sh", "-c", table.concat(argv, " ") .. "; exit 0" } end
    local h = proc.spawn(argv)
    assert.matches("with 2 workers", assert(h:read_line(10)))
    local url = "ws://127.0.0.1:" .. port .. "/"
    local parent, list
    for _ = 1, 50 do
      parent, list = workers_of(port)
      if #list == 2 and echo_once(url) then break end
      proc.sleep(0.1)
    end
    assert.equal(2, #list)
    return h, url, port, parent, list
  end

  it("serve one port from several processes, replace a dead one, and stop on SIGTERM", function()
    local h, url, port, parent, list = start_workers()
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
  it("reload on SIGHUP: new workers take over, the old ones stop, no connection is refused", function()
    local h, url, port, parent, old = start_workers()
    local tried, failed, reloaded, fresh, went_away = 0, {}, false, nil, 0
    require("duplex.runtime").blocking(function()
      local deadline = core.now() + 20
      core.kill(parent, "HUP")
      -- clients keep coming all through the reload. One that an old worker
      -- had accepted just before it was told to stop is closed with 1001
      -- (going away), as a graceful stop must: it reconnects, as a client
      -- does, and gets a new worker. Refused, reset or unanswered: failed.
      while core.now() < deadline do
        tried = tried + 1
        local m, err, code = echo_once(url)
        if m ~= "hi" and code == 1001 then
          went_away = went_away + 1
          m, err, code = echo_once(url)
        end
        if m ~= "hi" then failed[#failed + 1] = tostring(err) .. " " .. tostring(code) end
        local p, now = workers_of(port)
        if #now == 2 and now[1] ~= old[1] and now[1] ~= old[2] and now[2] ~= old[1] and now[2] ~= old[2] then
          if not fresh then fresh = core.now() end
          -- a moment more with the new generation only
          if core.now() - fresh > 0.5 then reloaded = p == parent break end
        end
      end
    end)
    assert.is_true(reloaded, "the workers were not replaced under the same supervisor")
    assert.same({}, failed)
    assert.is_true(tried > 20, "only " .. tried .. " connections tried")
    assert.is_true(went_away <= 2, went_away .. " clients closed with 1001: more than the old workers had open")
    core.kill(parent, "TERM")
    assert.equal(0, h:wait(10))
  end)

  it("never outlive their supervisor, even when it is killed with SIGKILL", function()
    local h, _, port, parent = start_workers(true)
    core.kill(parent, "KILL")
    h:wait(5)
    local left
    for _ = 1, 50 do
      left = processes(port)
      if next(left) == nil then break end
      proc.sleep(0.1)
    end
    assert.same({}, left)
  end)
end)
