"""Shared by the benchmarks: timing, machine description, JSON results."""

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_isa() -> str:
    """The widest x86 vector ISA this CPU reports (ONEDNN_MAX_CPU_ISA may cap what runs)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "baseline"


def calibration_gflops() -> float:
    """GFLOP/s of a fixed float32 3x3 convolution (N=4, 64 -> 64 channels, 64x64), median of 5: a
    figure that lets times from different hosts of one kind be compared."""
    x, w = torch.randn(4, 64, 64, 64), torch.randn(64, 64, 3, 3)
    flops = 2 * 4 * 64 * 64 * 64 * 64 * 9
    return flops / time_it(lambda: torch.nn.functional.conv2d(x, w, padding=1), repeats=5) / 1e9


def machine() -> dict:
    info = {
        "cpu_isa": cpu_isa(),
        "oneDNN_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"),
        "conv_gflops_calibration": round(calibration_gflops(), 2),
        "load_average": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def time_it(fn, repeats: int = 5, warmup: int = 1, sync_cuda: bool = False) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if sync_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path
