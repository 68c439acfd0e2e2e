"""`python -m melano.data {check,synth,cache,split}`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence


from .. import synth
from ..infra.cli import setup_logging
from ..infra.options import add_options, from_args
from .cache import build_cache
from .images import MAX_PIXELS, verify_images
from .index import grouping_text, read_index
from .isic import NEGATIVES
from .split import make_split

log = logging.getLogger("melano.data")


def _check(args) -> int:
    index = read_index(args.dir, strict=False, negatives=args.negatives)
    bad = verify_images(index, workers=args.workers, strict=False, max_pixels=args.max_pixels)
    bad_names = {s.name for s in bad}
    ok = [r for r in index.records if r.image_name not in bad_names]
    skipped = index.skipped + bad
    m = sum(r.target for r in ok)
    summary = {"images": len(ok), "malignant": m, "benign": len(ok) - m,
               "patients": len({r.patient_id for r in ok}), "skipped": [s.name for s in skipped],
               "layout": index.layout, "negatives": index.negatives, "grouping": index.grouping,
               "rows": index.counts, "licences": index.licences, "licence_files": index.licence_files,
               "attribution": index.attribution}
    if args.json:
        print(json.dumps(summary))
    else:
        _log_summary(args.dir, index, summary, skipped)
    if not ok:
        log.error("%s: no usable images", args.dir)
        return 2
    if args.strict and skipped:  # an input error like any other: exit 2, as the other commands do
        log.error("%s: %d image(s) skipped (listed above); --strict makes that fatal: fix or remove them, "
                  "or run without --strict", args.dir, len(skipped))
        return 2
    return 0


def _log_summary(folder: str, index, summary: dict, skipped) -> None:
    log.info("%s (%s layout): %d usable images, %d malignant, %d benign, %d groups, %d skipped", folder,
             index.layout, summary["images"], summary["malignant"], summary["benign"], summary["patients"],
             len(skipped))
    log.info("grouped by %s (the split keeps each group's images together)", grouping_text(index.grouping))
    if index.counts:
        log.info("metadata rows: %s (negatives: %s; melanoma is the positive, indeterminate and unknown rows "
                 "are left out)", ", ".join(f"{k} {v}" for k, v in index.counts.items()), index.negatives)
    if index.licences:
        log.info("licences: %s", ", ".join(f"{k} {v}" for k, v in sorted(index.licences.items())))
    if index.licence_files:
        log.info("licence texts: %s", ", ".join(index.licence_files))
    if index.attribution:
        log.info("credit the sources when you publish: %s", index.attribution)
    elif index.layout in ("archive", "isic2019", "ham10000"):
        log.info("no attribution file in this folder: credit the source as its download page asks")
    for s in skipped:
        log.info("  skipped %s: %s", s.name, s.reason)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m melano.data", description="ISIC data: check a folder, write a synthetic set, build the image cache, draw the split.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate an ISIC-style folder (decodes every image)")
    c.add_argument("dir", help="folder: train.csv + jpeg/train/ or train/; benign/ + malignant/; an ISIC Archive "
                               "download (metadata.csv, isic-cli); ISIC 2019 (ISIC_2019_Training_GroundTruth.csv); "
                               "HAM10000 (HAM10000_metadata.csv)")
    c.add_argument("--json", action="store_true",
                   help='print {"images", "malignant", "benign", "patients" (groups), "skipped": [names], "layout", '
                        '"negatives", "grouping": {basis: images}, "rows": {kind: metadata rows}, "licences": '
                        '{licence: images}, "licence_files", "attribution"} as JSON')
    c.add_argument("--negatives", choices=NEGATIVES, default="all",
                   help="the negatives: all lesions other than melanoma (default, as in ISIC 2020; other "
                        "malignancies are counted apart), or nevi only")
    c.add_argument("--strict", action="store_true", help="exit 2 if any image was skipped")
    add_options(sub.add_parser("synth", help="write a synthetic dermoscopy data set in the Kaggle layout"),
                synth.SynthConfig)
    k = sub.add_parser("cache", help="build (or find) the uint8 image cache of a folder")
    k.add_argument("dir", help="data folder (see check)")
    k.add_argument("--size", type=int, default=128, help="image side in the cache (default 128)")
    k.add_argument("--cache-dir", default="runs/cache", help="where caches live (default runs/cache)")
    k.add_argument("--strict", action="store_true", help="fail if any image is missing or unreadable")
    for q in (c, k):
        q.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
        q.add_argument("--max-pixels", type=int, default=None,
                       help=f"skip (or with --strict, fail on) images of more pixels than this, unread "
                            f"(default {MAX_PIXELS}: above any ISIC image; guards against decompression bombs)")
    t = sub.add_parser("split", help="draw (or check) the patient-grouped train/val/test split")
    t.add_argument("dir", help="data folder (see check)")
    t.add_argument("--out", required=True, help="splits.csv to write, or to reuse if it exists")
    t.add_argument("--val-frac", type=float, default=0.15, help="share of images for validation (0.15)")
    t.add_argument("--test-frac", type=float, default=0.15, help="share of images for the test (0.15)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    # Expected failures (bad options, bad files, permissions, a refused --out) are one line, exit 2.
    # OSError covers missing files, a --data file, and read-only folders; ValueError the rest,
    # including undecodable CSV text and melano.infra.outdir.OutputError.
    try:
        if args.cmd == "check":
            return _check(args)
        if args.cmd == "synth":
            synth.generate(from_args(synth.SynthConfig, args))
            return 0
        index = read_index(args.dir, strict=args.strict if args.cmd == "cache" else False)
        if args.cmd == "cache":
            print(build_cache(index, args.size, args.cache_dir, args.workers, args.strict, args.max_pixels).path)
        else:
            out, root = Path(args.out).resolve(), Path(args.dir).resolve()
            if root in out.parents:
                raise ValueError(f"--out {args.out} is inside the data folder {args.dir}; melano never writes "
                                 f"into its input data: write the split elsewhere")
            make_split(index, args.out, args.val_frac, args.test_frac, args.seed)
    except (ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
