-- TLS over loopback sockets, with a throwaway CA made by the openssl CLI.
local core = require "duplex.core"
local certs = require "support.certs"

local run = require("support.loop").run

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

describe("duplex.core TLS", function()
  local c
  setup(function() c = certs.generate() end)
  teardown(function() if c then c.cleanup() end end)

  local function server_ctx(opts)
    opts = opts or {}
    return assert(core.tls_context{mode = "server", cert = opts.cert or c.cert, key = opts.key or c.key,
      alpn = opts.alpn})
  end

  -- A TLS server on host that runs handler(sock) after each handshake;
  -- handshake results go to `results` (true or the error).
  local function tls_server(host, ctx, handler, results)
    local l = assert(core.listen{host = host, port = 0})
    local _, port = l:address()
    core.spawn(function()
      while true do
        local s = l:accept()
        if not s then return end
        core.spawn(function()
          local ok, err = s:starttls(ctx, nil, 5)
          if results then results[#results + 1] = ok or err end
          if ok and handler then handler(s) end
          s:close()
        end)
      end
    end)
    return l, port
  end

  local function echo(s)
    while true do
      local d = s:read()
      if not d then return end
      s:write(d)
    end
  end

  local function client(port, ctx, opts, host)
    local s = assert(core.connect{host = host or "127.0.0.1", port = port, timeout = 5})
    local ok, err = s:starttls(ctx, opts, 5)
    if not ok then s:close() return nil, err end
    return s
  end

  it("verifies the server against the CA and echoes data", function()
    run(function()
      local l, port = tls_server("127.0.0.1", server_ctx{alpn = {"x-other", "http/1.1"}}, echo)
      local ctx = assert(core.tls_context{mode = "client", ca = c.ca, alpn = {"http/1.1"}})
      local s = assert(client(port, ctx, {servername = "localhost"}))
      assert.equal("http/1.1", s:alpn())
      s:write("over tls")
      assert.is_true(s:flush(5))
      assert.equal("over tls", read_n(s, 8, 5))
      s:close()
      l:close()
    end)
  end)

  it("verifies IP literals and defaults the name to the host given to connect", function()
    run(function()
      local ctx = assert(core.tls_context{mode = "client", ca = c.ca})
      for _, host in ipairs({"127.0.0.1", "::1"}) do
        local l, port = tls_server(host, server_ctx(), echo)
        local s = assert(client(port, ctx, nil, host))
        s:write("ip " .. host)
        assert.equal("ip " .. host, read_n(s, 3 + #host, 5))
        s:close()
        l:close()
      end
      local l, port = tls_server("127.0.0.1", server_ctx(), echo)
      local s = assert(client(port, ctx, nil, "localhost"))
      s:close()
      l:close()
    end)
  end)

  it("fails on a certificate for another name, saying so", function()
    run(function()
      local results = {}
      local l, port = tls_server("127.0.0.1", server_ctx{cert = c.wrong_cert, key = c.wrong_key}, nil, results)
      local ctx = assert(core.tls_context{mode = "client", ca = c.ca})
      local s, err = client(port, ctx, {servername = "localhost"})
      assert.is_nil(s)
      assert.equal("certificate verify failed: hostname mismatch", err)
      core.sleep(0.05)
      assert.is_string(results[1]) -- the server saw the handshake fail too
      l:close()
    end)
  end)

  it("never matches a partial wildcard, and a whole-label one only one label deep", function()
    run(function()
      local ctx = assert(core.tls_context{mode = "client", ca = c.ca})
      local l, port = tls_server("127.0.0.1", server_ctx{cert = c.partial_cert, key = c.partial_key})
      local s, err = client(port, ctx, {servername = "bar.example.test"})
      assert.is_nil(s)
      assert.equal("certificate verify failed: hostname mismatch", err)
      l:close()
      l, port = tls_server("127.0.0.1", server_ctx{cert = c.wild_cert, key = c.wild_key})
      s = assert(client(port, ctx, {servername = "bar.example.test"}))
      s:close()
      s, err = client(port, ctx, {servername = "a.bar.example.test"})
      assert.is_nil(s)
      assert.equal("certificate verify failed: hostname mismatch", err)
      l:close()
    end)
  end)

  it("treats an empty servername as none: the host name is still checked", function()
    run(function()
      local results = {}
      local l, port = tls_server("127.0.0.1", server_ctx{cert = c.wrong_cert, key = c.wrong_key}, nil, results)
      local ctx = assert(core.tls_context{mode = "client", ca = c.ca})
      -- the name falls back to the host given to connect, which the
      -- certificate does not name
      local s, err = client(port, ctx, {servername = ""})
      assert.is_nil(s)
      assert.equal("certificate verify failed: IP address mismatch", err)
      l:close()
    end)
  end)

  it("fails on a certificate from an unknown CA, saying so", function()
    run(function()
      local l, port = tls_server("127.0.0.1", server_ctx(), echo)
      local ctx = assert(core.tls_context{mode = "client", ca = c.other_ca})
      local s, err = client(port, ctx, {servername = "localhost"})
      assert.is_nil(s)
      assert.equal("certificate verify failed: unable to get local issuer certificate", err)
      -- the system store does not know the test CA either, and verify is the default
      local sys = assert(core.tls_context{mode = "client"})
      s, err = client(port, sys, {servername = "localhost"})
      assert.is_nil(s)
      assert.matches("^certificate verify failed", err)
      l:close()
    end)
  end)

  it("connects without verification only when asked explicitly", function()
    run(function()
      local l, port = tls_server("127.0.0.1", server_ctx{cert = c.wrong_cert, key = c.wrong_key}, echo)
      local ctx = assert(core.tls_context{mode = "client", verify = false})
      local s = assert(client(port, ctx, {servername = "localhost"}))
      s:write("unverified")
      assert.equal("unverified", read_n(s, 10, 5))
      s:close()
      l:close()
    end)
  end)

  it("moves several MiB both ways over TLS", function()
    local size, chunk = 4 * 1024 * 1024, 100 * 1000
    local function data(seed)
      local t = {}
      for i = 1, size // 16 do t[i] = string.format("%07d-%07d|", i, seed) end
      return table.concat(t)
    end
    local up, down = data(1), data(2)
    local got_up, got_down
    run(function()
      local l, port = tls_server("127.0.0.1", server_ctx(), function(s)
        core.spawn(function()
          for i = 1, size, chunk do
            assert(s:write(down:sub(i, i + chunk - 1)))
            assert(s:drain(256 * 1024, 10))
          end
        end)
        got_up = read_n(s, size, 10)
        assert(s:flush(10))
        s:read(nil, 10) -- until the client is done too
      end)
      local ctx = assert(core.tls_context{mode = "client", ca = c.ca})
      local s = assert(client(port, ctx, {servername = "localhost"}))
      core.spawn(function()
        for i = 1, size, chunk do
          assert(s:write(up:sub(i, i + chunk - 1)))
          assert(s:drain(256 * 1024, 10))
        end
      end)
      got_down = read_n(s, size, 10)
      core.sleep(0.01)
      s:close()
      l:close()
    end, 60)
    assert.equal(size, #got_up)
    assert.is_true(got_up == up, "upload corrupted")
    assert.equal(size, #got_down)
    assert.is_true(got_down == down, "download corrupted")
  end)

  it("sends close_notify on an orderly close: the peer reads 'closed'", function()
    run(function()
      local l, port = tls_server("127.0.0.1", server_ctx(), function(s)
        s:write("bye")
        s:flush(5)
      end)
      local ctx = assert(core.tls_context{mode = "client", ca = c.ca})
      local s = assert(client(port, ctx, {servername = "localhost"}))
      assert.equal("bye", read_n(s, 3, 5))
      assert.same({nil, "closed"}, {s:read(nil, 5)})
      s:close()
      l:close()
    end)
  end)

  it("carries engine output and input through TLS", function()
    run(function()
      local l, port = tls_server("127.0.0.1", server_ctx(), function(s)
        local e = core.engine{role = "server"}
        s:attach(e)
        local _, data = assert(s:receive(e, 5))
        assert(e:send("echo:" .. data))
        s:flush(5)
        s:read(nil, 5)
      end)
      local ctx = assert(core.tls_context{mode = "client", ca = c.ca})
      local s = assert(client(port, ctx, {servername = "localhost"}))
      local e = core.engine{role = "client"}
      s:attach(e)
      assert(e:send(string.rep("z", 100000)))
      local kind, data = assert(s:receive(e, 5))
      assert.equal("text", kind)
      assert.equal("echo:" .. string.rep("z", 100000), data)
      s:close()
      l:close()
    end)
  end)

  it("fails the output, not memory, when an engine is released under a write TLS must repeat", function()
    -- SSL_write wanted its payload bytes again, from a string queued by
    -- reference; then the engine went away with its strings
    local phase = {}
    run(function()
      local l, port = tls_server("127.0.0.1", server_ctx(), function(s)
        local e = core.engine{role = "server"}
        s:attach(e)
        for i = 1, 4 do assert(e:send(string.rep(tostring(i), 4 << 20), "binary")) end
        local last, left = -1, s:try_flush()
        while left ~= last do -- until the kernel takes no more
          core.sleep(0.05)
          last, left = left, s:try_flush()
        end
        assert.is_true(left > 0, "the peer took everything")
        e:release()
        collectgarbage()
        collectgarbage()
        phase.stuck = true
        -- the peer reads now: the socket gets to write again
        while not phase.drained do core.sleep(0.01) end
        phase.flush = {s:flush(5)}
        phase.done = true
      end)
      local ctx = assert(core.tls_context{mode = "client", ca = c.ca})
      local s = assert(client(port, ctx, {servername = "localhost"}))
      while not phase.stuck do core.sleep(0.01) end
      repeat until not s:read(65536, 0.5)
      phase.drained = true
      while not phase.done do core.sleep(0.01) end
      s:close()
      l:close()
    end, 30)
    -- the socket's output is over (the engine's bytes are gone), with an error or nothing left to write
    assert.is_true(phase.flush[1] == true or type(phase.flush[2]) == "string")
  end)

  it("times out a handshake the peer never answers", function()
    run(function()
      local l = assert(core.listen{host = "127.0.0.1", port = 0})
      local _, port = l:address()
      local held
      core.spawn(function() held = l:accept() end) -- accepts, never speaks TLS
      local ctx = assert(core.tls_context{mode = "client", ca = c.ca})
      local s = assert(core.connect{host = "127.0.0.1", port = port})
      local t0 = core.now()
      assert.same({nil, "timeout"}, {s:starttls(ctx, {servername = "localhost"}, 0.1)})
      assert.is_true(core.now() - t0 >= 0.1)
      s:close()
      if held then held:close() end
      l:close()
    end)
  end)

  it("reports context errors", function()
    local ctx, err = core.tls_context{mode = "server", cert = c.dir .. "/missing.pem", key = c.key}
    assert.is_nil(ctx)
    assert.equal("cannot read certificate " .. c.dir .. "/missing.pem: No such file or directory", err)
    ctx, err = core.tls_context{mode = "server", cert = c.cert, key = c.dir .. "/nokey.pem"}
    assert.is_nil(ctx)
    assert.equal("cannot read key " .. c.dir .. "/nokey.pem: No such file or directory", err)
    ctx, err = core.tls_context{mode = "client", ca = c.dir .. "/noca.pem"}
    assert.is_nil(ctx)
    assert.equal("cannot read CA file " .. c.dir .. "/noca.pem: No such file or directory", err)
    ctx, err = core.tls_context{mode = "server"}
    assert.is_nil(ctx)
    assert.matches("needs cert and key", err)
    ctx, err = core.tls_context{mode = "server", cert = c.cert, key = c.wrong_key}
    assert.is_nil(ctx)
    assert.matches("key", err)
    assert.error_matches(function() core.tls_context{mode = "sideways"} end, "mode")
    run(function()
      local l = assert(core.listen{host = "127.0.0.1", port = 0})
      local _, port = l:address()
      core.spawn(function() local s = l:accept(); s:read(nil, 1); s:close() end)
      local s = assert(core.connect{host = "127.0.0.1", port = port})
      local verify = assert(core.tls_context{mode = "client", ca = c.ca})
      s:write("plain")
      assert.same({nil, "output pending: flush before starttls"}, {s:starttls(verify)})
      l:close()
      s:close()
    end)
  end)
end)
