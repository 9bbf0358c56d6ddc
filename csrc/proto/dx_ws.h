/*
 * dx_ws: the WebSocket opening handshake's rules (RFC 6455 §4), on top of
 * dx_http's parsed messages: Sec-WebSocket-Extensions (§9.1), keys and
 * Sec-WebSocket-Accept, validating a client's request and a server's answer,
 * and building requests and 101 answers whose header names and values are
 * checked, so that no caller input can inject a header. No I/O, no Lua.
 */
#ifndef DX_WS_H
#define DX_WS_H

#include "dx_http.h"

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
#endif
