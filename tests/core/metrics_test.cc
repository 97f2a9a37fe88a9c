// JSON-lines metrics: one valid JSON object per line, keys in insertion order.
#include <gtest/gtest.h>

#include <fstream>

#include "tessera/core/error.h"
#include "tessera/core/metrics.h"

namespace tessera {
namespace {

TEST(Metrics, RecordSerializesTypesInOrder) {
  MetricsRecord r;
  r.add("step", 10).add("loss", 2.5).add("ok", true).add("phase", "train");
  EXPECT_EQ(r.toJson(), R"({"step": 10, "loss": 2.5, "ok": true, "phase": "train"})");
}

TEST(Metrics, NonFiniteBecomesNullAndStringsAreEscaped) {
  MetricsRecord r;
  r.add("nan", std::nan("")).add("msg", std::string("a\"b\\c\n\x01"));
  EXPECT_EQ(r.toJson(), R"({"nan": null, "msg": "a\"b\\c\n\u0001"})");
}

TEST(Metrics, WriterAppendsOneLinePerRecord) {
  const std::string path = "/tmp/tessera-metrics-test-" + std::to_string(getpid()) + ".jsonl";
  {
    MetricsWriter w(path);
    w.write(MetricsRecord().add("step", 1));
    w.write(MetricsRecord().add("step", 2));
  }
  std::ifstream in(path);
  std::string a, b, c;
  std::getline(in, a);
  std::getline(in, b);
  EXPECT_EQ(a, R"({"step": 1})");
  EXPECT_EQ(b, R"({"step": 2})");
  EXPECT_FALSE(std::getline(in, c));
  std::remove(path.c_str());
}

TEST(Metrics, UnwritablePathIsAClearError) {
  try {
    MetricsWriter w("/nonexistent-dir/m.jsonl");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent-dir/m.jsonl"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace tessera
