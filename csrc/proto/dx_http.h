/*
 * dx_http: an incremental HTTP/1.1 head parser (requests for servers,
 * responses for clients), without I/O. Bytes may arrive one at a time; the
 * end of the header block is searched from where the previous call stopped,
 * then the block is parsed once, with every name and value pointing into the
 * parser's buffer. Bytes after the header block are never taken: the caller
 * keeps them, as frames may follow the handshake in the same read. Also what
 * a message is looked at with (header lists, the target and its query) and
 * written with (header values checked, so that no caller input can inject a
 * header). The WebSocket rules on top of it are dx_ws.
 *
 * Nothing here knows about Lua or sockets.
 */
#ifndef DX_HTTP_H
#define DX_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include "dx_buf.h"

/* A slice of someone else's memory; p is NULL when the thing is absent. */
typedef struct dx_str {
  const char *p;
  size_t n;
} dx_str;

typedef struct dx_http_header {
  dx_str name; /* as received (case preserved) */
  dx_str value; /* leading and trailing whitespace removed */
} dx_http_header;

typedef struct dx_http_msg {
  dx_str method, target;           /* requests */
  int status;                      /* responses */
  dx_str reason;                   /* responses, may be empty */
  int version_major, version_minor;
  dx_http_header *headers;
  size_t nheaders;
} dx_http_msg;

enum dx_http_kind { DX_HTTP_REQUEST = 0, DX_HTTP_RESPONSE = 1 };

/* dx_http_feed results */
#define DX_HTTP_INCOMPLETE 0
#define DX_HTTP_COMPLETE 1
#define DX_HTTP_ERROR (-1)

#define DX_HTTP_DEFAULT_MAX_SIZE 8192
#define DX_HTTP_DEFAULT_MAX_HEADERS 100

typedef struct dx_http_parser {
  int kind;           /* enum dx_http_kind */
  size_t max_size;    /* largest header block, final CRLF CRLF included */
  size_t max_headers;
  dx_buf buf;         /* the header block so far (never more) */
  int match;          /* progress through CR LF CR LF at the end of buf */
  int result;         /* DX_HTTP_*: sticky once not INCOMPLETE */
  int status;         /* on error: the HTTP status to answer (400, 431; 500
                         when memory runs out) */
  const char *error;  /* on error: what was wrong (static string) */
  dx_http_msg msg;    /* valid once result is DX_HTTP_COMPLETE */
} dx_http_parser;

/* max_size / max_headers of 0 mean the defaults. */
void dx_http_parser_init(dx_http_parser *p, int kind, size_t max_size, size_t max_headers);
/* Frees the buffer msg points into: copy what you need first. */
void dx_http_parser_free(dx_http_parser *p);

/* Take bytes from data[0..n) up to the end of the header block; *used says
 * how many were taken (the rest belongs to the caller). Returns DX_HTTP_*.
 * Once COMPLETE or ERROR, further calls take nothing and return the same. */
int dx_http_feed(dx_http_parser *p, const uint8_t *data, size_t n, size_t *used);

/* --- looking at a parsed message --------------------------------------- */

int dx_str_ieq(dx_str a, const char *lit); /* ASCII case-insensitive */
int dx_http_is_token(const char *p, size_t n); /* RFC 7230 token, non-empty */
/* Is this a value that can go on the wire as is (VCHAR, obs-text, SP, HTAB;
 * no CR, LF, NUL or other controls)? */
int dx_http_is_field_value(const char *p, size_t n);

/* The next header named name (case-insensitive) at or after *i; advances *i
 * past it. NULL when there is none. */
const dx_http_header *dx_http_next_named(const dx_http_msg *m, const char *name, size_t *i);
size_t dx_http_count(const dx_http_msg *m, const char *name);

/* Walks the elements of a comma-separated list spread over every header line
 * with a given name (RFC 7230 §7): whitespace trimmed, empty elements skipped. */
typedef struct dx_http_list {
  const dx_http_msg *m;
  const char *name;
  size_t next; /* next header index to look at */
  const char *p, *end; /* rest of the current value */
} dx_http_list;

void dx_http_list_init(dx_http_list *l, const dx_http_msg *m, const char *name);
int dx_http_list_next(dx_http_list *l, dx_str *item); /* 1 with an item, 0 at the end */
/* Does some element of that list equal tok (case-insensitive)? */
int dx_http_has_token(const dx_http_msg *m, const char *name, const char *tok);

/* Split a request target into path and query (query.p NULL without '?').
 * An absolute-form target (http://host/p?q) yields its path ("/" if none). */
void dx_http_split_target(dx_str target, dx_str *path, dx_str *query);

/* Walk a query "a=1&b=&c" one parameter at a time: 1 with the next name and
 * value (still encoded; value.n 0 without '='), 0 at the end. Empty
 * parameters ("a=1&&b") are skipped. */
int dx_http_query_next(dx_str *rest, dx_str *name, dx_str *value);
/* Decode one query component as HTML forms encode it ('+' is a space, %XX a
 * byte) into out, which has room for in.n bytes; returns the length. A '%'
 * without two hex digits stays as it is: links in the wild have them, and
 * refusing the request over it would help nobody. */
size_t dx_http_query_decode(dx_str in, char *out);

/* Remove quoted-pair escapes from the inside of a quoted-string (RFC 9110
 * §5.6.4); out needs n bytes. Returns the length written. */
size_t dx_http_unquote(const char *p, size_t n, char *out);

/* --- for the layers above (dx_ws.c) ------------------------------------ */

static inline int dx_http_is_alnum(unsigned char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}
static inline int dx_http_is_ows(char c) { return c == ' ' || c == '\t'; }
/* Length of the RFC 9110 token at p (0 if none). */
size_t dx_http_token_len(const char *p, const char *end);
int dx_str_eq(dx_str a, dx_str b);
int dx_str_ieq_str(dx_str a, dx_str b); /* ASCII case-insensitive */
/* The first value of header name (p NULL when there is none). */
dx_str dx_http_first(const dx_http_msg *m, const char *name);
/* Copy of s fit for an error message: at most 48 bytes, controls as '?'. */
const char *dx_http_printable(char *dst, size_t cap, dx_str s);

/* --- building ---------------------------------------------------------- */

/* Builders append to out and return 0; DX_HTTP_EINVAL (message in err) when
 * some input cannot go on the wire; DX_HTTP_ENOMEM. out is left as it was on
 * failure. */
#define DX_HTTP_EINVAL (-1)
#define DX_HTTP_ENOMEM (-2)

/* Appends to a buffer, remembering failure: the builder checks once, in
 * dx_http_w_done, which also undoes a partial message. */
typedef struct dx_http_writer {
  dx_buf *b;
  size_t start; /* content size before we began, to undo on failure */
  int nomem;
} dx_http_writer;
void dx_http_w_init(dx_http_writer *w, dx_buf *b);
void dx_http_put(dx_http_writer *w, const char *p, size_t n);
void dx_http_puts(dx_http_writer *w, const char *s);
void dx_http_put_str(dx_http_writer *w, dx_str s);
void dx_http_put_header(dx_http_writer *w, const char *name, dx_str value);
void dx_http_put_headers(dx_http_writer *w, const dx_http_header *h, size_t nh);
int dx_http_w_done(dx_http_writer *w); /* 0 or DX_HTTP_ENOMEM */
/* err = fmt with arg made printable; returns DX_HTTP_EINVAL. */
int dx_http_einval(char *err, size_t errlen, const char *fmt, dx_str arg);
/* Every caller-supplied header must be a token name with a value that cannot
 * end the line, and none of reserved (lower-case, NULL-terminated), which the
 * builder writes itself. 0 or DX_HTTP_EINVAL. */
int dx_http_check_headers(const dx_http_header *h, size_t nh, const char *const *reserved,
                          char *err, size_t errlen);

/* A complete response with Content-Length and Connection: close. A body of
 * NULL gets "<status> <reason>\n" for errors and nothing otherwise. */
int dx_http_build_response(dx_buf *out, int status, const dx_http_header *h, size_t nh,
                           const char *body, size_t bodylen, char *err, size_t errlen);
/* Reason phrase of a status code ("" for unknown codes). */
const char *dx_http_reason(int status);

#endif
