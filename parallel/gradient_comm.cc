// Gradient communication in fp32 / bf16 / fp8: the parse, the checks, and the
// two collectives DDP and FSDP share (see the header for the contracts).
#include "tessera/parallel/gradient_comm.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>

#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::parallel {

const char* toString(GradientComm mode) {
  switch (mode) {
    case GradientComm::kFp32: return "fp32";
    case GradientComm::kBf16: return "bf16";
    case GradientComm::kFp8: return "fp8";
  }
  return "?";
}

GradientComm parseGradientComm(const std::string& value, const std::string& field) {
  if (value == "fp32") return GradientComm::kFp32;
  if (value == "bf16") return GradientComm::kBf16;
  if (value == "fp8") return GradientComm::kFp8;
  TESSERA_CHECK_CONFIG(false, field, "got '" << value << "' (valid: \"fp32\", \"bf16\", \"fp8\")");
  return GradientComm::kFp32;
}

const char* toString(Fp8Scaling scaling) {
  switch (scaling) {
    case Fp8Scaling::kSafe: return "safe";
    case Fp8Scaling::kAuto: return "auto";
  }
  return "?";
}

Fp8Scaling parseFp8Scaling(const std::string& value, const std::string& field) {
  if (value == "safe") return Fp8Scaling::kSafe;
  if (value == "auto") return Fp8Scaling::kAuto;
  TESSERA_CHECK_CONFIG(false, field, "got '" << value << "' (valid: \"safe\", \"auto\")");
  return Fp8Scaling::kSafe;
}

void GradientFp8Stats::count(const comm::Fp8CommStats& call) {
  ++calls;
  encoded += call.encoded;
  saturated += call.saturated;
}

void GradientFp8Stats::countMu(double mu) {
  minMu = maxMu > 0 ? std::min(minMu, mu) : mu;
  maxMu = maxMu > 0 ? std::max(maxMu, mu) : mu;
}

GradientFp8Stats& GradientFp8Stats::operator+=(const GradientFp8Stats& later) {
  calls += later.calls;
  encoded += later.encoded;
  saturated += later.saturated;
  if (later.maxMu > 0) {
    minMu = later.minMu;
    maxMu = later.maxMu;
  }
  return *this;
}

int64_t gradientWireBytes(GradientComm mode) {
  switch (mode) {
    case GradientComm::kFp32: return 4;
    case GradientComm::kBf16: return 2;
    case GradientComm::kFp8: return 1;
  }
  return 4;
}

void checkGradientCommTensor(GradientComm mode, const at::Tensor& tensor, const std::string& what) {
  if (mode == GradientComm::kFp32) return;
  TESSERA_CHECK_ARG(tensor.scalar_type() == at::kFloat,
                    what << " is " << tensor.scalar_type() << "; grad_comm \"" << toString(mode)
                         << "\" compresses float32 gradients only: keep such parameters in float32 or use \"fp32\"");
  TESSERA_CHECK_ARG(mode != GradientComm::kFp8 || tensor.is_cpu(),
                    what << " is on " << tensor.device() << "; grad_comm \"fp8\" runs the FP8 ring over CPU "
                         << "tensors (Gloo, MPI): use \"bf16\" or \"fp32\" on this device");
}

namespace {

// A collective run on its own thread once `after` has completed; the
// destructor joins it (the collective ends by itself: every transfer carries
// a timeout).
class BackgroundWork final : public comm::Work {
 public:
  BackgroundWork(comm::WorkPtr after, std::function<void()> body) {
    thread_ = std::thread([this, after = std::move(after), body = std::move(body)] {
      std::exception_ptr error;
      try {
        if (after) {
          try {
            after->wait();
          } catch (...) {  // the previous call's error is its own waiter's; this one still runs
          }
        }
        body();
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mutex_);
      error_ = error;
      completed_ = true;
      done_.notify_all();
    });
  }
  ~BackgroundWork() override { thread_.join(); }

  void wait(comm::Timeout timeout) override {
    std::unique_lock<std::mutex> lock(mutex_);
    if (timeout.count() < 0) {
      done_.wait(lock, [this] { return completed_; });
    } else if (!done_.wait_for(lock, timeout, [this] { return completed_; })) {
      throw TimeoutError("fp8 gradient all-reduce did not finish within " + std::to_string(timeout.count()) +
                         " ms (the per-call wait); it keeps running under the communicator's timeout");
    }
    if (error_) std::rethrow_exception(error_);
  }
  bool isCompleted() override {
    std::lock_guard<std::mutex> lock(mutex_);
    return completed_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable done_;
  bool completed_ = false;
  std::exception_ptr error_;
  std::thread thread_;  // last: started after the members it uses exist
};

// A bf16 transfer in flight: wait() waits for it, then widens the bf16 sum
// into `result` and divides by the group size in fp32 (once, under a mutex, so
// any number of waits is fine).
class Bf16Work final : public comm::Work {
 public:
  // `sent`: a reduce-scatter's bf16 input, kept alive until the transfer is done.
  Bf16Work(comm::WorkPtr inner, at::Tensor wire, at::Tensor result, int size, at::Tensor sent = {})
      : inner_(std::move(inner)), wire_(std::move(wire)), result_(std::move(result)), sent_(std::move(sent)),
        size_(size) {}

  void wait(comm::Timeout timeout) override {
    inner_->wait(timeout);
    std::lock_guard<std::mutex> lock(mutex_);
    if (finished_) return;
    at::NoGradGuard noGrad;
    result_.copy_(wire_);
    if (size_ > 1) result_.div_(static_cast<double>(size_));
    wire_ = at::Tensor();
    sent_ = at::Tensor();
    finished_ = true;
  }
  bool isCompleted() override { return inner_->isCompleted(); }

 private:
  comm::WorkPtr inner_;
  at::Tensor wire_;    // bf16, what travelled
  at::Tensor result_;  // fp32, the caller's
  at::Tensor sent_;
  int size_;
  std::mutex mutex_;
  bool finished_ = false;
};

class CompletedWork final : public comm::Work {
 public:
  void wait(comm::Timeout) override {}
  bool isCompleted() override { return true; }
};

}  // namespace

comm::WorkPtr allReduceGradientAsync(const comm::CommPtr& comm, at::Tensor flat, GradientComm mode,
                                     comm::WorkPtr after, comm::Fp8AutoScaler* scaler, comm::Fp8CommStats* stats) {
  TESSERA_CHECK_ARG(comm != nullptr, "gradient all-reduce needs a communicator, got nullptr");
  checkGradientCommTensor(mode, flat, "the gradient all-reduced over group '" + comm->name() + "'");
  switch (mode) {
    case GradientComm::kFp32: return comm->allReduceAsync(flat, comm::ReduceOp::kAvg);
    case GradientComm::kBf16: {
      at::Tensor wire = flat.to(at::kBFloat16).contiguous();
      comm::WorkPtr inner = comm->allReduceAsync(wire, comm::ReduceOp::kSum);
      return std::make_shared<Bf16Work>(std::move(inner), std::move(wire), std::move(flat), comm->size());
    }
    case GradientComm::kFp8: {
      comm::CommPtr held = comm;
      // scaler null: exactly allReduceCompressed(kFp8, kAvg), the "safe" scale.
      return std::make_shared<BackgroundWork>(std::move(after), [held, flat, scaler, stats] {
        const comm::Fp8CommStats call = comm::fp8AllReduce(*held, flat, comm::ReduceOp::kAvg, scaler);
        if (stats != nullptr) *stats = call;
      });
    }
  }
  throw InvalidArgument("unknown GradientComm");
}

comm::WorkPtr reduceScatterGradientAsync(const comm::CommPtr& comm, at::Tensor input, at::Tensor output,
                                         GradientComm mode, comm::Fp8AutoScaler* scaler, comm::Fp8CommStats* stats) {
  TESSERA_CHECK_ARG(comm != nullptr, "gradient reduce-scatter needs a communicator, got nullptr");
  const std::string what = "the gradient reduce-scattered over group '" + comm->name() + "'";
  checkGradientCommTensor(mode, input, what);
  checkGradientCommTensor(mode, output, what + " (output)");
  switch (mode) {
    case GradientComm::kFp32: return comm->reduceScatterAsync(input, output, comm::ReduceOp::kAvg);
    case GradientComm::kBf16: {
      at::Tensor wireIn = input.to(at::kBFloat16).contiguous();
      at::Tensor wireOut = at::empty({output.numel()}, output.options().dtype(at::kBFloat16));
      comm::WorkPtr inner = comm->reduceScatterAsync(wireIn, wireOut, comm::ReduceOp::kSum);
      return std::make_shared<Bf16Work>(std::move(inner), std::move(wireOut), std::move(output), comm->size(),
                                        std::move(wireIn));
    }
    case GradientComm::kFp8: {
      // scaler null: exactly reduceScatterCompressed(kFp8, kAvg), the "safe" scale.
      const comm::Fp8CommStats call = comm::fp8ReduceScatter(*comm, input, output, comm::ReduceOp::kAvg, scaler);
      if (stats != nullptr) *stats = call;
      return std::make_shared<CompletedWork>();
    }
  }
  throw InvalidArgument("unknown GradientComm");
}

}  // namespace tessera::parallel
