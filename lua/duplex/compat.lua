--- What Lua 5.4 has and LuaJIT (Lua 5.1, inside nginx) lacks, for the
--- modules that run on both. LuaJIT numbers are doubles: an integer there
--- is a whole number within 2^53.
local compat = {}

local function whole(x)
  return type(x) == "number" and x % 1 == 0 and x >= -2 ^ 53 and x <= 2 ^ 53
end

--- x as an integer if it is one (math.tointeger), else nil.
---@param x any
---@return integer|nil
compat.tointeger = math.tointeger or function(x)
  if whole(x) then return x end
end

--- Whether x is an integer (math.type(x) == "integer" on Lua 5.4).
---@param x any
---@return boolean
compat.is_integer = math.type and function(x) return math.type(x) == "integer" end or whole

return compat
