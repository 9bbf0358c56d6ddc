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

---@class duplex
---@field version string            the release (csrc/dx_version.h)
---@field core duplex.core           the C core, as require "duplex.core"
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
---@field path string                the target without the query
---@field query table<string, string> decoded parameters (first value of a repeated name); {} without a query
---@field raw_query string|nil       the query as sent, without the "?"
---@field version string             "1.1"
---@field headers table<string, string> lower-case names; repeated headers joined with ", "
---@field host string|nil
---@field origin string|nil
---@field key string|nil             Sec-WebSocket-Key
---@field protocols string[]         subprotocols the client offers
---@field extensions table[]         parsed Sec-WebSocket-Extensions: { name =, params =, params_list = }
---@field websocket boolean          a valid WebSocket upgrade
---@field upgrade boolean            it asked to upgrade (valid or not)
---@field status integer|nil         not a valid upgrade: the status to refuse it with
---@field error string|nil           not a valid upgrade: why
---@field peer_address string
---@field peer_port integer
---@field remote_address string      the client behind a trusted proxy, else the peer

---@class duplex.Response
---@field status integer
---@field reason string
---@field version string
---@field headers table<string, string> lower-case names
---@field location string|nil        the Location header
---@field protocol string|nil        the subprotocol the server chose
---@field extensions table[]         parsed Sec-WebSocket-Extensions
---@field body string|nil            a refusal's body (at most 64 KiB); nil on a 101

-- The option classes below are the sets of lua/duplex/options.lua, which
-- checks them: ConnectionOptions its CONNECTION, RouteOptions
-- options.route, ListenOptions options.listen, ConnectOptions
-- options.connect (spec/api_docs_spec.lua keeps them equal).

---@class duplex.ConnectionOptions
---@field max_message? integer        largest message, default 16 MiB (1009 beyond)
---@field max_frame? integer          largest frame, default max_message
---@field streaming? boolean          receive() returns pieces of messages
---@field ping_interval? number       seconds of silence before a ping, default 20; 0 = off
---@field ping_timeout? number        seconds to wait after a ping, default 20
---@field close_timeout? number       seconds to wait for the closing handshake, default 5
---@field high_water? integer         send() waits above this many queued bytes, default 1 MiB
---@field low_water? integer          ... until below this, default 256 KiB
---@field send_timeout? number        a send waiting longer closes the peer (1008), default 30
---@field max_buffered? integer       queue limit for frames that do not wait, default 16 MiB
---@field compress_threshold? integer smaller messages are not compressed, default 128
---@field deflate? boolean|duplex.DeflateOptions permessage-deflate (server: policy; client: offer), off by default
---@field protocols? string[]         server: spoken, in order of preference; client: offered
---@field headers? table<string, string> server: on the 101 response; client: on the request

---@class duplex.RouteOptions: duplex.ConnectionOptions
---@field handler? fun(ws: duplex.WebSocket, request: duplex.Request) one call per connection, in its own coroutine
---@field on_message? fun(ws: duplex.WebSocket, message: string, kind: "text"|"binary") instead of handler, no coroutine
---@field on_open? fun(ws: duplex.WebSocket, request: duplex.Request) with on_message: once open; may wait
---@field select_protocol? fun(offered: string[], request: duplex.Request): string|nil instead of protocols
---@field origins? string[]           Origin allow-list (403 otherwise)
---@field on_request? fun(request: duplex.Request): integer|nil, string|nil, table|nil refuse: status, body, headers
---@field on_close? fun(ws: duplex.WebSocket, code: integer, reason: string) once the connection has ended

---@class duplex.ListenOptions: duplex.RouteOptions
---@field host? string                default "0.0.0.0"
---@field port? integer               default 8080; 0 picks a free port
---@field path? string                the one path served with handler (default: any)
---@field routes? table<string, fun(ws: duplex.WebSocket, request: duplex.Request)|duplex.RouteOptions> path -> route
---@field on_http? fun(request: duplex.Request): integer|nil, table|nil, string|nil plain HTTP: status, headers, body
---@field trusted_proxies? string[]   addresses/CIDR blocks whose X-Forwarded-For is believed
---@field tls? {cert: string, key: string, chain: string|nil} serve wss
---@field max_connections? integer    default 10000 (503 beyond)
---@field handshake_timeout? number   default 10 s
---@field max_header_size? integer    default 8192 (431 beyond)
---@field max_headers? integer        default 100
---@field backlog? integer            default 511
---@field reuseport? boolean          SO_REUSEPORT
---@field log? fun(level: string, message: string) default: duplex.set_log's

---@class duplex.ConnectOptions: duplex.ConnectionOptions
---@field origin? string
---@field timeout? number             connect + TLS + handshake, default 10 s
---@field tls? {ca: string|nil, servername: string|nil, verify: boolean|nil, context: duplex.core.TLSContext|nil}
---@field proxy? string               "http://user:pass@host:port" (CONNECT)
---@field follow_redirects? boolean|integer default false; true = 5, at most 10
---@field bind? string                local source address
---@field max_header_size? integer    response header limit, default 8192

---@class duplex.DeflateOptions
---@field server_max_window_bits? integer 8..15, default 15
---@field client_max_window_bits? integer|boolean 8..15, default 15; in an offer, true: the server may pick
---@field server_no_context_takeover? boolean
---@field client_no_context_takeover? boolean
---@field mem_level? integer          zlib's, 1..9, default 5
---@field compress_level? integer     zlib's, 0..9, default 6

---@class duplex.RunOptions
---@field workers? integer            more than 1: run that many supervised processes
---@field setup? fun(index: integer|nil): any in each worker (index 1..N), or once: start the servers
---@field on_stop? fun(ctx: any, index: integer) a worker's SIGTERM/SIGINT: ctx is what setup returned
---@field stop_timeout? number        seconds a stopping worker gets before SIGKILL, default 10
---@field reload_grace? number        seconds old workers serve after a reload started new ones, default 1
---@field log? fun(level: string, message: string) the supervisor's messages, default stderr
---@field tune_malloc? boolean        false keeps glibc's malloc thresholds

--- Start a server. Returns the server or nil, err.
---@type fun(opts: duplex.ListenOptions): duplex.Server|nil, string|nil
duplex.listen = server.listen

--- Connect to a ws:// or wss:// URL. Returns the connection or nil, err.
--- Works from a coroutine (it yields while waiting) or from the main chunk
--- (it runs the loop until the connection is open).
---@param url string
---@param opts duplex.ConnectOptions|nil
---@return duplex.WebSocket|nil ws, string|nil err, duplex.Response|nil response
function duplex.connect(url, opts)
  return runtime.blocking(client.connect, url, opts)
end

--- Run the event loop until there is nothing left to do or duplex.stop().
--- With opts.workers = N (N > 1), fork N worker processes that each run
--- opts.setup() (which should call duplex.listen with reuseport = true) and
--- supervise them: a dead worker is replaced, SIGTERM/SIGINT stop them all.
---@param opts duplex.RunOptions|nil
---@return true
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

--- Make duplex.run() return, once the running coroutine yields.
---@type fun()
duplex.stop = core.stop
--- Run fn(...) in a new coroutine of the loop; returns the coroutine.
---@type fun(fn: function, ...: any): thread
duplex.spawn = core.spawn
--- Wait this many seconds: yields inside a coroutine, runs the loop meanwhile
--- from the main chunk (like connect and receive).
---@param seconds number
function duplex.sleep(seconds) return runtime.blocking(core.sleep, seconds) end
--- Monotonic seconds, the clock of timers and timeouts.
---@type fun(): number
duplex.now = core.now
--- fn(timer) after seconds, and then every `every` seconds when given.
---@type fun(seconds: number, fn: fun(timer: duplex.core.Timer), every: number|nil): duplex.core.Timer
duplex.timer = core.timer
--- Run fn(name) in a coroutine on "INT", "TERM", "HUP" or "CHLD"; nil restores the default.
---@type fun(name: "INT"|"TERM"|"HUP"|"CHLD", fn: fun(name: string)|nil)
duplex.signal = core.signal
--- Where errors of spawned coroutines, timers and signal handlers go (with
--- their traceback), and servers' errors unless their `log` option is set:
--- fn(level, message); nil restores the default, stderr.
---@type fun(fn: fun(level: string, message: string)|nil)
duplex.set_log = runtime.set_log
--- One unmasked frame for ws:send_frame on many connections; with
--- window_bits, compressed once for those without server context takeover.
---@type fun(data: string, kind: string|nil, fin: boolean|nil, window_bits: integer|nil): string
duplex.encode_frame = core.encode_frame

return duplex
