target_sources(tessera PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/fault.cc)
