--- RESP (the Redis protocol): commands out, replies in.
---
--- The reply parser is resumable: bytes are fed as they arrive and parsing
--- goes on where it stopped, with the bytes of finished values dropped and a
--- long bulk string collected in pieces, so a reply of megabytes costs
--- linear time however it is cut into reads. Every size has a limit (bulk
--- length, element count, nesting depth): a reply past one is a protocol
--- error, and the caller drops the connection.
---
--- Values: simple strings and bulk strings as Lua strings, integers as
--- numbers, errors as { err = "..." }, null as false, arrays as lists.
local resp = {}

-- Also for Lua 5.1 (LuaJIT, inside nginx): no integer operators here.
local pack = table.pack or function(...) return { n = select("#", ...), ... } end
local tointeger = require("duplex.compat").tointeger

--- The bytes of one command.
function resp.command(...)
  local args = pack(...)
  local out = { "*" .. args.n .. "\r\n" }
  for i = 1, args.n do
    local a = tostring(args[i])
    out[#out + 1] = "$" .. #a .. "\r\n" .. a .. "\r\n"
  end
  return table.concat(out)
end

resp.defaults = { max_bulk = 64 * 1048576, max_elements = 1048576, max_depth = 16 }

local Parser = {}
Parser.__index = Parser

--- A parser with limits { max_bulk, max_elements, max_depth } (defaults above).
function resp.parser(limits)
  limits = limits or {}
  local self = setmetatable({
    buf = "", pos = 1,
    stack = {},   -- arrays being filled: { list, count }
    bulk = nil,   -- a bulk string arriving: { left = bytes, parts = {} }
  }, Parser)
  for k, v in pairs(resp.defaults) do self[k] = limits[k] or v end
  return self
end

function Parser:feed(data)
  if self.bulk then
    -- the middle of a long bulk string: pieces, not one growing string
    local b = self.bulk
    b.parts[#b.parts + 1] = data
    b.have = b.have + #data
    return
  end
  if self.pos > #self.buf then
    self.buf, self.pos = data, 1
  else
    self.buf = self.buf:sub(self.pos) .. data
    self.pos = 1
  end
end

-- A finished value: into the array being filled, or out.
function Parser:_done(v)
  local stack = self.stack
  while true do
    local top = stack[#stack]
    if not top then return v end
    local list = top[1]
    list[#list + 1] = v
    if #list < top[2] then return nil end
    stack[#stack] = nil
    v = list
  end
end

-- Bytes of a bulk string (and its CRLF) that arrived in pieces.
function Parser:_take_bulk()
  local b = self.bulk
  if b.have < b.left + 2 then return nil end
  self.bulk = nil
  local all = table.concat(b.parts)
  self.buf, self.pos = all, b.left + 3
  if all:sub(b.left + 1, b.left + 2) ~= "\r\n" then error("redis: bulk string without CRLF", 0) end
  return all:sub(1, b.left)
end

-- One step: a value (maybe nested ones finished too), nil when bytes are
-- missing. Raises on a protocol error.
function Parser:_step()
  if self.bulk then
    local s = self:_take_bulk()
    if s == nil then return nil, true end
    return self:_done(s)
  end
  local buf, pos = self.buf, self.pos
  local eol = buf:find("\r\n", pos, true)
  if not eol then
    if #buf - pos > 65536 then error("redis: a reply line longer than 64 KiB", 0) end
    return nil, true
  end
  local t, line = buf:sub(pos, pos), buf:sub(pos + 1, eol - 1)
  self.pos = eol + 2
  if t == "+" then return self:_done(line)
  elseif t == "-" then return self:_done({ err = line })
  elseif t == ":" then
    local n = tonumber(line)
    if not n then error("redis: bad integer " .. string.format("%q", line), 0) end
    return self:_done(n)
  elseif t == "$" then
    local n = tointeger(tonumber(line))
    if not n or n < -1 then error("redis: bad bulk length " .. string.format("%q", line), 0) end
    if n == -1 then return self:_done(false) end
    if n > self.max_bulk then error("redis: bulk string of " .. n .. " bytes, over max_reply", 0) end
    local start = self.pos
    if #buf >= start + n + 1 then
      if buf:sub(start + n, start + n + 1) ~= "\r\n" then error("redis: bulk string without CRLF", 0) end
      self.pos = start + n + 2
      return self:_done(buf:sub(start, start + n - 1))
    end
    local rest = buf:sub(start)
    self.bulk = { left = n, parts = { rest }, have = #rest }
    self.buf, self.pos = "", 1
    return nil, true
  elseif t == "*" then
    local n = tointeger(tonumber(line))
    if not n or n < -1 then error("redis: bad array length " .. string.format("%q", line), 0) end
    if n == -1 then return self:_done(false) end
    if n > self.max_elements then error("redis: array of " .. n .. " elements, over the limit", 0) end
    if n == 0 then return self:_done({}) end
    if #self.stack >= self.max_depth then error("redis: replies nested deeper than " .. self.max_depth, 0) end
    self.stack[#self.stack + 1] = { {}, n }
    return nil
  end
  error("redis: protocol error near " .. string.format("%q", buf:sub(pos, pos + 20)), 0)
end

--- The next whole value, or nil when more bytes are needed; nil, err for a
--- reply that breaks the protocol or a limit (the parser is then unusable).
function Parser:next()
  if self.failed then return nil, self.failed end
  while true do
    local ok, v, more = pcall(self._step, self)
    if not ok then
      self.failed = tostring(v)
      return nil, self.failed
    end
    if v ~= nil then return v end
    if more then return nil end
  end
end

--- Bytes held that are not part of a finished value.
function Parser:buffered()
  if self.bulk then return self.bulk.have end
  return #self.buf - self.pos + 1
end

return resp
