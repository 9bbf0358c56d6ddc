/*
 * The WebSocket connection object of websocket.lua, and its per-message
 * path on our loop.
 *
 * The object (core.connection) is a userdata: what every connection has
 * -- its socket, engine, request, address -- in its user values, the flags
 * read on every message (state, _reading, _sending) in its struct, and
 * whatever else it is given in a table made only then (most server
 * connections never have one). Fields it does not have are its class's,
 * as for a table whose metatable is the class. An idle connection costs
 * one object instead of a table with a hash part of 8 and its data table,
 * which is made when first read.
 *
 * The per-message path: ws:send and the step of ws:messages() for the
 * common case, so that an echoed message costs no Lua frame of the
 * library's. Everything else -- the caller's mistakes, a connection that
 * is closing or closed, any event but a whole message, a refusal, waiting
 * for room -- goes to the Lua functions these were made with
 * (websocket.lua), which stay the one home of those rules.
 */
#include "l_socket.h"

/* ---- the connection object ---- */

/* User values: the fields every connection has, then the table of the
 * others. */
#define SLOTS(X)                                                                   \
  X(SOCK, "sock") X(ENGINE, "engine") X(REQUEST, "request") X(REMOTE_ADDRESS, "remote_address")
#define SLOT_ENUM(name, word) CV_##name,
enum { CV_NONE, SLOTS(SLOT_ENUM) CV_FIELDS, CV_COUNT = CV_FIELDS };
#define NSLOTS (CV_COUNT - 1)

/* Fields a connection may have that take no user value of their own (16
 * bytes each on every connection): the application's table, kept with
 * the others and made when first read, and the peer's port, in the struct
 * while it is a port number. */
#define KEPT(X) X(DATA, "data") X(REMOTE_PORT, "remote_port")
#define KEPT_ENUM(name, word) CK_##name,
enum { KEPT(KEPT_ENUM) NKEPT };

/* The flags, bytes of the struct; state is one of the words below. */
#define FLAGS(X) X(STATE, "state") X(READING, "_reading") X(SENDING, "_sending")
#define FLAG_ENUM(name, word) CF_##name,
enum { FLAGS(FLAG_ENUM) NFLAGS };
enum { STATE_OPEN, STATE_CLOSING, STATE_CLOSED, NSTATES };
static const char *const state_words[NSTATES] = {"open", "closing", "closed"};

#define CONN_MAGIC 0x64786377u /* "dxcw": an object of this struct */

typedef struct conn {
  uint32_t magic;
  uint8_t flag[NFLAGS];
  uint8_t has_fields; /* CV_FIELDS holds a table: a read of a field no
                         connection has needs not look there */
  uint8_t packed_request; /* CV_REQUEST holds the request as one string
                             (core.pack_request), its table made when read */
  uint8_t has_port;       /* port is remote_port */
  uint16_t port;
  lsock *sock;        /* CV_SOCK when it is one of our sockets, else NULL:
                         set with the slot, so the per-message path checks
                         its type once per connection, not per call */
} conn;

/* The names above as the Lua strings they are interned as: a key is one of
 * them when its characters are at the same address (short strings are
 * interned), one comparison per name instead of a lookup. The strings are
 * kept alive by the user value of this block, which every function of the
 * object has as an upvalue. */
typedef struct conn_names {
  const char *slot[NSLOTS];
  const char *flag[NFLAGS];
  const char *kept[NKEPT];
  const char *state[NSTATES];
} conn_names;

/* In a connection's metatable: its class, at an integer key (an array-speed
 * lookup, where a light-userdata key costs a node-by-node comparison). */
#define MT_CLASS 1
/* ...and what the per-message path reads of the class (push_settings) */
#define MT_SETTINGS 2
static const char MTS_KEY = 0;   /* registry: class -> metatable, weak keys */

/* Upvalues of the object's metamethods: the names, the class, the state
 * words (what __index returns for state, pushed without a lookup). */
enum { CU_NAMES = 1, CU_CLASS, CU_STATE };

/* (a light userdata's raw length is 0: the size tells the two apart) */
static conn *to_conn(lua_State *L, int idx) {
  conn *c = lua_touserdata(L, idx);
  if (!c || lua_rawlen(L, idx) != sizeof(conn) || c->magic != CONN_MAGIC) return NULL;
  return c;
}

static conn *check_conn(lua_State *L, int idx) {
  conn *c = to_conn(L, idx);
  if (!c) luaL_typeerror(L, idx, "duplex.websocket");
  return c;
}

/* What name_of says a key is: a slot (CV_*), a flag or a kept field. */
#define FLAG_NAME(f) (NSLOTS + 1 + (f))
#define KEPT_NAME(k) (FLAG_NAME(NFLAGS) + (k))

/* The slot, flag or kept field that key k names, else 0. */
static int name_of(const conn_names *nm, lua_State *L, int k) {
  if (lua_type(L, k) != LUA_TSTRING) return 0;
  const char *s = lua_tostring(L, k);
  for (int i = 0; i < NSLOTS; i++)
    if (s == nm->slot[i]) return i + 1;
  for (int i = 0; i < NFLAGS; i++)
    if (s == nm->flag[i]) return FLAG_NAME(i);
  for (int i = 0; i < NKEPT; i++)
    if (s == nm->kept[i]) return KEPT_NAME(i);
  return 0;
}

/* Push the table of the connection's other fields (made when make is set
 * and it has none): 1, or 0 with nothing pushed. */
static int push_fields(lua_State *L, conn *c, int idx, int make) {
  if (c->has_fields) {
    lua_getiuservalue(L, idx, CV_FIELDS);
    return 1;
  }
  if (!make) return 0;
  lua_createtable(L, 0, 4);
  lua_pushvalue(L, -1);
  lua_setiuservalue(L, idx, CV_FIELDS);
  c->has_fields = 1;
  return 1;
}

/* Push field k of the connection c at idx that is no slot and no flag:
 * its own, else its class's (cls: the class's index). */
static void push_other(lua_State *L, const conn *c, int idx, int k, int cls) {
  if (c->has_fields) { /* a table: only conn_newindex sets CV_FIELDS */
    lua_getiuservalue(L, idx, CV_FIELDS);
    lua_pushvalue(L, k);
    if (lua_rawget(L, -2) != LUA_TNIL) {
      lua_remove(L, -2);
      return;
    }
    lua_pop(L, 2);
  }
  lua_pushvalue(L, k);
  lua_gettable(L, cls);
}

static const conn_names *names_up(lua_State *L) { return lua_touserdata(L, lua_upvalueindex(CU_NAMES)); }

/* Push user value n of the connection at idx (the request made from its
 * string when first read). */
static void push_slot(lua_State *L, conn *c, int idx, int n) {
  lua_getiuservalue(L, idx, n);
  if (n != CV_REQUEST || !c->packed_request) return;
  dx_request_unpack(L, -1);
  lua_remove(L, -2);
  c->packed_request = 0;
  lua_pushvalue(L, -1);
  lua_setiuservalue(L, idx, n);
}

/* Push kept field k of the connection at idx (its name at key). */
static void push_kept(lua_State *L, conn *c, int idx, int k, int key, int cls) {
  if (k == CK_REMOTE_PORT) {
    if (c->has_port)
      lua_pushinteger(L, c->port);
    else
      push_other(L, c, idx, key, cls);
    return;
  }
  push_fields(L, c, idx, 1);
  lua_pushvalue(L, key);
  if (lua_rawget(L, -2) == LUA_TNIL) { /* made when first read */
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, key);
    lua_pushvalue(L, -2);
    lua_rawset(L, -4);
  }
  lua_remove(L, -2);
}

/* __index(ws, k) */
static int conn_index(lua_State *L) {
  conn *c = check_conn(L, 1);
  const conn_names *nm = names_up(L);
  int n = name_of(nm, L, 2);
  if (n >= KEPT_NAME(0)) {
    push_kept(L, c, 1, n - KEPT_NAME(0), 2, lua_upvalueindex(CU_CLASS));
  } else if (n > NSLOTS) {
    int f = n - FLAG_NAME(0);
    if (f == CF_STATE)
      lua_pushvalue(L, lua_upvalueindex(CU_STATE + c->flag[CF_STATE]));
    else
      lua_pushboolean(L, c->flag[f]);
  } else if (n) {
    push_slot(L, c, 1, n);
  } else {
    push_other(L, c, 1, 2, lua_upvalueindex(CU_CLASS));
  }
  return 1;
}

static int state_of(const conn_names *nm, lua_State *L, int v) {
  if (lua_type(L, v) == LUA_TSTRING) {
    const char *s = lua_tostring(L, v);
    for (int i = 0; i < NSTATES; i++)
      if (s == nm->state[i]) return i;
  }
  return luaL_error(L, "a connection's state is \"open\", \"closing\" or \"closed\"");
}

/* __newindex(ws, k, v) */
/* ws[k] = v for the connection c at obj (k and v stack indices). */
static void conn_set(lua_State *L, conn *c, const conn_names *nm, int obj, int k, int v) {
  int n = name_of(nm, L, k), none = lua_isnil(L, v);
  if (n == KEPT_NAME(CK_REMOTE_PORT)) {
    lua_Integer port = lua_isinteger(L, v) ? lua_tointeger(L, v) : -1;
    c->has_port = port >= 0 && port <= 65535;
    if (c->has_port) {
      c->port = (uint16_t)port;
      none = 1; /* and no other value under the name */
    }
  } else if (n > NSLOTS && n < KEPT_NAME(0)) {
    int f = n - FLAG_NAME(0);
    c->flag[f] = f == CF_STATE ? (uint8_t)state_of(nm, L, v) : (uint8_t)lua_toboolean(L, v);
    return;
  } else if (n && n <= NSLOTS) {
    if (n == CV_SOCK) c->sock = luaL_testudata(L, v, DX_SOCK_MT);
    if (n == CV_REQUEST) c->packed_request = 0;
    lua_pushvalue(L, v);
    lua_setiuservalue(L, obj, n);
    return;
  }
  /* nil where there is nothing: nothing to forget */
  if (!push_fields(L, c, obj, !none)) return;
  lua_pushvalue(L, k);
  if (none)
    lua_pushnil(L);
  else
    lua_pushvalue(L, v);
  lua_rawset(L, -3);
  lua_pop(L, 1);
}

static int conn_newindex(lua_State *L) {
  conn *c = check_conn(L, 1);
  lua_settop(L, 3);
  conn_set(L, c, names_up(L), 1, 2, 3);
  return 0;
}

/* next over the copy __pairs makes (not the global next, which a sandbox
 * may not have) */
static int copy_next(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 2);
  if (lua_next(L, 1)) return 2;
  lua_pushnil(L);
  return 1;
}

/* __pairs(ws): the fields it has, as a table would list them (its flags
 * when set, state always), from a copy. */
static int conn_pairs(lua_State *L) {
  conn *c = check_conn(L, 1);
  const conn_names *nm = names_up(L);
  lua_newtable(L);
  int t = lua_gettop(L);
  if (c->has_fields) {
    lua_getiuservalue(L, 1, CV_FIELDS);
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, t);
    }
    lua_pop(L, 1);
  }
  for (int i = 0; i < NSLOTS; i++) {
    if (lua_getiuservalue(L, 1, i + 1) == LUA_TNIL) {
      lua_pop(L, 1);
      continue;
    }
    if (i + 1 == CV_REQUEST && c->packed_request) {
      lua_pop(L, 1);
      push_slot(L, c, 1, CV_REQUEST);
    }
    lua_pushstring(L, nm->slot[i]);
    lua_insert(L, -2);
    lua_rawset(L, t);
  }
  if (c->has_port) {
    lua_pushstring(L, nm->kept[CK_REMOTE_PORT]);
    lua_pushinteger(L, c->port);
    lua_rawset(L, t);
  }
  for (int i = 0; i < NFLAGS; i++) {
    if (i != CF_STATE && !c->flag[i]) continue;
    lua_pushstring(L, nm->flag[i]);
    if (i == CF_STATE)
      lua_pushvalue(L, lua_upvalueindex(CU_STATE + c->flag[i]));
    else
      lua_pushboolean(L, 1);
    lua_rawset(L, t);
  }
  lua_pushcfunction(L, copy_next);
  lua_insert(L, t);
  lua_pushnil(L);
  return 3;
}

/* The metatable of class's connections (made once per class): __index and
 * __newindex above, the class's own metamethods, and the class under
 * MT_CLASS for the per-message path. */
static void push_conn_mt(lua_State *L, int cls) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &MTS_KEY);
  int mts = lua_gettop(L);
  lua_pushvalue(L, cls);
  if (lua_rawget(L, mts) == LUA_TTABLE) {
    lua_remove(L, mts);
    return;
  }
  lua_pop(L, 1);
  lua_createtable(L, 0, 8);
  int mt = lua_gettop(L);
  static const char *const copied[] = {"__tostring", "__close", "__eq", "__concat", "__call", "__name", NULL};
  for (const char *const *m = copied; *m; m++) {
    if (lua_getfield(L, cls, *m) == LUA_TNIL)
      lua_pop(L, 1);
    else
      lua_setfield(L, mt, *m);
  }
  lua_getfield(L, mt, "__name");
  if (lua_isnil(L, -1)) {
    lua_pushliteral(L, "duplex.websocket");
    lua_setfield(L, mt, "__name");
  }
  lua_pop(L, 1);
  static const lua_CFunction fns[] = {conn_index, conn_newindex, conn_pairs};
  static const char *const fn_names[] = {"__index", "__newindex", "__pairs"};
  for (int i = 0; i < 3; i++) {
    lua_pushvalue(L, lua_upvalueindex(CU_NAMES));
    lua_pushvalue(L, cls);
    for (int w = 0; w < NSTATES; w++) lua_pushstring(L, state_words[w]);
    lua_pushcclosure(L, fns[i], CU_STATE - 1 + NSTATES);
    lua_setfield(L, mt, fn_names[i]);
  }
  lua_pushvalue(L, cls);
  lua_rawseti(L, mt, MT_CLASS);
  /* getmetatable(ws) is the class, as when ws was a table of it */
  lua_pushvalue(L, cls);
  lua_setfield(L, mt, "__metatable");
  lua_pushvalue(L, cls);
  lua_pushvalue(L, mt);
  lua_rawset(L, mts);
  lua_remove(L, mts);
}

/* core.connection(class, sock, engine[, fields]) -> a connection of
 * class (a table of methods and defaults, as for setmetatable) on sock
 * and engine, with those of fields whose values are not its class's */
static int l_connection(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  if (!lua_isnoneornil(L, 4)) luaL_checktype(L, 4, LUA_TTABLE);
  lua_settop(L, 4);
  conn *c = lua_newuserdatauv(L, sizeof *c, CV_COUNT); /* 5 */
  memset(c, 0, sizeof *c);
  c->magic = CONN_MAGIC;
  c->flag[CF_STATE] = STATE_OPEN;
  c->sock = luaL_testudata(L, 2, DX_SOCK_MT);
  lua_pushvalue(L, 2);
  lua_setiuservalue(L, 5, CV_SOCK);
  lua_pushvalue(L, 3);
  lua_setiuservalue(L, 5, CV_ENGINE);
  push_conn_mt(L, 1);
  lua_setmetatable(L, 5);
  if (lua_isnil(L, 4)) return 1;
  const conn_names *nm = names_up(L);
  lua_pushnil(L);
  while (lua_next(L, 4)) { /* 6: key, 7: value */
    lua_pushvalue(L, 6);
    lua_gettable(L, 1);
    int same = lua_compare(L, 7, 8, LUA_OPEQ);
    lua_settop(L, 7);
    if (!same) conn_set(L, c, nm, 5, 6, 7);
    lua_pop(L, 1);
  }
  return 1;
}

/* The block of interned names, its strings in its user value. */
static void push_names(lua_State *L) {
  conn_names *nm = lua_newuserdatauv(L, sizeof *nm, 1);
  lua_createtable(L, NSLOTS + NFLAGS + NKEPT + NSTATES, 0);
  int n = 0;
#define NAME(name, word) lua_pushliteral(L, word), nm->slot[CV_##name - 1] = lua_tostring(L, -1), lua_rawseti(L, -2, ++n);
  SLOTS(NAME)
#undef NAME
#define NAME(name, word) lua_pushliteral(L, word), nm->flag[CF_##name] = lua_tostring(L, -1), lua_rawseti(L, -2, ++n);
  FLAGS(NAME)
#undef NAME
#define NAME(name, word) lua_pushliteral(L, word), nm->kept[CK_##name] = lua_tostring(L, -1), lua_rawseti(L, -2, ++n);
  KEPT(NAME)
#undef NAME
  for (int i = 0; i < NSTATES; i++) {
    lua_pushstring(L, state_words[i]);
    nm->state[i] = lua_tostring(L, -1);
    lua_rawseti(L, -2, ++n);
  }
  lua_setiuservalue(L, -2, 1);
}

/* Upvalues of both closures: the Lua fallback first, then interned words
 * (compared by identity with what the engine and the caller pass) and the
 * names of the fields read (lua_getfield would look each name up in the
 * string table on every call), then after_event for the step. */
#define WORDS(X)                                                                   \
  X(TEXT, "text") X(BINARY, "binary") X(DEFLATE, "deflate")                         \
  X(THRESHOLD, "compress_threshold") X(HIGH_WATER, "high_water") X(OVER, "_over")   \
  X(REFUSED, "_refused") X(ROOM, "_room")
#define UP_ENUM(name, word) UP_##name,
enum { UP_FALLBACK = 1, WORDS(UP_ENUM) UP_AFTER };

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

/* The fallback with the first n arguments, what was pushed above them gone. */
static int fallback_at(lua_State *L, int n) {
  lua_settop(L, n);
  return fallback(L);
}

/* The connection at index 1's field named by upvalue up, neither a slot
 * nor a flag: pushed, read through its class at index cls. */
static void field(lua_State *L, int up, int cls) { push_other(L, lua_touserdata(L, 1), 1, UP(up), cls); }

/* The field as a truth value. */
static int field_true(lua_State *L, int up, int cls) {
  field(L, up, cls);
  int v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

/* The integer field in *v; 0 when it is not one (the slow path decides
 * what a float or a wrong value means). */
static int field_integer(lua_State *L, int up, int cls, lua_Integer *v) {
  field(L, up, cls);
  int is = lua_isinteger(L, -1);
  *v = lua_tointeger(L, -1);
  lua_pop(L, 1);
  return is;
}

/* Push the class of the connection at index 1. */
static int push_class(lua_State *L) {
  lua_getmetatable(L, 1);
  lua_rawgeti(L, -1, MT_CLASS);
  lua_remove(L, -2);
  return lua_gettop(L);
}

/* What the per-message path reads of a class -- its connections' high and
 * low water, its route's on_message (the block's user value) -- read once
 * and kept in their metatable: a class's settings are made with it
 * (WebSocket._route_class), and every connection with no fields of its
 * own reads them through it. (One that has some reads them each time: one
 * of them may be its own.) */
typedef struct class_settings {
  lua_Integer high, low;
} class_settings;

/* Push the block of the class at cls, or false when its limits are not
 * integers in range (the slow paths decide what those mean). */
static void make_settings(lua_State *L, int cls) {
  lua_getfield(L, cls, "high_water");
  lua_getfield(L, cls, "low_water");
  lua_Integer high = lua_tointeger(L, -2), low = lua_tointeger(L, -1);
  int ok = lua_isinteger(L, -2) && lua_isinteger(L, -1) && high >= 0 && low >= 0 && low <= UINT32_MAX;
  lua_pop(L, 2);
  if (!ok) {
    lua_pushboolean(L, 0);
    return;
  }
  class_settings *cs = lua_newuserdatauv(L, sizeof *cs, 1);
  cs->high = high;
  cs->low = low;
  if (lua_getfield(L, cls, "_route") == LUA_TTABLE) {
    lua_getfield(L, -1, "on_message");
    lua_setiuservalue(L, -3, 1);
  }
  lua_pop(L, 1);
}

/* The settings of the class at cls of the connection c at index 1, the
 * block pushed; NULL, nothing pushed, when c has fields of its own or the
 * class's limits are not plain integers. */
static const class_settings *push_settings(lua_State *L, const conn *c, int cls) {
  if (c->has_fields) return NULL;
  lua_getmetatable(L, 1);
  if (lua_rawgeti(L, -1, MT_SETTINGS) == LUA_TNIL) {
    lua_pop(L, 1);
    make_settings(L, cls);
    lua_pushvalue(L, -1);
    lua_rawseti(L, -3, MT_SETTINGS);
  }
  lua_remove(L, -2);
  if (lua_type(L, -1) != LUA_TUSERDATA) {
    lua_pop(L, 1);
    return NULL;
  }
  return lua_touserdata(L, -1);
}

/* Call ws's method with the values on top (n of them). */
static int call_method(lua_State *L, int up, int n) {
  lua_pushvalue(L, UP(up));
  lua_gettable(L, 1);
  lua_insert(L, -n - 1);
  lua_pushvalue(L, 1);
  lua_insert(L, -n - 1);
  return call_on(L, n + 1);
}

/* Push ws.sock and its engine when ws.sock is a socket with a live engine
 * attached, and return the socket; else NULL, with nothing more on the
 * stack. The attached engine is ws.engine: a connection on our loop is
 * made from a socket and the engine attached to it (server.lua, client.lua),
 * so the socket's reference is read instead of the slot. */
static lsock *push_attached(lua_State *L, const conn *c) {
  lsock *s = c->sock;
  if (!s || s->closed || !s->engine || !s->engine->cfg.max_message) return NULL;
  lua_getiuservalue(L, 1, CV_SOCK);
  lua_getiuservalue(L, -1, UV_ENGINE);
  return s;
}

/* The connection at index 1's own field named by upvalue up, as a truth
 * value: for the private fields that only a connection has (a send
 * timer), never its class. */
static int own_true(lua_State *L, const conn *c, int up) {
  if (!c->has_fields) return 0;
  lua_getiuservalue(L, 1, CV_FIELDS);
  lua_pushvalue(L, UP(up));
  lua_rawget(L, -2);
  int v = lua_toboolean(L, -1);
  lua_pop(L, 2);
  return v;
}

/* ws:send(data[, kind[, opts]]). stack: ws, data, kind, opts */
static int conn_send(lua_State *L) {
  int binary;
  conn *c = to_conn(L, 1);
  if (!c || lua_type(L, 2) != LUA_TSTRING || !lua_isnoneornil(L, 4)) return fallback(L);
  if (lua_isnoneornil(L, 3) || lua_rawequal(L, 3, UP(UP_TEXT))) binary = 0;
  else if (lua_rawequal(L, 3, UP(UP_BINARY))) binary = 1;
  else return fallback(L);
  if (c->flag[CF_SENDING] || c->flag[CF_STATE] != STATE_OPEN) return fallback(L);
  lua_settop(L, 3);
  lsock *s = push_attached(L, c); /* 4, 5 */
  if (!s) return fallback(L);
  int cls = push_class(L);
  int compress = 0;
  lua_Integer threshold, high;
  /* ws.deflate says whether permessage-deflate was agreed, which the
   * engine knows too: without it there is nothing to read */
  if (s->engine->pmd && field_true(L, UP_DEFLATE, cls)) {
    if (!field_integer(L, UP_THRESHOLD, cls, &threshold)) return fallback_at(L, 3);
    compress = (lua_Integer)lua_rawlen(L, 2) >= threshold;
  }
  const class_settings *cs = push_settings(L, c, cls);
  if (cs)
    high = cs->high;
  else if (!field_integer(L, UP_HIGH_WATER, cls, &high))
    return fallback_at(L, 3);
  int rc = dx_engine_send(L, 5, 2, binary, compress);
  if (rc) {
    dx_engine_push_result(L, rc); /* fail, why */
    lua_replace(L, 2);              /* ws, why */
    lua_settop(L, 2);
    return call_method(L, UP_REFUSED, 1);
  }
  /* under high water, with no send timer running (duplex.callbacks'):
   * there is nothing for _room to do */
  if ((lua_Integer)dx_sock_buffered(s) <= high && !own_true(L, c, UP_OVER)) {
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
  ((conn *)lua_touserdata(L, 4))->flag[CF_READING] = 0;
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
  conn *c = to_conn(L, 1);
  if (!c || !lua_isyieldable(L) || c->flag[CF_READING] || c->flag[CF_STATE] == STATE_CLOSED) return fallback(L);
  lsock *s = push_attached(L, c);
  if (!s) return fallback(L);
  lua_rotate(L, 1, -1); /* sock, engine, ws */
  lua_pushnil(L);
  lua_insert(L, 3); /* sock, engine, nil, ws */
  c->flag[CF_READING] = 1;
  return next_k(L, LUA_OK, (lua_KContext)dx_lua_begin_in(L, s->loop, 3));
}

/* core.pump(ws) -> ws.sock:pump(ws.engine, ws.high_water, ws.low_water,
 * on_message, ws) for the on_message of ws's route (ws._route), what
 * duplex.callbacks does for each socket with input; nothing once ws is
 * closed. One call instead of seven reads of ws's fields from Lua. */
enum { PU_HIGH = 1, PU_LOW, PU_ROUTE, PU_ON_MESSAGE };

/* sock:pump's limits: high any count, low what the socket keeps (32 bits) */
static lua_Integer pump_limit(lua_State *L, int up, int cls, lua_Integer max) {
  push_other(L, lua_touserdata(L, 1), 1, lua_upvalueindex(up), cls);
  int is;
  lua_Integer v = lua_tointegerx(L, -1, &is);
  if (!is || v < 0 || v > max)
    luaL_error(L, "pump: ws.%s must be an integer in 0..%I", lua_tostring(L, lua_upvalueindex(up)), max);
  lua_pop(L, 1);
  return v;
}

static int l_pump(lua_State *L) {
  conn *c = check_conn(L, 1);
  if (c->flag[CF_STATE] == STATE_CLOSED) return 0;
  lua_settop(L, 1);
  lua_getiuservalue(L, 1, CV_SOCK); /* 2 */
  lsock *s = c->sock ? c->sock : dx_sock_check(L, 2); /* raises the error */
  lua_getiuservalue(L, 2, UV_ENGINE); /* 3 */
  if (!dx_live_engine(L, 3)) return dx_lua_fail(L, "closed"); /* as the pump says it */
  int cls = push_class(L); /* 4 */
  lua_Integer high, low;
  const class_settings *cs = push_settings(L, c, cls); /* 5 */
  if (cs) {
    high = cs->high;
    low = cs->low;
    lua_getiuservalue(L, 5, 1);
    if (lua_type(L, -1) != LUA_TFUNCTION) luaL_error(L, "pump: ws._route must be a route with on_message");
  } else {
    high = pump_limit(L, PU_HIGH, cls, LUA_MAXINTEGER);
    low = pump_limit(L, PU_LOW, cls, UINT32_MAX);
    push_other(L, c, 1, lua_upvalueindex(PU_ROUTE), cls);
    if (lua_type(L, -1) != LUA_TTABLE) luaL_error(L, "pump: ws._route must be a route table");
    lua_pushvalue(L, lua_upvalueindex(PU_ON_MESSAGE));
    lua_rawget(L, -2);
    luaL_checktype(L, -1, LUA_TFUNCTION);
  }
  lua_replace(L, cls);
  lua_settop(L, cls); /* ws, sock, engine, on_message */
  lua_pushinteger(L, high);
  lua_pushinteger(L, low);
  lua_rotate(L, 4, 2);  /* ws, sock, engine, high, low, on_message */
  lua_rotate(L, 1, -1); /* sock, engine, high, low, on_message, ws */
  return dx_sock_pump(L, s, high, (uint32_t)low, 1);
}

/* Push the closure f with the fallback at idx, the words and, for the
 * step, after_event at idx + 1. */
static void push_fast(lua_State *L, lua_CFunction f, int idx, int with_after) {
  lua_pushvalue(L, idx);
#define PUSH_WORD(name, word) lua_pushliteral(L, word);
  WORDS(PUSH_WORD)
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

/* core.pack_request(ws) -> true | false: ws keeps its request as one
 * string until it is read (dx_request_pack), unless it holds more than it
 * came with. For a connection whose request nobody has been handed. */
static int l_pack_request(lua_State *L) {
  conn *c = check_conn(L, 1);
  if (c->packed_request) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_getiuservalue(L, 1, CV_REQUEST);
  int packed = dx_request_pack(L, -1);
  if (packed) {
    lua_setiuservalue(L, 1, CV_REQUEST);
    c->packed_request = 1;
  }
  lua_pushboolean(L, packed);
  return 1;
}

void dx_open_conn(lua_State *L) {
  static const luaL_Reg funcs[] = {
      {"fast_send", l_fast_send},
      {"fast_next", l_fast_next},
      {"pack_request", l_pack_request},
      {NULL, NULL},
  };
  dx_setfuncs(L, funcs);
  /* classes are made once per route and live as long as it: weak keys let
   * a dropped route's metatable go */
  dx_weak_registry(L, &MTS_KEY);
  push_names(L);
  lua_pushcclosure(L, l_connection, 1);
  lua_setfield(L, -2, "connection");
  lua_pushliteral(L, "high_water");
  lua_pushliteral(L, "low_water");
  lua_pushliteral(L, "_route");
  lua_pushliteral(L, "on_message");
  lua_pushcclosure(L, l_pump, 4);
  lua_setfield(L, -2, "pump");
}
