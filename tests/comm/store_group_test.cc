// comm::makeStoreGroup: a named backend forms a working group over a store
// (checked against a sum computed here), with the name and timeouts asked
// for; a backend that cannot form groups over a store is refused clearly.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <thread>

#include "tessera/comm/nccl.h"
#include "tessera/comm/store_group.h"
#include "tessera/core/error.h"

namespace tessera::comm {
namespace {

using namespace std::chrono_literals;

// Forms a `size`-rank group in threads of this process and all-reduces
// (rank + 1) * [1, 2, ..., n] on every rank.
void formAndSum(int size, const GroupOptions& options, std::vector<at::Tensor>* results,
                std::vector<std::string>* names, std::vector<Timeout>* timeouts) {
  StorePtr store = makeHashStore();
  const int64_t n = 7;
  results->assign(size, at::Tensor());
  names->assign(size, "");
  timeouts->assign(size, Timeout(0));
  std::vector<std::string> errors(size);
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r] {
      try {
        CommPtr group = makeStoreGroup(store, "test/group", r, size, options);
        at::Tensor t = at::arange(1, n + 1, at::kFloat) * static_cast<float>(r + 1);
        group->allReduce(t, ReduceOp::kSum);
        (*results)[r] = t;
        (*names)[r] = group->name();
        (*timeouts)[r] = group->timeout();
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < size; ++r) ASSERT_TRUE(errors[r].empty()) << "rank " << r << ": " << errors[r];
}

TEST(StoreGroup, GlooGroupSumsAndCarriesItsNameAndTimeouts) {
  for (int size : {1, 3}) {
    GroupOptions options;
    options.name = "my-group";
    options.timeout = 20s;
    options.operationTimeout = 7s;
    std::vector<at::Tensor> results;
    std::vector<std::string> names;
    std::vector<Timeout> timeouts;
    formAndSum(size, options, &results, &names, &timeouts);
    // sum over r of (r + 1) * [1..7] = size * (size + 1) / 2 * [1..7]
    const at::Tensor expected = at::arange(1, 8, at::kFloat) * static_cast<float>(size * (size + 1) / 2);
    for (int r = 0; r < size; ++r) {
      EXPECT_TRUE(at::equal(results[r], expected)) << "size " << size << " rank " << r;
      EXPECT_EQ(names[r], "my-group");
      EXPECT_EQ(timeouts[r], Timeout(7s));
    }
  }
}

TEST(StoreGroup, NameDefaultsToThePrefixAndOperationTimeoutToTheRendezvous) {
  GroupOptions options;
  options.timeout = 9s;
  std::vector<at::Tensor> results;
  std::vector<std::string> names;
  std::vector<Timeout> timeouts;
  formAndSum(2, options, &results, &names, &timeouts);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(names[r], "test/group");
    EXPECT_EQ(timeouts[r], Timeout(9s));
  }
}

TEST(StoreGroup, BackendsThatCannotFormGroupsOverAStoreAreRefused) {
  for (const char* backend : {"mpi", "single"}) {
    GroupOptions options;
    options.backend = backend;
    try {
      makeStoreGroup(makeHashStore(), "g", 0, 1, options);
      FAIL() << backend << " formed a group over a store";
    } catch (const NotSupported& e) {
      EXPECT_NE(std::string(e.what()).find("use backend \"gloo\""), std::string::npos) << e.what();
    }
  }
  GroupOptions unknown;
  unknown.backend = "glooo";
  EXPECT_THROW(makeStoreGroup(makeHashStore(), "g", 0, 1, unknown), InvalidArgument);
  if (ncclDeviceCount() == 0) {
    GroupOptions nccl;
    nccl.backend = "nccl";
    EXPECT_THROW(makeStoreGroup(makeHashStore(), "g", 0, 1, nccl), NotSupported);
  }
}

TEST(StoreGroup, BadRankIsAnInvalidArgument) {
  EXPECT_THROW(makeStoreGroup(makeHashStore(), "g", 2, 2, {}), InvalidArgument);
  EXPECT_THROW(makeStoreGroup(nullptr, "g", 0, 1, {}), InvalidArgument);
}

}  // namespace
}  // namespace tessera::comm
