#include "dx_tls.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

#include "dx_sock.h"

static void openssl_error(const char *what, char *err, size_t errlen) {
  unsigned long e = ERR_peek_last_error();
  const char *reason = e ? ERR_reason_error_string(e) : NULL;
  snprintf(err, errlen, "%s%s%s", what, reason ? ": " : "", reason ? reason : "");
  ERR_clear_error();
}

static int alpn_encode(dx_tls_ctx *c, const dx_tls_config *cfg, char *err, size_t errlen) {
  size_t len = 0;
  for (size_t i = 0; i < cfg->nalpn; i++) {
    size_t n = strlen(cfg->alpn[i]);
    if (n == 0 || n > 255 || len + 1 + n > sizeof c->alpn) {
      snprintf(err, errlen, "alpn: bad protocol name or list too long");
      return -1;
    }
    c->alpn[len++] = (unsigned char)n;
    memcpy(c->alpn + len, cfg->alpn[i], n);
    len += n;
  }
  c->alpn_len = len;
  return 0;
}

/* Server side of ALPN: the first of our protocols the client offers. */
static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
                       unsigned int inlen, void *arg) {
  (void)ssl;
  dx_tls_ctx *c = arg;
  unsigned char *sel;
  if (SSL_select_next_proto(&sel, outlen, c->alpn, (unsigned)c->alpn_len, in, inlen) !=
      OPENSSL_NPN_NEGOTIATED)
    return SSL_TLSEXT_ERR_NOACK;
  *out = sel;
  return SSL_TLSEXT_ERR_OK;
}

static int load_chain(SSL_CTX *ctx, const char *path, char *err, size_t errlen) {
  FILE *f = fopen(path, "r");
  if (!f) {
    snprintf(err, errlen, "chain %s: %s", path, strerror(errno));
    return -1;
  }
  int n = 0;
  X509 *x;
  while ((x = PEM_read_X509(f, NULL, NULL, NULL)) != NULL) {
    if (!SSL_CTX_add0_chain_cert(ctx, x)) {
      X509_free(x);
      fclose(f);
      openssl_error("chain", err, errlen);
      return -1;
    }
    n++;
  }
  fclose(f);
  ERR_clear_error(); /* the end of the file reads as an error */
  if (n == 0) {
    snprintf(err, errlen, "chain %s: no certificate", path);
    return -1;
  }
  return 0;
}

/* A file OpenSSL is about to read must be readable: say so plainly ("cannot
 * read certificate x.pem: No such file or directory"), not as OpenSSL's
 * "system lib" error. */
static int readable(const char *what, const char *path, char *err, size_t errlen) {
  FILE *f = fopen(path, "rb");
  if (f) {
    fclose(f);
    return 0;
  }
  snprintf(err, errlen, "cannot read %s %.256s: %s", what, path, strerror(errno));
  return -1;
}

static int load_ca(SSL_CTX *ctx, const char *ca, char *err, size_t errlen) {
  struct stat st;
  int dir = stat(ca, &st) == 0 && S_ISDIR(st.st_mode);
  if (!dir && readable("CA file", ca, err, errlen) < 0) return -1;
  if (!SSL_CTX_load_verify_locations(ctx, dir ? NULL : ca, dir ? ca : NULL)) {
    char what[64 + 256];
    snprintf(what, sizeof what, "ca %.256s", ca);
    openssl_error(what, err, errlen);
    return -1;
  }
  return 0;
}

static int ctx_setup(dx_tls_ctx *c, const dx_tls_config *cfg, char *err, size_t errlen) {
  SSL_CTX *ctx = c->ctx;
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  /* The WebSocket closing handshake already guards against truncation, and
   * many peers drop TCP without close_notify: report that as "closed". */
  SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_RENEGOTIATION);
  /* Output buffers grow and move between retries, and idle connections
   * should not hold OpenSSL's 34 KiB buffers. */
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                            SSL_MODE_RELEASE_BUFFERS);
  if (cfg->cert && readable("certificate", cfg->cert, err, errlen) < 0) return -1;
  if (cfg->key && readable("key", cfg->key, err, errlen) < 0) return -1;
  if (cfg->chain && readable("chain", cfg->chain, err, errlen) < 0) return -1;
  if (cfg->cert && SSL_CTX_use_certificate_chain_file(ctx, cfg->cert) != 1) {
    char what[64 + 256];
    snprintf(what, sizeof what, "cert %.256s", cfg->cert);
    openssl_error(what, err, errlen);
    return -1;
  }
  if (cfg->key) {
    if (SSL_CTX_use_PrivateKey_file(ctx, cfg->key, SSL_FILETYPE_PEM) != 1) {
      char what[64 + 256];
      snprintf(what, sizeof what, "key %.256s", cfg->key);
      openssl_error(what, err, errlen);
      return -1;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
      openssl_error("key does not match cert", err, errlen);
      return -1;
    }
  }
  if (cfg->chain && load_chain(ctx, cfg->chain, err, errlen) < 0) return -1;
  if (cfg->server && (!cfg->cert || !cfg->key)) {
    snprintf(err, errlen, "a server context needs cert and key");
    return -1;
  }
  if (cfg->ca) {
    if (load_ca(ctx, cfg->ca, err, errlen) < 0) return -1;
  } else if (!cfg->server && cfg->verify && SSL_CTX_set_default_verify_paths(ctx) != 1) {
    openssl_error("system CA store", err, errlen);
    return -1;
  }
  if (cfg->verify) {
    /* A server verifies client certificates only when asked, and then
     * requires one. */
    int mode = SSL_VERIFY_PEER | (cfg->server ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0);
    SSL_CTX_set_verify(ctx, mode, NULL);
  } else {
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
  }
  if (alpn_encode(c, cfg, err, errlen) < 0) return -1;
  if (c->alpn_len > 0) {
    if (cfg->server)
      SSL_CTX_set_alpn_select_cb(ctx, alpn_select, c);
    else if (SSL_CTX_set_alpn_protos(ctx, c->alpn, (unsigned)c->alpn_len) != 0) {
      openssl_error("alpn", err, errlen);
      return -1;
    }
  }
  return 0;
}

int dx_tls_ctx_init(dx_tls_ctx *c, const dx_tls_config *cfg, char *err, size_t errlen) {
  memset(c, 0, sizeof *c);
  c->server = cfg->server;
  c->verify = cfg->verify;
  ERR_clear_error();
  c->ctx = SSL_CTX_new(cfg->server ? TLS_server_method() : TLS_client_method());
  if (!c->ctx) {
    openssl_error("SSL_CTX_new", err, errlen);
    return -1;
  }
  if (ctx_setup(c, cfg, err, errlen) < 0) {
    dx_tls_ctx_free(c);
    return -1;
  }
  return 0;
}

void dx_tls_ctx_free(dx_tls_ctx *c) {
  SSL_CTX_free(c->ctx);
  c->ctx = NULL;
}

static int is_ip_literal(const char *s) {
  unsigned char buf[sizeof(struct in6_addr)];
  return inet_pton(AF_INET, s, buf) == 1 || inet_pton(AF_INET6, s, buf) == 1;
}

SSL *dx_tls_new(dx_tls_ctx *c, int fd, const char *servername, char *err, size_t errlen) {
  ERR_clear_error();
  SSL *ssl = SSL_new(c->ctx);
  if (!ssl) {
    openssl_error("SSL_new", err, errlen);
    return NULL;
  }
  if (SSL_set_fd(ssl, fd) != 1) goto fail;
  if (c->server) {
    SSL_set_accept_state(ssl);
    return ssl;
  }
  SSL_set_connect_state(ssl);
  if (!servername || !*servername) {
    /* Verifying a chain without a name proves nothing about the peer: the
     * check is switched off only by verify = false, never by a missing name. */
    if (!c->verify) return ssl;
    snprintf(err, errlen, "tls: servername needed to verify the certificate");
    SSL_free(ssl);
    return NULL;
  }
  int ip = is_ip_literal(servername);
  if (!ip && SSL_set_tlsext_host_name(ssl, servername) != 1) goto fail;
  if (c->verify) {
    X509_VERIFY_PARAM *param = SSL_get0_param(ssl);
    /* "*.example.com" matches one whole label; "b*.example.com" nothing */
    X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    int ok = ip ? X509_VERIFY_PARAM_set1_ip_asc(param, servername)
                : X509_VERIFY_PARAM_set1_host(param, servername, 0);
    if (ok != 1) goto fail;
  }
  return ssl;
fail:
  openssl_error("tls setup", err, errlen);
  SSL_free(ssl);
  return NULL;
}

/* Turn a failed SSL_* call into a DX_TLS_* code and, for errors, a reason. */
static int tls_result(SSL *ssl, int ret, char *err, size_t errlen) {
  int code = SSL_get_error(ssl, ret);
  switch (code) {
  case SSL_ERROR_WANT_READ: return DX_TLS_WANT_READ;
  case SSL_ERROR_WANT_WRITE: return DX_TLS_WANT_WRITE;
  case SSL_ERROR_ZERO_RETURN: return DX_TLS_CLOSED;
  case SSL_ERROR_SYSCALL: {
    int e = errno;
    ERR_clear_error();
    if (e == 0) return DX_TLS_CLOSED;
    char buf[128];
    snprintf(err, errlen, "%s", dx_sock_strerror(e, buf, sizeof buf));
    return DX_TLS_ERROR;
  }
  case SSL_ERROR_SSL: {
    unsigned long e = ERR_peek_last_error();
    long vr = SSL_get_verify_result(ssl);
    if (ERR_GET_REASON(e) == SSL_R_CERTIFICATE_VERIFY_FAILED && vr != X509_V_OK) {
      snprintf(err, errlen, "certificate verify failed: %s", X509_verify_cert_error_string(vr));
      ERR_clear_error();
    } else {
      openssl_error("tls", err, errlen);
    }
    return DX_TLS_ERROR;
  }
  default:
    openssl_error("tls", err, errlen);
    return DX_TLS_ERROR;
  }
}

int dx_tls_handshake(SSL *ssl, char *err, size_t errlen) {
  ERR_clear_error();
  errno = 0;
  int ret = SSL_do_handshake(ssl);
  if (ret == 1) return DX_TLS_DONE;
  int rc = tls_result(ssl, ret, err, errlen);
  if (rc == DX_TLS_CLOSED) {
    snprintf(err, errlen, "tls: connection closed during handshake");
    return DX_TLS_ERROR;
  }
  return rc;
}

int dx_tls_read(SSL *ssl, void *buf, size_t n, size_t *got, char *err, size_t errlen) {
  ERR_clear_error();
  errno = 0;
  *got = 0;
  if (SSL_read_ex(ssl, buf, n, got) == 1) return DX_TLS_DONE;
  return tls_result(ssl, 0, err, errlen);
}

int dx_tls_write(SSL *ssl, const void *buf, size_t n, size_t *put, char *err, size_t errlen) {
  ERR_clear_error();
  errno = 0;
  *put = 0;
  if (SSL_write_ex(ssl, buf, n, put) == 1) return DX_TLS_DONE;
  int rc = tls_result(ssl, 0, err, errlen);
  if (rc == DX_TLS_CLOSED) {
    snprintf(err, errlen, "closed");
    return DX_TLS_ERROR;
  }
  return rc;
}

void dx_tls_shutdown(SSL *ssl) {
  if (!SSL_is_init_finished(ssl) || (SSL_get_shutdown(ssl) & SSL_SENT_SHUTDOWN)) return;
  ERR_clear_error();
  SSL_shutdown(ssl);
  ERR_clear_error();
}

const char *dx_tls_alpn(SSL *ssl, size_t *len) {
  const unsigned char *p = NULL;
  unsigned n = 0;
  SSL_get0_alpn_selected(ssl, &p, &n);
  *len = n;
  return n ? (const char *)p : NULL;
}
