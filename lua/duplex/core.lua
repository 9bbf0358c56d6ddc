-- duplex.core: loads the C core (duplex/core.so on package.cpath).
--
-- This file exists only so that a core built for the wrong Lua says so.
-- The dynamic linker refuses a Lua 5.4 core inside LuaJIT (OpenResty) with
-- "undefined symbol: lua_rawgetp", and a LuaJIT core inside Lua 5.4 with
-- another missing symbol, neither of which tells a user what to install;
-- Lua's require finds this module before the C one, so it can.
local name = "duplex.core"

local function build_for_this_lua()
  if rawget(_G, "jit") or _VERSION == "Lua 5.1" then
    return "this is LuaJIT (OpenResty): use the OpenResty build (luarocks --lua-version=5.1 make"
      .. " rockspec/duplex-openresty-<version>-1.rockspec, or `make luajit` -> build/luajit/duplex/core.so)"
  end
  return "this is " .. _VERSION .. ": use the Lua 5.4 build (luarocks make rockspec/duplex-<version>-1.rockspec,"
    .. " or `make` -> build/duplex/core.so)"
end

local path, not_found = package.searchpath(name, package.cpath)
if not path then
  error("module '" .. name .. "' not found: duplex's C core is not built or not on package.cpath; "
    .. build_for_this_lua() .. "\n" .. not_found, 2)
end

local open, err = package.loadlib(path, "luaopen_duplex_core")
if not open then
  if err:find("undefined symbol: lua", 1, true) then
    error(path .. " is a duplex core built for another Lua (" .. err .. "); " .. build_for_this_lua(), 2)
  end
  error("cannot load " .. path .. ": " .. err, 2)
end
return open(name, path) --[[@as duplex.core]]
