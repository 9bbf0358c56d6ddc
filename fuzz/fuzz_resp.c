/*
 * libFuzzer harness for duplex.resp (Lua): the RESP reply parser never
 * raises, and the values (or the error) it finds do not depend on how the
 * bytes are cut: the input fed whole, byte by byte and in pieces of the
 * size the first byte gives must give the same values and the same error.
 * Small limits, so that the limit paths are reached too.
 */
#include <stdint.h>

#include "lua_harness.h"

static const char CHECK[] =
    "local resp = require 'duplex.resp'\n"
    "local function show(v)\n"
    "  if type(v) ~= 'table' then return type(v) .. ':' .. tostring(v) end\n"
    "  if v.err then return 'err:' .. v.err end\n"
    "  local t = {} for i, x in ipairs(v) do t[i] = show(x) end return '[' .. table.concat(t, ',') .. ']'\n"
    "end\n"
    "local function run(s, cut)\n"
    "  local p = resp.parser { max_bulk = 4096, max_elements = 64, max_depth = 8 }\n"
    "  local out, at = {}, 0\n"
    "  while at < #s do\n"
    "    local n = math.min(cut, #s - at)\n"
    "    p:feed(s:sub(at + 1, at + n)); at = at + n\n"
    "    while true do\n"
    "      local ok, v, err = pcall(p.next, p)\n"
    "      assert(ok, 'next raised: ' .. tostring(v))\n"
    "      if err then out[#out + 1] = 'ERROR' return table.concat(out, '|') end\n"
    "      if v == nil then break end\n"
    "      out[#out + 1] = show(v)\n"
    "    end\n"
    "  end\n"
    "  return table.concat(out, '|')\n"
    "end\n"
    "return function(s)\n"
    "  if #s < 1 then return end\n"
    "  local cut = s:byte(1) % 16 + 1\n"
    "  s = s:sub(2)\n"
    "  local whole = run(s, math.max(#s, 1))\n"
    "  assert(run(s, 1) == whole, 'byte by byte differs')\n"
    "  assert(run(s, cut) == whole, 'cut ' .. cut .. ' differs')\n"
    "end\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_lua_check(fuzz_lua_state(CHECK), data, size);
  return 0;
}
