---@meta duplex.core
-- duplex.core, the C module (csrc/l_*.c), for LuaLS: never installed nor
-- loaded (it is outside lua/), only read by the language server through
-- .luarc.json. spec/api_docs_spec.lua checks it against the built module:
-- every function and method the C code registers is here, and no other.
--
-- The loop, timers, processes, sockets and TLS (everything from core.run
-- down to core.tls_context) are in the Lua 5.4 build only; the LuaJIT
-- build (make luajit, for nginx) has the sans-I/O rest.

---@class duplex.core
---@field version string             the release, as in csrc/dx_version.h
local core = {}

-- ---- helpers (l_util.c) ----

--- Validate UTF-8, possibly across pieces: state 0 (the default) means
--- "between code points"; pass the returned state with the next piece.
---@param s string
---@param state integer|nil
---@return boolean valid, integer|nil state 0 when s ends a complete text
function core.utf8_valid(s, state) end

--- s XOR the 4-byte masking key, starting at key byte offset.
---@param s string
---@param key string 4 bytes
---@param offset integer|nil 0..3
---@return string
function core.mask(s, key, offset) end

--- n bytes from OpenSSL's CSPRNG.
---@param n integer 1..65536
---@return string
function core.random(n) end

--- Standard base64 (for HTTP basic authentication).
---@param s string
---@return string
function core.base64(s) end

--- The SHA-1 of s as 40 lowercase hex digits (a Redis script's EVALSHA name).
---@param s string
---@return string
function core.sha1_hex(s) end

--- A watcher: one coroutine serves many sockets by their input
--- (sock:watch, watcher:next, sock:pump), none waits per connection.
---@return duplex.core.Watcher
function core.watcher() end

--- fn(...) as xpcall with a traceback, except that fn may not wait: a
--- callback that tries fails ("cannot wait here").
---@param fn function
---@return boolean ok, any ...
function core.call_nowait(fn, ...) end

--- A connection object of class (duplex.websocket's WebSocket or a kind
--- of it) on sock and engine: a userdata whose every field reads and
--- writes as a table's with the class as its metatable would. sock,
--- engine, request, remote_address, remote_port (while it is a port
--- number) and the flags state, _reading and _sending are kept in the
--- object itself; any other field in a table made when the first one is
--- set. data, the application's table, is made there when first read.
--- It starts with those of fields whose values are not the class's.
---@param class table
---@param sock any
---@param engine duplex.core.Engine
---@param fields table|nil
---@return duplex.WebSocket
function core.connection(class, sock, engine, fields) end

--- Keep ws.request as one string until it is read (then the table is made
--- again, field for field); false when the request holds more than it
--- came with (the application's fields, a headers table made). For a
--- connection whose request nobody has been handed yet.
---@param ws duplex.WebSocket
---@return boolean packed
function core.pack_request(ws) end

--- For duplex.callbacks: ws.sock:pump(ws.engine, ws.high_water,
--- ws.low_water, on_message, ws) with the on_message of ws's route
--- (ws._route), reading those fields in C; nothing once ws is closed.
---@param ws duplex.WebSocket
---@return string|false|nil kind, any ...
function core.pump(ws) end

--- ws:send for connections on our loop (duplex.websocket): the common
--- case in C, lua_send(ws, data, kind, opts) for the rest (the caller's
--- mistakes, a closing connection, a refusal, waiting for room).
---@param lua_send function
---@return fun(ws: duplex.WebSocket, data: string, kind: string|nil, opts: table|nil): true|nil, string|nil
function core.fast_send(lua_send) end

--- The step of ws:messages() for connections on our loop: the next whole
--- message in C; lua_next(ws) when it cannot start (not in a coroutine of
--- the loop, a connection being read or closed), after_event(ws, kind,
--- data, ...) with any other event, or with nil and why when the read
--- failed.
---@param lua_next function
---@param after_event function
---@return fun(ws: duplex.WebSocket): string|nil, string|nil, integer|boolean|nil, string|nil
function core.fast_next(lua_next, after_event) end

--- CRC16-CCITT (XMODEM) of s: what Redis Cluster hashes a key's slot with.
---@param s string
---@return integer
function core.crc16(s) end

--- glibc's M_TRIM_THRESHOLD and M_MMAP_THRESHOLD, process-wide (duplex.run
--- sets 64 MiB, 32 MiB); false where it is not glibc.
---@param trim_bytes integer
---@param mmap_bytes integer at most 32 MiB
---@return boolean
function core.tune_malloc(trim_bytes, mmap_bytes) end

--- Monotonic seconds, the clock of the loop's timers.
---@return number
function core.now() end

-- ---- the engine (l_engine.c) ----

--- A sans-I/O protocol engine: bytes in (feed), events out (next), frames
--- queued by send/ping/pong/close and taken with data_to_send.
---@param opts {role: "server"|"client", max_message: integer|nil, max_frame: integer|nil, max_buffered: integer|nil, streaming: boolean|nil, auto_pong: boolean|nil}
---@return duplex.core.Engine
function core.engine(opts) end

--- One unmasked (server) frame to hand to many engines with send_raw; with
--- window_bits (8..15) the message is compressed once, for connections
--- without server context takeover.
---@param data string
---@param kind "text"|"binary"|"continuation"|"ping"|"pong"|nil default "text"
---@param fin boolean|nil default true
---@param window_bits integer|nil
---@return string
function core.encode_frame(data, kind, fin, window_bits) end

--- A frame from encode_frame (uncompressed) queued in one call on many
--- connections: the engines that are the values of subscribers, where each
--- is a live server engine written by a loop socket (sock:attach), without
--- permessage-deflate, with at most limit bytes queued, that takes the
--- frame. Returns how many took it and the keys of the rest (nil when
--- none), not sent to: the caller sends to those one by one (duplex.pubsub).
--- Only where the loop is built in (not in the LuaJIT build).
---@param frame string
---@param subscribers table<any, duplex.core.Engine|any>
---@param limit integer
---@return integer queued, any[]|nil others
function core.fan_out(frame, subscribers, limit) end

--- May code be sent in a close frame (1000-1003, 1007-1014, 3000-4999)?
---@param code integer
---@return boolean
function core.close_code_valid(code) end

--- The engine's and the HTTP parser's defaults, written once in C:
--- { max_message = 16 MiB, max_header_size = 8192, max_headers = 100 }.
---@type {max_message: integer, max_header_size: integer, max_headers: integer}
core.defaults = nil

--- Would e:close(code, reason) take these (a code that may be sent, a reason
--- of at most 123 bytes of UTF-8, none without a code)? The one rule, in C.
---@param code integer|nil nil: no code (0 is a bad code, as for ws:close)
---@param reason string|nil
---@return true|nil ok, string|nil why
function core.close_check(code, reason) end

-- ---- the opening handshake (l_handshake.c) ----

--- A parser for one upgrade request.
---@param opts {max_header_size: integer|nil, max_headers: integer|nil}|nil defaults 8192, 100
---@return duplex.core.HandshakeServer
function core.handshake_server(opts) end

--- A client's request (hc:request()) and the parser for its response.
---@param opts {host: string, port: integer|nil, secure: boolean|nil, target: string|nil, origin: string|nil, protocols: string[]|nil, extensions: string|nil, headers: table|nil, max_header_size: integer|nil, max_headers: integer|nil}
---@return duplex.core.HandshakeClient
function core.handshake_client(opts) end

--- The 101 response to a request with this key (or to request, whose key
--- is read where it waits).
---@param opts {key: string|nil, request: duplex.Request|nil, protocol: string|nil, extensions: string|nil, headers: table|nil}
---@return string
function core.handshake_response(opts) end

--- A whole HTTP response (a refusal, a page), with Content-Length.
---@param status integer 200..599
---@param headers table|nil { name = value } or { {name, value}, ... }
---@param body string|nil
---@return string
function core.http_response(status, headers, body) end

--- Sec-WebSocket-Accept for a Sec-WebSocket-Key.
---@param key string
---@return string
function core.accept_key(key) end

-- ---- permessage-deflate (l_pmd.c) ----

--- A client's Sec-WebSocket-Extensions offer.
---@param offer duplex.DeflateOptions|nil
---@return string
function core.pmd_offer(offer) end

--- Server side: the first acceptable offer among request.extensions.
---@param extensions table[] request.extensions
---@param policy duplex.DeflateOptions|nil
---@return string|nil response, table|string params_or_why
function core.pmd_accept(extensions, policy) end

--- Client side: the agreed parameters, false when the server accepted
--- none, or nil and why the handshake must fail.
---@param extensions table[] response.extensions
---@param offer duplex.DeflateOptions|nil what was offered
---@return table|false|nil params, string|nil why
function core.pmd_check_response(extensions, offer) end

--- Compress and inflate in engine from now on, with the agreed params
--- (config: mem_level, compress_level).
---@param engine duplex.core.Engine
---@param role "server"|"client" the engine's
---@param params table agreed, from pmd_accept or pmd_check_response
---@param config duplex.DeflateOptions|nil
function core.pmd_attach(engine, role, params, config) end

--- A bare codec, outside any engine.
---@param role "server"|"client"
---@param params table|nil
---@param config duplex.DeflateOptions|nil
---@return duplex.core.Codec
function core.pmd_codec(role, params, config) end

-- ---- the event loop (l_loop.c) ----

--- Run the loop until nothing is left or core.stop().
---@return true
function core.run() end

--- One pass: run what is ready, wait for I/O and timers at most timeout
--- seconds (default 0), run what woke. Returns whether anything is left.
---@param timeout number|nil 0..86400
---@return boolean
function core.step(timeout) end

--- Make run() return once the running coroutine yields.
function core.stop() end

--- fn(...) in a new loop coroutine.
---@param fn function
---@return thread
function core.spawn(fn, ...) end

--- When the running loop coroutine's function ends, go on in the same
--- coroutine, on an emptied stack, with fn(arg, ok, err); nil fn takes it back.
---@param fn fun(arg: any, ok: boolean, err: any)|nil
---@param arg any
function core.at_end(fn, arg) end

--- Wait, in a loop coroutine.
---@param seconds number
function core.sleep(seconds) end

--- Wait until core.wake(this coroutine, ...) or timeout: returns the
--- values given to wake, or nil, "timeout".
---@param timeout number|nil
---@return any ...
function core.park(timeout) end

--- End a park of co with these values; false if co is not parked.
---@param co thread
---@return boolean
function core.wake(co, ...) end

--- fn(timer) in a new coroutine after seconds, then every `every` seconds.
---@param seconds number
---@param fn fun(timer: duplex.core.Timer)
---@param every number|nil
---@return duplex.core.Timer
function core.timer(seconds, fn, every) end

--- Where the errors of loop coroutines go (nil: stderr).
---@param fn fun(err: any, traceback: string, co: thread)|nil
function core.on_error(fn) end

--- fn(name) in a new coroutine on the signal; nil restores the default.
---@param name "INT"|"TERM"|"HUP"|"CHLD"
---@param fn fun(name: string)|nil
function core.signal(name, fn) end

--- Counts of the loop's coroutines, sockets, timers (armed), timers fired so far, fds, ready and waiting tasks.
---@return {coroutines: integer, sockets: integer, timers: integer, timers_fired: integer, fds: integer, ready: integer, waiting: integer}
function core.loop_stats() end

--- fork(2); the child gets a new event loop. 0 in the child.
---@return integer|nil pid, string|nil err
function core.fork() end

--- waitpid(2): pid (-1: any), how ("exited", "signaled", "stopped") and
--- the code or signal; 0 with nohang when none has ended.
---@param pid integer|nil
---@param nohang boolean|nil
---@return integer|nil pid, string|nil how_or_err, integer|nil code
function core.waitpid(pid, nohang) end

--- kill(2) with a signal name ("TERM", default) or number.
---@param pid integer
---@param signal string|integer|nil
---@return true|nil ok, string|nil err
function core.kill(pid, signal) end

--- getpid(2).
---@return integer
function core.getpid() end

--- Get signal (default "TERM") when the parent dies; false when it is
--- already gone.
---@param signal string|integer|nil
---@return boolean|nil ok, string|nil err
function core.die_with_parent(signal) end

-- ---- descriptors the program did not open (l_fd.c) ----

--- Read fd (stdin as a pipe, a file or a terminal) on the loop, without
--- setting O_NONBLOCK on it: a zero-timeout poll comes before each read.
---@param fd integer
---@return duplex.core.Reader|nil reader, string|nil err
function core.reader(fd) end

--- Whether fd is a terminal.
---@param fd integer
---@return boolean
function core.isatty(fd) end

-- ---- sockets and TLS (l_socket.c, l_tls.c, l_connect.c, l_listen.c) ----

--- A listening TCP socket (a host name is resolved in place).
---@param opts {host: string|nil, port: integer|nil, backlog: integer|nil, reuseport: boolean|nil, ipv6only: boolean|nil}
---@return duplex.core.Listener|nil listener, string|nil err
function core.listen(opts) end

--- Connect over TCP (names resolved off the loop thread), in a loop coroutine.
---@param opts {host: string, port: integer, timeout: number|nil, bind: string|{host: string, port: integer|nil}|nil, nodelay: boolean|nil}
---@return duplex.core.Socket|nil sock, string|nil err
function core.connect(opts) end

--- Resolve a name off the loop thread, in a loop coroutine.
---@param host string
---@param port integer|nil
---@return {family: "inet"|"inet6", addr: string, port: integer}[]|nil addrs, string|nil err
function core.getaddrinfo(host, port) end

--- A TLS context: a server needs cert and key; a client verifies by default
--- (against ca, else the system store) and may present cert and key.
---@param opts {mode: "server"|"client"|nil, cert: string|nil, key: string|nil, chain: string|nil, ca: string|nil, verify: boolean|nil, alpn: string|string[]|nil}
---@return duplex.core.TLSContext|nil ctx, string|nil err
function core.tls_context(opts) end

-- ---- userdata ----

---@class duplex.core.Engine
local Engine = {}

--- Keep a copy of bytes from the peer; nothing is parsed yet.
---@param data string
function Engine:feed(data) end

--- The next event, parsed now, or nil when more bytes are needed:
--- "text"|"binary", data; "fragment", data, kind, first, last;
--- "ping", data; "pong", data, latency (seconds, when it answers our ping);
--- "close", reason, code, by_peer; "error", reason, code.
---@return string|nil kind, string|nil data, any, any, any
function Engine:next() end

--- Fed bytes wait to be parsed.
---@return boolean
function Engine:has_input() end

--- Queue a message or a piece of one ("continuation" goes on with fin = false's).
---@param data string
---@param kind "text"|"binary"|"continuation"|nil
---@param fin boolean|nil default true
---@param compress boolean|nil
---@return true|nil ok, string|nil err "overflow" past max_buffered
function Engine:send(data, kind, fin, compress) end

---@param data string|nil up to 125 bytes
---@return true|nil ok, string|nil err
function Engine:ping(data) end

---@param data string|nil up to 125 bytes
---@return true|nil ok, string|nil err
function Engine:pong(data) end

--- Start the closing handshake.
---@param code integer|nil
---@param reason string|nil up to 123 bytes, with a code
---@return true|nil ok, string|nil err
function Engine:close(code, reason) end

--- Queue a frame from core.encode_frame (server role).
---@param frame string
---@return true|nil ok, string|nil err
function Engine:send_raw(frame) end

--- Take the bytes queued for the peer.
---@return string
function Engine:data_to_send() end

--- Bytes queued for the peer.
---@return integer
function Engine:pending() end

---@return "open"|"closing"|"closed"
function Engine:state() end

---@return "server"|"client"
function Engine:role() end

---@return {frames_in: integer, frames_out: integer, messages_in: integer, messages_out: integer, deflate: boolean}
function Engine:stats() end

--- Free the engine's buffers and codec now (the collector does it too).
function Engine:release() end

--- Free the memory of empty buffers (an idle connection).
function Engine:shrink() end

--- Whether the engine's buffers hold memory (in use, or for shrink to free).
---@return boolean
function Engine:holding() end

--- Keep the connection's clocks from now on (ping_interval 0: no heartbeat).
---@param ping_interval number seconds of silence before a ping
---@param ping_timeout number seconds to wait for traffic after a ping
---@param close_timeout number seconds to wait for the reply to our close frame
function Engine:set_timing(ping_interval, ping_timeout, close_timeout) end

--- When (core.now() time) tick() next has something to do, or nil.
---@return number|nil
function Engine:due() end

--- Do what is due (the heartbeat's ping, a quiet second's shrink); a word
--- when the connection must be dropped.
---@return "ping timeout"|"close timeout"|"overflow"|nil
function Engine:tick() end

---@class duplex.core.Socket
local Socket = {}

--- Up to max bytes (default 64 KiB), waiting up to timeout.
---@param max integer|nil
---@param timeout number|nil
---@return string|nil data, string|nil err "timeout", "closed" or why
function Socket:read(max, timeout) end

--- Up to max bytes (default 256 KiB) of what has come, never waiting.
---@param max integer|nil
---@return string|nil data, string|nil err "again" (nothing yet), "closed" or why
function Socket:try_read(max) end

--- The upgrade request that hs parses, from what has come, never waiting:
--- the bytes go from the loop's receive buffer into the parser.
---@param hs duplex.core.HandshakeServer
---@return duplex.Request|nil request, string|nil err "again" (more is to come), "closed", why it failed, or a malformed request's message, integer|nil status for that message
function Socket:take_request(hs) end

--- Queue the 101 that core.handshake_response(opts) makes, built in the
--- socket's output.
---@param opts table key, protocol, extensions, headers
---@return true|nil ok, string|nil err
function Socket:write_accept(opts) end

--- Queue bytes; the loop writes them at the end of its pass.
---@param data string
---@return true|nil ok, string|nil err
function Socket:write(data) end

--- Wait until everything queued is written.
---@param timeout number|nil
---@return true|nil ok, string|nil err
function Socket:flush(timeout) end

--- Write what the kernel takes now; returns the bytes still queued.
---@return integer
function Socket:try_flush() end

--- Wait until at most low bytes are queued.
---@param low integer
---@param timeout number|nil
---@return true|nil ok, string|nil err
function Socket:drain(low, timeout) end

--- Bytes queued (the socket's and its engine's).
---@return integer
function Socket:buffered() end

--- Flush, then stop sending (TLS close_notify, FIN); reading goes on.
---@param timeout number|nil
---@return true|nil ok, string|nil err
function Socket:shutdown(timeout) end

--- Close now (abort: RST instead of FIN).
---@param abort boolean|nil
---@return true
function Socket:close(abort) end

---@return string|nil address, integer|string|nil port_or_err
function Socket:peer() end

---@return string|nil address, integer|string|nil port_or_err
function Socket:local_address() end

---@return integer|nil fd, string|nil err
function Socket:fd() end

---@param on boolean
---@return true|nil ok, string|nil err
function Socket:setnodelay(on) end

--- Write this engine's output with the socket's own (nil detaches).
---@param engine duplex.core.Engine|nil
---@return true|nil ok, string|nil err
function Socket:attach(engine) end

--- The engine's next event (as engine:next()), reading as needed; nil, err
--- on timeout or when the socket fails.
---@param engine duplex.core.Engine
---@param timeout number|nil
---@return string|nil kind, any, any, any, any
function Socket:receive(engine, timeout) end

--- The engine's next event as receive returns it, or nil, "again" where
--- receive would wait; never yields (what a watcher's callbacks call).
--- With on_message, messages go to on_message(ws, data, kind) here (false,
--- err when it raised) and the first other event is returned.
---@param engine duplex.core.Engine
---@param high integer|nil   with more queued for the peer: "again" until low
---@param low integer|nil
---@param on_message fun(ws: any, data: string, kind: string)|nil
---@param ws any             on_message's first argument
---@return string|false|nil kind, any, any, any, any
function Socket:pump(engine, high, low, on_message, ws) end

--- Have watcher name this socket whenever it has input to pump (nil stops).
---@param watcher duplex.core.Watcher|nil
---@return true|nil ok, string|nil err
function Socket:watch(watcher) end

--- Keep the attached engine's clocks (Engine:set_timing) on a loop timer;
--- when they say the connection is over, owner:_timeout(what) runs in a new
--- coroutine with tick()'s word. nil stops.
---@param owner {_timeout: fun(self: any, what: string)}|nil
function Socket:clock(owner) end

--- The TLS handshake on this connection.
---@param ctx duplex.core.TLSContext
---@param opts {servername: string|nil, timeout: number|nil}|nil servername: default the host given to core.connect
---@param timeout number|nil
---@return true|nil ok, string|nil err
function Socket:starttls(ctx, opts, timeout) end

--- The ALPN protocol agreed on, if any.
---@return string|nil
function Socket:alpn() end

---@class duplex.core.Listener
local Listener = {}

--- The next connection, waiting up to timeout, with its peer's address
--- and port (what sock:peer() would ask the kernel for again).
---@param timeout number|nil
---@return duplex.core.Socket|nil sock, string|nil ip_or_err, integer|nil port
function Listener:accept(timeout) end

--- The connections in the accept queue, without waiting (before a close).
---@return duplex.core.Socket[]
function Listener:drain() end

---@return string|nil address, integer|string|nil port_or_err
function Listener:address() end

---@return true
function Listener:close() end

---@return integer|nil fd, string|nil err
function Listener:fd() end

---@class duplex.core.Watcher
local Watcher = {}

--- The next watched socket with input, in order, waiting (in a loop
--- coroutine) until there is one; nil once the watcher is closed.
---@return duplex.core.Socket|nil
function Watcher:next() end

--- next()'s loop in C for a server of callback connections: for each
--- watched socket with input, pump(server.connections[sock]) until it
--- returns nil, "again" or nil, nil; any other result goes to
--- after(ws, ...), which returns true to pump ws on. Returns nothing once
--- the watcher is closed, or false, err (with a traceback), ws when pump or
--- after raised. A socket of no connection goes to greet(sock), when
--- given; false, err, nil, sock when that raised. None may wait.
---@param server {connections: table<duplex.core.Socket, any>}
---@param pump fun(ws: any): ...
---@param after fun(ws: any, ...): boolean
---@param greet nil|fun(sock: duplex.core.Socket)
---@return false|nil, string|nil, any, duplex.core.Socket|nil
function Watcher:serve(server, pump, after, greet) end

--- Every socket stops being watched, and next() returns nil.
function Watcher:close() end

--- How many sockets it watches.
---@return integer
function Watcher:count() end

---@class duplex.core.Reader
local Reader = {}

--- 1..max bytes; nil, "timeout" (nothing consumed); nil, "closed" at the end of input.
---@param max integer|nil
---@param timeout number|nil
---@return string|nil data, string|nil err
function Reader:read(max, timeout) end

--- Close the reader's own duplicate of the descriptor.
function Reader:close() end

---@class duplex.core.Timer
local Timer = {}

--- Disarm; returns whether it was armed.
---@return boolean
function Timer:cancel() end

---@return boolean
function Timer:active() end

---@class duplex.core.HandshakeServer
local HandshakeServer = {}

--- Feed request bytes: nil until the header is complete, then the request;
--- nil, status, message for a malformed one.
---@param data string
---@return duplex.Request|nil request, integer|nil status, string|nil message
function HandshakeServer:feed(data) end

--- The bytes that came after the header (frames).
---@return string
function HandshakeServer:rest() end

--- Ready for the next request, with the same limits.
function HandshakeServer:reset() end

--- Free the parser.
function HandshakeServer:close() end

---@class duplex.core.HandshakeClient
local HandshakeClient = {}

--- Feed response bytes: nil until the header is complete, then the
--- response; nil, message and the response when it is a refusal or wrong.
---@param data string
---@return duplex.Response|nil response, string|nil err, duplex.Response|nil refused
function HandshakeClient:feed(data) end

---@return string
function HandshakeClient:rest() end

--- The request to send.
---@return string
function HandshakeClient:request() end

--- The Sec-WebSocket-Key sent.
---@return string
function HandshakeClient:key() end

--- Free the parser.
function HandshakeClient:close() end

---@class duplex.core.Codec
local Codec = {}

--- Compress a piece of a message (fin: its end, the default).
---@param data string
---@param fin boolean|nil
---@return string|nil data, string|nil err
function Codec:deflate(data, fin) end

--- Inflate a piece; max bounds the whole message (default 16 MiB).
---@param data string
---@param fin boolean|nil
---@param max integer|nil
---@return string|nil data, string|nil err "too big" or "invalid data"
function Codec:inflate(data, fin, max) end

--- zlib bytes held.
---@return integer
function Codec:memory() end

--- Free the zlib streams.
function Codec:close() end

-- An opaque context for sock:starttls and connect's tls.context.
---@class duplex.core.TLSContext

return core
