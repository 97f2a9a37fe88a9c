#!/usr/bin/env bash
# Demo: install what tessera needs, build it (Release, Ninja, every core),
# and run a 4-rank data-parallel smoke test under tessera-run on this machine.
#
#   scripts/demo.sh                      # build dir: build/
#   TESSERA_BUILD_DIR=/tmp/b scripts/demo.sh
#
# Exits non-zero (with tessera-run's report) if any step or any rank fails.
set -euo pipefail

cd "$(dirname "$0")/.."
build_dir="${TESSERA_BUILD_DIR:-build}"
jobs="$(nproc)"

step() { printf '\n==> %s\n' "$*"; }

step "scripts/setup.sh: system packages"
scripts/setup.sh

step "configure: cmake -S . -B ${build_dir} -G Ninja -DCMAKE_BUILD_TYPE=Release"
cmake -S . -B "${build_dir}" -G Ninja -DCMAKE_BUILD_TYPE=Release

step "build: everything, with ${jobs} jobs"
cmake --build "${build_dir}" -j "${jobs}"

step "run: tessera-run --nproc-per-node 4 ${build_dir}/examples/allreduce_smoke"
# Port 0: the launcher picks a free port, so the demo never collides with a
# store someone else left on 29500.
"${build_dir}/launcher/tessera-run" --nproc-per-node 4 --master-port 0 "${build_dir}/examples/allreduce_smoke"

step "run: tessera-run --nproc-per-node 2 tessera-train --config examples/configs/gpt-tiny.toml (about a minute)"
metrics="${build_dir}/demo-gpt-tiny.jsonl"
"${build_dir}/launcher/tessera-run" --nproc-per-node 2 --master-port 0 \
  "${build_dir}/launcher/tessera-train" --config examples/configs/gpt-tiny.toml --metrics "${metrics}"

step "done"
echo "  - 4 ranks joined through tessera::init(), all-reduced, trained a linear model data-parallel"
echo "  - a byte-level GPT trained data-parallel (DDP) on 2 ranks; metrics per step in ${metrics}:"
tail -n 1 "${metrics}"
