-- The opening handshake (RFC 6455 §4): duplex.core.handshake_server,
-- handshake_client and the response builders.
local core = require "duplex.core"

local RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
local RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

-- A request from header pairs; nil values drop the header.
local function request(start, headers)
  local out = { start }
  for _, h in ipairs(headers) do
    if h[2] ~= nil then out[#out + 1] = h[1] .. ": " .. h[2] end
  end
  return table.concat(out, "\r\n") .. "\r\n\r\n"
end

local function base_headers()
  return {
    { "Host", "server.example.com" },
    { "Upgrade", "websocket" },
    { "Connection", "Upgrade" },
    { "Sec-WebSocket-Key", RFC_KEY },
    { "Sec-WebSocket-Version", "13" },
  }
end

-- base headers with name set to value (nil removes it; new names are added)
local function with(name, value, start)
  local h, found = base_headers(), false
  for _, pair in ipairs(h) do
    if pair[1]:lower() == name:lower() then
      pair[2] = value
      found = true
    end
  end
  if not found then h[#h + 1] = { name, value } end
  return request(start or "GET /chat HTTP/1.1", h)
end

-- rand(n) -> 0..n-1, the same sequence for the same seed (a failure names
-- the request it failed on, and the next run finds it again)
local function seeded(seed)
  local rng = seed
  return function(n)
    rng = (rng * 1103515245 + 12345) % 2147483648
    return rng % n
  end
end

-- name with each letter's case picked by rand
local function random_case(name, rand)
  return (name:gsub("%a", function(c) return rand(2) == 0 and c:upper() or c:lower() end))
end

local function feed(data, opts)
  local hs = core.handshake_server(opts)
  return hs:feed(data)
end

-- Feed data one byte at a time; every call before the last must ask for more.
local function feed_bytes(data, opts)
  local hs = core.handshake_server(opts)
  for i = 1, #data do
    local r, status, msg = hs:feed(data:sub(i, i))
    if r or status then return r, status, msg, i, hs end
  end
  return nil, nil, nil, #data, hs
end

local CHROME = request("GET /chat HTTP/1.1", {
  { "Host", "localhost:8080" },
  { "Connection", "Upgrade" },
  { "Pragma", "no-cache" },
  { "Cache-Control", "no-cache" },
  { "User-Agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    .. "Chrome/120.0.0.0 Safari/537.36" },
  { "Upgrade", "websocket" },
  { "Origin", "http://localhost:8080" },
  { "Sec-WebSocket-Version", "13" },
  { "Accept-Encoding", "gzip, deflate, br" },
  { "Accept-Language", "en-US,en;q=0.9" },
  { "Cookie", "a=1; b=2" },
  { "Sec-WebSocket-Key", "x3JJHMbDL1EzLkh9GBhXDw==" },
  { "Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits" },
})

local FIREFOX = request("GET /socket?room=1&x=%20y HTTP/1.1", {
  { "Host", "127.0.0.1:9001" },
  { "User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0" },
  { "Accept", "*/*" },
  { "Sec-WebSocket-Version", "13" },
  { "Origin", "http://127.0.0.1:9001" },
  { "Sec-WebSocket-Protocol", "chat, superchat" },
  { "Sec-WebSocket-Extensions", "permessage-deflate" },
  { "Sec-WebSocket-Key", "AQIDBAUGBwgJCgsMDQ4PEA==" },
  { "Connection", "keep-alive, Upgrade" },
  { "Sec-Fetch-Dest", "empty" },
  { "Sec-Fetch-Mode", "websocket" },
  { "Pragma", "no-cache" },
  { "Upgrade", "websocket" },
})

local RFC_EXAMPLE = request("GET /chat HTTP/1.1", {
  { "Host", "server.example.com" },
  { "Upgrade", "websocket" },
  { "Connection", "Upgrade" },
  { "Sec-WebSocket-Key", RFC_KEY },
  { "Origin", "http://example.com" },
  { "Sec-WebSocket-Protocol", "chat, superchat" },
  { "Sec-WebSocket-Version", "13" },
})

local TRICKY = request("GET / HTTP/1.1", {
  { "HOST", "[::1]:80" },
  { "upgrade", "WebSocket" },
  { "connection", "UPGRADE" },
  { "SEC-WEBSOCKET-KEY", RFC_KEY },
  { "sec-websocket-version", "13" },
  { "Sec-WebSocket-Protocol", "a" },
  { "Sec-WebSocket-Protocol", " b ,c, ,d" },
  { "Sec-WebSocket-Extensions", 'x; p="q\\r"' },
  { "Sec-WebSocket-Extensions", "y, z;a=1" },
  { "X-Empty", "" },
})

local VALID = { RFC_EXAMPLE = RFC_EXAMPLE, CHROME = CHROME, FIREFOX = FIREFOX, TRICKY = TRICKY }

describe("accept_key", function()
  it("matches the RFC 6455 example", function()
    assert.equal(RFC_ACCEPT, core.accept_key(RFC_KEY))
  end)
  it("rejects non-strings", function()
    assert.has_error(function() core.accept_key({}) end)
  end)
end)

describe("handshake_server", function()
  it("parses one request after another once reset, with the limits it was made with", function()
    local hs = core.handshake_server { max_header_size = 400 }
    local first = hs:feed(RFC_EXAMPLE .. "\x81")
    assert.equal("/chat", first.path)
    assert.equal("\x81", hs:rest())
    hs:reset()
    assert.equal("", hs:rest())
    local second = RFC_EXAMPLE:gsub("GET /chat", "GET /other")
    assert.is_nil(hs:feed(second:sub(1, 40)))
    local req = hs:feed(second:sub(41))
    assert.equal("/other", req.path)
    assert.equal(RFC_KEY, req.key)
    hs:reset()
    local r, status = hs:feed("GET / HTTP/1.1\r\nX: " .. ("y"):rep(500) .. "\r\n\r\n")
    assert.is_nil(r)
    assert.equal(431, status)
    -- the first request is whole still: it is all in Lua strings
    assert.equal("websocket", first.headers.upgrade)
  end)

  it("accepts the RFC example", function()
    local req = feed(RFC_EXAMPLE)
    assert.is_true(req.websocket)
    assert.is_true(req.upgrade)
    assert.is_nil(req.status)
    assert.is_nil(req.error)
    assert.equal("GET", req.method)
    assert.equal("/chat", req.target)
    assert.equal("/chat", req.path)
    assert.is_nil(req.raw_query)
    assert.same({}, req.query)
    assert.equal("1.1", req.version)
    assert.equal("server.example.com", req.host)
    assert.equal("http://example.com", req.origin)
    assert.equal(RFC_KEY, req.key)
    assert.same({ "chat", "superchat" }, req.protocols)
    assert.same({}, req.extensions)
    assert.equal("websocket", req.headers.upgrade)
    assert.equal("13", req.headers["sec-websocket-version"])
  end)

  it("accepts a browser's request", function()
    local req = feed(CHROME)
    assert.is_true(req.websocket)
    assert.equal("localhost:8080", req.host)
    assert.equal("http://localhost:8080", req.origin)
    assert.equal("a=1; b=2", req.headers.cookie)
    assert.equal("gzip, deflate, br", req.headers["accept-encoding"])
    assert.same({}, req.protocols)
    assert.same({ { name = "permessage-deflate", params = { client_max_window_bits = true },
                    params_list = { { "client_max_window_bits", true } } } }, req.extensions)
  end)

  it("accepts Connection: keep-alive, Upgrade and splits path and query", function()
    local req = feed(FIREFOX)
    assert.is_true(req.websocket)
    assert.equal("/socket", req.path)
    assert.equal("room=1&x=%20y", req.raw_query)
    assert.same({ room = "1", x = " y" }, req.query)
    assert.equal("keep-alive, Upgrade", req.headers.connection)
    assert.same({ "chat", "superchat" }, req.protocols)
  end)

  it("keeps every header, a common name or not, however cased or repeated, as it came", function()
    -- the headers wait packed (common names as one byte each): what comes
    -- out of req.headers and the fields read off them must be what went in
    local common = { "Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
      "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol", "Origin", "User-Agent", "Accept-Encoding",
      "Accept-Language", "Cache-Control", "Pragma", "Cookie", "Authorization", "X-Forwarded-For",
      "X-Forwarded-Proto", "X-Forwarded-Host", "X-Real-IP", "Forwarded", "Accept", "Referer",
      "Sec-Fetch-Dest", "Sec-Fetch-Mode", "Sec-Fetch-Site" }
    local others = { "Hos", "Hosts", "X-Forwarded-Fo", "Origin2", "X-Custom", "A", "Sec-WebSocket-Keys" }
    local rand = seeded(20261208)
    local function casing(name) return random_case(name, rand) end
    for _ = 1, 200 do
      local lines, want, first = {}, {}, {}
      for _ = 1, rand(12) + 1 do
        local list = rand(3) == 0 and others or common
        local name = list[rand(#list) + 1]
        local value = ({ "", "v", "a, b", "x=1; y=2", ("z"):rep(rand(60)) })[rand(5) + 1] .. rand(100)
        lines[#lines + 1] = casing(name) .. ": " .. value .. "\r\n"
        local lname = name:lower()
        want[lname] = want[lname] and want[lname] .. ", " .. value or value
        if first[lname] == nil then first[lname] = value end
      end
      local req = assert(core.handshake_server():feed("GET /x HTTP/1.1\r\n" .. table.concat(lines) .. "\r\n"))
      assert.equal(first.host, req.host)
      assert.equal(first.origin, req.origin)
      assert.equal(first["sec-websocket-key"], req.key)
      assert.same(want, req.headers)
    end
  end)

  it("compares names and tokens case-insensitively", function()
    local req = feed(TRICKY)
    assert.is_true(req.websocket)
    assert.equal("[::1]:80", req.host)
    assert.equal("WebSocket", req.headers.upgrade)
    assert.equal("", req.headers["x-empty"])
  end)

  it("collects protocols over several header lines", function()
    local req = feed(TRICKY)
    assert.same({ "a", "b", "c", "d" }, req.protocols)
    assert.equal("a, b ,c, ,d", req.headers["sec-websocket-protocol"])
  end)

  it("gives an empty query for a trailing '?' and the path of an absolute-form target", function()
    local req = feed(with("Host", "h", "GET /p? HTTP/1.1"))
    assert.equal("/p", req.path)
    assert.equal("", req.raw_query)
    assert.same({}, req.query)
    req = feed(with("Host", "h", "GET ws://h:1/a/b?c=d HTTP/1.1"))
    assert.is_true(req.websocket)
    assert.equal("/a/b", req.path)
    assert.equal("c=d", req.raw_query)
    assert.same({ c = "d" }, req.query)
    req = feed(with("Host", "h", "GET http://h HTTP/1.1"))
    assert.equal("/", req.path)
    assert.is_nil(req.raw_query)
  end)

  it("decodes the query into a table as HTML forms encode it, keeping the raw string", function()
    local raw = "token=a%2Bb%3D%3D&name=J%C3%BCrgen+M&empty=&flag&&room=1&room=2&bad=%zz%4&%6Bey=v%00w"
    local req = feed(with("Host", "h", "GET /ws?" .. raw .. " HTTP/1.1"))
    assert.equal(raw, req.raw_query)
    assert.same({
      token = "a+b==",            -- %2B is a plus, + a space
      name = "J\u{fc}rgen M",
      empty = "", flag = "",      -- with and without '='
      room = "1",                 -- the first of a repeated name
      bad = "%zz%4",              -- broken escapes stay as they are
      key = "v\0w",              -- names are decoded too; any byte may come out
    }, req.query)
  end)

  describe("parses Sec-WebSocket-Extensions", function()
    local function exts(...)
      local h = base_headers()
      for _, v in ipairs({ ... }) do h[#h + 1] = { "Sec-WebSocket-Extensions", v } end
      return feed(request("GET / HTTP/1.1", h))
    end

    it("with parameters, quoted strings and escapes", function()
      local req = exts('permessage-deflate; client_max_window_bits; server_max_window_bits="10"',
                       'x-foo ; a = "b\\c\\"" ; flag;a=2, bar')
      assert.is_false(req.websocket) -- \" unescapes to a quote, not a token character
      req = exts('permessage-deflate; client_max_window_bits; server_max_window_bits="10"',
                 'x-foo ; a = "b\\c\\d" ; flag;a=2, bar')
      assert.is_true(req.websocket)
      assert.same({
        { name = "permessage-deflate",
          params = { client_max_window_bits = true, server_max_window_bits = "10" },
          params_list = { { "client_max_window_bits", true }, { "server_max_window_bits", "10" } } },
        { name = "x-foo", params = { a = "bcd", flag = true },
          params_list = { { "a", "bcd" }, { "flag", true }, { "a", "2" } } },
        { name = "bar", params = {}, params_list = {} },
      }, req.extensions)
    end)

    it("keeps duplicate parameters detectable", function()
      local req = exts("permessage-deflate; server_no_context_takeover; server_no_context_takeover")
      assert.is_true(req.websocket)
      assert.equal(2, #req.extensions[1].params_list)
    end)

    it("tolerates empty list elements", function()
      local req = exts(", a,, b ,")
      assert.is_true(req.websocket)
      assert.equal(2, #req.extensions)
    end)

    for _, bad in ipairs({ 'a; p="unterminated', 'a; p="two words"', 'a; p=""', "a; =1", "a;",
                           "a b", "a; p=", "a; p=\"x\\", "; p", "a; p=[x]" }) do
      it("rejecting " .. bad, function()
        local req = exts(bad)
        assert.is_false(req.websocket)
        assert.equal(400, req.status)
        assert.equal("invalid Sec-WebSocket-Extensions", req.error)
      end)
    end
  end)

  describe("applies RFC 6455 §4.2.1", function()
    local cases = {
      { "method POST", with("Host", "server.example.com", "POST /chat HTTP/1.1"), 405, "method POST not allowed" },
      { "lowercase method", with("Host", "server.example.com", "get /chat HTTP/1.1"), 405, "method get not allowed" },
      { "HTTP/1.0", with("Host", "x", "GET /chat HTTP/1.0"), 400, "HTTP/1.1 or later required" },
      { "missing Host", with("Host", nil), 400, "missing Host header" },
      { "duplicate Host", with("host", "server.example.com") .. "", 400, nil },
      { "missing Upgrade", with("Upgrade", nil), 400, "missing Upgrade: websocket" },
      { "Upgrade without websocket", with("Upgrade", "h2c"), 400, "missing Upgrade: websocket" },
      { "missing Connection", with("Connection", nil), 400, "missing Connection: Upgrade" },
      { "Connection: keep-alive", with("Connection", "keep-alive"), 400, "missing Connection: Upgrade" },
      { "Connection: Upgraded", with("Connection", "Upgraded"), 400, "missing Connection: Upgrade" },
      { "missing key", with("Sec-WebSocket-Key", nil), 400, "missing Sec-WebSocket-Key" },
      { "15-byte key", with("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAA"), 400, "invalid Sec-WebSocket-Key" },
      { "17-byte key", with("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAAAAA="), 400, "invalid Sec-WebSocket-Key" },
      { "key with bad characters", with("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25j*Q=="), 400,
        "invalid Sec-WebSocket-Key" },
      { "key not base64 at all", with("Sec-WebSocket-Key", "hello"), 400, "invalid Sec-WebSocket-Key" },
      { "missing version", with("Sec-WebSocket-Version", nil), 426, "missing Sec-WebSocket-Version" },
      { "version 8", with("Sec-WebSocket-Version", "8"), 426, "unsupported Sec-WebSocket-Version: 8" },
      { "version 13, 8", with("Sec-WebSocket-Version", "13, 8"), 426, "unsupported Sec-WebSocket-Version" },
      { "invalid protocol", with("Sec-WebSocket-Protocol", "chat, [x]"), 400, "invalid Sec-WebSocket-Protocol" },
      { "HTTP/2.0", with("Host", "x", "GET /chat HTTP/2.0"), 505, "HTTP/1.1 required" },
      { "a body (Content-Length)", with("Content-Length", "5"), 400, "must not have a body" },
      { "a body (Transfer-Encoding)", with("Transfer-Encoding", "chunked"), 400, "must not have a body" },
      { "Content-Length: 00", with("Content-Length", "00"), 400, "must not have a body" },
    }
    -- a second Host line
    cases[5][2] = request("GET /chat HTTP/1.1", (function()
      local h = base_headers()
      h[#h + 1] = { "Host", "other" }
      return h
    end)())
    cases[5][4] = "duplicate Host header"

    for _, c in ipairs(cases) do
      it(c[1] .. " -> " .. c[3], function()
        local req = feed(c[2])
        assert.is_table(req)
        assert.is_false(req.websocket)
        assert.equal(c[3], req.status)
        assert.truthy(req.error:find(c[4], 1, true), req.error)
        -- the request is still there for a plain HTTP answer
        assert.is_string(req.method)
        assert.is_table(req.headers)
      end)
    end

    it("reports upgrade only when websocket was asked for", function()
      assert.is_true(feed(with("Sec-WebSocket-Version", "8")).upgrade)
      assert.is_true(feed(with("Host", "x", "POST / HTTP/1.1")).upgrade)
      local plain = feed("GET /index.html HTTP/1.1\r\nHost: example.org\r\nAccept: */*\r\n\r\n")
      assert.is_false(plain.upgrade)
      assert.is_false(plain.websocket)
      assert.equal(400, plain.status)
      assert.equal("/index.html", plain.path)
    end)
  end)

  describe("rejects bad HTTP with 400", function()
    local cases = {
      { "bare LF", "GET / HTTP/1.1\nHost: x\n\n", "line ending is not CR LF" },
      { "bare CR", "GET / HTTP/1.1\rHost: x\r\n\r\n", "line ending is not CR LF" },
      { "NUL", "GET / HTTP/1.1\r\nHost: x\0\r\n\r\n", "NUL byte in header" },
      { "obs-fold", "GET / HTTP/1.1\r\nX-A: a\r\n b\r\nHost: x\r\n\r\n", "obsolete line folding" },
      { "space before colon", "GET / HTTP/1.1\r\nHost : x\r\n\r\n", "invalid header name" },
      { "no colon", "GET / HTTP/1.1\r\nHost\r\n\r\n", "invalid header name" },
      { "empty name", "GET / HTTP/1.1\r\n: x\r\n\r\n", "invalid header name" },
      { "control in value", "GET / HTTP/1.1\r\nX: a\1b\r\n\r\n", "invalid character in header value" },
      { "DEL in value", "GET / HTTP/1.1\r\nX: a\127b\r\n\r\n", "invalid character in header value" },
      { "bad version", "GET / HTTP/1.1x\r\nHost: x\r\n\r\n", "invalid HTTP version" },
      { "lowercase version", "GET / http/1.1\r\nHost: x\r\n\r\n", "invalid HTTP version" },
      { "space in target", "GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", "invalid HTTP version" },
      { "two spaces", "GET  / HTTP/1.1\r\nHost: x\r\n\r\n", "missing request target" },
      { "no target", "GET HTTP/1.1\r\n\r\n", "malformed request line" },
      { "control in target", "GET /\1 HTTP/1.1\r\n\r\n", "invalid character in request target" },
      { "bad method", "G(T / HTTP/1.1\r\n\r\n", "malformed request line" },
      { "empty request line", "\r\n\r\n", "invalid method" },
      { "binary junk", "\22\3\1\0\1", "NUL byte in header" },
    }
    for _, c in ipairs(cases) do
      it(c[1], function()
        local r, status, msg = feed(c[2])
        assert.is_nil(r)
        assert.equal(400, status)
        assert.truthy(msg:find(c[3], 1, true), msg)
        local r2, status2, msg2 = feed_bytes(c[2])
        assert.is_nil(r2)
        assert.equal(400, status2)
        assert.equal(msg, msg2)
      end)
    end

    it("stays failed", function()
      local hs = core.handshake_server()
      assert.equal(400, select(2, hs:feed("GET / HTTP/1.1\n")))
      local r, status, msg = hs:feed("Host: x\r\n\r\n")
      assert.is_nil(r)
      assert.equal(400, status)
      assert.equal("line ending is not CR LF", msg)
      assert.truthy(tostring(hs):find("failed"))
    end)
  end)

  describe("limits", function()
    it("answers 431 to a header block over max_header_size", function()
      local big = "GET / HTTP/1.1\r\nX-Big: " .. ("a"):rep(9000) .. "\r\n\r\n"
      local r, status, msg = feed(big)
      assert.is_nil(r)
      assert.equal(431, status)
      assert.equal("header block too large", msg)
      -- fed byte by byte, it fails as soon as the limit is reached
      local _, status2, _, at = feed_bytes(big)
      assert.equal(431, status2)
      assert.equal(8192, at)
    end)

    it("accepts a block of exactly max_header_size bytes and no more", function()
      local head = with("X-Pad", "")
      local pad = 8192 - #head
      local exact = with("X-Pad", ("p"):rep(pad))
      assert.equal(8192, #exact)
      assert.is_true(feed(exact).websocket)
      local over = with("X-Pad", ("p"):rep(pad + 1))
      assert.equal(431, select(2, feed(over)))
      assert.is_true(feed(with("X-Pad", ("p"):rep(pad + 1)), { max_header_size = 8193 }).websocket)
    end)

    it("honours a smaller max_header_size", function()
      assert.equal(431, select(2, feed(RFC_EXAMPLE, { max_header_size = 64 })))
    end)

    it("answers 431 to too many headers", function()
      local h = base_headers()
      for i = #h + 1, 100 do h[i] = { "X-H" .. i, "v" } end
      assert.is_true(feed(request("GET / HTTP/1.1", h)).websocket)
      h[101] = { "X-One-More", "v" }
      local r, status, msg = feed(request("GET / HTTP/1.1", h))
      assert.is_nil(r)
      assert.equal(431, status)
      assert.equal("too many headers", msg)
      assert.equal(431, select(2, feed(RFC_EXAMPLE, { max_headers = 5 })))
      assert.is_true(feed(RFC_EXAMPLE, { max_headers = 7 }).websocket)
    end)

    it("refuses nonsense options", function()
      assert.has_error(function() core.handshake_server{ max_header_size = "big" } end)
      assert.has_error(function() core.handshake_server{ max_header_size = 0 } end)
      assert.has_error(function() core.handshake_server{ max_headers = -1 } end)
      assert.has_error(function() core.handshake_server(5) end)
    end)
  end)

  it("accepts Content-Length: 0 on an upgrade", function()
    assert.is_true(feed(with("Content-Length", "0")).websocket)
  end)

  describe("incremental input", function()
    for name, data in pairs(VALID) do
      it("gives the same request for " .. name .. " whole, split anywhere, or byte by byte", function()
        local whole = feed(data)
        assert.is_table(whole)
        for i = 1, #data - 1 do
          local hs = core.handshake_server()
          local first = hs:feed(data:sub(1, i))
          assert.is_nil(first)
          local req = hs:feed(data:sub(i + 1))
          assert.same(whole, req)
          assert.equal("", hs:rest())
        end
        local req, _, _, at = feed_bytes(data)
        assert.equal(#data, at)
        assert.same(whole, req)
      end)
    end

    -- Random requests, valid and broken, against random cuts: the parser's
    -- answer (the request, or the status and message of a refusal) and the
    -- bytes it leaves in rest() must not depend on where reads end.
    it("gives the same answer for random requests cut at random places", function()
      local rand = seeded(20261201)
      local function pick(list) return list[rand(#list) + 1] end
      local function casing(name) return random_case(name, rand) end
      local SPACE = { "", " ", "  ", "\t", " \t " }
      local function header(name, value)
        return casing(name) .. ":" .. pick(SPACE) .. value .. pick(SPACE) .. "\r\n"
      end
      -- mostly the valid choice, sometimes one of the broken ones
      local function valid_or(good, bad) return rand(6) == 0 and pick(bad) or good end
      local function random_request()
        local lines = {
          valid_or("GET", { "POST", "get" }) .. " " .. pick { "/", "/chat?room=1", "/a%20b" }
            .. valid_or("", { "*", " extra" })
            .. " " .. valid_or("HTTP/1.1", { "HTTP/1.0", "HTTP/2.0", "HTTP/1.10" }) .. "\r\n",
        }
        local parts = {
          header("Host", valid_or(pick { "localhost", "example.com:8080", "[::1]:9" }, { "" })),
          header("Upgrade", valid_or(pick { "websocket", "WebSocket" }, { "h2c", "" })),
          header("Connection", valid_or(pick { "Upgrade", "keep-alive, Upgrade", "upgrade" }, { "close" })),
          header("Sec-WebSocket-Key", valid_or(pick { "dGhlIHNhbXBsZSBub25jZQ==", "x3JJHMbDL1EzLkh9GBhXDw==" },
            { "short" })),
          header("Sec-WebSocket-Version", valid_or("13", { "8", "13, 8" })),
        }
        for _ = 1, rand(4) do
          parts[#parts + 1] = header(pick { "Origin", "Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions",
            "Cookie", "X-Forwarded-For", "User-Agent" },
            pick { "chat, superchat", "permessage-deflate; client_max_window_bits", "http://a.b", "a=b; c=d",
              "10.0.0.1", "" })
        end
        if rand(8) == 0 then parts[#parts + 1] = " folded continuation\r\n" end
        if rand(10) == 0 then parts[#parts + 1] = "No-Colon-Here\r\n" end
        if rand(10) == 0 then parts[#parts + 1] = header("Content-Length", pick { "0", "5" }) end
        for _ = 1, #parts do -- shuffle
          local i, j = rand(#parts) + 1, rand(#parts) + 1
          parts[i], parts[j] = parts[j], parts[i]
        end
        local head = table.concat(lines) .. table.concat(parts) .. "\r\n"
        if rand(12) == 0 then head = head:gsub("\r\n", "\n", 1) end
        return head .. pick { "", "", "\129\5hello", "trailing bytes" }
      end
      local function answer(hs, r, status, msg)
        return { r = r, status = status, msg = msg, rest = r and hs:rest() or nil }
      end
      local kinds = {}
      for _ = 1, 300 do
        local data = random_request()
        local hs = core.handshake_server()
        local whole = answer(hs, hs:feed(data))
        local kind = whole.r and whole.r.websocket and "upgrade" or "other"
        kinds[kind] = (kinds[kind] or 0) + 1
        for _ = 1, 6 do
          -- up to four reads, cut at random places
          hs = core.handshake_server()
          local got, at = nil, 0
          for k = 1, 4 do
            local len = k == 4 and #data - at or rand(#data - at + 1)
            local r, status, msg = hs:feed(data:sub(at + 1, at + len))
            at = at + len
            if r or status then
              got = answer(hs, r, status, msg)
              break
            end
          end
          got = got or { rest = nil }
          -- a request ending in one read leaves the rest of that read in
          -- rest(); later reads are the caller's: compare what both saw
          if got.r and whole.r then
            assert.same(whole.r, got.r, "request differs for " .. string.format("%q", data))
            assert.equal(whole.rest:sub(1, #got.rest), got.rest)
          else
            assert.same({ whole.r, whole.status, whole.msg }, { got.r, got.status, got.msg },
              "answer differs for " .. string.format("%q", data))
          end
        end
      end
      -- the generator reaches valid upgrades and refusals alike
      assert.is_true((kinds.upgrade or 0) >= 20, "valid upgrades: " .. tostring(kinds.upgrade))
      assert.is_true((kinds.other or 0) >= 20, "refusals: " .. tostring(kinds.other))
    end)

    it("keeps the bytes after the header block in rest()", function()
      local frames = "\129\5hello\137\0"
      local data = RFC_EXAMPLE .. frames
      for i = 1, #data - 1 do
        local hs = core.handshake_server()
        local req = hs:feed(data:sub(1, i))
        if req then
          -- the block ended inside the first chunk; the second chunk is the caller's
          assert.equal(data:sub(#RFC_EXAMPLE + 1, i), hs:rest())
        else
          req = hs:feed(data:sub(i + 1))
          assert.equal(frames, hs:rest())
        end
        assert.is_true(req.websocket)
      end
    end)

    it("returns exactly nil while waiting", function()
      local hs = core.handshake_server()
      assert.equal(1, select("#", hs:feed("GET / HT")))
      assert.equal(1, select("#", hs:feed("")))
      assert.equal("", hs:rest())
    end)

    it("refuses to be fed after the request is complete", function()
      local hs = core.handshake_server()
      assert.is_table(hs:feed(RFC_EXAMPLE))
      assert.has_error(function() hs:feed("x") end)
    end)
  end)

  describe("object", function()
    it("checks its arguments", function()
      local hs = core.handshake_server()
      assert.has_error(function() hs:feed() end)
      assert.has_error(function() hs:feed({}) end)
      assert.has_error(function() hs.feed(io.stdout, "x") end)
    end)

    it("has __tostring and __close", function()
      local saved
      do
        local hs <close> = core.handshake_server()
        saved = hs
        assert.truthy(tostring(hs):find("^duplex.handshake_server %(reading%)"))
      end
      assert.truthy(tostring(saved):find("closed"))
      assert.has_error(function() saved:feed("GET") end, "handshake object is closed")
    end)
  end)
end)

describe("handshake_response", function()
  it("builds the 101 answer", function()
    local res = core.handshake_response{ key = RFC_KEY }
    assert.equal("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
      .. "Sec-WebSocket-Accept: " .. RFC_ACCEPT .. "\r\n\r\n", res)
  end)

  it("reads the key of a request it is given, however the request holds it", function()
    local want = core.handshake_response{ key = RFC_KEY }
    local req = feed(request("GET / HTTP/1.1", base_headers()))
    assert.equal(want, core.handshake_response{ request = req }, "from its packed headers")
    local _ = req.headers
    assert.equal(want, core.handshake_response{ request = req }, "from its headers table")
    req.key = "x3JJHMbDL1EzLkh9GBhXDw=="
    assert.equal(core.handshake_response{ key = req.key }, core.handshake_response{ request = req },
      "its own key field first")
    assert.equal(want, core.handshake_response{ key = RFC_KEY, request = feed(CHROME) }, "key wins")
    assert.has_error(function() core.handshake_response{ request = {} } end, "option 'key' is required")
  end)

  it("adds protocol, extensions and headers (a map sorted by name, or pairs in order)", function()
    local res = core.handshake_response{ key = RFC_KEY, protocol = "chat",
      extensions = "permessage-deflate; server_max_window_bits=10",
      headers = { ["X-B"] = "2", ["X-A"] = "1", ["Set-Cookie"] = "s=1" } }
    assert.truthy(res:find("\r\nSec-WebSocket-Protocol: chat\r\n", 1, true))
    assert.truthy(res:find("\r\nSec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10\r\n", 1, true))
    local tail = "\r\nSet-Cookie: s=1\r\nX-A: 1\r\nX-B: 2\r\n\r\n"
    assert.equal(tail, res:sub(-#tail))
    res = core.handshake_response{ key = RFC_KEY, headers = { { "X-Z", "z" }, { "X-A", 7 } } }
    tail = "\r\nX-Z: z\r\nX-A: 7\r\n\r\n"
    assert.equal(tail, res:sub(-#tail))
  end)

  for _, c in ipairs({
    { "CR LF in a value", { headers = { ["X-A"] = "b\r\nEvil: 1" } } },
    { "LF in a value", { headers = { ["X-A"] = "b\nEvil: 1" } } },
    { "NUL in a value", { headers = { ["X-A"] = "b\0" } } },
    { "CR LF in a name", { headers = { ["X-A\r\nEvil"] = "1" } } },
    { "colon in a name", { headers = { { "X-A: b", "c" } } } },
    { "empty name", { headers = { { "", "c" } } } },
    { "a header the handshake writes", { headers = { ["sec-websocket-accept"] = "x" } } },
    { "CR LF in the protocol", { protocol = "chat\r\nEvil: 1" } },
    { "a protocol that is no token", { protocol = "a b" } },
    { "CR LF in extensions", { extensions = "a\r\nEvil: 1" } },
    { "malformed extensions", { extensions = "a; ;" } },
    { "an invalid key", { key = "short" } },
  }) do
    it("refuses " .. c[1], function()
      local opts = { key = RFC_KEY }
      for k, v in pairs(c[2]) do opts[k] = v end
      assert.has_error(function() core.handshake_response(opts) end)
    end)
  end

  it("refuses missing or mistyped options", function()
    assert.has_error(function() core.handshake_response{} end)
    assert.has_error(function() core.handshake_response{ key = RFC_KEY, protocol = 1 } end)
    assert.has_error(function() core.handshake_response{ key = RFC_KEY, headers = "x" } end)
    assert.has_error(function() core.handshake_response{ key = RFC_KEY, headers = { { "X" } } } end)
    assert.has_error(function() core.handshake_response{ key = RFC_KEY, headers = { X = {} } } end)
  end)
end)

describe("http_response", function()
  local function parse(s)
    local head, body = s:match("^(.-)\r\n\r\n(.*)$")
    local lines = {}
    for line in (head .. "\r\n"):gmatch("(.-)\r\n") do lines[#lines + 1] = line end
    return lines, body
  end

  it("builds a closing error response with a default body", function()
    local lines, body = parse(core.http_response(400))
    assert.same({ "HTTP/1.1 400 Bad Request", "Content-Type: text/plain; charset=utf-8",
                  "Content-Length: 16", "Connection: close" }, lines)
    assert.equal("400 Bad Request\n", body)
  end)

  it("uses the reason phrases of common codes", function()
    for code, reason in pairs({ [401] = "Unauthorized", [403] = "Forbidden", [404] = "Not Found",
                                [431] = "Request Header Fields Too Large", [500] = "Internal Server Error",
                                [503] = "Service Unavailable", [200] = "OK" }) do
      assert.equal("HTTP/1.1 " .. code .. " " .. reason, parse(core.http_response(code))[1])
    end
  end)

  it("adds Sec-WebSocket-Version to 426 and Allow to 405", function()
    local lines = parse(core.http_response(426))
    assert.equal("Sec-WebSocket-Version: 13", lines[3])
    lines = parse(core.http_response(405))
    assert.equal("Allow: GET", lines[3])
    lines = parse(core.http_response(405, { Allow = "GET, HEAD" }))
    assert.equal("Allow: GET, HEAD", lines[3])
    assert.equal(5, #lines)
  end)

  it("takes headers and a body", function()
    local lines, body = parse(core.http_response(200, { ["Content-Type"] = "text/html" }, "<p>hi</p>"))
    assert.same({ "HTTP/1.1 200 OK", "Content-Type: text/html", "Content-Length: 9", "Connection: close" }, lines)
    assert.equal("<p>hi</p>", body)
    lines, body = parse(core.http_response(200))
    assert.equal("Content-Length: 0", lines[3])
    assert.equal("", body)
    lines, body = parse(core.http_response(404, nil, ""))
    assert.equal("Content-Length: 0", lines[3])
    assert.equal("", body)
  end)

  it("sends no body with 204", function()
    local lines, body = parse(core.http_response(204))
    assert.same({ "HTTP/1.1 204 No Content", "Connection: close" }, lines)
    assert.equal("", body)
    assert.has_error(function() core.http_response(204, nil, "x") end)
  end)

  it("refuses injection, reserved headers and bad statuses", function()
    assert.has_error(function() core.http_response(403, { ["X-A"] = "a\r\nSet-Cookie: x" }) end)
    assert.has_error(function() core.http_response(403, { ["Content-Length"] = "5" }) end)
    assert.has_error(function() core.http_response(403, { Connection = "keep-alive" }) end)
    assert.has_error(function() core.http_response(101) end)
    assert.has_error(function() core.http_response(600) end)
    assert.has_error(function() core.http_response("x") end)
    assert.has_error(function() core.http_response(400, 5) end)
  end)
end)

describe("handshake_client", function()
  local function lines_of(req)
    assert.equal("\r\n\r\n", req:sub(-4))
    local lines = {}
    for line in req:sub(1, -3):gmatch("(.-)\r\n") do lines[#lines + 1] = line end
    return lines
  end

  it("builds the request", function()
    local c = core.handshake_client{ host = "example.org", port = 8080, target = "/chat?x=1",
      origin = "http://example.org", protocols = { "chat", "superchat" },
      extensions = "permessage-deflate; client_max_window_bits", headers = { { "X-A", "1" }, { "Cookie", "c=2" } } }
    assert.same({
      "GET /chat?x=1 HTTP/1.1",
      "Host: example.org:8080",
      "Upgrade: websocket",
      "Connection: Upgrade",
      "Sec-WebSocket-Key: " .. c:key(),
      "Sec-WebSocket-Version: 13",
      "Origin: http://example.org",
      "Sec-WebSocket-Protocol: chat, superchat",
      "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
      "X-A: 1",
      "Cookie: c=2",
    }, lines_of(c:request()))
  end)

  it("draws a fresh 16-byte key each time", function()
    local a, b = core.handshake_client{ host = "h" }, core.handshake_client{ host = "h" }
    assert.equal(24, #a:key())
    assert.truthy(a:key():match("^[A-Za-z0-9+/]+==$"))
    assert.not_equal(a:key(), b:key())
    -- a server accepts it
    assert.is_true(feed(a:request()).websocket)
  end)

  it("writes the port only when it is not the default", function()
    local function host_line(o) return lines_of(core.handshake_client(o):request())[2] end
    assert.equal("Host: h", host_line{ host = "h" })
    assert.equal("Host: h", host_line{ host = "h", port = 80 })
    assert.equal("Host: h:443", host_line{ host = "h", port = 443 })
    assert.equal("Host: h", host_line{ host = "h", port = 443, secure = true })
    assert.equal("Host: h:80", host_line{ host = "h", port = 80, secure = true })
    assert.equal("Host: 127.0.0.1:9001", host_line{ host = "127.0.0.1", port = 9001 })
    assert.equal("Host: [::1]:9001", host_line{ host = "::1", port = 9001 })
    assert.equal("Host: [::1]", host_line{ host = "[::1]" })
    assert.equal("Host: [fe80::1%25eth0]", host_line{ host = "fe80::1%25eth0" })
    assert.equal("GET / HTTP/1.1", lines_of(core.handshake_client{ host = "h" }:request())[1])
  end)

  for _, c in ipairs({
    { "a host with CR LF", { host = "h\r\nX: y" } },
    { "a host with a space", { host = "h x" } },
    { "a host with a slash", { host = "h/x" } },
    { "a host with a port in it", { host = "example.org:8080" } },
    { "a bracketed host that is no IPv6 literal", { host = "[example.org]" } },
    { "an empty host", { host = "" } },
    { "a target with CR LF", { target = "/\r\nX: y" } },
    { "a target with a space", { target = "/a b" } },
    { "a relative target", { target = "chat" } },
    { "a target with a fragment", { target = "/a#b" } },
    { "an origin with CR LF", { origin = "http://a\r\nX: y" } },
    { "a protocol that is no token", { protocols = { "a,b" } } },
    { "a duplicate protocol", { protocols = { "a", "a" } } },
    { "a protocol that is no string", { protocols = { 1 } } },
    { "extensions with CR LF", { extensions = "a\r\nX: y" } },
    { "a header value with LF", { headers = { ["X-A"] = "a\nb" } } },
    { "a header name with a space", { headers = { ["X A"] = "a" } } },
    { "Host among the headers", { headers = { Host = "other" } } },
    { "Sec-WebSocket-Key among the headers", { headers = { { "sec-websocket-key", "x" } } } },
    { "a port out of range", { port = 70000 } },
    { "a port that is no integer", { port = "80" } },
    { "a secure flag that is no boolean", { secure = "yes" } },
    { "no host", { host = false } },
  }) do
    it("refuses " .. c[1], function()
      local opts = { host = "example.org" }
      for k, v in pairs(c[2]) do opts[k] = v end
      if opts.host == false then opts.host = nil end
      assert.has_error(function() core.handshake_client(opts) end)
    end)
  end

  describe("validates the response", function()
    local function client(o)
      o = o or {}
      o.host = o.host or "example.org"
      return core.handshake_client(o)
    end

    -- A 101 for c with header overrides: false drops a header.
    local function answer(c, over)
      over = over or {}
      local h = {
        { "Upgrade", "websocket" },
        { "Connection", "Upgrade" },
        { "Sec-WebSocket-Accept", core.accept_key(c:key()) },
      }
      for _, o in ipairs(over) do
        local done = false
        for _, pair in ipairs(h) do
          if pair[1] == o[1] then pair[2], done = o[2], true end
        end
        if not done then h[#h + 1] = { o[1], o[2] } end
      end
      local out = { "HTTP/1.1 101 Switching Protocols" }
      for _, pair in ipairs(h) do
        if pair[2] then out[#out + 1] = pair[1] .. ": " .. pair[2] end
      end
      return table.concat(out, "\r\n") .. "\r\n\r\n"
    end

    it("accepts a server built with handshake_response, whole and split anywhere", function()
      local c = client{ protocols = { "chat", "superchat" }, extensions = "permessage-deflate; client_max_window_bits" }
      local data = core.handshake_response{ key = c:key(), protocol = "superchat",
        extensions = "permessage-deflate; server_no_context_takeover; client_max_window_bits=15" }
      local res = c:feed(data .. "\129\2hi")
      assert.equal(101, res.status)
      assert.equal("Switching Protocols", res.reason)
      assert.equal("superchat", res.protocol)
      assert.same({ { name = "permessage-deflate",
        params = { server_no_context_takeover = true, client_max_window_bits = "15" },
        params_list = { { "server_no_context_takeover", true }, { "client_max_window_bits", "15" } } } },
        res.extensions)
      assert.equal("websocket", res.headers.upgrade)
      assert.equal("\129\2hi", c:rest())
      assert.has_error(function() c:feed("more") end)
      local len = #core.handshake_response{ key = c:key(), protocol = "superchat" }
      for i = 1, len - 1 do
        local c2 = client{ protocols = { "chat", "superchat" }, extensions = "permessage-deflate" }
        local d2 = core.handshake_response{ key = c2:key(), protocol = "superchat" }
        assert.is_nil(c2:feed(d2:sub(1, i)))
        local r2 = c2:feed(d2:sub(i + 1))
        assert.equal("superchat", r2.protocol)
        assert.equal("", c2:rest())
      end
    end)

    it("accepts no subprotocol chosen", function()
      local c = client{ protocols = { "chat" } }
      local res = c:feed(answer(c))
      assert.equal(101, res.status)
      assert.is_nil(res.protocol)
      assert.same({}, res.extensions)
    end)

    it("accepts lowercase upgrade tokens", function()
      local c = client()
      assert.is_table(c:feed(answer(c, { { "Upgrade", "WebSocket" }, { "Connection", "keep-alive, upgrade" } })))
    end)

    local cases = {
      { "a wrong accept", {}, { { "Sec-WebSocket-Accept", RFC_ACCEPT } }, "wrong Sec-WebSocket-Accept" },
      { "a missing accept", {}, { { "Sec-WebSocket-Accept", false } }, "response lacks Sec-WebSocket-Accept" },
      { "a missing Upgrade", {}, { { "Upgrade", false } }, "response lacks Upgrade: websocket" },
      { "a wrong Upgrade", {}, { { "Upgrade", "h2c" } }, "response lacks Upgrade: websocket" },
      { "a missing Connection", {}, { { "Connection", false } }, "response lacks Connection: Upgrade" },
      { "a subprotocol not offered", { protocols = { "chat" } }, { { "Sec-WebSocket-Protocol", "superchat" } },
        'server chose subprotocol "superchat" which was not offered' },
      { "a subprotocol when none was offered", {}, { { "Sec-WebSocket-Protocol", "chat" } },
        'server chose subprotocol "chat" which was not offered' },
      { "two subprotocols", { protocols = { "a", "b" } }, { { "Sec-WebSocket-Protocol", "a, b" } },
        "server chose more than one subprotocol" },
      { "an extension not offered", { extensions = "permessage-deflate" },
        { { "Sec-WebSocket-Extensions", "permessage-deflate, x-webkit-deflate-frame" } },
        'server chose extension "x-webkit-deflate-frame" which was not offered' },
      { "an extension when none was offered", {}, { { "Sec-WebSocket-Extensions", "permessage-deflate" } },
        'server chose extension "permessage-deflate" which was not offered' },
      { "malformed extensions", { extensions = "permessage-deflate" },
        { { "Sec-WebSocket-Extensions", "permessage-deflate; =" } }, "invalid Sec-WebSocket-Extensions" },
    }
    for _, k in ipairs(cases) do
      it("refuses " .. k[1], function()
        local c = client(k[2])
        local r, msg, res = c:feed(answer(c, k[3]))
        assert.is_nil(r)
        assert.equal(k[4], msg:sub(1, #k[4]))
        assert.equal(101, res.status)
        assert.is_table(res.headers)
      end)
    end

    it("gives a redirect's status and Location", function()
      local c = client()
      local r, msg, res = c:feed("HTTP/1.1 302 Found\r\nLocation: wss://other.example/x\r\nContent-Length: 0\r\n\r\n")
      assert.is_nil(r)
      assert.equal("handshake rejected: 302 Found", msg)
      assert.equal(302, res.status)
      assert.equal("Found", res.reason)
      assert.equal("wss://other.example/x", res.location)
      assert.equal("wss://other.example/x", res.headers.location)
    end)

    it("reports a 403 and keeps its body in rest()", function()
      local c = client()
      local r, msg, res = c:feed(core.http_response(403, nil, "go away"))
      assert.is_nil(r)
      assert.equal("handshake rejected: 403 Forbidden", msg)
      assert.equal(403, res.status)
      assert.equal("7", res.headers["content-length"])
      assert.equal("go away", c:rest())
    end)

    it("tolerates a status line without reason", function()
      local c = client()
      local r, msg, res = c:feed("HTTP/1.1 503\r\n\r\n")
      assert.is_nil(r)
      assert.equal("handshake rejected: 503", msg)
      assert.equal("", res.reason)
    end)

    it("reports malformed responses", function()
      for _, bad in ipairs({ "HTTP/1.1 10x OK\r\n\r\n", "HTTP/1.1 101 OK\nUpgrade: x\n\n", "SSH-2.0-OpenSSH\r\n\r\n",
                             "HTTP/1.1 101 OK\r\n bad: fold\r\n\r\n" }) do
        local c = client()
        local r, msg, res = c:feed(bad)
        assert.is_nil(r)
        assert.truthy(msg:find("^invalid HTTP response: "), msg)
        assert.is_nil(res)
      end
      local c = client{ max_header_size = 100 }
      local r, msg = c:feed("HTTP/1.1 101 OK\r\nX: " .. ("a"):rep(200))
      assert.is_nil(r)
      assert.equal("invalid HTTP response: header block too large", msg)
    end)

    it("has __tostring and __close", function()
      local saved
      do
        local c <close> = client()
        saved = c
        assert.truthy(tostring(c):find("^duplex.handshake_client %(reading%)"))
      end
      assert.has_error(function() saved:request() end, "handshake object is closed")
    end)
  end)
end)

-- Another implementation's handshake code as the peer: python3-websockets
-- (sans-I/O classes), run as a separate process.
describe("against python websockets", function()
  local PY = "/usr/bin/python3"

  local function tmpfile(content)
    local name = os.tmpname()
    local f = assert(io.open(name, "wb"))
    f:write(content or "")
    f:close()
    return name
  end

  local function python(script, input)
    local sname, iname = tmpfile(script), tmpfile(input)
    local p = assert(io.popen(PY .. " " .. sname .. " < " .. iname .. " 2>&1", "r"))
    local out = p:read("a")
    p:close()
    os.remove(sname)
    os.remove(iname)
    return out
  end

  it("a websockets client is accepted, and accepts our 101", function()
    local KEY = "AQIDBAUGBwgJCgsMDQ4PEA=="
    local client = [[
import sys
import websockets.client as wc
from websockets.uri import parse_uri
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
wc.generate_key = lambda: "]] .. KEY .. [["
c = wc.ClientConnection(parse_uri("ws://127.0.0.1:8765/chat?q=1"), origin="http://127.0.0.1",
                        subprotocols=["chat", "superchat"],
                        extensions=[ClientPerMessageDeflateFactory()])
req = c.connect()
c.send_request(req)
data = sys.stdin.buffer.read()
if not data:
    sys.stdout.buffer.write(b"".join(c.data_to_send()))
else:
    c.receive_data(data)
    ev = c.events_received()
    print(c.state.name, c.subprotocol, [type(e).__name__ for e in c.extensions], c.handshake_exc)
]]
    local raw_request = python(client, "")
    local hs = core.handshake_server()
    local req = assert(hs:feed(raw_request))
    assert.is_true(req.websocket, req.error)
    assert.equal(KEY, req.key)
    assert.equal("/chat", req.path)
    assert.equal("q=1", req.raw_query)
    assert.same({ q = "1" }, req.query)
    assert.equal("http://127.0.0.1", req.origin)
    assert.same({ "chat", "superchat" }, req.protocols)
    assert.equal("permessage-deflate", req.extensions[1].name)
    local response = core.handshake_response{ key = req.key, protocol = "superchat",
      extensions = "permessage-deflate" }
    local verdict = python(client, response)
    assert.equal("OPEN superchat ['PerMessageDeflate'] None\n", verdict)
    -- and a wrong answer is refused by it
    verdict = python(client, core.handshake_response{ key = RFC_KEY })
    assert.truthy(verdict:find("invalid Sec-WebSocket-Accept", 1, true), verdict)
  end)

  -- Real sockets on 127.0.0.1: a websockets server that sends a message as
  -- soon as the connection opens; the bytes our request gets back (101 and the
  -- frame, often in one read) go through handshake_client.
  it("over TCP: a websockets server's 101 and its first frame", function()
    local c = core.handshake_client{ host = "127.0.0.1", port = 8765, target = "/chat",
      protocols = { "chat" } }
    local script = [[
import asyncio, sys, websockets
async def handler(ws, path=None):
    await ws.send("welcome")
    await asyncio.sleep(1)
async def main():
    async with websockets.serve(handler, "127.0.0.1", 0, subprotocols=["chat"]) as server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(sys.stdin.buffer.read())
        data = b""
        while not data.endswith(b"welcome"):
            chunk = await reader.read(4096)
            if not chunk:
                break
            data += chunk
        sys.stdout.buffer.write(data)
        writer.close()
asyncio.run(asyncio.wait_for(main(), 10))
]]
    local got = python(script, c:request())
    local res, err = c:feed(got)
    assert.is_table(res, err or got)
    assert.equal("chat", res.protocol)
    assert.equal("\129\7welcome", c:rest())
  end)

  -- A websockets client connects over TCP to a server whose handshake is
  -- done by this module in a child lua5.4, then reads the first message.
  it("over TCP: a websockets client against our server side", function()
    local helper = tmpfile([[
local core = require "duplex.core"
local hs = core.handshake_server()
local req = assert(hs:feed(io.read("a")))
assert(req.websocket, req.error)
io.write(core.handshake_response{ key = req.key, protocol = req.protocols[2] })
]])
    local script = [[
import asyncio, os, subprocess, sys, websockets
async def handle(reader, writer):
    data = b""
    while b"\r\n\r\n" not in data:
        data += await reader.read(1)
    out = subprocess.run(["lua5.4", "]] .. helper .. [["], input=data, capture_output=True)
    sys.stderr.write(out.stderr.decode())
    writer.write(out.stdout + b"\x81\x02hi")
    await reader.read(100)                    # the client's close frame
    writer.write(b"\x88\x02\x03\xe8")
    writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with websockets.connect("ws://127.0.0.1:%d/x" % port, subprotocols=["a", "b"]) as ws:
        print("OK", ws.subprotocol, await ws.recv())
asyncio.run(asyncio.wait_for(main(), 10))
]]
    local cpath = package.cpath
    local out = python("import os; os.environ['LUA_CPATH'] = " .. string.format("%q", cpath) .. "\n" .. script, "")
    os.remove(helper)
    assert.equal("OK b hi\n", out)
  end)

  it("a websockets server accepts our request, and we accept its 101", function()
    local c = core.handshake_client{ host = "127.0.0.1", port = 8765, target = "/chat",
      protocols = { "chat", "v2" }, extensions = "permessage-deflate; client_max_window_bits" }
    local server = [[
import sys
from websockets.server import ServerConnection
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
s = ServerConnection(subprotocols=["v2"], extensions=[ServerPerMessageDeflateFactory()])
s.receive_data(sys.stdin.buffer.read())
req = s.events_received()[0]
res = s.accept(req)
s.send_response(res)
sys.stdout.buffer.write(b"".join(s.data_to_send()))
]]
    local response = python(server, c:request())
    local res, err = c:feed(response)
    assert.is_table(res, err or response)
    assert.equal("v2", res.protocol)
    assert.equal("permessage-deflate", res.extensions[1].name)
  end)
end)
