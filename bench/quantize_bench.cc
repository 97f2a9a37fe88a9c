// tessera-bench quantize: the int8 all-reduce's kernels and the FP8 codecs
// on one core, in this process alone (no ranks, no network), against a naive
// scalar quantizer and memcpy.
//
//   tessera-bench quantize --floats 1M,16M --iters 20
//
// One JSON line per size: quantize_gbps (norm + codes + bucket-mean table),
// naive_quantize_gbps, speedup_vs_naive, dequant_accumulate_gbps (acc +=
// table[code], what a reduce-scatter hop costs the receiver) and
// dequantize_gbps (out = table[code], an all-gather hop); fp8_encode_gbps
// (E4M3, saturating, codes = encode(x * scale) with scale != 1),
// fp8_decode_gbps (out = decode(code) / scale, by the inverse) and
// memcpy_gbps (the same 4n bytes copied), the ceiling a one-pass kernel
// approaches on this machine. GB/s are of float32
// input (4 bytes per value), medians over iterations that interleave the
// kernels so that machine load hits them alike; *_best_gbps: the fastest
// iteration (closest to an unshared core on a busy machine).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "bench/bench_command.h"
#include "comm/compression/int8_quantizer.h"
#include "tessera/core/numerics/fp8.h"
#include "tessera/core/config.h"
#include "tessera/core/metrics.h"
#include "tessera/core/timer.h"

namespace tessera::bench {
namespace {

struct QuantizeBenchConfig {
  std::vector<int64_t> floats = {1 << 20, 16 << 20};  // values per buffer
  int iterations = 20;                                  // timed iterations per kernel and size

  void validate() const {
    TESSERA_CHECK_CONFIG(!floats.empty(), "floats", "give at least one size");
    for (int64_t n : floats) TESSERA_CHECK_CONFIG(n >= 1, "floats", "sizes must be >= 1, got " << n);
    TESSERA_CHECK_CONFIG(iterations >= 1, "iterations", "must be >= 1, got " << iterations);
  }
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

void runQuantizeBench(const QuantizeBenchConfig& config) {
  for (const int64_t n : config.floats) {
    std::vector<float> x(static_cast<size_t>(n)), acc(static_cast<size_t>(n), 0.0f), out(static_cast<size_t>(n));
    std::vector<float> copy(static_cast<size_t>(n));
    std::vector<uint8_t> fp8Codes(static_cast<size_t>(n));
    std::vector<uint8_t> codes(static_cast<size_t>(n));
    float table[comm::int8::kBins];
    std::mt19937 gen(1234);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& v : x) v = normal(gen);

    // A current-scaling recipe's scale: fp8 max over amax (not a power of two).
    const float fp8Scale = numerics::fp8Max(numerics::Fp8Format::kE4M3) / 5.3f;
    enum Kernel { kQuantize, kNaive, kDequantAccumulate, kDequantize, kFp8Encode, kFp8Decode, kMemcpy, kKernels };
    auto runKernel = [&](int kernel) {
      switch (kernel) {
        case kQuantize:
          comm::int8::quantize(x.data(), n, codes.data(), table);
          break;
        case kNaive:
          comm::int8::quantizeNaive(x.data(), n, codes.data(), table);
          break;
        case kDequantAccumulate:
          comm::int8::dequantizeAccumulate(codes.data(), table, n, acc.data());
          break;
        case kFp8Encode:
          numerics::encodeFp8(x.data(), n, fp8Scale, fp8Codes.data(), numerics::Fp8Format::kE4M3,
                              numerics::Overflow::kSaturate);
          break;
        case kFp8Decode:
          numerics::decodeFp8(fp8Codes.data(), n, 1.0f / fp8Scale, out.data(), numerics::Fp8Format::kE4M3);
          break;
        case kMemcpy:
          std::memcpy(copy.data(), x.data(), 4 * static_cast<size_t>(n));
          asm volatile("" : : "r"(copy.data()) : "memory");  // the copy is never read: keep it
          break;
        default:
          comm::int8::dequantize(codes.data(), table, n, out.data());
      }
    };
    for (int k = 0; k < kKernels; ++k) runKernel(k);  // warm-up: page in every buffer
    std::vector<std::vector<double>> seconds(kKernels);
    for (int i = 0; i < config.iterations; ++i) {
      for (int j = 0; j < kKernels; ++j) {
        const int k = (i + j) % kKernels;  // rotate the order
        Stopwatch watch;
        runKernel(k);
        seconds[k].push_back(watch.seconds());
      }
    }
    auto gbps = [&](int k) { return 4.0 * static_cast<double>(n) / median(seconds[k]) / 1e9; };
    // The fastest iteration: what the kernel does when the core is not shared.
    auto bestGbps = [&](int k) {
      return 4.0 * static_cast<double>(n) / *std::min_element(seconds[k].begin(), seconds[k].end()) / 1e9;
    };
    MetricsRecord record;
    record.add("bench", "quantize")
        .add("floats", n)
        .add("bytes", 4 * n)
        .add("iterations", config.iterations)
        .add("quantize_gbps", gbps(kQuantize))
        .add("naive_quantize_gbps", gbps(kNaive))
        .add("speedup_vs_naive", gbps(kQuantize) / gbps(kNaive))
        .add("dequant_accumulate_gbps", gbps(kDequantAccumulate))
        .add("dequantize_gbps", gbps(kDequantize))
        .add("quantize_best_gbps", bestGbps(kQuantize))
        .add("naive_quantize_best_gbps", bestGbps(kNaive))
        .add("dequant_accumulate_best_gbps", bestGbps(kDequantAccumulate))
        .add("fp8_encode_gbps", gbps(kFp8Encode))
        .add("fp8_decode_gbps", gbps(kFp8Decode))
        .add("memcpy_gbps", gbps(kMemcpy))
        .add("fp8_encode_best_gbps", bestGbps(kFp8Encode))
        .add("fp8_decode_best_gbps", bestGbps(kFp8Decode))
        .add("memcpy_best_gbps", bestGbps(kMemcpy));
    std::printf("%s\n", record.toJson().c_str());
    std::fflush(stdout);
  }
}

}  // namespace

std::unique_ptr<BenchCommand> addQuantizeCommand(CLI::App& app) {
  auto command = std::make_unique<BenchCommand>();
  command->app = app.add_subcommand("quantize", "int8 all-reduce kernels and FP8 codecs on one core vs a naive scalar quantizer and memcpy");
  command->distributed = false;
  auto config = std::make_shared<QuantizeBenchConfig>();
  auto sizes = std::make_shared<std::vector<std::string>>(std::vector<std::string>{"1M", "16M"});
  command->app->add_option("--floats", *sizes, "values per buffer, e.g. 1M,16M (M = 2^20)")->delimiter(',');
  command->app->add_option("--iters", config->iterations, "timed iterations per kernel and size")
      ->check(CLI::PositiveNumber);
  command->validate = [config, sizes] {
    config->floats.clear();
    for (const auto& s : *sizes) config->floats.push_back(parseBytes(s));
    config->validate();
  };
  command->run = [config](DistributedContext*) {
    at::set_num_threads(1);
    runQuantizeBench(*config);
  };
  return command;
}

}  // namespace tessera::bench
