-- Where the bytes of an idle server connection go: runs the echo server of
-- examples/echo.lua in this process, lets bench/loadgen open N idle
-- connections to it, and compares the process before and after.
--
--   lua5.4 bench/idle_cost.lua [N = 10000] [--hold S] [--garbage] [--callbacks]
--
-- --callbacks serves the echo by on_message (no coroutine per connection)
-- instead of a handler.
--
-- Prints, per connection: VmRSS, the Lua heap (collectgarbage "count", after
-- a full collection: tables, strings, closures, coroutines and the
-- userdata of sockets, engines and tasks) and the rest (C malloc outside
-- Lua plus the allocator's overhead on everything); then what one
-- connection holds on the Lua side, counted field by field.
local BENCH = arg[0]:match("^(.*)/[^/]*$") or "."
local ROOT = BENCH .. "/.."
package.path = ROOT .. "/lua/?.lua;" .. ROOT .. "/lua/?/init.lua;" .. package.path
package.cpath = ROOT .. "/build/?.so;" .. package.cpath

local duplex = require "duplex"
local core = require "duplex.core"

local n, hold, garbage, with_callbacks = 10000, 30, false, false
local i = 1
while i <= #arg do
  if arg[i] == "--hold" then hold = tonumber(arg[i + 1]); i = i + 1
  elseif arg[i] == "--garbage" then garbage = true
  elseif arg[i] == "--callbacks" then with_callbacks = true
  else n = assert(math.tointeger(tonumber(arg[i])), "N expected") end
  i = i + 1
end

do
  local f = io.open(BENCH .. "/loadgen")
  if not f then
    io.stderr:write("idle_cost: " .. BENCH .. "/loadgen is not built: make -C bench loadgen\n")
    os.exit(2)
  end
  f:close()
end

local function rss_kb()
  local f = assert(io.open("/proc/self/status"))
  local s = f:read("a")
  f:close()
  return tonumber(s:match("VmRSS:%s*(%d+)"))
end

local function heap_kb()
  collectgarbage("collect")
  collectgarbage("collect")
  return collectgarbage("count")
end

local serve = with_callbacks and { on_message = function(ws, message, kind) ws:send(message, kind) end }
  or { handler = function(ws)
    for message, kind in ws:messages() do
      if not ws:send(message, kind) then break end
    end
  end }
serve.host, serve.port, serve.max_connections = "127.0.0.1", 0, n + 100
local server = assert(duplex.listen(serve))


-- Estimated sizes of Lua 5.4 objects (lobject.h, 64-bit): what the walk
-- below adds up. Tables: the hash part as the next power of two of the
-- keys it holds (a table built with more room than it uses is larger).
local function pow2(k) local p = 1; while p < k do p = p * 2 end; return k == 0 and 0 or p end
local function table_size(t)
  local arr, hash = 0, 0
  for k in pairs(t) do
    if math.type(k) == "integer" and k >= 1 and k <= #t then arr = arr + 1 else hash = hash + 1 end
  end
  return 56 + 16 * pow2(arr) + 24 * pow2(hash)
end

-- Everything reachable from roots, by identity (strings by value: short
-- ones are interned), with its estimated size and a label.
local function reach(roots, seen, labels, stop)
  local function visit(v, label)
    if stop and stop[v] then return end
    local tv = type(v)
    if tv == "number" or tv == "boolean" or tv == "nil" then return end
    if tv == "string" then
      if seen[v] then return end
      seen[v] = 24 + #v + 1
      labels[v] = label
      return
    end
    if seen[v] then return end
    if tv == "table" then
      seen[v] = table_size(v)
      labels[v] = label
      for k, x in pairs(v) do
        visit(k, label .. "[key]")
        visit(x, label .. "." .. tostring(k))
      end
      local mt = getmetatable(v)
      if mt then visit(mt, label .. "<mt>") end
    elseif tv == "function" then
      local nup = 0
      while debug.getupvalue(v, nup + 1) do nup = nup + 1 end
      seen[v] = 24 + 8 * math.max(nup, 1) + 40 * nup
      labels[v] = label
      for u = 1, nup do
        local name, x = debug.getupvalue(v, u)
        visit(x, label .. "^" .. name)
      end
    elseif tv == "userdata" then
      seen[v] = 0 -- sized apart (C structs)
      labels[v] = label
      local mt = getmetatable(v)
      if mt then visit(mt, label .. "<mt>") end
      for u = 1, 4 do
        local x, ok = debug.getuservalue(v, u)
        if not ok then break end
        visit(x, label .. "{uv" .. u .. "}")
      end
    elseif tv == "thread" then
      seen[v] = 0 -- sized apart (stack, CallInfo)
      labels[v] = label
      local level = 0
      while debug.getinfo(v, level, "f") do
        local info = debug.getinfo(v, level, "fn")
        visit(info.func, label .. "@" .. level .. ":" .. tostring(info.name))
        for li = 1, 250 do
          local name, x = debug.getlocal(v, level, li)
          if not name then break end
          visit(x, label .. "@" .. level .. ":" .. tostring(info.name) .. "." .. name)
        end
        for li = -1, -50, -1 do
          local name, x = debug.getlocal(v, level, li)
          if not name then break end
          visit(x, label .. "@" .. level .. "...")
        end
        level = level + 1
      end
    end
  end
  for label, v in pairs(roots) do visit(v, label) end
end

-- The coroutine of each connection: the loop's coroutine -> task table.
local function task_table()
  for _, v in pairs(debug.getregistry()) do
    if type(v) == "table" then
      local k = next(v)
      if type(k) == "thread" then return v end
    end
  end
end

local function thread_of(sock, tasks)
  for co in pairs(tasks) do
    if co == coroutine.running() then goto next end
    for level = 0, 20 do
      if not debug.getinfo(co, level, "f") then break end
      for li = 1, 50 do
        local name, x = debug.getlocal(co, level, li)
        if not name then break end
        if x == sock then return co end
      end
    end
    ::next::
  end
end

local function breakdown(a, b)
  local tasks = task_table()
  local shared_seen, shared_labels = {}, {}
  -- the server and everything global are shared; so is whatever another
  -- connection reaches too
  local stop = { [server] = true }
  for _, ws in ipairs(server:clients()) do stop[ws] = true end
  stop[a], stop[b] = nil, nil
  local stop_a = setmetatable({ [b] = true }, { __index = stop })
  local stop_b = setmetatable({ [a] = true }, { __index = stop })
  local global_stop = { [server] = true, [tasks] = true }
  for _, ws in ipairs(server:clients()) do global_stop[ws] = true end
  reach({ loaded = package.loaded, G = _G, reg = debug.getregistry() }, shared_seen, shared_labels,
    setmetatable(global_stop, { __index = function(_, v) return type(v) == "thread" end }))

  reach({ ws = b, co = thread_of(b.sock, tasks) }, shared_seen, shared_labels, stop_b)
  local seen, labels = {}, {}
  local co = thread_of(a.sock, tasks)
  reach({ ws = a, co = co }, seen, labels, stop_a)
  local rows, total = {}, 0
  for obj, size in pairs(seen) do
    if not shared_seen[obj] and size > 0 then
      rows[#rows + 1] = { labels[obj], size, type(obj) }
      total = total + size
    end
  end
  table.sort(rows, function(x, y) return x[2] > y[2] end)
  print(string.format("per-connection Lua objects found by walking (estimated sizes, without the allocator's 8-16 B " ..
    "each): %d objects, %d B", #rows, total))
  for _, r in ipairs(rows) do print(string.format("  %5d  %-8s %s", r[2], r[3], r[1])) end
  if not co then
    print("  coroutine: none (a callback connection waits in no coroutine)")
    return
  end
  local depth = 0
  while debug.getinfo(co, depth, "f") do depth = depth + 1 end
  print(string.format("  coroutine: %d frames deep (its stack and CallInfos are not in the sum)", depth))
  -- DUPLEX_STACK_PROBE: a C module returning a thread's stack size and
  -- CallInfo count (Lua's internals, so not part of duplex)
  local probe = os.getenv("DUPLEX_STACK_PROBE")
  if probe then
    local size, nci = package.loadlib(probe, "luaopen_lstk")()(co)
    print(string.format("  coroutine stack: %d slots (%d B), %d spare CallInfos", size, size * 16, nci))
  end
  for level = 0, depth - 1 do
    local info = debug.getinfo(co, level, "Sln")
    print(string.format("    %d %s %s:%s", level, tostring(info.name), info.short_src, tostring(info.currentline)))
  end
end

-- Keys of a table.
local function count_fields(t)
  local k = 0
  for _ in pairs(t) do k = k + 1 end
  return k
end

local function report(before_rss, before_heap)
  local rss, heap = rss_kb(), heap_kb()
  -- what one whole collection costs with them all open (every thread's
  -- stack is traversed again in the atomic phase)
  local t0 = os.clock()
  collectgarbage("collect")
  print(string.format("a full collection: %.1f ms of CPU", (os.clock() - t0) * 1e3))
  local conns = #server:clients()
  print(string.format("%d connections open", conns))
  local d_rss, d_heap = (rss - before_rss) * 1024 / conns, (heap - before_heap) * 1024 / conns
  print(string.format("  VmRSS      %7.0f B/conn", d_rss))
  print(string.format("  Lua heap   %7.0f B/conn", d_heap))
  print(string.format("  the rest   %7.0f B/conn (C malloc outside Lua, allocator overhead)", d_rss - d_heap))
  local ws = server:clients()[1]
  -- rawget: reading request.headers would make the table it is waiting as
  local req = ws.request or {}
  print(string.format("one connection: ws %d fields, ws.request %d, request.headers %s",
    count_fields(ws), count_fields(req), rawget(req, "headers") and count_fields(req.headers) or "not made"))
  local names = {}
  for k in pairs(ws) do names[#names + 1] = tostring(k) end
  table.sort(names)
  print("  ws fields: " .. table.concat(names, " "))
  local list = server:clients()
  breakdown(list[1], list[2])
  io.stdout:flush()
end

core.spawn(function()
  core.sleep(0.2)
  local before_rss, before_heap = rss_kb(), heap_kb()
  local port = select(2, server.listener:address())
  os.execute(string.format("%s/loadgen idle --url ws://127.0.0.1:%d/ --conns %d --hold %s --sources 4 " ..
    "--timeout 30 >/dev/null 2>&1 &", BENCH, port, n, hold))
  -- --garbage: the collector stopped while they open, so that what the
  -- handshakes leave behind (and the collector's pause lets pile up
  -- before it looks) shows apart from what stays
  if garbage then collectgarbage("stop") end
  local deadline = core.now() + 60
  while server.count < n and core.now() < deadline do core.sleep(0.1) end
  if garbage then
    local all = collectgarbage("count")
    local live = heap_kb()
    print(string.format("garbage left by opening them: %.0f B/conn (live %.0f B/conn)",
      (all - live) * 1024 / n, (live - before_heap) * 1024 / n))
    collectgarbage("restart")
  end
  core.sleep(1.5) -- past the quiet second: buffers shrunk
  report(before_rss, before_heap)
  server:shutdown(1)
  duplex.stop()
end)
duplex.run()
