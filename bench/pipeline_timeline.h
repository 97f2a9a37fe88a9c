// Timeline pictures of a pipeline step, like the Zero Bubble paper's figures:
// ranks down, time across, F / B / W blocks in three colours with the
// micro-batch number on each. Used for simulated schedules
// (`tessera-bench pipeline-schedule --png`) and measured runs
// (`tessera-bench pipeline`, from the executor's timestamps).
#pragma once

#include <string>
#include <vector>

namespace tessera::bench {

struct TimelineBlock {
  int rank = 0;
  // 'F', 'B', 'W', or 'X' for a fused BW (drawn in its own colour).
  char kind = 'F';
  int microBatch = 0;
  int chunk = 0;  // global chunk: a rank's later chunks are drawn in a darker shade
  double start = 0, end = 0;  // any time unit; the axis starts at the earliest start
};

// Writes `pngPath` with gnuplot (the script goes to a temporary file, removed
// on success). Throws tessera::Error naming gnuplot when it is missing or
// fails (with its error output), and InvalidArgument for no blocks.
void writeTimelinePng(const std::vector<TimelineBlock>& blocks, const std::string& title, const std::string& pngPath);

}  // namespace tessera::bench
