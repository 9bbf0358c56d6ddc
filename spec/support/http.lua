-- A plain HTTP/1.1 GET on our own sockets, from a spec's main chunk or a
-- loop coroutine (in-process servers keep serving meanwhile).
--
--   local status, headers, body = require("support.http").get(port, "/health")
local core = require "duplex.core"
local runtime = require "duplex.runtime"

local http = {}

local function get(port, path)
  local s = assert(core.connect{host = "127.0.0.1", port = tonumber(port), timeout = 5})
  s:write("GET " .. path .. " HTTP/1.1\r\nHost: 127.0.0.1:" .. port .. "\r\nConnection: close\r\n\r\n")
  local parts = {}
  while true do
    local d = s:read(nil, 5)
    if not d then break end
    parts[#parts + 1] = d
  end
  s:close()
  local response = table.concat(parts)
  local head, body = response:match("^(.-)\r\n\r\n(.*)$")
  assert(head, "no HTTP response: " .. response)
  local headers = {}
  for k, v in head:gmatch("\r\n([^:\r\n]+):%s*([^\r\n]*)") do headers[k:lower()] = v end
  return tonumber(head:match("^HTTP/1%.1 (%d%d%d)")), headers, body
end

--- GET path from 127.0.0.1:port; returns status, lower-cased headers, body.
function http.get(port, path)
  return runtime.blocking(get, port, path)
end

return http
