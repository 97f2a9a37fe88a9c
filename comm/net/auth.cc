// The join secret and the mutual HMAC-SHA256 challenge-response (net.h).
//
// Wire format (both directions start with a hello):
//   hello  = "TSRA" | u8 version | 32-byte nonce                  (37 bytes)
//   client -> server: proof_c = HMAC(secret, "tessera-join-v1 client" | nonce_s | nonce_c)
//   server -> client: u8 status (0 accepted, 1 refused), then, if accepted,
//                     proof_s = HMAC(secret, "tessera-join-v1 server" | nonce_c | nonce_s)
// The client speaks first; the server answers a hello only after checking
// the client's magic, so a stray HTTP request or port scanner gets nothing.
// Each proof binds both fresh nonces, so a recorded exchange cannot be
// replayed, and the two roles use different labels, so a proof cannot be
// reflected back at its sender.
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "comm/net/crypto.h"
#include "tessera/comm/net.h"
#include "tessera/core/error.h"

namespace tessera::comm::net {
namespace {

constexpr char kMagic[4] = {'T', 'S', 'R', 'A'};
constexpr uint8_t kVersion = 1;
constexpr size_t kNonceBytes = 32;
constexpr size_t kHelloBytes = sizeof(kMagic) + 1 + kNonceBytes;
constexpr size_t kProofBytes = 32;
constexpr uint8_t kAccepted = 0;
constexpr uint8_t kRefused = 1;
constexpr char kClientLabel[] = "tessera-join-v1 client";
constexpr char kServerLabel[] = "tessera-join-v1 server";

Bytes freshNonce() { return randomBytes(kNonceBytes); }

Bytes makeHello(const Bytes& nonce) {
  Bytes hello(kMagic, kMagic + sizeof(kMagic));
  hello.push_back(kVersion);
  hello.insert(hello.end(), nonce.begin(), nonce.end());
  return hello;
}

// Checks a received hello and returns its nonce. `expectedRole` words the error.
Bytes parseHello(const uint8_t* hello, const std::string& peer, const char* expectedRole) {
  if (std::memcmp(hello, kMagic, sizeof(kMagic)) != 0) {
    throw AuthError("join handshake with " + peer + " failed: bad magic: not a tessera " + expectedRole);
  }
  if (hello[sizeof(kMagic)] != kVersion) {
    throw AuthError("join handshake with " + peer + " failed: unsupported handshake version " +
                    std::to_string(hello[sizeof(kMagic)]) + " (this build speaks version " +
                    std::to_string(kVersion) + "; are both sides the same tessera release?)");
  }
  return Bytes(hello + sizeof(kMagic) + 1, hello + kHelloBytes);
}

Bytes proof(const std::string& secret, const char* label, const Bytes& first, const Bytes& second) {
  Bytes message(label, label + std::strlen(label));
  message.insert(message.end(), first.begin(), first.end());
  message.insert(message.end(), second.begin(), second.end());
  return hmacSha256(secret, message);
}

bool sameProof(const Bytes& a, const uint8_t* b) {
  return a.size() == kProofBytes && constantTimeEqual(a.data(), b, kProofBytes);
}

}  // namespace

std::string loadJoinSecretFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw InvalidArgument("cannot read the join secret file '" + path + "': " + std::strerror(errno) +
                          " (check TESSERA_JOIN_TOKEN_FILE / --join-token-file)");
  }
  std::ostringstream contents;
  contents << in.rdbuf();
  std::string secret = contents.str();
  while (!secret.empty() && (secret.back() == '\n' || secret.back() == '\r')) secret.pop_back();
  if (secret.empty()) {
    throw InvalidArgument("the join secret file '" + path +
                          "' is empty: write a secret into it (e.g. `openssl rand -hex 32 > " + path + "`)");
  }
  return secret;
}

std::string loadJoinSecret() {
  const char* file = std::getenv("TESSERA_JOIN_TOKEN_FILE");
  if (file != nullptr && *file != '\0') return loadJoinSecretFile(file);
  const char* token = std::getenv("TESSERA_JOIN_TOKEN");
  if (token != nullptr) return token;
  return "";
}

void authenticateServer(Socket& socket, const std::string& secret, Deadline deadline) {
  uint8_t clientHello[kHelloBytes];
  socket.recvAll(clientHello, sizeof(clientHello), deadline, "join handshake (client hello)");
  const Bytes clientNonce = parseHello(clientHello, socket.peer(), "client");

  const Bytes serverNonce = freshNonce();
  const Bytes serverHello = makeHello(serverNonce);
  socket.sendAll(serverHello.data(), serverHello.size(), deadline, "join handshake (server hello)");

  uint8_t clientProof[kProofBytes];
  socket.recvAll(clientProof, sizeof(clientProof), deadline, "join handshake (client proof)");
  const Bytes expected = proof(secret, kClientLabel, serverNonce, clientNonce);
  if (!sameProof(expected, clientProof)) {
    // Tell the client why, so its error is clear; best effort.
    try {
      socket.sendAll(&kRefused, 1, deadline, "join handshake (refusal)");
    } catch (const Error&) {
    }
    throw AuthError("join handshake with " + socket.peer() +
                    " failed: bad proof: the peer does not know the join secret");
  }
  Bytes answer{kAccepted};
  const Bytes serverProof = proof(secret, kServerLabel, clientNonce, serverNonce);
  answer.insert(answer.end(), serverProof.begin(), serverProof.end());
  socket.sendAll(answer.data(), answer.size(), deadline, "join handshake (server proof)");
}

void authenticateClient(Socket& socket, const std::string& secret, Deadline deadline) {
  const Bytes clientNonce = freshNonce();
  const Bytes clientHello = makeHello(clientNonce);
  socket.sendAll(clientHello.data(), clientHello.size(), deadline, "join handshake (client hello)");

  uint8_t serverHello[kHelloBytes];
  socket.recvAll(serverHello, sizeof(serverHello), deadline, "join handshake (server hello)");
  const Bytes serverNonce = parseHello(serverHello, socket.peer(), "server");

  const Bytes clientProof = proof(secret, kClientLabel, serverNonce, clientNonce);
  socket.sendAll(clientProof.data(), clientProof.size(), deadline, "join handshake (client proof)");

  uint8_t status = kRefused;
  socket.recvAll(&status, 1, deadline, "join handshake (server verdict)");
  if (status != kAccepted) {
    throw AuthError("join handshake refused by " + socket.peer() +
                    ": wrong join secret; check TESSERA_JOIN_TOKEN_FILE (or TESSERA_JOIN_TOKEN) is the job's");
  }
  uint8_t serverProof[kProofBytes];
  socket.recvAll(serverProof, sizeof(serverProof), deadline, "join handshake (server proof)");
  if (!sameProof(proof(secret, kServerLabel, clientNonce, serverNonce), serverProof)) {
    throw AuthError("join handshake with " + socket.peer() +
                    " failed: the server could not prove it knows the join secret (a different job's "
                    "server, or an impostor); check TESSERA_JOIN_TOKEN_FILE and the address");
  }
}

}  // namespace tessera::comm::net
