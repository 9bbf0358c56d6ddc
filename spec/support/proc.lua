-- Background processes for specs, without leaks or hangs.
--
--   local proc = require "support.proc"
--   local h = proc.spawn({"node", "interop/ws_echo_server.js"}, {env = {LD_PRELOAD = false}})
--   local line = h:read_line(10)        -- next stdout line, or nil, "timeout"|"exited"
--   h:kill()                            -- SIGTERM to the child's process group
--   local code = h:wait(5)              -- exit status, or nil, "timeout"
--   teardown(proc.killall)
--
-- Each child leads its own session (setsid), so kill() reaches anything it
-- started too; it runs under `timeout`, so that even a crashed spec run cannot
-- leave it running for more than opts.limit seconds. Its stdout and stderr go to files
-- in a private temp directory, which read_line() follows; an exit-status file
-- written by the waiting shell makes wait() a simple poll.
local proc = {}

-- Hard cap on any child's life, in seconds (opts.limit overrides it).
proc.default_limit = 1200

local have_system, system = pcall(require, "system") -- lua-system, a busted dependency

local function now()
  if have_system then return system.monotime() end
  local f = assert(io.open("/proc/uptime"))
  local t = f:read("n")
  f:close()
  return t
end

local function sleep(seconds)
  if have_system then system.sleep(seconds) else os.execute("sleep " .. seconds) end
end

local function quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

local function make_temp_dir()
  local p = assert(io.popen("mktemp -d /tmp/duplex-proc.XXXXXX"))
  local dir = p:read("l")
  p:close()
  assert(dir and dir ~= "", "proc: mktemp -d failed")
  return dir
end

-- Polls pred() every 20 ms until it returns a true value or `timeout` seconds
-- have passed; returns that value, or nil.
local function poll(timeout, pred)
  local deadline = now() + timeout
  while true do
    local v = pred()
    if v then return v end
    if now() >= deadline then return nil end
    sleep(0.02)
  end
end

local live = {} -- every handle not yet cleaned up, for killall()

local Proc = {}
Proc.__index = Proc

local function env_prefix(env)
  local names = {}
  for k in pairs(env or {}) do
    assert(type(k) == "string" and k:match("^[%a_][%w_]*$"), "proc.spawn: bad environment name")
    names[#names + 1] = k
  end
  table.sort(names)
  -- env takes its -u options before any assignment.
  local unset, set = {}, {}
  for _, k in ipairs(names) do
    if env[k] == false then
      unset[#unset + 1] = "-u " .. k
    else
      set[#set + 1] = quote(k .. "=" .. tostring(env[k]))
    end
  end
  return table.concat({"env", table.concat(unset, " "), table.concat(set, " ")}, " ")
end

--- Starts argv (argv[1] is looked up in PATH) in the background.
-- opts.env: variables to set; a value of false unsets that variable.
-- opts.cwd: directory to run in. opts.stdin: file to read (default /dev/null).
-- opts.limit: seconds after which the child is killed whatever happens.
function proc.spawn(argv, opts)
  opts = opts or {}
  assert(type(argv) == "table" and #argv > 0, "proc.spawn: argv must be a non-empty list")
  local dir = make_temp_dir()
  local self = setmetatable({
    argv = argv,
    dir = dir,
    out_path = dir .. "/out",
    err_path = dir .. "/err",
    rc_path = dir .. "/rc",
    pid_path = dir .. "/pid",
    offset = 0,
    pending = "",
  }, Proc)
  local words = {}
  for i, a in ipairs(argv) do words[i] = quote(a) end
  local limit = math.tointeger(opts.limit or proc.default_limit)
  assert(limit and limit > 0, "proc.spawn: opts.limit must be a positive integer")
  -- setsid makes the program the leader of its own process group, so kill()
  -- reaches everything it starts and nothing else (timeout stays outside and
  -- does not forward a second copy of the signal). sh writes its own pid and
  -- then becomes the program. If the limit strikes, whatever the program
  -- left behind goes too.
  local pid_q = quote(self.pid_path)
  local script = string.format(
    "cd %s || exit 1; ( timeout -k 5 %d %s setsid -w sh -c 'echo $$ > \"$1\"; shift; exec \"$@\"' sh %s %s" ..
      " < %s > %s 2> %s; rc=$?;" ..
      " if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then kill -s KILL -- -$(cat %s) 2>/dev/null; fi;" ..
      " echo $rc > %s.tmp; mv %s.tmp %s ) > /dev/null 2>&1 &",
    quote(opts.cwd or "."), limit, env_prefix(opts.env), pid_q,
    table.concat(words, " "), quote(opts.stdin or "/dev/null"),
    quote(self.out_path), quote(self.err_path), pid_q,
    quote(self.rc_path), quote(self.rc_path), quote(self.rc_path))
  local ok = os.execute(script)
  if not ok then
    os.execute("rm -rf " .. quote(dir))
    error("proc.spawn: could not start " .. table.concat(argv, " "))
  end
  live[self] = true
  -- Stop early if the wrapper already ended: the program never started.
  local pid = poll(10, function()
    local s = read_file(self.pid_path)
    return (s and tonumber(s:match("^(%d+)\n"))) or (self:exit_code() and -1)
  end)
  if pid == -1 then pid = nil end
  if not pid then
    -- env could not run, or the machine is badly overloaded.
    local why = self:output()
    self:cleanup()
    error("proc.spawn: " .. table.concat(argv, " ") .. " did not start: " .. why)
  end
  self._pid = pid
  return self
end

function Proc:pid()
  return self._pid
end

--- The exit status once the child has exited, else nil.
function Proc:exit_code()
  if self.code == nil then
    local s = read_file(self.rc_path)
    self.code = s and tonumber(s:match("%d+"))
  end
  return self.code
end

function Proc:running()
  return self:exit_code() == nil
end

-- Appends what the child wrote since the last call to self.pending.
function Proc:_read_more()
  local f = io.open(self.out_path, "rb")
  if not f then return end
  f:seek("set", self.offset)
  local s = f:read("a")
  f:close()
  if s and #s > 0 then
    self.offset = self.offset + #s
    self.pending = self.pending .. s
  end
end

function Proc:_take_line(partial_ok)
  local line, rest = self.pending:match("^([^\n]*)\n(.*)$")
  if line then
    self.pending = rest
    return (line:gsub("\r$", ""))
  end
  if partial_ok and #self.pending > 0 then
    line, self.pending = self.pending, ""
    return line
  end
end

--- The child's next stdout line (without the newline). Returns nil, "timeout"
-- after timeout seconds (default 10), or nil, "exited" once the child has
-- exited and everything it printed has been read.
function Proc:read_line(timeout)
  local deadline = now() + (timeout or 10)
  while true do
    local exited = not self:running()
    self:_read_more()
    local line = self:_take_line(exited)
    if line then return line end
    if exited then return nil, "exited" end
    if now() >= deadline then return nil, "timeout" end
    sleep(0.02)
  end
end

function Proc:stdout()
  return read_file(self.out_path) or ""
end

function Proc:stderr()
  return read_file(self.err_path) or ""
end

--- Everything the child printed: stdout, then stderr.
function Proc:output()
  local out, err = self:stdout(), self:stderr()
  if out ~= "" and err ~= "" and not out:match("\n$") then out = out .. "\n" end
  return out .. err
end

--- Sends sig (default "TERM"; a name or number) to the child's process group.
function Proc:kill(sig)
  sig = tostring(sig or "TERM")
  assert(sig:match("^%w+$"), "proc: bad signal name")
  if not self:running() then return false end
  -- The program leads its own process group (see spawn).
  return os.execute("kill -s " .. sig .. " -- -" .. self._pid .. " 2>/dev/null") == true
end

--- Waits for the child to exit; returns its exit status (128+N when killed
-- by signal N), or nil, "timeout" after timeout seconds (default 30).
function Proc:wait(timeout)
  local code = poll(timeout or 30, function() return self:exit_code() end)
  if code then return code end
  return nil, "timeout"
end

--- Stops the child if it still runs (TERM, then KILL after grace seconds,
-- default 3) and removes its files. Returns the exit status.
function Proc:cleanup(grace)
  local code = self:exit_code()
  if code == nil and self._pid then
    self:kill("TERM")
    code = self:wait(grace or 3)
    if code == nil then
      self:kill("KILL")
      code = self:wait(5)
    end
  end
  os.execute("rm -rf " .. quote(self.dir))
  live[self] = nil
  return code
end

--- Runs argv to completion: returns exit status, stdout, stderr. A child that
-- outlives opts.timeout (default 60) seconds is killed, and the status is nil.
function proc.run(argv, opts)
  local h = proc.spawn(argv, opts)
  local code = h:wait((opts and opts.timeout) or 60)
  local out, err = h:stdout(), h:stderr()
  h:cleanup(1)
  return code, out, err
end

--- Stops and cleans up every child started and not yet cleaned up; meant for
-- `teardown(proc.killall)` (or after_each).
function proc.killall()
  local handles = {}
  for h in pairs(live) do handles[#handles + 1] = h end
  for _, h in ipairs(handles) do
    if h:running() then h:kill("TERM") end
  end
  for _, h in ipairs(handles) do h:cleanup() end
end

--- A private directory under /tmp, for a spec's files; proc.remove_dir(dir)
--- when done.
proc.temp_dir = make_temp_dir
proc.read_file = read_file   -- the file's bytes, or nil when it cannot be read
proc.write_file = write_file

function proc.remove_dir(dir)
  if dir then os.execute("rm -rf " .. quote(dir)) end
end

proc.sleep = sleep
proc.now = now
proc.quote = quote

return proc
