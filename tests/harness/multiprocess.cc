#include "tests/harness/multiprocess.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include "tessera/core/threads.h"
#include "tessera/comm/gloo.h"
#include "tessera/comm/mpi.h"
#include "tessera/core/error.h"
#include "tessera/core/logging.h"
#include "tessera/core/timer.h"

extern char** environ;

namespace tessera::testing {
namespace {

std::map<std::string, WorkerFn>& registry() {
  static std::map<std::string, WorkerFn> workers;
  return workers;
}

std::string selfExe() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  TESSERA_CHECK(n > 0, "cannot resolve /proc/self/exe");
  buf[n] = '\0';
  return buf;
}

// args travel in one env var as key=value lines.
std::string encodeArgs(const std::map<std::string, std::string>& args) {
  std::string out;
  for (const auto& [k, v] : args) out += k + "=" + v + "\n";
  return out;
}

std::map<std::string, std::string> decodeArgs(const char* text) {
  std::map<std::string, std::string> args;
  if (text == nullptr) return args;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    const auto eq = line.find('=');
    if (eq != std::string::npos) args[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return args;
}

std::string readFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int envInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v == nullptr ? fallback : std::atoi(v);
}

pid_t spawn(const std::vector<std::string>& argv, const std::vector<std::string>& extraEnv,
            const std::string& outputPath) {
  std::vector<std::string> envStrings;
  for (char** e = environ; *e != nullptr; ++e) envStrings.emplace_back(*e);
  for (const auto& e : extraEnv) envStrings.push_back(e);
  std::vector<char*> envp;
  for (auto& e : envStrings) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::vector<std::string> argvCopy = argv;
  std::vector<char*> args;
  for (auto& a : argvCopy) args.push_back(a.data());
  args.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, outputPath.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  // Own process group, so a timeout can kill a rank and everything it started.
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attr, 0);
  pid_t pid = -1;
  const int rc = posix_spawnp(&pid, args[0], &actions, &attr, args.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  TESSERA_CHECK(rc == 0, "cannot start " << argv[0] << ": " << std::strerror(rc));
  return pid;
}

int decodeStatus(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// Waits for every pid until the deadline; kills the rest after it.
bool waitAll(std::vector<pid_t>& pids, std::vector<int>& codes, std::chrono::seconds deadline) {
  Deadline until(deadline);
  size_t remaining = pids.size();
  while (remaining > 0) {
    for (size_t i = 0; i < pids.size(); ++i) {
      if (pids[i] <= 0) continue;
      int status = 0;
      if (waitpid(pids[i], &status, WNOHANG) == pids[i]) {
        codes[i] = decodeStatus(status);
        pids[i] = -1;
        --remaining;
      }
    }
    if (remaining == 0) break;
    if (until.expired()) {
      for (pid_t pid : pids) {
        if (pid > 0) kill(-pid, SIGKILL);
      }
      for (size_t i = 0; i < pids.size(); ++i) {
        if (pids[i] <= 0) continue;
        int status = 0;
        waitpid(pids[i], &status, 0);
        codes[i] = decodeStatus(status);
      }
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

}  // namespace

comm::CommPtr WorkerContext::world(comm::Timeout timeout) const {
  if (backend == "mpi") {
    comm::MpiOptions options;
    options.timeout = timeout;
    return comm::makeMpiWorldCommunicator(options);
  }
  comm::GlooOptions options;
  options.timeout = timeout;
  return comm::makeGlooCommunicator(store, "world", rank, size, options);
}

std::string WorkerContext::arg(const std::string& key, const std::string& fallback) const {
  auto it = args.find(key);
  return it == args.end() ? fallback : it->second;
}

bool registerWorker(const std::string& name, WorkerFn fn) {
  registry()[name] = std::move(fn);
  return true;
}

bool RunResult::ok() const {
  if (timedOut || !launchError.empty()) return false;
  for (int code : exitCodes) {
    if (code != 0) return false;
  }
  return true;
}

std::string RunResult::report() const {
  std::ostringstream out;
  if (!launchError.empty()) out << "launch error: " << launchError << "\n";
  if (timedOut) out << "the run passed its deadline; every rank was killed\n";
  for (size_t r = 0; r < exitCodes.size(); ++r) {
    out << "---- rank " << r << " exit code " << exitCodes[r] << " ----\n" << outputs[r] << "\n";
  }
  return out.str();
}

bool mpiAvailable() {
  return comm::mpiBackendBuilt() && std::system("command -v mpirun >/dev/null 2>&1") == 0;
}

RunResult runWorkers(const std::string& name, const RunOptions& options) {
  RunResult result;
  TESSERA_CHECK(registry().count(name) == 1, "no worker registered as '" << name << "'");
  char dirTemplate[] = "/tmp/tessera-test-XXXXXX";
  const std::string dir = mkdtemp(dirTemplate);
  const std::string exe = selfExe();
  std::vector<std::string> env = {"TESSERA_TEST_WORKER=" + name, "TESSERA_TEST_ARGS=" + encodeArgs(options.args),
                                  "TESSERA_TEST_BACKEND=" + options.backend,
                                  "WORLD_SIZE=" + std::to_string(options.ranks)};
  std::vector<pid_t> pids;
  std::vector<std::string> outputPaths;
  std::shared_ptr<comm::TcpStore> store;
  try {
    if (options.backend == "mpi") {
      // One mpirun; its ranks write to the per-rank files themselves.
      env.push_back("TESSERA_TEST_OUTPUT_DIR=" + dir);
      std::vector<std::string> argv = {"mpirun", "--allow-run-as-root", "--oversubscribe", "-np",
                                       std::to_string(options.ranks), "--mca", "btl", "self,vader,tcp", exe};
      pids.push_back(spawn(argv, env, dir + "/mpirun.log"));
      for (int r = 0; r < options.ranks; ++r) outputPaths.push_back(dir + "/rank" + std::to_string(r) + ".log");
    } else {
      comm::TcpStoreOptions storeOptions;
      storeOptions.port = 0;
      storeOptions.isServer = true;
      store = std::make_shared<comm::TcpStore>(storeOptions);
      env.push_back("TESSERA_TEST_STORE_PORT=" + std::to_string(store->port()));
      for (int r = 0; r < options.ranks; ++r) {
        std::vector<std::string> rankEnv = env;
        rankEnv.push_back("RANK=" + std::to_string(r));
        outputPaths.push_back(dir + "/rank" + std::to_string(r) + ".log");
        pids.push_back(spawn({exe}, rankEnv, outputPaths.back()));
      }
    }
  } catch (const std::exception& e) {
    result.launchError = e.what();
  }
  std::vector<int> codes(pids.size(), -1);
  result.timedOut = !waitAll(pids, codes, options.deadline);
  if (options.backend == "mpi") {
    // mpirun's exit code stands for every rank; its own log joins rank 0's output.
    result.exitCodes.assign(options.ranks, codes.empty() ? -1 : codes[0]);
    for (int r = 0; r < options.ranks; ++r) {
      std::string text = readFile(outputPaths[r]);
      if (r == 0) text += readFile(dir + "/mpirun.log");
      result.outputs.push_back(text);
    }
  } else {
    result.exitCodes = codes;
    for (const auto& path : outputPaths) result.outputs.push_back(readFile(path));
  }
  std::system(("rm -rf " + dir).c_str());
  return result;
}

std::optional<int> maybeRunWorker(int argc, char** argv) {
  const char* name = std::getenv("TESSERA_TEST_WORKER");
  if (name == nullptr) return std::nullopt;
  WorkerContext ctx;
  ctx.backend = std::getenv("TESSERA_TEST_BACKEND") ? std::getenv("TESSERA_TEST_BACKEND") : "gloo";
  ctx.args = decodeArgs(std::getenv("TESSERA_TEST_ARGS"));
  ctx.size = envInt("WORLD_SIZE", 1);
  if (ctx.backend == "mpi") {
    ctx.rank = envInt("OMPI_COMM_WORLD_RANK", 0);
    ctx.size = envInt("OMPI_COMM_WORLD_SIZE", ctx.size);
    // Under mpirun every rank shares one stdout; give each its own file.
    if (const char* dir = std::getenv("TESSERA_TEST_OUTPUT_DIR")) {
      const std::string path = std::string(dir) + "/rank" + std::to_string(ctx.rank) + ".log";
      const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
        close(fd);
      }
    }
  } else {
    ctx.rank = envInt("RANK", 0);
    comm::TcpStoreOptions storeOptions;
    storeOptions.port = static_cast<uint16_t>(envInt("TESSERA_TEST_STORE_PORT", 0));
    storeOptions.timeout = std::chrono::seconds(30);
    ctx.store = std::make_shared<comm::TcpStore>(storeOptions);
  }
  setLogRank(ctx.rank);
  // Several ranks share two cores: intra-op threads would only spin against
  // each other (seen: 10x slower tensor ops with the default thread count).
  setComputeThreads(1);
  auto it = registry().find(name);
  if (it == registry().end()) {
    std::fprintf(stderr, "no worker '%s' in this binary\n", name);
    return 2;
  }
  try {
    it->second(ctx);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: worker '%s' failed: %s\n", ctx.rank, name, e.what());
    std::fflush(stderr);
    return 1;
  }
  std::fflush(stdout);
  return 0;
}

void expectTensorsEqual(const at::Tensor& actual, const at::Tensor& expected, const std::string& what, double atol,
                        double rtol) {
  TESSERA_CHECK(actual.scalar_type() == expected.scalar_type(),
                what << ": dtype " << actual.scalar_type() << " != expected " << expected.scalar_type());
  TESSERA_CHECK(actual.sizes() == expected.sizes(),
                what << ": shape " << actual.sizes() << " != expected " << expected.sizes());
  if (actual.numel() == 0) return;
  if (atol == 0 && rtol == 0 && at::equal(actual, expected)) return;
  const at::Tensor a = actual.to(at::kDouble).reshape(-1);
  const at::Tensor b = expected.to(at::kDouble).reshape(-1);
  const at::Tensor bad = (a - b).abs() > (atol + rtol * b.abs());
  if (!bad.any().item<bool>()) return;
  const int64_t i = bad.nonzero()[0][0].item<int64_t>();
  TESSERA_CHECK(false, what << ": " << bad.sum().item<int64_t>() << " of " << a.numel()
                            << " elements differ; first at flat index " << i << ": got " << a[i].item<double>()
                            << ", expected " << b[i].item<double>());
}

}  // namespace tessera::testing
