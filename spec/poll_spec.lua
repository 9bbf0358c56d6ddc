-- duplex.poll: a game loop's client. The test is the host: it never writes a
-- coroutine, only calls c:poll() per "frame".
local poll = require "duplex.poll"
local core = require "duplex.core"
local proc = require "support.proc"
local peers = require "support.peers"
local services = require "support.services"

local function echo_server(port)
  local h = proc.spawn({ "lua5.4", "examples/echo.lua", "--port", tostring(port), "--ping-interval", "0", "--deflate" },
    { cwd = peers.root, limit = 120 })
  assert(h:read_line(10), "echo server did not start: " .. h:output())
  return h
end

-- Poll frames until pred() holds; fails after seconds.
local function frames_until(c, seconds, pred, what)
  local deadline = core.now() + seconds
  while not pred() do
    if core.now() > deadline then error("timed out waiting for " .. what, 2) end
    c:poll(0.005)
  end
end

describe("duplex.poll", function()
  teardown(proc.killall)

  it("connects, exchanges messages, keeps a heartbeat and closes, from a frame loop", function()
    local port = services.free_port()
    local h = echo_server(port)
    local log = {}
    local c = poll.connect("ws://127.0.0.1:" .. port .. "/", {
      ping_interval = 0.2,
      deflate = true,
      on_open = function(cl) log[#log + 1] = "open"; assert(cl:send("hello")); assert(cl:send("\1\2", "binary")) end,
      on_message = function(_, msg, kind) log[#log + 1] = kind .. ":" .. msg end,
      on_close = function(_, code, _, again) log[#log + 1] = "close " .. code .. " " .. tostring(again) end,
    })
    assert.equal("connecting", c.state)
    assert.same({ nil, "not open" }, { c:send("too early") })
    frames_until(c, 10, function() return #log >= 3 end, "the echoes")
    assert.same({ "open", "text:hello", "binary:\1\2" }, log)
    assert.matches("^permessage%-deflate", c.ws.extensions)
    frames_until(c, 5, function() return c:latency() ~= nil end, "a heartbeat pong")
    c:close(1000, "game over")
    frames_until(c, 5, function() return c:closed() end, "the close")
    assert.equal("close 1000 false", log[#log])
    h:kill("TERM"); h:wait(5); h:cleanup()
  end)

  it("reconnects with backoff when the server goes away and comes back", function()
    local port = services.free_port()
    local h = echo_server(port)
    local opens, closes, errors, got = 0, {}, 0, {}
    local c = poll.connect("ws://127.0.0.1:" .. port .. "/", {
      reconnect = { min_delay = 0.1, max_delay = 0.4 },
      on_open = function(cl) opens = opens + 1; cl:send("hi " .. opens) end,
      on_message = function(_, msg) got[#got + 1] = msg end,
      on_close = function(_, code, _, again) closes[#closes + 1] = { code, again } end,
      on_error = function() errors = errors + 1 end,
    })
    frames_until(c, 10, function() return #got == 1 end, "the first echo")
    h:kill("KILL"); h:wait(5); h:cleanup()
    frames_until(c, 10, function() return #closes == 1 end, "the loss")
    assert.same({ 1006, true }, closes[1])
    -- nobody listens: attempts fail, each reported, while frames go on
    frames_until(c, 10, function() return errors >= 2 end, "failed attempts")
    assert.is_nil(c.ws)
    h = echo_server(port)
    frames_until(c, 10, function() return #got == 2 end, "the echo after reconnecting")
    assert.same({ "hi 1", "hi 2" }, got)
    assert.equal(2, opens)
    c:close()
    frames_until(c, 5, function() return c:closed() end, "the close")
    h:kill("TERM"); h:wait(5); h:cleanup()
  end)

  it("stops retrying when closed while waiting to reconnect", function()
    local port = services.free_port() -- nothing listens there
    local errors = 0
    local c = poll.connect("ws://127.0.0.1:" .. port .. "/", {
      reconnect = { min_delay = 5 },
      on_error = function(_, err) errors = errors + 1; assert.matches("refused", err) end,
    })
    frames_until(c, 5, function() return errors == 1 end, "the failed attempt")
    c:close()
    frames_until(c, 2, function() return c:closed() end, "the client to stop")
    assert.equal(1, errors)
  end)
end)
