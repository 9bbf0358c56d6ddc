-- core.connection: the object every WebSocket connection is on our loop.
-- It must read and write like the table it replaced (a table whose
-- metatable is the class), whatever is kept in its struct and user values.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = (os.getenv("DUPLEX_CPATH") or "build/?.so") .. ";" .. package.cpath

local core = require "duplex.core"

local function class_of(fields)
  local class = fields or {}
  class.__index = class
  class.state = class.state or "open"
  return class
end

describe("core.connection", function()
  it("reads its own fields, else its class's, and keeps what every connection has in itself", function()
    local class = class_of { x = 1, high_water = 10, greet = function(self) return "hi " .. self.sock end }
    local c = core.connection(class, "S", "E")
    assert.equal("userdata", type(c))
    assert.equal("S", c.sock)
    assert.equal("E", c.engine)
    assert.equal(1, c.x)
    assert.equal("hi S", c:greet())
    assert.equal("open", c.state)
    assert.is_false(c._reading)
    assert.is_false(c._sending)
    assert.is_nil(c.request)
    assert.is_nil(c.nothing)
  end)

  it("lets a field of its own hide the class's until it is set to nil", function()
    local class = class_of { x = 1, high_water = 10 }
    local c, other = core.connection(class), core.connection(class)
    c.x, c.high_water, c.extra = 2, false, "mine"
    assert.equal(2, c.x)
    assert.is_false(c.high_water)
    assert.equal("mine", c.extra)
    assert.equal(1, other.x, "another connection of the class")
    assert.equal(10, other.high_water)
    assert.is_nil(other.extra)
    assert.equal(1, class.x, "the class itself")
    c.x, c.high_water = nil, nil
    assert.equal(1, c.x)
    assert.equal(10, c.high_water)
    c.request, c.remote_address, c.remote_port = { path = "/" }, "127.0.0.1", 4242
    assert.equal("/", c.request.path)
    assert.equal("127.0.0.1", c.remote_address)
    assert.equal(4242, c.remote_port)
    c.sock = nil
    assert.is_nil(c.sock)
    c[1], c[true] = "one", "yes"
    assert.equal("one", c[1])
    assert.equal("yes", c[true])
  end)

  it("takes the fields it is made with that are not its class's", function()
    local class = class_of { x = 1, high_water = 10 }
    local req = { path = "/" }
    local c = core.connection(class, "S", "E", { x = 1, high_water = 11, request = req, remote_address = "::1",
      remote_port = 4242, state = "closing", mine = "m" })
    assert.equal(req, c.request)
    assert.equal("::1", c.remote_address)
    assert.equal(4242, c.remote_port)
    assert.equal("closing", c.state)
    assert.equal(11, c.high_water)
    local got = {}
    for k, v in pairs(c) do got[k] = v end
    assert.same({ sock = "S", engine = "E", request = req, remote_address = "::1", remote_port = 4242,
      state = "closing", high_water = 11, mine = "m" }, got, "x is the class's, not its own")
    assert.has_error(function() core.connection(class, "S", "E", "not a table") end)
    assert.has_error(function() core.connection(class, "S", "E", { state = "bogus" }) end)
  end)

  it("makes data when it is first read, one table for good", function()
    local c = core.connection(class_of())
    local seen = {}
    for k in pairs(c) do seen[k] = true end
    assert.is_nil(seen.data, "not made before it is read")
    local data = c.data
    assert.equal("table", type(data))
    data.score = 3
    assert.equal(3, c.data.score)
    assert.equal(data, c.data)
    c.data = { other = true }
    assert.is_true(c.data.other)
  end)

  it("keeps remote_port as it is given, a port number or any other value, and lists it", function()
    local c = core.connection(class_of { remote_port = "class's" })
    assert.equal("class's", c.remote_port, "none of its own yet")
    for _, v in ipairs({ 0, 65535, 4711, "4711", 70000, -1, 1.5, true, {} }) do
      c.remote_port = v
      assert.equal(v, c.remote_port)
      local got = {}
      for k, x in pairs(c) do got[k] = x end
      assert.equal(v, got.remote_port, "pairs")
    end
    c.remote_port = 8080
    c.remote_port = "x"
    assert.equal("x", c.remote_port, "a port number replaced")
    c.remote_port = 8080
    assert.equal(8080, c.remote_port, "another value replaced")
    c.remote_port = nil
    assert.equal("class's", c.remote_port, "forgotten")
    for k in pairs(c) do assert.not_equal("remote_port", k) end
  end)

  it("keeps the state and the flags, and refuses a state that is none of the three", function()
    local c = core.connection(class_of())
    for _, s in ipairs({ "closing", "closed", "open" }) do
      c.state = s
      assert.equal(s, c.state)
    end
    c._reading, c._sending = 1, "yes"
    assert.is_true(c._reading)
    assert.is_true(c._sending)
    c._reading, c._sending = nil, false
    assert.is_false(c._reading)
    assert.is_false(c._sending)
    assert.has_error(function() c.state = "bogus" end, 'a connection\'s state is "open", "closing" or "closed"')
    assert.has_error(function() c.state = nil end)
    assert.equal("open", c.state, "a refused state changes nothing")
  end)

  it("lists what it has with pairs, the class's fields not among them", function()
    local class = class_of { x = 1 }
    local c = core.connection(class, "S", nil)
    c.mine, c.request, c._sending = 5, "R", true
    local got = {}
    for k, v in pairs(c) do got[k] = v end
    assert.same({ sock = "S", request = "R", mine = 5, state = "open", _sending = true }, got)
  end)

  it("has its class's metamethods, and its own refuse another object", function()
    local closed
    local class = class_of {
      __tostring = function(self) return "conn on " .. self.sock end,
      __close = function(self) closed = self end,
    }
    local c = core.connection(class, "S")
    assert.equal("conn on S", tostring(c))
    do
      local scoped <close> = c -- luacheck: ignore 211
    end
    assert.equal(c, closed)
    assert.equal(class, getmetatable(c), "its metatable shows as its class")
    local mt = debug.getmetatable(c)
    assert.has_error(function() mt.__index({}, "x") end)
    assert.has_error(function() mt.__newindex(io.stdout, "x", 1) end)
    assert.has_error(function() core.connection("not a class") end)
  end)

  it("is what the server hands a handler, and serves as the table did", function()
    local duplex = require "duplex"
    local got = {}
    local server = assert(duplex.listen { host = "127.0.0.1", port = 0, handler = function(ws)
      got.type, got.state, got.path = type(ws), ws.state, ws.request.path
      ws.data.n = 0
      for message in ws:messages() do
        ws.data.n = ws.data.n + 1
        ws:send(message .. " " .. ws.data.n)
      end
      got.closed = ws.state
    end })
    duplex.spawn(function()
      local ws = assert(duplex.connect(server:url("/here")))
      assert.equal("userdata", type(ws))
      for i = 1, 3 do
        assert(ws:send("m"))
        assert.equal("m " .. i, (ws:receive(5)))
      end
      ws:close()
      server:shutdown(5)
    end)
    duplex.run()
    assert.same({ type = "userdata", state = "open", path = "/here", closed = "closed" }, got)
  end)
  it("hands Lua the sends C does not take as they were, and follows a socket set later", function()
    local duplex = require "duplex"
    local got = {}
    local server = assert(duplex.listen { host = "127.0.0.1", port = 0, handler = function(ws)
      -- a float high_water is Lua's to judge: the binary message must stay binary
      ws.high_water = 1048576.0
      assert(ws:send("\255\254", "binary"))
      ws.high_water = nil
      -- a socket of the application's: the send goes through it, not the one before
      local real, calls = ws.sock, 0
      ws.sock = setmetatable({}, { __index = function(_, k)
        calls = calls + 1
        local v = real[k]
        if type(v) == "function" then return function(_, ...) return v(real, ...) end end
        return v
      end })
      assert(ws:send("through the proxy"))
      got.calls = calls
      ws.sock = real
      assert(ws:send("direct"))
      got.after = calls
      for _ in ws:messages() do end
    end })
    duplex.spawn(function()
      local ws = assert(duplex.connect(server:url("/")))
      local m, kind = ws:receive(5)
      got.first, got.kind = m, kind
      got.second = ws:receive(5)
      got.third = ws:receive(5)
      ws:close()
      server:shutdown(5)
    end)
    duplex.run()
    assert.equal("\255\254", got.first)
    assert.equal("binary", got.kind)
    assert.equal("through the proxy", got.second)
    assert.equal("direct", got.third)
    assert.is_true(got.calls > 0)
    assert.equal(got.calls, got.after)
  end)
end)
