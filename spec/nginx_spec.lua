-- duplex inside nginx with lua-nginx-module (LuaJIT): the real nginx runs
-- examples/nginx/nginx.conf (only the checkout path, the port and the
-- chat's Redis substituted), with duplex.core built for LuaJIT (make
-- luajit), and a real redis-server. Our client, python3-websockets, node's
-- ws and headless Chromium connect to it.
local duplex = require "duplex"
local core = require "duplex.core"
local runtime = require "duplex.runtime"
local proc = require "support.proc"
local peers = require "support.peers"
local services = require "support.services"
local resp = require "duplex.resp"

local root = peers.root
local LUA_MODULE = "/usr/lib/nginx/modules/ngx_http_lua_module.so"

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

local function start_nginx(redis_url)
  assert(exists(LUA_MODULE), "lua-nginx-module is not installed: run `scripts/deps check` "
    .. "(it installs libnginx-mod-http-lua)")
  assert(exists(root .. "/build/luajit/duplex/core.so"), "no LuaJIT build of duplex.core: run `make luajit`")
  local port = services.free_port()
  local conf = services.render(root .. "/examples/nginx/nginx.conf", {
    { "/opt/duplex", root }, { "127.0.0.1:8090", "127.0.0.1:" .. port },
    { "redis://127.0.0.1:6379", redis_url },
  })
  -- nginx started as root runs its workers as nobody, who may not be
  -- allowed into the checkout (CI's may live under /root).
  local _, uid = proc.run({ "id", "-u" })
  if uid:match("^0%s") then
    conf = "user root;\n" .. conf
  end
  local n = services.nginx(conf, port)
  n.port = port
  n.base = "127.0.0.1:" .. port
  return n
end

-- One command on a connection of its own: the reply.
local function redis_call(port, ...)
  local args = table.pack(...)
  return runtime.blocking(function()
    local sock = assert(core.connect { host = "127.0.0.1", port = port, timeout = 2 })
    sock:write(resp.command(table.unpack(args, 1, args.n)))
    local p = resp.parser()
    while true do
      local v, err = p:next()
      assert(err == nil, err)
      if v ~= nil then sock:close(); return v end
      p:feed(assert(sock:read(nil, 2)))
    end
  end)
end

-- Until n connections of Redis's are subscribed to a pattern (the chat's
-- workers, one each), so that no line is said before they listen.
local function wait_subscribers(redis, n)
  local count
  local ok = pcall(services.wait_for, n .. " pattern subscribers", 15, function()
    local list = redis_call(redis.port, "CLIENT", "LIST")
    count = select(2, list:gsub("psub=1 ", ""))
    return count == n
  end)
  assert(ok, "Redis has " .. tostring(count) .. " pattern subscribers, not " .. n)
end

-- curl's status code and body for a request to nginx.
local function curl(args)
  local argv = { "curl", "-s", "-m", "10", "-w", "\n%{http_code}" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local code, out = proc.run(argv, { timeout = 20, env = peers.env })
  assert.equal(0, code, "curl failed: " .. out)
  local body, status = out:match("^(.*)\n(%d+)$")
  return tonumber(status), body
end

-- Lines from a chat connection until one matches pattern (or 10 s pass).
local function expect_line(ws, pattern)
  local seen = {}
  local deadline = core.now() + 10
  while core.now() < deadline do
    local line, err = ws:receive(math.max(0.01, deadline - core.now()))
    if not line then break end
    if line:find(pattern) then return line end
    seen[#seen + 1] = line
    if err == "closed" then break end
  end
  error("no line matching " .. pattern .. " in: " .. table.concat(seen, " | "), 2)
end

-- A chat member: its connection, and the worker that serves it (the hello
-- line names it).
local function member(base, nick, room)
  local ws = assert(duplex.connect("ws://" .. base .. "/ws?room=" .. room .. "&nick=" .. nick))
  local hello = expect_line(ws, "^%* you are " .. nick .. " in #" .. room)
  return ws, tonumber(hello:match("nginx worker (%d+)%)$"))
end

-- One member on each of nginx's two workers: connections until both have
-- one (which worker accepts is the kernel's choice), the others closed.
local function one_per_worker(base, room)
  local by_worker, extra = {}, {}
  for i = 1, 40 do
    local ws, worker = member(base, "m" .. i, room)
    if by_worker[worker] then extra[#extra + 1] = ws else by_worker[worker] = { ws = ws, nick = "m" .. i } end
    if by_worker[0] and by_worker[1] then break end
  end
  for _, ws in ipairs(extra) do ws:close() end
  assert(by_worker[0] and by_worker[1], "40 connections, and all on one worker")
  return by_worker[0], by_worker[1]
end

-- Nothing in nginx's log that tells of a bug the clients did not notice.
local function assert_clean_log(log)
  assert.falsy(log:find("handler failed", 1, true), log)
  assert.falsy(log:find("[alert]", 1, true), log)
  assert.falsy(log:find("thread aborted", 1, true), log)
  assert.falsy(log:find("error in a light thread", 1, true), log)
end

describe("duplex in nginx (lua-nginx-module)", function()
  local ngx_server, redis

  setup(function()
    redis = services.redis()
    ngx_server = start_nginx(redis.url)
    wait_subscribers(redis, 2)
  end)
  teardown(function()
    if ngx_server then
      local log = ngx_server:log()
      ngx_server:stop()
      assert_clean_log(log)
    end
    proc.killall()
  end)

  it("echoes text, binary and fragments with permessage-deflate, pings and closes (our client)", function()
    local ws = assert(duplex.connect("ws://" .. ngx_server.base .. "/echo", { deflate = true }))
    assert.matches("^permessage%-deflate", ws.extensions)
    assert.truthy(ws.extensions:find("server_no_context_takeover", 1, true))
    local text = ("grüße, nginx! "):rep(100)
    assert(ws:send(text))
    assert.same({ text, "text" }, { ws:receive(5) })
    local blob = core.random(60000):rep(5)
    assert(ws:send(blob, "binary"))
    assert.same({ blob, "binary" }, { ws:receive(5) })
    assert(ws:send_fragment("one ", "text", false))
    assert(ws:send_fragment("two ", "text", false))
    assert(ws:send_fragment("three", "text", true))
    assert.same({ "one two three", "text" }, { ws:receive(5) })
    assert(ws:ping("are you there"))
    assert.same({ nil, "timeout" }, { ws:receive(0.3) })
    assert.is_number(ws.latency)
    assert.is_true(ws:close(1000, "done"))
    assert.equal(1000, ws.close_code)
  end)

  it("talks to python3-websockets and node's ws, with permessage-deflate", function()
    local url = "ws://" .. ngx_server.base .. "/echo"
    local code, res = peers.py_client(url, { deflate = true, count = 20, size = 5000, fragment = true })
    assert.equal(0, code, res.error or res.stderr)
    assert.is_true(res.ok)
    assert.equal(20, res.received)
    assert.matches("permessage%-deflate", res.extensions)
    code, res = peers.node_client(url, { deflate = true, count = 20, size = 70000 })
    assert.equal(0, code, res.error or res.stderr)
    assert.is_true(res.ok)
    assert.matches("permessage%-deflate", res.extensions)
  end)

  it("refuses what is not a WebSocket upgrade, through duplex's own checks", function()
    local status = curl { "http://" .. ngx_server.base .. "/echo" }
    assert.equal(426, status)
    status = curl { "-H", "Upgrade: websocket", "-H", "Connection: Upgrade", "-H", "Sec-WebSocket-Version: 13",
      "http://" .. ngx_server.base .. "/echo" } -- no Sec-WebSocket-Key
    assert.equal(400, status)
  end)

  it("keeps a heartbeat and drops a client that stops answering pings", function()
    runtime.blocking(function()
      local sock = assert(core.connect { host = "127.0.0.1", port = ngx_server.port, timeout = 5 })
      sock:write("GET /echo?ping=0.3 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        .. "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
      local got, t0 = "", core.now()
      while true do
        local data = sock:read(nil, 5)
        if not data then break end
        got = got .. data
      end
      assert.matches("^HTTP/1%.1 101", got)
      assert.truthy(got:find("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", 1, true))
      -- the server pinged (0x89) at least once, then gave up on us
      assert.truthy(got:find("\137", 1, true), "no ping frame")
      assert.is_true(core.now() - t0 < 4.5, "the silent client was not dropped")
      sock:close()
    end)
  end)

  it("drops a client that does not read while others go on", function()
    runtime.blocking(function()
      local slow = assert(duplex.connect("ws://" .. ngx_server.base .. "/echo", { send_timeout = 20 }))
      local blob = core.random(65536)
      local stopped, longest = false, 0
      core.spawn(function()
        for _ = 1, 1000 do
          local t = core.now()
          if not slow:send(blob, "binary") then break end
          longest = math.max(longest, core.now() - t)
        end
        stopped = true
      end)
      core.sleep(1)
      -- the worker serving the stalled connection serves others meanwhile
      local other = assert(duplex.connect("ws://" .. ngx_server.base .. "/echo"))
      assert(other:send("still served"))
      assert.same({ "still served", "text" }, { other:receive(5) })
      other:close()
      local deadline = core.now() + 30
      while not stopped and core.now() < deadline do core.sleep(0.1) end
      assert.is_true(stopped, "the sender never finished")
      -- nginx's send stalled for its send_timeout (5 s), then duplex gave
      -- up on us; what nginx had already echoed is still ours to read
      assert.is_true(longest > 3, "no send ever stalled: the client was not slow")
      local m, err, code
      repeat m, err, code = slow:receive(10) until m == nil
      assert.equal("closed", err)
      assert.truthy(code == 1008 or code == 1006, "close code " .. tostring(code))
    end)
  end)

  it("runs the chat: a member that vanishes leaves its room, and server pushes arrive", function()
    local url = "ws://" .. ngx_server.base .. "/ws?room=ngx&nick="
    local ann = assert(duplex.connect(url .. "ann", { deflate = true }))
    expect_line(ann, "^%* you are ann in #ngx")
    local ben = assert(duplex.connect(url .. "ben"))
    expect_line(ann, "^%* ben joined #ngx$")
    assert(ben:send("hello ann"))
    expect_line(ann, "^ben: hello ann$")
    -- ben's machine drops off the network: no close frame, no goodbye
    ben:abort("vanished")
    expect_line(ann, "^%* ben left #ngx$")
    -- a push from outside any WebSocket request (another nginx request,
    -- delivered through Redis and ann's own request)
    local status, body = curl { "-d", "maintenance at noon", "http://" .. ngx_server.base .. "/push?room=ngx" }
    assert.equal(200, status, body)
    expect_line(ann, "^%* server: maintenance at noon$")
    assert.equal(400, (curl { "http://" .. ngx_server.base .. "/push?room=ngx" }))
    assert.is_true(ann:close())
  end)

  it("runs the chat across workers: members of one room on different workers talk", function()
    local a, b = one_per_worker(ngx_server.base, "workers")
    assert(a.ws:send("hello from worker 0"))
    expect_line(b.ws, "^" .. a.nick .. ": hello from worker 0$")
    assert(b.ws:send("hello from worker 1"))
    expect_line(a.ws, "^" .. b.nick .. ": hello from worker 1$")
    -- a room is its members' only: another room's line does not come
    local c = member(ngx_server.base, "cat", "elsewhere")
    assert(c:send("not for #workers"))
    assert(a.ws:send("after cat"))
    expect_line(b.ws, "^" .. a.nick .. ": after cat$")
    b.ws:close()
    expect_line(a.ws, "^%* " .. b.nick .. " left #workers$")
    a.ws:close()
    c:close()
  end)

  it("runs the chat across two nginx sharing one Redis, /push reaching every worker of both", function()
    local other = start_nginx(redis.url)
    local ok, err = pcall(function()
      wait_subscribers(redis, 4)
      local a, b = one_per_worker(ngx_server.base, "machines")
      local c = member(other.base, "carol", "machines")
      expect_line(a.ws, "^%* carol joined #machines$")
      expect_line(b.ws, "^%* carol joined #machines$")
      assert(c:send("hello from the other machine"))
      expect_line(a.ws, "^carol: hello from the other machine$")
      expect_line(b.ws, "^carol: hello from the other machine$")
      assert(a.ws:send("and back"))
      expect_line(c, "^" .. a.nick .. ": and back$")
      for i, base in ipairs { ngx_server.base, other.base } do
        local status, body = curl { "-d", "push " .. i, "http://" .. base .. "/push?room=machines" }
        assert.equal(200, status, body)
        for _, ws in ipairs { a.ws, b.ws, c } do expect_line(ws, "^%* server: push " .. i .. "$") end
      end
      for _, ws in ipairs { a.ws, b.ws, c } do ws:close() end
    end)
    local log = other:log()
    other:stop()
    assert(ok, err)
    assert_clean_log(log)
  end)

  it("quits gracefully at once: each worker's timer closes its Redis connections as it exits", function()
    local other = start_nginx(redis.url)
    wait_subscribers(redis, 4)
    local log
    local ok, err = pcall(function()
      local t0 = proc.now()
      other.h:kill("QUIT")
      services.wait_for("nginx to quit", 10, function() return not other.h:running() end)
      log = other:log()
      -- the subscriber's read is not left waiting for its PING (5 s)
      assert.is_true(proc.now() - t0 < 4, "nginx took " .. (proc.now() - t0) .. " s to quit")
      wait_subscribers(redis, 2)
    end)
    log = log or other:log()
    other:stop()
    assert(ok, tostring(err) .. "\n" .. log)
    assert_clean_log(log)
  end)

  it("runs the chat again once a lost Redis is back, without restarting nginx", function()
    local a, b = one_per_worker(ngx_server.base, "outage")
    redis:stop("KILL")
    -- what a says meanwhile waits for Redis in its worker's queue: it comes
    -- back to a once Redis is back (b's worker may hear the rooms again later)
    assert(a.ws:send("said while Redis was away"))
    -- long enough for both connections of each worker to notice and redial
    proc.sleep(1)
    redis:start()
    expect_line(a.ws, "^" .. a.nick .. ": said while Redis was away$")
    wait_subscribers(redis, 2)
    -- a line said as the commands connection is dialed again waits for it
    local deadline = core.now() + 15
    local got
    for i = 1, math.huge do
      assert(a.ws:send("back " .. i))
      got = b.ws:receive(0.5)
      if got and got:find("^" .. a.nick .. ": back %d+$") then break end
      assert(core.now() < deadline, "no line across workers after Redis came back")
    end
    assert(b.ws:send("welcome back"))
    expect_line(a.ws, "^" .. b.nick .. ": welcome back$")
    a.ws:close()
    b.ws:close()
  end)

  it("serves headless Chromium: the chat page, and echo with permessage-deflate", function()
    peers.need_browser()
    local res = peers.browser("chat", "http://" .. ngx_server.base .. "/")
    assert.equal(200, res.status)
    assert.equal("open", res.state)
    res = peers.browser("echo", "ws://" .. ngx_server.base .. "/echo", { "--oversize", tostring(3 * 1024 * 1024) })
    assert.is_true(res.text_ok)
    assert.is_true(res.binary_ok)
    assert.is_true(res.big_binary_ok)
    assert.is_true(res.big_text_ok)
    assert.matches("^permessage%-deflate", res.extensions)
    assert.equal(4000, res.close.code)
    assert.is_true(res.close.clean)
    assert.equal(1009, res.oversize_close.code)
    assert.equal("message too big", res.oversize_close.reason)
  end)
end)

-- No nginx here: a stand-in ngx, under lua5.4.
describe("duplex.nginx.stream", function()
  local dxngx

  setup(function()
    rawset(_G, "ngx", { var = { remote_addr = "192.0.2.7", remote_port = "4711" } })
    package.loaded["duplex.nginx"] = nil
    dxngx = require "duplex.nginx"
  end)
  teardown(function()
    package.loaded["duplex.nginx"] = nil
    rawset(_G, "ngx", nil)
  end)

  it("names the request's client as the peer of the raw request socket, and no peer for a client cosocket", function()
    -- the raw request socket has no close (it closes with the request)
    local raw = { receiveany = function() end, send = function() end }
    assert.same({ "192.0.2.7", 4711 }, { dxngx.stream(raw):peer() })
    local client = { receiveany = function() end, send = function() end, close = function() end }
    assert.same({}, { dxngx.stream(client):peer() })
  end)
end)
