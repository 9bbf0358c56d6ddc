-- Large payloads leave from the Lua string itself: a server engine queues
-- them by reference (dx_out) and the socket writes header and payload with
-- one writev. These specs check what that must not change: the bytes on the
-- wire and their order against a reader slow enough that every write is
-- partial, the backpressure figures, and that the strings are held exactly
-- as long as they are queued. And the other way: a large frame's payload
-- is read straight into the message buffer, which must not change what
-- the handler gets.
local core = require "duplex.core"
local runtime = require "duplex.runtime"
local F = require "support.frames"
local raw = require "support.raw"
local proc = require "support.proc"
local peers = require "support.peers"
local wait_for = require("support.loop").wait_for

local run = runtime.blocking
local _, listen = require("support.tracked").install(after_each, teardown)

-- A string made here for the spec, unique to its size and tag.
local function fresh(n, tag)
  return string.rep(tag, n - 8) .. string.format("%08d", n)
end

-- Queue a string nothing else refers to: then the Lua heap shows whether
-- the engine still holds it (weak tables do not: strings are values).
local function send_fresh(e, n, tag)
  return e:send(fresh(n, tag), "binary")
end

-- KiB of Lua heap in use, after a full collection.
local function heap_kb()
  collectgarbage()
  collectgarbage()
  return collectgarbage("count")
end

local MiB_KB = 1024

describe("a server engine's large payloads", function()
  it("are held until written, then let go; small ones and a client's are copied", function()
    local e = core.engine { role = "server" }
    local base = heap_kb()
    assert.is_true(send_fresh(e, 100000, "a"))
    assert.is_true(send_fresh(e, 1 << 20, "b"))
    assert.is_true(heap_kb() - base > MiB_KB + 90, "the engine must keep queued payloads alive")
    -- buffered counts the referenced bytes exactly, headers included
    assert.equal((10 + 100000) + (10 + (1 << 20)), e:pending())
    assert.is_true(F.build { op = "binary", payload = fresh(100000, "a") } ..
      F.build { op = "binary", payload = fresh(1 << 20, "b") } == e:data_to_send())
    assert.equal(0, e:pending())
    assert.is_true(heap_kb() - base < 64, "written payloads must be let go")

    -- below the threshold, and in a client engine (masked): copied into
    -- the engine's own buffer, so the strings are garbage at once
    local c = core.engine { role = "client" }
    assert.is_true(send_fresh(c, 1 << 20, "c"))
    assert.is_true(send_fresh(e, 16000, "d"))
    assert.is_true(heap_kb() - base < 64)
    assert.equal(14 + (1 << 20), c:pending())
    assert.equal(4 + 16000, e:pending())
  end)

  it("count against max_buffered as copied bytes did", function()
    local e = core.engine { role = "server", max_buffered = 150000 }
    local s = fresh(65536, "m")
    assert.is_true(e:send(s, "binary"))
    assert.is_true(e:send(s, "binary"))
    assert.is_true(e:send(s, "binary")) -- 131092 queued: one frame may pass the limit
    assert.equal(3 * (10 + 65536), e:pending())
    local ok, err = e:send(s, "binary")
    assert.is_nil(ok)
    assert.equal("overflow", err)
  end)

  it("keep their order with control frames and fragments, whatever the writes take", function()
    local e = core.engine { role = "server" }
    local big = fresh(70000, "z")
    assert(e:send("small", "text"))
    assert(e:send(big, "binary", false))
    assert(e:ping("p"))
    assert(e:send(big, "continuation", false))
    assert(e:send("tail", "continuation", true))
    assert(e:send_raw(core.encode_frame(big, "binary")))
    assert(e:close(1000, "bye"))
    local expected = F.build { op = "text", payload = "small" } ..
      F.build { op = "binary", payload = big, fin = false } .. F.build { op = "ping", payload = "p" } ..
      F.build { op = "cont", payload = big, fin = false } .. F.build { op = "cont", payload = "tail" } ..
      F.build { op = "binary", payload = big } .. F.build { op = "close", payload = F.close_payload(1000, "bye") }
    assert.equal(#expected, e:pending())
    assert.equal(expected, e:data_to_send())
  end)

  it("are dropped with the engine (release or collection) while still queued", function()
    local base = heap_kb()
    local e = core.engine { role = "server" }
    for i = 1, 4 do assert.is_true(send_fresh(e, 1 << 20, tostring(i))) end
    assert.is_true(heap_kb() - base > 4 * MiB_KB)
    e:release()
    assert.is_true(heap_kb() - base < 64)
    local function queue_and_forget()
      local e2 = core.engine { role = "server" }
      for i = 1, 4 do assert.is_true(send_fresh(e2, 1 << 20, tostring(i))) end
    end
    queue_and_forget()
    assert.is_true(heap_kb() - base < 64)
  end)
end)

-- A reader that takes the server's bytes in small random chunks with
-- pauses, parsing them with a client engine (auto_pong off: it only reads).
-- first: bytes that came with the 101. Returns a function that reads up to
-- the next event of kind until_kind and returns the events so far, in
-- order, as {kind, data}.
local function slow_reader(sock, seed, first)
  local rnd = seed
  local function random(n) -- its own generator: the spec's other random calls do not matter
    rnd = (rnd * 1103515245 + 12345) % 2147483648
    return (rnd >> 8) % n + 1
  end
  local e = core.engine { role = "client", auto_pong = false, max_message = 32 << 20 }
  if first and #first > 0 then e:feed(first) end
  return function(until_kind)
    local events = {}
    while true do
      local kind, data, a = e:next()
      if kind then
        events[#events + 1] = { kind, data, a }
        if kind == until_kind then return events end
      else
        if random(6) == 1 then core.sleep(0.001 * random(3)) end
        e:feed(assert(sock:read(random(16384), 20)))
      end
    end
  end
end

-- What the server sends, in order: {how, data [, kind [, fin]]}.
local function script()
  local s = {}
  local function add(...) s[#s + 1] = { ... } end
  add("send", "first", "text")
  add("send", fresh(64 << 10, "A"), "binary")
  add("ping", "p1")
  add("send", "second", "text")
  add("send", fresh(1 << 20, "B"), "binary")
  add("fragment", fresh(20000, "C"), "binary", false)
  add("ping", "p2")
  add("fragment", fresh(40000, "D"), "binary", false)
  add("fragment", "end", "binary", true)
  add("send", fresh(16 << 20, "E"), "binary")
  add("frame", core.encode_frame(fresh(100000, "G"), "binary"))
  add("send", "third", "text")
  add("send", fresh(64 << 10, "H"), "binary")
  add("ping", "p3")
  add("send", fresh(1 << 20, "I"), "text")
  return s
end

-- The events a client must see for the script: fragments are joined.
local function expected_events(s)
  local out, pieces = {}, nil
  for _, step in ipairs(s) do
    local how, data, kind, fin = step[1], step[2], step[3], step[4]
    if how == "send" then
      out[#out + 1] = { kind, data }
    elseif how == "ping" then
      out[#out + 1] = { "ping", data }
    elseif how == "frame" then
      out[#out + 1] = { "binary", data:sub(11) } -- 100000 bytes: a 10-byte header
    else
      pieces = pieces or { kind = kind }
      pieces[#pieces + 1] = data
      if fin then
        out[#out + 1] = { pieces.kind, table.concat(pieces) }
        pieces = nil
      end
    end
  end
  out[#out + 1] = { "close", "bye" }
  return out
end

local function play(ws, s)
  for _, step in ipairs(s) do
    local how, data, kind, fin = step[1], step[2], step[3], step[4]
    local ok, err
    if how == "send" then ok, err = ws:send(data, kind)
    elseif how == "ping" then ok, err = ws:ping(data)
    elseif how == "frame" then ok, err = ws:send_frame(data)
    else ok, err = ws:send_fragment(data, kind, fin) end
    if not ok then return nil, err end
  end
  return true
end

local function check_events(want, got)
  assert.equal(#want, #got, "number of events")
  for i = 1, #want do
    assert.equal(want[i][1], got[i][1], "kind of event " .. i)
    -- compared without printing megabytes when they differ
    local same = want[i][2] == got[i][2]
    assert.is_true(same, string.format("event %d (%s): %d bytes sent, %d received", i, want[i][1],
      #want[i][2], #got[i][2]))
  end
end

describe("a slow reader of large messages over TCP", function()
  it("gets every byte in order, with pings and fragments between them, and every write was partial", function()
    local s = script()
    local result, levels = {}, {}
    local srv = listen {
      host = "127.0.0.1", port = 0, ping_interval = 0, log = function() end,
      handler = function(ws)
        -- the server's queue as it drains: partial writes leave it at
        -- levels between frame boundaries
        local sampling = true
        core.spawn(function()
          while sampling do
            levels[ws:buffered()] = true
            core.sleep(0.0005)
          end
        end)
        result.ok, result.err = play(ws, s)
        ws:close(1000, "bye")
        sampling = false
        result.done = true
      end,
    }
    local got
    run(function()
      local sock, first = raw.upgrade(srv.port)
      got = slow_reader(sock, 7, first)("close")
      sock:write(F.build { op = "close", payload = F.close_payload(1000), key = "abcd" })
      sock:flush(5)
      sock:close()
    end, 120)
    assert.is_true(wait_for(function() return result.done end, 10), "the server did not finish")
    assert.is_true(result.ok, tostring(result.err))
    check_events(expected_events(s), got)
    -- a level that is no frame boundary: bytes of one payload went in parts
    local boundaries, n = { [0] = true }, 0
    local total = 0
    for _, step in ipairs(s) do
      total = total + #step[2] + (step[1] == "frame" and 0 or #step[2] < 126 and 2 or #step[2] < 65536 and 4 or 10)
      boundaries[total] = true
    end
    for level in pairs(levels) do
      if not boundaries[level] then n = n + 1 end
    end
    assert.is_true(n >= 3, "only " .. n .. " partial levels of the output were seen")
  end)

  it("lets go of the strings once they are written, and of the queued ones when the peer is dropped", function()
    local SIZE, phase = 4 << 20, {}
    local srv = listen {
      host = "127.0.0.1", port = 0, ping_interval = 0, log = function() end,
      high_water = 64 << 20, max_buffered = 64 << 20,
      handler = function(ws)
        local base = heap_kb()
        for i = 1, 3 do assert(send_fresh(ws, SIZE, tostring(i))) end
        phase.held = heap_kb() - base
        -- the peer reads them all, then says so
        assert.equal("read", (ws:receive(30)))
        phase.after_written = heap_kb() - base
        for i = 1, 3 do assert(send_fresh(ws, SIZE, tostring(i))) end
        phase.queued = heap_kb() - base
        -- it will not read these: dropped with them queued
        assert.equal("stop", (ws:receive(30)))
        ws:abort("dropped")
        phase.after_abort = heap_kb() - base
        phase.done = true
      end,
    }
    run(function()
      -- read the three messages' bytes and drop them: no large string
      -- of ours in the heap
      local sock, first = raw.upgrade(srv.port)
      local left = 3 * (10 + SIZE) - #first
      while left > 0 do
        left = left - #assert(sock:read(math.min(left, 16384), 30))
      end
      sock:write(F.build { op = "text", payload = "read", key = "abcd" })
      while not phase.queued do core.sleep(0.01) end
      sock:write(F.build { op = "text", payload = "stop", key = "abcd" })
      while not phase.done do core.sleep(0.01) end
      sock:close()
    end, 60)
    local SIZE_KB = SIZE // 1024
    assert.is_true(phase.held > 3 * SIZE_KB, "queued strings must be held: " .. phase.held)
    assert.is_true(phase.after_written < SIZE_KB,
      "strings written to the peer are still held: " .. phase.after_written)
    assert.is_true(phase.queued > 2 * SIZE_KB, "queued strings must be held: " .. phase.queued)
    assert.is_true(phase.after_abort < SIZE_KB,
      "strings queued to a dropped peer are still held: " .. phase.after_abort)
  end)
end)

-- The client's frames, masked, from a client engine.
local function client_frames(steps)
  local c = core.engine { role = "client" }
  for _, st in ipairs(steps) do
    if st[1] == "ping" then assert(c:ping(st[2])) else assert(c:send(st[2], st[3], st[4])) end
  end
  return c:data_to_send()
end

-- Write bytes in random cuts from 1 B to 200 KB, pausing now and then, so
-- that frames arrive split at every kind of place.
local function write_cut(sock, bytes, seed)
  local rnd, at = seed, 1
  while at <= #bytes do
    rnd = (rnd * 1103515245 + 12345) % 2147483648
    local n = ({ 1, 7, 1500, 65536, 200000 })[(rnd >> 8) % 5 + 1]
    assert(sock:write(bytes:sub(at, at + n - 1)))
    at = at + n
    if (rnd >> 4) % 4 == 0 then assert(sock:flush(20)) core.sleep(0.001) end
  end
  assert(sock:flush(20))
end

describe("large messages read into place", function()
  -- a socket reads a large frame's payload straight into the message
  -- buffer (dx_proto_read_room); what the handler gets must not change
  local function server(got)
    return listen {
      host = "127.0.0.1", port = 0, ping_interval = 0, log = function() end, max_message = 32 << 20,
      handler = function(ws)
        for m, kind in ws:messages() do got[#got + 1] = { kind, m } end
        got.close_code, got.done = ws.close_code, true
      end,
    }
  end

  it("deliver whole messages, fragments and pings between them as sent, however the reads fall", function()
    local steps = {
      { "send", fresh(3 << 20, "a"), "binary" },
      { "ping", "p1" },
      { "send", fresh(1 << 20, "b"), "text", false },
      { "ping", "p2" },
      { "send", fresh(700000, "c"), "continuation", false },
      { "send", fresh(300, "d"), "continuation", true },
      { "send", fresh(16 << 20, "e"), "binary" },
      { "send", "small", "text" },
      { "send", fresh(100000, "f"), "binary" },
    }
    local got = {}
    local srv = server(got)
    run(function()
      local sock = raw.upgrade(srv.port)
      local close = F.build { op = "close", payload = F.close_payload(1000), key = "abcd" }
      write_cut(sock, client_frames(steps) .. close, 11)
      while not got.done do core.sleep(0.01) end
      sock:close()
    end, 60)
    check_events({
      { "binary", steps[1][2] }, { "text", steps[3][2] .. steps[5][2] .. steps[6][2] },
      { "binary", steps[7][2] }, { "text", "small" }, { "binary", steps[9][2] },
    }, got)
    assert.equal(1000, got.close_code)
  end)

  it("fail a large text frame at its invalid UTF-8, after the messages before it", function()
    local got = {}
    local srv = server(got)
    local N = 2 << 20
    local bad = string.rep("x", N - 2) .. "\xff!"
    -- a zero masking key leaves the payload as it is
    local frame = F.build { op = "text", len = N, key = "\0\0\0\0" } .. bad
    local events
    run(function()
      local sock, first = raw.upgrade(srv.port)
      write_cut(sock, client_frames { { "send", fresh(1 << 20, "g"), "binary" } } .. frame, 5)
      events = slow_reader(sock, 1, first)("close")
      sock:close()
    end, 60)
    check_events({ { "binary", fresh(1 << 20, "g") } }, got)
    local close = events[#events]
    assert.equal("close", close[1])
    assert.equal(1007, close[3])
  end)
end)

describe("python3-websockets as the reader", function()
  teardown(proc.killall)

  it("gets large messages echoed from their strings intact", function()
    local srv = listen {
      host = "127.0.0.1", port = 0, ping_interval = 0, log = function() end,
      handler = function(ws)
        for m, kind in ws:messages() do
          if not ws:send(m, kind) then break end
        end
      end,
    }
    local argv = { peers.python, "py_client.py", srv:url("/"), "--count", "6", "--size", tostring((1 << 20) + 3),
      "--send-text", "small", "--timeout", "60" }
    local p = proc.spawn(argv, { env = peers.env, cwd = peers.interop, limit = 90 })
    wait_for(function() return not p:running() end, 80)
    local code, out, err = p:exit_code(), p:stdout(), p:stderr()
    p:cleanup(1)
    local res = peers.json_decode(out:match("([^\n]*)\n?$") or "") or {}
    assert.equal(0, code, tostring(res.error) .. "\n" .. err)
    assert.is_true(res.ok)
    assert.equal(7, res.received)
  end)
end)
