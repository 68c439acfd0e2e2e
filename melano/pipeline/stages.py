"""What each stage does: the data and its split, the second clinic, a GAN run and its translations,
an arm's classifier, the second clinic's scores, the quality of the synthetic melanomas, the report."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from .. import classifier, cyclegan, data, quality_stage as qstage, report, synth
from ..detector import sigmoid
from ..translate import TranslateConfig, translate
from ..infra import cli, outdir
from ..infra.checkpoints import load_checkpoint
from .config import PipelineConfig, ROOT_FILES, STUDY_DEVIATIONS, stage_names
from .runner import train_process

log = logging.getLogger("melano.pipeline")


def data_stage(cfg: PipelineConfig, cache_dir: Path, claim: outdir.Claim, folder: Path, resume: bool) -> dict:
    """The data folder (the built-in synthetic set is generated here) and the one split."""
    if cfg.data is None:
        src = claim.record_child(folder / "synthetic")
        synth.generate(synth.SynthConfig(out=str(src), benign=cfg.synth_benign, malignant=cfg.synth_malignant,
                                         size=cfg.synth_size, seed=cfg.seed, difficulty=cfg.synth_difficulty,
                                         workers=data.default_workers(), force=True))  # the stage owns its folder
    else:
        src = Path(cfg.data).resolve()
    cache = data.build_cache(data.read_index(src, negatives=cfg.negatives), cfg.gan.size, cache_dir)
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
    index = data.read_index(src, negatives=cfg.negatives)
    y = index.targets
    if len(index) == 0 or y.min() == y.max():
        raise cli.UsageError(f"--ood-data {src}: {len(index)} images, {int(y.sum())} malignant; a test set's AUC "
                             f"needs both classes")
    patients = claim.write_text(folder / "patients.csv", "image_name,patient_id\n" + "".join(
        f"{r.image_name},{r.patient_id}\n" for r in index.records))
    main = data.read_index(d["data"], negatives=cfg.negatives)
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


def ood_scores_stage(cfg: PipelineConfig, ood: dict, arms: dict[str, list[dict]], cache_dir: Path,
                     claim: outdir.Claim, folder: Path, resume: bool) -> dict:
    """Each arm's best checkpoints on the second test set, decoded as the first test set is (the
    cache at the classifier's input size): one predictions CSV per arm and seed."""
    cache = data.build_cache(data.read_index(ood["data"], negatives=cfg.negatives),
                             classifier.config.image_size(cfg.clf), cache_dir)
    preds = {}
    for arm, runs in arms.items():
        for k, r in enumerate(runs):
            logits = classifier.score_arrays(r["best_checkpoint"], cache.images, device=cfg.device,
                                             tta=cfg.clf.tta and cfg.clf.tta_views)
            probs = sigmoid(logits)  # as the arm's own test predictions: the same TTA, the same decoding
            text = classifier.inference.predictions_csv(cache.names, cache.targets, probs)
            preds.setdefault(arm, []).append(str(claim.write_text(folder / f"arm_{arm}_{k}.csv", text)))
    return {"predictions": preds}


def quality_stage(cfg: PipelineConfig, d: dict, gans: dict, cache_dir: Path, scorer: str | None, claim: outdir.Claim,
                  folder: Path, resume: bool) -> dict:
    """How good each GAN arm's synthetic melanomas are (melano.quality): distances with their scale,
    two-sample tests, translation success, hidden severity, memorisation, pictures. `scorer` is a
    classifier trained on real images only (the oversample arm's), or None for the stage's own."""
    cache = real_cache(cfg, d, cache_dir)
    where = {n: s for s, names in data.load_split(d["split_csv"], cache).items() for n in names}
    splits = np.array([where[n] for n in cache.names])
    row = {n: i for i, n in enumerate(cache.names)}
    synthetic = {}
    for arm, runs in gans.items():
        for k, g in enumerate(runs):
            syn, sources = translations(g, cfg, cache_dir)
            synthetic[f"{arm}_g{k}"] = qstage.Synthetic(np.asarray(syn.images), np.array([row[s] for s in sources]))
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
                                                      max_reference=cfg.quality_reference,
                                                      resolution=cfg.quality_resolution, seed=cfg.seed))
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
    saliency_pictures(cfg, d, gans, arms, out / "cache", out)
    if not all(guards.values()):
        raise RuntimeError(f"a leakage guard failed: {guards}; see {out / 'metrics.json'}")
    return {"metrics": str(out / "metrics.json"), "report": str(out / "report.md")}


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


def real_cache(cfg: PipelineConfig, d: dict, cache_dir: Path) -> data.Cache:
    """The data stage's image cache (at the GAN's size), found again by the stages that read it."""
    return data.build_cache(data.read_index(d["data"], negatives=cfg.negatives), cfg.gan.size, cache_dir)


def translations(gan: dict, cfg: PipelineConfig, cache_dir: Path) -> tuple[data.Cache, list[str]]:
    """A GAN run's synthetic melanomas, decoded exactly as the real images (a cache at the GAN's
    size), and the benign source of each cached row."""
    index = data.read_index(gan["synthetic"])
    source_of = {r.image_name: r.extra["source_image"] for r in index.records}
    syn = data.build_cache(index, cfg.gan.size, cache_dir)
    return syn, [source_of[n] for n in syn.names]


def saliency_pictures(cfg: PipelineConfig, d: dict, gans: dict, arms: dict[str, list[dict]], cache_dir: Path,
                      out: Path) -> None:
    """Where each arm's seed-0 classifier looks (Grad-CAM) on its most confident hits and misses,
    and, for a CycleGAN arm, on benign sources before and after translation."""
    cache = real_cache(cfg, d, cache_dir)
    for arm, runs in arms.items():
        classifier.inference.saliency_picture(runs[0]["best_checkpoint"], cache, runs[0]["test"]["predictions"],
                                              out / f"gradcam_{arm}.png", device=cfg.device,
                                              title=f"{arm}, seed 0: Grad-CAM on test images")
    for arm, g in ((a, runs[0]) for a, runs in gans.items() if a in arms):
        syn, sources = translations(g, cfg, cache_dir)
        classifier.inference.translation_saliency_picture(
            arms[arm][0]["best_checkpoint"], np.asarray(cache.images)[cache.rows(sources[:6])],
            np.asarray(syn.images[:6]), out / f"gradcam_translation_{arm}.png",
            device=cfg.device, title=f"{arm}, seed 0: Grad-CAM before and after translation (GAN run 0)")


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
