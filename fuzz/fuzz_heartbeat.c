/*
 * The engine's clocks (dx_timing) composed with the protocol: a server and
 * a client engine joined by a wire with latency, on a virtual clock, driven
 * as a loop host drives them (each side ticks exactly when dx_timing_due
 * says, reads what arrives when it arrives, writes what it queued at once).
 * The input chooses the settings (heartbeats on or off, ping_interval,
 * ping_timeout, close_timeout), the wire's latency, and a script of actions
 * at random times: messages either way, application pings, a close by
 * either side, the wire cut in one direction or both.
 *
 * Properties:
 *   - while the wire delivers within half of ping_timeout each way, neither
 *     side ever declares the other dead, and every message arrives whole
 *     and in order;
 *   - a side that reads nothing more declares its peer dead no sooner than
 *     ping_timeout after the last byte it read, and no later than
 *     ping_interval + 2 * ping_timeout after it; with heartbeats off, never;
 *   - a closing side with no answer gives up exactly close_timeout after
 *     its close frame, and with the wire up the closing handshake finishes
 *     before that on both sides;
 *   - a tick with nothing to report leaves the next due time in the future:
 *     a host that sleeps until then never spins.
 *
 * When the input runs out, choices come from a PRNG seeded by it;
 * build/fuzz/heartbeat_seeds (fuzz/roundtrip_seeds.c's runner) runs fixed
 * seeds outside libFuzzer (spec/roundtrip_spec.lua). HB_TRACE=1 prints
 * each step, HB_STATS=1 a line per scenario (what it ended in).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dx_proto.h"
#include "dx_timing.h"
#include "fuzz_choice.h"

#define MAX_MSGS 48
#define MAX_LEN 300
#define MAX_CHUNKS 1024
#define HORIZON 400.0 /* virtual seconds a scenario may last */
#define EPS 1e-6

/* A duration in [lo, hi), in steps of a millisecond. */
static double pick_time(src *s, double lo, double hi) {
  unsigned steps = (unsigned)((hi - lo) * 1000);
  return lo + (double)pick(s, steps ? steps : 1) / 1000;
}

#define CHECK(cond, ...)                                                                           \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fprintf(stderr, "heartbeat: " __VA_ARGS__);                                                  \
      fprintf(stderr, " (%s:%d)\n", __FILE__, __LINE__);                                           \
      abort();                                                                                     \
    }                                                                                              \
  } while (0)

static int trace;
#define TRACE(...) \
  do { \
    if (trace) fprintf(stderr, __VA_ARGS__); \
  } while (0)

typedef struct chunk {
  double at; /* when it arrives */
  uint8_t *data;
  size_t len;
} chunk;

/* One direction of the wire: chunks in order of arrival. */
typedef struct wire {
  chunk q[MAX_CHUNKS];
  int head, n;
  int cut; /* everything sent from now on is lost */
} wire;

typedef struct msg {
  uint8_t data[MAX_LEN];
  size_t len;
} msg;

typedef struct side {
  dx_proto p;
  const char *name;
  wire *out;          /* what it writes */
  double last_in;     /* when it last read a byte */
  int verdict;        /* DX_TICK_* once its clock ended the connection */
  double verdict_at;
  int closed;         /* the closing handshake finished (DX_EV_CLOSE) */
  double closing_at;  /* when its own close frame went out; 0: never */
  msg sent[MAX_MSGS]; /* what it sent, for the other side to check */
  int nsent, nread;   /* sent by it; read by it from the other */
} side;

static int over(const side *x) { return x->verdict || x->closed || x->p.state == DX_STATE_CLOSED; }

/* A copy of n bytes on w (unless it is cut), arriving lat after now but
 * not before what is in flight: TCP keeps the order. */
static void wire_push(wire *w, double now, double lat, const uint8_t *p, size_t n) {
  if (w->cut) return;
  CHECK(w->n < MAX_CHUNKS, "wire full");
  chunk *c = &w->q[(w->head + w->n) % MAX_CHUNKS];
  double at = now + lat;
  if (w->n) {
    const chunk *last = &w->q[(w->head + w->n - 1) % MAX_CHUNKS];
    if (at < last->at) at = last->at;
  }
  TRACE("%.3f queued %zu B arriving %.3f%s\n", now, n, at, w->n ? " (behind others)" : "");
  c->at = at;
  c->len = n;
  c->data = malloc(n ? n : 1);
  CHECK(c->data, "out of memory");
  memcpy(c->data, p, n);
  w->n++;
}

/* Everything x queued goes on its wire now. */
static void flush(side *x, double now, double lat) {
  while (dx_proto_pending(&x->p)) {
    dx_span sp[4];
    size_t k = dx_out_spans(&x->p.out, sp, 4), took = 0;
    CHECK(k > 0, "%s: output pending but no span of it", x->name);
    for (size_t i = 0; i < k; i++) {
      wire_push(x->out, now, lat, sp[i].p, sp[i].n);
      took += sp[i].n;
    }
    dx_out_consume(&x->p.out, took);
  }
}

static void cut(wire *w) {
  w->cut = 1;
  while (w->n) {
    free(w->q[w->head].data);
    w->head = (w->head + 1) % MAX_CHUNKS;
    w->n--;
  }
}

/* x reads what arrives from its peer at now, and answers it at once. */
static void deliver(side *x, side *peer, const chunk *c, double now, double lat) {
  x->last_in = now;
  dx_timing_seen(&x->p, now);
  dx_proto_feed_copy(&x->p, c->data, c->len);
  dx_event ev;
  while (dx_proto_next(&x->p, &ev) != DX_EV_NONE) {
    TRACE("%.3f %s event %d\n", now, x->name, ev.type);
    switch (ev.type) {
    case DX_EV_MESSAGE: {
      CHECK(x->nread < peer->nsent, "%s: a message nobody sent", x->name);
      const msg *m = &peer->sent[x->nread++];
      CHECK(ev.len == m->len && memcmp(ev.data, m->data, m->len) == 0, "%s: message %d differs", x->name,
            x->nread - 1);
      break;
    }
    case DX_EV_PING:
    case DX_EV_PONG: break;
    case DX_EV_CLOSE: x->closed = 1; break;
    default: CHECK(0, "%s: event %d (a protocol error?)", x->name, ev.type);
    }
  }
  flush(x, now, lat);
}

/* x's clock at its due time. */
static void tick(side *x, double now, double lat) {
  int what = dx_timing_tick(&x->p, now);
  TRACE("%.3f %s tick -> %d (ping_sent %.3f seen %.3f)\n", now, x->name, what, x->p.timing.ping_sent, x->p.timing.seen);
  if (what) {
    x->verdict = what;
    x->verdict_at = now;
    return;
  }
  flush(x, now, lat); /* the heartbeat's ping */
  double due = dx_timing_due(&x->p, now);
  CHECK(due < 0 || due > now, "%s: due again at %.6f after a tick at %.6f that did nothing", x->name, due, now);
}

static void send_message(src *s, side *x, double now, double lat) {
  if (x->nsent >= MAX_MSGS || x->p.state != DX_STATE_OPEN) return;
  msg *m = &x->sent[x->nsent];
  m->len = pick(s, MAX_LEN + 1);
  for (size_t i = 0; i < m->len; i++) m->data[i] = (uint8_t)rng_next(&s->rng);
  if (dx_proto_send(&x->p, DX_OP_BINARY, m->data, m->len, 1, 0) == 0) x->nsent++;
  flush(x, now, lat);
}

/* The earliest of a due time and t (negative: none). */
static double sooner(double t, double due) { return due >= 0 && (t < 0 || due < t) ? due : t; }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  src s = src_of(data, size, 0x9e3779b97f4a7c15u);
  trace = getenv("HB_TRACE") != NULL;

  static side sv, cl;
  static wire to_client, to_server;
  memset(&sv, 0, sizeof sv);
  memset(&cl, 0, sizeof cl);
  memset(&to_client, 0, sizeof to_client);
  memset(&to_server, 0, sizeof to_server);
  dx_config scfg = {0}, ccfg = {0};
  scfg.role = DX_ROLE_SERVER;
  ccfg.role = DX_ROLE_CLIENT;
  scfg.auto_pong = ccfg.auto_pong = 1;
  dx_proto_init(&sv.p, &scfg);
  dx_proto_init(&cl.p, &ccfg);
  sv.name = "server", cl.name = "client";
  sv.out = &to_client, cl.out = &to_server;

  double now = 1000 + pick(&s, 100000);
  side *sides[2] = {&sv, &cl};
  for (int i = 0; i < 2; i++) {
    double interval = pick(&s, 4) ? pick_time(&s, 0.05, 30) : 0;
    double timeout = pick_time(&s, 0.05, 30), close = pick_time(&s, 0.05, 10);
    dx_timing_set(&sides[i]->p, interval, timeout, close, now);
    sides[i]->last_in = now;
  }
  /* within half of the shorter ping_timeout each way: a pong is always in
   * time (the engines keep the settings as floats: compare with those) */
  double half = sv.p.timing.ping_timeout < cl.p.timing.ping_timeout ? sv.p.timing.ping_timeout : cl.p.timing.ping_timeout;
  half = half / 2 - 0.002;
  double lat = pick_time(&s, 0, half > 0 ? half : 0.001);

  /* the script: actions at increasing times */
  int nactions = (int)pick(&s, 40);
  double next_action = now + pick_time(&s, 0, 20);
  double end = now + HORIZON;
  int cut_any = 0;

  while (now < end) {
    /* the next thing to happen: an arrival, a due time, an action */
    double t = nactions > 0 ? next_action : -1;
    for (int i = 0; i < 2; i++) {
      side *x = sides[i];
      if (over(x)) continue;
      t = sooner(t, dx_timing_due(&x->p, now));
      if (x->out->n && !over(x == &sv ? &cl : &sv)) t = sooner(t, x->out->q[x->out->head].at);
    }
    if (t < 0 || t > end) break;
    CHECK(t >= now - EPS, "time went back from %.6f to %.6f", now, t);
    if (t > now) now = t;

    for (int i = 0; i < 2; i++) {
      side *x = sides[i], *peer = sides[!i];
      wire *in = peer->out;
      while (!over(x) && in->n && in->q[in->head].at <= now) {
        chunk c = in->q[in->head];
        in->head = (in->head + 1) % MAX_CHUNKS;
        in->n--;
        deliver(x, peer, &c, now, lat);
        free(c.data);
      }
      if (!over(x)) {
        double due = dx_timing_due(&x->p, now);
        if (due >= 0 && due <= now) tick(x, now, lat);
      }
    }

    if (nactions > 0 && next_action <= now) {
      nactions--;
      side *x = sides[pick(&s, 2)];
      unsigned action = pick(&s, 10);
      TRACE("%.3f %s action %u (over %d/%d, state %d/%d)\n", now, x->name, action, over(&sv), over(&cl), sv.p.state, cl.p.state);
      switch (action) {
      case 0:
        if (x->p.state == DX_STATE_OPEN && dx_proto_close(&x->p, 1000, "bye", 3) == 0) {
          x->closing_at = now;
          dx_timing_closing(&x->p, now);
          flush(x, now, lat);
        }
        break;
      case 1:
        if (x->p.state == DX_STATE_OPEN && dx_proto_ping(&x->p, "app", 3) == 0) {
          dx_timing_pinged(&x->p, now);
          flush(x, now, lat);
        }
        break;
      case 2:
        if (pick(&s, 4) == 0) { /* the wire goes down: one way, or both */
          int how = (int)pick(&s, 3);
          if (how != 1) cut(&to_client);
          if (how != 0) cut(&to_server);
          cut_any = 1;
        }
        break;
      default: send_message(&s, x, now, lat); break;
      }
      next_action = now + pick_time(&s, 0, 20);
    }
    if (over(&sv) && over(&cl)) break;
  }

  for (int i = 0; i < 2; i++) {
    side *x = sides[i], *peer = sides[!i];
    const dx_timing *tm = &x->p.timing;
    if (x->verdict == DX_TICK_PING_TIMEOUT) {
      CHECK(tm->ping_interval > 0, "%s: a ping timeout with heartbeats off", x->name);
      /* its pings or the pongs lost, or a peer that stopped answering */
      CHECK(x->out->cut || peer->out->cut || over(peer), "%s: declared a live peer dead (wire up, latency %.3f, timeout %.3f)",
            x->name, lat, tm->ping_timeout);
      CHECK(x->verdict_at >= x->last_in + tm->ping_timeout - EPS, "%s: dead after %.3f s of silence, timeout %.3f",
            x->name, x->verdict_at - x->last_in, tm->ping_timeout);
      CHECK(x->verdict_at <= x->last_in + tm->ping_interval + 2 * tm->ping_timeout + EPS,
            "%s: dead only after %.3f s of silence", x->name, x->verdict_at - x->last_in);
    } else if (x->verdict == DX_TICK_CLOSE_TIMEOUT) {
      CHECK(x->closing_at > 0, "%s: a close timeout without a close", x->name);
      CHECK(x->verdict_at >= x->closing_at + tm->close_timeout - EPS &&
                x->verdict_at <= x->closing_at + tm->close_timeout + EPS,
            "%s: close timeout %.6f s after its close, close_timeout %.6f", x->name, x->verdict_at - x->closing_at,
            tm->close_timeout);
      CHECK(cut_any || 2 * lat + EPS >= tm->close_timeout, "%s: closing handshake timed out with the wire up",
            x->name);
    } else {
      CHECK(x->verdict == DX_TICK_NONE, "%s: verdict %d", x->name, x->verdict);
      /* a side that heard nothing for long enough with heartbeats on must
       * have said so by the end */
      if (!over(x) && tm->ping_interval > 0 && now >= end)
        CHECK(now < x->last_in + tm->ping_interval + 2 * tm->ping_timeout, "%s: silent peer never declared dead",
              x->name);
    }
    if (!cut_any && !x->verdict && !peer->verdict && x->p.state == DX_STATE_OPEN && peer->p.state == DX_STATE_OPEN &&
        peer->out->n == 0)
      CHECK(x->nread == peer->nsent, "%s: read %d of %d messages", x->name, x->nread, peer->nsent);
  }

  if (getenv("HB_STATS"))
    fprintf(stderr, "stats verdicts %d/%d closed %d/%d cut %d msgs %d/%d lat %.3f pi %.2f/%.2f\n", sv.verdict, cl.verdict,
            sv.closed, cl.closed, cut_any, sv.nread, cl.nread, lat, sv.p.timing.ping_interval, cl.p.timing.ping_interval);
  cut(&to_client);
  cut(&to_server);
  dx_proto_release(&sv.p);
  dx_proto_release(&cl.p);
  return 0;
}
