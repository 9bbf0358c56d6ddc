/*
 * core.fan_out: one encoded frame queued on many connections in one call,
 * what a broadcast to a room does. Done from Lua, each subscriber costs a
 * round of method calls and field lookups on objects spread over the heap
 * (with 10,000 subscribers, mostly cache misses); here it costs its engine
 * and its socket. Only the plain case is decided here: every subscriber
 * this cannot take is handed back, and the caller applies its own rules to
 * those one by one (compression, a host's stream, the backlog verdict, a
 * closed connection), so no rule of theirs has a second home in C.
 */
#include "l_socket.h"

/* With 10,000 subscribers each one's engine and socket are cache misses,
 * and one after another they cost a miss's latency each: so the
 * subscribers are taken BATCH at a time: first the batch's keys and
 * values, then each value's type (its header's misses overlap), its
 * engine's lines prefetched, then each one's socket a few places ahead of
 * its turn. */
#define BATCH 32
#define AHEAD 8

static void prefetch_engine(const dx_proto *p) {
  __builtin_prefetch(p);
  __builtin_prefetch(&p->out);
  __builtin_prefetch(&p->on_output_ud);
}

static void prefetch_sock(const dx_proto *p) {
  const lsock *s = p ? dx_sock_writing(p) : NULL;
  if (s) {
    __builtin_prefetch(&s->closed);
    __builtin_prefetch(&s->out);
  }
}

/* The engine at index v when it is an engine (its memory not read yet:
 * that is prefetched), else NULL. */
static dx_proto *engine_at(lua_State *L, int v, int engine_mt) {
  if (!lua_getmetatable(L, v)) return NULL;
  int is_engine = lua_rawequal(L, -1, engine_mt);
  lua_pop(L, 1);
  return is_engine ? dx_engine_at(L, v) : NULL;
}

/* Queue the frame at index frame on engine p (at index v) when it is a
 * live server engine written by a loop socket, without permessage-deflate,
 * with no more than limit bytes queued, and it takes the frame. */
static int queued_on(lua_State *L, dx_proto *p, int v, int frame, size_t limit) {
  if (!p || !p->cfg.max_message || p->cfg.role != DX_ROLE_SERVER || p->pmd) return 0;
  lsock *s = dx_sock_writing(p);
  if (!s || s->closed || dx_sock_buffered(s) > limit) return 0;
  return dx_engine_send_raw(L, v, frame) == 0;
}

/* core.fan_out(frame, subscribers, limit) -> queued, others
 * frame: a whole frame from core.encode_frame (uncompressed); subscribers:
 * a table whose values are the subscribers' engines (keys are the caller's:
 * its connection objects); limit: bytes queued past which a subscriber is
 * not sent to here. queued: how many took the frame; others: a list of the
 * keys of the rest (nil when none), not sent to. */
static int l_fan_out(lua_State *L) {
  luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_Integer limit = luaL_checkinteger(L, 3);
  luaL_argcheck(L, limit >= 0, 3, "must not be negative");
  lua_settop(L, 3);
  luaL_getmetatable(L, DX_ENGINE_MT); /* 4 */
  luaL_checkstack(L, 2 * BATCH + 4, "fan_out");
  lua_Integer queued = 0, others = 0;
  lua_pushnil(L); /* 5: the key the traversal goes on from */
  int more = 1;
  while (more) {
    /* a batch of key, value pairs above slot 5 */
    dx_proto *batch[BATCH];
    int n = 0;
    while (n < BATCH) {
      lua_pushvalue(L, n ? -2 : 5);
      if (!lua_next(L, 2)) {
        more = 0;
        break;
      }
      n++;
    }
    /* apart from the traversal, so that the userdata headers' misses
     * overlap each other */
    for (int i = 0; i < n; i++) {
      batch[i] = engine_at(L, 7 + 2 * i, 4);
      if (batch[i]) prefetch_engine(batch[i]);
    }
    for (int i = 0; i < n && i < AHEAD; i++) prefetch_sock(batch[i]);
    for (int i = 0; i < n; i++) {
      if (i + AHEAD < n) prefetch_sock(batch[i + AHEAD]);
      int key = 6 + 2 * i;
      if (queued_on(L, batch[i], key + 1, 1, (size_t)limit)) {
        queued++;
      } else {
        if (!others) {
          lua_createtable(L, 8, 0);
          lua_replace(L, 3); /* limit is read already: its slot holds the list */
        }
        lua_pushvalue(L, key);
        lua_rawseti(L, 3, ++others);
      }
    }
    if (n) lua_copy(L, 6 + 2 * (n - 1), 5);
    lua_settop(L, 5);
  }
  lua_pushinteger(L, queued);
  if (others)
    lua_pushvalue(L, 3);
  else
    lua_pushnil(L);
  return 2;
}

void dx_open_fanout(lua_State *L) {
  static const luaL_Reg funcs[] = {{"fan_out", l_fan_out}, {NULL, NULL}};
  dx_setfuncs(L, funcs);
}
