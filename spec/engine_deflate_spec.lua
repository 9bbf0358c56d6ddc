-- The engine with permessage-deflate negotiated: RSV1 rules, RFC 7692
-- vectors on the wire, limits while inflating, context takeover.
local core = require "duplex.core"
local F = require "support.frames"
local unhex = F.unhex

local KEY = "\x11\x22\x33\x44"
local TAKEOVER = { server_no_context_takeover = false, client_no_context_takeover = false,
  server_max_window_bits = 15, client_max_window_bits = 15 }
local NO_TAKEOVER = { server_no_context_takeover = true, client_no_context_takeover = true,
  server_max_window_bits = 15, client_max_window_bits = 15 }

local function engine(role, params, opts)
  opts = opts or {}
  opts.role = role
  local e = core.engine(opts)
  core.pmd_attach(e, role, params or TAKEOVER, {})
  return e
end

local function events(e, bytes)
  e:feed(bytes)
  local evs = {}
  while true do
    local ev = table.pack(e:next())
    if ev.n == 0 then break end
    evs[#evs + 1] = ev
  end
  return evs
end

describe("engine with permessage-deflate", function()
  it("inflates the RFC 7692 §7.2.3.1 'Hello' (RSV1 set)", function()
    local s = engine("server")
    local evs = events(s, F.build { op = "text", rsv = 4, payload = unhex "f2 48 cd c9 c9 07 00", key = KEY })
    assert.same({ { "text", "Hello", n = 2 } }, evs)
  end)

  it("inflates §7.2.3.2: the second 'Hello' using the shared window", function()
    local c = engine("client")
    local evs = events(c, F.build { op = "text", rsv = 4, payload = unhex "f2 48 cd c9 c9 07 00" }
      .. F.build { op = "text", rsv = 4, payload = unhex "f2 00 11 00 00" })
    assert.same({ { "text", "Hello", n = 2 }, { "text", "Hello", n = 2 } }, evs)
  end)

  it("inflates a compressed message split over fragments (§7.2.3.1 in two frames)", function()
    local c = engine("client")
    local evs = events(c, F.build { op = "text", rsv = 4, fin = false, payload = unhex "f2 48 cd" }
      .. F.build { op = "cont", payload = unhex "c9 c9 07 00" })
    assert.same({ { "text", "Hello", n = 2 } }, evs)
  end)

  it("sends RSV1 on the first frame of a compressed message only", function()
    local c, s = engine("client"), engine("server")
    assert.is_true(c:send("Hello Hello Hello", "text", false, true))
    assert.is_true(c:send(" more", "continuation", true))
    local out = c:data_to_send()
    assert.equal(0x41, out:byte(1), "first frame: RSV1 + text, no FIN")
    local second = 2 + 4 + (out:byte(2) & 0x7f) + 1
    assert.equal(0x80, out:byte(second), "continuation: FIN, no RSV1")
    assert.same({ { "text", "Hello Hello Hello more", n = 2 } }, events(s, out))
  end)

  it("round-trips messages both ways, with and without context takeover", function()
    for _, params in ipairs { TAKEOVER, NO_TAKEOVER } do
      local c, s = engine("client", params), engine("server", params)
      for i = 1, 20 do
        local msg = string.rep('{"user":"alice","text":"hi there"}', i)
        c:send(msg, "text", true, true)
        assert.same({ { "text", msg, n = 2 } }, events(s, c:data_to_send()))
        s:send(msg, "binary", true, true)
        assert.same({ { "binary", msg, n = 2 } }, events(c, s:data_to_send()))
      end
    end
  end)

  it("leaves uncompressed messages alone (compress = false)", function()
    local c, s = engine("client"), engine("server")
    c:send("plain", "text", true, false)
    local out = c:data_to_send()
    assert.equal(0x81, out:byte(1))
    assert.same({ { "text", "plain", n = 2 } }, events(s, out))
  end)

  it("rejects RSV1 on continuation and control frames with 1002", function()
    local s = engine("server")
    local evs = events(s, F.build { op = "text", fin = false, payload = "a", key = KEY }
      .. F.build { op = "cont", rsv = 4, payload = "b", key = KEY })
    assert.equal("error", evs[1][1])
    assert.equal(1002, evs[1][3])
    s = engine("server")
    evs = events(s, F.build { op = "ping", rsv = 4, payload = "", key = KEY })
    assert.equal(1002, evs[1][3])
  end)

  it("closes with 1009 when inflation passes max_message, before allocating it", function()
    local codec = core.pmd_codec("client", TAKEOVER, {})
    local bomb = codec:deflate(string.rep("\0", 20 << 20))
    assert.is_true(#bomb < 64 << 10)
    local s = engine("server", TAKEOVER, { max_message = 1 << 20 })
    local before = collectgarbage("count")
    local evs = events(s, F.build { op = "binary", rsv = 4, payload = bomb, key = KEY })
    assert.equal("error", evs[1][1])
    assert.equal(1009, evs[1][3])
    assert.is_true(collectgarbage("count") - before < 4096, "Lua memory grew while inflating")
  end)

  it("closes with 1007 on corrupt compressed data", function()
    local s = engine("server")
    local evs = events(s, F.build { op = "text", rsv = 4, payload = "\xff\xff\xff\xff\xff", key = KEY })
    assert.equal("error", evs[1][1])
    assert.equal(1007, evs[1][3])
  end)

  it("checks UTF-8 of the inflated text", function()
    local codec = core.pmd_codec("client", TAKEOVER, {})
    local s = engine("server")
    local evs = events(s, F.build { op = "text", rsv = 4, payload = codec:deflate("ok \xc0\xaf"), key = KEY })
    assert.equal(1007, evs[1][3])
  end)

  it("streams inflated pieces when asked", function()
    local codec = core.pmd_codec("client", TAKEOVER, {})
    local msg = string.rep("stream me ", 5000)
    local z = codec:deflate(msg)
    local s = engine("server", TAKEOVER, { streaming = true })
    local frame = F.build { op = "text", rsv = 4, payload = z, key = KEY }
    local got = {}
    for i = 1, #frame, 100 do
      for _, ev in ipairs(events(s, frame:sub(i, i + 99))) do
        assert.equal("fragment", ev[1])
        got[#got + 1] = ev[2]
      end
    end
    assert.equal(msg, table.concat(got))
  end)
end)
