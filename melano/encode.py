"""Write a translated image so that its file says nothing its real source's file does not.

A classifier can learn "synthetic => malignant" from the file alone when synthetic images are
encoded unlike the real ones (another size, JPEG quality or chroma subsampling). So a translation
is written like its source: a JPEG at the source's resolution with its quantisation tables, chroma
subsampling, progressive flag, dpi and ICC profile; a PNG losslessly, at its resolution and mode.
The GAN saw the source's centre square (`melano.data.load_image` crops it), so the translation is
resized to that square and pasted over it (EXIF orientation is already in the pixels: no EXIF is
written). Enlarging is done so that the loader's own shrinking gives the translation back
(`enlarge_for_loader`); plain bicubic enlarging leaves the round trip blurred, which shows: real
against translated images, two-sample AUC 0.82 that way, 0.55 this way, which is the floor
(bench/bench_quality.py, bench/results/quality.json).

    path = save_like(translated_pil_image, source_path, out_dir / "syn_ISIC_0000001")
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

log = logging.getLogger("melano.encode")

_JPEG_SUFFIXES = (".jpg", ".jpeg")
_SUBSAMPLING_NAMES = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}


def jpeg_settings(source: Image.Image) -> dict:
    """The `save` keywords that reproduce an opened JPEG's encoding, as far as Pillow reads it back."""
    if source.format != "JPEG":
        raise ValueError(f"jpeg_settings needs an opened JPEG file, got format {source.format!r}")
    settings: dict = {"qtables": {k: list(v) for k, v in source.quantization.items()}}
    sampling = JpegImagePlugin.get_sampling(source)
    if source.mode != "L":  # grayscale has a single channel: nothing to subsample
        if sampling not in _SUBSAMPLING_NAMES:
            raise ValueError(f"{source.filename}: its chroma layout ({source.layer}) is none of "
                             f"{list(_SUBSAMPLING_NAMES.values())}, so Pillow cannot write it; "
                             f"re-encode the real images first")
        settings["subsampling"] = sampling
    for key in ("progressive", "dpi", "icc_profile"):
        if source.info.get(key):
            settings[key] = source.info[key]
    return settings


@functools.lru_cache(maxsize=32)
def _resize_matrix(n: int, size: int, method: Image.Resampling) -> np.ndarray:
    """(size, n): Pillow's resize of a length-n axis to `size`, as the matrix it applies (its resize
    of each row of an identity image; "F" mode, so nothing is clipped or rounded on the way)."""
    eye = Image.fromarray(np.eye(n, dtype=np.float32), "F")
    return np.asarray(eye.resize((size, n), method), np.float64).T


def _resize_float(a: np.ndarray, size: int, method: Image.Resampling) -> np.ndarray:
    """Resize (H, W, C) float32 to size x size with Pillow's filter, both axes and channels at once:
    the same numbers as Pillow's "F" mode per channel (which keeps an error's sign and fractions)
    within float32 rounding, in a fifth of the time (a translated image takes 33 resizes)."""
    rows, cols = _resize_matrix(a.shape[0], size, method), _resize_matrix(a.shape[1], size, method)
    return (rows @ a.transpose(2, 0, 1) @ cols.T).transpose(1, 2, 0).astype(np.float32)


def enlarge_for_loader(image: Image.Image, side: int, iterations: int = 5) -> Image.Image:
    """Enlarge a square image to side x side so that `melano.data.load_image`'s shrinking returns it:
    Lanczos, then rounds of back-projection (add the enlarged error of the shrunk result), at most
    at 4x the image's size (all the loader keeps; a larger side gets one more Lanczos step)."""
    n = image.size[0]
    t = np.asarray(image, np.float32)
    t = t[..., None] if t.ndim == 2 else t
    work = min(side, 4 * n)
    u = _resize_float(t, work, Image.Resampling.LANCZOS)
    for _ in range(iterations):
        u += _resize_float(t - _resize_float(u, n, Image.Resampling.BILINEAR), work, Image.Resampling.LANCZOS)
    out = Image.fromarray(np.clip(u + 0.5, 0, 255).astype(np.uint8).squeeze(-1) if t.shape[2] == 1
                          else np.clip(u + 0.5, 0, 255).astype(np.uint8))
    return out if work == side else out.resize((side, side), Image.Resampling.LANCZOS)


def _fit_to_source(image: Image.Image, source: Image.Image) -> Image.Image:
    """The translation at the source's size and mode: resized to the source's centre square and
    pasted over it (the source's own pixels stay outside that square)."""
    canvas = ImageOps.exif_transpose(source)  # pixels as the loader sees them
    w, h = canvas.size
    side = min(w, h)
    mode = "L" if canvas.mode == "L" else "RGB"
    patch = image.convert(mode)
    if patch.size[0] != patch.size[1]:
        raise ValueError(f"the translation must be square (the GAN's view of its source), got {patch.size}")
    if patch.size[0] < side:
        patch = enlarge_for_loader(patch, side)
    elif patch.size[0] > side:
        patch = patch.resize((side, side), Image.Resampling.LANCZOS)
    if (w, h) == (side, side):
        out = patch
    else:
        out = canvas.convert(mode)
        out.paste(patch, ((w - side) // 2, (h - side) // 2))
    if canvas.mode == "RGBA":  # a PNG with alpha keeps its alpha channel
        out = out.convert("RGBA")
        out.putalpha(canvas.getchannel("A"))
    return out


def _suffix(source_path: Path, fmt: str | None) -> str:
    if fmt == "PNG":
        return ".png"
    return source_path.suffix.lower() if source_path.suffix.lower() in _JPEG_SUFFIXES else ".jpg"


def suffix_like(source_path: str | os.PathLike) -> str:
    """The file extension `save_like` gives a translation of `source_path`."""
    with Image.open(source_path) as source:
        return _suffix(Path(source_path), source.format)


def save_like(image: Image.Image, source_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write `image` (a translation of `source_path`) encoded like its source, with the source's
    extension in place of `out_path`'s; return the path written. ValueError for a source that is
    not JPEG or PNG, or a JPEG whose chroma layout Pillow cannot write."""
    source_path, out_path = Path(source_path), Path(out_path)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image.Image, got {type(image).__name__}; "
                         f"use PIL.Image.fromarray(uint8_array)")
    with Image.open(source_path) as source:
        fmt = source.format
        if fmt not in ("JPEG", "PNG"):
            raise ValueError(f"{source_path}: source format {fmt!r} is not JPEG or PNG, the formats melano "
                             f"reads; convert the real images first")
        settings = jpeg_settings(source) if fmt == "JPEG" else {}
        out = _fit_to_source(image, source)
    target = out_path.with_suffix(_suffix(source_path, fmt))
    target.parent.mkdir(parents=True, exist_ok=True)
    out.save(target, fmt, **settings)
    return target
