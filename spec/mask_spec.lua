-- core.mask (RFC 6455 §5.3) against a plain-Lua XOR, and core.random.
local core = require "duplex.core"

local function ref_mask(s, key, offset)
  local out = {}
  for i = 1, #s do
    out[i] = string.char(s:byte(i) ~ key:byte((offset + i - 1) % 4 + 1))
  end
  return table.concat(out)
end

-- Bytes that differ at every position, so a shifted key or an off-by-one
-- block shows up.
local function pattern(n, seed)
  local t = {}
  for i = 1, n do t[i] = string.char((i * 131 + seed * 17 + (i >> 8)) % 256) end
  return table.concat(t)
end

describe("core.mask", function()
  it("masks RFC 6455 §5.7's \"Hello\"", function()
    local masked = core.mask("Hello", "\x37\xfa\x21\x3d")
    assert.are.equal("\x7f\x9f\x4d\x51\x58", masked)
    assert.are.equal("Hello", core.mask(masked, "\x37\xfa\x21\x3d"))
  end)

  it("matches the reference for lengths 0..300 at every key offset and start", function()
    local key = "\x9e\x01\xf7\x5c"
    local long = pattern(300 + 16, 1)
    for start = 1, 9, 4 do -- substrings: different bytes under each key position
      for len = 0, 300 do
        local s = long:sub(start, start + len - 1)
        for offset = 0, 3 do
          local got, want = core.mask(s, key, offset), ref_mask(s, key, offset)
          if got ~= want then
            assert.are.equal(want, got, ("start %d len %d offset %d"):format(start, len, offset))
          end
        end
      end
    end
  end)

  it("matches the reference on large payloads", function()
    for _, n in ipairs { 4096, 65535, 65536 + 3, 200003 } do
      local s, key = pattern(n, n), core.random(4)
      for offset = 0, 3 do
        assert.is_true(core.mask(s, key, offset) == ref_mask(s, key, offset), n .. "/" .. offset)
      end
    end
  end)

  it("masks piece by piece when each piece starts at the running key offset", function()
    local s, key = pattern(1048576 + 7, 3), "\x01\x80\xfe\x7f"
    local whole = core.mask(s, key, 2)
    assert.are.equal(s, core.mask(whole, key, 2))
    local parts, pos, offset, step = {}, 1, 2, 1
    while pos <= #s do
      local piece = s:sub(pos, pos + step - 1)
      parts[#parts + 1] = core.mask(piece, key, offset)
      offset = (offset + #piece) % 4
      pos = pos + #piece
      step = step * 2 + 1
    end
    assert.is_true(table.concat(parts) == whole)
    -- spot checks against the reference anywhere in the buffer
    for _, a in ipairs { 1, 2, 3, 4, 5, 31, 32, 33, 4097, 1048570 } do
      local b = a + 40
      assert.are.equal(ref_mask(s:sub(a, b), key, (2 + a - 1) % 4), whole:sub(a, b))
    end
  end)

  it("leaves the input string alone", function()
    local s = pattern(1000, 9)
    local copy = s:sub(1)
    core.mask(s, "abcd")
    assert.are.equal(copy, s)
  end)

  it("rejects a bad key or offset clearly", function()
    assert.error_matches(function() core.mask("x", "abc") end, "mask key must be a 4-byte string", 1, true)
    assert.error_matches(function() core.mask("x", "abcde") end, "mask key must be a 4-byte string", 1, true)
    assert.error_matches(function() core.mask("x", "") end, "mask key must be a 4-byte string", 1, true)
    assert.has_error(function() core.mask("x", {}) end)
    assert.has_error(function() core.mask("x") end)
    assert.has_error(function() core.mask(nil, "abcd") end)
    assert.error_matches(function() core.mask("x", "abcd", 4) end, "key offset must be 0..3", 1, true)
    assert.error_matches(function() core.mask("x", "abcd", -1) end, "key offset must be 0..3", 1, true)
    assert.has_error(function() core.mask("x", "abcd", 1.5) end)
  end)
end)

describe("core.random", function()
  it("returns n bytes for n in 1..65536", function()
    for _, n in ipairs { 1, 4, 16, 1000, 65536 } do
      assert.are.equal(n, #core.random(n))
    end
  end)

  it("returns different, well-spread bytes each time", function()
    assert.are_not.equal(core.random(16), core.random(16))
    local seen, s = {}, core.random(65536)
    for i = 1, #s do seen[s:byte(i)] = true end
    local distinct = 0
    for _ in pairs(seen) do distinct = distinct + 1 end
    assert.are.equal(256, distinct) -- fails by chance with probability < 1e-100
  end)

  it("rejects sizes outside 1..65536", function()
    for _, n in ipairs { 0, -1, 65537, math.maxinteger } do
      assert.error_matches(function() core.random(n) end, "byte count must be 1..65536", 1, true)
    end
    assert.has_error(function() core.random() end)
    assert.has_error(function() core.random(2.5) end)
    assert.has_error(function() core.random("many") end)
  end)
end)
