-- What an application keeps and learns around a connection: ws.data for
-- its own state, on_close whatever ends the connection, `<close>` scopes,
-- the body of a refusal, and the log hook that receives the errors nobody
-- else can (spawned coroutines, timers).
local duplex = require "duplex"
local core = require "duplex.core"
local runtime = require "duplex.runtime"
local proc = require "support.proc"
local peers = require "support.peers"
local raw = require "support.raw"

local run = runtime.blocking

local servers = {}
local function listen(opts)
  opts.host, opts.port = "127.0.0.1", 0
  local srv = assert(duplex.listen(opts))
  servers[#servers + 1] = srv
  return srv
end

-- Polls until pred() is true or 5 s pass, letting the loop run.
local function eventually(pred, what)
  local deadline = core.now() + 5
  while not pred() do
    if core.now() > deadline then error("timed out waiting for " .. what, 2) end
    duplex.sleep(0.01)
  end
end

after_each(function()
  for _, srv in ipairs(servers) do srv:shutdown(1) end
  servers = {}
  duplex.set_log(nil)
  proc.killall()
end)

describe("ws.data", function()
  it("is a table of the application's own, one per connection, on both sides", function()
    local seen = {}
    local srv = listen { handler = function(ws)
      assert.same({}, ws.data)
      for m in ws:messages() do
        ws.data.count = (ws.data.count or 0) + 1
        ws.data.state, ws.data.send = m, "mine" -- names the library uses elsewhere are safe here
        ws:send(tostring(ws.data.count))
      end
      seen[#seen + 1] = ws.data
    end }
    run(function()
      local a = assert(duplex.connect(srv:url("/")))
      local b = assert(duplex.connect(srv:url("/")))
      assert.is_table(a.data)
      assert.are_not.equal(a.data, b.data)
      for _ = 1, 3 do a:send("x") end
      b:send("y")
      assert.equal("1", (a:receive(5))); assert.equal("2", (a:receive(5))); assert.equal("3", (a:receive(5)))
      assert.equal("1", (b:receive(5)))
      assert.equal("open", a.state)
      a:close(); b:close()
      eventually(function() return #seen == 2 end, "both handlers")
    end)
    table.sort(seen, function(x, y) return x.count < y.count end)
    assert.same({ { count = 1, state = "y", send = "mine" }, { count = 3, state = "x", send = "mine" } }, seen)
  end)
end)

describe("on_close", function()
  local function server_with_log(handler)
    local closes, logged = {}, {}
    local srv = listen {
      handler = handler,
      on_close = function(ws, code, reason)
        closes[#closes + 1] = { code = code, reason = reason, state = ws.state, nick = ws.data.nick }
      end,
      log = function(level, message) logged[#logged + 1] = level .. ": " .. message end,
    }
    return srv, closes, logged
  end

  it("runs when the handler returns, with the close code", function()
    local srv, closes = server_with_log(function(ws)
      ws.data.nick = "ann"
      ws:receive(5)
    end)
    run(function()
      local ws = assert(duplex.connect(srv:url("/")))
      ws:send("bye")
      assert.same({ nil, "closed", 1000, "" }, { ws:receive(5) })
      eventually(function() return #closes == 1 end, "on_close")
    end)
    assert.same({ code = 1000, reason = "", state = "closed", nick = "ann" }, closes[1])
  end)

  it("runs when the handler raises (1011), after the error is logged", function()
    local srv, closes, logged = server_with_log(function(ws)
      ws.data.nick = "bob"
      ws:receive(5)
      error("game state corrupt")
    end)
    run(function()
      local ws = assert(duplex.connect(srv:url("/")))
      ws:send("boom")
      local _, err, code = ws:receive(5)
      assert.equal("closed", err)
      assert.equal(1011, code)
      eventually(function() return #closes == 1 end, "on_close")
    end)
    assert.equal(1011, closes[1].code)
    assert.equal("bob", closes[1].nick)
    assert.matches("handler failed: .*game state corrupt", logged[1])
    assert.matches("stack traceback:", logged[1], 1, true)
  end)

  it("follows a handler that is its coroutine's bottom frame, in the same coroutine", function()
    -- nothing of the handshake stays below an idle connection's handler
    -- (core.at_end), so its stack is the handler's size
    local depth, handler_co, closed_co
    local srv = listen {
      handler = function(ws)
        handler_co = coroutine.running()
        depth = 0
        while debug.getinfo(depth + 1, "l") do depth = depth + 1 end
        ws:receive(5)
      end,
      on_close = function(_, code) closed_co = { coroutine.running(), code } end,
    }
    run(function()
      local ws = assert(duplex.connect(srv:url("/")))
      ws:send("bye")
      assert.equal(1000, select(3, ws:receive(5)))
      eventually(function() return closed_co ~= nil end, "on_close")
    end)
    assert.equal(1, depth)
    assert.equal(handler_co, closed_co[1])
    assert.equal(1000, closed_co[2])
    assert.equal(0, srv.count)
  end)

  it("runs when the peer vanishes without a closing handshake (1006)", function()
    local srv, closes = server_with_log(function(ws)
      for _ in ws:messages() do end
    end)
    run(function()
      local sock = raw.upgrade(srv.port, "/", 2)
      sock:close(true)
      eventually(function() return #closes == 1 end, "on_close")
    end)
    assert.equal(1006, closes[1].code)
  end)

  it("is a per-route option too, and its own errors are logged", function()
    local logged, closed = {}, {}
    local srv = listen {
      log = function(level, message) logged[#logged + 1] = level .. ": " .. message end,
      routes = {
        ["/a"] = { handler = function() end, on_close = function() closed[#closed + 1] = "a" end },
        ["/b"] = { handler = function() end, on_close = function() error("on_close broke") end },
      },
    }
    run(function()
      for _, path in ipairs { "/a", "/b" } do
        local ws = assert(duplex.connect(srv:url(path)))
        ws:receive(5)
      end
      eventually(function() return #logged == 1 end, "the log line")
    end)
    assert.same({ "a" }, closed)
    assert.matches("on_close failed: .*on_close broke", logged[1])
  end)

  it("must be a function", function()
    assert.has_error(function() duplex.listen { port = 0, handler = function() end, on_close = 1 } end,
      "listen: option 'on_close' must be a function, got 1")
  end)
end)

describe("<close>", function()
  -- A server that records the close code of every connection it served.
  local function recording_server()
    local codes = {}
    local srv = listen { handler = function(ws)
      for _ in ws:messages() do end
      codes[#codes + 1] = ws.close_code
    end }
    return srv, codes
  end

  it("closes a client connection with 1000 when its scope ends", function()
    local srv, codes = recording_server()
    run(function()
      do
        local ws <close> = assert(duplex.connect(srv:url("/")))
        ws:send("hello")
      end
      eventually(function() return #codes == 1 end, "the server's handler")
    end)
    assert.same({ 1000 }, codes)
  end)

  it("closes with 1011 when an error leaves the scope", function()
    local srv, codes = recording_server()
    run(function()
      local ok = pcall(function()
        local ws <close> = assert(duplex.connect(srv:url("/")))
        ws:send("hello")
        error("client bug")
      end)
      assert.is_false(ok)
      eventually(function() return #codes == 1 end, "the server's handler")
    end)
    assert.same({ 1011 }, codes)
  end)
end)

describe("a refused handshake", function()
  it("gives the client the refusal's body (duplex server, on_request)", function()
    local srv = listen {
      handler = function() end,
      on_request = function(req)
        if req.query.token ~= "s3cret" then return 401, "log in first: token missing or wrong" end
      end,
    }
    local ws, err, res = duplex.connect(srv:url("/?token=nope"))
    assert.is_nil(ws)
    assert.matches("401", err)
    assert.equal(401, res.status)
    assert.equal("log in first: token missing or wrong", res.body)
    ws = assert(duplex.connect(srv:url("/?token=s3cret")))
    ws:close()
  end)

  it("gives the body of python-websockets' and node ws' refusals", function()
    for _, start in ipairs { peers.py_echo_server, peers.node_echo_server } do
      local srv = start { path = "/only" }
      local ws, _, res = duplex.connect("ws://127.0.0.1:" .. srv.port .. "/other")
      assert.is_nil(ws)
      assert.equal(400, res.status)
      assert.matches("^%s*[%w ]+%s*$", res.body)
      assert.truthy(res.body:lower():find("wrong path", 1, true) or res.body:find("Bad Request", 1, true), res.body)
      srv:stop()
    end
  end)

  it("decodes a chunked body and stops at the limit", function()
    -- A server that answers any request with response, in pieces of `piece`
    -- bytes each written on its own (all at once without it).
    local function answer_with(response, piece)
      local l = assert(core.listen { host = "127.0.0.1", port = 0 })
      local _, port = l:address()
      core.spawn(function()
        local sock = l:accept()
        sock:setnodelay(true)
        sock:read(nil, 5)
        piece = piece or #response
        for i = 1, #response, piece do
          sock:write(response:sub(i, i + piece - 1))
          sock:flush(5)
        end
        sock:close()
        l:close()
      end)
      return "ws://127.0.0.1:" .. port .. "/"
    end
    local _, _, res = duplex.connect(answer_with("HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n"
      .. "5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n"))
    assert.equal(403, res.status)
    assert.equal("hello, world", res.body)
    -- the same answer one byte per write: every cut, inside sizes and chunks
    _, _, res = duplex.connect(answer_with("HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n"
      .. "5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n", 1))
    assert.equal(403, res.status)
    assert.equal("hello, world", res.body)
    local big = string.rep("x", 200000)
    _, _, res = duplex.connect(answer_with("HTTP/1.1 503 Busy\r\nContent-Length: " .. #big .. "\r\n\r\n" .. big))
    assert.equal(503, res.status)
    assert.equal(65536, #res.body)
    _, _, res = duplex.connect(answer_with("HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\nuntil the end"))
    assert.equal("until the end", res.body)
  end)
end)

describe("duplex.set_log", function()
  it("receives errors of spawned coroutines and timers, with their traceback", function()
    local logged = {}
    duplex.set_log(function(level, message) logged[#logged + 1] = { level, message } end)
    run(function()
      duplex.spawn(function() error("spawned failure") end)
      duplex.timer(0.01, function() error("timer failure") end)
      eventually(function() return #logged == 2 end, "two log lines")
    end)
    table.sort(logged, function(a, b) return a[2] < b[2] end)
    for i, what in ipairs { "spawned failure", "timer failure" } do
      assert.equal("error", logged[i][1])
      assert.matches(what, logged[i][2], 1, true)
      assert.matches("stack traceback:", logged[i][2], 1, true)
    end
  end)

  it("is where a server without its own log writes, and nil restores stderr", function()
    local logged = {}
    duplex.set_log(function(level, message) logged[#logged + 1] = level .. ": " .. message end)
    local srv = listen { handler = function() error("no log option here") end }
    run(function()
      local ws = assert(duplex.connect(srv:url("/")))
      ws:receive(5)
      eventually(function() return #logged == 1 end, "the log line")
    end)
    assert.matches("^error: handler failed: .*no log option here", logged[1])
    duplex.set_log(nil)
    assert.has_error(function() duplex.set_log("stderr") end, "set_log: a function or nil expected")
  end)
end)
