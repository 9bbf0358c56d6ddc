-- The protocol engine (duplex.core.engine) against RFC 6455: framing,
-- fragmentation, control frames, UTF-8, limits and the closing handshake.
-- Every input is fed whole, split at every byte boundary, and byte by byte:
-- the events must not depend on how the bytes arrive.
local core = require "duplex.core"
local F = require "support.frames"
local unhex = F.unhex

local KEY = "\x37\xfa\x21\x3d"

local function drain(e)
  local evs = {}
  while true do
    local ev = table.pack(e:next())
    if ev.n == 0 or ev[1] == nil then break end
    evs[#evs + 1] = ev
  end
  return evs
end

local function run(role, chunks, opts)
  opts = opts or {}
  opts.role = role
  local e = core.engine(opts)
  local evs = {}
  for _, c in ipairs(chunks) do
    e:feed(c)
    for _, ev in ipairs(drain(e)) do evs[#evs + 1] = ev end
  end
  return evs, e
end

-- Fragment-mode events depend on where reads end; whole-message events
-- must not. Returns the events of a whole feed after checking every split.
local function feed_all_ways(role, bytes, opts)
  local whole = run(role, { bytes }, opts)
  local function same(evs, how)
    assert.same(whole, evs, "events differ when fed " .. how)
  end
  for i = 1, #bytes - 1 do
    same((run(role, { bytes:sub(1, i), bytes:sub(i + 1) }, opts)), "split at " .. i)
  end
  if #bytes <= 4096 then
    local bytewise = {}
    for i = 1, #bytes do bytewise[i] = bytes:sub(i, i) end
    same((run(role, bytewise, opts)), "byte by byte")
  end
  return whole
end

local function masked(f) f.key = f.key or KEY; return F.build(f) end

describe("engine: RFC 6455 §5.7 examples", function()
  it("single-frame unmasked text 'Hello' (server to client)", function()
    local evs = feed_all_ways("client", unhex "81 05 48 65 6c 6c 6f")
    assert.same({ { "text", "Hello", n = 2 } }, evs)
  end)

  it("single-frame masked text 'Hello' (client to server)", function()
    local evs = feed_all_ways("server", unhex "81 85 37 fa 21 3d 7f 9f 4d 51 58")
    assert.same({ { "text", "Hello", n = 2 } }, evs)
  end)

  it("fragmented unmasked text 'Hel' + 'lo'", function()
    local evs = feed_all_ways("client", unhex "01 03 48 65 6c  80 02 6c 6f")
    assert.same({ { "text", "Hello", n = 2 } }, evs)
  end)

  it("unmasked ping and masked pong with body 'Hello'", function()
    local evs = feed_all_ways("client", unhex "89 05 48 65 6c 6c 6f")
    assert.same({ { "ping", "Hello", n = 2 } }, evs)
    evs = feed_all_ways("server", unhex "8a 85 37 fa 21 3d 7f 9f 4d 51 58")
    assert.same({ { "pong", "Hello", n = 2 } }, evs)
  end)

  it("256-byte binary message (16-bit length)", function()
    local body = string.rep("\xab", 256)
    local bytes = unhex "82 7e 01 00" .. body
    assert.same({ { "binary", body, n = 2 } }, feed_all_ways("client", bytes))
  end)

  it("64 KiB binary message (64-bit length)", function()
    local body = string.rep("\x01\x02\x03\x04", 16384)
    local bytes = unhex "82 7f 00 00 00 00 00 01 00 00" .. body
    local evs = run("client", { bytes })
    assert.same({ { "binary", body, n = 2 } }, evs)
    -- a few splits across the header and the payload
    for _, i in ipairs { 1, 2, 5, 9, 10, 11, 4000, 65545 } do
      assert.same(evs, (run("client", { bytes:sub(1, i), bytes:sub(i + 1) })))
    end
  end)
end)

describe("engine: messages", function()
  it("delivers several frames from one read in order", function()
    local bytes = masked { op = "text", payload = "a" } .. masked { op = "binary", payload = "\0\1" }
      .. masked { op = "ping", payload = "p" } .. masked { op = "text", payload = "" }
    local evs = feed_all_ways("server", bytes)
    assert.same({ { "text", "a", n = 2 }, { "binary", "\0\1", n = 2 }, { "ping", "p", n = 2 },
      { "text", "", n = 2 } }, evs)
  end)

  it("allows control frames between fragments", function()
    local bytes = masked { op = "text", payload = "Hel", fin = false }
      .. masked { op = "ping", payload = "x" }
      .. masked { op = "cont", payload = "l", fin = false }
      .. masked { op = "pong", payload = "" }
      .. masked { op = "cont", payload = "o" }
    local evs = feed_all_ways("server", bytes)
    assert.same({ { "ping", "x", n = 2 }, { "pong", "", n = 2 }, { "text", "Hello", n = 2 } }, evs)
  end)

  it("gives a fragmented message its first frame's kind, even when the last frame comes alone", function()
    -- found by fuzz_frame: empty first fragments, the payload all in the
    -- final continuation frame, handed out without a copy
    local bytes = F.build { op = "text", payload = "", fin = false }
      .. F.build { op = "cont", payload = "", fin = false } .. F.build { op = "cont", payload = "." }
    assert.same({ { "text", ".", n = 2 } }, feed_all_ways("client", bytes))
  end)

  it("accepts empty fragments and zero-length frames", function()
    local bytes = masked { op = "binary", payload = "", fin = false }
      .. masked { op = "cont", payload = "", fin = false } .. masked { op = "cont", payload = "" }
    assert.same({ { "binary", "", n = 2 } }, feed_all_ways("server", bytes))
  end)

  it("validates UTF-8 across fragment boundaries", function()
    -- U+1F600 split over three frames
    local bytes = masked { op = "text", payload = "\xf0\x9f", fin = false }
      .. masked { op = "cont", payload = "\x98", fin = false } .. masked { op = "cont", payload = "\x80!" }
    assert.same({ { "text", "\xf0\x9f\x98\x80!", n = 2 } }, feed_all_ways("server", bytes))
  end)

  it("answers pings with a pong carrying the same payload", function()
    local _, e = run("server", { masked { op = "ping", payload = "beat" } })
    assert.equal(unhex "8a 04" .. "beat", e:data_to_send())
  end)

  it("does not answer pings when auto_pong is off", function()
    local _, e = run("server", { masked { op = "ping", payload = "beat" } }, { auto_pong = false })
    assert.equal("", e:data_to_send())
  end)

  it("streams fragments when asked, with first/fin flags", function()
    local bytes = masked { op = "text", payload = "Hel", fin = false } .. masked { op = "cont", payload = "lo" }
    local evs = run("server", { bytes:sub(1, 8), bytes:sub(9) }, { streaming = true })
    local got, firsts, fins = {}, 0, 0
    for _, ev in ipairs(evs) do
      assert.equal("fragment", ev[1])
      assert.equal("text", ev[3])
      got[#got + 1] = ev[2]
      if ev[4] then firsts = firsts + 1 end
      if ev[5] then fins = fins + 1 end
    end
    assert.equal("Hello", table.concat(got))
    assert.equal(1, firsts)
    assert.equal(1, fins)
    assert.is_true(evs[#evs][5])
  end)

  it("streams a large frame piece by piece as reads arrive", function()
    local body = string.rep("x", 100000)
    local bytes = masked { op = "binary", payload = body }
    local chunks = {}
    for i = 1, #bytes, 7000 do chunks[#chunks + 1] = bytes:sub(i, i + 6999) end
    local evs = run("server", chunks, { streaming = true })
    assert.is_true(#evs > 10)
    local parts = {}
    for _, ev in ipairs(evs) do parts[#parts + 1] = ev[2] end
    assert.equal(body, table.concat(parts))
  end)
end)

describe("engine: protocol errors", function()
  local function expect_error(role, bytes, code, pattern, opts)
    local evs, e = run(role, { bytes }, opts)
    local last = evs[#evs]
    assert.is_truthy(last, "expected an error event")
    assert.equal("error", last[1])
    assert.equal(code, last[3])
    if pattern then assert.matches(pattern, last[2]) end
    assert.equal("closed", e:state())
    -- the close frame with that code was queued for the peer
    local out = e:data_to_send()
    local payload = role == "client" and F.mask(out:sub(7), out:sub(3, 6)) or out:sub(3)
    assert.equal(code, string.unpack(">I2", payload))
    -- and every split gives the same events
    feed_all_ways(role, bytes, opts)
    return evs
  end

  it("rejects reserved opcodes 3-7 and 11-15", function()
    for _, op in ipairs { 3, 4, 5, 6, 7, 11, 12, 13, 14, 15 } do
      expect_error("server", masked { op = op, payload = "x" }, 1002, "reserved opcode")
    end
  end)

  it("rejects RSV1, RSV2 and RSV3 without an extension", function()
    for _, rsv in ipairs { 1, 2, 4, 3, 7 } do
      expect_error("server", masked { op = "text", payload = "x", rsv = rsv }, 1002, "reserved bits")
    end
  end)

  it("requires masking from clients and forbids it from servers", function()
    expect_error("server", F.build { op = "text", payload = "x" }, 1002, "not masked")
    expect_error("client", masked { op = "text", payload = "x" }, 1002, "masked")
  end)

  it("rejects a 64-bit length with the top bit set", function()
    local bytes = "\x82\xff" .. "\x80\0\0\0\0\0\0\0" .. KEY
    expect_error("server", bytes, 1002, "length")
  end)

  it("rejects control frames over 125 bytes and fragmented control frames", function()
    expect_error("server", masked { op = "ping", payload = string.rep("a", 126) }, 1002, "too long")
    expect_error("server", masked { op = "ping", payload = "a", fin = false }, 1002, "fragmented control")
    expect_error("server", masked { op = "close", payload = "\3\232", fin = false }, 1002)
  end)

  it("rejects continuation without a message and a message inside a message", function()
    expect_error("server", masked { op = "cont", payload = "x" }, 1002, "continuation")
    expect_error("server", masked { op = "text", payload = "a", fin = false }
      .. masked { op = "binary", payload = "b" }, 1002, "inside")
  end)

  it("delivers every frame before the bad one, then fails at it", function()
    local bytes = masked { op = "text", payload = "one" } .. masked { op = "pong", payload = "" }
      .. masked { op = 5, payload = "" } .. masked { op = "text", payload = "never" }
    local evs = expect_error("server", bytes, 1002)
    assert.same({ "text", "one", n = 2 }, evs[1])
    assert.same({ "pong", "", n = 2 }, evs[2])
    assert.equal(3, #evs)
  end)

  it("closes with 1009 when a frame or a message passes its limit", function()
    expect_error("server", masked { op = "binary", payload = string.rep("a", 101) }, 1009, "too big",
      { max_message = 100 })
    expect_error("server", masked { op = "binary", payload = string.rep("a", 11) }, 1009, "frame too big",
      { max_message = 100, max_frame = 10 })
    local frag = masked { op = "binary", payload = string.rep("a", 60), fin = false }
      .. masked { op = "cont", payload = string.rep("a", 60) }
    expect_error("server", frag, 1009, "too big", { max_message = 100 })
  end)

  it("fails a too-large frame on its header, before the payload arrives", function()
    local hdr = F.build { op = "binary", len = 1 << 40, key = KEY }
    local evs = run("server", { hdr })
    assert.equal("error", evs[1][1])
    assert.equal(1009, evs[1][3])
  end)

  it("fails invalid UTF-8 at once, not at the end of the message", function()
    -- the first fragment already holds an impossible byte; the message is
    -- never finished, yet the error comes.
    local evs = run("server", { masked { op = "text", payload = "ab\xff", fin = false } })
    assert.equal("error", evs[1][1])
    assert.equal(1007, evs[1][3])
    -- inside one large frame, before its end arrives
    local big = masked { op = "text", payload = "ok\xc0\xaf" .. string.rep("x", 1000) }
    evs = run("server", { big:sub(1, 20) })
    assert.equal(1007, evs[1][3])
  end)

  it("closes with 1007 on invalid UTF-8 and on a truncated sequence", function()
    expect_error("server", masked { op = "text", payload = "\xed\xa0\x80" }, 1007)
    expect_error("server", masked { op = "text", payload = "\xe2\x82" }, 1007, "ends inside")
    expect_error("server", masked { op = "text", payload = "\xf4\x90\x80\x80" }, 1007)
    expect_error("server", masked { op = "text", payload = "\xf0\x9f", fin = false }
      .. masked { op = "cont", payload = "\x98" }, 1007)
  end)

  it("does not check UTF-8 in binary messages", function()
    assert.same({ { "binary", "\xff\xfe", n = 2 } },
      feed_all_ways("server", masked { op = "binary", payload = "\xff\xfe" }))
  end)

  it("ignores everything after a protocol error", function()
    local evs, e = run("server", { masked { op = 3 }, masked { op = "text", payload = "late" } })
    assert.equal(1, #evs)
    e:feed(masked { op = "text", payload = "later" })
    assert.is_nil(e:next())
  end)
end)

describe("engine: close frames", function()
  local valid = { 1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999 }
  local invalid = { 0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535 }

  it("echoes every valid close code and reports it", function()
    for _, code in ipairs(valid) do
      local evs, e = run("server", { masked { op = "close", payload = F.close_payload(code, "bye") } })
      assert.same({ "close", "bye", code, true, n = 4 }, evs[1])
      assert.equal(F.build { op = "close", payload = F.close_payload(code) }, e:data_to_send())
      assert.equal("closed", e:state())
    end
  end)

  it("answers every invalid close code with 1002", function()
    for _, code in ipairs(invalid) do
      local evs = run("server", { masked { op = "close", payload = F.close_payload(code) } })
      assert.equal("error", evs[1][1], "code " .. code)
      assert.equal(1002, evs[1][3])
    end
  end)

  it("reports 1005 for an empty close frame and answers with an empty one", function()
    local evs, e = run("server", { masked { op = "close" } })
    assert.same({ "close", "", 1005, true, n = 4 }, evs[1])
    assert.equal("\x88\x00", e:data_to_send())
  end)

  it("rejects a 1-byte close payload and a non-UTF-8 reason", function()
    local evs = run("server", { masked { op = "close", payload = "\3" } })
    assert.equal(1002, evs[1][3])
    evs = run("server", { masked { op = "close", payload = F.close_payload(1000, "\xff") } })
    assert.equal(1007, evs[1][3])
  end)

  it("drives the closing handshake when we start it", function()
    local e = core.engine { role = "server" }
    assert.is_true(e:close(1001, "going away"))
    assert.equal("closing", e:state())
    assert.equal(F.build { op = "close", payload = F.close_payload(1001, "going away") }, e:data_to_send())
    assert.same({ nil, "connection is closing or closed" }, { e:send("late") })
    -- control frames from the peer still arrive while closing
    e:feed(masked { op = "ping", payload = "p" })
    assert.same({ "ping", "p" }, { e:next() })
    assert.equal("", e:data_to_send(), "no pong after our close frame")
    e:feed(masked { op = "close", payload = F.close_payload(1000) })
    assert.same({ "close", "", 1000, false }, { e:next() })
    assert.equal("closed", e:state())
    assert.equal("", e:data_to_send(), "no second close frame")
  end)

  it("refuses to send codes that are not valid on the wire", function()
    local e = core.engine { role = "server" }
    for _, code in ipairs { 1004, 1005, 1006, 1015, 999, 5000 } do
      assert.has_error(function() e:close(code) end)
    end
    assert.has_error(function() e:close(1000, string.rep("r", 124)) end)
    assert.is_true(e:close(1000, string.rep("r", 123)))
  end)
end)

describe("engine: sending", function()
  it("writes server frames unmasked, exactly as the RFC shows", function()
    local e = core.engine { role = "server" }
    e:send("Hello")
    e:send(string.rep("\xab", 256), "binary")
    e:ping("Hello")
    assert.equal(unhex "81 05 48 65 6c 6c 6f" .. unhex "82 7e 01 00" .. string.rep("\xab", 256)
      .. unhex "89 05 48 65 6c 6c 6f", e:data_to_send())
    e:send(string.rep("z", 65536), "binary")
    assert.equal(unhex "82 7f 00 00 00 00 00 01 00 00", e:data_to_send():sub(1, 10))
  end)

  it("masks client frames with a fresh key each time", function()
    local c = core.engine { role = "client" }
    local s = core.engine { role = "server" }
    c:send("Hello")
    c:send("Hello")
    local out = c:data_to_send()
    assert.equal(0x81, out:byte(1))
    assert.equal(0x85, out:byte(2))
    assert.not_equal(out:sub(3, 6), out:sub(14, 17), "masking keys repeat")
    s:feed(out)
    assert.same({ "text", "Hello" }, { s:next() })
    assert.same({ "text", "Hello" }, { s:next() })
  end)

  it("sends fragmented messages with interleaved control frames", function()
    local c = core.engine { role = "client" }
    local s = core.engine { role = "server" }
    assert.is_true(c:send("Hel", "text", false))
    assert.is_true(c:ping("mid"))
    assert.same({ nil, "fragment out of sequence" }, { c:send("x", "binary") })
    assert.is_true(c:send("lo", "continuation", true))
    assert.same({ nil, "fragment out of sequence" }, { c:send("x", "continuation") })
    s:feed(c:data_to_send())
    assert.same({ "ping", "mid" }, { s:next() })
    assert.same({ "text", "Hello" }, { s:next() })
  end)

  it("round-trips every size class between a client and a server", function()
    local c = core.engine { role = "client" }
    local s = core.engine { role = "server" }
    for _, n in ipairs { 0, 1, 125, 126, 127, 65535, 65536, 1 << 20 } do
      local msg = string.rep("\x5a", n)
      c:send(msg, "binary")
      s:feed(c:data_to_send())
      assert.same({ "binary", msg }, { s:next() })
      s:send(msg, "binary")
      c:feed(s:data_to_send())
      assert.same({ "binary", msg }, { c:next() })
    end
  end)

  it("errors on programmer mistakes with clear messages", function()
    local e = core.engine { role = "server" }
    assert.has_error(function() e:ping(string.rep("p", 126)) end)
    assert.has_error(function() e:send("x", "bogus") end)
    assert.has_error(function() e:send({}) end)
    assert.has_error(function() core.engine { role = "peer" } end)
    assert.has_error(function() core.engine { role = "server", max_message = -1 } end)
    assert.has_error(function() core.engine() end)
    -- a method called on something else (the fast self check falls back
    -- to the named one): a clear error, not a misread object
    local send, holding = e.send, e.holding
    for _, other in ipairs { {}, "x", io.stdout, core.watcher() } do
      assert.has_error(function() send(other, "x") end)
      assert.has_error(function() holding(other) end)
    end
    assert.has_error(function() core.watcher().next(e) end)
    e:release()
    assert.has_error(function() e:send("x") end, "engine is released")
  end)

  it("encodes a broadcast frame once and queues it on many engines", function()
    local frame = core.encode_frame("news", "text")
    assert.equal(unhex "81 04" .. "news", frame)
    local engines = {}
    for i = 1, 10 do
      engines[i] = core.engine { role = "server" }
      assert.is_true(engines[i]:send_raw(frame))
    end
    local c = core.engine { role = "client" }
    c:feed(engines[7]:data_to_send())
    assert.same({ "text", "news" }, { c:next() })
    assert.has_error(function() c:send_raw(frame) end)
  end)

  it("is released by __close and refuses use afterwards", function()
    do
      local e <close> = core.engine { role = "server" }
      e:send("x")
    end
    local e = core.engine { role = "server" }
    e:release()
    assert.has_error(function() e:send("x") end)
    assert.matches("released", tostring(e))
  end)
end)

describe("engine: control frames inside a fragmented message", function()
  -- The reassembly buffer of the message and the payload of a control frame
  -- split across reads are two things: releasing one must not drop the other.
  local function pair(sender_role, deflate)
    local tx = core.engine { role = sender_role }
    local rx = core.engine { role = sender_role == "client" and "server" or "client" }
    if deflate then
      local p = { server_no_context_takeover = false, client_no_context_takeover = false,
        server_max_window_bits = 15, client_max_window_bits = 15 }
      core.pmd_attach(tx, sender_role, p, {})
      core.pmd_attach(rx, sender_role == "client" and "server" or "client", p, {})
    end
    return tx, rx
  end

  for _, role in ipairs { "client", "server" } do
    for _, deflate in ipairs { false, true } do
      it(string.format("keeps the fragments when a ping is split across reads (%s sends%s)", role,
        deflate and ", compressed" or ""), function()
        local tx, rx = pair(role, deflate)
        assert(tx:send("first half, ", "text", false, deflate))
        assert(tx:ping("a ping payload"))
        assert(tx:send("second half ✓", "continuation", true))
        local wire = tx:data_to_send()
        local ping_at = wire:find(role == "client" and "\x89\x8e" or "\x89\x0e", 1, true)
        assert.is_truthy(ping_at, "ping frame not found")
        -- every cut inside the ping frame (header, mask, payload)
        for cut = ping_at, ping_at + 6 + 14 - 1 do
          local r = select(2, pair(role, deflate))
          r:feed(wire:sub(1, cut))
          local evs = drain(r)
          r:feed(wire:sub(cut + 1))
          for _, ev in ipairs(drain(r)) do evs[#evs + 1] = ev end
          assert.same({ { "ping", "a ping payload", n = 2 }, { "text", "first half, second half ✓", n = 2 } },
            evs, "cut at " .. cut)
        end
        rx:feed(wire)
        assert.same({ "ping", "a ping payload" }, { rx:next() })
      end)
    end
  end
end)

describe("engine: output under a peer that does not read", function()
  it("answers a ping flood with one pong for the latest ping while it waits unwritten", function()
    local e = core.engine { role = "server" }
    local flood = {}
    for i = 1, 200 do flood[i] = masked { op = "ping", payload = "p" .. i } end
    e:feed(table.concat(flood))
    assert.equal(200, #drain(e))
    assert.equal(F.build { op = "pong", payload = "p200" }, e:data_to_send())
    -- once written, the next ping gets its own pong
    e:feed(masked { op = "ping", payload = "again" })
    drain(e)
    assert.equal(F.build { op = "pong", payload = "again" }, e:data_to_send())
  end)

  it("does not move a pong behind other output", function()
    local e = core.engine { role = "server" }
    e:feed(masked { op = "ping", payload = "1" })
    drain(e)
    assert(e:send("reply"))
    e:feed(masked { op = "ping", payload = "2" } .. masked { op = "ping", payload = "3" })
    drain(e)
    assert.equal(F.build { op = "pong", payload = "1" } .. F.build { op = "text", payload = "reply" }
      .. F.build { op = "pong", payload = "3" }, e:data_to_send())
  end)

  it("fails the connection when a frame is queued over max_buffered", function()
    local e = core.engine { role = "server", max_buffered = 100 }
    local frame = core.encode_frame(string.rep("x", 40))
    local sent = 0
    while true do
      local ok, err = e:send_raw(frame)
      if not ok then
        assert.equal("overflow", err)
        break
      end
      sent = sent + 1
    end
    assert.equal(3, sent) -- 0, 42 and 84 bytes waiting were under the limit
    assert.equal("closed", e:state())
    assert.same({ nil, "overflow" }, { e:send("more") })
    assert.same({ nil, "overflow" }, { e:ping() })
    e:feed(masked { op = "text", payload = "ignored" })
    assert.is_nil(e:next())
  end)

  it("reports 1008 when its own pongs pass max_buffered", function()
    local e = core.engine { role = "server", max_buffered = 50 }
    assert(e:send(string.rep("x", 60)))
    e:feed(masked { op = "ping", payload = "p" } .. masked { op = "text", payload = "after" })
    assert.same({ "error", "slow consumer: output over its limit", 1008 }, { e:next() })
    assert.is_nil(e:next())
    assert.equal("closed", e:state())
  end)
end)

describe("engine: integers from Lua are range-checked before any cast", function()
  it("refuses close codes and window bits that would wrap", function()
    local e = core.engine { role = "server" }
    assert.has_error(function() e:close(2 ^ 32 + 1000) end)
    assert.has_error(function() e:close(-1) end)
    assert.has_error(function() e:close(65536 + 1000) end)
    assert.equal("open", e:state())
    assert.has_error(function() core.encode_frame("x", "text", true, 2 ^ 32 + 15) end)
    assert.has_error(function() core.encode_frame("x", "text", true, -1) end)
    assert(e:close(1000))
    assert.equal(F.build { op = "close", payload = F.close_payload(1000) }, e:data_to_send())
  end)

  it("refuses process ids and signal numbers that would wrap", function()
    assert.has_error(function() core.kill(2 ^ 32 + 1) end)
    assert.has_error(function() core.kill(core.getpid(), 2 ^ 32 + 15) end)
    assert.has_error(function() core.waitpid(2 ^ 40) end)
  end)
end)

describe("engine: what we send as text is UTF-8", function()
  it("refuses invalid text before queueing anything, whole or in pieces", function()
    local e = core.engine { role = "server" }
    assert.has_error(function() e:send("\xff\xfe") end, "text message is not valid UTF-8 (send it as binary)")
    assert.has_error(function() e:send("ok \xe2\x82") end) -- ends inside a sequence
    assert.equal(0, e:pending())
    assert(e:send("\xff\xfe", "binary"))
    e:data_to_send()
    -- a sequence may straddle pieces; the last piece must complete it
    assert(e:send("caf\xc3", "text", false))
    assert(e:send("\xa9 ", "continuation", false))
    assert.has_error(function() e:send("\xe2\x82", "continuation", true) end)
    assert(e:send("\xe2\x82\xac", "continuation", true))
    assert.has_error(function() core.encode_frame("\xc0\xaf") end)
  end)
end)

describe("engine: clocks (heartbeat and close deadline)", function()
  -- the engine reads no clock of its own accord: these wait on core.now,
  -- the clock the binding tells it (at set_timing, feed, ping, close, tick)
  local function wait_until(t) while core.now() < t do end end
  local function server(interval, timeout, close_timeout)
    local e = core.engine { role = "server" }
    e:set_timing(interval, timeout, close_timeout)
    return e
  end

  it("keeps no clock until set_timing, and none with heartbeats off on a quiet engine", function()
    assert.is_nil(core.engine({ role = "server" }):due())
    assert.is_nil(core.engine({ role = "server" }):tick())
    assert.is_nil(server(0, 1, 1):due())
  end)

  it("pings a quiet peer after ping_interval, and takes the pong's round trip", function()
    local e = server(0.05, 1, 1)
    local t0 = core.now()
    local due = e:due()
    assert.is_true(due >= t0 and due <= t0 + 0.05, "due " .. (due - t0))
    assert.is_nil(e:tick())
    assert.equal("", e:data_to_send(), "no ping before it is due")
    wait_until(due)
    assert.is_nil(e:tick())
    assert.equal(F.build { op = "ping", payload = "" }, e:data_to_send())
    assert.is_true(e:due() > due, "the next due time is later")
    e:feed(masked { op = "pong", payload = "" })
    local kind, data, latency = e:next()
    assert.same({ "pong", "" }, { kind, data })
    assert.is_number(latency)
    assert.is_true(latency >= 0 and latency < 1)
    -- a second pong answers no ping of ours: no latency
    e:feed(masked { op = "pong", payload = "" })
    assert.same({ "pong", "" }, { e:next() })
  end)

  it("fails a peer silent for ping_timeout after the ping, but not one whose traffic proves it alive", function()
    local e = server(0.02, 0.03, 1)
    wait_until(e:due())
    assert.is_nil(e:tick()) -- the ping
    e:data_to_send()
    wait_until(e:due())
    assert.equal("ping timeout", e:tick())

    local alive = server(0.02, 0.03, 1)
    wait_until(alive:due())
    assert.is_nil(alive:tick())
    alive:feed(masked { op = "text", payload = "late but here" })
    assert.same({ "text", "late but here" }, { alive:next() })
    wait_until(alive:due())
    assert.is_nil(alive:tick(), "traffic after the ping counts as an answer")
  end)

  it("times our own ping too: its pong gives the latency", function()
    local e = server(10, 0.05, 1)
    local t0 = core.now()
    assert.is_true(e:ping("app"))
    assert.is_true(e:due() <= t0 + 0.06, "the pong of an application's ping is due after ping_timeout")
    e:feed(masked { op = "pong", payload = "app" })
    local _, _, latency = e:next()
    assert.is_number(latency)
  end)

  it("gives the peer close_timeout to answer our close frame", function()
    local e = server(10, 10, 0.03)
    local t0 = core.now()
    assert.is_true(e:close(1000))
    local due = e:due()
    assert.is_true(due >= t0 + 0.03 and due <= t0 + 0.05, "due " .. (due - t0))
    assert.is_nil(e:tick())
    wait_until(due)
    assert.equal("close timeout", e:tick())
  end)

  it("gives a quiet second's buffers back at its tick", function()
    local e = server(0, 1, 1)
    e:feed(masked { op = "text", payload = ("x"):rep(4000), fin = false })
    assert.is_nil(e:next())
    e:feed(masked { op = "cont", payload = "y" })
    assert.equal("text", (e:next()))
    assert.is_true(e:holding())
    local due = e:due()
    assert.is_number(due, "buffers to give back make the clock due")
    wait_until(due)
    assert.is_nil(e:tick())
    assert.is_false(e:holding())
    assert.is_nil(e:due())
  end)

  it("checks its arguments", function()
    local e = core.engine { role = "server" }
    assert.has_error(function() e:set_timing(1, 0, 1) end)
    assert.has_error(function() e:set_timing(1, 1, -1) end)
    assert.has_error(function() e:set_timing("x", 1, 1) end)
  end)
end)
