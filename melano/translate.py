"""Translate training-split benign images into synthetic melanomas with a trained CycleGAN's G_A.

    python -m melano.cyclegan translate --checkpoint RUN/checkpoint.pt --data DIR --out DIR [--limit N]

The output is a data folder in the ISIC layout (train.csv + jpeg/train/) for `melano.classifier
train --extra`. Each image is encoded like its source (melano.encode), so nothing in the file tells
a synthetic image from a real one. Each row keeps its source's patient and metadata, with diagnosis
"synthetic", target 1 and `source_image` naming the benign original (so leakage can be audited).
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from . import encode, gan
from . import data as mdata
from .infra import checkpoints, kernels, options, outdir, precision
from .infra.cli import progress
from .infra.dist import pick_device
from .infra.options import option
from .pixels import to_tensor, to_uint8

log = logging.getLogger("melano.translate")

COLUMNS = ("image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
           "diagnosis", "benign_malignant", "target", "source_image")


@dataclass
class TranslateConfig:
    checkpoint: str = option(help="checkpoint.pt written by `python -m melano.cyclegan train`")
    data: str = option(help="the data folder the model was trained on")
    out: str = option(help="output folder: train.csv + jpeg/train/*.jpg")
    limit: int | None = option(None, "translate at most this many benign images, a seeded random sample. "
                                     "none: all", min=0)
    split: str = option("train", "which split's benign images (synthetic images made from val or test images "
                                 "must never be used for training)", choices=mdata.SPLITS)
    split_csv: str | None = option(None, "split file. none: the one the checkpoint was trained with")
    cache_dir: str | None = option(None, "image cache folder. none: the checkpoint's")
    batch_size: int = option(16, "images per forward pass", min=1)
    device: str | None = option(None, "cpu, cuda, ... none: CUDA when available")
    force: bool = option(False, "write into an --out that holds an earlier translation or other files")

    def __post_init__(self):
        options.check_options(self)


def sample_benign(names: list[str], targets: np.ndarray, limit: int | None, seed: int) -> list[str]:
    """The benign names, or `limit` of them drawn at random (seeded; kept in data order). The first
    N would favour the patients listed first. A smaller limit takes a subset of a larger one's."""
    names = [n for n, t in zip(names, targets) if t == 0]
    if limit is None:
        return names
    g = torch.Generator().manual_seed(seed)
    keep = set(torch.randperm(len(names), generator=g)[:limit].tolist())
    return [n for i, n in enumerate(names) if i in keep]


def synthetic_row(name: str, src: mdata.Record) -> dict:
    """The CSV row of the synthetic image made from `src`: its patient and metadata, target 1."""
    return {"image_name": f"syn_{name}", "patient_id": src.patient_id,
            "sex": src.extra.get("sex", ""), "age_approx": src.extra.get("age_approx", ""),
            "anatom_site_general_challenge": src.extra.get("anatom_site_general_challenge", ""),
            "diagnosis": "synthetic", "benign_malignant": "malignant", "target": 1, "source_image": name}


@torch.no_grad()
def write_translations(cfg: TranslateConfig, G: torch.nn.Module, gcfg: SimpleNamespace, split_csv: Path,
                       device: torch.device, claim: outdir.Claim) -> list[dict]:
    """G_A over the chosen benign images, each written like its source; then train.csv."""
    index, cache, splits = mdata.load_split_data(cfg.data, gcfg.size, cfg.cache_dir or mdata.cache_path(gcfg), split_csv,
                                                 negatives=getattr(gcfg, "negatives", "all"))
    records = {r.image_name: r for r in index.records}
    split_names = splits[cfg.split]
    names = sample_benign(split_names, cache.targets[cache.rows(split_names)], cfg.limit, gcfg.seed)
    amp = precision.Precision("auto", device)
    log.info("translating %d %s-split benign images of %s with %s on %s", len(names), cfg.split, cfg.data,
             cfg.checkpoint, device)
    (claim.folder / "jpeg" / "train").mkdir(parents=True, exist_ok=True)
    rows = []
    batches = [names[i:i + cfg.batch_size] for i in range(0, len(names), cfg.batch_size)]
    for batch in progress(batches, total=len(batches), desc="translate"):
        x = to_tensor(np.stack([cache.images[cache.row(n)] for n in batch]), -1, 1, device)  # as in training
        with amp.autocast():
            y = G(x)
        for name, img in zip(batch, to_uint8(y)):
            row, src = synthetic_row(name, records[name]), records[name].path
            rel = f"jpeg/train/{row['image_name']}{encode.suffix_like(src)}"
            encode.save_like(Image.fromarray(img), src, claim.record(rel))  # no format shortcut
            row["_file"] = rel
            rows.append(row)
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    claim.write_text("train.csv", buf.getvalue())  # after the images: it never lists a missing one
    return rows


@torch.no_grad()
def translate(cfg: TranslateConfig) -> Path:
    """G_A over the benign images of cfg.split, written as a data folder at cfg.out (returned). The
    split and cache default to the checkpoint's. An --out holding anything but an earlier translation
    is refused without --force."""
    kernels.load()
    device = pick_device(cfg.device)
    state = checkpoints.load_state(cfg.checkpoint, gan.FORMAT, "melano CycleGAN checkpoint (checkpoint.pt of "
                                   "`melano.cyclegan train`)")
    G, gcfg = gan.load_generator(state).to(device), SimpleNamespace(**state["config"])
    if Path(cfg.data).resolve() != Path(gcfg.data).resolve():
        log.warning("translating %s, but %s was trained on %s", cfg.data, cfg.checkpoint, gcfg.data)
    split_csv = Path(cfg.split_csv) if cfg.split_csv else mdata.split_path(gcfg)
    if not split_csv.is_file():
        raise FileNotFoundError(f"split file {split_csv} (from {cfg.checkpoint}) does not exist; pass the "
                                f"splits.csv the model was trained with (--split-csv)")
    # staged: written into a fresh folder and swapped in, so a kill leaves the old translation or the new one
    with outdir.claim(cfg.out, "translate", force=cfg.force, can_resume=False, staged=True, data=[cfg.data]) as claim:
        rows = write_translations(cfg, G, gcfg, split_csv, device, claim)
    out_dir = Path(cfg.out)
    log.info("wrote %d synthetic malignant images to %s", len(rows), out_dir)
    return out_dir
