"""CycleGAN: turn benign lesions (domain A) into malignant ones (domain B).

One file, top to bottom: config, models, losses and label smoothing, image pool, learning-rate
schedule, the training step, the trainer (checkpoints, resume, samples, loss plot), translate, CLI.

The models follow the reference CycleGAN (junyanz/pytorch-CycleGAN-and-pix2pix): a ResNet
generator and a 70x70 PatchGAN discriminator with InstanceNorm(affine=False) and biased convs.
Every InstanceNorm (+ activation) is melano.ops.InstanceNormAct, the fused op; MELANO_OPS=eager
selects the plain PyTorch path for the same module.

Naming follows the reference: G_A maps A -> B and D_A judges B images (real B vs G_A's fakes);
G_B maps B -> A and D_B judges A images.

Resuming is exact: a checkpoint holds the four models, both Adam states, the image pools, the RNG
states (torch tensors only, so it loads with weights_only=True) and the position in the data order,
which is a pure function of (seed, epoch). On CPU, `--max-steps 3` then `--max-steps 6 --resume`
gives the same weights, bit for bit, as one `--max-steps 6` run.

    python -m melano.cyclegan train --data DIR --out DIR [--size 128] [--max-steps N] [--resume] ...
    python -m melano.cyclegan translate --checkpoint PATH --data DIR --out DIR [--limit N]
    torchrun --nproc-per-node K -m melano.cyclegan train ...   # K processes (GPUs); see melano.dist
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from . import data as mdata
from . import dist
from .common import (atomic_save, atomic_write_text, load_checkpoint, log_config, pick_device,
                     progress, setup_logging)
from .ops import InstanceNormAct

log = logging.getLogger("melano.cyclegan")

CHECKPOINT = "checkpoint.pt"  # the latest checkpoint in a run folder; --resume reads it
LOSS_KEYS = ("G_A", "G_B", "cycle_A", "cycle_B", "idt_A", "idt_B", "D_A", "D_B")


# ----------------------------------------------------------------------------- config

@dataclass
class CycleGANConfig:
    # data: an ISIC-layout folder; split and cache come from melano.data
    data: str = "data/synth"
    out: str = "runs/cyclegan"
    split_csv: str | None = None      # patient-grouped split; default <out>/splits.csv (drawn if absent)
    cache_dir: str = "runs/cache"     # where melano.data keeps its uint8 image caches
    size: int = 128                   # images are size x size
    # models
    ngf: int = 64
    ndf: int = 64
    n_blocks: int | None = None       # None: 9 at >= 256 px, 6 below (as the reference advises)
    n_layers: int = 3                 # PatchGAN depth; 3 gives the 70x70 receptive field
    upsample: str = "transpose"       # transpose (reference) | nearest (nearest + conv, the study's)
    gen_act: str = "relu"             # relu (reference) | leaky (LeakyReLU 0.01, the study's)
    # losses
    gan_mode: str = "lsgan"           # lsgan (MSE) | vanilla (BCE with logits)
    label_smoothing: str = "none"     # none | one-sided | noisy (see make_targets)
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5      # identity weight is lambda_identity * lambda_cycle; 0 disables
    pool_size: int = 50
    # optimisation
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    batch_size: int = 1
    epochs: int = 100                 # epochs at constant lr
    epochs_decay: int = 100           # epochs of linear decay to zero
    max_steps: int | None = None      # total steps (counting earlier runs when resuming)
    amp: str = "auto"                 # auto (bf16 on CUDA if supported, else fp16) | bf16 | fp16 | none
    device: str | None = None         # None: CUDA when available
    seed: int = 0
    num_workers: int | None = None    # DataLoader workers; None: melano.data's choice for this machine
    # outputs
    sample_every: int = 500           # steps between sample grids
    checkpoint_every: int = 1000      # steps between checkpoints (one is always written at the end)
    n_samples: int = 4                # rows in a sample grid
    resume: bool = False

    def __post_init__(self):
        choices = {"upsample": ("transpose", "nearest"), "gen_act": ("relu", "leaky"),
                   "gan_mode": ("lsgan", "vanilla"), "label_smoothing": ("none", "one-sided", "noisy"),
                   "amp": ("auto", "bf16", "fp16", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"CycleGANConfig.{name}={getattr(self, name)!r}: choose one of {allowed}")
        if self.size < 32 or self.size % 4:
            raise ValueError(f"size={self.size}: the generator needs a multiple of 4 and >= 32 px")
        if self.n_blocks is None:
            self.n_blocks = 9 if self.size >= 256 else 6
        for name in ("ngf", "ndf", "n_layers", "batch_size", "sample_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"CycleGANConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs + self.epochs_decay < 1:
            raise ValueError("epochs + epochs_decay must be >= 1")
        if self.split_csv is None:
            self.split_csv = str(Path(self.out) / "splits.csv")


# Fields that must not change between a run and its --resume: they define the models, the
# optimisation or the data order, so changing them would silently make a different experiment.
_RESUME_FIXED = ("data", "split_csv", "size", "ngf", "ndf", "n_blocks", "n_layers", "upsample",
                 "gen_act", "gan_mode", "label_smoothing", "lambda_cycle", "lambda_identity",
                 "pool_size", "lr", "beta1", "beta2", "batch_size", "epochs", "epochs_decay", "seed")


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
    shift of its own (the reference's use_bias rule)."""

    def __init__(self, ngf: int = 64, n_blocks: int = 9, upsample: str = "transpose", act: str = "relu",
                 in_ch: int = 3, out_ch: int = 3):
        super().__init__()
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
            else:
                raise ValueError(f"upsample={upsample!r}: choose 'transpose' or 'nearest'")
            layers += [InstanceNormAct(cout, act=a, negative_slope=slope)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_ch, 7, bias=True), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


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


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """N(0, 0.02) conv weights and zero biases, as the reference's 'normal' init."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_models(cfg: CycleGANConfig) -> nn.ModuleDict:
    """G_A, G_B, D_A, D_B, initialised from the global torch RNG (seed it first)."""
    g = lambda: Generator(cfg.ngf, cfg.n_blocks, cfg.upsample, cfg.gen_act)  # noqa: E731
    d = lambda: Discriminator(cfg.ndf, cfg.n_layers)  # noqa: E731
    models = nn.ModuleDict({"G_A": g(), "G_B": g(), "D_A": d(), "D_B": d()})
    init_weights(models)
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
    """History of generated images (Shrivastava et al. 2017), as in the reference: until the pool is
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
    The reference's 'linear' rule: epoch e (0-based) gets 1 - max(0, e + 1 - epochs) / (epochs_decay + 1),
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
    """One CycleGAN iteration, in the reference's order: the generators step with both
    discriminators frozen, then the discriminators step on real images and pooled fakes.

    Returns the losses as floats (weighted, as they enter the totals)."""
    autocast = torch.autocast(real_A.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    scale = scaler.scale if scaler is not None else (lambda loss: loss)  # fp16: scaled backward
    step = scaler.step if scaler is not None else (lambda opt: opt.step())

    # ---- generators: fool the (frozen) discriminators, cycle back, keep identity --------------
    # Under DDP (see melano.dist) each generator runs several forwards here (G_A on real_A, fake_A
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


def save_sample_grid(rows: list[list[torch.Tensor]], path: str | Path, pad: int = 2) -> Path:
    """Write a grid PNG: one row per sample, columns given by `rows[i]` (each a (3, H, W) tensor in
    [-1, 1]); here real A | fake B | rec A | real B | fake A | rec B. Composed with PIL."""
    tiles = [[to_uint8(t.unsqueeze(0))[0] for t in row] for row in rows]
    h, w = tiles[0][0].shape[:2]
    ncol = max(len(r) for r in tiles)
    grid = Image.new("RGB", (ncol * (w + pad) + pad, len(tiles) * (h + pad) + pad), (255, 255, 255))
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            grid.paste(Image.fromarray(tile), (pad + j * (w + pad), pad + i * (h + pad)))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


class LossLog:
    """losses.csv: one row per step. On resume, rows after the checkpoint's step (written by a run
    that was killed before its next checkpoint) are dropped, so the file matches the weights."""

    columns = ("step", "epoch", "lr", *LOSS_KEYS, "seconds")

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = []
        if resume_step > 0 and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:  # rewrite: header plus the rows still valid
            w = csv.DictWriter(f, self.columns)
            w.writeheader()
            w.writerows(rows)

    def append(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow({k: row.get(k, "") for k in self.columns})


def read_losses(path: str | Path) -> dict[str, np.ndarray]:
    """losses.csv -> {column: array}; missing values (e.g. identity off) are NaN."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k: np.array([float(r[k]) if r.get(k) not in (None, "") else np.nan for r in rows])
            for k in rows[0]}


def plot_losses(csv_path: str | Path, png_path: str | Path, smooth: int = 50) -> Path | None:
    """Loss curves (generator terms left, discriminators right), with a moving average of `smooth`
    steps. Returns None when matplotlib is not installed or there is nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no loss plot")
        return None
    d = read_losses(csv_path)
    if not d or len(d["step"]) == 0:
        return None

    def ma(y):
        k = max(1, min(smooth, len(y) // 5 or 1))
        return np.convolve(np.nan_to_num(y), np.ones(k) / k, mode="valid"), k

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, keys, title in ((axes[0], LOSS_KEYS[:6], "generators"), (axes[1], LOSS_KEYS[6:], "discriminators")):
        for k in keys:
            if k in d and not np.all(np.isnan(d[k])):
                y, n = ma(d[k])
                ax.plot(d["step"][n - 1:], y, label=k, lw=1)
        ax.set(title=f"{title} (moving average)", xlabel="step", ylabel="loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


# ----------------------------------------------------------------------------- checkpoints

def _rng_states(rng: torch.Generator) -> dict:
    """All RNG state the training loop touches, as tensors (loadable with weights_only=True).
    numpy and python's random are not used after initialisation."""
    state = {"torch": torch.get_rng_state(), "train": rng.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_states(state: dict, rng: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    rng.set_state(state["train"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_from_checkpoint(state: dict) -> CycleGANConfig:
    names = {f.name for f in dataclasses.fields(CycleGANConfig)}
    return CycleGANConfig(**{k: v for k, v in state["config"].items() if k in names})


def load_generator(checkpoint: str | Path, which: str = "G_A",
                   device: torch.device | str = "cpu") -> tuple[Generator, CycleGANConfig]:
    """A trained generator (G_A: benign -> malignant) and the config it was trained with."""
    state = load_checkpoint(checkpoint)
    for key in ("config", which):
        if key not in state:
            raise ValueError(f"{checkpoint}: no {key!r} entry; is this a melano.cyclegan checkpoint?")
    cfg = config_from_checkpoint(state)
    g = Generator(cfg.ngf, cfg.n_blocks, cfg.upsample, cfg.gen_act)
    g.load_state_dict(state[which])
    return g.to(device).eval(), cfg


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


class TrainData:
    """Training-split benign (A) and malignant (B) images, in an order that can be resumed.

    Epoch e visits A in a permutation seeded by (seed, e); melano.data's UnpairedDataset pairs
    each with a B drawn through its own (seed, e) permutation. Nothing here depends on how many
    batches were drawn before, so `batches(e, skip=k)` after a restart yields exactly what an
    uninterrupted run would have yielded after its first k batches of epoch e.

    Under torchrun every rank draws the same permutation and takes its `dist.shard` of it (what a
    DistributedSampler with set_epoch(e) would do, but with this resumable order), so a step uses
    world_size x batch_size images and an epoch has ceil(len / (world_size x batch_size)) steps."""

    def __init__(self, cfg: CycleGANConfig):
        self.cfg = cfg
        _, self.cache, split = load_split_data(cfg.data, cfg.size, cfg.cache_dir, cfg.split_csv, cfg.seed)
        rows = self.cache.rows(split["train"])
        t = self.cache.targets[rows]
        self.rows_A, self.rows_B = rows[t == 0], rows[t == 1]
        if len(self.rows_A) == 0 or len(self.rows_B) == 0:
            raise ValueError(f"{cfg.data}: the training split of {cfg.split_csv} has {len(self.rows_A)} "
                             f"benign and {len(self.rows_B)} malignant images; CycleGAN needs both")
        self.n_A, self.n_B = len(self.rows_A), len(self.rows_B)
        self.dataset = mdata.UnpairedDataset(self.cache, self.rows_A, self.rows_B, seed=cfg.seed)
        self.steps_per_epoch = math.ceil(len(self.dataset) / (cfg.batch_size * dist.world_size()))

    def batches(self, epoch: int, skip: int = 0):
        """(real_A, real_B) batches of `epoch`, after the first `skip` batches."""
        self.dataset.set_epoch(epoch)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        order = dist.shard(torch.randperm(len(self.dataset), generator=g).tolist())[skip * self.cfg.batch_size:]
        loader = mdata.make_loader(self.dataset, self.cfg.batch_size, sampler=order,
                                   workers=self.cfg.num_workers, seed=self.cfg.seed)
        for item in loader:
            yield item["A"], item["B"]

    def samples(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n fixed A and n fixed B images (evenly spaced through the split) for sample grids."""
        pick = lambda rows: rows[np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int)]  # noqa: E731
        ds = mdata.UnpairedDataset(self.cache, pick(self.rows_A), pick(self.rows_B), seed=self.cfg.seed)
        items = [ds[i] for i in range(min(n, len(ds)))]
        return torch.stack([it["A"] for it in items]), torch.stack([it["B"] for it in items])


# ----------------------------------------------------------------------------- trainer

class _StopOnSignal:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves a checkpoint and stops.
    A second signal interrupts at once, except under torchrun: there the launcher forwards the
    signal it got (a scheduler may signal the workers too) and kills the workers itself after its
    own timeout, so repeats are ignored. Handlers are installed only in the main thread."""

    def __init__(self):
        self.signum, self._old = None, {}

    def _handler(self, signum, frame):
        if self.signum is not None:
            if dist.world_size() > 1:
                return
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint after this step (send again to abort at once)",
                    signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by `train` after a SIGINT/SIGTERM, once the checkpoint is saved."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved to {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


def _amp_setup(cfg: CycleGANConfig, device: torch.device):
    """(autocast dtype or None, GradScaler or None). fp16 needs a scaler; bf16 does not."""
    amp = cfg.amp
    if amp == "auto":
        amp = "none" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device; use amp='bf16' or 'none' on CPU")
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    return dtype, scaler


@torch.no_grad()
def _sample_grid(m: nn.ModuleDict, A: torch.Tensor, B: torch.Tensor, path: Path,
                 amp_dtype: torch.dtype | None) -> None:
    with torch.autocast(A.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        fake_B, fake_A = m["G_A"](A), m["G_B"](B)
        rec_A, rec_B = m["G_B"](fake_B), m["G_A"](fake_A)
    save_sample_grid([[A[i], fake_B[i], rec_A[i], B[i], fake_A[i], rec_B[i]] for i in range(len(A))], path)


def train(cfg: CycleGANConfig) -> Path:
    """Train a CycleGAN on the training split of cfg.data (benign = A, malignant = B).

    Writes into cfg.out: config.json, losses.csv, losses.png, samples/step_*.png and checkpoint.pt
    (every cfg.checkpoint_every steps, at the end, and on SIGINT/SIGTERM, which then raise
    TrainingInterrupted). With cfg.resume, continues from cfg.out/checkpoint.pt when it exists
    (a finished run returns at once); without it, an existing checkpoint is an error rather than
    something to overwrite. Returns the checkpoint path.

    Under torchrun (see melano.dist) each process trains on its shard of every step with its own
    image pools and label noise; DDP averages the gradients. cfg.batch_size is per process. Only
    rank 0 writes files; losses.csv holds the losses averaged over the ranks."""
    setup_logging()
    device = dist.init_from_env(cfg.device)
    world, main = dist.world_size(), dist.is_main()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not cfg.resume:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    amp_dtype, scaler = _amp_setup(cfg, device)
    if cfg.label_smoothing == "noisy" and cfg.gan_mode == "vanilla":
        log.warning("label_smoothing='noisy' with gan_mode='vanilla': targets outside [0, 1] make BCE "
                    "unbounded below; LSGAN is the sound choice for noisy targets")
    with dist.local_main_first():  # one process per node builds the cache and draws the split
        data = TrainData(cfg)
    if main:
        log_config({**dataclasses.asdict(cfg), "world_size": world, "global_batch_size": world * cfg.batch_size},
                   out / "config.json")
    log.info("training data: %d benign (A), %d malignant (B); %d steps per epoch of batch %d x %d processes; "
             "device %s, amp %s", data.n_A, data.n_B, data.steps_per_epoch, cfg.batch_size, world, device, amp_dtype)

    torch.manual_seed(cfg.seed)  # model init: the same on every rank
    m = build_models(cfg).to(device)
    opt_G = torch.optim.Adam([*m["G_A"].parameters(), *m["G_B"].parameters()], lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2))
    opt_D = torch.optim.Adam([*m["D_A"].parameters(), *m["D_B"].parameters()], lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2))

    def set_lr(epoch: int) -> float:  # the schedule is a function of the epoch alone
        lr = cfg.lr * lr_factor(epoch, cfg.epochs, cfg.epochs_decay)
        for group in (*opt_G.param_groups, *opt_D.param_groups):
            group["lr"] = lr
        return lr

    # label noise and the image pools: each rank has its own stream and its own pools
    rng = torch.Generator().manual_seed(dist.rank_seed(cfg.seed + 1))
    pool_A, pool_B = ImagePool(cfg.pool_size, rng), ImagePool(cfg.pool_size, rng)
    step = epoch = epoch_step = 0
    resumed = False

    if cfg.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        old = state["config"]
        changed = [f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in _RESUME_FIXED
                   if old.get(k) != getattr(cfg, k)]
        if changed:
            raise ValueError(f"{ckpt_path} was trained with a different config ({'; '.join(changed)}); "
                             "resume with the same options or choose another --out")
        if state.get("world_size", 1) != world:
            raise ValueError(f"{ckpt_path} was trained by {state.get('world_size', 1)} process(es), this run has "
                             f"{world}: the data order and the per-process image pools depend on it. Resume with "
                             f"the same number of processes (torchrun --nnodes x --nproc-per-node)")
        for k in ("G_A", "G_B", "D_A", "D_B"):
            m[k].load_state_dict(state[k])
        opt_G.load_state_dict(state["opt_G"])
        opt_D.load_state_dict(state["opt_D"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        own = state["ranks"][dist.rank()] if world > 1 else state  # this rank's pools and random streams
        pool_A.load_state_dict(own["pool_A"], device)
        pool_B.load_state_dict(own["pool_B"], device)
        _set_rng_states(own["rng"], rng)
        step, epoch, epoch_step = state["step"], state["epoch"], state["epoch_step"]
        resumed = True
        log.info("resumed from %s at step %d (epoch %d)", ckpt_path, step, epoch)
    starts = dist.all_gather_object((resumed, step))  # also a barrier: every rank has read the checkpoint
    if len(set(starts)) > 1:
        raise RuntimeError(f"the ranks start from different (resumed, step) {starts}: every process must read the "
                           f"same {ckpt_path}; on several nodes, put --out on a filesystem they all share")
    net = nn.ModuleDict({k: dist.wrap_ddp(m[k], device) for k in m})  # what train_step runs; m is saved

    def save() -> None:
        # every rank's pools and random streams (collective), so that a resumed run continues them all
        ranks = dist.all_gather_object({"pool_A": pool_A.state_dict(), "pool_B": pool_B.state_dict(),
                                        "rng": _rng_states(rng)})
        if main:
            atomic_save({"format": 1, "config": dataclasses.asdict(cfg),
                         **{k: m[k].state_dict() for k in ("G_A", "G_B", "D_A", "D_B")},
                         "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
                         "scheduler": {"epoch": epoch, "lr": opt_G.param_groups[0]["lr"],
                                       "epochs": cfg.epochs, "epochs_decay": cfg.epochs_decay},
                         "scaler": scaler.state_dict() if scaler is not None else {},
                         "pool_A": pool_A.state_dict(), "pool_B": pool_B.state_dict(),
                         "rng": _rng_states(rng), "step": step, "epoch": epoch, "epoch_step": epoch_step,
                         "world_size": world, **({"ranks": ranks} if world > 1 else {})},
                        ckpt_path)
            plot_losses(out / "losses.csv", out / "losses.png")
        dist.barrier()  # no rank goes on (or returns) before the checkpoint is complete

    total = (cfg.epochs + cfg.epochs_decay) * data.steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    losses_csv = LossLog(out / "losses.csv", step) if main else None
    sample_A, sample_B = (x.to(device) for x in data.samples(cfg.n_samples))
    m.train()
    t0, saved_step, recent = time.monotonic(), step if resumed else -1, []
    stop_signum = 0  # a signal any rank received, agreed by all ranks after each step
    with _StopOnSignal() as stop:
        bar = progress(range(step, total), total=total - step, desc="cyclegan") if main else iter(())
        while step < total and not stop_signum:
            if epoch_step >= data.steps_per_epoch:  # epoch done: next learning rate
                epoch, epoch_step = epoch + 1, 0
            set_lr(epoch)
            for real_A, real_B in data.batches(epoch, skip=epoch_step):
                real_A = real_A.to(device, non_blocking=True)
                real_B = real_B.to(device, non_blocking=True)
                loss = train_step(net, opt_G, opt_D, pool_A, pool_B, real_A, real_B, cfg, rng, scaler, amp_dtype)
                loss = dist.mean(loss)  # the global batch's losses
                step, epoch_step = step + 1, epoch_step + 1
                next(bar, None)
                if main:
                    losses_csv.append({"step": step, "epoch": epoch, "lr": opt_G.param_groups[0]["lr"],
                                       "seconds": round(time.monotonic() - t0, 3), **loss})
                recent.append(loss)
                if step % cfg.sample_every == 0:
                    if main:
                        _sample_grid(m, sample_A, sample_B, out / "samples" / f"step_{step:07d}.png", amp_dtype)
                    log.info("step %d/%d, epoch %d: %s", step, total, epoch, "  ".join(
                        f"{k} {np.mean([r[k] for r in recent]):.3f}" for k in recent[0]))
                    recent = []
                if step % cfg.checkpoint_every == 0:
                    save()
                    saved_step = step
                stop_signum = dist.max_int(stop.signum or 0)
                if step >= total or stop_signum:
                    break
        stop_signum = dist.max_int(stop.signum or 0)
        if step != saved_step:
            save()
        if main:
            bar.close()
    if stop_signum:
        raise TrainingInterrupted(stop_signum, ckpt_path)
    log.info("done: %d steps; checkpoint %s", step, ckpt_path)
    return ckpt_path


# ----------------------------------------------------------------------------- translate

TRANSLATE_COLUMNS = ("image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
                     "diagnosis", "benign_malignant", "target", "source_image")


@torch.no_grad()
def translate(checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path, limit: int | None = None,
              split: str = "train", batch_size: int = 16, device: str | torch.device | None = None,
              split_csv: str | Path | None = None, cache_dir: str | Path | None = None,
              jpeg_quality: int = 95) -> Path:
    """Run G_A (benign -> malignant) over the benign images of `split` (the training split by
    default) and write them in the ISIC layout: out_dir/train.csv and out_dir/jpeg/train/*.jpg.

    Each output row keeps its source's patient_id, sex, age and site (so a patient-grouped reader
    can audit leakage), with diagnosis "synthetic", benign_malignant "malignant", target 1 and
    source_image naming the benign original; image_name is "syn_<source>". Images have the
    cache size the model was trained at. `limit` takes N benign images drawn at random (seeded by
    the checkpoint's seed, kept in data order; all of them when there are fewer): the first N
    would favour the patients listed first. A smaller limit takes a subset of a larger one's. Earlier syn_*.jpg files not in the new train.csv are removed.
    The split file and cache default to the ones the checkpoint was trained with. train.csv is
    written last, atomically, so it never lists a missing image. Returns out_dir."""
    device = pick_device(device)
    G, cfg = load_generator(checkpoint, "G_A", device)
    if Path(data_dir).resolve() != Path(cfg.data).resolve():
        log.warning("translating %s, but %s was trained on %s", data_dir, checkpoint, cfg.data)
    split_csv = split_csv or cfg.split_csv
    if not Path(split_csv).exists():
        raise FileNotFoundError(f"split file {split_csv} (from {checkpoint}) does not exist; pass the "
                                f"splits.csv the model was trained with (--split-csv)")
    index, cache, splits = load_split_data(data_dir, cfg.size, cache_dir or cfg.cache_dir, split_csv)
    if split not in splits:
        raise ValueError(f"split {split!r} is not one of {sorted(splits)}")
    records = {r.image_name: r for r in index.records}
    names = [n for n in splits[split] if cache.targets[cache.row(n)] == 0]
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        g = torch.Generator().manual_seed(cfg.seed)
        keep = set(torch.randperm(len(names), generator=g)[:limit].tolist())
        names = [n for i, n in enumerate(names) if i in keep]
    out_dir = Path(out_dir)
    img_dir = out_dir / "jpeg" / "train"
    img_dir.mkdir(parents=True, exist_ok=True)
    amp_dtype, _ = _amp_setup(dataclasses.replace(cfg, amp="auto"), device)
    log.info("translating %d %s-split benign images of %s with %s on %s", len(names), split, data_dir,
             checkpoint, device)
    rows = []
    batches = [names[i:i + batch_size] for i in range(0, len(names), batch_size)]
    for batch in progress(batches, total=len(batches), desc="translate"):
        x = torch.from_numpy(np.stack([cache.images[cache.row(n)] for n in batch])).to(device)
        x = x.permute(0, 3, 1, 2).float().mul_(2 / 255).sub_(1)  # uint8 -> [-1, 1], as UnpairedDataset
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            y = G(x)
        for name, img in zip(batch, to_uint8(y)):
            src = records[name]
            out_name = f"syn_{name}"
            # 4:4:4 chroma: subsampling would blur the colour detail the classifier should learn from
            Image.fromarray(img).save(img_dir / f"{out_name}.jpg", quality=jpeg_quality, subsampling=0)
            rows.append({"image_name": out_name, "patient_id": src.patient_id,
                         "sex": src.extra.get("sex", ""), "age_approx": src.extra.get("age_approx", ""),
                         "anatom_site_general_challenge": src.extra.get("anatom_site_general_challenge", ""),
                         "diagnosis": "synthetic", "benign_malignant": "malignant", "target": 1,
                         "source_image": name})
    buf = io.StringIO()
    w = csv.DictWriter(buf, TRANSLATE_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(buf.getvalue(), out_dir / "train.csv")
    written = {f"{r['image_name']}.jpg" for r in rows}
    for stale in img_dir.glob("syn_*.jpg"):  # from an earlier, larger run into the same folder
        if stale.name not in written:
            stale.unlink()
    log.info("wrote %d synthetic malignant images to %s", len(rows), out_dir)
    return out_dir


# ----------------------------------------------------------------------------- CLI

_HELP = {
    "data": "ISIC-layout folder (train.csv + images) or synthetic folder; its training split is used",
    "out": "run folder: config.json, losses.csv/png, samples/, checkpoint.pt",
    "split_csv": "patient-grouped split file (splits.csv from melano.data); used as is when it exists, "
                 "else drawn (seeded by --seed) and written there. Default: <out>/splits.csv",
    "cache_dir": "folder of melano.data's uint8 image caches (reused when present)",
    "size": "image side in pixels (multiple of 4, >= 32)",
    "ngf": "generator base width",
    "ndf": "discriminator base width",
    "n_blocks": "generator residual blocks (default 9 at >= 256 px, else 6)",
    "n_layers": "PatchGAN conv layers (3 = 70x70 patches)",
    "upsample": "generator upsampling: transpose (reference) or nearest (nearest + conv, the study's)",
    "gen_act": "generator activation: relu (reference) or leaky (LeakyReLU 0.01, the study's)",
    "gan_mode": "adversarial loss: lsgan (MSE) or vanilla (BCE with logits)",
    "label_smoothing": "none; one-sided (real targets 0.9 for D); noisy (the study's 'label smoothing': "
                       "targets 1+0.3N(0,1) and 0.3N(0,1) each step, for D and G)",
    "lambda_cycle": "weight of the cycle L1 loss",
    "lambda_identity": "identity L1 weight, as a fraction of lambda_cycle (0 disables)",
    "pool_size": "generated-image history per discriminator (0 disables)",
    "lr": "Adam learning rate", "beta1": "Adam beta1", "beta2": "Adam beta2",
    "batch_size": "images per domain per step and process (under torchrun the global batch is "
                  "processes x this)",
    "epochs": "epochs at constant learning rate",
    "epochs_decay": "epochs of linear decay to zero after that",
    "max_steps": "stop after this many steps in total (counting steps before --resume)",
    "amp": "CUDA mixed precision: auto (bf16 if supported, else fp16), bf16, fp16 or none",
    "device": "cpu, cuda, cuda:1, ... (default: CUDA when available)",
    "seed": "seed for init, data order, label noise and image pools",
    "num_workers": "DataLoader worker processes (default: 0 on <= 4 cores, else up to 8)",
    "sample_every": "steps between sample grids (real A | fake B | rec A | real B | fake A | rec B)",
    "checkpoint_every": "steps between checkpoints (one is always written at the end)",
    "n_samples": "rows in each sample grid",
    "resume": "continue from <out>/checkpoint.pt (starts fresh if there is none)",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    defaults = CycleGANConfig()
    for f in dataclasses.fields(CycleGANConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name) if f.name != "n_blocks" else None
        if f.name == "resume":
            p.add_argument(flag, action="store_true", help=_HELP[f.name])
            continue
        if f.name == "data":
            p.add_argument(flag, required=True, help=_HELP[f.name])
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        choices = {"upsample": ["transpose", "nearest"], "gen_act": ["relu", "leaky"],
                   "gan_mode": ["lsgan", "vanilla"], "label_smoothing": ["none", "one-sided", "noisy"],
                   "amp": ["auto", "bf16", "fp16", "none"]}.get(f.name)
        p.add_argument(flag, type=kind, default=default, choices=choices,
                       help=f"{_HELP[f.name]} (default: {default})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m melano.cyclegan", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on the training split: benign (A) -> malignant (B)")
    _add_config_args(t)
    tr = sub.add_parser("translate", help="G_A over training-split benign images -> synthetic malignant "
                                          "images in the ISIC layout")
    tr.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `train`")
    tr.add_argument("--data", required=True, help="the folder the model was trained on")
    tr.add_argument("--out", required=True, help="output folder: train.csv + jpeg/train/*.jpg")
    tr.add_argument("--limit", type=int, default=None, help="translate at most this many images (default: all)")
    tr.add_argument("--split", default="train", choices=list(mdata.SPLITS),
                    help="which split's benign images (default: train; synthetic images made from val or "
                         "test images must never be used for training)")
    tr.add_argument("--split-csv", default=None, help="split file (default: the one the checkpoint was trained with)")
    tr.add_argument("--cache-dir", default=None, help="image cache folder (default: the checkpoint's)")
    tr.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    tr.add_argument("--device", default=None, help="default: CUDA when available")
    args = p.parse_args(argv)
    setup_logging()
    if args.command == "train":
        cfg = CycleGANConfig(**{k: v for k, v in vars(args).items() if k != "command"})
        try:
            train(cfg)
        except TrainingInterrupted as e:
            log.warning("%s", e)
            return 128 + e.signum
        finally:
            dist.destroy()  # under torchrun: leave the process group cleanly
        return 0
    translate(args.checkpoint, args.data, args.out, limit=args.limit, split=args.split,
              batch_size=args.batch_size, device=args.device, split_csv=args.split_csv,
              cache_dir=args.cache_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
