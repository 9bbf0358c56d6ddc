-- duplex.core for LuaJIT (`make luajit`: the sans-I/O part, for nginx with
-- lua-nginx-module). spec/luajit/core_test.lua runs as a child process:
-- by luajit against build/luajit, as it is and with the collector running
-- all the time; then by lua5.4 against the 5.4 build, which must pass the
-- same checks (under scripts/asan-env, the sanitized one).
local proc = require "support.proc"
local peers = require "support.peers"

local ROOT = peers.root
local SCRIPT = "spec/luajit/core_test.lua"
local LJ_CORE = ROOT .. "/build/luajit/duplex/core.so"

-- Every check the script makes, in its order: one that goes missing (the
-- script died, or a check was dropped) fails here.
local CHECKS = {
  "module loads",
  "now is a monotonic clock in seconds",
  "engine round-trips text and binary at every length encoding",
  "engine delivers frames fed byte by byte and several per read",
  "engine fragmented messages",
  "engine ping and auto-pong",
  "engine close handshake with code and reason",
  "engine protocol errors: 1002",
  "engine invalid UTF-8: 1007",
  "engine max_message and max_frame: 1009",
  "engine send errors and argument checks",
  "encode_frame and send_raw",
  "handshake_server parses a real upgrade request",
  "handshake_server refuses bad requests",
  "accept_key matches RFC 6455",
  "handshake_response and http_response",
  "handshake_client request and response",
  "permessage-deflate negotiation",
  "permessage-deflate compressed engine round trip",
  "utf8_valid",
  "mask",
  "random and base64",
  "integer options given as non-integers raise errors",
  "many engines and handshakes survive the collector",
}

local function file_exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

-- Runs the script once per mode and keeps what it printed.
local runs = {}
local function run(mode, argv, env)
  if not runs[mode] then
    local code, out, err = proc.run(argv, { cwd = ROOT, env = env, timeout = 180 })
    local lines = {}
    for line in out:gmatch("([^\n]*)\n") do lines[#lines + 1] = line end
    runs[mode] = { code = code, out = out, err = err, lines = lines }
  end
  return runs[mode]
end

-- The uninstrumented luajit gains nothing from the ASan runtime that
-- scripts/asan-env preloads.
local function luajit(stress)
  assert(file_exists(LJ_CORE), LJ_CORE .. " is missing: run `make luajit`")
  return run(stress and "luajit stress" or "luajit", { "luajit", SCRIPT, stress and "stress" or nil },
    { LD_PRELOAD = false, DUPLEX_CORE_CPATH = ROOT .. "/build/luajit/?.so" })
end

local function lua54()
  return run("lua5.4", { "lua5.4", SCRIPT },
    { DUPLEX_CORE_CPATH = os.getenv("DUPLEX_CPATH") or ROOT .. "/build/?.so" })
end

local function describe_run(r)
  return ("exit %s\n%s%s"):format(tostring(r.code), r.out, r.err)
end

-- Exactly the expected lines, all "ok", then "done N/N", and exit 0.
local function assert_all_passed(r)
  local failed = {}
  for _, line in ipairs(r.lines) do
    if line:match("^not ok ") then failed[#failed + 1] = line end
  end
  assert(#failed == 0, table.concat(failed, "\n") .. "\n" .. r.err)
  local want = {}
  for i, name in ipairs(CHECKS) do want[i] = "ok " .. name end
  want[#want + 1] = ("done %d/%d"):format(#CHECKS, #CHECKS)
  assert.same(want, r.lines, describe_run(r))
  assert.equal(0, r.code, describe_run(r))
end

describe("duplex.core under LuaJIT", function()
  teardown(proc.killall)

  it("is built from sources that avoid what l_compat.h cannot map", function()
    -- LuaJIT's lua_pushfstring knows no %I or %U and would misread the
    -- arguments after one.
    local p = assert(io.popen("make -s --no-print-directory -C " .. ROOT .. " lj-sources"))
    local files = {}
    for path in p:read("a"):gmatch("%S+") do files[#files + 1] = path end
    p:close()
    assert.is_true(#files >= 10, "LJ_SRC lists " .. #files .. " files")
    for _, path in ipairs(files) do
      local n = 0
      for line in io.lines(ROOT .. "/" .. path) do
        n = n + 1
        assert.is_nil(line:find('"[^"]*%%[IU][^"]*"'), ("%s:%d uses %%I or %%U: %s"):format(path, n, line))
        -- the loop and everything on it suspend coroutines inside C calls
        assert.is_nil(line:find('#include "dx_loop.h"', 1, true) or line:find('#include "l_socket.h"', 1, true),
          ("%s:%d: the LuaJIT build cannot have the loop (lua_yieldk)"):format(path, n))
      end
    end
  end)

  for _, name in ipairs(CHECKS) do
    it(name, function()
      local r = luajit(false)
      for _, line in ipairs(r.lines) do
        if line == "ok " .. name then return end
        local why = line:match("^not ok " .. name:gsub("%p", "%%%0") .. ": (.*)$")
        if why then error(why, 0) end
      end
      error("no result for this check:\n" .. describe_run(r), 0)
    end)
  end

  it("runs every check and exits 0", function()
    assert_all_passed(luajit(false))
  end)

  it("passes every check with the collector running all the time", function()
    assert_all_passed(luajit(true))
  end)

  it("behaves as the Lua 5.4 build does: the same checks pass there", function()
    assert_all_passed(lua54())
  end)
end)

-- spec/luajit/redis_test.lua: duplex.redis's client and duplex.resp on
-- LuaJIT with no loop of duplex's (a stand-in Redis, a toy host through
-- duplex.runtime.set_host); and on Lua 5.4, where that host replaces the loop.
describe("duplex.redis's client under LuaJIT, through the host seam", function()
  local REDIS_SCRIPT = "spec/luajit/redis_test.lua"
  local REDIS_CHECKS = {
    "the modules load",
    "resp encodes commands and parses replies however they are cut",
    "the client over a stream from one coroutine needs no host",
    "runtime.set_host checks the host and dispatches to it",
    "through the host: coroutines pipelining, pub/sub, timeouts, reconnecting",
  }

  local function assert_redis_run(argv, env)
    local code, out, err = proc.run(argv, { cwd = ROOT, env = env, timeout = 60 })
    local want = {}
    for i, name in ipairs(REDIS_CHECKS) do want[i] = "ok " .. name end
    want[#want + 1] = ("done %d/%d"):format(#REDIS_CHECKS, #REDIS_CHECKS)
    local got = {}
    for line in out:gmatch("([^\n]*)\n") do got[#got + 1] = line end
    assert.same(want, got, out .. err)
    assert.equal(0, code, out .. err)
  end

  it("passes every check under LuaJIT", function()
    assert(file_exists(LJ_CORE), LJ_CORE .. " is missing: run `make luajit`")
    assert_redis_run({ "luajit", REDIS_SCRIPT },
      { LD_PRELOAD = false, DUPLEX_CORE_CPATH = ROOT .. "/build/luajit/?.so" })
  end)

  it("passes the same checks under Lua 5.4", function()
    assert_redis_run({ "lua5.4", REDIS_SCRIPT },
      { DUPLEX_CORE_CPATH = os.getenv("DUPLEX_CPATH") or ROOT .. "/build/?.so" })
  end)
end)
