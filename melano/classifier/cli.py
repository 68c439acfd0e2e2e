"""`python -m melano.classifier {train,evaluate,predict}`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from typing import Sequence


from .. import data
from ..infra import cli, dist, options
from ..infra.cli import setup_logging
from ..infra.files import to_jsonable
from ..infra.options import option
from .inference import evaluate, predict
from .trainer import ClassifierConfig, train

log = logging.getLogger("melano.classifier")


@dataclass
class EvaluateConfig:
    checkpoint: str = option(help="best.pt (or last.pt) from `train`")
    out: str = option(help="folder for <split>_predictions.csv and <split>_metrics.json (a new or empty one, or an "
                           "earlier evaluate's with --force); never inside the data folder")
    split: str = option("test", "which split to score", choices=data.SPLITS)
    force: bool = option(False, "write into --out even if it holds other files or an earlier evaluate's outputs")
    data: str | None = option(None, "data folder, if moved since training")
    split_csv: str | None = option(None, "splits.csv, if moved since training")
    cache_dir: str | None = option(None, "cache folder. none: the one used in training")
    tta: bool = option(False, "average the logits of --tta-views views")
    tta_views: int = option(4, "views --tta averages: 4 (the flips) or 8 (the dihedral group)", choices=(4, 8))
    device: str | None = option(None, "cpu, cuda, ... none: CUDA when available")
    batch_size: int = option(64, "images per forward pass", min=1)
    workers: int | None = option(None, "DataLoader workers", min=0)

    def __post_init__(self):
        options.check_options(self)


@dataclass
class PredictConfig:
    checkpoint: str = option(help="best.pt (or last.pt) from `train`")
    images: str = option(help="an image file (.jpg/.jpeg/.png), a folder of them, or a Kaggle test folder "
                              "(test.csv + jpeg/test/: --out is then Kaggle's submission, image_name,target)")
    out: str | None = option(None, "CSV to write, atomically: image, probability, and for 90%% and 95%% sensitivity "
                                   "the threshold set on the checkpoint's validation predictions (val_predictions.csv "
                                   "beside best.pt) and whether the image is positive at it (threshold_sens90, "
                                   "positive_sens90, ...; not with --tta). For a Kaggle test folder: submission.csv, "
                                   "one row per test.csv row in its order. An existing file only if an earlier predict "
                                   "wrote it (else --force), never an input or a file inside --images. none: JSON "
                                   "lines on stdout")
    force: bool = option(False, "replace --out even if predict did not write it (never an input)")
    strict: bool = option(False, "stop at the first image that cannot be read, instead of skipping it (a Kaggle "
                                 "test folder always stops: its submission needs every row)")
    max_pixels: int = option(data.MAX_PIXELS, "refuse (skip) images with more pixels than this, before decoding "
                                              "(decompression bombs); raise it for a real larger image", min=1)
    tta: bool = option(False, "average the logits of --tta-views views")
    tta_views: int = option(4, "views --tta averages: 4 (the flips) or 8 (the dihedral group)", choices=(4, 8))
    device: str | None = option(None, "cpu, cuda, ... none: CUDA when available")
    batch_size: int = option(64, "images per forward pass", min=1)

    def __post_init__(self):
        options.check_options(self)


def _train_command(args) -> None:
    result = train(options.from_args(ClassifierConfig, args))
    if dist.is_main():
        print(json.dumps(to_jsonable(result)))


def _evaluate_command(args) -> None:
    c = options.from_args(EvaluateConfig, args)
    result = evaluate(c.checkpoint, split=c.split, out_dir=c.out, tta=c.tta and c.tta_views, data_dir=c.data,
                      split_csv=c.split_csv, cache_dir=c.cache_dir, device=c.device, batch_size=c.batch_size,
                      workers=c.workers, force=c.force)
    print(json.dumps(to_jsonable(result)))


def _predict_command(args) -> None:
    c = options.from_args(PredictConfig, args)
    rows = predict(c.checkpoint, c.images, out_csv=c.out, tta=c.tta and c.tta_views, device=c.device,
                   batch_size=c.batch_size, strict=c.strict, max_pixels=c.max_pixels, force=c.force)
    if c.out is None:
        for name, prob in rows:
            print(json.dumps({"image": name, "probability": prob}))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m melano.classifier", description="Fine-tune an EfficientNet to tell melanoma from benign lesions; evaluate it; predict.")
    sub = p.add_subparsers(dest="cmd", required=True)
    commands = {"train": (ClassifierConfig, _train_command,
                          "fine-tune on a folder's training split; keep the best validation AUC"),
                "evaluate": (EvaluateConfig, _evaluate_command,
                             "score a checkpoint on its data's test (or val) split, with DeLong CI"),
                "predict": (PredictConfig, _predict_command,
                            "malignancy probability of image files; prints JSON lines or writes CSV")}
    for name, (cls, _, help_text) in commands.items():
        s = sub.add_parser(name, help=help_text)
        options.add_options(s, cls, required=("data", "out") if name == "train" else ())
        cli.add_debug(s)
    args = p.parse_args(argv)
    setup_logging()
    return cli.cli(lambda: commands[args.cmd][1](args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
