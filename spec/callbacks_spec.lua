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
