-- History, recovery and presence (duplex.pubsub with a broker that stores
-- publications): over real loopback connections, with the in-process broker
-- and with duplex.redis's on a real redis-server. A client that comes back
-- with its last position gets what it missed, in order, once, then the live
-- ones; a history that no longer covers the gap says so; a node whose
-- broker link was cut catches up from the stream; a dead node's members
-- leave the room within the presence TTL.
local duplex = require "duplex"
local core = require "duplex.core"
local runtime = require "duplex.runtime"
local pubsub = require "duplex.pubsub"
local redis = require "duplex.redis"
local proc = require "support.proc"
local services = require "support.services"

local run = runtime.blocking

local wait_until = require("support.loop").wait_until

-- What clients are sent: "epoch:offset message", so that they know where
-- they are.
local function format(_, message, pos) return pos.epoch .. ":" .. pos.offset .. " " .. message end

local opened, servers = {}, {}
after_each(function()
  for _, o in ipairs(opened) do o:close() end
  opened = {}
  for _, srv in ipairs(servers) do srv:shutdown(1) end
  servers = {}
end)

-- Each connection recovers the topic its path names on the hub its query's
-- node= names, from its query's since=, and is then told the outcome:
-- "recovered <true|false|nil> <epoch>:<offset> <missed> <reason>".
local function history_server(hubs)
  local srv = assert(duplex.listen {
    host = "127.0.0.1", port = 0, ping_interval = 0,
    handler = function(ws, req)
      local hub = hubs[req.query.node or "a"]
      local r, err = hub:recover(ws, req.path:sub(2), pubsub.parse_position(req.query.since))
      if not r then ws:send("error " .. err)
      else
        ws:send(("recovered %s %s:%d %d %s"):format(tostring(r.recovered), r.epoch, r.offset, r.missed,
          r.reason or ""))
      end
      for _ in ws:messages() do end
      hub:unsubscribe_all(ws)
    end,
  })
  servers[#servers + 1] = srv
  return srv
end

local function connect(srv, target)
  local ws = assert(duplex.connect(srv:url(target), { ping_interval = 0 }))
  opened[#opened + 1] = ws
  return ws
end

-- The next n messages (failing on a silence of 5 s), then the outcome line.
local function receive(ws, n)
  local got = {}
  for i = 1, n do got[i] = assert(ws:receive(5)) end
  return got
end

local function outcome(ws)
  local line = assert(ws:receive(5))
  local recovered, epoch, offset, missed, reason = line:match("^recovered (%a+) (%w*):(%d+) (%d+) ?(.*)$")
  assert(recovered, "not an outcome line: " .. line)
  return { recovered = recovered, epoch = epoch, offset = tonumber(offset), missed = tonumber(missed),
    reason = reason }
end

local function numbered(epoch, from, to, prefix)
  local want = {}
  for i = from, to do want[#want + 1] = epoch .. ":" .. i .. " " .. (prefix or "m") .. i end
  return want
end

local function silent(ws, seconds)
  assert.same({ "timeout" }, { select(2, ws:receive(seconds or 0.3)) })
end

describe("history with the in-process broker", function()
  local function new_hub(rule)
    return pubsub.new { broker = pubsub.memory_broker { history = rule }, format = format }
  end

  it("gives a returning client what it missed, in order and once, then the live publications", function()
    local hub = new_hub { match = "^room", size = 100, ttl = 60 }
    local srv = history_server { a = hub }
    local c1 = connect(srv, "/room")
    assert.same({ recovered = "nil", epoch = "", offset = 0, missed = 0, reason = "" }, outcome(c1))
    for i = 1, 3 do assert.equal(1, hub:publish("room", "m" .. i)) end
    local got = receive(c1, 3)
    local epoch = got[1]:match("^(%w+):")
    assert.same(numbered(epoch, 1, 3), got)
    c1:close()
    wait_until("c1 gone", 5, function() return hub:subscribers("room") == 0 end)
    for i = 4, 6 do hub:publish("room", "m" .. i) end

    local c2 = connect(srv, "/room?since=" .. epoch .. ":3")
    assert.same(numbered(epoch, 4, 6), receive(c2, 3))
    assert.same({ recovered = "true", epoch = epoch, offset = 6, missed = 3, reason = "" }, outcome(c2))
    hub:publish("room", "m7")
    assert.same(numbered(epoch, 7, 7), receive(c2, 1))
    silent(c2)

    -- A client that saw the room empty recovers everything from the start.
    local c3 = connect(srv, "/room?since=:0")
    assert.same(numbered(epoch, 1, 7), receive(c3, 7))
    assert.equal("true", outcome(c3).recovered)
    -- One that is up to date misses nothing.
    local c4 = connect(srv, "/room?since=" .. epoch .. ":7")
    assert.same({ recovered = "true", epoch = epoch, offset = 7, missed = 0, reason = "" }, outcome(c4))
    silent(c4)
  end)

  it("says recovery failed when the history no longer reaches back, or is another epoch's", function()
    local hub = new_hub { size = 3, ttl = 60 }
    local srv = history_server { a = hub }
    for i = 1, 10 do hub:publish("t", "m" .. i) end
    local epoch = hub.broker:read("t").epoch
    local c1 = connect(srv, "/t?since=" .. epoch .. ":2")
    local o = outcome(c1) -- nothing of 3..7 is sent: a gap is not filled with half
    assert.same({ "false", 10, 0 }, { o.recovered, o.offset, o.missed })
    assert.matches("no longer reaches back to offset 2", o.reason)
    local c2 = connect(srv, "/t?since=" .. epoch .. ":7")
    assert.same(numbered(epoch, 8, 10), receive(c2, 3))
    assert.equal("true", outcome(c2).recovered)
    local c3 = connect(srv, "/t?since=0123abcd:7")
    o = outcome(c3)
    assert.same({ "false", epoch }, { o.recovered, o.epoch })
    assert.matches("new epoch", o.reason)
    local c4 = connect(srv, "/t?since=" .. epoch .. ":11")
    assert.matches("beyond the history", outcome(c4).reason)
    -- Every one of them is subscribed now, and gets the next one live.
    hub:publish("t", "m11")
    for _, ws in ipairs { c1, c2, c3, c4 } do assert.same(numbered(epoch, 11, 11), receive(ws, 1)) end
  end)

  it("starts a new epoch when the history expires", function()
    local hub = new_hub { ttl = 1 }
    local srv = history_server { a = hub }
    hub:publish("t", "old")
    local epoch = hub.broker:read("t").epoch
    run(function() core.sleep(1.2) end)
    local c1 = connect(srv, "/t?since=" .. epoch .. ":1")
    local o = outcome(c1)
    assert.same({ "false", "", 0 }, { o.recovered, o.epoch, o.offset })
    assert.matches("expired", o.reason)
    hub:publish("t", "new")
    local line = receive(c1, 1)[1]
    local fresh = line:match("^(%w+):1 new$")
    assert.truthy(fresh, line)
    assert.not_equal(epoch, fresh)
  end)

  it("refuses to recover a topic without history, and a malformed position", function()
    local hub = new_hub { match = "^room" }
    assert.has_error(function() hub:recover({}, "chat", nil) end,
      "recover: topic chat has no history (see the broker's history option)")
    assert.has_error(function() hub:recover({}, "room", { epoch = 1, offset = 2 }) end,
      "recover: since must be { epoch = string, offset = integer } or nil")
    assert.is_nil(pubsub.parse_position("abc"))
    assert.is_nil(pubsub.parse_position("e:1:2"))
    assert.is_nil(pubsub.parse_position("e:99999999999999999"))
    assert.same({ epoch = "e1", offset = 5 }, pubsub.parse_position("e1:5"))
    assert.has_error(function() pubsub.memory_broker { history = { size = 0 } } end,
      "pubsub.memory_broker: history.size must be a positive integer")
    assert.has_error(function() pubsub.memory_broker { history = { maxlen = 3 } } end,
      "pubsub.memory_broker: unknown history option 'maxlen'")
  end)

  it("keeps presence: members joined twice leave after two leaves", function()
    local b = pubsub.memory_broker()
    b:join("room", "ann", "Ann")
    b:join("room", "bob")
    b:join("room", "ann", "Ann")
    assert.equal(2, b:count("room"))
    b:leave("room", "ann")
    assert.equal(2, b:count("room"))
    b:leave("room", "ann")
    assert.same({ { id = "bob", info = "", node = "local" } }, b:members("room"))
    b:leave("room", "bob")
    assert.equal(0, b:count("room"))
  end)
end)

describe("history through Redis", function()
  local r
  before_each(function() r = services.redis() end)
  after_each(function() r:cleanup() end)

  local brokers = {}
  after_each(function()
    for _, b in ipairs(brokers) do b:close() end
    brokers = {}
  end)

  -- A node: its broker (status lines kept) and hub.
  local function node(name, extra)
    local status = {}
    local o = { url = r.url, prefix = "h:", node_id = name, backoff_max = 0.5,
      history = { match = "^room", size = 1000, ttl = 60 },
      on_status = function(s, detail) status[#status + 1] = s .. " " .. detail end }
    for k, v in pairs(extra or {}) do o[k] = v end
    local b = assert(redis.broker(o))
    brokers[#brokers + 1] = b
    local hub = pubsub.new { broker = b, format = format }
    wait_until(name .. "'s broker up", 5, function()
      local all = table.concat(status, "\n")
      return all:find("up subscriber") and all:find("up publisher")
    end)
    return hub, b, status
  end

  -- Node "a" with a history server and one client subscribed to "room"
  -- (its outcome line read): hub, server, client, status lines.
  local function subscribed_node(extra)
    local a, _, status = node("a", extra)
    local srv = history_server { a = a }
    local c = connect(srv, "/room")
    outcome(c)
    wait_until("subscribed", 5, function() return services.numsub(r.port, "h:room") == 1 end)
    return a, srv, c, status
  end

  it("delivers a history topic in one order on every node, and recovers a client across nodes", function()
    local a, ba = node("a")
    local b = node("b")
    local srv = history_server { a = a, b = b }
    local ca, cb = connect(srv, "/room?node=a"), connect(srv, "/room?node=b")
    assert.equal("nil", outcome(ca).recovered)
    assert.equal("nil", outcome(cb).recovered)
    wait_until("both nodes subscribed", 5, function() return services.numsub(r.port, "h:room") == 2 end)
    -- Published on both nodes at once: one order, the same on both.
    for i = 1, 10 do
      a:publish("room", "a" .. i)
      b:publish("room", "b" .. i)
    end
    local got_a, got_b = receive(ca, 20), receive(cb, 20)
    assert.same(got_a, got_b)
    local epoch = got_a[1]:match("^(%w+):1 ")
    assert.truthy(epoch, got_a[1])
    for i, line in ipairs(got_a) do assert.matches("^" .. epoch .. ":" .. i .. " [ab]%d+$", line) end

    -- b's client goes away for 2 s while a publishes, and comes back on a.
    cb:close()
    for i = 1, 50 do a:publish("room", "x" .. i) end
    assert.equal(50, #receive(ca, 50))
    run(function() core.sleep(2) end)
    local back = connect(srv, "/room?node=a&since=" .. epoch .. ":20")
    local missed = receive(back, 50)
    for i, line in ipairs(missed) do assert.equal(epoch .. ":" .. (20 + i) .. " x" .. i, line) end
    assert.same({ recovered = "true", epoch = epoch, offset = 70, missed = 50, reason = "" }, outcome(back))
    a:publish("room", "live")
    assert.same({ epoch .. ":71 live" }, receive(back, 1))
    assert.same({ epoch .. ":71 live" }, receive(ca, 1))
    silent(back)
    wait_until("a's publications counted", 5, function() return ba.stats.published == 10 + 50 + 1 end)
  end)

  it("catches a node up from the stream after its subscriber connection was cut", function()
    local a = node("a")
    local b, bb, bstatus = node("b", { backoff_min = 1, backoff_max = 1 })
    local srv = history_server { a = a, b = b }
    local ca, cb = connect(srv, "/room?node=a"), connect(srv, "/room?node=b")
    outcome(ca)
    outcome(cb)
    wait_until("both nodes subscribed", 5, function() return services.numsub(r.port, "h:room") == 2 end)
    a:publish("room", "m1")
    local epoch = receive(cb, 1)[1]:match("^(%w+):1 m1$")
    assert.truthy(epoch)
    assert.same(numbered(epoch, 1, 1), receive(ca, 1))
    -- Cut both nodes' subscriber connections; b's comes back after ~1 s,
    -- a's sooner. What a publishes meanwhile reaches both nodes' clients,
    -- in order and once: from pub/sub, or from the stream.
    run(function()
      local db = assert(redis.connect(r.url))
      assert.equal(2, db:call("CLIENT", "KILL", "TYPE", "pubsub"))
      db:close()
    end)
    for i = 2, 21 do a:publish("room", "m" .. i) end
    assert.same(numbered(epoch, 2, 21), receive(ca, 20))
    assert.same(numbered(epoch, 2, 21), receive(cb, 20))
    silent(cb)
    assert.is_true(bb.stats.recovered >= 1, "b caught up from the stream")
    assert.matches("down subscriber", table.concat(bstatus, "\n"))
    a:publish("room", "m22")
    assert.same(numbered(epoch, 22, 22), receive(cb, 1))
  end)

  it("catches up a topic whose first publications it never heard", function()
    local _, _, c = subscribed_node()
    -- The room's first two publications are stored while this node's
    -- subscriber link is down (their pushes lost), then the link comes
    -- back: nothing live says they exist.
    run(function()
      local db = assert(redis.connect(r.url))
      local rid = assert(db:call("INFO", "replication")):match("master_replid:(%x+)")
      assert(db:call("HSET", "h:{room}room:m", "e", "feed0002", "o", 2, "r", rid))
      assert(db:call("XADD", "h:{room}room:h", "1-0", "n", "x", "k", "T", "d", "early1"))
      assert(db:call("XADD", "h:{room}room:h", "2-0", "n", "x", "k", "T", "d", "early2"))
      assert.equal(1, db:call("CLIENT", "KILL", "TYPE", "pubsub"))
      db:close()
    end)
    assert.same({ "feed0002:1 early1", "feed0002:2 early2" }, receive(c, 2))
    silent(c)
  end)

  it("fills a gap in the live offsets from the stream", function()
    local a, _, c = subscribed_node()
    a:publish("room", "m1")
    local epoch = receive(c, 1)[1]:match("^(%w+):1 m1$")
    -- Stored without reaching pub/sub (as when a publication's push is lost):
    -- the next live one shows the gap.
    run(function()
      local db = assert(redis.connect(r.url))
      assert(db:call("HINCRBY", "h:{room}room:m", "o", 1))
      assert(db:call("XADD", "h:{room}room:h", "2-0", "n", "x", "k", "T", "d", "m2"))
      db:close()
    end)
    a:publish("room", "m3")
    assert.same(numbered(epoch, 2, 3), receive(c, 2))
    silent(c)
  end)

  it("reads a new epoch's first publications from the stream when pub/sub brought a later one", function()
    local a, _, c = subscribed_node()
    a:publish("room", "m1")
    assert.matches("^%w+:1 m1$", receive(c, 1)[1])
    -- The history starts over (Redis came back empty, say) and its first
    -- publication is stored without reaching this node: the next one
    -- comes live with offset 2 of the new epoch.
    run(function()
      local db = assert(redis.connect(r.url))
      local rid = assert(db:call("INFO", "replication")):match("master_replid:(%x+)")
      assert(db:call("DEL", "h:{room}room:m", "h:{room}room:h"))
      assert(db:call("HSET", "h:{room}room:m", "e", "feed0001", "o", 1, "r", rid))
      assert(db:call("XADD", "h:{room}room:h", "1-0", "n", "x", "k", "T", "d", "fresh1"))
      db:close()
    end)
    a:publish("room", "fresh2")
    assert.same({ "feed0001:1 fresh1", "feed0001:2 fresh2" }, receive(c, 2))
    silent(c)
  end)

  it("starts a new epoch continuing the offsets when Redis restarts from disk without its last writes", function()
    -- Redis restarted from an older snapshot has lost offsets 4 and 5,
    -- and would hand them out again: the node that delivered them must
    -- not skip the new ones as duplicates.
    local a, srv, c = subscribed_node()
    for i = 1, 3 do a:publish("room", "m" .. i) end
    local epoch = receive(c, 3)[1]:match("^(%w+):1 m1$")
    run(function()
      local db = assert(redis.connect(r.url))
      assert(db:call("SAVE"))
      db:close()
    end)
    a:publish("room", "m4")
    a:publish("room", "m5")
    assert.same(numbered(epoch, 4, 5), receive(c, 2))
    r:stop("KILL")
    r:start()
    wait_until("resubscribed", 10, function() return services.numsub(r.port, "h:room") == 1 end)
    a:publish("room", "m6")
    local got = receive(c, 1)[1]
    local epoch2 = got:match("^(%w+):4 m6$")
    assert(epoch2, "m6 as offset 4 of a new epoch, got " .. got)
    assert.not_equal(epoch, epoch2)
    silent(c)
    -- a client up to offset 3 recovers across the restart; one that saw
    -- offset 5 is told it cannot
    local before = connect(srv, "/room?since=" .. epoch .. ":2")
    assert.same({ epoch2 .. ":3 m3", epoch2 .. ":4 m6" }, receive(before, 2))
    local o = outcome(before)
    assert.same({ "true", epoch2, 4, 2 }, { o.recovered, o.epoch, o.offset, o.missed })
    local after = connect(srv, "/room?since=" .. epoch .. ":5")
    o = outcome(after)
    assert.same({ "false", epoch2, 4 }, { o.recovered, o.epoch, o.offset })
    assert.matches("after offset 3 were lost", o.reason)
    a:publish("room", "m7")
    for _, ws in ipairs { c, before, after } do assert.same({ epoch2 .. ":5 m7" }, receive(ws, 1)) end
  end)

  it("tells a client that its history expired, and starts a new epoch", function()
    local a, srv, c1 = subscribed_node({ history = { ttl = 1 } })
    a:publish("room", "old")
    local epoch = receive(c1, 1)[1]:match("^(%w+):1 old$")
    c1:close()
    run(function() core.sleep(2.2) end) -- Redis expires both keys
    local c2 = connect(srv, "/room?since=" .. epoch .. ":1")
    local o = outcome(c2)
    assert.same({ "false", "", 0 }, { o.recovered, o.epoch, o.offset })
    assert.matches("expired", o.reason)
    a:publish("room", "new")
    local fresh = receive(c2, 1)[1]:match("^(%w+):1 new$")
    assert.truthy(fresh)
    assert.not_equal(epoch, fresh)
  end)

  it("lists members of every node, and forgets a SIGKILLed node's within the TTL", function()
    local _, b = node("b", { presence_ttl = 1 })
    -- Another node in a process of its own, killed without a word.
    local script = table.concat({
      "package.path = 'lua/?.lua;lua/?/init.lua;' .. package.path",
      "package.cpath = 'build/?.so;' .. package.cpath",
      "local duplex = require 'duplex'",
      "local broker = assert(require('duplex.redis').broker { url = arg[1], prefix = 'h:',",
      "  node_id = 'doomed', presence_ttl = 1,",
      "  on_status = function(s, d) if s == 'up' and d == 'publisher' then",
      "    print('up'); io.stdout:flush() end end })",
      "broker:join('room', 'x1', 'X one')",
      "broker:join('room', 'x2')",
      "duplex.run()",
    }, "\n")
    local path = os.tmpname()
    proc.write_file(path, script)
    local h = proc.spawn({ "lua5.4", path, r.url }, { env = services.env, limit = 60 })
    finally(function() h:kill("KILL"); os.remove(path) end)
    assert.equal("up", h:read_line(10))
    b:join("room", "y", "Y")
    wait_until("three members", 5, function() return b:count("room") == 3 end)
    local members = b:members("room")
    table.sort(members, function(m, n) return m.id < n.id end)
    assert.same({ { id = "x1", info = "X one", node = "doomed" }, { id = "x2", info = "", node = "doomed" },
      { id = "y", info = "Y", node = "b" } }, members)
    -- b's own entry outlives several TTLs: its heartbeat refreshes it.
    h:kill("KILL")
    wait_until("the dead node's members to leave", 3, function() return b:count("room") == 1 end)
    run(function() core.sleep(1.5) end)
    assert.same({ { id = "y", info = "Y", node = "b" } }, b:members("room"))
    b:leave("room", "y")
    wait_until("y to leave", 2, function() return b:count("room") == 0 end)
  end)

  it("reports a malformed payload on a topic's channel and goes on", function()
    local a, _, c, reports = subscribed_node()
    run(function()
      local db = assert(redis.connect(r.url))
      db:publish("h:room", "garbage")
      db:publish("h:room", "x T e notanumber y")
      db:close()
    end)
    a:publish("room", "m1")
    assert.matches("^%w+:1 m1$", receive(c, 1)[1])
    assert.matches("error subscriber: malformed payload on room", table.concat(reports, "\n"))
  end)
end)
