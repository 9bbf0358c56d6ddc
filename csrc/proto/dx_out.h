/*
 * dx_out: an engine's output queue, in the order it goes on the wire.
 *
 * Most bytes are copied in (frame headers, small payloads, masked client
 * frames). A large payload may instead be queued by reference: the queue
 * keeps a pointer to bytes the host owns, and the host keeps them alive and
 * unchanged until the queue reports them written (`released`, the id of the
 * last reference written; ids grow). A megabyte echo or one broadcast frame
 * shared by thousands of connections then costs no copy per connection.
 *
 * Writers take the queued bytes as spans (for writev, or one at a time for
 * TLS) and consume what the transport took.
 */
#ifndef DX_OUT_H
#define DX_OUT_H

#include <stddef.h>
#include <stdint.h>

#include "dx_buf.h"

typedef struct dx_span {
  const uint8_t *p;
  size_t n;
} dx_span;

typedef struct dx_outref {
  uint64_t at; /* inline bytes queued before it */
  const uint8_t *data;
  size_t len;
  uint64_t id;
} dx_outref;

/* The references not written yet, item[head, n): made with the first one
 * and given back once they are all written and the queue shrinks, so that
 * an engine that never queues one holds a pointer, not the bookkeeping. */
typedef struct dx_outrefs {
  size_t head, n, cap;
  size_t off; /* bytes of item[head] written */
  dx_outref item[];
} dx_outrefs;

typedef struct dx_out {
  dx_buf bytes;        /* the copied (inline) bytes not written yet */
  uint64_t bytes_done; /* inline bytes written so far */
  dx_outrefs *refs;    /* NULL until a reference is queued */
  size_t ref_bytes;    /* unwritten bytes of every reference */
  uint64_t released;   /* id of the last reference written, 0 before */
  uint64_t total;      /* bytes ever queued */
} dx_out;

/* Bytes queued and not written. */
static inline size_t dx_out_size(const dx_out *o) { return dx_buf_size(&o->bytes) + o->ref_bytes; }

/* Room for n inline bytes at the end (NULL when memory runs out); then
 * dx_out_commit(o, n) once they are written there. */
uint8_t *dx_out_reserve(dx_out *o, size_t n);
void dx_out_commit(dx_out *o, size_t n);
/* Queue n bytes by reference under id (> every earlier id). 0 or -1. */
int dx_out_ref(dx_out *o, const uint8_t *data, size_t n, uint64_t id);
/* Drop the last n inline bytes (nothing may have been queued after them). */
void dx_out_truncate(dx_out *o, size_t n);

/* Up to max spans of what is queued, in order; returns how many. */
size_t dx_out_spans(const dx_out *o, dx_span *spans, size_t max);
/* The transport took n bytes from the front. */
void dx_out_consume(dx_out *o, size_t n);

/* Memory back: of an empty queue (idle connection), or all of it. */
void dx_out_shrink(dx_out *o);
void dx_out_free(dx_out *o);

#endif
