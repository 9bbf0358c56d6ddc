-- permessage-deflate (RFC 7692): the codec (core.pmd_codec) and the
-- negotiation functions (core.pmd_offer, pmd_accept, pmd_check_response).
local core = require "duplex.core"

local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

local function unhex(h)
  return (h:gsub("%s", ""):gsub("..", function(x) return string.char(tonumber(x, 16)) end))
end

-- A server codec and a client codec sharing the agreed parameters.
local function pair(params, cfg)
  return core.pmd_codec("server", params, cfg), core.pmd_codec("client", params, cfg)
end

-- Text with repeats at many distances, and bytes that do not compress.
local function sample(n, seed)
  local words = { "alpha ", "beta ", "gamma ", "delta ", "epsilon ", "zeta ", "eta ", "theta " }
  local out, x = {}, seed or 1
  local len = 0
  while len < n do
    x = (x * 1103515245 + 12345) % 2147483648
    local w = (x >> 16) % 4 == 0 and string.char(x % 256, (x >> 8) % 256) or words[(x >> 16) % 8 + 1]
    out[#out + 1] = w
    len = len + #w
  end
  return table.concat(out):sub(1, n)
end

-- Lines of /proc/self/status, to watch the process's peak memory.
local function peak_kb()
  for line in io.lines("/proc/self/status") do
    local v = line:match("^VmHWM:%s*(%d+)")
    if v then return tonumber(v) end
  end
end

local function reset_peak()
  local f = io.open("/proc/self/clear_refs", "w")
  if not f then return false end
  local ok = f:write("5")
  f:close()
  return ok and true
end

-- A small Sec-WebSocket-Extensions parser producing the handshake parser's
-- shape, so header strings can be fed back to the negotiation functions.
local function parse_extensions(header)
  local list = {}
  for elem in header:gmatch("[^,]+") do
    local parts = {}
    for part in elem:gmatch("[^;]+") do parts[#parts + 1] = part:match("^%s*(.-)%s*$") end
    local e = { name = parts[1], params = {}, params_list = {} }
    for i = 2, #parts do
      local k, v = parts[i]:match("^([^=]+)=(.*)$")
      if not k then k, v = parts[i], true else v = v:match('^"(.*)"$') or v end
      e.params[k] = v
      e.params_list[#e.params_list + 1] = { k, v }
    end
    list[#list + 1] = e
  end
  return list
end

-- An offer element, parameters in order (repeats allowed).
local function pmd(...)
  local e = { name = "permessage-deflate", params = {}, params_list = {} }
  for _, kv in ipairs({ ... }) do
    e.params[kv[1]] = kv[2]
    e.params_list[#e.params_list + 1] = kv
  end
  return e
end

local HELLO = unhex "f2 48 cd c9 c9 07 00"

describe("permessage-deflate codec", function()
  describe("RFC 7692 section 7.2.3 examples", function()
    it("7.2.3.1: 'Hello' is one compressed block, whole or in fragments", function()
      local s, c = pair()
      assert.equal(hex(HELLO), hex(s:deflate("Hello")))
      assert.equal("Hello", c:inflate(HELLO))
      -- "if the fragments are 3 and 4 octets"
      assert.equal("He", c:inflate(HELLO:sub(1, 3), false))
      local rest = c:inflate(HELLO:sub(4), true)
      assert.equal("llo", rest)
    end)

    it("7.2.3.2: a second 'Hello' refers back to the first with context takeover", function()
      local s, c = pair()
      assert.equal(hex(HELLO), hex(s:deflate("Hello")))
      assert.equal("f200110000", hex(s:deflate("Hello")))
      assert.equal("Hello", c:inflate(HELLO))
      assert.equal("Hello", c:inflate(unhex "f2 00 11 00 00"))
    end)

    it("7.2.3.2: without context takeover both messages are the same bytes", function()
      local s, c = pair { server_no_context_takeover = true }
      assert.equal(hex(HELLO), hex(s:deflate("Hello")))
      assert.equal(hex(HELLO), hex(s:deflate("Hello")))
      -- and a back reference into the previous message cannot be resolved
      assert.equal("Hello", c:inflate(HELLO))
      local out, err = c:inflate(unhex "f2 00 11 00 00")
      assert.is_nil(out)
      assert.equal("invalid data", err)
    end)

    it("7.2.3.3: a block with no compression", function()
      local _, c = pair()
      assert.equal("Hello", c:inflate(unhex "00 05 00 fa ff 48 65 6c 6c 6f 00"))
    end)

    it("7.2.3.4: a block with BFINAL set, then more messages", function()
      local _, c = pair()
      assert.equal("Hello", c:inflate(unhex "f3 48 cd c9 c9 07 00 00"))
      -- the stream is restarted; the window is kept, so a back reference
      -- to the previous message still resolves under context takeover
      assert.equal("Hello", c:inflate(unhex "f2 00 11 00 00"))
      assert.equal("Hello", c:inflate(HELLO))
      -- in fragments, the pieces after the final block are padding
      assert.equal("Hello", c:inflate(unhex "f3 48 cd c9 c9 07 00", false))
      assert.equal("", c:inflate("\0", false))
      assert.equal("", c:inflate("", true))
      assert.equal("Hello", c:inflate(HELLO))
    end)

    it("7.2.3.5: two blocks in one message", function()
      local _, c = pair()
      assert.equal("Hello", c:inflate(unhex "f2 48 05 00 00 00 ff ff ca c9 c9 07 00"))
    end)

    it("7.2.3.6: an empty message is the single octet 0x00", function()
      local s, c = pair()
      assert.equal("00", hex(s:deflate("")))
      assert.equal("", c:inflate("\0"))
      -- the empty last fragment of a message ended by the data before it
      assert.equal("f248050000" .. "00ffff", hex(s:deflate("He", false)))
      assert.equal("00", hex(s:deflate("", true)))
      assert.equal("He", c:inflate(unhex "f2 48 05 00 00 00 ff ff", false))
      assert.equal("", c:inflate("\0", true))
      -- the window survived all of that
      assert.equal("Hello", c:inflate(HELLO))
      assert.equal("Hello", c:inflate(unhex "f2 00 11 00 00"))
    end)

    it("takes a compressed message with no payload at all as empty, leaving the window alone", function()
      local _, c = pair()
      assert.equal("Hello", c:inflate(HELLO))
      assert.equal("", c:inflate(""))
      assert.equal("Hello", c:inflate(unhex "f2 00 11 00 00"))
    end)
  end)

  describe("round trips", function()
    local repeat_me = sample(200, 5)
    local messages = {
      sample(3000, 1), sample(70000, 2), "", sample(1, 3), repeat_me, repeat_me, sample(300, 4),
    }

    for bits = 8, 15 do
      for _, takeover in ipairs { true, false } do
        it(("window bits %d, %s"):format(bits, takeover and "context takeover" or "no context takeover"), function()
          local params = {
            server_max_window_bits = bits, client_max_window_bits = bits,
            server_no_context_takeover = not takeover, client_no_context_takeover = not takeover,
          }
          local s, c = pair(params)
          local sizes = {}
          for i, m in ipairs(messages) do
            local z = s:deflate(m)
            sizes[i] = #z
            assert.equal(m, c:inflate(z))
            z = c:deflate(m)
            assert.equal(m, s:inflate(z))
          end
          -- a repeat of the previous message: found through the window
          -- with takeover, compressed afresh (the same bytes) without
          if takeover then
            assert.is_true(sizes[6] < sizes[5] / 4, sizes[5] .. " " .. sizes[6])
            assert.is_true(s:memory() > 0)
            assert.is_true(c:memory() > 0)
          else
            assert.equal(sizes[5], sizes[6])
            assert.equal(0, s:memory())
            assert.equal(0, c:memory())
          end
        end)
      end
    end

    it("fragmented messages: several deflate calls per message, inflated in any split", function()
      for _, takeover in ipairs { true, false } do
        local s, c = pair { server_no_context_takeover = not takeover, server_max_window_bits = 10 }
        for round = 1, 3 do
          local m = sample(20000 + round * 1000, round)
          local pieces, at, k = {}, 1, 0
          while at <= #m do
            k = k + 1
            local n = (k * 7919) % 4000
            pieces[#pieces + 1] = s:deflate(m:sub(at, at + n - 1), false)
            at = at + n
          end
          pieces[#pieces + 1] = s:deflate("", true)
          -- piece by piece: each fragment decodes to its data at once
          local got = {}
          for i, p in ipairs(pieces) do got[#got + 1] = c:inflate(p, i == #pieces) end
          assert.equal(m, table.concat(got))
          -- the same message cut into other pieces by a second receiver
          local _, c2 = pair { server_no_context_takeover = not takeover, server_max_window_bits = 10 }
          if not takeover or round == 1 then
            local all, out = table.concat(pieces), {}
            for i = 1, #all, 333 do out[#out + 1] = c2:inflate(all:sub(i, i + 332), i + 333 > #all) end
            assert.equal(m, table.concat(out))
          end
        end
      end
    end)

    it("an 8-bit window is honoured although zlib deflates with 9 bits", function()
      -- the peer's window is 256 bytes: repeats 240..270 bytes back must
      -- not be encoded as references the peer cannot resolve; the fuzzer
      -- checks this strictly with a 256-byte zlib window
      local s, c = pair { server_max_window_bits = 8, client_max_window_bits = 8 }
      local base, t = sample(300, 9), {}
      for i = 1, 200 do t[i] = base:sub(1, 240 + i % 31) end
      local m = table.concat(t)
      local z = s:deflate(m)
      assert.is_true(#z < #m)
      assert.equal(m, c:inflate(z))
      assert.equal(m, s:inflate(c:deflate(m)))
    end)
  end)

  describe("limits and bad input", function()
    it("stops a bomb: 50 MB of zeros against a 1 MiB limit", function()
      local s, c = pair { server_no_context_takeover = true }
      local mib = string.rep("\0", 1 << 20)
      local z = {}
      for i = 1, 50 do z[i] = s:deflate(mib, false) end
      z[#z + 1] = s:deflate("", true)
      local bomb = table.concat(z)
      -- freed before the peak is measured (luacheck sees no later read)
      z, mib = nil, nil -- luacheck: ignore 311
      collectgarbage()
      assert.is_true(#bomb < 100000, #bomb)
      local measured = reset_peak()
      local before = peak_kb()
      local out, err = c:inflate(bomb, true, 1 << 20)
      local grew = peak_kb() - before
      assert.is_nil(out)
      assert.equal("too big", err)
      if measured then assert.is_true(grew < 8 * 1024, ("peak memory grew by %d KiB"):format(grew)) end
      assert.equal(0, c:memory())
      -- pieces: the limit is on the whole message
      local got, ok, e = 0, true, nil
      for i = 1, #bomb, 1000 do
        ok, e = c:inflate(bomb:sub(i, i + 999), i + 1000 > #bomb, 1 << 20)
        if not ok then break end
        got = got + #ok
      end
      assert.is_nil(ok)
      assert.equal("too big", e)
      assert.is_true(got <= 1 << 20)
      -- the codec goes on with the next message
      assert.equal("Hello", c:inflate(HELLO))
    end)

    it("allows a message of exactly the limit, not one byte more", function()
      local s = core.pmd_codec("server", { server_no_context_takeover = true })
      local m = sample(50000, 5)
      local z = s:deflate(m)
      local _, c = pair()
      assert.equal(m, c:inflate(z, true, #m))
      local out, err = c:inflate(z, true, #m - 1)
      assert.is_nil(out)
      assert.equal("too big", err)
      assert.equal("", c:inflate("\0", true, 0))
      assert.is_nil(c:inflate(HELLO, true, 4))
      assert.equal("Hello", c:inflate(HELLO, true, 5))
    end)

    it("rejects corrupt data", function()
      local _, c = pair()
      local bad = {
        unhex "f2 00 11 00 00",                   -- back reference with no history
        unhex "ff ff ff ff",                      -- reserved block type 11
        unhex "f2 48 cd c9 c9 07",                -- cut short inside the last block header
        unhex "01 05 00 00 00 48 65 6c 6c 6f 00", -- stored block with a bad length check
        unhex "f2 48 cd c9 c9 07 00 00",          -- a stored block left open
      }
      for i, b in ipairs(bad) do
        local out, err = c:inflate(b)
        assert.is_nil(out, "case " .. i)
        assert.equal("invalid data", err, "case " .. i)
        assert.equal(0, c:memory())
        assert.equal("Hello", c:inflate(HELLO), "usable again after case " .. i)
      end
    end)

    it("accepts a payload that already ends at a flush point", function()
      -- senders that end a message with an empty fragment after a flushed
      -- one, or keep their own 00 00 ff ff: appending the tail again would
      -- open a stored block that never ends and garble the next message
      local _, c = pair()
      assert.equal("He", c:inflate(unhex "f2 48 05 00 00 00 ff ff", false))
      assert.equal("llo", c:inflate("", false) .. c:inflate(unhex "ca c9 c9 07 00 00 00 ff ff", false))
      assert.equal("", c:inflate("", true))
      assert.equal("Hello", c:inflate(HELLO .. unhex "00 00 ff ff"))
      assert.equal("Hello", c:inflate(unhex "f2 00 11 00 00"))
    end)

    it("checks its arguments", function()
      assert.has_error(function() core.pmd_codec("peer") end)
      assert.has_error(function() core.pmd_codec("server", { server_max_window_bits = 16 }) end)
      assert.has_error(function() core.pmd_codec("server", { client_max_window_bits = 7 }) end)
      assert.has_error(function() core.pmd_codec("server", nil, { mem_level = 0 }) end)
      assert.has_error(function() core.pmd_codec("server", nil, { compress_level = 10 }) end)
      local s = core.pmd_codec("server")
      assert.has_error(function() s:inflate("x", true, -1) end)
      s:close()
      assert.has_error(function() s:deflate("x") end)
      do
        local t <close> = core.pmd_codec("client")
        t:deflate("x")
      end
    end)
  end)

  describe("memory", function()
    it("holds nothing before use and nothing between messages without context takeover", function()
      local s, c = pair { server_no_context_takeover = true, client_no_context_takeover = true }
      assert.equal(0, s:memory())
      local z = s:deflate(sample(5000, 1), false)
      assert.is_true(s:memory() > 0) -- inside a message the stream lives
      z = z .. s:deflate(sample(100, 2), true)
      assert.equal(0, s:memory())
      assert.equal(sample(5000, 1) .. sample(100, 2), c:inflate(z))
      assert.equal(0, c:memory())
    end)

    it("keeps each direction's stream only where context is taken over", function()
      -- server sends with takeover, client sends without
      local s, c = pair { client_no_context_takeover = true }
      s:deflate("Hello")
      local sending = s:memory()
      assert.is_true(sending > 0)
      assert.equal("Hello", s:inflate(c:deflate("Hello")))
      assert.equal(sending, s:memory()) -- the inflater was released again
      assert.equal(0, c:memory())       -- client: deflater released, no inflater yet
      assert.equal("Hello", c:inflate(HELLO))
      assert.is_true(c:memory() > 0)    -- the server's window is kept
    end)

    it("grows with window bits and memLevel", function()
      local function held(bits, mem_level)
        local p = { server_max_window_bits = bits, client_max_window_bits = bits }
        local s, c = pair(p, { mem_level = mem_level })
        s:inflate(c:deflate(sample(2000)))
        s:deflate(sample(2000))
        return s:memory()
      end
      local a, b, c, d = held(15, 8), held(15, 5), held(12, 5), held(10, 4)
      assert.is_true(a > b and b > c and c > d, table.concat({ a, b, c, d }, " "))
    end)
  end)
end)

describe("permessage-deflate negotiation", function()
  describe("pmd_offer", function()
    it("writes the client's offer", function()
      assert.equal("permessage-deflate", core.pmd_offer())
      assert.equal("permessage-deflate", core.pmd_offer {})
      assert.equal("permessage-deflate; client_max_window_bits", core.pmd_offer { client_max_window_bits = true })
      assert.equal("permessage-deflate; client_max_window_bits=10", core.pmd_offer { client_max_window_bits = 10 })
      assert.equal(
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=8; "
          .. "client_max_window_bits=15",
        core.pmd_offer {
          client_max_window_bits = 15, server_max_window_bits = 8,
          client_no_context_takeover = true, server_no_context_takeover = true,
        })
    end)

    it("refuses values outside 8..15", function()
      assert.has_error(function() core.pmd_offer { client_max_window_bits = 16 } end)
      assert.has_error(function() core.pmd_offer { server_max_window_bits = 7 } end)
      assert.has_error(function() core.pmd_offer { server_max_window_bits = true } end)
      assert.has_error(function() core.pmd_offer { client_max_window_bits = "10" } end)
    end)
  end)

  describe("pmd_accept", function()
    local defaults = {
      server_no_context_takeover = false, client_no_context_takeover = false,
      server_max_window_bits = 15, client_max_window_bits = 15,
    }

    it("accepts a bare offer with the defaults", function()
      local r, p = core.pmd_accept({ pmd() })
      assert.equal("permessage-deflate", r)
      assert.same(defaults, p)
    end)

    it("answers every parameter", function()
      local r, p = core.pmd_accept({ pmd({ "server_no_context_takeover", true }) })
      assert.equal("permessage-deflate; server_no_context_takeover", r)
      assert.is_true(p.server_no_context_takeover)

      -- the client's promise is echoed, so our inflater is released between messages
      r, p = core.pmd_accept({ pmd({ "client_no_context_takeover", true }) })
      assert.equal("permessage-deflate; client_no_context_takeover", r)
      assert.is_true(p.client_no_context_takeover)

      -- an offered limit on our window is answered, with it or less
      r, p = core.pmd_accept({ pmd({ "server_max_window_bits", "10" }) })
      assert.equal("permessage-deflate; server_max_window_bits=10", r)
      assert.equal(10, p.server_max_window_bits)
      r, p = core.pmd_accept({ pmd({ "server_max_window_bits", "15" }) })
      assert.equal("permessage-deflate; server_max_window_bits=15", r)
      assert.equal(15, p.server_max_window_bits)
      r, p = core.pmd_accept({ pmd({ "server_max_window_bits", "12" }) }, { server_max_window_bits = 9 })
      assert.equal("permessage-deflate; server_max_window_bits=9", r)
      assert.equal(9, p.server_max_window_bits)
      r = core.pmd_accept({ pmd({ "server_max_window_bits", "8" }) })
      assert.equal("permessage-deflate; server_max_window_bits=8", r)

      -- the client's window: limited only when the offer allows it
      r, p = core.pmd_accept({ pmd({ "client_max_window_bits", true }) })
      assert.equal("permessage-deflate", r)
      assert.equal(15, p.client_max_window_bits)
      r, p = core.pmd_accept({ pmd({ "client_max_window_bits", true }) }, { client_max_window_bits = 10 })
      assert.equal("permessage-deflate; client_max_window_bits=10", r)
      assert.equal(10, p.client_max_window_bits)
      r, p = core.pmd_accept({ pmd({ "client_max_window_bits", "12" }) })
      assert.equal("permessage-deflate; client_max_window_bits=12", r)
      assert.equal(12, p.client_max_window_bits)
      r, p = core.pmd_accept({ pmd({ "client_max_window_bits", "12" }) }, { client_max_window_bits = 9 })
      assert.equal("permessage-deflate; client_max_window_bits=9", r)
      assert.equal(9, p.client_max_window_bits)
      r, p = core.pmd_accept({ pmd() }, { client_max_window_bits = 9 })
      assert.equal("permessage-deflate", r)
      assert.equal(15, p.client_max_window_bits)
    end)

    it("applies the server's policy", function()
      local r, p = core.pmd_accept({ pmd() }, {
        server_no_context_takeover = true, client_no_context_takeover = true, server_max_window_bits = 11,
      })
      assert.equal("permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
        .. "server_max_window_bits=11", r)
      assert.same({
        server_no_context_takeover = true, client_no_context_takeover = true,
        server_max_window_bits = 11, client_max_window_bits = 15,
      }, p)
      assert.has_error(function() core.pmd_accept({ pmd() }, { server_max_window_bits = 16 }) end)
    end)

    it("declines invalid offers and takes the next acceptable one", function()
      local invalid = {
        pmd({ "client_max_window_bits", "07" }),
        pmd({ "client_max_window_bits", "16" }),
        pmd({ "client_max_window_bits", "7" }),
        pmd({ "client_max_window_bits", "010" }),
        pmd({ "client_max_window_bits", "" }),
        pmd({ "client_max_window_bits", "10.0" }),
        pmd({ "client_max_window_bits", " 9" }),
        pmd({ "server_max_window_bits", true }),
        pmd({ "server_max_window_bits", "abc" }),
        pmd({ "server_no_context_takeover", "1" }),
        pmd({ "client_no_context_takeover", "" }),
        pmd({ "server_no_context_takeover", true }, { "server_no_context_takeover", true }),
        pmd({ "client_max_window_bits", "10" }, { "client_max_window_bits", true }),
        pmd({ "x_unknown", true }),
        pmd({ "server_max_window_bits", false }),
      }
      for i, offer in ipairs(invalid) do
        local r, why = core.pmd_accept({ offer })
        assert.is_nil(r, "offer " .. i)
        assert.is_string(why)
        local r2, p = core.pmd_accept({ offer, pmd({ "client_max_window_bits", "11" }) })
        assert.equal("permessage-deflate; client_max_window_bits=11", r2, "offer " .. i)
        assert.equal(11, p.client_max_window_bits)
      end
    end)

    it("takes the first acceptable offer and skips other extensions", function()
      local exts = {
        { name = "x-webkit-deflate-frame", params = {} },
        pmd({ "server_max_window_bits", "9" }),
        pmd({ "server_max_window_bits", "10" }),
      }
      local r = core.pmd_accept(exts)
      assert.equal("permessage-deflate; server_max_window_bits=9", r)
      local none, why = core.pmd_accept({ { name = "x-other", params = {} } })
      assert.is_nil(none)
      assert.equal("no permessage-deflate offer", why)
      assert.is_nil(core.pmd_accept({}))
    end)

    it("reads params when params_list is absent, and names case-insensitively", function()
      local r = core.pmd_accept({ { name = "Permessage-Deflate", params = { server_max_window_bits = "12" } } })
      assert.equal("permessage-deflate; server_max_window_bits=12", r)
      r = core.pmd_accept({ { name = "permessage-deflate", params = { client_max_window_bits = 10 } } })
      assert.equal("permessage-deflate; client_max_window_bits=10", r)
      r = core.pmd_accept({ { name = "permessage-deflate" } })
      assert.equal("permessage-deflate", r)
    end)
  end)

  describe("pmd_check_response", function()
    local offer = { client_max_window_bits = true }

    it("reports a server that did not accept", function()
      assert.is_false(core.pmd_check_response({}, offer))
      assert.is_false(core.pmd_check_response({ { name = "x-other", params = {} } }, offer))
    end)

    it("returns the agreed parameters", function()
      assert.same({
        server_no_context_takeover = false, client_no_context_takeover = false,
        server_max_window_bits = 15, client_max_window_bits = 15,
      }, core.pmd_check_response({ pmd() }, offer))
      assert.same({
        server_no_context_takeover = true, client_no_context_takeover = true,
        server_max_window_bits = 10, client_max_window_bits = 9,
      }, core.pmd_check_response({
        pmd({ "server_no_context_takeover", true }, { "client_no_context_takeover", true },
          { "server_max_window_bits", "10" }, { "client_max_window_bits", "9" }),
      }, offer))
      -- our own promise and hint hold without an answer
      local p = core.pmd_check_response({ pmd() }, { client_max_window_bits = 11, client_no_context_takeover = true })
      assert.is_true(p.client_no_context_takeover)
      assert.equal(11, p.client_max_window_bits)
      p = core.pmd_check_response({ pmd({ "server_max_window_bits", "8" }) }, { server_max_window_bits = 10 })
      assert.equal(8, p.server_max_window_bits)
    end)

    it("fails the handshake on a response that breaks RFC 7692 section 7.1", function()
      local cases = {
        { { pmd(), pmd() }, offer },
        { { pmd({ "x_unknown", true }) }, offer },
        { { pmd({ "server_no_context_takeover", true }, { "server_no_context_takeover", true }) }, offer },
        { { pmd({ "server_no_context_takeover", "x" }) }, offer },
        { { pmd({ "server_max_window_bits", "16" }) }, offer },
        { { pmd({ "server_max_window_bits", "08" }) }, offer },
        { { pmd({ "server_max_window_bits", true }) }, offer },
        { { pmd({ "client_max_window_bits", true }) }, offer },              -- needs a value in a response
        { { pmd({ "client_max_window_bits", "10" }) }, {} },                 -- not offered
        { { pmd({ "client_max_window_bits", "12" }) }, { client_max_window_bits = 11 } },
        { { pmd({ "server_max_window_bits", "12" }) }, { server_max_window_bits = 11 } },
        { { pmd() }, { server_max_window_bits = 11 } },                      -- limit not acknowledged
        { { pmd() }, { server_no_context_takeover = true } },                -- not acknowledged
        { { pmd() }, nil },                                                   -- nothing was offered
      }
      for i, case in ipairs(cases) do
        local p, err = core.pmd_check_response(case[1], case[2])
        assert.is_nil(p, "case " .. i)
        assert.is_string(err, "case " .. i)
      end
    end)
  end)

  describe("end to end", function()
    it("offer, accept, check and compress with what was agreed", function()
      local offers = {
        { client_max_window_bits = true },
        { client_max_window_bits = 9, server_max_window_bits = 8, server_no_context_takeover = true },
        { client_no_context_takeover = true, server_max_window_bits = 12 },
      }
      local policies = {
        {}, { server_max_window_bits = 10, client_max_window_bits = 11 }, { server_no_context_takeover = true },
      }
      for _, o in ipairs(offers) do
        for _, policy in ipairs(policies) do
          local header = core.pmd_offer(o)
          local response, sp = core.pmd_accept(parse_extensions("x-foo; a=1, " .. header), policy)
          assert.is_string(response)
          local cp, err = core.pmd_check_response(parse_extensions(response), o)
          assert.is_table(cp, err)
          assert.same(sp.server_no_context_takeover, cp.server_no_context_takeover)
          assert.same(sp.server_max_window_bits, cp.server_max_window_bits)
          -- the client may deflate with a smaller window than the server allows
          assert.is_true(cp.client_max_window_bits <= sp.client_max_window_bits)
          local s = core.pmd_codec("server", sp)
          local c = core.pmd_codec("client", cp)
          for i = 1, 3 do
            local m = sample(10000, i)
            assert.equal(m, c:inflate(s:deflate(m)))
            assert.equal(m, s:inflate(c:deflate(m)))
          end
        end
      end
    end)
  end)
end)

describe("pmd_attach", function()
  local function exchange(from, to)
    to:feed(from:data_to_send())
    return to:next()
  end

  it("compresses an engine's messages with the agreed parameters", function()
    local params = { client_max_window_bits = 10, server_no_context_takeover = true }
    local server = core.engine { role = "server" }
    local client = core.engine { role = "client" }
    core.pmd_attach(server, "server", params, { mem_level = 4 })
    core.pmd_attach(client, "client", params)
    assert.is_true(server:stats().deflate)
    local m = sample(20000, 7) -- not UTF-8: sent as binary
    local text = string.rep("the quick brown fox jumps over the lazy dog ", 500)
    assert(server:send(m, "binary", true, true))
    local wire = server:data_to_send()
    assert.equal(0x40, wire:byte(1) & 0x40, "RSV1 marks the compressed message")
    assert.is_true(#wire < #m / 2)
    client:feed(wire)
    local kind, data = client:next()
    assert.equal("binary", kind)
    assert.equal(m, data)
    assert(client:send(text, "text", true, true))
    kind, data = exchange(client, server)
    assert.equal("text", kind)
    assert.equal(text, data)
    -- attaching again replaces the codec; a wrong role is refused
    core.pmd_attach(server, "server", {})
    assert.has_error(function() core.pmd_attach(server, "client", {}) end)
    assert.has_error(function() core.pmd_attach({}, "server", {}) end)
  end)
end)

describe("interoperability with python websockets' permessage-deflate", function()
  local python = "/usr/bin/python3"
  local script = [[
import struct, sys
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode
args = sys.argv[1:]
rnct, lnct, rbits, lbits = args[0] == "1", args[1] == "1", int(args[2]), int(args[3])
ext = PerMessageDeflate(rnct, lnct, rbits, lbits)
data = open(args[4], "rb").read()
out, at, first = [], 0, True
while at < len(data):
    fin, n = struct.unpack_from(">BI", data, at); at += 5
    piece = data[at:at + n]; at += n
    op = Opcode.BINARY if first else Opcode.CONT
    plain = ext.decode(Frame(op, piece, fin=bool(fin), rsv1=first)).data
    back = ext.encode(Frame(op, plain, fin=bool(fin))).data
    out.append(struct.pack(">BI", fin, len(plain)) + plain + struct.pack(">I", len(back)) + back)
    first = bool(fin)
open(args[5], "wb").write(b"".join(out))
]]

  local function have_websockets()
    local ok = os.execute(python .. " -c 'import websockets.extensions.permessage_deflate' 2>/dev/null")
    return ok == true or ok == 0
  end

  it("exchanges messages both ways at several settings", function()
    -- a missing peer fails the test (scripts/deps installs it), never skips it
    assert(have_websockets(), "python3-websockets is not installed: run scripts/deps check")
    local src, inp, outp = os.tmpname(), os.tmpname(), os.tmpname()
    local f = assert(io.open(src, "w"))
    f:write(script)
    f:close()
    for _, t in ipairs {
      { 15, 15, false, false }, { 9, 12, false, false }, { 10, 10, true, true }, { 15, 11, true, false },
    } do
      -- we are the server; python is the client (remote = server)
      local params = {
        server_max_window_bits = t[1], client_max_window_bits = t[2],
        server_no_context_takeover = t[3], client_no_context_takeover = t[4],
      }
      local s = core.pmd_codec("server", params)
      local msgs = { { sample(5000, 1) }, { "" }, { sample(300, 2), sample(9000, 3), "" }, { sample(5000, 1) } }
      local rec, plain = {}, {}
      for _, m in ipairs(msgs) do
        for i, piece in ipairs(m) do
          local z = s:deflate(piece, i == #m)
          rec[#rec + 1] = string.pack(">BI4", i == #m and 1 or 0, #z) .. z
          plain[#plain + 1] = piece
        end
      end
      f = assert(io.open(inp, "wb"))
      f:write(table.concat(rec))
      f:close()
      local cmd = ("%s %s %d %d %d %d %s %s"):format(python, src, t[3] and 1 or 0, t[4] and 1 or 0,
        t[1], t[2], inp, outp)
      local ok = os.execute(cmd)
      assert.is_true(ok == true or ok == 0, cmd)
      f = assert(io.open(outp, "rb"))
      local data = f:read("a")
      f:close()
      local at, k = 1, 0
      while at <= #data do
        local fin, n
        fin, n, at = string.unpack(">BI4", data, at)
        local got = data:sub(at, at + n - 1)
        at = at + n
        local zn
        zn, at = string.unpack(">I4", data, at)
        local back = data:sub(at, at + zn - 1)
        at = at + zn
        k = k + 1
        assert.equal(plain[k], got, "python decoded piece " .. k)
        assert.equal(plain[k], s:inflate(back, fin == 1), "we decoded python's piece " .. k)
      end
      assert.equal(#plain, k)
    end
    os.remove(src)
    os.remove(inp)
    os.remove(outp)
  end)
end)
