-- Rooms of duplex.pubsub on a real Redis Cluster (3 masters, 3 replicas)
-- through redis.broker{ nodes = ... }: three duplex nodes, rooms whose slots
-- live on different masters, sharded pub/sub with history; a master
-- SIGKILLed mid-chat, its replica promoted, and no message lost for the
-- clients; a client that comes back on another node recovers; presence
-- across the nodes.
local duplex = require "duplex"
local core = require "duplex.core"
local runtime = require "duplex.runtime"
local pubsub = require "duplex.pubsub"
local redis = require "duplex.redis"
local services = require "support.services"

local run = runtime.blocking

local wait_until = require("support.loop").wait_until

local function format(_, message, pos) return pos.epoch .. ":" .. pos.offset .. " " .. message end

describe("rooms on a Redis Cluster", function()
  local c, nodes, srv
  local reports = {}

  setup(function()
    c = services.redis_cluster { masters = 3, replicas = 1 }
    nodes = {}
    for k = 1, 3 do
      local name = "n" .. k
      reports[name] = {}
      local b = assert(redis.broker { nodes = c.urls, node_id = name, prefix = "cr:", presence_ttl = 1,
        history = { match = "^room", size = 10000, ttl = 600 }, backoff_max = 0.5,
        on_status = function(s, d) table.insert(reports[name], s .. " " .. d) end })
      nodes[name] = { broker = b, hub = pubsub.new { broker = b, format = format } }
    end
    -- /ROOM?node=nK[&since=E:O]: recover ROOM on node K, then the outcome line
    srv = assert(duplex.listen { host = "127.0.0.1", port = 0, ping_interval = 0,
      handler = function(ws, req)
        local hub = nodes[req.query.node].hub
        local r, err = hub:recover(ws, req.path:sub(2), pubsub.parse_position(req.query.since))
        ws:send(r and ("recovered " .. tostring(r.recovered) .. " " .. r.epoch .. ":" .. r.offset) or ("error " .. err))
        for _ in ws:messages() do end
        hub:unsubscribe_all(ws)
      end })
  end)
  teardown(function()
    if srv then srv:shutdown(1) end
    for _, n in pairs(nodes or {}) do n.broker:close() end
    run(function() core.sleep(0.1) end)
    if c then c:stop() end
  end)

  local opened = {}
  after_each(function()
    for _, ws in ipairs(opened) do ws:abort("test over") end
    opened = {}
  end)

  local function client(room, node, since)
    local ws = assert(duplex.connect(srv:url("/" .. room .. "?node=" .. node .. (since and "&since=" .. since or "")),
      { ping_interval = 0 }))
    opened[#opened + 1] = ws
    if since then return ws end -- what it missed comes first, then the outcome
    assert.matches("^recovered ", assert(ws:receive(10)))
    return ws
  end

  -- Three rooms whose hash tags live on three different masters.
  local function rooms_on_three_masters()
    local by_owner, rooms = {}, {}
    for k = 1, 200 do
      local room = "room" .. k
      local owner = c:owner(redis.slot(room))
      if not by_owner[owner] then
        by_owner[owner] = room
        rooms[#rooms + 1] = room
        if #rooms == 3 then break end
      end
    end
    assert.equal(3, #rooms)
    return rooms, by_owner
  end

  -- A room whose master still has a replica (the failover cases each kill
  -- one): the room, its master's port and the replica's.
  local function room_with_replica(prefix)
    for k = 1, 200 do
      local room = prefix .. k
      local master = c:owner(redis.slot(room))
      local replica = c:replica_of(master)
      if replica then return room, master, replica end
    end
    error("no master with a replica left")
  end

  it("starts a new epoch when the promoted replica lacks the master's last writes, and skips nothing after", function()
    local room, master, replica = room_with_replica("roomlost")
    local watcher = client(room, "n2")
    wait_until("n2 subscribed at the master", 10, function()
      return services.shardnumsub(master, "cr:{" .. room .. "}" .. room) == 1
    end)
    for i = 1, 3 do nodes.n1.hub:publish(room, "m" .. i) end
    local epoch
    for i = 1, 3 do
      local m = assert(watcher:receive(10))
      epoch = m:match("^(%w+):" .. i .. " m" .. i .. "$")
      assert(epoch, m)
    end
    services.wait_replicated(master, replica)
    -- the replica falls behind: stopped, its link cut (else the bytes
    -- would wait in its socket), m4 and m5 reach the watcher, not it
    local pid = assert(services.redis_call(replica, "INFO", "server")):match("process_id:(%d+)")
    assert(os.execute("kill -STOP " .. pid))
    assert.equal(1, services.redis_call(master, "CLIENT", "KILL", "TYPE", "replica"))
    nodes.n1.hub:publish(room, "m4")
    nodes.n1.hub:publish(room, "m5")
    assert.equal(epoch .. ":4 m4", assert(watcher:receive(10)))
    assert.equal(epoch .. ":5 m5", assert(watcher:receive(10)))
    c:kill(master)
    assert(os.execute("kill -CONT " .. pid))
    wait_until("the replica promoted", 20, function()
      local role = services.redis_call(replica, "ROLE")
      return type(role) == "table" and role[1] == "master"
    end)
    -- m6 gets offset 4 again, in a new epoch: delivered, not skipped
    local got
    run(function()
      local deadline = core.now() + 20
      while not got and core.now() < deadline do
        nodes.n1.hub:publish(room, "m6")
        got = watcher:receive(1)
      end
    end)
    assert(got, "m6 never came")
    local epoch2 = got:match("^(%w+):4 m6$")
    assert(epoch2, got)
    assert.not_equal(epoch, epoch2)
    -- a client that saw m5 cannot recover; one at m2 can, on another node
    local lost = client(room, "n3", epoch .. ":5")
    assert.matches("^recovered false " .. epoch2 .. ":", assert(lost:receive(10)))
    local back = client(room, "n3", epoch .. ":2")
    assert.equal(epoch2 .. ":3 m3", assert(back:receive(10)))
    assert.matches("^" .. epoch2 .. ":4 m6$", assert(back:receive(10)))
    assert.matches("^recovered true ", assert(back:receive(10)))
  end)

  it("carries rooms on different masters across three nodes, in one order, once", function()
    local rooms, by_owner = rooms_on_three_masters()
    local subs = {}
    for _, room in ipairs(rooms) do
      for _, node in ipairs { "n1", "n2", "n3" } do subs[#subs + 1] = { room = room, ws = client(room, node) } end
    end
    -- each room's shard channel subscribed by the three nodes, at its owner
    for owner, room in pairs(by_owner) do
      wait_until("3 subscribers of " .. room .. " at its master", 10, function()
        return services.shardnumsub(owner, "cr:{" .. room .. "}" .. room) == 3
      end)
    end
    for i = 1, 10 do
      for k, room in ipairs(rooms) do nodes["n" .. ((i + k) % 3 + 1)].hub:publish(room, room .. "-" .. i) end
    end
    -- Published from three nodes at once: no order between them, but one
    -- order that every subscriber of the room sees, offsets 1 to 10.
    local seen = {}
    for _, s in ipairs(subs) do
      local got = {}
      for i = 1, 10 do
        local m = assert(s.ws:receive(10))
        local e, offset, text = m:match("^(%w+):(%d+) (.*)$")
        assert.equal(tostring(i), offset)
        got[i] = e .. " " .. text
      end
      assert.same({ "timeout" }, { select(2, s.ws:receive(0.2)) })
      if seen[s.room] then assert.same(seen[s.room], got) else seen[s.room] = got end
      local texts = {}
      for i, g in ipairs(got) do texts[i] = g:match(" (.*)$") end
      table.sort(texts)
      local want = {}
      for i = 1, 10 do want[i] = s.room .. "-" .. i end
      table.sort(want)
      assert.same(want, texts)
    end
    -- each room's history is kept by the master that owns its slot
    for owner, room in pairs(by_owner) do
      assert.equal(10, services.redis_call(owner, "XLEN", "cr:{" .. room .. "}" .. room .. ":h"))
    end
  end)

  it("loses no message when a room's master is SIGKILLed mid-chat, and recovers a client on another node", function()
    local room, master, replica = room_with_replica("roomfail")
    local watchers = { client(room, "n2"), client(room, "n3") }
    wait_until("both nodes subscribed at the master", 10, function()
      return services.shardnumsub(master, "cr:{" .. room .. "}" .. room) == 2
    end)
    local leaver = client(room, "n3")
    local sent, stop = 0, false
    core.spawn(function()
      while not stop do
        sent = sent + 1
        nodes.n1.hub:publish(room, "m" .. sent)
        core.sleep(0.01)
      end
    end)
    local leaver_last
    run(function()
      core.sleep(0.3)
      leaver_last = assert(leaver:receive(5))
      leaver:abort("going away")
      c:kill(master)
      core.sleep(4) -- the replica is promoted after the node timeout (1 s)
      stop = true
      core.sleep(0.5)
    end)
    assert.equal("master", services.redis_call(replica, "ROLE")[1])
    -- every watcher has every message, in order, once (each publication
    -- whose first try's reply was lost may have been stored twice); the
    -- promoted replica starts a new epoch whose offsets go on
    local function check(ws, from)
      local want, last = from, nil
      while want <= sent do
        local m = assert(ws:receive(15), "message m" .. want .. " never came")
        local offset, text = m:match("^%w+:(%d+) m(%d+)$")
        offset = tonumber(offset)
        if last then assert.equal(last + 1, offset) end
        last = offset
        local n = tonumber(text)
        if n ~= want - 1 then -- a repeat of the last one is tolerated
          assert.equal(want, n)
          want = want + 1
        end
      end
    end
    for _, ws in ipairs(watchers) do check(ws, 1) end
    -- the client that left before the failover comes back on n1 with its
    -- last position and gets what it missed
    local pos, text = leaver_last:match("^(%w+:%d+) m(%d+)$")
    local back = client(room, "n1", pos)
    check(back, tonumber(text) + 1)
    assert.matches("^recovered true ", assert(back:receive(5)))
    assert.matches("up subscriber: shard channels at 127%.0%.0%.1:" .. replica, table.concat(reports.n2, "\n"))
  end)

  it("lists the members of every node, and forgets a closed node's within the TTL", function()
    nodes.n1.broker:join("roomp", "ann", "A")
    nodes.n2.broker:join("roomp", "bob")
    nodes.n3.broker:join("roomp", "cy")
    wait_until("three members", 10, function() return nodes.n1.broker:count("roomp") == 3 end)
    local names = {}
    for _, m in ipairs(assert(nodes.n2.broker:members("roomp"))) do names[#names + 1] = m.id .. "@" .. m.node end
    table.sort(names)
    assert.same({ "ann@n1", "bob@n2", "cy@n3" }, names)
    nodes.n3.broker:close() -- no leave: its entries expire
    wait_until("cy to expire", 5, function() return nodes.n1.broker:count("roomp") == 2 end)
  end)
end)
