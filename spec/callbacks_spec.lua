-- Routes served by callbacks (on_open, on_message, on_close) on
-- duplex.listen: no coroutine per open connection, and the same rules as a
-- handler's connection (heartbeats, closing handshake, limits, errors),
-- over real loopback connections. reliability_spec runs its floods, slow
-- readers and protocol errors against both styles.
local duplex = require "duplex"
local core = require "duplex.core"
local runtime = require "duplex.runtime"
local certs = require "support.certs"
local raw = require "support.raw"

local connect, listen = require("support.tracked").install(after_each, teardown)
local run = runtime.blocking

local function echo(ws, message, kind) ws:send(message, kind) end

-- n random bytes (core.random gives at most 64 KiB at a time)
local function random_bytes(n)
  local parts = {}
  while n > 0 do
    local k = math.min(n, 65536)
    parts[#parts + 1] = core.random(k)
    n = n - k
  end
  return table.concat(parts)
end

-- A server whose callbacks report what happened: ends[ws] = { code, reason }.
local function recording_server(extra)
  local log, ends = {}, {}
  local opts = { host = "127.0.0.1", port = 0, on_message = echo, log = function(_, m) log[#log + 1] = m end,
    on_close = function(ws, code, reason) ends[#ends + 1] = { code = code, reason = reason, ws = ws } end }
  for k, v in pairs(extra or {}) do opts[k] = v end
  return listen(opts), log, ends
end

local function wait_for(what, seconds, pred)
  run(function()
    local deadline = core.now() + seconds
    while not pred() do
      if core.now() > deadline then error("timed out: " .. what) end
      core.sleep(0.01)
    end
  end)
end

describe("a callback route", function()
  it("opens, echoes every message intact in order, and closes, with and without compression", function()
    for _, deflate in ipairs { false, true } do
      local srv, _, ends = recording_server {
        deflate = deflate or nil,
        on_open = function(ws, req) ws:send("hello " .. req.path .. " " .. tostring(ws.deflate)) end }
      local ws = assert(connect(srv:url("/room?x=1"), { deflate = deflate or nil }))
      assert.equal("hello /room " .. tostring(deflate), (ws:receive(5)))
      -- random sizes across the 7/16/64-bit length forms, both kinds, sent
      -- back to back so that reads cut frames anywhere
      local sent = {}
      for i = 1, 60 do
        local n = ({ 0, 1, 125, 126, 65535, 65536, 300000 })[i % 7 + 1] + math.random(0, 3)
        local kind = i % 2 == 0 and "binary" or "text"
        local m = kind == "binary" and random_bytes(n) or ("%d:"):format(i) .. ("x"):rep(n)
        sent[i] = { m, kind }
        assert(ws:send(m, kind))
      end
      for i = 1, #sent do
        local m, kind = ws:receive(10)
        assert.equal(sent[i][2], kind)
        assert(m == sent[i][1], "message " .. i .. " differs")
      end
      ws:close(4001, "done")
      wait_for("on_close", 5, function() return #ends == 1 end)
      assert.same({ 4001, "done" }, { ends[1].code, ends[1].reason })
    end
  end)

  it("hands on_message the request a handler gets, kept as one string until read", function()
    -- the same request to a handler route and a callback one: every field
    -- read back from the callback connection's packed request must be the
    -- handler's (a differential oracle), and pairs(ws) must show it too
    local function describe_request(req)
      local t = {}
      for _, k in ipairs { "method", "target", "path", "raw_query", "version", "host", "origin", "key",
        "peer_address", "peer_port", "remote_address", "websocket", "upgrade" } do
        t[k] = req[k]
      end
      t.query, t.headers, t.protocols, t.extensions = req.query, req.headers, req.protocols, req.extensions
      return t
    end
    local seen = {}
    local srv = listen { host = "127.0.0.1", port = 0, trusted_proxies = { "10.0.0.0/8" }, routes = {
      ["/h"] = function(ws, req)
        seen.handler = describe_request(req)
        for m in ws:messages() do ws:send(m) end
      end,
      ["/c"] = { on_message = function(ws, m)
        if m == "pairs" then
          for k, v in pairs(ws) do if k == "request" then seen.pairs = v.method end end
        else
          seen.callback = describe_request(ws.request)
          seen.same = rawequal(ws.request, ws.request)
          ws.request.mine = true
          seen.kept = ws.request.mine
        end
        ws:send(m)
      end },
    } }
    local request_of = function(path)
      return table.concat {
        "GET ", path, "?a=1&b=two%20words&a=3 HTTP/1.1\r\n",
        "Host: example.test:8080\r\nOrigin: https://app.example\r\nUpgrade: websocket\r\n",
        "Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat, superchat\r\n",
        "Sec-WebSocket-Extensions: x-unknown; a=1\r\nX-Twice: one\r\nx-twice: two\r\n",
        "X-Forwarded-For: 203.0.113.9\r\n\r\n" }
    end
    local F = require "support.frames"
    run(function()
      for _, path in ipairs { "/h", "/c" } do
        local sock = assert(core.connect { host = "127.0.0.1", port = srv.port })
        sock:write(request_of(path))
        local got = ""
        repeat got = got .. assert(sock:read(nil, 2)) until got:find("\r\n\r\n", 1, true)
        assert.matches("^HTTP/1.1 101", got)
        for _, m in ipairs { "x", "pairs" } do
          sock:write(F.build { op = "text", payload = m, key = "abcd" })
          local echo_frame = F.build { op = "text", payload = m }
          local back = got:sub(got:find("\r\n\r\n", 1, true) + 4)
          got = "\r\n\r\n"
          while #back < #echo_frame do back = back .. assert(sock:read(nil, 2)) end
          assert.equal(echo_frame, back)
        end
        sock:close()
      end
    end)
    assert.is_table(seen.handler)
    assert.equal("/h", seen.handler.path)
    assert.equal("/c", seen.callback.path)
    assert.equal("/c?a=1&b=two%20words&a=3", seen.callback.target)
    seen.handler.path, seen.handler.target, seen.callback.path, seen.callback.target = nil, nil, nil, nil
    seen.handler.peer_port, seen.callback.peer_port = nil, nil -- two connections
    assert.same(seen.handler, seen.callback)
    assert.equal("two words", seen.callback.query.b)
    assert.equal("one, two", seen.callback.headers["x-twice"])
    assert.equal("127.0.0.1", seen.callback.peer_address)
    assert.is_true(seen.same)
    assert.is_true(seen.kept)
    assert.equal("GET", seen.pairs)
  end)

  it("packs a request only when it holds nothing but what it came with", function()
    local hs = core.handshake_server {}
    local req = hs:feed("GET /x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" ..
      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    req.peer_address, req.peer_port = "::1", 4242
    local ws = core.connection(setmetatable({}, { __index = {} }), false, false)
    ws.request = req
    assert.is_true(core.pack_request(ws))
    assert.equal("/x", ws.request.path)
    assert.equal(4242, ws.request.peer_port)
    assert.is_nil(rawget(ws.request, "remote_address"))
    ws.request.remote_address = "198.51.100.7" -- a trusted proxy's client
    assert.is_true(core.pack_request(ws))
    assert.equal("198.51.100.7", ws.request.remote_address)
    assert.equal("::1", ws.request.peer_address)
    assert.equal("h", ws.request.headers.host)
    assert.is_false(core.pack_request(ws)) -- its headers table was made
    req = ws.request
    req.user = "alice"
    assert.is_false(core.pack_request(ws))
    assert.equal(req, ws.request)
    assert.has_error(function() core.pack_request({}) end)
  end)

  it("keeps no coroutine per open connection", function()
    local srv = recording_server()
    local before = core.loop_stats().coroutines
    local clients = {}
    for i = 1, 50 do clients[i] = assert(connect(srv:url("/"), { ping_interval = 0 })) end
    for i, ws in ipairs(clients) do
      assert(ws:send("m" .. i))
      assert.equal("m" .. i, (ws:receive(5)))
    end
    -- the clients' own reads are done: what is left waiting is the server's
    run(core.sleep, 0.05)
    assert.is_true(core.loop_stats().coroutines - before <= 2,
      "coroutines grew from " .. before .. " to " .. core.loop_stats().coroutines)
    assert.equal(50, #srv:clients())
  end)

  it("closes a connection whose on_message raises with 1011, and serves the others", function()
    local srv, log = recording_server { on_message = function(ws, m)
      if m == "boom" then error("kaboom") end
      ws:send(m)
    end }
    local bad, good = assert(connect(srv:url("/"))), assert(connect(srv:url("/")))
    assert(bad:send("boom"))
    assert.same({ nil, "closed", 1011, "internal error" }, { bad:receive(5) })
    assert(good:send("still here"))
    assert.equal("still here", (good:receive(5)))
    assert.matches("on_message failed: .*kaboom", table.concat(log, "\n"))
  end)

  -- The dispatcher pumps a run of sockets under one xpcall: a failure of
  -- the pump itself (here a high_water the socket refuses) must end only
  -- the connection it was pumping, and the run must go on for the others.
  it("aborts the one connection whose pump fails, and goes on serving the others", function()
    local srv, log, ends = recording_server { on_open = function(ws, req)
      if req.query.broken then ws.high_water = 0.5 end
    end }
    local before = assert(connect(srv:url("/")))
    local broken = assert(connect(srv:url("/?broken=1")))
    assert(broken:send("x"))
    local got = { broken:receive(5) }
    assert.same({ nil, "closed", 1006 }, { got[1], got[2], got[3] })
    for i = 1, 3 do
      local late = assert(connect(srv:url("/")))
      assert(late:send("served " .. i))
      assert.equal("served " .. i, (late:receive(5)))
    end
    assert(before:send("still here"))
    assert.equal("still here", (before:receive(5)))
    assert.matches("pump: ws.high_water must be an integer", table.concat(log, "\n"))
    wait_for("the broken one's end", 5, function() return #ends >= 1 end)
    assert.equal(1006, ends[1].code)
  end)

  it("makes a callback that tries to wait fail, instead of stopping every connection", function()
    local srv, log = recording_server { on_message = function(ws, m)
      if m == "wait" then duplex.sleep(1) end
      ws:send(m)
    end }
    local waiter, other = assert(connect(srv:url("/"))), assert(connect(srv:url("/")))
    assert(waiter:send("wait"))
    assert.same({ nil, "closed", 1011, "internal error" }, { waiter:receive(5) })
    assert(other:send("served"))
    assert.equal("served", (other:receive(5)))
    assert.matches("cannot wait here", table.concat(log, "\n"))
  end)

  it("lets on_open wait, and closes with 1011 when it raises", function()
    local srv, log = recording_server { on_open = function(ws, req)
      duplex.sleep(0.05) -- a broker read, say
      if req.query.fail then error("no such room") end
      ws:send("welcome")
    end }
    local ok = assert(connect(srv:url("/")))
    assert.equal("welcome", (ok:receive(5)))
    assert(ok:send("after"))
    assert.equal("after", (ok:receive(5)))
    local bad = assert(connect(srv:url("/?fail=1")))
    assert.same({ nil, "closed", 1011, "internal error" }, { bad:receive(5) })
    assert.matches("on_open failed: .*no such room", table.concat(log, "\n"))
  end)

  it("answers pings, and drops a peer that stops answering its own within the ping timeout", function()
    local srv, _, ends = recording_server { ping_interval = 0.2, ping_timeout = 0.3 }
    local ws = assert(connect(srv:url("/"), { ping_interval = 0 }))
    assert(ws:ping("are you there"))
    local pongs = {}
    ws.on_pong = function(_, data) pongs[#pongs + 1] = data end
    assert(ws:send("x"))
    assert.equal("x", (ws:receive(5)))
    assert.same({ "are you there" }, pongs)
    -- its reader answers the server's pings meanwhile
    local reading = true
    run(function() core.spawn(function() while reading do ws:receive(0.05) end end) end)
    -- a raw peer that completes the handshake and then reads nothing and
    -- answers nothing: only the server's heartbeat can notice it is gone
    local sock = run(raw.upgrade, srv.port, "/", 5)
    wait_for("the silent peer dropped", 5, function() return #ends >= 1 end)
    assert.same({ 1006, "ping timeout" }, { ends[1].code, ends[1].reason })
    sock:close()
    run(core.sleep, 0.6)
    reading = false
    assert.equal("open", ws.state)
    assert.equal(1, #ends)
  end)

  it("closes from on_message with a code of its own, and on_close sees the peer's reply", function()
    local srv, _, ends = recording_server { on_message = function(ws, m) ws:close(4000, "bye " .. m) end }
    local ws = assert(connect(srv:url("/")))
    assert(ws:send("ann"))
    assert.same({ nil, "closed", 4000, "bye ann" }, { ws:receive(5) })
    wait_for("on_close", 5, function() return #ends == 1 end)
    assert.equal(4000, ends[1].code)
    assert.has_error(function() ends[1].ws:close(999) end)
  end)

  it("closes a peer that reads nothing for send_timeout as a slow consumer", function()
    local srv, _, ends = recording_server { send_timeout = 0.3, high_water = 65536, low_water = 1024,
      on_message = function(ws)
        for _ = 1, 200 do ws:send(("z"):rep(65536)) end -- 12.5 MiB, under max_buffered
      end }
    local sock = run(raw.upgrade, srv.port, "/", 5)
    run(function() sock:write(require("support.frames").build { op = "text", payload = "go", key = "abcd" }) end)
    wait_for("the slow consumer dropped", 5, function() return #ends >= 1 end)
    assert.equal("send timed out: the peer is not reading", ends[1].ws.error)
    sock:close()
    local probe = assert(connect(srv:url("/")))
    probe.on_pong = nil
    assert(probe:send("fine"))
    assert.is_true(#assert(probe:receive(5)) > 0)
  end)

  it("ends a connection whose peer closes with no coroutine when the answer leaves at once", function()
    local srv, _, ends = recording_server { close_timeout = 0.5, high_water = 32 << 20, max_buffered = 64 << 20,
      on_message = function(ws, m)
        if m == "flood" then ws:send(("x"):rep(8 << 20)) end -- more than the kernel takes at once
      end }
    -- what callbacks.after spawns for an event that may wait
    local event = require("duplex.callbacks").WebSocket._event
    local spawned, spawn = 0, core.spawn
    core.spawn = function(f, ...)
      if f == event then spawned = spawned + 1 end
      return spawn(f, ...)
    end
    local ok, err = pcall(function()
      local ws = assert(connect(srv:url("/")))
      assert.same({ true }, { ws:close(4001, "done") })
      wait_for("on_close", 5, function() return #ends == 1 end)
      assert.equal(0, spawned, "a coroutine for the close")
      assert.same({ 4001, "done" }, { ends[1].code, ends[1].reason })
      -- with its answer stuck behind 8 MiB the peer does not read (under
      -- high_water: its close is read), the rest of the closing handshake
      -- waits in a coroutine of its own
      local sock = run(raw.upgrade, srv.port, "/", 5)
      local frames = require("support.frames")
      run(function()
        sock:write(frames.build { op = "text", payload = "flood", key = "abcd" })
        core.sleep(0.2)
        sock:write(frames.build { op = "close", payload = "\15\162", key = "abcd" })
      end)
      wait_for("the second on_close", 5, function() return #ends == 2 end)
      assert.equal(1, spawned)
      sock:close()
    end)
    core.spawn = spawn
    assert(ok, err)
  end)

  it("holds a connection to its own high_water, and its neighbours on the route to the route's", function()
    -- the route's limits are read once for all its connections; one that
    -- sets its own must be held to that, the others must not be
    local srv, _, ends = recording_server { send_timeout = 0.3, high_water = 32 << 20, low_water = 1024,
      max_buffered = 64 << 20,
      on_open = function(ws, req) if req.query.own then ws.high_water = 65536 end end,
      on_message = function(ws)
        for _ = 1, 200 do ws:send(("z"):rep(65536)) end -- 12.5 MiB
      end }
    local go = require("support.frames").build { op = "text", payload = "go", key = "abcd" }
    local route = run(raw.upgrade, srv.port, "/", 5)
    run(function() route:write(go); core.sleep(0.1) end)
    local own = run(raw.upgrade, srv.port, "/?own=1", 5)
    run(function() own:write(go) end)
    wait_for("the connection over its own high_water dropped", 5, function() return #ends >= 1 end)
    run(function() core.sleep(0.5) end) -- past send_timeout again: the other is under the route's
    assert.equal(1, #ends)
    assert.equal("send timed out: the peer is not reading", ends[1].ws.error)
    assert.equal(65536, ends[1].ws.high_water)
    assert.equal(1, srv.count)
    route:close()
    own:close()
  end)

  it("shuts down gracefully: every connection gets 1001, and the dispatcher ends", function()
    local srv, _, ends = recording_server()
    local a, b = assert(connect(srv:url("/"))), assert(connect(srv:url("/")))
    run(function()
      core.spawn(function() a:receive(5) end)
      core.spawn(function() b:receive(5) end)
    end)
    local coroutines = core.loop_stats().coroutines
    assert.is_true(srv:shutdown(2))
    assert.equal(2, #ends)
    for _, e in ipairs(ends) do assert.equal(1001, e.code) end
    wait_for("the client's close", 5, function() return a.state == "closed" end)
    assert.is_true(core.loop_stats().coroutines < coroutines)
  end)

  it("serves wss", function()
    local c = certs.generate()
    local srv = recording_server { tls = { cert = c.cert, key = c.key } }
    local ws = assert(connect(srv:url("/"), { tls = { ca = c.ca } }))
    local big = random_bytes(200000)
    assert(ws:send(big, "binary"))
    assert(ws:send("small"))
    assert(big == (ws:receive(5)))
    assert.equal("small", (ws:receive(5)))
  end)

  it("shares a port with handler routes", function()
    local srv = listen { host = "127.0.0.1", port = 0, routes = {
      ["/cb"] = { on_message = function(ws, m) ws:send("cb " .. m) end },
      ["/co"] = function(ws) for m in ws:messages() do ws:send("co " .. m) end end,
    } }
    local cb, co = assert(connect(srv:url("/cb"))), assert(connect(srv:url("/co")))
    assert(cb:send("1"))
    assert(co:send("2"))
    assert.equal("cb 1", (cb:receive(5)))
    assert.equal("co 2", (co:receive(5)))
  end)

  it("refuses what does not go together, by name", function()
    local function fails(opts, pattern)
      opts.host, opts.port = "127.0.0.1", 0
      local ok, err = pcall(duplex.listen, opts)
      assert.is_false(ok)
      assert.matches(pattern, err)
    end
    fails({ handler = echo, on_message = echo }, "handler or on_message, not both")
    fails({ on_open = echo, handler = echo }, "on_open goes with on_message")
    fails({ on_message = echo, streaming = true }, "streaming is for handlers")
    fails({ on_message = "echo" }, "on_message")
  end)

  it("receive() on a callback connection is a mistake", function()
    local caught
    local srv = recording_server { on_open = function(ws) caught = select(2, pcall(ws.receive, ws)) end }
    local ws = assert(connect(srv:url("/")))
    assert(ws:send("x"))
    assert.equal("x", (ws:receive(5)))
    assert.matches("on_message", caught)
    assert(srv)
  end)
end)
