#!/usr/bin/env bash
# Tensor parallelism against one process and against data parallelism, at the
# same global batch, on examples/configs/gpt-tp-bench.toml (one intra-op thread
# per rank): prints three `tessera-bench train` JSON lines and a summary line
#   {"bench": "tp_scaling", "tp2_over_tp1": ..., "tp2_over_dp2": ...}
# Usage: scripts/bench-tp.sh [BUILD_DIR] [STEPS] [BACKEND]   (defaults: build, 20, mpi)
# BACKEND is the communicator of the 2-rank runs: "mpi" (OpenMPI's shared
# memory, this machine's fastest intra-node transport) or "gloo" (TCP
# loopback, whose polling threads also take CPU from the ranks' compute).
# Run it on a quiet machine: every rank wants a core of its own.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
steps="${2:-20}"
backend="${3:-mpi}"
bench="$build/bench/tessera-bench"
config="$root/examples/configs/gpt-tp-bench.toml"
[[ -x "$bench" ]] || { echo "bench-tp.sh: $bench not found; build first (scripts/test.sh or cmake --build $build)" >&2; exit 1; }

run() {  # ranks, overrides...: the JSON line of one run
  local ranks="$1"; shift
  local args=()
  for o in "$@"; do args+=(--set "$o"); done
  "$bench" train --backend "$backend" --config "$config" --ranks "$ranks" --steps "$steps" "${args[@]}" 2>/dev/null |
    sed -n 's/^\(\[rank 0\] \)\{0,1\}\({"bench": "train".*\)$/\2/p'
}

tp1="$(run 1 parallel.strategy=none data.batch_size=8)"
tp2="$(run 2 parallel.strategy=none parallel.tp=2 data.batch_size=8)"
dp2="$(run 2 parallel.strategy=ddp parallel.dp_replicate=2 data.batch_size=4)"
printf '%s\n%s\n%s\n' "$tp1" "$tp2" "$dp2"
python3 - "$tp1" "$tp2" "$dp2" "$backend" <<'PY'
import json, sys
tp1, tp2, dp2 = (json.loads(a) for a in sys.argv[1:4])
print(json.dumps({"bench": "tp_scaling", "backend": sys.argv[4],
                  "tokens_per_s": {"tp1_1rank": round(tp1["tokens_per_s"]), "tp2_2ranks": round(tp2["tokens_per_s"]),
                                   "dp2_2ranks": round(dp2["tokens_per_s"])},
                  "tp2_over_tp1": round(tp2["tokens_per_s"] / tp1["tokens_per_s"], 3),
                  "tp2_over_dp2": round(tp2["tokens_per_s"] / dp2["tokens_per_s"], 3),
                  "tp2_bytes_per_step": tp2["tp"]["bytes_per_step"],
                  "tp2_model_bytes_per_step": tp2["tp"]["model_bytes_per_step"]}))
PY
