"""Decoding: one image to (size, size, 3) uint8, then many in a process pool."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import threading
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from ..infra.cli import progress
from .index import Index, Skipped, warn_skipped


# A small file can declare a huge image (a decompression bomb) whose decode takes gigabytes, in
# every worker at once. 64 M is far above any ISIC image (the largest are about 6000 x 4000).
MAX_PIXELS = 64_000_000


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


def is_whole(value, least: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= least


def check_workers(workers: int) -> int:
    """Decoding processes as given, validated: 0 and 1 both decode in this process."""
    if not is_whole(workers, 0):
        raise ValueError(f"--workers must be a whole number >= 0 (0 or 1: decode in this process; "
                         f"omit it to use every core), got {workers!r}")
    return max(1, int(workers))


def check_max_pixels(max_pixels: int | None) -> int | None:
    """--max-pixels as given (None: `MAX_PIXELS`), validated."""
    if max_pixels is not None and not is_whole(max_pixels, 1):
        raise ValueError(f"--max-pixels must be a whole number >= 1 (default {MAX_PIXELS}), got {max_pixels!r}")
    return max_pixels


def decode_all(paths: Sequence[str], size: int, out: str | None, shape: tuple | None,
                workers: int | None, desc: str, max_pixels: int | None = None) -> dict[int, str]:
    """Decode every path (into `out` rows when given). Returns {row: error} for failures."""
    workers = default_workers() if workers is None else check_workers(workers)
    jobs = [(i, p, size, max_pixels) for i, p in enumerate(paths)]
    # A pool costs more than it saves on a handful of images. And it forks: a pool forked from a thread
    # other than the main one (a pipeline stage running beside others) once never finished shutting
    # down (a worker that was not terminated, in the quality stage), so such a thread decodes here.
    serial = workers == 1 or len(jobs) < 64 or threading.current_thread() is not threading.main_thread()
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
    errors = decode_all([r.path for r in index.records], 64, None, None, workers, "verify",
                         check_max_pixels(max_pixels))
    bad = [Skipped(index.records[i].image_name, errors[i]) for i in sorted(errors)]
    warn_skipped(bad, "could not be decoded", strict)
    return bad
