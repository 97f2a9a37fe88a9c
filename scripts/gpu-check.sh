#!/usr/bin/env bash
# The GPU check: on a machine with one NVIDIA GPU, PyTorch 2.x's wheel (which
# carries libtorch), nvcc, CMake, ninja and NCCL -- and none of the -dev
# packages scripts/setup.sh installs -- configures tessera against the wheel's
# libtorch with what that machine has (the copies in third_party/ for the
# header-only libraries and GoogleTest; the parts whose libraries are missing
# switched off and named), builds what the checks need, runs them, and writes
# one JSON summary:
#   1. NCCL: the communicator tests one GPU allows (tests/comm/nccl);
#   2. the CUDA paths (tests/gpu): a GPT training step on CUDA against the same
#      step on the CPU, the FP8 scaled GEMM (_scaled_mm) against its emulation,
#      activation offload to pinned host memory;
#   3. tessera-train on train.device = "cuda" against the same run on the CPU
#      (the losses of every logged step), and on parallel.backend = "nccl".
# Exits 0 when every check passed (or, in a dry run, skipped as expected).
#
#   scripts/gpu-check.sh [--out FILE] [--build-dir DIR] [--jobs N] [--torch-prefix DIR]
#   scripts/gpu-check.sh --dry-run
#
# --dry-run (a machine without a GPU, like CI's): the same steps with every
# optional library forced off and the third_party/ copies forced on, against
# whichever libtorch is found, so the option set, the build and this script's
# own logic cannot rot; the GPU checks then skip, and the summary says so.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

dry_run=0
out=""
build_dir=""
jobs="$(nproc)"
torch_prefix=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) out="$2"; shift ;;
    --build-dir) build_dir="$2"; shift ;;
    --jobs) jobs="$2"; shift ;;
    --torch-prefix) torch_prefix="$2"; shift ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$build_dir" ]; then
  if [ $dry_run = 1 ]; then build_dir=build-gpu-dry-run; else build_dir=build-gpu; fi
fi
mkdir -p "$build_dir"
build_dir="$(cd "$build_dir" && pwd)"
[ -n "$out" ] || out="$build_dir/gpu-check.json"
work="$build_dir/gpu-check"
rm -rf "$work" && mkdir -p "$work"
log() { echo "gpu-check: $*" >&2; }
step_start=$(date +%s)

# ---- What this machine has -------------------------------------------------------
python=$(command -v python3 || true)
[ -n "$python" ] || { log "needs python3 (for the wheel's libtorch and the summary)"; exit 2; }
torch_version=""
if [ -z "$torch_prefix" ] && "$python" -c 'import torch' 2>/dev/null; then
  torch_prefix=$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  torch_version=$("$python" -c 'import torch; print(torch.__version__)')
fi
if [ -z "$torch_prefix" ] && [ $dry_run = 0 ]; then
  log "no libtorch: install PyTorch 2.x (pip install torch) or pass --torch-prefix DIR"
  exit 2
fi
# NCCL: the toolkit's, else the one the wheel depends on (pip's nvidia-nccl),
# which ships only libnccl.so.2 (TesseraBackends.cmake looks for that name too).
nccl_root=""
if [ ! -f /usr/local/cuda/include/nccl.h ] && "$python" -c 'import nvidia.nccl' 2>/dev/null; then
  nccl_root=$("$python" -c 'import nvidia.nccl, os; print(list(nvidia.nccl.__path__)[0])')
fi
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
nvcc_version=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -1 || true)
if [ $dry_run = 0 ] && [ -z "$gpu_name" ]; then
  log "no GPU visible (nvidia-smi found none); use --dry-run on a machine without one"
  exit 2
fi

# ---- Configure ---------------------------------------------------------------------
cmake_args=(-S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DTESSERA_BUILD_TESTS=ON)
command -v ninja >/dev/null 2>&1 && [ ! -f "$build_dir/CMakeCache.txt" ] && cmake_args+=(-G Ninja)
[ -n "$torch_prefix" ] && cmake_args+=("-DCMAKE_PREFIX_PATH=$torch_prefix")
[ -n "$nccl_root" ] && cmake_args+=("-DNCCL_ROOT=$nccl_root")
if [ $dry_run = 1 ]; then
  # What a wheel-only machine lacks, forced off here (NCCL stays AUTO: it
  # compiles wherever the CUDA toolkit is, and its tests skip without a GPU).
  cmake_args+=(-DTESSERA_VENDORED_DEPS=ON -DTESSERA_WITH_GLOO=OFF -DTESSERA_WITH_HDF5=OFF
               -DTESSERA_WITH_OPENSSL=OFF -DTESSERA_WITH_CURL=OFF -DTESSERA_WITH_ZLIB=OFF -DTESSERA_WITH_MPI=OFF)
else
  cmake_args+=(-DTESSERA_WITH_NCCL=ON)
fi
log "configuring ($build_dir)"
configure_ok=true
cmake "${cmake_args[@]}" > "$work/configure.log" 2>&1 || configure_ok=false
parts=$(sed -n 's/^-- tessera parts: //p' "$work/configure.log" | tail -1)
vendored=$(sed -n 's/^-- tessera uses its copies in third_party\/ of: //p' "$work/configure.log" | tail -1)
configured=$(date +%s)

# ---- Build -------------------------------------------------------------------------
targets=(tessera tessera-train tessera-run test_cuda_paths test_train_cli)
[ $dry_run = 1 ] && targets+=(test_data)  # the reader without zlib
grep -q "nccl=ON" <<<"$parts" && targets+=(test_nccl)
build_ok=false
if $configure_ok; then
  log "building ${targets[*]} with $jobs jobs"
  cmake --build "$build_dir" -j "$jobs" --target "${targets[@]}" > "$work/build.log" 2>&1 && build_ok=true
  $build_ok || { log "the build failed; its end ($work/build.log):"; tail -25 "$work/build.log" >&2; }
else
  log "configuring failed; its end ($work/configure.log):"; tail -25 "$work/configure.log" >&2
fi
built=$(date +%s)

# ---- Checks ------------------------------------------------------------------------
# Each writes $work/<name>.json (GoogleTest's report) or .result (one line:
# passed|failed|skipped and a reason).
# On the GPU machine a CUDA test that skips is a failure (tests/gpu reads this).
[ $dry_run = 0 ] && export TESSERA_REQUIRE_CUDA=1
run_gtest() {  # name binary [filter]
  local name=$1 binary=$2 filter=${3:-*}
  if [ ! -x "$build_dir/$binary" ]; then echo "failed: $binary was not built" > "$work/$name.result"; return; fi
  log "running $binary"
  timeout 300 "$build_dir/$binary" --gtest_filter="$filter" --gtest_output="json:$work/$name.json" \
    > "$work/$name.log" 2>&1 || true
}
if $build_ok; then
  if grep -q "nccl=ON" <<<"$parts"; then run_gtest nccl tests/comm/nccl/test_nccl
  else echo "skipped: this build has no NCCL backend ($parts)" > "$work/nccl.result"; fi
  run_gtest cuda_paths tests/gpu/test_cuda_paths
  # The user-facing errors where there is no GPU (the dry run) and the keys' parsing.
  run_gtest train_cli tests/launcher/test_train_cli '*Device*:*Cuda*:*Nccl*'

  if [ $dry_run = 1 ]; then  # the parts switched off: raw IDX files read, a gzip one is refused naming the option
    run_gtest no_zlib_reader tests/core/data/test_data 'IdxReader.*'
  fi

  # tessera-train: the same small GPT on the CPU and on CUDA; every logged loss
  # compared. The corpus is this repository's own text (the machine has no
  # Debian fortunes package), the same bytes for both runs.
  mkdir -p "$work/corpus"
  cp README.md docs/*.md "$work/corpus/"
  train_flags=(--config examples/configs/gpt-tiny.toml --set "data.dir=$work/corpus"
               --set parallel.dp_replicate=1 --set train.steps=20 --set train.log_every=1
               --set train.eval_every=0 --set train.progress=false)
  train=("$build_dir/launcher/tessera-train" "${train_flags[@]}")
  if [ $dry_run = 1 ]; then
    # No GPU: the CUDA run must be refused, naming the key.
    if "${train[@]}" --set train.device=cuda > "$work/train_cuda.log" 2>&1; then
      echo "failed: train.device = cuda trained on a machine without CUDA" > "$work/train_cuda.result"
    elif grep -q "train.device" "$work/train_cuda.log"; then
      echo "skipped: no GPU; refused naming train.device as expected" > "$work/train_cuda.result"
    else
      echo "failed: the no-CUDA error does not name train.device: $(tail -1 "$work/train_cuda.log")" \
        > "$work/train_cuda.result"
    fi
    # The runs' flags and the loss comparison below, exercised on two CPU runs.
    "${train[@]}" --set train.device=cpu --metrics "$work/train_cpu.jsonl" > "$work/train_cpu.log" 2>&1 || true
    "${train[@]}" --metrics "$work/train_cpu_default.jsonl" > "$work/train_cpu_default.log" 2>&1 || true
  else
    log "tessera-train: CPU and CUDA"
    "${train[@]}" --set train.device=cpu --metrics "$work/train_cpu.jsonl" > "$work/train_cpu.log" 2>&1 || true
    "${train[@]}" --set train.device=cuda --metrics "$work/train_cuda.jsonl" > "$work/train_cuda.log" 2>&1 || true
    "$build_dir/launcher/tessera-run" --nproc-per-node 1 -- "${train[@]}" --set train.device=cuda \
      --set parallel.backend=nccl --metrics "$work/train_nccl.jsonl" > "$work/train_nccl.log" 2>&1 || true
  fi
fi
finished=$(date +%s)

# ---- Summary -----------------------------------------------------------------------
"$python" - "$work" "$out" <<PY
import glob, json, os, sys
work, out = sys.argv[1], sys.argv[2]
dry_run = $dry_run == 1
summary = {
    "dry_run": dry_run,
    "gpu": """$gpu_name""" or None,
    "nvcc": "$nvcc_version" or None,
    "torch": "$torch_version" or None,
    "torch_prefix": "$torch_prefix" or None,
    "configure": {"ok": "$configure_ok" == "true", "parts": "$parts", "third_party": "$vendored",
                  "seconds": $configured - $step_start},
    "build": {"ok": "$build_ok" == "true", "seconds": $built - $configured},
    "checks_seconds": $finished - $built,
    "logs": work,
    "checks": [],
}

def add(name, status, detail=""):
    summary["checks"].append({"name": name, "status": status, "detail": detail})

def result_file(name):
    path = os.path.join(work, name + ".result")
    if not os.path.exists(path):
        return False
    status, _, detail = open(path).read().strip().partition(": ")
    add(name, status, detail)
    return True

def skip_reasons(name):
    # GoogleTest's JSON has no skip message: take it from the log, the line
    # after "file:line: Skipped" inside the test's RUN block.
    reasons, test, lines = {}, None, []
    path = os.path.join(work, name + ".log")
    if os.path.exists(path):
        lines = open(path, errors="replace").read().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("[ RUN      ] "):
            test = line[13:].strip()
        elif line.endswith(": Skipped") and test and i + 1 < len(lines):
            reasons[test] = lines[i + 1].strip()
    return reasons

def gtest(name):
    if result_file(name):
        return
    reasons = skip_reasons(name)
    path = os.path.join(work, name + ".json")
    if not os.path.exists(path):
        add(name, "failed", "no report: the binary crashed or timed out (see %s.log)" % name)
        return
    for suite in json.load(open(path)).get("testsuites", []):
        for test in suite.get("testsuite", []):
            full = "%s/%s.%s" % (name, suite["name"], test["name"])
            if test.get("failures"):
                # "file:line" then the message: keep both, on one line.
                add(full, "failed", " ".join(test["failures"][0].get("failure", "").splitlines()[:3]))
            elif test.get("result") == "SKIPPED" or test.get("status") == "NOTRUN":
                add(full, "skipped", reasons.get("%s.%s" % (suite["name"], test["name"]), ""))
            else:
                add(full, "passed", "%s" % test.get("time", ""))

def losses(path):
    rows = []
    if os.path.exists(path):
        for line in open(path):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "loss" in row and "step" in row:
                rows.append((row["step"], row["loss"]))
    return dict(rows)

def compare_losses(name, a_file, b_file, bound):
    a, b = losses(os.path.join(work, a_file)), losses(os.path.join(work, b_file))
    common = sorted(set(a) & set(b))
    if not a or not b:
        add(name, "failed", "a run logged no losses (see %s / %s)" % (a_file, b_file))
        return b
    worst = max(abs(a[s] - b[s]) / max(abs(a[s]), 1e-6) for s in common)
    ok = worst <= bound and len(common) == len(a) == len(b)
    add(name, "passed" if ok else "failed",
        "%d steps, worst relative loss difference %.2e (bound %.0e)" % (len(common), worst, bound))
    return b

if summary["build"]["ok"]:
    gtest("nccl")
    gtest("cuda_paths")
    gtest("train_cli")
    if dry_run:
        gtest("no_zlib_reader")
    if dry_run:
        result_file("train_cuda")
        compare_losses("train_cpu_explicit_vs_default", "train_cpu.jsonl", "train_cpu_default.jsonl", 0.0)
    else:
        # fp32 on both sides, TF32 off by default for matmuls: the curves agree
        # to float noise that grows with the steps; 1e-3 relative bounds 20
        # steps of a tiny GPT (the per-step bound of tests/gpu is 1e-5).
        cuda = compare_losses("train_cuda_vs_cpu", "train_cpu.jsonl", "train_cuda.jsonl", 1e-3)
        nccl = losses(os.path.join(work, "train_nccl.jsonl"))
        ok = bool(nccl) and all(abs(nccl[s] - cuda.get(s, float("nan"))) <= 1e-5 * abs(nccl[s]) for s in nccl)
        add("train_nccl_backend", "passed" if ok else "failed",
            "%d steps under tessera-run with parallel.backend = nccl; losses equal the CUDA run's (1e-5)" % len(nccl))

statuses = [c["status"] for c in summary["checks"]]
summary["passed"] = statuses.count("passed")
summary["failed"] = statuses.count("failed")
summary["skipped"] = statuses.count("skipped")
if dry_run:
    # The script works when it configured and built with everything off and
    # every GPU check skipped (or, for the no-GPU errors, passed) rather than failed.
    summary["ok"] = summary["configure"]["ok"] and summary["build"]["ok"] and summary["failed"] == 0 and bool(statuses)
else:
    summary["ok"] = (summary["configure"]["ok"] and summary["build"]["ok"] and summary["failed"] == 0
                     and summary["passed"] > 0)
json.dump(summary, open(out, "w"), indent=2)
print(json.dumps({k: summary[k] for k in ("ok", "passed", "failed", "skipped", "dry_run")}))
for c in summary["checks"]:
    if c["status"] == "failed":
        print("FAILED", c["name"], c["detail"], file=sys.stderr)
sys.exit(0 if summary["ok"] else 1)
PY
