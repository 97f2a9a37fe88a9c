// A real etcd cluster for tests: N members (etcd processes) on free loopback
// ports, their data in a fresh directory (on /dev/shm when there is one, so
// fsync costs nothing), with the controls a failover test needs: kill a
// member, restart it, find the leader.
//
//   TEST(Etcd, Something) {
//     TESSERA_REQUIRE_ETCD();            // skips when the etcd binary is missing
//     EtcdCluster cluster(3);            // ~1 s: starts and waits for a leader
//     auto store = makeEtcdStore({.endpoints = cluster.endpoints()});
//     cluster.kill(cluster.leader());
//   }
//
// The members run with a 50 ms heartbeat and a 500 ms election timeout, so a
// killed leader is replaced within about a second, and the shortest lease is
// 1 s. Every member is started with PR_SET_PDEATHSIG: a crashed test leaves
// no etcd behind. Not thread-safe (drive it from the test's main thread).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace tessera::testing {

// The etcd server binary: $TESSERA_ETCD_BIN, else /usr/bin/etcd; "" when missing.
std::string etcdBinary();

// Skips the test (GTEST_SKIP) when etcd is not installed.
#define TESSERA_REQUIRE_ETCD()                                                                          \
  do {                                                                                                  \
    if (::tessera::testing::etcdBinary().empty()) {                                                     \
      GTEST_SKIP() << "etcd is not installed (no /usr/bin/etcd, TESSERA_ETCD_BIN unset): run "          \
                      "scripts/setup.sh (apt package etcd-server) to run the etcd store tests";         \
    }                                                                                                   \
  } while (0)

class EtcdCluster {
 public:
  // Starts `members` members and waits (up to 30 s) until every one reports
  // healthy (a leader is elected). extraArgs go to every member's command
  // line (e.g. {"--auth-token-ttl", "1"}). Throws tessera::Error with the tail
  // of each member's log when they do not become healthy.
  explicit EtcdCluster(int members = 3, std::vector<std::string> extraArgs = {});
  // Kills every member (SIGKILL) and removes the data directory.
  ~EtcdCluster();
  EtcdCluster(const EtcdCluster&) = delete;
  EtcdCluster& operator=(const EtcdCluster&) = delete;

  int size() const { return static_cast<int>(members_.size()); }
  // "127.0.0.1:port" of each member's client URL, in member order.
  std::vector<std::string> endpoints() const;
  std::string endpoint(int member) const;
  // endpoints() joined by commas (the --rdzv-endpoint form).
  std::string endpointList() const;

  // SIGKILL, then reaps it. No-op when it is not running.
  void kill(int member);
  // Starts a killed member again on its ports with its data; returns at once
  // (waitHealthy to wait for it).
  void restart(int member);
  bool running(int member) const;
  // Whether `member` answers GET /health with {"health":"true"} (it has a
  // leader) within `timeout`.
  bool waitHealthy(int member, std::chrono::milliseconds timeout) const;
  // The member that is the leader, asked through POST /v3/maintenance/status
  // of each running member; -1 when no running member knows one.
  int leader() const;
  // Turns authentication on: user "root" (role root) with `password`.
  // Afterwards every request needs the user's token.
  void enableAuth(const std::string& password);
  // The last lines of a member's log (for failure messages).
  std::string logTail(int member) const;

 private:
  struct Member {
    std::string name;
    uint16_t clientPort = 0;
    uint16_t peerPort = 0;
    pid_t pid = -1;
  };
  void start(int member);

  std::string dir_;
  std::string initialCluster_;
  std::vector<std::string> extraArgs_;
  std::vector<Member> members_;
};

}  // namespace tessera::testing
