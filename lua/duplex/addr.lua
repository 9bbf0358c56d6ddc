--- IP address matching for trusted proxies, and the client address behind
--- them (X-Forwarded-For).
local addr = {}

local function ipv4_bytes(s)
  local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then return nil end
  local t = { tonumber(a), tonumber(b), tonumber(c), tonumber(d) }
  for i = 1, 4 do if t[i] > 255 then return nil end end
  return t
end

local function ipv6_bytes(s)
  if not s:find(":", 1, true) then return nil end
  local v4tail = s:match(":(%d+%.%d+%.%d+%.%d+)$")
  local tail4
  if v4tail then
    tail4 = ipv4_bytes(v4tail)
    if not tail4 then return nil end
    s = s:sub(1, #s - #v4tail) .. "0:0"
  end
  local head, tail = s:match("^(.-)::(.*)$")
  local groups = {}
  local function split(part, into)
    if part == "" then return true end
    for g in (part .. ":"):gmatch("([^:]*):") do
      if not g:match("^%x%x?%x?%x?$") then return false end
      into[#into + 1] = tonumber(g, 16)
    end
    return true
  end
  if head then
    local h, t = {}, {}
    if not split(head, h) or not split(tail, t) then return nil end
    if #h + #t > 7 then return nil end
    for _, g in ipairs(h) do groups[#groups + 1] = g end
    for _ = 1, 8 - #h - #t do groups[#groups + 1] = 0 end
    for _, g in ipairs(t) do groups[#groups + 1] = g end
  else
    if not split(s, groups) or #groups ~= 8 then return nil end
  end
  local bytes = {}
  for i = 1, 8 do
    bytes[#bytes + 1] = groups[i] >> 8
    bytes[#bytes + 1] = groups[i] & 0xff
  end
  if tail4 then for i = 1, 4 do bytes[12 + i] = tail4[i] end end
  -- IPv4-mapped IPv6 (::ffff:a.b.c.d) matches IPv4 rules.
  local mapped = true
  for i = 1, 10 do if bytes[i] ~= 0 then mapped = false end end
  if mapped and bytes[11] == 255 and bytes[12] == 255 then
    return { bytes[13], bytes[14], bytes[15], bytes[16] }
  end
  return bytes
end

--- Address as a byte array (4 or 16 entries), or nil if it is not one.
function addr.bytes(s)
  if type(s) ~= "string" then return nil end
  s = s:match("^%[?(.-)%]?$")
  return ipv4_bytes(s) or ipv6_bytes(s)
end

local function parse_rule(rule)
  local ip, bits = rule:match("^(.-)/(%d+)$")
  ip = ip or rule
  local bytes = addr.bytes(ip)
  if not bytes then error("trusted_proxies: not an address or CIDR block: " .. tostring(rule), 4) end
  bits = tonumber(bits) or #bytes * 8
  if bits > #bytes * 8 then error("trusted_proxies: prefix too long: " .. rule, 4) end
  return { bytes = bytes, bits = bits }
end

local function in_block(bytes, rule)
  if #bytes ~= #rule.bytes then return false end
  local bits = rule.bits
  for i = 1, #bytes do
    if bits <= 0 then return true end
    local take = bits >= 8 and 8 or bits
    local mask = (0xff << (8 - take)) & 0xff
    if (bytes[i] & mask) ~= (rule.bytes[i] & mask) then return false end
    bits = bits - 8
  end
  return true
end

--- A predicate for a list of addresses and CIDR blocks ("10.0.0.0/8").
---@param list string[]|nil
---@return fun(ip: string): boolean
function addr.matcher(list)
  if not list or #list == 0 then return function() return false end end
  local rules = {}
  for i, r in ipairs(list) do rules[i] = parse_rule(r) end
  return function(ip)
    local bytes = addr.bytes(ip)
    if not bytes then return false end
    for _, r in ipairs(rules) do
      if in_block(bytes, r) then return true end
    end
    return false
  end
end

--- The client's address: the peer itself, unless the peer is a trusted
--- proxy; then the rightmost X-Forwarded-For entry that is not one of ours
--- (entries further left could be forged by the client).
---@param peer string
---@param xff string|nil
---@param trusted fun(ip: string): boolean
function addr.client_address(peer, xff, trusted)
  if not xff or not trusted(peer) then return peer end
  local hops = {}
  for h in xff:gmatch("[^,]+") do hops[#hops + 1] = h:match("^%s*(.-)%s*$") end
  for i = #hops, 1, -1 do
    local h = hops[i]
    if not addr.bytes(h) then return peer end -- garbage: do not trust any of it
    if not trusted(h) then return (h:match("^%[?(.-)%]?$")) end
  end
  return hops[1] or peer
end

return addr
