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
import functools
import json
import logging
import os
import sys

from ..infra import cli, kernels, options
from ..infra.dist import pick_device
from .config import ALIASES, PipelineConfig, STUDY_DEVIATIONS, make_config
from .experiment import run_experiment

log = logging.getLogger("melano.pipeline")


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
