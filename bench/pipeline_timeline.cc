// Timeline PNGs through gnuplot, as bench/chaos/report.cc plots: a script
// written next to nothing the caller owns (a temporary file), run by the
// gnuplot that scripts/setup.sh installs. Blocks are gnuplot rectangles
// (`set object rect`) with labels; an empty plot draws the axes and a key.
#include "bench/pipeline_timeline.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "tessera/core/error.h"

namespace tessera::bench {
namespace {

namespace fs = std::filesystem;

// The paper's palette: F light blue, B dark blue, W green; fused BW purple.
// Index 1: a rank's later chunks (ZB-V, interleaved), a darker shade.
const char* colourOf(char kind, bool laterChunk) {
  switch (kind) {
    case 'F': return laterChunk ? "#4f8fd0" : "#9cc5ef";
    case 'B': return laterChunk ? "#1c3f7a" : "#3266b8";
    case 'W': return laterChunk ? "#2f8a3a" : "#7ccb7f";
    default: return laterChunk ? "#5e3c99" : "#9f7fd0";
  }
}

std::string readAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream out;
  out << in.rdbuf();
  return out.str();
}

}  // namespace

void writeTimelinePng(const std::vector<TimelineBlock>& blocks, const std::string& title, const std::string& pngPath) {
  TESSERA_CHECK_ARG(!blocks.empty(), "timeline '" << title << "' has no blocks to draw");
  double t0 = blocks.front().start, t1 = blocks.front().end;
  int ranks = 0;
  std::map<int, std::set<int>> chunksOf;  // rank -> chunks seen, to shade the later ones
  for (const auto& b : blocks) {
    t0 = std::min(t0, b.start);
    t1 = std::max(t1, b.end);
    ranks = std::max(ranks, b.rank + 1);
    chunksOf[b.rank].insert(b.chunk);
  }
  const double span = std::max(t1 - t0, 1e-12);
  const int width = 1600, height = 140 + 46 * ranks;
  // A label fits when the block is at least ~14 pixels wide.
  const double minLabelWidth = span * 14.0 / (width - 160);

  const fs::path script = fs::temp_directory_path() / ("tessera-timeline-" + std::to_string(getpid()) + ".gp");
  {
    std::ofstream gp(script);
    gp << "set terminal pngcairo size " << width << "," << height << " font ',10' noenhanced\n"
       << "set output '" << pngPath << "'\n"
       << "set title \"" << title << "\"\n"
       << "set xlabel 'time'\nset xrange [0:" << span << "]\n"
       << "set yrange [" << ranks - 0.5 << ":-0.5]\nset ytics 1\nset ylabel 'rank'\n"
       << "set key outside below horizontal\nunset grid\n";
    int id = 1;
    for (const auto& b : blocks) {
      const bool later = *chunksOf[b.rank].begin() != b.chunk;
      const double x0 = b.start - t0, x1 = b.end - t0;
      gp << "set object " << id++ << " rect from " << x0 << "," << b.rank - 0.4 << " to " << x1 << "," << b.rank + 0.4
         << " fc rgb '" << colourOf(b.kind, later) << "' fs solid 1.0 border lc rgb 'white' lw 0.5\n";
      if (x1 - x0 >= minLabelWidth) {
        gp << "set label " << id << " '" << b.microBatch << "' at " << (x0 + x1) / 2 << "," << b.rank
           << " center front tc rgb '" << (b.kind == 'B' || later ? "white" : "black") << "'\n";
      }
    }
    // The key names the kinds drawn (an empty plot of each, in its colour).
    std::string key;
    for (const auto& [kind, name] : {std::pair<char, const char*>{'F', "F"}, {'B', "B"}, {'W', "W"}, {'X', "BW (fused)"}}) {
      if (std::none_of(blocks.begin(), blocks.end(), [k = kind](const TimelineBlock& b) { return b.kind == k; })) continue;
      key += std::string(key.empty() ? "" : ", ") + "NaN with boxes fs solid fc rgb '" + colourOf(kind, false) +
             "' title '" + name + "'";
    }
    gp << "plot " << key << "\n";
  }
  const std::string log = script.string() + ".log";
  const std::string command = "gnuplot '" + script.string() + "' >'" + log + "' 2>&1";
  TESSERA_CHECK(std::system("command -v gnuplot >/dev/null 2>&1") == 0,
                "cannot draw " << pngPath << ": gnuplot is not installed (scripts/setup.sh installs gnuplot-nox)");
  const int rc = std::system(command.c_str());
  const std::string output = readAll(log);
  TESSERA_CHECK(rc == 0 && fs::exists(pngPath), "gnuplot failed to draw " << pngPath << " (script kept at "
                                                                          << script.string() << "): " << output);
  fs::remove(script);
  fs::remove(log);
}

}  // namespace tessera::bench
