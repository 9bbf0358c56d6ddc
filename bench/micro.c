/*
 * micro: throughput of the engine's hot loops on 1 MiB buffers, next to
 * memcpy measured in the same run so the ratios hold on any machine.
 * Every figure is the best of several repetitions (the least disturbed by
 * other work on the machine).
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dx_mask.h"
#include "dx_utf8.h"
#ifndef DX_NO_FRAME
#include "dx_frame.h"
#endif

#define BUF_SIZE (1u << 20)
#define REPS 9
#define PASSES 32 /* buffer passes per repetition */

/* Keeps the compiler from dropping work whose result is otherwise unused. */
static volatile uint64_t sink;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef void (*work_fn)(void *ctx);

/* Best time of REPS runs of PASSES calls, in seconds per call. */
static double best_time(work_fn fn, void *ctx, int passes) {
  double best = 1e30;
  fn(ctx); /* warm caches and page tables */
  for (int r = 0; r < REPS; r++) {
    double t0 = now();
    for (int i = 0; i < passes; i++) fn(ctx);
    double t = (now() - t0) / passes;
    if (t < best) best = t;
  }
  return best;
}

struct bufs {
  uint8_t *a, *b;
  size_t n;
};

static void do_memcpy(void *ctx) {
  struct bufs *x = ctx;
  memcpy(x->b, x->a, x->n);
  __asm__ volatile("" ::"r"(x->b) : "memory");
}

static void do_unmask(void *ctx) {
  static const uint8_t key[4] = {0x37, 0xfa, 0x21, 0x3d};
  struct bufs *x = ctx;
  sink += dx_mask(x->a, x->n, key, 1);
  __asm__ volatile("" ::"r"(x->a) : "memory");
}

static void do_utf8(void *ctx) {
  struct bufs *x = ctx;
  uint32_t state = DX_UTF8_ACCEPT;
  if (dx_utf8_feed(&state, x->a, x->n) != 0 || state != DX_UTF8_ACCEPT) {
    fprintf(stderr, "micro: benchmark text is not valid UTF-8\n");
    exit(1);
  }
}

/* Roughly a chat log in several languages: mostly ASCII words with
 * accented Latin, CJK runs and emoji mixed in. */
static const char mixed_sample[] =
    "Hello everyone, the meeting moved to 3pm. "
    "Très bien, à tout à l'heure! Grüße aus Köln, schöne Straße. "
    "¿Dónde está la estación? Łódź, Škoda, naïve café. "
    "今日は会議が三時に変更されました。よろしくお願いします。 "
    "我们明天见，谢谢大家！ 서울에서 만나요. "
    "Great work 🎉🚀 thanks 👍😀, see you soon ❤️. "
    "Ελληνικά και русский текст тоже. ";

static size_t fill_mixed(uint8_t *p, size_t cap) {
  size_t len = sizeof mixed_sample - 1, n = 0;
  while (n + len <= cap) memcpy(p + n, mixed_sample, len), n += len;
  return n; /* whole copies only, so the text ends between code points */
}

static double gbps(size_t bytes, double secs) { return (double)bytes / secs / 1e9; }

#ifndef DX_NO_FRAME
#define NHEADERS 4096

struct headers {
  uint8_t *wire;
  size_t size;
};

/* 2, 4, 10 and 14-byte headers in turn: small unmasked, 16-bit length,
 * 64-bit length, and 64-bit length with a mask key. */
static size_t put_header(uint8_t *p, int kind) {
  switch (kind & 3) {
  case 0:
    p[0] = 0x81, p[1] = 0x05;
    return 2;
  case 1:
    p[0] = 0x82, p[1] = 126, p[2] = 0x01, p[3] = 0x00;
    return 4;
  case 2:
    p[0] = 0x02, p[1] = 127;
    memcpy(p + 2, "\0\0\0\0\0\x01\0\0", 8);
    return 10;
  default:
    p[0] = 0x80, p[1] = 0x80 | 127;
    memcpy(p + 2, "\0\0\0\0\x01\0\0\0", 8);
    memcpy(p + 10, "\x37\xfa\x21\x3d", 4);
    return 14;
  }
}

static void do_parse(void *ctx) {
  struct headers *x = ctx;
  dx_frame_header h;
  uint64_t acc = 0;
  for (size_t off = 0; off < x->size;) {
    int r = dx_frame_parse(x->wire + off, x->size - off, &h);
    if (r <= 0) {
      fprintf(stderr, "micro: dx_frame_parse returned %d\n", r);
      exit(1);
    }
    acc += h.len + h.opcode;
    off += (size_t)r;
  }
  sink += acc;
}
#endif

int main(void) {
  struct bufs x = {malloc(BUF_SIZE), malloc(BUF_SIZE), BUF_SIZE};
  if (!x.a || !x.b) return 1;
  for (size_t i = 0; i < BUF_SIZE; i++) x.a[i] = (uint8_t)(i * 7), x.b[i] = 0;

  double t_copy = best_time(do_memcpy, &x, PASSES);
  double t_mask = best_time(do_unmask, &x, PASSES);
  printf("buffer                %u KiB, best of %d\n", BUF_SIZE >> 10, REPS);
  printf("memcpy                %7.2f GB/s\n", gbps(x.n, t_copy));
  printf("unmask (in place)     %7.2f GB/s  %.2fx memcpy\n", gbps(x.n, t_mask), t_copy / t_mask);

  memset(x.a, 'a', x.n);
  double t_ascii = best_time(do_utf8, &x, PASSES);
  printf("utf8 ascii            %7.2f GB/s  %.2fx memcpy\n", gbps(x.n, t_ascii),
         t_copy / t_ascii);

  x.n = fill_mixed(x.a, BUF_SIZE);
  double t_mixed = best_time(do_utf8, &x, PASSES);
  printf("utf8 mixed text       %7.2f GB/s\n", gbps(x.n, t_mixed));

#ifndef DX_NO_FRAME
  struct headers hs = {malloc(NHEADERS * DX_FRAME_HEADER_MAX), 0};
  if (!hs.wire) return 1;
  for (int i = 0; i < NHEADERS; i++) hs.size += put_header(hs.wire + hs.size, i);
  double t_parse = best_time(do_parse, &hs, 256);
  printf("frame header parse    %7.2f ns/header (2/4/10/14-byte mix)\n", t_parse / NHEADERS * 1e9);
  free(hs.wire);
#else
  printf("frame header parse    skipped (csrc/proto/dx_frame.c not present)\n");
#endif
  free(x.a), free(x.b);
  return 0;
}
