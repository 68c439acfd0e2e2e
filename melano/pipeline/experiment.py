"""The experiment, top to bottom: `run_stages` reads as the method section."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path

from .. import classifier, pretrained
from ..infra import cli, outdir
from .config import (ARMS, GAN_ARMS, PipelineConfig, ROOT_FILES, arm_config, gan_config, has_ood, stage_groups,
                     stage_names)
from .runner import CHILDREN, Stages, check_places, parallel
from .stages import (arm_stage, data_stage, gan_stage, ood_data_stage, ood_scores_stage, quality_stage,
                     report_stage, synth_stage, synthetic_needed)

log = logging.getLogger("melano.pipeline")


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
                   "gan_size": cfg.gan.size, "negatives": cfg.negatives}
    if cfg.data is None:
        data_params.update({k: getattr(cfg, k) for k in ("synth_benign", "synth_malignant", "synth_size",
                                                         "synth_difficulty")})
    d = stages.run("data", data_params, functools.partial(data_stage, cfg, cache_dir, stages.claim))
    ood = None
    if has_ood(cfg):
        ood_params = {"data_run": d["run_id"], "ood_data": cfg.ood_data, "negatives": cfg.negatives,
                      "images": None if cfg.ood_data else cfg.synth_ood_images}
        ood = stages.run("ood_data", ood_params, functools.partial(ood_data_stage, cfg, d, stages.claim))
    n_needed = synthetic_needed(d["split_sizes"]["train"], cfg.synthetic_ratio)
    for arm in cfg.arms:  # a classifier config that cannot train fails now, not after the GANs
        classifier.check_config(arm_config(cfg, d, cache_dir, arm, 0, [], 0))

    # 2. CycleGANs and their synthetic melanomas: K runs per CycleGAN arm, one per seed
    gans = gan_stages(cfg, stages, d, cache_dir, n_needed)

    # 3. one classifier per arm and seed: same split, same test images, same steps; and 4., beside
    # the last of them, how good the synthetic melanomas are, scored by the oversample arm's seed 0
    arms, q = arm_stages(cfg, stages, d, cache_dir, n_needed, gans)
    if ood:  # every classifier on the second clinic's test set
        ood_params = {"ood_run": ood["run_id"], "arms": {a: [r["run_id"] for r in rs] for a, rs in arms.items()}}
        ood["scores"] = stages.run("ood_scores", ood_params, functools.partial(
            ood_scores_stage, cfg, ood, arms, cache_dir, stages.claim))["predictions"]

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
    """K GAN runs per CycleGAN arm, side by side, each followed by its synthetic melanomas."""
    jobs, threads, procs = parallel(cfg)

    def gan_run(arm: str, k: int, futures: list) -> dict:
        gan_name, synth_name, smoothing = GAN_ARMS[arm]
        gan_cfg = gan_config(cfg, d, cache_dir, smoothing, k)
        g = stages.run(f"{gan_name}_{k}", {**dataclasses.asdict(gan_cfg), "data_run": d["run_id"], "out": None,
                                           **procs},
                       functools.partial(gan_stage, gan_cfg, cfg.nproc_per_node, threads, stages.claim))
        s = stages.run(f"{synth_name}_{k}", {"gan_run": g["run_id"], "n": n_needed},
                       functools.partial(synth_stage, g, d, cache_dir, n_needed, cfg.device, stages.claim))
        return {**g, "name": f"{gan_name}_{k}", "synthetic": s["folder"], "synthetic_images": s["images"]}

    runs = [(arm, k) for arm in GAN_ARMS if arm in cfg.arms for k in range(cfg.seeds)]
    done = stages.side_by_side([functools.partial(gan_run, arm, k) for arm, k in runs], jobs)
    gans: dict[str, list[dict]] = {}
    for (arm, _), g in zip(runs, done):
        gans.setdefault(arm, []).append(g)
    return gans


def arm_stages(cfg: PipelineConfig, stages: Stages, d: dict, cache_dir: Path, n_needed: int,
               gans: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], dict | None]:
    """Every arm's classifiers, one per seed (side by side), and then, beside the last of them, the
    quality stage (which waits for the oversample arm's seed 0, its scorer). A CycleGAN arm's seed
    k trains on GAN run k's synthetic melanomas. Returns the arms' results by arm, and quality's."""
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
    calls = [lambda futures, t=t: stages.run(*t) for t in todo]
    q_at = None
    if gans:
        # Quality starts once its scorer is done, `jobs` calls after it (the scorer's neighbours started
        # with it), so that the remaining arms run beside it rather than it running alone at the end.
        scorer_at = next((i for i, t in enumerate(todo) if t[0] == "arm_oversample_0"), None)
        q_at = len(calls) if scorer_at is None else min(len(calls), scorer_at + jobs)
        calls.insert(q_at, lambda futures: quality_run(
            cfg, stages, d, gans, cache_dir, None if scorer_at is None else futures[scorer_at].result()))
    results = stages.side_by_side(calls, jobs)
    q = results.pop(q_at) if q_at is not None else None
    it = iter(results)
    return {a: [next(it) for _ in range(cfg.seeds)] for a in ARMS if a in cfg.arms}, q


def quality_run(cfg: PipelineConfig, stages: Stages, d: dict, gans: dict[str, list[dict]], cache_dir: Path,
                scorer: dict | None) -> dict:
    return stages.run("quality", {"synth": [g["run_id"] for runs in gans.values() for g in runs],
                                  "scorer": scorer and scorer["run_id"], "seed": cfg.seed,
                                  "images": cfg.quality_images, "reference": cfg.quality_reference,
                                  "resolution": cfg.quality_resolution, "criteria": 1},
                      functools.partial(quality_stage, cfg, d, gans, cache_dir, scorer and scorer["best_checkpoint"],
                                        stages.claim))
