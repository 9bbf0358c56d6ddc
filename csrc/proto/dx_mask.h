/*
 * dx_mask: RFC 6455 §5.3 payload masking (XOR with a 4-byte key).
 *
 * Masking is symmetric, so the same call masks and unmasks. `offset` is the
 * position in the key (0..3) at which p[0] sits, so a payload that arrives in
 * several reads can be unmasked piece by piece. Correct for any alignment of
 * p and any length, including 0.
 */
#ifndef DX_MASK_H
#define DX_MASK_H

#include <stddef.h>
#include <stdint.h>

/* XOR p[0..n) in place; returns the key offset for the byte after p[n-1]. */
unsigned dx_mask(uint8_t *p, size_t n, const uint8_t key[4], unsigned offset);

/* dst[i] = src[i] ^ key[(offset + i) & 3]; dst and src must not overlap
 * unless dst == src. Returns the next key offset. */
unsigned dx_mask_copy(uint8_t *dst, const uint8_t *src, size_t n, const uint8_t key[4],
                      unsigned offset);

#endif
