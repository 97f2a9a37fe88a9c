// tessera's CUDA paths, checked on a machine with one NVIDIA GPU
// (scripts/gpu-check.sh; issue 15 §2), each against an independent path the
// test computes itself:
//   - one GPT training step (forward, loss, backward, clip, AdamW) on CUDA
//     tensors against the same step on the CPU, directly and then three steps
//     through the Trainer with TrainerParts::device;
//   - the FP8 Linear's forward through at::_scaled_mm (precision.cc) against
//     its CPU emulation and an fp64 GEMM of the same quantized operands;
//   - activation offload of a CUDA activation to pinned host memory and back
//     (parallel/pipeline/offload.h), gradients bitwise those without offload.
// Not here: NCCL on CUDA tensors (tests/comm/nccl/nccl_test.cc).
//
// Without a CUDA device -- a CPU-only libtorch such as Debian's, or no GPU --
// every test skips, saying why. TESSERA_REQUIRE_CUDA=1 turns those skips into
// failures, so that the GPU check cannot pass by skipping (e.g. a build whose
// link dropped libtorch_cuda, which makes torch::cuda::is_available() false).
//
// The tolerances are derived next to each comparison. The common ground:
// fp32 GEMMs and reductions on CPU and CUDA add the same terms in different
// orders, so two correct results differ by a few ulps of the values summed;
// TF32 (10-bit mantissa products on tensor cores) would add ~1e-3 relative
// errors and is switched off for the comparisons (Fp32Matmuls).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <ATen/Context.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "parallel/pipeline/offload_internal.h"
#include "tessera/core/data/byte_corpus.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/models/layer_options.h"
#include "tessera/core/models/linear.h"
#include "tessera/core/models/precision.h"
#include "tessera/core/numerics/fp8_scaling.h"
#include "tessera/core/numerics/torch_float8.h"
#include "tessera/core/trainable.h"
#include "tessera/optim/grad_clip.h"
#include "tessera/optim/lr_schedule.h"
#include "tessera/optim/optimizer.h"
#include "tessera/parallel/data_parallel.h"
#include "tessera/parallel/pipeline/offload.h"
#include "tessera/train/trainer.h"
#include "tests/harness/fixtures.h"
#include "tests/harness/fp8_reference.h"

namespace tessera {
namespace {

// ---- When the tests can run ---------------------------------------------------

// Empty when CUDA tensors can be made here, else why not.
std::string cudaSkipReason() {
  if (torch::cuda::is_available()) return "";
  if (!at::globalContext().hasCUDART()) {
    return "this libtorch has no CUDA (a CPU-only build such as Debian's libtorch-dev, or a link that "
           "dropped libtorch_cuda): the CUDA paths are compile-checked only";
  }
  return "libtorch has CUDA but sees no CUDA device (no GPU, or CUDA_VISIBLE_DEVICES hides it)";
}

bool cudaRequired() {
  const char* value = std::getenv("TESSERA_REQUIRE_CUDA");
  return value != nullptr && std::string(value) == "1";
}

#define TESSERA_SKIP_WITHOUT_CUDA()                                              \
  do {                                                                           \
    const std::string reason_ = cudaSkipReason();                                \
    if (!reason_.empty()) {                                                      \
      if (cudaRequired()) {                                                      \
        FAIL() << reason_ << " -- and TESSERA_REQUIRE_CUDA=1 forbids a skip";    \
      }                                                                          \
      GTEST_SKIP() << reason_;                                                   \
    }                                                                            \
  } while (0)

const c10::Device kCuda(c10::kCUDA, 0);

// While alive: fp32 GEMMs and convolutions on CUDA in full fp32 (no TF32).
// cuBLAS TF32 is off by default since torch 1.12, cuDNN's is on; both are
// process-wide settings, restored on exit.
class Fp32Matmuls {
 public:
  Fp32Matmuls() : cublas_(ctx().allowTF32CuBLAS()), cudnn_(ctx().allowTF32CuDNN()) {
    ctx().setAllowTF32CuBLAS(false);
    ctx().setAllowTF32CuDNN(false);
  }
  ~Fp32Matmuls() {
    ctx().setAllowTF32CuBLAS(cublas_);
    ctx().setAllowTF32CuDNN(cudnn_);
  }
  Fp32Matmuls(const Fp32Matmuls&) = delete;
  Fp32Matmuls& operator=(const Fp32Matmuls&) = delete;

 private:
  static at::Context& ctx() { return at::globalContext(); }
  bool cublas_, cudnn_;
};

// ---- Comparisons -----------------------------------------------------------------

// torch.allclose's test, elementwise: |actual - expected| <= atol + rtol |expected|
// (in fp64, on the CPU). A failure names `what`, the largest difference and
// how far the worst element is outside its bound. NaN fails.
void expectAllClose(const at::Tensor& actual, const at::Tensor& expected, double rtol, double atol,
                    const std::string& what) {
  const at::Tensor a = actual.detach().to(at::kCPU, at::kDouble);
  const at::Tensor e = expected.detach().to(at::kCPU, at::kDouble);
  ASSERT_EQ(a.sizes(), e.sizes()) << what;
  const at::Tensor diff = (a - e).abs();
  const double excess = (diff - (atol + rtol * e.abs())).max().item<double>();
  EXPECT_LE(excess, 0.0) << what << ": max |diff| " << diff.max().item<double>() << ", worst element "
                         << excess << " beyond atol " << atol << " + rtol " << rtol << " * |expected|";
}

// |actual - expected| <= bound elementwise (all fp64 on the CPU), reported
// as the worst ratio |diff| / bound.
void expectWithinBound(const at::Tensor& actual, const at::Tensor& expected, const at::Tensor& bound,
                       const std::string& what) {
  const at::Tensor a = actual.detach().to(at::kCPU, at::kDouble);
  const at::Tensor diff = (a - expected.detach().to(at::kCPU, at::kDouble)).abs();
  const at::Tensor b = bound.to(at::kCPU, at::kDouble);
  const double worst = (diff / b).max().item<double>();
  EXPECT_LE(worst, 1.0) << what << ": max |diff| " << diff.max().item<double>() << " reaches " << worst
                        << " x its bound";
}

// ---- 1. The GPT step on CUDA against the CPU ------------------------------------
//
// Both models hold the same fp32 parameters, see the same batch and draw the
// same dropout masks (random.h: computed on the CPU from (seed, step,
// micro-batch, site, index), then moved to x's device), so the two steps
// differ only by the order in which kernels add fp32 terms.
//
// Tolerances, sized on an fp32 run of these three steps against the same
// run in fp64 on the CPU (two fp32 runs, CPU and CUDA, each that far from
// the exact values, differ by about twice that at most):
//   loss and gradient norm: measured <= 1.2e-7 and 2e-7 relative; checked
//     at 1e-5 relative, while a real bug (a wrong mask, a missing residual or
//     clip) moves them by > 1e-3;
//   gradients: rtol 1e-4 plus atol 1e-5 * the largest gradient element
//     (measured needs: <= 6e-7 * it; gradients whose exact value is 0 -- the
//     k-bias, softmax being shift-invariant -- come out as rounding noise);
//   parameters after AdamW: rtol 1e-4, atol 1e-5 (measured <= 1.7e-6). The
//     update lr * m / (sqrt(v) + eps) is about lr = 1e-3 per element, so a
//     bug in it shows at 1e-3. Its sensitivity to a gradient difference d is
//     up to lr * d / eps, which is why eps = 1e-6 here (not 1e-8): rounding
//     noise of 1e-9 in a zero gradient stays a 1e-6 difference in the update.

constexpr double kLr = 1e-3;
constexpr double kClip = 0.5;  // below the first step's norm (checked), so clipping scales

optim::OptimizerConfig adamw() {
  optim::OptimizerConfig c;
  c.name = "adamw";
  c.beta1 = 0.9;
  c.beta2 = 0.95;
  c.eps = 1e-6;  // see above
  c.weight_decay = 0.1;
  return c;
}

// A GPT whose parameters and buffers are copies of `source`'s (a deep copy:
// nothing is shared), on `device`.
models::Gpt copyOf(const models::Gpt& source, c10::Device device) {
  models::Gpt copy(source->config());
  {
    torch::NoGradGuard noGrad;
    auto parameters = copy->named_parameters();
    for (const auto& item : source->named_parameters()) parameters[item.key()].copy_(item.value());
    auto buffers = copy->named_buffers();
    for (const auto& item : source->named_buffers()) buffers[item.key()].copy_(item.value());
  }
  copy->to(device);
  return copy;
}

// The model, the strategy over it (a single replica: no communication, the
// Trainer's dp for one process) and the optimizer; built after the move to
// the device, as parallelize() does.
struct GptRun {
  models::Gpt gpt;
  std::unique_ptr<parallel::DataParallel> dp;
  std::unique_ptr<optim::Optimizer> optimizer;

  explicit GptRun(models::Gpt model) : gpt(std::move(model)) {
    dp = parallel::makeNoDataParallel(*gpt);
    optimizer = optim::makeOptimizer(adamw(), dp->optimizerParameters(), kLr);
  }
};

struct StepOutcome {
  double loss = 0;
  double norm = 0;                 // before clipping
  std::vector<at::Tensor> grads;   // before clipping, on the CPU, in named_parameters() order
};

// One training step as the Trainer runs it for one process and one
// micro-batch: keyed forward, loss, backward, sync (none), clip, AdamW, zero.
StepOutcome trainStep(GptRun& run, const at::Tensor& idx, const at::Tensor& targets, int64_t step) {
  const c10::Device device = run.gpt->parameters().front().device();
  run.gpt->setRandomKey(step, 0);
  const at::Tensor loss = run.gpt->loss(idx.to(device), targets.to(device));  // ()
  loss.backward();
  run.dp->finishGradientSync();
  StepOutcome out;
  out.loss = loss.item<double>();
  for (const auto& item : run.gpt->named_parameters()) {
    out.grads.push_back(item.value().grad().detach().to(at::kCPU).clone());  // clone: the CPU grad is zeroed below
  }
  out.norm = optim::clipGradNorm(*run.dp, kClip);
  run.optimizer->step();
  run.optimizer->zeroGrad();
  return out;
}

// (B, T) = (4, 8) token ids in [0, V) and next-token targets: fixed by `seed`.
std::pair<at::Tensor, at::Tensor> syntheticBatch(const models::GptConfig& config, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const at::Tensor tokens = at::randint(config.vocab_size, {4, config.block_size + 1}, gen);  // (B, T + 1)
  return {tokens.narrow(1, 0, config.block_size).contiguous(), tokens.narrow(1, 1, config.block_size).contiguous()};
}

void expectSameParameters(const models::Gpt& cuda, const models::Gpt& cpu, const std::string& when) {
  auto reference = cpu->named_parameters();
  for (const auto& item : cuda->named_parameters()) {
    EXPECT_TRUE(item.value().is_cuda()) << item.key();
    expectAllClose(item.value(), reference[item.key()], 1e-4, 1e-5, when + " " + item.key());
  }
}

TEST(CudaPaths, GptStepOnCudaMatchesCpu) {
  TESSERA_SKIP_WITHOUT_CUDA();
  Fp32Matmuls fp32;
  GptRun cpu(models::Gpt(testing::smallGpt(/*tied=*/true)));
  GptRun cuda(copyOf(cpu.gpt, kCuda));
  for (const auto& item : cuda.gpt->named_parameters()) {
    ASSERT_TRUE(at::equal(item.value().cpu(), cpu.gpt->named_parameters()[item.key()])) << "copy of " << item.key();
  }

  for (int64_t step = 0; step < 3; ++step) {
    const auto [idx, targets] = syntheticBatch(cpu.gpt->config(), 100 + static_cast<uint64_t>(step));
    const StepOutcome expected = trainStep(cpu, idx, targets, step);
    const StepOutcome actual = trainStep(cuda, idx, targets, step);
    const std::string when = "step " + std::to_string(step);

    EXPECT_NEAR(actual.loss, expected.loss, 1e-5 * std::abs(expected.loss)) << when << ": loss";
    EXPECT_NEAR(actual.norm, expected.norm, 1e-5 * expected.norm) << when << ": gradient norm";
    if (step == 0) {
      EXPECT_GT(expected.norm, kClip) << "the first step's norm must exceed the clip, so that clipping runs";
    }
    double largest = 0;
    for (const at::Tensor& g : expected.grads) largest = std::max(largest, g.abs().max().item<double>());
    size_t i = 0;
    for (const auto& item : cpu.gpt->named_parameters()) {
      expectAllClose(actual.grads[i], expected.grads[i], 1e-4, 1e-5 * largest, when + " gradient of " + item.key());
      ++i;
    }
    expectSameParameters(cuda.gpt, cpu.gpt, "after " + when + ":");
  }
}

// ---- 1b. The same through the Trainer (TrainerParts::device) -------------------------
//
// Three steps of tessera's own loop on each device, fed by the same
// sampler: the Trainer moves each CPU batch to parts.device. Tolerances as
// above (the fp64 study covered three steps, so the drift of parameters that
// already differ by rounding is inside them).

struct TrainerOutcome {
  std::vector<double> losses, norms;
};

TrainerOutcome trainThreeSteps(models::Gpt gpt, c10::Device device) {
  std::unique_ptr<TrainableModel> model = makeTrainable(gpt);
  std::unique_ptr<parallel::DataParallel> dp = parallel::makeNoDataParallel(*gpt);
  std::unique_ptr<optim::Optimizer> optimizer = optim::makeOptimizer(adamw(), dp->optimizerParameters(), kLr);
  at::Generator gen = at::detail::createCPUGenerator(21);
  const at::Tensor bytes = at::randint(gpt->config().vocab_size, {200}, gen).to(at::kByte);  // (N,) token ids
  data::DistributedSampler::Options sampling;
  sampling.batchSize = 4;
  sampling.seed = 3;
  std::unique_ptr<BatchSource> train = makeBatchSource(data::LmDataset(bytes, gpt->config().block_size), sampling);

  TrainerParts parts;
  parts.model = model.get();
  parts.dp = dp.get();
  parts.optimizer = optimizer.get();
  optim::LrScheduleConfig schedule;
  schedule.schedule = "constant";
  schedule.lr = kLr;
  parts.schedule = optim::makeLrSchedule(schedule, 3);
  parts.train = train.get();
  parts.reportsProgress = false;
  parts.device = device;
  TrainConfig config;
  config.steps = 3;
  config.clip = kClip;
  config.eval_every = 0;
  config.eval_batches = 0;
  config.log_every = 100;
  config.progress = false;
  config.device = device.is_cuda() ? "cuda:0" : "cpu";

  TrainerOutcome out;
  Trainer trainer(parts, config);
  trainer.callbacks().afterStep.push_back([&](const StepReport& report) {
    out.losses.push_back(report.loss);
    out.norms.push_back(report.gradNorm);
  });
  trainer.run();
  return out;
}

TEST(CudaPaths, GptTrainerOnCudaMatchesCpu) {
  TESSERA_SKIP_WITHOUT_CUDA();
  Fp32Matmuls fp32;
  const models::Gpt cpu(testing::smallGpt(/*tied=*/false));
  const models::Gpt cuda = copyOf(cpu, kCuda);
  const TrainerOutcome expected = trainThreeSteps(cpu, c10::Device(c10::kCPU));
  const TrainerOutcome actual = trainThreeSteps(cuda, kCuda);
  ASSERT_EQ(expected.losses.size(), 3u);
  ASSERT_EQ(actual.losses.size(), 3u);
  for (size_t s = 0; s < 3; ++s) {
    EXPECT_NEAR(actual.losses[s], expected.losses[s], 1e-5 * std::abs(expected.losses[s])) << "loss of step " << s + 1;
    EXPECT_NEAR(actual.norms[s], expected.norms[s], 1e-5 * expected.norms[s]) << "norm of step " << s + 1;
  }
  expectSameParameters(cuda, cpu, "after 3 Trainer steps:");
}

// ---- 2. FP8 Linear: at::_scaled_mm against the CPU emulation ------------------------
//
// Both layers quantize on the CPU (Fp8Scaler::quantize: the codec is CPU
// code; a CUDA operand's codes and scale come back to its device), so they
// multiply the same codes with the same scales; with power-of-two scales
// every product x_q * w_q is exact in fp32 (4 + 4 significant bits). The
// outputs differ only in how the K products of each element are summed:
//   CPU: an fp32 GEMM of the decoded operands, |err| <= K u S with
//        u = 2^-24 and S = sum_k |x_q w_q| (the element's absolute sum);
//   CUDA: _scaled_mm, use_fast_accum off (precision.cc passes the default),
//        so cuBLAS promotes partial sums to fp32 periodically, but inside a
//        chunk Hopper's FP8 tensor cores keep only ~14 bits of the running
//        sum (DeepSeek-V3, arXiv 2412.19437 §3.3.2): each of the K additions
//        may lose up to 2^-13 of S, so |err| <= K 2^-13 S.
// With K = 64 the bound is 2^-7 S (0.8 % of S), while a wrong result -- a
// scale applied twice or not at all, W transposed -- moves an element by
// about |y| ~ S / sqrt(K) = S / 8 on average, far outside it (measured with
// the CPU standing in for CUDA: an output 2 % too large already fails, one
// E4M3 step of scale error (6.25 %) fails at 4.7 x the bound). Rather than
// loosening the CPU check to the CUDA one, both are checked against an fp64
// GEMM of the same fake-quantized operands (tests/harness/fp8_reference.h,
// written independently of the layer's codec use).

#if TESSERA_HAS_TORCH_FLOAT8

// Records the names of the ATen ops dispatched on THIS thread while alive,
// through RecordFunction (the profiler's hook): evidence of which kernel a
// layer ran, free of timing. One recorder per thread at a time.
class OpRecorder {
 public:
  OpRecorder() {
    current() = this;
    handle_ = at::addThreadLocalCallback(
        at::RecordFunctionCallback(&OpRecorder::onStart).scopes({at::RecordScope::FUNCTION}));
  }
  ~OpRecorder() {
    at::removeCallback(handle_);
    current() = nullptr;
  }
  OpRecorder(const OpRecorder&) = delete;
  OpRecorder& operator=(const OpRecorder&) = delete;

  bool saw(const std::string& op) const { return names_.count(op) > 0; }
  std::string seen() const {
    std::ostringstream out;
    for (const std::string& name : names_) out << name << ' ';
    return out.str();
  }

 private:
  static OpRecorder*& current() {
    thread_local OpRecorder* recorder = nullptr;
    return recorder;
  }
  static std::unique_ptr<at::ObserverContext> onStart(const at::RecordFunction& fn) {
    if (OpRecorder* recorder = current()) recorder->names_.insert(fn.name());
    return nullptr;
  }

  at::CallbackHandle handle_;
  std::set<std::string> names_;
};

// c10::Error text of a GPU _scaled_mm does not support (below sm_89).
bool isUnsupportedDeviceError(const std::string& what) {
  return what.find("compute capability") != std::string::npos || what.find("sm_89") != std::string::npos ||
         what.find("sm89") != std::string::npos;
}

#endif  // TESSERA_HAS_TORCH_FLOAT8

TEST(CudaPaths, Fp8ScaledMmMatchesEmulation) {
  TESSERA_SKIP_WITHOUT_CUDA();
#if !TESSERA_HAS_TORCH_FLOAT8
  GTEST_SKIP() << "libtorch " << TORCH_VERSION << " has no float8 dtypes (torch < 2.1): fp8Linear has no "
               << "_scaled_mm path to check";
#else
  constexpr int64_t kIn = 64, kOut = 48;  // K and N: multiples of 16, as _scaled_mm needs
  for (numerics::ScalingRecipe recipe : {numerics::ScalingRecipe::kTensorwise, numerics::ScalingRecipe::kDelayed}) {
    numerics::Fp8RecipeConfig fp8;
    fp8.recipe = recipe;
    fp8.amax_history = 4;
    models::LayerOptions options;
    options.precision = models::Precision::kFp8;
    options.fp8 = fp8;
    at::manual_seed(11);
    models::Linear cpu(kIn, kOut, /*bias=*/true, options);
    models::Linear cuda(kIn, kOut, /*bias=*/true, options);
    {
      torch::NoGradGuard noGrad;
      cuda->weight.copy_(cpu->weight);
      cuda->bias.copy_(cpu->bias.normal_(0, 0.1));  // a nonzero bias, added after the GEMM on both paths
    }
    cuda->to(kCuda);
    testing::RefDelayed refX, refW;  // the reference's own delayed-scaling windows

    // Three forwards of growing magnitude (delayed: the window moves).
    for (int call = 0; call < 3; ++call) {
      const std::string what = std::string(numerics::toString(recipe)) + " call " + std::to_string(call);
      at::Generator gen = at::detail::createCPUGenerator(40 + static_cast<uint64_t>(call));
      const at::Tensor x = at::randn({4, 8, kIn}, gen) * (call + 1);  // (B, T, K): M = 32 rows
      torch::NoGradGuard noGrad;  // the forward-only condition of the _scaled_mm path
      const at::Tensor yCpu = cpu->forward(x);
      at::Tensor yCuda;
      {
        OpRecorder ops;
        try {
          yCuda = cuda->forward(x.to(kCuda));
        } catch (const c10::Error& e) {
          const std::string text = e.what_without_backtrace();
          if (isUnsupportedDeviceError(text)) GTEST_SKIP() << "at::_scaled_mm refuses this GPU: " << text;
          throw;
        }
        EXPECT_TRUE(ops.saw("aten::_scaled_mm")) << what << ": the CUDA forward did not run at::_scaled_mm "
                                                 << "(ops seen: " << ops.seen() << ")";
      }
      ASSERT_TRUE(yCuda.is_cuda()) << what;
      ASSERT_EQ(yCuda.scalar_type(), at::kFloat) << what;
      ASSERT_EQ(yCuda.sizes(), yCpu.sizes()) << what;
      EXPECT_TRUE(at::equal(cuda->fp8Scalers()->input->lastScale().cpu(), cpu->fp8Scalers()->input->lastScale()))
          << what << ": the two layers cast x with different scales";
      EXPECT_TRUE(at::equal(cuda->fp8Scalers()->weight->lastScale().cpu(), cpu->fp8Scalers()->weight->lastScale()))
          << what << ": the two layers cast W with different scales";

      // The reference: fp64 GEMM of the fake-quantized operands.
      const at::Tensor xq = testing::refFakeQuant(x, fp8, numerics::Fp8Role::kInput, refX.next(fp8, 448.0f));
      const at::Tensor wq =
          testing::refFakeQuant(cpu->weight.detach(), fp8, numerics::Fp8Role::kWeight, refW.next(fp8, 448.0f));
      refX.seen.push_back(testing::amaxOf(x));
      refW.seen.push_back(testing::amaxOf(cpu->weight.detach()));
      const at::Tensor xd = xq.to(at::kDouble), wd = wq.to(at::kDouble);
      const at::Tensor exact = at::linear(xd, wd, cpu->bias.detach().to(at::kDouble));  // (B, T, N)
      const at::Tensor absSum = at::linear(xd.abs(), wd.abs());                         // S per element
      // The fp32 output and the bias add round once more each: |y| u per rounding.
      const at::Tensor outputRounding = exact.abs() * 2 * std::ldexp(1.0, -24);
      expectWithinBound(yCpu, exact, absSum * (kIn * std::ldexp(1.0, -24)) + outputRounding + 1e-30,
                        what + ": CPU emulation vs fp64");
      expectWithinBound(yCuda, exact, absSum * (kIn * std::ldexp(1.0, -13)) + outputRounding + 1e-30,
                        what + ": CUDA _scaled_mm vs fp64");
      expectWithinBound(yCuda, yCpu, absSum * (kIn * (std::ldexp(1.0, -13) + std::ldexp(1.0, -24))) +
                                         2 * outputRounding + 1e-30,
                        what + ": CUDA _scaled_mm vs CPU emulation");
    }
  }
#endif
}

// ---- 3. Activation offload of CUDA tensors to pinned memory ---------------------------
//
// y = sin(h), h = 2x, through an autograd Function that saves h itself: the
// pool captures h under key 0, offload() copies its storage to the host and
// drops the device copy, reload() brings it back; the Function's backward
// then sees what autograd unpacked, which must be h's bits on h's device in
// a NEW storage (the round trip, not the original). Everything is exact:
// the copies move bytes, and the gradient 2 cos(h) is computed from the same
// bits with and without offload, by the same kernels.

// The tensor the latest SinSavingInput backward got back from autograd.
// Written on the autograd engine's CUDA thread; read after backward()
// returned (which orders the two).
std::mutex unpackedMutex;
at::Tensor lastUnpacked;

struct SinSavingInput : torch::autograd::Function<SinSavingInput> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& h) {
    ctx->save_for_backward({h});
    return h.sin();
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor h = ctx->get_saved_variables()[0];
    {
      std::lock_guard<std::mutex> lock(unpackedMutex);
      lastUnpacked = h.detach();
    }
    return {grads[0] * h.cos()};
  }
};

at::Tensor bytesOf(const c10::Storage& storage) {
  at::Tensor bytes = at::empty({0}, at::TensorOptions().dtype(at::kByte).device(storage.device()));
  bytes.set_(storage, 0, {static_cast<int64_t>(storage.nbytes())}, {1});
  return bytes;
}

TEST(CudaPaths, ActivationOffloadToPinnedMemory) {
  TESSERA_SKIP_WITHOUT_CUDA();
  using parallel::pipeline::ActivationPool;
  at::Generator gen = at::detail::createCPUGenerator(9);
  const at::Tensor x0 = at::randn({64, 48}, gen);  // 12 KiB of fp32

  // Without offload: the reference gradient.
  const at::Tensor xPlain = x0.to(kCuda).requires_grad_();
  SinSavingInput::apply(xPlain * 2.0).sum().backward();
  const at::Tensor gradPlain = xPlain.grad().cpu();

  ActivationPool::Options options;
  options.policy = "all";
  options.minBytes = 1;
  options.timeoutSeconds = 60;
  ActivationPool pool(options);
  const at::Tensor x = x0.to(kCuda).requires_grad_();
  at::Tensor h, loss;
  {
    auto capture = pool.capture(0);
    h = x * 2.0;  // mul by a scalar saves no tensor: h is the only saved one
    loss = SinSavingInput::apply(h).sum();
  }
  const at::Tensor hBits = h.detach().cpu();
  const int64_t hBytes = static_cast<int64_t>(h.storage().nbytes());
  EXPECT_EQ(pool.residentBytes(), hBytes) << "the pool holds h's storage, and only it";
  pool.offload(0);
  pool.waitIdle();
  EXPECT_EQ(pool.residentBytes(), 0) << "h's device copy left the compute pool";
  pool.reload(0);
  pool.waitIdle();
  EXPECT_EQ(pool.residentBytes(), hBytes) << "h is back on the device";

  loss.backward();
  pool.release(0);
  at::Tensor unpacked;
  {
    std::lock_guard<std::mutex> lock(unpackedMutex);
    unpacked = lastUnpacked;
    lastUnpacked = at::Tensor();
  }
  ASSERT_TRUE(unpacked.defined()) << "SinSavingInput's backward did not run";
  EXPECT_EQ(unpacked.device(), h.device()) << "reloaded onto another device";
  EXPECT_NE(unpacked.storage().unsafeGetStorageImpl(), h.storage().unsafeGetStorageImpl())
      << "backward saw the original storage, not the reloaded copy: nothing was offloaded";
  EXPECT_EQ(unpacked.sizes(), h.sizes());
  EXPECT_EQ(unpacked.strides(), h.strides());
  EXPECT_TRUE(at::equal(unpacked.cpu(), hBits)) << "the reloaded h differs from the original";
  EXPECT_TRUE(at::equal(x.grad().cpu(), gradPlain)) << "the gradient with offload differs from the one without";
  EXPECT_TRUE(x.grad().is_cuda());

  // The host side: the pool's copy thread moves a storage out with
  // detail::copyStorage(source, CPU, ...) (offload.cc, runJob), which on
  // CUDA allocates the destination as pinned memory -- what lets the copy
  // run asynchronously on the side stream. The pool does not expose its
  // host copies, so the same call is made here on h's storage. (The device
  // work that wrote h is finished: hBits was copied from it above.)
  namespace detail = parallel::pipeline::detail;
  const c10::Storage host = detail::copyStorage(h.storage(), c10::Device(c10::kCPU), detail::CopyStreams{});
  const at::Tensor hostBytes = bytesOf(host);
  EXPECT_TRUE(hostBytes.device().is_cpu());
  EXPECT_TRUE(hostBytes.is_pinned()) << "the offload copy went to pageable memory";
  EXPECT_TRUE(at::equal(hostBytes, bytesOf(h.storage()).cpu())) << "the offload copy's bytes differ";
}

}  // namespace
}  // namespace tessera
