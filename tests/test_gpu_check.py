"""bench/gpu_check.sh runs only where a GPU is lent: rarely, for 15 minutes with start-up, so its first
run must work (issue 24). Here its time plan is checked against its budget, and its rehearsal
(`bash bench/gpu_check.sh --rehearse`: every step, same command lines, on the CPU with tiny sizes) must
run every step and exit 0."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_PATH = ROOT / "bench" / "gpu_check.sh"
SCRIPT = SCRIPT_PATH.read_text()
STEPS = re.findall(r"^step (\S+) (\d+) (.*)$", SCRIPT, re.M)  # (name, cap, command)
HARD_TIMEOUT_S = 150  # about 25 s with the CPU kernels cached; a cold CPU build of csrc/ adds a minute or so


def test_the_time_plan_fits_the_budget_in_order():
    names = [name for name, _, _ in STEPS]
    assert names == ["build", "pytest-gpu", "bench-ops", "bench-cyclegan", "bench-ops-bf16"], names
    budget = int(re.search(r"GPU_CHECK_BUDGET_S:-(\d+)", SCRIPT).group(1))
    grace = int(re.search(r"^KILL_GRACE=(\d+)", SCRIPT, re.M).group(1))
    machine = int(re.search(r"ARCH_FILE=\$ARCH_FILE timeout -s INT --kill-after=\S+ (\d+) ", SCRIPT).group(1))
    worst = machine + sum(int(cap) + grace for _, cap, _ in STEPS) + grace
    assert budget == 460 and worst <= budget - 20, (worst, budget)  # a margin for bash, tee and start-up
    pytest_cmd = dict((n, c) for n, _, c in STEPS)["pytest-gpu"]
    assert '-m "gpu and not slow"' in pytest_cmd and "-rfE" in pytest_cmd and "--durations=15" in pytest_cmd
    # the arch is the visible GPU's, never an inherited list of several
    assert 'export TORCH_CUDA_ARCH_LIST="$(cat "$ARCH_FILE")"' in SCRIPT
    assert "get_device_capability()" in SCRIPT


def snapshot(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.json"))}


def test_rehearsal_runs_every_step(tmp_path):
    before = snapshot(ROOT / "bench" / "results")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work"),
           "OUT": str(tmp_path / "out"), "TORCH_CUDA_ARCH_LIST": "7.0;8.0;9.0;10.0"}
    env.pop("MELANO_OPS", None)
    proc = subprocess.Popen(["bash", str(SCRIPT_PATH), "--rehearse"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=HARD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # bash, timeout and the step's python: one process group
        log, _ = proc.communicate()
        pytest.fail(f"gpu_check.sh --rehearse still ran after {HARD_TIMEOUT_S} s; its output:\n{log[-4000:]}")
    tail = log[-4000:]
    assert proc.returncode == 0, tail
    assert "=== machine (rehearsal" in log, tail
    for name, _, _ in STEPS:
        assert re.search(rf"^=== {re.escape(name)} ok in \d+s$", log, re.M), f"step {name} did not pass:\n{tail}"
    finished = re.search(r"^gpu-check --rehearse finished in (\d+)s of 460s; failed steps: none$", log, re.M)
    assert finished, tail
    # the same command lines, turned to the CPU
    assert "--require-cuda" not in log and "--device cuda" not in log and "--device cpu" in log, tail
    assert re.search(r"=+ \d+ skipped, \d+ deselected in ", log), tail  # the GPU tests collected, then skipped
    # the benchmarks wrote complete results to the rehearsal folder, and $OUT got them and one log
    for name in ("ops_cpu", "ops_cpu_bf16", "cyclegan_cpu"):
        result = json.loads((tmp_path / "out" / "results" / f"{name}.json").read_text())
        assert result["complete"] and result["rows"], name
    assert (tmp_path / "out" / "gpu_check.log").read_text().count("=== ") >= 2 * len(STEPS)
    assert snapshot(ROOT / "bench" / "results") == before  # never overwritten by a rehearsal


def test_rehearsal_refuses_unknown_options():
    r = subprocess.run(["bash", str(SCRIPT_PATH), "--rehears"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown option" in r.stderr
