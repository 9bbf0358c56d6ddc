/*
 * luaopen_duplex_core: the duplex.core module. The module keeps no C globals;
 * whatever state it needs lives in userdata and in the registry of the Lua
 * state that loaded it, so several states (threads, nginx workers) can load
 * it at once.
 */
#include <stdio.h>

#include "dx_http.h"
#include "dx_version.h"
#include "l_core.h"

lua_Integer dx_opt_integer(lua_State *L, int t, const char *field, lua_Integer dflt, lua_Integer lo,
                           lua_Integer hi) {
  lua_getfield(L, t, field);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return dflt;
  }
  int isint = 0;
  lua_Integer v = lua_type(L, -1) == LUA_TNUMBER ? lua_tointegerx(L, -1, &isint) : 0;
  if (!isint || v < lo || v > hi) {
    char range[64]; /* not %I: LuaJIT's luaL_error lacks it (l_compat.h) */
    snprintf(range, sizeof range, "%lld to %lld", (long long)lo, (long long)hi);
    luaL_error(L, "option '%s' must be an integer from %s", field, range);
  }
  lua_pop(L, 1);
  return v;
}

lua_Integer dx_check_range(lua_State *L, int idx, lua_Integer lo, lua_Integer hi) {
  lua_Integer v = luaL_checkinteger(L, idx);
  if (v < lo || v > hi) {
    char msg[80];
    snprintf(msg, sizeof msg, "must be an integer from %lld to %lld", (long long)lo, (long long)hi);
    luaL_argerror(L, idx, msg);
  }
  return v;
}

lua_Integer dx_opt_range(lua_State *L, int idx, lua_Integer dflt, lua_Integer lo, lua_Integer hi) {
  return lua_isnoneornil(L, idx) ? dflt : dx_check_range(L, idx, lo, hi);
}

void dx_weak_registry(lua_State *L, const void *key) {
  int have = lua_rawgetp(L, LUA_REGISTRYINDEX, key) != LUA_TNIL;
  lua_pop(L, 1);
  if (have) return;
  lua_newtable(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_rawsetp(L, LUA_REGISTRYINDEX, key);
}

int dx_opt_flag(lua_State *L, int t, const char *field, int dflt) {
  int v = lua_getfield(L, t, field) == LUA_TNIL ? dflt : lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

__attribute__((visibility("default"))) int luaopen_duplex_core(lua_State *L);

int luaopen_duplex_core(lua_State *L) {
  lua_newtable(L);
  dx_open_util(L);
  dx_open_engine(L);
  dx_open_handshake(L);
  dx_open_pmd(L);
#if DX_HAVE_LOOP
  dx_open_loop(L);
  dx_open_socket(L);
  dx_open_tls(L);
  dx_open_connect(L);
  dx_open_listen(L);
  dx_open_fd(L);
  dx_open_watch(L);
  dx_open_conn(L);
  dx_open_fanout(L);
#endif
  lua_pushliteral(L, DX_VERSION);
  lua_setfield(L, -2, "version");
  /* the C defaults, so that the Lua layer repeats none of them */
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, (lua_Integer)DX_DEFAULT_MAX_MESSAGE);
  lua_setfield(L, -2, "max_message");
  lua_pushinteger(L, DX_HTTP_DEFAULT_MAX_SIZE);
  lua_setfield(L, -2, "max_header_size");
  lua_pushinteger(L, DX_HTTP_DEFAULT_MAX_HEADERS);
  lua_setfield(L, -2, "max_headers");
  lua_setfield(L, -2, "defaults");
  return 1;
}
