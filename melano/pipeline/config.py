"""The experiment's configuration: the arms, the presets (smoke, quick, study, full), the pipeline's
options with the trainers' own composed in, and the trainer configs of each GAN run and arm."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .. import classifier, cyclegan, synth
from ..data import NEGATIVES
from ..infra import cli, options
from ..infra.options import option

log = logging.getLogger("melano.pipeline")


ARMS = ("none", "traditional", "oversample", "cyclegan", "cyclegan_ls")


# what the pipeline writes at the top of its run folder
GAN_ARMS = {"cyclegan": ("gan", "synth", "none"), "cyclegan_ls": ("gan_ls", "synth_ls", "noisy")}
ROOT_FILES = ("config.json", "metrics.json", "report.md", "roc.png", "gan_losses.png", "synthetic_samples.png",
              *(f"gradcam_{a}.png" for a in ARMS), *(f"gradcam_translation_{a}.png" for a in GAN_ARMS))


PRESET_NAMES = ("smoke", "quick", "study", "full")


# The trainers' settings, offered as --gan-* and --clf-*: every field of their configs but those the
# pipeline sets itself (per stage, from its own options; the report needs `evaluate`, --jobs shares the
# cores), with the quick preset's values.
GanSettings = options.settings(
    cyclegan.CycleGANConfig, "GanSettings",
    skip=("data", "out", "negatives", "split_csv", "cache_dir", "seed", "device", "label_smoothing", "gen_act",
          "sample_every", "checkpoint_every", "resume", "force"),
    size=48, ngf=16, ndf=16, n_blocks=3, batch_size=4, epochs=2, epochs_decay=3, max_steps=225, upsample="nearest",
    residual=True, pairing="malignant", lr=4e-4, lambda_identity=0.0, channels_last=True)


ClfSettings = options.settings(
    classifier.ClassifierConfig, "ClfSettings",
    skip=("data", "out", "negatives", "extra", "oversample", "split_csv", "cache_dir", "val_frac", "test_frac",
          "split_seed", "max_steps", "val_every", "augment", "seed", "eval_batch_size", "evaluate", "threads", "device",
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
    negatives: str = option("all", "which lesions are negatives (and the CycleGAN's domain A): all (every "
                                   "non-melanoma, as ISIC 2020) or nevi (melanoma vs nevi only; needs a diagnosis "
                                   "column, as the ISIC sources have)", choices=NEGATIVES)
    seed: int = option(0, "seed for data generation, split, GANs, and the first classifier seed")
    seeds: int = option(3, "replicates per arm (seeds seed .. seed+K-1), on the same split; a CycleGAN arm's "
                           "seed k trains on the images of its own GAN run k", min=1)
    arms: list[str] = option(help=f"arms to run, from {', '.join(ARMS)}", factory=lambda: list(ARMS))
    # built-in synthetic data (ignored with --data)
    synth_benign: int = option(3000, "synthetic set: benign images", min=0)
    synth_malignant: int = option(600, "synthetic set: malignant images", min=1)
    synth_size: int = option(64, "synthetic set: image side in pixels", min=16)
    synth_difficulty: float = option(synth.DEFAULT_DIFFICULTY, "synthetic set: class overlap", min=0, max=0.5)
    synth_ood_images: int = option(1300, "synthetic set: images of the second clinic's test set (the same "
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
    quality_resolution: int = option(160, "quality stage: the ImageNet encoder's input side (224, Lite0's own, "
                                          "for images that large; the quick preset's are 48 px)", min=32)
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
    # The default: a meaningful answer on a 2-core CPU in at most 15 minutes, 3 GAN runs per CycleGAN
    # arm included. Its GANs are small (48 px, ngf 16, 3 blocks, lr 4e-4) and residual: they start as
    # the identity. 225 steps of a 500-step schedule: the quality stage and the criterion probe found
    # more malignant structure with more steps (200 < 250 < 500), and the budget stops it there
    # (bench/bench_gan_trials.py; bench/README.md gives the trials).
    "quick": dict(),
    # melano's recommended recipe at full scale, for a GPU.
    "full": dict(synth_benign=32542, synth_malignant=584, synth_size=256, test_frac=0.15, gan_size=256, gan_ngf=64,
                 gan_ndf=64, gan_n_blocks=9, gan_batch_size=1, gan_epochs=100, gan_epochs_decay=100,
                 gan_max_steps=None, gan_upsample="nearest", gan_residual=False, gan_lambda_identity=0.5,
                 gan_pairing="longest", gan_lr=2e-4, quality_images=500, quality_reference=1000,
                 quality_resolution=224, clf_size=None,
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


def gan_config(cfg: PipelineConfig, d: dict, cache_dir: Path, smoothing: str, k: int) -> cyclegan.CycleGANConfig:
    """GAN run k of a CycleGAN arm: its own seed, the shared split."""
    return cyclegan.CycleGANConfig(
        **dataclasses.asdict(cfg.gan), data=d["data"], negatives=cfg.negatives, split_csv=d["split_csv"],
        cache_dir=str(cache_dir),
        label_smoothing=smoothing, gen_act=cfg.gan_ls_gen_act if smoothing == "noisy" else "relu", seed=cfg.seed + k,
        device=cfg.device, sample_every=max(1, (cfg.gan.max_steps or 2000) // 4), checkpoint_every=200)


def arm_config(cfg: PipelineConfig, d: dict, cache_dir: Path, arm: str, k: int,
               extra: list[str], oversample: int) -> classifier.ClassifierConfig:
    """Arm `arm`, replicate k: the same budget (steps), batch and schedule as every other arm."""
    steps_per_epoch = d["split_sizes"]["train"]["images"] // cfg.clf.batch_size
    return classifier.ClassifierConfig(
        **dataclasses.asdict(cfg.clf), data=d["data"], negatives=cfg.negatives, out="", extra=extra,
        oversample=oversample,
        split_csv=d["split_csv"], cache_dir=str(cache_dir), val_frac=cfg.val_frac, test_frac=cfg.test_frac,
        split_seed=cfg.seed, max_steps=cfg.clf.epochs * steps_per_epoch, val_every=steps_per_epoch,
        augment="traditional" if arm in ("traditional", "oversample") else "none", seed=cfg.seed + k,
        eval_batch_size=cfg.test_batch_size, device=cfg.device)
