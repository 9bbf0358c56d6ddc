/*
 * Shared declarations of the duplex.core Lua binding. Each l_*.c file owns
 * one concern and adds its functions to the module table on top of the stack.
 */
#ifndef DX_L_CORE_H
#define DX_L_CORE_H

#include <lauxlib.h>
#include <lua.h>

#include "dx_proto.h"
#include "l_compat.h" /* the 5.4 API on LuaJIT */

#define DX_ENGINE_MT "duplex.engine"
#define DX_HANDSHAKE_SERVER_MT "duplex.handshake_server"

void dx_open_engine(lua_State *L);    /* l_engine.c: engine objects, frame encoding */
void dx_open_handshake(lua_State *L); /* l_handshake.c: HTTP upgrade, both roles */
void dx_open_util(lua_State *L);      /* l_util.c: utf8, mask, random, base64, now */
void dx_open_loop(lua_State *L);      /* l_loop.c: event loop, timers, coroutines */
void dx_open_socket(lua_State *L);    /* l_socket.c: the socket object */
void dx_open_tls(lua_State *L);       /* l_tls.c: TLS contexts, starttls */
void dx_open_connect(lua_State *L);   /* l_connect.c: name resolution, connect */
void dx_open_listen(lua_State *L);    /* l_listen.c: listeners */
void dx_open_fd(lua_State *L);        /* l_fd.c: reading stdin and other fds */
void dx_open_watch(lua_State *L);     /* l_watch.c: connections served by callbacks */
/* l_watch.c: a message handler for lua_pcall, the message with a traceback */
int dx_lua_traceback(lua_State *L);
/* l_handshake.c: feed n bytes to the request parser at idx
 * (core.handshake_server): pushes nil while more is to come, the request
 * once it is complete, or nil, status, message for a malformed one, and
 * returns how many. What hs:feed and sock:take_request share. */
int dx_handshake_feed(lua_State *L, int idx, const char *data, size_t n);
/* l_handshake.c: append to out the 101 that the options at idx ask for
 * (core.handshake_response's); raises on a bad option or when memory runs
 * out, out then as it was. */
void dx_handshake_build_accept(lua_State *L, int idx, dx_buf *out);
/* l_handshake.c: a request table as one string (1 pushed), or 0 when it
 * holds the application's fields; and the table again */
int dx_request_pack(lua_State *L, int idx);
void dx_request_unpack(lua_State *L, int idx);
void dx_open_conn(lua_State *L);     /* l_conn.c: a connection's send and messages() step */
void dx_open_fanout(lua_State *L);    /* l_fanout.c: one frame queued on many connections */
void dx_open_pmd(lua_State *L);       /* l_pmd.c: permessage-deflate negotiation */

/* The engine behind a duplex.engine userdata (raises a Lua error otherwise). */
dx_proto *dx_check_engine(lua_State *L, int idx);
/* The same for an index already checked to hold an engine: NULL once the
 * engine is released (its connection ended while a coroutine waited). */
dx_proto *dx_live_engine(lua_State *L, int idx);
/* The same, raising dx_check_engine's error once it is released. */
dx_proto *dx_check_live_engine(lua_State *L, int idx);
/* The protocol state of the engine at idx (its type checked by the caller),
 * live or released, without reading it (core.fan_out prefetches it). */
dx_proto *dx_engine_at(lua_State *L, int idx);
/* What e:tick() says for a DX_TICK_* code (NULL for DX_TICK_NONE). */
const char *dx_tick_name(int tick);
/* Queue the string at index frame, a server's whole encoded frame, on the
 * live server engine at idx (by reference when large, kept alive in the
 * engine's user value): what e:send_raw does, unchecked. Returns 0 or a
 * DX_E_* code. */
int dx_engine_send_raw(lua_State *L, int idx, int frame);
/* Queue the string at index data as one whole text (binary 0) or binary
 * message on the engine at idx (checked by the caller, and live), what
 * e:send does. Returns 0 or a DX_E_* code. */
int dx_engine_send(lua_State *L, int idx, int data, int binary, int compress);
/* What e:send and its kin return for rc: true; fail and why (the word
 * "overflow" past max_buffered); or a raised error for the caller's
 * mistakes (DX_E_ARG, DX_E_UTF8). */
int dx_engine_push_result(lua_State *L, int rc);

/* Parse the next event of the engine at stack index idx and push its values (kind first, as
 * engine:next() returns them); returns how many, 0 when it needs more bytes.
 * Whatever input is left is copied into the engine, so the caller may feed
 * from one receive buffer shared by every connection. */
int dx_engine_next(lua_State *L, int idx);
/* The same, the rest of the input left where it was fed from: the caller
 * makes the engine keep it (dx_proto_keep) before that memory is reused. */
int dx_engine_next_unkept(lua_State *L, int idx);

/* luaL_checkudata for hot paths. luaL_checkudata finds the metatable by
 * name, which interns the name string on every call (a measurable share of a
 * small echo), and a light-userdata key in the registry costs about as much
 * (Lua compares such keys through luaV_equalobj, node by node). Instead the
 * metatable carries its own tag at integer key 1, an array-speed lookup: the
 * address of a static constant that exists only to be unique. Lua code cannot
 * make a light userdata nor set a userdata's metatable, so only a metatable
 * made here carries it. dx_register_mt tags the metatable on top of the stack. */
#define DX_MT_TAG 1

static inline void dx_register_mt(lua_State *L, const void *key) {
  lua_pushlightuserdata(L, (void *)key);
  lua_rawseti(L, -2, DX_MT_TAG);
}

static inline void *dx_checkudata(lua_State *L, int idx, const void *key, const char *tname) {
  void *p = lua_touserdata(L, idx);
  if (p && lua_getmetatable(L, idx)) {
    int same = lua_rawgeti(L, -1, DX_MT_TAG) == LUA_TLIGHTUSERDATA && lua_touserdata(L, -1) == key;
    lua_pop(L, 2);
    if (same) return p;
  }
  return luaL_checkudata(L, idx, tname); /* raises the usual error */
}

/* Argument 1 of a method of a class made with its metatable as the
 * methods' upvalue 1 (dx_lua_new_class, the engine's): one comparison
 * instead of dx_checkudata's registry lookup, on every call of a hot
 * method. Only for such methods: another function's upvalue 1 would not
 * name this class. */
static inline void *dx_checkself(lua_State *L, const void *key, const char *tname) {
  void *p = lua_touserdata(L, 1);
  if (p && lua_getmetatable(L, 1)) {
    int same = lua_rawequal(L, -1, lua_upvalueindex(1));
    lua_pop(L, 1);
    if (same) return p;
  }
  return dx_checkudata(L, 1, key, tname);
}

/* Options tables: field of table t as an integer in lo..hi (dflt when nil),
 * or as a truth value (dflt when nil). Wrong values raise a Lua error that
 * names the field. */
lua_Integer dx_opt_integer(lua_State *L, int t, const char *field, lua_Integer dflt, lua_Integer lo,
                           lua_Integer hi);
int dx_opt_flag(lua_State *L, int t, const char *field, int dflt);

/* Argument idx as an integer in lo..hi (dflt when absent), checked before
 * any cast to a narrower C type: a value that would wrap raises an error
 * that names the argument. */
lua_Integer dx_check_range(lua_State *L, int idx, lua_Integer lo, lua_Integer hi);
lua_Integer dx_opt_range(lua_State *L, int idx, lua_Integer dflt, lua_Integer lo, lua_Integer hi);

/* A table with weak keys in the registry under key, made unless a first
 * require of the module made it (objects -> what the module keeps for
 * them, let go with them). */
void dx_weak_registry(lua_State *L, const void *key);

/* Add the functions in l to the table at the top of the stack. */
static inline void dx_setfuncs(lua_State *L, const luaL_Reg *l) { luaL_setfuncs(L, l, 0); }

#endif
