--- The WebSocket server: accept, handshake, route, run a handler per
--- connection; plain HTTP on the same port; graceful shutdown.
local core = require "duplex.core"
local WebSocket = require "duplex.websocket"
local callbacks = require "duplex.callbacks"
local handshake = require "duplex.handshake"
local addr = require "duplex.addr"
local runtime = require "duplex.runtime"
local options = require "duplex.options"

local now, call_nowait = core.now, core.call_nowait

-- Parsers kept for the next plain handshakes: a burst of accepts takes
-- several before the first of them is read.
local SPARE_PARSERS = 16

local server = {}

---@class duplex.Server
---@field host string                the bound address
---@field port integer               the bound port (the one picked for port = 0)
local Server = {}
Server.__index = Server

local defaults = {
  host = "0.0.0.0",
  port = 8080,
  backlog = 511,
  reuseport = false,
  max_connections = 10000,
  handshake_timeout = 10,
  max_header_size = core.defaults.max_header_size,
  max_headers = core.defaults.max_headers,
  max_message = handshake.max_message,
}
server._defaults = defaults

local function make_routes(opts)
  local routes = {}
  if opts.routes then
    for path, spec in pairs(opts.routes) do
      if type(spec) == "table" then options.check("listen: route " .. tostring(path), spec, options.route, 4) end
      routes[path] = handshake.route(opts, spec, 4)
    end
  end
  if opts.handler or opts.on_message then routes[opts.path or "*"] = handshake.route(opts, opts, 4) end
  if next(routes) == nil then error("listen: give a handler or on_message (and path), or routes", 3) end
  return routes
end

local function respond(sock, status, headers, body)
  sock:write(core.http_response(status, headers, body))
  sock:flush(5)
  sock:close()
end

-- Read the upgrade request within the handshake deadline (a client that
-- trickles bytes, slowloris-style, is dropped when it passes).
local function read_request(self, sock)
  local deadline = now() + self.handshake_timeout
  if self.tls_context then
    local ok, err = sock:starttls(self.tls_context, nil, self.handshake_timeout)
    if not ok then return nil, "TLS handshake failed: " .. tostring(err) end
  end
  local got = handshake.read_request(sock, self, deadline)
  if got.status then respond(sock, got.status, nil, got.error) end -- malformed
  return got.request, got.parser
end

-- A request that is not (or not a valid) WebSocket upgrade.
local function serve_http(self, sock, req, route)
  if self.on_http then
    local status, headers, body = self.on_http(req)
    if status then return respond(sock, status, headers, body) end
  end
  if not route then return respond(sock, 404, nil, "not found") end
  respond(sock, handshake.refusal(req))
end

-- The 101 and the connection object, or nil and the refusal to answer
-- with. Apart from the rest, so that what only the handshake needs (the
-- answer, the response's bytes) dies with this frame instead of staying on
-- the stack of every idle connection's coroutine.
local function open(sock, req, hs, route)
  local answer = handshake.accept(route, req, sock) -- the 101 queued on sock
  if not answer.response then return nil, answer end
  local engine, info = answer.engine, answer.info
  sock:attach(engine)
  local rest = hs:rest()
  if #rest > 0 then engine:feed(rest) end
  return WebSocket.new(sock, engine, route, info, route.class)
end

-- A callback route's connection, pumped by the dispatcher from here.
local function watch(self, ws)
  if ws.state ~= "closed" and not ws.sock:watch(self.watcher) then ws:abort("the server is shutting down") end
end

-- A callback route's connection opened in a coroutine: on_open here (it
-- may wait), then the dispatcher pumps its socket and this coroutine ends.
-- From here the connection's end (Callback:_finish) releases it, not
-- task_ended.
local function adopt(self, ws, route, req)
  if route.on_open then
    local ok, err = xpcall(route.on_open, debug.traceback, ws, req)
    if not ok then
      self._log_error("on_open failed: " .. tostring(err))
      ws:start_close(1011, "internal error")
    end
  end
  watch(self, ws)
  core.at_end(nil) -- Callback:_finish releases it
end

-- The request's peer (ip, port: the accept's, else the socket's) and its
-- route.
local function route_of(self, req, sock, ip, port)
  if not ip then ip, port = sock:peer() end
  req.peer_address, req.peer_port = ip, port
  -- X-Forwarded-For counts only from a trusted proxy: asked for otherwise,
  -- request.headers would be made for every connection (it waits as
  -- bytes). Without one, request.remote_address reads peer_address.
  if self.trusted_proxies(ip) then
    req.remote_address = addr.client_address(ip, req.headers["x-forwarded-for"], self.trusted_proxies)
  end
  return self.routes[req.path] or self.routes["*"]
end

-- A request read, answered in the handshake's coroutine (what it calls may
-- wait: on_http, on_request, select_protocol, on_open, a refusal's flush).
local function answer(self, sock, req, hs, route)
  if not req.websocket then return serve_http(self, sock, req, route) end
  if not route then return respond(sock, 404, nil, "not found") end
  local ws, refusal = open(sock, req, hs, route)
  if not ws then return respond(sock, refusal.status, refusal.headers, refusal.body) end
  -- the connection owns its socket from here: one entry for it, not two
  -- (task_ended removes it)
  self.sockets[sock], self.connections[sock] = nil, ws
  if route.on_message then return adopt(self, ws, route, req) end
  -- the handler starts on this coroutine emptied (start_handler): the
  -- handshake's deepest call grew its stack, and a stack keeps its size
  -- until it is three times what is in use
  core.at_end(self._start_handler, sock)
end

-- A handshake in a coroutine of its own (TLS: its handshake comes first).
local function serve(self, sock, ip, port)
  local req, hs = read_request(self, sock)
  if not req then return end
  return answer(self, sock, req, hs, route_of(self, req, sock, ip, port))
end

-- Nothing is left: the dispatcher of a server that stopped accepting ends.
local function idle(self)
  -- emptied tables keep their peak size; idle servers give it back
  self.sockets, self.connections, self.deadlines = {}, {}, {}
  if self._drained then core.wake(self._drained) end
  if self.closing and self.watcher then self.watcher:close() end
end

local function release(self, sock)
  self.sockets[sock], self.connections[sock], self.deadlines[sock] = nil, nil, nil
  sock:close()
  self.count = self.count - 1
  if self.count == 0 then idle(self) end
end

-- A connection's coroutine has ended (core.at_end): its handler's end
-- (the close, on_close), or the handshake's; then the server lets go.
local function task_ended(self, sock, ok, err)
  local ws = self.connections[sock]
  if ws then
    ws:_served(ws._route, ok, err, self._log_error)
  elseif not ok then
    self.log("error", tostring(err))
  end
  release(self, sock)
end

-- The handler's coroutine: a tail call, so that the handler is its bottom
-- frame and an idle connection's stack stays at its first size (what
-- follows the handler is task_ended's).
local function start_handler(self, sock)
  local ws = self.connections[sock]
  core.at_end(self._task_ended, sock)
  local handler = ws._route.handler
  return handler(ws, ws.request)
end

-- fn(...) in a coroutine of the handshake on sock, which the server lets
-- go of when it ends (unless it passes the socket on).
local function task(self, sock, fn, ...)
  core.at_end(self._task_ended, sock)
  return fn(...)
end

-- Whether answering req on route may call something that waits (answer).
local function may_wait(route, req)
  return not (route and req.websocket) or route.on_request or route.select_protocol or route.on_open
end

-- A plain handshake, read by the dispatcher as its bytes come (w:serve's
-- greet): no coroutine for it, and none for the connection of a callback
-- route, when nothing on the way can wait; else a coroutine from there.
local function greet(self, sock)
  local hs = self.sockets[sock]
  if hs == true or hs == nil then return end -- one in a coroutine (TLS)
  local req, err, status = sock:take_request(hs)
  if not req and err == "again" then return end
  self.sockets[sock], self.deadlines[sock] = true, nil
  sock:watch(nil)
  if not req then
    if not status then return release(self, sock) end -- closed, or a read error
    return core.spawn(task, self, sock, respond, sock, status, nil, err)
  end
  local route = route_of(self, req, sock)
  if may_wait(route, req) then return core.spawn(task, self, sock, answer, self, sock, req, hs, route) end
  local ws, refusal = open(sock, req, hs, route)
  if not ws then
    return core.spawn(task, self, sock, respond, sock, refusal.status, refusal.headers, refusal.body)
  end
  -- done with (its rest is the engine's): a next handshake's
  local spare = self._parsers
  if #spare < SPARE_PARSERS then
    hs:reset()
    spare[#spare + 1] = hs
  end
  self.sockets[sock], self.connections[sock] = nil, ws
  if not route.on_message then return core.spawn(self._start_handler, sock) end
  -- nobody has seen the request: it waits as one string until read
  core.pack_request(ws)
  watch(self, ws)
end

-- Plain handshakes that outlive handshake_timeout are dropped (a client
-- that trickles bytes, slowloris-style): looked for every tenth of the
-- timeout (at most a second apart) by a coroutine that runs only while
-- some are waiting, so that a handshake costs no timer of its own.
local function expire(self)
  local period = math.min(1, self.handshake_timeout / 10)
  while next(self.deadlines) ~= nil do
    core.sleep(period)
    local t = now()
    for sock, deadline in pairs(self.deadlines) do
      if deadline <= t then release(self, sock) end
    end
  end
  self._expiring = nil
end

-- Counted from here, not when its coroutine first runs, so that a burst of
-- accepts cannot pass max_connections, and so that a server that stops
-- accepting knows what is still to come.
local function admit(self, sock, ip, port)
  if self.count >= self.max_connections then
    return core.spawn(respond, sock, 503, { ["Retry-After"] = "1" }, "too many connections")
  end
  self.count = self.count + 1
  if self.tls_context then
    self.sockets[sock] = true
    return core.spawn(task, self, sock, serve, self, sock, ip, port)
  end
  local spare = self._parsers
  local n = #spare
  if n > 0 then
    self.sockets[sock], spare[n] = spare[n], nil
  else
    self.sockets[sock] = core.handshake_server(self)
  end
  self.deadlines[sock] = now() + self.handshake_timeout
  if not self._expiring then self._expiring = core.spawn(expire, self) end
  if not sock:watch(self.watcher) then release(self, sock) end
end

-- The one coroutine of callback connections and plain handshakes: its
-- watcher pumps each socket with input, in C (w:serve). A failure (a bug,
-- since the callbacks run under call_nowait) ends the connection or
-- handshake it was for, and the run goes on.
local function dispatch(self)
  local watcher = self.watcher
  while true do
    local ok, err, ws, sock = watcher:serve(self, core.pump, callbacks.after, self._greet)
    if ok == nil then return end
    self.log("error", tostring(err))
    if ws then ws:abort("internal error") else release(self, sock) end
  end
end

--- A callback connection ended (Callback:_finish): its route's on_close,
--- then the server lets go of it.
---@param ws duplex.CallbackWebSocket
function Server:_ended(ws)
  local on_close = ws._route.on_close
  if on_close then
    local ok, err = call_nowait(on_close, ws, ws.close_code, ws.close_reason)
    if not ok then self._log_error("on_close failed: " .. tostring(err)) end
  end
  release(self, ws.sock)
end

local function accept_loop(self)
  while not self.closing do
    local sock, ip_or_err, port = self.listener:accept()
    if sock then
      admit(self, sock, ip_or_err, port)
    elseif self.closing or ip_or_err == "closed" then
      break
    else
      -- Out of file descriptors and the like: back off instead of spinning.
      self.log("warn", "accept failed: " .. tostring(ip_or_err))
      core.sleep(0.1)
    end
  end
end

--- Start a server. See README "duplex.listen" for every option.
---@param opts duplex.ListenOptions
---@return duplex.Server|nil server, string|nil err
function server.listen(opts)
  if type(opts) ~= "table" then error("listen: options table expected", 2) end
  options.check("listen", opts, options.listen, 2)
  local self = setmetatable({
    routes = make_routes(opts),
    on_http = opts.on_http,
    log = opts.log or runtime.log,
    trusted_proxies = addr.matcher(opts.trusted_proxies),
    count = 0,
    sockets = {},     -- sock -> its handshake's parser (plain), or true
    connections = {}, -- sock -> ws
    deadlines = {},   -- sock -> when its plain handshake is dropped
    _parsers = {},    -- handshake parsers done with, for the next ones
  }, Server)
  self._log_error = function(msg) self.log("error", msg) end
  self._task_ended = function(sock, ok, err) return task_ended(self, sock, ok, err) end
  self._start_handler = function(sock) return start_handler(self, sock) end
  self._greet = function(sock) return greet(self, sock) end
  for k, v in pairs(defaults) do
    if opts[k] == nil then self[k] = v else self[k] = opts[k] end
  end
  if opts.tls then
    local ctx, err = core.tls_context {
      mode = "server", cert = opts.tls.cert, key = opts.tls.key, chain = opts.tls.chain,
    }
    if not ctx then return nil, "TLS setup failed: " .. tostring(err) end
    self.tls_context = ctx
  end
  local listener, err = core.listen {
    host = self.host, port = self.port, backlog = self.backlog, reuseport = self.reuseport,
  }
  if not listener then
    local where = self.host:find(":", 1, true) and "[" .. self.host .. "]" or self.host
    return nil, string.format("listen on %s:%d failed: %s", where, self.port, tostring(err))
  end
  self.listener = listener
  self.host, self.port = listener:address()
  local callback_routes = false
  for _, route in pairs(self.routes) do
    -- ws.server and ws._route, and the route's settings, live in the class
    route.class = WebSocket._route_class(route.on_message and callbacks.WebSocket or WebSocket, route,
      { server = self, _route = route })
    callback_routes = callback_routes or route.on_message ~= nil
  end
  if callback_routes or not self.tls_context then
    self.watcher = core.watcher()
    core.spawn(dispatch, self)
  end
  self.accepting = core.spawn(accept_loop, self)
  return self
end

--- The URL clients connect to (for logs and examples).
---@param path string|nil default "/"
---@return string
function Server:url(path)
  local host = self.host
  if host == "0.0.0.0" then host = "127.0.0.1" elseif host == "::" then host = "::1" end
  if host:find(":", 1, true) then host = "[" .. host .. "]" end
  return string.format("%s://%s:%d%s", self.tls_context and "wss" or "ws", host, self.port, path or "/")
end

--- Open WebSocket connections (a snapshot).
---@return duplex.WebSocket[]
function Server:clients()
  local list = {}
  for _, ws in pairs(self.connections) do list[#list + 1] = ws end
  return list
end

--- Stop accepting; existing connections go on.
function Server:stop_accepting()
  if self.closing then return end
  self.closing = true
  -- What the kernel has queued for us is served, not reset by the close
  -- (a worker retiring in a reload, with new ones on the same port).
  for _, sock in ipairs(self.listener:drain()) do admit(self, sock) end
  self.listener:close()
  if self.count == 0 and self.watcher then self.watcher:close() end
end

local function shutdown(self, timeout)
  self:stop_accepting()
  for _, ws in pairs(self.connections) do ws:start_close(1001, "server shutting down") end
  local deadline = now() + (timeout or 10)
  while self.count > 0 and now() < deadline do
    self._drained = coroutine.running()
    core.park(math.max(0, deadline - now()))
    self._drained = nil
  end
  -- Their readers should learn why the connection ended, not just "closed".
  for _, ws in pairs(self.connections) do ws:abort("server shutdown: no close reply in time") end
  for sock in pairs(self.sockets) do
    -- a plain handshake has no coroutine to end it
    if self.deadlines[sock] then release(self, sock) else sock:close(true) end
  end
  -- The accept loop ends once it runs and sees its listener closed: let it,
  -- so that nothing of this server is left in the loop.
  if coroutine.status(self.accepting) ~= "dead" then core.sleep(0) end
  return self.count == 0
end

--- Graceful shutdown: stop accepting, close every connection with 1001
--- (going away), wait up to timeout seconds (default 10) for them to end,
--- then drop the rest. Returns true when every connection ended in time.
---@param timeout number|nil
---@return boolean all_ended
function Server:shutdown(timeout)
  return runtime.blocking(shutdown, self, timeout)
end

return server
