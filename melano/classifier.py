"""Fine-tune an EfficientNet to tell melanoma (1) from benign lesions (0); evaluate it; predict.

    python -m melano.classifier train --data DIR [--extra DIR ...] --out DIR [--arch NAME] ...
    python -m melano.classifier evaluate --checkpoint OUT/best.pt [--tta]
    python -m melano.classifier predict --checkpoint PATH IMAGE_OR_DIR [--out CSV]
    torchrun --nproc-per-node K -m melano.classifier train ...   # K processes (GPUs); see melano.dist

`train` reads top to bottom: data (the folder's patient-grouped split, uint8 caches), model,
optimiser, then the loop. The model has one logit and learns with BCE-with-logits, optionally
weighting the positive class; AdamW's learning rate warms up linearly, then follows a cosine to 0.
After every epoch (or every --val-every steps) it scores the WHOLE validation split and keeps the
checkpoint with the highest validation ROC AUC: one AUC over all predictions, never a mean of
per-batch AUCs, which would be a different (and noisier) number.

`--extra DIR` adds training-only images, e.g. the synthetic melanomas of `cyclegan translate`.
They never enter validation or test, and a folder whose images (by name, patient, or the
`source_image` column) come from the validation or test split is refused: that would leak.

Outputs, in --out:
    config.json            the run's config
    last.pt                what --resume needs: model, optimiser, step, best AUC, RNG states
    best.pt                the model with the best validation AUC (what evaluate and predict use)
    history.csv            step, epoch, lr, train_loss, val_loss, val_auc at each validation
    val_predictions.csv    image_name, target, probability of best.pt on the whole validation split
    test_predictions.csv   the same on the test split, written by evaluate
    test_metrics.json      the test AUC with its DeLong 95% CI, and the counts

Checkpoints hold only tensors and plain data (arch name, image size, mean/std, the config), so
`load_checkpoint` reads them with weights_only=True and `predict` can rebuild the model alone.
The LR schedule is a pure function of the step, so the step is all the scheduler state there is.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import augment, data, dist, metrics
from .common import (atomic_save, atomic_write_text, load_checkpoint, log_config, pick_device, progress,
                     save_json, seed_everything, setup_logging, to_jsonable)
from .efficientnet import config as model_config
from .efficientnet import efficientnet

log = logging.getLogger("melano.classifier")

FORMAT = "melano.classifier"  # the "format" entry of every checkpoint this module writes
VERSION = 1
LEAK_COLUMN = "source_image"  # column of an --extra folder's train.csv naming the image it came from
# Config fields that may change between a run and its --resume; every other field must match.
RESUMABLE_CHANGES = {"resume", "epochs", "max_steps", "device", "workers", "threads", "evaluate", "tta",
                     "eval_batch_size", "out"}


@dataclass
class ClassifierConfig:
    data: str  # ISIC-style folder (see melano.data); its split gives train / val / test
    out: str  # run folder: checkpoints, predictions, history
    extra: list[str] = field(default_factory=list)  # training-only folders, e.g. cyclegan translate output
    split_csv: str | None = None  # the experiment's splits.csv (default <data>/splits.csv); drawn if absent
    cache_dir: str = "runs/cache"  # where the uint8 image caches live (shared by every run)
    val_frac: float = 0.15  # split fractions and seed: used only when split_csv is drawn anew
    test_frac: float = 0.15
    split_seed: int = 0
    arch: str = "tf_efficientnet_lite0"
    pretrained: bool = True  # the offline ImageNet weights (tf_efficientnet_lite0 only)
    weights: str | None = None  # a checkpoint path or URL instead (any layout load_pretrained knows)
    size: int | None = None  # image side in pixels; None: the model's native resolution
    drop_rate: float | None = None  # dropout before the head; None: the variant's default
    drop_path_rate: float | None = None  # stochastic depth; None: the variant's default
    epochs: int = 10
    batch_size: int = 32
    max_steps: int | None = None  # stop after this many steps in total (the LR schedule then ends there)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 1e-2  # AdamW's, on weights only (not biases or BatchNorm)
    warmup: float = 0.05  # share of the total steps spent warming the LR up linearly
    pos_weight: str = "none"  # "none", "auto" (= benign / malignant in training), or a number
    augment: str = "none"  # "none" or "traditional" (flips, rotations, crops on each batch)
    seed: int = 0
    val_every: int = 0  # validate every N steps; 0: once per epoch (and always at the last step)
    eval_batch_size: int | None = None  # None: twice the batch size
    tta: bool = False  # test-time augmentation: average the logits of the 4 flips
    evaluate: bool = True  # after training, score best.pt on the test split
    channels_last: bool = True  # NHWC: about 2-3x faster for depthwise convs on CPU, faster on GPU
    amp: bool = True  # bfloat16 autocast on CUDA (ignored on CPU)
    device: str | None = None  # None: cuda if available, else cpu
    workers: int | None = None  # DataLoader workers; None: melano.data.default_loader_workers()
    threads: int | None = None  # torch CPU threads; None: torch's default
    resume: bool = False  # continue from <out>/last.pt

    def __post_init__(self) -> None:
        self.extra = [str(e) for e in (self.extra or [])]
        self.pos_weight = str(self.pos_weight)


# ----------------------------------------------------------------------------------------------
# Pieces of the training loop


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak LR for optimiser step `step` (0-based): linear warm-up from
    1/warmup_steps to 1 over `warmup_steps` steps, then a half cosine down to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def parse_pos_weight(value: str, n_pos: int, n_neg: int) -> float | None:
    """--pos-weight: "none" -> None, "auto" -> n_neg / n_pos, else a positive number."""
    value = str(value).strip().lower()
    if value == "none":
        return None
    if value == "auto":
        if n_pos == 0:
            raise ValueError("--pos-weight auto: the training set has no malignant images")
        return n_neg / n_pos
    try:
        w = float(value)
    except ValueError:
        raise ValueError(f"--pos-weight must be 'none', 'auto' or a positive number, got {value!r}") from None
    if not w > 0 or not math.isfinite(w):
        raise ValueError(f"--pos-weight must be a positive number, got {value!r}")
    return w


def check_config(cfg: ClassifierConfig) -> None:
    """Refuse a config that cannot train, naming the option and the fix."""
    if not Path(cfg.data).is_dir():
        raise FileNotFoundError(f"--data {cfg.data}: no such folder (expected an ISIC-style folder with "
                                f"train.csv + jpeg/train/, or benign/ + malignant/; `python -m melano.data "
                                f"synth --out DIR` writes one)")
    for d in cfg.extra:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"--extra {d}: no such folder")
    model_config(cfg.arch)  # raises with the list of known names
    problems = []
    if cfg.augment not in ("none", "traditional"):
        problems.append(f"--augment must be 'none' or 'traditional', got {cfg.augment!r}")
    if cfg.epochs < 1:
        problems.append(f"--epochs must be at least 1, got {cfg.epochs}")
    if cfg.batch_size < 2:
        problems.append(f"--batch-size must be at least 2 (BatchNorm needs 2 images), got {cfg.batch_size}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        problems.append(f"--max-steps must be at least 1, got {cfg.max_steps}")
    if not 0 <= cfg.warmup < 1:
        problems.append(f"--warmup is a share of the steps in [0, 1), got {cfg.warmup}")
    if not cfg.lr > 0 or cfg.weight_decay < 0:
        problems.append(f"--lr must be > 0 and --weight-decay >= 0, got {cfg.lr}, {cfg.weight_decay}")
    if cfg.size is not None and cfg.size < 32:
        problems.append(f"--size must be at least 32 pixels (EfficientNet downsamples 32x), got {cfg.size}")
    if cfg.val_frac <= 0:
        problems.append("--val-frac must be > 0: model selection needs a validation split")
    if cfg.weights and not cfg.pretrained:
        problems.append("--weights and --no-pretrained contradict each other; drop one")
    if problems:
        raise ValueError("bad classifier config:\n  " + "\n  ".join(problems))
    parse_pos_weight(cfg.pos_weight, 1, 1)


def image_size(cfg: ClassifierConfig) -> int:
    return cfg.size or model_config(cfg.arch).resolution


def build_model(cfg: ClassifierConfig) -> torch.nn.Module:
    """One-logit EfficientNet; ImageNet weights from --weights, or the offline ones with --pretrained."""
    pretrained: bool | str = cfg.weights if cfg.weights else cfg.pretrained
    return efficientnet(cfg.arch, num_classes=1, pretrained=pretrained, drop_rate=cfg.drop_rate,
                        drop_path_rate=cfg.drop_path_rate)


def unit_dataset(cache: data.Cache, items) -> data.ClassifierDataset:
    """Images as float pixel/255 in [0, 1]: augmentation runs on the batch before normalisation."""
    return data.ClassifierDataset(cache, items, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


class Normalise(torch.nn.Module):
    """[0, 1] images -> (x - mean) / std with the weights' statistics, in the model's memory format."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)


def _autocast(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


@torch.inference_mode()
def infer(model: torch.nn.Module, norm: Normalise, loader, device: torch.device, tta: bool = False,
          amp: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(logits, targets) of every image the loader yields, in its order; float64 numpy arrays.

    Logits stay on the device until the end (no per-batch sync). With `tta` the logit is the mean
    over the identity, horizontal, vertical and both flips."""
    was_training = model.training
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        x = norm(x.to(device, non_blocking=True))
        with _autocast(device, amp):
            if tta:
                z = torch.stack([model(x.flip(dims)).float() for dims in ((), (3,), (2,), (2, 3))]).mean(0)
            else:
                z = model(x).float()
        logits.append(z.squeeze(1))
        targets.append(y)
    model.train(was_training)
    return (torch.cat(logits).double().cpu().numpy(), torch.cat(targets).double().numpy())


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def write_predictions(path: Path, names: Sequence[str], targets: np.ndarray, probs: np.ndarray) -> None:
    """image_name, target, probability: the CSV melano.report reads."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image_name", "target", "probability"])
    for n, t, p in zip(names, targets, probs):
        w.writerow([n, int(t), repr(float(p))])  # repr: every digit, so the AUC recomputes exactly
    atomic_write_text(buf.getvalue(), path)


def load_split(cfg: ClassifierConfig, cache: data.Cache, draw: bool = True) -> dict[str, list[str]]:
    """The experiment's split: read `split_csv`, or draw it there (patient-grouped) if absent and
    `draw`. Evaluation never draws: a new split could put training images into the test set."""
    split_csv = Path(cfg.split_csv) if cfg.split_csv else Path(cfg.data) / "splits.csv"
    if not draw and not split_csv.is_file():
        raise FileNotFoundError(f"{split_csv}: the split this model was trained with is missing; pass the "
                                f"splits.csv of its training run (--split-csv), so that the test images are "
                                f"the ones it never saw")
    split = data.make_split(cache, split_csv, cfg.val_frac, cfg.test_frac, cfg.split_seed)
    for s in ("val", "test"):
        y = cache.targets[cache.rows(split[s])]
        if len(split[s]) == 0 or y.min() == y.max():
            raise ValueError(f"{split_csv}: the {s} split has {len(split[s])} images and {int(y.sum())} malignant; "
                             f"its AUC needs both classes. Add malignant images or raise --{s}-frac, and "
                             f"delete {split_csv} to draw a new split.")
    return split


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
        raise ValueError(f"--extra {extra.root}: {len(leaks)} image(s) leak the held-out splits into training: "
                         f"{'; '.join(leaks[:5])}{more}. Extra images must derive from training-split images "
                         f"only: regenerate them from the training split (cyclegan translate --split train).")
    if extra.records and LEAK_COLUMN not in extra.records[0].extra:
        log.info("--extra %s: no %s column, so only names and patients were checked for leakage",
                 extra.root, LEAK_COLUMN)


def checkpoint_meta(cfg: ClassifierConfig, mean: Sequence[float], std: Sequence[float]) -> dict:
    """What `load_classifier` needs to rebuild the model, as plain data."""
    return {"format": FORMAT, "version": VERSION, "arch": cfg.arch, "num_classes": 1,
            "image_size": image_size(cfg), "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "channels_last": cfg.channels_last, "config": to_jsonable(cfg)}


def _check_resume(saved: dict, cfg: ClassifierConfig, path: Path) -> None:
    now = to_jsonable(cfg)
    diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in now
            if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)]
    if diff:
        raise ValueError(f"{path} was trained with a different config; --resume needs the same one. "
                         f"Differences: {'; '.join(diff)}. Use a new --out to start another run.")


def _install_stop_handlers(stop: dict) -> dict:
    """SIGINT/SIGTERM ask the loop to stop after the current step (and save last.pt); a second
    signal stops at once, except under torchrun, which forwards the signal it got (a scheduler may
    signal the workers too) and kills the workers itself after its timeout: there repeats are
    ignored. Only the main thread can install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        if stop["requested"]:
            if dist.world_size() > 1:
                return
            raise KeyboardInterrupt
        stop["requested"] = signal.Signals(signum).name
        log.warning("%s: stopping after this step and saving last.pt (again to stop now)", stop["requested"])

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


# ----------------------------------------------------------------------------------------------
# Training


def train(cfg: ClassifierConfig) -> dict:
    """Fine-tune, keep the best validation AUC, optionally evaluate on the test split.

    Returns {"out", "best_checkpoint", "last_checkpoint", "best_val_auc", "best_step", "steps",
    "total_steps", "train_images", "extra_images", "val_images", "test_images", "pos_weight",
    "val_predictions", "history", "seconds", "val_seconds", "train_images_per_s"}, plus "test" (the dict of
    `evaluate`) when cfg.evaluate. Raises KeyboardInterrupt after saving last.pt when stopped by
    SIGINT/SIGTERM; rerun with resume=True to continue.

    Under torchrun (see melano.dist) the model is wrapped in DDP, cfg.batch_size is per process,
    each rank trains on its shard of every epoch's order with its own augmentation and dropout,
    every rank scores its share of the validation split and the predictions are gathered (each
    image once) before the AUC. Only rank 0 writes files and evaluates on the test split.
    """
    check_config(cfg)
    device = dist.init_from_env(cfg.device)
    world, main = dist.world_size(), dist.is_main()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out / "last.pt", out / "best.pt"
    if last_path.exists() and not cfg.resume:
        raise FileExistsError(f"{last_path} exists: pass --resume to continue that run, or use another --out "
                              f"(or delete the folder) to start afresh")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if main:
        log_config({**to_jsonable(cfg), "world_size": world, "global_batch_size": world * cfg.batch_size},
                   out / "config.json")
    size = image_size(cfg)
    mcfg = model_config(cfg.arch)
    mean, std = mcfg.mean, mcfg.std

    # --- data: the folder's split; --extra folders join the training set only
    with dist.local_main_first():  # one process per node builds the caches and draws the split
        cache = data.build_cache(data.read_index(cfg.data), size, cfg.cache_dir, cfg.workers)
        split = load_split(cfg, cache)
        train_sets = [unit_dataset(cache, split["train"])]
        for d in cfg.extra:
            index = data.read_index(d)
            check_extra_leakage(index, cache, split)
            extra_cache = data.build_cache(index, size, cfg.cache_dir, cfg.workers)
            train_sets.append(unit_dataset(extra_cache, range(len(extra_cache))))
    train_set = torch.utils.data.ConcatDataset(train_sets)
    if len(train_set) < 2:
        raise ValueError(f"{cfg.data}: the training split has {len(train_set)} image(s); BatchNorm needs at least 2")
    y_train = np.concatenate([ds.targets for ds in train_sets])
    n_pos, n_neg = int(y_train.sum()), int(len(y_train) - y_train.sum())
    pos_weight = parse_pos_weight(cfg.pos_weight, n_pos, n_neg)
    val_set = unit_dataset(cache, split["val"])
    eval_bs = cfg.eval_batch_size or 2 * cfg.batch_size
    # each rank scores its DistributedSampler share of the validation split (padded to equal shares)
    val_index = list(torch.utils.data.DistributedSampler(val_set, world, dist.rank(), shuffle=False))
    val_loader = data.make_loader(val_set, eval_bs, sampler=val_index, workers=cfg.workers)
    n_extra = len(train_set) - len(train_sets[0])
    log.info("training on %d images (%d malignant, %d of them from --extra), validating on %d; pos_weight %s",
             len(train_set), n_pos, n_extra, len(val_set), pos_weight)

    # --- model and optimiser (no weight decay on biases and BatchNorm, as usual)
    seed_everything(cfg.seed)
    model = build_model(cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    norm = Normalise(mean, std, cfg.channels_last).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                            lr=cfg.lr, fused=device.type == "cuda")
    pw = None if pos_weight is None else torch.tensor(pos_weight, device=device)
    # on CPU: the same transforms on any device; each rank augments its images differently
    aug_gen = torch.Generator().manual_seed(dist.rank_seed(cfg.seed + 1))
    if dist.rank() > 0:  # and draws its own dropout masks (rank 0 keeps the single-process stream)
        torch.manual_seed(dist.rank_seed(cfg.seed))

    batch = min(cfg.batch_size, len(train_set) // world)  # per process
    if batch < 2:
        raise ValueError(f"{len(train_set)} training images cannot give each of {world} processes a batch of 2 "
                         f"(BatchNorm needs 2); use fewer processes")
    # the remainder is dropped (a batch of 1 breaks BatchNorm); a step uses world x batch images
    steps_per_epoch = len(train_set) // (batch * world)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    warmup_steps = round(cfg.warmup * total)
    meta = checkpoint_meta(cfg, mean, std)

    step, best_auc, best_step, history = 0, -math.inf, -1, []
    loss_sum, loss_count = torch.zeros((), device=device), 0
    resumed = False
    if cfg.resume and last_path.exists():
        state = load_checkpoint(last_path)
        if not isinstance(state, dict) or state.get("format") != FORMAT or "optimizer" not in state:
            raise ValueError(f"{last_path}: not a melano classifier training checkpoint; use another --out")
        _check_resume(state["config"], cfg, last_path)
        if state.get("world_size", 1) != world:
            raise ValueError(f"{last_path} was trained by {state.get('world_size', 1)} process(es), this run has "
                             f"{world}: the data order and the per-process random streams depend on it. Resume "
                             f"with the same number of processes (torchrun --nnodes x --nproc-per-node)")
        own = state["ranks"][dist.rank()] if world > 1 else state  # this rank's loss sum and random streams
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, best_auc, best_step = state["step"], state["best_auc"], state["best_step"]
        history = state["history"]
        loss_sum.fill_(own["loss_sum"])
        loss_count = state["loss_count"]
        torch.set_rng_state(own["rng"]["torch"])
        aug_gen.set_state(own["rng"]["augment"])
        if device.type == "cuda" and "cuda" in own["rng"]:
            torch.cuda.set_rng_state(own["rng"]["cuda"], device)
        resumed = True
        if state["total_steps"] != total:
            log.warning("resuming with %d total steps instead of %d: the LR schedule changes from here",
                        total, state["total_steps"])
        log.info("resumed %s at step %d (best val AUC %.4f at step %d)", last_path, step, best_auc, best_step)
    elif cfg.resume:
        log.warning("--resume: %s does not exist, starting a new run", last_path)
    starts = dist.all_gather_object((resumed, step))  # also a barrier: every rank has read last.pt
    if len(set(starts)) > 1:
        raise RuntimeError(f"the ranks start from different (resumed, step) {starts}: every process must read the "
                           f"same {last_path}; on several nodes, put --out on a filesystem they all share")
    net = dist.wrap_ddp(model, device)  # what training runs; `model` is validated and saved

    def save_last() -> None:
        rng = {"torch": torch.get_rng_state(), "augment": aug_gen.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        ranks = dist.all_gather_object({"rng": rng, "loss_sum": float(loss_sum)})  # every rank's streams
        if main:
            atomic_save({**meta, "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                         "total_steps": total, "best_auc": best_auc, "best_step": best_step, "history": history,
                         "loss_sum": float(loss_sum), "loss_count": loss_count, "rng": rng,
                         "world_size": world, **({"ranks": ranks} if world > 1 else {})}, last_path)
        dist.barrier()  # no rank goes on (or returns) before last.pt is complete

    def validate() -> None:
        nonlocal best_auc, best_step, loss_count
        dist.broadcast_buffers(model)  # every rank scores with rank 0's BatchNorm statistics
        logits, y = infer(model, norm, val_loader, device, amp=cfg.amp)
        # all ranks' predictions, each validation image once, in split order
        logits, y = dist.gather_shards(val_index, len(val_set), logits, y)
        if not np.isfinite(logits).all():
            raise FloatingPointError(f"training diverged by step {step}: the model's validation logits are "
                                     f"NaN or infinite; lower --lr (now {cfg.lr}) or check the input images")
        auc = metrics.roc_auc(y, logits)  # the whole split at once
        val_loss = float(F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(y)))
        train_loss = dist.mean({"sum": float(loss_sum)})["sum"] / max(1, loss_count)
        loss_sum.zero_()
        loss_count = 0
        history.append({"step": step, "epoch": step / steps_per_epoch, "lr": opt.param_groups[0]["lr"],
                        "train_loss": train_loss, "val_loss": val_loss, "val_auc": auc})
        improved = auc > best_auc
        if improved:
            best_auc, best_step = auc, step
        if improved and main:
            atomic_save({**meta, "model": model.state_dict(), "step": step, "val_auc": auc}, best_path)
            write_predictions(out / "val_predictions.csv", split["val"], y, sigmoid(logits))
        lines = ["step,epoch,lr,train_loss,val_loss,val_auc"]
        lines += [f"{h['step']},{h['epoch']:.4f},{h['lr']:.6g},{h['train_loss']:.6f},{h['val_loss']:.6f},"
                  f"{h['val_auc']:.6f}" for h in history]
        if main:
            atomic_write_text("\n".join(lines) + "\n", out / "history.csv")
        log.info("step %d/%d epoch %.2f: train loss %.4f, val loss %.4f, val AUC %.4f%s", step, total,
                 step / steps_per_epoch, train_loss, val_loss, auc, " (best)" if improved else "")

    # --- the loop: one optimiser step per batch; epoch e's order is a permutation seeded by
    # (seed, e), so a run resumed mid-epoch sees exactly the batches it would have seen.
    stop = {"requested": False}
    old_handlers = _install_stop_handlers(stop)
    start, start_step, val_seconds = time.perf_counter(), step, 0.0
    model.train()
    try:
        while step < total and not stop["requested"]:
            epoch, done = divmod(step, steps_per_epoch)
            # every rank draws the same order and takes its DistributedSampler-style shard of the
            # images the epoch uses (a resumable stand-in for DistributedSampler.set_epoch)
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_set))
            order = dist.shard(order[:steps_per_epoch * batch * world].tolist())[done * batch:]
            loader = data.make_loader(train_set, batch, sampler=order, workers=cfg.workers, drop_last=True)
            n_batches = min(steps_per_epoch - done, total - step)
            bar = progress(loader, total=n_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}") if main else loader
            for x, y in bar:
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * lr_factor(step, warmup_steps, total)
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if cfg.augment == "traditional":
                    x = augment.traditional(x, aug_gen)
                with _autocast(device, cfg.amp):
                    logits = net(norm(x)).squeeze(1).float()
                loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pw)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += loss.detach()  # summed on the device: no sync per step
                loss_count += 1
                if dist.max_int(bool(stop["requested"])):  # a signal to any rank: all stop after this step
                    stop["requested"] = stop["requested"] or "a signal to another process"
                end_of_epoch = step % steps_per_epoch == 0
                if end_of_epoch or step == total or (cfg.val_every and step % cfg.val_every == 0):
                    t0 = time.perf_counter()
                    validate()
                    save_last()
                    val_seconds += time.perf_counter() - t0
                if step == total or stop["requested"]:
                    break
        if stop["requested"]:
            save_last()
            raise KeyboardInterrupt(f"stopped by {stop['requested']} at step {step}; {last_path} is saved, "
                                    f"rerun with --resume to continue")
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    seconds = time.perf_counter() - start
    if main and not best_path.exists():
        raise RuntimeError(f"{best_path} is missing although training finished; delete {out} and retrain")

    result = {"out": str(out), "best_checkpoint": str(best_path), "last_checkpoint": str(last_path),
              "best_val_auc": best_auc, "best_step": best_step, "steps": step, "total_steps": total,
              "train_images": len(train_sets[0]), "extra_images": n_extra, "val_images": len(split["val"]),
              "test_images": len(split["test"]), "pos_weight": pos_weight,
              "val_predictions": str(out / "val_predictions.csv"), "history": str(out / "history.csv"),
              "seconds": seconds, "val_seconds": val_seconds,  # the loop; validation (and checkpoints)
              # training images per second of the loop without its validation passes
              "train_images_per_s": (step - start_step) * batch * world / max(1e-9, seconds - val_seconds)
              if step > start_step else None}
    log.info("trained %d steps in %.1f s (%.1f s validating; %.1f training images/s); best val AUC %.4f at "
             "step %d", step - start_step, seconds, val_seconds, result["train_images_per_s"] or 0.0,
             best_auc, best_step)
    if not main:
        return result
    if cfg.evaluate:  # on rank 0 alone: the test split is scored once, after training
        result["test"] = evaluate(best_path, tta=cfg.tta, device=str(device), batch_size=eval_bs,
                                  workers=cfg.workers)
    save_json(result, out / "result.json")
    return result


# ----------------------------------------------------------------------------------------------
# Evaluation and prediction


def load_classifier(checkpoint: str | Path, device: str | torch.device | None = None
                    ) -> tuple[torch.nn.Module, Normalise, dict]:
    """(model in eval mode, its Normalise, the checkpoint dict) from a best.pt or last.pt."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (train one with `python -m melano.classifier train`)")
    state = load_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not a melano classifier checkpoint (no format={FORMAT!r} entry; found {keys}). "
                         f"Pass the best.pt or last.pt written by `python -m melano.classifier train`.")
    if state.get("version") != VERSION:
        raise ValueError(f"{path}: classifier checkpoint version {state.get('version')}, this code reads "
                         f"{VERSION}; retrain with this version of melano")
    device = pick_device(device if device is None else str(device))
    model = efficientnet(state["arch"], num_classes=state["num_classes"])
    model.load_state_dict(state["model"])
    channels_last = state.get("channels_last", True)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    norm = Normalise(state["mean"], state["std"], channels_last).to(device)
    return model, norm, state


def evaluate(checkpoint: str | Path, split: str = "test", out_dir: str | Path | None = None,
             tta: bool = False, data_dir: str | None = None, split_csv: str | None = None,
             cache_dir: str | None = None, device: str | None = None, batch_size: int = 64,
             workers: int | None = None, level: float = 0.95) -> dict:
    """Score one split of the checkpoint's data folder (the same split its training used).

    Writes <out_dir>/<split>_predictions.csv (image_name, target, probability) and
    <split>_metrics.json; out_dir defaults to the checkpoint's folder. `data_dir`, `split_csv`
    and `cache_dir` override the paths saved in the checkpoint (e.g. after moving the data).
    Returns {"checkpoint", "split", "auc", "ci_low", "ci_high", "level", "images", "malignant",
    "tta", "predictions", "metrics"}.
    """
    if split not in data.SPLITS:
        raise ValueError(f"split must be one of {data.SPLITS}, got {split!r}")
    model, norm, state = load_classifier(checkpoint, device)
    dev = next(model.parameters()).device
    saved = state["config"]
    cfg = ClassifierConfig(**{**saved, "data": data_dir or saved["data"],
                              "split_csv": split_csv or saved["split_csv"], "cache_dir": cache_dir or saved["cache_dir"]})
    cache = data.build_cache(data.read_index(cfg.data), state["image_size"], cfg.cache_dir, workers)
    names = load_split(cfg, cache, draw=False)[split]
    loader = data.make_loader(unit_dataset(cache, names), batch_size, workers=workers)
    logits, y = infer(model, norm, loader, dev, tta=tta, amp=saved.get("amp", True))
    probs = sigmoid(logits)
    auc, low, high = metrics.delong_ci(y, probs, level=level)
    out_dir = Path(out_dir) if out_dir else Path(checkpoint).parent
    pred_path, metrics_path = out_dir / f"{split}_predictions.csv", out_dir / f"{split}_metrics.json"
    write_predictions(pred_path, names, y, probs)
    result = {"checkpoint": str(checkpoint), "split": split, "auc": auc, "ci_low": low, "ci_high": high,
              "level": level, "images": len(names), "malignant": int(y.sum()), "tta": tta,
              "predictions": str(pred_path), "metrics": str(metrics_path)}
    save_json(result, metrics_path)
    log.info("%s AUC %.4f (%.0f%% DeLong CI %.4f-%.4f) on %d images, %d malignant%s", split, auc, 100 * level,
             low, high, len(names), int(y.sum()), ", TTA" if tta else "")
    return result


def list_images(images: str | Path | Sequence[str | Path]) -> list[Path]:
    """An image file, a folder (its .jpg/.jpeg/.png files, sorted, not recursive) or a list of files."""
    if isinstance(images, (str, Path)):
        p = Path(images)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in data.IMAGE_EXTS and f.is_file())
            if not files:
                raise ValueError(f"{p}: no {'/'.join(data.IMAGE_EXTS)} files in this folder (not searched "
                                 f"recursively; for a Kaggle layout pass DIR/jpeg/train)")
            return files
        images = [p]
    files = [Path(f) for f in images]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no such image file")
    return files


def predict(checkpoint: str | Path, images: str | Path | Sequence[str | Path], out_csv: str | Path | None = None,
            tta: bool = False, device: str | None = None, batch_size: int = 64) -> list[tuple[str, float]]:
    """Malignancy probability of each image: [(path, probability), ...], also written to `out_csv`
    (columns image, probability) when given. Images go through the same decode, resize and
    centre-crop as the training cache (melano.data.load_image), at the checkpoint's size."""
    model, norm, state = load_classifier(checkpoint, device)
    dev = next(model.parameters()).device
    files = list_images(images)
    scale = torch.tensor(1.0 / 255, dtype=torch.float32)  # as unit_dataset: pixel/255, then Normalise
    results: list[tuple[str, float]] = []
    with torch.inference_mode():
        for i in progress(range(0, len(files), batch_size), total=-(-len(files) // batch_size), desc="predict"):
            chunk = files[i:i + batch_size]
            arrays = []
            for f in chunk:
                try:
                    arrays.append(data.load_image(f, state["image_size"]))
                except Exception as e:
                    raise ValueError(f"{f}: cannot read this image ({type(e).__name__}: {e})") from e
            x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().mul_(scale)
            logits, _ = infer(model, norm, [(x, torch.zeros(len(x)))], dev, tta=tta,
                              amp=state["config"].get("amp", True))
            results += [(str(f), float(p)) for f, p in zip(chunk, sigmoid(logits))]
    if out_csv is not None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image", "probability"])
        w.writerows([(n, repr(p)) for n, p in results])
        atomic_write_text(buf.getvalue(), out_csv)
        log.info("wrote %d probabilities to %s", len(results), out_csv)
    return results


# ----------------------------------------------------------------------------------------------
# CLI


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = ClassifierConfig(data="", out="")
    p.add_argument("--data", required=True, help="ISIC-style folder: train.csv + jpeg/train/ (or train/), or "
                                                 "benign/ + malignant/; its split gives train/val/test")
    p.add_argument("--extra", nargs="+", default=[], metavar="DIR",
                   help="training-only folders in the same layouts (e.g. `cyclegan translate` output); never "
                        "used for validation or test, and refused if they derive from val/test images")
    p.add_argument("--out", required=True, help="run folder for checkpoints, predictions and history")
    p.add_argument("--split-csv", default=None, metavar="CSV",
                   help="the experiment's splits.csv, shared by every arm; drawn there (patient-grouped, "
                        "stratified) if absent (default: DATA/splits.csv)")
    p.add_argument("--cache-dir", default=d.cache_dir, help=f"uint8 image caches (default {d.cache_dir})")
    p.add_argument("--val-frac", type=float, default=d.val_frac, help="validation share when drawing the split")
    p.add_argument("--test-frac", type=float, default=d.test_frac, help="test share when drawing the split")
    p.add_argument("--split-seed", type=int, default=d.split_seed, help="seed when drawing the split")
    p.add_argument("--arch", default=d.arch, help=f"EfficientNet variant (default {d.arch}); see "
                                                  f"`python -m melano.efficientnet --list`")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=d.pretrained,
                   help="start from the offline ImageNet weights (tf_efficientnet_lite0 only); "
                        "--no-pretrained starts from random weights")
    p.add_argument("--weights", default=None, metavar="P",
                   help="ImageNet checkpoint path or URL (torchvision/timm/lukemelas/melano layout) instead")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's native)")
    p.add_argument("--drop-rate", type=float, default=None, help="dropout before the head (default: variant's)")
    p.add_argument("--drop-path-rate", type=float, default=None, help="stochastic depth (default: variant's)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the training set ({d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"training batch per process; under torchrun the global batch is processes x this "
                        f"({d.batch_size})")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimiser steps in total; the LR "
                                                               "schedule then spans N steps")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate ({d.lr})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW weight decay on conv/linear weights ({d.weight_decay})")
    p.add_argument("--warmup", type=float, default=d.warmup,
                   help=f"share of the steps for the linear LR warm-up before the cosine ({d.warmup})")
    p.add_argument("--pos-weight", default=d.pos_weight,
                   help="positive-class weight in the loss: none, auto (= benign/malignant count), or a number")
    p.add_argument("--augment", choices=("none", "traditional"), default=d.augment,
                   help="traditional: random flips, rotations and resized crops of each training batch")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for weights init, batch order, augmentation")
    p.add_argument("--val-every", type=int, default=d.val_every,
                   help="validate every N steps (default 0: after each epoch, and at the last step)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="batch for validation/test (2x --batch-size)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average the 4 flips' logits")
    p.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=d.evaluate,
                   help="score best.pt on the test split after training (default yes)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=d.channels_last,
                   help="NHWC memory format (default yes: faster on CPU and GPU)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=d.amp,
                   help="bfloat16 autocast on CUDA (default yes; no effect on CPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 on <=4 cores)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt with the same config")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m melano.classifier", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="fine-tune on a folder's training split; keep the best validation AUC")
    _add_train_args(t)
    e = sub.add_parser("evaluate", help="score a checkpoint on its data's test (or val) split, with DeLong CI")
    e.add_argument("--checkpoint", required=True, help="best.pt (or last.pt) from `train`")
    e.add_argument("--split", default="test", choices=data.SPLITS, help="which split to score")
    e.add_argument("--out", default=None, help="folder for <split>_predictions.csv / _metrics.json "
                                               "(default: the checkpoint's folder)")
    e.add_argument("--data", default=None, help="data folder, if moved since training")
    e.add_argument("--split-csv", default=None, help="splits.csv, if moved since training")
    e.add_argument("--cache-dir", default=None, help="cache folder (default: the one used in training)")
    e.add_argument("--tta", action="store_true", help="average the logits of the 4 flips")
    e.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    e.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    e.add_argument("--workers", type=int, default=None, help="DataLoader workers")
    r = sub.add_parser("predict", help="malignancy probability of image files; prints JSON lines or writes CSV")
    r.add_argument("--checkpoint", required=True, help="best.pt (or last.pt) from `train`")
    r.add_argument("images", help="an image file (.jpg/.jpeg/.png) or a folder of them")
    r.add_argument("--out", default=None, help="CSV to write (image, probability); default: JSON lines on stdout")
    r.add_argument("--tta", action="store_true", help="average the logits of the 4 flips")
    r.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    r.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    args = p.parse_args(argv)
    setup_logging()
    try:
        if args.cmd == "train":
            fields = {f.name for f in dataclasses.fields(ClassifierConfig)}
            cfg = ClassifierConfig(**{k: v for k, v in vars(args).items() if k in fields})
            result = train(cfg)
            if dist.is_main():
                print(json.dumps(to_jsonable(result)))
        elif args.cmd == "evaluate":
            result = evaluate(args.checkpoint, split=args.split, out_dir=args.out, tta=args.tta, data_dir=args.data,
                              split_csv=args.split_csv, cache_dir=args.cache_dir, device=args.device,
                              batch_size=args.batch_size, workers=args.workers)
            print(json.dumps(to_jsonable(result)))
        else:
            rows = predict(args.checkpoint, args.images, out_csv=args.out, tta=args.tta, device=args.device,
                           batch_size=args.batch_size)
            if args.out is None:
                for name, prob in rows:
                    print(json.dumps({"image": name, "probability": prob}))
    except KeyboardInterrupt as e:
        log.error("%s", e or "interrupted")
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, FloatingPointError) as e:
        log.error("%s", e)
        return 2
    finally:
        dist.destroy()  # under torchrun: leave the process group cleanly
    return 0


if __name__ == "__main__":
    sys.exit(main())
