// tessera-run's command line: flags -> RunOptions, validated. Private to the
// launcher. Flag names follow torchrun's, so its users need not relearn them;
// the underscore spellings (--nproc_per_node) are accepted too.
#pragma once

#include <string>
#include <variant>
#include <vector>

#include "tessera/launcher/launch_info.h"

namespace tessera::launcher {

struct Endpoint {
  std::string host;
  int port = 0;
};

// Parses "host:port" or "[v6 address]:port". Throws InvalidArgument naming
// `flag` when the text is not of that form or the port is not 0..65535.
Endpoint parseEndpoint(const std::string& text, const std::string& flag);

struct RunOptions {
  int nprocPerNode = 1;                  // workers started on this node
  int nnodes = 1;                        // nodes in the job, each running one tessera-run (fixed mode)
  int nodeRank = 0;                      // this node's index; node 0 hosts the store
  // Elastic mode (`--nnodes MIN:MAX`, elastic_node.h): nodes come and go
  // between minNodes and maxNodes; nnodes is maxNodes there.
  bool elastic = false;
  int minNodes = 1;
  int maxNodes = 1;
  bool nodeRankGiven = false;            // elastic: --node-rank given (else the store hands out a slot)
  std::string joinTokenFile;             // elastic: the join secret's file (else TESSERA_JOIN_TOKEN_FILE / _TOKEN)
  std::string advertiseHost = "127.0.0.1";  // elastic: the address peers reach this node's workers at
  bool hostStore = false;                // elastic: host the tessera store on the endpoint's port
  std::string rdzvEndpoint;              // "host:port" of node 0's store; alternative to masterAddr/masterPort
  std::string masterAddr = "127.0.0.1";  // host of node 0's store
  int masterPort = kDefaultMasterPort;   // port of node 0's store; 0: any free port (one node only)
  std::string backend = "gloo";          // "gloo": spawn workers here; "mpi": hand them to mpirun
  int maxRestarts = 0;                   // restarts of all workers after a failure (one node, or elastic)
  double gracePeriodSeconds = 5;         // SIGTERM -> SIGKILL delay when stopping workers
  double rdzvTimeoutSeconds = 120;       // nodes > 0: how long to wait for node 0's store
  int tailLines = 20;                    // lines of a failed worker's output repeated in the report
  std::vector<std::string> command;      // the program and its arguments

  // Fixed mode: nnodes * nprocPerNode; elastic: maxNodes * nprocPerNode (RANK = slot * nprocPerNode + local).
  int worldSize() const { return nprocPerNode * nnodes; }
  // Where node 0's store listens: --rdzv-endpoint if given, else --master-addr/--master-port.
  Endpoint storeEndpoint() const;
  // Throws InvalidArgument naming the flag and the accepted values.
  void validate() const;
};

// Parses --nnodes: "N" (fixed) or "MIN:MAX" (elastic) into `options`.
// Throws InvalidArgument naming --nnodes and the accepted forms.
void parseNnodes(const std::string& text, RunOptions& options);

// Parses tessera-run's argv. Returns the validated options, or the exit code
// to return at once: 0 after --help (printed on stdout), 2 after a usage
// error (the problem and the usage printed on stderr). Never throws.
std::variant<RunOptions, int> parseRunOptions(int argc, char** argv);

}  // namespace tessera::launcher
