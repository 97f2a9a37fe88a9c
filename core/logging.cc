#include "tessera/core/logging.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>

#include "tessera/core/error.h"

namespace tessera {
namespace {

std::atomic<int> gRank{-1};

LogLevel levelFromEnv() {
  const char* env = std::getenv("TESSERA_LOG_LEVEL");
  if (env == nullptr || *env == '\0') return LogLevel::kInfo;
  try {
    return parseLogLevel(env);
  } catch (const InvalidArgument&) {
    std::fprintf(stderr, "tessera: ignoring TESSERA_LOG_LEVEL=%s (use debug|info|warn|error)\n", env);
    return LogLevel::kInfo;
  }
}

std::atomic<int>& levelStorage() {
  static std::atomic<int> level{static_cast<int>(levelFromEnv())};
  return level;
}

char levelLetter(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return 'D';
    case LogLevel::kInfo: return 'I';
    case LogLevel::kWarn: return 'W';
    case LogLevel::kError: return 'E';
  }
  return '?';
}

}  // namespace

void setLogRank(int rank) { gRank = rank; }
void setLogLevel(LogLevel level) { levelStorage() = static_cast<int>(level); }
LogLevel logLevel() { return static_cast<LogLevel>(levelStorage().load()); }

LogLevel parseLogLevel(const std::string& name) {
  if (name == "debug") return LogLevel::kDebug;
  if (name == "info") return LogLevel::kInfo;
  if (name == "warn" || name == "warning") return LogLevel::kWarn;
  if (name == "error") return LogLevel::kError;
  throw InvalidArgument("unknown log level '" + name + "': use debug, info, warn or error");
}

void logLine(LogLevel level, const std::string& message) {
  if (level < logLevel()) return;
  const auto now = std::chrono::system_clock::now();
  const std::time_t seconds = std::chrono::system_clock::to_time_t(now);
  const int millis = static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000);
  std::tm local{};
  localtime_r(&seconds, &local);
  char stamp[32];
  std::strftime(stamp, sizeof(stamp), "%H:%M:%S", &local);
  const int rank = gRank.load();
  std::string prefix = rank >= 0 ? "[tessera rank " + std::to_string(rank) + " " : "[tessera ";
  // One fprintf per line so concurrent threads never interleave within a line.
  std::fprintf(stderr, "%s%c %s.%03d] %s\n", prefix.c_str(), levelLetter(level), stamp, millis,
               message.c_str());
}

}  // namespace tessera
