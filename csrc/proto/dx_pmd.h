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

/* Buffers an engine keeps with its compression, freed with it: the
 * inflated piece of a message being received (DX_PMD_INFLATED), the
 * compressed payload of a frame being sent (DX_PMD_DEFLATED). */
enum { DX_PMD_INFLATED, DX_PMD_DEFLATED };
dx_buf *dx_pmd_scratch(dx_pmd *z, int which);

/* Bytes of zlib state currently held (for tests and for the memory docs). */
size_t dx_pmd_memory(const dx_pmd *z);

/* --- negotiation (RFC 7692 section 7.1) ----------------------------------
 * The parameters of one permessage-deflate element of a
 * Sec-WebSocket-Extensions header: a client's offer or a server's response.
 * The window-bits fields hold DX_PMD_ABSENT, DX_PMD_NOVALUE (the parameter
 * without "=value", only valid for client_max_window_bits in an offer) or
 * the value 8..15. */
#define DX_PMD_ABSENT 0
#define DX_PMD_NOVALUE 1

typedef struct dx_pmd_offer {
  int server_no_context_takeover; /* 0/1 */
  int client_no_context_takeover; /* 0/1 */
  int server_max_window_bits;     /* DX_PMD_ABSENT, or 8..15 */
  int client_max_window_bits;     /* DX_PMD_ABSENT, DX_PMD_NOVALUE or 8..15 */
  unsigned seen;                  /* parameters added so far (duplicates) */
} dx_pmd_offer;

/* Longest header value dx_pmd_format writes, with its NUL. */
#define DX_PMD_HEADER_MAX 160

void dx_pmd_offer_init(dx_pmd_offer *o);
/* Add one parameter (value already unquoted; has_value 0 for a bare name).
 * Returns NULL, or why the element is invalid: unknown or repeated
 * parameter, a value where none is allowed, a malformed or out-of-range
 * value. An invalid offer is declined; an invalid response fails the
 * connection. */
const char *dx_pmd_offer_add(dx_pmd_offer *o, const char *name, size_t name_len,
                             const char *value, size_t value_len, int has_value);

/* Server: answer a valid offer under policy, where policy's window bits are
 * the largest window we will deflate with (server_) and the window we ask
 * the client to use when the offer lets us (client_), and its flags force
 * server_no_context_takeover and ask for client_no_context_takeover. Fills
 * the response to send and the parameters both sides will use. Returns 0,
 * or -1 when the offer cannot be accepted (the caller tries the next one). */
int dx_pmd_accept(const dx_pmd_offer *offer, const dx_pmd_params *policy,
                  dx_pmd_offer *response, dx_pmd_params *agreed);

/* Client: check a server's valid response against our offer. Returns NULL
 * and fills agreed, or why the handshake must fail. */
const char *dx_pmd_check_response(const dx_pmd_offer *response, const dx_pmd_offer *offer,
                                  dx_pmd_params *agreed);

/* Write "permessage-deflate; ..." for o into buf (DX_PMD_HEADER_MAX bytes);
 * returns its length. */
size_t dx_pmd_format(const dx_pmd_offer *o, char *buf);

#endif
