// logicalParameters(): the parameters of any module as logical tensors.
#include "tessera/core/models/logical_parameters.h"

#include <torch/nn/module.h>

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
      p.slice = TensorSlice::whole(p.globalShape);
    } else {
      p.globalShape = layout->globalShape;
      p.slice = layout->slice;
      p.slice.check(p.globalShape, "parameter '" + p.name + "'");
      const bool fits = p.slice.isWholeBox() ? tensor.sizes().vec() == p.slice.sizes
                                             : tensor.dim() == 1 && tensor.numel() == p.slice.numel;
      TESSERA_CHECK_ARG(fits, "parameter '" << p.name << "' has shape " << tensor.sizes()
                                            << " but its layer declares the slice " << p.slice.text() << " of "
                                            << shapeText(p.globalShape));
    }
    out.push_back(std::move(p));
  }
  for (const auto& child : module.named_children()) {
    collect(*child.value(), prefix + child.key() + ".", seen, out);
  }
}

}  // namespace

std::vector<LogicalParameter> logicalParameters(torch::nn::Module& root) {
  std::vector<LogicalParameter> out;
  std::unordered_set<const void*> seen;
  collect(root, "", seen, out);
  return out;
}

}  // namespace tessera::models
