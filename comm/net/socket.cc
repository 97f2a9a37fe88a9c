// TCP sockets with deadlines and length-prefixed frames (net.h).
//
// Every wait is a poll() bounded by the caller's Deadline; the fds stay in
// blocking mode (callers such as the store may hand fd() to other code) and
// each send/recv passes MSG_DONTWAIT instead, so a partial transfer returns
// to the poll loop rather than blocking past the deadline in the kernel.
#include "tessera/comm/net.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <thread>

#include "tessera/core/error.h"

namespace tessera::comm::net {
namespace {

std::string errnoText(int error) { return std::strerror(error); }

// poll() timeout for the time left before `deadline`, rounded up so that a
// sub-millisecond remainder does not spin.
int pollTimeoutMs(const Deadline& deadline) {
  const auto left = deadline.at() - Deadline::Clock::now();
  if (left.count() <= 0) return 0;
  const auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
  return static_cast<int>(std::min<int64_t>(ms, INT_MAX));
}

// Waits until fd is ready for `events`; false when the deadline passed first.
// POLLHUP/POLLERR count as ready: the following send/recv reports the error.
bool waitReady(int fd, short events, const Deadline& deadline) {
  for (;;) {
    pollfd entry{fd, events, 0};
    const int ready = ::poll(&entry, 1, pollTimeoutMs(deadline));
    if (ready > 0) return true;
    if (ready == 0) {
      if (deadline.expired()) return false;
      continue;  // rounding: poll woke a hair early
    }
    if (errno != EINTR) throw CommError(std::string("poll failed: ") + errnoText(errno));
  }
}

std::string describeAddress(const sockaddr* address) {
  char host[NI_MAXHOST] = {0};
  char port[NI_MAXSERV] = {0};
  const socklen_t length = address->sa_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
  if (getnameinfo(address, length, host, sizeof(host), port, sizeof(port), NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
    return "unknown peer";
  }
  if (address->sa_family == AF_INET6) return std::string("[") + host + "]:" + port;
  return std::string(host) + ":" + port;
}

std::string joinHostPort(const std::string& host, uint16_t port) {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

void setNoDelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

void setNonBlocking(int fd, bool on) {
  const int flags = ::fcntl(fd, F_GETFL, 0);
  ::fcntl(fd, F_SETFL, on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK));
}

struct AddressList {
  addrinfo* head = nullptr;
  ~AddressList() {
    if (head != nullptr) freeaddrinfo(head);
  }
};

// Resolves host:port. Returns the getaddrinfo error code (0 on success).
int resolve(const std::string& host, uint16_t port, bool passive, AddressList* out) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  const std::string service = std::to_string(port);
  return getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &out->head);
}

// One non-blocking connect attempt bounded by `deadline`. Returns the fd, or
// -1 with *error set.
int connectOnce(const addrinfo& address, const Deadline& deadline, int* error) {
  const int fd = ::socket(address.ai_family, address.ai_socktype | SOCK_CLOEXEC, address.ai_protocol);
  if (fd < 0) {
    *error = errno;
    return -1;
  }
  setNonBlocking(fd, true);
  int result = ::connect(fd, address.ai_addr, address.ai_addrlen);
  if (result != 0 && errno == EINPROGRESS) {
    if (!waitReady(fd, POLLOUT, deadline)) {
      ::close(fd);
      *error = ETIMEDOUT;
      return -1;
    }
    int soError = 0;
    socklen_t length = sizeof(soError);
    ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &length);
    result = soError == 0 ? 0 : -1;
    errno = soError;
  }
  if (result != 0) {
    *error = errno;
    ::close(fd);
    return -1;
  }
  setNonBlocking(fd, false);
  setNoDelay(fd);
  return fd;
}

}  // namespace

std::chrono::milliseconds Deadline::remaining() const {
  const auto left = at_ - Clock::now();
  if (left.count() <= 0) return std::chrono::milliseconds(0);
  return std::chrono::duration_cast<std::chrono::milliseconds>(left);
}

// --- Socket ------------------------------------------------------------------

Socket::Socket(int fd, std::string peer) : fd_(fd), peer_(std::move(peer)) {}

Socket::Socket(Socket&& other) noexcept : fd_(other.fd_), peer_(std::move(other.peer_)) { other.fd_ = -1; }

Socket& Socket::operator=(Socket&& other) noexcept {
  if (this != &other) {
    close();
    fd_ = other.fd_;
    peer_ = std::move(other.peer_);
    other.fd_ = -1;
  }
  return *this;
}

Socket::~Socket() { close(); }

void Socket::close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void Socket::shutdown() {
  if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
}

void Socket::sendAll(const void* data, size_t size, Deadline deadline, const char* what) {
  TESSERA_CHECK_T(CommError, valid(), what << " to " << peer_ << ": the socket is closed");
  const auto* bytes = static_cast<const uint8_t*>(data);
  size_t sent = 0;
  while (sent < size) {
    const ssize_t n = ::send(fd_, bytes + sent, size - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!waitReady(fd_, POLLOUT, deadline)) {
        throw TimeoutError(std::string(what) + " to " + peer_ + " timed out (sent " + std::to_string(sent) +
                           " of " + std::to_string(size) + " bytes before the deadline; is the peer alive "
                           "and the link up?)");
      }
      continue;
    }
    throw CommError(std::string(what) + " to " + peer_ + " failed after " + std::to_string(sent) + " of " +
                    std::to_string(size) + " bytes: " + errnoText(n < 0 ? errno : EPIPE));
  }
}

void Socket::recvAll(void* data, size_t size, Deadline deadline, const char* what) {
  TESSERA_CHECK_T(CommError, valid(), what << " from " << peer_ << ": the socket is closed");
  auto* bytes = static_cast<uint8_t*>(data);
  size_t received = 0;
  while (received < size) {
    const ssize_t n = ::recv(fd_, bytes + received, size - received, MSG_DONTWAIT);
    if (n > 0) {
      received += static_cast<size_t>(n);
      continue;
    }
    if (n == 0) {
      throw CommError(std::string(what) + " from " + peer_ + ": connection closed by the peer (got " +
                      std::to_string(received) + " of " + std::to_string(size) + " bytes)");
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (!waitReady(fd_, POLLIN, deadline)) {
        throw TimeoutError(std::string(what) + " from " + peer_ + " timed out (got " + std::to_string(received) +
                           " of " + std::to_string(size) + " bytes before the deadline; is the peer alive "
                           "and the link up?)");
      }
      continue;
    }
    throw CommError(std::string(what) + " from " + peer_ + " failed after " + std::to_string(received) + " of " +
                    std::to_string(size) + " bytes: " + errnoText(errno));
  }
}

// --- Connecting ---------------------------------------------------------------

Socket connectTo(const std::string& host, uint16_t port, Deadline deadline) {
  const std::string where = joinHostPort(host, port);
  const auto budget = deadline.remaining();
  std::string lastError = "no attempt made";
  auto backoff = std::chrono::milliseconds(10);
  for (;;) {
    AddressList addresses;
    const int status = resolve(host, port, false, &addresses);
    if (status != 0 && status != EAI_AGAIN) {
      throw InvalidArgument("cannot resolve host '" + host + "' (connecting to " + where +
                            "): " + gai_strerror(status) + "; check the address");
    }
    if (status == EAI_AGAIN) lastError = std::string("name resolution: ") + gai_strerror(status);
    for (const addrinfo* address = addresses.head; address != nullptr; address = address->ai_next) {
      int error = 0;
      const int fd = connectOnce(*address, deadline, &error);
      if (fd >= 0) return Socket(fd, where);
      lastError = errnoText(error);
      if (deadline.expired()) break;
    }
    if (deadline.expired()) break;
    // Refused (server not up yet) or unreachable (link down): retry with a
    // short, growing pause, never past the deadline.
    std::this_thread::sleep_for(std::min(backoff, deadline.remaining()));
    backoff = std::min(backoff * 2, std::chrono::milliseconds(250));
  }
  throw TimeoutError("cannot connect to " + where + " within " + std::to_string(budget.count()) +
                     " ms: last error: " + lastError + " (is the server running and reachable?)");
}

std::pair<std::string, uint16_t> parseHostPort(const std::string& address, const std::string& what) {
  const std::string expected = "; expected host:port, e.g. 10.0.0.1:29500 or [::1]:29500";
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    throw InvalidArgument(what + " '" + address + "' is not host:port" + expected);
  }
  std::string host = address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  const std::string portText = address.substr(colon + 1);
  if (host.empty() || portText.size() > 5 ||
      !std::all_of(portText.begin(), portText.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    throw InvalidArgument(what + " '" + address + "' is not host:port" + expected);
  }
  const long port = std::stol(portText);
  if (port > 65535) {
    throw InvalidArgument(what + " '" + address + "': port " + portText + " is out of range (0-65535)" + expected);
  }
  return {host, static_cast<uint16_t>(port)};
}

// --- Listener -------------------------------------------------------------------

Listener::Listener(const std::string& host, uint16_t port) : host_(host), port_(port) {
  const std::string where = joinHostPort(host, port);
  AddressList addresses;
  const int status = resolve(host, port, true, &addresses);
  if (status != 0) throw CommError("cannot listen on " + where + ": " + gai_strerror(status));
  std::string lastError = "no address";
  for (const addrinfo* address = addresses.head; address != nullptr; address = address->ai_next) {
    const int fd = ::socket(address->ai_family, address->ai_socktype | SOCK_CLOEXEC, address->ai_protocol);
    if (fd < 0) {
      lastError = errnoText(errno);
      continue;
    }
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, address->ai_addr, address->ai_addrlen) != 0 || ::listen(fd, SOMAXCONN) != 0) {
      lastError = errnoText(errno);
      ::close(fd);
      continue;
    }
    sockaddr_storage bound{};
    socklen_t length = sizeof(bound);
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &length);
    port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                               : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    fd_ = fd;
    return;
  }
  throw CommError("cannot listen on " + where + ": " + lastError +
                  " (is another process using the port? pick another one)");
}

Listener::Listener(Listener&& other) noexcept
    : fd_(other.fd_), host_(std::move(other.host_)), port_(other.port_) {
  other.fd_ = -1;
}

Listener& Listener::operator=(Listener&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = other.fd_;
    host_ = std::move(other.host_);
    port_ = other.port_;
    other.fd_ = -1;
  }
  return *this;
}

Listener::~Listener() {
  if (fd_ >= 0) ::close(fd_);
}

void Listener::close() {
  // shutdown() (not close()) wakes a thread blocked in poll/accept on Linux,
  // and keeps the fd number from being reused under that thread's feet; the
  // destructor releases it.
  if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
}

Socket Listener::accept(Deadline deadline) {
  const std::string where = joinHostPort(host_, port_);
  TESSERA_CHECK_T(CommError, fd_ >= 0, "listener on " << where << " is closed");
  const auto budget = deadline.remaining();
  for (;;) {
    if (!waitReady(fd_, POLLIN, deadline)) {
      throw TimeoutError("no connection on " + where + " within " + std::to_string(budget.count()) + " ms");
    }
    sockaddr_storage peer{};
    socklen_t length = sizeof(peer);
    const int fd = ::accept4(fd_, reinterpret_cast<sockaddr*>(&peer), &length, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      setNonBlocking(fd, false);
      setNoDelay(fd);
      return Socket(fd, describeAddress(reinterpret_cast<sockaddr*>(&peer)));
    }
    // The connection may have been reset between poll and accept: try again.
    if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED || errno == EPROTO) {
      continue;
    }
    if (errno == EINVAL) throw CommError("listener on " + where + " was closed");
    // Out of fds and the like: report instead of spinning.
    throw CommError("accept on " + where + " failed: " + errnoText(errno));
  }
}

// --- Frames -------------------------------------------------------------------

void sendFrame(Socket& socket, const Bytes& payload, Deadline deadline, const char* what) {
  TESSERA_CHECK_ARG(payload.size() <= UINT32_MAX,
                    what << " of " << payload.size() << " bytes is over the 4 GiB frame limit");
  const auto size = static_cast<uint32_t>(payload.size());
  uint8_t header[4] = {static_cast<uint8_t>(size), static_cast<uint8_t>(size >> 8),
                       static_cast<uint8_t>(size >> 16), static_cast<uint8_t>(size >> 24)};
  // Small frames go out in one send: one segment, one wake-up on the peer.
  constexpr size_t kCoalesceBytes = 64 * 1024;
  if (payload.size() <= kCoalesceBytes) {
    Bytes whole(header, header + 4);
    whole.insert(whole.end(), payload.begin(), payload.end());
    socket.sendAll(whole.data(), whole.size(), deadline, what);
    return;
  }
  socket.sendAll(header, sizeof(header), deadline, what);
  socket.sendAll(payload.data(), payload.size(), deadline, what);
}

Bytes recvFrame(Socket& socket, size_t maxBytes, Deadline deadline, const char* what) {
  uint8_t header[4];
  socket.recvAll(header, sizeof(header), deadline, what);
  const size_t size = static_cast<size_t>(header[0]) | (static_cast<size_t>(header[1]) << 8) |
                      (static_cast<size_t>(header[2]) << 16) | (static_cast<size_t>(header[3]) << 24);
  if (size > maxBytes) {
    throw ProtocolError(std::string(what) + " from " + socket.peer() + " announces " + std::to_string(size) +
                        " bytes, over the limit of " + std::to_string(maxBytes) +
                        " bytes: the peer does not speak this protocol or the stream is corrupted");
  }
  Bytes payload(size);
  if (size > 0) socket.recvAll(payload.data(), size, deadline, what);
  return payload;
}

}  // namespace tessera::comm::net
