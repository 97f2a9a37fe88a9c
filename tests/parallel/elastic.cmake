# The elastic mesh in one process (threads as nodes, a real store over loopback).
tessera_add_test(test_elastic elastic_test.cc)

# End to end in real processes: tessera-store + one tessera-train per node,
# nodes killed, restarted and refused (each test runs a few tiny DiLoCo jobs).
if(TARGET tessera-store)
  find_package(nlohmann_json REQUIRED)
  tessera_add_test(test_elastic_e2e elastic_e2e_test.cc ${PROJECT_SOURCE_DIR}/tests/launcher/subprocess.cc)
  target_include_directories(test_elastic_e2e PRIVATE ${PROJECT_SOURCE_DIR})
  target_link_libraries(test_elastic_e2e PRIVATE nlohmann_json::nlohmann_json)
  target_compile_definitions(test_elastic_e2e PRIVATE
    TESSERA_STORE_PATH="$<TARGET_FILE:tessera-store>"
    TESSERA_TRAIN_PATH="$<TARGET_FILE:tessera-train>"
    TESSERA_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
  add_dependencies(test_elastic_e2e tessera-store tessera-train)
endif()
