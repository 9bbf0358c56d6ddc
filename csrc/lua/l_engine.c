/*
 * duplex.engine: the sans-I/O protocol engine as a Lua object.
 *
 * Events are parsed when asked for, one per call, and each message becomes
 * exactly one Lua string. Nothing is parsed ahead of the application: the
 * replies it sends to one message leave before whatever the next frames
 * cause (a pong, or the close frame that fails a bad frame), and a peer
 * that pipelines costs its unparsed bytes, not a queue of Lua values.
 */
#include <stdlib.h>
#include <string.h>

#include "dx_clock.h"
#include "dx_utf8.h"
#include "l_core.h"

/* The counters first: every event and every send reads ref_dropped, and
 * here it shares a cache line with the engine's hot fields. */
typedef struct engine {
  uint64_t ref_seq;     /* id of the last payload queued by reference */
  uint64_t ref_dropped; /* ids up to this one are no longer held */
  dx_proto p;
} engine;

/* Payloads from this size are queued by reference to their Lua string
 * (kept in the user value's table until written) instead of copied. Below
 * it a copy costs less than holding the string (a table slot set and later
 * cleared, an iovec of its own), and small frames copied side by side leave
 * in one contiguous run: one iovec, one TLS record. */
#define REF_MIN (16u << 10)

static const char ENGINE_KEY = 0; /* its address tags the metatable (dx_checkudata) */

/* An engine whose type is checked: raises once it is released. */
static engine *live(lua_State *L, engine *e) {
  if (!e->p.cfg.max_message) luaL_error(L, "engine is released");
  return e;
}

static engine *check(lua_State *L, int idx) { return live(L, dx_checkudata(L, idx, &ENGINE_KEY, DX_ENGINE_MT)); }

dx_proto *dx_check_engine(lua_State *L, int idx) { return &check(L, idx)->p; }

dx_proto *dx_check_live_engine(lua_State *L, int idx) { return &live(L, lua_touserdata(L, idx))->p; }

/* The engine a method is called on (dx_checkself), for the hot ones. */
static engine *check_self(lua_State *L) { return live(L, dx_checkself(L, &ENGINE_KEY, DX_ENGINE_MT)); }

dx_proto *dx_engine_at(lua_State *L, int idx) { return &((engine *)lua_touserdata(L, idx))->p; }

dx_proto *dx_live_engine(lua_State *L, int idx) {
  engine *e = lua_touserdata(L, idx);
  return e && e->p.cfg.max_message ? &e->p : NULL;
}

/* core.engine{ role = "server"|"client", max_message =, max_frame =,
 *              max_buffered = 0, streaming = false, auto_pong = true } */
static int l_engine_new(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  static const char *const roles[] = {"server", "client", NULL};
  lua_getfield(L, 1, "role");
  dx_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.role = luaL_checkoption(L, -1, NULL, roles) == 0 ? DX_ROLE_SERVER : DX_ROLE_CLIENT;
  lua_pop(L, 1);
  cfg.max_message = (uint64_t)dx_opt_integer(L, 1, "max_message", DX_DEFAULT_MAX_MESSAGE, 1, LUA_MAXINTEGER);
  cfg.max_frame = (uint64_t)dx_opt_integer(L, 1, "max_frame", 0, 0, LUA_MAXINTEGER);
  cfg.max_pending = (uint64_t)dx_opt_integer(L, 1, "max_buffered", 0, 0, LUA_MAXINTEGER);
  cfg.streaming = dx_opt_flag(L, 1, "streaming", 0);
  cfg.auto_pong = dx_opt_flag(L, 1, "auto_pong", 1);
  engine *e = lua_newuserdatauv(L, sizeof *e, 1);
  memset(e, 0, sizeof *e);
  dx_proto_init(&e->p, &cfg);
  luaL_setmetatable(L, DX_ENGINE_MT);
  return 1;
}

/* Forget the strings of payloads written since the last call. */
static void drop_released(lua_State *L, int idx, engine *e) {
  uint64_t upto = e->p.out.released;
  if (e->ref_dropped >= upto) return;
  lua_getiuservalue(L, idx, 1);
  for (uint64_t id = e->ref_dropped + 1; id <= upto; id++) {
    lua_pushnil(L);
    lua_rawseti(L, -2, (lua_Integer)id);
  }
  lua_pop(L, 1);
  e->ref_dropped = upto;
}

/* The id to queue the string at stack index s by reference under, when it
 * is large enough to be worth it; 0 to copy. */
static uint64_t ref_id_for(engine *e, size_t n) {
  return n >= REF_MIN && e->p.cfg.role == DX_ROLE_SERVER ? e->ref_seq + 1 : 0;
}

/* The engine now points into the string at index s: keep it alive. */
static void hold(lua_State *L, int idx, engine *e, int s) {
  e->ref_seq++;
  if (lua_getiuservalue(L, idx, 1) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_setiuservalue(L, idx, 1);
  }
  lua_pushvalue(L, s);
  lua_rawseti(L, -2, (lua_Integer)e->ref_seq);
  lua_pop(L, 1);
}

static const char *kind_name(int opcode) { return opcode == DX_OP_TEXT ? "text" : "binary"; }

/* A large message becomes a large Lua string that is usually garbage soon
 * after (echoed, parsed, relayed). Left to its pause, the collector lets the
 * heap double before it looks again: with hundreds of connections moving
 * megabyte messages, the dead ones would be as much as everything live. So
 * after every BIG_BATCH bytes of large messages the collector runs a whole
 * cycle (a few milliseconds here, for as many bytes as take tens to copy),
 * and dead messages never add up to more than that. The count lives in the
 * registry: one per Lua state. */
#define BIG_MESSAGE (64u << 10)
#define BIG_BATCH (32 << 20)

static const char BIG_KEY = 0;

static void count_big(lua_State *L, size_t len) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &BIG_KEY);
  lua_Integer sofar = lua_tointeger(L, -1) + (lua_Integer)len;
  lua_pop(L, 1);
  if (sofar >= BIG_BATCH) {
    sofar = 0;
    lua_gc(L, LUA_GCCOLLECT, 0);
  }
  lua_pushinteger(L, sofar);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &BIG_KEY);
}

static void push_message(lua_State *L, const uint8_t *data, size_t len) {
  lua_pushlstring(L, (const char *)data, len);
  if (len >= BIG_MESSAGE) count_big(L, len);
}

/* Push one event's values (kind first); returns how many. */
static int push_event(lua_State *L, const dx_event *ev) {
  switch (ev->type) {
  case DX_EV_MESSAGE:
    lua_pushstring(L, kind_name(ev->opcode));
    push_message(L, ev->data, ev->len);
    return 2;
  case DX_EV_FRAGMENT:
    lua_pushliteral(L, "fragment");
    push_message(L, ev->data, ev->len);
    lua_pushstring(L, kind_name(ev->opcode));
    lua_pushboolean(L, ev->first);
    lua_pushboolean(L, ev->fin);
    return 5;
  case DX_EV_PING:
    lua_pushliteral(L, "ping");
    lua_pushlstring(L, (const char *)ev->data, ev->len);
    return 2;
  case DX_EV_PONG:
    lua_pushliteral(L, "pong");
    lua_pushlstring(L, (const char *)ev->data, ev->len);
    if (ev->latency < 0) return 2;
    lua_pushnumber(L, ev->latency);
    return 3;
  case DX_EV_CLOSE:
    lua_pushliteral(L, "close");
    lua_pushlstring(L, ev->data ? (const char *)ev->data : "", ev->len);
    lua_pushinteger(L, ev->code);
    lua_pushboolean(L, ev->by_peer);
    return 4;
  default: /* DX_EV_ERROR */
    lua_pushliteral(L, "error");
    lua_pushlstring(L, (const char *)ev->data, ev->len);
    lua_pushinteger(L, ev->code);
    return 3;
  }
}

static int engine_next(lua_State *L, int idx, int keep) {
  engine *e = lua_touserdata(L, idx);
  dx_proto *p = &e->p;
  drop_released(L, idx, e);
  dx_event ev;
  if (dx_proto_next(p, &ev) == DX_EV_NONE) return 0;
  int k = push_event(L, &ev);
  dx_proto_done(p); /* copied into Lua values */
  if (keep) dx_proto_keep(p); /* the rest of the input may be in the caller's buffer */
  return k;
}

int dx_engine_next(lua_State *L, int idx) { return engine_next(L, idx, 1); }

int dx_engine_next_unkept(lua_State *L, int idx) { return engine_next(L, idx, 0); }

/* e:feed(data): the engine keeps a copy (it unmasks in place); parsing
 * happens in e:next(). */
static int l_feed(lua_State *L) {
  engine *e = check(L, 1);
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  dx_timing_seen(&e->p, dx_now());
  dx_proto_feed_copy(&e->p, (const uint8_t *)s, n);
  return 0;
}

/* e:next() -> kind, data, ... | nil when more bytes are needed */
static int l_next(lua_State *L) {
  check(L, 1);
  return dx_engine_next(L, 1);
}

/* e:has_input() -> whether fed bytes wait to be parsed */
static int l_has_input(lua_State *L) {
  lua_pushboolean(L, dx_proto_has_input(&check(L, 1)->p));
  return 1;
}

int dx_engine_push_result(lua_State *L, int rc) {
  if (rc == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (rc == DX_E_ARG || rc == DX_E_UTF8) return luaL_error(L, "%s", dx_proto_strerror(rc));
  luaL_pushfail(L);
  /* the word the Lua layer acts on: this connection has failed */
  if (rc == DX_E_OVERFLOW) lua_pushliteral(L, "overflow");
  else lua_pushstring(L, dx_proto_strerror(rc));
  return 2;
}

static const char *const kinds[] = {"text", "binary", "continuation", NULL};
static const int kind_opcodes[] = {DX_OP_TEXT, DX_OP_BINARY, DX_OP_CONT};

/* Queue the string at index data as a frame of opcode op on the engine at
 * idx: by reference when large, held in the engine's user value. */
static int send_at(lua_State *L, engine *e, int idx, int data, int op, int fin, int compress) {
  size_t n;
  const char *s = lua_tolstring(L, data, &n);
  drop_released(L, idx, e);
  int referenced;
  int rc = dx_proto_send_ref(&e->p, op, s, n, fin, compress, ref_id_for(e, n), &referenced);
  if (referenced) hold(L, idx, e, data);
  return rc;
}

int dx_engine_send(lua_State *L, int idx, int data, int binary, int compress) {
  return send_at(L, lua_touserdata(L, idx), idx, data, binary ? DX_OP_BINARY : DX_OP_TEXT, 1, compress);
}

/* e:send(data [, kind = "text" [, fin = true [, compress = false]]])
 * kind "continuation" continues a message started with fin = false. */
static int l_send(lua_State *L) {
  engine *e = check_self(L);
  luaL_checkstring(L, 2);
  int op = kind_opcodes[luaL_checkoption(L, 3, "text", kinds)];
  int fin = lua_isnoneornil(L, 4) ? 1 : lua_toboolean(L, 4);
  int compress = lua_toboolean(L, 5);
  return dx_engine_push_result(L, send_at(L, e, 1, 2, op, fin, compress));
}

/* e:ping([data]) and e:pong([data]): a control frame of at most 125 bytes */
static int send_control(lua_State *L, int (*send)(dx_proto *, const void *, size_t)) {
  engine *e = check(L, 1);
  size_t n;
  const char *s = luaL_optlstring(L, 2, "", &n);
  if (n > DX_CONTROL_MAX) return luaL_argerror(L, 2, "control frame payload longer than 125 bytes");
  return dx_engine_push_result(L, send(&e->p, s, n));
}

/* A ping the application sends is a heartbeat too: its pong gives the
 * latency, and a peer that never answers it is dropped after ping_timeout. */
static int l_ping(lua_State *L) {
  int k = send_control(L, dx_proto_ping);
  if (lua_toboolean(L, -k)) dx_timing_pinged(dx_check_live_engine(L, 1), dx_now());
  return k;
}

static int l_pong(lua_State *L) { return send_control(L, dx_proto_pong); }

/* e:close([code [, reason]]) starts the closing handshake. */
static int l_close(lua_State *L) {
  engine *e = check(L, 1);
  lua_Integer code = dx_opt_range(L, 2, 0, 0, 65535);
  size_t n;
  const char *reason = luaL_optlstring(L, 3, "", &n);
  const char *bad = dx_close_args_error((unsigned)code, reason, n);
  if (bad) return luaL_error(L, "close: %s", bad);
  int rc = dx_proto_close(&e->p, (unsigned)code, reason, n);
  if (rc == 0) dx_timing_closing(&e->p, dx_now());
  return dx_engine_push_result(L, rc);
}

/* e:set_timing(ping_interval, ping_timeout, close_timeout): the engine
 * keeps the connection's clocks from now on (dx_timing.h); ping_interval 0
 * turns heartbeats off. */
static int l_set_timing(lua_State *L) {
  engine *e = check(L, 1);
  double interval = luaL_checknumber(L, 2), timeout = luaL_checknumber(L, 3), close = luaL_checknumber(L, 4);
  luaL_argcheck(L, timeout > 0, 3, "must be > 0");
  luaL_argcheck(L, close >= 0, 4, "must be >= 0");
  dx_timing_set(&e->p, interval, timeout, close, dx_now());
  return 0;
}

/* e:due() -> when (core.now() seconds) e:tick() next has something to do,
 * or nil */
static int l_due(lua_State *L) {
  double due = dx_timing_due(&check(L, 1)->p, dx_now());
  if (due < 0) return 0;
  lua_pushnumber(L, due);
  return 1;
}

const char *dx_tick_name(int tick) {
  switch (tick) {
  case DX_TICK_PING_TIMEOUT: return "ping timeout";
  case DX_TICK_CLOSE_TIMEOUT: return "close timeout";
  case DX_TICK_OVERFLOW: return "overflow";
  default: return NULL;
  }
}

/* e:tick() -> nil, or what the host must do now: "ping timeout" and
 * "close timeout" (drop the connection), "overflow" (the heartbeat's ping
 * passed max_buffered). The heartbeat's ping and the quiet connection's
 * shrink happen here. */
static int l_tick(lua_State *L) {
  const char *what = dx_tick_name(dx_timing_tick(&check(L, 1)->p, dx_now()));
  if (!what) return 0;
  lua_pushstring(L, what);
  return 1;
}

int dx_engine_send_raw(lua_State *L, int idx, int frame) {
  engine *e = lua_touserdata(L, idx);
  size_t n;
  const char *s = lua_tolstring(L, frame, &n);
  drop_released(L, idx, e);
  int referenced;
  int rc = dx_proto_send_raw_ref(&e->p, s, n, ref_id_for(e, n), &referenced);
  if (referenced) hold(L, idx, e, frame);
  return rc;
}

/* e:send_raw(frame): a frame from core.encode_frame, e.g. one broadcast. */
static int l_send_raw(lua_State *L) {
  engine *e = check_self(L);
  luaL_checkstring(L, 2);
  if (e->p.cfg.role != DX_ROLE_SERVER)
    return luaL_error(L, "send_raw: client frames must be masked one by one");
  return dx_engine_push_result(L, dx_engine_send_raw(L, 1, 2));
}

/* e:data_to_send() -> bytes to write to the peer (taken out of the engine) */
static int l_data_to_send(lua_State *L) {
  engine *e = check(L, 1);
  size_t n = dx_proto_pending(&e->p);
  luaL_Buffer b;
  char *dst = luaL_buffinitsize(L, &b, n);
  size_t got = 0;
  while (got < n) {
    dx_span sp[16];
    size_t k = dx_out_spans(&e->p.out, sp, 16), batch = 0;
    for (size_t i = 0; i < k; i++) {
      memcpy(dst + got + batch, sp[i].p, sp[i].n);
      batch += sp[i].n;
    }
    dx_out_consume(&e->p.out, batch);
    got += batch;
  }
  luaL_pushresultsize(&b, n);
  drop_released(L, 1, e);
  return 1;
}

/* e:shrink(): release the memory of empty buffers (an idle connection). */
/* Both also let go of the strings of payloads written meanwhile: a quiet
 * connection (the heartbeat sweep asks them) holds no written message. */
static int l_shrink(lua_State *L) {
  engine *e = check(L, 1);
  drop_released(L, 1, e);
  dx_proto_shrink(&e->p);
  return 0;
}

/* e:holding(): whether its buffers hold memory, so that the heartbeat of
 * an idle connection asks for a shrink only when there is something to
 * give back. */
static int l_holding(lua_State *L) {
  lua_pushboolean(L, dx_proto_holding(&check_self(L)->p));
  return 1;
}

static int l_pending(lua_State *L) {
  engine *e = check(L, 1);
  drop_released(L, 1, e);
  lua_pushinteger(L, (lua_Integer)dx_proto_pending(&e->p));
  return 1;
}

static const char *state_name(int state) {
  return state == DX_STATE_OPEN ? "open" : state == DX_STATE_CLOSING ? "closing" : "closed";
}

static int l_state(lua_State *L) {
  lua_pushstring(L, state_name(check(L, 1)->p.state));
  return 1;
}

static int l_role(lua_State *L) {
  lua_pushstring(L, check(L, 1)->p.cfg.role == DX_ROLE_SERVER ? "server" : "client");
  return 1;
}

static int l_stats(lua_State *L) {
  engine *e = check(L, 1);
  lua_createtable(L, 0, 6);
  lua_pushinteger(L, (lua_Integer)e->p.stats.frames_in);
  lua_setfield(L, -2, "frames_in");
  lua_pushinteger(L, (lua_Integer)e->p.stats.frames_out);
  lua_setfield(L, -2, "frames_out");
  lua_pushinteger(L, (lua_Integer)e->p.stats.messages_in);
  lua_setfield(L, -2, "messages_in");
  lua_pushinteger(L, (lua_Integer)e->p.stats.messages_out);
  lua_setfield(L, -2, "messages_out");
  lua_pushboolean(L, e->p.pmd != NULL);
  lua_setfield(L, -2, "deflate");
  return 1;
}

static int l_release(lua_State *L) {
  engine *e = luaL_checkudata(L, 1, DX_ENGINE_MT);
  if (e->p.cfg.max_message) {
    dx_proto_release(&e->p);
    e->p.cfg.max_message = 0;
    lua_pushnil(L); /* the strings the output pointed into */
    lua_setiuservalue(L, 1, 1);
  }
  return 0;
}

static int l_tostring(lua_State *L) {
  engine *e = luaL_checkudata(L, 1, DX_ENGINE_MT);
  if (!e->p.cfg.max_message) lua_pushfstring(L, "duplex.engine (released): %p", (void *)e);
  else
    lua_pushfstring(L, "duplex.engine (%s, %s): %p",
                    e->p.cfg.role == DX_ROLE_SERVER ? "server" : "client",
                    state_name(e->p.state), (void *)e);
  return 1;
}

/* Compress a whole message the way a fresh no-context-takeover stream would,
 * so that the same bytes are valid on every connection that negotiated
 * server_no_context_takeover with a window of at least window_bits. */
static int compress_once(lua_State *L, const char *s, size_t n, int window_bits, dx_buf *out) {
  dx_pmd_params params = {1, 1, window_bits, window_bits};
  dx_pmd *z = dx_pmd_new(DX_ROLE_SERVER, &params, NULL);
  if (!z) return luaL_error(L, "encode_frame: window_bits must be 8..15");
  int rc = dx_pmd_deflate(z, (const uint8_t *)s, n, 1, out);
  dx_pmd_free(z);
  if (rc != DX_PMD_OK) {
    dx_buf_free(out);
    return luaL_error(L, "encode_frame: out of memory");
  }
  return 0;
}

/* core.encode_frame(data [, kind = "text" [, fin = true [, window_bits]]])
 * -> an unmasked (server) frame to hand to many engines with send_raw.
 * With window_bits the message is compressed once (permessage-deflate, RSV1)
 * for connections without server context takeover. */
static int l_encode_frame(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  static const char *const names[] = {"text", "binary", "continuation", "ping", "pong", NULL};
  static const int ops[] = {DX_OP_TEXT, DX_OP_BINARY, DX_OP_CONT, DX_OP_PING, DX_OP_PONG};
  int op = ops[luaL_checkoption(L, 2, "text", names)];
  int fin = lua_isnoneornil(L, 3) ? 1 : lua_toboolean(L, 3);
  int window_bits = (int)dx_opt_range(L, 4, 0, 0, 15);
  if (dx_opcode_is_control(op) && n > DX_CONTROL_MAX)
    return luaL_argerror(L, 1, "control frame payload longer than 125 bytes");
  if (op == DX_OP_TEXT) {
    uint32_t st = DX_UTF8_ACCEPT;
    if (dx_utf8_feed(&st, (const uint8_t *)s, n) != 0 || (fin && !dx_utf8_complete(st)))
      return luaL_argerror(L, 1, "text message is not valid UTF-8 (send it as binary)");
  }
  dx_buf z = DX_BUF_INIT;
  int rsv = 0;
  if (window_bits) {
    if (op != DX_OP_TEXT && op != DX_OP_BINARY) return luaL_argerror(L, 2, "only messages are compressed");
    if (!fin) return luaL_argerror(L, 3, "a compressed broadcast frame must be a whole message");
    compress_once(L, s, n, window_bits, &z);
    s = (const char *)dx_buf_head(&z);
    n = dx_buf_size(&z);
    rsv = DX_RSV1;
  }
  uint8_t hdr[DX_FRAME_HEADER_MAX];
  size_t h = dx_frame_encode(hdr, fin, rsv, op, n, NULL);
  luaL_Buffer b;
  char *out = luaL_buffinitsize(L, &b, h + n);
  memcpy(out, hdr, h);
  if (n) memcpy(out + h, s, n);
  dx_buf_free(&z);
  luaL_pushresultsize(&b, h + n);
  return 1;
}

/* core.close_check(code, reason) -> true, or nil and why not: the close
 * arguments judged before anything changes (e:close raises on the same).
 * nil is no code; 0, a fraction or a number beyond 16 bits is a bad code
 * like any other, judged by the same rule. */
static int l_close_check(lua_State *L) {
  lua_Integer code = 0;
  if (!lua_isnoneornil(L, 1)) {
    int isint;
    code = lua_tointegerx(L, 1, &isint);
    if (!isint || code < 1 || code > 65535) code = 1; /* 1 is never a code to send */
  }
  size_t n;
  const char *reason = luaL_optlstring(L, 2, "", &n);
  const char *bad = dx_close_args_error((unsigned)code, reason, n);
  if (!bad) {
    lua_pushboolean(L, 1);
    return 1;
  }
  luaL_pushfail(L);
  lua_pushstring(L, bad);
  return 2;
}

/* core.close_code_valid(code) -> may this code be sent in a close frame? */
static int l_close_code_valid(lua_State *L) {
  lua_Integer code = luaL_checkinteger(L, 1);
  lua_pushboolean(L, code >= 0 && code <= 65535 && dx_close_code_valid((unsigned)code));
  return 1;
}

void dx_open_engine(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"feed", l_feed},       {"next", l_next},         {"has_input", l_has_input},
      {"send", l_send},       {"ping", l_ping},         {"pong", l_pong},
      {"close", l_close},     {"send_raw", l_send_raw}, {"data_to_send", l_data_to_send},
      {"pending", l_pending}, {"state", l_state},       {"role", l_role},
      {"stats", l_stats},     {"release", l_release},   {"shrink", l_shrink},
      {"holding", l_holding}, {"set_timing", l_set_timing}, {"due", l_due},
      {"tick", l_tick},
      {NULL, NULL}};
  static const luaL_Reg meta[] = {
      {"__gc", l_release}, {"__close", l_release}, {"__tostring", l_tostring}, {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"engine", l_engine_new},
                                   {"encode_frame", l_encode_frame},
                                   {"close_code_valid", l_close_code_valid},
                                   {"close_check", l_close_check},
                                   {NULL, NULL}};
  luaL_newmetatable(L, DX_ENGINE_MT);
  dx_register_mt(L, &ENGINE_KEY);
  luaL_setfuncs(L, meta, 0);
  luaL_newlibtable(L, methods);
  lua_pushvalue(L, -2); /* the methods' upvalue: dx_checkself */
  luaL_setfuncs(L, methods, 1);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
}
