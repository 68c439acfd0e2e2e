"""Build the fused InstanceNorm+activation library from csrc/ and load it into torch (torch.ops.melano.*).

    load() -> BuildInfo | None         build if needed and load, as MELANO_OPS says (the trainers call it)
    build(verbose=False) -> BuildInfo  build (or find in the cache) and load; once per process, never raises
    find_cuda_home() -> str | None     (`python -m melano.ops build`, or `make kernels`, prebuilds)

The op's API is melano.ops, which never builds; this module never imports it. Loading the library
registers the op's schema and kernels (TORCH_LIBRARY in csrc/); melano.ops adds its fake and autograd
parts when it first finds them.

MELANO_OPS: eager: load() does nothing; auto (default): a failed build logs one warning, and
melano.ops uses the eager path; ext: a failed build raises with the build error.

Build: torch.utils.cpp_extension.load (ninja), never at import. The CUDA source is added when torch
has CUDA and nvcc is found (CUDA_HOME, else nvcc on PATH, following a wrapper script to the real
toolkit). Builds are cached in $MELANO_BUILD_DIR or ~/.cache/melano, in a folder keyed by a hash of the
torch version, flags and CUDA arch; there ninja recompiles what a changed source or header affects (a
stamp with the hash of csrc/'s sources and headers skips even ninja when nothing changed). With no GPU
visible the CUDA code is compiled for sm_90 only, to prove that it builds (TORCH_CUDA_ARCH_LIST
overrides); the library's CPU ops still load and run. MELANO_CUDA_BUILD=no leaves the CUDA source out
(the pipeline's CLI sets it on a host with no GPU: the CPU-only build takes about 33 s instead of 50 s
on 2 cores, and training cannot use the rest).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from .files import atomic_write

log = logging.getLogger("melano.infra.kernels")

MODES = ("auto", "ext", "eager")
CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"
SOURCES = ("instance_norm_act.cpp",)
CUDA_SOURCES = ("instance_norm_act_cuda.cu",)
HEADERS = ("instance_norm_act.h",)  # included by both sources: part of the source hash
EXT_NAME = "melano_inorm_act"
# -ffp-contract=off: no FMA contraction, so the backward recomputes y_pre bit for bit as the forward did.
# -fno-trapping-math: lets the compiler vectorise the activation's select (both sides evaluated).
# -Wno-psabi: the vector helpers are always inlined, so the ABI notes on passing vectors do not apply.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp", "-Wno-psabi"]
LD_FLAGS = ["-fopenmp"]  # at::parallel_for is header code: it needs OpenMP in this library too
NVCC_FLAGS = ["-O3", "-lineinfo"]
COMPILE_ONLY_ARCH = "9.0"  # used when no GPU is visible: the build only proves that the code compiles


# ---------------------------------------------------------------------------------------------------
# Finding CUDA


def _resolve_nvcc(path: Path, depth: int = 0) -> Path:
    """The real nvcc behind `path`: follows symlinks and wrapper scripts (`exec /opt/cuda/bin/nvcc`)."""
    path = path.resolve()
    try:
        head = path.read_bytes()[:8192]
    except OSError:
        return path
    if head.startswith(b"#!") and depth < 4:
        for m in re.finditer(rb"(/[^\s\"';`|&]+/bin/nvcc)(?![\w.-])", head):
            target = Path(m.group(1).decode())
            if target.is_file() and target.resolve() != path:
                return _resolve_nvcc(target, depth + 1)
    return path


def find_cuda_home() -> str | None:
    """CUDA_HOME (or CUDA_PATH) when set; else the toolkit of the nvcc on PATH; else /usr/local/cuda.

    torch's own guess takes dirname(dirname(which nvcc)), which is wrong when nvcc is a wrapper
    script such as /usr/local/bin/nvcc -> `exec /usr/local/cuda-13.0/bin/nvcc "$@"`.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        home = _resolve_nvcc(Path(nvcc)).parent.parent
        if (home / "include" / "cuda_runtime.h").is_file():
            return str(home)
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return "/usr/local/cuda"
    return None


def _cuda_plan() -> tuple[bool, str, str | None, list[str]]:
    """(with_cuda, arch or reason, cuda_home, extra nvcc flags)."""
    if torch.version.cuda is None:
        return False, "torch was built without CUDA", None, []
    if os.environ.get("MELANO_CUDA_BUILD", "auto") == "no":
        return False, "MELANO_CUDA_BUILD=no", None, []
    cuda_home = find_cuda_home()
    if cuda_home is None or not Path(cuda_home, "bin", "nvcc").is_file():
        return False, f"nvcc not found (CUDA_HOME={cuda_home!r}); set CUDA_HOME to a CUDA toolkit", None, []
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return True, "arch " + os.environ["TORCH_CUDA_ARCH_LIST"], cuda_home, []
    if torch.cuda.is_available():  # torch picks the visible GPUs' archs itself
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return True, "arch " + ";".join(f"{a}.{b}" for a, b in caps), cuda_home, []
    # torch cannot detect an arch without a GPU (it fails with an IndexError): name one, compile only.
    num = COMPILE_ONLY_ARCH.replace(".", "")
    return (True, f"arch {COMPILE_ONLY_ARCH} (compile-only: no GPU visible)", cuda_home,
            [f"-gencode=arch=compute_{num},code=sm_{num}"])


# ---------------------------------------------------------------------------------------------------
# Building and loading


@dataclasses.dataclass
class BuildInfo:
    ok: bool
    cuda: bool  # CUDA kernels compiled into the library
    cuda_reason: str  # why not, when cuda is False; the arch it was built for otherwise
    library: str | None
    build_dir: str
    seconds: float
    cached: bool
    cuda_home: str | None = None
    error: str | None = None


_lock = threading.RLock()
_build_info: BuildInfo | None = None
_warned = False


def _build_dir(parts: dict) -> Path:
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    root = os.environ.get("MELANO_BUILD_DIR") or Path.home() / ".cache" / "melano"
    return Path(root) / f"inorm_act_{key}"


def _source_hash(files: list[Path]) -> str:
    """Hash of the files' names and contents: the sources and every header they include."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _stamp_hash(stamp: Path) -> str | None:
    """The source hash a finished build recorded; None if absent or unreadable (then rebuild)."""
    try:
        return json.loads(stamp.read_text()).get("source_hash")
    except (OSError, ValueError):
        return None


def _compile(names: tuple[str, ...], build_dir: Path, with_cuda: bool, cuda_reason: str, cuda_home: str | None,
             arch_flags: list[str], verbose: bool) -> Path:
    """ninja-build the library in build_dir and load it; returns its path."""
    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("building %s (%s) in %s; CUDA: %s", EXT_NAME, ", ".join(names), build_dir,
             cuda_reason if with_cuda else f"no ({cuda_reason})")
    from torch.utils import cpp_extension

    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home
    return Path(cpp_extension.load(
        name=EXT_NAME, sources=[str(CSRC / n) for n in names], extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS + arch_flags, extra_ldflags=LD_FLAGS,
        build_directory=str(build_dir), with_cuda=with_cuda, is_python_module=False, verbose=verbose))


def _build(verbose: bool) -> BuildInfo:
    t0 = time.monotonic()
    with_cuda, cuda_reason, cuda_home, arch_flags = _cuda_plan()
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME when first imported; set both.
        os.environ.setdefault("CUDA_HOME", cuda_home)
    names = SOURCES + (CUDA_SOURCES if with_cuda else ())
    files = [CSRC / n for n in names + HEADERS]
    build_dir = Path(".")
    try:
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"kernel sources not found: {missing} (melano builds its kernels from "
                                    "the csrc/ folder of a source checkout; install with pip -e)")
        # The folder is keyed by everything but the sources' contents; ninja recompiles only the
        # sources that changed, and the stamp's hash tells whether the library is current.
        parts = {
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": sys.implementation.cache_tag,
            "cxx": os.environ.get("CXX", "c++"), "cflags": CXX_FLAGS, "ldflags": LD_FLAGS, "sources": names,
            "cuda": with_cuda and {"home": cuda_home, "arch": cuda_reason, "flags": NVCC_FLAGS + arch_flags},
        }
        source_hash = _source_hash(files)
        build_dir = _build_dir(parts)
        library = build_dir / f"{EXT_NAME}.so"
        stamp = build_dir / "melano_build.json"
        cached = library.is_file() and _stamp_hash(stamp) == source_hash
        if cached:
            torch.ops.load_library(str(library))
        else:
            library = _compile(names, build_dir, with_cuda, cuda_reason, cuda_home, arch_flags, verbose)
            # Atomic: another rank of a torchrun job may be reading it right now.
            atomic_write(stamp, json.dumps(dict(parts, source_hash=source_hash), indent=1) + "\n")
        return BuildInfo(True, with_cuda, cuda_reason, str(library), str(build_dir), time.monotonic() - t0,
                         cached, cuda_home)
    except Exception as e:  # compiler errors, missing ninja, missing sources, load failures
        return BuildInfo(False, False, cuda_reason, None, str(build_dir), time.monotonic() - t0, False,
                         cuda_home, error=f"{type(e).__name__}: {e}")


def build(verbose: bool = False) -> BuildInfo:
    """Build (or find in the cache) and load the library into torch; once per process. Never raises."""
    global _build_info
    if _build_info is not None:  # the common case, off the lock
        return _build_info
    with _lock:
        if _build_info is None:
            _build_info = _build(verbose)
        return _build_info


def _error_summary(error: str, limit: int = 600) -> str:
    """The lines of a (long) compiler log that say what went wrong."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    picked = [ln for ln in lines if re.search(r"\berror\b|not found|No such file", ln, re.I)][:4] or lines[:1]
    text = " | ".join(picked)
    return text if len(text) <= limit else text[:limit] + " ..."


def load() -> BuildInfo | None:
    """Build if needed and load the library, as MELANO_OPS says; cheap after the first call.

    eager: nothing (None). auto: a failed build logs one warning (melano.ops then takes the eager
    path). ext: a failed build raises RuntimeError with the build error."""
    global _warned
    mode = os.environ.get("MELANO_OPS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"MELANO_OPS={mode!r} is not one of {', '.join(MODES)}")
    if mode == "eager":
        return None
    info = build()
    if not info.ok:
        if mode == "ext":
            raise RuntimeError(f"MELANO_OPS=ext but the fused kernel failed to build in {info.build_dir}:\n"
                               f"{info.error}")
        with _lock:
            if _warned:
                return info
            _warned = True
        log.warning("melano.ops: the fused InstanceNorm kernel did not build, so the eager PyTorch path is "
                    f"used instead. {_error_summary(info.error)} -- run `python -m melano.ops build "
                    "--verbose` for the full error, or set MELANO_OPS=eager.")
    return info
