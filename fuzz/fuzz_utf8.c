/*
 * libFuzzer harness for the two hot loops: dx_utf8_feed over arbitrary
 * chunkings against a plain code-point decoder, and dx_mask / dx_mask_copy
 * at every key offset and several alignments against a byte loop.
 *
 * Input layout: in[0] & 7 = c, the number of chunk-length bytes that follow
 * (in[1..c], used cyclically, 0 = an empty feed); the rest is the payload.
 * The payload's first 4 bytes (when present) are also the mask key.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dx_mask.h"
#include "dx_utf8.h"
#include "fuzz_check.h"

enum { REF_COMPLETE, REF_OPEN, REF_INVALID };


/* Is there any scalar value in [lo, hi] that a sequence of this length may
 * encode (not overlong, not a surrogate, at most U+10FFFF)? */
static int ref_range_ok(uint32_t lo, uint32_t hi, int len) {
  static const uint32_t min_for_len[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (lo < min_for_len[len]) lo = min_for_len[len];
  if (hi > 0x10FFFF) hi = 0x10FFFF;
  if (lo > hi) return 0;
  return !(lo >= 0xD800 && hi <= 0xDFFF);
}

/* Classify p[0..n) by decoding it code point by code point. A sequence cut
 * off by the end of input is OPEN when some continuation would complete it
 * into a valid scalar value. */
static int ref_classify(const uint8_t *p, size_t n) {
  size_t i = 0;
  while (i < n) {
    uint8_t b = p[i];
    int len;
    uint32_t cp;
    if (b < 0x80) { i++; continue; }
    if (b >= 0xC0 && b < 0xE0) len = 2, cp = b & 0x1F;
    else if (b >= 0xE0 && b < 0xF0) len = 3, cp = b & 0x0F;
    else if (b >= 0xF0 && b < 0xF8) len = 4, cp = b & 0x07;
    else return REF_INVALID; /* continuation without a lead, or F8..FF */
    int have = 1;
    while (have < len && i + (size_t)have < n) {
      uint8_t c = p[i + (size_t)have];
      if ((c & 0xC0) != 0x80) return REF_INVALID;
      cp = cp << 6 | (c & 0x3F);
      have++;
    }
    int missing = len - have;
    uint32_t lo = cp << (6 * missing), hi = lo | ((1u << (6 * missing)) - 1);
    /* Checked before the end of input too: a prefix that cannot complete is
     * invalid even when the bytes after it would be fine. */
    if (!ref_range_ok(lo, hi, len)) return REF_INVALID;
    if (missing) return REF_OPEN;
    i += (size_t)len;
  }
  return REF_COMPLETE;
}

/* Prefix checks are quadratic; long inputs get them only where it matters. */
#define EVERY_BOUNDARY_MAX 1024

static void check_utf8(const uint8_t *data, size_t n, const uint8_t *lens, size_t nlens) {
  uint32_t state = DX_UTF8_ACCEPT;
  size_t pos = 0, k = 0, zeros = 0;
  int failed = 0;
  CHECK(dx_utf8_valid(data, n) == (ref_classify(data, n) == REF_COMPLETE));
  while (pos < n && !failed) {
    size_t len = nlens ? lens[k++ % nlens] : n - pos;
    if (len > n - pos) len = n - pos;
    zeros = len ? 0 : zeros + 1;
    if (zeros > nlens) len = 1; /* every length is zero: still move on */
    /* Exact-size copy so ASan sees any read past the chunk. */
    uint8_t *chunk = malloc(len ? len : 1);
    CHECK(chunk != NULL);
    memcpy(chunk, data + pos, len);
    failed = dx_utf8_feed(&state, chunk, len) != 0;
    free(chunk);
    if (failed) CHECK(ref_classify(data, pos) != REF_INVALID);
    pos += len;
    if (n <= EVERY_BOUNDARY_MAX || failed || pos == n) {
      int ref = ref_classify(data, pos);
      CHECK(failed == (ref == REF_INVALID));
      if (!failed) CHECK(dx_utf8_complete(state) == (ref == REF_COMPLETE));
    }
  }
  if (failed) CHECK(dx_utf8_feed(&state, (const uint8_t *)"a", 1) != 0); /* it sticks */
}

static void ref_mask(uint8_t *p, size_t n, const uint8_t key[4], unsigned off) {
  for (size_t i = 0; i < n; i++) p[i] ^= key[(off + i) % 4];
}

static void check_mask(const uint8_t *data, size_t n) {
  uint8_t key[4] = {0xA5, 0x5A, 0x3C, 0xC3};
  if (n >= 4) memcpy(key, data, 4);
  uint8_t *want = malloc(n + 1), *src = malloc(n + 33), *dst = malloc(n + 33);
  CHECK(want && src && dst);
  for (unsigned off = 0; off < 4; off++) {
    memcpy(want, data, n);
    ref_mask(want, n, key, off);
    unsigned next = (off + (unsigned)(n % 4)) % 4;
    for (size_t align = 0; align < 33; align += off + 7) {
      memcpy(src + align, data, n);
      CHECK(dx_mask_copy(dst + (32 - align), src + align, n, key, off) == next);
      CHECK(memcmp(dst + (32 - align), want, n) == 0);
      CHECK(dx_mask(src + align, n, key, off) == next);
      CHECK(memcmp(src + align, want, n) == 0);
    }
    /* Exact-size buffer so ASan sees any access past the end. */
    uint8_t *exact = malloc(n ? n : 1);
    CHECK(exact != NULL);
    memcpy(exact, data, n);
    CHECK(dx_mask(exact, n, key, off) == next);
    CHECK(memcmp(exact, want, n) == 0);
    free(exact);
    /* Piecewise, carrying the returned offset: how frames arrive. */
    memcpy(src, data, n);
    unsigned o = off;
    for (size_t pos = 0, step = 1; pos < n; pos += step, step = step * 3 + 1) {
      size_t len = step < n - pos ? step : n - pos;
      o = dx_mask(src + pos, len, key, o);
    }
    CHECK(o == next);
    CHECK(memcmp(src, want, n) == 0);
  }
  free(want), free(src), free(dst);
}

int LLVMFuzzerTestOneInput(const uint8_t *in, size_t size) {
  if (size == 0) return 0;
  size_t nlens = in[0] & 7;
  if (nlens > size - 1) nlens = size - 1;
  const uint8_t *lens = in + 1;
  const uint8_t *data = in + 1 + nlens;
  size_t n = size - 1 - nlens;
  check_utf8(data, n, lens, nlens);
  check_mask(data, n);
  return 0;
}
