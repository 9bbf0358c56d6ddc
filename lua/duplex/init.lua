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
  -- Not API: a connection's metatable depends on its host (duplex.cqueues
  -- and duplex.nginx connections have another), so it types nothing.
  _WebSocket = WebSocket,
}

---@class duplex.Request
---@field method string
---@field target string              request target as sent ("/chat?room=1")
---@field path string
---@field query table<string, string> decoded parameters (first value of a repeated name); {} without a query
---@field raw_query string|nil        the query as sent, without the "?"
---@field version string
---@field headers table<string, string> lower-case names; repeated headers joined with ", "
---@field host string|nil
---@field origin string|nil
---@field key string|nil
---@field protocols string[]          subprotocols the client offers
---@field extensions table[]          parsed Sec-WebSocket-Extensions
---@field websocket boolean           a valid WebSocket upgrade
---@field peer_address string
---@field peer_port integer
---@field remote_address string       the client behind a trusted proxy

---@class duplex.ConnectionOptions
---@field max_message integer|nil     largest message, default 16 MiB (1009 beyond)
---@field max_frame integer|nil       largest frame, default max_message
---@field streaming boolean|nil       receive() returns pieces of messages
---@field ping_interval number|nil    seconds of silence before a ping, default 20; 0 = off
---@field ping_timeout number|nil     seconds to wait after a ping, default 20
---@field close_timeout number|nil    seconds to wait for the closing handshake, default 5
---@field high_water integer|nil      send() waits above this many queued bytes, default 1 MiB
---@field low_water integer|nil       ... until below this, default 256 KiB
---@field send_timeout number|nil     a send waiting longer closes the peer (1008), default 30
---@field max_buffered integer|nil    queue limit for sends that do not wait, default 16 MiB
---@field compress_threshold integer|nil smaller messages are not compressed, default 128

---@class duplex.ListenOptions: duplex.ConnectionOptions
---@field host string|nil             default "0.0.0.0"
---@field port integer|nil            default 8080; 0 picks a free port
---@field handler fun(ws: duplex.WebSocket, request: duplex.Request)|nil
---@field path string|nil             the one path served with handler (default: any)
---@field routes table<string, function|table>|nil several paths on one port
---@field protocols string[]|nil      subprotocols, in order of preference
---@field select_protocol fun(offered: string[], request: duplex.Request): string|nil
---@field origins string[]|nil        Origin allow-list (403 otherwise)
---@field on_request fun(request: duplex.Request): (integer|nil, string|nil, table|nil) refuse: status, body, headers
---@field on_http fun(request: duplex.Request): (integer|nil, table|nil, string|nil) plain HTTP: status, headers, body
---@field headers table|nil           extra headers on the 101 response
---@field trusted_proxies string[]|nil addresses/CIDR blocks whose X-Forwarded-For is believed
---@field tls {cert: string, key: string, chain: string|nil}|nil
---@field deflate boolean|table|nil   permessage-deflate, off by default
---@field max_connections integer|nil default 10000 (503 beyond)
---@field handshake_timeout number|nil default 10 s
---@field max_header_size integer|nil default 8192 (431 beyond)
---@field max_headers integer|nil     default 100
---@field backlog integer|nil         default 511
---@field reuseport boolean|nil       SO_REUSEPORT
---@field log fun(level: string, message: string)|nil

---@class duplex.ConnectOptions: duplex.ConnectionOptions
---@field protocols string[]|nil      subprotocols to offer
---@field headers table|nil           extra request headers
---@field origin string|nil
---@field timeout number|nil          connect + TLS + handshake, default 10 s
---@field tls {ca: string|nil, servername: string|nil, verify: boolean|nil}|nil
---@field proxy string|nil            "http://user:pass@host:port" (CONNECT)
---@field follow_redirects boolean|integer|nil default false
---@field deflate boolean|table|nil   offer permessage-deflate
---@field bind string|nil             local source address

--- Start a server. Returns the server or nil, err.
---@type fun(opts: duplex.ListenOptions): duplex.Server|nil, string|nil
duplex.listen = server.listen

--- Connect to a ws:// or wss:// URL. Returns the connection or nil, err.
--- Works from a coroutine (it yields while waiting) or from the main chunk
--- (it runs the loop until the connection is open).
---@param url string
---@param opts duplex.ConnectOptions|nil
---@return duplex.WebSocket|nil ws, string|nil err, table|nil response
function duplex.connect(url, opts)
  return runtime.blocking(client.connect, url, opts)
end

--- Run the event loop until there is nothing left to do or duplex.stop().
--- With opts.workers = N (N > 1), fork N worker processes that each run
--- opts.setup() (which should call duplex.listen with reuseport = true) and
--- supervise them: a dead worker is replaced, SIGTERM/SIGINT stop them all.
function duplex.run(opts)
  -- Keep freed memory for the next message instead of returning it to the
  -- kernel after each large one (see core.tune_malloc); opt out with
  -- tune_malloc = false.
  if not (opts and opts.tune_malloc == false) then core.tune_malloc(64 << 20, 32 << 20) end
  if opts and opts.workers and opts.workers > 1 then
    return require("duplex.workers").run(opts)
  end
  if opts and opts.setup then opts.setup() end
  return core.run()
end

duplex.stop = core.stop           -- make duplex.run() return
duplex.spawn = core.spawn         -- run a function in a new coroutine
--- Wait this many seconds: yields inside a coroutine, runs the loop meanwhile
--- from the main chunk (like connect and receive).
---@param seconds number
function duplex.sleep(seconds) return runtime.blocking(core.sleep, seconds) end
duplex.now = core.now             -- monotonic seconds
duplex.timer = core.timer         -- timer(seconds, fn [, repeat]) -> t with t:cancel()
duplex.signal = core.signal       -- signal("TERM", fn)
--- Where errors of spawned coroutines, timers and signal handlers go (with
--- their traceback), and servers' errors unless their `log` option is set:
--- fn(level, message); nil restores the default, stderr.
duplex.set_log = runtime.set_log
duplex.encode_frame = core.encode_frame -- one broadcast frame for ws:send_frame

return duplex
