// The cryptographic primitives of the join handshake (auth.cc), behind one
// seam so that a build without OpenSSL (TESSERA_WITH_OPENSSL=OFF: a GPU
// machine with only PyTorch's wheel) links crypto_unavailable.cc instead,
// whose functions throw NotSupported naming the option. hmacSha256 itself is
// declared in tessera/comm/net.h.
#pragma once

#include <cstddef>
#include <cstdint>

#include "tessera/comm/net.h"

namespace tessera::comm::net {

// `count` bytes from a cryptographically secure generator. Throws CommError
// when the generator fails, NotSupported without OpenSSL.
Bytes randomBytes(size_t count);

// Whether a[0..size) equals b[0..size), in time independent of where they
// differ (so a proof cannot be guessed byte by byte from timings).
bool constantTimeEqual(const uint8_t* a, const uint8_t* b, size_t size);

}  // namespace tessera::comm::net
