/*
 * core.listen: listening TCP sockets on the loop. accept hands out socket
 * objects (l_socket.c), at most ACCEPT_BURST per loop pass so that a storm
 * of new connections does not keep the open ones waiting.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "l_socket.h"

#define LISTENER_MT "duplex.listener"
#define ACCEPT_BURST 64 /* accepts in one loop pass before letting others run */

typedef struct llistener {
  dx_io io;
  dx_loop *loop;
  uint64_t pass; /* loop pass of the last accept */
  int burst;     /* accepts in that pass */
  int family;
} llistener;

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
  const char *host = dx_lua_opt_string(L, 1, "host");
  if (!host) host = "0.0.0.0";
  lua_getfield(L, 1, "port");
  int port = lua_isnil(L, -1) ? 0 : dx_lua_check_port(L, -1, "listen");
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
  char err[DX_ERR_MAX];
  /* Listening is set-up work: a name (e.g. "localhost", from /etc/hosts)
   * is resolved in place, and the first address is used. */
  if (dx_addr_numeric(host, port, &a) < 0 && dx_addr_resolve(host, port, 1, &a, err, sizeof err) < 0)
    return dx_lua_fail(L, err);
  dx_loop *loop = dx_lua_loop(L);
  int fd = dx_sock_listen(&a, (int)backlog, reuseport, ipv6only);
  if (fd < 0) return dx_lua_fail_errno(L, fd);
  llistener *l = lua_newuserdatauv(L, sizeof *l, 0);
  memset(l, 0, sizeof *l);
  dx_io_init(&l->io, NULL);
  l->loop = loop;
  l->family = a.family;
  luaL_setmetatable(L, LISTENER_MT);
  int rc = dx_io_add(loop, &l->io, fd, EPOLLIN);
  if (rc < 0) {
    close(fd);
    return dx_lua_fail_errno(L, rc);
  }
  loop->nsockets++;
  return 1;
}

static int accept_k(lua_State *L, int status, lua_KContext ctx) {
  dx_task *t = (dx_task *)ctx;
  llistener *l = to_listener(L, 1);
  if (status == LUA_YIELD && dx_lua_woken(L, t) == DX_WAKE_TIMEOUT) return dx_lua_fail(L, "timeout");
  if (l->io.fd < 0) return dx_lua_fail(L, "closed");
  if (l->pass != l->loop->pass) {
    l->pass = l->loop->pass;
    l->burst = 0;
  }
  /* a full accept queue must not starve the connections already accepted */
  if (l->burst >= ACCEPT_BURST) return dx_lua_yield(L, t, accept_k);
  dx_addr peer;
  int fd = dx_sock_accept(l->io.fd, &peer);
  if (fd == -EAGAIN || fd == -EWOULDBLOCK) return dx_lua_wait_io(L, t, &l->io, EPOLLIN, 0, accept_k);
  if (fd < 0) return dx_lua_fail_errno(L, fd);
  l->burst++;
  int err;
  lsock *s = dx_sock_push(L, l->loop, fd, UV_SERVER, &err);
  if (!s) return dx_lua_fail_errno(L, err);
  /* TCP_NODELAY comes from the listener (dx_sock_listen) */
  return 1 + dx_lua_push_addr(L, &peer);
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
    int fd = dx_sock_accept(l->io.fd, NULL);
    if (fd < 0) break;
    int err;
    if (!dx_sock_push(L, l->loop, fd, UV_SERVER, &err)) continue;
    lua_rawseti(L, -2, n);
  }
  return 1;
}

static int listener_address(lua_State *L) {
  llistener *l = to_listener(L, 1);
  return l->io.fd < 0 ? dx_lua_fail(L, "closed") : dx_lua_push_address(L, l->io.fd, 0);
}

static int listener_fd(lua_State *L) {
  llistener *l = to_listener(L, 1);
  if (l->io.fd < 0) return dx_lua_fail(L, "closed");
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

void dx_open_listen(lua_State *L) {
  static const luaL_Reg methods[] = {{"accept", listener_accept}, {"drain", listener_drain},
                                     {"address", listener_address},
                                     {"close", listener_close_m}, {"fd", listener_fd},
                                     {NULL, NULL}};
  static const luaL_Reg meta[] = {
      {"__gc", listener_gc}, {"__close", listener_close_m}, {"__tostring", listener_tostring}, {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"listen", l_listen}, {NULL, NULL}};
  dx_lua_new_class(L, LISTENER_MT, methods, meta);
  dx_setfuncs(L, funcs);
}
