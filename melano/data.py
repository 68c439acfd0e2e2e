"""ISIC 2020 data: read a folder, split it by patient, cache it as uint8, serve it to models.

    index = read_index("data/isic")                   # which images, which labels
    cache = build_cache(index, 128, "runs/cache")      # decode once -> (N, S, S, 3) uint8 memmap
    split = make_split(cache, "runs/x/splits.csv")     # {"train": [...], "val": [...], "test": [...]}
    loader = make_loader(ClassifierDataset(cache, split["train"], mean, std), 64, shuffle=True)

`read_index` reads three layouts: kaggle (``train.csv`` + ``jpeg/train/``: the SIIM-ISIC 2020
download, and what ``python -m melano.data synth`` writes), reupload (``train.csv`` + ``train/``)
and folders (``benign/`` + ``malignant/``: no patient ids, so each image is its own patient).
ISIC's own test set has no public labels, so the held-out test split is cut from the labelled
images by patient, and written once: every arm of an experiment trains and tests on the same images.

Bad labels, columns or names, and two names for one image file, are errors naming the file and
line. Missing, unreadable or oversized (`MAX_PIXELS`) images are skipped with a warning, or fatal
with ``strict``. Nothing is ever written into a data folder.

CLI: ``python -m melano.data {check,synth,cache,split} --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import errno
import functools
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .infra.cli import progress, setup_logging
from .infra.files import atomic_write, host_tag, pid_alive, temp_name, to_jsonable
from .infra.options import add_options, from_args
from .pixels import to_tensor


log = logging.getLogger("melano.data")

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
REQUIRED_COLUMNS = ("image_name", "target")
SPLITS = ("train", "val", "test")
CACHE_VERSION = 1  # bump when load_image changes what it produces
# A small file can declare a huge image (a decompression bomb) whose decode takes gigabytes, in
# every worker at once. 64 M is far above any ISIC image (the largest are about 6000 x 4000).
MAX_PIXELS = 64_000_000


# ==============================================================================================
# Index: which images exist and what their labels are

class Skipped(NamedTuple):
    """An image left out, and why (for people)."""
    name: str
    reason: str


@dataclasses.dataclass
class Record:
    """One labelled image; ``extra`` holds the other CSV columns (sex, age_approx, ...) as strings."""
    image_name: str
    patient_id: str
    target: int          # 1 = malignant (melanoma), 0 = benign
    path: str
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Index:
    """The labelled images of one folder, in CSV (or sorted file) order."""
    root: str
    layout: str                      # "kaggle" | "reupload" | "folders"
    records: list[Record]
    skipped: list[Skipped]           # listed but absent files
    csv_path: str | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def names(self) -> list[str]:
        return [r.image_name for r in self.records]

    @property
    def targets(self) -> np.ndarray:
        return np.array([r.target for r in self.records], dtype=np.int64)

    @property
    def patients(self) -> list[str]:
        return [r.patient_id for r in self.records]


class _Listing(NamedTuple):
    """The entries of one image folder that matter to the reader."""
    folder: Path
    files: dict[str, Path]         # stem -> path of each image file, dangling links included
    broken: dict[str, str]         # stem -> why its link leads to no file
    folded: dict[str, list[str]]   # case-folded stem -> the stems that fold to it
    subdirs: list[Path]            # folders inside it (not hidden)


def link_problem(path: str) -> str | None:
    """Why the symlink `path` leads to no file, or None if it does (only links are stat'ed)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return f"broken link: {path} points to {os.readlink(path)}, which does not exist; fix or remove the link"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"link loop: {path} leads back to itself through links; fix or remove the link"
        return f"unreachable link: {path} -> {os.readlink(path)} ({e.strerror}); fix or remove the link"
    return None


def _list_images(folder: Path) -> _Listing:
    """The image files directly in one folder, by stem: one listdir. Two files of one stem
    (``a.jpg`` and ``a.png``) would make a label ambiguous: ValueError."""
    files: dict[str, Path] = {}
    broken: dict[str, str] = {}
    subdirs: list[Path] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        problem = link_problem(entry.path) if entry.is_symlink() else None  # before is_dir: a loop raises
        if not problem and entry.is_dir():  # follows links: a linked folder is a folder too
            subdirs.append(Path(entry.path))
            continue
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() not in IMAGE_EXTS:
            continue
        if stem in files:
            raise ValueError(f"duplicate image name {stem!r}: both {files[stem]} and {entry.path} exist; "
                             f"remove one of them")
        files[stem] = Path(entry.path)
        if problem:
            broken[stem] = problem
    folded: dict[str, list[str]] = {}
    for stem in files:
        folded.setdefault(stem.casefold(), []).append(stem)
    return _Listing(folder, files, broken, folded, subdirs)


def _find_image(listing: _Listing, stem: str) -> tuple[Path | None, str]:
    """(the file an image name refers to, or None and why not). An exact match wins; else a name
    in other letter case when just one file folds to it (hand-made CSVs and re-uploads often
    change the case of ISIC names); when several do, which one is meant is unknowable."""
    if stem not in listing.files:
        same = listing.folded.get(stem.casefold(), [])
        if len(same) != 1:
            why = (f"several files match it ignoring letter case ({', '.join(same)}); rename the CSV entry "
                   f"to the exact file name" if same else "")
            return None, why or f"not found in {listing.folder}"
        stem = same[0]
    if stem in listing.broken:
        return None, listing.broken[stem]
    return listing.files[stem], ""


def _file_id(path: Path) -> tuple[int, int]:
    """The file `path` leads to: all its names (other case or extension, links) give one id."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _parse_target(value: str, where: str) -> int:
    try:
        f = float(value.strip())
    except ValueError:
        f = None
    if f not in (0.0, 1.0):
        raise ValueError(f"{where}: target {value!r} is not 0 or 1 (1 = malignant, 0 = benign); fix this row")
    return int(f)


def _warn_skipped(skipped: Sequence[Skipped], what: str, strict: bool) -> None:
    if not skipped:
        return
    first = ", ".join(f"{s.name} ({s.reason})" for s in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    msg = f"{len(skipped)} image(s) {what}: {first}{more}"
    if strict:
        raise ValueError(msg + " [strict mode: fix or remove them, or run without --strict to skip them]")
    log.warning("%s; they are skipped", msg)


def _csv_reader(csv_path: Path) -> tuple[list[str], csv.DictReader]:
    """(header columns, stripped; a DictReader for the rows) of a UTF-8 CSV file, every leading
    byte-order mark dropped (a file saved twice by a BOM-writing editor has two). ValueError
    naming the file for text that is not UTF-8, an unreadable header or a repeated column."""
    raw = Path(csv_path).read_bytes()
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{csv_path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); melano reads "
                         f"CSV files as UTF-8: save it as UTF-8, e.g. from Windows-1252/Latin-1 with "
                         f"`iconv -f cp1252 -t utf-8 {Path(csv_path).name} > fixed.csv`") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = [c.strip() for c in (reader.fieldnames or [])]
    except csv.Error as e:
        raise ValueError(f"{csv_path}, line 1: not a readable CSV header ({e})") from None
    dup = sorted({c for c in columns if columns.count(c) > 1})
    if dup:
        raise ValueError(f"{csv_path}: column(s) {', '.join(map(repr, dup))} appear more than once in the "
                         f"header; keep one of each")
    reader.fieldnames = columns
    return columns, reader


def _csv_rows(reader: csv.DictReader, csv_path: Path) -> Iterator[tuple[int, dict]]:
    """(line, row) for each row; a malformed row (csv.Error) becomes a ValueError naming the line."""
    try:
        for row in reader:
            yield reader.line_num, row  # the physical line the row ends on (quoted cells may span lines)
    except csv.Error as e:
        raise ValueError(f"{csv_path}, line {reader.reader.line_num}: malformed CSV ({e})") from None


def _read_csv(csv_path: Path, img_dir: Path) -> tuple[list[Record], list[Skipped]]:
    listing = _list_images(img_dir)
    records, skipped, seen = [], [], {}
    owner: dict[tuple[int, int], tuple[int, str, Path]] = {}  # file id -> (line, name, path)
    no_patient = 0
    columns, reader = _csv_reader(csv_path)
    for col in REQUIRED_COLUMNS:
        if col not in columns:
            raise ValueError(f"{csv_path}: required column {col!r} is missing (found columns: "
                             f"{', '.join(columns) or 'none'}). ISIC 2020's train.csv has "
                             f"image_name, patient_id, ..., target.")
    extra_cols = [c for c in columns if c not in ("image_name", "target", "patient_id")]
    for line, row in _csv_rows(reader, csv_path):
        if None in row:  # more cells than header columns
            raise ValueError(f"{csv_path}, line {line}: more cells than header columns")
        name = (row["image_name"] or "").strip()
        where = f"{csv_path}, line {line} (image {name!r})"
        if not name:
            raise ValueError(f"{csv_path}, line {line}: empty image_name")
        if name in seen:
            raise ValueError(f"{csv_path}: image_name {name!r} appears twice, on lines {seen[name]} "
                             f"and {line}; remove the duplicate")
        seen[name] = line
        target = _parse_target(row["target"] or "", where)
        bm = (row.get("benign_malignant") or "").strip().lower()
        if bm and bm != ("malignant" if target else "benign"):
            raise ValueError(f"{where}: benign_malignant is {bm!r} but target is {target}; "
                             f"the labels contradict each other, fix one of them")
        patient = (row.get("patient_id") or "").strip()
        if not patient:
            no_patient += 1
            patient = name
        stem = os.path.splitext(name)[0] if name.lower().endswith(IMAGE_EXTS) else name
        path, why = _find_image(listing, stem)
        if path is None:
            reason = f"listed in {csv_path.name} but {why}" if why.startswith("not found") else why
            skipped.append(Skipped(name, reason))
            continue
        _claim_file(owner, path, line, name, csv_path)
        records.append(Record(name, patient, target, str(path), {c: (row.get(c) or "").strip() for c in extra_cols}))
    if no_patient:
        log.warning("%s: %d row(s) have no patient_id; each such image counts as its own patient, "
                    "so the split cannot keep their patient's images together", csv_path, no_patient)
    return records, skipped


def _claim_file(owner: dict, path: Path, line: int, name: str, csv_path: Path) -> None:
    """Record that CSV `line` labels the file at `path`. Labels belong to files, not to spellings
    of names: another row for the same file would give it two labels, or put it in train and test."""
    fid = _file_id(path)
    if fid in owner:
        line0, name0, path0 = owner[fid]
        same = f"the image file {path}" if path0 == path else f"one image file ({path0} and {path} are links to it)"
        raise ValueError(f"{csv_path}: lines {line0} ({name0!r}) and {line} ({name!r}) both name {same}; "
                         f"an image has one label: remove one of the rows")
    owner[fid] = (line, name, path)


def _nested_images(root: Path, subdirs: Sequence[Path]) -> list[Skipped]:
    """Images in folders within benign/ or malignant/: skipped, and named as such (what a
    subfolder means, another class or a copy, is unknowable)."""
    found = []
    for top in subdirs:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if f.startswith(".") or os.path.splitext(f)[1].lower() not in IMAGE_EXTS:
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), root)
                found.append(Skipped(rel, f"in the subfolder {dirpath}/, and only images directly in "
                                          f"{top.parent}/ are read: move it up a level into {top.parent}/"))
    return found


def _read_folders(root: Path) -> tuple[list[Record], list[Skipped]]:
    records, skipped, where, owner = [], [], {}, {}
    for target, sub in ((0, "benign"), (1, "malignant")):
        listing = _list_images(root / sub)
        skipped += _nested_images(root, listing.subdirs)
        for stem, path in sorted(listing.files.items()):
            if stem in listing.broken:
                skipped.append(Skipped(f"{sub}/{path.name}", listing.broken[stem]))
                continue
            if stem in where:
                raise ValueError(f"duplicate image name {stem!r}: {where[stem]} and {path}; an image "
                                 f"cannot be both benign and malignant, remove one")
            fid = _file_id(path)
            if fid in owner:  # a hard link or symlink: one image under two names
                both = ("an image cannot be both benign and malignant" if owner[fid].parent != path.parent
                        else "it would count twice, and could land in both train and test")
                raise ValueError(f"{owner[fid]} and {path} are the same file (linked); {both}: remove one")
            where[stem], owner[fid] = path, path
            records.append(Record(stem, stem, target, str(path)))
    log.warning("%s: benign/ + malignant/ folders carry no patient ids; each image counts as its own "
                "patient, so the split cannot keep a patient's images together", root)
    return records, skipped


def read_index(root: str | os.PathLike, strict: bool = False) -> Index:
    """The labelled images of an ISIC-style folder; nothing is decoded (`verify_images` does that).

    A CSV name matches its file with or without extension, or in other letter case when only one
    file does. Absent files, broken links and images in subfolders of benign/ or malignant/ are
    skipped with a warning (``strict``: ValueError). Bad input is a ValueError naming file and line.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        hint = f"; pass the folder that holds it, {root.parent}" if root.name.lower().endswith(".csv") else ""
        raise NotADirectoryError(f"{root}: not a folder but a file{hint} (expected an ISIC folder with "
                                 f"train.csv, or benign/ and malignant/ folders)")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder: no such file or directory (expected an ISIC folder "
                                f"with train.csv, or benign/ and malignant/ folders)")
    csv_path = root / "train.csv"
    if csv_path.is_file():
        for layout, img_dir in (("kaggle", root / "jpeg" / "train"), ("reupload", root / "train")):
            if img_dir.is_dir():
                break
        else:
            raise ValueError(f"{csv_path} exists but neither {root / 'jpeg' / 'train'}/ (Kaggle layout) nor "
                             f"{root / 'train'}/ (re-upload layout) holds its images")
        records, skipped = _read_csv(csv_path, img_dir)
    elif (root / "benign").is_dir() or (root / "malignant").is_dir():
        for sub in ("benign", "malignant"):
            if not (root / sub).is_dir():
                raise ValueError(f"{root}: found the other class folder but no {sub}/ folder; "
                                 f"the folder layout needs both benign/ and malignant/")
        layout, csv_path = "folders", None
        records, skipped = _read_folders(root)
    else:
        raise ValueError(f"{root}: unrecognised layout. Expected train.csv + jpeg/train/ (Kaggle), "
                         f"train.csv + train/ (re-upload), or benign/ + malignant/ folders")
    _warn_skipped(skipped, "are missing" if csv_path else "were skipped", strict)
    if not records:
        raise ValueError(f"{root}: no usable images found ({len(skipped)} skipped)")
    index = Index(str(root), layout, records, skipped, str(csv_path) if csv_path else None)
    log.info("%s: %d images (%d malignant) of %d patients, layout %s", root, len(index),
             int(index.targets.sum()), len(set(index.patients)), layout)
    return index


# ==============================================================================================
# Decoding: one image, then many in a process pool

def load_image(path: str | os.PathLike, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image to RGB (alpha dropped, EXIF orientation applied), resize its shorter side to
    `size` and centre-crop: (size, size, 3) uint8. An image of more than `max_pixels` pixels is a
    ValueError before anything is decoded (Pillow itself refuses about 179 M, whatever the limit)."""
    # melano's limit replaces Pillow's warning (at about 89 M pixels), which would only be noise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return _decode(path, size, max_pixels)
        except Image.DecompressionBombError as e:
            raise ValueError(f"{path}: refused as a possible decompression bomb ({e}); this is Pillow's own "
                             f"limit, which --max-pixels cannot raise: if the image is real, shrink it "
                             f"with another tool first") from None


def _decode(path: str | os.PathLike, size: int, max_pixels: int) -> np.ndarray:
    with Image.open(path) as im:  # lazy: only the header is read so far
        w, h = im.size
        if w * h > max_pixels:
            raise ValueError(f"{path}: {w} x {h} = {w * h} pixels, over the limit of {max_pixels}; it was not "
                             f"decoded (a file this large may be a decompression bomb): shrink it, or raise "
                             f"the limit (e.g. --max-pixels) if the image is real")
        if im.format == "JPEG":  # decode at a reduced DCT scale: ~10x faster on full-size ISIC images
            im.draft(None, (2 * size, 2 * size))  # no-op unless the image is at least 4x larger
        im.load()  # raises on truncated or corrupt data
        if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation tag
            im = ImageOps.exif_transpose(im)
        im = _to_rgb(im)
        w, h = im.size
        side = min(w, h)
        if (w, h) != (size, size):
            left, top = (w - side) // 2, (h - side) // 2
            im = im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
        arr = np.array(im)  # a writable copy: callers may hand it to torch.from_numpy
    if arr.shape != (size, size, 3) or arr.dtype != np.uint8:  # guard: never store a wrong shape
        raise ValueError(f"{path}: decoded to {arr.shape} {arr.dtype}, expected ({size}, {size}, 3) uint8")
    return arr


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.int64)
        if im.mode == "I" and a.max(initial=0) <= 255:  # 32-bit container holding 8-bit values
            a8 = np.clip(a, 0, 255).astype(np.uint8)
        else:  # 16-bit range
            a8 = ((np.clip(a, 0, 65535) + 128) // 257).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if im.mode == "F":
        raise ValueError("32-bit float images are not supported; save it as 8- or 16-bit")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


# Worker-process state for the pool: the cache file, opened once per process.
_WORKER: dict = {}


def _worker_init(path: str | None, shape: tuple | None) -> None:
    _WORKER["out"] = np.memmap(path, np.uint8, "r+", shape=shape) if path else None


def _decode_job(job: tuple[int, str, int, int | None]) -> tuple[int, str | None]:
    """Decode job (row, path, size, max_pixels) into row of the cache file; return (row, error or None)."""
    row, path, size, max_pixels = job
    kw = {} if max_pixels is None else {"max_pixels": max_pixels}  # None: load_image's default
    try:
        img = load_image(path, size, **kw)
    except Exception as e:  # corrupt, truncated, unreadable: reported, and skipped or fatal
        return row, f"{type(e).__name__}: {e}"
    if _WORKER.get("out") is not None:
        _WORKER["out"][row] = img
    return row, None


def default_workers() -> int:
    """Worker processes for decoding: every core this process may use, at most 32."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 32))


def _whole(value, least: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= least


def check_workers(workers: int) -> int:
    """Decoding processes as given, validated: 0 and 1 both decode in this process."""
    if not _whole(workers, 0):
        raise ValueError(f"--workers must be a whole number >= 0 (0 or 1: decode in this process; "
                         f"omit it to use every core), got {workers!r}")
    return max(1, int(workers))


def check_max_pixels(max_pixels: int | None) -> int | None:
    """--max-pixels as given (None: `MAX_PIXELS`), validated."""
    if max_pixels is not None and not _whole(max_pixels, 1):
        raise ValueError(f"--max-pixels must be a whole number >= 1 (default {MAX_PIXELS}), got {max_pixels!r}")
    return max_pixels


def _run_decode(paths: Sequence[str], size: int, out: str | None, shape: tuple | None,
                workers: int | None, desc: str, max_pixels: int | None = None) -> dict[int, str]:
    """Decode every path (into `out` rows when given). Returns {row: error} for failures."""
    workers = default_workers() if workers is None else check_workers(workers)
    jobs = [(i, p, size, max_pixels) for i, p in enumerate(paths)]
    serial = workers == 1 or len(jobs) < 64  # a pool costs more than it saves on a handful of images
    if serial:
        _worker_init(out, shape)
    try:
        with contextlib.nullcontext() if serial else mp.get_context().Pool(
                workers, initializer=_worker_init, initargs=(out, shape)) as pool:
            chunk = max(1, min(64, len(jobs) // (workers * 8)))
            results = map(_decode_job, jobs) if serial else pool.imap_unordered(_decode_job, jobs, chunksize=chunk)
            return {row: err for row, err in progress(results, total=len(jobs), desc=desc) if err}
    finally:
        _WORKER.clear()


def verify_images(index: Index, workers: int | None = None, strict: bool = False,
                  max_pixels: int | None = None) -> list[Skipped]:
    """Decode every image of `index` without caching it; return those that fail (too large included)."""
    errors = _run_decode([r.path for r in index.records], 64, None, None, workers, "verify",
                         check_max_pixels(max_pixels))
    bad = [Skipped(index.records[i].image_name, errors[i]) for i in sorted(errors)]
    _warn_skipped(bad, "could not be decoded", strict)
    return bad


# ==============================================================================================
# Cache: every image decoded once into a (N, S, S, 3) uint8 memmap

class Cache:
    """A finished image cache: ``images`` is a read-only (N, S, S, 3) uint8 memmap whose row i is
    image ``names[i]``, label ``targets[i]``, patient ``patients[i]``. Images that failed to
    decode are left out (``skipped``). Pickles as its path: DataLoader workers reopen the memmap."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = meta = _read_meta(self.path)
        self.size: int = meta["size"]
        self.names: list[str] = meta["names"]
        self.targets: np.ndarray = np.array(meta["targets"], dtype=np.int64)
        self.patients: list[str] = meta["patients"]
        self.skipped: list[Skipped] = [Skipped(*s) for s in meta["skipped"]]
        self._row = {n: i for i, n in enumerate(self.names)}

    @functools.cached_property
    def images(self) -> np.ndarray:
        return np.memmap(self.path / "images.u8", np.uint8, "r", shape=(len(self), self.size, self.size, 3))

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "images"}

    def row(self, name: str) -> int:
        """Row of image `name`; KeyError naming the cache if it is absent (e.g. skipped)."""
        try:
            return self._row[name]
        except KeyError:
            raise KeyError(f"image {name!r} is not in the cache {self.path} "
                           f"(absent from the folder, or skipped as unreadable)") from None

    def rows(self, names_or_rows: Iterable) -> np.ndarray:
        """Rows (int64 array) for image names, or validated row numbers passed through."""
        items = list(names_or_rows)
        if all(isinstance(x, str) for x in items):
            return np.array([self.row(x) for x in items], dtype=np.int64)
        rows = np.asarray(items, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row numbers must be in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        return rows

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r}, n={len(self)}, size={self.size}, malignant={int(self.targets.sum())})"


def _read_meta(path: Path) -> dict:
    """A finished cache's meta.json, checked against its version and the size of images.u8."""
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{path}: not a finished cache (no meta.json)")
    damaged = f"the cache is damaged, delete {path} and build it again"
    try:
        meta = json.loads((path / "meta.json").read_text())
    except ValueError as e:
        raise ValueError(f"{path / 'meta.json'}: unreadable ({e}); {damaged}") from None
    if meta.get("version") != CACHE_VERSION:
        raise ValueError(f"{path}: cache version {meta.get('version')} != {CACHE_VERSION}; delete it")
    expected = len(meta["names"]) * meta["size"] ** 2 * 3
    actual = (path / "images.u8").stat().st_size
    if actual != expected:
        raise ValueError(f"{path}/images.u8 has {actual} bytes, expected {expected}; {damaged}")
    return meta


def cache_key(index: Index, size: int, max_pixels: int | None = None) -> str:
    """Hash of what the cache depends on: version, size, a non-default pixel limit (it decides
    which images are skipped), and each file's name, label, patient, path, size and mtime."""
    limit = "" if max_pixels in (None, MAX_PIXELS) else f" max_pixels={max_pixels}"  # old keys stay valid
    h = hashlib.sha256(f"melano-cache v{CACHE_VERSION} size={size}{limit}\n".encode())
    for r in index.records:
        st = os.stat(r.path)
        h.update(f"{r.image_name}\t{r.target}\t{r.patient_id}\t{os.path.abspath(r.path)}\t"
                 f"{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def remove_killed_builds(cache_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary folders of killed cache builds in `cache_dir` (any key); return them.
    Only those of dead processes of this host: a shared cache folder holds other nodes' builds,
    whose process ids mean nothing here."""
    pattern = re.compile(rf"^\..+-\d+-[0-9a-f]{{16}}\.tmp-{re.escape(host_tag())}-(\d+)-[0-9a-f]{{8}}$")
    removed = []
    for entry in os.scandir(cache_dir) if os.path.isdir(cache_dir) else []:
        m = pattern.match(entry.name)
        if m and entry.is_dir(follow_symlinks=False) and not pid_alive(int(m.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    if removed:
        log.info("removed %d folder(s) of killed cache builds from %s", len(removed), cache_dir)
    return removed


def _check_cache_args(index: Index, size: int, cache_dir: str | os.PathLike, workers: int | None) -> None:
    if not _whole(size, 8):
        raise ValueError(f"--size: the cache's image side must be a whole number of at least 8 pixels, "
                         f"got {size!r}")
    if workers is not None:
        check_workers(workers)
    root, where = Path(index.root).resolve(), Path(cache_dir).resolve()
    if where == root or root in where.parents:
        raise ValueError(f"--cache-dir {cache_dir} is inside the data folder {index.root}; melano never "
                         f"writes into its input data: pass a --cache-dir outside it")


def _make_build_folder(cache_dir: Path, name: str) -> Path:
    """The temporary folder of one build, named so that `remove_killed_builds` can recognise it."""
    tmp = temp_name(cache_dir / name)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except PermissionError as e:
        raise PermissionError(f"--cache-dir {cache_dir}: cannot write there ({e.strerror}: {e.filename}); "
                              f"pass a writable --cache-dir") from None
    except (FileExistsError, NotADirectoryError) as e:
        raise NotADirectoryError(f"--cache-dir {cache_dir}: {e.filename} is a file, not a folder; pass a "
                                 f"folder as --cache-dir") from None
    return tmp


def build_cache(index: Index, size: int, cache_dir: str | os.PathLike, workers: int | None = None,
                strict: bool = False, max_pixels: int | None = None) -> Cache:
    """Decode every image of `index` once (`load_image`) into ``cache_dir/<folder>-<size>-<key>/``,
    or reuse that cache: a changed, added or removed file gives another `cache_key`. Images that
    fail to decode or have more than `max_pixels` pixels are skipped with a warning (``strict``:
    fatal, as are missing files). `workers` processes decode (default `default_workers`)."""
    _check_cache_args(index, size, cache_dir, workers)
    check_max_pixels(max_pixels)
    if strict:
        _warn_skipped(index.skipped, "are missing", strict=True)
    key = cache_key(index, size, max_pixels)
    name = f"{Path(index.root).resolve().name or 'data'}-{size}-{key[:16]}"
    final = Path(cache_dir) / name
    if (final / "meta.json").is_file():
        cache = Cache(final)
        log.info("reusing cache %s (%d images)", final, len(cache))
        _warn_skipped(cache.skipped, "were skipped when this cache was built", strict)
        return cache
    # built in a temporary folder, renamed into place when complete (meta.json written last): a
    # killed build is never used, and a later build deletes what it left
    remove_killed_builds(cache_dir)
    tmp = _make_build_folder(Path(cache_dir), name)
    try:
        log.info("building cache %s: %d images at %dx%d", final, len(index), size, size)
        kept, bad = _decode_into(tmp / "images.u8", index, size, workers, strict, max_pixels)
        meta = {"version": CACHE_VERSION, "size": size, "key": key, "root": index.root,
                "layout": index.layout, "names": [r.image_name for r in kept],
                "targets": [r.target for r in kept], "patients": [r.patient_id for r in kept],
                "skipped": [list(s) for s in index.skipped + bad]}
        atomic_write(tmp / "meta.json", json.dumps(to_jsonable(meta), indent=2) + "\n")
        try:
            os.rename(tmp, final)  # atomic: the cache appears complete or not at all
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same cache first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cache = Cache(final)
    log.info("cache ready: %s (%d images, %.1f MB)", final, len(cache), len(cache) * size * size * 3 / 1e6)
    return cache


def _decode_into(path: Path, index: Index, size: int, workers: int | None, strict: bool,
                 max_pixels: int | None) -> tuple[list[Record], list[Skipped]]:
    """Decode the images of `index` into the rows of a new file, then move the good rows to the
    front and cut the rest off; return (the records kept, the images skipped)."""
    n = len(index.records)
    shape = (n, size, size, 3)
    with open(path, "wb") as f:
        f.truncate(n * size * size * 3)
    errors = _run_decode([r.path for r in index.records], size, str(path), shape, workers, "cache", max_pixels)
    bad = [Skipped(index.records[i].image_name, errors[i]) for i in sorted(errors)]
    _warn_skipped(bad, "could not be decoded", strict)
    keep = [i for i in range(n) if i not in errors]
    if bad:  # in place: rows only move down
        arr = np.memmap(path, np.uint8, "r+", shape=shape)
        for new, old in enumerate(keep):
            if new != old:
                arr[new] = arr[old]
        arr.flush()
        del arr
        os.truncate(path, len(keep) * size * size * 3)
    if not keep:
        raise ValueError(f"{index.root}: none of the {n} images could be decoded")
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return [index.records[i] for i in keep], bad


# ==============================================================================================
# Split: patient-grouped, stratified, written once to splits.csv

def _split_groups(names: Sequence[str], targets: np.ndarray, patients: Sequence[str],
                  fracs: dict[str, float], seed: int) -> dict[str, str]:
    """{image_name: split}. Patients with malignant images go first, largest first, each into the
    split furthest below its share of malignant images; then benign-only patients by image count.
    Each split with a non-zero fraction first gets one malignant patient (or this raises)."""
    by_patient: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        by_patient.setdefault(p, []).append(i)
    pids = sorted(by_patient)
    rng = np.random.default_rng(seed)
    rng.shuffle(pids)  # random order among patients of equal size
    pos = [p for p in pids if targets[by_patient[p]].any()]
    neg = [p for p in pids if not targets[by_patient[p]].any()]
    n_pos = lambda p: int(targets[by_patient[p]].sum())
    n_all = lambda p: len(by_patient[p])
    active = [s for s in SPLITS if fracs[s] > 0]
    assign: dict[str, str] = {}

    for group, weight in ((pos, n_pos), (neg, n_all)):
        order = sorted(group, key=weight, reverse=True)  # stable: ties keep the shuffled order
        total = sum(weight(p) for p in order)
        placed = dict.fromkeys(SPLITS, 0)
        if group is pos and total:
            for s in reversed(active):  # test, val, train each get one of the smallest patients
                if not order:
                    raise ValueError(f"only {len(pos)} patient(s) have malignant images, so the {s!r} "
                                     f"split would get none; set its fraction to 0 or add malignant images")
                p = order.pop()
                assign[p] = s
                placed[s] += weight(p)
        for p in order:
            s = max(active, key=lambda s: fracs[s] * total - placed[s])  # largest deficit; ties -> train
            assign[p] = s
            placed[s] += weight(p)
    return {names[i]: assign[p] for p, idx in by_patient.items() for i in idx}


def make_split(data, out_csv: str | os.PathLike, val_frac: float = 0.15, test_frac: float = 0.15,
               seed: int = 0, same_params: bool = True) -> dict[str, list[str]]:
    """The split of `data` (the `Cache`, so that unreadable images are left out), grouped by patient
    and stratified by label: ``{"train": [...], "val": [...], "test": [...]}`` in `data` order.
    It is read from `out_csv` if that exists (`load_split` checks it against `data`), else drawn
    and written there. ``<out_csv>.json`` records seed and fractions: asking for others is a
    ValueError, so an experiment never mixes two splits, unless ``same_params=False`` (a GAN run
    uses its experiment's split whatever its own seed)."""
    out_csv = Path(out_csv)
    names, targets, patients = list(data.names), np.asarray(data.targets), list(data.patients)
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"need 0 <= val_frac, test_frac and val_frac + test_frac < 1, "
                         f"got val_frac={val_frac}, test_frac={test_frac}")
    params = {"seed": seed, "val_frac": val_frac, "test_frac": test_frac}
    side = out_csv.with_name(out_csv.name + ".json")
    if out_csv.exists():
        old = json.loads(side.read_text()) if same_params and side.exists() else params
        if old != params:
            raise ValueError(f"{out_csv} was drawn with {old}, but {params} was asked for; pass the "
                             f"same values to reuse it, or give a new path to draw anew")
        split = load_split(out_csv, data)
        log.info("reusing split %s", out_csv)
    else:
        fracs = {"train": 1 - val_frac - test_frac, "val": val_frac, "test": test_frac}
        where = _split_groups(names, targets, patients, fracs, seed)
        split = {s: [n for n in names if where[n] == s] for s in SPLITS}
        buf = io.StringIO()  # csv quoting: folder-layout patient ids are file stems, commas and all
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image_name", "patient_id", "target", "split"])
        w.writerows([n, p, int(t), where[n]] for n, p, t in zip(names, patients, targets))
        atomic_write(side, json.dumps(params, indent=2) + "\n")
        atomic_write(out_csv, buf.getvalue())
    t, p = dict(zip(names, targets)), dict(zip(names, patients))
    for s in SPLITS:
        log.info("split %-5s: %5d images, %4d malignant, %4d patients", s, len(split[s]),
                 sum(t[n] for n in split[s]), len({p[n] for n in split[s]}))
    return split


def load_split_data(data_dir: str | Path, size: int, cache_dir: str | Path, split_csv: str | Path,
                    seed: int = 0) -> tuple[Index, Cache, dict[str, list[str]]]:
    """The folder's index, its uint8 cache at `size`, and the experiment's split: `split_csv` as
    it is (whatever seed drew it), or drawn there with the default fractions and `seed`."""
    index = read_index(data_dir)
    cache = build_cache(index, size, cache_dir)
    return index, cache, make_split(cache, split_csv, seed=seed, same_params=False)


def split_path(cfg: Any) -> Path:
    """A trainer's split file: --split-csv, or splits.csv in its --out (never in --data)."""
    return Path(cfg.split_csv) if cfg.split_csv else Path(cfg.out) / "splits.csv"


def cache_path(cfg: Any) -> Path:
    """A trainer's image-cache folder: --cache-dir, or cache/ in its --out."""
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out) / "cache"


def load_split(csv_path: str | os.PathLike, data=None) -> dict[str, list[str]]:
    """Read a ``splits.csv`` (image_name, patient_id, target, split); ValueError if a patient is in
    two splits. With `data` (an Index or Cache), check that it lists exactly those images with the
    same labels and patients, and return the names in `data` order."""
    csv_path = Path(csv_path)
    rows = {}
    columns, reader = _csv_reader(csv_path)
    missing = {"image_name", "split"} - set(columns)
    if missing:
        raise ValueError(f"{csv_path}: missing column(s) {sorted(missing)}")
    for line, r in _csv_rows(reader, csv_path):
        if r["split"] not in SPLITS:
            raise ValueError(f"{csv_path}, line {line}: split {r['split']!r} is not one of {SPLITS}")
        if r["image_name"] in rows:
            raise ValueError(f"{csv_path}, line {line}: image {r['image_name']!r} listed twice")
        rows[r["image_name"]] = r
    owner: dict[str, str] = {}
    for n, r in rows.items():
        pid = r.get("patient_id") or n
        if owner.setdefault(pid, r["split"]) != r["split"]:
            raise ValueError(f"{csv_path}: patient {pid!r} is in both {owner[pid]!r} and {r['split']!r}")
    if data is not None:
        _check_split_matches(csv_path, rows, data)
    order = list(rows) if data is None else list(data.names)
    return {s: [n for n in order if rows[n]["split"] == s] for s in SPLITS}


def _check_split_matches(csv_path: Path, rows: dict[str, dict], data) -> None:
    another = ("it belongs to another data set or experiment: keep it, and give --split-csv (or --out) a new "
               "path to draw a split for this data")
    missing, extra = set(data.names) - set(rows), set(rows) - set(data.names)
    if missing or extra:
        raise ValueError(f"{csv_path} does not match the data: {len(missing)} image(s) missing from it "
                         f"(e.g. {sorted(missing)[:3]}), {len(extra)} it lists that the data lacks "
                         f"(e.g. {sorted(extra)[:3]}); {another}.")
    for n, t, p in zip(data.names, data.targets, data.patients):
        r = rows[n]
        if r.get("target") and int(float(r["target"])) != int(t):
            raise ValueError(f"{csv_path}: image {n!r} has target {r['target']} but the data says {int(t)}; "
                             f"{another}")
        if r.get("patient_id") and r["patient_id"] != p:
            raise ValueError(f"{csv_path}: image {n!r} belongs to patient {r['patient_id']!r} but the data "
                             f"says {p!r}; {another}")


# ==============================================================================================
# Datasets and loaders

class ClassifierDataset(torch.utils.data.Dataset):
    """(image, label) from a Cache: image float32 (3, S, S) = (pixel/255 - mean) / std per channel,
    label float32 (1.0 = malignant); `items` are image names or cache rows."""

    def __init__(self, cache: Cache, items: Iterable, mean: Sequence[float], std: Sequence[float]):
        self.cache = cache
        self.rows = cache.rows(items)
        mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        if mean_t.shape != (3,) or std_t.shape != (3,) or (std_t <= 0).any():
            raise ValueError(f"mean and std need 3 values each with std > 0, got mean={mean}, std={std}")
        self.scale = (1 / (255 * std_t)).view(3, 1, 1)
        self.shift = (-mean_t / std_t).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.rows[i]
        x = torch.from_numpy(np.array(self.cache.images[row])).permute(2, 0, 1)
        x = x.float().mul_(self.scale).add_(self.shift)
        return x, torch.tensor(float(self.cache.targets[row]))

    @property
    def targets(self) -> np.ndarray:
        return self.cache.targets[self.rows]


class UnpairedDataset(torch.utils.data.Dataset):
    """Unpaired images for CycleGAN: item i is ``{"A": a, "B": b, "a_row": int, "b_row": int}``,
    a and b float32 (3, S, S) in [-1, 1]. A is read in order, B through a permutation seeded by
    (seed, epoch), each B image equally often; ``set_epoch(e)`` pairs them anew."""

    def __init__(self, cache: Cache, rows_a: Iterable, rows_b: Iterable, seed: int = 0):
        self.cache = cache
        self.rows_a, self.rows_b = cache.rows(rows_a), cache.rows(rows_b)
        if len(self.rows_a) == 0 or len(self.rows_b) == 0:
            raise ValueError(f"both domains need images, got |A|={len(self.rows_a)}, |B|={len(self.rows_b)}")
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._perm_b = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows_b))

    def __len__(self) -> int:
        return max(len(self.rows_a), len(self.rows_b))

    def _image(self, row: int) -> torch.Tensor:
        return to_tensor(np.array(self.cache.images[row]), -1, 1)

    def __getitem__(self, i: int) -> dict:
        a = int(self.rows_a[i % len(self.rows_a)])
        b = int(self.rows_b[self._perm_b[i % len(self.rows_b)]])
        return {"A": self._image(a), "B": self._image(b), "a_row": a, "b_row": b}


def default_loader_workers() -> int:
    """DataLoader workers: 0 on 4 cores or fewer, where reading the memmap in the main process is
    faster than feeding workers (bench/bench_data.py); else min(8, cores - 1)."""
    n = default_workers()
    return 0 if n <= 4 else min(8, n - 1)


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                workers: int | None = None, drop_last: bool = False,
                sampler: torch.utils.data.Sampler | None = None,
                pin_memory: bool | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader with a seeded shuffle (without a `sampler` only), `default_loader_workers()` and
    pinned memory when CUDA is available. Workers are not persistent, so `set_epoch` reaches them."""
    workers = default_loader_workers() if workers is None else workers
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
        num_workers=workers, drop_last=drop_last, generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory, persistent_workers=False)


# ==============================================================================================
# CLI

def _check(args) -> int:
    index = read_index(args.dir, strict=False)
    bad = verify_images(index, workers=args.workers, strict=False, max_pixels=args.max_pixels)
    bad_names = {s.name for s in bad}
    ok = [r for r in index.records if r.image_name not in bad_names]
    skipped = index.skipped + bad
    m = sum(r.target for r in ok)
    summary = {"images": len(ok), "malignant": m, "benign": len(ok) - m,
               "patients": len({r.patient_id for r in ok}), "skipped": [s.name for s in skipped]}
    if args.json:
        print(json.dumps(summary))
    else:
        log.info("%s (%s layout): %d usable images, %d malignant, %d benign, %d patients, %d skipped",
                 args.dir, index.layout, summary["images"], m, summary["benign"], summary["patients"],
                 len(skipped))
        for s in skipped:
            log.info("  skipped %s: %s", s.name, s.reason)
    if not ok:
        log.error("%s: no usable images", args.dir)
        return 2
    if args.strict and skipped:  # an input error like any other: exit 2, as the other commands do
        log.error("%s: %d image(s) skipped (listed above); --strict makes that fatal: fix or remove them, "
                  "or run without --strict", args.dir, len(skipped))
        return 2
    return 0


def _parser() -> argparse.ArgumentParser:
    from melano import synth

    p = argparse.ArgumentParser(prog="python -m melano.data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate an ISIC-style folder (decodes every image)")
    c.add_argument("dir", help="folder: train.csv + jpeg/train/ or train/, or benign/ + malignant/")
    c.add_argument("--json", action="store_true",
                   help='print {"images", "malignant", "benign", "patients", "skipped": [names]} as JSON')
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
    from melano import synth

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
