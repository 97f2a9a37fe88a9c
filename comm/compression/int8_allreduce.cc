// The int8 ring all-reduce (REFERENCE §4, PRIME's collectives.cpp), over any
// communicator's sendAsync/recvAsync.
//
// Layout. The flat tensor is cut into 2 * n chunks (n = ranks). Chunks
// [0, n) form lane 0 and [n, 2n) lane 1: two independent rings of n chunks,
// stepped alternately, so that while one lane's chunk is being decoded and
// re-encoded, the other lane's transfer is on the wire.
//
// One lane, rank r, ring chunk i (indices mod n):
//   reduce-scatter, step s = 0 .. n-2: send chunk r-s (quantized), receive
//     chunk r-s-1, add its decoded values into ours (float32). Afterwards
//     chunk r+1 holds the sum of every rank's chunk r+1.
//   then: quantize chunk r+1 once and overwrite it with its decoded values.
//   all-gather, step s = 0 .. n-2: send the message of chunk r+1-s (ours at
//     s = 0, after that the one just received, unchanged), receive chunk r-s
//     and decode it. Every rank decodes the same bytes: bit-identical results.
//
// Message (one per hop), a uint8 tensor:
//   [flags: uint64 x ceil(n/64)] [table: float32 x 256] [codes: uint8 x chunk]
// Flag bit q set = rank q found a non-finite value in a chunk it quantized
// (its input, or a partial sum that overflowed). Such a chunk travels as
// zeros, so the error stays with the rank that owns it. Each rank ORs what it
// receives into what it sends; across the all-gather every rank's bits reach
// every rank, so all ranks finish the collective and throw the same error.
#include "comm/compression/int8_allreduce.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <sstream>
#include <vector>

#include "comm/compression/int8_quantizer.h"
#include "tessera/core/error.h"

namespace tessera::comm::detail {
namespace {

constexpr int kLanes = 2;
constexpr int64_t kTableBytes = int8::kBins * sizeof(float);

int mod(int a, int n) { return ((a % n) + n) % n; }

// A view of one message's bytes.
class Int8Message {
 public:
  Int8Message() = default;
  Int8Message(int flagWords, int64_t codes)
      : flagWords_(flagWords), bytes_(at::empty({headerBytes(flagWords) + codes}, at::kByte)) {}

  static int64_t headerBytes(int flagWords) { return flagWords * int64_t{8} + kTableBytes; }

  const at::Tensor& bytes() const { return bytes_; }
  uint64_t* flags() { return reinterpret_cast<uint64_t*>(bytes_.data_ptr<uint8_t>()); }
  float* table() { return reinterpret_cast<float*>(bytes_.data_ptr<uint8_t>() + flagWords_ * 8); }
  uint8_t* codes() { return bytes_.data_ptr<uint8_t>() + headerBytes(flagWords_); }
  int64_t codeCount() const { return bytes_.numel() - headerBytes(flagWords_); }

 private:
  int flagWords_ = 0;
  at::Tensor bytes_;
};

class Int8Ring {
 public:
  Int8Ring(Communicator& comm, at::Tensor tensor, bool average, CallOptions options)
      : comm_(comm),
        data_(tensor.data_ptr<float>()),
        numel_(tensor.numel()),
        n_(comm.size()),
        rank_(comm.rank()),
        average_(average),
        options_(options),
        flags_((n_ + 63) / 64, 0) {}

  void run() {
    reduceScatter();
    allGather();
    throwIfAnyRankFailed();
  }

 private:
  struct Chunk {
    float* data;
    int64_t length;
  };

  // Lane `lane`'s ring chunk i: chunk lane*n + i of 2n near-equal pieces.
  Chunk chunk(int lane, int i) const {
    const int64_t pieces = int64_t{kLanes} * n_;
    const int64_t index = int64_t{lane} * n_ + i;
    const int64_t base = numel_ / pieces, extra = numel_ % pieces;
    const int64_t start = index * base + std::min(index, extra);
    return {data_ + start, base + (index < extra ? 1 : 0)};
  }

  Int8Message messageFor(const Chunk& c) const { return Int8Message(static_cast<int>(flags_.size()), c.length); }

  // A new message holding c quantized and the flags known so far. A
  // non-finite chunk sets this rank's flag and travels as zeros.
  Int8Message encode(const Chunk& c) {
    Int8Message m = messageFor(c);
    std::memset(m.flags(), 0, flags_.size() * 8);
    if (!int8::quantize(c.data, c.length, m.codes(), m.table())) {
      flags_[rank_ / 64] |= uint64_t{1} << (rank_ % 64);
      std::memset(m.table(), 0, kTableBytes);
      std::memset(m.codes(), int8::kZeroPoint, static_cast<size_t>(c.length));
    }
    stampFlags(m);
    return m;
  }

  void stampFlags(Int8Message& m) {
    for (size_t w = 0; w < flags_.size(); ++w) m.flags()[w] |= flags_[w];
  }
  void absorbFlags(Int8Message& m) {
    for (size_t w = 0; w < flags_.size(); ++w) flags_[w] |= m.flags()[w];
  }

  // The table to decode the final values with: kAvg divides here, identically on every rank.
  std::array<float, int8::kBins> outputTable(Int8Message& m) const {
    std::array<float, int8::kBins> table;
    std::memcpy(table.data(), m.table(), kTableBytes);
    if (average_) {
      for (float& v : table) v /= static_cast<float>(n_);
    }
    return table;
  }

  WorkPtr send(Int8Message& m, int tag) {
    return comm_.sendAsync(m.bytes(), mod(rank_ + 1, n_), kInt8RingTagBase + tag, options_);
  }
  WorkPtr recv(Int8Message& m, int tag) {
    return comm_.recvAsync(m.bytes(), mod(rank_ - 1, n_), kInt8RingTagBase + tag, options_);
  }

  void reduceScatter() {
    const int steps = n_ - 1;
    // Two buffers per lane and direction: step s uses s % 2, so a buffer is
    // reused only after the transfer of step s - 2 finished.
    std::array<std::array<Int8Message, 2>, kLanes> out, in;
    std::array<std::array<WorkPtr, 2>, kLanes> sends, recvs;
    for (int lane = 0; lane < kLanes; ++lane) {
      const Chunk incoming = chunk(lane, mod(rank_ - 1, n_));
      in[lane][0] = messageFor(incoming);
      recvs[lane][0] = recv(in[lane][0], lane);
      out[lane][0] = encode(chunk(lane, rank_));
      sends[lane][0] = send(out[lane][0], lane);
    }
    for (int s = 0; s < steps; ++s) {
      const int cur = s % 2, next = (s + 1) % 2;
      const bool more = s + 1 < steps;
      for (int lane = 0; lane < kLanes; ++lane) {
        recvs[lane][cur]->wait();
        const Chunk target = chunk(lane, mod(rank_ - s - 1, n_));
        if (more) {
          in[lane][next] = messageFor(chunk(lane, mod(rank_ - s - 2, n_)));
          recvs[lane][next] = recv(in[lane][next], lane);
        }
        Int8Message& got = in[lane][cur];
        absorbFlags(got);
        int8::dequantizeAccumulate(got.codes(), got.table(), target.length, target.data);
        if (more) {
          if (sends[lane][next]) sends[lane][next]->wait();
          out[lane][next] = encode(target);
          sends[lane][next] = send(out[lane][next], lane);
        } else {
          // This lane's chunk is fully reduced: its all-gather starts now,
          // while the other lane's last transfer may still be running.
          startAllGather(lane);
        }
      }
    }
    for (auto& laneSends : sends) {
      for (auto& work : laneSends) {
        if (work) work->wait();
      }
    }
  }

  // Quantizes this rank's reduced chunk of `lane`, sends it on, and only then
  // overwrites the chunk with its decoded values (off the peer's critical path).
  void startAllGather(int lane) {
    ag_[lane].messages.resize(n_);
    const Chunk own = chunk(lane, mod(rank_ + 1, n_));
    Int8Message& ours = ag_[lane].messages[0];
    ours = encode(own);
    ag_[lane].messages[1] = messageFor(chunk(lane, rank_));
    ag_[lane].pendingRecv = recv(ag_[lane].messages[1], kLanes + lane);
    ag_[lane].sends.push_back(send(ours, kLanes + lane));
    const auto table = outputTable(ours);
    int8::dequantize(ours.codes(), table.data(), own.length, own.data);
  }

  void allGather() {
    const int steps = n_ - 1;
    for (int s = 0; s < steps; ++s) {
      const bool more = s + 1 < steps;
      for (int lane = 0; lane < kLanes; ++lane) {
        AllGatherLane& ag = ag_[lane];
        ag.pendingRecv->wait();
        if (more) {
          ag.messages[s + 2] = messageFor(chunk(lane, mod(rank_ - s - 1, n_)));
          ag.pendingRecv = recv(ag.messages[s + 2], kLanes + lane);
        }
        Int8Message& got = ag.messages[s + 1];
        absorbFlags(got);
        if (more) {  // forward first: the next rank waits for it
          stampFlags(got);
          ag.sends.push_back(send(got, kLanes + lane));
        }
        const Chunk target = chunk(lane, mod(rank_ - s, n_));
        const auto table = outputTable(got);
        int8::dequantize(got.codes(), table.data(), target.length, target.data);
      }
    }
    for (auto& ag : ag_) {
      for (auto& work : ag.sends) work->wait();
    }
  }

  void throwIfAnyRankFailed() const {
    std::vector<int> failed;
    for (int q = 0; q < n_; ++q) {
      if (flags_[q / 64] >> (q % 64) & 1) failed.push_back(q);
    }
    if (failed.empty()) return;
    std::ostringstream ranks;
    for (size_t i = 0; i < failed.size(); ++i) ranks << (i ? ", " : "") << failed[i];
    throw InvalidArgument("int8 all-reduce on group '" + comm_.name() + "': rank(s) " + ranks.str() +
                          " found NaN or Inf values (in their input, or a float32 partial sum overflowed); "
                          "the tensor's contents are unspecified. Find the source of the non-finite values "
                          "(e.g. skip the step) or use compression 'none'");
  }

  Communicator& comm_;
  float* data_;
  int64_t numel_;
  int n_;
  int rank_;
  bool average_;
  CallOptions options_;
  std::vector<uint64_t> flags_;  // bit q: rank q saw non-finite values (what this rank knows so far)

  // One lane's all-gather: message k = 0 is ours, k = s + 1 the one received
  // at step s, kept until its forward completes (all of them: a quarter of
  // the tensor's bytes).
  struct AllGatherLane {
    std::vector<Int8Message> messages;
    std::vector<WorkPtr> sends;
    WorkPtr pendingRecv;
  };
  std::array<AllGatherLane, kLanes> ag_;
};

}  // namespace

void int8RingAllReduce(Communicator& comm, at::Tensor tensor, bool average, CallOptions options) {
  Int8Ring(comm, std::move(tensor), average, options).run();
}

}  // namespace tessera::comm::detail
