"""Fused InstanceNorm + activation, one custom op (C++ on CPU, CUDA on GPUs):

    y = act(instance_norm(x, weight, bias, eps)),   act in {"none", "relu", "leaky_relu"}

exactly `F.leaky_relu(F.instance_norm(x, weight=weight, bias=bias, eps=eps), slope)`: biased
variance, no running statistics; "relu" is slope 0 and "none" the identity. Eager PyTorch makes a
pass over memory for the statistics, one to normalise and one to activate (and as many backward);
the fused op reads x once and writes y once (a GPU plane too large for one block's registers is
read twice).

- Layout: the output has the input's memory format. A channels_last-contiguous input runs NHWC
  kernels (SIMD or coalesced across channels); any other layout runs the NCHW kernels on a
  contiguous copy (`kernel_layout`). The eager path returns what F.instance_norm returns: NCHW.
- Backward: the op saves x, mean and rstd (not y) and recomputes the pre-activation from x; the
  formulas, their derivation and why x rather than y are in reference/instance_norm_act.py. The
  activation's gradient follows F.relu / F.leaky_relu: 0 (or the slope) where y_pre <= 0. No
  double backward. The autograd is C++ (csrc/instance_norm_act_autograd.cpp): one dispatcher call
  per norm, forward or backward; this module adds the fake implementations torch.compile needs.
- MELANO_OPS, read at every call: auto (default) takes the compiled op where its library is loaded
  with a kernel for the device, else the eager path with one logged warning; ext the compiled op
  or an error saying what is missing; eager the composed PyTorch ops (`eager_instance_norm_act`).
  This module never builds: melano.infra.kernels.load() builds and loads the library (csrc/).
- Memory: on Linux the CPU op asks for 2 MiB pages for outputs (y, dx) of 32 MiB or more, which
  glibc maps afresh on every call; MELANO_HUGE_PAGES=0 turns that off (see csrc/).
"""

from __future__ import annotations

import logging
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("melano.ops")

ACTS = ("none", "relu", "leaky_relu")
MODES = ("auto", "ext", "eager")  # also in infra.kernels.ops_mode (science may not import plumbing)
OPS = ("melano::inorm_act_fwd", "melano::inorm_act_bwd")
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}  # device type -> the dispatch key of its kernels

_lock = threading.Lock()
_registered = False  # the fake implementations below
_ready: set[str] = set()  # device types with loaded kernels (a loaded library never goes away)
_warned: set[str] = set()  # the fallbacks already logged


# ----------------------------------------------------------------------------- registration

def kernel_layout(x: torch.Tensor) -> torch.memory_format:
    """The layout the compiled op reads and returns: channels_last for a channels_last-contiguous x
    (NHWC kernels), else contiguous_format. The same rule as kernel_layout in csrc/instance_norm_act.h."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _register_fakes() -> None:
    """Fake (meta) implementations, for torch.compile and opcheck. The autograd is C++ (csrc/)."""

    def like(x, shape):  # a tensor like x in the kernels' layout, and two accumulator-dtype ones
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (torch.empty_like(x, memory_format=kernel_layout(x)), x.new_empty(shape, dtype=acc),
                x.new_empty(shape, dtype=acc))

    @torch.library.register_fake("melano::inorm_act_fwd")
    def _fwd_fake(x, weight, bias, eps, act, negative_slope):  # y; mean and rstd (N, C)
        return like(x, (x.shape[0], x.shape[1]))

    @torch.library.register_fake("melano::inorm_act_bwd")
    def _bwd_fake(grad_y, x, weight, bias, mean, rstd, act, negative_slope):  # dx; dweight and dbias (C,)
        return like(x, (x.shape[1],))


# ----------------------------------------------------------------------------- backend selection

def backend(device: str | torch.device = "cpu") -> str:
    """"ext" or "eager": the path instance_norm_act takes for tensors on `device`. Never builds."""
    mode = os.environ.get("MELANO_OPS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"MELANO_OPS={mode!r} is not one of {', '.join(MODES)}")
    return "eager" if mode == "eager" else _compiled_or_eager(torch.device(device).type, mode)


@torch.compiler.assume_constant_result  # torch.compile runs it once as Python, not traced
def _compiled_or_eager(device_type: str, mode: str) -> str:
    global _registered
    if device_type in _ready:  # the common case
        return "ext"
    if not hasattr(torch.ops.melano, "inorm_act_fwd"):  # loading the library registers the op
        return _fall_back(mode, "load", "MELANO_OPS=ext but the fused kernel library is not loaded: call "
                          "melano.infra.kernels.load() first (it builds the library, or raises with the build "
                          "error; `python -m melano.ops build --verbose` shows a build)",
                          "melano.ops: the fused kernel library is not loaded (melano.infra.kernels.load() "
                          "loads it), so the eager PyTorch path is used; set MELANO_OPS=eager to choose it")
    with _lock:
        if not _registered:
            _register_fakes()
            _registered = True
    key = DISPATCH_KEYS.get(device_type)
    if key is not None and all(torch._C._dispatch_has_kernel_for_dispatch_key(op, key) for op in OPS):
        _ready.add(device_type)
        return "ext"
    why = ("the library was built without its CUDA kernels; `python -m melano.ops build` says why"
           if device_type == "cuda" else f"no {device_type} kernel exists")
    return _fall_back(mode, device_type,
                      f"MELANO_OPS=ext but the fused kernel has no {device_type} implementation: {why}",
                      f"melano.ops: no fused kernel for {device_type} tensors ({why}); using the eager "
                      "PyTorch path for them")


def _fall_back(mode: str, key: str, ext_error: str, warning: str) -> str:
    """The eager path, warning once per key; with MELANO_OPS=ext, a RuntimeError instead."""
    if mode == "ext":
        raise RuntimeError(ext_error)
    if key not in _warned:
        _warned.add(key)
        log.warning(warning)
    return "eager"


# ----------------------------------------------------------------------------- the op

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
    and no-activation forms; also takes an unbatched (C, H, W) input. With affine=True the parameters
    are `weight` (ones) and `bias` (zeros): nn.InstanceNorm2d's `0.weight`/`0.bias` map to them."""

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
