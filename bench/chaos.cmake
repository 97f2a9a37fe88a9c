# tessera-chaos: fault-injection experiments on elastic jobs (bench/chaos/).
# The plan reader, the runner and the report are a static library so the
# report tests can call them without starting any training.

add_library(tessera_chaos STATIC chaos/plan.cc chaos/report.cc chaos/runner.cc)
target_include_directories(tessera_chaos PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(tessera_chaos PUBLIC tessera tomlplusplus::tomlplusplus nlohmann_json::nlohmann_json)
target_compile_options(tessera_chaos PRIVATE -Wall -Wextra -Wno-unused-parameter)

add_executable(tessera-chaos chaos/main.cc)
target_link_libraries(tessera-chaos PRIVATE tessera_chaos CLI11::CLI11)
target_compile_options(tessera-chaos PRIVATE -Wall -Wextra -Wno-unused-parameter)
# Build-tree paths of the programs it starts; an installed tessera-chaos finds
# them next to itself instead (main.cc: locate()).
target_compile_definitions(tessera-chaos PRIVATE
  TESSERA_CHAOS_RUN_PATH="$<TARGET_FILE:tessera-run>"
  TESSERA_CHAOS_TRAIN_PATH="$<TARGET_FILE:tessera-train>"
  TESSERA_CHAOS_NETNS_SCRIPT="${PROJECT_SOURCE_DIR}/scripts/netns-cluster.sh")
if(TARGET tessera-store)
  target_compile_definitions(tessera-chaos PRIVATE TESSERA_CHAOS_STORE_PATH="$<TARGET_FILE:tessera-store>")
endif()
set_target_properties(tessera-chaos PROPERTIES INSTALL_RPATH "$ORIGIN/../${CMAKE_INSTALL_LIBDIR}")
install(TARGETS tessera-chaos RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(PROGRAMS ${PROJECT_SOURCE_DIR}/scripts/netns-cluster.sh DESTINATION ${CMAKE_INSTALL_BINDIR} OPTIONAL)

if(TESSERA_BUILD_TESTS)
  # (The report's unit tests live under tests/bench/chaos/.)
  # The command line: a plan that cannot run in loopback mode is refused with exit 2.
  add_test(NAME chaos_cli_refuses_partition_in_loopback
    COMMAND tessera-chaos --plan ${CMAKE_CURRENT_SOURCE_DIR}/chaos/testdata/partition-loopback.toml
            --out ${CMAKE_CURRENT_BINARY_DIR}/chaos-refused)
  set_tests_properties(chaos_cli_refuses_partition_in_loopback PROPERTIES TIMEOUT 30
    PASS_REGULAR_EXPRESSION "needs network.mode = .netns.")
  if(TARGET tessera-store)
    # End to end on loopback (about 15 s): 2 elastic nodes, one killed and
    # restarted; exit 0 means training finished with no committed outer step
    # lost, repeated or diverged, and the report says the failure was survived
    # and the restarted node recovered from its peer.
    add_test(NAME chaos_two_node_loopback_e2e
      COMMAND tessera-chaos --plan ${PROJECT_SOURCE_DIR}/examples/chaos/two-node-loopback.toml
              --out ${CMAKE_CURRENT_BINARY_DIR}/chaos-two-node)
    set_tests_properties(chaos_two_node_loopback_e2e PROPERTIES TIMEOUT 300
      PASS_REGULAR_EXPRESSION "failures: 1, survived 1.*restart of node 1: recovered .* from 0[.]0.*lost 0, repeated 0, parameter-hash mismatches 0")
  endif()
endif()
# The runner and the report, each split by idea (see runner_internal.h and
# report_internal.h for which file holds what).
target_sources(tessera_chaos PRIVATE chaos/store_processes.cc chaos/events.cc chaos/watch.cc
  chaos/stall_breakdown.cc chaos/report_output.cc)
