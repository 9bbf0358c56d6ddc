/*
 * Runs a differential harness's oracle outside libFuzzer on fixed seeds,
 * for `make check` (spec/roundtrip_spec.lua): linked with fuzz_roundtrip.c
 * (roundtrip_seeds) or fuzz_heartbeat.c (heartbeat_seeds). Each seed makes
 * a random input of random length, so every run is a full scenario and a
 * failure names the seed that reproduces it.
 *   roundtrip_seeds FIRST COUNT
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int main(int argc, char **argv) {
  unsigned long first = argc > 1 ? strtoul(argv[1], NULL, 10) : 1;
  unsigned long count = argc > 2 ? strtoul(argv[2], NULL, 10) : 100;
  static uint8_t input[4096];
  for (unsigned long seed = first; seed < first + count; seed++) {
    uint64_t x = seed * 0x9e3779b97f4a7c15u + 1;
    size_t n = 0;
    x ^= x >> 29;
    n = 16 + (size_t)(x % (sizeof input - 16));
    for (size_t i = 0; i < n; i++) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      input[i] = (uint8_t)(x >> 24);
    }
    fprintf(stderr, "seed %lu\n", seed);
    LLVMFuzzerTestOneInput(input, n);
  }
  printf("%lu seeds ok\n", count);
  return 0;
}
