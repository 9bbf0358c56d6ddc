-- Packaging: the version is written once (csrc/proto/dx_version.h) and every
-- rockspec and CHANGELOG.md agree with it; `luarocks make` installs the
-- Lua 5.4 rock and the OpenResty rock from a copy of this checkout, leaves
-- that copy clean, installs one core.so, and what it installs works: a
-- WebSocket round trip in Lua 5.4, the `duplex` command against
-- python-websockets, and duplex.nginx in
-- a real nginx with only the rock tree on its paths. A core built for the
-- other Lua fails with an error that names the build to use.
local core = require "duplex.core"
local duplex = require "duplex"
local proc = require "support.proc"
local peers = require "support.peers"
local services = require "support.services"

local root = peers.root

local function read(path) return assert(proc.read_file(path), "cannot read " .. path) end
local write = proc.write_file

local function lines(cmd)
  local out = {}
  local p = assert(io.popen(cmd))
  for l in p:lines() do out[#out + 1] = l end
  p:close()
  return out
end

local function sh(cmd, timeout)
  local code, out, err = proc.run({ "sh", "-c", cmd }, { timeout = timeout or 120, env = services.env })
  assert(code == 0, cmd .. " failed (" .. tostring(code) .. "):\n" .. out .. err)
  return out
end

local VERSION = read(root .. "/csrc/proto/dx_version.h"):match('#define DX_VERSION "([^"]+)"')

describe("the version", function()
  it("is the one of csrc/proto/dx_version.h in core.version and duplex.version", function()
    assert.is_string(VERSION)
    assert.matches("^%d+%.%d+%.%d+$", VERSION)
    assert.equal(VERSION, core.version)
    assert.equal(VERSION, duplex.version)
  end)

  it("names the versioned rockspecs, file and content", function()
    for _, package in ipairs { "duplex", "duplex-openresty" } do
      local path = root .. "/rockspec/" .. package .. "-" .. VERSION .. "-1.rockspec"
      local text = read(path)
      assert.truthy(text:find('\npackage = "' .. package .. '"\n', 1, true), path)
      assert.truthy(text:find('\nversion = "' .. VERSION .. '-1"\n', 1, true), path)
      assert.truthy(text:find('tag = "v' .. VERSION .. '"', 1, true), path)
    end
    -- no rockspec of another release is left behind
    for _, path in ipairs(lines("ls " .. root .. "/rockspec/")) do
      local v = path:match("^duplex%-(%d[%d.]*)%-%d+%.rockspec$")
        or path:match("^duplex%-openresty%-(%d[%d.]*)%-%d+%.rockspec$")
      if v then assert.equal(VERSION, v, path) end
    end
  end)

  it("is CHANGELOG.md's newest release", function()
    local newest = read(root .. "/CHANGELOG.md"):match("\n## %[(%d[^%]]*)%]")
    assert.equal(VERSION, newest)
  end)

  it("leaves scm and versioned rockspecs twins apart from the version", function()
    for _, package in ipairs { "duplex", "duplex-openresty" } do
      local scm = read(root .. "/rockspec/" .. package .. "-scm-1.rockspec")
      local rel = read(root .. "/rockspec/" .. package .. "-" .. VERSION .. "-1.rockspec")
      rel = rel:gsub(VERSION:gsub("%.", "%%.") .. "%-1", "scm-1"):gsub('\n  tag = "v[^"]*",', "")
      assert.equal(scm, rel, package .. ": the scm and versioned rockspecs differ beyond the version")
    end
  end)
end)

-- A copy of the checkout's files (tracked and new, as a release would have
-- them), so that the build in it cannot touch this one.
local function checkout_copy()
  local dir = sh("mktemp -d /tmp/duplex-rock.XXXXXX"):match("[^\n]+")
  sh("cd " .. proc.quote(root) .. " && git ls-files -co --exclude-standard | grep -v node_modules"
    .. " | tar cf - -T - | tar xf - -C " .. proc.quote(dir))
  return dir
end

local function files_under(dir)
  local set = {}
  for _, f in ipairs(lines("cd " .. proc.quote(dir) .. " && find . -type f | sort")) do set[f] = true end
  return set
end

local function assert_only_build_added(before, after)
  for f in pairs(after) do
    if not before[f] then
      assert.truthy(f:match("^%./build/"), "luarocks make left " .. f .. " in the checkout")
    end
  end
end

describe("luarocks make", function()
  local copy, tree, ljtree
  setup(function()
    copy = checkout_copy()
    tree = copy .. ".tree"
    ljtree = copy .. ".ljtree"
  end)
  teardown(function()
    proc.killall()
    if copy then sh("rm -rf " .. proc.quote(copy) .. " " .. proc.quote(tree) .. " " .. proc.quote(ljtree)) end
  end)

  it("installs the Lua 5.4 rock: one core.so, the modules, the command; the checkout stays clean", function()
    local before = files_under(copy)
    sh("cd " .. proc.quote(copy) .. " && luarocks --lua-version=5.4 make --tree " .. proc.quote(tree)
      .. " rockspec/duplex-" .. VERSION .. "-1.rockspec", 300)
    assert_only_build_added(before, files_under(copy))

    local cores = lines("find " .. proc.quote(tree) .. " -name '*.so' -path '*lua/5.4*'")
    assert.same({ tree .. "/lib/lua/5.4/duplex/core.so" }, cores)
    for _, path in ipairs(lines("cd " .. proc.quote(root) .. " && ls lua/duplex/*.lua lua/duplex/redis/*.lua")) do
      local name = path:match("lua/duplex/(.-)%.lua$")
      assert.truthy(io.open(tree .. "/share/lua/5.4/duplex/" .. name .. ".lua"), name .. " not installed")
    end
    assert.truthy(io.open(tree .. "/bin/duplex"), "the duplex command is not installed")
  end)

  it("runs from the tree alone: a round trip over loopback, with the installed core", function()
    local script = copy .. "/roundtrip.lua"
    write(script, [[
      local duplex = require "duplex"
      assert(package.searchpath("duplex.core", package.cpath):find(os.getenv("TREE"), 1, true) == 1)
      local server = assert(duplex.listen { host = "127.0.0.1", port = 0, handler = function(ws)
        for m, k in ws:messages() do ws:send(m:upper(), k) end
      end })
      local ws = assert(duplex.connect(server:url("/"), { deflate = true }))
      assert(ws:send("hello from the rock"))
      print(ws:receive(5))
      ws:close()
      server:shutdown(1)
    ]])
    local env = {
      LD_PRELOAD = false, TREE = tree,
      LUA_PATH_5_4 = tree .. "/share/lua/5.4/?.lua;" .. tree .. "/share/lua/5.4/?/init.lua",
      LUA_CPATH_5_4 = tree .. "/lib/lua/5.4/?.so",
    }
    local code, out, err = proc.run({ "lua5.4", script }, { env = env, timeout = 30 })
    assert.equal(0, code, out .. err)
    assert.equal("HELLO FROM THE ROCK\ttext\n", out)
  end)

  it("installs the duplex command, which talks to python-websockets from the tree alone", function()
    local code, out, err = proc.run({ tree .. "/bin/duplex", "--help" }, { env = services.env, timeout = 30 })
    assert.equal(0, code, out .. err)
    assert.matches("duplex connect", out, 1, true)
    assert.matches("duplex serve", out, 1, true)
    local input = copy .. "/lines.txt"
    write(input, "from the rock\nsecond line\n")
    local srv = peers.py_echo_server { deflate = true }
    -- the wrapper luarocks wrote sets the tree's paths; nothing of the checkout
    local env = { LD_PRELOAD = false, DUPLEX_CPATH = false, LUA_PATH = false, LUA_CPATH = false,
      LUA_PATH_5_4 = false, LUA_CPATH_5_4 = false }
    code, out, err = proc.run({ tree .. "/bin/duplex", "connect", "--deflate", "--wait", "0.5", srv.url },
      { env = env, stdin = input, cwd = "/", timeout = 30 })
    srv:stop()
    assert.equal(0, code, out .. err)
    assert.equal("text from the rock\ntext second line\nclose 1000\n", out)
  end)

  it("installs the OpenResty rock, which nginx loads from the tree alone", function()
    local before = files_under(copy)
    sh("cd " .. proc.quote(copy) .. " && luarocks --lua-version=5.1 make --tree " .. proc.quote(ljtree)
      .. " rockspec/duplex-openresty-" .. VERSION .. "-1.rockspec LUA_INCDIR=/usr/include/luajit-2.1", 300)
    assert_only_build_added(before, files_under(copy))
    assert.same({ ljtree .. "/lib/lua/5.1/duplex/core.so" }, lines("find " .. proc.quote(ljtree) .. " -name '*.so'"))

    -- the nginx.conf lines of the rockspec's header, nothing from the checkout
    local port = services.free_port()
    local conf = table.concat({
      "load_module /usr/lib/nginx/modules/ndk_http_module.so;",
      "load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;",
      "worker_processes 1;", "error_log stderr notice;", "events { worker_connections 64; }",
      "http {",
      '    lua_package_path "' .. ljtree .. '/share/lua/5.1/?.lua;;";',
      '    lua_package_cpath "' .. ljtree .. '/lib/lua/5.1/?.so;;";',
      "    lua_socket_log_errors off;",
      "    server {",
      "        listen 127.0.0.1:" .. port .. ";",
      "        location = /echo {",
      "            content_by_lua_block {",
      '                require("duplex.nginx").serve { deflate = true, handler = function(ws)',
      "                    for m, k in ws:messages() do ws:send(m, k) end",
      "                end }",
      "            }",
      "        }",
      -- the Redis client and what it requires, from the tree
      "        location = /redis {",
      "            content_by_lua_block {",
      '                local redis = require("duplex.redis.client")',
      '                ngx.say(type(redis.connect), " ", require("duplex.resp").command("PING"):len())',
      "            }",
      "        }",
      "    }",
      "}",
    }, "\n") .. "\n"
    local _, uid = proc.run({ "id", "-u" })
    if uid:match("^0%s") then conf = "user root;\n" .. conf end
    local n = services.nginx(conf, port)
    local ok, err = pcall(function()
      local ws = assert(duplex.connect("ws://127.0.0.1:" .. port .. "/echo", { deflate = true }))
      assert.truthy(ws.deflate)
      assert(ws:send(("openresty "):rep(100)))
      assert.equal(("openresty "):rep(100), (ws:receive(5)))
      ws:close()
      local code, out = proc.run({ "curl", "-s", "-m", "10", "http://127.0.0.1:" .. port .. "/redis" },
        { timeout = 20, env = services.env })
      assert.equal(0, code, out)
      assert.equal("function 14\n", out)
    end)
    local log = n:log()
    n:stop()
    assert(ok, tostring(err) .. "\n" .. log)
    assert.falsy(log:find("[error]", 1, true), log)
  end)
end)

describe("a core built for the other Lua", function()
  local function load_with(interp, cpath)
    local script = "package.path = " .. string.format("%q", root .. "/lua/?.lua;") .. " .. package.path\n"
      .. "package.cpath = " .. string.format("%q", cpath) .. "\n"
      .. "local ok, err = pcall(require, 'duplex.core'); io.write(tostring(ok), ' ', tostring(err))"
    local _, out, err = proc.run({ interp, "-e", script }, { env = services.env, timeout = 30 })
    return out .. err
  end

  it("tells LuaJIT (OpenResty) to use the OpenResty build", function()
    local out = load_with("luajit", root .. "/build/?.so")
    assert.matches("^false ", out)
    assert.matches("built for another Lua", out, 1, true)
    assert.matches("duplex-openresty-<version>-1.rockspec", out, 1, true)
  end)

  it("tells Lua 5.4 to use the Lua 5.4 build", function()
    local out = load_with("lua5.4", root .. "/build/luajit/?.so")
    assert.matches("^false ", out)
    assert.matches("built for another Lua", out, 1, true)
    assert.matches("rockspec/duplex-<version>-1.rockspec", out, 1, true)
  end)

  it("says it is not built when there is none", function()
    local out = load_with("lua5.4", "/nonexistent/?.so")
    assert.matches("duplex's C core is not built or not on package.cpath", out, 1, true)
  end)
end)
