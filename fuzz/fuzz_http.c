/*
 * libFuzzer harness for dx_http: the request parser and the client's
 * response parser, fed the input whole and in chunks whose sizes come from
 * the first bytes. Besides "never crash, never read out of bounds" it checks
 * properties that must hold for every input:
 *  - chunking changes nothing: same result, same bytes taken, same message;
 *  - bytes after the header block are never taken;
 *  - a valid request answered by dx_ws_build_accept gives a response that
 *    dx_ws_check_response accepts;
 *  - whatever dx_ws_build_request agrees to build is a valid request.
 *
 * Input layout: [config] [4 chunk sizes] [data...]
 */
#define _GNU_SOURCE /* memmem */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dx_ws.h"
#include "fuzz_check.h"


typedef struct limits {
  size_t max_size, max_headers;
} limits;

/* Feed data in chunks of cut[i % 4] bytes (0 means 1); returns the result and
 * the total bytes taken. */
static int feed_chunked(dx_http_parser *p, const uint8_t *d, size_t n, const uint8_t *cut,
                        size_t *taken) {
  size_t off = 0, i = 0;
  int r = DX_HTTP_INCOMPLETE;
  *taken = 0;
  while (off < n && r == DX_HTTP_INCOMPLETE) {
    size_t len = cut ? (cut[i++ % 4] ? cut[(i - 1) % 4] : 1) : n;
    if (len > n - off) len = n - off;
    size_t used;
    r = dx_http_feed(p, d + off, len, &used);
    CHECK(used <= len);
    /* a chunk is taken whole unless the parse ended in it */
    CHECK(r != DX_HTTP_INCOMPLETE || used == len);
    *taken += used;
    off += len;
  }
  return r;
}

static int str_same(dx_str a, dx_str b) {
  if (!a.p || !b.p) return !a.p && !b.p;
  return a.n == b.n && memcmp(a.p, b.p, a.n) == 0;
}

static void check_same(const dx_http_parser *a, const dx_http_parser *b) {
  CHECK(a->result == b->result);
  if (a->result == DX_HTTP_ERROR) {
    CHECK(a->status == b->status);
    CHECK(strcmp(a->error, b->error) == 0);
  }
  if (a->result != DX_HTTP_COMPLETE) return;
  const dx_http_msg *x = &a->msg, *y = &b->msg;
  CHECK(str_same(x->method, y->method) && str_same(x->target, y->target));
  CHECK(x->status == y->status && str_same(x->reason, y->reason));
  CHECK(x->version_major == y->version_major && x->version_minor == y->version_minor);
  CHECK(x->nheaders == y->nheaders);
  for (size_t i = 0; i < x->nheaders; i++) {
    CHECK(str_same(x->headers[i].name, y->headers[i].name));
    CHECK(str_same(x->headers[i].value, y->headers[i].value));
  }
}

/* Every parameter of the query lies inside it, and decodes to at most its
 * own length, without a '%' that starts a valid escape in a byte it wrote. */
static void walk_query(dx_str query) {
  dx_str rest = query, name, value;
  size_t seen = 0;
  while (dx_http_query_next(&rest, &name, &value)) {
    CHECK(name.p >= query.p && name.p + name.n <= query.p + query.n);
    CHECK(value.p >= name.p + name.n && value.p + value.n <= query.p + query.n);
    CHECK(++seen <= query.n);
    char *out = malloc(value.n ? value.n : 1);
    size_t n = dx_http_query_decode(value, out);
    CHECK(n <= value.n);
    CHECK(memchr(out, '+', n) == NULL || memchr(value.p, '%', value.n) != NULL);
    free(out);
  }
  CHECK(rest.n == 0 || rest.p[0] == '&');
}

/* Walk everything a binding would look at. */
static void walk(const dx_http_msg *m) {
  dx_http_list l;
  dx_str item, path, query;
  dx_http_list_init(&l, m, "sec-websocket-protocol");
  while (dx_http_list_next(&l, &item)) CHECK(item.n > 0);
  dx_http_split_target(m->target.p ? m->target : (dx_str){"", 0}, &path, &query);
  if (query.p) walk_query(query);
  size_t i = 0;
  const dx_http_header *h;
  while ((h = dx_http_next_named(m, "sec-websocket-extensions", &i)) != NULL) {
    dx_ext_cursor c;
    dx_ext_tok t;
    int r;
    dx_ext_init(&c, h->value.p, h->value.n);
    while ((r = dx_ext_next(&c, &t)) > 0) {
      if (t.quoted) {
        char *out = malloc(t.value.n ? t.value.n : 1);
        size_t n = dx_http_unquote(t.value.p, t.value.n, out);
        CHECK(n > 0 && n <= t.value.n && dx_http_is_token(out, n));
        free(out);
      }
    }
    CHECK(r == DX_EXT_END || dx_ext_next(&c, &t) == DX_EXT_BAD);
  }
}

static void parse_all(dx_http_parser *p, const uint8_t *d, size_t n) {
  size_t used;
  int r = dx_http_feed(p, d, n, &used);
  CHECK(r == DX_HTTP_COMPLETE);
  CHECK(used == n);
}

/* The server answers a valid request; the client must accept the answer. */
static void round_trip_accept(const dx_http_msg *m, const dx_ws_request *r) {
  dx_str protocols[8], item, ext = {NULL, 0};
  size_t np = 0;
  dx_http_list l;
  dx_http_list_init(&l, m, "sec-websocket-protocol");
  while (np < 8 && dx_http_list_next(&l, &item)) protocols[np++] = item;
  size_t i = 0;
  const dx_http_header *h = dx_http_next_named(m, "sec-websocket-extensions", &i);
  if (h) ext = h->value;

  dx_buf out = DX_BUF_INIT;
  char err[256];
  int rc = dx_ws_build_accept(&out, r->key, np ? protocols[0] : (dx_str){NULL, 0}, ext, NULL, 0,
                              err, sizeof err);
  CHECK(rc == 0);
  dx_http_parser p;
  dx_http_parser_init(&p, DX_HTTP_RESPONSE, 1 << 20, 1000);
  parse_all(&p, dx_buf_head(&out), dx_buf_size(&out));
  dx_ws_offer offer = {protocols, np, ext};
  dx_str chosen;
  rc = dx_ws_check_response(&p.msg, r->key.p, r->key.n, &offer, &chosen, err, sizeof err);
  if (rc) fprintf(stderr, "%s\n", err);
  CHECK(rc == 0);
  CHECK(np ? str_same(chosen, protocols[0]) : chosen.p == NULL);
  dx_http_parser_free(&p);
  dx_buf_free(&out);
}

/* Whatever the request builder accepts must be a valid upgrade request. */
static void round_trip_request(const dx_http_msg *m, int port, int want_headers) {
  dx_ws_client_opts o;
  memset(&o, 0, sizeof o);
  size_t i = 0;
  const dx_http_header *h = dx_http_next_named(m, "host", &i);
  o.host = h ? h->value : (dx_str){"h", 1};
  o.port = port;
  o.target = m->target;
  i = 0;
  if ((h = dx_http_next_named(m, "origin", &i)) != NULL) o.origin = h->value;
  i = 0;
  if ((h = dx_http_next_named(m, "sec-websocket-extensions", &i)) != NULL) o.extensions = h->value;
  if (want_headers) {
    o.headers = m->headers;
    o.nheaders = m->nheaders < 3 ? m->nheaders : 3;
  }

  char key[DX_WS_KEY_LEN + 1], err[256];
  CHECK(dx_ws_new_key(key) == 0 && dx_ws_key_valid(key, strlen(key)));
  dx_buf out = DX_BUF_INIT;
  if (dx_ws_build_request(&out, &o, key, err, sizeof err) == 0) {
    dx_http_parser p;
    dx_ws_request r;
    dx_http_parser_init(&p, DX_HTTP_REQUEST, 1 << 20, 1000);
    parse_all(&p, dx_buf_head(&out), dx_buf_size(&out));
    dx_ws_check_request(&p.msg, &r);
    if (!r.websocket) fprintf(stderr, "%s\n", r.error);
    CHECK(r.websocket);
    dx_http_parser_free(&p);
  } else {
    CHECK(dx_buf_size(&out) == 0);
  }
  dx_buf_free(&out);
}

static void fuzz_request(const limits *lim, const uint8_t *cut, const uint8_t *d, size_t n) {
  dx_http_parser whole, chunked;
  size_t used, taken;
  dx_http_parser_init(&whole, DX_HTTP_REQUEST, lim->max_size, lim->max_headers);
  dx_http_parser_init(&chunked, DX_HTTP_REQUEST, lim->max_size, lim->max_headers);
  int r = dx_http_feed(&whole, d, n, &used);
  feed_chunked(&chunked, d, n, cut, &taken);
  check_same(&whole, &chunked);
  CHECK(used <= lim->max_size);
  if (r == DX_HTTP_COMPLETE) {
    CHECK(used == taken);
    CHECK(used >= 4 && memcmp(d + used - 4, "\r\n\r\n", 4) == 0);
    CHECK(memmem(d, used, "\r\n\r\n", 4) == d + used - 4); /* the first end, not a later one */
    CHECK(dx_http_feed(&whole, d, n, &used) == DX_HTTP_COMPLETE && used == 0);
    dx_ws_request req;
    dx_ws_check_request(&whole.msg, &req);
    CHECK(req.websocket ? req.status == 0
                        : (req.status == 400 || req.status == 405 || req.status == 426 || req.status == 505));
    walk(&whole.msg);
    if (req.websocket) round_trip_accept(&whole.msg, &req);
    round_trip_request(&whole.msg, cut[0] * 256 + cut[1], cut[3] & 1);
  }
  dx_http_parser_free(&whole);
  dx_http_parser_free(&chunked);
}

static void fuzz_response(const limits *lim, const uint8_t *cut, const uint8_t *d, size_t n) {
  static const dx_str protocols[] = {{"chat", 4}, {"superchat", 9}};
  static const char key[] = "dGhlIHNhbXBsZSBub25jZQ==";
  dx_http_parser whole, chunked;
  size_t used, taken;
  dx_http_parser_init(&whole, DX_HTTP_RESPONSE, lim->max_size, lim->max_headers);
  dx_http_parser_init(&chunked, DX_HTTP_RESPONSE, lim->max_size, lim->max_headers);
  int r = dx_http_feed(&whole, d, n, &used);
  feed_chunked(&chunked, d, n, cut, &taken);
  check_same(&whole, &chunked);
  if (r == DX_HTTP_COMPLETE) {
    CHECK(used == taken);
    dx_ws_offer offer = {protocols, cut[2] & 1 ? 2 : 0,
                         cut[2] & 2 ? (dx_str){"permessage-deflate; client_max_window_bits", 42}
                                    : (dx_str){NULL, 0}};
    dx_str chosen;
    char err[256];
    if (dx_ws_check_response(&whole.msg, key, sizeof key - 1, &offer, &chosen, err, sizeof err) == 0) {
      CHECK(whole.msg.status == 101);
      CHECK(!chosen.p || str_same(chosen, protocols[0]) || str_same(chosen, protocols[1]));
    } else {
      CHECK(strlen(err) > 0);
    }
    walk(&whole.msg);
  }
  dx_http_parser_free(&whole);
  dx_http_parser_free(&chunked);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 5) return 0;
  limits lim = {DX_HTTP_DEFAULT_MAX_SIZE, DX_HTTP_DEFAULT_MAX_HEADERS};
  if (data[0] & 1) lim.max_size = 16 + (size_t)(data[0] >> 1) * 4; /* small limits too */
  if (data[0] & 2) lim.max_headers = 1 + (data[0] >> 4);
  const uint8_t *cut = data + 1;
  fuzz_request(&lim, cut, data + 5, size - 5);
  fuzz_response(&lim, cut, data + 5, size - 5);

  /* builders with arbitrary names and values must refuse, not inject */
  size_t half = (size - 5) / 2;
  dx_http_header h = {{(const char *)data + 5, half}, {(const char *)data + 5 + half, size - 5 - half}};
  dx_buf out = DX_BUF_INIT;
  char err[256];
  int rc = dx_http_build_response(&out, 200 + data[1] % 400, &h, 1, NULL, 0, err, sizeof err);
  if (rc == 0) {
    dx_http_parser p;
    dx_http_parser_init(&p, DX_HTTP_RESPONSE, 1 << 20, 1000);
    size_t used;
    CHECK(dx_http_feed(&p, dx_buf_head(&out), dx_buf_size(&out), &used) == DX_HTTP_COMPLETE);
    CHECK(p.msg.nheaders >= 2 && p.msg.nheaders <= 5);
    dx_http_parser_free(&p);
  }
  dx_buf_free(&out);
  return 0;
}
