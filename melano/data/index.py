"""Which labelled images a folder holds: the ISIC layouts, read into an `Index`.

Kaggle (train.csv + jpeg/train/), re-upload (train.csv + train/) and benign/ + malignant/ folders
are read here; the ISIC Archive (isic-cli), ISIC 2019 and HAM10000 metadata are parsed by
melano.data.isic, and their names matched to files here."""

from __future__ import annotations

import csv
import dataclasses
import errno
import io
import logging
import os
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from . import isic

log = logging.getLogger("melano.data")


IMAGE_EXTS = (".jpg", ".jpeg", ".png")
REQUIRED_COLUMNS = ("image_name", "target")


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
    layout: str                      # "kaggle" | "reupload" | "folders" | "archive" | "isic2019" | "ham10000"
    records: list[Record]
    skipped: list[Skipped]           # listed but absent files
    csv_path: str | None = None
    negatives: str = "all"           # melano.data.isic.NEGATIVES: all other lesions, or nevi only
    counts: dict = dataclasses.field(default_factory=dict)     # metadata rows by kind (isic.KINDS), left out
    grouping: dict = dataclasses.field(default_factory=dict)   # basis -> images: patient_id, lesion_id, image
    licences: dict = dataclasses.field(default_factory=dict)   # copyright_license -> images kept
    licence_files: list = dataclasses.field(default_factory=list)
    attribution: str | None = None   # the credits file a publication owes its sources

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


def _list_images(*folders: Path) -> _Listing:
    """The image files directly in the folders (HAM10000 has two), by stem: one listdir each. Two
    files of one stem (``a.jpg`` and ``a.png``) would make a label ambiguous: ValueError."""
    files, broken, subdirs = {}, {}, []
    for entry in (e for folder in folders for e in sorted(os.scandir(folder), key=lambda e: e.name)):
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
    return _Listing(folders[0], files, broken, folded, subdirs)


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


def _stem(name: str) -> str:
    return os.path.splitext(name)[0] if name.lower().endswith(IMAGE_EXTS) else name


def match_files(folder: str | os.PathLike, names: Sequence[str]) -> list[tuple[Path | None, str]]:
    """(the file each name refers to, or None and why not) in `folder`, by `_find_image`'s rules:
    with or without extension, or in other letter case when only one file folds to it."""
    listing = _list_images(Path(folder))
    return [_find_image(listing, _stem(name)) for name in names]


def _file_id(path: Path) -> tuple[int, int]:
    """The file `path` leads to: all its names (other case or extension, links) give one id."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _labelled_file(listing: _Listing, stem: str, name: str, line: int, csv_path: Path, owner: dict,
                   skipped: list[Skipped]) -> Path | None:
    """The file CSV `line` labels, or None (noted in `skipped`) when there is none. Labels belong to
    files, not to spellings of names: another row for the same file (`owner`: file id -> its row)
    would give it two labels, or put it in train and test."""
    path, why = _find_image(listing, stem)
    if path is None:
        skipped.append(Skipped(name, f"listed in {csv_path.name} but {why}" if why.startswith("not found") else why))
        return None
    fid = _file_id(path)
    if fid in owner:
        line0, name0, path0 = owner[fid]
        same = f"the image file {path}" if path0 == path else f"one image file ({path0} and {path} are links to it)"
        raise ValueError(f"{csv_path}: lines {line0} ({name0!r}) and {line} ({name!r}) both name {same}; "
                         f"an image has one label: remove one of the rows")
    owner[fid] = (line, name, path)
    return path


def warn_skipped(skipped: Sequence[Skipped], what: str, strict: bool) -> None:
    if not skipped:
        return
    first = ", ".join(f"{s.name} ({s.reason})" for s in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    msg = f"{len(skipped)} image(s) {what}: {first}{more}"
    if strict:
        raise ValueError(msg + " [strict mode: fix or remove them, or run without --strict to skip them]")
    log.warning("%s; they are skipped", msg)


def open_csv(csv_path: Path) -> tuple[list[str], csv.DictReader]:
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


def csv_rows(reader: csv.DictReader, csv_path: Path) -> Iterator[tuple[int, dict]]:
    """(line, row) for each row; a malformed row (csv.Error) becomes a ValueError naming the line."""
    try:
        for row in reader:
            yield reader.line_num, row  # the physical line the row ends on (quoted cells may span lines)
    except csv.Error as e:
        raise ValueError(f"{csv_path}, line {reader.reader.line_num}: malformed CSV ({e})") from None


def _read_csv(csv_path: Path, img_dir: Path) -> tuple[list[Record], list[Skipped]]:
    listing = _list_images(img_dir)
    records, skipped, seen, owner = [], [], {}, {}
    no_patient = 0
    columns, reader = open_csv(csv_path)
    for col in REQUIRED_COLUMNS:
        if col not in columns:
            raise ValueError(f"{csv_path}: required column {col!r} is missing (found columns: "
                             f"{', '.join(columns) or 'none'}). ISIC 2020's train.csv has "
                             f"image_name, patient_id, ..., target.")
    extra_cols = [c for c in columns if c not in ("image_name", "target", "patient_id")]
    for line, row in csv_rows(reader, csv_path):
        name = isic.row_name(row, "image_name", line, csv_path, seen)
        where = f"{csv_path}, line {line} (image {name!r})"
        value = row["target"] or ""
        target = isic.binary(value)
        if target is None:
            raise ValueError(f"{where}: target {value!r} is not 0 or 1 (1 = malignant, 0 = benign); fix this row")
        bm = isic.cell(row, "benign_malignant").lower()
        if bm and bm != ("malignant" if target else "benign"):
            raise ValueError(f"{where}: benign_malignant is {bm!r} but target is {target}; "
                             f"the labels contradict each other, fix one of them")
        patient = isic.cell(row, "patient_id")
        if not patient:
            no_patient += 1
            patient = name
        path = _labelled_file(listing, _stem(name), name, line, csv_path, owner, skipped)
        if path is not None:
            records.append(Record(name, patient, target, str(path), {c: isic.cell(row, c) for c in extra_cols}))
    if no_patient:
        log.warning("%s: %d row(s) have no patient_id; each such image counts as its own patient, "
                    "so the split cannot keep their patient's images together", csv_path, no_patient)
    return records, skipped


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


def _isic_rows(src: isic.Source) -> list[isic.Row]:
    """The metadata rows of one ISIC source (melano.data.isic parses them)."""
    columns, reader = open_csv(src.csv_path)
    rows = csv_rows(reader, src.csv_path)
    if src.layout == "archive":
        return isic.parse_archive(columns, rows, src.csv_path)
    if src.layout == "ham10000":
        return isic.parse_ham(columns, rows, src.csv_path)
    lesions = {}
    if src.meta_csv is None:
        log.warning("%s: no %s beside it, so no lesion ids: each image is its own group, and a lesion's "
                    "images can land in both train and test", src.csv_path, isic.ISIC2019_META)
    else:
        meta_columns, meta_reader = open_csv(src.meta_csv)
        lesions = isic.lesion_ids(meta_columns, csv_rows(meta_reader, src.meta_csv), src.meta_csv)
    return isic.parse_isic2019(columns, rows, src.csv_path, lesions)


def _read_isic(src: isic.Source, negatives: str) -> tuple[list[Record], list[Skipped], dict]:
    """Records of an ISIC Archive, ISIC 2019 or HAM10000 folder, and what `check` reports of it."""
    if not any(d.is_dir() for d in src.image_dirs):
        raise ValueError(f"{src.csv_path} exists but its image folder {' or '.join(map(str, src.image_dirs))} "
                         f"does not; unpack the images beside it")
    rows = _isic_rows(src)
    groups, bases = isic.group_keys(rows)
    listing = _list_images(*[d for d in src.image_dirs if d.is_dir()])
    if len(src.image_dirs) > 1:  # HAM10000's two parts: a missing image is named as missing from their folder
        listing = listing._replace(folder=src.image_dirs[0].parent)
    counts = dict.fromkeys(isic.KINDS, 0) | {"left_out_by_negatives": 0}
    records, skipped, owner, licences, grouping = [], [], {}, {}, {}
    for row, group, basis in zip(rows, groups, bases):
        counts[row.kind] += 1
        target = isic.target_of(row.kind, negatives)
        if target is None:
            if row.kind not in ("indeterminate", "unknown"):
                counts["left_out_by_negatives"] += 1
            continue
        path = _labelled_file(listing, row.name, row.name, row.line, src.csv_path, owner, skipped)
        if path is None:
            continue
        records.append(Record(row.name, group, target, str(path), row.extra))
        grouping[basis] = grouping.get(basis, 0) + 1
        if row.licence:
            licences[row.licence] = licences.get(row.licence, 0) + 1
    if counts["indeterminate"] + counts["unknown"]:
        log.info("%s: %d indeterminate and %d unknown row(s) left out (no melanoma label)", src.csv_path,
                 counts["indeterminate"], counts["unknown"])
    info = {"counts": counts, "grouping": grouping, "licences": licences,
            "licence_files": [str(p) for p in src.licence_files],
            "attribution": str(src.attribution) if src.attribution else None}
    return records, skipped, info


def _unrecognised(root: Path, found: Sequence[str]) -> ValueError:
    if found:
        return ValueError(f"{root}: holds the label files of several sources ({', '.join(found)}); melano reads "
                          f"one per folder: move each into a folder of its own")
    return ValueError(f"{root}: unrecognised layout. Expected train.csv + jpeg/train/ (Kaggle), train.csv + train/ "
                      f"(re-upload), benign/ + malignant/ folders, {isic.ARCHIVE_CSV} + images (ISIC Archive, "
                      f"isic-cli), {isic.ISIC2019_CSV} + {isic.ISIC2019_DIR}/ (ISIC 2019), or {isic.HAM_CSV} + "
                      f"{'/ and '.join(isic.HAM_DIRS)}/ (HAM10000)")


def _read_train_csv(root: Path, negatives: str) -> tuple[str, list[Record], list[Skipped], dict]:
    """A Kaggle or re-upload folder; negatives 'nevi' keeps melanomas and nevi (the diagnosis column)."""
    csv_path = root / "train.csv"
    for layout, img_dir in (("kaggle", root / "jpeg" / "train"), ("reupload", root / "train")):
        if img_dir.is_dir():
            break
    else:
        raise ValueError(f"{csv_path} exists but neither {root / 'jpeg' / 'train'}/ (Kaggle layout) nor "
                         f"{root / 'train'}/ (re-upload layout) holds its images")
    records, skipped = _read_csv(csv_path, img_dir)
    if negatives != "nevi":
        return layout, records, skipped, {}
    if records and "diagnosis" not in records[0].extra:
        raise ValueError(f"{csv_path}: negatives 'nevi' needs a diagnosis column (ISIC 2020's train.csv has "
                         f"one); use negatives 'all' for this folder")
    kept = [r for r in records if r.target == 1 or r.extra["diagnosis"].strip().lower() == "nevus"]
    return layout, kept, skipped, {"counts": {"left_out_by_negatives": len(records) - len(kept)}}


def _read_folder(root: Path, negatives: str) -> tuple[str, list[Record], list[Skipped], dict, Path | None]:
    """(layout, records, skipped, what check reports, label file) of whichever layout `root` holds."""
    isic.target_of("melanoma", negatives)  # checks the option
    sources = isic.find_source(root)
    found = (["train.csv"] if (root / "train.csv").is_file() else []) + [s.csv_path.name for s in sources]
    if len(found) > 1:
        raise _unrecognised(root, found)
    if (root / "train.csv").is_file():
        return (*_read_train_csv(root, negatives), root / "train.csv")
    if sources:
        return (sources[0].layout, *_read_isic(sources[0], negatives), sources[0].csv_path)
    if (root / "benign").is_dir() or (root / "malignant").is_dir():
        for sub in ("benign", "malignant"):
            if not (root / sub).is_dir():
                raise ValueError(f"{root}: found the other class folder but no {sub}/ folder; "
                                 f"the folder layout needs both benign/ and malignant/")
        if negatives != "all":
            raise ValueError(f"{root}: benign/ + malignant/ folders carry no diagnosis, so negatives "
                             f"{negatives!r} cannot be applied; use negatives 'all'")
        return ("folders", *_read_folders(root), {}, None)
    raise _unrecognised(root, [])


def read_index(root: str | os.PathLike, strict: bool = False, negatives: str = "all") -> Index:
    """The labelled images of an ISIC-style folder; nothing is decoded (`verify_images` does that).

    A CSV name matches its file with or without extension, or in other letter case when only one
    file does. Absent files, broken links and images in subfolders of benign/ or malignant/ are
    skipped with a warning (``strict``: ValueError). Bad input is a ValueError naming file and line.
    `negatives` (melano.data.isic.NEGATIVES): "all" lesions other than melanoma are negatives, as
    in ISIC 2020, or "nevi" only (needs a diagnosis: not the benign/ + malignant/ layout).
    """
    root = Path(root)
    expected = "expected an ISIC folder with train.csv or metadata.csv, or benign/ and malignant/ folders"
    if root.exists() and not root.is_dir():
        hint = f"; pass the folder that holds it, {root.parent}" if root.name.lower().endswith(".csv") else ""
        raise NotADirectoryError(f"{root}: not a folder but a file{hint} ({expected})")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder: no such file or directory ({expected})")
    layout, records, skipped, info, csv_path = _read_folder(root, negatives)
    warn_skipped(skipped, "are missing" if csv_path else "were skipped", strict)
    if not records:
        raise ValueError(f"{root}: no usable images found ({len(skipped)} skipped)")
    grouping = info.pop("grouping", None) or _patient_basis(records)
    index = Index(str(root), layout, records, skipped, str(csv_path) if csv_path else None, negatives,
                  grouping=grouping, **info)
    log.info("%s: %d images (%d malignant) of %d groups (%s), layout %s", root, len(index),
             int(index.targets.sum()), len(set(index.patients)), grouping_text(grouping), layout)
    return index


def _patient_basis(records: list[Record]) -> dict[str, int]:
    """Kaggle/folders: rows with a patient_id are grouped by it; the others (patient = name) by image."""
    by_image = sum(r.patient_id == r.image_name for r in records)
    return {k: v for k, v in (("patient_id", len(records) - by_image), ("image", by_image)) if v}


def grouping_text(grouping: dict[str, int]) -> str:
    """'patient_id' or 'patient_id 30, lesion_id 5, image 2': how the split groups images."""
    if len(grouping) == 1:
        return next(iter(grouping))
    return ", ".join(f"{k} {v}" for k, v in grouping.items())
