--- The `duplex` command (bin/duplex): `duplex connect URL`, an interactive
--- client (stdin lines out, messages in), and `duplex serve`, an echo
--- server that can serve a page too. `duplex --help` says the rest.
---
--- cli.main(argv) returns the exit status; nothing here calls os.exit, so
--- the whole command can be driven from a test.
local duplex = require "duplex"
local core = require "duplex.core"
local url = require "duplex.url"

local cli = {}

--- Exit statuses, documented in `duplex connect --help` and the README.
cli.EXIT = {
  ok = 0,        -- a normal close (1000, 1001, or a close frame without a code)
  failed = 1,    -- connect: no connection (DNS, TCP, TLS, proxy, timeout); serve: cannot listen
  usage = 2,     -- a bad command line
  rejected = 3,  -- connect: the server answered the upgrade with another HTTP status
  closed = 4,    -- connect: closed with another code (the server's 1008, our 1009...)
  lost = 5,      -- connect: no closing handshake (1006: reset, ping timeout, close timeout)
}
local EXIT = cli.EXIT

local function say(...)
  io.stderr:write("duplex: ", ...)
  io.stderr:write("\n")
end

-- ---------------------------------------------------------------------
-- Command lines: every option is described once, by a table that both the
-- parser and --help read.

local function integer(lo, hi)
  return function(s)
    local n = math.tointeger(tonumber(s))
    if n and n >= lo and n <= hi then return n end
    return nil, string.format("expected an integer from %d to %d", lo, hi)
  end
end

local function seconds(s)
  local n = tonumber(s)
  if n and n >= 0 and n <= 86400 * 365 then return n end
  return nil, "expected a number of seconds"
end

local function text(s)
  if s == "" then return nil, "expected a value, got an empty string" end
  return s
end

-- "Name: value", as curl's -H takes it.
local function header(s)
  local name, value = s:match("^([^:]+):%s*(.-)%s*$")
  if not name or name:find("%s") then return nil, "expected 'Name: value'" end
  return { name, value }
end

local function flag(names, key, help) return { names = names, key = key, help = help } end
local function value(names, arg, parse, key, help)
  return { names = names, arg = arg, parse = parse, key = key, help = help }
end
local function list(names, arg, parse, key, help)
  local o = value(names, arg, parse, key, help)
  o.repeated = true
  return o
end

local HELP = flag({ "--help", "-h" }, "help", "show this help")
local MAX_SIZE = value({ "--max-size" }, "BYTES", integer(1, 1 << 53), "max_message",
  "largest message accepted (default 16 MiB); a larger one closes with 1009")
local DEFLATE_FLAG = { "--deflate" }
local PROTOCOL_FLAG = { "--protocol" }

local COMMANDS = {}

COMMANDS.connect = {
  usage = "duplex connect URL [options]",
  summary = "talk to a WebSocket server: stdin lines out, messages in",
  positional = { "URL" },
  about = [[
Connects to URL (ws:// or wss://), sends each line of stdin as a text
message (without its line ending) and prints each message that arrives.
At the end of stdin it closes with 1000 (after --wait) and waits for the
server's answer;
SIGINT or SIGTERM closes with 1001 (twice: drops the connection).
A line that is not UTF-8 goes as a binary message (with a note on stderr).]],
  options = {
    list({ "--header", "-H" }, "'NAME: VALUE'", header, "headers",
      "add a request header (repeatable); Origin sets the Origin header"),
    list(PROTOCOL_FLAG, "NAME", text, "protocols", "offer a subprotocol (repeatable, in order of preference)"),
    flag(DEFLATE_FLAG, "deflate", "offer permessage-deflate compression"),
    value({ "--ca" }, "FILE", text, "ca", "trust the CA certificates in FILE (PEM) for wss://"),
    flag({ "--insecure", "-k" }, "insecure", "do not verify the server's certificate (wss://)"),
    value({ "--proxy" }, "URL", text, "proxy", "go through an HTTP proxy: http://[user:pass@]host:port"),
    value({ "--ping", "--ping-interval" }, "SECONDS", seconds, "ping",
      "ping after this much silence from the server (default 20, 0 = never)"),
    value({ "--timeout" }, "SECONDS", seconds, "timeout", "for TCP connect + TLS + handshake (default 10)"),
    MAX_SIZE,
    flag({ "--binary" }, "binary", "send the lines as binary messages instead of text"),
    value({ "--wait" }, "SECONDS", seconds, "wait",
      "at the end of stdin, close only once no message has come for SECONDS (default 0: at once); "
        .. "some servers send nothing after a close"),
    HELP,
  },
  after = [[
Output, one line per message received:
  on a terminal   < text: MESSAGE
                  < binary: N bytes: 00 01 ff ... (the first 32 bytes)
  otherwise       text MESSAGE
                  binary HEX (every byte, two lowercase hex digits each)
                  close CODE REASON (the last line)
In MESSAGE and REASON a backslash is written \\, and control characters
\n, \r, \t or \xNN, so that every message is one line. How the connection
went is told on stderr.

Exit status:
  0  closed normally (1000, 1001, or a close frame without a code)
  1  could not connect (name lookup, TCP, TLS, proxy, timeout)
  2  bad command line
  3  the server refused the upgrade (an HTTP status other than 101)
  4  closed with another code (e.g. the server's 1008, or 1009 for a
     message over --max-size)
  5  connection lost: no closing handshake (1006)]],
}

COMMANDS.serve = {
  usage = "duplex serve [options]",
  summary = "an echo server (and a page for browsers, with --page)",
  positional = {},
  about = [[
Echoes every WebSocket message back with its type. Prints its URL on
stdout once it listens (and the page's URL with --page); SIGINT or SIGTERM
stops it cleanly, closing connections with 1001.]],
  options = {
    value({ "--port", "-p" }, "N", integer(0, 65535), "port", "port to listen on; 0 picks a free one (default 8080)"),
    value({ "--host" }, "ADDRESS", text, "host", "address to listen on (default 127.0.0.1; 0.0.0.0 or :: for all)"),
    value({ "--path" }, "PATH", text, "path", "the one path that takes WebSocket connections (default: any)"),
    value({ "--page" }, "FILE", text, "page",
      "answer plain HTTP GET / with FILE (read at each request), e.g. a page whose script connects"),
    list(PROTOCOL_FLAG, "NAME", text, "protocols", "a subprotocol to accept (repeatable, in order of preference)"),
    value({ "--tls-cert" }, "FILE", text, "tls_cert", "serve wss:// with this certificate chain (PEM)"),
    value({ "--tls-key" }, "FILE", text, "tls_key", "... and this private key (PEM)"),
    MAX_SIZE,
    flag(DEFLATE_FLAG, "deflate", "accept permessage-deflate compression"),
    flag({ "--deflate-takeover" }, "deflate_takeover",
      "keep the compression context between messages (better ratio, more memory); implies --deflate"),
    value({ "--deflate-window" }, "BITS", integer(8, 15), "deflate_window",
      "LZ77 window of 2^BITS bytes, 8..15, both ways; implies --deflate"),
    value({ "--ping-interval", "--ping" }, "SECONDS", seconds, "ping",
      "ping a client after this much silence (default 20, 0 = never)"),
    value({ "--workers" }, "N", integer(1, 1024), "workers", "processes sharing the port (needs a fixed --port)"),
    value({ "--max-connections" }, "N", integer(1, 1 << 31), "max_connections",
      "more are refused with 503 (default 10000)"),
    HELP,
  },
  after = [[
Exit status: 0 stopped by a signal, 1 could not listen (address in use,
unreadable TLS or page file), 2 bad command line.]],
}

local TOP = [[
usage: duplex COMMAND [options]

commands:
%s
`duplex COMMAND --help` tells a command's options; `duplex --version`.
]]

local function command_names()
  local names = {}
  for name in pairs(COMMANDS) do names[#names + 1] = name end
  table.sort(names)
  return names
end

local function top_help()
  local lines = {}
  for _, name in ipairs(command_names()) do
    local c = COMMANDS[name]
    lines[#lines + 1] = string.format("  %-30s %s", c.usage, c.summary)
  end
  return TOP:format(table.concat(lines, "\n"))
end

local WIDTH, COLUMN = 79, 29 -- help lines, and where an option's text starts

-- words wrapped to WIDTH, every line but the first indented to COLUMN
local function wrap(words)
  local lines, line = {}, ""
  for word in words:gmatch("%S+") do
    if line ~= "" and COLUMN + #line + 1 + #word > WIDTH then
      lines[#lines + 1] = line
      line = word
    else
      line = line == "" and word or line .. " " .. word
    end
  end
  lines[#lines + 1] = line
  return table.concat(lines, "\n" .. string.rep(" ", COLUMN))
end

local function option_help(o)
  local names = "  " .. table.concat(o.names, ", ") .. (o.arg and " " .. o.arg or "")
  -- a long name gets its text on the next line
  local gap = #names < COLUMN and string.rep(" ", COLUMN - #names) or "\n" .. string.rep(" ", COLUMN)
  return names .. gap .. wrap(o.help)
end

local function command_help(c)
  local out = { "usage: " .. c.usage, "", c.about, "", "options:" }
  for _, o in ipairs(c.options) do out[#out + 1] = option_help(o) end
  if c.after then out[#out + 1] = "" out[#out + 1] = c.after end
  return table.concat(out, "\n") .. "\n"
end

local function find_option(c, name)
  for _, o in ipairs(c.options) do
    for _, n in ipairs(o.names) do
      if n == name then return o end
    end
  end
end

local function store(values, o, v)
  if o.repeated then
    local t = values[o.key] or {}
    t[#t + 1] = v
    values[o.key] = t
  else
    values[o.key] = v
  end
end

-- The value of an option that takes one: from --name=VALUE or the next
-- argument. Returns the value and the index of the last argument used.
local function option_value(o, name, inline, argv, i)
  local raw = inline
  if raw == nil then
    i = i + 1
    raw = argv[i]
  end
  if raw == nil then return nil, name .. " needs a value (" .. o.arg .. ")" end
  local v, why = o.parse(raw)
  if v == nil then return nil, string.format("%s %s: %s", name, raw, why) end
  return v, i
end

--- Parse argv[first..] for command c: the values by key (positional ones
--- in values[1..]), or nil and what is wrong.
local function parse(c, argv, first)
  local values, positional = {}, {}
  local i, only_positional = first, false
  while i <= #argv do
    local a = argv[i]
    if only_positional or a == "-" or a:sub(1, 1) ~= "-" then
      positional[#positional + 1] = a
    elseif a == "--" then
      only_positional = true
    else
      local name, inline = a:match("^(%-%-[^=]+)=(.*)$")
      name = name or a
      local o = find_option(c, name)
      if not o then return nil, "unknown option " .. name end
      if o.arg then
        local v, at = option_value(o, name, inline, argv, i)
        if v == nil then return nil, at end
        store(values, o, v)
        i = at
      elseif inline then
        return nil, name .. " takes no value"
      else
        store(values, o, true)
      end
    end
    i = i + 1
  end
  if values.help then return values end
  if #positional < #c.positional then return nil, c.positional[#positional + 1] .. " missing" end
  if #positional > #c.positional then return nil, "unexpected argument " .. positional[#c.positional + 1] end
  for k, v in ipairs(positional) do values[k] = v end
  return values
end

-- ---------------------------------------------------------------------
-- Printing messages.

local ESCAPES = { ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }

--- Text made one safe line: backslash and control characters escaped (a
--- message cannot end the line, nor send escape sequences to a terminal).
function cli.escape(s)
  return (s:gsub("[\0-\31\\\127]", function(ch)
    return ESCAPES[ch] or string.format("\\x%02x", ch:byte())
  end))
end

local function hex(s, sep)
  return (s:gsub(".", function(ch) return string.format("%02x", ch:byte()) .. sep end))
end

local TTY_BYTES = 32 -- a terminal shows the start of a binary message

local function tty_line(message, kind)
  if kind == "text" then return "< text: " .. cli.escape(message) end
  local shown = hex(message:sub(1, TTY_BYTES), " "):sub(1, -2)
  if #message > TTY_BYTES then shown = shown .. " ..." end
  return string.format("< binary: %d bytes%s%s", #message, #message > 0 and ": " or "", shown)
end

local function plain_line(message, kind)
  if kind == "text" then return "text " .. cli.escape(message) end
  return "binary " .. hex(message, "")
end

--- How a message is printed: on a terminal for people, otherwise for programs.
function cli.format_message(message, kind, tty)
  return (tty and tty_line or plain_line)(message, kind)
end

-- ---------------------------------------------------------------------
-- duplex connect

--- The exit status for a connection that ended with close code `code`.
function cli.exit_for_close(code)
  if code == 1000 or code == 1001 or code == 1005 then return EXIT.ok end
  if code == 1006 then return EXIT.lost end
  return EXIT.closed
end

-- The Origin header has its own option in duplex.connect.
local function split_origin(headers)
  local rest, origin = {}, nil
  for _, h in ipairs(headers or {}) do
    if h[1]:lower() == "origin" then origin = h[2] else rest[#rest + 1] = h end
  end
  return rest, origin
end

local function connect_options(v)
  local headers, origin = split_origin(v.headers)
  local tls
  if v.ca or v.insecure then tls = { ca = v.ca, verify = not v.insecure } end
  return {
    headers = headers, origin = origin, protocols = v.protocols, deflate = v.deflate or nil,
    tls = tls, proxy = v.proxy, ping_interval = v.ping, timeout = v.timeout, max_message = v.max_message,
  }
end

-- What is wrong with the URL, the headers or the subprotocols, found before
-- any connection is made: the handshake builder checks them by building a
-- request (its messages name the culprit).
local function check_request(target, opts)
  local u, err = url.parse(target)
  if not u then return err end
  if u.scheme ~= "ws" and u.scheme ~= "wss" then return "not a WebSocket URL (ws:// or wss://): " .. target end
  local ok, berr = pcall(core.handshake_client, {
    host = u.host, port = u.port, target = u.target, headers = opts.headers,
    protocols = opts.protocols, origin = opts.origin,
  })
  if not ok then return tostring(berr) end
end

-- Lines of a reader, without their line endings ("\n" or "\r\n"); the last
-- line may lack one. Returns an iterator: line, or nil and why it ended
-- ("closed" at the end of input).
local function lines(reader)
  local parts, ready, next_ready = {}, {}, 1
  local function line_of(s) return (s:gsub("\r$", "")) end
  return function()
    while true do
      local line = ready[next_ready]
      if line then
        ready[next_ready], next_ready = nil, next_ready + 1
        return line
      end
      ready, next_ready = {}, 1
      local data, err = reader:read()
      if not data then
        if #parts > 0 then
          local last = table.concat(parts)
          parts = {}
          return line_of(last)
        end
        return nil, err
      end
      local start = 1
      for stop in data:gmatch("()\n") do
        parts[#parts + 1] = data:sub(start, stop - 1)
        ready[#ready + 1] = line_of(table.concat(parts))
        parts, start = {}, stop + 1
      end
      if start <= #data then parts[#parts + 1] = data:sub(start) end
    end
  end
end

-- The kind of message a line goes as.
local function kind_of(line, n, binary)
  if binary then return "binary" end
  if core.utf8_valid(line) then return "text" end
  say("line ", n, " is not UTF-8: sent as binary")
  return "binary"
end

-- Until `quiet` seconds have passed since the later of now and the last
-- message (heard.at, kept by the receiver), or the connection ends.
local function wait_quiet(ws, quiet, heard)
  local since = duplex.now()
  while ws.state == "open" do
    local left = math.max(since, heard.at or since) + quiet - duplex.now()
    if left <= 0 then return end
    duplex.sleep(left)
  end
end

-- Stdin to the server, a message a line; at the end, the closing handshake.
local function send_stdin(ws, binary, wait, heard)
  local reader, err = core.reader(0)
  if reader then
    local next_line, n = lines(reader), 0
    while true do
      local line, why = next_line()
      if not line then err = why break end
      n = n + 1
      if not ws:send(line, kind_of(line, n, binary)) then break end
    end
    reader:close()
  end
  if err and err ~= "closed" then say("stdin: ", tostring(err)) end
  if wait then wait_quiet(ws, wait, heard) end
  -- the receiving coroutine reads the answer (and gives up after close_timeout)
  ws:start_close(1000)
end

local function describe_open(ws, target)
  local parts = { "connected to " .. target }
  if ws.protocol then parts[#parts + 1] = "subprotocol " .. ws.protocol end
  if ws.extensions then parts[#parts + 1] = "extensions " .. ws.extensions end
  say(table.concat(parts, ", "))
end

local function describe_close(ws)
  local code, reason = ws.close_code, cli.escape(ws.close_reason or "")
  if code == 1006 then
    say("connection lost: ", reason)
  else
    say(ws.close_by_peer and "closed by the server: " or "closed: ", code, reason ~= "" and " " .. reason or "")
  end
end

-- SIGINT/SIGTERM: the closing handshake; a second one drops the connection.
local function on_signals(ws)
  local function interrupted()
    if ws.state == "open" then ws:start_close(1001, "interrupted") else ws:abort("interrupted") end
  end
  duplex.signal("INT", interrupted)
  duplex.signal("TERM", interrupted)
end

local function receive_all(ws, tty, heard)
  for message, kind in ws:messages() do
    heard.at = duplex.now()
    io.stdout:write(cli.format_message(message, kind, tty), "\n")
  end
  if not tty then
    local reason = cli.escape(ws.close_reason or "")
    io.stdout:write("close ", ws.close_code, reason ~= "" and " " .. reason or "", "\n")
  end
  io.stdout:flush()
  describe_close(ws)
end

local function connect_command(v)
  local opts = connect_options(v)
  local target = v[1]
  local bad = check_request(target, opts)
  if bad then return nil, bad end
  local ws, err, response = duplex.connect(target, opts)
  if not ws then
    say(err)
    return response and EXIT.rejected or EXIT.failed
  end
  describe_open(ws, target)
  local tty = core.isatty(1)
  io.stdout:setvbuf("line") -- a message reaches a pipe when it arrives
  on_signals(ws)
  local heard = {} -- when the last message came
  duplex.spawn(function()
    receive_all(ws, tty, heard)
    duplex.stop() -- stdin may still be waited for
  end)
  duplex.spawn(send_stdin, ws, v.binary, v.wait, heard)
  duplex.run()
  return cli.exit_for_close(ws.close_code)
end

-- ---------------------------------------------------------------------
-- duplex serve

local function echo(ws)
  for message, kind in ws:messages() do
    if not ws:send(message, kind) then break end
  end
end

local CONTENT_TYPES = {
  html = "text/html; charset=utf-8", htm = "text/html; charset=utf-8", txt = "text/plain; charset=utf-8",
  js = "text/javascript; charset=utf-8", css = "text/css; charset=utf-8", json = "application/json",
  svg = "image/svg+xml", png = "image/png", ico = "image/x-icon",
}

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local data, rerr = f:read("a")
  f:close()
  if not data then return nil, path .. ": " .. tostring(rerr) end
  return data
end

-- on_http for --page: GET / answers the file, read anew each time (edit
-- the page, reload the browser); anything else is the server's to refuse.
local function page_handler(path)
  local ext = path:match("%.(%w+)$")
  local headers = {
    ["Content-Type"] = CONTENT_TYPES[ext and ext:lower()] or "application/octet-stream",
    ["Cache-Control"] = "no-cache",
  }
  return function(req)
    if req.path ~= "/" or req.method ~= "GET" then return nil end
    local body, err = read_file(path)
    if not body then
      say("page: ", err)
      return 500, nil, "cannot read the page\n"
    end
    return 200, headers, body
  end
end

local function deflate_policy(v)
  if not (v.deflate or v.deflate_takeover or v.deflate_window) then return nil end
  if not (v.deflate_takeover or v.deflate_window) then return true end
  return {
    server_no_context_takeover = not v.deflate_takeover,
    server_max_window_bits = v.deflate_window,
    client_max_window_bits = v.deflate_window,
  }
end

local function listen_options(v)
  return {
    host = v.host or "127.0.0.1",
    port = v.port or 8080,
    reuseport = (v.workers or 1) > 1,
    path = v.path,
    tls = v.tls_cert and { cert = v.tls_cert, key = v.tls_key },
    protocols = v.protocols,
    max_message = v.max_message,
    max_connections = v.max_connections,
    ping_interval = v.ping,
    deflate = deflate_policy(v),
    on_http = v.page and page_handler(v.page),
    handler = echo,
  }
end

local function check_serve(v)
  if (v.tls_cert == nil) ~= (v.tls_key == nil) then return "--tls-cert and --tls-key go together" end
  if (v.workers or 1) > 1 and (v.port or 8080) == 0 then return "--workers needs a fixed --port" end
  if v.path and v.path:sub(1, 1) ~= "/" then return "--path must start with /" end
end

local function announce(server, v)
  print("listening on " .. server:url(v.path))
  if v.page then print("page at " .. server:url("/"):gsub("^ws", "http")) end
  io.stdout:flush()
end

local function stop_cleanly(server)
  server:shutdown(2)
  duplex.stop()
end

local function serve_command(v)
  local bad = check_serve(v)
  if bad then return nil, bad end
  if v.page then
    local _, err = read_file(v.page)
    if err then say(err) return EXIT.failed end
  end
  local opts = listen_options(v)
  -- Listen here first, workers or not: a taken port or a bad certificate
  -- is told once, with the status, rather than by every worker in turn.
  local server, err = duplex.listen(opts)
  if not server then
    say(err)
    return EXIT.failed
  end
  announce(server, v)
  if opts.reuseport then
    server:shutdown(0) -- the workers listen on their own
    duplex.run { workers = v.workers, setup = function() return assert(duplex.listen(opts)) end,
      on_stop = function(s) s:shutdown(2) end }
    return EXIT.ok
  end
  duplex.signal("INT", function() stop_cleanly(server) end)
  duplex.signal("TERM", function() stop_cleanly(server) end)
  duplex.run()
  return EXIT.ok
end

-- ---------------------------------------------------------------------

local RUN = { connect = connect_command, serve = serve_command }

local function usage_error(name, msg)
  io.stderr:write(string.format("duplex%s: %s\n", name and " " .. name or "", msg))
  io.stderr:write(string.format("try 'duplex %s--help'\n", name and name .. " " or ""))
  return EXIT.usage
end

--- Run the command line argv (as `arg`: argv[1] is the command); returns
--- the exit status.
---@param argv string[]
---@return integer
function cli.main(argv)
  local name = argv[1]
  if name == nil then
    io.stderr:write(top_help())
    return EXIT.usage
  elseif name == "--help" or name == "-h" or name == "help" then
    local c = COMMANDS[argv[2]]
    io.stdout:write(c and command_help(c) or top_help())
    return EXIT.ok
  elseif name == "--version" then
    print("duplex " .. core.version)
    return EXIT.ok
  end
  local c = COMMANDS[name]
  if not c then return usage_error(nil, "unknown command " .. name) end
  local values, err = parse(c, argv, 2)
  if not values then return usage_error(name, err) end
  if values.help then
    io.stdout:write(command_help(c))
    return EXIT.ok
  end
  local status, cerr = RUN[name](values)
  if not status then return usage_error(name, cerr) end
  return status
end

return cli
