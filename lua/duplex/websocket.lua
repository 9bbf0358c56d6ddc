--- A WebSocket connection, for both roles: the engine (protocol) on top of a
--- socket (bytes), with heartbeats, backpressure and the closing handshake.
---
--- The connection is read only while someone reads it: a server handler or
--- a client keeps calling receive() (or iterates messages()), and that call
--- also answers pings, notices pongs and completes the closing handshake.
local core = require "duplex.core"
local runtime = require "duplex.runtime"

local blocking = runtime.blocking
local now = core.now
local type = type
-- LuaJIT's core has no loop, so no connection there waits through blocking
local isyieldable = coroutine.isyieldable or function() return false end

---@class duplex.WebSocket
---@field role "server"|"client"
---@field state "open"|"closing"|"closed"
---@field protocol string|nil          the subprotocol both sides agreed on
---@field extensions string|nil        the negotiated Sec-WebSocket-Extensions value
---@field deflate boolean              permessage-deflate is on
---@field request duplex.Request|nil   server side: the upgrade request
---@field server duplex.Server|nil     server side, on duplex.listen: the server that accepted it
---@field response duplex.Response|nil client side: the 101 response
---@field url duplex.URL|nil           client side: the URL connected to, after redirects
---@field remote_address string        peer address (client address behind a trusted proxy)
---@field remote_port integer
---@field close_code integer|nil       once closed: the peer's close code, or 1006
---@field close_reason string|nil
---@field close_by_peer boolean|nil    after a closing handshake: the peer started it
---@field error string|nil             why the connection failed, when it did
---@field latency number|nil           round trip of the last heartbeat, seconds
---@field data table                   the application's per-connection state; the library never touches it
---@field on_pong fun(ws: duplex.WebSocket, data: string)|nil set by the application: called on each pong
---@field dropped integer|nil          messages duplex.pubsub dropped for it (overflow = "drop")
local WebSocket = {}
WebSocket.__index = WebSocket
-- Connections on our loop: a loop timer of their socket keeps the engine's
-- clocks (heartbeats, the close deadline: sock:clock), waiting goes through
-- runtime.blocking, and the loop writes queued frames at the end of each
-- pass. WebSocket.Hosted (below) changes exactly these three.
WebSocket.watched = true
WebSocket._wait = blocking
function WebSocket._kick(_) return true end

local defaults = {
  ping_interval = 20,   -- seconds of silence before a ping; 0 turns heartbeats off
  ping_timeout = 20,    -- seconds to wait for any traffic after that ping
  close_timeout = 5,    -- seconds to wait for the peer's close frame / TCP close
  high_water = 1048576, -- send() waits while more than this is buffered (1 MiB)
  low_water = 262144,   -- ... until it drops below this (256 KiB)
  max_buffered = 16777216, -- a peer that lets more pile up is closed (checked by the engine as frames are queued)
  send_timeout = 30,    -- seconds send() may wait for a slow peer before closing it
  compress_threshold = 128, -- with permessage-deflate, smaller messages go plain
}
WebSocket._defaults = defaults

-- A connection's table holds only what is its own: a setting equal to the
-- default, and every field whose value is the usual one, is read through
-- the class from here (ten thousand idle connections each keep a hash part
-- of 16 entries instead of 32).
local shared = {
  role = "server", state = "open", streaming = false, deflate = false,
}
-- The class holds copies of both, not a chain to them: every message reads
-- a few fields no connection has of its own (high_water, deflate, a
-- _sending that is not there), and each link of a chain costs a lookup.
for k, v in pairs(defaults) do WebSocket[k] = v end
for k, v in pairs(shared) do WebSocket[k] = v end

-- The object: core.connection's userdata (its fields in C, a table only
-- for what most connections never have, ws.data made when first read);
-- a table of the class where the core has none (LuaJIT's).
local new_object = core.connection or function(class, sock, engine, fields)
  local self = setmetatable({ sock = sock, engine = engine, data = {} }, class)
  for k, v in pairs(fields) do
    if v ~= class[k] then self[k] = v end
  end
  return self
end

--- Wrap an engine attached to a socket. Used by duplex.server and
--- duplex.client once the handshake is done; class is WebSocket (our loop)
--- or WebSocket.Hosted (a host's stream, see duplex.transport).
---@param sock duplex.core.Socket|duplex.Conduit
---@param engine duplex.core.Engine handshake done
---@param opts duplex.ConnectionOptions
---@param info table fields the connection carries (request, protocol, deflate...)
---@param class table|nil
---@return duplex.WebSocket
function WebSocket.new(sock, engine, opts, info, class)
  class = class or WebSocket
  -- info's fields, those that are not the class's
  local self = new_object(class, sock, engine, info)
  local role = engine:role()
  if role ~= class.role then self.role = role end
  -- a route's class holds the route's settings already (_route_class)
  if opts ~= class._route then
    if opts.streaming and not class.streaming then self.streaming = true end
    for k in pairs(defaults) do
      local o = opts[k]
      if o ~= nil and o ~= class[k] then self[k] = o end
    end
  end
  -- a route's connection has the route's settings, which its class holds
  -- (and read from there, a table, they cost no lookup through the object)
  local settings = opts == class._route and class or self
  if settings.low_water > settings.high_water then self.low_water = settings.high_water end
  -- the engine owns the rules of time (heartbeat, close deadline), here and
  -- on every host; on our loop the socket keeps its clock
  engine:set_timing(settings.ping_interval, settings.ping_timeout, settings.close_timeout)
  if class.watched then sock:clock(self) end
  return self
end

function WebSocket:__tostring()
  return string.format("duplex.websocket (%s, %s, %s:%s)", self.role, self.state,
    tostring(self.remote_address), tostring(self.remote_port))
end

--- The connection is over: remember why, stop watching it, drop the socket.
function WebSocket:_finish(code, reason, err)
  if self.state == "closed" then return end
  self.state = "closed"
  -- what is set already (the peer's close frame) stays: each field of the
  -- object read or written is a call into it, so none without a reason
  if self.close_code == nil then self.close_code = code end
  if self.close_reason == nil then self.close_reason = reason or "" end
  if err ~= nil and self.error == nil then self.error = err end
  self.sock:close(err ~= nil)
  self.engine:release()
end

function WebSocket:_closed_result()
  return nil, "closed", self.close_code, self.close_reason
end

--- The socket is gone without a closing handshake (RFC 6455 §7.1.5: 1006).
function WebSocket:_lost(err)
  -- The socket says only "closed" at end of stream: say who and how.
  if err == "closed" or err == nil then err = "the peer closed the connection without a closing handshake" end
  self:_finish(1006, self._abort_reason or err, self._abort_reason or err)
  return self:_closed_result()
end

--- After the closing handshake: the server drops TCP at once (RFC 6455
--- §7.1.1), the client gives the server close_timeout to do it first.
function WebSocket:_end_tcp()
  local sock = self.sock
  sock:flush(self.close_timeout)
  if self.role == "client" then
    local deadline = now() + self.close_timeout
    while true do
      local left = deadline - now()
      if left <= 0 then break end
      local data = sock:read(nil, left)
      if not data then break end
    end
  end
end

--- After failing the connection (RFC 6455 §7.1.7) the peer may still be
--- sending what we refused (a message over max_message, say). Closing with
--- its bytes unread would reset the connection, and the reset can destroy
--- our close frame before the peer reads it: so send FIN and discard its
--- input until it closes too, for at most close_timeout.
function WebSocket:_linger()
  local sock = self.sock
  if not sock:shutdown(self.close_timeout) then return end
  local deadline = now() + self.close_timeout
  while true do
    local left = deadline - now()
    if left <= 0 or not sock:read(nil, left) then break end
  end
end

-- Handle one engine event other than a whole message. Returns true when
-- receive() should return the values that follow; otherwise the event was
-- consumed here.
function WebSocket:_event(kind, data, a, b, c)
  if kind == "fragment" then return true, data, a, c end
  if kind == "ping" then
    self:_kick() -- the engine queued the pong: on a host's stream, write it now
    return false
  elseif kind == "pong" then
    if a then self.latency = a end -- it answered our ping
    if self.on_pong then
      -- the callback's error goes to receive's caller, and the connection
      -- stays usable: it is not left marked as being read
      local ok, err = pcall(self.on_pong, self, data)
      if not ok then
        self._reading = false
        error(err, 0)
      end
    end
    return false
  elseif kind == "close" then
    self.close_code, self.close_reason, self.close_by_peer = a, data, b
    self.state = "closing"
    self:_end_tcp()
    self:_finish(a, data)
    return true, nil, "closed", a, data -- _closed_result's, from what was just set
  elseif a == 1008 then -- the engine's output limit (max_buffered) was passed
    self:close_slow_consumer("send buffer over max_buffered: the peer is not reading")
    return true, self:_closed_result()
  else -- "error": the peer broke the protocol; our close frame is queued
    self.close_code, self.close_reason = a, data
    self.error = "protocol error: " .. data
    self.state = "closing"
    self:_linger()
    self:_finish(a, data, self.error)
    return true, nil, "closed", a, data
  end
end

-- How long the next read may wait: until the caller's deadline, and on a
-- connection no loop timer watches, until its engine's clock is due (the
-- reader keeps it then, between reads).
local function read_wait(self, deadline)
  local t = now()
  local wait = deadline and math.max(0, deadline - t)
  if not self.watched then
    local due = self.engine:due()
    if due and (not wait or due - t < wait) then wait = math.max(0, due - t) end
  end
  return wait
end

local function receive(self, timeout)
  local deadline = timeout and now() + timeout
  local watched = self.watched
  self._reading = true
  while true do
    if self.state == "closed" then
      self._reading = false
      return self:_closed_result()
    end
    -- The next event, parsed from what was read before or from a new read.
    -- An idle connection's coroutine waits in this call, and its stack is
    -- as deep as the registers in use here: few locals above it.
    local kind, data, a, b, c = self.sock:receive(self.engine,
      (deadline or not watched) and read_wait(self, deadline) or nil)
    if kind then
      if kind == "text" or kind == "binary" then -- the common case, first
        self._reading = false
        return data, kind
      end
      local deliver, r1, r2, r3, r4 = self:_event(kind, data, a, b, c)
      if deliver then
        self._reading = false
        return r1, r2, r3, r4
      end
    elseif data == "timeout" and not (deadline and now() >= deadline) then
      self:_tick() -- the clock's turn (read_wait)
    elseif data == "timeout" then
      self._reading = false
      return nil, "timeout"
    else
      self._reading = false
      return self:_lost(data)
    end
  end
end

--- Wait for the next message. Returns the message and its kind ("text" or
--- "binary"); in streaming mode a piece, its kind and whether it is the last
--- piece. Returns nil, "timeout" when timeout seconds pass (the connection
--- stays usable), or nil, "closed", code, reason once the connection is over.
---@param timeout number|nil seconds; nil waits as long as it takes
---@return string|nil message, string kind_or_error, integer|boolean|nil, string|nil
function WebSocket:receive(timeout)
  if self._reading then error("receive: another coroutine is already reading this connection", 2) end
  -- In a coroutine, blocking would call receive at once: skip that detour,
  -- taken once per message.
  local wait = self._wait
  if wait ~= blocking or isyieldable() then return receive(self, timeout) end
  return wait(receive, self, timeout)
end

--- Iterate over messages until the connection closes:
--- `for message, kind in ws:messages() do ... end`
---@return fun(): string|nil, string|nil, boolean|nil
function WebSocket:messages()
  return self._next_message, self
end

-- The iterator without a closure per connection: the generic for hands it
-- the connection, and receive's nil at the end stops the loop.
local function next_message(self)
  return self:receive()
end
WebSocket._next_message = next_message

-- The rest of a step of messages() whose read core.fast_next made (on our
-- loop): what receive does with an event that is not a whole message, or
-- (kind nil) with a failed read, data saying why.
local function after_event(self, kind, data, a, b, c)
  if not kind then return self:_lost(data) end
  self._reading = true
  local deliver, r1, r2, r3, r4 = self:_event(kind, data, a, b, c)
  self._reading = false
  if deliver then return r1, r2, r3, r4 end
  return self:receive()
end

local function wait_for_room(self)
  local sock = self.sock
  local buffered = sock:buffered()
  if buffered <= self.high_water then return true end
  local ok, err = sock:drain(self.low_water, self.send_timeout)
  if ok then return true end
  if err == "timeout" then
    self:close_slow_consumer("send timed out: the peer is not reading")
    return nil, "timeout"
  end
  return self:_lost(err)
end

--- Close a peer that does not read fast enough, at once: a best-effort close
--- frame 1008 (policy violation) and the connection ends; ws.error says why.
--- What duplex.pubsub does to a subscriber over its backlog.
---@param why string
function WebSocket:close_slow_consumer(why)
  if self.state ~= "open" then return end
  -- The close frame queues behind the backlog the peer is not reading, so
  -- it is sent on a best-effort basis: the connection ends now either way.
  self.engine:close(1008, "slow consumer")
  self.error = why
  self:_finish(1006, why)
end

-- The engine refused a frame: on its output limit (max_buffered, counted
-- when a frame is queued) the connection has failed.
function WebSocket:_refused(err)
  if err == "overflow" then
    self:close_slow_consumer("send buffer over max_buffered: the peer is not reading")
    return nil, "closed"
  end
  return nil, self.state == "open" and err or "closed"
end

local function check_kind(kind, level)
  if kind ~= "text" and kind ~= "binary" then
    error("message kind must be \"text\" or \"binary\", got " .. tostring(kind), level + 1)
  end
end

-- After queueing a frame: return at once while the queue is under
-- high_water (the common case, no detour through runtime.blocking), else
-- wait for the peer to catch up.
function WebSocket:_room()
  if self.sock:buffered() <= self.high_water then return true end
  return self._wait(wait_for_room, self)
end

-- send's error level for its caller's mistakes: the caller's own, also
-- when it called through core.fast_send (below), a C frame in between.
local function caller_level()
  return debug.getinfo(3, "S").what == "C" and 3 or 2
end

--- Send a whole message. kind is "text" (the default) or "binary"; text must
--- be valid UTF-8. Waits (yields) while the peer is too slow to take more.
--- opts.compress forces permessage-deflate on or off for this message.
---@param data string
---@param kind "text"|"binary"|nil
---@param opts {compress: boolean}|nil
---@return true|nil ok, string|nil err
function WebSocket:send(data, kind, opts)
  kind = kind or "text"
  if kind ~= "binary" and kind ~= "text" then check_kind(kind, caller_level()) end
  if type(data) ~= "string" then error("send: message must be a string", caller_level()) end
  if self._sending then error("send: a fragmented message is open; finish it with send_fragment", caller_level()) end
  if self.state ~= "open" then return nil, "closed" end
  local compress = false
  if self.deflate then
    if opts and opts.compress ~= nil then compress = opts.compress
    else compress = #data >= self.compress_threshold end
  end
  local ok, err = self.engine:send(data, kind, true, compress)
  if not ok then return self:_refused(err) end
  return self:_room()
end

-- On our loop, the common case of both is C's (core.fast_send,
-- core.fast_next: no Lua frame per message), the rest these functions'.
-- Hosted keeps the Lua ones (its _room writes every frame out), and so
-- does LuaJIT's core, which has no loop.
local lua_send = WebSocket.send
if core.fast_send then
  WebSocket.send = core.fast_send(lua_send)
  WebSocket._next_message = core.fast_next(next_message, after_event)
end

--- Send a message in pieces: the first call gives the kind, the last one
--- fin = true. Other messages may not be sent in between (pings may).
---@param data string
---@param kind "text"|"binary"|nil  kind of the message (first piece only)
---@param fin boolean               true for the last piece
---@return true|nil ok, string|nil err
function WebSocket:send_fragment(data, kind, fin)
  if type(data) ~= "string" then error("send_fragment: data must be a string", 2) end
  kind = kind or "text"
  if not self._sending then check_kind(kind, 2) end
  if self.state ~= "open" then return nil, "closed" end
  local first = not self._sending
  local ok, err = self.engine:send(data, first and kind or "continuation", fin and true or false,
    first and self.deflate)
  if not ok then return self:_refused(err) end
  self._sending = not fin
  return self:_room()
end

--- A pre-encoded frame (duplex.encode_frame / pubsub): queued as is, no wait.
---@param frame string
---@return true|nil ok, string|nil err
function WebSocket:send_frame(frame)
  if self.state ~= "open" or self._sending then return nil, "closed" end
  local ok, err = self.engine:send_raw(frame)
  if not ok then return self:_refused(err) end
  return self:_kick()
end

--- Send a ping. The pong's arrival is reported in ws.latency and to
--- ws.on_pong(ws, payload) when set.
---@param data string|nil up to 125 bytes
---@return true|nil ok, string|nil err
function WebSocket:ping(data)
  if self.state ~= "open" then return nil, "closed" end
  local ok, err = self.engine:ping(data or "")
  if not ok then return self:_refused(err) end
  return self:_kick()
end

--- An unsolicited pong: a one-way heartbeat (RFC 6455 §5.5.3) that asks
--- for no answer. Pings are answered without this.
---@param data string|nil up to 125 bytes
---@return true|nil ok, string|nil err
function WebSocket:pong(data)
  if self.state ~= "open" then return nil, "closed" end
  local ok, err = self.engine:pong(data or "")
  if not ok then return self:_refused(err) end
  return self:_kick()
end

-- The close arguments, judged by the engine's rule (core.close_check)
-- before anything here changes: a bad code is the caller's mistake.
local function check_close(code, reason, level)
  local ok, why = core.close_check(code or 1000, reason or "")
  if not ok then error("close: " .. why, level + 1) end
end
WebSocket._check_close = check_close

--- Send our close frame without waiting for the answer: whoever reads the
--- connection sees the peer's reply; the engine's clock drops the
--- connection if none comes within close_timeout. Used for graceful
--- shutdown of many at once.
---@param code integer|nil default 1000
---@param reason string|nil
---@return true
function WebSocket:start_close(code, reason)
  check_close(code, reason, 2)
  if self.state ~= "open" then return true end
  self.state = "closing"
  -- This fails only when the engine has already read the peer's close frame
  -- and answered it; the event waits in its queue for the next reader.
  self.engine:close(code or 1000, reason or "")
  self:_kick()
  return true
end

local function close(self, code, reason)
  self:start_close(code, reason)
  if self._reading then return true end -- the reader sees the reply
  -- Nobody reads: wait for the peer's close frame ourselves (the engine's
  -- clock ends the wait after close_timeout).
  while self.state ~= "closed" do receive(self) end
  return true
end

--- Start the closing handshake (RFC 6455 §7): code defaults to 1000. Waits
--- for the peer's answer up to close_timeout unless another coroutine is
--- reading the connection (then that reader sees the close).
---@param code integer|nil
---@param reason string|nil
---@return true
function WebSocket:close(code, reason)
  check_close(code, reason, 2)
  if self.state ~= "open" then return true end
  return self._wait(close, self, code or 1000, reason or "")
end

-- A callback route (on_open, on_message) where the host runs a coroutine
-- per connection anyway; duplex.listen serves it without (duplex.callbacks).
local function run_callbacks(ws, spec, req)
  if spec.on_open then spec.on_open(ws, req) end
  local on_message = spec.on_message
  for message, kind in ws:messages() do on_message(ws, message, kind) end
end

--- Run a server handler on this connection, the same on every host (for
--- hosts: duplex.cqueues, duplex.nginx and duplex.transport's call it):
--- spec.handler(ws, req), or spec's callbacks; an error in them goes to
--- log(message) and closes with 1011, returning closes with 1000. Then,
--- whatever ended the connection, spec.on_close(ws, code, reason). The
--- connection is over when this returns.
---@param spec duplex.RouteOptions what runs: its handler or callbacks, and on_close
---@param req duplex.Request
---@param log fun(message: string)
function WebSocket:serve(spec, req, log)
  local ok, err
  if spec.handler then
    ok, err = xpcall(spec.handler, debug.traceback, self, req)
  else
    ok, err = xpcall(run_callbacks, debug.traceback, self, spec, req)
  end
  return self:_served(spec, ok, err, log)
end

--- What follows a handler (serve above; on our loop, duplex.server runs
--- it once the handler's coroutine has ended: core.at_end): ok and err
--- as xpcall with debug.traceback gives them.
---@param spec duplex.RouteOptions
---@param ok boolean
---@param err any
---@param log fun(message: string)
function WebSocket:_served(spec, ok, err, log)
  local state = self.state -- usually "closed" already: one read of it then
  if not ok then
    log("handler failed: " .. tostring(err))
    self:close(1011, "internal error")
    state = self.state
  elseif state == "open" then
    self:close(1000)
    state = self.state
  end
  if state ~= "closed" then self:abort("handler returned") end
  if spec.on_close then
    ok, err = xpcall(spec.on_close, debug.traceback, self, self.close_code, self.close_reason)
    if not ok then log("on_close failed: " .. tostring(err)) end
  end
end

--- For `local ws <close> = assert(duplex.connect(url))`: leaving the scope
--- closes the connection, with 1000, or 1011 when an error is leaving it.
function WebSocket:__close(err)
  if self.state == "open" then self:close(err == nil and 1000 or 1011) end
  if self.state ~= "closed" then self:abort(err == nil and "closed by scope exit" or tostring(err)) end
end

--- Drop the TCP connection at once, without a closing handshake.
---@param why string|nil ws.error and close_reason, default "aborted"
function WebSocket:abort(why)
  if self.state == "closed" then return end
  self._abort_reason = why or "aborted"
  self:_finish(1006, self._abort_reason, self._abort_reason)
end

--- Bytes queued for the peer and not yet written.
---@return integer
function WebSocket:buffered()
  if self.state == "closed" then return 0 end
  return self.sock:buffered()
end

--- Write what the kernel takes now, without waiting; returns the bytes
--- still queued (what the peer is really not reading yet).
---@return integer
function WebSocket:try_flush()
  if self.state == "closed" then return 0 end
  return self.sock:try_flush()
end

--- The engine's clock says the connection is over (e:tick()'s word): on
--- our loop the socket's timer calls this, on a host's stream the reader.
---@param what "ping timeout"|"close timeout"|"overflow"
function WebSocket:_timeout(what)
  if what == "overflow" then -- the heartbeat's ping passed max_buffered
    return self:close_slow_consumer("send buffer over max_buffered: the peer is not reading")
  end
  self:abort(what)
end

--- A reader's turn at the clock (a connection no loop timer watches): the
--- heartbeat's ping, a quiet connection's shrink, or the verdict.
function WebSocket:_tick()
  local what = self.engine:tick()
  if what then return self:_timeout(what) end
  self:_kick() -- the heartbeat's ping: on a host's stream, write it now
end

-- A kind of connection that changes some of these methods (Hosted below,
-- duplex.callbacks): a copy of the class (base, default WebSocket), not a
-- link to it, for the reason the class copies its defaults (each link of a
-- chain is one more lookup, and every message reads fields no connection
-- has of its own).
function WebSocket._subclass(base)
  local class = {}
  for k, v in pairs(base or WebSocket) do class[k] = v end
  class.__index = class
  return class
end

--- The class of one route's connections (duplex.server): the route's
--- settings and the fields every connection of it shares (shared_fields:
--- its server, its route) are read through the class, so a connection's
--- own table holds only what is its own: with ten thousand idle
--- connections, a hash part of 8 entries each instead of 16.
---@param base table WebSocket or a kind of it
---@param opts duplex.ConnectionOptions the route's settings
---@param shared_fields table
---@return table class
function WebSocket._route_class(base, opts, shared_fields)
  local class = WebSocket._subclass(base)
  for k in pairs(defaults) do
    if opts[k] ~= nil then class[k] = opts[k] end
  end
  if opts.streaming then class.streaming = true end
  if class.low_water > class.high_water then class.low_water = class.high_water end
  for k, v in pairs(shared_fields) do class[k] = v end
  return class
end

--- A connection over a host's stream (duplex.transport): the host's own
--- coroutines wait (cqueues, nginx cosockets), the reader keeps the
--- heartbeat, and whoever queues a frame writes it out.
---@class duplex.HostedWebSocket: duplex.WebSocket
local Hosted = WebSocket._subclass()
Hosted.watched = false
Hosted.send, Hosted._next_message = lua_send, next_message
function Hosted._wait(fn, ...) return fn(...) end

function Hosted:_room()
  local ok, err = self.sock:flush(self.send_timeout)
  if ok then return true end
  if err == "timeout" then
    self:close_slow_consumer("send timed out: the peer is not reading")
    return nil, "timeout"
  end
  return self:_lost(err)
end
Hosted._kick = Hosted._room

WebSocket.Hosted = Hosted

return WebSocket
