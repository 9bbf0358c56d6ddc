-- core.utf8_valid: RFC 3629 validation, whole and incremental.
local core = require "duplex.core"

local char = utf8.char -- Lua's encoder is lax: it also writes surrogates and > U+10FFFF
local function hex(s)
  return (s:gsub(".", function(c) return ("%02X "):format(c:byte()) end))
end

-- Whole-string verdict: "valid", "open" (valid prefix, sequence unfinished) or "invalid".
local function verdict(s)
  local ok, state = core.utf8_valid(s)
  if not ok then return "invalid" end
  return state == 0 and "valid" or "open"
end

-- Feed the chunks in order; returns the verdict and the 1-based index of the
-- chunk that failed.
local function feed(chunks)
  local state = 0
  for i, c in ipairs(chunks) do
    local ok, st = core.utf8_valid(c, state)
    if not ok then
      assert(st == nil)
      return "invalid", i
    end
    state = st
  end
  return state == 0 and "valid" or "open"
end

local function bytes_of(s)
  local t = {}
  for i = 1, #s do t[i] = s:sub(i, i) end
  return t
end

-- { bytes, verdict, first bad byte (1-based, invalid only) }
local vectors = {
  -- boundaries of each length
  { "", "valid" },
  { char(0x0000), "valid" },
  { char(0x007F), "valid" },
  { char(0x0080), "valid" },
  { char(0x07FF), "valid" },
  { char(0x0800), "valid" },
  { char(0xD7FF), "valid" },
  { char(0xE000), "valid" },
  { char(0xFFFD), "valid" },
  { char(0xFFFF), "valid" },
  { char(0x10000), "valid" },
  { char(0xFFFFF), "valid" },
  { char(0x100000), "valid" },
  { char(0x10FFFF), "valid" },
  { "\xC2\x80", "valid" },
  { "\xDF\xBF", "valid" },
  { "\xE0\xA0\x80", "valid" },
  { "\xED\x9F\xBF", "valid" },
  { "\xEE\x80\x80", "valid" },
  { "\xEF\xBF\xBF", "valid" },
  { "\xF0\x90\x80\x80", "valid" },
  { "\xF1\x80\x80\x80", "valid" },
  { "\xF3\xBF\xBF\xBF", "valid" },
  { "\xF4\x8F\xBF\xBF", "valid" },
  { "κόσμε", "valid" },
  { "Hello, 世界! café 😀 naïve", "valid" },
  { ("a"):rep(100) .. "é" .. ("b"):rep(100) .. "€" .. ("c"):rep(33), "valid" },
  -- overlong forms of each length (all encode U+0000 or the last value of the shorter form)
  { "\xC0\x80", "invalid", 1 },
  { "\xC0\xAF", "invalid", 1 },
  { "\xC1\xBF", "invalid", 1 },
  { "\xE0\x80\x80", "invalid", 2 },
  { "\xE0\x80\xAF", "invalid", 2 },
  { "\xE0\x9F\xBF", "invalid", 2 },
  { "\xF0\x80\x80\x80", "invalid", 2 },
  { "\xF0\x80\x80\xAF", "invalid", 2 },
  { "\xF0\x8F\xBF\xBF", "invalid", 2 },
  { "\xF8\x80\x80\x80\xAF", "invalid", 1 },
  { "\xFC\x80\x80\x80\x80\xAF", "invalid", 1 },
  -- surrogates: both ends of the high and low halves, and a CESU-8 pair
  { char(0xD800), "invalid", 2 },
  { char(0xDB7F), "invalid", 2 },
  { char(0xDB80), "invalid", 2 },
  { char(0xDBFF), "invalid", 2 },
  { char(0xDC00), "invalid", 2 },
  { char(0xDFFF), "invalid", 2 },
  { "\xED\xA0\x80\xED\xB0\x80", "invalid", 2 },
  { "ok" .. char(0xDFFF) .. "ok", "invalid", 4 },
  -- beyond U+10FFFF, and the old 5- and 6-byte forms
  { char(0x110000), "invalid", 2 },
  { "\xF4\x90\x80\x80", "invalid", 2 },
  { "\xF4\xBF\xBF\xBF", "invalid", 2 },
  { "\xF5\x80\x80\x80", "invalid", 1 },
  { "\xF7\xBF\xBF\xBF", "invalid", 1 },
  { char(0x1FFFFF), "invalid", 1 },
  { char(0x200000), "invalid", 1 },
  { char(0x3FFFFFF), "invalid", 1 },
  { char(0x4000000), "invalid", 1 },
  { char(0x7FFFFFFF), "invalid", 1 },
  { "\xFE", "invalid", 1 },
  { "\xFF", "invalid", 1 },
  { "abc\xFE\xFF", "invalid", 4 },
  -- continuation bytes with no lead
  { "\x80", "invalid", 1 },
  { "\xBF", "invalid", 1 },
  { "a\x80b", "invalid", 2 },
  { "\xC3\xA9\xA9", "invalid", 3 },
  { "\xE2\x82\xAC\x80", "invalid", 4 },
  { "\xF0\x9F\x98\x80\xBF", "invalid", 5 },
  -- a sequence cut short by a byte that is not a continuation
  { "\xC2\x41", "invalid", 2 },
  { "\xC2\xC2\x80", "invalid", 2 },
  { "\xE2\x82\x41", "invalid", 3 },
  { "\xE2\x28\xA1", "invalid", 2 },
  { "\xF0\x9F\x98\x41", "invalid", 4 },
  { "\xF0\x9F\x98", "open" },
  -- truncated at the end of input: not invalid, just not complete
  { "\xC2", "open" },
  { "\xDF", "open" },
  { "\xE0", "open" },
  { "\xE0\xA0", "open" },
  { "\xED\x9F", "open" },
  { "\xEF\xBF", "open" },
  { "\xF0", "open" },
  { "\xF0\x90", "open" },
  { "\xF4\x8F\xBF", "open" },
  { "abc\xE2\x82", "open" },
  -- truncated sequences that can already never be valid
  { "\xE0\x9F", "invalid", 2 },
  { "\xED\xA0", "invalid", 2 },
  { "\xF0\x8F", "invalid", 2 },
  { "\xF4\x90", "invalid", 2 },
}

describe("core.utf8_valid", function()
  it("classifies every vector fed whole", function()
    for _, v in ipairs(vectors) do
      assert.are.equal(v[2], verdict(v[1]), hex(v[1]))
    end
  end)

  it("fails at the first invalid byte when fed one byte at a time", function()
    for _, v in ipairs(vectors) do
      local got, at = feed(bytes_of(v[1]))
      assert.are.equal(v[2], got, hex(v[1]))
      assert.are.equal(v[3], at, hex(v[1]))
    end
  end)

  it("gives the same verdict split at every byte boundary", function()
    for _, v in ipairs(vectors) do
      local s = v[1]
      for cut = 0, #s do
        local got, at = feed { s:sub(1, cut), s:sub(cut + 1) }
        assert.are.equal(v[2], got, hex(s) .. " cut at " .. cut)
        if got == "invalid" then
          -- the chunk that failed is the one holding the first bad byte
          assert.are.equal(v[3] <= cut and 1 or 2, at, hex(s) .. " cut at " .. cut)
        end
      end
    end
  end)

  it("carries state across three chunks and across messages of vectors", function()
    local all = {}
    for _, v in ipairs(vectors) do
      if v[2] == "valid" then all[#all + 1] = v[1] end
    end
    local s = table.concat(all)
    assert.are.equal("valid", verdict(s))
    for a = 0, #s, 7 do
      for b = a, #s, 11 do
        assert.are.equal("valid", (feed { s:sub(1, a), s:sub(a + 1, b), s:sub(b + 1) }))
      end
    end
    -- an invalid vector in the middle of valid text fails whatever the chunking
    local bad = s .. "\xED\xA0\x80" .. s
    for cut = #s - 3, #s + 6 do
      assert.are.equal("invalid", (feed { bad:sub(1, cut), bad:sub(cut + 1) }))
    end
  end)

  it("accepts every scalar value and rejects every surrogate", function()
    for base = 0, 0x10FFFF, 0x1000 do
      local t = {}
      for cp = base, base + 0xFFF do
        if cp < 0xD800 or cp > 0xDFFF then t[#t + 1] = char(cp) end
      end
      local s = table.concat(t)
      assert.are.equal("valid", verdict(s), ("block U+%04X"):format(base))
    end
    for cp = 0xD800, 0xDFFF do
      assert.are.equal("invalid", verdict(char(cp)), ("U+%04X"):format(cp))
    end
  end)

  it("agrees with Lua's strict utf8.len on every 2-byte string and many 3/4-byte ones", function()
    local function check(s)
      local want = utf8.len(s) and "valid" or "invalid"
      local got = verdict(s)
      if got == "open" then got = "invalid" end -- utf8.len wants whole sequences
      if got ~= want then assert.are.equal(want, got, hex(s)) end
    end
    for a = 0, 255 do
      for b = 0, 255 do check(string.char(a, b)) end
    end
    local edges = { 0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xFF }
    for a = 0xE0, 0xF7 do
      for b = 0, 255 do
        for _, c in ipairs(edges) do
          for _, d in ipairs { 0x41, 0x80, 0xBF } do check(string.char(a, b, c, d)) end
        end
      end
    end
  end)

  it("agrees with utf8.len on random text built from interesting bytes", function()
    local pool = { 0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1,
      0xC2, 0xDF, 0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF }
    local seen = { valid = 0, invalid = 0 }
    math.randomseed(6455)
    for _ = 1, 20000 do
      local t = {}
      for i = 1, math.random(1, 12) do t[i] = pool[math.random(#pool)] end
      local s = string.char(table.unpack(t))
      local got = verdict(s)
      if got == "open" then got = "invalid" end
      local want = utf8.len(s) and "valid" or "invalid"
      if got ~= want then assert.are.equal(want, got, hex(s)) end
      seen[want] = seen[want] + 1
    end
    assert.is_true(seen.valid > 100 and seen.invalid > 100)
  end)

  it("validates long ASCII and mixed text with the bad byte anywhere", function()
    local text = ("The quick brown fox. Ça va? Größe. 東京タワー. 🎉🚀 "):rep(200)
    assert.are.equal("valid", verdict(text))
    assert.are.equal("valid", verdict(("x"):rep(100000)))
    for _, at in ipairs { 1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 4095, 100000 } do
      local s = ("x"):rep(at - 1) .. "\x80" .. ("y"):rep(200)
      assert.are.equal("invalid", verdict(s), "bad byte at " .. at)
      s = ("x"):rep(at - 1) .. "\xC3\xA9" .. ("y"):rep(200)
      assert.are.equal("valid", verdict(s), "2-byte char at " .. at)
    end
  end)

  it("keeps failing once it has failed", function()
    local ok, st = core.utf8_valid("\xFF")
    assert.is_false(ok)
    assert.is_nil(st)
  end)

  it("rejects arguments that are not a string or a state", function()
    assert.has_error(function() core.utf8_valid() end)
    assert.has_error(function() core.utf8_valid({}) end)
    assert.error_matches(function() core.utf8_valid("a", -1) end, "not a state returned by utf8_valid", 1, true)
    assert.has_error(function() core.utf8_valid("a", 2 ^ 40) end)
    assert.has_error(function() core.utf8_valid("a", 1.5) end)
    assert.has_error(function() core.utf8_valid("a", "x") end)
  end)
end)
