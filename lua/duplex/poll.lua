--- duplex for hosts that call us once per frame (game loops): no coroutines
--- to write. client:poll() does the pending non-blocking I/O, keeps the
--- heartbeat, reconnects with backoff, and calls the callbacks, all on the
--- host's stack; client:send() never waits.
---
--- local c = require("duplex.poll").connect("ws://127.0.0.1:8080/", {
---   on_open = function(c) c:send("hello") end,
---   on_message = function(c, msg, kind) print(msg) end,
---   on_close = function(c, code, reason, reconnecting) end,
--- })
--- while running do c:poll(); draw_frame() end
---
--- The connection itself runs in a task of duplex's loop, which poll()
--- advances one pass at a time (core.step): everything duplex.connect does
--- (TLS, proxies, redirects, limits, permessage-deflate) works here too.
local core = require "duplex.core"
local client = require "duplex.client"
local options = require "duplex.options"
local WebSocket = require "duplex.websocket"

local poll = {}

poll._reconnect_defaults = {
  min_delay = 0.5, -- seconds before the first retry
  max_delay = 30,  -- the delay doubles up to this
  jitter = 0.5,    -- each delay is randomly shortened by up to this share
}

---@class duplex.ReconnectOptions
---@field min_delay? number         seconds before the first retry, default 0.5
---@field max_delay? number         the delay doubles up to this, default 30
---@field jitter? number            each delay is shortened by a random share up to this, default 0.5

---@class duplex.PollOptions: duplex.ConnectOptions
---@field on_open? fun(c: duplex.PollClient)
---@field on_message? fun(c: duplex.PollClient, message: string, kind: "text"|"binary")
---@field on_close? fun(c: duplex.PollClient, code: integer, reason: string, reconnecting: boolean)
---@field on_error? fun(c: duplex.PollClient, err: string) an attempt failed
---@field reconnect? boolean|duplex.ReconnectOptions default true

---@class duplex.PollClient
---@field state "connecting"|"open"|"waiting"|"closed"
---@field ws duplex.WebSocket|nil   the current connection while open
---@field attempts integer          connection attempts since the last success
local Client = {}
Client.__index = Client

local function push(self, ...)
  local n = self.qtail + 1
  self.qtail = n
  self.queue[n] = table.pack(...)
end

local function backoff(self)
  local r = self.reconnect
  local delay = math.min(r.max_delay, r.min_delay * 2 ^ math.max(0, self.attempts - 1))
  return delay * (1 - r.jitter * math.random())
end

-- The task behind the client: connect, read until closed, wait, again.
local function run(self)
  while not self.closing do
    self.state = "connecting"
    self.attempts = self.attempts + 1
    local ws, err = client.connect(self.url, self.opts)
    if not ws then
      push(self, "error", err)
    elseif self.closing then
      ws:close(1000)
    else
      self.ws, self.state, self.attempts = ws, "open", 0
      push(self, "open")
      while true do
        local msg, kind, code, reason = ws:receive()
        if msg == nil then
          push(self, "close", code, reason)
          break
        end
        push(self, "message", msg, kind)
      end
      self.ws = nil
    end
    if self.closing or not self.reconnect then break end
    self.state = "waiting"
    self.retry_at = core.now() + backoff(self)
    self.parked = coroutine.running()
    core.park(math.max(0, self.retry_at - core.now()))
    self.parked = nil
  end
  self.state = "closed"
  push(self, "closed")
end

local POLL_OPTIONS = { reconnect = true, on_open = true, on_message = true, on_close = true, on_error = true }

--- Start connecting to url (ws:// or wss://); returns the client at once.
--- opts: on_open(c), on_message(c, msg, kind), on_close(c, code, reason,
--- reconnecting), on_error(c, err) (a failed attempt), reconnect (true, or
--- a table like poll._reconnect_defaults; default true), and every option of
--- duplex.connect. Messages queue without waiting up to max_buffered
--- (default 16 MiB).
---@param url string
---@param opts duplex.PollOptions|nil
---@return duplex.PollClient
function poll.connect(url, opts)
  if type(url) ~= "string" then error("duplex.poll.connect: URL string expected", 2) end
  opts = opts or {}
  -- the poll client's own options; the rest are duplex.connect's
  local copts = {}
  for k, v in pairs(opts) do
    if not POLL_OPTIONS[k] then copts[k] = v end
  end
  options.check("duplex.poll.connect", copts, options.connect, 2)
  -- send() must never wait here: the queue may grow to max_buffered (the
  -- engine fails a peer that lets it grow past that, as frames are queued).
  copts.max_buffered = opts.max_buffered or WebSocket._defaults.max_buffered
  copts.high_water, copts.low_water = copts.max_buffered, copts.max_buffered
  local reconnect = opts.reconnect
  if reconnect == nil or reconnect == true then reconnect = {} end
  if reconnect then
    local r = {}
    for k, v in pairs(poll._reconnect_defaults) do r[k] = reconnect[k] or v end
    reconnect = r
  end
  local self = setmetatable({
    url = url, opts = copts, reconnect = reconnect, callbacks = opts,
    queue = {}, qhead = 1, qtail = 0, attempts = 0, state = "connecting",
  }, Client)
  core.spawn(run, self)
  return self
end

local function dispatch(self, ev)
  local cb = self.callbacks
  local kind = ev[1]
  if kind == "message" then
    if cb.on_message then cb.on_message(self, ev[2], ev[3]) end
  elseif kind == "open" then
    if cb.on_open then cb.on_open(self) end
  elseif kind == "close" then
    if cb.on_close then cb.on_close(self, ev[2], ev[3], self.reconnect ~= false and not self.closing) end
  elseif kind == "error" then
    if cb.on_error then cb.on_error(self, ev[2]) end
  end
end

--- Advance: wait at most timeout seconds (default 0) for I/O, then call the
--- callbacks for everything that happened. Returns how many it called.
--- A callback's error propagates out of poll(); the rest stay queued.
---@param timeout number|nil
---@return integer
function Client:poll(timeout)
  core.step(timeout or 0)
  local n = 0
  while self.qhead <= self.qtail do
    local i = self.qhead
    local ev = self.queue[i]
    self.queue[i] = nil
    self.qhead = i + 1
    n = n + 1
    dispatch(self, ev)
  end
  return n
end

--- Queue a message ("text" by default, or "binary"); poll() sends it.
--- Returns true, or nil and "not open" (while connecting or waiting to
--- reconnect: nothing is kept for later) or the connection's error.
---@param data string
---@param kind "text"|"binary"|nil
---@return true|nil ok, string|nil err
function Client:send(data, kind)
  local ws = self.ws
  if not ws or ws.state ~= "open" then return nil, "not open" end
  if ws:buffered() + #data > ws.max_buffered then return nil, "send queue over max_buffered" end
  return ws:send(data, kind)
end

--- Send a ping now (heartbeats are automatic; see ping_interval).
---@param data string|nil
---@return true|nil ok, string|nil err
function Client:ping(data)
  local ws = self.ws
  if not ws then return nil, "not open" end
  return ws:ping(data)
end

--- Round trip of the last heartbeat, seconds.
---@return number|nil
function Client:latency()
  return self.ws and self.ws.latency
end

--- Close for good (no reconnecting): the closing handshake completes over
--- the next polls, then on_close is called.
---@param code integer|nil default 1000
---@param reason string|nil
function Client:close(code, reason)
  self.closing = true
  if self.ws then
    self.ws:start_close(code or 1000, reason)
  elseif self.parked then
    core.wake(self.parked) -- stop waiting to reconnect
  end
end

--- Whether the client is done (closed, and not reconnecting).
---@return boolean
function Client:closed()
  return self.state == "closed"
end

return poll
