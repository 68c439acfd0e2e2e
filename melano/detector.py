"""The melanoma classifier, the science: one logit per image, BCE-with-logits (optionally
weighting the positive class), one optimiser step (`train_step`), a model from a checkpoint
(`load_model`) and inference (`infer`). The model is melano.efficientnet; the trainer around it
is melano.classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import augment
from .efficientnet import efficientnet


class Normalise(torch.nn.Module):
    """[0, 1] images -> (x - mean) / std with the weights' statistics, in the model's memory format."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)


@dataclass
class Model:
    """The model and what trains it: normalisation, optimiser, loss weight, streams, precision."""
    model: torch.nn.Module           # validated and saved
    norm: Normalise
    opt: torch.optim.Optimizer
    pos_weight: torch.Tensor | None
    aug_gen: torch.Generator          # augmentation, on CPU: the same transforms on any device
    amp: Any                          # melano.infra.precision.Precision: autocast, backward, step, update
    net: torch.nn.Module | None = None  # what training runs: `model`, or `model` wrapped for DDP


def train_step(m: Model, batch: tuple[torch.Tensor, torch.Tensor], cfg) -> torch.Tensor:
    """One optimiser step on (images in [0, 1], targets); returns the loss (on the device: no sync)."""
    x, y = batch
    if cfg.augment == "traditional":
        x = augment.traditional(x, m.aug_gen)
    with m.amp.autocast():
        logits = (m.net or m.model)(m.norm(x)).squeeze(1).float()
    loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=m.pos_weight)
    m.opt.zero_grad(set_to_none=True)
    m.amp.backward(loss)
    m.amp.step(m.opt)
    m.amp.update()
    return loss.detach()


def load_model(state: dict, device: torch.device) -> tuple[torch.nn.Module, Normalise]:
    """The model (in eval mode) and its Normalise from a classifier checkpoint dict, on `device`."""
    model = efficientnet(state["arch"], num_classes=state["num_classes"])
    model.load_state_dict(state["model"])
    channels_last = state.get("channels_last", True)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, Normalise(state["mean"], state["std"], channels_last).to(device)


def views(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Test-time views of a (B, C, H, W) batch: 1 (itself), 4 (the flips: identity, horizontal,
    vertical, both) or 8 (the dihedral group: those and their transposes, i.e. the quarter turns
    and the two diagonal mirrors). A lesion has no up or left, so each view is as valid as the image."""
    flips = [x.flip(dims) for dims in ((), (3,), (2,), (2, 3))][:n]
    return flips + ([v.transpose(2, 3) for v in flips] if n == 8 else [])


@torch.inference_mode()
def infer(model: torch.nn.Module, norm: Normalise, loader, device: torch.device, tta: bool | int = False,
          amp_dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits, targets) of every image the loader yields, in its order; float64 numpy arrays.

    Logits stay on the device until the end (no per-batch sync). `tta`: the logit is the mean over
    `views` of the image: True or 4, the flips; 8, the dihedral group; False or 1, the image alone."""
    n_views = 4 if tta is True else int(tta) or 1
    if n_views not in (1, 4, 8):
        raise ValueError(f"tta: 1, 4 or 8 views, got {tta!r}")
    was_training = model.training
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        x = norm(x.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            z = torch.stack([model(v).float() for v in views(x, n_views)]).mean(0)
        logits.append(z.squeeze(1))
        targets.append(y)
    model.train(was_training)
    return (torch.cat(logits).double().cpu().numpy(), torch.cat(targets).double().numpy())


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))
