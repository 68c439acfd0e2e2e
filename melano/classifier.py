"""Fine-tune an EfficientNet to tell melanoma (1) from benign lesions (0); evaluate it; predict.

    python -m melano.classifier train --data DIR --out DIR [--extra DIR ...] [--arch NAME] ...
    python -m melano.classifier evaluate --checkpoint OUT/best.pt --out DIR [--tta]
    python -m melano.classifier predict --checkpoint PATH --images IMAGE_OR_DIR [--out CSV]
    torchrun --nproc-per-node K -m melano.classifier train ...   # K processes (GPUs); see melano.infra.dist

`train` keeps the checkpoint with the best validation AUC, computed over the WHOLE validation split
(never a mean of per-batch AUCs). `--extra DIR` adds training-only images, e.g. `cyclegan
translate`'s; a folder whose images come from the validation or test split is refused. It writes
config.json, splits.csv, last.pt (for --resume), best.pt, history.csv, val_predictions.csv,
result.json and, by evaluate, test_predictions.csv and test_metrics.json (AUC, DeLong CI).
Checkpoints hold tensors and plain data only: they load weights-only, and rebuild the model alone.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import data, metrics
from .detector import Model, Normalise, infer, load_model, sigmoid, train_step
from .efficientnet import config as model_config
from .pretrained import efficientnet as pretrained_efficientnet
from .infra import checkpoints, cli, dist, options, outdir, precision, signals
from .infra.cli import progress, setup_logging, write_run_config
from .infra.dist import pick_device
from .infra.files import to_jsonable
from .infra.options import option
from .pixels import to_tensor
from .schedules import set_lr, warmup_cosine

log = logging.getLogger("melano.classifier")

FORMAT = "melano.classifier"  # the format marker of every checkpoint this module writes
VERSION = 2
LEAK_COLUMN = "source_image"  # column of an --extra folder's train.csv naming the image it came from


@dataclass
class ClassifierConfig:
    data: str = option("", "ISIC-style folder: train.csv + jpeg/train/ (or train/), or benign/ + malignant/; "
                           "its split gives train/val/test")
    out: str = option("", "run folder for checkpoints, predictions and history")
    extra: list[str] = option(help="training-only folders in the same layouts (e.g. `cyclegan translate` output); "
                                   "never used for validation or test, and refused if they derive from val/test "
                                   "images", factory=list)
    oversample: int = option(0, "add this many draws (with replacement, seeded) of the real training-split "
                                "melanomas to the training set", min=0)
    split_csv: str | None = option(None, "the experiment's splits.csv, shared by every arm; drawn there "
                                         "(patient-grouped, stratified) if absent. none: <out>/splits.csv")
    cache_dir: str | None = option(None, "uint8 image caches. none: <out>/cache")
    val_frac: float = option(0.15, "validation share when drawing the split", min=0, max=1, min_open=True)
    test_frac: float = option(0.15, "test share when drawing the split", min=0, max=1, min_open=True)
    split_seed: int = option(0, "seed when drawing the split")
    arch: str = option("tf_efficientnet_lite0", "EfficientNet variant; see `python -m melano.efficientnet --list`")
    pretrained: bool = option(True, "start from the offline ImageNet weights (tf_efficientnet_lite0 only); "
                                    "--no-pretrained starts from random weights")
    weights: str | None = option(None, "ImageNet checkpoint path or URL (torchvision/timm/lukemelas/melano "
                                       "layout) instead")
    size: int | None = option(None, "image side in pixels. none: the model's native resolution", min=32)
    mean_std: str = option("model", "input normalisation: model (the weights' ImageNet statistics) or half "
                                    "(mean = std = 0.5, the study's)", choices=("model", "half"))
    drop_rate: float | None = option(None, "dropout before the head. none: the variant's", min=0, max=0.99)
    drop_path_rate: float | None = option(None, "stochastic depth. none: the variant's", min=0, max=0.99)
    epochs: int = option(10, "passes over the training set", min=1)
    batch_size: int = option(32, "training batch per process (>= 2 for BatchNorm); under torchrun the global "
                                 "batch is processes x this", min=2)
    max_steps: int | None = option(None, "stop after this many optimiser steps in total; the LR schedule then "
                                         "spans them. none: epochs x steps per epoch", min=1)
    optimizer: str = option("adamw", "adamw (decoupled weight decay) or adam (the study's)",
                            choices=("adamw", "adam"))
    lr: float = option(1e-3, "peak learning rate", min=0, min_open=True)
    schedule: str = option("cosine", "cosine (linear warm-up, then half cosine to 0) or constant",
                           choices=("cosine", "constant"))
    weight_decay: float = option(1e-2, "AdamW weight decay on conv/linear weights", min=0)
    warmup: float = option(0.05, "share of the steps for the linear LR warm-up", min=0, max=0.99)
    pos_weight: str = option("none", "positive-class weight in the loss: none, auto (= benign/malignant count), "
                                     "or a number")
    augment: str = option("none", "traditional: random flips, rotations and resized crops of each training "
                                  "batch", choices=("none", "traditional"))
    seed: int = option(0, "seed for weights init, batch order, augmentation")
    val_every: int = option(0, "validate every N steps (and at the last). 0: after each epoch", min=0)
    eval_batch_size: int | None = option(None, "batch for validation/test. none: 2x --batch-size", min=1)
    tta: bool = option(False, "test-time augmentation: average the logits of the 4 flips")
    evaluate: bool = option(True, "score best.pt on the test split after training")
    channels_last: bool = option(True, "NHWC memory format (faster on CPU and GPU)")
    amp: str = option("auto", "mixed precision: auto (bf16 on CUDA, none on CPU), bf16, fp16 or none",
                      choices=precision.AMP_CHOICES)
    device: str | None = option(None, "cpu, cuda, cuda:1 ... none: CUDA when available")
    workers: int | None = option(None, "DataLoader workers. none: 0 on <= 4 cores", min=0)
    threads: int | None = option(None, "torch CPU threads. none: torch's choice", min=1)
    resume: bool = option(False, "continue from OUT/last.pt with the same config")
    force: bool = option(False, "write into an --out that holds an earlier run or other files (starts afresh)")

    def __post_init__(self) -> None:
        self.extra = [str(e) for e in (self.extra or [])]
        self.pos_weight = str(self.pos_weight)
        options.check_options(self)
        parse_pos_weight(self.pos_weight, 1, 1)
        if self.weights and not self.pretrained:
            raise cli.UsageError("--weights and --no-pretrained contradict each other; drop one")
        if self.val_frac + self.test_frac >= 1:
            raise cli.UsageError(f"--val-frac {self.val_frac} + --test-frac {self.test_frac} leave no training images")


# Config fields that may change between a run and its --resume; every other field must match.
RESUMABLE = {"resume", "force", "epochs", "max_steps", "device", "workers", "threads", "evaluate", "tta",
             "eval_batch_size", "out"}


# Config fields that may change between a run and its --resume; every other field must match.
RESUMABLE = {"resume", "force", "epochs", "max_steps", "device", "workers", "threads", "evaluate", "tta",
             "eval_batch_size", "out"}


@dataclass
class TrainResult:
    """What `train` returns (and writes to result.json)."""
    out: str
    best_checkpoint: str
    last_checkpoint: str
    best_val_auc: float
    best_step: int
    steps: int                 # optimiser steps taken in all (with earlier runs when resumed)
    total_steps: int           # the schedule's length
    images_seen: int           # steps x global batch
    train_images: int          # real training-split images
    extra_images: int          # --extra and --oversample images added to them
    val_images: int
    test_images: int
    pos_weight: float | None
    seconds: float             # this run's loop, validation included
    val_seconds: float
    train_images_per_s: float | None
    test: dict | None = None   # evaluate()'s result when cfg.evaluate


# ----------------------------------------------------------------------------------------------
# Data


def parse_pos_weight(value: str, n_pos: int, n_neg: int) -> float | None:
    """--pos-weight: "none" -> None, "auto" -> n_neg / n_pos, else a positive number."""
    value = str(value).strip().lower()
    if value == "none":
        return None
    if value == "auto":
        if n_pos == 0:
            raise cli.UsageError("--pos-weight auto: the training set has no malignant images")
        return n_neg / n_pos
    try:
        w = float(value)
    except ValueError:
        raise cli.UsageError(f"--pos-weight must be 'none', 'auto' or a positive number, got {value!r}") from None
    if not w > 0 or not math.isfinite(w):
        raise cli.UsageError(f"--pos-weight must be a positive number, got {value!r}")
    return w


def image_size(cfg: ClassifierConfig) -> int:
    return cfg.size or model_config(cfg.arch).resolution


def mean_std(cfg: ClassifierConfig) -> tuple[tuple, tuple]:
    """Input normalisation: the pretrained weights' statistics, or the study's 0.5 / 0.5."""
    if cfg.mean_std == "half":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    mcfg = model_config(cfg.arch)
    return mcfg.mean, mcfg.std


def unit_dataset(cache: data.Cache, items) -> data.ClassifierDataset:
    """Images as float pixel/255 in [0, 1]: augmentation runs on the batch before normalisation."""
    return data.ClassifierDataset(cache, items, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def csv_text(header: Sequence[str], rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def predictions_csv(names: Sequence[str], targets: np.ndarray, probs: np.ndarray) -> str:
    """image_name, target, probability: the CSV melano.report reads (repr: every digit, so the AUC
    recomputes exactly)."""
    return csv_text(["image_name", "target", "probability"],
                    [(n, int(t), repr(float(p))) for n, t, p in zip(names, targets, probs)])


def check_extra_leakage(extra: data.Index, cache: data.Cache, split: dict[str, list[str]]) -> None:
    """Refuse an --extra folder any of whose images is, comes from, or shares a patient with an
    image of the validation or test split (by image_name, by the `source_image` column, by
    patient_id). Synthetic images must derive from training images only."""
    held_out = {n: s for s in ("val", "test") for n in split[s]}
    patient_of = dict(zip(cache.names, cache.patients))
    held_patients = {patient_of[n]: s for n, s in held_out.items()}
    leaks = []
    for r in extra.records:
        src = r.extra.get(LEAK_COLUMN, "")
        if r.image_name in held_out:
            leaks.append(f"{r.image_name} is itself a {held_out[r.image_name]} image")
        elif src and src in held_out:
            leaks.append(f"{r.image_name} was made from {src}, a {held_out[src]} image")
        elif r.patient_id in held_patients and r.patient_id != r.image_name:
            leaks.append(f"{r.image_name} belongs to patient {r.patient_id}, who is in the "
                         f"{held_patients[r.patient_id]} split")
    if leaks:
        more = f" (and {len(leaks) - 5} more)" if len(leaks) > 5 else ""
        raise cli.UsageError(f"--extra {extra.root}: {len(leaks)} image(s) leak the held-out splits into training: "
                         f"{'; '.join(leaks[:5])}{more}. Extra images must derive from training-split images "
                         f"only: regenerate them from the training split (cyclegan translate --split train).")
    if extra.records and LEAK_COLUMN not in extra.records[0].extra:
        log.info("--extra %s: no %s column, so only names and patients were checked for leakage",
                 extra.root, LEAK_COLUMN)


def check_config(cfg: ClassifierConfig) -> None:
    """What the fields' own ranges cannot say: the folders exist, the model is known."""
    if not Path(cfg.data).is_dir():
        raise FileNotFoundError(f"--data {cfg.data}: no such folder (expected an ISIC-style folder with train.csv + "
                             f"jpeg/train/, or benign/ + malignant/; `python -m melano.data synth --out DIR` "
                             f"writes one)")
    for d in cfg.extra:
        if not Path(d).is_dir():
            raise cli.UsageError(f"--extra {d}: no such folder")
    model_config(cfg.arch)  # raises with the list of known names


def load_split(cfg: ClassifierConfig, cache: data.Cache, draw: bool = True) -> dict[str, list[str]]:
    """The experiment's split: read cfg's split file, or draw it there (patient-grouped) if absent
    and `draw`. Evaluation never draws: a new split could put training images into the test set."""
    split_csv = data.split_path(cfg)
    if not draw and not split_csv.is_file():
        raise FileNotFoundError(f"{split_csv}: the split this model was trained with is missing; pass the "
                                f"splits.csv of its training run (--split-csv), so that the test images are "
                                f"the ones it never saw")
    split = data.make_split(cache, split_csv, cfg.val_frac, cfg.test_frac, cfg.split_seed)
    for s in ("val", "test"):
        y = cache.targets[cache.rows(split[s])]
        if len(split[s]) == 0 or y.min() == y.max():
            raise cli.UsageError(f"{split_csv}: the {s} split has {len(split[s])} images and {int(y.sum())} "
                                 f"malignant; its AUC needs both classes. Add malignant images, or raise --{s}-frac "
                                 f"and draw a new split into another --out")
    return split


@dataclass
class Data:
    """The training set (real split + --extra + --oversample), its batches, and the validation loader."""
    split: dict[str, list[str]]
    train_set: torch.utils.data.Dataset
    targets: np.ndarray        # of train_set, in order
    n_real: int
    val_set: data.ClassifierDataset
    val_index: list[int]       # this rank's share of the validation split
    val_loader: torch.utils.data.DataLoader
    batch: int                 # per process
    steps_per_epoch: int       # the remainder of an epoch is dropped: BatchNorm needs 2

    def batches(self, start: int, stop: int, seed: int, workers: int | None, device: torch.device):
        """(images, targets) on `device` for steps start..stop-1, epoch after epoch. Epoch e's order
        is a permutation seeded by (seed, e), so a run resumed mid-epoch sees the batches it would have."""
        step, world = start, dist.world_size()
        while step < stop:
            epoch, done = divmod(step, self.steps_per_epoch)
            order = dist.epoch_order(len(self.train_set), seed, epoch, take=self.steps_per_epoch * self.batch * world)
            loader = data.make_loader(self.train_set, self.batch, sampler=order[done * self.batch:], workers=workers,
                                      drop_last=True)
            for x, y in loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                step += 1
                if step == stop:
                    return


def oversampled(cache: data.Cache, train_names: list[str], n: int, seed: int) -> list[int]:
    """n cache rows drawn with replacement from the training split's melanomas (seeded)."""
    rows = cache.rows(train_names)
    mal = rows[cache.targets[rows] == 1]
    if n and len(mal) == 0:
        raise cli.UsageError("--oversample: the training split has no melanomas to resample")
    return np.random.default_rng([seed, 7]).choice(mal, size=n, replace=True).tolist() if n else []


def prepare_data(cfg: ClassifierConfig) -> Data:
    """Caches, the split, the datasets; one process per node builds caches and draws the split."""
    size, world = image_size(cfg), dist.world_size()
    with dist.local_main_first():
        cache = data.build_cache(data.read_index(cfg.data), size, data.cache_path(cfg), cfg.workers)
        split = load_split(cfg, cache)
        sets = [unit_dataset(cache, split["train"])]
        for d in cfg.extra:
            index = data.read_index(d)
            check_extra_leakage(index, cache, split)
            extra_cache = data.build_cache(index, size, data.cache_path(cfg), cfg.workers)
            sets.append(unit_dataset(extra_cache, range(len(extra_cache))))
        if cfg.oversample:
            sets.append(unit_dataset(cache, oversampled(cache, split["train"], cfg.oversample, cfg.seed)))
    train_set = torch.utils.data.ConcatDataset(sets)
    if len(train_set) < 2:
        raise cli.UsageError(f"{cfg.data}: the training split has {len(train_set)} image(s); BatchNorm needs 2")
    batch = min(cfg.batch_size, len(train_set) // world)
    if batch < 2:
        raise cli.UsageError(f"{len(train_set)} training images cannot give each of {world} processes a batch "
                             f"of 2 (BatchNorm needs 2); use fewer processes")
    val_set = unit_dataset(cache, split["val"])
    # each rank scores its DistributedSampler share of the validation split (padded to equal shares)
    val_index = list(torch.utils.data.DistributedSampler(val_set, world, dist.rank(), shuffle=False))
    val_loader = data.make_loader(val_set, eval_batch_size(cfg), sampler=val_index, workers=cfg.workers)
    return Data(split, train_set, np.concatenate([s.targets for s in sets]), len(sets[0]), val_set, val_index,
                val_loader, batch, len(train_set) // (batch * world))


def eval_batch_size(cfg: ClassifierConfig) -> int:
    return cfg.eval_batch_size or 2 * cfg.batch_size


# ----------------------------------------------------------------------------------------------
# Model and checkpoints


def build_model(cfg: ClassifierConfig) -> torch.nn.Module:
    """One-logit EfficientNet; ImageNet weights from --weights, or the offline ones with --pretrained."""
    pretrained: bool | str = cfg.weights if cfg.weights else cfg.pretrained
    return pretrained_efficientnet(cfg.arch, num_classes=1, pretrained=pretrained, drop_rate=cfg.drop_rate,
                                   drop_path_rate=cfg.drop_path_rate)


def build_training(cfg: ClassifierConfig, device: torch.device, pos_weight: float | None) -> Model:
    """Model, normalisation and optimiser (no weight decay on biases and BatchNorm, as usual)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    mean, std = mean_std(cfg)
    norm = Normalise(mean, std, cfg.channels_last).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    make = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = make(groups, lr=cfg.lr, fused=device.type == "cuda")
    pw = None if pos_weight is None else torch.tensor(pos_weight, device=device)
    # augmentation on CPU: the same transforms on any device; each rank augments differently
    aug_gen = torch.Generator().manual_seed(dist.rank_seed(cfg.seed + 1))
    if dist.rank() > 0:  # and draws its own dropout masks (rank 0 keeps the single-process stream)
        torch.manual_seed(dist.rank_seed(cfg.seed))
    return Model(model, norm, opt, pw, aug_gen, precision.Precision(cfg.amp, device))


def checkpoint_meta(cfg: ClassifierConfig) -> dict:
    """What `load_classifier` needs to rebuild the model, as plain data."""
    mean, std = mean_std(cfg)
    return {"version": VERSION, "arch": cfg.arch, "num_classes": 1, "image_size": image_size(cfg),
            "mean": [float(v) for v in mean], "std": [float(v) for v in std], "channels_last": cfg.channels_last,
            "config": to_jsonable(cfg)}


@dataclass
class Progress:
    """The loop's position and record, all of it saved in last.pt."""
    step: int = 0
    best_auc: float = -math.inf
    best_step: int = -1
    history: list = dataclasses.field(default_factory=list)
    loss_sum: float = 0.0      # training loss summed since the last validation (this rank; a
                               # device tensor inside the loop, so that steps need no sync)
    loss_count: int = 0


def save_last(cfg: ClassifierConfig, m: Model, p: Progress, total: int) -> None:
    """last.pt, what --resume needs. Collective (melano.infra.checkpoints.save): every rank's
    streams and loss sums are kept. The LR schedule is a function of the step: no scheduler state."""
    shared = {**checkpoint_meta(cfg), "model": m.model.state_dict(), "optimizer": m.opt.state_dict(),
              "scaler": m.amp.state_dict(), **dataclasses.asdict(p), "total_steps": total}
    own = {"rng": checkpoints.rng_state(m.aug_gen), "loss_sum": float(p.loss_sum)}
    checkpoints.save(Path(cfg.out) / "last.pt", FORMAT, shared, own)


def restore(m: Model, state: dict, own: dict, total: int) -> Progress:
    """The model, optimiser and streams as a checked last.pt left them; the progress."""
    checkpoints.restore(state, own, {"model": m.model, "optimizer": m.opt, "scaler": m.amp}, m.aug_gen)
    if state["total_steps"] != total:
        log.warning("resuming with %d total steps instead of %d: the LR schedule changes from here",
                    total, state["total_steps"])
    p = Progress(state["step"], state["best_auc"], state["best_step"], state["history"], own["loss_sum"],
                 state["loss_count"])
    log.info("resumed at step %d (best val AUC %.4f at step %d)", p.step, p.best_auc, p.best_step)
    return p


# ----------------------------------------------------------------------------------------------
# Validation


def validate(claim: outdir.Claim, cfg: ClassifierConfig, m: Model, d: Data, p: Progress, total: int) -> float:
    """Score the whole validation split, append to p.history, track the best AUC; then save best.pt
    and val_predictions.csv if it improved and history.csv (rank 0), and last.pt (collective).
    Returns the seconds it took."""
    t0 = time.perf_counter()
    dist.broadcast_buffers(m.model)  # every rank scores with rank 0's BatchNorm statistics
    logits, y = infer(m.model, m.norm, d.val_loader, next(m.model.parameters()).device, amp_dtype=m.amp.dtype)
    logits, y = dist.gather_shards(d.val_index, len(d.val_set), logits, y)  # each image once, in split order
    if not np.isfinite(logits).all():
        raise FloatingPointError(f"training diverged by step {p.step}: the model's validation logits are NaN or "
                                 f"infinite; lower --lr or check the input images")
    auc = float(metrics.roc_auc(y, logits))  # the whole split at once; a float, for weights-only loading
    val_loss = float(F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(y)))
    train_loss = dist.mean({"sum": float(p.loss_sum)})["sum"] / max(1, p.loss_count)
    p.loss_sum, p.loss_count = 0.0, 0
    epoch, improved = p.step / d.steps_per_epoch, auc > p.best_auc
    p.history.append({"step": p.step, "epoch": epoch, "lr": m.opt.param_groups[0]["lr"],
                      "train_loss": train_loss, "val_loss": val_loss, "val_auc": auc})
    if improved:
        p.best_auc, p.best_step = auc, p.step
    log.info("step %d epoch %.2f: train loss %.4f, val loss %.4f, val AUC %.4f%s", p.step, epoch,
             train_loss, val_loss, auc, " (best)" if improved else "")
    if dist.is_main() and improved:
        checkpoints.save_state({**checkpoint_meta(cfg), "model": m.model.state_dict(), "step": p.step,
                                "val_auc": p.best_auc}, claim.path("best.pt"), FORMAT)
        claim.write_text("val_predictions.csv", predictions_csv(d.split["val"], y, sigmoid(logits)))
    if dist.is_main():
        claim.write_text("history.csv", csv_text(["step", "epoch", "lr", "train_loss", "val_loss", "val_auc"], [
            (h["step"], f"{h['epoch']:.4f}", f"{h['lr']:.6g}", f"{h['train_loss']:.6f}", f"{h['val_loss']:.6f}",
             f"{h['val_auc']:.6f}") for h in p.history]))
    save_last(cfg, m, p, total)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# Training


def train(cfg: ClassifierConfig) -> TrainResult:
    """Fine-tune, keep the best validation AUC, optionally evaluate best.pt on the test split.

    SIGINT/SIGTERM save last.pt and raise signals.Stopped; rerun with resume=True. Under torchrun
    cfg.batch_size is per process, each rank trains on its shard of every epoch with its own
    augmentation and dropout, and the validation predictions are gathered (each image once) before
    the AUC. Only rank 0 writes files and evaluates on the test split."""
    # ---- setup and resume: everything is checked before anything is written
    check_config(cfg)
    device = dist.init_from_env(cfg.device)
    cfg = dataclasses.replace(cfg, split_csv=str(data.split_path(cfg).resolve()), cache_dir=str(data.cache_path(cfg).resolve()))
    out, main = Path(cfg.out), dist.is_main()
    state, own = checkpoints.resume(out / "last.pt", FORMAT, "melano classifier training checkpoint", cfg, RESUMABLE)
    if state is not None and "optimizer" not in state:
        raise cli.UsageError(f"{out / 'last.pt'}: a best.pt, not the last.pt that --resume needs")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with outdir.claim(cfg.out, "classifier-train", force=cfg.force, resume=cfg.resume,
                      data=[cfg.data, *cfg.extra], rank=dist.rank()) as claim:
        # ---- data: the real training split, --extra and --oversample; the validation split
        d = prepare_data(cfg)
        n_pos = int(d.targets.sum())
        pos_weight = parse_pos_weight(cfg.pos_weight, n_pos, len(d.targets) - n_pos)
        total = min(cfg.epochs * d.steps_per_epoch, cfg.max_steps or math.inf)
        warmup = round(cfg.warmup * total)
        # ---- model: new, or as last.pt left it; DDP wraps what trains, the plain model is validated and saved
        m = build_training(cfg, device, pos_weight)
        p = restore(m, state, own, total) if state else Progress()
        m.net = dist.wrap_ddp(m.model, device)
        if main:
            write_run_config(claim, cfg, d.batch, ("last.pt", "best.pt", "history.csv", "val_predictions.csv",
                                                   "result.json", "test_predictions.csv", "test_metrics.json"))
        log.info("training on %d images (%d malignant, %d added to the real split), validating on %d; %d steps; "
                 "pos_weight %s", len(d.train_set), n_pos, len(d.train_set) - d.n_real, len(d.val_set), total,
                 pos_weight)
        # ---- loop: a validation every --val-every steps (0: every epoch) and at the last
        t0, start, val_seconds = time.perf_counter(), p.step, 0.0
        m.model.train()
        batches = d.batches(p.step, total, cfg.seed, cfg.workers, device)
        with signals.StopOnSignal() as stop:
            for x, y in progress(batches, total=total - p.step, desc="train") if main else batches:
                set_lr(cfg.lr * warmup_cosine(p.step, warmup, total, cfg.schedule), m.opt)
                p.loss_sum = p.loss_sum + train_step(m, (x, y), cfg)  # on the device: no sync
                p.step, p.loss_count = p.step + 1, p.loss_count + 1
                stopped = stop.agreed()
                if p.step == total or p.step % (cfg.val_every or d.steps_per_epoch) == 0:
                    val_seconds += validate(claim, cfg, m, d, p, total)
                if stopped:
                    save_last(cfg, m, p, total)
                    raise signals.Stopped(stopped, f"{out / 'last.pt'} (at step {p.step})")
        # ---- finish: the result, and the test split scored once, by rank 0
        result = summary(cfg, d, p, pos_weight, total, start, time.perf_counter() - t0, val_seconds)
        if main and cfg.evaluate:
            result.test = evaluate(out / "best.pt", tta=cfg.tta, device=str(device), batch_size=eval_batch_size(cfg),
                                   workers=cfg.workers, claim=claim)
        if main:
            claim.write_json("result.json", result)
    return result


def summary(cfg: ClassifierConfig, d: Data, p: Progress, pos_weight: float | None, total: int, start: int,
            seconds: float, val_seconds: float) -> TrainResult:
    """What `train` returns and writes to result.json (the test metrics are added by the caller)."""
    out, global_batch = Path(cfg.out), d.batch * dist.world_size()
    trained = (p.step - start) * global_batch
    log.info("trained %d steps in %.1f s (%.1f s validating); best val AUC %.4f at step %d", p.step - start,
             seconds, val_seconds, p.best_auc, p.best_step)
    return TrainResult(str(out), str(out / "best.pt"), str(out / "last.pt"), p.best_auc, p.best_step, p.step, total,
                       p.step * global_batch, d.n_real, len(d.train_set) - d.n_real, len(d.split["val"]),
                       len(d.split["test"]), pos_weight, seconds, val_seconds,
                       trained / max(1e-9, seconds - val_seconds) if trained else None)


# ----------------------------------------------------------------------------------------------
# Evaluation and prediction


def load_classifier(checkpoint: str | Path, device: str | torch.device | None = None
                    ) -> tuple[torch.nn.Module, Normalise, dict]:
    """(model in eval mode, its Normalise, the checkpoint dict) from a best.pt or last.pt."""
    path = Path(checkpoint)
    state = checkpoints.load_state(path, FORMAT, "melano classifier checkpoint (best.pt or last.pt of `melano.classifier train`)")
    if state.get("version") != VERSION:
        raise cli.UsageError(f"{path}: classifier checkpoint version {state.get('version')}, this code reads "
                         f"{VERSION}; retrain with this version of melano")
    return (*load_model(state, pick_device(device if device is None else str(device))), state)


def inference_dtype(saved_config: dict, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a checkpoint's config asks for, on CUDA; full precision on CPU."""
    return precision.amp_setup(saved_config.get("amp", "auto"), device)[0] if device.type == "cuda" else None


def evaluate(checkpoint: str | Path, split: str = "test", out_dir: str | Path | None = None,
             tta: bool = False, data_dir: str | None = None, split_csv: str | None = None,
             cache_dir: str | None = None, device: str | None = None, batch_size: int = 64,
             workers: int | None = None, level: float = 0.95, force: bool = False,
             claim: outdir.Claim | None = None) -> dict:
    """Score one split of the checkpoint's data folder (the split its training used): write
    <split>_predictions.csv and <split>_metrics.json into `out_dir`, claimed for "evaluate" (see
    melano.infra.outdir), or through the trainer's `claim`; return the metrics. `data_dir`,
    `split_csv` and `cache_dir` override the checkpoint's paths (e.g. after moving the data)."""
    if split not in data.SPLITS:
        raise cli.UsageError(f"split must be one of {data.SPLITS}, got {split!r}")
    model, norm, state = load_classifier(checkpoint, device)
    if (out_dir is None) == (claim is None):
        raise cli.UsageError("evaluate: give one output folder (--out)")
    dev = next(model.parameters()).device
    saved = state["config"]
    cfg = ClassifierConfig(**{**saved, "data": data_dir or saved["data"],
                              "split_csv": split_csv or saved["split_csv"], "cache_dir": cache_dir or saved["cache_dir"]})
    if not Path(cfg.data).is_dir():
        raise cli.UsageError(f"{cfg.data}: the data folder {checkpoint} was trained on is not there; pass --data "
                             f"(and --split-csv) where it is now")
    if claim is None:
        outdir.check(out_dir, "evaluate", force=force, can_resume=False, data=[cfg.data])  # before any work
    cache = data.build_cache(data.read_index(cfg.data), state["image_size"], data.cache_path(cfg), workers)
    names = load_split(cfg, cache, draw=False)[split]
    loader = data.make_loader(unit_dataset(cache, names), batch_size, workers=workers)
    logits, y = infer(model, norm, loader, dev, tta=tta, amp_dtype=inference_dtype(saved, dev))
    probs = sigmoid(logits)
    auc, low, high = metrics.delong_ci(y, probs, level=level)
    with contextlib.ExitStack() as stack:
        if claim is None:
            claim = stack.enter_context(outdir.claim(out_dir, "evaluate", force=force, can_resume=False,
                                                     data=[cfg.data]))
        pred_path = claim.write_text(f"{split}_predictions.csv", predictions_csv(names, y, probs))
        metrics_path = claim.path(f"{split}_metrics.json")
        result = {"checkpoint": str(checkpoint), "split": split, "auc": auc, "ci_low": low, "ci_high": high,
                  "level": level, "images": len(names), "malignant": int(y.sum()), "tta": tta,
                  "predictions": str(pred_path), "metrics": str(metrics_path)}
        claim.write_json(metrics_path, result)
    log.info("%s AUC %.4f (%.0f%% DeLong CI %.4f-%.4f) on %d images, %d malignant%s", split, auc, 100 * level,
             low, high, len(names), int(y.sum()), ", TTA" if tta else "")
    return result


def score_arrays(checkpoint: str | Path, images: np.ndarray, batch_size: int = 256,
                 device: str | None = "cpu") -> np.ndarray:
    """Logits of a checkpoint for (N, H, W, 3) uint8 images (e.g. a cache's memmap), resized
    (antialiased bilinear) to the checkpoint's size when they differ."""
    model, norm, state = load_classifier(checkpoint, device)
    dev, size = next(model.parameters()).device, state["image_size"]
    out = []
    for i in range(0, len(images), batch_size):
        x = to_tensor(np.array(images[i:i + batch_size]))
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(infer(model, norm, [(x, torch.zeros(len(x)))], dev, amp_dtype=inference_dtype(state["config"], dev))[0])
    return np.concatenate(out) if out else np.zeros(0)


def list_images(images: str | Path | Sequence[str | Path]) -> tuple[list[Path], list[data.Skipped]]:
    """(image files, skipped entries) of an image file, a folder (its .jpg/.jpeg/.png files, sorted,
    not recursive) or a list of files. A folder's links that do not resolve, or that loop, are
    skipped and counted; a named file that is missing is an error."""
    if isinstance(images, (str, Path)) and Path(images).is_dir():
        p, files, skipped = Path(images), [], []
        for f in sorted(p.iterdir()):
            if f.suffix.lower() not in data.IMAGE_EXTS:
                continue
            if f.is_file():
                files.append(f)
            elif f.is_symlink():
                skipped.append(data.Skipped(str(f), data.link_problem(str(f)) or "a link to a folder"))
        if not files and not skipped:
            raise cli.UsageError(f"{p}: no {'/'.join(data.IMAGE_EXTS)} files in this folder (not searched "
                                 f"recursively; for a Kaggle layout pass DIR/jpeg/train)")
        return files, skipped
    files = [Path(f) for f in ([images] if isinstance(images, (str, Path)) else images)]
    for f in files:
        if not f.is_file():
            why = f.is_symlink() and (data.link_problem(str(f)) or "a link to a folder")
            raise FileNotFoundError(f"{f}: {why or 'no such image file'}")
    return files, []


def predict(checkpoint: str | Path, images: str | Path | Sequence[str | Path], out_csv: str | Path | None = None,
            tta: bool = False, device: str | None = None, batch_size: int = 64, strict: bool = False,
            max_pixels: int = data.MAX_PIXELS, force: bool = False) -> list[tuple[str, float]]:
    """[(path, malignancy probability), ...] of the images, also written to `out_csv` (image,
    probability) if given. Images are decoded, resized and cropped as the training cache does. An
    unreadable one (corrupt, not an image, over `max_pixels`, a broken link) is skipped and counted,
    or with `strict` an error. `out_csv` follows melano.infra.outdir's rule for one file
    (`check_file`): checked first, written atomically, never an input or inside the images folder,
    and never a file predict did not write unless `force`."""
    files, skipped = list_images(images)
    folder = [images] if isinstance(images, (str, Path)) and Path(images).is_dir() else []
    inputs = [checkpoint, *files]
    if out_csv is not None:
        outdir.check_file(out_csv, "predict", force=force, inputs=inputs, data=folder)
    model, norm, state = load_classifier(checkpoint, device)
    dev = next(model.parameters()).device
    for s in skipped:
        skip(s, strict)
    results: list[tuple[str, float]] = []
    with torch.inference_mode():
        for i in progress(range(0, len(files), batch_size), total=-(-len(files) // batch_size), desc="predict"):
            arrays, read = [], []
            for f in files[i:i + batch_size]:
                try:
                    arrays.append(data.load_image(f, state["image_size"], max_pixels=max_pixels))
                    read.append(f)
                except Exception as e:  # corrupt, truncated, empty, not an image, too large
                    skipped.append(data.Skipped(str(f), f"{type(e).__name__}: {e}"))
                    skip(skipped[-1], strict)
            if not arrays:
                continue
            x = to_tensor(np.stack(arrays))  # as unit_dataset: pixel/255, then Normalise
            logits, _ = infer(model, norm, [(x, torch.zeros(len(x)))], dev, tta=tta,
                              amp_dtype=inference_dtype(state["config"], dev))
            results += [(str(f), float(p)) for f, p in zip(read, sigmoid(logits))]
    log.info("predict: %d image(s) scored, %d skipped", len(results), len(skipped))
    if not results:
        raise cli.UsageError(f"{images}: none of the {len(skipped)} image(s) could be read (see the lines above)")
    if out_csv is not None:
        text = csv_text(["image", "probability"], [(n, repr(p)) for n, p in results])
        outdir.write_file(out_csv, text, "predict", force=force, inputs=inputs, data=folder)
        log.info("wrote %d probabilities to %s", len(results), out_csv)
    return results


def skip(s: data.Skipped, strict: bool) -> None:
    if strict:
        raise cli.UsageError(f"{s.name}: cannot read this image ({s.reason}) [--strict: fix or remove it, or run "
                             f"without --strict to skip it]")
    log.warning("skipped %s: %s", s.name, s.reason)


# ----------------------------------------------------------------------------------------------
# CLI


@dataclass
class EvaluateConfig:
    checkpoint: str = option(help="best.pt (or last.pt) from `train`")
    out: str = option(help="folder for <split>_predictions.csv and <split>_metrics.json (a new or empty one, or an "
                           "earlier evaluate's with --force); never inside the data folder")
    split: str = option("test", "which split to score", choices=data.SPLITS)
    force: bool = option(False, "write into --out even if it holds other files or an earlier evaluate's outputs")
    data: str | None = option(None, "data folder, if moved since training")
    split_csv: str | None = option(None, "splits.csv, if moved since training")
    cache_dir: str | None = option(None, "cache folder. none: the one used in training")
    tta: bool = option(False, "average the logits of the 4 flips")
    device: str | None = option(None, "cpu, cuda, ... none: CUDA when available")
    batch_size: int = option(64, "images per forward pass", min=1)
    workers: int | None = option(None, "DataLoader workers", min=0)

    def __post_init__(self):
        options.check_options(self)


@dataclass
class PredictConfig:
    checkpoint: str = option(help="best.pt (or last.pt) from `train`")
    images: str = option(help="an image file (.jpg/.jpeg/.png) or a folder of them")
    out: str | None = option(None, "CSV to write (image, probability), atomically; an existing file only if an "
                                   "earlier predict wrote it (else --force), never an input or a file inside --images. "
                                   "none: JSON lines on stdout")
    force: bool = option(False, "replace --out even if predict did not write it (never an input)")
    strict: bool = option(False, "stop at the first image that cannot be read, instead of skipping it")
    max_pixels: int = option(data.MAX_PIXELS, "refuse (skip) images with more pixels than this, before decoding "
                                              "(decompression bombs); raise it for a real larger image", min=1)
    tta: bool = option(False, "average the logits of the 4 flips")
    device: str | None = option(None, "cpu, cuda, ... none: CUDA when available")
    batch_size: int = option(64, "images per forward pass", min=1)

    def __post_init__(self):
        options.check_options(self)


def _train_command(args) -> None:
    result = train(options.from_args(ClassifierConfig, args))
    if dist.is_main():
        print(json.dumps(to_jsonable(result)))


def _evaluate_command(args) -> None:
    c = options.from_args(EvaluateConfig, args)
    result = evaluate(c.checkpoint, split=c.split, out_dir=c.out, tta=c.tta, data_dir=c.data, split_csv=c.split_csv,
                      cache_dir=c.cache_dir, device=c.device, batch_size=c.batch_size, workers=c.workers,
                      force=c.force)
    print(json.dumps(to_jsonable(result)))


def _predict_command(args) -> None:
    c = options.from_args(PredictConfig, args)
    rows = predict(c.checkpoint, c.images, out_csv=c.out, tta=c.tta, device=c.device, batch_size=c.batch_size,
                   strict=c.strict, max_pixels=c.max_pixels, force=c.force)
    if c.out is None:
        for name, prob in rows:
            print(json.dumps({"image": name, "probability": prob}))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m melano.classifier", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    commands = {"train": (ClassifierConfig, _train_command,
                          "fine-tune on a folder's training split; keep the best validation AUC"),
                "evaluate": (EvaluateConfig, _evaluate_command,
                             "score a checkpoint on its data's test (or val) split, with DeLong CI"),
                "predict": (PredictConfig, _predict_command,
                            "malignancy probability of image files; prints JSON lines or writes CSV")}
    for name, (cls, _, help_text) in commands.items():
        s = sub.add_parser(name, help=help_text)
        options.add_options(s, cls, required=("data", "out") if name == "train" else ())
        cli.add_debug(s)
    args = p.parse_args(argv)
    setup_logging()
    return cli.cli(lambda: commands[args.cmd][1](args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
