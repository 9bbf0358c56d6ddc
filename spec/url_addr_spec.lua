-- URL parsing and trusted-proxy address logic (pure Lua parts).
local url = require "duplex.url"
local addr = require "duplex.addr"

describe("url.parse", function()
  it("parses ws and wss URLs with defaults", function()
    local u = assert(url.parse("ws://Example.org/chat?room=1"))
    assert.same({ "ws", "example.org", 80, "/chat?room=1", false, true },
      { u.scheme, u.host, u.port, u.target, u.secure, u.default_port })
    u = assert(url.parse("wss://example.org"))
    assert.same({ 443, "/", true }, { u.port, u.target, u.secure })
    u = assert(url.parse("ws://h:9001?x=1"))
    assert.same({ 9001, "/?x=1" }, { u.port, u.target })
  end)

  it("parses IPv6 literals", function()
    local u = assert(url.parse("ws://[::1]:8080/x"))
    assert.same({ "::1", 8080, "/x" }, { u.host, u.port, u.target })
    assert.equal("[::1]:8080", url.host_header(u))
    assert.equal("[fe80::1]", url.host_header(assert(url.parse("wss://[fe80::1]/"))))
  end)

  it("accepts only hosts a request line and a Host header can carry", function()
    for _, bad in ipairs { "ws://a b/", "ws://evil\r\nX-Injected: 1/", "ws://h\n/", "ws://h\t/", "ws://1.2.3.256/",
      "ws://h%0d%0a/", "ws://[1:2:3:4:5:6:7:8:9]/", "ws://[1::2::3]/", "ws://[:::]/", "ws://[::1%eth0]/",
      "ws://[::1%25]/", "ws://[::1%25a b]/", "ws://" .. string.rep("a", 256) .. "/" } do
      local u, err = url.parse(bad)
      assert.is_nil(u, bad)
      assert.matches("^invalid", err)
      assert.is_nil(err:find("[\r\n]"), "the error quotes the host")
    end
    for s, host in pairs { ["ws://host_name.local/"] = "host_name.local", ["ws://10.0.0.1:9/"] = "10.0.0.1",
      ["ws://[::ffff:1.2.3.4]/"] = "::ffff:1.2.3.4", ["ws://[1:2:3:4:5:6:7:8]/"] = "1:2:3:4:5:6:7:8",
      ["ws://[::]/"] = "::", ["ws://[fe80::1%25eth0]:81/"] = "fe80::1%eth0" } do
      assert.equal(host, assert(url.parse(s)).host, s)
    end
    assert.equal("[fe80::1]:81", url.host_header(url.parse("ws://[fe80::1%25eth0]:81/")))
  end)

  it("rejects what is not a WebSocket URL", function()
    for _, bad in ipairs { "example.org", "ftp://x/", "ws://", "ws://h:0/", "ws://h:70000/",
      "ws://h/#frag", "ws://[zz]/", 42 } do
      local u, err = url.parse(bad)
      assert.is_nil(u, tostring(bad))
      assert.is_string(err)
    end
  end)

  it("resolves redirect locations", function()
    local base = assert(url.parse("ws://a.example:81/x/y?q"))
    assert.equal("wss://b/", url.resolve(base, "wss://b/"))
    assert.equal("ws://a.example:81/z", url.resolve(base, "/z"))
    assert.equal("ws://a.example:81/x/z", url.resolve(base, "z"))
  end)
end)

describe("addr", function()
  it("matches addresses and CIDR blocks, v4 and v6", function()
    local m = addr.matcher { "127.0.0.1", "10.0.0.0/8", "::1", "fd00::/8" }
    assert.is_true(m("127.0.0.1"))
    assert.is_true(m("10.20.30.40"))
    assert.is_false(m("11.0.0.1"))
    assert.is_true(m("::1"))
    assert.is_true(m("fd12:3456::1"))
    assert.is_false(m("fe80::1"))
    assert.is_true(m("::ffff:10.1.2.3"))
    assert.is_false(m("not an ip"))
    assert.has_error(function() addr.matcher { "300.1.1.1" } end)
  end)

  it("takes the client address from X-Forwarded-For only via a trusted proxy", function()
    local trusted = addr.matcher { "127.0.0.1", "10.0.0.0/8" }
    assert.equal("203.0.113.9", addr.client_address("127.0.0.1", "203.0.113.9", trusted))
    -- a forged leftmost entry is ignored: the rightmost untrusted hop wins
    assert.equal("203.0.113.9", addr.client_address("127.0.0.1", "1.2.3.4, 203.0.113.9, 10.1.1.1", trusted))
    -- from an untrusted peer, the header is ignored
    assert.equal("198.51.100.7", addr.client_address("198.51.100.7", "1.2.3.4", trusted))
    -- garbage in the header is not trusted
    assert.equal("127.0.0.1", addr.client_address("127.0.0.1", "evil", trusted))
    assert.equal("2001:db8::5", addr.client_address("127.0.0.1", "[2001:db8::5]", trusted))
  end)
end)
