"""Fine-tune an EfficientNet to tell melanoma (1) from benign lesions (0): `train` and its config."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import data, metrics
from ..detector import Model, Normalise, infer, sigmoid, train_step
from ..pretrained import efficientnet as pretrained_efficientnet
from ..infra import checkpoints, cli, dist, outdir, precision, signals
from ..infra.cli import progress, write_run_config
from ..infra.files import to_jsonable
from ..schedules import set_lr, warmup_cosine
from .config import (FORMAT, LEAK_COLUMN, RESUMABLE, VERSION, ClassifierConfig, check_config, image_size, mean_std,
                     parse_pos_weight)
from .inference import csv_text, evaluate, load_split, predictions_csv, unit_dataset

log = logging.getLogger("melano.classifier")


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
        cache = data.build_cache(data.read_index(cfg.data, negatives=cfg.negatives), size, data.cache_path(cfg),
                                 cfg.workers)
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
            result.test = evaluate(out / "best.pt", tta=cfg.tta and cfg.tta_views, device=str(device), batch_size=eval_batch_size(cfg),
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
