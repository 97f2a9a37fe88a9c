// Reading the JSON-lines metrics files that elastic end-to-end tests' nodes
// write (tessera-train --metrics): shared by the elastic e2e tests.
#pragma once

#include <nlohmann/json.hpp>

#include <fstream>
#include <string>
#include <vector>

namespace tessera::testing {

// Every parseable line of `path`, in order (a line cut short by SIGKILL is
// skipped); empty when the file does not exist yet.
inline std::vector<nlohmann::json> readLines(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    try {
      out.push_back(nlohmann::json::parse(line));
    } catch (const nlohmann::json::exception&) {
      // a line cut by SIGKILL
    }
  }
  return out;
}

// The lines whose "event" is `kind` ("outer_step", "recovered", ...).
inline std::vector<nlohmann::json> eventsOf(const std::vector<nlohmann::json>& lines, const std::string& kind) {
  std::vector<nlohmann::json> out;
  for (const auto& j : lines) {
    if (j.contains("event") && j["event"] == kind) out.push_back(j);
  }
  return out;
}

inline std::vector<nlohmann::json> eventsOf(const std::string& path, const std::string& kind) {
  return eventsOf(readLines(path), kind);
}

}  // namespace tessera::testing
