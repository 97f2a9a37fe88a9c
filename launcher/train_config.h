// tessera-train's job description: a TOML file with sections [model] [data]
// [optim] [train] [parallel], plus `--set section.key=value` overrides, read
// into the plain config structs of each layer. Private to the launcher (and
// its tests).
//
// Every key is checked: an unknown section or key, or a value of the wrong
// type, is a ConfigError naming the dotted key and listing the valid ones,
//   config field 'optim.lrr': unknown key (valid: name, lr, min_lr, ...)
// and the values are then validated by each struct's validate().
#pragma once

#include <string>
#include <vector>

#include "tessera/comm/fault.h"
#include "tessera/core/data/config.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/models/mlp_classifier.h"
#include "tessera/train/train_config.h"
#include "tessera/optim/demo.h"
#include "tessera/optim/diloco.h"
#include "tessera/optim/lr_schedule.h"
#include "tessera/optim/mt_dao.h"
#include "tessera/optim/optimizer.h"
#include "tessera/parallel/parallelize.h"
#include "tessera/parallel/elastic.h"

namespace tessera::launcher {

// [model]: which model, and its config (only the one `kind` names is used).
struct ModelSection {
  std::string kind = "gpt";          // "gpt" (byte-level LM on fortunes) or "mlp" (fashion-MNIST classifier)
  models::GptConfig gpt;             // keys of kind = "gpt"
  models::MlpClassifierConfig mlp;   // keys of kind = "mlp"
  std::string init_from;             // a safetensors file of matching names to start from ("" = seeded init)
};

// [parallel] is parallel::ParallelConfig (parallel/parallelize.h): its
// resolve() is the one place the strategy is reconciled with the degrees.
using ParallelSection = parallel::ParallelConfig;

struct TrainJobConfig {
  ModelSection model;
  data::DataConfig data;
  // [optim] name: "adamw", "sgd" (synchronous, with the [parallel] strategy)
  // or "diloco", "demo", "mt-dao" (communication-light: one replica per
  // dp_replicate coordinate, configured by their own section).
  std::string optimizer = "adamw";
  optim::OptimizerConfig optim;       // [optim]: betas, eps, weight_decay, momentum, nesterov (adamw/sgd, DiLoCo's inner)
  std::string diloco_inner = "adamw"; // [diloco] inner: the inner optimizer ("adamw" or "sgd", with [optim]'s keys)
  optim::DilocoConfig diloco;         // [diloco]
  optim::DemoConfig demo;             // [demo]
  optim::MtDaoConfig mt_dao;          // [mt_dao]
  optim::LrScheduleConfig schedule;   // [optim] too: lr, min_lr, schedule, warmup_steps, decay_fraction
  TrainConfig train;
  ParallelSection parallel;
  // [elastic]: membership timing for runs under `tessera-run --nnodes MIN:MAX`
  // (TESSERA_ELASTIC=1); ignored otherwise. Elastic runs need optim.name = "diloco".
  parallel::ElasticConfig elastic;
  // [faults] plan: a fault plan (comm/fault.h), for experiments and tests.
  std::string fault_plan;

  // Every section's validate() and the checks across sections (the model
  // fits the dataset; gpt: data.seq_len <= model.block_size; fsdp and
  // hybrid need model.kind = "gpt"; parallel.tp > 1 needs a dense GPT whose
  // model.n_head, and with parallel.sequence_parallel data.seq_len, tp
  // divides; train.device = "cuda" runs what parallel::ParallelConfig::
  // validateDevice allows, and parallel.backend = "nccl" needs it). Not the
  // world-size checks: parallel.resolve(worldSize,
  // localUpdates()) does those, once. Throws ConfigError naming the key.
  void validate() const;
  // True for the optimizers that replicate over dp_replicate themselves.
  bool localUpdates() const { return optimizer == "diloco" || optimizer == "demo" || optimizer == "mt-dao"; }
  // The optimizer that updates the parameters every step (DiLoCo's inner
  // one), which [precision]'s O2 / O3 replace the states of.
  std::string steppingOptimizer() const { return optimizer == "diloco" ? diloco_inner : optimizer; }
};

// Parses TOML text (`sourceName` appears in syntax errors), applies
// `overrides` ("section.key=value"; the value is TOML, or a bare string), and
// validates. Throws ConfigError naming the key; InvalidArgument for a TOML
// syntax error or a malformed override.
TrainJobConfig parseTrainJobConfig(const std::string& tomlText, const std::vector<std::string>& overrides = {},
                                   const std::string& sourceName = "config");

// The run's fault plan: [faults] plan, the --fault flag and
// TESSERA_FAULT_PLAN joined (each may be empty). Throws ConfigError
// ("faults.plan") for a plan that does not parse.
comm::FaultPlan runFaultPlan(const TrainJobConfig& job, const std::string& flag);

// Reads `path` and parses it as above. Throws InvalidArgument naming the path
// when it cannot be read.
TrainJobConfig loadTrainJobConfig(const std::string& path, const std::vector<std::string>& overrides = {});

}  // namespace tessera::launcher
