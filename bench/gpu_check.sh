#!/usr/bin/env bash
# make gpu-check: one script for a machine with an NVIDIA GPU.
#
# It uses the python3 on PATH (torch with CUDA, ninja, nvcc, pytest already there; the machine may be
# offline, so it installs nothing) and the repository in place (PYTHONPATH, no pip install):
#   1. builds the fused kernels with their CUDA part (python3 -m melano.ops build --require-cuda);
#   2. runs the GPU tests: python3 -m pytest -m gpu tests (the fused op in both layouts, NCHW and
#      channels_last/NHWC, in every dtype);
#   3. runs the GPU benchmarks, which write bench/results/*_cuda*.json: bench_ops in fp32 and bf16 (fused
#      NHWC and NCHW against eager and a copy, kernels alone from CUDA graphs) and bench_cyclegan.
# Each step has a time cap so that the whole check stays under 8 minutes on one H100 or H200. A failed step
# does not stop the later ones (a GPU session is precious), but the script exits non-zero if any failed.
# When $OUT is set (a folder collected after the run), the results and logs are copied there.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MELANO_OPS=ext          # the compiled op or a loud failure, never a silent fallback
export PYTHONUNBUFFERED=1
# Kernel builds are cached inside the checkout (build/ is git-ignored), so a rerun on the same machine
# skips the nvcc build and nothing is written outside the repository.
export MELANO_BUILD_DIR="${MELANO_BUILD_DIR:-$ROOT/build/melano-kernels}"
# TORCH_CUDA_ARCH_LIST is left alone: with a GPU visible, torch picks its architecture.

DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-460}))  # under 8 minutes in all
LOGS="$ROOT/build/gpu_check_logs"  # build/ is git-ignored; the JSON results go to bench/results/
mkdir -p "$LOGS"
FAILED=()

collect() {
    if [[ -n "${OUT:-}" ]]; then
        mkdir -p "$OUT/results" "$OUT/logs"
        cp -f "$ROOT"/bench/results/*.json "$OUT/results/" 2>/dev/null || true
        cp -f "$LOGS"/*.log "$OUT/logs/" 2>/dev/null || true
    fi
    echo "gpu-check finished in ${SECONDS}s; failed steps: ${FAILED[*]:-none}"
}
trap collect EXIT

# step NAME CAP_SECONDS COMMAND...: runs COMMAND with a time cap (never past the deadline), logs to
# build/gpu_check_logs/NAME.log and the terminal, and records a failure instead of exiting.
step() {
    local name="$1" cap="$2"
    shift 2
    local left=$((DEADLINE - SECONDS))
    if ((left < 20)); then
        echo "=== $name: skipped, the time budget is spent" | tee "$LOGS/$name.log"
        FAILED+=("$name(no-time)")
        return 0
    fi
    if ((cap > left)); then cap=$left; fi
    echo "=== $name (cap ${cap}s): $*"
    local rc=0
    timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$LOGS/$name.log" || rc=${PIPESTATUS[0]}
    if ((rc == 124 || rc == 137)); then
        echo "=== $name FAILED: timed out after ${cap}s"
        FAILED+=("$name(timeout)")
    elif ((rc != 0)); then
        echo "=== $name FAILED (exit $rc)"
        FAILED+=("$name")
    fi
    return 0
}

echo "=== machine"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if ! "$PY" - <<'EOF'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    sys.exit("gpu-check: torch sees no CUDA device; run it on a machine with an NVIDIA GPU")
print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
then
    FAILED+=("machine")
    exit 1
fi

# 1. Build (about a minute with nvcc; cached in $MELANO_BUILD_DIR afterwards).
step build 240 "$PY" -m melano.ops build --require-cuda
if [[ " ${FAILED[*]:-} " == *" build"* ]]; then
    echo "the CUDA build failed: skipping tests and benchmarks"
    exit 1
fi

# 2. GPU tests of every module (marker gpu; tests/conftest.py skips them where CUDA is absent).
step pytest-gpu 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests

# 3. GPU benchmarks. Add further GPU benchmarks here, each as one `step` line with its own cap.
step bench-ops 120 "$PY" bench/bench_ops.py --device cuda --time-budget 45
step bench-ops-bf16 75 "$PY" bench/bench_ops.py --device cuda --dtype bfloat16 --no-compile --reps 30
step bench-cyclegan 100 "$PY" bench/bench_cyclegan.py --device cuda

((${#FAILED[@]} == 0)) || exit 1
