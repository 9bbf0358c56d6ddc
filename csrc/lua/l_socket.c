/*
 * TCP and TLS sockets for Lua on the event loop (l_loop.c): listeners,
 * connections, name resolution without blocking the loop, and the glue to a
 * WebSocket engine (sock:attach / sock:receive).
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

#include "dx_sock.h"
#include "dx_tls.h"
#include "l_core.h" /* before dx_loop.h: lua.h enables its Lua part */
#include "dx_loop.h"

#define SOCK_MT "duplex.socket"
#define LISTENER_MT "duplex.listener"
#define TLSCTX_MT "duplex.tls_context"
#define RESOLVE_MT "duplex.resolve"
#define CONNECT_MT "duplex.connect"

#define SOCK_MAX_OUTPUT (64u << 20) /* bytes a socket buffers before write fails */
#define ACCEPT_BURST 64 /* accepts in one loop pass before letting others run */
/* What one connection's receive may take of a loop pass before it lets the
 * others run: a peer that floods (pings, a burst of messages, one huge
 * message) then waits for the next pass like everyone else, and accepts,
 * timers and writes go on between its turns. A pass costs about the number
 * of busy connections times this share, and a newcomer waits a few passes:
 * 64 KiB keeps a pass over 200 peers pushing large messages near 10 ms. */
#define PASS_EVENTS 64
#define PASS_BYTES (64u << 10)
#define ERR_MAX 256

/* uservalues of a socket */
enum { UV_ENGINE = 1, UV_TLSCTX, UV_HOST, UV_COUNT = UV_HOST };

typedef struct lsock {
  dx_io io;
  dx_dirty dirty;
  dx_loop *loop;
  dx_buf out;
  dx_proto *engine; /* attached engine (kept alive by UV_ENGINE) */
  SSL *ssl;
  uint32_t flush_want; /* readiness a blocked flush waits for */
  int werr;            /* sticky write error (errno) */
  int closed, wr_shut;
  int blocked;     /* the kernel (or TLS) would not take more output */
  int tls_wsrc;    /* the buffer an SSL_write must be retried with: 1 own, 2 engine */
  int handshaking; /* output waits until the TLS handshake is done */
  int tls_failed;  /* fatal TLS error: no more TLS calls */
  /* A short read emptied the kernel's receive buffer: the next read would
   * only say EAGAIN, so wait for the next EPOLLIN edge instead of asking
   * (one system call less per message in a request/response exchange). */
  int rd_empty;
  /* The peer's FIN (or an error) was seen with some data: the data and the
   * end can be reported by one edge, so after it every read really reads. */
  int rd_hup;
  /* receive's share of the current loop pass (see PASS_EVENTS) */
  uint64_t pass;
  unsigned pass_events;
  size_t pass_bytes;
} lsock;

typedef struct llistener {
  dx_io io;
  dx_loop *loop;
  uint64_t pass; /* loop pass of the last accept */
  int burst;     /* accepts in that pass */
  int family;
} llistener;

static int fail(lua_State *L, const char *msg) {
  luaL_pushfail(L);
  lua_pushstring(L, msg);
  return 2;
}

static int fail_errno(lua_State *L, int err) {
  char buf[128];
  return fail(L, dx_sock_strerror(err, buf, sizeof buf));
}

static int check_port(lua_State *L, int idx, const char *what) {
  int isint;
  lua_Integer port = lua_tointegerx(L, idx, &isint);
  if (!isint || port < 0 || port > 65535) return luaL_error(L, "%s: port must be an integer in 0..65535", what);
  return (int)port;
}

/* ---- output ---- */

static size_t buffered(const lsock *s) {
  return dx_buf_size(&s->out) + (s->engine ? dx_proto_pending(s->engine) : 0);
}

static void set_blocked(lsock *s, int blocked) {
  if (blocked == s->blocked) return;
  s->blocked = blocked;
  if (blocked)
    s->loop->nblocked++;
  else
    s->loop->nblocked--;
}

static void consume2(lsock *s, size_t n) {
  size_t own = dx_buf_size(&s->out);
  if (own > 0) {
    size_t k = n < own ? n : own;
    dx_buf_consume(&s->out, k);
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
    if (dx_buf_size(&s->out)) iov[n++] = (struct iovec){dx_buf_head(&s->out), dx_buf_size(&s->out)};
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

/* TLS writes one buffer at a time: the socket's own bytes, else the
 * engine's first span. A write that wants a retry must be repeated with
 * the same bytes, so those stay pinned in the engine until it is done. */
static int flush_tls(lsock *s) {
  char err[ERR_MAX];
  for (;;) {
    int src = s->tls_wsrc;
    if (src == 2 && !s->engine) src = 0; /* detached meanwhile */
    if (!src) src = dx_buf_size(&s->out) ? 1 : (s->engine && dx_proto_pending(s->engine)) ? 2 : 0;
    if (!src) return 0;
    dx_span sp;
    if (src == 1) sp = (dx_span){dx_buf_head(&s->out), dx_buf_size(&s->out)};
    else dx_out_spans(&s->engine->out, &sp, 1);
    size_t put;
    int rc = dx_tls_write(s->ssl, sp.p, sp.n, &put, err, sizeof err);
    if (src == 2) s->engine->out_pinned = 0;
    if (rc == DX_TLS_DONE) {
      s->tls_wsrc = 0;
      if (src == 1) dx_buf_consume(&s->out, put);
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
    dx_buf_free(&s->out);
    if (s->engine) dx_out_consume(&s->engine->out, dx_proto_pending(s->engine));
  }
  dx_io_wake_drain(s->loop, &s->io, rc < 0 ? 0 : buffered(s));
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
  dx_io_wake(loop, io, revents);
}

/* engine->on_output: the engine queued bytes while its out was empty */
static void sock_engine_output(void *ud) {
  lsock *s = ud;
  if (!s->closed) dx_dirty_mark(s->loop, &s->dirty);
}

/* ---- socket objects ---- */

static const char SOCK_KEY = 0; /* its address keys the metatable (dx_checkudata) */

static lsock *to_sock(lua_State *L, int idx) { return dx_checkudata(L, idx, &SOCK_KEY, SOCK_MT); }

static void detach_engine(lsock *s) {
  if (s->engine) s->engine->out_pinned = 0;
  if (s->engine && s->engine->on_output_ud == s) {
    s->engine->on_output = NULL;
    s->engine->on_output_ud = NULL;
  }
  s->engine = NULL;
}

/* Push a socket for a connected fd (which it owns from now on), or return
 * NULL with nothing pushed and fd closed. */
static lsock *new_sock(lua_State *L, dx_loop *loop, int fd, int *err) {
  lsock *s = lua_newuserdatauv(L, sizeof *s, UV_COUNT);
  memset(s, 0, sizeof *s);
  dx_io_init(&s->io, sock_event);
  dx_dirty_init(&s->dirty, sock_dirty_flush);
  s->loop = loop;
  s->closed = 1; /* until registered */
  luaL_setmetatable(L, SOCK_MT);
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
static void sock_close(lsock *s, int abort, int with_engine) {
  if (s->closed) return;
  if (!with_engine) detach_engine(s);
  if (abort) {
    dx_sock_linger0(s->io.fd);
  } else if (!s->werr && !s->handshaking && !s->tls_failed) {
    if (buffered(s) > 0) (s->ssl ? flush_tls : flush_plain)(s);
    if (s->ssl) dx_tls_shutdown(s->ssl);
  }
  detach_engine(s);
  dx_dirty_clear(&s->dirty);
  set_blocked(s, 0);
  if (s->ssl) SSL_free(s->ssl);
  s->ssl = NULL;
  dx_buf_free(&s->out);
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
  lsock *s = to_sock(L, 1);
  sock_close(s, lua_toboolean(L, 2), 1);
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
  /* The engine may have been finalized first: leave its buffer alone. */
  sock_close(to_sock(L, 1), 0, 0);
  return 0;
}

static int sock_tostring(lua_State *L) {
  lsock *s = to_sock(L, 1);
  if (s->closed)
    lua_pushfstring(L, "duplex.socket (closed): %p", (void *)s);
  else
    lua_pushfstring(L, "duplex.socket (fd %d%s): %p", s->io.fd, s->ssl ? ", tls" : "", (void *)s);
  return 1;
}

static int sock_fd(lua_State *L) {
  lsock *s = to_sock(L, 1);
  if (s->closed) return fail(L, "closed");
  lua_pushinteger(L, s->io.fd);
  return 1;
}

static int push_address(lua_State *L, int fd, int peer) {
  dx_addr a;
  int rc = dx_addr_of(fd, peer, &a);
  if (rc < 0) return fail_errno(L, rc);
  char ip[DX_IPSTR_MAX];
  int port;
  dx_addr_text(&a, ip, &port);
  lua_pushstring(L, ip);
  lua_pushinteger(L, port);
  return 2;
}

static int sock_peer(lua_State *L) {
  lsock *s = to_sock(L, 1);
  return s->closed ? fail(L, "closed") : push_address(L, s->io.fd, 1);
}

static int sock_local_address(lua_State *L) {
  lsock *s = to_sock(L, 1);
  return s->closed ? fail(L, "closed") : push_address(L, s->io.fd, 0);
}

static int sock_setnodelay(lua_State *L) {
  lsock *s = to_sock(L, 1);
  if (s->closed) return fail(L, "closed");
  int rc = dx_sock_nodelay(s->io.fd, lua_toboolean(L, 2));
  if (rc < 0) return fail_errno(L, rc);
  lua_pushboolean(L, 1);
  return 1;
}

static int sock_buffered(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)buffered(to_sock(L, 1)));
  return 1;
}

static int sock_write(lua_State *L) {
  lsock *s = to_sock(L, 1);
  size_t n;
  const char *data = luaL_checklstring(L, 2, &n);
  if (s->closed || s->wr_shut) return fail(L, "closed");
  if (s->werr) return fail_errno(L, s->werr);
  if (dx_buf_size(&s->out) > SOCK_MAX_OUTPUT || n > SOCK_MAX_OUTPUT - dx_buf_size(&s->out))
    return fail(L, "output buffer full");
  if (dx_buf_append(&s->out, data, n) < 0) return fail(L, "not enough memory");
  if (n > 0) dx_dirty_mark(s->loop, &s->dirty);
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

static int read_k(lua_State *L, int status, lua_KContext ctx) {
  dx_task *t = (dx_task *)ctx;
  lsock *s = to_sock(L, 1);
  if (status == LUA_YIELD && dx_lua_woken(L, t) == DX_WAKE_TIMEOUT) return fail(L, "timeout");
  if (s->closed) return fail(L, "closed");
  if (s->handshaking) return fail(L, "tls handshake in progress");
  size_t max = (size_t)lua_tointeger(L, 2);
  if (max > s->loop->rbuf_size) max = s->loop->rbuf_size;
  uint32_t want = 0;
  char err[ERR_MAX];
  ssize_t n = raw_read(s, s->loop->rbuf, max, &want, err, sizeof err);
  if (n > 0) {
    lua_pushlstring(L, (const char *)s->loop->rbuf, (size_t)n);
    return 1;
  }
  if (n == 0) return fail(L, "closed");
  if (n == RD_AGAIN) return dx_lua_wait_io(L, t, &s->io, want, 0, read_k);
  return fail(L, err);
}

static int sock_read(lua_State *L) {
  to_sock(L, 1);
  dx_task *t = dx_lua_begin_read(L);
  return read_k(L, LUA_OK, (lua_KContext)t);
}

static void charge_pass(lsock *s) {
  if (s->pass != s->loop->pass) {
    s->pass = s->loop->pass;
    s->pass_events = 0;
    s->pass_bytes = 0;
  }
}

/* The engine's next event, reading as needed. stack: sock, engine, timeout
 * Yields happen only where no fed byte still lies in the loop's shared
 * receive buffer: before asking for an event (what an earlier event left is
 * in the engine's own memory), or once the engine has used up a read. */
static int receive_k(lua_State *L, int status, lua_KContext ctx) {
  dx_task *t = (dx_task *)ctx;
  lsock *s = to_sock(L, 1);
  if (status == LUA_YIELD && dx_lua_woken(L, t) == DX_WAKE_TIMEOUT) return fail(L, "timeout");
  dx_proto *p = dx_live_engine(L, 2);
  if (!p) return fail(L, "closed");
  for (;;) {
    charge_pass(s);
    if (s->pass_events >= PASS_EVENTS) return dx_lua_yield(L, t, receive_k);
    int k = dx_engine_next(L, 2);
    if (k) {
      s->pass_events++;
      return k;
    }
    if (s->closed) return fail(L, "closed");
    if (s->handshaking) return fail(L, "tls handshake in progress");
    if (s->pass_bytes >= PASS_BYTES) return dx_lua_yield(L, t, receive_k);
    uint32_t want = 0;
    char err[ERR_MAX];
    /* no more than the rest of this pass's share */
    size_t room = PASS_BYTES - s->pass_bytes;
    if (room > s->loop->rbuf_size) room = s->loop->rbuf_size;
    ssize_t n = raw_read(s, s->loop->rbuf, room, &want, err, sizeof err);
    if (n == 0) return fail(L, "closed");
    if (n == RD_AGAIN) return dx_lua_wait_io(L, t, &s->io, want, 0, receive_k);
    if (n < 0) return fail(L, err);
    s->pass_bytes += (size_t)n;
    dx_proto_feed(p, s->loop->rbuf, (size_t)n);
  }
}

static int sock_receive(lua_State *L) {
  to_sock(L, 1);
  dx_check_engine(L, 2);
  lua_settop(L, 3);
  dx_task *t = dx_lua_begin(L, 3);
  return receive_k(L, LUA_OK, (lua_KContext)t);
}

static int sock_attach(lua_State *L) {
  lsock *s = to_sock(L, 1);
  if (s->closed) return fail(L, "closed");
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
    p->on_output_ud = s;
    if (dx_proto_pending(p)) dx_dirty_mark(s->loop, &s->dirty);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- flush, drain, shutdown ---- */

/* stack: sock, low water, timeout, shutdown afterwards */
static int drain_k(lua_State *L, int status, lua_KContext ctx) {
  dx_task *t = (dx_task *)ctx;
  lsock *s = to_sock(L, 1);
  size_t low = (size_t)lua_tointeger(L, 2);
  if (status == LUA_YIELD && dx_lua_woken(L, t) == DX_WAKE_TIMEOUT) return fail(L, "timeout");
  if (s->closed) return fail(L, "closed");
  if (s->werr) return fail_errno(L, s->werr);
  if (buffered(s) > low && !s->blocked && !s->handshaking) {
    /* asked to wait for the output: write now rather than at the end of the pass */
    int rc = flush_step(s);
    if (rc < 0) return fail_errno(L, s->werr);
    if (rc == 0) dx_dirty_clear(&s->dirty);
  }
  if (buffered(s) > low) return dx_lua_wait_io(L, t, &s->io, DX_WANT_DRAIN, low, drain_k);
  if (lua_toboolean(L, 4) && !s->wr_shut) {
    if (s->ssl) dx_tls_shutdown(s->ssl);
    if (shutdown(s->io.fd, SHUT_WR) < 0) return fail_errno(L, errno);
    s->wr_shut = 1;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int drain_start(lua_State *L, lua_Integer low, int timeout_idx, int then_shutdown) {
  to_sock(L, 1);
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
  lsock *s = to_sock(L, 1);
  if (!s->closed && buffered(s) > 0 && !s->blocked) {
    flush_step(s);
    if (buffered(s) == 0) dx_dirty_clear(&s->dirty);
  }
  lua_pushinteger(L, s->closed ? 0 : (lua_Integer)buffered(s));
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

/* ---- TLS ---- */

static int tlsctx_gc(lua_State *L) {
  dx_tls_ctx *c = luaL_checkudata(L, 1, TLSCTX_MT);
  dx_tls_ctx_free(c);
  return 0;
}

static const char *opt_string(lua_State *L, int t, const char *key) {
  lua_getfield(L, t, key);
  const char *s = NULL;
  if (!lua_isnil(L, -1)) {
    s = lua_tostring(L, -1);
    if (!s) luaL_error(L, "option %s: string expected", key);
  }
  lua_pop(L, 1); /* the table keeps it alive */
  return s;
}

static int l_tls_context(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  dx_tls_config cfg;
  memset(&cfg, 0, sizeof cfg);
  const char *mode = opt_string(L, 1, "mode");
  if (!mode || strcmp(mode, "client") == 0)
    cfg.server = 0;
  else if (strcmp(mode, "server") == 0)
    cfg.server = 1;
  else
    return luaL_error(L, "tls_context: mode must be \"server\" or \"client\"");
  cfg.cert = opt_string(L, 1, "cert");
  cfg.key = opt_string(L, 1, "key");
  cfg.chain = opt_string(L, 1, "chain");
  cfg.ca = opt_string(L, 1, "ca");
  lua_getfield(L, 1, "verify");
  cfg.verify = lua_isnil(L, -1) ? !cfg.server : lua_toboolean(L, -1);
  lua_pop(L, 1);
  const char *alpn[16];
  lua_getfield(L, 1, "alpn");
  if (lua_isstring(L, -1)) {
    alpn[cfg.nalpn++] = lua_tostring(L, -1);
  } else if (lua_istable(L, -1)) {
    lua_Integer n = luaL_len(L, -1);
    if (n > 16) return luaL_error(L, "tls_context: at most 16 alpn protocols");
    for (lua_Integer i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, i);
      const char *p = lua_tostring(L, -1);
      if (!p) return luaL_error(L, "tls_context: alpn entries must be strings");
      alpn[cfg.nalpn++] = p;
      lua_pop(L, 1); /* still referenced by the alpn table */
    }
  } else if (!lua_isnil(L, -1)) {
    return luaL_error(L, "tls_context: alpn must be a string or a list of strings");
  }
  cfg.alpn = alpn;
  dx_tls_ctx *c = lua_newuserdatauv(L, sizeof *c, 0);
  memset(c, 0, sizeof *c);
  char err[ERR_MAX];
  if (dx_tls_ctx_init(c, &cfg, err, sizeof err) < 0) return fail(L, err);
  luaL_setmetatable(L, TLSCTX_MT);
  return 1;
}

/* stack: sock, ctx, opts, timeout */
static int starttls_k(lua_State *L, int status, lua_KContext ctx) {
  dx_task *t = (dx_task *)ctx;
  lsock *s = to_sock(L, 1);
  if (status == LUA_YIELD && dx_lua_woken(L, t) == DX_WAKE_TIMEOUT) {
    s->tls_failed = 1; /* the handshake cannot be resumed sanely */
    s->handshaking = 0;
    return fail(L, "timeout");
  }
  if (s->closed) return fail(L, "closed");
  char err[ERR_MAX];
  int rc = dx_tls_handshake(s->ssl, err, sizeof err);
  switch (rc) {
  case DX_TLS_DONE:
    s->handshaking = 0;
    if (buffered(s) > 0) dx_dirty_mark(s->loop, &s->dirty);
    lua_pushboolean(L, 1);
    return 1;
  case DX_TLS_WANT_READ: return dx_lua_wait_io(L, t, &s->io, EPOLLIN, 0, starttls_k);
  case DX_TLS_WANT_WRITE: return dx_lua_wait_io(L, t, &s->io, EPOLLOUT, 0, starttls_k);
  default:
    s->tls_failed = 1;
    s->handshaking = 0;
    return fail(L, err);
  }
}

static int sock_starttls(lua_State *L) {
  lsock *s = to_sock(L, 1);
  dx_tls_ctx *c = luaL_checkudata(L, 2, TLSCTX_MT);
  lua_settop(L, 4);
  if (!lua_isnil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
  if (lua_isnil(L, 4) && lua_istable(L, 3)) { /* opts.timeout works too */
    lua_getfield(L, 3, "timeout");
    lua_replace(L, 4);
  }
  dx_task *t = dx_lua_begin(L, 4);
  if (s->closed) return fail(L, "closed");
  if (s->ssl) return fail(L, "tls already started");
  if (buffered(s) > 0) return fail(L, "output pending: flush before starttls");
  const char *servername = lua_istable(L, 3) ? opt_string(L, 3, "servername") : NULL;
  if (servername && !*servername) servername = NULL; /* "" is no name: not "no check" */
  if (!servername && !c->server) {
    lua_getiuservalue(L, 1, UV_HOST); /* the host given to core.connect */
    servername = lua_tostring(L, -1);
    lua_replace(L, 3); /* keep it referenced (replaces opts, read already) */
  }
  if (!c->server && c->verify && !servername)
    return fail(L, "tls: servername needed to verify the certificate");
  char err[ERR_MAX];
  s->ssl = dx_tls_new(c, s->io.fd, servername, err, sizeof err);
  if (!s->ssl) return fail(L, err);
  lua_pushvalue(L, 2);
  lua_setiuservalue(L, 1, UV_TLSCTX);
  s->handshaking = 1;
  return starttls_k(L, LUA_OK, (lua_KContext)t);
}

static int sock_alpn(lua_State *L) {
  lsock *s = to_sock(L, 1);
  size_t n;
  const char *p = s->ssl && !s->handshaking ? dx_tls_alpn(s->ssl, &n) : NULL;
  if (!p) return 0;
  lua_pushlstring(L, p, n);
  return 1;
}

/* ---- name resolution ---- */

/* A getaddrinfo call run by a worker thread. The waiting side (a resolve
 * userdata) owns it once done; if the waiter let go first (timeout, or its
 * state was collected) the job frees itself when it finishes. The waiting
 * task may end first too (its coroutine resumed or closed from outside):
 * then the job wakes nobody. */
typedef struct resolve_job {
  dx_work work;
  dx_task *task; /* task to wake, NULL when it is gone */
  int released;  /* the resolve state let go: free on finishing */
  int finished;
  int n; /* addresses, or -1 with err set */
  int port;
  char host[DX_HOST_MAX + 1];
  char err[ERR_MAX];
  dx_addr addrs[DX_ADDR_MAX];
} resolve_job;

typedef struct lresolve {
  resolve_job *job;
  dx_addr addrs[DX_ADDR_MAX];
  int n, idx;
  int phase; /* connect: 0 resolving, 1 connecting */
  int nodelay;
  int has_bind;
  dx_addr bind;
  char err[ERR_MAX];
} lresolve;

static void resolve_run(dx_work *w) {
  resolve_job *job = dx_container_of(w, resolve_job, work);
  job->n = dx_addr_resolve(job->host, job->port, 0, job->addrs, job->err, sizeof job->err);
}

/* The task ended without the job (dx_task_end). */
static void resolve_forget_task(void *ud) { ((resolve_job *)ud)->task = NULL; }

static void set_task(resolve_job *job, dx_task *t) {
  if (job->task) job->task->detach = NULL, job->task->detach_ud = NULL;
  job->task = t;
  if (t) t->detach = resolve_forget_task, t->detach_ud = job;
}

static void resolve_done(dx_loop *loop, dx_work *w, int canceled) {
  resolve_job *job = dx_container_of(w, resolve_job, work);
  if (job->released) {
    set_task(job, NULL);
    free(job);
    return;
  }
  job->finished = 1;
  if (canceled) {
    job->n = -1;
    snprintf(job->err, sizeof job->err, "name resolution failed: interrupted (fork)");
  }
  dx_task *t = job->task;
  set_task(job, NULL);
  if (t && !loop->closing) dx_task_ready(loop, t, DX_WAKE_IO);
}

static void resolve_release(lresolve *r) {
  resolve_job *job = r->job;
  r->job = NULL;
  if (!job) return;
  set_task(job, NULL);
  if (job->finished)
    free(job);
  else
    job->released = 1;
}

static int resolve_gc(lua_State *L) {
  resolve_release(lua_touserdata(L, 1));
  return 0;
}

/* Push a resolve state for host:port. Numeric hosts are resolved at once
 * (r->n > 0); otherwise a job is queued for task. 0, or -1 with r->err. */
static lresolve *resolve_start(lua_State *L, const char *mt, const char *host, int port, dx_task *t) {
  lresolve *r = lua_newuserdatauv(L, sizeof *r, 0);
  memset(r, 0, sizeof *r);
  luaL_setmetatable(L, mt);
  if (dx_addr_numeric(host, port, &r->addrs[0]) == 0) {
    r->n = 1;
    return r;
  }
  if (strlen(host) > DX_HOST_MAX || !*host) {
    r->n = -1;
    snprintf(r->err, sizeof r->err, "name resolution failed: bad host name");
    return r;
  }
  if (!t) t = dx_lua_begin(L, 0);
  resolve_job *job = calloc(1, sizeof *job);
  if (!job) {
    r->n = -1;
    snprintf(r->err, sizeof r->err, "name resolution failed: not enough memory");
    return r;
  }
  job->work.run = resolve_run;
  job->work.done = resolve_done;
  set_task(job, t);
  job->port = port;
  memcpy(job->host, host, strlen(host) + 1);
  if (dx_work_submit(dx_lua_loop(L), &job->work) < 0) {
    set_task(job, NULL);
    free(job);
    r->n = -1;
    snprintf(r->err, sizeof r->err, "name resolution failed: too many lookups in progress");
    return r;
  }
  r->job = job;
  return r;
}

/* After the job woke the task: take its result. */
static void resolve_collect(lresolve *r) {
  resolve_job *job = r->job;
  r->n = job->n;
  if (job->n > 0)
    memcpy(r->addrs, job->addrs, (size_t)job->n * sizeof job->addrs[0]);
  else
    memcpy(r->err, job->err, sizeof r->err);
  resolve_release(r);
}

static void push_addrs(lua_State *L, const lresolve *r) {
  lua_createtable(L, r->n, 0);
  for (int i = 0; i < r->n; i++) {
    char ip[DX_IPSTR_MAX];
    int port;
    dx_addr_text(&r->addrs[i], ip, &port);
    lua_createtable(L, 0, 3);
    lua_pushstring(L, r->addrs[i].family == AF_INET6 ? "inet6" : "inet");
    lua_setfield(L, -2, "family");
    lua_pushstring(L, ip);
    lua_setfield(L, -2, "addr");
    lua_pushinteger(L, port);
    lua_setfield(L, -2, "port");
    lua_rawseti(L, -2, i + 1);
  }
}

/* stack: host, port, resolve state */
static int getaddrinfo_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  lresolve *r = luaL_checkudata(L, 3, RESOLVE_MT);
  dx_lua_woken(L, (dx_task *)ctx);
  resolve_collect(r);
  if (r->n < 0) return fail(L, r->err);
  push_addrs(L, r);
  return 1;
}

static int l_getaddrinfo(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  int port = lua_isnoneornil(L, 2) ? 0 : check_port(L, 2, "getaddrinfo");
  lua_settop(L, 2);
  lresolve *r = resolve_start(L, RESOLVE_MT, host, port, NULL);
  if (r->n < 0) return fail(L, r->err);
  if (r->n > 0) {
    push_addrs(L, r);
    return 1;
  }
  dx_task *t = r->job->task;
  return dx_lua_wait_work(L, t, getaddrinfo_k);
}

/* ---- connect ---- */

/* stack: opts, timeout, connect state, socket being connected (or nil) */
static int connect_k(lua_State *L, int status, lua_KContext ctx) {
  dx_task *t = (dx_task *)ctx;
  lresolve *r = luaL_checkudata(L, 3, CONNECT_MT);
  dx_loop *loop = dx_lua_loop(L);
  int wake = status == LUA_YIELD ? dx_lua_woken(L, t) : DX_WAKE_NONE;
  lsock *s = luaL_testudata(L, 4, SOCK_MT);
  if (wake == DX_WAKE_TIMEOUT) {
    resolve_release(r);
    if (s) sock_close(s, 1, 0);
    return fail(L, "timed out");
  }
  if (r->phase == 0) {
    if (r->job) {
      if (!r->job->finished) return dx_lua_wait_work(L, t, connect_k);
      resolve_collect(r);
    }
    if (r->n < 0) return fail(L, r->err);
    r->phase = 1;
  } else if (s && !s->closed) {
    /* woken on the connecting socket */
    int rc = dx_sock_connect_result(s->io.fd);
    if (rc == 0) {
      dx_addr peer;
      if (dx_addr_of(s->io.fd, 1, &peer) == 0) goto connected;
      return dx_lua_wait_io(L, t, &s->io, EPOLLOUT, 0, connect_k); /* not yet */
    }
    char buf[128];
    snprintf(r->err, sizeof r->err, "%s", dx_sock_strerror(rc, buf, sizeof buf));
    sock_close(s, 0, 0);
    r->idx++;
  }
  while (r->idx < r->n) {
    int pending;
    int fd = dx_sock_connect(&r->addrs[r->idx], r->has_bind ? &r->bind : NULL, &pending);
    if (fd < 0) {
      char buf[128];
      snprintf(r->err, sizeof r->err, "%s", dx_sock_strerror(fd, buf, sizeof buf));
      r->idx++;
      continue;
    }
    int err;
    s = new_sock(L, loop, fd, &err);
    if (!s) return fail_errno(L, err);
    lua_replace(L, 4);
    if (pending) return dx_lua_wait_io(L, t, &s->io, EPOLLOUT, 0, connect_k);
    goto connected;
  }
  return fail(L, r->err[0] ? r->err : "no address to connect to");
connected:
  if (r->nodelay) dx_sock_nodelay(s->io.fd, 1);
  lua_getfield(L, 1, "host");
  lua_setiuservalue(L, 4, UV_HOST);
  lua_settop(L, 4);
  return 1;
}

static int l_connect(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  const char *host = opt_string(L, 1, "host");
  if (!host) return luaL_error(L, "connect: host required");
  lua_getfield(L, 1, "port");
  int port = check_port(L, -1, "connect");
  lua_pop(L, 1);
  lua_getfield(L, 1, "nodelay");
  int nodelay = lua_isnil(L, -1) || lua_toboolean(L, -1);
  lua_pop(L, 1);
  dx_addr bind_to;
  int has_bind = 0;
  lua_getfield(L, 1, "bind");
  if (!lua_isnil(L, -1)) {
    const char *bhost;
    int bport = 0;
    if (lua_istable(L, -1)) {
      bhost = opt_string(L, -1, "host");
      lua_getfield(L, -1, "port");
      if (!lua_isnil(L, -1)) bport = check_port(L, -1, "connect: bind");
      lua_pop(L, 1);
    } else {
      bhost = lua_tostring(L, -1);
    }
    if (!bhost || dx_addr_numeric(bhost, bport, &bind_to) < 0)
      return luaL_error(L, "connect: bind must be an IP address (or {host=, port=})");
    has_bind = 1;
  }
  lua_pop(L, 1);
  lua_getfield(L, 1, "timeout"); /* stack index 2 */
  dx_task *t = dx_lua_begin(L, 2);
  lresolve *r = resolve_start(L, CONNECT_MT, host, port, t);
  r->nodelay = nodelay;
  r->has_bind = has_bind;
  if (has_bind) r->bind = bind_to;
  lua_pushnil(L);
  return connect_k(L, LUA_OK, (lua_KContext)t);
}

/* ---- listeners ---- */

static llistener *to_listener(lua_State *L, int idx) { return luaL_checkudata(L, idx, LISTENER_MT); }

static void listener_close(llistener *l) {
  if (l->io.fd < 0) return;
  int fd = l->io.fd;
  l->loop->nsockets--;
  dx_io_remove(l->loop, &l->io);
  close(fd);
}

static int l_listen(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  const char *host = opt_string(L, 1, "host");
  if (!host) host = "0.0.0.0";
  lua_getfield(L, 1, "port");
  int port = lua_isnil(L, -1) ? 0 : check_port(L, -1, "listen");
  lua_getfield(L, 1, "backlog");
  lua_Integer backlog = luaL_optinteger(L, -1, 511);
  if (backlog < 1) backlog = 1;
  if (backlog > 65535) backlog = 65535;
  lua_getfield(L, 1, "reuseport");
  int reuseport = lua_toboolean(L, -1);
  lua_getfield(L, 1, "ipv6only");
  int ipv6only = lua_isnil(L, -1) ? -1 : lua_toboolean(L, -1);
  lua_pop(L, 4);
  dx_addr a;
  char err[ERR_MAX];
  /* Listening is set-up work: a name (e.g. "localhost", from /etc/hosts)
   * is resolved in place, and the first address is used. */
  if (dx_addr_numeric(host, port, &a) < 0 && dx_addr_resolve(host, port, 1, &a, err, sizeof err) < 0)
    return fail(L, err);
  dx_loop *loop = dx_lua_loop(L);
  int fd = dx_sock_listen(&a, (int)backlog, reuseport, ipv6only);
  if (fd < 0) return fail_errno(L, fd);
  llistener *l = lua_newuserdatauv(L, sizeof *l, 0);
  memset(l, 0, sizeof *l);
  dx_io_init(&l->io, NULL);
  l->loop = loop;
  l->family = a.family;
  luaL_setmetatable(L, LISTENER_MT);
  int rc = dx_io_add(loop, &l->io, fd, EPOLLIN);
  if (rc < 0) {
    close(fd);
    return fail_errno(L, rc);
  }
  loop->nsockets++;
  return 1;
}

static int accept_k(lua_State *L, int status, lua_KContext ctx) {
  dx_task *t = (dx_task *)ctx;
  llistener *l = to_listener(L, 1);
  if (status == LUA_YIELD && dx_lua_woken(L, t) == DX_WAKE_TIMEOUT) return fail(L, "timeout");
  if (l->io.fd < 0) return fail(L, "closed");
  if (l->pass != l->loop->pass) {
    l->pass = l->loop->pass;
    l->burst = 0;
  }
  /* a full accept queue must not starve the connections already accepted */
  if (l->burst >= ACCEPT_BURST) return dx_lua_yield(L, t, accept_k);
  int fd = dx_sock_accept(l->io.fd);
  if (fd == -EAGAIN || fd == -EWOULDBLOCK) return dx_lua_wait_io(L, t, &l->io, EPOLLIN, 0, accept_k);
  if (fd < 0) return fail_errno(L, fd);
  l->burst++;
  int err;
  lsock *s = new_sock(L, l->loop, fd, &err);
  if (!s) return fail_errno(L, err);
  dx_sock_nodelay(fd, 1);
  return 1;
}

static int listener_accept(lua_State *L) {
  to_listener(L, 1);
  lua_settop(L, 2);
  dx_task *t = dx_lua_begin(L, 2);
  return accept_k(L, LUA_OK, (lua_KContext)t);
}

/* listener:drain() -> the connections waiting in the accept queue, accepted
 * now without waiting. A listener that closes with connections in its
 * queue resets them: a server that stops accepting (a reload, a shutdown)
 * takes them first, so that only a connection arriving in the instant
 * between the last accept and the close can be lost. */
static int listener_drain(lua_State *L) {
  llistener *l = to_listener(L, 1);
  lua_newtable(L);
  if (l->io.fd < 0) return 1;
  for (lua_Integer n = 1;; n++) {
    int fd = dx_sock_accept(l->io.fd);
    if (fd < 0) break;
    int err;
    if (!new_sock(L, l->loop, fd, &err)) continue;
    dx_sock_nodelay(fd, 1);
    lua_rawseti(L, -2, n);
  }
  return 1;
}

static int listener_address(lua_State *L) {
  llistener *l = to_listener(L, 1);
  return l->io.fd < 0 ? fail(L, "closed") : push_address(L, l->io.fd, 0);
}

static int listener_fd(lua_State *L) {
  llistener *l = to_listener(L, 1);
  if (l->io.fd < 0) return fail(L, "closed");
  lua_pushinteger(L, l->io.fd);
  return 1;
}

static int listener_close_m(lua_State *L) {
  listener_close(to_listener(L, 1));
  lua_pushboolean(L, 1);
  return 1;
}

static int listener_gc(lua_State *L) {
  listener_close(to_listener(L, 1));
  return 0;
}

static int listener_tostring(lua_State *L) {
  llistener *l = to_listener(L, 1);
  lua_pushfstring(L, "duplex.listener (fd %d): %p", l->io.fd, (void *)l);
  return 1;
}

/* ---- registration ---- */

static void new_class(lua_State *L, const char *name, const luaL_Reg *methods, const luaL_Reg *meta) {
  luaL_newmetatable(L, name);
  if (meta) luaL_setfuncs(L, meta, 0);
  if (methods) {
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
}

void dx_open_socket(lua_State *L) {
  static const luaL_Reg sock_methods[] = {
      {"read", sock_read},         {"write", sock_write},       {"flush", sock_flush},
      {"try_flush", sock_try_flush},
      {"drain", sock_drain},       {"buffered", sock_buffered}, {"shutdown", sock_shutdown},
      {"close", sock_close_m},     {"peer", sock_peer},         {"local_address", sock_local_address},
      {"fd", sock_fd},             {"setnodelay", sock_setnodelay}, {"attach", sock_attach},
      {"receive", sock_receive},   {"starttls", sock_starttls}, {"alpn", sock_alpn},
      {NULL, NULL}};
  static const luaL_Reg sock_meta[] = {
      {"__gc", sock_gc}, {"__close", sock_close_tbc}, {"__tostring", sock_tostring}, {NULL, NULL}};
  static const luaL_Reg listener_methods[] = {{"accept", listener_accept}, {"drain", listener_drain},
                                              {"address", listener_address},
                                              {"close", listener_close_m}, {"fd", listener_fd},
                                              {NULL, NULL}};
  static const luaL_Reg listener_meta[] = {
      {"__gc", listener_gc}, {"__close", listener_close_m}, {"__tostring", listener_tostring}, {NULL, NULL}};
  static const luaL_Reg tls_meta[] = {{"__gc", tlsctx_gc}, {NULL, NULL}};
  static const luaL_Reg resolve_meta[] = {{"__gc", resolve_gc}, {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"listen", l_listen},
                                   {"connect", l_connect},
                                   {"getaddrinfo", l_getaddrinfo},
                                   {"tls_context", l_tls_context},
                                   {NULL, NULL}};
  new_class(L, SOCK_MT, sock_methods, sock_meta);
  luaL_getmetatable(L, SOCK_MT);
  dx_register_mt(L, &SOCK_KEY);
  lua_pop(L, 1);
  new_class(L, LISTENER_MT, listener_methods, listener_meta);
  new_class(L, TLSCTX_MT, NULL, tls_meta);
  new_class(L, RESOLVE_MT, NULL, resolve_meta);
  new_class(L, CONNECT_MT, NULL, resolve_meta);
  dx_setfuncs(L, funcs);
}
