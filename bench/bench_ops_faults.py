"""Benchmark: how much of the fused op's forward + backward is page faults, at four CycleGAN shapes.

glibc hands large blocks back to the kernel when they are freed (mmap above a threshold, trimming
of the heap's top), so a tensor allocated afresh every call can fault in every page of it again.
This times, back to back and with the minor page faults counted (getrusage), the fused op's
forward + backward, eager's, and a copy (x.clone()) of the same tensor, twice: in a child process
with glibc's defaults (the baseline, as bench_ops.py runs), and in one with mmap and trimming off
(MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=4294967295), where freed blocks stay in the heap.
The fused op runs twice in each: as it ships, where outputs of 32 MiB or more ask for 2 MiB pages,
and with that off (MELANO_HUGE_PAGES=0, 'fused_4k'), alternating call by call.
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
          ((4, 32, 256, 256), "relu"), ((4, 64, 256, 256), "relu")]
NO_TRIM = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "4294967295"}
REPEATS = 15


def measure(f) -> dict:
    """Median ms per call and minor faults per call, after three warm-up calls."""
    return measure_alternating({"f": f})["f"]


def measure_alternating(fns: dict) -> dict:
    """measure() of each function, the functions called in turn."""
    for _ in range(3):
        for f in fns.values():
            f()
    times, faults = {k: [] for k in fns}, {k: 0 for k in fns}
    for _ in range(REPEATS):
        for k, f in fns.items():
            faults0, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
            faults[k] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return {k: {"ms": statistics.median(times[k]) * 1e3, "faults_per_call": faults[k] / REPEATS} for k in fns}


def small_pages(f):
    """f with the fused op's 2 MiB pages off."""
    def run():
        os.environ["MELANO_HUGE_PAGES"] = "0"
        try:
            f()
        finally:
            del os.environ["MELANO_HUGE_PAGES"]
    return run


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

        fused = fwd_bwd(ops.instance_norm_act)
        rows.append({"shape": list(shape), "act": act,
                     **measure_alternating({"fused": fused, "fused_4k": small_pages(fused)}),
                     "eager": measure(fwd_bwd(ops.eager_instance_norm_act)), "copy": measure(lambda: x.clone())})
    print(json.dumps(rows))


def main() -> None:
    from bench.bench_ops import TRAFFIC
    from bench.common import machine, write_results
    runs = {}
    for name, extra in (("glibc_default", {}), ("no_mmap_no_trim", NO_TRIM)):
        env = {**os.environ, **extra}
        for k in [*NO_TRIM, "MELANO_HUGE_PAGES"]:
            if k not in extra:
                env.pop(k, None)
        out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, check=True)
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'shape':>18} {'setting':>16} {'fused ms':>9} {'faults':>7} {'fused_4k ms':>11} {'faults':>7}"
          f" {'eager ms':>9} {'faults':>7} {'copy ms':>8} {'faults':>7} {'eager/fused':>11} {'4k/fused':>8}"
          f" {'copy fraction':>13}")
    for i, (shape, _) in enumerate(SHAPES):
        for name, rows in runs.items():
            r = rows[i]
            r["eager_over_fused"] = r["eager"]["ms"] / r["fused"]["ms"]
            r["fused_4k_over_fused"] = r["fused_4k"]["ms"] / r["fused"]["ms"]
            r["fused_copy_fraction"] = TRAFFIC["fwd_bwd"] * r["copy"]["ms"] / (2 * r["fused"]["ms"])  # a copy: 2 passes
            print(f"{str(shape):>18} {name:>16} {r['fused']['ms']:>9.2f} {r['fused']['faults_per_call']:>7.0f}"
                  f" {r['fused_4k']['ms']:>11.2f} {r['fused_4k']['faults_per_call']:>7.0f}"
                  f" {r['eager']['ms']:>9.2f} {r['eager']['faults_per_call']:>7.0f} {r['copy']['ms']:>8.2f}"
                  f" {r['copy']['faults_per_call']:>7.0f} {r['eager_over_fused']:>10.2f}x"
                  f" {r['fused_4k_over_fused']:>7.2f}x {r['fused_copy_fraction']:>13.2f}")
    timing = "back to back (fused and fused_4k alternating), median; faults from getrusage"
    write_results("ops_cpu_faults", {"repeats": REPEATS, "timing": timing, "no_mmap_no_trim_env": NO_TRIM,
                                     "runs": runs}, machine_info=machine())


if __name__ == "__main__":
    child() if sys.argv[1:] == ["--child"] else main()
