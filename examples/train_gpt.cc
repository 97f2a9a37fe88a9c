// Train a tiny byte-level GPT on the fortunes corpus with tessera's C++ API.
// The file to copy when you start a training program of your own.
//
//   ./train_gpt                                        # one process
//   tessera-run --nproc-per-node 2 ./train_gpt         # data parallel on 2 ranks
//   ./train_gpt 50                                     # train for 50 steps (default 200)
//
// The same program runs alone or under any launcher: tessera::init() finds
// out which. tessera-train does the same from a TOML file; this is its
// skeleton without the config parsing.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "tessera/core/threads.h"
#include "tessera/core/data/byte_corpus.h"
#include "tessera/launcher/init.h"
#include "tessera/optim/lr_schedule.h"
#include "tessera/optim/optimizer.h"
#include "tessera/parallel/device_mesh.h"
#include "tessera/parallel/parallelize.h"
#include "tessera/train/trainer.h"

int main(int argc, char** argv) {
  const int64_t steps = argc > 1 ? std::atoll(argv[1]) : 200;
  tessera::setComputeThreads(1);  // one thread per rank: ranks share the machine's cores

  // 1. Join the job (collective). A world of 1 when started alone.
  tessera::DistributedContext ctx = tessera::init();

  // 2. The model: same seed on every rank, so every replica starts identical.
  tessera::models::GptConfig modelConfig;  // 3 layers, d_model 96, 4 heads, block 64
  tessera::models::Gpt gpt(modelConfig);
  auto model = tessera::makeTrainable(gpt);

  // 3. The parallel job: a mesh over the world (here every rank a DDP
  //    replica: dp_replicate = world size), then parallelize() -- the same
  //    composition tessera-train uses (collective).
  tessera::parallel::ParallelConfig parallelConfig;
  parallelConfig.mesh.dp_replicate = ctx.worldSize();
  parallelConfig.strategy = ctx.worldSize() > 1 ? "ddp" : "none";
  tessera::parallel::DeviceMesh mesh(ctx.world, parallelConfig.mesh);
  tessera::parallel::ParallelModel parallel =
      tessera::parallel::parallelize(*model, mesh, parallelConfig, /*localUpdates=*/false);
  tessera::parallel::DataParallel* dp = parallel.dp.get();

  // 4. Optimizer and learning-rate schedule (warm-up, then cosine to min_lr).
  tessera::optim::OptimizerConfig optimConfig;  // AdamW, betas (0.9, 0.95), weight decay 0.1
  tessera::optim::LrScheduleConfig scheduleConfig;
  scheduleConfig.lr = 3e-3;
  scheduleConfig.min_lr = 3e-4;
  scheduleConfig.warmup_steps = 20;
  auto optimizer = tessera::optim::makeOptimizer(optimConfig, dp->optimizerParameters(), scheduleConfig.lr);

  // 5. Data: fortunes split 90/10; each rank reads its own slice of every global batch.
  tessera::data::DataConfig dataConfig;
  dataConfig.seq_len = 64;
  dataConfig.batch_size = 16;  // per rank
  const auto split = tessera::data::splitCorpus(tessera::data::ByteCorpus::load(), dataConfig);
  tessera::data::DistributedSampler::Options sampling;
  sampling.batchSize = dataConfig.batch_size;
  sampling.dpRank = parallel.dataRank;
  sampling.dpSize = parallel.dataRanks;
  auto train = tessera::makeBatchSource(split.train, sampling);
  sampling.shuffle = false;  // validation: the same batches every time
  auto val = tessera::makeBatchSource(split.val, sampling);

  // 6. The loop. The rank that has the loss writes metrics as JSON lines to stdout.
  tessera::TrainConfig trainConfig;
  trainConfig.steps = steps;
  trainConfig.eval_every = 50;
  trainConfig.log_every = 10;
  tessera::MetricsWriter metrics("-");
  tessera::TrainerParts parts;
  parts.model = model.get();
  parts.dp = dp;
  parts.executor = parallel.executor.get();
  parts.optimizer = optimizer.get();
  parts.schedule = tessera::optim::makeLrSchedule(scheduleConfig, steps);
  parts.train = train.get();
  parts.val = val.get();
  parts.dataComm = parallel.dataComm;
  for (const auto& named : parallel.traffic) parts.traffic.push_back({named.name, named.comm, {}, {}});
  parts.metrics = parallel.reportsMetrics ? &metrics : nullptr;
  parts.reportsProgress = parallel.reportsMetrics;
  tessera::Trainer trainer(std::move(parts), trainConfig);
  // A callback: here, stop early if the loss diverges.
  trainer.callbacks().afterStep.push_back([](const tessera::StepReport& r) {
    if (!std::isfinite(r.loss)) throw std::runtime_error("loss diverged at step " + std::to_string(r.step));
  });
  const tessera::StepReport last = trainer.run();  // collective

  if (parallel.reportsMetrics) std::fprintf(stderr, "final validation loss %.3f nats/byte\n", last.valLoss.value_or(NAN));
  ctx.world->barrier();  // keep rank 0's store alive until every rank is done
  return 0;
}
