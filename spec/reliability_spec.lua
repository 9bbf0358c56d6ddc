-- Composed under hostile and busy peers, the server loses nothing and
-- starves nobody: a client that floods pings and never reads, a member
-- that bursts lines into a chat room, and frames that break the protocol
-- right behind valid messages. The servers are the examples, run as child
-- processes (a real loop, measured from the outside); probe clients check
-- that everyone else is still served, with generous deadlines only.
local duplex = require "duplex"
local core = require "duplex.core"
local runtime = require "duplex.runtime"
local proc = require "support.proc"
local examples = require "support.examples"
local F = require "support.frames"
local raw = require "support.raw"

local connect, listen = require("support.tracked").install(after_each, teardown)
teardown(proc.killall)

local run = runtime.blocking

-- The echo example in both styles: a handler coroutine per connection,
-- and callbacks with none (--callbacks).
local STYLES = { "handler", "callbacks" }
local function echo_args(style, ...)
  local args = { ... }
  if style == "callbacks" then args[#args + 1] = "--callbacks" end
  return args
end

for _, style in ipairs(STYLES) do
  describe("a client that floods pings and never reads (" .. style .. ")", function()
    it("leaves other connections, new handshakes and timers served, within max_buffered", function()
      -- the server pings every idle connection each 0.5 s: its timer is
      -- what a raw probe below watches for
      local h, url, port = examples.echo(echo_args(style, "--port", "0", "--ping-interval", "0.5"))
      local probe = assert(connect(url))
      assert(probe:send("warm up"))
      assert.equal("warm up", (probe:receive(10)))
      local rss0 = examples.rss_kb(h)

      local flooders = {}
      for i = 1, 2 do
        flooders[i] = examples.spawn({ examples.LUA, "spec/support/flood.lua", port, "pings" })
        assert.equal("flooding", (flooders[i]:read_line(15)))
      end
      run(core.sleep, 1) -- the flood is on

      run(function()
        for i = 1, 20 do
          assert(probe:send("probe " .. i))
          local m, err = probe:receive(10)
          assert.equal("probe " .. i, m, "the probe was not served during the flood: " .. tostring(err))
          core.sleep(0.05)
        end
      end)
      -- the server's timers run: an idle connection gets its heartbeat ping
      local pinged = run(function()
        local sock = raw.upgrade(tonumber(port), "/", 10)
        local deadline = core.now() + 10
        while core.now() < deadline do
          local d = sock:read(nil, math.max(0, deadline - core.now()))
          if not d then break end
          if d:find("\x89", 1, true) then sock:close() return true end
        end
        sock:close()
        return false
      end)
      assert.is_true(pinged, "no heartbeat ping from the server during the flood")
      -- new handshakes go through too
      local fresh = assert(connect(url, { timeout = 10 }))
      assert(fresh:send("fresh"))
      assert.equal("fresh", (fresh:receive(10)))
      fresh:close()

      -- the queued pongs coalesce, and every queued byte counts against
      -- max_buffered (16 MiB) when it is queued: growth stays well below a
      -- queue per flooder
      local grown = examples.rss_kb(h) - rss0
      assert.is_true(grown < 48 * 1024, string.format("server RSS grew by %d KiB during the flood", grown))
      for _, f in ipairs(flooders) do assert.is_true(f:running(), "the flooder was cut off") end
      probe:close()
    end)
  end)
end

describe("many connections moving large messages at once", function()
  -- Every connection's reads go through one receive buffer, and each gets
  -- a share of every loop pass: whatever a connection has not parsed when
  -- its share runs out must be its own, not the shared buffer's.
  for _, style in ipairs(STYLES) do
    it("echoes every message intact (" .. style .. ")", function()
      local srv = listen { host = "127.0.0.1", port = 0,
        handler = style == "handler" and function(ws)
          for m, k in ws:messages() do
            if not ws:send(m, k) then break end
          end
        end or nil,
        on_message = style == "callbacks" and function(ws, m, k) ws:send(m, k) end or nil }
      local bad, done = {}, 0
      run(function()
        for c = 1, 24 do
          core.spawn(function()
            local ws = assert(duplex.connect(srv:url("/")))
            for i = 1, 4 do
              local n = (c * 7919 + i * 104729) % (320 << 10)
              local msg = string.rep(string.char(65 + (c + i) % 26), n) .. tostring(c * 100 + i)
              assert(ws:send(msg, i % 2 == 0 and "binary" or "text"))
              local got = ws:receive(30)
              if got ~= msg then bad[#bad + 1] = string.format("client %d message %d", c, i) end
            end
            ws:close()
            done = done + 1
          end)
        end
        local deadline = core.now() + 60
        while done < 24 and core.now() < deadline do core.sleep(0.05) end
      end)
      assert.equal(24, done)
      assert.same({}, bad)
    end)
  end
end)

for _, style in ipairs(STYLES) do
  describe("peers that push large messages and never read (" .. style .. ")", function()
    -- Under AddressSanitizer the process's RSS says nothing about our buffers
    -- (shadow memory, quarantine): the memory bound is checked on the normal
    -- build only; the liveness part runs on both.
    local sanitized = (os.getenv("LD_PRELOAD") or ""):match("asan") ~= nil
    it("cost the server high_water + one message each, plus a fixed overhead, and fresh clients are served", function()
      local PEERS, SIZE = 120, 1 << 20
      local h, url, port = examples.echo(echo_args(style, "--port", "0"))
      run(core.sleep, 0.3)
      local rss0 = examples.rss_kb(h)
      local pusher = examples.spawn({ examples.LUA, "spec/support/flood.lua", port, "push", PEERS, SIZE })
      assert.equal("flooding", (pusher:read_line(60)))
      local peak, served = rss0, 0
      run(function()
        local deadline = core.now() + 6
        while core.now() < deadline do
          local ws = assert(duplex.connect(url, { timeout = 10 }))
          assert(ws:send("fresh"))
          assert.equal("fresh", (ws:receive(10)), "a fresh client was not served")
          ws:abort("done")
          served = served + 1
          peak = math.max(peak, examples.rss_kb(h))
          core.sleep(0.1)
        end
      end)
      assert.is_true(served > 10, "only " .. served .. " fresh clients served")
      pusher:cleanup()
      if sanitized then return end
      -- the default high_water (1 MiB) and one 1 MiB message per peer, and a
      -- fixed allowance for the loop, the Lua heap and dead messages not yet
      -- collected (at most 32 MiB of them)
      local promised = PEERS * (1024 + SIZE // 1024) + 96 * 1024
      local grown = peak - rss0
      assert.is_true(grown < promised, string.format("server RSS grew by %d MiB, the limits promise %d MiB",
        grown // 1024, promised // 1024))
    end)
  end)
end

describe("a chat member that bursts 400 KB of lines in one write", function()
  it("reaches every other member, who keep their connections", function()
    local h, _, port = examples.chat({ "--port", "0" })
    local function join(nick)
      local ws = assert(connect(string.format("ws://127.0.0.1:%s/ws?nick=%s&room=burst", port, nick)))
      assert.matches("^%* you are " .. nick, (ws:receive(10)))
      return ws
    end
    local members = {}
    for i = 1, 4 do members[i] = join("m" .. i) end
    local loud = join("loud")
    local LINES = 10000 -- 400 KB of 40-byte lines
    local got, closed = {}, {}
    run(function()
      local done = 0
      for i, ws in ipairs(members) do
        got[i] = 0
        core.spawn(function()
          while got[i] < LINES do
            local m, err, code, reason = ws:receive(30)
            if not m then
              closed[i] = string.format("%s %s %s", err, tostring(code), tostring(reason))
              break
            end
            if m:match("^#%w*:%d+ loud: line ") then got[i] = got[i] + 1 end -- a room line, with its position
          end
          done = done + 1
        end)
      end
      -- every line queued before the loop writes any: one burst on the wire
      for n = 1, LINES do assert(loud:send(string.format("line %05d of the burst, padded to 40 B", n))) end
      local deadline = core.now() + 60
      while done < #members and core.now() < deadline do core.sleep(0.05) end
    end)
    for i = 1, #members do
      assert.is_nil(closed[i], "member " .. i .. " was closed: " .. tostring(closed[i]))
      assert.equal(LINES, got[i], "member " .. i .. " got " .. got[i] .. " lines")
    end
    assert(h:running())
  end)
end)

describe("a protocol error right behind a valid message", function()
  local function echo(ws)
    for m, k in ws:messages() do
      if not ws:send(m, k) then break end
    end
  end

  -- Everything the server writes back until it closes the connection.
  local function exchange(srv, bytes)
    return run(function()
      local sock = raw.upgrade(srv.port)
      sock:write(bytes) -- one write: the server reads it all at once
      return (raw.read_all(sock))
    end)
  end

  local KEY = "k3y!"
  local valid = F.build { op = "text", payload = "before the bad frame", key = KEY }
  local cases = {
    { "a reserved opcode", F.build { op = 3, payload = "", key = KEY }, 1002 },
    { "reserved bits", F.build { op = "text", rsv = 2, payload = "x", key = KEY }, 1002 },
    { "a continuation without a message", F.build { op = "cont", payload = "x", key = KEY }, 1002 },
    { "invalid UTF-8", F.build { op = "text", payload = "\xff", key = KEY }, 1007 },
    { "a bad close code", F.build { op = "close", payload = F.close_payload(1005), key = KEY }, 1002 },
    { "an unmasked frame", F.build { op = "text", payload = "x" }, 1002 },
  }
  local function on_message(ws, m, k) ws:send(m, k) end
  for _, case in ipairs(cases) do
    for _, style in ipairs(STYLES) do
    it("delivers the message, sends its reply, then fails at " .. case[1] .. " (" .. style .. ")", function()
      local srv = listen { host = "127.0.0.1", port = 0, handler = style == "handler" and echo or nil,
        on_message = style == "callbacks" and on_message or nil }
      local got = exchange(srv, valid .. F.build { op = "ping", payload = "p", key = KEY } .. case[2])
      local want = F.build { op = "text", payload = "before the bad frame" } .. F.build { op = "pong", payload = "p" }
      assert.equal(F.hex(want), F.hex(got:sub(1, #want)))
      local close = got:sub(#want + 1)
      assert.equal(0x88, close:byte(1), "a close frame follows: " .. F.hex(close))
      assert.equal(case[3], close:byte(3) * 256 + close:byte(4))
    end)
    end
  end
end)
