-- bin/duplex, run as a user runs it (lua5.4 bin/duplex ..., from the
-- repository root, inheriting the environment: under scripts/asan-env it
-- runs on the sanitized build), against the reference peers (node's ws,
-- python3-websockets) and against servers in this process.
local core = require "duplex.core"
local proc = require "support.proc"
local peers = require "support.peers"
local certs = require "support.certs"
local examples = require "support.examples"
local http = require "support.http"
local proxies = require "support.proxy"

local wait_for = require("support.loop").wait_for
local closed_port = require("support.services").free_port
local _, listen = require("support.tracked").install(after_each, teardown)

local LUA = examples.LUA

local function duplex_argv(args)
  local argv = {LUA, "bin/duplex"}
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return argv
end

-- bin/duplex with args, to its end (the loop runs meanwhile); returns exit
-- status, stdout, stderr. opts.stdin: a file (default /dev/null).
local function run_duplex(args, opts)
  return examples.run(duplex_argv(args), opts)
end

local dir, fifos = nil, 0

local function temp_file(name, content)
  local path = dir .. "/" .. name
  local f = assert(io.open(path, "wb"))
  f:write(content)
  f:close()
  return path
end

-- `duplex connect` reading a FIFO that the test writes: the input stays
-- open until writer:close(), like a terminal's. Returns the child and the
-- writer. The child opens the FIFO itself, and the writer is opened after
-- it started: a child that inherited the writer would never see the end.
local function interactive(args)
  fifos = fifos + 1
  local path = dir .. "/fifo" .. fifos
  assert(os.execute("mkfifo " .. proc.quote(path)))
  local argv = duplex_argv(args)
  table.insert(argv, 1, path)
  for i, a in ipairs({"sh", "-c", 'exec "$@" < "$0"'}) do table.insert(argv, i, a) end
  local h = examples.spawn(argv, {limit = 60})
  -- read and write: opening it does not wait for the child's open
  local writer = assert(io.open(path, "r+"))
  return h, writer
end

local function send_line(writer, line)
  writer:write(line, "\n")
  writer:flush()
end

-- The child's next stdout line, waiting with the loop running.
local function next_line(h, timeout)
  local line
  wait_for(function()
    line = line or h:read_line(0)
    return line
  end, timeout or 10)
  return line
end

-- Type a line into an interactive `duplex connect` and see its echo.
local function expect_echo(h, writer, line)
  send_line(writer, line)
  assert.equal("text " .. line, next_line(h))
end

-- Wait (the loop running) for the child to exit; returns its status.
local function exit_of(h, timeout)
  wait_for(function() return not h:running() end, timeout or 15)
  return h:exit_code()
end

local c -- test certificates

setup(function()
  dir = proc.temp_dir()
  c = certs.generate()
end)

teardown(function()
  proc.killall()
  proc.remove_dir(dir)
  if c then c.cleanup() end
end)

describe("duplex (command line)", function()
  it("prints help on stdout for --help, for each command, and exits 0", function()
    for _, args in ipairs({{"--help"}, {"help"}, {"-h"}}) do
      local code, out, err = run_duplex(args)
      assert.equal(0, code, err)
      assert.matches("^usage: duplex COMMAND", out)
      assert.matches("duplex connect URL [options]", out, 1, true)
      assert.matches("duplex serve [options]", out, 1, true)
      assert.equal("", err)
    end
    local code, out = run_duplex({"connect", "--help"})
    assert.equal(0, code)
    assert.matches("^usage: duplex connect URL %[options%]", out)
    for _, o in ipairs({"--header", "--protocol", "--deflate", "--ca", "--insecure", "--proxy", "--ping",
        "--binary", "Exit status:", "5  connection lost"}) do
      assert.matches(o, out, 1, true)
    end
    code, out = run_duplex({"serve", "-h"})
    assert.equal(0, code)
    assert.matches("^usage: duplex serve %[options%]", out)
    for _, o in ipairs({"--port", "--host", "--path", "--page", "--tls-cert", "--tls-key", "--max-size",
        "--deflate", "--ping-interval", "--workers", "--max-connections"}) do
      assert.matches(o, out, 1, true)
    end
    for line in out:gmatch("[^\n]+") do assert.is_true(#line <= 79, "help line too long: " .. line) end
    code, out = run_duplex({"--version"})
    assert.equal(0, code)
    assert.equal("duplex " .. core.version .. "\n", out)
  end)

  it("prints the commands on stderr and exits 2 without arguments", function()
    local code, out, err = run_duplex({})
    assert.equal(2, code)
    assert.equal("", out)
    assert.matches("usage: duplex COMMAND", err, 1, true)
  end)

  local URL = "ws://127.0.0.1:1/"
  local bad = {
    {{"bogus"}, "duplex: unknown command bogus"},
    {{"connect"}, "duplex connect: URL missing"},
    {{"connect", URL, URL}, "unexpected argument " .. URL},
    {{"connect", "--bogus", URL}, "unknown option --bogus"},
    {{"connect", URL, "--ping"}, "--ping needs a value (SECONDS)"},
    {{"connect", URL, "--ping", "often"}, "--ping often: expected a number of seconds"},
    {{"connect", URL, "--deflate=yes"}, "--deflate takes no value"},
    {{"connect", "http://127.0.0.1:1/"}, "not a WebSocket URL"},
    {{"connect", "ws://bad host/"}, "invalid host in URL"},
    {{"connect", URL, "--header", "NoColon"}, "--header NoColon: expected 'Name: value'"},
    {{"connect", URL, "--header", "Host: elsewhere"}, 'header "Host" is set by the handshake'},
    {{"connect", URL, "--protocol", "two words"}, 'invalid subprotocol "two words"'},
    {{"serve", "extra"}, "unexpected argument extra"},
    {{"serve", "--port", "eighty"}, "--port eighty: expected an integer from 0 to 65535"},
    {{"serve", "--port=70000"}, "--port 70000: expected an integer from 0 to 65535"},
    {{"serve", "--deflate-window", "16"}, "expected an integer from 8 to 15"},
    {{"serve", "--tls-cert", "cert.pem"}, "--tls-cert and --tls-key go together"},
    {{"serve", "--workers", "2", "--port", "0"}, "--workers needs a fixed --port"},
    {{"serve", "--path", "chat"}, "--path must start with /"},
  }
  for _, case in ipairs(bad) do
    local args, message = case[1], case[2]
    it("exits 2, saying why, for: duplex " .. table.concat(args, " "), function()
      local code, out, err = run_duplex(args)
      assert.equal(2, code, out .. err)
      assert.equal("", out)
      assert.matches(message, err, 1, true)
      assert.matches("try 'duplex " .. (args[1] == "bogus" and "" or args[1] .. " ") .. "--help'", err, 1, true)
    end)
  end
end)

describe("duplex connect", function()
  teardown(proc.killall)

  it("sends stdin's lines to a node ws echo server and prints the echoes, one line each", function()
    local srv = peers.node_echo_server()
    local input = temp_file("lines.txt", "hello\nwörld ✓\nback\\slash\ttab\n\ncrlf\r\nesc\27[31m\nlast")
    local code, out, err = run_duplex({"connect", srv.url}, {stdin = input})
    assert.equal(0, code, out .. err)
    assert.equal(table.concat({
      "text hello", "text wörld ✓", "text back\\\\slash\\ttab", "text ", "text crlf", "text esc\\x1b[31m",
      "text last", "close 1000", ""}, "\n"), out)
    assert.matches("duplex: connected to " .. srv.url, err, 1, true)
    assert.matches("duplex: closed: 1000", err, 1, true)
    assert.equal(0, srv:stop())
    assert.matches("close 1 1000  messages=7", srv:output(), 1, true)
  end)

  -- python-websockets sends nothing once it has the client's close frame:
  -- --wait gives the echoes time to arrive before the close.
  it("reads stdin from a pipe, waits for the echoes with --wait, and negotiates --deflate", function()
    local srv = peers.py_echo_server{deflate = true}
    local code, out, err = examples.run({"sh", "-c", "printf 'one\\ntwo\\n' | exec \"$@\"", "sh",
      LUA, "bin/duplex", "connect", "--deflate", "--wait", "0.5", srv.url})
    assert.equal(0, code, out .. err)
    assert.equal("text one\ntext two\nclose 1000\n", out)
    assert.matches("extensions permessage-deflate", err, 1, true)
    assert.equal(0, srv:stop())
    assert.matches("extensions=permessage-deflate", srv:output(), 1, true)
  end)

  it("sends lines as binary with --binary, and a line that is not UTF-8 as binary anyway", function()
    local srv = peers.node_echo_server()
    local input = temp_file("mixed.txt", "abc\n\255\254\n")
    local code, out, err = run_duplex({"connect", srv.url}, {stdin = input})
    assert.equal(0, code, out .. err)
    assert.equal("text abc\nbinary fffe\nclose 1000\n", out)
    assert.matches("line 2 is not UTF-8: sent as binary", err, 1, true)
    code, out, err = run_duplex({"connect", "--binary", srv.url}, {stdin = input})
    assert.equal(0, code, out .. err)
    assert.equal("binary 616263\nbinary fffe\nclose 1000\n", out)
    srv:stop()
  end)

  it("prints each echo as it arrives while stdin stays open, and closes at its end", function()
    local srv = peers.py_echo_server()
    local h, writer = interactive({"connect", srv.url})
    expect_echo(h, writer, "first")
    expect_echo(h, writer, "second")
    writer:close()
    assert.equal(0, exit_of(h), h:output())
    assert.equal("close 1000", next_line(h))
    srv:stop()
  end)

  it("closes with 1001 on SIGINT and exits 0", function()
    local srv = peers.node_echo_server()
    local h, writer = interactive({"connect", srv.url})
    expect_echo(h, writer, "before")
    h:kill("INT")
    assert.equal(0, exit_of(h), h:output())
    assert.matches("^close 1001", next_line(h))
    writer:close()
    srv:stop()
    assert.matches("close 1 1001 interrupted", srv:output(), 1, true)
  end)

  it("exits 4 when the server closes with 1008", function()
    local srv = peers.node_echo_server{close_code = 1008, close_reason = "go away"}
    local h, writer = interactive({"connect", srv.url})
    send_line(writer, "one")
    assert.equal(4, exit_of(h), h:output())
    assert.equal("text one\nclose 1008 go away\n", h:stdout())
    assert.matches("closed by the server: 1008 go away", h:stderr(), 1, true)
    writer:close()
    srv:stop()
  end)

  it("exits 4 after closing with 1009 an echo over --max-size", function()
    local srv = peers.node_echo_server()
    local h, writer = interactive({"connect", "--max-size", "1000", srv.url})
    expect_echo(h, writer, string.rep("a", 1000))
    send_line(writer, string.rep("b", 1001))
    assert.equal(4, exit_of(h), h:output())
    assert.matches("^close 1009", next_line(h))
    writer:close()
    srv:stop()
  end)

  it("exits 5 when the connection is lost without a closing handshake", function()
    local srv = listen{host = "127.0.0.1", port = 0, handler = function(ws)
      ws:receive(10)
      ws:abort("gone")
    end}
    local h, writer = interactive({"connect", srv:url()})
    send_line(writer, "bye")
    assert.equal(5, exit_of(h), h:output())
    assert.matches("^close 1006 ", h:stdout())
    assert.matches("duplex: connection lost: ", h:stderr(), 1, true)
    writer:close()
  end)

  it("exits 3 when the server refuses the upgrade", function()
    local srv = peers.py_echo_server{path = "/only"}
    local code, out, err = run_duplex({"connect", "ws://127.0.0.1:" .. srv.port .. "/other"})
    assert.equal(3, code, out .. err)
    assert.equal("", out)
    assert.matches("duplex: handshake rejected: 400", err, 1, true)
    srv:stop()
  end)

  it("exits 1 when nobody listens", function()
    local port = closed_port()
    local code, out, err = run_duplex({"connect", "ws://127.0.0.1:" .. port .. "/"})
    assert.equal(1, code, out .. err)
    assert.equal("", out)
    assert.matches("duplex: connect to 127.0.0.1:" .. port .. " failed: connection refused", err, 1, true)
  end)

  it("sends --header (repeatable, Origin included) and offers every --protocol", function()
    local seen = {}
    local srv = listen{host = "127.0.0.1", port = 0, protocols = {"chat.v2"}, handler = function(ws, req)
      seen.token, seen.multi, seen.origin = req.headers["x-token"], req.headers["x-multi"], req.origin
      seen.protocols, seen.protocol = req.protocols, ws.protocol
      ws:send("hi")
      ws:close(1000, "bye")
    end}
    local h, writer = interactive({"connect", srv:url(), "--header", "X-Token: abc",
      "-H", "X-Multi:1", "--header", "X-Multi: 2", "--header", "Origin: http://example.test",
      "--protocol", "chat.v1", "--protocol", "chat.v2"})
    assert.equal(0, exit_of(h), h:output())
    assert.equal("text hi\nclose 1000 bye\n", h:stdout())
    assert.matches("subprotocol chat.v2", h:stderr(), 1, true)
    assert.matches("closed by the server: 1000 bye", h:stderr(), 1, true)
    assert.same({token = "abc", multi = "1, 2", origin = "http://example.test",
      protocols = {"chat.v1", "chat.v2"}, protocol = "chat.v2"}, seen)
    writer:close()
  end)

  it("pings a quiet server every --ping seconds", function()
    local srv = peers.node_echo_server()
    local h, writer = interactive({"connect", "--ping", "0.2", srv.url})
    assert.is_true(wait_for(function() return srv:output():find("ping 1 ", 1, true) ~= nil end, 10),
      srv:output())
    writer:close()
    assert.equal(0, exit_of(h), h:output())
    srv:stop()
  end)

  it("goes through --proxy", function()
    local proxy = proxies.start()
    local srv = peers.node_echo_server()
    local code, out, err = run_duplex({"connect", "--proxy", "http://127.0.0.1:" .. proxy.port, srv.url},
      {stdin = temp_file("proxied.txt", "via the proxy\n")})
    assert.equal(0, code, out .. err)
    assert.equal("text via the proxy\nclose 1000\n", out)
    assert.matches("^CONNECT 127%.0%.0%.1:" .. srv.port .. " HTTP/1%.1", proxy.requests[1])
    proxy.close()
    srv:stop()
  end)

  it("trusts --ca for wss://, refuses an unknown certificate, and takes any with --insecure", function()
    local h, url = examples.serve({"--port", "0", "--tls-cert", c.cert, "--tls-key", c.key})
    assert.matches("^wss://", url)
    local input = temp_file("tls.txt", "secret\n")
    local code, out, err = run_duplex({"connect", "--ca", c.ca, url}, {stdin = input})
    assert.equal(0, code, out .. err)
    assert.equal("text secret\nclose 1000\n", out)
    code, out, err = run_duplex({"connect", url}, {stdin = input})
    assert.equal(1, code, out .. err)
    assert.matches("certificate verify failed", err)
    code, out, err = run_duplex({"connect", "--ca", c.other_ca, url}, {stdin = input})
    assert.equal(1, code, out .. err)
    code, out, err = run_duplex({"connect", "--insecure", url}, {stdin = input})
    assert.equal(0, code, out .. err)
    assert.equal("text secret\nclose 1000\n", out)
    h:kill("TERM")
    assert.equal(0, exit_of(h))
    h:cleanup()
  end)

  it("prints for people on a terminal: '< text: ...', binary as its first bytes", function()
    local srv = peers.node_echo_server()
    local function on_tty(args, input)
      local shell = "printf '" .. input .. "' | exec " .. table.concat(duplex_argv(args), " ")
      local code, out = examples.run({"script", "-qec", shell, "/dev/null"})
      assert.equal(0, code, out)
      return (out:gsub("\r\n", "\n"))
    end
    local out = on_tty({"connect", srv.url}, "hi\\nesc\\033[2J\\n")
    assert.matches("\n< text: hi\n< text: esc\\x1b[2J\n", out, 1, true)
    assert.matches("duplex: closed: 1000", out, 1, true)
    assert.not_matches("close 1000", out, 1, true)
    out = on_tty({"connect", "--binary", srv.url}, "hi\\n" .. string.rep("z", 40) .. "\\n")
    assert.matches("< binary: 2 bytes: 68 69\n", out, 1, true)
    assert.matches("< binary: 40 bytes: " .. string.rep("7a ", 31) .. "7a ...\n", out, 1, true)
    srv:stop()
  end)
end)

describe("duplex serve", function()
  teardown(proc.killall)

  local function stop(h, sig)
    h:kill(sig or "TERM")
    local code = exit_of(h)
    h:cleanup()
    return code
  end

  for _, sig in ipairs({"INT", "TERM"}) do
    it("echoes to node ws and python-websockets clients and stops cleanly on SIG" .. sig, function()
      local h, url = examples.serve({"--port", "0"})
      assert.matches("^ws://127%.0%.0%.1:%d+/$", url)
      local code, res = peers.node_client(url, {count = 6, size = 300})
      assert.equal(0, code, res.error)
      assert.equal(6, res.received)
      assert.equal("", res.extensions)
      code, res = peers.py_client(url, {count = 6, size = 300, fragment = true})
      assert.equal(0, code, res.error)
      assert.equal(6, res.received)
      assert.equal(0, stop(h, sig))
    end)
  end

  it("negotiates permessage-deflate with --deflate", function()
    local h, url = examples.serve({"--port", "0", "--deflate"})
    local code, res = peers.node_client(url, {deflate = true, count = 4, size = 5000})
    assert.equal(0, code, res.error)
    assert.equal("permessage-deflate", res.extensions)
    code, res = peers.py_client(url, {deflate = true, count = 4, size = 5000})
    assert.equal(0, code, res.error)
    assert.equal("permessage-deflate", res.extensions)
    assert.equal(0, stop(h))
  end)

  it("serves --page at GET / and WebSocket on --path", function()
    local page = temp_file("index.html", "<!doctype html><title>test page</title>\n")
    local h, url, port = examples.serve({"--port", "0", "--page", page, "--path", "/ws"})
    assert.equal("ws://127.0.0.1:" .. port .. "/ws", url)
    assert.equal("page at http://127.0.0.1:" .. port .. "/", next_line(h))
    local status, headers, body = http.get(port, "/")
    assert.equal(200, status)
    assert.equal("text/html; charset=utf-8", headers["content-type"])
    assert.equal("<!doctype html><title>test page</title>\n", body)
    temp_file("index.html", "<!doctype html><title>edited</title>\n")
    assert.equal("<!doctype html><title>edited</title>\n", select(3, http.get(port, "/")))
    assert.equal(426, (http.get(port, "/ws")))
    assert.equal(404, (http.get(port, "/other")))
    local code, res = peers.node_client(url, {count = 3})
    assert.equal(0, code, res.error)
    code, res = peers.node_client("ws://127.0.0.1:" .. port .. "/", {count = 1})
    assert.equal(1, code)
    assert.matches("404", res.error)
    assert.equal(0, stop(h))
  end)

  it("speaks wss with --tls-cert and --tls-key", function()
    local h, url = examples.serve({"--port", "0", "--tls-cert", c.cert, "--tls-key", c.key})
    assert.matches("^wss://127%.0%.0%.1:%d+/$", url)
    local code, res = peers.node_client(url, {insecure = true, count = 4})
    assert.equal(0, code, res.error)
    assert.equal(0, stop(h))
  end)

  it("closes with 1009 on a message over --max-size, and selects a --protocol", function()
    local h, url = examples.serve({"--port", "0", "--max-size", "1000", "--protocol", "chat", "--protocol", "echo"})
    local code, res = peers.py_client(url, {size = 2000, count = 1, expect_close = 1009})
    assert.equal(0, code, res.error)
    code, res = peers.node_client(url, {protocol = "echo", count = 2, size = 1000})
    assert.equal(0, code, res.error)
    assert.equal("echo", res.protocol)
    assert.equal(0, stop(h))
  end)

  it("runs --workers processes on a fixed port and stops them all", function()
    local port = closed_port()
    local h, url = examples.serve({"--port", tostring(port), "--workers", "2"})
    assert.equal("ws://127.0.0.1:" .. port .. "/", url)
    for _ = 1, 3 do
      local code, res = peers.node_client(url, {count = 2})
      assert.equal(0, code, res.error)
    end
    assert.equal(0, stop(h))
  end)

  it("exits 1, saying why, when it cannot listen or read its page", function()
    local h, _, port = examples.serve({"--port", "0"})
    local code, out, err = run_duplex({"serve", "--port", port})
    assert.equal(1, code, out .. err)
    assert.equal("", out)
    assert.matches("duplex: listen on 127.0.0.1:" .. port .. " failed: address already in use", err, 1, true)
    assert.equal(0, stop(h))
    code, out, err = run_duplex({"serve", "--port", "0", "--page", dir .. "/missing.html"})
    assert.equal(1, code, out .. err)
    assert.matches("missing.html: No such file or directory", err, 1, true)
    code, out, err = run_duplex({"serve", "--port", "0", "--tls-cert", dir .. "/none.pem", "--tls-key", c.key})
    assert.equal(1, code, out .. err)
    assert.matches("none.pem", err, 1, true)
  end)
end)
