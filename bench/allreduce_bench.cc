#include "bench/allreduce_bench.h"

#include <ATen/ops/empty.h>
#ifdef TESSERA_BENCH_HAVE_GLOO
#include <gloo/allreduce.h>
#include <gloo/math.h>
#endif
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <regex>

#ifdef TESSERA_BENCH_HAVE_GLOO
#include "comm/gloo/gloo_communicator.h"
#endif
#include "bench/bench_command.h"
#include "tessera/core/config.h"
#include "tessera/core/metrics.h"
#include "tessera/core/timer.h"

#ifdef TESSERA_BENCH_HAVE_MPI
#include <mpi.h>
#endif

namespace tessera::bench {
namespace {

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// The backend's own all-reduce of `buffer` (float32 sum), bypassing tessera.
std::function<void()> rawAllreduce(comm::Communicator& world, at::Tensor buffer) {
#ifdef TESSERA_BENCH_HAVE_GLOO
  if (world.backend() == "gloo") {
    auto* gloo = dynamic_cast<comm::detail::GlooCommunicator*>(&world);
    TESSERA_CHECK(gloo != nullptr, "gloo backend without a GlooCommunicator");
    auto context = gloo->context();
    return [context, buffer] {
      gloo::AllreduceOptions opts(context);
      opts.setOutput(buffer.data_ptr<float>(), static_cast<size_t>(buffer.numel()));
      opts.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
      opts.setAlgorithm(gloo::AllreduceOptions::Algorithm::RING);
      opts.setTag(0x7fffffff);  // away from tessera's per-operation tags
      gloo::allreduce(opts);
    };
  }
#endif
#ifdef TESSERA_BENCH_HAVE_MPI
  if (world.backend() == "mpi") {
    return [buffer] {
      MPI_Allreduce(MPI_IN_PLACE, buffer.data_ptr<float>(), static_cast<int>(buffer.numel()), MPI_FLOAT, MPI_SUM,
                    MPI_COMM_WORLD);
    };
  }
#endif
  throw NotSupported("no raw all-reduce to compare with for backend '" + world.backend() + "'");
}

// Every rank's times, element-wise max: a collective ends when its slowest rank ends.
std::vector<double> slowestAcrossRanks(comm::Communicator& world, const std::vector<double>& times) {
  auto t = at::empty({static_cast<int64_t>(times.size())}, at::kDouble);
  std::copy(times.begin(), times.end(), t.data_ptr<double>());
  world.allReduce(t, comm::ReduceOp::kMax);
  return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
}

// int8 or fp8 vs float32 all-reduce of the same Gaussian inputs, interleaved.
void runCompressedComparison(DistributedContext& ctx, const AllreduceBenchConfig& config) {
  comm::Communicator& world = *ctx.world;
  const int n = world.size();
  const std::string name = comm::toString(config.compression);  // field prefix: "int8" or "fp8"
  for (const int64_t bytes : config.bytes) {
    const int64_t numel = bytes / 4;
    auto input = at::empty({numel}, at::kFloat);
    std::mt19937 gen(1000 + world.rank());
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int64_t i = 0; i < numel; ++i) input.data_ptr<float>()[i] = normal(gen);
    auto buffer = at::empty({numel}, at::kFloat);
    auto compressed = [&] { comm::allReduceCompressed(world, buffer, comm::ReduceOp::kSum, config.compression); };
    auto fp32 = [&] { world.allReduce(buffer, comm::ReduceOp::kSum); };
    // The error of one compressed all-reduce against the fp32 one, same inputs.
    buffer.copy_(input);
    fp32();
    const auto exact = buffer.clone();
    buffer.copy_(input);
    compressed();
    double errSq = 0, refSq = 0;
    for (int64_t i = 0; i < numel; ++i) {
      const double e = exact.data_ptr<float>()[i], d = buffer.data_ptr<float>()[i] - e;
      errSq += d * d;
      refSq += e * e;
    }
    const double relError = refSq > 0 ? std::sqrt(errSq / refSq) : 0.0;
    for (int i = 0; i < config.warmup; ++i) {
      for (int k = 0; k < 2; ++k) {
        buffer.copy_(input);
        world.barrier();
        k == 0 ? compressed() : fp32();
      }
    }
    std::vector<double> compressedSeconds, fp32Seconds;
    uint64_t compressedSent = 0, fp32Sent = 0;
    for (int i = 0; i < config.iterations; ++i) {
      for (int k = 0; k < 2; ++k) {
        const bool compressedNow = (i + k) % 2 == 0;
        buffer.copy_(input);  // in place: restart from the inputs every time
        world.barrier();
        const uint64_t sentBefore = world.stats().totalBytesSent();
        Stopwatch watch;
        compressedNow ? compressed() : fp32();
        (compressedNow ? compressedSeconds : fp32Seconds).push_back(watch.seconds());
        (compressedNow ? compressedSent : fp32Sent) += world.stats().totalBytesSent() - sentBefore;
      }
    }
    const double compressedMedian = median(slowestAcrossRanks(world, compressedSeconds));
    const double fp32Median = median(slowestAcrossRanks(world, fp32Seconds));
    if (world.rank() != 0) continue;
    MetricsRecord record;
    record.add("bench", "allreduce")
        .add("compression", name)
        .add("link", config.link.empty() ? "loopback" : config.link)
        .add("backend", world.backend())
        .add("ranks", n)
        .add("bytes", bytes)
        .add("iterations", config.iterations)
        .add(name + "_median_s", compressedMedian)
        .add(name + "_algbw_gbps", bytes / compressedMedian / 1e9)
        .add(name + "_sent_bytes_per_rank", compressedSent / config.iterations)
        .add("fp32_median_s", fp32Median)
        .add("fp32_algbw_gbps", bytes / fp32Median / 1e9)
        .add("fp32_sent_bytes_per_rank", fp32Sent / config.iterations)
        .add("speedup_vs_fp32", fp32Median / compressedMedian)
        .add(name + "_rel_rms_error", relError);
    std::printf("%s\n", record.toJson().c_str());
    std::fflush(stdout);
  }
}

}  // namespace

void AllreduceBenchConfig::validate() const {
  TESSERA_CHECK_CONFIG(link.empty() || link == "loopback" || linkIsRate(link), "link",
                       "must be loopback or a tc rate such as 100mbit or 1gbit, got '" << link << "'");
  TESSERA_CHECK_CONFIG(link.empty() || compression != comm::Compression::kNone, "link",
                       "--link compares a compressed all-reduce with fp32: add --compression int8 or fp8");
  TESSERA_CHECK_CONFIG(!bytes.empty(), "bytes", "give at least one size");
  for (int64_t b : bytes) {
    TESSERA_CHECK_CONFIG(b >= 4 && b % 4 == 0, "bytes", "sizes must be positive multiples of 4 (float32), got " << b);
  }
  TESSERA_CHECK_CONFIG(iterations >= 1, "iterations", "must be >= 1, got " << iterations);
  TESSERA_CHECK_CONFIG(warmup >= 0, "warmup", "must be >= 0, got " << warmup);
}

void runAllreduceBench(DistributedContext& ctx, const AllreduceBenchConfig& config) {
  config.validate();
  if (config.compression != comm::Compression::kNone) return runCompressedComparison(ctx, config);
  comm::Communicator& world = *ctx.world;
  const int n = world.size();
  for (const int64_t bytes : config.bytes) {
    auto buffer = at::empty({bytes / 4}, at::kFloat).fill_(1.0f);
    auto raw = rawAllreduce(world, buffer);
    auto ours = [&] { world.allReduce(buffer, comm::ReduceOp::kSum); };
    for (int i = 0; i < config.warmup; ++i) {
      ours();
      raw();
    }
    std::vector<double> oursSeconds, rawSeconds;
    for (int i = 0; i < config.iterations; ++i) {
      // Alternate the order so neither always runs right after the other's cache warm-up.
      for (int k = 0; k < 2; ++k) {
        const bool oursNow = (i + k) % 2 == 0;
        world.barrier();
        Stopwatch watch;
        oursNow ? ours() : raw();
        (oursNow ? oursSeconds : rawSeconds).push_back(watch.seconds());
      }
    }
    // Every rank's time counts: the collective ends when its slowest rank ends.
    const double oursMedian = median(slowestAcrossRanks(world, oursSeconds));
    const double rawMedian = median(slowestAcrossRanks(world, rawSeconds));
    const double busFactor = n > 1 ? 2.0 * (n - 1) / n : 1.0;
    if (world.rank() != 0) continue;
    MetricsRecord record;
    record.add("bench", "allreduce")
        .add("backend", world.backend())
        .add("ranks", n)
        .add("bytes", bytes)
        .add("dtype", "float32")
        .add("iterations", config.iterations)
        .add("tessera_median_s", oursMedian)
        .add("tessera_algbw_gbps", bytes / oursMedian / 1e9)
        .add("tessera_busbw_gbps", bytes / oursMedian / 1e9 * busFactor)
        .add("raw", world.backend() == "gloo" ? "gloo::allreduce(RING)" : "MPI_Allreduce")
        .add("raw_median_s", rawMedian)
        .add("raw_algbw_gbps", bytes / rawMedian / 1e9)
        .add("raw_busbw_gbps", bytes / rawMedian / 1e9 * busFactor)
        .add("ratio_vs_raw", rawMedian / oursMedian);
    std::printf("%s\n", record.toJson().c_str());
    std::fflush(stdout);
  }
}


// --- The simulated link: namespaces, two ranks, teardown. ---

namespace {

constexpr const char* kLinkChildVariable = "TESSERA_BENCH_LINK_CHILD";
constexpr int kLinkMasterPort = 29511;
volatile sig_atomic_t linkInterrupted = 0;

void onLinkSignal(int) { linkInterrupted = 1; }

std::string selfExecutable() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  TESSERA_CHECK(n > 0, "cannot read /proc/self/exe: " << std::strerror(errno));
  buf[n] = '\0';
  return buf;
}

// The netns script: $TESSERA_NETNS_SCRIPT, the source tree's (build), next
// to this program, or on PATH.
std::string findNetnsScript() {
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("TESSERA_NETNS_SCRIPT")) candidates.emplace_back(env);
#ifdef TESSERA_NETNS_SCRIPT_PATH
  candidates.emplace_back(TESSERA_NETNS_SCRIPT_PATH);
#endif
  const std::string self = selfExecutable();
  candidates.push_back(self.substr(0, self.rfind('/')) + "/netns-link.sh");
  for (const auto& c : candidates) {
    if (access(c.c_str(), X_OK) == 0) return c;
  }
  return "netns-link.sh";  // from PATH
}

// fork + exec; returns the child's pid. extraEnv: NAME=value entries.
pid_t spawn(const std::vector<std::string>& args, const std::vector<std::string>& extraEnv) {
  const pid_t pid = fork();
  TESSERA_CHECK(pid >= 0, "fork failed: " << std::strerror(errno));
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the bench
    for (const auto& kv : extraEnv) putenv(const_cast<char*>(kv.c_str()));
    std::vector<char*> cargs;
    for (const auto& a : args) cargs.push_back(const_cast<char*>(a.c_str()));
    cargs.push_back(nullptr);
    execvp(cargs[0], cargs.data());
    std::fprintf(stderr, "tessera-bench: cannot run %s: %s\n", cargs[0], std::strerror(errno));
    _exit(127);
  }
  return pid;
}

// Waits for pid (through EINTR); returns its exit code, 128 + signal if killed.
int waitExit(pid_t pid) {
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return 255;
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Removes the namespaces when it goes out of scope, whatever happened.
class LinkGuard {
 public:
  LinkGuard(std::string script, std::string name) : script_(std::move(script)), name_(std::move(name)) {}
  ~LinkGuard() { waitExit(spawn({script_, "down", name_}, {})); }

 private:
  std::string script_, name_;
};

// Signal handlers that only set a flag, restored on scope exit.
class InterruptFlag {
 public:
  InterruptFlag() {
    struct sigaction action {};
    action.sa_handler = onLinkSignal;  // no SA_RESTART: waitpid returns EINTR
    sigemptyset(&action.sa_mask);
    for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &action, &old_[i]);
  }
  ~InterruptFlag() {
    for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &old_[i], nullptr);
  }

 private:
  static constexpr int kSignals[3] = {SIGINT, SIGTERM, SIGHUP};
  struct sigaction old_[3];
};

}  // namespace

bool linkIsRate(const std::string& link) {
  static const std::regex rate(R"(^[0-9]+(\.[0-9]+)?([kmg]?bit|[kmg]?bps)$)", std::regex::icase);
  return std::regex_match(link, rate);
}

int runAcrossSimulatedLink(const std::string& rate, const std::vector<std::string>& argv) {
  TESSERA_CHECK_T(NotSupported, geteuid() == 0,
                  "--link " << rate << " needs root: it creates network namespaces and tc qdiscs. Run as root, or "
                            << "measure over --link loopback");
  const std::string script = findNetnsScript();
  const std::string name = "tlink" + std::to_string(getpid() % 10000000);  // <= 12 characters
  InterruptFlag interrupt;
  LinkGuard guard(script, name);
  const int up = waitExit(spawn({script, "up", name, rate}, {}));
  TESSERA_CHECK_T(CommError, up == 0, script << " up " << name << " " << rate << " failed (exit " << up
                                             << "); see its message above (needs iproute2: ip, tc)");
  TESSERA_CHECK_T(CommError, !linkInterrupted, "interrupted while creating the link");
  std::fprintf(stderr, "tessera-bench: ranks 0 and 1 in namespaces %s-0 / %s-1, link %s\n", name.c_str(),
               name.c_str(), rate.c_str());
  const std::string self = selfExecutable();
  std::vector<pid_t> ranks;
  for (int rank = 0; rank < 2; ++rank) {
    std::vector<std::string> args = {"ip", "netns", "exec", name + "-" + std::to_string(rank), self};
    args.insert(args.end(), argv.begin(), argv.end());
    ranks.push_back(spawn(args, {"RANK=" + std::to_string(rank), "WORLD_SIZE=2", "LOCAL_RANK=0",
                                 "LOCAL_WORLD_SIZE=1", "MASTER_ADDR=10.201.0.1",
                                 "MASTER_PORT=" + std::to_string(kLinkMasterPort),
                                 "TESSERA_GLOO_HOSTNAME=10.201.0." + std::to_string(rank + 1),
                                 std::string(kLinkChildVariable) + "=1"}));
  }
  // Wait for both; on a signal or a failed rank, stop the other one too.
  int firstFailure = 0;
  std::vector<bool> done(ranks.size(), false);
  for (size_t finished = 0; finished < ranks.size();) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, 0);
    if (pid < 0 && errno == EINTR) {
      for (size_t i = 0; i < ranks.size(); ++i) {
        if (!done[i]) kill(ranks[i], SIGTERM);
      }
      continue;
    }
    if (pid < 0) break;
    const auto it = std::find(ranks.begin(), ranks.end(), pid);
    if (it == ranks.end()) continue;
    done[it - ranks.begin()] = true;
    ++finished;
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (code != 0 && firstFailure == 0) {
      firstFailure = code;
      for (size_t i = 0; i < ranks.size(); ++i) {
        if (!done[i]) kill(ranks[i], SIGTERM);
      }
    }
  }
  if (linkInterrupted && firstFailure == 0) firstFailure = 130;
  return firstFailure;
}

std::vector<std::string> commandLineArguments() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::vector<std::string> args;
  std::string arg;
  while (std::getline(in, arg, '\0')) args.push_back(arg);
  if (!args.empty()) args.erase(args.begin());  // the program itself
  return args;
}

std::unique_ptr<BenchCommand> addAllreduceCommand(CLI::App& app) {
  auto command = std::make_unique<BenchCommand>();
  command->app = app.add_subcommand(
      "allreduce",
      "tessera's allReduce vs the backend's own (float32 sum), or int8/fp8 vs fp32 (--compression int8|fp8)");
  addLaunchOptions(*command);
  auto config = std::make_shared<AllreduceBenchConfig>();
  auto sizes = std::make_shared<std::vector<std::string>>(std::vector<std::string>{"1MiB", "16MiB", "64MiB"});
  command->app->add_option("--bytes", *sizes, "buffer sizes, e.g. 1MiB,64MiB")->delimiter(',');
  command->app->add_option("--iters", config->iterations, "timed iterations per size")->check(CLI::PositiveNumber);
  command->app->add_option("--warmup", config->warmup, "untimed iterations per size")->check(CLI::NonNegativeNumber);
  auto compression = std::make_shared<std::string>("none");
  command->app
      ->add_option("--compression", *compression,
                   "none: tessera vs the raw backend; int8 / fp8: that compressed all-reduce vs fp32")
      ->check(CLI::IsMember({"none", "int8", "fp8"}));
  command->app->add_option("--link", config->link,
                           "loopback, or a rate (100mbit, 1gbit): 2 ranks in network namespaces joined by a "
                           "veth pair limited by tc tbf (needs root; int8 or fp8)");
  BenchCommand* self = command.get();
  command->validate = [config, sizes, compression, self] {
    config->bytes.clear();
    for (const auto& s : *sizes) config->bytes.push_back(parseBytes(s));
    config->compression = comm::parseCompression(*compression, "compression");
    config->validate();
    if (linkIsRate(config->link)) {
      TESSERA_CHECK_CONFIG(self->ranks == 0 || self->ranks == 2, "ranks",
                           "--link " << config->link << " runs exactly 2 ranks, got --ranks " << self->ranks);
      TESSERA_CHECK_CONFIG(self->backend == "gloo", "backend", "--link runs Gloo ranks, got " << self->backend);
      // The bench itself, not a rank: build the link and start the ranks in it.
      if (std::getenv(kLinkChildVariable) == nullptr) self->distributed = false;
    }
  };
  command->run = [config](DistributedContext* ctx) {
    if (ctx != nullptr) return runAllreduceBench(*ctx, *config);
    const int code = runAcrossSimulatedLink(config->link, commandLineArguments());
    TESSERA_CHECK(code == 0, "a rank across the simulated link failed (exit " << code << "); see its output above");
  };
  return command;
}

}  // namespace tessera::bench
