// The join handshake's primitives on OpenSSL's libcrypto (crypto.h).
#include "comm/net/crypto.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "tessera/core/error.h"

namespace tessera::comm::net {

Bytes randomBytes(size_t count) {
  Bytes out(count);
  if (RAND_bytes(out.data(), static_cast<int>(out.size())) != 1) {
    throw CommError("cannot draw random bytes for the join handshake (OpenSSL RAND_bytes failed)");
  }
  return out;
}

bool constantTimeEqual(const uint8_t* a, const uint8_t* b, size_t size) { return CRYPTO_memcmp(a, b, size) == 0; }

Bytes hmacSha256(const std::string& key, const Bytes& data) {
  Bytes out(EVP_MAX_MD_SIZE);
  unsigned int length = 0;
  // A non-null key pointer even for the empty secret: OpenSSL treats a null
  // key as "reuse the previous one".
  static const unsigned char kEmpty = 0;
  const void* keyData = key.empty() ? static_cast<const void*>(&kEmpty) : key.data();
  static const unsigned char kNoData = 0;
  const unsigned char* input = data.empty() ? &kNoData : data.data();
  if (HMAC(EVP_sha256(), keyData, static_cast<int>(key.size()), input, data.size(), out.data(), &length) ==
      nullptr) {
    throw CommError("HMAC-SHA256 failed inside OpenSSL");
  }
  out.resize(length);
  return out;
}

}  // namespace tessera::comm::net
