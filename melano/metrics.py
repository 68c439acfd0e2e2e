"""ROC AUC, the ROC curve, and DeLong confidence intervals and paired tests, hand-written with
numpy so that every number in a report can be read back to its formula.

AUC is the Mann-Whitney statistic: the probability that a random positive scores above a random
negative, a tie counting one half; it equals the trapezoidal area under the ROC curve. With
midranks R (ties share the mean of their ranks) over all n = m + k scores,

    AUC = (sum of R over the m positives - m(m+1)/2) / (m k).

DeLong et al. (1988): Var(AUC) = S10 / m + S01 / k, with S10, S01 the sample (co)variances of the
"structural components" V10[i] = P(negative < positive i) + 0.5 P(tie), one per positive, and
V01[j] = P(positive > negative j) + 0.5 P(tie), one per negative. Sun & Xu (2014) get them from
three midrank vectors in O(n log n):
    V10 = (Rz[pos] - Rx) / k,   V01 = 1 - (Rz[neg] - Ry) / m,
where Rz ranks all scores, Rx only the positives and Ry only the negatives.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

__all__ = ["roc_auc", "roc_curve", "delong_ci", "delong_test", "midrank"]


# ----------------------------------------------------------------------------- input checks

def _to_numpy(x, name: str) -> np.ndarray:
    """Lists, numpy arrays and torch tensors (any device, any float dtype) to a 1-D numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, on any device
        import torch

        x = x.detach().cpu()
        if x.is_floating_point():  # numpy has no bf16; widen every float dtype
            x = x.to(torch.float64)
        x = x.numpy()
    try:
        a = np.asarray(x)
    except Exception as e:
        raise ValueError(f"{name}: cannot be read as an array ({e})") from e
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: is empty")
    return a


def _labels(y_true) -> np.ndarray:
    y = _to_numpy(y_true, "y_true")
    if y.dtype == bool:
        return y
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"y_true: labels must be bool or 0/1 numbers, got dtype {y.dtype}")
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        raise ValueError(f"y_true: labels must be 0 or 1; found {np.unique(y[bad])[:5].tolist()} "
                         f"(at index {int(np.flatnonzero(bad)[0])})")
    return y == 1


def _scores(y_score, n: int, name: str = "y_score") -> np.ndarray:
    s = _to_numpy(y_score, name)
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer) or s.dtype == bool):
        raise ValueError(f"{name}: scores must be numbers, got dtype {s.dtype}")
    if s.shape[0] != n:
        raise ValueError(f"{name}: has {s.shape[0]} scores but y_true has {n} labels")
    s = s.astype(np.float64, copy=False)
    if not np.isfinite(s).all():
        bad = int(np.flatnonzero(~np.isfinite(s))[0])
        raise ValueError(f"{name}: scores must be finite; found {s[bad]} at index {bad}")
    return s


def _both_classes(y: np.ndarray) -> tuple[int, int]:
    m = int(y.sum())
    k = y.size - m
    if m == 0 or k == 0:
        raise ValueError(f"y_true: only class {int(m > 0)} is present ({y.size} labels); ROC AUC is "
                         f"undefined without both positives and negatives")
    return m, k


# ----------------------------------------------------------------------------- AUC and ROC

def midrank(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x where tied values share the mean of their ranks. O(n log n)."""
    order = np.argsort(x, kind="quicksort")
    z = x[order]
    starts = np.flatnonzero(np.concatenate(([True], z[1:] != z[:-1])))
    ends = np.append(starts[1:], z.size)
    out = np.empty(z.size, dtype=np.float64)
    out[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return out


def roc_auc(y_true, y_score) -> float:
    """Area under the ROC curve; ties between a positive and a negative count half. O(n log n)."""
    y = _labels(y_true)
    s = _scores(y_score, y.size)
    m, k = _both_classes(y)
    return float((midrank(s)[y].sum() - m * (m + 1) / 2.0) / (m * k))


def roc_curve(y_true, y_score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest first, starting at (0, 0) with
    threshold +inf: the points of scikit-learn's roc_curve(..., drop_intermediate=False)."""
    y = _labels(y_true)
    s = _scores(y_score, y.size)
    m, k = _both_classes(y)
    order = np.argsort(-s, kind="stable")
    z = s[order]
    last_of_group = np.append(np.flatnonzero(z[1:] != z[:-1]), z.size - 1)
    tps = np.cumsum(y[order], dtype=np.int64)[last_of_group]
    fps = last_of_group + 1 - tps
    return (np.concatenate(([0.0], fps / k)), np.concatenate(([0.0], tps / m)),
            np.concatenate(([np.inf], z[last_of_group])))


# ----------------------------------------------------------------------------- DeLong

def _delong(y_true, *scores) -> tuple[list[float], np.ndarray]:
    """The AUCs of one or two scorers of the same cases and DeLong's covariance matrix of them."""
    y = _labels(y_true)
    names = ["y_score"] if len(scores) == 1 else ["score_a", "score_b"]
    parsed = [_scores(s, y.size, name) for s, name in zip(scores, names)]
    m, k = _both_classes(y)
    if m < 2 or k < 2:
        raise ValueError(f"y_true: DeLong's variance needs at least 2 positives and 2 negatives, "
                         f"got {m} and {k}")
    aucs, v10, v01 = [], [], []
    for s in parsed:
        rz, rx, ry = midrank(np.concatenate((s[y], s[~y]))), midrank(s[y]), midrank(s[~y])
        aucs.append(float((rz[:m].sum() - m * (m + 1) / 2.0) / (m * k)))
        v10.append((rz[:m] - rx) / k)
        v01.append(1.0 - (rz[m:] - ry) / m)
    cov = np.atleast_2d(np.cov(np.stack(v10), ddof=1)) / m + np.atleast_2d(np.cov(np.stack(v01), ddof=1)) / k
    return aucs, cov


def delong_ci(y_true, y_score, level: float = 0.95) -> tuple[float, float, float]:
    """(auc, low, high): a normal interval with DeLong's variance, clipped to [0, 1]."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    [auc], cov = _delong(y_true, y_score)
    half = NormalDist().inv_cdf(0.5 + level / 2.0) * math.sqrt(max(cov[0, 0], 0.0))
    return auc, max(0.0, auc - half), min(1.0, auc + half)


def delong_test(y_true, score_a, score_b) -> tuple[float, float, float]:
    """(auc_a, auc_b, p): DeLong's two-sided paired test that two scorers of the same cases have
    equal AUC. p is 1.0 when the difference and its variance are both zero."""
    (auc_a, auc_b), cov = _delong(y_true, score_a, score_b)
    var_diff = cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]
    diff = auc_a - auc_b
    if var_diff <= 1e-300:  # identical rankings, or both perfect
        return auc_a, auc_b, 1.0 if abs(diff) < 1e-15 else 0.0
    z = diff / math.sqrt(var_diff)
    return auc_a, auc_b, math.erfc(abs(z) / math.sqrt(2.0))
