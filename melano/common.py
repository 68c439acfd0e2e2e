"""Small shared helpers: logging, progress, seeds, atomic files, configs.

Everything here is used by more than one stage; stage logic lives in its own module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from . import outdir

log = logging.getLogger("melano")


def setup_logging(level: int = logging.INFO) -> None:
    """One format for every CLI. Safe to call twice."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S")


def progress(iterable: Iterable, total: int | None = None, desc: str = "", every_s: float = 10.0) -> Iterator:
    """tqdm when it is installed; otherwise a log line every `every_s` seconds."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(iterable, total=total, desc=desc, leave=False, mininterval=1.0)
        return
    last = start = time.monotonic()
    for i, item in enumerate(iterable, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            of = f"/{total}" if total else ""
            log.info("%s: %d%s (%.1f/s)", desc or "progress", i, of, i / (now - start))


def _atomic_write(path: str | os.PathLike, write) -> None:
    """Write to a temp file in the same folder, fsync, then os.replace: a kill leaves the old file."""
    outdir.atomic_write(path, write)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically. Load with `load_checkpoint` (weights_only=True)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    _atomic_write(path, lambda f: f.write(data))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True: a checkpoint from elsewhere can never run code."""
    kind = _not_a_checkpoint(path)
    if kind:
        raise ValueError(f"{path}: not a checkpoint but {kind}; pass a .pt file that melano wrote "
                         f"(e.g. best.pt or last.pt)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # UnpicklingError, RuntimeError on a truncated zip, EOFError, ...
        text = " ".join(str(e).split())
        if "weights_only" in text or "Unsupported global" in text:  # torch's advice to retry unsafely: dropped
            raise ValueError(f"{path}: not a loadable checkpoint, refused: it holds Python objects other than "
                             f"tensors and plain containers. "
                             f"melano never unpickles arbitrary objects; do not load this file with "
                             f"weights_only=False unless you trust whoever made it") from None
        raise ValueError(f"{path}: not a loadable checkpoint: it is corrupt, truncated, empty or another kind of "
                         f"file ({type(e).__name__}); write it again, or pass the right file") from None


def _not_a_checkpoint(path: str | os.PathLike) -> str | None:
    """What the file is, when its first bytes show it is no torch.save file (a zip archive, or a
    pickle in the legacy format); None when it may be one."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None  # torch.load raises these with their usual messages
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None
    if not head:
        return "an empty file"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    return "another kind of file (not a PyTorch checkpoint)"


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


def save_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_text(json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n", path)


def log_config(cfg: Any, path: str | os.PathLike | None = None) -> None:
    """Print a config dataclass and, if a path is given, save it as JSON beside the outputs."""
    d = to_jsonable(cfg)
    width = max((len(k) for k in d), default=0)
    log.info("config:\n%s", "\n".join(f"  {k:<{width}} = {v}" for k, v in d.items()))
    if path is not None:
        save_json(d, path)


def pick_device(device: str | None = None) -> torch.device:
    """The device named by --device (checked: CUDA must be there), or CUDA when available."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {device}: this machine has {n} CUDA GPU(s) (cuda:0..cuda:{n - 1})")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device!r}: melano runs on cpu or cuda")
    return dev


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
