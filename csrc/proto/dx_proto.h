/*
 * dx_proto: the RFC 6455 connection state machine, without I/O.
 *
 * Bytes read from the peer go in with dx_proto_feed(); events come out of
 * dx_proto_next() one at a time, parsed only when asked for. A host that
 * handles each event before asking for the next (and sends its replies)
 * sees exactly the order of the wire: the replies to every message that
 * precedes a bad frame leave before the close frame that fails it. Send calls append framed
 * bytes to the engine's output buffer (p->out), which the host writes to its
 * transport whenever it likes; many sends between two writes leave in one
 * write (corking).
 *
 * The engine owns every rule of the base protocol: frame validity, masking by
 * role, fragmentation, control frames, UTF-8 of text messages, size limits and
 * the closing handshake. The host only moves bytes and decides when to drop
 * the TCP connection (after DX_EV_CLOSE or DX_EV_ERROR, or a timeout).
 */
#ifndef DX_PROTO_H
#define DX_PROTO_H

#include <stddef.h>
#include <stdint.h>

#include "dx_buf.h"
#include "dx_frame.h"
#include "dx_out.h"
#include "dx_pmd.h"
#include "dx_timing.h"

enum dx_role { DX_ROLE_SERVER = 0, DX_ROLE_CLIENT = 1 };

enum dx_state {
  DX_STATE_OPEN = 0,
  DX_STATE_CLOSING, /* we sent a close frame and wait for the peer's */
  DX_STATE_CLOSED   /* both close frames exchanged, or the connection failed */
};

enum dx_event_type {
  DX_EV_NONE = 0, /* nothing more until more bytes are fed */
  DX_EV_MESSAGE,  /* a whole text or binary message */
  DX_EV_FRAGMENT, /* streaming mode: the next piece of a message */
  DX_EV_PING,
  DX_EV_PONG,
  DX_EV_CLOSE, /* the closing handshake finished (or the peer started it) */
  DX_EV_ERROR  /* the peer broke the protocol; a close frame was queued */
};

/* Close codes the engine sends when the peer misbehaves. */
#define DX_CLOSE_NORMAL 1000
#define DX_CLOSE_GOING_AWAY 1001
#define DX_CLOSE_PROTOCOL 1002
#define DX_CLOSE_UNSUPPORTED 1003
#define DX_CLOSE_NO_STATUS 1005 /* reported, never sent */
#define DX_CLOSE_ABNORMAL 1006  /* reported, never sent */
#define DX_CLOSE_INVALID_DATA 1007
#define DX_CLOSE_POLICY 1008
#define DX_CLOSE_TOO_BIG 1009
#define DX_CLOSE_INTERNAL 1011

/* Every engine holds a copy: the flags are bytes, after the sizes. */
typedef struct dx_config {
  uint64_t max_frame;   /* largest frame payload accepted; 0 = max_message */
  uint64_t max_message; /* largest message (after inflation); default 16 MiB */
  /* Output limit: a frame queued while more than this many bytes wait in
   * out fails the connection (a peer that does not read). 0: no limit. One
   * frame may pass the limit, so out stays under max_pending + one frame. */
  uint64_t max_pending;
  uint8_t role;         /* DX_ROLE_SERVER or DX_ROLE_CLIENT */
  uint8_t streaming;    /* deliver DX_EV_FRAGMENT pieces instead of whole messages */
  uint8_t auto_pong;    /* answer pings by itself (default 1) */
} dx_config;

#define DX_DEFAULT_MAX_MESSAGE (16u << 20)

typedef struct dx_event {
  int type;          /* enum dx_event_type */
  int opcode;        /* MESSAGE, FRAGMENT: DX_OP_TEXT or DX_OP_BINARY */
  int first, fin;    /* FRAGMENT: first and last piece of its message */
  const uint8_t *data; /* payload, or close reason (UTF-8) */
  size_t len;
  int code;    /* CLOSE: the peer's code (1005 if it sent none);
                  ERROR: the code sent to the peer */
  int by_peer; /* CLOSE: 1 if the peer started the closing handshake */
  double latency; /* PONG: round trip of the ping it answers; < 0: none */
} dx_event;

/* Send errors (negative returns of the dx_proto_send* family). */
#define DX_E_NOMEM (-1)
#define DX_E_STATE (-2)    /* closing or closed: nothing more may be sent */
#define DX_E_SEQUENCE (-3) /* fragment order: CONT without a message, or a new
                              message while a fragmented one is open */
#define DX_E_ARG (-4)      /* bad opcode, control payload > 125, bad close code */
#define DX_E_OVERFLOW (-5) /* more than max_pending bytes wait in out: the
                              connection has failed (state CLOSED) */
#define DX_E_UTF8 (-6)     /* a text message (or piece) that is not UTF-8:
                              nothing was queued */

typedef struct dx_proto dx_proto;

typedef struct dx_proto_stats {
  uint64_t frames_in, frames_out, messages_in, messages_out;
} dx_proto_stats;

/* What only some input needs: a message split across reads or frames, a
 * control payload split across reads, fed bytes the engine must keep. Apart
 * from the engine, made when one of them is first needed and given back
 * when the connection goes quiet (dx_proto_shrink): an idle engine holds a
 * pointer instead of three buffers. */
typedef struct dx_proto_bufs {
  dx_buf msg;  /* reassembly of a message */
  dx_buf ctl;  /* control frame payload split across reads */
  dx_buf pend; /* fed bytes the engine owns (dx_proto_keep, or feed
                  called before next() used up the previous ones) */
} dx_proto_bufs;

struct dx_proto {
  dx_config cfg;
  /* Flags and small codes are bytes: every idle connection holds an
   * engine, and ints here cost it some 40 bytes of padding. */
  uint8_t state;
  uint8_t close_by_peer; /* who started the closing handshake */
  uint8_t close_sent;    /* a close frame is in out (or written) */
  uint8_t overflowed;    /* failed because out passed max_pending */
  dx_out out;         /* bytes to write to the peer */
  /* Bytes at the head of out that the host has handed to a write it must
   * repeat as they are (a TLS write that wants to be retried): the engine
   * never rewrites them. */
  size_t out_pinned;
  /* Called when out goes from empty to non-empty, so a host can schedule a
   * write without polling (the loop marks the socket for flushing). */
  void (*on_output)(void *ud);
  void *on_output_ud;
  /* Called (with on_output_ud) when a deadline of timing may have moved
   * earlier (we pinged, or started to close), so a host that keeps a timer
   * at dx_timing_due re-arms it. */
  void (*on_due)(void *ud);
  dx_pmd *pmd; /* permessage-deflate, when negotiated (owned) */

  /* --- receive side (private) --- */
  uint8_t *in;       /* bytes fed and not yet parsed (caller's memory) */
  size_t in_len;
  uint8_t hdr[DX_FRAME_HEADER_MAX]; /* a header split across reads */
  uint8_t hdr_len;
  dx_frame_header fh; /* the frame whose payload is arriving */
  uint64_t fh_left;   /* payload bytes of fh still to come */
  uint8_t in_frame;       /* parsing a payload (fh valid) */
  uint8_t mask_off;       /* key offset (0..3) for the next payload byte */
  uint8_t msg_opcode;     /* TEXT/BINARY of the open message, 0 when none */
  uint8_t msg_compressed; /* RSV1 set on the message's first frame */
  uint8_t msg_first_out;  /* streaming: next FRAGMENT is the first */
  /* The last event pointed into msg (a reassembled message) or into ctl (a
   * control payload split across reads): clear that one on the next call.
   * Separate flags, since a control frame may arrive in the middle of a
   * fragmented message whose assembly must go on. */
  uint8_t release_msg, release_ctl;
  uint8_t failed;         /* a protocol error was reported; input is ignored */
  uint64_t msg_size;  /* payload bytes of the open message so far */
  uint32_t utf8;      /* UTF-8 validator state for the open text message */
  uint8_t nomem;          /* keeping input failed: report it as an error */
  uint8_t pending_close_event; /* close frame parsed, event not yet delivered */
  uint16_t peer_close_code;
  dx_proto_bufs *bufs; /* made when first needed, freed when quiet */

  /* --- send side (private) --- */
  uint32_t send_utf8;      /* UTF-8 state of an open outgoing text message */
  uint8_t send_opcode;     /* opcode of an open fragmented outgoing message, or 0 */
  uint8_t send_compressed;
  dx_proto_stats stats;

  /* Everything above is touched by every small message, everything below
   * only by control frames, split frames and compression: a busy server
   * with thousands of connections reads each engine from memory, and
   * these fields kept apart cost it two cache lines fewer per message. */
  /* Our automatic pong still waiting in out, as stream positions
   * [pong_start, pong_end); pong_end == 0 when none. A ping that arrives
   * while it is unwritten and last in out replaces it (RFC 6455 §5.5.3:
   * answering only the latest ping is allowed), so a ping flood that never
   * reads its pongs costs one pong, not a queue of them. */
  uint64_t pong_start, pong_end;
  dx_timing timing; /* heartbeat and close deadlines (dx_timing.h) */
};

void dx_proto_init(dx_proto *p, const dx_config *cfg);
void dx_proto_release(dx_proto *p); /* frees buffers and the pmd */

/* Give the engine n bytes from the peer. The bytes must stay valid, and may be
 * modified (unmasked in place), until dx_proto_next() returns DX_EV_NONE;
 * whatever is left unparsed then is copied into the engine, so the host can
 * reuse one receive buffer for every connection. */
void dx_proto_feed(dx_proto *p, uint8_t *data, size_t n);

/* The host read input from the peer at now (dx_timing.h). */
static inline void dx_timing_seen(dx_proto *p, double now) { p->timing.seen = now; }

/* Next event, or DX_EV_NONE when the fed bytes are used up. Pointers in ev
 * stay valid until the next call to dx_proto_next, dx_proto_feed or
 * dx_proto_keep. */
int dx_proto_next(dx_proto *p, dx_event *ev);

/* The host is done with the last event's bytes (it copied them): a large
 * reassembled message gives its memory back now, not at the next call. */
void dx_proto_done(dx_proto *p);

/* Take a copy of the fed bytes not parsed yet, so that the host may reuse
 * its buffer while events are still to come (a host that stops asking for
 * events after the first one). Cheap when nothing or little is left. */
void dx_proto_keep(dx_proto *p);

/* Where the host may read the open frame's next payload bytes (at most
 * *room of them) so that they land where the message is reassembled: a
 * large message is then not copied out of a receive buffer. NULL when that
 * does not apply (between frames, a control frame, input still to parse,
 * streaming or compressed messages). Then hand what was read to
 * dx_proto_feed as usual; the room is valid until the next call into the
 * engine. */
uint8_t *dx_proto_read_room(dx_proto *p, size_t *room);

/* Feed bytes the engine must copy (they are unmasked in place, and the
 * caller's memory may be read-only or reused at once). */
void dx_proto_feed_copy(dx_proto *p, const uint8_t *data, size_t n);

/* Whether fed bytes wait to be parsed (dx_proto_next may have events
 * without more input). */
static inline int dx_proto_has_input(const dx_proto *p) {
  return p->in_len > 0 || (p->nomem && !p->failed);
}

/* Send a message (opcode TEXT or BINARY, fin 1), or the pieces of one: the
 * first with its opcode and fin 0, the rest with DX_OP_CONT. compress asks for
 * permessage-deflate (ignored when not negotiated); it is decided by the
 * message's first piece. Returns 0 or a DX_E_* code. */
int dx_proto_send(dx_proto *p, int opcode, const void *data, size_t n, int fin, int compress);
int dx_proto_ping(dx_proto *p, const void *data, size_t n);
int dx_proto_pong(dx_proto *p, const void *data, size_t n);
/* Start (or answer) the closing handshake. code 0 sends an empty close frame;
 * otherwise code must be valid on the wire and code+reason fit in 125 bytes. */
int dx_proto_close(dx_proto *p, unsigned code, const char *reason, size_t n);
/* The one home of what a close frame we send may carry (RFC 6455 §5.5.1,
 * §7.4): NULL when code (0: none) and reason are fine, else why not. The
 * bindings ask it before they change any state of their own. */
const char *dx_close_args_error(unsigned code, const char *reason, size_t n);
/* Queue a frame encoded elsewhere (dx_frame_encode), e.g. one broadcast frame
 * written to many connections. Server role only (clients must mask). */
int dx_proto_send_raw(dx_proto *p, const void *frame, size_t n);

/* The same two, with the payload (the frame) queued by reference under
 * ref_id when the engine can (a server's uncompressed payload): then
 * *referenced is 1 and the bytes must stay alive and unchanged until
 * p->out.released reaches ref_id. Ids must grow from call to call. */
int dx_proto_send_ref(dx_proto *p, int opcode, const void *data, size_t n, int fin, int compress,
                      uint64_t ref_id, int *referenced);
int dx_proto_send_raw_ref(dx_proto *p, const void *frame, size_t n, uint64_t ref_id, int *referenced);

/* Give back the memory of every empty buffer (for idle connections). */
void dx_proto_shrink(dx_proto *p);
/* Whether any buffer holds memory (what a shrink could give back, or what
 * is still in use). */
int dx_proto_holding(const dx_proto *p);

/* Bytes waiting in out (take them with dx_out_spans, then dx_out_consume). */
static inline size_t dx_proto_pending(const dx_proto *p) { return dx_out_size(&p->out); }

/* Human-readable text for a DX_E_* code. */
const char *dx_proto_strerror(int err);

/* Set by the host to draw masking keys (client role). Returns 0 on success.
 * Defaults to OpenSSL RAND_bytes. */
int dx_random(uint8_t *out, size_t n);

#endif
