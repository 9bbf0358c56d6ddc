-- duplex.transport's stream contract, checked where a host hands a stream
-- over: a mistake is named there, not found later inside a connection. The
-- streams that keep it are run by the hosts' specs (cqueues, nginx, the
-- LuaSocket example of docs/embedding.md).
local transport = require "duplex.transport"

local function noop() end

describe("duplex.transport's stream contract", function()
  it("names a missing required method, at the host's line", function()
    local ok, err = pcall(function() transport.accept({ read = noop, close = noop }) end)
    assert.is_false(ok)
    assert.matches("transport_spec.lua:%d+: transport.accept: the stream's write must be a method %(required%)", err)
    ok, err = pcall(function() transport.connect({ write = noop, close = noop }, "ws://127.0.0.1:1/") end)
    assert.is_false(ok)
    assert.matches("transport.connect: the stream's read must be a method (required)", err, 1, true)
  end)

  it("refuses an optional method that is not callable", function()
    local ok, err = pcall(transport.connection, { read = noop, write = noop, close = noop, peer = "10.0.0.1" })
    assert.is_false(ok)
    assert.matches("transport.connection: the stream's peer must be a method (optional)", err, 1, true)
  end)

  it("refuses what is no stream at all", function()
    assert.has_error(function() transport.accept(42) end, "transport.accept: a stream object expected, got number")
  end)

  it("checks the hosts' options as duplex.listen checks its own", function()
    local stream = { read = noop, write = noop, close = noop }
    assert.has_error(function() transport.accept(stream, { handshake_timeot = 1 }) end,
      "transport.accept: unknown option 'handshake_timeot'")
    assert.has_error(function() transport.connect(stream, "ws://127.0.0.1:1/", { ping_interval = "often" }) end,
      "transport.connect: option 'ping_interval' must be a number from 0 to 31536000, got \"often\"")
    local dcq = require "duplex.cqueues"
    local cq = require("cqueues").new()
    assert.has_error(function() dcq.listen(cq, { handler = noop, prot = 8080 }) end,
      "duplex.cqueues.listen: unknown option 'prot'")
  end)

  it("takes callable tables as methods", function()
    local callable = setmetatable({}, { __call = function() return nil, "closed" end })
    local stream = { read = callable, write = noop, close = noop }
    assert.has_no.errors(function() transport.check_stream(stream, "host") end)
  end)
end)
