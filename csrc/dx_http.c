#include "dx_http.h"

#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char WS_GUID[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/* ---------------------------------------------------------------------- */
/* characters                                                              */

static int lower(int c) { return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c; }

static int is_alnum(unsigned char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* RFC 7230 tchar */
static int is_tchar(unsigned char c) {
  return is_alnum(c) || (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

/* field-vchar / SP / HTAB: everything but controls and DEL (obs-text is
 * allowed so that UTF-8 in values survives). */
static int is_value_char(unsigned char c) { return c == '\t' || (c >= 0x20 && c != 0x7f); }

static int is_ows(char c) { return c == ' ' || c == '\t'; }

static size_t token_len(const char *p, const char *end) {
  const char *s = p;
  while (p < end && is_tchar((unsigned char)*p)) p++;
  return (size_t)(p - s);
}

int dx_http_is_token(const char *p, size_t n) { return n > 0 && token_len(p, p + n) == n; }

int dx_http_is_field_value(const char *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (!is_value_char((unsigned char)p[i])) return 0;
  return 1;
}

static int mem_ieq(const char *a, const char *b, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (lower((unsigned char)a[i]) != lower((unsigned char)b[i])) return 0;
  return 1;
}

int dx_str_ieq(dx_str a, const char *lit) {
  size_t n = strlen(lit);
  return a.p != NULL && a.n == n && mem_ieq(a.p, lit, n);
}

static int str_eq(dx_str a, dx_str b) { return a.n == b.n && memcmp(a.p, b.p, a.n) == 0; }

static dx_str trim(const char *p, const char *e) {
  while (p < e && is_ows(*p)) p++;
  while (e > p && is_ows(e[-1])) e--;
  return (dx_str){p, (size_t)(e - p)};
}

/* Copy of s fit for an error message: at most 48 bytes, controls as '?'. */
static const char *printable(char *dst, size_t cap, dx_str s) {
  size_t n = s.n < cap - 1 ? s.n : cap - 1;
  if (n > 48) n = 48;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s.p[i];
    dst[i] = (c < 0x20 || c >= 0x7f) ? '?' : (char)c;
  }
  dst[n] = '\0';
  return dst;
}

/* ---------------------------------------------------------------------- */
/* incremental head parser                                                 */

void dx_http_parser_init(dx_http_parser *p, int kind, size_t max_size, size_t max_headers) {
  memset(p, 0, sizeof *p);
  p->kind = kind;
  /* the smallest head, "\r\n\r\n", must fit for the limit to be meaningful */
  p->max_size = max_size ? (max_size < 4 ? 4 : max_size) : DX_HTTP_DEFAULT_MAX_SIZE;
  p->max_headers = max_headers ? max_headers : DX_HTTP_DEFAULT_MAX_HEADERS;
  p->result = DX_HTTP_INCOMPLETE;
}

void dx_http_parser_free(dx_http_parser *p) {
  dx_buf_free(&p->buf);
  free(p->msg.headers);
  p->msg.headers = NULL;
  p->msg.nheaders = 0;
}

static int fail(dx_http_parser *p, int status, const char *error) {
  p->result = DX_HTTP_ERROR;
  p->status = status;
  p->error = error;
  return DX_HTTP_ERROR;
}

/* Continue the search for CR LF CR LF over d[0..n), with p->match carrying
 * the progress of earlier calls, so every byte is looked at once. Line
 * endings are checked here (a lone CR or LF is an error at once, rather than
 * a wait for a terminator that may never come), so the parser proper can
 * split lines on CR alone. Returns the bytes taken; *st is 1 when the block
 * is complete, -1 on a bad byte, 0 when all of d was taken. */
static size_t scan(dx_http_parser *p, const uint8_t *d, size_t n, int *st, const char **why) {
  int m = p->match; /* 0, 1 "\r", 2 "\r\n", 3 "\r\n\r" */
  *st = 0;
  for (size_t i = 0; i < n; i++) {
    uint8_t c = d[i];
    if (c == '\r') {
      if (m & 1) goto bad_eol;
      m++;
    } else if (c == '\n') {
      if (!(m & 1)) goto bad_eol;
      if (++m == 4) {
        p->match = m;
        *st = 1;
        return i + 1;
      }
    } else {
      if (m & 1) goto bad_eol;
      if (c == 0) {
        *why = "NUL byte in header";
        *st = -1;
        return i;
      }
      m = 0;
    }
    continue;
  bad_eol:
    *why = "line ending is not CR LF";
    *st = -1;
    return i;
  }
  p->match = m;
  return n;
}

static int parse_version(const char *s, const char *e, int *major, int *minor) {
  if (e - s != 8 || memcmp(s, "HTTP/", 5) != 0) return 0;
  if (s[5] < '0' || s[5] > '9' || s[6] != '.' || s[7] < '0' || s[7] > '9') return 0;
  *major = s[5] - '0';
  *minor = s[7] - '0';
  return 1;
}

/* method SP request-target SP HTTP-version */
static const char *parse_request_line(dx_http_msg *m, const char *s, const char *e) {
  size_t n = token_len(s, e);
  if (n == 0) return "invalid method";
  if (s + n == e || s[n] != ' ') return "malformed request line";
  m->method = (dx_str){s, n};
  const char *t = s + n + 1, *q = t;
  while (q < e && *q > 0x20 && *q < 0x7f) q++;
  if (q == t) return "missing request target";
  if (q == e) return "malformed request line";
  if (*q != ' ') return "invalid character in request target";
  m->target = (dx_str){t, (size_t)(q - t)};
  if (!parse_version(q + 1, e, &m->version_major, &m->version_minor))
    return "invalid HTTP version";
  return NULL;
}

/* HTTP-version SP 3DIGIT [ SP reason-phrase ]; a missing reason is common
 * enough in the wild to be tolerated. */
static const char *parse_status_line(dx_http_msg *m, const char *s, const char *e) {
  if (e - s < 12 || s[8] != ' ' || !parse_version(s, s + 8, &m->version_major, &m->version_minor))
    return "malformed status line";
  int code = 0;
  for (int i = 9; i < 12; i++) {
    if (s[i] < '0' || s[i] > '9') return "malformed status code";
    code = code * 10 + (s[i] - '0');
  }
  if (code < 100) return "malformed status code";
  m->status = code;
  const char *r = s + 12;
  if (r < e && *r++ != ' ') return "malformed status line";
  for (const char *q = r; q < e; q++)
    if (!is_value_char((unsigned char)*q)) return "invalid character in reason phrase";
  m->reason = (dx_str){r, (size_t)(e - r)};
  return NULL;
}

/* field-name ":" OWS field-value OWS */
static const char *parse_header(dx_http_header *h, const char *s, const char *e) {
  if (is_ows(*s)) return "obsolete line folding is not allowed";
  size_t n = token_len(s, e);
  if (n == 0 || s + n == e || s[n] != ':') return "invalid header name";
  h->name = (dx_str){s, n};
  h->value = trim(s + n + 1, e);
  if (!dx_http_is_field_value(h->value.p, h->value.n)) return "invalid character in header value";
  return NULL;
}

/* The whole block, ending in CR LF CR LF, is in buf: parse it once. */
static int parse(dx_http_parser *p) {
  const char *s = (const char *)p->buf.data, *end = s + p->buf.len;
  size_t lines = 0;
  for (const char *q = s; (q = memchr(q, '\n', (size_t)(end - q))) != NULL; q++) lines++;
  size_t nh = lines - 2; /* minus the start line and the empty line */
  if (nh > p->max_headers) return fail(p, 431, "too many headers");
  dx_http_msg *m = &p->msg;
  if (nh > 0 && !(m->headers = malloc(nh * sizeof *m->headers)))
    return fail(p, 500, "out of memory");

  const char *e = memchr(s, '\r', (size_t)(end - s));
  const char *why = p->kind == DX_HTTP_REQUEST ? parse_request_line(m, s, e)
                                               : parse_status_line(m, s, e);
  if (why) return fail(p, 400, why);
  for (size_t i = 0; i < nh; i++) {
    s = e + 2;
    e = memchr(s, '\r', (size_t)(end - s));
    if ((why = parse_header(&m->headers[i], s, e)) != NULL) return fail(p, 400, why);
  }
  m->nheaders = nh;
  p->result = DX_HTTP_COMPLETE;
  return DX_HTTP_COMPLETE;
}

int dx_http_feed(dx_http_parser *p, const uint8_t *data, size_t n, size_t *used) {
  *used = 0;
  if (p->result != DX_HTTP_INCOMPLETE) return p->result;
  size_t room = p->max_size - p->buf.len;
  int st;
  const char *why = NULL;
  size_t take = scan(p, data, n < room ? n : room, &st, &why);
  if (st < 0) return fail(p, 400, why);
  if (dx_buf_append(&p->buf, data, take) < 0) return fail(p, 500, "out of memory");
  *used = take;
  if (st > 0) return parse(p);
  if (p->buf.len >= p->max_size) return fail(p, 431, "header block too large");
  return DX_HTTP_INCOMPLETE;
}

/* ---------------------------------------------------------------------- */
/* looking at headers                                                      */

const dx_http_header *dx_http_next_named(const dx_http_msg *m, const char *name, size_t *i) {
  size_t n = strlen(name);
  for (; *i < m->nheaders; ++*i) {
    const dx_http_header *h = &m->headers[*i];
    if (h->name.n == n && mem_ieq(h->name.p, name, n)) {
      ++*i;
      return h;
    }
  }
  return NULL;
}

size_t dx_http_count(const dx_http_msg *m, const char *name) {
  size_t i = 0, c = 0;
  while (dx_http_next_named(m, name, &i)) c++;
  return c;
}

static dx_str first_named(const dx_http_msg *m, const char *name) {
  size_t i = 0;
  const dx_http_header *h = dx_http_next_named(m, name, &i);
  return h ? h->value : (dx_str){NULL, 0};
}

void dx_http_list_init(dx_http_list *l, const dx_http_msg *m, const char *name) {
  l->m = m;
  l->name = name;
  l->next = 0;
  l->p = l->end = NULL;
}

int dx_http_list_next(dx_http_list *l, dx_str *item) {
  for (;;) {
    while (l->p == l->end) {
      const dx_http_header *h = dx_http_next_named(l->m, l->name, &l->next);
      if (!h) return 0;
      l->p = h->value.p;
      l->end = h->value.p + h->value.n;
    }
    const char *c = memchr(l->p, ',', (size_t)(l->end - l->p));
    const char *e = c ? c : l->end;
    *item = trim(l->p, e);
    l->p = c ? c + 1 : l->end;
    if (item->n > 0) return 1;
  }
}

int dx_http_has_token(const dx_http_msg *m, const char *name, const char *tok) {
  dx_http_list l;
  dx_str item;
  dx_http_list_init(&l, m, name);
  while (dx_http_list_next(&l, &item))
    if (dx_str_ieq(item, tok)) return 1;
  return 0;
}

void dx_http_split_target(dx_str t, dx_str *path, dx_str *query) {
  size_t i = 0, n = t.n;
  const char *s = t.p;
  query->p = NULL;
  query->n = 0;
  if (n > 0 && s[0] != '/') {
    /* absolute-form: scheme "://" authority [ path ] */
    size_t k = 0;
    while (k < n && (((s[k] | 0x20) >= 'a' && (s[k] | 0x20) <= 'z') ||
                     (k > 0 && ((s[k] >= '0' && s[k] <= '9') || s[k] == '+' || s[k] == '-' ||
                                s[k] == '.'))))
      k++;
    if (k == 0 || n - k < 3 || memcmp(s + k, "://", 3) != 0) {
      *path = t; /* asterisk-form or authority-form: nothing to split */
      return;
    }
    for (i = k + 3; i < n && s[i] != '/' && s[i] != '?'; i++) {}
  }
  size_t qm = i;
  while (qm < n && s[qm] != '?') qm++;
  *path = qm > i ? (dx_str){s + i, qm - i} : (dx_str){"/", 1};
  if (qm < n) *query = (dx_str){s + qm + 1, n - qm - 1};
}

int dx_http_query_next(dx_str *rest, dx_str *name, dx_str *value) {
  const char *s = rest->p, *end = rest->p + rest->n;
  while (s < end && *s == '&') s++;
  if (s == end) return 0;
  const char *amp = memchr(s, '&', (size_t)(end - s));
  if (!amp) amp = end;
  const char *eq = memchr(s, '=', (size_t)(amp - s));
  *name = (dx_str){s, (size_t)((eq ? eq : amp) - s)};
  *value = eq ? (dx_str){eq + 1, (size_t)(amp - eq - 1)} : (dx_str){amp, 0};
  rest->p = amp;
  rest->n = (size_t)(end - amp);
  return 1;
}

static int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  c |= 0x20;
  return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

size_t dx_http_query_decode(dx_str in, char *out) {
  size_t n = 0;
  for (size_t i = 0; i < in.n; i++) {
    char c = in.p[i];
    int hi, lo;
    if (c == '+') {
      c = ' ';
    } else if (c == '%' && i + 2 < in.n && (hi = hex_value(in.p[i + 1])) >= 0 &&
               (lo = hex_value(in.p[i + 2])) >= 0) {
      c = (char)(hi << 4 | lo);
      i += 2;
    }
    out[n++] = c;
  }
  return n;
}

/* ---------------------------------------------------------------------- */
/* Sec-WebSocket-Extensions                                                */

void dx_ext_init(dx_ext_cursor *c, const char *p, size_t n) {
  c->p = p;
  c->end = p + n;
  c->in_ext = 0;
}

static void skip_ows(dx_ext_cursor *c) {
  while (c->p < c->end && is_ows(*c->p)) c->p++;
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
    if (!is_tchar((unsigned char)*q)) return 0;
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
      size_t n = token_len(c->p, c->end);
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
    size_t n = token_len(c->p, c->end);
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
        n = token_len(c->p, c->end);
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

size_t dx_http_unquote(const char *p, size_t n, char *out) {
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    if (p[i] == '\\' && i + 1 < n) i++;
    out[o++] = p[i];
  }
  return o;
}

/* ---------------------------------------------------------------------- */
/* keys                                                                    */

static int is_b64(unsigned char c) { return is_alnum(c) || c == '+' || c == '/'; }

int dx_ws_key_valid(const char *key, size_t n) {
  if (n != DX_WS_KEY_LEN || key[22] != '=' || key[23] != '=') return 0;
  for (size_t i = 0; i < 22; i++)
    if (!is_b64((unsigned char)key[i])) return 0;
  return 1;
}

int dx_ws_accept(const char *key, size_t n, char *out) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned mdlen = 0;
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  int ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha1(), NULL) && EVP_DigestUpdate(ctx, key, n) &&
           EVP_DigestUpdate(ctx, WS_GUID, sizeof WS_GUID - 1) &&
           EVP_DigestFinal_ex(ctx, md, &mdlen);
  EVP_MD_CTX_free(ctx);
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
  snprintf(r->error, sizeof r->error, fmt, arg.p ? printable(tmp, sizeof tmp, arg) : "");
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

static int check_request(const dx_http_msg *m, dx_ws_request *r) {
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
  dx_str length = first_named(m, "content-length");
  if (dx_http_count(m, "transfer-encoding") > 0 || dx_http_count(m, "content-length") > 1 ||
      (length.p && !(length.n == 1 && length.p[0] == '0'))) {
    reject(r, 400, "an upgrade request must not have a body%s", none);
    return 0;
  }
  size_t hosts = dx_http_count(m, "host");
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
  size_t keys = dx_http_count(m, "sec-websocket-key");
  if (keys != 1) {
    reject(r, 400, keys ? "duplicate Sec-WebSocket-Key%s" : "missing Sec-WebSocket-Key%s", none);
    return 0;
  }
  if (!dx_ws_key_valid(r->key.p, r->key.n)) {
    reject(r, 400, "invalid Sec-WebSocket-Key (not 16 bytes in base64): %s", r->key);
    return 0;
  }
  size_t versions = dx_http_count(m, "sec-websocket-version");
  dx_str v = first_named(m, "sec-websocket-version");
  if (versions == 0) {
    reject(r, 426, "missing Sec-WebSocket-Version%s", none);
    return 0;
  }
  if (versions > 1 || v.n != 2 || memcmp(v.p, "13", 2) != 0) {
    reject(r, 426, "unsupported Sec-WebSocket-Version: %s (only 13 is supported)", v);
    return 0;
  }
  if (dx_http_count(m, "origin") > 1) {
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
  memset(r, 0, sizeof *r);
  r->host = first_named(m, "host");
  r->origin = first_named(m, "origin");
  r->key = first_named(m, "sec-websocket-key");
  r->upgrade = dx_http_has_token(m, "upgrade", "websocket");
  r->websocket = check_request(m, r);
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
    if (r == DX_EXT_NAME && t.name.n == name.n && mem_ieq(t.name.p, name.p, name.n)) return 1;
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
    if (str_eq(o->protocols[i], *chosen)) return NULL;
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
             printable(tmp, sizeof tmp, m->reason));
    return -1;
  }
  dx_http_list l;
  dx_str item, chosen = {NULL, 0};
  dx_http_list_init(&l, m, "upgrade");
  int up = dx_http_list_next(&l, &item) && dx_str_ieq(item, "websocket") &&
           !dx_http_list_next(&l, &item);
  char accept[DX_WS_ACCEPT_LEN + 1];
  size_t naccept = dx_http_count(m, "sec-websocket-accept");
  dx_str got = first_named(m, "sec-websocket-accept");
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
    snprintf(err, errlen, why, printable(tmp, sizeof tmp, arg));
    return -1;
  }
  *protocol = chosen;
  return 0;
}

/* ---------------------------------------------------------------------- */
/* building                                                                */

typedef struct writer {
  dx_buf *b;
  size_t start; /* content size before we began, to undo on failure */
  int nomem;
} writer;

static void w_init(writer *w, dx_buf *b) {
  w->b = b;
  w->start = dx_buf_size(b);
  w->nomem = 0;
}

static void put(writer *w, const char *p, size_t n) {
  if (!w->nomem && dx_buf_append(w->b, p, n) < 0) w->nomem = 1;
}

static void puts_(writer *w, const char *s) { put(w, s, strlen(s)); }

static void put_str(writer *w, dx_str s) { put(w, s.p, s.n); }

static void put_header(writer *w, const char *name, dx_str value) {
  puts_(w, name);
  put(w, ": ", 2);
  put_str(w, value);
  put(w, "\r\n", 2);
}

static int w_done(writer *w) {
  if (!w->nomem) return 0;
  w->b->len = w->b->off + w->start;
  return DX_HTTP_ENOMEM;
}

static int einval(char *err, size_t errlen, const char *fmt, dx_str arg) {
  char tmp[64];
  snprintf(err, errlen, fmt, arg.p ? printable(tmp, sizeof tmp, arg) : "");
  return DX_HTTP_EINVAL;
}

static int has_header(const dx_http_header *h, size_t nh, const char *name) {
  for (size_t i = 0; i < nh; i++)
    if (dx_str_ieq(h[i].name, name)) return 1;
  return 0;
}

/* Every caller-supplied header must be a token name with a value that cannot
 * end the line, and must not be one the builder writes itself. */
static int check_headers(const dx_http_header *h, size_t nh, const char *const *reserved,
                         char *err, size_t errlen) {
  for (size_t i = 0; i < nh; i++) {
    if (!dx_http_is_token(h[i].name.p, h[i].name.n))
      return einval(err, errlen, "invalid header name \"%s\"", h[i].name);
    if (!dx_http_is_field_value(h[i].value.p, h[i].value.n))
      return einval(err, errlen, "invalid value for header \"%s\" (CR, LF or control character)",
                    h[i].name);
    for (const char *const *r = reserved; *r; r++)
      if (dx_str_ieq(h[i].name, *r))
        return einval(err, errlen, "header \"%s\" is set by the handshake", h[i].name);
  }
  return 0;
}

static void put_headers(writer *w, const dx_http_header *h, size_t nh) {
  for (size_t i = 0; i < nh; i++) {
    put_str(w, h[i].name);
    put(w, ": ", 2);
    put_str(w, h[i].value);
    put(w, "\r\n", 2);
  }
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
      if (!is_alnum((unsigned char)a.p[i]) && (!a.p[i] || !strchr("-._~%", a.p[i]))) return 0;
  }
  return i == a.n && memchr(a.p, ':', a.n) != NULL;
}

/* reg-name or IPv4: unreserved, sub-delims and pct-encoded characters */
static int regname_valid(dx_str a) {
  for (size_t i = 0; i < a.n; i++)
    if (!is_alnum((unsigned char)a.p[i]) && (!a.p[i] || !strchr("-._~!$&'()*+,;=%", a.p[i])))
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
    return einval(err, errlen, "invalid host \"%s\"", o->host.p ? o->host : none);
  if (o->port < 0 || o->port > 65535) return einval(err, errlen, "invalid port%s", none);
  if (!check_target(target))
    return einval(err, errlen,
                  "invalid target \"%s\" (must start with / and hold no spaces, controls or #)",
                  target);
  if (!key || !dx_ws_key_valid(key, strlen(key)))
    return einval(err, errlen, "invalid Sec-WebSocket-Key%s", none);
  if (o->origin.p && (o->origin.n == 0 || !dx_http_is_field_value(o->origin.p, o->origin.n)))
    return einval(err, errlen, "invalid origin \"%s\"", o->origin);
  for (size_t i = 0; i < o->nprotocols; i++) {
    if (!dx_http_is_token(o->protocols[i].p, o->protocols[i].n))
      return einval(err, errlen, "invalid subprotocol \"%s\" (must be a token)", o->protocols[i]);
    for (size_t j = 0; j < i; j++)
      if (str_eq(o->protocols[i], o->protocols[j]))
        return einval(err, errlen, "duplicate subprotocol \"%s\"", o->protocols[i]);
  }
  if (o->extensions.p && !check_extensions_arg(o->extensions))
    return einval(err, errlen, "invalid extensions \"%s\"", o->extensions);
  int rc = check_headers(o->headers, o->nheaders, reserved, err, errlen);
  if (rc) return rc;

  writer w;
  w_init(&w, out);
  puts_(&w, "GET ");
  put_str(&w, target);
  puts_(&w, " HTTP/1.1\r\nHost: ");
  if (ipv6) put(&w, "[", 1);
  put_str(&w, host);
  if (ipv6) put(&w, "]", 1);
  if (o->port && o->port != (o->secure ? 443 : 80)) {
    char port[16];
    put(&w, port, (size_t)snprintf(port, sizeof port, ":%d", o->port));
  }
  puts_(&w, "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ");
  puts_(&w, key);
  puts_(&w, "\r\nSec-WebSocket-Version: 13\r\n");
  if (o->origin.p) put_header(&w, "Origin", o->origin);
  if (o->nprotocols) {
    puts_(&w, "Sec-WebSocket-Protocol: ");
    for (size_t i = 0; i < o->nprotocols; i++) {
      if (i) put(&w, ", ", 2);
      put_str(&w, o->protocols[i]);
    }
    put(&w, "\r\n", 2);
  }
  if (o->extensions.p && o->extensions.n) put_header(&w, "Sec-WebSocket-Extensions", o->extensions);
  put_headers(&w, o->headers, o->nheaders);
  put(&w, "\r\n", 2);
  return w_done(&w);
}

int dx_ws_build_accept(dx_buf *out, dx_str key, dx_str protocol, dx_str extensions,
                       const dx_http_header *h, size_t nh, char *err, size_t errlen) {
  static const char *const reserved[] = {
      "upgrade", "connection", "sec-websocket-accept", "sec-websocket-protocol",
      "sec-websocket-extensions", "content-length", "transfer-encoding", NULL};
  static const dx_str none = {NULL, 0};
  char accept[DX_WS_ACCEPT_LEN + 1];
  if (!key.p || !dx_ws_key_valid(key.p, key.n))
    return einval(err, errlen, "invalid Sec-WebSocket-Key \"%s\"", key.p ? key : none);
  if (protocol.p && !dx_http_is_token(protocol.p, protocol.n))
    return einval(err, errlen, "invalid subprotocol \"%s\" (must be a token)", protocol);
  if (extensions.p && !check_extensions_arg(extensions))
    return einval(err, errlen, "invalid extensions \"%s\"", extensions);
  int rc = check_headers(h, nh, reserved, err, errlen);
  if (rc) return rc;
  if (dx_ws_accept(key.p, key.n, accept) < 0)
    return einval(err, errlen, "SHA-1 unavailable%s", none);

  writer w;
  w_init(&w, out);
  puts_(&w, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n");
  put_header(&w, "Sec-WebSocket-Accept", (dx_str){accept, DX_WS_ACCEPT_LEN});
  if (protocol.p) put_header(&w, "Sec-WebSocket-Protocol", protocol);
  if (extensions.p && extensions.n) put_header(&w, "Sec-WebSocket-Extensions", extensions);
  put_headers(&w, h, nh);
  put(&w, "\r\n", 2);
  return w_done(&w);
}

const char *dx_http_reason(int status) {
  switch (status) {
  case 100: return "Continue";
  case 101: return "Switching Protocols";
  case 200: return "OK";
  case 201: return "Created";
  case 202: return "Accepted";
  case 204: return "No Content";
  case 301: return "Moved Permanently";
  case 302: return "Found";
  case 303: return "See Other";
  case 304: return "Not Modified";
  case 307: return "Temporary Redirect";
  case 308: return "Permanent Redirect";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 406: return "Not Acceptable";
  case 408: return "Request Timeout";
  case 409: return "Conflict";
  case 410: return "Gone";
  case 411: return "Length Required";
  case 413: return "Content Too Large";
  case 414: return "URI Too Long";
  case 415: return "Unsupported Media Type";
  case 426: return "Upgrade Required";
  case 429: return "Too Many Requests";
  case 431: return "Request Header Fields Too Large";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 502: return "Bad Gateway";
  case 503: return "Service Unavailable";
  case 504: return "Gateway Timeout";
  case 505: return "HTTP Version Not Supported";
  default: return "";
  }
}

int dx_http_build_response(dx_buf *out, int status, const dx_http_header *h, size_t nh,
                           const char *body, size_t bodylen, char *err, size_t errlen) {
  static const char *const reserved[] = {"content-length", "transfer-encoding", "connection",
                                         NULL};
  static const dx_str none = {NULL, 0};
  /* 1xx would leave the connection in another protocol; use the 101 builder */
  if (status < 200 || status > 599) return einval(err, errlen, "invalid status%s", none);
  int bodyless = status == 204 || status == 304;
  if (bodyless && body && bodylen)
    return einval(err, errlen, "a %s response has no body", (dx_str){status == 204 ? "204" : "304", 3});
  int rc = check_headers(h, nh, reserved, err, errlen);
  if (rc) return rc;

  const char *reason = dx_http_reason(status);
  char line[96];
  writer w;
  w_init(&w, out);
  put(&w, line, (size_t)snprintf(line, sizeof line, "HTTP/1.1 %d %s\r\n", status, reason));
  if (!bodyless && !has_header(h, nh, "content-type"))
    puts_(&w, "Content-Type: text/plain; charset=utf-8\r\n");
  if (status == 405 && !has_header(h, nh, "allow")) puts_(&w, "Allow: GET\r\n");
  if (status == 426 && !has_header(h, nh, "sec-websocket-version"))
    puts_(&w, "Sec-WebSocket-Version: 13\r\n");
  put_headers(&w, h, nh);
  char deflt[96];
  if (!body) {
    bodylen = 0;
    if (status >= 400) {
      bodylen = (size_t)snprintf(deflt, sizeof deflt, "%d %s\n", status, reason);
      body = deflt;
    }
  }
  if (!bodyless) put(&w, line, (size_t)snprintf(line, sizeof line, "Content-Length: %zu\r\n", bodylen));
  puts_(&w, "Connection: close\r\n\r\n");
  if (!bodyless && bodylen) put(&w, body, bodylen);
  return w_done(&w);
}
