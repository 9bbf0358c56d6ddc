/*
 * dx_mask: RFC 6455 §5.3 masking at memory speed.
 *
 * The key is rotated once so that k[0] applies to the first byte; after that
 * the pattern repeats every 4 bytes, so every block size used below (8, 16,
 * 32, 128: all multiples of 4) starts again at k[0] and the bulk loops need
 * no per-byte key index. Vector width is picked per call from the CPU's
 * features (x86-64: AVX2 when the CPU has it, else SSE2, which every x86-64
 * has; arm64: NEON), never cached in a global of ours.
 */
#include "dx_mask.h"

#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DX_MASK_X86 1
#include <immintrin.h>
#elif defined(__ARM_NEON)
#define DX_MASK_NEON 1
#include <arm_neon.h>
#endif

/* Below this size the vector set-up and the alignment head cost more than
 * they save. */
#define BULK_MIN 64

static void mask_bytes(uint8_t *dst, const uint8_t *src, size_t n, const uint8_t k[4]) {
  for (size_t i = 0; i < n; i++) dst[i] = src[i] ^ k[i & 3];
}

/* k[i] = key[(offset + i) & 3]; k may be key itself. */
static void rotate_key(uint8_t k[4], const uint8_t key[4], unsigned offset) {
  uint8_t t[4];
  memcpy(t, key, 4);
  for (unsigned i = 0; i < 4; i++) k[i] = t[(offset + i) & 3];
}

/* Word at a time; memcpy keeps unaligned access defined and compiles to
 * plain loads and stores. Returns the bytes done (a multiple of 8). */
static size_t mask_words(uint8_t *dst, const uint8_t *src, size_t n, uint32_t k32) {
  uint64_t k64 = (uint64_t)k32 << 32 | k32;
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    uint64_t w[4];
    memcpy(w, src + i, 32);
    w[0] ^= k64, w[1] ^= k64, w[2] ^= k64, w[3] ^= k64;
    memcpy(dst + i, w, 32);
  }
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, src + i, 8);
    w ^= k64;
    memcpy(dst + i, &w, 8);
  }
  return i;
}

#if DX_MASK_X86
__attribute__((target("avx2"))) static size_t mask_avx2(uint8_t *dst, const uint8_t *src,
                                                         size_t n, uint32_t k32) {
  const __m256i k = _mm256_set1_epi32((int)k32);
  size_t i = 0;
  for (; i + 128 <= n; i += 128) {
    __m256i a = _mm256_loadu_si256((const __m256i *)(src + i));
    __m256i b = _mm256_loadu_si256((const __m256i *)(src + i + 32));
    __m256i c = _mm256_loadu_si256((const __m256i *)(src + i + 64));
    __m256i d = _mm256_loadu_si256((const __m256i *)(src + i + 96));
    _mm256_storeu_si256((__m256i *)(dst + i), _mm256_xor_si256(a, k));
    _mm256_storeu_si256((__m256i *)(dst + i + 32), _mm256_xor_si256(b, k));
    _mm256_storeu_si256((__m256i *)(dst + i + 64), _mm256_xor_si256(c, k));
    _mm256_storeu_si256((__m256i *)(dst + i + 96), _mm256_xor_si256(d, k));
  }
  for (; i + 32 <= n; i += 32) {
    __m256i a = _mm256_loadu_si256((const __m256i *)(src + i));
    _mm256_storeu_si256((__m256i *)(dst + i), _mm256_xor_si256(a, k));
  }
  return i;
}

static size_t mask_sse2(uint8_t *dst, const uint8_t *src, size_t n, uint32_t k32) {
  const __m128i k = _mm_set1_epi32((int)k32);
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
    __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
    __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
    __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
    _mm_storeu_si128((__m128i *)(dst + i), _mm_xor_si128(a, k));
    _mm_storeu_si128((__m128i *)(dst + i + 16), _mm_xor_si128(b, k));
    _mm_storeu_si128((__m128i *)(dst + i + 32), _mm_xor_si128(c, k));
    _mm_storeu_si128((__m128i *)(dst + i + 48), _mm_xor_si128(d, k));
  }
  for (; i + 16 <= n; i += 16) {
    __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
    _mm_storeu_si128((__m128i *)(dst + i), _mm_xor_si128(a, k));
  }
  return i;
}

static size_t mask_vector(uint8_t *dst, const uint8_t *src, size_t n, uint32_t k32) {
  /* The feature word is filled by the compiler runtime's constructor;
   * reading it costs one load. */
  if (__builtin_cpu_supports("avx2")) return mask_avx2(dst, src, n, k32);
  return mask_sse2(dst, src, n, k32);
}
#elif DX_MASK_NEON
static size_t mask_vector(uint8_t *dst, const uint8_t *src, size_t n, uint32_t k32) {
  const uint8x16_t k = vreinterpretq_u8_u32(vdupq_n_u32(k32));
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    uint8x16_t a = vld1q_u8(src + i), b = vld1q_u8(src + i + 16);
    uint8x16_t c = vld1q_u8(src + i + 32), d = vld1q_u8(src + i + 48);
    vst1q_u8(dst + i, veorq_u8(a, k));
    vst1q_u8(dst + i + 16, veorq_u8(b, k));
    vst1q_u8(dst + i + 32, veorq_u8(c, k));
    vst1q_u8(dst + i + 48, veorq_u8(d, k));
  }
  for (; i + 16 <= n; i += 16) vst1q_u8(dst + i, veorq_u8(vld1q_u8(src + i), k));
  return i;
}
#else
static size_t mask_vector(uint8_t *dst, const uint8_t *src, size_t n, uint32_t k32) {
  return mask_words(dst, src, n, k32);
}
#endif

unsigned dx_mask_copy(uint8_t *dst, const uint8_t *src, size_t n, const uint8_t key[4],
                      unsigned offset) {
  unsigned next = (unsigned)((offset + n) & 3);
  uint8_t k[4];
  rotate_key(k, key, offset & 3);
  if (n >= BULK_MIN) {
    /* Aligned stores avoid split cache lines; the head shifts the key. */
    size_t head = (size_t)(-(uintptr_t)dst & 31);
    mask_bytes(dst, src, head, k);
    rotate_key(k, k, (unsigned)(head & 3));
    dst += head, src += head, n -= head;

    uint32_t k32;
    memcpy(&k32, k, 4);
    size_t done = mask_vector(dst, src, n, k32);
    done += mask_words(dst + done, src + done, n - done, k32);
    dst += done, src += done, n -= done;
  } else if (n >= 8) {
    /* small frames (the common chat message): words, no vector set-up */
    uint32_t k32;
    memcpy(&k32, k, 4);
    size_t done = mask_words(dst, src, n, k32);
    dst += done, src += done, n -= done;
  }
  mask_bytes(dst, src, n, k);
  return next;
}

unsigned dx_mask(uint8_t *p, size_t n, const uint8_t key[4], unsigned offset) {
  return dx_mask_copy(p, p, n, key, offset);
}
