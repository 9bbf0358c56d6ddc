-- Interoperability with WebSocket implementations nobody here wrote: the
-- node `ws` package and Debian's python3-websockets (programs in interop/),
-- in both directions, plain and with permessage-deflate, down every close
-- path.
--
-- duplex's server runs in this process (so the ASan run covers it) while a
-- reference client runs as a child; duplex's client talks to reference
-- servers running as children.
local proc = require "support.proc"
local peers = require "support.peers"

local connect, listen = require("support.tracked").install(after_each, teardown)

local CLIENTS = {
  node = {peers.node, "ws_client.js"},
  python = {peers.python, "py_client.py"},
}
local SERVERS = {node = peers.node_echo_server, python = peers.py_echo_server}

local wait_for = require("support.loop").wait_for

-- Run a reference client (see interop/ws_client.js) against url while the
-- loop keeps running; returns its exit status and decoded JSON summary.
local function run_client(kind, url, opts)
  local argv = {CLIENTS[kind][1], CLIENTS[kind][2], url}
  for _, a in ipairs(peers.args(opts)) do argv[#argv + 1] = a end
  local timeout = (opts and opts.timeout) or 20
  local h = proc.spawn(argv, {env = peers.env, cwd = peers.interop, limit = timeout + 20})
  wait_for(function() return not h:running() end, timeout + 10)
  local code, out, err = h:exit_code(), h:stdout(), h:stderr()
  h:cleanup(1)
  local ok, res = pcall(peers.json_decode, out:match("([^\n]*)\n?$") or "")
  if not ok or type(res) ~= "table" then res = {ok = false, error = "no JSON summary", stdout = out} end
  res.stderr = err
  return code, res
end

local function describe_result(code, res)
  return string.format("exit %s, error %s\nstdout: %s\nstderr: %s", tostring(code),
    tostring(res.error), tostring(res.stdout or ""), tostring(res.stderr))
end

-- An in-process duplex echo server that records, per connection, what its
-- handler saw.
local function echo_server(opts)
  local conns = {}
  local o = {host = "127.0.0.1", port = 0, ping_interval = 0, log = function() end}
  for k, v in pairs(opts or {}) do o[k] = v end
  o.handler = function(ws)
    local c = {messages = 0, text = 0, binary = 0, deflate = ws.deflate, extensions = ws.extensions}
    conns[#conns + 1] = c
    for message, kind in ws:messages() do
      c.messages = c.messages + 1
      c[kind] = c[kind] + 1
      if not ws:send(message, kind) then break end
    end
    c.close_code, c.close_reason, c.done = ws.close_code, ws.close_reason, true
  end
  local srv = listen(o)
  return srv, conns
end

-- The server's record of connection i, once its handler has returned.
local function finished(conns, i)
  assert.is_true(wait_for(function() return conns[i] and conns[i].done end, 5),
    "the server handler did not finish")
  return conns[i]
end

local UTF8 = "héllo wörld — ✓ € 😀 𝄞 日本語"

describe("reference clients against a duplex server", function()
  teardown(proc.killall)

  for _, kind in ipairs({"node", "python"}) do
    for _, deflate in ipairs({false, true}) do
      local label = kind .. (deflate and " (permessage-deflate)" or " (plain)")

      describe(label, function()
        local srv, conns, small, small_conns
        setup(function()
          srv, conns = echo_server({deflate = deflate})
          small, small_conns = echo_server({deflate = deflate, max_message = 16 << 10})
        end)
        teardown(function()
          if srv then srv:shutdown(1) end
          if small then small:shutdown(1) end
        end)

        local function expect_extensions(res, c)
          if deflate then
            assert.equal("permessage-deflate", res.extensions)
            assert.is_true(c.deflate)
            assert.matches("^permessage%-deflate", c.extensions)
          else
            assert.equal("", res.extensions)
            assert.is_false(c.deflate)
            assert.is_nil(c.extensions)
          end
        end

        it("echoes multi-byte UTF-8 text and binary, answers a ping and closes with 1000", function()
          local n = #conns + 1
          local code, res = run_client(kind, srv:url(), {
            deflate = deflate, count = 10, size = 300,
            "--send-text", UTF8, "--send-binary-hex", "00ff80c0fe0d0a",
            "--send-text", "", "--send-binary-hex", "",
          })
          assert.equal(0, code, describe_result(code, res))
          assert.is_true(res.ok)
          assert.equal(14, res.received)
          assert.equal(1000, res.close_code)
          local c = finished(conns, n)
          expect_extensions(res, c)
          assert.equal(14, c.messages)
          assert.equal(7, c.text)
          assert.equal(7, c.binary)
          assert.equal(1000, c.close_code)
        end)

        it("echoes 1 MiB text and binary messages", function()
          local n = #conns + 1
          local code, res = run_client(kind, srv:url(), {deflate = deflate, count = 2, size = 1 << 20})
          assert.equal(0, code, describe_result(code, res))
          assert.equal(2, res.received)
          local c = finished(conns, n)
          expect_extensions(res, c)
          assert.equal(1, c.text)
          assert.equal(1, c.binary)
          assert.equal(1000, c.close_code)
        end)

        it("reassembles fragmented messages" .. (kind == "node" and ", text cut inside UTF-8 sequences" or ""),
          function()
            local n = #conns + 1
            local code, res = run_client(kind, srv:url(), {
              deflate = deflate, fragment = true, count = 8, size = 3000, "--send-text", UTF8,
            })
            assert.equal(0, code, describe_result(code, res))
            assert.equal(9, res.received)
            local c = finished(conns, n)
            assert.equal(9, c.messages)
            assert.equal(5, c.text)
            assert.equal(1000, c.close_code)
          end)

        -- 4 MiB: the client is still sending when the server gives up on
        -- the message, and must still see the close frame.
        it("closes with 1009 on a message over max_message", function()
          local n = #small_conns + 1
          local code, res = run_client(kind, small:url(), {
            deflate = deflate, expect_close = 1009, count = 1, size = 4 << 20, "--send-text", "fits",
          })
          assert.equal(0, code, describe_result(code, res))
          assert.equal(1, res.received)
          assert.equal(1009, res.close_code)
          local c = finished(small_conns, n)
          assert.equal(1, c.messages)
          assert.equal(1009, c.close_code)
        end)
      end)
    end
  end

  it("a client that vanishes is reported as 1006 on the server", function()
    local srv, conns = echo_server()
    -- A ws client that opens, says it did, and then waits to be killed.
    local h = proc.spawn({peers.node, "-e", [[
      const W = require('ws'); const w = new W(process.argv[1]);
      w.on('open', () => { w.send('hi'); });
      w.on('message', (m) => console.log('GOT ' + m));
      setInterval(() => {}, 1000);
    ]], srv:url()}, {env = peers.env, cwd = peers.interop, limit = 30})
    local line
    wait_for(function()
      line = line or h:read_line(0)
      return line or not h:running()
    end, 10)
    assert.equal("GOT hi", line, h:output())
    assert.equal(1, #conns)
    assert.is_nil(conns[1].done)
    h:kill("KILL")
    h:wait(5)
    local c = finished(conns, 1)
    assert.equal(1, c.messages)
    assert.equal(1006, c.close_code)
    assert.matches("without a closing handshake", c.close_reason)
    h:cleanup()
    srv:shutdown(1)
  end)
end)

-- Receive with a deadline; fails the test rather than hang.
local function recv(ws, timeout)
  local m, kind, code, reason = ws:receive(timeout or 10)
  assert.is_not.equal("timeout", kind, "no message within the deadline")
  return m, kind, code, reason
end

local function echo(ws, data, kind)
  assert(ws:send(data, kind))
  local m, k = recv(ws)
  assert.equal(kind or "text", k)
  assert.equal(#data, #m)
  assert.is_true(m == data, "the echo differs from what was sent")
end

-- The reference server logs a connection's end when it has processed it,
-- which may be a moment after our side is done: wait for the line.
local function expect_logged(srv, text)
  local deadline = proc.now() + 5
  while not srv:output():find(text, 1, true) and proc.now() < deadline do proc.sleep(0.02) end
  assert.matches(text, srv:output(), 1, true)
end

local function random_bytes(n)
  local t = {}
  for i = 1, n // 4 do t[i] = string.pack("<I4", math.random(0, 0xffffffff)) end
  return table.concat(t) .. string.rep("\0", n % 4)
end

describe("the duplex client against reference servers", function()
  teardown(proc.killall)

  for _, kind in ipairs({"node", "python"}) do
    local start = SERVERS[kind]

    describe(kind, function()
      for _, deflate in ipairs({false, true}) do
        it("exchanges text, binary, 1 MiB and fragmented messages and measures a ping" ..
          (deflate and " with permessage-deflate" or ""), function()
            local srv = start({deflate = deflate})
            local ws = assert(connect(srv.url, {deflate = deflate}))
            assert.equal(deflate, ws.deflate)
            if deflate then
              assert.matches("^permessage%-deflate", ws.extensions)
            else
              assert.is_nil(ws.extensions)
            end
            echo(ws, UTF8)
            echo(ws, "\0\255\128binary\192", "binary")
            echo(ws, "")
            echo(ws, string.rep("compressible text 123 ", 50000))
            echo(ws, random_bytes(1 << 20), "binary")
            echo(ws, string.rep("é", 1 << 19)) -- 1 MiB of 2-byte characters

            -- Fragmented, cut inside a UTF-8 sequence ("é" is C3 A9).
            assert(ws:send_fragment("h\xC3", "text", false))
            assert(ws:send_fragment("\xA9llo ", "text", false))
            assert(ws:send_fragment("wörld", "text", true))
            local m, k = recv(ws)
            assert.equal("héllo wörld", m)
            assert.equal("text", k)
            local parts = {}
            for i = 1, 5 do parts[i] = random_bytes(100 << 10) end
            for i = 1, 5 do assert(ws:send_fragment(parts[i], "binary", i == 5)) end
            m, k = recv(ws)
            assert.equal("binary", k)
            assert.is_true(m == table.concat(parts))

            local pong
            ws.on_pong = function(_, payload) pong = payload end
            assert(ws:ping("are you there"))
            echo(ws, "after the ping") -- the pong comes back before the echo
            assert.equal("are you there", pong)
            assert.is_number(ws.latency)
            assert.is_true(ws.latency >= 0)

            assert.is_true(ws:close())
            assert.equal(1000, ws.close_code)
            expect_logged(srv, "close 1 1000  messages=9")
            if kind == "node" then expect_logged(srv, "ping 1 13") end
            if deflate then expect_logged(srv, "extensions=permessage-deflate") end
            assert.equal(0, srv:stop())
          end)
      end

      it("negotiates the subprotocol the server selects, and none when it selects none", function()
        local srv = start({protocol = "chat.v2"})
        local ws = assert(connect(srv.url, {protocols = {"chat.v1", "chat.v2"}}))
        assert.equal("chat.v2", ws.protocol)
        echo(ws, "with a subprotocol")
        ws:close()
        srv:stop()
        srv = start()
        ws = assert(connect(srv.url, {protocols = {"chat.v1", "chat.v2"}}))
        assert.is_nil(ws.protocol)
        ws:close()
        srv:stop()
      end)

      it("reports the server's custom close code and reason", function()
        local srv = start({close_code = 4001, close_reason = "bye now"})
        local ws = assert(connect(srv.url))
        echo(ws, "first")
        local m, err, code, reason = recv(ws)
        assert.is_nil(m)
        assert.equal("closed", err)
        assert.equal(4001, code)
        assert.equal("bye now", reason)
        assert.equal(4001, ws.close_code)
        assert.same({nil, "closed"}, {ws:send("too late")})
        srv:stop()
      end)

      it("reports 1009 when a message is over the server's limit", function()
        local srv = start({max_payload = 1000})
        local ws = assert(connect(srv.url))
        echo(ws, string.rep("x", 1000))
        assert(ws:send(string.rep("y", 5000)))
        local m, err, code = recv(ws)
        assert.is_nil(m)
        assert.equal("closed", err)
        assert.equal(1009, code)
        srv:stop()
      end)

      it("reports 1009 for a compressed message that inflates past the server's limit", function()
        local srv = start({deflate = true, max_payload = 10000})
        local ws = assert(connect(srv.url, {deflate = true}))
        echo(ws, string.rep("z", 10000))
        assert(ws:send(string.rep("z", 100000))) -- a few hundred bytes on the wire
        local m, err, code = recv(ws)
        assert.is_nil(m)
        assert.equal("closed", err)
        assert.equal(1009, code)
        srv:stop()
      end)

      local combos = {
        {offer = true, expect = "permessage%-deflate"},
        {offer = {client_max_window_bits = true}, expect = "permessage%-deflate"},
        {offer = {server_no_context_takeover = true, client_no_context_takeover = true},
          expect = "server_no_context_takeover"},
        {offer = {server_max_window_bits = 10}, expect = "server_max_window_bits=10"},
      }
      for i, combo in ipairs(combos) do
        it("negotiates permessage-deflate, offer " .. i .. ", and exchanges compressed messages", function()
          local srv = start({deflate = true})
          local ws = assert(connect(srv.url, {deflate = combo.offer}))
          assert.is_true(ws.deflate)
          assert.matches(combo.expect, ws.extensions)
          if type(combo.offer) == "table" and combo.offer.client_no_context_takeover then
            assert.matches("client_no_context_takeover", ws.extensions)
          end
          -- Repeats test the sliding window across messages (context takeover).
          local text = string.rep("the same words again and again ", 2000)
          for _ = 1, 4 do echo(ws, text) end
          echo(ws, random_bytes(300 << 10), "binary")
          echo(ws, UTF8, "text")
          assert.is_true(ws:close())
          assert.equal(1000, ws.close_code)
          expect_logged(srv, "extensions=permessage-deflate")
          srv:stop()
        end)
      end

      describe("close paths", function()
        it("we close with 1000", function()
          local srv = start()
          local ws = assert(connect(srv.url))
          echo(ws, "one")
          assert.is_true(ws:close(1000))
          assert.equal("closed", ws.state)
          assert.equal(1000, ws.close_code)
          expect_logged(srv, "close 1 1000  messages=1")
          srv:stop()
        end)

        it("we close with 4000 and a reason", function()
          local srv = start()
          local ws = assert(connect(srv.url))
          echo(ws, "one")
          assert.is_true(ws:close(4000, "custom reason"))
          assert.equal(4000, ws.close_code) -- the server echoes our code
          expect_logged(srv, "close 1 4000 custom reason messages=1")
          srv:stop()
        end)

        it("they close with 1000", function()
          local srv = start({close_after = 2})
          local ws = assert(connect(srv.url))
          echo(ws, "one")
          echo(ws, "two")
          local m, err, code, reason = recv(ws)
          assert.is_nil(m)
          assert.equal("closed", err)
          assert.equal(1000, code)
          assert.equal("", reason)
          assert.is_true(ws:close()) -- nothing left to do
          expect_logged(srv, "close 1 1000  messages=2")
          srv:stop()
        end)

        it("they vanish (process killed): 1006, said clearly", function()
          local srv = start()
          local ws = assert(connect(srv.url))
          echo(ws, "one")
          srv.handle:kill("KILL")
          srv.handle:wait(5)
          local m, err, code, reason = recv(ws)
          assert.is_nil(m)
          assert.equal("closed", err)
          assert.equal(1006, code)
          assert.matches("without a closing handshake", reason)
          assert.equal(1006, ws.close_code)
          assert.same({nil, "closed"}, {ws:send("anyone?")})
          srv.handle:cleanup()
        end)

        it("they vanish while we close: close() returns and 1006 is reported", function()
          local srv = start()
          local ws = assert(connect(srv.url))
          echo(ws, "one")
          srv.handle:kill("KILL")
          srv.handle:wait(5)
          ws:close(1000)
          assert.equal("closed", ws.state)
          assert.equal(1006, ws.close_code)
          assert.matches("without a closing handshake", ws.close_reason)
          srv.handle:cleanup()
        end)
      end)
    end)
  end
end)
