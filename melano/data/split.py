"""The split: patient-grouped, stratified, written once to splits.csv."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..infra.files import atomic_write
from .cache import Cache, build_cache
from .index import Index, open_csv, csv_rows, read_index

log = logging.getLogger("melano.data")


SPLITS = ("train", "val", "test")


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
                    seed: int = 0, negatives: str = "all") -> tuple[Index, Cache, dict[str, list[str]]]:
    """The folder's index (`read_index`'s `negatives`), its uint8 cache at `size`, and the
    experiment's split: `split_csv` as it is (whatever seed drew it), or drawn there with the
    default fractions and `seed`."""
    index = read_index(data_dir, negatives=negatives)
    cache = build_cache(index, size, cache_dir)
    return index, cache, make_split(cache, split_csv, seed=seed, same_params=False)


def split_path(cfg: Any) -> Path:
    """A trainer's split file: --split-csv, or splits.csv in its --out (never in --data)."""
    return Path(cfg.split_csv) if cfg.split_csv else Path(cfg.out) / "splits.csv"



def load_split(csv_path: str | os.PathLike, data=None) -> dict[str, list[str]]:
    """Read a ``splits.csv`` (image_name, patient_id, target, split); ValueError if a patient is in
    two splits. With `data` (an Index or Cache), check that it lists exactly those images with the
    same labels and patients, and return the names in `data` order."""
    csv_path = Path(csv_path)
    rows = {}
    columns, reader = open_csv(csv_path)
    missing = {"image_name", "split"} - set(columns)
    if missing:
        raise ValueError(f"{csv_path}: missing column(s) {sorted(missing)}")
    for line, r in csv_rows(reader, csv_path):
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
