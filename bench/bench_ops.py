"""Benchmark: fused InstanceNorm+activation (melano.ops) against eager F.instance_norm + activation.

Shapes are the CycleGAN's: N in {1, 4}, C from 32 to 512, H = W from 16 to 256 (ResNet-9 generator
with ReLU, PatchGAN discriminator with LeakyReLU(0.2); affine=False as in CycleGAN). For each shape it
times forward (no_grad) and forward+backward, fused and eager, interleaved in the same loop so that
load from other processes hits both alike, and reports eager/fused ratios and their median.

Before timing, each shape's fused output and gradient are checked against eager (llm.c style: a
wrong kernel is never timed). On a GPU it also times torch.compile of the eager composition and
reports achieved bandwidth (bytes read + written, the minimum for the op, / time) as a fraction of
a device-to-device copy measured in the same run: end to end (from Python, through autograd) and
for the kernels alone (replayed from a CUDA graph, free of launch overhead).

    python bench/bench_ops.py                  # CPU (under a minute on 2 idle cores)
    python bench/bench_ops.py --device cuda    # plus torch.compile and bandwidth

Writes bench/results/ops_<device>.json.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from melano import ops  # noqa: E402
from melano.common import save_json, setup_logging  # noqa: E402

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
GOALS = {"cpu": {"fwd_bwd_vs_eager": 1.5},
         "cuda": {"fwd_bwd_vs_eager": 2.0, "vs_compile": 1.0, "copy_bandwidth_fraction": 0.7}}


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


def copy_bandwidth(device: str, timer: Timer) -> float:
    """Bytes/s of a device-to-device copy of 256 MiB (read + write counted)."""
    src = torch.empty(64 * 2**20, device=device)
    dst = torch.empty_like(src)
    t = statistics.median(interleaved_times({"copy": lambda: dst.copy_(src)}, timer, reps=20)["copy"])
    return 2 * src.numel() * src.element_size() / t


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
    """Max |fused - eager| over y and dx (relative to the largest value); raises when off."""
    xe, xf = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ye = ops.eager_instance_norm_act(xe, act=act, negative_slope=slope)
    yf = ops.instance_norm_act(xf, act=act, negative_slope=slope)
    g = torch.randn_like(ye)
    ye.backward(g)
    yf.backward(g)
    err = max(((yf - ye).abs().max() / ye.abs().max().clamp_min(1)).item(),
              ((xf.grad - xe.grad).abs().max() / xe.grad.abs().max().clamp_min(1)).item())
    if not err <= tol:
        raise SystemExit(f"fused op disagrees with eager on {tuple(x.shape)} {act}: rel. error {err:.3g} > {tol}")
    return err


def bench_shape(n, c, h, act, device, timer, reps, compile_ok, slope=0.2) -> dict:
    torch.manual_seed(0)
    x = torch.randn(n, c, h, h, device=device)
    err = check_shape(x, act, slope, tol=1e-3)
    xg = x.clone().requires_grad_()
    gy = torch.randn_like(x)

    def fwd(f):
        def run():
            with torch.no_grad():
                f(x, act=act, negative_slope=slope)
        return run

    def fwd_bwd(f):
        def run():
            f(xg, act=act, negative_slope=slope).backward(gy)
            xg.grad = None
        return run

    row = {"shape": [n, c, h, h], "act": act, "max_rel_err_vs_eager": err}
    fns = {"eager_fwd": fwd(ops.eager_instance_norm_act), "fused_fwd": fwd(ops.instance_norm_act)}
    fb = {"eager_fwd_bwd": fwd_bwd(ops.eager_instance_norm_act),
          "fused_fwd_bwd": fwd_bwd(ops.instance_norm_act)}
    if compile_ok:
        torch._dynamo.reset()
        compiled = torch.compile(ops.eager_instance_norm_act, dynamic=False)
        fns["compile_fwd"] = fwd(compiled)
        fb["compile_fwd_bwd"] = fwd_bwd(compiled)
        t0 = time.monotonic()
        fns["compile_fwd"]()  # compile outside the timings
        fb["compile_fwd_bwd"]()
        row["compile_seconds"] = round(time.monotonic() - t0, 1)
    runs = interleaved_times(fns, timer, reps)
    runs.update(interleaved_times(fb, timer, reps))
    times = {k: statistics.median(v) for k, v in sorted(runs.items())}
    row["seconds"] = times  # medians
    row["min_seconds"] = {k: min(v) for k, v in sorted(runs.items())}
    row["fwd_speedup_vs_eager"] = times["eager_fwd"] / times["fused_fwd"]
    row["fwd_bwd_speedup_vs_eager"] = times["eager_fwd_bwd"] / times["fused_fwd_bwd"]
    if compile_ok:
        row["fwd_speedup_vs_compile"] = times["compile_fwd"] / times["fused_fwd"]
        row["fwd_bwd_speedup_vs_compile"] = times["compile_fwd_bwd"] / times["fused_fwd_bwd"]
    # Minimum traffic: forward reads x and writes y; backward reads x and dy and writes dx.
    nbytes = x.numel() * x.element_size()
    row["fused_fwd_GBps"] = 2 * nbytes / times["fused_fwd"] / 1e9
    row["fused_fwd_bwd_GBps"] = 5 * nbytes / times["fused_fwd_bwd"] / 1e9
    if device == "cuda":
        # Kernel-only GPU time (CUDA graphs): the op without autograd, and eager for reference.
        def kernel_fwd():
            return torch.ops.melano.inorm_act_fwd(x, None, None, 1e-5, act, slope)

        def kernel_fwd_bwd():
            _, mean, rstd = kernel_fwd()
            torch.ops.melano.inorm_act_bwd(gy, x, None, None, mean, rstd, act, slope)

        def eager_fwd():
            with torch.no_grad():
                ops.eager_instance_norm_act(x, act=act, negative_slope=slope)

        graph = {"fused_fwd": graph_seconds(kernel_fwd), "fused_fwd_bwd": graph_seconds(kernel_fwd_bwd),
                 "eager_fwd": graph_seconds(eager_fwd)}
        row["graph_seconds"] = graph
        if graph["fused_fwd"]:
            row["graph_fused_fwd_GBps"] = 2 * nbytes / graph["fused_fwd"] / 1e9
        if graph["fused_fwd_bwd"]:
            row["graph_fused_fwd_bwd_GBps"] = 5 * nbytes / graph["fused_fwd_bwd"] / 1e9
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument("--shapes", default="full", choices=["subset", "full"],
                        help="full: N in {1, 4} x 8 layer shapes; subset: the N=1 ones and two N=4 ones")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per case "
                        "(default: 30 on cpu, 50 on cuda)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (cuda)")
    parser.add_argument("--time-budget", type=float, default=240.0,
                        help="seconds; past it, remaining shapes skip the torch.compile baseline")
    parser.add_argument("--max-other-load", type=float, default=0.2,
                        help="cpu: remeasure a shape (up to 3 tries, within the first 2 minutes) when other "
                             "processes kept more cores than this busy meanwhile")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: bench/results/ops_<device>.json)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    os.environ.setdefault("MELANO_OPS", "ext")  # time the kernel, never a silent fallback
    if ops.backend(args.device) != "ext":
        raise SystemExit(f"the fused op is not available on {args.device}")
    shapes = {"subset": SUBSET_SHAPES, "full": FULL_SHAPES}[args.shapes]
    reps = args.reps or (30 if args.device == "cpu" else 50)
    timer = Timer(args.device)
    result = {"machine": machine_info(args.device), "reps": reps, "goals": GOALS[args.device],
              "shapes": args.shapes,
              "note": "affine=False; forward timed under no_grad; ratios from medians of interleaved runs "
                      "(min_seconds also recorded); fused and eager run in the same process"}
    if args.device == "cuda":
        result["copy_GBps"] = copy_bandwidth(args.device, timer) / 1e9
    t_start, ticks_start = time.monotonic(), cpu_ticks()
    rows = []
    for n, c, h, act in shapes:
        compile_ok = (args.device == "cuda" and not args.no_compile
                      and time.monotonic() - t_start < args.time_budget)
        # Others share this machine: on the CPU, a shape measured while other processes kept more than
        # --max-other-load cores busy is measured again (up to 3 tries; the load is recorded per row).
        for attempt in range(1, 4):
            t0, ticks0 = time.monotonic(), cpu_ticks()
            row = bench_shape(n, c, h, act, args.device, timer, reps, compile_ok)
            busy = other_load(ticks0, cpu_ticks(), time.monotonic() - t0)
            row["other_processes_busy_cores"] = None if busy is None else round(busy, 2)
            row["attempts"] = attempt
            if (args.device != "cpu" or busy is None or busy <= args.max_other_load
                    or time.monotonic() - t_start > 120):  # keep the run short on a busy machine
                break
            log.info("%s: other processes kept %.2f cores busy; measuring again", row["shape"], busy)
        if args.device == "cuda":
            for k in ("fwd", "fwd_bwd"):
                row[f"{k}_copy_fraction"] = row[f"fused_{k}_GBps"] / result["copy_GBps"]
                if f"graph_fused_{k}_GBps" in row:
                    row[f"graph_{k}_copy_fraction"] = row[f"graph_fused_{k}_GBps"] / result["copy_GBps"]
        rows.append(row)
        log.info("%-18s %-10s fwd x%.2f  fwd+bwd x%.2f", "x".join(map(str, row["shape"])), act,
                 row["fwd_speedup_vs_eager"], row["fwd_bwd_speedup_vs_eager"])
    result["rows"] = rows
    summary = {"median_fwd_speedup_vs_eager": statistics.median(r["fwd_speedup_vs_eager"] for r in rows),
               "median_fwd_bwd_speedup_vs_eager": statistics.median(r["fwd_bwd_speedup_vs_eager"] for r in rows)}
    with_compile = [r for r in rows if "fwd_bwd_speedup_vs_compile" in r]
    if with_compile:
        summary["median_fwd_speedup_vs_compile"] = statistics.median(r["fwd_speedup_vs_compile"] for r in with_compile)
        summary["median_fwd_bwd_speedup_vs_compile"] = statistics.median(
            r["fwd_bwd_speedup_vs_compile"] for r in with_compile)
        summary["shapes_with_compile_baseline"] = len(with_compile)
    if args.device == "cuda":
        big = [r for r in rows if r["shape"][2] >= 64]
        for k in ("fwd_copy_fraction", "fwd_bwd_copy_fraction", "graph_fwd_copy_fraction",
                  "graph_fwd_bwd_copy_fraction"):
            vals = [r[k] for r in big if k in r]
            if vals:
                summary[f"min_{k}_planes_64_plus"] = min(vals)
    goal = GOALS[args.device]["fwd_bwd_vs_eager"]
    summary["fwd_bwd_goal_met"] = summary["median_fwd_bwd_speedup_vs_eager"] >= goal
    result["summary"] = summary
    if hasattr(os, "getloadavg"):
        result["machine"]["loadavg_at_end"] = os.getloadavg()
    result["wall_seconds"] = round(time.monotonic() - t_start, 1)
    busy = other_load(ticks_start, cpu_ticks(), result["wall_seconds"])
    result["machine"]["other_processes_busy_cores"] = None if busy is None else round(busy, 2)
    if args.device == "cpu" and busy is not None and busy > 0.25:
        log.warning("other processes kept %.2f cores busy during the run: CPU timings are noisy", busy)

    # The table.
    cols = ["eager_fwd", "fused_fwd", "eager_fwd_bwd", "fused_fwd_bwd"]
    if with_compile:
        cols[2:2] = ["compile_fwd"]
        cols.append("compile_fwd_bwd")
    head = f"{'shape':<16} {'act':<10} " + " ".join(f"{c + ' ms':>17}" for c in cols) + f" {'fwd x':>7} {'f+b x':>7}"
    if args.device == "cuda":
        head += f" {'f+b %copy':>9} {'kernel f %copy':>14} {'kernel f+b %copy':>16}"
    print(f"\nInstanceNorm+act on {result['machine']['device_name']} ({args.device}, "
          f"{result['machine']['torch_threads']} threads, torch {torch.__version__})")
    print(head)
    for r in rows:
        line = f"{'x'.join(map(str, r['shape'])):<16} {r['act']:<10} " + " ".join(
            f"{r['seconds'][c] * 1e3:>17.3f}" if c in r["seconds"] else f"{'-':>17}" for c in cols)
        line += f" {r['fwd_speedup_vs_eager']:>7.2f} {r['fwd_bwd_speedup_vs_eager']:>7.2f}"
        if args.device == "cuda":
            line += f" {100 * r['fwd_bwd_copy_fraction']:>8.0f}%"
            for k, width in (("graph_fwd_copy_fraction", 14), ("graph_fwd_bwd_copy_fraction", 16)):
                line += f" {100 * r[k]:>{width - 1}.0f}%" if k in r else f" {'-':>{width}}"
        print(line)
    if result["machine"].get("other_processes_busy_cores") is not None:
        print(f"other processes kept {result['machine']['other_processes_busy_cores']} cores busy meanwhile")
    print("summary:", ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    out = args.out or ROOT / "bench" / "results" / f"ops_{args.device}.json"
    save_json(result, out)
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
