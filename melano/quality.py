"""How good are synthetic images? The measures, on feature arrays: Fréchet distance, KID, a
patient-grouped two-sample test, translation success, ridge regression to a hidden truth,
memorisation, a probe of the dermoscopic criteria, and the mean and sd over GAN runs;
`melano.quality_stage` runs them all. Features come from an ImageNet EfficientNet
(`Encoder`), not Inception-v3: FD and KID here compare within melano, never with published FIDs.
"""

from __future__ import annotations

import contextlib
import math
import re
from statistics import NormalDist
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics
from .efficientnet import ConvBNAct
from .lesions import SEVEN_POINT
from .pixels import to_tensor

# ---------- Linear algebra in torch, on one thread: numpy's multi-threaded OpenBLAS stalls for
# seconds on these small products when another process shares the cores; one torch thread never does.

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


def sample_sd(values) -> float:
    """The sample standard deviation (ddof 1); 0 for a single value."""
    v = np.asarray(values, np.float64)
    return float(v.std(ddof=1)) if v.size > 1 else 0.0


# ---------- Features

def as_nhwc(images, name: str = "images") -> np.ndarray:
    """uint8 images (N, H, W, 3) or (N, 3, H, W) as a numpy array (N, H, W, 3), a view if possible."""
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
    """Fold each eval-mode BatchNorm into the convolution before it, in place: the same function,
    faster, and no longer trainable."""
    for m in model.modules():
        if isinstance(m, ConvBNAct) and isinstance(m.bn, torch.nn.BatchNorm2d):
            k = m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)
            m.conv.weight.mul_(k.view(-1, 1, 1, 1))
            bias = m.bn.bias - m.bn.running_mean * k
            m.conv.bias = torch.nn.Parameter(bias if m.conv.bias is None else bias + m.conv.bias * k)
            m.bn = torch.nn.Identity()
    return model


class Encoder:
    """An ImageNet EfficientNet as a feature extractor: uint8 images -> (N, dim) float64 pooled features.

    Folds the given model's BatchNorm, so the model is spent. Images are resized (bilinear, antialiased
    when shrinking) to `resolution` and normalised with the model's default_cfg mean and std."""

    def __init__(self, model: torch.nn.Module, resolution: int = 224, batch_size: int = 32,
                 device: str | torch.device = "cpu"):
        if resolution < 32:
            raise ValueError(f"resolution must be at least 32 px, got {resolution}")
        self.model = fold_batchnorm(model.eval())
        self.device = torch.device(device)
        # channels_last: faster for these depthwise convolutions on CPU
        self.model.to(self.device, memory_format=torch.channels_last)
        cfg = self.model.default_cfg
        self.mean, self.std = (torch.tensor(cfg[k], device=self.device).view(1, 3, 1, 1) for k in ("mean", "std"))
        self.resolution, self.batch_size, self.dim = resolution, batch_size, self.model.num_features

    @torch.inference_mode()
    def __call__(self, images) -> np.ndarray:
        x = as_nhwc(images)
        out = [np.zeros((0, self.dim))]
        for i in range(0, len(x), self.batch_size):
            b = (to_tensor(x[i:i + self.batch_size], device=self.device) - self.mean) / self.std
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
    each Y, Cb, Cr channel's high-pass residual (pixel minus its 3x3 mean, edges replicated), area-
    averaged the same way: downsampling alone averages away what a file format changes (JPEG
    quantisation, chroma subsampling, resampling blur)."""
    x = to_tensor(as_nhwc(images), dtype=torch.float64)
    with one_thread():
        ycc = torch.einsum("cd,ndhw->nchw", _YCBCR, x)
        detail = (ycc - F.avg_pool2d(F.pad(ycc, (1, 1, 1, 1), mode="replicate"), 3, stride=1)).abs()
        if x.shape[-2:] != (size, size):
            x, detail = (F.interpolate(t, size=(size, size), mode="area") for t in (x, detail))
    return torch.cat([x.flatten(1), detail.flatten(1)], 1).numpy()


# ---------- Distances between two sets of features

def _frechet(d: np.ndarray, tr1: float, tr2: float, m: np.ndarray) -> float:
    """||d||^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2), the last from the eigenvalues of m: symmetric PSD
    with the non-zero eigenvalues of S1 S2, so no complex square root is needed."""
    with one_thread():
        eig = torch.linalg.eigvalsh(_t(m)).numpy()
    return float(d @ d + tr1 + tr2 - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_from_moments(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Fréchet distance of two Gaussians;
    S1^(1/2) S2 S1^(1/2) is similar to S1 S2, and symmetric."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, np.float64) for a in (mu1, sigma1, mu2, sigma2))
    if sigma1.shape != (mu1.size, mu1.size) or sigma2.shape != sigma1.shape or mu2.shape != mu1.shape:
        raise ValueError(f"moments do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {sigma2.shape}")
    with one_thread():  # S1^(1/2), through the eigendecomposition of the symmetric PSD S1
        w, v = torch.linalg.eigh(_t((sigma1 + sigma1.T) / 2))
        r = ((v * w.clamp(min=0).sqrt()) @ v.T).numpy()
    return _frechet(mu1 - mu2, np.trace(sigma1), np.trace(sigma2), matmul(matmul(r, sigma2), r))


def _two_sets(x, y, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"{what}: need two (n, d) feature arrays with the same d, got {x.shape} and {y.shape}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"{what}: each set needs at least 2 samples, got {len(x)} and {len(y)}")
    return x, y


def frechet_distance(x, y) -> float:
    """Fréchet distance between the Gaussians fitted to feature sets x (n, d) and y (m, d).

    Unbiased covariances. With fewer samples than dimensions, tr (S1 S2)^(1/2) comes from the small
    Gram matrix: with centred data A, B and C = A B^T / sqrt((n-1)(m-1)), the non-zero eigenvalues of
    S1 S2 are those of C C^T. FD is biased upwards at small n: compare FDs only at equal sizes."""
    x, y = _two_sets(x, y, "frechet_distance")
    if min(len(x), len(y)) > x.shape[1]:
        return frechet_from_moments(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    a, b = x - x.mean(0), y - y.mean(0)
    if len(a) > len(b):
        a, b = b, a  # the smaller Gram matrix
    c = matmul(a, b.T) / math.sqrt((len(a) - 1) * (len(b) - 1))
    return _frechet(x.mean(0) - y.mean(0), (a * a).sum() / (len(a) - 1), (b * b).sum() / (len(b) - 1),
                    matmul(c, c.T))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel k(a, b) = (a . b / d + 1)^3 for every pair of rows."""
    return (matmul(x, y.T) / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased MMD^2 from kernel matrices: off-diagonal means of Kxx and Kyy minus twice mean Kxy."""
    off_diagonal_mean = lambda k: (k.sum() - np.trace(k)) / (len(k) * (len(k) - 1))
    return float(off_diagonal_mean(kxx) + off_diagonal_mean(kyy) - 2 * kxy.mean())


def kid_subsets(n_x: int, n_y: int, subset_size: int, n_subsets: int, seed: int = 0
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (rows of x, rows of y) of each KID subset: `subset_size` rows of each set (cut to the
    smaller set), drawn without replacement, seeded."""
    m = min(subset_size, n_x, n_y)
    if m < 2:
        raise ValueError(f"KID needs subsets of at least 2 images, got sets of {n_x} and {n_y}")
    rng = np.random.default_rng([seed, 7])
    return [(np.sort(rng.choice(n_x, m, replace=False)), np.sort(rng.choice(n_y, m, replace=False)))
            for _ in range(n_subsets)]


def kid(x, y, subset_size: int = 1000, n_subsets: int = 100, seed: int = 0) -> dict:
    """Kernel Inception Distance (on our ImageNet features): unbiased MMD^2 with the cubic polynomial
    kernel, mean and sd over `n_subsets` random subsets of min(subset_size, len(x), len(y)) images
    of each set. Unbiased, so the mean does not depend on the subset size and may be slightly
    negative for sets from one distribution; the sd measures subsampling only."""
    x, y = _two_sets(x, y, "kid")
    # Kernel matrices once; each subset is then a gather of rows and columns.
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    subsets = kid_subsets(len(x), len(y), subset_size, n_subsets, seed)
    values = [mmd2_unbiased(kxx[np.ix_(i, i)], kyy[np.ix_(j, j)], kxy[np.ix_(i, j)]) for i, j in subsets]
    return {"mean": float(np.mean(values)), "sd": sample_sd(values), "subset_size": int(len(subsets[0][0])),
            "n_subsets": len(subsets)}


# ---------- Two-sample test: can a logistic regression tell the two sets apart?

def _standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale. A feature (nearly) constant in training, such as a corner the scope
    blacks out, must not be blown up (a new image where it varies would get an arbitrary prediction):
    its scale is floored at 1% of the median feature's, and a constant feature stays 0, not NaN."""
    mean, scale = x.mean(0), x.std(0)
    floor = 0.01 * float(np.median(scale[scale > 0])) if (scale > 0).any() else 1.0
    return mean, np.maximum(scale, floor)


class Linear(NamedTuple):
    """A linear model on standardised features: ((x - mean) / scale) @ coef + intercept."""
    mean: np.ndarray     # per-feature standardisation, from the training samples
    scale: np.ndarray
    coef: np.ndarray     # on standardised features
    intercept: float
    alpha: float = 0.0   # ridge only: the penalty leave-one-out chose ...
    loo_mse: float = 0.0  # ... and its leave-one-out mean squared error


def predict(model: Linear, x) -> np.ndarray:
    """The logits of a logistic regression, or a ridge regression's predictions."""
    return ((np.asarray(x, np.float64) - model.mean) / model.scale) @ model.coef + model.intercept


def fit_logistic(x, y, l2: float = 1.0, tol: float = 1e-6, max_iter: int = 500) -> Linear:
    """L2-regularised logistic regression on standardised features, by L-BFGS in float64.

    Minimises sum_i logloss(y_i, x_i . w + b) + l2 / 2 ||w||^2 (the intercept is not penalised):
    scikit-learn's LogisticRegression(C=1 / l2) on the standardised features. Stops when no
    gradient entry of the objective / n exceeds `tol` (1e-6 moves logits by about 1e-3: enough
    for an AUC)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"fit_logistic: need x (n, d) and y (n,), got {x.shape} and {y.shape}")
    if not ((y == 0) | (y == 1)).all() or y.min() == y.max():
        raise ValueError("fit_logistic: y must hold both classes, as 0 and 1")
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    mean, scale = _standardiser(x)
    xs, yt = torch.from_numpy((x - mean) / scale), torch.from_numpy(y)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=tol * 1e-4, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        # divided by n: the same minimiser, with gradients of a size that suits the tolerances
        loss = (F.binary_cross_entropy_with_logits(xs @ w + b, yt, reduction="sum") + l2 / 2 * w @ w) / len(x)
        loss.backward()
        return loss

    with one_thread():  # see one_thread: a second thread only makes each small step slower
        opt.step(closure)
    return Linear(mean, scale, w.detach().numpy().copy(), float(b.detach()))


def grouped_folds(groups: Sequence, labels, k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold (0..k-1) of each sample, all samples of a group in one fold. Groups are placed largest first
    (random order among equal sizes), each where it keeps the per-class counts most even."""
    labels = np.asarray(labels).astype(int)
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    if len(members) < k:
        raise ValueError(f"{len(members)} groups (patients) cannot fill {k} folds; use fewer folds")
    keys = list(members)
    keys = sorted((keys[i] for i in np.random.default_rng([seed, 5]).permutation(len(keys))),
                  key=lambda g: -len(members[g]))
    totals = np.maximum(np.bincount(labels, minlength=2), 1)
    counts, fold = np.zeros((k, 2)), np.empty(len(labels), dtype=np.int64)
    for g in keys:
        add = np.bincount(labels[members[g]], minlength=2)
        f = int(np.argmin(((counts + add) / totals).max(1)))
        counts[f] += add
        fold[members[g]] = f
    return fold


def two_sample_auc(a, b, groups_a: Sequence, groups_b: Sequence, folds: int = 5, l2: float = 1.0,
                   seed: int = 0) -> dict:
    """Cross-validated AUC of a logistic regression telling set b (label 1) from set a (label 0), and
    the mean and sd of the per-fold AUCs. Each group (patient) stays in one fold, so a patient's look
    cannot carry from training to test; the AUC pools the out-of-fold logits (0.5: indistinguishable)."""
    a, b = _two_sets(a, b, "two_sample_auc")
    if len(groups_a) != len(a) or len(groups_b) != len(b):
        raise ValueError(f"two_sample_auc: {len(groups_a)} and {len(groups_b)} groups for sets of "
                         f"{len(a)} and {len(b)}")
    x, y = np.concatenate([a, b]), np.r_[np.zeros(len(a)), np.ones(len(b))]
    fold = grouped_folds(list(groups_a) + list(groups_b), y, folds, seed)
    logits, fold_aucs = np.empty(len(x)), []
    for f in range(folds):
        test = fold == f
        if len(np.unique(y[~test])) < 2:
            raise ValueError(f"fold {f} leaves one class out of training; use fewer folds")
        logits[test] = predict(fit_logistic(x[~test], y[~test], l2), x[test])
        if len(np.unique(y[test])) == 2:
            fold_aucs.append(metrics.roc_auc(y[test], logits[test]))
    return {"auc": metrics.roc_auc(y, logits), "fold_auc_mean": float(np.mean(fold_aucs)),
            "fold_auc_sd": sample_sd(fold_aucs), "n_a": len(a), "n_b": len(b), "folds": folds, "l2": l2}


# ---------- Translation success: does a classifier trained on real images call the translations malignant?

def translation_success(val_logits, val_labels, translation_logits, source_logits,
                        sensitivity: float = 0.9) -> dict:
    """Classifier logits -> how many translations (and their benign sources) it calls malignant: at the
    highest threshold that still flags `sensitivity` of the real validation melanomas (logit >=
    threshold). Translation i is paired with source i for the logit shift."""
    val_logits, val_labels = np.asarray(val_logits, np.float64), np.asarray(val_labels)
    t_logits, s_logits = np.asarray(translation_logits, np.float64), np.asarray(source_logits, np.float64)
    if val_logits.shape != val_labels.shape or t_logits.shape != s_logits.shape or t_logits.ndim != 1:
        raise ValueError(f"translation_success: shapes val {val_logits.shape}/{val_labels.shape}, "
                         f"translations {t_logits.shape}, sources {s_logits.shape}; each pair must match")
    if not 0 < sensitivity <= 1:
        raise ValueError(f"sensitivity must be in (0, 1], got {sensitivity}")
    mel, benign = np.sort(val_logits[val_labels == 1])[::-1], val_logits[val_labels == 0]
    if mel.size == 0 or t_logits.size == 0:
        raise ValueError("translation_success: needs validation melanomas and at least one translation")
    threshold = mel[math.ceil(sensitivity * mel.size) - 1]
    shift = t_logits - s_logits
    return {"threshold": float(threshold), "val_sensitivity": float((mel >= threshold).mean()),
            "val_specificity": float((benign < threshold).mean()) if benign.size else None,
            "fraction_translations_above": float((t_logits >= threshold).mean()),
            "fraction_sources_above": float((s_logits >= threshold).mean()),
            "mean_logit_shift": float(shift.mean()), "sd_logit_shift": sample_sd(shift),
            "fraction_shift_positive": float((shift > 0).mean()), "n": int(t_logits.size),
            "n_val_melanomas": int(mel.size)}


# ---------- Ground truth: how well do features predict a hidden truth (melano.synth's severity)?

def fit_ridge(x, y, alphas: Sequence[float] = tuple(10.0 ** np.arange(-2, 6.5, 0.5))) -> Linear:
    """Ridge regression on standardised features, its penalty chosen by exact leave-one-out error.

    With the thin SVD Xs = U S V^T of the standardised, centred features, for penalty a:
    coef = V diag(S / (S^2 + a)) U^T (y - mean y), leverages h = 1/n + sum_j U_ij^2 S_j^2 / (S_j^2 + a),
    and leave-one-out residuals (y - fitted) / (1 - h)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.shape != (len(x),) or len(x) < 3:
        raise ValueError(f"fit_ridge: need x (n, d) and y (n,) with n >= 3, got {x.shape} and {y.shape}")
    mean, scale = _standardiser(x)
    with one_thread():
        u, s, vt = (t.numpy() for t in torch.linalg.svd(_t((x - mean) / scale), full_matrices=False))
    yc = y - y.mean()
    uty = u.T @ yc

    def loo_mse(a: float) -> float:
        shrink = s ** 2 / (s ** 2 + a)
        h = 1 / len(x) + (u ** 2) @ shrink
        return float(np.mean(((yc - u @ (shrink * uty)) / (1 - h)) ** 2))

    a, loo = min(((a, loo_mse(a)) for a in alphas), key=lambda t: t[1])
    return Linear(mean, scale, vt.T @ (s / (s ** 2 + a) * uty), float(y.mean()), float(a), loo)


def r2_score(y, pred) -> float:
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def summarise(values) -> dict:
    """n, mean, sd and the 5/25/50/75/95% quantiles of a sample."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {"n": 0}
    q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"n": int(v.size), "mean": float(v.mean()), "sd": sample_sd(v),
            **{k: float(x) for k, x in zip(("q05", "q25", "median", "q75", "q95"), q)}}


# ---------- Memorisation: are synthetic images closer to the GAN's training melanomas than new real ones are?

def nearest(x, ref) -> tuple[np.ndarray, np.ndarray]:
    """For each row of x: the Euclidean distance to its nearest row of ref, and that row's index."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    d2 = (x * x).sum(1)[:, None] + (ref * ref).sum(1)[None, :] - 2 * matmul(x, ref.T)
    idx = d2.argmin(1)
    return np.sqrt(np.clip(d2[np.arange(len(x)), idx], 0, None)), idx


def memorisation(synthetic, real_test, real_train, n_closest: int = 8, percentile: float = 1.0) -> dict:
    """Nearest-training-melanoma distances of synthetic images against those of real test melanomas.

    `fraction_below_real_percentile`: the share of synthetic images closer to a training melanoma than
    the `percentile`-th percentile of the real test -> train distances: about percentile/100 for images
    like the real test melanomas, far more for copies. `closest`: the `n_closest` (synthetic index,
    training index, distance) triples."""
    d_syn, i_syn = nearest(synthetic, real_train)
    d_real, _ = nearest(real_test, real_train)
    cut = float(np.percentile(d_real, percentile))
    order = np.argsort(d_syn, kind="stable")[:n_closest]
    return {"synthetic_nn_distance": summarise(d_syn), "real_test_nn_distance": summarise(d_real),
            "real_percentile": percentile, "threshold": cut,
            "fraction_below_real_percentile": float((d_syn < cut).mean()),
            "closest": [{"synthetic": int(i), "real_train": int(i_syn[i]), "distance": float(d_syn[i])}
                        for i in order]}


# ---------- Criterion probe: which dermoscopic criteria can a linear model read from the features?

# The seven criteria of the 7-point checklist, and multicolour (3 or more of Stolz's six colours):
# the malignant structures whose gain or loss in a translation the probe reports.
CRITERIA = (*SEVEN_POINT, "multicolour")
MALIGNANT_STRUCTURES = ("blue_white_veil", "atypical_network", "regression", "multicolour")


class Probe(NamedTuple):
    """One criterion's probe: an L2 logistic regression on features and its decision threshold."""
    model: Linear
    threshold: float   # logit >= threshold: predicted present
    auc_val: float
    can_see: bool      # auc_val >= the minimum


def prevalence_threshold(logits, present) -> float:
    """The k-th largest logit, k the number of true positives: the probe then calls as many images
    "present" as truly are. Taken on held-out images (logits not overfit), so the predicted prevalence
    matches the real one whatever the regularisation does to calibration."""
    logits, present = np.asarray(logits, np.float64), np.asarray(present).astype(bool)
    k = int(present.sum())
    if k == 0 or logits.shape != present.shape:
        raise ValueError(f"prevalence_threshold: need matching logits and labels with a positive, got "
                         f"{logits.shape}, {present.shape} and {k} positives")
    return float(np.sort(logits)[::-1][k - 1])


def fit_probe(x_train, y_train, x_val, y_val, l2: float = 100.0, min_auc: float = 0.7) -> Probe:
    """A criterion probe fit on training features, with its validation ROC AUC, whether it can see the
    criterion (AUC >= min_auc) and its `prevalence_threshold` on the validation images."""
    model = fit_logistic(x_train, y_train, l2)
    val_logits = predict(model, x_val)
    auc = metrics.roc_auc(y_val, val_logits)
    return Probe(model, prevalence_threshold(val_logits, y_val), auc, auc >= min_auc)


def probe_present(probe: Probe, x) -> np.ndarray:
    """0/1: the criterion predicted present in each row of x."""
    return (predict(probe.model, x) >= probe.threshold).astype(int)


def seven_point_score(present: dict) -> np.ndarray:
    """Each image's 7-point checklist score (Argenziano 1998: major criteria 2 points, minor 1) from
    {criterion: (n,) 0/1}; criteria not given count 0."""
    n = len(next(iter(present.values())))
    return sum((SEVEN_POINT[c] * np.asarray(v) for c, v in present.items() if c in SEVEN_POINT), np.zeros(n))


def paired_change(after, before, level: float = 0.95) -> dict:
    """Mean of the per-pair change after - before with a paired normal CI, mean +- z sd / sqrt(n)
    (z = 1.96 at 95%; the pairs are independent images)."""
    diff = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    if diff.ndim != 1 or diff.size < 2:
        raise ValueError(f"paired_change: need two equal 1-D arrays of at least 2 pairs, got {diff.shape}")
    mean, sd = float(diff.mean()), float(diff.std(ddof=1))
    half = NormalDist().inv_cdf(0.5 + level / 2) * sd / math.sqrt(diff.size)
    return {"mean": mean, "sd": sd, "n": int(diff.size), "ci": [mean - half, mean + half], "level": level,
            "gained": int((diff > 0).sum()), "lost": int((diff < 0).sum())}


# ---------- GAN runs: several training runs of one GAN arm, named f"{arm}_g{k}"

def run_arm(key: str) -> str:
    """The arm of a GAN run's key: "cyclegan_ls_g2" -> "cyclegan_ls"; a key without _g<k> is its own arm."""
    m = re.fullmatch(r"(.+)_g\d+", key)
    return m.group(1) if m else key


def run_index(key: str) -> int:
    """k of a key f"{arm}_g{k}"; 0 for a key without the suffix (a single run)."""
    m = re.fullmatch(r".+_g(\d+)", key)
    return int(m.group(1)) if m else 0


def group_runs(keys: Sequence[str]) -> dict[str, list[str]]:
    """{arm: its run keys, by run index}, arms in the order they first appear."""
    arms = dict.fromkeys(run_arm(k) for k in keys)
    return {arm: sorted((k for k in keys if run_arm(k) == arm), key=run_index) for arm in arms}


def mean_sd_over_runs(runs: Sequence[dict]) -> tuple[dict, dict]:
    """Mean and sd (ddof 1; 0 for one run) over runs of each scalar; a key missing from (or None
    in) any run is left out, so every figure averages the same runs."""
    keys = [k for k in runs[0] if all(r.get(k) is not None for r in runs)]
    values = {k: np.array([r[k] for r in runs], np.float64) for k in keys}
    return {k: float(v.mean()) for k, v in values.items()}, {k: sample_sd(v) for k, v in values.items()}
