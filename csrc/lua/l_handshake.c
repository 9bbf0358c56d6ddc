/*
 * The opening handshake for Lua: server and client objects that take bytes
 * as they arrive and hand back the request or response as a table, plus the
 * builders of the messages each side sends. The rules live in dx_http.c
 * (HTTP) and dx_ws.c (RFC 6455); this file only moves values between Lua
 * and C.
 *
 * Bytes that follow the header block (frames sent right after the
 * handshake) are never swallowed: they wait in the object's rest().
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "dx_ws.h"
#include "l_core.h"

#define SERVER_MT DX_HANDSHAKE_SERVER_MT
#define CLIENT_MT "duplex.handshake_client"
#define TMPBUF_MT "duplex.handshake_buf"
#define REQUEST_MT "duplex.request"

#define MAX_HEADER_SIZE_LIMIT (16u << 20)
#define MAX_HEADERS_LIMIT 10000
#define MAX_EXTRA_HEADERS 1000 /* headers a caller may add to a message */
#define MAX_PROTOCOLS 256

/* user values of both objects */
#define UV_REST 1
/* client only */
#define UV_REQUEST 2
#define UV_PROTOCOLS 3
#define UV_EXTENSIONS 4

typedef struct hs_server {
  dx_http_parser p;
  int closed;
} hs_server;

typedef struct hs_client {
  dx_http_parser p;
  char key[DX_WS_KEY_LEN + 1];
  int closed;
} hs_client;

/* ---------------------------------------------------------------------- */
/* helpers                                                                 */

/* A dx_buf owned by a userdata, so a Lua error between building and pushing
 * the result cannot leak it. */
static int tmpbuf_gc(lua_State *L) {
  dx_buf_free(luaL_checkudata(L, 1, TMPBUF_MT));
  return 0;
}

static dx_buf *new_tmpbuf(lua_State *L) {
  dx_buf *b = lua_newuserdatauv(L, sizeof *b, 0);
  dx_buf init = DX_BUF_INIT;
  *b = init;
  luaL_setmetatable(L, TMPBUF_MT);
  return b;
}

/* Replace the tmpbuf at the top of the stack by its content as a string. */
static void push_tmpbuf(lua_State *L, dx_buf *b) {
  lua_pushlstring(L, (const char *)dx_buf_head(b), dx_buf_size(b));
  dx_buf_free(b);
  lua_remove(L, -2);
}

static void build_failed(lua_State *L, int rc, const char *err) {
  if (rc == DX_HTTP_ENOMEM) luaL_error(L, "not enough memory");
  luaL_error(L, "%s", err);
}

static void push_str(lua_State *L, dx_str s) {
  if (s.p)
    lua_pushlstring(L, s.p, s.n);
  else
    lua_pushnil(L);
}

/* Options read from a table stay on the stack, so the strings they point to
 * live as long as the C function runs, whatever metamethods the table has. */
static dx_str opt_string(lua_State *L, int t, const char *field) {
  dx_str s = {NULL, 0};
  int type = lua_getfield(L, t, field);
  if (type == LUA_TNIL) return s;
  if (type != LUA_TSTRING) luaL_error(L, "option '%s' must be a string", field);
  s.p = lua_tolstring(L, -1, &s.n);
  return s;
}

static int opt_boolean(lua_State *L, int t, const char *field) {
  int type = lua_getfield(L, t, field);
  if (type != LUA_TNIL && type != LUA_TBOOLEAN) luaL_error(L, "option '%s' must be a boolean", field);
  int v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

/* The value on top of the stack as a header string (numbers are converted);
 * it is moved into the anchor table, which keeps it alive. */
static dx_str anchor_field(lua_State *L, int anchor, const char *what) {
  dx_str s;
  int type = lua_type(L, -1);
  if (type != LUA_TSTRING && type != LUA_TNUMBER)
    luaL_error(L, "header %s must be a string", what);
  s.p = lua_tolstring(L, -1, &s.n);
  lua_rawseti(L, anchor, (lua_Integer)lua_rawlen(L, anchor) + 1);
  return s;
}

static int header_cmp(const void *a, const void *b) {
  const dx_http_header *x = a, *y = b;
  size_t n = x->name.n < y->name.n ? x->name.n : y->name.n;
  int c = memcmp(x->name.p, y->name.p, n);
  return c ? c : (x->name.n > y->name.n) - (x->name.n < y->name.n);
}

/* Headers given as { name = value } (sent sorted by name, so the output does
 * not depend on table order) or as { {name, value}, ... } (sent in order).
 * Pushes an anchor table and the array; *n receives the count. idx may hold
 * nil. */
static dx_http_header *check_headers_arg(lua_State *L, int idx, size_t *n) {
  idx = lua_absindex(L, idx);
  *n = 0;
  if (lua_isnoneornil(L, idx)) { /* the two slots, empty: every 101 passes here */
    lua_pushnil(L);
    lua_pushnil(L);
    return NULL;
  }
  lua_newtable(L);
  int anchor = lua_gettop(L);
  if (!lua_istable(L, idx)) luaL_error(L, "headers must be a table");
  size_t count = lua_rawlen(L, idx);
  int array = count > 0;
  if (!array) {
    lua_pushnil(L);
    while (lua_next(L, idx)) {
      lua_pop(L, 1);
      count++;
    }
  }
  if (count > MAX_EXTRA_HEADERS) luaL_error(L, "too many headers (at most %d)", MAX_EXTRA_HEADERS);
  dx_http_header *h = lua_newuserdatauv(L, (count ? count : 1) * sizeof *h, 0);
  if (array) {
    for (size_t i = 0; i < count; i++) {
      if (lua_rawgeti(L, idx, (lua_Integer)i + 1) != LUA_TTABLE)
        luaL_error(L, "headers[%d] must be a {name, value} pair", (int)i + 1);
      lua_rawgeti(L, -1, 1);
      if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "headers[%d] name must be a string", (int)i + 1);
      h[i].name = anchor_field(L, anchor, "name");
      lua_rawgeti(L, -1, 2);
      h[i].value = anchor_field(L, anchor, "value");
      lua_pop(L, 1);
    }
  } else {
    size_t i = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
      if (lua_type(L, -2) != LUA_TSTRING) luaL_error(L, "header names must be strings");
      h[i].value = anchor_field(L, anchor, "value"); /* pops the value */
      h[i].name.p = lua_tolstring(L, -1, &h[i].name.n); /* the key, a string in the table */
      i++;
    }
    qsort(h, count, sizeof *h, header_cmp);
  }
  *n = count;
  return h;
}

/* Lowercased header names, repeated headers joined by ", ". */
static void push_headers(lua_State *L, const dx_http_msg *m) {
  lua_createtable(L, 0, (int)m->nheaders);
  int t = lua_gettop(L);
  for (size_t i = 0; i < m->nheaders; i++) {
    const dx_http_header *h = &m->headers[i];
    luaL_Buffer b;
    char *s = luaL_buffinitsize(L, &b, h->name.n);
    for (size_t j = 0; j < h->name.n; j++) {
      char c = h->name.p[j];
      s[j] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
    }
    luaL_pushresultsize(&b, h->name.n);
    lua_pushvalue(L, -1);
    if (lua_rawget(L, t) == LUA_TNIL) {
      lua_pop(L, 1);
      lua_pushlstring(L, h->value.p, h->value.n);
    } else {
      lua_pushliteral(L, ", ");
      lua_pushlstring(L, h->value.p, h->value.n);
      lua_concat(L, 3);
    }
    lua_rawset(L, t);
  }
}

static void push_ext_value(lua_State *L, const dx_ext_tok *tok) {
  if (!tok->has_value) {
    lua_pushboolean(L, 1);
  } else if (!tok->quoted) {
    lua_pushlstring(L, tok->value.p, tok->value.n);
  } else {
    luaL_Buffer b;
    char *s = luaL_buffinitsize(L, &b, tok->value.n);
    luaL_pushresultsize(&b, dx_http_unquote(tok->value.p, tok->value.n, s));
  }
}

/* Append the extensions of one header value to the array at index arr, as
 * { name = , params = { name = value|true }, params_list = { {name, value} } }.
 * The first of repeated parameters wins in params; params_list has them all. */
static void push_extension_list(lua_State *L, int arr, const char *p, size_t n) {
  dx_ext_cursor c;
  dx_ext_tok tok;
  int r, ext = 0;
  dx_ext_init(&c, p, n);
  while ((r = dx_ext_next(&c, &tok)) > 0) {
    if (r == DX_EXT_NAME) {
      if (ext) lua_pop(L, 3);
      lua_createtable(L, 0, 3);
      push_str(L, tok.name);
      lua_setfield(L, -2, "name");
      lua_newtable(L);
      lua_pushvalue(L, -1);
      lua_setfield(L, -3, "params");
      lua_newtable(L);
      lua_pushvalue(L, -1);
      lua_setfield(L, -4, "params_list");
      lua_pushvalue(L, -3);
      lua_rawseti(L, arr, (lua_Integer)lua_rawlen(L, arr) + 1);
      ext = 1; /* stack: ext, params, params_list */
      continue;
    }
    lua_createtable(L, 2, 0);
    push_str(L, tok.name);
    lua_rawseti(L, -2, 1);
    push_ext_value(L, &tok);
    lua_rawseti(L, -2, 2);
    lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
    push_str(L, tok.name);
    if (lua_rawget(L, -3) == LUA_TNIL) {
      push_str(L, tok.name);
      push_ext_value(L, &tok);
      lua_rawset(L, -5);
    }
    lua_pop(L, 1);
  }
  if (ext) lua_pop(L, 3);
}

static void push_extensions(lua_State *L, const dx_http_msg *m) {
  lua_newtable(L);
  int arr = lua_gettop(L);
  size_t i = 0;
  const dx_http_header *h;
  while ((h = dx_http_next_named(m, "sec-websocket-extensions", &i)) != NULL)
    push_extension_list(L, arr, h->value.p, h->value.n);
}

static void push_version(lua_State *L, const dx_http_msg *m) {
  /* the parser takes only HTTP/1.x, nearly always 1.1: literals, without
   * pushfstring's two conversions of an integer */
  if (m->version_major == 1 && m->version_minor == 1)
    lua_pushliteral(L, "1.1");
  else if (m->version_major == 1 && m->version_minor == 0)
    lua_pushliteral(L, "1.0");
  else
    lua_pushfstring(L, "%d.%d", m->version_major, m->version_minor);
}

/* Store bytes after the header block in the parser at idx: they belong to
 * the WebSocket stream. */
static void keep_rest(lua_State *L, int idx, const char *data, size_t n, size_t used) {
  lua_pushlstring(L, data + used, n - used);
  lua_setiuservalue(L, idx, UV_REST);
}

static int push_rest(lua_State *L) {
  if (lua_getiuservalue(L, 1, UV_REST) != LUA_TSTRING) {
    lua_pop(L, 1);
    lua_pushliteral(L, "");
  }
  return 1;
}

static size_t opt_limit(lua_State *L, int t, const char *field, size_t dflt, size_t hi) {
  return (size_t)dx_opt_integer(L, t, field, (lua_Integer)dflt, 16, (lua_Integer)hi);
}

static const char *state_name(const dx_http_parser *p, int closed) {
  if (closed) return "closed";
  if (p->result == DX_HTTP_INCOMPLETE) return "reading";
  return p->result == DX_HTTP_COMPLETE ? "done" : "failed";
}

/* ---------------------------------------------------------------------- */
/* server                                                                  */

static hs_server *check_server(lua_State *L) {
  hs_server *s = luaL_checkudata(L, 1, SERVER_MT);
  if (s->closed) luaL_error(L, "handshake object is closed");
  return s;
}

static int l_handshake_server(lua_State *L) {
  size_t max_size = DX_HTTP_DEFAULT_MAX_SIZE, max_headers = DX_HTTP_DEFAULT_MAX_HEADERS;
  if (!lua_isnoneornil(L, 1)) {
    luaL_checktype(L, 1, LUA_TTABLE);
    max_size = opt_limit(L, 1, "max_header_size", max_size, MAX_HEADER_SIZE_LIMIT);
    max_headers = (size_t)dx_opt_integer(L, 1, "max_headers", (lua_Integer)max_headers, 1, MAX_HEADERS_LIMIT);
  }
  hs_server *s = lua_newuserdatauv(L, sizeof *s, 1);
  s->closed = 0;
  dx_http_parser_init(&s->p, DX_HTTP_REQUEST, max_size, max_headers);
  luaL_setmetatable(L, SERVER_MT);
  return 1;
}

static void push_query_part(lua_State *L, dx_str part) {
  luaL_Buffer b;
  char *out = luaL_buffinitsize(L, &b, part.n);
  luaL_pushresultsize(&b, dx_http_query_decode(part, out));
}

/* The query as a table of decoded parameters; for a name given more than
 * once the first value counts (request.raw_query keeps the rest). */
static void push_query(lua_State *L, dx_str query) {
  dx_str name, value;
  lua_newtable(L);
  while (query.p && dx_http_query_next(&query, &name, &value)) {
    push_query_part(L, name);
    lua_pushvalue(L, -1);
    if (lua_rawget(L, -3) != LUA_TNIL) {
      lua_pop(L, 2);
      continue;
    }
    lua_pop(L, 1);
    push_query_part(L, value);
    lua_rawset(L, -3);
  }
}

/* ---- the request's lazy fields ----
 * headers, query, protocols and extensions are tables that most
 * connections never read, each made from what the request keeps anyway
 * (its header bytes, raw_query, or a header's value): made on first read
 * and stored in the request then, so an idle connection does not hold
 * four tables. */

static dx_str raw_field(lua_State *L, int req, const char *header, const char *field) {
  dx_str s = {NULL, 0};
  if (header) {
    if (lua_getfield(L, req, "headers") != LUA_TTABLE) return s; /* left on the stack */
    lua_getfield(L, -1, header);
  } else {
    lua_pushstring(L, field);
    lua_rawget(L, req);
  }
  if (lua_type(L, -1) == LUA_TSTRING) s.p = lua_tolstring(L, -1, &s.n);
  return s;
}

/* The comma-separated list of a header value, OWS trimmed, empty items
 * skipped (what dx_http_list does over the header lines). */
static void push_list(lua_State *L, dx_str v) {
  lua_newtable(L);
  const char *p = v.p, *end = v.p + v.n;
  lua_Integer i = 0;
  while (p && p < end) {
    const char *c = memchr(p, ',', (size_t)(end - p)), *e = c ? c : end;
    while (p < e && dx_http_is_ows(*p)) p++;
    const char *q = e;
    while (q > p && dx_http_is_ows(q[-1])) q--;
    if (q > p) {
      lua_pushlstring(L, p, (size_t)(q - p));
      lua_rawseti(L, -2, ++i);
    }
    p = c ? c + 1 : end;
  }
}

/* The headers wait as one string of lower-cased names and values, each
 * ended by a NUL (neither may hold one: the parser checked them), and
 * become the table the first time request.headers is read: a string of
 * the header bytes is about half the size of a table holding them. */
static const char HEADERS_KEY = 0;

/* Names most upgrade requests carry, packed as one byte each, their index
 * here (below ' ', so no name's first byte: the parser took only token
 * characters): a browser's request names a dozen of them, some 200 bytes
 * that every connection would keep. */
#define COMMON(name) {name, sizeof name - 1}
static const dx_str common_names[] = {
    {NULL, 0}, COMMON("host"), COMMON("upgrade"), COMMON("connection"), COMMON("sec-websocket-key"),
    COMMON("sec-websocket-version"), COMMON("sec-websocket-extensions"), COMMON("sec-websocket-protocol"),
    COMMON("origin"), COMMON("user-agent"), COMMON("accept-encoding"), COMMON("accept-language"),
    COMMON("cache-control"), COMMON("pragma"), COMMON("cookie"), COMMON("authorization"),
    COMMON("x-forwarded-for"), COMMON("x-forwarded-proto"), COMMON("x-forwarded-host"), COMMON("x-real-ip"),
    COMMON("forwarded"), COMMON("accept"), COMMON("referer"), COMMON("sec-fetch-dest"),
    COMMON("sec-fetch-mode"), COMMON("sec-fetch-site")};
#undef COMMON
#define NCOMMON (sizeof common_names / sizeof common_names[0])

/* The code of name (n bytes, any case), 0 when it has none. */
static unsigned name_code(const char *name, size_t n) {
  for (unsigned i = 1; i < NCOMMON; i++)
    if (common_names[i].n == n && strncasecmp(common_names[i].p, name, n) == 0) return i;
  return 0;
}

/* The name of the packed header at p, however it was packed, and its
 * length in *n. */
static const char *packed_name(const char *p, size_t *n) {
  unsigned char c = (unsigned char)p[0];
  if (c > 0 && c < NCOMMON && p[1] == '\0') {
    *n = common_names[c].n;
    return common_names[c].p;
  }
  *n = strlen(p);
  return p;
}

/* The value of the packed header whose name is at p. */
static const char *packed_value(const char *p) { return p + strlen(p) + 1; }

static void push_packed_headers(lua_State *L, const dx_http_msg *m) {
  size_t total = 0;
  for (size_t i = 0; i < m->nheaders; i++) {
    const dx_http_header *h = &m->headers[i];
    total += (name_code(h->name.p, h->name.n) ? 1 : h->name.n) + h->value.n + 2;
  }
  luaL_Buffer b;
  char *s = luaL_buffinitsize(L, &b, total);
  for (size_t i = 0; i < m->nheaders; i++) {
    const dx_http_header *h = &m->headers[i];
    unsigned code = name_code(h->name.p, h->name.n);
    if (code) {
      *s++ = (char)code;
    } else {
      for (size_t j = 0; j < h->name.n; j++) {
        char c = h->name.p[j];
        *s++ = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
      }
    }
    *s++ = '\0';
    if (h->value.n) memcpy(s, h->value.p, h->value.n);
    s += h->value.n;
    *s++ = '\0';
  }
  luaL_pushresultsize(&b, total);
}

/* The table of a packed string: a repeated header's values joined with
 * ", ", as push_headers does. */
static void unpack_headers(lua_State *L, const char *p, size_t n) {
  const char *end = p + n;
  lua_newtable(L);
  int t = lua_gettop(L);
  while (p < end) {
    size_t nl;
    const char *name = packed_name(p, &nl), *v = packed_value(p);
    size_t vl = strlen(v);
    lua_pushlstring(L, name, nl);
    lua_pushvalue(L, -1);
    if (lua_rawget(L, t) == LUA_TNIL) {
      lua_pop(L, 1);
      lua_pushlstring(L, v, vl);
    } else {
      lua_pushliteral(L, ", ");
      lua_pushlstring(L, v, vl);
      lua_concat(L, 3);
    }
    lua_rawset(L, t);
    p = v + vl + 1;
  }
}

/* The first value of header name (lower case) of the request at idx,
 * read where it waits: its packed bytes or, once made, its headers table
 * (what holds it is left on the stack); p NULL when there is none. */
static dx_str first_header(lua_State *L, int idx, const char *name) {
  static const dx_str none = {NULL, 0};
  if (lua_rawgetp(L, idx, &HEADERS_KEY) == LUA_TSTRING) {
    size_t n;
    const char *p = lua_tolstring(L, -1, &n), *end = p + n;
    while (p < end) {
      size_t nl;
      const char *v = packed_value(p);
      size_t vl = strlen(v);
      if (strcmp(packed_name(p, &nl), name) == 0) return (dx_str){v, vl};
      p = v + vl + 1;
    }
    return none;
  }
  if (lua_getfield(L, idx, "headers") != LUA_TTABLE || lua_getfield(L, -1, name) != LUA_TSTRING) return none;
  dx_str v;
  v.p = lua_tolstring(L, -1, &v.n);
  return v;
}

/* Push the first value of header name of the request at index 1. */
static int push_first_header(lua_State *L, const char *name) {
  dx_str v = first_header(L, 1, name);
  if (v.p)
    lua_pushlstring(L, v.p, v.n);
  else
    lua_pushnil(L);
  return 1;
}

/* request.key of the request table at idx, with no string made for it:
 * its own field when the application set one, else the header's. */
static dx_str request_key(lua_State *L, int idx) {
  lua_pushliteral(L, "key");
  if (lua_rawget(L, idx) == LUA_TSTRING) {
    dx_str v;
    v.p = lua_tolstring(L, -1, &v.n);
    return v;
  }
  return first_header(L, idx, "sec-websocket-key");
}

/* Fields read off others each time rather than stored: storing one would
 * grow the request's hash part past its 8 entries. */
static int request_derived(lua_State *L, const char *k) {
  if (strcmp(k, "host") == 0) return push_first_header(L, "host");
  if (strcmp(k, "origin") == 0) return push_first_header(L, "origin");
  if (strcmp(k, "key") == 0) return push_first_header(L, "sec-websocket-key");
  if (strcmp(k, "remote_address") == 0) { /* set when a trusted proxy names another */
    lua_pushliteral(L, "peer_address");
    lua_rawget(L, 1);
    return 1;
  }
  if (strcmp(k, "path") == 0) {
    lua_pushliteral(L, "target");
    if (lua_rawget(L, 1) != LUA_TSTRING) return 1;
    dx_str target, path, query;
    target.p = lua_tolstring(L, -1, &target.n);
    dx_http_split_target(target, &path, &query);
    push_str(L, path);
    return 1;
  }
  return 0;
}

static int request_index(lua_State *L) {
  if (lua_type(L, 2) != LUA_TSTRING) return 0;
  const char *k = lua_tostring(L, 2);
  int top = lua_gettop(L);
  int derived = request_derived(L, k);
  if (derived) return derived;
  if (strcmp(k, "headers") == 0) {
    if (lua_rawgetp(L, 1, &HEADERS_KEY) != LUA_TSTRING) return 0;
    size_t n;
    const char *packed = lua_tolstring(L, -1, &n);
    unpack_headers(L, packed, n);
    lua_pushnil(L);
    lua_rawsetp(L, 1, &HEADERS_KEY);
  } else if (strcmp(k, "query") == 0) {
    push_query(L, raw_field(L, 1, NULL, "raw_query"));
  } else if (strcmp(k, "protocols") == 0) {
    push_list(L, raw_field(L, 1, "sec-websocket-protocol", NULL));
  } else if (strcmp(k, "extensions") == 0) {
    dx_str v = raw_field(L, 1, "sec-websocket-extensions", NULL);
    lua_newtable(L);
    if (v.p) push_extension_list(L, lua_gettop(L), v.p, v.n);
  } else {
    return 0;
  }
  lua_pushvalue(L, 2);
  lua_pushvalue(L, -2);
  lua_rawset(L, 1);
  lua_replace(L, top + 1);
  lua_settop(L, top + 1);
  return 1;
}

static void push_request(lua_State *L, const dx_http_msg *m) {
  dx_ws_request r;
  dx_str path, query;
  dx_ws_check_request(m, &r);
  dx_http_split_target(m->target, &path, &query);
  /* room for these six and the two the server adds (peer_address,
   * peer_port): an 8-entry hash part. What can be read off them (path,
   * host, origin, key, remote_address: request_index) is not stored. */
  (void)path;
  lua_createtable(L, 0, 8);
  luaL_setmetatable(L, REQUEST_MT);
  push_str(L, m->method);
  lua_setfield(L, -2, "method");
  push_str(L, m->target);
  lua_setfield(L, -2, "target");
  push_str(L, query);
  lua_setfield(L, -2, "raw_query");
  push_version(L, m);
  lua_setfield(L, -2, "version");
  push_packed_headers(L, m);
  lua_rawsetp(L, -2, &HEADERS_KEY);

  lua_pushboolean(L, r.websocket);
  lua_setfield(L, -2, "websocket");
  lua_pushboolean(L, r.upgrade);
  lua_setfield(L, -2, "upgrade");
  if (!r.websocket) {
    lua_pushinteger(L, r.status);
    lua_setfield(L, -2, "status");
    lua_pushstring(L, r.error);
    lua_setfield(L, -2, "error");
  }
}

/* ---- a request kept as one string ----
 * A callback connection whose request nobody has seen yet keeps it as one
 * string -- method, target, version, peer, flags, then the packed headers,
 * each ended by a NUL -- and the connection makes the table again when it
 * is first read (l_conn.c): about half the bytes of the table and its
 * strings, on every idle connection that never reads it. Only a request
 * with nothing but the fields it came with is packed: the application's
 * own stay in their table. */
/* Whether key k is one a request has on its way to its connection (one
 * comparison per key, by length first: this runs once per connection). */
static int is_request_field(lua_State *L, int k) {
  if (lua_type(L, k) == LUA_TLIGHTUSERDATA) return lua_touserdata(L, k) == &HEADERS_KEY;
  if (lua_type(L, k) != LUA_TSTRING) return 0;
  size_t n;
  const char *s = lua_tolstring(L, k, &n);
#define IS(word) (n == sizeof word - 1 && memcmp(s, word, n) == 0)
  switch (n) {
  case 5: return IS("query");
  case 6: return IS("method") || IS("target");
  case 7: return IS("version") || IS("upgrade");
  case 9: return IS("raw_query") || IS("websocket") || IS("peer_port") || IS("protocols");
  case 10: return IS("extensions");
  case 12: return IS("peer_address");
  case 14: return IS("remote_address");
  default: return 0;
  }
#undef IS
}

static int raw_field_of(lua_State *L, int t, const char *name) {
  lua_pushstring(L, name);
  return lua_rawget(L, t);
}

/* Push the string of the request table at idx: 1, or 0 (nothing pushed)
 * when it holds more than it came with. (The derived tables -- protocols,
 * extensions, query -- are made again from it.) */
int dx_request_pack(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  if (lua_type(L, idx) != LUA_TTABLE) return 0;
  int base = lua_gettop(L);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    if (!is_request_field(L, -1)) {
      lua_settop(L, base);
      return 0;
    }
  }
  /* raw reads: the derived fields (remote_address...) are not stored */
  static const char *const strings[] = {"method", "target", "version", "peer_address"};
  for (int i = 0; i < 4; i++)
    if (raw_field_of(L, idx, strings[i]) != LUA_TSTRING) goto no;
  if (lua_rawgetp(L, idx, &HEADERS_KEY) != LUA_TSTRING) goto no;
  raw_field_of(L, idx, "peer_port");
  if (lua_type(L, -1) != LUA_TNUMBER) goto no;
  int remote = raw_field_of(L, idx, "remote_address") != LUA_TNIL; /* base + 7 */
  if (remote && lua_type(L, -1) != LUA_TSTRING) goto no;
  raw_field_of(L, idx, "websocket");
  raw_field_of(L, idx, "upgrade");
  char flags[4] = {remote ? 'r' : '-', lua_toboolean(L, -2) ? 'w' : '-', lua_toboolean(L, -1) ? 'u' : '-', '\0'};
  lua_pop(L, 2);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (int i = 1; i <= 4; i++) {
    size_t n;
    const char *v = lua_tolstring(L, base + i, &n);
    luaL_addlstring(&b, v, n);
    luaL_addchar(&b, '\0');
  }
  char port[24], *d = port + sizeof port;
  unsigned long long pv = (unsigned long long)lua_tointeger(L, base + 6) & 0xffff;
  *--d = '\0';
  do *--d = (char)('0' + pv % 10); while ((pv /= 10) != 0);
  luaL_addlstring(&b, d, (size_t)(port + sizeof port - d));
  luaL_addlstring(&b, flags, sizeof flags);
  if (remote) {
    size_t n;
    const char *v = lua_tolstring(L, base + 7, &n);
    luaL_addlstring(&b, v, n);
  }
  luaL_addchar(&b, '\0');
  size_t hn;
  const char *h = lua_tolstring(L, base + 5, &hn);
  luaL_addlstring(&b, h, hn);
  luaL_pushresult(&b);
  lua_replace(L, base + 1);
  lua_settop(L, base + 1);
  return 1;
no:
  lua_settop(L, base);
  return 0;
}

/* Push the request table of the string at idx (dx_request_pack's). */
void dx_request_unpack(lua_State *L, int idx) {
  size_t n;
  const char *p = lua_tolstring(L, idx, &n), *end = p + n;
  const char *part[7];
  for (int i = 0; i < 7; i++) { /* method target version peer port flags remote */
    part[i] = p;
    p += strlen(p) + 1;
  }
  lua_createtable(L, 0, 8);
  luaL_setmetatable(L, REQUEST_MT);
  static const char *const names[] = {"method", "target", "version", "peer_address"};
  for (int i = 0; i < 4; i++) {
    lua_pushstring(L, part[i]);
    lua_setfield(L, -2, names[i]);
  }
  dx_str target = {part[1], strlen(part[1])}, path, query;
  dx_http_split_target(target, &path, &query);
  push_str(L, query);
  lua_setfield(L, -2, "raw_query");
  lua_pushinteger(L, (lua_Integer)strtoll(part[4], NULL, 10));
  lua_setfield(L, -2, "peer_port");
  if (part[5][0] == 'r') {
    lua_pushstring(L, part[6]);
    lua_setfield(L, -2, "remote_address");
  }
  lua_pushboolean(L, part[5][1] == 'w');
  lua_setfield(L, -2, "websocket");
  lua_pushboolean(L, part[5][2] == 'u');
  lua_setfield(L, -2, "upgrade");
  lua_pushlstring(L, p, (size_t)(end - p));
  lua_rawsetp(L, -2, &HEADERS_KEY);
}

int dx_handshake_feed(lua_State *L, int idx, const char *data, size_t n) {
  idx = lua_absindex(L, idx);
  hs_server *s = luaL_checkudata(L, idx, SERVER_MT);
  if (s->closed) return luaL_error(L, "handshake object is closed");
  size_t used;
  if (s->p.result == DX_HTTP_COMPLETE) return luaL_error(L, "handshake request already complete");
  int r = dx_http_feed(&s->p, (const uint8_t *)data, n, &used);
  if (r == DX_HTTP_INCOMPLETE) {
    lua_pushnil(L);
    return 1;
  }
  if (r == DX_HTTP_ERROR) {
    lua_pushnil(L);
    lua_pushinteger(L, s->p.status);
    lua_pushstring(L, s->p.error);
    return 3;
  }
  keep_rest(L, idx, data, n, used);
  push_request(L, &s->p.msg);
  dx_http_parser_free(&s->p); /* the request is all in Lua strings now */
  return 1;
}

/* hs:feed(data) -> nil | req | nil, status, message */
static int l_server_feed(lua_State *L) {
  size_t n;
  const char *data = luaL_checklstring(L, 2, &n);
  return dx_handshake_feed(L, 1, data, n);
}

static int l_server_rest(lua_State *L) {
  check_server(L);
  return push_rest(L);
}

/* hs:reset(): ready for the next request, with the same limits (a server
 * keeps one for the next connection instead of making one each time) */
static int l_server_reset(lua_State *L) {
  hs_server *s = luaL_checkudata(L, 1, SERVER_MT);
  dx_http_parser_free(&s->p);
  dx_http_parser_init(&s->p, DX_HTTP_REQUEST, s->p.max_size, s->p.max_headers);
  s->closed = 0;
  lua_pushnil(L);
  lua_setiuservalue(L, 1, UV_REST);
  return 0;
}

static int l_server_close(lua_State *L) {
  hs_server *s = luaL_checkudata(L, 1, SERVER_MT);
  dx_http_parser_free(&s->p);
  s->closed = 1;
  return 0;
}

static int l_server_tostring(lua_State *L) {
  hs_server *s = luaL_checkudata(L, 1, SERVER_MT);
  lua_pushfstring(L, "duplex.handshake_server (%s): %p", state_name(&s->p, s->closed), (void *)s);
  return 1;
}

/* ---------------------------------------------------------------------- */
/* client                                                                  */

static hs_client *check_client(lua_State *L) {
  hs_client *c = luaL_checkudata(L, 1, CLIENT_MT);
  if (c->closed) luaL_error(L, "handshake object is closed");
  return c;
}

/* opts.protocols -> a dx_str array (kept on the stack) and a private copy of
 * the list, pushed after it, for judging the server's choice later. */
static dx_str *check_protocols(lua_State *L, int t, size_t *n) {
  *n = 0;
  int type = lua_getfield(L, t, "protocols");
  if (type != LUA_TNIL && type != LUA_TTABLE) luaL_error(L, "option 'protocols' must be a table");
  int list = lua_gettop(L);
  size_t count = type == LUA_TTABLE ? lua_rawlen(L, list) : 0;
  if (count > MAX_PROTOCOLS) luaL_error(L, "too many protocols (at most %d)", MAX_PROTOCOLS);
  dx_str *p = lua_newuserdatauv(L, (count ? count : 1) * sizeof *p, 0);
  lua_createtable(L, (int)count, 0);
  for (size_t i = 0; i < count; i++) {
    if (lua_rawgeti(L, list, (lua_Integer)i + 1) != LUA_TSTRING)
      luaL_error(L, "protocols[%d] must be a string", (int)i + 1);
    p[i].p = lua_tolstring(L, -1, &p[i].n);
    lua_rawseti(L, -2, (lua_Integer)i + 1); /* the copy keeps it alive */
  }
  *n = count;
  return p;
}

/* core.handshake_client{ host=, port=, secure=, target=, origin=, protocols=,
 * extensions=, headers=, max_header_size=, max_headers= } */
static int l_handshake_client(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_checkstack(L, 40, NULL);
  dx_ws_client_opts o;
  memset(&o, 0, sizeof o);
  o.host = opt_string(L, 1, "host");
  if (!o.host.p) luaL_error(L, "option 'host' is required");
  o.port = (int)dx_opt_integer(L, 1, "port", 0, 1, 65535);
  o.secure = opt_boolean(L, 1, "secure");
  o.target = opt_string(L, 1, "target");
  o.origin = opt_string(L, 1, "origin");
  o.extensions = opt_string(L, 1, "extensions");
  int ext_idx = lua_gettop(L);
  size_t max_size = opt_limit(L, 1, "max_header_size", DX_HTTP_DEFAULT_MAX_SIZE, MAX_HEADER_SIZE_LIMIT);
  size_t max_headers = (size_t)dx_opt_integer(L, 1, "max_headers", DX_HTTP_DEFAULT_MAX_HEADERS, 1,
                                           MAX_HEADERS_LIMIT);
  o.protocols = check_protocols(L, 1, &o.nprotocols);
  int protocols_copy = lua_gettop(L);
  lua_getfield(L, 1, "headers");
  o.headers = check_headers_arg(L, -1, &o.nheaders);

  hs_client *c = lua_newuserdatauv(L, sizeof *c, 4);
  int self = lua_gettop(L);
  memset(c, 0, sizeof *c);
  dx_http_parser_init(&c->p, DX_HTTP_RESPONSE, max_size, max_headers);
  luaL_setmetatable(L, CLIENT_MT); /* from here __gc frees the parser */
  if (dx_ws_new_key(c->key) < 0) luaL_error(L, "RAND_bytes failed");

  char err[160];
  dx_buf *b = new_tmpbuf(L);
  int rc = dx_ws_build_request(b, &o, c->key, err, sizeof err);
  if (rc) build_failed(L, rc, err);
  push_tmpbuf(L, b);
  lua_setiuservalue(L, self, UV_REQUEST);
  lua_pushvalue(L, protocols_copy);
  lua_setiuservalue(L, self, UV_PROTOCOLS);
  if (o.extensions.p) {
    lua_pushvalue(L, ext_idx);
    lua_setiuservalue(L, self, UV_EXTENSIONS);
  }
  lua_settop(L, self);
  return 1;
}

static int l_client_request(lua_State *L) {
  check_client(L);
  lua_getiuservalue(L, 1, UV_REQUEST);
  return 1;
}

static int l_client_key(lua_State *L) {
  hs_client *c = check_client(L);
  lua_pushstring(L, c->key);
  return 1;
}

static void push_response(lua_State *L, const dx_http_msg *m, dx_str protocol) {
  lua_createtable(L, 0, 8);
  lua_pushinteger(L, m->status);
  lua_setfield(L, -2, "status");
  push_str(L, m->reason);
  lua_setfield(L, -2, "reason");
  push_version(L, m);
  lua_setfield(L, -2, "version");
  push_headers(L, m);
  lua_getfield(L, -1, "location");
  lua_setfield(L, -3, "location");
  lua_setfield(L, -2, "headers");
  push_str(L, protocol);
  lua_setfield(L, -2, "protocol");
  push_extensions(L, m);
  lua_setfield(L, -2, "extensions");
}

/* c:feed(data) -> nil | res | nil, message, res_or_nil */
static int l_client_feed(lua_State *L) {
  hs_client *c = check_client(L);
  size_t n, used;
  const char *data = luaL_checklstring(L, 2, &n);
  if (c->p.result == DX_HTTP_COMPLETE) return luaL_error(L, "handshake response already complete");
  int r = dx_http_feed(&c->p, (const uint8_t *)data, n, &used);
  if (r == DX_HTTP_INCOMPLETE) {
    lua_pushnil(L);
    return 1;
  }
  if (r == DX_HTTP_ERROR) {
    lua_pushnil(L);
    lua_pushfstring(L, "invalid HTTP response: %s", c->p.error);
    return 2;
  }
  keep_rest(L, 1, data, n, used);

  lua_settop(L, 1);
  luaL_checkstack(L, 8, NULL);
  lua_getiuservalue(L, 1, UV_PROTOCOLS);
  size_t np = lua_rawlen(L, 2);
  dx_str *protocols = lua_newuserdatauv(L, (np ? np : 1) * sizeof *protocols, 0);
  for (size_t i = 0; i < np; i++) {
    lua_rawgeti(L, 2, (lua_Integer)i + 1); /* strings held by the table at 2 */
    protocols[i].p = lua_tolstring(L, -1, &protocols[i].n);
    lua_pop(L, 1);
  }
  dx_ws_offer offer = {protocols, np, {NULL, 0}};
  if (lua_getiuservalue(L, 1, UV_EXTENSIONS) == LUA_TSTRING)
    offer.extensions.p = lua_tolstring(L, -1, &offer.extensions.n);

  char err[192];
  dx_str protocol;
  int ok = dx_ws_check_response(&c->p.msg, c->key, DX_WS_KEY_LEN, &offer, &protocol, err,
                                sizeof err) == 0;
  push_response(L, &c->p.msg, protocol);
  dx_http_parser_free(&c->p);
  if (ok) return 1;
  lua_pushnil(L);
  lua_pushstring(L, err);
  lua_rotate(L, -3, -1); /* nil, message, res */
  return 3;
}

static int l_client_rest(lua_State *L) {
  check_client(L);
  return push_rest(L);
}

static int l_client_close(lua_State *L) {
  hs_client *c = luaL_checkudata(L, 1, CLIENT_MT);
  dx_http_parser_free(&c->p);
  c->closed = 1;
  return 0;
}

static int l_client_tostring(lua_State *L) {
  hs_client *c = luaL_checkudata(L, 1, CLIENT_MT);
  lua_pushfstring(L, "duplex.handshake_client (%s): %p", state_name(&c->p, c->closed), (void *)c);
  return 1;
}

/* ---------------------------------------------------------------------- */
/* builders                                                                */

static int l_accept_key(lua_State *L) {
  size_t n;
  const char *key = luaL_checklstring(L, 1, &n);
  char out[DX_WS_ACCEPT_LEN + 1];
  if (dx_ws_accept(key, n, out) < 0) return luaL_error(L, "SHA-1 unavailable");
  lua_pushlstring(L, out, DX_WS_ACCEPT_LEN);
  return 1;
}

void dx_handshake_build_accept(lua_State *L, int idx, dx_buf *out) {
  idx = lua_absindex(L, idx);
  luaL_checktype(L, idx, LUA_TTABLE);
  int top = lua_gettop(L);
  dx_str key = opt_string(L, idx, "key");
  if (!key.p && lua_getfield(L, idx, "request") == LUA_TTABLE) key = request_key(L, lua_gettop(L));
  if (!key.p) luaL_error(L, "option 'key' is required");
  dx_str protocol = opt_string(L, idx, "protocol");
  dx_str extensions = opt_string(L, idx, "extensions");
  size_t nh;
  lua_getfield(L, idx, "headers");
  dx_http_header *h = check_headers_arg(L, -1, &nh);
  char err[160];
  size_t before = out->len;
  int rc = dx_ws_build_accept(out, key, protocol, extensions, h, nh, err, sizeof err);
  if (rc) {
    out->len = before; /* what a failed build wrote */
    build_failed(L, rc, err);
  }
  lua_settop(L, top);
}

/* core.handshake_response{ key= (or request=, whose key it reads),
 *                          protocol=, extensions=, headers= } */
static int l_handshake_response(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  dx_buf *b = new_tmpbuf(L);
  dx_handshake_build_accept(L, 1, b);
  push_tmpbuf(L, b);
  return 1;
}

/* core.http_response(status, headers_or_nil, body_or_nil) */
static int l_http_response(lua_State *L) {
  lua_Integer status = luaL_checkinteger(L, 1);
  luaL_argcheck(L, status >= 200 && status <= 599, 1, "status must be from 200 to 599");
  size_t bodylen = 0;
  const char *body = luaL_optlstring(L, 3, NULL, &bodylen);
  if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
  size_t nh;
  dx_http_header *h = check_headers_arg(L, 2, &nh);
  char err[160];
  dx_buf *b = new_tmpbuf(L);
  int rc = dx_http_build_response(b, (int)status, h, nh, body, bodylen, err, sizeof err);
  if (rc) build_failed(L, rc, err);
  push_tmpbuf(L, b);
  return 1;
}

/* ---------------------------------------------------------------------- */

static const luaL_Reg server_methods[] = {
    {"feed", l_server_feed}, {"rest", l_server_rest}, {"reset", l_server_reset}, {"close", l_server_close}, {NULL, NULL}};

static const luaL_Reg client_methods[] = {{"feed", l_client_feed},     {"rest", l_client_rest},
                                          {"request", l_client_request}, {"key", l_client_key},
                                          {"close", l_client_close},     {NULL, NULL}};

static void new_class(lua_State *L, const char *name, const luaL_Reg *methods,
                      lua_CFunction close, lua_CFunction tostring) {
  luaL_newmetatable(L, name);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, close);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, close);
  lua_setfield(L, -2, "__close");
  lua_pushcfunction(L, tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushstring(L, name);
  lua_setfield(L, -2, "__name");
  lua_pop(L, 1);
}

void dx_open_handshake(lua_State *L) {
  static const luaL_Reg funcs[] = {{"handshake_server", l_handshake_server},
                                   {"handshake_client", l_handshake_client},
                                   {"handshake_response", l_handshake_response},
                                   {"http_response", l_http_response},
                                   {"accept_key", l_accept_key},
                                   {NULL, NULL}};
  new_class(L, SERVER_MT, server_methods, l_server_close, l_server_tostring);
  new_class(L, CLIENT_MT, client_methods, l_client_close, l_client_tostring);
  luaL_newmetatable(L, REQUEST_MT);
  lua_pushcfunction(L, request_index);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_newmetatable(L, TMPBUF_MT);
  lua_pushcfunction(L, tmpbuf_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  dx_setfuncs(L, funcs);
}
