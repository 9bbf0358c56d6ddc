/*
 * The socket object for Lua on the event loop (l_loop.c): a connected TCP
 * socket (TLS on top once l_tls.c started it), and the glue to a WebSocket
 * engine (sock:attach / sock:receive).
 *
 * Output is corked: sock:write only appends to the socket's buffer and marks
 * it dirty; the loop writes every dirty socket once per pass, before it
 * waits, in one sendmsg of the socket's buffer followed by the attached
 * engine's out buffer. Input goes through the loop's one receive buffer.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "dx_clock.h"
#include "l_socket.h"

#define SOCK_MAX_OUTPUT (64u << 20) /* bytes a socket buffers before write fails */
/* What one connection's receive may take of a loop pass before it lets the
 * others run: a peer that floods (pings, a burst of messages, one huge
 * message) then waits for the next pass like everyone else, and accepts,
 * timers and writes go on between its turns. A pass costs about the number
 * of busy connections times this share, and a newcomer waits a few passes:
 * 64 KiB keeps a pass over 200 peers pushing large messages near 10 ms. */
#define PASS_EVENTS 64
#define PASS_BYTES (64u << 10)

int dx_lua_fail(lua_State *L, const char *msg) {
  luaL_pushfail(L);
  lua_pushstring(L, msg);
  return 2;
}

int dx_lua_fail_errno(lua_State *L, int err) {
  char buf[128];
  return dx_lua_fail(L, dx_sock_strerror(err, buf, sizeof buf));
}

int dx_lua_check_port(lua_State *L, int idx, const char *what) {
  int isint;
  lua_Integer port = lua_tointegerx(L, idx, &isint);
  if (!isint || port < 0 || port > 65535) return luaL_error(L, "%s: port must be an integer in 0..65535", what);
  return (int)port;
}

const char *dx_lua_opt_string(lua_State *L, int t, const char *key) {
  lua_getfield(L, t, key);
  const char *s = NULL;
  if (!lua_isnil(L, -1)) {
    s = lua_tostring(L, -1);
    if (!s) luaL_error(L, "option %s: string expected", key);
  }
  lua_pop(L, 1); /* the table keeps it alive */
  return s;
}

void dx_lua_new_class(lua_State *L, const char *name, const luaL_Reg *methods, const luaL_Reg *meta) {
  luaL_newmetatable(L, name);
  if (meta) luaL_setfuncs(L, meta, 0);
  if (methods) {
    lua_newtable(L);
    lua_pushvalue(L, -2); /* the methods' upvalue: dx_checkself */
    luaL_setfuncs(L, methods, 1);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
}

/* ---- output ---- */

/* The socket's own bytes (a 101, an HTTP answer) come once or rarely, and
 * then the engine's frames follow: their buffer is made for them and given
 * back once they are written, not kept by every idle connection. */
static size_t own_size(const lsock *s) { return s->out ? dx_buf_size(s->out) : 0; }

/* The buffer for the socket's own bytes; NULL when memory runs out. */
static dx_buf *own_buf(lsock *s) {
  if (!s->out) s->out = calloc(1, sizeof *s->out);
  return s->out;
}

static void free_own(lsock *s) {
  if (!s->out) return;
  dx_buf_free(s->out);
  free(s->out);
  s->out = NULL;
}

size_t dx_sock_buffered(const lsock *s) {
  return own_size(s) + (s->engine ? dx_proto_pending(s->engine) : 0);
}

static void set_blocked(lsock *s, int blocked) {
  if (blocked == s->blocked) return;
  s->blocked = blocked;
  if (blocked)
    s->loop->nblocked++;
  else
    s->loop->nblocked--;
}

static void consume_own(lsock *s, size_t n) {
  dx_buf_consume(s->out, n);
  if (dx_buf_size(s->out) == 0) free_own(s);
}

static void consume2(lsock *s, size_t n) {
  size_t own = own_size(s);
  if (own > 0) {
    size_t k = n < own ? n : own;
    consume_own(s, k);
    n -= k;
  }
  if (n > 0) dx_out_consume(&s->engine->out, n);
}

#define FLUSH_IOV 16

/* 0: all written, 1: blocked (flush_want set), -1: failed (werr set) */
static int flush_plain(lsock *s) {
  for (;;) {
    struct iovec iov[FLUSH_IOV];
    int n = 0;
    if (own_size(s)) iov[n++] = (struct iovec){dx_buf_head(s->out), dx_buf_size(s->out)};
    if (s->engine && dx_proto_pending(s->engine)) {
      dx_span sp[FLUSH_IOV];
      size_t k = dx_out_spans(&s->engine->out, sp, (size_t)(FLUSH_IOV - n));
      for (size_t i = 0; i < k; i++) iov[n++] = (struct iovec){(void *)sp[i].p, sp[i].n};
    }
    if (n == 0) return 0;
    ssize_t w = dx_sock_sendv(s->io.fd, iov, n);
    if (w < 0) {
      if (w == -EAGAIN || w == -EWOULDBLOCK) {
        s->flush_want = EPOLLOUT;
        return 1;
      }
      s->werr = (int)-w;
      return -1;
    }
    consume2(s, (size_t)w);
  }
}

/* The engine was released while TLS owed a retry with its bytes (the
 * payload strings they were may be freed): the stream cannot go on. */
static int retry_lost(lsock *s) {
  s->tls_wsrc = 0;
  s->tls_failed = 1;
  s->werr = EPIPE;
  return -1;
}

/* TLS writes one buffer at a time: the socket's own bytes, else the
 * engine's first span. A write that wants a retry must be repeated with
 * the same bytes, so those stay pinned in the engine until it is done. */
static int flush_tls(lsock *s) {
  char err[DX_ERR_MAX];
  for (;;) {
    int src = s->tls_wsrc;
    if (src == 2 && !s->engine) src = 0; /* detached meanwhile */
    if (!src) src = own_size(s) ? 1 : (s->engine && dx_proto_pending(s->engine)) ? 2 : 0;
    if (!src) return 0;
    dx_span sp;
    if (src == 1) sp = (dx_span){dx_buf_head(s->out), dx_buf_size(s->out)};
    else if (dx_out_spans(&s->engine->out, &sp, 1) == 0) return retry_lost(s);
    size_t put;
    int rc = dx_tls_write(s->ssl, sp.p, sp.n, &put, err, sizeof err);
    if (src == 2) s->engine->out_pinned = 0;
    if (rc == DX_TLS_DONE) {
      s->tls_wsrc = 0;
      if (src == 1) consume_own(s, put);
      else dx_out_consume(&s->engine->out, put);
    } else if (rc == DX_TLS_WANT_READ || rc == DX_TLS_WANT_WRITE) {
      s->tls_wsrc = src;
      if (src == 2) s->engine->out_pinned = sp.n;
      s->flush_want = rc == DX_TLS_WANT_READ ? EPOLLIN : EPOLLOUT;
      return 1;
    } else {
      s->tls_failed = 1;
      s->werr = errno && errno != EAGAIN ? errno : EPROTO;
      return -1;
    }
  }
}

/* Write what the kernel takes now and wake drain waiters accordingly. */
static int flush_step(lsock *s) {
  if (s->closed) return -1;
  if (s->handshaking) return 0;
  if (s->tls_failed && !s->werr) s->werr = EPROTO;
  int rc = s->werr ? -1 : s->ssl ? flush_tls(s) : flush_plain(s);
  set_blocked(s, rc == 1);
  if (rc < 0) {
    /* nobody will ever read it */
    free_own(s);
    if (s->engine) dx_out_consume(&s->engine->out, dx_proto_pending(s->engine));
  }
  size_t left = rc < 0 ? 0 : dx_sock_buffered(s);
  dx_io_wake_drain(s->loop, &s->io, left);
  if (s->pump_full && left <= s->pump_low) {
    s->pump_full = 0;
    if (s->watch) dx_watch_queue(s);
  }
  return rc;
}

static void sock_dirty_flush(dx_loop *loop, dx_dirty *d) {
  (void)loop;
  flush_step(dx_container_of(d, lsock, dirty));
}

static void sock_event(dx_loop *loop, dx_io *io, uint32_t revents) {
  lsock *s = dx_container_of(io, lsock, io);
  if (revents & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) s->rd_empty = 0;
  if (revents & (EPOLLRDHUP | EPOLLERR | EPOLLHUP)) s->rd_hup = 1;
  if (s->blocked && (revents & (s->flush_want | EPOLLERR | EPOLLHUP))) dx_dirty_mark(loop, &s->dirty);
  if (s->watch && (revents & ((s->pump_out ? EPOLLOUT : EPOLLIN) | EPOLLRDHUP | EPOLLERR | EPOLLHUP)))
    dx_watch_queue(s);
  dx_io_wake(loop, io, revents);
}

/* engine->on_output: the engine queued bytes while its out was empty */
static void sock_engine_output(void *ud) {
  lsock *s = ud;
  if (!s->closed) dx_dirty_mark(s->loop, &s->dirty);
}

/* ---- the connection's clock (sock:clock) ----
 * One loop timer per connection at its engine's next due time: nothing
 * walks the connections, and an idle one costs nothing until its ping is
 * due. Traffic only moves the due time later, so the timer is not moved
 * on each message: when it fires early the engine says nothing is due yet
 * and it is armed again for the new time. */

static void clock_arm(lsock *s) {
  double due = dx_timing_due(s->engine, dx_now());
  if (due < 0 || dx_timer_start(s->loop, &s->clock, due) < 0) dx_timer_stop(s->loop, &s->clock);
}

/* A due time may be earlier than the timer's (engine->on_due, or input
 * that left buffers to give back a quiet second from now). */
static void clock_earlier(lsock *s) {
  if (!s->clock_owner || s->closed || !s->engine) return;
  double due = dx_timing_due(s->engine, dx_now());
  if (due >= 0 && (!dx_timer_armed(&s->clock) || due < s->clock.when)) dx_timer_start(s->loop, &s->clock, due);
}

static void sock_engine_due(void *ud) { clock_earlier(ud); }

/* Input arrived at now. The precheck keeps the due-time arithmetic off
 * the path of every read: only a timer that is not armed, or armed for
 * later than a quiet second (a ping's time), can be too late. */
static void clock_seen(lsock *s, dx_proto *p) {
  double now = dx_now();
  dx_timing_seen(p, now);
  if (s->clock_owner && (!dx_timer_armed(&s->clock) || s->clock.when > now + DX_TIMING_QUIET)) clock_earlier(s);
}

/* The engine's verdict ends the connection: the owner's _timeout(what)
 * runs in a coroutine of its own (it may close, which may wait). */
static void clock_fire(dx_loop *loop, dx_timer *timer) {
  lsock *s = dx_container_of(timer, lsock, clock);
  if (s->closed || !s->engine || !s->clock_owner) return;
  const char *what = dx_tick_name(dx_timing_tick(s->engine, dx_now()));
  if (!what) {
    clock_arm(s);
    return;
  }
  lua_State *L = dx_lua_state(loop);
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->clock_owner);
  lua_getfield(L, -1, "_timeout");
  lua_insert(L, -2);
  lua_pushstring(L, what);
  dx_lua_spawn(loop, 2);
}

static void clock_stop(lua_State *L, lsock *s) {
  dx_timer_stop(s->loop, &s->clock);
  if (L && s->clock_owner) luaL_unref(L, LUA_REGISTRYINDEX, s->clock_owner);
  if (L) s->clock_owner = 0;
}

lsock *dx_sock_writing(const dx_proto *p) {
  return p->on_output == sock_engine_output ? p->on_output_ud : NULL;
}

/* ---- socket objects ---- */

static const char SOCK_KEY = 0; /* its address tags the metatable (dx_checkudata) */

lsock *dx_sock_check(lua_State *L, int idx) { return dx_checkudata(L, idx, &SOCK_KEY, DX_SOCK_MT); }

/* The socket a method is called on (the hot ones: receive, pump, buffered). */
static lsock *check_self(lua_State *L) { return dx_checkself(L, &SOCK_KEY, DX_SOCK_MT); }

/* The engine argument at idx of a socket method: the engine attached to
 * the socket at 1 (its type checked when it was attached) costs no
 * metatable lookup. */
static void check_own_engine(lua_State *L, int idx) {
  lua_getiuservalue(L, 1, UV_ENGINE);
  int own = lua_rawequal(L, -1, idx);
  lua_pop(L, 1);
  if (own)
    dx_check_live_engine(L, idx);
  else
    dx_check_engine(L, idx);
}

static void detach_engine(lsock *s) {
  /* an engine free to go keeps what it had in the shared buffer now */
  if (s->engine && s->loop->rbuf_owner == s->engine) dx_sock_rbuf_claim(s->loop);
  if (s->engine) s->engine->out_pinned = 0;
  if (s->engine && s->engine->on_output_ud == s) {
    s->engine->on_output = NULL;
    s->engine->on_due = NULL;
    s->engine->on_output_ud = NULL;
  }
  s->engine = NULL;
  dx_timer_stop(s->loop, &s->clock);
}

/* Push a socket for a connected fd (which it owns from now on), with nuv
 * uservalues: an accepted socket has no host to keep. Or return NULL with
 * nothing pushed and fd closed. */
lsock *dx_sock_push(lua_State *L, dx_loop *loop, int fd, int nuv, int *err) {
  lsock *s = lua_newuserdatauv(L, sizeof *s, nuv);
  memset(s, 0, sizeof *s);
  dx_io_init(&s->io, sock_event);
  dx_dirty_init(&s->dirty, sock_dirty_flush);
  dx_link_init(&s->ready);
  dx_link_init(&s->member);
  dx_timer_init(&s->clock, clock_fire);
  s->loop = loop;
  s->closed = 1; /* until registered */
  luaL_setmetatable(L, DX_SOCK_MT);
  int rc = dx_io_add(loop, &s->io, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP);
  if (rc < 0) {
    close(fd);
    lua_pop(L, 1);
    *err = -rc;
    return NULL;
  }
  s->closed = 0;
  loop->nsockets++;
  return s;
}

/* Close now. Orderly: write what the kernel takes at once and send TLS
 * close_notify, then FIN; output that does not fit is dropped (flush first
 * to be sure). Abortive: RST. Waiters get "closed". */
void dx_sock_close(lsock *s, int abort, int with_engine) {
  if (s->closed) return;
  dx_watch_leave(s);
  if (!with_engine) detach_engine(s);
  if (abort) {
    dx_sock_linger0(s->io.fd);
  } else if (!s->werr && !s->handshaking && !s->tls_failed) {
    if (dx_sock_buffered(s) > 0) (s->ssl ? flush_tls : flush_plain)(s);
    if (s->ssl) dx_tls_shutdown(s->ssl);
  }
  detach_engine(s);
  dx_dirty_clear(&s->dirty);
  set_blocked(s, 0);
  if (s->ssl) SSL_free(s->ssl);
  s->ssl = NULL;
  free_own(s);
  int fd = s->io.fd;
  s->closed = 1;
  s->loop->nsockets--;
  dx_io_remove(s->loop, &s->io);
  close(fd);
}

static void clear_uservalues(lua_State *L, int idx) {
  for (int i = 1; i <= UV_COUNT; i++) {
    lua_pushnil(L);
    lua_setiuservalue(L, idx, i);
  }
}

static int sock_close_m(lua_State *L) {
  lsock *s = dx_sock_check(L, 1);
  clock_stop(L, s);
  dx_sock_close(s, lua_toboolean(L, 2), 1);
  clear_uservalues(L, 1);
  lua_pushboolean(L, 1);
  return 1;
}

/* A to-be-closed variable going out of scope: orderly, even on an error
 * (whose object arrives as the second argument, not an abort flag). */
static int sock_close_tbc(lua_State *L) {
  lua_settop(L, 1);
  return sock_close_m(L);
}

static int sock_gc(lua_State *L) {
  lsock *s = dx_sock_check(L, 1);
  clock_stop(L, s);
  /* The engine may have been finalized first: leave its buffer alone. */
  dx_sock_close(s, 0, 0);
  return 0;
}

static int sock_tostring(lua_State *L) {
  lsock *s = dx_sock_check(L, 1);
  if (s->closed)
    lua_pushfstring(L, "duplex.socket (closed): %p", (void *)s);
  else
    lua_pushfstring(L, "duplex.socket (fd %d%s): %p", s->io.fd, s->ssl ? ", tls" : "", (void *)s);
  return 1;
}

static int sock_fd(lua_State *L) {
  lsock *s = dx_sock_check(L, 1);
  if (s->closed) return dx_lua_fail(L, "closed");
  lua_pushinteger(L, s->io.fd);
  return 1;
}

int dx_lua_push_addr(lua_State *L, const dx_addr *a) {
  char ip[DX_IPSTR_MAX];
  int port;
  dx_addr_text(a, ip, &port);
  lua_pushstring(L, ip);
  lua_pushinteger(L, port);
  return 2;
}

int dx_lua_push_address(lua_State *L, int fd, int peer) {
  dx_addr a;
  int rc = dx_addr_of(fd, peer, &a);
  return rc < 0 ? dx_lua_fail_errno(L, rc) : dx_lua_push_addr(L, &a);
}

static int sock_peer(lua_State *L) {
  lsock *s = dx_sock_check(L, 1);
  return s->closed ? dx_lua_fail(L, "closed") : dx_lua_push_address(L, s->io.fd, 1);
}

static int sock_local_address(lua_State *L) {
  lsock *s = dx_sock_check(L, 1);
  return s->closed ? dx_lua_fail(L, "closed") : dx_lua_push_address(L, s->io.fd, 0);
}

static int sock_setnodelay(lua_State *L) {
  lsock *s = dx_sock_check(L, 1);
  if (s->closed) return dx_lua_fail(L, "closed");
  int rc = dx_sock_nodelay(s->io.fd, lua_toboolean(L, 2));
  if (rc < 0) return dx_lua_fail_errno(L, rc);
  lua_pushboolean(L, 1);
  return 1;
}

static int sock_buffered(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)dx_sock_buffered(check_self(L)));
  return 1;
}

static int sock_write(lua_State *L) {
  lsock *s = dx_sock_check(L, 1);
  size_t n;
  const char *data = luaL_checklstring(L, 2, &n);
  if (s->closed || s->wr_shut) return dx_lua_fail(L, "closed");
  if (s->werr) return dx_lua_fail_errno(L, s->werr);
  size_t own = own_size(s);
  if (own > SOCK_MAX_OUTPUT || n > SOCK_MAX_OUTPUT - own) return dx_lua_fail(L, "output buffer full");
  if (n > 0) {
    dx_buf *b = own_buf(s);
    if (!b || dx_buf_append(b, data, n) < 0) return dx_lua_fail(L, "not enough memory");
    dx_dirty_mark(s->loop, &s->dirty);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* sock:write_accept(opts): queue the 101 that core.handshake_response(opts)
 * makes, built in the socket's output: no string for it. */
static int sock_write_accept(lua_State *L) {
  lsock *s = dx_sock_check(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (s->closed || s->wr_shut) return dx_lua_fail(L, "closed");
  if (s->werr) return dx_lua_fail_errno(L, s->werr);
  if (own_size(s) > SOCK_MAX_OUTPUT) return dx_lua_fail(L, "output buffer full");
  dx_buf *b = own_buf(s);
  if (!b) return dx_lua_fail(L, "not enough memory");
  dx_handshake_build_accept(L, 2, b);
  dx_dirty_mark(s->loop, &s->dirty);
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- input ---- */

enum { RD_AGAIN = -1, RD_ERROR = -2 };

/* Bytes read (> 0), 0 at end of stream, RD_AGAIN (wait for *want) or
 * RD_ERROR (err set). */
static ssize_t raw_read(lsock *s, uint8_t *buf, size_t n, uint32_t *want, char *err, size_t errlen) {
  if (s->tls_failed) {
    snprintf(err, errlen, "tls connection failed");
    return RD_ERROR;
  }
  if (s->ssl) {
    size_t got;
    int rc = dx_tls_read(s->ssl, buf, n, &got, err, errlen);
    switch (rc) {
    case DX_TLS_DONE:
      /* a write that needed to read first can go on now */
      if (s->blocked && s->flush_want == EPOLLIN) dx_dirty_mark(s->loop, &s->dirty);
      return (ssize_t)got;
    case DX_TLS_CLOSED: return 0;
    case DX_TLS_WANT_READ: *want = EPOLLIN; return RD_AGAIN;
    case DX_TLS_WANT_WRITE: *want = EPOLLOUT; return RD_AGAIN;
    default: s->tls_failed = 1; return RD_ERROR;
    }
  }
  if (s->rd_empty) {
    *want = EPOLLIN;
    return RD_AGAIN;
  }
  ssize_t r = dx_sock_recv(s->io.fd, buf, n);
  if (r > 0 && (size_t)r < n && !s->rd_hup) s->rd_empty = 1;
  if (r >= 0) return r;
  if (r == -EAGAIN || r == -EWOULDBLOCK) {
    s->rd_empty = !s->rd_hup;
    *want = EPOLLIN;
    return RD_AGAIN;
  }
  char tmp[128];
  snprintf(err, errlen, "%s", dx_sock_strerror((int)-r, tmp, sizeof tmp));
  return RD_ERROR;
}

/* ---- the shared receive buffer ----
 * A pump that hands messages to on_message leaves the unparsed rest of a
 * read in the loop's receive buffer while on_message runs, instead of
 * copying it into the engine after every message (one read holds several
 * large frames, and each would be copied again): the buffer stays that
 * engine's until something is about to read into it, or the pump returns. */
void dx_sock_rbuf_claim(dx_loop *loop) {
  dx_proto *p = loop->rbuf_owner;
  if (!p) return;
  loop->rbuf_owner = NULL;
  if (p->cfg.max_message) dx_proto_keep(p); /* a released engine keeps nothing */
}

/* Read up to max bytes at once into the loop's receive buffer: how many
 * (> 0); 0 when the read must wait for *want; -1 with nil, reason pushed
 * (closed, an error). What read, try_read and take_request share. */
static ssize_t read_rbuf(lua_State *L, lsock *s, size_t max, uint32_t *want) {
  const char *why = s->closed ? "closed" : s->handshaking ? "tls handshake in progress" : NULL;
  char err[DX_ERR_MAX];
  if (!why) {
    if (max > s->loop->rbuf_size) max = s->loop->rbuf_size;
    dx_sock_rbuf_claim(s->loop);
    ssize_t n = raw_read(s, s->loop->rbuf, max, want, err, sizeof err);
    if (n > 0) return n;
    if (n == RD_AGAIN) return 0;
    why = n == 0 ? "closed" : err;
  }
  dx_lua_fail(L, why);
  return -1;
}

/* Read up to max bytes at once: 1 with them pushed, 2 with nil, reason
 * pushed (closed, an error), or 0 when the read must wait for *want. */
static int read_now(lua_State *L, lsock *s, size_t max, uint32_t *want) {
  ssize_t n = read_rbuf(L, s, max, want);
  if (n <= 0) return n < 0 ? 2 : 0;
  lua_pushlstring(L, (const char *)s->loop->rbuf, (size_t)n);
  return 1;
}

static int read_k(lua_State *L, int status, lua_KContext ctx) {
  dx_task *t = (dx_task *)ctx;
  lsock *s = dx_sock_check(L, 1);
  if (status == LUA_YIELD && dx_lua_woken(L, t) == DX_WAKE_TIMEOUT) return dx_lua_fail(L, "timeout");
  uint32_t want = 0;
  int r = read_now(L, s, (size_t)lua_tointeger(L, 2), &want);
  if (r == 0) return dx_lua_wait_io(L, t, &s->io, want, 0, read_k);
  return r;
}

static int sock_read(lua_State *L) {
  dx_sock_check(L, 1);
  dx_task *t = dx_lua_begin_read(L);
  return read_k(L, LUA_OK, (lua_KContext)t);
}

/* sock:try_read(max) -> bytes | nil, "again" | nil, "closed" | nil, err:
 * what has come, never waiting (for a caller that cannot: a watcher's
 * callbacks, which learn of more input when the watcher queues the socket) */
static int sock_try_read(lua_State *L) {
  lsock *s = dx_sock_check(L, 1);
  lua_Integer max = luaL_optinteger(L, 2, DX_LOOP_RBUF_SIZE);
  luaL_argcheck(L, max >= 1, 2, "must be >= 1");
  uint32_t want = 0;
  int r = read_now(L, s, (size_t)max, &want);
  return r ? r : dx_lua_fail(L, "again");
}

/* sock:take_request(hs) -> request | nil, err[, status]: the upgrade
 * request that hs (core.handshake_server) parses, from what has come, read
 * now and never waiting (for the watcher's callbacks: the watcher queues
 * the socket when more comes). err is "again" while more is to come,
 * "closed" or a read error, or the message of a malformed request with the
 * status to answer it with. The bytes go from the loop's receive buffer
 * into the parser: no string for them. */
static int sock_take_request(lua_State *L) {
  lsock *s = dx_sock_check(L, 1);
  luaL_checkudata(L, 2, DX_HANDSHAKE_SERVER_MT);
  lua_settop(L, 2);
  for (;;) {
    uint32_t want = 0;
    ssize_t n = read_rbuf(L, s, s->loop->rbuf_size, &want);
    if (n < 0) return 2;
    if (n == 0) return dx_lua_fail(L, "again");
    int k = dx_handshake_feed(L, 2, (const char *)s->loop->rbuf, (size_t)n);
    if (!lua_isnil(L, 3)) return 1;
    if (k == 3) {           /* nil, status, message */
      lua_insert(L, 4);     /* nil, message, status */
      return 3;
    }
    lua_settop(L, 2);
  }
}

static void charge_pass(lsock *s) {
  if (s->pass != (uint32_t)s->loop->pass) {
    s->pass = (uint32_t)s->loop->pass;
    s->pass_events = 0;
    s->pass_bytes = 0;
  }
}

int dx_sock_spent(lsock *s) {
  charge_pass(s);
  return s->pass_events >= PASS_EVENTS || s->pass_bytes >= PASS_BYTES;
}

/* Where to read the next room bytes: into the engine's message buffer when
 * they are all payload of a large frame (no copy out of the receive buffer
 * later), else the loop's receive buffer. Only a read that would take no
 * fewer bytes: one ending at the frame's end when the shared buffer could
 * have taken the next frames too would cost a system call per message. */
static uint8_t *read_target(lsock *s, dx_proto *p, size_t room) {
  size_t direct;
  uint8_t *dst = dx_proto_read_room(p, &direct);
  if (dst && direct >= room) return dst;
  dx_sock_rbuf_claim(s->loop);
  return s->loop->rbuf;
}

enum { EV_PUSHED, EV_FAILED, EV_AGAIN, EV_LATER };

static int failed(lua_State *L, const char *msg) {
  dx_lua_fail(L, msg);
  return EV_FAILED;
}

/* One step towards the engine's next event, shared by receive (which waits)
 * and pump (which never does): EV_PUSHED, its values pushed (*nres of
 * them); EV_FAILED, nil and a message pushed; EV_AGAIN, nothing to read
 * until *want; EV_LATER, this pass's share is used up. With keep, returns
 * only where no fed byte still lies in the loop's shared receive buffer:
 * before asking for an event (what an earlier event left is in the engine's
 * own memory), or once the engine has used up a read. Without, what an
 * event leaves may stay there, the engine the buffer's owner until
 * dx_sock_rbuf_claim. */
static int next_event(lua_State *L, lsock *s, dx_proto *p, int *nres, uint32_t *want, int keep) {
  for (;;) {
    charge_pass(s);
    if (s->pass_events >= PASS_EVENTS) return EV_LATER;
    int k = keep ? dx_engine_next(L, 2) : dx_engine_next_unkept(L, 2);
    if (k) {
      if (!keep && s->loop->rbuf_owner != p) {
        dx_sock_rbuf_claim(s->loop);
        s->loop->rbuf_owner = p;
      }
      s->pass_events++;
      *nres = k;
      return EV_PUSHED;
    }
    if (s->closed) return failed(L, "closed");
    if (s->handshaking) return failed(L, "tls handshake in progress");
    if (s->pass_bytes >= PASS_BYTES) return EV_LATER;
    char err[DX_ERR_MAX];
    /* no more than the rest of this pass's share */
    size_t room = PASS_BYTES - (size_t)s->pass_bytes;
    if (room > s->loop->rbuf_size) room = s->loop->rbuf_size;
    uint8_t *buf = read_target(s, p, room);
    ssize_t n = raw_read(s, buf, room, want, err, sizeof err);
    if (n == 0) return failed(L, "closed");
    if (n == RD_AGAIN) return EV_AGAIN;
    if (n < 0) return failed(L, err);
    s->pass_bytes += (uint32_t)n;
    clock_seen(s, p);
    dx_proto_feed(p, buf, (size_t)n);
  }
}

int dx_sock_receive_step(lua_State *L, int status, dx_task *t, lua_KFunction k) {
  lsock *s = lua_touserdata(L, 1); /* checked by the caller; a yield keeps the stack */
  if (status == LUA_YIELD && dx_lua_woken(L, t) == DX_WAKE_TIMEOUT) return dx_lua_fail(L, "timeout");
  dx_proto *p = dx_live_engine(L, 2);
  if (!p) return dx_lua_fail(L, "closed");
  int nres = 2;
  uint32_t want = 0;
  switch (next_event(L, s, p, &nres, &want, 1)) {
  case EV_LATER: return dx_lua_yield(L, t, k);
  case EV_AGAIN: return dx_lua_wait_io(L, t, &s->io, want, 0, k);
  default: return nres;
  }
}

/* The engine's next event, reading as needed. stack: sock, engine, timeout */
static int receive_k(lua_State *L, int status, lua_KContext ctx) {
  return dx_sock_receive_step(L, status, (dx_task *)ctx, receive_k);
}

/* One event for sock:pump, its values pushed (the count returned), or nil
 * and "again" / an error. stack: sock, engine, high, low, ... */
static int pump_one(lua_State *L, lsock *s, lua_Integer high, uint32_t low, int keep) {
  dx_proto *p = dx_live_engine(L, 2);
  if (!p) return dx_lua_fail(L, "closed");
  if (high >= 0 && !s->closed && dx_sock_buffered(s) > (size_t)high) {
    s->pump_full = 1;
    s->pump_low = low;
    return dx_lua_fail(L, "again");
  }
  int nres = 2;
  uint32_t want = 0;
  switch (next_event(L, s, p, &nres, &want, keep)) {
  case EV_LATER:
    if (s->watch) dx_watch_queue(s);
    return dx_lua_fail(L, "again");
  case EV_AGAIN: s->pump_out = want == EPOLLOUT; return dx_lua_fail(L, "again");
  default: return nres;
  }
}

/* The nres values on top are a text or binary message (kind, data). */
static int is_message(lua_State *L, int nres) {
  size_t n;
  const char *kind = lua_tolstring(L, -nres, &n);
  return nres == 2 && kind && ((n == 4 && memcmp(kind, "text", 4) == 0) || (n == 6 && memcmp(kind, "binary", 6) == 0));
}

/* sock:pump(engine, high, low[, on_message, ws]) -> the engine's next
 * event, as receive returns it, or nil, "again" when it would have to
 * wait: for more input, for the next loop pass (a watched socket is then
 * queued again for its watcher, since no new input may come to say so), or,
 * with more than high bytes queued for the peer, for the output to drain
 * to low (a watched socket is queued again then). Never yields: what a
 * watcher's callbacks call, with no coroutine per connection.
 * With on_message, messages go to on_message(ws, data, kind) here, each in
 * a protected call that cannot wait, and pumping goes on to the first
 * other event (or "again"): one call per socket with input, not two per
 * message. false and the error, with its traceback, when on_message
 * raised. */
static int sock_pump(lua_State *L) {
  lsock *s = check_self(L);
  check_own_engine(L, 2);
  lua_Integer high = luaL_optinteger(L, 3, -1), low = luaL_optinteger(L, 4, 0);
  luaL_argcheck(L, low >= 0 && low <= UINT32_MAX, 4, "must be 0..2^32-1");
  int deliver = !lua_isnoneornil(L, 5);
  if (deliver) luaL_checktype(L, 5, LUA_TFUNCTION);
  return dx_sock_pump(L, s, high, (uint32_t)low, deliver);
}

int dx_sock_pump(lua_State *L, lsock *s, lua_Integer high, uint32_t low, int deliver) {
  lua_settop(L, 6);
  for (;;) {
    /* delivering: the rest of a read may stay in the loop's buffer while
     * on_message runs (dx_sock_rbuf_claim), and is kept before we return */
    int nres = pump_one(L, s, high, low, !deliver);
    if (!deliver) return nres;
    if (!is_message(L, nres)) {
      dx_sock_rbuf_claim(s->loop);
      return nres;
    }
    lua_pushcfunction(L, dx_lua_traceback);
    lua_pushvalue(L, 5);
    lua_pushvalue(L, 6);
    lua_pushvalue(L, 8); /* data */
    lua_pushvalue(L, 7); /* kind */
    if (lua_pcall(L, 3, 0, 9) != LUA_OK) {
      dx_sock_rbuf_claim(s->loop);
      lua_pushboolean(L, 0);
      lua_insert(L, -2);
      return 2;
    }
    lua_settop(L, 6);
  }
}

static int sock_receive(lua_State *L) {
  lsock *s = check_self(L);
  check_own_engine(L, 2);
  lua_settop(L, 3);
  dx_task *t = dx_lua_begin_in(L, s->loop, 3);
  return receive_k(L, LUA_OK, (lua_KContext)t);
}

static int sock_attach(lua_State *L) {
  lsock *s = dx_sock_check(L, 1);
  if (s->closed) return dx_lua_fail(L, "closed");
  detach_engine(s);
  if (lua_isnoneornil(L, 2)) {
    lua_pushnil(L);
    lua_setiuservalue(L, 1, UV_ENGINE);
  } else {
    dx_proto *p = dx_check_engine(L, 2);
    /* one engine, one transport: take it away from a socket that had it */
    if (p->on_output == sock_engine_output && p->on_output_ud) ((lsock *)p->on_output_ud)->engine = NULL;
    lua_pushvalue(L, 2);
    lua_setiuservalue(L, 1, UV_ENGINE);
    s->engine = p;
    p->on_output = sock_engine_output;
    p->on_due = sock_engine_due;
    p->on_output_ud = s;
    if (dx_proto_pending(p)) dx_dirty_mark(s->loop, &s->dirty);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* sock:clock(owner): keep the attached engine's clocks (e:set_timing) on
 * a loop timer from now on; when they say the connection is over, a new
 * coroutine calls owner:_timeout(what) with e:tick()'s word. sock:clock(nil)
 * stops. */
static int sock_clock(lua_State *L) {
  lsock *s = dx_sock_check(L, 1);
  clock_stop(L, s);
  if (lua_isnoneornil(L, 2)) return 0;
  if (s->closed || !s->engine) return luaL_error(L, "clock: the socket has no engine attached");
  lua_settop(L, 2);
  s->clock_owner = luaL_ref(L, LUA_REGISTRYINDEX);
  clock_arm(s);
  return 0;
}

/* ---- flush, drain, shutdown ---- */

/* stack: sock, low water, timeout, shutdown afterwards */
static int drain_k(lua_State *L, int status, lua_KContext ctx) {
  dx_task *t = (dx_task *)ctx;
  lsock *s = dx_sock_check(L, 1);
  size_t low = (size_t)lua_tointeger(L, 2);
  if (status == LUA_YIELD && dx_lua_woken(L, t) == DX_WAKE_TIMEOUT) return dx_lua_fail(L, "timeout");
  if (s->closed) return dx_lua_fail(L, "closed");
  if (s->werr) return dx_lua_fail_errno(L, s->werr);
  if (dx_sock_buffered(s) > low && !s->blocked && !s->handshaking) {
    /* asked to wait for the output: write now rather than at the end of the pass */
    int rc = flush_step(s);
    if (rc < 0) return dx_lua_fail_errno(L, s->werr);
    if (rc == 0) dx_dirty_clear(&s->dirty);
  }
  if (dx_sock_buffered(s) > low) return dx_lua_wait_io(L, t, &s->io, DX_WANT_DRAIN, low, drain_k);
  if (lua_toboolean(L, 4) && !s->wr_shut) {
    if (s->ssl) dx_tls_shutdown(s->ssl);
    if (shutdown(s->io.fd, SHUT_WR) < 0) return dx_lua_fail_errno(L, errno);
    s->wr_shut = 1;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int drain_start(lua_State *L, lua_Integer low, int timeout_idx, int then_shutdown) {
  dx_sock_check(L, 1);
  lua_pushinteger(L, low);
  lua_pushvalue(L, timeout_idx);
  lua_pushboolean(L, then_shutdown);
  lua_replace(L, 4);
  lua_replace(L, 3);
  lua_replace(L, 2);
  lua_settop(L, 4);
  dx_task *t = dx_lua_begin(L, 3);
  return drain_k(L, LUA_OK, (lua_KContext)t);
}

static int sock_flush(lua_State *L) {
  lua_settop(L, 4);
  return drain_start(L, 0, 2, 0);
}

/* sock:try_flush() -> bytes still buffered: writes what the kernel takes
 * now, without waiting (a publisher asking whether a backlog is real). */
static int sock_try_flush(lua_State *L) {
  lsock *s = dx_sock_check(L, 1);
  if (!s->closed && dx_sock_buffered(s) > 0 && !s->blocked) {
    flush_step(s);
    if (dx_sock_buffered(s) == 0) dx_dirty_clear(&s->dirty);
  }
  lua_pushinteger(L, s->closed ? 0 : (lua_Integer)dx_sock_buffered(s));
  return 1;
}

static int sock_drain(lua_State *L) {
  lua_Integer low = luaL_checkinteger(L, 2);
  luaL_argcheck(L, low >= 0, 2, "must be >= 0");
  lua_settop(L, 4);
  return drain_start(L, low, 3, 0);
}

static int sock_shutdown(lua_State *L) {
  lua_settop(L, 4);
  return drain_start(L, 0, 2, 1);
}

/* ---- registration ---- */

void dx_open_socket(lua_State *L) {
  static const luaL_Reg sock_methods[] = {
      {"read", sock_read},         {"write", sock_write},       {"flush", sock_flush},
      {"try_flush", sock_try_flush}, {"try_read", sock_try_read}, {"take_request", sock_take_request}, {"write_accept", sock_write_accept},
      {"drain", sock_drain},       {"buffered", sock_buffered}, {"shutdown", sock_shutdown},
      {"close", sock_close_m},     {"peer", sock_peer},         {"local_address", sock_local_address},
      {"fd", sock_fd},             {"setnodelay", sock_setnodelay}, {"attach", sock_attach},
      {"receive", sock_receive},   {"starttls", dx_sock_starttls}, {"alpn", dx_sock_alpn},
      {"pump", sock_pump},         {"watch", dx_sock_watch},    {"clock", sock_clock},
      {NULL, NULL}};
  static const luaL_Reg sock_meta[] = {
      {"__gc", sock_gc}, {"__close", sock_close_tbc}, {"__tostring", sock_tostring}, {NULL, NULL}};
  dx_lua_new_class(L, DX_SOCK_MT, sock_methods, sock_meta);
  luaL_getmetatable(L, DX_SOCK_MT);
  dx_register_mt(L, &SOCK_KEY);
  lua_pop(L, 1);
}
