/*
 * dx_tls: OpenSSL 3 contexts and connections for non-blocking sockets,
 * without Lua.
 *
 * Every I/O call returns a DX_TLS_* code; WANT_READ / WANT_WRITE say which
 * readiness of the fd the call needs before it is retried. Failures come
 * with a short text naming the reason ("certificate verify failed: hostname
 * mismatch", "connection reset").
 */
#ifndef DX_TLS_H
#define DX_TLS_H

#include <stddef.h>

#include <openssl/ssl.h>

#define DX_TLS_ALPN_MAX 255 /* wire-format protocol list, as in RFC 7301 */

typedef struct dx_tls_config {
  int server;
  const char *cert, *key, *chain; /* PEM files; chain is optional */
  const char *ca;                 /* PEM file or directory; NULL: system store (client) */
  int verify;                     /* check the peer's certificate */
  const char *const *alpn;        /* protocols in preference order */
  size_t nalpn;
} dx_tls_config;

typedef struct dx_tls_ctx {
  SSL_CTX *ctx;
  int server, verify;
  unsigned char alpn[DX_TLS_ALPN_MAX];
  size_t alpn_len;
} dx_tls_ctx;

enum {
  DX_TLS_DONE = 0,
  DX_TLS_WANT_READ,
  DX_TLS_WANT_WRITE,
  DX_TLS_CLOSED, /* the peer closed (close_notify or EOF) */
  DX_TLS_ERROR
};

/* 0, or -1 with err set. The struct must stay at its address while in use
 * (the ALPN callback points at it). */
int dx_tls_ctx_init(dx_tls_ctx *c, const dx_tls_config *cfg, char *err, size_t errlen);
void dx_tls_ctx_free(dx_tls_ctx *c);

/* A connection over fd. A client sends servername as SNI (unless it is an
 * IP literal) and, when verifying, checks the certificate against it. NULL
 * with err set on failure. */
SSL *dx_tls_new(dx_tls_ctx *c, int fd, const char *servername, char *err, size_t errlen);
int dx_tls_handshake(SSL *ssl, char *err, size_t errlen);
int dx_tls_read(SSL *ssl, void *buf, size_t n, size_t *got, char *err, size_t errlen);
/* Partial writes are on: *put may be less than n with DX_TLS_DONE. A retry
 * after WANT_* must pass the same bytes first (the buffer may move). */
int dx_tls_write(SSL *ssl, const void *buf, size_t n, size_t *put, char *err, size_t errlen);
/* Send close_notify once, without waiting for the peer's. */
void dx_tls_shutdown(SSL *ssl);
/* The protocol ALPN selected, or NULL. */
const char *dx_tls_alpn(SSL *ssl, size_t *len);

#endif
