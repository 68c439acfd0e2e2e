"""Test oracle for melano.ops.instance_norm_act: the formulas written out in float64.

This is the one place where the op's mathematics is written down; the C++ and CUDA kernels
(csrc/) cite it instead of repeating it.

Forward, per (n, c) plane of x (N, C, H, W) with M = H * W elements:
    mean = sum(x) / M,   var = sum((x - mean)^2) / M   (biased),   rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd,   y_pre = xhat * w + b,   y = act(y_pre)
    act: none -> y_pre;  relu -> 0 where y_pre <= 0;  leaky_relu -> slope * y_pre where y_pre <= 0

Backward, with g = dy * act'(y_pre) (act' = 1 where y_pre > 0, else 0 for relu / slope for leaky):
    dbias = sum over n and the plane of g
    dweight = sum over n and the plane of g * xhat
    dx = rstd * w * (g - mean(g) - xhat * mean(g * xhat))      (means over the plane)

Derivation of dx. The loss reaches x_j through every xhat_i of its plane, with dL/dxhat_i = w g_i.
xhat_i depends on x_j directly and through mean and rstd:
    d mean / d x_j = 1 / M
    d var / d x_j  = 2 (x_j - mean) / M          (the term from d mean / d x_j is -2 sum_i (x_i - mean) / M^2 = 0)
    d rstd / d x_j = -rstd^3 / 2 * d var / d x_j = -rstd^3 (x_j - mean) / M = -rstd^2 xhat_j / M
    d xhat_i / d x_j = rstd (delta_ij - 1 / M) + (x_i - mean) d rstd / d x_j
                     = rstd (delta_ij - 1 / M - xhat_i xhat_j / M)
so dx_j = sum_i w g_i d xhat_i / d x_j = rstd * w * (g_j - mean(g) - xhat_j * mean(g * xhat)).

Why the backward recomputes y_pre from x, not from y. The kernels save x, mean and rstd and
recompute xhat and y_pre = xhat * w + b with exactly the forward's arithmetic, so act'(y_pre)
sees the sign the forward saw. Recovering y_pre from y instead would need a division by w
(undefined at w = 0) and loses the sign where relu output 0.

Nothing here calls F.instance_norm: the oracle is independent of the composed PyTorch path.
"""

from __future__ import annotations

import torch


def _params(x64, weight, bias):
    c = x64.shape[1]
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight.detach().double().cpu()
    b = torch.zeros(c, dtype=torch.float64) if bias is None else bias.detach().double().cpu()
    return w.view(1, c, 1, 1), b.view(1, c, 1, 1)


def _normalise(x, eps):
    x64 = x.detach().double().cpu()
    mean = x64.mean(dim=(2, 3), keepdim=True)
    var = ((x64 - mean) ** 2).mean(dim=(2, 3), keepdim=True)
    rstd = 1.0 / torch.sqrt(var + eps)
    return x64, mean, rstd, (x64 - mean) * rstd


def forward(x, weight=None, bias=None, eps=1e-5, act="relu", negative_slope=0.01):
    """Returns (y, mean, rstd) in float64 on the CPU; mean and rstd have shape (N, C)."""
    x64, mean, rstd, xhat = _normalise(x, eps)
    w, b = _params(x64, weight, bias)
    y_pre = xhat * w + b
    if act == "relu":
        y = torch.where(y_pre <= 0, torch.zeros_like(y_pre), y_pre)  # NaN stays NaN, as in F.relu
    elif act == "leaky_relu":
        y = torch.where(y_pre > 0, y_pre, y_pre * negative_slope)
    elif act == "none":
        y = y_pre
    else:
        raise ValueError(f"unknown act {act!r}")
    return y, mean.flatten(1), rstd.flatten(1)


def backward(grad_y, x, weight=None, bias=None, eps=1e-5, act="relu", negative_slope=0.01, positive=None):
    """Returns (dx, dweight, dbias) in float64 on the CPU.

    `positive` (bool, shape of x) overrides the mask y_pre > 0. A test passes the mask of the kernel it
    checks (from the sign of that kernel's output), so that an element whose float32 y_pre lies within
    rounding of 0 is differentiated on the same side of the activation's kink by both.
    """
    x64, mean, rstd, xhat = _normalise(x, eps)
    w, b = _params(x64, weight, bias)
    y_pre = xhat * w + b
    dy = grad_y.detach().double().cpu()
    if positive is not None:
        pos = positive.cpu().bool()
    elif act == "relu":
        pos = ~(y_pre <= 0)  # threshold_backward passes the gradient where y_pre is NaN
    else:
        pos = y_pre > 0  # leaky_relu_backward applies the slope there
    if act == "relu":
        g = torch.where(pos, dy, torch.zeros_like(dy))
    elif act == "leaky_relu":
        g = torch.where(pos, dy, dy * negative_slope)
    elif act == "none":
        g = dy
    else:
        raise ValueError(f"unknown act {act!r}")
    dbias = g.sum(dim=(0, 2, 3))
    dweight = (g * xhat).sum(dim=(0, 2, 3))
    mean_g = g.mean(dim=(2, 3), keepdim=True)
    mean_gx = (g * xhat).mean(dim=(2, 3), keepdim=True)
    dx = rstd * w * (g - mean_g - xhat * mean_gx)
    return dx, dweight, dbias
