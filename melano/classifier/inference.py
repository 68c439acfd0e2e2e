"""A trained classifier at work: `evaluate` a split of its data, `predict` image files, `score_arrays`."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import data, metrics
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
    state = checkpoints.load_state(path, FORMAT, "melano classifier checkpoint (best.pt or last.pt of `melano.classifier train`)")
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
    cfg = ClassifierConfig(**{**saved, "data": data_dir or saved["data"],
                              "split_csv": split_csv or saved["split_csv"], "cache_dir": cache_dir or saved["cache_dir"]})
    if not Path(cfg.data).is_dir():
        raise cli.UsageError(f"{cfg.data}: the data folder {checkpoint} was trained on is not there; pass --data "
                             f"(and --split-csv) where it is now")
    if claim is None:
        outdir.check(out_dir, "evaluate", force=force, can_resume=False, data=[cfg.data])  # before any work
    cache = data.build_cache(data.read_index(cfg.data), state["image_size"], data.cache_path(cfg), workers)
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


def score_arrays(checkpoint: str | Path, images: np.ndarray, batch_size: int = 256,
                 device: str | None = "cpu") -> np.ndarray:
    """Logits of a checkpoint for (N, H, W, 3) uint8 images (e.g. a cache's memmap), resized
    (antialiased bilinear) to the checkpoint's size when they differ."""
    model, norm, state = load_classifier(checkpoint, device)
    dev, size = next(model.parameters()).device, state["image_size"]
    out = []
    for i in range(0, len(images), batch_size):
        x = to_tensor(np.array(images[i:i + batch_size]))
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(infer(model, norm, [(x, torch.zeros(len(x)))], dev, amp_dtype=inference_dtype(state["config"], dev))[0])
    return np.concatenate(out) if out else np.zeros(0)


def list_images(images: str | Path | Sequence[str | Path]) -> tuple[list[Path], list[data.Skipped]]:
    """(image files, skipped entries) of an image file, a folder (its .jpg/.jpeg/.png files, sorted,
    not recursive) or a list of files. A folder's links that do not resolve, or that loop, are
    skipped and counted; a named file that is missing is an error."""
    if isinstance(images, (str, Path)) and Path(images).is_dir():
        p, files, skipped = Path(images), [], []
        for f in sorted(p.iterdir()):
            if f.suffix.lower() not in data.IMAGE_EXTS:
                continue
            if f.is_file():
                files.append(f)
            elif f.is_symlink():
                skipped.append(data.Skipped(str(f), data.link_problem(str(f)) or "a link to a folder"))
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


def predict(checkpoint: str | Path, images: str | Path | Sequence[str | Path], out_csv: str | Path | None = None,
            tta: bool = False, device: str | None = None, batch_size: int = 64, strict: bool = False,
            max_pixels: int = data.MAX_PIXELS, force: bool = False) -> list[tuple[str, float]]:
    """[(path, malignancy probability), ...] of the images, also written to `out_csv` (image,
    probability) if given. Images are decoded, resized and cropped as the training cache does. An
    unreadable one (corrupt, not an image, over `max_pixels`, a broken link) is skipped and counted,
    or with `strict` an error. `out_csv` follows melano.infra.outdir's rule for one file
    (`check_file`): checked first, written atomically, never an input or inside the images folder,
    and never a file predict did not write unless `force`."""
    files, skipped = list_images(images)
    folder = [images] if isinstance(images, (str, Path)) and Path(images).is_dir() else []
    inputs = [checkpoint, *files]
    if out_csv is not None:
        outdir.check_file(out_csv, "predict", force=force, inputs=inputs, data=folder)
    model, norm, state = load_classifier(checkpoint, device)
    dev = next(model.parameters()).device
    for s in skipped:
        skip(s, strict)
    results: list[tuple[str, float]] = []
    with torch.inference_mode():
        for i in progress(range(0, len(files), batch_size), total=-(-len(files) // batch_size), desc="predict"):
            arrays, read = [], []
            for f in files[i:i + batch_size]:
                try:
                    arrays.append(data.load_image(f, state["image_size"], max_pixels=max_pixels))
                    read.append(f)
                except Exception as e:  # corrupt, truncated, empty, not an image, too large
                    skipped.append(data.Skipped(str(f), f"{type(e).__name__}: {e}"))
                    skip(skipped[-1], strict)
            if not arrays:
                continue
            x = to_tensor(np.stack(arrays))  # as unit_dataset: pixel/255, then Normalise
            logits, _ = infer(model, norm, [(x, torch.zeros(len(x)))], dev, tta=tta,
                              amp_dtype=inference_dtype(state["config"], dev))
            results += [(str(f), float(p)) for f, p in zip(read, sigmoid(logits))]
    log.info("predict: %d image(s) scored, %d skipped", len(results), len(skipped))
    if not results:
        raise cli.UsageError(f"{images}: none of the {len(skipped)} image(s) could be read (see the lines above)")
    if out_csv is not None:
        text = csv_text(["image", "probability"], [(n, repr(p)) for n, p in results])
        outdir.write_file(out_csv, text, "predict", force=force, inputs=inputs, data=folder)
        log.info("wrote %d probabilities to %s", len(results), out_csv)
    return results


def skip(s: data.Skipped, strict: bool) -> None:
    if strict:
        raise cli.UsageError(f"{s.name}: cannot read this image ({s.reason}) [--strict: fix or remove it, or run "
                             f"without --strict to skip it]")
    log.warning("skipped %s: %s", s.name, s.reason)
