-- A WebSocket peer on duplex.core sockets with no engine behind it, for
-- specs that write frames by hand and read the server's bytes as they are.
-- Call from a loop coroutine.
local core = require "duplex.core"

local raw = {}

--- A socket past a client handshake with 127.0.0.1:port (the 101 read),
--- and the bytes that came in the same read after the 101 (the server's
--- first frames, when it sends at once).
function raw.upgrade(port, path, timeout)
  timeout = timeout or 5
  local sock = assert(core.connect { host = "127.0.0.1", port = port, timeout = timeout })
  local hc = core.handshake_client { host = "127.0.0.1", port = port, target = path or "/" }
  sock:write(hc:request())
  repeat until hc:feed(assert(sock:read(nil, timeout)))
  return sock, hc:rest()
end

--- Everything the peer sends until it closes (or timeout seconds of
--- silence), then the socket is closed. Returns the bytes and why the
--- reading ended ("closed" or "timeout").
function raw.read_all(sock, timeout)
  local got, why = {}
  while true do
    local d, err = sock:read(nil, timeout or 5)
    if not d then
      why = err
      break
    end
    got[#got + 1] = d
  end
  sock:close()
  return table.concat(got), why
end

return raw
