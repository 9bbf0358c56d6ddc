--- This node's members of each room, counted per join: a member in two
--- tabs has joined twice and leaves after two leaves. Shared by the brokers
--- that keep presence (duplex.redis's and the in-process one).
local roster = {}

local Roster = {}
Roster.__index = Roster

function roster.new() return setmetatable({ rooms = {} }, Roster) end

--- Count a join; true when id is new in topic.
function Roster:join(topic, id, info, who)
  if type(id) ~= "string" or id == "" then error(who .. ": id must be a non-empty string", 3) end
  local room = self.rooms[topic]
  if not room then room = {}; self.rooms[topic] = room end
  local m = room[id]
  if m then
    m.count = m.count + 1
    return false
  end
  room[id] = { count = 1, info = info or "" }
  return true
end

--- Count a leave; true when id has left topic for good.
function Roster:leave(topic, id)
  local room = self.rooms[topic]
  local m = room and room[id]
  if not m then return false end
  m.count = m.count - 1
  if m.count > 0 then return false end
  room[id] = nil
  if next(room) == nil then self.rooms[topic] = nil end
  return true
end

--- id -> { count, info } of topic (empty when nobody).
function Roster:room(topic) return self.rooms[topic] or {} end

return roster
