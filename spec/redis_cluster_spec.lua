-- duplex.redis.cluster against a real Redis Cluster (6 redis-server on
-- 127.0.0.1: 3 masters, a replica each): keys over every master, hash
-- tags, MOVED and ASK while a slot migrates, a master SIGKILLed and its
-- replica promoted; and against fake nodes that misbehave.
local core = require "duplex.core"
local resp = require "duplex.resp"
local redis = require "duplex.redis"
local loop = require "support.loop"
local proc = require "support.proc"
local services = require "support.services"

local run, call = loop.run, services.redis_call

local opened = {}
after_each(function()
  for _, c in ipairs(opened) do c:close() end
  opened = {}
end)

local function cluster(opts)
  local c, err = redis.cluster(opts)
  assert(c, err)
  opened[#opened + 1] = c
  return c
end

local function fails(pattern, kind, v, err, got_kind)
  assert.is_nil(v)
  assert.matches(pattern, err)
  if kind then assert.equal(kind, got_kind) end
end

local function wait_for(what, timeout, pred)
  local deadline = core.now() + timeout
  while not pred() do
    if core.now() > deadline then error("timed out waiting for " .. what, 2) end
    core.sleep(0.02)
  end
end

local function recorder()
  local log = {}
  return log, function(status, detail) log[#log + 1] = status .. " " .. detail end
end

local function has(log, pattern)
  for _, l in ipairs(log) do
    if l:find(pattern) then return true end
  end
  return false
end

-- A key whose slot is served by the master on port (of c:nodes()).
local function key_at(rc, port, prefix)
  local nodes = rc:nodes()
  for i = 1, 100000 do
    local key = prefix .. i
    local s = redis.slot(key)
    for _, n in ipairs(nodes) do
      if n.port == port then
        for _, r in ipairs(n.slots) do
          if s >= r[1] and s <= r[2] then return key, s end
        end
      end
    end
  end
end

describe("redis.slot", function()
  it("is CRC16 (XMODEM) mod 16384 of the key or its hash tag, as CLUSTER KEYSLOT says", function()
    -- the values redis-server 7.0 answers to CLUSTER KEYSLOT
    local known = { [""] = 0, a = 15495, ["123456789"] = 12739, ["{}"] = 15257, ["{user1000}.following"] = 3443,
      ["foo{}{bar}"] = 8363, ["foo{{bar}}zap"] = 4015, ["foo{bar}{zap}"] = 5061 }
    for key, slot in pairs(known) do assert.equal(slot, redis.slot(key), key) end
    assert.equal(redis.slot("user1000"), redis.slot("{user1000}.followers"))
    assert.equal(redis.slot("bar"), redis.slot("foo{bar}{zap}"))
    assert.equal(redis.slot("42"), redis.slot(42))
    assert.error_matches(function() redis.slot(nil) end, "a key")
  end)
end)

describe("duplex.redis.cluster on a real cluster", function()
  local rc_nodes
  setup(function() rc_nodes = services.redis_cluster { masters = 3, replicas = 1 } end)
  teardown(function()
    if rc_nodes then rc_nodes:stop() end
    proc.killall()
  end)

  it("agrees with CLUSTER KEYSLOT", function()
    for _, key in ipairs { "", "{}", "{user1000}.following", "foo{}{bar}", "x{a}", "\0\255{\1}", "{", "}{",
      "a{b{c}d}" } do
      assert.equal(call(rc_nodes.ports[1], "CLUSTER", "KEYSLOT", key), redis.slot(key), key)
    end
  end)

  it("loads the map and sends each key to its master, over all three", function()
    run(function()
      local rc = cluster { nodes = { rc_nodes.urls[2], rc_nodes.urls[5] } }
      local nodes = rc:nodes()
      assert.equal(3, #nodes)
      local covered = 0
      for _, n in ipairs(nodes) do
        for _, r in ipairs(n.slots) do covered = covered + r[2] - r[1] + 1 end
      end
      assert.equal(16384, covered)
      local masters = rc_nodes:masters()
      table.sort(masters)
      local ports = {}
      for _, n in ipairs(nodes) do ports[#ports + 1] = n.port end
      table.sort(ports)
      assert.same(masters, ports)

      local used = {}
      for i = 1, 60 do
        assert.equal("OK", rc:call("SET", "spread:" .. i, i))
        local owner = rc_nodes:owner(redis.slot("spread:" .. i))
        used[owner] = true
        -- there, and nowhere else: asked directly, the owner has it
        assert.equal(tostring(i), call(owner, "GET", "spread:" .. i))
      end
      for i = 1, 60 do assert.equal(tostring(i), rc:call("GET", "spread:" .. i)) end
      local n = 0
      for _ in pairs(used) do n = n + 1 end
      assert.equal(3, n)
      assert.equal("PONG", rc:call("PING"))        -- no key: any master
      assert.equal(2, #rc:call("TIME"))
      assert.is_false(rc:call("GET", "never set"))
      fails("^WRONGTYPE", "redis", rc:call("LPUSH", "spread:1", "x"))
      fails("^CROSSSLOT", "redis", rc:call("MGET", "spread:1", "spread:2"))
      assert.error_matches(function() rc:call("SET", "k", nil) end, "argument 3 is a nil")
      assert.error_matches(function() rc:call("SUBSCRIBE", "k") end, "use client:subscribe")
      assert.error_matches(function() redis.cluster { nodes = rc_nodes.urls, timeot = 1 } end,
        "unknown option 'timeot'")
      assert.error_matches(function() redis.cluster { nodes = rc_nodes.urls, db = 1 } end, "unknown option 'db'")
      fails("database 0 only", nil, redis.cluster { url = rc_nodes.urls[1] .. "/2" })
      fails("^no slot map %(127.0.0.1:%d+: connect to", nil,
        redis.cluster { url = "redis://127.0.0.1:" .. services.free_port() })
      rc:close()
      fails("client closed", "connection", rc:call("GET", "spread:1"))
    end)
  end)

  it("works outside the loop too, and closes as a <close> variable", function()
    local kept
    do
      local rc <close> = assert(redis.cluster { nodes = rc_nodes.urls })
      kept = rc
      assert.equal("OK", rc:call("SET", "outside", "yes"))
      assert.same({ "yes", 1 }, rc:pipeline { { "GET", "outside" }, { "DEL", "outside" } })
      assert.equal("PONG", rc:call("PING"))
    end
    assert.same({ nil, "client closed", "connection" }, { kept:call("PING") })
  end)

  it("keeps hash-tagged keys together: a pipeline, an EVAL of two keys", function()
    run(function()
      local rc = cluster { url = rc_nodes.urls[1] }
      local r = assert(rc:pipeline(function(p)
        p:call("SET", "{user7}:name", "ann")
        p:call("SET", "{user7}:visits", 0)
        p:call("INCR", "{user7}:visits")
        p:call("PING") -- keyless: wherever the others go
        p:call("MGET", "{user7}:name", "{user7}:visits")
      end))
      assert.same({ "OK", "OK", 1, "PONG", { "ann", "1" } }, r)
      assert.same({ "ann", "1" }, rc:pipeline { { "GET", "{user7}:name" }, { "GET", "{user7}:visits" } })
      local script = "return redis.call('GET', KEYS[1]) .. ':' .. redis.call('INCR', KEYS[2])"
      assert.equal("ann:2", rc:call("EVAL", script, 2, "{user7}:name", "{user7}:visits"))
      assert.equal("ann:3", rc:call("EVAL", script, "2", "{user7}:name", "{user7}:visits"))
      -- the keys of a stream read come after STREAMS
      assert.is_string(rc:call("XADD", "{user7}:log", "*", "a", "1"))
      local xs = rc:call("XREAD", "COUNT", 1, "STREAMS", "{user7}:log", "0")
      assert.equal("{user7}:log", xs[1][1])
      assert.error_matches(function()
        rc:pipeline { { "GET", "{user7}:name" }, { "GET", "{user8}:name" } }
      end, "command 2: its key is in slot %d+, command 1's in slot %d+")
      assert.error_matches(function() rc:pipeline { "GET" } end, "command 1 is not a table")
      assert.same({}, rc:pipeline {})
    end)
  end)

  it("publishes and subscribes: channels at any node, shard channels at their masters", function()
    run(function()
      local log, on_status = recorder()
      local rc = cluster { url = rc_nodes.urls[1], on_status = on_status }
      local got = {}
      local function into(tag) return function(ch, m, pat) got[#got + 1] = tag .. " " .. ch .. " " .. m
        .. (pat and " " .. pat or "") end end
      -- three shard channels, one on each master
      local chans = {}
      for _, n in ipairs(rc:nodes()) do chans[#chans + 1] = (key_at(rc, n.port, "sch:")) end
      assert.is_true(rc:ssubscribe(chans[1], chans[2], chans[3], into("s")))
      assert.is_true(rc:subscribe("news", into("c")))
      assert.is_true(rc:psubscribe("room:*", into("p")))
      for i = 1, 3 do
        assert.equal(1, rc:spublish(chans[i], "m" .. i))
        assert.equal(1, services.shardnumsub(rc_nodes:owner(redis.slot(chans[i])), chans[i]))
      end
      rc:publish("news", "hi")
      rc:publish("room:1", "yo")
      wait_for("5 messages", 5, function() return #got == 5 end)
      -- a handler that raises is reported by its node's client, with the node
      assert.is_true(rc:subscribe("boom", function() error("kaboom") end))
      rc:publish("boom", "x")
      wait_for("the error reported", 5, function()
        return has(log, "^error 127%.0%.0%.1:%d+ subscriber: message handler failed: .*kaboom")
      end)
      local want = { "c news hi", "p room:1 yo room:*", "s " .. chans[1] .. " m1", "s " .. chans[2] .. " m2",
        "s " .. chans[3] .. " m3" }
      table.sort(got)
      table.sort(want)
      assert.same(want, got)
      assert.is_true(has(log, "^up shard channels at 127%.0%.0%.1:%d+: " .. chans[1]:gsub("%p", "%%%0")))
      assert.is_true(rc:sunsubscribe(chans[1]))
      assert.equal(0, rc:spublish(chans[1], "gone"))
      assert.equal(1, rc:spublish(chans[2], "still"))
      assert.is_true(rc:unsubscribe())
      assert.is_true(rc:punsubscribe("room:*"))
      assert.error_matches(function() rc:ssubscribe("x") end, "names, then a function")
      -- raised at the caller's line
      for _, case in ipairs { { function() rc:ssubscribe(1, print) end, "channel names are strings" },
        { function() rc:subscribe("x") end, "names, then a function" },
        { function() rc:punsubscribe(false) end, "channel names are strings" } } do
        local ok, err = pcall(case[1])
        assert.is_false(ok)
        assert.matches("redis_cluster_spec.lua:%d+: %a+: " .. case[2], err)
      end
    end)
  end)

  it("follows ASK while a slot migrates and MOVED after, shard channels too", function()
    run(function()
      local log, on_status = recorder()
      local rc = cluster { url = rc_nodes.urls[1], on_status = on_status, backoff_max = 0.3 }
      local stale = cluster { url = rc_nodes.urls[1] } -- no subscription: its map stays as it is now
      local nodes = rc:nodes()
      local from, to = nodes[1], nodes[2]
      local key, slot = key_at(rc, from.port, "mig:")
      local tag = "{" .. key .. "}"
      assert.equal(slot, redis.slot(tag .. "b"))
      assert.equal("OK", rc:call("SET", tag .. "a", "stays"))
      assert.equal("OK", rc:call("SET", tag .. "b", "moves"))
      local got = {}
      assert.is_true(rc:ssubscribe(tag .. "ch", function(_, m) got[#got + 1] = m end))
      assert.equal(1, services.shardnumsub(from.port, tag .. "ch"))

      assert.equal("OK", call(to.port, "CLUSTER", "SETSLOT", slot, "IMPORTING", from.id))
      assert.equal("OK", call(from.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", to.id))
      assert.equal("OK", call(from.port, "MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", tag .. "b"))
      -- mid-migration: a key still at the source is served there, one
      -- gone (or new) gets ASK, and the client asks the target
      assert.equal("stays", rc:call("GET", tag .. "a"))
      assert.equal("moves", rc:call("GET", tag .. "b"))
      assert.equal("OK", rc:call("SET", tag .. "new", "x"))
      assert.equal("x", rc:call("GET", tag .. "new"))
      -- a pipeline: the commands answered at the source keep their replies,
      -- those told ASK are sent to the target
      local r = assert(rc:pipeline { { "GET", tag .. "a" }, { "GET", tag .. "b" }, { "ECHO", "e" } })
      assert.same({ "stays", "moves", "e" }, r)
      local function owner_in_map(of)
        for _, n in ipairs((of or rc):nodes()) do
          for _, rg in ipairs(n.slots) do
            if rg[1] <= slot and slot <= rg[2] then return n.addr end
          end
        end
      end
      assert.equal(from.addr, owner_in_map()) -- ASK changes no map
      assert.equal("stays", stale:call("GET", tag .. "a"))

      assert.equal("OK", call(from.port, "MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", tag .. "a"))
      for _, n in ipairs(nodes) do
        assert.equal("OK", call(n.port, "CLUSTER", "SETSLOT", slot, "NODE", to.id))
      end
      -- Redis unsubscribed the shard channel at the source (before any
      -- command of ours met a MOVED): made again at the target, and said so
      -- (Redis counts it before the client hears it confirmed and says so)
      wait_for("the shard channel at the target, and its status", 5, function()
        return services.shardnumsub(to.port, tag .. "ch") == 1
          and has(log, "^up shard channels at " .. to.addr:gsub("%p", "%%%0"))
      end)
      -- the source now answers MOVED; a caller whose map is behind never
      -- sees it, and its map is reloaded
      assert.matches("^MOVED " .. slot, call(from.port, "GET", tag .. "a").err)
      assert.equal("stays", stale:call("GET", tag .. "a"))
      assert.same({ "stays", "moves" }, stale:pipeline { { "GET", tag .. "a" }, { "GET", tag .. "b" } })
      assert.equal("x", call(to.port, "GET", tag .. "new")) -- it was made at the target
      -- both clients' maps: rc's is reloaded in the background too (after
      -- the MOVED its shard channel met), not necessarily before stale's
      wait_for("the maps reloaded", 5, function()
        return owner_in_map(stale) == to.addr and owner_in_map(rc) == to.addr
      end)
      assert.equal(1, rc:spublish(tag .. "ch", "after"))
      wait_for("the message", 5, function() return got[#got] == "after" end)
    end)
  end)

  it("rides out a master SIGKILLed mid-stream: its replica promoted, every command answered", function()
    run(function()
      local log, on_status = recorder()
      local rc = cluster { nodes = rc_nodes.urls, on_status = on_status, backoff_max = 0.3, timeout = 1,
        connect_timeout = 1, ping_interval = 0.5 }
      local got = {}
      -- the victim: the master where the channels and patterns are
      assert.is_true(rc:subscribe("news", function(_, m) got[#got + 1] = "news " .. m end))
      local victim
      for _, n in ipairs(rc:nodes()) do
        if services.numsub(n.port, "news") == 1 then victim = n end
      end
      assert(victim, "no master has the subscription")
      local replica = rc_nodes:replica_of(victim.port)
      assert(replica, "no replica of " .. victim.addr)
      local chan = key_at(rc, victim.port, "fo:")
      assert.is_true(rc:ssubscribe(chan, function(_, m) got[#got + 1] = m end))

      local failures, done, worst = {}, 0, 0
      for w = 1, 3 do
        core.spawn(function()
          for i = 1, 200 do
            local key = "stream:" .. w .. ":" .. i
            local t0 = core.now()
            local ok, err = rc:call("SET", key, i)
            worst = math.max(worst, core.now() - t0)
            if ok ~= "OK" then failures[#failures + 1] = key .. ": " .. tostring(err) end
            core.sleep(0.01)
          end
          done = done + 1
        end)
      end
      core.sleep(0.2)
      rc_nodes:kill(victim.port)
      wait_for("the writers", 40, function() return done == 3 end)
      assert.same({}, failures)
      assert.is_true(worst < 10, "a command took " .. worst .. " s")
      assert.is_true(worst > 0.5, "no command waited for the failover (" .. worst .. " s)")
      -- the replica serves the victim's slots now
      wait_for("the map with the replica", 10, function()
        for _, n in ipairs(rc:nodes()) do
          if n.port == replica then return true end
        end
      end)
      for w = 1, 3 do assert.equal("200", rc:call("GET", "stream:" .. w .. ":200")) end
      -- the shard channel followed: made at the new master and said so
      wait_for("the shard channel at the new master, and its status", 10, function()
        return services.shardnumsub(replica, chan) == 1
          and has(log, "^up shard channels at 127%.0%.0%.1:" .. replica .. ": " .. chan)
      end)
      assert.equal(1, rc:spublish(chan, "after failover"))
      wait_for("the message", 5, function() return got[#got] == "after failover" end)
      -- the channel moved to a master alive
      wait_for("the channel subscribed again", 10, function()
        local n = 0
        for _, port in ipairs(rc_nodes:masters()) do n = n + services.numsub(port, "news") end
        return n == 1
      end)
      rc:publish("news", "still here")
      wait_for("the channel's message", 5, function() return got[#got] == "news still here" end)
    end, 60)
  end)
end)

describe("duplex.redis.cluster over TLS", function()
  teardown(proc.killall)

  it("speaks TLS to every node, at the TLS ports the map names", function()
    local certs = require("support.certs").generate()
    local ok, err = pcall(function()
      local nodes = services.redis_cluster { masters = 3, replicas = 0, tls = certs }
      local rok, rerr = pcall(run, function()
        local rc = cluster { url = nodes.tls_urls[2], tls = { ca = certs.ca } }
        local tls_ports = {}
        for _, p in ipairs(nodes.tls_ports) do tls_ports[p] = true end
        assert.equal(3, #rc:nodes())
        for _, n in ipairs(rc:nodes()) do assert.is_true(tls_ports[n.port], n.addr .. " is no TLS port") end
        for i = 1, 30 do assert.equal("OK", rc:call("SET", "tls:" .. i, i)) end
        for i = 1, 30 do assert.equal(tostring(i), rc:call("GET", "tls:" .. i)) end
        local got
        assert.is_true(rc:ssubscribe("tls:chan", function(_, m) got = m end))
        assert.equal(1, rc:spublish("tls:chan", "hush"))
        wait_for("the message", 5, function() return got == "hush" end)
        fails("TLS handshake failed", nil, redis.cluster { url = nodes.tls_urls[1], tls = { ca = certs.other_ca } })
      end)
      nodes:stop()
      assert(rok, rerr)
    end)
    certs.cleanup()
    assert(ok, err)
  end)
end)

-- RESP for what a fake node answers: strings as bulk strings, integers,
-- lists as arrays.
local function encode(v)
  if type(v) == "table" then
    local out = { "*" .. #v .. "\r\n" }
    for i, x in ipairs(v) do out[i + 1] = encode(x) end
    return table.concat(out)
  elseif math.type(v) == "integer" then
    return ":" .. v .. "\r\n"
  end
  return "$" .. #v .. "\r\n" .. v .. "\r\n"
end

-- CLUSTER SHARDS for { {first, last, port}... }, one master each.
local function shards(list)
  local out = {}
  for i, s in ipairs(list) do
    out[i] = { "slots", { s[1], s[2] }, "nodes", { { "id", "fake" .. i, "port", s[3], "ip", "127.0.0.1",
      "endpoint", "127.0.0.1", "role", "master", "replication-offset", 0, "health", "online" } } }
  end
  return out
end

-- A fake cluster node on a duplex socket: PING answered, CLUSTER SHARDS by
-- fake.shards (a list, or a function of nothing giving the raw reply),
-- anything else by answer(sock, cmd, fake). fake.seen counts commands.
local function fake_node(answer)
  local listener = assert(core.listen { host = "127.0.0.1", port = 0 })
  local _, port = listener:address()
  local fake = { port = port, url = "redis://127.0.0.1:" .. port, accepted = 0, socks = {}, seen = {} }
  local function serve(sock)
    local parser = resp.parser()
    while true do
      local data = sock:read(nil, 30)
      if not data then return end
      parser:feed(data)
      for cmd in function() return parser:next() end do
        local name = cmd[1]:upper() .. (cmd[2] and " " .. cmd[2]:upper() or "")
        fake.seen[cmd[1]:upper()] = (fake.seen[cmd[1]:upper()] or 0) + 1
        if name:match("^PING") then
          sock:write("+PONG\r\n")
        elseif name == "CLUSTER SHARDS" then
          sock:write(type(fake.shards) == "function" and fake.shards() or encode(fake.shards))
        elseif answer(sock, cmd, fake) == "close" then
          return sock:close()
        end
      end
    end
  end
  core.spawn(function()
    while true do
      local sock = listener:accept()
      if not sock then return end
      fake.accepted = fake.accepted + 1
      fake.socks[#fake.socks + 1] = sock
      core.spawn(serve, sock)
    end
  end)
  function fake.close()
    listener:close()
    for _, s in ipairs(fake.socks) do s:close() end
  end
  return fake
end

local function writes(bytes) return function(sock) sock:write(bytes) end end

-- Fast retries, so that every case ends within a second or two.
local function quick(fake, more)
  local o = { url = fake.url, retry_timeout = 0.5, timeout = 0.3, connect_timeout = 0.3, backoff_min = 0.01,
    backoff_max = 0.05 }
  for k, v in pairs(more or {}) do o[k] = v end
  return o
end

local function timed(limit, fn)
  local t0 = core.now()
  fn()
  local took = core.now() - t0
  assert.is_true(took < limit, "took " .. took .. " s")
end

describe("duplex.redis.cluster against hostile nodes", function()
  teardown(proc.killall)

  it("refuses an empty slot map, and one that cannot be read", function()
    run(function()
      local fake = fake_node(writes("-ERR no\r\n"))
      fake.shards = {}
      timed(1, function()
        fails("^no slot map %(127.0.0.1:%d+: an empty slot map%)$", nil, redis.cluster(quick(fake)))
      end)
      fake.shards = { { "slots", { 5, 1 }, "nodes", {} } }
      fails("a shard with slots and no master", nil, redis.cluster(quick(fake)))
      fake.shards = function() return encode { { "slots", { 0, 99999 }, "nodes", { { "port", fake.port, "role",
        "master", "ip", "127.0.0.1" } } } } end
      fails("a bad slot range 0%-99999", nil, redis.cluster(quick(fake)))
      fake.shards = function() return "$5\r\nhello\r\n" end
      fails("CLUSTER SHARDS answered no list", nil, redis.cluster(quick(fake)))
      fake.shards = function() return "$999999999999\r\n" end
      fails("bad reply: bulk string of 999999999999 bytes, over max_reply", nil,
        redis.cluster(quick(fake, { max_reply = 1 << 20 })))
      fake.close()
    end)
  end)

  it("falls back to CLUSTER SLOTS where CLUSTER SHARDS is unknown", function()
    run(function()
      local fake
      fake = fake_node(function(sock, cmd)
        if cmd[1] == "CLUSTER" and cmd[2] == "SLOTS" then
          sock:write(encode { { 0, 16383, { "127.0.0.1", fake.port, "id1" } } })
        else
          sock:write("+" .. cmd[1] .. "\r\n")
        end
      end)
      fake.shards = function() return "-ERR unknown subcommand 'SHARDS'\r\n" end
      local rc = cluster(quick(fake))
      assert.same({ { addr = "127.0.0.1:" .. fake.port, host = "127.0.0.1", port = fake.port, id = "id1",
        slots = { { 0, 16383 } }, replicas = {} } }, rc:nodes())
      assert.equal("GET", rc:call("GET", "x"))
      fake.close()
    end)
  end)

  it("gives every node the seed URL's user and password", function()
    run(function()
      local auth = {}
      local function node(tag)
        return fake_node(function(sock, cmd)
          if cmd[1] == "AUTH" then
            auth[#auth + 1] = tag .. " " .. table.concat(cmd, " ", 2)
            sock:write("+OK\r\n")
          else
            sock:write("+" .. tag .. "\r\n")
          end
        end)
      end
      local a, b = node("a"), node("b")
      a.shards = shards { { 0, 8191, a.port }, { 8192, 16383, b.port } }
      local rc = cluster { url = "redis://alice:s%3Acret@127.0.0.1:" .. a.port }
      local low, high
      for i = 1, 1000 do
        local s = redis.slot("k" .. i)
        if s < 8192 then low = low or "k" .. i else high = high or "k" .. i end
      end
      assert.same({ "a", "b" }, { rc:call("GET", low), rc:call("GET", high) })
      table.sort(auth)
      assert.same({ "a alice s:cret", "b alice s:cret" }, auth)
      a.close()
      b.close()
    end)
  end)

  it("says which slot nobody serves, after retrying a while", function()
    run(function()
      local fake = fake_node(writes("+yes\r\n"))
      fake.shards = shards { { 0, 100, fake.port } }
      local rc = cluster(quick(fake))
      local inside, outside
      for i = 1, 100000 do
        local s = redis.slot("k" .. i)
        if s <= 100 then inside = inside or "k" .. i else outside = outside or "k" .. i end
      end
      assert.equal("yes", rc:call("GET", inside))
      local before = fake.seen.CLUSTER
      timed(1.5, function()
        fails("^slot " .. redis.slot(outside) .. " not served by any node$", "connection", rc:call("GET", outside))
      end)
      assert.is_true(fake.seen.CLUSTER > before, "the map was not reloaded")
      fake.close()
    end)
  end)

  it("follows a MOVED at once and reloads the map after", function()
    run(function()
      local a, b
      a = fake_node(function(sock, cmd)
        sock:write("-MOVED " .. redis.slot(cmd[2]) .. " 127.0.0.1:" .. b.port .. "\r\n")
      end)
      b = fake_node(writes("+from b\r\n"))
      a.shards = shards { { 0, 16383, a.port } } -- a map that is behind, each time
      local rc = cluster(quick(a, { max_redirects = 3 }))
      local maps = a.seen.CLUSTER
      assert.equal("from b", rc:call("GET", "x"))
      assert.same({ 1, 1 }, { a.seen.GET, b.seen.GET })
      wait_for("the map reloaded", 2, function() return a.seen.CLUSTER > maps end)
      a.close()
      b.close()
    end)
  end)

  it("waits out TRYAGAIN, CLUSTERDOWN, LOADING, MASTERDOWN and a lost connection", function()
    run(function()
      local answers = { "-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
        "-CLUSTERDOWN The cluster is down\r\n", "-LOADING Redis is loading the dataset in memory\r\n",
        "-MASTERDOWN Link with MASTER is down\r\n", "close", "+at last\r\n" }
      local fake = fake_node(function(sock, _, f)
        local a = answers[f.seen.GET]
        if a == "close" then return "close" end
        sock:write(a)
      end)
      fake.shards = shards { { 0, 16383, fake.port } }
      local rc = cluster(quick(fake, { retry_timeout = 5 }))
      timed(3, function() assert.equal("at last", rc:call("GET", "x")) end)
      assert.equal(6, fake.seen.GET)
      fake.close()
    end)
  end)

  it("stops a MOVED loop between two nodes after max_redirects", function()
    run(function()
      local a, b
      local function moved(to) return function(sock, cmd)
        sock:write("-MOVED " .. redis.slot(cmd[2]) .. " " .. to() .. "\r\n")
      end end
      a = fake_node(moved(function() return "127.0.0.1:" .. b.port end))
      b = fake_node(moved(function() return ":" .. a.port end)) -- no host: the node's own
      a.shards = shards { { 0, 16383, a.port } }
      b.shards = a.shards
      local rc = cluster(quick(a, { max_redirects = 5 }))
      timed(1, function()
        fails("^too many redirects %(more than 5%), the last: MOVED %d+ ", "connection", rc:call("GET", "x"))
      end)
      -- one GET per redirect, and a few more when a map reloaded meanwhile
      -- closed b's client (b is no master in it) under the GET
      local gets = a.seen.GET + (b.seen.GET or 0)
      assert.is_true(gets >= 6 and gets <= 15, gets .. " GETs")
      a.close()
      b.close()
    end)
  end)

  local HOSTILE = {
    { "a MOVED that cannot be read", writes("-MOVED over there\r\n"),
      "^a redirect that cannot be read from 127.0.0.1:%d+: MOVED over there$", "connection", "map" },
    { "a MOVED to port 0", writes("-MOVED 1 127.0.0.1:0\r\n"), "a redirect that cannot be read", "connection",
      "map" },
    { "a huge bulk length", writes("$999999999999\r\n"),
      "^127.0.0.1:%d+: bad reply: bulk string of 999999999999 bytes, over max_reply", "connection" },
    { "garbage", writes("%%% not RESP\r\n"), "^127.0.0.1:%d+: bad reply: protocol error", "connection" },
    { "silence", function() end, "^127.0.0.1:%d+: timeout$", "connection" },
    { "a cluster that stays down", writes("-CLUSTERDOWN The cluster is down\r\n"), "^CLUSTERDOWN", "redis" },
    { "TRYAGAIN forever", writes("-TRYAGAIN Multiple keys request during rehashing of slot\r\n"), "^TRYAGAIN",
      "redis" },
  }
  for _, case in ipairs(HOSTILE) do
    local name, answer, want, kind, reload = case[1], case[2], case[3], case[4], case[5]
    it("gives an error for " .. name .. " within retry_timeout, having tried again", function()
      run(function()
        local fake = fake_node(answer)
        fake.shards = shards { { 0, 16383, fake.port } }
        local rc = cluster(quick(fake, { max_reply = 1 << 20 }))
        timed(2, function() fails(want, kind, rc:call("GET", "x")) end)
        assert.is_true(fake.seen.GET > 1, "not tried again")
        if kind == "redis" or reload then
          assert.is_true(fake.seen.CLUSTER > 1, "the map was not reloaded")
        else
          assert.is_true(fake.accepted > 1, "no new connection")
        end
        fake.close()
      end)
    end)
  end
end)
