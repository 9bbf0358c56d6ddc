-- permessage-deflate through the public API: negotiation in both roles,
-- the per-message threshold and override, and a broadcast compressed once
-- for every connection without server context takeover.
local duplex = require "duplex"
local core = require "duplex.core"
local pubsub = require "duplex.pubsub"
local run = require("duplex.runtime").blocking

local servers = {}
after_each(function()
  for _, s in ipairs(servers) do s:shutdown(1) end
  servers = {}
end)

local function listen(opts)
  opts.host, opts.port = "127.0.0.1", 0
  local srv = assert(duplex.listen(opts))
  servers[#servers + 1] = srv
  return srv
end

local CHAT = '{"type":"message","room":"lobby","user":"alice","text":"hello everyone, how is it going?"}'

describe("permessage-deflate end to end", function()
  it("negotiates in both roles and echoes compressed messages", function()
    local srv = listen { deflate = true, handler = function(ws)
      for m, k in ws:messages() do ws:send(m, k) end
    end }
    local ws = assert(duplex.connect(srv:url("/"), { deflate = true }))
    assert.is_true(ws.deflate)
    assert.matches("permessage%-deflate", ws.extensions)
    assert.matches("server_no_context_takeover", ws.extensions)
    for i = 1, 50 do
      local msg = string.rep(CHAT, i % 7 + 1)
      ws:send(msg)
      assert.same({ msg, "text" }, { ws:receive(5) })
    end
    ws:send(string.rep("\0\1", 70000), "binary")
    assert.equal(140000, #ws:receive(5))
    ws:close()
  end)

  it("stays off when either side does not want it", function()
    local srv = listen { handler = function(ws) ws:send(tostring(ws.deflate)) end }
    local ws = assert(duplex.connect(srv:url("/"), { deflate = true }))
    assert.is_false(ws.deflate)
    assert.equal("false", (ws:receive(5)))
    ws:close()
    local srv2 = listen { deflate = true, handler = function(ws2) ws2:send(tostring(ws2.deflate)) end }
    ws = assert(duplex.connect(srv2:url("/")))
    assert.equal("false", (ws:receive(5)))
    ws:close()
  end)

  it("fails a too-large inflated message with 1009 on the receiving side", function()
    local srv = listen { deflate = true, max_message = 64 << 10, handler = function(ws)
      for m, k in ws:messages() do ws:send(m, k) end
    end }
    local ws = assert(duplex.connect(srv:url("/"), { deflate = true }))
    ws:send(string.rep("a", 1 << 20)) -- compresses to ~1 KiB on the wire
    local m, err, code, reason = ws:receive(5)
    assert.same({ nil, "closed", 1009, "message too big" }, { m, err, code, reason })
  end)

  it("compresses a broadcast once for all subscribers", function()
    local hub = pubsub.new()
    local joined = 0
    local srv = listen { deflate = true, handler = function(ws)
      hub:subscribe(ws, "news")
      joined = joined + 1
      for _ in ws:messages() do end
      hub:unsubscribe_all(ws)
    end }
    local plain = assert(duplex.connect(srv:url("/")))
    local clients = { plain }
    for i = 2, 6 do clients[i] = assert(duplex.connect(srv:url("/"), { deflate = true })) end
    run(function() while joined < #clients do core.sleep(0.01) end end)
    local msg = string.rep(CHAT, 4)
    assert.equal(#clients, run(function() return hub:publish("news", msg) end))
    for _, ws in ipairs(clients) do assert.same({ msg, "text" }, { ws:receive(5) }) end
    assert.equal(1, hub.stats.compressed)
    -- short messages go plain (below the threshold): nothing compressed
    run(function() return hub:publish("news", "hi") end)
    for _, ws in ipairs(clients) do assert.equal("hi", (ws:receive(5))) end
    assert.equal(1, hub.stats.compressed)
    for _, ws in ipairs(clients) do ws:close() end
  end)

  it("encodes a compressed broadcast frame that an engine with deflate reads", function()
    local frame = core.encode_frame(CHAT, "text", true, 15)
    assert.equal(0xC1, frame:byte(1), "FIN + RSV1 + text")
    assert.is_true(#frame < #CHAT)
    local c = core.engine { role = "client" }
    core.pmd_attach(c, "client", { server_no_context_takeover = true, client_no_context_takeover = false,
      server_max_window_bits = 15, client_max_window_bits = 15 }, {})
    c:feed(frame .. frame)
    assert.same({ "text", CHAT }, { c:next() })
    assert.same({ "text", CHAT }, { c:next() })
    assert.has_error(function() core.encode_frame("x", "ping", true, 15) end)
    assert.has_error(function() core.encode_frame("x", "text", true, 16) end)
  end)
end)
