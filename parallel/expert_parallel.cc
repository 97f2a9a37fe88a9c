// Expert parallelism (expert_parallel.h has the design): the all-to-all
// region, the exchange each MoE layer calls between dispatch and its
// experts, and the split of a GPT's experts over ep.
#include "tessera/parallel/expert_parallel.h"

#include <torch/csrc/autograd/custom_function.h>

#include <ATen/ATen.h>

#include <utility>
#include <vector>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/models/moe.h"

namespace tessera::parallel {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The communicator travels to backward as a capsule (saved_data holds IValues).
struct ExchangeGroup : torch::CustomClassHolder {
  explicit ExchangeGroup(comm::CommPtr c) : comm(std::move(c)) {}
  comm::CommPtr comm;
};

int64_t wrapDim(const at::Tensor& x, int64_t dim, const comm::Communicator& comm) {
  const int64_t n = x.dim();
  TESSERA_CHECK_ARG(n > 0 && dim >= -n && dim < n, "all-to-all on group '" << comm.name() << "': dim " << dim
                                                                            << " is out of range for a tensor of "
                                                                            << x.sizes());
  return dim < 0 ? dim + n : dim;
}

// x split into p parts along splitDim, part j to rank j, received parts
// concatenated along catDim. One equal-split all-to-all of a contiguous
// (p, part...) buffer.
at::Tensor exchange(comm::Communicator& comm, const at::Tensor& x, int64_t splitDim, int64_t catDim) {
  const int64_t p = comm.size();
  TESSERA_CHECK_ARG(x.size(splitDim) % p == 0,
                    "all-to-all on group '" << comm.name() << "': x.size(" << splitDim << ") = " << x.size(splitDim)
                                            << " is not divisible by the group size " << p
                                            << " (model.moe.num_experts must divide by parallel.ep)");
  // (p, ...part): part j of x along splitDim is row j.
  std::vector<int64_t> shape = x.sizes().vec();
  shape[static_cast<size_t>(splitDim)] /= p;
  shape.insert(shape.begin() + splitDim, p);
  const at::Tensor send = x.reshape(shape).movedim(splitDim, 0).contiguous();
  at::Tensor received = at::empty_like(send);
  comm.allToAll(send, received);
  // Row j came from rank j: concatenate the rows along catDim in rank order.
  return at::cat(received.unbind(0), catDim);
}

struct AllToAllFunction : public torch::autograd::Function<AllToAllFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t splitDim, int64_t catDim,
                            c10::intrusive_ptr<ExchangeGroup> group) {
    ctx->saved_data["group"] = at::IValue::make_capsule(group);
    ctx->saved_data["split"] = splitDim;
    ctx->saved_data["cat"] = catDim;
    return exchange(*group->comm, x, splitDim, catDim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto group = c10::static_intrusive_pointer_cast<ExchangeGroup>(ctx->saved_data["group"].toCapsule());
    const int64_t splitDim = ctx->saved_data["split"].toInt();
    const int64_t catDim = ctx->saved_data["cat"].toInt();
    // The inverse exchange: what went along splitDim comes back along it.
    return {exchange(*group->comm, grads[0].contiguous(), catDim, splitDim), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// The exchange one MoE layer calls (moe.h's ExpertExchange). Stateless
// between forwards except the capacity of the forward in progress:
// toExperts and fromExperts of one forward are called back to back on one
// thread (a recomputation in backward makes its own pair).
class ExpertParallelExchange final : public models::ExpertExchange {
 public:
  ExpertParallelExchange(comm::CommPtr ep, std::shared_ptr<models::ShardGroup> dtd)
      : ep_(std::move(ep)), dtd_(std::move(dtd)) {}

  at::Tensor toExperts(const at::Tensor& buffer) override {
    at::Tensor x = buffer;  // (E, C, M)
    capacity_ = buffer.size(1);
    if (dtd_) {
      // Pad C to a multiple of tp with empty slots (zeros, never read by
      // combine), then keep this tp rank's part of the slots.
      const int64_t tp = dtd_->size();
      const int64_t padded = (capacity_ + tp - 1) / tp * tp;
      if (padded != capacity_) x = at::constant_pad_nd(x, {0, 0, 0, padded - capacity_});
      x = dtd_->scatterToShards(x, 1);  // (E, C'/tp, M)
    }
    if (ep_->size() > 1) x = allToAllRegion(x, /*splitDim=*/0, /*catDim=*/1, ep_);  // (E/ep, ep * C'', M)
    return x;
  }

  at::Tensor fromExperts(const at::Tensor& expertOut) override {
    at::Tensor x = expertOut;  // (E/ep, ep * C'', M)
    if (ep_->size() > 1) x = allToAllRegion(x, /*splitDim=*/1, /*catDim=*/0, ep_);  // (E, C'', M)
    if (dtd_) {
      // The combine after this is replicated over tp (every tp rank combines
      // the same tokens, with the same gradient), hence gatherFromShards.
      x = dtd_->gatherFromShards(x, 1);                                  // (E, C', M)
      if (x.size(1) != capacity_) x = x.narrow(1, 0, capacity_);         // (E, C, M)
    }
    return x;
  }

 private:
  comm::CommPtr ep_;
  std::shared_ptr<models::ShardGroup> dtd_;  // the tp group under duplicate-token dropping, else null
  int64_t capacity_ = 0;
};

}  // namespace

at::Tensor allToAllRegion(const at::Tensor& x, int64_t splitDim, int64_t catDim, comm::CommPtr comm) {
  TESSERA_CHECK_ARG(comm != nullptr, "allToAllRegion needs a communicator");
  TESSERA_CHECK_ARG(x.defined(), "allToAllRegion on group '" << comm->name() << "': the tensor is undefined");
  splitDim = wrapDim(x, splitDim, *comm);
  catDim = wrapDim(x, catDim, *comm);
  if (comm->size() == 1) return x;
  TESSERA_CHECK_ARG(x.size(splitDim) % comm->size() == 0,
                    "allToAllRegion on group '" << comm->name() << "': x.size(" << splitDim << ") = "
                                                << x.size(splitDim) << " is not divisible by the group size "
                                                << comm->size());
  return AllToAllFunction::apply(x, splitDim, catDim, c10::make_intrusive<ExchangeGroup>(std::move(comm)));
}

bool isExpertParameter(const std::string& name) { return name.find(".moe.experts.") != std::string::npos; }

void applyExpertParallel(TrainableModel& model, comm::CommPtr epComm, bool duplicateTokenDropping) {
  TESSERA_CHECK_ARG(epComm != nullptr, "applyExpertParallel needs the ep communicator");
  const int ep = epComm->size();
  auto* gpt = dynamic_cast<models::GptImpl*>(&model.module());
  // Called for ep > 1, or for duplicate-token dropping alone (ep = 1): name the key that asked.
  TESSERA_CHECK_CONFIG(gpt != nullptr && gpt->config().use_moe, ep > 1 ? "parallel.ep" : "parallel.moe_dtd",
                       (ep > 1 ? "expert parallelism splits" : "duplicate-token dropping splits the slots of")
                           << " the experts of a mixture-of-experts GPT; set model.use_moe = true (model.kind = "
                              "\"gpt\"), or "
                           << (ep > 1 ? "parallel.ep = 1, got parallel.ep = " + std::to_string(ep)
                                      : std::string("parallel.moe_dtd = false")));
  const int64_t E = gpt->config().moe.num_experts;
  TESSERA_CHECK_CONFIG(E % ep == 0, "model.moe.num_experts",
                       "model.moe.num_experts (" << E << ") must be divisible by parallel.ep (" << ep
                                                 << "): every ep rank holds the same number of experts");
  std::shared_ptr<models::ShardGroup> dtd;
  if (duplicateTokenDropping && gpt->tensorParallelGroup() && gpt->tensorParallelGroup()->size() > 1) {
    dtd = gpt->tensorParallelGroup();
  }
  const int64_t local = E / ep;
  const int64_t begin = epComm->rank() * local;
  auto exchange = std::make_shared<ExpertParallelExchange>(epComm, dtd);
  for (size_t i = 0; i < gpt->blocks->size(); ++i) {
    models::BlockImpl& block = gpt->blocks->at(i);
    if (!block.moe) continue;
    if (ep > 1) block.moe->keepExperts(begin, begin + local);
    if (ep > 1 || dtd) block.moe->setExpertExchange(exchange);
    if (!dtd) continue;
    // The slots arrive split over tp: gather them before fc, reduce-scatter after proj.
    for (size_t e = 0; e < block.moe->experts->size(); ++e) {
      block.moe->experts->at(e).fc->setSequenceParallel(true);
      block.moe->experts->at(e).proj->setSequenceParallel(true);
    }
  }
}

int64_t allToAllBytesPerPass(const models::GptConfig& config, int64_t moeLayers, int64_t tokens, int ep, int tp,
                             bool duplicateTokenDropping) {
  if (ep <= 1 || moeLayers == 0) return 0;
  const models::MoeConfig& moe = config.moe;
  int64_t slots = models::moeCapacity(tokens, moe.num_experts, moe.capacity_factor, moe.top_k);
  if (duplicateTokenDropping && tp > 1) slots = (slots + tp - 1) / tp;  // this tp rank's part of the padded C
  const int64_t buffer = moe.num_experts * slots * config.d_model * static_cast<int64_t>(sizeof(float));
  const int64_t sent = buffer / ep * (ep - 1);  // a rank keeps its own experts' block
  return 4 * moeLayers * sent;
}

}  // namespace tessera::parallel
