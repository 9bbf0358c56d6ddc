-- TCP sockets on the event loop, over real loopback connections.
local core = require "duplex.core"

local run = require("support.loop").run

-- Open sockets of this process. Only sockets: something in the test process
-- (not duplex) now and then holds an extra descriptor of /dev/null for a
-- moment, which made a count of every descriptor flaky.
local function open_fds()
  local p = assert(io.popen("ls -l /proc/" .. core.getpid() .. "/fd | grep -c 'socket:'"))
  local n = tonumber(p:read("a"))
  p:close()
  return n
end

-- Read exactly n bytes (or until the peer closes).
local function read_n(s, n, timeout)
  local parts, got = {}, 0
  while got < n do
    local d, err = s:read(n - got, timeout)
    if not d then return table.concat(parts), err end
    parts[#parts + 1] = d
    got = got + #d
  end
  return table.concat(parts)
end

-- A listener whose accepted sockets are handed to handler(sock), each in
-- its own coroutine. Returns the listener and its port.
local function serve(host, handler)
  local l = assert(core.listen{host = host, port = 0})
  local _, port = l:address()
  core.spawn(function()
    while true do
      local s, err = l:accept()
      if not s then
        assert.equal("closed", err)
        return
      end
      core.spawn(handler, s)
    end
  end)
  return l, port
end

local function echo(s)
  while true do
    local d = s:read()
    if not d then break end
    s:write(d)
  end
  s:close()
end

-- Deterministic test data: n bytes that differ from any shifted copy.
local function pattern(n, seed)
  local parts, i = {}, 0
  while i < n do
    local piece = string.format("%08x:%d|", i, seed)
    parts[#parts + 1] = piece
    i = i + #piece
  end
  return table.concat(parts):sub(1, n)
end

describe("duplex.core sockets", function()
  local stats_before
  setup(function()
    -- what earlier spec files left to the loop (a reader in its last
    -- timeout, a socket waiting for its finalizer) ends first: the
    -- baseline is this file's
    require("duplex.runtime").blocking(core.sleep, 0.2)
    collectgarbage()
    collectgarbage()
    stats_before = core.loop_stats()
  end)

  -- the IPv4 text is ours (not inet_ntop): octets of one, two and three
  -- digits, zeros among them, from both ends of a connection
  it("names IPv4 addresses of every width", function()
    run(function()
      for _, host in ipairs({"127.0.0.1", "127.10.200.9", "127.254.99.100", "127.0.10.0"}) do
        local l = assert(core.listen{host = host, port = 0})
        local lhost, port = l:address()
        assert.equal(host, lhost)
        local c = assert(core.connect{host = host, port = port, timeout = 5})
        local s, ip = assert(l:accept())
        assert.equal(host, (c:peer()))
        assert.equal(host, (s:local_address()))
        assert.equal(select(2, c:local_address()), select(2, s:peer()))
        assert.equal(c:local_address(), ip)
        s:close()
        c:close()
        l:close()
      end
    end)
  end)

  for _, host in ipairs({"127.0.0.1", "::1"}) do
    it("echoes over " .. host, function()
      run(function()
        local l, port = serve(host, echo)
        local lhost = l:address()
        assert.equal(host, lhost)
        local c = assert(core.connect{host = host, port = port, timeout = 5})
        assert.equal(host, (c:peer()))
        assert.equal(port, select(2, c:peer()))
        assert.equal(host, (c:local_address()))
        assert.is_number(c:fd())
        assert.is_true(c:write("hello "))
        assert.is_true(c:write("world"))
        assert.equal(11, c:buffered())
        assert.is_true(c:flush(5))
        assert.equal(0, c:buffered())
        assert.equal("hello world", read_n(c, 11, 5))
        c:close()
        l:close()
      end)
    end)
  end

  it("connects to a host name without blocking the loop", function()
    run(function()
      local l, port = serve("127.0.0.1", echo)
      local c = assert(core.connect{host = "localhost", port = port, timeout = 5})
      c:write("x")
      assert.equal("x", c:read(nil, 5))
      c:close()
      l:close()
    end)
  end)

  it("resolves names in a worker thread while other coroutines run", function()
    local log = {}
    run(function()
      core.spawn(function() log[#log + 1] = "other" end)
      local addrs = assert(core.getaddrinfo("localhost", 8080))
      log[#log + 1] = "resolved"
      assert.is_true(#addrs >= 1)
      local seen = {}
      for _, a in ipairs(addrs) do
        assert.equal(8080, a.port)
        seen[a.addr] = a.family
      end
      assert.is_true(seen["127.0.0.1"] == "inet" or seen["::1"] == "inet6")
    end)
    assert.same({"other", "resolved"}, log)
  end)

  it("resolves numeric addresses anywhere and refuses names outside the loop", function()
    assert.same({{family = "inet6", addr = "::1", port = 80}}, core.getaddrinfo("::1", 80))
    assert.same({{family = "inet", addr = "10.1.2.3", port = 0}}, core.getaddrinfo("10.1.2.3"))
    assert.error_matches(function() core.getaddrinfo("localhost", 80) end, "must be called from a coroutine")
    run(function()
      local ok, err = core.getaddrinfo(string.rep("a", 300), 80)
      assert.is_nil(ok)
      assert.matches("^name resolution failed", err)
    end)
  end)

  it("moves several MiB both ways with backpressure", function()
    local size, chunk, low = 6 * 1024 * 1024, 64 * 1024, 256 * 1024
    local up, down = pattern(size, 1), pattern(size, 2)
    local got_up, got_down, max_buffered = nil, nil, 0
    run(function()
      local l, port = serve("127.0.0.1", function(s)
        -- send `down` while receiving `up`
        core.spawn(function()
          for i = 1, size, chunk do
            assert(s:write(down:sub(i, i + chunk - 1)))
            assert(s:drain(low, 10))
          end
          assert(s:flush(10))
        end)
        got_up = read_n(s, size, 10)
        s:write("done")
        s:flush()
      end)
      local c = assert(core.connect{host = "127.0.0.1", port = port})
      core.spawn(function()
        for i = 1, size, chunk do
          assert(c:write(up:sub(i, i + chunk - 1)))
          assert(c:drain(low, 10))
          max_buffered = math.max(max_buffered, c:buffered())
        end
      end)
      got_down = read_n(c, size, 10)
      assert.equal("done", read_n(c, 4, 10))
      c:close()
      l:close()
    end, 60)
    assert.equal(size, #got_up)
    assert.is_true(got_up == up, "upload corrupted")
    assert.equal(size, #got_down)
    assert.is_true(got_down == down, "download corrupted")
    assert.is_true(max_buffered <= low)
  end)

  it("times out reads, and the data still arrives afterwards", function()
    run(function()
      local l, port = serve("127.0.0.1", function(s)
        core.sleep(0.1)
        s:write("late")
        s:flush()
        s:read() -- until the client closes
        s:close()
      end)
      local c = assert(core.connect{host = "127.0.0.1", port = port})
      local t0 = core.now()
      local d, err = c:read(nil, 0.03)
      assert.is_nil(d)
      assert.equal("timeout", err)
      assert.is_true(core.now() - t0 >= 0.03)
      assert.equal("late", c:read(nil, 5))
      c:close()
      l:close()
    end)
  end)

  it("try_read takes what has come and never waits", function()
    run(function()
      local go = false
      local l, port = serve("127.0.0.1", function(s)
        while not go do core.sleep(0.01) end
        s:write("abcdef")
        s:flush()
        s:close()
      end)
      local c = assert(core.connect{host = "127.0.0.1", port = port})
      assert.same({ nil, "again" }, { c:try_read() })
      go = true
      local got = ""
      local t = core.now() + 5
      while #got < 6 and core.now() < t do
        local d, err = c:try_read(4)
        if d then
          assert.is_true(#d <= 4)
          got = got .. d
        else
          assert.equal("again", err)
          core.sleep(0.01)
        end
      end
      assert.equal("abcdef", got)
      local d, err
      repeat d, err = c:try_read(); core.sleep(0.01) until err ~= "again" or core.now() > t
      assert.is_nil(d)
      assert.equal("closed", err)
      assert.has_error(function() c:try_read(0) end)
      c:close()
      assert.same({ nil, "closed" }, { c:try_read() })
      l:close()
    end)
  end)

  it("take_request parses what has come of a request, however it is cut, and never waits", function()
    local request = "GET /chat?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" ..
      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    run(function()
      local pieces = {}
      local l, port = serve("127.0.0.1", function(s)
        while #pieces == 0 do core.sleep(0.01) end
        for _, piece in ipairs(pieces) do
          s:write(piece)
          s:flush()
          core.sleep(0.01)
        end
        s:read() -- until the client closes
        s:close()
      end)
      -- the request trickled in three pieces, the last with a frame behind it
      local c = assert(core.connect{host = "127.0.0.1", port = port})
      local hs = core.handshake_server()
      assert.same({ nil, "again" }, { c:take_request(hs) })
      pieces = { request:sub(1, 10), request:sub(11, 40), request:sub(41) .. "\x81\x00" }
      local req, err
      local t = core.now() + 5
      repeat
        req, err = c:take_request(hs)
        if not req then
          assert.equal("again", err)
          core.sleep(0.005)
        end
      until req or core.now() > t
      assert.equal("/chat", req.path)
      assert.equal("h", req.host)
      assert.equal("dGhlIHNhbXBsZSBub25jZQ==", req.key)
      assert.is_true(req.websocket)
      assert.equal("\x81\x00", hs:rest(), "what came after it is the parser's rest")
      c:close()
      assert.same({ nil, "closed" }, { c:take_request(core.handshake_server()) })
      l:close()
    end)
    run(function()
      -- a malformed request: its message and the status to answer it with;
      -- a peer gone before its request is whole: closed
      local l, port = serve("127.0.0.1", function(s)
        s:write("GET / HTTP/1.1\r\nHost h\r\n\r\n")
        s:flush()
        s:close()
      end)
      local c = assert(core.connect{host = "127.0.0.1", port = port})
      local req, err, status
      local t = core.now() + 5
      repeat req, err, status = c:take_request(core.handshake_server()); core.sleep(0.005)
      until err ~= "again" or core.now() > t
      assert.is_nil(req)
      assert.equal(400, status)
      assert.is_string(err)
      c:close()
      l:close()
      l, port = serve("127.0.0.1", function(s)
        s:write("GET / HTTP/1.1\r\nHo")
        s:flush()
        s:close()
      end)
      c = assert(core.connect{host = "127.0.0.1", port = port})
      local hs = core.handshake_server()
      repeat req, err, status = c:take_request(hs); core.sleep(0.005)
      until err ~= "again" or core.now() > t
      assert.same({ nil, "closed" }, { req, err, status })
      assert.has_error(function() c:take_request("not a parser") end)
      c:close()
      l:close()
    end)
  end)

  it("write_accept queues the bytes core.handshake_response makes, and nothing for bad options", function()
    local opts = { key = "dGhlIHNhbXBsZSBub25jZQ==", protocol = "chat",
      extensions = "permessage-deflate; server_no_context_takeover", headers = { ["X-Served-By"] = "a" } }
    run(function()
      local got = {}
      local l, port = serve("127.0.0.1", function(s)
        got[#got + 1] = read_n(s, #core.handshake_response(opts) * 2, 5)
        s:close()
      end)
      local c = assert(core.connect{host = "127.0.0.1", port = port})
      assert.same({ true }, { c:write_accept(opts) })
      for _, bad in ipairs { { key = "short" }, { key = opts.key, protocol = "a b" }, {} } do
        local ok, err = pcall(c.write_accept, c, bad)
        assert.is_false(ok)
        assert.equal(select(2, pcall(core.handshake_response, bad)), err, "the same refusal")
      end
      assert.equal(#core.handshake_response(opts), c:buffered(), "a refused build queues nothing")
      assert.same({ true }, { c:write_accept(opts) })
      assert(c:flush(5))
      local t = core.now() + 5
      while #got == 0 and core.now() < t do core.sleep(0.01) end
      assert.equal(core.handshake_response(opts):rep(2), got[1])
      c:close()
      assert.same({ nil, "closed" }, { c:write_accept(opts) })
      l:close()
    end)
  end)

  it("binds the local end, sets nodelay, and names failed lookups", function()
    run(function()
      local l, port = serve("127.0.0.1", echo)
      local c = assert(core.connect{host = "127.0.0.1", port = port, bind = "127.0.0.1", nodelay = false})
      assert.equal("127.0.0.1", (c:local_address()))
      assert.is_true(c:setnodelay(true))
      c:close()
      local _, err = core.connect{host = string.rep("a", 300), port = port}
      assert.matches("^name resolution failed: ", err)
      assert.error_matches(function() core.connect{host = "127.0.0.1"} end, "port")
      assert.error_matches(function() core.connect{host = "127.0.0.1", port = port, bind = "nope"} end, "bind")
      l:close()
    end)
  end)

  it("closes a to-be-closed socket in an orderly way, even on errors", function()
    run(function()
      local server_read
      local l, port = serve("127.0.0.1", function(s)
        server_read = {read_n(s, 4, 5)}
        server_read[3] = select(2, s:read(nil, 5))
        s:close()
      end)
      pcall(function()
        local c <close> = assert(core.connect{host = "127.0.0.1", port = port})
        c:write("last")
        error("leaving the scope")
      end)
      core.sleep(0.05)
      assert.same({"last", nil, "closed"}, server_read) -- FIN, not RST
      l:close()
    end)
  end)

  it("names a refused connection", function()
    run(function()
      local l = assert(core.listen{host = "127.0.0.1", port = 0})
      local _, port = l:address()
      l:close()
      local c, err = core.connect{host = "127.0.0.1", port = port, timeout = 5}
      assert.is_nil(c)
      assert.equal("connection refused", err)
    end)
  end)

  it("times out a connection attempt", function()
    run(function()
      -- a listener nobody accepts on: once its queue is full, the kernel
      -- drops new SYNs and connect() waits
      local l = assert(core.listen{host = "127.0.0.1", port = 0, backlog = 1})
      local _, port = l:address()
      local held, err = {}, nil
      for _ = 1, 8 do
        local c
        c, err = core.connect{host = "127.0.0.1", port = port, timeout = 0.2}
        if not c then break end
        held[#held + 1] = c
      end
      assert.equal("timeout", err)
      for _, c in ipairs(held) do c:close() end
      l:close()
    end)
  end)

  it("half-closes: the peer reads the end, then still answers", function()
    run(function()
      local server_saw
      local l, port = serve("127.0.0.1", function(s)
        local req = read_n(s, 3, 5)
        local d, err = s:read(nil, 5)
        server_saw = {req, d, err}
        s:write("response")
        s:close()
      end)
      local c = assert(core.connect{host = "127.0.0.1", port = port})
      c:write("req")
      assert.is_true(c:shutdown(5))
      local d, err = c:write("more")
      assert.is_nil(d)
      assert.equal("closed", err)
      assert.equal("response", read_n(c, 8, 5))
      assert.same({nil, "closed"}, {c:read(nil, 5)})
      assert.same({"req", nil, "closed"}, server_saw)
      c:close()
      l:close()
    end)
  end)

  it("resets the connection on an abortive close", function()
    run(function()
      local l, port = serve("127.0.0.1", function(s)
        s:read(nil, 5)
        s:close(true)
      end)
      local c = assert(core.connect{host = "127.0.0.1", port = port})
      c:write("hi")
      local d, err = c:read(nil, 5)
      assert.is_nil(d)
      assert.equal("connection reset", err)
      c:close()
      l:close()
    end)
  end)

  it("wakes waiters with 'closed' when a socket or listener is closed", function()
    run(function()
      local l, port = serve("127.0.0.1", function(s) s:read(nil, 5); s:close() end)
      local c = assert(core.connect{host = "127.0.0.1", port = port})
      local results = {}
      core.spawn(function() results.read = {c:read()} end)
      local l2 = assert(core.listen{host = "127.0.0.1", port = 0})
      core.spawn(function() results.accept = {l2:accept()} end)
      core.sleep(0.01)
      c:close()
      l2:close()
      core.sleep(0.01)
      assert.same({nil, "closed"}, results.read)
      assert.same({nil, "closed"}, results.accept)
      assert.same({nil, "closed"}, {c:write("x")})
      assert.same({nil, "closed"}, {c:read()})
      assert.same({nil, "closed"}, {c:fd()})
      assert.is_true(c:close()) -- again: harmless
      l:close()
    end)
  end)

  it("times out accept", function()
    run(function()
      local l = assert(core.listen{host = "127.0.0.1", port = 0})
      assert.same({nil, "timeout"}, {l:accept(0.02)})
      l:close()
    end)
  end)

  -- a listener, a client socket and the server's end of it
  local function connected_pair()
    local l = assert(core.listen{host = "127.0.0.1", port = 0})
    local _, port = l:address()
    local c = assert(core.connect{host = "127.0.0.1", port = port, timeout = 2})
    return l, c, assert(l:accept(2))
  end

  -- receive and pump check their socket against the methods' own class and
  -- their engine against the one attached: anything else still gets the
  -- named check's error
  it("checks what its methods are called on and with", function()
    run(function()
      local l, c, s = connected_pair()
      local e, other = core.engine{role = "server"}, core.engine{role = "server"}
      assert(s:attach(e))
      for _, bad in ipairs{e, l, {}, "x"} do
        assert.has_error(function() s.buffered(bad) end)
        assert.has_error(function() s.pump(bad, e) end)
        if bad ~= e then assert.has_error(function() s:pump(bad) end) end
      end
      assert.same({nil, "again"}, {s:pump(e)})
      assert.same({nil, "again"}, {s:pump(other)}) -- another engine is still an engine
      other:release()
      assert.error_matches(function() s:pump(other) end, "engine is released")
      e:release()
      assert.error_matches(function() s:pump(e) end, "engine is released")
      s:close(); c:close(); l:close()
    end)
  end)

  it("pump with on_message delivers every message it can in one call, then the first other event", function()
    run(function()
      local l, c, s = connected_pair()
      local e, peer = core.engine{role = "server"}, core.engine{role = "client"}
      assert(s:attach(e))
      local function write(...)
        for _, f in ipairs{...} do f() end
        assert(c:write(peer:data_to_send()))
        core.sleep(0.05)
      end
      local got = {}
      local function on_message(ws, data, kind) got[#got + 1] = { ws, data, kind } end
      write(function() peer:send("one", "text", true) end, function() peer:send("\0two", "binary", true) end,
        function() peer:ping("p") end, function() peer:send("three", "text", true) end)
      local me = {}
      assert.same({"ping", "p"}, {s:pump(e, nil, nil, on_message, me)})
      assert.same({ { me, "one", "text" }, { me, "\0two", "binary" } }, got)
      assert.same({nil, "again"}, {s:pump(e, nil, nil, on_message, me)})
      assert.equal(3, #got)
      assert.equal("three", got[3][2])
      -- an error in on_message ends this call with false and a traceback;
      -- what is left is delivered by the next call
      got = {}
      write(function() peer:send("bad", "text", true) end, function() peer:send("after", "text", true) end)
      local function fails_on_bad(_, data)
        if data == "bad" then error("no good") end
        got[#got + 1] = data
      end
      local ok, err = s:pump(e, nil, nil, fails_on_bad, me)
      assert.is_false(ok)
      assert.matches("no good", err)
      assert.matches("stack traceback:", err, 1, true)
      assert.same({nil, "again"}, {s:pump(e, nil, nil, fails_on_bad, me)})
      assert.same({ "after" }, got)
      assert.error_matches(function() s:pump(e, nil, nil, "not a function") end, "function expected")
      -- a callback that ends the connection ends the pumping
      write(function() peer:send("last", "text", true) end, function() peer:send("never", "text", true) end)
      got = {}
      assert.same({nil, "closed"}, {s:pump(e, nil, nil, function(_, data)
        got[#got + 1] = data
        e:release()
      end, me)})
      assert.same({ "last" }, got)
      s:close(); c:close(); l:close()
    end)
  end)

  it("serves a watcher's sockets from C: each connection pumped, other events handed on, failures named", function()
    run(function()
      local w = core.watcher()
      local server = { connections = {} }
      local pairs_ = {}
      for i = 1, 2 do
        local l, c, s = connected_pair()
        local e, peer = core.engine{role = "server"}, core.engine{role = "client"}
        assert(s:attach(e))
        local ws = { sock = s, engine = e, name = "ws" .. i }
        server.connections[s] = ws
        assert(s:watch(w))
        pairs_[i] = { l = l, c = c, peer = peer, ws = ws }
      end
      local got, events = {}, {}
      local function on_message(ws, data) got[#got + 1] = ws.name .. ":" .. data end
      local function pump(ws) return ws.sock:pump(ws.engine, nil, nil, on_message, ws) end
      local function after(ws, kind, data)
        events[#events + 1] = ws.name .. ":" .. tostring(kind) .. ":" .. tostring(data)
        if data == "boom" then error("after failed") end
        return kind == "ping" -- go on pumping after a ping
      end
      local function write(i, ...)
        local p = pairs_[i]
        for _, f in ipairs{...} do f(p.peer) end
        assert(p.c:write(p.peer:data_to_send()))
      end
      local results
      core.spawn(function()
        results = {}
        while true do
          local r = table.pack(w:serve(server, pump, after))
          results[#results + 1] = r
          if r[1] == nil then return end
        end
      end)
      write(1, function(p) p:send("a", "text", true) end, function(p) p:ping("x") end,
        function(p) p:send("b", "text", true) end)
      write(2, function(p) p:send("c", "text", true) end)
      core.sleep(0.1)
      table.sort(got)
      assert.same({ "ws1:a", "ws1:b", "ws2:c" }, got)
      assert.same({ "ws1:ping:x" }, events)
      -- the server may replace its table: each socket's connection is read anew
      local old = server.connections
      server.connections = {}
      for sock, ws in pairs(old) do server.connections[sock] = ws end
      write(2, function(p) p:send("d", "text", true) end)
      core.sleep(0.1)
      assert.equal("ws2:d", got[4])
      -- a failure in after ends that serve with the connection it was for
      write(1, function(p) p:ping("boom") end)
      core.sleep(0.1)
      assert.equal(false, results[1][1])
      assert.matches("after failed", results[1][2])
      assert.matches("stack traceback:", results[1][2], 1, true)
      assert.equal(pairs_[1].ws, results[1][3])
      -- and the next one goes on; a socket of no connection is passed over
      server.connections[pairs_[2].ws.sock] = nil
      write(2, function(p) p:send("unseen", "text", true) end)
      write(1, function(p) p:send("e", "text", true) end)
      core.sleep(0.1)
      assert.equal("ws1:e", got[5])
      assert.is_nil(got[6])
      w:close()
      core.sleep(0.05)
      assert.equal(2, #results)
      assert.is_nil(results[2][1])
      assert.has_error(function() w:serve({}, pump) end)
      for _, p in ipairs(pairs_) do p.ws.sock:close(); p.c:close(); p.l:close() end
    end)
  end)

  -- a pump leaves the rest of a read in the loop's shared buffer while
  -- on_message runs: a read of another socket there must not clobber it
  it("pump keeps the rest of a read intact when on_message reads another socket", function()
    run(function()
      local la, ca, sa = connected_pair()
      local lb, cb, sb = connected_pair()
      local e, peer = core.engine{role = "server"}, core.engine{role = "client"}
      assert(sa:attach(e))
      local sent = {}
      for i = 1, 4 do
        sent[i] = ("%d:"):format(i) .. pattern(3000, i)
        assert(peer:send(sent[i], "binary", true))
      end
      assert(ca:write(peer:data_to_send())) -- one write: one read holds them all
      assert(cb:write(("b"):rep(5000)))
      core.sleep(0.05)
      local got, other = {}, nil
      local function on_message(_, data)
        got[#got + 1] = data
        if #got == 1 then other = assert(sb:read(65536)) end
      end
      assert.same({nil, "again"}, {sa:pump(e, nil, nil, on_message, {})})
      assert.equal(("b"):rep(5000), other)
      assert.equal(4, #got)
      for i = 1, 4 do assert(got[i] == sent[i], "message " .. i .. " differs") end
      -- a pump that stops at another event keeps the rest at once: the
      -- engine may be gone before the next read into the shared buffer
      assert(peer:ping("p"))
      assert(peer:send(sent[1], "binary", true))
      assert(ca:write(peer:data_to_send()))
      assert(cb:write("more"))
      core.sleep(0.05)
      assert.same({"ping", "p"}, {sa:pump(e, nil, nil, on_message, {})})
      assert(sa:attach(nil))
      e:release()
      e = nil -- luacheck: ignore
      collectgarbage()
      collectgarbage()
      assert.equal("more", assert(sb:read(65536)))
      for _, x in ipairs{sa, ca, la, sb, cb, lb} do x:close() end
    end)
  end)

  it("refuses blocking socket calls outside a loop coroutine", function()
    local l = assert(core.listen{host = "127.0.0.1", port = 0})
    assert.error_matches(function() l:accept() end, "must be called from a coroutine started by duplex.spawn")
    assert.error_matches(function() core.connect{host = "127.0.0.1", port = 1} end, "must be called from a coroutine")
    l:close()
  end)

  it("reports listen errors", function()
    local l = assert(core.listen{host = "127.0.0.1", port = 0})
    local _, port = l:address()
    local l2, err = core.listen{host = "127.0.0.1", port = port}
    assert.is_nil(l2)
    assert.equal("address already in use", err)
    l:close()
    assert.error_matches(function() core.listen{host = "127.0.0.1", port = 70000} end, "port")
  end)

  it("serves 2,000 concurrent connections and leaks nothing", function()
    collectgarbage()
    local fds0, stats0 = open_fds(), core.loop_stats()
    local n, ok = 2000, 0
    run(function()
      local l = assert(core.listen{host = "127.0.0.1", port = 0, backlog = 4096})
      local _, port = l:address()
      core.spawn(function()
        while true do
          local s = l:accept()
          if not s then return end
          core.spawn(echo, s)
        end
      end)
      local left = n
      local me = coroutine.running()
      for i = 1, n do
        core.spawn(function()
          local c = assert(core.connect{host = "127.0.0.1", port = port, timeout = 30})
          local msg = "hello " .. i .. "\n"
          c:write(msg)
          if read_n(c, #msg, 30) == msg then ok = ok + 1 end
          c:close()
          left = left - 1
          if left == 0 then core.wake(me) end
        end)
      end
      core.park(60)
      l:close()
      core.sleep(0.05) -- let the server side see the ends
    end, 90)
    assert.equal(n, ok)
    collectgarbage()
    collectgarbage()
    local stats = core.loop_stats()
    assert.equal(stats0.sockets, stats.sockets)
    assert.equal(stats0.coroutines, stats.coroutines)
    assert.equal(stats0.timers, stats.timers)
    assert.equal(stats0.fds, stats.fds)
    assert.equal(fds0, open_fds())
  end)

  describe("with an engine", function()
    it("feeds received bytes to the engine until it has an event, and returns it", function()
      run(function()
        local server_got
        local l, port = serve("127.0.0.1", function(s)
          local e = core.engine{role = "server"}
          server_got = {s:receive(e, 5)}
          s:close()
        end)
        local c = assert(core.connect{host = "127.0.0.1", port = port})
        local ec = core.engine{role = "client"}
        assert(ec:send("hello"))
        local frame = ec:data_to_send()
        -- a frame in two pieces: receive must read on until it is whole
        c:write(frame:sub(1, 4))
        c:flush()
        core.sleep(0.02)
        c:write(frame:sub(5))
        assert.same({nil, "closed"}, {c:read(nil, 5)})
        assert.same({"text", "hello"}, server_got)
        c:close()
        l:close()
      end)
    end)

    it("writes the socket's own bytes first, then the engine's, without a socket write", function()
      run(function()
        local l, port = serve("127.0.0.1", function(s)
          local e = core.engine{role = "server"}
          assert.is_true(s:attach(e))
          s:write("prefix;")
          assert(e:send("reply"))
          assert.equal(7 + 7, s:buffered())
          s:read(nil, 5) -- the loop flushes both on its own
          s:close()
        end)
        local c = assert(core.connect{host = "127.0.0.1", port = port})
        assert.equal("prefix;\x81\x05reply", read_n(c, 14, 5))
        -- engine output alone (no s:write) is flushed too
        c:close()
        l:close()
      end)
    end)

    it("carries a message exchange and the closing handshake with attached engines", function()
      run(function()
        local l, port = serve("127.0.0.1", function(s)
          local e = core.engine{role = "server"}
          s:attach(e)
          while true do
            local kind, data = s:receive(e, 5)
            if not kind then break end
            if kind == "text" then assert(e:send(data:upper())) end
            if e:state() == "closed" then break end
          end
          assert(s:flush(5))
          s:close()
        end)
        local c = assert(core.connect{host = "127.0.0.1", port = port})
        local e = core.engine{role = "client"}
        c:attach(e)
        local replies = {}
        for i = 1, 3 do
          assert(e:send("msg" .. i))
          local kind, data = assert(c:receive(e, 5))
          replies[#replies + 1] = kind .. ":" .. data
        end
        assert.same({"text:MSG1", "text:MSG2", "text:MSG3"}, replies)
        assert(e:close(1000))
        assert.equal("close", (c:receive(e, 5)))
        c:close()
        l:close()
      end)
    end)

    it("unhooks the engine when the socket is closed or collected", function()
      local e = core.engine{role = "server"}
      local sockets0 = core.loop_stats().sockets
      run(function()
        local l = assert(core.listen{host = "127.0.0.1", port = 0})
        local _, port = l:address()
        core.spawn(function()
          local s = l:accept()
          s:attach(e)
          s:close()
        end)
        local c = assert(core.connect{host = "127.0.0.1", port = port})
        c:read(nil, 5)
        c:close()
        l:close()
      end)
      collectgarbage()
      collectgarbage()
      -- with a dangling output hook this would write to a freed socket
      assert(e:send("after"))
      assert.equal(sockets0, core.loop_stats().sockets)
    end)
  end)

  it("leaves the loop as it found it", function()
    collectgarbage()
    collectgarbage()
    local stats = core.loop_stats()
    assert.equal(stats_before.sockets, stats.sockets)
    assert.equal(stats_before.coroutines, stats.coroutines)
    assert.equal(0, stats.timers)
  end)
end)
