// Runs a chaos plan: the job's store (a standalone tessera-store, or a
// 3-member etcd cluster with [job] store = "etcd"), one tessera-run launcher per
// node (each in its own process group, output in DIR/node<i>.log), the
// plan's events and soak kills at their times, and a live narration of what
// happens ("[chaos  12.3s] kill node 2") read from the nodes' metrics files.
// Each launcher incarnation k of node i writes DIR/raw/node<i>-<k>.jsonl;
// tessera-train truncates that file when its launcher restarts the workers
// (after an eviction), so the runner copies every complete line it reads to
// DIR/node<i>-<k>.jsonl, which keeps them all. Writes the journal
// DIR/chaos.jsonl (report.h).
//
// Always cleans up: every process it started is killed and, in netns mode,
// the namespaces are removed, whether the run finished, timed out, failed or
// was interrupted (SIGINT/SIGTERM).
#pragma once

#include <string>

#include "bench/chaos/plan.h"

namespace tessera::chaos {

struct RunnerPaths {
  std::string tesseraRun;
  std::string tesseraTrain;
  std::string tesseraStore;
  std::string netnsScript;  // scripts/netns-cluster.sh (netns mode only)
  std::string etcd = "etcd";        // [job] store = "etcd" only (Debian's etcd-server)
  std::string etcdctl = "etcdctl";  // its health check (etcd-client)
};

struct RunnerOptions {
  std::string outDir;
  RunnerPaths paths;
  std::string label;               // printed before every line ("baseline"), "" for none
  // After the first node finished training, how long the others may take
  // before they are stopped (SIGTERM, then SIGKILL).
  double finishGraceSeconds = 60;
};

// Runs `plan` into options.outDir (created; old node files removed). Returns
// the end reason: "finished" (every started node exited, at least one with
// 0), "failed" (every node exited, none with 0), "soak-complete" (a soak
// that stops when its kills are done), "timeout" or "interrupted".
// Throws Error when the store or the network cannot be set up (after
// cleaning up).
std::string runChaos(const ChaosPlan& plan, const RunnerOptions& options);

// train.steps, the tokens one node trains per step (data.batch_size x
// data.seq_len x train.grad_accum x nproc_per_node) and the outer
// all-reduce's bytes per parameter, from the config file with the plan's
// overrides applied.
struct JobShape {
  int64_t steps = 0;
  double tokensPerNodeStep = 0;
  // Bytes per parameter DiLoCo's outer all-reduce sends (diloco.compression:
  // int8 1, none 4; 0 when the config says neither).
  double outerBytesPerParameter = 0;
};
JobShape readJobShape(const ChaosPlan& plan);

}  // namespace tessera::chaos
