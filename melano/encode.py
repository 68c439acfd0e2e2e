"""Write a translated image so that its file says nothing its real source's file does not.

A classifier can learn "synthetic => malignant" from the file alone when the synthetic images are
encoded differently from the real ones (another size, JPEG quality or chroma subsampling). So a
translation is written *like its source*:

  JPEG source   at the source's resolution, with the source's own quantisation tables, chroma
                subsampling, progressive flag, dpi and ICC profile (as read by Pillow);
  PNG source    lossless PNG at the source's resolution and mode.

The GAN sees the centre square of its source (`melano.data.load_image` crops it), so a square
translation is resized to the side of that square and pasted over the source's centre. A square
source is simply replaced; a non-square one keeps its border pixels, which melano's loader crops
away again. EXIF orientation is already applied to the pixels, so no EXIF is written.

Enlarging is done so that the loader's own shrinking gives the translation back (`enlarge_for_loader`:
Lanczos, then back-projection); plain bicubic enlarging leaves the round trip blurred, which shows.
On the quick preset's data, real training melanomas against "translations" that are the same kind
of lesion, read back at 64 px (bench/bench_quality.py, bench/results/quality.json), two-sample AUC
on the quality stage's pixel features / on ImageNet features:
    old way (JPEG q95 4:4:4 at the GAN's 64 px)          0.99 / 0.93
    source's JPEG settings after bicubic enlarging        0.82 / 0.87
    save_like (back-projected enlarging)                  0.55 / 0.45
    the lesions written exactly as the real files are     0.55 / 0.44  (the floor)

    path = save_like(translated_pil_image, source_path, out_dir / "syn_ISIC_0000001")
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

log = logging.getLogger("melano.encode")

_JPEG_SUFFIXES = (".jpg", ".jpeg")
_SUBSAMPLING_NAMES = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}


def jpeg_settings(source: Image.Image) -> dict:
    """The encoder settings Pillow can read back from an opened JPEG: the `save` keywords that
    reproduce its quantisation tables, chroma subsampling, progressive mode, dpi and ICC profile."""
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


def _resize_float(a: np.ndarray, size: int, method: Image.Resampling) -> np.ndarray:
    """Resize an (H, W, C) float32 array to size x size, channel by channel (Pillow's "F" mode keeps
    the fractions and the negative values of an error image)."""
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c]), "F").resize((size, size), method))
                     for c in range(a.shape[2])], -1)


def enlarge_for_loader(image: Image.Image, side: int, iterations: int = 5) -> Image.Image:
    """Enlarge a square image to side x side so that shrinking it back as `melano.data.load_image`
    does (bilinear, antialiased) returns the image: Lanczos, then `iterations` rounds of
    back-projection (add the enlarged error of the shrunk result). The rounds run at most at 4x the
    image's size, which is all the loader keeps; a larger source gets one more Lanczos step."""
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


def suffix_like(source_path: str | os.PathLike) -> str:
    """The file extension `save_like` gives a translation of `source_path`."""
    source_path = Path(source_path)
    with Image.open(source_path) as source:
        if source.format == "PNG":
            return ".png"
    return source_path.suffix.lower() if source_path.suffix.lower() in _JPEG_SUFFIXES else ".jpg"


def save_like(image: Image.Image, source_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write `image` (a translation of `source_path`) encoded like its source; return the path written.

    The extension of `out_path` is replaced by the source's (``.jpg``/``.jpeg`` for JPEG, ``.png``
    for PNG). Raises ValueError for a source in any other format, or a JPEG whose chroma layout
    Pillow cannot write.
    """
    source_path, out_path = Path(source_path), Path(out_path)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image.Image, got {type(image).__name__}; "
                         f"use PIL.Image.fromarray(uint8_array)")
    with Image.open(source_path) as source:
        fmt = source.format
        if fmt == "JPEG":
            settings = jpeg_settings(source)
            suffix = source_path.suffix.lower() if source_path.suffix.lower() in _JPEG_SUFFIXES else ".jpg"
        elif fmt == "PNG":
            settings, suffix = {}, ".png"
        else:
            raise ValueError(f"{source_path}: source format {fmt!r} is not JPEG or PNG, the formats melano "
                             f"reads; convert the real images first")
        out = _fit_to_source(image, source)
    target = out_path.with_suffix(suffix)
    target.parent.mkdir(parents=True, exist_ok=True)
    out.save(target, fmt, **settings)
    return target
