/*
 * The per-message path of a WebSocket connection on our loop, in C:
 * ws:send and the step of ws:messages() for the common case, so that an
 * echoed message costs no Lua frame of the library's. Everything else --
 * the caller's mistakes, a connection that is closing or closed, any
 * event but a whole message, a refusal, waiting for room -- goes to the
 * Lua functions these were made with (websocket.lua), which stay the one
 * home of those rules. The connection is the Lua table of websocket.lua:
 * these read its fields as its methods do.
 */
#include "l_socket.h"

/* Upvalues of both closures: the Lua fallback first, then interned words
 * (compared by identity with what the engine and the caller pass) and the
 * names of the fields read (lua_getfield would look each name up in the
 * string table on every call), the sockets' metatable, then after_event
 * for the step. */
#define WORDS(X)                                                                \
  X(TEXT, "text") X(BINARY, "binary") X(OPEN, "open") X(CLOSED, "closed")        \
  X(SOCK, "sock") X(STATE, "state") X(SENDING, "_sending")    \
  X(READING, "_reading") X(DEFLATE, "deflate") X(THRESHOLD, "compress_threshold") \
  X(HIGH_WATER, "high_water") X(OVER, "_over") X(REFUSED, "_refused") X(ROOM, "_room")
#define UP_ENUM(name, word) UP_##name,
enum { UP_FALLBACK = 1, WORDS(UP_ENUM) UP_SOCK_MT, UP_AFTER };

#define UP(i) lua_upvalueindex(i)

/* Whatever the called Lua function returned. */
static int pass_k(lua_State *L, int status, lua_KContext base) {
  return lua_gettop(L) - (int)base;
}

/* Call the function below the n values on top, which may wait, and return
 * all it returns. */
static int call_on(lua_State *L, int n) {
  int base = lua_gettop(L) - n - 1;
  lua_callk(L, n, LUA_MULTRET, base, pass_k);
  return pass_k(L, LUA_OK, base);
}

/* The fallback, with the arguments as given. */
static int fallback(lua_State *L) {
  lua_pushvalue(L, UP(UP_FALLBACK));
  lua_insert(L, 1);
  return call_on(L, lua_gettop(L) - 1);
}

/* Push ws's field named by upvalue up (read through its class, as Lua
 * would). */
static void field(lua_State *L, int up) {
  lua_pushvalue(L, UP(up));
  lua_gettable(L, 1);
}

/* The field as a truth value. */
static int field_true(lua_State *L, int up) {
  field(L, up);
  int v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

static int field_is(lua_State *L, int up, int word) {
  field(L, up);
  int v = lua_rawequal(L, -1, UP(word));
  lua_pop(L, 1);
  return v;
}

/* The integer field in *v; 0 when it is not one (the slow path decides
 * what a float or a wrong value means). */
static int field_integer(lua_State *L, int up, lua_Integer *v) {
  field(L, up);
  int is = lua_isinteger(L, -1);
  *v = lua_tointeger(L, -1);
  lua_pop(L, 1);
  return is;
}

static void set_reading(lua_State *L, int ws, int on) {
  lua_pushvalue(L, UP(UP_READING));
  lua_pushboolean(L, on);
  lua_rawset(L, ws);
}

/* Call ws's method with the values on top (n of them). */
static int call_method(lua_State *L, int up, int n) {
  field(L, up);
  lua_insert(L, -n - 1);
  lua_pushvalue(L, 1);
  lua_insert(L, -n - 1);
  return call_on(L, n + 1);
}

/* The socket at idx, or NULL for anything else. */
static lsock *to_sock(lua_State *L, int idx) {
  lsock *s = lua_touserdata(L, idx);
  if (!s || !lua_getmetatable(L, idx)) return NULL;
  int same = lua_rawequal(L, -1, UP(UP_SOCK_MT));
  lua_pop(L, 1);
  return same ? s : NULL;
}

/* Push ws.sock and its engine when ws.sock is a socket with a live engine
 * attached, and return the socket; else NULL, with nothing more on the
 * stack. The attached engine is ws.engine: a connection on our loop is
 * made from a socket and the engine attached to it (server.lua, client.lua),
 * so the socket's reference is read instead of the field (a lookup less,
 * and a cache line of the connection's table fewer, per call). */
static lsock *push_attached(lua_State *L) {
  int top = lua_gettop(L);
  field(L, UP_SOCK);
  lsock *s = to_sock(L, top + 1);
  if (s && !s->closed && s->engine && s->engine->cfg.max_message) {
    lua_getiuservalue(L, top + 1, UV_ENGINE);
    return s;
  }
  lua_settop(L, top);
  return NULL;
}

/* ws:send(data[, kind[, opts]]). stack: ws, data, kind, opts */
static int conn_send(lua_State *L) {
  int binary;
  if (lua_type(L, 1) != LUA_TTABLE || lua_type(L, 2) != LUA_TSTRING || !lua_isnoneornil(L, 4)) return fallback(L);
  if (lua_isnoneornil(L, 3) || lua_rawequal(L, 3, UP(UP_TEXT))) binary = 0;
  else if (lua_rawequal(L, 3, UP(UP_BINARY))) binary = 1;
  else return fallback(L);
  if (field_true(L, UP_SENDING) || !field_is(L, UP_STATE, UP_OPEN)) return fallback(L);
  int compress = 0;
  lua_Integer threshold, high;
  if (field_true(L, UP_DEFLATE)) {
    if (!field_integer(L, UP_THRESHOLD, &threshold)) return fallback(L);
    compress = (lua_Integer)lua_rawlen(L, 2) >= threshold;
  }
  if (!field_integer(L, UP_HIGH_WATER, &high)) return fallback(L);
  lua_settop(L, 2);
  lsock *s = push_attached(L);
  if (!s) return fallback(L);
  int rc = dx_engine_send(L, 4, 2, binary, compress);
  if (rc) {
    dx_engine_push_result(L, rc); /* fail, why */
    lua_replace(L, 2);              /* ws, why */
    lua_settop(L, 2);
    return call_method(L, UP_REFUSED, 1);
  }
  /* under high water, with no send timer running (duplex.callbacks'):
   * there is nothing for _room to do */
  if ((lua_Integer)dx_sock_buffered(s) <= high && !field_true(L, UP_OVER)) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_settop(L, 1);
  return call_method(L, UP_ROOM, 0);
}

/* The step of ws:messages(), after the read. stack: sock, engine, nil
 * (no timeout), ws, then the event's values. */
static int next_k(lua_State *L, int status, lua_KContext ctx) {
  int n = dx_sock_receive_step(L, status, (dx_task *)ctx, next_k);
  set_reading(L, 4, 0);
  if (n == 2 && (lua_rawequal(L, -2, UP(UP_TEXT)) || lua_rawequal(L, -2, UP(UP_BINARY)))) {
    lua_insert(L, -2); /* data, kind */
    return 2;
  }
  /* what the Lua receive does with any other event or a failed read */
  lua_pushvalue(L, UP(UP_AFTER));
  lua_pushvalue(L, 4);
  lua_rotate(L, -n - 2, 2);
  return call_on(L, n + 1);
}

/* for message, kind in ws:messages(): the next whole message. stack: ws */
static int conn_next(lua_State *L) {
  lua_settop(L, 1);
  if (!lua_isyieldable(L) || field_true(L, UP_READING) || field_is(L, UP_STATE, UP_CLOSED)) return fallback(L);
  if (!push_attached(L)) return fallback(L);
  lua_rotate(L, 1, -1); /* sock, engine, ws */
  lua_pushnil(L);
  lua_insert(L, 3); /* sock, engine, nil, ws */
  set_reading(L, 4, 1);
  return next_k(L, LUA_OK, (lua_KContext)dx_lua_begin(L, 3));
}

/* Push the closure f with the fallback at idx, the words and, for the
 * step, after_event at idx + 1. */
static void push_fast(lua_State *L, lua_CFunction f, int idx, int with_after) {
  lua_pushvalue(L, idx);
#define PUSH_WORD(name, word) lua_pushliteral(L, word);
  WORDS(PUSH_WORD)
  luaL_getmetatable(L, DX_SOCK_MT);
  int n = UP_AFTER - 1;
  if (with_after) {
    lua_pushvalue(L, idx + 1);
    n++;
  }
  lua_pushcclosure(L, f, n);
}

/* core.fast_send(lua_send) -> ws:send in C, lua_send for the rest */
static int l_fast_send(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  push_fast(L, conn_send, 1, 0);
  return 1;
}

/* core.fast_next(lua_next, after_event) -> the step of ws:messages() in C:
 * lua_next(ws) when it cannot start (not in a coroutine of the loop, a
 * connection being read or closed), after_event(ws, kind, data, ...) with
 * any event but a whole message (kind nil: the read failed, data why). */
static int l_fast_next(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  push_fast(L, conn_next, 1, 1);
  return 1;
}

void dx_open_conn(lua_State *L) {
  static const luaL_Reg funcs[] = {
      {"fast_send", l_fast_send},
      {"fast_next", l_fast_next},
      {NULL, NULL},
  };
  dx_setfuncs(L, funcs);
}
