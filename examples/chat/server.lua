-- A chat server with rooms and nicknames, serving its own browser page.
--   lua5.4 examples/chat/server.lua [--port 8080] [--host 127.0.0.1]
--        [--redis redis://127.0.0.1:6379] [--ping-interval SECONDS]
-- Open the printed address in a browser; each tab picks a nickname and room.
-- Protocol (text messages): "/nick NAME", "/join ROOM", "/who", anything else
-- is said in the current room. The server sends lines of text; a room's
-- lines come as "#epoch:offset line", the position a client hands back as
-- ?since=epoch:offset when it reconnects, to get what it missed meanwhile.
-- Rooms keep their last 500 lines for an hour, and know who is in them: on
-- several nodes through Redis (--redis), alone in this process otherwise.
local root = arg[0]:match("^(.*)/examples/chat/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
-- DUPLEX_CPATH (set by scripts/asan-env) runs the examples on the sanitized build
package.cpath = (os.getenv("DUPLEX_CPATH") or root .. "/build/?.so") .. ";" .. package.cpath

local duplex = require "duplex"
local pubsub = require "duplex.pubsub"

local opts = { port = 8080, host = "127.0.0.1" }
local i = 1
while i <= #arg do
  local a, v = arg[i], arg[i + 1]
  if a == "--port" then opts.port = tonumber(v)
  elseif a == "--host" then opts.host = v
  elseif a == "--redis" then opts.redis = v
  elseif a == "--ping-interval" then opts.ping_interval = tonumber(v)
  elseif a == "--trusted-proxy" then
    opts.trusted = opts.trusted or {}
    opts.trusted[#opts.trusted + 1] = v
  else
    io.stderr:write("usage: lua5.4 examples/chat/server.lua [--port N] [--host H] [--redis URL]",
      " [--ping-interval S] [--trusted-proxy IP]\n")
    os.exit(2)
  end
  i = i + 2
end

local here = arg[0]:match("^(.*)/[^/]*$") or "."
local page do
  local f = assert(io.open(here .. "/index.html", "rb"))
  page = f:read("a")
  f:close()
end

local HISTORY = { match = "^room:", size = 500, ttl = 3600 }
local broker
if opts.redis then
  local err
  broker, err = require("duplex.redis").broker {
    url = opts.redis,
    history = HISTORY,
    on_status = function(status, detail)
      io.stderr:write("chat: broker ", status, detail and (": " .. detail) or "", "\n")
    end,
  }
  if not broker then
    io.stderr:write("chat: ", err, "\n")
    os.exit(1)
  end
else
  broker = pubsub.memory_broker { history = HISTORY }
end
local hub = pubsub.new { max_backlog = 256 << 10, overflow = "close", broker = broker,
  format = function(_, line, pos) return "#" .. pos.epoch .. ":" .. pos.offset .. " " .. line end }

local function valid_name(s) return s and s:match("^[%w_%-]+$") and #s <= 32 end

local function who(room)
  local members, err = broker:members("room:" .. room)
  if not members then return "* who is here is unknown for now (" .. err .. ")" end
  local names = {}
  for _, m in ipairs(members) do names[#names + 1] = m.id end
  table.sort(names)
  return "* in #" .. room .. ": " .. table.concat(names, ", ")
end

-- A room entered: present, subscribed, and what was missed since the
-- client's last position sent (when it comes back with one).
local function enter(ws, nick, room, since)
  broker:join("room:" .. room, nick)
  local r, err = hub:recover(ws, "room:" .. room, since)
  if not since then
    hub:publish("room:" .. room, "* " .. nick .. " joined #" .. room)
  elseif not r then
    ws:send("* back, but what you missed is unknown for now (" .. err .. ")")
  elseif r.recovered then
    ws:send("* back: " .. r.missed .. " missed line(s) above")
  else
    ws:send("* back, but some lines are lost (" .. r.reason .. "): reload to see the room afresh")
  end
end

local function leave(ws, nick, room, announce)
  hub:unsubscribe(ws, "room:" .. room)
  broker:leave("room:" .. room, nick)
  if announce then hub:publish("room:" .. room, "* " .. nick .. " left #" .. room) end
end

local function chat(ws, request)
  local nick = request.query.nick or ("guest" .. math.random(1000, 9999))
  local room = request.query.room or "lobby"
  if not valid_name(nick) then nick = "guest" end
  if not valid_name(room) then room = "lobby" end
  -- Naming the node shows which one a load balancer picked.
  ws:send("* you are " .. nick .. " in #" .. room .. " (from " .. ws.remote_address .. ", node "
    .. ws.server.port .. ")")
  enter(ws, nick, room, pubsub.parse_position(request.query.since))
  for message in ws:messages() do
    local cmd, arg1 = message:match("^/(%a+)%s*(.-)%s*$")
    if cmd == "nick" and valid_name(arg1) then
      hub:publish("room:" .. room, "* " .. nick .. " is now " .. arg1)
      broker:leave("room:" .. room, nick)
      nick = arg1
      broker:join("room:" .. room, nick)
    elseif cmd == "join" and valid_name(arg1) then
      leave(ws, nick, room, true)
      room = arg1
      enter(ws, nick, room)
    elseif cmd == "who" then
      ws:send(who(room))
    elseif cmd then
      ws:send("* unknown command or bad name: " .. message)
    elseif #message > 0 then
      hub:publish("room:" .. room, nick .. ": " .. message)
    end
  end
  -- A connection that dropped may come back (and recover): only a goodbye
  -- is announced.
  leave(ws, nick, room, ws.close_code == 1000 or ws.close_code == 1001)
  hub:unsubscribe_all(ws)
end

local server, err = duplex.listen {
  host = opts.host,
  port = opts.port,
  path = "/ws",
  handler = chat,
  max_message = 64 << 10,
  ping_interval = opts.ping_interval,
  trusted_proxies = opts.trusted,
  on_http = function(req)
    if req.path == "/" or req.path == "/index.html" then
      return 200, { ["Content-Type"] = "text/html; charset=utf-8" }, page
    elseif req.path == "/health" then
      return 200, { ["Content-Type"] = "text/plain" }, "ok\n"
    end
  end,
}
if not server then
  io.stderr:write("chat: ", err, "\n")
  os.exit(1)
end

local function stop()
  server:shutdown(2)
  duplex.stop()
end
duplex.signal("INT", stop)
duplex.signal("TERM", stop)

print("chat server: open " .. server:url("/"):gsub("^ws", "http") .. " in a browser")
io.stdout:flush()
duplex.run()
