--- Which topics keep a history, and what a returning client missed: the
--- rules shared by every broker that stores publications (duplex.redis's
--- and the in-process one), so that recovery means the same on both.
---
--- A position is { epoch = string, offset = integer }: offsets count a
--- topic's publications from 1 within one epoch; a new epoch starts when
--- the topic's history is lost. A topic that never had a publication is at
--- { epoch = "", offset = 0 }, and a client there may recover into
--- whatever epoch comes next.
local core = require "duplex.core"
local compat = require "duplex.compat"

local history = {}

history.defaults = {
  size = 1000, -- publications kept per topic (approximately, on Redis)
  ttl = 3600,  -- seconds a topic's history outlives its last publication
}

---@class duplex.HistoryOptions
---@field match? string|fun(topic: string): boolean a Lua pattern the topic matches, or a predicate; default every topic
---@field size? integer  publications kept per topic, default 1,000
---@field ttl? integer   seconds a topic's history outlives its last publication, default 3,600

---@class duplex.Position
---@field epoch string
---@field offset integer

---@class duplex.History: duplex.Position
---@field publications {offset: integer, message: string, kind: "text"|"binary"}[]
---@field previous string|nil the epoch this one continues (another server took the history over)
---@field base integer|nil    the offset it took over at: positions up to it mean the same in both

local function rule_of(opts, who, level)
  if type(opts) ~= "table" then error(who .. ": history must be a table of options", level + 1) end
  for k in pairs(opts) do
    if k ~= "match" and k ~= "size" and k ~= "ttl" then
      error(who .. ": unknown history option '" .. tostring(k) .. "'", level + 1)
    end
  end
  local rule = { size = opts.size or history.defaults.size, ttl = opts.ttl or history.defaults.ttl }
  for _, k in ipairs { "size", "ttl" } do
    local v = rule[k]
    if not compat.is_integer(v) or v < 1 then
      error(who .. ": history." .. k .. " must be a positive integer", level + 1)
    end
  end
  local match = opts.match
  if match == nil then rule.matches = function() return true end
  elseif type(match) == "string" then rule.matches = function(topic) return topic:find(match) ~= nil end
  elseif type(match) == "function" then rule.matches = match
  else error(who .. ": history.match must be a Lua pattern or a function", level + 1) end
  return rule
end

--- The rule for each topic: a function topic -> { size, ttl } or nil.
--- opts: nil (no history), one rule's options, or a list of them (the
--- first that matches applies).
---@param opts duplex.HistoryOptions|duplex.HistoryOptions[]|nil
---@return fun(topic: string): {size: integer, ttl: integer}|nil
function history.rules(opts, who, level)
  if opts == nil then return function() return nil end end
  local list = {}
  if type(opts) == "table" and opts[1] ~= nil then
    for i, o in ipairs(opts) do list[i] = rule_of(o, who, level + 1) end
  else
    list[1] = rule_of(opts, who, level + 1)
  end
  return function(topic)
    for _, rule in ipairs(list) do
      if rule.matches(topic) then return rule end
    end
  end
end

--- What a client last at since (nil: a first visit) gets from h, a read of
--- the topic's history after since.offset: the position to hand it, and
--- either every publication it missed, in order, or recovered = false with
--- the reason (the epoch changed, the history no longer reaches back).
---@param h duplex.History
---@param since duplex.Position|nil
---@return {epoch: string, offset: integer, recovered: boolean|nil, reason: string|nil, publications: table}
function history.recovery(h, since)
  local result = { epoch = h.epoch or "", offset = h.offset, publications = {} }
  if not since then return result end
  local fresh = since.epoch == "" and since.offset == 0
  if h.previous and since.epoch == h.previous and since.epoch ~= result.epoch then
    if since.offset > h.base then
      result.recovered = false
      result.reason = "publications after offset " .. h.base .. " were lost when another Redis server took over"
      return result
    end
    since = { epoch = result.epoch, offset = since.offset }
  end
  if since.epoch ~= result.epoch and not fresh then
    result.recovered = false
    result.reason = result.epoch == "" and "the history expired" or "the history was reset (new epoch)"
    return result
  end
  if since.offset > h.offset then
    result.recovered, result.reason = false, "offset " .. since.offset .. " is beyond the history"
    return result
  end
  local want = since.offset + 1
  for _, pub in ipairs(h.publications) do
    if pub.offset >= want then
      if pub.offset ~= want then break end
      result.publications[#result.publications + 1] = pub
      want = want + 1
    end
  end
  if want ~= h.offset + 1 then
    result.recovered, result.publications = false, {}
    result.reason = "the history no longer reaches back to offset " .. since.offset
    return result
  end
  result.recovered = true
  return result
end

--- A position from its text form "epoch:offset" (what clients send back),
--- or nil for anything else.
---@param s string|nil
---@return duplex.Position|nil
function history.parse_position(s)
  if type(s) ~= "string" then return nil end
  local epoch, offset = s:match("^([%w]*):(%d+)$")
  if not epoch or #offset > 15 then return nil end
  return { epoch = epoch, offset = tonumber(offset) }
end

--- 16 random hex digits: a new epoch (or a node's name), unlike any other.
---@return string
function history.random_id()
  return (core.random(8):gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

return history
