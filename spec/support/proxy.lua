-- A small HTTP CONNECT proxy on our own sockets (in this process: it serves
-- while the loop runs): it checks credentials, opens the tunnel and copies
-- bytes both ways.
--
--   local proxy = require("support.proxy").start("dXNlcjpwYXNz")  -- base64 user:pass, or nil
--   proxy.port, proxy.requests (each request head), proxy.close()
local core = require "duplex.core"

local proxies = {}

function proxies.start(credentials)
  local proxy = { requests = {} }
  local listener = assert(core.listen { host = "127.0.0.1", port = 0 })
  proxy.port = select(2, listener:address())
  local function pipe(from, to)
    while true do
      local data = from:read(nil)
      if not data then break end
      to:write(data)
    end
    to:flush(1)
    to:close()
  end
  core.spawn(function()
    while true do
      local client = listener:accept()
      if not client then return end
      core.spawn(function()
        local head = ""
        while not head:find("\r\n\r\n", 1, true) do
          local d = client:read(nil, 5)
          if not d then client:close() return end
          head = head .. d
        end
        proxy.requests[#proxy.requests + 1] = head
        local host, port = head:match("^CONNECT ([^%s]+):(%d+) HTTP/1%.1\r\n")
        local auth = head:match("\r\n[Pp]roxy%-[Aa]uthorization: ([^\r\n]+)")
        if credentials and auth ~= "Basic " .. credentials then
          client:write("HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
          client:flush(1)
          client:close()
          return
        end
        local upstream = core.connect { host = host, port = tonumber(port), timeout = 2 }
        if not upstream then
          client:write("HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
          client:flush(1)
          client:close()
          return
        end
        client:write("HTTP/1.1 200 Connection established\r\n\r\n")
        core.spawn(pipe, upstream, client)
        pipe(client, upstream)
      end)
    end
  end)
  proxy.close = function() listener:close() end
  return proxy
end

return proxies
