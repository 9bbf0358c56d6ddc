--- duplex inside a cqueues controller: the same connection object, waiting
--- through cqueues sockets, so a WebSocket server or client runs beside any
--- other cqueues work (DNS, timers, other protocols) in one controller.
---
--- local dcq = require "duplex.cqueues"
--- local cq = require("cqueues").new()
--- dcq.listen(cq, { port = 8080, handler = function(ws) ... end })
--- cq:wrap(function() local ws = dcq.connect("ws://127.0.0.1:8080/") ... end)
--- assert(cq:loop())
local cqueues = require "cqueues"
local csocket = require "cqueues.socket"
local errno = require "cqueues.errno"
local transport = require "duplex.transport"
local url = require "duplex.url"
local options = require "duplex.options"

local dcq = {}

-- cqueues reports errors as errno numbers; the stream interface speaks in
-- "timeout" and "closed" and otherwise a message.
local function why(err)
  if err == errno.ETIMEDOUT then return "timeout" end
  if err == errno.EPIPE or err == errno.ECONNRESET then return "closed" end
  return type(err) == "number" and errno.strerror(err) or tostring(err)
end

-- Errors are returned, never thrown: the stream interface wants them as
-- values, and a thrown ETIMEDOUT would end the coroutine.
local function quiet(_, _, err) return err end

-- duplex.Stream over a cqueues socket (documented there).
---@class duplex.CqueuesStream: duplex.Stream
local Stream = {}
Stream.__index = Stream

---@class duplex.CqueuesListenOptions: duplex.RouteOptions
---@field handler fun(ws: duplex.WebSocket, request: duplex.Request) in its own cqueues coroutine
---@field host? string                default "127.0.0.1"
---@field port? integer               default 8080; 0 picks a free one
---@field handshake_timeout? number   default 10 s
---@field max_header_size? integer    default 8192 (431 beyond)
---@field max_headers? integer        default 100

--- The stream interface of duplex.transport over a connected cqueues socket.
---@param sock any a cqueues socket
---@return duplex.Stream
function dcq.stream(sock)
  sock:onerror(quiet)
  sock:setmode("bn", "bn") -- binary, and writes go out at once
  return setmetatable({ sock = sock }, Stream)
end

-- cqueues keeps a socket's error until cleared, and throws once too many
-- pile up: a timeout here is routine (the heartbeat waits with one), so it
-- is cleared as soon as it is reported.
function Stream:read(max, timeout)
  local sock = self.sock
  local data, err = sock:xread(-max, "b", timeout)
  if data then return data end
  if err == nil then return nil, "closed" end
  sock:clearerr()
  return nil, why(err)
end

function Stream:write(data, timeout)
  local ok, err = self.sock:xwrite(data, "bn", timeout)
  if ok then return true end
  self.sock:clearerr()
  -- cqueues does not say how much went out: the connection cannot go on
  -- after a timeout here, and the connection object treats it so.
  return nil, why(err), 0
end

function Stream:shutdown()
  return self.sock:shutdown("w")
end

function Stream.yield(_)
  cqueues.sleep(0)
end

function Stream:close()
  self.sock:close()
end

function Stream:peer()
  local _, ip, port = self.sock:peername()
  return ip, port
end

--- Serve WebSocket connections from controller cq: opts are those of
--- duplex.listen that concern one connection, plus host, port (0 picks a
--- free one) and handler(ws, request), run in its own cqueues coroutine.
--- Returns a server with .port(), .url(path) and .close().
---@param cq any a cqueues controller
---@param opts duplex.CqueuesListenOptions
---@return duplex.CqueuesServer|nil server, string|nil err
function dcq.listen(cq, opts)
  if type(opts) ~= "table" or (type(opts.handler) ~= "function" and type(opts.on_message) ~= "function") then
    error("duplex.cqueues.listen: options with a handler or on_message function expected", 2)
  end
  options.check("duplex.cqueues.listen", opts, options.cqueues_listen, 2)
  -- what each connection takes: all but where to listen
  local accept_opts = {}
  for k, v in pairs(opts) do
    if k ~= "host" and k ~= "port" then accept_opts[k] = v end
  end
  local lsock = csocket.listen { host = opts.host or "127.0.0.1", port = opts.port or 8080, reuseaddr = true }
  lsock:onerror(quiet)
  local ok, err = lsock:listen()
  if not ok then return nil, why(err) end
  local _, host, port = lsock:localname()
  ---@class duplex.CqueuesServer
  ---@field host string             the bound address
  local server = { host = host, connections = {}, closed = false }

  local function serve(sock)
    local ws, req = transport.accept(dcq.stream(sock), accept_opts)
    if not ws then return end
    server.connections[ws] = true
    ws:serve(opts, req, function(msg) io.stderr:write("duplex.cqueues: ", msg, "\n") end)
    server.connections[ws] = nil
  end

  cq:wrap(function()
    while not server.closed do
      local sock, aerr = lsock:accept(0.5)
      if sock then
        cq:wrap(serve, sock)
      elseif aerr ~= errno.ETIMEDOUT and not server.closed then
        io.stderr:write("duplex.cqueues: accept failed: ", why(aerr), "\n")
        cqueues.sleep(0.1) -- out of descriptors and the like: do not spin
      end
    end
    lsock:close()
  end)

  --- The bound port.
  ---@return integer
  function server.port() return port end
  --- ws://host:port/path to connect to.
  ---@param path string|nil default "/"
  ---@return string
  function server.url(path) return string.format("ws://%s:%d%s", host, port, path or "/") end
  --- Stop accepting, and close the open connections with 1001.
  function server.close()
    server.closed = true
    for ws in pairs(server.connections) do ws:start_close(1001, "server shutting down") end
  end
  return server
end

--- Open a WebSocket from inside a cqueues coroutine. ws:// only: for wss,
--- connect and starttls the cqueues socket with a verifying luaossl context
--- yourself and hand it to duplex.transport.connect(dcq.stream(sock), ...).
---@param target string a ws:// URL
---@param opts duplex.ConnectOptions|nil tls, proxy, follow_redirects and bind do not apply
---@return duplex.WebSocket|nil ws, string|nil err, duplex.Response|nil response
function dcq.connect(target, opts)
  opts = opts or {}
  local u, perr = url.parse(target)
  if not u then return nil, perr end
  if u.secure then return nil, "duplex.cqueues.connect: wss needs your own TLS socket (see README)" end
  local sock = csocket.connect { host = u.host, port = u.port }
  sock:onerror(quiet)
  local ok, err = sock:connect(opts.timeout or 10)
  if not ok then
    sock:close()
    return nil, string.format("connect to %s:%d failed: %s", u.host, u.port, why(err))
  end
  local ws, herr, res = transport.connect(dcq.stream(sock), target, opts)
  if not ws then sock:close() end
  return ws, herr, res
end

return dcq
