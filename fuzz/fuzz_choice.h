/* The choices of a differential harness: taken from the fuzzer's input
 * while it lasts, then from a PRNG seeded by it, so that a short input
 * still makes a whole scenario. */
#ifndef DX_FUZZ_CHOICE_H
#define DX_FUZZ_CHOICE_H

#include <stddef.h>
#include <stdint.h>

typedef struct src {
  const uint8_t *p;
  size_t n;
  uint64_t rng;
} src;

/* xorshift64 */
static inline uint64_t rng_next(uint64_t *s) {
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

/* src over the input, its PRNG seeded from seed and the first bytes. */
static inline src src_of(const uint8_t *data, size_t size, uint64_t seed) {
  src s = {data, size, seed};
  for (size_t i = 0; i < size && i < 16; i++) s.rng = (s.rng ^ data[i]) * 0x100000001b3u;
  if (!s.rng) s.rng = 1;
  return s;
}

/* A choice in [0, bound). */
static inline unsigned pick(src *s, unsigned bound) {
  if (bound <= 1) return 0;
  uint32_t v;
  if (s->n >= 2) {
    v = (uint32_t)s->p[0] | (uint32_t)s->p[1] << 8;
    s->p += 2;
    s->n -= 2;
    if (bound > 65536) v = v << 16 | (uint32_t)(rng_next(&s->rng) & 0xffff);
  } else {
    v = (uint32_t)rng_next(&s->rng);
  }
  return v % bound;
}

#endif
