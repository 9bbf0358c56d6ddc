--- Topics (rooms) in one process: subscribe connections, publish once.
---
--- publish() encodes the frame once and queues the same bytes on every
--- subscriber. A subscriber whose send buffer is over max_backlog never holds
--- up the others: it is closed (policy "close", code 1008) or misses the
--- message (policy "drop", counted in ws.dropped and reported to on_drop).
--- Before that verdict its socket gets a chance to write what the kernel
--- takes at once, so that only a backlog the peer really leaves unread
--- counts, not what one busy loop pass queued.
local core = require "duplex.core"
local history = require "duplex.pubsub.history"
local compat = require "duplex.compat"

local pubsub = {}

---@class duplex.Hub
---@field stats {published: integer, delivered: integer, dropped: integer, closed: integer, compressed: integer}
local Hub = {}
Hub.__index = Hub

--- What a hub needs of a broker (duplex.redis is one): it relays the
--- topics this node has subscribers for between nodes.
---@class duplex.Broker
---@field subscribe fun(self: duplex.Broker, topic: string) this node has subscribers for topic now
---@field unsubscribe fun(self: duplex.Broker, topic: string) ... and no longer
---@field publish fun(self: duplex.Broker, topic: string, message: string, kind: string): boolean to the other nodes
---@field on_message fun(self: duplex.Broker, fn: fun(topic: string, message: string, kind: "text"|"binary")) from them

---@class duplex.HubOptions
---@field max_backlog? integer        a subscriber with more queued bytes overflows, default 1 MiB
---@field overflow? "close"|"drop"    what overflowing does: close (1008, default) or skip the message
---@field on_drop? fun(ws: duplex.WebSocket, topic: string) with overflow = "drop": a message was skipped
---@field broker? duplex.Broker       as hub:attach_broker(broker)
---@field format? fun(topic: string, message: string, position: duplex.Position): string
--- what a subscriber of a history topic is sent (default: the message), e.g. with its position

--- A hub of topics.
---@param opts duplex.HubOptions|nil
---@return duplex.Hub
function pubsub.new(opts)
  opts = opts or {}
  local overflow = opts.overflow or "close"
  if overflow ~= "close" and overflow ~= "drop" then
    error("pubsub.new: overflow must be \"close\" or \"drop\"", 2)
  end
  local hub = setmetatable({
    topics = {},      -- topic -> { [ws] = its engine }
    counts = {},      -- topic -> number of subscribers
    of = setmetatable({}, { __mode = "k" }), -- ws -> { [topic] = true }
    max_backlog = opts.max_backlog or 1048576,
    overflow = overflow,
    on_drop = opts.on_drop,
    format = opts.format,
    sync = {},        -- history topic -> { [ws] = last offset sent, or a list while it recovers }
    epochs = {},      -- history topic -> the epoch of those offsets
    stats = { published = 0, delivered = 0, dropped = 0, closed = 0, compressed = 0 },
  }, Hub)
  if opts.broker then hub:attach_broker(opts.broker) end
  return hub
end

--- Add ws to topic's subscribers (again: no effect).
---@param ws duplex.WebSocket
---@param topic string
function Hub:subscribe(ws, topic)
  local subs = self.topics[topic]
  if not subs then
    subs = {}
    self.topics[topic] = subs
    self.counts[topic] = 0
    if self.broker then self.broker:subscribe(topic) end
  end
  if subs[ws] then return end
  -- its engine: what core.fan_out queues a broadcast on
  subs[ws] = ws.engine or true
  self.counts[topic] = self.counts[topic] + 1
  local mine = self.of[ws]
  if not mine then mine = {}; self.of[ws] = mine end
  mine[topic] = true
end

--- Remove ws from topic's subscribers.
---@param ws duplex.WebSocket
---@param topic string
function Hub:unsubscribe(ws, topic)
  local subs = self.topics[topic]
  if not subs or not subs[ws] then return end
  subs[ws] = nil
  local n = self.counts[topic] - 1
  self.counts[topic] = n
  if self.of[ws] then self.of[ws][topic] = nil end
  if self.sync[topic] then self.sync[topic][ws] = nil end
  if n == 0 then
    self.topics[topic] = nil
    self.counts[topic] = nil
    self.sync[topic], self.epochs[topic] = nil, nil
    if self.broker then self.broker:unsubscribe(topic) end
  end
end

--- Remove a connection from every topic (call when it ends).
---@param ws duplex.WebSocket
function Hub:unsubscribe_all(ws)
  local mine = self.of[ws]
  if not mine then return end
  for topic in pairs(mine) do self:unsubscribe(ws, topic) end
  self.of[ws] = nil
end

--- This process's subscriber count of topic.
---@param topic string
---@return integer
function Hub:subscribers(topic) return self.counts[topic] or 0 end

local function overflow(self, ws, topic)
  if self.overflow == "close" then
    self.stats.closed = self.stats.closed + 1
    ws:close_slow_consumer("subscriber backlog over max_backlog on topic " .. tostring(topic))
    self:unsubscribe_all(ws)
  else
    self.stats.dropped = self.stats.dropped + 1
    ws.dropped = (ws.dropped or 0) + 1
    if self.on_drop then self.on_drop(ws, topic) end
  end
end

-- A history topic's offsets sent so far, per subscriber; a new epoch
-- starts them over.
function Hub:_offsets(topic, epoch)
  local sync = self.sync[topic]
  if not sync then sync = {}; self.sync[topic] = sync end
  if self.epochs[topic] ~= epoch then
    self.epochs[topic] = epoch
    for ws, last in pairs(sync) do
      if type(last) == "number" then sync[ws] = 0 end
    end
  end
  return sync
end

function Hub:_format(topic, message, position)
  if not self.format then return message end
  return self.format(topic, message, position)
end

-- core.fan_out's stand-in where the loop's sockets are not built in (the
-- LuaJIT build, inside nginx): every subscriber is left to the one by one.
local function none_in_c(_, subs)
  local all = {}
  for ws in pairs(subs) do all[#all + 1] = ws end
  return 0, all
end

--- Deliver to this process's subscribers only, not through the broker
--- (what the broker calls with the other nodes' messages). Returns the
--- number reached. With a position (a history topic's publication), each
--- subscriber gets it once, after what it recovered, formatted by opts.format.
---@param topic string
---@param message string
---@param kind "text"|"binary"|nil
---@param position duplex.Position|nil
---@return integer
function Hub:deliver(topic, message, kind, position)
  local subs = self.topics[topic]
  if not subs then return 0 end
  kind = kind or "text"
  local out = { message = message, kind = kind, compressed = {} } -- window bits -> frame compressed once for all
  if position then
    out.position, out.sync = position, self:_offsets(topic, position.epoch)
    out.message = self:_format(topic, message, position)
  end
  out.frame = core.encode_frame(out.message, kind)
  local n = 0
  if position then
    -- each subscriber's offset is its own: one by one
    for ws in pairs(subs) do n = n + self:_deliver_one(ws, topic, out) end
  else
    -- the plain subscribers in C, in one call; the rest one by one
    local others
    n, others = (core.fan_out or none_in_c)(out.frame, subs, self.max_backlog)
    if others then
      for _, ws in ipairs(others) do n = n + self:_deliver_one(ws, topic, out) end
    end
  end
  self.stats.delivered = self.stats.delivered + n
  return n
end

-- One subscriber's share of a delivery (out: the frame, the message, its
-- kind and position, the offsets, the frames compressed so far): 1 when
-- it was sent the message (or had it already), else 0.
function Hub:_deliver_one(ws, topic, out)
  local sync, position = out.sync, out.position
  local last = sync and sync[ws]
  if type(last) == "table" then -- recovering: sent once what it missed is
    last[#last + 1] = { message = out.message, kind = out.kind, position = position }
    return 0
  elseif last and position.offset <= last then -- recovered already
    return 1
  elseif ws.state ~= "open" then
    self:unsubscribe(ws, topic)
    return 0
  elseif ws:buffered() > self.max_backlog and ws:try_flush() > self.max_backlog then
    overflow(self, ws, topic)
    return 0
  end
  if sync then sync[ws] = position.offset end
  if ws.role ~= "server" then -- client frames are masked one by one
    return ws:send(out.message, out.kind) and 1 or 0
  end
  local f = out.frame
  local p = ws.deflate_params
  -- Connections without server context takeover all accept the same
  -- compressed bytes; the others get the plain frame (also valid).
  if p and p.server_no_context_takeover and #out.message >= ws.compress_threshold then
    local bits = p.server_max_window_bits
    f = out.compressed[bits]
    if not f then
      f = core.encode_frame(out.message, out.kind, true, bits)
      out.compressed[bits] = f
      self.stats.compressed = self.stats.compressed + 1
    end
  end
  return ws:send_frame(f) and 1 or 0
end

--- Publish to every subscriber of topic, here and, with a broker, on the
--- other nodes. Returns the number of local subscribers reached. A history
--- topic's publication reaches this node's subscribers too when it comes
--- back from the broker with its position, as on every node, so that all
--- see one order; it returns the number that it will reach (0 if the
--- broker dropped it).
---@param topic string
---@param message string
---@param kind "text"|"binary"|nil
---@return integer
function Hub:publish(topic, message, kind)
  if type(topic) ~= "string" or type(message) ~= "string" then
    error("publish: topic and message must be strings", 2)
  end
  self.stats.published = self.stats.published + 1
  local broker = self.broker
  if broker and broker.has_history and broker:has_history(topic) then
    if not broker:publish(topic, message, kind or "text") then return 0 end
    return self:subscribers(topic)
  end
  -- Local subscribers never wait for the broker, and never lose messages
  -- while it is away; the broker drops our own messages when they come back.
  if broker then broker:publish(topic, message, kind or "text") end
  return self:deliver(topic, message, kind)
end

---@class duplex.Recovery: duplex.Position
---@field recovered boolean|nil true: nothing missed; false: see reason; nil: there was no since
---@field reason string|nil
---@field missed integer        publications sent from the history

local function check_position(since)
  return since == nil or (type(since) == "table" and type(since.epoch) == "string"
    and compat.is_integer(since.offset) and since.offset >= 0)
end

--- Subscribe ws to a history topic and send it, in order and once, what it
--- missed since its last position `since` (nil: a first visit, nothing to
--- recover), then the live publications. Waits for the broker. Returns the
--- position reached (to hand to the client), with recovered = true when
--- nothing was missed, or false and a reason when the history no longer
--- covers the gap (the client should reload); nil, err when the broker
--- could not be read (ws is subscribed and gets the live ones).
---@param ws duplex.WebSocket
---@param topic string
---@param since duplex.Position|nil
---@return duplex.Recovery|nil result, string|nil err
function Hub:recover(ws, topic, since)
  local broker = self.broker
  if not (broker and broker.has_history and broker:has_history(topic)) then
    error("recover: topic " .. tostring(topic) .. " has no history (see the broker's history option)", 2)
  end
  if not check_position(since) then error("recover: since must be { epoch = string, offset = integer } or nil", 2) end
  self:subscribe(ws, topic)
  local waiting = {}
  self:_offsets(topic, self.epochs[topic])[ws] = waiting
  local h, err = broker:read(topic, since and since.offset)
  local sync = self.sync[topic]
  if not sync or sync[ws] ~= waiting then return nil, "unsubscribed while recovering" end
  local result, last, epoch = nil, 0, nil
  if h then
    result = history.recovery(h, since)
    result.missed = #result.publications
    epoch, last = result.epoch, result.offset
    for _, pub in ipairs(result.publications) do
      ws:send(self:_format(topic, pub.message, { epoch = epoch, offset = pub.offset }), pub.kind)
    end
    result.publications = nil
  end
  -- What came live meanwhile, after what the read covered.
  for _, p in ipairs(waiting) do
    if p.position.epoch ~= epoch or p.position.offset > last then
      ws:send(p.message, p.kind)
      epoch, last = p.position.epoch, p.position.offset
    end
  end
  -- The newest epoch seen is the one the offsets count in (an older one
  -- could only come from a publication already superseded).
  if epoch and epoch ~= self.epochs[topic] then self:_offsets(topic, epoch) end
  sync[ws] = last
  if not result then return nil, err end
  result.epoch, result.offset = epoch, math.max(last, result.offset)
  return result
end

--- Relay topics through a broker (duplex.redis): messages published on any
--- node reach subscribers on every node.
---@param broker duplex.Broker
function Hub:attach_broker(broker)
  self.broker = broker
  broker:on_message(function(topic, message, kind, position) self:deliver(topic, message, kind, position) end)
  for topic in pairs(self.topics) do broker:subscribe(topic) end
end

--- The in-process broker (history and presence without Redis).
pubsub.memory_broker = require("duplex.pubsub.memory").broker

--- A position from its text form "epoch:offset" (as a client sends it
--- back, e.g. in the URL's query), or nil when it is not one.
---@type fun(s: string|nil): duplex.Position|nil
pubsub.parse_position = history.parse_position

return pubsub
