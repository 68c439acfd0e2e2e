"""The classifier's config: every option of `python -m melano.classifier train`, and what derives from it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..efficientnet import config as model_config
from ..infra import cli, options, precision
from ..data import NEGATIVES
from ..infra.options import option


FORMAT = "melano.classifier"  # the format marker of every checkpoint this module writes


VERSION = 2


LEAK_COLUMN = "source_image"  # column of an --extra folder's train.csv naming the image it came from


@dataclass
class ClassifierConfig:
    data: str = option("", "ISIC-style folder: train.csv + jpeg/train/ (or train/), or benign/ + malignant/; "
                           "its split gives train/val/test")
    out: str = option("", "run folder for checkpoints, predictions and history")
    negatives: str = option("all", "which lesions are negatives: all (every non-melanoma, as ISIC 2020) or nevi (melanoma vs nevi only; needs a diagnosis column)", choices=NEGATIVES)
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
    tta: bool = option(False, "test-time augmentation: average the logits of --tta-views views")
    tta_views: int = option(4, "views --tta averages: 4 (the flips) or 8 (the dihedral group: the flips and "
                               "their transposes)", choices=(4, 8))
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
             "tta_views", "eval_batch_size", "out"}


def image_size(cfg: ClassifierConfig) -> int:
    return cfg.size or model_config(cfg.arch).resolution


def mean_std(cfg: ClassifierConfig) -> tuple[tuple, tuple]:
    """Input normalisation: the pretrained weights' statistics, or the study's 0.5 / 0.5."""
    if cfg.mean_std == "half":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    mcfg = model_config(cfg.arch)
    return mcfg.mean, mcfg.std


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
