// The gradient norm over logical parameters (logical_norm.h): this rank's
// squares in four categories, summed over the groups holding distinct pieces.
#include "tessera/parallel/logical_norm.h"

#include <ATen/ATen.h>

#include <cmath>
#include <utility>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/parallel/expert_parallel.h"

namespace tessera::parallel {

namespace {

// Indexes into the sums vector.
enum Category : int64_t { kDense = 0, kDenseTp = 1, kExpert = 2, kExpertTp = 3, kCategories = 4 };

bool spans(const comm::CommPtr& comm) { return comm && comm->size() > 1; }

class LogicalNorm final : public DataParallelWrapper {
 public:
  LogicalNorm(std::unique_ptr<DataParallel> inner, const std::set<std::string>& tpSharded, comm::CommPtr tpComm,
              comm::CommPtr epComm, comm::CommPtr denseShardComm, comm::CommPtr expertShardComm)
      : DataParallelWrapper(std::move(inner)),
        tpComm_(std::move(tpComm)),
        epComm_(std::move(epComm)),
        denseShardComm_(std::move(denseShardComm)),
        expertShardComm_(expertShardComm ? std::move(expertShardComm) : denseShardComm_) {
    // The layout is fixed for the strategy's lifetime: classify its ranges once.
    const auto layout = parameterLayout();
    for (size_t i = 0; i < layout.size(); ++i) {
      for (const ParameterPiece& piece : layout[i]) {
        const bool tp = tpSharded.count(piece.name) > 0;
        const Category category = isExpertParameter(piece.name) ? (tp ? kExpertTp : kExpert) : (tp ? kDenseTp : kDense);
        ranges_.push_back(Range{i, piece.tensorOffset, piece.slice.numel, category});
      }
    }
  }

  double gradNorm() override {
    // Squares over this rank's pieces (padding is in no piece); one host
    // sync, after the reductions.
    const std::vector<at::Tensor> params = optimizerParameters();
    at::Tensor sums = at::zeros({kCategories}, at::kDouble);
    for (const Range& range : ranges_) {
      const at::Tensor& grad = params[range.tensor].grad();
      if (!grad.defined()) continue;
      const at::Tensor part = grad.reshape({-1}).narrow(0, range.offset, range.numel).to(at::kDouble);
      sums[range.category] += part.pow(2).sum().cpu();
    }
    at::Tensor dense = sums.narrow(0, kDense, 2);    // views: reductions write into `sums`
    at::Tensor expert = sums.narrow(0, kExpert, 2);
    // 1. The distinct shards of each kind (one collective when both kinds
    //    are sharded over the same group).
    if (denseShardComm_ == expertShardComm_) {
      if (spans(denseShardComm_)) denseShardComm_->allReduce(sums, comm::ReduceOp::kSum);
    } else {
      reduceInPlace(denseShardComm_, dense);
      reduceInPlace(expertShardComm_, expert);
    }
    // 2. The experts the other ep ranks hold.
    reduceInPlace(epComm_, expert);
    // 3. The tp pieces of each split parameter, dense and expert together.
    at::Tensor tp = at::stack({sums[kDenseTp], sums[kExpertTp]});
    if (spans(tpComm_)) tpComm_->allReduce(tp, comm::ReduceOp::kSum);
    return std::sqrt(sums[kDense].item<double>() + sums[kExpert].item<double>() + tp.sum().item<double>());
  }

 private:
  // All-reduces (sum) a view of `sums` in place: the communicator may need a
  // contiguous tensor of its own, so reduce a copy and write it back.
  static void reduceInPlace(const comm::CommPtr& comm, at::Tensor& view) {
    if (!spans(comm)) return;
    at::Tensor staged = view.clone();
    comm->allReduce(staged, comm::ReduceOp::kSum);
    view.copy_(staged);
  }

  struct Range {
    size_t tensor;      // index into optimizerParameters()
    int64_t offset;     // first element in that tensor's flat view
    int64_t numel;
    Category category;
  };
  comm::CommPtr tpComm_;
  comm::CommPtr epComm_;
  comm::CommPtr denseShardComm_;
  comm::CommPtr expertShardComm_;  // denseShardComm_ when the caller passed none
  std::vector<Range> ranges_;
};

}  // namespace

std::unique_ptr<DataParallel> withLogicalNorm(std::unique_ptr<DataParallel> inner, std::set<std::string> tpSharded,
                                              comm::CommPtr tpComm, comm::CommPtr epComm,
                                              comm::CommPtr denseShardComm, comm::CommPtr expertShardComm) {
  TESSERA_CHECK_ARG(inner != nullptr, "withLogicalNorm needs a data-parallel strategy, got nullptr");
  TESSERA_CHECK_ARG(expertShardComm || !spans(denseShardComm) || !spans(epComm),
                    "withLogicalNorm: dense parameters are sharded over '"
                        << denseShardComm->name() << "' and experts differ over ep ('" << epComm->name()
                        << "'), but no expertShardComm says over which group the expert shards differ; pass "
                           "FSDP's expert-unit shard comm (dp_shard) so each expert shard counts once");
  return std::make_unique<LogicalNorm>(std::move(inner), tpSharded, std::move(tpComm), std::move(epComm),
                                       std::move(denseShardComm), std::move(expertShardComm));
}

}  // namespace tessera::parallel
