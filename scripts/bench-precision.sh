#!/usr/bin/env bash
# Mixed precision (issue 18, docs/precision.md), the three measurements side
# by side with their baselines:
#   1. FP8 codec throughput per core (encode / decode) beside memcpy:
#      tessera-bench quantize
#   2. convergence and memory: the tiny GPT (examples/configs/gpt-tiny.toml)
#      on 2 ranks, same tokens, fp32 / bf16 / FP8 O1 O2 O3 (delayed) and O1
#      with the other recipes: final validation loss (val_gap_vs_fp32) and
#      bytes per parameter held (mem_*_bpp, mem_vs_fp32), one JSON line each
#   3. FP8 gradient all-reduce against the fp32 ring over a 100 Mbit/s link
#      (network namespaces: root; falls back to loopback otherwise)
# Usage: scripts/bench-precision.sh [BUILD_DIR] [STEPS]   (defaults: build, 300)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
steps="${2:-300}"
bench="$build/bench/tessera-bench"
[[ -x "$bench" ]] || { echo "bench-precision.sh: $bench not found; build first (scripts/test.sh)" >&2; exit 1; }

"$bench" quantize --floats 1M,16M --iters 10
"$bench" convergence --ranks 2 --config "$root/examples/configs/gpt-tiny.toml" --steps "$steps" \
  --methods fp32,bf16,fp8-o1,fp8-o2,fp8-o3,fp8-o1-tensorwise,fp8-o1-rowwise,fp8-o1-blockwise \
  --out "$build/bench-out/precision" 2>/dev/null | sed -n 's/^\(\[rank 0\] \)\{0,1\}\({"bench".*\)$/\2/p'
link=loopback
[[ $(id -u) -eq 0 ]] && link=100mbit
"$bench" allreduce --compression fp8 --link "$link" --ranks 2 --bytes 4MiB,16MiB --iters 3 --warmup 1
