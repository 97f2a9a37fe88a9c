#!/usr/bin/env bash
# Demo: install what tessera needs, build it (Release, Ninja, every core), and
# run the main experiment: elastic DiLoCo (int8 pseudo-gradients) training a
# tiny GPT on fortunes across 3 nodes, one of which is killed mid-run and
# restarted -- it rejoins through live recovery from a peer while the others
# keep training. When run as root the nodes are network-namespace "hosts"
# behind 100 Mbit/s links; otherwise they share loopback.
#
#   scripts/demo.sh                          # build dir: build/
#   TESSERA_BUILD_DIR=/tmp/b scripts/demo.sh
#   DEMO_BASELINE=1 scripts/demo.sh          # also a no-fault run first, to compare the final loss
#
# tessera-chaos prints every event as it happens (kill, membership changes,
# retried outer step, rejoin with bytes and time) and ends with a summary:
# final loss, bytes sent vs what DDP would have sent, recovery time, and the
# path of the plot (loss vs wall time, kill and rejoin marked). The plan is
# examples/chaos/demo.toml. Exits non-zero if the run fails or a committed
# outer step was lost, repeated or diverged between nodes.
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

out="${build_dir}/demo-chaos"
baseline=()
if [ "${DEMO_BASELINE:-0}" = 1 ]; then baseline=(--baseline); fi
if [ "$(id -u)" = 0 ]; then
  where="3 network-namespace hosts, 100 Mbit/s links"
else
  where="3 nodes on loopback (run as root for network namespaces)"
fi
step "run: tessera-chaos --plan examples/chaos/demo.toml --out ${out} ${baseline[*]:-}"
echo "  DiLoCo (H = 20, int8) on a tiny GPT over fortunes; ${where};"
echo "  node 2 is killed at step 110 and restarted at step 150 (about a minute)"
"${build_dir}/bench/tessera-chaos" --plan examples/chaos/demo.toml --out "${out}" "${baseline[@]}"

step "done"
echo "  events, recovery and traffic figures: ${out}/report.json"
echo "  logs and metrics of every node: ${out}/node<i>.log, ${out}/node<i>-<incarnation>.jsonl"
