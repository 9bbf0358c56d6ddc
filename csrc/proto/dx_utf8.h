/*
 * dx_utf8: incremental UTF-8 validation (RFC 3629, as RFC 6455 §8.1 requires).
 *
 * The validator carries its state across calls, so a text message can be
 * checked as its bytes arrive, across reads and across fragments, and fails
 * at the first byte that cannot start or continue a valid sequence
 * (overlong forms, UTF-16 surrogates, code points above U+10FFFF, stray
 * continuation bytes, bytes C0, C1, F5..FF).
 */
#ifndef DX_UTF8_H
#define DX_UTF8_H

#include <stddef.h>
#include <stdint.h>

#define DX_UTF8_ACCEPT 0u /* state between whole code points */

/* Continue validation from *state over p[0..n). Returns 0 while the input
 * is a valid prefix (the state may be mid-sequence), -1 at the first invalid
 * byte. After -1 the state is undefined. */
int dx_utf8_feed(uint32_t *state, const uint8_t *p, size_t n);

/* A message is valid when every byte passed and no sequence is left open. */
static inline int dx_utf8_complete(uint32_t state) { return state == DX_UTF8_ACCEPT; }

/* Whole-buffer convenience: 1 if p[0..n) is valid UTF-8, else 0. */
int dx_utf8_valid(const uint8_t *p, size_t n);

#endif
