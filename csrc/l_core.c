/*
 * luaopen_duplex_core: the duplex.core module. The module keeps no C globals;
 * whatever state it needs lives in userdata and in the registry of the Lua
 * state that loaded it, so several states (threads, nginx workers) can load
 * it at once.
 */
#include "l_core.h"

__attribute__((visibility("default"))) int luaopen_duplex_core(lua_State *L);

int luaopen_duplex_core(lua_State *L) {
  lua_newtable(L);
  dx_open_util(L);
  dx_open_engine(L);
  dx_open_handshake(L);
  dx_open_pmd(L);
  dx_open_loop(L);
  dx_open_socket(L);
  lua_pushliteral(L, "0.1.0");
  lua_setfield(L, -2, "version");
  return 1;
}
