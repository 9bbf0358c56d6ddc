/*
 * libFuzzer harness for the frame parser and the engine's receive path.
 * The first byte chooses the role, streaming mode, permessage-deflate and a
 * chunk size; the rest is fed in chunks of that size. Every event must be
 * well-formed, and feeding must never crash, leak or read out of bounds.
 */
#include <stdlib.h>
#include <string.h>

#include "dx_proto.h"

static void check_event(const dx_proto *p, const dx_event *ev) {
  switch (ev->type) {
  case DX_EV_MESSAGE:
  case DX_EV_FRAGMENT:
    if (ev->opcode != DX_OP_TEXT && ev->opcode != DX_OP_BINARY) abort();
    if (ev->len > p->cfg.max_message) abort();
    break;
  case DX_EV_PING:
  case DX_EV_PONG:
    if (ev->len > DX_CONTROL_MAX) abort();
    break;
  case DX_EV_CLOSE:
    if (ev->len > DX_CONTROL_MAX - 2) abort();
    break;
  case DX_EV_ERROR:
    if (ev->code != 1002 && ev->code != 1007 && ev->code != 1009 && ev->code != 1011) abort();
    break;
  default:
    abort();
  }
  /* touch every byte so ASan sees out-of-bounds pointers */
  volatile uint8_t sink = 0;
  for (size_t i = 0; i < ev->len; i++) sink ^= ev->data[i];
  (void)sink;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  uint8_t mode = data[0];
  data++;
  size--;
  dx_config cfg = {0};
  cfg.role = mode & 1 ? DX_ROLE_CLIENT : DX_ROLE_SERVER;
  cfg.streaming = (mode >> 1) & 1;
  cfg.auto_pong = 1;
  cfg.max_message = 1 << 16;
  dx_proto p;
  dx_proto_init(&p, &cfg);
  if ((mode >> 2) & 1) {
    dx_pmd_params params = {(mode >> 3) & 1, (mode >> 3) & 1, 15, 15};
    dx_pmd_config zc = {5, 6};
    p.pmd = dx_pmd_new(cfg.role, &params, &zc);
  }
  size_t chunk = (size_t)((mode >> 4) + 1) * ((mode >> 4) > 8 ? 97 : 1);
  /* The engine may modify fed bytes (unmasking), so give it a copy. */
  uint8_t *copy = malloc(size ? size : 1);
  memcpy(copy, data, size);
  for (size_t off = 0; off < size; off += chunk) {
    size_t n = size - off < chunk ? size - off : chunk;
    dx_proto_feed(&p, copy + off, n);
    dx_event ev;
    /* Every other chunk, take one event only before feeding again: a host
     * may feed before the last bytes are used up (dx_proto_feed keeps them). */
    if ((off / chunk) & 1) {
      if (dx_proto_next(&p, &ev) != DX_EV_NONE) check_event(&p, &ev);
      continue;
    }
    while (dx_proto_next(&p, &ev) != DX_EV_NONE) check_event(&p, &ev);
  }
  dx_event last;
  while (dx_proto_next(&p, &last) != DX_EV_NONE) check_event(&p, &last);
  if (p.state == DX_STATE_OPEN) {
    dx_proto_send(&p, DX_OP_TEXT, "x", 1, 1, 1);
    dx_proto_close(&p, 1000, "", 0);
  }
  dx_proto_release(&p);
  free(copy);
  return 0;
}
