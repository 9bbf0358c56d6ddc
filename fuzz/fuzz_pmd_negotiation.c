/*
 * libFuzzer harness for permessage-deflate negotiation (RFC 7692 §7): a
 * client's Sec-WebSocket-Extensions offer and a server's answer, both from
 * the input, through the same steps as a handshake (dx_ext_next splits the
 * header, dx_pmd_offer_add takes each parameter, dx_pmd_accept answers,
 * dx_pmd_check_response judges). Properties, besides never crashing:
 *  - whatever the server accepts, formatted and read back by the client
 *    against the same offer, is accepted, and both sides agree on the
 *    parameters (the codecs they build can talk: checked with a message);
 *  - a response the client accepts has window bits 8..15;
 *  - formatting is stable: format(parse(format(x))) == format(x).
 *
 * Input layout: [policy byte] [offer header] '\n' [response header]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dx_ws.h"
#include "dx_pmd.h"
#include "fuzz_check.h"


/* The permessage-deflate elements of a header, as a handshake reads them.
 * Returns how many (at most max); -1 for a header that is not valid. */
static int read_elements(const char *p, size_t n, dx_pmd_offer *out, int *valid, int max) {
  dx_ext_cursor c;
  dx_ext_tok t;
  dx_ext_init(&c, p, n);
  int k = 0, in_pmd = 0, rc;
  while ((rc = dx_ext_next(&c, &t)) != DX_EXT_END) {
    if (rc == DX_EXT_BAD) return -1;
    if (rc == DX_EXT_NAME) {
      /* other extensions are skipped, with their parameters */
      in_pmd = t.name.n == 18 && strncasecmp(t.name.p, "permessage-deflate", 18) == 0;
      if (!in_pmd) continue;
      if (k == max) break;
      dx_pmd_offer_init(&out[k]);
      valid[k++] = 1;
    } else if (in_pmd && valid[k - 1]) {
      char value[256];
      size_t vn = t.value.n < sizeof value ? t.value.n : sizeof value;
      if (vn) memcpy(value, t.value.p, vn); /* a bare parameter has no value (NULL) */
      if (t.quoted) vn = dx_http_unquote(t.value.p, vn, value);
      if (dx_pmd_offer_add(&out[k - 1], t.name.p, t.name.n, value, vn, t.has_value)) valid[k - 1] = 0;
    }
  }
  return k;
}

static void talk(const dx_pmd_params *agreed) {
  dx_pmd *s = dx_pmd_new(0, agreed, NULL), *c = dx_pmd_new(1, agreed, NULL);
  CHECK(s && c);
  static const char msg[] = "a message both sides must agree on, agree on, agree on";
  dx_buf z = DX_BUF_INIT, back = DX_BUF_INIT;
  for (int i = 0; i < 2; i++) {
    dx_buf_clear(&z);
    dx_buf_clear(&back);
    CHECK(dx_pmd_deflate(s, (const uint8_t *)msg, sizeof msg, 1, &z) == DX_PMD_OK);
    CHECK(dx_pmd_inflate(c, dx_buf_head(&z), dx_buf_size(&z), 1, &back, 1 << 20) == DX_PMD_OK);
    CHECK(dx_buf_size(&back) == sizeof msg && memcmp(dx_buf_head(&back), msg, sizeof msg) == 0);
  }
  dx_buf_free(&z);
  dx_buf_free(&back);
  dx_pmd_free(s);
  dx_pmd_free(c);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  uint8_t pol = data[0];
  const char *p = (const char *)data + 1;
  size_t n = size - 1;
  const char *nl = memchr(p, '\n', n);
  size_t offer_n = nl ? (size_t)(nl - p) : n;
  const char *resp = nl ? nl + 1 : p + n;
  size_t resp_n = nl ? n - offer_n - 1 : 0;

  dx_pmd_params policy = {pol & 1, (pol >> 1) & 1, 8 + ((pol >> 2) & 7), 8 + ((pol >> 5) & 7)};
  dx_pmd_offer offers[8];
  int valid[8] = {0};
  int k = read_elements(p, offer_n, offers, valid, 8);
  for (int i = 0; i < k; i++) {
    if (!valid[i]) continue;
    char text[DX_PMD_HEADER_MAX];
    size_t tn = dx_pmd_format(&offers[i], text);
    CHECK(tn < DX_PMD_HEADER_MAX);
    /* the formatted offer reads back to the same text */
    dx_pmd_offer again[1];
    int v2[1] = {0};
    CHECK(read_elements(text, tn, again, v2, 1) == 1 && v2[0]);
    char text2[DX_PMD_HEADER_MAX];
    CHECK(dx_pmd_format(&again[0], text2) == tn && memcmp(text, text2, tn) == 0);

    dx_pmd_offer response;
    dx_pmd_params agreed;
    if (dx_pmd_accept(&offers[i], &policy, &response, &agreed) != 0) continue;
    char rtext[DX_PMD_HEADER_MAX];
    size_t rn = dx_pmd_format(&response, rtext);
    dx_pmd_offer rback[1];
    int rv[1] = {0};
    CHECK(read_elements(rtext, rn, rback, rv, 1) == 1 && rv[0]);
    dx_pmd_params client_side;
    CHECK(dx_pmd_check_response(&rback[0], &offers[i], &client_side) == NULL);
    CHECK(memcmp(&client_side, &agreed, sizeof agreed) == 0);
    talk(&agreed);
    break; /* the server takes the first offer it can */
  }

  /* the server's answer from the input, against the first valid offer */
  dx_pmd_offer answers[2];
  int av[2] = {0};
  int ka = read_elements(resp, resp_n, answers, av, 2);
  if (ka >= 1 && av[0] && k >= 1 && valid[0]) {
    dx_pmd_params got;
    if (dx_pmd_check_response(&answers[0], &offers[0], &got) == NULL) {
      CHECK(got.server_max_window_bits >= 8 && got.server_max_window_bits <= 15);
      CHECK(got.client_max_window_bits >= 8 && got.client_max_window_bits <= 15);
      talk(&got);
    }
  }
  return 0;
}
