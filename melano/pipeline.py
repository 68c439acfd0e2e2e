"""The experiment, end to end: does CycleGAN oversampling beat traditional augmentation?

    python -m melano.pipeline [--data DIR] [--out DIR] [--preset smoke|quick|paper] [--force STAGE]
                              [--nproc-per-node K]

Stages, each in its own folder under --out (default runs/<preset>):

    data          the ISIC folder given by --data, or the built-in synthetic set, generated on
                  first use; one patient-grouped split (splits.csv) that every arm shares
    gan, gan_ls   CycleGAN benign->malignant on the TRAINING split only; gan_ls uses the study's
                  noisy "label smoothing"
    synth, synth_ls  G_A translates training-split benign images into synthetic melanomas until
                  the classes are balanced (or --synthetic-ratio)
    arm_none, arm_traditional, arm_cyclegan, arm_cyclegan_ls
                  one classifier per arm, same split, same test set
    report        metrics.json, report.md, roc.png, gan_losses.png, synthetic_samples.png

A stage whose outputs exist and whose parameters (and those of the stages it reads) have not
changed is skipped; a stage killed half-way resumes from its checkpoint; `--force STAGE` reruns
one stage and, through the parameters, everything downstream of it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from . import classifier, cyclegan, data, efficientnet, report, synth
from .common import load_checkpoint, log_config, save_json, setup_logging, to_jsonable

log = logging.getLogger("melano.pipeline")

ARMS = ("none", "traditional", "cyclegan", "cyclegan_ls")
STAGES = ("data", "gan", "gan_ls", "synth", "synth_ls") + tuple(f"arm_{a}" for a in ARMS) + ("report",)


@dataclass
class PipelineConfig:
    preset: str = "quick"
    data: str | None = None          # an ISIC folder; None: the built-in synthetic set
    out: str | None = None           # None: runs/<preset>
    seed: int = 0
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    # built-in synthetic data (ignored with --data)
    synth_benign: int = 4000
    synth_malignant: int = 400
    synth_size: int = 96
    synth_difficulty: float = synth.DEFAULT_DIFFICULTY
    # split
    val_frac: float = 0.15
    test_frac: float = 0.15
    # CycleGAN
    gan_size: int = 64
    gan_ngf: int = 32
    gan_ndf: int = 32
    gan_blocks: int = 6
    gan_batch_size: int = 4
    gan_epochs: int = 100
    gan_epochs_decay: int = 100
    gan_max_steps: int | None = 600
    gan_upsample: str = "transpose"
    synthetic_ratio: float = 1.0     # synthetic + real malignant = ratio x benign (in training)
    # classifier
    arch: str = "tf_efficientnet_lite0"
    weights: str | None = None       # a checkpoint path or URL instead of the packaged Lite0 weights
    clf_size: int = 64
    clf_epochs: int = 4
    clf_batch_size: int = 32
    clf_max_steps: int | None = None
    clf_lr: float = 1e-3
    device: str | None = None
    nproc_per_node: int = 1          # > 1: the gan and arm stages run under torchrun, one process per GPU
    force: list[str] = field(default_factory=list)


PRESETS: dict[str, dict] = {
    # Every stage and arm in a few minutes of 2 CPU cores; what the tests run.
    "smoke": dict(synth_benign=160, synth_malignant=60, synth_size=32, val_frac=0.2, test_frac=0.25,
                  gan_size=32, gan_ngf=8, gan_ndf=8, gan_blocks=1, gan_batch_size=4, gan_max_steps=6,
                  clf_size=32, clf_epochs=1, clf_batch_size=32, clf_max_steps=4),
    # The default: a meaningful answer on a 2-core CPU in about 15 minutes.
    "quick": dict(),
    # The study's scale, for a GPU: GAN at 256 px with 9 blocks, classifier at native resolution.
    "paper": dict(synth_benign=32542, synth_malignant=584, synth_size=256, gan_size=256, gan_ngf=64,
                  gan_ndf=64, gan_blocks=9, gan_batch_size=1, gan_epochs=100, gan_epochs_decay=100,
                  gan_max_steps=None, gan_upsample="nearest", clf_size=0, clf_epochs=15,
                  clf_batch_size=32),
}


# ----------------------------------------------------------------------------- stages

class Stages:
    """Runs named stages under `root`, skipping those already done with the same parameters.

    A stage folder holds params.json (written when it starts) and done.json (written last, with
    the result). Same params and done.json: skip. Same params, no done.json: the stage was killed,
    so it resumes. Different params or --force: the folder is cleared and the stage reruns.

    Each finished run of a stage gets a fresh `run_id`, and downstream stages list their inputs'
    run ids among their parameters: whatever reruns a stage also reruns everything that reads it."""

    def __init__(self, root: Path, force: list[str]):
        self.root, self.force, self.timings = root, set(force), {}

    def run(self, name: str, params: dict, fn: Callable[[Path, bool], dict]) -> dict:
        folder = self.root / name
        params = to_jsonable(params)
        key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        done, started = folder / "done.json", folder / "params.json"
        same = started.exists() and json.loads(started.read_text()).get("key") == key
        if same and done.exists() and name not in self.force:
            log.info("stage %-16s done before with the same parameters: skipped", name)
            saved = json.loads(done.read_text())
            self.timings[name] = saved["seconds"]
            return saved["result"]
        resume = same and name not in self.force
        if not resume and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_json({"key": key, "params": params}, started)
        log.info("stage %-16s %s", name, "resuming" if resume else "running")
        t0 = time.monotonic()
        result = fn(folder, resume)
        self.timings[name] = time.monotonic() - t0
        result = {**to_jsonable(result), "run_id": uuid.uuid4().hex}
        save_json({"result": result, "seconds": self.timings[name]}, done)
        return result


def _file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def run(cfg: PipelineConfig) -> dict:
    """The whole experiment. Returns the content of metrics.json."""
    out = Path(cfg.out or f"runs/{cfg.preset}")
    unknown = set(cfg.force) - set(STAGES)
    if unknown:
        raise ValueError(f"--force {sorted(unknown)}: not a stage; stages are {', '.join(STAGES)}")
    if cfg.nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node {cfg.nproc_per_node}: give the number of processes (GPUs), at least 1")
    bad_arms = set(cfg.arms) - set(ARMS)
    if bad_arms or "traditional" not in cfg.arms:
        raise ValueError(f"--arms {cfg.arms}: choose from {ARMS}; 'traditional' is the baseline "
                         f"every p-value refers to, so it is required")
    out.mkdir(parents=True, exist_ok=True)
    log_config(cfg, out / "config.json")
    stages = Stages(out, cfg.force)
    cache_dir = out / "cache"
    wall0 = time.monotonic()

    # 1. Data and the one split every arm shares.
    def data_stage(folder: Path, resume: bool) -> dict:
        if cfg.data is None:
            src = folder / "synthetic"
            synth.generate(synth.SynthConfig(out=str(src), benign=cfg.synth_benign,
                                             malignant=cfg.synth_malignant, size=cfg.synth_size,
                                             seed=cfg.seed, difficulty=cfg.synth_difficulty,
                                             workers=data.default_workers()))
        else:
            src = Path(cfg.data)
        index = data.read_index(src)
        cache = data.build_cache(index, cfg.gan_size, cache_dir)
        split_csv = folder / "splits.csv"
        try:
            split = data.make_split(cache, split_csv, cfg.val_frac, cfg.test_frac, cfg.seed)
        except ValueError as e:
            raise ValueError(f"{src}: cannot split it for the experiment: {e}. Give a folder with more "
                             f"malignant images (each of validation and test needs some), or change "
                             f"--val-frac/--test-frac") from e
        return {"data": str(src), "split_csv": str(split_csv), "split_hash": _file_hash(split_csv),
                "split_sizes": _split_sizes(cache, split)}

    if cfg.data is not None and not Path(cfg.data).is_dir():
        raise FileNotFoundError(f"--data {cfg.data}: no such folder. Give an ISIC folder (train.csv + "
                                f"jpeg/train/ or train/, or benign/ + malignant/), or omit --data to "
                                f"use the built-in synthetic set")
    data_params = {k: getattr(cfg, k) for k in ("data", "seed", "val_frac", "test_frac", "gan_size")}
    if cfg.data is None:
        data_params.update({k: getattr(cfg, k) for k in
                            ("synth_benign", "synth_malignant", "synth_size", "synth_difficulty")})
    d = stages.run("data", data_params, data_stage)
    for s in ("val", "test"):
        if d["split_sizes"][s]["malignant"] == 0:
            raise ValueError(f"the {s} split of {d['data']} has no malignant images, so its AUC is "
                             f"undefined; give more malignant images or a larger --{s}-frac")

    def arm_config(arm: str) -> classifier.ClassifierConfig:
        return classifier.ClassifierConfig(
            data=d["data"], out="", split_csv=d["split_csv"], cache_dir=str(cache_dir),
            val_frac=cfg.val_frac, test_frac=cfg.test_frac, split_seed=cfg.seed,
            arch=cfg.arch, pretrained=True, weights=cfg.weights,  # weights, if given, win
            size=cfg.clf_size or None, epochs=cfg.clf_epochs, batch_size=cfg.clf_batch_size,
            max_steps=cfg.clf_max_steps, lr=cfg.clf_lr,
            augment="traditional" if arm == "traditional" else "none", seed=cfg.seed,
            device=cfg.device)

    # Refuse a classifier config that cannot train now, not after hours of CycleGAN training.
    for arm in cfg.arms:
        classifier.check_config(arm_config(arm))
    if cfg.weights is None:
        efficientnet.offline_weights(cfg.arch)  # raises, saying how to get weights, if there are none

    # The number of processes changes a training stage's result (the global batch), so it is one of
    # its parameters; left out at 1, so that single-process stages keep their earlier keys.
    processes = {"nproc_per_node": cfg.nproc_per_node} if cfg.nproc_per_node > 1 else {}

    # 2. CycleGANs and their synthetic melanomas, one per CycleGAN arm.
    extra: dict[str, list[str]] = {"none": [], "traditional": []}
    gans: dict[str, dict] = {}
    for arm, suffix, smoothing in (("cyclegan", "", "none"), ("cyclegan_ls", "_ls", "noisy")):
        if arm not in cfg.arms:
            continue
        gan_cfg = cyclegan.CycleGANConfig(
            data=d["data"], split_csv=d["split_csv"], cache_dir=str(cache_dir), size=cfg.gan_size,
            ngf=cfg.gan_ngf, ndf=cfg.gan_ndf, n_blocks=cfg.gan_blocks, upsample=cfg.gan_upsample,
            label_smoothing=smoothing, batch_size=cfg.gan_batch_size, epochs=cfg.gan_epochs,
            epochs_decay=cfg.gan_epochs_decay, max_steps=cfg.gan_max_steps, seed=cfg.seed,
            device=cfg.device, sample_every=max(1, (cfg.gan_max_steps or 2000) // 4),
            checkpoint_every=200)

        def gan_stage(folder: Path, resume: bool, gan_cfg=gan_cfg) -> dict:
            run_cfg = dataclasses.replace(gan_cfg, out=str(folder), resume=resume)
            if cfg.nproc_per_node > 1:
                _torchrun(cfg.nproc_per_node, "melano.cyclegan", run_cfg)
                ckpt = folder / cyclegan.CHECKPOINT
            else:
                ckpt = cyclegan.train(run_cfg)
            return {"checkpoint": str(ckpt), "losses": str(folder / "losses.csv"),
                    "split_hash": _file_hash(run_cfg.split_csv)}

        gan_params = {**dataclasses.asdict(gan_cfg), "data_run": d["run_id"], "out": None, **processes}
        g = stages.run(f"gan{suffix}", gan_params, gan_stage)
        n_needed = _synthetic_needed(d["split_sizes"]["train"], cfg.synthetic_ratio)

        def synth_stage(folder: Path, resume: bool, g=g) -> dict:
            cyclegan.translate(g["checkpoint"], d["data"], folder, limit=n_needed,
                               split_csv=d["split_csv"], cache_dir=str(cache_dir), device=cfg.device)
            return {"folder": str(folder), "images": _count_rows(folder / "train.csv")}

        s = stages.run(f"synth{suffix}", {"gan_run": g["run_id"], "n": n_needed}, synth_stage)
        extra[arm] = [s["folder"]]
        gans[arm] = {**g, "synthetic": s["folder"], "synthetic_images": s["images"]}

    # 3. One classifier per arm: same split, same test images.
    preds: dict[str, str] = {}
    arm_results: dict[str, dict] = {}
    for arm in [a for a in ARMS if a in cfg.arms]:
        clf_cfg = dataclasses.replace(arm_config(arm), extra=extra[arm])

        def arm_stage(folder: Path, resume: bool, clf_cfg=clf_cfg) -> dict:
            run_cfg = dataclasses.replace(clf_cfg, out=str(folder), resume=resume)
            if cfg.nproc_per_node > 1:
                _torchrun(cfg.nproc_per_node, "melano.classifier", run_cfg)
                return json.loads((folder / "result.json").read_text())  # what train() returns
            return classifier.train(run_cfg)

        upstream = [d["run_id"]] + ([gans[arm]["run_id"]] if arm in gans else [])
        r = stages.run(f"arm_{arm}", {**dataclasses.asdict(clf_cfg), "out": None, "upstream": upstream,
                                      **processes}, arm_stage)
        preds[arm] = r["test"]["predictions"]
        arm_results[arm] = r

    # 4. Report.
    def report_stage(folder: Path, resume: bool) -> dict:
        return _report(cfg, out, d, gans, preds, arm_results, dict(stages.timings),
                       time.monotonic() - wall0)

    report_params = {"arms": {a: r["run_id"] for a, r in arm_results.items()}}
    stages.run("report", report_params, report_stage)
    result = json.loads((out / "metrics.json").read_text())
    for a in result["arms"]:
        log.info("%-12s test AUC %.3f (95%% CI %.3f-%.3f) p vs traditional %s", a["name"], a["test_auc"],
                 a["ci_low"], a["ci_high"], report._fmt_p(a["p_value_vs_traditional"]))
    log.info("report: %s", out / "report.md")
    return result


# ----------------------------------------------------------------------------- helpers

def _train_flags(run_cfg) -> list[str]:
    """A CycleGANConfig or ClassifierConfig as the flags of its module's `train` command: --name
    value; lists as several values; booleans as --name, or --no-name when the default is true;
    None (the default) left out."""
    flags = []
    for f in dataclasses.fields(run_cfg):
        value, flag = getattr(run_cfg, f.name), "--" + f.name.replace("_", "-")
        if value is None or value == []:
            continue
        if isinstance(value, bool):
            if value or f.default is True:
                flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def _torchrun(nproc: int, module: str, run_cfg) -> None:
    """`torchrun --standalone --nproc_per_node K -m <module> train <run_cfg's flags>` on this node,
    with this Python; raises if it fails. The trainer writes its outputs into run_cfg.out."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", module, "train", *_train_flags(run_cfg)]
    log.info("running %s", " ".join(cmd))
    proc = subprocess.Popen(cmd)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached torchrun too: let it stop its workers, which checkpoint first
        proc.wait()
        raise
    if rc != 0:
        raise RuntimeError(f"{module} train under torchrun exited with code {rc} (its log is above); "
                           f"rerun the pipeline to resume the stage from its checkpoint")


def _split_sizes(cache: data.Cache, split: dict[str, list[str]]) -> dict:
    sizes = {}
    for s, names in split.items():
        rows = cache.rows(names)
        sizes[s] = {"images": len(names), "malignant": int(cache.targets[rows].sum()),
                    "patients": len({cache.patients[r] for r in rows})}
    return sizes


def _synthetic_needed(train: dict, ratio: float) -> int:
    """How many synthetic melanomas bring (real + synthetic malignant) to ratio x benign."""
    benign = train["images"] - train["malignant"]
    return max(0, min(benign, round(ratio * benign) - train["malignant"]))


def _count_rows(csv_path: Path) -> int:
    with open(csv_path, newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def _leakage_guards(d: dict, gans: dict) -> dict[str, bool]:
    """Checked on the files, not assumed: the split on disk, what each GAN's own data code selects
    from the config in its checkpoint, and the synthetic images' recorded sources."""
    with open(d["split_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    owner: dict[str, set] = {}
    for r in rows:
        owner.setdefault(r["patient_id"], set()).add(r["split"])
    held_out = {r["image_name"] for r in rows if r["split"] != "train"}
    train_benign = {r["image_name"] for r in rows if r["split"] == "train" and r["target"] == "0"}
    guards = {"no patient appears in two splits": all(len(s) == 1 for s in owner.values())}
    synth_ok, gan_ok = True, True
    for g in gans.values():
        with open(Path(g["synthetic"]) / "train.csv", newline="") as f:
            sources = {r["source_image"] for r in csv.DictReader(f)}
        synth_ok &= sources <= train_benign
        gan_cfg = cyclegan.config_from_checkpoint(load_checkpoint(g["checkpoint"]))
        seen = cyclegan.TrainData(gan_cfg)  # the images this GAN's trainer draws from
        names = {seen.cache.names[i] for i in np.concatenate([seen.rows_A, seen.rows_B])}
        same_split = g["split_hash"] == d["split_hash"] == _file_hash(gan_cfg.split_csv)
        gan_ok &= same_split and not names & held_out
    if gans:
        guards["synthetic images derive only from training-split benign images"] = synth_ok
        guards["no validation or test image touches GAN training"] = gan_ok
    return guards


def _report(cfg, out: Path, d: dict, gans: dict, preds: dict, arm_results: dict, timings: dict,
            wall: float) -> dict:
    arms = report.compare_arms(preds)
    guards = _leakage_guards(d, gans)
    result = {
        "arms": arms,
        "preset": cfg.preset, "data": d["data"], "arch": cfg.arch,
        "size": cfg.clf_size or "native",
        "split_sizes": d["split_sizes"],
        "synthetic_images": {a: g["synthetic_images"] for a, g in gans.items()},
        "best_val_auc": {a: r["best_val_auc"] for a, r in arm_results.items()},
        "leakage_guards": guards,
        "timings_s": timings, "wall_s": wall,
        "config": to_jsonable(cfg),
    }
    save_json(result, out / "metrics.json")
    report.write_report(result, out / "report.md")
    report.roc_plot(preds, out / "roc.png", title=f"test ROC ({cfg.preset})")
    if gans:
        first = next(iter(gans.values()))
        losses_png = Path(first["losses"]).with_suffix(".png")
        if cyclegan.plot_losses(first["losses"], losses_png):
            shutil.copyfile(losses_png, out / "gan_losses.png")
        pairs = []
        root = Path(first["synthetic"])
        index = data.read_index(d["data"])
        src = {r.image_name: r.path for r in index.records}
        with open(root / "train.csv", newline="") as f:
            for r in list(csv.DictReader(f))[:16]:
                # convert() loads the pixels, after which Pillow closes the file
                fake = root / "jpeg" / "train" / f"{r['image_name']}.jpg"
                pairs.append((Image.open(src[r["source_image"]]).convert("RGB"),
                              Image.open(fake).convert("RGB")))
        if pairs:
            report.sample_grid(pairs, out / "synthetic_samples.png")
    if not all(guards.values()):
        raise RuntimeError(f"a leakage guard failed: {guards}; see {out / 'metrics.json'}")
    return {"metrics": str(out / "metrics.json"), "report": str(out / "report.md")}


# ----------------------------------------------------------------------------- CLI

HELP = {
    "preset": "smoke (tests; minutes), quick (default; 2-core CPU, ~15 min), paper (the study's scale, GPU)",
    "data": "an ISIC folder (train.csv + jpeg/train/ or train/, or benign/ + malignant/); "
            "default: the built-in synthetic set, generated on first use",
    "out": "run folder (default runs/<preset>)",
    "seed": "seed for data generation, split, GANs and classifiers",
    "arms": f"arms to run, from {', '.join(ARMS)} (traditional is required: it is the baseline)",
    "synth_benign": "synthetic set: benign images", "synth_malignant": "synthetic set: malignant images",
    "synth_size": "synthetic set: image side in pixels", "synth_difficulty": "synthetic set: class overlap",
    "val_frac": "share of patients in validation", "test_frac": "share of patients in the test split",
    "gan_size": "CycleGAN image side in pixels", "gan_ngf": "generator width", "gan_ndf": "discriminator width",
    "gan_blocks": "generator residual blocks", "gan_batch_size": "CycleGAN batch size",
    "gan_epochs": "CycleGAN epochs at constant LR", "gan_epochs_decay": "CycleGAN epochs of linear LR decay",
    "gan_max_steps": "CycleGAN total steps (cuts the schedule short); 0 = no cap",
    "gan_upsample": "transpose (reference CycleGAN) or nearest (the study's)",
    "synthetic_ratio": "synthetic + real malignant = ratio x benign in training",
    "arch": "classifier architecture (melano.efficientnet names)",
    "weights": "classifier weights (path or URL) instead of the packaged Lite0 weights; with the "
               "paper preset they are taken to be EfficientNet-B4's unless --arch says otherwise",
    "clf_size": "classifier image side in pixels; 0 = the model's native resolution",
    "clf_epochs": "classifier epochs", "clf_batch_size": "classifier batch size",
    "clf_max_steps": "classifier total steps; 0 = no cap", "clf_lr": "classifier peak learning rate",
    "device": "cpu or cuda (default: cuda when available)",
    "nproc_per_node": "processes for the gan and arm training stages; K > 1 runs them under torchrun "
                      "(DistributedDataParallel, one process per GPU; batch sizes are per process)",
    "force": f"rerun these stages even if done: {', '.join(STAGES)}",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m melano.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(PipelineConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("arms", "force"):
            p.add_argument(flag, nargs="+", default=None, help=HELP[f.name])
        elif f.name == "preset":
            p.add_argument(flag, choices=sorted(PRESETS), default="quick", help=HELP[f.name])
        else:
            typ = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            p.add_argument(flag, type=typ, default=None, help=f"{HELP[f.name]}; default from the preset")
    args = p.parse_args(argv)
    setup_logging()
    given = {k: v for k, v in vars(args).items() if v is not None}
    cfg = PipelineConfig(**{**PRESETS[args.preset], **given})
    if cfg.preset == "paper" and cfg.weights and "arch" not in given:
        cfg.arch = "tf_efficientnet_b4"  # the study's model, whose weights the user has given
        log.info("paper preset with --weights: classifier arch %s (pass --arch to change)", cfg.arch)
    for name in ("gan_max_steps", "clf_max_steps"):  # 0 on the command line means "no cap"
        if getattr(cfg, name) == 0:
            setattr(cfg, name, None)
    try:
        run(cfg)
    except KeyboardInterrupt:  # SIGINT/SIGTERM: the stage in progress saved its checkpoint first
        log.error("interrupted; run the same command again to resume where it stopped")
        return 130
    except (ValueError, FileNotFoundError, ImportError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
