#define _GNU_SOURCE /* accept4, GNU strerror_r */
#include "dx_sock.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void addr_set_port(dx_addr *a, int port) {
  if (a->family == AF_INET)
    ((struct sockaddr_in *)&a->sa)->sin_port = htons((uint16_t)port);
  else
    ((struct sockaddr_in6 *)&a->sa)->sin6_port = htons((uint16_t)port);
}

int dx_addr_numeric(const char *host, int port, dx_addr *out) {
  char buf[DX_IPSTR_MAX];
  size_t n = strlen(host);
  /* "[::1]" as in URLs */
  if (n >= 2 && host[0] == '[' && host[n - 1] == ']' && n - 2 < sizeof buf) {
    memcpy(buf, host + 1, n - 2);
    buf[n - 2] = '\0';
    host = buf;
  }
  memset(out, 0, sizeof *out);
  struct sockaddr_in *v4 = (struct sockaddr_in *)&out->sa;
  struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&out->sa;
  if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    out->family = AF_INET;
    out->len = sizeof *v4;
  } else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    out->family = AF_INET6;
    out->len = sizeof *v6;
  } else {
    return -1;
  }
  addr_set_port(out, port);
  return 0;
}

int dx_addr_resolve(const char *host, int port, int passive, dx_addr *out, char *err, size_t errlen) {
  struct addrinfo hints, *res = NULL;
  char serv[16];
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_protocol = IPPROTO_TCP;
  hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
  snprintf(serv, sizeof serv, "%d", port);
  int rc = getaddrinfo(host, serv, &hints, &res);
  if (rc != 0) {
    const char *why = rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc);
    snprintf(err, errlen, "name resolution failed: %s", why);
    return -1;
  }
  int n = 0;
  for (struct addrinfo *ai = res; ai && n < DX_ADDR_MAX; ai = ai->ai_next) {
    if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6) || ai->ai_addrlen > sizeof out[n].sa)
      continue;
    memset(&out[n], 0, sizeof out[n]);
    memcpy(&out[n].sa, ai->ai_addr, ai->ai_addrlen);
    out[n].len = ai->ai_addrlen;
    out[n].family = ai->ai_family;
    n++;
  }
  freeaddrinfo(res);
  if (n == 0) {
    snprintf(err, errlen, "name resolution failed: no IPv4 or IPv6 address");
    return -1;
  }
  return n;
}

/* Dotted quad of a network-order IPv4 address. Not inet_ntop, whose
 * sprintf is most of what accepting a connection costs in user space
 * after the handshake itself (some 1,800 instructions against 100). */
static void ipv4_text(const struct in_addr *in, char *out) {
  const uint8_t *b = (const uint8_t *)&in->s_addr;
  for (int i = 0; i < 4; i++) {
    unsigned v = b[i];
    if (v >= 100) *out++ = (char)('0' + v / 100);
    if (v >= 10) *out++ = (char)('0' + v / 10 % 10);
    *out++ = (char)('0' + v % 10);
    *out++ = i < 3 ? '.' : '\0';
  }
}

void dx_addr_text(const dx_addr *a, char ip[DX_IPSTR_MAX], int *port) {
  ip[0] = '\0';
  *port = 0;
  if (a->family == AF_INET) {
    const struct sockaddr_in *v4 = (const struct sockaddr_in *)&a->sa;
    ipv4_text(&v4->sin_addr, ip);
    *port = ntohs(v4->sin_port);
  } else if (a->family == AF_INET6) {
    const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)&a->sa;
    inet_ntop(AF_INET6, &v6->sin6_addr, ip, DX_IPSTR_MAX);
    *port = ntohs(v6->sin6_port);
  }
}

int dx_addr_of(int fd, int peer, dx_addr *out) {
  memset(out, 0, sizeof *out);
  out->len = sizeof out->sa;
  int rc = peer ? getpeername(fd, (struct sockaddr *)&out->sa, &out->len)
                : getsockname(fd, (struct sockaddr *)&out->sa, &out->len);
  if (rc < 0) return -errno;
  out->family = out->sa.ss_family;
  return 0;
}

static int set_int_opt(int fd, int level, int name, int value) {
  return setsockopt(fd, level, name, &value, sizeof value) < 0 ? -errno : 0;
}

int dx_sock_listen(const dx_addr *a, int backlog, int reuseport, int ipv6only) {
  int fd = socket(a->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
  if (fd < 0) return -errno;
  int rc = set_int_opt(fd, SOL_SOCKET, SO_REUSEADDR, 1);
  if (rc == 0 && reuseport) rc = set_int_opt(fd, SOL_SOCKET, SO_REUSEPORT, 1);
  if (rc == 0 && a->family == AF_INET6 && ipv6only >= 0)
    rc = set_int_opt(fd, IPPROTO_IPV6, IPV6_V6ONLY, ipv6only);
  /* Accepted sockets inherit it (Linux copies the listener's options into
   * each one): no setsockopt per connection. */
  if (rc == 0) rc = set_int_opt(fd, IPPROTO_TCP, TCP_NODELAY, 1);
  if (rc == 0 && bind(fd, (const struct sockaddr *)&a->sa, a->len) < 0) rc = -errno;
  if (rc == 0 && listen(fd, backlog) < 0) rc = -errno;
  if (rc < 0) {
    close(fd);
    return rc;
  }
  return fd;
}

int dx_sock_connect(const dx_addr *a, const dx_addr *bind_to, int *pending) {
  *pending = 0;
  int fd = socket(a->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
  if (fd < 0) return -errno;
  int rc = 0;
  if (bind_to && bind(fd, (const struct sockaddr *)&bind_to->sa, bind_to->len) < 0) rc = -errno;
  if (rc == 0 && connect(fd, (const struct sockaddr *)&a->sa, a->len) < 0) {
    /* An interrupted connect goes on in the background, like EINPROGRESS. */
    if (errno == EINPROGRESS || errno == EINTR)
      *pending = 1;
    else
      rc = -errno;
  }
  if (rc < 0) {
    close(fd);
    return rc;
  }
  return fd;
}

int dx_sock_connect_result(int fd) {
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return -errno;
  return -err;
}

int dx_sock_accept(int lfd, dx_addr *peer) {
  for (;;) {
    if (peer) peer->len = sizeof peer->sa;
    int fd = accept4(lfd, peer ? (struct sockaddr *)&peer->sa : NULL, peer ? &peer->len : NULL,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      if (peer) peer->family = peer->sa.ss_family;
      return fd;
    }
    /* A connection reset while queued is not the listener's failure. */
    if (errno == EINTR || errno == ECONNABORTED) continue;
    return -errno;
  }
}

ssize_t dx_sock_recv(int fd, void *buf, size_t n) {
  for (;;) {
    ssize_t r = recv(fd, buf, n, 0);
    if (r >= 0) return r;
    if (errno != EINTR) return -errno;
  }
}

ssize_t dx_sock_sendv(int fd, const struct iovec *iov, int iovcnt) {
  /* one run of bytes, the usual case: send spares the kernel the message
   * header and the iovec to copy in */
  struct msghdr msg = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)iovcnt};
  for (;;) {
    ssize_t r = iovcnt == 1 ? send(fd, iov[0].iov_base, iov[0].iov_len, MSG_NOSIGNAL) : sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (r >= 0) return r;
    if (errno != EINTR) return -errno;
  }
}

int dx_sock_nodelay(int fd, int on) { return set_int_opt(fd, IPPROTO_TCP, TCP_NODELAY, on ? 1 : 0); }

int dx_sock_linger0(int fd) {
  struct linger lg = {.l_onoff = 1, .l_linger = 0};
  return setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) < 0 ? -errno : 0;
}

const char *dx_sock_strerror(int err, char *buf, size_t n) {
  if (err < 0) err = -err;
  switch (err) {
  case ECONNREFUSED: return "connection refused";
  case ECONNRESET: return "connection reset";
  case EPIPE: return "connection reset"; /* writing after the peer reset */
  case ETIMEDOUT: return "timed out";
  case ENETUNREACH: return "network unreachable";
  case EHOSTUNREACH: return "host unreachable";
  case EADDRINUSE: return "address already in use";
  case EADDRNOTAVAIL: return "address not available";
  default: break;
  }
  /* GNU strerror_r returns the text, which may not be buf */
  const char *s = strerror_r(err, buf, n);
  return s ? s : "unknown error";
}
