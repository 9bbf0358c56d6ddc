-- Reference WebSocket peers for interop specs: the node `ws` package and
-- Debian's python3-websockets (programs in interop/).
--
--   local peers = require "support.peers"
--   local srv = peers.node_echo_server{deflate = true}   -- srv.port, srv.url, srv.handle
--   local code, res = peers.py_client(srv.url, {deflate = true, count = 10, size = 1000})
--   assert.equal(0, code); assert.is_true(res.ok)
--   srv:stop()                                           -- exit status (0 = clean)
--   teardown(proc.killall)                               -- in case a test failed early
--
-- Options are tables: a key becomes --key-with-dashes, true adds a bare flag,
-- false/nil leave it out, anything else is passed as its value; the array
-- part is appended as raw arguments. See the programs' headers for the
-- options they take.
local proc = require "support.proc"
local json = require "dkjson" -- lua-dkjson, a busted dependency

local peers = {}

local function repo_root()
  local src = debug.getinfo(1, "S").source:match("^@(.*)$") or ""
  local dir = src:match("^(.*)/spec/support/[^/]+$") or (src:match("^spec/") and ".") or "."
  if dir:sub(1, 1) ~= "/" then
    local p = assert(io.popen("cd " .. proc.quote(dir) .. " && pwd"))
    dir = p:read("l")
    p:close()
  end
  return dir
end

peers.root = repo_root()
peers.interop = peers.root .. "/interop"
peers.node = "node"
-- Debian's interpreter: the one on PATH may be another (pyenv) without the
-- websockets package.
peers.python = "/usr/bin/python3"
peers.chromium = "/usr/bin/chromium"

-- The peers are not under test: keep the sanitizer runtime that
-- scripts/asan-env preloads out of them.
peers.env = {LD_PRELOAD = false}

local checked = {}

local function file_exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

local function need(kind)
  if checked[kind] then return end
  if kind == "node" then
    if not file_exists(peers.interop .. "/node_modules/ws/package.json") then
      error("interop/node_modules is missing (no ws package): run `scripts/deps check`, " ..
        "which runs `npm ci` in interop/", 3)
    end
  else
    local code, _, err = proc.run({peers.python, "-c", "import websockets"}, {env = peers.env, timeout = 30})
    if code ~= 0 then
      error(peers.python .. " cannot import websockets (" .. (err or "") .. "): " ..
        "run `scripts/deps check`, which installs python3-websockets", 3)
    end
  end
  checked[kind] = true
end

--- Turns an options table into command-line arguments (see the header).
function peers.args(opts)
  local out, keys = {}, {}
  for k in pairs(opts or {}) do
    if type(k) == "string" then keys[#keys + 1] = k end
  end
  table.sort(keys)
  for _, k in ipairs(keys) do
    local v, flag = opts[k], "--" .. k:gsub("_", "-")
    if v == true then
      out[#out + 1] = flag
    elseif v ~= false and v ~= nil then
      out[#out + 1] = flag
      out[#out + 1] = tostring(v)
    end
  end
  for _, v in ipairs(opts or {}) do out[#out + 1] = tostring(v) end
  return out
end

local function concat(a, b)
  local t = {}
  for _, v in ipairs(a) do t[#t + 1] = v end
  for _, v in ipairs(b) do t[#t + 1] = v end
  return t
end

local Server = {}
Server.__index = Server

--- Stops the server (SIGTERM); returns its exit status (0 when it shut down
-- cleanly).
function Server:stop()
  self.handle:kill("TERM")
  local code = self.handle:wait(10)
  self.final_output = self.handle:output()
  self.handle:cleanup()
  return code
end

--- What the server printed (so far, or until it was stopped): `LISTENING`,
-- then one stderr line per connection event (open/ping/close/error).
function Server:output()
  return self.final_output or self.handle:output()
end

local function start_server(kind, argv, opts)
  need(kind)
  local handle = proc.spawn(concat(argv, peers.args(opts)), {env = peers.env, cwd = peers.interop})
  local line, why = handle:read_line(20)
  local port = line and tonumber(line:match("^LISTENING (%d+)$"))
  if not port then
    local out = handle:output()
    handle:cleanup()
    error(string.format("%s did not start (%s): %s", table.concat(argv, " "), line or why, out), 3)
  end
  local host = (opts and opts.host) or "127.0.0.1"
  if host:find(":") then host = "[" .. host .. "]" end
  local scheme = (opts and opts.tls_cert) and "wss" or "ws"
  return setmetatable({
    port = port,
    handle = handle,
    url = string.format("%s://%s:%d%s", scheme, host, port, (opts and opts.path) or "/"),
  }, Server)
end

--- Starts interop/ws_echo_server.js; returns {port=, url=, handle=} with
-- :stop() and :output().
function peers.node_echo_server(opts)
  return start_server("node", {peers.node, "ws_echo_server.js"}, opts)
end

--- Starts interop/py_echo_server.py; same result as node_echo_server.
function peers.py_echo_server(opts)
  return start_server("python", {peers.python, "py_echo_server.py"}, opts)
end

local function run_client(kind, argv, url, opts)
  need(kind)
  local args = peers.args(opts)
  local timeout = tonumber(opts and opts.timeout) or 30
  local code, out, err = proc.run(concat(concat(argv, {url}), args),
    {env = peers.env, cwd = peers.interop, timeout = timeout + 15})
  local last = out:match("([^\n]*)\n?$")
  local result = last and json.decode(last)
  if type(result) ~= "table" then
    result = {ok = false, error = "no JSON summary from the client", stdout = out}
  end
  result.stderr = err
  return code, result
end

--- Runs interop/ws_client.js against url; returns exit status (nil if it had
-- to be killed) and the decoded JSON summary {ok=, received=, close_code=,
-- close_reason=, protocol=, extensions=, error=, stderr=}.
function peers.node_client(url, opts)
  return run_client("node", {peers.node, "ws_client.js"}, url, opts)
end

--- Runs interop/py_client.py against url; same results as node_client.
function peers.py_client(url, opts)
  return run_client("python", {peers.python, "py_client.py"}, url, opts)
end

--- Starts any node program from interop/ (e.g. a playwright script) in the
-- background, after checking that node_modules is installed.
function peers.spawn_node(script, args, opts)
  need("node")
  local o = {env = peers.env, cwd = peers.interop}
  for k, v in pairs(opts or {}) do o[k] = v end
  return proc.spawn(concat({peers.node, script}, args or {}), o)
end

peers.json_decode = json.decode

--- Fails with what to run when headless Chromium or playwright-core is missing.
function peers.need_browser()
  assert(file_exists(peers.chromium), "Chromium is not installed at " .. peers.chromium ..
    ": run `scripts/deps check` (as root it installs Debian's chromium package)")
  assert(file_exists(peers.interop .. "/node_modules/playwright-core/package.json"),
    "interop/node_modules has no playwright-core: run `scripts/deps check`, which runs `npm ci` in interop/")
end

--- Runs interop/browser_test.js (mode "chat" or "echo" against url, see its
--- header); returns its decoded JSON summary, failing unless it succeeded.
function peers.browser(mode, url, extra)
  local argv = {peers.node, "browser_test.js", mode, url, "--chromium", peers.chromium, "--timeout", "45"}
  for _, a in ipairs(extra or {}) do argv[#argv + 1] = a end
  local code, out, err = proc.run(argv, {env = peers.env, cwd = peers.interop, timeout = 60})
  local ok, res = pcall(json.decode, out:match("([^\n]*)\n?$") or "")
  if not ok or type(res) ~= "table" then res = {} end
  assert(code == 0 and res.ok, string.format("browser_test.js %s failed (exit %s): %s\nstdout: %s\nstderr: %s",
    mode, tostring(code), tostring(res.error), out, err))
  return res
end

return peers
