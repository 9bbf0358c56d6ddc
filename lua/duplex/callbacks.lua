--- Routes served by callbacks (on_open, on_message, on_close) instead of a
--- handler coroutine per connection.
---
--- On duplex.listen no coroutine waits for an open connection: its socket
--- is watched (core.watcher), and the server's one dispatcher coroutine
--- pumps each socket that has input (w:serve, a loop in C around
--- sock:pump, which never waits), calling on_message for every message. An
--- idle connection then costs its socket, engine, request and object: what
--- servers with many mostly idle players need. The price: on_message and
--- on_close must not wait (core.call_nowait makes one that tries fail,
--- instead of stopping every connection of the server), so here send()
--- queues and never waits, and close() starts the closing handshake and
--- returns. What may wait goes
--- into a coroutine of its own (duplex.spawn): on_open runs in the
--- connection's first coroutine and may wait, and so do the rare steps of
--- the closing handshake.
---
--- Other hosts (cqueues, nginx, duplex.transport) run the same callbacks
--- from a coroutine per connection (ws:serve).
local core = require "duplex.core"
local WebSocket = require "duplex.websocket"

local call_nowait = core.call_nowait

local callbacks = {}

---@class duplex.CallbackWebSocket: duplex.WebSocket
local Callback = WebSocket._subclass()
callbacks.WebSocket = Callback

-- Sending never waits: the peer that keeps more than high_water queued is
-- given send_timeout to get below low_water (as a waiting send would), and
-- is then closed as a slow consumer; max_buffered, checked by the engine,
-- closes it at once. The send timeout is the transport's rule, not the
-- protocol's: a loop timer of its own for the few connections over
-- high_water (_over), none for the rest.
local function send_timed_out(_, ws)
  ws._over = nil
  if ws.state ~= "open" then return end
  if ws.sock:buffered() > ws.low_water then
    return ws:close_slow_consumer("send timed out: the peer is not reading")
  end
end

function Callback:_room()
  local buffered = self.sock:buffered()
  if buffered > self.high_water then
    if not self._over then
      self._over = core.timer(self.send_timeout, function(timer) return send_timed_out(timer, self) end)
    end
  elseif self._over and buffered <= self.low_water then
    self._over:cancel()
    self._over = nil
  end
  return true
end

--- Start the closing handshake and return: the peer's answer arrives like
--- any input, and close_timeout ends the connection if it does not.
---@param code integer|nil default 1000
---@param reason string|nil
---@return true
function Callback:close(code, reason)
  WebSocket._check_close(code, reason, 2)
  return self:start_close(code, reason)
end

function Callback.receive()
  error("receive: this connection's messages go to its route's on_message", 2)
end
Callback.messages = Callback.receive

-- The end of the connection, however it came: on_close, and the server
-- lets go of it.
function Callback:_finish(code, reason, err)
  if self.state == "closed" then return end
  if self._over then self._over:cancel() end
  WebSocket._finish(self, code, reason, err)
  self.server:_ended(self)
end

--- What to do with a pump's result other than "again" or closed: the
--- server's watcher (w:serve) pumps each socket with input,
--- ws.sock:pump(ws.engine, ws.high_water, ws.low_water, on_message, ws) in
--- C (core.pump), which hands each message to its route's on_message and
--- stops at any other event. Over high_water, the input waits until the
--- peer has read down to low_water (what a handler's waiting send does to
--- the peer too). Returns true when ws has more to pump.
---@param ws duplex.CallbackWebSocket
---@param kind string|false|nil
---@return boolean
function callbacks.after(ws, kind, data, a, b, c)
  local ok, err
  if kind == false then
    err = "on_message failed: " .. tostring(data)
  elseif kind == "ping" or kind == "pong" then
    ok, err = call_nowait(ws._event, ws, kind, data, a, b, c) -- on_pong may raise
    if ok then return true end
  elseif kind == "close" and ws.sock:try_flush() == 0 then
    -- the peer's close answered, and the answer written: what is left of
    -- the closing handshake (the server drops TCP, on_close) cannot wait,
    -- so it needs no coroutine
    ws.sock:watch(nil)
    ok, err = call_nowait(ws._event, ws, kind, data, a, b, c)
    if ok then return false end
  elseif kind then
    -- the closing handshake with output still to write, a protocol error,
    -- an overflow: they may wait (a flush, a linger), so they go on in a
    -- coroutine of their own, the socket no longer watched
    ws.sock:watch(nil)
    core.spawn(ws._event, ws, kind, data, a, b, c)
    return false
  else
    ws:_lost(data)
    return false
  end
  ws.server._log_error(tostring(err))
  ws:start_close(1011, "internal error")
  return true
end

return callbacks
