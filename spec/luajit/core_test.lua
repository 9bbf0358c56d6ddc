-- duplex.core built against LuaJIT (make luajit), run by LuaJIT itself:
--   luajit spec/luajit/core_test.lua [stress]
-- Every check prints "ok NAME" or "not ok NAME: why", then a last line
-- "done PASSED/TOTAL"; the exit status is 1 when any check failed.
-- spec/luajit_spec.lua runs it (under lua5.4/busted, like every spec) and
-- names the checks it expects. "stress" runs everything with the collector
-- going all the time, so a user value kept in the wrong place (the fenv
-- table of l_compat.h) is collected under the engine's feet and shows.
-- The spec also runs it with lua5.4 against the 5.4 build
-- (DUPLEX_CORE_CPATH=build/?.so): both builds must behave the same.
-- Written in Lua 5.1 (LuaJIT): no integer operators, no string.pack.
local have_bit, bit = pcall(require, "bit")
if not have_bit then -- Lua 5.4 has operators instead; load() keeps them from LuaJIT's parser
  bit = load("return { band = function(a, b) return a & b end, bxor = function(a, b) return a ~ b end }")()
end
local luajit = rawget(_G, "jit") ~= nil

local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.cpath = os.getenv("DUPLEX_CORE_CPATH") or (here .. "/../../build/luajit/?.so")

local stress = arg[1] == "stress"
if stress then
  -- a new cycle as soon as one ends, and each step does a lot of work
  collectgarbage("setpause", 0)
  collectgarbage("setstepmul", 1000)
end

local core

local passed, total = 0, 0

local function check(name, fn)
  total = total + 1
  local ok, err = pcall(fn)
  if ok then
    passed = passed + 1
    print("ok " .. name)
  else
    print("not ok " .. name .. ": " .. tostring(err):gsub("\n", " "))
  end
  io.stdout:flush()
end

local function fail(msg, level) error(msg, (level or 1) + 1) end

local function show(v)
  if type(v) == "string" then
    if #v > 60 then v = v:sub(1, 60) .. "..." end
    return string.format("%q", v)
  end
  return tostring(v)
end

local function eq(want, got, what)
  if want ~= got then fail((what or "value") .. ": expected " .. show(want) .. ", got " .. show(got), 2) end
end

local function truthy(v, what)
  if not v then fail((what or "condition") .. " does not hold", 2) end
  return v
end

-- f() must raise an error; its message must contain `find` when given.
local function raises(f, find, what)
  local ok, err = pcall(f)
  if ok then fail((what or "call") .. " did not raise", 2) end
  if find and not tostring(err):find(find, 1, true) then
    fail((what or "call") .. ": error " .. show(tostring(err)) .. " lacks " .. show(find), 2)
  end
end

-- Lists compared element by element (values only, no nesting).
local function same_list(want, got, what)
  eq(#want, #got, (what or "list") .. " length")
  for i = 1, #want do eq(want[i], got[i], (what or "list") .. "[" .. i .. "]") end
end

local function unhex(h)
  return (h:gsub("%s", ""):gsub("..", function(x) return string.char(tonumber(x, 16)) end))
end

-- Frames built here, not by the C encoder (RFC 6455 §5.2).
local OPS = { cont = 0, text = 1, binary = 2, close = 8, ping = 9, pong = 10 }
local KEY = "\55\250\33\61" -- 37 fa 21 3d, the RFC's example key

local function xor_mask(s, key)
  local out = {}
  for i = 1, #s do
    out[i] = string.char(bit.bxor(s:byte(i), key:byte((i - 1) % 4 + 1)))
  end
  return table.concat(out)
end

local function be(n, bytes)
  local out = {}
  for i = bytes, 1, -1 do
    out[i] = string.char(n % 256)
    n = math.floor(n / 256)
  end
  return table.concat(out)
end

local function frame(f)
  local payload = f.payload or ""
  local op = type(f.op) == "number" and f.op or OPS[f.op or "text"]
  local fin = f.fin == nil or f.fin
  local b1 = (fin and 0x80 or 0) + (f.rsv or 0) * 16 + op
  local m = f.key and 0x80 or 0
  local n, hdr = #payload
  if n < 126 then
    hdr = string.char(b1, m + n)
  elseif n <= 0xffff then
    hdr = string.char(b1, m + 126) .. be(n, 2)
  else
    hdr = string.char(b1, m + 127) .. be(n, 8)
  end
  if f.key then return hdr .. f.key .. xor_mask(payload, f.key) end
  return hdr .. payload
end

local function masked(f)
  f.key = f.key or KEY
  return frame(f)
end

local function close_payload(code, reason) return be(code, 2) .. (reason or "") end

local function events(e)
  local out = {}
  while true do
    local ev = { e:next() }
    if #ev == 0 then return out end
    out[#out + 1] = ev
  end
end

local function feed_events(e, bytes)
  e:feed(bytes)
  return events(e)
end

-- Bytes that compress well and bytes that do not, mixed.
local function sample(n, seed)
  local words = { "alpha ", "beta ", "gamma ", "delta ", "epsilon " }
  local out, len, x = {}, 0, seed or 1
  while len < n do
    x = (x * 1103515245 + 12345) % 2147483648
    local w = x % 7 == 0 and string.char(x % 256, math.floor(x / 256) % 256) or words[x % 5 + 1]
    out[#out + 1] = w
    len = len + #w
  end
  return table.concat(out):sub(1, n)
end

-- The handshake request of RFC 6455 §1.2, with a deflate offer.
local RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
local RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
local REQUEST = table.concat({
  "GET /chat?room=1 HTTP/1.1",
  "Host: server.example.com",
  "Upgrade: websocket",
  "Connection: Upgrade",
  "Sec-WebSocket-Key: " .. RFC_KEY,
  "Origin: http://example.com",
  "Sec-WebSocket-Protocol: chat, superchat",
  "Sec-WebSocket-Version: 13",
  "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits, x-foo; a=\"b\"",
}, "\r\n") .. "\r\n\r\n"

local function with_header(name, value)
  local out = {}
  for line in REQUEST:gmatch("(.-)\r\n") do
    local n = line:match("^([^:]+):")
    if n and n:lower() == name:lower() then
      if value then out[#out + 1] = n .. ": " .. value end
    elseif line ~= "" then
      out[#out + 1] = line
    end
  end
  return table.concat(out, "\r\n") .. "\r\n\r\n"
end

---------------------------------------------------------------------------

check("module loads", function()
  core = require "duplex.core"
  eq("table", type(core))
  assert(type(core.version) == "string" and core.version:match("^%d+%.%d+%.%d+$"), "core.version")
  for _, f in ipairs { "engine", "encode_frame", "close_code_valid", "handshake_server", "handshake_client",
                       "handshake_response", "http_response", "accept_key", "pmd_offer", "pmd_accept",
                       "pmd_check_response", "pmd_attach", "pmd_codec", "utf8_valid", "mask", "random",
                       "base64", "now" } do
    eq("function", type(core[f]), "core." .. f)
  end
  -- the event loop needs lua_yieldk: only in the 5.4 build
  eq(luajit and "nil" or "function", type(core.run), "core.run")
  eq(core, require "duplex.core", "second require")
end)

check("now is a monotonic clock in seconds", function()
  local t0 = core.now()
  eq("number", type(t0))
  truthy(t0 > 0, "now() > 0")
  local prev, t = t0
  local deadline = os.clock() + 5
  repeat
    t = core.now()
    truthy(t >= prev, "never goes back")
    prev = t
  until t > t0 + 0.02 or os.clock() > deadline
  truthy(t > t0 + 0.02, "advances")
  truthy(t < t0 + 5, "in seconds, not milliseconds")
end)

check("engine round-trips text and binary at every length encoding", function()
  local c, s = core.engine { role = "client" }, core.engine { role = "server" }
  for _, n in ipairs { 0, 1, 125, 126, 200, 65535, 65536, 70 * 1024, 2 ^ 20 } do
    for _, kind in ipairs { "text", "binary" } do
      local msg = kind == "text" and string.rep("z", n) or string.rep("\0\255", n):sub(1, n)
      truthy(c:send(msg, kind), "client send")
      local wire = c:data_to_send()
      local len7 = bit.band(wire:byte(2), 0x7f)
      eq(n < 126 and n or n <= 0xffff and 126 or 127, len7, n .. " B length field")
      eq(0x80, bit.band(wire:byte(2), 0x80), "client frames are masked")
      s:feed(wire)
      local ev = { s:next() }
      eq(kind, ev[1], n .. " B kind")
      eq(msg, ev[2], n .. " B message")
      truthy(s:send(msg, kind))
      wire = s:data_to_send()
      eq(0, bit.band(wire:byte(2), 0x80), "server frames are not masked")
      ev = feed_events(c, wire)
      eq(1, #ev)
      eq(msg, ev[1][2], n .. " B message to the client")
    end
  end
  -- the RFC's own bytes: 200 B needs a 16-bit length, 70 KB a 64-bit one
  s:send(string.rep("\171", 200), "binary")
  eq(unhex "82 7e 00 c8", s:data_to_send():sub(1, 4))
  s:send(string.rep("x", 70000), "binary")
  eq(unhex "82 7f 00 00 00 00 00 01 11 70", s:data_to_send():sub(1, 10))
  -- the RFC 6455 §5.7 examples
  eq("\129\5Hello", (function() s:send("Hello") return s:data_to_send() end)())
  local ev = feed_events(core.engine { role = "server" }, unhex "81 85 37 fa 21 3d 7f 9f 4d 51 58")
  same_list({ "text", "Hello" }, ev[1])
  ev = feed_events(core.engine { role = "client" }, unhex "82 7f 00 00 00 00 00 01 00 00" .. string.rep("\1", 65536))
  eq(65536, #ev[1][2])
end)

check("engine delivers frames fed byte by byte and several per read", function()
  local bytes = masked { op = "text", payload = "one" } .. masked { op = "binary", payload = "\0\1" }
    .. masked { op = "text", payload = string.rep("y", 300) }
  local s = core.engine { role = "server" }
  local got = {}
  for i = 1, #bytes do
    s:feed(bytes:sub(i, i))
    for _, ev in ipairs(events(s)) do got[#got + 1] = ev end
  end
  eq(3, #got)
  same_list({ "text", "one" }, got[1])
  same_list({ "binary", "\0\1" }, got[2])
  eq(string.rep("y", 300), got[3][2])
  s = core.engine { role = "server" }
  s:feed(bytes)
  eq(true, s:has_input()) -- nothing is parsed before it is asked for
  eq(3, #events(s))
  eq(false, s:has_input())
  -- each engine has its own input
  local a, b = core.engine { role = "server" }, core.engine { role = "server" }
  a:feed(masked { op = "text", payload = "A" })
  b:feed(masked { op = "text", payload = "B" })
  same_list({ "text", "B" }, { b:next() })
  same_list({ "text", "A" }, { a:next() })
end)

check("engine fragmented messages", function()
  local c, s = core.engine { role = "client" }, core.engine { role = "server" }
  truthy(c:send("Hel", "text", false))
  truthy(c:ping("mid"))
  local r, err = c:send("x", "binary")
  eq(nil, r)
  eq("fragment out of sequence", err)
  truthy(c:send("lo", "continuation", true))
  local ev = feed_events(s, c:data_to_send())
  eq(2, #ev)
  same_list({ "ping", "mid" }, ev[1])
  same_list({ "text", "Hello" }, ev[2])
  -- hand-made fragments with control frames between them
  ev = feed_events(core.engine { role = "server" }, masked { op = "text", payload = "\240\159", fin = false }
    .. masked { op = "pong", payload = "" } .. masked { op = "cont", payload = "\152\128!" })
  eq(2, #ev)
  same_list({ "pong", "" }, ev[1])
  same_list({ "text", "\240\159\152\128!" }, ev[2])
  -- streaming: pieces with kind, first and fin
  local st = core.engine { role = "server", streaming = true }
  ev = feed_events(st, masked { op = "binary", payload = "ab", fin = false } .. masked { op = "cont", payload = "cd" })
  eq(2, #ev)
  same_list({ "fragment", "ab", "binary", true, false }, ev[1])
  same_list({ "fragment", "cd", "binary", false, true }, ev[2])
end)

check("engine ping and auto-pong", function()
  local s = core.engine { role = "server" }
  local ev = feed_events(s, masked { op = "ping", payload = "beat" })
  same_list({ "ping", "beat" }, ev[1])
  eq("\138\4beat", s:data_to_send())
  local c = core.engine { role = "client" }
  ev = feed_events(c, "\138\4beat")
  same_list({ "pong", "beat" }, ev[1])
  local quiet = core.engine { role = "server", auto_pong = false }
  feed_events(quiet, masked { op = "ping", payload = "beat" })
  eq("", quiet:data_to_send())
  truthy(quiet:pong("beat"))
  eq("\138\4beat", quiet:data_to_send())
end)

check("engine close handshake with code and reason", function()
  local c, s = core.engine { role = "client" }, core.engine { role = "server" }
  truthy(s:close(1001, "going away"))
  eq("closing", s:state())
  local wire = s:data_to_send()
  eq("\136\12" .. close_payload(1001, "going away"), wire)
  local r, err = s:send("late")
  eq(nil, r)
  eq("connection is closing or closed", err)
  local ev = feed_events(c, wire)
  same_list({ "close", "going away", 1001, true }, ev[1])
  eq("closed", c:state())
  ev = feed_events(s, c:data_to_send())
  eq("close", ev[1][1])
  eq(1001, ev[1][3])
  eq(false, ev[1][4])
  eq("closed", s:state())
  eq("", s:data_to_send(), "no second close frame")
  -- an empty close frame reads as 1005
  ev = feed_events(core.engine { role = "server" }, masked { op = "close" })
  same_list({ "close", "", 1005, true }, ev[1])
  truthy(core.close_code_valid(1000))
  eq(false, core.close_code_valid(1005))
end)

-- The last event is an error with that code; the engine closed and queued a
-- close frame carrying it.
local function expect_error(role, bytes, code, find, opts)
  opts = opts or {}
  opts.role = role
  local e = core.engine(opts)
  local ev = feed_events(e, bytes)
  local last = truthy(ev[#ev], "an error event")
  eq("error", last[1])
  eq(code, last[3], "close code")
  if find then truthy(last[2]:find(find, 1, true), "message " .. show(last[2]) .. " has " .. show(find)) end
  eq("closed", e:state())
  local out = e:data_to_send()
  eq(0x88, out:byte(1), "a close frame is queued")
  local payload = role == "client" and xor_mask(out:sub(7), out:sub(3, 6)) or out:sub(3)
  eq(code, payload:byte(1) * 256 + payload:byte(2), "code in the close frame")
end

check("engine protocol errors: 1002", function()
  expect_error("server", frame { op = "text", payload = "x" }, 1002, "not masked")
  expect_error("client", masked { op = "text", payload = "x" }, 1002, "masked")
  expect_error("server", masked { op = 3, payload = "x" }, 1002, "reserved opcode")
  expect_error("server", masked { op = "text", payload = "x", rsv = 4 }, 1002, "reserved bits")
  expect_error("server", masked { op = "ping", payload = string.rep("a", 126) }, 1002, "too long")
  expect_error("server", masked { op = "cont", payload = "x" }, 1002, "continuation")
  expect_error("server", masked { op = "close", payload = close_payload(1005) }, 1002)
end)

check("engine invalid UTF-8: 1007", function()
  expect_error("server", masked { op = "text", payload = "\237\160\128" }, 1007)
  expect_error("server", masked { op = "text", payload = "ab\255", fin = false }, 1007)
  expect_error("server", masked { op = "text", payload = "\226\130" }, 1007, "ends inside")
  expect_error("server", masked { op = "close", payload = close_payload(1000, "\255") }, 1007)
  local ev = feed_events(core.engine { role = "server" }, masked { op = "binary", payload = "\255\254" })
  same_list({ "binary", "\255\254" }, ev[1])
end)

check("engine max_message and max_frame: 1009", function()
  expect_error("server", masked { op = "binary", payload = string.rep("a", 101) }, 1009, "too big",
    { max_message = 100 })
  expect_error("server", masked { op = "binary", payload = string.rep("a", 60), fin = false }
    .. masked { op = "cont", payload = string.rep("a", 60) }, 1009, "too big", { max_message = 100 })
  expect_error("server", masked { op = "binary", payload = string.rep("a", 11) }, 1009, "frame too big",
    { max_message = 100, max_frame = 10 })
  local ev = feed_events(core.engine { role = "server", max_message = 100 },
    masked { op = "binary", payload = string.rep("a", 100) })
  eq(100, #ev[1][2], "exactly the limit passes")
  -- a 2^40-byte frame fails on its header
  ev = feed_events(core.engine { role = "server" }, "\130\255" .. be(2 ^ 40, 8) .. KEY)
  eq(1009, ev[1][3])
end)

check("engine send errors and argument checks", function()
  local e = core.engine { role = "server" }
  local r, err = e:send("x", "continuation")
  eq(nil, r)
  eq("fragment out of sequence", err)
  raises(function() e:send({}) end)
  raises(function() e:send("x", "bogus") end)
  raises(function() e:ping(string.rep("p", 126)) end, "125")
  raises(function() e:close(1005) end)
  raises(function() e:close(1000, string.rep("r", 124)) end)
  raises(function() e:close(nil, "reason") end)
  raises(function() core.engine { role = "peer" } end)
  raises(function() core.engine() end)
  raises(function() core.engine { role = "client" }:send_raw("\129\0") end)
  e:release()
  raises(function() e:send("x") end, "released")
  truthy(tostring(e):find("released", 1, true))
  e:release() -- twice is harmless
  local s = core.engine { role = "server" }
  truthy(tostring(s):find("^duplex.engine %(server, open%)"))
  eq("server", s:role())
  s:send("hi")
  eq(4, s:pending())
  local st = s:stats()
  eq(1, st.frames_out)
  eq(1, st.messages_out)
  eq(false, st.deflate)
  s:data_to_send()
  s:shrink()
end)

check("encode_frame and send_raw", function()
  eq("\129\4news", core.encode_frame("news", "text"))
  eq(unhex "82 7e 00 c8", core.encode_frame(string.rep("b", 200), "binary"):sub(1, 4))
  eq("\137\1p", core.encode_frame("p", "ping"))
  eq("\1\1a", core.encode_frame("a", "text", false))
  raises(function() core.encode_frame(string.rep("p", 126), "ping") end)
  local frame_ = core.encode_frame("news", "text")
  local c = core.engine { role = "client" }
  for _ = 1, 3 do
    local s = core.engine { role = "server" }
    truthy(s:send_raw(frame_))
    same_list({ "text", "news" }, feed_events(c, s:data_to_send())[1])
  end
  -- compressed once for every connection without server context takeover
  local text = string.rep("the quick brown fox ", 200)
  local z = core.encode_frame(text, "text", true, 15)
  eq(0xc1, z:byte(1), "FIN + RSV1 + text")
  truthy(#z < #text / 4, "compressed")
  local dc = core.engine { role = "client" }
  core.pmd_attach(dc, "client", { server_no_context_takeover = true })
  same_list({ "text", text }, feed_events(dc, z)[1])
  raises(function() core.encode_frame("x", "text", true, 16) end)
  raises(function() core.encode_frame("x", "ping", true, 15) end)
end)

check("handshake_server parses a real upgrade request", function()
  local hs = core.handshake_server()
  local req = truthy(hs:feed(REQUEST .. "\129\5hello"), "a request")
  eq(true, req.websocket, "websocket")
  eq(true, req.upgrade)
  eq(nil, req.status)
  eq("GET", req.method)
  eq("/chat?room=1", req.target)
  eq("/chat", req.path)
  eq("room=1", req.raw_query)
  eq("1", req.query.room)
  eq("1.1", req.version)
  eq("server.example.com", req.host)
  eq("http://example.com", req.origin)
  eq(RFC_KEY, req.key)
  eq("13", req.headers["sec-websocket-version"])
  eq("websocket", req.headers.upgrade)
  same_list({ "chat", "superchat" }, req.protocols, "protocols")
  eq(2, #req.extensions)
  local pmd = req.extensions[1]
  eq("permessage-deflate", pmd.name)
  eq(true, pmd.params.client_max_window_bits)
  same_list({ "client_max_window_bits", true }, pmd.params_list[1])
  eq("x-foo", req.extensions[2].name)
  eq("b", req.extensions[2].params.a)
  eq("\129\5hello", hs:rest())
  raises(function() hs:feed("more") end, "already complete")
  -- byte by byte: nil until the last byte, then the same request
  hs = core.handshake_server()
  for i = 1, #REQUEST - 1 do
    local r = hs:feed(REQUEST:sub(i, i))
    if r ~= nil then fail("a request after " .. i .. " bytes") end
  end
  req = hs:feed(REQUEST:sub(-1))
  eq(RFC_KEY, req.key)
  eq("", hs:rest())
  truthy(tostring(hs):find("^duplex.handshake_server %(done%)"))
  hs:close()
  raises(function() hs:feed("x") end, "closed")
end)

check("handshake_server refuses bad requests", function()
  local function feed(data, opts) return core.handshake_server(opts):feed(data) end
  local cases = {
    { with_header("Sec-WebSocket-Key", nil), 400, "missing Sec-WebSocket-Key" },
    { with_header("Sec-WebSocket-Key", "hello"), 400, "invalid Sec-WebSocket-Key" },
    { with_header("Upgrade", nil), 400, "missing Upgrade: websocket" },
    { with_header("Host", nil), 400, "missing Host header" },
    { with_header("Sec-WebSocket-Version", "8"), 426, "unsupported Sec-WebSocket-Version: 8" },
    { with_header("Sec-WebSocket-Version", nil), 426, "missing Sec-WebSocket-Version" },
    { with_header("Sec-WebSocket-Extensions", "a; p=\"unterminated"), 400, "invalid Sec-WebSocket-Extensions" },
    { REQUEST:gsub("^GET", "POST"), 405, "method POST not allowed" },
  }
  for i, c in ipairs(cases) do
    local req = truthy(feed(c[1]), "case " .. i .. " parses")
    eq(false, req.websocket, "case " .. i)
    eq(c[2], req.status, "case " .. i .. " status")
    truthy(req.error:find(c[3], 1, true), "case " .. i .. ": " .. show(req.error))
  end
  -- not HTTP at all: nil, status, message
  local r, status, msg = feed("GET / HTTP/1.1\nHost: x\n\n")
  eq(nil, r)
  eq(400, status)
  eq("line ending is not CR LF", msg)
  r, status, msg = feed("GET / HTTP/1.1\r\nX-Big: " .. string.rep("a", 9000) .. "\r\n\r\n")
  eq(nil, r)
  eq(431, status)
  eq("header block too large", msg)
  eq(431, select(2, feed(REQUEST, { max_headers = 5 })))
  eq(true, feed(REQUEST, { max_headers = 9 }).websocket)
  raises(function() core.handshake_server { max_header_size = "big" } end)
  raises(function() core.handshake_server { max_header_size = 0 } end)
end)

check("accept_key matches RFC 6455", function()
  eq(RFC_ACCEPT, core.accept_key(RFC_KEY))
  raises(function() core.accept_key({}) end)
end)

check("handshake_response and http_response", function()
  eq("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    .. "Sec-WebSocket-Accept: " .. RFC_ACCEPT .. "\r\n\r\n", core.handshake_response { key = RFC_KEY })
  local res = core.handshake_response { key = RFC_KEY, protocol = "chat",
    extensions = "permessage-deflate", headers = { ["X-B"] = "2", ["X-A"] = 1 } }
  truthy(res:find("\r\nSec-WebSocket-Protocol: chat\r\n", 1, true), "protocol")
  truthy(res:find("\r\nSec-WebSocket-Extensions: permessage-deflate\r\n", 1, true), "extensions")
  eq("\r\nX-A: 1\r\nX-B: 2\r\n\r\n", res:sub(-20), "headers sorted by name")
  res = core.handshake_response { key = RFC_KEY, headers = { { "X-Z", "z" }, { "X-A", "a" } } }
  eq("\r\nX-Z: z\r\nX-A: a\r\n\r\n", res:sub(-20), "header pairs in order")
  raises(function() core.handshake_response { key = RFC_KEY, headers = { ["X-A"] = "b\r\nEvil: 1" } } end)
  raises(function() core.handshake_response {} end, "key")
  local r = core.http_response(426)
  truthy(r:find("^HTTP/1.1 426 Upgrade Required\r\n"), show(r))
  truthy(r:find("\r\nSec-WebSocket-Version: 13\r\n", 1, true))
  r = core.http_response(200, { ["Content-Type"] = "text/html" }, "<p>hi</p>")
  eq("HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 9\r\nConnection: close\r\n\r\n<p>hi</p>", r)
  raises(function() core.http_response(101) end)
  raises(function() core.http_response(200.5) end)
end)

check("handshake_client request and response", function()
  local c = core.handshake_client { host = "example.org", port = 8080, target = "/chat?x=1",
    origin = "http://example.org", protocols = { "chat", "superchat" },
    extensions = core.pmd_offer { client_max_window_bits = true }, headers = { { "X-A", "1" } } }
  local key = c:key()
  eq(24, #key)
  truthy(key:find("^[A-Za-z0-9+/]+==$"), "base64 key")
  local lines = {}
  for line in c:request():gmatch("(.-)\r\n") do lines[#lines + 1] = line end
  same_list({ "GET /chat?x=1 HTTP/1.1", "Host: example.org:8080", "Upgrade: websocket",
    "Connection: Upgrade", "Sec-WebSocket-Key: " .. key, "Sec-WebSocket-Version: 13",
    "Origin: http://example.org", "Sec-WebSocket-Protocol: chat, superchat",
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits", "X-A: 1", "" }, lines)
  -- our own server side accepts it
  local req = core.handshake_server():feed(c:request())
  eq(true, req.websocket)
  eq(key, req.key)
  local answer = core.handshake_response { key = key, protocol = "superchat",
    extensions = "permessage-deflate; client_max_window_bits=12" }
  eq(nil, c:feed(answer:sub(1, 20)), "incomplete")
  local res = truthy(c:feed(answer:sub(21) .. "\129\2hi"), "response")
  eq(101, res.status)
  eq("Switching Protocols", res.reason)
  eq("superchat", res.protocol)
  eq("permessage-deflate", res.extensions[1].name)
  eq("12", res.extensions[1].params.client_max_window_bits)
  eq("\129\2hi", c:rest())
  -- refusals: nil, message, response
  local c2 = core.handshake_client { host = "h", protocols = { "chat" } }
  local r, msg, res2 = c2:feed(core.handshake_response { key = RFC_KEY })
  eq(nil, r)
  eq("wrong Sec-WebSocket-Accept", msg:sub(1, 26))
  eq(101, res2.status)
  local c3 = core.handshake_client { host = "h" }
  r, msg, res2 = c3:feed(core.http_response(403, nil, "go away"))
  eq(nil, r)
  eq("handshake rejected: 403 Forbidden", msg)
  eq(403, res2.status)
  eq("go away", c3:rest())
  raises(function() core.handshake_client { host = "h x" } end)
  raises(function() core.handshake_client { host = "h", port = 70000 } end)
  raises(function() core.handshake_client { host = "h", port = 80.5 } end)
  raises(function() core.handshake_client { host = "h", protocols = { 1 } } end)
  c:close()
  raises(function() c:request() end, "closed")
end)

check("permessage-deflate negotiation", function()
  eq("permessage-deflate", core.pmd_offer())
  eq("permessage-deflate; client_max_window_bits", core.pmd_offer { client_max_window_bits = true })
  eq("permessage-deflate; server_no_context_takeover; server_max_window_bits=10",
    core.pmd_offer { server_no_context_takeover = true, server_max_window_bits = 10 })
  raises(function() core.pmd_offer { client_max_window_bits = 16 } end)
  -- the server accepts the offer the handshake parser read
  local req = core.handshake_server():feed(REQUEST)
  local response, sp = core.pmd_accept(req.extensions, { client_max_window_bits = 10 })
  eq("permessage-deflate; client_max_window_bits=10", response)
  eq(false, sp.server_no_context_takeover)
  eq(15, sp.server_max_window_bits)
  eq(10, sp.client_max_window_bits)
  local none, why = core.pmd_accept({ { name = "x-other", params = {} } })
  eq(nil, none)
  eq("no permessage-deflate offer", why)
  -- the client checks the answer, read back by its own parser
  local c = core.handshake_client { host = "h", extensions = core.pmd_offer { client_max_window_bits = true } }
  local res = c:feed(core.handshake_response { key = c:key(), extensions = response })
  local cp = truthy(core.pmd_check_response(res.extensions, { client_max_window_bits = true }), "agreed")
  eq(10, cp.client_max_window_bits)
  eq(15, cp.server_max_window_bits)
  eq(false, core.pmd_check_response({}, { client_max_window_bits = true }))
  local bad, err = core.pmd_check_response({ { name = "permessage-deflate", params_list = { { "x_unknown", true } } } },
    { client_max_window_bits = true })
  eq(nil, bad)
  truthy(err:find("bad permessage-deflate response", 1, true), show(err))
  -- params without params_list, numbers as values
  eq("permessage-deflate; client_max_window_bits=10",
    core.pmd_accept({ { name = "permessage-deflate", params = { client_max_window_bits = 10 } } }))
end)

check("permessage-deflate compressed engine round trip", function()
  local params = { client_max_window_bits = 10, server_no_context_takeover = true }
  local server, client = core.engine { role = "server" }, core.engine { role = "client" }
  core.pmd_attach(server, "server", params, { mem_level = 4 })
  core.pmd_attach(client, "client", params)
  eq(true, server:stats().deflate)
  local text = string.rep("the quick brown fox jumps over the lazy dog ", 500)
  for round = 1, 3 do
    truthy(server:send(text, "text", true, true))
    local wire = server:data_to_send()
    eq(0x40, bit.band(wire:byte(1), 0x40), "RSV1 on a compressed message")
    truthy(#wire < #text / 10, "compressed: " .. #wire)
    same_list({ "text", text }, feed_events(client, wire)[1], "round " .. round)
    local m = sample(70 * 1024, round)
    truthy(client:send(m, "binary", true, true))
    same_list({ "binary", m }, feed_events(server, client:data_to_send())[1])
    -- fragmented and compressed
    truthy(client:send(text, "text", false, true))
    truthy(client:send("!", "continuation", true))
    same_list({ "text", text .. "!" }, feed_events(server, client:data_to_send())[1])
  end
  raises(function() core.pmd_attach(server, "client", {}) end)
  raises(function() core.pmd_attach({}, "server", {}) end)
  -- a bare codec pair, and the RFC 7692 'Hello'
  local s, c = core.pmd_codec("server"), core.pmd_codec("client")
  eq(unhex "f2 48 cd c9 c9 07 00", s:deflate("Hello"))
  eq("Hello", c:inflate(unhex "f2 48 cd c9 c9 07 00"))
  local out, err = c:inflate(s:deflate(string.rep("\0", 100000)), true, 1000)
  eq(nil, out)
  eq("too big", err)
  truthy(s:memory() > 0)
  s:close()
  raises(function() s:deflate("x") end, "closed")
end)

check("utf8_valid", function()
  eq(true, (core.utf8_valid("héllo \240\159\152\128")))
  local ok, st = core.utf8_valid("")
  eq(true, ok)
  eq(0, st)
  eq(false, (core.utf8_valid("\255")))
  eq(false, (core.utf8_valid("\237\160\128")), "surrogate")
  eq(false, (core.utf8_valid("\192\175")), "overlong")
  -- a code point split over calls
  ok, st = core.utf8_valid("a\240\159")
  eq(true, ok)
  truthy(st ~= 0, "inside a sequence")
  ok, st = core.utf8_valid("\152\128", st)
  eq(true, ok)
  eq(0, st)
  raises(function() core.utf8_valid("a", 12345) end)
  raises(function() core.utf8_valid("a", 0.5) end)
end)

check("mask", function()
  eq(unhex "7f 9f 4d 51 58", core.mask("Hello", KEY))
  eq("Hello", core.mask(core.mask("Hello", KEY), KEY))
  eq(xor_mask("ello", KEY:sub(2) .. KEY:sub(1, 1)), core.mask("ello", KEY, 1), "offset 1")
  local big = sample(100000, 3)
  eq(xor_mask(big, KEY), core.mask(big, KEY), "100 kB")
  eq("", core.mask("", KEY))
  raises(function() core.mask("x", "abc") end)
  raises(function() core.mask("x", KEY, 4) end)
  raises(function() core.mask("x", KEY, 1.5) end)
end)

check("random and base64", function()
  local a, b = core.random(16), core.random(16)
  eq(16, #a)
  truthy(a ~= b, "two draws differ")
  eq(65536, #core.random(65536))
  raises(function() core.random(0) end)
  raises(function() core.random(65537) end)
  raises(function() core.random(2.5) end, "integer representation")
  raises(function() core.random("x") end, "number expected")
  eq("aGVsbG8=", core.base64("hello"))
  eq(RFC_KEY, core.base64("the sample nonce"))
end)

check("integer options given as non-integers raise errors", function()
  local function refused(f, what) raises(f, "must be an integer", what) end
  refused(function() core.engine { role = "server", max_message = 2.5 } end, "max_message 2.5")
  refused(function() core.engine { role = "server", max_message = 0 } end, "max_message 0")
  refused(function() core.engine { role = "server", max_message = 2 ^ 63 } end, "max_message 2^63")
  refused(function() core.engine { role = "server", max_message = 1 / 0 } end, "max_message inf")
  refused(function() core.engine { role = "server", max_message = 0 / 0 } end, "max_message nan")
  refused(function() core.engine { role = "server", max_message = "100" } end, "max_message string")
  refused(function() core.engine { role = "server", max_frame = 10.5 } end, "max_frame")
  refused(function() core.handshake_server { max_headers = 10.5 } end, "max_headers")
  refused(function() core.handshake_server { max_header_size = 1000.25 } end, "max_header_size")
  refused(function() core.pmd_codec("server", { server_max_window_bits = 9.5 }) end, "window bits")
  refused(function() core.pmd_codec("server", nil, { mem_level = 4.5 }) end, "mem_level")
  refused(function() core.pmd_offer { server_max_window_bits = 10.5 } end, "pmd_offer")
  refused(function() core.pmd_accept({}, { client_max_window_bits = 9.1 }) end, "pmd_accept policy")
  -- the message names the range, with %I done without lua_pushfstring
  raises(function() core.engine { role = "server", max_message = -1 } end,
    "option 'max_message' must be an integer from 1 to 9223372036854775807")
  -- whole numbers in floating point are integers, as in Lua 5.4
  local e = core.engine { role = "server", max_message = 100.0, max_frame = 2 ^ 53 }
  expect_error("server", masked { op = "binary", payload = string.rep("a", 101) }, 1009, "too big",
    { max_message = 100.0 })
  e:release()
  truthy(core.handshake_server { max_headers = 9.0 })
end)

check("many engines and handshakes survive the collector", function()
  -- Every object keeps its own user values: engines their event queues,
  -- clients their request, offer and extensions, servers the bytes after
  -- the header block. Objects are made and dropped while the collector runs;
  -- those kept must read back exactly what was stored in them.
  local kept = {}
  local c = core.engine { role = "client" }
  for i = 1, 3000 do
    local s = core.engine { role = "server" }
    c:send("message " .. i)
    c:ping(tostring(i))
    s:feed(c:data_to_send())
    if i % 10 == 0 then
      local hc = core.handshake_client { host = "h" .. i, protocols = { "p" .. i },
        extensions = "permessage-deflate" }
      local hs = core.handshake_server()
      hs:feed(REQUEST .. "tail " .. i)
      kept[#kept + 1] = { i = i, s = s, hc = hc, hs = hs, key = hc:key() }
    end
    if i % 97 == 0 then collectgarbage("collect") else collectgarbage("step") end
  end
  collectgarbage("collect")
  collectgarbage("collect")
  for _, k in ipairs(kept) do
    local ev = events(k.s)
    eq(2, #ev, "events of engine " .. k.i)
    same_list({ "text", "message " .. k.i }, ev[1])
    same_list({ "ping", tostring(k.i) }, ev[2])
    truthy(k.hc:request():find("\r\nHost: h" .. k.i .. "\r\n", 1, true), "request of client " .. k.i)
    local res = k.hc:feed(core.handshake_response { key = k.key, protocol = "p" .. k.i,
      extensions = "permessage-deflate" })
    eq("p" .. k.i, truthy(res, "response " .. k.i).protocol)
    eq("tail " .. k.i, k.hs:rest())
  end
  -- a large input, parsed while the collector runs
  local s = core.engine { role = "server" }
  for i = 1, 5000 do c:send(tostring(i), "binary") end
  s:feed(c:data_to_send())
  for i = 1, 5000 do
    local kind, data = s:next()
    if kind ~= "binary" or data ~= tostring(i) then fail("event " .. i .. ": " .. show(data)) end
    if i % 500 == 0 then collectgarbage("collect") end
  end
  eq(nil, (s:next()))
  -- the kept objects go while the collector runs (luacheck sees no later read)
  kept = nil -- luacheck: ignore 311
  collectgarbage("collect")
end)

io.stdout:write(("done %d/%d\n"):format(passed, total))
os.exit(passed == total and 0 or 1)
