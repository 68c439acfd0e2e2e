"""Learning-rate schedules, each a pure function of the position (so a resumed run needs no
scheduler state), and the one way a trainer sets the rate."""

from __future__ import annotations

import math

import torch


def linear_decay(epoch: int, epochs: int, epochs_decay: int) -> float:
    """The CycleGAN's: constant for `epochs` epochs, then linear decay towards zero over
    `epochs_decay` epochs. The original CycleGAN's 'linear' rule: epoch e (0-based) gets
    1 - max(0, e + 1 - epochs) / (epochs_decay + 1), so the last epoch runs at 1/(epochs_decay + 1)
    of the base rate and the next would be at zero."""
    return 1.0 - max(0, epoch + 1 - epochs) / float(epochs_decay + 1)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, schedule: str = "cosine") -> float:
    """The classifier's, per optimiser step `step` (0-based): linear warm-up from 1/warmup_steps
    to 1 over `warmup_steps` steps, then a half cosine down to 0 at `total_steps` ("cosine") or 1
    to the end ("constant")."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def set_lr(lr: float, *optimizers: torch.optim.Optimizer) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
