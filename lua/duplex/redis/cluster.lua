--- A Redis Cluster client over duplex.redis.client: one client per node,
--- made when first needed, so that TLS, AUTH, timeouts, FIFO pipelining
--- and reconnecting are the client's. What is added here is where a command
--- goes (the slot map, CLUSTER SHARDS or CLUSTER SLOTS), what to do when
--- the cluster says it went to the wrong place (MOVED, ASK) or cannot serve
--- it now (TRYAGAIN, CLUSTERDOWN, a node lost), and keeping subscriptions
--- at the node that owns their channel's slot.
local core = require "duplex.core"
local resp = require "duplex.resp"
local options = require "duplex.options"
local runtime = require "duplex.runtime"
local client = require "duplex.redis.client"
local compat = require "duplex.compat"

local now, command, blocking, running = core.now, resp.command, runtime.blocking, coroutine.running
local encode = client._encode

local cluster = {}

cluster.defaults = {
  retry_timeout = 10, -- seconds a call goes on trying while the cluster fails over
  max_redirects = 16,
}

local SLOTS = 16384
local ASKING = command("ASKING")

local function left(deadline) return math.max(0, deadline - now()) end

local function wake(co)
  if co and co ~= running() then core.wake(co) end
end

local function is_error(v) return type(v) == "table" and v.err ~= nil end

-- Slots -------------------------------------------------------------------

--- The slot of a key: only what is between the first "{" and the first "}"
--- after it counts, when that is not empty ({user1000}.following).
function cluster.slot(key)
  if type(key) == "number" then key = tostring(key) end
  if type(key) ~= "string" then error("redis.slot: a key (string) expected", 2) end
  local open = key:find("{", 1, true)
  if open then
    local close = key:find("}", open + 1, true)
    if close and close > open + 1 then key = key:sub(open + 1, close - 1) end
  end
  return core.crc16(key) % SLOTS
end

-- Where a command's first key is. Most have it right after the name; these
-- have none (they go to any master), or say how many keys follow.
local KEYLESS = {}
for w in ([[PING ECHO TIME INFO DBSIZE FLUSHALL FLUSHDB CLUSTER CONFIG CLIENT COMMAND SCRIPT FUNCTION
  ACL PUBLISH PUBSUB RANDOMKEY SCAN KEYS WAIT LASTSAVE SAVE BGSAVE BGREWRITEAOF DEBUG LATENCY SLOWLOG
  MULTI EXEC DISCARD UNWATCH ROLE LOLWUT MODULE READONLY READWRITE ASKING SWAPDB]]):gmatch("%S+") do
  KEYLESS[w] = true
end
local NUMKEYS = { EVAL = 3, EVALSHA = 3, EVAL_RO = 3, EVALSHA_RO = 3, FCALL = 3, FCALL_RO = 3,
  ZUNION = 2, ZINTER = 2, ZDIFF = 2, ZINTERCARD = 2, SINTERCARD = 2, LMPOP = 2, ZMPOP = 2,
  BLMPOP = 3, BZMPOP = 3 }
local AT = { BITOP = 3, OBJECT = 3, MEMORY = 3, XINFO = 3, XGROUP = 3 }

local function first_key(args)
  local name = tostring(args[1]):upper()
  if KEYLESS[name] then return nil end
  local at = NUMKEYS[name]
  if at then
    local n = tonumber(args[at])
    return n and n > 0 and args[at + 1] or nil
  end
  if name == "XREAD" or name == "XREADGROUP" then
    for i = 2, args.n do
      if tostring(args[i]):upper() == "STREAMS" then return args[i + 1] end
    end
    return nil
  end
  return args[AT[name] or 2]
end

local function slot_of(args)
  local key = first_key(args)
  if key ~= nil then return cluster.slot(tostring(key)) end
end

-- Addresses are "host:port" ("[::1]:7000"), as the map and the redirects say.
local function addr_of(host, port)
  if host:find(":", 1, true) then return "[" .. host .. "]:" .. port end
  return host .. ":" .. port
end

local function split(addr)
  local host, port = addr:match("^%[?(.-)%]?:(%d+)$")
  return host, tonumber(port)
end

-- The slot map ----------------------------------------------------------------

-- map.slots[s] = the address of the master serving s; map.masters[addr] =
-- { addr, id, slots = { {first, last}... }, replicas = { addr... } }.
local function new_map() return { slots = {}, masters = {}, list = {}, count = 0 } end

local function port_ok(p) return compat.is_integer(p) and p > 0 and p < 65536 end

local function add_master(map, addr, id)
  local m = map.masters[addr]
  if not m then
    local host, port = split(addr)
    m = { addr = addr, host = host, port = port, id = id, slots = {}, replicas = {} }
    map.masters[addr] = m
    map.list[#map.list + 1] = m
  end
  return m
end

local function add_range(map, m, first, last)
  if not compat.is_integer(first) or not compat.is_integer(last) or first < 0 or last >= SLOTS
    or first > last then
    return nil, "a bad slot range " .. tostring(first) .. "-" .. tostring(last)
  end
  m.slots[#m.slots + 1] = { first, last }
  for s = first, last do
    if not map.slots[s] then map.count = map.count + 1 end
    map.slots[s] = m.addr
  end
  return true
end

-- A flat list of names and values ({ "port", 7000, "ip", ... }) as a table.
local function fields(list)
  if type(list) ~= "table" then return nil end
  local t = {}
  for i = 1, #list - 1, 2 do
    if type(list[i]) == "string" then t[list[i]] = list[i + 1] end
  end
  return t
end

-- A node's host: its endpoint, unless unknown ("?") or empty (the node we
-- asked, which Redis means by an empty one).
local function host_of(endpoint, ip, asked)
  if type(endpoint) == "string" and endpoint ~= "" and endpoint ~= "?" then return endpoint end
  if type(ip) == "string" and ip ~= "" then return ip end
  return asked
end

-- CLUSTER SHARDS (Redis 7): per shard its slot ranges and nodes. A shard's
-- master that is online is preferred over one that failed (listed until
-- forgotten), and without any the shard's slots are not served.
local function from_shards(reply, asked, tls)
  if type(reply) ~= "table" then return nil, "CLUSTER SHARDS answered no list" end
  local map = new_map()
  for _, shard in ipairs(reply) do
    local f = fields(shard)
    if not f or type(f.slots) ~= "table" or type(f.nodes) ~= "table" then
      return nil, "a shard without slots and nodes"
    end
    local master, replicas = nil, {}
    for _, n in ipairs(f.nodes) do
      local nf = fields(n)
      if not nf then return nil, "a node that is not a list of fields" end
      local port = tls and nf["tls-port"] or nf.port
      if not port_ok(port) then return nil, "a node without a port" end
      nf.addr = addr_of(host_of(nf.endpoint, nf.ip, asked), port)
      if nf.role == "master" and (not master or master.health ~= "online") then master = nf
      elseif nf.role ~= "master" and nf.health == "online" then replicas[#replicas + 1] = nf.addr end
    end
    if #f.slots > 0 then
      if not master then return nil, "a shard with slots and no master" end
      local m = add_master(map, master.addr, master.id)
      for i = 1, #f.slots, 2 do
        local ok, err = add_range(map, m, f.slots[i], f.slots[i + 1])
        if not ok then return nil, err end
      end
      for _, r in ipairs(replicas) do m.replicas[#m.replicas + 1] = r end
    end
  end
  return map
end

-- CLUSTER SLOTS (before Redis 7): { first, last, master, replica... }, each
-- node { ip, port, id, ... }.
local function from_slots(reply, asked)
  if type(reply) ~= "table" then return nil, "CLUSTER SLOTS answered no list" end
  local map = new_map()
  for _, r in ipairs(reply) do
    if type(r) ~= "table" or type(r[3]) ~= "table" or not port_ok(r[3][2]) then
      return nil, "a slot range without a master"
    end
    local m = add_master(map, addr_of(host_of(nil, r[3][1], asked), r[3][2]), r[3][3])
    local ok, err = add_range(map, m, r[1], r[2])
    if not ok then return nil, err end
    for i = 4, #r do
      if type(r[i]) == "table" and port_ok(r[i][2]) then
        m.replicas[#m.replicas + 1] = addr_of(host_of(nil, r[i][1], asked), r[i][2])
      end
    end
  end
  return map
end

-- Redirects and the replies worth waiting out ----------------------------------

local RETRY = { TRYAGAIN = true, CLUSTERDOWN = true, LOADING = true, MASTERDOWN = true }

-- "moved" or "ask" with the slot and the target (an empty host: the node
-- that answered), "retry", "bad" for a redirect that cannot be read, or nil.
local function redirect(v, from)
  if not is_error(v) or type(v.err) ~= "string" then return nil end
  local word = v.err:match("^(%u+)")
  if word == "MOVED" or word == "ASK" then
    local slot, host, port = v.err:match("^%u+ (%d+) (%S*):(%d+)$")
    slot, port = tonumber(slot), compat.tointeger(tonumber(port))
    if not slot or slot >= SLOTS or not port_ok(port) then return "bad" end
    return word:lower(), slot, addr_of(host ~= "" and host or (split(from)), port)
  end
  if RETRY[word] then return "retry" end
end

-- Configuration ----------------------------------------------------------------

-- Passed on to every node's client as they are.
local NODE_OPTIONS = { "user", "password", "tls", "timeout", "connect_timeout", "max_reply", "backoff_min",
  "backoff_max", "ping_interval", "name" }

local function configure(opts)
  local urls = {}
  for _, u in ipairs(opts.nodes or {}) do urls[#urls + 1] = u end
  if opts.url then urls[#urls + 1] = opts.url end
  if #urls == 0 then urls[1] = client.defaults.url end
  local cfg = { seeds = {}, node = {}, on_status = opts.on_status }
  for k, v in pairs(cluster.defaults) do cfg[k] = v end
  for _, k in ipairs { "retry_timeout", "max_redirects" } do
    if opts[k] ~= nil then cfg[k] = opts[k] end
  end
  for _, k in ipairs(NODE_OPTIONS) do cfg.node[k] = opts[k] end
  cfg.backoff_min = opts.backoff_min or client.defaults.backoff_min
  cfg.backoff_max = math.max(opts.backoff_max or client.defaults.backoff_max, cfg.backoff_min)
  for i, s in ipairs(urls) do
    local u, err = client._parse_url(s)
    if not u then return nil, err end
    if u.db ~= 0 then return nil, "a Redis Cluster has database 0 only: " .. s end
    -- the first seed says whether the cluster speaks TLS, and who we are
    if i == 1 then cfg.tls = u.tls end
    if u.tls ~= cfg.tls then return nil, "the seed nodes mix redis:// and rediss://" end
    if cfg.node.password == nil and u.password then
      cfg.node.user, cfg.node.password = cfg.node.user or u.user, u.password
    end
    cfg.seeds[i] = addr_of(u.host, u.port)
  end
  cfg.scheme = cfg.tls and "rediss" or "redis"
  return cfg
end

-- The cluster client -------------------------------------------------------------

---@class duplex.RedisClusterOptions
---@field nodes? string[]             seed URLs, redis://host:port or rediss://; default { url }
---@field name? string                every node connection's CLIENT SETNAME
---@field url? string                 one seed, default redis://127.0.0.1:6379
---@field user? string                ACL user, for every node (or the seed URL's)
---@field password? string            for every node (or the seed URL's)
---@field tls? {ca: string|nil, servername: string|nil, verify: boolean|nil, context: userdata|nil} for rediss://
---@field timeout? number             seconds for a reply, default 5
---@field connect_timeout? number     seconds for connecting to a node, default 5
---@field retry_timeout? number       seconds a call goes on trying through a failover, default 10
---@field max_redirects? integer      MOVED and ASK followed per call, default 16
---@field max_reply? integer          largest reply, default 64 MiB
---@field backoff_min? number         first delay between tries, default 0.1 s
---@field backoff_max? number         the delay doubles up to this, default 5 s
---@field ping_interval? number       PING a silent subscriber connection, default 5 s; 0 = never
---@field on_status? fun(status: "up"|"down"|"error", detail: string)

---@class duplex.RedisCluster
local Cluster = {}
Cluster.__index = Cluster

local KINDS = { subscribe = "unsubscribe", psubscribe = "punsubscribe", ssubscribe = "sunsubscribe" }

function Cluster:_report(status, detail)
  if not self.cfg.on_status then return end
  local ok, err = pcall(self.cfg.on_status, status, detail)
  if not ok then runtime.log("error", "redis cluster on_status failed: " .. tostring(err)) end
end

-- What a node's client reports, passed on with its address; a subscriber
-- lost or back where shard channels live is also what the keeper of the
-- subscriptions must hear.
function Cluster:_node_status(addr, status, detail)
  if self.closed then return end
  if detail:match("^subscriber") and status ~= "error" then
    local was_down = self.sub_down[addr]
    self.sub_down[addr] = status == "down" or nil
    local names = self:_homed("ssubscribe", addr)
    -- the client made them again before it said "up"; the first time,
    -- _place says so once they are confirmed
    if #names > 0 and status == "up" and was_down then
      self:_report("up", "shard channels at " .. addr .. ": " .. table.concat(names, " "))
    elseif #names > 0 and status == "down" then
      self:_report("down", "shard channels at " .. addr .. ": " .. detail:gsub("^subscriber: ", ""))
    end
    if status == "down" then self:_unsettle() end
  end
  self:_report(status, addr .. " " .. detail)
end

-- Redis ended a subscription unasked (a shard channel whose slot moved away,
-- a failover), or refused it on a resubscription: make it where it belongs.
function Cluster:_dropped(addr, kind, name, why)
  if self.home[kind][name] ~= addr then return end
  self.home[kind][name] = nil
  if kind == "ssubscribe" then self:_report("down", "shard channels at " .. addr .. ": " .. why .. ": " .. name) end
  self:_refresh_soon()
  self:_unsettle()
end

--- The client of the node at addr, connected when first asked for.
--- Coroutines asking while it connects wait for that outcome.
function Cluster:_node(addr, deadline)
  local cl = self.clients[addr]
  if cl then return cl end
  if self.closed then return nil, "client closed" end
  local waiting = self.dialing[addr]
  if waiting then
    waiting[#waiting + 1] = running()
    core.park(left(deadline))
    return self.clients[addr] or nil, self.clients[addr] == nil and "connect to " .. addr .. " failed" or nil
  end
  waiting = {}
  self.dialing[addr] = waiting
  local o = {}
  for k, v in pairs(self.cfg.node) do o[k] = v end
  o.url = self.cfg.scheme .. "://" .. addr
  o.on_status = function(status, detail) self:_node_status(addr, status, detail) end
  local ok, made, err = pcall(client.connect, o)
  if not ok then made, err = nil, tostring(made) end
  if made and self.closed then made:close(); made, err = nil, "client closed" end
  if made then
    made._on_dropped = function(kind, name, why) self:_dropped(addr, kind, name, why) end
    self.clients[addr] = made
  end
  self.dialing[addr] = nil
  for _, co in ipairs(waiting) do wake(co) end
  return made, err
end

function Cluster:_homed(kind, addr)
  local out = {}
  for name, home in pairs(self.home[kind]) do
    if home == addr then out[#out + 1] = name end
  end
  table.sort(out)
  return out
end

-- Ask one node for the map: CLUSTER SHARDS, or CLUSTER SLOTS from a Redis
-- before 7, which does not know the former.
function Cluster:_ask_map(addr, deadline)
  local cl, err = self:_node(addr, deadline)
  if not cl then return nil, err end
  local asked = split(addr)
  local v, verr, kind = cl:call("CLUSTER", "SHARDS")
  if kind == "redis" then
    v, verr = cl:call("CLUSTER", "SLOTS")
    if v == nil then return nil, verr end
    return from_slots(v, asked)
  end
  if v == nil then return nil, verr end
  return from_shards(v, asked, self.cfg.tls)
end

-- The map from the first node that gives one: the masters known, their
-- replicas, then the seeds. An empty map is no answer (a node that lost its configuration):
-- the one there was is kept.
function Cluster:_load(deadline)
  local candidates, seen, problems = {}, {}, {}
  local function add(addr)
    if not seen[addr] then seen[addr], candidates[#candidates + 1] = true, addr end
  end
  local known = {}
  for _, m in ipairs(self.map.list) do known[#known + 1] = m.addr end
  for i = #known, 2, -1 do -- not always the same node asked
    local j = math.random(i)
    known[i], known[j] = known[j], known[i]
  end
  for _, a in ipairs(known) do add(a) end
  for _, m in ipairs(self.map.list) do
    for _, r in ipairs(m.replicas) do add(r) end
  end
  for _, a in ipairs(self.cfg.seeds) do add(a) end
  for _, addr in ipairs(candidates) do
    if self.closed then return nil, "client closed" end
    if #problems > 0 and now() >= deadline then break end
    local map, err = self:_ask_map(addr, deadline)
    if map and map.count == 0 then map, err = nil, "an empty slot map" end
    if map then
      self:_install(map)
      return true
    end
    problems[#problems + 1] = addr .. ": " .. err
  end
  return nil, "no slot map (" .. table.concat(problems, "; ") .. ")"
end

-- A new map; the clients of nodes that are no master any more and keep no
-- subscription are closed (a failed master's would redial forever), once
-- no call waits on them (a MOVED may have sent one where this map, from a
-- node that is behind, does not go).
function Cluster:_install(map)
  self.map = map
  for addr, cl in pairs(self.clients) do
    local used = map.masters[addr] or self.using[cl]
    for kind in pairs(KINDS) do used = used or #self:_homed(kind, addr) > 0 end
    if not used then
      self.clients[addr], self.sub_down[addr] = nil, nil
      cl:close()
    end
  end
  self:_unsettle()
end

--- Reload the slot map; coroutines asking while that is under way share
--- its outcome.
function Cluster:_refresh(deadline)
  local waiting = self.refreshing
  if waiting then
    waiting[#waiting + 1] = running()
    core.park(left(deadline))
    return self.map_error == nil, self.map_error
  end
  waiting = {}
  self.refreshing = waiting
  local ok, loaded, err = pcall(self._load, self, deadline)
  if not ok then loaded, err = nil, tostring(loaded) end
  self.map_error = not loaded and err or nil
  self.refreshing = nil
  for _, co in ipairs(waiting) do wake(co) end
  if not loaded then self:_report("error", "slot map: " .. err) end
  return loaded, err
end

-- After a MOVED: the map is reloaded in the background, the caller already
-- on its way to the new node.
function Cluster:_refresh_soon()
  if self.refreshing or self.refresher or self.closed then return end
  self.refresher = core.spawn(function()
    self:_refresh(now() + self.cfg.retry_timeout)
    self.refresher = nil
  end)
end

-- The master for slot, or any master for a command without keys.
function Cluster:_target(slot)
  if slot then return self.map.slots[slot] end
  local list = self.map.list
  if #list > 0 then return list[math.random(#list)].addr end
end

--- Run commands (their bytes) whose keys are all in slot (nil: keyless) and
--- return their replies, following redirects: the commands redirected are
--- sent again, those answered keep their replies. nil, message,
--- "connection" when no node answered before retry_timeout or when
--- max_redirects is passed.
function Cluster:_run(entries, slot)
  local cfg = self.cfg
  local deadline = now() + cfg.retry_timeout
  local out, unanswered = {}, {}
  for i = 1, #entries do unanswered[i] = i end
  local redirects, delay, ask, why = 0, cfg.backoff_min, nil, nil
  while true do
    if self.closed then return nil, "client closed", "connection" end
    -- an ASK holds for the one try after it: should that fail, the owner
    -- says again where to go
    local asking = ask
    ask = nil
    local addr = asking or self:_target(slot)
    local replies, err
    if not addr then
      err = slot and ("slot " .. slot .. " not served by any node") or "no master in the slot map"
    else
      local cl, cerr = self:_node(addr, deadline)
      if cl then
        local bytes = {}
        for j, i in ipairs(unanswered) do bytes[j] = asking and ASKING .. entries[i] or entries[i] end
        self.using[cl] = (self.using[cl] or 0) + 1
        replies, cerr = cl:_pipeline(table.concat(bytes), asking and 2 * #unanswered or #unanswered)
        self.using[cl] = self.using[cl] > 1 and self.using[cl] - 1 or nil
      end
      if not replies then err = addr .. ": " .. tostring(cerr) end
    end
    local wait = err ~= nil
    if replies then
      local step, again, moved, retry = asking and 2 or 1, {}, nil, nil
      for j, i in ipairs(unanswered) do
        local v = replies[j * step]
        local what, s, target = redirect(v, addr)
        out[i] = v -- an error reply stays, should the time run out
        if what then again[#again + 1] = i end
        if what == "moved" then
          self.map.slots[s], moved = target, v.err
          self:_refresh_soon()
        elseif what == "ask" then
          ask, moved = target, v.err
        elseif what == "bad" then
          err = "a redirect that cannot be read from " .. addr .. ": " .. v.err
        elseif what == "retry" then
          retry = true
        end
      end
      if #again == 0 then return out end
      unanswered = again
      if err then
        wait, ask = true, nil
      elseif moved then -- to the new place at once, but not forever
        redirects = redirects + 1
        if redirects > cfg.max_redirects then
          return nil, ("too many redirects (more than %d), the last: %s"):format(cfg.max_redirects, moved),
            "connection"
        end
      elseif retry then
        if now() + delay >= deadline then return out end -- the cluster's own word (CLUSTERDOWN ...)
        wait = true
      end
    end
    -- "not connected" says less than what broke the connection (a bad
    -- reply, a timeout): that is what the caller hears
    if err and not err:find(": not connected$") then why = err end
    if wait then
      if err and now() >= deadline then return nil, why or err, "connection" end
      self:_refresh(deadline)
      core.sleep(math.min(delay * (0.5 + math.random() / 2), left(deadline)))
      delay = math.min(delay * 2, cfg.backoff_max)
    end
  end
end

-- Subscriptions ------------------------------------------------------------------

-- Where a subscription belongs: a shard channel at its slot's master;
-- channels and patterns, which a cluster sends to every node, all at one
-- master, kept while it stays one.
function Cluster:_want(kind, name)
  if kind == "ssubscribe" then return self.map.slots[cluster.slot(name)] end
  local c = self.classic
  if not (c and self.map.masters[c]) then
    c = self:_target(nil)
    self.classic = c
  end
  return c
end

-- Leave a node a subscription is moving away from; a node that is gone has
-- nothing to be told.
function Cluster:_leave(addr, kind, name)
  local cl = self.clients[addr]
  if cl then cl[KINDS[kind]](cl, name) end
end

--- Subscribe names at the nodes they belong to, grouped per node: true when
--- all are confirmed; a MOVED (the map was behind) is followed. While a
--- node is down its client makes the subscription when it is back, and
--- the caller hears nil, message, "connection".
function Cluster:_place(kind, names, deadline)
  local fail, fail_kind
  local function failed(err, why)
    if not fail then fail, fail_kind = err, why end
  end
  local handler, todo = self.dispatch[kind], names
  for round = 0, self.cfg.max_redirects do
    local groups, order, again = {}, {}, {}
    for _, name in ipairs(todo) do
      if self.subs[kind][name] then -- not unsubscribed meanwhile
        local addr = self:_want(kind, name)
        if not addr then
          failed(("slot %d not served by any node"):format(cluster.slot(name)), "connection")
        else
          if not groups[addr] then groups[addr], order[#order + 1] = {}, addr end
          table.insert(groups[addr], name)
        end
      end
    end
    -- every home set before the first wait, so that the keeper, running
    -- meanwhile, does not make the same subscriptions again
    local leaving = {}
    for _, addr in ipairs(order) do
      for _, name in ipairs(groups[addr]) do
        local old = self.home[kind][name]
        if old and old ~= addr then leaving[#leaving + 1] = { old, name } end
        self.home[kind][name] = addr
      end
    end
    for _, l in ipairs(leaving) do self:_leave(l[1], kind, l[2]) end
    for _, addr in ipairs(order) do
      local list = groups[addr]
      local cl, err = self:_node(addr, deadline)
      local ok, why
      if cl then
        local args = table.move(list, 1, #list, 1, {})
        args[#args + 1] = handler
        ok, err, why = cl[kind](cl, table.unpack(args))
      end
      if ok then
        if kind == "ssubscribe" then
          self:_report("up", "shard channels at " .. addr .. ": " .. table.concat(list, " "))
        end
      elseif not cl then
        for _, name in ipairs(list) do self.home[kind][name] = nil end
        failed(err, "connection")
      elseif why == "connection" then
        failed(err, why) -- made by the node's client when it is back
      else
        -- refused: each on its own, to know which, and where a MOVED says
        for _, name in ipairs(list) do
          local ok1, err1, why1 = cl[kind](cl, name, handler)
          if not ok1 and why1 == "connection" then
            failed(err1, why1)
          elseif not ok1 then
            self.home[kind][name] = nil
            local what, s, target = redirect({ err = err1 }, addr)
            if what == "moved" then
              self.map.slots[s] = target
              again[#again + 1] = name
              self:_refresh_soon()
            else
              self.subs[kind][name] = nil
              failed(err1, "redis")
            end
          end
        end
      end
    end
    if #again == 0 then break end
    todo = again
    if round == self.cfg.max_redirects then failed("too many redirects (more than " .. round .. ")", "connection") end
  end
  if fail then return nil, fail, fail_kind end
  return true
end

-- Whether every subscription is where it belongs and its node's subscriber
-- is up; those that are not are made where they belong.
function Cluster:_settle(deadline)
  local settled = true
  for kind in pairs(KINDS) do
    local move = {}
    for name in pairs(self.subs[kind]) do
      local home, want = self.home[kind][name], self:_want(kind, name)
      if not want or home ~= want then move[#move + 1] = name
      elseif self.sub_down[home] then settled = false end
    end
    table.sort(move)
    if #move > 0 and not self:_place(kind, move, deadline) then settled = false end
  end
  return settled
end

function Cluster:_unsettle()
  self.unsettled = true
  if self.keeper and self.keeper_idle then core.wake(self.keeper) end
end

-- The keeper of the subscriptions, from the first one on: while some are
-- not where they belong or their node is down, it reloads the map and
-- makes them again, with backoff; otherwise it sleeps until told.
function Cluster:_keep()
  local cfg, delay = self.cfg, self.cfg.backoff_min
  local function idle(timeout)
    self.keeper_idle = true
    core.park(timeout)
    self.keeper_idle = false
  end
  while not self.closed do
    if not self.unsettled then
      idle()
    else
      self.unsettled = false
      local ok, settled = pcall(self._settle, self, now() + (cfg.node.timeout or client.defaults.timeout))
      if not ok then runtime.log("error", "redis cluster subscriptions: " .. tostring(settled)) end
      if ok and settled then
        delay = cfg.backoff_min
      else
        self.unsettled = true
        idle(delay * (0.5 + math.random() / 2))
        delay = math.min(delay * 2, cfg.backoff_max)
        if not self.closed then self:_refresh(now() + cfg.retry_timeout) end
      end
    end
  end
  self.keeper = nil
end

function Cluster:_subscribe(kind, names, fn)
  if self.closed then return nil, "client closed", "connection" end
  for _, name in ipairs(names) do self.subs[kind][name] = fn end
  if not self.keeper then self.keeper = core.spawn(self._keep, self) end
  local ok, err, why = self:_place(kind, names, now() + (self.cfg.node.timeout or client.defaults.timeout))
  if not ok and why == "connection" then self:_unsettle() end
  return ok, err, why
end

function Cluster:_unsubscribe(kind, names)
  local set, home = self.subs[kind], self.home[kind]
  if #names == 0 then
    for name in pairs(set) do names[#names + 1] = name end
  end
  local by = {}
  for _, name in ipairs(names) do
    local addr = home[name]
    set[name], home[name] = nil, nil
    if addr then
      by[addr] = by[addr] or {}
      table.insert(by[addr], name)
    end
  end
  local result, err, why = true, nil, nil
  for addr, list in pairs(by) do
    local cl = self.clients[addr]
    if cl then
      local ok, e, w = cl[KINDS[kind]](cl, table.unpack(list))
      if not ok and result then result, err, why = nil, e, w end
    end
  end
  return result, err, why
end

-- Checked here, before they are grouped per node, with the words the
-- client would use. The methods below tail-call subscribe and unsubscribe,
-- so the caller of rc:subscribe is level 2 there, 3 here.
local function names_of(who, n, ...)
  local names = {}
  for i = 1, n do
    local name = select(i, ...)
    if type(name) ~= "string" then error(who .. ": channel names are strings", 3) end
    names[i] = name
  end
  return names
end

local function subscribe(self, kind, ...)
  local n = select("#", ...)
  local fn = select(n, ...)
  if n < 2 or type(fn) ~= "function" then error(kind .. ": names, then a function expected", 2) end
  return blocking(self._subscribe, self, kind, names_of(kind, n - 1, ...), fn)
end

local function unsubscribe(self, kind, ...)
  return blocking(self._unsubscribe, self, kind, names_of(KINDS[kind], select("#", ...), ...))
end

--- Shard channels (Redis 7), each at the master of its slot, followed when
--- the slot moves or its master fails over: true once confirmed.
function Cluster:ssubscribe(...) return subscribe(self, "ssubscribe", ...) end

--- Channels, at one master (a cluster delivers PUBLISH at every node).
function Cluster:subscribe(...) return subscribe(self, "subscribe", ...) end

--- Patterns, at the same master as the channels.
function Cluster:psubscribe(...) return subscribe(self, "psubscribe", ...) end

--- Shard channels, or all when none is named.
function Cluster:sunsubscribe(...) return unsubscribe(self, "ssubscribe", ...) end

--- Channels, or all when none is named.
function Cluster:unsubscribe(...) return unsubscribe(self, "subscribe", ...) end

--- Patterns, or all when none is named.
function Cluster:punsubscribe(...) return unsubscribe(self, "psubscribe", ...) end

-- Commands -----------------------------------------------------------------

function Cluster:_call(bytes, slot)
  local out, err, kind = self:_run({ bytes }, slot)
  if not out then return nil, err, kind end
  if is_error(out[1]) then return nil, out[1].err, "redis" end
  return out[1]
end

--- One command, at the master of its first key's slot (any master for one
--- without keys): the reply, or nil, message, "redis" | "connection".
function Cluster:call(...)
  local bytes = encode("call", 2, ...)
  return blocking(self._call, self, bytes, slot_of(table.pack(...)))
end

--- PUBLISH, at any master: the cluster passes it on to every node.
function Cluster:publish(channel, message)
  return blocking(self._call, self, encode("publish", 2, "PUBLISH", channel, message), nil)
end

--- SPUBLISH, at the master of the channel's slot.
function Cluster:spublish(channel, message)
  local bytes = encode("spublish", 2, "SPUBLISH", channel, message)
  return blocking(self._call, self, bytes, cluster.slot(tostring(channel)))
end

local Pipeline = {}
Pipeline.__index = Pipeline

-- A command's bytes, and its slot checked against the pipeline's: one
-- pipeline goes to one node, so its keys must share a slot.
function Pipeline:_add(who, level, args)
  local n = #self.bytes + 1
  self.bytes[n] = encode(who, level + 1, table.unpack(args, 1, args.n))
  local s = slot_of(args)
  if s == nil then return end
  if self.slot == nil then
    self.slot, self.first = s, n
  elseif self.slot ~= s then
    error(("%s: its key is in slot %d, command %d's in slot %d: a pipeline's keys must share a slot "
      .. "(give them a {hash tag})"):format(who, s, self.first, self.slot), level + 1)
  end
end

function Pipeline:call(...)
  self:_add("pipeline: p:call", 2, table.pack(...))
end

--- Several commands in one write, at the node of their keys' slot (which
--- they must share: an error otherwise); replies in order.
function Cluster:pipeline(what)
  local p = setmetatable({ bytes = {} }, Pipeline)
  if type(what) == "function" then
    what(p)
  elseif type(what) == "table" then
    for i, c in ipairs(what) do
      if type(c) ~= "table" then error("pipeline: command " .. i .. " is not a table", 2) end
      p:_add("pipeline: command " .. i, 2, table.pack(table.unpack(c, 1, c.n or #c)))
    end
  else
    error("pipeline: a function or a list of commands expected", 2)
  end
  if #p.bytes == 0 then return {} end
  return blocking(self._run, self, p.bytes, p.slot)
end

--- The slot of a key (redis.slot).
function Cluster:slot(key) -- luacheck: no unused args
  return cluster.slot(key)
end

--- The masters of the slot map as last loaded: { addr =, host =, port =,
--- id =, slots = { {first, last}... }, replicas = { addr... } }, in slot order.
function Cluster:nodes()
  local out = {}
  for _, m in ipairs(self.map.list) do
    local slots = {}
    for i, r in ipairs(m.slots) do slots[i] = { r[1], r[2] } end
    out[#out + 1] = { addr = m.addr, host = m.host, port = m.port, id = m.id, slots = slots,
      replicas = { table.unpack(m.replicas) } }
  end
  table.sort(out, function(a, b) return (a.slots[1] or { SLOTS })[1] < (b.slots[1] or { SLOTS })[1] end)
  return out
end

--- Close every node's client; calls from now on fail with "client closed".
function Cluster:close()
  if self.closed then return end
  self.closed = true
  for _, cl in pairs(self.clients) do cl:close() end
  self.clients = {}
  if self.keeper and self.keeper_idle then core.wake(self.keeper) end
end

Cluster.__close = Cluster.close

local function start(cfg)
  local self = setmetatable({ cfg = cfg, map = new_map(), clients = {}, dialing = {}, sub_down = {}, using = {},
    subs = {}, home = {}, dispatch = {} }, Cluster)
  for kind in pairs(KINDS) do
    local set = {}
    self.subs[kind], self.home[kind] = set, {}
    self.dispatch[kind] = function(channel, message, pattern)
      local fn = set[pattern or channel]
      if fn then return fn(channel, message, pattern) end
    end
  end
  local ok, err = self:_refresh(now() + (cfg.node.connect_timeout or client.defaults.connect_timeout))
  if not ok then
    self:close()
    return nil, err
  end
  return self
end

--- Connect to a Redis Cluster through its seed nodes (README, "Redis Cluster").
---@return duplex.RedisCluster|nil, string|nil
function cluster.connect(opts)
  if type(opts) == "string" then opts = { url = opts } end
  if type(opts) ~= "table" then error("redis.cluster: a URL or a table of options expected", 2) end
  options.check("redis.cluster", opts, options.cluster, 2)
  local cfg, err = configure(opts)
  if not cfg then return nil, err end
  return blocking(start, cfg)
end

return cluster
