/* The vendored xxhash compiled once (tessera::xxhash when the system has no
 * libxxhash): the header is the whole library; XXH_IMPLEMENTATION emits its
 * functions here, with the same names and results as libxxhash, and
 * XXH_STATIC_LINKING_ONLY declares the state structs they need. */
#define XXH_STATIC_LINKING_ONLY
#define XXH_IMPLEMENTATION
#include "xxhash.h"
