#include "dx_out.h"

#include <stdlib.h>

/* Inline bytes that go before the next reference (or all of them). */
static size_t inline_run(const dx_out *o, size_t head, uint64_t done) {
  if (o->refs && head < o->refs->n) return (size_t)(o->refs->item[head].at - done);
  return (size_t)(o->bytes_done + dx_buf_size(&o->bytes) - done);
}

uint8_t *dx_out_reserve(dx_out *o, size_t n) { return dx_buf_reserve(&o->bytes, n); }

void dx_out_commit(dx_out *o, size_t n) {
  o->bytes.len += n;
  o->total += n;
}

/* Room for one more reference: NULL when memory runs out. */
static dx_outrefs *ref_room(dx_out *o) {
  dx_outrefs *r = o->refs;
  if (r && r->n < r->cap) return r;
  if (r && r->head > 0) { /* slide the live ones down first */
    size_t live = r->n - r->head;
    for (size_t i = 0; i < live; i++) r->item[i] = r->item[r->head + i];
    r->head = 0;
    r->n = live;
    return r;
  }
  size_t cap = r ? r->cap * 2 : 4;
  dx_outrefs *g = realloc(r, sizeof *g + cap * sizeof g->item[0]);
  if (!g) return NULL;
  if (!r) g->head = g->n = g->off = 0;
  g->cap = cap;
  return o->refs = g;
}

int dx_out_ref(dx_out *o, const uint8_t *data, size_t n, uint64_t id) {
  dx_outrefs *r = ref_room(o);
  if (!r) return -1;
  r->item[r->n++] = (dx_outref){o->bytes_done + dx_buf_size(&o->bytes), data, n, id};
  o->ref_bytes += n;
  o->total += n;
  return 0;
}

void dx_out_truncate(dx_out *o, size_t n) {
  o->bytes.len -= n;
  o->total -= n;
}

size_t dx_out_spans(const dx_out *o, dx_span *spans, size_t max) {
  const dx_outrefs *refs = o->refs;
  size_t k = 0, head = refs ? refs->head : 0, off = refs ? refs->off : 0;
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
    if (!refs || head >= refs->n) break;
    const dx_outref *r = &refs->item[head++];
    spans[k++] = (dx_span){r->data + off, r->len - off};
    off = 0;
  }
  return k;
}

void dx_out_consume(dx_out *o, size_t n) {
  dx_outrefs *refs = o->refs;
  while (n > 0) {
    size_t run = inline_run(o, refs ? refs->head : 0, o->bytes_done);
    if (run > 0) {
      size_t k = run < n ? run : n;
      dx_buf_consume(&o->bytes, k);
      o->bytes_done += k;
      n -= k;
      continue;
    }
    if (!refs || refs->head >= refs->n) break; /* more than was queued */
    dx_outref *r = &refs->item[refs->head];
    size_t left = r->len - refs->off, k = left < n ? left : n;
    refs->off += k;
    o->ref_bytes -= k;
    n -= k;
    if (refs->off == r->len) {
      o->released = r->id;
      refs->off = 0;
      if (++refs->head == refs->n) refs->head = refs->n = 0;
    }
  }
}

void dx_out_shrink(dx_out *o) {
  dx_buf_shrink(&o->bytes);
  if (o->refs && o->refs->n == 0) {
    free(o->refs);
    o->refs = NULL;
  }
}

void dx_out_free(dx_out *o) {
  dx_buf_free(&o->bytes);
  free(o->refs);
  o->refs = NULL;
  o->ref_bytes = 0;
}
