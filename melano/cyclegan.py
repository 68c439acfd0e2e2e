"""CycleGAN: turn benign lesions (domain A) into malignant ones (domain B).

One file, top to bottom: config, models, losses and label smoothing, image pool, learning-rate
schedule, the training step (`train_step`), data order, checkpoints, the trainer (`train`), CLI.
Translation into a synthetic data set is `melano.translate`; the loss log and plots are in
`melano.report`; run plumbing (options, resume, signals, RNG) is `melano.infra`.

The models follow the original CycleGAN (junyanz/pytorch-CycleGAN-and-pix2pix): a ResNet
generator and a 70x70 PatchGAN discriminator with InstanceNorm(affine=False) and biased convs.
Every InstanceNorm (+ activation) is melano.ops.InstanceNormAct, the fused op; MELANO_OPS=eager
selects the plain PyTorch path for the same module.

Naming follows the original CycleGAN: G_A maps A -> B and D_A judges B images (real B vs G_A's fakes);
G_B maps B -> A and D_B judges A images.

Resuming is exact: a checkpoint holds the four models, both Adam states, the image pools, the RNG
states (torch tensors only, so it loads with weights_only=True) and the position in the data order,
which is a pure function of (seed, epoch). On CPU, `--max-steps 3` then `--max-steps 6 --resume`
gives the same weights, bit for bit, as one `--max-steps 6` run.

    python -m melano.cyclegan train --data DIR --out DIR [--size 128] [--max-steps N] [--resume] ...
    python -m melano.cyclegan translate --checkpoint PATH --data DIR --out DIR [--limit N]
    torchrun --nproc-per-node K -m melano.cyclegan train ...   # K processes (GPUs); see melano.infra.dist
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as mdata
from . import report
from .ops import InstanceNormAct
from .infra import checkpoints, cli, dist, options, outdir, precision, signals
from .infra.cli import log_config, progress, setup_logging
from .infra.options import option

log = logging.getLogger("melano.cyclegan")

FORMAT = "melano.cyclegan"    # the format marker of every checkpoint written here
CHECKPOINT = "checkpoint.pt"  # the latest checkpoint in a run folder; --resume reads it


# ----------------------------------------------------------------------------- config

@dataclass
class CycleGANConfig:
    data: str = option("", "ISIC-layout folder (train.csv + images) or synthetic folder; its training split is used")
    out: str = option("", "run folder: config.json, losses.csv/png, samples/, checkpoint.pt, splits.csv")
    split_csv: str | None = option(None, "patient-grouped split file; used as is when it exists, else drawn "
                                         "(seeded by --seed) and written there. none: <out>/splits.csv")
    cache_dir: str | None = option(None, "folder of melano.data's uint8 image caches. none: <out>/cache")
    size: int = option(128, "image side in pixels (multiple of 4, >= 32)", min=32)
    # models
    ngf: int = option(64, "generator base width", min=1)
    ndf: int = option(64, "discriminator base width", min=1)
    n_blocks: int | None = option(None, "generator residual blocks. none: 9 at >= 256 px, else 6", min=0)
    n_layers: int = option(3, "PatchGAN conv layers (3 = 70x70 patches)", min=1)
    upsample: str = option("transpose", "generator upsampling: transpose (original CycleGAN), nearest (nearest + "
                                        "reflection-padded conv) or nearest_zero (nearest + zero-padded conv, the "
                                        "study's)", choices=("transpose", "nearest", "nearest_zero"))
    gen_act: str = option("relu", "generator activation: relu (original CycleGAN) or leaky (LeakyReLU 0.01, the "
                                  "study's label-smoothing arm)", choices=("relu", "leaky"))
    residual: bool = option(False, "the generator learns a change to its input, tanh(atanh(x) + G(x)), with "
                                   "its last conv zero-initialised: training starts from the identity (the "
                                   "quick preset's; the original CycleGAN maps images directly)")
    disc: str = option("patchgan", "discriminator: patchgan (the original CycleGAN's, 70x70 patches with --n-layers 3) "
                                   "or study (4 stride-2 blocks, a 14x14 map at 224 px)", choices=("patchgan", "study"))
    init: str = option("normal", "weight init: normal (N(0, 0.02), the original CycleGAN's) or default (PyTorch's, the "
                                 "study's)", choices=("normal", "default"))
    # losses
    gan_mode: str = option("lsgan", "adversarial loss: lsgan (MSE) or vanilla (BCE with logits)",
                           choices=("lsgan", "vanilla"))
    label_smoothing: str = option("none", "none; one-sided (real targets 0.9 for D); noisy (the study's 'label "
                                          "smoothing': targets 1+0.3N(0,1) and 0.3N(0,1) each step, for D and G)",
                                  choices=("none", "one-sided", "noisy"))
    lambda_cycle: float = option(10.0, "weight of the cycle L1 loss", min=0)
    lambda_identity: float = option(0.5, "identity L1 weight, as a fraction of lambda_cycle (0 disables)", min=0)
    pool_size: int = option(50, "generated-image history per discriminator (0 disables)", min=0)
    pairing: str = option("longest", "an epoch: longest (every image of the larger domain once, the original CycleGAN's) "
                                     "or malignant (every malignant image once, each with a random benign one, "
                                     "the study's)", choices=("longest", "malignant"))
    augment_b: str = option("none", "augmentation of the malignant images: none, or study (random horizontal "
                                    "and vertical flips, then a 90-degree rotation of every image)",
                            choices=("none", "study"))
    # optimisation
    lr: float = option(2e-4, "Adam learning rate", min=0, min_open=True)
    beta1: float = option(0.5, "Adam beta1", min=0, max=0.999999)
    beta2: float = option(0.999, "Adam beta2", min=0, max=0.999999)
    batch_size: int = option(1, "images per domain per step and process (under torchrun the global batch "
                                "is processes x this)", min=1)
    epochs: int = option(100, "epochs at constant learning rate", min=0)
    epochs_decay: int = option(100, "epochs of linear decay to zero after that", min=0)
    max_steps: int | None = option(None, "stop after this many steps in total, counting steps before --resume. "
                                         "none: the schedule's end", min=1)
    amp: str = option("auto", "CUDA mixed precision: auto (bf16 if supported, else fp16), bf16, fp16 or none",
                      choices=precision.AMP_CHOICES)
    channels_last: bool = option(False, "NHWC memory format for models and images: on CPU about 1.15x faster "
                                        "per step for small models (48 px, ngf 16), no faster from 64 px, ngf 32 "
                                        "up (bench/bench_cyclegan.py)")
    device: str | None = option(None, "cpu, cuda, cuda:1, ... none: CUDA when available")
    seed: int = option(0, "seed for init, data order, label noise and image pools")
    workers: int | None = option(None, "DataLoader worker processes. none: 0 on <= 4 cores, else up to 8", min=0)
    # outputs
    sample_every: int = option(500, "steps between sample grids (real A | fake B | rec A | real B | fake A | "
                                    "rec B)", min=1)
    checkpoint_every: int = option(1000, "steps between checkpoints (one is always written at the end)", min=1)
    n_samples: int = option(4, "rows in each sample grid", min=1)
    resume: bool = option(False, "continue from <out>/checkpoint.pt (starts fresh if there is none)")
    force: bool = option(False, "write into an --out that holds an earlier run or other files (starts afresh)")

    def __post_init__(self):
        options.check_options(self)
        if self.size % 4:
            raise cli.UsageError(f"--size {self.size}: the generator needs a multiple of 4 (>= 32 px)")
        if self.epochs + self.epochs_decay < 1:
            raise cli.UsageError("--epochs + --epochs-decay must be at least 1")
        if self.n_blocks is None:
            self.n_blocks = 9 if self.size >= 256 else 6



# Fields that may change between a run and its --resume; every other one must match.
RESUMABLE = {"max_steps", "device", "workers", "sample_every", "checkpoint_every", "n_samples", "resume", "force"}


# ----------------------------------------------------------------------------- models

class ResnetBlock(nn.Module):
    """x + (pad, conv3x3, IN+act, pad, conv3x3, IN). The second norm has no activation."""

    def __init__(self, dim: int, act: str, slope: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True),
            InstanceNormAct(dim, act=act, negative_slope=slope),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True),
            InstanceNormAct(dim, act="none"))

    def forward(self, x):
        return x + self.block(x)


class Generator(nn.Module):
    """ResNet generator: 7x7 stem, two stride-2 downsamplings, n_blocks residual blocks, two
    upsamplings, 7x7 conv, tanh. Convs have bias=True because InstanceNorm(affine=False) has no
    shift of its own (the original CycleGAN's use_bias rule)."""

    def __init__(self, ngf: int = 64, n_blocks: int = 9, upsample: str = "transpose", act: str = "relu",
                 residual: bool = False, in_ch: int = 3, out_ch: int = 3):
        super().__init__()
        self.residual = residual
        a, slope = ("relu", 0.0) if act == "relu" else ("leaky_relu", 0.01)
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_ch, ngf, 7, bias=True),
                  InstanceNormAct(ngf, act=a, negative_slope=slope)]
        for mult in (1, 2):  # downsample: ngf -> 2 ngf -> 4 ngf
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=True),
                       InstanceNormAct(ngf * mult * 2, act=a, negative_slope=slope)]
        layers += [ResnetBlock(ngf * 4, a, slope) for _ in range(n_blocks)]
        for mult in (4, 2):  # upsample: 4 ngf -> 2 ngf -> ngf
            cin, cout = ngf * mult, ngf * mult // 2
            if upsample == "transpose":
                layers += [nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=True)]
            elif upsample == "nearest":  # no checkerboard artefacts; same parameter count
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1),
                           nn.Conv2d(cin, cout, 3, bias=True)]
            elif upsample == "nearest_zero":  # the study's: zero padding darkens the borders a little
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1, bias=True)]
            else:
                raise ValueError(f"upsample={upsample!r}: choose 'transpose', 'nearest' or 'nearest_zero'")
            layers += [InstanceNormAct(cout, act=a, negative_slope=slope)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_ch, 7, bias=True)]
        self.model = nn.Sequential(*layers, *([] if residual else [nn.Tanh()]))

    def zero_last(self) -> None:
        """Zero the last conv: a residual generator then starts as the identity."""
        nn.init.zeros_(self.model[-1].weight)
        nn.init.zeros_(self.model[-1].bias)

    def forward(self, x):
        if not self.residual:
            return self.model(x)
        # The change is added before the tanh, so the output stays in (-1, 1); the clamp keeps
        # atanh finite on saturated (0 or 255) pixels.
        return torch.tanh(torch.atanh(x.clamp(-0.999, 0.999)) + self.model(x))


class Discriminator(nn.Module):
    """PatchGAN: 4x4 convs, LeakyReLU(0.2), no norm on the first layer, logits out (no sigmoid).
    n_layers=3 gives each output a 70x70 receptive field."""

    def __init__(self, ndf: int = 64, n_layers: int = 3, in_ch: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_ch, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last norm layer keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=True),
                       InstanceNormAct(ndf * mult, act="leaky_relu", negative_slope=0.2)]
        layers += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class StudyDiscriminator(nn.Module):
    """The study's PatchGAN: four 4x4 stride-2 blocks (64, 128, 256, 512 channels; no norm in the
    first; LeakyReLU 0.2), a one-pixel zero pad on the top and left, and a 4x4 conv to one logit
    map: size / 16 per side, 14x14 at 224 px (a 94x94 receptive field)."""

    def __init__(self, ndf: int = 64, in_ch: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_ch, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for mult in (1, 2, 4):
            layers += [nn.Conv2d(ndf * mult, ndf * mult * 2, 4, stride=2, padding=1),
                       InstanceNormAct(ndf * mult * 2, act="leaky_relu", negative_slope=0.2)]
        layers += [nn.ZeroPad2d((1, 0, 1, 0)), nn.Conv2d(ndf * 8, 1, 4, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """N(0, 0.02) conv weights and zero biases, as the original CycleGAN's 'normal' init."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_models(cfg: CycleGANConfig) -> nn.ModuleDict:
    """G_A, G_B, D_A, D_B, initialised from the global torch RNG (seed it first)."""
    g = lambda: Generator(cfg.ngf, cfg.n_blocks, cfg.upsample, cfg.gen_act, cfg.residual)  # noqa: E731
    d = lambda: Discriminator(cfg.ndf, cfg.n_layers) if cfg.disc == "patchgan" else StudyDiscriminator(cfg.ndf)  # noqa: E731
    models = nn.ModuleDict({"G_A": g(), "G_B": g(), "D_A": d(), "D_B": d()})
    if cfg.init == "normal":
        init_weights(models)
    if cfg.residual:
        models["G_A"].zero_last()
        models["G_B"].zero_last()
    return models


# ----------------------------------------------------------------------------- losses

def gan_loss(logits: torch.Tensor, target: torch.Tensor, mode: str) -> torch.Tensor:
    """LSGAN: mean squared error to the target. Vanilla: binary cross-entropy with logits."""
    target = target.expand_as(logits).to(logits.dtype)
    if mode == "lsgan":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


def make_targets(shape: torch.Size | tuple, mode: str, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets for one iteration: (D on real, D on fake, G's adversarial "this is real").

    - "none": 1, 0, 1.
    - "one-sided": 0.9, 0, 1. One-sided label smoothing (Salimans et al. 2016, "Improved
      techniques for training GANs"): only the discriminator's real targets are softened; the
      generator still aims at 1.
    - "noisy": what the study called "label smoothing". Each iteration draws real targets
      1 + 0.3 N(0, 1) and fake targets 0 + 0.3 N(0, 1), one value per discriminator output
      (per patch), and the same real draw is the generator's target. This is NOT the label
      smoothing of Salimans et al.: it is noisy labels, symmetric and unbounded (targets above 1
      and below 0 occur), which also perturbs the generator's objective. With gan_mode="vanilla"
      (BCE) targets outside [0, 1] make the loss unbounded below; use it with LSGAN.
    """
    if mode == "none":
        real, fake = torch.ones(shape), torch.zeros(shape)
    elif mode == "one-sided":
        real, fake = torch.full(shape, 0.9), torch.zeros(shape)
    elif mode == "noisy":
        real = 1.0 + 0.3 * torch.randn(shape, generator=generator)
        fake = 0.0 + 0.3 * torch.randn(shape, generator=generator)
    else:
        raise ValueError(f"label_smoothing={mode!r}: choose 'none', 'one-sided' or 'noisy'")
    g_real = real if mode == "noisy" else torch.ones(shape)
    return real.to(device), fake.to(device), g_real.to(device)


# ----------------------------------------------------------------------------- image pool

class ImagePool:
    """History of generated images (Shrivastava et al. 2017), as in the original CycleGAN: until the pool is
    full, each image is stored and returned; after that, with probability 1/2 the image is swapped
    with a random stored one, which is returned instead. Randomness comes from `generator` (a CPU
    torch.Generator) so the pool's choices are part of the checkpointed RNG state."""

    def __init__(self, size: int, generator: torch.Generator):
        self.size, self.generator, self.images = size, generator, []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for img in images.detach():
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif torch.rand((), generator=self.generator).item() > 0.5:
                i = int(torch.randint(self.size, (), generator=self.generator))
                out.append(self.images[i])
                self.images[i] = img.clone()
            else:
                out.append(img)
        return torch.stack(out)

    def state_dict(self) -> dict:
        # a plain tensor, so checkpoints load with weights_only=True
        return {"images": torch.stack(self.images).cpu() if self.images else torch.empty(0)}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        imgs = state["images"]
        self.images = [t.to(device) for t in imgs.unbind(0)] if imgs.numel() else []


# ----------------------------------------------------------------------------- lr schedule

def lr_factor(epoch: int, epochs: int, epochs_decay: int) -> float:
    """Constant for `epochs` epochs, then linear decay towards zero over `epochs_decay` epochs.
    The original CycleGAN's 'linear' rule: epoch e (0-based) gets 1 - max(0, e + 1 - epochs) / (epochs_decay + 1),
    so the last epoch runs at 1/(epochs_decay + 1) of the base rate and the next would be at zero."""
    return 1.0 - max(0, epoch + 1 - epochs) / float(epochs_decay + 1)


# ----------------------------------------------------------------------------- training step

def set_requires_grad(modules, flag: bool) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(flag)


def train_step(m: nn.ModuleDict, opt_G: torch.optim.Optimizer, opt_D: torch.optim.Optimizer,
               pool_A: ImagePool, pool_B: ImagePool, real_A: torch.Tensor, real_B: torch.Tensor,
               cfg: CycleGANConfig, rng: torch.Generator, scaler: torch.amp.GradScaler | None = None,
               amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """One CycleGAN iteration, in the original CycleGAN's order: the generators step with both
    discriminators frozen, then the discriminators step on real images and pooled fakes.

    Returns the losses as floats (weighted, as they enter the totals)."""
    autocast = torch.autocast(real_A.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    scale = scaler.scale if scaler is not None else (lambda loss: loss)  # fp16: scaled backward
    step = scaler.step if scaler is not None else (lambda opt: opt.step())

    # ---- generators: fool the (frozen) discriminators, cycle back, keep identity --------------
    # Under DDP (see melano.infra.dist) each generator runs several forwards here (G_A on real_A, fake_A
    # and, for identity, real_B) and one backward covers them all: DDP all-reduces each parameter's
    # summed gradient once (tests/test_dist.py checks it against one process on the whole batch).
    # The frozen discriminators run unwrapped: nothing of theirs is to be all-reduced in this step,
    # and changing requires_grad after DDP wrapped a module is outside DDP's documented use
    # (find_unused_parameters=True would instead cost a graph traversal every step).
    set_requires_grad([m["D_A"], m["D_B"]], False)
    opt_G.zero_grad(set_to_none=True)
    with autocast:
        fake_B = m["G_A"](real_A)       # A -> B
        rec_A = m["G_B"](fake_B)        # A -> B -> A
        fake_A = m["G_B"](real_B)       # B -> A
        rec_B = m["G_A"](fake_A)        # B -> A -> B
        pred_fake_B, pred_fake_A = dist.unwrap(m["D_A"])(fake_B), dist.unwrap(m["D_B"])(fake_A)
        t_real, t_fake, t_gen = make_targets(pred_fake_B.shape, cfg.label_smoothing, rng, real_A.device)
        loss = {"G_A": gan_loss(pred_fake_B, t_gen, cfg.gan_mode),
                "G_B": gan_loss(pred_fake_A, t_gen, cfg.gan_mode),
                "cycle_A": F.l1_loss(rec_A, real_A) * cfg.lambda_cycle,
                "cycle_B": F.l1_loss(rec_B, real_B) * cfg.lambda_cycle}
        if cfg.lambda_identity > 0:  # G_A fed a B image should leave it alone, and vice versa
            w = cfg.lambda_cycle * cfg.lambda_identity
            loss["idt_A"] = F.l1_loss(m["G_A"](real_B), real_B) * w
            loss["idt_B"] = F.l1_loss(m["G_B"](real_A), real_A) * w
        loss_G = sum(loss.values())
    scale(loss_G).backward()
    step(opt_G)

    # ---- discriminators: real vs pooled fakes, each loss halved ------------------------------
    set_requires_grad([m["D_A"], m["D_B"]], True)
    opt_D.zero_grad(set_to_none=True)
    pooled_B, pooled_A = pool_B.query(fake_B.detach()), pool_A.query(fake_A.detach())
    with autocast:
        loss["D_A"] = 0.5 * (gan_loss(m["D_A"](real_B), t_real, cfg.gan_mode)
                             + gan_loss(m["D_A"](pooled_B), t_fake, cfg.gan_mode))
        loss["D_B"] = 0.5 * (gan_loss(m["D_B"](real_A), t_real, cfg.gan_mode)
                             + gan_loss(m["D_B"](pooled_A), t_fake, cfg.gan_mode))
    scale(loss["D_A"] + loss["D_B"]).backward()
    step(opt_D)
    if scaler is not None:
        scaler.update()
    return {k: float(v.detach()) for k, v in loss.items()}


# ----------------------------------------------------------------------------- outputs

def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def save_samples(m: nn.ModuleDict, A: torch.Tensor, B: torch.Tensor, path: Path,
                 amp_dtype: torch.dtype | None) -> None:
    """One grid row per sample: real A | fake B | rec A | real B | fake A | rec B."""
    with torch.autocast(A.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        fake_B, fake_A = m["G_A"](A), m["G_B"](B)
        rec_A, rec_B = m["G_B"](fake_B), m["G_A"](fake_A)
    tiles = [to_uint8(t) for t in (A, fake_B, rec_A, B, fake_A, rec_B)]
    report.image_grid([[col[i] for col in tiles] for i in range(len(A))], path)


# ----------------------------------------------------------------------------- data

def load_split_data(data_dir: str | Path, size: int, cache_dir: str | Path, split_csv: str | Path,
                    seed: int = 0) -> tuple[mdata.Index, mdata.Cache, dict[str, list[str]]]:
    """The folder's index, its uint8 cache at `size`, and its patient-grouped split.

    An existing `split_csv` is used as is (melano.data checks that it lists exactly the cached
    images), so every stage of an experiment sees the same split; otherwise a split is drawn with
    melano.data's default fractions, seeded by `seed`, and written there."""
    index = mdata.read_index(data_dir)
    cache = mdata.build_cache(index, size, cache_dir)
    if Path(split_csv).exists():
        split = mdata.load_split(split_csv, cache)
    else:
        split = mdata.make_split(cache, split_csv, seed=seed)
    return index, cache, split


class MalignantPairs(mdata.UnpairedDataset):
    """The study's epoch: every malignant (B) image once, each with a benign (A) image drawn at
    random (with replacement, seeded by (seed, epoch))."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._pick_a = np.random.default_rng([self.seed, epoch, 1]).integers(len(self.rows_a), size=len(self.rows_b))

    def __len__(self) -> int:
        return len(self.rows_b)

    def __getitem__(self, i: int) -> dict:
        a, b = int(self.rows_a[self._pick_a[i]]), int(self.rows_b[i])
        return {"A": self._image(a), "B": self._image(b), "a_row": a, "b_row": b}


def augment_study(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """The study's malignant-image augmentation: a random horizontal and a random vertical flip,
    then a 90-degree rotation of every image (torchvision's RandomRotation((90, 90)))."""
    h, v = (torch.rand(len(x), generator=rng).lt(0.5).view(-1, 1, 1, 1).to(x.device) for _ in range(2))
    x = torch.where(h, x.flip(3), x)
    x = torch.where(v, x.flip(2), x)
    return x.rot90(1, dims=(2, 3))


class TrainData:
    """Training-split benign (A) and malignant (B) images, in an order that can be resumed.

    Epoch e visits A in `dist.epoch_order(seed, e)`; melano.data's UnpairedDataset pairs each with
    a B drawn through its own (seed, e) permutation. Nothing depends on how many batches were drawn
    before, so `batches(e, skip=k)` after a restart yields exactly what an uninterrupted run would
    have yielded after its first k batches of epoch e. Under torchrun each rank takes its shard,
    so an epoch has ceil(len / (world_size x batch_size)) steps."""

    def __init__(self, cfg: CycleGANConfig):
        self.cfg = cfg
        _, self.cache, split = load_split_data(cfg.data, cfg.size, mdata.cache_path(cfg), mdata.split_path(cfg), cfg.seed)
        rows = self.cache.rows(split["train"])
        t = self.cache.targets[rows]
        self.rows_A, self.rows_B = rows[t == 0], rows[t == 1]
        if len(self.rows_A) == 0 or len(self.rows_B) == 0:
            raise cli.UsageError(f"{cfg.data}: the training split of {mdata.split_path(cfg)} has {len(self.rows_A)} "
                                 f"benign and {len(self.rows_B)} malignant images; CycleGAN needs both")
        self.n_A, self.n_B = len(self.rows_A), len(self.rows_B)
        pairs = MalignantPairs if cfg.pairing == "malignant" else mdata.UnpairedDataset
        self.dataset = pairs(self.cache, self.rows_A, self.rows_B, seed=cfg.seed)
        self.steps_per_epoch = math.ceil(len(self.dataset) / (cfg.batch_size * dist.world_size()))

    def batches(self, epoch: int, skip: int = 0):
        """(real_A, real_B) batches of `epoch`, after the first `skip` batches."""
        self.dataset.set_epoch(epoch)
        order = dist.epoch_order(len(self.dataset), self.cfg.seed, epoch)[skip * self.cfg.batch_size:]
        loader = mdata.make_loader(self.dataset, self.cfg.batch_size, sampler=order,
                                   workers=self.cfg.workers, seed=self.cfg.seed)
        for item in loader:
            yield item["A"], item["B"]

    def samples(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n fixed A and n fixed B images (evenly spaced through the split) for sample grids."""
        pick = lambda rows: rows[np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int)]  # noqa: E731
        ds = mdata.UnpairedDataset(self.cache, pick(self.rows_A), pick(self.rows_B), seed=self.cfg.seed)
        items = [ds[i] for i in range(min(n, len(ds)))]
        return torch.stack([it["A"] for it in items]), torch.stack([it["B"] for it in items])


# ----------------------------------------------------------------------------- training state

@dataclass
class GAN:
    """Everything a checkpoint holds besides the position: models, optimisers, pools, streams."""
    models: nn.ModuleDict
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    pool_A: ImagePool
    pool_B: ImagePool
    rng: torch.Generator  # label noise and the image pools: each rank has its own stream


@dataclass
class Position:
    step: int = 0
    epoch: int = 0
    epoch_step: int = 0


def new_gan(cfg: CycleGANConfig, device: torch.device, scaler) -> GAN:
    torch.manual_seed(cfg.seed)  # model init: the same on every rank
    m = build_models(cfg).to(device)
    if cfg.channels_last:
        m = m.to(memory_format=torch.channels_last)
    adam = lambda a, b: torch.optim.Adam([*m[a].parameters(), *m[b].parameters()], lr=cfg.lr,  # noqa: E731
                                         betas=(cfg.beta1, cfg.beta2))
    rng = torch.Generator().manual_seed(dist.rank_seed(cfg.seed + 1))
    return GAN(m, adam("G_A", "G_B"), adam("D_A", "D_B"), scaler, ImagePool(cfg.pool_size, rng),
               ImagePool(cfg.pool_size, rng), rng)


def set_lr(gan: GAN, cfg: CycleGANConfig, epoch: int) -> None:
    """The schedule is a function of the epoch alone."""
    lr = cfg.lr * lr_factor(epoch, cfg.epochs, cfg.epochs_decay)
    for group in (*gan.opt_G.param_groups, *gan.opt_D.param_groups):
        group["lr"] = lr


def save_checkpoint(path: Path, cfg: CycleGANConfig, gan: GAN, pos: Position) -> None:
    """Collective: every rank's pools and streams are gathered, so a resumed run continues them
    all; rank 0 writes. No rank goes on before the checkpoint is complete."""
    own = {"pool_A": gan.pool_A.state_dict(), "pool_B": gan.pool_B.state_dict(), "rng": checkpoints.rng_state(gan.rng)}
    ranks = dist.all_gather_object(own)
    if dist.is_main():
        checkpoints.save_state({"config": dataclasses.asdict(cfg), **{k: v.state_dict() for k, v in gan.models.items()},
                        "opt_G": gan.opt_G.state_dict(), "opt_D": gan.opt_D.state_dict(),
                        "scaler": gan.scaler.state_dict() if gan.scaler is not None else {},
                        **own, **dataclasses.asdict(pos), "world_size": dist.world_size(),
                        **({"ranks": ranks} if dist.world_size() > 1 else {})}, path, FORMAT)
    dist.barrier()


def load_training_state(path: Path, cfg: CycleGANConfig, gan: GAN, device: torch.device) -> Position:
    """Restore `gan` from a checkpoint of the same config; return where to go on."""
    state = checkpoints.load_state(path, FORMAT, "melano CycleGAN checkpoint")
    checkpoints.check_resume(state["config"], cfg, RESUMABLE, path)
    checkpoints.check_world(state, path)
    for k, model in gan.models.items():
        model.load_state_dict(state[k])
    gan.opt_G.load_state_dict(state["opt_G"])
    gan.opt_D.load_state_dict(state["opt_D"])
    if gan.scaler is not None and state.get("scaler"):
        gan.scaler.load_state_dict(state["scaler"])
    own = state["ranks"][dist.rank()] if dist.world_size() > 1 else state
    gan.pool_A.load_state_dict(own["pool_A"], device)
    gan.pool_B.load_state_dict(own["pool_B"], device)
    checkpoints.set_rng_state(own["rng"], gan.rng)
    log.info("resumed from %s at step %d (epoch %d)", path, state["step"], state["epoch"])
    return Position(state["step"], state["epoch"], state["epoch_step"])


def config_from_checkpoint(state: dict) -> CycleGANConfig:
    names = {f.name for f in dataclasses.fields(CycleGANConfig)}
    return CycleGANConfig(**{k: v for k, v in state["config"].items() if k in names})


def load_generator(checkpoint: str | Path, which: str = "G_A",
                   device: torch.device | str = "cpu") -> tuple[Generator, CycleGANConfig]:
    """A trained generator (G_A: benign -> malignant) and the config it was trained with."""
    state = checkpoints.load_state(checkpoint, FORMAT, "melano CycleGAN checkpoint (checkpoint.pt of `melano.cyclegan train`)")
    cfg = config_from_checkpoint(state)
    g = Generator(cfg.ngf, cfg.n_blocks, cfg.upsample, cfg.gen_act, cfg.residual)
    g.load_state_dict(state[which])
    return g.to(device).eval(), cfg


def absolute_paths(cfg: CycleGANConfig) -> CycleGANConfig:
    """Paths made absolute (and defaults under --out made explicit), so that a checkpoint names
    the very split and cache it was trained with, whatever folder a later command runs from."""
    return dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()), out=str(Path(cfg.out).resolve()),
                               split_csv=str(mdata.split_path(cfg).resolve()), cache_dir=str(mdata.cache_path(cfg).resolve()))


# ----------------------------------------------------------------------------- trainer

def train(cfg: CycleGANConfig) -> Path:
    """Train a CycleGAN on the training split of cfg.data (benign = A, malignant = B).

    Writes into cfg.out: config.json, losses.csv, losses.png, samples/step_*.png, checkpoint.pt
    (every cfg.checkpoint_every steps, at the end, and on SIGINT/SIGTERM, which then raise
    signals.Stopped), and splits.csv and cache/ unless given elsewhere. With cfg.resume it continues
    from checkpoint.pt; an earlier run's folder is refused without --resume or --force (see
    melano.infra.outdir), and so is a folder another process is writing. Returns the checkpoint path.
    Under torchrun each process trains on its shard of every step with its own pools and label
    noise; DDP averages the gradients; only rank 0 writes files."""
    # ---- setup and resume: everything is checked before anything is written
    setup_logging()
    device = dist.init_from_env(cfg.device)
    cfg = absolute_paths(cfg)
    ckpt = Path(cfg.out) / CHECKPOINT
    if not Path(cfg.data).is_dir():
        raise cli.UsageError(f"--data {cfg.data}: not a folder (give an ISIC-layout or synthetic data folder)")
    amp_dtype, scaler = precision.amp_setup(cfg.amp, device)
    gan = new_gan(cfg, device, scaler)
    pos = load_training_state(ckpt, cfg, gan, device) if cfg.resume and ckpt.exists() else Position()
    checkpoints.agree_start(pos.step > 0, pos.step, ckpt)
    with outdir.claim(cfg.out, "cyclegan-train", force=cfg.force, resume=cfg.resume, data=[cfg.data],
                      rank=dist.rank()) as claim:
        return train_loop(cfg, gan, pos, claim, device, amp_dtype)


def train_loop(cfg: CycleGANConfig, gan: GAN, pos: Position, claim: outdir.Claim, device: torch.device,
               amp_dtype: torch.dtype | None) -> Path:
    """The training loop of `train`, in a claimed run folder; from `pos` to the schedule's end."""
    # ---- data, config, logs
    out, main, world = Path(cfg.out), dist.is_main(), dist.world_size()
    ckpt = out / CHECKPOINT
    with dist.local_main_first():  # one process per node builds the cache and draws the split
        data = TrainData(cfg)
    if main:
        for rel in ("config.json", CHECKPOINT, "losses.csv", "losses.png"):
            claim.record(rel)
        log_config({**dataclasses.asdict(cfg), "world_size": world, "global_batch_size": world * cfg.batch_size},
                   out / "config.json")
    log.info("training data: %d benign (A), %d malignant (B); %d steps per epoch of batch %d x %d processes; "
             "device %s, amp %s", data.n_A, data.n_B, data.steps_per_epoch, cfg.batch_size, world, device, amp_dtype)
    net = nn.ModuleDict({k: dist.wrap_ddp(v, device) for k, v in gan.models.items()})  # what train_step runs
    total = (cfg.epochs + cfg.epochs_decay) * data.steps_per_epoch
    total = min(total, cfg.max_steps or total)
    losses = report.LossLog(out / "losses.csv", pos.step) if main else None
    samples = [x.to(device) for x in data.samples(cfg.n_samples)]
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    # ---- loop: epochs of the resumable order; a checkpoint every checkpoint_every steps
    gan.models.train()
    t0, saved, stopped = time.monotonic(), pos.step, 0
    bar = progress(range(pos.step, total), total=total - pos.step, desc="cyclegan") if main else iter(())
    with signals.StopOnSignal() as stop:
        while pos.step < total and not stopped:
            if pos.epoch_step >= data.steps_per_epoch:  # epoch done: next learning rate
                pos.epoch, pos.epoch_step = pos.epoch + 1, 0
            set_lr(gan, cfg, pos.epoch)
            for real_A, real_B in data.batches(pos.epoch, skip=pos.epoch_step):
                real_A = real_A.to(device, non_blocking=True).contiguous(memory_format=fmt)
                real_B = real_B.to(device, non_blocking=True)
                if cfg.augment_b == "study":
                    real_B = augment_study(real_B, gan.rng)
                real_B = real_B.contiguous(memory_format=fmt)
                loss = dist.mean(train_step(net, gan.opt_G, gan.opt_D, gan.pool_A, gan.pool_B, real_A, real_B,
                                            cfg, gan.rng, gan.scaler, amp_dtype))  # the global batch's losses
                pos.step, pos.epoch_step = pos.step + 1, pos.epoch_step + 1
                next(bar, None)
                if main:
                    losses.append({"step": pos.step, "epoch": pos.epoch, "lr": gan.opt_G.param_groups[0]["lr"],
                                   "seconds": round(time.monotonic() - t0, 3), **loss})
                if pos.step % cfg.sample_every == 0 and main:
                    grid = claim.record(f"samples/step_{pos.step:07d}.png")
                    save_samples(gan.models, *samples, grid, amp_dtype)
                    log.info("step %d/%d, epoch %d: %s", pos.step, total, pos.epoch,
                             "  ".join(f"{k} {v:.3f}" for k, v in loss.items()))
                if pos.step % cfg.checkpoint_every == 0:
                    save_checkpoint(ckpt, cfg, gan, pos)
                    saved = pos.step
                stopped = stop.agreed()
                if pos.step >= total or stopped:
                    break
        # ---- finish: the last checkpoint and the loss plot
        stopped = stop.agreed()
        if pos.step != saved or not ckpt.exists():
            save_checkpoint(ckpt, cfg, gan, pos)
    if main:
        bar.close()
        report.plot_losses(out / "losses.csv", out / "losses.png")
    if stopped:
        raise signals.Stopped(stopped, ckpt)
    log.info("done: %d steps; checkpoint %s", pos.step, ckpt)
    return ckpt


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    from . import translate  # translate imports this module

    p = argparse.ArgumentParser(prog="python -m melano.cyclegan", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on the training split: benign (A) -> malignant (B)")
    options.add_options(t, CycleGANConfig, required=("data", "out"))
    cli.add_debug(t)
    tr = sub.add_parser("translate", help="G_A over training-split benign images -> synthetic malignant "
                                          "images in the ISIC layout")
    options.add_options(tr, translate.TranslateConfig)
    cli.add_debug(tr)
    args = p.parse_args(argv)
    setup_logging()
    if args.command == "train":
        return cli.cli(lambda: train(options.from_args(CycleGANConfig, args)), args.debug)
    return cli.cli(lambda: translate.translate(options.from_args(translate.TranslateConfig, args)), args.debug)


if __name__ == "__main__":
    sys.exit(main())
