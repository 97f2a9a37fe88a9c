# Live recovery: a training-state snapshot streamed to a joining node over an
# authenticated socket (comm/net), checksummed with xxhash (format.cmake links it).
target_sources(tessera PRIVATE
  ${CMAKE_CURRENT_SOURCE_DIR}/live_recovery.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/recovery_wire.cc)
