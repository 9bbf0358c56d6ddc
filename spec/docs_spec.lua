-- Every fenced code block in docs/*.md runs here: the guides show only code
-- that works against this checkout.
--
-- The convention. Right before each block (blank lines may come between)
-- an HTML comment, invisible when the Markdown is rendered, says how the
-- block is tested:
--
--   <!-- test: MODE [ARG] [, OPTION ...] -->
--
-- A block without one, in a language below that lacks the mode, or in
-- another language fails the spec; so does a marker followed by no block.
--
--   language        mode          what the spec does
--   lua, sh, js     run           runs it to completion (20 s, or timeout=N): it must exit 0
--   lua, sh         server        starts it in the background; it is up once every
--                                 placeholder port it names (below; 6379 aside) accepts
--                                 connections. It runs until a later server or proxy
--                                 needs one of its ports, or the guide ends; then it must
--                                 still be running, gets SIGTERM and, with exit=N, must
--                                 exit with N. Its stderr must show no duplex error
--                                 ("handler failed", "error in a coroutine") unless the
--                                 marker says logs.
--   any             file NAME     saved as NAME (a Lua file is compiled too); a later
--                                 runnable block of the guide must name it (NAME, or NAME
--                                 without ".lua", as in require "NAME")
--   sh              commands      not run: every command it names must exist (on PATH or
--                                 a shell builtin), and every relative path among its
--                                 arguments must exist in the checkout
--   nginx, haproxy  proxy         started for real on its listen/bind ports (haproxy -c
--                                 first), until a later block needs its ports or the guide ends
--   nginx, haproxy  check         nginx -t / haproxy -c only
--   ini             systemd NAME  saved as NAME; `systemd-analyze verify` must pass without
--                                 a warning (where it is missing: the required keys)
--
-- Options: timeout=N; exit=N; logs; cwd=checkout (run in the checkout, not
-- the guide's directory); luajit (a lua run block runs under LuaJIT too,
-- against build/luajit).
--
-- Claims. In a lua (`--> text`), sh (`# --> text`) or js (`// --> text`)
-- block that runs, the text after the arrow is a line the program prints:
-- its stdout must hold every claimed line in order (other lines may come
-- between). Runs of white space compare equal; "..." matches anything.
--
-- Substitutions, the same for every block of a guide, claims included:
--   * the port numbers 6379, 8000-8099 and 8443 are placeholders: each
--     becomes a free port, one per number per guide; a guide that names
--     6379 gets a redis-server on its port;
--   * /etc/ssl/duplex/ is a directory of test certificates: fullchain.pem
--     and privkey.pem (for localhost and 127.0.0.1), signed by ca.pem;
--   * /path/to/duplex is the checkout.
-- nginx runs with its pid, logs and temp files in a temp prefix, and as
-- `user root;` when the spec runs as root (so that its workers can read the
-- checkout); a configuration without an http block is a conf.d snippet and
-- is wrapped in `events {} http { ... }`.
--
-- The blocks of a guide run in order, in one temp directory (so files saved
-- by one are there for the next), with LUA_PATH and LUA_CPATH pointing at
-- the checkout (DUPLEX_CPATH wins, as in .busted: the ASan run uses it;
-- sh blocks, which run programs not under test, get the plain build). A
-- block that names a port or file of a block that failed fails at once,
-- naming that block.
--
-- A server and its client, as a guide writes them:
--
--   <!-- test: server, exit=0 -->       (the spec starts it on a free port)
--   ```lua
--   ... duplex.listen { port = 8080, ... } ... duplex.run()
--   ```
--   <!-- test: run -->                  (then runs this against it)
--   ```lua
--   local ws = assert(duplex.connect("ws://127.0.0.1:8080/"))
--   print(ws:receive())   --> hello	text
--   ```
--
-- Also checked: README.md links every guide, and the relative links (and
-- their #anchors) of README.md and the guides lead somewhere.
local proc = require "support.proc"
local peers = require "support.peers"
local services = require "support.services"
local certs = require "support.certs"

local root = peers.root
local quote = proc.quote

local read_file, write_file = proc.read_file, proc.write_file

local function shell_lines(cmd)
  local p = assert(io.popen(cmd))
  local out = {}
  for l in p:lines() do out[#out + 1] = l end
  p:close()
  return out
end

local temp_dir = proc.temp_dir

-- Which modes each language has.
local MODES = {
  lua = { run = true, server = true, file = true },
  sh = { run = true, server = true, file = true, commands = true },
  js = { run = true, file = true },
  nginx = { proxy = true, check = true, file = true },
  haproxy = { proxy = true, check = true, file = true },
  ini = { systemd = true, file = true },
}

local OPTIONS = { timeout = true, exit = true, logs = true, cwd = true, luajit = true }

---------------------------------------------------------------------------
-- Reading the guides

-- "run, timeout=30, logs" -> { mode = "run", timeout = "30", logs = true }
local function parse_marker(s)
  local parts = {}
  for part in (s .. ","):gmatch("%s*(.-)%s*,") do parts[#parts + 1] = part end
  local mode, arg = (parts[1] or ""):match("^(%S+)%s*(.-)$")
  if not mode then return nil, "empty test marker" end
  local m = { mode = mode, arg = arg ~= "" and arg or nil }
  for i = 2, #parts do
    local k, v = parts[i]:match("^([%w_]+)=(.*)$")
    k = k or parts[i]
    if not OPTIONS[k] then return nil, "unknown option '" .. parts[i] .. "'" end
    m[k] = v or true
  end
  return m
end

--- The blocks of a guide, in order, and what is wrong with its markup.
local function parse_guide(path)
  local lines = {}
  for l in (assert(read_file(path)) .. "\n"):gmatch("(.-)\r?\n") do lines[#lines + 1] = l end
  local blocks, problems = {}, {}
  local marker, marker_line
  local i = 1
  while i <= #lines do
    local l = lines[i]
    local m = l:match("^%s*<!%-%-%s*test:%s*(.-)%s*%-%->%s*$")
    local indent, fence, lang = l:match("^(%s*)(```+)%s*(%S*)%s*$")
    if not fence then indent, fence, lang = l:match("^(%s*)(~~~+)%s*(%S*)%s*$") end
    if m then
      if marker then
        problems[#problems + 1] = ("line %d: test marker followed by no code block"):format(marker_line)
      end
      marker, marker_line = m, i
    elseif fence then
      local start, body = i, {}
      i = i + 1
      while i <= #lines and not (lines[i]:match("^%s*" .. fence:sub(1, 1):rep(#fence) .. "+%s*$")) do
        body[#body + 1] = lines[i]:sub(1, #indent) == indent and lines[i]:sub(#indent + 1) or lines[i]
        i = i + 1
      end
      local b = { line = start, lang = lang, text = table.concat(body, "\n") .. "\n" }
      if lang == "" then
        b.problem = "a code block without a language"
      elseif not MODES[lang] then
        b.problem = "language '" .. lang .. "' has no test runner here"
      elseif not marker then
        b.problem = "no test marker (<!-- test: MODE -->) before this " .. lang .. " block"
      else
        local mk, err = parse_marker(marker)
        if not mk then
          b.problem = "marker at line " .. marker_line .. ": " .. err
        elseif not MODES[lang][mk.mode] then
          b.problem = "a " .. lang .. " block has no mode '" .. mk.mode .. "'"
        elseif (mk.mode == "file" or mk.mode == "systemd") and not mk.arg then
          b.problem = mk.mode .. " needs a file name"
        else
          b.marker = mk
        end
      end
      blocks[#blocks + 1] = b
      marker = nil
    elseif l:match("%S") and marker then
      problems[#problems + 1] = ("line %d: test marker followed by text, not a code block"):format(marker_line)
      marker = nil
    end
    i = i + 1
  end
  if marker then problems[#problems + 1] = ("line %d: test marker at the end of the file"):format(marker_line) end
  return blocks, problems
end

---------------------------------------------------------------------------
-- Placeholders

local function is_placeholder(n)
  n = tonumber(n)
  return n == 6379 or n == 8443 or (n >= 8000 and n <= 8099)
end

--- The placeholder port numbers a text names (as strings), each once.
local function placeholders(text)
  local seen, list = {}, {}
  for n in text:gmatch("%f[%w](%d%d%d%d)%f[%W]") do
    if is_placeholder(n) and not seen[n] then
      seen[n] = true
      list[#list + 1] = n
    end
  end
  return list
end

local function substitute(ctx, text)
  text = text:gsub("%f[%w](%d%d%d%d)%f[%W]", function(n)
    if is_placeholder(n) then return tostring(ctx:port(n)) end
  end)
  text = text:gsub("/etc/ssl/duplex/", function() return ctx:tls_dir() .. "/" end)
  text = text:gsub("/path/to/duplex", function() return root end)
  return text
end

---------------------------------------------------------------------------
-- Claims: `--> line` comments

local CLAIM = {
  lua = "^(.-)%-%->%s(.*)$",
  sh = "^(.-)#%s*%-%->%s(.*)$",
  js = "^(.-)//%s*%-%->%s(.*)$",
}

local function claims(lang, text)
  local list = {}
  local pattern = CLAIM[lang]
  if not pattern then return list end
  for line in text:gmatch("[^\n]+") do
    local before, claim = line:match(pattern)
    if claim and (before == "" or before:match("%s$")) then list[#list + 1] = claim end
  end
  return list
end

local function normalize(s)
  return (s:gsub("\r", ""):gsub("%s+", " "):gsub("^ ", ""):gsub(" $", ""))
end

local function claim_pattern(claim)
  local p = normalize(claim):gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"):gsub("%%%.%%%.%%%.", ".-")
  return "^" .. p .. "$"
end

--- nil when stdout holds the claims in order; else what is missing.
local function check_claims(list, stdout)
  local lines = {}
  for l in stdout:gmatch("[^\n]*") do lines[#lines + 1] = normalize(l) end
  local at = 1
  for _, claim in ipairs(list) do
    local p = claim_pattern(claim)
    local found
    for j = at, #lines do
      if lines[j]:match(p) then found = j; break end
    end
    if not found then return "no line like " .. string.format("%q", claim) .. " (in order) in its output" end
    at = found + 1
  end
end

---------------------------------------------------------------------------
-- Running things

local function lua_env()
  return {
    LUA_PATH = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;;",
    LUA_CPATH = (os.getenv("DUPLEX_CPATH") or root .. "/build/?.so") .. ";;",
  }
end

-- Shell blocks run other people's programs (curl, make): the sanitizer
-- runtime that scripts/asan-env preloads stays out of them (curl hangs
-- under it), and so the Lua they start uses the plain build.
local function shell_env()
  local e = lua_env()
  e.LUA_CPATH = root .. "/build/?.so;;"
  e.LD_PRELOAD = false
  return e
end

local function luajit_env()
  local e = lua_env()
  e.LUA_CPATH = root .. "/build/luajit/?.so;;"
  e.LD_PRELOAD = false -- LuaJIT loads the plain build, not the sanitized one
  return e
end

local node_flags
local function node_argv(file)
  if not node_flags then
    -- Node 20 has the browser's WebSocket behind a flag; 22 has it built in.
    local _, out = proc.run({ "node", "-e", "process.stdout.write(typeof WebSocket)" }, { env = peers.env })
    node_flags = out == "function" and {} or { "--experimental-websocket" }
  end
  local argv = { "node", "--no-warnings" }
  for _, f in ipairs(node_flags) do argv[#argv + 1] = f end
  argv[#argv + 1] = file
  return argv
end

local SUFFIX = { lua = ".lua", sh = ".sh", js = ".js" }

-- The command that runs a saved block.
local function command(lang, file, jit)
  if lang == "lua" then return { jit and "luajit" or "lua5.4", file }, jit and luajit_env() or lua_env() end
  if lang == "sh" then return { "sh", "-e", file }, shell_env() end
  if lang == "js" then return node_argv(file), peers.env end
end

local function tail(s, n)
  n = n or 3000
  if #s <= n then return s end
  return "..." .. s:sub(-n)
end

local BAD_LOG = { "handler failed", "error in a coroutine", "duplex error" }

---------------------------------------------------------------------------
-- One guide: its context (directory, ports, services) and its tests

local Ctx = {}
Ctx.__index = Ctx

local function new_ctx(name)
  return setmetatable({
    name = name, dir = temp_dir(), ports = {}, services = {}, broken = {}, stop_problems = {},
    files = {},
  }, Ctx)
end

function Ctx:port(n)
  local p = self.ports[n]
  if not p then
    p = services.free_port()
    self.ports[n] = p
  end
  return p
end

function Ctx:tls_dir()
  if not self.certs then
    self.certs = certs.generate()
    local dir = self.dir .. "/tls"
    os.execute("mkdir -p " .. quote(dir))
    local files = { ["fullchain.pem"] = self.certs.cert, ["privkey.pem"] = self.certs.key, ["ca.pem"] = self.certs.ca }
    for name, from in pairs(files) do
      write_file(dir .. "/" .. name, assert(read_file(from)))
    end
    self.tls_path = dir
  end
  return self.tls_path
end

-- The block that failed and that this text depends on, if any.
function Ctx:dependency_failed(text)
  for _, n in ipairs(placeholders(text)) do
    if self.broken["port " .. n] then return self.broken["port " .. n] end
  end
  for name, line in pairs(self.broken) do
    local file = name:match("^file (.*)$")
    if file then
      local module = file:gsub("%.lua$", "")
      if text:find(file, 1, true) or text:find("%f[%w_]" .. module:gsub("%p", "%%%0") .. "%f[^%w_]") then
        return line
      end
    end
  end
end

function Ctx:mark_broken(block, ports, file)
  local why = "the block at line " .. block.line
  for _, n in ipairs(ports or {}) do
    if n ~= "6379" then self.broken["port " .. n] = why end -- Redis is the spec's own
  end
  if file then self.broken["file " .. file] = why end
end

-- Stop a service: it must still be running, and stop as its marker says.
function Ctx:stop(svc)
  local problems = {}
  if svc.h then
    local h = svc.h
    if not h:running() then
      problems[#problems + 1] = ("exited early with status %s:\n%s"):format(tostring(h:exit_code()), tail(h:output()))
    else
      h:kill("TERM")
      local code = h:wait(10)
      if not code then
        problems[#problems + 1] = "did not stop within 10 s of SIGTERM"
      elseif svc.exit and code ~= svc.exit then
        problems[#problems + 1] = ("exited with %d after SIGTERM, not %d:\n%s"):format(code, svc.exit, tail(h:output()))
      end
    end
    if not svc.logs then
      local err = h:stderr()
      for _, bad in ipairs(BAD_LOG) do
        if err:find(bad, 1, true) then
          problems[#problems + 1] = "logged an error:\n" .. tail(err)
          break
        end
      end
    end
    h:cleanup(1)
  elseif svc.service then
    svc.service:cleanup()
  end
  for i, s in ipairs(self.services) do
    if s == svc then table.remove(self.services, i); break end
  end
  if #problems > 0 then
    self.stop_problems[#self.stop_problems + 1] =
      ("%s (line %d): %s"):format(svc.what, svc.line, table.concat(problems, "\n"))
  end
end

-- Stop the services that hold any of these ports.
function Ctx:free_ports(ports)
  local want = {}
  for _, p in ipairs(ports) do want[p] = true end
  for i = #self.services, 1, -1 do
    local svc = self.services[i]
    for _, p in ipairs(svc.ports) do
      if want[p] then self:stop(svc); break end
    end
  end
end

-- The state of the services still running, for a failure message.
function Ctx:service_logs()
  local out = {}
  for _, svc in ipairs(self.services) do
    local log = svc.h and svc.h:output() or (svc.service and svc.service:log()) or ""
    if log ~= "" then out[#out + 1] = ("--- %s (line %d):\n%s"):format(svc.what, svc.line, tail(log, 1500)) end
  end
  return table.concat(out, "\n")
end

function Ctx:wait_ports(what, ports, alive)
  local deadline = proc.now() + 10
  for _, n in ipairs(ports) do
    local port = self:port(n)
    while not services.accepts(port) do
      if alive and not alive() then error(what .. " exited before port " .. n .. " accepted connections", 0) end
      if proc.now() > deadline then error(what .. ": port " .. n .. " never accepted connections", 0) end
      proc.sleep(0.02)
    end
  end
end

function Ctx:cleanup()
  for i = #self.services, 1, -1 do self:stop(self.services[i]) end
  if self.redis then self.redis:cleanup() end
  if self.certs then self.certs.cleanup() end
  os.execute("rm -rf " .. quote(self.dir))
end

---------------------------------------------------------------------------
-- The modes

local runners = {}

local function save(ctx, block, text, name)
  name = name or ("block-" .. block.line .. (SUFFIX[block.lang] or ".txt"))
  local path = ctx.dir .. "/" .. name
  write_file(path, text)
  return path, name
end

local function run_to_end(ctx, block, text, jit)
  local m = block.marker
  local path = save(ctx, block, text)
  local argv, env = command(block.lang, path, jit)
  local timeout = tonumber(m.timeout) or 20
  local code, out, err = proc.run(argv, {
    cwd = m.cwd == "checkout" and root or ctx.dir, env = env, timeout = timeout, limit = timeout + 10,
  })
  local who = jit and "under LuaJIT, " or ""
  if code == nil then
    error(who .. "did not finish within " .. timeout .. " s:\n" .. tail(out .. err) .. "\n" .. ctx:service_logs(), 0)
  end
  if code ~= 0 then error(("%sexited with %d:\n%s\n%s"):format(who, code, tail(out .. err), ctx:service_logs()), 0) end
  local bad = check_claims(claims(block.lang, text), out)
  if bad then error(who .. bad .. ":\n" .. tail(out) .. "\n" .. tail(err, 1000), 0) end
end

function runners.run(ctx, block, text)
  run_to_end(ctx, block, text)
  if block.marker.luajit then
    assert(read_file(root .. "/build/luajit/duplex/core.so"), "no LuaJIT build of duplex.core: run `make luajit`")
    run_to_end(ctx, block, text, true)
  end
end

function runners.server(ctx, block, text)
  local m = block.marker
  local ports = {}
  for _, n in ipairs(placeholders(block.text)) do
    if n ~= "6379" then ports[#ports + 1] = n end
  end
  assert(#ports > 0, "a server block must name the port it listens on (8000-8099 or 8443)")
  ctx:free_ports(ports)
  local path = save(ctx, block, text)
  local argv, env = command(block.lang, path)
  local h = proc.spawn(argv, { cwd = m.cwd == "checkout" and root or ctx.dir, env = env, limit = 300 })
  block.owned = ports
  local svc = { h = h, ports = ports, line = block.line, what = block.lang .. " server",
    exit = tonumber(m.exit), logs = m.logs }
  ctx.services[#ctx.services + 1] = svc
  local ok, err = pcall(ctx.wait_ports, ctx, svc.what, ports, function() return h:running() end)
  if not ok then
    local out, reported = h:output(), #ctx.stop_problems
    ctx:stop(svc)
    for i = #ctx.stop_problems, reported + 1, -1 do ctx.stop_problems[i] = nil end -- reported here instead
    error(err .. ":\n" .. tail(out), 0)
  end
end

function runners.file(ctx, block, text)
  local name = block.marker.arg
  assert(name:match("^[%w_.-]+$"), "file names are plain names in the guide's directory")
  save(ctx, block, text, name)
  if block.lang == "lua" then assert(load(text, "=" .. name)) end
  ctx.files[#ctx.files + 1] = { name = name, line = block.line }
end

-- Shell commands that are not programs on PATH.
local BUILTIN = {}
for w in ("cd export set unset echo printf test [ true false read wait kill exec eval source . trap " ..
  "shift exit return ulimit umask alias if then else elif fi for while until do done case esac"):gmatch("%S+") do
  BUILTIN[w] = true
end
local PREFIX = { sudo = true, env = true, exec = true, time = true, nice = true, nohup = true }

-- Words of a shell line (quotes respected, not expanded), its comment dropped.
local function shell_words(line)
  local words, word, q = {}, nil, nil
  local i = 1
  while i <= #line do
    local c = line:sub(i, i)
    if q then
      if c == q then q = nil else word = word .. c end
    elseif c == "'" or c == '"' then
      q = c
      word = word or ""
    elseif c == "#" and not word then
      break
    elseif c:match("%s") then
      if word then words[#words + 1] = word; word = nil end
    elseif c == ";" or c == "|" or c == "&" then
      if word then words[#words + 1] = word; word = nil end
      if words[#words] ~= ";" then words[#words + 1] = ";" end
    else
      word = (word or "") .. c
    end
    i = i + 1
  end
  if word then words[#words + 1] = word end
  return words
end

function runners.commands(_, _, text)
  local script = text:gsub("\\\n", " ")
  local problems, seen = {}, {}
  for line in script:gmatch("[^\n]+") do
    local first = true
    for _, w in ipairs(shell_words(line)) do
      if w == ";" then
        first = true
      elseif first then
        if not (w:match("^[%a_][%w_]*=") or PREFIX[w]) then
          first = false
          if not BUILTIN[w] and not seen[w] then
            seen[w] = true
            local code = proc.run({ "sh", "-c", 'command -v "$1" >/dev/null', "sh", w }, { env = peers.env })
            if code ~= 0 then problems[#problems + 1] = "no command '" .. w .. "'" end
          end
        end
      elseif w:match("^[%w_.][%w_.%-]*/[%w_./%-]*$") and not w:find("://", 1, true) then
        if not read_file(root .. "/" .. w) and not os.rename(root .. "/" .. w, root .. "/" .. w) then
          problems[#problems + 1] = "no file " .. w .. " in the checkout"
        end
      end
    end
  end
  assert(#problems == 0, table.concat(problems, "; "))
end

local function listen_ports(lang, text)
  local ports = {}
  local directive = lang == "nginx" and "listen" or "bind"
  for line in text:gmatch("[^\n]+") do
    local spec = line:match("^%s*" .. directive .. "%s+([^%s;]+)")
    local port = spec and spec:match("(%d+)$")
    if port then ports[#ports + 1] = port end
  end
  return ports
end

-- The placeholder numbers behind substituted listen ports.
local function placeholder_of(ctx, port)
  for n, p in pairs(ctx.ports) do
    if tostring(p) == port then return n end
  end
end

local function nginx_conf(text)
  if not text:find("%f[%w]http%s*{") then
    text = "events {}\nhttp {\n" .. text .. "}\n"
  end
  local _, uid = proc.run({ "id", "-u" })
  if uid:match("^0%s") and not text:find("%f[%w]user%s") then text = "user root;\n" .. text end
  return "# from the guides (spec/docs_spec.lua)\n" .. text
end

local function nginx_check(_, text)
  local dir, argv = services.nginx_prefix(text)
  argv[#argv + 1], argv[#argv + 2], argv[#argv + 3] = "-t", "-g", "pid " .. dir .. "/nginx.pid;"
  local code, out, err = proc.run(argv, { env = services.env })
  os.execute("rm -rf " .. quote(dir))
  assert(code == 0, "nginx -t failed:\n" .. out .. err)
end

local function haproxy_check(ctx, block, text)
  local path = save(ctx, block, text, "block-" .. block.line .. ".cfg")
  local code, out, err = proc.run({ "haproxy", "-c", "-f", path }, { env = services.env })
  assert(code == 0, "haproxy -c failed:\n" .. out .. err)
  local warning = (out .. err):match("%[WARNING%][^\n]*")
  assert(not warning, "haproxy -c warns: " .. tostring(warning))
end

function runners.check(ctx, block, text)
  if block.lang == "nginx" then nginx_check(ctx, nginx_conf(text)) else haproxy_check(ctx, block, text) end
end

function runners.proxy(ctx, block, text)
  local ports = listen_ports(block.lang, text)
  assert(#ports > 0, "a proxy block must listen somewhere (a placeholder port)")
  local names = {}
  for i, p in ipairs(ports) do
    names[i] = placeholder_of(ctx, p) or error("listen port " .. p .. " is not a placeholder (8000-8099, 8443)")
  end
  ctx:free_ports(names)
  block.owned = names
  local svc = { ports = names, line = block.line, what = block.lang }
  if block.lang == "nginx" then
    local conf = nginx_conf(text)
    nginx_check(ctx, conf)
    svc.service = services.nginx(conf, tonumber(ports[1]))
  else
    haproxy_check(ctx, block, text)
    svc.service = services.haproxy(text, tonumber(ports[1]))
  end
  ctx.services[#ctx.services + 1] = svc
  ctx:wait_ports(block.lang, names)
end

local REQUIRED_UNIT_KEYS = { "%[Unit%]", "%[Service%]", "\nExecStart=/", "%[Install%]", "\nWantedBy=" }

function runners.systemd(ctx, block, text)
  local path = save(ctx, block, text, block.marker.arg)
  local have = proc.run({ "sh", "-c", "command -v systemd-analyze >/dev/null" }) == 0
  if have then
    local code, out, err = proc.run({ "systemd-analyze", "verify", path }, { env = services.env })
    assert(code == 0, "systemd-analyze verify failed:\n" .. out .. err)
    assert(not (out .. err):match("%S"), "systemd-analyze verify warns:\n" .. out .. err)
  else
    for _, k in ipairs(REQUIRED_UNIT_KEYS) do
      assert(("\n" .. text):find(k), "the unit has no " .. k:gsub("%%", ""))
    end
  end
end

---------------------------------------------------------------------------
-- Links between the guides, the README and the rest of the checkout

local function slug(heading)
  return (heading:lower():gsub("[^%w%s_-]", ""):gsub("%s", "-"))
end

local function anchors(path)
  local set = {}
  local text = read_file(path) or ""
  local in_code = false
  for line in text:gmatch("[^\n]*") do
    if line:match("^%s*```") then in_code = not in_code end
    local h = not in_code and line:match("^#+%s+(.-)%s*$")
    if h then set[slug(h:gsub("`", ""))] = true end
  end
  return set
end

--- Broken relative links of a Markdown file (targets and #anchors).
local function broken_links(path)
  local dir = path:match("^(.*)/[^/]*$") or "."
  local text = read_file(path) or ""
  text = text:gsub("\n```.-\n```", "") -- links inside code blocks are code
  local bad = {}
  for target in text:gmatch("%]%(([^)%s]+)%)") do
    if not target:match("^%a[%w+.-]*:") then -- not http:, mailto: ...
      local file, anchor = target:match("^([^#]*)#?(.*)$")
      local full = file == "" and path or (dir .. "/" .. file)
      local f = io.open(full, "rb")
      if not f then
        bad[#bad + 1] = target .. " (no such file)"
      else
        f:close()
        if anchor ~= "" and full:match("%.md$") and not anchors(full)[anchor] then
          bad[#bad + 1] = target .. " (no such heading)"
        end
      end
    end
  end
  return bad
end

---------------------------------------------------------------------------

local guides = shell_lines("cd " .. quote(root) .. " && ls docs/*.md 2>/dev/null")

describe("the guides in docs/", function()
  it("exist, are linked from README.md, and their links lead somewhere", function()
    assert.is_true(#guides > 0, "no docs/*.md")
    local readme = assert(read_file(root .. "/README.md"))
    for _, g in ipairs(guides) do
      assert.truthy(readme:find("(" .. g .. ")", 1, true), "README.md does not link " .. g)
    end
    local bad = {}
    for _, path in ipairs { "README.md", table.unpack(guides) } do
      for _, b in ipairs(broken_links(root .. "/" .. path)) do bad[#bad + 1] = path .. ": " .. b end
    end
    assert.same({}, bad)
  end)
end)

for _, guide in ipairs(guides) do
  describe(guide, function()
    local blocks, problems = parse_guide(root .. "/" .. guide)
    local ctx

    setup(function()
      ctx = new_ctx(guide)
      for _, b in ipairs(blocks) do
        if not b.problem and b.text:find("%f[%d]6379%f[%D]") then
          ctx.redis = services.redis(ctx:port("6379"))
          break
        end
      end
    end)
    teardown(function()
      if ctx then ctx:cleanup() end
      proc.killall()
    end)

    it("has a test marker before every block and no stray marker", function()
      local all = {}
      for _, p in ipairs(problems) do all[#all + 1] = p end
      for _, b in ipairs(blocks) do
        if b.problem then all[#all + 1] = ("line %d: %s"):format(b.line, b.problem) end
      end
      assert.same({}, all)
    end)

    for _, block in ipairs(blocks) do
      local m = block.marker
      local title = ("line %d: %s %s%s"):format(block.line, block.lang, m and m.mode or "?",
        m and m.arg and (" " .. m.arg) or "")
      it(title, function()
        assert(m, block.problem)
        local dep = ctx:dependency_failed(block.text)
        if dep then error("depends on " .. dep .. ", which failed", 0) end
        local text = substitute(ctx, block.text)
        local ok, err = pcall(runners[m.mode], ctx, block, text)
        if not ok then
          ctx:mark_broken(block, block.owned, m.mode == "file" and m.arg or nil)
          error(err, 0)
        end
      end)
    end

    it("uses every file it saves, and its servers ran until the end and stopped cleanly", function()
      local unused = {}
      for _, f in ipairs(ctx.files) do
        local module = f.name:gsub("%.lua$", "")
        local used = false
        for _, b in ipairs(blocks) do
          if b.line > f.line and b.marker and b.marker.mode ~= "file" and b.marker.mode ~= "commands" and
            (b.text:find(f.name, 1, true) or b.text:find("%f[%w_]" .. module:gsub("%p", "%%%0") .. "%f[^%w_]")) then
            used = true
          end
        end
        if not used then unused[#unused + 1] = ("%s (line %d) is used by no later block"):format(f.name, f.line) end
      end
      for i = #ctx.services, 1, -1 do ctx:stop(ctx.services[i]) end
      for _, p in ipairs(ctx.stop_problems) do unused[#unused + 1] = p end
      assert.same({}, unused)
    end)
  end)
end
