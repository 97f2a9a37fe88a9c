# tessera-store: the standalone rendezvous store (comm/store_server.h) of
# elastic jobs, so that the store can outlive every trainer node.
add_executable(tessera-store ${CMAKE_CURRENT_SOURCE_DIR}/tessera_store.cc)
target_link_libraries(tessera-store PRIVATE tessera CLI11::CLI11)
target_compile_options(tessera-store PRIVATE -Wall -Wextra -Wno-unused-parameter)
set_target_properties(tessera-store PROPERTIES INSTALL_RPATH "$ORIGIN/../${CMAKE_INSTALL_LIBDIR}")
install(TARGETS tessera-store RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
