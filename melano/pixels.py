"""uint8 images <-> model tensors: the one conversion between stored pixels and a model's input.

Images are stored and decoded as (..., H, W, 3) uint8 (the caches, image files); models take
(..., 3, H, W) floats. Pixel 0 maps to `lo` and 255 to `hi`: [0, 1] for the classifier and the
quality encoder (which normalise after), [-1, 1] for the CycleGAN.
"""

from __future__ import annotations

import numpy as np
import torch


def to_tensor(images, lo: float = 0.0, hi: float = 1.0, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., H, W, 3) uint8, numpy or torch -> (..., 3, H, W) `dtype` on `device`, 0 -> lo, 255 -> hi.
    The scaling runs after the move, so a GPU does it."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    x = x.to(device) if device is not None else x
    return x.movedim(-1, -3).to(dtype).mul_((hi - lo) / 255).add_(lo)


def to_uint8(x: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """The inverse, rounded: (..., 3, H, W) floats in [lo, hi] -> (..., H, W, 3) uint8 numpy."""
    x = ((x.detach().float().clamp(lo, hi) - lo) * (255 / (hi - lo))).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()
