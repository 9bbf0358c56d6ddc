/* CHECK(cond): a property every input must keep; a failure aborts, which
 * libFuzzer reports with the input that broke it. */
#ifndef DX_FUZZ_CHECK_H
#define DX_FUZZ_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      fprintf(stderr, "%s:%d: property failed: %s\n", __FILE__, __LINE__, #cond); \
      abort();                                                                   \
    }                                                                            \
  } while (0)

#endif
