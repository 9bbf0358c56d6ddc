/*
 * dx_timing: the engine's clocks, the one home of the rules of time on a
 * connection: when to ping a quiet peer, when a missing pong or a missing
 * reply to our close frame fails it, and when an idle connection gives its
 * buffers back.
 *
 * Sans-I/O like the rest of the engine: it never reads a clock. The host
 * says when input arrived (dx_timing_seen), when we pinged or started to
 * close, and asks when something is next due (dx_timing_due); at that time
 * it calls dx_timing_tick, which does what is due (queues the ping, shrinks
 * the buffers) and reports what the host must act on. Traffic only moves a
 * due time later, so a host may keep one timer per connection that it
 * re-arms when the timer fires, never on each message: every host (our
 * loop's timers, a reader that waits until the due time) gets the same
 * rules from here.
 */
#ifndef DX_TIMING_H
#define DX_TIMING_H

typedef struct dx_proto dx_proto;

typedef struct dx_timing {
  double seen;      /* the peer's last input */
  double ping_sent; /* our ping still unanswered; 0: none */
  double close_by;  /* closing: the peer's close frame must come by then */
  double latency;   /* round trip of the last ping answered; < 0: none yet */
  /* Seconds. ping_interval 0 turns heartbeats off; the engine keeps no
   * clock at all until dx_timing_set. */
  float ping_interval, ping_timeout, close_timeout;
  unsigned char on;
} dx_timing;

/* What dx_timing_tick reports. */
enum dx_tick {
  DX_TICK_NONE = 0,
  DX_TICK_PING_TIMEOUT,  /* no traffic for ping_timeout after our ping */
  DX_TICK_CLOSE_TIMEOUT, /* no close frame for close_timeout after ours */
  DX_TICK_OVERFLOW       /* the ping passed max_pending: the connection failed */
};

/* A connection quiet this long, its output written, gives back its buffers. */
#define DX_TIMING_QUIET 1.0

void dx_timing_set(dx_proto *p, double ping_interval, double ping_timeout, double close_timeout, double now);
/* We sent a ping (the heartbeat's or the application's) at now. */
void dx_timing_pinged(dx_proto *p, double now);
/* We sent our close frame at now: the reply is due close_timeout later. */
void dx_timing_closing(dx_proto *p, double now);
/* A pong arrived: the latency of our ping, if one was unanswered. */
void dx_timing_pong(dx_proto *p);
/* When something is next due (monotonic seconds), or a negative number
 * when nothing is. */
double dx_timing_due(const dx_proto *p, double now);
/* Do what is due at now; a DX_TICK_* code. */
int dx_timing_tick(dx_proto *p, double now);

#endif
