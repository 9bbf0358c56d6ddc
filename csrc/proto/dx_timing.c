/* dx_timing: see dx_timing.h. Each test below compares now with the very
 * sum dx_timing_due returns, so a tick at the due time always acts. */
#include "dx_timing.h"

#include "dx_proto.h"

void dx_timing_set(dx_proto *p, double ping_interval, double ping_timeout, double close_timeout, double now) {
  dx_timing *t = &p->timing;
  t->ping_interval = (float)(ping_interval > 0 ? ping_interval : 0);
  t->ping_timeout = (float)ping_timeout;
  t->close_timeout = (float)close_timeout;
  t->seen = now;
  t->latency = -1;
  t->on = 1;
}

static void moved_earlier(dx_proto *p) {
  if (p->on_due) p->on_due(p->on_output_ud);
}

void dx_timing_pinged(dx_proto *p, double now) {
  if (p->timing.ping_sent) return;
  p->timing.ping_sent = now;
  moved_earlier(p);
}

void dx_timing_closing(dx_proto *p, double now) {
  if (p->state != DX_STATE_CLOSING) return;
  p->timing.close_by = now + p->timing.close_timeout;
  moved_earlier(p);
}

void dx_timing_pong(dx_proto *p) {
  dx_timing *t = &p->timing;
  if (!t->ping_sent) return;
  /* the pong came with the last input: that is when it arrived */
  t->latency = t->seen > t->ping_sent ? t->seen - t->ping_sent : 0;
  t->ping_sent = 0;
}

static double earlier(double a, double b) { return a < 0 || (b >= 0 && b < a) ? b : a; }

double dx_timing_due(const dx_proto *p, double now) {
  const dx_timing *t = &p->timing;
  if (!t->on) return -1;
  if (p->state == DX_STATE_CLOSING) return t->close_by ? t->close_by : -1;
  if (p->state != DX_STATE_OPEN) return -1;
  double due = -1;
  if (t->ping_interval > 0) due = t->ping_sent ? t->ping_sent + t->ping_timeout : t->seen + t->ping_interval;
  if (dx_proto_holding(p)) {
    double quiet = t->seen + DX_TIMING_QUIET;
    /* quiet already but output kept it from shrinking: look again later */
    if (quiet <= now) quiet = now + DX_TIMING_QUIET;
    due = earlier(due, quiet);
  }
  return due;
}

int dx_timing_tick(dx_proto *p, double now) {
  dx_timing *t = &p->timing;
  if (!t->on) return DX_TICK_NONE;
  if (p->state == DX_STATE_CLOSING) return t->close_by && now >= t->close_by ? DX_TICK_CLOSE_TIMEOUT : DX_TICK_NONE;
  if (p->state != DX_STATE_OPEN) return DX_TICK_NONE;
  /* Buffers keep their memory while traffic flows; a connection quiet for
   * a second gives it back. */
  if (now >= t->seen + DX_TIMING_QUIET && dx_proto_pending(p) == 0) dx_proto_shrink(p);
  if (t->ping_interval <= 0) return DX_TICK_NONE;
  if (t->ping_sent) {
    if (now < t->ping_sent + t->ping_timeout) return DX_TICK_NONE;
    /* traffic since the ping proves life even if the pong is late */
    if (t->seen <= t->ping_sent) return DX_TICK_PING_TIMEOUT;
    t->ping_sent = 0;
  }
  if (now < t->seen + t->ping_interval) return DX_TICK_NONE;
  int rc = dx_proto_ping(p, "", 0);
  if (rc == DX_E_OVERFLOW) return DX_TICK_OVERFLOW;
  if (rc == 0) t->ping_sent = now; /* the host asks for the due time next */
  return DX_TICK_NONE;
}
