-- RESP replies (duplex.resp): random values, cut anywhere, parse to what
-- was sent; limits and malformed input are errors, never a hang; and the
-- broker (duplex.redis) survives a Redis that pushes nonsense.
local core = require "duplex.core"
local resp = require "duplex.resp"
local redis = require "duplex.redis"
local run = require("duplex.runtime").blocking

local rng = 1
local function rand(n)
  rng = (rng * 1103515245 + 12345) % 2147483648
  return rng % n
end

-- A random value and its bytes.
local function value(depth)
  local k = rand(depth > 3 and 5 or 7)
  if k == 0 then local s = ("simple" .. rand(1000)):sub(1, rand(12)) return s, "+" .. s .. "\r\n" end
  if k == 1 then local n = rand(1 << 30) - (1 << 29) return n, ":" .. n .. "\r\n" end
  if k == 2 then return { err = "ERR something" }, "-ERR something\r\n" end
  if k == 3 then return false, "$-1\r\n" end
  if k == 4 then
    local s = string.rep("b\r\n\0", rand(4)) .. string.rep("x", rand(3) == 0 and rand(200000) or rand(40))
    return s, "$" .. #s .. "\r\n" .. s .. "\r\n"
  end
  local n, list, parts = rand(6), {}, {}
  for i = 1, n do list[i], parts[i] = value(depth + 1) end
  return list, "*" .. n .. "\r\n" .. table.concat(parts)
end

local function parse_all(bytes, cuts)
  local p, out, at = resp.parser(), {}, 0
  while at < #bytes do
    local len = math.min(#bytes - at, cuts())
    p:feed(bytes:sub(at + 1, at + len))
    at = at + len
    while true do
      local v, err = p:next()
      assert(err == nil, err)
      if v == nil then break end
      out[#out + 1] = v
    end
  end
  return out
end

describe("resp parser", function()
  it("gives back random replies, nested and large, however the bytes are cut", function()
    for round = 1, 60 do
      local values, parts = {}, {}
      for i = 1, 1 + rand(5) do values[i], parts[i] = value(0) end
      local bytes = table.concat(parts)
      local cuts = ({ function() return 1 + rand(3) end, function() return 1 + rand(4096) end,
        function() return #bytes end })[round % 3 + 1]
      if round % 3 == 1 and #bytes > 20000 then cuts = function() return 1 + rand(64) + rand(2) * 4096 end end
      assert.same(values, parse_all(bytes, cuts))
    end
  end)

  it("refuses what breaks the protocol or a limit, and stays failed", function()
    local function fails(bytes, limits, what)
      local p = resp.parser(limits)
      p:feed(bytes)
      local v, err = p:next()
      assert.is_nil(v)
      assert.matches(what, err)
      assert.same({ nil, err }, { p:next() })
    end
    fails("?what\r\n", nil, "protocol error")
    fails("$abc\r\n", nil, "bad bulk length")
    fails("$-2\r\n", nil, "bad bulk length")
    fails("*1.5\r\n", nil, "bad array length")
    fails("$3\r\nabcd\r\n", nil, "without CRLF")
    fails("$100\r\n", { max_bulk = 10 }, "over max_reply")
    fails("*5\r\n", { max_elements = 4 }, "elements, over the limit")
    fails(string.rep("*1\r\n", 20) .. ":1\r\n", { max_depth = 16 }, "nested deeper than 16")
    fails(string.rep("x", 70000), nil, "longer than 64 KiB")
    -- a huge announced bulk that never comes is only buffered bytes
    local p = resp.parser()
    p:feed("$50000000\r\n" .. string.rep("y", 1000))
    assert.is_nil(p:next())
    assert.equal(1000, p:buffered())
  end)
end)

describe("redis broker against a Redis that pushes nonsense", function()
  -- A fake Redis: answers PING and SUBSCRIBE like one, then sends each
  -- connection's next scripted push.
  local published = {}
  local function fake_redis(pushes)
    local l = assert(core.listen { host = "127.0.0.1", port = 0 })
    local _, port = l:address()
    local conns = 0
    core.spawn(function()
      while true do
        local s = l:accept()
        if not s then return end
        conns = conns + 1
        local push = pushes[conns]
        core.spawn(function()
          local p = resp.parser()
          while true do
            local v = p:next()
            if v == nil then
              local d = s:read(nil, 10)
              if not d then break end
              p:feed(d)
            elseif v[1] == "PING" then
              s:write("+PONG\r\n")
            elseif v[1] == "CLIENT" then -- SETNAME: the broker names its connections
              s:write("+OK\r\n")
            elseif v[1] == "SUBSCRIBE" then
              s:write(resp.command("subscribe", v[2], 1))
              if push and v[2] == "duplex:room" then s:write(push) end
            elseif v[1] == "PUBLISH" then
              published[#published + 1] = v[3]
              s:write(":0\r\n")
              if v[3]:find(" cut$") then break end -- the link breaks under the publisher
            end
          end
          s:close()
        end)
      end
    end)
    return l, port, function() return conns end
  end

  it("drops the link on a push whose payload is not a string, reconnects and delivers again", function()
    local node = "othernode"
    local good = "*3\r\n$7\r\nmessage\r\n$11\r\nduplex:room\r\n" ..
      (function() local s = node .. " t hello" return "$" .. #s .. "\r\n" .. s .. "\r\n" end)()
    local l, port, count = fake_redis {
      "*3\r\n$7\r\nmessage\r\n$11\r\nduplex:room\r\n:42\r\n", -- an integer payload
      "*3\r\n$7\r\nmessage\r\n$11\r\nduplex:room\r\n$-1\r\n", -- a null payload
      good,
    }
    local statuses, got = {}, {}
    local broker = assert(redis.broker { url = "redis://127.0.0.1:" .. port, backoff_min = 0.01,
      on_status = function(status, detail) statuses[#statuses + 1] = status .. " " .. tostring(detail) end })
    broker:on_message(function(topic, message) got[#got + 1] = topic .. "=" .. message end)
    broker:subscribe("room")
    run(function()
      local deadline = core.now() + 10
      while #got == 0 and core.now() < deadline do core.sleep(0.02) end
    end)
    broker:close()
    l:close()
    assert.same({ "room=hello" }, got)
    assert.is_true(count() >= 3, "the subscriber did not reconnect")
    local text = table.concat(statuses, "\n")
    assert.matches("malformed message push", text)
  end)
  it("counts a message as published only once Redis took it", function()
    local l, port = fake_redis {}
    local statuses = {}
    local broker = assert(redis.broker { url = "redis://127.0.0.1:" .. port, backoff_min = 5, node_id = "n",
      on_status = function(status, detail) statuses[#statuses + 1] = status .. " " .. detail end })
    local function wait(what, pred)
      run(function()
        local deadline = core.now() + 10
        while not pred() and core.now() < deadline do core.sleep(0.02) end
      end)
      assert.is_truthy(pred(), what)
    end
    wait("the publisher to connect", function() return table.concat(statuses, " "):find("up publisher") end)
    assert.is_true(broker:publish("room", "one"))
    wait("one to be taken", function() return broker.stats.published == 1 end)
    assert.is_true(broker:publish("room", "two cut")) -- taken, then the link breaks
    wait("two to be taken", function() return broker.stats.published == 2 end)
    assert.is_true(broker:publish("room", "three"))   -- sent to a closed connection
    wait("the publisher to fail", function() return broker.stats.dropped == 1 end)
    assert.same({ "n t one", "n t two cut" }, published)
    assert.equal(2, broker.stats.published)
    assert.matches("down publisher", table.concat(statuses, "\n"))
    -- While it is known down, a plain message is dropped at once.
    assert.is_false(broker:publish("room", "four"))
    assert.equal(2, broker.stats.dropped)
    broker:close()
    l:close()
  end)
end)
