--- The chat of examples/chat, inside nginx: rooms span every worker through
--- a shared dictionary, and the same path delivers server pushes (POST
--- /push) made outside any WebSocket request.
---
--- Each message gets a number from the dictionary; every worker has one
--- timer that reads the numbers it has not seen yet and posts each message
--- to that worker's members of the room (duplex.nginx.post: a cosocket
--- can only be written by its own request).
local dxngx = require "duplex.nginx"

local chat = {}

local bus = ngx.shared.chat_bus
local rooms = {}       -- room -> { ws = true }, this worker's members
local TTL = 60         -- seconds a message stays in the dictionary
local POLL = 0.01      -- seconds between looks at the dictionary

local function publish(room, line)
  local id, err = bus:incr("last", 1, 0)
  if not id then return nil, err end
  return bus:set("m" .. id, room .. "\n" .. line, TTL)
end

local function deliver(room, line)
  for ws in pairs(rooms[room] or {}) do dxngx.post(ws, line) end
end

local function poll_bus(premature)
  if premature then return end
  local seen = bus:get("last") or 0
  while not ngx.worker.exiting() do
    local last = bus:get("last") or 0
    for id = seen + 1, last do
      local msg = bus:get("m" .. id)
      if msg then
        local room, line = msg:match("^([^\n]*)\n(.*)$")
        deliver(room, line)
      end
    end
    seen = last
    ngx.sleep(POLL)
  end
end

function chat.start_worker()
  assert(ngx.timer.at(0, poll_bus))
end

local function join(ws, room)
  rooms[room] = rooms[room] or {}
  rooms[room][ws] = true
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
  join(ws, room)
  ws:send("* you are " .. nick .. " in #" .. room .. " (from " .. ws.remote_address
    .. ", nginx worker " .. ngx.worker.id() .. ")")
  publish(room, "* " .. nick .. " joined #" .. room)
  for message in ws:messages() do
    local cmd, arg1 = message:match("^/(%a+)%s*(.-)%s*$")
    if cmd == "nick" and valid_name(arg1) then
      publish(room, "* " .. nick .. " is now " .. arg1)
      nick = arg1
    elseif cmd == "join" and valid_name(arg1) then
      publish(room, "* " .. nick .. " left #" .. room)
      leave(ws, room)
      room = arg1
      join(ws, room)
      publish(room, "* " .. nick .. " joined #" .. room)
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
    ngx.say("bus: ", err)
    return ngx.exit(503)
  end
  ngx.say("pushed")
end

return chat
