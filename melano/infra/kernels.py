"""Build the fused InstanceNorm+activation library from csrc/ and load it into torch (torch.ops.melano.*).

`load()` builds if needed and loads, as MELANO_OPS says: eager: nothing; auto (default): a failed
build logs one warning and melano.ops takes the eager path; ext: a failed build raises. The trainers
call it; `python -m melano.ops build` prebuilds. melano.ops, the op's API, never builds: the library
registers the op and its autograd (csrc/), and melano.ops adds its fake implementations.

Builds (ninja) are cached in $MELANO_BUILD_DIR or ~/.cache/melano, keyed by the torch version, flags
and CUDA arch. The CUDA source is added when torch has CUDA and nvcc is found, unless
MELANO_CUDA_BUILD=no; with no GPU visible it is compiled for sm_90 only, to prove that it builds.
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
# The CPU kernels compile in two halves (instance_norm_act_backward.cpp includes instance_norm_act.cpp),
# so that ninja builds them on two cores at once.
SOURCES = ("instance_norm_act.cpp", "instance_norm_act_backward.cpp", "instance_norm_act_autograd.cpp")
CUDA_SOURCES = ("instance_norm_act_cuda.cu",)
HEADERS = ("instance_norm_act.h",)  # included by every source: part of the source hash
EXT_NAME = "melano_inorm_act"
# -ffp-contract=off: no FMA contraction, so the backward recomputes y_pre bit for bit as the forward did.
# -fno-trapping-math: lets the compiler vectorise the activation's select (both sides evaluated).
# -Wno-psabi: the vector helpers are always inlined, so the ABI notes on passing vectors do not apply.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp", "-Wno-psabi"]
LD_FLAGS = ["-fopenmp"]  # at::parallel_for is header code: it needs OpenMP in this library too
NVCC_FLAGS = ["-O3", "-lineinfo"]
COMPILE_ONLY_ARCH = "9.0"  # used when no GPU is visible: the build only proves that the code compiles


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


def load() -> BuildInfo | None:
    """Build if needed and load the library, as MELANO_OPS says; cheap after the first call."""
    global _warned
    mode = ops_mode()
    if mode == "eager":
        return None
    info = build()
    if info.ok:
        return info
    if mode == "ext":
        raise RuntimeError(f"MELANO_OPS=ext but the fused kernel failed to build in {info.build_dir}:\n{info.error}")
    with _lock:
        if _warned:
            return info
        _warned = True
    log.warning("melano.ops: the fused InstanceNorm kernel did not build, so the eager PyTorch path is "
                f"used instead. {_error_summary(info.error)} -- run `python -m melano.ops build --verbose` for the full error, "
                "or set MELANO_OPS=eager.")
    return info


def ops_mode() -> str:
    """MELANO_OPS: auto (default), ext or eager; read at every call, so that tests and benchmarks can switch."""
    mode = os.environ.get("MELANO_OPS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"MELANO_OPS={mode!r} is not one of {', '.join(MODES)}")
    return mode


def _error_summary(error: str, limit: int = 600) -> str:
    """The lines of a (long) compiler log that say what went wrong."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    picked = [ln for ln in lines if re.search(r"\berror\b|not found|No such file", ln, re.I)][:4] or lines[:1]
    text = " | ".join(picked)
    return text if len(text) <= limit else text[:limit] + " ..."


def build(verbose: bool = False) -> BuildInfo:
    """Build (or find in the cache) and load the library into torch; once per process. Never raises."""
    global _build_info
    if _build_info is not None:  # the common case, off the lock
        return _build_info
    with _lock:
        if _build_info is None:
            _build_info = _build(verbose)
        return _build_info


def _build(verbose: bool) -> BuildInfo:
    t0 = time.monotonic()
    with_cuda, cuda_reason, cuda_home, arch_flags = _cuda_plan()
    if cuda_home is not None:  # torch.utils.cpp_extension reads CUDA_HOME when first imported
        os.environ.setdefault("CUDA_HOME", cuda_home)
    names = SOURCES + (CUDA_SOURCES if with_cuda else ())
    files = [CSRC / n for n in names + HEADERS]
    build_dir = Path(".")
    try:
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"kernel sources not found: {missing} (melano builds its kernels from "
                                    "the csrc/ folder of a source checkout; install with pip -e)")
        # The folder is keyed by everything but the sources' contents: ninja recompiles only the
        # sources that changed, and the stamp's hash tells whether the library is current.
        parts = {
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": sys.implementation.cache_tag,
            "cxx": os.environ.get("CXX", "c++"), "cflags": CXX_FLAGS, "ldflags": LD_FLAGS, "sources": names,
            "cuda": with_cuda and {"home": cuda_home, "arch": cuda_reason, "flags": NVCC_FLAGS + arch_flags},
        }
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
        build_dir = Path(os.environ.get("MELANO_BUILD_DIR") or Path.home() / ".cache" / "melano") / f"inorm_act_{key}"
        library, stamp = build_dir / f"{EXT_NAME}.so", build_dir / "melano_build.json"
        source_hash = _source_hash(files)
        try:
            cached = library.is_file() and json.loads(stamp.read_text()).get("source_hash") == source_hash
        except (OSError, ValueError):  # no stamp, or a torn one: rebuild
            cached = False
        if cached:
            torch.ops.load_library(str(library))
        else:  # ninja-build and load it
            build_dir.mkdir(parents=True, exist_ok=True)
            log.info("building %s (%s) in %s; CUDA: %s", EXT_NAME, ", ".join(names), build_dir,
                     cuda_reason if with_cuda else f"no ({cuda_reason})")
            from torch.utils import cpp_extension
            if cuda_home is not None:
                cpp_extension.CUDA_HOME = cuda_home
            library = Path(cpp_extension.load(
                name=EXT_NAME, sources=[str(CSRC / n) for n in names], extra_cflags=CXX_FLAGS,
                extra_cuda_cflags=NVCC_FLAGS + arch_flags, extra_ldflags=LD_FLAGS,
                build_directory=str(build_dir), with_cuda=with_cuda, is_python_module=False, verbose=verbose))
            # Atomic: another rank of a torchrun job may be reading it right now.
            atomic_write(stamp, json.dumps(dict(parts, source_hash=source_hash), indent=1) + "\n")
        return BuildInfo(True, with_cuda, cuda_reason, str(library), str(build_dir), time.monotonic() - t0,
                         cached, cuda_home)
    except Exception as e:  # compiler errors, missing ninja, missing sources, load failures
        return BuildInfo(False, False, cuda_reason, None, str(build_dir), time.monotonic() - t0, False,
                         cuda_home, error=f"{type(e).__name__}: {e}")


def _source_hash(files: list[Path]) -> str:
    """Hash of the files' names and contents: the sources and every header they include."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


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


def find_cuda_home() -> str | None:
    """CUDA_HOME (or CUDA_PATH) when set; else the toolkit of the nvcc on PATH (torch's own guess
    is wrong when that is a wrapper script); else /usr/local/cuda."""
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
