"""ISIC data: read a folder, split it by patient, cache it as uint8, serve it to models.

    index = read_index("data/isic")                   # which images, which labels
    cache = build_cache(index, 128, "runs/cache")      # decode once -> (N, S, S, 3) uint8 memmap
    split = make_split(cache, "runs/x/splits.csv")     # {"train": [...], "val": [...], "test": [...]}
    loader = make_loader(ClassifierDataset(cache, split["train"], mean, std), 64, shuffle=True)

`read_index` reads six layouts: kaggle (``train.csv`` + ``jpeg/train/``: the SIIM-ISIC 2020
download, and what ``python -m melano.data synth`` writes), reupload (``train.csv`` + ``train/``),
folders (``benign/`` + ``malignant/``: no patient ids, so each image is its own patient), and
through `isic` the ISIC Archive (isic-cli's ``metadata.csv``), ISIC 2019 and HAM10000. The
target is melanoma; ``negatives`` picks all other lesions (default) or nevi only.
ISIC's own test set has no public labels, so the held-out test split is cut from the labelled
images by patient, and written once: every arm of an experiment trains and tests on the same images.

Bad labels, columns or names, and two names for one image file, are errors naming the file and
line. Missing, unreadable or oversized (`MAX_PIXELS`) images are skipped with a warning, or fatal
with ``strict``. Nothing is ever written into a data folder.

One concept per file: `index` (which images, which labels), `isic` (the ISIC sources' metadata), `images` (decoding), `cache` (the
uint8 memmap), `split` (patients into train/val/test), `datasets` (what models read), `cli`
(``python -m melano.data {check,synth,cache,split} --help``).
"""


from .cache import CACHE_VERSION, Cache, build_cache, cache_key, cache_path, remove_killed_builds
from .cli import main
from .datasets import ClassifierDataset, UnpairedDataset, default_loader_workers, make_loader
from .images import MAX_PIXELS, check_max_pixels, check_workers, default_workers, load_image, verify_images
from .index import IMAGE_EXTS, REQUIRED_COLUMNS, Index, Record, Skipped, link_problem, read_index
from .isic import NEGATIVES
from .split import SPLITS, load_split, load_split_data, make_split, split_path

__all__ = ["CACHE_VERSION", "Cache", "build_cache", "cache_key", "cache_path", "remove_killed_builds", "main",
           "ClassifierDataset", "UnpairedDataset", "default_loader_workers", "make_loader", "MAX_PIXELS",
           "check_max_pixels", "check_workers", "default_workers", "load_image", "verify_images", "IMAGE_EXTS",
           "REQUIRED_COLUMNS", "NEGATIVES", "Index", "Record", "Skipped", "link_problem", "read_index", "SPLITS", "load_split",
           "load_split_data", "make_split", "split_path"]
