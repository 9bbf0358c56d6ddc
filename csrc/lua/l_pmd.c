/*
 * permessage-deflate for Lua: negotiation (offer, accept, check a response),
 * attaching a codec to an engine, and a bare codec object for tests and for
 * compressing outside an engine. The rules themselves live in dx_pmd.c; this
 * file only moves values between Lua tables and its structs.
 *
 * An extension element is the handshake parser's table
 *   { name = "permessage-deflate", params = { k = v | true },
 *     params_list = { { k, v }, ... } }
 * where params_list keeps repeated parameters (used when present).
 */
#include <string.h>
#include <strings.h>

#include "l_core.h"

#define DX_PMD_CODEC_MT "duplex.pmd_codec"

static const char *const role_names[] = {"server", "client", NULL};

/* --- Lua tables to structs --------------------------------------------------- */

/* Field key of table t as window bits 8..15, or def when nil. */
static int opt_bits(lua_State *L, int t, const char *key, int def) {
  return (int)dx_opt_integer(L, t, key, def, 8, 15);
}

/* Agreed parameters (or a server policy, which has the same fields) from
 * the optional table at arg. */
static void check_params(lua_State *L, int arg, dx_pmd_params *p) {
  memset(p, 0, sizeof *p);
  p->server_max_window_bits = p->client_max_window_bits = 15;
  if (lua_isnoneornil(L, arg)) return;
  luaL_checktype(L, arg, LUA_TTABLE);
  p->server_no_context_takeover = dx_opt_flag(L, arg, "server_no_context_takeover", 0);
  p->client_no_context_takeover = dx_opt_flag(L, arg, "client_no_context_takeover", 0);
  p->server_max_window_bits = opt_bits(L, arg, "server_max_window_bits", 15);
  p->client_max_window_bits = opt_bits(L, arg, "client_max_window_bits", 15);
}

static void check_config(lua_State *L, int arg, dx_pmd_config *c) {
  c->mem_level = 5;
  c->compress_level = 6;
  if (lua_isnoneornil(L, arg)) return;
  luaL_checktype(L, arg, LUA_TTABLE);
  c->mem_level = (int)dx_opt_integer(L, arg, "mem_level", 5, 1, 9);
  c->compress_level = (int)dx_opt_integer(L, arg, "compress_level", 6, 0, 9);
}

/* Our own offer, as given to pmd_offer (also needed to check the answer). */
static void check_offer(lua_State *L, int arg, dx_pmd_offer *o) {
  dx_pmd_offer_init(o);
  if (lua_isnoneornil(L, arg)) return;
  luaL_checktype(L, arg, LUA_TTABLE);
  o->server_no_context_takeover = dx_opt_flag(L, arg, "server_no_context_takeover", 0);
  o->client_no_context_takeover = dx_opt_flag(L, arg, "client_no_context_takeover", 0);
  o->server_max_window_bits = opt_bits(L, arg, "server_max_window_bits", DX_PMD_ABSENT);
  if (lua_getfield(L, arg, "client_max_window_bits") == LUA_TBOOLEAN) {
    o->client_max_window_bits = lua_toboolean(L, -1) ? DX_PMD_NOVALUE : DX_PMD_ABSENT;
    lua_pop(L, 1);
  } else {
    lua_pop(L, 1);
    o->client_max_window_bits = opt_bits(L, arg, "client_max_window_bits", DX_PMD_ABSENT);
  }
}

/* --- extension elements -------------------------------------------------------- */

static int is_pmd(lua_State *L, int ext) {
  if (!lua_istable(L, ext)) return 0;
  lua_getfield(L, ext, "name");
  size_t n;
  const char *name = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &n) : NULL;
  int yes = name && n == 18 && strncasecmp(name, "permessage-deflate", 18) == 0;
  lua_pop(L, 1);
  return yes;
}

/* Add the parameter whose name and value are on the stack top (value may
 * be nil or true: no value). Pops both. */
static const char *add_param(lua_State *L, dx_pmd_offer *o) {
  const char *err = NULL;
  size_t nlen = 0, vlen = 0;
  const char *value = NULL;
  int has_value = 0;
  const char *name = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &nlen) : NULL;
  int vt = lua_type(L, -1);
  if (vt == LUA_TSTRING || vt == LUA_TNUMBER) {
    value = lua_tolstring(L, -1, &vlen); /* the value slot, not a key: safe */
    has_value = 1;
  } else if (!(vt == LUA_TNIL || (vt == LUA_TBOOLEAN && lua_toboolean(L, -1)))) {
    err = "bad parameter value";
  }
  if (!name) err = "bad parameter name";
  if (!err) err = dx_pmd_offer_add(o, name, nlen, value, vlen, has_value);
  lua_pop(L, 2);
  return err;
}

/* Parameters of the extension element at ext. Returns NULL or why the
 * element is invalid. */
static const char *read_element(lua_State *L, int ext, dx_pmd_offer *o) {
  const char *err = NULL;
  int top = lua_gettop(L);
  dx_pmd_offer_init(o);
  if (lua_getfield(L, ext, "params_list") == LUA_TTABLE) {
    lua_Integer n = luaL_len(L, -1);
    for (lua_Integer i = 1; i <= n && !err; i++) {
      if (lua_geti(L, top + 1, i) != LUA_TTABLE) {
        err = "bad parameter";
        break;
      }
      lua_geti(L, -1, 1);
      lua_geti(L, -2, 2);
      err = add_param(L, o);
      lua_pop(L, 1);
    }
  } else if (lua_getfield(L, ext, "params") == LUA_TTABLE) {
    lua_pushnil(L);
    while (!err && lua_next(L, -2)) {
      lua_pushvalue(L, -2); /* keep the key for lua_next */
      lua_insert(L, -2);
      err = add_param(L, o);
    }
  }
  lua_settop(L, top);
  return err;
}

static void push_params(lua_State *L, const dx_pmd_params *p) {
  lua_createtable(L, 0, 4);
  lua_pushboolean(L, p->server_no_context_takeover);
  lua_setfield(L, -2, "server_no_context_takeover");
  lua_pushboolean(L, p->client_no_context_takeover);
  lua_setfield(L, -2, "client_no_context_takeover");
  lua_pushinteger(L, p->server_max_window_bits);
  lua_setfield(L, -2, "server_max_window_bits");
  lua_pushinteger(L, p->client_max_window_bits);
  lua_setfield(L, -2, "client_max_window_bits");
}

static void push_header(lua_State *L, const dx_pmd_offer *o) {
  char buf[DX_PMD_HEADER_MAX];
  size_t n = dx_pmd_format(o, buf);
  lua_pushlstring(L, buf, n);
}

/* --- negotiation ---------------------------------------------------------------- */

/* core.pmd_offer{ client_max_window_bits = true|8..15, server_max_window_bits = 8..15,
 *                 client_no_context_takeover = bool, server_no_context_takeover = bool }
 * -> the Sec-WebSocket-Extensions value a client sends. */
static int l_pmd_offer(lua_State *L) {
  dx_pmd_offer o;
  check_offer(L, 1, &o);
  push_header(L, &o);
  return 1;
}

/* core.pmd_accept(extensions, policy) -> response, params | nil, why.
 * The first acceptable offer wins; invalid ones are declined (RFC 7692
 * section 7.1) and the next is tried. */
static int l_pmd_accept(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  dx_pmd_params policy;
  check_params(L, 2, &policy);
  const char *why = "no permessage-deflate offer";
  lua_Integer n = luaL_len(L, 1);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_geti(L, 1, i);
    int ext = lua_gettop(L);
    if (is_pmd(L, ext)) {
      dx_pmd_offer offer, response;
      dx_pmd_params agreed;
      const char *err = read_element(L, ext, &offer);
      if (err) {
        why = err;
      } else if (dx_pmd_accept(&offer, &policy, &response, &agreed) == 0) {
        push_header(L, &response);
        push_params(L, &agreed);
        return 2;
      }
    }
    lua_pop(L, 1);
  }
  lua_pushnil(L);
  lua_pushstring(L, why);
  return 2;
}

/* core.pmd_check_response(extensions, offer) -> params | false (not
 * accepted: no compression) | nil, why (the handshake must fail). */
static int l_pmd_check_response(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  dx_pmd_offer offer, response;
  int offered = !lua_isnoneornil(L, 2);
  check_offer(L, 2, &offer);
  int found = 0;
  lua_Integer n = luaL_len(L, 1);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_geti(L, 1, i);
    if (is_pmd(L, -1)) {
      if (found) {
        lua_pushnil(L);
        lua_pushliteral(L, "permessage-deflate accepted twice");
        return 2;
      }
      found = lua_gettop(L);
    } else {
      lua_pop(L, 1);
    }
  }
  if (!found) {
    lua_pushboolean(L, 0);
    return 1;
  }
  const char *err = offered ? read_element(L, found, &response) : "permessage-deflate was not offered";
  dx_pmd_params agreed;
  if (!err) err = dx_pmd_check_response(&response, &offer, &agreed);
  if (err) {
    lua_pushnil(L);
    lua_pushfstring(L, "bad permessage-deflate response: %s", err);
    return 2;
  }
  push_params(L, &agreed);
  return 1;
}

/* --- codecs ----------------------------------------------------------------------- */

static dx_pmd *new_pmd(lua_State *L, int role_arg) {
  int role = luaL_checkoption(L, role_arg, NULL, role_names);
  dx_pmd_params p;
  dx_pmd_config c;
  check_params(L, role_arg + 1, &p);
  check_config(L, role_arg + 2, &c);
  dx_pmd *z = dx_pmd_new(role == 0 ? DX_ROLE_SERVER : DX_ROLE_CLIENT, &p, &c);
  if (!z) luaL_error(L, "out of memory");
  return z;
}

/* core.pmd_attach(engine, role, params, { mem_level =, compress_level = })
 * The engine owns the codec from then on. */
static int l_pmd_attach(lua_State *L) {
  dx_proto *p = dx_check_engine(L, 1);
  int role = luaL_checkoption(L, 2, NULL, role_names) == 0 ? DX_ROLE_SERVER : DX_ROLE_CLIENT;
  if (role != p->cfg.role) luaL_argerror(L, 2, "not the engine's role");
  dx_pmd *z = new_pmd(L, 2);
  if (p->pmd) dx_pmd_free(p->pmd);
  p->pmd = z;
  return 0;
}

typedef struct codec {
  dx_pmd *z;
  dx_buf out; /* owned here so a Lua error cannot leak it */
} codec;

static codec *check_codec(lua_State *L) {
  codec *c = luaL_checkudata(L, 1, DX_PMD_CODEC_MT);
  if (!c->z) luaL_error(L, "codec is closed");
  return c;
}

/* core.pmd_codec(role, params, cfg) -> codec */
static int l_pmd_codec(lua_State *L) {
  lua_settop(L, 3); /* the userdata goes above the arguments */
  codec *c = lua_newuserdatauv(L, sizeof *c, 0);
  c->z = NULL;
  memset(&c->out, 0, sizeof c->out);
  luaL_setmetatable(L, DX_PMD_CODEC_MT);
  c->z = new_pmd(L, 1);
  return 1;
}

static int opt_fin(lua_State *L, int arg) { return lua_isnoneornil(L, arg) || lua_toboolean(L, arg); }

static int push_result(lua_State *L, codec *c, int rc) {
  if (rc == DX_PMD_OK) {
    lua_pushlstring(L, (const char *)dx_buf_head(&c->out), dx_buf_size(&c->out));
    dx_buf_free(&c->out);
    return 1;
  }
  dx_buf_free(&c->out);
  lua_pushnil(L);
  lua_pushstring(L, rc == DX_PMD_TOOBIG ? "too big" : rc == DX_PMD_DATA ? "invalid data" : "out of memory");
  return 2;
}

/* codec:deflate(data, fin = true) -> compressed piece */
static int l_codec_deflate(lua_State *L) {
  codec *c = check_codec(L);
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  int fin = opt_fin(L, 3);
  dx_buf_clear(&c->out);
  return push_result(L, c, dx_pmd_deflate(c->z, (const uint8_t *)s, n, fin, &c->out));
}

/* codec:inflate(data, fin = true, max = 16 MiB) -> piece | nil, "too big" | nil, "invalid data"
 * max bounds the whole message, not this piece. */
static int l_codec_inflate(lua_State *L) {
  codec *c = check_codec(L);
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  int fin = opt_fin(L, 3);
  lua_Integer max = luaL_optinteger(L, 4, DX_DEFAULT_MAX_MESSAGE);
  luaL_argcheck(L, max >= 0, 4, "must not be negative");
  dx_buf_clear(&c->out);
  return push_result(L, c, dx_pmd_inflate(c->z, (const uint8_t *)s, n, fin, &c->out, (size_t)max));
}

static int l_codec_memory(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)dx_pmd_memory(check_codec(L)->z));
  return 1;
}

static int l_codec_close(lua_State *L) {
  codec *c = luaL_checkudata(L, 1, DX_PMD_CODEC_MT);
  dx_pmd_free(c->z);
  c->z = NULL;
  dx_buf_free(&c->out);
  return 0;
}

static const luaL_Reg codec_methods[] = {
    {"deflate", l_codec_deflate},
    {"inflate", l_codec_inflate},
    {"memory", l_codec_memory},
    {"close", l_codec_close},
    {NULL, NULL},
};

static const luaL_Reg funcs[] = {
    {"pmd_offer", l_pmd_offer},
    {"pmd_accept", l_pmd_accept},
    {"pmd_check_response", l_pmd_check_response},
    {"pmd_attach", l_pmd_attach},
    {"pmd_codec", l_pmd_codec},
    {NULL, NULL},
};

void dx_open_pmd(lua_State *L) {
  if (luaL_newmetatable(L, DX_PMD_CODEC_MT)) {
    luaL_newlib(L, codec_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_codec_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_codec_close);
    lua_setfield(L, -2, "__close");
  }
  lua_pop(L, 1);
  dx_setfuncs(L, funcs);
}
