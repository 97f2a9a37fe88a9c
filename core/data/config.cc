#include "tessera/core/data/config.h"

namespace tessera::data {

void DataConfig::validate() const {
  TESSERA_CHECK_CONFIG(dataset == "fortunes" || dataset == "fashion-mnist", "data.dataset",
                       "must be \"fortunes\" or \"fashion-mnist\", got \"" << dataset << "\"");
  TESSERA_CHECK_CONFIG(seq_len >= 1, "data.seq_len", "must be >= 1, got " << seq_len);
  TESSERA_CHECK_CONFIG(val_fraction > 0.0 && val_fraction < 1.0, "data.val_fraction",
                       "must be in (0, 1), got " << val_fraction);
  TESSERA_CHECK_CONFIG(batch_size >= 1, "data.batch_size", "must be >= 1, got " << batch_size);
}

std::string DataConfig::resolvedDir() const {
  if (!dir.empty()) return dir;
  return dataset == "fashion-mnist" ? kFashionMnistDir : kFortunesDir;
}

}  // namespace tessera::data
