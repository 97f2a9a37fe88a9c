// Linked instead of crypto.cc when tessera is built without OpenSSL
// (TESSERA_WITH_OPENSSL=OFF, or libssl-dev missing when it was configured):
// the join handshake of tessera's store and of live recovery cannot run, and
// says so at the first use instead of at build time.
#include "comm/net/crypto.h"

#include "tessera/core/error.h"

namespace tessera::comm::net {
namespace {

[[noreturn]] void noOpenSsl() {
  throw NotSupported(
      "tessera was built without OpenSSL (TESSERA_WITH_OPENSSL=OFF, or libssl-dev missing when it was "
      "configured): the join handshake of tessera's store (tessera-store, elastic rendezvous) and of live "
      "recovery needs HMAC-SHA256; install libssl-dev and reconfigure, or use the TCP store (non-elastic jobs)");
}

}  // namespace

Bytes randomBytes(size_t) { noOpenSsl(); }

bool constantTimeEqual(const uint8_t*, const uint8_t*, size_t) { noOpenSsl(); }

Bytes hmacSha256(const std::string&, const Bytes&) { noOpenSsl(); }

}  // namespace tessera::comm::net
