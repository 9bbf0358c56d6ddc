/*
 * fuzz_inflate: arbitrary compressed message pieces into a dx_pmd.
 *
 * Input: two configuration bytes, then pieces, each a header byte (low 7
 * bits: length, top bit: last piece of its message) and that many bytes.
 *   byte 0: server window bits (8 + bits 0-2), client window bits (8 + bits
 *           3-5), server_no_context_takeover (bit 6), client_ (bit 7)
 *   byte 1: role (bit 0), mem_level (1 + bits 1-3), compress level (bits 4-7)
 *
 * Whatever inflates is compressed again by a peer codec and checked twice:
 * by a second dx_pmd, and by a strict zlib reference inflating with exactly
 * the negotiated window and one output byte per call, so a distance beyond
 * that window (e.g. from the 8-bit window workaround) is caught.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "dx_pmd.h"

#define MAX_OUT 4096

typedef struct checker {
  dx_pmd *peer;  /* compresses what the fuzzed codec produced */
  dx_pmd *again; /* inflates that with our codec */
  z_stream ref;  /* and with zlib, strictly */
  int ref_live;
} checker;

static void checker_open(checker *k, int role, const dx_pmd_params *p, const dx_pmd_config *c,
                         int peer_bits) {
  k->peer = dx_pmd_new(!role, p, c);
  k->again = dx_pmd_new(role, p, c);
  memset(&k->ref, 0, sizeof k->ref);
  int rc = inflateInit2(&k->ref, -peer_bits);
  if (rc != Z_OK) rc = inflateInit2(&k->ref, -9); /* zlib without 8-bit raw windows */
  k->ref_live = rc == Z_OK;
  if (!k->peer || !k->again || !k->ref_live) abort();
}

static void checker_close(checker *k) {
  dx_pmd_free(k->peer);
  dx_pmd_free(k->again);
  if (k->ref_live) inflateEnd(&k->ref);
  k->ref_live = 0;
}

/* Inflate in with the reference, one output byte at a time, comparing. */
static void ref_inflate(checker *k, const uint8_t *in, size_t n, const uint8_t *want, size_t want_n,
                        size_t *at) {
  z_stream *s = &k->ref;
  s->next_in = (Bytef *)(uintptr_t)in;
  s->avail_in = (uInt)n;
  for (;;) {
    uint8_t b;
    s->next_out = &b;
    s->avail_out = 1;
    int rc = inflate(s, Z_SYNC_FLUSH);
    if (rc != Z_OK && rc != Z_BUF_ERROR) {
      fprintf(stderr, "reference inflate: %d %s\n", rc, s->msg ? s->msg : "");
      abort();
    }
    if (s->avail_out == 0) {
      if (*at >= want_n || want[*at] != b) abort();
      ++*at;
    } else if (s->avail_in == 0) {
      return;
    }
  }
}

static void check_piece(checker *k, const uint8_t *data, size_t n, int fin) {
  static const uint8_t tail[4] = {0, 0, 0xff, 0xff};
  dx_buf z = DX_BUF_INIT, back = DX_BUF_INIT;
  if (dx_pmd_deflate(k->peer, data, n, fin, &z) != DX_PMD_OK) abort();
  if (dx_pmd_inflate(k->again, dx_buf_head(&z), dx_buf_size(&z), fin, &back, MAX_OUT) != DX_PMD_OK)
    abort();
  if (dx_buf_size(&back) != n || (n && memcmp(dx_buf_head(&back), data, n) != 0)) abort();
  size_t at = 0;
  ref_inflate(k, dx_buf_head(&z), dx_buf_size(&z), data, n, &at);
  if (fin) ref_inflate(k, tail, 4, data, n, &at);
  if (at != n) abort();
  dx_buf_free(&z);
  dx_buf_free(&back);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2) return 0;
  dx_pmd_params p;
  p.server_max_window_bits = 8 + (data[0] & 7);
  p.client_max_window_bits = 8 + ((data[0] >> 3) & 7);
  p.server_no_context_takeover = (data[0] >> 6) & 1;
  p.client_no_context_takeover = (data[0] >> 7) & 1;
  int role = data[1] & 1;
  dx_pmd_config c = {1 + ((data[1] >> 1) & 7), (data[1] >> 4) % 10};
  int peer_bits = role == 0 ? p.client_max_window_bits : p.server_max_window_bits;
  int rx_reset = role == 0 ? p.client_no_context_takeover : p.server_no_context_takeover;
  data += 2;
  size -= 2;

  dx_pmd *z = dx_pmd_new(role, &p, &c);
  if (!z) abort();
  checker k;
  checker_open(&k, role, &p, &c, peer_bits);
  dx_buf out = DX_BUF_INIT;
  while (size > 0) {
    size_t n = data[0] & 0x7f;
    int fin = data[0] >> 7;
    data++, size--;
    if (n > size) n = size;
    dx_buf_clear(&out);
    int rc = dx_pmd_inflate(z, data, n, fin, &out, MAX_OUT);
    if (rc == DX_PMD_OK) {
      check_piece(&k, dx_buf_head(&out), dx_buf_size(&out), fin);
      if (fin && rx_reset && dx_pmd_memory(z) != 0) abort(); /* idle holds nothing */
    } else {
      if (rc != DX_PMD_TOOBIG && rc != DX_PMD_DATA) abort();
      if (dx_pmd_memory(z) != 0) abort(); /* a failed message frees the inflater */
      /* The message was abandoned; start the checkers afresh. */
      checker_close(&k);
      checker_open(&k, role, &p, &c, peer_bits);
    }
    data += n;
    size -= n;
  }
  dx_buf_free(&out);
  checker_close(&k);
  dx_pmd_free(z);
  return 0;
}
