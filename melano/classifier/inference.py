"""A trained classifier at work: `evaluate` a split of its data, `predict` image files or a Kaggle
test folder (with the validation operating points), `score_arrays`, and the Grad-CAM picture."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import data, metrics, report, saliency
from ..data.index import csv_rows, match_files, open_csv
from ..detector import Normalise, infer, load_model, sigmoid
from ..infra import checkpoints, cli, outdir, precision
from ..infra.cli import progress
from ..infra.dist import pick_device
from ..pixels import to_tensor
from .config import FORMAT, VERSION, ClassifierConfig

log = logging.getLogger("melano.classifier")


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


def load_classifier(checkpoint: str | Path, device: str | torch.device | None = None
                    ) -> tuple[torch.nn.Module, Normalise, dict]:
    """(model in eval mode, its Normalise, the checkpoint dict) from a best.pt or last.pt."""
    path = Path(checkpoint)
    state = checkpoints.load_state(path, FORMAT,
                                   "melano classifier checkpoint (best.pt or last.pt of `melano.classifier train`)")
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
    cfg = ClassifierConfig(**{**saved, "data": data_dir or saved["data"], "split_csv": split_csv or saved["split_csv"],
                              "cache_dir": cache_dir or saved["cache_dir"]})
    if not Path(cfg.data).is_dir():
        raise cli.UsageError(f"{cfg.data}: the data folder {checkpoint} was trained on is not there; pass --data "
                             f"(and --split-csv) where it is now")
    if claim is None:
        outdir.check(out_dir, "evaluate", force=force, can_resume=False, data=[cfg.data])  # before any work
    cache = data.build_cache(data.read_index(cfg.data, negatives=cfg.negatives), state["image_size"],
                             data.cache_path(cfg), workers)
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


def _resized(x: torch.Tensor, size: int) -> torch.Tensor:
    """A batch at the model's input size (antialiased bilinear), when it has another."""
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def _logits(model: torch.nn.Module, norm: Normalise, state: dict, x: torch.Tensor, tta: bool) -> np.ndarray:
    """The logits of one batch of pixel/255 images (as `unit_dataset` gives them)."""
    dev = next(model.parameters()).device
    amp_dtype = inference_dtype(state["config"], dev)
    return infer(model, norm, [(x, torch.zeros(len(x)))], dev, tta=tta, amp_dtype=amp_dtype)[0]


def score_arrays(checkpoint: str | Path, images: np.ndarray, batch_size: int = 256,
                 device: str | None = "cpu", tta: bool = False) -> np.ndarray:
    """Logits of a checkpoint for (N, H, W, 3) uint8 images (e.g. a cache's memmap), resized
    (antialiased bilinear) to the checkpoint's size when they differ; `tta`: averaged over the 4 flips."""
    model, norm, state = load_classifier(checkpoint, device)
    out = []
    for i in range(0, len(images), batch_size):
        x = _resized(to_tensor(np.array(images[i:i + batch_size])), state["image_size"])
        out.append(_logits(model, norm, state, x, tta))
    return np.concatenate(out) if out else np.zeros(0)


def list_images(images: str | Path | Sequence[str | Path]) -> tuple[list[Path], list[data.Skipped]]:
    """(image files, skipped entries) of an image file, a folder (its .jpg/.jpeg/.png files, sorted,
    not recursive) or a list of files. A folder's links that do not resolve, or that loop, are
    skipped and counted; a named file that is missing is an error."""
    if isinstance(images, (str, Path)) and Path(images).is_dir():
        p = Path(images)
        entries = [f for f in sorted(p.iterdir()) if f.suffix.lower() in data.IMAGE_EXTS]
        files = [f for f in entries if f.is_file()]
        skipped = [data.Skipped(str(f), data.link_problem(str(f)) or "a link to a folder")
                   for f in entries if not f.is_file() and f.is_symlink()]
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


SENSITIVITIES = (0.90, 0.95)  # the operating points predict's CSV carries, as in the report's table


def threshold_at_sensitivity(y: np.ndarray, probs: np.ndarray, sensitivity: float) -> float:
    """The highest threshold t at which at least `sensitivity` of the melanomas score >= t: the
    k-th highest melanoma probability, k = ceil(sensitivity x melanomas)."""
    pos = np.sort(np.asarray(probs, dtype=np.float64)[np.asarray(y) == 1])[::-1]
    if len(pos) == 0:
        raise ValueError("no melanoma among the validation predictions: no sensitivity to set a threshold by")
    k = max(1, math.ceil(sensitivity * len(pos) - 1e-9))
    return float(pos[k - 1])


def operating_points(checkpoint: str | Path, state: dict) -> list[dict]:
    """[{"sensitivity", "threshold", "specificity"} for each of SENSITIVITIES] from the validation
    predictions beside `checkpoint` (val_predictions.csv, written with best.pt), when they are this
    checkpoint's: their AUC equals its val_auc. [] (and a log line saying why) otherwise."""
    path = Path(checkpoint).parent / "val_predictions.csv"
    if "val_auc" not in state or not path.is_file():
        log.info("no operating points: %s", f"{path} is missing" if "val_auc" in state else
                 f"{checkpoint} is not a best.pt (no validation AUC in it)")
        return []
    _, y, p = report.read_predictions(path)
    if abs(metrics.roc_auc(y, p) - state["val_auc"]) > 1e-6:
        log.warning("no operating points: %s belongs to another checkpoint (its AUC %.6f, %s's %.6f)", path,
                    metrics.roc_auc(y, p), checkpoint, state["val_auc"])
        return []
    points = []
    for s in SENSITIVITIES:
        t = threshold_at_sensitivity(y, p, s)
        points.append({"sensitivity": s, "threshold": t, "specificity": float(np.mean(p[y == 0] < t))})
        log.info("validation operating point: threshold %.6g gives sensitivity >= %.0f%%, specificity %.3f "
                 "(%d melanomas, %d others)", t, 100 * s, points[-1]["specificity"], int(y.sum()), int((y == 0).sum()))
    return points


def kaggle_test_folder(images) -> Path | None:
    """The folder, if it is a Kaggle test folder (test.csv + jpeg/test/); else None."""
    p = Path(images) if isinstance(images, (str, Path)) else None
    return p if p and (p / "test.csv").is_file() and (p / "jpeg" / "test").is_dir() else None


def kaggle_test_images(folder: Path) -> tuple[list[str], list[Path]]:
    """(image_name of each test.csv row in order, its file in jpeg/test/). Kaggle scores every row,
    so a missing file is an error, not a skip."""
    csv_path = folder / "test.csv"
    columns, reader = open_csv(csv_path)
    if "image_name" not in columns:
        raise cli.UsageError(f"{csv_path}: no image_name column (found: {', '.join(columns) or 'none'}); "
                             f"Kaggle's test.csv has image_name, patient_id, ...")
    names, seen = [], {}
    for line, row in csv_rows(reader, csv_path):
        name = (row["image_name"] or "").strip()
        if not name or name in seen:
            raise cli.UsageError(f"{csv_path}, line {line}: image_name {name!r} is empty or repeats line "
                                 f"{seen.get(name)}; fix test.csv")
        seen[name] = line
        names.append(name)
    found = match_files(folder / "jpeg" / "test", names)
    missing = [f"{n} ({why})" for n, (path, why) in zip(names, found) if path is None]
    if missing:
        raise cli.UsageError(f"{len(missing)} image(s) of {csv_path} cannot be found, e.g. {missing[0]}; a "
                             f"Kaggle submission needs every test image: restore them")
    return names, [path for path, _ in found]


def _score_files(files: Sequence[Path], model, norm, state: dict, batch_size: int, tta: bool,
                 max_pixels: int, on_skip) -> list[tuple[Path, float]]:
    """[(file, probability)] of the files that decode; `on_skip(Skipped)` for the others."""
    results: list[tuple[Path, float]] = []
    with torch.inference_mode():
        for i in progress(range(0, len(files), batch_size), total=-(-len(files) // batch_size), desc="predict"):
            arrays, read = [], []
            for f in files[i:i + batch_size]:
                try:
                    arrays.append(data.load_image(f, state["image_size"], max_pixels=max_pixels))
                    read.append(f)
                except Exception as e:  # corrupt, truncated, empty, not an image, too large
                    on_skip(data.Skipped(str(f), f"{type(e).__name__}: {e}"))
            if not arrays:
                continue
            logits = _logits(model, norm, state, to_tensor(np.stack(arrays)), tta)
            results += list(zip(read, sigmoid(logits).tolist()))
    return results


def predict(checkpoint: str | Path, images: str | Path | Sequence[str | Path], out_csv: str | Path | None = None,
            tta: bool = False, device: str | None = None, batch_size: int = 64, strict: bool = False,
            max_pixels: int = data.MAX_PIXELS, force: bool = False) -> list[tuple[str, float]]:
    """[(path, malignancy probability), ...] of the images, also written to `out_csv` if given.

    Images are decoded, resized and cropped as the training cache does. An unreadable one (corrupt,
    not an image, over `max_pixels`, a broken link) is skipped and counted, or with `strict` an
    error. The CSV has image, probability, and for each of SENSITIVITIES the validation threshold
    (`operating_points`) and whether the image is positive at it: threshold_sens90, positive_sens90,
    ... (not with `tta`: the thresholds were set without it). A Kaggle test folder (test.csv +
    jpeg/test/) gives Kaggle's submission instead (`predict_kaggle`). `out_csv` is checked first and
    written atomically (melano.infra.outdir.check_file: never an input, inside the images folder, or
    a file predict did not write, unless `force`)."""
    kaggle = kaggle_test_folder(images)
    if kaggle is not None:
        return predict_kaggle(checkpoint, kaggle, out_csv, tta, device, batch_size, max_pixels, force)
    files, skipped = list_images(images)
    folder = [images] if isinstance(images, (str, Path)) and Path(images).is_dir() else []
    inputs = [checkpoint, *files]
    if out_csv is not None:
        outdir.check_file(out_csv, "predict", force=force, inputs=inputs, data=folder)
    model, norm, state = load_classifier(checkpoint, device)
    for s in skipped:
        skip(s, strict)
    scored = _score_files(files, model, norm, state, batch_size, tta, max_pixels, lambda s: skip(s, strict))
    results = [(str(f), p) for f, p in scored]
    n_skipped = len(skipped) + len(files) - len(results)
    log.info("predict: %d image(s) scored, %d skipped", len(results), n_skipped)
    if not results:
        raise cli.UsageError(f"{images}: none of the {n_skipped} image(s) could be read (see the lines above)")
    if out_csv is not None:
        points = [] if tta else operating_points(checkpoint, state)
        if tta:
            log.info("no operating points with --tta: the validation thresholds were set without TTA")
        header = ["image", "probability"] + [f"{c}_sens{round(100 * o['sensitivity'])}" for o in points
                                             for c in ("threshold", "positive")]
        rows = [(n, repr(p), *[v for o in points for v in (repr(o["threshold"]), int(p >= o["threshold"]))])
                for n, p in results]
        outdir.write_file(out_csv, csv_text(header, rows), "predict", force=force, inputs=inputs, data=folder)
        log.info("wrote %d probabilities to %s", len(results), out_csv)
    return results


def predict_kaggle(checkpoint: str | Path, folder: Path, out_csv: str | Path | None = None, tta: bool = False,
                   device: str | None = None, batch_size: int = 64, max_pixels: int = data.MAX_PIXELS,
                   force: bool = False) -> list[tuple[str, float]]:
    """[(image_name, probability)] of every row of a Kaggle test folder's test.csv, in its order,
    written to `out_csv` as Kaggle's submission (image_name,target). Kaggle rejects a submission
    with a row missing, so an image that cannot be read is an error (with or without --strict),
    never a skipped row or an invented score."""
    names, files = kaggle_test_images(folder)
    inputs = [checkpoint, *files]
    if out_csv is not None:
        outdir.check_file(out_csv, "predict", force=force, inputs=inputs, data=[folder])
    model, norm, state = load_classifier(checkpoint, device)
    bad: list[data.Skipped] = []
    scored = _score_files(files, model, norm, state, batch_size, tta, max_pixels, bad.append)
    if bad:
        raise cli.UsageError(f"{len(bad)} test image(s) cannot be read, e.g. {bad[0].name} ({bad[0].reason}); a "
                             f"Kaggle submission needs a score for every row of test.csv: replace them")
    results = [(n, p) for n, (_, p) in zip(names, scored)]
    if out_csv is not None:
        outdir.write_file(out_csv, csv_text(["image_name", "target"], [(n, repr(p)) for n, p in results]),
                          "predict", force=force, inputs=inputs, data=[folder])
        log.info("wrote Kaggle's submission (%d rows, test.csv's order) to %s", len(results), out_csv)
    return results


def heat_overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 image under a map in [0, 1] (black-red-yellow-white, more opaque where high)."""
    c = np.clip(cam, 0, 1)[..., None]
    heat = np.clip(np.concatenate([3 * c, 3 * c - 1, 3 * c - 2], -1), 0, 1) * 255
    alpha = 0.15 + 0.6 * c
    return ((1 - alpha) * image + alpha * heat + 0.5).astype(np.uint8)


def saliency_picks(y: np.ndarray, probs: np.ndarray, per_group: int) -> list[tuple[str, list[int]]]:
    """[(group, indices)]: the most confident true positives (melanomas, highest probability),
    false positives (non-melanomas, highest) and false negatives (melanomas, lowest). Ranked, not
    thresholded: the picture shows the extremes, whatever operating point one picks."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    by_p = lambda idx, high: sorted(idx, key=lambda i: (-probs[i] if high else probs[i], i))[:per_group]
    return [("true positive", by_p(pos, True)), ("false positive", by_p(neg, True)),
            ("false negative", by_p(pos, False))]


SALIENCY_SIGN = {"true positive": 1.0, "false positive": 1.0, "false negative": -1.0}  # the class it chose


def _cams(model: torch.nn.Module, norm: Normalise, size: int, images: np.ndarray, sign: list[float] | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """(Grad-CAM maps in [0, 1] at the images' own size, probabilities) of (N, H, W, 3) uint8 images,
    fed to the model at its input `size`. `sign`: per image, the class explained (melano.saliency)."""
    x = _resized(to_tensor(np.array(images)).to(next(model.parameters()).device), size)  # a copy: memmaps are read-only
    cams, logits = saliency.grad_cam(model, model.head, norm(x),
                                     sign=1.0 if sign is None else torch.tensor(sign, device=x.device))
    maps = F.interpolate(saliency.normalise(cams)[:, None], size=images.shape[1:3], mode="bilinear",
                         align_corners=False)
    return maps[:, 0].cpu().numpy(), sigmoid(logits.double().cpu().numpy())


def saliency_picture(checkpoint: str | Path, cache: data.Cache, predictions: str | Path, path: str | Path,
                     per_group: int = 3, device: str | None = "cpu", title: str = "") -> Path:
    """A PNG of Grad-CAM (melano.saliency, on the EfficientNet's last stage, ``model.head``) for the
    `saliency_picks` of a predictions CSV (image_name, target, probability, e.g. test_predictions.csv)
    whose images are in `cache`: one tile per image, the image beside its overlay, captioned with
    the group and the probability the model gives it now. Each map shows the evidence for the
    class the model chose: melanoma for the positives, benign (the score -logit) for the false
    negatives. Written atomically (report.image_grid)."""
    names, y, probs = report.read_predictions(predictions)
    picks = saliency_picks(y, probs, per_group)
    images = np.asarray(cache.images[cache.rows([names[i] for _, idx in picks for i in idx])])
    model, norm, state = load_classifier(checkpoint, device)
    group = [g for g, idx in picks for _ in idx]
    cams, now = _cams(model, norm, state["image_size"], images, [SALIENCY_SIGN[g] for g in group])
    tiles = [[img, heat_overlay(img, cam)] for img, cam in zip(images, cams)]
    captions = [f"{g} p={p:.3f}" + (" (benign map)" if SALIENCY_SIGN[g] < 0 else "") for g, p in zip(group, now)]
    return report.image_grid(tiles, path, cols=per_group, cell=max(112, images.shape[1]), captions=captions,
                             title=title or f"Grad-CAM of {Path(checkpoint).parent.name}: the most confident "
                                                   f"{', '.join(g + 's' for g, _ in picks)}")


def translation_saliency_picture(checkpoint: str | Path, sources: np.ndarray, translations: np.ndarray,
                                 path: str | Path, device: str | None = "cpu", title: str = "") -> Path:
    """A PNG of Grad-CAM (the melanoma class) before and after translation: per pair of (N, S, S, 3)
    uint8 images, a benign source and its CycleGAN translation, the tile source | its map |
    translation | its map, captioned with the probability of each. Where the map moves, the
    translation changed what the classifier reads as melanoma."""
    model, norm, state = load_classifier(checkpoint, device)
    (maps_s, p_s), (maps_t, p_t) = (_cams(model, norm, state["image_size"], im) for im in (sources, translations))
    tiles = [[s, heat_overlay(s, ms), t, heat_overlay(t, mt)]
             for s, t, ms, mt in zip(sources, translations, maps_s, maps_t)]
    captions = [f"p={a:.3f} -> {b:.3f} after translation" for a, b in zip(p_s, p_t)]
    return report.image_grid(tiles, path, cols=2, cell=max(96, sources.shape[1]), captions=captions,
                             title=title or f"Grad-CAM (melanoma) of {Path(checkpoint).parent.name}: "
                                            f"source | map | translation | map")


def skip(s: data.Skipped, strict: bool) -> None:
    if strict:
        raise cli.UsageError(f"{s.name}: cannot read this image ({s.reason}) [--strict: fix or remove it, or run "
                             f"without --strict to skip it]")
    log.warning("skipped %s: %s", s.name, s.reason)
