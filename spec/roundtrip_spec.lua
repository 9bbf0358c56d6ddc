-- The engine's differential oracle (fuzz/fuzz_roundtrip.c) on fixed seeds:
-- random messages (text of multi-byte UTF-8 and binary, 0 B .. 1 MiB),
-- random fragmentation with pings and pongs between the pieces, both
-- roles, permessage-deflate off and on (with and without context takeover,
-- window bits 8..15), whole-message and streaming delivery, and the wire
-- cut into random reads through a buffer scribbled over after each one, or
-- read straight into the engine's message buffer where it offers room.
-- What is delivered must be exactly what was sent. The same oracle runs
-- under libFuzzer (make fuzz, make fuzz-long).
local BIN = "build/fuzz/roundtrip_seeds"

local function run(first, count)
  local p = assert(io.popen(string.format("%s %d %d 2>&1", BIN, first, count)))
  local out = p:read("a")
  local ok, how, code = p:close()
  return ok, out, how, code
end

describe("engine round trip with a content oracle", function()
  setup(function()
    assert(io.open(BIN), BIN .. " is missing: run make seeds")
  end)

  for _, range in ipairs { { 1, 2500 }, { 100001, 2500 } } do
    it(string.format("delivers what was sent for seeds %d..%d", range[1], range[1] + range[2] - 1), function()
      local ok, out = run(range[1], range[2])
      local last = out:match("seed (%d+)\n[^\n]*roundtrip:[^\n]*") or out:match(".*seed (%d+)")
      assert(ok, "oracle failed at seed " .. tostring(last) .. ":\n" .. out:sub(-2000))
      assert.matches(range[2] .. " seeds ok", out)
    end)
  end
end)
