-- A real browser: headless Chromium (Debian's /usr/bin/chromium) driven by
-- playwright-core (interop/browser_test.js) against the chat example and
-- the echo example. A missing Chromium fails the spec: scripts/deps installs
-- it.
local proc = require "support.proc"
local peers = require "support.peers"

-- Start an example server; returns its handle and the URL it printed.
local function start(argv, pattern)
  local h = proc.spawn(argv, {cwd = peers.root, limit = 120})
  local line, why = h:read_line(15)
  local url = line and line:match(pattern)
  if not url then
    local out = h:output()
    h:cleanup()
    error(table.concat(argv, " ") .. " did not print its URL (" .. tostring(line or why) .. "): " .. out, 2)
  end
  return h, url
end

local browser = peers.browser

describe("headless Chromium", function()
  before_each(peers.need_browser)
  teardown(proc.killall)

  it("chats: two tabs join one room, each sees the other's message, and a dropped tab recovers", function()
    local h, url = start({"lua5.4", "examples/chat/server.lua", "--port", "0"},
      "^chat server: open (http://127%.0%.0%.1:%d+/) in a browser$")
    local res = browser("chat", url, { "--recover" })
    assert.equal(200, res.status)
    assert.equal("open", res.state)
    assert.is_nil(res.page_errors)
    local function has(log, line)
      for _, l in ipairs(log) do if l == line then return true end end
      return false
    end
    assert.is_true(has(res.logs.ann, "ben: hi ann, ben here 😀"), table.concat(res.logs.ann, "\n"))
    assert.is_true(has(res.logs.ben, "ann: hello from ann — ✓"), table.concat(res.logs.ben, "\n"))
    assert.matches("^%* you are ann in #browsers", res.logs.ann[1])
    assert.same({ "ann: hello from ann — ✓" }, res.own_marked)
    -- The dropped tab came back with its position and got ben's line once.
    assert.equal(1, res.reconnected.copies)
    assert.same({ "* back: 1 missed line(s) above" }, res.reconnected.back)
    assert.equal("?room=browsers", res.reconnected.url)
    h:kill("TERM")
    assert.equal(0, h:wait(10), h:output())
    h:cleanup()
  end)

  -- server-side permessage-deflate settings, each with what the browser
  -- must see in ws.extensions
  local variants = {
    { name = "" },
    { name = " with --deflate", args = { "--deflate" }, ext = "server_no_context_takeover" },
    { name = " with --deflate-takeover --deflate-window 10", args = { "--deflate-takeover", "--deflate-window", "10" },
      ext = "server_max_window_bits=10", no_ext = "server_no_context_takeover" },
  }
  for _, variant in ipairs(variants) do
    local deflate = variant.args ~= nil
    it("uses its own WebSocket API against the echo server" .. variant.name, function()
      local argv = {"lua5.4", "examples/echo.lua", "--port", "0", "--max-size", tostring(2 << 20)}
      for _, a in ipairs(variant.args or {}) do argv[#argv + 1] = a end
      local h, url = start(argv, "^echo server listening on (ws://127%.0%.0%.1:%d+/)$")
      local res = browser("echo", url, {"--oversize", tostring(3 << 20)})
      assert.is_true(res.text_ok)
      assert.is_true(res.binary_ok)
      assert.is_true(res.big_binary_ok)
      assert.is_true(res.big_text_ok)
      -- Chromium offers permessage-deflate on its own.
      if deflate then
        assert.matches("^permessage%-deflate", res.extensions)
        assert.truthy(res.extensions:find(variant.ext, 1, true), res.extensions)
        if variant.no_ext then assert.falsy(res.extensions:find(variant.no_ext, 1, true), res.extensions) end
      else
        assert.equal("", res.extensions)
      end
      -- Our close, answered by the server.
      assert.equal(4000, res.close.code)
      assert.is_true(res.close.clean)
      -- The server's close, with its code and reason. The server fails the
      -- connection (RFC 6455 §7.1.7: it does not wait for the browser's
      -- close reply), so whether Chromium calls it clean depends on whether
      -- it had finished sending the oversized frame and its reply by then.
      assert.equal(1009, res.oversize_close.code)
      assert.equal("message too big", res.oversize_close.reason)
      h:kill("TERM")
      assert.equal(0, h:wait(10), h:output())
      h:cleanup()
    end)
  end
end)
