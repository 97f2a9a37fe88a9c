// Live recovery (checkpoint/live_recovery.h) over loopback: bit-exact round
// trips of every dtype, shards, empty tensors and meta; received tensors own
// their memory; the source keeps training while it serves its snapshot;
// refused and garbage connections do not end the source's wait; forged and
// malformed streams are ProtocolErrors naming the tensor, without huge
// allocations; timeouts on both sides; and a training run moved into a fresh
// one through the training-state layer, continuing bit for bit.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <future>
#include <iostream>
#include <limits>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include "checkpoint/recovery_wire.h"
#include "tessera/checkpoint/live_recovery.h"
#include "tessera/checkpoint/training_state.h"
#include "tessera/comm/net.h"
#include "tessera/core/error.h"
#include "tessera/core/logging.h"
#include "tessera/train/trainer.h"

namespace tessera {
namespace {

namespace net = comm::net;
namespace wire = checkpoint::recovery_wire;
using checkpoint::RecoveryOptions;
using checkpoint::RecoveryStats;
using checkpoint::StateSender;
using namespace std::chrono_literals;

RecoveryOptions optionsWith(std::string secret = "", std::chrono::milliseconds timeout = 20s) {
  RecoveryOptions o;
  o.secret = std::move(secret);
  o.timeout = timeout;
  return o;
}

// A tensor's bytes, for bit-exact comparisons (NaN payloads and -0.0 included).
std::string bytesOf(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  if (c.numel() == 0) return "";
  return std::string(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
}

at::Tensor textTensor(const std::string& text) {
  at::Tensor t = torch::empty({static_cast<int64_t>(text.size())}, torch::kByte);
  std::memcpy(t.data_ptr(), text.data(), text.size());
  return t;
}

// Every dtype tessera trains or stores with, whole and sharded, empty, scalar, meta.
StateDict sampleState() {
  torch::manual_seed(5);
  StateDict s;
  s.putReplicated("model/f32", torch::randn({3, 5}));
  s.putReplicated("model/f64", torch::randn({7}, torch::kDouble));
  s.putReplicated("model/bf16", torch::randn({4, 4}).to(torch::kBFloat16));
  s.putReplicated("model/f16", torch::randn({2, 3, 2}).to(torch::kHalf));
  const float inf = std::numeric_limits<float>::infinity();
  s.putReplicated("model/specials", torch::tensor({std::nanf(""), inf, -inf, -0.0f, 1e-42f}));
  s.putReplicated("optim/i32", torch::randint(-1000000, 1000000, {9}, torch::kInt));
  s.putReplicated("optim/i64", torch::tensor(std::vector<int64_t>{std::numeric_limits<int64_t>::min(), -1, 0,
                                                                  std::numeric_limits<int64_t>::max()}));
  s.putReplicated("optim/i16", torch::randint(-30000, 30000, {6}, torch::kShort));
  s.putReplicated("optim/i8", torch::randint(-128, 128, {11}, torch::kChar));
  s.putReplicated("optim/scalars", textTensor("step=6\nlr=0.1\n"));
  s.putReplicated("trainer/mask", torch::randint(0, 2, {5}).to(torch::kBool));
  s.putReplicated("scalar", torch::tensor(3.5));
  s.putReplicated("empty/flat", torch::empty({0}));
  s.putReplicated("empty/matrix", torch::empty({3, 0}, torch::kLong));
  // An FSDP-like shard of a 10x7 tensor: three disjoint pieces (one of them
  // empty), out of order, not replicated.
  StateTensor shard;
  shard.globalShape = {10, 7};
  shard.replicated = false;
  const auto flat = [](int64_t offset, int64_t numel) { return TensorSlice::flatRange({10, 7}, offset, numel); };
  shard.pieces = {{torch::randn({15}), flat(35, 15)},
                  {torch::randn({20}), flat(0, 20)},
                  {torch::randn({10}), flat(60, 10)},
                  {torch::empty({0}), flat(5, 0)}};
  s.tensors["optim/exp_avg/shard"] = shard;
  // A tensor-parallel slice along dim 1 (one N-D box, shaped as the box) and
  // FSDP's flat ranges of another dim-1 box (wire version 2's slices).
  const TensorSlice column = TensorSlice::box({0, 4}, {6, 4});
  s.putPiece("model/tp", {6, 8}, TensorSlice::box({0, 0}, {6, 4}), torch::randn({6, 4}));
  s.putPiece("model/tp", {6, 8}, column.narrowFlat(0, 10), torch::randn({10}));
  s.putPiece("model/tp", {6, 8}, column.narrowFlat(10, 14), torch::randn({14}));
  // A sharded tensor of which this rank holds nothing.
  StateTensor none;
  none.globalShape = {4};
  none.replicated = false;
  s.tensors["optim/exp_avg/elsewhere"] = none;
  s.putMeta("trainer/step", int64_t{42});
  s.putMeta("optim/lr", 0.1);
  s.putMeta("config/text", std::string("[model]\nname = \"gpt\"  # ünïcode\n"));
  s.putMeta("empty", std::string());
  return s;
}

void expectSameState(const StateDict& expected, const StateDict& actual) {
  EXPECT_EQ(actual.meta, expected.meta);
  std::vector<std::string> expectedNames, actualNames;
  for (const auto& item : expected.tensors) expectedNames.push_back(item.first);
  for (const auto& item : actual.tensors) actualNames.push_back(item.first);
  ASSERT_EQ(actualNames, expectedNames);
  for (const auto& [name, e] : expected.tensors) {
    const StateTensor& a = actual.tensors.at(name);
    EXPECT_EQ(a.globalShape, e.globalShape) << name;
    EXPECT_EQ(a.replicated, e.replicated) << name;
    ASSERT_EQ(a.pieces.size(), e.pieces.size()) << name;
    for (size_t p = 0; p < e.pieces.size(); ++p) {
      EXPECT_EQ(a.pieces[p].slice, e.pieces[p].slice) << name << " piece " << p;
      EXPECT_EQ(a.pieces[p].local.sizes(), e.pieces[p].local.sizes()) << name << " piece " << p;
      EXPECT_EQ(a.pieces[p].local.scalar_type(), e.pieces[p].local.scalar_type()) << name;
      EXPECT_EQ(a.pieces[p].local.numel(), e.pieces[p].local.numel()) << name;
      EXPECT_TRUE(bytesOf(a.pieces[p].local) == bytesOf(e.pieces[p].local)) << name << " piece " << p;
    }
  }
}

// A source that speaks the wire format by hand (net.h + the wire encoders),
// to forge streams the real StateSender never sends. `script` runs after
// the handshake on the accepted connection; its errors (the joiner hanging
// up on a bad stream) are expected and kept quiet.
class FakeSource {
 public:
  explicit FakeSource(std::function<void(net::Socket&, net::Deadline)> script) : listener_("127.0.0.1", 0) {
    thread_ = std::thread([this, script = std::move(script)] {
      try {
        const net::Deadline deadline = net::Deadline::after(10s);
        net::Socket socket = listener_.accept(deadline);
        net::authenticateServer(socket, "", deadline);
        script(socket, deadline);
        // Let the joiner read everything before the connection closes.
        uint8_t byte;
        socket.recvAll(&byte, 1, deadline, "fake source drain");
      } catch (const Error&) {
      }
    });
  }
  ~FakeSource() {
    listener_.close();
    thread_.join();
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(listener_.port()); }

 private:
  net::Listener listener_;
  std::thread thread_;
};

// Streams `state` as the wire format says, independently of StateSender;
// `tamper` may change a piece's bytes after its checksum was computed.
void streamState(net::Socket& socket, const StateDict& state, net::Deadline deadline,
                 const std::function<void(const std::string& name, std::string& bytes)>& tamper = {}) {
  net::sendFrame(socket, wire::encodeHeader(wire::headerOf(state)), deadline);
  std::vector<uint64_t> checksums;
  for (const auto& [name, tensor] : state.tensors) {
    net::sendFrame(socket, wire::encodeDescription(wire::describe(name, tensor)), deadline);
    for (const StatePiece& piece : tensor.pieces) {
      std::string bytes = bytesOf(piece.local);
      checksums.push_back(wire::checksumOf(bytes.data(), bytes.size()));
      if (tamper) tamper(name, bytes);
      socket.sendAll(bytes.data(), bytes.size(), deadline);
      const auto encoded = wire::encodeChecksum(checksums.back());
      socket.sendAll(encoded.data(), encoded.size(), deadline);
    }
  }
  net::sendFrame(socket, wire::encodeTrailer(wire::checksumOfChecksums(checksums)), deadline);
}

// The error receiveState() throws, as "<kind>: <message>".
std::string receiveError(const std::string& address, const RecoveryOptions& options) {
  try {
    receiveState(address, options);
  } catch (const ProtocolError& e) {
    return std::string("ProtocolError: ") + e.what();
  } catch (const AuthError& e) {
    return std::string("AuthError: ") + e.what();
  } catch (const TimeoutError& e) {
    return std::string("TimeoutError: ") + e.what();
  } catch (const CommError& e) {
    return std::string("CommError: ") + e.what();
  } catch (const Error& e) {
    return std::string("Error: ") + e.what();
  }
  return "(no error)";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// ---- Round trips ------------------------------------------------------------------

TEST(LiveRecovery, RoundTripOfEveryDtypeShardsEmptyTensorsAndMeta) {
  StateDict snapshot = sampleState();
  std::set<at::ScalarType> dtypes;
  for (const auto& item : snapshot.tensors) {
    for (const StatePiece& piece : item.second.pieces) dtypes.insert(piece.local.scalar_type());
  }
  for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf, at::kInt, at::kLong, at::kByte,
                               at::kChar, at::kShort, at::kBool}) {
    EXPECT_TRUE(dtypes.count(dtype)) << "the sample lacks " << dtype;
  }
  const StateDict expected = snapshot.clone();
  const StateDict senderView = snapshot;  // shares the tensors the sender reads

  StateSender sender(std::move(snapshot), optionsWith());
  RecoveryStats received;
  const StateDict state = receiveState(sender.address(), optionsWith(), &received);
  const RecoveryStats sent = sender.wait();
  EXPECT_TRUE(sender.done());
  expectSameState(expected, state);
  EXPECT_EQ(received.bytes, static_cast<uint64_t>(expected.localBytes()));
  EXPECT_EQ(sent.bytes, received.bytes);
  EXPECT_EQ(received.tensors, static_cast<int>(expected.tensors.size()));
  EXPECT_EQ(sent.tensors, received.tensors);
  EXPECT_GT(received.seconds, 0.0);
  // Served once: a second joiner is turned away.
  const std::string late = receiveError(sender.address(), optionsWith("", 200ms));
  EXPECT_TRUE(contains(late, "TimeoutError")) << late;
  // Whole tensors come back in their shape, ready for whole().
  EXPECT_EQ(state.whole("model/f16").sizes().vec(), (std::vector<int64_t>{2, 3, 2}));
  EXPECT_EQ(state.whole("scalar").dim(), 0);

  // Every received piece owns its memory: not the sender's, not shared with
  // another piece, not a view into a larger receive buffer.
  std::set<const void*> storages;
  for (const auto& [name, tensor] : state.tensors) {
    for (size_t p = 0; p < tensor.pieces.size(); ++p) {
      const at::Tensor& local = tensor.pieces[p].local;
      EXPECT_TRUE(local.device().is_cpu() && local.is_contiguous()) << name;
      if (local.numel() == 0) continue;
      EXPECT_NE(local.data_ptr(), senderView.tensors.at(name).pieces[p].local.data_ptr()) << name;
      EXPECT_EQ(local.storage_offset(), 0) << name;
      EXPECT_EQ(local.storage().nbytes(), static_cast<size_t>(local.numel() * local.element_size())) << name;
      EXPECT_TRUE(storages.insert(local.storage().data()).second) << name << " shares its storage";
    }
  }
  // Changing the sender's snapshot afterwards changes nothing received.
  for (const auto& item : senderView.tensors) {
    for (const StatePiece& piece : item.second.pieces) piece.local.zero_();
  }
  expectSameState(expected, state);
}

// About 64 MiB: a 40 MiB tensor that is not a multiple of the chunk size, a
// sharded one and bytes. Prints the loopback throughput (no assertion on it).
TEST(LiveRecovery, LargeStateStreamsInChunks) {
  torch::manual_seed(3);
  StateDict snapshot;
  snapshot.putReplicated("model/big", torch::rand({(40 << 20) / 4 + 1}));
  StateTensor shard;
  shard.globalShape = {6 << 20};
  shard.replicated = false;
  shard.pieces = {{torch::rand({(3 << 20) + 7}), TensorSlice::flatRange({6 << 20}, 0, (3 << 20) + 7)},
                  {torch::rand({1 << 20}), TensorSlice::flatRange({6 << 20}, 5 << 20, 1 << 20)}};
  snapshot.tensors["optim/exp_avg/big"] = shard;
  snapshot.putReplicated("trainer/bytes", torch::randint(0, 256, {(8 << 20) - 3}, torch::kByte));
  const StateDict expected = snapshot.clone();

  StateSender sender(std::move(snapshot), optionsWith());
  RecoveryStats stats;
  const StateDict state = receiveState(sender.address(), optionsWith(), &stats);
  const RecoveryStats sent = sender.wait();
  expectSameState(expected, state);
  EXPECT_EQ(stats.bytes, static_cast<uint64_t>(expected.localBytes()));
  std::cout << "[ live recovery ] " << stats.bytes << " bytes in " << stats.seconds << " s: "
            << stats.bytesPerSecond() / 1e9 << " GB/s received, " << sent.bytesPerSecond() / 1e9
            << " GB/s sent (loopback)" << std::endl;
  RecordProperty("bytes_per_second", std::to_string(static_cast<int64_t>(stats.bytesPerSecond())));
}

// The source keeps training (changing its live tensors) while its sender
// thread serves the snapshot cloned from them: the joiner gets the snapshot.
TEST(LiveRecovery, SenderServesTheSnapshotWhileTheLiveTensorsChange) {
  torch::manual_seed(4);
  StateDict live;
  for (int i = 0; i < 8; ++i) live.putReplicated("model/w" + std::to_string(i), torch::randn({1 << 20}));
  StateDict snapshot = live.clone();
  const StateDict expected = snapshot.clone();

  StateSender sender(std::move(snapshot), optionsWith());
  auto joiner = std::async(std::launch::async, [&] { return receiveState(sender.address(), optionsWith()); });
  int rounds = 0;
  do {
    at::NoGradGuard noGrad;
    for (auto& item : live.tensors) item.second.pieces[0].local.add_(1.0f);
    ++rounds;
  } while (joiner.wait_for(0s) != std::future_status::ready);
  const StateDict state = joiner.get();
  sender.wait();
  expectSameState(expected, state);
  EXPECT_GE(rounds, 1);
  EXPECT_FALSE(at::equal(live.whole("model/w0"), expected.whole("model/w0")));
}

// ---- Who may connect -------------------------------------------------------------------

TEST(LiveRecovery, WrongSecretIsRefusedAndTheSenderWaitsForTheRightJoiner) {
  const StateDict expected = sampleState();
  StateSender sender(expected.clone(), optionsWith("the right secret"));
  const std::string wrong = receiveError(sender.address(), optionsWith("a wrong secret", 5s));
  EXPECT_TRUE(contains(wrong, "AuthError")) << wrong;
  const std::string none = receiveError(sender.address(), optionsWith("", 5s));
  EXPECT_TRUE(contains(none, "AuthError")) << none;
  EXPECT_FALSE(sender.done());

  const StateDict state = receiveState(sender.address(), optionsWith("the right secret"));
  sender.wait();
  expectSameState(expected, state);
}

TEST(LiveRecovery, GarbageConnectionsAreDroppedAndLoggedAndTheJoinerIsServed) {
  setLogLevel(LogLevel::kInfo);
  const StateDict expected = sampleState();
  testing::internal::CaptureStderr();
  StateSender sender(expected.clone(), optionsWith());
  const auto [host, port] = net::parseHostPort(sender.address(), "test");
  {
    // Random bytes: the sender drops the connection (we see it close).
    net::Socket garbage = net::connectTo(host, port, net::Deadline::after(5s));
    std::mt19937 rng(1);
    std::vector<uint8_t> noise(4096);
    for (auto& b : noise) b = static_cast<uint8_t>(rng());
    garbage.sendAll(noise.data(), noise.size(), net::Deadline::after(5s));
    std::vector<uint8_t> sink(1 << 20);
    EXPECT_THROW(garbage.recvAll(sink.data(), sink.size(), net::Deadline::after(5s)), CommError);
  }
  {
    // Connected and gone at once.
    net::Socket silent = net::connectTo(host, port, net::Deadline::after(5s));
  }
  const StateDict state = receiveState(sender.address(), optionsWith());
  sender.wait();
  const std::string log = testing::internal::GetCapturedStderr();
  expectSameState(expected, state);
  size_t drops = 0;
  for (size_t at = log.find("dropped connection from 127.0.0.1:"); at != std::string::npos;
       at = log.find("dropped connection from 127.0.0.1:", at + 1)) {
    ++drops;
  }
  EXPECT_EQ(drops, 2u) << log;
  EXPECT_TRUE(contains(log, sender.address())) << log;
}

// ---- Damaged and malformed streams -------------------------------------------------------

TEST(LiveRecovery, FlippedPayloadByteIsAProtocolErrorNamingTheTensor) {
  StateDict state;
  state.putReplicated("model/intact", torch::randn({64}));
  state.putReplicated("optim/exp_avg/victim", torch::randn({1000}));
  state.putReplicated("trainer/rng", textTensor("after the victim"));
  FakeSource source([&](net::Socket& socket, net::Deadline deadline) {
    streamState(socket, state, deadline, [](const std::string& name, std::string& bytes) {
      if (name == "optim/exp_avg/victim") bytes[1234] ^= 0x10;
    });
  });
  const std::string error = receiveError(source.address(), optionsWith("", 10s));
  EXPECT_TRUE(contains(error, "ProtocolError")) << error;
  EXPECT_TRUE(contains(error, "'optim/exp_avg/victim'")) << error;
  EXPECT_TRUE(contains(error, "checksum")) << error;

  // The untampered stream is accepted: the fake source speaks the format.
  FakeSource honest([&](net::Socket& socket, net::Deadline deadline) { streamState(socket, state, deadline); });
  expectSameState(state, receiveState(honest.address(), optionsWith("", 10s)));
}

void appendU32(net::Bytes& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void appendU64(net::Bytes& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
// A header frame written out by hand from the documented format.
net::Bytes handHeader(uint32_t tensors, uint64_t payloadBytes, const char* magic = "TSRS", uint32_t version = wire::kVersion) {
  net::Bytes out(magic, magic + 4);
  appendU32(out, version);
  appendU32(out, tensors);
  appendU64(out, payloadBytes);
  appendU32(out, 0);  // meta count
  return out;
}
// A float32 (dtype code 1) description of shape [numel] with the given pieces
// (offset, count): wire version 2's box [offset, offset + count), whole.
net::Bytes handDescription(const std::string& name, int64_t numel, const std::vector<std::pair<int64_t, int64_t>>& pieces,
                           uint32_t pieceCount) {
  net::Bytes out;
  appendU32(out, static_cast<uint32_t>(name.size()));
  out.insert(out.end(), name.begin(), name.end());
  out.push_back(1);  // float32
  out.push_back(1);  // replicated
  appendU32(out, 1);
  appendU64(out, static_cast<uint64_t>(numel));
  appendU32(out, pieceCount);
  for (const auto& [offset, count] : pieces) {
    appendU64(out, static_cast<uint64_t>(offset));  // box offset
    appendU64(out, static_cast<uint64_t>(count));   // box size
    appendU64(out, 0);                              // flat offset
    appendU64(out, static_cast<uint64_t>(count));   // numel
  }
  return out;
}

TEST(LiveRecovery, MalformedStreamsAreProtocolErrorsWithoutHugeAllocations) {
  struct Case {
    const char* what;
    std::vector<net::Bytes> frames;
    std::vector<const char*> expected;  // parts of the message
  };
  const std::vector<Case> cases = {
      {"wrong magic", {handHeader(1, 4, "HTTP")}, {"ProtocolError", "magic"}},
      {"other version", {handHeader(1, 4, "TSRS", 7)}, {"ProtocolError", "version 7"}},
      {"a version-1 source (flat ranges)", {handHeader(1, 4, "TSRS", 1)},
       {"ProtocolError", "wire version 1", "this node speaks version 2", "same tessera release"}},
      {"2^62 payload bytes", {handHeader(1, uint64_t{1} << 62)}, {"ProtocolError", "memory"}},
      {"piece outside the shape", {handHeader(1, 400), handDescription("model/w", 100, {{50, 100}}, 1)},
       {"ProtocolError", "'model/w'", "exceeds the tensor [100]"}},
      {"piece larger than the payload", {handHeader(1, 40), handDescription("model/w", 100, {{0, 100}}, 1)},
       {"ProtocolError", "'model/w'", "payload bytes"}},
      {"4 billion pieces announced", {handHeader(1, 400), handDescription("model/w", 100, {{0, 100}}, 0xFFFFFFFFu)},
       {"ProtocolError", "'model/w'", "piece count"}},
      {"overlapping pieces", {handHeader(1, 400), handDescription("model/w", 100, {{0, 60}, {40, 40}}, 2)},
       {"ProtocolError", "'model/w'", "overlap"}},
      {"missing payload bytes", {handHeader(1, 400)}, {"ProtocolError", "announced 400 payload bytes"}},
      {"bad trailer", {handHeader(0, 0), net::Bytes{'D', 'O', 'N', 'E', 1, 2, 3}}, {"ProtocolError", "trailer"}},
      {"stream cut short", {handHeader(2, 0), handDescription("model/a", 0, {}, 0)}, {"CommError"}},
  };
  for (const Case& c : cases) {
    FakeSource source([&](net::Socket& socket, net::Deadline deadline) {
      for (const net::Bytes& frame : c.frames) net::sendFrame(socket, frame, deadline);
      if (std::string(c.what) == "missing payload bytes") {
        // A description of no pieces, then the trailer: 400 bytes never came.
        net::sendFrame(socket, handDescription("model/w", 100, {}, 0), deadline);
        net::sendFrame(socket, wire::encodeTrailer(wire::checksumOfChecksums({})), deadline);
      }
      if (std::string(c.what) == "stream cut short") socket.shutdown();
    });
    const std::string error = receiveError(source.address(), optionsWith("", 10s));
    for (const char* part : c.expected) EXPECT_TRUE(contains(error, part)) << c.what << ": " << error;
  }
}

// Random and mutated frames: the decoders answer ProtocolError or a
// description that is safe to allocate from, nothing else.
TEST(LiveRecoveryWire, RandomAndMutatedFramesNeverPassUnchecked) {
  const StateDict sample = sampleState();
  std::vector<net::Bytes> valid = {wire::encodeHeader(wire::headerOf(sample)), wire::encodeTrailer(7)};
  for (const auto& [name, tensor] : sample.tensors) valid.push_back(wire::encodeDescription(wire::describe(name, tensor)));
  std::mt19937 rng(11);
  const uint64_t budget = 1 << 20;
  int decoded = 0;
  for (int i = 0; i < 20000; ++i) {
    net::Bytes frame;
    if (i % 2 == 0) {
      frame.resize(rng() % 128);
      for (auto& b : frame) b = static_cast<uint8_t>(rng());
    } else {
      frame = valid[rng() % valid.size()];
      for (int flips = 1 + rng() % 3; flips > 0 && !frame.empty(); --flips) frame[rng() % frame.size()] ^= 1u << (rng() % 8);
      if (rng() % 4 == 0) frame.resize(rng() % (frame.size() + 1));
    }
    try {
      wire::decodeHeader(frame, "fuzz");
      ++decoded;
    } catch (const ProtocolError&) {
    }
    try {
      const wire::TensorDescription d = wire::decodeDescription(frame, "fuzz", budget);
      int64_t numel = 1;
      for (int64_t dim : d.shape) {
        ASSERT_GE(dim, 0);
        ASSERT_FALSE(__builtin_mul_overflow(numel, dim, &numel));
      }
      uint64_t bytes = 0;
      for (const TensorSlice& piece : d.pieces) {
        ASSERT_NO_THROW(piece.check(d.shape, "fuzzed piece"));
        bytes += static_cast<uint64_t>(piece.numel) * c10::elementSize(d.dtype);
      }
      ASSERT_LE(bytes, budget);
      ++decoded;
    } catch (const ProtocolError&) {
    }
    try {
      wire::decodeTrailer(frame, "fuzz");
    } catch (const ProtocolError&) {
    }
  }
  EXPECT_GT(decoded, 0);  // the mutations leave some frames valid
}

TEST(LiveRecovery, SnapshotThatCannotBeSentIsRejectedUpFront) {
  StateDict overlapping;
  StateTensor t;
  t.globalShape = {10};
  t.pieces = {{torch::zeros({6}), TensorSlice::flatRange({10}, 0, 6)}, {torch::zeros({6}), TensorSlice::flatRange({10}, 4, 6)}};
  overlapping.tensors["model/w"] = t;
  EXPECT_THROW((StateSender{overlapping, optionsWith()}), InvalidArgument);
  StateDict complex;
  complex.putReplicated("model/c", torch::zeros({2}, torch::kComplexFloat));
  EXPECT_THROW((StateSender{complex, optionsWith()}), InvalidArgument);
  StateDict strided;
  strided.tensors["model/s"] = StateTensor{{3}, {{torch::zeros({6}).slice(0, 0, 6, 2), TensorSlice::whole({3})}}, true};
  StateDict columns;  // two dim-1 boxes that share column 3
  columns.putPiece("model/w", {4, 6}, TensorSlice::box({0, 0}, {4, 4}), torch::zeros({4, 4}));
  columns.putPiece("model/w", {4, 6}, TensorSlice::box({0, 3}, {4, 3}), torch::zeros({4, 3}));
  EXPECT_THROW((StateSender{columns, optionsWith()}), InvalidArgument);
  EXPECT_THROW((StateSender{strided, optionsWith()}), InvalidArgument);
}

// ---- Timeouts ------------------------------------------------------------------------

TEST(LiveRecovery, SenderTimesOutWhenNobodyConnects) {
  StateSender sender(sampleState(), optionsWith("", 200ms));
  try {
    sender.wait();
    ADD_FAILURE() << "no TimeoutError";
  } catch (const TimeoutError& e) {
    EXPECT_TRUE(contains(e.what(), sender.address())) << e.what();
  }
  EXPECT_TRUE(sender.done());
}

TEST(LiveRecovery, JoinerGetsAClearErrorForADeadSource) {
  uint16_t port = 0;
  {
    net::Listener closed("127.0.0.1", 0);
    port = closed.port();
  }
  const std::string address = "127.0.0.1:" + std::to_string(port);
  const std::string error = receiveError(address, optionsWith("", 300ms));
  EXPECT_TRUE(contains(error, "TimeoutError") || contains(error, "CommError")) << error;
  EXPECT_TRUE(contains(error, address)) << error;
  EXPECT_THROW(receiveState("no-port-here", optionsWith()), InvalidArgument);
}

// The destructor neither waits for a joiner nor for a stalled transfer to
// reach its deadline (60 s here): it ends both at once.
TEST(LiveRecovery, DestroyingTheSenderEndsItsWaitAndItsTransfer) {
  const auto start = std::chrono::steady_clock::now();
  { StateSender waiting(sampleState(), optionsWith("", 60s)); }

  StateDict big;
  big.putReplicated("model/big", torch::zeros({8 << 20}));  // 32 MiB: more than the socket buffers hold
  std::optional<StateSender> sender;
  sender.emplace(big, optionsWith("", 60s));
  const auto [host, port] = net::parseHostPort(sender->address(), "test");
  net::Socket joiner = net::connectTo(host, port, net::Deadline::after(5s));
  net::authenticateClient(joiner, "", net::Deadline::after(5s));
  net::recvFrame(joiner, wire::kMaxHeaderFrame, net::Deadline::after(5s));  // then stop reading: the sender stalls
  sender.reset();
  std::vector<uint8_t> sink(64 << 20);
  EXPECT_THROW(joiner.recvAll(sink.data(), sink.size(), net::Deadline::after(10s)), CommError);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 30s);
}

// ---- Through the training-state layer ------------------------------------------------------

data::ImageDataset syntheticImages() {
  torch::manual_seed(7);
  data::ImageDataset d;
  d.images = torch::randn({64, 8});
  d.labels = torch::randint(0, 3, {64}, torch::kLong);
  return d;
}

// A small run: MLP (with dropout, so the RNG state matters) + AdamW + Trainer.
struct TrainingRun {
  models::MlpClassifier mlp{nullptr};
  std::unique_ptr<TrainableModel> model;
  std::unique_ptr<parallel::DataParallel> dp;
  std::unique_ptr<optim::Optimizer> optimizer;
  std::unique_ptr<BatchSource> train, val;
  std::unique_ptr<Trainer> trainer;
  std::vector<double> losses;

  TrainingRun(uint64_t seed, int64_t steps) {
    models::MlpClassifierConfig mc;
    mc.input_dim = 8;
    mc.hidden_sizes = {16};
    mc.num_classes = 3;
    mc.dropout = 0.1;
    mc.seed = seed;
    mlp = models::MlpClassifier(mc);
    model = makeTrainable(mlp);
    dp = parallel::makeNoDataParallel(*mlp);
    data::DistributedSampler::Options so;
    so.batchSize = 4;
    so.seed = 3;
    train = makeBatchSource(syntheticImages(), so);
    so.shuffle = false;
    val = makeBatchSource(syntheticImages(), so);
    optim::OptimizerConfig oc;
    oc.name = "adamw";
    optimizer = optim::makeOptimizer(oc, dp->optimizerParameters(), 0.01);
    TrainerParts p;
    p.model = model.get();
    p.dp = dp.get();
    p.optimizer = optimizer.get();
    optim::LrScheduleConfig lc;
    lc.lr = 0.01;
    lc.min_lr = 0.001;
    lc.warmup_steps = 2;
    p.schedule = optim::makeLrSchedule(lc, 8);
    p.train = train.get();
    p.val = val.get();
    TrainConfig c;
    c.steps = steps;
    c.clip = 1.0;
    c.eval_every = 0;
    c.eval_batches = 1;
    c.log_every = 1;
    c.seed = 11;
    c.progress = false;
    trainer = std::make_unique<Trainer>(p, c);
    trainer->callbacks().afterStep.push_back([this](const StepReport& r) { losses.push_back(r.loss); });
  }

  // rank/worldSize: the row of trainer/rng this run saves and restores.
  checkpoint::TrainingParts parts(int rank = 0, int worldSize = 1) {
    checkpoint::TrainingParts p;
    p.rank = rank;
    p.worldSize = worldSize;
    p.trainer = trainer.get();
    p.model = &model->module();
    p.dp = dp.get();
    p.optimizer = optimizer.get();
    return p;
  }
  // Other parameters than the same seed gives (the seed also keys dropout).
  void perturb() {
    at::NoGradGuard noGrad;
    for (auto& p : dp->optimizerParameters()) p.add_(1.0);
  }
  std::map<std::string, std::string> parameterBytes() {
    std::map<std::string, std::string> out;
    for (const auto& item : model->module().named_parameters()) out[item.key()] = bytesOf(item.value().detach());
    return out;
  }
};

// A source trained 3 steps sends its state to a fresh run (other initial
// parameters); after the restore the joiner holds the source's parameters,
// optimizer state, step and generator state bit for bit, and training on
// gives exactly the losses of an uninterrupted 6-step run. The source is rank
// 1 of 2 and the joiner rank 0: the joiner takes its source's row of
// trainer/rng (the one the snapshot holds), not row 0.
TEST(LiveRecovery, TrainingStateMovesIntoAFreshRunBitForBit) {
  // Built (and run) first: building a run reseeds torch's global generator,
  // which is part of the state a restore sets.
  TrainingRun reference(1, 6);
  reference.trainer->run();
  TrainingRun source(1, 3);
  source.trainer->run();
  const auto sourceParameters = source.parameterBytes();
  const StateDict sourceState = checkpoint::collectTrainingState(source.parts(1, 2)).clone();
  ASSERT_EQ(sourceState.tensors.at("trainer/rng").pieces.at(0).slice.offsets, (std::vector<int64_t>{1, 0}));

  StateSender sender(checkpoint::collectTrainingState(source.parts(1, 2), {{"config/text", "x = 1"}}).clone(),
                     optionsWith("job secret"));
  const StateDict received = receiveState(sender.address(), optionsWith("job secret"));
  sender.wait();
  EXPECT_EQ(received.metaString("config/text"), "x = 1");

  TrainingRun joiner(1, 6);
  joiner.perturb();
  ASSERT_FALSE(joiner.parameterBytes() == sourceParameters);
  torch::manual_seed(12345);  // the restored generator state must override this
  const auto requests =
      checkpoint::trainingStateRequests(joiner.parts(0, 2), checkpoint::StateSummary::of(received));
  checkpoint::restoreTrainingState(joiner.parts(0, 2), checkpoint::extractRanges(received, requests));

  EXPECT_TRUE(joiner.parameterBytes() == sourceParameters);
  const StateDict joinerState = checkpoint::collectTrainingState(joiner.parts(0, 2));
  EXPECT_EQ(joinerState.metaInt("trainer/step"), 3);
  for (const auto& [name, tensor] : sourceState.tensors) {
    if (name.rfind("optim/", 0) != 0 && name != "trainer/rng") continue;
    ASSERT_TRUE(joinerState.tensors.count(name)) << name;
    EXPECT_TRUE(bytesOf(joinerState.tensors.at(name).pieces.at(0).local) == bytesOf(tensor.pieces.at(0).local))
        << name;
  }

  joiner.trainer->run();
  ASSERT_EQ(joiner.losses.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(joiner.losses[i], reference.losses[3 + i]) << "step " << 4 + i;
  EXPECT_TRUE(joiner.parameterBytes() == reference.parameterBytes());
}

}  // namespace
}  // namespace tessera
