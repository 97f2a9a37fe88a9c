#include "launcher/elastic_train.h"

#include <signal.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <sstream>
#include <thread>
#include <vector>

#include "launcher/train_job.h"
#include "tessera/checkpoint/live_recovery.h"
#include "tessera/checkpoint/training_state.h"
#include "tessera/comm/compression.h"
#include "tessera/comm/fault.h"
#include "tessera/core/logging.h"
#include "tessera/core/metrics.h"
#include "tessera/core/timer.h"
#include "tessera/train/trainer.h"
#include "tessera/parallel/elastic.h"

namespace tessera::launcher {
namespace {

// SIGTERM/SIGINT -> a graceful leave. The handler only sets a flag (through
// ElasticMesh::requestLeave, async-signal-safe); the training thread acts on it.
std::atomic<parallel::ElasticMesh*> gMesh{nullptr};

extern "C" void requestLeave(int) {
  if (parallel::ElasticMesh* mesh = gMesh.load()) mesh->requestLeave();
}

class LeaveOnSignal {
 public:
  explicit LeaveOnSignal(parallel::ElasticMesh& mesh) {
    gMesh = &mesh;
    struct sigaction action {};
    action.sa_handler = requestLeave;
    sigemptyset(&action.sa_mask);
    sigaction(SIGTERM, &action, &previousTerm_);
    sigaction(SIGINT, &action, &previousInt_);
  }
  ~LeaveOnSignal() {
    sigaction(SIGTERM, &previousTerm_, nullptr);
    sigaction(SIGINT, &previousInt_, nullptr);
    gMesh = nullptr;
  }

 private:
  struct sigaction previousTerm_ {};
  struct sigaction previousInt_ {};
};

double unixSeconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// xxh64 over the bytes of every tensor, in order: equal on two nodes exactly
// when their parameters are bit-identical.
std::string parameterHash(const std::vector<at::Tensor>& tensors) {
  XXH64_state_t* state = XXH64_createState();
  XXH64_reset(state, 0);
  for (const at::Tensor& t : tensors) {
    const at::Tensor c = t.detach().cpu().contiguous();
    XXH64_update(state, c.data_ptr(), static_cast<size_t>(c.numel()) * c.element_size());
  }
  const XXH64_hash_t hash = XXH64_digest(state);
  XXH64_freeState(state);
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(hash));
  return text;
}

// Rank 0's metrics file also gets the elastic events; without one they go to the log.
void writeEvent(MetricsWriter* metrics, const std::string& line) {
  if (metrics) metrics->writeLine(line);
  TESSERA_LOG(kInfo) << "event " << line;
}

// Sources serve their joiners from snapshots, one StateSender each, while training goes on.
class RecoveryServer {
 public:
  RecoveryServer(parallel::ElasticMesh& mesh, const checkpoint::TrainingParts& parts, MetricsWriter* metrics)
      : mesh_(mesh), parts_(parts), metrics_(metrics) {}

  // After a committed outer step: a snapshot per joiner this process serves.
  // A failure here (port, store) strands that joiner -- it times out and
  // rejoins -- but must not stop this node's training.
  void serveJoiners() {
    reap(false);
    for (const std::string& joiner : mesh_.joinersToServe()) {
      try {
        serve(joiner);
      } catch (const std::exception& e) {
        TESSERA_LOG(kWarn) << "could not serve the training state to " << joiner << ": " << e.what();
      }
    }
  }

  void serve(const std::string& joiner) {
    checkpoint::RecoveryOptions options;
    options.bindHost = mesh_.identity().advertiseHost;
    options.secret = mesh_.secret();
    options.timeout = std::chrono::milliseconds(static_cast<int64_t>(mesh_.config().join_timeout_s * 1000));
    // clone(): the snapshot must not alias the parameters the next inner steps change.
    auto sender = std::make_unique<checkpoint::StateSender>(checkpoint::collectTrainingState(parts_).clone(), options);
    mesh_.publishRecoverySource(joiner, sender->address());
    TESSERA_LOG(kInfo) << "serving the training state of outer step " << mesh_.committed().outerStep << " to "
                       << joiner << " at " << sender->address();
    senders_.push_back({joiner, mesh_.committed().outerStep, std::move(sender)});
  }

  // Reports finished transfers. With `all` (training is over), waits up to
  // a minute for transfers still running, then drops the rest (a joiner that
  // never connected was probably killed).
  void reap(bool all) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(1);
    if (all) {
      while (std::chrono::steady_clock::now() < deadline &&
             std::any_of(senders_.begin(), senders_.end(), [](const Serving& s) { return !s.sender->done(); })) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    }
    for (auto it = senders_.begin(); it != senders_.end();) {
      if (!it->sender->done()) {
        if (!all) {
          ++it;
          continue;
        }
        TESSERA_LOG(kWarn) << "stopped serving " << it->joiner << ": it never took its state";
        it = senders_.erase(it);
        continue;
      }
      try {
        const checkpoint::RecoveryStats stats = it->sender->wait();
        if (mesh_.identity().localRank == 0) {
          std::ostringstream line;
          line << "{\"event\":\"served\",\"to\":" << jsonQuote(it->joiner) << ",\"bytes\":" << stats.bytes
               << ",\"seconds\":" << stats.seconds << ",\"outer_step\":" << it->outerStep
               << ",\"time_s\":" << std::fixed << unixSeconds() << "}";
          writeEvent(metrics_, line.str());
        }
      } catch (const Error& e) {
        TESSERA_LOG(kWarn) << "serving " << it->joiner << " failed: " << e.what();
      }
      it = senders_.erase(it);
    }
  }

 private:
  struct Serving {
    std::string joiner;
    int64_t outerStep;
    std::unique_ptr<checkpoint::StateSender> sender;
  };
  parallel::ElasticMesh& mesh_;
  checkpoint::TrainingParts parts_;
  MetricsWriter* metrics_;
  std::vector<Serving> senders_;
};

// Joiner: receive the state named by the ticket, restore it (checked first:
// a state that does not fit leaves the run untouched), report it.
void recoverFromPeer(parallel::ElasticMesh& mesh, const parallel::RecoveryTicket& ticket,
                     const checkpoint::TrainingParts& parts, MetricsWriter* metrics) {
  checkpoint::RecoveryOptions options;
  options.secret = mesh.secret();
  options.timeout = std::chrono::milliseconds(static_cast<int64_t>(mesh.config().join_timeout_s * 1000));
  checkpoint::RecoveryStats stats;
  StateDict received;
  try {
    received = checkpoint::receiveState(ticket.address, options, &stats);
  } catch (const AuthError&) {
    throw;  // the wrong secret stays wrong: a restart would not help
  } catch (const Error& e) {
    // The source died or the link dropped mid-transfer: register again for a new source.
    throw parallel::Evicted("receiving the state from " + ticket.source + " at " + ticket.address +
                            " failed: " + e.what() + "; rejoining");
  }
  const auto requests = checkpoint::trainingStateRequests(parts, checkpoint::StateSummary::of(received));
  checkpoint::restoreTrainingState(parts, checkpoint::extractRanges(received, requests));
  mesh.recovered(ticket);
  TESSERA_LOG(kInfo) << "recovered the state of outer step " << ticket.outerStep << " from " << ticket.source << ": "
                     << stats.bytes << " bytes in " << stats.seconds << " s";
  if (mesh.identity().localRank == 0) {
    std::ostringstream line;
    line << "{\"event\":\"recovered\",\"from\":" << jsonQuote(ticket.source) << ",\"bytes\":" << stats.bytes
         << ",\"seconds\":" << stats.seconds << ",\"outer_step\":" << ticket.outerStep << ",\"step\":"
         << parts.trainer->step() << ",\"time_s\":" << std::fixed << unixSeconds() << "}";
    writeEvent(metrics, line.str());
  }
}

int runNode(TrainJobConfig job, const std::string& metricsPath, const comm::FaultPlan& plan) {
  const parallel::ElasticIdentity identity = parallel::ElasticIdentity::fromEnv();
  // [parallel] describes one node; a config that leaves the mesh at 1 x 1
  // spreads the node's processes over dp_shard (DDP/FSDP inside the node).
  if (job.parallel.mesh.numRanks() == 1 && identity.localSize > 1) job.parallel.mesh.dp_shard = identity.localSize;
  const int globalRank = identity.slot * identity.localSize + identity.localRank;
  setLogRank(globalRank);
  parallel::ElasticMesh mesh(identity, job.elastic, comm::parseCompression(job.diloco.compression, "diloco.compression"));
  LeaveOnSignal leaveOnSignal(mesh);
  if (!plan.empty()) {
    mesh.wrapGroup = [plan, globalRank](comm::CommPtr group) { return comm::injectFaults(group, plan, globalRank); };
  }

  DistributedContext ctx;
  ctx.info.rank = identity.localRank;
  ctx.info.worldSize = identity.localSize;
  ctx.info.localRank = identity.localRank;
  ctx.info.localWorldSize = identity.localSize;
  ctx.info.nodeRank = identity.slot;
  ctx.info.backend = "gloo";
  ctx.info.launchedBy = "tessera-run";
  ctx.store = mesh.store();
  ctx.world = plan.empty() ? mesh.local() : comm::injectFaults(mesh.local(), plan, globalRank);

  ElasticJobOptions elastic;
  elastic.averager = [&mesh](at::Tensor flat, int64_t outerStep) { mesh.averageAcrossNodes(flat, outerStep); };
  elastic.node = identity.slot;
  elastic.nodes = std::max(identity.maxNodes, identity.slot + 1);
  const std::unique_ptr<TrainJob> built = buildTrainJob(job, ctx, metricsPath, &elastic);  // collective over the node
  // comm_bytes: the node's own groups plus every epoch's elastic group.
  built->parts.traffic.push_back(TrafficSource{"elastic", nullptr, [&mesh] { return mesh.bytesSent(); },
                                               [&mesh] { return mesh.secondsInGroups(); }});
  MetricsWriter* metrics = built->metrics.get();
  mesh.onEvent = [metrics](const std::string& line) { writeEvent(metrics, line); };

  Trainer trainer(built->parts, job.train);
  checkpoint::TrainingParts parts;
  parts.trainer = &trainer;
  parts.model = &built->model->module();
  parts.dp = built->dp;
  parts.optimizer = built->optimizer.get();

  if (const auto ticket = mesh.join()) recoverFromPeer(mesh, *ticket, parts, metrics);
  if (identity.localRank == 0) {
    TESSERA_LOG(kInfo) << "node " << identity.memberId() << " trains from step " << trainer.step() << " of "
                       << job.train.steps << " (" << built->numParameters << " parameters, H = "
                       << job.diloco.inner_steps << ", compression " << job.diloco.compression << ")";
  }

  comm::StepFaults stepFaults(plan, globalRank);
  RecoveryServer server(mesh, parts, metrics);
  Stopwatch stepTimer;
  trainer.callbacks().beforeStep.push_back([&](int64_t step) {
    stepFaults.beforeStep(step);
    if (identity.localSize > 1) {
      // Every process of the node leaves at the same step, or the node's
      // own collectives would be left waiting for the ones that stopped.
      at::Tensor flag = at::full({1}, mesh.leaveRequested() ? 1.0f : 0.0f);
      ctx.world->allReduce(flag, comm::ReduceOp::kMax);
      if (flag.item<float>() > 0) mesh.requestLeave();
    }
    mesh.leaveIfRequested();
    stepTimer.restart();
  });
  trainer.callbacks().afterStep.push_back([&](const StepReport&) { stepFaults.afterStep(stepTimer.seconds()); });
  trainer.callbacks().afterOuterStep.push_back([&](const StepReport& report) {
    if (identity.localRank == 0) {
      const parallel::Membership& d = mesh.committed();
      std::ostringstream line;
      line << "{\"event\":\"outer_step\",\"step\":" << report.step << ",\"outer_step\":" << d.outerStep
           << ",\"epoch\":" << d.epoch << ",\"members\":" << d.members.size() << ",\"attempts\":" << mesh.lastAttempts()
           << ",\"loss\":" << report.loss << ",\"param_hash\":\"" << parameterHash(built->dp->optimizerParameters())
           << "\",\"time_s\":" << std::fixed << unixSeconds() << "}";
      writeEvent(metrics, line.str());
    }
    server.serveJoiners();
  });

  const StepReport last = trainer.run();  // collective over the node; outer steps across nodes
  server.reap(/*all=*/true);
  if (identity.localRank == 0) {
    TESSERA_LOG(kInfo) << "done: " << last.step << " steps, loss " << last.loss << ", val_loss "
                       << (last.valLoss ? std::to_string(*last.valLoss) : std::string("-"));
  }
  return 0;
}

}  // namespace

int runElasticNode(const TrainJobConfig& job, const std::string& metricsPath, const std::string& faultPlan) {
  try {
    return runNode(job, metricsPath, runFaultPlan(job, faultPlan));
  } catch (const parallel::LeftJob& e) {
    TESSERA_LOG(kInfo) << e.what();
    return 0;
  } catch (const parallel::Evicted& e) {
    TESSERA_LOG(kWarn) << e.what();
    return parallel::kExitEvicted;
  } catch (const ConfigError& e) {
    std::fprintf(stderr, "tessera-train: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tessera-train: %s\n", e.what());
    return 1;
  }
}

}  // namespace tessera::launcher
