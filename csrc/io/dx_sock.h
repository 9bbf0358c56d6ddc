/*
 * dx_sock: the socket syscalls under duplex.core, without Lua.
 *
 * Every fd made here is non-blocking and close-on-exec. Functions return
 * -errno on failure so that callers never read a stale errno, and EINTR is
 * retried where a retry is always right.
 */
#ifndef DX_SOCK_H
#define DX_SOCK_H

#include <stddef.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

typedef struct dx_addr {
  struct sockaddr_storage sa;
  socklen_t len;
  int family; /* AF_INET or AF_INET6 */
} dx_addr;

#define DX_ADDR_MAX 16     /* addresses kept from one lookup */
#define DX_HOST_MAX 255    /* longest host name accepted (RFC 1035) */
#define DX_IPSTR_MAX 64    /* longest IP address text */

/* host as an IPv4 or IPv6 literal (no lookup). 0, or -1 when host is not one. */
int dx_addr_numeric(const char *host, int port, dx_addr *out);
/* Blocking getaddrinfo (TCP only; passive for listening). Fills up to
 * DX_ADDR_MAX addresses in the resolver's order. Returns the count (>= 1) or
 * -1 with err set to "name resolution failed: <reason>". */
int dx_addr_resolve(const char *host, int port, int passive, dx_addr *out, char *err, size_t errlen);
/* IP text and port of a. */
void dx_addr_text(const dx_addr *a, char ip[DX_IPSTR_MAX], int *port);
/* The local (peer = 0) or remote (peer = 1) address of fd. 0 or -errno. */
int dx_addr_of(int fd, int peer, dx_addr *out);

/* A listening socket (SO_REUSEADDR always). ipv6only: -1 leaves the system
 * default. fd or -errno. */
int dx_sock_listen(const dx_addr *a, int backlog, int reuseport, int ipv6only);
/* Start connecting to a (optionally from bind). fd or -errno; *pending is
 * set when the connection completes later (wait for EPOLLOUT, then
 * dx_sock_connect_result). */
int dx_sock_connect(const dx_addr *a, const dx_addr *bind, int *pending);
int dx_sock_connect_result(int fd); /* 0 or -errno (the SO_ERROR) */
/* accept4, non-blocking and close-on-exec, with the peer's address in
 * *peer unless NULL (what a getpeername would cost a system call for). fd
 * or -errno. */
int dx_sock_accept(int lfd, dx_addr *peer);
ssize_t dx_sock_recv(int fd, void *buf, size_t n);                 /* n or -errno */
ssize_t dx_sock_sendv(int fd, const struct iovec *iov, int iovcnt); /* n or -errno; no SIGPIPE */
int dx_sock_nodelay(int fd, int on);
/* Make close() reset the connection (RST) instead of the orderly FIN. */
int dx_sock_linger0(int fd);
/* Text for an errno, with the names the Lua API promises for the common
 * ones ("connection refused", "connection reset", "timed out"). */
const char *dx_sock_strerror(int err, char *buf, size_t n);

#endif
