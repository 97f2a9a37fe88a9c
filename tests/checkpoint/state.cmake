# Training state <-> StateDict, FSDP's parameter layout and safetensors, in
# one process and on 2 ranks (about 6 s); tessera-train --checkpoint-dir /
# --resume and tessera-export end to end under tessera-run (about 35 s).

tessera_add_test(test_training_state ${CMAKE_CURRENT_SOURCE_DIR}/state_test.cc)

tessera_add_test(test_training_state_cli ${CMAKE_CURRENT_SOURCE_DIR}/state_cli_test.cc
  ${PROJECT_SOURCE_DIR}/tests/launcher/subprocess.cc)
target_link_libraries(test_training_state_cli PRIVATE nlohmann_json::nlohmann_json)
target_compile_definitions(test_training_state_cli PRIVATE
  TESSERA_RUN_PATH="$<TARGET_FILE:tessera-run>"
  TESSERA_TRAIN_PATH="$<TARGET_FILE:tessera-train>"
  TESSERA_EXPORT_PATH="$<TARGET_FILE:tessera-export>"
  TESSERA_EXAMPLE_CONFIGS="${PROJECT_SOURCE_DIR}/examples/configs")
add_dependencies(test_training_state_cli tessera-run tessera-train tessera-export)

# The committed format-1 checkpoint (fixtures/README.md) loads whole, as
# dim-1 boxes, into today's FSDP layout on 2 ranks, and exports (about 3 s).
tessera_add_test(test_checkpoint_v1_fixture ${CMAKE_CURRENT_SOURCE_DIR}/v1_fixture_test.cc)
target_compile_definitions(test_checkpoint_v1_fixture PRIVATE
  TESSERA_CHECKPOINT_FIXTURES="${CMAKE_CURRENT_SOURCE_DIR}/fixtures")

# Checkpoints of tensor-parallel runs: tp = 2 with FSDP or DDP saved and
# resumed at tp = 1 and back, export, h5py, live recovery, init_from (4 ranks at most).
tessera_add_test(test_checkpoint_tp ${CMAKE_CURRENT_SOURCE_DIR}/tp_test.cc)
if(TARGET tessera_h5zstd)  # (no HDF5: the checkpoint tests fail with NotSupported; a GPU-only build skips them)
  add_dependencies(test_checkpoint_tp tessera_h5zstd)
endif()
target_compile_definitions(test_checkpoint_tp PRIVATE
  TESSERA_H5ZSTD_PLUGIN_DIR="${PROJECT_BINARY_DIR}/hdf5-plugins"
  TESSERA_CHECKPOINT_H5PY_SCRIPT="${CMAKE_CURRENT_SOURCE_DIR}/read_with_h5py.py")
