/* libwebsockets peer for bench/run, built against Debian's libwebsockets-dev
 * (make -C bench peers). Echo: every message goes back to its sender with its
 * type, fragment by fragment as it arrives. --broadcast: every message from
 * any client goes to every connected client, the sender included (the twin of
 * node_broadcast_server.js). Prints `LISTENING <port>` on stdout once it
 * accepts connections, as the other servers do; SIGTERM ends it.
 *
 *   lws_echo [--broadcast] [--deflate] [--port N] [--max-payload N] [--tls-cert F --tls-key F]
 *
 * permessage-deflate only with --deflate (lws's own extension, which takes
 * the client's no_context_takeover parameters).
 */
#include <libwebsockets.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* lws hands over received data and sends in chunks of this size; its
 * default (4 KiB) would cut a 16 MiB echo into 4,096 writes. */
#define CHUNK 65536
/* Stop reading a connection while this much of its echo is unsent, so that
 * a 16 MiB message is not held twice. */
#define HIGH_WATER (1u << 20)
#define LOW_WATER (256u << 10)
/* Broadcast: messages kept for subscribers that have not written them yet.
 * loadgen paces its publisher (--inflight), so a full ring means a stuck
 * subscriber. */
#define RING 1024

static size_t max_payload = 16u << 20;

struct frag {
  struct frag *next;
  size_t len;
  unsigned char first, final, binary;
  unsigned char buf[]; /* LWS_PRE bytes of room, then the data */
};

struct msg {
  size_t len;
  int binary;
  unsigned char *buf; /* LWS_PRE + len */
};

struct pss {
  /* echo: fragments not yet sent back */
  struct frag *head, *tail;
  size_t queued;
  int paused;
  /* both: bytes of the message being received (max_payload); the message
   * itself where it is sent whole (broadcast) */
  size_t msg_len;
  unsigned char *acc;
  size_t acc_cap;
  /* broadcast: the next ring entry to send, and the list of subscribers */
  uint64_t next;
  struct pss *prev, *succ;
  struct lws *wsi;
};

static struct msg ring[RING];
static uint64_t ring_head, ring_tail; /* entries [tail, head) are live */
static struct pss *subscribers;

static int too_large(struct lws *wsi, struct pss *p, size_t len) {
  if (lws_is_first_fragment(wsi)) p->msg_len = 0;
  p->msg_len += len;
  if (p->msg_len <= max_payload) return 0;
  lws_close_reason(wsi, LWS_CLOSE_STATUS_MESSAGE_TOO_LARGE, NULL, 0);
  return 1;
}

/* Appends a received piece to the message being received (after LWS_PRE
 * bytes of room); 0 if all went well. */
static int accumulate(struct pss *p, const void *in, size_t len) {
  if (LWS_PRE + p->msg_len > p->acc_cap) {
    size_t cap = p->acc_cap ? p->acc_cap : 4096;
    while (cap < LWS_PRE + p->msg_len) cap *= 2;
    unsigned char *b = realloc(p->acc, cap);
    if (!b) return -1;
    p->acc = b;
    p->acc_cap = cap;
  }
  memcpy(p->acc + LWS_PRE + p->msg_len - len, in, len);
  return 0;
}

static int echo_cb(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in, size_t len) {
  struct pss *p = user;
  switch (reason) {
  case LWS_CALLBACK_RECEIVE: {
    if (too_large(wsi, p, len)) return -1;
    int first = lws_is_first_fragment(wsi), final = lws_is_final_fragment(wsi);
    struct frag *f = malloc(sizeof *f + LWS_PRE + len);
    if (!f) return -1;
    f->next = NULL;
    f->len = len;
    f->first = (unsigned char)first;
    f->final = (unsigned char)final;
    f->binary = (unsigned char)lws_frame_is_binary(wsi);
    memcpy(f->buf + LWS_PRE, in, len);
    if (p->tail) p->tail->next = f; else p->head = f;
    p->tail = f;
    p->queued += len;
    if (p->queued > HIGH_WATER && !p->paused) {
      p->paused = 1;
      lws_rx_flow_control(wsi, 0);
    }
    lws_callback_on_writable(wsi);
    return 0;
  }
  case LWS_CALLBACK_SERVER_WRITEABLE: {
    /* one write per callback, as lws asks */
    struct frag *f = p->head;
    if (!f) return 0;
    int flags = lws_write_ws_flags(f->binary ? LWS_WRITE_BINARY : LWS_WRITE_TEXT, f->first, f->final);
    if (lws_write(wsi, f->buf + LWS_PRE, f->len, (enum lws_write_protocol)flags) < (int)f->len) return -1;
    p->head = f->next;
    if (!p->head) p->tail = NULL;
    p->queued -= f->len;
    free(f);
    if (p->paused && p->queued < LOW_WATER) {
      p->paused = 0;
      lws_rx_flow_control(wsi, 1);
    }
    if (p->head) lws_callback_on_writable(wsi);
    return 0;
  }
  case LWS_CALLBACK_CLOSED:
    while (p->head) {
      struct frag *f = p->head;
      p->head = f->next;
      free(f);
    }
    free(p->acc);
    p->acc = NULL;
    return 0;
  default:
    return lws_callback_http_dummy(wsi, reason, user, in, len);
  }
}

/* Frees the entries every subscriber has written; returns 0 if the ring is
 * still full. */
static int ring_reclaim(void) {
  uint64_t oldest = ring_head;
  for (struct pss *s = subscribers; s; s = s->succ)
    if (s->next < oldest) oldest = s->next;
  while (ring_tail < oldest) {
    free(ring[ring_tail % RING].buf);
    ring[ring_tail % RING].buf = NULL;
    ring_tail++;
  }
  return ring_head - ring_tail < RING;
}

static int broadcast_cb(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in, size_t len) {
  struct pss *p = user;
  switch (reason) {
  case LWS_CALLBACK_ESTABLISHED:
    p->wsi = wsi;
    p->next = ring_head;
    p->succ = subscribers;
    if (subscribers) subscribers->prev = p;
    subscribers = p;
    return 0;
  case LWS_CALLBACK_RECEIVE: {
    if (too_large(wsi, p, len) || accumulate(p, in, len)) return -1;
    if (!lws_is_final_fragment(wsi)) return 0;
    if (ring_head - ring_tail == RING && !ring_reclaim()) {
      /* a subscriber is RING messages behind: it loses the oldest */
      for (struct pss *s = subscribers; s; s = s->succ)
        if (s->next == ring_tail) s->next++;
      ring_reclaim();
    }
    struct msg *m = &ring[ring_head % RING];
    m->buf = malloc(LWS_PRE + p->msg_len);
    if (!m->buf) return -1;
    memcpy(m->buf + LWS_PRE, p->acc + LWS_PRE, p->msg_len);
    m->len = p->msg_len;
    m->binary = lws_frame_is_binary(wsi);
    ring_head++;
    lws_callback_on_writable_all_protocol(lws_get_context(wsi), lws_get_protocol(wsi));
    return 0;
  }
  case LWS_CALLBACK_SERVER_WRITEABLE: {
    if (p->next < ring_tail) p->next = ring_tail;
    if (p->next == ring_head) return 0;
    struct msg *m = &ring[p->next % RING];
    if (lws_write(wsi, m->buf + LWS_PRE, m->len, m->binary ? LWS_WRITE_BINARY : LWS_WRITE_TEXT) < (int)m->len)
      return -1;
    p->next++;
    if (p->next < ring_head) lws_callback_on_writable(wsi);
    if (ring_head - ring_tail > RING / 2) ring_reclaim();
    return 0;
  }
  case LWS_CALLBACK_CLOSED:
    if (p->wsi) {
      if (p->prev) p->prev->succ = p->succ; else subscribers = p->succ;
      if (p->succ) p->succ->prev = p->prev;
      p->wsi = NULL;
    }
    free(p->acc);
    p->acc = NULL;
    return 0;
  default:
    return lws_callback_http_dummy(wsi, reason, user, in, len);
  }
}

static void usage(void) {
  fprintf(stderr, "usage: lws_echo [--broadcast] [--deflate] [--port N] [--max-payload N] [--tls-cert F --tls-key F]\n");
  exit(2);
}

int main(int argc, char **argv) {
  int port = 0, broadcast = 0, deflate = 0;
  const char *cert = NULL, *key = NULL;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--broadcast")) { broadcast = 1; continue; }
    if (!strcmp(a, "--deflate")) { deflate = 1; continue; }
    if (i + 1 >= argc) usage();
    const char *v = argv[++i];
    if (!strcmp(a, "--port")) port = atoi(v);
    else if (!strcmp(a, "--max-payload")) max_payload = strtoull(v, NULL, 10);
    else if (!strcmp(a, "--tls-cert")) cert = v;
    else if (!strcmp(a, "--tls-key")) key = v;
    else usage();
  }
  if (!cert != !key) usage();

  /* protocols[0] takes upgrades that name no subprotocol, as loadgen's */
  struct lws_protocols protocols[] = {
    { "bench", broadcast ? broadcast_cb : echo_cb, sizeof(struct pss), CHUNK, 0, NULL, CHUNK },
    { NULL, NULL, 0, 0, 0, NULL, 0 }
  };
  lws_set_log_level(LLL_ERR, NULL);
  struct lws_context_creation_info info;
  memset(&info, 0, sizeof info);
  info.options = LWS_SERVER_OPTION_EXPLICIT_VHOSTS;
  if (cert) info.options |= LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
  info.port = port;
  info.iface = "127.0.0.1";
  info.protocols = protocols;
  info.ssl_cert_filepath = cert;
  info.ssl_private_key_filepath = key;
  static const struct lws_extension exts[] = {
    { "permessage-deflate", lws_extension_callback_pm_deflate, "permessage-deflate" },
    { NULL, NULL, NULL }
  };
  if (deflate) info.extensions = exts;
  struct lws_context *ctx = lws_create_context(&info);
  if (!ctx) return 1;
  struct lws_vhost *vh = lws_create_vhost(ctx, &info);
  if (!vh) {
    fprintf(stderr, "lws_echo: cannot listen\n");
    return 1;
  }
  printf("LISTENING %d\n", lws_get_vhost_listen_port(vh));
  fflush(stdout);
  while (lws_service(ctx, 0) >= 0) {}
  lws_context_destroy(ctx);
  return 0;
}
