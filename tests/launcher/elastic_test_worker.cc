// elastic_test_worker: the program the elastic launcher tests run under
// `tessera-run --nnodes MIN:MAX`. Prints the launch variables of elastic.h's
// contract ("ENV NAME=value" lines), then behaves as argv[1] says:
//   env                 exit 0
//   fail-until N CODE   while TESSERA_NODE_INCARNATION < N, local rank 0 exits
//                       CODE and the other local ranks sleep (the launcher must
//                       stop them); from incarnation N on, every rank exits 0
//   exit-codes C0 C1..  incarnation i: local rank 0 exits Ci (the other local
//                       ranks sleep); "sig9" for Ci: it kills itself with
//                       SIGKILL (a crash); incarnations past the list exit 0
//   sleep               print "ready", then sleep
// Sleeping workers exit 0 on SIGTERM/SIGINT, saying "got SIGTERM"/"got SIGINT",
// and give up after 30 s, so a launcher bug cannot hang a test forever.
// No libtessera: the contract is checked as plain environment variables.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

const char* envOr(const char* name, const char* fallback) {
  const char* value = std::getenv(name);
  return value != nullptr ? value : fallback;
}

int envInt(const char* name) { return std::atoi(envOr(name, "-1")); }

void onTerminate(int sig) {
  const char* text = sig == SIGTERM ? "got SIGTERM\n" : "got SIGINT\n";
  ssize_t ignored = write(1, text, std::strlen(text));
  (void)ignored;
  _exit(0);
}

int sleepUntilSignalled() {
  std::printf("ready\n");
  std::fflush(stdout);
  for (int i = 0; i < 300; ++i) usleep(100 * 1000);
  std::printf("gave up sleeping\n");
  return 0;
}

void printEnv() {
  for (const char* name :
       {"TESSERA_ELASTIC", "TESSERA_STORE_ADDR", "TESSERA_NODE_SLOT", "TESSERA_NODE_INCARNATION", "TESSERA_NNODES",
        "TESSERA_ADVERTISE_HOST", "TESSERA_JOIN_TOKEN_FILE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
        "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "TESSERA_RESTART_COUNT", "TESSERA_RDZV_BACKEND",
        "TESSERA_RDZV_ENDPOINT", "TESSERA_RDZV_ID", "TESSERA_ETCD_USER", "TESSERA_ETCD_PASSWORD_FILE"}) {
    std::printf("ENV %s=%s\n", name, envOr(name, "<unset>"));
  }
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  signal(SIGTERM, onTerminate);
  signal(SIGINT, onTerminate);
  printEnv();
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "env") return 0;
  if (mode == "sleep") return sleepUntilSignalled();
  if (mode == "fail-until" && argc == 4) {
    const int healthyFrom = std::atoi(argv[2]);
    const int code = std::atoi(argv[3]);
    if (envInt("TESSERA_NODE_INCARNATION") >= healthyFrom) return 0;
    if (envInt("LOCAL_RANK") != 0) return sleepUntilSignalled();
    std::printf("failing with code %d\n", code);
    std::fflush(stdout);
    return code;
  }
  if (mode == "exit-codes") {
    const int incarnation = envInt("TESSERA_NODE_INCARNATION");
    if (incarnation < 0 || incarnation + 2 >= argc) return 0;
    if (envInt("LOCAL_RANK") != 0) return sleepUntilSignalled();
    const std::string code = argv[incarnation + 2];
    std::printf("incarnation %d: %s\n", incarnation, code == "sig9" ? "crashing" : ("exiting " + code).c_str());
    std::fflush(stdout);
    if (code == "sig9") raise(SIGKILL);
    return std::atoi(code.c_str());
  }
  std::fprintf(stderr, "usage: elastic_test_worker env | fail-until N CODE | exit-codes C0 C1... | sleep\n");
  return 64;
}
