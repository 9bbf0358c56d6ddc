#include "dx_ws.h"

#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char WS_GUID[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/* ---------------------------------------------------------------------- */
/* Sec-WebSocket-Extensions                                                */

void dx_ext_init(dx_ext_cursor *c, const char *p, size_t n) {
  c->p = p;
  c->end = p + n;
  c->in_ext = 0;
}

static void skip_ows(dx_ext_cursor *c) {
  while (c->p < c->end && dx_http_is_ows(*c->p)) c->p++;
}

static int ext_bad(dx_ext_cursor *c) {
  c->in_ext = -1; /* stays bad */
  return DX_EXT_BAD;
}

/* RFC 6455 §9.1: a quoted value must be a token once unescaped, so every
 * character inside the quotes, escaped or not, is checked as a tchar. */
static int ext_quoted(dx_ext_cursor *c, dx_ext_tok *t) {
  const char *q = c->p + 1, *start = q;
  size_t chars = 0;
  while (q < c->end && *q != '"') {
    if (*q == '\\' && ++q == c->end) return 0;
    if (!dx_http_is_token(q, 1)) return 0;
    q++;
    chars++;
  }
  if (q == c->end || chars == 0) return 0;
  t->value = (dx_str){start, (size_t)(q - start)};
  t->quoted = 1;
  c->p = q + 1;
  return 1;
}

int dx_ext_next(dx_ext_cursor *c, dx_ext_tok *t) {
  memset(t, 0, sizeof *t);
  if (c->in_ext < 0) return DX_EXT_BAD;
  for (;;) {
    skip_ows(c);
    if (c->p == c->end) return DX_EXT_END;
    if (!c->in_ext) {
      if (*c->p == ',') { /* empty list element */
        c->p++;
        continue;
      }
      size_t n = dx_http_token_len(c->p, c->end);
      if (n == 0) return ext_bad(c);
      t->name = (dx_str){c->p, n};
      c->p += n;
      c->in_ext = 1;
      return DX_EXT_NAME;
    }
    if (*c->p == ',') {
      c->p++;
      c->in_ext = 0;
      continue;
    }
    if (*c->p++ != ';') return ext_bad(c);
    skip_ows(c);
    size_t n = dx_http_token_len(c->p, c->end);
    if (n == 0) return ext_bad(c);
    t->name = (dx_str){c->p, n};
    c->p += n;
    skip_ows(c);
    if (c->p < c->end && *c->p == '=') {
      c->p++;
      skip_ows(c);
      t->has_value = 1;
      if (c->p < c->end && *c->p == '"') {
        if (!ext_quoted(c, t)) return ext_bad(c);
      } else {
        n = dx_http_token_len(c->p, c->end);
        if (n == 0) return ext_bad(c);
        t->value = (dx_str){c->p, n};
        c->p += n;
      }
    }
    return DX_EXT_PARAM;
  }
}

int dx_ext_valid(const char *p, size_t n) {
  dx_ext_cursor c;
  dx_ext_tok t;
  int r;
  dx_ext_init(&c, p, n);
  while ((r = dx_ext_next(&c, &t)) > 0) {}
  return r == DX_EXT_END;
}


/* ---------------------------------------------------------------------- */
/* keys                                                                    */

static int is_b64(unsigned char c) { return dx_http_is_alnum(c) || c == '+' || c == '/'; }

int dx_ws_key_valid(const char *key, size_t n) {
  if (n != DX_WS_KEY_LEN || key[22] != '=' || key[23] != '=') return 0;
  for (size_t i = 0; i < 22; i++)
    if (!is_b64((unsigned char)key[i])) return 0;
  return 1;
}

/* Every 101 hashes a key: a context allocated per call and, on OpenSSL 3,
 * the implicit fetch behind EVP_sha1() were most of the cost. One context
 * and one fetched digest per thread, kept (still reachable at exit). */
static const EVP_MD *sha1_md(void) {
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
  static __thread EVP_MD *md;
  if (!md) md = EVP_MD_fetch(NULL, "SHA1", NULL);
  return md;
#else
  return EVP_sha1();
#endif
}

int dx_ws_accept(const char *key, size_t n, char *out) {
  static __thread EVP_MD_CTX *ctx;
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned mdlen = 0;
  if (!ctx) ctx = EVP_MD_CTX_new();
  const EVP_MD *sha1 = sha1_md();
  int ok = ctx && sha1 && EVP_DigestInit_ex(ctx, sha1, NULL) && EVP_DigestUpdate(ctx, key, n) &&
           EVP_DigestUpdate(ctx, WS_GUID, sizeof WS_GUID - 1) &&
           EVP_DigestFinal_ex(ctx, md, &mdlen);
  if (!ok || mdlen != 20) return -1;
  EVP_EncodeBlock((unsigned char *)out, md, 20);
  return 0;
}

int dx_ws_new_key(char *out) {
  unsigned char nonce[16];
  if (RAND_bytes(nonce, sizeof nonce) != 1) return -1;
  EVP_EncodeBlock((unsigned char *)out, nonce, sizeof nonce);
  return 0;
}

/* ---------------------------------------------------------------------- */
/* RFC 6455 §4.2.1: the server's view of a request                         */

static void reject(dx_ws_request *r, int status, const char *fmt, dx_str arg) {
  char tmp[64];
  r->status = status;
  snprintf(r->error, sizeof r->error, fmt, arg.p ? dx_http_printable(tmp, sizeof tmp, arg) : "");
}

static int list_all_tokens(const dx_http_msg *m, const char *name) {
  dx_http_list l;
  dx_str item;
  dx_http_list_init(&l, m, name);
  while (dx_http_list_next(&l, &item))
    if (!dx_http_is_token(item.p, item.n)) return 0;
  return 1;
}

static int extensions_valid(const dx_http_msg *m) {
  size_t i = 0;
  const dx_http_header *h;
  while ((h = dx_http_next_named(m, "sec-websocket-extensions", &i)) != NULL)
    if (!dx_ext_valid(h->value.p, h->value.n)) return 0;
  return 1;
}

/* The header lines a request's checks count or read: how many of each and
 * the first one's value, from one pass over the lines instead of a pass
 * per question (a dozen of them on every handshake). */
enum { RH_HOST, RH_ORIGIN, RH_KEY, RH_VERSION, RH_LENGTH, RH_TE, RH_N };

typedef struct request_heads {
  size_t count[RH_N];
  dx_str first[RH_N]; /* p NULL when there is none */
} request_heads;

static void tally(const dx_http_msg *m, request_heads *t) {
#define NAME(s) {s, sizeof s - 1}
  static const dx_str names[RH_N] = {NAME("host"), NAME("origin"), NAME("sec-websocket-key"),
                                     NAME("sec-websocket-version"), NAME("content-length"),
                                     NAME("transfer-encoding")};
#undef NAME
  memset(t, 0, sizeof *t);
  for (size_t i = 0; i < m->nheaders; i++) {
    const dx_http_header *h = &m->headers[i];
    for (int k = 0; k < RH_N; k++) {
      if (h->name.n != names[k].n || !dx_str_ieq_str(h->name, names[k])) continue;
      if (t->count[k]++ == 0) t->first[k] = h->value;
      break;
    }
  }
}

static int check_request(const dx_http_msg *m, const request_heads *t, dx_ws_request *r) {
  static const dx_str none = {NULL, 0};
  if (m->method.n != 3 || memcmp(m->method.p, "GET", 3) != 0) {
    reject(r, 405, "method %s not allowed (a WebSocket handshake is a GET)", m->method);
    return 0;
  }
  if (m->version_major != 1) {
    reject(r, 505, "HTTP/1.1 required%s", none);
    return 0;
  }
  if (m->version_minor < 1) {
    reject(r, 400, "HTTP/1.1 or later required%s", none);
    return 0;
  }
  /* A GET that upgrades has no body (RFC 6455 §4.1): bytes announced as one
   * would be read as frames. */
  dx_str length = t->first[RH_LENGTH];
  if (t->count[RH_TE] > 0 || t->count[RH_LENGTH] > 1 ||
      (length.p && !(length.n == 1 && length.p[0] == '0'))) {
    reject(r, 400, "an upgrade request must not have a body%s", none);
    return 0;
  }
  size_t hosts = t->count[RH_HOST];
  if (hosts != 1) {
    reject(r, 400, hosts ? "duplicate Host header%s" : "missing Host header%s", none);
    return 0;
  }
  if (!r->upgrade) {
    reject(r, 400, "missing Upgrade: websocket%s", none);
    return 0;
  }
  if (!dx_http_has_token(m, "connection", "upgrade")) {
    reject(r, 400, "missing Connection: Upgrade%s", none);
    return 0;
  }
  size_t keys = t->count[RH_KEY];
  if (keys != 1) {
    reject(r, 400, keys ? "duplicate Sec-WebSocket-Key%s" : "missing Sec-WebSocket-Key%s", none);
    return 0;
  }
  if (!dx_ws_key_valid(r->key.p, r->key.n)) {
    reject(r, 400, "invalid Sec-WebSocket-Key (not 16 bytes in base64): %s", r->key);
    return 0;
  }
  size_t versions = t->count[RH_VERSION];
  dx_str v = t->first[RH_VERSION];
  if (versions == 0) {
    reject(r, 426, "missing Sec-WebSocket-Version%s", none);
    return 0;
  }
  if (versions > 1 || v.n != 2 || memcmp(v.p, "13", 2) != 0) {
    reject(r, 426, "unsupported Sec-WebSocket-Version: %s (only 13 is supported)", v);
    return 0;
  }
  if (t->count[RH_ORIGIN] > 1) {
    reject(r, 400, "duplicate Origin header%s", none);
    return 0;
  }
  if (!list_all_tokens(m, "sec-websocket-protocol")) {
    reject(r, 400, "invalid Sec-WebSocket-Protocol%s", none);
    return 0;
  }
  if (!extensions_valid(m)) {
    reject(r, 400, "invalid Sec-WebSocket-Extensions%s", none);
    return 0;
  }
  return 1;
}

void dx_ws_check_request(const dx_http_msg *m, dx_ws_request *r) {
  request_heads t;
  tally(m, &t);
  memset(r, 0, sizeof *r);
  r->host = t.first[RH_HOST];
  r->origin = t.first[RH_ORIGIN];
  r->key = t.first[RH_KEY];
  r->upgrade = dx_http_has_token(m, "upgrade", "websocket");
  r->websocket = check_request(m, &t, r);
}

/* ---------------------------------------------------------------------- */
/* RFC 6455 §4.1: the client's view of the response                        */

static int offered_extension(const dx_ws_offer *o, dx_str name) {
  dx_ext_cursor c;
  dx_ext_tok t;
  int r;
  if (!o->extensions.p) return 0;
  dx_ext_init(&c, o->extensions.p, o->extensions.n);
  while ((r = dx_ext_next(&c, &t)) > 0)
    if (r == DX_EXT_NAME && dx_str_ieq_str(t.name, name)) return 1;
  return 0;
}

static const char *check_extensions(const dx_http_msg *m, const dx_ws_offer *o, dx_str *bad) {
  size_t i = 0;
  const dx_http_header *h;
  while ((h = dx_http_next_named(m, "sec-websocket-extensions", &i)) != NULL) {
    dx_ext_cursor c;
    dx_ext_tok t;
    int r;
    dx_ext_init(&c, h->value.p, h->value.n);
    while ((r = dx_ext_next(&c, &t)) > 0) {
      if (r == DX_EXT_NAME && !offered_extension(o, t.name)) {
        *bad = t.name;
        return "server chose extension \"%s\" which was not offered";
      }
    }
    if (r < 0) return "invalid Sec-WebSocket-Extensions in response%s";
  }
  return NULL;
}

static const char *check_protocol(const dx_http_msg *m, const dx_ws_offer *o, dx_str *chosen) {
  dx_http_list l;
  dx_str item;
  size_t n = 0;
  dx_http_list_init(&l, m, "sec-websocket-protocol");
  while (dx_http_list_next(&l, &item)) {
    if (n++) return "server chose more than one subprotocol%s";
    *chosen = item;
  }
  if (n == 0) return NULL;
  for (size_t i = 0; i < o->nprotocols; i++)
    if (dx_str_eq(o->protocols[i], *chosen)) return NULL;
  return "server chose subprotocol \"%s\" which was not offered";
}

int dx_ws_check_response(const dx_http_msg *m, const char *key, size_t keylen,
                         const dx_ws_offer *o, dx_str *protocol, char *err, size_t errlen) {
  char tmp[64];
  const char *why = NULL;
  dx_str arg = {"", 0};
  protocol->p = NULL;
  protocol->n = 0;
  if (m->status != 101) {
    snprintf(err, errlen, "handshake rejected: %d%s%s", m->status, m->reason.n ? " " : "",
             dx_http_printable(tmp, sizeof tmp, m->reason));
    return -1;
  }
  dx_http_list l;
  dx_str item, chosen = {NULL, 0};
  dx_http_list_init(&l, m, "upgrade");
  int up = dx_http_list_next(&l, &item) && dx_str_ieq(item, "websocket") &&
           !dx_http_list_next(&l, &item);
  char accept[DX_WS_ACCEPT_LEN + 1];
  size_t naccept = dx_http_count(m, "sec-websocket-accept");
  dx_str got = dx_http_first(m, "sec-websocket-accept");
  if (m->version_major != 1 || m->version_minor < 1)
    why = "101 response with a version other than HTTP/1.1%s";
  else if (!up)
    why = "response lacks Upgrade: websocket%s";
  else if (!dx_http_has_token(m, "connection", "upgrade"))
    why = "response lacks Connection: Upgrade%s";
  else if (naccept == 0)
    why = "response lacks Sec-WebSocket-Accept%s";
  else if (dx_ws_accept(key, keylen, accept) < 0)
    why = "SHA-1 unavailable%s";
  else if (naccept > 1 || got.n != DX_WS_ACCEPT_LEN || memcmp(got.p, accept, got.n) != 0)
    why = "wrong Sec-WebSocket-Accept%s";
  else if ((why = check_protocol(m, o, &chosen)) != NULL)
    arg = chosen;
  else
    why = check_extensions(m, o, &arg);
  if (why) {
    snprintf(err, errlen, why, dx_http_printable(tmp, sizeof tmp, arg));
    return -1;
  }
  *protocol = chosen;
  return 0;
}

static int is_hex(unsigned char c) {
  return (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'f');
}

/* IPv6 literal, optionally with a zone ("fe80::1%25eth0", RFC 6874) */
static int ipv6_valid(dx_str a) {
  size_t i = 0;
  while (i < a.n && (is_hex((unsigned char)a.p[i]) || a.p[i] == ':' || a.p[i] == '.')) i++;
  if (i < a.n && a.p[i] == '%') {
    for (i++; i < a.n; i++)
      if (!dx_http_is_alnum((unsigned char)a.p[i]) && (!a.p[i] || !strchr("-._~%", a.p[i]))) return 0;
  }
  return i == a.n && memchr(a.p, ':', a.n) != NULL;
}

/* reg-name or IPv4: unreserved, sub-delims and pct-encoded characters */
static int regname_valid(dx_str a) {
  for (size_t i = 0; i < a.n; i++)
    if (!dx_http_is_alnum((unsigned char)a.p[i]) && (!a.p[i] || !strchr("-._~!$&'()*+,;=%", a.p[i])))
      return 0;
  return 1;
}

/* Host as it goes in the Host header: an IPv6 literal gets its brackets. */
static int check_host(dx_str host, dx_str *bare, int *ipv6) {
  *bare = host;
  *ipv6 = memchr(host.p, ':', host.n) != NULL;
  if (host.n >= 2 && host.p[0] == '[' && host.p[host.n - 1] == ']') {
    *bare = (dx_str){host.p + 1, host.n - 2};
    *ipv6 = 1;
  }
  if (bare->n == 0) return 0;
  return *ipv6 ? ipv6_valid(*bare) : regname_valid(*bare);
}

static int check_target(dx_str t) {
  if (t.n == 0 || t.p[0] != '/') return 0;
  for (size_t i = 0; i < t.n; i++)
    if (t.p[i] <= 0x20 || t.p[i] >= 0x7f || t.p[i] == '#') return 0;
  return 1;
}

static int check_extensions_arg(dx_str ext) {
  return dx_http_is_field_value(ext.p, ext.n) && dx_ext_valid(ext.p, ext.n);
}

int dx_ws_build_request(dx_buf *out, const dx_ws_client_opts *o, const char *key, char *err,
                        size_t errlen) {
  static const char *const reserved[] = {
      "host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
      "sec-websocket-protocol", "sec-websocket-extensions", "origin", "content-length",
      "transfer-encoding", NULL};
  static const dx_str none = {NULL, 0};
  dx_str host, target = o->target.p ? o->target : (dx_str){"/", 1};
  int ipv6;
  if (!o->host.p || !check_host(o->host, &host, &ipv6))
    return dx_http_einval(err, errlen, "invalid host \"%s\"", o->host.p ? o->host : none);
  if (o->port < 0 || o->port > 65535) return dx_http_einval(err, errlen, "invalid port%s", none);
  if (!check_target(target))
    return dx_http_einval(err, errlen,
                  "invalid target \"%s\" (must start with / and hold no spaces, controls or #)",
                  target);
  if (!key || !dx_ws_key_valid(key, strlen(key)))
    return dx_http_einval(err, errlen, "invalid Sec-WebSocket-Key%s", none);
  if (o->origin.p && (o->origin.n == 0 || !dx_http_is_field_value(o->origin.p, o->origin.n)))
    return dx_http_einval(err, errlen, "invalid origin \"%s\"", o->origin);
  for (size_t i = 0; i < o->nprotocols; i++) {
    if (!dx_http_is_token(o->protocols[i].p, o->protocols[i].n))
      return dx_http_einval(err, errlen, "invalid subprotocol \"%s\" (must be a token)", o->protocols[i]);
    for (size_t j = 0; j < i; j++)
      if (dx_str_eq(o->protocols[i], o->protocols[j]))
        return dx_http_einval(err, errlen, "duplicate subprotocol \"%s\"", o->protocols[i]);
  }
  if (o->extensions.p && !check_extensions_arg(o->extensions))
    return dx_http_einval(err, errlen, "invalid extensions \"%s\"", o->extensions);
  int rc = dx_http_check_headers(o->headers, o->nheaders, reserved, err, errlen);
  if (rc) return rc;

  dx_http_writer w;
  dx_http_w_init(&w, out);
  dx_http_puts(&w, "GET ");
  dx_http_put_str(&w, target);
  dx_http_puts(&w, " HTTP/1.1\r\nHost: ");
  if (ipv6) dx_http_put(&w, "[", 1);
  dx_http_put_str(&w, host);
  if (ipv6) dx_http_put(&w, "]", 1);
  if (o->port && o->port != (o->secure ? 443 : 80)) {
    char port[16];
    dx_http_put(&w, port, (size_t)snprintf(port, sizeof port, ":%d", o->port));
  }
  dx_http_puts(&w, "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ");
  dx_http_puts(&w, key);
  dx_http_puts(&w, "\r\nSec-WebSocket-Version: 13\r\n");
  if (o->origin.p) dx_http_put_header(&w, "Origin", o->origin);
  if (o->nprotocols) {
    dx_http_puts(&w, "Sec-WebSocket-Protocol: ");
    for (size_t i = 0; i < o->nprotocols; i++) {
      if (i) dx_http_put(&w, ", ", 2);
      dx_http_put_str(&w, o->protocols[i]);
    }
    dx_http_put(&w, "\r\n", 2);
  }
  if (o->extensions.p && o->extensions.n) dx_http_put_header(&w, "Sec-WebSocket-Extensions", o->extensions);
  dx_http_put_headers(&w, o->headers, o->nheaders);
  dx_http_put(&w, "\r\n", 2);
  return dx_http_w_done(&w);
}

int dx_ws_build_accept(dx_buf *out, dx_str key, dx_str protocol, dx_str extensions,
                       const dx_http_header *h, size_t nh, char *err, size_t errlen) {
  static const char *const reserved[] = {
      "upgrade", "connection", "sec-websocket-accept", "sec-websocket-protocol",
      "sec-websocket-extensions", "content-length", "transfer-encoding", NULL};
  static const dx_str none = {NULL, 0};
  char accept[DX_WS_ACCEPT_LEN + 1];
  if (!key.p || !dx_ws_key_valid(key.p, key.n))
    return dx_http_einval(err, errlen, "invalid Sec-WebSocket-Key \"%s\"", key.p ? key : none);
  if (protocol.p && !dx_http_is_token(protocol.p, protocol.n))
    return dx_http_einval(err, errlen, "invalid subprotocol \"%s\" (must be a token)", protocol);
  if (extensions.p && !check_extensions_arg(extensions))
    return dx_http_einval(err, errlen, "invalid extensions \"%s\"", extensions);
  int rc = dx_http_check_headers(h, nh, reserved, err, errlen);
  if (rc) return rc;
  if (dx_ws_accept(key.p, key.n, accept) < 0)
    return dx_http_einval(err, errlen, "SHA-1 unavailable%s", none);

  dx_http_writer w;
  dx_http_w_init(&w, out);
  dx_http_puts(&w, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n");
  dx_http_put_header(&w, "Sec-WebSocket-Accept", (dx_str){accept, DX_WS_ACCEPT_LEN});
  if (protocol.p) dx_http_put_header(&w, "Sec-WebSocket-Protocol", protocol);
  if (extensions.p && extensions.n) dx_http_put_header(&w, "Sec-WebSocket-Extensions", extensions);
  dx_http_put_headers(&w, h, nh);
  dx_http_put(&w, "\r\n", 2);
  return dx_http_w_done(&w);
}

