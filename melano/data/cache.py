"""The image cache: every image decoded once into a (N, S, S, 3) uint8 memmap."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..infra.files import atomic_write, host_tag, pid_alive, temp_name, to_jsonable
from .images import MAX_PIXELS, decode_all, is_whole, check_max_pixels, check_workers
from .index import Index, Record, Skipped, warn_skipped

log = logging.getLogger("melano.data")


CACHE_VERSION = 1  # bump when load_image changes what it produces


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
    if not is_whole(size, 8):
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
        warn_skipped(index.skipped, "are missing", strict=True)
    key = cache_key(index, size, max_pixels)
    name = f"{Path(index.root).resolve().name or 'data'}-{size}-{key[:16]}"
    final = Path(cache_dir) / name
    if (final / "meta.json").is_file():
        cache = Cache(final)
        log.info("reusing cache %s (%d images)", final, len(cache))
        warn_skipped(cache.skipped, "were skipped when this cache was built", strict)
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
    errors = decode_all([r.path for r in index.records], size, str(path), shape, workers, "cache", max_pixels)
    bad = [Skipped(index.records[i].image_name, errors[i]) for i in sorted(errors)]
    warn_skipped(bad, "could not be decoded", strict)
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

def cache_path(cfg: Any) -> Path:
    """A trainer's image-cache folder: --cache-dir, or cache/ in its --out."""
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out) / "cache"
