# comm/net and tessera's own store: sockets, the join handshake, the store
# server under garbage, and Gloo rendezvousing through it.
tessera_add_test(test_net net_test.cc)
tessera_add_test(test_store_server store_server_test.cc)
if(TARGET tessera-store)
  target_compile_definitions(test_store_server PRIVATE TESSERA_STORE_PATH="$<TARGET_FILE:tessera-store>")
  add_dependencies(test_store_server tessera-store)
endif()

# libFuzzer target for the store's request parser (clang only):
#   cmake -DCMAKE_CXX_COMPILER=clang++ -DTESSERA_BUILD_FUZZERS=ON ...
#   ./tests/comm/store_fuzz -max_total_time=60
option(TESSERA_BUILD_FUZZERS "Build the libFuzzer targets (needs clang)" OFF)
if(TESSERA_BUILD_FUZZERS)
  if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    # The parser and what it needs, compiled in with coverage instrumentation
    # (no libtessera: libFuzzer only steers by code it instruments).
    add_executable(store_fuzz store_fuzz.cc
      ${PROJECT_SOURCE_DIR}/comm/store/store_protocol.cc
      ${PROJECT_SOURCE_DIR}/core/error.cc)
    target_include_directories(store_fuzz PRIVATE ${PROJECT_SOURCE_DIR} ${PROJECT_SOURCE_DIR}/include)
    target_compile_options(store_fuzz PRIVATE -fsanitize=fuzzer,address,undefined)
    target_link_options(store_fuzz PRIVATE -fsanitize=fuzzer,address,undefined)
  else()
    message(WARNING "TESSERA_BUILD_FUZZERS needs clang (libFuzzer); ${CMAKE_CXX_COMPILER_ID} found: store_fuzz skipped")
  endif()
endif()
