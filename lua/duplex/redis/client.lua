--- A general Redis client on duplex's own sockets, or on any stream of
--- duplex.transport: commands, pipelines, pub/sub, reconnection.
---
--- Replies are matched to commands first in, first out on one connection,
--- so coroutines calling at once pipeline by themselves. Nobody reads the
--- connection between commands: the first coroutine waiting for a reply
--- reads for everyone and hands the reading on to the next when its own
--- reply is in. So an idle client costs no coroutine, and one coroutine on
--- another host (cqueues, over opts.stream) needs nothing of duplex's loop;
--- several coroutines at once, reconnecting and pub/sub need the host's
--- spawn, park and wake (duplex.runtime.set_host: nginx's, inside nginx).
---
--- RESP2 (duplex.resp): strings, integers, arrays as lists, null as false,
--- an error reply as { err = "ERR ..." } inside arrays and pipelines.
local core = require "duplex.core"
local resp = require "duplex.resp"
local url = require "duplex.url"
local options = require "duplex.options"
local runtime = require "duplex.runtime"

local now, command, blocking = runtime.now, resp.command, runtime.blocking
-- LuaJIT's main chunk is no coroutine (nil), which would pass for "nobody"
local MAIN = {}
local function running() return coroutine.running() or MAIN end
-- Lua 5.1 (LuaJIT, inside nginx) has them as globals, or not at all
local pack = table.pack or function(...) return { n = select("#", ...), ... } end
local unpack = table.unpack or rawget(_G, "unpack")

local client = {}

client.defaults = {
  url = "redis://127.0.0.1:6379",
  connect_timeout = 5, -- seconds for TCP, TLS, AUTH, SELECT and the first PING
  timeout = 5,         -- seconds for a command's reply; a later one drops the connection
  ping_interval = 5,   -- seconds of silence on the subscriber connection before a PING
  max_reply = 64 * 1048576,
  backoff_min = 0.1,
  backoff_max = 5,
}

local READ_SIZE = 65536

local function left(deadline) return math.max(0, deadline - now()) end

local function wake(co)
  if co and co ~= running() then runtime.wake(co) end
end

-- Connection ---------------------------------------------------------------

local Conn = {}
Conn.__index = Conn

function Conn.new(stream, max_reply, on_lost)
  return setmetatable({
    stream = stream, max_reply = max_reply, on_lost = on_lost,
    parser = resp.parser { max_bulk = max_reply },
    slots = {}, head = 1, tail = 0, -- replies awaited, the oldest at head
    outbox = {},
    reply_bytes = 0,                -- of the reply being read, across reads
  }, Conn)
end

--- Queue the bytes of n commands; returns their n slots, the last one
--- awaited by this coroutine (slot.done, then slot.value or slot.err).
function Conn:send(bytes, n, deadline)
  local owner, slots = running(), {}
  for i = 1, n do slots[i] = { owner = owner } end
  slots[n].awaited = true
  if self.dead then
    for _, s in ipairs(slots) do s.done, s.err = true, self.dead end
    return slots
  end
  for i = 1, n do self.slots[self.tail + i] = slots[i] end
  self.tail = self.tail + n
  self.outbox[#self.outbox + 1] = bytes
  if not self.writing then self:_flush(deadline) end
  return slots
end

-- One coroutine writes at a time (a stream's write may wait): bytes queued
-- meanwhile go out with its next write, in the order of their slots.
function Conn:_flush(deadline)
  self.writing = true
  while #self.outbox > 0 and not self.dead do
    local data = table.concat(self.outbox)
    self.outbox = {}
    local ok, err = self.stream:write(data, left(deadline))
    if not ok then self:fail("write failed: " .. tostring(err)) end
  end
  self.writing = false
end

function Conn:waiting() return self.tail - self.head + 1 end

--- Wait until slot is done (its reply, or the connection's failure). A
--- deadline passed drops the connection: the late reply could not be told
--- from the next one's, and a server that does not answer in time is taken
--- for hung. The reader itself cannot wait for a reply it has yet to read
--- (a message handler that subscribes): its slot comes back unfinished.
function Conn:await(slot, deadline)
  local me = running()
  while not slot.done do
    if self.reader == me then return slot end
    if self.reader then
      local _, err = runtime.park(left(deadline)) -- woken by the reply, or to read
      if err == "timeout" and not slot.done then self:fail("timeout") end
    else
      self:_lead(slot, deadline)
    end
  end
  return slot
end

function Conn:run(bytes, n, deadline)
  local slots = self:send(bytes, n, deadline)
  self:await(slots[n], deadline)
  return slots
end

-- Read for everyone until slot is done, then hand the reading to the
-- coroutine whose reply comes next.
function Conn:_lead(slot, deadline)
  self.reader = running()
  while not slot.done do
    local ok, err = self:_read(left(deadline))
    if not ok then self:fail(err) end
  end
  self.reader = nil
  local after = self.slots[self.head]
  if after then wake(after.owner) end
end

--- Read for as long as the connection lasts (the subscriber's, where pushes
--- come unasked). Silence is normal there: after interval seconds of it a
--- PING asks whether the server is still there.
function Conn:pump(interval)
  self.reader = running()
  local asked = false
  while not self.dead do
    local ok, err = self:_read(interval)
    if ok then asked = false
    elseif err ~= "timeout" then self:fail(err)
    elseif asked then self:fail("no answer to PING")
    else
      asked = true
      self:send(command("PING"), 1, now() + interval)
    end
  end
end

function Conn:_read(timeout)
  local data, err = self.stream:read(READ_SIZE, timeout)
  if not data then return nil, err == "closed" and "connection closed by the server" or err end
  return self:_feed(data)
end

-- Every reply whole in the bytes so far goes to its slot. A reply's bytes
-- are counted across reads, so max_reply bounds it however it is made (one
-- bulk string, or an array of many small ones).
function Conn:_feed(data)
  local parser, finished = self.parser, false
  parser:feed(data)
  while not self.dead do
    local v, perr = parser:next()
    if perr then return nil, "bad reply: " .. perr:gsub("^redis: ", "") end
    if v == nil then break end
    finished = true
    local ok, err = self:_deliver(v)
    if not ok then return nil, err end
  end
  self.reply_bytes = finished and parser:buffered() or self.reply_bytes + #data
  if self.reply_bytes > self.max_reply then
    return nil, "reply larger than max_reply (" .. self.max_reply .. " bytes)"
  end
  return true
end

function Conn:_deliver(v)
  if self.push then
    local taken, err = self.push(v, self)
    if taken ~= false then return taken, err end
  end
  local slot = self.slots[self.head]
  if not slot then return nil, "a reply to no command" end
  self.slots[self.head] = nil
  self.head = self.head + 1
  slot.done, slot.value = true, v
  if slot.awaited then wake(slot.owner) end
  return true
end

--- Drop the connection: every reply still awaited fails with why.
function Conn:fail(why)
  if self.dead then return end
  self.dead = why
  self.stream:close()
  local slots, head, tail = self.slots, self.head, self.tail
  self.slots, self.head, self.tail = {}, 1, 0
  for i = head, tail do
    local s = slots[i]
    s.done, s.err = true, why
    if s.awaited then wake(s.owner) end
  end
  self.on_lost(self, why)
end

-- The replies of slots in order, error replies in their place; nil, err
-- when the connection failed first.
local function replies(slots)
  local out = {}
  for i, s in ipairs(slots) do
    if s.err then return nil, s.err end
    out[i] = s.value
  end
  return out
end

local function is_error(v) return type(v) == "table" and v.err ~= nil end

-- Link: a connection that comes back ---------------------------------------

-- Dialed (a socket, or opts.connect), set up (AUTH, SELECT, PING, then the
-- link's own ready step), and once lost dialed again with exponential
-- backoff and jitter until the client closes. A link with serve (the
-- subscriber's) keeps a coroutine that reads its connection meanwhile.
local Link = {}
Link.__index = Link

function Link.new(owner, role, ready, serve)
  return setmetatable({ client = owner, role = role, ready = ready, serve = serve }, Link)
end

--- Dial once. Coroutines that ask for the connection meanwhile
--- (Link:connection) wait for the outcome: a subscription made while the
--- subscriber dials must not be left out of its connection.
function Link:open(stream)
  local waiting = {}
  self.dialing = waiting
  local conn, err = self:_dial(stream)
  if conn then self:_up(conn) end
  self.dialing = nil
  for _, co in ipairs(waiting) do wake(co) end
  return conn, err
end

--- The connection, once the dialing under way (if any) is over; nil while down.
function Link:connection(deadline)
  while self.dialing do
    local waiting = self.dialing
    waiting[#waiting + 1] = running()
    if select(2, runtime.park(left(deadline))) == "timeout" then break end
  end
  return self.conn
end

function Link:_dial(stream)
  local c = self.client
  local deadline = now() + c.cfg.connect_timeout
  local err
  if not stream then stream, err = c:_open(deadline) end
  if not stream then return nil, err end
  local conn = Conn.new(stream, c.cfg.max_reply, function(lost, why) self:_lost(lost, why) end)
  local ok, serr = c:_setup(conn, deadline)
  if ok and self.ready then ok, serr = self.ready(conn, deadline) end
  if ok and c.closed then ok, serr = nil, "client closed" end
  if ok then return conn end
  conn:fail(serr)
  return nil, serr
end

function Link:_up(conn)
  self.conn = conn
  self.client:_status(self.role, "up")
  if self.serve and not self.co then
    self.co = runtime.spawn(self._run, self, conn)
    conn.reader = self.co -- the reading is its from now, before it even starts
  end
end

function Link:_lost(conn, why)
  if self.conn ~= conn then return end
  self.conn = nil
  self.client:_status(self.role, "down", why)
  self:retry()
end

--- Dial again in the background, unless that is under way or impossible.
function Link:retry()
  local c = self.client
  if not self.co and not c.closed and c.cfg.can_redial then self.co = runtime.spawn(self._run, self) end
end

-- The link's coroutine: serve the connection while it lasts (the
-- subscriber's), then dial until one is up again. Should that raise (an
-- opts.connect that throws), the link is left able to retry.
function Link:_run(conn)
  local ok, err = pcall(function()
    repeat
      if conn then self.serve(conn) end
      conn = self:_redial()
    until not (conn and self.serve)
  end)
  self.co = nil
  if not ok then
    if self.conn then self.conn:fail("redis " .. self.role .. " failed") end
    runtime.log("error", "redis " .. self.role .. ": " .. tostring(err))
  end
end

-- Never longer than backoff_max between tries; nil once the client closes.
function Link:_redial()
  local c = self.client
  local delay = c.cfg.backoff_min
  while not c.closed do
    runtime.park(delay * (0.5 + math.random() / 2)) -- close() ends the wait
    if c.closed then break end
    local conn, err = self:open()
    if conn then return conn end
    c:_status(self.role, "down", err)
    delay = math.min(delay * 2, c.cfg.backoff_max)
  end
end

function Link:close()
  if self.conn then self.conn:fail("client closed") end
  if self.co then runtime.wake(self.co) end
end

-- Pub/sub ----------------------------------------------------------------

local KINDS = {
  subscribe = { cmd = "SUBSCRIBE", undo = "UNSUBSCRIBE", message = "message" },
  psubscribe = { cmd = "PSUBSCRIBE", undo = "PUNSUBSCRIBE", message = "pmessage" },
  ssubscribe = { cmd = "SSUBSCRIBE", undo = "SUNSUBSCRIBE", message = "smessage" },
}

local BY_MESSAGE, CONFIRMATION, UNDONE = {}, {}, {}
for kind, k in pairs(KINDS) do
  BY_MESSAGE[k.message] = kind
  CONFIRMATION[kind], CONFIRMATION[k.undo:lower()] = true, true
  UNDONE[k.undo:lower()] = kind
end

local function keys(set)
  local list = {}
  for k in pairs(set) do list[#list + 1] = k end
  return list
end

-- One command per name, in one write: each gets exactly one reply, even an
-- error (SUBSCRIBE a b refused would answer once for both).
local function send_each(conn, cmd, names, deadline)
  local out = {}
  for i, name in ipairs(names) do out[i] = command(cmd, name) end
  return conn:run(table.concat(out), #names, deadline)
end

-- The subscriber's connection of its own (Redis allows a subscribed RESP2
-- connection nothing else), and what it is subscribed to, so that a new
-- connection subscribes again.
local Subscriber = {}
Subscriber.__index = Subscriber

function Subscriber.new(owner)
  local self = setmetatable({ client = owner, handlers = {} }, Subscriber)
  for kind in pairs(KINDS) do self.handlers[kind] = {} end
  local interval = owner.cfg.ping_interval
  self.link = Link.new(owner, "subscriber",
    function(conn, deadline) return self:_ready(conn, deadline) end,
    function(conn) conn:pump(interval > 0 and interval or nil) end)
  return self
end

function Subscriber:_ready(conn, deadline)
  conn.push = function(v, c) return self:_push(v, c) end
  for kind, set in pairs(self.handlers) do
    local names = keys(set)
    if #names > 0 then
      local ok, err, why = self:_outcome(kind, names, send_each(conn, KINDS[kind].cmd, names, deadline), true)
      if not ok and why == "connection" then return nil, err end
      if not ok then self.client:_report("error", "subscriber: " .. err) end
    end
  end
  return true
end

-- true when every name is confirmed (or was sent by the reader itself,
-- which cannot wait); a name Redis refuses is forgotten, and when nobody
-- asked for it now (a resubscription), told to the owner's hook.
function Subscriber:_outcome(kind, names, slots, unasked)
  local refused
  for i, s in ipairs(slots) do
    if s.err then return nil, s.err, "connection" end
    if is_error(s.value) then
      self.handlers[kind][names[i]] = nil
      refused = refused or s.value.err
      if unasked then self:_dropped(kind, names[i], s.value.err) end
    end
  end
  if refused then return nil, refused, "redis" end
  return true
end

function Subscriber:add(kind, names, fn, deadline)
  for _, name in ipairs(names) do self.handlers[kind][name] = fn end
  local conn = self.link:connection(deadline)
  if not conn then return nil, "not connected", "connection" end -- made when it is back
  return self:_outcome(kind, names, send_each(conn, KINDS[kind].cmd, names, deadline))
end

function Subscriber:remove(kind, names, deadline)
  local set = self.handlers[kind]
  if #names == 0 then names = keys(set) end
  for _, name in ipairs(names) do set[name] = nil end
  local conn = self.link:connection(deadline)
  if #names == 0 or not conn then return true end
  return self:_outcome(kind, names, send_each(conn, KINDS[kind].undo, names, deadline))
end

-- Whoever owns the client (duplex.redis.cluster) may want to know that a
-- subscription ended without being asked to, to make it elsewhere: its
-- client._on_dropped(kind, name, why). Without that hook, nothing changes.
function Subscriber:_dropped(kind, name, why)
  local hook = self.client._on_dropped
  if not hook then return end
  self.handlers[kind][name] = nil -- Redis no longer sends it here: not to be made here again
  local ok, err = pcall(hook, kind, name, why)
  if not ok then self.client:_report("error", "subscriber: _on_dropped failed: " .. tostring(err)) end
end

-- A message goes to its handler; a confirmation nobody waits for (Redis
-- Cluster unsubscribes a shard channel whose slot moves) is let go, told
-- to the hook; the rest are replies to their slots.
function Subscriber:_push(v, conn)
  if type(v) ~= "table" then return false end
  local kind = BY_MESSAGE[v[1]]
  if not kind then
    if CONFIRMATION[v[1]] ~= true or conn:waiting() > 0 then return false end
    if UNDONE[v[1]] and type(v[2]) == "string" then self:_dropped(UNDONE[v[1]], v[2], "unsubscribed by the server") end
    return true
  end
  local pattern, channel, payload
  if kind == "psubscribe" then pattern, channel, payload = v[2], v[3], v[4] else channel, payload = v[2], v[3] end
  if type(channel) ~= "string" or type(payload) ~= "string" then return nil, "malformed " .. v[1] .. " push" end
  local fn = self.handlers[kind][pattern or channel]
  if fn then
    local ok, err = pcall(fn, channel, payload, pattern)
    if not ok then self.client:_report("error", "subscriber: message handler failed: " .. tostring(err)) end
  end
  return true
end

-- Configuration ----------------------------------------------------------

-- redis://[[user]:password@]host[:port][/db], rediss:// for TLS. A userinfo
-- without ":" is a password (redis://secret@host), as duplex.redis reads it.
local function parse_url(s)
  local scheme, rest = s:match("^(%a+)://(.*)$")
  scheme = scheme and scheme:lower()
  if scheme ~= "redis" and scheme ~= "rediss" then return nil, "not a redis:// or rediss:// URL: " .. s end
  local u, err = url.parse("http://" .. rest)
  if not u then return nil, "invalid Redis URL: " .. err end
  local db = u.target:match("^/(%d*)$")
  if not db then return nil, "invalid Redis URL: the path must be a database number, not " .. u.target end
  local user, password = url.credentials(u)
  if password == nil then user, password = nil, user end
  return { host = u.host, port = u.default_port and 6379 or u.port, tls = scheme == "rediss",
    user = user ~= "" and user or nil, password = password, db = tonumber(db) or 0 }
end

-- What a new connection is told first, in one write: who we are, which
-- database, then PING, so that a server that accepts and never answers is
-- found out within connect_timeout.
local function setup_steps(cfg)
  local names, bytes = {}, {}
  local function step(name, ...)
    names[#names + 1], bytes[#bytes + 1] = name, command(...)
  end
  if cfg.password and cfg.user then step("AUTH", "AUTH", cfg.user, cfg.password)
  elseif cfg.password then step("AUTH", "AUTH", cfg.password) end
  if cfg.db ~= 0 then step("SELECT " .. cfg.db, "SELECT", cfg.db) end
  -- CLIENT LIST then says whose connection is whose (which node, which role)
  if cfg.name then step("CLIENT SETNAME", "CLIENT", "SETNAME", cfg.name) end
  step("PING", "PING")
  return names, table.concat(bytes)
end

local function tls_context(tls)
  if tls.context then return tls.context end
  local ctx, err = core.tls_context { mode = "client", ca = tls.ca, verify = tls.verify ~= false }
  if not ctx then return nil, "TLS setup failed: " .. tostring(err) end
  return ctx
end

local function configure(opts)
  local cfg = {}
  for k, v in pairs(client.defaults) do cfg[k] = v end
  for k, v in pairs(opts) do cfg[k] = v end
  local u, err = parse_url(cfg.url)
  if not u then return nil, err end
  for _, k in ipairs { "user", "password", "db" } do
    if opts[k] == nil then cfg[k] = u[k] end
  end
  cfg.host, cfg.port = u.host, u.port
  cfg.backoff_max = math.max(cfg.backoff_max, cfg.backoff_min)
  cfg.can_redial = cfg.connect ~= nil or cfg.stream == nil
  if u.tls and not (cfg.connect or cfg.stream) then -- (a stream given is encrypted already, or not)
    cfg.tls_context, err = tls_context(cfg.tls or {})
    if not cfg.tls_context then return nil, err end
    cfg.servername = cfg.tls and cfg.tls.servername or u.host
  end
  cfg.setup_names, cfg.setup_bytes = setup_steps(cfg)
  return cfg
end

-- A broker checks its URL and TLS settings when it is made, before it
-- connects in the background.
client._configure = configure

-- The client ---------------------------------------------------------------

---@class duplex.RedisClient
local Client = {}
Client.__index = Client

-- A failing on_status must not stop a connection's failure half-way.
function Client:_report(status, detail)
  if not self.cfg.on_status then return end
  local ok, err = pcall(self.cfg.on_status, status, detail)
  if not ok then runtime.log("error", "redis on_status failed: " .. tostring(err)) end
end

-- "up" and "down" once each time they change (close() is no outage).
function Client:_status(role, status, detail)
  if self.closed or self.state[role] == status then return end
  self.state[role] = status
  self:_report(status, role .. (detail and ": " .. detail or ""))
end

-- TCP (with TLS for rediss://) to the URL's server, or the caller's stream.
function Client:_open(deadline)
  local cfg = self.cfg
  if cfg.connect then
    local stream, err = cfg.connect(left(deadline))
    return stream, stream == nil and "connect failed: " .. tostring(err) or nil
  end
  local sock, err = core.connect { host = cfg.host, port = cfg.port, timeout = left(deadline) }
  if not sock then return nil, ("connect to %s:%d failed: %s"):format(cfg.host, cfg.port, err) end
  if not cfg.tls_context then return sock end
  local ok, terr = sock:starttls(cfg.tls_context, { servername = cfg.servername }, left(deadline))
  if ok then return sock end
  sock:close()
  return nil, "TLS handshake failed: " .. tostring(terr)
end

function Client:_setup(conn, deadline)
  local names = self.cfg.setup_names
  local slots = conn:run(self.cfg.setup_bytes, #names, deadline)
  for i, s in ipairs(slots) do
    if s.err then return nil, "no answer to " .. names[1] .. ": " .. s.err end
    if is_error(s.value) then return nil, names[i] .. " failed: " .. s.value.err end
  end
  return true
end

function Client:_conn()
  if self.closed then return nil, "client closed" end
  local conn = self.commands.conn
  if conn then return conn end
  self.commands:retry() -- under way already, unless an earlier try raised
  return nil, "not connected"
end

-- Commands that would take the shared connection over (its replies would no
-- longer match the commands): pub/sub has its own connection.
local TAKEOVER = { MONITOR = "a connection of its own" }
for kind, k in pairs(KINDS) do
  TAKEOVER[k.cmd], TAKEOVER[k.undo] = "client:" .. kind, "client:" .. k.undo:lower()
end

-- The bytes of one command. Arguments are strings or numbers: a nil or a
-- table is a mistake, not something to send as "nil".
local function encode(who, level, ...)
  local args = pack(...)
  if args.n == 0 then error(who .. ": a command expected", level + 1) end
  for i = 1, args.n do
    local t = type(args[i])
    if t ~= "string" and t ~= "number" then
      error(("%s: argument %d is a %s (strings and numbers only)"):format(who, i, t), level + 1)
    end
  end
  local use = TAKEOVER[tostring(args[1]):upper()]
  if use then error(who .. ": " .. args[1] .. " is not for this connection: use " .. use, level + 1) end
  return command(...)
end

function Client:_call(bytes)
  local conn, err = self:_conn()
  if not conn then return nil, err, "connection" end
  local slot = conn:run(bytes, 1, now() + self.cfg.timeout)[1]
  if slot.err then return nil, slot.err, "connection" end
  if is_error(slot.value) then return nil, slot.value.err, "redis" end
  return slot.value
end

--- One command: its reply; nil, message, "redis" for Redis's error reply;
--- nil, message, "connection" when there is none (not connected, timeout,
--- connection lost, a reply that breaks the protocol or max_reply).
function Client:call(...)
  return blocking(self._call, self, encode("call", 2, ...))
end

--- PUBLISH: the number of subscribers reached, or nil, message, kind.
function Client:publish(channel, message)
  return blocking(self._call, self, encode("publish", 2, "PUBLISH", channel, message))
end

--- Sharded pub/sub (Redis 7): the channel's shard, in a cluster.
function Client:spublish(channel, message)
  return blocking(self._call, self, encode("spublish", 2, "SPUBLISH", channel, message))
end

function Client:_pipeline(bytes, n)
  if n == 0 then return {} end
  local conn, err = self:_conn()
  if not conn then return nil, err, "connection" end
  local out, rerr = replies(conn:run(bytes, n, now() + self.cfg.timeout))
  if not out then return nil, rerr, "connection" end
  return out
end

local Pipeline = {}
Pipeline.__index = Pipeline

function Pipeline:call(...)
  self[#self + 1] = encode("pipeline: p:call", 2, ...)
end

--- Several commands in one write: pipeline(function(p) p:call(...) end) or
--- pipeline({ {"SET", "a", "1"}, {"GET", "a"} }). Returns the list of
--- replies in order (an error reply as { err = "..." } in its slot), or
--- nil, message, "connection" when the connection failed first.
function Client:pipeline(what)
  local encoded = setmetatable({}, Pipeline)
  if type(what) == "function" then
    what(encoded)
  elseif type(what) == "table" then
    for i, c in ipairs(what) do
      if type(c) ~= "table" then error("pipeline: command " .. i .. " is not a table", 2) end
      encoded[i] = encode("pipeline: command " .. i, 2, unpack(c, 1, c.n or #c))
    end
  else
    error("pipeline: a function or a list of commands expected", 2)
  end
  return blocking(self._pipeline, self, table.concat(encoded), #encoded)
end

-- The subscriber, made by the first subscribe. When its first dialing
-- fails, it goes on trying like after an outage, and that first reason is
-- what the caller hears.
function Client:_subscriber()
  if self.sub then return self.sub end
  local sub = Subscriber.new(self)
  self.sub = sub
  local conn, err = sub.link:open()
  if not conn then
    self:_status("subscriber", "down", err)
    sub.link:retry()
  end
  return sub, err
end

function Client:_subscribe(kind, names, fn)
  if self.closed then return nil, "client closed", "connection" end
  local sub, first = self:_subscriber()
  local ok, err, why = sub:add(kind, names, fn, now() + self.cfg.timeout)
  if not ok and first then return nil, first, "connection" end
  return ok, err, why
end

function Client:_unsubscribe(kind, names)
  if not self.sub then return true end
  return self.sub:remove(kind, names, now() + self.cfg.timeout)
end

local function names_of(who, n, ...)
  local names = {}
  for i = 1, n do
    local name = select(i, ...)
    if type(name) ~= "string" then error(who .. ": channel names are strings", 3) end
    names[#names + 1] = name
  end
  return names
end

-- subscribe(channel..., fn), psubscribe(pattern..., fn),
-- ssubscribe(shard channel..., fn) and their unsubscribe(name...) (none:
-- all of that kind). true once Redis confirmed; while the subscriber
-- connection is down, nil, "not connected", "connection", and the
-- subscription is made when it is back.
for kind, k in pairs(KINDS) do
  local undo = k.undo:lower()
  Client[kind] = function(self, ...)
    local n = select("#", ...)
    local fn = select(n, ...)
    if n < 2 or type(fn) ~= "function" then error(kind .. ": names, then a function expected", 2) end
    if not self.cfg.can_redial then
      error(kind .. ": a client over opts.stream needs opts.connect for its subscriber connection", 2)
    end
    return blocking(self._subscribe, self, kind, names_of(kind, n - 1, ...), fn)
  end
  Client[undo] = function(self, ...)
    return blocking(self._unsubscribe, self, kind, names_of(undo, select("#", ...), ...))
  end
end

--- Close both connections; calls from now on fail with "client closed".
function Client:close()
  if self.closed then return end
  self.closed = true
  self.commands:close()
  if self.sub then self.sub.link:close() end
end

Client.__close = Client.close

local function start(cfg)
  local self = setmetatable({ cfg = cfg, state = {} }, Client)
  self.commands = Link.new(self, "commands")
  local conn, err = self.commands:open(cfg.stream)
  if not conn then return nil, err end
  return self
end

-- For duplex.redis.cluster, which speaks through these clients.
client._encode, client._parse_url = encode, parse_url

--- Connect to Redis: a URL or a table of options (README, "duplex.redis").
---@return duplex.RedisClient|nil, string|nil
function client.connect(opts)
  if type(opts) == "string" then opts = { url = opts } end
  if type(opts) ~= "table" then error("redis.connect: a URL or a table of options expected", 2) end
  options.check("redis.connect", opts, options.redis, 2)
  if not (core.connect or opts.stream or opts.connect) then
    error("redis.connect: this host has no sockets of duplex's own (LuaJIT's core): "
      .. "opts.connect expected (duplex.nginx.stream over a cosocket, inside nginx)", 2)
  end
  local cfg, err = configure(opts)
  if not cfg then return nil, err end
  return blocking(start, cfg)
end

return client
