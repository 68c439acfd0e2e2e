"""Shared by the benchmarks: timing, machine description, JSON results."""

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def rehearsal_dir() -> Path:
    """Where a benchmark's --rehearse run writes (never bench/results/): $MELANO_REHEARSAL_DIR, else
    build/rehearsal/ (git-ignored). bench/gpu_check.sh --rehearse sets it."""
    return Path(os.environ.get("MELANO_REHEARSAL_DIR") or ROOT / "build" / "rehearsal")


def host_info() -> dict:
    """What makes wall times comparable across hosts of one kind: the CPU's widest vector ISA,
    the caps on it (oneDNN's, ATen's and melano's kernels': set all three to emulate an AVX2
    host on an AVX-512 one), the load, and the GFLOP/s of a fixed float32 3x3 convolution (4 x 64 x
    64 x 64, median of 5), measured now."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    x, w = torch.randn(4, 64, 64, 64), torch.randn(64, 64, 3, 3)
    times = []
    for _ in range(6):
        t = time.perf_counter()
        torch.nn.functional.conv2d(x, w, padding=1)
        times.append(time.perf_counter() - t)
    return {"cpu_isa": "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "baseline",
            "oneDNN_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"),
            "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY", "default"),
            "melano_cpu_isa": os.environ.get("MELANO_CPU_ISA", "default"), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
            "conv_gflops": round(2 * 4 * 64 ** 4 * 9 / sorted(times[1:])[2] / 1e9, 2)}


def machine() -> dict:
    info = {
        **host_info(),  # ISA, oneDNN cap, load and a fixed conv's GFLOP/s: the one description of a host
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


def write_results(name: str, payload: dict, folder: Path | None = None, machine_info: dict | None = None,
                  quiet: bool = False) -> Path:
    """Write <folder or bench/results>/<name>.json atomically (a kill leaves the old file or the new one),
    so that a benchmark can rewrite it after each row and a timeout keeps the rows done. machine_info:
    machine(), measured once by such a benchmark (it times a convolution)."""
    from melano.infra.files import atomic_write  # bench/ runs with the repository root on sys.path
    path = (folder or RESULTS) / f"{name}.json"
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "machine": machine_info or machine(), **payload}
    atomic_write(path, json.dumps(payload, indent=2) + "\n")
    if not quiet:
        print(f"wrote {path}")
    return path
