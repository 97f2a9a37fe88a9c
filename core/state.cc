#include "tessera/core/state.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "tessera/core/error.h"

namespace tessera {

std::string shapeText(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

int64_t StateTensor::globalNumel() const {
  int64_t n = 1;
  for (int64_t d : globalShape) n *= d;
  return n;
}

void StateDict::putReplicated(const std::string& name, const at::Tensor& value) {
  StateTensor t;
  t.globalShape = value.sizes().vec();
  t.pieces.push_back(StatePiece{value.contiguous(), 0});
  t.replicated = true;
  tensors[name] = std::move(t);
}

void StateDict::putMeta(const std::string& key, int64_t value) { meta[key] = std::to_string(value); }

void StateDict::putMeta(const std::string& key, double value) {
  char buffer[40];
  std::snprintf(buffer, sizeof buffer, "%.17g", value);
  meta[key] = buffer;
}

void StateDict::putMeta(const std::string& key, std::string value) { meta[key] = std::move(value); }

const std::string& StateDict::metaString(const std::string& key) const {
  auto it = meta.find(key);
  TESSERA_CHECK_ARG(it != meta.end(), "training state: missing entry '" << key << "'");
  return it->second;
}

int64_t StateDict::metaInt(const std::string& key) const {
  const std::string& text = metaString(key);
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  TESSERA_CHECK_ARG(end != text.c_str() && *end == '\0',
                    "training state: entry '" << key << "' is not an integer: '" << text << "'");
  return value;
}

double StateDict::metaDouble(const std::string& key) const {
  const std::string& text = metaString(key);
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  TESSERA_CHECK_ARG(end != text.c_str() && *end == '\0',
                    "training state: entry '" << key << "' is not a number: '" << text << "'");
  return value;
}

const at::Tensor& StateDict::whole(const std::string& name) const {
  auto it = tensors.find(name);
  TESSERA_CHECK_ARG(it != tensors.end(), "training state: missing tensor '" << name << "'");
  const StateTensor& t = it->second;
  TESSERA_CHECK_ARG(t.pieces.size() == 1 && t.pieces[0].offset == 0 &&
                        t.pieces[0].local.numel() == t.globalNumel(),
                    "training state: tensor '" << name << "' is held in " << t.pieces.size()
                                               << " piece(s), not whole, on this rank");
  return t.pieces[0].local;
}

StateDict StateDict::clone() const {
  StateDict out;
  out.meta = meta;
  for (const auto& [name, t] : tensors) {
    StateTensor copy;
    copy.globalShape = t.globalShape;
    copy.replicated = t.replicated;
    for (const StatePiece& piece : t.pieces) {
      copy.pieces.push_back(StatePiece{piece.local.detach().to(at::kCPU).contiguous().clone(), piece.offset});
    }
    out.tensors.emplace(name, std::move(copy));
  }
  return out;
}

int64_t StateDict::localBytes() const {
  int64_t bytes = 0;
  for (const auto& [name, t] : tensors) {
    for (const StatePiece& piece : t.pieces) bytes += piece.local.numel() * static_cast<int64_t>(piece.local.element_size());
  }
  return bytes;
}

}  // namespace tessera
