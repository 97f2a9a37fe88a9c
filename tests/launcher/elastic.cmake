# tessera-run --nnodes MIN:MAX (elastic mode) as a subprocess, against a tessera
# store the test hosts. elastic_test_worker prints the launch contract.
add_executable(elastic_test_worker ${CMAKE_CURRENT_LIST_DIR}/elastic_test_worker.cc)
target_compile_options(elastic_test_worker PRIVATE -Wall -Wextra)

tessera_add_test(test_elastic_launcher elastic_launcher_test.cc subprocess.cc)
target_compile_definitions(test_elastic_launcher PRIVATE
  TESSERA_RUN_PATH="$<TARGET_FILE:tessera-run>"
  ELASTIC_TEST_WORKER_PATH="$<TARGET_FILE:elastic_test_worker>")
add_dependencies(test_elastic_launcher tessera-run elastic_test_worker)
