# The elastic mesh in one process (threads as nodes, a real store over loopback).
tessera_add_test(test_elastic elastic_test.cc)

# End to end in real processes: tessera-store + one tessera-train per node,
# nodes killed, restarted and refused (each test runs a few tiny DiLoCo jobs).
if(TARGET tessera-store)
  tessera_add_test(test_elastic_e2e elastic_e2e_test.cc ${PROJECT_SOURCE_DIR}/tests/launcher/subprocess.cc)
  target_include_directories(test_elastic_e2e PRIVATE ${PROJECT_SOURCE_DIR})
  target_link_libraries(test_elastic_e2e PRIVATE nlohmann_json::nlohmann_json)
  target_compile_definitions(test_elastic_e2e PRIVATE
    TESSERA_STORE_PATH="$<TARGET_FILE:tessera-store>"
    TESSERA_TRAIN_PATH="$<TARGET_FILE:tessera-train>"
    TESSERA_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
  add_dependencies(test_elastic_e2e tessera-store tessera-train)
endif()

# Checkpoints in elastic mode, end to end: every node killed, the job started
# again on the surviving store and on a fresh one, resumed from the latest
# checkpoint (issue 19, section 2).
if(TARGET tessera-store)
  tessera_add_test(test_elastic_checkpoint_e2e elastic_checkpoint_e2e_test.cc ${PROJECT_SOURCE_DIR}/tests/launcher/subprocess.cc)
  target_include_directories(test_elastic_checkpoint_e2e PRIVATE ${PROJECT_SOURCE_DIR})
  target_link_libraries(test_elastic_checkpoint_e2e PRIVATE nlohmann_json::nlohmann_json)
  target_compile_definitions(test_elastic_checkpoint_e2e PRIVATE
    TESSERA_STORE_PATH="$<TARGET_FILE:tessera-store>"
    TESSERA_TRAIN_PATH="$<TARGET_FILE:tessera-train>"
    TESSERA_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
  add_dependencies(test_elastic_checkpoint_e2e tessera-store tessera-train)
endif()
# The fast-detection tests drive the private heartbeat monitor (parallel/elastic/).
target_include_directories(test_elastic PRIVATE ${PROJECT_SOURCE_DIR})
target_link_libraries(test_elastic PRIVATE nlohmann_json::nlohmann_json)
# Elastic training on a real 3-member etcd cluster (tests/harness/etcd_cluster.h;
# skipped where the etcd binary is missing), one tessera-run --rdzv-backend etcd
# per node: the kill/restart test runs by default (~20 s); the etcd leader
# killed, quorum lost and regained, and quorum lost for good are labelled
# "long" (one to two minutes).
if(TARGET tessera-store)
  add_executable(test_elastic_etcd_e2e elastic_etcd_e2e_test.cc ${PROJECT_SOURCE_DIR}/tests/launcher/subprocess.cc)
  target_link_libraries(test_elastic_etcd_e2e PRIVATE tessera_test_harness tessera_train_config nlohmann_json::nlohmann_json)
  target_precompile_headers(test_elastic_etcd_e2e REUSE_FROM tessera_test_harness)
  target_include_directories(test_elastic_etcd_e2e PRIVATE ${PROJECT_SOURCE_DIR})
  target_compile_definitions(test_elastic_etcd_e2e PRIVATE
    TESSERA_RUN_PATH="$<TARGET_FILE:tessera-run>"
    TESSERA_TRAIN_PATH="$<TARGET_FILE:tessera-train>"
    TESSERA_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
  add_dependencies(test_elastic_etcd_e2e tessera-run tessera-train)
  gtest_discover_tests(test_elastic_etcd_e2e TEST_FILTER "-Long*" DISCOVERY_TIMEOUT 120 PROPERTIES TIMEOUT 600)
  gtest_discover_tests(test_elastic_etcd_e2e TEST_FILTER "Long*" DISCOVERY_TIMEOUT 120 PROPERTIES TIMEOUT 600 LABELS long)
endif()
