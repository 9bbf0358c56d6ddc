-- The spec helpers and reference peers, checked against each other before
-- they are used against duplex: if these fail, an interop failure elsewhere
-- says nothing about duplex.
local proc = require "support.proc"
local peers = require "support.peers"

-- A killed process whose parent is gone may stay a zombie here (pid 1 does
-- not always reap): that counts as dead.
local function alive(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return false end
  local stat = f:read("a")
  f:close()
  return stat:match("%)%s+(%a)") ~= "Z"
end

describe("support.proc", function()
  teardown(proc.killall)

  it("reads a child's stdout line by line and returns its exit status", function()
    local h = proc.spawn({"sh", "-c", "echo one; echo two >&2; echo 'three four'; printf last; exit 3"})
    assert.equal("one", h:read_line(5))
    assert.equal("three four", h:read_line(5))
    assert.equal("last", h:read_line(5))
    local line, why = h:read_line(5)
    assert.is_nil(line)
    assert.equal("exited", why)
    assert.equal(3, h:wait(5))
    assert.equal("two\n", h:stderr())
    assert.matches("one\nthree four\nlast\ntwo\n", h:output(), 1, true)
    h:cleanup()
  end)

  it("gives up on a silent child after the timeout instead of hanging", function()
    local h = proc.spawn({"sleep", "30"})
    local t0 = proc.now()
    local line, why = h:read_line(0.3)
    assert.is_nil(line)
    assert.equal("timeout", why)
    assert.is_nil((h:wait(0.2)))
    assert.is_true(proc.now() - t0 < 5)
    assert.is_true(h:running())
    assert.is_true(h:kill())
    assert.equal(128 + 15, h:wait(5))
    h:cleanup()
  end)

  it("passes environment and working directory, and can unset variables", function()
    local code, out = proc.run({"sh", "-c", "echo \"$DX_A|${DX_B-unset}|$(pwd)\""},
      {env = {DX_A = "it's a test", DX_B = false}, cwd = "/tmp"})
    assert.equal(0, code)
    assert.equal("it's a test|unset|/tmp\n", out)
  end)

  it("kills what the child started too", function()
    local h = proc.spawn({"sh", "-c", "sleep 31 & echo $!; wait"})
    local grandchild = assert(tonumber(h:read_line(5)))
    assert.is_true(alive(grandchild))
    h:kill()
    assert.is_not_nil(h:wait(5))
    proc.sleep(0.1)
    assert.is_false(alive(grandchild))
    h:cleanup()
  end)

  it("kills a child that ignores SIGTERM when cleaning up", function()
    local h = proc.spawn({"sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"})
    assert.equal("ready", h:read_line(5))
    local pid = h:pid()
    assert.is_true(alive(pid))
    proc.killall()
    assert.is_false(alive(pid))
  end)

  it("reports a program that does not exist", function()
    local code, _, err = proc.run({"duplex-no-such-program"})
    assert.equal(127, code)
    assert.matches("not found", err)
  end)

  it("ends a child that outlives its limit", function()
    local h = proc.spawn({"sleep", "30"}, {limit = 1})
    assert.equal(124, h:wait(10))
    h:cleanup()
  end)
end)

describe("reference peers", function()
  teardown(proc.killall)

  local servers = {
    node = peers.node_echo_server,
    python = peers.py_echo_server,
  }
  local clients = {
    node = peers.node_client,
    python = peers.py_client,
  }

  local function ok(code, res)
    assert.is_true(res.ok, res.error)
    assert.equal(0, code)
    return res
  end

  for _, server_kind in ipairs({"node", "python"}) do
    for _, client_kind in ipairs({"node", "python"}) do
      for _, deflate in ipairs({false, true}) do
        local name = string.format("%s client <-> %s server%s", client_kind, server_kind,
          deflate and " with permessage-deflate" or "")
        it(name, function()
          local srv = servers[server_kind]({deflate = deflate})
          local res = ok(clients[client_kind](srv.url, {
            deflate = deflate, count = 6, size = 3000,
            "--send-text", "héllo wörld 😀", "--send-text", "", "--send-binary-hex", "00ff7f80",
          }))
          assert.equal(9, res.received)
          assert.equal(1000, res.close_code)
          assert.equal(deflate and "permessage-deflate" or "", res.extensions)
          res = ok(clients[client_kind](srv.url, {deflate = deflate, count = 5, size = 70000, fragment = true}))
          assert.equal(5, res.received)
          assert.equal(0, srv:stop())
          assert.matches("open 1 ", srv:output())
        end)
      end
    end
  end

  for _, kind in ipairs({"node", "python"}) do
    local other = kind == "node" and "python" or "node"

    it(kind .. " server selects the subprotocol it is given, and only that one", function()
      local srv = servers[kind]({protocol = "chat.v2"})
      local res = ok(clients[other](srv.url, {protocol = "chat.v2"}))
      assert.equal("chat.v2", res.protocol)
      local code
      code, res = clients[other](srv.url, {protocol = "other"})
      assert.equal(1, code)
      assert.is_false(res.ok)
      assert.matches("subprotocol", res.error)
      srv:stop()
    end)

    it(kind .. " server serves only its --path", function()
      local srv = servers[kind]({path = "/echo"})
      assert.matches("/echo$", srv.url)
      ok(clients[other](srv.url, {}))
      local code, res = clients[other](srv.url:gsub("/echo$", "/nope"), {})
      assert.equal(1, code)
      assert.matches("400", res.error)
      srv:stop()
    end)

    it(kind .. " server closes with the code and reason it is given", function()
      local srv = servers[kind]({close_code = 4001, close_reason = "bye now"})
      local res = ok(clients[other](srv.url, {expect_close = 4001, "--send-text", "x"}))
      assert.equal(4001, res.close_code)
      assert.equal("bye now", res.close_reason)
      srv:stop()
    end)

    it(kind .. " server closes after N messages, and the client notices a short echo", function()
      local srv = servers[kind]({close_after = 2})
      local res = ok(clients[other](srv.url, {expect_close = 1000, count = 2}))
      assert.equal(2, res.received)
      local code
      code, res = clients[other](srv.url, {count = 3})
      assert.equal(1, code)
      assert.is_false(res.ok)
      assert.equal(2, res.received)
      -- Expecting the wrong close code must fail too.
      code, res = clients[other](srv.url, {expect_close = 1001, count = 2})
      assert.equal(1, code)
      assert.matches("expected close code 1001", res.error)
      srv:stop()
    end)

    it(kind .. " server refuses a message over --max-payload with 1009", function()
      local srv = servers[kind]({max_payload = 1000})
      ok(clients[other](srv.url, {count = 2, size = 1000}))
      local code, res = clients[other](srv.url, {expect_close = 1009, count = 1, size = 1001})
      assert.equal(0, code, res.error)
      assert.equal(0, res.received)
      srv:stop()
    end)

    it(kind .. " server speaks wss with the certificate it is given", function()
      local dir = os.tmpname()
      os.remove(dir)
      assert.is_true(os.execute("mkdir " .. dir))
      finally(function() os.execute("rm -rf " .. dir) end)
      local code, _, err = proc.run({"openssl", "req", "-x509", "-nodes",
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-subj", "/CN=localhost", "-days", "1", "-keyout", dir .. "/key.pem", "-out", dir .. "/cert.pem"})
      assert.equal(0, code, err)
      local srv = servers[kind]({tls_cert = dir .. "/cert.pem", tls_key = dir .. "/key.pem"})
      assert.matches("^wss://", srv.url)
      local res = ok(clients[other](srv.url, {insecure = true, count = 3}))
      assert.equal(3, res.received)
      -- Without --insecure the self-signed certificate must be refused.
      code, res = clients[other](srv.url, {count = 1})
      assert.equal(1, code)
      assert.is_false(res.ok)
      srv:stop()
    end)

    it(kind .. " client reports a refused connection as a failure", function()
      local srv = servers[kind]({})
      local url = srv.url
      assert.equal(0, srv:stop())
      local code, res = clients[kind](url, {timeout = 10})
      assert.equal(1, code)
      assert.is_false(res.ok)
      assert.is_string(res.error)
    end)
  end
end)
