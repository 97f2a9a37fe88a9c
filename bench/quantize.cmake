# The compression benchmarks: `tessera-bench quantize` (int8 and FP8
# kernels beside memcpy, one core) and `tessera-bench allreduce --compression
# int8|fp8 [--link RATE]`.
# Where --link finds scripts/netns-link.sh when run from the build tree.
target_compile_definitions(tessera-bench PRIVATE
  TESSERA_NETNS_SCRIPT_PATH="${PROJECT_SOURCE_DIR}/scripts/netns-link.sh")

if(TESSERA_BUILD_TESTS)
  # Smoke runs only (no timing checks; no root/netns: --link loopback).
  add_test(NAME bench_quantize_smoke
    COMMAND tessera-bench quantize --floats 4096,100000 --iters 2)
  set_tests_properties(bench_quantize_smoke PROPERTIES TIMEOUT 60
    PASS_REGULAR_EXPRESSION "\"floats\": 100000.*\"quantize_gbps\".*\"naive_quantize_gbps\".*\"dequant_accumulate_gbps\".*\"fp8_encode_gbps\".*\"fp8_decode_gbps\".*\"memcpy_gbps\"")
  add_test(NAME bench_allreduce_int8_smoke
    COMMAND tessera-bench allreduce --compression int8 --link loopback --ranks 2 --bytes 4KiB,64KiB
            --iters 2 --warmup 1)
  set_tests_properties(bench_allreduce_int8_smoke PROPERTIES TIMEOUT 120
    PASS_REGULAR_EXPRESSION "\"bytes\": 65536.*\"speedup_vs_fp32\"")
  add_test(NAME bench_allreduce_fp8_smoke
    COMMAND tessera-bench allreduce --compression fp8 --link loopback --ranks 2 --bytes 4KiB,64KiB
            --iters 2 --warmup 1)
  set_tests_properties(bench_allreduce_fp8_smoke PROPERTIES TIMEOUT 120
    PASS_REGULAR_EXPRESSION "\"compression\": \"fp8\".*\"bytes\": 65536.*\"fp8_sent_bytes_per_rank\": 16[0-9][0-9][0-9].*\"speedup_vs_fp32\"")
endif()
