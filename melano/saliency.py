"""Where a classifier looks: Grad-CAM (Selvaraju et al., ICCV 2017) and two measures of how much
of a map falls on a known region (the lesion).

Grad-CAM weights each channel k of a convolutional layer's activation A_k (h x w) by the mean
gradient of the class score y over its positions, alpha_k = mean_ij dy/dA_kij, and keeps the
positive part of the weighted sum, ReLU(sum_k alpha_k A_k), upsampled to the image. For a network
that ends in global average pooling and a linear layer (EfficientNet), alpha_k = w_k / (h w), so
Grad-CAM of its last stage is the class activation map of Zhou et al. (CVPR 2016), scaled.

    cams, logits = grad_cam(model, model.head, x)        # (N, H, W), (N,)
    energy_share(cams, masks), pointing_game(cams, masks)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grad_cam(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, index: int = 0,
             sign: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps (N, H, W) >= 0 at x's size, the logits (N,) of output `index`) for a batch `x` that
    `model` takes as it is (normalise first). `layer` is the convolutional module whose output
    (N, C, h, w) is weighed: for melano's EfficientNet, ``model.head``. The score explained is
    sign x logit: a one-logit binary classifier's other class (benign) has the score -logit, so
    sign -1 (per image, an (N,) tensor, or for all) maps the evidence for it. Run outside
    torch.inference_mode: the map needs a gradient. Each image's score depends on its own
    activations only (eval mode), so one backward pass of the summed scores serves the batch."""
    captured = []
    x = x.detach().requires_grad_(True)  # a graph even when the weights are frozen
    hook = layer.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        with torch.enable_grad():
            logits = model(x)[:, index].float()
            act = captured[-1]
            grads, = torch.autograd.grad((logits * sign).sum(), act)
    finally:
        hook.remove()
    alpha = grads.float().mean((2, 3), keepdim=True)               # (N, C, 1, 1): channel weights
    cam = F.relu((alpha * act.detach().float()).sum(1, keepdim=True))  # (N, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return cam[:, 0].clamp_min(0), logits.detach()


def energy_share(cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N,) share of each map's mass inside its mask (soft masks weigh each pixel by their value);
    a map spread evenly scores the mask's share of the image (`area_share`). An all-zero map: NaN."""
    cams, masks = cams.double(), masks.double()
    return (cams * masks).sum((1, 2)) / cams.sum((1, 2))


def area_share(masks: torch.Tensor) -> torch.Tensor:
    """(N,) the share of the image each mask covers: what `energy_share` gives a map that ignores it."""
    return masks.double().mean((1, 2))


def pointing_game(cams: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(N,) bool: does each map's maximum fall inside its mask (mask > threshold)? Zhang et al.
    (ECCV 2016); ties go to the first maximum in row-major order."""
    n = cams.shape[0]
    peak = cams.reshape(n, -1).argmax(1)
    return masks.reshape(n, -1).gather(1, peak[:, None])[:, 0] > threshold


def normalise(cams: torch.Tensor) -> torch.Tensor:
    """Each map divided by its maximum (an all-zero map stays zero): [0, 1], for drawing."""
    peak = cams.reshape(cams.shape[0], -1).amax(1).clamp_min(1e-12)
    return cams / peak[:, None, None]
