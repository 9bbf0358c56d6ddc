/*
 * Differential test of the engine with a content oracle: what one engine
 * sends, the other must deliver unchanged, however the bytes are cut.
 *
 * The input chooses everything: which role sends, permessage-deflate (off,
 * on with or without context takeover, window bits 8..15), streaming or
 * whole-message delivery, a list of messages (text of random UTF-8 or
 * binary, 0 B .. 1 MiB, fragmented at random points, with pings and pongs
 * between the fragments), a close code and reason, and how the wire bytes
 * are cut into reads (1 byte .. 64 KiB, so cuts fall inside headers, masks,
 * control payloads and deflate tails). Bytes are fed through one scratch
 * buffer that is scribbled over after every read, as a host that shares one
 * receive buffer between connections would; some reads take one event and
 * then dx_proto_keep() instead of draining; some reads go straight into the
 * engine's message buffer (dx_proto_read_room), as a socket's do.
 *
 * The receiver's events, in order, must be exactly the sender's messages
 * (kind and bytes), pings and pongs, then the close with its code and
 * reason; no error. Its replies (pongs, the close echo) go back the same
 * way: each pong answers one of the pings, in order (answering only the
 * latest of several is allowed), and the close comes back with our code.
 *
 * When the input runs out, choices come from a PRNG seeded by it, so a short
 * input still makes a full scenario; fuzz/roundtrip_seeds.c runs fixed
 * seeds outside libFuzzer (spec/roundtrip_spec.lua).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dx_proto.h"
#include "fuzz_choice.h"

#define MAX_MSGS 12
#define MAX_ITEMS 256
#define BIG (1u << 20)

#define CHECK(cond, ...)                                                                           \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fprintf(stderr, "roundtrip: " __VA_ARGS__);                                                  \
      fprintf(stderr, " (%s:%d)\n", __FILE__, __LINE__);                                           \
      abort();                                                                                     \
    }                                                                                              \
  } while (0)

/* What the receiver must see, in order. */
enum { IT_MSG, IT_PING, IT_PONG };
typedef struct item {
  int type;
  int msg;        /* IT_MSG: index into msgs */
  uint8_t ctl[DX_CONTROL_MAX];
  size_t ctl_len; /* IT_PING, IT_PONG */
} item;

typedef struct msg {
  int opcode;
  uint8_t *data;
  size_t len;
} msg;

typedef struct scenario {
  msg msgs[MAX_MSGS];
  int nmsgs;
  item items[MAX_ITEMS];
  int nitems;
  unsigned close_code;
  char reason[DX_CONTROL_MAX];
  size_t reason_len;
  uint64_t last_ref; /* payloads the sender queued by reference */
} scenario;

/* Random UTF-8 of about n bytes (whole code points, no surrogates). */
static size_t fill_utf8(uint8_t *out, size_t n, uint64_t *rng) {
  size_t i = 0;
  while (i < n) {
    uint64_t r = rng_next(rng);
    unsigned width = 1 + (unsigned)(r % 8 < 5 ? 0 : r % 4);
    if (i + width > n) width = 1;
    uint32_t cp;
    switch (width) {
    case 1: cp = (uint32_t)(r >> 8) % 0x80; break;
    case 2: cp = 0x80 + (uint32_t)(r >> 8) % (0x800 - 0x80); break;
    case 3:
      cp = 0x800 + (uint32_t)(r >> 8) % (0x10000 - 0x800);
      if (cp >= 0xd800 && cp <= 0xdfff) cp -= 0x800;
      break;
    default: cp = 0x10000 + (uint32_t)(r >> 8) % (0x110000 - 0x10000); break;
    }
    if (width == 1) out[i++] = (uint8_t)cp;
    else if (width == 2) {
      out[i++] = (uint8_t)(0xc0 | cp >> 6);
      out[i++] = (uint8_t)(0x80 | (cp & 0x3f));
    } else if (width == 3) {
      out[i++] = (uint8_t)(0xe0 | cp >> 12);
      out[i++] = (uint8_t)(0x80 | ((cp >> 6) & 0x3f));
      out[i++] = (uint8_t)(0x80 | (cp & 0x3f));
    } else {
      out[i++] = (uint8_t)(0xf0 | cp >> 18);
      out[i++] = (uint8_t)(0x80 | ((cp >> 12) & 0x3f));
      out[i++] = (uint8_t)(0x80 | ((cp >> 6) & 0x3f));
      out[i++] = (uint8_t)(0x80 | (cp & 0x3f));
    }
  }
  return i;
}

static size_t pick_size(src *s) {
  unsigned c = pick(s, 128);
  if (c == 0) return 0;
  if (c < 88) return pick(s, 200);
  if (c < 120) return 100 + pick(s, 70000);                     /* across the 16-bit length */
  if (c < 127) return pick(s, 4) ? 65535 + pick(s, 3) : 125 + pick(s, 3); /* length boundaries */
  return pick(s, BIG + 1); /* rare: they are slow under the sanitizers */
}

static void make_message(src *s, msg *m) {
  m->opcode = pick(s, 2) ? DX_OP_TEXT : DX_OP_BINARY;
  size_t n = pick_size(s);
  m->data = malloc(n ? n : 1);
  uint64_t rng = s->rng ^ (n * 0x9e3779b97f4a7c15u) ^ 1;
  int repetitive = pick(s, 2); /* compressible, so deflate has work */
  if (m->opcode == DX_OP_TEXT) {
    /* whole code points; a repetitive text repeats a unit of them */
    size_t unit = fill_utf8(m->data, repetitive && n > 64 ? 64 : n, &rng);
    size_t len = unit;
    while (unit && len + unit <= n) {
      memcpy(m->data + len, m->data, unit);
      len += unit;
    }
    m->len = len;
    return;
  }
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t r = repetitive ? (uint64_t)(i % 251) * 0x0101010101010101u : rng_next(&rng);
    memcpy(m->data + i, &r, 8);
  }
  for (; i < n; i++) m->data[i] = (uint8_t)rng_next(&rng);
  m->len = n;
}

static void fill_ctl(src *s, item *it, int type) {
  it->type = type;
  it->ctl_len = pick(s, 4) ? pick(s, 16) : pick(s, DX_CONTROL_MAX + 1);
  for (size_t i = 0; i < it->ctl_len; i++) it->ctl[i] = (uint8_t)pick(s, 256);
}

static void push_item(scenario *sc, item it) {
  CHECK(sc->nitems < MAX_ITEMS, "too many items");
  sc->items[sc->nitems++] = it;
}

/* Queue the scenario on the sender: messages in pieces, controls between. */
static void send_all(src *s, scenario *sc, dx_proto *tx) {
  for (int i = 0; i < sc->nmsgs; i++) {
    msg *m = &sc->msgs[i];
    int compress = pick(s, 4) != 0;
    unsigned pieces = pick(s, 3) ? 1 : 1 + pick(s, 5);
    size_t off = 0;
    for (unsigned k = 0; k < pieces; k++) {
      int fin = k == pieces - 1;
      size_t n = fin ? m->len - off : pick(s, (unsigned)(m->len - off + 1));
      int op = k == 0 ? m->opcode : DX_OP_CONT;
      int referenced; /* a server may queue the payload by reference */
      uint64_t ref = pick(s, 2) ? sc->last_ref + 1 : 0;
      CHECK(dx_proto_send_ref(tx, op, m->data + off, n, fin, compress, ref, &referenced) == 0, "send failed");
      if (referenced) sc->last_ref = ref;
      off += n;
      while (!fin && pick(s, 3) == 0) { /* controls inside the message */
        item it;
        fill_ctl(s, &it, pick(s, 2) ? IT_PING : IT_PONG);
        int rc = it.type == IT_PING ? dx_proto_ping(tx, it.ctl, it.ctl_len)
                                    : dx_proto_pong(tx, it.ctl, it.ctl_len);
        CHECK(rc == 0, "control send failed");
        push_item(sc, it);
      }
    }
    item it = {IT_MSG, i, {0}, 0};
    push_item(sc, it);
  }
  CHECK(dx_proto_close(tx, sc->close_code, sc->reason, sc->reason_len) == 0, "close failed");
}

typedef struct rx_state {
  scenario *sc;
  int next;       /* index of the next expected item */
  dx_buf frag;    /* streaming: the message so far */
  int frag_op;
  int closed;
  /* the sender reading the replies */
  int pings_seen; /* pongs must answer pings in order */
  int close_echo;
} rx_state;

static void expect_message(rx_state *st, int opcode, const uint8_t *data, size_t len) {
  CHECK(st->next < st->sc->nitems, "a message after the last one sent");
  item *it = &st->sc->items[st->next++];
  CHECK(it->type == IT_MSG, "a message where a control frame was expected (item %d)", st->next - 1);
  msg *m = &st->sc->msgs[it->msg];
  CHECK(opcode == m->opcode, "message %d: wrong kind", it->msg);
  CHECK(len == m->len, "message %d: %zu bytes delivered, %zu sent", it->msg, len, m->len);
  CHECK(len == 0 || memcmp(data, m->data, len) == 0, "message %d: bytes differ", it->msg);
}

/* The receiver's event against the oracle. */
static void on_rx_event(rx_state *st, const dx_event *ev) {
  CHECK(!st->closed, "an event after the close");
  switch (ev->type) {
  case DX_EV_MESSAGE: expect_message(st, ev->opcode, ev->data, ev->len); break;
  case DX_EV_FRAGMENT:
    if (ev->first) {
      dx_buf_clear(&st->frag);
      st->frag_op = ev->opcode;
    }
    CHECK(dx_buf_append(&st->frag, ev->data, ev->len) == 0, "out of memory");
    if (ev->fin) expect_message(st, st->frag_op, dx_buf_head(&st->frag), dx_buf_size(&st->frag));
    break;
  case DX_EV_PING:
  case DX_EV_PONG: {
    CHECK(st->next < st->sc->nitems, "a control frame after the last item");
    item *it = &st->sc->items[st->next++];
    CHECK(it->type == (ev->type == DX_EV_PING ? IT_PING : IT_PONG), "control frame out of order");
    CHECK(ev->len == it->ctl_len && memcmp(ev->data, it->ctl, ev->len) == 0, "control payload differs");
    break;
  }
  case DX_EV_CLOSE:
    CHECK(st->next == st->sc->nitems, "close before item %d of %d", st->next, st->sc->nitems);
    CHECK(ev->by_peer, "close not marked as the peer's");
    CHECK(ev->code == (int)(st->sc->close_code ? st->sc->close_code : DX_CLOSE_NO_STATUS), "close code %d", ev->code);
    CHECK(ev->len == st->sc->reason_len && memcmp(ev->data ? ev->data : (const uint8_t *)"", st->sc->reason, ev->len) == 0,
          "close reason differs");
    st->closed = 1;
    break;
  default: CHECK(0, "error event: %.*s (%d)", (int)ev->len, (const char *)ev->data, ev->code);
  }
}

/* The sender reading the receiver's replies. */
static void on_tx_event(rx_state *st, const dx_event *ev) {
  if (ev->type == DX_EV_PONG) {
    /* answers one of the pings not answered yet (possibly skipping some) */
    int found = 0;
    for (int i = st->pings_seen; i < st->sc->nitems && !found; i++) {
      item *it = &st->sc->items[i];
      if (it->type == IT_PING && it->ctl_len == ev->len && memcmp(it->ctl, ev->data, ev->len) == 0) {
        st->pings_seen = i + 1;
        found = 1;
      }
    }
    CHECK(found, "a pong that answers no ping sent (in order)");
    return;
  }
  CHECK(ev->type == DX_EV_CLOSE, "sender got event %d", ev->type);
  CHECK(!ev->by_peer, "the close echo is marked as the peer's");
  CHECK(ev->code == (int)(st->sc->close_code ? st->sc->close_code : DX_CLOSE_NO_STATUS), "close echo code %d", ev->code);
  st->close_echo = 1;
}

/* Feed wire to e in random cuts through one scribbled-over buffer. */
static void deliver(src *s, const uint8_t *wire, size_t len, dx_proto *e, rx_state *st,
                    void (*on_event)(rx_state *, const dx_event *)) {
  static uint8_t scratch[1u << 16];
  size_t off = 0;
  while (off < len) {
    unsigned how = pick(s, 4);
    size_t cut = how == 0 ? 1 : how == 1 ? 1 + pick(s, 24) : how == 2 ? 1 + pick(s, 1500) : 1 + pick(s, 1u << 16);
    if (cut > len - off) cut = len - off;
    /* half the time, payload goes where the engine offers to put it */
    size_t room;
    uint8_t *dst = pick(s, 2) ? dx_proto_read_room(e, &room) : NULL;
    if (dst && cut > room) cut = room;
    if (!dst) dst = scratch;
    memcpy(dst, wire + off, cut);
    off += cut;
    dx_proto_feed(e, dst, cut);
    dx_event ev;
    if (pick(s, 4) == 0) {
      /* one event, then let go of the buffer */
      if (dx_proto_next(e, &ev) != DX_EV_NONE) on_event(st, &ev);
      dx_proto_keep(e);
    } else {
      while (dx_proto_next(e, &ev) != DX_EV_NONE) on_event(st, &ev);
    }
    if (dst == scratch) memset(scratch, 0xa5, cut);
  }
  dx_event ev;
  while (dx_proto_next(e, &ev) != DX_EV_NONE) on_event(st, &ev);
}

/* Everything queued, a few spans at a time as a writev would take it. */
static void take_output(src *s, dx_proto *p, dx_buf *wire) {
  while (dx_proto_pending(p)) {
    dx_span sp[3];
    size_t k = dx_out_spans(&p->out, sp, 1 + pick(s, 3)), took = 0;
    for (size_t i = 0; i < k; i++) {
      size_t n = i == k - 1 && pick(s, 2) ? pick(s, (unsigned)sp[i].n + 1) : sp[i].n;
      CHECK(dx_buf_append(wire, sp[i].p, n) == 0, "out of memory");
      took += n;
      if (n < sp[i].n) break;
    }
    dx_out_consume(&p->out, took);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  src s = src_of(data, size, 0x2545f4914f6cdd1du);
  static scenario sc;
  memset(&sc, 0, sizeof sc);

  int tx_role = pick(&s, 2) ? DX_ROLE_CLIENT : DX_ROLE_SERVER;
  dx_config tcfg = {0}, rcfg = {0};
  tcfg.role = tx_role;
  tcfg.auto_pong = 1;
  rcfg.role = !tx_role;
  rcfg.auto_pong = 1;
  rcfg.streaming = pick(&s, 3) == 0;
  rcfg.max_message = BIG + (1u << 16); /* room for deflate growing random data */
  dx_proto tx, rx;
  dx_proto_init(&tx, &tcfg);
  dx_proto_init(&rx, &rcfg);
  unsigned deflate = pick(&s, 3);
  if (deflate) {
    int no_takeover = deflate == 2;
    dx_pmd_params params = {no_takeover || pick(&s, 2), no_takeover || pick(&s, 2), 8 + (int)pick(&s, 8),
                            8 + (int)pick(&s, 8)};
    dx_pmd_config zc = {1 + (int)pick(&s, 9), (int)pick(&s, 10)};
    tx.pmd = dx_pmd_new(tx_role, &params, &zc);
    rx.pmd = dx_pmd_new(!tx_role, &params, &zc);
    CHECK(tx.pmd && rx.pmd, "pmd");
  }

  sc.nmsgs = (int)pick(&s, MAX_MSGS + 1);
  for (int i = 0; i < sc.nmsgs; i++) make_message(&s, &sc.msgs[i]);
  static const unsigned codes[] = {0, 1000, 1001, 1003, 1007, 1008, 1011, 3000, 4999};
  sc.close_code = codes[pick(&s, sizeof codes / sizeof codes[0])];
  if (sc.close_code) {
    uint64_t rng = s.rng;
    sc.reason_len = fill_utf8((uint8_t *)sc.reason, pick(&s, DX_CONTROL_MAX - 2 - 3), &rng);
  }

  send_all(&s, &sc, &tx);
  dx_buf wire = DX_BUF_INIT;
  take_output(&s, &tx, &wire);
  CHECK(tx.out.released == sc.last_ref, "payloads by reference not all released");

  rx_state st = {&sc, 0, DX_BUF_INIT, 0, 0, 0, 0};
  deliver(&s, dx_buf_head(&wire), dx_buf_size(&wire), &rx, &st, on_rx_event);
  CHECK(st.closed, "no close after %d of %d items", st.next, sc.nitems);
  CHECK(rx.state == DX_STATE_CLOSED, "receiver not closed");

  dx_buf back = DX_BUF_INIT;
  take_output(&s, &rx, &back);
  deliver(&s, dx_buf_head(&back), dx_buf_size(&back), &tx, &st, on_tx_event);
  CHECK(st.close_echo, "no close echo");
  CHECK(tx.state == DX_STATE_CLOSED, "sender not closed");

  dx_buf_free(&wire);
  dx_buf_free(&back);
  dx_buf_free(&st.frag);
  for (int i = 0; i < sc.nmsgs; i++) free(sc.msgs[i].data);
  dx_proto_release(&tx);
  dx_proto_release(&rx);
  return 0;
}
