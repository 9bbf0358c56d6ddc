/*
 * File descriptors the program did not open itself, on the event loop:
 * core.reader(fd) reads one (stdin, typically) without blocking the loop,
 * and core.isatty(fd) tells a terminal from a pipe or a file.
 *
 * The reader never changes the fd's flags. O_NONBLOCK belongs to the open
 * file description, which a terminal's stdin shares with stdout and with
 * the shell: setting it would make their writes fail with EAGAIN, and
 * survive us if we died. Instead, a zero-timeout poll() says whether a read
 * would wait before it is made. Edge-triggered epoll wakes the reader; the
 * poll makes a read that follows an edge it missed (data that arrived while
 * nobody waited) find the data anyway.
 *
 * epoll refuses regular files and some devices (/dev/null) with EPERM:
 * their reads never wait, so they are read directly.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <unistd.h>

#include "l_socket.h"

#define READER_MT "duplex.reader"

typedef struct lreader {
  dx_io io;      /* registered when epoll can watch the fd */
  dx_loop *loop;
  int fd;        /* our duplicate of the caller's fd; -1 once closed */
  int polled;
} lreader;

static lreader *to_reader(lua_State *L, int idx) { return luaL_checkudata(L, idx, READER_MT); }

static void reader_close(lreader *r) {
  if (r->fd < 0) return;
  int fd = r->fd;
  r->fd = -1;
  if (r->polled) dx_io_remove(r->loop, &r->io); /* waiters get "closed" */
  close(fd);
}

/* Would a read return at once (data, end of input or an error)? */
static int readable(int fd) {
  struct pollfd p = {.fd = fd, .events = POLLIN};
  int n;
  do n = poll(&p, 1, 0);
  while (n < 0 && errno == EINTR);
  return n != 0; /* on a poll failure, let read() say what is wrong */
}

/* stack: reader, max, timeout */
static int read_k(lua_State *L, int status, lua_KContext ctx) {
  dx_task *t = (dx_task *)ctx;
  lreader *r = to_reader(L, 1);
  if (status == LUA_YIELD && dx_lua_woken(L, t) == DX_WAKE_TIMEOUT) return dx_lua_fail(L, "timeout");
  if (r->fd < 0) return dx_lua_fail(L, "closed");
  if (r->polled && !readable(r->fd)) return dx_lua_wait_io(L, t, &r->io, EPOLLIN, 0, read_k);
  size_t max = (size_t)lua_tointeger(L, 2);
  if (max > r->loop->rbuf_size) max = r->loop->rbuf_size;
  ssize_t n;
  dx_sock_rbuf_claim(r->loop);
  do n = read(r->fd, r->loop->rbuf, max);
  while (n < 0 && errno == EINTR);
  if (n > 0) {
    lua_pushlstring(L, (const char *)r->loop->rbuf, (size_t)n);
    return 1;
  }
  if (n == 0) return dx_lua_fail(L, "closed");
  /* someone else made the description non-blocking, and another reader
   * took the data between our poll and our read */
  if ((errno == EAGAIN || errno == EWOULDBLOCK) && r->polled)
    return dx_lua_wait_io(L, t, &r->io, EPOLLIN, 0, read_k);
  return dx_lua_fail_errno(L, errno);
}

/* reader:read([max [, timeout]]) -> bytes | nil, "timeout" | nil, "closed"
 * (end of input, or the reader was closed) | nil, err */
static int reader_read(lua_State *L) {
  to_reader(L, 1);
  dx_task *t = dx_lua_begin_read(L);
  return read_k(L, LUA_OK, (lua_KContext)t);
}

static int reader_close_m(lua_State *L) {
  reader_close(to_reader(L, 1));
  lua_pushboolean(L, 1);
  return 1;
}

static int reader_gc(lua_State *L) {
  reader_close(to_reader(L, 1));
  return 0;
}

static int reader_tostring(lua_State *L) {
  lreader *r = to_reader(L, 1);
  if (r->fd < 0)
    lua_pushfstring(L, "duplex.reader (closed): %p", (void *)r);
  else
    lua_pushfstring(L, "duplex.reader (fd %d%s): %p", r->fd, r->polled ? "" : ", not pollable", (void *)r);
  return 1;
}

/* core.reader(fd) -> reader | nil, err. The reader reads a duplicate of
 * fd: closing it leaves fd open. */
static int l_reader(lua_State *L) {
  int fd = (int)dx_check_range(L, 1, 0, INT_MAX);
  dx_loop *loop = dx_lua_loop(L);
  int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) return dx_lua_fail_errno(L, errno);
  lreader *r = lua_newuserdatauv(L, sizeof *r, 0);
  dx_io_init(&r->io, NULL);
  r->loop = loop;
  r->fd = own;
  r->polled = 0;
  luaL_setmetatable(L, READER_MT);
  int rc = dx_io_add(loop, &r->io, own, EPOLLIN | EPOLLRDHUP);
  if (rc == 0) {
    r->polled = 1;
  } else if (rc != -EPERM) {
    r->fd = -1;
    close(own);
    return dx_lua_fail_errno(L, rc);
  }
  return 1;
}

static int l_isatty(lua_State *L) {
  int fd = (int)dx_check_range(L, 1, 0, INT_MAX);
  lua_pushboolean(L, isatty(fd));
  return 1;
}

void dx_open_fd(lua_State *L) {
  static const luaL_Reg methods[] = {{"read", reader_read}, {"close", reader_close_m}, {NULL, NULL}};
  static const luaL_Reg meta[] = {
      {"__gc", reader_gc}, {"__close", reader_close_m}, {"__tostring", reader_tostring}, {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"reader", l_reader}, {"isatty", l_isatty}, {NULL, NULL}};
  luaL_newmetatable(L, READER_MT);
  luaL_setfuncs(L, meta, 0);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  dx_setfuncs(L, funcs);
}
