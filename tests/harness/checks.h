// Small checks several test files share (header-only).
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <cmath>
#include <map>
#include <string>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/state.h"

namespace tessera::testing {

// The elements of whole tensor `whole` that `slice` holds, flat (a copy):
// what a rank holding that piece of a logical tensor should hold.
inline at::Tensor sliceOf(const at::Tensor& whole, const TensorSlice& slice) {
  at::Tensor out = at::empty({slice.numel}, whole.options());
  copyOverlap(TensorSlice::whole(whole.sizes().vec()), whole.contiguous().reshape({-1}), slice, out);
  return out;
}

// A shell command's exit and everything it printed (stdout; add 2>&1 for stderr).
struct ShellResult {
  int status = -1;  // as pclose returns it
  std::string output;
  bool exitedWith(int code) const { return WIFEXITED(status) && WEXITSTATUS(status) == code; }
};

// Runs `command` through /bin/sh and waits for it. status stays -1 when it could not start.
inline ShellResult runShell(const std::string& command) {
  ShellResult result;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  while (size_t n = std::fread(buffer, 1, sizeof buffer, pipe)) result.output.append(buffer, n);
  result.status = ::pclose(pipe);
  return result;
}

// The ConfigError `fn` throws (fails the test if it throws none).
template <typename Fn>
ConfigError configErrorOf(Fn&& fn) {
  try {
    fn();
  } catch (const ConfigError& e) {
    return e;
  }
  ADD_FAILURE() << "no ConfigError thrown";
  return ConfigError("<none>", "");
}

// A strategy's per-communicator split (bytesByComm, exposedSecondsByComm)
// sums to its totals (bytes, exposedSeconds). Stats: DdpSyncStats or
// DataParallelStats. Throws (TESSERA_CHECK) otherwise, so it works in workers.
template <typename Stats>
void expectPerCommSumsToTotal(const Stats& stats) {
  int64_t bytes = 0;
  double exposed = 0;
  for (const auto& entry : stats.bytesByComm) bytes += entry.second;
  for (const auto& entry : stats.exposedSecondsByComm) exposed += entry.second;
  TESSERA_CHECK_EQ(bytes, stats.bytes);
  TESSERA_CHECK(std::abs(exposed - stats.exposedSeconds) <= 1e-9 * std::max(1.0, stats.exposedSeconds),
                "per-comm exposed " << exposed << " s vs total " << stats.exposedSeconds << " s");
}

}  // namespace tessera::testing
