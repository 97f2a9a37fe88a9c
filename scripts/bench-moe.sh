#!/usr/bin/env bash
# Expert parallelism against one process at the same global batch (16 x 128
# tokens), on examples/configs/gpt-moe-ep-bench.toml (8 experts, top-2, one
# intra-op thread per rank), then ep = 2 x tp = 2 (TED) without and with
# duplicate-token dropping to show the all-to-all bytes drop by the tp degree:
# prints four `tessera-bench train` JSON lines and a summary line
#   {"bench": "moe_ep_scaling", "ep2_over_ep1": ..., "dtd_reduction_measured": ...}
# Usage: scripts/bench-moe.sh [BUILD_DIR] [STEPS] [BACKEND] [TED_STEPS]
#   (defaults: build, 20, mpi, 5)
# STEPS: timed steps of the ep = 1 and ep = 2 runs; TED_STEPS: of the two
# 4-process runs, whose throughput is not the point on a 2-core machine
# (only their bytes are). BACKEND as scripts/bench-tp.sh: "mpi" (shared
# memory) or "gloo" (TCP loopback). Run it on a quiet machine: every rank
# wants a core of its own.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
steps="${2:-20}"
backend="${3:-mpi}"
ted_steps="${4:-5}"
bench="$build/bench/tessera-bench"
config="$root/examples/configs/gpt-moe-ep-bench.toml"
[[ -x "$bench" ]] || { echo "bench-moe.sh: $bench not found; build first (scripts/test.sh or cmake --build $build)" >&2; exit 1; }

run() {  # ranks, steps, overrides...: the JSON line of one run
  local ranks="$1" n="$2"; shift 2
  local args=()
  for o in "$@"; do args+=(--set "$o"); done
  "$bench" train --backend "$backend" --config "$config" --ranks "$ranks" --steps "$n" "${args[@]}" 2>/dev/null |
    sed -n 's/^\(\[rank 0\] \)\{0,1\}\({"bench": "train".*\)$/\2/p'
}

ep1="$(run 1 "$steps" parallel.strategy=none data.batch_size=16)"
ep2="$(run 2 "$steps" parallel.ep=2 data.batch_size=8)"
ted="$(run 4 "$ted_steps" parallel.ep=2 parallel.tp=2 data.batch_size=8)"
dtd="$(run 4 "$ted_steps" parallel.ep=2 parallel.tp=2 parallel.moe_dtd=true data.batch_size=8)"
printf '%s\n%s\n%s\n%s\n' "$ep1" "$ep2" "$ted" "$dtd"
python3 - "$ep1" "$ep2" "$ted" "$dtd" "$backend" <<'PY'
import json, sys
ep1, ep2, ted, dtd = (json.loads(a) for a in sys.argv[1:5])
print(json.dumps({"bench": "moe_ep_scaling", "backend": sys.argv[5],
                  "tokens_per_s": {"ep1_1rank": round(ep1["tokens_per_s"]), "ep2_2ranks": round(ep2["tokens_per_s"]),
                                   "ep2_tp2_4ranks": round(ted["tokens_per_s"]),
                                   "ep2_tp2_dtd_4ranks": round(dtd["tokens_per_s"])},
                  "ep2_over_ep1": round(ep2["tokens_per_s"] / ep1["tokens_per_s"], 3),
                  "ep_bytes_per_step": {"ep2": ep2["ep"]["bytes_per_step"], "ep2_tp2": ted["ep"]["bytes_per_step"],
                                        "ep2_tp2_dtd": dtd["ep"]["bytes_per_step"]},
                  "ep_measured_over_model": {"ep2": ep2["ep"]["measured_over_model"],
                                             "ep2_tp2": ted["ep"]["measured_over_model"],
                                             "ep2_tp2_dtd": dtd["ep"]["measured_over_model"]},
                  "tp_measured_over_model": {"ep2_tp2": ted["tp"]["measured_over_model"],
                                             "ep2_tp2_dtd": dtd["tp"]["measured_over_model"]},
                  "tp_degree": dtd["ep"]["tp"],
                  # The all-to-all bytes without DTD over those with it, measured in the two runs.
                  "dtd_reduction_measured": round(ted["ep"]["bytes_per_step"] / dtd["ep"]["bytes_per_step"], 4),
                  "dtd_reduction_vs_model": round(dtd["ep"]["reduction_measured"], 4)}))
PY
