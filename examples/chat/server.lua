-- A chat server with rooms and nicknames, serving its own browser page.
--   lua5.4 examples/chat/server.lua [--port 8080] [--host 127.0.0.1]
--        [--redis redis://127.0.0.1:6379] [--ping-interval SECONDS]
-- Open the printed address in a browser; each tab picks a nickname and room.
-- Protocol (text messages): "/nick NAME", "/join ROOM", anything else is said
-- in the current room. The server sends lines of text.
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

local hub = pubsub.new { max_backlog = 256 << 10, overflow = "close" }
if opts.redis then
  local redis = require "duplex.redis"
  local broker, err = redis.broker {
    url = opts.redis,
    on_status = function(status, detail)
      io.stderr:write("chat: broker ", status, detail and (": " .. detail) or "", "\n")
    end,
  }
  if not broker then
    io.stderr:write("chat: ", err, "\n")
    os.exit(1)
  end
  hub:attach_broker(broker)
end

local function valid_name(s) return s and s:match("^[%w_%-]+$") and #s <= 32 end

local function chat(ws, request)
  local nick = request.query.nick or ("guest" .. math.random(1000, 9999))
  local room = request.query.room or "lobby"
  if not valid_name(nick) then nick = "guest" end
  if not valid_name(room) then room = "lobby" end
  hub:subscribe(ws, "room:" .. room)
  -- Naming the node shows which one a load balancer picked.
  ws:send("* you are " .. nick .. " in #" .. room .. " (from " .. ws.remote_address .. ", node "
    .. ws.server.port .. ")")
  hub:publish("room:" .. room, "* " .. nick .. " joined #" .. room)
  for message in ws:messages() do
    local cmd, arg1 = message:match("^/(%a+)%s*(.-)%s*$")
    if cmd == "nick" and valid_name(arg1) then
      hub:publish("room:" .. room, "* " .. nick .. " is now " .. arg1)
      nick = arg1
    elseif cmd == "join" and valid_name(arg1) then
      hub:publish("room:" .. room, "* " .. nick .. " left #" .. room)
      hub:unsubscribe(ws, "room:" .. room)
      room = arg1
      hub:subscribe(ws, "room:" .. room)
      hub:publish("room:" .. room, "* " .. nick .. " joined #" .. room)
    elseif cmd then
      ws:send("* unknown command or bad name: " .. message)
    elseif #message > 0 then
      hub:publish("room:" .. room, nick .. ": " .. message)
    end
  end
  hub:unsubscribe_all(ws)
  hub:publish("room:" .. room, "* " .. nick .. " left #" .. room)
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
