#include "dx_frame.h"

#include <string.h>

int dx_frame_parse(const uint8_t *p, size_t n, dx_frame_header *h) {
  if (n < 2) return DX_FRAME_NEED_MORE;
  size_t need = 2;
  uint64_t len = p[1] & 0x7f;
  if (len == 126) need += 2;
  else if (len == 127) need += 8;
  int masked = (p[1] & 0x80) != 0;
  if (masked) need += 4;
  if (n < need) return DX_FRAME_NEED_MORE;

  const uint8_t *q = p + 2;
  if (len == 126) {
    len = ((uint64_t)q[0] << 8) | q[1];
    q += 2;
  } else if (len == 127) {
    /* RFC 6455 §5.2: the most significant bit MUST be 0. */
    if (q[0] & 0x80) return DX_FRAME_BAD_LENGTH;
    len = 0;
    for (int i = 0; i < 8; i++) len = (len << 8) | q[i];
    q += 8;
  }
  h->fin = (p[0] >> 7) & 1;
  h->rsv = (p[0] >> 4) & 7;
  h->opcode = p[0] & 0x0f;
  h->masked = (uint8_t)masked;
  h->len = len;
  if (masked) memcpy(h->key, q, 4);
  else memset(h->key, 0, 4);
  h->size = (uint8_t)need;
  return (int)need;
}

size_t dx_frame_header_size(uint64_t len, int masked) {
  size_t n = len < 126 ? 2 : len <= 0xffff ? 4 : 10;
  return masked ? n + 4 : n;
}

size_t dx_frame_encode(uint8_t *out, int fin, int rsv, int opcode, uint64_t len,
                       const uint8_t key[4]) {
  size_t n = 2;
  out[0] = (uint8_t)((fin ? 0x80 : 0) | ((rsv & 7) << 4) | (opcode & 0x0f));
  uint8_t maskbit = key ? 0x80 : 0;
  if (len < 126) {
    out[1] = maskbit | (uint8_t)len;
  } else if (len <= 0xffff) {
    out[1] = maskbit | 126;
    out[2] = (uint8_t)(len >> 8);
    out[3] = (uint8_t)len;
    n = 4;
  } else {
    out[1] = maskbit | 127;
    for (int i = 0; i < 8; i++) out[2 + i] = (uint8_t)(len >> (56 - 8 * i));
    n = 10;
  }
  if (key) {
    memcpy(out + n, key, 4);
    n += 4;
  }
  return n;
}

int dx_close_code_valid(unsigned code) {
  if (code >= 1000 && code <= 1003) return 1;
  if (code >= 1007 && code <= 1014) return 1;
  return code >= 3000 && code <= 4999;
}
