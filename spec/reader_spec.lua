-- core.reader(fd): any readable fd (stdin as a pipe, a file, /dev/null, a
-- terminal) on the event loop, without blocking it and without touching the
-- fd's flags; core.isatty(fd).
local core = require "duplex.core"
local proc = require "support.proc"
local peers = require "support.peers"

local run = require("support.loop").run

-- A connected pair of loop sockets: a socket's fd is a pollable fd that
-- the test controls from the other end.
local function socket_pair()
  local l = assert(core.listen{host = "127.0.0.1", port = 0})
  local _, port = l:address()
  local server
  core.spawn(function() server = assert(l:accept()) end)
  local client = assert(core.connect{host = "127.0.0.1", port = port, timeout = 5})
  while not server do core.sleep(0.01) end
  l:close()
  return client, server
end

-- A child Lua that reads its stdin with core.reader until the end, while a
-- timer ticks, then prints what it read, how it ended, whether the timer
-- ran meanwhile and stdin's file status flags before and after.
local CHILD = [[
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = (os.getenv("DUPLEX_CPATH") or "build/?.so") .. ";" .. package.cpath
local core = require "duplex.core"
local function flags()
  local f = assert(io.open("/proc/self/fdinfo/0"))
  local s = f:read("a")
  f:close()
  return s:match("flags:%s*(%d+)")
end
local before = flags()
core.spawn(function()
  local r = assert(core.reader(0))
  local ticks, parts = 0, {}
  local t = core.timer(0.05, function() ticks = ticks + 1 end, 0.05)
  while true do
    local d, err = r:read(nil, 10)
    if not d then
      io.write(table.concat(parts, "|"), "\nend=", err, " ticks=", ticks, " flags=", before, "->", flags(), "\n")
      break
    end
    parts[#parts + 1] = d
  end
  t:cancel()
  r:close()
end)
core.run()
]]

local function run_child(argv, opts)
  opts = opts or {}
  local code, out, err = proc.run(argv, {cwd = peers.root, stdin = opts.stdin, timeout = 20})
  assert.equal(0, code, out .. err)
  local data, ending, ticks, before, after = out:match("^(.-)\nend=(%S+) ticks=(%d+) flags=(%d+)%->(%d+)\n$")
  assert(data, "unexpected output: " .. out .. err)
  assert.equal(before, after, "stdin's flags changed")
  return data, ending, tonumber(ticks)
end

describe("core.reader", function()
  local dir
  setup(function() dir = proc.temp_dir() end)
  teardown(function()
    proc.killall()
    proc.remove_dir(dir)
  end)

  it("reads what arrives, times out meanwhile, and says closed at the end", function()
    run(function()
      local c, s = socket_pair()
      local r = assert(core.reader(c:fd()))
      assert.matches("^duplex.reader %(fd %d+%)", tostring(r))
      assert.same({nil, "timeout"}, {r:read(nil, 0.05)})
      s:write("hello")
      assert(s:flush(5))
      assert.equal("hello", r:read(nil, 5))
      s:write("abcdef")
      assert(s:flush(5))
      core.sleep(0.05)
      assert.equal("abc", r:read(3, 5))
      assert.equal("def", r:read(nil, 5))
      s:close()
      assert.same({nil, "closed"}, {r:read(nil, 5)})
      r:close()
      c:close()
    end)
  end)

  it("reads a duplicate: closing the reader leaves the fd open", function()
    run(function()
      local c, s = socket_pair()
      local r = assert(core.reader(c:fd()))
      r:close()
      assert.same({nil, "closed"}, {r:read(nil, 1)})
      assert.matches("%(closed%)", tostring(r))
      s:write("still there")
      assert(s:flush(5))
      assert.equal("still there", c:read(nil, 5))
      c:close()
      s:close()
    end)
  end)

  it("wakes a coroutine waiting in read when the reader is closed", function()
    run(function()
      local c, s = socket_pair()
      local r = assert(core.reader(c:fd()))
      local got
      core.spawn(function() got = {r:read(nil, 5)} end)
      core.sleep(0.05)
      r:close()
      core.sleep(0.01)
      assert.same({nil, "closed"}, got)
      c:close()
      s:close()
    end)
  end)

  it("fails on a descriptor that is not open, and raises on a negative one", function()
    run(function()
      local r, err = core.reader(987654)
      assert.is_nil(r)
      assert.matches("[Bb]ad file descriptor", err)
      assert.has_error(function() core.reader(-1) end)
    end)
  end)

  it("reads a regular file on stdin (epoll cannot watch one) to its end", function()
    local path = dir .. "/input.txt"
    local f = assert(io.open(path, "wb"))
    f:write("one\ntwo\n")
    f:close()
    local data, ending = run_child({"lua5.4", "-e", CHILD}, {stdin = path})
    assert.equal("one\ntwo\n", data)
    assert.equal("closed", ending)
  end)

  it("reads /dev/null on stdin as an empty input", function()
    local data, ending = run_child({"lua5.4", "-e", CHILD}, {stdin = "/dev/null"})
    assert.equal("", data)
    assert.equal("closed", ending)
  end)

  it("waits for a pipe without blocking the loop, and leaves its flags alone", function()
    local data, ending, ticks = run_child({"sh", "-c",
      "(printf 'first\\n'; sleep 0.5; printf 'second\\n') | lua5.4 -e \"$0\"", CHILD})
    assert.equal("first\n|second\n", data)
    assert.equal("closed", ending)
    assert.is_true(ticks >= 3, "the loop's timer ran " .. ticks .. " times while stdin waited")
  end)
end)

describe("core.isatty", function()
  it("is false for a pipe, a file and a socket", function()
    local code, out = proc.run({"sh", "-c", "echo | lua5.4 -e \"$0\" | cat", [[
      package.cpath = (os.getenv("DUPLEX_CPATH") or "build/?.so") .. ";" .. package.cpath
      local core = require "duplex.core"
      print(core.isatty(0), core.isatty(1))
    ]]}, {cwd = peers.root})
    assert.equal(0, code, out)
    assert.equal("false\tfalse\n", out)
    run(function()
      local c, s = socket_pair()
      assert.is_false(core.isatty(c:fd()))
      c:close()
      s:close()
    end)
  end)

  it("is true for a terminal (script(1) gives the child one)", function()
    local code, out = proc.run({"script", "-qec", "lua5.4 -e '" ..
      "package.cpath = (os.getenv(\"DUPLEX_CPATH\") or \"build/?.so\") .. \";\" .. package.cpath " ..
      "print(require(\"duplex.core\").isatty(1))'", "/dev/null"}, {cwd = peers.root})
    assert.equal(0, code, out)
    assert.matches("^true\r?\n$", out)
  end)
end)
