#include "launcher/elastic_train.h"

#include <signal.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <memory>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "launcher/train_job.h"
#include "tessera/checkpoint/checkpoint.h"
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

// --- Checkpoints (see elastic_train.h) ---

// Where the founders' leader publishes which checkpoint the founders load
// ("ok\n<dir>", "ok\n" for none, or "error\n<message>"), in the
// generation's records.
constexpr const char* kResumeKey = "elastic/resume";

// The checkpoint founders start from: the latest in `dir`, else `resume`,
// else none (""). Throws CheckpointError for a `latest` that names nothing.
std::string chooseCheckpoint(const ElasticCheckpoints& checkpoints) {
  namespace fs = std::filesystem;
  const std::string& dir = checkpoints.dir;
  if (!dir.empty() && (fs::exists(fs::path(dir) / "latest") || fs::exists(fs::path(dir) / "index.json"))) {
    return checkpoint::resolveCheckpoint(dir);
  }
  if (!checkpoints.resume.empty()) return checkpoint::resolveCheckpoint(checkpoints.resume);
  return "";
}

// Founder: load the checkpoint the founders' leader chose, through the same
// check-then-restore path a joiner takes with its peer's state
// (checkpoint/training_state.h). Collective over the node (its processes
// agree on success). Throws Error naming the checkpoint when any process of
// the node cannot load it.
void resumeFromCheckpoint(parallel::ElasticMesh& mesh, const ElasticCheckpoints& checkpoints,
                          const checkpoint::TrainingParts& parts, MetricsWriter* metrics) {
  const comm::StorePtr& store = mesh.store();
  if (mesh.identity().localRank == 0 && mesh.committed().members.front() == mesh.identity().memberId()) {
    std::string choice;
    try {
      choice = "ok\n" + chooseCheckpoint(checkpoints);
    } catch (const std::exception& e) {
      choice = std::string("error\n") + e.what();
    }
    store->compareSet(kResumeKey, {}, comm::toBytes(choice));  // the first founder's choice stays
  }
  const std::string choice =
      store->getString(kResumeKey, std::chrono::milliseconds(static_cast<int64_t>(mesh.config().join_timeout_s * 1000)));
  const size_t newline = choice.find('\n');
  const std::string verdict = choice.substr(0, newline);
  const std::string path = newline == std::string::npos ? "" : choice.substr(newline + 1);
  if (verdict != "ok") {
    throw checkpoint::CheckpointError("the job's leader could not pick a checkpoint to resume from: " + path);
  }
  if (path.empty()) {
    if (mesh.identity().localRank == 0) {
      TESSERA_LOG(kInfo) << "no checkpoint in " << (checkpoints.dir.empty() ? std::string("-") : checkpoints.dir)
                         << ": the job starts from step 0";
    }
    return;
  }
  std::exception_ptr failure;
  int64_t step = 0;
  int64_t outerStep = -1;  // a checkpoint of an elastic run records its outer step
  try {
    step = checkpoint::restoreTrainingStateFromCheckpoint(parts, path);
    const auto meta = checkpoint::readIndex(path).meta;
    if (const auto it = meta.find("elastic/outer_step"); it != meta.end()) outerStep = std::stoll(it->second);
  } catch (const checkpoint::CheckpointError& e) {
    failure = std::make_exception_ptr(checkpoint::CheckpointError(
        std::string(e.what()) + " (the leader chose " + path + ": --checkpoint-dir must be storage that every " +
        "node's hosts can read, e.g. a shared filesystem mounted at the same path)"));
  } catch (const std::exception&) {
    failure = std::current_exception();
  }
  at::Tensor failed = at::full({1}, failure ? 1.0f : 0.0f);
  mesh.local()->allReduce(failed, comm::ReduceOp::kMax);  // collective over the node
  if (failure) std::rethrow_exception(failure);
  if (failed.item<float>() > 0) throw Error("another process of this node could not restore " + path + " (see its message)");
  TESSERA_LOG(kInfo) << "resumed from checkpoint " << path << " at step " << step << " (outer step " << outerStep
                     << "), generation " << mesh.generation() << " of the job";
  if (mesh.identity().localRank == 0) {
    std::ostringstream line;
    line << "{\"event\":\"resumed\",\"checkpoint\":" << jsonQuote(path) << ",\"step\":" << step
         << ",\"outer_step\":" << outerStep << ",\"generation\":" << mesh.generation() << ",\"time_s\":" << std::fixed
         << unixSeconds() << "}";
    writeEvent(metrics, line.str());
  }
}

// The leader node's checkpoints after committed outer steps (see elastic_train.h).
class ElasticCheckpointWriter {
 public:
  // `startStep`: the step training starts from (0, or the restored state's:
  // an outer-step boundary); `lastStep`: train.steps.
  ElasticCheckpointWriter(parallel::ElasticMesh& mesh, const ElasticCheckpoints& checkpoints,
                          const checkpoint::TrainingParts& parts, int64_t startStep, int64_t lastStep,
                          MetricsWriter* metrics)
      : mesh_(mesh), checkpoints_(checkpoints), parts_(parts), previous_(startStep), lastStep_(lastStep),
        metrics_(metrics) {}

  // Whether the outer step that ended at inner step `step` is a checkpoint:
  // it crossed a multiple of `every` since the previous outer step, or it is
  // the run's last (the next would pass train.steps). Every node sees the
  // same outer steps, so all agree. Call once per outer step.
  bool due(int64_t step) {
    const int64_t previous = std::exchange(previous_, step);
    if (checkpoints_.dir.empty()) return false;
    if (step + (step - previous) > lastStep_) return true;
    return checkpoints_.every > 0 && step / checkpoints_.every > previous / checkpoints_.every;
  }

  // After the committed outer step that ended at `step`: the leader node
  // saves. Collective over the node (every process of a node reads the same
  // committed decision). A failed save is logged, not thrown: training goes
  // on and the previous checkpoint stays the latest. Throws Evicted when a
  // newer generation of the job exists.
  void afterOuterStep(int64_t step) {
    const parallel::Membership& d = mesh_.committed();
    if (!due(step) || d.members.empty() || d.members.front() != mesh_.identity().memberId()) return;
    // A node taken for dead (its generation re-founded without it) must not
    // write over the new generation's checkpoints. Local rank 0 asks the
    // store; the node follows it.
    float superseded = 0;
    if (mesh_.identity().localRank == 0) {
      try {
        superseded = mesh_.generationSuperseded() ? 1.0f : 0.0f;
      } catch (const StoreError& e) {
        superseded = 2.0f;  // cannot tell: skip this checkpoint
        TESSERA_LOG(kWarn) << "checkpoint of step " << step << " skipped: the store is unreachable (" << e.what() << ")";
      }
    }
    at::Tensor flag = at::full({1}, superseded);
    mesh_.local()->allReduce(flag, comm::ReduceOp::kMax);  // collective over the node
    if (flag.item<float>() == 1.0f) {
      throw parallel::Evicted("generation " + std::to_string(mesh_.generation()) +
                              " of the job was re-founded without this node (it was taken for dead); rejoining");
    }
    if (flag.item<float>() != 0.0f) return;
    try {
      if (!checkpointer_) {
        // Made the first time this node leads at a checkpoint, so a node that
        // never leads never touches the directory (the constructor clears
        // leftovers of crashed saves there). Collective over the node.
        checkpoint::CheckpointOptions options;
        options.dir = checkpoints_.dir;
        options.keep = checkpoints_.keep;
        options.zstdLevel = checkpoints_.level;
        checkpointer_ = std::make_unique<checkpoint::Checkpointer>(options, mesh_.local());
      }
      std::map<std::string, std::string> meta = checkpoints_.meta;
      meta["parallel/world_size"] = std::to_string(mesh_.identity().localSize);
      meta["elastic/outer_step"] = std::to_string(d.outerStep);
      meta["elastic/generation"] = std::to_string(mesh_.generation());
      meta["elastic/members"] = std::to_string(d.members.size());
      checkpointer_->save(step, checkpoint::collectTrainingState(parts_, meta));  // collective over the node
    } catch (const checkpoint::CheckpointError& e) {
      TESSERA_LOG(kWarn) << "checkpoint of step " << step << " not saved: " << e.what();
      return;
    }
    if (mesh_.identity().localRank == 0) {
      std::ostringstream line;
      line << "{\"event\":\"checkpoint\",\"step\":" << step << ",\"outer_step\":" << d.outerStep
           << ",\"dir\":" << jsonQuote(checkpoints_.dir) << ",\"time_s\":" << std::fixed << unixSeconds() << "}";
      writeEvent(metrics_, line.str());
    }
  }

  // At the end: waits for this node's save in flight. Collective over the
  // node. Throws CheckpointError when the last save failed.
  void finish() {
    if (!checkpointer_) return;
    checkpointer_->wait();
    if (mesh_.identity().localRank == 0) {
      TESSERA_LOG(kInfo) << "checkpoint " << checkpointer_->lastCommitted();
    }
  }

 private:
  parallel::ElasticMesh& mesh_;
  const ElasticCheckpoints& checkpoints_;
  checkpoint::TrainingParts parts_;
  int64_t previous_;  // the step of the previous outer step (or the start)
  int64_t lastStep_;
  MetricsWriter* metrics_;
  std::unique_ptr<checkpoint::Checkpointer> checkpointer_;
};

int runNode(TrainJobConfig job, const std::string& metricsPath, const comm::FaultPlan& plan,
            const ElasticCheckpoints& checkpoints) {
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
  elastic.collective = [&mesh](int64_t syncIndex, const optim::ElasticGroupBody& body) {
    mesh.collectiveAcrossNodes(syncIndex, body);
  };
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

  // Checkpoints hold every process's generator row (each restores its own);
  // live recovery keeps the one-peer layout above.
  checkpoint::TrainingParts checkpointParts = parts;
  checkpointParts.rank = identity.localRank;
  checkpointParts.worldSize = identity.localSize;

  if (const auto ticket = mesh.join()) {
    recoverFromPeer(mesh, *ticket, parts, metrics);
  } else if (!checkpoints.dir.empty() || !checkpoints.resume.empty()) {
    resumeFromCheckpoint(mesh, checkpoints, checkpointParts, metrics);
  }
  if (identity.localRank == 0) {
    TESSERA_LOG(kInfo) << "node " << identity.memberId() << " trains from step " << trainer.step() << " of "
                       << job.train.steps << " (" << built->numParameters << " parameters, H = "
                       << job.diloco.inner_steps << ", compression " << job.diloco.compression << ")";
  }

  comm::StepFaults stepFaults(plan, globalRank);
  RecoveryServer server(mesh, parts, metrics);
  ElasticCheckpointWriter checkpointWriter(mesh, checkpoints, checkpointParts, trainer.step(), job.train.steps,
                                           metrics);
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
           << ",\"loss\":" << report.loss << ",\"param_hash\":\"" << hashTensors(built->dp->optimizerParameters())
           << "\",\"time_s\":" << std::fixed << unixSeconds() << "}";
      writeEvent(metrics, line.str());
    }
    server.serveJoiners();
    checkpointWriter.afterOuterStep(report.step);
  });

  const StepReport last = trainer.run();  // collective over the node; outer steps across nodes
  mesh.finished(last.step);
  server.reap(/*all=*/true);
  checkpointWriter.finish();
  if (identity.localRank == 0) {
    TESSERA_LOG(kInfo) << "done: " << last.step << " steps, loss " << last.loss << ", val_loss "
                       << (last.valLoss ? std::to_string(*last.valLoss) : std::string("-"));
  }
  return 0;
}

}  // namespace

int runElasticNode(const TrainJobConfig& job, const std::string& metricsPath, const std::string& faultPlan,
                   const ElasticCheckpoints& checkpoints) {
  try {
    return runNode(job, metricsPath, runFaultPlan(job, faultPlan), checkpoints);
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
