"""Traditional augmentation on batches: random flips, rotations and random resized crops.

This is the study's "traditional" baseline arm. It works on a float batch (B, C, H, W) on any
device, draws every sample's transform independently from a `torch.Generator`, and uses no
torchvision: all of one sample's transforms compose into a single 2x3 affine matrix, applied by
one `F.affine_grid` + `F.grid_sample`. The image is therefore resampled once, however many
transforms apply; flips and 90-degree turns alone hit pixel centres (exact up to float rounding).

Conventions (the same as torchvision's): a positive angle turns the image counter-clockwise;
a crop is chosen in the input image and then stretched to the full (H, W).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class AugmentConfig:
    hflip: float = 0.5                    # probability of a horizontal (left-right) flip
    vflip: float = 0.5                    # probability of a vertical (top-bottom) flip
    rot90: bool = True                    # turn by a uniformly random multiple of 90 degrees
    max_angle: float = 45.0               # then by a uniform angle in [-max_angle, max_angle] degrees
    crop_p: float = 0.5                   # probability of a random resized crop
    crop_scale: tuple[float, float] = (0.5, 1.0)     # crop area as a fraction of the image
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio (width / height)
    padding: str = "reflection"           # fills what rotates in: "reflection" | "border" | "zeros"
    mode: str = "bilinear"                # "bilinear" | "nearest"


def sample_params(batch: int, generator: torch.Generator | None = None,
                  cfg: AugmentConfig | None = None) -> dict[str, torch.Tensor]:
    """Draw each sample's transform. Returns tensors of length `batch` on the generator's device:
    hflip, vflip (bool), k (int, quarter turns), angle (degrees), crop (B, 4): centre x, centre y,
    width, height in normalised coordinates (the full image is 0, 0, 1, 1)."""
    cfg = cfg or AugmentConfig()
    dev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch, 8, generator=generator, device=dev, dtype=torch.float64)
    k = (u[:, 2] * 4).long().clamp_(max=3) if cfg.rot90 else torch.zeros(batch, dtype=torch.long, device=dev)
    angle = (u[:, 3] * 2 - 1) * cfg.max_angle
    # Random resized crop, vectorised: area and log-aspect uniform, clamped to fit (no retries).
    lo, hi = cfg.crop_scale
    area = lo + (hi - lo) * u[:, 4]
    log_r = math.log(cfg.crop_ratio[0]) + (math.log(cfg.crop_ratio[1]) - math.log(cfg.crop_ratio[0])) * u[:, 5]
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx, cy = (1 - w) * (u[:, 6] * 2 - 1), (1 - h) * (u[:, 7] * 2 - 1)
    no_crop = torch.rand(batch, generator=generator, device=dev, dtype=torch.float64) >= cfg.crop_p
    crop = torch.stack([cx, cy, w, h], 1)
    crop[no_crop] = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64, device=dev)
    return {"hflip": u[:, 0] < cfg.hflip, "vflip": u[:, 1] < cfg.vflip, "k": k, "angle": angle, "crop": crop}


def affine_matrices(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, 2, 3) float64 matrices for `F.affine_grid`: output coordinates -> input coordinates.

    Sampling point = crop_centre + crop_size * (rotate(-angle) @ quarter(-k) @ flips @ p_out).
    Quarter turns use exact integer matrices, so they stay exact when angle is 0.
    """
    b = params["k"].shape[0]
    dev = params["k"].device
    eye = torch.eye(2, dtype=torch.float64, device=dev).expand(b, 2, 2)
    flip = eye.clone()
    flip[:, 0, 0] = torch.where(params["hflip"], -1.0, 1.0)
    flip[:, 1, 1] = torch.where(params["vflip"], -1.0, 1.0)
    # Image axes: x right, y down. Turning the image counter-clockwise by t means sampling the
    # input at [[cos t, -sin t], [sin t, cos t]] @ p_out in these coordinates.
    quarter = torch.tensor([[[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]]],
                           dtype=torch.float64, device=dev)[params["k"]]
    t = params["angle"] * (math.pi / 180)
    c, s = torch.cos(t), torch.sin(t)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    lin = rot @ quarter @ flip
    crop = params["crop"]
    lin = torch.diag_embed(crop[:, 2:]) @ lin
    return torch.cat([lin, crop[:, :2, None]], 2)


def apply_affine(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear",
                 padding: str = "reflection") -> torch.Tensor:
    """Resample x (B, C, H, W) with per-sample matrices theta (B, 2, 3) (align_corners=False)."""
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=False)


def traditional(x: torch.Tensor, generator: torch.Generator | None = None,
                cfg: AugmentConfig | None = None, **overrides) -> torch.Tensor:
    """Randomly flip, rotate and crop each image of a float batch (B, C, H, W); same shape out.

    Each sample gets its own transform, drawn from `generator` (default: torch's global RNG).
    A CPU generator gives the same transforms whatever x's device. Keyword `overrides` replace
    fields of `cfg` (`AugmentConfig`), e.g. ``traditional(x, g, max_angle=0, crop_p=0)``.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float batch (B, C, H, W), got {tuple(x.shape)} {x.dtype}; "
                         f"convert uint8 images with x.float() first")
    cfg = dataclasses.replace(cfg or AugmentConfig(), **overrides)
    if x.shape[0] == 0:
        return x.clone()
    params = sample_params(x.shape[0], generator, cfg)
    return apply_affine(x, affine_matrices(params), cfg.mode, cfg.padding)


def study(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """The study's augmentation of CycleGAN's malignant images: a random horizontal and a random
    vertical flip, then a 90-degree rotation of every image (torchvision's RandomRotation((90, 90)))."""
    h, v = (torch.rand(len(x), generator=rng).lt(0.5).view(-1, 1, 1, 1).to(x.device) for _ in range(2))
    x = torch.where(h, x.flip(3), x)
    x = torch.where(v, x.flip(2), x)
    return x.rot90(1, dims=(2, 3))
