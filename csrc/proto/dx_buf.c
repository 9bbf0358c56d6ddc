#include "dx_buf.h"

#include <stdlib.h>
#include <string.h>

/* An emptied buffer up to this size keeps its memory for the next message:
 * freeing and reallocating it per message costs page faults on every one
 * (measured: a sixth of a 64 KiB echo). Larger ones give it back at once so
 * that one huge message does not pin megabytes; what is kept is released
 * when the connection goes idle (dx_proto_shrink). */
#define DX_BUF_KEEP (256u << 10)

uint8_t *dx_buf_reserve(dx_buf *b, size_t extra) {
  if (b->cap - b->len >= extra) return b->data + b->len;
  size_t used = b->len - b->off;
  if (b->off > 0 && b->cap - used >= extra) {
    memmove(b->data, b->data + b->off, used);
    b->off = 0;
    b->len = used;
    return b->data + b->len;
  }
  if (extra > SIZE_MAX / 2 - used) return NULL;
  size_t need = used + extra, cap = b->cap ? b->cap : 256;
  while (cap < need) cap *= 2;
  /* Doubling keeps many small appends linear; for large buffers (a queued
   * megabyte echo, a reassembled message) it would also leave up to half of
   * the block unused on every connection: grow by a quarter past the need
   * at most, which still amortizes. */
  if (need >= DX_BUF_KEEP && cap - need > need / 4) cap = need + need / 4;
  uint8_t *p;
  if (b->off == 0) {
    p = realloc(b->data, cap);
    if (!p) return NULL;
  } else {
    p = malloc(cap);
    if (!p) return NULL;
    if (used) memcpy(p, b->data + b->off, used);
    free(b->data);
  }
  b->data = p;
  b->cap = cap;
  b->off = 0;
  b->len = used;
  return b->data + b->len;
}

int dx_buf_append(dx_buf *b, const void *p, size_t n) {
  if (n == 0) return 0;
  uint8_t *dst = dx_buf_reserve(b, n);
  if (!dst) return -1;
  memcpy(dst, p, n);
  b->len += n;
  return 0;
}

void dx_buf_consume(dx_buf *b, size_t n) {
  b->off += n;
  if (b->off >= b->len) {
    b->off = b->len = 0;
    if (b->cap > DX_BUF_KEEP) dx_buf_free(b);
  }
}

void dx_buf_clear(dx_buf *b) { b->off = b->len = 0; }

void dx_buf_free(dx_buf *b) {
  free(b->data);
  b->data = NULL;
  b->off = b->len = b->cap = 0;
}

void dx_buf_shrink(dx_buf *b) {
  if (b->off == b->len) dx_buf_free(b);
}
