"""melano.metrics against scikit-learn and the O(m*k) definitions in reference/roc_auc.py."""

import math

import numpy as np
import pytest
import sklearn.metrics as skm
import torch

from melano import metrics
from reference import roc_auc as ref


def random_case(seed, n, n_levels=None, pos_frac=0.3):
    """Labels with both classes, and scores with heavy ties when n_levels is small."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < pos_frac
    y[0], y[1] = True, False
    if n_levels:
        s = rng.integers(0, n_levels, n).astype(np.float64) + 0.7 * y * rng.random(n).round()
    else:
        s = rng.normal(size=n) + y
    return y.astype(int), s


CASES = [random_case(seed, n, lv) for seed, (n, lv) in enumerate(
    [(2, None), (3, 2), (5, 1), (10, 3), (57, 4), (300, None), (1000, 5), (2000, 50), (4000, None)])]


@pytest.mark.parametrize("y,s", CASES)
def test_roc_auc_matches_reference_and_sklearn(y, s):
    got = metrics.roc_auc(y, s)
    assert got == pytest.approx(ref.auc(y, s), abs=1e-12)
    assert got == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("y,s", CASES)
def test_roc_curve_matches_sklearn(y, s):
    fpr, tpr, thr = metrics.roc_curve(y, s)
    sfpr, stpr, sthr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sfpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, stpr, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(thr[1:], sthr[1:])
    assert thr[0] == np.inf and sthr[0] >= s.max()
    # The trapezoidal area under the curve is the AUC: ties count half.
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.roc_auc(y, s), abs=1e-12)


def test_midrank_matches_definition():
    x = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
    np.testing.assert_array_equal(metrics.midrank(x), [5, 1.5, 5, 3, 5, 1.5])


@pytest.mark.parametrize("y,s", [c for c in CASES if min(c[0].sum(), (1 - c[0]).sum()) >= 2])
def test_delong_variance_matches_reference(y, s):
    auc, low, high = metrics.delong_ci(y, s, level=0.9)
    aucs, cov = ref.delong_covariance(y, s)
    assert auc == pytest.approx(aucs[0], abs=1e-12)
    z = 1.6448536269514722  # two-sided 90%
    half = z * math.sqrt(cov[0, 0])
    assert low == pytest.approx(max(0.0, auc - half), abs=1e-9)
    assert high == pytest.approx(min(1.0, auc + half), abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_delong_test_matches_reference(seed):
    y, a = random_case(seed, 400, n_levels=6 if seed % 2 else None)
    rng = np.random.default_rng(100 + seed)
    b = a + rng.normal(scale=1.5, size=a.size)
    auc_a, auc_b, p = metrics.delong_test(y, a, b)
    aucs, _ = ref.delong_covariance(y, a, b)
    assert (auc_a, auc_b) == pytest.approx(tuple(aucs), abs=1e-12)
    assert p == pytest.approx(ref.delong_p_value(y, a, b), abs=1e-9)
    # Swapping the scorers swaps the AUCs and leaves the two-sided p unchanged.
    assert metrics.delong_test(y, b, a) == pytest.approx((auc_b, auc_a, p), abs=1e-12)


def test_delong_test_identical_scorers_has_p_one():
    y, s = random_case(3, 200)
    assert metrics.delong_test(y, s, s)[2] == 1.0
    assert metrics.delong_test(y, s, 2 * s + 1)[2] == 1.0  # same ranking, same AUC


def test_delong_test_detects_a_real_difference():
    rng = np.random.default_rng(7)
    y = rng.random(3000) < 0.2
    good = y * 2.0 + rng.normal(size=y.size)
    poor = y * 0.3 + rng.normal(size=y.size)
    assert metrics.delong_test(y, good, poor)[2] < 1e-10


def test_published_example_hanley_mcneil_1982():
    # Hanley & McNeil (1982), Radiology 143:29, Table 1: CT ratings 1..5 of 58 normal and 51
    # abnormal patients. Published: area 0.893, standard error 0.032 (their own approximation;
    # DeLong's nonparametric SE of the same data is close to it, not equal).
    neg = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2])
    pos = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])
    y = np.r_[np.zeros(neg.size), np.ones(pos.size)]
    s = np.r_[neg, pos].astype(float)
    assert round(metrics.roc_auc(y, s), 3) == 0.893
    auc, low, high = metrics.delong_ci(y, s)
    se = (high - low) / 2 / 1.959963984540054
    assert abs(se - 0.032) < 0.003


def test_accepted_input_types():
    y, s = random_case(11, 200)
    want = metrics.roc_auc(y, s)
    assert metrics.roc_auc(y.tolist(), s.tolist()) == want
    assert metrics.roc_auc(y.astype(bool), s) == want
    assert metrics.roc_auc(y.astype(np.float32), s) == want
    assert metrics.roc_auc(torch.tensor(y), torch.tensor(s)) == want
    assert metrics.roc_auc(torch.tensor(y, dtype=torch.bool), torch.tensor(s)) == want
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = torch.tensor(s).to(dtype)
        assert metrics.roc_auc(y, t) == pytest.approx(skm.roc_auc_score(y, t.double().numpy()),
                                                      abs=1e-12)
    if torch.cuda.is_available():
        assert metrics.roc_auc(torch.tensor(y).cuda(), torch.tensor(s).cuda()) == want


def test_accumulates_in_float64_on_large_input():
    # 1e6 scores that all tie: exactly 0.5, no float32 rounding in the rank sums.
    y = np.arange(1_000_000) % 3 == 0
    assert metrics.roc_auc(y, np.zeros(y.size, dtype=np.float32)) == 0.5


@pytest.mark.parametrize("y,s,match", [
    ([0, 0, 0], [0.1, 0.2, 0.3], "only class 0"),
    ([1, 1], [0.1, 0.2], "only class 1"),
    ([0, 1, 1], [0.1, 0.2], "has 2 scores but y_true has 3"),
    ([0, 1, 1], [0.1, float("nan"), 0.3], "finite"),
    ([0, 1, 1], [0.1, float("inf"), 0.3], "finite"),
    ([0, 1, 2], [0.1, 0.2, 0.3], "must be 0 or 1"),
    ([0, 1, -1], [0.1, 0.2, 0.3], "must be 0 or 1"),
    ([], [], "empty"),
    ([[0, 1], [1, 0]], [[0.1, 0.2], [0.3, 0.4]], "1-D"),
    (["a", "b"], [0.1, 0.2], "dtype"),
])
def test_bad_input_raises(y, s, match):
    for fn in (metrics.roc_auc, metrics.roc_curve, metrics.delong_ci):
        with pytest.raises(ValueError, match=match):
            fn(y, s)
    with pytest.raises(ValueError, match=match.replace("y_score", "score_a")):
        metrics.delong_test(y, s, s)


def test_delong_needs_two_of_each_class():
    with pytest.raises(ValueError, match="at least 2 positives"):
        metrics.delong_ci([0, 0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="level"):
        metrics.delong_ci([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], level=1.5)
