// launcher_test_worker: the program tests/launcher runs under tessera-run.
// argv[1] picks a behaviour, so one binary plays every kind of worker:
//   env                  print the launch variables and argv, exit 0
//   fail RANK CODE       rank RANK prints 30 lines and exits CODE; the others sleep
//   crash RANK           rank RANK dies of SIGSEGV; the others sleep
//   sleep                print "ready", then sleep; exit 0 on SIGTERM/SIGINT, saying so
//   ignore-term          print "ready", then sleep with SIGTERM/SIGINT ignored
//   init                 tessera::init(), all-reduce the ranks, print the result
//   flaky                fail (code 3) on rank 0 of the first attempt; later attempts run `init`
//   crash-in-collective R  init(); rank R dies of SIGSEGV while the others all-reduce (and fail)
// Sleeping workers give up after 30 s, so a launcher bug cannot hang a test forever.
#include <ATen/ATen.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "tessera/launcher/init.h"

namespace {

const char* envOr(const char* name, const char* fallback) {
  const char* value = std::getenv(name);
  return value != nullptr ? value : fallback;
}

int myRank() { return std::atoi(envOr("RANK", "-1")); }

void sleepUpTo30s() {
  for (int i = 0; i < 300; ++i) usleep(100 * 1000);
  std::printf("gave up sleeping\n");
}

void onTerminate(int sig) {
  const char* text = sig == SIGTERM ? "got SIGTERM\n" : "got SIGINT\n";
  ssize_t ignored = write(1, text, std::strlen(text));
  (void)ignored;
  _exit(0);
}

int printEnv(int argc, char** argv) {
  for (const char* name :
       {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
        "TESSERA_BACKEND", "TESSERA_LAUNCHER", "TESSERA_STORE_HOSTED", "TESSERA_RESTART_COUNT", "OMP_NUM_THREADS"}) {
    std::printf("ENV %s=%s\n", name, envOr(name, "<unset>"));
  }
  std::string args;
  for (int i = 1; i < argc; ++i) args += std::string(i > 1 ? " " : "") + argv[i];
  std::printf("ARGV %s\n", args.c_str());
  return 0;
}

int failOrSleep(int failingRank, int code) {
  if (myRank() != failingRank) {
    sleepUpTo30s();
    return 0;
  }
  // stdout, flushed line by line, then stderr: the launcher reads stdout
  // first in each round, so the tail's order is deterministic.
  for (int i = 1; i <= 30; ++i) {
    std::printf("line %d\n", i);
    std::fflush(stdout);
  }
  std::fprintf(stderr, "about to fail\n");
  return code;
}

int crashOrSleep(int crashingRank) {
  if (myRank() != crashingRank) {
    sleepUpTo30s();
    return 0;
  }
  std::printf("about to crash\n");
  std::fflush(stdout);
  rlimit noCore{0, 0};
  setrlimit(RLIMIT_CORE, &noCore);  // a core file per test run helps no one
  raise(SIGSEGV);
  return 0;
}

int sleepUntilSignalled(bool ignoreTermination) {
  signal(SIGTERM, ignoreTermination ? SIG_IGN : onTerminate);
  signal(SIGINT, ignoreTermination ? SIG_IGN : onTerminate);
  std::printf("ready\n");
  std::fflush(stdout);
  sleepUpTo30s();
  return 0;
}

// The others' all-reduce fails when rank R's sockets close: their failure is
// the consequence, and tessera-run must still blame rank R.
int crashInCollective(int crashingRank) {
  tessera::InitOptions options;
  options.timeout = std::chrono::seconds(30);
  tessera::DistributedContext ctx = tessera::init(options);
  ctx.world->barrier();
  if (ctx.rank() == crashingRank) crashOrSleep(crashingRank);
  at::Tensor value = at::ones({1024});
  ctx.world->allReduce(value);
  return 0;
}

int initAndReduce() {
  tessera::InitOptions options;
  options.timeout = std::chrono::seconds(30);
  options.storeTimeout = std::chrono::seconds(30);
  tessera::DistributedContext ctx = tessera::init(options);
  at::Tensor value = at::full({1}, static_cast<double>(ctx.rank()), at::kDouble);
  ctx.world->allReduce(value);
  std::printf("INIT rank=%d size=%d local=%d/%d node=%d backend=%s by=%s restart=%d sum=%g\n", ctx.info.rank,
              ctx.info.worldSize, ctx.info.localRank, ctx.info.localWorldSize, ctx.info.nodeRank,
              ctx.info.backend.c_str(), ctx.info.launchedBy.c_str(), ctx.info.restartCount, value.item<double>());
  ctx.world->barrier();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  try {
    if (mode == "env") return printEnv(argc, argv);
    if (mode == "fail" && argc == 4) return failOrSleep(std::atoi(argv[2]), std::atoi(argv[3]));
    if (mode == "crash" && argc == 3) return crashOrSleep(std::atoi(argv[2]));
    if (mode == "sleep") return sleepUntilSignalled(false);
    if (mode == "ignore-term") return sleepUntilSignalled(true);
    if (mode == "init") return initAndReduce();
    if (mode == "crash-in-collective" && argc == 3) return crashInCollective(std::atoi(argv[2]));
    if (mode == "flaky") {
      if (std::string(envOr("TESSERA_RESTART_COUNT", "0")) == "0" && myRank() == 0) return failOrSleep(0, 3);
      return initAndReduce();
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "launcher_test_worker %s failed: %s\n", mode.c_str(), e.what());
    return 1;
  }
  std::fprintf(stderr, "usage: launcher_test_worker env|fail R C|crash R|sleep|ignore-term|init|flaky\n");
  return 2;
}
