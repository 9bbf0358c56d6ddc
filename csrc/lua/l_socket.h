/*
 * The socket object of the duplex.core binding, shared by the files of its
 * socket layer, one concern each: l_socket.c (the object: output, input,
 * flushing, the glue to an engine), l_tls.c (contexts and starttls),
 * l_connect.c (name resolution and connect), l_listen.c (listeners).
 */
#ifndef DX_L_SOCKET_H
#define DX_L_SOCKET_H

#include "dx_sock.h"
#include "dx_tls.h"
#include "l_core.h" /* before dx_loop.h: lua.h enables its Lua part */
#include "dx_loop.h"

#define DX_SOCK_MT "duplex.socket"
#define DX_ERR_MAX 256

/* uservalues of a socket: an accepted one has the first two (UV_SERVER),
 * a connected one all three */
enum { UV_ENGINE = 1, UV_TLSCTX, UV_HOST, UV_SERVER = UV_TLSCTX, UV_COUNT = UV_HOST };

typedef struct lwatch lwatch;

typedef struct lsock {
  dx_io io;
  dx_dirty dirty;
  dx_loop *loop;
  dx_buf *out;      /* the socket's own bytes not written yet, or NULL (own_buf) */
  dx_proto *engine; /* attached engine (kept alive by UV_ENGINE) */
  SSL *ssl;
  uint32_t flush_want; /* readiness a blocked flush waits for */
  int werr;            /* sticky write error (errno) */
  /* Flags as bytes: one socket per idle connection. */
  uint8_t closed, wr_shut;
  uint8_t blocked;     /* the kernel (or TLS) would not take more output */
  uint8_t tls_wsrc;    /* the buffer an SSL_write must be retried with: 1 own, 2 engine */
  uint8_t handshaking; /* output waits until the TLS handshake is done */
  uint8_t tls_failed;  /* fatal TLS error: no more TLS calls */
  /* A short read emptied the kernel's receive buffer: the next read would
   * only say EAGAIN, so wait for the next EPOLLIN edge instead of asking
   * (one system call less per message in a request/response exchange). */
  uint8_t rd_empty;
  /* The peer's FIN (or an error) was seen with some data: the data and the
   * end can be reported by one edge, so after it every read really reads. */
  uint8_t rd_hup;
  /* The last pump's read waits for EPOLLOUT (TLS writing first), not
   * EPOLLIN: the event that makes a watched socket worth pumping again. */
  uint8_t pump_out;
  /* A pump found more than its high water queued: it reads no more input
   * until the output drains to pump_low (then the watcher is told), so a
   * peer that sends without reading is held back by TCP, not by memory. */
  uint8_t pump_full;
  uint32_t pump_low;
  /* receive's share of the current loop pass (see PASS_EVENTS): the pass
   * it was counted in and what it has taken. The pass's low bits: one that
   * matches again 2^32 passes later can only end a read one pass early. */
  uint32_t pass;
  uint32_t pass_events, pass_bytes;
  /* sock:clock (l_socket.c): a loop timer at the engine's next due time
   * (dx_timing.h), and the registry reference of the owner whose
   * _timeout(what) it calls when the engine says the connection is over;
   * 0 when the socket keeps no clock. */
  int clock_owner;
  dx_timer clock;
  /* sock:watch (l_watch.c): the watcher told of this socket's input, its
   * place in the watcher's list of sockets to pump and of members */
  lwatch *watch;
  dx_link ready, member;
} lsock;

/* The socket at idx (raises a Lua error otherwise). */
lsock *dx_sock_check(lua_State *L, int idx);
/* Push a socket for a connected fd (which it owns from now on) with nuv
 * uservalues (UV_SERVER or UV_COUNT), or return NULL with nothing pushed,
 * fd closed and *err set. */
lsock *dx_sock_push(lua_State *L, dx_loop *loop, int fd, int nuv, int *err);
/* Close now. Orderly: write what the kernel takes at once and send TLS
 * close_notify, then FIN; output that does not fit is dropped (flush first
 * to be sure). Abortive: RST. Waiters get "closed". */
void dx_sock_close(lsock *s, int abort, int with_engine);
/* Bytes queued on the socket, its own and its engine's. */
size_t dx_sock_buffered(const lsock *s);
/* The socket that writes engine p's output (sock:attach), or NULL: p is
 * detached, or a host's stream writes it. */
lsock *dx_sock_writing(const dx_proto *p);

/* One try of sock:receive for the socket at stack index 1 and its engine
 * at 2 (both checked), a timeout at 3: the event's values, or fail and why,
 * pushed (their count returned); or, when it has to wait, the yield (the
 * task's continuation k calls this again with the status it resumes with).
 * What receive and the step of ws:messages() (l_conn.c) share. */
int dx_sock_receive_step(lua_State *L, int status, dx_task *t, lua_KFunction k);

/* Whether receive has used up s's share of this loop pass (l_socket.c). */
int dx_sock_spent(lsock *s);

/* sock:watch(watcher) (l_watch.c); what the socket tells its watcher: it
 * has input to look at, it closes. */
int dx_sock_watch(lua_State *L);
void dx_watch_queue(lsock *s);
void dx_watch_leave(lsock *s);

/* sock:starttls(ctx, opts, timeout), sock:alpn() (l_tls.c) */
int dx_sock_starttls(lua_State *L);
int dx_sock_alpn(lua_State *L);

/* Expected failures: push fail (nil) and a message; returns 2. */
int dx_lua_fail(lua_State *L, const char *msg);
int dx_lua_fail_errno(lua_State *L, int err);
/* Push the local (peer 0) or remote address of fd and its port: 2 values,
 * or fail and a message. */
int dx_lua_push_address(lua_State *L, int fd, int peer);
/* Push a's IP text and port: 2 values. */
int dx_lua_push_addr(lua_State *L, const dx_addr *a);
/* Stack value idx as a port 0..65535 (raises an error naming `what`). */
int dx_lua_check_port(lua_State *L, int idx, const char *what);
/* Field key of the options table at t: a string, or NULL when nil (the
 * table keeps it alive). */
const char *dx_lua_opt_string(lua_State *L, int t, const char *key);
/* A metatable called name, with meta's metamethods and methods as __index. */
void dx_lua_new_class(lua_State *L, const char *name, const luaL_Reg *methods, const luaL_Reg *meta);
/* sock:pump's work, its arguments checked: stack sock, engine, high, low,
 * on_message (deliver: not nil), ws. */
int dx_sock_pump(lua_State *L, lsock *s, lua_Integer high, uint32_t low, int deliver);
/* Before anything reads into the loop's shared receive buffer: the engine
 * whose unparsed input lies there (a pump's, while on_message runs) keeps
 * it in its own memory first. */
void dx_sock_rbuf_claim(dx_loop *loop);

#endif
