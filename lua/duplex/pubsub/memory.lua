--- The broker of a hub that is alone: history and presence in this
--- process, with the contract of duplex.redis's broker, so that a server
--- written for several nodes runs on one with nothing else to start (the
--- chat demo without --redis). There are no other nodes: plain topics need
--- nothing of it; history topics get their positions here.
local core = require "duplex.core"
local history = require "duplex.pubsub.history"
local roster = require "duplex.pubsub.roster"

local memory = {}

---@class duplex.MemoryBroker: duplex.Broker
---@field stats {published: integer}
local Broker = {}
Broker.__index = Broker

---@class duplex.MemoryBrokerOptions
---@field history? duplex.HistoryOptions|duplex.HistoryOptions[] topics whose publications are kept, for recovery

--- A broker for one process.
---@param opts duplex.MemoryBrokerOptions|nil
---@return duplex.MemoryBroker
function memory.broker(opts)
  opts = opts or {}
  for k in pairs(opts) do
    if k ~= "history" then error("pubsub.memory_broker: unknown option '" .. tostring(k) .. "'", 2) end
  end
  return setmetatable({
    history = history.rules(opts.history, "pubsub.memory_broker", 2),
    streams = {}, -- topic -> { epoch, offset, first, entries, expires }
    roster = roster.new(),
    counts = {},  -- topic -> members
    handler = function() end,
    stats = { published = 0 },
  }, Broker)
end

function Broker:on_message(fn) self.handler = fn end
function Broker:has_history(topic) return self.history(topic) ~= nil end
function Broker.subscribe() end
function Broker.unsubscribe() end

-- The topic's stream, unless its ttl ran out (then its history is gone,
-- and the next publication starts a new epoch).
function Broker:_stream(topic)
  local s = self.streams[topic]
  if s and s.expires <= core.now() then
    self.streams[topic] = nil
    s = nil
  end
  return s
end

function Broker:publish(topic, message, kind)
  local rule = self.history(topic)
  if not rule then return true end
  local s = self:_stream(topic)
  if not s then
    s = { epoch = history.random_id(), offset = 0, first = 1, entries = {} }
    self.streams[topic] = s
  end
  s.offset = s.offset + 1
  s.entries[s.offset] = { offset = s.offset, message = message, kind = kind or "text" }
  while s.offset - s.first + 1 > rule.size do
    s.entries[s.first] = nil
    s.first = s.first + 1
  end
  s.expires = core.now() + rule.ttl
  self.stats.published = self.stats.published + 1
  self.handler(topic, message, kind or "text", { epoch = s.epoch, offset = s.offset })
  return true
end

function Broker:read(topic, after)
  if not self:has_history(topic) then error("broker:read: topic " .. topic .. " has no history", 2) end
  local s = self:_stream(topic)
  if not s then return { offset = 0, publications = {} } end
  local pubs = {}
  if after then
    for i = math.max(after + 1, s.first), s.offset do pubs[#pubs + 1] = s.entries[i] end
  end
  return { epoch = s.epoch, offset = s.offset, publications = pubs }
end

function Broker:join(topic, id, info)
  if self.roster:join(topic, id, info, "broker:join") then self.counts[topic] = (self.counts[topic] or 0) + 1 end
end

function Broker:leave(topic, id)
  if not self.roster:leave(topic, id) then return end
  local n = self.counts[topic] - 1
  self.counts[topic] = n > 0 and n or nil
end

function Broker:members(topic)
  local out = {}
  for id, m in pairs(self.roster:room(topic)) do out[#out + 1] = { id = id, info = m.info, node = "local" } end
  return out
end

function Broker:count(topic) return self.counts[topic] or 0 end

function Broker.close() end

return memory
