// core/data: the fortunes corpus and its split, the IDX reader on the real
// fashion-MNIST files and on crafted corrupt ones, and the distributed
// sampler's sharding, DP equivalence and exact resume.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#if TESSERA_TEST_HAVE_ZLIB
#include <zlib.h>
#endif

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

#include "tessera/core/data/byte_corpus.h"
#include "tessera/core/data/config.h"
#include "tessera/core/data/distributed_sampler.h"
#include "tessera/core/data/fashion_mnist.h"

namespace tessera::data {
namespace {
namespace fs = std::filesystem;

// Runs `fn`, expects it to throw E, returns the message.
template <typename E, typename Fn>
std::string errorOf(Fn fn) {
  try {
    fn();
  } catch (const E& e) {
    return e.what();
  }
  ADD_FAILURE() << "no exception thrown";
  return "";
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// A fresh directory under the system temp dir, removed at the end of the test.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "tessera_data_XXXXXX").string();
    path_ = mkdtemp(pattern.data());
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string path() const { return path_.string(); }

 private:
  fs::path path_;
};

// ---- fortunes ----------------------------------------------------------------

class Fortunes : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { corpus_ = new ByteCorpus(ByteCorpus::load()); }
  static void TearDownTestSuite() { delete corpus_; }
  static const ByteCorpus& corpus() { return *corpus_; }

 private:
  static inline ByteCorpus* corpus_ = nullptr;
};

TEST_F(Fortunes, LoadsEveryTextFileSorted) {
  EXPECT_GT(corpus().size(), 1'000'000);
  EXPECT_EQ(corpus().bytes().scalar_type(), at::kByte);
  const auto& files = corpus().files();
  ASSERT_FALSE(files.empty());
  EXPECT_TRUE(std::is_sorted(files.begin(), files.end()));
  int64_t total = 0;
  for (const auto& f : files) {
    EXPECT_NE(fs::path(f).extension(), ".dat") << f;
    EXPECT_NE(fs::path(f).extension(), ".u8") << f;
    total += static_cast<int64_t>(fs::file_size(f));
  }
  EXPECT_EQ(total, corpus().size());
  // The first bytes are the first file's.
  std::ifstream first(files.front(), std::ios::binary);
  std::string head(64, '\0');
  first.read(head.data(), 64);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(corpus().bytes().data_ptr<uint8_t>()), 64),
            head);
}

TEST_F(Fortunes, SplitIsDisjointAndDeterministic) {
  DataConfig config;
  config.seq_len = 64;
  config.val_fraction = 0.1;
  const LmSplit a = splitCorpus(corpus(), config);
  const LmSplit b = splitCorpus(corpus(), config);
  const int64_t n = corpus().size();
  const int64_t trainBytes = a.train.tokens().numel();
  EXPECT_EQ(trainBytes + a.val.tokens().numel(), n);
  EXPECT_NEAR(static_cast<double>(a.val.tokens().numel()) / static_cast<double>(n), 0.1, 1e-4);
  // Disjoint by position: train is the prefix, val starts where train ends.
  const auto* base = corpus().bytes().data_ptr<uint8_t>();
  EXPECT_EQ(a.train.tokens().data_ptr<uint8_t>(), base);
  EXPECT_EQ(a.val.tokens().data_ptr<uint8_t>(), base + trainBytes);
  EXPECT_TRUE(a.train.tokens().equal(b.train.tokens()));
  EXPECT_TRUE(a.val.tokens().equal(b.val.tokens()));
  EXPECT_EQ(a.train.size(), (trainBytes - 1) / 64);
  // The last validation example ends inside the val bytes.
  const auto lastVal = a.val.batch({a.val.size() - 1});
  EXPECT_EQ(lastVal.targets[0][63].item<int64_t>(),
            static_cast<int64_t>(base[trainBytes + a.val.size() * 64]));
}

TEST_F(Fortunes, BatchShapesAndTargetShift) {
  DataConfig config;
  config.seq_len = 32;
  const LmSplit split = splitCorpus(corpus(), config);
  const std::vector<int64_t> indices = {5, 0, 1234, split.train.size() - 1};
  const LmBatch batch = split.train.batch(indices);
  ASSERT_EQ(batch.inputs.sizes(), (std::vector<int64_t>{4, 32}));
  ASSERT_EQ(batch.targets.sizes(), (std::vector<int64_t>{4, 32}));
  EXPECT_EQ(batch.inputs.scalar_type(), at::kLong);
  EXPECT_EQ(batch.targets.scalar_type(), at::kLong);
  EXPECT_TRUE(batch.inputs.narrow(1, 1, 31).equal(batch.targets.narrow(1, 0, 31)));
  const auto* bytes = corpus().bytes().data_ptr<uint8_t>();
  for (size_t b = 0; b < indices.size(); ++b) {
    for (int64_t t = 0; t < 32; ++t) {
      const int64_t pos = indices[b] * 32 + t;
      ASSERT_EQ(batch.inputs[b][t].item<int64_t>(), bytes[pos]);
      ASSERT_EQ(batch.targets[b][t].item<int64_t>(), bytes[pos + 1]);
    }
  }
  EXPECT_THROW(split.train.batch({split.train.size()}), InvalidArgument);
}

TEST(FortunesErrors, MissingDirNamesPathAndPackage) {
  const std::string m =
      errorOf<DataError>([] { ByteCorpus::load("/nonexistent/tessera/fortunes"); });
  EXPECT_TRUE(contains(m, "/nonexistent/tessera/fortunes")) << m;
  EXPECT_TRUE(contains(m, "install fortunes (scripts/setup.sh)")) << m;
}

TEST(FortunesErrors, DirWithoutTextFiles) {
  TempDir dir;
  std::ofstream(dir.file("only.dat")) << "index";
  const std::string m = errorOf<DataError>([&] { ByteCorpus::load(dir.path()); });
  EXPECT_TRUE(contains(m, dir.path()) && contains(m, "no text file")) << m;
}

TEST(FortunesErrors, TooShortSplit) {
  TempDir dir;
  std::ofstream(dir.file("tiny")) << "0123456789";
  const ByteCorpus corpus = ByteCorpus::load(dir.path());
  EXPECT_EQ(corpus.size(), 10);
  DataConfig config;
  config.seq_len = 8;
  EXPECT_THROW(splitCorpus(corpus, config), InvalidArgument);
}

// ---- config -----------------------------------------------------------------

TEST(DataConfig, ValidateNamesTheField) {
  const auto fieldOf = [](auto mutate) {
    DataConfig config;
    mutate(config);
    try {
      config.validate();
    } catch (const ConfigError& e) {
      return e.field();
    }
    return std::string("(valid)");
  };
  EXPECT_EQ(fieldOf([](DataConfig&) {}), "(valid)");
  EXPECT_EQ(fieldOf([](DataConfig& c) { c.dataset = "cifar"; }), "data.dataset");
  EXPECT_EQ(fieldOf([](DataConfig& c) { c.seq_len = 0; }), "data.seq_len");
  EXPECT_EQ(fieldOf([](DataConfig& c) { c.val_fraction = 1.0; }), "data.val_fraction");
  EXPECT_EQ(fieldOf([](DataConfig& c) { c.batch_size = 0; }), "data.batch_size");
  DataConfig mnist;
  mnist.dataset = "fashion-mnist";
  EXPECT_EQ(mnist.resolvedDir(), kFashionMnistDir);
  EXPECT_EQ(DataConfig().resolvedDir(), kFortunesDir);
}

// ---- fashion-MNIST ----------------------------------------------------------

class FashionMnist : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
#if TESSERA_TEST_HAVE_ZLIB
    train_ = new ImageDataset(loadFashionMnist(kFashionMnistDir, "train"));
    test_ = new ImageDataset(loadFashionMnist(kFashionMnistDir, "test"));
#endif
  }
  void SetUp() override {
    if (train_ == nullptr) GTEST_SKIP() << "built without zlib: the packaged files are gzip-compressed";
  }
  static void TearDownTestSuite() {
    delete train_;
    delete test_;
  }
  static inline ImageDataset* train_ = nullptr;
  static inline ImageDataset* test_ = nullptr;
};

TEST_F(FashionMnist, ShapesRangesAndLabels) {
  ASSERT_EQ(train_->images.sizes(), (std::vector<int64_t>{60000, 784}));
  ASSERT_EQ(train_->labels.sizes(), (std::vector<int64_t>{60000}));
  ASSERT_EQ(test_->images.sizes(), (std::vector<int64_t>{10000, 784}));
  ASSERT_EQ(test_->labels.sizes(), (std::vector<int64_t>{10000}));
  EXPECT_EQ(train_->images.scalar_type(), at::kFloat);
  EXPECT_EQ(train_->labels.scalar_type(), at::kLong);
  for (const ImageDataset* d : {train_, test_}) {
    EXPECT_GE(d->images.min().item<float>(), 0.0f);
    EXPECT_LE(d->images.max().item<float>(), 1.0f);
    EXPECT_EQ(d->labels.min().item<int64_t>(), 0);
    EXPECT_EQ(d->labels.max().item<int64_t>(), 9);
  }
  // fashion-MNIST is balanced: 6000 per class in train.
  EXPECT_TRUE(train_->labels.bincount().equal(at::full({10}, 6000, at::kLong)));
  // The documented normalization constants match the data.
  EXPECT_NEAR(train_->images.mean().item<double>(), kFashionMnistMean, 5e-4);
  EXPECT_NEAR(train_->images.std().item<double>(), kFashionMnistStd, 5e-4);
  const ImageBatch batch = train_->batch({3, 1, 4});
  EXPECT_EQ(batch.images.sizes(), (std::vector<int64_t>{3, 784}));
  EXPECT_TRUE(batch.images[1].equal(train_->images[1]));
  EXPECT_EQ(batch.labels[2].item<int64_t>(), train_->labels[4].item<int64_t>());
}

TEST_F(FashionMnist, NormalizeIsAffine) {
  // Compares against the cached, unnormalized test split.
  const auto normalized = test_->images.sub(kFashionMnistMean).div(kFashionMnistStd);
  const ImageDataset direct = loadFashionMnist(kFashionMnistDir, "test", /*normalize=*/true);
  EXPECT_TRUE(direct.images.allclose(normalized, 1e-6, 1e-6));
}

#if TESSERA_TEST_HAVE_ZLIB
// Writes `bytes` gzip-compressed to `path`.
void writeGzip(const std::string& path, const std::vector<uint8_t>& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())),
            static_cast<int>(bytes.size()));
  ASSERT_EQ(gzclose(f), Z_OK);
}
#else
// A build without zlib (TESSERA_WITH_ZLIB=OFF) reads raw IDX files: the
// reader's checks are the same, so the crafted files are written raw.
void writeGzip(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good());
}

TEST(IdxReader, GzipWithoutZlibNamesTheOption) {
  TempDir dir;
  std::vector<uint8_t> bytes = {0x1f, 0x8b, 8, 0, 0, 0, 0, 0};
  writeGzip(dir.file("x.gz"), bytes);
  const std::string m = errorOf<NotSupported>([&] { readIdx(dir.file("x.gz"), 1); });
  EXPECT_TRUE(contains(m, "TESSERA_WITH_ZLIB") && contains(m, "gunzip")) << m;
}
#endif

// An IDX unsigned-byte header for `dims` followed by `payload` zero bytes.
std::vector<uint8_t> idxBytes(uint8_t dimsByte, const std::vector<uint32_t>& dims, size_t payload) {
  std::vector<uint8_t> out = {0, 0, 0x08, dimsByte};
  for (const uint32_t d : dims) {
    for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(d >> shift));
  }
  out.resize(out.size() + payload, 0);
  return out;
}

TEST(IdxReader, ReadsCraftedFile) {
  TempDir dir;
  auto bytes = idxBytes(3, {2, 3, 4}, 24);
  bytes.back() = 7;
  writeGzip(dir.file("ok.gz"), bytes);
  const IdxArray a = readIdx(dir.file("ok.gz"), 3);
  EXPECT_EQ(a.dims, (std::vector<int64_t>{2, 3, 4}));
  ASSERT_EQ(a.data.size(), 24u);
  EXPECT_EQ(a.data.back(), 7);
}

TEST(IdxReader, BadMagic) {
  TempDir dir;
  auto bytes = idxBytes(3, {2, 3, 4}, 24);
  bytes[2] = 0x0D;  // float elements
  writeGzip(dir.file("bad.gz"), bytes);
  const std::string m = errorOf<DataError>([&] { readIdx(dir.file("bad.gz"), 3); });
  EXPECT_TRUE(contains(m, dir.file("bad.gz"))) << m;
  EXPECT_TRUE(contains(m, "bad magic number 0x00000d03, expected 0x00000803")) << m;
  // Labels read where images are expected: the dimension count differs.
  writeGzip(dir.file("labels.gz"), idxBytes(1, {5}, 5));
  const std::string m2 = errorOf<DataError>([&] { readIdx(dir.file("labels.gz"), 3); });
  EXPECT_TRUE(contains(m2, "bad magic number 0x00000801")) << m2;
}

TEST(IdxReader, TruncatedPayload) {
  TempDir dir;
  writeGzip(dir.file("short.gz"), idxBytes(3, {2, 3, 4}, 20));
  const std::string m = errorOf<DataError>([&] { readIdx(dir.file("short.gz"), 3); });
  EXPECT_TRUE(contains(m, dir.file("short.gz")) && contains(m, "truncated")) << m;
  EXPECT_TRUE(contains(m, "announces 24 bytes of data, the file holds 20")) << m;
  writeGzip(dir.file("long.gz"), idxBytes(1, {4}, 6));
  const std::string m2 = errorOf<DataError>([&] { readIdx(dir.file("long.gz"), 1); });
  EXPECT_TRUE(contains(m2, "2 bytes after the 4")) << m2;
  writeGzip(dir.file("header.gz"), {0, 0, 8});
  EXPECT_TRUE(contains(errorOf<DataError>([&] { readIdx(dir.file("header.gz"), 1); }), "no header"));
}

TEST(IdxReader, TruncatedGzipStream) {
#if !TESSERA_TEST_HAVE_ZLIB
  GTEST_SKIP() << "built without zlib (TESSERA_WITH_ZLIB=OFF)";
#endif
  TempDir dir;
  std::vector<uint8_t> bytes = idxBytes(1, {100000}, 100000);
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] ^= static_cast<uint8_t>(i * 2654435761u >> 13);
  bytes[0] = 0, bytes[1] = 0, bytes[2] = 8, bytes[3] = 1;  // keep a valid magic
  writeGzip(dir.file("cut.gz"), bytes);
  fs::resize_file(dir.file("cut.gz"), fs::file_size(dir.file("cut.gz")) / 2);
  const std::string m = errorOf<DataError>([&] { readIdx(dir.file("cut.gz"), 1); });
  EXPECT_TRUE(contains(m, dir.file("cut.gz")) && contains(m, "corrupt")) << m;
  EXPECT_TRUE(contains(m, "truncated gzip stream")) << m;
  EXPECT_TRUE(contains(errorOf<DataError>([&] { readIdx(dir.path(), 1); }), "not a regular file"));
  EXPECT_TRUE(contains(m, "dataset-fashion-mnist")) << m;
}

TEST(IdxReader, MissingFileNamesPackage) {
  const std::string m = errorOf<DataError>([] { loadFashionMnist("/nonexistent/fmnist", "train"); });
  EXPECT_TRUE(contains(m, "/nonexistent/fmnist/train-images-idx3-ubyte.gz")) << m;
  EXPECT_TRUE(contains(m, "install dataset-fashion-mnist (scripts/setup.sh)")) << m;
  EXPECT_THROW(loadFashionMnist(kFashionMnistDir, "validation"), InvalidArgument);
}

TEST(IdxReader, LabelOutOfRange) {
  TempDir dir;
  writeGzip(dir.file("train-images-idx3-ubyte.gz"), idxBytes(3, {2, 28, 28}, 2 * 784));
  auto labels = idxBytes(1, {2}, 2);
  labels.back() = 10;
  writeGzip(dir.file("train-labels-idx1-ubyte.gz"), labels);
  const std::string m = errorOf<DataError>([&] { loadFashionMnist(dir.path(), "train"); });
  EXPECT_TRUE(contains(m, "label 10 not in [0, 10)")) << m;
}

// ---- distributed sampler ----------------------------------------------------

DistributedSampler makeSampler(int64_t n, int64_t batch, int rank, int size, int64_t seed = 7) {
  DistributedSampler::Options o;
  o.numExamples = n;
  o.batchSize = batch;
  o.dpRank = rank;
  o.dpSize = size;
  o.seed = seed;
  return DistributedSampler(o);
}

TEST(DistributedSampler, EpochOrderIsAPermutation) {
  const auto order = DistributedSampler::epochOrder(1000, 3, 0, true);
  std::vector<int64_t> sorted = order;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 1000; ++i) ASSERT_EQ(sorted[static_cast<size_t>(i)], i);
  EXPECT_NE(order, sorted);
  EXPECT_EQ(DistributedSampler::epochOrder(5, 3, 0, false), (std::vector<int64_t>{0, 1, 2, 3, 4}));
}

TEST(DistributedSampler, SameSeedSameOrderOtherEpochOrSeedDiffers) {
  EXPECT_EQ(DistributedSampler::epochOrder(500, 1, 0, true),
            DistributedSampler::epochOrder(500, 1, 0, true));
  EXPECT_NE(DistributedSampler::epochOrder(500, 1, 0, true),
            DistributedSampler::epochOrder(500, 1, 1, true));
  EXPECT_NE(DistributedSampler::epochOrder(500, 1, 0, true),
            DistributedSampler::epochOrder(500, 2, 0, true));
  // Through next(): epoch 1's batches differ from epoch 0's.
  auto s = makeSampler(100, 10, 0, 1);
  std::vector<std::vector<int64_t>> epoch0, epoch1;
  for (int i = 0; i < 10; ++i) epoch0.push_back(s.next());
  EXPECT_EQ(s.epoch(), 0);
  for (int i = 0; i < 10; ++i) epoch1.push_back(s.next());
  EXPECT_EQ(s.epoch(), 1);
  EXPECT_NE(epoch0, epoch1);
}

// For N = 1..4 ranks: shards are disjoint, of size b, and their concatenation
// in rank order is the 1-rank batch of size N*b, step after step across epochs.
TEST(DistributedSampler, RankShardsConcatenateToTheSingleProcessBatch) {
  const int64_t n = 103, b = 5;
  for (int size = 1; size <= 4; ++size) {
    auto single = makeSampler(n, size * b, 0, 1);
    std::vector<DistributedSampler> ranks;
    for (int r = 0; r < size; ++r) ranks.push_back(makeSampler(n, b, r, size));
    const int64_t steps = 3 * single.batchesPerEpoch() + 1;  // crosses epoch ends
    for (int64_t step = 0; step < steps; ++step) {
      const std::vector<int64_t> global = single.next();
      std::vector<int64_t> joined;
      std::set<int64_t> seen;
      for (auto& rank : ranks) {
        const auto shard = rank.next();
        ASSERT_EQ(static_cast<int64_t>(shard.size()), b);
        joined.insert(joined.end(), shard.begin(), shard.end());
        seen.insert(shard.begin(), shard.end());
      }
      ASSERT_EQ(static_cast<int64_t>(seen.size()), size * b) << "shards overlap";
      ASSERT_EQ(joined, global) << "size " << size << " step " << step;
    }
  }
}

TEST(DistributedSampler, DropsTheTailAndCoversEachExampleOncePerEpoch) {
  auto s = makeSampler(23, 5, 0, 1);
  EXPECT_EQ(s.batchesPerEpoch(), 4);
  std::set<int64_t> seen;
  for (int i = 0; i < 4; ++i) {
    for (const int64_t x : s.next()) EXPECT_TRUE(seen.insert(x).second) << x;
  }
  EXPECT_EQ(seen.size(), 20u);
  EXPECT_EQ(s.epoch(), 0);
  s.next();
  EXPECT_EQ(s.epoch(), 1);
}

TEST(DistributedSampler, ResumeReproducesTheNextBatches) {
  for (const int64_t stopAfter : {0, 3, 9, 10, 11, 25}) {  // 10 batches per epoch
    std::vector<DistributedSampler> run, resumed;
    for (int r = 0; r < 2; ++r) run.push_back(makeSampler(41, 2, r, 2, /*seed=*/99));
    for (int64_t i = 0; i < stopAfter; ++i) {
      for (auto& s : run) s.next();
    }
    for (int r = 0; r < 2; ++r) {
      resumed.push_back(makeSampler(41, 2, r, 2, 99));
      // Through the serializable map, as a checkpoint would store it.
      resumed.back().loadState(SamplerState::fromMap(run[static_cast<size_t>(r)].state().toMap()));
    }
    for (int i = 0; i < 25; ++i) {
      for (size_t r = 0; r < 2; ++r) {
        ASSERT_EQ(resumed[r].next(), run[r].next()) << "stop " << stopAfter << " step " << i;
      }
    }
  }
}

TEST(DistributedSampler, ResumeOnOtherDpSizeWithSameGlobalBatch) {
  auto single = makeSampler(50, 4, 0, 1);
  for (int i = 0; i < 17; ++i) single.next();
  auto rank0 = makeSampler(50, 2, 0, 2), rank1 = makeSampler(50, 2, 1, 2);
  rank0.loadState(single.state());
  rank1.loadState(single.state());
  for (int i = 0; i < 20; ++i) {
    auto joined = rank0.next();
    const auto shard1 = rank1.next();
    joined.insert(joined.end(), shard1.begin(), shard1.end());
    ASSERT_EQ(joined, single.next()) << i;
  }
}

TEST(DistributedSampler, BadOptionsAndStates) {
  EXPECT_THROW(makeSampler(10, 0, 0, 1), InvalidArgument);
  EXPECT_THROW(makeSampler(10, 2, 2, 2), InvalidArgument);
  const std::string m = errorOf<InvalidArgument>([] { makeSampler(10, 3, 0, 4); });
  EXPECT_TRUE(contains(m, "fewer than one global batch")) << m;
  auto s = makeSampler(10, 2, 0, 1, /*seed=*/1);
  SamplerState other = s.state();
  other.seed = 2;
  EXPECT_THROW(s.loadState(other), InvalidArgument);
  other = s.state();
  other.num_examples = 11;
  EXPECT_THROW(s.loadState(other), InvalidArgument);
  other = s.state();
  other.offset = 11;
  EXPECT_THROW(s.loadState(other), InvalidArgument);
  EXPECT_THROW(SamplerState::fromMap({{"epoch", 0}}), InvalidArgument);
}

// The sampler driving the real datasets, as a trainer would use them.
TEST_F(Fortunes, SamplerFeedsLmBatches) {
  DataConfig config;
  config.seq_len = 16;
  config.batch_size = 4;
  const LmSplit split = splitCorpus(corpus(), config);
  auto rank1 = makeSampler(split.train.size(), config.batch_size, 1, 2, config.seed);
  const LmBatch batch = split.train.batch(rank1.next());
  EXPECT_EQ(batch.inputs.sizes(), (std::vector<int64_t>{4, 16}));
}

}  // namespace
}  // namespace tessera::data
