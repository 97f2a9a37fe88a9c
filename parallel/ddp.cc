// DistributedDataParallel: bucket layout, gradient hooks, the per-step state
// machine and the overlap bookkeeping.
//
// Per parameter, a hook registered with Tensor::register_hook runs when
// autograd has the parameter's gradient for this backward (summed over every
// use), just before AccumulateGrad adds it into .grad. The hook copies
// (.grad so far + this gradient) into the parameter's slice of its bucket's
// flat buffer and returns nothing, so autograd still accumulates the local
// gradient into .grad as usual; finishGradientSync() later overwrites .grad
// with the averaged slice. Copying (rather than aliasing .grad into the
// bucket) keeps the hook independent of whether autograd steals or copies
// the gradient, which differs between libtorch versions.
//
// Why the ordering is safe: a bucket is launched only once every one of its
// slices is written, and backward never writes a slice again in that step
// (a second gradient for a parameter is an error), so the all-reduce reads a
// buffer nobody else touches until wait() returns in finishGradientSync().
// Buckets are launched strictly in index order (bucket i waits for buckets
// < i), so every rank issues the same sequence of collectives on each group's
// communicator even when its gradients become ready in a different order.
// Launches are asynchronous, so buckets of different groups never wait for
// each other's peers.
#include "tessera/parallel/ddp.h"

#include <torch/nn/module.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <mutex>
#include <sstream>
#include <unordered_set>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/timer.h"

namespace tessera::parallel {

void DdpConfig::validate() const {
  TESSERA_CHECK_CONFIG(bucketCapBytes > 0, "ddp.bucket_cap_bytes", "must be > 0, got " << bucketCapBytes);
  if (gradComm == GradientComm::kFp8 && fp8Scaling == Fp8Scaling::kAuto) fp8AutoScale.validate();
}

DdpSyncStats& DdpSyncStats::operator+=(const DdpSyncStats& other) {
  steps += other.steps;
  buckets += other.buckets;
  bucketsLaunchedInBackward += other.bucketsLaunchedInBackward;
  bytes += other.bytes;
  commSeconds += other.commSeconds;
  exposedSeconds += other.exposedSeconds;
  for (const auto& [name, n] : other.bytesByComm) bytesByComm[name] += n;
  for (const auto& [name, seconds] : other.exposedSecondsByComm) exposedSecondsByComm[name] += seconds;
  fp8 += other.fp8;
  return *this;
}

namespace {

// One synced parameter and its slice of a bucket.
struct Slot {
  std::string name;
  at::Tensor param;
  int group = -1;        // index into State::groups
  int bucket = -1;
  at::Tensor view;       // param-shaped view into the bucket's flat buffer
  bool ready = false;    // slice written in the current step
  int needed = 1;        // gradient arrivals that complete it in a synced step (setGradientArrivals)
  int arrived = 0;       // arrivals counted in the current synced step
  unsigned hookHandle = 0;
};

// Parameters of one group and dtype whose gradients travel in one all-reduce.
struct Bucket {
  comm::CommPtr comm;           // the group's communicator
  double scale = 1.0;           // the group's gradientScale, applied after the average
  at::Tensor flat;              // (sum of numels,), the all-reduce buffer
  std::vector<int> slots;       // indexes into State::slots
  int pending = 0;              // slices not yet written this step
  comm::WorkPtr work;           // set when launched
  // fp8 with scaling "auto": this bucket's FP8-LM scaler (the bucket is one
  // tensor stream), touched only by its call's thread until wait() returns.
  std::unique_ptr<comm::Fp8AutoScaler> scaler;
  comm::Fp8CommStats fp8;       // fp8: the call's figures, written by its thread, read after wait()
  bool done = false;            // completion observed
  SteadyClock::time_point launchedAt;
  SteadyClock::time_point doneAt;
};

}  // namespace

struct DistributedDataParallel::State {
  std::vector<DdpGroup> groups;
  DdpConfig config;
  std::vector<Slot> slots;      // registration order
  std::vector<Bucket> buckets;  // bucket 0 holds the last registered parameters

  // Guards everything below; hooks may run on autograd worker threads.
  mutable std::mutex mutex;
  int noSyncDepth = 0;
  bool stepActive = false;      // a synced backward has started, finish not yet run
  size_t nextToLaunch = 0;
  DdpSyncStats last;
  DdpSyncStats total;
  // Per communicator, the last bucket launched on it this step: an fp8
  // bucket's all-reduce starts after it (one FP8 ring in flight per comm).
  std::map<const comm::Communicator*, comm::WorkPtr> lastLaunched;

  // An fp8 bucket's thread writes the bucket's scaler and figures: let every
  // one finish (each ends under the communicator's timeout) before the
  // buckets die, e.g. after a failed finishGradientSync(). Errors were, or
  // would have been, their waiter's.
  ~State() {
    if (config.gradComm != GradientComm::kFp8) return;
    for (Bucket& bucket : buckets) {
      if (!bucket.work) continue;
      try {
        bucket.work->wait();
      } catch (...) {
      }
    }
  }

  void beginStep() {
    stepActive = true;
    nextToLaunch = 0;
    for (Slot& slot : slots) {
      slot.ready = false;
      slot.arrived = 0;
    }
    lastLaunched.clear();
    for (Bucket& bucket : buckets) {
      bucket.pending = static_cast<int>(bucket.slots.size());
      bucket.work.reset();
      bucket.fp8 = {};
      bucket.done = false;
    }
  }

  // Writes (.grad so far + grad) into the slot's slice; grad may be undefined
  // (an unused parameter: its .grad so far, or zeros).
  void fillSlot(Slot& slot, const at::Tensor& grad) {
    at::NoGradGuard noGrad;
    const at::Tensor& local = slot.param.grad();
    if (local.defined()) {
      slot.view.copy_(local);
      if (grad.defined()) slot.view.add_(grad);
    } else if (grad.defined()) {
      slot.view.copy_(grad);
    } else {
      slot.view.zero_();
    }
    slot.ready = true;
    --buckets[slot.bucket].pending;
  }

  // Launches complete buckets in index order; see the file comment for why
  // the order must not depend on which bucket filled first. From
  // finishGradientSync(), `exposed` receives each launch's time by comm.
  void launchReadyBuckets(DdpSyncStats* exposed = nullptr) {
    while (nextToLaunch < buckets.size() && buckets[nextToLaunch].pending == 0) {
      Bucket& bucket = buckets[nextToLaunch];
      bucket.launchedAt = SteadyClock::now();
      // fp32: exactly comm->allReduceAsync(flat, kAvg). fp8: chained behind
      // the comm's previous bucket, so the ring still overlaps backward.
      comm::WorkPtr& previous = lastLaunched[bucket.comm.get()];
      bucket.work =
          allReduceGradientAsync(bucket.comm, bucket.flat, config.gradComm, previous, bucket.scaler.get(), &bucket.fp8);
      previous = bucket.work;
      if (exposed != nullptr) {
        exposed->exposedSecondsByComm[bucket.comm->name()] +=
            std::chrono::duration<double>(SteadyClock::now() - bucket.launchedAt).count();
      }
      ++nextToLaunch;
    }
  }

  // Buckets of different groups complete independently, so every launched
  // bucket is polled.
  void pollCompletions() {
    for (size_t i = 0; i < nextToLaunch; ++i) {
      Bucket& bucket = buckets[i];
      if (bucket.done || !bucket.work->isCompleted()) continue;
      bucket.done = true;
      bucket.doneAt = SteadyClock::now();
    }
  }

  void onGradient(int index, const at::Tensor& grad) {
    std::lock_guard<std::mutex> lock(mutex);
    if (noSyncDepth > 0) return;  // accumulate locally; autograd adds grad into .grad
    if (!stepActive) beginStep();
    Slot& slot = slots[index];
    TESSERA_CHECK_ARG(!slot.ready, "parameter '" << slot.name << "' received gradient " << slot.arrived + 1
                                                 << " but expected " << slot.needed
                                                 << " per synced step before finishGradientSync(); call "
                                                    "finishGradientSync() after every synced step, accumulate "
                                                    "inside ddp.noSync(), or declare the pipeline's arrivals "
                                                    "with setGradientArrivals()");
    // Not the last arrival: autograd adds grad into .grad, the last one sends it all.
    if (++slot.arrived < slot.needed) return;
    fillSlot(slot, grad);
    launchReadyBuckets();
    pollCompletions();
  }

  // Collective: every bucket's parameters take the values of rank 0 of the
  // bucket's communicator.
  void broadcastParameters() {
    at::NoGradGuard noGrad;
    for (Bucket& bucket : buckets) {
      for (int i : bucket.slots) slots[i].view.copy_(slots[i].param);
      bucket.comm->broadcast(bucket.flat, /*root=*/0);
      for (int i : bucket.slots) slots[i].param.copy_(slots[i].view);
    }
  }

  // Collective: each buffer (running statistics, ...) takes the value of rank
  // 0 of the first group that selects its name.
  void broadcastBuffers(const std::vector<NamedParameter>& buffers) {
    at::NoGradGuard noGrad;
    for (const auto& [name, buffer] : buffers) {
      at::Tensor staged = buffer.contiguous();
      groups[groupOf(name, "buffer")].comm->broadcast(staged, /*root=*/0);
      if (!staged.is_same(buffer)) buffer.copy_(staged);
    }
  }

  // The first group that selects `name`; throws InvalidArgument when none does.
  int groupOf(const std::string& name, const char* what) const {
    for (size_t g = 0; g < groups.size(); ++g) {
      if (!groups[g].selects || groups[g].selects(name)) return static_cast<int>(g);
    }
    throw InvalidArgument("DDP: no group selects " + std::string(what) + " '" + name +
                          "'; add a last DdpGroup with an empty `selects` to take every remaining name");
  }

  // Seconds during which at least one bucket was in flight: the union of
  // [launchedAt, doneAt], whose starts are sorted because launch order is
  // bucket order.
  double inFlightSeconds() const {
    double seconds = 0;
    SteadyClock::time_point start{}, end{};
    bool open = false;
    for (const Bucket& bucket : buckets) {
      if (open && bucket.launchedAt <= end) {
        end = std::max(end, bucket.doneAt);
        continue;
      }
      if (open) seconds += std::chrono::duration<double>(end - start).count();
      start = bucket.launchedAt;
      end = bucket.doneAt;
      open = true;
    }
    if (open) seconds += std::chrono::duration<double>(end - start).count();
    return seconds;
  }
};

namespace {

std::vector<DistributedDataParallel::NamedParameter> namedParametersOf(torch::nn::Module& module) {
  std::vector<DistributedDataParallel::NamedParameter> out;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    if (item.value().requires_grad()) out.emplace_back(item.key(), item.value());
  }
  return out;
}

void checkParameter(const std::string& name, const at::Tensor& param) {
  TESSERA_CHECK_ARG(param.defined(), "DDP parameter '" << name << "' is an undefined tensor");
  TESSERA_CHECK_ARG(param.requires_grad() && param.is_leaf(),
                    "DDP parameter '" << name << "' must be a leaf tensor with requires_grad; pass only trainable "
                                      << "parameters");
  TESSERA_CHECK_ARG(param.layout() == at::kStrided,
                    "DDP parameter '" << name << "' has a sparse layout; DDP syncs dense gradients only");
}

// Assigns slots to buckets in reverse registration order; a new bucket starts
// when the group, dtype or device changes or the cap would be exceeded.
std::vector<Bucket> assignBuckets(std::vector<Slot>& slots, const std::vector<DdpGroup>& groups,
                                  int64_t capBytes) {
  std::vector<Bucket> buckets;
  std::vector<int64_t> bytes;
  for (int i = static_cast<int>(slots.size()) - 1; i >= 0; --i) {
    const at::Tensor& param = slots[i].param;
    const int64_t paramBytes = param.numel() * static_cast<int64_t>(param.element_size());
    bool fits = !buckets.empty();
    if (fits) {
      const at::Tensor& first = slots[buckets.back().slots.front()].param;
      fits = slots[buckets.back().slots.front()].group == slots[i].group &&
             first.scalar_type() == param.scalar_type() && first.device() == param.device() &&
             bytes.back() + paramBytes <= capBytes;
    }
    if (!fits) {
      buckets.emplace_back();
      bytes.push_back(0);
    }
    buckets.back().slots.push_back(i);
    bytes.back() += paramBytes;
    slots[i].bucket = static_cast<int>(buckets.size()) - 1;
  }
  for (Bucket& bucket : buckets) {
    const at::Tensor& first = slots[bucket.slots.front()].param;
    bucket.comm = groups[slots[bucket.slots.front()].group].comm;
    bucket.scale = groups[slots[bucket.slots.front()].group].gradientScale;
    int64_t numel = 0;
    for (int i : bucket.slots) numel += slots[i].param.numel();
    bucket.flat = at::zeros({numel}, first.options().requires_grad(false));
    int64_t offset = 0;
    for (int i : bucket.slots) {
      const int64_t n = slots[i].param.numel();
      slots[i].view = bucket.flat.narrow(0, offset, n).view(slots[i].param.sizes());
      offset += n;
    }
  }
  return buckets;
}

std::vector<DdpGroup> oneGroup(comm::CommPtr comm) { return {DdpGroup{std::move(comm), nullptr}}; }

}  // namespace

// The module overload collects the trainable parameters, delegates, then
// broadcasts the buffers too.
DistributedDataParallel::DistributedDataParallel(torch::nn::Module& module, std::vector<DdpGroup> groups,
                                                 DdpConfig config)
    : DistributedDataParallel(namedParametersOf(module), std::move(groups), config) {
  if (!state_->config.broadcastAtConstruction) return;
  std::vector<NamedParameter> buffers;
  for (const auto& item : module.named_buffers(/*recurse=*/true)) buffers.emplace_back(item.key(), item.value());
  state_->broadcastBuffers(buffers);
}

DistributedDataParallel::DistributedDataParallel(std::vector<NamedParameter> parameters,
                                                 std::vector<DdpGroup> groups, DdpConfig config)
    : state_(std::make_shared<State>()) {
  config.validate();
  TESSERA_CHECK_ARG(!groups.empty(), "DDP needs at least one group (a communicator and the parameters it averages)");
  for (size_t g = 0; g < groups.size(); ++g) {
    TESSERA_CHECK_ARG(groups[g].comm != nullptr,
                      "DDP group " << g << " needs a communicator (e.g. the mesh's \"dp\" group), got nullptr");
    TESSERA_CHECK_ARG(std::isfinite(groups[g].gradientScale) && groups[g].gradientScale > 0,
                      "DDP group " << g << " has gradientScale " << groups[g].gradientScale
                                   << "; it must be finite and > 0 (1 / ep for an expert group, else 1)");
  }
  state_->groups = std::move(groups);
  state_->config = config;

  std::unordered_set<const void*> seen;  // a shared (tied) parameter is synced once
  std::vector<int> perGroup(state_->groups.size(), 0);
  for (auto& [name, param] : parameters) {
    checkParameter(name, param);
    checkGradientCommTensor(config.gradComm, param, "DDP parameter '" + name + "'");
    if (!seen.insert(param.unsafeGetTensorImpl()).second) continue;
    Slot slot;
    slot.name = name;
    slot.param = param;
    slot.group = state_->groupOf(name, "parameter");
    ++perGroup[slot.group];
    state_->slots.push_back(std::move(slot));
  }
  for (size_t g = 0; g < perGroup.size(); ++g) {
    TESSERA_CHECK_ARG(perGroup[g] > 0, "DDP group " << g << " (communicator '" << state_->groups[g].comm->name()
                                                    << "') selects no parameter; an earlier group may select "
                                                       "them all, or its `selects` matches no name");
  }
  state_->buckets = assignBuckets(state_->slots, state_->groups, config.bucketCapBytes);
  if (config.gradComm == GradientComm::kFp8 && config.fp8Scaling == Fp8Scaling::kAuto) {
    for (Bucket& bucket : state_->buckets) bucket.scaler = std::make_unique<comm::Fp8AutoScaler>(config.fp8AutoScale);
  }

  // Broadcast before installing hooks, so that a failed broadcast leaves no
  // hooks behind (the copies run under NoGradGuard and fire none anyway).
  // Buffers follow in the module overload.
  if (config.broadcastAtConstruction) state_->broadcastParameters();

  // The hooks hold the state weakly: after this object is gone, a hook that
  // somehow survives removal does nothing.
  std::weak_ptr<State> weak = state_;
  for (size_t i = 0; i < state_->slots.size(); ++i) {
    const int index = static_cast<int>(i);
    state_->slots[i].hookHandle = state_->slots[i].param.register_hook([weak, index](const at::Tensor& grad) {
      if (auto state = weak.lock()) state->onGradient(index, grad);
    });
  }
}

DistributedDataParallel::DistributedDataParallel(torch::nn::Module& module, comm::CommPtr comm, DdpConfig config)
    : DistributedDataParallel(module, oneGroup(std::move(comm)), config) {}

DistributedDataParallel::DistributedDataParallel(std::vector<NamedParameter> parameters, comm::CommPtr comm,
                                                 DdpConfig config)
    : DistributedDataParallel(std::move(parameters), oneGroup(std::move(comm)), config) {}

DistributedDataParallel::~DistributedDataParallel() {
  if (!state_) return;
  for (Slot& slot : state_->slots) slot.param.remove_hook(slot.hookHandle);
}

DistributedDataParallel::DistributedDataParallel(DistributedDataParallel&&) noexcept = default;

DistributedDataParallel& DistributedDataParallel::operator=(DistributedDataParallel&& other) noexcept {
  if (this != &other) {
    DistributedDataParallel dying(std::move(*this));  // removes this object's hooks
    state_ = std::move(other.state_);
  }
  return *this;
}

void DistributedDataParallel::finishGradientSync() {
  TESSERA_CHECK_ARG(state_ != nullptr, "finishGradientSync() on a moved-from DistributedDataParallel");
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.noSyncDepth > 0) return;
  if (!s.stepActive) s.beginStep();
  s.pollCompletions();
  const size_t launchedInBackward = s.nextToLaunch;

  // Unused parameters: mark them ready with what they hold locally, so the
  // remaining buckets launch (in order) on every rank.
  std::vector<std::string> unused;
  for (Slot& slot : s.slots) {
    if (slot.ready) continue;
    unused.push_back(slot.name + (slot.arrived > 0 ? " (" + std::to_string(slot.arrived) + " of " +
                                                         std::to_string(slot.needed) + " gradients)"
                                                   : std::string()));
    s.fillSlot(slot, at::Tensor());  // its .grad holds the arrivals so far
  }
  DdpSyncStats step;
  step.steps = 1;
  step.bucketsLaunchedInBackward = static_cast<int64_t>(launchedInBackward);
  s.launchReadyBuckets(&step);  // the leftover launches are exposed time
  TESSERA_CHECK_EQ(s.nextToLaunch, s.buckets.size());

  for (Bucket& bucket : s.buckets) {
    const std::string& commName = bucket.comm->name();
    double& exposed = step.exposedSecondsByComm[commName];
    if (!bucket.done) {
      const Stopwatch waiting;
      bucket.work->wait();
      bucket.done = true;
      bucket.doneAt = SteadyClock::now();
      exposed += waiting.seconds();
    } else {
      bucket.work->wait();  // done: returns at once, rethrows its error; bf16 widens its result here
    }
    // Scale after the average (never folded into it): at 1.0 the average stays bit-exact.
    if (bucket.scale != 1.0) bucket.flat.mul_(bucket.scale);
    ++step.buckets;
    // What went on the wire per element: the buffer's own size in fp32 mode.
    const int64_t bytes = bucket.flat.numel() * (s.config.gradComm == GradientComm::kFp32
                                                     ? static_cast<int64_t>(bucket.flat.element_size())
                                                     : gradientWireBytes(s.config.gradComm));
    step.bytes += bytes;
    step.bytesByComm[commName] += bytes;
    if (s.config.gradComm == GradientComm::kFp8) step.fp8.count(bucket.fp8);
    if (bucket.scaler) step.fp8.countMu(bucket.scaler->mu());  // updated by the call, before wait() returned
  }
  for (const auto& entry : step.exposedSecondsByComm) step.exposedSeconds += entry.second;
  step.commSeconds = std::max(s.inFlightSeconds(), step.exposedSeconds);

  {
    at::NoGradGuard noGrad;
    for (Slot& slot : s.slots) {
      at::Tensor& grad = slot.param.mutable_grad();
      if (grad.defined()) {
        grad.copy_(slot.view);
      } else {
        grad = slot.view.clone();
      }
    }
  }
  s.stepActive = false;
  s.last = step;
  s.total += step;

  if (!unused.empty() && !s.config.findUnusedParameters) {
    std::ostringstream names;
    for (size_t i = 0; i < unused.size(); ++i) names << (i ? ", " : "") << "'" << unused[i] << "'";
    throw InvalidArgument("DDP: " + std::to_string(unused.size()) +
                          " parameter(s) received no gradient in this step: " + names.str() +
                          ". Their buckets were still all-reduced (with this rank's local .grad or zeros) so "
                          "peers did not hang; set DdpConfig::findUnusedParameters = true if this is expected, "
                          "or exclude frozen parameters from DDP");
  }
}

void DistributedDataParallel::setGradientArrivals(std::function<int(const std::string& name)> arrivals) {
  TESSERA_CHECK_ARG(state_ != nullptr, "setGradientArrivals() on a moved-from DistributedDataParallel");
  std::lock_guard<std::mutex> lock(state_->mutex);
  TESSERA_CHECK_ARG(!state_->stepActive, "setGradientArrivals() during a synced step; call it between steps "
                                         "(after finishGradientSync())");
  std::vector<int> needed;
  for (const Slot& slot : state_->slots) {
    const int n = arrivals ? arrivals(slot.name) : 1;
    TESSERA_CHECK_ARG(n >= 1, "setGradientArrivals: parameter '" << slot.name << "' expects " << n
                                                                 << " gradient arrivals per synced step; need >= 1");
    needed.push_back(n);
  }
  for (size_t i = 0; i < needed.size(); ++i) state_->slots[i].needed = needed[i];
}

DistributedDataParallel::NoSyncGuard DistributedDataParallel::noSync() {
  TESSERA_CHECK_ARG(state_ != nullptr, "noSync() on a moved-from DistributedDataParallel");
  std::lock_guard<std::mutex> lock(state_->mutex);
  TESSERA_CHECK_ARG(!state_->stepActive,
                    "noSync() entered after a synced backward started; call finishGradientSync() first");
  ++state_->noSyncDepth;
  return NoSyncGuard(state_);
}

DistributedDataParallel::NoSyncGuard::NoSyncGuard(std::shared_ptr<DistributedDataParallel::State> state)
    : state_(std::move(state)) {}

DistributedDataParallel::NoSyncGuard::NoSyncGuard(NoSyncGuard&& other) noexcept
    : state_(std::move(other.state_)) {}

DistributedDataParallel::NoSyncGuard::~NoSyncGuard() {
  if (!state_) return;
  std::lock_guard<std::mutex> lock(state_->mutex);
  --state_->noSyncDepth;
}

DdpSyncStats DistributedDataParallel::lastStepStats() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->last;
}

DdpSyncStats DistributedDataParallel::totalStats() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->total;
}

void DistributedDataParallel::resetStats() {
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->last = {};
  state_->total = {};
}

std::vector<std::vector<std::string>> DistributedDataParallel::bucketParameterNames() const {
  std::vector<std::vector<std::string>> out;
  for (const Bucket& bucket : state_->buckets) {
    out.emplace_back();
    for (int i : bucket.slots) out.back().push_back(state_->slots[i].name);
  }
  return out;
}

const std::vector<DdpGroup>& DistributedDataParallel::groups() const { return state_->groups; }

const DdpConfig& DistributedDataParallel::config() const { return state_->config; }

}  // namespace tessera::parallel
