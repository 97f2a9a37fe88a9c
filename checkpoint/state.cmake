# Training state <-> StateDict (checkpoints and live recovery) and safetensors.
target_sources(tessera PRIVATE
  ${CMAKE_CURRENT_SOURCE_DIR}/training_state.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/safetensors.cc)
