"""Synthetic dermoscopy: the built-in data set, in the ISIC 2020 Kaggle layout.

No real ISIC images exist on the machines melano is developed on, so this writes ``train.csv``
(the 8 ISIC columns) and ``jpeg/train/<image_name>.jpg``, which `melano.data` reads exactly like
the real thing, and beside them ``synth_criteria.csv``: the hidden truth of every image.

Everything is drawn before a pixel is painted, so the truth is cheap to recompute: the lesion
(melano.lesions: severity, phenotype, the 7-point criteria with intensity and place, Stolz's
colours and structures, diameter, contour), the patient (Fitzpatrick skin type, hairiness) and
the acquisition (hairs, bubbles, rulers, ink, glare, the scope's corners, JPEG quality, defocus,
noise, by clinic; independent of the label unless `artefact_bias`). Colour comes from chromophores
(`_K_MELANIN` and the rest). Each pattern and criterion paints from a random stream of its own,
so a lesion with one criterion more or less differs only by that criterion (tests use this).
Calibration: ``bench/bench_data.py --calibrate``.

Image i draws from ``default_rng([seed, 1, i])`` (lesion and paint) and ``[seed, 5, i]``
(acquisition), patient p from ``[seed, 2, p]``: the same arguments give the same bytes (with the
same Pillow and libjpeg), whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import logging
import math
import multiprocessing as mp
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from melano import lesions
from .infra import outdir
from .infra.cli import log_config, progress
from .infra.options import option

log = logging.getLogger("melano.synth")

DEFAULT_DIFFICULTY = 0.04  # calibrated: bench/bench_data.py --calibrate
CSV_COLUMNS = ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
               "diagnosis", "benign_malignant", "target"]
CRITERIA_CSV = "synth_criteria.csv"  # the hidden truth, beside train.csv
ARTEFACTS = ("hair", "bubbles", "ruler", "ink", "glare", "corners")

# Anatomic sites and their ISIC 2020 frequencies (the 527 missing values become "").
_SITES = ["torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", "oral/genital", ""]
_SITE_P = np.array([16845, 8417, 4983, 1855, 375, 124, 527], np.float64)
_SITE_P /= _SITE_P.sum()

# Colour from chromophores: reflectance = skin * exp(-sum(amount * absorbance)), per RGB channel,
# under a whitish haze (_HAZE) for veil and regression.
# Epidermal melanin absorbs blue most (light brown to black); dermal melanin, seen through the
# epidermis, is blue-grey (Tyndall scattering: red absorbed most); haemoglobin absorbs green.
_BASE_SKIN = np.array([0.97, 0.86, 0.80], np.float32)
_K_MELANIN = np.array([0.9, 1.35, 1.8], np.float32)
_K_DERMAL = np.array([1.45, 1.05, 0.55], np.float32)
_K_BLOOD = np.array([0.25, 1.5, 1.1], np.float32)
_HAZE = np.array([0.86, 0.91, 0.98], np.float32)  # the whitish scatter of veil and regression scars
# Fitzpatrick types I-VI: epidermal melanin of the skin, and their shares (mostly light, as in ISIC)
_FITZPATRICK_MELANIN = np.array([0.05, 0.15, 0.3, 0.6, 1.0, 1.6], np.float32)
_FITZPATRICK_P = np.array([0.22, 0.38, 0.25, 0.09, 0.04, 0.02])
_HAIR_COLOURS = np.array([[0.10, 0.07, 0.06], [0.22, 0.15, 0.10], [0.45, 0.40, 0.38], [0.70, 0.58, 0.40]],
                         np.float32)
_INK = np.array([0.45, 0.25, 0.60], np.float32)  # gentian-violet marker
# Two acquisition centres (clinics): white balance, how often the scope's black corners show, JPEG
# quality, the rates of bubbles, rulers, ink and glare, and the patients' skin types. Centre 1 is
# the out-of-distribution test clinic: a warmer scope, heavier compression and a darker skin mix.
_CENTRES = ({"gain": (1.0, 1.0, 1.0), "corners": 0.25, "jpeg": (82, 96), "bubbles": 0.15, "ruler": 0.06,
             "ink": 0.05, "glare": 0.20, "hair": 0.45, "fitzpatrick_p": _FITZPATRICK_P},
            {"gain": (1.06, 0.98, 0.88), "corners": 0.60, "jpeg": (60, 80), "bubbles": 0.35, "ruler": 0.15,
             "ink": 0.02, "glare": 0.05, "hair": 0.45, "fitzpatrick_p": np.array([0.06, 0.16, 0.26, 0.24, 0.16, 0.12])})
# A centre's images, lesions and patients are its own: their names and random draws are offset by these
_CENTRE_IMAGES, _CENTRE_PATIENTS = 5_000_000, 500_000


@dataclasses.dataclass
class SynthConfig:  # the flags of `python -m melano.data synth`
    out: str = option(help="output folder (Kaggle layout: train.csv + jpeg/train/)")
    benign: int = option(900, "number of benign images")
    malignant: int = option(100, "number of malignant images")
    size: int = option(128, "image side in pixels")
    seed: int = option(0, "random seed; same seed = same bytes")
    difficulty: float = option(DEFAULT_DIFFICULTY, "probability in [0, 0.5] that a lesion looks like the other "
                               "class (atypical nevi, featureless melanomas); 0.5 makes the classes identical")
    images_per_patient: float = option(5.0, "mean number of images per patient (ISIC 2020 has ~16; a small "
                                       "set needs more patients)")
    centre: int = option(0, "acquisition centre, 0 or 1 (a second clinic: its own patients and images, another "
                         "skin-type mix, white balance, scope, JPEG quality and artefact rates; the same lesions "
                         "and label rates)")
    artefact_bias: float = option(0.0, "in [0, 1]: rulers and ink marks come (1 + bias) times as often with "
                                  "melanomas and (1 - bias) times with nevi, for spurious-correlation "
                                  "experiments (0: artefacts independent of the label)")
    workers: int = option(1, "render in this many processes (the output is identical)")
    force: bool = option(False, "replace what --out holds: an earlier synthetic set, another data set or other "
                         "outputs (files synth did not write are kept aside as <out>.replaced-<time>)")


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
    if cfg.centre not in (0, 1):
        raise ValueError(f"--centre must be 0 or 1 (two acquisition centres), got {cfg.centre}")
    if not 0 <= cfg.artefact_bias <= 1:
        raise ValueError(f"--artefact-bias must be in [0, 1] (0: artefacts independent of the label), "
                         f"got {cfg.artefact_bias}")
    if cfg.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {cfg.workers}")


# Smooth random fields: white noise on a coarse k x k grid, upsampled bicubically by Pillow: far
# cheaper than filtering a full-size image, and single-threaded (a multi-threaded BLAS spins on a busy machine).

def _field(rng: np.random.Generator, size: int, k: int) -> np.ndarray:
    """A smooth field (size, size), about unit variance and k bumps per side. A coarse one is drawn
    on a 2k grid and smoothed there first: white noise upsampled directly shows square blocks."""
    if 8 * k > size:  # bumps of a few pixels: no block to see
        g = rng.standard_normal((k, k), dtype=np.float32)
    else:
        b = _binomial(2 * k)
        g = b @ rng.standard_normal((2 * k, 2 * k), dtype=np.float32) @ b.T
    return np.asarray(Image.fromarray(g, "F").resize((size, size), Image.Resampling.BICUBIC))


@functools.lru_cache(maxsize=64)
def _binomial(m: int) -> np.ndarray:
    """The (m, m) circulant [1, 4, 6, 4, 1] / 16 smoothing, scaled to keep white noise's variance."""
    b = np.zeros((m, m), np.float32)
    for d, w in zip((-2, -1, 0, 1, 2), (1, 4, 6, 4, 1)):
        b[np.arange(m), (np.arange(m) + d) % m] += w / 16
    return b / np.float32(np.sqrt(70 / 256))


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


# Patients, lesions and acquisitions: all drawn before any pixel, so the truth is known cheaply

def _patient(seed: int, pid: int, centre: int = 0) -> dict:
    """Per-patient attributes: skin type (Fitzpatrick I-VI, the centre's mix) and blood, hairiness, sex, age."""
    rng = np.random.default_rng([seed, 2, pid])
    ftype = int(rng.choice(6, p=_CENTRES[centre]["fitzpatrick_p"]))
    melanin = float(_FITZPATRICK_MELANIN[ftype] * rng.lognormal(0, 0.15))
    sex = ["male", "female", ""][int(rng.choice(3, p=[0.515, 0.483, 0.002]))]
    age = int(np.clip(np.round(rng.normal(49, 14.4) / 5) * 5, 0, 90))
    return {"fitzpatrick": ftype + 1, "melanin": melanin, "blood": float(rng.uniform(0.03, 0.2)),
            "hairy": float(rng.beta(1.2, 2.5)), "sex": sex, "age": age}


severity = lesions.severity  # the hidden severity of one lesion


def lesion_of(seed: int, index: int, malignant: bool, difficulty: float) -> tuple[np.random.Generator, lesions.Lesion]:
    """Image `index`'s lesion, and the generator its rendering continues with."""
    rng = np.random.default_rng([seed, 1, index])
    return rng, lesions.draw(rng, lesions.severity(rng, malignant, difficulty), malignant)


def acquisition(seed: int, index: int, malignant: bool, centre: int, bias: float) -> dict:
    """Which artefacts image `index` shows, its JPEG quality and optics: independent of the label
    unless `bias` > 0 (then rulers and ink marks come more often with melanomas)."""
    rng = np.random.default_rng([seed, 5, index])
    c = _CENTRES[centre]
    tilt = 1 + bias * (1 if malignant else -1)
    p = {a: min(1.0, c[a] * tilt) if a in ("ruler", "ink") else c[a] for a in ARTEFACTS}
    found = {a: bool(rng.random() < p[a]) for a in ARTEFACTS}
    return {**found, "jpeg": int(rng.integers(*c["jpeg"])), "blur": float(rng.uniform(0, 1.5)),
            "noise": float(rng.uniform(0.008, 0.025)), "falloff": float(rng.uniform(0.05, 0.3)),
            "exposure": float(rng.lognormal(0, 0.08)), "gain": np.array(c["gain"], np.float32),
            "fov_mm": float(rng.uniform(14, 20))}


# Rendering: skin, the lesion's pigment maps, colour, then what the dermoscope adds

class _Geometry(NamedTuple):
    """The lesion's bounding box (rows ys, columns xs) and, inside it: image coordinates X, Y
    (in [-1, 1]), the soft mask, rn (0 at the centre, 1 at the border), the angle, and the
    centre and mean radius in image units."""
    ys: slice
    xs: slice
    X: np.ndarray
    Y: np.ndarray
    mask: np.ndarray
    rn: np.ndarray
    theta: np.ndarray
    cx: float
    cy: float
    R: float


def render(rng: np.random.Generator, size: int, les: lesions.Lesion, patient: dict, acq: dict,
           show_lesion: bool = True) -> np.ndarray:
    """One dermoscopy image (size, size, 3) uint8 of lesion `les`. The parts draw from `rng` in a
    fixed order: keep it, or every seed's images change. `show_lesion=False` leaves skin where the
    lesion would be (a control: what skin and artefacts alone tell a classifier)."""
    img, skin_tex = _skin(rng, size, patient)
    geo = _shape(rng, size, les, acq)
    if show_lesion:
        E, D, H, W = _pigment(rng, size, les, geo)
        absorb = E[..., None] * _K_MELANIN + D[..., None] * _K_DERMAL + H[..., None] * _K_BLOOD
        img[geo.ys, geo.xs] *= np.exp(-absorb)
        if W.any():  # veil, regression, milia
            img[geo.ys, geo.xs] = _over(img[geo.ys, geo.xs], _HAZE, W)
    img *= skin_tex[..., None]
    img = _artefacts(rng, img, geo, patient, acq)
    return _optics(rng, img, acq)


def _skin(rng: np.random.Generator, S: int, patient: dict) -> tuple[np.ndarray, np.ndarray]:
    """Skin colour from its melanin and blood, with erythema patches; and its texture (furrows,
    pores, fine grain) as a multiplier: one of `_skin_textures`."""
    blood = patient["blood"] * (1 + 0.4 * np.maximum(_field(rng, S, 5), 0))
    img = _BASE_SKIN * np.exp(-(patient["melanin"] * _K_MELANIN + blood[..., None] * _K_BLOOD))
    bank = _skin_textures(S)
    return img.astype(np.float32), bank[int(rng.integers(len(bank)))]


@functools.lru_cache(maxsize=4)
def _skin_textures(S: int, n: int = 24) -> np.ndarray:
    """n skin textures (furrow mesh, pores, grain) of side S from a fixed seed, the same in every
    worker; at fixed fractions of the field of view, so the skin looks the same at any size."""
    rng = np.random.default_rng([20261206, S])
    out = []
    for _ in range(n):
        furrows = _cells(rng, S, max(4, min(S // 6, 28)), jitter=0.9)
        pores = _smoothstep((_field(rng, S, min(S // 2, 160)) - 2.2) * 2) * min(1, S / 320)
        grain = _field(rng, S, min(S // 2, 384)) * min(1, S / 768)  # finer than a pixel: averaged
        mottle = _field(rng, S, max(4, min(S // 16, 64)))
        out.append(1 - 0.12 * (1 - _smoothstep(furrows / 0.08)) - 0.15 * pores + 0.13 * grain + 0.04 * mottle)
    return np.stack(out).astype(np.float32)


def _cells(rng: np.random.Generator, S: int, k: int, jitter: float) -> np.ndarray:
    """Worley's cellular pattern over the image: F2 - F1, the distance from each pixel to the
    nearest border between k x k jittered cells (0 on the border), in cell units. Periodic, so a
    shifted copy has no seam."""
    X, Y = _grid(S)
    u, v = (X + 1) * np.float32(k / 2), (Y + 1) * np.float32(k / 2)
    iu, iv = np.floor(u).astype(np.int32), np.floor(v).astype(np.int32)
    fu, fv = u - iu, v - iv
    pu, pv = rng.uniform(0.5 - jitter / 2, 0.5 + jitter / 2, (2, k * k)).astype(np.float32)
    f1, f2 = np.full((2, *u.shape), np.inf, np.float32)  # the nearest and second-nearest squared distance
    for dv in (-1, 0, 1):
        for du in (-1, 0, 1):
            c = ((iv + dv) % k) * k + (iu + du) % k
            d = (fu - (du + pu[c])) ** 2 + (fv - (dv + pv[c])) ** 2
            f2 = np.minimum(f2, np.maximum(f1, d))
            f1 = np.minimum(f1, d)
    return np.sqrt(f2) - np.sqrt(f1)


@functools.lru_cache(maxsize=16)
def _cell_bank(S: int, k: int, jitter: float, n: int = 6) -> np.ndarray:
    """n periodic cellular patterns of side S, from a fixed seed: the same in every worker."""
    rng = np.random.default_rng([20261206, S, k, int(jitter * 100)])
    return np.stack([_cells(rng, S, k, jitter) for _ in range(n)])


def _pattern(rng: np.random.Generator, S: int, k: int, jitter: float, ys: slice, xs: slice) -> np.ndarray:
    """A cellular pattern (`_cells`) over the rows ys and columns xs: one of the bank's, shifted."""
    bank = _cell_bank(S, k, jitter)
    oy, ox = rng.integers(0, S, 2)
    return bank[int(rng.integers(len(bank)))][np.ix_((np.arange(ys.start, ys.stop) + oy) % S,
                                                     (np.arange(xs.start, xs.stop) + ox) % S)]


def _shape(rng: np.random.Generator, S: int, les: lesions.Lesion, acq: dict) -> _Geometry:
    """Outline: an ellipse, bent by low harmonics only when the contour is asymmetric; a moth-eaten
    border for lentigines; a sharp edge on the eighths of the border with an abrupt cut-off."""
    X, Y = _grid(S)
    R = float(np.clip(les.diameter_mm / acq["fov_mm"], 0.12, 0.8))  # radius in [-1, 1] units
    cx, cy = rng.normal(0, 0.06, 2)
    phi, elong = rng.uniform(0, np.pi), 1 + rng.uniform(0, 0.3)
    T = 256
    t = np.linspace(-np.pi, np.pi, T, endpoint=False)
    radius = np.ones(T)
    bend = 0.10 if les.contour_asymmetric else 0.015
    for k in (1, 2, 3):
        radius += bend / k * rng.normal() * np.cos(k * t + rng.uniform(0, 6.3))
    ks = np.arange(4, 25)[:, None]
    ragged = 0.05 if les.phenotype == "solar_lentigo" else 0.012
    coef = rng.normal(0, ragged, (len(ks), 2)) / ks ** 0.8
    radius += (coef[:, :1] * np.cos(ks * t) + coef[:, 1:] * np.sin(ks * t)).sum(0)
    radius = R * np.clip(radius, 0.5, None)
    abrupt = np.zeros(8, bool)
    abrupt[rng.permutation(8)[:les.border_abrupt]] = True
    sharp = les.phenotype == "seborrhoeic_keratosis"
    edge8 = np.where(abrupt | sharp, 0.015, rng.uniform(0.08, 0.16)) * R + 0.6 / S
    reach = (radius.max() * 1.25 + edge8.max()) * elong  # streaks reach past the border
    lo = lambda c: max(int(np.floor((c - reach + 1) / 2 * S)) - 1, 0)
    hi = lambda c: min(int(np.ceil((c + reach + 1) / 2 * S)) + 1, S)
    ys, xs = slice(lo(cy), max(hi(cy), lo(cy) + 1)), slice(lo(cx), max(hi(cx), lo(cx) + 1))
    Xb, Yb = X[ys, xs], Y[ys, xs]
    u = ((Xb - cx) * np.cos(phi) + (Yb - cy) * np.sin(phi)) / elong
    v = -(Xb - cx) * np.sin(phi) + (Yb - cy) * np.cos(phi)
    rho, theta = np.sqrt(u * u + v * v), np.arctan2(v, u)
    idx = ((theta + np.pi) * (T / (2 * np.pi))).astype(np.int32) % T
    r_pix = radius.astype(np.float32)[idx]
    edge = edge8.astype(np.float32)[idx * 8 // T]
    mask = _smoothstep((r_pix - rho) / (2 * edge) + 0.5)
    return _Geometry(ys, xs, Xb, Yb, mask, np.clip(rho / r_pix, 0, 1.5), theta, cx, cy, R)


def _region(rng: np.random.Generator, geo: _Geometry, place: lesions.Place, k: int = 6) -> np.ndarray:
    """A soft, irregular area of the lesion around `place` (weights in [0, 1])."""
    px = geo.cx + place.offset * geo.R * math.cos(place.angle)
    py = geo.cy + place.offset * geo.R * math.sin(place.angle)
    d2 = ((geo.X - px) ** 2 + (geo.Y - py) ** 2) / (place.spread * geo.R) ** 2
    h, w = geo.X.shape
    noise = _field(rng, max(h, w), k)[:h, :w]
    area = _smoothstep(1.1 - 0.6 * d2 + 0.8 * noise) * geo.mask
    return area / max(float(area.max()), 0.5) if area.max() < 1 else area  # a core wherever it sits


def _dots(rng: np.random.Generator, where: np.ndarray, n: int, radius: float, size_sd: float = 0.3) -> np.ndarray:
    """n round dots with volume (a soft, dome-shaped profile), placed with density `where`."""
    h, w = where.shape
    out = np.zeros(where.shape, np.float32)
    p = where.ravel().astype(np.float64)
    if n == 0 or p.sum() <= 0:
        return out
    picks = rng.choice(p.size, n, p=p / p.sum())
    yy, xx = np.divmod(picks, w)
    radii = np.maximum(radius * rng.lognormal(0, size_sd, n), 0.7)
    for y, x, r in zip(yy, xx, radii):
        k = int(math.ceil(r * 1.6))
        y0, y1, x0, x1 = max(y - k, 0), min(y + k + 1, h), max(x - k, 0), min(x + k + 1, w)
        gy, gx = np.ogrid[y0 - y:y1 - y, x0 - x:x1 - x]
        dome = np.clip(1 - (gy * gy + gx * gx) / (r * r), 0, None) ** 0.7
        out[y0:y1, x0:x1] = np.maximum(out[y0:y1, x0:x1], dome)
    return out


# The pattern of each phenotype and each criterion draws from a stream of its own, so that a
# lesion rendered with one criterion more or less differs only by that criterion (tests use this).
_PATTERNS = ("network", "globular_nevus", "seborrhoeic_keratosis", "inflamed", *lesions.SEVEN_POINT)


def _pigment(rng: np.random.Generator, S: int, les: lesions.Lesion, geo: _Geometry):
    """The lesion's chromophore maps in its bounding box: epidermal melanin E, dermal melanin D,
    blood H, and whitish haze W. The phenotype sets the pattern; then `_criteria`."""
    g = dict(zip(_PATTERNS, rng.spawn(len(_PATTERNS))))
    m, rn, c, ph = geo.mask, geo.rn, les.criteria, les.phenotype
    px = geo.R * S / 2  # the radius in pixels
    base = (0.4 + 0.8 * les.base_dark) * (0.75 + 0.25 * np.clip(1 - rn * rn, 0, 1))
    E = base * m * (0.45 if ph == "solar_lentigo" else 1.0)
    D = les.dermal * 1.1 * m
    H = np.zeros_like(m)
    W = np.zeros_like(m)
    cell_k = 15 if S >= 96 else max(3, S // 7)  # a network hole is ~1/30 of the field of view, >= 3.5 px
    if les.structures["network"]:  # typical: thin, regular, fading towards the border
        lines = 1 - _smoothstep(_pattern(g["network"], S, cell_k * 2, 0.5, geo.ys, geo.xs) / 0.18)
        E = E + 0.55 * lines * m * np.clip(1.2 - rn, 0, 1) * (0.8 + 0.4 * les.base_dark)
    if ph == "globular_nevus":  # regular brown globules over the whole lesion
        r = g[ph]
        E = E + 1.1 * _dots(r, m * (rn < 0.85), int(r.integers(12, 30)), max(px / 9, 1.0), 0.15)
    if ph == "seborrhoeic_keratosis":  # milia-like cysts (white) and comedo-like openings (dark plugs)
        r = g[ph]
        W = np.maximum(W, 0.75 * _dots(r, m, int(r.integers(4, 12)), max(px / 14, 0.8)))
        E = E + 1.4 * _dots(r, m, int(r.integers(3, 10)), max(px / 12, 0.8))
        E = E + 0.3 * (1 - _smoothstep(_pattern(r, S, cell_k, 0.9, geo.ys, geo.xs) / 0.3)) * m
    if les.colours["red"] and "atypical_vessels" not in c:  # an inflamed lesion: diffuse redness
        r = g["inflamed"]
        H = H + r.uniform(0.15, 0.35) * _region(r, geo, lesions.Place(r.uniform(0, 6.3), 0.2, 0.7))
    E, D, H, W = _criteria(g, S, les, geo, cell_k, E, D, H, W)
    return E, D, H, W * m


def _criteria(g: dict, S: int, les: lesions.Lesion, geo: _Geometry, cell_k: int, E, D, H, W):
    """Each criterion's structure added to the maps, at its own place, from its own stream in `g`."""
    h, w = geo.mask.shape
    rn, c = geo.rn, les.criteria
    px = geo.R * S / 2  # the radius in pixels
    if "atypical_network" in c:  # broken, thick, dark, irregular cells, where it sits
        r, i = g["atypical_network"], c["atypical_network"]
        area = _region(r, geo, les.places["atypical_network"])
        f = _pattern(r, S, max(3, cell_k), 1.0, geo.ys, geo.xs) / r.uniform(0.8, 1.2)  # larger, uneven holes
        broken = _smoothstep(_field(r, S, 9)[geo.ys, geo.xs] * 2 + 1.0)
        E = E + (1.2 + 1.0 * i) * (1 - _smoothstep(f / (0.35 + 0.3 * i))) * np.minimum(area * 1.5, 1) * broken
    if "irregular_blotches" in c:  # structureless black or dark brown, off-centre
        r, i = g["irregular_blotches"], c["irregular_blotches"]
        E = E + (1.2 + 1.6 * i) * _smoothstep(_region(r, geo, les.places["irregular_blotches"]) * 2.2 - 0.4)
    if "blue_white_veil" in c:  # confluent blue-grey (dermal melanin) under a whitish haze
        r, i = g["blue_white_veil"], c["blue_white_veil"]
        area = _smoothstep(_region(r, geo, les.places["blue_white_veil"]) * 2.2 - 0.2)
        mottle = 0.8 + 0.4 * _field(r, max(h, w), max(4, int(px / 4)))[:h, :w]
        D = D + (1.0 + 0.8 * i) * area * mottle
        E = E * (1 - 0.95 * area)
        W = np.maximum(W, (0.08 + 0.5 * max(i - 0.55, 0)) * area)  # whitish only when strong (lesions.py)
    if "regression" in c:  # white scar-like depigmentation with blue-grey peppering
        r, i = g["regression"], c["regression"]
        area = _smoothstep(_region(r, geo, les.places["regression"]) * 1.6 - 0.4)
        W = np.maximum(W, (0.35 + 0.3 * i) * area)
        E = E * (1 - 0.9 * area)
        D = D + 0.9 * _dots(r, area, int(10 + 30 * i), max(px / 30, 0.6), 0.2)
    if "irregular_dots" in c:  # black dots and brown globules of mixed sizes, off-centre or peripheral
        r, i = g["irregular_dots"], c["irregular_dots"]
        area = _region(r, geo, les.places["irregular_dots"]) * (0.3 + rn)
        E = E + (2.0 + 1.2 * i) * _dots(r, area, int(6 + 14 * i), max(px / 7, 1.2), 0.4)
    if "irregular_streaks" in c:  # pseudopods and radial streaming in one sector, past the border
        E = E + _streaks(g["irregular_streaks"], geo, les.places["irregular_streaks"], c["irregular_streaks"], S)
    if "atypical_vessels" in c:  # red dotted and irregular linear vessels
        r, i = g["atypical_vessels"], c["atypical_vessels"]
        area = _region(r, geo, les.places["atypical_vessels"])
        H = H + (2.0 + 1.0 * i) * _dots(r, area, int(8 + 20 * i), max(px / 18, 0.9), 0.25)
        H = H + (1.6 + 0.8 * i) * (1 - _smoothstep(_pattern(r, S, cell_k, 1.0, geo.ys, geo.xs) / 0.15)) * area
        E = E * (1 - 0.85 * area)  # vessels show where the pigment thins
    return E, D, H, W


def _streaks(rng: np.random.Generator, geo: _Geometry, place: lesions.Place, i: float, S: int) -> np.ndarray:
    """Radial dark lines bulging past the border within one sector around `place.angle`."""
    width = rng.uniform(0.5, 1.2)
    d = np.angle(np.exp(1j * (geo.theta - place.angle)))
    sector = np.exp(-0.5 * (d / width) ** 2)
    n = int(rng.integers(5, 12))
    bin64 = ((geo.theta + np.pi) * (63 / (2 * np.pi))).astype(np.int32)  # the angle in 64 steps
    wobble = rng.normal(0, 0.15, 64).cumsum()[bin64]
    comb = np.cos(geo.theta * n * 2 * np.pi / width + wobble + rng.uniform(0, 6.3))
    reach = 1.05 + 0.2 * rng.random(64)[bin64]
    radial = _smoothstep((geo.rn - 0.75) / 0.15) * (1 - _smoothstep((geo.rn - reach) / 0.06))
    return (0.9 + 0.9 * i) * sector * radial * _smoothstep(comb * 2.5 - 1.0)


def _artefacts(rng: np.random.Generator, img: np.ndarray, geo: _Geometry, patient: dict, acq: dict) -> np.ndarray:
    """What the dermoscope and the clinic add: hairs, gel bubbles, ruler marks, ink, glare."""
    S = img.shape[0]
    X, Y = _grid(S)
    if acq["hair"]:
        img = _hairs(rng, img, patient)
    if acq["bubbles"]:
        for _ in range(int(rng.integers(1, 5))):
            bx, by, br = rng.uniform(-0.9, 0.9), rng.uniform(-0.9, 0.9), rng.uniform(0.03, 0.15)
            d = np.sqrt((X - bx) ** 2 + (Y - by) ** 2) / br
            ring = np.exp(-((d - 1) / 0.06) ** 2)
            img = img * (1 - 0.15 * ring[..., None]) + 0.35 * np.exp(-((d - 0.8) / 0.05) ** 2)[..., None]
    if acq["ruler"]:
        layer = Image.new("L", (S, S), 0)
        draw, y0 = ImageDraw.Draw(layer), int(S * rng.uniform(0.86, 0.96))
        for j, x in enumerate(np.arange(rng.uniform(0, S / 24), S, S / 24)):
            draw.line([(x, y0), (x, y0 - S * (0.06 if j % 5 == 0 else 0.03))], fill=230, width=max(1, S // 200))
        img = _over(img, np.array([0.1, 0.1, 0.1], np.float32), np.asarray(layer, np.float32) / 255)
    if acq["ink"]:
        a = rng.uniform(0, 2 * np.pi)
        ix, iy, ir = geo.cx + 1.3 * geo.R * math.cos(a), geo.cy + 1.3 * geo.R * math.sin(a), rng.uniform(0.02, 0.05)
        img = _over(img, _INK, 0.8 * _smoothstep(1.5 - np.sqrt((X - ix) ** 2 + (Y - iy) ** 2) / ir))
    if acq["glare"]:
        for _ in range(int(rng.integers(1, 4))):
            gx, gy, gr = rng.uniform(-0.7, 0.7), rng.uniform(-0.7, 0.7), rng.uniform(0.01, 0.04)
            img = _over(img, np.ones(3, np.float32), 0.9 * np.exp(-((X - gx) ** 2 + (Y - gy) ** 2) / gr ** 2))
    return img


def _hairs(rng: np.random.Generator, img: np.ndarray, patient: dict) -> np.ndarray:
    """Curved hairs of varying thickness and colour, drawn at twice the size and reduced: anti-aliased."""
    S = img.shape[0]
    n = 1 + rng.poisson(10 * patient["hairy"] ** 2)
    layer = Image.new("L", (2 * S, 2 * S), 0)
    draw = ImageDraw.Draw(layer)
    colour = _HAIR_COLOURS[int(rng.choice(4, p=[0.45, 0.35, 0.1, 0.1]))]
    for _ in range(n):
        p0, p2 = rng.uniform(-0.2, 1.2, 2) * 2 * S, rng.uniform(-0.2, 1.2, 2) * 2 * S
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.15, 2) * 2 * S
        tt = np.linspace(0, 1, 16)[:, None]
        pts = (1 - tt) ** 2 * p0 + 2 * (1 - tt) * tt * p1 + tt ** 2 * p2
        draw.line([tuple(p) for p in pts], fill=int(rng.uniform(170, 255)),
                  width=max(1, int(round(2 * S / 160 * rng.uniform(0.5, 2.0)))))
    alpha = np.asarray(layer.resize((S, S), Image.Resampling.BOX), np.float32) / 255
    return _over(img, colour, alpha)


def _optics(rng: np.random.Generator, img: np.ndarray, acq: dict) -> np.ndarray:
    """Illumination fall-off, the scope's black corners, white balance, defocus, sensor noise."""
    S = img.shape[0]
    X, Y = _grid(S)
    r2 = X * X + Y * Y  # the squared distance from the centre, in [-1, 1] units
    light = (1 - np.float32(acq["falloff"]) * r2) * np.float32(acq["exposure"])
    if acq["corners"]:
        light *= 1 - 0.97 * _smoothstep((np.sqrt(r2) - np.float32(rng.uniform(1.0, 1.3))) / 0.05 + 0.5)
    img *= light[..., None]
    img *= acq["gain"] * 255
    out = Image.fromarray((np.clip(img, 0, 255) + 0.5).astype(np.uint8))
    # defocus and sensor noise are the camera's, at its ~1024 px: smaller images average them away
    if acq["blur"] * S / 1024 > 0.3:
        out = out.filter(ImageFilter.GaussianBlur(acq["blur"] * S / 1024))
    grain = np.roll(_noise_bank(S)[int(rng.integers(4))], int(rng.integers(S * S)))  # sensor noise
    noisy = np.asarray(out, np.float32) + grain * np.float32(acq["noise"] * 255 * max(S / 1024, 0.1))
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _noise_bank(S: int) -> np.ndarray:
    """Four fields of unit Gaussian noise (S, S, 3) from a fixed seed; a shifted one is each image's."""
    return np.random.default_rng([20261206, 3, S]).standard_normal((4, S, S, 3), np.float32)


def _render_one(job: tuple) -> bytes:
    """Render image i and return its JPEG bytes. A top-level function so a Pool can run it."""
    seed, i, size, malignant, difficulty, patient, centre, bias, show_lesion = job
    rng, les = lesion_of(seed, i, malignant, difficulty)
    acq = acquisition(seed, i, malignant, centre, bias)
    buf = io.BytesIO()
    Image.fromarray(render(rng, size, les, patient, acq, show_lesion)).save(buf, "JPEG", quality=acq["jpeg"])
    return buf.getvalue()


def plan(benign: int, malignant: int, seed: int = 0, difficulty: float = DEFAULT_DIFFICULTY,
         images_per_patient: float = 5.0, centre: int = 0) -> list[dict]:
    """The CSV rows of a synthetic set (`CSV_COLUMNS`, as strings) plus ``_index`` (which image
    draw) and ``_patient``. Shuffled labels are cut into patients of Geometric sizes (mean
    `images_per_patient`, at most 40), so melanomas spread over many patients. Each centre has its
    own images, lesions and patients (their names and draws are offset), with the same label rates."""
    check_config(SynthConfig(out="", benign=benign, malignant=malignant, difficulty=difficulty,
                             images_per_patient=images_per_patient, centre=centre))
    rng = np.random.default_rng([seed, 0])
    labels = np.array([0] * benign + [1] * malignant)
    rng.shuffle(labels)
    n = len(labels)
    rows, pid, start = [], 0, 0
    while start < n:
        count = int(min(rng.geometric(1 / max(images_per_patient, 1.0)), 40))
        patient = _patient(seed, pid, centre)
        for i in range(start, min(start + count, n)):
            site = _SITES[int(rng.choice(len(_SITES), p=_SITE_P))]
            mal = int(labels[i])
            diagnosis = "melanoma" if mal else ("nevus" if rng.random() < 0.16 else "unknown")
            index, person = i + centre * _CENTRE_IMAGES, pid + centre * _CENTRE_PATIENTS
            rows.append({"image_name": f"ISIC_{index:07d}", "patient_id": f"IP_{person:07d}",
                         "sex": patient["sex"], "age_approx": str(patient["age"]) if rng.random() > 0.002 else "",
                         "anatom_site_general_challenge": site, "diagnosis": diagnosis,
                         "benign_malignant": "malignant" if mal else "benign", "target": str(mal),
                         "_index": index, "_patient": patient})
        start += count
        pid += 1
    return rows


def latent_severity(rows: list[dict], seed: int, difficulty: float) -> np.ndarray:
    """The hidden severity of each planned row: an oracle score, whose ROC AUC bounds any
    classifier's, since an image depends on its label only through its severity."""
    return np.array([lesion_of(seed, r["_index"], r["target"] == "1", difficulty)[1].s for r in rows])


def truth(rows: list[dict], seed: int, difficulty: float, centre: int = 0, bias: float = 0.0) -> list[dict]:
    """The hidden truth of each planned row, as `CRITERIA_CSV` writes it: the lesion's severity,
    phenotype and criteria (melano.lesions.truth_row), and the artefacts its image shows."""
    out = []
    for r in rows:
        mal = r["target"] == "1"
        _, les = lesion_of(seed, r["_index"], mal, difficulty)
        acq = acquisition(seed, r["_index"], mal, centre, bias)
        out.append({"image_name": r["image_name"], **lesions.truth_row(les),
                    "fitzpatrick": str(r["_patient"]["fitzpatrick"]), "centre": str(centre),
                    **{f"artefact_{a}": str(int(acq[a])) for a in ARTEFACTS}})
    return out


def lesion_mask(row: dict, size: int, seed: int, difficulty: float = DEFAULT_DIFFICULTY, centre: int = 0,
                bias: float = 0.0) -> np.ndarray:
    """(size, size) float32 in [0, 1]: the soft outline of a planned row's lesion, as `render` draws
    it (the same draws up to the outline; streaks may reach past it). For saliency checks."""
    rng, les = lesion_of(seed, row["_index"], row["target"] == "1", difficulty)
    acq = acquisition(seed, row["_index"], row["target"] == "1", centre, bias)
    _skin(rng, size, row["_patient"])  # the draws render makes before the outline
    geo = _shape(rng, size, les, acq)
    mask = np.zeros((size, size), np.float32)
    mask[geo.ys, geo.xs] = geo.mask
    return mask


TRUTH_COLUMNS = ["image_name", *lesions.TRUTH_COLUMNS, "fitzpatrick", "centre", *(f"artefact_{a}" for a in ARTEFACTS)]


def render_rows(rows: list[dict], size: int, seed: int, difficulty: float, workers: int = 1,
                centre: int = 0, bias: float = 0.0, show_lesion: bool = True) -> Iterator[bytes]:
    """Yield the JPEG bytes (size x size) of each row of `plan(..., seed, difficulty)`, in order
    (`show_lesion=False`: the same images with skin where the lesion is, see `render`)."""
    jobs = [(seed, r["_index"], size, r["target"] == "1", difficulty, r["_patient"], centre, bias, show_lesion)
            for r in rows]
    if workers <= 1:
        yield from map(_render_one, jobs)
        return
    with mp.get_context().Pool(workers) as pool:
        yield from pool.imap(_render_one, jobs, chunksize=16)


def generate(cfg: SynthConfig) -> list[dict]:
    """Write the set at cfg.out (``train.csv``, ``jpeg/train/``, `CRITERIA_CSV`, ``synth.json``) and
    return its rows. Anything already in `out` is refused without ``cfg.force`` (OutputError). The
    set is written beside `out` and swapped in: a killed run leaves the old set or the new one."""
    check_config(cfg)
    rows = plan(cfg.benign, cfg.malignant, cfg.seed, cfg.difficulty, cfg.images_per_patient, cfg.centre)
    log_config(cfg)
    with outdir.claim(cfg.out, "synth", force=cfg.force, staged=True, can_resume=False) as out:
        out.write_json("synth.json", {k: v for k, v in dataclasses.asdict(cfg).items() if k != "force"})
        stream = render_rows(rows, cfg.size, cfg.seed, cfg.difficulty, cfg.workers, cfg.centre, cfg.artefact_bias)
        for r, data in progress(zip(rows, stream), total=len(rows), desc="synth"):
            out.write_bytes(f"jpeg/train/{r['image_name']}.jpg", data)
        out.write_text("train.csv", _csv(rows, CSV_COLUMNS))
        out.write_text(CRITERIA_CSV, _csv(truth(rows, cfg.seed, cfg.difficulty, cfg.centre, cfg.artefact_bias),
                                          TRUTH_COLUMNS))
    n_pat = len({r["patient_id"] for r in rows})
    log.info("wrote %d images (%d malignant) of %d patients to %s", len(rows), cfg.malignant, n_pat, cfg.out)
    return rows


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def read_truth(data_dir) -> dict[str, dict[str, str]] | None:
    """{image_name: its row of synth_criteria.csv} for a folder melano.synth wrote, else None.
    ValueError naming the line if train.csv lists an image the truth file does not, or relabelled."""
    root = Path(data_dir)
    if not (root / CRITERIA_CSV).is_file():
        return None
    with open(root / CRITERIA_CSV, newline="", encoding="utf-8") as f:
        found = {r["image_name"]: r for r in csv.DictReader(f)}
    with open(root / "train.csv", newline="", encoding="utf-8-sig") as f:
        for line, r in enumerate(csv.DictReader(f), start=2):
            t = found.get(r.get("image_name", ""))
            if t is None or (t["phenotype"] == "melanoma") != (r.get("target", "").strip() == "1"):
                raise ValueError(f"{root / 'train.csv'}, line {line}: image {r.get('image_name')!r} is not the one "
                                 f"{root / CRITERIA_CSV} describes; the folder was changed after melano.synth wrote "
                                 f"it, so its hidden criteria are unknown (regenerate it)")
    return found
