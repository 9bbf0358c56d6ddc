-- The event loop: coroutines, sleep, park/wake, timers, errors, signals,
-- processes. Every `it` runs the loop to completion under a time limit.
local core = require "duplex.core"

local function run(fn, limit) return require("support.loop").run(fn, limit or 10) end

describe("duplex.core loop", function()
  after_each(function()
    core.on_error(nil)
  end)

  it("starts spawned coroutines on the next pass, in order, with their arguments", function()
    local log = {}
    core.spawn(function(a, b) log[#log + 1] = "a" .. a .. b end, 1, 2)
    core.spawn(function() log[#log + 1] = "b" end)
    assert.same({}, log) -- not started yet
    assert.is_true(core.run())
    assert.same({"a12", "b"}, log)
  end)

  it("returns from run when nothing is left, and run can be called again", function()
    assert.is_true(core.run())
    local n = 0
    core.spawn(function() n = n + 1 end)
    assert.is_true(core.run())
    assert.equal(1, n)
  end)

  it("orders sleeping coroutines by their deadline", function()
    local log = {}
    for _, d in ipairs({0.06, 0.02, 0.04, 0}) do
      core.spawn(function()
        core.sleep(d)
        log[#log + 1] = d
      end)
    end
    local t0 = core.now()
    core.run()
    assert.same({0, 0.02, 0.04, 0.06}, log)
    assert.is_true(core.now() - t0 >= 0.06)
  end)

  it("lets coroutine.yield() hand over to the other coroutines", function()
    local log = {}
    for _, name in ipairs({"x", "y"}) do
      core.spawn(function()
        for i = 1, 3 do
          log[#log + 1] = name .. i
          coroutine.yield()
        end
      end)
    end
    core.run()
    assert.same({"x1", "y1", "x2", "y2", "x3", "y3"}, log)
  end)

  it("parks until woken, with the values given to wake", function()
    local got
    local parked = core.spawn(function() got = table.pack(core.park()) end)
    core.spawn(function()
      core.sleep(0.01)
      assert.is_true(core.wake(parked, "a", nil, 3))
      assert.is_false(core.wake(parked, "again")) -- no longer parked
    end)
    core.run()
    assert.equal(3, got.n)
    assert.same({"a", nil, 3}, {got[1], got[2], got[3]})
  end)

  it("ends a park with a timeout", function()
    local a, b
    run(function() a, b = core.park(0.02) end)
    assert.is_nil(a)
    assert.equal("timeout", b)
  end)

  it("does not wake coroutines that are not parked", function()
    run(function()
      local sleeper = core.spawn(function() core.sleep(0.05) end)
      core.sleep(0.01)
      assert.is_false(core.wake(sleeper))
      assert.is_false(core.wake(coroutine.create(function() end)))
    end)
  end)

  it("fires timers in deadline order, repeats them and cancels them", function()
    local log = {}
    core.timer(0.03, function() log[#log + 1] = "c" end)
    core.timer(0.01, function() log[#log + 1] = "a" end)
    local cancelled = core.timer(0.02, function() log[#log + 1] = "never" end)
    core.timer(0.02, function() log[#log + 1] = "b" end)
    assert.is_true(cancelled:cancel())
    assert.is_false(cancelled:cancel())
    local n = 0
    core.timer(0, function(t)
      n = n + 1
      if n == 3 then t:cancel() end
    end, 0.005)
    core.run()
    assert.same({"a", "b", "c"}, log)
    assert.equal(3, n)
    assert.equal(0, core.loop_stats().timers)
  end)

  it("runs timer functions in loop coroutines that may block", function()
    local done = false
    core.timer(0, function()
      core.sleep(0.01)
      done = true
    end)
    core.run()
    assert.is_true(done)
  end)

  it("reports a failing coroutine to on_error and keeps running the others", function()
    local reports, finished = {}, false
    core.on_error(function(err, trace, co)
      reports[#reports + 1] = {err = err, trace = trace, co = co}
    end)
    local bad = core.spawn(function()
      core.sleep(0.01)
      error({code = 42})
    end)
    core.spawn(function()
      core.sleep(0.01)
      error("plain failure")
    end)
    core.spawn(function()
      core.sleep(0.03)
      finished = true
    end)
    core.run()
    assert.is_true(finished)
    assert.equal(2, #reports)
    assert.same({code = 42}, reports[1].err)
    assert.equal(bad, reports[1].co)
    assert.matches("plain failure", reports[2].err)
    assert.matches("stack traceback", reports[2].trace)
    assert.equal(0, core.loop_stats().coroutines)
  end)

  it("closes to-be-closed variables of a failing coroutine", function()
    core.on_error(function() end)
    local closed = false
    core.spawn(function()
      local _ <close> = setmetatable({}, {__close = function() closed = true end})
      core.sleep(0)
      error("boom")
    end)
    core.run()
    assert.is_true(closed)
  end)

  describe("at_end", function()
    it("goes on with its function in the same coroutine, with the argument and how the first ended", function()
      local log, co1, co2 = {}, nil, nil
      local task = core.spawn(function()
        co1 = coroutine.running()
        core.at_end(function(arg, ok, err)
          co2 = coroutine.running()
          log[#log + 1] = { arg, ok, err }
          core.sleep(0.01) -- may wait like any loop coroutine
          log[#log + 1] = "slept"
        end, "arg")
        core.sleep(0)
        return "ignored"
      end)
      assert.is_true(core.run())
      assert.same({ { "arg", true }, "slept" }, log)
      assert.equal(task, co1)
      assert.equal(co1, co2)
      assert.equal(0, core.loop_stats().coroutines)
    end)

    it("takes the error, with the failed function's traceback, instead of on_error", function()
      local reported, got = false, nil
      core.on_error(function() reported = true end)
      local function fails_here() error("boom") end
      core.spawn(function()
        core.at_end(function(_, ok, err) got = { ok, err } end)
        fails_here()
      end)
      core.run()
      assert.is_false(reported)
      assert.is_false(got[1])
      assert.matches("boom", got[2])
      assert.matches("stack traceback:", got[2], 1, true)
      assert.matches("fails_here", got[2], 1, true)
      -- an error that is not a string comes as it was raised
      local raised = {}
      core.spawn(function()
        core.at_end(function(_, ok, err) got = { ok, err } end)
        error(raised)
      end)
      core.run()
      assert.equal(raised, got[2])
    end)

    it("starts its function on an empty stack: frames unwound, to-be-closed variables closed", function()
      local closed, depth_at_end
      local function deep(n)
        if n == 0 then
          local _ <close> = setmetatable({}, { __close = function() closed = true end })
          core.sleep(0)
          error("deep")
        end
        return deep(n - 1) + 1 -- not a tail call: 200 frames
      end
      core.spawn(function()
        core.at_end(function()
          assert.is_true(closed)
          depth_at_end = 0
          while debug.getinfo(depth_at_end + 1, "l") do depth_at_end = depth_at_end + 1 end
        end)
        return deep(200)
      end)
      core.run()
      assert.is_true(closed)
      assert.is_true(depth_at_end < 5, "frames below at_end's function: " .. tostring(depth_at_end))
    end)

    it("chains: its function may set the next one; nil takes it back", function()
      local log = {}
      core.spawn(function()
        core.at_end(function(n)
          log[#log + 1] = n
          core.at_end(function(m) log[#log + 1] = m end, n + 1)
        end, 1)
      end)
      core.spawn(function()
        core.at_end(function() log[#log + 1] = "not run" end)
        core.at_end(nil)
      end)
      core.run()
      assert.same({ 1, 2 }, log)
      assert.equal(0, core.loop_stats().coroutines)
    end)

    it("is for loop coroutines and takes a function", function()
      assert.error_matches(function() core.at_end(print) end, "must be called from a coroutine started by duplex.spawn")
      local err
      core.spawn(function() err = select(2, pcall(core.at_end, "not a function")) end)
      core.run()
      assert.matches("function expected", err)
    end)
  end)

  it("survives an error in the on_error handler", function()
    core.on_error(function() error("handler broke") end)
    local after = false
    core.spawn(function() error("first") end)
    core.spawn(function()
      core.sleep(0.01)
      after = true
    end)
    core.run()
    assert.is_true(after)
  end)

  it("refuses to block outside a loop coroutine", function()
    local pattern = "must be called from a coroutine started by duplex.spawn"
    assert.error_matches(function() core.sleep(0) end, pattern)
    assert.error_matches(function() core.park() end, pattern)
    local co = coroutine.create(function() core.sleep(0) end)
    local ok, err = coroutine.resume(co)
    assert.is_false(ok)
    assert.matches(pattern, err)
  end)

  it("stops on core.stop() and resumes where it left off", function()
    local n = 0
    core.spawn(function()
      for _ = 1, 3 do
        n = n + 1
        if n == 1 then core.stop() end
        core.sleep(0)
      end
    end)
    core.run()
    assert.equal(1, n)
    core.run()
    assert.equal(3, n)
  end)

  it("releases finished coroutines and abandoned parked ones", function()
    local weak = setmetatable({}, {__mode = "k"})
    for _ = 1, 10 do weak[core.spawn(function() core.sleep(0) end)] = true end
    for _ = 1, 10 do weak[core.spawn(function() core.park() end)] = true end
    core.run()
    collectgarbage()
    collectgarbage()
    assert.is_nil(next(weak))
    assert.same({coroutines = 0, timers = 0, ready = 0, waiting = 0},
      {coroutines = core.loop_stats().coroutines, timers = core.loop_stats().timers,
       ready = core.loop_stats().ready, waiting = core.loop_stats().waiting})
  end)

  it("reports a coroutine resumed behind the loop's back", function()
    core.on_error(function() end)
    local co = core.spawn(function() core.sleep(0.05) end)
    core.spawn(function()
      core.sleep(0)
      local ok, err = coroutine.resume(co)
      assert.is_false(ok)
      assert.matches("resumed outside the loop", err)
    end)
    core.run()
    assert.equal(0, core.loop_stats().coroutines)
  end)

  it("delivers signals to a loop coroutine and restores the default", function()
    local got = {}
    core.signal("HUP", function(name)
      got[#got + 1] = name
      core.sleep(0) -- handlers run in loop coroutines
    end)
    run(function()
      assert(core.kill(core.getpid(), "HUP"))
      for _ = 1, 100 do
        if #got > 0 then break end
        core.sleep(0.01)
      end
    end)
    core.signal("HUP", nil)
    assert.same({"HUP"}, got)
    assert.error_matches(function() core.signal("KILL", function() end) end, "expected")
  end)

  it("forks a child with its own loop, and waits for it", function()
    local pid = assert(core.fork())
    if pid == 0 then
      -- the child's loop must work on its own
      local ok = false
      core.spawn(function()
        core.sleep(0.01)
        ok = true
      end)
      core.run()
      os.exit(ok and 7 or 1, false)
    end
    assert.is_true(pid > 0)
    local got, how, code
    run(function()
      for _ = 1, 500 do
        got, how, code = core.waitpid(pid, true)
        if got ~= 0 then break end
        core.sleep(0.01)
      end
    end)
    assert.equal(pid, got)
    assert.equal("exited", how)
    assert.equal(7, code)
  end)

  it("validates its arguments", function()
    assert.error_matches(function() core.timer(-1, function() end) end, ">= 0")
    assert.error_matches(function() core.timer(1, "x") end, "function expected")
    assert.error_matches(function() core.spawn(42) end, "function expected")
    run(function()
      assert.error_matches(function() core.sleep(-1) end, ">= 0")
      assert.error_matches(function() core.park(0 / 0) end, ">= 0")
    end)
  end)
  it("lets go of a name lookup whose coroutine is resumed or closed outside the loop", function()
    for _, how in ipairs { "resume", "close" } do
      run(function()
        local co
        core.spawn(function()
          co = coroutine.running()
          core.getaddrinfo("localhost", 80) -- a lookup in a worker thread
        end)
        core.sleep(0) -- it is waiting now
        if how == "resume" then
          local ok, err = coroutine.resume(co)
          assert.is_false(ok)
          assert.matches("resumed outside the loop", err)
        else
          assert.is_true(coroutine.close(co))
        end
        -- the coroutine stays referenced (and with it the lookup's state)
        -- while everything else of its task may be collected
        collectgarbage()
        collectgarbage()
        core.sleep(0.3) -- the lookup ends meanwhile and must wake nobody
        assert.equal("dead", coroutine.status(co))
        -- our reference goes, so that the collection can take the coroutine (luacheck sees no later read)
        co = nil -- luacheck: ignore 311
        collectgarbage()
        -- the loop goes on serving lookups
        assert.is_table(core.getaddrinfo("localhost", 80))
      end)
    end
  end)
end)
