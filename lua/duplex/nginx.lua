--- duplex inside nginx (lua-nginx-module, LuaJIT): an nginx location hands
--- the request to duplex, which answers the upgrade and runs the connection
--- over the raw request cosocket. Every protocol rule is the shared code's
--- (duplex.websocket); this file moves bytes and fits nginx's rules:
---
--- * a cosocket belongs to the request that made it, so a timer or another
---   request cannot write to it: duplex.nginx.post(ws, msg) queues the
---   message and wakes a light thread of the connection's own request,
---   which sends it (server push from anywhere in the worker);
--- * a read that times out keeps nothing back (receiveany), so a heartbeat
---   wait never cuts a frame in two;
--- * code that waits on its own (duplex.redis's client) spawns, parks and
---   wakes through duplex.runtime's host, here light threads and
---   semaphores (M.host), in the one timer or request that owns its
---   cosockets.
---
--- location /ws { content_by_lua_block {
---   require("duplex.nginx").serve { handler = function(ws, req)
---     for msg, kind in ws:messages() do ws:send(msg, kind) end
---   end }
--- } }
local core = require "duplex.core"
local handshake = require "duplex.handshake"
local transport = require "duplex.transport"
local options = require "duplex.options"
local runtime = require "duplex.runtime"

local ngx = ngx
local M = {}

local NO_LIMIT = 2147483647 -- ms: the largest timeout a cosocket takes

local function ms(timeout)
  if not timeout then return NO_LIMIT end
  return math.max(1, math.floor(timeout * 1000 + 0.5))
end

-- duplex.Stream over a cosocket (documented there).
---@class duplex.NginxStream: duplex.Stream
local Stream = {}
Stream.__index = Stream

---@class duplex.NginxOptions: duplex.RouteOptions
---@field max_header_size? integer    default 8192 (431 beyond)
---@field max_headers? integer        default 100

--- The stream interface of duplex.transport over a cosocket (the raw request
--- socket, or a tcp cosocket for a client connection).
---@param sock any ngx.req.socket(true) or ngx.socket.tcp()
---@return duplex.Stream
function M.stream(sock)
  return setmetatable({ sock = sock }, Stream)
end

-- A client cosocket's reader waits in slices of this many seconds: a
-- cosocket will not close under another light thread's read ("socket busy
-- reading"), so a close asked meanwhile is the reader's to do when its
-- slice ends.
local SLICE = 1

function Stream:read(max, timeout)
  local sock = self.sock
  if not sock.close then -- the raw request socket: nobody else closes it
    sock:settimeouts(NO_LIMIT, NO_LIMIT, ms(timeout))
    local data, err = sock:receiveany(max)
    if data then return data end
    return nil, err -- "timeout", "closed" or the system error
  end
  local deadline = timeout and core.now() + timeout
  while not self.closing do
    local wait = deadline and math.max(0, deadline - core.now())
    sock:settimeouts(NO_LIMIT, NO_LIMIT, ms(wait and math.min(wait, SLICE) or SLICE))
    local data, err = sock:receiveany(max)
    if data then return data end
    -- a timed-out read keeps nothing back, so the next slice loses nothing
    if err ~= "timeout" or (deadline and core.now() >= deadline) then return nil, err end
  end
  sock:close()
  return nil, "closed"
end

function Stream:write(data, timeout)
  local sock = self.sock
  sock:settimeouts(NO_LIMIT, ms(timeout), NO_LIMIT)
  local n, err = sock:send(data)
  if self.closing then sock:close() end
  if n then return true end
  -- A cosocket does not say how much went out: after a timeout here the
  -- connection cannot go on, and the connection object treats it so.
  return nil, err, 0
end

function Stream.yield(_)
  ngx.sleep(0)
end

function Stream:shutdown()
  local sock = self.sock
  if sock.shutdown then return sock:shutdown("send") end
  return nil
end

function Stream:close()
  -- The raw request socket closes when the request ends; a client
  -- cosocket closes now, or as soon as the light thread reading or
  -- writing it is done.
  if not self.sock.close then return end
  local ok, err = self.sock:close()
  if not ok and err and err:find("busy", 1, true) then self.closing = true end
end

function Stream:peer()
  -- ngx.var names the request's client: the peer of the raw request socket
  -- only. A client cosocket cannot tell whom it reached (and in a timer,
  -- ngx.var raises).
  if self.sock.close then return nil end
  return ngx.var.remote_addr, tonumber(ngx.var.remote_port)
end

local function refuse(status, headers, body)
  ngx.status = status
  for k, v in pairs(headers or {}) do ngx.header[k] = v end
  if body then ngx.print(body) end
  return ngx.exit(status)
end

-- nginx writes the status line and Connection itself; the other header
-- lines of the response the shared code built are copied over as they are.
local function send_switching_protocols(response)
  for name, value in response:gmatch("\r\n([^:\r\n]+): ([^\r\n]*)") do
    if name:lower() ~= "connection" then ngx.header[name] = value end
  end
  ngx.status = 101
  local ok, err = ngx.send_headers()
  if not ok then return nil, err end
  return ngx.flush(true)
end

--- Answer the current request's upgrade and return the connection and the
--- request (as duplex.listen's handlers get them), or nil, err after
--- answering a refusal (400, 403, 426... through ngx.exit). opts are those
--- of duplex.listen that concern one connection: protocols, origins,
--- on_request, headers, deflate, limits, heartbeat, send_timeout...
---@param opts duplex.NginxOptions|nil handler is not used
---@return duplex.WebSocket|nil ws, duplex.Request|string|nil request_or_err
function M.accept(opts)
  opts = opts or {}
  options.check("duplex.nginx.accept", opts, options.nginx, 2)
  local route = handshake.route(opts, { handler = function() end }, 2)
  local hs = core.handshake_server { max_header_size = opts.max_header_size, max_headers = opts.max_headers }
  -- nginx has read the request already: its raw header goes through the
  -- same parser and checks as on our own sockets.
  local req, status, msg = hs:feed(ngx.req.raw_header())
  if not req then
    refuse(status or 400, nil, msg)
    return nil, msg or "incomplete request"
  end
  if not req.websocket then
    refuse(handshake.refusal(req))
    return nil, "not a WebSocket upgrade"
  end
  req.remote_address, req.peer_port = ngx.var.remote_addr, tonumber(ngx.var.remote_port)
  local answer = handshake.accept(route, req)
  if not answer.response then
    refuse(answer.status, answer.headers, answer.body)
    return nil, "refused with " .. tostring(answer.status)
  end
  local engine, info = answer.engine, answer.info
  local ok, err = send_switching_protocols(answer.response)
  if not ok then engine:release(); return nil, "sending the 101 failed: " .. tostring(err) end
  local sock, serr = ngx.req.socket(true)
  if not sock then engine:release(); return nil, "no raw request socket: " .. tostring(serr) end
  return transport.connection(M.stream(sock), engine, route, info), req
end

-- ---- server push ----

local boxes = setmetatable({}, { __mode = "k" }) -- ws -> its outbox, per worker

--- Queue a message for ws from anywhere in this nginx worker (a timer,
--- another request, a shared-dict poller); ws's own request sends it.
--- Returns true, or nil, err when the connection is closed or its backlog
--- is over max_buffered (the connection is then closed as a slow consumer).
---@param ws duplex.WebSocket from duplex.nginx.serve
---@param data string
---@param kind "text"|"binary"|nil
---@return true|nil ok, string|nil err
function M.post(ws, data, kind)
  local box = boxes[ws]
  if not box or ws.state ~= "open" then return nil, "closed" end
  box.bytes = box.bytes + #data
  if box.bytes > ws.max_buffered then
    box.overflow = true
    box.sema:post(1)
    return nil, "backlog over max_buffered"
  end
  local n = box.last + 1
  box.last = n
  box[n] = data
  box.kind[n] = kind or "text"
  box.sema:post(1)
  return true
end

local function deliver(ws, box)
  while ws.state == "open" do
    local ok = box.sema:wait(3600)
    if box.overflow then
      ws:close_slow_consumer("outbox over max_buffered: the peer is not reading")
      break
    end
    if ok then
      while box.first <= box.last and ws.state == "open" do
        local i = box.first
        local data, kind = box[i], box.kind[i]
        box[i], box.kind[i] = nil, nil
        box.first = i + 1
        box.bytes = box.bytes - #data
        ws:send(data, kind)
      end
    end
  end
end

local function start_outbox(ws)
  local semaphore = require "ngx.semaphore"
  local box = { sema = semaphore.new(), first = 1, last = 0, bytes = 0, kind = {} }
  boxes[ws] = box
  return ngx.thread.spawn(deliver, ws, box)
end

-- ---- the host seam (duplex.runtime.set_host) on nginx's primitives ----

local function pack(...) return { n = select("#", ...), ... } end

-- The longest wait an ngx.semaphore takes (its milliseconds are a C int).
local LONGEST_WAIT = 2147483

local parking = setmetatable({}, { __mode = "k" }) -- coroutine -> { sema, parked, values }

-- As core.spawn's, the coroutine starts after spawn returns (ngx.sleep(0)
-- yields to the next turn of nginx's loop), so that the caller can note it
-- before it runs; an error in it is logged as duplex's loop logs one.
local function start(fn, ...)
  ngx.sleep(0)
  local ok, err = xpcall(fn, debug.traceback, ...)
  if not ok then runtime.log("error", "error in a light thread: " .. tostring(err)) end
end

local function spawn(fn, ...)
  local co, err = ngx.thread.spawn(start, fn, ...)
  if not co then error("ngx.thread.spawn failed: " .. tostring(err), 2) end
  return co
end

local function park(timeout)
  local co = coroutine.running()
  local spot = parking[co]
  if not spot then
    spot = { sema = require("ngx.semaphore").new() }
    parking[co] = spot
  end
  spot.parked, spot.values = true, nil
  local ok
  repeat
    ok = spot.sema:wait(timeout and math.min(timeout, LONGEST_WAIT) or LONGEST_WAIT)
  until ok or timeout or spot.values
  spot.parked = false
  local values = spot.values
  if not values then return nil, "timeout" end
  spot.values = nil
  -- woken as the wait timed out: the post is still counted, and would end
  -- the next park at once
  if not ok then spot.sema:wait(0) end
  return unpack(values, 1, values.n)
end

local function wake(co, ...)
  local spot = parking[co]
  if not (spot and spot.parked and not spot.values) then return false end
  spot.values = pack(...)
  spot.sema:post(1)
  return true
end

--- What duplex.runtime.set_host takes, on nginx's own primitives: light
--- threads (ngx.thread.spawn) for spawn, a semaphore per coroutine for park
--- and wake, the core's monotonic clock for now. Set by this module when
--- duplex.core has no loop (its LuaJIT build, inside nginx), so that
--- duplex.redis runs in a timer or a request: its cosockets, like every
--- cosocket, belong to that one context.
M.host = { spawn = spawn, park = park, wake = wake, now = core.now }

if not core.spawn then runtime.set_host(M.host) end

--- The whole content phase of a WebSocket location: accept, run
--- opts.handler(ws, req) (returning from it closes with 1000; an error in
--- it closes with 1011), with duplex.nginx.post(ws, ...) delivering from
--- anywhere in the worker while it runs.
---@param opts duplex.NginxOptions with a handler
function M.serve(opts)
  if type(opts) ~= "table" or (type(opts.handler) ~= "function" and type(opts.on_message) ~= "function") then
    error("duplex.nginx.serve: options with a handler or on_message function expected", 2)
  end
  local ws, req = M.accept(opts)
  if not ws then return end
  local writer = start_outbox(ws)
  ws:serve(opts, req, function(msg) ngx.log(ngx.ERR, "duplex: ", msg) end)
  boxes[ws].sema:post(1) -- let the writer see the end
  ngx.thread.wait(writer)
  boxes[ws] = nil
  return ngx.exit(ngx.OK)
end

return M
