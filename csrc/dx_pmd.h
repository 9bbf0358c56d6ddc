/*
 * dx_pmd: permessage-deflate (RFC 7692) compression for one connection.
 *
 * Negotiation (parsing offers, choosing a response, checking a server's
 * answer) and the per-message codec both live here; the engine only asks for
 * bytes in and bytes out. zlib streams are allocated on first use and, where
 * no context takeover was negotiated, released after every message, so an
 * idle connection holds no zlib state.
 */
#ifndef DX_PMD_H
#define DX_PMD_H

#include <stddef.h>
#include <stdint.h>

#include "dx_buf.h"

typedef struct dx_pmd_params {
  int server_no_context_takeover; /* 0/1 */
  int client_no_context_takeover; /* 0/1 */
  int server_max_window_bits;     /* 8..15; 15 when absent */
  int client_max_window_bits;     /* 8..15; 15 when absent */
} dx_pmd_params;

typedef struct dx_pmd_config {
  int mem_level;       /* 1..9, deflate memLevel, default 5 */
  int compress_level;  /* 0..9, default 6 */
} dx_pmd_config;

typedef struct dx_pmd dx_pmd;

#define DX_PMD_OK 0
#define DX_PMD_NOMEM (-1)
#define DX_PMD_TOOBIG (-2) /* inflated size passed the limit: close 1009 */
#define DX_PMD_DATA (-3)   /* corrupt compressed data: close 1007 */

/* role: 0 server, 1 client (decides which window bits and takeover flags
 * apply to sending and to receiving). */
dx_pmd *dx_pmd_new(int role, const dx_pmd_params *p, const dx_pmd_config *c);
void dx_pmd_free(dx_pmd *z);

/* Inflate the next piece of a compressed message and append the output to
 * out; fin marks the message's last piece (the 00 00 ff ff tail is restored
 * then). Fails with DX_PMD_TOOBIG as soon as the total output for this
 * message would pass max_out, without allocating beyond it. */
int dx_pmd_inflate(dx_pmd *z, const uint8_t *in, size_t n, int fin, dx_buf *out,
                   size_t max_out);

/* Compress the next piece of a message, appending to out; at fin the
 * trailing 00 00 ff ff is removed. */
int dx_pmd_deflate(dx_pmd *z, const uint8_t *in, size_t n, int fin, dx_buf *out);

/* Bytes of zlib state currently held (for tests and for the memory docs). */
size_t dx_pmd_memory(const dx_pmd *z);

#endif
