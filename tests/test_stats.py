"""melano.stats against loop oracles (reference/bootstrap.py), scikit-learn, DeLong and seeded
simulations with a known true AUC."""

import math
from statistics import NormalDist

import numpy as np
import pytest
import sklearn.metrics as skm

from melano import metrics, stats
from reference import bootstrap as ref
from reference import roc_auc as ref_auc


def clustered_case(seed, n_pos_pat=40, n_neg_pat=80, per_patient=4, levels=None, mixed=True):
    """Patients with a shared random effect; melanoma patients also have benign images when
    `mixed`. `levels` rounds the scores to that many values in [0, 1], for heavy ties."""
    rng = np.random.default_rng(seed)
    n_pat = n_pos_pat + n_neg_pat
    groups = np.repeat(np.arange(n_pat), rng.integers(1, 2 * per_patient, n_pat))
    y = groups < n_pos_pat
    if mixed:
        y &= rng.random(groups.size) < 0.6
        y[np.unique(groups[groups < n_pos_pat], return_index=True)[1]] = True
    s = y + rng.normal(size=n_pat)[groups] + 0.5 * rng.normal(size=groups.size)
    if levels:
        s = np.round((s - s.min()) / np.ptp(s) * (levels - 1)) / (levels - 1)
    return y.astype(int), s, groups


def as_prob(s):
    """Scores already in [0, 1] as they are (keeping their ties), others through a sigmoid."""
    return s if 0 <= s.min() and s.max() <= 1 else 1.0 / (1.0 + np.exp(-s))


def codes_and_counts(y, groups, n_boot, seed):
    _, codes, strata = stats._prepare(y, groups)
    counts = stats._draw_counts(strata, int(codes.max()) + 1, n_boot, np.random.default_rng(seed))
    return codes, strata, counts


# ----------------------------------------------------------------------------- weighted AUC

@pytest.mark.parametrize("levels", [None, 3, 12])
def test_weighted_auc_with_integer_weights_is_auc_of_repeated_sample(levels):
    y, s, _ = clustered_case(1, levels=levels)
    rng = np.random.default_rng(2)
    w = rng.integers(0, 4, (5, y.size))
    w[:, :2] = 1  # keep both classes: the case puts a positive first
    got = stats.weighted_auc(y, s, w)
    for row, g in zip(w, got):
        rep = np.repeat(np.arange(y.size), row)
        assert g == pytest.approx(metrics.roc_auc(y[rep], s[rep]), abs=1e-12)
        assert g == pytest.approx(ref_auc.auc(y[rep], s[rep]), abs=1e-12)
    assert stats.weighted_auc(y, s, w[0]) == got[0]
    assert stats.weighted_auc(y, s, np.ones(y.size)) == pytest.approx(metrics.roc_auc(y, s),
                                                                      abs=1e-12)


def test_weighted_auc_with_real_weights_matches_pairwise_definition():
    y, s, _ = clustered_case(3, levels=6)
    w = np.random.default_rng(4).random(y.size) * 3
    assert stats.weighted_auc(y, s, w) == pytest.approx(ref.weighted_auc(y, s, w), abs=1e-12)
    assert stats.weighted_auc(y, s, 2.5 * w) == pytest.approx(stats.weighted_auc(y, s, w),
                                                              abs=1e-12)


# ----------------------------------------------------------------------------- cluster bootstrap

def test_draws_resample_patients_within_strata():
    y, _, groups = clustered_case(5)
    codes, strata, counts = codes_and_counts(y, groups, 400, seed=6)
    has_pos, no_pos = strata
    assert np.all(np.bincount(codes, weights=y)[has_pos] > 0)
    assert np.all(np.bincount(codes, weights=y)[no_pos] == 0)
    np.testing.assert_array_equal(counts[:, has_pos].sum(axis=1), has_pos.size)
    np.testing.assert_array_equal(counts[:, no_pos].sum(axis=1), no_pos.size)
    # Each patient is drawn Binomial(P_s, 1/P_s) times: mean 1, variance 1 - 1/P_s.
    assert counts.mean() == pytest.approx(1.0, abs=0.01)
    assert counts[:, no_pos].var() == pytest.approx(1 - 1 / no_pos.size, rel=0.05)


@pytest.mark.parametrize("levels", [None, 4])
def test_replicate_aucs_match_loop_over_materialised_resamples(levels):
    y, s, groups = clustered_case(7, levels=levels)
    codes, _, counts = codes_and_counts(y, groups, 30, seed=8)
    got = stats._auc_rows(stats._auc_plan(y.astype(bool), s, codes), counts)
    np.testing.assert_allclose(got, ref.replicate_aucs(y, s, codes, counts), rtol=0, atol=1e-12)


def test_se_agrees_with_naive_loop_bootstrap_on_its_own_random_stream():
    y, s, groups = clustered_case(9)
    got = stats.cluster_bootstrap_auc(y, s, groups, n_boot=1500, seed=1)
    naive = ref.cluster_bootstrap_aucs(y, s, groups, n_boot=1500, seed=2, auc=metrics.roc_auc)
    # Two independent estimates of one SE, each with relative MC error ~ 1/sqrt(2B) = 1.8%.
    assert got["se"] == pytest.approx(naive.std(ddof=1), rel=0.1)
    assert got["ci"][0] < got["estimate"] < got["ci"][1]


def test_one_image_per_patient_se_agrees_with_delong():
    rng = np.random.default_rng(10)
    y = np.arange(600) % 3 == 0
    s = y + rng.normal(size=y.size)
    got = stats.cluster_bootstrap_auc(y, s, np.arange(y.size), n_boot=4000, seed=3)
    auc, low, high = metrics.delong_ci(y, s)
    delong_se = (high - low) / 2 / NormalDist().inv_cdf(0.975)
    assert got["estimate"] == auc
    # MC relative error of a bootstrap SE from 4000 replicates is 1.1%; 5% is 4.5 of those.
    assert got["se"] == pytest.approx(delong_se, rel=0.05)


def test_clustered_coverage_near_nominal_where_delong_falls_below():
    # Patients of one class each with 5 images sharing a random effect u ~ N(0, 1), image noise
    # N(0, 0.5^2), melanoma shift 1: the population AUC is Phi(1 / sqrt(2 (1 + 0.25))).
    true = NormalDist().cdf(1.0 / math.sqrt(2 * 1.25))
    rng = np.random.default_rng(11)
    groups = np.repeat(np.arange(180), 5)
    y = groups < 60
    n_sim, hits_boot, hits_delong = 250, 0, 0
    for i in range(n_sim):
        s = y + rng.normal(size=180)[groups] + 0.5 * rng.normal(size=groups.size)
        low, high = stats.cluster_bootstrap_auc(y, s, groups, n_boot=200, seed=i)["ci"]
        hits_boot += low <= true <= high
        _, low, high = metrics.delong_ci(y, s)
        hits_delong += low <= true <= high
    # Binomial MC SE at 95% coverage from 250 runs: 0.014.
    assert 0.90 <= hits_boot / n_sim <= 0.99
    assert hits_delong / n_sim < 0.80


def test_seeded_and_reproducible():
    y, s, groups = clustered_case(12)
    a = stats.cluster_bootstrap_auc(y, s, groups, n_boot=300, seed=5)
    assert stats.cluster_bootstrap_auc(y, s, groups, n_boot=300, seed=5) == a
    assert stats.cluster_bootstrap_auc(y, s, groups, n_boot=300, seed=6)["se"] != a["se"]
    assert set(a) == {"estimate", "se", "ci", "n_valid", "n_boot", "n_patients", "level"}
    assert a["n_valid"] == 300 and a["n_patients"] == 120
    # Patient ids as strings, in any order, give the same replicates.
    assert stats.cluster_bootstrap_auc(y, s, [f"p{g:03d}" for g in groups], n_boot=300,
                                       seed=5) == a


# ----------------------------------------------------------------------------- comparisons

def seeds_of(rng, y, base, shift, spread, k):
    """K seeds' scores: a shared image effect plus a seed-specific melanoma shift and noise."""
    return np.stack([(shift + spread * rng.normal()) * y + base + 0.3 * rng.normal(size=y.size)
                     for _ in range(k)])


@pytest.mark.parametrize("k_a,k_b", [(3, 2), (1, 1)])
def test_delta_replicates_match_loop_oracle(k_a, k_b):
    y, s, groups = clustered_case(13, levels=8)
    rng = np.random.default_rng(14)
    a, b = seeds_of(rng, y, s, 1, 0.3, k_a), seeds_of(rng, y, s, 0.5, 0.3, k_b)
    codes, _, counts = codes_and_counts(y, groups, 12, seed=15)
    draws_a, draws_b = rng.integers(0, k_a, (12, k_a)), rng.integers(0, k_b, (12, k_b))
    yb = y.astype(bool)
    aucs_a = np.stack([stats._auc_rows(stats._auc_plan(yb, x, codes), counts) for x in a])
    aucs_b = np.stack([stats._auc_rows(stats._auc_plan(yb, x, codes), counts) for x in b])
    test, both = stats._delta_rows(aucs_a, aucs_b, draws_a, draws_b)
    if k_a == 1:
        want, _ = ref.hierarchical_deltas(y, codes, a, b, counts, draws_a, draws_b)
        assert both is None
    else:
        want, want_both = ref.hierarchical_deltas(y, codes, a, b, counts, draws_a, draws_b)
        np.testing.assert_allclose(both, want_both, rtol=0, atol=1e-12)
    np.testing.assert_allclose(test, want, rtol=0, atol=1e-12)


def test_compare_arms_estimates_and_fields():
    y, s, groups = clustered_case(16)
    rng = np.random.default_rng(17)
    a, b = seeds_of(rng, y, s, 1.0, 0.3, 3), seeds_of(rng, y, s, 0.2, 0.3, 4)
    r = stats.compare_arms(y, groups, a, b, n_boot=500, seed=0)
    assert r["auc_a_seeds"] == [metrics.roc_auc(y, x) for x in a]
    assert r["delta"] == pytest.approx(np.mean(r["auc_a_seeds"]) - np.mean(r["auc_b_seeds"]))
    assert r["covers"] == "test+training" and (r["k_a"], r["k_b"]) == (3, 4)
    assert r["ci"] == r["test_and_training"]["ci"] and r["p"] == r["test_and_training"]["p"]
    assert r["p_delong"] == metrics.delong_test(y, a.mean(0), b.mean(0))[2]
    assert r["p"] == pytest.approx(2 / 501) and r["ci"][0] > 0  # a is clearly better
    # The training variance widens the interval: seeds differ far more than the paired test noise.
    assert r["test_and_training"]["se"] > 1.5 * r["test_only"]["se"]


def test_seed_level_adds_the_unbiased_between_seed_variance():
    # Var(with training) - Var(test only) should be s_a^2 / K_a + s_b^2 / K_b (ddof = 1), up to
    # the small seed x patient interaction that the crossed resampling counts twice.
    y, s, groups = clustered_case(18, n_pos_pat=150, n_neg_pat=300)
    rng = np.random.default_rng(19)
    a, b = seeds_of(rng, y, s, 1.0, 0.4, 3), seeds_of(rng, y, s, 0.5, 0.4, 3)
    r = stats.compare_arms(y, groups, a, b, n_boot=2000, seed=1)
    want = np.var(r["auc_a_seeds"], ddof=1) / 3 + np.var(r["auc_b_seeds"], ddof=1) / 3
    got = r["test_and_training"]["se"] ** 2 - r["test_only"]["se"] ** 2
    assert got == pytest.approx(want, rel=0.15)


def test_identical_arms_give_zero_delta_and_p_one():
    y, s, groups = clustered_case(20)
    r = stats.compare_arms(y, groups, np.stack([s, 2 * s]), np.stack([s + 1, s]), n_boot=200)
    assert r["delta"] == 0 and r["p"] == 1.0 and r["ci"] == [0.0, 0.0]
    d = stats.cluster_bootstrap_delta(y, s, s, groups, n_boot=200)
    assert (d["delta"], d["p"], d["se"]) == (0.0, 1.0, 0.0)


def test_hierarchical_interval_covers_training_variance():
    # Each arm's K = 5 seeds draw a melanoma shift ~ N(mu, 0.2^2) and add N(0, 0.3^2) noise; the
    # images share patient (1) and image (0.5) effects. The arm's expected AUC is
    # Phi(mu / sqrt(c^2 + 2 tau^2)) with c^2 = 2 (1 + 0.25 + 0.09), so the true delta is known.
    nd, tau = NormalDist(), 0.2
    scale = math.sqrt(2 * (1 + 0.25 + 0.09) + 2 * tau ** 2)
    true = nd.cdf(1.0 / scale) - nd.cdf(0.8 / scale)
    rng = np.random.default_rng(21)
    groups = np.repeat(np.arange(120), 4)
    y = groups < 40
    n_sim, hits_test, hits_both = 150, 0, 0
    for i in range(n_sim):
        base = rng.normal(size=120)[groups] + 0.5 * rng.normal(size=groups.size)
        a, b = seeds_of(rng, y, base, 1.0, tau, 5), seeds_of(rng, y, base, 0.8, tau, 5)
        r = stats.compare_arms(y, groups, a, b, n_boot=150, seed=i)
        hits_test += r["test_only"]["ci"][0] <= true <= r["test_only"]["ci"][1]
        hits_both += r["ci"][0] <= true <= r["ci"][1]
    # With 5 seeds the seed variance rests on 4 df per arm: about 0.90 (MC SE 0.025), not 0.95.
    assert hits_both / n_sim >= 0.82
    assert hits_test / n_sim <= 0.6


# ----------------------------------------------------------------------------- Holm

def holm_by_steps(p, alpha):
    """Holm's procedure as written: reject the smallest while p_(i) <= alpha / (m - i + 1)."""
    order = np.argsort(p, kind="stable")
    rejected = np.zeros(len(p), dtype=bool)
    for i, j in enumerate(order):
        if p[j] > alpha / (len(p) - i):
            break
        rejected[j] = True
    return rejected


def test_holm_hand_computation():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; running max
    # makes the last 0.06.
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(stats.holm([0.5, 0.6, 0.01]), [1.0, 1.0, 0.03])
    np.testing.assert_allclose(stats.holm([0.02]), [0.02])
    np.testing.assert_allclose(stats.holm([0.2, 0.2, 0.2]), [0.6, 0.6, 0.6])


def test_holm_matches_step_down_procedure_and_is_monotone():
    rng = np.random.default_rng(22)
    for _ in range(200):
        p = rng.random(rng.integers(1, 8)) ** 3
        adj = stats.holm(p)
        assert np.all(adj >= p) and np.all(adj <= 1)
        order = np.argsort(p, kind="stable")
        assert np.all(np.diff(adj[order]) >= 0)
        for alpha in (0.01, 0.05, 0.2):
            np.testing.assert_array_equal(adj <= alpha, holm_by_steps(p, alpha))


def test_holm_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(23).random(6) ** 2
    np.testing.assert_allclose(stats.holm(p), multitest.multipletests(p, method="holm")[1])


# ----------------------------------------------------------------------------- operating points

def isic_pauc(y, prob, min_tpr=0.8):
    """The ISIC 2024 challenge's pAUC via scikit-learn: flip labels and scores, then the area
    under the flipped ROC curve up to FPR = 1 - min_tpr, interpolating one point at that FPR."""
    max_fpr = 1 - min_tpr
    fpr, tpr, _ = skm.roc_curve(1 - np.asarray(y), 1 - np.asarray(prob))
    stop = np.searchsorted(fpr, max_fpr, "right")
    end = np.interp(max_fpr, fpr[stop - 1:stop + 1], tpr[stop - 1:stop + 1])
    return skm.auc(np.append(fpr[:stop], max_fpr), np.append(tpr[:stop], end))


def sklearn_points(y, prob):
    fpr, tpr, _ = skm.roc_curve(y, prob, drop_intermediate=False)
    out = {"auc": skm.roc_auc_score(y, prob), "pauc_sens80": isic_pauc(y, prob),
           "brier": skm.brier_score_loss(y, prob)}
    for t in (90, 95):
        out[f"sens_at_spec{t}"] = tpr[1 - fpr >= t / 100 - 1e-12].max()
        out[f"spec_at_sens{t}"] = (1 - fpr[tpr >= t / 100 - 1e-12]).max()
    return out


OP_CASES = [clustered_case(24), clustered_case(25, levels=5), clustered_case(26, levels=40),
            clustered_case(27, n_pos_pat=10, n_neg_pat=200, mixed=False)]


@pytest.mark.parametrize("y,s,groups", OP_CASES)
def test_operating_points_match_sklearn(y, s, groups):
    prob = as_prob(s)
    got = stats.operating_points(y, prob, groups, n_boot=50, seed=0)
    want = sklearn_points(y, prob)
    for key, value in want.items():
        assert got[key]["estimate"] == pytest.approx(value, abs=1e-12), key
        low, high = got[key]["ci"]
        assert low <= high and got[key]["se"] >= 0
    assert 0 <= got["pauc_sens80"]["estimate"] <= 0.2


def test_operating_point_replicates_match_sklearn_on_materialised_resamples():
    y, s, groups = clustered_case(28, levels=30)
    prob = s
    codes, _, counts = codes_and_counts(y, groups, 15, seed=29)
    plan = stats._roc_plan(y.astype(bool), prob, codes)
    sq_err = np.bincount(codes, weights=(prob - y) ** 2)
    rows = stats._op_rows(plan, sq_err, np.bincount(codes).astype(float), counts)
    for b, row in enumerate(counts):
        idx = ref.resample(codes, row)
        for key, value in sklearn_points(y[idx], prob[idx]).items():
            assert rows[key][b] == pytest.approx(value, abs=1e-12), (b, key)


def test_pauc_bounds():
    y = np.arange(200) % 4 == 0
    g = np.arange(200) // 2
    perfect = stats.operating_points(y, y * 0.8 + 0.1, g, n_boot=20)
    assert perfect["pauc_sens80"]["estimate"] == pytest.approx(0.2)
    assert perfect["sens_at_spec95"]["estimate"] == 1
    assert perfect["brier"]["estimate"] == pytest.approx(0.01)
    chance = stats.operating_points(y, np.full(200, 0.3), g, n_boot=20)
    assert chance["pauc_sens80"]["estimate"] == pytest.approx(0.02)  # area under the diagonal
    assert chance["auc"]["estimate"] == 0.5 and chance["sens_at_spec90"]["estimate"] == 0
    worst = stats.operating_points(y, 0.9 - y * 0.8, g, n_boot=20)
    assert worst["pauc_sens80"]["estimate"] == pytest.approx(0.0)


def test_operating_points_on_the_boundary_by_hand():
    # 20 benign (2 at 0.95, the rest low) and 10 melanomas (9 at 0.9, 1 at 0.05). At threshold
    # 0.9: TPR = 9/10 and FPR = 2/20, so specificity is exactly 0.90 and sensitivity exactly 0.90.
    prob = np.r_[[0.95, 0.95], np.linspace(0.1, 0.5, 18), [0.9] * 9, [0.05]]
    y = np.r_[np.zeros(20), np.ones(10)]
    r = stats.operating_points(y, prob, np.arange(30), n_boot=20)
    assert r["sens_at_spec90"]["estimate"] == 0.9 and r["spec_at_sens90"]["estimate"] == 0.9
    assert r["sens_at_spec95"]["estimate"] == 0.0  # only the top threshold has FPR <= 0.05
    assert r["spec_at_sens95"]["estimate"] == 0.0  # TPR 1 needs the 0.05 melanoma: FPR 1
    want = sklearn_points(y, prob)
    assert all(r[k]["estimate"] == pytest.approx(v, abs=1e-12) for k, v in want.items())


def test_operating_points_fields_and_same_draws_as_the_auc_bootstrap():
    y, s, groups = clustered_case(30)
    r = stats.operating_points(y, as_prob(s), groups, n_boot=400, seed=1)
    keys = {"auc", "sens_at_spec90", "sens_at_spec95", "spec_at_sens90", "spec_at_sens95",
            "pauc_sens80", "brier"}
    assert set(r) == keys | {"n_boot", "n_patients", "level"}
    assert all(set(r[k]) == {"estimate", "se", "ci", "n_valid"} for k in keys)
    auc = stats.cluster_bootstrap_auc(y, s, groups, n_boot=400, seed=1)
    assert r["auc"]["estimate"] == pytest.approx(auc["estimate"], abs=1e-12)
    # Same draws (same seed, same chunking), and the ROC trapezoid is the same AUC.
    assert r["auc"]["se"] == pytest.approx(auc["se"], rel=1e-9)


# ----------------------------------------------------------------------------- bad input

Y, S, G = [0, 1, 0, 1, 0, 1], [0.1, 0.8, 0.3, 0.6, 0.2, 0.9], [1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("y,s,g,match", [
    ([0] * 6, S, G, "only class 0"),
    (Y, S[:5], G, "has 5 scores but y_true has 6"),
    (Y, S[:5] + [float("nan")], G, "finite"),
    (Y, S, G[:5], "groups: has 5 entries but y_true has 6"),
    (Y, S, [1, 1, 2, float("nan"), 3, 3], "groups: patient ids must not be NaN"),
    (Y, S, np.array([1, "a", 2, 2, 3, 3], dtype=object), "groups: patient ids must be all"),
    ([0, 1, 2, 1, 0, 1], S, G, "must be 0 or 1"),
])
def test_bad_input_raises(y, s, g, match):
    calls = [lambda: stats.cluster_bootstrap_auc(y, s, g, n_boot=10),
             lambda: stats.cluster_bootstrap_delta(y, s, s, g, n_boot=10),
             lambda: stats.compare_arms(y, g, [s, s], [s], n_boot=10),
             lambda: stats.operating_points(y, s, g, n_boot=10)]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()


def test_bad_options_raise():
    with pytest.raises(ValueError, match="n_boot"):
        stats.cluster_bootstrap_auc(Y, S, G, n_boot=5)
    with pytest.raises(ValueError, match="level"):
        stats.operating_points(Y, S, G, level=95)
    with pytest.raises(ValueError, match=r"scores_b: expected shape \(seeds, 6\)"):
        stats.compare_arms(Y, G, [S], np.zeros((2, 3, 6)))
    with pytest.raises(ValueError, match="scores_a"):
        stats.compare_arms(Y, G, [S, S[:5] + [0.5, 0.5]], [S])
    with pytest.raises(ValueError, match="prob: must be probabilities"):
        stats.operating_points(Y, [2.0] + S[1:], G)
    with pytest.raises(ValueError, match=r"weights: expected shape \(6,\)"):
        stats.weighted_auc(Y, S, [1, 2])
    with pytest.raises(ValueError, match="weights: must be finite"):
        stats.weighted_auc(Y, S, [1, -1, 1, 1, 1, 1])
    for bad in ([0.1, float("nan")], [0.1, 1.2], [], [[0.1]], ["a"]):
        with pytest.raises(ValueError, match="pvalues"):
            stats.holm(bad)
