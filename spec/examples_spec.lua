-- The examples keep their public contract: run as a user would, from the
-- repository root, as child processes (they inherit the environment, so
-- under scripts/asan-env they run with the sanitizer runtime preloaded too).
local core = require "duplex.core"
local proc = require "support.proc"
local peers = require "support.peers"
local certs = require "support.certs"
local examples = require "support.examples"
local http = require "support.http"

local connect, listen = require("support.tracked").install(after_each, teardown)

local LUA = "lua5.4"

-- Run an example to its end while the loop keeps running; returns exit
-- status, stdout, stderr.
local function run_example(argv, timeout)
  return examples.run(argv, {timeout = timeout})
end

local start_echo = examples.echo

local function recv(ws, timeout)
  local m, kind, code, reason = ws:receive(timeout or 10)
  assert.is_not.equal("timeout", kind, "nothing arrived within the deadline")
  return m, kind, code, reason
end

local function expect_closed(ws, code)
  local m, err, c, reason = recv(ws)
  assert.is_nil(m, "expected the connection to close, got a message: " .. tostring(m))
  assert.equal("closed", err)
  assert.equal(code, c)
  return reason
end

describe("examples/echo.lua", function()
  local c
  setup(function() c = certs.generate() end)
  teardown(function()
    proc.killall()
    if c then c.cleanup() end
  end)

  for _, sig in ipairs({"INT", "TERM"}) do
    it("prints its URL, echoes, and stops cleanly on SIG" .. sig .. ", telling clients it goes away", function()
      local h, url = start_echo({"--port", "0"})
      assert.matches("^ws://127%.0%.0%.1:%d+/$", url)
      local ws = assert(connect(url))
      assert(ws:send("héllo ✓"))
      assert.same({"héllo ✓", "text"}, {recv(ws)})
      assert(ws:send("\0\1\2\255", "binary"))
      assert.same({"\0\1\2\255", "binary"}, {recv(ws)})
      h:kill(sig)
      assert.equal("server shutting down", expect_closed(ws, 1001))
      assert.equal(0, h:wait(10), h:output())
      h:cleanup()
    end)
  end

  it("stops cleanly with no client connected", function()
    local h = start_echo({"--port", "0"})
    h:kill("TERM")
    assert.equal(0, h:wait(10), h:output())
    h:cleanup()
  end)

  it("serves only --path", function()
    local h, url, port = start_echo({"--port", "0", "--path", "/echo"})
    assert.equal("ws://127.0.0.1:" .. port .. "/echo", url)
    local ws = assert(connect(url))
    assert(ws:send("on the path"))
    assert.equal("on the path", (recv(ws)))
    ws:close()
    local bad, err = connect("ws://127.0.0.1:" .. port .. "/")
    assert.is_nil(bad)
    assert.matches("404", err)
    h:kill("TERM")
    assert.equal(0, h:wait(10))
    h:cleanup()
  end)

  it("speaks wss with --tls-cert/--tls-key to a client trusting the test CA", function()
    local h, url = start_echo({"--port", "0", "--tls-cert", c.cert, "--tls-key", c.key})
    assert.matches("^wss://127%.0%.0%.1:%d+/$", url)
    local ws = assert(connect(url, {tls = {ca = c.ca}}))
    assert(ws:send("over TLS"))
    assert.equal("over TLS", (recv(ws)))
    local big = string.rep("0123456789abcdef", 1 << 16)
    assert(ws:send(big, "binary"))
    assert.is_true((recv(ws)) == big)
    ws:close()
    assert.equal(1000, ws.close_code)
    -- A client that does not trust the CA is refused, saying why.
    local bad, err = connect(url, {tls = {ca = c.other_ca}})
    assert.is_nil(bad)
    assert.matches("certificate verify failed", err)
    h:kill("TERM")
    assert.equal(0, h:wait(10))
    h:cleanup()
  end)

  it("closes with 1009 on a message over --max-size", function()
    local h, url = start_echo({"--port", "0", "--max-size", "1000"})
    local ws = assert(connect(url))
    assert(ws:send(string.rep("a", 1000)))
    assert.equal(1000, #recv(ws))
    assert(ws:send(string.rep("b", 1001)))
    expect_closed(ws, 1009)
    h:kill("TERM")
    assert.equal(0, h:wait(10))
    h:cleanup()
  end)

  it("negotiates permessage-deflate only with --deflate", function()
    local h, url = start_echo({"--port", "0", "--deflate"})
    local ws = assert(connect(url, {deflate = true}))
    assert.is_true(ws.deflate)
    assert.matches("^permessage%-deflate", ws.extensions)
    local text = string.rep("squeeze me ", 20000)
    for _ = 1, 3 do
      assert(ws:send(text))
      assert.is_true((recv(ws)) == text)
    end
    ws:close()
    h:kill("TERM")
    h:wait(10)
    h:cleanup()

    h, url = start_echo({"--port", "0"})
    ws = assert(connect(url, {deflate = true}))
    assert.is_false(ws.deflate)
    assert.is_nil(ws.extensions)
    ws:close()
    h:kill("TERM")
    h:wait(10)
    h:cleanup()
  end)

  -- A ws peer that reports every ping it gets, for `seconds`.
  local function pings_seen(url, seconds)
    local code, out = proc.run({peers.node, "-e", [[
      const W = require('ws'); const w = new W(process.argv[1]); let n = 0;
      w.on('ping', () => n++);
      w.on('open', () => setTimeout(() => { console.log('PINGS ' + n); w.close(); }, ]] ..
      math.floor(seconds * 1000) .. [[));
      w.on('error', (e) => { console.log('ERROR ' + e.message); process.exit(1); });
    ]], url}, {env = peers.env, cwd = peers.interop, timeout = seconds + 20})
    assert.equal(0, code, out)
    return tonumber(out:match("PINGS (%d+)"))
  end

  it("pings idle clients every --ping-interval seconds, and never with 0", function()
    local h, url = start_echo({"--port", "0", "--ping-interval", "0.5"})
    assert.is_true(pings_seen(url, 2) >= 1)
    h:kill("TERM")
    assert.equal(0, h:wait(10))
    h:cleanup()
    h, url = start_echo({"--port", "0", "--ping-interval", "0"})
    assert.equal(0, pings_seen(url, 2))
    h:kill("TERM")
    assert.equal(0, h:wait(10))
    h:cleanup()
  end)

  local bad_args = {
    {"--bogus"},
    {"--port", "eighty"},
    {"--port", "0", "--max-size", "big"},
    {"--port", "0", "--ping-interval", "often"},
    {"--port", "0", "--tls-cert", "cert.pem"},
  }
  for _, args in ipairs(bad_args) do
    it("prints usage and exits 2 for: " .. table.concat(args, " "), function()
      local code, out, err = run_example({LUA, "examples/echo.lua", table.unpack(args)})
      assert.equal(2, code, out .. err)
      assert.matches("usage: lua5.4 examples/echo.lua", err, 1, true)
      assert.equal("", out)
    end)
  end

  it("exits 1 with a message when the port is taken", function()
    local h, _, port = start_echo({"--port", "0"})
    local code, _, err = run_example({LUA, "examples/echo.lua", "--port", port})
    assert.equal(1, code)
    assert.matches("address already in use", err)
    h:kill("TERM")
    h:wait(10)
    h:cleanup()
  end)
end)

describe("examples/echo_client.lua", function()
  local c
  setup(function() c = certs.generate() end)
  teardown(function()
    proc.killall()
    if c then c.cleanup() end
  end)

  local SCRIPT = {{"first", "text"}, {"\0\1\2\3\255", "binary"}, {"dritte Nachricht — ✓", "text"}}

  -- An in-process server that sends SCRIPT, checks the echoes, then ends
  -- the connection with `ending(ws)`.
  local function scripted_server(ending, opts)
    local seen = {}
    local o = {host = "127.0.0.1", port = 0, log = function() end}
    for k, v in pairs(opts or {}) do o[k] = v end
    o.handler = function(ws)
      seen.protocol, seen.deflate = ws.protocol, ws.deflate
      for i, m in ipairs(SCRIPT) do
        ws:send(m[1], m[2])
        local data, kind = ws:receive(10)
        seen[i] = {data, kind}
      end
      ending(ws)
      seen.done = true
    end
    return listen(o), seen
  end

  local function expect_echoed(seen)
    assert.is_true(seen.done)
    for i, m in ipairs(SCRIPT) do assert.same(m, seen[i]) end
  end

  it("echoes with the right types and exits 0 when the server closes with 1000", function()
    local srv, seen = scripted_server(function(ws) ws:close(1000, "done") end)
    local code, out, err = run_example({LUA, "examples/echo_client.lua", srv:url()})
    assert.equal(0, code, out .. err)
    assert.matches("server closed (1000 done) after 3 messages", out, 1, true)
    expect_echoed(seen)
    srv:shutdown(1)
  end)

  it("exits 0 when the server goes away with 1001", function()
    local srv, seen = scripted_server(function(ws) ws:close(1001) end)
    local code, out, err = run_example({LUA, "examples/echo_client.lua", srv:url()})
    assert.equal(0, code, out .. err)
    expect_echoed(seen)
    srv:shutdown(1)
  end)

  it("exits non-zero, saying why, when the server closes with 1011", function()
    local srv, seen = scripted_server(function(ws) ws:close(1011, "it broke") end)
    local code, _, err = run_example({LUA, "examples/echo_client.lua", srv:url()})
    assert.is_true(code ~= 0, "exit status " .. tostring(code))
    assert.matches("1011", err)
    assert.matches("it broke", err, 1, true)
    expect_echoed(seen)
    srv:shutdown(1)
  end)

  it("exits non-zero, saying why, when the server vanishes", function()
    local srv, seen = scripted_server(function(ws) ws:abort("gone") end)
    local code, out, err = run_example({LUA, "examples/echo_client.lua", srv:url()})
    assert.is_true(code ~= 0, "exit status " .. tostring(code))
    assert.matches("1006", err)
    assert.equal("", out)
    expect_echoed(seen)
    srv:shutdown(1)
  end)

  it("exits 1, saying why, when nobody listens", function()
    local l = assert(core.listen{host = "127.0.0.1", port = 0})
    local _, port = l:address()
    l:close()
    local code, out, err = run_example({LUA, "examples/echo_client.lua", "ws://127.0.0.1:" .. port .. "/"})
    assert.equal(1, code, out)
    assert.matches("echo_client: connect to 127.0.0.1:" .. port .. " failed", err, 1, true)
  end)

  it("offers --protocol and --deflate, and trusts --ca for wss", function()
    local srv, seen = scripted_server(function(ws) ws:close(1000) end, {
      protocols = {"echo.v1"}, deflate = true, tls = {cert = c.cert, key = c.key},
    })
    local url = srv:url()
    assert.matches("^wss://", url)
    local code, out, err = run_example({LUA, "examples/echo_client.lua", url,
      "--protocol", "echo.v1", "--deflate", "--ca", c.ca})
    assert.equal(0, code, out .. err)
    expect_echoed(seen)
    assert.equal("echo.v1", seen.protocol)
    assert.is_true(seen.deflate)
    -- Without the CA the certificate is not trusted.
    code, out, err = run_example({LUA, "examples/echo_client.lua", url})
    assert.equal(1, code, out .. err)
    assert.matches("certificate verify failed", err)
    srv:shutdown(1)
  end)

  for _, args in ipairs({{}, {"--bogus"}, {"ws://127.0.0.1:1/", "ws://127.0.0.1:2/"}}) do
    it("prints usage and exits 2 for: " .. (#args > 0 and table.concat(args, " ") or "no arguments"), function()
      local code, out, err = run_example({LUA, "examples/echo_client.lua", table.unpack(args)})
      assert.equal(2, code, out .. err)
      assert.matches("^usage: lua5.4 examples/echo_client.lua URL", err)
    end)
  end
end)

describe("examples/chat/server.lua", function()
  local h, port
  setup(function()
    local _ -- the base URL: the specs build their own from port
    h, _, port = examples.chat({"--port", "0"})
  end)
  teardown(function()
    proc.killall()
  end)

  local function http_get(path) return http.get(port, path) end

  -- A room's lines come as "#epoch:offset line": the line, and the position.
  local function line_of(m)
    local pos, text = m:match("^#(%w*:%d+) (.*)$")
    return text or m, pos
  end

  local function join(nick, room, since)
    local ws = assert(connect(string.format("ws://127.0.0.1:%s/ws?nick=%s&room=%s%s", port, nick, room,
      since and "&since=" .. since or "")))
    local hello = recv(ws)
    assert.matches("^%* you are " .. nick .. " in #" .. room .. " %(from 127%.0%.0%.1", hello)
    if not since then assert.equal("* " .. nick .. " joined #" .. room, line_of(recv(ws))) end
    return ws
  end

  -- The next line, and its position if it is a room's.
  local function expect(ws, line)
    local m, kind = recv(ws)
    assert.equal("text", kind)
    local text, pos = line_of(m)
    assert.equal(line, text)
    return pos
  end

  it("serves its page at / and answers /health", function()
    local status, headers, body = http_get("/")
    assert.equal(200, status)
    assert.matches("^text/html", headers["content-type"])
    assert.matches('<form id="join">', body, 1, true)
    assert.matches('id="log"', body, 1, true)
    assert.equal(#body, tonumber(headers["content-length"]))
    status, headers, body = http_get("/health")
    assert.equal(200, status)
    assert.equal("ok\n", body)
    assert.equal(#body, tonumber(headers["content-length"]))
    status = http_get("/nothing-here")
    assert.equal(404, status)
  end)

  it("lets two clients in one room talk, rename with /nick and move with /join", function()
    local alice = join("alice", "r1")
    local bob = join("bob", "r1")
    expect(alice, "* bob joined #r1")

    assert(alice:send("hi bob"))
    expect(alice, "alice: hi bob")
    expect(bob, "alice: hi bob")
    assert(bob:send("hi alice — ✓"))
    expect(bob, "bob: hi alice — ✓")
    expect(alice, "bob: hi alice — ✓")

    assert(alice:send("/nick alicia"))
    expect(alice, "* alice is now alicia")
    expect(bob, "* alice is now alicia")
    assert(alice:send("renamed"))
    expect(alice, "alicia: renamed")
    expect(bob, "alicia: renamed")

    local carol = join("carol", "r2")
    assert(bob:send("/join r2"))
    expect(alice, "* bob left #r1")
    expect(carol, "* bob joined #r2")
    expect(bob, "* bob joined #r2") -- (his goodbye to r1 went to r1, which he had left)
    -- alice's room no longer reaches bob: once alice sees her own line, the
    -- server has published it, so bob's next line is carol's.
    assert(alice:send("anyone left?"))
    expect(alice, "alicia: anyone left?")
    assert(carol:send("welcome bob"))
    expect(carol, "carol: welcome bob")
    expect(bob, "carol: welcome bob")

    assert(bob:send("/nick no spaces allowed"))
    expect(bob, "* unknown command or bad name: /nick no spaces allowed")

    bob:close()
    expect(carol, "* bob left #r2")
    alice:close()
    carol:close()
  end)

  it("gives a client that comes back what it missed, and lists who is in the room", function()
    local erin = join("erin", "r4")
    local frank = join("frank", "r4")
    expect(erin, "* frank joined #r4")
    assert(frank:send("/who"))
    expect(frank, "* in #r4: erin, frank")
    assert(erin:send("before"))
    expect(frank, "erin: before")
    local pos = expect(erin, "erin: before")
    assert.matches("^%w+:%d+$", pos)
    erin:abort("the network went away") -- no goodbye: nobody is told she left
    assert(frank:send("one"))
    assert(frank:send("two"))
    expect(frank, "frank: one")
    expect(frank, "frank: two")
    assert(frank:send("/who")) -- her presence ended with the connection
    expect(frank, "* in #r4: frank")
    local back = join("erin", "r4", pos)
    expect(back, "frank: one")
    expect(back, "frank: two")
    expect(back, "* back: 2 missed line(s) above")
    assert(frank:send("three"))
    expect(back, "frank: three")
    expect(frank, "frank: three")
    -- A position from a history that is not this room's is told so.
    local stale = join("gina", "r4", "0000:3")
    local m = recv(stale)
    assert.matches("^%* back, but some lines are lost %(the history was reset", m)
    back:close()
    expect(frank, "* erin left #r4")
    stale:close()
    frank:close()
  end)

  it("stops cleanly on SIGTERM", function()
    local ws = join("dave", "r3")
    h:kill("TERM")
    expect_closed(ws, 1001)
    assert.equal(0, h:wait(10), h:output())
  end)
end)
