"""Fine-tune an EfficientNet to tell melanoma (1) from benign lesions (0); evaluate it; predict.

    python -m melano.classifier train --data DIR --out DIR [--extra DIR ...] [--arch NAME] ...
    python -m melano.classifier evaluate --checkpoint OUT/best.pt --out DIR [--tta]
    python -m melano.classifier predict --checkpoint PATH --images IMAGE_OR_DIR [--out CSV]
    torchrun --nproc-per-node K -m melano.classifier train ...   # K processes (GPUs); see melano.infra.dist

`train` keeps the checkpoint with the best validation AUC, computed over the WHOLE validation split
(never a mean of per-batch AUCs). `--extra DIR` adds training-only images, e.g. `cyclegan
translate`'s; a folder whose images come from the validation or test split is refused. It writes
config.json, splits.csv, last.pt (for --resume), best.pt, history.csv, val_predictions.csv,
result.json and, by evaluate, test_predictions.csv and test_metrics.json (AUC, DeLong CI).
Checkpoints hold tensors and plain data only: they load weights-only, and rebuild the model alone.

One concept per file: `config` (the options), `trainer` (`train`: read top to bottom), `inference`
(`evaluate`, `predict`, `score_arrays`), `cli`.
"""

from .cli import main
from .config import ClassifierConfig, check_config
from .inference import evaluate, load_classifier, predict, score_arrays
from .trainer import TrainResult, train

__all__ = ["main", "ClassifierConfig", "check_config", "evaluate", "load_classifier", "predict", "score_arrays",
           "TrainResult", "train"]
