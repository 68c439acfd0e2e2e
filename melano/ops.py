"""Fused InstanceNorm + activation, as one custom op (C++ on CPU, CUDA on GPUs).

    y = act(instance_norm(x, weight, bias, eps)),   act in {"none", "relu", "leaky_relu"}

exactly `F.leaky_relu(F.instance_norm(x, weight=weight, bias=bias, eps=eps), slope)`: biased
variance, no running statistics; "relu" is slope 0 and "none" the identity. Eager PyTorch makes a
pass over memory for the statistics, one to normalise and one to activate (and as many backward);
the fused op reads x from memory once and writes y once. (On the CPU its later passes over a plane
hit the cache; on a GPU a plane too large for one block's registers is read twice.)

Public API:
    instance_norm_act(x, weight=None, bias=None, eps=1e-5, act="relu", negative_slope=0.01)
    InstanceNormAct(num_features, affine=False, eps=1e-5, act="relu", negative_slope=0.2)
    backend(device="cpu") -> "ext" | "eager"
    eager_instance_norm_act(x, ...)            the composed PyTorch ops (MELANO_OPS=eager, benchmarks)
    kernel_layout(x) -> torch.memory_format    the layout the compiled op reads and returns for x
    build(verbose=False) -> BuildInfo          (`python -m melano.ops build`, or `make kernels`)

Choices worth knowing:
- Layout: the output has the input's memory format. A channels_last-contiguous input runs NHWC
  kernels (SIMD or coalesced across channels) and gives a channels_last output; any other layout
  (NCHW, transposed, strided) runs the NCHW kernels on a contiguous copy and gives an NCHW output.
  (The eager path returns what F.instance_norm returns: NCHW.)
- Backward: the op saves x, mean and rstd (not y) and recomputes the pre-activation from x; the
  formulas, their derivation and why x rather than y are in reference/instance_norm_act.py. The
  activation's gradient follows F.relu / F.leaky_relu: 0 (or the slope) where y_pre <= 0.
  No double backward.
- Selection by the environment variable MELANO_OPS, read at every call:
    auto (default)  the compiled op if it builds, else the eager path with one logged warning;
    ext             the compiled op, or an error carrying the build error;
    eager           the composed PyTorch ops (`eager_instance_norm_act`).
  ("reference" names only the float64 test oracles in reference/, never a path of this module.)
- Build: torch.utils.cpp_extension.load (ninja) on first use, never at import. The CUDA source is
  added when torch has CUDA and nvcc is found (CUDA_HOME, else nvcc on PATH, following a wrapper
  script to the real toolkit). Builds are cached in $MELANO_BUILD_DIR or ~/.cache/melano, in a
  folder keyed by a hash of the torch version, flags and CUDA arch; there ninja recompiles what a
  changed source or header affects (a stamp with the hash of csrc/'s sources and headers skips even
  ninja when nothing changed). With no GPU visible the CUDA code is compiled for sm_90 only, to prove
  that it builds (TORCH_CUDA_ARCH_LIST overrides); the library's CPU ops still load and run.
  MELANO_CUDA_BUILD=no leaves the CUDA source out (the pipeline's CLI sets it on a host with no GPU:
  the CPU-only build takes about 33 s instead of 50 s on 2 cores, and training cannot use the rest).
"""

from __future__ import annotations

import argparse
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
import torch.nn.functional as F
from torch import nn
from .infra.files import atomic_write


log = logging.getLogger("melano.ops")

ACTS = ("none", "relu", "leaky_relu")
MODES = ("auto", "ext", "eager")
CSRC = Path(__file__).resolve().parent.parent / "csrc"
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
# Finding CUDA, building and loading the extension


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
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


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


def _build_dir(parts: dict) -> Path:
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    root = os.environ.get("MELANO_BUILD_DIR") or Path.home() / ".cache" / "melano"
    return Path(root) / f"inorm_act_{key}"


def kernel_layout(x: torch.Tensor) -> torch.memory_format:
    """The layout the compiled op reads and returns: channels_last for a channels_last-contiguous x
    (NHWC kernels), else contiguous_format. The same rule as kernel_layout in csrc/instance_norm_act.h."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _register_python_parts() -> None:
    """Fake (meta) implementations for torch.compile/opcheck, and the autograd formula."""

    def acc_dtype(x):
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("melano::inorm_act_fwd")
    def _fwd_fake(x, weight, bias, eps, act, negative_slope):
        n, c = x.shape[0], x.shape[1]
        y = torch.empty_like(x, memory_format=kernel_layout(x))
        return y, x.new_empty((n, c), dtype=acc_dtype(x)), x.new_empty((n, c), dtype=acc_dtype(x))

    @torch.library.register_fake("melano::inorm_act_bwd")
    def _bwd_fake(grad_y, x, weight, bias, mean, rstd, act, negative_slope):
        c = x.shape[1]
        dx = torch.empty_like(x, memory_format=kernel_layout(x))
        return dx, x.new_empty((c,), dtype=acc_dtype(x)), x.new_empty((c,), dtype=acc_dtype(x))

    def setup_context(ctx, inputs, output):
        x, weight, bias, _eps, act, negative_slope = inputs
        _y, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.act, ctx.negative_slope = act, negative_slope

    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.melano.inorm_act_bwd(grad_y, x, weight, bias, mean, rstd,
                                                    ctx.act, ctx.negative_slope)
        dw = None if weight is None else dw.to(weight.dtype)
        db = None if bias is None else db.to(bias.dtype)
        return dx, dw, db, None, None, None

    torch.library.register_autograd("melano::inorm_act_fwd", backward, setup_context=setup_context)

    def no_double_backward(ctx, *grads):
        raise NotImplementedError("melano.ops.instance_norm_act has no double backward (create_graph=True "
                                  "through it); use MELANO_OPS=eager for that")

    torch.library.register_autograd("melano::inorm_act_bwd", no_double_backward)


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


def build(verbose: bool = False) -> BuildInfo:
    """Build (or find in the cache) and load the extension; once per process. Never raises."""
    global _build_info
    if _build_info is not None:  # the common case; also keeps torch.compile's tracing off the lock
        return _build_info
    with _lock:
        if _build_info is not None:
            return _build_info
        t0 = time.monotonic()
        with_cuda, cuda_reason, cuda_home, arch_flags = _cuda_plan()
        if cuda_home is not None:
            # torch.utils.cpp_extension reads CUDA_HOME when first imported; set both.
            os.environ.setdefault("CUDA_HOME", cuda_home)
        names = SOURCES + (CUDA_SOURCES if with_cuda else ())
        sources = [CSRC / n for n in names]
        build_dir = Path(".")
        try:
            missing = [str(s) for s in sources + [CSRC / h for h in HEADERS] if not s.is_file()]
            if missing:
                raise FileNotFoundError(f"kernel sources not found: {missing} (melano.ops builds from "
                                        "the csrc/ folder of a source checkout; install with pip -e)")
            # The folder is keyed by everything but the sources' contents; ninja recompiles only the
            # sources that changed, and the stamp's hash tells whether the library is current.
            parts = {
                "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": sys.implementation.cache_tag,
                "cxx": os.environ.get("CXX", "c++"), "cflags": CXX_FLAGS, "ldflags": LD_FLAGS, "sources": names,
                "cuda": with_cuda and {"home": cuda_home, "arch": cuda_reason, "flags": NVCC_FLAGS + arch_flags},
            }
            source_hash = _source_hash(sources + [CSRC / h for h in HEADERS])
            build_dir = _build_dir(parts)
            library = build_dir / f"{EXT_NAME}.so"
            stamp = build_dir / "melano_build.json"
            cached = library.is_file() and _stamp_hash(stamp) == source_hash
            if cached:
                torch.ops.load_library(str(library))
            else:
                build_dir.mkdir(parents=True, exist_ok=True)
                log.info("building %s (%s) in %s; CUDA: %s", EXT_NAME, ", ".join(names), build_dir,
                         cuda_reason if with_cuda else f"no ({cuda_reason})")
                from torch.utils import cpp_extension

                if cuda_home is not None:
                    cpp_extension.CUDA_HOME = cuda_home
                library = Path(cpp_extension.load(
                    name=EXT_NAME, sources=[str(s) for s in sources], extra_cflags=CXX_FLAGS,
                    extra_cuda_cflags=NVCC_FLAGS + arch_flags, extra_ldflags=LD_FLAGS,
                    build_directory=str(build_dir), with_cuda=with_cuda, is_python_module=False,
                    verbose=verbose))
                # Atomic: another rank of a torchrun job may be reading it right now.
                atomic_write(stamp, json.dumps(dict(parts, source_hash=source_hash), indent=1) + "\n")
            _register_python_parts()
            _build_info = BuildInfo(True, with_cuda, cuda_reason, str(library), str(build_dir),
                                    time.monotonic() - t0, cached, cuda_home)
        except Exception as e:  # compiler errors, missing ninja, missing sources, load failures
            _build_info = BuildInfo(False, False, cuda_reason, None, str(build_dir), time.monotonic() - t0,
                                    False, cuda_home, error=f"{type(e).__name__}: {e}")
        return _build_info


# ---------------------------------------------------------------------------------------------------
# Backend selection


def _error_summary(error: str, limit: int = 600) -> str:
    """The lines of a (long) compiler log that say what went wrong."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    picked = [ln for ln in lines if re.search(r"\berror\b|not found|No such file", ln, re.I)][:4] or lines[:1]
    text = " | ".join(picked)
    return text if len(text) <= limit else text[:limit] + " ..."


def ops_mode() -> str:
    mode = os.environ.get("MELANO_OPS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"MELANO_OPS={mode!r} is not one of {', '.join(MODES)}")
    return mode


def backend(device: str | torch.device = "cpu") -> str:
    """"ext" or "eager": the path instance_norm_act takes for tensors on `device`.

    Builds the extension on the first call (unless MELANO_OPS=eager).
    """
    device = torch.device(device)
    mode = ops_mode()
    if mode == "eager":
        return "eager"
    info = build()
    if not info.ok:
        if mode == "ext":
            raise RuntimeError(f"MELANO_OPS=ext but the fused kernel failed to build in {info.build_dir}:\n"
                               f"{info.error}")
        _warn_once("build", "melano.ops: the fused InstanceNorm kernel did not build, so the eager PyTorch "
                   f"path is used instead. {_error_summary(info.error)} -- run "
                   "`python -m melano.ops build --verbose` for the full error, or set MELANO_OPS=eager.")
        return "eager"
    if device.type == "cpu" or (device.type == "cuda" and info.cuda):
        return "ext"
    why = info.cuda_reason if device.type == "cuda" else f"no {device.type} kernel exists"
    if mode == "ext":
        raise RuntimeError(f"MELANO_OPS=ext but the fused kernel has no {device.type} implementation: {why}")
    _warn_once(device.type, f"melano.ops: no fused kernel for {device.type} tensors ({why}); "
               "using the eager PyTorch path for them")
    return "eager"


# ---------------------------------------------------------------------------------------------------
# The op


def _check_args(x, weight, bias, eps, act) -> None:
    """Refuse bad input before any kernel runs, naming the problem and the fix."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"instance_norm_act: x must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"instance_norm_act: x must have shape (N, C, H, W), got {tuple(x.shape)}"
                         + ("; add the batch dimension with x.unsqueeze(0)" if x.dim() == 3 else ""))
    if not x.is_floating_point():
        raise TypeError(f"instance_norm_act: x has dtype {x.dtype}; it needs a floating dtype "
                        "(convert with x.float())")
    if x.shape[2] * x.shape[3] <= 1:
        raise ValueError(f"instance_norm_act: x of shape {tuple(x.shape)} has planes of H*W = "
                         f"{x.shape[2] * x.shape[3]} element(s); the variance needs more than one")
    if act not in ACTS:
        raise ValueError(f"instance_norm_act: unknown act {act!r}; use one of {ACTS}")
    if not eps >= 0:
        raise ValueError(f"instance_norm_act: eps must be >= 0, got {eps}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or p.shape != (x.shape[1],):
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"instance_norm_act: {name} must have shape (C,) = ({x.shape[1]},) for x of "
                             f"shape {tuple(x.shape)}, got {shape}")
        if p.device != x.device:
            raise ValueError(f"instance_norm_act: {name} is on {p.device} but x is on {x.device}; "
                             f"move them to one device")
        if not p.is_floating_point():
            raise TypeError(f"instance_norm_act: {name} has dtype {p.dtype}; it needs a floating dtype")


def eager_instance_norm_act(x, weight=None, bias=None, eps=1e-5, act="relu", negative_slope=0.01):
    """The composed PyTorch ops: the MELANO_OPS=eager path and the benchmarks' baseline."""
    y = F.instance_norm(x, weight=weight, bias=bias, eps=eps)
    if act == "relu":
        return F.relu(y)
    if act == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    return y


def instance_norm_act(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                      eps: float = 1e-5, act: str = "relu", negative_slope: float = 0.01) -> torch.Tensor:
    """act(F.instance_norm(x, weight, bias, eps)) for x of shape (N, C, H, W); see the module doc."""
    _check_args(x, weight, bias, eps, act)
    if backend(x.device) == "ext":
        return torch.ops.melano.inorm_act_fwd(x, weight, bias, float(eps), act, float(negative_slope))[0]
    return eager_instance_norm_act(x, weight, bias, eps, act, negative_slope)


class InstanceNormAct(nn.Module):
    """Drop-in for nn.Sequential(nn.InstanceNorm2d(C, affine=...), nn.ReLU()) and its LeakyReLU(slope)
    and no-activation forms. With affine=True the parameters are `weight` (ones) and `bias` (zeros),
    as in nn.InstanceNorm2d, so its state-dict keys `0.weight`/`0.bias` map to `weight`/`bias`.
    Like nn.InstanceNorm2d it also takes an unbatched (C, H, W) input.
    """

    def __init__(self, num_features: int, affine: bool = False, eps: float = 1e-5, act: str = "relu",
                 negative_slope: float = 0.2, device=None, dtype=None):
        super().__init__()
        if act not in ACTS:
            raise ValueError(f"InstanceNormAct: unknown act {act!r}; use one of {ACTS}")
        self.num_features, self.affine, self.eps = num_features, affine, eps
        self.act, self.negative_slope = act, negative_slope
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() == 4 and x.shape[1] != self.num_features:
            raise ValueError(f"InstanceNormAct({self.num_features}): input has {x.shape[1]} channels "
                             f"(shape {tuple(x.shape)})")
        y = instance_norm_act(x, self.weight, self.bias, self.eps, self.act, self.negative_slope)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.act == "leaky_relu" else ""
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, act={self.act!r}{slope}"


# ---------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    from melano.infra.cli import setup_logging

    parser = argparse.ArgumentParser(prog="python -m melano.ops", description=(
        "Build the fused InstanceNorm+activation extension into its cache and print what was built "
        "as one JSON line. Environment: MELANO_BUILD_DIR (cache root, default ~/.cache/melano), "
        "CUDA_HOME (CUDA toolkit; default: found from nvcc on PATH), TORCH_CUDA_ARCH_LIST, "
        "MELANO_CUDA_BUILD=no (CPU only)."))
    parser.add_argument("command", choices=["build"], help="build: compile (or find cached) and load")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    parser.add_argument("--require-cuda", action="store_true",
                        help="exit 1 unless the CUDA kernels were built too (for GPU machines)")
    args = parser.parse_args(argv)
    setup_logging()
    info = build(verbose=args.verbose)
    out = dataclasses.asdict(info)
    out["backend"] = {"cpu": "ext" if info.ok else "eager",
                      "cuda": "ext" if info.ok and info.cuda else "eager"}
    print(json.dumps(out))
    if not info.ok:
        log.error("build failed: %s", info.error)
        return 1
    log.info("ready: %s in %.1f s (%s); CUDA kernels: %s", info.library, info.seconds,
             "cached" if info.cached else "compiled", info.cuda_reason if info.cuda else f"no ({info.cuda_reason})")
    if args.require_cuda and not info.cuda:
        log.error("--require-cuda: the CUDA kernels were not built: %s", info.cuda_reason)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
