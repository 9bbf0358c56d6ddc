-- Build raw WebSocket frames in plain Lua, independently of the C encoder,
-- so the specs check the engine against the RFC and not against itself.
local frames = {}

local function mask(payload, key)
  local out = {}
  for i = 1, #payload do
    local k = key:byte((i - 1) % 4 + 1)
    out[i] = string.char(payload:byte(i) ~ k)
  end
  return table.concat(out)
end
frames.mask = mask

local OPCODES = { cont = 0, text = 1, binary = 2, close = 8, ping = 9, pong = 10 }

-- frames.build{ op = "text"|number, payload = "", fin = true, rsv = 0,
--               key = "abcd" (masks) or nil, len = override length }
function frames.build(f)
  local payload = f.payload or ""
  local op = type(f.op) == "number" and f.op or OPCODES[f.op or "text"]
  local fin = f.fin == nil and true or f.fin
  local b1 = (fin and 0x80 or 0) | ((f.rsv or 0) << 4) | op
  local len = f.len or #payload
  local maskbit = f.key and 0x80 or 0
  local hdr
  if len < 126 and not f.len16 and not f.len64 then
    hdr = string.char(b1, maskbit | len)
  elseif len <= 0xffff and not f.len64 then
    hdr = string.char(b1, maskbit | 126) .. string.pack(">I2", len)
  else
    hdr = string.char(b1, maskbit | 127) .. string.pack(">I8", len)
  end
  if f.key then return hdr .. f.key .. mask(payload, f.key) end
  return hdr .. payload
end

-- A close frame payload: code (2 bytes) and reason.
function frames.close_payload(code, reason)
  if not code then return "" end
  return string.pack(">I2", code) .. (reason or "")
end

function frames.hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

function frames.unhex(h)
  h = h:gsub("%s", "")
  return (h:gsub("..", function(x) return string.char(tonumber(x, 16)) end))
end

return frames
