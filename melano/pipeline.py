"""The experiment, end to end: does CycleGAN oversampling beat traditional augmentation, and does
it beat simply resampling the real melanomas? Stages, each in a folder of --out (default
runs/<preset>), run top to bottom by `run_stages`:

    data              the --data ISIC folder, or the built-in synthetic set; one patient-grouped
                      split (splits.csv) that every arm shares
    ood_data          the second test set (another clinic): --ood-data, or the synthetic
                      generator's second centre (other patients, skin types, scope and camera)
    gan_<k>, gan_ls_<k>      CycleGAN run k (seed + k) benign->malignant on the training split
                      only (gan_ls: with the study's noisy "label smoothing"), one per seed
    synth_<k>, synth_ls_<k>  GAN run k's synthetic melanomas, from training-split benign images,
                      to balance the classes (or --synthetic-ratio)
    arm_<arm>_<k>     one classifier per arm and seed k, each the same number of optimiser steps:
                      --clf-epochs epochs of the real training split; a CycleGAN arm's seed k
                      trains on GAN run k's images, so its seeds cover the GAN's training variance
    ood_scores        every arm and seed scored on the second test set
    quality, report   how convincing the synthetic melanomas are; metrics.json, report.md, figures

The arms: none (no augmentation), traditional (flips, rotations, crops), oversample (real melanomas
resampled to the CycleGAN arms' class ratio: the control that separates balancing from realism),
cyclegan and cyclegan_ls. --gan-* and --clf-* are the trainers' own options.

A stage done with the same parameters (its own and its inputs') is skipped, one killed half-way
resumes, and `--rerun STAGE` reruns it and what reads it. Training stages run --jobs at a time, each
in a process of its own. SIGINT/SIGTERM stops each running trainer after its step, with a
checkpoint, and the pipeline exits 128 + signal; a rerun resumes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import classifier, cyclegan, data, pretrained, quality_stage as qstage, report, synth
from .detector import sigmoid
from .translate import TranslateConfig, translate
from .infra import cli, kernels, options, outdir, signals
from .infra.checkpoints import load_checkpoint
from .infra.dist import pick_device
from .infra.files import to_jsonable
from .infra.options import option

log = logging.getLogger("melano.pipeline")

ARMS = ("none", "traditional", "oversample", "cyclegan", "cyclegan_ls")
# what the pipeline writes at the top of its run folder
ROOT_FILES = ("config.json", "metrics.json", "report.md", "roc.png", "gan_losses.png", "synthetic_samples.png")
GAN_ARMS = {"cyclegan": ("gan", "synth", "none"), "cyclegan_ls": ("gan_ls", "synth_ls", "noisy")}
PRESET_NAMES = ("smoke", "quick", "study", "full")

# The trainers' settings, offered as --gan-* and --clf-*: every field of their configs but those the
# pipeline sets itself (per stage, from its own options; the report needs `evaluate`, --jobs shares the
# cores), with the quick preset's values.
GanSettings = options.settings(
    cyclegan.CycleGANConfig, "GanSettings",
    skip=("data", "out", "split_csv", "cache_dir", "seed", "device", "label_smoothing", "gen_act", "sample_every",
          "checkpoint_every", "resume", "force"),
    size=48, ngf=16, ndf=16, n_blocks=3, batch_size=4, epochs=2, epochs_decay=3, upsample="nearest", residual=True,
    pairing="malignant", lr=4e-4, lambda_identity=0.0, channels_last=True)
ClfSettings = options.settings(
    classifier.ClassifierConfig, "ClfSettings",
    skip=("data", "out", "extra", "oversample", "split_csv", "cache_dir", "val_frac", "test_frac", "split_seed",
          "max_steps", "val_every", "augment", "seed", "eval_batch_size", "evaluate", "threads", "device",
          "resume", "force"),
    help={"epochs": "the budget: every arm trains this many epochs of the REAL training split's steps"},
    size=48, epochs=1)
# the flags' spellings from before the composition (and make_config's keywords, cfg's attributes)
ALIASES = {"gan_blocks": "gan_n_blocks", "arch": "clf_arch", "weights": "clf_weights", "pretrained": "clf_pretrained"}


@dataclasses.dataclass
class PipelineConfig:
    preset: str = option("quick", "smoke (tests; minutes), quick (default; 2-core CPU, <= 15 min), study (the "
                                  "study's own recipe), full (melano's recommended recipe at full scale, GPU)",
                         choices=PRESET_NAMES)
    data: str | None = option(None, "an ISIC folder (train.csv + jpeg/train/ or train/, or benign/ + malignant/). "
                                    "none: the built-in synthetic set, generated on first use")
    out: str | None = option(None, "run folder. none: runs/<preset>")
    seed: int = option(0, "seed for data generation, split, GANs, and the first classifier seed")
    seeds: int = option(3, "replicates per arm (seeds seed .. seed+K-1), on the same split; a CycleGAN arm's "
                           "seed k trains on the images of its own GAN run k", min=1)
    arms: list[str] = option(help=f"arms to run, from {', '.join(ARMS)}", factory=lambda: list(ARMS))
    # built-in synthetic data (ignored with --data)
    synth_benign: int = option(5000, "synthetic set: benign images", min=0)
    synth_malignant: int = option(1000, "synthetic set: malignant images", min=1)
    synth_size: int = option(64, "synthetic set: image side in pixels", min=16)
    synth_difficulty: float = option(synth.DEFAULT_DIFFICULTY, "synthetic set: class overlap", min=0, max=0.5)
    synth_ood_images: int = option(2400, "synthetic set: images of the second clinic's test set (the same "
                                         "share of melanomas; 0: none)", min=0)
    ood_data: str | None = option(None, "a second labelled folder (another clinic, the same layouts as --data), "
                                        "scored as a second, out-of-distribution test set. none: the built-in "
                                        "second clinic without --data, else no second test set")
    # split
    val_frac: float = option(0.15, "share of patients in validation", min=0, max=0.9, min_open=True)
    test_frac: float = option(0.45, "share of patients in the test split", min=0, max=0.9, min_open=True)
    # the GANs, their synthetic melanomas, and how good those are
    gan: GanSettings = option(help="both CycleGANs (melano.cyclegan train's options)", factory=GanSettings)
    gan_ls_gen_act: str = option("relu", "generator activation of the label-smoothing GAN: relu, or leaky "
                                         "(LeakyReLU 0.01, as the study's)", choices=("relu", "leaky"))
    synthetic_ratio: float = option(1.0, "synthetic + real malignant = ratio x benign in training", min=0,
                                    min_open=True)
    quality_images: int = option(96, "quality stage: translations, sources and benign images encoded per set",
                                 min=2)
    quality_reference: int = option(250, "quality stage: real melanomas encoded per split", min=2)
    # the classifiers
    clf: ClfSettings = option(help="the classifier of every arm (melano.classifier train's options)",
                              factory=ClfSettings)
    test_batch_size: int = option(128, "classifier batch for validation and test", min=1)
    device: str | None = option(None, "cpu or cuda. none: cuda when available")
    nproc_per_node: int = option(1, "processes for the gan and arm training stages; K > 1 runs them under "
                                    "torchrun (DDP, one process per GPU; batch sizes are per process)", min=1)
    jobs: int | None = option(None, "training stages run at once, each in its own process with cores/jobs "
                                    "threads: the two GANs, then the arm replicates. none: 2 on a CPU with 2 or "
                                    "more cores, else 1 (bench/README.md)", min=1)
    rerun: list[str] = option(help="rerun these stages even if done, and what reads them (arm_<arm>: every "
                                   "seed)", factory=list)

    def __post_init__(self):
        options.check_options(self)
        if self.gan.size % 4:
            raise cli.UsageError(f"--gan-size {self.gan.size}: the generator needs a multiple of 4")
        if self.val_frac + self.test_frac >= 1:
            raise cli.UsageError("--val-frac + --test-frac must leave images for training")
        bad = set(self.arms) - set(ARMS)
        if bad or not self.arms:
            raise cli.UsageError(f"--arms {' '.join(self.arms)}: choose from {', '.join(ARMS)}")
        if self.ood_data is not None and not Path(self.ood_data).is_dir():
            raise cli.UsageError(f"--ood-data {self.ood_data}: no such folder (a labelled folder in a layout "
                                 f"--data reads)")
        if self.clf.weights and not self.clf.pretrained:
            raise cli.UsageError("--weights and --no-pretrained contradict each other; drop one")

    def flat(self) -> dict:
        """The values by their flags' names, the old spellings kept: what config.json and --dry-run show."""
        return options.flat(self, ALIASES)


PRESETS: dict[str, dict] = {
    # Every stage and arm in a few minutes of 2 CPU cores; what the tests run.
    "smoke": dict(synth_benign=160, synth_malignant=60, synth_size=32, val_frac=0.2, test_frac=0.25, seeds=2,
                  synth_ood_images=60,
                  gan_size=32, gan_ngf=8, gan_ndf=8, gan_n_blocks=1, gan_batch_size=4, gan_max_steps=6,
                  clf_size=32, clf_epochs=1, clf_batch_size=32),
    # The default: a meaningful answer on a 2-core CPU in at most 15 minutes. Its GANs are small
    # (48 px, ngf 16, 3 blocks, 500 steps at lr 4e-4) and residual: they start as the identity, which the
    # quality stage scores far closer to real melanomas at this budget than the original
    # generator's first few hundred steps (the README gives both).
    "quick": dict(),
    # melano's recommended recipe at full scale, for a GPU.
    "full": dict(synth_benign=32542, synth_malignant=584, synth_size=256, test_frac=0.15, gan_size=256, gan_ngf=64,
                 gan_ndf=64, gan_n_blocks=9, gan_batch_size=1, gan_epochs=100, gan_epochs_decay=100,
                 gan_max_steps=None, gan_upsample="nearest", gan_residual=False, gan_lambda_identity=0.5,
                 gan_pairing="longest", gan_lr=2e-4, quality_images=500, quality_reference=1000, clf_size=None,
                 clf_epochs=15, clf_batch_size=32, seeds=5, gan_channels_last=False),
}
# sm823zw/Melanoma-Image-Augmentation-and-classification, point by point (its odd choices included,
# not its bugs; STUDY_DEVIATIONS lists every difference). Its classifier is EfficientNet-B4 from
# ImageNet weights, which are not packaged offline: pass them with --weights.
PRESETS["study"] = dict(
    PRESETS["full"], seeds=3, gan_size=224, gan_ngf=64, gan_ndf=64, gan_n_blocks=9, gan_batch_size=10,
    gan_epochs=11, gan_epochs_decay=349, gan_max_steps=None, gan_lr=2e-4, gan_upsample="nearest_zero",
    gan_lambda_identity=0.0, gan_pool_size=0, gan_disc="study", gan_init="default", gan_pairing="malignant",
    gan_augment_b="study", gan_ls_gen_act="leaky", synthetic_ratio=1.0, clf_arch="tf_efficientnet_b4",
    clf_size=224, clf_epochs=10, clf_batch_size=32, clf_lr=1e-4, clf_optimizer="adam", clf_schedule="constant",
    clf_weight_decay=0.0, clf_warmup=0.0, clf_mean_std="half")

STUDY_DEVIATIONS = (
    "Model selection keeps the checkpoint with the HIGHEST validation AUC; the study's code kept the lowest "
    "(`roc_auc_t < roc_auc_min`), which in practice kept the first epoch.",
    "Validation AUC is one AUC over all validation predictions; the study averaged per-batch AUCs.",
    "The split is patient-grouped and stratified, with a labelled held-out test split; the study split images "
    "at random (a patient's images, and a synthetic image and its source, could fall on both sides) and "
    "reported Kaggle leaderboard scores on the unlabelled ISIC test set.",
    "Every arm trains the same number of optimiser steps (clf_epochs epochs of the real training split); the "
    "study trained 10 epochs over data sets of different sizes.",
    "The oversample arm (real melanomas resampled with traditional augmentation) and replicated classifier "
    "seeds are melano's additions; the study ran one seed per arm.",
    "One 360-epoch GAN schedule (constant for 11 epochs, then linear decay: the study's LambdaLR factors "
    "exactly); the study's label-smoothing and LeakyReLU GANs resumed for a second 360 epochs with the "
    "learning rate restarted.",
    "The study's baseline GAN drew its benign partners only from the first 584 benign files (an indexing "
    "bug); melano draws from every training-split benign image.",
    "The generator's loss sums the two adversarial terms and the two cycle terms (weight 10 each); the study "
    "averaged each pair, which halves the loss: Adam is invariant to that constant scale.",
    "Synthetic images are written like their sources (format, resolution, JPEG tables), so that the file "
    "format cannot reveal them; the study wrote generated PNGs next to real ones.",
    "The classifier's head is one logit with BCE-with-logits; the study applied a sigmoid, then BCELoss "
    "(the same loss, computed less stably).",
)


def make_config(preset: str, **given) -> PipelineConfig:
    """A preset's config with the given settings on top, named as the flags are (gan_size, clf_arch)."""
    flat = {ALIASES.get(k, k): v for k, v in {**PRESETS[preset], **given}.items()}
    return PipelineConfig(**options.nest(PipelineConfig, {**flat, "preset": preset}))


# ----------------------------------------------------------------------------- stages

class Stages:
    """Runs named stages under `root`. A stage folder holds params.json (written when it starts)
    and done.json (written last, with the result). Same params and done.json: skip. Same params, no
    done.json: the stage was killed, so it resumes. Different params or --rerun: the folder is
    cleared, if the run's manifests (`claim`) list every file in it, and the stage reruns. Each run
    of a stage gets a fresh `run_id`, which the stages reading it list among their parameters."""

    def __init__(self, root: Path, claim: outdir.Claim, rerun: list[str]):
        self.root, self.claim, self.rerun, self.timings = root, claim, set(rerun), {}

    def check_places(self, stages: list[str], files: list[str]) -> None:
        check_places(self.root, self.claim.written, stages, files)

    def forced(self, name: str) -> bool:  # a group (arm_<arm>, gan, synth_ls, ...) names all its replicates
        return name in self.rerun or any(re.fullmatch(rf"{re.escape(f)}_\d+", name) for f in self.rerun)

    def run(self, name: str, params: dict, fn: Callable[[Path, bool], dict]) -> dict:
        CHILDREN.check()  # a signal came while a trainer was running: start nothing more
        folder = self.root / name
        params = to_jsonable(params)
        key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        done, started = folder / "done.json", folder / "params.json"
        same = started.exists() and json.loads(started.read_text()).get("key") == key
        if same and done.exists() and not self.forced(name):
            log.info("stage %-16s done before with the same parameters: skipped", name)
            saved = json.loads(done.read_text())
            self.timings[name] = saved["seconds"]
            return saved["result"]
        resume = same and not self.forced(name)
        if not resume:  # only what melano wrote; anything else stops the pipeline here
            outdir.clear(self.root, self.claim.written, name, f"the pipeline's {name} stage")
        self.claim.record_child(folder)  # a trainer writes its files here, in its own manifest
        folder.mkdir(parents=True, exist_ok=True)
        self.claim.write_json(started, {"key": key, "params": params})
        log.info("stage %-16s %s", name, "resuming" if resume else "running")
        t0 = time.monotonic()
        result = fn(folder, resume)
        self.timings[name] = time.monotonic() - t0
        result = {**to_jsonable(result), "run_id": uuid.uuid4().hex}
        self.claim.write_json(done, {"result": result, "seconds": self.timings[name]})
        return result

    def run_all(self, todo: list[tuple[str, dict, Callable]], jobs: int) -> list[dict]:
        """Independent stages, `jobs` at a time; their results in the order given. With jobs > 1
        each stage's function starts a process and waits for it, so threads are enough here."""
        if jobs == 1:
            return [self.run(*t) for t in todo]
        pool = concurrent.futures.ThreadPoolExecutor(jobs)
        try:
            return [f.result() for f in [pool.submit(self.run, *t) for t in todo]]
        finally:  # a failure or Ctrl-C starts nothing more; the stages already running finish or stop
            pool.shutdown(wait=True, cancel_futures=True)


def check_places(root: Path, written: list[str], stages: list[str], files: list[str]) -> None:
    """Refuse, before any work, a stage folder, cache or report file in `root` that the pipeline
    whose manifest is `written` did not write, or a stage folder holding files melano did not
    write. Reads only."""
    for name in stages + ["cache"]:
        path = root / name
        if not os.path.lexists(path):
            continue
        ours = f"{name}/params.json" in written or (name == "cache" and "cache/" in written)
        if not ours or os.path.islink(path) or not path.is_dir():
            raise outdir.OutputError(
                f"{path} is where the pipeline's {name} {'cache' if name == 'cache' else 'stage'} goes, but this "
                f"pipeline did not write it (is it your data, or a run of an older melano?); move it out of "
                f"{root}, or choose another --out")
        if name != "cache":  # the cache is only ever added to
            outdir.check_clearable(root, written, name, f"the pipeline's {name} stage")
    for f in files:
        if os.path.lexists(root / f) and f not in written:
            raise outdir.OutputError(f"{root / f} is where the pipeline writes its {f}, but this pipeline did "
                                     f"not write it; move it out of {root}, or choose another --out")


def default_jobs(device: str | None) -> int:
    """2 on a CPU host with 2 or more cores, else 1: two one-thread processes train the quick preset's
    small models faster than one two-thread process (bench/bench_jobs.py)."""
    return 2 if pick_device(device).type == "cpu" and (os.cpu_count() or 1) >= 2 else 1


def parallel(cfg: PipelineConfig) -> tuple[int, int | None, dict]:
    """(training stages at a time, CPU threads of each one's process (None: train in this one), and
    its processes for its parameters: they change its result, the global batch; left out at 1)."""
    jobs = 1 if cfg.nproc_per_node > 1 else cfg.jobs or default_jobs(cfg.device)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    return jobs, threads, {"nproc_per_node": cfg.nproc_per_node} if cfg.nproc_per_node > 1 else {}


def has_ood(cfg: PipelineConfig) -> bool:
    return cfg.ood_data is not None or (cfg.data is None and cfg.synth_ood_images > 0)


def stage_groups(cfg: PipelineConfig) -> list[str]:
    """The names --rerun takes for every replicate of a stage: arm_<arm>, gan, synth, gan_ls, synth_ls."""
    return [f"arm_{a}" for a in ARMS if a in cfg.arms] + [s for a, (g, syn, _) in GAN_ARMS.items()
                                                          if a in cfg.arms for s in (g, syn)]


def stage_names(cfg: PipelineConfig) -> list[str]:
    names = ["data"] + (["ood_data"] if has_ood(cfg) else [])
    for arm, (gan, syn, _) in GAN_ARMS.items():
        names += [f"{s}_{k}" for s in (gan, syn) for k in range(cfg.seeds)] if arm in cfg.arms else []
    names += [f"arm_{a}_{k}" for a in ARMS if a in cfg.arms for k in range(cfg.seeds)]
    names += ["ood_scores"] if has_ood(cfg) else []
    return names + (["quality"] if set(GAN_ARMS) & set(cfg.arms) else []) + ["report"]


def data_stage(cfg: PipelineConfig, cache_dir: Path, claim: outdir.Claim, folder: Path, resume: bool) -> dict:
    """The data folder (the built-in synthetic set is generated here) and the one split."""
    if cfg.data is None:
        src = claim.record_child(folder / "synthetic")
        synth.generate(synth.SynthConfig(out=str(src), benign=cfg.synth_benign, malignant=cfg.synth_malignant,
                                         size=cfg.synth_size, seed=cfg.seed, difficulty=cfg.synth_difficulty,
                                         workers=data.default_workers(), force=True))  # the stage owns its folder
    else:
        src = Path(cfg.data).resolve()
    cache = data.build_cache(data.read_index(src), cfg.gan.size, cache_dir)
    split_csv = claim.record(folder / "splits.csv")
    claim.record(folder / "splits.csv.json")  # make_split's record of its seed and fractions
    try:
        split = data.make_split(cache, split_csv, cfg.val_frac, cfg.test_frac, cfg.seed)
    except ValueError as e:
        raise cli.UsageError(f"{src}: cannot split it for the experiment: {e}. Give a folder with more malignant "
                             f"images (each of validation and test needs some), or change --val-frac/--test-frac"
                             ) from e
    sizes = split_sizes(cache, split)
    for s in ("val", "test"):
        if sizes[s]["malignant"] == 0 or sizes[s]["malignant"] == sizes[s]["images"]:
            raise cli.UsageError(f"the {s} split of {src} has {sizes[s]['malignant']} malignant of "
                                 f"{sizes[s]['images']} images, so its AUC is undefined; give more images or a "
                                 f"larger --{s}-frac")
    return {"data": str(src), "split_csv": str(split_csv), "split_hash": file_hash(split_csv), "split_sizes": sizes}


def ood_data_stage(cfg: PipelineConfig, d: dict, claim: outdir.Claim, folder: Path, resume: bool) -> dict:
    """The second test set: --ood-data, or the built-in generator's second centre (its own patients,
    skin types, scope and camera; the same lesion model and share of melanomas), and its patients."""
    if cfg.ood_data is None:
        src = claim.record_child(folder / "synthetic")
        n_mal = round(cfg.synth_ood_images * cfg.synth_malignant / (cfg.synth_benign + cfg.synth_malignant))
        synth.generate(synth.SynthConfig(out=str(src), benign=cfg.synth_ood_images - n_mal, malignant=n_mal,
                                         size=cfg.synth_size, seed=cfg.seed, difficulty=cfg.synth_difficulty,
                                         centre=1, workers=data.default_workers(), force=True))
    else:
        src = Path(cfg.ood_data).resolve()
    index = data.read_index(src)
    y = index.targets
    if len(index) == 0 or y.min() == y.max():
        raise cli.UsageError(f"--ood-data {src}: {len(index)} images, {int(y.sum())} malignant; a test set's AUC "
                             f"needs both classes")
    patients = claim.write_text(folder / "patients.csv", "image_name,patient_id\n" + "".join(
        f"{r.image_name},{r.patient_id}\n" for r in index.records))
    main = data.read_index(d["data"])
    return {"data": str(src), "patients_csv": str(patients), "images": len(index), "malignant": int(y.sum()),
            "patients": len(set(index.patients)), "shared_images": len(set(index.names) & set(main.names)),
            "shared_patients": len(set(index.patients) & set(main.patients))}


def gan_stage(gan_cfg: cyclegan.CycleGANConfig, nproc: int, threads: int | None, claim: outdir.Claim, folder: Path,
              resume: bool) -> dict:
    run_cfg = dataclasses.replace(gan_cfg, out=str(folder), resume=resume, force=True)  # the stage owns its folder
    if nproc > 1 or threads:
        claim.record(folder / "train.log")
        train_process("melano.cyclegan", run_cfg, nproc, threads, folder)
        ckpt = folder / cyclegan.CHECKPOINT
    else:
        ckpt = cyclegan.train(run_cfg)
    return {"checkpoint": str(ckpt), "losses": str(folder / "losses.csv"), "split_hash": file_hash(data.split_path(run_cfg))}


def synth_stage(gan: dict, d: dict, cache_dir: Path, n: int, device: str | None, claim: outdir.Claim, folder: Path,
                resume: bool) -> dict:
    images = claim.record_child(folder / "images")  # translate swaps this whole folder in; the stage's files stay beside
    translate(TranslateConfig(checkpoint=gan["checkpoint"], data=d["data"], out=str(images), limit=n,
                              split_csv=d["split_csv"], cache_dir=str(cache_dir), device=device, force=True))
    return {"folder": str(images), "images": count_rows(images / "train.csv")}


def arm_stage(clf_cfg: classifier.ClassifierConfig, nproc: int, threads: int | None, claim: outdir.Claim,
              folder: Path, resume: bool) -> dict:
    run_cfg = dataclasses.replace(clf_cfg, out=str(folder), resume=resume, force=True)  # the stage owns its folder
    if nproc > 1 or threads:
        claim.record(folder / "train.log")
        train_process("melano.classifier", run_cfg, nproc, threads, folder)
        return json.loads((folder / "result.json").read_text())  # what train() returns
    return dataclasses.asdict(classifier.train(run_cfg))


def gan_config(cfg: PipelineConfig, d: dict, cache_dir: Path, smoothing: str, k: int) -> cyclegan.CycleGANConfig:
    """GAN run k of a CycleGAN arm: its own seed, the shared split."""
    return cyclegan.CycleGANConfig(
        **dataclasses.asdict(cfg.gan), data=d["data"], split_csv=d["split_csv"], cache_dir=str(cache_dir),
        label_smoothing=smoothing, gen_act=cfg.gan_ls_gen_act if smoothing == "noisy" else "relu", seed=cfg.seed + k,
        device=cfg.device, sample_every=max(1, (cfg.gan.max_steps or 2000) // 4), checkpoint_every=200)


def arm_config(cfg: PipelineConfig, d: dict, cache_dir: Path, arm: str, k: int,
               extra: list[str], oversample: int) -> classifier.ClassifierConfig:
    """Arm `arm`, replicate k: the same budget (steps), batch and schedule as every other arm."""
    steps_per_epoch = d["split_sizes"]["train"]["images"] // cfg.clf.batch_size
    return classifier.ClassifierConfig(
        **dataclasses.asdict(cfg.clf), data=d["data"], out="", extra=extra, oversample=oversample,
        split_csv=d["split_csv"], cache_dir=str(cache_dir), val_frac=cfg.val_frac, test_frac=cfg.test_frac,
        split_seed=cfg.seed, max_steps=cfg.clf.epochs * steps_per_epoch, val_every=steps_per_epoch,
        augment="traditional" if arm in ("traditional", "oversample") else "none", seed=cfg.seed + k,
        eval_batch_size=cfg.test_batch_size, device=cfg.device)


# ----------------------------------------------------------------------------- the experiment

def run_experiment(cfg: PipelineConfig) -> dict:
    """The whole experiment. Returns the content of metrics.json. A rerun into the same --out
    continues it; an --out holding anything else, or in use by another process, is refused."""
    out = Path(cfg.out or f"runs/{cfg.preset}")
    unknown = {f for f in cfg.rerun if f not in stage_names(cfg) + stage_groups(cfg)}
    if unknown:
        raise cli.UsageError(f"--rerun {' '.join(sorted(unknown))}: not a stage; stages are "
                             f"{', '.join(stage_names(cfg))} ({', '.join(stage_groups(cfg))} for every replicate)")
    if cfg.data is not None and not Path(cfg.data).is_dir():
        raise FileNotFoundError(f"--data {cfg.data}: no such folder. Give an ISIC folder (train.csv + jpeg/train/ "
                                f"or train/, or benign/ + malignant/), or omit --data to use the built-in synthetic set")
    if cfg.clf.weights is None and cfg.clf.pretrained:  # fail before any training, saying how to get weights
        try:
            pretrained.offline_weights(cfg.clf.arch)
        except ValueError:
            raise cli.UsageError(f"--arch {cfg.clf.arch}: no pretrained weights for it ship offline (only "
                                 f"tf_efficientnet_lite0's do); pass --weights PATH_OR_URL (a checkpoint listed in "
                                 f"melano.pretrained's docstring), or --no-pretrained to start from random "
                                 f"weights") from None
    data_dirs = [d for d in (cfg.data, cfg.ood_data) if d]
    # before the claim, which rewrites the run folder's owner and lock files: a refusal changes nothing
    check_places(out, outdir.manifest(out, "pipeline"), stage_names(cfg), list(ROOT_FILES))
    with CHILDREN, outdir.claim(out, "pipeline", resume=True, data=data_dirs, can_force=False) as claim:
        stages = Stages(out, claim, cfg.rerun)
        stages.check_places(stage_names(cfg), list(ROOT_FILES))
        claim.record("config.json")
        cli.log_config(cfg.flat(), out / "config.json")
        return run_stages(cfg, stages)


def run_stages(cfg: PipelineConfig, stages: Stages) -> dict:
    """The stages, top to bottom, in the claimed run folder `stages.root`."""
    out, wall0 = stages.root, time.monotonic()
    cache_dir = out / "cache"
    stages.claim.record_child(cache_dir)  # the pipeline's; build_cache only adds to it

    # 1. data and the one split every arm shares
    data_params = {"data": cfg.data, "seed": cfg.seed, "val_frac": cfg.val_frac, "test_frac": cfg.test_frac,
                   "gan_size": cfg.gan.size}
    if cfg.data is None:
        data_params.update({k: getattr(cfg, k) for k in ("synth_benign", "synth_malignant", "synth_size",
                                                         "synth_difficulty")})
    d = stages.run("data", data_params, functools.partial(data_stage, cfg, cache_dir, stages.claim))
    ood = None
    if has_ood(cfg):
        ood_params = {"data_run": d["run_id"], "ood_data": cfg.ood_data,
                      "images": None if cfg.ood_data else cfg.synth_ood_images}
        ood = stages.run("ood_data", ood_params, functools.partial(ood_data_stage, cfg, d, stages.claim))
    n_needed = synthetic_needed(d["split_sizes"]["train"], cfg.synthetic_ratio)
    for arm in cfg.arms:  # a classifier config that cannot train fails now, not after the GANs
        classifier.check_config(arm_config(cfg, d, cache_dir, arm, 0, [], 0))

    # 2. CycleGANs and their synthetic melanomas: K runs per CycleGAN arm, one per seed
    gans = gan_stages(cfg, stages, d, cache_dir, n_needed)

    # 3. one classifier per arm and seed: same split, same test images, same steps
    arms = arm_stages(cfg, stages, d, cache_dir, n_needed, gans)
    if ood:  # and every one of them on the second clinic's test set
        ood_params = {"ood_run": ood["run_id"], "arms": {a: [r["run_id"] for r in rs] for a, rs in arms.items()}}
        ood["scores"] = stages.run("ood_scores", ood_params, functools.partial(
            ood_scores_stage, cfg, ood, arms, cache_dir, stages.claim))["predictions"]

    # 4. how good the synthetic melanomas are, scored by the real-only oversample classifier
    q = None
    if gans:
        scorer = arms["oversample"][0] if "oversample" in arms else None
        q = stages.run("quality", {"synth": [g["run_id"] for runs in gans.values() for g in runs],
                                   "scorer": scorer and scorer["run_id"], "seed": cfg.seed,
                                   "images": cfg.quality_images, "reference": cfg.quality_reference, "criteria": 1},
                       functools.partial(quality_stage, cfg, d, gans, cache_dir, scorer and scorer["best_checkpoint"],
                                         stages.claim))

    # 5. the report
    report_params = {"arms": {a: [r["run_id"] for r in rs] for a, rs in arms.items()}, "quality": q and q["run_id"],
                     "ood": ood and ood["run_id"]}
    stages.run("report", report_params, functools.partial(
        report_stage, cfg, stages.claim, d, ood, gans, arms, q, stages.timings, wall0))
    result = json.loads((out / "metrics.json").read_text())
    log.info("report: %s", out / "report.md")
    return result


def gan_stages(cfg: PipelineConfig, stages: Stages, d: dict, cache_dir: Path, n_needed: int
               ) -> dict[str, list[dict]]:
    """K GAN runs per CycleGAN arm (side by side), then each run's synthetic melanomas."""
    jobs, threads, procs = parallel(cfg)
    todo = {}
    for arm, (gan_name, _, smoothing) in GAN_ARMS.items():
        for k in range(cfg.seeds if arm in cfg.arms else 0):
            gan_cfg = gan_config(cfg, d, cache_dir, smoothing, k)
            todo[arm, k] = (f"{gan_name}_{k}", {**dataclasses.asdict(gan_cfg), "data_run": d["run_id"], "out": None,
                                                **procs},
                            functools.partial(gan_stage, gan_cfg, cfg.nproc_per_node, threads, stages.claim))
    gans: dict[str, list[dict]] = {}
    for (arm, k), g in zip(todo, stages.run_all(list(todo.values()), jobs)):
        s = stages.run(f"{GAN_ARMS[arm][1]}_{k}", {"gan_run": g["run_id"], "n": n_needed},
                       functools.partial(synth_stage, g, d, cache_dir, n_needed, cfg.device, stages.claim))
        gans.setdefault(arm, []).append({**g, "name": f"{GAN_ARMS[arm][0]}_{k}", "synthetic": s["folder"],
                                         "synthetic_images": s["images"]})
    return gans


def arm_stages(cfg: PipelineConfig, stages: Stages, d: dict, cache_dir: Path, n_needed: int,
               gans: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Every arm's classifiers, one per seed (side by side); their results by arm. A CycleGAN arm's
    seed k trains on GAN run k's synthetic melanomas."""
    jobs, threads, procs = parallel(cfg)
    todo = []
    for arm in [a for a in ARMS if a in cfg.arms]:
        for k in range(cfg.seeds):
            gan = gans[arm][k] if arm in gans else None
            extra = [gan["synthetic"]] if gan else []
            upstream = [d["run_id"]] + ([gan["run_id"]] if gan else [])
            clf_cfg = arm_config(cfg, d, cache_dir, arm, k, extra, n_needed if arm == "oversample" else 0)
            todo.append((f"arm_{arm}_{k}", {**dataclasses.asdict(clf_cfg), "out": None, "upstream": upstream, **procs},
                         functools.partial(arm_stage, clf_cfg, cfg.nproc_per_node, threads, stages.claim)))
    results = iter(stages.run_all(todo, jobs))
    return {a: [next(results) for _ in range(cfg.seeds)] for a in ARMS if a in cfg.arms}


def ood_scores_stage(cfg: PipelineConfig, ood: dict, arms: dict[str, list[dict]], cache_dir: Path,
                     claim: outdir.Claim, folder: Path, resume: bool) -> dict:
    """Each arm's best checkpoints on the second test set, decoded as the first test set is (the
    cache at the classifier's input size): one predictions CSV per arm and seed."""
    cache = data.build_cache(data.read_index(ood["data"]), classifier.config.image_size(cfg.clf), cache_dir)
    preds = {}
    for arm, runs in arms.items():
        for k, r in enumerate(runs):
            probs = sigmoid(classifier.score_arrays(r["best_checkpoint"], cache.images, device=cfg.device))
            text = classifier.inference.predictions_csv(cache.names, cache.targets, probs)
            preds.setdefault(arm, []).append(str(claim.write_text(folder / f"arm_{arm}_{k}.csv", text)))
    return {"predictions": preds}


def quality_stage(cfg: PipelineConfig, d: dict, gans: dict, cache_dir: Path, scorer: str | None, claim: outdir.Claim,
                  folder: Path, resume: bool) -> dict:
    """How good each GAN arm's synthetic melanomas are (melano.quality): distances with their scale,
    two-sample tests, translation success, hidden severity, memorisation, pictures. `scorer` is a
    classifier trained on real images only (the oversample arm's), or None for the stage's own."""
    cache = data.build_cache(data.read_index(d["data"]), cfg.gan.size, cache_dir)
    where = {n: s for s, names in data.load_split(d["split_csv"], cache).items() for n in names}
    splits = np.array([where[n] for n in cache.names])
    row = {n: i for i, n in enumerate(cache.names)}
    synthetic = {}
    for arm, runs in gans.items():
        for k, g in enumerate(runs):
            index = data.read_index(g["synthetic"])
            source_of = {r.image_name: r.extra["source_image"] for r in index.records}
            syn = data.build_cache(index, cfg.gan.size, cache_dir)  # decoded exactly as the real images
            synthetic[f"{arm}_g{k}"] = qstage.Synthetic(np.asarray(syn.images),
                                                        np.array([row[source_of[n]] for n in syn.names]))
    logits = None
    if scorer is not None:  # score what the stage needs: validation images, sources, translations
        need = (splits == "val") | np.isin(np.arange(len(splits)), np.concatenate([s.sources for s in synthetic.values()]))
        real = np.full(len(splits), np.nan)
        real[need] = classifier.score_arrays(scorer, np.asarray(cache.images)[need])
        logits = {"real": real, "synthetic": {a: classifier.score_arrays(scorer, s.images) for a, s in synthetic.items()}}
    sev = qstage.hidden_severity(d["data"])
    for key in synthetic:
        for name in qstage.picture_names(key).values():
            claim.record(folder / name)
    result = qstage.evaluate(np.asarray(cache.images), cache.targets, cache.patients, splits, synthetic,
                             severity=None if sev is None else np.array([sev[n] for n in cache.names]),
                             criteria=qstage.hidden_criteria(d["data"], cache.names),
                             logits=logits, out_dir=folder,
                             cfg=qstage.QualityConfig(max_images=cfg.quality_images,
                                                      max_reference=cfg.quality_reference, seed=cfg.seed))
    result["scorer"] = (f"the oversample arm's seed-0 classifier (real images only, {scorer})" if scorer else
                        "a logistic regression on the features of real training images")
    claim.write_json(folder / "quality.json", result)
    return {"quality": str(folder / "quality.json")}


def report_stage(cfg: PipelineConfig, claim: outdir.Claim, d: dict, ood: dict | None, gans: dict,
                 arms: dict[str, list[dict]], q: dict | None, timings: dict, wall0: float, folder: Path,
                 resume: bool) -> dict:
    """metrics.json, report.md and the figures, from the arms' saved test predictions."""
    out = Path(cfg.out or f"runs/{cfg.preset}")
    for name in ROOT_FILES:
        claim.record(name)
    guards = leakage_guards(d, ood, gans)
    test_sets = {"test": ({a: [r["test"]["predictions"] for r in rs] for a, rs in arms.items()}, d["split_csv"])}
    if ood:
        test_sets["ood"] = (ood["scores"], ood["patients_csv"])
    result = {
        "preset": cfg.preset, "data": d["data"], "arch": cfg.clf.arch, "size": cfg.clf.size or "native",
        "split_sizes": d["split_sizes"],
        "ood_data": ood and {k: ood[k] for k in ("data", "images", "malignant", "patients")},
        **report.experiment_metrics(*test_sets["test"], seed=cfg.seed, ood=test_sets.get("ood"),
                                    gan_runs={a: [g["name"] for g in runs] for a, runs in gans.items()}),
        "budget": {a: {"steps": rs[0]["steps"], "images_seen": rs[0]["images_seen"],
                       "batch_size": cfg.clf.batch_size} for a, rs in arms.items()},
        "synthetic_images": {a: [g["synthetic_images"] for g in runs] for a, runs in gans.items()},
        "synthetic_quality": json.loads(Path(q["quality"]).read_text()) if q else None,
        "best_val_auc": {a: [r["best_val_auc"] for r in rs] for a, rs in arms.items()},
        "leakage_guards": guards,
        "deviations_from_study": list(STUDY_DEVIATIONS) if cfg.preset == "study" else [],
        "timings_s": {k: timings[k] for k in stage_names(cfg) if k in timings},  # in stage order
        "wall_s": time.monotonic() - wall0,
        "config": cfg.flat(),
    }
    for a in result["arms"]:
        a.update(result["budget"][a["name"]])
    claim.write_json("metrics.json", result)
    report.write_report(result, out / "report.md")
    report.roc_plot({a: p[0] for a, p in test_sets["test"][0].items()}, out / "roc.png",
                    title=f"test ROC ({cfg.preset}, seed 0)")
    if gans:
        first = next(iter(gans.values()))[0]
        if report.plot_losses(first["losses"], out / "gan_losses.png") is None:
            log.info("no loss plot")
        report.image_grid(synthetic_pairs(d["data"], Path(first["synthetic"])), out / "synthetic_samples.png",
                          pad=4, cols=4, cell=128, col_gap=8)
    if not all(guards.values()):
        raise RuntimeError(f"a leakage guard failed: {guards}; see {out / 'metrics.json'}")
    return {"metrics": str(out / "metrics.json"), "report": str(out / "report.md")}


# ----------------------------------------------------------------------------- signals

class Children(signals.StopOnSignal):
    """SIGINT/SIGTERM to the pipeline, passed on to its trainer processes (by default SIGTERM would
    leave them running, orphaned). The first signal goes once to each, which saves after its step
    and exits 128 + signum; the pipeline starts nothing more, waits, and stops the same way (at once
    if no trainer runs). A later one goes to them too, and aborts; a copy of the first (a signal to
    the process group, which the children stay in) is the same request. One per process: CHILDREN."""

    doing = "the running training stages save a checkpoint after their step and stop"

    def __init__(self):
        super().__init__()
        self.busy: set[object] = set()  # train_process calls under way, trainer started or not
        self.live: dict[int, subprocess.Popen] = {}
        self.untold: dict[int, subprocess.Popen] = {}  # live, not yet sent the signal
        # a process forked from the pipeline (a Pool worker of an in-process stage) is no pipeline: SIGTERM
        # must end it as before. DataLoader workers of an in-process trainer keep that trainer's handler
        os.register_at_fork(after_in_child=functools.partial(self.restore, forked=True))

    def received(self, signum: int) -> None:
        self.tell()
        if not self.busy:  # no trainer to wait for. Raising while one starts could orphan it
            raise signals.Stopped(signum)

    def aborting(self, signum: int) -> None:
        for proc in list(self.live.values()):
            proc.send_signal(signum)

    def tell(self) -> None:
        """Send the signal to every live trainer not yet sent it. dict.pop is atomic: of the handler
        and a thread that has just started a trainer, exactly one sends it."""
        for pid in list(self.untold):
            proc = self.untold.pop(pid, None)
            if proc is not None:
                proc.send_signal(self.signum)

    def check(self) -> None:
        if self.signum:
            raise signals.Stopped(self.signum)

    @contextlib.contextmanager
    def start(self, cmd: list[str], **popen) -> Iterator[subprocess.Popen]:
        """subprocess.Popen(cmd, **popen), known to the handler until the block ends; none once
        the pipeline has been signalled."""
        token, proc = object(), None
        self.busy.add(token)  # before the check: a signal after it finds the stage busy and leaves it to us
        try:
            self.check()
            proc = subprocess.Popen(cmd, **popen)
            self.live[proc.pid] = self.untold[proc.pid] = proc
            if self.signum:  # it came while the trainer started
                self.tell()
            yield proc
        finally:
            if proc is not None:
                self.live.pop(proc.pid, None)
                self.untold.pop(proc.pid, None)
            self.busy.discard(token)


CHILDREN = Children()


# ----------------------------------------------------------------------------- helpers

def train_process(module: str, run_cfg, nproc: int, threads: int | None, folder: Path) -> None:
    """`<module> train <run_cfg's flags>` in a child process: under torchrun (--standalone, K
    processes) when nproc > 1, else one process with `threads` CPU threads and its output in
    folder/train.log (stages side by side would mix theirs). Raises if it fails or stops."""
    train = ["train", *options.to_flags(run_cfg)]
    if nproc > 1:  # torchrun dies with the pipeline, and its ranks with it
        cmd, env, sink = signals.child_command("torch.distributed.run", ["--standalone", "--nproc_per_node", str(nproc),
                                                                    "-m", module, *train]), None, None
    else:
        cmd, env = signals.child_command(module, train), {**os.environ, "OMP_NUM_THREADS": str(threads)}
        sink = open(folder / "train.log", "w")
    log.info("running %s", " ".join(cmd))
    with sink or contextlib.nullcontext(), CHILDREN.start(cmd, env=env, stdout=sink,
                                                          stderr=sink and subprocess.STDOUT) as proc:
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # a second signal: the trainer was told to abort too
            proc.wait()
            raise
    # 128 + n: the trainer saved its checkpoint and stopped. Any other failure after the pipeline was
    # signalled is that signal too: a trainer still importing dies of it; torchrun exits 1
    stopped = rc - 128 if rc - 128 in (signal.SIGINT, signal.SIGTERM) else CHILDREN.signum if rc else 0
    if stopped:
        log.warning("stage %s stopped by %s (exit code %d); rerun the pipeline to resume it from its checkpoint",
                    folder.name, signal.Signals(stopped).name, rc)
        raise signals.Stopped(stopped)
    if rc != 0:
        log_path = folder / "train.log"
        where = "its log is above" if sink is None else f"the end of {log_path}: {last_line(log_path)}"
        raise RuntimeError(f"{module} train exited with code {rc} ({where}); rerun the pipeline to resume the "
                           f"stage from its checkpoint")


def last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(empty)"


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def split_sizes(cache: data.Cache, split: dict[str, list[str]]) -> dict:
    sizes = {}
    for s, names in split.items():
        rows = cache.rows(names)
        sizes[s] = {"images": len(names), "malignant": int(cache.targets[rows].sum()),
                    "patients": len({cache.patients[r] for r in rows})}
    return sizes


def synthetic_needed(train: dict, ratio: float) -> int:
    """How many synthetic melanomas bring (real + synthetic malignant) to ratio x benign."""
    benign = train["images"] - train["malignant"]
    return max(0, min(benign, round(ratio * benign) - train["malignant"]))


def count_rows(csv_path: Path) -> int:
    with open(csv_path, newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def synthetic_pairs(data_dir: str, root: Path, n: int = 16) -> list:
    """(benign source, synthetic translation) images of the first n rows of a synthetic folder."""
    from PIL import Image
    src = {r.image_name: r.path for r in data.read_index(data_dir).records}
    pairs = []
    with open(root / "train.csv", newline="") as f:
        for r in list(csv.DictReader(f))[:n]:
            fake = next((root / "jpeg" / "train").glob(f"{r['image_name']}.*"))
            pairs.append((Image.open(src[r["source_image"]]).convert("RGB"), Image.open(fake).convert("RGB")))
    return pairs


def leakage_guards(d: dict, ood: dict | None, gans: dict[str, list[dict]]) -> dict[str, bool]:
    """Checked on the files, not assumed: the split on disk, what each GAN's own data code selects
    from the config in its checkpoint, the synthetic images' recorded sources, and the second test
    set's images and patients."""
    with open(d["split_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    owner: dict[str, set] = {}
    for r in rows:
        owner.setdefault(r["patient_id"], set()).add(r["split"])
    held_out = {r["image_name"] for r in rows if r["split"] != "train"}
    train_benign = {r["image_name"] for r in rows if r["split"] == "train" and r["target"] == "0"}
    guards = {"no patient appears in two splits": all(len(s) == 1 for s in owner.values())}
    if ood:
        guards["the second test set shares no image or patient with the data"] = not (
            ood["shared_images"] or ood["shared_patients"])
    synth_ok, gan_ok = True, True
    for g in [g for runs in gans.values() for g in runs]:
        with open(Path(g["synthetic"]) / "train.csv", newline="") as f:
            sources = {r["source_image"] for r in csv.DictReader(f)}
        synth_ok &= sources <= train_benign
        gan_cfg = cyclegan.config_from_checkpoint(load_checkpoint(g["checkpoint"]))
        seen = cyclegan.TrainData(gan_cfg)  # the images this GAN's trainer draws from
        names = {seen.cache.names[i] for i in np.concatenate([seen.rows_A, seen.rows_B])}
        same_split = g["split_hash"] == d["split_hash"] == file_hash(data.split_path(gan_cfg))
        gan_ok &= same_split and not names & held_out
    if gans:
        guards["synthetic images derive only from training-split benign images"] = synth_ok
        guards["no validation or test image touches GAN training"] = gan_ok
    return guards


# ----------------------------------------------------------------------------- CLI

def parse_config(argv: list[str] | None) -> tuple[PipelineConfig, argparse.Namespace]:
    """Flags over the preset's values: only the flags given override it."""
    p = argparse.ArgumentParser(prog="python -m melano.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_options(p, PipelineConfig, aliases=ALIASES)
    cli.add_debug(p)
    p.add_argument("--dry-run", action="store_true", help="print the full configuration and exit")
    for action in p._actions:
        if action.dest not in ("help", "preset", "debug", "dry_run"):
            action.default = argparse.SUPPRESS  # so that only given flags override the preset
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k not in ("preset", "debug", "dry_run")}
    return make_config(args.preset, **given), args


def command(argv: list[str]) -> None:
    cfg, args = parse_config(argv)
    if args.dry_run:
        print(json.dumps(cfg.flat(), indent=2))
        if cfg.preset == "study":
            print("Deviations from the study's recipe:\n" + "\n".join(f"- {d}" for d in STUDY_DEVIATIONS))
        return
    # No GPU here: the kernels' compile-only CUDA check would be wasted time (children inherit this).
    unset = "MELANO_CUDA_BUILD" not in os.environ and pick_device(cfg.device).type == "cpu"
    if unset:
        os.environ["MELANO_CUDA_BUILD"] = "no"
    try:
        kernels.load()  # once, here: the stages' processes then find the build cached
        run_experiment(cfg)
    finally:
        if unset:
            del os.environ["MELANO_CUDA_BUILD"]


def main(argv: list[str] | None = None) -> int:
    cli.setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    return cli.cli(functools.partial(command, argv), debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
