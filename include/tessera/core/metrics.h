// JSON-lines metrics: one JSON object per line, flushed per record, so a run
// that dies keeps every line written before it, and `tail -f`/jq work live.
//
//   MetricsWriter metrics("run.jsonl");
//   metrics.write(MetricsRecord().add("step", 10).add("loss", 2.31));
//
// Not thread-safe: one writer per thread (rank 0's training loop, typically).
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace tessera {

// An ordered set of key/value pairs; keys keep insertion order in the output.
class MetricsRecord {
 public:
  // A nested object, kept as its JSON text.
  struct Object {
    std::string json;
  };
  using Value = std::variant<int64_t, double, bool, std::string, Object>;

  MetricsRecord& add(std::string key, int64_t value);
  MetricsRecord& add(std::string key, int value) { return add(std::move(key), int64_t{value}); }
  MetricsRecord& add(std::string key, uint64_t value) {
    return add(std::move(key), static_cast<int64_t>(value));
  }
  MetricsRecord& add(std::string key, double value);
  MetricsRecord& add(std::string key, bool value);
  MetricsRecord& add(std::string key, std::string value);
  MetricsRecord& add(std::string key, const char* value) { return add(std::move(key), std::string(value)); }
  // A nested object: "key": {...}.
  MetricsRecord& add(std::string key, const MetricsRecord& object);

  // One line of JSON, no trailing newline. Non-finite doubles become null.
  std::string toJson() const;

 private:
  std::vector<std::pair<std::string, Value>> fields_;
};

// Escapes a string for inclusion in JSON (quotes included).
std::string jsonQuote(const std::string& text);

class MetricsWriter {
 public:
  // Opens path, truncating it (or appending: a restarted elastic node keeps
  // its earlier lines); "-" writes to stdout. Throws Error naming the path.
  explicit MetricsWriter(const std::string& path, bool append = false);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;

  void write(const MetricsRecord& record);
  // One line already in JSON (event records made elsewhere).
  void writeLine(const std::string& json);

 private:
  std::FILE* file_ = nullptr;
  bool ownsFile_ = false;
};

}  // namespace tessera
