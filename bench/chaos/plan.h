// A chaos experiment as data: which elastic job to run, on what network, and
// what goes wrong when. Read from a TOML plan file (examples/chaos/*.toml):
//
//   [job]
//   config = "examples/configs/gpt-tiny.toml"  # tessera-train TOML; relative: to the current
//                                              # directory, else to the plan's directory or its parents
//   steps = 200                  # train.steps (0: the config's)
//   overrides = ["optim.name=\"diloco\"", "diloco.inner_steps=10"]  # --set for every node
//   nodes = 3                    # started at once (slots 0..nodes-1)
//   min_nodes = 2                # tessera-run --nnodes MIN:MAX
//   max_nodes = 4                # 0: no limit
//   nproc_per_node = 1
//   join_token = true            # write a token file with a random secret, pass it to the store and nodes
//   timeout_s = 600              # the whole run; then everything is killed
//   seed = 1                     # soak draws (train seeds come from the config)
//   store = "tessera"            # the rendezvous store: "tessera" (a standalone tessera-store) or
//                                # "etcd" (a 3-member etcd cluster on loopback -- in the hub
//                                # namespace under netns -- passed as --rdzv-backend etcd)
//   max_restarts = 1000          # tessera-run --max-restarts: a launcher restarts its workers
//                                # after they fail (kill_workers) up to this often
//   heartbeat_interval_s = 1     # these five become --set elastic.<key>=<value>
//   heartbeat_timeout_s = 5
//   wait_timeout_s, collective_timeout_s, join_timeout_s, start_grace_s, max_retries
//   [elastic]                    # any other elastic.* key, passed through as --set
//   [[node]]                     # per-node extras
//   index = 1
//   fault = "slow:rank=1,factor=2"   # tessera-train --fault (comm/fault.h)
//
//   [network]
//   mode = "loopback"            # "loopback", "netns" (root only) or "auto" (netns when root)
//   rate = "100mbit"             # netns: tbf on every host link (tc units); ignored when
//                                # "auto" falls back to loopback
//
//   [[event]]                    # at_s (seconds since the start) or at_step (the first node's
//   at_s = 20                    # metrics reach that step)
//   action = "kill"              # kill | kill_workers | restart | join | leave | partition | heal | throttle
//   node = 2
//   rate = "10mbit"              # throttle only ("off" removes the limit)
//
//   [soak]                       # random failures on top of the events
//   kills = 50                   # SIGKILLs of random running nodes, never leaving fewer than
//                                # min_nodes members of the latest decision (state holders)
//   kinds = ["workers", "node"]  # what a kill hits, drawn per kill: "node" = the launcher and its
//                                # workers (a silent loss; restarted after restart_after_s),
//                                # "workers" = only the workers (the launcher sees them die,
//                                # marks them dead and restarts them); default ["node"]
//   weights = [1, 1]             # relative odds of the kinds (default: equal)
//   mtbf_s = 10                  # mean seconds between kills (exponential)
//   restart_after_s = 5          # each killed node restarts this long after its kill
//   start_after_s = 10           # no kill before this
//   stop_when_done = true        # end the run settle_s after the last restart
//   settle_s = 30                #   (else it runs until train.steps)
//
// Actions: kill = SIGKILL the node's launcher and its workers (netns: every
// process in the host); kill_workers = SIGKILL only the node's worker
// processes (tessera-train), its launcher lives on, writes their dead mark and
// restarts them (a new incarnation that rejoins through live recovery); restart = start the node's launcher again in the same
// slot (it rejoins through live recovery); join = start a slot never started
// before (an extra node, up to max_nodes); leave = SIGTERM (graceful leave);
// partition / heal = the host's link down / up and throttle = change its rate
// (netns only). A slow node is not an event: give it a `fault` at start.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace tessera::chaos {

struct ChaosEvent {
  double atSeconds = -1;  // >= 0: fires this long after the start
  int64_t atStep = -1;    // >= 0: fires when any node's metrics reach this step
  std::string action;     // see the header comment
  int node = 0;
  std::string rate;       // throttle

  std::string describe() const;  // "kill node 2 at 20 s"
};

struct SoakPlan {
  int kills = 0;                    // 0: no soak
  double mtbfSeconds = 10;
  double restartAfterSeconds = 5;
  double startAfterSeconds = 0;
  std::vector<std::string> kinds = {"node"};  // "node" | "workers"
  std::vector<double> weights;                // one per kind (empty: equal)
  // Stop the job (and report) once every kill is done and its node restarted
  // plus settle_s, instead of waiting for train.steps.
  bool stopWhenDone = true;
  double settleSeconds = 30;
};

struct ChaosPlan {
  std::string path;                  // the plan file
  // [job]
  std::string config;                // resolved path of the tessera-train TOML
  int64_t steps = 0;                 // 0: the config's train.steps
  std::vector<std::string> overrides;
  int nodes = 2;
  int minNodes = 1;
  int maxNodes = 0;
  int nprocPerNode = 1;
  bool joinToken = true;
  std::string store = "tessera";     // "tessera" | "etcd"
  int maxRestarts = 1000;            // tessera-run --max-restarts
  double timeoutSeconds = 900;
  uint64_t seed = 1;
  std::map<std::string, std::string> elastic;  // key -> TOML value text, passed as --set elastic.key=value
  std::map<int, std::string> nodeFaults;       // slot -> --fault spec
  // [network]
  std::string network = "loopback";  // after resolve: "loopback" or "netns"
  std::string rate;                  // "" : no limit
  std::vector<ChaosEvent> events;    // in plan order
  SoakPlan soak;

  // Highest slot any event or the initial set uses, + 1.
  int slotsUsed() const;
  // The same job without events, soak or node faults: the no-fault baseline.
  ChaosPlan withoutFaults() const;
};

// Reads and validates a plan. `network` "auto" becomes netns when running as
// root, else loopback. Throws ConfigError naming the field and the fix
// (e.g. a partition in loopback mode, an unknown action, a node out of range).
ChaosPlan loadChaosPlan(const std::string& path);
// The same from text; `baseDir` resolves a relative [job].config.
ChaosPlan parseChaosPlan(const std::string& text, const std::string& baseDir, const std::string& name, bool isRoot);

// tc rate text ("100mbit", "1gbit", "500kbit", "10mbps" = bytes) -> bits per
// second. Throws InvalidArgument for anything else.
double parseRateBitsPerSecond(const std::string& rate);

}  // namespace tessera::chaos
