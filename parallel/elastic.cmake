# The elastic mesh: membership through the store, re-formed global groups.
find_package(nlohmann_json REQUIRED)
target_sources(tessera PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/elastic.cc)
target_link_libraries(tessera PRIVATE nlohmann_json::nlohmann_json)
