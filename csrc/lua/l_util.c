/*
 * Lua access to the byte-level helpers: UTF-8 validation, masking, and
 * random bytes for masking keys and handshake nonces; and the clock, which
 * every build has, with or without the event loop.
 */
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "dx_clock.h"
#include "dx_mask.h"
#include "dx_utf8.h"
#include "l_core.h"

#ifdef __GLIBC__ /* defined by the system headers above */
#include <malloc.h>
#endif

#define RANDOM_MAX 65536

/* utf8_valid(s [, state]) -> true, state | false, nil
 * state 0 means "between code points": s (with what came before) is a
 * complete message; any other state continues in the next call. */
static int l_utf8_valid(lua_State *L) {
  size_t n;
  const uint8_t *s = (const uint8_t *)luaL_checklstring(L, 1, &n);
  lua_Integer st = luaL_optinteger(L, 2, DX_UTF8_ACCEPT);
  uint32_t state = (uint32_t)st;
  /* An empty feed accepts exactly the states a feed can leave behind. */
  luaL_argcheck(L, st >= 0 && st <= UINT32_MAX && dx_utf8_feed(&state, s, 0) == 0, 2,
                "not a state returned by utf8_valid");
  if (dx_utf8_feed(&state, s, n) != 0) {
    lua_pushboolean(L, 0);
    lua_pushnil(L);
  } else {
    lua_pushboolean(L, 1);
    lua_pushinteger(L, (lua_Integer)state);
  }
  return 2;
}

/* mask(s, key [, offset]) -> s XOR key, starting at key[offset] */
static int l_mask(lua_State *L) {
  size_t n, klen;
  const uint8_t *s = (const uint8_t *)luaL_checklstring(L, 1, &n);
  const uint8_t *key = (const uint8_t *)luaL_checklstring(L, 2, &klen);
  lua_Integer off = luaL_optinteger(L, 3, 0);
  luaL_argcheck(L, klen == 4, 2, "mask key must be a 4-byte string");
  luaL_argcheck(L, off >= 0 && off <= 3, 3, "key offset must be 0..3");
  luaL_Buffer b;
  uint8_t *out = (uint8_t *)luaL_buffinitsize(L, &b, n);
  dx_mask_copy(out, s, n, key, (unsigned)off);
  luaL_pushresultsize(&b, n);
  return 1;
}

/* base64(s) -> s in standard base64 (OpenSSL's encoder, as for the
 * handshake keys); used for HTTP basic authentication. */
static int l_base64(lua_State *L) {
  size_t n;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
  luaL_argcheck(L, n <= (1u << 24), 1, "longer than 16 MiB");
  size_t len = 4 * ((n + 2) / 3);
  luaL_Buffer b;
  unsigned char *out = (unsigned char *)luaL_buffinitsize(L, &b, len + 1);
  EVP_EncodeBlock(out, s, (int)n);
  luaL_pushresultsize(&b, len);
  return 1;
}

/* sha1_hex(s) -> s's SHA-1 as 40 hex digits: the name Redis gives a
 * script (EVALSHA), known without asking the server for it. */
static int l_sha1_hex(lua_State *L) {
  size_t n;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(s, n, md, &len, EVP_sha1(), NULL) != 1) return luaL_error(L, "sha1_hex: EVP_Digest failed");
  char hex[2 * EVP_MAX_MD_SIZE];
  static const char digits[] = "0123456789abcdef";
  for (unsigned int i = 0; i < len; i++) {
    hex[2 * i] = digits[md[i] >> 4];
    hex[2 * i + 1] = digits[md[i] & 15];
  }
  lua_pushlstring(L, hex, 2 * (size_t)len);
  return 1;
}

/* crc16(s) -> CRC16-CCITT, the XMODEM variant (polynomial 0x1021,
 * initial 0), which the Redis Cluster specification names for key slots.
 * In C so that LuaJIT, without Lua 5.4's bit operators, computes it too. */
static int l_crc16(lua_State *L) {
  size_t n;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
  unsigned int c = 0;
  for (size_t i = 0; i < n; i++) {
    c ^= (unsigned int)s[i] << 8;
    for (int bit = 0; bit < 8; bit++) c = (c & 0x8000) ? ((c << 1) ^ 0x1021) & 0xFFFF : (c << 1) & 0xFFFF;
  }
  lua_pushinteger(L, (lua_Integer)c);
  return 1;
}

/* random(n) -> n bytes from OpenSSL's CSPRNG */
static int l_random(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  luaL_argcheck(L, n >= 1 && n <= RANDOM_MAX, 1, "byte count must be 1..65536");
  luaL_Buffer b;
  unsigned char *out = (unsigned char *)luaL_buffinitsize(L, &b, (size_t)n);
  if (RAND_bytes(out, (int)n) != 1) {
    char msg[256];
    ERR_error_string_n(ERR_get_error(), msg, sizeof msg);
    return luaL_error(L, "random: RAND_bytes failed: %s", msg);
  }
  luaL_pushresultsize(&b, (size_t)n);
  return 1;
}

/* core.tune_malloc(trim_bytes, mmap_bytes) -> true | false
 * glibc returns the top of the heap to the kernel once 128 KiB are free and
 * serves blocks of 128 KiB and more with mmap: a server that handles large
 * messages then faults in fresh pages for each one (a third of a 64 KiB
 * echo's time). Raising both thresholds keeps freed memory for reuse. It
 * is process-wide, so duplex.run() applies it (opt out: tune_malloc = false)
 * and a host embedding the engine decides for itself. */
static int l_tune_malloc(lua_State *L) {
  lua_Integer trim = luaL_checkinteger(L, 1);
  lua_Integer mmap_min = luaL_checkinteger(L, 2);
  luaL_argcheck(L, trim >= 0 && trim <= INT32_MAX, 1, "out of range");
  luaL_argcheck(L, mmap_min >= 0 && mmap_min <= (32 << 20), 2, "out of range (max 32 MiB)");
#ifdef __GLIBC__
  int ok = mallopt(M_TRIM_THRESHOLD, (int)trim) == 1 && mallopt(M_MMAP_THRESHOLD, (int)mmap_min) == 1;
  lua_pushboolean(L, ok);
#else
  lua_pushboolean(L, 0);
#endif
  return 1;
}

/* now() -> monotonic seconds, the clock of the loop's timers */
static int l_now(lua_State *L) {
  lua_pushnumber(L, dx_now());
  return 1;
}

void dx_open_util(lua_State *L) {
  static const luaL_Reg funcs[] = {
      {"utf8_valid", l_utf8_valid},
      {"mask", l_mask},
      {"random", l_random},
      {"base64", l_base64},
      {"sha1_hex", l_sha1_hex},
      {"crc16", l_crc16},
      {"tune_malloc", l_tune_malloc},
      {"now", l_now},
      {NULL, NULL},
  };
  dx_setfuncs(L, funcs);
}
