/*
 * lua_sym: a minimal `lua5.4 SCRIPT ARGS...` linked with the static
 * liblua5.4.a, whose symbol table (unlike Debian's stripped lua5.4 binary)
 * names the interpreter's functions -- luaV_execute, luaH_getshortstr, ... --
 * in perf and callgrind profiles. -Wl,-E exports the Lua API to C modules
 * such as duplex.core, as lua5.4 does.
 *
 *   bench/lua_sym examples/echo.lua --port 0
 */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdio.h>

static int traceback(lua_State *L) {
  luaL_traceback(L, L, lua_tostring(L, 1), 1);
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fputs("usage: lua_sym SCRIPT [ARGS...]\n", stderr);
    return 2;
  }
  lua_State *L = luaL_newstate();
  if (!L) return 1;
  luaL_openlibs(L);
  /* arg[0] is the script, arg[1..] its arguments, as with lua5.4 */
  lua_createtable(L, argc - 2, 2);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - 1);
  }
  lua_setglobal(L, "arg");
  lua_pushcfunction(L, traceback);
  if (luaL_loadfile(L, argv[1]) != LUA_OK) {
    fprintf(stderr, "lua_sym: %s\n", lua_tostring(L, -1));
    return 1;
  }
  for (int i = 2; i < argc; i++) lua_pushstring(L, argv[i]);
  int status = lua_pcall(L, argc - 2, 0, 1);
  if (status != LUA_OK) fprintf(stderr, "lua_sym: %s\n", lua_tostring(L, -1));
  lua_close(L);
  return status == LUA_OK ? 0 : 1;
}
