/*
 * libFuzzer harness for duplex.url (Lua): url.parse never raises; what it
 * accepts has a host that a request line and a Host header can carry (no
 * space, no control byte), a port in 1..65535 and a target starting with
 * "/"; and the URL rebuilt from host_header and target parses back to the
 * same host, port and target. The input is tried whole and behind "ws://".
 */
#include <stdint.h>

#include "lua_harness.h"

static const char CHECK[] =
    "local url = require 'duplex.url'\n"
    "local function one(s)\n"
    "  local ok, u, err = pcall(url.parse, s)\n"
    "  assert(ok, 'url.parse raised: ' .. tostring(u))\n"
    "  if not u then assert(type(err) == 'string' and not err:find('[\\r\\n]')) return end\n"
    "  assert(not u.host:find('[%s%c]'), 'host with a space or control byte')\n"
    "  assert(math.type(u.port) == 'integer' and u.port >= 1 and u.port <= 65535)\n"
    "  assert(u.target:sub(1, 1) == '/')\n"
    "  local h = url.host_header(u)\n"
    "  assert(not h:find('[%s%c]'))\n"
    "  local again = assert(url.parse(u.scheme .. '://' .. h .. u.target), 'rebuilt URL refused')\n"
    "  assert(again.host == u.host:gsub('%%.*$', '') or again.host == u.host, 'host changed')\n"
    "  assert(again.port == u.port and again.target == u.target, 'port or target changed')\n"
    "end\n"
    "return function(s) one(s) one('ws://' .. s) end\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_lua_check(fuzz_lua_state(CHECK), data, size);
  return 0;
}
