/*
 * loadgen: duplex's WebSocket load generator.
 *
 * One thread, one epoll loop, many client connections to a WebSocket server
 * on a loopback address. It does the HTTP upgrade itself, masks every frame
 * with a fresh key, verifies every byte that comes back, and reads the
 * server's CPU time (and RSS) from /proc so that the figure that matters --
 * server CPU per operation -- does not depend on how fast this client is.
 *
 *   loadgen MODE --url ws://127.0.0.1:PORT/path [options]
 *   MODE: echo | connect | idle | broadcast      (loadgen --help for options)
 *
 * wss:// goes through OpenSSL (no certificate check: loopback only), and
 * --deflate offers permessage-deflate without context takeover, so that each
 * message is compressed on its own and one shared zlib stream per direction
 * serves every connection.
 *
 * The client is deliberately independent of duplex's engine (its own
 * framing and masking): a bug shared by both ends would otherwise cancel out.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <zlib.h>

/* ---- limits ------------------------------------------------------------ */

#define MAX_SIZE (64u << 20)   /* largest --size */
#define MAX_INFLIGHT 65536u    /* largest --inflight */
#define MAX_CONNS 1000000u     /* largest connection count */
#define MAX_SOURCES 254u       /* 127.0.0.1 .. 127.0.0.254 */
#define MAX_PIDS 16            /* --pid P,P,... */
#define HS_MAX 8192u           /* largest handshake response we accept */
#define READ_CHUNK (256u << 10)
#define PUB_RING_RATE 65536u   /* outstanding broadcasts allowed with --publish-rate */
#define PUB_WBUF_MAX (4u << 20) /* publisher stops while this much is unsent */
#define ERR_PRINT_MAX 10       /* error lines printed before going quiet */
#define SCAN_NS 250000000ull   /* timeout scan period */
#define SETTLE_NS 100000000ull /* broadcast: let the server register subscribers */
#define NS 1000000000ull

/* Broadcast payloads start with this token: "dxlg:" 16 hex (seq) ":" 16 hex
 * (publish time, ns) ";". A server may wrap the payload (a chat server adds
 * the sender's nick), so subscribers look the token up rather than assume
 * the payload starts with it. */
#define TOKEN_TAG "dxlg:"
#define TOKEN_LEN 39u
#define STAMP_LEN 16u /* echo payloads start with 16 hex digits of the seq */

static const char WS_GUID[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/* No context takeover either way: each message is (de)compressed on its own,
 * with one zlib stream per direction for all connections. */
#define PMD_OFFER \
  "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover; server_no_context_takeover\r\n"

/* The only process-wide state: set by SIGINT/SIGTERM, polled by the loop. */
static volatile sig_atomic_t stop_requested;

/* ---- small utilities --------------------------------------------------- */

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * NS + (uint64_t)ts.tv_nsec;
}

static void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("loadgen: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit(2);
}

static void *xrealloc(void *p, size_t n) {
  void *q = realloc(p, n ? n : 1);
  if (!q) die("out of memory (%zu bytes)", n);
  return q;
}

/* splitmix64: fast and good enough for mask keys and payload patterns.
 * RFC 6455 wants unpredictable mask keys to protect intermediaries from
 * cache poisoning; on loopback with no intermediary, a PRNG seeded from
 * RAND_bytes is plenty. */
static uint64_t rng_next(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static const char HEX[] = "0123456789abcdef";

/* 16 hex digits, least significant first, so that a payload shorter than 16
 * bytes still carries the low (fastest changing) digits of the value. */
static void hex16_put(uint8_t *out, uint64_t v) {
  for (unsigned i = 0; i < 16; i++) out[i] = (uint8_t)HEX[(v >> (4 * i)) & 15];
}

static int hex16_get(const uint8_t *in, uint64_t *v) {
  uint64_t x = 0;
  for (unsigned i = 0; i < 16; i++) {
    int d = in[i] >= '0' && in[i] <= '9' ? in[i] - '0' : in[i] >= 'a' && in[i] <= 'f' ? in[i] - 'a' + 10 : -1;
    if (d < 0) return -1;
    x |= (uint64_t)d << (4 * i);
  }
  *v = x;
  return 0;
}

/* dst = src XOR key, continuing at key position *pos, a word at a time:
 * masking is the client's main per-byte cost for large messages. */
static void mask_copy(uint8_t *dst, const uint8_t *src, size_t n, const uint8_t key[4], unsigned *pos) {
  uint8_t k8[8];
  uint64_t k;
  size_t i = 0;
  for (unsigned j = 0; j < 8; j++) k8[j] = key[(*pos + j) & 3];
  memcpy(&k, k8, 8);
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, src + i, 8);
    w ^= k;
    memcpy(dst + i, &w, 8);
  }
  for (; i < n; i++) dst[i] = src[i] ^ k8[i & 7];
  *pos = (unsigned)((*pos + n) & 3);
}

/* ---- byte buffer: data lives in p[off, len) ---------------------------- */

struct buf {
  uint8_t *p;
  size_t off, len, cap;
};

static size_t buf_avail(const struct buf *b) { return b->len - b->off; }
static uint8_t *buf_data(const struct buf *b) { return b->p + b->off; }

/* Room for `extra` more bytes at p + len; slides the data to the front first
 * so a buffer that is consumed as it fills does not grow. */
static void buf_reserve(struct buf *b, size_t extra) {
  if (b->off && b->len + extra > b->cap) {
    memmove(b->p, b->p + b->off, b->len - b->off);
    b->len -= b->off;
    b->off = 0;
  }
  if (b->len + extra <= b->cap) return;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + extra) cap *= 2;
  b->p = xrealloc(b->p, cap);
  b->cap = cap;
}

static void buf_append(struct buf *b, const void *p, size_t n) {
  buf_reserve(b, n);
  memcpy(b->p + b->len, p, n);
  b->len += n;
}

static void buf_consume(struct buf *b, size_t n) {
  b->off += n;
  if (b->off == b->len) b->off = b->len = 0;
}

/* Idle connections must not keep buffers: tens of thousands of them would
 * make the client's footprint the story. */
static void buf_free(struct buf *b) {
  free(b->p);
  memset(b, 0, sizeof *b);
}

/* ---- latency histogram: 64 sub-buckets per power of two (~1.6%) -------- */

#define HIST_SUB 64u
#define HIST_N (HIST_SUB + 58u * HIST_SUB)

struct hist {
  uint64_t c[HIST_N];
  uint64_t n, max;
  double sum;
};

static unsigned hist_index(uint64_t v) {
  if (v < HIST_SUB) return (unsigned)v;
  unsigned e = 63u - (unsigned)__builtin_clzll(v); /* >= 6 */
  unsigned mant = (unsigned)(v >> (e - 6)) - HIST_SUB;
  return HIST_SUB + (e - 6) * HIST_SUB + mant;
}

/* Middle of bucket i. */
static uint64_t hist_value(unsigned i) {
  if (i < HIST_SUB) return i;
  unsigned e = (i - HIST_SUB) / HIST_SUB + 6, mant = (i - HIST_SUB) % HIST_SUB;
  uint64_t lo = (uint64_t)(HIST_SUB + mant) << (e - 6);
  return lo + ((1ull << (e - 6)) >> 1);
}

static void hist_add(struct hist *h, uint64_t v) {
  h->c[hist_index(v)]++;
  h->n++;
  h->sum += (double)v;
  if (v > h->max) h->max = v;
}

/* q in (0, 1]; NAN when empty. */
static double hist_quantile(const struct hist *h, double q) {
  if (!h->n) return NAN;
  uint64_t rank = (uint64_t)ceil(q * (double)h->n), cum = 0;
  if (rank == 0) rank = 1;
  for (unsigned i = 0; i < HIST_N; i++) {
    cum += h->c[i];
    if (cum >= rank) {
      uint64_t v = hist_value(i);
      return (double)(v < h->max ? v : h->max);
    }
  }
  return (double)h->max;
}

/* ---- /proc readings of the server -------------------------------------- */

static ssize_t read_small_file(const char *path, char *out, size_t cap) {
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  size_t n = fread(out, 1, cap - 1, f);
  fclose(f);
  out[n] = 0;
  return (ssize_t)n;
}

/* utime + stime of every thread of the process, in seconds, and the stime
 * part of it in *sys; NAN if gone. */
static double proc_cpu(pid_t pid, double *sys) {
  char path[64], text[2048];
  snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  if (read_small_file(path, text, sizeof text) < 0) return NAN;
  /* comm may contain spaces and parentheses: fields restart after the last ')' */
  char *p = strrchr(text, ')');
  if (!p) return NAN;
  p++;
  for (int field = 3; field < 14; field++) { /* skip to field 14 (utime) */
    p = strchr(p + 1, ' ');
    if (!p) return NAN;
  }
  unsigned long long ut, st;
  if (sscanf(p, " %llu %llu", &ut, &st) != 2) return NAN;
  *sys = (double)st / (double)sysconf(_SC_CLK_TCK);
  return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* VmRSS in KiB; -1 if unknown. */
static long proc_rss_kb(pid_t pid) {
  char path[64], text[8192];
  snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
  if (read_small_file(path, text, sizeof text) < 0) return -1;
  char *p = strstr(text, "\nVmRSS:");
  return p ? strtol(p + 7, NULL, 10) : -1;
}

static double self_cpu(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
         ((double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_usec) * 1e-6;
}

/* ---- options and target ------------------------------------------------ */

enum mode { M_ECHO, M_CONNECT, M_IDLE, M_BROADCAST };
static const char *const MODE_NAMES[] = {"echo", "connect", "idle", "broadcast"};

struct target {
  struct sockaddr_storage addr;
  socklen_t addrlen;
  bool tls; /* wss:// */
  char *request; /* handshake request up to (excluding) the key line */
  size_t request_len;
};

struct opts {
  enum mode mode;
  const char *url, *pub_url, *protocol;
  uint32_t conns, size, inflight, sources, max_pending, max_errors;
  bool text, json, size_set, conns_set;
  bool deflate;      /* offer permessage-deflate */
  bool json_payload; /* --payload json */
  uint64_t messages; /* echo: messages to send in all, 0: until --duration ends */
  double duration, warmup, hold, timeout, publish_rate;
  pid_t pids[MAX_PIDS];
  int npids;
};

static void usage(FILE *f) {
  fputs(
      "usage: loadgen MODE --url ws://127.0.0.1:PORT/path [options]\n"
      "modes:\n"
      "  echo       each connection keeps --inflight messages in flight, verifies the echoes\n"
      "  connect    --conns concurrent cycles of connect, handshake, close 1000, TCP close\n"
      "  idle       opens --conns connections, holds them --hold seconds (answers pings)\n"
      "  broadcast  --conns subscribers + 1 publisher; counts deliveries of what it publishes\n"
      "options:\n"
      "  --url U            ws:// or wss:// target, loopback only (127.0.0.0/8 or [::1]);\n"
      "                     wss:// does not verify the server's certificate\n"
      "  --conns N          connections / concurrent cycles / subscribers (default 1, idle 100, broadcast 10)\n"
      "  --size N           message payload bytes (default 32, broadcast 64; broadcast needs >= 39)\n"
      "  --text             send text messages (default binary)\n"
      "  --payload KIND     random (default) or json: chat-like JSON text, as compressible as real\n"
      "                     messages (implies --text)\n"
      "  --deflate          offer permessage-deflate (no context takeover either way); the server\n"
      "                     must accept it. Reports wire bytes per payload byte each way\n"
      "  --inflight K       messages in flight per connection (echo) or per publisher (broadcast) (default 1)\n"
      "  --duration S       measured seconds (default 5)\n"
      "  --messages N       echo: send N messages in all and end once they are echoed (with\n"
      "                     --warmup 0 all are measured); for instruction counts under valgrind\n"
      "  --warmup S         unmeasured seconds before (default 1)\n"
      "  --hold S           idle: seconds to hold the connections (default 5)\n"
      "  --publish-rate R   broadcast: R messages/s instead of --inflight flow control\n"
      "  --pub-url U        broadcast: the publisher's URL (default --url)\n"
      "  --protocol P       offer subprotocol P (the server must select it)\n"
      "  --pid P[,P...]     server process(es): CPU per operation, RSS (idle)\n"
      "  --sources N        spread connections over 127.0.0.1..127.0.0.N (default 1 per 20000 conns)\n"
      "  --max-pending N    handshakes in progress at once while opening (default 64)\n"
      "  --timeout S        per-step timeout: connect, handshake, echo, close (default 10)\n"
      "  --max-errors N     stop the run after N errors (default 100)\n"
      "  --json             print one JSON object instead of text\n"
      "exit status: 0 ok, 1 some verification or connection failed, 2 usage or setup error\n",
      f);
}

static double parse_num(const char *opt, const char *s, double lo, double hi) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || end == s || *end || !(v >= lo && v <= hi)) die("%s: '%s' is not a number in [%g, %g]", opt, s, lo, hi);
  return v;
}

static void parse_pids(struct opts *o, const char *s) {
  char *copy = strdup(s), *save = NULL;
  for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
    if (o->npids == MAX_PIDS) die("--pid: at most %d processes", MAX_PIDS);
    pid_t pid = (pid_t)parse_num("--pid", t, 1, 4194304);
    double sys;
    if (isnan(proc_cpu(pid, &sys))) die("--pid: cannot read /proc/%d/stat", (int)pid);
    o->pids[o->npids++] = pid;
  }
  free(copy);
}

static void parse_args(struct opts *o, int argc, char **argv) {
  enum { O_URL = 256, O_CONNS, O_SIZE, O_TEXT, O_INFLIGHT, O_DURATION, O_WARMUP, O_HOLD, O_RATE, O_PUBURL,
         O_PROTOCOL, O_PID, O_SOURCES, O_PENDING, O_TIMEOUT, O_MAXERR, O_JSON, O_HELP, O_DEFLATE, O_PAYLOAD,
         O_MESSAGES };
  static const struct option longopts[] = {
      {"url", 1, 0, O_URL},         {"conns", 1, 0, O_CONNS},       {"size", 1, 0, O_SIZE},
      {"text", 0, 0, O_TEXT},       {"inflight", 1, 0, O_INFLIGHT}, {"duration", 1, 0, O_DURATION},
      {"warmup", 1, 0, O_WARMUP},   {"hold", 1, 0, O_HOLD},         {"publish-rate", 1, 0, O_RATE},
      {"pub-url", 1, 0, O_PUBURL},  {"protocol", 1, 0, O_PROTOCOL}, {"pid", 1, 0, O_PID},
      {"sources", 1, 0, O_SOURCES}, {"max-pending", 1, 0, O_PENDING}, {"timeout", 1, 0, O_TIMEOUT},
      {"max-errors", 1, 0, O_MAXERR}, {"json", 0, 0, O_JSON},       {"help", 0, 0, O_HELP},
      {"deflate", 0, 0, O_DEFLATE}, {"payload", 1, 0, O_PAYLOAD},   {"messages", 1, 0, O_MESSAGES},
      {0, 0, 0, 0}};
  *o = (struct opts){.conns = 1, .size = 32, .inflight = 1, .max_pending = 64, .max_errors = 100,
                     .duration = 5, .warmup = 1, .hold = 5, .timeout = 10};
  int c;
  while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
    switch (c) {
    case O_URL: o->url = optarg; break;
    case O_CONNS: o->conns = (uint32_t)parse_num("--conns", optarg, 1, MAX_CONNS), o->conns_set = true; break;
    case O_SIZE: o->size = (uint32_t)parse_num("--size", optarg, 0, MAX_SIZE), o->size_set = true; break;
    case O_TEXT: o->text = true; break;
    case O_INFLIGHT: o->inflight = (uint32_t)parse_num("--inflight", optarg, 1, MAX_INFLIGHT); break;
    case O_DURATION: o->duration = parse_num("--duration", optarg, 0.01, 86400); break;
    case O_WARMUP: o->warmup = parse_num("--warmup", optarg, 0, 86400); break;
    case O_HOLD: o->hold = parse_num("--hold", optarg, 0, 86400); break;
    case O_RATE: o->publish_rate = parse_num("--publish-rate", optarg, 0.001, 1e8); break;
    case O_PUBURL: o->pub_url = optarg; break;
    case O_PROTOCOL: o->protocol = optarg; break;
    case O_PID: parse_pids(o, optarg); break;
    case O_SOURCES: o->sources = (uint32_t)parse_num("--sources", optarg, 1, MAX_SOURCES); break;
    case O_PENDING: o->max_pending = (uint32_t)parse_num("--max-pending", optarg, 1, MAX_CONNS); break;
    case O_TIMEOUT: o->timeout = parse_num("--timeout", optarg, 0.01, 3600); break;
    case O_MAXERR: o->max_errors = (uint32_t)parse_num("--max-errors", optarg, 1, 1e9); break;
    case O_JSON: o->json = true; break;
    case O_DEFLATE: o->deflate = true; break;
    case O_MESSAGES: o->messages = (uint64_t)parse_num("--messages", optarg, 1, 1e12); break;
    case O_PAYLOAD:
      if (!strcmp(optarg, "json")) o->json_payload = o->text = true;
      else if (strcmp(optarg, "random")) die("--payload: 'random' or 'json'");
      break;
    case 'h': case O_HELP: usage(stdout); exit(0);
    default: usage(stderr); exit(2);
    }
  }
  if (optind != argc - 1) {
    usage(stderr);
    exit(2);
  }
  const char *m = argv[optind];
  unsigned i = 0;
  while (i < 4 && strcmp(m, MODE_NAMES[i])) i++;
  if (i == 4) die("unknown mode '%s' (echo, connect, idle, broadcast)", m);
  o->mode = (enum mode)i;
  if (!o->url) die("--url is required");
  if (o->mode == M_IDLE && !o->conns_set) o->conns = 100;
  if (o->mode == M_BROADCAST && !o->conns_set) o->conns = 10;
  if (o->mode == M_BROADCAST && !o->size_set) o->size = 64;
  if (o->mode == M_BROADCAST && o->size < TOKEN_LEN) die("broadcast needs --size >= %u (timestamp token)", TOKEN_LEN);
  if (o->protocol && strpbrk(o->protocol, "\r\n")) die("--protocol: invalid value");
  if (o->messages && o->mode != M_ECHO) die("--messages is for echo mode");
}

/* Accepts ws[s]://HOST[:PORT][/path][?query] where HOST is an IPv4 address in
 * 127.0.0.0/8, [::1] or localhost: this tool must never load anyone else's
 * machine. */
static void parse_url(const struct opts *o, const char *url, struct target *t) {
  t->tls = !strncmp(url, "wss://", 6);
  if (!t->tls && strncmp(url, "ws://", 5)) die("%s: only ws:// and wss:// URLs are supported", url);
  const char *h = url + (t->tls ? 6 : 5), *hend, *rest;
  char host[64];
  if (*h == '[') {
    hend = strchr(h, ']');
    if (!hend) die("%s: unterminated [", url);
    rest = hend + 1;
    h++;
  } else {
    hend = h + strcspn(h, ":/?#");
    rest = hend;
  }
  if ((size_t)(hend - h) >= sizeof host || hend == h) die("%s: bad host", url);
  memcpy(host, h, (size_t)(hend - h));
  host[hend - h] = 0;
  unsigned long port = t->tls ? 443 : 80;
  if (*rest == ':') {
    char *end;
    port = strtoul(rest + 1, &end, 10);
    if (end == rest + 1 || port == 0 || port > 65535) die("%s: bad port", url);
    rest = end;
  }
  if (*rest && *rest != '/' && *rest != '?' && *rest != '#') die("%s: bad URL", url);
  size_t plen = strcspn(rest, "#");
  if (strpbrk(rest, " \r\n\t")) die("%s: the path must not contain spaces or line breaks", url);

  memset(&t->addr, 0, sizeof t->addr);
  struct sockaddr_in *a4 = (struct sockaddr_in *)&t->addr;
  struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&t->addr;
  if (!strcmp(host, "localhost")) strcpy(host, "127.0.0.1");
  if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
    if ((ntohl(a4->sin_addr.s_addr) >> 24) != 127) die("refusing %s: only loopback targets (127.0.0.0/8, ::1)", host);
    a4->sin_family = AF_INET;
    a4->sin_port = htons((uint16_t)port);
    t->addrlen = sizeof *a4;
  } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
    if (!IN6_IS_ADDR_LOOPBACK(&a6->sin6_addr)) die("refusing %s: only loopback targets (127.0.0.0/8, ::1)", host);
    a6->sin6_family = AF_INET6;
    a6->sin6_port = htons((uint16_t)port);
    t->addrlen = sizeof *a6;
  } else {
    die("refusing '%s': give a loopback IP address (127.0.0.0/8, [::1]) or localhost", host);
  }

  /* Everything but the per-connection key is the same for every handshake. */
  char hostport[80];
  snprintf(hostport, sizeof hostport, t->addr.ss_family == AF_INET6 ? "[%s]:%lu" : "%s:%lu", host, port);
  int n = asprintf(&t->request,
                   "GET %s%.*s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Version: 13\r\n%s%s%s%s",
                   *rest == '/' ? "" : "/", (int)plen, rest, hostport, o->protocol ? "Sec-WebSocket-Protocol: " : "",
                   o->protocol ? o->protocol : "", o->protocol ? "\r\n" : "", o->deflate ? PMD_OFFER : "");
  if (n < 0) die("out of memory");
  t->request_len = (size_t)n;
}

/* ---- connections and run state ----------------------------------------- */

enum cstate { CS_FREE, CS_CONNECTING, CS_HANDSHAKE, CS_OPEN, CS_CLOSING };
static const char *const STATE_NAMES[] = {"free", "connecting", "handshake", "open", "closing"};

enum role { R_ECHO, R_CYCLE, R_IDLE, R_SUB, R_PUB };

enum phase { PH_OPENING, PH_SETTLE, PH_WARMUP, PH_MEASURE, PH_HOLD, PH_CLOSING, PH_DONE };

enum ekind { E_CONNECT, E_HANDSHAKE, E_VERIFY, E_PROTOCOL, E_CLOSED, E_TIMEOUT, E_LOST, E_N };
static const char *const EKIND_NAMES[] = {"connect", "handshake", "verify", "protocol", "closed", "timeout", "lost"};

struct conn {
  int fd;
  uint32_t id;
  uint8_t state, role;
  bool epout;      /* EPOLLOUT is registered */
  bool close_sent; /* we sent a close frame */
  bool close_rcvd; /* the server sent a close frame */
  bool bad;        /* an error was counted: the eventual drop is not clean */
  uint8_t frag_op; /* opcode of the fragmented message being assembled, 0 if none */
  bool frag_z;     /* ... and it is compressed (RSV1 on its first frame) */
  bool pmd;        /* permessage-deflate was agreed */
  bool tls_read_first; /* the last SSL_write needs the socket readable first */
  SSL *ssl;        /* wss:// */
  char accept[32]; /* Sec-WebSocket-Accept the server must answer */
  size_t need;     /* bytes of the incomplete frame at the head of rbuf */
  struct buf rbuf, wbuf, frag;
  uint64_t t_start;  /* connect() time */
  uint64_t deadline; /* 0: nothing awaited */
  uint64_t sent;     /* echo: messages sent */
  uint64_t rcvd;     /* echo: echoes verified; sub: next expected broadcast seq */
  uint64_t *t_sent;  /* echo: send time of message seq at [seq % inflight] */
};

/* Server/client CPU and server RSS at one instant. */
struct snap {
  uint64_t t;
  double srv_cpu, srv_sys, self_cpu; /* srv_sys: the server's in the kernel */
  long rss_kb;
};
enum { SNAP_START, SNAP_M0, SNAP_M1, SNAP_N };

/* Counted only inside the measured window. */
struct counters {
  uint64_t ops;        /* echoes, cycles, handshakes (idle), deliveries */
  uint64_t bytes;      /* payload bytes of those */
  uint64_t published;  /* broadcast */
  uint64_t pings, foreign, wrapped;
  uint64_t wire_out, payload_out; /* data frames sent: bytes with headers / message payload */
  uint64_t wire_in, payload_in;   /* data frames received: bytes with headers / message payload */
};

struct lg {
  struct opts o;
  struct target tgt, pub_tgt;
  int ep;
  struct conn *conns;
  uint32_t nconns, nsubs;
  uint32_t *to_open, nto_open; /* stack of free slots to (re)open */
  uint32_t pending, nopen, opened, nfailed;
  uint32_t next_source;
  enum phase phase;
  uint64_t phase_end, next_scan;
  uint64_t max_frame;
  uint8_t *pattern, *scratch;
  SSL_CTX *tls;             /* when a target is wss:// */
  z_stream zdef, zinf;      /* --deflate: reset for every message */
  struct buf zout, zin;     /* compressed message being sent, inflated message received */
  uint64_t rng;
  struct snap snaps[SNAP_N];
  struct counters cnt;
  struct hist hist;
  uint64_t errors[E_N], errors_total;
  const char *stop_reason;
  /* broadcast */
  struct conn *pub;
  uint32_t *remaining, ring; /* per outstanding seq: subscribers still to deliver */
  uint64_t pub_seq, pub_acked, pub_t0, pub_progress;
  uint32_t subs_alive;
  /* echo --messages */
  uint64_t echo_sent, echo_done;
};

static bool role_sends(enum role r) { return r == R_ECHO || r == R_PUB; }

static uint64_t timeout_ns(const struct lg *lg) { return (uint64_t)(lg->o.timeout * 1e9); }

static void take_snap(const struct lg *lg, struct snap *s) {
  s->t = now_ns();
  s->srv_cpu = s->srv_sys = lg->o.npids ? 0 : NAN;
  s->rss_kb = lg->o.npids ? 0 : -1;
  for (int i = 0; i < lg->o.npids; i++) {
    long rss = proc_rss_kb(lg->o.pids[i]);
    double sys = NAN;
    s->srv_cpu += proc_cpu(lg->o.pids[i], &sys);
    s->srv_sys += sys;
    s->rss_kb = (rss < 0 || s->rss_kb < 0) ? -1 : s->rss_kb + rss;
  }
  s->self_cpu = self_cpu();
}

static void conn_drop(struct lg *lg, struct conn *c, bool clean);

/* Counts an error against c, prints the first few, and drops c. Returns -1
 * so that handlers can `return conn_fail(...)` and stop touching c. */
static int conn_fail(struct lg *lg, struct conn *c, enum ekind k, const char *fmt, ...) {
  lg->errors[k]++;
  lg->errors_total++;
  if (lg->errors_total <= ERR_PRINT_MAX) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "loadgen: conn %u (%s): %s error: ", c->id, STATE_NAMES[c->state], EKIND_NAMES[k]);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    if (lg->errors_total == ERR_PRINT_MAX) fprintf(stderr, "loadgen: further errors are only counted\n");
  }
  conn_drop(lg, c, false);
  return -1;
}

/* Like conn_fail but keeps the connection (the error is in one message). */
static void conn_note(struct lg *lg, struct conn *c, enum ekind k, const char *fmt, ...) {
  lg->errors[k]++;
  lg->errors_total++;
  c->bad = true;
  if (lg->errors_total <= ERR_PRINT_MAX) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "loadgen: conn %u: %s error: ", c->id, EKIND_NAMES[k]);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
  }
}

/* ---- socket I/O, plain or TLS ------------------------------------------ */

/* SSL_read/SSL_write results mapped to recv/send's: bytes, 0 for the end of
 * the stream, or -1 with errno (EAGAIN: wait for readiness; EPROTO: a TLS
 * error, see io_error). The TLS handshake happens inside the first calls. */
static ssize_t tls_result(struct conn *c, int r, bool writing) {
  if (r > 0) {
    if (writing) c->tls_read_first = false;
    return r;
  }
  switch (SSL_get_error(c->ssl, r)) {
  case SSL_ERROR_WANT_READ:
    if (writing) c->tls_read_first = true;
    errno = EAGAIN;
    return -1;
  case SSL_ERROR_WANT_WRITE: errno = EAGAIN; return -1;
  case SSL_ERROR_ZERO_RETURN: return 0;
  case SSL_ERROR_SYSCALL:
    if (!errno) errno = ECONNRESET;
    return -1;
  default: errno = EPROTO; return -1;
  }
}

static ssize_t conn_send(struct conn *c, const uint8_t *p, size_t n) {
  if (!c->ssl) return send(c->fd, p, n, MSG_NOSIGNAL);
  ERR_clear_error();
  return tls_result(c, SSL_write(c->ssl, p, (int)(n > INT_MAX ? INT_MAX : n)), true);
}

static ssize_t conn_recv(struct conn *c, uint8_t *p, size_t n) {
  if (!c->ssl) return recv(c->fd, p, n, 0);
  ERR_clear_error();
  return tls_result(c, SSL_read(c->ssl, p, (int)(n > INT_MAX ? INT_MAX : n)), false);
}

static const char *io_error(int err) {
  if (err != EPROTO) return strerror(err);
  const char *why = ERR_reason_error_string(ERR_peek_last_error());
  return why ? why : "TLS error";
}

/* ---- sending ----------------------------------------------------------- */

static int conn_want_out(struct lg *lg, struct conn *c, bool want) {
  if (c->epout == want) return 0;
  struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};
  if (epoll_ctl(lg->ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) return conn_fail(lg, c, E_CLOSED, "epoll_ctl: %s", strerror(errno));
  c->epout = want;
  return 0;
}

/* Writes as much of wbuf as the socket takes; EPOLLOUT covers the rest. */
static int conn_flush(struct lg *lg, struct conn *c) {
  struct buf *b = &c->wbuf;
  if (c->state == CS_CONNECTING) return 0;
  while (buf_avail(b)) {
    ssize_t n = conn_send(c, buf_data(b), buf_avail(b));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) break;
    if (n <= 0) {
      if (c->close_rcvd) { /* the server closed after its close frame: nothing more to say */
        conn_drop(lg, c, !c->bad);
        return -1;
      }
      return conn_fail(lg, c, E_CLOSED, "send: %s", n < 0 ? io_error(errno) : "TLS connection closed");
    }
    buf_consume(b, (size_t)n);
  }
  if (!buf_avail(b) && (!role_sends(c->role) || b->cap > (1u << 20))) buf_free(b);
  /* a TLS write waiting for the server's handshake bytes resumes on EPOLLIN */
  return conn_want_out(lg, c, buf_avail(b) > 0 && !c->tls_read_first);
}

/* Appends one masked frame whose payload is a followed by b (two parts so
 * that a stamp and the shared pattern need no temporary copy). op may carry
 * the RSV1 bit (0x40) of a compressed message. */
static void conn_put_frame(struct lg *lg, struct conn *c, unsigned op, const uint8_t *a, size_t na, const uint8_t *b,
                           size_t nb) {
  size_t len = na + nb, hl;
  uint8_t hdr[14];
  hdr[0] = (uint8_t)(0x80 | op);
  if (len < 126) {
    hdr[1] = (uint8_t)(0x80 | len);
    hl = 2;
  } else if (len <= 0xffff) {
    hdr[1] = 0x80 | 126;
    hdr[2] = (uint8_t)(len >> 8), hdr[3] = (uint8_t)len;
    hl = 4;
  } else {
    hdr[1] = 0x80 | 127;
    for (int i = 0; i < 8; i++) hdr[2 + i] = (uint8_t)((uint64_t)len >> (56 - 8 * i));
    hl = 10;
  }
  uint32_t k32 = (uint32_t)rng_next(&lg->rng);
  memcpy(hdr + hl, &k32, 4);
  const uint8_t *key = hdr + hl;
  hl += 4;
  buf_reserve(&c->wbuf, hl + len);
  uint8_t *w = c->wbuf.p + c->wbuf.len;
  unsigned pos = 0;
  memcpy(w, hdr, hl);
  mask_copy(w + hl, a, na, key, &pos);
  mask_copy(w + hl + na, b, nb, key, &pos);
  c->wbuf.len += hl + len;
  if (!(op & 8) && lg->phase == PH_MEASURE) lg->cnt.wire_out += hl + len;
}

/* Raw deflate of a followed by b into lg->zout, without the 00 00 ff ff
 * that Z_SYNC_FLUSH leaves at the end (RFC 7692 7.2.1). */
static void pmd_compress(struct lg *lg, const uint8_t *a, size_t na, const uint8_t *b, size_t nb) {
  z_stream *z = &lg->zdef;
  struct buf *o = &lg->zout;
  deflateReset(z);
  o->off = o->len = 0;
  buf_reserve(o, deflateBound(z, (uLong)(na + nb)) + 16);
  z->next_out = o->p;
  z->avail_out = (uInt)o->cap;
  z->next_in = (Bytef *)a;
  z->avail_in = (uInt)na;
  if (deflate(z, Z_NO_FLUSH) == Z_STREAM_ERROR) die("deflate failed");
  z->next_in = (Bytef *)b;
  z->avail_in = (uInt)nb;
  if (deflate(z, Z_SYNC_FLUSH) == Z_STREAM_ERROR || z->avail_in) die("deflate failed");
  o->len = o->cap - z->avail_out;
  if (o->len < 4 || memcmp(o->p + o->len - 4, "\0\0\xff\xff", 4)) die("deflate: no sync flush marker");
  o->len -= 4;
}

/* One data message, compressed if permessage-deflate was agreed. */
static void conn_put_data(struct lg *lg, struct conn *c, const uint8_t *a, size_t na, const uint8_t *b, size_t nb) {
  unsigned op = lg->o.text ? 1 : 2;
  if (lg->phase == PH_MEASURE) lg->cnt.payload_out += na + nb;
  if (!c->pmd) {
    conn_put_frame(lg, c, op, a, na, b, nb);
    return;
  }
  pmd_compress(lg, a, na, b, nb);
  conn_put_frame(lg, c, 0x40 | op, buf_data(&lg->zout), buf_avail(&lg->zout), NULL, 0);
}

/* Inflates a compressed message into lg->zin; false if it is corrupt or
 * inflates to more than the largest message expected. */
static bool pmd_inflate(struct lg *lg, const uint8_t *p, size_t n) {
  static const uint8_t tail[4] = {0, 0, 0xff, 0xff};
  z_stream *z = &lg->zinf;
  struct buf *o = &lg->zin;
  inflateReset(z);
  o->off = o->len = 0;
  for (int part = 0; part < 2; part++) {
    z->next_in = (Bytef *)(part ? tail : p);
    z->avail_in = (uInt)(part ? 4 : n);
    while (z->avail_in) {
      if (o->len == o->cap) {
        if (o->len >= lg->max_frame) return false;
        buf_reserve(o, o->cap ? o->cap : 4096);
      }
      z->next_out = o->p + o->len;
      z->avail_out = (uInt)(o->cap - o->len);
      int r = inflate(z, Z_SYNC_FLUSH);
      o->len = o->cap - z->avail_out;
      if (r == Z_STREAM_END) return o->len <= lg->max_frame; /* a final block: the tail is not needed */
      if (r != Z_OK && r != Z_BUF_ERROR) return false;
      if (r == Z_BUF_ERROR && z->avail_out) return false; /* no progress possible */
    }
  }
  return o->len <= lg->max_frame;
}

static void conn_put_close(struct lg *lg, struct conn *c, unsigned code) {
  uint8_t p[2] = {(uint8_t)(code >> 8), (uint8_t)code};
  conn_put_frame(lg, c, 8, p, code ? 2 : 0, NULL, 0);
  c->close_sent = true;
}

/* Starts the closing handshake (or abandons a connection still opening). */
static void conn_close(struct lg *lg, struct conn *c) {
  if (c->state == CS_CONNECTING || c->state == CS_HANDSHAKE) {
    conn_drop(lg, c, true);
    return;
  }
  if (c->state != CS_OPEN) return;
  conn_put_close(lg, c, 1000);
  c->state = CS_CLOSING;
  c->deadline = now_ns() + timeout_ns(lg);
  conn_flush(lg, c);
}

/* ---- echo mode --------------------------------------------------------- */

static unsigned data_op(const struct lg *lg) { return lg->o.text ? 1 : 2; }

static uint64_t echo_stamp_value(const struct conn *c, uint64_t seq) { return seq ^ ((uint64_t)c->id << 40); }

static bool sending_phase(const struct lg *lg) { return lg->phase == PH_WARMUP || lg->phase == PH_MEASURE; }

/* Tops the connection up to --inflight messages. Payload: 16 hex digits of
 * (seq, conn) then the shared pattern, so each echo is checked in full
 * against a message that can be told apart from its neighbours. */
static void echo_fill(struct lg *lg, struct conn *c, uint64_t now) {
  size_t size = lg->o.size, ns = size < STAMP_LEN ? size : STAMP_LEN;
  while (sending_phase(lg) && c->state == CS_OPEN && c->sent - c->rcvd < lg->o.inflight &&
         (!lg->o.messages || lg->echo_sent < lg->o.messages)) {
    uint8_t stamp[STAMP_LEN];
    hex16_put(stamp, echo_stamp_value(c, c->sent));
    conn_put_data(lg, c, stamp, ns, lg->pattern + ns, size - ns);
    c->t_sent[c->sent % lg->o.inflight] = now;
    c->sent++;
    lg->echo_sent++;
  }
  /* while closing, the close deadline stands */
  if (c->state == CS_OPEN) c->deadline = c->sent > c->rcvd ? now + timeout_ns(lg) : 0;
}

/* Byte-exact check of echo number seq; on mismatch says where. */
static bool echo_matches(struct lg *lg, struct conn *c, uint64_t seq, unsigned op, const uint8_t *p, size_t n) {
  size_t size = lg->o.size, ns = size < STAMP_LEN ? size : STAMP_LEN;
  if (op != data_op(lg) || n != size) {
    conn_note(lg, c, E_VERIFY, "message %" PRIu64 ": sent %zu bytes %s, got %zu bytes %s", seq, size,
              lg->o.text ? "text" : "binary", n, op == 1 ? "text" : "binary");
    return false;
  }
  uint8_t stamp[STAMP_LEN];
  hex16_put(stamp, echo_stamp_value(c, seq));
  if (!memcmp(p, stamp, ns) && !memcmp(p + ns, lg->pattern + ns, size - ns)) return true;
  size_t i = 0;
  while (i < size && p[i] == (i < ns ? stamp[i] : lg->pattern[i])) i++;
  conn_note(lg, c, E_VERIFY, "message %" PRIu64 " (%zu bytes): echoed byte %zu differs", seq, size, i);
  return false;
}

/* Echoes come back in order, so the oldest message in flight is the one.
 * A bad echo is counted but still retires its slot: the connection keeps
 * --inflight messages going. */
static int echo_verify(struct lg *lg, struct conn *c, unsigned op, const uint8_t *p, size_t n, uint64_t now) {
  if (c->rcvd == c->sent) {
    conn_note(lg, c, E_VERIFY, "a message arrived but none is in flight");
    return 0;
  }
  uint64_t seq = c->rcvd++;
  lg->echo_done++;
  if (echo_matches(lg, c, seq, op, p, n) && lg->phase == PH_MEASURE) {
    lg->cnt.ops++;
    lg->cnt.bytes += n;
    hist_add(&lg->hist, now - c->t_sent[seq % lg->o.inflight]);
  }
  echo_fill(lg, c, now);
  return 0;
}

/* ---- broadcast mode ---------------------------------------------------- */

static void pub_advance(struct lg *lg, uint64_t now) {
  while (lg->pub_acked < lg->pub_seq && lg->remaining[lg->pub_acked % lg->ring] == 0) {
    lg->pub_acked++;
    lg->pub_progress = now;
  }
}

/* One subscriber has the message (or will never get it). */
static void pub_delivered(struct lg *lg, uint64_t seq, uint64_t now) {
  if (seq < lg->pub_acked || seq >= lg->pub_seq) return;
  uint32_t *r = &lg->remaining[seq % lg->ring];
  if (*r && --*r == 0) pub_advance(lg, now);
}

static void pub_publish(struct lg *lg, struct conn *c, uint64_t now) {
  uint64_t seq = lg->pub_seq++;
  uint8_t tok[TOKEN_LEN];
  memcpy(tok, TOKEN_TAG, 5);
  hex16_put(tok + 5, seq);
  tok[21] = ':';
  hex16_put(tok + 22, now);
  tok[38] = ';';
  conn_put_data(lg, c, tok, TOKEN_LEN, lg->pattern + TOKEN_LEN, lg->o.size - TOKEN_LEN);
  if (lg->pub_seq - lg->pub_acked == 1) lg->pub_progress = now; /* stall clock starts now */
  lg->remaining[seq % lg->ring] = lg->subs_alive;
  if (!lg->subs_alive) pub_advance(lg, now);
  if (lg->phase == PH_MEASURE) lg->cnt.published++;
}

/* Publishes what is due: --publish-rate paces by the clock, otherwise at
 * most --inflight messages wait for delivery to every subscriber. */
static void pub_fill(struct lg *lg, uint64_t now) {
  struct conn *c = lg->pub;
  if (!c || c->state != CS_OPEN || !sending_phase(lg)) return;
  uint64_t due = UINT64_MAX;
  if (lg->o.publish_rate > 0) due = (uint64_t)(lg->o.publish_rate * (double)(now - lg->pub_t0) / 1e9) + 1;
  uint32_t window = lg->o.publish_rate > 0 ? lg->ring : lg->o.inflight;
  while (lg->pub_seq < due && lg->pub_seq - lg->pub_acked < window && buf_avail(&c->wbuf) < PUB_WBUF_MAX)
    pub_publish(lg, c, now);
  conn_flush(lg, c);
}

/* A subscriber is gone: it will deliver nothing of what is outstanding. */
static void sub_gone(struct lg *lg, struct conn *c, uint64_t now) {
  if (lg->subs_alive) lg->subs_alive--;
  for (uint64_t s = c->rcvd > lg->pub_acked ? c->rcvd : lg->pub_acked; s < lg->pub_seq; s++) pub_delivered(lg, s, now);
}

/* Finds the token, checks that the published payload is there intact, and
 * that this subscriber sees the sequence without gaps. Messages without a
 * token (a chat server's notices) are counted and ignored. */
static int sub_deliver(struct lg *lg, struct conn *c, unsigned op, const uint8_t *p, size_t n, uint64_t now) {
  const uint8_t *t = n >= 5 && !memcmp(p, TOKEN_TAG, 5) ? p : memmem(p, n, TOKEN_TAG, 5);
  bool measuring = lg->phase == PH_MEASURE;
  if (!t) {
    lg->cnt.foreign += measuring;
    return 0;
  }
  size_t off = (size_t)(t - p), size = lg->o.size;
  uint64_t seq, ts;
  if (n - off < size || hex16_get(t + 5, &seq) || t[21] != ':' || hex16_get(t + 22, &ts) || t[38] != ';' ||
      memcmp(t + TOKEN_LEN, lg->pattern + TOKEN_LEN, size - TOKEN_LEN)) {
    conn_note(lg, c, E_VERIFY, "broadcast message of %zu bytes does not contain the published payload intact", n);
    return 0;
  }
  bool verbatim = off == 0 && n == size;
  if (verbatim && op != data_op(lg)) conn_note(lg, c, E_VERIFY, "broadcast arrived as %s", op == 1 ? "text" : "binary");
  if (!verbatim) lg->cnt.wrapped += measuring;
  if (seq < c->rcvd || seq >= lg->pub_seq) {
    conn_note(lg, c, E_VERIFY, "broadcast %" PRIu64 " arrived out of order (expected %" PRIu64 ")", seq, c->rcvd);
    return 0;
  }
  if (seq > c->rcvd) {
    lg->errors[E_LOST] += seq - c->rcvd - 1; /* conn_note counts one */
    lg->errors_total += seq - c->rcvd - 1;
    conn_note(lg, c, E_LOST, "broadcasts %" PRIu64 "..%" PRIu64 " never arrived", c->rcvd, seq - 1);
    for (uint64_t s = c->rcvd; s < seq; s++) pub_delivered(lg, s, now);
  }
  c->rcvd = seq + 1;
  pub_delivered(lg, seq, now);
  if (measuring) {
    lg->cnt.ops++;
    lg->cnt.bytes += size;
    hist_add(&lg->hist, now > ts ? now - ts : 0);
  }
  return 0;
}

/* ---- receiving --------------------------------------------------------- */

static int deliver_message(struct lg *lg, struct conn *c, unsigned op, bool z, const uint8_t *p, size_t n,
                           uint64_t now) {
  if (z) {
    if (!pmd_inflate(lg, p, n)) return conn_fail(lg, c, E_PROTOCOL, "compressed message is corrupt or too large");
    p = buf_data(&lg->zin);
    n = buf_avail(&lg->zin);
  }
  if (lg->phase == PH_MEASURE) lg->cnt.payload_in += n;
  switch ((enum role)c->role) {
  case R_ECHO: return echo_verify(lg, c, op, p, n, now);
  case R_SUB: return sub_deliver(lg, c, op, p, n, now);
  case R_PUB: return 0; /* broadcast servers usually send the publisher its own messages */
  default: return conn_fail(lg, c, E_PROTOCOL, "unexpected %zu-byte data message", n);
  }
}

/* The server's close frame: expected after ours, an error otherwise. Either
 * way the server must then close the TCP connection. */
static int on_close_frame(struct lg *lg, struct conn *c, const uint8_t *p, size_t n) {
  if (n == 1) return conn_fail(lg, c, E_PROTOCOL, "close frame with a 1-byte payload");
  unsigned code = n >= 2 ? (unsigned)p[0] << 8 | p[1] : 1005;
  c->close_rcvd = true;
  if (c->close_sent) {
    if (code != 1000) conn_note(lg, c, E_CLOSED, "server answered our close with code %u", code);
  } else {
    int rl = n > 2 ? (int)(n - 2 > 60 ? 60 : n - 2) : 0;
    conn_note(lg, c, E_CLOSED, "server closed the connection: code %u '%.*s'", code, rl, (const char *)p + 2);
    conn_put_close(lg, c, code == 1005 ? 0 : 1000);
  }
  c->state = CS_CLOSING;
  if (!c->deadline) c->deadline = now_ns() + timeout_ns(lg);
  return 0;
}

static int handle_control(struct lg *lg, struct conn *c, bool fin, unsigned op, const uint8_t *p, size_t n) {
  if (!fin || n > 125) return conn_fail(lg, c, E_PROTOCOL, "control frame %u: fragmented or longer than 125", op);
  switch (op) {
  case 8: return on_close_frame(lg, c, p, n);
  case 9:
    if (lg->phase == PH_MEASURE || lg->phase == PH_HOLD) lg->cnt.pings++;
    if (!c->close_sent) conn_put_frame(lg, c, 10, p, n, NULL, 0);
    return 0;
  case 10: return 0;
  default: return conn_fail(lg, c, E_PROTOCOL, "reserved opcode %u", op);
  }
}

/* Data frames, reassembling fragmented messages in c->frag. z: RSV1, the
 * first frame of a compressed message. */
static int handle_data(struct lg *lg, struct conn *c, bool fin, unsigned op, bool z, const uint8_t *p, size_t n,
                       uint64_t now) {
  if (op != 0 && op != 1 && op != 2) return conn_fail(lg, c, E_PROTOCOL, "reserved opcode %u", op);
  if (op == 0 && !c->frag_op) return conn_fail(lg, c, E_PROTOCOL, "continuation frame without a message");
  if (op != 0 && c->frag_op) return conn_fail(lg, c, E_PROTOCOL, "new message inside a fragmented one");
  if (op == 0 && z) return conn_fail(lg, c, E_PROTOCOL, "RSV1 on a continuation frame");
  if (op != 0 && fin) return deliver_message(lg, c, op, z, p, n, now);
  if (buf_avail(&c->frag) + n > lg->max_frame) return conn_fail(lg, c, E_PROTOCOL, "fragmented message too large");
  if (op != 0) c->frag_op = (uint8_t)op, c->frag_z = z;
  buf_append(&c->frag, p, n);
  if (!fin) return 0;
  op = c->frag_op;
  c->frag_op = 0;
  int r = deliver_message(lg, c, op, c->frag_z, buf_data(&c->frag), buf_avail(&c->frag), now);
  if (r == 0) buf_free(&c->frag);
  return r;
}

/* Handles every complete frame in p[0, n); returns the bytes consumed or -1
 * if c was dropped. An incomplete frame's full size goes to c->need. */
static ssize_t process_frames(struct lg *lg, struct conn *c, const uint8_t *p, size_t n, uint64_t now) {
  size_t used = 0;
  c->need = 0;
  while (n - used >= 2) {
    const uint8_t *h = p + used;
    size_t avail = n - used, hl = 2;
    uint64_t len = h[1] & 0x7f;
    if (len == 126) {
      if (avail < 4) break;
      len = (uint64_t)h[2] << 8 | h[3];
      hl = 4;
    } else if (len == 127) {
      if (avail < 10) break;
      len = 0;
      for (int i = 0; i < 8; i++) len = len << 8 | h[2 + i];
      hl = 10;
    }
    if (h[1] & 0x80) return conn_fail(lg, c, E_PROTOCOL, "the server masked a frame");
    bool z = h[0] & 0x40;
    if ((h[0] & 0x30) || (z && (!c->pmd || (h[0] & 8))))
      return conn_fail(lg, c, E_PROTOCOL, "RSV bits set without an extension that defines them");
    if (len > lg->max_frame) return conn_fail(lg, c, E_PROTOCOL, "%" PRIu64 "-byte frame exceeds the limit", len);
    if (avail < hl + len) {
      c->need = hl + (size_t)len;
      break;
    }
    if (c->close_rcvd) return conn_fail(lg, c, E_PROTOCOL, "frame after the server's close frame");
    bool fin = h[0] & 0x80;
    unsigned op = h[0] & 0x0f;
    if (!(op & 8) && lg->phase == PH_MEASURE) lg->cnt.wire_in += hl + (size_t)len;
    int r = op & 8 ? handle_control(lg, c, fin, op, h + hl, (size_t)len)
                   : handle_data(lg, c, fin, op, z, h + hl, (size_t)len, now);
    if (r < 0) return -1;
    used += hl + (size_t)len;
  }
  return (ssize_t)used;
}

/* ---- handshake --------------------------------------------------------- */

static void base64(const uint8_t *in, size_t n, char *out) { EVP_EncodeBlock((unsigned char *)out, in, (int)n); }

/* Appends the request with a fresh key and remembers the accept value. */
static void hs_start(struct conn *c, const struct target *t) {
  uint8_t raw[16], digest[EVP_MAX_MD_SIZE];
  char key[25], concat[64];
  unsigned dlen;
  if (RAND_bytes(raw, sizeof raw) != 1) die("RAND_bytes failed");
  base64(raw, sizeof raw, key);
  snprintf(concat, sizeof concat, "%s%s", key, WS_GUID);
  if (!EVP_Digest(concat, strlen(concat), digest, &dlen, EVP_sha1(), NULL)) die("SHA-1 failed");
  base64(digest, dlen, c->accept);
  buf_append(&c->wbuf, t->request, t->request_len);
  buf_append(&c->wbuf, "Sec-WebSocket-Key: ", 19);
  buf_append(&c->wbuf, key, 24);
  buf_append(&c->wbuf, "\r\n\r\n", 4);
}

/* Value of header `name` in a NUL-terminated header block, trimmed, copied
 * to out; NULL if absent. */
static const char *hs_header(const char *block, const char *name, char *out, size_t cap) {
  size_t nl = strlen(name);
  for (const char *line = strstr(block, "\r\n"); line && line[2]; line = strstr(line + 2, "\r\n")) {
    const char *l = line + 2;
    if (strncasecmp(l, name, nl) || l[nl] != ':') continue;
    const char *v = l + nl + 1, *e = strstr(v, "\r\n");
    while (*v == ' ' || *v == '\t') v++;
    while (e > v && (e[-1] == ' ' || e[-1] == '\t')) e--;
    size_t len = (size_t)(e - v) < cap - 1 ? (size_t)(e - v) : cap - 1;
    memcpy(out, v, len);
    out[len] = 0;
    return out;
  }
  return NULL;
}

/* The server's Sec-WebSocket-Extensions value (NULL: absent) against our
 * offer; NULL if acceptable, else why not. It must keep
 * server_no_context_takeover: the one shared inflate stream relies on it. */
static const char *pmd_check_response(const char *ext) {
  if (!ext) return "not accepted";
  char copy[256], *save = NULL;
  snprintf(copy, sizeof copy, "%s", ext);
  if (strchr(copy, ',')) return "more than one extension";
  bool name = false, snct = false;
  for (char *t = strtok_r(copy, ";", &save); t; t = strtok_r(NULL, ";", &save)) {
    while (*t == ' ' || *t == '\t') t++;
    size_t n = strlen(t);
    while (n && (t[n - 1] == ' ' || t[n - 1] == '\t')) t[--n] = 0;
    if (!name) {
      if (strcasecmp(t, "permessage-deflate")) return "another extension";
      name = true;
    } else if (!strcasecmp(t, "server_no_context_takeover")) {
      snct = true;
    } else if (strcasecmp(t, "client_no_context_takeover") && strncasecmp(t, "server_max_window_bits=", 23)) {
      return "unexpected parameter";
    }
  }
  return snct ? NULL : "server_no_context_takeover was not kept";
}

/* RFC 6455 §4.1 checks on the server's response (header block in `h`). */
static int hs_verify(struct lg *lg, struct conn *c, const char *h) {
  char v[256];
  if (strncmp(h, "HTTP/1.1 101", 12) || (h[12] != ' ' && h[12] != '\r'))
    return conn_fail(lg, c, E_HANDSHAKE, "expected 101, got '%.*s'", (int)strcspn(h, "\r\n"), h);
  if (!hs_header(h, "Upgrade", v, sizeof v) || strcasecmp(v, "websocket"))
    return conn_fail(lg, c, E_HANDSHAKE, "missing 'Upgrade: websocket'");
  if (!hs_header(h, "Connection", v, sizeof v) || !strcasestr(v, "upgrade"))
    return conn_fail(lg, c, E_HANDSHAKE, "missing 'Connection: Upgrade'");
  const char *accept = hs_header(h, "Sec-WebSocket-Accept", v, sizeof v);
  if (!accept || strcmp(accept, c->accept))
    return conn_fail(lg, c, E_HANDSHAKE, "Sec-WebSocket-Accept is '%s', expected '%s'", accept ? accept : "(missing)",
                     c->accept);
  const char *ext = hs_header(h, "Sec-WebSocket-Extensions", v, sizeof v);
  if (ext && !lg->o.deflate)
    return conn_fail(lg, c, E_HANDSHAKE, "server chose extensions '%s' that were not offered", v);
  if (lg->o.deflate) {
    const char *why = pmd_check_response(ext);
    if (why) return conn_fail(lg, c, E_HANDSHAKE, "permessage-deflate: %s (server said '%s')", why, ext ? ext : "");
    c->pmd = true;
  }
  const char *proto = hs_header(h, "Sec-WebSocket-Protocol", v, sizeof v);
  if (lg->o.protocol && (!proto || strcmp(proto, lg->o.protocol)))
    return conn_fail(lg, c, E_HANDSHAKE, "server did not select subprotocol '%s'", lg->o.protocol);
  if (!lg->o.protocol && proto) return conn_fail(lg, c, E_HANDSHAKE, "server chose subprotocol '%s' that was not offered", v);
  return 0;
}

static void conn_opened(struct lg *lg, struct conn *c, uint64_t now);

/* Consumes the response header once complete; returns bytes used (0 while
 * incomplete) or -1 if c was dropped. */
static ssize_t hs_input(struct lg *lg, struct conn *c, const uint8_t *p, size_t n, uint64_t now) {
  const uint8_t *end = memmem(p, n, "\r\n\r\n", 4);
  if (!end) {
    if (n > HS_MAX) return conn_fail(lg, c, E_HANDSHAKE, "response header over %u bytes", HS_MAX);
    return 0;
  }
  size_t hlen = (size_t)(end - p) + 4;
  char *h = xrealloc(NULL, hlen + 1);
  memcpy(h, p, hlen);
  h[hlen] = 0;
  int r = hs_verify(lg, c, h);
  free(h);
  if (r < 0) return -1;
  conn_opened(lg, c, now);
  return c->state == CS_FREE ? -1 : (ssize_t)hlen;
}

/* ---- connection lifecycle ---------------------------------------------- */

/* Source addresses 127.0.0.1..127.0.0.N in turn: each has its own
 * ephemeral port range towards the one server address and port. */
static int conn_bind_source(struct lg *lg, int fd) {
  if (lg->tgt.addr.ss_family != AF_INET) return 0;
  int one = 1;
  /* Port picked at connect() time by the 4-tuple, not reserved at bind(). */
  setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
  struct sockaddr_in src = {.sin_family = AF_INET};
  src.sin_addr.s_addr = htonl(0x7f000001u + lg->next_source);
  lg->next_source = (lg->next_source + 1) % lg->o.sources;
  return bind(fd, (struct sockaddr *)&src, sizeof src);
}

/* Nonblocking connect of slot c; the handshake request waits in wbuf. */
static void conn_open(struct lg *lg, struct conn *c) {
  const struct target *t = c->role == R_PUB ? &lg->pub_tgt : &lg->tgt;
  uint64_t now = now_ns();
  c->state = CS_CONNECTING;
  c->fd = -1;
  c->close_sent = c->close_rcvd = c->bad = c->pmd = c->tls_read_first = false;
  c->frag_op = 0;
  c->need = 0;
  c->sent = c->rcvd = 0;
  c->t_start = now;
  c->deadline = now + timeout_ns(lg);
  lg->pending++;
  int fd = socket(t->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    conn_fail(lg, c, E_CONNECT, "socket: %s", strerror(errno));
    return;
  }
  c->fd = fd;
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (conn_bind_source(lg, fd) < 0) {
    conn_fail(lg, c, E_CONNECT, "bind source address: %s", strerror(errno));
    return;
  }
  if (connect(fd, (const struct sockaddr *)&t->addr, t->addrlen) < 0 && errno != EINPROGRESS) {
    conn_fail(lg, c, E_CONNECT, "connect: %s%s", strerror(errno),
              errno == EADDRNOTAVAIL ? " (out of ephemeral ports: raise --sources)" : "");
    return;
  }
  if (t->tls && !(c->ssl = SSL_new(lg->tls))) {
    conn_fail(lg, c, E_CONNECT, "SSL_new failed");
    return;
  }
  if (c->ssl) {
    SSL_set_fd(c->ssl, fd); /* the socket BIO does not close fd */
    SSL_set_connect_state(c->ssl);
  }
  hs_start(c, t);
  struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
  if (epoll_ctl(lg->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
    conn_fail(lg, c, E_CONNECT, "epoll_ctl: %s", strerror(errno));
    return;
  }
  c->epout = true;
}

/* The 101 checked out: per-role start. */
static void conn_opened(struct lg *lg, struct conn *c, uint64_t now) {
  lg->pending--;
  lg->nopen++;
  lg->opened++;
  c->state = CS_OPEN;
  c->deadline = 0;
  switch ((enum role)c->role) {
  case R_CYCLE: conn_close(lg, c); break; /* the cycle is open + close */
  case R_ECHO: echo_fill(lg, c, now); break;
  case R_IDLE:
    if (lg->phase == PH_OPENING) hist_add(&lg->hist, now - c->t_start);
    break;
  default: break;
  }
}

/* A connect-mode cycle finished cleanly: the server's close frame and its
 * TCP close both arrived. */
static void cycle_done(struct lg *lg, struct conn *c, uint64_t now) {
  if (lg->phase != PH_MEASURE) return;
  lg->cnt.ops++;
  hist_add(&lg->hist, now - c->t_start);
}

static void conn_drop(struct lg *lg, struct conn *c, bool clean) {
  enum cstate st = (enum cstate)c->state;
  uint64_t now = now_ns();
  if (st == CS_FREE) return;
  SSL_free(c->ssl); /* no close_notify: the WebSocket close handshake is what is measured */
  c->ssl = NULL;
  if (c->fd >= 0) close(c->fd); /* also leaves the epoll set */
  c->fd = -1;
  c->state = CS_FREE;
  c->epout = false;
  buf_free(&c->rbuf);
  buf_free(&c->wbuf);
  buf_free(&c->frag);
  if (st == CS_CONNECTING || st == CS_HANDSHAKE) {
    lg->pending--;
    if (lg->phase == PH_OPENING) lg->nfailed += !clean;
  } else {
    lg->nopen--;
  }
  if (c->role == R_CYCLE) {
    if (clean && st == CS_CLOSING) cycle_done(lg, c, now);
    if (sending_phase(lg)) lg->to_open[lg->nto_open++] = c->id;
  } else if (c->role == R_SUB && st >= CS_OPEN) {
    sub_gone(lg, c, now);
  }
}

/* The server closed TCP: fine after its close frame, an error before. */
static int conn_eof(struct lg *lg, struct conn *c) {
  if (!c->close_rcvd) return conn_fail(lg, c, E_CLOSED, "server closed TCP without a close frame");
  conn_drop(lg, c, !c->bad);
  return -1;
}

static ssize_t conn_input(struct lg *lg, struct conn *c, const uint8_t *p, size_t n, uint64_t now) {
  size_t used = 0;
  if (c->state == CS_HANDSHAKE) {
    ssize_t h = hs_input(lg, c, p, n, now);
    if (h <= 0) return h;
    used = (size_t)h;
  }
  ssize_t r = process_frames(lg, c, p + used, n - used, now);
  return r < 0 ? -1 : (ssize_t)used + r;
}

/* One recv: 1 if data was handled, 0 if none was ready, -1 if c was
 * dropped. A connection with nothing buffered reads into the shared scratch
 * buffer and keeps only a leftover partial frame, so idle connections own no
 * receive buffer. */
static int conn_read_once(struct lg *lg, struct conn *c, uint64_t now) {
  struct buf *b = &c->rbuf;
  bool direct = buf_avail(b) > 0;
  uint8_t *dst = lg->scratch;
  size_t room = READ_CHUNK;
  if (direct) {
    size_t want = c->need > buf_avail(b) ? c->need - buf_avail(b) : 0;
    buf_reserve(b, want > 16384 ? want : 16384);
    dst = b->p + b->len;
    room = b->cap - b->len;
  }
  ssize_t n = conn_recv(c, dst, room);
  if (n < 0) {
    if (errno == EAGAIN || errno == EINTR) return 0;
    if (c->close_rcvd) return conn_eof(lg, c);
    return conn_fail(lg, c, E_CLOSED, "recv: %s", io_error(errno));
  }
  if (n == 0) return conn_eof(lg, c);
  if (direct) b->len += (size_t)n;
  const uint8_t *data = direct ? buf_data(b) : dst;
  size_t avail = direct ? buf_avail(b) : (size_t)n;
  ssize_t used = conn_input(lg, c, data, avail, now);
  if (used < 0) return -1;
  if (direct) buf_consume(b, (size_t)used);
  else if ((size_t)used < avail) buf_append(b, data + used, avail - (size_t)used);
  if (!buf_avail(b)) buf_free(b);
  return 1;
}

/* Level-triggered epoll: one recv per readiness, except that TLS may hold
 * decrypted bytes the socket no longer signals. A TLS read may also have
 * completed the handshake that a pending write was waiting for. */
static int conn_readable(struct lg *lg, struct conn *c, uint64_t now) {
  int r;
  do r = conn_read_once(lg, c, now);
  while (r > 0 && c->ssl && SSL_has_pending(c->ssl));
  if (r < 0 || (r == 0 && !c->ssl)) return r;
  return conn_flush(lg, c);
}

static int conn_connected(struct lg *lg, struct conn *c) {
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
  if (err == EINPROGRESS) return 1;
  if (err) return conn_fail(lg, c, E_CONNECT, "connect: %s", strerror(err));
  c->state = CS_HANDSHAKE;
  return 0;
}

static void conn_event(struct lg *lg, struct conn *c, uint32_t events) {
  if (c->state == CS_FREE) return;
  if (c->state == CS_CONNECTING && conn_connected(lg, c)) return;
  if ((events & EPOLLOUT) && conn_flush(lg, c) < 0) return;
  if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) conn_readable(lg, c, now_ns());
}

/* ---- phases ------------------------------------------------------------ */

static void begin_closing(struct lg *lg, uint64_t now) {
  lg->phase = PH_CLOSING;
  lg->phase_end = now + timeout_ns(lg) + NS;
  lg->nto_open = 0;
  for (uint32_t i = 0; i < lg->nconns; i++) conn_close(lg, &lg->conns[i]);
}

static void start_measure(struct lg *lg, uint64_t now) {
  memset(&lg->cnt, 0, sizeof lg->cnt);
  memset(&lg->hist, 0, sizeof lg->hist);
  take_snap(lg, &lg->snaps[SNAP_M0]);
  lg->phase = PH_MEASURE;
  lg->phase_end = now + (uint64_t)(lg->o.duration * 1e9);
}

static void start_warmup(struct lg *lg, uint64_t now) {
  lg->phase = PH_WARMUP;
  lg->phase_end = now + (uint64_t)(lg->o.warmup * 1e9);
  lg->pub_t0 = now;
  if (lg->o.warmup == 0) start_measure(lg, now); /* before the first message goes out */
  for (uint32_t i = 0; i < lg->nconns; i++) {
    struct conn *c = &lg->conns[i];
    if (c->role == R_ECHO && c->state == CS_OPEN) {
      echo_fill(lg, c, now);
      conn_flush(lg, c);
    }
  }
}

/* Ends the run early or on time; the measured window ends here too. */
static void stop_run(struct lg *lg, uint64_t now, const char *reason) {
  if (lg->phase == PH_MEASURE || lg->phase == PH_HOLD) take_snap(lg, &lg->snaps[SNAP_M1]);
  lg->stop_reason = reason;
  begin_closing(lg, now);
}

/* Every connection has been tried: move on, or give up if none opened. */
static void all_opened(struct lg *lg, uint64_t now) {
  if (!lg->nopen || (lg->o.mode == M_BROADCAST && (!lg->pub || lg->pub->state != CS_OPEN))) {
    fprintf(stderr, "loadgen: %s\n", lg->nopen ? "the publisher could not connect" : "no connection could be opened");
    stop_run(lg, now, "connections failed");
    return;
  }
  switch (lg->o.mode) {
  case M_IDLE:
    take_snap(lg, &lg->snaps[SNAP_M0]);
    lg->cnt.ops = lg->opened;
    lg->phase = PH_HOLD;
    lg->phase_end = now + (uint64_t)(lg->o.hold * 1e9);
    break;
  case M_BROADCAST:
    lg->subs_alive = lg->nopen - 1;
    lg->phase = PH_SETTLE;
    lg->phase_end = now + SETTLE_NS;
    break;
  default: start_warmup(lg, now); break;
  }
}

static bool may_open(const struct lg *lg) {
  if (lg->o.mode == M_CONNECT) return sending_phase(lg);
  return lg->phase == PH_OPENING && lg->pending < lg->o.max_pending;
}

static void open_more(struct lg *lg) {
  /* a slot whose open fails synchronously goes back on the stack: bound the
   * loop so that it is retried on the next tick, not spun on now */
  for (uint32_t budget = lg->nto_open; budget && lg->nto_open && may_open(lg); budget--)
    conn_open(lg, &lg->conns[lg->to_open[--lg->nto_open]]);
}

static void scan_timeouts(struct lg *lg, uint64_t now) {
  for (uint32_t i = 0; i < lg->nconns; i++) {
    struct conn *c = &lg->conns[i];
    if (c->state != CS_FREE && c->deadline && now >= c->deadline)
      conn_fail(lg, c, E_TIMEOUT, "nothing heard for %.1f s", lg->o.timeout);
  }
  if (lg->o.mode == M_BROADCAST && sending_phase(lg) && lg->pub_seq > lg->pub_acked &&
      now - lg->pub_progress > timeout_ns(lg)) {
    lg->errors[E_TIMEOUT]++;
    lg->errors_total++;
    fprintf(stderr, "loadgen: broadcast %" PRIu64 " not delivered to every subscriber within %.1f s\n", lg->pub_acked,
            lg->o.timeout);
    stop_run(lg, now, "broadcast stalled");
  }
}


/* Phase changes, pacing and timeouts; runs after every epoll_wait. */
static void tick(struct lg *lg) {
  uint64_t now = now_ns();
  if (lg->phase < PH_CLOSING && (stop_requested || lg->errors_total >= lg->o.max_errors))
    stop_run(lg, now, stop_requested ? "interrupted" : "too many errors");
  open_more(lg);
  switch (lg->phase) {
  case PH_OPENING:
    if (!lg->pending && !lg->nto_open) all_opened(lg, now);
    break;
  case PH_SETTLE:
    if (now >= lg->phase_end) start_warmup(lg, now);
    break;
  case PH_WARMUP:
    if (now >= lg->phase_end) start_measure(lg, now);
    break;
  case PH_MEASURE:
  case PH_HOLD:
    if (now >= lg->phase_end || (lg->o.messages && lg->echo_done >= lg->o.messages)) stop_run(lg, now, NULL);
    break;
  case PH_CLOSING:
    if (!lg->nopen && !lg->pending) lg->phase = PH_DONE;
    else if (now >= lg->phase_end) {
      for (uint32_t i = 0; i < lg->nconns; i++)
        if (lg->conns[i].state != CS_FREE) conn_fail(lg, &lg->conns[i], E_TIMEOUT, "still open at the end");
      lg->phase = PH_DONE;
    }
    break;
  default: break;
  }
  if (lg->o.mode == M_BROADCAST) pub_fill(lg, now);
  if (now >= lg->next_scan) {
    scan_timeouts(lg, now);
    lg->next_scan = now + SCAN_NS;
  }
}

/* epoll_wait timeout: the next phase change, scan, or paced publish. */
static int next_wait_ms(const struct lg *lg) {
  uint64_t now = now_ns(), next = lg->next_scan;
  if (lg->phase != PH_OPENING && lg->phase_end < next) next = lg->phase_end;
  if (lg->o.mode == M_BROADCAST && lg->o.publish_rate > 0 && sending_phase(lg)) return 1;
  if (lg->nto_open && lg->o.mode == M_CONNECT) return 0;
  return next <= now ? 0 : (int)((next - now + 999999) / 1000000);
}

static void run(struct lg *lg) {
  struct epoll_event evs[1024];
  while (lg->phase != PH_DONE) {
    int n = epoll_wait(lg->ep, evs, 1024, next_wait_ms(lg));
    if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
    for (int i = 0; i < n; i++) conn_event(lg, evs[i].data.ptr, evs[i].events);
    tick(lg);
  }
}

/* ---- setup ------------------------------------------------------------- */

static void raise_nofile(uint32_t need) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) < 0) die("getrlimit: %s", strerror(errno));
  rl.rlim_cur = rl.rlim_max;
  if (setrlimit(RLIMIT_NOFILE, &rl) < 0) die("setrlimit: %s", strerror(errno));
  if (rl.rlim_cur < (rlim_t)need + 32)
    die("need %u file descriptors but the hard limit is %llu (ulimit -Hn)", need + 32, (unsigned long long)rl.rlim_cur);
}

/* --payload json: what a chat message looks like on the wire, so that
 * compression ratios mean something (random bytes do not compress). */
static void make_json_pattern(struct lg *lg) {
  static const char *const words[] = {
      "the", "deploy", "is", "done", "and", "tests", "are", "green", "can", "you", "review", "my", "pull",
      "request", "before", "lunch", "we", "should", "ship", "it", "today", "I", "think", "cache", "was",
      "cold", "again", "after", "restart", "thanks", "looks", "good", "to", "me", "what", "about", "latency",
      "on", "staging", "server", "room", "meeting", "at", "three", "ok", "sure", "let", "us", "check", "logs"};
  static const char head[] = "{\"type\":\"message\",\"room\":\"general\",\"user\":\"alice\",\"text\":\"";
  size_t size = lg->o.size;
  struct buf b = {0};
  uint64_t seed = 42; /* the same text every run: compression ratios stay comparable */
  buf_append(&b, head, sizeof head - 1);
  while (b.len < size) {
    const char *w = words[rng_next(&seed) % (sizeof words / sizeof words[0])];
    if (b.len > sizeof head - 1) buf_append(&b, " ", 1);
    buf_append(&b, w, strlen(w));
  }
  memcpy(lg->pattern, b.p, size);
  if (size >= 2) memcpy(lg->pattern + size - 2, "\"}", 2);
  buf_free(&b);
}

/* Payload body shared by all messages: random bytes, printable ASCII for
 * text so that every message is valid UTF-8, or JSON text. */
static void make_pattern(struct lg *lg) {
  lg->pattern = xrealloc(NULL, lg->o.size + 8);
  if (lg->o.json_payload) {
    make_json_pattern(lg);
    return;
  }
  for (uint32_t i = 0; i < lg->o.size; i++) {
    uint8_t r = (uint8_t)rng_next(&lg->rng);
    lg->pattern[i] = lg->o.text ? (uint8_t)(0x20 + r % 95) : r;
  }
}

/* OpenSSL client context: any certificate goes (loopback only), and writes
 * may be partial and retried from a buffer that has moved (wbuf grows). */
static SSL_CTX *tls_context(void) {
  SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
  if (!ctx) die("SSL_CTX_new failed");
  SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
  return ctx;
}

static void pmd_setup(struct lg *lg) {
  if (deflateInit2(&lg->zdef, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY) != Z_OK ||
      inflateInit2(&lg->zinf, -15) != Z_OK)
    die("zlib init failed");
}

static void setup(struct lg *lg) {
  const struct opts *o = &lg->o;
  parse_url(o, o->url, &lg->tgt);
  parse_url(o, o->pub_url ? o->pub_url : o->url, &lg->pub_tgt);
  if (lg->tgt.addr.ss_family != lg->pub_tgt.addr.ss_family) die("--pub-url must use the same address family as --url");
  if (lg->tgt.tls || lg->pub_tgt.tls) lg->tls = tls_context();
  if (o->deflate) pmd_setup(lg);
  lg->nsubs = o->mode == M_BROADCAST ? o->conns : 0;
  lg->nconns = o->conns + (o->mode == M_BROADCAST);
  if (!lg->o.sources) lg->o.sources = lg->nconns / 20000 + 1;
  if (lg->tgt.addr.ss_family == AF_INET6) lg->o.sources = 1;
  if (lg->o.sources > MAX_SOURCES) die("--sources: at most %u", MAX_SOURCES);
  raise_nofile(lg->nconns);
  if (RAND_bytes((unsigned char *)&lg->rng, sizeof lg->rng) != 1) die("RAND_bytes failed");
  /* Frames larger than what we send are never expected; the slack leaves
   * room for a server that wraps broadcasts or sends notices. */
  lg->max_frame = (uint64_t)o->size + 65536;
  make_pattern(lg);
  lg->scratch = xrealloc(NULL, READ_CHUNK);
  lg->ep = epoll_create1(EPOLL_CLOEXEC);
  if (lg->ep < 0) die("epoll_create1: %s", strerror(errno));
  lg->conns = calloc(lg->nconns, sizeof *lg->conns);
  lg->to_open = xrealloc(NULL, lg->nconns * sizeof *lg->to_open);
  if (!lg->conns) die("out of memory");
  static const enum role mode_role[] = {R_ECHO, R_CYCLE, R_IDLE, R_SUB};
  for (uint32_t i = 0; i < lg->nconns; i++) {
    struct conn *c = &lg->conns[i];
    c->id = i;
    c->fd = -1;
    c->role = (uint8_t)(o->mode == M_BROADCAST && i == o->conns ? R_PUB : mode_role[o->mode]);
    if (c->role == R_ECHO) c->t_sent = xrealloc(NULL, o->inflight * sizeof *c->t_sent);
    lg->to_open[lg->nconns - 1 - i] = i; /* popped in id order */
  }
  lg->nto_open = lg->nconns;
  if (o->mode == M_BROADCAST) {
    lg->pub = &lg->conns[o->conns];
    lg->ring = o->publish_rate > 0 ? PUB_RING_RATE : o->inflight;
    lg->remaining = calloc(lg->ring, sizeof *lg->remaining);
    if (!lg->remaining) die("out of memory");
  }
  lg->phase = o->mode == M_CONNECT ? PH_WARMUP : PH_OPENING;
  uint64_t now = now_ns();
  lg->phase_end = now + (uint64_t)(o->warmup * 1e9);
  lg->next_scan = now + SCAN_NS;
}

/* ---- report ------------------------------------------------------------ */

/* One figure, printed as a text line or a JSON member. */
struct item {
  const char *key, *label, *unit;
  double v;
  int prec;
};

struct report {
  struct item it[48];
  int n;
};

static void add(struct report *r, const char *key, const char *label, double v, int prec, const char *unit) {
  if (r->n < (int)(sizeof r->it / sizeof r->it[0])) r->it[r->n++] = (struct item){key, label, unit, v, prec};
}

static double ratio(double a, double b) { return b > 0 && !isnan(a) ? a / b : NAN; }

static void add_latency(struct report *r, const struct hist *h, const char *what) {
  static const char *const keys[] = {"lat_p50_us", "lat_p90_us", "lat_p99_us", "lat_p999_us"};
  static const char *const labels[] = {"latency p50", "latency p90", "latency p99", "latency p99.9"};
  static const double qs[] = {0.5, 0.9, 0.99, 0.999};
  for (int i = 0; i < 4; i++) add(r, keys[i], labels[i], hist_quantile(h, qs[i]) / 1e3, 1, "us");
  add(r, "lat_max_us", "latency max", h->n ? (double)h->max / 1e3 : NAN, 1, "us");
  add(r, "lat_mean_us", "latency mean", ratio(h->sum, (double)h->n) / 1e3, 1, "us");
  add(r, "lat_samples", what, (double)h->n, 0, "");
}

/* CPU of server and loadgen between two snapshots, per operation. */
static void add_cpu(struct report *r, const struct snap *a, const struct snap *b, double ops, const char *per,
                    const char *key_srv, const char *key_self) {
  static char labels[3][64];
  double srv = b->srv_cpu - a->srv_cpu, self = b->self_cpu - a->self_cpu, sys = b->srv_sys - a->srv_sys;
  snprintf(labels[0], sizeof labels[0], "server cpu per %s", per);
  snprintf(labels[1], sizeof labels[1], "loadgen cpu per %s", per);
  snprintf(labels[2], sizeof labels[2], "  of it in the kernel");
  add(r, "server_cpu_s", "server cpu", srv, 3, "s");
  add(r, key_srv, labels[0], ratio(srv * 1e6, ops), 2, "us");
  /* where the server's time goes: its own code, or system calls */
  add(r, "server_sys_us_per_op", labels[2], ratio(sys * 1e6, ops), 2, "us");
  add(r, "loadgen_cpu_s", "loadgen cpu", self, 3, "s");
  add(r, key_self, labels[1], ratio(self * 1e6, ops), 2, "us");
}

/* Seconds between two snapshots; NAN if the run stopped before either. */
static double span(const struct snap *a, const struct snap *b) {
  return a->t && b->t ? (double)(b->t - a->t) / 1e9 : NAN;
}

static void build_report(const struct lg *lg, struct report *r) {
  static const struct snap none = {0, NAN, NAN, NAN, -1};
  const struct snap *s0 = lg->snaps[SNAP_M0].t ? &lg->snaps[SNAP_M0] : &none;
  const struct snap *s1 = lg->snaps[SNAP_M1].t ? &lg->snaps[SNAP_M1] : &none;
  double secs = span(s0, s1), ops = (double)lg->cnt.ops;
  add(r, "seconds", lg->o.mode == M_IDLE ? "held" : "measured", secs, 3, "s");
  switch (lg->o.mode) {
  case M_ECHO:
    add(r, "messages", "messages echoed", ops, 0, "");
    add(r, "msgs_per_s", "throughput", ratio(ops, secs), 0, "msg/s");
    add(r, "mb_per_s", "payload each way", ratio((double)lg->cnt.bytes / 1e6, secs), 2, "MB/s");
    add_latency(r, &lg->hist, "latency samples");
    add_cpu(r, s0, s1, ops, "message", "server_us_per_msg", "loadgen_us_per_msg");
    /* framing overhead, or what compression saved */
    add(r, "wire_ratio_out", "wire/payload bytes sent", ratio((double)lg->cnt.wire_out, (double)lg->cnt.payload_out),
        3, "");
    add(r, "wire_ratio_in", "wire/payload bytes received", ratio((double)lg->cnt.wire_in, (double)lg->cnt.payload_in),
        3, "");
    break;
  case M_CONNECT:
    add(r, "cycles", "cycles", ops, 0, "");
    add(r, "cycles_per_s", "throughput", ratio(ops, secs), 0, "cycles/s");
    add_latency(r, &lg->hist, "latency samples");
    add_cpu(r, s0, s1, ops, "cycle", "server_us_per_cycle", "loadgen_us_per_cycle");
    break;
  case M_IDLE: {
    const struct snap *st = &lg->snaps[SNAP_START];
    double open_s = span(st, s0);
    add(r, "conns_open", "connections opened", ops, 0, "");
    add(r, "conns_failed", "connections failed", (double)lg->nfailed, 0, "");
    add(r, "open_seconds", "time to open all", open_s, 3, "s");
    add(r, "opens_per_s", "open rate", ratio(ops, open_s), 0, "conn/s");
    add_latency(r, &lg->hist, "handshake latency samples");
    add_cpu(r, st, s0, ops, "open", "server_us_per_open", "loadgen_us_per_open");
    add(r, "hold_server_cpu_s", "server cpu while holding", s1->srv_cpu - s0->srv_cpu, 3, "s");
    add(r, "pings", "pings answered", (double)lg->cnt.pings, 0, "");
    add(r, "rss_before_kb", "server rss before", st->rss_kb < 0 ? NAN : (double)st->rss_kb, 0, "KiB");
    add(r, "rss_open_kb", "server rss all open", s0->rss_kb < 0 ? NAN : (double)s0->rss_kb, 0, "KiB");
    add(r, "rss_hold_kb", "server rss after hold", s1->rss_kb < 0 ? NAN : (double)s1->rss_kb, 0, "KiB");
    add(r, "rss_per_conn_bytes", "server rss per connection",
        st->rss_kb < 0 || s0->rss_kb < 0 ? NAN : ratio((double)(s0->rss_kb - st->rss_kb) * 1024, ops), 0, "B");
    break;
  }
  case M_BROADCAST:
    add(r, "subscribers", "subscribers", (double)lg->nsubs, 0, "");
    add(r, "published", "messages published", (double)lg->cnt.published, 0, "");
    add(r, "published_per_s", "publish rate", ratio((double)lg->cnt.published, secs), 0, "msg/s");
    add(r, "deliveries", "deliveries", ops, 0, "");
    add(r, "deliveries_per_s", "delivery rate", ratio(ops, secs), 0, "msg/s");
    add(r, "mb_per_s", "payload delivered", ratio((double)lg->cnt.bytes / 1e6, secs), 2, "MB/s");
    add(r, "foreign", "other messages ignored", (double)lg->cnt.foreign, 0, "");
    add(r, "wrapped", "deliveries wrapped by server", (double)lg->cnt.wrapped, 0, "");
    add_latency(r, &lg->hist, "latency samples");
    add_cpu(r, s0, s1, ops, "delivery", "server_us_per_delivery", "loadgen_us_per_delivery");
    add(r, "server_us_per_publish", "server cpu per publish",
        ratio((s1->srv_cpu - s0->srv_cpu) * 1e6, (double)lg->cnt.published), 2, "us");
    break;
  }
  if (lg->o.mode != M_IDLE && lg->o.mode != M_CONNECT)
    add(r, "pings", "pings answered", (double)lg->cnt.pings, 0, "");
}

static void print_text(const struct lg *lg, const struct report *r) {
  const struct opts *o = &lg->o;
  printf("loadgen %s %s conns=%u size=%u %s inflight=%u sources=%u", MODE_NAMES[o->mode], o->url, o->conns, o->size,
         o->text ? "text" : "binary", o->inflight, o->sources);
  if (o->deflate) printf(" deflate");
  if (o->json_payload) printf(" payload=json");
  if (o->mode == M_IDLE) printf(" hold=%gs", o->hold);
  else printf(" warmup=%gs duration=%gs", o->warmup, o->duration);
  if (o->publish_rate > 0) printf(" rate=%g/s", o->publish_rate);
  if (o->npids) printf(" pid=%d%s", (int)o->pids[0], o->npids > 1 ? ",..." : "");
  putchar('\n');
  for (int i = 0; i < r->n; i++) {
    const struct item *it = &r->it[i];
    if (isnan(it->v)) {
      if (strstr(it->key, "cpu") || strstr(it->key, "rss") || strstr(it->key, "server")) continue; /* no --pid */
      printf("  %-30s n/a\n", it->label);
    } else {
      printf("  %-30s %.*f %s\n", it->label, it->prec, it->v, it->unit);
    }
  }
  printf("  %-30s %" PRIu64, "errors", lg->errors_total);
  for (int k = 0; k < E_N; k++)
    if (lg->errors[k]) printf(" %s=%" PRIu64, EKIND_NAMES[k], lg->errors[k]);
  if (lg->stop_reason) printf(" (stopped: %s)", lg->stop_reason);
  putchar('\n');
}

static void print_json(const struct lg *lg, const struct report *r) {
  const struct opts *o = &lg->o;
  printf("{\"mode\":\"%s\",\"url\":\"", MODE_NAMES[o->mode]);
  for (const char *p = o->url; *p; p++) printf(*p == '"' || *p == '\\' ? "\\%c" : "%c", *p);
  printf("\",\"tls\":%s,\"deflate\":%s", lg->tgt.tls ? "true" : "false", o->deflate ? "true" : "false");
  printf(",\"conns\":%u,\"size\":%u,\"text\":%s,\"inflight\":%u,\"sources\":%u,\"warmup\":%g,\"duration\":%g,"
         "\"hold\":%g,\"publish_rate\":%g",
         o->conns, o->size, o->text ? "true" : "false", o->inflight, o->sources, o->warmup, o->duration, o->hold,
         o->publish_rate);
  printf(",\"pids\":[");
  for (int i = 0; i < o->npids; i++) printf("%s%d", i ? "," : "", (int)o->pids[i]);
  printf("]");
  for (int i = 0; i < r->n; i++) {
    if (isnan(r->it[i].v)) printf(",\"%s\":null", r->it[i].key);
    else printf(",\"%s\":%.*f", r->it[i].key, r->it[i].prec, r->it[i].v);
  }
  printf(",\"errors\":{\"total\":%" PRIu64, lg->errors_total);
  for (int k = 0; k < E_N; k++) printf(",\"%s\":%" PRIu64, EKIND_NAMES[k], lg->errors[k]);
  printf("},\"stopped\":");
  if (lg->stop_reason) printf("\"%s\"", lg->stop_reason);
  else printf("null");
  printf(",\"ok\":%s}\n", lg->errors_total ? "false" : "true");
}

/* Everything setup() allocated; by now every connection is closed. */
static void lg_free(struct lg *lg) {
  for (uint32_t i = 0; i < lg->nconns; i++) {
    conn_drop(lg, &lg->conns[i], false);
    free(lg->conns[i].t_sent);
  }
  close(lg->ep);
  free(lg->conns);
  free(lg->to_open);
  free(lg->remaining);
  free(lg->pattern);
  free(lg->scratch);
  free(lg->tgt.request);
  free(lg->pub_tgt.request);
  if (lg->o.deflate) {
    deflateEnd(&lg->zdef);
    inflateEnd(&lg->zinf);
  }
  buf_free(&lg->zout);
  buf_free(&lg->zin);
  SSL_CTX_free(lg->tls);
  free(lg);
}

static void on_signal(int sig) {
  (void)sig;
  stop_requested = 1;
}

int main(int argc, char **argv) {
  struct lg *lg = calloc(1, sizeof *lg); /* the histogram makes it too big for the stack */
  if (!lg) die("out of memory");
  parse_args(&lg->o, argc, argv);
  setup(lg);
  signal(SIGPIPE, SIG_IGN);
  struct sigaction sa = {.sa_handler = on_signal};
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  take_snap(lg, &lg->snaps[SNAP_START]);
  if (lg->o.mode == M_CONNECT && lg->o.warmup == 0) start_measure(lg, now_ns());
  run(lg);
  struct report rep = {.n = 0};
  build_report(lg, &rep);
  if (lg->o.json) print_json(lg, &rep);
  else print_text(lg, &rep);
  int status = lg->errors_total || !lg->cnt.ops ? 1 : 0;
  lg_free(lg);
  return status;
}
