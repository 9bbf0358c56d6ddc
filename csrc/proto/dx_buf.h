/*
 * dx_buf: a growable byte buffer with a read offset.
 *
 * Used for every queue of bytes the engine keeps: a partial frame waiting for
 * the rest of its bytes, a message being reassembled, bytes waiting to be
 * written. An empty buffer owns no memory, so an idle connection costs only
 * the struct itself.
 */
#ifndef DX_BUF_H
#define DX_BUF_H

#include <stddef.h>
#include <stdint.h>

typedef struct dx_buf {
  uint8_t *data;
  size_t off; /* first unread byte */
  size_t len; /* end of data, data[off..len) is the content */
  size_t cap;
} dx_buf;

#define DX_BUF_INIT {NULL, 0, 0, 0}

/* Bytes held (not yet consumed). */
static inline size_t dx_buf_size(const dx_buf *b) { return b->len - b->off; }
/* Start of the content; "" for an empty buffer that owns no memory, so that
 * callers may do pointer arithmetic and pass it to memcpy with length 0. */
static inline uint8_t *dx_buf_head(const dx_buf *b) {
  return b->data ? b->data + b->off : (uint8_t *)"";
}

/* Make room for `extra` bytes after len; returns a pointer to that room or
 * NULL when memory runs out. Compacts consumed bytes before growing. */
uint8_t *dx_buf_reserve(dx_buf *b, size_t extra);
int dx_buf_append(dx_buf *b, const void *p, size_t n); /* 0 or -1 (ENOMEM) */
void dx_buf_consume(dx_buf *b, size_t n);              /* frees when emptied past a size */
void dx_buf_clear(dx_buf *b);                          /* keeps memory */
void dx_buf_free(dx_buf *b);                           /* releases memory */
/* Release memory held by an empty buffer (used when a connection goes idle). */
void dx_buf_shrink(dx_buf *b);

#endif
