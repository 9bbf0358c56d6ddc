--- The WebSocket client: URL to open connection, through an HTTP proxy and
--- TLS when asked, following redirects only when asked.
local core = require "duplex.core"
local url = require "duplex.url"
local WebSocket = require "duplex.websocket"
local hs = require "duplex.handshake"
local options = require "duplex.options"

local now = core.now

local client = {}

client._defaults = {
  timeout = 10,            -- seconds for TCP connect + TLS + handshake
  max_header_size = core.defaults.max_header_size,
  max_message = hs.max_message,
  follow_redirects = false, -- or the number of redirects to follow (true = 5, at most 10)
}

local MAX_REDIRECTS = 10

local function left(deadline) return math.max(0, deadline - now()) end

-- Ask an HTTP proxy for a tunnel (RFC 9110 §9.3.6 CONNECT).
local function proxy_tunnel(sock, proxy, u, deadline)
  local authority = (u.host:find(":", 1, true) and "[" .. u.host .. "]" or u.host) .. ":" .. u.port
  local req = { "CONNECT " .. authority .. " HTTP/1.1", "Host: " .. authority }
  if proxy.userinfo then
    local user, pass = url.credentials(proxy)
    req[#req + 1] = "Proxy-Authorization: Basic " .. core.base64(user .. ":" .. (pass or ""))
  end
  sock:write(table.concat(req, "\r\n") .. "\r\n\r\n")
  local buf = ""
  while not buf:find("\r\n\r\n", 1, true) do
    if #buf > 8192 then return nil, "proxy response too large" end
    local data, err = sock:read(nil, left(deadline))
    if not data then return nil, "proxy CONNECT failed: " .. tostring(err) end
    buf = buf .. data
  end
  local status, reason = buf:match("^HTTP/1%.[01] (%d%d%d) ?([^\r\n]*)")
  if status ~= "200" then
    return nil, "proxy refused CONNECT: " .. tostring(status) .. " " .. tostring(reason)
  end
  return true
end

local default_tls -- one client context (system CA store) per Lua state

local function tls_context(opts)
  local tls = opts.tls or {}
  if tls.context then return tls.context end
  if tls.ca == nil and tls.verify ~= false then
    if not default_tls then
      local ctx, err = core.tls_context { mode = "client", verify = true }
      if not ctx then return nil, err end
      default_tls = ctx
    end
    return default_tls
  end
  return core.tls_context { mode = "client", ca = tls.ca, verify = tls.verify ~= false }
end

local function open_transport(u, opts, deadline)
  local proxy = opts.proxy and url.parse(opts.proxy)
  if opts.proxy and not proxy then return nil, "invalid proxy URL: " .. tostring(opts.proxy) end
  -- A proxy is spoken to in plain HTTP (a wss:// tunnel through it carries
  -- its own TLS). An https:// proxy would get its credentials in clear.
  if proxy and proxy.scheme ~= "http" then
    return nil, "unsupported proxy scheme " .. proxy.scheme .. "://: only http:// proxies are spoken to"
  end
  local target = proxy or u
  local sock, err = core.connect {
    host = target.host, port = target.port, timeout = left(deadline), bind = opts.bind,
  }
  if not sock then
    -- core.connect says "timeout" as every wait does; the message is prose
    if err == "timeout" then err = "timed out" end
    return nil, string.format("connect to %s:%d failed: %s", target.host, target.port, err)
  end
  if proxy then
    local ok, perr = proxy_tunnel(sock, proxy, u, deadline)
    if not ok then sock:close(); return nil, perr end
  end
  if u.secure then
    local ctx, cerr = tls_context(opts)
    if not ctx then sock:close(); return nil, "TLS setup failed: " .. tostring(cerr) end
    local servername = opts.tls and opts.tls.servername
    if servername == nil or servername == "" then servername = u.host end
    local ok, terr = sock:starttls(ctx, { servername = servername }, left(deadline))
    if not ok then sock:close(); return nil, "TLS handshake failed: " .. tostring(terr) end
  end
  return sock
end

local function handshake(sock, u, opts, deadline)
  local hc, offer = hs.start(u, opts)
  sock:write(hc:request())
  local got = hs.read_response(sock, hc, offer, opts, deadline)
  if not got.engine then return nil, got.error, got.response end
  local engine, info = got.engine, got.info
  sock:attach(engine)
  info.remote_address, info.remote_port = sock:peer()
  info.url = u
  return WebSocket.new(sock, engine, opts, info)
end

local REDIRECT = { [301] = true, [302] = true, [303] = true, [307] = true, [308] = true }

-- Headers that carry the caller's credentials: they go to the origin the
-- caller named, never to another one a redirect names.
local CREDENTIALS = { authorization = true, cookie = true, ["proxy-authorization"] = true }

local function same_origin(a, b)
  return a.scheme == b.scheme and a.host == b.host and a.port == b.port
end

local function without_credentials(headers)
  if not headers then return nil end
  local kept = {}
  for k, v in pairs(headers) do
    if not CREDENTIALS[tostring(k):lower()] then kept[k] = v end
  end
  return kept
end

local function redirect_budget(v) -- (checked by duplex.options)
  if v == true then return 5 end
  return math.min(v or 0, MAX_REDIRECTS)
end

--- Open a WebSocket connection. Returns the connection, or nil and a message
--- naming what failed (and, for a refused handshake, the response).
---@param target string ws:// or wss:// URL
---@param opts duplex.ConnectOptions|nil see README "duplex.connect"
---@return duplex.WebSocket|nil ws, string|nil err, duplex.Response|nil response
function client.connect(target, opts)
  -- our own copy: the caller's table is neither filled with defaults nor
  -- changed when a redirect drops credentials
  if opts ~= nil and type(opts) ~= "table" then error("connect: options must be a table", 3) end
  options.check("connect", opts or {}, options.connect, 3)
  local o = {}
  for k, v in pairs(opts or {}) do o[k] = v end
  for k, v in pairs(client._defaults) do if o[k] == nil then o[k] = v end end
  local redirects = redirect_budget(o.follow_redirects)
  local u, perr = url.parse(target)
  if not u then return nil, perr end
  while true do
    if u.scheme ~= "ws" and u.scheme ~= "wss" then return nil, "not a WebSocket URL: " .. target end
    local deadline = now() + o.timeout
    local sock, err = open_transport(u, o, deadline)
    if not sock then return nil, err end
    local ws, herr, res = handshake(sock, u, o, deadline)
    if ws then return ws end
    sock:close()
    local location = res and res.headers and res.headers.location
    if not (res and REDIRECT[res.status] and location and redirects > 0) then return nil, herr, res end
    redirects = redirects - 1
    local nu = url.parse(url.resolve(u, location))
    if not nu then return nil, "invalid redirect Location: " .. location, res end
    -- as python-websockets: what was asked for over TLS stays over TLS
    if u.secure and not nu.secure then
      return nil, "refused a redirect from " .. u.scheme .. ":// to " .. nu.scheme .. "://: " .. location, res
    end
    if not same_origin(u, nu) then
      o.headers = without_credentials(o.headers)
      nu.userinfo = nil
    end
    u = nu
  end
end

return client
