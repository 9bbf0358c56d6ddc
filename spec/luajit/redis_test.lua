-- duplex.redis's client and duplex.resp as LuaJIT runs them inside nginx,
-- with no socket and no loop of duplex's: a Redis stand-in behind streams
-- of duplex.transport, and a host given to duplex.runtime.set_host that is
-- a toy scheduler of plain coroutines on a clock of its own (so a timeout
-- or a backoff costs no real time).
--   luajit spec/luajit/redis_test.lua
-- Prints "ok NAME" or "not ok NAME: why" per check, then "done PASSED/TOTAL";
-- spec/luajit_spec.lua runs it by luajit and by lua5.4 (where the same host
-- replaces duplex's loop). Written in Lua 5.1.
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/../../lua/?.lua;" .. package.path
package.cpath = os.getenv("DUPLEX_CORE_CPATH") or (here .. "/../../build/luajit/?.so")

local unpack = rawget(table, "unpack") or rawget(_G, "unpack")
local function pack(...) return { n = select("#", ...), ... } end

local passed, total = 0, 0
local function check(name, fn)
  total = total + 1
  local ok, err = pcall(fn)
  if ok then
    passed = passed + 1
    print("ok " .. name)
  else
    print("not ok " .. name .. ": " .. tostring(err):gsub("\n", " "))
  end
  io.stdout:flush()
end

local function eq(want, got, what)
  if want ~= got then
    error((what or "value") .. ": expected " .. tostring(want) .. ", got " .. tostring(got), 2)
  end
end

local resp, client, runtime

check("the modules load", function()
  resp = require "duplex.resp"
  client = require "duplex.redis.client"
  runtime = require "duplex.runtime"
  require "duplex.url"
  require "duplex.options"
end)

check("resp encodes commands and parses replies however they are cut", function()
  eq("*3\r\n$3\r\nSET\r\n$1\r\na\r\n$2\r\n10\r\n", resp.command("SET", "a", 10))
  local bytes = "*5\r\n+OK\r\n:-42\r\n$5\r\nhello\r\n$-1\r\n*2\r\n-ERR no\r\n*0\r\n"
  for cut = 1, #bytes do
    local p = resp.parser()
    p:feed(bytes:sub(1, cut))
    local v = p:next()
    if v == nil then
      p:feed(bytes:sub(cut + 1))
      v = p:next()
    end
    eq("OK", v[1], "cut " .. cut)
    eq(-42, v[2])
    eq("hello", v[3])
    eq(false, v[4])
    eq("ERR no", v[5][1].err)
    eq(0, #v[5][2])
  end
  local p = resp.parser()
  p:feed("$3.5\r\nabc\r\n")
  local v, err = p:next()
  eq(nil, v)
  eq(true, err:find("bad bulk length", 1, true) ~= nil, "error " .. tostring(err))
end)

-- ---- a Redis stand-in -------------------------------------------------------

local function bulk(s) return "$" .. #s .. "\r\n" .. s .. "\r\n" end
local function array(list)
  local out = { "*" .. #list .. "\r\n" }
  for _, item in ipairs(list) do out[#out + 1] = item end
  return table.concat(out)
end

local function glob(pattern)
  return "^" .. pattern:gsub("[%^%$%(%)%%%.%[%]%+%-%?]", "%%%0"):gsub("%*", ".*") .. "$"
end

local Server = {}
Server.__index = Server

local function new_server() return setmetatable({ conns = {}, data = {}, accepted = 0 }, Server) end

local Conn = {}
Conn.__index = Conn

-- A connection of the client's, as a stream: what it writes is answered at
-- once into what it reads next.
function Server:accept()
  if self.down then return nil, "connection refused" end
  self.accepted = self.accepted + 1
  local c = setmetatable({ server = self, parser = resp.parser(), inbox = {}, patterns = {} }, Conn)
  self.conns[c] = true
  return c
end

function Server:kill()
  for c in pairs(self.conns) do c:close() end
end

function Server:answer(c, cmd)
  local name = cmd[1]:upper()
  if self.hung then return nil end
  if name == "PING" then return "+PONG\r\n"
  elseif name == "SET" then self.data[cmd[2]] = cmd[3]; return "+OK\r\n"
  elseif name == "GET" then return self.data[cmd[2]] and bulk(self.data[cmd[2]]) or "$-1\r\n"
  elseif name == "PSUBSCRIBE" then
    c.patterns[cmd[2]] = true
    return array { bulk("psubscribe"), bulk(cmd[2]), ":1\r\n" }
  elseif name == "PUBLISH" then
    local n = 0
    for other in pairs(self.conns) do
      for p in pairs(other.patterns) do
        if cmd[2]:match(glob(p)) then
          n = n + 1
          other:push(array { bulk("pmessage"), bulk(p), bulk(cmd[2]), bulk(cmd[3]) })
        end
      end
    end
    return ":" .. n .. "\r\n"
  end
  return "-ERR unknown command '" .. cmd[1] .. "'\r\n"
end

function Conn:write(data)
  if self.closed then return nil, "closed", 0 end
  self.parser:feed(data)
  while true do
    local cmd = self.parser:next()
    if not cmd then break end
    local reply = self.server:answer(self, cmd)
    if reply then self:push(reply) end
  end
  return true
end

function Conn:push(bytes)
  self.inbox[#self.inbox + 1] = bytes
  if self.reader then runtime.wake(self.reader) end
end

function Conn:read(_, timeout)
  while #self.inbox == 0 do
    if self.closed then return nil, "closed" end
    self.reader = coroutine.running()
    local _, err = runtime.park(timeout)
    self.reader = nil
    if err == "timeout" and #self.inbox == 0 and not self.closed then return nil, "timeout" end
  end
  local data = table.concat(self.inbox)
  self.inbox = {}
  return data
end

function Conn:close()
  if self.closed then return end
  self.closed = true
  self.server.conns[self] = nil
  if self.reader then runtime.wake(self.reader) end
end

check("the client over a stream from one coroutine needs no host", function()
  local server = new_server()
  local db = assert(client.connect { stream = assert(server:accept()) })
  eq("OK", db:call("SET", "k", "v"))
  eq("v", db:call("GET", "k"))
  eq(false, db:call("GET", "none"))
  local v, err, kind = db:call("NOPE")
  eq(nil, v)
  eq("ERR unknown command 'NOPE'", err)
  eq("redis", kind)
  local r = db:pipeline { { "SET", "a", 1 }, { "GET", "a" }, { "NOPE" } }
  eq("OK", r[1])
  eq("1", r[2])
  eq("ERR unknown command 'NOPE'", r[3].err)
  eq(false, pcall(db.call, db, "GET", nil))
  db:close()
  eq("client closed", select(2, db:call("PING")))
end)

-- ---- a host of plain coroutines -------------------------------------------

local host = { clock = 0, ready = {}, parked = {} }

function host.spawn(fn, ...)
  local co = coroutine.create(fn)
  host.ready[#host.ready + 1] = { co, pack(...) }
  return co
end

function host.park(timeout)
  local co = coroutine.running()
  host.parked[co] = { deadline = timeout and host.clock + timeout }
  return coroutine.yield()
end

function host.wake(co, ...)
  if not host.parked[co] then return false end
  host.parked[co] = nil
  host.ready[#host.ready + 1] = { co, pack(...) }
  return true
end

function host.now() return host.clock end

-- Until done() (true), or nothing is left to run or to time out (false).
function host.run(done)
  while not done() do
    local item = table.remove(host.ready, 1)
    if not item then
      local co, best
      for c, p in pairs(host.parked) do
        if p.deadline and (not best or p.deadline < best) then co, best = c, p.deadline end
      end
      if not co then return false end
      host.clock = best
      host.parked[co] = nil
      item = { co, pack(nil, "timeout") }
    end
    local ok, err = coroutine.resume(item[1], unpack(item[2], 1, item[2].n))
    if not ok then error(err, 0) end
  end
  return true
end

-- fn in a coroutine of the host, run to its end.
local function within(fn)
  local finished, failure = false, nil
  host.spawn(function()
    local ok, err = pcall(fn)
    finished, failure = true, not ok and err or nil
  end)
  if not host.run(function() return finished end) then error("stuck: nothing left to run", 2) end
  if failure then error(failure, 0) end
end

-- Inside within: the host's clock goes on while pred() is false.
local function until_true(what, pred)
  local deadline = host.clock + 60
  while not pred() do
    if host.clock > deadline then error("stuck waiting for " .. what, 2) end
    host.park(0.01)
  end
end

check("runtime.set_host checks the host and dispatches to it", function()
  eq(false, pcall(runtime.set_host, { spawn = host.spawn }))
  runtime.set_host(host)
  local co = runtime.spawn(function() end)
  eq("thread", type(co))
  eq(false, runtime.wake(co), "waking a coroutine that is not parked")
  eq(host.clock, runtime.now())
end)

check("through the host: coroutines pipelining, pub/sub, timeouts, reconnecting", function()
  local server = new_server()
  local status, state = {}, {}
  within(function()
    local db = assert(client.connect { url = "redis://127.0.0.1:1", connect = function() return server:accept() end,
      on_status = function(s, detail)
        status[#status + 1] = s .. " " .. detail
        state[detail:match("^%a+")] = s
      end })
    db:call("SET", "x", "1")

    -- two coroutines at once: one reads for both
    local got = {}
    for i = 1, 2 do host.spawn(function() got[i] = db:call("GET", "x") end) end
    until_true("both replies", function() return got[1] and got[2] end)
    eq("1", got[1])
    eq("1", got[2])

    local heard = {}
    assert(db:psubscribe("room:*", function(channel, message, pattern)
      heard[#heard + 1] = channel .. "|" .. message .. "|" .. pattern
    end))
    eq(1, db:publish("room:a", "hi"))
    until_true("the message", function() return #heard == 1 end)
    eq("room:a|hi|room:*", heard[1])

    -- a server that stops answering: the command times out on the host's clock
    server.hung = true
    local t0 = host.clock
    local v, err, kind = db:call("GET", "x")
    eq(nil, v)
    eq("timeout", err)
    eq("connection", kind)
    eq(true, host.clock - t0 >= 5, "timed out after " .. (host.clock - t0) .. " s")
    server.hung = false

    -- Redis goes away and comes back: both connections are made again,
    -- with the subscription
    server.down = true
    server:kill()
    eq("not connected", select(2, db:call("GET", "x")))
    t0 = host.clock
    until_true("a few redials", function() return host.clock - t0 > 2 end)
    server.down = false
    until_true("the subscriber back", function() return state.subscriber == "up" end)
    until_true("the commands back", function() return db:call("GET", "x") == "1" end)
    eq(1, db:publish("room:b", "again"))
    until_true("the message after the outage", function() return #heard == 2 end)
    eq("room:b|again|room:*", heard[2])
    db:close()
  end)
  local saw_down = false
  for _, s in ipairs(status) do saw_down = saw_down or s:find("^down subscriber") ~= nil end
  eq(true, saw_down, "on_status: " .. table.concat(status, ", "))
end)

print(("done %d/%d"):format(passed, total))
os.exit(passed == total and 0 or 1)
