#include "tessera/core/data/byte_corpus.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <system_error>

namespace tessera::data {
namespace fs = std::filesystem;

namespace {

std::string installHint(const std::string& package) {
  return "install " + package + " (scripts/setup.sh)";
}

// Skips the fortune format's index files (.dat) and its UTF-8 links to the
// same text (.u8), which would otherwise be read twice.
bool isCorpusFile(const fs::directory_entry& entry) {
  std::error_code ec;
  if (!entry.is_regular_file(ec)) return false;
  const std::string ext = entry.path().extension().string();
  return ext != ".dat" && ext != ".u8";
}

}  // namespace

ByteCorpus ByteCorpus::load(const std::string& dir, const std::string& package) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    throw DataError("text corpus directory " + dir + " does not exist or is not a directory; " +
                    installHint(package));
  }
  std::vector<std::string> files;
  for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (isCorpusFile(*it)) files.push_back(it->path().string());
  }
  if (ec) {
    throw DataError("cannot list text corpus directory " + dir + ": " + ec.message() + "; " +
                    installHint(package));
  }
  if (files.empty()) {
    throw DataError("text corpus directory " + dir + " holds no text file; " +
                    installHint(package));
  }
  std::sort(files.begin(), files.end());

  int64_t total = 0;
  for (const auto& f : files) {
    const auto size = fs::file_size(f, ec);
    if (ec) throw DataError("cannot read " + f + ": " + ec.message() + "; " + installHint(package));
    total += static_cast<int64_t>(size);
  }
  ByteCorpus corpus;
  corpus.bytes_ = at::empty({total}, at::kByte);  // (N,)
  auto* out = reinterpret_cast<char*>(corpus.bytes_.data_ptr<uint8_t>());
  int64_t pos = 0;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    const auto size = static_cast<std::streamsize>(fs::file_size(f, ec));
    if (!in || ec || !in.read(out + pos, size) || in.gcount() != size) {
      throw DataError("cannot read " + f + " (unreadable, or changed while reading); " +
                      installHint(package));
    }
    pos += size;
  }
  corpus.files_ = std::move(files);
  return corpus;
}

LmDataset::LmDataset(at::Tensor tokens, int64_t seqLen) : tokens_(std::move(tokens)), seqLen_(seqLen) {
  TESSERA_CHECK_ARG(tokens_.dim() == 1 && tokens_.scalar_type() == at::kByte,
                    "LmDataset wants (N,) uint8 tokens, got " << tokens_.sizes() << " "
                                                              << tokens_.scalar_type());
  TESSERA_CHECK_ARG(seqLen_ >= 1, "seq_len must be >= 1, got " << seqLen_);
  TESSERA_CHECK_ARG(tokens_.numel() >= seqLen_ + 1,
                    "a language-model split of " << tokens_.numel() << " bytes is shorter than "
                                                 << "one example (seq_len + 1 = " << seqLen_ + 1
                                                 << " bytes); lower data.seq_len or change "
                                                    "data.val_fraction");
  windows_ = tokens_.unfold(0, seqLen_ + 1, seqLen_);  // (num examples, T + 1)
}

LmBatch LmDataset::batch(const std::vector<int64_t>& indices) const {
  const int64_t n = size();
  for (const int64_t i : indices) {
    TESSERA_CHECK_ARG(i >= 0 && i < n, "example index " << i << " out of range [0, " << n << ")");
  }
  const auto index = at::tensor(indices, at::kLong);                  // (B,)
  const auto rows = windows_.index_select(0, index).to(at::kLong);    // (B, T + 1)
  return {rows.narrow(1, 0, seqLen_).contiguous(),                    // (B, T)
          rows.narrow(1, 1, seqLen_).contiguous()};                   // (B, T)
}

LmSplit splitCorpus(const ByteCorpus& corpus, const DataConfig& config) {
  config.validate();
  const int64_t n = corpus.size();
  const auto trainBytes = static_cast<int64_t>(static_cast<double>(n) * (1.0 - config.val_fraction));
  const auto& bytes = corpus.bytes();
  return {LmDataset(bytes.narrow(0, 0, trainBytes), config.seq_len),
          LmDataset(bytes.narrow(0, trainBytes, n - trainBytes), config.seq_len)};
}

}  // namespace tessera::data
