/*
 * For harnesses of duplex's Lua parsers (fuzz_url.c, fuzz_resp.c): one Lua
 * state per process with lua/ on the path (run from the repository root,
 * or set DUPLEX_LUA_DIR), and a Lua checker function called with each
 * input. The checker raises when a property fails: that aborts the run.
 *
 * The Lua interpreter is not instrumented, so libFuzzer would see no
 * coverage of the Lua code it tests. A line hook gives it some: each step
 * from one Lua line to the next (source and line hashed, as AFL hashes
 * edges) bumps a counter in libFuzzer's extra-counters section, so inputs
 * that take new paths through the parser are kept.
 */
#ifndef DX_FUZZ_LUA_HARNESS_H
#define DX_FUZZ_LUA_HARNESS_H

#include <stdint.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>

#define LUA_EDGES (1u << 16)
__attribute__((section("__libfuzzer_extra_counters"))) static uint8_t lua_edges[LUA_EDGES];
static uint32_t lua_prev_line;

static void line_hook(lua_State *L, lua_Debug *ar) {
  if (!lua_getinfo(L, "S", ar)) return;
  uint32_t here = (uint32_t)((uintptr_t)ar->source * 2654435761u) ^ (uint32_t)ar->currentline * 40503u;
  lua_edges[(here ^ lua_prev_line) & (LUA_EDGES - 1)]++;
  lua_prev_line = here >> 1;
}

/* The checker: the function returned by the chunk `src`. */
static lua_State *fuzz_lua_state(const char *src) {
  static lua_State *L;
  if (L) return L;
  L = luaL_newstate();
  luaL_openlibs(L);
  const char *dir = getenv("DUPLEX_LUA_DIR");
  lua_getglobal(L, "package");
  lua_pushfstring(L, "%s/?.lua;%s/?/init.lua", dir ? dir : "lua", dir ? dir : "lua");
  lua_setfield(L, -2, "path");
  lua_pop(L, 1);
  if (luaL_dostring(L, src) != LUA_OK) {
    fprintf(stderr, "harness: %s\n", lua_tostring(L, -1));
    abort();
  }
  lua_setglobal(L, "check");
  lua_sethook(L, line_hook, LUA_MASKLINE, 0);
  return L;
}

static void fuzz_lua_check(lua_State *L, const uint8_t *data, size_t size) {
  lua_prev_line = 0;
  lua_getglobal(L, "check");
  lua_pushlstring(L, (const char *)data, size);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
    fprintf(stderr, "property failed: %s\n", lua_tostring(L, -1));
    abort();
  }
  lua_settop(L, 0);
  lua_gc(L, LUA_GCSTEP, 0);
}

#endif
