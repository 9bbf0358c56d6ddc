-- Rooms across nodes (issue 14's bench): three duplex nodes
-- (bench/room_node.lua) share one room through Redis, with --subs
-- subscribers on each (3 x 3,000 by default), all in this process; one
-- publisher sends through node 1. Side by side, in one sitting, rounds
-- interleaved:
--   single   one redis-server, classic pub/sub (PUBLISH/SUBSCRIBE)
--   single+h the same, with history (each publication stored in a Stream)
--   cluster  a 3-master/3-replica Redis Cluster, sharded pub/sub (SPUBLISH)
--   cluster+h the same, with history
-- Figures per setup (medians over the rounds):
--   fan-out  deliveries per second of a burst (--burst messages to every
--            subscriber), from the first publication to the last delivery
--   latency  publish-to-delivery p50/p99 over every delivery of a paced run
--            (--rate messages per second for --paced messages); this
--            process and the nodes read the same monotonic clock
--   recovery (history setups) node 3's broker connections are cut for 2 s
--            (killed at Redis as often as they come back) while the
--            publisher goes on at --rate: publications node 3 caught up from
--            the stream, and the time from the end of the cut until all its
--            subscribers had everything
--
--   lua5.4 bench/rooms.lua [--subs 3000] [--rounds 2] [--burst 20] [--rate 20] [--paced 200]
--                          [--only single,cluster+h]
local root = arg[0]:match("^(.*)/bench/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. root .. "/spec/?.lua;" .. package.path
package.cpath = root .. "/build/?.so;" .. package.cpath

local duplex = require "duplex"
local core = require "duplex.core"
local redis = require "duplex.redis"
local runtime = require "duplex.runtime"
local proc = require "support.proc"
local services = require "support.services"

local opts = { subs = 3000, rounds = 2, burst = 20, rate = 20, paced = 200 }
local i = 1
while i <= #arg do
  local a, v = arg[i], arg[i + 1]
  local n = math.tointeger(tonumber(v))
  if a == "--subs" and n then opts.subs = n
  elseif a == "--rounds" and n then opts.rounds = n
  elseif a == "--burst" and n then opts.burst = n
  elseif a == "--rate" and n then opts.rate = n
  elseif a == "--paced" and n then opts.paced = n
  elseif a == "--only" and v then
    opts.only = {}
    for id in v:gmatch("[^,]+") do opts.only[id] = true end
  else
    io.stderr:write("usage: lua5.4 bench/rooms.lua [--subs N] [--rounds N] [--burst N] [--rate R] [--paced N]",
      " [--only ID,ID]\n")
    os.exit(2)
  end
  i = i + 2
end

local SETUPS = {
  { id = "single", title = "one Redis, classic pub/sub" },
  { id = "single+h", title = "one Redis, with history", history = true },
  { id = "cluster", title = "Redis Cluster 3+3, sharded pub/sub", cluster = true },
  { id = "cluster+h", title = "Redis Cluster 3+3, sharded, with history", cluster = true, history = true },
}

local function percentile(sorted, p) return sorted[math.max(1, math.ceil(#sorted * p))] end
local function median(list)
  local s = { table.unpack(list) }
  table.sort(s)
  return s[(#s + 1) // 2]
end

-- The nodes -----------------------------------------------------------------

local function start_node(setup, url, id)
  local argv = { "lua5.4", root .. "/bench/room_node.lua", "--redis", url, "--node-id", id }
  if setup.cluster then argv[#argv + 1] = "--cluster" end
  if setup.history then argv[#argv + 1] = "--history" end
  local h = proc.spawn(argv, { env = services.env, limit = 3600 })
  local line = h:read_line(20)
  local port = line and tonumber(line:match("^LISTENING (%d+)$"))
  if not port then error("room node did not start: " .. tostring(line) .. "\n" .. h:stderr()) end
  return { h = h, port = port, id = id }
end

local function stats(node)
  return runtime.blocking(function()
    local sock = assert(core.connect { host = "127.0.0.1", port = node.port, timeout = 5 })
    sock:write("GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    local out = {}
    while true do
      local d = sock:read(nil, 5)
      if not d then break end
      out[#out + 1] = d
    end
    sock:close()
    local t = {}
    for k, v in table.concat(out):match("\r\n\r\n(.*)$"):gmatch("(%a+) (%d+)") do t[k] = tonumber(v) end
    return t
  end)
end

-- The subscribers: each counts what it got, by sequence number. ----------

local Subs = {}
Subs.__index = Subs

local function subscribe_all(nodes, n)
  local self = setmetatable({ list = {}, lat = nil, got = 0, by_node = {} }, Subs)
  for _, node in ipairs(nodes) do
    self.by_node[node.id] = {}
    for _ = 1, n do
      local ws = assert(duplex.connect(("ws://127.0.0.1:%d/sub"):format(node.port), { ping_interval = 0,
        max_buffered = 64 << 20 }))
      assert(ws:receive(30) == "subscribed")
      local s = { ws = ws, last = 0, node = node.id }
      self.list[#self.list + 1] = s
      table.insert(self.by_node[node.id], s)
      duplex.spawn(function()
        for m in ws:messages() do
          -- "[offset ]seq sent_at": the offset is history's, not ours
          local seq, sent = m:match("(%d+) (%S+)$")
          seq = tonumber(seq)
          if seq and seq > s.last then
            s.last = seq
            self.got = self.got + 1
            if self.lat then self.lat[#self.lat + 1] = core.now() - tonumber(sent) end
          end
        end
      end)
    end
  end
  return self
end

function Subs:close()
  for _, s in ipairs(self.list) do s.ws:abort("bench over") end
end

-- Whether every subscriber (of node id, or all) has seq.
function Subs:have(seq, id)
  for _, s in ipairs(id and self.by_node[id] or self.list) do
    if s.last < seq then return false end
  end
  return true
end

-- Whether some subscriber of every node has had a message.
function Subs:heard()
  for _, list in pairs(self.by_node) do
    local any = false
    for _, s in ipairs(list) do
      if s.last > 0 then any = true break end
    end
    if not any then return false end
  end
  return true
end

-- "n1 2999/3000, ...": who has seq, per node, for a timeout's message.
function Subs:tally(seq)
  local parts = {}
  for id, list in pairs(self.by_node) do
    local have = 0
    for _, s in ipairs(list) do
      if s.last >= seq then have = have + 1 end
    end
    parts[#parts + 1] = ("%s %d/%d"):format(id, have, #list)
  end
  table.sort(parts)
  return table.concat(parts, ", ")
end

local function wait(what, seconds, pred, detail)
  local deadline = core.now() + seconds
  while not pred() do
    if core.now() > deadline then error("timed out: " .. what .. (detail and " (" .. detail() .. ")" or "")) end
    core.sleep(0.005)
  end
end

-- One round of one setup -----------------------------------------------------

local function cut_node(url, cluster_nodes, name, seconds)
  -- Every Redis the node may be connected to, asked to kill its
  -- connections again and again for `seconds`.
  local urls = cluster_nodes or { url }
  local dbs = {}
  for k, u in ipairs(urls) do dbs[k] = assert(redis.connect(u)) end
  local deadline = core.now() + seconds
  local kills = 0
  while core.now() < deadline do
    for _, db in ipairs(dbs) do
      local list = db:call("CLIENT", "LIST") or ""
      for line in list:gmatch("[^\n]+") do
        local id = line:match("^id=(%d+) ")
        if id and line:find(" name=" .. name:gsub("%p", "%%%0") .. " ", 1) then
          if db:call("CLIENT", "KILL", "ID", id) == 1 then kills = kills + 1 end
        end
      end
    end
    core.sleep(0.02)
  end
  for _, db in ipairs(dbs) do db:close() end
  return kills
end

local function round(setup, env)
  local url = setup.cluster and env.cluster.urls[1] or env.single.url
  if setup.history then -- every setup starts from an empty room
    for _, u in ipairs(setup.cluster and env.cluster.urls or { url }) do
      local db = assert(redis.connect(u))
      db:call("FLUSHALL")
      db:close()
    end
  end
  local nodes = {}
  for k = 1, 3 do nodes[k] = start_node(setup, url, "n" .. k) end
  local result = {}
  local ok, err = pcall(function()
    local subs = subscribe_all(nodes, opts.subs)
    local pub = assert(duplex.connect(("ws://127.0.0.1:%d/pub"):format(nodes[1].port), { ping_interval = 0 }))
    local seq = 0
    local function publish()
      seq = seq + 1
      assert(pub:send(("%d %.9f"):format(seq, core.now())))
    end
    -- Until every node has subscribed in Redis, messages pass some by.
    -- Probe slowly: 9,000 subscribers in this one process take a while
    -- to read each probe, and probes sent faster than that never all land.
    wait("every node to hear the room", 30, function()
      publish()
      core.sleep(0.25)
      return subs:heard()
    end, function() return subs:tally(seq) end)
    local probe = seq + 1
    publish()
    wait("every subscriber to hear the room", 60, function() return subs:have(probe) end,
      function() return subs:tally(probe) end)
    -- fan-out: a burst
    local t0, from = core.now(), subs.got
    local last = seq + opts.burst
    for _ = 1, opts.burst do publish() end
    wait("the burst to reach everyone", 120, function() return subs:have(last) end)
    result.fanout = (subs.got - from) / (core.now() - t0)
    -- latency: paced
    subs.lat = {}
    local gap = 1 / opts.rate
    local next_at = core.now()
    for _ = 1, opts.paced do
      publish()
      next_at = next_at + gap
      core.sleep(math.max(0, next_at - core.now()))
    end
    last = seq
    wait("the paced run to reach everyone", 60, function() return subs:have(last) end)
    local lat = subs.lat
    subs.lat = nil
    table.sort(lat)
    result.p50, result.p99 = percentile(lat, 0.5) * 1e3, percentile(lat, 0.99) * 1e3
    -- recovery: node 3 cut off for 2 s while publishing goes on
    if setup.history then
      local before = stats(nodes[3]).recovered
      local cutting = true
      duplex.spawn(function()
        result.kills = cut_node(url, setup.cluster and env.cluster.urls, "duplex:n3", 2)
        cutting = false
      end)
      while cutting do
        publish()
        core.sleep(gap)
      end
      local cut_end, target = core.now(), seq
      wait("node 3 to catch up", 60, function() return subs:have(target, "n3") end)
      result.recovery_ms = (core.now() - cut_end) * 1e3
      result.recovered = stats(nodes[3]).recovered - before
      wait("everyone to have everything", 60, function() return subs:have(target) end)
    end
    pub:close()
    subs:close()
  end)
  for _, node in ipairs(nodes) do
    node.h:kill("TERM")
    if not node.h:wait(5) then node.h:kill("KILL") end
    node.h:cleanup()
  end
  if not ok then error(err, 0) end
  return result
end

-- Main -------------------------------------------------------------------------

local function main()
  local env = {}
  env.single = services.redis()
  local want_cluster = not opts.only or opts.only.cluster or opts.only["cluster+h"]
  env.cluster = want_cluster and services.redis_cluster { masters = 3, replicas = 1 }
  local ok, err = pcall(function()
    local results = {}
    for r = 1, opts.rounds do
      for _, setup in ipairs(SETUPS) do
        if not opts.only or opts.only[setup.id] then
          io.stderr:write(("rooms: round %d, %s\n"):format(r, setup.id))
          local res = runtime.blocking(round, setup, env)
          results[setup.id] = results[setup.id] or {}
          table.insert(results[setup.id], res)
        end
      end
    end
    print(("Rooms across 3 duplex nodes, %d subscribers each (%d in all), one publisher on node 1;"):format(
      opts.subs, 3 * opts.subs))
    print(("medians of %d rounds; burst of %d, paced %d at %d/s; recovery after a 2 s cut of node 3."):format(
      opts.rounds, opts.burst, opts.paced, opts.rate))
    print()
    print("| setup | fan-out deliveries/s | vs single | latency p50 ms | p99 ms | recovered | recovery ms |")
    print("|---|---|---|---|---|---|---|")
    local base
    for _, setup in ipairs(SETUPS) do
      local rs = results[setup.id]
      if rs then
        local function m(key)
          local list = {}
          for _, x in ipairs(rs) do if x[key] then list[#list + 1] = x[key] end end
          return #list > 0 and median(list) or nil
        end
        local fan = m("fanout")
        base = base or (setup.id == "single" and fan) or nil
        print(("| %s | %.0f | %s | %.2f | %.2f | %s | %s |"):format(setup.title, fan,
          base and ("%.2f×"):format(fan / base) or "—", m("p50"), m("p99"),
          m("recovered") and ("%d"):format(m("recovered")) or "—",
          m("recovery_ms") and ("%.0f"):format(m("recovery_ms")) or "—"))
      end
    end
  end)
  env.single:cleanup()
  if env.cluster then env.cluster:stop() end
  proc.killall()
  if not ok then
    io.stderr:write("rooms: ", tostring(err), "\n")
    os.exit(1)
  end
end

main()
