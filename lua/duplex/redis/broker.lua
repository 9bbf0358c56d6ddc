--- The Redis broker of duplex.pubsub: rooms shared between nodes through
--- one Redis server or a Redis Cluster, on duplex.redis's own client.
---
--- Plain topics go through pub/sub (classic, or sharded with SPUBLISH on a
--- cluster, so that a room's traffic reaches only the shard that owns it).
--- Redis pub/sub stores nothing: while a node's link is down, the other
--- nodes miss what it publishes, and it misses theirs.
---
--- Topics with history (opts.history) are also written to a Redis Stream,
--- in the same script that publishes them, so every publication has a
--- position (epoch, offset) that every node sees in the same order. A node
--- whose link was down, or that sees a gap in the offsets, catches up from
--- the stream; a client that reconnects with its last position gets what it
--- missed (hub:recover). The epoch changes when a room's history is lost
--- (its TTL ran out, Redis restarted empty), so a client knows that its
--- offset means nothing any more rather than silently missing messages.
---
--- Presence (broker:join/leave/members/count): a sorted set per room whose
--- scores are expiry times on Redis's own clock, refreshed by each node's
--- heartbeat, so the members of a node that died leave within presence_ttl.
local core = require "duplex.core"
local options = require "duplex.options"
local runtime = require "duplex.runtime"
local client = require "duplex.redis.client"
local cluster = require "duplex.redis.cluster"
local history = require "duplex.pubsub.history"
local roster = require "duplex.pubsub.roster"

local now, blocking = core.now, runtime.blocking

local broker = {}

broker.defaults = {
  prefix = "duplex:",
  presence_ttl = 30,      -- seconds a member outlives its node's last heartbeat
  max_pending = 10000,    -- publications queued while Redis is away, or in flight
}

-- Scripts ------------------------------------------------------------------
-- KEYS are a topic's meta hash (epoch e, offset o) and stream, in one slot
-- (the same hash tag), so that they run on a cluster too.

-- ARGV: channel, node, kind, message, size, ttl, fresh epoch, publish command
--
-- The meta hash also names (r) the replication ID of the server that wrote
-- it. Another ID means another server wrote the offsets so far: a replica
-- promoted by a failover, or a restart from disk, either of which may have
-- lost the last writes (replication and persistence are asynchronous), and
-- then offsets would be handed out again and skipped as duplicates by
-- nodes that saw the lost ones. So a new epoch begins there, continuing the
-- offsets: it records the one it replaces (p) and the offset it took over
-- (b), up to which positions of either epoch are the same publications.
local PUBLISH = [[
local rid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
local m = redis.call('HMGET', KEYS[1], 'e', 'r')
local epoch = m[1]
if not epoch then
  epoch = ARGV[7]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0, 'r', rid)
elseif m[2] ~= rid then
  redis.call('HSET', KEYS[1], 'p', epoch, 'b', redis.call('HGET', KEYS[1], 'o'), 'e', ARGV[7], 'r', rid)
  epoch = ARGV[7]
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], offset .. '-0', 'n', ARGV[2], 'k', ARGV[3], 'd', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call(ARGV[8], ARGV[1], ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. epoch .. ' ' .. offset .. ' ' .. ARGV[4])
return offset
]]

-- ARGV: the offset after which to read, or "" for the position only.
-- Returns epoch, offset, entries, previous epoch, offset it took over.
local READ = [[
local m = redis.call('HMGET', KEYS[1], 'e', 'o', 'p', 'b')
if not m[1] then return {'', 0, {}, '', 0} end
local entries = {}
if ARGV[1] ~= '' then entries = redis.call('XRANGE', KEYS[2], (tonumber(ARGV[1]) + 1) .. '-0', '+') end
return {m[1], tonumber(m[2]), entries, m[3] or '', tonumber(m[4] or 0)}
]]

-- KEYS: a room's presence set and its info hash. ARGV: ttl, then member,
-- info pairs to refresh (info "" leaves it unchanged). Drops the expired.
local PRESENCE = [[
local t = redis.call('TIME')
local ms = t[1] * 1000 + math.floor(t[2] / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ms)
if #dead > 0 then
  redis.call('ZREM', KEYS[1], unpack(dead))
  redis.call('HDEL', KEYS[2], unpack(dead))
end
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], ms + ttl * 1000, ARGV[i])
  if ARGV[i + 1] ~= '' then redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
end
if #ARGV > 1 then
  redis.call('PEXPIRE', KEYS[1], ttl * 2000)
  redis.call('PEXPIRE', KEYS[2], ttl * 2000)
end
return ms
]]

local SHA = { [PUBLISH] = core.sha1_hex(PUBLISH), [READ] = core.sha1_hex(READ),
  [PRESENCE] = core.sha1_hex(PRESENCE) }

-- The command that runs script: EVALSHA, or EVAL when the server has not
-- cached it (a restart, a failover to a replica that never ran it).
local function script_command(script, full, keys, args)
  local cmd = { full and "EVAL" or "EVALSHA", full and script or SHA[script], #keys }
  table.move(keys, 1, #keys, 4, cmd)
  table.move(args, 1, #args, #cmd + 1, cmd)
  return cmd
end

local function is_noscript(v) return type(v) == "table" and v.err and v.err:find("^NOSCRIPT") end

-- Run one script: its reply, or nil, message, kind.
local function run_script(db, script, keys, args)
  local v, err, kind = db:call(table.unpack(script_command(script, false, keys, args)))
  if v == nil and kind == "redis" and err:find("^NOSCRIPT") then
    v, err, kind = db:call(table.unpack(script_command(script, true, keys, args)))
  end
  return v, err, kind
end

-- Names --------------------------------------------------------------------

-- Every key and the sharded channel of a topic carry one hash tag, so they
-- live in one slot. The tag is the topic without braces (which would end
-- the tag early); the topic itself follows, so that two topics whose tags
-- collide still have keys of their own.
local function tagged(self, topic, suffix)
  local tag = topic:gsub("[{}]", "_")
  if tag == "" then tag = "_" end
  return self.prefix .. "{" .. tag .. "}" .. topic .. suffix
end

local function channel_of(self, topic)
  if self.sharded then return tagged(self, topic, "") end
  return self.prefix .. topic
end

-- The broker ---------------------------------------------------------------

---@class duplex.RedisBrokerStats
---@field published integer
---@field received integer
---@field dropped integer
---@field reconnects integer
---@field recovered integer publications a node caught up from a stream
---@field gaps integer   times a stream no longer held what a node missed

---@class duplex.RedisBroker: duplex.Broker
---@field stats duplex.RedisBrokerStats
local Broker = {}
Broker.__index = Broker

local CLIENT_OPTIONS = { "url", "tls", "connect_timeout", "ping_interval", "max_reply",
  "backoff_min", "backoff_max" }

local ROLE = { commands = "publisher", subscriber = "subscriber" }

local random_id = history.random_id

---@class duplex.RedisOptions
---@field url? string                 redis://[user:pass@]host:port or rediss://, default redis://127.0.0.1:6379
---@field nodes? string[]             a Redis Cluster's seed URLs, instead of url: sharded by default
---@field retry_timeout? number       with nodes: how long a call waits for the cluster to mend, default 10 s
---@field client? duplex.RedisClient|duplex.RedisCluster a client to use instead (not closed by broker:close)
---@field sharded? boolean            SPUBLISH/SSUBSCRIBE: default true with a cluster client
---@field prefix? string              prepended to channel names and keys, default "duplex:"
---@field history? duplex.HistoryOptions topics whose publications are stored, for recovery
---@field presence_ttl? number        seconds a dead node's members stay listed, default 30
---@field max_pending? integer        publications queued while Redis is away, default 10,000
---@field on_status? fun(status: "up"|"down"|"error", detail: string)
---@field backoff_min? number         first reconnect delay, default 0.1 s
---@field backoff_max? number         the delay doubles up to this, default 5 s
---@field ping_interval? number       PING a link silent this long, default 5 s; 0 = never
---@field connect_timeout? number     default 5 s
---@field tls? {ca: string|nil, servername: string|nil, verify: boolean|nil} for rediss://
---@field max_reply? integer          largest reply, default 64 MiB
---@field node_id? string             this node's name in payloads (no spaces), default random

--- Create a broker and start connecting (in the background).
---@param opts duplex.RedisOptions|nil
---@return duplex.RedisBroker|nil broker, string|nil err
function broker.new(opts)
  opts = opts or {}
  options.check("redis.broker", opts, options.broker, 2)
  local self = setmetatable({
    prefix = opts.prefix or broker.defaults.prefix,
    node = opts.node_id or random_id(),
    history = history.rules(opts.history, "redis.broker", 3),
    presence_ttl = opts.presence_ttl or broker.defaults.presence_ttl,
    max_pending = opts.max_pending or broker.defaults.max_pending,
    report = opts.on_status or function() end,
    handler = function() end,
    topics = {},        -- topic -> true: relayed from the other nodes
    queue = {},         -- publications and (un)subscriptions, in order
    pending = 0,        -- publications in the queue or in flight
    seq = {},           -- history topic -> { epoch, offset, catching }
    roster = roster.new(), -- this node's members
    stats = { published = 0, received = 0, dropped = 0, reconnects = 0, recovered = 0, gaps = 0 },
    up = {},
  }, Broker)
  if self.prefix:find("[{}%s]") then error("redis.broker: prefix must not contain braces or spaces", 2) end
  if self.node:find("%s") or self.node == "" then error("redis.broker: node_id must be a word", 2) end
  if opts.client and opts.nodes then error("redis.broker: client or nodes, not both", 2) end
  if opts.client then
    self.db, self.shared = opts.client, true
    self.up.publisher = "up" -- its outages are the client's to report: calls fail meanwhile
    self.sharded = opts.sharded
    if self.sharded == nil then self.sharded = opts.client.slot ~= nil end
  elseif opts.nodes then
    -- A cluster mends itself within retry_timeout: publications wait for
    -- that rather than being dropped on the first "down".
    local cfg = { nodes = opts.nodes, name = self.prefix .. self.node,
      on_status = function(status, detail) self:_cluster_status(status, detail) end }
    for _, k in ipairs(CLIENT_OPTIONS) do if k ~= "url" then cfg[k] = opts[k] end end
    cfg.retry_timeout = opts.retry_timeout
    for _, seed in ipairs(opts.nodes) do
      local u, err = client._parse_url(seed)
      if not u then return nil, err end
    end
    self.cfg, self.dial, self.up.publisher = cfg, cluster.connect, "up"
    self.sharded = opts.sharded ~= false
  else
    local cfg = { on_status = function(status, detail) self:_client_status(status, detail) end }
    for _, k in ipairs(CLIENT_OPTIONS) do cfg[k] = opts[k] end
    cfg.url = cfg.url or client.defaults.url
    cfg.name = self.prefix .. self.node -- who is who in CLIENT LIST
    -- A bad URL or TLS setup is known now; an unreachable Redis is not
    -- an error, just down until it answers.
    local probe, perr = client._configure(cfg)
    if not probe then return nil, perr end
    self.cfg, self.dial, self.sharded = cfg, client.connect, opts.sharded or false
  end
  self.worker = core.spawn(self._work, self)
  return self
end

--- Where messages from Redis go (hub:attach_broker sets it): the other
--- nodes' plain messages, and every node's messages of history topics with
--- their position.
---@param fn fun(topic: string, message: string, kind: "text"|"binary", position: duplex.Position|nil)
function Broker:on_message(fn) self.handler = fn end

--- Whether topic's publications are stored (opts.history matches it).
---@param topic string
---@return boolean
function Broker:has_history(topic) return self.history(topic) ~= nil end

function Broker:_status(status, which, detail)
  if self.closed then return end
  if status ~= "error" then
    if self.up[which] == status then return end
    self.up[which] = status
    if status == "down" then self.stats.reconnects = self.stats.reconnects + 1 end
  end
  local ok, err = pcall(self.report, status, which .. (detail and (": " .. detail) or ""))
  if not ok then runtime.log("error", "redis.broker on_status failed: " .. tostring(err)) end
  -- Back after an outage: what was published meanwhile is in the streams.
  if status == "up" and which == "subscriber" then self:_kick("catch_up") end
  -- Nobody reads the publisher's connection between commands: when the
  -- subscriber's fails, ask it too, so that it redials now rather than
  -- losing the next publication to a connection that is long gone.
  if status == "down" and which == "subscriber" and self.db then self:_kick("ping") end
end

-- The client's "up commands" is our publisher, its subscriber ours.
function Broker:_client_status(status, detail)
  local role, rest = detail:match("^(%a+):? ?(.*)$")
  self:_status(status, ROLE[role] or "publisher", rest ~= "" and rest or nil)
end

-- A cluster's reports name the node ("host:port commands", "host:port
-- subscriber: ...", "shard channels at host:port: ..."): passed on as they
-- are, each node's link being up or down on its own; shard channels back
-- at a node mean a catch-up, as the subscriber coming back does.
function Broker:_cluster_status(status, detail)
  if self.closed then return end
  local which = (detail:find("subscriber", 1, true) or detail:find("channels", 1, true)) and "subscriber"
    or "publisher"
  if status == "down" then self.stats.reconnects = self.stats.reconnects + 1 end
  local ok, err = pcall(self.report, status, which .. ": " .. detail)
  if not ok then runtime.log("error", "redis.broker on_status failed: " .. tostring(err)) end
  if status == "up" and which == "subscriber" then self:_kick("catch_up") end
end

-- Work ---------------------------------------------------------------------
-- One coroutine does what the broker's callers may not wait for, in the
-- order they asked: connecting, (un)subscribing, publishing (pipelined),
-- catching up, the presence heartbeat.

function Broker:_kick(what)
  if what then self.queue[#self.queue + 1] = { what } end
  if self.idle then core.wake(self.worker) end
end

function Broker:_connect()
  local delay = self.cfg.backoff_min or client.defaults.backoff_min
  local max = self.cfg.backoff_max or client.defaults.backoff_max
  while not self.closed do
    local db, err = self.dial(self.cfg)
    if db and self.closed then db:close(); return end
    if db then return db end
    self:_status("down", "publisher", err)
    self:_status("down", "subscriber", err)
    core.park(delay * (0.5 + math.random() / 2)) -- close() ends the wait at once
    delay = math.min(delay * 2, max)
  end
end

-- The subscriber connection exists (and says "up") from the start, with a
-- channel of this node's own: a node with no rooms yet is still a node.
function Broker:_node_channel() return self.prefix .. "node:" .. self.node end

function Broker:_open()
  if not self.db then
    self.db = self:_connect()
    if not self.db then return false end
  end
  local subscribe = self.sharded and "ssubscribe" or "subscribe"
  self.db[subscribe](self.db, self:_node_channel(), function() end)
  for topic in pairs(self.topics) do self:_relay(topic) end
  return true
end

function Broker:_relay(topic)
  local subscribe = self.sharded and "ssubscribe" or "subscribe"
  local ok, err, kind = self.db[subscribe](self.db, channel_of(self, topic), function(_, payload)
    self:_incoming(topic, payload)
  end)
  -- not connected: the client subscribes when it is back
  if not ok and kind == "redis" then self:_status("error", "subscriber", tostring(err)) end
end

function Broker:_work()
  local ok, err = pcall(function()
    if not self:_open() then return end
    local next_beat = now()
    while not self.closed do
      if #self.queue == 0 then
        self.idle = true
        core.park(math.max(0, next_beat - now()))
        self.idle = false
      end
      if self.closed then break end
      local batch = self.queue
      self.queue = {}
      self:_run(batch)
      if now() >= next_beat then
        self:_heartbeat()
        next_beat = now() + self.presence_ttl / 3
      end
    end
  end)
  if not ok then runtime.log("error", "redis.broker: " .. tostring(err)) end
  if self.db and not self.shared then self.db:close() end
end

-- A batch in order: runs of publications are pipelined (per topic on a
-- cluster, where each goes to its own shard), the rest done one by one.
function Broker:_run(batch)
  local i = 1
  while i <= #batch do
    local job = batch[i]
    if job[1] == "publish" then
      local j = i
      while batch[j + 1] and batch[j + 1][1] == "publish" do j = j + 1 end
      self:_publish_run(table.move(batch, i, j, 1, {}))
      i = j + 1
    else
      if job[1] == "subscribe" then
        local topic = job[2]
        if self.topics[topic] then
          if self.history(topic) and not self.seq[topic] then self:_start_at(topic) end
          self:_relay(topic)
        end
      elseif job[1] == "unsubscribe" then
        if not self.topics[job[2]] then
          local unsubscribe = self.sharded and "sunsubscribe" or "unsubscribe"
          self.db[unsubscribe](self.db, channel_of(self, job[2]))
          self.seq[job[2]] = nil
        end
      elseif job[1] == "catch_up" then
        -- (the heartbeat's, with our own client: only what is waiting on a
        -- read that failed; its status tells when the link comes back)
        local waiting_only = job[2]
        if not waiting_only then
          for topic in pairs(self.topics) do
            if self.history(topic) and not self.seq[topic] then self:_start_at(topic) end
          end
        end
        for topic, st in pairs(self.seq) do
          if not waiting_only or st.catching then self:_catch_up(topic, st) end
        end
      elseif job[1] == "presence" then
        local _, err, kind = run_script(self.db, PRESENCE, job[2], job[3])
        if err and kind == "redis" then self:_status("error", "publisher", "presence: " .. err) end
      elseif job[1] == "ping" then
        self.db:call("PING")
      elseif job[1] == "leave" then
        self.db:pipeline(job[2])
      end
      i = i + 1
    end
  end
end

-- The command that publishes a job's message.
function Broker:_command(job, full)
  local topic, payload = job[2], job[3]
  local rule = self.history(topic)
  local kind = job[4] == "binary" and "b" or "t"
  if not rule then
    return { self.sharded and "SPUBLISH" or "PUBLISH", channel_of(self, topic),
      self.node .. " " .. kind .. " " .. payload }
  end
  return script_command(PUBLISH, full,
    { tagged(self, topic, ":m"), tagged(self, topic, ":h") },
    { channel_of(self, topic), self.node, kind:upper(), payload, rule.size, rule.ttl, random_id(),
      self.sharded and "SPUBLISH" or "PUBLISH" })
end

function Broker:_publish_run(jobs)
  local groups, order = {}, {}
  for _, job in ipairs(jobs) do
    -- One node's client pipelines all; a cluster's shards take a topic each.
    local key = self.db.slot and job[2] or ""
    if not groups[key] then groups[key] = {}; order[#order + 1] = key end
    table.insert(groups[key], job)
  end
  if #order == 1 then return self:_publish_group(groups[order[1]]) end
  local left, me = #order, coroutine.running()
  for _, key in ipairs(order) do
    core.spawn(function()
      self:_publish_group(groups[key])
      left = left - 1
      if left == 0 then core.wake(me) end
    end)
  end
  while left > 0 do core.park() end
end

function Broker:_publish_group(jobs)
  local full = false
  while #jobs > 0 and not self.closed do
    local cmds = {}
    for i, job in ipairs(jobs) do cmds[i] = self:_command(job, full) end
    local replies, err = self.db:pipeline(cmds)
    if not replies then
      -- No reply at all: plain messages are gone (pub/sub would not have
      -- kept them anyway); stored ones wait for the link to come back.
      local keep = {}
      for _, job in ipairs(jobs) do
        if self.history(job[2]) then keep[#keep + 1] = job else self:_drop(1) end
      end
      if #keep == 0 then return end
      self:_status("down", "publisher", tostring(err))
      core.park(0.1)
      jobs = keep
    else
      local retry = {}
      for i, v in ipairs(replies) do
        if is_noscript(v) then
          retry[#retry + 1] = jobs[i]
        elseif type(v) == "table" and v.err then
          self:_drop(1)
          self:_status("error", "publisher", v.err)
        else
          self.pending = self.pending - 1
          self.stats.published = self.stats.published + 1
        end
      end
      jobs, full = retry, true
    end
  end
end

function Broker:_drop(n)
  self.pending = self.pending - n
  self.stats.dropped = self.stats.dropped + n
end

-- Incoming -----------------------------------------------------------------

-- Payload: "<node> <kind> <message>", or for a history topic
-- "<node> <KIND> <epoch> <offset> <message>".
function Broker:_incoming(topic, payload)
  local node, kind, rest = payload:match("^(%S+) (%a) (.*)$")
  if not node then return self:_status("error", "subscriber", "malformed payload on " .. topic) end
  if kind == "t" or kind == "b" then
    if node == self.node then return end
    self.stats.received = self.stats.received + 1
    return self:_deliver(topic, rest, kind == "b" and "binary" or "text")
  end
  local epoch, offset, message = rest:match("^(%S+) (%d+) (.*)$")
  if not epoch then return self:_status("error", "subscriber", "malformed payload on " .. topic) end
  if node ~= self.node then self.stats.received = self.stats.received + 1 end
  self:_sequence(topic, { epoch = epoch, offset = tonumber(offset), message = message,
    kind = kind == "B" and "binary" or "text" })
end

function Broker:_deliver(topic, message, kind, position)
  local ok, err = pcall(self.handler, topic, message, kind, position)
  if not ok then self:_status("error", "subscriber", "message handler failed: " .. tostring(err)) end
end

local function position_of(pub) return { epoch = pub.epoch, offset = pub.offset } end

-- In order, once: a publication right after the last one goes out; one
-- from the past is a duplicate; one beyond a gap, or of a new epoch, waits
-- while the stream is read (the read says where the new epoch starts).
function Broker:_sequence(topic, pub)
  if not self.topics[topic] then return end
  local st = self.seq[topic]
  if not st then
    st = { epoch = pub.epoch, offset = pub.offset - 1 }
    self.seq[topic] = st
  end
  if st.catching then
    table.insert(st.catching, pub)
    return
  end
  if pub.epoch ~= st.epoch then
    if pub.epoch == st.previous then return end -- superseded already
    st.catching = { pub }
    return self:_kick("catch_up")
  end
  if pub.offset <= st.offset then return end
  if pub.offset > st.offset + 1 then
    st.catching = { pub }
    return self:_kick("catch_up")
  end
  st.offset = pub.offset
  self:_deliver(topic, pub.message, pub.kind, position_of(pub))
end

local function publications(entries)
  local out = {}
  for i, e in ipairs(entries) do
    local f = {}
    for j = 1, #e[2], 2 do f[e[2][j]] = e[2][j + 1] end
    out[i] = { offset = tonumber(e[1]:match("^(%d+)")), message = f.d,
      kind = f.k == "B" and "binary" or "text" }
  end
  return out
end

-- Where a history topic stands before this node relays it: what comes
-- after is this node's to deliver, so that a publication missed before the
-- first one it hears (its link down meanwhile) is caught up like any
-- other. Read before subscribing: one published in between shows as a gap.
function Broker:_start_at(topic)
  local h = self:_read(topic)
  if h then self.seq[topic] = { epoch = h.epoch or "", offset = h.offset } end
end

function Broker:_read(topic, after)
  local v, err = run_script(self.db, READ, { tagged(self, topic, ":m"), tagged(self, topic, ":h") },
    { after and tostring(after) or "" })
  if v == nil then return nil, err end
  return { epoch = v[1] ~= "" and v[1] or nil, offset = v[2], publications = publications(v[3]),
    previous = v[4] ~= "" and v[4] or nil, base = v[5] }
end

-- Read the stream after the last offset delivered, deliver what it holds,
-- then what came live meanwhile. Should Redis not answer (the subscriber
-- is back before the command connection), live publications go on
-- without waiting for it; what waits is read again half a second later,
-- not in a tight loop.
function Broker:_catch_up(topic, st)
  st.catching = st.catching or {}
  local h = self:_read(topic, st.offset)
  if h and h.epoch and h.epoch ~= st.epoch then
    st.previous = st.epoch
    if h.previous == st.epoch and st.offset <= h.base then
      -- another server took over with everything this node delivered:
      -- the same offsets go on in the new epoch
      st.epoch = h.epoch
    else
      -- The history this node knew is gone (expired, Redis restarted
      -- empty), or the server that took over lost publications this node
      -- delivered: what it missed is all of the new epoch.
      if st.previous ~= "" then self.stats.gaps = self.stats.gaps + 1 end
      st.epoch, st.offset = h.epoch, h.base
      h = self:_read(topic, h.base)
    end
  end
  if not h then
    if #st.catching == 0 then
      st.catching = nil
    elseif not self.retrying then
      self.retrying = true
      core.spawn(function()
        core.sleep(0.5)
        self.retrying = false
        self:_kick("catch_up")
      end)
    end
    return
  end
  if h.epoch == st.epoch then
    local first = h.publications[1]
    if first and first.offset > st.offset + 1 then self.stats.gaps = self.stats.gaps + 1 end
    for _, pub in ipairs(h.publications) do
      if pub.offset > st.offset then
        pub.epoch, st.offset = st.epoch, pub.offset
        self.stats.recovered = self.stats.recovered + 1
        self:_deliver(topic, pub.message, pub.kind, position_of(pub))
      end
    end
  end
  local later = st.catching
  st.catching = nil
  for _, pub in ipairs(later) do
    -- Read after these came, the stream's epoch is the newest: one of
    -- another epoch was superseded (and would ask for this read again).
    if pub.epoch == st.epoch then
      if pub.offset > st.offset + 1 then
        -- beyond what the stream still covers: delivered, the gap counted
        self.stats.gaps = self.stats.gaps + 1
        st.offset = pub.offset - 1
      end
      self:_sequence(topic, pub)
    end
  end
end

-- The broker contract ----------------------------------------------------

--- Relay topic from the other nodes (hub:subscribe calls it for a new topic).
---@param topic string
function Broker:subscribe(topic)
  if self.topics[topic] then return end
  self.topics[topic] = true
  self.queue[#self.queue + 1] = { "subscribe", topic }
  self:_kick()
end

--- Stop relaying topic.
---@param topic string
function Broker:unsubscribe(topic)
  if not self.topics[topic] then return end
  self.topics[topic] = nil
  self.queue[#self.queue + 1] = { "unsubscribe", topic }
  self:_kick()
end

--- Send a message to the other nodes (and, for a history topic, to this
--- one too, with its position). Never waits: it is queued, and false is
--- returned when it was dropped instead (Redis away for a plain topic, or
--- max_pending publications already queued).
---@param topic string
---@param message string
---@param kind "text"|"binary"|nil
---@return boolean queued
function Broker:publish(topic, message, kind)
  local stored = self.history(topic) ~= nil
  if self.closed or self.pending >= self.max_pending or (not stored and self.up.publisher ~= "up") then
    self.stats.dropped = self.stats.dropped + 1
    return false
  end
  self.pending = self.pending + 1
  self.queue[#self.queue + 1] = { "publish", topic, message, kind }
  self:_kick()
  return true
end

--- The stored publications of a history topic after offset (nil: none,
--- the position only). Waits for Redis.
---@param topic string
---@param after integer|nil
---@return duplex.History|nil history, string|nil err
function Broker:read(topic, after)
  if not self:has_history(topic) then error("broker:read: topic " .. topic .. " has no history", 2) end
  return blocking(function()
    if not self.db then return nil, "not connected" end
    return self:_read(topic, after)
  end)
end

-- Presence -----------------------------------------------------------------

local function presence_keys(self, topic)
  return { tagged(self, topic, ":p"), tagged(self, topic, ":pi") }
end

local function member_key(self, id) return self.node .. " " .. id end

--- Add id (with info, a string) to topic's members, on every node's list.
--- A member joined twice on this node (two tabs) leaves after two leaves.
---@param topic string
---@param id string
---@param info string|nil
function Broker:join(topic, id, info)
  if self.roster:join(topic, id, info, "broker:join") then
    self:_refresh(topic, { member_key(self, id), info or "" })
  end
end

--- One leave per join.
---@param topic string
---@param id string
function Broker:leave(topic, id)
  if not self.roster:leave(topic, id) then return end
  local keys = presence_keys(self, topic)
  self.queue[#self.queue + 1] = { "leave", { { "ZREM", keys[1], member_key(self, id) },
    { "HDEL", keys[2], member_key(self, id) } } }
  self:_kick()
end

function Broker:_refresh(topic, members)
  local args = { self.presence_ttl }
  table.move(members, 1, #members, 2, args)
  self.queue[#self.queue + 1] = { "presence", presence_keys(self, topic), args }
  self:_kick()
end

-- Every presence_ttl / 3: this node's members refreshed room by room, and
-- the history topics whose catch-up could not read the stream tried again;
-- with a client of the caller's, whose outages we do not hear of, every
-- history topic's stream is checked for what pub/sub did not bring.
function Broker:_heartbeat()
  for topic, room in pairs(self.roster.rooms) do
    local args = { self.presence_ttl }
    for id in pairs(room) do args[#args + 1] = member_key(self, id); args[#args + 1] = "" end
    self.queue[#self.queue + 1] = { "presence", presence_keys(self, topic), args }
  end
  self.queue[#self.queue + 1] = { "catch_up", not self.shared }
end

--- topic's members on every node: a list of { id =, info =, node = }.
---@param topic string
---@return {id: string, info: string, node: string}[]|nil members, string|nil err
function Broker:members(topic)
  return blocking(function()
    if not self.db then return nil, "not connected" end
    local keys = presence_keys(self, topic)
    local _, err = run_script(self.db, PRESENCE, keys, { self.presence_ttl })
    if err then return nil, err end
    local list, lerr = self.db:call("ZRANGE", keys[1], 0, -1)
    if not list then return nil, lerr end
    local out = {}
    if #list > 0 then
      local infos, ierr = self.db:call("HMGET", keys[2], table.unpack(list))
      if not infos then return nil, ierr end
      for i, key in ipairs(list) do
        local node, id = key:match("^(%S+) (.*)$")
        out[#out + 1] = { id = id, node = node, info = infos[i] or "" }
      end
    end
    return out
  end)
end

--- How many members topic has on every node (a member on two nodes
--- counts twice). One ZCOUNT: cheap to ask often.
---@param topic string
---@return integer|nil count, string|nil err
function Broker:count(topic)
  return blocking(function()
    if not self.db then return nil, "not connected" end
    local keys = presence_keys(self, topic)
    local ms, err = run_script(self.db, PRESENCE, keys, { self.presence_ttl })
    if not ms then return nil, err end
    return self.db:call("ZCOUNT", keys[1], "(" .. ms, "+inf")
  end)
end

--- Stop: close the connections (unless opts.client was given) and the
--- background work. This node's presence entries expire within presence_ttl.
function Broker:close()
  if self.closed then return end
  self.closed = true
  core.wake(self.worker)
end

return broker
