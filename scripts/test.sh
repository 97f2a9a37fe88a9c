#!/usr/bin/env bash
# Sets up the machine, builds tessera (Release) and runs the whole test suite.
# Exits non-zero on any failure. Build dir: $TESSERA_BUILD_DIR (default build/).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
build_dir="${TESSERA_BUILD_DIR:-build}"
jobs="$(nproc)"

generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
if [ -f "$build_dir/CMakeCache.txt" ]; then generator=(); fi   # keep the existing generator

start=$(date +%s)
cmake -S . -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release
cmake --build "$build_dir" -j "$jobs"
built=$(date +%s)
echo "test.sh: build took $((built - start)) s"

# Multi-process tests oversubscribe the cores on purpose; run them one by one
# (tests mark the ones safe to overlap) so timeouts measure the code, not the queue.
(cd "$build_dir" && ctest --output-on-failure --timeout 900 -j "${TESSERA_TEST_JOBS:-1}")
echo "test.sh: tests took $(( $(date +%s) - built )) s"
