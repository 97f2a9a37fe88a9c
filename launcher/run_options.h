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
  // Elastic: the job's rendezvous store (comm/rendezvous.h), torchrun's flag names.
  std::string rdzvBackend = "tessera";   // "tessera": a tessera store (one host:port); "etcd": an etcd v3 cluster
  std::string rdzvId;                    // the run id: keys every record of the job ("" : none)
  std::string etcdUser;                  // etcd auth: --rdzv-conf user=, else TESSERA_ETCD_USER ("" : no auth)
  std::string etcdPasswordFile;          // etcd auth: --rdzv-conf password_file=, else TESSERA_ETCD_PASSWORD_FILE
  // "host:port" of node 0's store (etcd: "h1:2379,h2:2379,..."); alternative to masterAddr/masterPort.
  std::string rdzvEndpoint;
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
  // (etcd: the first of the list.)
  Endpoint storeEndpoint() const;
  // --rdzv-endpoint as a list (one entry for the tessera backend). Throws
  // InvalidArgument naming the flag for an entry that is not host:port.
  std::vector<Endpoint> rdzvEndpoints() const;
  // Throws InvalidArgument naming the flag and the accepted values.
  void validate() const;
};

// Parses --nnodes: "N" (fixed) or "MIN:MAX" (elastic) into `options`.
// Throws InvalidArgument naming --nnodes and the accepted forms.
void parseNnodes(const std::string& text, RunOptions& options);

// Parses --rdzv-conf "key=value,key=value" (keys: user, password_file) into
// `options`. Throws InvalidArgument naming --rdzv-conf, the bad entry and the
// accepted keys.
void parseRdzvConf(const std::string& text, RunOptions& options);

// Parses tessera-run's argv. Returns the validated options, or the exit code
// to return at once: 0 after --help (printed on stdout), 2 after a usage
// error (the problem and the usage printed on stderr). Never throws.
std::variant<RunOptions, int> parseRunOptions(int argc, char** argv);

}  // namespace tessera::launcher
