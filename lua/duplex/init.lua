--- duplex: WebSocket (RFC 6455) for Lua 5.4.
---
--- local duplex = require "duplex"
--- duplex.listen{ port = 8080, path = "/chat", handler = function(ws, request)
---   for message, kind in ws:messages() do ws:send(message, kind) end
--- end }
--- duplex.run()
local core = require "duplex.core"
local runtime = require "duplex.runtime"
local server = require "duplex.server"
local client = require "duplex.client"
local WebSocket = require "duplex.websocket"

local duplex = {
  version = core.version,
  core = core,
  WebSocket = WebSocket,
}

--- Start a server (see README for options). Returns the server or nil, err.
duplex.listen = server.listen

--- Connect to a ws:// or wss:// URL. Returns the connection or nil, err.
--- Works from a coroutine (it yields while waiting) or from the main chunk
--- (it runs the loop until the connection is open).
---@param url string
---@param opts table|nil
---@return duplex.WebSocket|nil, string|nil
function duplex.connect(url, opts)
  return runtime.blocking(client.connect, url, opts)
end

--- Run the event loop until there is nothing left to do or duplex.stop().
--- With opts.workers = N (N > 1), fork N worker processes that each run
--- opts.setup() (which should call duplex.listen with reuseport = true) and
--- supervise them: a dead worker is replaced, SIGTERM/SIGINT stop them all.
function duplex.run(opts)
  if opts and opts.workers and opts.workers > 1 then
    return require("duplex.workers").run(opts)
  end
  if opts and opts.setup then opts.setup() end
  return core.run()
end

duplex.stop = core.stop           -- make duplex.run() return
duplex.spawn = core.spawn         -- run a function in a new coroutine
duplex.sleep = core.sleep         -- seconds; yields
duplex.now = core.now             -- monotonic seconds
duplex.timer = core.timer         -- timer(seconds, fn [, repeat]) -> t with t:cancel()
duplex.signal = core.signal       -- signal("TERM", fn)
duplex.encode_frame = core.encode_frame -- one broadcast frame for ws:send_frame

return duplex
