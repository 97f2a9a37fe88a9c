// Live recovery (live_recovery.h): the StateSender's accept-authenticate-send
// thread and receiveState(). The format itself is in recovery_wire.{h,cc};
// this file moves bytes: piece data streams straight from the snapshot's
// tensors into fresh tensors on the joiner, in chunks, each checksummed as it
// passes, so neither side ever holds a second copy of the state.
#include "tessera/checkpoint/live_recovery.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "checkpoint/recovery_wire.h"
#include "tessera/comm/net.h"
#include "tessera/core/error.h"
#include "tessera/core/logging.h"

namespace tessera::checkpoint {
namespace {

namespace net = comm::net;
namespace wire = recovery_wire;
using Clock = std::chrono::steady_clock;

// How long one connection may take to authenticate: a peer that connects and
// says nothing must not hold the only accept loop until the whole timeout.
constexpr std::chrono::seconds kHandshakeTimeout{10};

double secondsSince(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

net::Deadline earlier(const net::Deadline& a, const net::Deadline& b) { return a.at() < b.at() ? a : b; }

uint64_t physicalMemoryBytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long pageSize = ::sysconf(_SC_PAGESIZE);
  if (pages <= 0 || pageSize <= 0) return UINT64_MAX;
  return static_cast<uint64_t>(pages) * static_cast<uint64_t>(pageSize);
}

// --- Sending -------------------------------------------------------------------

// Streams the snapshot in the documented format.
void sendSnapshot(net::Socket& socket, const StateDict& snapshot, const wire::Header& header, net::Deadline deadline) {
  net::sendFrame(socket, wire::encodeHeader(header), deadline, "live recovery header");
  std::vector<uint64_t> checksums;
  for (const auto& [name, tensor] : snapshot.tensors) {
    const std::string what = "live recovery tensor '" + name + "'";
    net::sendFrame(socket, wire::encodeDescription(wire::describe(name, tensor)), deadline, what.c_str());
    for (const StatePiece& piece : tensor.pieces) {
      const auto* bytes = static_cast<const uint8_t*>(piece.local.data_ptr());
      const size_t size = static_cast<size_t>(piece.local.numel()) * piece.local.element_size();
      wire::PieceChecksum checksum;
      for (size_t sent = 0; sent < size;) {
        const size_t chunk = std::min(wire::kChunkBytes, size - sent);
        socket.sendAll(bytes + sent, chunk, deadline, what.c_str());
        checksum.update(bytes + sent, chunk);  // still in cache
        sent += chunk;
      }
      checksums.push_back(checksum.digest());
      const auto encoded = wire::encodeChecksum(checksums.back());
      socket.sendAll(encoded.data(), encoded.size(), deadline, what.c_str());
    }
  }
  net::sendFrame(socket, wire::encodeTrailer(wire::checksumOfChecksums(checksums)), deadline,
                 "live recovery trailer");
}

// --- Receiving -----------------------------------------------------------------

[[noreturn]] void failStream(const std::string& peer, const std::string& problem) {
  throw ProtocolError("live recovery from " + peer + ": " + problem);
}

// One piece's bytes, received straight into a fresh tensor of its own.
at::Tensor receivePiece(net::Socket& socket, const wire::TensorDescription& d, size_t index, net::Deadline deadline,
                        std::vector<uint64_t>& checksums) {
  const TensorSlice& slice = d.pieces[index];
  // A whole box gets its shape (a whole tensor: the tensor's), a flat range stays flat.
  at::Tensor local = at::empty(slice.localShape(), at::TensorOptions().dtype(d.dtype));
  const std::string what = "live recovery tensor '" + d.name + "'";
  auto* bytes = static_cast<uint8_t*>(local.data_ptr());
  const size_t size = static_cast<size_t>(local.numel()) * local.element_size();
  wire::PieceChecksum checksum;
  for (size_t received = 0; received < size;) {
    const size_t chunk = std::min(wire::kChunkBytes, size - received);
    socket.recvAll(bytes + received, chunk, deadline, what.c_str());
    checksum.update(bytes + received, chunk);
    received += chunk;
  }
  std::array<uint8_t, 8> encoded;
  socket.recvAll(encoded.data(), encoded.size(), deadline, what.c_str());
  const uint64_t expected = wire::decodeChecksum(encoded);
  const uint64_t actual = checksum.digest();
  if (actual != expected) {
    std::ostringstream out;
    out << "tensor '" << d.name << "' piece " << index << " (slice " << slice.text() << "): checksum mismatch (xxh64 " << std::hex << actual << " received, "
        << expected << " sent): the bytes were corrupted in transit; retry the recovery";
    failStream(socket.peer(), out.str());
  }
  checksums.push_back(actual);
  return local;
}

StateDict receiveSnapshot(net::Socket& socket, net::Deadline deadline, RecoveryStats& stats) {
  const std::string& peer = socket.peer();
  const wire::Header header =
      wire::decodeHeader(net::recvFrame(socket, wire::kMaxHeaderFrame, deadline, "live recovery header"), peer);
  const uint64_t memory = physicalMemoryBytes();
  if (header.payloadBytes > memory) {
    failStream(peer, "header announces " + std::to_string(header.payloadBytes) + " payload bytes, more than this " +
                         "machine's " + std::to_string(memory) + " bytes of memory");
  }
  StateDict state;
  state.meta = header.meta;
  uint64_t bytesLeft = header.payloadBytes;
  std::vector<uint64_t> checksums;
  for (uint32_t i = 0; i < header.tensorCount; ++i) {
    const wire::TensorDescription d = wire::decodeDescription(
        net::recvFrame(socket, wire::kMaxDescriptionFrame, deadline, "live recovery tensor description"), peer,
        bytesLeft);
    if (state.tensors.count(d.name) != 0) failStream(peer, "tensor '" + d.name + "' sent twice");
    StateTensor tensor;
    tensor.globalShape = d.shape;
    tensor.replicated = d.replicated;
    for (size_t p = 0; p < d.pieces.size(); ++p) {
      tensor.pieces.push_back(StatePiece{receivePiece(socket, d, p, deadline, checksums), d.pieces[p]});
    }
    bytesLeft -= d.payloadBytes();  // decodeDescription checked it fits
    state.tensors.emplace(d.name, std::move(tensor));
  }
  if (bytesLeft != 0) {
    failStream(peer, "the header announced " + std::to_string(header.payloadBytes) + " payload bytes, the " +
                         std::to_string(header.tensorCount) + " tensors carried " +
                         std::to_string(header.payloadBytes - bytesLeft));
  }
  const uint64_t trailer = wire::decodeTrailer(
      net::recvFrame(socket, wire::kMaxTrailerFrame, deadline, "live recovery trailer"), peer);
  if (trailer != wire::checksumOfChecksums(checksums)) {
    failStream(peer, "the trailer's checksum does not match the pieces' checksums: the stream was reordered or "
                     "corrupted; retry the recovery");
  }
  stats.bytes = header.payloadBytes;
  stats.tensors = static_cast<int>(header.tensorCount);
  return state;
}

}  // namespace

// --- StateSender ------------------------------------------------------------------

struct StateSender::Impl {
  Impl(StateDict snapshotIn, RecoveryOptions optionsIn)
      : snapshot(std::move(snapshotIn)),
        header(recovery_wire::headerOf(snapshot)),
        options(std::move(optionsIn)),
        listener(options.bindHost, 0),
        address(options.bindHost + ":" + std::to_string(listener.port())) {}

  void run();
  // Accepts connections until one authenticates, which it leaves in
  // `connection`; returns when that one was accepted.
  Clock::time_point acceptJoiner(net::Deadline deadline);
  // Makes `socket` the connection the destructor can interrupt; false once stopping.
  bool adopt(net::Socket socket);
  void closeConnection();
  void closeListener();

  const StateDict snapshot;  // read by the thread only
  const recovery_wire::Header header;
  const RecoveryOptions options;
  net::Listener listener;
  const std::string address;
  std::thread thread;

  mutable std::mutex mutex;  // guards everything below
  std::condition_variable finished;
  bool stopping = false;
  bool listenerClosed = false;
  net::Socket connection;  // the one being authenticated or served
  bool done = false;
  RecoveryStats stats;
  std::exception_ptr error;
};

bool StateSender::Impl::adopt(net::Socket socket) {
  std::lock_guard<std::mutex> lock(mutex);
  if (stopping) return false;
  connection = std::move(socket);
  return true;
}

void StateSender::Impl::closeConnection() {
  net::Socket closing;
  {
    std::lock_guard<std::mutex> lock(mutex);
    closing = std::move(connection);
  }
}

void StateSender::Impl::closeListener() {
  std::lock_guard<std::mutex> lock(mutex);
  if (!listenerClosed) listener.close();
  listenerClosed = true;
}

Clock::time_point StateSender::Impl::acceptJoiner(net::Deadline deadline) {
  int dropped = 0;
  for (;;) {
    net::Socket socket;
    try {
      socket = listener.accept(deadline);
    } catch (const TimeoutError&) {
      std::ostringstream out;
      out << "live recovery source " << address << ": no joiner authenticated within " << options.timeout.count()
          << " ms";
      if (dropped > 0) out << " (" << dropped << " connection(s) refused, see the warnings logged)";
      out << "; check that the joiner got this address and the job's join secret";
      throw TimeoutError(out.str());
    }
    const auto accepted = Clock::now();
    const std::string peer = socket.peer();
    if (!adopt(std::move(socket))) throw CommError("live recovery source " + address + ": stopped");
    try {
      net::authenticateServer(connection, options.secret,
                              earlier(deadline, net::Deadline::after(kHandshakeTimeout)));
      closeListener();  // later connections are refused at once instead of waiting in the backlog
      return accepted;
    } catch (const Error& e) {
      closeConnection();
      {
        std::lock_guard<std::mutex> lock(mutex);
        if (stopping) throw CommError("live recovery source " + address + ": stopped");
      }
      ++dropped;
      TESSERA_LOG(kWarn) << "live recovery source " << address << ": dropped connection from " << peer << ": "
                         << e.what() << " (still waiting for the joiner)";
    }
  }
}

void StateSender::Impl::run() {
  RecoveryStats result;
  std::exception_ptr failure;
  try {
    // The timeout bounds the wait for the joiner, then, afresh, the transfer.
    const auto start = acceptJoiner(net::Deadline::after(options.timeout));
    sendSnapshot(connection, snapshot, header, net::Deadline::after(options.timeout));
    result.bytes = header.payloadBytes;
    result.tensors = static_cast<int>(header.tensorCount);
    result.seconds = secondsSince(start);
    TESSERA_LOG(kInfo) << "live recovery source " << address << ": sent " << result.tensors << " tensors, "
                       << result.bytes << " bytes in " << result.seconds << " s ("
                       << result.bytesPerSecond() / 1e6 << " MB/s)";
  } catch (...) {
    failure = std::current_exception();
  }
  closeConnection();
  closeListener();
  {
    std::lock_guard<std::mutex> lock(mutex);
    stats = result;
    error = failure;
    done = true;
  }
  finished.notify_all();
}

StateSender::StateSender(StateDict snapshot, RecoveryOptions options) {
  TESSERA_CHECK_ARG(options.timeout.count() > 0,
                    "live recovery: timeout must be positive, got " << options.timeout.count() << " ms");
  impl_ = std::make_unique<Impl>(std::move(snapshot), std::move(options));
  impl_->thread = std::thread([impl = impl_.get()] { impl->run(); });
}

StateSender::~StateSender() {
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->stopping = true;
    if (impl_->connection.valid()) impl_->connection.shutdown();
  }
  impl_->closeListener();
  if (impl_->thread.joinable()) impl_->thread.join();
}

std::string StateSender::address() const { return impl_->address; }

bool StateSender::done() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->done;
}

RecoveryStats StateSender::wait() {
  std::unique_lock<std::mutex> lock(impl_->mutex);
  impl_->finished.wait(lock, [this] { return impl_->done; });
  if (impl_->error) std::rethrow_exception(impl_->error);
  return impl_->stats;
}

// --- receiveState -------------------------------------------------------------------

StateDict receiveState(const std::string& address, const RecoveryOptions& options, RecoveryStats* stats) {
  TESSERA_CHECK_ARG(options.timeout.count() > 0,
                    "live recovery: timeout must be positive, got " << options.timeout.count() << " ms");
  const auto [host, port] = net::parseHostPort(address, "live recovery source address");
  const net::Deadline deadline = net::Deadline::after(options.timeout);
  net::Socket socket;
  try {
    socket = net::connectTo(host, port, deadline);
  } catch (const TimeoutError& e) {
    throw TimeoutError("live recovery: cannot reach the source at " + address + " within " +
                       std::to_string(options.timeout.count()) + " ms (" + e.what() +
                       "); check that the source is alive and advertises an address this node can reach");
  }
  const auto start = Clock::now();
  net::authenticateClient(socket, options.secret, deadline);
  RecoveryStats result;
  StateDict state = receiveSnapshot(socket, deadline, result);
  result.seconds = secondsSince(start);
  if (stats != nullptr) *stats = result;
  return state;
}

}  // namespace tessera::checkpoint
