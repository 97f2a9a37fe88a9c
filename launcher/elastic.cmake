# tessera-run's elastic mode (--nnodes MIN:MAX): one node of a job whose nodes
# leave and join, through a tessera store. Included by launcher/CMakeLists.txt.
target_sources(tessera-run PRIVATE ${CMAKE_CURRENT_LIST_DIR}/elastic_node.cc)
target_link_libraries(tessera-run PRIVATE nlohmann_json::nlohmann_json)
target_sources(tessera-run PRIVATE ${CMAKE_CURRENT_LIST_DIR}/node_slot.cc)
