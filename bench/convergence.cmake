if(TESSERA_BUILD_TESTS)
  # Smoke run: two methods, a few steps; checks the JSON and the ratio field, not the figures.
  add_test(NAME bench_convergence_smoke
    COMMAND tessera-bench convergence --ranks 2 --steps 4 --eval-every 2 --eval-batches 1 --methods ddp,diloco-h2
            --config ${PROJECT_SOURCE_DIR}/examples/configs/gpt-tiny.toml --out ${CMAKE_CURRENT_BINARY_DIR}/convergence-smoke)
  set_tests_properties(bench_convergence_smoke PROPERTIES TIMEOUT 180
    PASS_REGULAR_EXPRESSION "\"method\": \"diloco-h2\".*\"bytes_ratio_vs_ddp\"")
endif()
