// logicalParameters(): the parameters of any module as logical tensors.
#include "tessera/core/models/logical_parameters.h"

#include <torch/nn/module.h>

#include <algorithm>
#include <unordered_set>

#include "tessera/core/error.h"

namespace tessera::models {
namespace {

// Pre-order over the module tree -- a module's own parameters, then each
// child's -- which is the order of Module::named_parameters().
void collect(torch::nn::Module& module, const std::string& prefix, std::unordered_set<const void*>& seen,
             std::vector<LogicalParameter>& out) {
  const auto* declared = dynamic_cast<const DeclaresParameterLayout*>(&module);
  for (const auto& item : module.named_parameters(/*recurse=*/false)) {
    const at::Tensor& tensor = item.value();
    if (!tensor.requires_grad() || !seen.insert(tensor.unsafeGetTensorImpl()).second) continue;
    LogicalParameter p;
    p.name = prefix + item.key();
    p.tensor = tensor;
    const ParameterLayout* layout = declared != nullptr ? declared->parameterLayout(item.key()) : nullptr;
    if (layout == nullptr) {
      p.globalShape = tensor.sizes().vec();
      p.pieces = {TensorSlice::whole(p.globalShape)};
    } else {
      p.globalShape = layout->globalShape;
      p.pieces = layout->pieces;
      TESSERA_CHECK_ARG(!p.pieces.empty(), "parameter '" << p.name << "': its layer declares no slice");
      std::string text;
      for (const TensorSlice& slice : p.pieces) {
        slice.check(p.globalShape, "parameter '" + p.name + "'");
        text += (text.empty() ? "" : " + ") + slice.text();
      }
      const TensorSlice& first = p.pieces.front();
      const bool fits = p.pieces.size() == 1 && first.isWholeBox() ? tensor.sizes().vec() == first.sizes
                        : p.pieces.size() == 1 ? tensor.dim() == 1 && tensor.numel() == first.numel
                                               : tensor.numel() == layout->numel();
      TESSERA_CHECK_ARG(fits, "parameter '" << p.name << "' has shape " << tensor.sizes()
                                            << " but its layer declares the slice " << text << " of "
                                            << shapeText(p.globalShape));
    }
    out.push_back(std::move(p));
  }
  for (const auto& child : module.named_children()) {
    collect(*child.value(), prefix + child.key() + ".", seen, out);
  }
}

}  // namespace

ParameterLayout ParameterLayout::whole(const std::vector<int64_t>& shape) {
  return ParameterLayout{shape, {TensorSlice::whole(shape)}};
}

int64_t ParameterLayout::numel() const {
  int64_t total = 0;
  for (const TensorSlice& slice : pieces) total += slice.numel;
  return total;
}

std::vector<PlacedSlice> slicesOfRange(const std::vector<TensorSlice>& pieces, int64_t offset, int64_t numel) {
  std::vector<PlacedSlice> out;
  int64_t begin = 0;  // of the current piece, in the parameter's flat memory
  const int64_t end = offset + numel;
  for (const TensorSlice& slice : pieces) {
    const int64_t from = std::max(offset, begin), to = std::min(end, begin + slice.numel);
    if (from < to) out.push_back(PlacedSlice{slice.narrowFlat(from - begin, to - from), from - offset});
    begin += slice.numel;
  }
  TESSERA_CHECK_ARG(offset >= 0 && numel >= 0 && end <= begin,
                    "slicesOfRange: elements [" << offset << ", " << end << ") exceed the " << begin
                                                << " elements of the pieces");
  return out;
}

std::vector<LogicalParameter> logicalParameters(torch::nn::Module& root) {
  std::vector<LogicalParameter> out;
  std::unordered_set<const void*> seen;
  collect(root, "", seen, out);
  return out;
}

}  // namespace tessera::models
