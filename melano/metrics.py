"""ROC AUC, the ROC curve, and DeLong confidence intervals and paired tests.

Hand-written with numpy so that every number in a report can be read back to its formula.

AUC is the Mann-Whitney statistic: the probability that a random positive scores above a random
negative, a tie counting one half. That equals the trapezoidal area under the ROC curve.
With midranks R (ties share the average of their ranks) over all n = m + k scores,

    AUC = (sum of R over the m positives - m(m+1)/2) / (m k).

DeLong et al. (1988) estimate its variance from the "structural components"
    V10[i] = P(negative < positive i) + 0.5 P(tie)   (one per positive)
    V01[j] = P(positive j' > negative j) + 0.5 P(tie) (one per negative)
as  Var(AUC) = S10 / m + S01 / k, with S10, S01 their sample (co)variances. Sun & Xu (2014) get the
components from three midrank vectors in O(n log n):
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
    """Lists, numpy arrays and torch tensors (any device, any float dtype) to a numpy array."""
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
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)
            or s.dtype == bool):
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
        only = 0 if m == 0 else 1
        raise ValueError(f"y_true: only class {only} is present ({y.size} labels); ROC AUC is "
                         f"undefined without both positives and negatives")
    return m, k


# ----------------------------------------------------------------------------- midranks

def midrank(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x where tied values share the mean of their ranks. O(n log n)."""
    order = np.argsort(x, kind="quicksort")
    z = x[order]
    n = z.size
    starts = np.flatnonzero(np.concatenate(([True], z[1:] != z[:-1])))
    ends = np.append(starts[1:], n)
    ranks_sorted = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    out = np.empty(n, dtype=np.float64)
    out[order] = ranks_sorted
    return out


def _components(pos: np.ndarray, neg: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and the DeLong structural components V10 (per positive) and V01 (per negative)."""
    m, k = pos.size, neg.size
    rz = midrank(np.concatenate((pos, neg)))
    rx, ry = midrank(pos), midrank(neg)
    auc = (rz[:m].sum() - m * (m + 1) / 2.0) / (m * k)
    v10 = (rz[:m] - rx) / k
    v01 = 1.0 - (rz[m:] - ry) / m
    return float(auc), v10, v01


# ----------------------------------------------------------------------------- public API

def roc_auc(y_true, y_score) -> float:
    """Area under the ROC curve; ties between a positive and a negative count half. O(n log n)."""
    y = _labels(y_true)
    s = _scores(y_score, y.size)
    m, k = _both_classes(y)
    # Only the positives' rank sum is needed, so skip scattering ranks back to input order.
    order = np.argsort(s, kind="quicksort")
    z = s[order]
    starts = np.flatnonzero(np.concatenate(([True], z[1:] != z[:-1])))
    ends = np.append(starts[1:], z.size)
    pos_before = np.concatenate(([0], np.cumsum(y[order], dtype=np.int64)))
    pos_per_group = pos_before[ends] - pos_before[starts]
    rank_sum = float(np.dot(pos_per_group, (starts + ends + 1) / 2.0))
    return (rank_sum - m * (m + 1) / 2.0) / (m * k)


def roc_curve(y_true, y_score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest first, starting at (0, 0) with
    threshold +inf: the points of scikit-learn's roc_curve(..., drop_intermediate=False)."""
    y = _labels(y_true)
    s = _scores(y_score, y.size)
    m, k = _both_classes(y)
    order = np.argsort(-s, kind="stable")
    z, yz = s[order], y[order]
    last_of_group = np.append(np.flatnonzero(z[1:] != z[:-1]), z.size - 1)
    tps = np.cumsum(yz, dtype=np.int64)[last_of_group]
    fps = last_of_group + 1 - tps
    fpr = np.concatenate(([0.0], fps / k))
    tpr = np.concatenate(([0.0], tps / m))
    thresholds = np.concatenate(([np.inf], z[last_of_group]))
    return fpr, tpr, thresholds


def _split_by_class(y_true, *scores) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    y = _labels(y_true)
    names = ["y_score"] if len(scores) == 1 else ["score_a", "score_b"]
    parsed = [_scores(sc, y.size, name) for sc, name in zip(scores, names)]
    m, k = _both_classes(y)
    if m < 2 or k < 2:
        raise ValueError(f"y_true: DeLong's variance needs at least 2 positives and 2 negatives, "
                         f"got {m} and {k}")
    return y, [(s[y], s[~y]) for s in parsed]


def delong_ci(y_true, y_score, level: float = 0.95) -> tuple[float, float, float]:
    """(auc, low, high): a normal interval with DeLong's variance, clipped to [0, 1]."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    _, [(pos, neg)] = _split_by_class(y_true, y_score)
    auc, v10, v01 = _components(pos, neg)
    var = v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size
    half = NormalDist().inv_cdf(0.5 + level / 2.0) * math.sqrt(max(var, 0.0))
    return auc, max(0.0, auc - half), min(1.0, auc + half)


def delong_test(y_true, score_a, score_b) -> tuple[float, float, float]:
    """(auc_a, auc_b, p): DeLong's two-sided paired test that two scorers of the same cases have
    equal AUC. p is 1.0 when the difference and its variance are both zero."""
    _, [(pa, na), (pb, nb)] = _split_by_class(y_true, score_a, score_b)
    auc_a, v10a, v01a = _components(pa, na)
    auc_b, v10b, v01b = _components(pb, nb)
    m, k = pa.size, na.size
    s10 = np.cov(np.stack([v10a, v10b]), ddof=1)
    s01 = np.cov(np.stack([v01a, v01b]), ddof=1)
    cov = s10 / m + s01 / k
    var_diff = cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]
    diff = auc_a - auc_b
    if var_diff <= 1e-300:  # identical rankings, or both perfect
        return auc_a, auc_b, 1.0 if abs(diff) < 1e-15 else 0.0
    z = diff / math.sqrt(var_diff)
    return auc_a, auc_b, math.erfc(abs(z) / math.sqrt(2.0))
