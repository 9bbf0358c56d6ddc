-- duplex's client against duplex's server over real loopback sockets: the
-- public API (duplex.listen / duplex.connect / ws:*), every limit, timeout
-- and refusal, and peers that misbehave at the TCP level.
local duplex = require "duplex"
local core = require "duplex.core"
local runtime = require "duplex.runtime"
local certs = require "support.certs"
local F = require "support.frames"
local raw = require "support.raw"

local run = runtime.blocking

local servers = {}
local function listen(opts)
  opts.host = opts.host or "127.0.0.1"
  opts.port = 0
  local srv = assert(duplex.listen(opts))
  servers[#servers + 1] = srv
  return srv
end

local function echo(ws)
  for m, kind in ws:messages() do ws:send(m, kind) end
end

-- A raw TCP client that does the upgrade itself, for peers that misbehave.
local function raw_upgrade(srv, path)
  return raw.upgrade(srv.port, path, 2)
end

after_each(function()
  for _, srv in ipairs(servers) do srv:shutdown(1) end
  servers = {}
end)

describe("duplex client and server", function()
  it("echo text and binary messages of every size class", function()
    local srv = listen { handler = echo }
    local ws = assert(duplex.connect(srv:url("/")))
    for _, n in ipairs { 0, 1, 125, 126, 65535, 65536, 3 << 20 } do
      local text = string.rep("é", n // 2)
      assert.is_true(ws:send(text))
      assert.same({ text, "text" }, { ws:receive(5) })
      local bin = string.rep("\0\255", n // 2)
      assert.is_true(ws:send(bin, "binary"))
      assert.same({ bin, "binary" }, { ws:receive(5) })
    end
    assert.is_true(ws:close())
    assert.equal(1000, ws.close_code)
  end)

  it("judges close arguments before changing any state, start_close as close", function()
    local srv = listen { handler = echo }
    local ws = assert(duplex.connect(srv:url("/")))
    for _, call in ipairs {
      { 1005, nil, "close code may not be sent" }, { 999, nil, "close code may not be sent" },
      { 1000, string.rep("r", 124), "close reason longer than 123 bytes" },
      { 1000, "\255", "close reason is not UTF-8" },
    } do
      for _, method in ipairs { "close", "start_close" } do
        local ok, err = pcall(function() ws[method](ws, call[1], call[2]) end)
        assert.is_false(ok)
        assert.matches("close: " .. call[3], err, 1, true)
        assert.matches("websocket_spec.lua", err, 1, true) -- the caller's line
        assert.equal("open", ws.state, method .. " changed the state before refusing")
      end
    end
    assert.is_true(ws:send("still open"))
    assert.equal("still open", (ws:receive(5)))
    assert.is_true(ws:close(4000, "bye"))
    assert.equal(4000, ws.close_code)
  end)

  it("sends a message in fragments and receives one piece by piece when asked", function()
    local pieces = {}
    local srv = listen { streaming = true, handler = function(ws)
      while true do
        local piece, kind, fin = ws:receive()
        if not piece then return end
        pieces[#pieces + 1] = { piece, kind, fin }
        if fin then ws:send("got " .. #pieces) end
      end
    end }
    local ws = assert(duplex.connect(srv:url("/")))
    assert.is_true(ws:send_fragment("one ", "text", false))
    assert.is_true(ws:send_fragment("two ", nil, false))
    assert.is_true(ws:ping("between"))
    assert.is_true(ws:send_fragment("three", nil, true))
    assert.same({ "got 3", "text" }, { ws:receive(5) })
    assert.same({ { "one ", "text", false }, { "two ", "text", false }, { "three", "text", true } }, pieces)
    assert.has_error(function() ws:send_fragment("x", "bogus", false) end)
    ws:close()
  end)

  it("answers pings automatically and measures the heartbeat round trip", function()
    local srv = listen { handler = echo }
    local ws = assert(duplex.connect(srv:url("/")))
    local pongs = {}
    ws.on_pong = function(_, payload) pongs[#pongs + 1] = payload end
    assert.is_true(ws:ping("hb"))
    ws:send("after")
    assert.same({ "after", "text" }, { ws:receive(5) })
    assert.same({ "hb" }, pongs)
    assert.is_number(ws.latency)
    assert.has_error(function() ws:ping(string.rep("x", 126)) end)
    ws:close()
  end)

  -- send and the messages() step run in C on our loop (core.fast_send,
  -- core.fast_next) and hand every other case to the Lua methods: each
  -- hand-off here, interleaved with plain messages.
  it("hands pings, fragments, a second reader, bad arguments and the close from the C path to Lua", function()
    local seen = {}
    local srv = listen { deflate = true, handler = function(ws)
      seen.kind_error = select(2, pcall(function() ws:send("x", "bogus") end))
      seen.type_error = select(2, pcall(function() ws:send(12) end))
      duplex.spawn(function() seen.second = select(2, pcall(ws.receive, ws, 1)) end)
      for m, kind in ws:messages() do
        assert(ws:send(m, kind, #m > 3 and { compress = false } or nil))
      end
      seen.code, seen.state = ws.close_code, ws.state
    end }
    local ws = assert(duplex.connect(srv:url("/"), { deflate = true }))
    local pongs = {}
    ws.on_pong = function(_, payload) pongs[#pongs + 1] = payload end
    assert(ws:send("one"))
    assert(ws:ping("p1"))
    assert(ws:send(string.rep("b", 300), "binary"))
    assert(ws:send_fragment("fr", "text", false))
    assert(ws:ping("p2"))
    assert(ws:send_fragment("ag", nil, true))
    assert(ws:send(""))
    assert.same({ "one", "text" }, { ws:receive(5) })
    assert.same({ string.rep("b", 300), "binary" }, { ws:receive(5) })
    assert.same({ "frag", "text" }, { ws:receive(5) })
    assert.same({ "", "text" }, { ws:receive(5) })
    assert.same({ "p1", "p2" }, pongs)
    ws:close(1000, "bye")
    assert.equal(1000, ws.close_code)
    local deadline = core.now() + 5
    while seen.state == nil and core.now() < deadline do run(core.sleep, 0.01) end
    assert.matches("websocket_spec.lua:%d+: message kind must be \"text\" or \"binary\", got bogus", seen.kind_error)
    assert.matches("websocket_spec.lua:%d+: send: message must be a string", seen.type_error)
    assert.matches("another coroutine is already reading", seen.second)
    assert.same({ 1000, "closed" }, { seen.code, seen.state })
  end)

  it("stays usable when on_pong raises: the error reaches receive's caller, once", function()
    local srv = listen { handler = echo }
    local ws = assert(duplex.connect(srv:url("/")))
    ws.on_pong = function() error("pong handler broke") end
    assert.is_true(ws:ping("hb"))
    assert(ws:send("after"))
    local ok, err = pcall(ws.receive, ws, 5)
    assert.is_false(ok)
    assert.matches("pong handler broke", err)
    ws.on_pong = nil
    assert.same({ "after", "text" }, { ws:receive(5) })
    assert.is_true(ws:close())
    assert.equal(1000, ws.close_code) -- the close waited for the server's answer
  end)

  it("asks the client for client_no_context_takeover by default, so idle connections hold no zlib state", function()
    local srv = listen { deflate = true, handler = echo }
    local ws = assert(duplex.connect(srv:url("/"), { deflate = true }))
    assert.matches("client_no_context_takeover", ws.extensions)
    assert.matches("server_no_context_takeover", ws.extensions)
    local msg = string.rep("compress me please ", 50)
    for _ = 1, 3 do
      assert(ws:send(msg))
      assert.equal(msg, (ws:receive(5)))
    end
    ws:close()
  end)

  it("reports the close code and reason on both sides, whoever closes", function()
    local seen = {}
    local srv = listen { handler = function(ws)
      local m, err, code, reason = ws:receive()
      seen.server = { m, err, code, reason }
    end }
    local ws = assert(duplex.connect(srv:url("/")))
    assert.is_true(ws:close(4000, "custom bye"))
    assert.equal(4000, ws.close_code)
    run(core.sleep, 0.1)
    assert.same({ nil, "closed", 4000, "custom bye" }, seen.server)

    local srv2 = listen { handler = function(peer) peer:close(4001, "server says bye") end }
    local ws2 = assert(duplex.connect(srv2:url("/")))
    assert.same({ nil, "closed", 4001, "server says bye" }, { ws2:receive(5) })
    assert.same({ nil, "closed" }, { ws2:send("late") })
    assert.has_error(function() ws2:close(1005) end)
  end)

  it("answers a message and the close frame after it in the same read, in order", function()
    local srv = listen { handler = function(ws)
      for m, k in ws:messages() do
        if not ws:send(m, k) then break end
      end
    end }
    local got = run(function()
      local sock = raw_upgrade(srv)
      sock:write(F.build { op = "text", payload = "last words", key = "abcd" }
        .. F.build { op = "close", payload = F.close_payload(1000, "bye"), key = "abcd" })
      local bytes, why = raw.read_all(sock, 2)
      return bytes .. "<" .. why .. ">"
    end)
    -- the message is handled before the close frame behind it is parsed:
    -- its echo leaves first, then the close is answered, then FIN
    assert.equal(F.build { op = "text", payload = "last words" }
      .. F.build { op = "close", payload = F.close_payload(1000) } .. "<closed>", got)
  end)

  it("closes with 1011 when a handler fails, and with 1000 when it returns", function()
    local srv = listen { routes = {
      ["/fail"] = function() error("boom") end,
      ["/done"] = function() end,
    }, log = function() end }
    local ws = assert(duplex.connect(srv:url("/fail")))
    local _, _, code = ws:receive(5)
    assert.equal(1011, code)
    ws = assert(duplex.connect(srv:url("/done")))
    _, _, code = ws:receive(5)
    assert.equal(1000, code)
  end)

  it("returns nil, 'timeout' from receive and stays usable", function()
    local srv = listen { handler = echo }
    local ws = assert(duplex.connect(srv:url("/")))
    assert.same({ nil, "timeout" }, { ws:receive(0.05) })
    ws:send("still here")
    assert.same({ "still here", "text" }, { ws:receive(5) })
    ws:close()
  end)

  it("serves several paths on one port and answers 404 elsewhere", function()
    local srv = listen { routes = {
      ["/a"] = function(ws) ws:send("a") end,
      ["/b"] = { handler = function(ws) ws:send("b") end },
    } }
    assert.equal("a", (assert(duplex.connect(srv:url("/a"))):receive(5)))
    assert.equal("b", (assert(duplex.connect(srv:url("/b?x=1"))):receive(5)))
    local ws, err = duplex.connect(srv:url("/c"))
    assert.is_nil(ws)
    assert.matches("404", err)
  end)

  it("selects a subprotocol in the server's order of preference", function()
    local srv = listen { protocols = { "v2", "v1" }, handler = function(ws) ws:send(tostring(ws.protocol)) end }
    local ws = assert(duplex.connect(srv:url("/"), { protocols = { "v1", "v2" } }))
    assert.equal("v2", ws.protocol)
    assert.equal("v2", (ws:receive(5)))
    ws = assert(duplex.connect(srv:url("/"), { protocols = { "other" } }))
    assert.is_nil(ws.protocol)
  end)

  it("refuses origins outside the allow-list with 403", function()
    local srv = listen { origins = { "https://good.example" }, handler = echo }
    local ws, err = duplex.connect(srv:url("/"), { origin = "https://evil.example" })
    assert.is_nil(ws)
    assert.matches("403", err)
    assert.is_truthy(duplex.connect(srv:url("/"), { origin = "https://good.example" }))
    ws, err = duplex.connect(srv:url("/"))
    assert.is_nil(ws)
    assert.matches("403", err, "no Origin at all is refused too")
  end)

  it("lets a hook refuse the upgrade (authentication) with its status and body", function()
    local srv = listen {
      on_request = function(req)
        if req.headers["authorization"] ~= "Bearer sesame" then
          return 401, "who are you?", { ["WWW-Authenticate"] = "Bearer" }
        end
      end,
      handler = function(ws, req) ws:send(req.headers["authorization"]) end,
    }
    local ws, err, res = duplex.connect(srv:url("/"))
    assert.is_nil(ws)
    assert.matches("401", err)
    assert.equal(401, res.status)
    assert.equal("Bearer", res.headers["www-authenticate"])
    ws = assert(duplex.connect(srv:url("/"), { headers = { Authorization = "Bearer sesame" } }))
    assert.equal("Bearer sesame", (ws:receive(5)))
  end)

  it("answers plain HTTP through a hook, with 404 and 426 defaults", function()
    local srv = listen { path = "/ws", handler = echo, on_http = function(req)
      if req.path == "/health" then return 200, { ["Content-Type"] = "text/plain" }, "ok" end
    end }
    local function get(path)
      return run(function()
        local sock = assert(core.connect { host = "127.0.0.1", port = srv.port })
        sock:write("GET " .. path .. " HTTP/1.1\r\nHost: x\r\n\r\n")
        local out = {}
        while true do
          local d = sock:read(nil, 2)
          if not d then break end
          out[#out + 1] = d
        end
        sock:close()
        return table.concat(out)
      end)
    end
    local health = get("/health")
    assert.matches("^HTTP/1.1 200", health)
    assert.matches("\r\n\r\nok$", health)
    assert.matches("^HTTP/1.1 404", get("/nothing"))
    local r = get("/ws")
    assert.matches("^HTTP/1.1 426", r)
    assert.matches("Sec%-WebSocket%-Version: 13", r)
  end)

  it("sees the client address behind a trusted proxy only", function()
    local addrs = {}
    local srv = listen { trusted_proxies = { "127.0.0.1" }, handler = function(ws)
      addrs[#addrs + 1] = ws.remote_address
    end }
    local open = srv.port
    assert(duplex.connect(srv:url("/"), { headers = { ["X-Forwarded-For"] = "198.51.100.1, 203.0.113.5" } })):receive(5)
    local srv2 = listen { handler = function(ws) addrs[#addrs + 1] = ws.remote_address end }
    assert(duplex.connect(srv2:url("/"), { headers = { ["X-Forwarded-For"] = "203.0.113.5" } })):receive(5)
    assert.same({ "203.0.113.5", "127.0.0.1" }, addrs)
    assert.is_number(open)
  end)

  it("shuts down gracefully: clients see 1001, not 1006", function()
    local srv = listen { handler = echo }
    local clients, codes = {}, {}
    for i = 1, 5 do clients[i] = assert(duplex.connect(srv:url("/"))) end
    local drained = run(function()
      for i, ws in ipairs(clients) do
        core.spawn(function() codes[i] = select(3, ws:receive(5)) end)
      end
      local ok = srv:shutdown(2)
      local t0 = core.now()
      while #codes < #clients and core.now() - t0 < 5 do core.sleep(0.01) end
      return ok
    end)
    servers = {}
    assert.is_true(drained)
    assert.same({ 1001, 1001, 1001, 1001, 1001 }, codes)
    local ws, err = duplex.connect(srv:url("/"))
    assert.is_nil(ws)
    assert.matches("refused", err)
  end)

  it("works over IPv6", function()
    local srv = listen { host = "::1", handler = echo }
    assert.matches("^ws://%[::1%]:", srv:url("/"))
    local ws = assert(duplex.connect(srv:url("/")))
    ws:send("v6")
    assert.equal("v6", (ws:receive(5)))
    assert.equal("::1", ws.remote_address)
    ws:close()
  end)

  it("names what failed when connecting", function()
    local srv = listen { handler = echo }
    local port = srv.port
    srv:shutdown(1)
    servers = {}
    local ws, err = duplex.connect("ws://127.0.0.1:" .. port .. "/")
    assert.is_nil(ws)
    assert.matches("refused", err)
    ws, err = duplex.connect("http//bad")
    assert.is_nil(ws)
    assert.matches("invalid URL", err)
  end)
end)

describe("limits and misbehaving peers", function()
  it("closes with 1009 when a message passes max_message", function()
    local srv = listen { max_message = 1000, handler = echo }
    local ws = assert(duplex.connect(srv:url("/")))
    ws:send(string.rep("a", 1000))
    assert.equal(1000, #ws:receive(5))
    ws:send(string.rep("a", 1001))
    local m, err, code, reason = ws:receive(5)
    assert.same({ nil, "closed", 1009 }, { m, err, code })
    assert.matches("too big", reason)
    -- and across fragments, where no single frame is too big
    ws = assert(duplex.connect(srv:url("/")))
    ws:send_fragment(string.rep("a", 600), "binary", false)
    ws:send_fragment(string.rep("a", 600), nil, true)
    assert.same({ nil, "closed", 1009, "message too big" }, { ws:receive(5) })
  end)

  it("drops a client that trickles its handshake (slowloris)", function()
    local srv = listen { handshake_timeout = 0.3, handler = echo }
    local t, err = run(function()
      local sock = assert(core.connect { host = "127.0.0.1", port = srv.port })
      local start = core.now()
      sock:write("GET / HTTP/1.1\r\n")
      local _, e
      for _ = 1, 20 do
        core.sleep(0.05)
        sock:write("X: y\r\n")
        _, e = sock:read(nil, 0.01)
        if e ~= "timeout" then break end
      end
      if e == "timeout" then _, e = sock:read(nil, 2) end
      return core.now() - start, e
    end)
    assert.equal("closed", err)
    assert.is_true(t < 1.5, "dropped after " .. t .. " s")
  end)

  it("opens callback connections with no coroutine each, however the request comes", function()
    local opened = 0
    local srv = listen {
      handshake_timeout = 0.5,
      on_message = function(ws, m, kind)
        if m == "hello" then opened = opened + 1 end
        ws:send(m, kind)
      end,
    }
    local request = core.handshake_client { host = "127.0.0.1", port = srv.port, target = "/" }:request()
    local hello = F.build { op = "text", payload = "hello", key = "abcd" }
    local results = run(function()
      local base = core.loop_stats().coroutines
      local out, socks = {}, {}
      -- whole, trickled a byte at a time, and with the first frame in the
      -- same write as the request
      for i = 1, 6 do
        local sock = assert(core.connect { host = "127.0.0.1", port = srv.port })
        if i % 3 == 1 then
          sock:write(request)
        elseif i % 3 == 2 then
          sock:write(request:sub(1, 20))
        else
          sock:write(request .. hello)
        end
        socks[i] = sock
      end
      core.sleep(0.05)
      -- two handshakes half read: no coroutine waits for them
      out.coroutines = core.loop_stats().coroutines - base
      for i = 2, 6, 3 do
        for b = 21, #request do
          socks[i]:write(request:sub(b, b))
          socks[i]:flush()
          if b % 16 == 0 then core.sleep(0.002) end
        end
      end
      for i, sock in ipairs(socks) do
        local got = ""
        repeat
          local d = assert(sock:read(nil, 2))
          got = got .. d
        until got:find("\r\n\r\n", 1, true)
        local rest = got:sub(got:find("\r\n\r\n", 1, true) + 4)
        if i % 3 ~= 0 then sock:write(hello) end
        while #rest < 7 do rest = rest .. assert(sock:read(nil, 2)) end
        out[i] = got:match("^HTTP/1.1 (%d+)") .. " " .. rest
      end
      -- a malformed request gets its 400, a silent one is dropped in time
      local bad = assert(core.connect { host = "127.0.0.1", port = srv.port })
      bad:write("GET / HTTP/1.1\r\nHost\r\n\r\n")
      out.bad = raw.read_all(bad, 2):match("^HTTP/1.1 (%d+)")
      local silent = assert(core.connect { host = "127.0.0.1", port = srv.port })
      local t0 = core.now()
      out.silent = select(2, raw.read_all(silent, 3))
      out.silent_after = core.now() - t0
      for _, sock in ipairs(socks) do sock:close() end
      return out
    end)
    for i = 1, 6 do assert.equal("101 " .. F.build { op = "text", payload = "hello" }, results[i]) end
    assert.equal(6, opened)
    -- the loop's coroutines: the spec's own and the expiry sweep's
    assert.is_true(results.coroutines <= 1, results.coroutines .. " more coroutines")
    assert.equal("400", results.bad)
    assert.equal("closed", results.silent)
    assert.is_true(results.silent_after < 1.5, "dropped after " .. results.silent_after .. " s")
    run(core.sleep, 0.1)
    assert.equal(0, srv.count)
  end)

  it("serves a client while a burst of silent handshakes waits, then drops them all in time", function()
    local srv = listen { handshake_timeout = 0.5, on_message = function(ws, m, k) ws:send(m, k) end }
    local got, count_while, count_after = run(function()
      local silent = {}
      for i = 1, 200 do silent[i] = assert(core.connect { host = "127.0.0.1", port = srv.port }) end
      silent[1]:write("GET / HTTP/1.1\r\n") -- and one that stops half way
      core.sleep(0.1)
      local n = srv.count
      local ws = assert(duplex.connect(srv:url("/"), { timeout = 2 }))
      ws:send("probe")
      local m = ws:receive(2)
      ws:close()
      core.sleep(1.2)
      for _, s in ipairs(silent) do s:close() end
      return m, n, srv.count
    end)
    assert.equal("probe", got)
    assert.equal(200, count_while)
    assert.equal(0, count_after)
  end)

  it("refuses connections past max_connections with 503", function()
    local srv = listen { max_connections = 2, handler = echo }
    local a = assert(duplex.connect(srv:url("/")))
    local b = assert(duplex.connect(srv:url("/")))
    local c, err = duplex.connect(srv:url("/"))
    assert.is_nil(c)
    assert.matches("503", err)
    a:close()
    run(core.sleep, 0.1)
    assert.is_truthy(duplex.connect(srv:url("/")))
    b:close()
  end)

  it("detects a dead peer with the heartbeat (ping_timeout)", function()
    local ended = {}
    local srv = listen { ping_interval = 0.2, ping_timeout = 0.3, handler = function(ws)
      local _, _, code, reason = ws:receive()
      ended.code, ended.reason = code, reason
    end }
    run(function()
      local sock = raw_upgrade(srv) -- never reads, never answers pings
      local start = core.now()
      while not ended.code and core.now() - start < 3 do core.sleep(0.05) end
      sock:close()
    end)
    assert.equal(1006, ended.code)
    assert.equal("ping timeout", ended.reason)
  end)

  it("keeps an idle connection alive with heartbeats on both sides", function()
    local srv = listen { ping_interval = 0.1, ping_timeout = 0.5, handler = echo }
    local ws = assert(duplex.connect(srv:url("/"), { ping_interval = 0.1, ping_timeout = 0.5 }))
    assert.same({ nil, "timeout" }, { ws:receive(1.0) })
    assert.equal("open", ws.state)
    assert.is_number(ws.latency)
    ws:send("alive")
    assert.equal("alive", (ws:receive(5)))
    ws:close()
  end)

  it("looks at an idle connection's clock when something is due, not on every tick", function()
    -- 200 idle connections with a 1 s heartbeat for 2.6 s, each keeping its
    -- clock on one loop timer: a sweep over all of them every 0.25 s would
    -- look 200 x 10 times; each is due only for its quiet-second shrink and
    -- its ping (whose pong does not come: nobody reads the clients)
    local n, served = 200, {}
    local srv = listen { ping_interval = 1, ping_timeout = 5, handler = function(ws)
      served[#served + 1] = ws
      return echo(ws)
    end }
    local conns = {}
    for i = 1, n do conns[i] = assert(duplex.connect(srv:url("/"), { ping_interval = 0 })) end
    while #served < n do duplex.sleep(0.01) end
    local before = core.loop_stats()
    assert.is_true(before.timers >= n, before.timers .. " timers for " .. n .. " connections")
    duplex.sleep(2.6)
    local fired = core.loop_stats().timers_fired - before.timers_fired
    for _, ws in ipairs(served) do
      assert.is_true(ws.engine:stats().frames_out >= 1, "a connection was not pinged")
    end
    assert.is_true(fired <= 4 * n, fired .. " timers fired for " .. n .. " idle connections in 2.6 s")
    for _, ws in ipairs(conns) do
      assert.equal("open", ws.state)
      ws:close()
    end
  end)

  it("drops the TCP connection when the peer never answers our close (close_timeout)", function()
    local result = {}
    local srv = listen { close_timeout = 0.3, handler = function(ws)
      local start = core.now()
      ws:close(1000)
      result.elapsed, result.code = core.now() - start, ws.close_code
    end }
    run(function()
      local sock = raw_upgrade(srv) -- reads but never sends a close frame
      local t0 = core.now()
      while not result.elapsed and core.now() - t0 < 3 do sock:read(nil, 0.05) end
      sock:close()
    end)
    assert.is_true(result.elapsed >= 0.25 and result.elapsed < 2, tostring(result.elapsed))
    assert.equal(1006, result.code)
  end)

  it("reports 1006 when the peer vanishes mid-frame or resets", function()
    local codes = {}
    local srv = listen { handler = function(ws)
      local _, _, code, reason = ws:receive()
      codes[#codes + 1] = { code, reason }
    end }
    run(function()
      local sock = raw_upgrade(srv)
      local frame = F.build { op = "text", payload = string.rep("x", 1000), key = "abcd" }
      sock:write(frame:sub(1, 300))
      sock:flush()
      core.sleep(0.05)
      sock:close()
      sock = raw_upgrade(srv)
      sock:write(frame:sub(1, 10))
      sock:flush()
      core.sleep(0.05)
      sock:close(true) -- RST
      local t0 = core.now()
      while #codes < 2 and core.now() - t0 < 3 do core.sleep(0.05) end
    end)
    assert.equal(2, #codes)
    assert.equal(1006, codes[1][1])
    assert.equal(1006, codes[2][1])
  end)

  it("makes send wait for a slow reader, then closes it past send_timeout", function()
    local result = {}
    local srv = listen { high_water = 64 << 10, low_water = 16 << 10, send_timeout = 0.5,
      handler = function(ws)
        local chunk = string.rep("z", 64 << 10)
        local sent = 0
        while true do
          local ok, err = ws:send(chunk, "binary")
          if not ok then result.err = err break end
          sent = sent + 1
          result.max_buffered = math.max(result.max_buffered or 0, ws:buffered())
        end
        result.sent = sent
        result.code = ws.close_code
      end }
    run(function()
      local sock = raw_upgrade(srv) -- stops reading after the handshake
      local t0 = core.now()
      while not result.err and core.now() - t0 < 10 do core.sleep(0.05) end
      sock:close()
    end)
    assert.equal("timeout", result.err)
    assert.is_true(result.sent > 0)
    -- what waited in our buffer stayed near the high-water mark
    assert.is_true(result.max_buffered <= (64 << 10) * 2 + 1024, tostring(result.max_buffered))
  end)

  it("closes a connection whose buffer passes max_buffered (broadcast without waiting)", function()
    local result = {}
    local srv = listen { max_buffered = 256 << 10, handler = function(ws)
      local frame = duplex.encode_frame(string.rep("b", 32 << 10), "binary")
      while ws.state == "open" do
        ws:send_frame(frame)
        result.peak = math.max(result.peak or 0, ws:buffered())
        core.sleep(0.001)
      end
      result.code, result.error = ws.close_code, ws.error
    end }
    run(function()
      local sock = raw_upgrade(srv) -- never reads
      local t0 = core.now()
      while not result.code and core.now() - t0 < 10 do core.sleep(0.05) end
      sock:close()
    end)
    assert.equal(1006, result.code)
    assert.matches("max_buffered", result.error)
    -- checked by the sweep (4 times a second), so it can overshoot a little
    assert.is_true(result.peak < 8 << 20, tostring(result.peak))
  end)
end)

describe("TLS", function()
  local c
  setup(function() c = certs.generate() end)
  teardown(function() c.cleanup() end)

  it("echoes large messages over wss intact (payloads queued by reference, written record by record)", function()
    local srv = listen { tls = { cert = c.cert, key = c.key }, handler = echo }
    local ws = assert(duplex.connect("wss://localhost:" .. srv.port .. "/", { tls = { ca = c.ca } }))
    local sent = {}
    for i, n in ipairs { 16 * 1024, 100000, 1 << 20, 17, 3 << 20 } do
      sent[i] = string.rep(string.char(64 + i), n - 4) .. string.format("%04d", i)
      assert(ws:send(sent[i], "binary"))
    end
    for i = 1, #sent do assert.equal(sent[i], (ws:receive(10))) end
    ws:close()
  end)

  it("serves wss with a certificate and verifies it on the client", function()
    local srv = listen { tls = { cert = c.cert, key = c.key }, handler = echo }
    assert.matches("^wss://", srv:url("/"))
    local url = "wss://localhost:" .. srv.port .. "/"
    local ws = assert(duplex.connect(url, { tls = { ca = c.ca } }))
    ws:send("secret")
    assert.equal("secret", (ws:receive(5)))
    ws:close()
    local bad, err = duplex.connect(url)
    assert.is_nil(bad)
    assert.matches("verify failed", err)
    bad, err = duplex.connect("wss://127.0.0.1:" .. srv.port .. "/",
      { tls = { ca = c.ca, servername = "wrong.example" } })
    assert.is_nil(bad)
    assert.matches("TLS handshake failed: certificate verify failed", err)
    local insecure = assert(duplex.connect(url, { tls = { verify = false } }))
    insecure:close()
  end)
end)
