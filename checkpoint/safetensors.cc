// safetensors reader/writer, loading into a module, export from a checkpoint.
#include "tessera/checkpoint/safetensors.h"

#include <torch/nn/module.h>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <unordered_set>
#include <vector>

#include "tessera/checkpoint/checkpoint.h"
#include "tessera/checkpoint/training_state.h"
#include "tessera/core/error.h"
#include "tessera/core/numerics/fp8.h"

namespace tessera::checkpoint {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100u << 20;  // what the reference implementation accepts

const std::vector<std::pair<std::string, at::ScalarType>>& dtypeNames() {
  static const std::vector<std::pair<std::string, at::ScalarType>> kNames = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16}, {"I64", at::kLong},
      {"I32", at::kInt},    {"I16", at::kShort}, {"I8", at::kChar},  {"U8", at::kByte},       {"BOOL", at::kBool}};
  return kNames;
}

std::string dtypeName(at::ScalarType dtype, const std::string& tensor) {
  for (const auto& [name, type] : dtypeNames()) {
    if (type == dtype) return name;
  }
  throw InvalidArgument("safetensors: tensor '" + tensor + "' has dtype " + std::string(c10::toString(dtype)) +
                        ", which safetensors here does not support (F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL)");
}

bool littleEndianHost() {
  const uint16_t probe = 1;
  uint8_t first = 0;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

std::string shapeText(at::IntArrayRef shape) {
  std::ostringstream out;
  out << shape;
  return out.str();
}

}  // namespace

void writeSafetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata, const std::map<std::string, bool>& fp8Codes) {
  TESSERA_CHECK_ARG(littleEndianHost(), "safetensors: writing from a big-endian host is not supported");
  nlohmann::json header = nlohmann::json::object();
  std::vector<at::Tensor> data;  // CPU contiguous, in name order
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    TESSERA_CHECK_ARG(!name.empty() && name != "__metadata__", "safetensors: invalid tensor name '" << name << "'");
    TESSERA_CHECK_ARG(tensor.defined(), "safetensors: tensor '" << name << "' is undefined");
    std::string dtype;
    if (auto fp8 = fp8Codes.find(name); fp8 != fp8Codes.end()) {
      TESSERA_CHECK_ARG(tensor.scalar_type() == at::kByte, "safetensors: FP8 tensor '" << name << "' must be uint8 codes, got "
                                                                                         << tensor.scalar_type());
      dtype = fp8->second ? "F8_E4M3" : "F8_E5M2";
    } else {
      dtype = dtypeName(tensor.scalar_type(), name);
    }
    at::Tensor cpu = tensor.detach().to(at::kCPU).contiguous();
    const uint64_t bytes = static_cast<uint64_t>(cpu.numel()) * cpu.element_size();
    header[name] = {{"dtype", dtype}, {"shape", cpu.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(std::move(cpu));
  }
  nlohmann::json meta = nlohmann::json::object();
  for (const auto& [key, value] : metadata) meta[key] = value;
  if (!meta.contains("format")) meta["format"] = "pt";
  header["__metadata__"] = meta;
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned

  const std::string temporary = path + ".tmp";
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    if (!out) throw CheckpointError("safetensors: cannot create '" + temporary + "'");
    uint8_t length[8];
    for (int i = 0; i < 8; ++i) length[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));
    out.write(reinterpret_cast<const char*>(length), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const at::Tensor& t : data) {
      out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.numel() * t.element_size()));
    }
    out.flush();
    if (!out) throw CheckpointError("safetensors: writing '" + temporary + "' failed (disk full?)");
  }
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    std::remove(temporary.c_str());
    throw CheckpointError("safetensors: cannot rename '" + temporary + "' to '" + path + "'");
  }
}

SafetensorsFile readSafetensors(const std::string& path) {
  const auto fail = [&](const std::string& what) {
    return CheckpointError("safetensors file '" + path + "': " + what);
  };
  TESSERA_CHECK_ARG(littleEndianHost(), "safetensors: reading on a big-endian host is not supported");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw fail("cannot open it");
  in.seekg(0, std::ios::end);
  const auto fileBytes = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  if (fileBytes < 8) throw fail("shorter than the 8-byte header length");
  uint8_t length[8];
  in.read(reinterpret_cast<char*>(length), 8);
  uint64_t headerBytes = 0;
  for (int i = 0; i < 8; ++i) headerBytes |= static_cast<uint64_t>(length[i]) << (8 * i);
  if (headerBytes > kMaxHeaderBytes || headerBytes > fileBytes - 8) {
    throw fail("header length " + std::to_string(headerBytes) + " does not fit the file of " +
               std::to_string(fileBytes) + " bytes");
  }
  std::string text(headerBytes, '\0');
  in.read(text.data(), static_cast<std::streamsize>(headerBytes));
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw fail(std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) throw fail("header is not a JSON object");
  const uint64_t dataBytes = fileBytes - 8 - headerBytes;

  SafetensorsFile out;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) throw fail("__metadata__ is not an object");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) throw fail("__metadata__ value of '" + key + "' is not a string");
        out.metadata[key] = value.get<std::string>();
      }
      continue;
    }
    try {
      const std::string dtype = entry.at("dtype").get<std::string>();
      const bool fp8 = dtype == "F8_E4M3" || dtype == "F8_E5M2";
      auto type = std::find_if(dtypeNames().begin(), dtypeNames().end(),
                               [&](const auto& item) { return item.first == (fp8 ? std::string("U8") : dtype); });
      if (type == dtypeNames().end()) throw fail("tensor '" + name + "' has unknown dtype '" + dtype + "'");
      const auto shape = entry.at("shape").get<std::vector<int64_t>>();
      const auto offsets = entry.at("data_offsets").get<std::vector<uint64_t>>();
      // The size is checked against the file before anything is allocated:
      // a damaged header must not turn into a huge allocation.
      const uint64_t elementSize = c10::elementSize(type->second);
      uint64_t bytes = elementSize;
      for (int64_t d : shape) {
        if (d < 0) throw fail("tensor '" + name + "' has a negative dimension");
        if (d != 0 && bytes > dataBytes / static_cast<uint64_t>(d)) {
          throw fail("tensor '" + name + "' has a shape larger than the file's " + std::to_string(dataBytes) +
                     " data bytes");
        }
        bytes *= static_cast<uint64_t>(d);
      }
      if (offsets.size() != 2 || offsets[0] > offsets[1] || offsets[1] > dataBytes ||
          offsets[1] - offsets[0] != bytes) {
        throw fail("tensor '" + name + "' has data_offsets that do not match its " + std::to_string(bytes) +
                   " bytes inside the " + std::to_string(dataBytes) + " data bytes");
      }
      at::Tensor t = at::empty(shape, at::TensorOptions().dtype(type->second));
      in.seekg(static_cast<std::streamoff>(8 + headerBytes + offsets[0]));
      in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(bytes));
      if (!in) throw fail("reading tensor '" + name + "' failed");
      ranges.emplace_back(offsets[0], offsets[1]);
      if (fp8) {  // exact in float32, so a build without float8 dtypes reads them too
        t = numerics::decodeFp8(t, at::Tensor(), dtype == "F8_E4M3" ? numerics::Fp8Format::kE4M3
                                                                   : numerics::Fp8Format::kE5M2);
        out.fp8[name] = dtype;
      }
      out.tensors[name] = std::move(t);
    } catch (const nlohmann::json::exception& e) {
      throw fail("entry '" + name + "' is malformed: " + e.what());
    }
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) throw fail("two tensors' data_offsets overlap");
  }
  return out;
}

void loadSafetensorsInto(torch::nn::Module& module, const std::string& path,
                         const std::map<std::string, std::vector<int64_t>>* wholeModel) {
  SafetensorsFile file = readSafetensors(path);
  // FP8 weights with their scales (the header's convention): value = decoded * scale_inv.
  for (const auto& [name, dtype] : file.fp8) {
    auto companion = file.tensors.find(name + "_scale_inv");
    if (companion == file.tensors.end()) continue;
    TESSERA_CHECK_ARG(companion->second.numel() == 1, "safetensors file '" << path << "': '" << companion->first
                                                          << "' must be one value (a per-tensor scale), got shape "
                                                          << shapeText(companion->second.sizes()));
    file.tensors[name] = file.tensors[name] * companion->second.to(at::kFloat).reshape({});
    file.tensors.erase(companion);
  }

  // Every name the module answers to, and the tensors that must be covered
  // (each parameter once, whichever of its names the file uses).
  std::map<std::string, at::Tensor> targets;
  std::map<const void*, std::string> required;  // parameter -> its first name
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    targets[item.key()] = item.value();
    required.emplace(item.value().unsafeGetTensorImpl(), item.key());
  }
  for (const auto& item : module.named_buffers(/*recurse=*/true)) targets[item.key()] = item.value();

  std::vector<std::string> unexpected, mismatched, missing;
  std::unordered_set<const void*> covered, wrongShape;
  for (const auto& [name, value] : file.tensors) {
    auto it = targets.find(name);
    if (it == targets.end()) {
      // A pipeline stage: another stage's parameter is skipped when the whole model has it as stored.
      const bool other = wholeModel != nullptr && wholeModel->count(name) != 0;
      if (!other) {
        unexpected.push_back(name + " " + shapeText(value.sizes()));
      } else if (const auto& whole = *wholeModel->find(name); value.sizes() != at::IntArrayRef(whole.second)) {
        mismatched.push_back(name + ": file " + shapeText(value.sizes()) + ", model " + shapeText(whole.second));
      }
      continue;
    }
    if (it->second.sizes() != value.sizes()) {
      mismatched.push_back(name + ": file " + shapeText(value.sizes()) + ", model " + shapeText(it->second.sizes()));
      wrongShape.insert(it->second.unsafeGetTensorImpl());
      continue;
    }
    covered.insert(it->second.unsafeGetTensorImpl());
  }
  for (const auto& [impl, name] : required) {
    if (!covered.count(impl) && !wrongShape.count(impl)) missing.push_back(name);
  }
  if (!unexpected.empty() || !mismatched.empty() || !missing.empty()) {
    std::sort(missing.begin(), missing.end());
    std::ostringstream message;
    message << "safetensors file '" << path << "' does not fit the model";
    const auto list = [&](const char* what, const std::vector<std::string>& items, const char* separator) {
      if (items.empty()) return;
      message << "\n  " << what << ": ";
      for (size_t i = 0; i < items.size(); ++i) message << (i ? separator : "") << items[i];
    };
    list("missing", missing, ", ");
    list("unexpected", unexpected, ", ");
    list("shape mismatches", mismatched, "; ");
    throw InvalidArgument(message.str());
  }
  at::NoGradGuard noGrad;
  for (const auto& [name, value] : file.tensors) {
    if (auto it = targets.find(name); it != targets.end()) it->second.copy_(value);
  }
}

namespace {

// The whole model of a checkpoint: names without "model/" -> tensors, and its metadata.
std::map<std::string, at::Tensor> wholeModelOf(const std::string& checkpointPath, int replica,
                                               std::map<std::string, std::string>* metadata) {
  const std::string dir = resolveCheckpoint(checkpointPath);
  const CheckpointIndex index = readIndex(dir);
  const int replicas = savedReplicas(index.meta);
  TESSERA_CHECK_ARG(replica >= 0 && replica < replicas, "export: replica " << replica << " not in [0, " << replicas
                                                                           << "): the checkpoint has " << replicas
                                                                           << " replica(s)");
  const std::string prefix = replicaPrefix(ReplicaInfo{replica, replicas}) + "model/";
  std::vector<LoadRequest> requests;
  for (const auto& [name, stored] : StateSummary::of(index).tensors) {
    if (name.compare(0, prefix.size(), prefix) == 0)
      requests.push_back(LoadRequest{name, stored.shape, stored.dtype, std::nullopt});
  }
  if (requests.empty())
    throw CheckpointError("export: checkpoint '" + dir + "' holds no tensor under '" + prefix + "'");
  const StateDict loaded = load(dir, requests, {});
  std::map<std::string, at::Tensor> tensors;
  for (const LoadRequest& r : requests) tensors[r.name.substr(prefix.size())] = loaded.whole(r.name).reshape(r.globalShape);
  *metadata = {{"format", "pt"}, {"step", std::to_string(index.step)}};
  if (auto it = index.meta.find("dp/strategy"); it != index.meta.end()) (*metadata)["dp_strategy"] = it->second;
  return tensors;
}

}  // namespace

int64_t exportSafetensors(const std::string& checkpointPath, const std::string& outPath, int replica,
                          std::optional<at::ScalarType> dtype) {
  std::map<std::string, std::string> metadata;
  std::map<std::string, at::Tensor> tensors = wholeModelOf(checkpointPath, replica, &metadata);
  if (dtype) {
    for (auto& [name, tensor] : tensors) tensor = tensor.to(*dtype);
  }
  writeSafetensors(outPath, tensors, metadata);
  return static_cast<int64_t>(tensors.size());
}

int64_t exportSafetensorsFp8(const std::string& checkpointPath, const std::string& outPath, bool e4m3, int replica) {
  std::map<std::string, std::string> metadata;
  const std::map<std::string, at::Tensor> model = wholeModelOf(checkpointPath, replica, &metadata);
  const numerics::Fp8Format format = e4m3 ? numerics::Fp8Format::kE4M3 : numerics::Fp8Format::kE5M2;
  std::map<std::string, at::Tensor> tensors;
  std::map<std::string, bool> fp8Codes;
  for (const auto& [name, tensor] : model) {
    if (tensor.dim() < 2 || !tensor.is_floating_point()) {
      tensors[name] = tensor;
      continue;
    }
    const at::Tensor values = tensor.to(at::kFloat).contiguous();
    const double amax = values.numel() > 0 ? values.abs().max().item<double>() : 0.0;
    double scale = 1.0;  // the largest power of two with amax * scale <= max
    if (amax > 0 && std::isfinite(amax)) scale = std::exp2(std::floor(std::log2(numerics::fp8Max(format) / amax)));
    tensors[name] = numerics::encodeFp8(values, at::scalar_tensor(scale, at::kFloat), format,
                                        numerics::Overflow::kSaturate);
    fp8Codes[name] = e4m3;
    tensors[name + "_scale_inv"] = at::scalar_tensor(1.0 / scale, at::kFloat);
  }
  metadata["fp8"] = e4m3 ? "F8_E4M3" : "F8_E5M2";
  writeSafetensors(outPath, tensors, metadata, fp8Codes);
  return static_cast<int64_t>(model.size());
}

}  // namespace tessera::checkpoint
