#!/usr/bin/env bash
# Sets up the machine, builds tessera (Release) and runs the default test suite
# (every test but those labelled "long": the end-to-end equivalence matrices,
# and "dry-run": scripts/gpu-check.sh --dry-run, a second whole build).
#   scripts/test.sh           the default suite (what .ci/run runs)
#   scripts/test.sh --long    the default suite and the long tests
#   scripts/test.sh --only-long   the long tests alone
#   scripts/test.sh --gpu-dry-run the GPU check's dry run alone (a GPU-only
#                             build with every optional library off; ~25 min here)
# Exits non-zero on any failure. Build dir: $TESSERA_BUILD_DIR (default build/).
set -euo pipefail
labels=(-LE 'long|dry-run')
case "${1:-}" in
  "") ;;
  --long) labels=(-LE dry-run) ;;
  --only-long) labels=(-L long) ;;
  --gpu-dry-run) labels=(-L dry-run) ;;
  *) echo "usage: scripts/test.sh [--long | --only-long | --gpu-dry-run]" >&2; exit 2 ;;
esac
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
(cd "$build_dir" && ctest --output-on-failure --timeout 900 -j "${TESSERA_TEST_JOBS:-1}" "${labels[@]}")
echo "test.sh: tests took $(( $(date +%s) - built )) s"
