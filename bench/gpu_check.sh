#!/usr/bin/env bash
# gpu-check: one script for a machine with an NVIDIA GPU. Run it as `bash bench/gpu_check.sh` (no make
# needed; `make gpu-check` does the same).
#
# It uses the python3 on PATH ($PYTHON if set; torch with CUDA, ninja, nvcc, pytest already there; the
# machine may be offline, so it installs nothing) and the repository in place (PYTHONPATH, no pip install):
#   1. builds the fused kernels with their CUDA part (python3 -m melano.ops build --require-cuda), for the
#      visible GPU's architecture alone (TORCH_CUDA_ARCH_LIST from torch.cuda.get_device_capability());
#   2. runs the GPU parity tests: pytest -m "gpu and not slow" (the fused op in both layouts, NCHW and
#      channels_last/NHWC, in every dtype; the slow torch.compile tests, whose first Triton compile takes
#      30-90 s, are left out);
#   3. runs the GPU benchmarks, which write bench/results/*_cuda*.json, each rewritten after every row so
#      that a timeout keeps the rows done: bench_ops fp32 (fused NHWC and NCHW against eager and a copy,
#      kernels alone from CUDA graphs), the CycleGAN step (fp32, then bf16), then bench_ops in bf16.
# A failed step does not stop the later ones (a GPU session is precious), but the script exits non-zero if
# any failed. When $OUT is set (a folder collected after the run), the results this run wrote and one log
# (the steps' logs in order) are copied there: at most 4 files.
#
# Time plan, in the order of what matters most (budget 460 s = GPU_CHECK_BUDGET_S; each cap is the most a
# step may take, and `timeout` interrupts it then (SIGINT: pytest still prints its summary), killing it
# 5 s later if it is still alive):
#   machine check (torch import, CUDA init)            30 s
#   build: CPU + CUDA for one arch (~60-90 s)          140 s
#   pytest-gpu: -m "gpu and not slow" (~375 tests)      90 s
#   bench-ops: fp32, 16 shapes, no torch.compile        70 s
#   bench-cyclegan: 256 px step, fp32 then bf16         50 s
#   bench-ops-bf16: the 10 subset shapes                30 s
#   caps 410 s + 5 x 5 s kill grace = 435 s: 25 s of margin under 460 s.
# A step also never runs past the deadline (its cap is cut to what is left; under 20 s left, it is skipped).
#
# `bash bench/gpu_check.sh --rehearse` runs every step with the same command lines on the CPU, with the
# same time accounting, in about half a minute: no CUDA required by the machine check, the build without
# its CUDA part (MELANO_CUDA_BUILD=no) and without --require-cuda, the pytest step as is (the GPU tests skip
# without CUDA, so it proves that they collect and import), and the benchmarks with --device cpu --rehearse
# (tiny shapes, one repetition, results under build/gpu_check_rehearsal/, never bench/results/). It exits
# non-zero if any command fails to parse, import or run. tests/test_gpu_check.py runs it under make test.
set -euo pipefail

REHEARSE=0
for arg in "$@"; do
    case "$arg" in
        --rehearse) REHEARSE=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $arg (only --rehearse)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MELANO_OPS=ext          # the compiled op or a loud failure, never a silent fallback
export PYTHONUNBUFFERED=1
BUDGET="${GPU_CHECK_BUDGET_S:-460}"
DEADLINE=$((SECONDS + BUDGET))
KILL_GRACE=5  # seconds between timeout's SIGINT and its SIGKILL

if ((REHEARSE)); then
    # The CPU build only, into the cache the test suite uses (no rebuild under make test).
    export MELANO_CUDA_BUILD=no
    export MELANO_BUILD_DIR="${MELANO_BUILD_DIR:-$HOME/.cache/melano}"
    WORK="${GPU_CHECK_WORK:-$ROOT/build/gpu_check_rehearsal}"  # build/ is git-ignored
    export MELANO_REHEARSAL_DIR="$WORK/results"  # where the benchmarks' --rehearse writes
    RESULTS="$MELANO_REHEARSAL_DIR"
    LOGS="$WORK/logs"
    unset TORCH_CUDA_ARCH_LIST
else
    # Kernel builds are cached inside the checkout (build/ is git-ignored), so a rerun on the same machine
    # skips the nvcc build and nothing is written outside the repository.
    export MELANO_BUILD_DIR="${MELANO_BUILD_DIR:-$ROOT/build/melano-kernels}"
    RESULTS="$ROOT/bench/results"
    LOGS="$ROOT/build/gpu_check_logs"
fi
mkdir -p "$LOGS" "$RESULTS"
rm -f "$LOGS"/*.log
START_MARK="$LOGS/.started"
touch "$START_MARK"
FAILED=()
STEPS=()

collect() {
    if [[ -n "${OUT:-}" ]]; then  # only what this run wrote: the device tool brings back at most 8 files
        mkdir -p "$OUT/results"
        find "$RESULTS" -maxdepth 1 -name '*.json' -newer "$START_MARK" -exec cp -f {} "$OUT/results/" \; || true
        for name in machine "${STEPS[@]}"; do
            [[ -f "$LOGS/$name.log" ]] && cat "$LOGS/$name.log"
        done >"$OUT/gpu_check.log" 2>/dev/null || true
    fi
    echo "gpu-check$( ((REHEARSE)) && echo ' --rehearse') finished in ${SECONDS}s of ${BUDGET}s;" \
         "failed steps: ${FAILED[*]:-none}"
}
trap collect EXIT

# step NAME CAP_SECONDS COMMAND...: runs COMMAND with a time cap (never past the deadline), logs to
# $LOGS/NAME.log and the terminal, and records a failure instead of exiting. Under --rehearse the same
# command runs on the CPU: `--device cuda` becomes `--device cpu`, `--require-cuda` is dropped, and a
# bench/*.py call gets `--rehearse`.
step() {
    local name="$1" cap="$2"
    shift 2
    STEPS+=("$name")
    local cmd=("$@")
    if ((REHEARSE)); then
        cmd=()
        local prev="" bench=0 a
        for a in "$@"; do
            if [[ "$prev" == --device && "$a" == cuda ]]; then a=cpu; fi
            [[ "$a" == bench/*.py ]] && bench=1
            [[ "$a" == --require-cuda ]] || cmd+=("$a")
            prev="$a"
        done
        ((bench)) && cmd+=(--rehearse)
    fi
    local left=$((DEADLINE - SECONDS))
    if ((left < 20)); then
        echo "=== $name: skipped, the time budget is spent" | tee "$LOGS/$name.log"
        FAILED+=("$name(no-time)")
        return 0
    fi
    if ((cap > left)); then cap=$left; fi
    echo "=== $name (cap ${cap}s): $(printf '%q ' "${cmd[@]}")" | tee "$LOGS/$name.log"
    local rc=0 t0=$SECONDS
    timeout -s INT --kill-after="$KILL_GRACE" "$cap" "${cmd[@]}" 2>&1 | tee -a "$LOGS/$name.log" || rc=${PIPESTATUS[0]}
    if ((rc == 124 || rc == 137)); then
        echo "=== $name FAILED: timed out after ${cap}s" | tee -a "$LOGS/$name.log"
        FAILED+=("$name(timeout)")
    elif ((rc != 0)); then
        echo "=== $name FAILED (exit $rc)" | tee -a "$LOGS/$name.log"
        FAILED+=("$name")
    else
        echo "=== $name ok in $((SECONDS - t0))s" | tee -a "$LOGS/$name.log"
    fi
    return 0
}

# The machine: torch, CUDA and the visible GPU's architecture, which the build compiles for alone (an
# inherited TORCH_CUDA_ARCH_LIST naming several archs would multiply the nvcc time).
echo "=== machine$( ((REHEARSE)) && echo ' (rehearsal: CPU, no CUDA required)')" | tee "$LOGS/machine.log"
if ! ((REHEARSE)); then
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
        2>&1 | tee -a "$LOGS/machine.log" || true
fi
ARCH_FILE="$LOGS/.arch"
rm -f "$ARCH_FILE"
if ! GPU_CHECK_REHEARSE=$REHEARSE ARCH_FILE=$ARCH_FILE timeout -s INT --kill-after="$KILL_GRACE" 30 "$PY" - \
        <<'EOF' 2>&1 | tee -a "$LOGS/machine.log"
import os, sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    if os.environ["GPU_CHECK_REHEARSE"] == "1":
        print("rehearsal: no CUDA device needed")
        sys.exit(0)
    sys.exit("gpu-check: torch sees no CUDA device; run it on a machine with an NVIDIA GPU")
major, minor = torch.cuda.get_device_capability()
print("device:", torch.cuda.get_device_name(), f"capability {major}.{minor}")
with open(os.environ["ARCH_FILE"], "w") as f:
    f.write(f"{major}.{minor}\n")
EOF
then
    FAILED+=("machine")
    exit 1
fi
if [[ -s "$ARCH_FILE" ]]; then
    export TORCH_CUDA_ARCH_LIST="$(cat "$ARCH_FILE")"
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST (the visible GPU's)" | tee -a "$LOGS/machine.log"
fi

# 1. Build (about a minute with nvcc for one arch; cached in $MELANO_BUILD_DIR afterwards).
step build 140 "$PY" -m melano.ops build --require-cuda
if [[ " ${FAILED[*]:-} " == *" build"* ]]; then
    echo "the build failed: skipping tests and benchmarks"
    exit 1
fi

# 2. GPU parity tests of every module (marker gpu; tests/conftest.py skips them where CUDA is absent).
step pytest-gpu 90 "$PY" -m pytest -m "gpu and not slow" -rfE --durations=15 -p no:cacheprovider tests

# 3. GPU benchmarks, most wanted first. Each is one `step` line with its own cap (tests/test_bench_args.py
# parses these lines with the benchmarks' own parsers; tests/test_gpu_check.py checks that the caps fit).
step bench-ops 70 "$PY" bench/bench_ops.py --device cuda --no-compile
step bench-cyclegan 50 "$PY" bench/bench_cyclegan.py --device cuda
step bench-ops-bf16 30 "$PY" bench/bench_ops.py --device cuda --dtype bfloat16 --no-compile --shapes subset --reps 30

((${#FAILED[@]} == 0)) || exit 1
