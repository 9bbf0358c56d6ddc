/*
 * dx_pmd: permessage-deflate (RFC 7692), the codec and the negotiation rules.
 */
#include "dx_pmd.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <zlib.h>

/* Output is produced in steps of at most this many bytes, so the size limit
 * of an inflated message is checked before the buffer grows further. */
#define DX_PMD_CHUNK 16384

static const uint8_t flush_tail[4] = {0x00, 0x00, 0xff, 0xff};

struct dx_pmd {
  z_stream tx, rx;
  int tx_live, rx_live;   /* the stream is initialised (holds memory) */
  int tx_bits, rx_bits;   /* zlib windowBits (positive) */
  int tx_reset, rx_reset; /* no context takeover: drop the stream after each message */
  int mem_level, level;
  size_t mem;    /* bytes zlib holds through zalloc */
  size_t rx_in;  /* compressed bytes of the message being inflated */
  size_t rx_out; /* inflated bytes of that message */
  int rx_ended;  /* that message's deflate stream ended (a BFINAL block) */
  /* The owning engine's scratch (dx_pmd_scratch): here, so that an engine
   * without compression does not carry two empty buffers. */
  dx_buf inflated, deflated;
};

/* --- allocation, counted ------------------------------------------------ */

typedef union dx_pmd_hdr {
  size_t size;
  max_align_t align;
} dx_pmd_hdr;

static voidpf count_alloc(voidpf opaque, uInt items, uInt size) {
  dx_pmd *z = opaque;
  size_t n = (size_t)items * size; /* both are 32-bit: no overflow in size_t */
  if (n > SIZE_MAX - sizeof(dx_pmd_hdr)) return NULL;
  dx_pmd_hdr *h = malloc(sizeof *h + n);
  if (!h) return NULL;
  h->size = n;
  z->mem += n;
  return h + 1;
}

static void count_free(voidpf opaque, voidpf p) {
  dx_pmd *z = opaque;
  if (!p) return;
  dx_pmd_hdr *h = (dx_pmd_hdr *)p - 1;
  z->mem -= h->size;
  free(h);
}

static void prepare(dx_pmd *z, z_stream *s) {
  memset(s, 0, sizeof *s);
  s->zalloc = count_alloc;
  s->zfree = count_free;
  s->opaque = z;
}

/* --- lifetime ------------------------------------------------------------ */

static int bits_ok(int b) { return b >= 8 && b <= 15; }

dx_pmd *dx_pmd_new(int role, const dx_pmd_params *p, const dx_pmd_config *c) {
  int mem_level = c ? c->mem_level : 5;
  int level = c ? c->compress_level : 6;
  if (!p || !bits_ok(p->server_max_window_bits) || !bits_ok(p->client_max_window_bits) ||
      mem_level < 1 || mem_level > 9 || level < 0 || level > 9)
    return NULL;
  dx_pmd *z = calloc(1, sizeof *z);
  if (!z) return NULL;
  int server = role == 0;
  z->tx_bits = server ? p->server_max_window_bits : p->client_max_window_bits;
  z->rx_bits = server ? p->client_max_window_bits : p->server_max_window_bits;
  z->tx_reset = server ? p->server_no_context_takeover : p->client_no_context_takeover;
  z->rx_reset = server ? p->client_no_context_takeover : p->server_no_context_takeover;
  z->tx_reset = !!z->tx_reset;
  z->rx_reset = !!z->rx_reset;
  z->mem_level = mem_level;
  z->level = level;
  return z;
}

static void tx_close(dx_pmd *z) {
  if (z->tx_live) deflateEnd(&z->tx);
  z->tx_live = 0;
}

static void rx_close(dx_pmd *z) {
  if (z->rx_live) inflateEnd(&z->rx);
  z->rx_live = 0;
}

void dx_pmd_free(dx_pmd *z) {
  if (!z) return;
  tx_close(z);
  rx_close(z);
  dx_buf_free(&z->inflated);
  dx_buf_free(&z->deflated);
  free(z);
}

dx_buf *dx_pmd_scratch(dx_pmd *z, int which) { return which == DX_PMD_INFLATED ? &z->inflated : &z->deflated; }

size_t dx_pmd_memory(const dx_pmd *z) { return z ? z->mem : 0; }

/* --- deflate ------------------------------------------------------------- */

static int tx_open(dx_pmd *z) {
  /* zlib's raw deflate rejects a 256-byte window (8 bits). With a 512-byte
   * one it never emits a distance above 250 (w_size - MIN_LOOKAHEAD), so
   * its output still decodes in the 256-byte window the peer asked for. */
  int bits = z->tx_bits < 9 ? 9 : z->tx_bits;
  prepare(z, &z->tx);
  if (deflateInit2(&z->tx, z->level, Z_DEFLATED, -bits, z->mem_level, Z_DEFAULT_STRATEGY) != Z_OK)
    return DX_PMD_NOMEM;
  z->tx_live = 1;
  return DX_PMD_OK;
}

/* Room to offer deflate: a little more than the input (stored blocks grow
 * it slightly), capped so a small message does not reserve a large buffer. */
static size_t deflate_room(const z_stream *s) {
  size_t want = (size_t)s->avail_in + s->avail_in / 16 + 64;
  return want < DX_PMD_CHUNK ? want : DX_PMD_CHUNK;
}

/* Every piece ends with a sync flush: a fragment sent is then complete data
 * the peer can inflate on arrival (a streaming receiver sees it at once), at
 * the cost of one empty stored block per fragment. Only the last one's
 * 00 00 ff ff is removed (RFC 7692 section 7.2.1). */
int dx_pmd_deflate(dx_pmd *z, const uint8_t *in, size_t n, int fin, dx_buf *out) {
  if (!z->tx_live && tx_open(z) != DX_PMD_OK) return DX_PMD_NOMEM;
  z_stream *s = &z->tx;
  size_t produced = 0;
  s->next_in = (Bytef *)(uintptr_t)in;
  do {
    uInt take = n > UINT_MAX ? UINT_MAX : (uInt)n;
    n -= take;
    s->avail_in = take;
    int flush = n ? Z_NO_FLUSH : Z_SYNC_FLUSH;
    do {
      size_t room = deflate_room(s);
      uint8_t *dst = dx_buf_reserve(out, room);
      if (!dst) {
        tx_close(z);
        return DX_PMD_NOMEM;
      }
      s->next_out = dst;
      s->avail_out = (uInt)room;
      int rc = deflate(s, flush);
      size_t got = room - s->avail_out;
      out->len += got;
      produced += got;
      if (rc == Z_STREAM_ERROR) {
        tx_close(z);
        return DX_PMD_NOMEM;
      }
    } while (s->avail_out == 0);
  } while (n);
  if (!fin) return DX_PMD_OK;
  if (produced == 0) {
    /* Nothing new since the previous piece's flush (zlib will not flush
     * twice): end with the header of an empty stored block, whose length
     * fields are the tail the receiver restores (RFC 7692 7.2.3.6). */
    if (dx_buf_append(out, "", 1) != 0) {
      tx_close(z);
      return DX_PMD_NOMEM;
    }
  } else if (produced >= 4 && memcmp(out->data + out->len - 4, flush_tail, 4) == 0) {
    out->len -= 4;
  } else {
    tx_close(z); /* a sync flush always ends so; never reached */
    return DX_PMD_NOMEM;
  }
  if (z->tx_reset) tx_close(z);
  return DX_PMD_OK;
}

/* --- inflate ------------------------------------------------------------- */

static int rx_open(dx_pmd *z) {
  prepare(z, &z->rx);
  int rc = inflateInit2(&z->rx, -z->rx_bits);
  if (rc == Z_STREAM_ERROR && z->rx_bits < 9) {
    /* zlib versions that refuse an 8-bit raw window: a larger window
     * decodes everything a smaller one does. */
    prepare(z, &z->rx);
    rc = inflateInit2(&z->rx, -9);
  }
  if (rc != Z_OK) return DX_PMD_NOMEM;
  z->rx_live = 1;
  return DX_PMD_OK;
}

/* Inflate in[0..n) into out, keeping this message's total within max_out:
 * output space is offered in steps up to the limit, and once the limit is
 * reached a one-byte probe tells whether more output would follow. */
static int rx_run(dx_pmd *z, const uint8_t *in, size_t n, dx_buf *out, size_t max_out) {
  z_stream *s = &z->rx;
  s->next_in = (Bytef *)(uintptr_t)in;
  s->avail_in = 0;
  for (;;) {
    if (s->avail_in == 0 && n) {
      uInt take = n > UINT_MAX ? UINT_MAX : (uInt)n;
      s->avail_in = take;
      n -= take;
    }
    size_t left = max_out > z->rx_out ? max_out - z->rx_out : 0;
    uint8_t probe;
    uint8_t *dst = &probe;
    size_t room = 1;
    if (left) {
      room = (size_t)s->avail_in * 4 + 256;
      if (room > DX_PMD_CHUNK) room = DX_PMD_CHUNK;
      if (room > left) room = left;
      dst = dx_buf_reserve(out, room);
      if (!dst) return DX_PMD_NOMEM;
    }
    s->next_out = dst;
    s->avail_out = (uInt)room;
    int rc = inflate(s, Z_SYNC_FLUSH);
    size_t got = room - s->avail_out;
    if (got && !left) return DX_PMD_TOOBIG;
    out->len += got;
    z->rx_out += got;
    if (rc == Z_STREAM_END) {
      /* The sender ended its deflate stream with a BFINAL block; what
       * follows in this message (the 0x00 octet of RFC 7692 7.2.3.4 and
       * the restored tail) is padding. */
      z->rx_ended = 1;
      return DX_PMD_OK;
    }
    if (rc == Z_MEM_ERROR) return DX_PMD_NOMEM;
    if (rc != Z_OK && rc != Z_BUF_ERROR) return DX_PMD_DATA;
    if (s->avail_out != 0 && s->avail_in == 0 && n == 0) return DX_PMD_OK;
    if (rc == Z_BUF_ERROR && s->avail_out != 0) return DX_PMD_DATA; /* stuck */
  }
}

/* After a BFINAL block the stream is restarted for the next message. With
 * context takeover the window is carried over, so a sender that keeps
 * referring to earlier messages is understood too. */
static int rx_restart(dx_pmd *z) {
  z_stream *s = &z->rx;
  uInt have = 0;
  Bytef *dict = malloc((size_t)1 << 15);
  if (!dict) return DX_PMD_NOMEM;
  if (inflateGetDictionary(s, dict, &have) != Z_OK) have = 0;
  int rc = inflateReset(s);
  if (rc == Z_OK && have) rc = inflateSetDictionary(s, dict, have);
  free(dict);
  return rc == Z_OK ? DX_PMD_OK : DX_PMD_NOMEM;
}

static int rx_message_done(dx_pmd *z) {
  int rc = DX_PMD_OK;
  if (z->rx_reset) rx_close(z);
  else if (z->rx_ended && z->rx_live) rc = rx_restart(z);
  z->rx_in = z->rx_out = 0;
  z->rx_ended = 0;
  return rc;
}

static int rx_fail(dx_pmd *z, int rc) {
  rx_close(z);
  z->rx_in = z->rx_out = 0;
  z->rx_ended = 0;
  return rc;
}

int dx_pmd_inflate(dx_pmd *z, const uint8_t *in, size_t n, int fin, dx_buf *out,
                   size_t max_out) {
  int rc;
  if (n && !z->rx_ended) {
    if (!z->rx_live && (rc = rx_open(z)) != DX_PMD_OK) return rx_fail(z, rc);
    if ((rc = rx_run(z, in, n, out, max_out)) != DX_PMD_OK) return rx_fail(z, rc);
  }
  z->rx_in += n;
  if (!fin) return DX_PMD_OK;
  /* A compressed message with no payload at all is taken as empty, without
   * touching the window (the tail alone would open a block never closed).
   * Likewise when the data already stopped at a flush point (data_type 128:
   * between blocks, no bits pending), as when a sender ends a message with
   * an empty fragment after a flushed one, or keeps its own 00 00 ff ff: a
   * valid payload ends inside the stored block header the tail completes. */
  if (z->rx_in && !z->rx_ended && z->rx.data_type != 128) {
    if ((rc = rx_run(z, flush_tail, 4, out, max_out)) != DX_PMD_OK) return rx_fail(z, rc);
    /* The tail must close that empty stored block and leave the inflater
     * between blocks; otherwise the message was cut short and the next one
     * would be misread. */
    if (!z->rx_ended && z->rx.data_type != 128) return rx_fail(z, DX_PMD_DATA);
  }
  if ((rc = rx_message_done(z)) != DX_PMD_OK) return rx_fail(z, rc);
  return DX_PMD_OK;
}

/* --- negotiation ----------------------------------------------------------- */

enum { P_SNCT = 1, P_CNCT = 2, P_SMWB = 4, P_CMWB = 8 };

void dx_pmd_offer_init(dx_pmd_offer *o) { memset(o, 0, sizeof *o); }

static int name_is(const char *name, size_t n, const char *want) {
  return strlen(want) == n && strncasecmp(name, want, n) == 0;
}

/* RFC 7692 7.1.2: 1*DIGIT without leading zeroes, 8..15. */
static int parse_bits(const char *v, size_t n) {
  if (n == 1 && v[0] >= '8' && v[0] <= '9') return v[0] - '0';
  if (n == 2 && v[0] == '1' && v[1] >= '0' && v[1] <= '5') return 10 + v[1] - '0';
  return -1;
}

const char *dx_pmd_offer_add(dx_pmd_offer *o, const char *name, size_t name_len,
                             const char *value, size_t value_len, int has_value) {
  unsigned bit;
  if (name_is(name, name_len, "server_no_context_takeover")) bit = P_SNCT;
  else if (name_is(name, name_len, "client_no_context_takeover")) bit = P_CNCT;
  else if (name_is(name, name_len, "server_max_window_bits")) bit = P_SMWB;
  else if (name_is(name, name_len, "client_max_window_bits")) bit = P_CMWB;
  else return "unknown parameter";
  if (o->seen & bit) return "repeated parameter";
  o->seen |= bit;
  if (bit == P_SNCT || bit == P_CNCT) {
    if (has_value) return "no_context_takeover takes no value";
    if (bit == P_SNCT) o->server_no_context_takeover = 1;
    else o->client_no_context_takeover = 1;
    return NULL;
  }
  int bits = DX_PMD_NOVALUE;
  if (has_value && (bits = parse_bits(value, value_len)) < 0)
    return "window bits must be 8 to 15";
  if (bit == P_SMWB) {
    if (!has_value) return "server_max_window_bits needs a value";
    o->server_max_window_bits = bits;
  } else {
    o->client_max_window_bits = bits;
  }
  return NULL;
}

static int min_bits(int a, int b) { return a < b ? a : b; }

int dx_pmd_accept(const dx_pmd_offer *offer, const dx_pmd_params *policy,
                  dx_pmd_offer *response, dx_pmd_params *agreed) {
  if (!bits_ok(policy->server_max_window_bits) || !bits_ok(policy->client_max_window_bits))
    return -1;
  dx_pmd_offer_init(response);
  /* Flags: the client may demand ours; its own is a promise we may echo,
   * which lets our inflater be released between messages. */
  agreed->server_no_context_takeover =
      offer->server_no_context_takeover || policy->server_no_context_takeover;
  agreed->client_no_context_takeover =
      offer->client_no_context_takeover || policy->client_no_context_takeover;
  response->server_no_context_takeover = agreed->server_no_context_takeover;
  response->client_no_context_takeover = agreed->client_no_context_takeover;

  /* Our window: an offered limit must be answered with it or less. */
  int sbits = policy->server_max_window_bits;
  if (offer->server_max_window_bits >= 8) sbits = min_bits(sbits, offer->server_max_window_bits);
  agreed->server_max_window_bits = sbits;
  if (offer->server_max_window_bits != DX_PMD_ABSENT || sbits < 15)
    response->server_max_window_bits = sbits;

  /* The client's window can be limited only if it said it understands. */
  int cbits = 15;
  if (offer->client_max_window_bits != DX_PMD_ABSENT) {
    cbits = policy->client_max_window_bits;
    if (offer->client_max_window_bits >= 8) cbits = min_bits(cbits, offer->client_max_window_bits);
    if (cbits < 15) response->client_max_window_bits = cbits;
  }
  agreed->client_max_window_bits = cbits;
  return 0;
}

const char *dx_pmd_check_response(const dx_pmd_offer *r, const dx_pmd_offer *o,
                                  dx_pmd_params *agreed) {
  if (r->client_max_window_bits == DX_PMD_NOVALUE)
    return "client_max_window_bits needs a value in a response";
  if (r->client_max_window_bits != DX_PMD_ABSENT && o->client_max_window_bits == DX_PMD_ABSENT)
    return "client_max_window_bits was not offered";
  if (o->client_max_window_bits >= 8 && r->client_max_window_bits > o->client_max_window_bits)
    return "client_max_window_bits above the offered value";
  if (o->server_max_window_bits >= 8) {
    if (r->server_max_window_bits == DX_PMD_ABSENT)
      return "server_max_window_bits was offered but not accepted";
    if (r->server_max_window_bits > o->server_max_window_bits)
      return "server_max_window_bits above the offered value";
  }
  if (o->server_no_context_takeover && !r->server_no_context_takeover)
    return "server_no_context_takeover was offered but not accepted";
  agreed->server_no_context_takeover = r->server_no_context_takeover;
  /* Offering client_no_context_takeover promised it whatever the answer. */
  agreed->client_no_context_takeover = r->client_no_context_takeover || o->client_no_context_takeover;
  agreed->server_max_window_bits = r->server_max_window_bits >= 8 ? r->server_max_window_bits : 15;
  /* Without an answer our own hint still bounds the window we deflate with:
   * smaller is always safe and costs less memory. */
  agreed->client_max_window_bits = r->client_max_window_bits >= 8   ? r->client_max_window_bits
                                   : o->client_max_window_bits >= 8 ? o->client_max_window_bits
                                                                    : 15;
  return NULL;
}

static size_t put(char *buf, size_t at, const char *s) {
  size_t n = strlen(s);
  memcpy(buf + at, s, n);
  return at + n;
}

static size_t put_bits(char *buf, size_t at, const char *name, int bits) {
  at = put(buf, at, "; ");
  at = put(buf, at, name);
  if (bits >= 8) {
    buf[at++] = '=';
    if (bits >= 10) buf[at++] = '1';
    buf[at++] = (char)('0' + bits % 10);
  }
  return at;
}

size_t dx_pmd_format(const dx_pmd_offer *o, char *buf) {
  size_t at = put(buf, 0, "permessage-deflate");
  if (o->server_no_context_takeover) at = put(buf, at, "; server_no_context_takeover");
  if (o->client_no_context_takeover) at = put(buf, at, "; client_no_context_takeover");
  if (o->server_max_window_bits != DX_PMD_ABSENT)
    at = put_bits(buf, at, "server_max_window_bits", o->server_max_window_bits);
  if (o->client_max_window_bits != DX_PMD_ABSENT)
    at = put_bits(buf, at, "client_max_window_bits", o->client_max_window_bits);
  buf[at] = '\0';
  return at;
}
