"""Benchmark: fused InstanceNorm+activation (melano.ops) against eager F.instance_norm + activation.

Shapes are the CycleGAN's: N in {1, 4}, C from 32 to 512, H = W from 16 to 256 (ResNet-9 generator
with ReLU, PatchGAN discriminator with LeakyReLU(0.2); affine=False as in CycleGAN). For each shape it
times forward (no_grad) and forward+backward, fused and eager, interleaved in the same loop so that
load from other processes hits both alike, and reports eager/fused ratios and their median.

Before timing, each shape's fused output and gradient are checked against eager (llm.c style: a
wrong kernel is never timed). On a GPU it also times torch.compile of the eager composition and
reports achieved bandwidth (bytes read + written, the minimum for the op, / time) as a fraction of
a device-to-device copy measured in the same run.

    python bench/bench_ops.py                  # CPU, a subset of shapes (about 2 minutes on 2 cores)
    python bench/bench_ops.py --device cuda    # all shapes, plus torch.compile and bandwidth

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
# CPU: the shapes of one 256-pixel generator/discriminator at N = 1, plus two at N = 4 (time budget).
CPU_SHAPES = [s for s in FULL_SHAPES if s[0] == 1] + [(4, 256, 64, "relu"), (4, 512, 16, "leaky_relu")]
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


def check_shape(x, act, slope, tol) -> float:
    """Max |fused - eager| over y and dx (relative to the largest value); raises when off."""
    xe, xf = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ye = ops.reference_instance_norm_act(xe, act=act, negative_slope=slope)
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
    fns = {"eager_fwd": fwd(ops.reference_instance_norm_act), "fused_fwd": fwd(ops.instance_norm_act)}
    fb = {"eager_fwd_bwd": fwd_bwd(ops.reference_instance_norm_act),
          "fused_fwd_bwd": fwd_bwd(ops.instance_norm_act)}
    if compile_ok:
        torch._dynamo.reset()
        compiled = torch.compile(ops.reference_instance_norm_act, dynamic=False)
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
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument("--shapes", default=None, choices=["subset", "full"],
                        help="shape list; default: subset on cpu, full on cuda")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per case "
                        "(default: 15 on cpu, 50 on cuda)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (cuda)")
    parser.add_argument("--time-budget", type=float, default=240.0,
                        help="seconds; past it, remaining shapes skip the torch.compile baseline")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: bench/results/ops_<device>.json)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    os.environ.setdefault("MELANO_OPS", "ext")  # time the kernel, never a silent fallback
    if ops.backend(args.device) != "ext":
        raise SystemExit(f"the fused op is not available on {args.device}")
    shapes = {"subset": CPU_SHAPES, "full": FULL_SHAPES}[args.shapes or ("subset" if args.device == "cpu" else "full")]
    reps = args.reps or (15 if args.device == "cpu" else 50)
    timer = Timer(args.device)
    result = {"machine": machine_info(args.device), "reps": reps, "goals": GOALS[args.device],
              "shapes": "all N=1 shapes plus two N=4 ones" if shapes is CPU_SHAPES else "all",
              "note": "affine=False; forward timed under no_grad; ratios from medians of interleaved runs "
                      "(min_seconds also recorded); fused and eager run in the same process"}
    if args.device == "cuda":
        result["copy_GBps"] = copy_bandwidth(args.device, timer) / 1e9
    t_start = time.monotonic()
    rows = []
    for n, c, h, act in shapes:
        compile_ok = (args.device == "cuda" and not args.no_compile
                      and time.monotonic() - t_start < args.time_budget)
        row = bench_shape(n, c, h, act, args.device, timer, reps, compile_ok)
        if args.device == "cuda":
            row["fwd_copy_fraction"] = row["fused_fwd_GBps"] / result["copy_GBps"]
            row["fwd_bwd_copy_fraction"] = row["fused_fwd_bwd_GBps"] / result["copy_GBps"]
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
        summary["min_fwd_copy_fraction_planes_64_plus"] = min(r["fwd_copy_fraction"] for r in big)
        summary["min_fwd_bwd_copy_fraction_planes_64_plus"] = min(r["fwd_bwd_copy_fraction"] for r in big)
    goal = GOALS[args.device]["fwd_bwd_vs_eager"]
    summary["fwd_bwd_goal_met"] = summary["median_fwd_bwd_speedup_vs_eager"] >= goal
    result["summary"] = summary
    if hasattr(os, "getloadavg"):
        result["machine"]["loadavg_at_end"] = os.getloadavg()
    result["wall_seconds"] = round(time.monotonic() - t_start, 1)

    # The table.
    cols = ["eager_fwd", "fused_fwd", "eager_fwd_bwd", "fused_fwd_bwd"]
    if with_compile:
        cols[2:2] = ["compile_fwd"]
        cols.append("compile_fwd_bwd")
    head = f"{'shape':<16} {'act':<10} " + " ".join(f"{c + ' ms':>17}" for c in cols) + f" {'fwd x':>7} {'f+b x':>7}"
    if args.device == "cuda":
        head += f" {'f+b %copy':>9}"
    print(f"\nInstanceNorm+act on {result['machine']['device_name']} ({args.device}, "
          f"{result['machine']['torch_threads']} threads, torch {torch.__version__})")
    print(head)
    for r in rows:
        line = f"{'x'.join(map(str, r['shape'])):<16} {r['act']:<10} " + " ".join(
            f"{r['seconds'][c] * 1e3:>17.3f}" if c in r["seconds"] else f"{'-':>17}" for c in cols)
        line += f" {r['fwd_speedup_vs_eager']:>7.2f} {r['fwd_bwd_speedup_vs_eager']:>7.2f}"
        if args.device == "cuda":
            line += f" {100 * r['fwd_bwd_copy_fraction']:>8.0f}%"
        print(line)
    print("summary:", ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    out = args.out or ROOT / "bench" / "results" / f"ops_{args.device}.json"
    save_json(result, out)
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
