# tessera-bench checkpoint: smoke run on a tiny state (figures come from real runs).
if(TESSERA_BUILD_TESTS)
  add_test(NAME bench_checkpoint_smoke
    COMMAND tessera-bench checkpoint --bytes 2MiB --tensors 4 --saves 1 --ranks 2)
  set_tests_properties(bench_checkpoint_smoke PROPERTIES TIMEOUT 120
    PASS_REGULAR_EXPRESSION "\"bench\": \"checkpoint\".*\"blocked_over_memcpy\".*\"load_gbps\"")
endif()
