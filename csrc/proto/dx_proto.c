/*
 * The RFC 6455 state machine. Reading: dx_proto_next() walks the fed bytes a
 * frame header, then a payload chunk, at a time; every rule about which
 * frame may come when is checked in check_header(), every rule about close
 * frames in on_close(). Writing: queue_frame() is the one place that frames
 * (and masks) outgoing bytes.
 */
#include "dx_proto.h"

#include <openssl/rand.h>
#include <stdlib.h>
#include <string.h>

#include "dx_mask.h"
#include "dx_utf8.h"

/* An announced frame length is trusted for preallocation up to this much,
 * or as many bytes as the message has already brought if that is more: a
 * peer that claims 16 MiB and sends nothing costs 1 MiB, not 16, and one
 * that has sent 4 MiB of them may cost 4 MiB more. Growing by what came
 * doubles the buffer, so a 16 MiB message is moved about 4 times on its way
 * in, not about 7 (measured: the moves were an eighth of a 16 MiB echo). */
#define DX_PREALLOC_MAX (1u << 20)

void dx_proto_init(dx_proto *p, const dx_config *cfg) {
  memset(p, 0, sizeof *p);
  p->cfg = *cfg;
  if (p->cfg.max_message == 0) p->cfg.max_message = DX_DEFAULT_MAX_MESSAGE;
  if (p->cfg.max_frame == 0 || p->cfg.max_frame > p->cfg.max_message)
    p->cfg.max_frame = p->cfg.max_message;
  p->state = DX_STATE_OPEN;
}

static void free_bufs(dx_proto *p) {
  dx_proto_bufs *b = p->bufs;
  if (!b) return;
  dx_buf_free(&b->msg);
  dx_buf_free(&b->ctl);
  dx_buf_free(&b->pend);
  free(b);
  p->bufs = NULL;
}

/* The buffers, made when first needed; NULL when memory runs out. */
static dx_proto_bufs *bufs(dx_proto *p) {
  if (!p->bufs) p->bufs = calloc(1, sizeof *p->bufs);
  return p->bufs;
}

static size_t msg_size(const dx_proto *p) { return p->bufs ? dx_buf_size(&p->bufs->msg) : 0; }
static size_t ctl_size(const dx_proto *p) { return p->bufs ? dx_buf_size(&p->bufs->ctl) : 0; }

void dx_proto_release(dx_proto *p) {
  dx_out_free(&p->out);
  free_bufs(p);
  if (p->pmd) dx_pmd_free(p->pmd);
  p->pmd = NULL;
  p->on_output = NULL;
  p->on_due = NULL;
  p->in = NULL;
  p->in_len = 0;
}

void dx_proto_shrink(dx_proto *p) {
  dx_out_shrink(&p->out);
  if (p->pmd) {
    dx_buf_shrink(dx_pmd_scratch(p->pmd, DX_PMD_INFLATED));
    dx_buf_shrink(dx_pmd_scratch(p->pmd, DX_PMD_DEFLATED));
  }
  dx_proto_bufs *b = p->bufs;
  if (!b) return;
  /* msg and ctl may hold a message being reassembled, or the bytes of the
   * last event */
  if (!p->release_msg) dx_buf_shrink(&b->msg);
  if (!p->release_ctl) dx_buf_shrink(&b->ctl);
  /* parsed to the end, pend holds nothing needed (its off is not kept
   * up to date while the parser reads from it) */
  if (p->in_len == 0) dx_buf_free(&b->pend);
  if (!b->msg.data && !b->ctl.data && !b->pend.data && !p->release_msg && !p->release_ctl) free_bufs(p);
}

int dx_proto_holding(const dx_proto *p) {
  if (p->pmd && (dx_pmd_scratch(p->pmd, DX_PMD_INFLATED)->data || dx_pmd_scratch(p->pmd, DX_PMD_DEFLATED)->data))
    return 1;
  return p->out.bytes.data || p->out.refs || p->bufs;
}

int dx_random(uint8_t *out, size_t n) { return RAND_bytes(out, (int)n) == 1 ? 0 : -1; }

const char *dx_proto_strerror(int err) {
  switch (err) {
  case 0: return "success";
  case DX_E_NOMEM: return "out of memory";
  case DX_E_STATE: return "connection is closing or closed";
  case DX_E_SEQUENCE: return "fragment out of sequence";
  case DX_E_ARG: return "invalid argument";
  case DX_E_OVERFLOW: return "output over its limit: the peer is not reading";
  case DX_E_UTF8: return "text message is not valid UTF-8 (send it as binary)";
  default: return "unknown error";
  }
}

/* ------------------------------------------------------------------ send */

/* The peer lets our output pile up past max_pending: the connection fails
 * here, when the byte that passes the limit is queued, not at some later
 * check; nothing more is queued or read. */
static int overflow(dx_proto *p) {
  p->overflowed = 1;
  p->failed = 1;
  p->state = DX_STATE_CLOSED;
  p->in_len = 0;
  return DX_E_OVERFLOW;
}

static int over_limit(const dx_proto *p) {
  return p->cfg.max_pending && dx_out_size(&p->out) > p->cfg.max_pending;
}

static void queued(dx_proto *p, int was_empty) {
  p->stats.frames_out++;
  if (was_empty && p->on_output) p->on_output(p->on_output_ud);
}

/* Frame and queue one payload: copied (and masked, for a client), or, with
 * ref_id set on a server's plain frame, by reference. *referenced says
 * which. */
static int queue_frame_ref(dx_proto *p, int fin, int rsv, int opcode, const uint8_t *data,
                           size_t n, uint64_t ref_id, int *referenced) {
  *referenced = 0;
  if (p->overflowed) return DX_E_OVERFLOW;
  if (over_limit(p)) return overflow(p);
  int masked = p->cfg.role == DX_ROLE_CLIENT;
  int by_ref = ref_id && !masked && n > 0;
  size_t hsize = dx_frame_header_size(n, masked);
  size_t inline_n = by_ref ? hsize : hsize + n;
  int was_empty = dx_out_size(&p->out) == 0;
  uint8_t *dst = dx_out_reserve(&p->out, inline_n);
  if (!dst) return DX_E_NOMEM;
  uint8_t key[4];
  if (masked && dx_random(key, 4) != 0) return DX_E_NOMEM;
  dx_frame_encode(dst, fin, rsv, opcode, n, masked ? key : NULL);
  if (by_ref) {
    dx_out_commit(&p->out, hsize);
    if (dx_out_ref(&p->out, data, n, ref_id)) {
      dx_out_truncate(&p->out, hsize);
      return DX_E_NOMEM;
    }
    *referenced = 1;
  } else {
    if (n) {
      if (masked) dx_mask_copy(dst + hsize, data, n, key, 0);
      else memcpy(dst + hsize, data, n);
    }
    dx_out_commit(&p->out, hsize + n);
  }
  queued(p, was_empty);
  return 0;
}

static int queue_frame(dx_proto *p, int fin, int rsv, int opcode, const uint8_t *data,
                       size_t n) {
  int referenced;
  return queue_frame_ref(p, fin, rsv, opcode, data, n, 0, &referenced);
}

int dx_proto_send(dx_proto *p, int opcode, const void *data, size_t n, int fin, int compress) {
  int referenced;
  return dx_proto_send_ref(p, opcode, data, n, fin, compress, 0, &referenced);
}

int dx_proto_send_ref(dx_proto *p, int opcode, const void *data, size_t n, int fin, int compress,
                      uint64_t ref_id, int *referenced) {
  *referenced = 0;
  if (p->overflowed) return DX_E_OVERFLOW;
  if (p->state != DX_STATE_OPEN || p->close_sent) return DX_E_STATE;
  int compressed;
  if (opcode == DX_OP_TEXT || opcode == DX_OP_BINARY) {
    if (p->send_opcode) return DX_E_SEQUENCE;
    compressed = compress && p->pmd != NULL;
  } else if (opcode == DX_OP_CONT) {
    if (!p->send_opcode) return DX_E_SEQUENCE;
    compressed = p->send_compressed;
  } else {
    return DX_E_ARG;
  }
  /* What we send as text must be UTF-8 (RFC 6455 §5.6): the peer would
   * fail the connection with 1007. Checked before anything is queued. */
  int text = opcode == DX_OP_TEXT || (opcode == DX_OP_CONT && p->send_opcode == DX_OP_TEXT);
  uint32_t utf8 = opcode == DX_OP_CONT ? p->send_utf8 : DX_UTF8_ACCEPT;
  if (text && (dx_utf8_feed(&utf8, data, n) != 0 || (fin && !dx_utf8_complete(utf8)))) return DX_E_UTF8;
  const uint8_t *payload = data;
  int rsv = 0;
  dx_buf *zout = compressed ? dx_pmd_scratch(p->pmd, DX_PMD_DEFLATED) : NULL;
  if (zout) {
    dx_buf_clear(zout);
    if (dx_pmd_deflate(p->pmd, data, n, fin, zout) != DX_PMD_OK) return DX_E_NOMEM;
    payload = dx_buf_head(zout);
    n = dx_buf_size(zout);
    if (opcode != DX_OP_CONT) rsv = DX_RSV1;
  }
  /* a compressed payload lives in the pmd's scratch: always copied */
  int rc = queue_frame_ref(p, fin, rsv, opcode, payload, n, zout ? 0 : ref_id, referenced);
  if (zout) dx_buf_consume(zout, dx_buf_size(zout));
  if (rc) return rc;
  p->send_utf8 = utf8;
  if (opcode != DX_OP_CONT) {
    p->send_opcode = opcode;
    p->send_compressed = compressed;
  }
  if (fin) {
    p->send_opcode = 0;
    p->send_compressed = 0;
    p->stats.messages_out++;
  }
  return 0;
}

static int send_control(dx_proto *p, int opcode, const void *data, size_t n) {
  if (n > DX_CONTROL_MAX) return DX_E_ARG;
  if (p->close_sent) return DX_E_STATE;
  return queue_frame(p, 1, 0, opcode, data, n);
}

int dx_proto_ping(dx_proto *p, const void *data, size_t n) {
  if (p->overflowed) return DX_E_OVERFLOW;
  if (p->state != DX_STATE_OPEN) return DX_E_STATE;
  return send_control(p, DX_OP_PING, data, n);
}

int dx_proto_pong(dx_proto *p, const void *data, size_t n) {
  if (p->overflowed) return DX_E_OVERFLOW;
  if (p->state != DX_STATE_OPEN) return DX_E_STATE;
  return send_control(p, DX_OP_PONG, data, n);
}

/* The close frame itself, whoever started the handshake. */
static int send_close_frame(dx_proto *p, unsigned code, const char *reason, size_t n) {
  uint8_t payload[DX_CONTROL_MAX];
  size_t len = 0;
  if (code) {
    payload[0] = (uint8_t)(code >> 8);
    payload[1] = (uint8_t)code;
    if (n) memcpy(payload + 2, reason, n);
    len = 2 + n;
  }
  int rc = send_control(p, DX_OP_CLOSE, payload, len);
  if (rc == 0) p->close_sent = 1;
  return rc;
}

const char *dx_close_args_error(unsigned code, const char *reason, size_t n) {
  if (code && !dx_close_code_valid(code))
    return "close code may not be sent (valid: 1000-1003, 1007-1014, 3000-4999)";
  if (code == 0 && n > 0) return "a close reason needs a close code";
  if (n > DX_CONTROL_MAX - 2) return "close reason longer than 123 bytes";
  if (n && !dx_utf8_valid((const uint8_t *)reason, n)) return "close reason is not UTF-8";
  return NULL;
}

int dx_proto_close(dx_proto *p, unsigned code, const char *reason, size_t n) {
  if (dx_close_args_error(code, reason, n)) return DX_E_ARG;
  if (p->state != DX_STATE_OPEN || p->close_sent) return DX_E_STATE;
  int rc = send_close_frame(p, code, reason, n);
  if (rc) return rc;
  p->state = DX_STATE_CLOSING;
  p->close_by_peer = 0;
  return 0;
}

int dx_proto_send_raw(dx_proto *p, const void *frame, size_t n) {
  int referenced;
  return dx_proto_send_raw_ref(p, frame, n, 0, &referenced);
}

int dx_proto_send_raw_ref(dx_proto *p, const void *frame, size_t n, uint64_t ref_id, int *referenced) {
  *referenced = 0;
  if (p->cfg.role != DX_ROLE_SERVER) return DX_E_ARG;
  if (p->overflowed) return DX_E_OVERFLOW;
  if (p->state != DX_STATE_OPEN || p->close_sent) return DX_E_STATE;
  if (p->send_opcode) return DX_E_SEQUENCE;
  if (over_limit(p)) return overflow(p);
  int was_empty = dx_out_size(&p->out) == 0;
  if (ref_id && n > 0) {
    if (dx_out_ref(&p->out, frame, n, ref_id)) return DX_E_NOMEM;
    *referenced = 1;
  } else {
    uint8_t *dst = dx_out_reserve(&p->out, n);
    if (!dst) return DX_E_NOMEM;
    if (n) memcpy(dst, frame, n);
    dx_out_commit(&p->out, n);
  }
  queued(p, was_empty);
  p->stats.messages_out++;
  return 0;
}

/* Answer a ping by ourselves. Our previous answer, when it is still waiting
 * unwritten (and not pinned by a TLS retry) at the end of out, is replaced
 * instead of followed: the peer gets one pong for the latest ping. */
static int auto_pong(dx_proto *p, const uint8_t *data, size_t n) {
  uint64_t written = p->out.total - dx_out_size(&p->out);
  if (p->pong_end && p->pong_end == p->out.total && written + p->out_pinned <= p->pong_start) {
    dx_out_truncate(&p->out, (size_t)(p->pong_end - p->pong_start));
    p->stats.frames_out--;
  }
  uint64_t start = p->out.total;
  int rc = send_control(p, DX_OP_PONG, data, n);
  if (rc == 0) {
    p->pong_start = start;
    p->pong_end = p->out.total;
  }
  return rc;
}

/* --------------------------------------------------------------- receive */

static int input_in_pend(const dx_proto *p) {
  const dx_buf *pend = p->bufs ? &p->bufs->pend : NULL;
  return pend && pend->data && p->in >= pend->data && p->in < pend->data + pend->len;
}

/* Move the unparsed input into pend (unless it is there already). */
static int keep_input(dx_proto *p) {
  if (p->in_len == 0) return 0;
  if (input_in_pend(p)) {
    p->bufs->pend.off = (size_t)(p->in - p->bufs->pend.data); /* drop the parsed prefix */
    return 0;
  }
  dx_proto_bufs *b = bufs(p);
  if (!b) return -1;
  /* pend's old bytes were used up when in moved to the caller's memory */
  dx_buf_clear(&b->pend);
  if (dx_buf_append(&b->pend, p->in, p->in_len)) return -1;
  p->in = dx_buf_head(&b->pend);
  return 0;
}

static void input_nomem(dx_proto *p) {
  p->nomem = 1;
  p->in_len = 0;
}

void dx_proto_keep(dx_proto *p) {
  if (keep_input(p)) input_nomem(p);
}

/* Append n bytes behind the unparsed input, all of it in pend. */
static void feed_pend(dx_proto *p, const uint8_t *data, size_t n) {
  dx_proto_bufs *b;
  if (keep_input(p) || !(b = bufs(p))) return input_nomem(p);
  if (p->in_len == 0) dx_buf_clear(&b->pend);
  if (dx_buf_append(&b->pend, data, n)) return input_nomem(p);
  p->in = dx_buf_head(&b->pend);
  p->in_len = dx_buf_size(&b->pend);
}

void dx_proto_feed(dx_proto *p, uint8_t *data, size_t n) {
  if (p->in_len == 0) {
    p->in = data;
    p->in_len = n;
    return;
  }
  /* The previous bytes are not used up: keep them in order, in our memory. */
  feed_pend(p, data, n);
}

void dx_proto_feed_copy(dx_proto *p, const uint8_t *data, size_t n) {
  if (n) feed_pend(p, data, n);
}

/* Report a protocol violation: queue our close frame and stop reading. */
static int fail(dx_proto *p, dx_event *ev, int code, const char *reason) {
  if (!p->close_sent) send_close_frame(p, (unsigned)code, reason, strlen(reason));
  p->failed = 1;
  p->state = DX_STATE_CLOSED;
  p->in_len = 0;
  ev->type = DX_EV_ERROR;
  ev->code = code;
  ev->data = (const uint8_t *)reason;
  ev->len = strlen(reason);
  return DX_EV_ERROR;
}

/* Our output passed max_pending while we answered the peer: reported as an
 * error with 1008, without a close frame (the peer is not reading ours). */
static int overflow_event(dx_proto *p, dx_event *ev) {
  static const char reason[] = "slow consumer: output over its limit";
  ev->type = DX_EV_ERROR;
  ev->code = DX_CLOSE_POLICY;
  ev->data = (const uint8_t *)reason;
  ev->len = sizeof reason - 1;
  return DX_EV_ERROR;
}

/* Every rule about which frame may arrive when. Returns 0 or a close code,
 * with *why set. */
static int check_header(dx_proto *p, const dx_frame_header *h, const char **why) {
  int op = h->opcode;
  if (!dx_opcode_is_known(op)) return *why = "reserved opcode", DX_CLOSE_PROTOCOL;
  if (h->rsv) {
    /* Only permessage-deflate's RSV1, only on a message's first frame. */
    int rsv1_ok = h->rsv == DX_RSV1 && p->pmd && (op == DX_OP_TEXT || op == DX_OP_BINARY);
    if (!rsv1_ok) return *why = "reserved bits set", DX_CLOSE_PROTOCOL;
  }
  if (p->cfg.role == DX_ROLE_SERVER && !h->masked)
    return *why = "client frame not masked", DX_CLOSE_PROTOCOL;
  if (p->cfg.role == DX_ROLE_CLIENT && h->masked)
    return *why = "server frame masked", DX_CLOSE_PROTOCOL;
  if (dx_opcode_is_control(op)) {
    if (!h->fin) return *why = "fragmented control frame", DX_CLOSE_PROTOCOL;
    if (h->len > DX_CONTROL_MAX) return *why = "control frame too long", DX_CLOSE_PROTOCOL;
    return 0;
  }
  if (op == DX_OP_CONT && !p->msg_opcode)
    return *why = "continuation frame without a message", DX_CLOSE_PROTOCOL;
  if (op != DX_OP_CONT && p->msg_opcode)
    return *why = "new message inside a fragmented one", DX_CLOSE_PROTOCOL;
  if (h->len > p->cfg.max_frame) return *why = "frame too big", DX_CLOSE_TOO_BIG;
  int compressed = op == DX_OP_CONT ? p->msg_compressed : (h->rsv & 4) != 0;
  uint64_t sofar = op == DX_OP_CONT ? p->msg_size : 0;
  if (!compressed && h->len > p->cfg.max_message - sofar)
    return *why = "message too big", DX_CLOSE_TOO_BIG;
  return 0;
}

/* Read a frame header from the input (possibly completing one split across
 * reads). Returns 1 when fh holds a new header, 0 when more bytes are needed,
 * or an event type when the header is bad. */
static int read_header(dx_proto *p, dx_event *ev) {
  int rc;
  if (p->hdr_len == 0) {
    rc = dx_frame_parse(p->in, p->in_len, &p->fh);
    if (rc > 0) {
      p->in += rc;
      p->in_len -= (size_t)rc;
    }
  } else {
    size_t old = p->hdr_len;
    size_t take = DX_FRAME_HEADER_MAX - old;
    if (take > p->in_len) take = p->in_len;
    memcpy(p->hdr + old, p->in, take);
    rc = dx_frame_parse(p->hdr, old + take, &p->fh);
    if (rc > 0) {
      size_t used = (size_t)rc - old;
      p->in += used;
      p->in_len -= used;
      p->hdr_len = 0;
    } else if (rc == DX_FRAME_NEED_MORE) {
      p->hdr_len = (uint8_t)(old + take);
      p->in_len = 0;
      return 0;
    }
  }
  if (rc == DX_FRAME_NEED_MORE) {
    memcpy(p->hdr, p->in, p->in_len);
    p->hdr_len = (uint8_t)p->in_len;
    p->in_len = 0;
    return 0;
  }
  if (rc < 0) return fail(p, ev, DX_CLOSE_PROTOCOL, "invalid frame length");
  const char *why = NULL;
  int code = check_header(p, &p->fh, &why);
  if (code) return fail(p, ev, code, why);
  p->in_frame = 1;
  p->fh_left = p->fh.len;
  p->mask_off = 0;
  p->stats.frames_in++;
  if (!dx_opcode_is_control(p->fh.opcode) && p->fh.opcode != DX_OP_CONT) {
    p->msg_opcode = p->fh.opcode;
    p->msg_compressed = (p->fh.rsv & 4) != 0;
    p->msg_size = 0;
    p->msg_first_out = 1;
    p->utf8 = DX_UTF8_ACCEPT;
  }
  return 1;
}

/* Take the next payload chunk of the current frame out of the input,
 * unmasked in place. */
static uint8_t *take_payload(dx_proto *p, size_t *n) {
  size_t avail = p->in_len < p->fh_left ? p->in_len : (size_t)p->fh_left;
  uint8_t *chunk = p->in;
  if (p->fh.masked && avail) p->mask_off = dx_mask(chunk, avail, p->fh.key, p->mask_off);
  p->in += avail;
  p->in_len -= avail;
  p->fh_left -= avail;
  *n = avail;
  return chunk;
}

static int on_close(dx_proto *p, dx_event *ev, const uint8_t *data, size_t n) {
  unsigned code = DX_CLOSE_NO_STATUS;
  if (n == 1) return fail(p, ev, DX_CLOSE_PROTOCOL, "close frame with a 1-byte payload");
  if (n >= 2) {
    code = ((unsigned)data[0] << 8) | data[1];
    if (!dx_close_code_valid(code)) return fail(p, ev, DX_CLOSE_PROTOCOL, "invalid close code");
    if (!dx_utf8_valid(data + 2, n - 2))
      return fail(p, ev, DX_CLOSE_INVALID_DATA, "close reason is not valid UTF-8");
  }
  if (p->state == DX_STATE_OPEN) {
    /* The peer started: echo its code (RFC 6455 §5.5.1). */
    p->close_by_peer = 1;
    send_close_frame(p, n >= 2 ? code : 0, NULL, 0);
  }
  p->state = DX_STATE_CLOSED;
  p->in_len = 0; /* nothing after a close frame is read */
  ev->type = DX_EV_CLOSE;
  ev->code = (int)code;
  ev->by_peer = p->close_by_peer;
  ev->data = n > 2 ? data + 2 : NULL;
  ev->len = n > 2 ? n - 2 : 0;
  return DX_EV_CLOSE;
}

/* A control frame's payload, once complete. */
static int on_control(dx_proto *p, dx_event *ev, const uint8_t *data, size_t n) {
  switch (p->fh.opcode) {
  case DX_OP_PING:
    if (p->cfg.auto_pong && p->state == DX_STATE_OPEN && !p->close_sent &&
        auto_pong(p, data, n) == DX_E_OVERFLOW)
      return overflow_event(p, ev);
    ev->type = DX_EV_PING;
    break;
  case DX_OP_PONG:
    ev->type = DX_EV_PONG;
    ev->latency = -1;
    if (p->timing.ping_sent) {
      dx_timing_pong(p);
      ev->latency = p->timing.latency;
    }
    break;
  default:
    return on_close(p, ev, data, n);
  }
  ev->data = data;
  ev->len = n;
  return ev->type;
}

static int read_control(dx_proto *p, dx_event *ev) {
  size_t n;
  uint8_t *chunk = take_payload(p, &n);
  if (p->fh_left == 0 && ctl_size(p) == 0) {
    p->in_frame = 0;
    return on_control(p, ev, chunk, n);
  }
  dx_proto_bufs *b = bufs(p);
  if (!b || dx_buf_append(&b->ctl, chunk, n)) return fail(p, ev, DX_CLOSE_INTERNAL, "out of memory");
  if (p->fh_left) return DX_EV_NONE;
  p->in_frame = 0;
  p->release_ctl = 1;
  return on_control(p, ev, dx_buf_head(&b->ctl), dx_buf_size(&b->ctl));
}

/* Check new message bytes against the size limit and, for text, UTF-8 (as
 * they arrive: a bad byte fails the connection at once). */
static int check_data(dx_proto *p, dx_event *ev, const uint8_t *data, size_t n, int last) {
  if (n > p->cfg.max_message - p->msg_size)
    return fail(p, ev, DX_CLOSE_TOO_BIG, "message too big");
  p->msg_size += n;
  if (p->msg_opcode == DX_OP_TEXT) {
    if (dx_utf8_feed(&p->utf8, data, n) != 0)
      return fail(p, ev, DX_CLOSE_INVALID_DATA, "invalid UTF-8 in text message");
    if (last && !dx_utf8_complete(p->utf8))
      return fail(p, ev, DX_CLOSE_INVALID_DATA, "text message ends inside a UTF-8 sequence");
  }
  return 0;
}

static int inflate_error(dx_proto *p, dx_event *ev, int rc) {
  if (rc == DX_PMD_TOOBIG) return fail(p, ev, DX_CLOSE_TOO_BIG, "message too big");
  if (rc == DX_PMD_DATA) return fail(p, ev, DX_CLOSE_INVALID_DATA, "invalid compressed data");
  return fail(p, ev, DX_CLOSE_INTERNAL, "out of memory");
}

static void message_done(dx_proto *p) {
  p->msg_opcode = 0;
  p->msg_compressed = 0;
  p->stats.messages_in++;
}

/* Streaming mode: every chunk is handed out as it comes. */
static int read_data_streaming(dx_proto *p, dx_event *ev, uint8_t *chunk, size_t n, int last) {
  const uint8_t *data = chunk;
  if (p->msg_compressed) {
    dx_buf *zin = dx_pmd_scratch(p->pmd, DX_PMD_INFLATED);
    dx_buf_clear(zin);
    int rc = dx_pmd_inflate(p->pmd, chunk, n, last, zin, p->cfg.max_message);
    if (rc) return inflate_error(p, ev, rc);
    data = dx_buf_head(zin);
    n = dx_buf_size(zin);
  }
  if (n == 0 && !last) return DX_EV_NONE;
  if (check_data(p, ev, data, n, last)) return DX_EV_ERROR;
  ev->type = DX_EV_FRAGMENT;
  ev->opcode = p->msg_opcode;
  ev->first = p->msg_first_out;
  ev->fin = last;
  ev->data = data;
  ev->len = n;
  p->msg_first_out = 0;
  if (last) message_done(p);
  return DX_EV_FRAGMENT;
}

/* Room to reserve in msg for the rest of the frame (DX_PREALLOC_MAX). */
static size_t prealloc_ahead(const dx_proto *p) {
  uint64_t trusted = p->msg_size > DX_PREALLOC_MAX ? p->msg_size : DX_PREALLOC_MAX;
  return (size_t)(p->fh_left < trusted ? p->fh_left : trusted);
}

static int read_data(dx_proto *p, dx_event *ev) {
  size_t n;
  int whole_frame = p->fh_left <= p->in_len;
  uint8_t *chunk = take_payload(p, &n);
  int frame_done = p->fh_left == 0;
  int last = frame_done && p->fh.fin;
  if (frame_done) p->in_frame = 0;
  if (p->cfg.streaming) return read_data_streaming(p, ev, chunk, n, last);

  size_t before = msg_size(p);
  if (!p->msg_compressed && last && whole_frame && before == 0) {
    /* The common case: a whole message in one frame inside this read. It
     * is handed out from the caller's buffer, without a copy. */
    if (check_data(p, ev, chunk, n, 1)) return DX_EV_ERROR;
    ev->type = DX_EV_MESSAGE;
    ev->opcode = p->msg_opcode; /* the frame may be the last continuation */
    message_done(p);
    ev->data = chunk;
    ev->len = n;
    return DX_EV_MESSAGE;
  }
  dx_proto_bufs *b = bufs(p);
  if (!b) return fail(p, ev, DX_CLOSE_INTERNAL, "out of memory");
  dx_buf *msg = &b->msg;
  if (p->msg_compressed) {
    int rc = dx_pmd_inflate(p->pmd, chunk, n, last, msg, p->cfg.max_message);
    if (rc) return inflate_error(p, ev, rc);
  } else if (msg->data && chunk == msg->data + msg->len) {
    msg->len += n; /* the host read them in place (dx_proto_read_room) */
  } else {
    size_t ahead = frame_done ? 0 : prealloc_ahead(p);
    if (n + ahead > 0) {
      if (!dx_buf_reserve(msg, n + ahead)) return fail(p, ev, DX_CLOSE_INTERNAL, "out of memory");
      memcpy(msg->data + msg->len, chunk, n);
      msg->len += n;
    }
  }
  size_t after = dx_buf_size(msg);
  if (check_data(p, ev, dx_buf_head(msg) + before, after - before, last)) return DX_EV_ERROR;
  if (!last) return DX_EV_NONE;
  int opcode = p->msg_opcode;
  message_done(p);
  p->release_msg = 1;
  ev->type = DX_EV_MESSAGE;
  ev->opcode = opcode;
  ev->data = dx_buf_head(msg);
  ev->len = after;
  return DX_EV_MESSAGE;
}

/* Whether the next input is the open frame's payload, bound for msg as it
 * is: no unparsed input before it, nothing to transform it (inflating,
 * streaming hands chunks out), no event pointing into msg. */
static int payload_bound_for_msg(const dx_proto *p) {
  return p->in_frame && p->fh_left > 0 && p->in_len == 0 && !dx_opcode_is_control(p->fh.opcode) &&
         !p->cfg.streaming && !p->msg_compressed && !p->release_msg && !p->failed && !p->nomem &&
         p->state != DX_STATE_CLOSED;
}

uint8_t *dx_proto_read_room(dx_proto *p, size_t *room) {
  *room = 0;
  if (!payload_bound_for_msg(p)) return NULL;
  size_t ahead = prealloc_ahead(p);
  dx_proto_bufs *b = bufs(p);
  uint8_t *dst = b ? dx_buf_reserve(&b->msg, ahead) : NULL;
  if (!dst) return NULL; /* the copying path reports it */
  *room = ahead;
  return dst;
}

void dx_proto_done(dx_proto *p) {
  /* The last event's bytes are done with; a message under assembly is not. */
  /* (both are set only once bufs is made) */
  if (p->release_msg) {
    dx_buf_consume(&p->bufs->msg, dx_buf_size(&p->bufs->msg));
    p->release_msg = 0;
  }
  if (p->release_ctl) {
    dx_buf_consume(&p->bufs->ctl, dx_buf_size(&p->bufs->ctl));
    p->release_ctl = 0;
  }
}

int dx_proto_next(dx_proto *p, dx_event *ev) {
  memset(ev, 0, sizeof *ev);
  dx_proto_done(p);
  if (p->nomem && !p->failed) return fail(p, ev, DX_CLOSE_INTERNAL, "out of memory");
  for (;;) {
    if (p->failed || p->state == DX_STATE_CLOSED) p->in_len = 0;
    if (p->in_len == 0 && !(p->in_frame && p->fh_left == 0)) break;
    if (!p->in_frame) {
      int rc = read_header(p, ev);
      if (rc == 0) break;
      if (rc != 1) return rc;
    }
    int type = dx_opcode_is_control(p->fh.opcode) ? read_control(p, ev) : read_data(p, ev);
    if (type != DX_EV_NONE) return type;
  }
  /* Input used up: nothing may point into the caller's buffer any more. */
  p->in_len = 0;
  if (p->bufs && dx_buf_size(&p->bufs->pend)) dx_buf_consume(&p->bufs->pend, dx_buf_size(&p->bufs->pend));
  return DX_EV_NONE;
}
