// The pipeline executor: runs one rank's action list (see executor.h).
#include "tessera/parallel/pipeline/executor.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/nn/module.h>

#include <map>
#include <utility>

#include "tessera/core/error.h"
#include "tessera/core/logging.h"
#include "tessera/core/models/weight_grad_store.h"
#include "tessera/core/timer.h"
#include "tessera/parallel/pipeline/offload.h"

namespace tessera::parallel::pipeline {
namespace {

// Message tags: (what, chunk, micro-batch), unique within a step; a step's
// messages on one (peer, tag) pair arrive in order, so steps reuse them.
enum class Channel : int { kActivation = 0, kGrad = 1, kEval = 2, kProbe = 3 };

int tagOf(Channel channel, int chunk, int microBatch, int chunks, int microBatches) {
  return (static_cast<int>(channel) * chunks + chunk) * microBatches + microBatch;
}

// The store key of (chunk, micro-batch).
int64_t keyOf(int chunk, int microBatch, int microBatches) {
  return static_cast<int64_t>(chunk) * microBatches + microBatch;
}

bool isCompute(ActionKind kind) {
  return kind == ActionKind::kForward || kind == ActionKind::kBackwardInput || kind == ActionKind::kBackwardWeight ||
         kind == ActionKind::kBackward;
}

class Executor final : public PipelineExecutor {
 public:
  Executor(StageModel& stage, DataParallel& dp, comm::CommPtr pp, PipelineSchedule schedule, ExecutorOptions options)
      : stage_(stage), dp_(dp), pp_(std::move(pp)), options_(options),
        store_(std::make_shared<models::QueuedWeightGradStore>()) {
    if (options_.offload != "none" || options_.measureActivations) {
      ActivationPool::Options pool;
      pool.policy = options_.offload;
      pool.budgetBytes = options_.offloadBudgetBytes;
      pool.parameters = stage_.module().parameters();
      pool_ = std::make_unique<ActivationPool>(std::move(pool));
    }
    setSchedule(std::move(schedule));
    models::setDeferredWeightGradients(stage_.module(), store_);
  }

  ~Executor() override {
    try {
      models::setDeferredWeightGradients(stage_.module(), nullptr);
    } catch (...) {
    }
  }

  void setSchedule(PipelineSchedule schedule) override {
    TESSERA_CHECK_ARG(schedule.stages == pp_->size(), "pipeline schedule '" << schedule.name << "' has "
                                                          << schedule.stages << " stages but the pp group has "
                                                          << pp_->size() << " ranks");
    TESSERA_CHECK_ARG(schedule.microBatches == options_.microBatches,
                      "pipeline schedule '" << schedule.name << "' has " << schedule.microBatches
                                            << " micro-batches, the executor " << options_.microBatches);
    base_ = std::move(schedule);
    schedule_ = base_;
    // Offload actions: "all" at once; "selective" once a micro-batch's bytes are known (after step 1).
    if (options_.offload == "all") schedule_ = withOffload(base_, "all", 0);
    if (options_.offload == "selective" && bytesPerMicroBatch_ > 0) {
      schedule_ = withOffload(base_, "selective", options_.offloadBudgetBytes / bytesPerMicroBatch_);
    }
    chunks_ = static_cast<int>(schedule_.chunkOwner.size());
    const int M = options_.microBatches;
    // Each chunk pass that uses a parameter delivers its gradient once per micro-batch.
    dp_.setGradientArrivals([this, M](const std::string& name) { return M * std::max(1, stage_.chunkUses(name)); });
  }

  const PipelineSchedule& schedule() const override { return schedule_; }

  std::optional<double> forwardBackward(const std::vector<Batch>& batches, int64_t step) override {
    TESSERA_CHECK_ARG(!batches.empty(), "pipeline step: a step needs at least one batch");
    const auto k = static_cast<int>(batches.size());
    if (options_.autoScheduleAfter > 0 && stepsRun_ == options_.autoScheduleAfter) switchToAuto();
    if (options_.offload == "selective" && stepsRun_ == 1 && bytesPerMicroBatch_ > 0) setSchedule(base_);
    if (pool_) pool_->resetPeak();
    ++stepsRun_;
    double lossSum = 0;
    double auxSum = 0;  // this rank's non-last chunks' weighted aux losses, every (g, m)
    bool hasLoss = false;
    for (int g = 0; g < k; ++g) {
      auto guard = g + 1 < k ? dp_.noSync() : nullptr;  // only the last pipeline step synchronizes
      const std::optional<double> loss = runPipelineStep(batches[static_cast<size_t>(g)], step, g, k, auxSum);
      if (loss) {
        lossSum += *loss;
        hasLoss = true;
      }
    }
    // The other chunks' aux reach the loss: the reported value is pp = 1's
    // mean over the k * M forwards of (ce + weight * every block's aux).
    const double aux = sumAuxOverStages(auxSum) / (static_cast<double>(k) * options_.microBatches);
    if (!hasLoss) return std::nullopt;
    return lossSum / static_cast<double>(k) + aux;
  }

  std::optional<double> evaluate(const Batch& batch) override {
    torch::NoGradGuard noGrad;
    const int rank = pp_->rank();
    std::vector<int64_t> shape = stage_.activationShape(batch);
    at::Tensor x;
    std::optional<double> loss;
    double auxSum = 0;  // this rank's non-last chunks' weighted aux losses
    for (int c = 0; c < chunks_; ++c) {
      if (!holds(c)) continue;
      if (c > 0 && owner(c - 1) != rank) {
        x = at::empty(shape, at::TensorOptions().dtype(stage_.activationDtype()));
        pp_->recv(x, owner(c - 1), tagOf(Channel::kEval, c, 0, chunks_, options_.microBatches));
      }
      dp_.beforeForward();
      at::Tensor aux;
      at::Tensor out = stage_.forward(c, x, batch, &aux);
      if (aux.defined()) auxSum += aux.item<double>();
      if (c + 1 == chunks_) {
        loss = out.item<double>();
      } else if (owner(c + 1) != rank) {
        pp_->send(out.contiguous(), owner(c + 1), tagOf(Channel::kEval, c + 1, 0, chunks_, options_.microBatches));
      } else {
        x = out;
      }
    }
    const double aux = sumAuxOverStages(auxSum);
    if (loss) *loss += aux;
    return loss;
  }

  bool hasLoss() const override { return holds(chunks_ - 1); }

  const std::vector<TimedAction>& timeline() const override { return timeline_; }
  std::chrono::steady_clock::time_point timelineOrigin() const override { return origin_; }
  int64_t peakActivationBytes() const override { return pool_ ? pool_->peakResidentBytes() : -1; }
  void setSynchronousOffload(bool on) override { synchronousOffload_ = on; }
  void resetMeasurements() override { forward_ = backwardInput_ = backwardWeight_ = fused_ = recvWait_ = Sum{}; }

  PipelineCosts measuredCosts() const override {
    PipelineCosts costs;
    // Costs are a whole stage's (schedule.h): a chunk pass times the chunks per rank.
    const double v = schedule_.chunksPerRank;
    auto mean = [v](const Sum& s) { return s.count > 0 ? v * s.seconds / static_cast<double>(s.count) : 0.0; };
    costs.f = mean(forward_);
    costs.b = mean(backwardInput_);
    costs.w = mean(backwardWeight_);
    if (fused_.count > 0 && costs.b + costs.w == 0) {
      costs.b = mean(fused_);  // never ran apart: all of it counted as B
    }
    costs.comm = transferSeconds_;
    return costs;
  }

 private:
  struct Sum {
    double seconds = 0;
    int64_t count = 0;
    void add(double s) {
      seconds += s;
      ++count;
    }
  };

  // What a (chunk, micro-batch) keeps from F to B.
  struct Saved {
    at::Tensor input;   // the received / handed-over activation (requires grad), undefined for chunk 0
    at::Tensor output;  // the activation, or the scaled loss on the last chunk
    at::Tensor aux;     // a non-last chunk's weighted MoE aux loss, scaled like the loss; undefined without
  };

  // Collective over pp when the stage has aux losses (StageModel::
  // hasAuxLoss, the same on every pp rank), else local and 0: the sum over
  // the pp ranks of `local`, each rank's non-last chunks' aux values. One
  // tiny all-reduce per step (or evaluation), at its end, in the same order
  // on every pp rank; the last chunk's owner adds it to the loss it reports.
  double sumAuxOverStages(double local) {
    if (!stage_.hasAuxLoss()) return 0;
    at::Tensor sum = at::tensor({local}, at::kDouble);
    pp_->allReduce(sum, comm::ReduceOp::kSum);
    return sum.item<double>();
  }

  struct Pending {
    at::Tensor tensor;
    comm::WorkPtr work;
  };

  double measureTransfer() override {
    TESSERA_CHECK_ARG(!lastShape_.empty(), "pipeline: measureTransfer() needs a step run first");
    at::Tensor result = at::zeros({1}, at::kDouble);
    const int rank = pp_->rank();
    if (rank < 2) {
      at::Tensor buffer = at::zeros(lastShape_, at::TensorOptions().dtype(stage_.activationDtype()));
      const int peer = 1 - rank;
      const int tag = tagOf(Channel::kProbe, 0, 0, chunks_, options_.microBatches);
      double best = 0;
      for (int round = 0; round < 6; ++round) {  // round 0 warms the connection up
        const Stopwatch trip;
        if (rank == 0) {
          pp_->send(buffer, peer, tag);
          pp_->recv(buffer, peer, tag);
        } else {
          pp_->recv(buffer, peer, tag);
          pp_->send(buffer, peer, tag);
        }
        const double seconds = trip.seconds();
        if (round == 1 || (round > 1 && seconds < best)) best = seconds;
      }
      result[0] = best / 2;
    }
    pp_->allReduce(result, comm::ReduceOp::kMax);
    transferSeconds_ = result.item<double>();
    return transferSeconds_;
  }

  // The `auto` schedule from the costs measured so far (ExecutorOptions).
  void switchToAuto() {
    measureTransfer();  // collective over pp
    const PipelineCosts mine = measuredCosts();
    at::Tensor costs = at::tensor({mine.f, mine.b, mine.w, mine.comm}, at::kDouble);
    pp_->allReduce(costs, comm::ReduceOp::kMax);  // collective over pp: every stage builds the same schedule
    PipelineCosts measured;
    measured.f = costs[0].item<double>();
    measured.b = costs[1].item<double>();
    measured.w = costs[2].item<double>();
    measured.comm = costs[3].item<double>();
    PipelineSchedule next = withCommunication(
        makeSchedule("auto", schedule_.stages, options_.microBatches, 1, measured));
    const Simulation predicted = simulate(next, measured);
    if (pp_->rank() == 0) {
      TESSERA_LOG(kInfo) << "pipeline: auto schedule from measured costs F " << measured.f * 1e3 << " ms, B "
                         << measured.b * 1e3 << " ms, W " << measured.w * 1e3 << " ms, comm "
                         << measured.comm * 1e3 << " ms: simulated bubble " << predicted.bubbleRate;
    }
    setSchedule(std::move(next));
  }

  int owner(int chunk) const { return schedule_.chunkOwner[static_cast<size_t>(chunk)]; }
  bool holds(int chunk) const { return owner(chunk) == pp_->rank(); }

  // One pipeline step: batch g of k. Returns the mean loss over its
  // micro-batches on the last chunk's owner; adds this rank's non-last
  // chunks' weighted aux losses (unscaled, detached) to auxSum.
  std::optional<double> runPipelineStep(const Batch& batch, int64_t step, int g, int k, double& auxSum) {
    const int M = options_.microBatches;
    const int64_t rows = batch.inputs.size(0);
    TESSERA_CHECK_CONFIG(rows % M == 0, "pipeline.microbatches",
                         "the per-rank batch of " << rows << " rows does not split into " << M
                                                  << " equal micro-batches (set data.batch_size to a multiple of "
                                                  << M << ")");
    const int64_t b = rows / M;
    std::vector<Batch> micro(static_cast<size_t>(M));
    for (int m = 0; m < M; ++m) {
      Batch& mb = micro[static_cast<size_t>(m)];
      mb.inputs = batch.inputs.narrow(0, m * b, b);
      mb.targets = batch.targets.narrow(0, m * b, b);
      mb.tokens = batch.tokens / M;
    }
    const std::vector<int64_t> shape = stage_.activationShape(micro.front());
    lastShape_ = shape;
    const auto dtype = at::TensorOptions().dtype(stage_.activationDtype());
    const double lossScale = 1.0 / (static_cast<double>(k) * M);

    std::map<int64_t, Saved> saved;                // (chunk, m) -> F's tensors
    std::map<int64_t, at::Tensor> handedActivation;  // input of (chunk, m) from a chunk on this rank
    std::map<int64_t, at::Tensor> handedGrad;        // output gradient of (chunk, m) from a chunk on this rank
    std::map<int64_t, at::Tensor> inputGrads;        // (chunk, m) -> gradient of its input, for the send
    std::map<int64_t, Pending> activationRecvs, gradRecvs;
    std::vector<Pending> sends;
    double lossSum = 0;
    bool hasLoss = false;

    timeline_.clear();
    origin_ = std::chrono::steady_clock::now();
    const Stopwatch clock;
    for (const Action& a : schedule_.actions[static_cast<size_t>(pp_->rank())]) {
      const int64_t key = keyOf(a.chunk, a.microBatch, M);
      const Batch& mb = micro[static_cast<size_t>(a.microBatch)];
      // A compute action's time starts once its input is here: waiting for a
      // receive is the pipeline's bubble (recvWait_), not the action's cost.
      double start = clock.seconds();
      switch (a.kind) {
        case ActionKind::kRecvActivation: {
          Pending p{at::empty(shape, dtype), nullptr};
          p.work = pp_->recvAsync(p.tensor, a.peer, tagOf(Channel::kActivation, a.chunk, a.microBatch, chunks_, M));
          activationRecvs[key] = std::move(p);
          continue;
        }
        case ActionKind::kRecvGrad: {
          Pending p{at::empty(shape, dtype), nullptr};
          p.work = pp_->recvAsync(p.tensor, a.peer, tagOf(Channel::kGrad, a.chunk, a.microBatch, chunks_, M));
          gradRecvs[key] = std::move(p);
          continue;
        }
        case ActionKind::kSendActivation: {
          const at::Tensor out = saved.at(key).output.detach().contiguous();
          sends.push_back({out, pp_->sendAsync(out, a.peer,
                                               tagOf(Channel::kActivation, a.chunk + 1, a.microBatch, chunks_, M))});
          continue;
        }
        case ActionKind::kSendGrad: {
          auto it = inputGrads.find(key);
          TESSERA_CHECK(it != inputGrads.end(), "pipeline: no input gradient of chunk " << a.chunk << " micro-batch "
                                                                                         << a.microBatch << " to send");
          sends.push_back({it->second, pp_->sendAsync(it->second, a.peer,
                                                      tagOf(Channel::kGrad, a.chunk - 1, a.microBatch, chunks_, M))});
          inputGrads.erase(it);
          continue;
        }
        case ActionKind::kOffload:
          pool_->offload(key);  // asynchronous: the copy thread moves them while compute goes on
          if (synchronousOffload_) pool_->waitIdle();
          continue;
        case ActionKind::kReload:
          pool_->reload(key);
          continue;
        case ActionKind::kForward: {
          Saved s;
          if (a.chunk > 0) {
            s.input = takeInput(a.chunk, key, handedActivation, activationRecvs).requires_grad_();
          }
          start = clock.seconds();
          dp_.beforeForward();
          stage_.setRandomKey(step, (static_cast<int64_t>(options_.dataRank) * k + g) * M + a.microBatch);
          // Everything autograd saves in this F belongs to (c, m) in the activation pool.
          const int64_t residentBefore = pool_ ? pool_->residentBytes() : 0;
          std::unique_ptr<ActivationPool::Capture> capture = pool_ ? pool_->capture(key) : nullptr;
          at::Tensor aux;
          at::Tensor out = stage_.forward(a.chunk, s.input, mb, &aux);
          if (a.chunk + 1 == chunks_) s.output = out * lossScale;
          // A non-last chunk's MoE term of the objective: scaled like the loss, backpropagated with
          // the activation.
          if (aux.defined()) {
            auxSum += aux.item<double>();
            if (aux.requires_grad()) s.aux = aux * lossScale;
          }
          capture.reset();
          if (pool_ && bytesPerMicroBatch_ == 0) {
            // A stage's micro-batch: this chunk pass's bytes times the chunks per rank.
            bytesPerMicroBatch_ = static_cast<double>(pool_->residentBytes() - residentBefore) * schedule_.chunksPerRank;
          }
          if (a.chunk + 1 == chunks_) {
            lossSum += out.item<double>();
            hasLoss = true;
          } else {
            s.output = out;
            if (holds(a.chunk + 1)) {
              handedActivation[keyOf(a.chunk + 1, a.microBatch, M)] = out.detach();
            }
          }
          saved[key] = std::move(s);
          forward_.add(clock.seconds() - start);
          break;
        }
        case ActionKind::kBackwardInput:
        case ActionKind::kBackward: {
          auto it = saved.find(key);
          TESSERA_CHECK(it != saved.end(), "pipeline: B of chunk " << a.chunk << " micro-batch " << a.microBatch
                                                                    << " before its F");
          Saved s = std::move(it->second);
          saved.erase(it);
          const at::Tensor grad =
              a.chunk + 1 == chunks_ ? at::Tensor() : takeGrad(a.chunk, key, handedGrad, gradRecvs);
          start = clock.seconds();
          // FSDP recomputes a unit in B: it must draw the forward's dropout masks.
          stage_.setRandomKey(step, (static_cast<int64_t>(options_.dataRank) * k + g) * M + a.microBatch);
          store_->setKey(key);
          if (a.chunk + 1 == chunks_) {
            torch::autograd::backward({s.output});
          } else if (s.aux.defined()) {
            // One backward for both roots: every node (the router's deferred W included) runs once.
            torch::autograd::backward({s.output, s.aux}, {grad, at::ones_like(s.aux)});
          } else {
            torch::autograd::backward({s.output}, {grad});
          }
          if (a.chunk > 0) {
            at::Tensor inputGrad = s.input.grad();
            TESSERA_CHECK(inputGrad.defined(), "pipeline: chunk " << a.chunk << " produced no input gradient");
            if (holds(a.chunk - 1)) {
              handedGrad[keyOf(a.chunk - 1, a.microBatch, M)] = inputGrad;
            } else {
              inputGrads[key] = inputGrad.contiguous();
            }
          }
          if (pool_) pool_->release(key);
          if (a.kind == ActionKind::kBackward) {
            store_->drain(key);
            fused_.add(clock.seconds() - start);
          } else {
            backwardInput_.add(clock.seconds() - start);
          }
          break;
        }
        case ActionKind::kBackwardWeight:
          store_->drain(key);
          backwardWeight_.add(clock.seconds() - start);
          break;
      }
      if (isCompute(a.kind)) timeline_.push_back(TimedAction{a, start, clock.seconds()});
    }
    for (Pending& send : sends) send.work->wait();
    TESSERA_CHECK(saved.empty() && store_->pending() == 0,
                  "pipeline schedule '" << schedule_.name << "' left " << saved.size()
                                        << " forwards without backward and " << store_->pending()
                                        << " deferred weight gradients on rank " << pp_->rank());
    if (!hasLoss) return std::nullopt;
    return lossSum / M;
  }

  // The input of F(chunk, m): handed over by chunk - 1 on this rank, or received.
  at::Tensor takeInput(int chunk, int64_t key, std::map<int64_t, at::Tensor>& handed,
                       std::map<int64_t, Pending>& recvs) {
    if (holds(chunk - 1)) {
      auto it = handed.find(key);
      TESSERA_CHECK(it != handed.end(), "pipeline: F of chunk " << chunk << " before chunk " << chunk - 1);
      at::Tensor x = it->second;
      handed.erase(it);
      return x;
    }
    return waitFor(recvs, key, "activation", chunk);
  }

  // The output gradient of B(chunk, m): handed over by chunk + 1 on this rank, or received.
  at::Tensor takeGrad(int chunk, int64_t key, std::map<int64_t, at::Tensor>& handed,
                      std::map<int64_t, Pending>& recvs) {
    if (holds(chunk + 1)) {
      auto it = handed.find(key);
      TESSERA_CHECK(it != handed.end(), "pipeline: B of chunk " << chunk << " before chunk " << chunk + 1);
      at::Tensor grad = it->second;
      handed.erase(it);
      return grad;
    }
    return waitFor(recvs, key, "gradient", chunk);
  }

  at::Tensor waitFor(std::map<int64_t, Pending>& recvs, int64_t key, const char* what, int chunk) {
    auto it = recvs.find(key);
    TESSERA_CHECK(it != recvs.end(), "pipeline schedule '" << schedule_.name << "' consumes the " << what
                                                           << " of chunk " << chunk << " without receiving it");
    const Stopwatch waited;
    it->second.work->wait();
    recvWait_.add(waited.seconds());
    at::Tensor t = it->second.tensor;
    recvs.erase(it);
    return t;
  }

  StageModel& stage_;
  DataParallel& dp_;
  comm::CommPtr pp_;
  ExecutorOptions options_;
  std::shared_ptr<models::QueuedWeightGradStore> store_;
  PipelineSchedule base_;      // the schedule as given (setSchedule)
  PipelineSchedule schedule_;  // base_ with the offload actions, the one run
  std::unique_ptr<ActivationPool> pool_;  // with offload or measureActivations
  double bytesPerMicroBatch_ = 0;         // saved activation bytes of one micro-batch through the stage
  bool synchronousOffload_ = false;       // setSynchronousOffload
  int chunks_ = 1;
  int64_t stepsRun_ = 0;
  std::vector<TimedAction> timeline_;
  std::chrono::steady_clock::time_point origin_;
  Sum forward_, backwardInput_, backwardWeight_, fused_, recvWait_;
  std::vector<int64_t> lastShape_;  // the last step's activation shape (measureTransfer)
  double transferSeconds_ = 0;      // the last measureTransfer()
};

}  // namespace

std::unique_ptr<PipelineExecutor> makePipelineExecutor(StageModel& stage, DataParallel& dp, comm::CommPtr ppComm,
                                                       PipelineSchedule schedule, ExecutorOptions options) {
  TESSERA_CHECK_ARG(ppComm != nullptr, "makePipelineExecutor needs the pp communicator");
  TESSERA_CHECK_ARG(options.microBatches >= 1, "pipeline.microbatches must be >= 1, got " << options.microBatches);
  return std::make_unique<Executor>(stage, dp, std::move(ppComm), std::move(schedule), options);
}

}  // namespace tessera::parallel::pipeline
