/*
 * dx_utf8: incremental UTF-8 validation with a shift-based DFA.
 *
 * Each state is a bit offset (a multiple of 6) and each input byte has one
 * 64-bit row holding, at every state's offset, the state it moves to. A step
 * is then `s = row[byte] >> s`: one shift on the critical path instead of the
 * dependent table load of a classic state table, so multi-byte text runs
 * near one byte per cycle. While the state is ACCEPT, runs of ASCII are
 * skipped with vector compares (SSE2 / AVX2 on x86-64, NEON on arm64, 64-bit
 * words elsewhere).
 *
 * The accepted language is RFC 3629's table:
 *   00..7F | C2..DF 80..BF | E0 A0..BF 80..BF | E1..EC,EE..EF (80..BF){2}
 *   | ED 80..9F 80..BF | F0 90..BF (80..BF){2} | F1..F3 (80..BF){3}
 *   | F4 80..8F (80..BF){2}
 * so overlongs, surrogates and code points above U+10FFFF fail at the first
 * byte that rules them out.
 */
#include "dx_utf8.h"

#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DX_UTF8_X86 1
#include <immintrin.h>
#elif defined(__ARM_NEON)
#define DX_UTF8_NEON 1
#include <arm_neon.h>
#endif

enum {
  ACC = 0,  /* between code points */
  REJ = 6,  /* invalid; absorbing */
  C1 = 12,  /* one continuation byte (80..BF) left */
  C2 = 18,  /* two left */
  E0 = 24,  /* after E0: A0..BF, then one more */
  ED = 30,  /* after ED: 80..9F (no surrogates), then one more */
  F0 = 36,  /* after F0: 90..BF, then two more */
  F13 = 42, /* after F1..F3: 80..BF, then two more */
  F4 = 48   /* after F4: 80..8F (<= U+10FFFF), then two more */
};

/* The row for one byte: where each state goes on that byte. */
#define ROW(acc, c1, c2, e0, ed, f0, f13, f4)                                              \
  ((uint64_t)(acc) << ACC | (uint64_t)REJ << REJ | (uint64_t)(c1) << C1 |                 \
   (uint64_t)(c2) << C2 | (uint64_t)(e0) << E0 | (uint64_t)(ed) << ED |                   \
   (uint64_t)(f0) << F0 | (uint64_t)(f13) << F13 | (uint64_t)(f4) << F4)

/* A lead byte is only valid between code points. */
#define LEAD(to) ROW(to, REJ, REJ, REJ, REJ, REJ, REJ, REJ)

/*                        ACC  C1   C2  E0   ED   F0   F13  F4 */
#define CONT_80_8F ROW(REJ, ACC, C1, REJ, C1, REJ, C2, C2)
#define CONT_90_9F ROW(REJ, ACC, C1, REJ, C1, C2, C2, REJ)
#define CONT_A0_BF ROW(REJ, ACC, C1, C1, REJ, C2, C2, REJ)

static const uint64_t dfa[256] = {
    [0x00 ... 0x7F] = LEAD(ACC),
    [0x80 ... 0x8F] = CONT_80_8F,
    [0x90 ... 0x9F] = CONT_90_9F,
    [0xA0 ... 0xBF] = CONT_A0_BF,
    [0xC0 ... 0xC1] = LEAD(REJ),
    [0xC2 ... 0xDF] = LEAD(C1),
    [0xE0] = LEAD(E0),
    [0xE1 ... 0xEC] = LEAD(C2),
    [0xED] = LEAD(ED),
    [0xEE ... 0xEF] = LEAD(C2),
    [0xF0] = LEAD(F0),
    [0xF1 ... 0xF3] = LEAD(F13),
    [0xF4] = LEAD(F4),
    [0xF5 ... 0xFF] = LEAD(REJ),
};

/* Bytes run through the DFA between REJ checks and ASCII skips: long enough
 * to amortise both, short enough to return to the fast path soon. */
#define CHUNK 32

static int state_ok(uint32_t s) { return s <= F4 && s % 6 == 0 && s != REJ; }

/* Length of the ASCII prefix of p[0..n), 8 bytes at a time. */
static size_t ascii_words(const uint8_t *p, size_t n) {
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    uint64_t w[4];
    memcpy(w, p + i, 32);
    if ((w[0] | w[1] | w[2] | w[3]) & 0x8080808080808080u) break;
  }
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, p + i, 8);
    if (w & 0x8080808080808080u) break;
  }
  while (i < n && p[i] < 0x80) i++;
  return i;
}

/* Are the next 8 bytes ASCII? Keeps text with few ASCII runs (CJK, emoji)
 * from paying for a vector scan after every chunk. */
static inline int ascii_next8(const uint8_t *p, const uint8_t *end) {
  uint64_t w;
  if (end - p < 8) return 0;
  memcpy(&w, p, 8);
  return !(w & 0x8080808080808080u);
}

#if DX_UTF8_X86
__attribute__((target("avx2"))) static size_t ascii_avx2(const uint8_t *p, size_t n) {
  size_t i = 0;
  for (; i + 128 <= n; i += 128) {
    __m256i a = _mm256_loadu_si256((const __m256i *)(p + i));
    __m256i b = _mm256_loadu_si256((const __m256i *)(p + i + 32));
    __m256i c = _mm256_loadu_si256((const __m256i *)(p + i + 64));
    __m256i d = _mm256_loadu_si256((const __m256i *)(p + i + 96));
    __m256i any = _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d));
    if (_mm256_movemask_epi8(any)) break;
  }
  for (; i + 32 <= n; i += 32) {
    unsigned m = (unsigned)_mm256_movemask_epi8(_mm256_loadu_si256((const __m256i *)(p + i)));
    if (m) return i + (size_t)__builtin_ctz(m);
  }
  return i + ascii_words(p + i, n - i);
}

static size_t ascii_sse2(const uint8_t *p, size_t n) {
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    __m128i a = _mm_loadu_si128((const __m128i *)(p + i));
    __m128i b = _mm_loadu_si128((const __m128i *)(p + i + 16));
    __m128i c = _mm_loadu_si128((const __m128i *)(p + i + 32));
    __m128i d = _mm_loadu_si128((const __m128i *)(p + i + 48));
    if (_mm_movemask_epi8(_mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d)))) break;
  }
  for (; i + 16 <= n; i += 16) {
    unsigned m = (unsigned)_mm_movemask_epi8(_mm_loadu_si128((const __m128i *)(p + i)));
    if (m) return i + (size_t)__builtin_ctz(m);
  }
  return i + ascii_words(p + i, n - i);
}
#elif DX_UTF8_NEON
static size_t ascii_neon(const uint8_t *p, size_t n) {
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    uint8x16_t a = vld1q_u8(p + i), b = vld1q_u8(p + i + 16);
    uint8x16_t c = vld1q_u8(p + i + 32), d = vld1q_u8(p + i + 48);
    if (vmaxvq_u8(vorrq_u8(vorrq_u8(a, b), vorrq_u8(c, d))) >= 0x80) break;
  }
  for (; i + 16 <= n; i += 16)
    if (vmaxvq_u8(vld1q_u8(p + i)) >= 0x80) break;
  return i + ascii_words(p + i, n - i);
}
#endif

/* The whole loop is inlined into one copy per instruction set so the
 * AVX2 copy also gets BMI2's flag-free shift on the DFA's critical path. */
__attribute__((always_inline)) static inline int feed(uint32_t *state, const uint8_t *p,
                                                      size_t n, int wide) {
  uint64_t s = *state;
  const uint8_t *end = p + n;
  (void)wide;
  while (p < end) {
    if (s == ACC && ascii_next8(p, end)) {
#if DX_UTF8_X86
      p += wide ? ascii_avx2(p, (size_t)(end - p)) : ascii_sse2(p, (size_t)(end - p));
#elif DX_UTF8_NEON
      p += ascii_neon(p, (size_t)(end - p));
#else
      p += ascii_words(p, (size_t)(end - p));
#endif
      if (p == end) break;
    }
    size_t m = (size_t)(end - p) < CHUNK ? (size_t)(end - p) : CHUNK;
    size_t i = 0;
    for (; i + 4 <= m; i += 4) {
      s = dfa[p[i]] >> (s & 63);
      s = dfa[p[i + 1]] >> (s & 63);
      s = dfa[p[i + 2]] >> (s & 63);
      s = dfa[p[i + 3]] >> (s & 63);
    }
    for (; i < m; i++) s = dfa[p[i]] >> (s & 63);
    s &= 63;
    p += m;
    if (s == REJ) break;
  }
  *state = (uint32_t)s;
  return s == REJ ? -1 : 0;
}

#if DX_UTF8_X86
__attribute__((target("avx2,bmi2"))) static int feed_avx2(uint32_t *state, const uint8_t *p,
                                                           size_t n) {
  return feed(state, p, n, 1);
}
#endif

int dx_utf8_feed(uint32_t *state, const uint8_t *p, size_t n) {
  /* A state that did not come from here (or is REJ) must not index past
   * the row bits. */
  if (!state_ok(*state)) {
    *state = REJ;
    return -1;
  }
  if (n == 0) return 0;
#if DX_UTF8_X86
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2"))
    return feed_avx2(state, p, n);
#endif
  return feed(state, p, n, 0);
}

int dx_utf8_valid(const uint8_t *p, size_t n) {
  uint32_t s = DX_UTF8_ACCEPT;
  return dx_utf8_feed(&s, p, n) == 0 && dx_utf8_complete(s);
}
