/*
 * TLS for the socket object: contexts (core.tls_context) and the handshake
 * on a connected socket (sock:starttls), driven by the loop; the records
 * themselves are written by l_socket.c's flush.
 */
#include <string.h>

#include "l_socket.h"

#define TLSCTX_MT "duplex.tls_context"

static int tlsctx_gc(lua_State *L) {
  dx_tls_ctx *c = luaL_checkudata(L, 1, TLSCTX_MT);
  dx_tls_ctx_free(c);
  return 0;
}

static int l_tls_context(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  dx_tls_config cfg;
  memset(&cfg, 0, sizeof cfg);
  const char *mode = dx_lua_opt_string(L, 1, "mode");
  if (!mode || strcmp(mode, "client") == 0)
    cfg.server = 0;
  else if (strcmp(mode, "server") == 0)
    cfg.server = 1;
  else
    return luaL_error(L, "tls_context: mode must be \"server\" or \"client\"");
  cfg.cert = dx_lua_opt_string(L, 1, "cert");
  cfg.key = dx_lua_opt_string(L, 1, "key");
  cfg.chain = dx_lua_opt_string(L, 1, "chain");
  cfg.ca = dx_lua_opt_string(L, 1, "ca");
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
  char err[DX_ERR_MAX];
  if (dx_tls_ctx_init(c, &cfg, err, sizeof err) < 0) return dx_lua_fail(L, err);
  luaL_setmetatable(L, TLSCTX_MT);
  return 1;
}

/* stack: sock, ctx, opts, timeout */
static int starttls_k(lua_State *L, int status, lua_KContext ctx) {
  dx_task *t = (dx_task *)ctx;
  lsock *s = dx_sock_check(L, 1);
  if (status == LUA_YIELD && dx_lua_woken(L, t) == DX_WAKE_TIMEOUT) {
    s->tls_failed = 1; /* the handshake cannot be resumed sanely */
    s->handshaking = 0;
    return dx_lua_fail(L, "timeout");
  }
  if (s->closed) return dx_lua_fail(L, "closed");
  char err[DX_ERR_MAX];
  int rc = dx_tls_handshake(s->ssl, err, sizeof err);
  switch (rc) {
  case DX_TLS_DONE:
    s->handshaking = 0;
    if (dx_sock_buffered(s) > 0) dx_dirty_mark(s->loop, &s->dirty);
    lua_pushboolean(L, 1);
    return 1;
  case DX_TLS_WANT_READ: return dx_lua_wait_io(L, t, &s->io, EPOLLIN, 0, starttls_k);
  case DX_TLS_WANT_WRITE: return dx_lua_wait_io(L, t, &s->io, EPOLLOUT, 0, starttls_k);
  default:
    s->tls_failed = 1;
    s->handshaking = 0;
    return dx_lua_fail(L, err);
  }
}

int dx_sock_starttls(lua_State *L) {
  lsock *s = dx_sock_check(L, 1);
  dx_tls_ctx *c = luaL_checkudata(L, 2, TLSCTX_MT);
  lua_settop(L, 4);
  if (!lua_isnil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
  if (lua_isnil(L, 4) && lua_istable(L, 3)) { /* opts.timeout works too */
    lua_getfield(L, 3, "timeout");
    lua_replace(L, 4);
  }
  dx_task *t = dx_lua_begin(L, 4);
  if (s->closed) return dx_lua_fail(L, "closed");
  if (s->ssl) return dx_lua_fail(L, "tls already started");
  if (dx_sock_buffered(s) > 0) return dx_lua_fail(L, "output pending: flush before starttls");
  const char *servername = lua_istable(L, 3) ? dx_lua_opt_string(L, 3, "servername") : NULL;
  if (servername && !*servername) servername = NULL; /* "" is no name: not "no check" */
  if (!servername && !c->server) {
    lua_getiuservalue(L, 1, UV_HOST); /* the host given to core.connect */
    servername = lua_tostring(L, -1);
    lua_replace(L, 3); /* keep it referenced (replaces opts, read already) */
  }
  if (!c->server && c->verify && !servername)
    return dx_lua_fail(L, "tls: servername needed to verify the certificate");
  char err[DX_ERR_MAX];
  s->ssl = dx_tls_new(c, s->io.fd, servername, err, sizeof err);
  if (!s->ssl) return dx_lua_fail(L, err);
  lua_pushvalue(L, 2);
  lua_setiuservalue(L, 1, UV_TLSCTX);
  s->handshaking = 1;
  return starttls_k(L, LUA_OK, (lua_KContext)t);
}

int dx_sock_alpn(lua_State *L) {
  lsock *s = dx_sock_check(L, 1);
  size_t n;
  const char *p = s->ssl && !s->handshaking ? dx_tls_alpn(s->ssl, &n) : NULL;
  if (!p) return 0;
  lua_pushlstring(L, p, n);
  return 1;
}

void dx_open_tls(lua_State *L) {
  static const luaL_Reg meta[] = {{"__gc", tlsctx_gc}, {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"tls_context", l_tls_context}, {NULL, NULL}};
  dx_lua_new_class(L, TLSCTX_MT, NULL, meta);
  dx_setfuncs(L, funcs);
}
