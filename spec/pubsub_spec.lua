-- Topics over real loopback connections (duplex.pubsub), and rooms that span
-- nodes through a real redis-server (duplex.redis): delivery counts, slow
-- subscribers under both overflow policies, a broker outage and its return.
local duplex = require "duplex"
local core = require "duplex.core"
local runtime = require "duplex.runtime"
local pubsub = require "duplex.pubsub"
local redis = require "duplex.redis"
local proc = require "support.proc"
local services = require "support.services"
local certs = require "support.certs"

local run = runtime.blocking

local wait_until = require("support.loop").wait_until

local servers = {}

-- A server whose every connection subscribes to the topic named by its path
-- ("/news" -> "news") on the hub the `hubs` table maps its query to ("?a"),
-- or on `hubs` itself when it is a hub; connections[query] = server side.
local function topic_server(hubs, opts)
  local connections = {}
  opts = opts or {}
  local srv = assert(duplex.listen {
    host = "127.0.0.1", port = 0, ping_interval = 0,
    max_buffered = opts.max_buffered, deflate = opts.deflate,
    handler = function(ws, req)
      local hub = hubs.publish and hubs or hubs[req.raw_query]
      if req.raw_query then connections[req.raw_query] = ws end
      hub:subscribe(ws, req.path:sub(2))
      for _ in ws:messages() do end
      hub:unsubscribe_all(ws)
    end,
  })
  servers[#servers + 1] = srv
  return srv, connections
end

-- Everything a test opens is closed after it, passed or failed: a
-- connection or broker left behind would keep later specs' loops running.
local opened = {}

local function connect(srv, target)
  local ws = assert(duplex.connect(srv:url(target), { ping_interval = 0 }))
  opened[#opened + 1] = ws
  return ws
end

-- A raw TCP client that does the upgrade and then never reads.
local function raw_subscriber(srv, target)
  return run(function()
    local sock = assert(core.connect { host = "127.0.0.1", port = srv.port, timeout = 2 })
    local hc = core.handshake_client { host = "127.0.0.1", port = srv.port, target = target }
    sock:write(hc:request())
    repeat until hc:feed(assert(sock:read(nil, 2)))
    opened[#opened + 1] = sock
    return sock
  end)
end

after_each(function()
  for _, o in ipairs(opened) do
    if o.abort then o:abort("test over") else o:close() end
  end
  opened = {}
  for _, srv in ipairs(servers) do srv:shutdown(1) end
  servers = {}
end)

describe("pubsub in one process", function()
  it("reaches each of 200 subscribers once, with one encoding of the frame", function()
    local hub = pubsub.new()
    local srv = topic_server(hub)
    local clients = {}
    for i = 1, 200 do clients[i] = connect(srv, "/news") end
    wait_until("200 subscribers", 10, function() return hub:subscribers("news") == 200 end)

    local encode, encoded = core.encode_frame, 0
    core.encode_frame = function(...) encoded = encoded + 1; return encode(...) end
    local ok, reached = pcall(hub.publish, hub, "news", "hello, everyone")
    core.encode_frame = encode
    assert(ok, reached)
    assert.equal(200, reached)
    assert.equal(1, encoded)
    local st = hub.stats
    assert.same({ 1, 200, 0, 0 }, { st.published, st.delivered, st.dropped, st.closed })
    for _, ws in ipairs(clients) do assert.same({ "hello, everyone", "text" }, { ws:receive(5) }) end
    -- Once: the next thing each one sees is the next message, not a copy.
    assert.equal(200, hub:publish("news", "\0\1\2", "binary"))
    for _, ws in ipairs(clients) do assert.same({ "\0\1\2", "binary" }, { ws:receive(5) }) end
    assert.equal(0, hub:publish("nobody-listens", "lost"))
    for _, ws in ipairs(clients) do ws:close() end
  end)

  it("shares one large frame among subscribers without a copy each, intact for all", function()
    local hub = pubsub.new { max_backlog = 8 << 20 }
    local srv = topic_server(hub)
    local clients = {}
    for i = 1, 40 do clients[i] = connect(srv, "/big") end
    wait_until("40 subscribers", 10, function() return hub:subscribers("big") == 40 end)
    local big = {}
    for i = 1, 3 do
      big[i] = string.rep(string.char(96 + i), 200000) .. i
      assert.equal(40, hub:publish("big", big[i], "binary"))
    end
    for _, ws in ipairs(clients) do
      for i = 1, 3 do assert.equal(big[i], (ws:receive(10))) end
    end
    for _, ws in ipairs(clients) do ws:close() end
  end)

  it("forgets a connection once it ends, whether it closes or vanishes", function()
    local hub = pubsub.new()
    local srv, conns = topic_server(hub)
    local clients = {}
    for i = 1, 30 do clients[i] = connect(srv, "/news?" .. i) end
    wait_until("30 subscribers", 5, function() return hub:subscribers("news") == 30 end)
    -- The same connection on a second topic, and twice on the first.
    hub:subscribe(conns["1"], "sports")
    hub:subscribe(conns["1"], "news")
    assert.equal(30, hub:subscribers("news"))
    assert.equal(1, hub:publish("sports", "goal"))
    assert.same({ "goal", "text" }, { clients[1]:receive(5) })

    for i = 1, 10 do assert.is_true(clients[i]:close()) end       -- closing handshake
    for i = 11, 20 do clients[i]:abort("gone") end                 -- TCP reset, no close frame
    wait_until("20 subscribers to go", 5, function() return hub:subscribers("news") == 10 end)
    assert.equal(0, hub:subscribers("sports"))
    assert.is_nil(hub.topics.sports)
    for i = 1, 20 do assert.is_nil(hub.of[conns[tostring(i)]]) end
    assert.equal(10, hub:publish("news", "still here"))
    for i = 21, 30 do assert.same({ "still here", "text" }, { clients[i]:receive(5) }) end

    hub:unsubscribe(conns["21"], "news")
    hub:unsubscribe(conns["21"], "news") -- twice is harmless
    assert.equal(9, hub:publish("news", "nine"))
    assert.same({ "timeout" }, { select(2, clients[21]:receive(0.2)) })
  end)

  local payload = string.rep("p", 32 << 10)
  local function numbered(i) return string.format("%08d", i) .. payload end

  -- Publishes numbered messages until stop() says so, then `extra` more,
  -- pausing between them so that the readers keep up; tells set_total the
  -- count before the last one goes out (so that no reader waits for more).
  local function publish_until(hub, stop, extra, set_total)
    local n, deadline = 0, core.now() + 30
    while not stop() do
      assert(core.now() < deadline, "the slow subscriber never overflowed")
      n = n + 1
      hub:publish("news", numbered(n))
      core.sleep(0.001)
    end
    set_total(n + extra)
    for _ = 1, extra do
      n = n + 1
      hub:publish("news", numbered(n))
      core.sleep(0.001)
    end
    return n
  end

  -- Readers that record the numbers of the messages they get.
  local function read_all(clients, got, total)
    for i, ws in ipairs(clients) do
      got[i] = {}
      core.spawn(function()
        while #got[i] < total() do
          local m = ws:receive(10)
          if not m then break end
          got[i][#got[i] + 1] = tonumber(m:sub(1, 8))
        end
      end)
    end
  end

  local function sequence(n)
    local t = {}
    for i = 1, n do t[i] = i end
    return t
  end

  it("closes a subscriber that does not read (overflow = close); the others get everything", function()
    local hub = pubsub.new { max_backlog = 512 << 10, overflow = "close" }
    local srv, conns = topic_server(hub, { max_buffered = 256 << 20 })
    local fast = { connect(srv, "/news?fast1"), connect(srv, "/news?fast2") }
    local slow = raw_subscriber(srv, "/news?slow")
    wait_until("3 subscribers", 5, function() return hub:subscribers("news") == 3 end)
    local got, total = {}, math.huge
    run(function()
      read_all(fast, got, function() return total end)
      publish_until(hub, function() return hub.stats.closed > 0 end, 20, function(n) total = n end)
      while #got[1] < total or #got[2] < total do core.sleep(0.01) end
    end)
    assert.equal(1, hub.stats.closed)
    assert.equal(2, hub:subscribers("news"))
    assert.same(sequence(total), got[1])
    assert.same(sequence(total), got[2])
    -- The server closed it: its handler has seen the end, and so does the
    -- socket once it reads what was left in the kernel's buffers.
    local ws = conns.slow
    assert.equal("closed", ws.state)
    assert.matches("backlog over max_backlog", ws.close_reason)
    local ended = run(function()
      while true do
        local data, err = slow:read(nil, 5)
        if not data then return err end
      end
    end)
    assert.is_not.equal("timeout", ended)
    slow:close()
    for _, c in ipairs(fast) do c:close() end
  end)

  it("skips messages for a subscriber that does not read (overflow = drop), counting each", function()
    local drops = {}
    local hub = pubsub.new { max_backlog = 512 << 10, overflow = "drop",
      on_drop = function(ws, topic) drops[#drops + 1] = { ws, topic } end }
    local srv, conns = topic_server(hub, { max_buffered = 256 << 20 })
    local fast = { connect(srv, "/news?fast") }
    -- A duplex client reads only while receive() is called: this one waits.
    local slow = connect(srv, "/news?slow")
    wait_until("2 subscribers", 5, function() return hub:subscribers("news") == 2 end)
    local got, total = {}, math.huge
    run(function()
      read_all(fast, got, function() return total end)
      publish_until(hub, function() return hub.stats.dropped >= 10 end, 20, function(n) total = n end)
      while #got[1] < total do core.sleep(0.01) end
    end)
    local ws = conns.slow
    assert.equal("open", ws.state)
    assert.equal(2, hub:subscribers("news"))
    assert.equal(0, hub.stats.closed)
    assert.same(sequence(total), got[1])
    assert.is_true(ws.dropped >= 30, tostring(ws.dropped)) -- the 20 extra were dropped too
    assert.equal(ws.dropped, #drops)
    assert.equal(ws.dropped, hub.stats.dropped)
    for _, d in ipairs(drops) do
      assert.equal(ws, d[1])
      assert.equal("news", d[2])
    end
    -- Now it reads: what was queued arrives in order, the dropped ones never.
    local seen = {}
    while true do
      local m = slow:receive(1)
      if not m then break end
      seen[#seen + 1] = tonumber(m:sub(1, 8))
    end
    assert.equal(total, #seen + ws.dropped)
    for i = 2, #seen do assert.is_true(seen[i] > seen[i - 1]) end
    -- Caught up, it receives again.
    assert.equal(2, hub:publish("news", "welcome back"))
    assert.same({ "welcome back", "text" }, { slow:receive(5) })
    assert.same({ "welcome back", "text" }, { fast[1]:receive(5) })
    slow:close()
    fast[1]:close()
  end)

  -- core.fan_out queues a broadcast on the plain server connections in one
  -- call and hands back the rest (compressed, client side), which go one
  -- by one: every subscriber must still see every message once, in order,
  -- whichever way its copies went, small, compressed or shared by reference.
  -- n: how many subscribers of each server kind (plain, deflate, callbacks).
  local function every_path(n)
    local hub = pubsub.new { max_backlog = 8 << 20 }
    local srv = topic_server(hub)
    local dsrv = topic_server(hub, { deflate = true })
    local cb = assert(duplex.listen { host = "127.0.0.1", port = 0, ping_interval = 0,
      on_open = function(ws) hub:subscribe(ws, "mix") end,
      on_message = function() end,
      on_close = function(ws) hub:unsubscribe_all(ws) end })
    local sunk = {}
    local sink = assert(duplex.listen { host = "127.0.0.1", port = 0, ping_interval = 0,
      handler = function(ws) for m, kind in ws:messages() do sunk[#sunk + 1] = { m, kind } end end })
    servers[#servers + 1], servers[#servers + 2] = cb, sink
    local clients = {}
    for _ = 1, n.plain do clients[#clients + 1] = connect(srv, "/mix") end
    for _ = 1, n.deflate do
      local ws = assert(duplex.connect(dsrv:url("/mix"), { ping_interval = 0, deflate = true }))
      opened[#opened + 1] = ws
      clients[#clients + 1] = ws
    end
    for _ = 1, n.callbacks do clients[#clients + 1] = connect(cb, "/") end
    local up = connect(sink, "/") -- a client-side subscriber: its frames are masked one by one
    hub:subscribe(up, "mix")
    local all = #clients + 1
    wait_until(all .. " subscribers", 10, function() return hub:subscribers("mix") == all end)

    local fan_out, queued, others = core.fan_out, 0, 0
    core.fan_out = function(...)
      local q, rest = fan_out(...)
      queued, others = queued + q, others + (rest and #rest or 0)
      return q, rest
    end
    local sent, rng = {}, 7
    local ok, err = pcall(function()
      for i = 1, 60 do
        rng = (rng * 1103515245 + 12345) % 2147483648
        local size = ({ 10, 300, 20000 })[i % 3 + 1] + rng % 50
        local m = string.rep(string.char(97 + rng % 26), size) .. i
        sent[i] = { m, i % 2 == 0 and "binary" or "text" }
        assert.equal(all, hub:publish("mix", m, sent[i][2]))
      end
    end)
    core.fan_out = fan_out
    assert(ok, err)
    -- the plain ones in C, the deflate ones and the client side one by one,
    -- for each of the 60
    local plain = n.plain + n.callbacks
    assert.same({ plain * 60, (all - plain) * 60 }, { queued, others })
    assert.equal(all * 60, hub.stats.delivered)
    assert.is_true(hub.stats.compressed > 0)
    for _, ws in ipairs(clients) do
      for i = 1, 60 do assert.same(sent[i], { ws:receive(10) }) end
    end
    wait_until("the client side's 60", 10, function() return #sunk == 60 end)
    assert.same(sent, sunk)
  end

  it("delivers every message once, in order, to a topic whose subscribers take every path", function()
    every_path { plain = 6, deflate = 3, callbacks = 3 }
  end)

  -- fan_out takes the subscribers a batch at a time (l_fanout.c): several
  -- batches, and one left over, with the others among them
  it("delivers every message once, in order, to more subscribers than one of fan_out's batches", function()
    every_path { plain = 50, deflate = 7, callbacks = 20 }
  end)

  it("leaves to the caller every subscriber that is not a plain server connection", function()
    local frame = core.encode_frame("x")
    local q, rest = core.fan_out(frame, { a = true, b = core.engine { role = "server" } }, 0)
    assert.equal(0, q)
    table.sort(rest)
    assert.same({ "a", "b" }, rest)
    assert.same({ 0 }, { core.fan_out(frame, {}, 0) })
    assert.has_error(function() core.fan_out(frame, nil, 0) end)
    assert.has_error(function() core.fan_out(frame, {}, -1) end)
  end)

  it("refuses a bad overflow policy and non-string messages", function()
    assert.has_error(function() pubsub.new { overflow = "block" } end)
    assert.has_error(function() pubsub.new():publish("t", 42) end)
  end)
end)

local numsub = services.numsub

describe("pubsub across nodes through Redis", function()
  local server_ref
  teardown(proc.killall)
  after_each(function()
    if server_ref then server_ref:cleanup() end
    server_ref = nil
  end)

  -- Two nodes in this process: two hubs, each with its own broker.
  local function two_nodes(r, extra)
    local status = { a = {}, b = {} }
    local brokers, hubs = {}, {}
    for _, name in ipairs { "a", "b" } do
      local o = { url = r.url, prefix = "test:", backoff_max = 0.5,
        on_status = function(s, detail) table.insert(status[name], s .. " " .. detail) end }
      for k, v in pairs(extra or {}) do o[k] = v end
      brokers[name] = assert(redis.broker(o))
      opened[#opened + 1] = brokers[name]
      hubs[name] = pubsub.new { broker = brokers[name] }
    end
    -- Whether both connections of a node last reported "up"; or, for
    -- "down", its subscriber (the publisher's outage is seen when it
    -- publishes: nobody reads that connection between commands).
    local function up(name, want)
      want = want or "up"
      local last = {}
      for _, line in ipairs(status[name]) do
        local s, which = line:match("^(%a+) (%a+)")
        last[which] = s
      end
      return last.subscriber == want and (want == "down" or last.publisher == want)
    end
    wait_until("both brokers up", 5, function() return up("a") and up("b") end)
    return hubs, brokers, status, up
  end

  it("delivers a message published on one node to the other's subscribers, once each", function()
    local r = services.redis()
    server_ref = r
    local hubs, brokers = two_nodes(r)
    local srv = topic_server(hubs)
    local a1, a2 = connect(srv, "/room?a"), connect(srv, "/room?a")
    local b1 = connect(srv, "/room?b")
    wait_until("subscribers", 5, function()
      return hubs.a:subscribers("room") == 2 and hubs.b:subscribers("room") == 1
    end)
    wait_until("both nodes subscribed in Redis", 5, function() return numsub(r.port, "test:room") == 2 end)

    assert.equal(2, hubs.a:publish("room", "from a"))
    assert.equal(1, hubs.b:publish("room", "from b\r\n*1\r\n", "text"))
    assert.equal(2, hubs.a:publish("room", "\0bin\255", "binary"))
    -- Everyone sees the three once, whatever the route (local or Redis).
    local want = { { "from a", "text" }, { "from b\r\n*1\r\n", "text" }, { "\0bin\255", "binary" } }
    for _, ws in ipairs { a1, a2, b1 } do
      local got = {}
      for i = 1, 3 do got[i] = { ws:receive(5) } end
      table.sort(got, function(x, y) return x[1] < y[1] end)
      local sorted = { table.unpack(want) }
      table.sort(sorted, function(x, y) return x[1] < y[1] end)
      assert.same(sorted, got)
      assert.same({ "timeout" }, { select(2, ws:receive(0.3)) })
    end
    -- counted once Redis answered, which may come after its subscribers got it
    wait_until("the publications counted", 5, function()
      return brokers.a.stats.published == 2 and brokers.b.stats.published == 1
    end)
    assert.equal(1, brokers.a.stats.received) -- its own two came back and were skipped
    assert.equal(2, brokers.b.stats.received)

    -- The last local subscriber leaves: the node unsubscribes in Redis.
    b1:close()
    wait_until("b to unsubscribe", 5, function() return numsub(r.port, "test:room") == 1 end)
    for _, ws in ipairs { a1, a2 } do ws:close() end
    brokers.a:close()
    brokers.b:close()
  end)

  it("keeps local delivery while Redis is down, and resumes across nodes when it returns", function()
    local r = services.redis()
    server_ref = r
    local hubs, brokers, status, up = two_nodes(r)
    local srv = topic_server(hubs)
    local a1, b1 = connect(srv, "/room?a"), connect(srv, "/room?b")
    wait_until("both nodes subscribed in Redis", 5, function() return numsub(r.port, "test:room") == 2 end)
    assert.equal(1, hubs.a:publish("room", "before"))
    assert.same({ "before", "text" }, { a1:receive(5) })
    assert.same({ "before", "text" }, { b1:receive(5) })

    r:stop("KILL")
    wait_until("both brokers to report the outage", 5, function() return up("a", "down") and up("b", "down") end)
    assert.matches("down subscriber: ", table.concat(status.a, "\n"))
    -- Each node still serves its own subscribers; the other node misses it.
    assert.equal(1, hubs.a:publish("room", "during"))
    assert.same({ "during", "text" }, { a1:receive(5) })
    assert.same({ "timeout" }, { select(2, b1:receive(0.5)) })
    wait_until("a's publisher to report the outage", 5, function()
      return table.concat(status.a, "\n"):find("down publisher: ") ~= nil
    end)
    assert.equal(1, hubs.a:publish("room", "during, known down")) -- still delivered here
    assert.same({ "during, known down", "text" }, { a1:receive(5) })
    assert.is_true(brokers.a.stats.dropped >= 2)

    r:start() -- same port, empty: the brokers must reconnect and resubscribe
    wait_until("both brokers back", 10, function() return up("a") and up("b") end)
    wait_until("both nodes subscribed again", 5, function() return numsub(r.port, "test:room") == 2 end)
    assert.equal(1, hubs.b:publish("room", "after"))
    assert.same({ "after", "text" }, { a1:receive(5) })
    assert.same({ "after", "text" }, { b1:receive(5) })
    assert.is_true(brokers.a.stats.reconnects >= 1)
    a1:close()
    b1:close()
    brokers.a:close()
    brokers.b:close()
  end)

  it("notices a Redis that stops answering (no FIN, no RST) and recovers when it wakes", function()
    local r = services.redis()
    server_ref = r
    local hubs, brokers, status, up = two_nodes(r, { ping_interval = 0.3, connect_timeout = 1 })
    local srv = topic_server(hubs)
    local a1, b1 = connect(srv, "/room?a"), connect(srv, "/room?b")
    wait_until("both nodes subscribed in Redis", 5, function() return numsub(r.port, "test:room") == 2 end)

    r.h:kill("STOP") -- a hung server, or a network that silently drops
    local ok, err = pcall(wait_until, "both brokers to report the outage", 5, function()
      return up("a", "down") and up("b", "down")
    end)
    if not ok then r.h:kill("CONT") end
    assert(ok, err)
    assert.matches("down subscriber: no answer", table.concat(status.a, "\n"))
    assert.equal(1, hubs.a:publish("room", "during"))
    assert.same({ "during", "text" }, { a1:receive(5) })

    r.h:kill("CONT")
    wait_until("both brokers back", 10, function() return up("a") and up("b") end)
    wait_until("both nodes subscribed again", 5, function() return numsub(r.port, "test:room") == 2 end)
    assert.equal(1, hubs.a:publish("room", "after"))
    assert.same({ "after", "text" }, { a1:receive(5) })
    local m
    repeat m = b1:receive(5) until m ~= "during" -- it may come late, from the old connection
    assert.equal("after", m)
    a1:close()
    b1:close()
    brokers.a:close()
    brokers.b:close()
  end)

  it("speaks TLS to Redis for rediss:// URLs, and refuses a certificate it cannot verify", function()
    local c = certs.generate()
    local ok, err = pcall(function()
      local r = services.redis(nil, { tls = c })
      server_ref = r
      local hubs, brokers = two_nodes(r, { tls = { ca = c.ca } })
      local srv = topic_server(hubs)
      local a1, b1 = connect(srv, "/room?a"), connect(srv, "/room?b")
      wait_until("both nodes subscribed in Redis", 5, function() return numsub(r.port, "test:room") == 2 end)
      assert.equal(1, hubs.a:publish("room", "over tls"))
      assert.same({ "over tls", "text" }, { b1:receive(5) })
      assert.same({ "over tls", "text" }, { a1:receive(5) })

      local reports = {}
      local distrustful = assert(redis.broker { url = r.url, tls = { ca = c.other_ca },
        backoff_min = 3, backoff_max = 3,
        on_status = function(s, detail) reports[#reports + 1] = s .. " " .. detail end })
      opened[#opened + 1] = distrustful
      wait_until("both connections refused", 5, function() return #reports >= 2 end)
      assert.matches("^down %a+: TLS handshake failed", reports[1])
      assert.matches("^down %a+: TLS handshake failed", reports[2])
      -- Closing it ends its wait to retry at once, not 3 s later.
      distrustful:close()
      wait_until("the broker to stop", 1, function()
        return coroutine.status(distrustful.worker) == "dead"
      end)
      a1:close()
      b1:close()
      brokers.a:close()
      brokers.b:close()
    end)
    c.cleanup()
    assert(ok, err)
  end)

  it("names a bad Redis URL", function()
    local broker, err = redis.broker { url = "redis://[bad" }
    assert.is_nil(broker)
    assert.matches("invalid Redis URL", err)
  end)
end)
