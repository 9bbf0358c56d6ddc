-- duplex inside a cqueues controller (Debian lua-cqueues): server and client
-- on cqueues sockets beside other cqueues work, and against other peers.
local cqueues = require "cqueues"
local dcq = require "duplex.cqueues"
local core = require "duplex.core"
local proc = require "support.proc"
local peers = require "support.peers"

-- Run fn in a fresh controller with a ticker beside it; returns fn's results
-- and how often the ticker ran (a blocked controller would not tick).
local function in_controller(fn, ...)
  local cq = cqueues.new()
  local args, result, ticks, done = table.pack(...), nil, 0, false
  cq:wrap(function()
    while not done do cqueues.sleep(0.01); ticks = ticks + 1 end
  end)
  cq:wrap(function()
    result = table.pack(pcall(fn, cq, table.unpack(args, 1, args.n)))
    done = true
  end)
  local ok, err = cq:loop(60)
  assert(ok, err)
  assert(result, "the controller stopped before the test was done")
  assert(result[1], result[2])
  return ticks, table.unpack(result, 2, result.n)
end

local function echo_handler(ws)
  for message, kind in ws:messages() do ws:send(message, kind) end
end

describe("duplex in cqueues", function()
  teardown(proc.killall)

  it("runs server and client in one controller, beside other work", function()
    local ticks, latency, code = in_controller(function(cq)
      local srv = assert(dcq.listen(cq, { port = 0, deflate = true, ping_interval = 0.2, handler = echo_handler }))
      local ws = assert(dcq.connect(srv.url("/"), { deflate = true }))
      assert.matches("^permessage%-deflate", ws.extensions)
      for _, size in ipairs { 0, 10, 125, 126, 65535, 65536, 1000000 } do
        local msg = ("x"):rep(size)
        assert(ws:send(msg, "binary"))
        local got, kind = ws:receive(5)
        assert.equal("binary", kind)
        assert.equal(size, #got)
      end
      assert(ws:send("grüße"))
      assert.same({ "grüße", "text" }, { ws:receive(5) })
      -- idle: the server's heartbeat pings, our reader answers on its own
      assert.same({ nil, "timeout" }, { ws:receive(0.6) })
      assert(ws:ping())
      assert.same({ nil, "timeout" }, { ws:receive(0.1) })
      assert(ws:close(1000, "bye"))
      srv.close()
      return ws.latency, ws.close_code
    end)
    assert.is_number(latency)
    assert.equal(1000, code)
    assert.is_true(ticks > 50, "the other work did not run: " .. ticks)
  end)

  it("runs a callback route (on_open, on_message, on_close) as duplex.listen does", function()
    local closed
    in_controller(function(cq)
      local srv = assert(dcq.listen(cq, { port = 0,
        on_open = function(ws, req) ws:send("hi " .. req.path) end,
        on_message = function(ws, m) if m == "boom" then error("kaboom") end ws:send("re " .. m) end,
        on_close = function(_, code) closed = code end }))
      local ws = assert(dcq.connect(srv.url("/cb")))
      assert.equal("hi /cb", (ws:receive(5)))
      assert(ws:send("x"))
      assert.equal("re x", (ws:receive(5)))
      assert(ws:send("boom"))
      assert.same({ nil, "closed", 1011, "internal error" }, { ws:receive(5) })
      cqueues.sleep(0.1)
      srv.close()
    end)
    assert.equal(1011, closed)
  end)

  it("drops a peer that stops answering pings, and refuses a foreign origin", function()
    in_controller(function(cq)
      local srv = assert(dcq.listen(cq, { port = 0, ping_interval = 0.2, ping_timeout = 0.2,
        origins = { "https://good.example" }, handler = echo_handler }))
      local csocket = require "cqueues.socket"
      local sock = csocket.connect { host = "127.0.0.1", port = srv.port() }
      local stream = dcq.stream(sock)
      assert(stream:write("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        .. "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        .. "Origin: https://evil.example\r\n\r\n", 5))
      local reply = stream:read(4096, 5)
      assert.matches("^HTTP/1%.1 403", reply)
      stream:close()
      -- a client that never reads (so never answers a ping)
      local ws = assert(dcq.connect(srv.url("/"), { origin = "https://good.example", ping_interval = 0 }))
      cqueues.sleep(1)
      assert.equal("open", ws.state) -- nobody read, so nothing noticed yet
      local m, err, code = ws:receive(5)
      assert.is_nil(m)
      assert.equal("closed", err)
      assert.equal(1006, code) -- the server dropped the TCP connection
      srv.close()
    end)
  end)

  it("client: talks to python3-websockets with permessage-deflate", function()
    local srv = peers.py_echo_server { deflate = true }
    in_controller(function()
      local ws = assert(dcq.connect(srv.url, { deflate = true }))
      assert.matches("permessage%-deflate", ws.extensions)
      local blob = core.random(50000)
      assert(ws:send(blob, "binary"))
      assert.same({ blob, "binary" }, { ws:receive(5) })
      assert(ws:close())
      assert.equal(1000, ws.close_code)
    end)
    assert.equal(0, srv:stop())
  end)

  it("server: serves python3-websockets and node's ws (examples/cqueues/echo.lua)", function()
    local h = proc.spawn({ "lua5.4", "examples/cqueues/echo.lua", "--port", "0", "--deflate",
      "--ping-interval", "0.5" }, { cwd = peers.root, limit = 120 })
    local line = h:read_line(10)
    local url = line and line:match("listening on (ws://%S+)$")
    assert(url, "no URL: " .. tostring(line) .. h:output())
    local code, res = peers.py_client(url, { deflate = true, count = 20, size = 3000, fragment = true })
    assert.equal(0, code, res.error or res.stderr)
    assert.matches("permessage%-deflate", res.extensions)
    code, res = peers.node_client(url, { deflate = true, count = 20, size = 100000 })
    assert.equal(0, code, res.error or res.stderr)
    h:kill("TERM")
    h:wait(5)
    h:cleanup()
  end)
  it("reads a client that floods messages in turns: the others and the controller go on", function()
    local examples = require "support.examples"
    local ticks, served, flooding = in_controller(function(cq)
      -- probes get an echo; the flood is only read (nothing blocks on it)
      local srv = assert(dcq.listen(cq, { port = 0, handler = function(ws)
        for m in ws:messages() do
          if m:match("^probe") then ws:send(m) end
        end
      end }))
      local flood = examples.spawn({ examples.LUA, "spec/support/flood.lua", srv.port(), "push", 1, 16 })
      -- the flooder's handshake needs the controller: wait for its line there
      local line
      for _ = 1, 500 do
        line = flood:read_line(0)
        if line then break end
        cqueues.sleep(0.02)
      end
      assert.equal("flooding", line)
      cqueues.sleep(0.5)
      local ws = assert(dcq.connect(srv.url("/")))
      local n = 0
      for i = 1, 20 do
        assert(ws:send("probe " .. i))
        assert.equal("probe " .. i, (ws:receive(10)), "the probe was not served during the flood")
        n = n + 1
      end
      local running = flood:running()
      ws:close()
      flood:cleanup()
      srv.close()
      return n, running
    end)
    assert.equal(20, served)
    assert.is_true(flooding, "the flooder was cut off")
    assert.is_true(ticks > 20, "the controller's other work did not run: " .. ticks)
  end)
end)
