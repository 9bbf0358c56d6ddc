--- WebSocket over any host's byte stream: the same connection object, with
--- every protocol rule (auto-pong, heartbeat, closing handshake, limits,
--- permessage-deflate) in the shared code, and only the bytes moved by the
--- host.
---
--- A stream is any object with these methods (timeouts in seconds, nil for
--- no limit):
---
---   stream:read(max, timeout)   -> 1..max bytes | nil, "timeout" | nil, "closed" (EOF) | nil, err
---   stream:write(data, timeout) -> true | nil, "timeout", bytes_written | nil, err
---   stream:close()
---   stream:shutdown()           (optional) stop sending, keep reading
---   stream:peer()               (optional) -> address, port
---   stream:yield()              (optional) let the host's other work run
---
--- read and write wait in the host's own way (yield to cqueues or to
--- nginx). A read that times out has consumed nothing, and bytes read are
--- fed to the engine as they arrive, so a timeout or a short read never
--- loses bytes or desynchronizes the stream. A write that times out ends
--- the connection (the peer is not reading: 1008).
---
--- Runs on Lua 5.4 and on LuaJIT.
local core = require "duplex.core"
local WebSocket = require "duplex.websocket"
local handshake = require "duplex.handshake"
local url = require "duplex.url"
local options = require "duplex.options"

local now = core.now
local Hosted = WebSocket.Hosted

local transport = {}

---@class duplex.Stream
---@field read fun(self: duplex.Stream, max: integer, timeout: number|nil): string|nil, string|nil 1..max bytes
---@field write fun(self: duplex.Stream, data: string, timeout: number|nil): true|nil, string|nil, integer|nil
---@field close fun(self: duplex.Stream)
---@field shutdown? fun(self: duplex.Stream): any stop sending, keep reading
---@field peer? fun(self: duplex.Stream): string|nil, integer|nil address, port
---@field yield? fun(self: duplex.Stream) let the host's other work run

---@class duplex.AcceptOptions: duplex.RouteOptions
---@field handshake_timeout? number   seconds to read the request, default 10
---@field max_header_size? integer    default 8192 (431 beyond)
---@field max_headers? integer        default 100
---@field request? string             bytes of the request the host has read already
---@field remote_address? string      ws.remote_address (default: the stream's peer)

-- The stream contract, once: what each method must be (the class above says
-- what it does). A host's mistake is named when its stream is handed over,
-- not found later as "attempt to call a nil value" inside a connection.
local STREAM = { read = true, write = true, close = true, shutdown = false, peer = false, yield = false }

--- Raise an error (at level) unless stream keeps the contract of duplex.Stream.
---@param stream any
---@param who string the caller, for the message
---@param level integer|nil
function transport.check_stream(stream, who, level)
  level = (level or 1) + 1
  local t = type(stream)
  if t ~= "table" and t ~= "userdata" then error(who .. ": a stream object expected, got " .. t, level) end
  for name, required in pairs(STREAM) do
    local method = stream[name]
    local callable = type(method) == "function" or (getmetatable(method) or {}).__call ~= nil
    if (method ~= nil or required) and not callable then
      error(string.format("%s: the stream's %s must be a method (%s)", who, name,
        required and "required" or "optional"), level)
    end
  end
end

transport._read_size = 65536
-- A connection's share of the host before it yields (when the stream can):
-- an event counts 1, every 4 KiB read counts 1, so a flood of pings or a
-- burst of messages is read in turns with everyone else.
transport._turn = 64

local function left(deadline)
  return deadline and math.max(0, deadline - now())
end

--- The socket interface duplex.websocket uses, over a stream and an engine.
---@class duplex.Conduit
local Conduit = {}
Conduit.__index = Conduit

---@param stream duplex.Stream
---@param engine duplex.core.Engine
---@return duplex.Conduit
function transport._wrap(stream, engine)
  return setmetatable({ stream = stream, engine = engine, writing = false, closed = false, spent = 0 },
    Conduit)
end

-- Charge a turn; a full one yields to the host.
function Conduit:_spend(units)
  local spent = self.spent + units
  if spent >= transport._turn and self.stream.yield then
    spent = 0
    self.stream:yield()
  end
  self.spent = spent
end

--- Bytes queued for the peer: the engine's, plus the unwritten rest of a
--- write that timed out.
function Conduit:buffered()
  if self.closed then return 0 end
  return self.engine:pending() + (self.tail and #self.tail or 0)
end

--- Write everything queued. Only one coroutine writes at a time: a flush
--- that finds another one writing returns at once, since that writer keeps
--- going until the queue is empty, our bytes included.
function Conduit:flush(timeout)
  if self.closed then return nil, "closed" end
  if self.writing then return true end
  self.writing = true
  local deadline = timeout and now() + timeout
  local ok, err = true, nil
  while not self.closed do
    local data = self.tail
    if not data then
      if self.engine:pending() == 0 then break end
      data = self.engine:data_to_send()
    end
    self.tail = nil
    local done, werr, written = self.stream:write(data, left(deadline))
    if not done then
      if werr == "timeout" then self.tail = data:sub((written or 0) + 1) end
      ok, err = nil, werr
      break
    end
  end
  self.writing = false
  if self.closed and ok then return nil, "closed" end
  return ok, err
end

--- Frames go out as they are queued here: what is left waits for a writer.
function Conduit:try_flush()
  return self:buffered()
end

-- A flush empties the whole queue, so there is no low-water mark to wait
-- for: the argument is there for the socket's drain(low, timeout).
function Conduit:drain(_low, timeout)
  return self:flush(timeout)
end

--- The engine's next event (its values, kind first), reading and feeding
--- as needed; nil, err when the stream fails or the timeout passes.
function Conduit:receive(engine, timeout)
  local deadline
  while true do
    local kind, data, a, b, c = engine:next()
    if kind then
      self:_spend(1)
      return kind, data, a, b, c
    end
    if self.closed then return nil, "closed" end
    deadline = deadline or (timeout and now() + timeout)
    local chunk, err = self.stream:read(transport._read_size, left(deadline))
    if not chunk then return nil, err end
    engine:feed(chunk)
    self:_spend(math.floor(#chunk / 4096))
  end
end

function Conduit:read(max, timeout)
  if self.closed then return nil, "closed" end
  return self.stream:read(max or transport._read_size, timeout)
end

function Conduit:shutdown(timeout)
  if self.closed or not self.stream.shutdown then return false end
  if not self:flush(timeout) then return false end
  return self.stream:shutdown() ~= nil
end

function Conduit:close(hard)
  if self.closed then return end
  self.closed = true
  self.stream:close(hard)
end

function Conduit:peer()
  if self.stream.peer then return self.stream:peer() end
  return nil
end

local function write_all(stream, data, deadline)
  local ok, err = stream:write(data, left(deadline))
  if not ok then return nil, err == "timeout" and "handshake timed out" or err end
  return true
end

--- The connection object over stream, for an engine whose handshake is done
--- (from duplex.handshake): for hosts that do the handshake their own way.
---@param stream duplex.Stream
---@param engine duplex.core.Engine
---@param opts duplex.ConnectionOptions
---@param info table the connection's fields, from duplex.handshake
---@return duplex.WebSocket
function transport.connection(stream, engine, opts, info)
  transport.check_stream(stream, "transport.connection", 2)
  local sock = transport._wrap(stream, engine)
  if not info.remote_address then info.remote_address, info.remote_port = sock:peer() end
  local ws = WebSocket.new(sock, engine, opts, info, Hosted)
  ws:_kick() -- frames the first read produced (a pong, say)
  return ws
end

local function refuse(stream, status, headers, body, deadline)
  write_all(stream, core.http_response(status, headers, body), deadline)
  stream:close()
end

local function none() end

--- Server side: read the upgrade request from stream (after opts.request,
--- bytes of it the host has already read), check it and answer it. Takes the
--- options of duplex.listen that concern one connection (protocols, origins,
--- on_request, deflate, limits, heartbeat...), plus remote_address. Returns
--- the connection and the request, or nil, err and (when it got that far)
--- the request; a refused request has been answered (400, 403, 426...) and
--- the stream closed.
---@param stream duplex.Stream
---@param opts duplex.AcceptOptions|nil
---@return duplex.WebSocket|nil ws, duplex.Request|string|nil request_or_err, duplex.Request|nil request
function transport.accept(stream, opts)
  transport.check_stream(stream, "transport.accept", 2)
  opts = opts or {}
  options.check("transport.accept", opts, options.accept, 2)
  local route = handshake.route(opts, { handler = none }, 2)
  local deadline = now() + (opts.handshake_timeout or 10)
  local got = handshake.read_request(stream, opts, deadline, opts.request)
  local req = got.request
  if not req then
    if got.status then refuse(stream, got.status, nil, got.error, deadline) else stream:close() end
    return nil, got.error
  end
  if not req.websocket then
    local status, headers, body = handshake.refusal(req)
    refuse(stream, status, headers, body, deadline)
    return nil, "not a WebSocket upgrade: " .. tostring(req.error or req.method .. " " .. req.target), req
  end
  local answer = handshake.accept(route, req)
  if not answer.response then
    refuse(stream, answer.status, answer.headers, answer.body, deadline)
    return nil, "refused with " .. tostring(answer.status), req
  end
  local engine, info = answer.engine, answer.info
  local ok, werr = write_all(stream, answer.response, deadline)
  if not ok then
    engine:release()
    stream:close()
    return nil, werr, req
  end
  local rest = got.parser:rest()
  if #rest > 0 then engine:feed(rest) end
  info.remote_address = opts.remote_address
  return transport.connection(stream, engine, route, info), req
end

--- Client side: open a WebSocket on a stream already connected (and, for
--- wss, already encrypted) to the server of target, a ws:// or wss:// URL.
--- Takes the per-connection options of duplex.connect (protocols, headers,
--- origin, deflate, limits, heartbeat, timeout for the handshake).
--- Returns the connection, or nil, err and the response when the
--- server refused.
---@param stream duplex.Stream
---@param target string
---@param opts duplex.ConnectOptions|nil tls, proxy, follow_redirects and bind do not apply
---@return duplex.WebSocket|nil ws, string|nil err, duplex.Response|nil response
function transport.connect(stream, target, opts)
  transport.check_stream(stream, "transport.connect", 2)
  opts = opts or {}
  options.check("transport.connect", opts, options.connect, 2)
  local u, perr = url.parse(target)
  if not u then return nil, perr end
  local deadline = now() + (opts.timeout or 10)
  local hc, offer = handshake.start(u, opts)
  local ok, err = write_all(stream, hc:request(), deadline)
  if not ok then return nil, err end
  local got = handshake.read_response(stream, hc, offer, opts, deadline)
  if not got.engine then return nil, got.error, got.response end
  got.info.url = u
  return transport.connection(stream, got.engine, opts, got.info)
end

return transport
