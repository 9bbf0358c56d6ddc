/*
 * dx_frame: the RFC 6455 §5.2 frame header, parsed and encoded.
 *
 * Only the wire format lives here; which frames are allowed when (control
 * frame rules, fragmentation, masking by role) is the engine's business
 * (dx_proto.c), so each rule has one home.
 */
#ifndef DX_FRAME_H
#define DX_FRAME_H

#include <stddef.h>
#include <stdint.h>

enum {
  DX_OP_CONT = 0x0,
  DX_OP_TEXT = 0x1,
  DX_OP_BINARY = 0x2,
  DX_OP_CLOSE = 0x8,
  DX_OP_PING = 0x9,
  DX_OP_PONG = 0xA
};

#define DX_RSV1 0x4
#define DX_RSV2 0x2
#define DX_RSV3 0x1

#define DX_FRAME_HEADER_MAX 14 /* 2 + 8 (64-bit length) + 4 (mask key) */
#define DX_CONTROL_MAX 125

typedef struct dx_frame_header {
  uint64_t len;
  uint8_t key[4];
  uint8_t fin;
  uint8_t rsv; /* RSV1..3 as a 3-bit value, RSV1 = 4 */
  uint8_t opcode;
  uint8_t masked;
  uint8_t size; /* bytes the header occupied on the wire */
} dx_frame_header;

#define DX_FRAME_NEED_MORE 0
#define DX_FRAME_BAD_LENGTH (-1) /* 64-bit length with the top bit set */
#define DX_FRAME_NONMINIMAL (-2) /* reserved for strict length checks */

/* Parse a header from p[0..n). Returns the header size (2..14) when p holds a
 * whole header, DX_FRAME_NEED_MORE when more bytes are needed, or a negative
 * DX_FRAME_* error. Never reads past p[n-1]. */
int dx_frame_parse(const uint8_t *p, size_t n, dx_frame_header *h);

/* Size of the header dx_frame_encode would write. */
size_t dx_frame_header_size(uint64_t len, int masked);

/* Write a header to out (at least DX_FRAME_HEADER_MAX bytes); key is NULL
 * for an unmasked frame. Returns the header size. */
size_t dx_frame_encode(uint8_t *out, int fin, int rsv, int opcode, uint64_t len,
                       const uint8_t key[4]);

static inline int dx_opcode_is_control(int op) { return (op & 0x8) != 0; }
static inline int dx_opcode_is_known(int op) {
  return op <= DX_OP_BINARY || (op >= DX_OP_CLOSE && op <= DX_OP_PONG);
}

/* RFC 6455 §7.4 and the IANA registry: may this code appear in a close frame
 * on the wire? (1000-1003, 1007-1014, 3000-4999) */
int dx_close_code_valid(unsigned code);

#endif
