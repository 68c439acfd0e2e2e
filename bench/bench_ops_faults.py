"""Benchmark: how much of the fused op's forward + backward is page faults, at four CycleGAN shapes.

glibc hands large blocks back to the kernel when they are freed (mmap above a threshold, trimming
of the heap's top), so a tensor allocated afresh every call can fault in every page of it again.
This times, back to back and with the minor page faults counted (getrusage), the fused op's
forward + backward, eager's, and a copy (x.clone()) of the same tensor, twice: in a child process
with glibc's defaults (the baseline, as bench_ops.py runs), and in one with mmap and trimming off
(MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=4294967295), where freed blocks stay in the heap.
It prints each ratio and writes bench/results/ops_cpu_faults.json.

    python bench/bench_ops_faults.py    # about a minute on 2 cores
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = [((4, 512, 32, 32), "leaky_relu"), ((1, 128, 128, 128), "relu"), ((4, 256, 64, 64), "relu"),
          ((4, 64, 256, 256), "relu")]
NO_TRIM = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "4294967295"}
REPEATS = 15


def measure(f) -> dict:
    """Median ms per call and minor faults per call, after three warm-up calls."""
    for _ in range(3):
        f()
    faults0, times = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
    for _ in range(REPEATS):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / REPEATS
    return {"ms": statistics.median(times) * 1e3, "faults_per_call": faults}


def child() -> None:
    """One allocator setting: every shape's three variants, as JSON on stdout."""
    import torch
    from melano import ops
    from melano.infra import kernels
    kernels.load()
    rows = []
    for shape, act in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(*shape)
        xg, gy = x.clone().requires_grad_(), torch.randn_like(x)

        def fwd_bwd(f):
            def run():
                f(xg, act=act, negative_slope=0.2).backward(gy)
                xg.grad = None
            return run

        rows.append({"shape": list(shape), "act": act, "fused": measure(fwd_bwd(ops.instance_norm_act)),
                     "eager": measure(fwd_bwd(ops.eager_instance_norm_act)), "copy": measure(lambda: x.clone())})
    print(json.dumps(rows))


def main() -> None:
    from bench.bench_ops import TRAFFIC
    from bench.common import machine, write_results
    runs = {}
    for name, extra in (("glibc_default", {}), ("no_mmap_no_trim", NO_TRIM)):
        env = {**os.environ, **extra}
        for k in NO_TRIM:
            if k not in extra:
                env.pop(k, None)
        out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, check=True)
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'shape':>18} {'setting':>16} {'fused ms':>9} {'faults':>7} {'eager ms':>9} {'faults':>7} {'copy ms':>8}"
          f" {'faults':>7} {'eager/fused':>11} {'copy fraction':>13}")
    for i, (shape, _) in enumerate(SHAPES):
        for name, rows in runs.items():
            r = rows[i]
            r["eager_over_fused"] = r["eager"]["ms"] / r["fused"]["ms"]
            r["fused_copy_fraction"] = TRAFFIC["fwd_bwd"] * r["copy"]["ms"] / (2 * r["fused"]["ms"])  # a copy: 2 passes
            print(f"{str(shape):>18} {name:>16} {r['fused']['ms']:>9.2f} {r['fused']['faults_per_call']:>7.0f}"
                  f" {r['eager']['ms']:>9.2f} {r['eager']['faults_per_call']:>7.0f} {r['copy']['ms']:>8.2f}"
                  f" {r['copy']['faults_per_call']:>7.0f} {r['eager_over_fused']:>10.2f}x"
                  f" {r['fused_copy_fraction']:>13.2f}")
    write_results("ops_cpu_faults", {"repeats": REPEATS, "timing": "back to back, median; faults from getrusage",
                                     "no_mmap_no_trim_env": NO_TRIM, "runs": runs}, machine_info=machine())


if __name__ == "__main__":
    child() if sys.argv[1:] == ["--child"] else main()
