# The elastic mesh: membership through the store, re-formed global groups.
# elastic.cc is the mesh's life and its outer step; parallel/elastic/ holds
# its ideas, one per file (see the list at the top of elastic.cc).
target_sources(tessera PRIVATE
  ${CMAKE_CURRENT_SOURCE_DIR}/elastic.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/elastic/membership.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/elastic/heartbeat_monitor.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/elastic/decisions.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/elastic/join.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/elastic/groups.cc)
target_link_libraries(tessera PRIVATE nlohmann_json::nlohmann_json)
# One sync across the nodes (decide, form, run the optimizer's collective, vote, commit or retry).
target_sources(tessera PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/elastic/collective.cc)
