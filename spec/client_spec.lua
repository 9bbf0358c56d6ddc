-- Client features: HTTP proxies (CONNECT, with basic auth), redirects only
-- when asked, custom headers, timeouts.
local duplex = require "duplex"
local core = require "duplex.core"
local run = require("duplex.runtime").blocking

local servers = {}
after_each(function()
  for _, s in ipairs(servers) do s:shutdown(1) end
  servers = {}
end)

local function echo_server(extra)
  local opts = { host = "127.0.0.1", port = 0, handler = function(ws, req)
    ws:send(req.headers["x-hello"] or "no header")
    for m, k in ws:messages() do ws:send(m, k) end
  end }
  for k, v in pairs(extra or {}) do opts[k] = v end
  local srv = assert(duplex.listen(opts))
  servers[#servers + 1] = srv
  return srv
end

local start_proxy = require("support.proxy").start

describe("client", function()
  it("sends custom headers", function()
    local srv = echo_server()
    local ws = assert(duplex.connect(srv:url("/"), { headers = { ["X-Hello"] = "world" } }))
    assert.equal("world", (ws:receive(5)))
    ws:close()
  end)

  it("goes through an HTTP proxy with CONNECT and basic auth", function()
    local srv = echo_server()
    -- "user:p@ss w" base64-encoded
    local proxy = start_proxy("dXNlcjpwQHNzIHc=")
    local url = srv:url("/")
    local ws = assert(duplex.connect(url, { proxy = "http://user:p%40ss%20w@127.0.0.1:" .. proxy.port }))
    assert.equal("no header", (ws:receive(5)))
    ws:send("through the tunnel")
    assert.equal("through the tunnel", (ws:receive(5)))
    ws:close()
    assert.matches("^CONNECT 127%.0%.0%.1:" .. srv.port .. " HTTP/1%.1", proxy.requests[1])
    local bad, err = duplex.connect(url, { proxy = "http://user:wrong@127.0.0.1:" .. proxy.port })
    assert.is_nil(bad)
    assert.matches("407", err)
    -- an https:// proxy would get the credentials in clear over plain TCP
    local n = #proxy.requests
    bad, err = duplex.connect(url, { proxy = "https://user:pass@127.0.0.1:" .. proxy.port })
    assert.is_nil(bad)
    assert.matches("unsupported proxy scheme https://", err)
    assert.equal(n, #proxy.requests)
    proxy.close()
  end)

  it("follows a redirect only when asked", function()
    local target = echo_server()
    local srv = echo_server { on_request = function(req)
      if req.path == "/old" then return 302, "moved", { Location = target:url("/new") } end
    end }
    local ws, err, res = duplex.connect(srv:url("/old"))
    assert.is_nil(ws)
    assert.matches("302", err)
    assert.equal(target:url("/new"), res.headers.location)
    ws = assert(duplex.connect(srv:url("/old"), { follow_redirects = true }))
    assert.equal("no header", (ws:receive(5)))
    assert.equal(target.port, ws.remote_port)
    ws:close()
    -- a redirect loop ends
    local loop = echo_server { on_request = function(req) return 302, "", { Location = req.path } end }
    ws, err = duplex.connect(loop:url("/x"), { follow_redirects = 3 })
    assert.is_nil(ws)
    assert.matches("302", err)
  end)

  it("sends credentials to the origin asked for only, and never leaves wss:// for ws://", function()
    local seen = {}
    local target = echo_server { on_request = function(req)
      seen[#seen + 1] = { auth = req.headers.authorization, cookie = req.headers.cookie,
        other = req.headers["x-hello"] }
    end }
    -- same scheme, host and port: credentials go along
    local srv = echo_server { on_request = function(req)
      if req.path == "/here" then return 302, "", { Location = "/there" } end
      if req.path == "/away" then -- the same server under another host name
        return 302, "", { Location = "ws://localhost:" .. target.port .. "/" }
      end
      seen[#seen + 1] = { auth = req.headers.authorization, cookie = req.headers.cookie }
    end }
    local opts = { follow_redirects = true, headers = { Authorization = "Bearer secret", cookie = "s=1",
      ["X-Hello"] = "hi" } }
    local ws = assert(duplex.connect(srv:url("/here"), opts))
    ws:close()
    assert.same({ auth = "Bearer secret", cookie = "s=1" }, seen[1])
    ws = assert(duplex.connect(srv:url("/away"), opts))
    ws:close()
    assert.same({ other = "hi" }, seen[2]) -- another origin: no Authorization, no Cookie
    assert.equal("Bearer secret", opts.headers.Authorization) -- the caller's table is untouched
    assert.is_nil(opts.timeout)

    local c = require("support.certs").generate()
    local secure = echo_server { tls = { cert = c.cert, key = c.key }, on_request = function()
      return 302, "", { Location = "ws://127.0.0.1:" .. target.port .. "/" }
    end }
    local bad, err = duplex.connect("wss://localhost:" .. secure.port .. "/", { follow_redirects = true,
      tls = { ca = c.ca } })
    c.cleanup()
    assert.is_nil(bad)
    assert.matches("refused a redirect from wss:// to ws://", err)
    assert.equal(2, #seen)
    assert.has_error(function() duplex.connect(srv:url("/"), { follow_redirects = -1 }) end)
  end)

  it("takes the extension's name in any case (RFC 7692 tokens are case-insensitive)", function()
    -- a server of our own that answers "PerMessage-Deflate" and then sends
    -- a compressed message
    local listener = assert(core.listen { host = "127.0.0.1", port = 0 })
    local _, port = listener:address()
    core.spawn(function()
      local s = listener:accept()
      if not s then return end
      local hs = core.handshake_server()
      local req
      repeat req = hs:feed(assert(s:read(nil, 5))) until req
      s:write(core.handshake_response { key = req.key,
        extensions = "PerMessage-Deflate; Server_No_Context_Takeover" })
      s:write(core.encode_frame(string.rep("squeeze me ", 20), "text", true, 15))
      s:flush(5)
      s:read(nil, 5)
      s:close()
    end)
    local ws = assert(duplex.connect("ws://127.0.0.1:" .. port .. "/", { deflate = true }))
    assert.is_true(ws.deflate)
    assert.same({ string.rep("squeeze me ", 20), "text" }, { ws:receive(5) })
    ws:abort()
    listener:close()
  end)

  it("checks every option when called: unknown names and wrong values name the option", function()
    local function err_of(f) local ok, e = pcall(f) assert.is_false(ok) return e end
    local h = function() end
    assert.matches("listen: option 'max_connections' must be an integer", err_of(function()
      duplex.listen { host = "127.0.0.1", port = 0, handler = h, max_connections = "many" } end))
    assert.matches("listen: unknown option 'timeot'", err_of(function()
      duplex.listen { host = "127.0.0.1", port = 0, handler = h, timeot = 5 } end))
    assert.matches("listen: route /x: unknown option 'max_mesage'", err_of(function()
      duplex.listen { host = "127.0.0.1", port = 0, routes = { ["/x"] = { handler = h, max_mesage = 1 } } } end))
    assert.matches("option 'tls' must be a table without the field 'certfile'", err_of(function()
      duplex.listen { host = "127.0.0.1", port = 0, handler = h, tls = { certfile = "x" } } end))
    assert.matches("option 'port' must be an integer from 0 to 65535", err_of(function()
      duplex.listen { host = "127.0.0.1", port = 70000, handler = h } end))
    assert.matches("connect: unknown option 'timeot'", err_of(function()
      duplex.connect("ws://127.0.0.1:1/", { timeot = 5 }) end))
    assert.matches("connect: option 'ping_interval' must be a number", err_of(function()
      duplex.connect("ws://127.0.0.1:1/", { ping_interval = "often" }) end))
    -- nothing was left listening by the refused calls
    local srv = echo_server { max_connections = 5, ping_interval = 0 }
    assert.is_number(srv.port)
  end)

  it("names the address when listen fails, and sleeps from the main chunk", function()
    local srv = echo_server()
    local again, err = duplex.listen { host = "127.0.0.1", port = srv.port, handler = function() end }
    assert.is_nil(again)
    assert.equal("listen on 127.0.0.1:" .. srv.port .. " failed: address already in use", err)
    local t = core.now()
    duplex.sleep(0.05) -- the main chunk: runs the loop meanwhile
    assert.is_true(core.now() - t >= 0.04)
  end)

  it("times out a server that accepts TCP but never answers the handshake", function()
    local listener = assert(core.listen { host = "127.0.0.1", port = 0 })
    local _, port = listener:address()
    local held = {}
    core.spawn(function()
      while true do
        local s = listener:accept()
        if not s then return end
        held[#held + 1] = s
      end
    end)
    local t0 = core.now()
    local ws, err = duplex.connect("ws://127.0.0.1:" .. port .. "/", { timeout = 0.3 })
    assert.is_nil(ws)
    assert.matches("timed out", err)
    assert.is_true(core.now() - t0 < 2)
    listener:close()
    for _, s in ipairs(held) do s:close() end
    run(core.sleep, 0.01)
  end)
end)
