"""The CycleGAN trainer: benign lesions (domain A) into malignant ones (domain B).

The models, losses and training step are melano.gan; translation into a synthetic data set is
melano.translate.

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

from . import augment, gan as G, report, translate
from . import data as mdata
from .infra import checkpoints, cli, dist, kernels, options, outdir, precision, signals
from .pixels import to_uint8
from .schedules import linear_decay, set_lr
from .infra.cli import progress, setup_logging, write_run_config
from .infra.options import option

log = logging.getLogger("melano.cyclegan")

FORMAT = G.FORMAT
CHECKPOINT = "checkpoint.pt"  # the latest checkpoint in a run folder; --resume reads it


# ----------------------------------------------------------------------------- config

@dataclass
class CycleGANConfig:
    data: str = option("", "ISIC-layout folder (train.csv + images) or synthetic folder; its training split is used")
    out: str = option("", "run folder: config.json, losses.csv/png, samples/, checkpoint.pt, splits.csv")
    negatives: str = option("all", "which lesions are domain A: all non-melanomas (as ISIC 2020) or nevi only "
                                   "(needs a diagnosis column)", choices=mdata.NEGATIVES)
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
    channels_last: bool = option(False, "NHWC memory format for models and images (measured in bench/README.md)")
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


# ----------------------------------------------------------------------------- data


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


class TrainData:
    """Training-split benign (A) and malignant (B) images, in an order that can be resumed: epoch e
    visits the dataset in `dist.epoch_order(seed, e)` and pairs A and B by (seed, e) draws, so
    `batches(k, ...)` after a restart yields what an uninterrupted run yields after k steps. Under
    torchrun each rank takes its shard: an epoch has ceil(len / (world x batch)) steps."""

    def __init__(self, cfg: CycleGANConfig):
        self.cfg = cfg
        _, self.cache, split = mdata.load_split_data(cfg.data, cfg.size, mdata.cache_path(cfg), mdata.split_path(cfg),
                                                     cfg.seed, cfg.negatives)
        rows = self.cache.rows(split["train"])
        t = self.cache.targets[rows]
        self.rows_A, self.rows_B = rows[t == 0], rows[t == 1]
        self.n_A, self.n_B = len(self.rows_A), len(self.rows_B)
        if self.n_A == 0 or self.n_B == 0:
            raise cli.UsageError(f"{cfg.data}: the training split of {mdata.split_path(cfg)} has {self.n_A} "
                                 f"benign and {self.n_B} malignant images; CycleGAN needs both")
        pairs = MalignantPairs if cfg.pairing == "malignant" else mdata.UnpairedDataset
        self.dataset = pairs(self.cache, self.rows_A, self.rows_B, seed=cfg.seed)
        self.steps_per_epoch = math.ceil(len(self.dataset) / (cfg.batch_size * dist.world_size()))

    def batches(self, start: int, stop: int, device: torch.device, rng: torch.Generator):
        """(epoch, (real_A, real_B)) on `device` for steps start..stop-1, epoch after epoch; --augment-b
        study draws from `rng`, the GAN's checkpointed stream."""
        cfg, step = self.cfg, start
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        while step < stop:
            epoch, done = divmod(step, self.steps_per_epoch)  # a resumed run goes on mid-epoch
            self.dataset.set_epoch(epoch)
            order = dist.epoch_order(len(self.dataset), cfg.seed, epoch)[done * cfg.batch_size:]
            for item in mdata.make_loader(self.dataset, cfg.batch_size, sampler=order, workers=cfg.workers,
                                          seed=cfg.seed):
                real_A, real_B = item["A"].to(device, non_blocking=True), item["B"].to(device, non_blocking=True)
                if cfg.augment_b == "study":
                    real_B = augment.study(real_B, rng)
                yield epoch, (real_A.contiguous(memory_format=fmt), real_B.contiguous(memory_format=fmt))
                step += 1
                if step == stop:
                    return

    def samples(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n fixed A and n fixed B images (evenly spaced through the split) for sample grids."""
        pick = lambda rows: rows[np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int)]  # noqa: E731
        ds = mdata.UnpairedDataset(self.cache, pick(self.rows_A), pick(self.rows_B), seed=self.cfg.seed)
        items = [ds[i] for i in range(min(n, len(ds)))]
        return torch.stack([it["A"] for it in items]), torch.stack([it["B"] for it in items])


@torch.no_grad()
def save_samples(gan: G.GAN, A: torch.Tensor, B: torch.Tensor, path: Path) -> None:
    """One grid row per sample: real A | fake B | rec A | real B | fake A | rec B."""
    m = gan.models
    with gan.amp.autocast():
        fake_B, fake_A = m["G_A"](A), m["G_B"](B)
        rec_A, rec_B = m["G_B"](fake_B), m["G_A"](fake_A)
    tiles = [to_uint8(t) for t in (A, fake_B, rec_A, B, fake_A, rec_B)]
    report.image_grid([[col[i] for col in tiles] for i in range(len(A))], path)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, cfg: CycleGANConfig, gan: G.GAN, step: int, steps_per_epoch: int) -> None:
    """Collective: the models and optimisers, and every rank's image pools and random streams. The
    step is the whole position (epoch e's order depends on (seed, e) alone); "epoch" is a record."""
    shared = {"config": dataclasses.asdict(cfg), **{k: v.state_dict() for k, v in gan.models.items()},
              "opt_G": gan.opt_G.state_dict(), "opt_D": gan.opt_D.state_dict(), "scaler": gan.amp.state_dict(),
              "step": step, "epoch": max(step - 1, 0) // steps_per_epoch}
    own = {"pool_A": gan.pool_A.state_dict(), "pool_B": gan.pool_B.state_dict(), "rng": checkpoints.rng_state(gan.rng)}
    checkpoints.save(path, FORMAT, shared, own)


def start(cfg: CycleGANConfig, device: torch.device, ckpt: Path) -> tuple[G.GAN, int]:
    """The GAN and its step: new (the same initial weights on every rank), or as `ckpt` left it
    with --resume (see melano.infra.checkpoints.resume)."""
    torch.manual_seed(cfg.seed)
    gan = G.new_gan(cfg, device, precision.Precision(cfg.amp, device), dist.rank_seed(cfg.seed + 1), cfg.channels_last)
    state, own = checkpoints.resume(ckpt, FORMAT, "melano CycleGAN checkpoint", cfg, RESUMABLE)
    if state is None:
        return gan, 0
    checkpoints.restore(state, own, {**gan.models, "opt_G": gan.opt_G, "opt_D": gan.opt_D, "scaler": gan.amp}, gan.rng)
    gan.pool_A.load_state_dict(own["pool_A"], device)
    gan.pool_B.load_state_dict(own["pool_B"], device)
    log.info("resumed from %s at step %d (epoch %d)", ckpt, state["step"], state["epoch"])
    return gan, state["step"]


def config_from_checkpoint(state: dict) -> CycleGANConfig:
    names = {f.name for f in dataclasses.fields(CycleGANConfig)}
    return CycleGANConfig(**{k: v for k, v in state["config"].items() if k in names})


def absolute_paths(cfg: CycleGANConfig) -> CycleGANConfig:
    """Paths made absolute (and defaults under --out made explicit), so that a checkpoint names
    the very split and cache it was trained with, whatever folder a later command runs from."""
    if not Path(cfg.data).is_dir():
        raise cli.UsageError(f"--data {cfg.data}: not a folder (give an ISIC-layout or synthetic data folder)")
    return dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()), out=str(Path(cfg.out).resolve()),
                               split_csv=str(mdata.split_path(cfg).resolve()), cache_dir=str(mdata.cache_path(cfg).resolve()))


# ----------------------------------------------------------------------------- trainer

def train(cfg: CycleGANConfig) -> Path:
    """Train on the training split of cfg.data (benign = A, malignant = B); return the checkpoint. It
    is saved every --checkpoint-every steps, at the end, and on SIGINT/SIGTERM (then signals.Stopped
    is raised). Under torchrun each process trains on its shard of every step with its own pools and
    label noise; only rank 0 writes."""
    # ---- setup and resume: everything is checked before anything is written
    setup_logging()
    kernels.load()  # the fused InstanceNorm (MELANO_OPS=eager: the PyTorch path)
    device = dist.init_from_env(cfg.device)
    cfg = absolute_paths(cfg)
    out, main = Path(cfg.out), dist.is_main()
    ckpt = out / CHECKPOINT
    gan, step = start(cfg, device, ckpt)
    with outdir.claim(cfg.out, "cyclegan-train", force=cfg.force, resume=cfg.resume, data=[cfg.data],
                      rank=dist.rank()) as claim:
        # ---- data: one process per node builds the cache and draws the split
        with dist.local_main_first():
            data = TrainData(cfg)
        spe = data.steps_per_epoch
        total = min((cfg.epochs + cfg.epochs_decay) * spe, cfg.max_steps or math.inf)
        if main:
            write_run_config(claim, cfg, cfg.batch_size, (CHECKPOINT, "losses.csv", "losses.png"))
        log.info("training data: %d benign (A), %d malignant (B); %d steps per epoch of batch %d x %d processes; "
                 "device %s, amp %s", data.n_A, data.n_B, spe, cfg.batch_size, dist.world_size(), device, gan.amp.dtype)
        # ---- model: the step runs the DDP-wrapped models; the plain ones are saved and sampled
        gan.net = nn.ModuleDict({k: dist.wrap_ddp(v, device) for k, v in gan.models.items()})
        losses = report.LossLog(out / "losses.csv", step) if main else None
        samples = [x.to(device) for x in data.samples(cfg.n_samples)]
        # ---- loop: from `step` to `total`; rank 0 logs the losses and draws sample grids
        t0, saved, stopped = time.monotonic(), step, 0
        batches = data.batches(step, total, device, gan.rng)
        with signals.StopOnSignal() as stop:
            for epoch, batch in progress(batches, total=total - step, desc="cyclegan") if main else batches:
                set_lr(cfg.lr * linear_decay(epoch, cfg.epochs, cfg.epochs_decay), gan.opt_G, gan.opt_D)
                loss = dist.mean(G.train_step(gan, batch, cfg))  # the global batch's losses
                step += 1
                if main:
                    losses.append({"step": step, "epoch": epoch, "lr": gan.opt_G.param_groups[0]["lr"],
                                   "seconds": round(time.monotonic() - t0, 3), **loss})
                if main and step % cfg.sample_every == 0:
                    save_samples(gan, *samples, claim.record(f"samples/step_{step:07d}.png"))
                    log.info("step %d/%d, epoch %d: %s", step, total, epoch,
                             "  ".join(f"{k} {v:.3f}" for k, v in loss.items()))
                if step % cfg.checkpoint_every == 0:
                    save_checkpoint(ckpt, cfg, gan, step, spe)
                    saved = step
                stopped = stop.agreed()
                if stopped:
                    break
            # ---- finish: the last checkpoint and the loss plot
            stopped = stop.agreed()
            if step != saved or not ckpt.exists():
                save_checkpoint(ckpt, cfg, gan, step, spe)
        if main:
            report.plot_losses(out / "losses.csv", out / "losses.png")
    if stopped:
        raise signals.Stopped(stopped, ckpt)
    log.info("done: %d steps; checkpoint %s", step, ckpt)
    return ckpt


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
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
