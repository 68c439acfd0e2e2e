"""The ISIC sources' metadata: which lesion each row of an ISIC Archive, ISIC 2019 or HAM10000
download shows, and how that becomes melano's label and patient group.

Three sources, told apart by their files (`find_source`):

    archive   ``metadata.csv`` + ``ISIC_xxxxxxx.jpg`` in one folder, ``attribution.txt``, ``licenses/``:
              what ``isic image download DIR`` writes (isic-cli). Columns: isic_id, attribution,
              copyright_license, then the acquisition and clinical fields, sorted.
    isic2019  ``ISIC_2019_Training_GroundTruth.csv`` (image, one-hot MEL NV BCC AK BKL DF VASC SCC UNK),
              ``ISIC_2019_Training_Metadata.csv`` (image, ..., lesion_id), ``ISIC_2019_Training_Input/``.
    ham10000  ``HAM10000_metadata.csv`` (lesion_id, image_id, dx, dx_type, age, sex, localization),
              images in ``HAM10000_images_part_1/`` and ``HAM10000_images_part_2/``.

Each row gets a *kind* (`KINDS`). The target is melanoma, as in ISIC 2020; the negatives
(`NEGATIVES`) are "all" other lesions (the default, as in ISIC 2020: carcinomas included, and
counted apart) or "nevi" only. Indeterminate and unknown rows are left out and counted. Rows are
grouped by patient_id, else lesion_id, else the image: HAM10000 and ISIC 2019 hold several images
of one lesion, and a split by image would leak them across train and test.

Nothing here touches the image files: melano.data.index matches the names to files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

NEGATIVES = ("all", "nevi")
KINDS = ("melanoma", "nevus", "other_benign", "other_malignant", "indeterminate", "unknown")

ARCHIVE_CSV = "metadata.csv"
ISIC2019_CSV = "ISIC_2019_Training_GroundTruth.csv"
ISIC2019_META = "ISIC_2019_Training_Metadata.csv"
ISIC2019_DIR = "ISIC_2019_Training_Input"
HAM_CSV = "HAM10000_metadata.csv"
HAM_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")

# The ISIC Archive's diagnosis hierarchy (diagnosis_1 > diagnosis_2 > ...), and its older flat
# `diagnosis` + `benign_malignant` fields, which older downloads (ISIC 2020's own rows) carry.
ARCHIVE_MELANOMA = "Malignant melanocytic proliferations (Melanoma)"
ARCHIVE_NEVI = "Benign melanocytic proliferations"
ARCHIVE_CLASSES = {"Benign": "other_benign", "Malignant": "other_malignant", "Indeterminate": "indeterminate"}

# ISIC 2019's classes and HAM10000's dx codes. AK / akiec (actinic keratosis and intraepithelial
# carcinoma, Bowen's disease) are counted with the carcinomas, as HAM10000's paper groups them
# (Tschandl et al., Sci. Data 2018).
ISIC2019_CLASSES = {"MEL": "melanoma", "NV": "nevus", "BCC": "other_malignant", "AK": "other_malignant",
                    "BKL": "other_benign", "DF": "other_benign", "VASC": "other_benign", "SCC": "other_malignant",
                    "UNK": "unknown"}
HAM_DX = {"mel": "melanoma", "nv": "nevus", "bkl": "other_benign", "bcc": "other_malignant",
          "akiec": "other_malignant", "vasc": "other_benign", "df": "other_benign"}


@dataclasses.dataclass
class Source:
    """Where one download's metadata and images are."""
    layout: str                      # "archive" | "isic2019" | "ham10000"
    csv_path: Path                   # the labels
    image_dirs: list[Path]
    meta_csv: Path | None = None     # ISIC 2019's lesion ids
    attribution: Path | None = None  # the credits a publication owes
    licence_files: list[Path] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Row:
    """One metadata row: its image, what it shows, and who it belongs to."""
    name: str
    kind: str
    line: int
    patient: str = ""
    lesion: str = ""
    licence: str = ""
    extra: dict = dataclasses.field(default_factory=dict)


def find_source(root: Path) -> list[Source]:
    """The ISIC sources whose label files are directly in `root` (none, one, or an ambiguous several)."""
    found = []
    if (root / ARCHIVE_CSV).is_file():
        licences = sorted((root / "licenses").glob("*.txt")) if (root / "licenses").is_dir() else []
        found.append(Source("archive", root / ARCHIVE_CSV, [root], None, _file(root / "attribution.txt"), licences))
    if (root / ISIC2019_CSV).is_file():
        images = root / ISIC2019_DIR
        found.append(Source("isic2019", root / ISIC2019_CSV, [images], _file(root / ISIC2019_META),
                            _file(images / "ATTRIBUTION.txt"), [p for p in [images / "LICENSE.txt"] if p.is_file()]))
    if (root / HAM_CSV).is_file():
        found.append(Source("ham10000", root / HAM_CSV, [root / d for d in HAM_DIRS]))
    return found


def _file(path: Path) -> Path | None:
    return path if path.is_file() else None


def cell(row: dict, column: str) -> str:
    """A CSV row's cell, stripped; "" where the row has none."""
    return (row.get(column) or "").strip()


def binary(value: str) -> int | None:
    """0 or 1 from a cell such as "1" or "0.0"; None for anything else."""
    try:
        f = float(value.strip())
    except ValueError:
        return None
    return int(f) if f in (0.0, 1.0) else None


def require(columns: list[str], needed: Iterable[str], csv_path: Path, what: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(f"{csv_path}: required column(s) {', '.join(map(repr, missing))} missing (found: "
                         f"{', '.join(columns) or 'none'}); {what}")


def row_name(row: dict, col: str, line: int, csv_path: Path, seen: dict[str, int]) -> str:
    """The row's image id; a missing or repeated one is an error naming both lines."""
    if None in row:
        raise ValueError(f"{csv_path}, line {line}: more cells than header columns")
    name = cell(row, col)
    if not name:
        raise ValueError(f"{csv_path}, line {line}: empty {col}")
    if name in seen:
        raise ValueError(f"{csv_path}: {col} {name!r} appears twice, on lines {seen[name]} and {line}; "
                         f"remove the duplicate")
    seen[name] = line
    return name


def archive_kind(row: dict, where: str) -> str:
    """What an ISIC Archive row shows: diagnosis_1..2 (today's hierarchy), else the older
    diagnosis / benign_malignant fields; no diagnosis at all is unknown."""
    d1, d2 = cell(row, "diagnosis_1"), cell(row, "diagnosis_2")
    old, bm = cell(row, "diagnosis").lower(), cell(row, "benign_malignant").lower()
    if d2 == ARCHIVE_MELANOMA or old == "melanoma":
        return "melanoma"
    if d2 == ARCHIVE_NEVI or old == "nevus":
        return "nevus"
    if d1:
        if d1 not in ARCHIVE_CLASSES:
            raise ValueError(f"{where}: diagnosis_1 {d1!r} is not one of {', '.join(ARCHIVE_CLASSES)}; "
                             f"fix this row or download the metadata again with isic-cli")
        return ARCHIVE_CLASSES[d1]
    if bm.startswith("indeterminate"):
        return "indeterminate"
    return {"benign": "other_benign", "malignant": "other_malignant"}.get(bm, "unknown")


def parse_archive(columns: list[str], rows, csv_path: Path) -> list[Row]:
    """Rows of an isic-cli metadata.csv; `rows` yields (line, dict) as melano.data.index.csv_rows does."""
    require(columns, ["isic_id"], csv_path, "an ISIC Archive metadata.csv (isic-cli) starts with isic_id, "
                                            "attribution, copyright_license")
    if not {"diagnosis_1", "diagnosis", "benign_malignant"} & set(columns):
        raise ValueError(f"{csv_path}: no diagnosis column (diagnosis_1, or the older diagnosis / "
                         f"benign_malignant); download the clinical metadata too (isic image download)")
    out, seen = [], {}
    for line, row in rows:
        name = row_name(row, "isic_id", line, csv_path, seen)
        kind = archive_kind(row, f"{csv_path}, line {line} (image {name!r})")
        extra = {c: cell(row, c) for c in columns if c != "isic_id"}
        out.append(Row(name, kind, line, extra.get("patient_id", ""), extra.get("lesion_id", ""),
                       extra.get("copyright_license", ""), extra))
    return out


def lesion_ids(columns: list[str], rows, csv_path: Path) -> dict[str, str]:
    """image -> lesion_id of ISIC_2019_Training_Metadata.csv (empty where the row has none)."""
    require(columns, ["image", "lesion_id"], csv_path, "ISIC 2019's metadata has image, ..., lesion_id")
    seen: dict[str, int] = {}
    return {row_name(row, "image", line, csv_path, seen): cell(row, "lesion_id") for line, row in rows}


def parse_isic2019(columns: list[str], rows, csv_path: Path, lesions: dict[str, str]) -> list[Row]:
    """Rows of ISIC_2019_Training_GroundTruth.csv: exactly one class column is 1 in each."""
    classes = list(ISIC2019_CLASSES)
    require(columns, ["image"] + classes, csv_path, f"ISIC 2019's ground truth has image, {', '.join(classes)}")
    out, seen = [], {}
    for line, row in rows:
        name = row_name(row, "image", line, csv_path, seen)
        where = f"{csv_path}, line {line} (image {name!r})"
        for c in classes:
            if binary(cell(row, c)) is None:
                raise ValueError(f"{where}: {c} is {cell(row, c)!r}, not 0 or 1")
        ones = [c for c in classes if binary(cell(row, c))]
        if len(ones) != 1:
            raise ValueError(f"{where}: {len(ones)} classes are 1 ({', '.join(ones) or 'none'}); "
                             f"a one-hot row has exactly one")
        out.append(Row(name, ISIC2019_CLASSES[ones[0]], line, lesion=lesions.get(name, ""),
                       extra={"diagnosis": ones[0]}))
    return out


def parse_ham(columns: list[str], rows, csv_path: Path) -> list[Row]:
    """Rows of HAM10000_metadata.csv; a dx outside the seven classes is an error."""
    require(columns, ["lesion_id", "image_id", "dx"], csv_path,
            "HAM10000_metadata.csv has lesion_id, image_id, dx, dx_type, age, sex, localization")
    out, seen = [], {}
    for line, row in rows:
        name = row_name(row, "image_id", line, csv_path, seen)
        dx = cell(row, "dx")
        if dx not in HAM_DX:
            raise ValueError(f"{csv_path}, line {line} (image {name!r}): dx {dx!r} is not one of "
                             f"{', '.join(HAM_DX)}; fix this row")
        extra = {c: cell(row, c) for c in columns if c not in ("image_id", "lesion_id")}
        out.append(Row(name, HAM_DX[dx], line, lesion=cell(row, "lesion_id"), extra=extra))
    return out


def target_of(kind: str, negatives: str) -> int | None:
    """1 for melanoma, 0 for a negative, None for a row left out (indeterminate, unknown, or a
    non-nevus when `negatives` is "nevi")."""
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES} (all other lesions, or nevi only), got {negatives!r}")
    if kind == "melanoma":
        return 1
    if kind == "nevus" or (negatives == "all" and kind in ("other_benign", "other_malignant")):
        return 0
    return None


def group_keys(rows: list[Row]) -> tuple[list[str], list[str]]:
    """(each row's group, the basis of each: "patient_id", "lesion_id" or "image"): patient_id,
    else the patient another row gives the same lesion, else lesion_id, else the image itself."""
    patient_of = {r.lesion: r.patient for r in rows if r.lesion and r.patient}
    keys, bases = [], []
    for r in rows:
        ids = {"patient_id": r.patient or patient_of.get(r.lesion), "lesion_id": r.lesion, "image": r.name}
        basis = next(b for b, key in ids.items() if key)  # the first one the row has
        keys.append(ids[basis])
        bases.append(basis)
    return keys, bases
