// Fault injection: the FaultPlan text format, the communicator wrapper that
// applies a plan's delay/drop/fail faults, and the step-level kill/slow faults.
//
// The wrapper decides everything before the operation reaches the inner
// communicator: a dropped or failed collective never starts there, so the
// peers see exactly what they would see if this rank's message were lost (they
// wait until their timeout). Delays are served on the issuing thread before
// forwarding, which keeps the operations in issue order without a queue of our
// own.
#include "tessera/comm/fault.h"

#include <signal.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include "tessera/core/error.h"
#include "tessera/core/logging.h"

namespace tessera::comm {

namespace {

// ---------------------------------------------------------------- parsing ---

constexpr const char* kKillForm = "kill:rank=R,step=S or kill:rank=R,collective=N[,comm=NAME]";
constexpr const char* kSlowForm = "slow:[rank=R,]factor=F";
constexpr const char* kDelayForm = "delay:fraction=P,ms=M[,comm=NAME][,rank=R]";
constexpr const char* kDropForm = "drop:fraction=P[,comm=NAME][,rank=R]";
constexpr const char* kFailForm = "fail:collective=N[,comm=NAME][,rank=R]";

std::string trim(const std::string& text) {
  const auto begin = text.find_first_not_of(" \t\n\r");
  if (begin == std::string::npos) return "";
  const auto end = text.find_last_not_of(" \t\n\r");
  return text.substr(begin, end - begin + 1);
}

std::vector<std::string> splitOn(const std::string& text, char separator) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream in(text);
  while (std::getline(in, part, separator)) parts.push_back(part);
  if (!text.empty() && text.back() == separator) parts.push_back("");
  return parts;
}

// One fault being parsed: its text, accepted form and key=value pairs. Every
// error names the fault and the form, so a typo in a long plan is easy to find.
class FaultSpec {
 public:
  FaultSpec(std::string text, std::string form, const std::string& body)
      : text_(std::move(text)), form_(std::move(form)) {
    for (const auto& rawPair : splitOn(body, ',')) {
      const std::string pair = trim(rawPair);
      const auto eq = pair.find('=');
      if (pair.empty() || eq == std::string::npos || eq == 0) {
        fail("'" + pair + "' is not key=value");
      }
      const std::string key = trim(pair.substr(0, eq));
      if (values_.count(key)) fail("key '" + key + "' is given twice");
      values_[key] = trim(pair.substr(eq + 1));
    }
  }

  [[noreturn]] void fail(const std::string& problem) const {
    throw InvalidArgument("fault plan: fault '" + text_ + "': " + problem + "; accepted form: " + form_);
  }

  // Rejects keys other than `known`.
  void allowOnly(const std::vector<std::string>& known) const {
    for (const auto& [key, value] : values_) {
      bool ok = false;
      for (const auto& k : known) ok = ok || k == key;
      if (!ok) fail("unknown key '" + key + "'");
    }
  }

  bool has(const std::string& key) const { return values_.count(key) > 0; }

  const std::string& require(const std::string& key) const {
    const auto it = values_.find(key);
    if (it == values_.end()) fail("missing key '" + key + "'");
    if (it->second.empty()) fail("key '" + key + "' has no value");
    return it->second;
  }

  int64_t integer(const std::string& key, int64_t min) const {
    const std::string& value = require(key);
    char* end = nullptr;
    errno = 0;
    const long long parsed = std::strtoll(value.c_str(), &end, 10);
    if (errno != 0 || end != value.c_str() + value.size()) {
      fail(key + "='" + value + "' is not an integer");
    }
    if (parsed < min) fail(key + "=" + value + " is out of range: must be >= " + std::to_string(min));
    return parsed;
  }

  double real(const std::string& key, double min, double max) const {
    const std::string& value = require(key);
    char* end = nullptr;
    errno = 0;
    const double parsed = std::strtod(value.c_str(), &end);
    if (errno != 0 || end != value.c_str() + value.size() || !std::isfinite(parsed)) {
      fail(key + "='" + value + "' is not a number");
    }
    if (parsed < min || parsed > max) {
      std::ostringstream range;
      range << key << "=" << value << " is out of range: must be in [" << min << ", ";
      if (std::isinf(max)) range << "inf)"; else range << max << "]";
      fail(range.str());
    }
    return parsed;
  }

  int rankOr(int fallback) const {
    return has("rank") ? static_cast<int>(integer("rank", 0)) : fallback;
  }

  std::string comm() const { return has("comm") ? require("comm") : ""; }

 private:
  std::string text_;
  std::string form_;
  std::map<std::string, std::string> values_;
};

// The shortest decimal text that reads back as exactly `value`.
std::string formatReal(double value) {
  for (int precision = 1; precision <= 17; ++precision) {
    std::ostringstream out;
    out.precision(precision);
    out << value;
    if (std::strtod(out.str().c_str(), nullptr) == value) return out.str();
  }
  std::ostringstream out;
  out.precision(17);
  out << value;
  return out.str();
}

std::string describeFilters(const std::string& comm, int rank) {
  std::string text;
  if (!comm.empty()) text += ",comm=" + comm;
  if (rank != FaultPlan::kAnyRank) text += ",rank=" + std::to_string(rank);
  return text;
}

std::string describeDelay(const FaultPlan::MessageFault& f) {
  return "delay:fraction=" + formatReal(f.fraction) + ",ms=" + std::to_string(f.delay.count()) +
         describeFilters(f.comm, f.rank);
}
std::string describeDrop(const FaultPlan::MessageFault& f) {
  return "drop:fraction=" + formatReal(f.fraction) + describeFilters(f.comm, f.rank);
}
std::string describeFailure(const FaultPlan::FailCollective& f) {
  if (f.kill) {
    return "kill:rank=" + std::to_string(f.rank) + ",collective=" + std::to_string(f.n) + describeFilters(f.comm, FaultPlan::kAnyRank);
  }
  return "fail:collective=" + std::to_string(f.n) + describeFilters(f.comm, f.rank);
}

bool appliesTo(int faultRank, const std::string& faultComm, int rank, const std::string& commName) {
  return (faultRank == FaultPlan::kAnyRank || faultRank == rank) &&
         (faultComm.empty() || commName.find(faultComm) != std::string::npos);
}

// ------------------------------------------------------------ randomness ---

uint64_t splitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

uint64_t fnv1a(const std::string& text) {
  uint64_t hash = 0xcbf29ce484222325ULL;
  for (const unsigned char c : text) hash = (hash ^ c) * 0x100000001b3ULL;
  return hash;
}

// A small deterministic generator (splitmix64 stream): the same plan seed,
// rank and communicator name give the same decisions on every machine and
// library version, which std::uniform_real_distribution does not promise.
class FaultRandom {
 public:
  FaultRandom(uint64_t seed, int rank, const std::string& commName)
      : state_(splitMix64(seed) ^ splitMix64(0x5eed0000ULL + static_cast<uint64_t>(rank)) ^ fnv1a(commName)) {}
  // Uniform in [0, 1).
  double next() {
    state_ += 0x9e3779b97f4a7c15ULL;
    return static_cast<double>(splitMix64(state_) >> 11) * 0x1.0p-53;
  }

 private:
  uint64_t state_;
};

// ----------------------------------------------------------------- works ---

// A Work that already failed with `error`.
class FailedWork final : public Work {
 public:
  explicit FailedWork(std::exception_ptr error) : error_(std::move(error)) {}
  void wait(Timeout) override { std::rethrow_exception(error_); }
  bool isCompleted() override { return true; }

 private:
  std::exception_ptr error_;
};

class FaultyCommunicator;

// The inner operation's Work; on completion, brings the wrapper's stats up to
// date with the inner communicator's.
class ForwardedWork final : public Work {
 public:
  ForwardedWork(WorkPtr inner, std::weak_ptr<FaultyCommunicator> owner)
      : inner_(std::move(inner)), owner_(std::move(owner)) {}
  void wait(Timeout timeout) override;
  bool isCompleted() override;

 private:
  WorkPtr inner_;
  std::weak_ptr<FaultyCommunicator> owner_;
};

// ------------------------------------------------------------ the wrapper ---

class FaultyCommunicator final : public Communicator,
                                 public std::enable_shared_from_this<FaultyCommunicator> {
 public:
  FaultyCommunicator(CommPtr inner, FaultPlan plan, int globalRank)
      : Communicator(inner->rank(), inner->size(), inner->name()),
        inner_(std::move(inner)),
        plan_(std::move(plan)),
        globalRank_(globalRank),
        random_(plan_.seed, globalRank, name()) {
    setTimeout(inner_->timeout());
    seenStats_ = inner_->stats();
    for (const auto& f : plan_.delays) {
      if (appliesTo(f.rank, f.comm, globalRank_, name())) delays_.push_back(f);
    }
    for (const auto& f : plan_.drops) {
      if (appliesTo(f.rank, f.comm, globalRank_, name())) drops_.push_back(f);
    }
    for (const auto& f : plan_.failures) {
      if (appliesTo(f.rank, f.comm, globalRank_, name())) failures_.push_back(f);
    }
  }

  bool hasFaults() const { return !delays_.empty() || !drops_.empty() || !failures_.empty(); }

  std::string backend() const override { return inner_->backend(); }

  WorkPtr allReduceAsync(at::Tensor tensor, ReduceOp op, CallOptions options) override {
    return collective(OpKind::kAllReduce, [&] { return inner_->allReduceAsync(tensor, op, withTimeout(options)); });
  }
  WorkPtr reduceScatterAsync(at::Tensor input, at::Tensor output, ReduceOp op, std::vector<int64_t> counts,
                             CallOptions options) override {
    return collective(OpKind::kReduceScatter, [&] {
      return inner_->reduceScatterAsync(input, output, op, std::move(counts), withTimeout(options));
    });
  }
  WorkPtr allGatherAsync(at::Tensor input, at::Tensor output, std::vector<int64_t> counts,
                         CallOptions options) override {
    return collective(OpKind::kAllGather, [&] {
      return inner_->allGatherAsync(input, output, std::move(counts), withTimeout(options));
    });
  }
  WorkPtr broadcastAsync(at::Tensor tensor, int root, CallOptions options) override {
    return collective(OpKind::kBroadcast,
                      [&] { return inner_->broadcastAsync(tensor, root, withTimeout(options)); });
  }
  WorkPtr allToAllAsync(at::Tensor input, at::Tensor output, std::vector<int64_t> sendCounts,
                        std::vector<int64_t> recvCounts, CallOptions options) override {
    return collective(OpKind::kAllToAll, [&] {
      return inner_->allToAllAsync(input, output, std::move(sendCounts), std::move(recvCounts),
                                   withTimeout(options));
    });
  }
  WorkPtr barrierAsync(CallOptions options) override {
    return collective(OpKind::kBarrier, [&] { return inner_->barrierAsync(withTimeout(options)); });
  }

  // A dropped send fails on its own; the group stays usable (the peer's recv
  // times out, as it would for a lost message).
  WorkPtr sendAsync(at::Tensor tensor, int dst, int tag, CallOptions options) override {
    throwIfBroken();
    const std::string what = "send to rank " + std::to_string(dst) + " tag " + std::to_string(tag);
    if (auto dropped = decideMessage(what, /*countsAsCollective=*/false)) return dropped;
    return forward(inner_->sendAsync(tensor, dst, tag, withTimeout(options)));
  }
  // Receiving is not a message of this rank: no fault applies.
  WorkPtr recvAsync(at::Tensor tensor, int src, int tag, CallOptions options) override {
    throwIfBroken();
    return forward(inner_->recvAsync(tensor, src, tag, withTimeout(options)));
  }

  CommPtr split(int color, int key, const std::string& suffix) override {
    throwIfBroken();
    CommPtr child = inner_->split(color, key, suffix);
    syncStats();
    if (child == nullptr) return nullptr;
    return injectFaults(std::move(child), plan_, globalRank_);
  }

  // Mirrors the inner communicator's traffic into this one's stats (stats()
  // is not virtual, so the wrapper keeps its own copy up to date).
  void syncStats() {
    std::lock_guard<std::mutex> lock(statsMutex_);
    const CommStats now = inner_->stats();
    for (int k = 0; k < static_cast<int>(OpKind::kCount); ++k) {
      const OpStats& current = now.perOp[k];
      OpStats seen = seenStats_.perOp[k];
      if (current.calls < seen.calls) seen = OpStats{};  // the inner stats were reset
      for (uint64_t call = seen.calls; call < current.calls; ++call) {
        const bool first = call == seen.calls;
        recordOp(static_cast<OpKind>(k), first ? current.bytesSent - seen.bytesSent : 0,
                 first ? current.bytesReceived - seen.bytesReceived : 0,
                 first ? current.seconds - seen.seconds : 0.0);
      }
    }
    seenStats_ = now;
  }

 private:
  CallOptions withTimeout(CallOptions options) const {
    // setTimeout() is not virtual: a timeout set on the wrapper reaches the
    // inner communicator as a per-call timeout.
    if (options.timeout.count() < 0) options.timeout = timeout();
    return options;
  }

  void throwIfBroken() const {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!brokenReason_.empty()) {
      throw CommError("group '" + name() + "' (" + inner_->backend() +
                      ", with fault injection) is broken by an earlier failure and cannot be used: " +
                      brokenReason_);
    }
  }

  template <typename Issue>
  WorkPtr collective(OpKind kind, Issue issue) {
    throwIfBroken();
    int64_t seq = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      seq = ++collectiveCount_;
    }
    const std::string what = std::string(toString(kind)) + " #" + std::to_string(seq);
    for (const auto& f : failures_) {
      if (f.n == seq && f.kill) {
        TESSERA_LOG(kWarn) << "fault plan: killing rank " << globalRank_ << " with SIGKILL in " << what << " on group '"
                           << name() << "' (" << describeFailure(f) << ")";
        std::fflush(stdout);
        std::fflush(stderr);
        ::raise(SIGKILL);
      }
      if (f.n == seq) {
        return failCollective(what + " on group '" + name() + "' (rank " + std::to_string(rank()) +
                              ") failed by the fault plan (" + describeFailure(f) + ")");
      }
    }
    if (auto dropped = decideMessage(what, /*countsAsCollective=*/true)) return dropped;
    return forward(issue());
  }

  // Applies the delays, then the drops, to one outgoing message. Returns the
  // failed Work of a dropped message, or nullptr to go ahead.
  WorkPtr decideMessage(const std::string& what, bool countsAsCollective) {
    Timeout wait{0};
    const FaultPlan::MessageFault* drop = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // One draw per fault per message, whatever the outcome, so that the
      // sequence of decisions depends only on the seed and the message count.
      for (const auto& f : delays_) {
        if (random_.next() < f.fraction) wait += f.delay;
      }
      for (const auto& f : drops_) {
        if (random_.next() < f.fraction && drop == nullptr) drop = &f;
      }
    }
    if (wait.count() > 0) std::this_thread::sleep_for(wait);
    if (drop == nullptr) return nullptr;
    const std::string message = what + " on group '" + name() + "' (rank " + std::to_string(rank()) +
                                ") dropped by the fault plan (" + describeDrop(*drop) +
                                "): the message was lost, as after its retries";
    if (countsAsCollective) return failCollective(message);
    return std::make_shared<FailedWork>(std::make_exception_ptr(CommError(message)));
  }

  // Like a real backend, a failed collective breaks the group: the ranks no
  // longer agree on which collective comes next.
  WorkPtr failCollective(const std::string& message) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (brokenReason_.empty()) brokenReason_ = message;
    }
    TESSERA_LOG(kWarn) << message;
    return std::make_shared<FailedWork>(std::make_exception_ptr(CommError(message)));
  }

  WorkPtr forward(WorkPtr inner) {
    syncStats();
    return std::make_shared<ForwardedWork>(std::move(inner), weak_from_this());
  }

  CommPtr inner_;
  FaultPlan plan_;  // whole, for split() children
  int globalRank_;
  std::vector<FaultPlan::MessageFault> delays_;  // those that apply here
  std::vector<FaultPlan::MessageFault> drops_;
  std::vector<FaultPlan::FailCollective> failures_;

  mutable std::mutex mutex_;  // guards the three below
  FaultRandom random_;
  int64_t collectiveCount_ = 0;
  std::string brokenReason_;

  std::mutex statsMutex_;
  CommStats seenStats_;  // the inner stats already mirrored
};

void ForwardedWork::wait(Timeout timeout) {
  try {
    inner_->wait(timeout);
  } catch (...) {
    if (auto owner = owner_.lock()) owner->syncStats();
    throw;
  }
  if (auto owner = owner_.lock()) owner->syncStats();
}

bool ForwardedWork::isCompleted() {
  const bool done = inner_->isCompleted();
  if (done) {
    if (auto owner = owner_.lock()) owner->syncStats();
  }
  return done;
}

}  // namespace

// ------------------------------------------------------------- FaultPlan ---

bool FaultPlan::empty() const {
  return kills.empty() && slow.empty() && delays.empty() && drops.empty() && failures.empty();
}

std::string FaultPlan::describe() const {
  std::vector<std::string> faults;
  for (const auto& k : kills) {
    faults.push_back("kill:rank=" + std::to_string(k.rank) + ",step=" + std::to_string(k.step));
  }
  for (const auto& s : slow) {
    std::string text = "slow:";
    if (s.rank != kAnyRank) text += "rank=" + std::to_string(s.rank) + ",";
    faults.push_back(text + "factor=" + formatReal(s.factor));
  }
  for (const auto& d : delays) faults.push_back(describeDelay(d));
  for (const auto& d : drops) faults.push_back(describeDrop(d));
  for (const auto& f : failures) faults.push_back(describeFailure(f));
  faults.push_back("seed=" + std::to_string(seed));
  std::string text;
  for (const auto& fault : faults) text += (text.empty() ? "" : ";") + fault;
  return text;
}

FaultPlan FaultPlan::parse(const std::string& text) {
  FaultPlan plan;
  bool seedSeen = false;
  for (const auto& rawFault : splitOn(text, ';')) {
    const std::string fault = trim(rawFault);
    if (fault.empty()) continue;
    const auto colon = fault.find(':');
    if (colon == std::string::npos) {
      if (fault.rfind("seed", 0) == 0 && fault.find('=') != std::string::npos) {
        FaultSpec spec(fault, "seed=X (a non-negative integer)", fault);
        spec.allowOnly({"seed"});
        if (seedSeen) spec.fail("the seed is given twice");
        const std::string& value = spec.require("seed");
        char* end = nullptr;
        errno = 0;
        const unsigned long long parsed = std::strtoull(value.c_str(), &end, 10);
        if (errno != 0 || end != value.c_str() + value.size() || value[0] == '-') {
          spec.fail("seed='" + value + "' is not a non-negative integer");
        }
        plan.seed = parsed;
        seedSeen = true;
        continue;
      }
      throw InvalidArgument("fault plan: '" + fault +
                            "' is not a fault: write kind:key=value,... (kinds: kill, slow, delay, drop, fail) "
                            "or seed=X, separated by ';'");
    }
    const std::string kind = trim(fault.substr(0, colon));
    const std::string body = fault.substr(colon + 1);
    if (kind == "kill" && body.find("collective") != std::string::npos) {
      FaultSpec spec(fault, kKillForm, body);
      spec.allowOnly({"rank", "collective", "comm"});
      FailCollective f;
      f.n = spec.integer("collective", 1);
      f.comm = spec.comm();
      f.rank = static_cast<int>(spec.integer("rank", 0));
      f.kill = true;
      plan.failures.push_back(f);
    } else if (kind == "kill") {
      FaultSpec spec(fault, kKillForm, body);
      spec.allowOnly({"rank", "step"});
      plan.kills.push_back({static_cast<int>(spec.integer("rank", 0)), spec.integer("step", 0)});
    } else if (kind == "slow") {
      FaultSpec spec(fault, kSlowForm, body);
      spec.allowOnly({"rank", "factor"});
      plan.slow.push_back({spec.rankOr(kAnyRank), spec.real("factor", 1.0, INFINITY)});
    } else if (kind == "delay") {
      FaultSpec spec(fault, kDelayForm, body);
      spec.allowOnly({"fraction", "ms", "comm", "rank"});
      MessageFault f;
      f.fraction = spec.real("fraction", 0.0, 1.0);
      f.delay = std::chrono::milliseconds(spec.integer("ms", 0));
      f.comm = spec.comm();
      f.rank = spec.rankOr(kAnyRank);
      plan.delays.push_back(f);
    } else if (kind == "drop") {
      FaultSpec spec(fault, kDropForm, body);
      spec.allowOnly({"fraction", "comm", "rank"});
      MessageFault f;
      f.fraction = spec.real("fraction", 0.0, 1.0);
      f.comm = spec.comm();
      f.rank = spec.rankOr(kAnyRank);
      plan.drops.push_back(f);
    } else if (kind == "fail") {
      FaultSpec spec(fault, kFailForm, body);
      spec.allowOnly({"collective", "comm", "rank"});
      plan.failures.push_back({spec.integer("collective", 1), spec.comm(), spec.rankOr(kAnyRank)});
    } else {
      throw InvalidArgument("fault plan: fault '" + fault + "' has unknown kind '" + kind +
                            "'; accepted: " + kKillForm + "; " + kSlowForm + "; " + kDelayForm + "; " + kDropForm +
                            "; " + kFailForm + "; seed=X");
    }
  }
  return plan;
}

FaultPlan FaultPlan::fromEnv() {
  const char* text = std::getenv("TESSERA_FAULT_PLAN");
  if (text == nullptr || trim(text).empty()) return {};
  try {
    return parse(text);
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(std::string("TESSERA_FAULT_PLAN: ") + e.what());
  }
}

CommPtr injectFaults(CommPtr inner, const FaultPlan& plan, int rank) {
  TESSERA_CHECK_ARG(inner != nullptr, "injectFaults needs a communicator, got nullptr");
  auto wrapper = std::make_shared<FaultyCommunicator>(inner, plan, rank);
  if (!wrapper->hasFaults()) return inner;
  return wrapper;
}

// ------------------------------------------------------------ StepFaults ---

StepFaults::StepFaults(FaultPlan plan, int rank) : plan_(std::move(plan)), rank_(rank) {}

void StepFaults::beforeStep(int64_t step) {
  for (const auto& kill : plan_.kills) {
    if (kill.rank != rank_ || kill.step != step) continue;
    TESSERA_LOG(kWarn) << "fault plan: killing rank " << rank_ << " with SIGKILL before step " << step
                       << " (kill:rank=" << kill.rank << ",step=" << kill.step << ")";
    // SIGKILL skips every buffer flush: flush what was printed so far, so the
    // log shows everything up to the kill.
    std::cout.flush();
    std::cerr.flush();
    std::fflush(stdout);
    std::fflush(stderr);
    raise(SIGKILL);
  }
}

void StepFaults::afterStep(double stepSeconds) {
  // Several matching slow faults compound.
  double factor = 1.0;
  for (const auto& s : plan_.slow) {
    if (s.rank == FaultPlan::kAnyRank || s.rank == rank_) factor *= s.factor;
  }
  if (factor <= 1.0 || !(stepSeconds > 0)) return;
  std::this_thread::sleep_for(std::chrono::duration<double>((factor - 1.0) * stepSeconds));
}

bool StepFaults::active() const {
  for (const auto& kill : plan_.kills) {
    if (kill.rank == rank_) return true;
  }
  for (const auto& s : plan_.slow) {
    if ((s.rank == FaultPlan::kAnyRank || s.rank == rank_) && s.factor > 1.0) return true;
  }
  return false;
}

}  // namespace tessera::comm
