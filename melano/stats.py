"""Patient-clustered uncertainty, arm comparisons, Holm's adjustment and clinical operating points,
hand-written with numpy, seeded and vectorised. Which variance each interval covers:

* **Cluster bootstrap** (`cluster_bootstrap_auc`, `cluster_bootstrap_delta`, `operating_points`,
  `compare_arms`' test_only): *test sampling* only. A patient's images have correlated scores, so
  patients, not images, are resampled: with replacement, separately among those with a melanoma
  image and those without (every replicate keeps both classes and its number of melanoma patients,
  as DeLong conditions on the class counts). An image weighs as often as its patient was drawn.
* **Hierarchical bootstrap** (`compare_arms`' test_and_training): *test sampling and training
  variance*. Each replicate also resamples each arm's K training seeds. Resampling K values shrinks
  their variance by (K-1)/K, so the seeds' AUCs are first spread about their mean by sqrt(K/(K-1)):
  the seed level then adds s^2/K, the unbiased variance of a mean of K runs. Crossing patients and
  seeds counts their interaction twice (Owen 2007, "the pigeonhole bootstrap"), which errs wide;
  few seeds err narrow, the training part resting on K - 1 degrees of freedom per arm
  (tests/test_stats.py simulates the coverage). It needs K >= 2 in both arms.
* **DeLong** (`melano.metrics`): test sampling with every image independent; too narrow when
  patients contribute several images.

Intervals are percentile intervals of the replicates, SE their standard deviation. The two-sided
p of a difference inverts the percentile interval: p = 2 min(#{d* <= 0} + 1, #{d* >= 0} + 1) /
(B + 1), capped at 1, so p < 1 - level exactly when that interval (nearly) excludes 0; the smallest
attainable p is 2 / (B + 1).
"""

from __future__ import annotations

import math

import numpy as np

from melano import metrics

__all__ = ["weighted_auc", "cluster_bootstrap_auc", "cluster_bootstrap_delta", "compare_arms",
           "holm", "operating_points"]

_CHUNK = 1 << 21  # replicate x image elements per chunk: bounds memory at ~16 MB per array
_EPS = 1e-12      # rate comparisons: 0.1 must count as specificity 0.9 despite rounding


# ----------------------------------------------------------------------------- input checks

def _groups(groups, n: int) -> np.ndarray:
    """Patient ids (any sortable values) to codes 0..P-1."""
    g = metrics._to_numpy(groups, "groups")
    if g.shape[0] != n:
        raise ValueError(f"groups: has {g.shape[0]} entries but y_true has {n} labels; pass one "
                         f"patient id per image")
    if g.dtype.kind == "f" and not np.isfinite(g).all():
        raise ValueError(f"groups: patient ids must not be NaN or inf (index "
                         f"{int(np.flatnonzero(~np.isfinite(g))[0])})")
    try:
        _, codes = np.unique(g, return_inverse=True)
    except TypeError as e:
        raise ValueError(f"groups: patient ids must be all strings or all numbers ({e})") from e
    return codes.reshape(-1)


def _score_matrix(scores, n: int, name: str) -> np.ndarray:
    """(K, n) float64 scores of K training seeds; a 1-D array is one seed."""
    if hasattr(scores, "detach"):
        scores = scores.detach().cpu().double().numpy()
    try:
        a = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot be read as a (seeds, {n}) array of numbers ({e})") from e
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{name}: expected shape (seeds, {n}), got {a.shape}")
    return np.stack([metrics._scores(row, n, f"{name}[{i}]") for i, row in enumerate(a)])


def _check_boot(n_boot: int, level: float) -> None:
    if int(n_boot) != n_boot or n_boot < 10:
        raise ValueError(f"n_boot: must be an integer >= 10 (2000 is a good default), got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: must be in (0, 1), got {level}")


def _prepare(y_true, groups) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(labels, patient codes, strata): strata are the patients with / without a melanoma."""
    y = metrics._labels(y_true)
    metrics._both_classes(y)
    codes = _groups(groups, y.size)
    has_pos = np.bincount(codes, weights=y, minlength=codes.max() + 1) > 0
    strata = [np.flatnonzero(has_pos), np.flatnonzero(~has_pos)]
    return y, codes, [s for s in strata if s.size]


# ----------------------------------------------------------------------------- the engine

def _draw_counts(strata: list[np.ndarray], n_patients: int, size: int,
                 rng: np.random.Generator) -> np.ndarray:
    """(size, n_patients) times each patient is drawn, resampling within each stratum."""
    drawn = np.concatenate([s[rng.integers(0, s.size, (size, s.size))] for s in strata], axis=1)
    drawn += (np.arange(size) * n_patients)[:, None]
    return np.bincount(drawn.ravel(), minlength=size * n_patients).reshape(size, n_patients)


def _draws(strata: list[np.ndarray], codes: np.ndarray, n_boot: int, rng: np.random.Generator):
    """The n_boot replicates' patient counts, in chunks of at most _CHUNK replicate x image cells."""
    step, n_pat = max(1, _CHUNK // codes.size), int(codes.max()) + 1
    for start in range(0, n_boot, step):
        yield _draw_counts(strata, n_pat, min(step, n_boot - start), rng)


def _cumulative(counts: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(B, len(codes) + 1): each row's running total of its patients' counts along `codes`, from 0."""
    # np.take keeps rows contiguous (fancy indexing would not), and integer cumulative sums are
    # both exact and several times faster than float ones.
    c = np.zeros((counts.shape[0], codes.size + 1), dtype=counts.dtype)
    np.cumsum(np.take(counts, codes, axis=1), axis=1, out=c[:, 1:])
    return c


def _auc_plan(y: np.ndarray, s: np.ndarray, codes: np.ndarray):
    """Sort once: the negatives' patients in score order, the positives' patients, lo and hi."""
    neg = np.flatnonzero(~y)
    neg = neg[np.argsort(s[neg], kind="stable")]
    pos = np.flatnonzero(y)
    lo = np.searchsorted(s[neg], s[pos], side="left")
    hi = np.searchsorted(s[neg], s[pos], side="right")
    return codes[neg], codes[pos], lo, hi


def _auc_rows(plan, counts: np.ndarray) -> np.ndarray:
    """Weighted AUC of each row of counts (patient weights); NaN where a class has no weight.

    With C the cumulative negative weights in score order (C[0] = 0) and lo_i, hi_i the number of
    negatives scoring below positive i and at or below it,
        AUC = sum_i w_i (C[lo_i] + C[hi_i]) / 2 / (W_pos W_neg):
    the Mann-Whitney statistic with a tie counting one half and each image counted w times."""
    neg_codes, pos_codes, lo, hi = plan
    c = _cumulative(counts, neg_codes)
    wp = np.take(counts, pos_codes, axis=1)
    twice_num = (wp * (np.take(c, lo, axis=1) + np.take(c, hi, axis=1))).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 0.5 * twice_num / (wp.sum(axis=1) * c[:, -1].astype(np.float64))


def _summary(estimate: float, reps: np.ndarray, level: float) -> dict:
    ok = reps[np.isfinite(reps)]
    if ok.size < 2:
        raise ValueError("groups: fewer than 2 bootstrap replicates had both classes; the test "
                         "split needs more patients with and without melanoma")
    low, high = np.quantile(ok, [(1 - level) / 2, (1 + level) / 2])
    return {"estimate": float(estimate), "se": float(ok.std(ddof=1)),
            "ci": [float(low), float(high)], "n_valid": int(ok.size)}


def _interval(estimate: float, reps: np.ndarray, level: float) -> dict:
    """se, ci, n_valid, and the percentile-inversion p-value for 'the difference is 0'."""
    out, ok = _summary(estimate, reps, level), reps[np.isfinite(reps)]
    p = min(1.0, 2.0 * (min(int((ok <= 0).sum()), int((ok >= 0).sum())) + 1) / (ok.size + 1))
    return {"se": out["se"], "ci": out["ci"], "p": p, "n_valid": out["n_valid"]}


# ----------------------------------------------------------------------------- AUC and ΔAUC

def weighted_auc(y_true, y_score, weights) -> float | np.ndarray:
    """AUC with each image counted `weights` times (ties half); weights (n,) or (B, n) gives a
    float or B values. Integer weights equal roc_auc on the repeated sample."""
    y = metrics._labels(y_true)
    s = metrics._scores(y_score, y.size)
    metrics._both_classes(y)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim not in (1, 2) or w.shape[-1] != y.size:
        raise ValueError(f"weights: expected shape ({y.size},) or (B, {y.size}), got {w.shape}")
    if not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError("weights: must be finite and >= 0")
    out = _auc_rows(_auc_plan(y, s, np.arange(y.size)), np.atleast_2d(w))
    return float(out[0]) if w.ndim == 1 else out


def cluster_bootstrap_auc(y_true, y_score, groups, n_boot: int = 2000, seed: int = 0,
                          level: float = 0.95) -> dict:
    """AUC with a patient-level bootstrap SE and percentile CI (covers test sampling only).
    Returns estimate, se, ci [low, high], n_valid, n_boot, n_patients, level."""
    _check_boot(n_boot, level)
    y, codes, strata = _prepare(y_true, groups)
    s = metrics._scores(y_score, y.size)
    plan = _auc_plan(y, s, codes)
    reps = [_auc_rows(plan, counts) for counts in _draws(strata, codes, n_boot, np.random.default_rng(seed))]
    out = _summary(metrics.roc_auc(y, s), np.concatenate(reps), level)
    return {**out, "n_boot": int(n_boot), "n_patients": int(codes.max()) + 1, "level": level}


def cluster_bootstrap_delta(y_true, score_a, score_b, groups, n_boot: int = 2000, seed: int = 0,
                            level: float = 0.95) -> dict:
    """Paired AUC_a - AUC_b of two scorers of the same images, patient-level bootstrap (test
    sampling only). Returns delta, auc_a, auc_b, se, ci, p, n_valid, n_boot, n_patients, level."""
    r = compare_arms(y_true, groups, score_a, score_b, n_boot=n_boot, seed=seed, level=level)
    keep = ("delta", "auc_a", "auc_b", "se", "ci", "p", "n_valid", "n_boot", "n_patients", "level")
    return {k: r[k] for k in keep}


def _delta_rows(aucs_a, aucs_b, draws_a, draws_b) -> tuple[np.ndarray, np.ndarray | None]:
    """Per replicate: (test-only delta, delta with seeds resampled too, or None if K < 2), from
    aucs (K, B) and draws (B, K) of seed indices per arm."""
    def seed_mean(aucs, draws):  # spread by sqrt(K/(K-1)) about the mean: the seeds add s^2/K
        k, mean = aucs.shape[0], aucs.mean(axis=0)
        spread = mean + math.sqrt(k / (k - 1)) * (aucs - mean)
        return np.take_along_axis(spread, draws.T, axis=0).mean(axis=0)

    test = aucs_a.mean(axis=0) - aucs_b.mean(axis=0)
    if min(aucs_a.shape[0], aucs_b.shape[0]) < 2:
        return test, None
    return test, seed_mean(aucs_a, draws_a) - seed_mean(aucs_b, draws_b)


def compare_arms(y_true, groups, scores_a, scores_b, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Arm a vs arm b, each scored by K training seeds on the same test images: scores (K, n).

    delta = mean over a's seeds of AUC - mean over b's seeds of AUC, with two intervals from the
    same patient draws: test_only (seeds fixed) and test_and_training (seeds resampled too; None
    unless both arms have K >= 2). se, ci, p, n_valid repeat the wider one, `covers` says which
    ("test+training" or "test"). p_delong: DeLong's paired test on the seed-averaged scores. Also
    auc_a, auc_b, auc_a_seeds, auc_b_seeds, k_a, k_b, n_boot, n_patients, level."""
    _check_boot(n_boot, level)
    y, codes, strata = _prepare(y_true, groups)
    a, b = _score_matrix(scores_a, y.size, "scores_a"), _score_matrix(scores_b, y.size, "scores_b")
    plans_a = [_auc_plan(y, s, codes) for s in a]
    plans_b = [_auc_plan(y, s, codes) for s in b]
    rng = np.random.default_rng(seed)
    test, both = [], []
    for counts in _draws(strata, codes, n_boot, rng):  # seeds drawn after each chunk's patients
        aucs_a = np.stack([_auc_rows(p, counts) for p in plans_a])
        aucs_b = np.stack([_auc_rows(p, counts) for p in plans_b])
        draws_a = rng.integers(0, a.shape[0], (len(counts), a.shape[0]))
        draws_b = rng.integers(0, b.shape[0], (len(counts), b.shape[0]))
        t, h = _delta_rows(aucs_a, aucs_b, draws_a, draws_b)
        test.append(t)
        both.append(h)
    seeds_a, seeds_b = [metrics.roc_auc(y, s) for s in a], [metrics.roc_auc(y, s) for s in b]
    delta = float(np.mean(seeds_a) - np.mean(seeds_b))
    test_only = _interval(delta, np.concatenate(test), level)
    with_training = None if both[0] is None else _interval(delta, np.concatenate(both), level)
    head = with_training or test_only
    return {"delta": delta, "auc_a": float(np.mean(seeds_a)), "auc_b": float(np.mean(seeds_b)),
            "auc_a_seeds": seeds_a, "auc_b_seeds": seeds_b, **head,
            "covers": "test+training" if with_training else "test",
            "test_only": test_only, "test_and_training": with_training,
            "p_delong": metrics.delong_test(y, a.mean(axis=0), b.mean(axis=0))[2],
            "k_a": a.shape[0], "k_b": b.shape[0], "n_boot": int(n_boot),
            "n_patients": int(codes.max()) + 1, "level": level}


# ----------------------------------------------------------------------------- Holm

def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input order: the i-th smallest of m times
    (m - i + 1), made non-decreasing in that order, capped at 1. Reject where adjusted <= alpha."""
    try:
        p = np.asarray(pvalues, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"pvalues: must be numbers ({e})") from e
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"pvalues: expected a non-empty 1-D list, got shape {p.shape}")
    if not (np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()):
        raise ValueError(f"pvalues: must be in [0, 1] and not NaN, got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    out = np.empty(m)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


# ----------------------------------------------------------------------------- operating points

def _roc_plan(y: np.ndarray, s: np.ndarray, codes: np.ndarray):
    """Sort once, highest score first: each class's patients in that order, and how many of
    each class score at or above each distinct threshold that can matter."""
    order = np.argsort(-s, kind="stable")
    z, yz = s[order], y[order]
    ends = np.append(np.flatnonzero(z[1:] != z[:-1]), z.size - 1)
    n_pos = np.cumsum(yz)[ends]
    n_neg = ends + 1 - n_pos
    # Inside a run of thresholds that each add one class only, the ROC points lie on one line
    # and none is a best operating point, whatever the weights: keep only the runs' ends.
    kind = (np.diff(n_pos, prepend=0) > 0) + 2 * (np.diff(n_neg, prepend=0) > 0)  # 1, 2, 3=both
    keep = (kind == 3) | np.append(kind[1:] != kind[:-1], True)
    return codes[order][yz], codes[order][~yz], n_pos[keep], n_neg[keep]


def _rates(class_codes: np.ndarray, upto: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B, G + 1) weighted TPR (or FPR) at each threshold, starting at 0."""
    c = _cumulative(counts, class_codes)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.take(c, upto, axis=1) / c[:, -1:].astype(np.float64)
    return np.concatenate([np.zeros((counts.shape[0], 1)), rates], axis=1)


def _pauc_above(tpr: np.ndarray, fpr: np.ndarray, min_tpr: float) -> np.ndarray:
    """Integral of (1 - FPR) dTPR over TPR >= min_tpr along the piecewise-linear ROC curve."""
    t0, t1, f0, f1 = tpr[:, :-1], tpr[:, 1:], fpr[:, :-1], fpr[:, 1:]
    lo, hi = np.maximum(t0, min_tpr), np.maximum(t1, min_tpr)
    rise = t1 - t0
    frac = np.divide(lo - t0, rise, out=np.zeros_like(rise), where=rise > 0)
    f_lo = f0 + (f1 - f0) * frac  # the curve's FPR where it crosses min_tpr
    return ((hi - lo) * (1.0 - 0.5 * (f_lo + f1))).sum(axis=1)


def _op_rows(plan, sq_err: np.ndarray, n_img: np.ndarray, counts: np.ndarray) -> dict:
    """Every operating point for each row of patient counts; NaN where a class has no weight."""
    pos_codes, neg_codes, n_pos, n_neg = plan
    tpr, fpr = _rates(pos_codes, n_pos, counts), _rates(neg_codes, n_neg, counts)
    bad = ~(np.isfinite(tpr).all(axis=1) & np.isfinite(fpr).all(axis=1))
    out = {"auc": 0.5 * ((fpr[:, 1:] - fpr[:, :-1]) * (tpr[:, 1:] + tpr[:, :-1])).sum(axis=1)}
    for s in (0.90, 0.95):
        out[f"sens_at_spec{round(100 * s)}"] = np.where(fpr <= 1 - s + _EPS, tpr, -1.0).max(1)
        out[f"spec_at_sens{round(100 * s)}"] = np.where(tpr >= s - _EPS, 1 - fpr, -1.0).max(1)
    out["pauc_sens80"] = _pauc_above(tpr, fpr, 0.8)
    out["brier"] = (counts @ sq_err) / (counts @ n_img)  # images weighted by their patient's draws
    for v in out.values():
        v[bad] = np.nan
    return out


def operating_points(y_true, prob, groups, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Clinical operating points of probabilities `prob`, each with a patient-level bootstrap SE
    and percentile CI (test sampling only). Keys auc, sens_at_spec90, sens_at_spec95,
    spec_at_sens90, spec_at_sens95, pauc_sens80, brier map to {estimate, se, ci, n_valid}; also
    n_boot, n_patients, level. Each is read at an attainable threshold, never interpolated:
    sensitivity at specificity s is the largest TPR with 1 - FPR >= s; specificity at sensitivity s
    the largest 1 - FPR with TPR >= s; pauc_sens80, the ISIC 2024 challenge's primary metric, is the
    integral of (1 - FPR) dTPR over TPR in [0.8, 1] along the piecewise-linear curve, in [0, 0.2]
    (0.2 perfect, 0.02 chance; the challenge's code flips labels and scores to get the same area);
    the Brier score is mean (p - y)^2 over images."""
    _check_boot(n_boot, level)
    y, codes, strata = _prepare(y_true, groups)
    p = metrics._scores(prob, y.size, "prob")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("prob: must be probabilities in [0, 1] (the Brier score needs them); "
                         "apply a sigmoid to logits first")
    n_pat = int(codes.max()) + 1
    plan = _roc_plan(y, p, codes)
    sq_err = np.bincount(codes, weights=(p - y) ** 2, minlength=n_pat)
    n_img = np.bincount(codes, minlength=n_pat).astype(np.float64)
    point = _op_rows(plan, sq_err, n_img, np.ones((1, n_pat), dtype=np.int64))
    reps = [_op_rows(plan, sq_err, n_img, counts)
            for counts in _draws(strata, codes, n_boot, np.random.default_rng(seed))]
    out = {k: _summary(point[k][0], np.concatenate([r[k] for r in reps]), level) for k in point}
    return {**out, "n_boot": int(n_boot), "n_patients": n_pat, "level": level}
