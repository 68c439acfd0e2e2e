"""Synthetic dermoscopy: the embedded default data set.

No real ISIC images exist on the machines melano is developed on, so this module writes a
folder in the ISIC 2020 Kaggle layout (``train.csv`` with all 8 columns plus
``jpeg/train/<image_name>.jpg``) that `melano.data` reads exactly like the real thing.

What an image is made of (numpy float32 in [0, 1], Pillow for resampling and lines, then JPEG):
  skin      a per-patient skin tone, low-frequency illumination, fine skin texture;
  lesion    a pigmented blob whose shape, border, colours, structures and size follow the
            ABCD rule (Asymmetry, Border, Colour, Diameter) used by dermatologists;
  hairs     dark curved lines crossing some images;
  scope     the dark circular vignette of the dermoscope's contact plate.

How the classes differ. Every lesion has one hidden *severity* ``s`` in [0, 1]. Benign nevi draw
``s ~ Beta(2, 6)``, melanomas ``s ~ Beta(6, 2)``. Each ABCD feature (and the dermoscopic
structures) is ``s`` plus its own noise, so no single feature decides the class. ``difficulty``
is the probability that a lesion draws its severity from the *other* class's distribution:
atypical nevi (benign, but asymmetric and multicoloured) and featureless small melanomas
(malignant, but small, round and brown). 0 leaves only the natural overlap of the two Beta
distributions; 0.5 makes the classes identical.

Calibration of the default (`DEFAULT_DIFFICULTY` = 0.04), measured by
``bench/bench_data.py --calibrate`` (``bench/results/data_calibration.json``), 2 x 2500 images:
  - the hidden severity itself scores ROC AUC 0.949: an upper bound for any classifier, since
    an image depends on its label only through ``s``;
  - a small 8-layer CNN trained for 8 epochs on 4000 balanced 64x64 images scores 0.885 on the
    other 1000 (the severity scores 0.933 on the same 1000); a pretrained EfficientNet on more
    data should land between, i.e. in the 0.90-0.95 the experiment wants;
  - logistic regression on the mean RGB colour scores 0.56 (tested: < 0.65).

Trivial statistics do not give the class away: skin tone, exposure and the scope vignette vary
far more between images than the lesion moves the mean colour, and melanomas are lighter brown
under their dark and light blotches (black, blue-grey, red, white regression). Their larger size
still shows a little: the mean colour of the central quarter scores AUC 0.67 and mean plus
standard deviation of the colour 0.66 (calibration file above).

Determinism: image ``i`` is drawn from ``numpy.random.default_rng([seed, 1, i])`` and patient
``p`` from ``default_rng([seed, 2, p])``, so the output is identical byte for byte for the same
arguments (and the same Pillow/libjpeg), whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import logging
import math
import multiprocessing as mp
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from melano import outdir
from melano.common import log_config, progress

log = logging.getLogger("melano.synth")

DEFAULT_DIFFICULTY = 0.04  # calibrated: see the module docstring
CSV_COLUMNS = ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
               "diagnosis", "benign_malignant", "target"]

# Anatomic sites and their ISIC 2020 frequencies (the 527 missing values become "").
_SITES = ["torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", "oral/genital", ""]
_SITE_P = np.array([16845, 8417, 4983, 1855, 375, 124, 527], np.float64)
_SITE_P /= _SITE_P.sum()

# Reference colours, linear-ish RGB in [0, 1]. Lesion colours act as transmittances relative to
# _REF_SKIN, so a lesion on darker skin is darker too (pigment absorbs light; it is not paint).
_REF_SKIN = np.array([0.93, 0.76, 0.67], np.float32)
_LIGHT_SKIN = np.array([0.95, 0.78, 0.70], np.float32)
_DARK_SKIN = np.array([0.70, 0.50, 0.38], np.float32)
_LIGHT_BROWN = np.array([0.62, 0.42, 0.30], np.float32)
_DARK_BROWN = np.array([0.30, 0.17, 0.11], np.float32)
_BLACK = np.array([0.13, 0.09, 0.09], np.float32)
_BLUE_GREY = np.array([0.42, 0.46, 0.56], np.float32)
_RED = np.array([0.80, 0.38, 0.38], np.float32)
_WHITE = np.array([0.93, 0.90, 0.89], np.float32)
_HAIR = np.array([0.16, 0.11, 0.09], np.float32)


@dataclasses.dataclass
class SynthConfig:
    out: str
    benign: int = 900
    malignant: int = 100
    size: int = 128                      # output images are size x size
    seed: int = 0
    difficulty: float = DEFAULT_DIFFICULTY
    images_per_patient: float = 5.0      # mean; ISIC 2020 has ~16, small sets need more patients
    workers: int = 1                     # >1: render in a process pool (same bytes as 1 worker)
    force: bool = False                  # replace what `out` holds (a data set, other outputs)


def check_config(cfg: SynthConfig) -> None:
    """ValueError naming the option of the first out-of-range value; called before any work."""
    if not 16 <= cfg.size <= 4096:
        raise ValueError(f"--size must be between 16 and 4096 pixels, got {cfg.size}")
    if cfg.benign < 0 or cfg.malignant < 0 or cfg.benign + cfg.malignant == 0:
        raise ValueError(f"--benign and --malignant must be >= 0 and not both 0, "
                         f"got --benign {cfg.benign} --malignant {cfg.malignant}")
    if not 0 <= cfg.difficulty <= 0.5:
        raise ValueError(f"--difficulty must be in [0, 0.5] (0.5: the classes look identical), got {cfg.difficulty}")
    if not (math.isfinite(cfg.images_per_patient) and cfg.images_per_patient >= 1):
        raise ValueError(f"--images-per-patient is a mean number of images per patient, so at least 1, "
                         f"got {cfg.images_per_patient}")
    if cfg.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {cfg.workers}")


# ----------------------------------------------------------------------------------------------
# Smooth random fields: white noise on a coarse k x k grid, upsampled bicubically by Pillow.
# Far cheaper than filtering a full-size image, and single-threaded: numpy's matmul would call a
# multi-threaded BLAS that spins on these tiny products and runs ~10x slower on a busy machine.

def _fields(rng: np.random.Generator, size: int, k: int, n: int) -> np.ndarray:
    """n smooth fields of shape (size, size), about unit variance, about k bumps per side."""
    g = rng.standard_normal((n, k, k), dtype=np.float32)
    return np.stack([np.asarray(Image.fromarray(gi, "F").resize((size, size), Image.Resampling.BICUBIC))
                     for gi in g])


@functools.lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2 - 1
    return np.meshgrid(c, c, indexing="xy")  # X varies along columns, Y along rows


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _over(img: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-composite a colour over img (in place) with a per-pixel alpha of shape (S, S)."""
    img += alpha[..., None] * (colour - img)
    return img


# ----------------------------------------------------------------------------------------------
# Patients and lesions

def _patient(seed: int, pid: int) -> dict:
    """Per-patient attributes: skin tone, hairiness, sex, age."""
    rng = np.random.default_rng([seed, 2, pid])
    tone = float(rng.beta(2.0, 4.0))
    sex = ["male", "female", ""][int(rng.choice(3, p=[0.515, 0.483, 0.002]))]
    age = int(np.clip(np.round(rng.normal(49, 14.4) / 5) * 5, 0, 90))
    return {"tone": tone, "hairy": float(rng.beta(1.2, 2.5)), "sex": sex, "age": age,
            "hue": rng.normal(0, 0.03, 3).astype(np.float32)}


def severity(rng: np.random.Generator, malignant: bool, difficulty: float) -> float:
    """The hidden severity of one lesion (see the module docstring)."""
    swapped = rng.random() < difficulty
    looks_malignant = malignant != swapped
    return float(rng.beta(6, 2) if looks_malignant else rng.beta(2, 6))


class _Lesion(NamedTuple):
    """Where a lesion lies: its bounding box (rows ys, columns xs) and, inside it, the image
    coordinates Xb, Yb, the soft mask, and rn (0 at the centre, 1 at the border)."""
    ys: slice
    xs: slice
    Xb: np.ndarray
    Yb: np.ndarray
    cx: float
    cy: float
    R: float
    mask: np.ndarray
    rn: np.ndarray


def render(rng: np.random.Generator, size: int, s: float, patient: dict) -> np.ndarray:
    """One dermoscopy-like image (size, size, 3) uint8 for a lesion of severity s.

    The parts below draw from `rng` in a fixed order (skin, shape, colour, opacity, hairs,
    scope): keep it, or the images of every seed change."""
    feat = lambda sd=0.18: float(np.clip(s + rng.normal(0, sd), 0, 1))  # noisy view of s
    a_asym, a_border, a_colour, a_diam, a_struct = feat(), feat(), feat(), feat(), feat()
    img = _skin(rng, size, patient)
    lesion = _lesion_shape(rng, size, a_asym, a_border, a_diam)
    les = _lesion_colour(rng, size, lesion, a_asym, a_colour, a_struct)
    opacity = rng.uniform(0.75, 0.95)
    ys, xs = lesion.ys, lesion.xs
    img[ys, xs] *= 1 + (opacity * lesion.mask)[..., None] * (les / _REF_SKIN - 1)  # pigment absorbs: multiply
    img = _hairs(rng, img, patient)
    img = _scope(rng, img)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _skin(rng: np.random.Generator, S: int, patient: dict) -> np.ndarray:
    """Skin: patient tone, per-image exposure/white balance, illumination, texture, erythema."""
    X, Y = _grid(S)
    skin = (_LIGHT_SKIN * (1 - patient["tone"]) + _DARK_SKIN * patient["tone"]) * (1 + patient["hue"])
    skin = skin * np.float32(rng.lognormal(0, 0.14)) * (1 + rng.normal(0, 0.025, 3).astype(np.float32))
    low, tex, red = _fields(rng, S, 4, 1)[0], _fields(rng, S, max(S // 4, 8), 1)[0], _fields(rng, S, 6, 1)[0]
    shade = 1 + 0.05 * low + 0.025 * tex - 0.10 * (X * X + Y * Y)
    img = skin[None, None, :] * shade[..., None]
    img = _over(img, _RED * skin / _REF_SKIN, 0.12 * _smoothstep(red * 0.7) * rng.random())  # erythema
    return img


def _lesion_shape(rng: np.random.Generator, S: int, a_asym: float, a_border: float, a_diam: float) -> _Lesion:
    """Centre, orientation, elongation, and a radius R(theta) shaped by A (asymmetry),
    B (border) and D (diameter)."""
    X, Y = _grid(S)
    zoom = rng.lognormal(0, 0.2)
    R = (0.24 + 0.24 * a_diam) * zoom
    cx, cy = rng.normal(0, 0.07, 2)
    phi = rng.uniform(0, np.pi)
    elong = 1 + rng.uniform(0.0, 0.35)

    T = 256
    t = np.linspace(-np.pi, np.pi, T, endpoint=False)
    radius = np.ones(T)
    for k in (1, 2, 3):  # A: low harmonics bend the shape off-symmetric
        radius += (0.01 + 0.12 * a_asym) / k * rng.normal() * np.cos(k * t + rng.uniform(0, 6.3))
    ks = np.arange(4, 33)[:, None]  # B: a rough spectrum makes the border ragged
    coef = rng.normal(0, 1, (len(ks), 2)) * ((0.002 + 0.09 * a_border ** 1.5) / ks ** 0.9)
    radius += (coef[:, :1] * np.cos(ks * t) + coef[:, 1:] * np.sin(ks * t)).sum(0)
    for _ in range(rng.poisson(3 * a_border ** 2)):  # B: notches
        d = np.angle(np.exp(1j * (t - rng.uniform(-np.pi, np.pi))))
        radius -= rng.uniform(0.08, 0.25) * np.exp(-0.5 * (d / rng.uniform(0.08, 0.2)) ** 2)
    radius = R * np.clip(radius, 0.35, None)
    edge = (0.05 - 0.035 * a_border) * R + 0.5 / S  # blurry regular border vs. abrupt cut-off

    # Everything lesion-shaped is computed inside the lesion's bounding box only (much cheaper).
    reach = (radius.max() + edge) * elong  # in [-1, 1] image units
    lo = lambda c: max(int(np.floor((c - reach + 1) / 2 * S)) - 1, 0)
    hi = lambda c: min(int(np.ceil((c + reach + 1) / 2 * S)) + 1, S)
    ys, xs = slice(lo(cy), max(hi(cy), lo(cy) + 1)), slice(lo(cx), max(hi(cx), lo(cx) + 1))
    Xb, Yb = X[ys, xs], Y[ys, xs]
    u = ((Xb - cx) * np.cos(phi) + (Yb - cy) * np.sin(phi)) / elong
    v = -(Xb - cx) * np.sin(phi) + (Yb - cy) * np.cos(phi)
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    idx = ((theta + np.pi) * (T / (2 * np.pi))).astype(np.int32) % T
    r_pix = radius.astype(np.float32)[idx]
    mask = _smoothstep((r_pix - rho) / (2 * edge) + 0.5)
    rn = np.clip(rho / r_pix, 0, 1)  # 0 at the centre, 1 at the border
    return _Lesion(ys, xs, Xb, Yb, cx, cy, R, mask, rn)


def _lesion_colour(rng: np.random.Generator, S: int, lesion: _Lesion, a_asym: float, a_colour: float,
                   a_struct: float) -> np.ndarray:
    """The lesion's colour in its bounding box: a brown base with an asymmetric gradient (A),
    a pigment network, colour blotches (C) and dots."""
    ys, xs, Xb, Yb, cx, cy, R, mask, rn = lesion
    base_dark = float(np.clip(rng.normal(0.65 - 0.45 * a_colour, 0.18), 0, 1))
    centre_dark = float(np.clip(base_dark + rng.normal(0.12, 0.12), 0, 1))
    prof = base_dark + (centre_dark - base_dark) * (1 - rn * rn)
    ga = rng.uniform(0, 2 * np.pi)
    prof = prof + 0.35 * a_asym * (np.cos(ga) * (Xb - cx) + np.sin(ga) * (Yb - cy)) / R * mask
    prof = np.clip(prof, 0, 1)[..., None]
    les = _LIGHT_BROWN * (1 - prof) + _DARK_BROWN * prof

    # a pigment network: zero crossings of a fine field; regular for nevi, patchy and thick for
    # melanomas (structure feature)
    fine = _fields(rng, S, max(S // 8, 8), 2)[:, ys, xs]
    patch = _fields(rng, S, 5, 1)[0, ys, xs]
    width = np.maximum(0.3 + 0.3 * a_struct * (1 + 0.8 * patch), 0.05)
    strength = rng.uniform(0.3, 0.6) * (1 - a_struct * 0.7 * _smoothstep(patch + 0.5))
    lines = np.minimum(np.abs(fine[0]), np.abs(fine[1]))  # two sets of contour lines: a mesh
    net = (1 - _smoothstep(lines / width)) * strength * (1 - rn)
    les = _over(les, _DARK_BROWN * 0.7, net)

    # C: extra colours as blotches. Melanomas get more of them, including light ones (red, white
    # regression) that keep their mean colour close to a nevus's.
    blobs = _fields(rng, S, 6, 5)[:, ys, xs]
    palette = (_BLACK, _BLUE_GREY, _RED, _WHITE, _DARK_BROWN)
    p_colour = (0.03 + 0.9 * a_colour ** 1.5) * np.array([0.8, 0.8, 0.7, 0.8, 0.9])
    for i in np.flatnonzero(rng.random(5) < p_colour):
        thr = rng.uniform(0.3, 1.2)
        alpha = _smoothstep((blobs[i] - thr) * 1.5) * rng.uniform(0.5, 0.9) * (1 - 0.5 * rn)
        les = _over(les, palette[i], alpha)
    # dots/globules: sparse peaks of a fine field; central for nevi, peripheral for melanomas
    dots = _smoothstep((fine[0] - 2.0) * 3) * (rn if rng.random() < a_struct else (1 - rn))
    les = _over(les, _BLACK * 1.5, 0.7 * dots)
    return les


def _hairs(rng: np.random.Generator, img: np.ndarray, patient: dict) -> np.ndarray:
    """Dark curves drawn into a mask with Pillow."""
    S = img.shape[0]
    n_hairs = rng.poisson(8 * patient["hairy"] ** 2) if rng.random() < 0.6 else 0
    if n_hairs:
        layer = Image.new("L", (S, S), 0)
        draw = ImageDraw.Draw(layer)
        for _ in range(n_hairs):
            p0, p2 = rng.uniform(-0.2, 1.2, 2) * S, rng.uniform(-0.2, 1.2, 2) * S
            p1 = (p0 + p2) / 2 + rng.normal(0, 0.15, 2) * S
            tt = np.linspace(0, 1, 12)[:, None]
            pts = (1 - tt) ** 2 * p0 + 2 * (1 - tt) * tt * p1 + tt ** 2 * p2
            draw.line([tuple(p) for p in pts], fill=int(rng.uniform(150, 255)),
                      width=max(1, int(round(S / 128 * rng.uniform(0.6, 1.8)))))
        img = _over(img, _HAIR, np.asarray(layer, np.float32) / 255)
    return img


def _scope(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """The dark circle of the dermoscope around a bright field, sometimes outside the frame."""
    X, Y = _grid(img.shape[0])
    vr = rng.uniform(0.9, 1.6)
    vx, vy = rng.normal(0, 0.05, 2)
    d = np.sqrt((X - vx) ** 2 + (Y - vy) ** 2)
    scope = 1 - 0.95 * _smoothstep((d - vr) / 0.08 + 0.5)
    img *= scope[..., None]
    return img


def _render_one(job: tuple) -> bytes:
    """Render image i and return its JPEG bytes. A top-level function so a Pool can run it."""
    seed, i, size, malignant, difficulty, patient, quality = job
    rng = np.random.default_rng([seed, 1, i])
    s = severity(rng, malignant, difficulty)
    img = render(rng, size, s, patient)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def plan(benign: int, malignant: int, seed: int = 0, difficulty: float = DEFAULT_DIFFICULTY,
         images_per_patient: float = 5.0) -> list[dict]:
    """The CSV rows of a synthetic set (dicts keyed by `CSV_COLUMNS`, values as strings) plus
    the private keys ``_index`` (which image draw) and ``_patient`` (skin tone etc.).

    Labels are shuffled and cut into patients of Geometric sizes (mean `images_per_patient`,
    at most 40), so patients hold several images and malignant images spread over many patients.
    """
    check_config(SynthConfig(out="", benign=benign, malignant=malignant, difficulty=difficulty,
                             images_per_patient=images_per_patient))
    rng = np.random.default_rng([seed, 0])
    labels = np.array([0] * benign + [1] * malignant)
    rng.shuffle(labels)
    n = len(labels)
    rows, pid, start = [], 0, 0
    while start < n:
        count = int(min(rng.geometric(1 / max(images_per_patient, 1.0)), 40))
        patient = _patient(seed, pid)
        for i in range(start, min(start + count, n)):
            site = _SITES[int(rng.choice(len(_SITES), p=_SITE_P))]
            mal = int(labels[i])
            diagnosis = "melanoma" if mal else ("nevus" if rng.random() < 0.16 else "unknown")
            rows.append({"image_name": f"ISIC_{i:07d}", "patient_id": f"IP_{pid:07d}",
                         "sex": patient["sex"], "age_approx": str(patient["age"]) if rng.random() > 0.002 else "",
                         "anatom_site_general_challenge": site, "diagnosis": diagnosis,
                         "benign_malignant": "malignant" if mal else "benign", "target": str(mal),
                         "_index": i, "_patient": patient})
        start += count
        pid += 1
    return rows


def latent_severity(rows: list[dict], seed: int, difficulty: float) -> np.ndarray:
    """The hidden severity of each planned row (same draw as the renderer): an oracle score.

    Its ROC AUC against ``target`` is an upper bound for any classifier of these images, because
    an image depends on its label only through its severity.
    """
    out = []
    for r in rows:
        rng = np.random.default_rng([seed, 1, r["_index"]])
        out.append(severity(rng, r["target"] == "1", difficulty))
    return np.array(out)


def render_rows(rows: list[dict], size: int, seed: int, difficulty: float,
                workers: int = 1) -> Iterator[bytes]:
    """Yield the JPEG bytes (size x size) of each row of `plan(..., seed, difficulty)`, in order."""
    jobs = [(seed, r["_index"], size, r["target"] == "1", difficulty, r["_patient"],
             int(np.random.default_rng([seed, 3, r["_index"]]).integers(80, 96))) for r in rows]
    if workers <= 1:
        yield from map(_render_one, jobs)
        return
    with mp.get_context().Pool(workers) as pool:
        yield from pool.imap(_render_one, jobs, chunksize=16)


def generate(cfg: SynthConfig) -> list[dict]:
    """Write a synthetic ISIC-2020-style folder at cfg.out and return its CSV rows.

    Layout: ``train.csv`` (the 8 ISIC columns), ``jpeg/train/<image_name>.jpg`` and
    ``synth.json`` (the config). An `out` that holds anything but an earlier synthetic set is
    refused unless ``cfg.force`` (`melano.outdir.OutputError`), and so is an earlier set.
    The set is written into a temp folder beside `out` and swapped into place when complete,
    so a killed run leaves the old folder or the new one, never a mix of the two.
    """
    check_config(cfg)
    rows = plan(cfg.benign, cfg.malignant, cfg.seed, cfg.difficulty, cfg.images_per_patient)
    log_config(cfg)
    with outdir.claim(cfg.out, "synth", force=cfg.force, staged=True, can_resume=False) as out:
        out.write_json("synth.json", {k: v for k, v in dataclasses.asdict(cfg).items() if k != "force"})
        stream = render_rows(rows, cfg.size, cfg.seed, cfg.difficulty, cfg.workers)
        for r, data in progress(zip(rows, stream), total=len(rows), desc="synth"):
            out.write_bytes(f"jpeg/train/{r['image_name']}.jpg", data)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        out.write_text("train.csv", buf.getvalue())
    n_pat = len({r["patient_id"] for r in rows})
    log.info("wrote %d images (%d malignant) of %d patients to %s", len(rows), cfg.malignant, n_pat, cfg.out)
    return rows


def add_arguments(p) -> None:
    """The `synth` subcommand's options (used by `python -m melano.data synth`)."""
    p.add_argument("--out", required=True, help="output folder (Kaggle layout: train.csv + jpeg/train/)")
    p.add_argument("--benign", type=int, default=900, help="number of benign images (default 900)")
    p.add_argument("--malignant", type=int, default=100, help="number of malignant images (default 100)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed = same bytes (default 0)")
    p.add_argument("--difficulty", type=float, default=DEFAULT_DIFFICULTY,
                   help="probability in [0, 0.5] that a lesion looks like the other class "
                        "(atypical nevi, featureless melanomas); 0.5 makes the classes identical; "
                        f"default {DEFAULT_DIFFICULTY}")
    p.add_argument("--images-per-patient", type=float, default=5.0,
                   help="mean number of images per patient (default 5)")
    p.add_argument("--workers", type=int, default=1,
                   help="render in this many processes (default 1; output is identical)")
    p.add_argument("--force", action="store_true",
                   help="replace what --out holds: an earlier synthetic set, another data set or other "
                        "outputs (files synth did not write are kept aside as <out>.replaced-<time>)")


def run_from_args(args) -> None:
    cfg = SynthConfig(out=args.out, benign=args.benign, malignant=args.malignant, size=args.size,
                      seed=args.seed, difficulty=args.difficulty,
                      images_per_patient=args.images_per_patient, workers=args.workers, force=args.force)
    generate(cfg)
