-- The rockspec lists its files by hand: it must name every C source and Lua
-- module, or `luarocks make` builds a module that fails at run time.
local function lines(cmd)
  local out = {}
  local p = io.popen(cmd)
  for l in p:lines() do out[#out + 1] = l end
  p:close()
  return out
end

describe("rockspec", function()
  local text
  setup(function()
    local f = assert(io.open("rockspec/duplex-scm-1.rockspec"))
    text = f:read("a")
    f:close()
  end)

  it("lists every C source", function()
    for _, c in ipairs(lines("ls csrc/*.c")) do
      assert.truthy(text:find('"' .. c .. '"', 1, true), c .. " missing from the rockspec")
    end
  end)

  it("lists every Lua module", function()
    for _, path in ipairs(lines("ls lua/duplex/*.lua")) do
      local name = path:match("lua/duplex/(.-)%.lua$")
      local module = name == "init" and "duplex" or "duplex." .. name
      assert.truthy(text:find('["' .. module .. '"] = "' .. path .. '"', 1, true),
        module .. " missing from the rockspec")
    end
  end)
end)
