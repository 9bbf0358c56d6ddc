--- A Redis pub/sub broker for duplex.pubsub, so that rooms span processes.
---
--- RESP spoken over duplex's own non-blocking sockets (the lua-resty-redis
--- approach): no extra C dependency, and the event loop never blocks on
--- Redis. Two connections: one SUBSCRIBEd (Redis allows nothing else on it),
--- one for PUBLISH. Each reconnects with exponential backoff and the
--- subscriber re-subscribes to every topic; outages are reported to
--- on_status. While Redis is away, messages still reach subscribers on the
--- publishing node, but other nodes miss them (Redis pub/sub stores nothing).
local core = require "duplex.core"
local url = require "duplex.url"
local resp = require "duplex.resp"

local redis = {}

local command = resp.command
redis._command = command
--- A general Redis client: commands, pipelines, pub/sub (duplex/redis/client.lua).
---@type fun(url_or_opts: string|table): duplex.RedisClient|nil, string|nil
redis.connect = require("duplex.redis.client").connect
--- A Redis Cluster client: slots, redirects, failover (duplex/redis/cluster.lua).
---@type fun(opts: duplex.RedisClusterOptions|string): duplex.RedisCluster|nil, string|nil
redis.cluster = require("duplex.redis.cluster").connect
--- The cluster slot of a key: CRC16 of its {hash tag} or of all of it, mod 16384.
---@type fun(key: string): integer
redis.slot = require("duplex.redis.cluster").slot

-- A connection that yields RESP values; authenticates when the URL says so.
-- Pub/sub channels are global to a Redis server, so no SELECT is needed.
local function connect(cfg)
  local sock, err = core.connect { host = cfg.host, port = cfg.port, timeout = cfg.connect_timeout }
  if not sock then return nil, err end
  if cfg.tls_context then
    local ok, terr = sock:starttls(cfg.tls_context, { servername = cfg.servername }, cfg.connect_timeout)
    if not ok then sock:close(); return nil, "TLS handshake failed: " .. tostring(terr) end
  end
  local parser = resp.parser { max_bulk = cfg.max_reply }
  local conn = { sock = sock }
  function conn.read(timeout)
    while true do
      local v, perr = parser:next()
      if v ~= nil then return v end
      if perr then return nil, perr end
      -- every size has a limit: a reply that never ends is an error
      if parser:buffered() > cfg.max_reply then return nil, "Redis reply larger than max_reply" end
      local data, rerr = sock:read(nil, timeout)
      if not data then return nil, rerr end
      parser:feed(data)
    end
  end
  local function call(...)
    sock:write(command(...))
    local v, rerr = conn.read(cfg.connect_timeout)
    if v == nil then return nil, rerr end
    if type(v) == "table" and v.err then return nil, v.err end
    return v
  end
  if cfg.password then
    local ok, aerr
    if cfg.user then ok, aerr = call("AUTH", cfg.user, cfg.password)
    else ok, aerr = call("AUTH", cfg.password) end
    if not ok then sock:close(); return nil, "AUTH failed: " .. tostring(aerr) end
  end
  -- A server that accepts connections but never answers (hung, or stopped)
  -- must not count as up.
  local pong, perr = call("PING")
  if not pong then sock:close(); return nil, "no answer to PING: " .. tostring(perr) end
  return conn
end

-- The broker ---------------------------------------------------------------

---@class duplex.RedisBroker: duplex.Broker
---@field stats {published: integer, received: integer, dropped: integer, reconnects: integer}
local Broker = {}
Broker.__index = Broker

local function parse_url(s)
  s = s or "redis://127.0.0.1:6379"
  local u, err = url.parse((s:gsub("^rediss?://", "http://")))
  if not u then return nil, "invalid Redis URL: " .. tostring(err) end
  local cfg = { host = u.host, port = u.default_port and 6379 or u.port, tls = s:match("^rediss://") ~= nil }
  if u.userinfo then
    -- redis://password@host, redis://:password@host, redis://user:password@host
    local user, pass = url.credentials(u)
    if pass then cfg.user, cfg.password = user ~= "" and user or nil, pass
    else cfg.password = user end
  end
  return cfg
end

---@class duplex.RedisOptions
---@field url? string                 redis://[user:pass@]host:port or rediss://, default redis://127.0.0.1:6379
---@field prefix? string              prepended to channel names, default "duplex:"
---@field on_status? fun(status: "up"|"down"|"error", detail: string)
---@field backoff_min? number         first reconnect delay, default 0.1 s
---@field backoff_max? number         the delay doubles up to this, default 5 s
---@field ping_interval? number       PING a link silent this long, default 5 s; 0 = never
---@field connect_timeout? number     default 5 s
---@field tls? {ca: string|nil, servername: string|nil, verify: boolean|nil} for rediss://
---@field max_reply? integer          largest reply, default 64 MiB
---@field node_id? string             this node's name in payloads (no spaces), default random

--- Create a broker and start connecting (in the background).
--- A rediss:// URL connects with TLS, verified against the system's CAs or
--- opts.tls.ca (opts.tls = {ca =, servername =, verify = false}).
---@param opts duplex.RedisOptions|nil
---@return duplex.RedisBroker|nil broker, string|nil err
function redis.broker(opts)
  opts = opts or {}
  local cfg, err = parse_url(opts.url)
  if not cfg then return nil, err end
  cfg.connect_timeout = opts.connect_timeout or 5
  cfg.max_reply = opts.max_reply or (64 << 20)
  if cfg.tls then
    local tls = opts.tls or {}
    local ctx, terr = core.tls_context { mode = "client", ca = tls.ca, verify = tls.verify ~= false }
    if not ctx then return nil, "TLS setup failed: " .. tostring(terr) end
    cfg.tls_context, cfg.servername = ctx, tls.servername or cfg.host
  end
  local self = setmetatable({
    cfg = cfg,
    prefix = opts.prefix or "duplex:",
    node = opts.node_id or (core.random and (core.random(8):gsub(".", function(c)
      return string.format("%02x", c:byte()) end))) or tostring(math.random(1 << 30)),
    topics = {},
    on_status = opts.on_status or function() end,
    backoff_min = opts.backoff_min or 0.1,
    backoff_max = opts.backoff_max or 5,
    ping_interval = opts.ping_interval or 5,
    handler = function() end,
    stats = { published = 0, received = 0, dropped = 0, reconnects = 0 },
    up = { sub = false, pub = false },
  }, Broker)
  self.sub_co = core.spawn(self._subscriber, self)
  self.pub_co = core.spawn(self._publisher, self)
  return self
end

--- Where messages from the other nodes go (hub:attach_broker sets it).
---@param fn fun(topic: string, message: string, kind: "text"|"binary")
function Broker:on_message(fn) self.handler = fn end

function Broker:_status(which, up, detail)
  if self.up[which] == up then return end
  self.up[which] = up
  self.on_status(up and "up" or "down", which .. (detail and (": " .. detail) or ""))
end

-- Connect with exponential backoff until it works or the broker is closed.
function Broker:_connect(which)
  local delay = self.backoff_min
  while not self.closed do
    local conn, err = connect(self.cfg)
    -- close() may have come while connecting: nobody would close this one.
    if conn and self.closed then conn.sock:close(); return nil end
    if conn then return conn end
    self:_status(which, false, tostring(err))
    self.stats.reconnects = self.stats.reconnects + 1
    core.park(delay) -- rather than sleep: close() ends the wait at once
    delay = math.min(delay * 2, self.backoff_max)
  end
end

-- The next value from conn. A Redis that hangs, or a network that drops
-- everything, sends no FIN to notice: after ping_interval seconds of silence
-- ask with a PING, and give up when that is not answered as long.
function Broker:_read(conn)
  local interval = self.ping_interval > 0 and self.ping_interval or nil
  local v, err = conn.read(interval)
  if v == nil and err == "timeout" then
    conn.sock:write(command("PING"))
    v, err = conn.read(interval)
    if v == nil and err == "timeout" then err = "no answer to PING" end
  end
  return v, err
end

function Broker:_subscriber()
  while not self.closed do
    local conn = self:_connect("subscriber")
    if not conn then return end
    self.sub_conn = conn
    local channels = {}
    for topic in pairs(self.topics) do channels[#channels + 1] = self.prefix .. topic end
    if #channels > 0 then conn.sock:write(command("SUBSCRIBE", table.unpack(channels))) end
    self:_status("subscriber", true)
    while true do
      local v, err = self:_read(conn)
      if v ~= nil then v, err = self:_push(v) end
      if v == nil then
        self:_status("subscriber", false, tostring(err))
        break
      end
    end
    self.sub_conn = nil
    conn.sock:close()
  end
end

-- What the subscriber connection may receive: messages, the confirmations
-- of (un)subscribing, the answer to a PING. Anything else (an error, a
-- payload that is not a string) is a surprise: the link is dropped and
-- made again, rather than the subscriber dying with the status still "up".
local CONFIRMATIONS = { subscribe = true, unsubscribe = true, pong = true }

function Broker:_push(v)
  if type(v) ~= "table" or v.err then
    return nil, "unexpected reply on the subscriber connection: "
      .. (type(v) == "table" and tostring(v.err) or tostring(v))
  end
  if v[1] == "message" then
    if type(v[2]) ~= "string" or type(v[3]) ~= "string" then
      return nil, "malformed message push (channel and payload must be strings)"
    end
    local ok, err = pcall(self._incoming, self, v[2], v[3])
    if not ok then self.on_status("error", "message handler failed: " .. tostring(err)) end
    return true
  end
  if CONFIRMATIONS[v[1]] then return true end
  return nil, "unexpected push on the subscriber connection: " .. tostring(v[1])
end

-- Channel payload: "<node> <kind> <message>", so a node skips its own.
function Broker:_incoming(channel, payload)
  local topic = channel:sub(#self.prefix + 1)
  local node, kind, message = payload:match("^(%S+) (%a) (.*)$")
  if not node or node == self.node then return end
  self.stats.received = self.stats.received + 1
  self.handler(topic, message, kind == "b" and "binary" or "text")
end

function Broker:_publisher()
  while not self.closed do
    local conn = self:_connect("publisher")
    if not conn then return end
    self.pub_conn = conn
    self:_status("publisher", true)
    -- Replies (subscriber counts) are read and discarded, so that the
    -- socket never fills; a read error means the connection is gone.
    while true do
      local v, err = self:_read(conn)
      if v == nil then
        self:_status("publisher", false, tostring(err))
        break
      end
    end
    self.pub_conn = nil
    conn.sock:close()
  end
end

--- Relay topic from the other nodes (hub:subscribe calls it for a new topic).
---@param topic string
function Broker:subscribe(topic)
  if self.topics[topic] then return end
  self.topics[topic] = true
  if self.sub_conn then self.sub_conn.sock:write(command("SUBSCRIBE", self.prefix .. topic)) end
end

--- Stop relaying topic.
---@param topic string
function Broker:unsubscribe(topic)
  if not self.topics[topic] then return end
  self.topics[topic] = nil
  if self.sub_conn then self.sub_conn.sock:write(command("UNSUBSCRIBE", self.prefix .. topic)) end
end

--- Send a message to the other nodes. Never blocks; while Redis is
--- unreachable the message is dropped (counted in stats.dropped).
---@param topic string
---@param message string
---@param kind "text"|"binary"|nil
---@return boolean sent
function Broker:publish(topic, message, kind)
  local conn = self.pub_conn
  if not conn then
    self.stats.dropped = self.stats.dropped + 1
    return false
  end
  local payload = self.node .. " " .. (kind == "binary" and "b" or "t") .. " " .. message
  if not conn.sock:write(command("PUBLISH", self.prefix .. topic, payload)) then
    self.stats.dropped = self.stats.dropped + 1 -- the link is failing: not published
    return false
  end
  self.stats.published = self.stats.published + 1
  return true
end

--- Close both connections and stop reconnecting.
function Broker:close()
  self.closed = true
  if self.sub_conn then self.sub_conn.sock:close() end
  if self.pub_conn then self.pub_conn.sock:close() end
  core.wake(self.sub_co) -- waiting to reconnect: stop now
  core.wake(self.pub_co)
end

return redis
