#include "dx_out.h"

#include <stdlib.h>

/* Inline bytes that go before the next reference (or all of them). */
static size_t inline_run(const dx_out *o, size_t head, uint64_t done) {
  if (head < o->nrefs) return (size_t)(o->refs[head].at - done);
  return (size_t)(o->bytes_done + dx_buf_size(&o->bytes) - done);
}

uint8_t *dx_out_reserve(dx_out *o, size_t n) { return dx_buf_reserve(&o->bytes, n); }

void dx_out_commit(dx_out *o, size_t n) {
  o->bytes.len += n;
  o->total += n;
}

int dx_out_ref(dx_out *o, const uint8_t *data, size_t n, uint64_t id) {
  if (o->nrefs == o->ref_cap) {
    if (o->ref_head > 0) { /* slide the live ones down first */
      size_t live = o->nrefs - o->ref_head;
      for (size_t i = 0; i < live; i++) o->refs[i] = o->refs[o->ref_head + i];
      o->ref_head = 0;
      o->nrefs = live;
    }
    if (o->nrefs == o->ref_cap) {
      size_t cap = o->ref_cap ? o->ref_cap * 2 : 4;
      dx_outref *r = realloc(o->refs, cap * sizeof *r);
      if (!r) return -1;
      o->refs = r;
      o->ref_cap = cap;
    }
  }
  o->refs[o->nrefs++] = (dx_outref){o->bytes_done + dx_buf_size(&o->bytes), data, n, id};
  o->ref_bytes += n;
  o->total += n;
  return 0;
}

void dx_out_truncate(dx_out *o, size_t n) {
  o->bytes.len -= n;
  o->total -= n;
}

size_t dx_out_spans(const dx_out *o, dx_span *spans, size_t max) {
  size_t k = 0, head = o->ref_head, off = o->ref_off;
  uint64_t done = o->bytes_done;
  const uint8_t *p = dx_buf_head(&o->bytes);
  while (k < max) {
    size_t run = inline_run(o, head, done);
    if (run > 0) {
      spans[k++] = (dx_span){p, run};
      p += run;
      done += run;
      if (k == max) break;
    }
    if (head >= o->nrefs) break;
    const dx_outref *r = &o->refs[head++];
    spans[k++] = (dx_span){r->data + off, r->len - off};
    off = 0;
  }
  return k;
}

void dx_out_consume(dx_out *o, size_t n) {
  while (n > 0) {
    size_t run = inline_run(o, o->ref_head, o->bytes_done);
    if (run > 0) {
      size_t k = run < n ? run : n;
      dx_buf_consume(&o->bytes, k);
      o->bytes_done += k;
      n -= k;
      continue;
    }
    if (o->ref_head >= o->nrefs) break; /* more than was queued */
    dx_outref *r = &o->refs[o->ref_head];
    size_t left = r->len - o->ref_off, k = left < n ? left : n;
    o->ref_off += k;
    o->ref_bytes -= k;
    n -= k;
    if (o->ref_off == r->len) {
      o->released = r->id;
      o->ref_off = 0;
      if (++o->ref_head == o->nrefs) o->ref_head = o->nrefs = 0;
    }
  }
}

void dx_out_shrink(dx_out *o) {
  dx_buf_shrink(&o->bytes);
  if (o->nrefs == 0) {
    free(o->refs);
    o->refs = NULL;
    o->ref_cap = 0;
  }
}

void dx_out_free(dx_out *o) {
  dx_buf_free(&o->bytes);
  free(o->refs);
  o->refs = NULL;
  o->ref_head = o->nrefs = o->ref_cap = 0;
  o->ref_off = o->ref_bytes = 0;
}
