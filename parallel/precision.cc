// [precision] resolved into the plan each layer of the stack follows (precision.h).
#include "tessera/parallel/precision.h"

#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::parallel {

PrecisionPlan resolvePrecision(const PrecisionConfig& config, const std::string& gradComm,
                               const std::string& strategy, const std::string& optimizer) {
  PrecisionPlan plan;
  const std::string& mode = config.mode;
  TESSERA_CHECK_CONFIG(config.fp8_comm_scaling == "safe" || config.fp8_comm_scaling == "auto",
                       "precision.fp8_comm_scaling", "got '" << config.fp8_comm_scaling << "' (valid: safe, auto)");
  plan.fp8AutoScaling = config.fp8_comm_scaling == "auto";
  TESSERA_CHECK_CONFIG(mode == "fp32" || mode == "bf16" || mode == "fp8", "precision.mode",
                       "got '" << mode << "' (valid: fp32, bf16, fp8)");
  if (mode != "fp8") {
    plan.layers = mode == "bf16" ? models::Precision::kBf16 : models::Precision::kDefault;
    plan.gradientComm = gradComm.empty() ? GradientComm::kFp32 : parseGradientComm(gradComm, "parallel.grad_comm");
    plan.label = mode;
    return plan;
  }
  const std::string& level = config.level;
  TESSERA_CHECK_CONFIG(level == "O1" || level == "O2" || level == "O3", "precision.level",
                       "got '" << level << "' (valid: O1, O2, O3)");
  TESSERA_CHECK_CONFIG(gradComm.empty(), "parallel.grad_comm",
                       "is set to '" << gradComm << "', but precision.mode = \"fp8\" already communicates gradients "
                                     << "in FP8 (every FP8 level does); remove parallel.grad_comm, or use "
                                     << "precision.mode = \"fp32\" / \"bf16\" to choose it");
  plan.layers = models::Precision::kFp8;
  plan.recipe.recipe = numerics::parseScalingRecipe(config.fp8_recipe, "precision.fp8_recipe");
  plan.recipe.amax_history = config.amax_history;
  plan.recipe.margin = config.margin;
  plan.recipe.validate("precision.");
  plan.gradientComm = GradientComm::kFp8;
  plan.label = "fp8-" + level;
  if (level == "O1") return plan;
  TESSERA_CHECK_CONFIG(optimizer == "adamw", "precision.level",
                       level << " keeps AdamW's moments in FP8 / FP16, but optim.name is '" << optimizer
                             << "'; use optim.name = \"adamw\" or precision.level = \"O1\"");
  plan.optimizerStates = "fp8";
  if (level == "O2") return plan;
  plan.master = "fp16";
  TESSERA_CHECK_CONFIG(strategy != "hybrid", "parallel.strategy",
                       "\"hybrid\" cannot run with precision.level = \"O3\": O3 shards the optimizer over whole "
                       "tensors (strategy \"fsdp\"), not FSDP's flat shards; use \"fsdp\" or \"ddp\"");
  plan.wholeTensorZero = strategy == "fsdp";
  return plan;
}

}  // namespace tessera::parallel
