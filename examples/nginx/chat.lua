--- The chat of examples/chat, inside nginx: rooms span every worker and
--- every machine through Redis pub/sub, and the same path delivers server
--- pushes (POST /push) made outside any WebSocket request.
---
--- A cosocket belongs to the request or timer that made it, so each worker
--- has one timer that owns its Redis client (duplex.redis over cosockets):
--- requests hand it their lines through a queue; one PSUBSCRIBE to every
--- room brings the lines of all of them, and the timer posts each to this
--- worker's members of its room (duplex.nginx.post: a cosocket can only be
--- written by its own request).
local dxngx = require "duplex.nginx"
local redis = require "duplex.redis.client"
local semaphore = require "ngx.semaphore"

local chat = {}

local rooms = {}      -- room -> { ws = true }, this worker's members
local MAX_QUEUED = 1000
local MAX_AGE = 10    -- seconds a line waits for Redis before it is dropped

local prefix          -- of the channels: prefix .. "room:" .. room
local listening = false -- this worker's subscription is up
local queue = { first = 1, last = 0 } -- lines for Redis: { channel, line, since }
local queued = semaphore.new()

local function log(level, ...) ngx.log(level, "chat: ", ...) end

--- Hand a line to this worker's timer, which publishes it. nil, err when
--- Redis has been away long enough for the queue to fill.
local function publish(room, line)
  if queue.last - queue.first + 1 >= MAX_QUEUED then return nil, "too many lines waiting for Redis" end
  queue.last = queue.last + 1
  queue[queue.last] = { prefix .. "room:" .. room, line, ngx.now() }
  queued:post(1)
  return true
end

local function deliver(room, line)
  for ws in pairs(rooms[room] or {}) do dxngx.post(ws, line) end
end

-- Everything queued, in one pipeline. While Redis is away the lines stay
-- queued (the client dials again meanwhile), up to MAX_AGE: a short outage
-- loses nothing, a long one no stale flood when it ends. A connection lost
-- in the middle of a pipeline may have published some of it: those go
-- twice rather than not at all.
local function flush(db)
  while queue.first <= queue.last do
    local first, last = queue.first, queue.last
    local oldest = ngx.now() - MAX_AGE
    local replies, err = db:pipeline(function(p)
      for i = first, last do
        local item = queue[i]
        if item[3] >= oldest then p:call("PUBLISH", item[1], item[2]) end
      end
    end)
    if not replies then
      while queue.first <= queue.last and queue[queue.first][3] < oldest do
        queue[queue.first] = nil
        queue.first = queue.first + 1
      end
      return nil, err
    end
    for i = first, last do queue[i] = nil end
    queue.first = last + 1
  end
  return true
end

-- The connection of the client that dials it (again): a cosocket of this
-- timer, as a stream of duplex.transport.
local function dialer(host, port)
  return function(timeout)
    local sock = ngx.socket.tcp()
    sock:settimeout(math.max(1, math.floor(timeout * 1000)))
    local ok, err = sock:connect(host, port)
    if not ok then return nil, err end
    return dxngx.stream(sock)
  end
end

local function connect(cfg)
  local host, port = cfg.redis:match("^redis://([^:/]+):?(%d*)")
  local delay = 0.1
  while not ngx.worker.exiting() do
    local db, err = redis.connect { url = cfg.redis, connect = dialer(host, tonumber(port) or 6379),
      on_status = function(status, detail)
        log(ngx.NOTICE, "redis ", status, ": ", detail)
        if detail:find("^subscriber") then listening = status == "up" end
      end }
    if db then return db end
    log(ngx.WARN, "redis: ", err, ", again in ", delay, " s")
    ngx.sleep(delay)
    delay = math.min(delay * 2, 5)
  end
end

local function run(premature, cfg)
  if premature then return end
  local db = connect(cfg)
  if not db then return end
  local channels = prefix .. "room:"
  -- made again by the client on every new connection
  db:psubscribe(channels .. "*", function(channel, line)
    deliver(channel:sub(#channels + 1), line)
  end)
  while not ngx.worker.exiting() do
    queued:wait(1) -- the 1 s: to see the worker exit
    -- after an outage, not before this worker hears the rooms again: its
    -- own members would miss what they said meanwhile
    local ok = listening and flush(db)
    if not ok then ngx.sleep(0.2) end
  end
  db:close()
end

--- In init_worker_by_lua: { redis = "redis://host:port", prefix = "chat:" }.
function chat.start_worker(cfg)
  prefix = cfg.prefix or "chat:"
  assert(ngx.timer.at(0, run, cfg))
end

local function join(ws, room, nick)
  rooms[room] = rooms[room] or {}
  rooms[room][ws] = nick
end

local function leave(ws, room)
  local members = rooms[room]
  if not members then return end
  members[ws] = nil
  if next(members) == nil then rooms[room] = nil end
end

local function valid_name(s) return s and s:match("^[%w_%-]+$") and #s <= 32 end

local function handler(ws, request)
  local nick = request.query.nick or ("guest" .. math.random(1000, 9999))
  local room = request.query.room or "lobby"
  if not valid_name(nick) then nick = "guest" end
  if not valid_name(room) then room = "lobby" end
  join(ws, room, nick)
  ws:send("* you are " .. nick .. " in #" .. room .. " (from " .. ws.remote_address
    .. ", nginx worker " .. ngx.worker.id() .. ")")
  publish(room, "* " .. nick .. " joined #" .. room)
  for message in ws:messages() do
    local cmd, arg1 = message:match("^/(%a+)%s*(.-)%s*$")
    if cmd == "nick" and valid_name(arg1) then
      publish(room, "* " .. nick .. " is now " .. arg1)
      nick = arg1
      join(ws, room, nick)
    elseif cmd == "join" and valid_name(arg1) then
      publish(room, "* " .. nick .. " left #" .. room)
      leave(ws, room)
      room = arg1
      join(ws, room, nick)
      publish(room, "* " .. nick .. " joined #" .. room)
    elseif cmd == "who" then
      -- Presence across workers and machines is examples/chat's (the
      -- Redis broker's); here each worker knows its own members.
      local names = {}
      for _, n in pairs(rooms[room] or {}) do names[#names + 1] = n end
      table.sort(names)
      ws:send("* in #" .. room .. " on this nginx worker: " .. table.concat(names, ", "))
    elseif cmd then
      ws:send("* unknown command or bad name: " .. message)
    elseif #message > 0 then
      publish(room, nick .. ": " .. message)
    end
  end
  leave(ws, room)
  publish(room, "* " .. nick .. " left #" .. room)
end

function chat.serve()
  dxngx.serve { handler = handler, max_message = 65536, deflate = true,
    ping_interval = tonumber(ngx.var.arg_ping) or 20 }
end

--- POST /push?room=NAME with a line of text as the body.
function chat.push()
  local room = ngx.var.arg_room
  if ngx.req.get_method() ~= "POST" or not valid_name(room) then
    ngx.status = 400
    ngx.say("POST /push?room=NAME with the message as the body")
    return ngx.exit(400)
  end
  ngx.req.read_body()
  local body = ngx.req.get_body_data() or ""
  if #body == 0 or #body > 4096 then
    ngx.status = 400
    ngx.say("the body is the message: 1 to 4096 bytes")
    return ngx.exit(400)
  end
  local ok, err = publish(room, "* server: " .. body)
  if not ok then
    ngx.status = 503
    ngx.say("redis: ", err)
    return ngx.exit(503)
  end
  ngx.say("pushed")
end

return chat
