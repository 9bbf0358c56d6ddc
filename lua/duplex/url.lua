--- WebSocket URL parsing (RFC 6455 §3): ws:// and wss://, IPv6 literals.
local url = {}

local DEFAULT_PORT = { ws = 80, wss = 443, http = 80, https = 443 }

---@class duplex.URL
---@field scheme string  "ws" | "wss" | "http" | "https"
---@field host string    host name or address (IPv6 without brackets)
---@field port integer
---@field target string  path and query, at least "/"
---@field secure boolean
---@field userinfo string|nil
---@field default_port boolean  the URL named no port

local function valid_ipv4(s)
  local a, b, c, d = s:match("^(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?)$")
  if not a then return false end
  for _, n in ipairs { a, b, c, d } do
    if tonumber(n) > 255 then return false end
  end
  return true
end

-- RFC 4291 text form: eight groups of 1-4 hex digits, "::" once for a run
-- of zeros, an IPv4 address in place of the last two.
local function valid_ipv6(s)
  local groups = 8
  local v4 = s:match(":(%d+%.%d+%.%d+%.%d+)$")
  if v4 then
    if not valid_ipv4(v4) then return false end
    s = s:sub(1, #s - #v4 - 1) .. ":"
    groups = 6
    if s:sub(-2) ~= "::" then s = s:sub(1, -2) end
  end
  local head, tail = s:match("^(.-)::(.*)$")
  local function count(part)
    if part == "" then return 0 end
    local n = 0
    for g in (part .. ":"):gmatch("([^:]*):") do
      if not g:match("^%x%x?%x?%x?$") then return nil end
      n = n + 1
    end
    return n
  end
  if head then
    local h, t = count(head), count(tail)
    return h ~= nil and t ~= nil and h + t < groups
  end
  return count(s) == groups
end

-- A host as RFC 3986 allows it in a URL we connect to: a DNS-style name
-- (letters, digits and - . _ ~), an IPv4 address, or (bracketed, parsed
-- by the caller) IPv6 with an optional zone (RFC 6874). Nothing else may
-- reach a request line or a Host header: no spaces, no CR or LF.
local function valid_reg_name(h)
  if #h > 255 or not h:match("^[%w%-%._~]+$") then return false end
  if h:match("^[%d.]+$") then return valid_ipv4(h) end
  return true
end

-- For error messages: control bytes and spaces shown as \xNN.
local function shown(s)
  return (s:gsub("[^%w%p]", function(c) return string.format("\\x%02x", c:byte()) end))
end

--- Parse a URL. Returns nil and a message for anything that is not one.
---@param s string
---@return duplex.URL|nil, string|nil
function url.parse(s)
  if type(s) ~= "string" then return nil, "URL must be a string" end
  local scheme, rest = s:match("^(%a[%w+.-]*)://(.*)$")
  if not scheme then return nil, "invalid URL (expected ws:// or wss://): " .. shown(s) end
  scheme = scheme:lower()
  if not DEFAULT_PORT[scheme] then return nil, "unsupported URL scheme: " .. scheme end
  if rest:find("#", 1, true) then return nil, "URL must not have a fragment (RFC 6455 §3)" end
  local authority, target = rest:match("^([^/?]*)(.*)$")
  if target == "" then target = "/" elseif target:sub(1, 1) == "?" then target = "/" .. target end
  local userinfo, hostport = authority:match("^(.*)@(.*)$")
  hostport = hostport or authority
  local host, port
  if hostport:sub(1, 1) == "[" then
    local zone
    host, zone, port = hostport:match("^%[([%x:.]+)(.-)%]:?(%d*)$")
    if not host or not valid_ipv6(host) or not (zone == "" or zone:match("^%%25[%w%-%._~]+$")) then
      return nil, "invalid IPv6 address in URL: " .. shown(hostport)
    end
    if zone ~= "" then host = host .. "%" .. zone:sub(4) end
  else
    host, port = hostport:match("^([^:]*):?(%d*)$")
    if not host then return nil, "invalid host in URL: " .. shown(hostport) end
    if host == "" then return nil, "URL has no host: " .. shown(s) end
    if not valid_reg_name(host) then return nil, "invalid host in URL: " .. shown(host) end
  end
  local default_port = port == ""
  port = default_port and DEFAULT_PORT[scheme] or tonumber(port)
  if port < 1 or port > 65535 then return nil, "invalid port in URL: " .. tostring(port) end
  return {
    scheme = scheme,
    host = host:lower(),
    port = port,
    target = target,
    secure = scheme == "wss" or scheme == "https",
    userinfo = userinfo,
    default_port = default_port,
  }
end

local function unescape(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

--- User name and password from the URL's userinfo, percent-decoded; the
--- password is nil when there is no ":".
---@param u duplex.URL
---@return string|nil user, string|nil password
function url.credentials(u)
  if not u.userinfo then return nil end
  local user, pass = u.userinfo:match("^([^:]*):(.*)$")
  if not user then return unescape(u.userinfo), nil end
  return unescape(user), unescape(pass)
end

--- The Host header value for a parsed URL.
---@param u duplex.URL
---@return string
function url.host_header(u)
  local h = u.host
  -- a zone (fe80::1%eth0) means something on this machine only: not sent
  if h:find(":", 1, true) then h = "[" .. h:gsub("%%.*$", "") .. "]" end
  if u.default_port then return h end
  return h .. ":" .. u.port
end

--- Resolve a (possibly relative) Location against a base URL.
function url.resolve(base, location)
  if location:match("^%a[%w+.-]*://") then return location end
  local b = url.host_header(base)
  local scheme = base.scheme
  if location:sub(1, 2) == "//" then return scheme .. ":" .. location end
  if location:sub(1, 1) == "/" then return scheme .. "://" .. b .. location end
  local dir = base.target:match("^([^?]*/)") or "/"
  return scheme .. "://" .. b .. dir .. location
end

return url
