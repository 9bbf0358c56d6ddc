--- The opening handshake's decisions, for both roles and every host: which
--- subprotocol, which origin, which permessage-deflate parameters, and the
--- engine that follows. The bytes are parsed and built in C (duplex.core);
--- reading and writing them is the host's business (duplex.server on our
--- sockets, duplex.transport on any stream, duplex.nginx on cosockets).
---
--- Runs on Lua 5.4 and on LuaJIT: no integer operators here.
local core = require "duplex.core"
local WebSocket = require "duplex.websocket"
local options = require "duplex.options"

local now = core.now
local max_buffered = WebSocket._defaults.max_buffered

local handshake = {}

-- What each step of a handshake returns: one table, whichever way it went.

---@class duplex.RequestRead
---@field request duplex.Request|nil   a complete request, and
---@field parser duplex.core.HandshakeServer|nil its parser (parser:rest(): the bytes after it)
---@field status integer|nil           a malformed request: the status to answer it with
---@field error string|nil             why there is no request

---@class duplex.Answer
---@field response string|true|nil     the 101 to send (true: queued on the socket already), with
---@field engine duplex.core.Engine|nil the connection's engine and
---@field info table|nil               the fields its connection object carries: request,
---                                    remote_address, remote_port; protocol, extensions,
---                                    deflate, deflate_params when there are
---@field status integer|nil           or a refusal's status,
---@field headers table|nil            headers
---@field body string|nil              and body

---@class duplex.ResponseRead
---@field engine duplex.core.Engine|nil the connection's engine and
---@field info table|nil               its fields, or
---@field error string|nil             why not, and
---@field response duplex.Response|nil the server's answer, if it gave one

local READ_SIZE = 65536 -- per read while handshaking: headers are limited far below

handshake.max_message = core.defaults.max_message

-- What core.engine gets for a route's connections (handshake.route makes
-- it once; a route table made otherwise gets it here).
local function engine_options(route)
  return {
    role = "server", max_message = route.max_message, max_frame = route.max_frame,
    streaming = route.streaming, max_buffered = route.max_buffered or max_buffered,
  }
end

local response_opts = {}

--- Server side: the settings of one route (spec may be a handler function),
--- each of duplex.options.route falling back to opts (the server's), then
--- to the library's. level is the error level for a bad spec.
---@param opts duplex.RouteOptions the server's
---@param spec duplex.RouteOptions|fun(ws: duplex.WebSocket, request: duplex.Request)
---@param level integer|nil
---@return table route
-- What a route is served by: its own, never inherited from the listen
-- options (a route of on_message under a listen handler is not both).
local SERVED_BY = { handler = true, on_open = true, on_message = true }

function handshake.route(opts, spec, level)
  level = (level or 1) + 1
  if type(spec) == "function" then spec = { handler = spec } end
  if type(spec) ~= "table" or (type(spec.handler) ~= "function" and type(spec.on_message) ~= "function") then
    error("every route needs a handler function or on_message", level)
  end
  if spec.handler and spec.on_message then error("a route takes a handler or on_message, not both", level) end
  if spec.on_open and not spec.on_message then error("on_open goes with on_message (a handler opens itself)", level) end
  local route = {}
  for k in pairs(options.route) do
    local v = spec[k]
    if v == nil and not SERVED_BY[k] then v = opts[k] end
    route[k] = v
  end
  if route.on_message and route.streaming then
    error("streaming is for handlers: on_message gets whole messages", level)
  end
  if route.max_message == nil then route.max_message = handshake.max_message end
  route.engine_options = engine_options(route)
  if route.origins then
    local set = {}
    for _, o in ipairs(route.origins) do set[o:lower()] = true end
    route.origin_set = set
  end
  if route.deflate then
    -- By default every message is compressed on its own both ways (no
    -- context takeover): no zlib state is kept between messages on either
    -- side (an idle connection holds none), and one compressed broadcast
    -- frame suits every such connection. Browsers accept being asked.
    route.deflate_policy = type(route.deflate) == "table" and route.deflate
      or { server_no_context_takeover = true, client_no_context_takeover = true }
  end
  return route
end

local function choose_protocol(route, req)
  if route.select_protocol then return route.select_protocol(req.protocols, req) end
  if not route.protocols then return nil end
  -- The server's order of preference decides among what the client offers.
  local offered = {}
  for _, p in ipairs(req.protocols) do offered[p] = true end
  for _, p in ipairs(route.protocols) do
    if offered[p] then return p end
  end
  return nil
end

--- Server side: read an upgrade request from src (anything with
--- src:read(max, timeout): our sockets, duplex.transport streams) until
--- deadline, after data, bytes of it already read. One result, whichever
--- way it went: { request =, parser = } (parser:rest() is what came after
--- the request); { status =, error = } for a malformed request, to be
--- answered with that status; { error = } when the connection failed or the
--- deadline passed (a client that trickles bytes, slowloris-style, is
--- dropped when it passes).
---@param src duplex.Stream|duplex.core.Socket
---@param limits {max_header_size: integer|nil, max_headers: integer|nil}
---@param deadline number core.now() time
---@param data string|nil
---@return duplex.RequestRead
function handshake.read_request(src, limits, deadline, data)
  -- the parser reads its two limits from limits itself: no table per request
  local hs = core.handshake_server(limits)
  while true do
    if data then
      local req, status, msg = hs:feed(data)
      if req then return { request = req, parser = hs } end
      if status then return { status = status, error = msg } end
    end
    local left = deadline - now()
    if left <= 0 then return { error = "handshake timed out" } end
    local err
    data, err = src:read(READ_SIZE, left)
    if not data then return { error = err == "timeout" and "handshake timed out" or err } end
  end
end

--- Server side: the answer to a request that is not a valid upgrade:
--- status, headers, body. A broken upgrade gets its error (400, or 426 for
--- a version we do not speak); plain HTTP is told to upgrade.
---@param req duplex.Request
---@return integer status, table<string, string>|nil headers, string|nil body
function handshake.refusal(req)
  if req.upgrade or req.status == 426 then return req.status or 400, nil, req.error end
  return 426, { ["Upgrade"] = "websocket" }, "this endpoint speaks WebSocket"
end

--- Server side: answer a valid upgrade request (from core.handshake_server)
--- on a route. One result: { response =, engine =, info = } (the 101's
--- bytes, the engine, the fields the connection object carries), or a
--- refusal { status =, headers =, body = } (403 for a foreign origin, or
--- whatever on_request decided). Given sock, one of our sockets, the 101
--- is queued on it instead of made into a string (response is true).
---@param route table from handshake.route
---@param req duplex.Request
---@param sock duplex.core.Socket|nil
---@return duplex.Answer
function handshake.accept(route, req, sock)
  if route.origin_set and not (req.origin and route.origin_set[req.origin:lower()]) then
    return { status = 403, body = "origin not allowed" }
  end
  if route.on_request then
    local status, body, headers = route.on_request(req)
    if status then return { status = status, headers = headers, body = body } end
  end
  local protocol = choose_protocol(route, req)
  local ext, pmd_params
  if route.deflate then
    ext, pmd_params = core.pmd_accept(req.extensions, route.deflate_policy)
    if not ext then pmd_params = nil end -- no acceptable offer: no compression
  end
  -- Options tables made once, not per handshake: the C calls read them and
  -- keep nothing.
  -- (the request, whose key is read in C: no string for it)
  response_opts.request, response_opts.protocol, response_opts.extensions, response_opts.headers =
    req, protocol, ext, route.headers
  local response = true
  if sock then
    sock:write_accept(response_opts) -- a closed socket: the connection finds out next
  else
    response = core.handshake_response(response_opts)
  end
  response_opts.request, response_opts.headers = nil, nil
  local engine = core.engine(route.engine_options or engine_options(route))
  if pmd_params then core.pmd_attach(engine, "server", pmd_params, route.deflate_policy) end
  -- what the connection carries, each field only when it is there: a
  -- plain connection's three fit the smallest table
  local info = { request = req, remote_address = req.remote_address, remote_port = req.peer_port }
  if protocol then info.protocol = protocol end
  if ext then info.extensions = ext end
  if pmd_params then info.deflate, info.deflate_params = true, pmd_params end
  return { response = response, engine = engine, info = info }
end

--- Client side: the request for URL u (from duplex.url) and opts. Returns
--- the parser for the response (hc:request() is the bytes to send) and the
--- deflate offer, if any, for handshake.read_response.
---@param u duplex.URL
---@param opts duplex.ConnectOptions
---@return duplex.core.HandshakeClient hc, table|nil offer
function handshake.start(u, opts)
  local ext_header, offer
  if opts.deflate then
    offer = type(opts.deflate) == "table" and opts.deflate or { client_max_window_bits = true }
    ext_header = core.pmd_offer(offer)
  end
  local hc = core.handshake_client {
    host = u.host, port = u.port, secure = u.secure, target = u.target,
    origin = opts.origin, protocols = opts.protocols, extensions = ext_header,
    headers = opts.headers, max_header_size = opts.max_header_size,
  }
  return hc, offer
end

-- Feed response bytes. Returns nil while more are needed; then the engine
-- and the connection's fields, or nil, err, response when the server
-- refused or answered wrongly.
local function feed(hc, offer, opts, data)
  local res, herr, rejected = hc:feed(data)
  if herr then return nil, herr, rejected end
  if not res then return nil end
  -- the extension's name, like every rule of the negotiation, is C's to
  -- judge: false when the server accepted no permessage-deflate, nil and
  -- why when its answer is wrong (one we did not offer, for instance)
  local pmd_params, perr = core.pmd_check_response(res.extensions or {}, offer)
  if pmd_params == nil then return nil, "handshake failed: " .. tostring(perr), res end
  local engine = core.engine {
    role = "client", max_message = opts.max_message or handshake.max_message,
    max_frame = opts.max_frame, streaming = opts.streaming,
    max_buffered = opts.max_buffered or max_buffered,
  }
  if pmd_params then core.pmd_attach(engine, "client", pmd_params, offer) end
  local rest = hc:rest()
  if #rest > 0 then engine:feed(rest) end
  return engine, {
    response = res, protocol = res.protocol, extensions = res.headers["sec-websocket-extensions"],
    deflate = pmd_params and true or false,
  }
end

handshake.max_refusal_body = 65536

-- A chunked body decoded as far as data goes: the body so far, and whether
-- the last chunk was seen.
local function dechunk(data)
  local parts, pos = {}, 1
  while true do
    local line_end = data:find("\r\n", pos, true)
    if not line_end then return table.concat(parts), false end
    local size = tonumber(data:sub(pos, line_end - 1):match("^%s*(%x+)"), 16)
    if not size then return table.concat(parts), true end -- garbled: keep what came
    if size == 0 then return table.concat(parts), true end
    local first = line_end + 2
    parts[#parts + 1] = data:sub(first, first + size - 1)
    if #data < first + size + 1 then return table.concat(parts), false end
    pos = first + size + 2
  end
end

-- A refusal's body says why (401 "log in first"): read it as far as
-- Content-Length, the chunks or the end of the stream say, but no more than
-- max_refusal_body bytes and no later than deadline.
local function read_body(src, res, data, deadline)
  if res.status == 204 or res.status == 304 or res.status < 200 then return "" end
  local limit = handshake.max_refusal_body
  local length = tonumber(res.headers["content-length"])
  local chunked = (res.headers["transfer-encoding"] or ""):lower():find("chunked", 1, true)
  local want = length and math.min(length, limit) or limit
  local parts, have = { data }, #data
  while have < want do
    if chunked and select(2, dechunk(table.concat(parts))) then break end
    local left = deadline - now()
    if left <= 0 then break end
    local more = src:read(READ_SIZE, left)
    if not more then break end
    parts[#parts + 1] = more
    have = have + #more
  end
  local body = table.concat(parts)
  if chunked then body = dechunk(body) end
  return body:sub(1, want)
end

--- Client side: read the response to hc:request() from src until deadline.
--- Returns the engine and the connection's fields, or nil, err and (when
--- the server answered) the response, with the body of a refusal.
---@param src duplex.Stream|duplex.core.Socket
---@param hc duplex.core.HandshakeClient
---@param offer table|nil
---@param opts duplex.ConnectOptions
---@param deadline number core.now() time
---@return duplex.ResponseRead
function handshake.read_response(src, hc, offer, opts, deadline)
  while true do
    local data, err = src:read(READ_SIZE, math.max(0, deadline - now()))
    if not data then
      return { error = err == "timeout" and "handshake timed out"
        or "connection closed during handshake: " .. tostring(err) }
    end
    local engine, info, res = feed(hc, offer, opts, data)
    if engine then return { engine = engine, info = info } end
    if info then
      if res and res.status ~= 101 then res.body = read_body(src, res, hc:rest(), deadline) end
      return { error = info, response = res }
    end
  end
end

return handshake
