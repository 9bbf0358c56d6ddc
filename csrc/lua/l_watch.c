/*
 * Watchers: connections served by callbacks instead of a coroutine each.
 * A socket watched by a watcher (sock:watch(w)) is put on the watcher's list
 * whenever input arrives (or its TLS read can go on); one coroutine, in
 * w:next(), takes the sockets off the list in order and pumps each one
 * (sock:pump, which never waits). An idle connection then costs its socket,
 * its engine and the Lua object the application keeps: nothing waits for it.
 *
 * The list is fair like receive: a socket whose share of the loop pass is
 * used up (a flood) goes to the back, and w:next() lets the loop run a pass
 * before it returns a socket whose share is spent.
 *
 * A socket leaves its watcher when it closes (or is collected), and every
 * member leaves when the watcher closes (or is collected), so neither keeps
 * a pointer to the other once it is gone.
 */
#include "l_socket.h"

#define WATCH_MT "duplex.watcher"

struct lwatch {
  dx_link ready;   /* sockets to pump (lsock.ready), first in first out */
  dx_link members; /* every watched socket (lsock.member) */
  dx_task *waiter; /* the task in w:next(), while it waits */
  dx_loop *loop;
  int closed;
};

static const char WATCH_KEY = 0; /* its address tags the metatable (dx_checkudata) */

/* w:next() checks its watcher on every socket it hands out: no lookup by name */
static lwatch *check_watch(lua_State *L, int idx) { return dx_checkudata(L, idx, &WATCH_KEY, WATCH_MT); }

static void wake_waiter(lwatch *w) {
  if (!w->waiter) return;
  dx_task_ready(w->loop, w->waiter, DX_WAKE_IO);
  w->waiter = NULL;
}

void dx_watch_queue(lsock *s) {
  lwatch *w = s->watch;
  if (!w || dx_link_linked(&s->ready)) return;
  dx_link_push(&w->ready, &s->ready);
  wake_waiter(w);
}

void dx_watch_leave(lsock *s) {
  if (!s->watch) return;
  if (dx_link_linked(&s->ready)) dx_link_remove(&s->ready);
  if (dx_link_linked(&s->member)) dx_link_remove(&s->member);
  s->watch = NULL;
}

static void watch_close(lwatch *w) {
  if (w->closed) return;
  w->closed = 1;
  while (!dx_link_empty(&w->members)) dx_watch_leave(dx_container_of(w->members.next, lsock, member));
  wake_waiter(w);
}

/* core.watcher() -> a watcher. Its uservalue maps each member's address to
 * the socket, weakly: the application's connection objects keep sockets
 * alive, not the watcher. The registry has the same table at the
 * watcher's address, for sock:watch(nil) to take the socket out: a socket
 * that leaves alive (a handshake that became a coroutine's connection)
 * would otherwise keep its slot until it is collected, and the table would
 * grow to every connection the server has, not the ones it watches. */
static int l_watcher(lua_State *L) {
  dx_loop *loop = dx_lua_loop(L);
  lwatch *w = lua_newuserdatauv(L, sizeof *w, 1);
  dx_link_init(&w->ready);
  dx_link_init(&w->members);
  w->waiter = NULL;
  w->loop = loop;
  w->closed = 0;
  luaL_setmetatable(L, WATCH_MT);
  lua_createtable(L, 0, 0);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "v");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, w);
  lua_setiuservalue(L, -2, 1);
  return 1;
}

/* s out of its watcher's table of members (see l_watcher) */
static void forget_member(lua_State *L, lsock *s) {
  if (!s->watch) return;
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, s->watch) == LUA_TTABLE) {
    lua_pushnil(L);
    lua_rawsetp(L, -2, s);
  }
  lua_pop(L, 1);
}

/* sock:watch(w) makes w pump the socket from now on, and queues it at once
 * (input may have come already: the rest of a handshake's read, say);
 * sock:watch(nil) stops. */
int dx_sock_watch(lua_State *L) {
  lsock *s = dx_sock_check(L, 1);
  if (lua_isnoneornil(L, 2)) {
    forget_member(L, s);
    dx_watch_leave(s);
    lua_pushboolean(L, 1);
    return 1;
  }
  lwatch *w = check_watch(L, 2);
  if (s->closed) return dx_lua_fail(L, "closed");
  if (w->closed) return dx_lua_fail(L, "watcher closed");
  if (w->loop != s->loop) return luaL_error(L, "watch: the watcher belongs to another loop");
  if (s->watch != w) forget_member(L, s);
  dx_watch_leave(s);
  lua_getiuservalue(L, 2, 1);
  lua_pushvalue(L, 1);
  lua_rawsetp(L, -2, s);
  s->watch = w;
  s->pump_out = 0;
  dx_link_push(&w->members, &s->member);
  dx_watch_queue(s);
  lua_pushboolean(L, 1);
  return 1;
}

/* Push the next socket of w's list, taken off it: 1; 0 when there is none
 * (or w is closed); -1 when its share of the loop pass is spent (the
 * others' turn first: the caller yields). members: the index of w's user
 * value, the sockets by address. */
static int push_ready(lua_State *L, lwatch *w, int members) {
  while (!w->closed && !dx_link_empty(&w->ready)) {
    lsock *s = dx_container_of(w->ready.next, lsock, ready);
    if (dx_sock_spent(s)) return -1;
    dx_link_remove(&s->ready);
    if (lua_rawgetp(L, members, s) == LUA_TUSERDATA) return 1;
    lua_pop(L, 1); /* collected: its finalizer is about to close it */
  }
  return 0;
}

/* w:next() -> the next socket to pump, waiting (in a loop coroutine) until
 * there is one; nil once the watcher is closed. */
static int next_k(lua_State *L, int status, lua_KContext ctx) {
  dx_task *t = (dx_task *)ctx;
  lwatch *w = check_watch(L, 1);
  if (status == LUA_YIELD) dx_lua_woken(L, t);
  lua_settop(L, 1);
  lua_getiuservalue(L, 1, 1);
  int r = push_ready(L, w, 2);
  if (r > 0) return 1;
  if (r < 0) return dx_lua_yield(L, t, next_k);
  if (w->closed) return 0;
  w->waiter = t;
  return dx_lua_wait_work(L, t, next_k);
}

static int watch_next(lua_State *L) {
  lwatch *w = check_watch(L, 1);
  dx_task *t = dx_lua_begin_in(L, w->loop, 0);
  return next_k(L, LUA_OK, (lua_KContext)t);
}

/* w:serve(server, pump, after, greet): w:next()'s loop in C, for a
 * server's one coroutine of callback connections: for each socket with
 * input, ws = server.connections[sock] (read each time: the server may
 * replace that table), then pump(ws) until it says nil, nil (ws is closed)
 * or nil, "again"; any other result r... goes to after(ws, r...), which
 * returns true to go on pumping ws. A socket of no connection goes to
 * greet(sock), when given (a handshake read as it comes). Returns nothing
 * once the watcher is closed; false, err, ws when pump or after raised,
 * false, err, nil, sock when greet did (err with a traceback); the
 * sockets still queued stay queued. None may wait. One Lua call per socket
 * with input, where a loop in Lua costs the loop and two. */
enum { SV_W = 1, SV_SERVER, SV_PUMP, SV_AFTER, SV_GREET, SV_MEMBERS, SV_TRACEBACK, SV_KEY, SV_WS };

/* The connection at SV_WS pumped until it has no more to give: 0, or -1
 * with the error on top. */
static int serve_one(lua_State *L) {
  for (;;) {
    lua_pushvalue(L, SV_PUMP);
    lua_pushvalue(L, SV_WS);
    if (lua_pcall(L, 1, LUA_MULTRET, SV_TRACEBACK) != LUA_OK) return -1;
    int n = lua_gettop(L) - SV_WS;
    if (n == 0 || (lua_isnil(L, SV_WS + 1) && (n == 1 || lua_isnil(L, SV_WS + 2)))) return 0; /* closed */
    if (lua_isnil(L, SV_WS + 1) && lua_type(L, SV_WS + 2) == LUA_TSTRING) {
      size_t k;
      const char *why = lua_tolstring(L, SV_WS + 2, &k);
      if (k == 5 && memcmp(why, "again", 5) == 0) return 0;
    }
    lua_pushvalue(L, SV_AFTER);
    lua_pushvalue(L, SV_WS);
    lua_rotate(L, SV_WS + 1, 2); /* after, ws, r... */
    if (lua_pcall(L, n + 1, 1, SV_TRACEBACK) != LUA_OK) return -1;
    int again = lua_toboolean(L, -1);
    lua_settop(L, SV_WS);
    if (!again) return 0;
  }
}

/* The socket at SV_WS, of no connection, handed to greet: 0, or -1 with
 * the error on top. */
static int greet_one(lua_State *L) {
  if (lua_isnil(L, SV_GREET)) return 0;
  lua_pushvalue(L, SV_GREET);
  lua_pushvalue(L, SV_WS);
  return lua_pcall(L, 1, 0, SV_TRACEBACK) == LUA_OK ? 0 : -1;
}

/* false, the error on top, then the connection at SV_WS (pump, after)
 * or nil and the socket at SV_WS (greet) */
static int serve_failed(lua_State *L, int greeting) {
  lua_pushboolean(L, 0);
  lua_insert(L, -2);
  if (greeting) lua_pushnil(L);
  lua_pushvalue(L, SV_WS);
  return 3 + greeting;
}

static int serve_k(lua_State *L, int status, lua_KContext ctx) {
  dx_task *t = (dx_task *)ctx;
  lwatch *w = lua_touserdata(L, SV_W); /* checked by watch_serve */
  if (status == LUA_YIELD) dx_lua_woken(L, t);
  lua_settop(L, SV_KEY);
  int r;
  while ((r = push_ready(L, w, SV_MEMBERS)) > 0) { /* the socket at SV_WS */
    lua_pushvalue(L, SV_KEY);
    if (lua_rawget(L, SV_SERVER) != LUA_TTABLE) {
      lua_settop(L, SV_KEY);
      continue;
    }
    lua_pushvalue(L, SV_WS);
    if (lua_rawget(L, -2) == LUA_TNIL) { /* no connection of the server's */
      lua_settop(L, SV_WS);
      if (greet_one(L) < 0) return serve_failed(L, 1);
      lua_settop(L, SV_KEY);
      continue;
    }
    lua_replace(L, SV_WS);
    lua_settop(L, SV_WS);
    if (serve_one(L) < 0) return serve_failed(L, 0);
    lua_settop(L, SV_KEY);
  }
  if (r < 0) return dx_lua_yield(L, t, serve_k);
  if (w->closed) return 0;
  w->waiter = t;
  return dx_lua_wait_work(L, t, serve_k);
}

static int watch_serve(lua_State *L) {
  lwatch *w = check_watch(L, SV_W);
  luaL_checktype(L, SV_SERVER, LUA_TTABLE);
  luaL_checktype(L, SV_PUMP, LUA_TFUNCTION);
  luaL_checktype(L, SV_AFTER, LUA_TFUNCTION);
  if (!lua_isnoneornil(L, SV_GREET)) luaL_checktype(L, SV_GREET, LUA_TFUNCTION);
  dx_task *t = dx_lua_begin_in(L, w->loop, 0);
  lua_settop(L, SV_GREET);
  lua_getiuservalue(L, SV_W, 1);
  lua_pushcfunction(L, dx_lua_traceback);
  lua_pushliteral(L, "connections");
  return serve_k(L, LUA_OK, (lua_KContext)t);
}

/* w:close(): every member leaves, and w:next() returns nil. */
static int watch_close_m(lua_State *L) {
  lwatch *w = check_watch(L, 1);
  watch_close(w);
  lua_pushnil(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, w);
  return 0;
}

static int watch_count(lua_State *L) {
  lwatch *w = check_watch(L, 1);
  lua_Integer n = 0;
  for (dx_link *l = w->members.next; l != &w->members; l = l->next) n++;
  lua_pushinteger(L, n);
  return 1;
}

static int watch_tostring(lua_State *L) {
  lwatch *w = check_watch(L, 1);
  lua_pushfstring(L, "duplex.watcher (%s): %p", w->closed ? "closed" : "open", (void *)w);
  return 1;
}

int dx_lua_traceback(lua_State *L) {
  const char *msg = luaL_tolstring(L, 1, NULL);
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* core.call_nowait(fn, ...) -> true, fn's results | false, message with a
 * traceback. Like xpcall, but fn cannot wait: a callback that tries to
 * (core.sleep, a send that would block) fails with "cannot wait here"
 * instead of stopping the one coroutine that serves every connection. */
static int l_call_nowait(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  int n = lua_gettop(L);
  lua_pushcfunction(L, dx_lua_traceback);
  lua_insert(L, 1);
  int ok = lua_pcall(L, n - 1, LUA_MULTRET, 1) == LUA_OK;
  lua_pushboolean(L, ok);
  lua_replace(L, 1);
  return lua_gettop(L);
}

void dx_open_watch(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"next", watch_next},   {"serve", watch_serve},          {"close", watch_close_m},
      {"count", watch_count}, {NULL, NULL}};
  static const luaL_Reg meta[] = {{"__gc", watch_close_m}, {"__tostring", watch_tostring}, {NULL, NULL}};
  dx_lua_new_class(L, WATCH_MT, methods, meta);
  luaL_getmetatable(L, WATCH_MT);
  dx_register_mt(L, &WATCH_KEY);
  lua_pop(L, 1);
  static const luaL_Reg funcs[] = {{"watcher", l_watcher}, {"call_nowait", l_call_nowait}, {NULL, NULL}};
  luaL_setfuncs(L, funcs, 0);
}
