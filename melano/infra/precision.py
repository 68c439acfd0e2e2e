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


class Precision:
    """--amp as what a training step does with it: `autocast()` around the forward, `backward(loss)`
    (scaled under fp16), `step(opt)`, then `update()` once per iteration."""

    def __init__(self, amp: str, device: torch.device):
        self.dtype, self.scaler = amp_setup(amp, device)
        self.device_type = device.type

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, opt: torch.optim.Optimizer) -> None:  # under fp16: unscaled, and skipped on inf/NaN gradients
        self.scaler.step(opt) if self.scaler is not None else opt.step()

    def update(self) -> None:
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
