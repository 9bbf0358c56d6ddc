-- The engine's differential oracle (fuzz/fuzz_roundtrip.c) on fixed seeds:
-- random messages (text of multi-byte UTF-8 and binary, 0 B .. 1 MiB),
-- random fragmentation with pings and pongs between the pieces, both
-- roles, permessage-deflate off and on (with and without context takeover,
-- window bits 8..15), whole-message and streaming delivery, and the wire
-- cut into random reads through a buffer scribbled over after each one, or
-- read straight into the engine's message buffer where it offers room.
-- What is delivered must be exactly what was sent. The same oracle runs
-- under libFuzzer (make fuzz, make fuzz-long).
--
-- The engine's clocks composed with the protocol (fuzz/fuzz_heartbeat.c),
-- the same way: a server and a client engine on a wire with latency and a
-- virtual clock, ticked when they say they are due, with messages, pings,
-- closes and cuts of the wire at random times. A live peer is never
-- declared dead, a silent one always is within its bounds, a close with
-- no answer gives up at close_timeout exactly, and no tick leaves its
-- clock due at once (a host never spins).

local function run(bin, first, count)
  local p = assert(io.popen(string.format("%s %d %d 2>&1", bin, first, count)))
  local out = p:read("a")
  local ok, how, code = p:close()
  return ok, out, how, code
end

local function seeds(bin, name, what, ranges)
  describe(what, function()
    setup(function()
      assert(io.open(bin), bin .. " is missing: run make seeds")
    end)

    for _, range in ipairs(ranges) do
      it(string.format("holds for seeds %d..%d", range[1], range[1] + range[2] - 1), function()
        local ok, out = run(bin, range[1], range[2])
        local last = out:match("seed (%d+)\n[^\n]*" .. name .. ":[^\n]*") or out:match(".*seed (%d+)")
        assert(ok, "oracle failed at seed " .. tostring(last) .. ":\n" .. out:sub(-2000))
        assert.matches(range[2] .. " seeds ok", out)
      end)
    end
  end)
end

seeds("build/fuzz/roundtrip_seeds", "roundtrip", "engine round trip with a content oracle: delivers what was sent",
  { { 1, 2500 }, { 100001, 2500 } })
seeds("build/fuzz/heartbeat_seeds", "heartbeat", "engine clocks on a wire with latency and cuts",
  { { 1, 5000 }, { 200001, 5000 } })
