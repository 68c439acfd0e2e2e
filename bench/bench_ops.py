"""Benchmark: fused InstanceNorm+activation (melano.ops) on channels_last (NHWC kernels) and NCHW input,
against eager F.instance_norm + activation, all in one run.

Shapes are the CycleGAN's: N in {1, 4}, C from 32 to 512, H = W from 16 to 256 (ResNet-9 generator
with ReLU, PatchGAN discriminator with LeakyReLU(0.2); affine=False as in CycleGAN). For each shape it
times forward (no_grad) and forward+backward of four variants, interleaved in the same loop so that
load from other processes hits all alike:
    fused_cl    the fused op on channels_last input (the NHWC kernels; channels_last output)
    eager_cl    eager PyTorch on the same channels_last input (it converts to NCHW internally)
    fused_nchw  the fused op on NCHW input (the NCHW kernels)
    eager_nchw  eager PyTorch on NCHW input
and a plain copy of the same tensor (x.clone()): each fused variant's achieved bandwidth (its
minimum traffic: x read and y written; plus x and dy read and dx written in the backward) is
reported as a fraction of that copy's. So is that of the NCHW kernels alone (the forward and backward
ops called directly, without the Python wrapper and autograd). Ratios are of medians.
The copy is timed in the forward loop (the *_copy_fraction figures, as before) and again inside
the forward + backward loop (*_copy_fraction_same_loop): the eager variants there, channels_last
above all, stream far more memory and leave the next call's inputs out of the caches, so the copy
timed beside the forward-only variants is faster than one in the loop the fwd+bwd figures come from.
Neither pair shares its cache conditions, so a third loop times the fused NCHW forward + backward,
the NCHW kernels alone (forward, then backward) and the copy together and nothing else
(*_copy_fraction_own_loop, the goal's figure).

Before timing, each shape's fused outputs and gradients in both layouts are checked against eager
(llm.c style: a wrong kernel is never timed). The run starts with a calibration (a fixed conv's
GFLOP/s and a 64 MiB copy's GB/s) and records the CPU's instruction set and the load average, so that
runs on other or busier machines can be compared. On a GPU it also times torch.compile of the eager
NCHW composition, and the kernels alone replayed from CUDA graphs against a graph-replayed copy.

    python bench/bench_ops.py                                   # CPU, float32 (a few minutes on 2 cores)
    python bench/bench_ops.py --device cuda [--dtype bfloat16]  # plus torch.compile and kernel bandwidth

    python bench/bench_ops.py --device cpu --rehearse            # seconds: two tiny shapes, one repetition

Writes bench/results/ops_<device>.json (ops_cuda_bf16.json for --dtype bfloat16, ops_cpu_quick.json for
--shapes quick), again after each
shape (atomically, "complete": false until the last), so that a run stopped by a timeout keeps the rows
done. --rehearse (bench/gpu_check.sh --rehearse) writes under build/rehearsal/ instead, never bench/results/.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import rehearsal_dir  # noqa: E402
from melano import ops  # noqa: E402
from melano.infra import kernels  # noqa: E402
from melano.infra.cli import setup_logging  # noqa: E402
from melano.infra.files import atomic_write, json_text  # noqa: E402

log = logging.getLogger("bench_ops")

# (N, C, H=W, act): generator layers use relu, discriminator layers leaky_relu.
FULL_SHAPES = [(n, c, h, act) for n in (1, 4) for c, h, act in [
    (64, 256, "relu"),         # generator c7s1-64 and u64
    (128, 128, "relu"),        # generator d128 and u128
    (256, 64, "relu"),         # generator d256 and the 9 residual blocks
    (128, 64, "leaky_relu"),   # discriminator C128
    (256, 32, "leaky_relu"),   # discriminator C256
    (512, 32, "leaky_relu"),   # discriminator C512
    (32, 256, "relu"),         # a half-width generator
    (512, 16, "leaky_relu"),   # discriminator on 128-pixel crops
]]
# A quicker list: the shapes at N = 1, plus two at N = 4.
SUBSET_SHAPES = [s for s in FULL_SHAPES if s[0] == 1] + [(4, 256, 64, "relu"), (4, 512, 16, "leaky_relu")]
# The pipeline's quick preset (48 px, ngf = ndf = 16, batch 4): its generator's and discriminator's norm layers.
# The first three hold 26 of the 28 norm calls of a forward of the four models (two generators, two
# discriminators); 64x12^2 also runs without an activation in the residual blocks.
QUICK_SHAPES = [(4, 16, 48, "relu"), (4, 32, 24, "relu"), (4, 64, 12, "relu"), (4, 32, 12, "leaky_relu"),
                (4, 64, 6, "leaky_relu"), (4, 128, 5, "leaky_relu")]
QUICK_MAIN = 3  # the quick preset's main shapes: QUICK_SHAPES[:3]
# --rehearse: a plane with a partial last vector and an odd one, each activation; seconds in all.
REHEARSAL_SHAPES = [(1, 8, 16, "relu"), (2, 4, 9, "leaky_relu")]
# Issue 24's CPU goals for NCHW (the layout the quick preset trains in): over the full shapes the median
# fwd+bwd ratio and copy fraction; over the quick preset's shapes the main three and the worst one.
GOALS = {"cpu": {"nhwc_fwd_bwd_vs_eager_cl": 3.0, "nhwc_fwd_bwd_vs_fused_nchw": 1.0,
                 "median_nchw_fwd_bwd_vs_eager_nchw": 2.5, "median_fused_nchw_fwd_bwd_copy_fraction_own_loop": 0.6,
                 "quick_main_min_nchw_fwd_bwd_vs_eager_nchw": 1.3, "quick_min_nchw_fwd_bwd_vs_eager_nchw": 1.0},
         "cuda": {"nhwc_fwd_bwd_vs_eager_cl": 2.0, "graph_nhwc_copy_fraction_256px": 0.7}}
VARIANTS = ("fused_cl", "eager_cl", "fused_nchw", "eager_nchw")
# Minimum traffic in units of x's size: forward reads x and writes y; backward reads x, dy, writes dx.
TRAFFIC = {"fwd": 2, "fwd_bwd": 5}


def cpu_isa() -> str:
    """The CPU's widest instruction set of those the fused kernels are compiled for."""
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return platform.machine()
    flags = set(line.split(":", 1)[1].split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "AVX-512 (the NHWC loops run their AVX2 variant)"
    if {"avx2", "fma", "f16c"} <= flags:
        return "AVX2"
    return "baseline x86-64" if platform.machine() == "x86_64" else platform.machine()


def machine_info(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "device": device}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = info.get("cpu", platform.processor())
        info["isa"] = cpu_isa()
        info["melano_cpu_isa"] = os.environ.get("MELANO_CPU_ISA")
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = os.getloadavg()
    return info


def cpu_ticks() -> tuple[float, float] | None:
    """(busy seconds of all CPUs, CPU seconds of this process) so far; None where /proc is absent."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    vals = [int(v) for v in fields]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    hz = os.sysconf("SC_CLK_TCK")
    t = os.times()
    return (sum(vals[:8]) - idle) / hz, t.user + t.system


def other_load(start, end, wall: float) -> float | None:
    """Average number of cores other processes kept busy between two cpu_ticks() samples: the noise."""
    if start is None or end is None or wall <= 0:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / wall)


class Timer:
    """Wall time on the CPU; CUDA events on a GPU (the host may run ahead of the device)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def interleaved_times(fns: dict, timer: Timer, reps: int, warmup: int = 2) -> dict:
    """Seconds of each run of each fn, the fns run in rotating order within each repetition."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(timer(fns[k]))
    return times


def calibration(device: str, timer: Timer) -> dict:
    """How fast this machine is right now: a fixed conv (float32, 64 -> 64 channels, 3x3, 1 x 64 x 64)
    and a copy of 64 MiB (read + write counted)."""
    torch.manual_seed(0)
    x = torch.randn(1, 64, 64, 64, device=device)
    w = torch.randn(64, 64, 3, 3, device=device)
    src = torch.empty(16 * 2**20, device=device)
    dst = torch.empty_like(src)
    t = interleaved_times({"conv": lambda: F.conv2d(x, w, padding=1), "copy": lambda: dst.copy_(src)}, timer, 15)
    return {"conv3x3_64ch_64px_GFLOPs": 2 * 64 * 64 * 64 * 64 * 9 / statistics.median(t["conv"]) / 1e9,
            "copy_64MiB_GBps": 2 * src.numel() * 4 / statistics.median(t["copy"]) / 1e9}


def graph_seconds(fn, inner: int = 10, reps: int = 20) -> float | None:
    """GPU seconds per call of fn, from a CUDA graph that holds `inner` calls: no Python or launch
    overhead, which otherwise dominates the small shapes. None (with a warning) if capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        timer, times = Timer("cuda"), []
        for _ in range(reps):
            times.append(timer(graph.replay) / inner)
        return statistics.median(times)
    except Exception as e:  # a capture problem must not lose the rest of the benchmark
        log.warning("CUDA graph timing failed: %s", e)
        return None


def check_shape(x, act, slope, tol) -> float:
    """Max |fused - eager| over y and dx in both layouts (relative to the largest value); raises when off."""
    err = 0.0
    for xl in (x, x.contiguous(memory_format=torch.channels_last)):
        xe, xf = xl.detach().clone().requires_grad_(), xl.detach().clone().requires_grad_()
        ye = ops.eager_instance_norm_act(xe, act=act, negative_slope=slope)
        yf = ops.instance_norm_act(xf, act=act, negative_slope=slope)
        if not yf.is_contiguous(memory_format=ops.kernel_layout(xl)):
            raise SystemExit(f"fused op returned strides {yf.stride()} for input strides {xl.stride()}")
        g = torch.randn_like(ye)
        ye.backward(g)
        yf.backward(g)
        err = max(err, ((yf - ye).abs().max() / ye.abs().max().clamp_min(1)).item(),
                  ((xf.grad - xe.grad).abs().max() / xe.grad.abs().max().clamp_min(1)).item())
    if not err <= tol:
        raise SystemExit(f"fused op disagrees with eager on {tuple(x.shape)} {act}: rel. error {err:.3g} > {tol}")
    return err


def timed_fns(n, c, h, act, device, dtype, slope, compile_ok):
    """The functions to time, keyed '<variant>_<fwd|fwd_bwd>', plus 'copy'."""
    torch.manual_seed(0)
    x = torch.randn(n, c, h, h, device=device, dtype=dtype)
    inputs = {"cl": x.contiguous(memory_format=torch.channels_last), "nchw": x}
    paths = {"fused": ops.instance_norm_act, "eager": ops.eager_instance_norm_act}
    if compile_ok:
        torch._dynamo.reset()
        paths["compile"] = torch.compile(ops.eager_instance_norm_act, dynamic=False)
    fns = {"copy": lambda: inputs["nchw"].clone()}
    for path, f in paths.items():
        for layout, xl in inputs.items():
            if path == "compile" and layout == "cl":
                continue
            xg = xl.clone().requires_grad_()
            gy = torch.randn_like(xl if path == "fused" else x)  # in the layout the path returns

            def fwd(f=f, xl=xl):
                with torch.no_grad():
                    f(xl, act=act, negative_slope=slope)

            def fwd_bwd(f=f, xg=xg, gy=gy):
                f(xg, act=act, negative_slope=slope).backward(gy)
                xg.grad = None

            fns[f"{path}_{layout}_fwd"], fns[f"{path}_{layout}_fwd_bwd"] = fwd, fwd_bwd
    # The NCHW kernels alone: the forward op, and the backward op on its statistics, called directly (no
    # Python wrapper, no autograd), each allocating only its outputs.
    _, mean, rstd = torch.ops.melano.inorm_act_fwd(x, None, None, 1e-5, act, slope)
    gy = torch.randn_like(x)
    fns["kernel_nchw_fwd"] = lambda: torch.ops.melano.inorm_act_fwd(x, None, None, 1e-5, act, slope)
    fns["kernel_nchw_bwd"] = lambda: torch.ops.melano.inorm_act_bwd(gy, x, None, None, mean, rstd, act, slope)

    def kernels_nchw_both():  # named so that neither of the first two loops picks it up
        _, m, r = fns["kernel_nchw_fwd"]()
        torch.ops.melano.inorm_act_bwd(gy, x, None, None, m, r, act, slope)

    fns["kernels_nchw_both"] = kernels_nchw_both
    return x, fns


def graph_row(x, act, slope) -> dict:
    """Kernel-only GPU seconds (CUDA graphs) of the fused op in both layouts, and of a copy of x."""
    out = {}
    dst = torch.empty_like(x)
    out["copy"] = graph_seconds(lambda: dst.copy_(x))
    for layout, xl in (("nchw", x), ("cl", x.contiguous(memory_format=torch.channels_last))):
        gy = torch.randn_like(xl)

        def kernel_fwd(xl=xl):
            return torch.ops.melano.inorm_act_fwd(xl, None, None, 1e-5, act, slope)

        def kernel_fwd_bwd(xl=xl, gy=gy):
            _, mean, rstd = kernel_fwd()
            torch.ops.melano.inorm_act_bwd(gy, xl, None, None, mean, rstd, act, slope)

        out[f"fused_{layout}_fwd"] = graph_seconds(kernel_fwd)
        out[f"fused_{layout}_fwd_bwd"] = graph_seconds(kernel_fwd_bwd)
    return out


def bench_shape(n, c, h, act, device, dtype, timer, reps, compile_ok, slope=0.2) -> dict:
    x, fns = timed_fns(n, c, h, act, device, dtype, slope, compile_ok)
    row = {"shape": [n, c, h, h], "act": act, "max_rel_err_vs_eager": check_shape(x, act, slope, tol=3e-2 if
                                                                                   dtype != torch.float32 else 1e-3)}
    if compile_ok:
        t0 = time.monotonic()
        fns["compile_nchw_fwd"]()  # compile outside the timings
        fns["compile_nchw_fwd_bwd"]()
        row["compile_seconds"] = round(time.monotonic() - t0, 1)
    runs = interleaved_times({k: f for k, f in fns.items() if k == "copy" or k.endswith(("_fwd", "_bwd"))
                              and not k.endswith("_fwd_bwd")}, timer, reps)
    # The copy again, in the fwd+bwd loop: the same cache conditions as the fwd+bwd variants.
    runs.update(interleaved_times({**{k: f for k, f in fns.items() if k.endswith("_fwd_bwd")},
                                   "copy_fwd_bwd_loop": fns["copy"]}, timer, reps))
    # The whole op, the kernels alone and the copy in a loop of their own: one cache state for all three.
    runs.update(interleaved_times({"copy_own_loop": fns["copy"],
                                   "fused_nchw_fwd_bwd_own_loop": fns["fused_nchw_fwd_bwd"],
                                   "kernels_nchw_both_own_loop": fns["kernels_nchw_both"]}, timer, reps))
    t = {k: statistics.median(v) for k, v in sorted(runs.items())}
    row["seconds"] = t  # medians
    row["min_seconds"] = {k: min(v) for k, v in sorted(runs.items())}
    nbytes = x.numel() * x.element_size()
    copy_Bps = 2 * nbytes / t["copy"]
    copy_loop_Bps = 2 * nbytes / t["copy_fwd_bwd_loop"]
    for p in ("fwd", "fwd_bwd"):
        row[f"nhwc_{p}_vs_eager_cl"] = t[f"eager_cl_{p}"] / t[f"fused_cl_{p}"]
        row[f"nhwc_{p}_vs_fused_nchw"] = t[f"fused_nchw_{p}"] / t[f"fused_cl_{p}"]
        row[f"nchw_{p}_vs_eager_nchw"] = t[f"eager_nchw_{p}"] / t[f"fused_nchw_{p}"]
        if compile_ok:
            row[f"nchw_{p}_vs_compile"] = t[f"compile_nchw_{p}"] / t[f"fused_nchw_{p}"]
        for layout in ("cl", "nchw"):
            row[f"fused_{layout}_{p}_GBps"] = TRAFFIC[p] * nbytes / t[f"fused_{layout}_{p}"] / 1e9
            row[f"fused_{layout}_{p}_copy_fraction"] = row[f"fused_{layout}_{p}_GBps"] * 1e9 / copy_Bps
    for layout in ("cl", "nchw"):
        gbps = row[f"fused_{layout}_fwd_bwd_GBps"]
        row[f"fused_{layout}_fwd_bwd_copy_fraction_same_loop"] = gbps * 1e9 / copy_loop_Bps
    kernels_s = t["kernel_nchw_fwd"] + t["kernel_nchw_bwd"]
    row["kernel_nchw_fwd_bwd_copy_fraction"] = TRAFFIC["fwd_bwd"] * nbytes / kernels_s / copy_Bps
    own_Bps = 2 * nbytes / t["copy_own_loop"]
    for k, name in (("fused_nchw_fwd_bwd", "fused_nchw_fwd_bwd"), ("kernels_nchw_both", "kernel_nchw_fwd_bwd")):
        row[f"{name}_copy_fraction_own_loop"] = TRAFFIC["fwd_bwd"] * nbytes / t[f"{k}_own_loop"] / own_Bps
    row["copy_GBps"] = copy_Bps / 1e9
    row["copy_fwd_bwd_loop_GBps"] = copy_loop_Bps / 1e9
    if device == "cuda":
        g = row["graph_seconds"] = graph_row(x, act, slope)
        for k, sec in g.items():
            if k != "copy" and sec and g["copy"]:
                p = "fwd_bwd" if k.endswith("fwd_bwd") else "fwd"
                row[f"graph_{k}_copy_fraction"] = TRAFFIC[p] * g["copy"] / 2 / sec
    return row


def summarize(rows, device, shapes="full") -> dict:
    keys = [k for k in rows[0] if k.startswith(("nhwc_", "nchw_")) and "_vs_" in k]
    summary = {f"median_{k}": statistics.median(r[k] for r in rows if k in r) for k in keys}
    for k in ("fused_cl_fwd_bwd_copy_fraction", "fused_nchw_fwd_bwd_copy_fraction",
              "kernel_nchw_fwd_bwd_copy_fraction", "fused_cl_fwd_bwd_copy_fraction_same_loop",
              "fused_nchw_fwd_bwd_copy_fraction_same_loop", "fused_nchw_fwd_bwd_copy_fraction_own_loop",
              "kernel_nchw_fwd_bwd_copy_fraction_own_loop"):
        summary[f"median_{k}"] = statistics.median(r[k] for r in rows)
    if device == "cuda":
        big = [r for r in rows if r["shape"][2] >= 256]
        for k in ("graph_fused_cl_fwd_copy_fraction", "graph_fused_cl_fwd_bwd_copy_fraction",
                  "graph_fused_nchw_fwd_copy_fraction", "graph_fused_nchw_fwd_bwd_copy_fraction"):
            vals = [r[k] for r in big if k in r]
            if vals:
                summary[f"min_{k}_256px"] = min(vals)
    goals = GOALS[device]
    summary["goals_met"] = {
        "nhwc_fwd_bwd_vs_eager_cl": summary["median_nhwc_fwd_bwd_vs_eager_cl"] >= goals["nhwc_fwd_bwd_vs_eager_cl"]}
    if device == "cpu":
        summary["goals_met"]["nhwc_fwd_bwd_vs_fused_nchw"] = (summary["median_nhwc_fwd_bwd_vs_fused_nchw"]
                                                              >= goals["nhwc_fwd_bwd_vs_fused_nchw"])
        if shapes == "quick":
            nchw = [r["nchw_fwd_bwd_vs_eager_nchw"] for r in rows]
            summary["quick_main_min_nchw_fwd_bwd_vs_eager_nchw"] = min(nchw[:QUICK_MAIN])
            summary["quick_min_nchw_fwd_bwd_vs_eager_nchw"] = min(nchw)
            names = ["quick_main_min_nchw_fwd_bwd_vs_eager_nchw", "quick_min_nchw_fwd_bwd_vs_eager_nchw"]
        else:
            names = ["median_nchw_fwd_bwd_vs_eager_nchw", "median_fused_nchw_fwd_bwd_copy_fraction_own_loop"]
        for k in names:
            summary["goals_met"][k] = summary[k] >= goals[k]
    elif "min_graph_fused_cl_fwd_bwd_copy_fraction_256px" in summary:
        summary["goals_met"]["graph_nhwc_copy_fraction_256px"] = (
            summary["min_graph_fused_cl_fwd_bwd_copy_fraction_256px"] >= goals["graph_nhwc_copy_fraction_256px"])
    return summary


def print_table(result, rows, device) -> None:
    print(f"\nInstanceNorm+act on {result['machine']['device_name']} ({device}, {result['dtype']}, "
          f"{result['machine']['torch_threads']} threads, torch {torch.__version__}); fwd+bwd medians in ms")
    head = (f"{'shape':<16} {'act':<10} {'fused_cl':>9} {'eager_cl':>9} {'fused_nchw':>10} {'eager_nchw':>10}"
            f" {'cl/eager':>9} {'cl/nchw':>8} {'cl %copy':>8} {'nchw/eager':>10} {'nchw %copy':>10} {'same loop':>9}"
            f" {'own loop':>8} {'kernels %copy':>13}")
    if device == "cuda":
        head += f" {'kernel cl %copy':>15}"
    print(head)
    for r in rows:
        t = r["seconds"]
        line = f"{'x'.join(map(str, r['shape'])):<16} {r['act']:<10} " + " ".join(
            f"{t[f'{v}_fwd_bwd'] * 1e3:>{max(9, len(v))}.3f}" for v in VARIANTS)
        line += (f" {r['nhwc_fwd_bwd_vs_eager_cl']:>9.2f} {r['nhwc_fwd_bwd_vs_fused_nchw']:>8.2f}"
                 f" {100 * r['fused_cl_fwd_bwd_copy_fraction']:>7.0f}%"
                 f" {r['nchw_fwd_bwd_vs_eager_nchw']:>10.2f} {100 * r['fused_nchw_fwd_bwd_copy_fraction']:>9.0f}%"
                 f" {100 * r['fused_nchw_fwd_bwd_copy_fraction_same_loop']:>8.0f}%"
                 f" {100 * r['fused_nchw_fwd_bwd_copy_fraction_own_loop']:>7.0f}%"
                 f" {100 * r['kernel_nchw_fwd_bwd_copy_fraction']:>12.0f}%")
        if device == "cuda":
            k = r.get("graph_fused_cl_fwd_bwd_copy_fraction")
            line += f" {100 * k:>14.0f}%" if k else f" {'-':>15}"
        print(line)
    print("summary:", ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in result["summary"].items()))


def measure_with_retries(n, c, h, act, args, dtype, timer, reps, compile_ok, t_start) -> dict:
    """bench_shape, remeasured (up to 3 tries, within the first 2 minutes) on the CPU when other processes
    kept more than --max-other-load cores busy meanwhile; the load is recorded per row."""
    for attempt in range(1, 4):
        t0, ticks0 = time.monotonic(), cpu_ticks()
        row = bench_shape(n, c, h, act, args.device, dtype, timer, reps, compile_ok)
        busy = other_load(ticks0, cpu_ticks(), time.monotonic() - t0)
        row["other_processes_busy_cores"] = None if busy is None else round(busy, 2)
        row["attempts"] = attempt
        if (args.device != "cpu" or busy is None or busy <= args.max_other_load
                or time.monotonic() - t_start > 120):
            return row
        log.info("%s: other processes kept %.2f cores busy; measuring again", row["shape"], busy)
    return row


def arg_parser() -> argparse.ArgumentParser:
    """The options (also read by tests/test_bench_args.py, which parses gpu_check.sh's calls)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="activation dtype (the kernels accumulate in float32)")
    parser.add_argument("--shapes", default="full", choices=["subset", "full", "quick"],
                        help="full: N in {1, 4} x 8 layer shapes; subset: the N=1 ones and two N=4 ones; "
                             "quick: the quick preset's GAN layers")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per case "
                        "(default: 20 on cpu, 50 on cuda)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (cuda)")
    parser.add_argument("--time-budget", type=float, default=240.0,
                        help="seconds; past it, remaining shapes skip the torch.compile baseline")
    parser.add_argument("--max-other-load", type=float, default=0.2,
                        help="cpu: remeasure a shape (up to 3 tries, within the first 2 minutes) when other "
                             "processes kept more cores than this busy meanwhile")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: bench/results/ops_<device>[_bf16|_fp16].json)")
    parser.add_argument("--rehearse", action="store_true",
                        help="a dry run of the same code in seconds (bench/gpu_check.sh --rehearse): two tiny "
                             "shapes, one repetition, no remeasuring; writes under build/rehearsal/ "
                             "($MELANO_REHEARSAL_DIR), never bench/results/")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arg_parser().parse_args(argv)
    setup_logging()
    if args.threads or args.rehearse:  # rehearsal: one thread, as contending ones on a shared host are slow
        torch.set_num_threads(args.threads or 1)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    os.environ.setdefault("MELANO_OPS", "ext")  # time the kernel, never a silent fallback
    kernels.load()
    if ops.backend(args.device) != "ext":
        raise SystemExit(f"the fused op is not available on {args.device}")
    dtype = getattr(torch, args.dtype)
    shapes = {"subset": SUBSET_SHAPES, "full": FULL_SHAPES, "quick": QUICK_SHAPES}[args.shapes]
    reps = args.reps or (20 if args.device == "cpu" else 50)
    if args.rehearse:
        shapes, reps, args.max_other_load = REHEARSAL_SHAPES, 1, float("inf")
    suffix = {"float32": "", "bfloat16": "_bf16", "float16": "_fp16"}[args.dtype]
    suffix += "_quick" if args.shapes == "quick" else ""
    name = f"ops_{args.device}{suffix}.json"
    out = args.out or (rehearsal_dir() / name if args.rehearse else ROOT / "bench" / "results" / name)
    timer = Timer(args.device)
    result = {"machine": machine_info(args.device), "dtype": args.dtype, "reps": reps,
              "goals": GOALS[args.device], "shapes": args.shapes,
              "note": "affine=False; forward timed under no_grad; ratios from medians of interleaved runs "
                      "(min_seconds also recorded); every variant runs in the same process and loop; "
                      "copy = x.clone() of the same tensor, timed in the forward loop (copy; the goal's "
                      "*_copy_fraction) and again in the fwd+bwd loop (copy_fwd_bwd_loop; *_same_loop); the goal's "
                      "copy fraction: copy, fused NCHW fwd+bwd and the kernels alone in a loop of their own "
                      "(*_own_loop)"}
    if args.rehearse:
        result["note"] = "REHEARSAL (--rehearse): tiny shapes, one repetition; the timings mean nothing"
    result["calibration"] = calibration(args.device, timer)
    t_start, ticks_start = time.monotonic(), cpu_ticks()
    rows = []
    result["rows"], result["complete"] = rows, False
    for n, c, h, act in shapes:
        compile_ok = (args.device == "cuda" and not args.no_compile
                      and time.monotonic() - t_start < args.time_budget)
        row = measure_with_retries(n, c, h, act, args, dtype, timer, reps, compile_ok, t_start)
        rows.append(row)
        log.info("%-18s %-10s fwd+bwd: NHWC x%.2f vs eager channels_last, x%.2f vs fused NCHW",
                 "x".join(map(str, row["shape"])), act, row["nhwc_fwd_bwd_vs_eager_cl"],
                 row["nhwc_fwd_bwd_vs_fused_nchw"])
        result["summary"] = summarize(rows, args.device, args.shapes)  # of the rows so far
        result["wall_seconds"] = round(time.monotonic() - t_start, 1)
        atomic_write(out, json_text(result))  # after each row: a timeout keeps the rows done
    result["complete"] = True
    if hasattr(os, "getloadavg"):
        result["machine"]["loadavg_at_end"] = os.getloadavg()
    result["wall_seconds"] = round(time.monotonic() - t_start, 1)
    busy = other_load(ticks_start, cpu_ticks(), result["wall_seconds"])
    result["machine"]["other_processes_busy_cores"] = None if busy is None else round(busy, 2)
    if args.device == "cpu" and busy is not None and busy > 0.25:
        log.warning("other processes kept %.2f cores busy during the run: CPU timings are noisy", busy)
    print_table(result, rows, args.device)
    atomic_write(out, json_text(result))
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
