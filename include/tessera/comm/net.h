// Plain TCP sockets with deadlines, length-prefixed frames, and the join
// handshake: what tessera's own wire protocols (the store, live recovery) are
// built on. Gloo and MPI have their own transports; this is for the small,
// security-relevant services around them.
//
// Contracts:
// - Every blocking call takes a Deadline and throws TimeoutError naming the
//   operation and the peer when it passes; nothing blocks forever.
// - A closed or reset connection throws CommError naming the peer.
// - Received lengths are checked against a caller-given maximum before any
//   allocation: a garbage or truncated message is a ProtocolError, never a
//   crash or a huge allocation.
// - Sockets are move-only and close on destruction. SIGPIPE is never raised
//   (MSG_NOSIGNAL).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace tessera::comm::net {

using Bytes = std::vector<uint8_t>;

// A point in time after which a blocking call gives up.
class Deadline {
 public:
  using Clock = std::chrono::steady_clock;
  static Deadline after(std::chrono::milliseconds timeout) { return Deadline(Clock::now() + timeout); }
  explicit Deadline(Clock::time_point at) : at_(at) {}
  Clock::time_point at() const { return at_; }
  // Milliseconds left, at least 0.
  std::chrono::milliseconds remaining() const;
  bool expired() const { return Clock::now() >= at_; }

 private:
  Clock::time_point at_;
};

// A connected TCP stream. Not thread-safe: one reader and one writer thread
// at most (sendAll and recvAll may run concurrently on different threads).
class Socket {
 public:
  Socket() = default;
  // Takes ownership of a connected fd; `peer` ("host:port") names it in errors.
  Socket(int fd, std::string peer);
  Socket(Socket&& other) noexcept;
  Socket& operator=(Socket&& other) noexcept;
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  ~Socket();

  bool valid() const { return fd_ >= 0; }
  int fd() const { return fd_; }
  const std::string& peer() const { return peer_; }
  void close();
  // Half-closes both directions so a thread blocked in recvAll on this socket
  // wakes up (with CommError). Safe to call from another thread.
  void shutdown();

  // Sends/receives exactly `size` bytes. `what` names the operation in errors
  // ("store request", "recovery tensor model/wte"). Throw TimeoutError or
  // CommError as described above.
  void sendAll(const void* data, size_t size, Deadline deadline, const char* what = "send");
  void recvAll(void* data, size_t size, Deadline deadline, const char* what = "receive");

 private:
  int fd_ = -1;
  std::string peer_;
};

// Connects to host:port, retrying refused connections until the deadline
// (the server may not be up yet). Sets TCP_NODELAY. Throws TimeoutError
// naming host:port and the last error (e.g. "connection refused") when the
// deadline passes, InvalidArgument for a host name that does not resolve.
Socket connectTo(const std::string& host, uint16_t port, Deadline deadline);

// "host:port" -> (host, port). Throws InvalidArgument naming `what` and the
// expected form for anything else (missing port, port out of range).
std::pair<std::string, uint16_t> parseHostPort(const std::string& address, const std::string& what);

// A listening TCP socket.
class Listener {
 public:
  // Binds host:port (port 0: an ephemeral port, see port()); "0.0.0.0" binds
  // every interface. SO_REUSEADDR set. Throws CommError naming the address
  // when bind/listen fails (e.g. "address already in use").
  Listener(const std::string& host, uint16_t port);
  Listener(Listener&&) noexcept;
  Listener& operator=(Listener&&) noexcept;
  ~Listener();

  uint16_t port() const { return port_; }
  const std::string& host() const { return host_; }
  // Waits for one connection. Throws TimeoutError ("no connection on
  // host:port within N ms") when the deadline passes.
  Socket accept(Deadline deadline);
  // Makes a blocked accept() throw CommError at once; safe from another thread.
  void close();

 private:
  int fd_ = -1;
  std::string host_;
  uint16_t port_ = 0;
};

// Frames: a 4-byte little-endian length, then that many bytes.
void sendFrame(Socket& socket, const Bytes& payload, Deadline deadline, const char* what = "frame");
// Throws ProtocolError naming the peer when the announced length exceeds
// maxBytes (before allocating anything).
Bytes recvFrame(Socket& socket, size_t maxBytes, Deadline deadline, const char* what = "frame");

// --- The join secret and the handshake --------------------------------------
//
// Every connection to a tessera store or a live-recovery source starts with
// a mutual challenge-response, so that a process that does not know the job's
// secret can neither read nor write anything, and the secret itself never
// crosses the wire:
//   1. each side sends a fresh 32-byte random nonce (OpenSSL RAND_bytes)
//      after the magic "TSRA" and a version byte;
//   2. the client sends HMAC-SHA256(secret, "tessera-join-v1 client" ||
//      server_nonce || client_nonce); the server checks it (constant-time
//      compare) and answers with one status byte, then its own proof
//      HMAC-SHA256(secret, "tessera-join-v1 server" || client_nonce ||
//      server_nonce), which the client checks: neither side can be replayed
//      or impersonated without the secret.
// An empty secret on both sides still runs the handshake (with an empty key):
// a job without a secret accepts anyone who speaks the protocol, and garbage
// is still rejected at step 1.

// The job's secret: the contents of the file named by TESSERA_JOIN_TOKEN_FILE
// (trailing newline removed), else TESSERA_JOIN_TOKEN, else "" (no secret).
// Throws InvalidArgument naming the file when it cannot be read or is empty.
std::string loadJoinSecret();
// The contents of `path` as a secret (same rules).
std::string loadJoinSecretFile(const std::string& path);

// Runs the server side of the handshake. Throws AuthError naming the peer and
// the reason ("bad proof: the peer does not know the join secret", "bad
// magic: not a tessera client") -- the caller logs it and drops the
// connection -- or TimeoutError/CommError/ProtocolError.
void authenticateServer(Socket& socket, const std::string& secret, Deadline deadline);
// Runs the client side. Throws AuthError when the server refuses this
// process's proof ("refused by host:port: wrong join secret; check
// TESSERA_JOIN_TOKEN_FILE") or its own proof is wrong.
void authenticateClient(Socket& socket, const std::string& secret, Deadline deadline);

// HMAC-SHA256(key, data), 32 bytes (exposed for tests).
Bytes hmacSha256(const std::string& key, const Bytes& data);

}  // namespace tessera::comm::net
