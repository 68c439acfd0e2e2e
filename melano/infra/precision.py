"""--amp: autocast dtype and gradient scaler."""

from __future__ import annotations

import torch

from .cli import UsageError


AMP_CHOICES = ("auto", "bf16", "fp16", "none")


def amp_setup(amp: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """--amp: (autocast dtype or None, GradScaler or None). auto is bf16 on CUDA where supported,
    else fp16, and full precision on CPU; fp16 needs a scaler, bf16 does not."""
    if amp == "auto":
        amp = "none" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device; use --amp bf16 or none on CPU")
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return dtype, torch.amp.GradScaler(device.type) if amp == "fp16" else None
