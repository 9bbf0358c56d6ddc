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
    topics = {},      -- topic -> { [ws] = true }
    counts = {},      -- topic -> number of subscribers
    of = setmetatable({}, { __mode = "k" }), -- ws -> { [topic] = true }
    max_backlog = opts.max_backlog or (1 << 20),
    overflow = overflow,
    on_drop = opts.on_drop,
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
  subs[ws] = true
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
  if n == 0 then
    self.topics[topic] = nil
    self.counts[topic] = nil
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

--- Deliver to this process's subscribers only, not through the broker
--- (what the broker calls with the other nodes' messages). Returns the
--- number reached.
---@param topic string
---@param message string
---@param kind "text"|"binary"|nil
---@return integer
function Hub:deliver(topic, message, kind)
  local subs = self.topics[topic]
  if not subs then return 0 end
  kind = kind or "text"
  local frame = core.encode_frame(message, kind)
  local compressed = {} -- window bits -> frame compressed once for all
  local limit, n = self.max_backlog, 0
  for ws in pairs(subs) do
    if ws.state ~= "open" then
      self:unsubscribe(ws, topic)
    elseif ws:buffered() > limit and ws:try_flush() > limit then
      overflow(self, ws, topic)
    elseif ws.role == "server" then
      local f = frame
      local p = ws.deflate_params
      -- Connections without server context takeover all accept the same
      -- compressed bytes; the others get the plain frame (also valid).
      if p and p.server_no_context_takeover and #message >= ws.compress_threshold then
        local bits = p.server_max_window_bits
        f = compressed[bits]
        if not f then
          f = core.encode_frame(message, kind, true, bits)
          compressed[bits] = f
          self.stats.compressed = self.stats.compressed + 1
        end
      end
      if ws:send_frame(f) then n = n + 1 end
    elseif ws:send(message, kind) then -- client frames are masked one by one
      n = n + 1
    end
  end
  self.stats.delivered = self.stats.delivered + n
  return n
end

--- Publish to every subscriber of topic, here and, with a broker, on the
--- other nodes. Returns the number of local subscribers reached.
---@param topic string
---@param message string
---@param kind "text"|"binary"|nil
---@return integer
function Hub:publish(topic, message, kind)
  if type(topic) ~= "string" or type(message) ~= "string" then
    error("publish: topic and message must be strings", 2)
  end
  self.stats.published = self.stats.published + 1
  -- Local subscribers never wait for the broker, and never lose messages
  -- while it is away; the broker drops our own messages when they come back.
  if self.broker then self.broker:publish(topic, message, kind or "text") end
  return self:deliver(topic, message, kind)
end

--- Relay topics through a broker (duplex.redis): messages published on any
--- node reach subscribers on every node.
---@param broker duplex.Broker
function Hub:attach_broker(broker)
  self.broker = broker
  broker:on_message(function(topic, message, kind) self:deliver(topic, message, kind) end)
  for topic in pairs(self.topics) do broker:subscribe(topic) end
end

return pubsub
