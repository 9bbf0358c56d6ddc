-- Thousands of concurrent connections opened, used and closed in one
-- process (server and clients both): afterwards file descriptors, loop
-- objects and Lua memory are back where they started.
local duplex = require "duplex"
local core = require "duplex.core"
local run = require("duplex.runtime").blocking

local N = tonumber(os.getenv("DUPLEX_SOAK_CONNECTIONS")) or 5000

-- The descriptors the library opens (sockets, epoll, timers: anon inodes),
-- not every entry: popen's own pipe is there twice until the shell has
-- started, a race that made "descriptors leaked" of a listing's timing.
local function open_fds()
  local n = 0
  local p = io.popen("ls -l /proc/" .. core.getpid() .. "/fd")
  for line in p:lines() do
    if line:find("-> socket:", 1, true) or line:find("-> anon_inode:", 1, true) then n = n + 1 end
  end
  p:close()
  return n
end

local function lua_kb()
  collectgarbage("collect")
  collectgarbage("collect")
  return collectgarbage("count")
end

describe("soak", function()
  it(N .. " concurrent connections leave no descriptor, coroutine or memory behind", function()
    -- warm up once so that lazily created state (the loop, module tables,
    -- the TLS-free client path) exists before the baseline is taken
    local srv = assert(duplex.listen { host = "127.0.0.1", port = 0, max_connections = N + 10,
      handler = function(ws) for m, k in ws:messages() do ws:send(m, k) end end })
    local url = srv:url("/")
    assert(duplex.connect(url)):close()
    run(core.sleep, 0.2)

    local fds0, stats0, mem0 = open_fds(), core.loop_stats(), lua_kb()

    local opened, echoed, closed = 0, 0, 0
    local peak_fds
    run(function()
      local clients = {}
      local workers, per = 50, N // 50
      local done = 0
      for w = 1, workers do
        core.spawn(function()
          for i = 1, per do
            local ws, err = duplex.connect(url, { timeout = 30 })
            assert(ws, err)
            clients[(w - 1) * per + i] = ws
            opened = opened + 1
          end
          done = done + 1
        end)
      end
      while done < workers do core.sleep(0.05) end
      peak_fds = open_fds()
      done = 0
      for w = 1, workers do
        core.spawn(function()
          for i = 1, per do
            local ws = clients[(w - 1) * per + i]
            ws:send("ping " .. i)
            if ws:receive(30) == "ping " .. i then echoed = echoed + 1 end
            ws:close()
            if ws.close_code == 1000 then closed = closed + 1 end
          end
          done = done + 1
        end)
      end
      while done < workers do core.sleep(0.05) end
      core.sleep(0.3) -- let the server side finish its closing handshakes
    end)
    assert.equal(N, opened)
    assert.equal(N, echoed)
    assert.equal(N, closed)
    -- both ends of every connection were open at once
    assert.is_true(peak_fds >= 2 * N, string.format("only %d descriptors open at the peak", peak_fds))

    -- (earlier specs' sockets may still be closing: never more than before)
    assert.is_true(open_fds() <= fds0, "descriptors leaked")
    local stats = core.loop_stats()
    assert.equal(stats0.sockets, stats.sockets)
    assert.equal(stats0.fds, stats.fds)
    assert.is_true(stats.coroutines <= stats0.coroutines, "coroutines left: " .. stats.coroutines)
    local grown = lua_kb() - mem0
    assert.is_true(grown < 512, string.format("Lua memory grew by %.0f KiB", grown))
    srv:shutdown(1)
  end)
end)
