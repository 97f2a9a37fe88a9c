// FSDP of a parameter that is itself a slice of a larger logical tensor (what
// a row-parallel weight will be under tensor parallelism): each rank's shard
// layout names the logical tensor, its global shape, and a flat range of the
// parameter's dim-1 box -- so checkpoints store it with no per-row pieces and
// any layout can read it back. Checked against the same elements cut out of
// the global tensor directly.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "tessera/core/error.h"
#include "tessera/core/models/logical_parameters.h"
#include "tessera/parallel/fsdp.h"
#include "tests/harness/multiprocess.h"

namespace tessera::parallel {
namespace {

// The global (4, 6) weight: element (r, c) = 10 r + c.
at::Tensor globalWeight() { return (torch::arange(4).unsqueeze(1) * 10 + torch::arange(6)).to(torch::kFloat); }

// Holds columns [3, 6) of the global weight, as tp rank 1 of a row-parallel
// split in two would, and says so through DeclaresParameterLayout.
class ColumnHalf : public torch::nn::Module, public models::DeclaresParameterLayout {
 public:
  ColumnHalf() : layout_{{4, 6}, {TensorSlice::box({0, 3}, {4, 3})}} {
    weight = register_parameter("weight", globalWeight().narrow(1, 3, 3).contiguous());
    bias = register_parameter("bias", torch::zeros({4}));
  }
  const models::ParameterLayout* parameterLayout(const std::string& name) const override {
    return name == "weight" ? &layout_ : nullptr;
  }
  at::Tensor weight, bias;

 private:
  models::ParameterLayout layout_;
};

TESSERA_WORKER(fsdp_shard_of_a_dim1_slice) {
  const comm::CommPtr world = ctx.world();
  auto module = std::make_shared<ColumnHalf>();
  FullyShardedDataParallel fsdp(*module, {}, world);  // one root unit: weight (12) then bias (4), 8 per rank
  const auto layout = fsdp.shardLayout();
  TESSERA_CHECK(layout.size() == 1, "one unit, got " << layout.size());
  const at::Tensor shard = fsdp.shards().front().detach();
  const at::Tensor box = globalWeight().narrow(1, 3, 3).reshape({-1});  // the slice's elements, row-major
  bool sawWeight = false;
  for (const ParameterPiece& piece : layout[0]) {
    if (piece.name != "weight") continue;
    sawWeight = true;
    TESSERA_CHECK(piece.shape == (std::vector<int64_t>{4, 6}), "the piece names the global shape");
    TESSERA_CHECK(piece.slice.offsets == (std::vector<int64_t>{0, 3}) && piece.slice.sizes == (std::vector<int64_t>{4, 3}),
                  "the piece is a flat range of the dim-1 box, got " << piece.slice.text());
    const int64_t expectedOffset = world->rank() == 0 ? 0 : 8;
    const int64_t expectedNumel = world->rank() == 0 ? 8 : 4;
    TESSERA_CHECK(piece.slice.flatOffset == expectedOffset && piece.slice.numel == expectedNumel,
                  "rank " << world->rank() << " holds " << piece.slice.text());
    testing::expectTensorsEqual(shard.narrow(0, piece.tensorOffset, piece.slice.numel),
                                box.narrow(0, piece.slice.flatOffset, piece.slice.numel), "shard values");
  }
  TESSERA_CHECK(sawWeight, "rank " << world->rank() << " holds part of the weight");
}

TEST(FsdpSlices, ShardOfADim1SliceIsAFlatRangeOfItsBox) {
  auto result = testing::runWorkers("fsdp_shard_of_a_dim1_slice", {.ranks = 2});
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::parallel
