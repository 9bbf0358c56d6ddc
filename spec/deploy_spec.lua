-- The production setups of deploy/README.md, for real: nginx and haproxy
-- (run from deploy/nginx.conf and deploy/haproxy.cfg, only ports, paths and
-- timeouts substituted) in front of chat nodes that share rooms through a
-- real redis-server, TLS terminated at the proxy, the client's address
-- passed on, heartbeats against the proxies' idle timeouts, a broker restart.
-- Every server is a child process on 127.0.0.1; duplex is the client here.
local duplex = require "duplex"
local core = require "duplex.core"
local runtime = require "duplex.runtime"
local proc = require "support.proc"
local peers = require "support.peers"
local certs = require "support.certs"
local services = require "support.services"

local root = peers.root

--- A duplex example server as a child process; returns the handle and the
--- port it printed.
local function example(args)
  local argv = { "lua5.4" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local h = proc.spawn(argv, { cwd = root, limit = 300 })
  local line = h:read_line(10)
  local port = line and tonumber(line:match("127%.0%.0%.1:(%d+)/"))
  if not port then error(argv[2] .. " did not start: " .. tostring(line) .. "\n" .. h:output(), 2) end
  return h, port
end

local function count(s, pattern)
  local n = 0
  for _ in s:gmatch(pattern) do n = n + 1 end
  return n
end

--- A chat node sharing rooms through Redis; waits until its broker is up.
local function chat_node(redis_url)
  local h, port = example { "examples/chat/server.lua", "--port", "0", "--redis", redis_url,
    "--trusted-proxy", "127.0.0.1" }
  services.wait_for("the chat node's broker", 10, function()
    local err = h:stderr()
    return err:find("broker up: subscriber", 1, true) and err:find("broker up: publisher", 1, true)
  end)
  return { h = h, port = port }
end

-- nginx from deploy/nginx.conf: plain and TLS ports, two upstream servers.
local function nginx(o)
  local subs = {
    { "listen 80;", "listen 127.0.0.1:" .. o.port .. ";" },
    { "listen 443 ssl;", "listen 127.0.0.1:" .. o.tls_port .. " ssl;" },
    { "/etc/ssl/duplex/fullchain.pem", o.cert },
    { "/etc/ssl/duplex/privkey.pem", o.key },
    { "server 127.0.0.1:8081;", "server 127.0.0.1:" .. o.upstreams[1] .. ";" },
    { "server 127.0.0.1:8082;", "server 127.0.0.1:" .. o.upstreams[2] .. ";" },
  }
  if o.timeout then subs[#subs + 1] = { "proxy_read_timeout 60s;", "proxy_read_timeout " .. o.timeout .. ";" } end
  return services.nginx(services.render(root .. "/deploy/nginx.conf", subs), o.port)
end

-- haproxy from deploy/haproxy.cfg.
local function haproxy(o)
  local subs = {
    { "bind :80", "bind 127.0.0.1:" .. o.port },
    { "server node1 127.0.0.1:8081", "server node1 127.0.0.1:" .. o.upstreams[1] },
    { "server node2 127.0.0.1:8082", "server node2 127.0.0.1:" .. o.upstreams[2] },
  }
  if o.timeout then subs[#subs + 1] = { "timeout tunnel 60s", "timeout tunnel " .. o.timeout } end
  return services.haproxy(services.render(root .. "/deploy/haproxy.cfg", subs), o.port)
end

-- Every connection a test opens, aborted at the end whatever happened (one
-- left open would keep later specs' loops running).
local opened = {}

-- A chat client that keeps every line it got (to count copies later).
local Client = {}
Client.__index = Client

local function chat_client(url, opts)
  opts = opts or {}
  opts.ping_interval = 0
  local ws, err = duplex.connect(url, opts)
  assert(ws, err)
  opened[#opened + 1] = ws
  local c = setmetatable({ ws = ws, lines = {}, taken = {} }, Client)
  local greeting = c:expect("^%* you are")
  c.from, c.node = greeting:match("%(from ([^,]+), node (%d+)%)$")
  c.node = tonumber(c.node)
  return c
end

--- The first line matching pattern that no earlier expect() took, waiting
--- for it if need be.
function Client:expect(pattern, timeout)
  for i, l in ipairs(self.lines) do
    if not self.taken[i] and l:find(pattern) then
      self.taken[i] = true
      return l
    end
  end
  local deadline = core.now() + (timeout or 5)
  local start = #self.lines
  while true do
    local left = deadline - core.now()
    local m, err, code, reason
    if left > 0 then m, err, code, reason = self.ws:receive(left) end
    if not m then
      local seen = table.concat(self.lines, " | ", start + 1)
      error(string.format("no line matching %q (%s %s %s); seen since: %s", pattern, tostring(err or "timeout"),
        tostring(code), tostring(reason), seen), 2)
    end
    m = m:gsub("^#%w*:%d+ ", "") -- a room's line, without its position
    self.lines[#self.lines + 1] = m
    if m:find(pattern) then
      self.taken[#self.lines] = true
      return m
    end
  end
end

--- Whatever arrives within `quiet` seconds, then how often `line` came.
function Client:copies(line, quiet)
  while true do
    local m = self.ws:receive(quiet or 0.3)
    if not m then break end
    self.lines[#self.lines + 1] = (m:gsub("^#%w*:%d+ ", ""))
  end
  local n = 0
  for _, l in ipairs(self.lines) do if l == line then n = n + 1 end end
  return n
end

local numsub = services.numsub

local cert
setup(function() cert = certs.generate() end)
teardown(function()
  for _, ws in ipairs(opened) do ws:abort("test over") end
  proc.killall()
  if cert then cert.cleanup() end
end)

describe("nginx in front of two chat nodes sharing rooms through Redis", function()
  local r, nodes, proxy, port, tls_port
  local clients = {}

  setup(function()
    r = services.redis()
    nodes = { chat_node(r.url), chat_node(r.url) }
    port, tls_port = services.free_port(), services.free_port()
    proxy = nginx { port = port, tls_port = tls_port, cert = cert.cert, key = cert.key,
      upstreams = { nodes[1].port, nodes[2].port } }
  end)
  teardown(function()
    for _, c in ipairs(clients) do c.ws:abort() end
    if proxy then proxy:cleanup() end
    for _, n in ipairs(nodes or {}) do n.h:cleanup() end
    if r then r:cleanup() end
  end)

  -- One client on each node: nginx hashes the client's address, so clients
  -- from different source addresses (127.0.0.x) land on different nodes.
  local alice, bob
  local function client_on(node, nick, room, used)
    for i = 2, 60 do
      local addr = "127.0.0." .. i
      if not used[addr] then
        local c = chat_client(("ws://127.0.0.1:%d/ws?nick=%s&room=%s"):format(port, nick, room), { bind = addr })
        if c.node == node then
          used[addr] = true
          clients[#clients + 1] = c
          return c, addr
        end
        c.ws:close()
      end
    end
    error("no source address in 127.0.0.2-60 reaches node " .. node)
  end

  it("upgrades through nginx; a client on each node hears the other", function()
    local used = {}
    local alice_addr, bob_addr
    alice, alice_addr = client_on(nodes[1].port, "alice", "deploy", used)
    bob, bob_addr = client_on(nodes[2].port, "bob", "deploy", used)
    assert.is_not.equal(alice.node, bob.node)
    -- The nodes see the clients' own addresses (X-Forwarded-For from nginx).
    assert.equal(alice_addr, alice.from)
    assert.equal(bob_addr, bob.from)
    -- A node subscribes in Redis when the room's first client joins there;
    -- until Redis has processed that, messages from other nodes pass it by.
    services.wait_for("both nodes to subscribe", 5, function()
      return numsub(r.port, "duplex:room:deploy") == 2
    end)

    alice.ws:send("hello from node one")
    bob:expect("^alice: hello from node one$")
    bob.ws:send("hello from node two")
    alice:expect("^bob: hello from node two$")
    bob:expect("^bob: hello from node two$")
    alice:expect("^alice: hello from node one$")
    -- Once each: local delivery, and the copy that came back through Redis
    -- was skipped by the node that published it.
    assert.equal(1, alice:copies("alice: hello from node one"))
    assert.equal(1, alice:copies("bob: hello from node two"))
    assert.equal(1, bob:copies("alice: hello from node one"))
    assert.equal(1, bob:copies("bob: hello from node two"))
  end)

  it("serves plain HTTP through the same location (the chat page and /health)", function()
    local status, body = runtime.blocking(function()
      local sock = assert(core.connect { host = "127.0.0.1", port = port, timeout = 2 })
      sock:write("GET /health HTTP/1.1\r\nHost: chat.example\r\n\r\n")
      local buf = ""
      while not buf:find("ok\n", 1, true) do
        local data = sock:read(nil, 5)
        if not data then break end
        buf = buf .. data
      end
      sock:close()
      return buf:match("^HTTP/1%.1 (%d+)"), buf:match("\r\n\r\n(.*)$")
    end)
    assert.equal("200", status)
    assert.equal("ok\n", body)
  end)

  it("terminates TLS: wss outside, ws inside, and the node sees the client's address", function()
    local c = chat_client(("wss://127.0.0.1:%d/ws?nick=carol&room=tls"):format(tls_port),
      { bind = "127.0.0.3", tls = { ca = cert.ca } })
    clients[#clients + 1] = c
    assert.equal("127.0.0.3", c.from)
    c.ws:send("over tls")
    c:expect("^carol: over tls$")
    -- An address the client claims for itself is not believed: the node
    -- takes the rightmost entry that is not a trusted proxy.
    local liar = chat_client(("wss://127.0.0.1:%d/ws?nick=mallory&room=tls"):format(tls_port),
      { bind = "127.0.0.4", tls = { ca = cert.ca }, headers = { ["X-Forwarded-For"] = "203.0.113.9" } })
    clients[#clients + 1] = liar
    assert.equal("127.0.0.4", liar.from)
    -- Without the CA, the client refuses nginx's certificate.
    local ws, err = duplex.connect(("wss://127.0.0.1:%d/ws"):format(tls_port), { timeout = 5 })
    assert.is_nil(ws)
    assert.matches("TLS handshake failed", err)
  end)

  it("haproxy in front of the same nodes passes the client's address too", function()
    local hport = services.free_port()
    local hp = haproxy { port = hport, upstreams = { nodes[1].port, nodes[2].port } }
    local ok, err = pcall(function()
      local c = chat_client(("ws://127.0.0.1:%d/ws?nick=dave&room=deploy"):format(hport), { bind = "127.0.0.5" })
      clients[#clients + 1] = c
      assert.equal("127.0.0.5", c.from)
      c.ws:send("via haproxy")
      alice:expect("^dave: via haproxy$")
      bob:expect("^dave: via haproxy$")
      c.ws:close()
    end)
    hp:cleanup()
    assert(ok, err)
  end)

  it("keeps the chat going across nodes after Redis restarts, without restarting the nodes", function()
    assert(alice and bob, "needs the first test's clients")
    r:stop("KILL")
    services.wait_for("both nodes to notice the outage", 10, function()
      return nodes[1].h:stderr():find("broker down: subscriber", 1, true)
        and nodes[2].h:stderr():find("broker down: subscriber", 1, true)
    end)
    -- A room's lines are stored with their position, which only Redis
    -- gives: one said while it is away waits for it, on every node.
    alice.ws:send("while redis is down")
    assert.equal(0, alice:copies("alice: while redis is down", 0.5))
    assert.equal(0, bob:copies("alice: while redis is down", 0.1))

    r:start()
    services.wait_for("both nodes to reconnect", 15, function()
      return count(nodes[1].h:stderr(), "broker up: subscriber") == 2
        and count(nodes[2].h:stderr(), "broker up: subscriber") == 2
        and count(nodes[1].h:stderr(), "broker up: publisher") == 2
        and count(nodes[2].h:stderr(), "broker up: publisher") == 2
    end)
    services.wait_for("both nodes to resubscribe", 5, function()
      return numsub(r.port, "duplex:room:deploy") == 2
    end)
    alice:expect("^alice: while redis is down$", 10)
    alice.ws:send("redis is back")
    bob:expect("^alice: redis is back$")
    bob.ws:send("so it is")
    alice:expect("^bob: so it is$")
    assert.equal(1, bob:copies("alice: redis is back"))
    assert.equal(1, bob:copies("alice: while redis is down")) -- delivered late, once
    assert.equal(1, alice:copies("alice: while redis is down"))
  end)
end)

-- Heartbeats against a proxy's idle timeout: the echo server pings every
-- second (or never); the client must not ping, or it would keep the
-- connection alive by itself.
local function idle_through(proxy_port, seconds)
  local ws = assert(duplex.connect(("ws://127.0.0.1:%d/"):format(proxy_port), { ping_interval = 0 }))
  opened[#opened + 1] = ws
  assert(ws:send("before"))
  assert.same({ "before", "text" }, { ws:receive(5) })
  local t0 = core.now()
  local r = table.pack(ws:receive(seconds))
  return ws, core.now() - t0, r
end

local function heartbeat_checks(name, start_proxy)
  local echo_pinging, echo_silent, p_pinging, p_silent
  setup(function()
    local ping_port, silent_port
    echo_pinging, ping_port = example { "examples/echo.lua", "--port", "0", "--ping-interval", "1" }
    echo_silent, silent_port = example { "examples/echo.lua", "--port", "0", "--ping-interval", "0" }
    p_pinging = start_proxy(ping_port)
    p_silent = start_proxy(silent_port)
  end)
  teardown(function()
    for _, s in ipairs { p_pinging, p_silent } do s:cleanup() end
    for _, h in ipairs { echo_pinging, echo_silent } do h:cleanup() end
  end)

  it("keeps an idle connection open past the " .. name .. " idle timeout with server pings", function()
    local ws, _, r = idle_through(p_pinging.port, 6)
    assert.same({ nil, "timeout", n = 2 }, r) -- nothing but pings for 6 s, 3x the timeout
    assert(ws:send("after"))
    assert.same({ "after", "text" }, { ws:receive(5) })
    assert.is_true(ws:close())
    assert.equal(1000, ws.close_code)
  end)

  it("is cut by the " .. name .. " idle timeout without them, and the client says so (1006)", function()
    local ws, waited, r = idle_through(p_silent.port, 10)
    assert.is_nil(r[1])
    assert.equal("closed", r[2])
    assert.equal(1006, r[3])
    assert.is_string(r[4])
    assert.is_true(#r[4] > 0)
    assert.equal(1006, ws.close_code)
    assert.is_true(waited > 1.5 and waited < 5, "cut after " .. waited .. " s")
    assert.same({ nil, "closed" }, { ws:send("too late") })
  end)
end

describe("nginx proxy_read_timeout 2s", function()
  heartbeat_checks("nginx", function(upstream)
    local p, tp = services.free_port(), services.free_port()
    return nginx { port = p, tls_port = tp, cert = cert.cert, key = cert.key,
      upstreams = { upstream, upstream }, timeout = "2s" }
  end)
end)

describe("haproxy timeout tunnel 2s", function()
  heartbeat_checks("haproxy", function(upstream)
    local p = services.free_port()
    return haproxy { port = p, upstreams = { upstream, upstream }, timeout = "2s" }
  end)
end)
