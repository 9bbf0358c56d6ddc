-- duplex.redis.connect, the general Redis client, against real redis-server
-- processes on 127.0.0.1 (ephemeral ports): commands and their types,
-- pipelines, replies matched to many coroutines, SELECT, AUTH and ACL users,
-- pub/sub of the three kinds, a restart, TLS; against a fake server that
-- misbehaves; over a stream of duplex.transport, and inside cqueues.
local core = require "duplex.core"
local resp = require "duplex.resp"
local redis = require "duplex.redis"
local runtime = require "duplex.runtime"
local loop = require "support.loop"
local proc = require "support.proc"
local services = require "support.services"
local certs = require "support.certs"

local run, numsub = loop.run, services.numsub

-- Every client a test opens is closed after it, passed or failed.
local opened = {}
after_each(function()
  for _, c in ipairs(opened) do c:close() end
  opened = {}
end)

local function connect(opts)
  local c, err = redis.connect(opts)
  assert(c, err)
  opened[#opened + 1] = c
  return c
end

-- on_status into a log; last(role) is what that connection last reported.
local function recorder()
  local log = {}
  local function on_status(status, detail) log[#log + 1] = status .. " " .. detail end
  local function last(role)
    for i = #log, 1, -1 do
      local status, who = log[i]:match("^(%a+) (%a+)")
      if who == role and status ~= "error" then return status end
    end
  end
  return log, on_status, last
end

-- A call that failed: nil, a message matching pattern and, when given,
-- the kind of failure ("redis" or "connection").
local function fails(pattern, kind, v, err, got_kind)
  assert.is_nil(v)
  assert.matches(pattern, err)
  if kind then assert.equal(kind, got_kind) end
end

-- Inside the loop: poll pred every 10 ms.
local function wait_for(what, timeout, pred)
  local deadline = core.now() + timeout
  while not pred() do
    if core.now() > deadline then error("timed out waiting for " .. what, 2) end
    core.sleep(0.01)
  end
end

-- fn(r) on the loop, with a redis-server of its own (services.redis opts),
-- stopped after, passed or failed.
local function with_redis(opts, fn)
  local r = services.redis(nil, opts)
  local ok, err = pcall(run, function() fn(r) end)
  r:cleanup()
  assert(ok, err)
end

local function tcp(port)
  return assert(core.connect { host = "127.0.0.1", port = port, timeout = 2 })
end

describe("duplex.redis.connect", function()
  local r
  setup(function() r = services.redis() end)
  teardown(function()
    if r then r:cleanup() end
    proc.killall()
  end)

  it("sends commands and returns Redis's types", function()
    run(function()
      local c = connect(r.url)
      assert.equal("OK", c:call("SET", "k", "v"))
      assert.equal("v", c:call("GET", "k"))
      assert.is_false(c:call("GET", "missing")) -- null
      assert.equal(1, c:call("DEL", "k"))
      assert.equal(3, c:call("RPUSH", "list", "a", 2, "c"))
      assert.same({ "a", "2", "c" }, c:call("LRANGE", "list", 0, -1))
      assert.same({}, c:call("LRANGE", "none", 0, -1))
      assert.equal("OK", c:call("MSET", "m1", "a", "m2", "b"))
      assert.same({ "a", false, "b" }, c:call("MGET", "m1", "nothing", "m2"))
      assert.equal("3.5", c:call("INCRBYFLOAT", "f", 3.5))
      -- binary-safe, and larger than a read
      local bin = "\0\r\n$5\r\n*1\r\n\255" .. string.rep("z", 1 << 20)
      assert.equal("OK", c:call("SET", "bin", bin))
      assert.equal(bin, c:call("GET", "bin"))
      -- an error reply, told from a failed connection by the third value
      assert.same({ nil, "WRONGTYPE Operation against a key holding the wrong kind of value", "redis" },
        { c:call("GET", "list") })
      fails("^ERR unknown command", "redis", c:call("NOSUCHCOMMAND", "x"))
      -- errors inside a reply stay in their place
      local tx = assert(c:pipeline { { "MULTI" }, { "INCR", "n" }, { "LPUSH", "n", "x" }, { "EXEC" } })
      assert.same({ "OK", "QUEUED", "QUEUED" }, { tx[1], tx[2], tx[3] })
      assert.equal(1, tx[4][1])
      assert.matches("^WRONGTYPE", tx[4][2].err)
      assert.equal("PONG", c:call("ping"))
      c:close()
      assert.same({ nil, "client closed", "connection" }, { c:call("PING") })
    end)
  end)

  it("raises for mistakes and returns nil, err for what can fail", function()
    run(function()
      local c = connect(r.url)
      assert.error_matches(function() c:call("SET", "k", nil) end, "argument 3 is a nil")
      assert.error_matches(function() c:call("SET", "k", {}) end, "argument 3 is a table")
      assert.error_matches(function() c:call() end, "a command expected")
      assert.error_matches(function() c:call("subscribe", "x") end, "use client:subscribe")
      assert.error_matches(function() c:pipeline { "GET" } end, "command 1 is not a table")
      assert.error_matches(function() c:pipeline(function(p) p:call("GET", true) end) end, "argument 2 is a boolean")
      assert.error_matches(function() c:subscribe("x") end, "names, then a function")
      assert.error_matches(function() c:subscribe(1, print) end, "channel names are strings")
      assert.error_matches(function() redis.connect { url = r.url, timeot = 1 } end, "unknown option 'timeot'")
      assert.error_matches(function() redis.connect { url = r.url, timeout = 0 } end, "option 'timeout' must be")
      assert.error_matches(function() redis.connect(42) end, "a URL or a table")
      assert.same({}, c:pipeline {})

      fails("not a redis:// or rediss:// URL", nil, redis.connect("http://127.0.0.1:" .. r.port))
      fails("must be a database number", nil, redis.connect(r.url .. "/zero"))
      fails("^connect to 127.0.0.1:%d+ failed: ", nil, redis.connect("redis://127.0.0.1:" .. services.free_port()))
    end)
  end)

  it("sends 1,000 commands as one pipeline, each reply or error in its slot", function()
    run(function()
      local c = connect(r.url)
      local replies = assert(c:pipeline(function(p)
        for i = 1, 500 do
          p:call("SET", "p:" .. i, i)
          p:call("GET", "p:" .. i)
        end
      end))
      assert.equal(1000, #replies)
      for i = 1, 500 do
        assert.equal("OK", replies[2 * i - 1])
        assert.equal(tostring(i), replies[2 * i])
      end
      local mixed = assert(c:pipeline { { "SET", "a", "1" }, { "INCR", "a" }, { "LPUSH", "a", "x" }, { "GET", "a" },
        { "GET", "nothing" } })
      assert.same({ "OK", 2 }, { mixed[1], mixed[2] })
      assert.matches("^WRONGTYPE", mixed[3].err)
      assert.same({ "2", false }, { mixed[4], mixed[5] })
    end)
  end)

  it("matches replies first in, first out for 20 coroutines calling at once", function()
    run(function()
      local c = connect(r.url)
      local done, wrong = 0, {}
      local function expect(want, got, what)
        if got ~= want then wrong[#wrong + 1] = what .. ": " .. tostring(got) .. " ~= " .. tostring(want) end
      end
      for i = 1, 20 do
        core.spawn(function()
          local key = "fifo:" .. i
          for j = 1, 50 do
            local tag = i .. "/" .. j
            expect("OK", c:call("SET", key, tag), "SET " .. tag)
            expect(tag, c:call("ECHO", tag), "ECHO " .. tag)
            expect(tag, c:call("GET", key), "GET " .. tag)
            if j % 10 == 0 then
              local rs = c:pipeline { { "ECHO", tag .. "a" }, { "INCR", "fifo:count" }, { "ECHO", tag .. "b" } }
              expect(tag .. "a", rs and rs[1], "pipeline " .. tag)
              expect(tag .. "b", rs and rs[3], "pipeline " .. tag)
            end
            if (i + j) % 7 == 0 then core.sleep(0) end
          end
          done = done + 1
        end)
      end
      wait_for("20 coroutines", 15, function() return done == 20 end)
      assert.same({}, wrong)
      assert.equal("100", c:call("GET", "fifo:count"))
    end)
  end)

  it("hands the reading on when the reader's own reply is in", function()
    run(function()
      local c = connect { url = r.url, timeout = 2 }
      local got = {}
      -- The first caller reads; its reply comes at once and it calls no
      -- more. The second's reply comes 0.2 s later: someone must read it.
      core.spawn(function() got.echo = c:call("ECHO", "at once") end)
      core.spawn(function() got.blpop = { c:call("BLPOP", "empty-list", 0.2) } end)
      wait_for("both replies", 3, function() return got.echo and got.blpop end)
      assert.equal("at once", got.echo)
      assert.same({ false }, got.blpop)
    end)
  end)

  it("selects the URL's database, again after a reconnect", function()
    run(function()
      local _, on_status, last = recorder()
      local c3 = connect { url = r.url .. "/3", on_status = on_status, backoff_min = 0.01 }
      local c0 = connect(r.url)
      assert.equal("OK", c3:call("SET", "where", "three"))
      assert.is_false(c0:call("GET", "where"))
      assert.equal("three", connect { url = r.url, db = 3 }:call("GET", "where"))
      fails("SELECT 99 failed: ERR DB index is out of range", nil, redis.connect(r.url .. "/99"))

      -- the server drops it; the next command finds out, and the client
      -- comes back on its own, database 3 again
      assert.equal(1, c0:call("CLIENT", "KILL", "ID", c3:call("CLIENT", "ID")))
      fails(".", "connection", c3:call("GET", "where"))
      wait_for("c3 back", 5, function() return last("commands") == "up" and c3:call("PING") == "PONG" end)
      assert.equal("three", c3:call("GET", "where"))
    end)
  end)

  it("names each of its connections, so that CLIENT LIST tells whose they are", function()
    run(function()
      local c = connect { url = r.url, name = "node-7" }
      assert.equal("node-7", c:call("CLIENT", "GETNAME"))
      assert.is_true(c:subscribe("x", function() end))
      local list = c:call("CLIENT", "LIST")
      local named = 0
      for _ in list:gmatch("name=node%-7 ") do named = named + 1 end
      assert.equal(2, named) -- the command connection and the subscriber's
      assert.has_error(function() redis.connect { url = r.url, name = "two words" } end,
        "redis.connect: option 'name' must be a name without spaces (CLIENT SETNAME), got \"two words\"")
    end)
  end)

  it("delivers messages of channels, patterns and shard channels, beside commands", function()
    run(function()
      local log, on_status = recorder()
      local c = connect { url = r.url, on_status = on_status }
      local pub = connect(r.url)
      local got = {}
      local function into(tag)
        return function(channel, message, pattern)
          got[#got + 1] = table.concat({ tag, channel, message, pattern or "-" }, " ")
        end
      end
      assert.is_true(c:subscribe("news", "sport", into("sub")))
      assert.is_true(c:psubscribe("room:*", into("psub")))
      assert.is_true(c:ssubscribe("shard:1", into("ssub")))
      assert.equal(1, pub:publish("news", "hello"))
      assert.equal(1, pub:publish("sport", "goal"))
      assert.equal(1, pub:publish("room:42", "hi"))
      assert.equal(1, pub:spublish("shard:1", "s"))
      wait_for("4 messages", 5, function() return #got == 4 end)
      assert.same({ "sub news hello -", "sub sport goal -", "psub room:42 hi room:*", "ssub shard:1 s -" }, got)
      assert.equal("PONG", c:call("PING")) -- commands go on beside, on the other connection

      -- A handler may call commands (it waits in its own coroutine); one
      -- that raises is reported, and the next message still arrives.
      got = {}
      assert.is_true(c:subscribe("ask", function(_, m) got[#got + 1] = c:call("ECHO", "echo:" .. m) end))
      assert.is_true(c:subscribe("boom", function() error("kaboom") end))
      pub:publish("boom", "x")
      pub:publish("ask", "y")
      pub:publish("ask", "z")
      wait_for("the echoes", 5, function() return #got == 2 end)
      assert.same({ "echo:y", "echo:z" }, got)
      assert.matches("error subscriber: message handler failed: .*kaboom", table.concat(log, "\n"))

      -- A handler may subscribe too: it is the subscriber's reader, so it
      -- does not wait for the confirmation.
      got = {}
      assert.is_true(c:subscribe("first", function()
        assert.is_true(c:subscribe("second", function(_, m) got[#got + 1] = m end))
      end))
      pub:publish("first", "x")
      wait_for("the second subscription", 5, function() return numsub(r.port, "second") == 1 end)
      assert.equal(1, pub:publish("second", "y"))
      wait_for("its message", 5, function() return #got == 1 end)
      assert.same({ "y" }, got)

      assert.is_true(c:unsubscribe("news"))
      assert.equal(0, pub:publish("news", "gone"))
      assert.equal(1, pub:publish("sport", "still"))
      assert.is_true(c:punsubscribe()) -- all patterns
      assert.equal(0, pub:publish("room:1", "gone"))
      assert.is_true(c:sunsubscribe("shard:1"))
      assert.equal(0, pub:spublish("shard:1", "gone"))
      assert.is_true(c:unsubscribe("never subscribed"))
    end)
  end)

  it("opens one subscriber connection for coroutines subscribing at once", function()
    run(function()
      local c = connect(r.url)
      local confirmed = 0
      for i = 1, 10 do
        core.spawn(function()
          if c:subscribe("at-once:" .. i, function() end) then confirmed = confirmed + 1 end
        end)
      end
      wait_for("10 subscriptions", 5, function() return confirmed == 10 end)
      for i = 1, 10 do assert.equal(1, numsub(r.port, "at-once:" .. i)) end
      local list = c:call("CLIENT", "LIST", "TYPE", "pubsub")
      local _, lines = list:gsub("\n", "")
      assert.equal(1, lines)
    end)
  end)

  it("works over a duplex.transport stream; reconnects only with a connect function", function()
    run(function()
      local writes, dials = 0, 0
      local function stream(sock)
        return {
          read = function(_, max, timeout) return sock:read(max, timeout) end,
          write = function(_, data, timeout)
            writes = writes + 1
            return sock:write(data, timeout)
          end,
          close = function() sock:close() end,
        }
      end
      local _, on_status, last = recorder()
      local c = connect { stream = stream(tcp(r.port)), on_status = on_status, backoff_min = 0.01,
        connect = function(timeout)
          assert.is_number(timeout)
          dials = dials + 1
          return stream(tcp(r.port))
        end }
      assert.equal(1, writes) -- PING, to know it answers
      local replies = assert(c:pipeline(function(p) for i = 1, 1000 do p:call("ECHO", i) end end))
      assert.equal(2, writes) -- 1,000 commands, one write
      assert.equal("1000", replies[1000])

      local got
      assert.is_true(c:subscribe("over-stream", function(_, m) got = m end)) -- a second stream, dialed
      assert.equal(1, dials)
      assert.equal(1, connect(r.url):publish("over-stream", "hi"))
      wait_for("the message", 5, function() return got == "hi" end)

      local other = connect(r.url)
      other:call("CLIENT", "KILL", "ID", c:call("CLIENT", "ID"))
      assert.is_nil(c:call("PING"))
      wait_for("the commands back", 5, function() return last("commands") == "up" end)
      assert.equal("PONG", c:call("PING"))
      assert.equal(2, dials)

      -- Given only a stream, the client cannot open another one.
      local lone = connect { stream = stream(tcp(r.port)) }
      assert.error_matches(function() lone:subscribe("x", print) end, "needs opts.connect")
      other:call("CLIENT", "KILL", "ID", lone:call("CLIENT", "ID"))
      assert.is_nil(lone:call("PING"))
      core.sleep(0.2)
      assert.same({ nil, "not connected", "connection" }, { lone:call("PING") })
    end)
  end)

  it("logs a connect function that raises, and tries again when called", function()
    local logged = {}
    runtime.set_log(function(level, message) logged[#logged + 1] = level .. " " .. message end)
    finally(function() runtime.set_log(nil) end)
    run(function()
      local raised = false
      local _, on_status, last = recorder()
      local c = connect { stream = tcp(r.port), backoff_min = 0.01, on_status = on_status, connect = function()
        if not raised then
          raised = true
          error("a bug in the factory")
        end
        return tcp(r.port) -- a socket is a stream too
      end }
      connect(r.url):call("CLIENT", "KILL", "ID", c:call("CLIENT", "ID"))
      fails(".", "connection", c:call("PING"))
      wait_for("the error logged", 5, function() return #logged > 0 end)
      assert.matches("^error redis commands: .*a bug in the factory", logged[1])
      wait_for("the commands back", 5, function()
        c:call("PING")
        return last("commands") == "up"
      end)
      assert.equal("PONG", c:call("PING"))
    end)
  end)

  it("runs over a cqueues socket in a cqueues controller, no duplex loop running", function()
    local cqueues = require "cqueues" -- lua-cqueues: scripts/deps installs it
    local csocket = require "cqueues.socket"
    local dcq = require "duplex.cqueues"
    local cq, result = cqueues.new(), nil
    cq:wrap(function()
      local sock = csocket.connect { host = "127.0.0.1", port = r.port }
      assert(sock:connect(2))
      local c = assert(redis.connect { stream = dcq.stream(sock) })
      result = { c:call("SET", "cq", "1"), c:call("GET", "cq"), c:pipeline { { "INCR", "cq" }, { "GET", "cq" } },
        { c:call("LPUSH", "cq", "x") } }
      c:close()
    end)
    assert(cq:loop(10))
    assert.same({ "OK", "1", { 2, "2" },
      { nil, "WRONGTYPE Operation against a key holding the wrong kind of value", "redis" } }, result)
  end)
end)

describe("duplex.redis.connect, each test with a redis-server of its own", function()
  teardown(proc.killall)

  it("authenticates with a password or an ACL user, and refuses wrong ones", function()
    with_redis({ args = { "--requirepass", "s3cret" } }, function(r)
      local base = "127.0.0.1:" .. r.port
      fails("^PING failed: NOAUTH", nil, redis.connect("redis://" .. base))
      fails("^AUTH failed: WRONGPASS", nil, redis.connect("redis://:wrong@" .. base))

      local admin = connect("redis://:s3cret@" .. base)
      assert.equal("default", admin:call("ACL", "WHOAMI"))
      assert.equal("default", connect("redis://s3cret@" .. base):call("ACL", "WHOAMI"))
      assert.equal("OK", admin:call("ACL", "SETUSER", "alice", "on", ">w@nder", "~app:*", "&app:*", "+@all"))

      local alice = connect("redis://alice:w%40nder@" .. base .. "/2")
      assert.equal("alice", alice:call("ACL", "WHOAMI"))
      assert.equal("OK", alice:call("SET", "app:x", "1"))
      fails("^NOPERM", "redis", alice:call("SET", "other", "1"))
      assert.equal("alice", connect { url = "redis://" .. base, user = "alice", password = "w@nder" }
        :call("ACL", "WHOAMI"))
      fails("^AUTH failed: WRONGPASS", nil,
        redis.connect { url = "redis://" .. base, user = "alice", password = "wrong" })

      -- A channel the user may not read is refused and forgotten; the
      -- subscriber authenticated as alice goes on with the others.
      assert.is_true(alice:subscribe("app:news", function() end))
      fails("^NOPERM", "redis", alice:subscribe("forbidden", function() end))
      assert.equal(1, admin:publish("app:news", "x"))
    end)
  end)

  it("fails fast while Redis is down, then reconnects and subscribes again", function()
    with_redis(nil, function(r)
      local log, on_status, last = recorder()
      local c = connect { url = r.url, on_status = on_status, backoff_max = 0.3 }
      local got = {}
      local function into(tag) return function(_, m) got[#got + 1] = tag .. " " .. m end end
      assert.is_true(c:subscribe("news", into("sub")))
      assert.is_true(c:psubscribe("n?ws", into("psub")))
      assert.is_true(c:ssubscribe("shard", into("ssub")))
      assert.equal("up", last("subscriber"))
      local late = connect { url = r.url, backoff_max = 0.3 }

      r:stop("KILL")
      wait_for("the subscriber to notice", 5, function() return last("subscriber") == "down" end)
      local t0 = core.now()
      fails(".", "connection", c:call("PING")) -- finds the command connection gone
      assert.same({ nil, "not connected", "connection" }, { c:call("PING") })
      assert.is_true(core.now() - t0 < 0.5, "failing took " .. (core.now() - t0) .. " s")
      assert.same({ nil, "not connected", "connection" }, { c:publish("news", "lost") })
      -- a client's first subscription, made while Redis is away: made
      -- when it is back
      fails("^connect to 127.0.0.1:%d+ failed", "connection", late:subscribe("later", into("late")))

      r:start() -- same port, empty
      wait_for("both connections back", 10, function()
        return last("commands") == "up" and last("subscriber") == "up"
      end)
      assert.equal(1, numsub(r.port, "news"))
      wait_for("the late subscription", 5, function() return numsub(r.port, "later") == 1 end)
      local pub = connect(r.url)
      assert.equal(1, pub:publish("later", "at last"))
      assert.equal(2, pub:publish("news", "back")) -- the channel and the pattern
      assert.equal(1, pub:spublish("shard", "back"))
      wait_for("4 messages", 5, function() return #got == 4 end)
      table.sort(got)
      assert.same({ "late at last", "psub back", "ssub back", "sub back" }, got)
      assert.equal("PONG", c:call("PING"))
      assert.matches("down subscriber: ", table.concat(log, "\n"))
    end)
  end)

  it("times out, finds a silent subscriber out with a PING, and recovers", function()
    with_redis(nil, function(r)
      local log, on_status, last = recorder()
      local c = connect { url = r.url, on_status = on_status, timeout = 0.3, connect_timeout = 0.3,
        ping_interval = 0.2, backoff_max = 0.2 }
      local got = {}
      assert.is_true(c:subscribe("news", function(_, m) got[#got + 1] = m end))

      r.h:kill("STOP") -- hung, or a network that drops everything: no FIN
      local t0 = core.now()
      local ok2, err2 = pcall(function()
        assert.same({ nil, "timeout", "connection" }, { c:call("PING") })
        assert.is_true(core.now() - t0 < 1)
        wait_for("the subscriber to notice", 3, function() return last("subscriber") == "down" end)
      end)
      r.h:kill("CONT") -- whatever happened above
      assert(ok2, err2)
      assert.matches("down subscriber: no answer to PING", table.concat(log, "\n"))

      wait_for("both back", 10, function() return last("commands") == "up" and last("subscriber") == "up" end)
      assert.equal(1, connect(r.url):publish("news", "awake"))
      wait_for("the message", 5, function() return got[#got] == "awake" end)
    end)
  end)

  it("verifies the server for rediss:// URLs", function()
    local c = certs.generate()
    local ok, err = pcall(with_redis, { tls = c }, function(r)
      local cl = connect { url = r.url, tls = { ca = c.ca } }
      assert.equal("OK", cl:call("SET", "over", "tls"))
      assert.equal("tls", cl:call("GET", "over"))
      local got
      assert.is_true(cl:subscribe("secure", function(_, m) got = m end))
      assert.equal(1, cl:publish("secure", "hush"))
      wait_for("the message", 5, function() return got == "hush" end)

      fails("^TLS handshake failed", nil, redis.connect { url = r.url, tls = { ca = c.other_ca } })
      fails("^TLS handshake failed", nil,
        redis.connect { url = r.url, tls = { ca = c.ca, servername = "wrong.example" } })
      local unverified = connect { url = r.url, tls = { verify = false } }
      assert.equal("tls", unverified:call("GET", "over"))
      -- plain RESP to the TLS port: an error, not a hang
      fails("^no answer to PING", nil, redis.connect { url = "redis://127.0.0.1:" .. r.tls_port, connect_timeout = 1 })
    end)
    c.cleanup()
    assert(ok, err)
  end)
end)

-- A Redis impostor on a duplex listening socket: it answers PING (unless
-- mute), and any other command with answer(sock), which writes what it
-- likes and returns "close" to hang up.
local function fake_redis(answer, mute)
  local listener = assert(core.listen { host = "127.0.0.1", port = 0 })
  local _, port = listener:address()
  local fake = { url = "redis://127.0.0.1:" .. port, accepted = 0, socks = {} }
  local function serve(sock)
    local parser = resp.parser()
    while true do
      local data = sock:read(nil, 30)
      if not data then return end
      parser:feed(data)
      for cmd in function() return parser:next() end do
        if cmd[1] ~= "PING" or mute then
          if answer(sock, cmd) == "close" then return sock:close() end
        else
          sock:write("+PONG\r\n")
        end
      end
    end
  end
  core.spawn(function()
    while true do
      local sock = listener:accept()
      if not sock then return end
      fake.accepted = fake.accepted + 1
      fake.socks[#fake.socks + 1] = sock
      core.spawn(serve, sock)
    end
  end)
  function fake.close()
    listener:close()
    for _, s in ipairs(fake.socks) do s:close() end
  end
  return fake
end

local function writes(bytes) return function(sock) sock:write(bytes) end end

describe("duplex.redis.connect against a hostile server", function()
  local HOSTILE = {
    { "garbage", writes("%%% not RESP %%%\r\n"), "^bad reply: protocol error" },
    { "a huge bulk length", writes("$999999999999\r\n"),
      "^bad reply: bulk string of 999999999999 bytes, over max_reply" },
    { "a line that never ends", writes(string.rep("+", 70000)), "^bad reply: a reply line longer than 64 KiB" },
    { "an array past max_reply", writes("*100\r\n" .. string.rep("$60000\r\n" .. ("x"):rep(60000) .. "\r\n", 100)),
      "^reply larger than max_reply %(1048576 bytes%)" },
    { "a close in the middle of a reply", function(sock)
      sock:write("$100\r\nonly a part")
      return "close"
    end, "^connection closed by the server" },
    { "silence", function() end, "^timeout$" },
  }

  for _, case in ipairs(HOSTILE) do
    local name, answer, want = case[1], case[2], case[3]
    it("gives an error for " .. name .. ", and reconnects", function()
      run(function()
        local fake = fake_redis(answer)
        local _, on_status, last = recorder()
        local memory = collectgarbage("count")
        local c = connect { url = fake.url, timeout = 0.3, max_reply = 1 << 20, backoff_min = 0.01,
          backoff_max = 0.05, on_status = on_status }
        for round = 1, 2 do
          local t0 = core.now()
          fails(want, "connection", c:call("GET", "x"))
          assert.is_true(core.now() - t0 < 2, "took " .. (core.now() - t0) .. " s")
          wait_for("a new connection", 5, function() return fake.accepted > round and last("commands") == "up" end)
        end
        assert.is_true(collectgarbage("count") - memory < 32 * 1024, "memory grew by more than 32 MiB")
        fake.close()
      end)
    end)
  end

  it("drops a connection that answers more than it was asked", function()
    run(function()
      local fake = fake_redis(writes("+one\r\n+two\r\n"))
      local log, on_status = recorder()
      local c = connect { url = fake.url, backoff_min = 0.01, on_status = on_status }
      assert.equal("one", c:call("GET", "x"))
      wait_for("the connection dropped", 5, function() return fake.accepted == 2 end)
      assert.matches("down commands: a reply to no command", table.concat(log, "\n"))
      fake.close()
    end)
  end)

  it("gives up connecting to a server that never answers, within connect_timeout", function()
    run(function()
      local fake = fake_redis(function() end, true)
      local t0 = core.now()
      fails("^no answer to PING: timeout$", nil, redis.connect { url = fake.url, connect_timeout = 0.3 })
      assert.is_true(core.now() - t0 < 1)
      fake.close()
    end)
  end)
end)
