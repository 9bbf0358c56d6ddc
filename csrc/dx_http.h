/*
 * dx_http: the WebSocket opening handshake (RFC 6455 §4), without I/O.
 *
 * Two layers:
 *  - an incremental HTTP/1.1 head parser (request for servers, response for
 *    clients). Bytes may arrive one at a time; the end of the header block is
 *    searched from where the previous call stopped, then the block is parsed
 *    once, with every name and value pointing into the parser's buffer.
 *    Bytes after the header block are never taken: the caller keeps them, as
 *    frames may follow the handshake in the same read.
 *  - the RFC 6455 rules on top of it: validating a client's request and a
 *    server's answer, and building requests and responses whose header names
 *    and values are checked, so that no caller input can inject a header.
 *
 * Nothing here knows about Lua (the fuzzers link this file alone).
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

/* --- Sec-WebSocket-Extensions ------------------------------------------ */

/* extension-list = 1#( token *( ";" token [ "=" ( token / quoted-string ) ] ) )
 * walked one piece at a time. */
#define DX_EXT_END 0
#define DX_EXT_NAME 1  /* a new extension begins: tok.name */
#define DX_EXT_PARAM 2 /* a parameter of the current one */
#define DX_EXT_BAD (-1)

typedef struct dx_ext_cursor {
  const char *p, *end;
  int in_ext; /* an extension name was read; ';' or ',' expected */
} dx_ext_cursor;

typedef struct dx_ext_tok {
  dx_str name;
  dx_str value;  /* raw: inside the quotes, escapes not removed */
  int has_value; /* "name=value" rather than "name" */
  int quoted;    /* value was a quoted-string: see dx_http_unquote */
} dx_ext_tok;

void dx_ext_init(dx_ext_cursor *c, const char *p, size_t n);
int dx_ext_next(dx_ext_cursor *c, dx_ext_tok *t);
/* Is the whole string a valid (possibly empty) extension list? */
int dx_ext_valid(const char *p, size_t n);
/* Remove quoted-pair escapes from the inside of a quoted-string; out needs n
 * bytes. Returns the length written. */
size_t dx_http_unquote(const char *p, size_t n, char *out);

/* --- the RFC 6455 rules ------------------------------------------------ */

#define DX_WS_KEY_LEN 24    /* base64 of 16 bytes */
#define DX_WS_ACCEPT_LEN 28 /* base64 of a SHA-1 digest */

/* Does key base64-decode to exactly 16 bytes? */
int dx_ws_key_valid(const char *key, size_t n);
/* base64(SHA-1(key + GUID)) into out (DX_WS_ACCEPT_LEN + 1 bytes, NUL
 * terminated). Returns 0, or -1 if OpenSSL fails. */
int dx_ws_accept(const char *key, size_t n, char *out);
/* A fresh key from RAND_bytes into out (DX_WS_KEY_LEN + 1 bytes). 0 or -1. */
int dx_ws_new_key(char *out);

typedef struct dx_ws_request {
  int websocket; /* a valid upgrade request */
  int upgrade;   /* the client asked for a WebSocket upgrade at all */
  int status;    /* when !websocket: 400, 405 or 426 */
  char error[128]; /* when !websocket */
  dx_str host, origin, key; /* p NULL when absent */
} dx_ws_request;

/* RFC 6455 §4.2.1 on a parsed request. Always fills r. */
void dx_ws_check_request(const dx_http_msg *m, dx_ws_request *r);

/* What a client sent, to judge the server's choices against. */
typedef struct dx_ws_offer {
  const dx_str *protocols;
  size_t nprotocols;
  dx_str extensions; /* the Sec-WebSocket-Extensions value sent (p may be NULL) */
} dx_ws_offer;

/* RFC 6455 §4.1 on a parsed response to a request carrying key. Returns 0 and
 * sets *protocol (p NULL when none was chosen) when the handshake succeeded;
 * otherwise -1 with a message in err. */
int dx_ws_check_response(const dx_http_msg *m, const char *key, size_t keylen,
                         const dx_ws_offer *o, dx_str *protocol, char *err, size_t errlen);

/* --- building ---------------------------------------------------------- */

/* Builders append to out and return 0; DX_HTTP_EINVAL (message in err) when
 * some input cannot go on the wire; DX_HTTP_ENOMEM. out is left as it was on
 * failure. */
#define DX_HTTP_EINVAL (-1)
#define DX_HTTP_ENOMEM (-2)

typedef struct dx_ws_client_opts {
  dx_str host;   /* name, IPv4 or IPv6 literal (brackets optional) */
  int port;      /* 0: the default for secure */
  int secure;
  dx_str target; /* p NULL: "/" */
  dx_str origin; /* p NULL: none */
  const dx_str *protocols;
  size_t nprotocols;
  dx_str extensions; /* p NULL: none */
  const dx_http_header *headers;
  size_t nheaders;
} dx_ws_client_opts;

int dx_ws_build_request(dx_buf *out, const dx_ws_client_opts *o, const char *key,
                        char *err, size_t errlen);
/* 101 Switching Protocols; protocol and extensions may have p NULL. */
int dx_ws_build_accept(dx_buf *out, dx_str key, dx_str protocol, dx_str extensions,
                       const dx_http_header *h, size_t nh, char *err, size_t errlen);
/* A complete response with Content-Length and Connection: close. A body of
 * NULL gets "<status> <reason>\n" for errors and nothing otherwise. */
int dx_http_build_response(dx_buf *out, int status, const dx_http_header *h, size_t nh,
                           const char *body, size_t bodylen, char *err, size_t errlen);
/* Reason phrase of a status code ("" for unknown codes). */
const char *dx_http_reason(int status);

#endif
