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

--- Parse a URL. Returns nil and a message for anything that is not one.
---@param s string
---@return duplex.URL|nil, string|nil
function url.parse(s)
  if type(s) ~= "string" then return nil, "URL must be a string" end
  local scheme, rest = s:match("^(%a[%w+.-]*)://(.*)$")
  if not scheme then return nil, "invalid URL (expected ws:// or wss://): " .. s end
  scheme = scheme:lower()
  if not DEFAULT_PORT[scheme] then return nil, "unsupported URL scheme: " .. scheme end
  if rest:find("#", 1, true) then return nil, "URL must not have a fragment (RFC 6455 §3)" end
  local authority, target = rest:match("^([^/?]*)(.*)$")
  if target == "" then target = "/" elseif target:sub(1, 1) == "?" then target = "/" .. target end
  local userinfo, hostport = authority:match("^(.*)@(.*)$")
  hostport = hostport or authority
  local host, port
  if hostport:sub(1, 1) == "[" then
    host, port = hostport:match("^%[([%x:.]+)%]:?(%d*)$")
    if not host then return nil, "invalid IPv6 address in URL: " .. hostport end
  else
    host, port = hostport:match("^([^:]*):?(%d*)$")
    if not host then return nil, "invalid host in URL: " .. hostport end
  end
  if host == "" then return nil, "URL has no host: " .. s end
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
  local h = u.host:find(":", 1, true) and "[" .. u.host .. "]" or u.host
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
