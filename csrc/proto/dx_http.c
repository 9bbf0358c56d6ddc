#include "dx_http.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------- */
/* characters                                                              */

static int lower(int c) { return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c; }

/* RFC 7230 tchar: ALPHA / DIGIT / "!#$%&'*+-.^_`|~", one bit per byte
 * (a header name is looked at a byte at a time, on every handshake) */
static const uint32_t tchar_bits[8] = {0x00000000, 0x03ff6cfa, 0xc7fffffe, 0x57ffffff};
static int is_tchar(unsigned char c) { return (tchar_bits[c >> 5] >> (c & 31)) & 1; }

/* field-vchar / SP / HTAB: everything but controls and DEL (obs-text is
 * allowed so that UTF-8 in values survives). */
static int is_value_char(unsigned char c) { return c == '\t' || (c >= 0x20 && c != 0x7f); }

size_t dx_http_token_len(const char *p, const char *end) {
  const char *s = p;
  while (p < end && is_tchar((unsigned char)*p)) p++;
  return (size_t)(p - s);
}

int dx_http_is_token(const char *p, size_t n) { return n > 0 && dx_http_token_len(p, p + n) == n; }

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

int dx_str_ieq_str(dx_str a, dx_str b) { return a.n == b.n && mem_ieq(a.p, b.p, a.n); }

int dx_str_eq(dx_str a, dx_str b) { return a.n == b.n && memcmp(a.p, b.p, a.n) == 0; }

static dx_str trim(const char *p, const char *e) {
  while (p < e && dx_http_is_ows(*p)) p++;
  while (e > p && dx_http_is_ows(e[-1])) e--;
  return (dx_str){p, (size_t)(e - p)};
}

/* Copy of s fit for an error message: at most 48 bytes, controls as '?'. */
const char *dx_http_printable(char *dst, size_t cap, dx_str s) {
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
    if (c > '\r') { /* the usual byte: neither a line ending nor a NUL */
      if (m & 1) goto bad_eol;
      m = 0;
      while (i + 1 < n && d[i + 1] > '\r') i++;
      continue;
    }
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
  size_t n = dx_http_token_len(s, e);
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
  if (dx_http_is_ows(*s)) return "obsolete line folding is not allowed";
  size_t n = dx_http_token_len(s, e);
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
  size_t n = strlen(name), k = *i; /* a local index: *i could alias the headers */
  int first = lower((unsigned char)name[0]);
  const dx_http_header *h = m->headers;
  for (; k < m->nheaders; k++) {
    if (h[k].name.n == n && lower((unsigned char)h[k].name.p[0]) == first && mem_ieq(h[k].name.p, name, n)) {
      *i = k + 1;
      return &h[k];
    }
  }
  *i = k;
  return NULL;
}

size_t dx_http_count(const dx_http_msg *m, const char *name) {
  size_t i = 0, c = 0;
  while (dx_http_next_named(m, name, &i)) c++;
  return c;
}

dx_str dx_http_first(const dx_http_msg *m, const char *name) {
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

/* quoted-string (RFC 9110 §5.6.4) */
size_t dx_http_unquote(const char *p, size_t n, char *out) {
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    if (p[i] == '\\' && i + 1 < n) i++;
    out[o++] = p[i];
  }
  return o;
}

/* ---------------------------------------------------------------------- */
/* building                                                                */

void dx_http_w_init(dx_http_writer *w, dx_buf *b) {
  w->b = b;
  w->start = dx_buf_size(b);
  w->nomem = 0;
}

void dx_http_put(dx_http_writer *w, const char *p, size_t n) {
  if (!w->nomem && dx_buf_append(w->b, p, n) < 0) w->nomem = 1;
}

void dx_http_puts(dx_http_writer *w, const char *s) { dx_http_put(w, s, strlen(s)); }

void dx_http_put_str(dx_http_writer *w, dx_str s) { dx_http_put(w, s.p, s.n); }

void dx_http_put_header(dx_http_writer *w, const char *name, dx_str value) {
  dx_http_puts(w, name);
  dx_http_put(w, ": ", 2);
  dx_http_put_str(w, value);
  dx_http_put(w, "\r\n", 2);
}

int dx_http_w_done(dx_http_writer *w) {
  if (!w->nomem) return 0;
  w->b->len = w->b->off + w->start;
  return DX_HTTP_ENOMEM;
}

int dx_http_einval(char *err, size_t errlen, const char *fmt, dx_str arg) {
  char tmp[64];
  snprintf(err, errlen, fmt, arg.p ? dx_http_printable(tmp, sizeof tmp, arg) : "");
  return DX_HTTP_EINVAL;
}

static int has_header(const dx_http_header *h, size_t nh, const char *name) {
  for (size_t i = 0; i < nh; i++)
    if (dx_str_ieq(h[i].name, name)) return 1;
  return 0;
}

/* Every caller-supplied header must be a token name with a value that cannot
 * end the line, and must not be one the builder writes itself. */
int dx_http_check_headers(const dx_http_header *h, size_t nh, const char *const *reserved,
                         char *err, size_t errlen) {
  for (size_t i = 0; i < nh; i++) {
    if (!dx_http_is_token(h[i].name.p, h[i].name.n))
      return dx_http_einval(err, errlen, "invalid header name \"%s\"", h[i].name);
    if (!dx_http_is_field_value(h[i].value.p, h[i].value.n))
      return dx_http_einval(err, errlen, "invalid value for header \"%s\" (CR, LF or control character)",
                    h[i].name);
    for (const char *const *r = reserved; *r; r++)
      if (dx_str_ieq(h[i].name, *r))
        return dx_http_einval(err, errlen, "header \"%s\" is set by the handshake", h[i].name);
  }
  return 0;
}

void dx_http_put_headers(dx_http_writer *w, const dx_http_header *h, size_t nh) {
  for (size_t i = 0; i < nh; i++) {
    dx_http_put_str(w, h[i].name);
    dx_http_put(w, ": ", 2);
    dx_http_put_str(w, h[i].value);
    dx_http_put(w, "\r\n", 2);
  }
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
  if (status < 200 || status > 599) return dx_http_einval(err, errlen, "invalid status%s", none);
  int bodyless = status == 204 || status == 304;
  if (bodyless && body && bodylen)
    return dx_http_einval(err, errlen, "a %s response has no body", (dx_str){status == 204 ? "204" : "304", 3});
  int rc = dx_http_check_headers(h, nh, reserved, err, errlen);
  if (rc) return rc;

  const char *reason = dx_http_reason(status);
  char line[96];
  dx_http_writer w;
  dx_http_w_init(&w, out);
  dx_http_put(&w, line, (size_t)snprintf(line, sizeof line, "HTTP/1.1 %d %s\r\n", status, reason));
  if (!bodyless && !has_header(h, nh, "content-type"))
    dx_http_puts(&w, "Content-Type: text/plain; charset=utf-8\r\n");
  if (status == 405 && !has_header(h, nh, "allow")) dx_http_puts(&w, "Allow: GET\r\n");
  if (status == 426 && !has_header(h, nh, "sec-websocket-version"))
    dx_http_puts(&w, "Sec-WebSocket-Version: 13\r\n");
  dx_http_put_headers(&w, h, nh);
  char deflt[96];
  if (!body) {
    bodylen = 0;
    if (status >= 400) {
      bodylen = (size_t)snprintf(deflt, sizeof deflt, "%d %s\n", status, reason);
      body = deflt;
    }
  }
  if (!bodyless) dx_http_put(&w, line, (size_t)snprintf(line, sizeof line, "Content-Length: %zu\r\n", bodylen));
  dx_http_puts(&w, "Connection: close\r\n\r\n");
  if (!bodyless && bodylen) dx_http_put(&w, body, bodylen);
  return dx_http_w_done(&w);
}
