"""melano.quality: every metric against an independent oracle (scipy, scikit-learn, reference/kid.py,
closed forms), and `evaluate` end to end on the built-in data with translations whose effect is known."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.linalg import sqrtm
from scipy.ndimage import uniform_filter
from scipy.spatial.distance import cdist
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import roc_auc_score
from sklearn.metrics.pairwise import polynomial_kernel
from sklearn.preprocessing import StandardScaler

from PIL import Image

from melano import data, encode, quality, quality_stage, report, synth
from melano.pretrained import efficientnet
from reference import kid as kid_ref


def scipy_fd(x, y):
    """The usual FID formula, with scipy's general matrix square root."""
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = sqrtm(s1 @ s2).real
    d = x.mean(0) - y.mean(0)
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


# ----------------------------------------------------------------------------- Fréchet distance

@pytest.mark.parametrize("n,m,d", [(200, 150, 6), (30, 45, 80), (45, 30, 80)])
def test_frechet_matches_scipy_sqrtm(n, m, d):
    """Both paths: covariances when n > d, the small Gram matrix when n < d."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(d, d))
    x = rng.normal(size=(n, d)) @ mix
    y = rng.normal(size=(m, d)) @ (mix + 0.3 * rng.normal(size=(d, d))) + 0.5
    assert quality.frechet_distance(x, y) == pytest.approx(scipy_fd(x, y), rel=1e-6, abs=1e-6)


def test_frechet_from_moments_matches_scipy_on_rank_deficient_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 3)), rng.normal(size=(10, 4))  # ranks 3 and 4 in 10 dimensions
    s1, s2 = a @ a.T, b @ b.T
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert quality.frechet_from_moments(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_frechet_gaussian_closed_form():
    """2-D Gaussians: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2 (positive eigenvalues)."""
    mu1, mu2 = np.array([0.0, 1.0]), np.array([2.0, -1.0])
    s1 = np.array([[2.0, 0.6], [0.6, 1.0]])
    s2 = np.array([[1.0, -0.4], [-0.4, 3.0]])
    tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    exact = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert quality.frechet_from_moments(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-12)
    # and from samples of those Gaussians
    rng = np.random.default_rng(2)
    x = rng.multivariate_normal(mu1, s1, 200_000)
    y = rng.multivariate_normal(mu2, s2, 200_000)
    assert quality.frechet_distance(x, y) == pytest.approx(exact, rel=0.02)
    assert quality.frechet_from_moments(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)


def test_frechet_refuses_mismatched_sets():
    with pytest.raises(ValueError, match="same d"):
        quality.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


# ----------------------------------------------------------------------------- KID

def test_kid_matches_loop_oracle():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(14, 5))
    y = rng.normal(size=(11, 5)) * 1.3 + 0.4
    got = quality.kid(x, y, subset_size=50, n_subsets=6, seed=4)
    assert got["subset_size"] == 11  # never larger than the smaller set
    subsets = quality.kid_subsets(len(x), len(y), 50, 6, seed=4)
    mean, sd = kid_ref.kid(x, y, subsets)
    assert got["mean"] == pytest.approx(mean, rel=1e-10) and got["sd"] == pytest.approx(sd, rel=1e-10)
    # the kernel is scikit-learn's polynomial kernel of degree 3, gamma 1/d, coef0 1
    k = polynomial_kernel(x, y, degree=3, gamma=1 / 5, coef0=1)
    assert np.allclose(quality.polynomial_kernel(x, y), k)


def test_kid_separates_distributions_and_is_unbiased():
    rng = np.random.default_rng(5)
    same = [quality.kid(rng.normal(size=(100, 8)), rng.normal(size=(100, 8)), 100, 1)["mean"] for _ in range(60)]
    shifted = quality.kid(rng.normal(size=(100, 8)), rng.normal(size=(100, 8)) + 0.5, 50, 20)
    # unbiased: over many pairs of samples of one distribution the mean is zero (within 4 standard errors)
    assert abs(np.mean(same)) < 4 * np.std(same) / math.sqrt(len(same))
    assert min(same) < 0  # an unbiased estimate of 0 goes negative
    assert shifted["mean"] > 10 * np.std(same)


# ----------------------------------------------------------------------------- logistic regression, two-sample test

@pytest.mark.parametrize("n,d,l2", [(300, 10, 2.0), (80, 200, 100.0)])
def test_logistic_matches_sklearn(n, d, l2):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + rng.normal(size=d)
    y = (x[:, 0] - 0.5 * x[:, 1] + rng.normal(size=n) > 0).astype(int)
    ours = quality.fit_logistic(x, y, l2=l2, tol=1e-10)
    xs = StandardScaler().fit_transform(x)
    sk = LogisticRegression(C=1 / l2, tol=1e-12, max_iter=100_000).fit(xs, y)
    assert np.allclose(ours.coef, sk.coef_[0], rtol=1e-4, atol=1e-6)
    assert ours.intercept == pytest.approx(sk.intercept_[0], rel=1e-4, abs=1e-6)
    assert np.allclose(quality.predict(ours, x), sk.decision_function(xs), rtol=1e-4, atol=1e-5)


def test_grouped_folds_keep_groups_together_and_balance_classes():
    rng = np.random.default_rng(7)
    groups = rng.integers(0, 60, 400)
    labels = rng.random(400) < 0.3
    fold = quality.grouped_folds(groups, labels, k=5, seed=0)
    for g in np.unique(groups):
        assert len(np.unique(fold[groups == g])) == 1
    for c in (0, 1):
        counts = np.bincount(fold[labels == c], minlength=5)
        assert counts.max() - counts.min() <= 0.25 * counts.mean()
    with pytest.raises(ValueError, match="fewer folds"):
        quality.grouped_folds([1, 1, 2], [0, 1, 0], k=5)


def test_two_sample_auc_detects_differences_and_respects_patients():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(200, 20)), rng.normal(size=(200, 20))
    ga, gb = np.arange(200), np.arange(200, 400)
    null = quality.two_sample_auc(a, b, ga, gb, l2=10.0)
    assert abs(null["auc"] - 0.5) < 0.1
    assert quality.two_sample_auc(a, b + 0.6, ga, gb, l2=10.0)["auc"] > 0.9  # Bayes AUC 0.97
    # 40 patients per set, each with a strong look of its own and no difference between the sets:
    # with image-level folds the model learns the patients and "detects" a difference; patient-grouped
    # folds do not (held-out patients even land a little below chance: the usual small-sample CV bias).
    looks = rng.normal(size=(80, 60)) * 3
    pa, pb = np.repeat(np.arange(40), 5), np.repeat(np.arange(40, 80), 5)
    a, b = looks[pa] + rng.normal(size=(200, 60)), looks[pb] + rng.normal(size=(200, 60))
    leaky = quality.two_sample_auc(a, b, np.arange(200), np.arange(200, 400), l2=1.0)
    grouped = quality.two_sample_auc(a, b, pa, pb, l2=1.0)
    assert leaky["auc"] > 0.8 and grouped["auc"] < 0.6


# ----------------------------------------------------------------------------- translation success

def test_translation_success_threshold_and_fractions():
    rng = np.random.default_rng(9)
    val = rng.normal(size=300) + 1.5 * (labels := rng.random(300) < 0.3)
    src = rng.normal(size=50)
    trans = src + 1.0 + 0.1 * rng.normal(size=50)
    got = quality.translation_success(val, labels, trans, src, sensitivity=0.9)
    mel = val[labels]
    # brute force: the largest threshold among the melanoma logits that flags >= 90% of them
    best = max(t for t in mel if (mel >= t).mean() >= 0.9)
    assert got["threshold"] == best and got["val_sensitivity"] >= 0.9
    assert got["val_specificity"] == pytest.approx((val[~labels] < best).mean())
    assert got["fraction_translations_above"] == pytest.approx((trans >= best).mean())
    assert got["fraction_sources_above"] == pytest.approx((src >= best).mean())
    assert got["mean_logit_shift"] == pytest.approx((trans - src).mean())
    assert got["fraction_shift_positive"] == 1.0
    with pytest.raises(ValueError, match="must match"):
        quality.translation_success(val, labels, trans, src[:-1])


# ----------------------------------------------------------------------------- ground truth

def test_hidden_severity_recovers_the_generator_and_skips_other_folders(tmp_path):
    rows = synth.generate(synth.SynthConfig(out=str(tmp_path / "s"), benign=30, malignant=10, size=16, seed=5))
    got = quality_stage.hidden_severity(tmp_path / "s")
    expected = synth.latent_severity(rows, 5, synth.DEFAULT_DIFFICULTY)
    assert [got[r["image_name"]] for r in rows] == expected.tolist()
    # the same images without the truth file, as a real ISIC folder would be: no ground truth
    shutil.copytree(tmp_path / "s", tmp_path / "isic")
    (tmp_path / "isic" / synth.CRITERIA_CSV).unlink()
    assert quality_stage.hidden_severity(tmp_path / "isic") is None
    # a folder edited after generation (a label flipped) is refused, not silently mismatched
    csv_path = tmp_path / "s" / "train.csv"
    lines = csv_path.read_text().splitlines()
    cells = lines[1].split(",")
    cells[-1] = "1" if cells[-1] == "0" else "0"
    cells[-2] = "malignant" if cells[-1] == "1" else "benign"
    csv_path.write_text("\n".join([lines[0], ",".join(cells)] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match="not the one"):
        quality_stage.hidden_severity(tmp_path / "s")


def test_ridge_matches_sklearn_ridgecv():
    rng = np.random.default_rng(10)
    for n, d in ((120, 15), (60, 200)):
        x = rng.normal(size=(n, d)) * rng.uniform(0.5, 2, d)
        y = x[:, :3] @ np.array([1.0, -2.0, 0.5]) + rng.normal(size=n)
        alphas = tuple(10.0 ** np.arange(-2, 5, 0.5))
        ours = quality.fit_ridge(x, y, alphas)
        xs = StandardScaler().fit_transform(x)
        sk = RidgeCV(alphas=alphas).fit(xs, y)
        assert ours.alpha == sk.alpha_
        assert np.allclose(ours.coef, sk.coef_, rtol=1e-6, atol=1e-9)
        assert np.allclose(quality.predict(ours, x), sk.predict(xs), atol=1e-8)
    assert quality.r2_score([1, 2, 3], [1, 2, 3]) == 1.0


# ----------------------------------------------------------------------------- criterion probe, GAN runs

def test_probe_auc_matches_sklearn_and_says_when_it_cannot_see():
    """A criterion linear in the features is seen (AUC as scikit-learn's logistic regression gets it);
    one independent of them is not ("cannot see": AUC below 0.7)."""
    rng = np.random.default_rng(20)
    x = rng.normal(size=(400, 30)) * rng.uniform(0.5, 2, 30)
    visible = (x[:, 0] - x[:, 1] + 0.5 * rng.normal(size=400) > 0.3).astype(int)
    invisible = (rng.random(400) < 0.3).astype(int)
    train, val = slice(0, 250), slice(250, None)
    for y, seen in ((visible, True), (invisible, False)):
        probe = quality.fit_probe(x[train], y[train], x[val], y[val], l2=10.0, min_auc=0.7)
        scaler = StandardScaler().fit(x[train])
        sk = LogisticRegression(C=1 / 10.0, tol=1e-10, max_iter=10_000).fit(scaler.transform(x[train]), y[train])
        expected = roc_auc_score(y[val], sk.decision_function(scaler.transform(x[val])))
        assert probe.auc_val == pytest.approx(expected, abs=2e-3)
        assert probe.can_see == seen and (probe.auc_val > 0.9 if seen else probe.auc_val < 0.7)
        # the threshold flags as many validation images as truly show the criterion
        assert quality.probe_present(probe, x[val]).sum() == y[val].sum()


def test_paired_change_and_seven_point_score_by_hand():
    before = np.array([0, 0, 1, 1, 0, 0, 1, 0])
    after = np.array([1, 0, 1, 0, 1, 1, 1, 0])
    got = quality.paired_change(after, before)
    diff = [1, 0, 0, -1, 1, 1, 0, 0]  # mean 2/8; sd^2 = (sum d^2 - n mean^2) / (n - 1) = (4 - 0.5) / 7
    mean, sd = 0.25, math.sqrt(3.5 / 7)
    assert got["mean"] == pytest.approx(np.mean(diff)) == pytest.approx(mean)
    assert got["sd"] == pytest.approx(sd)
    assert got["ci"] == pytest.approx([mean - 1.959964 * sd / math.sqrt(8), mean + 1.959964 * sd / math.sqrt(8)])
    assert (got["gained"], got["lost"], got["n"]) == (3, 1, 8)
    same = quality.paired_change(before, before)
    assert same["ci"] == [0.0, 0.0]
    # Argenziano's weights: network 2, regression 1; multicolour is not a 7-point criterion
    score = quality.seven_point_score({"atypical_network": [1, 0, 1], "regression": [1, 1, 0],
                                       "multicolour": [1, 1, 1]})
    assert score.tolist() == [3, 1, 2]


def test_runs_group_by_arm_and_average_like_numpy():
    keys = ["cyclegan_g1", "cyclegan_ls_g0", "cyclegan_g0", "cyclegan_g10", "cyclegan_g2", "oversample"]
    assert quality.group_runs(keys) == {"cyclegan": ["cyclegan_g0", "cyclegan_g1", "cyclegan_g2", "cyclegan_g10"],
                                        "cyclegan_ls": ["cyclegan_ls_g0"], "oversample": ["oversample"]}
    assert quality.run_arm("cyclegan_ls_g3") == "cyclegan_ls" and quality.run_index("cyclegan_ls_g3") == 3
    runs = [{"fd": 3.0, "kid": 0.1, "only_some": 1.0}, {"fd": 5.0, "kid": 0.4}, {"fd": 10.0, "kid": 0.2}]
    mean, sd = quality.mean_sd_over_runs(runs)
    assert set(mean) == set(sd) == {"fd", "kid"}  # a figure not in every run is left out
    for k in mean:
        v = np.array([r[k] for r in runs])
        assert mean[k] == pytest.approx(v.mean()) and sd[k] == pytest.approx(v.std(ddof=1))
    assert quality.mean_sd_over_runs(runs[1:2]) == ({"fd": 5.0, "kid": 0.4}, {"fd": 0.0, "kid": 0.0})  # one run: sd 0
    assert quality_stage.picture_names("cyclegan_g1") == {} and "criteria" in quality_stage.picture_names("cyclegan_g0")


def test_structure_sentence_follows_the_numbers():
    """A structure is added when the probe sees it and its CI is above 0 in every run; a probe that
    cannot see draws no conclusion; nothing added -> at most a tint, with the measured colour shift."""
    def arm_runs(cis: dict, shift: float) -> dict:
        crit = {c: {"change": {"ci": ci}} for c, ci in cis.items()}
        return {"criteria": {"criteria": crit, "seven_point": {"change": {"ci": [-1.0, 1.0]}}}, "shift": shift}
    probe = {"malignant_structures": ["blue_white_veil", "atypical_network", "regression", "multicolour"],
             "short_names": {"blue_white_veil": "veil", "atypical_network": "network", "regression": "regression",
                             "multicolour": "multicolour"}, "min_auc": 0.7,
             "criteria": {"blue_white_veil": {"can_see": True}, "atypical_network": {"can_see": True},
                          "regression": {"can_see": False}, "multicolour": {"can_see": True}}}
    up, zero, down = [0.1, 0.3], [-0.1, 0.2], [-0.3, -0.05]
    arms = {"a_g0": arm_runs({"blue_white_veil": up, "atypical_network": zero, "multicolour": up}, 3.0),
            "a_g1": arm_runs({"blue_white_veil": up, "atypical_network": zero, "multicolour": zero}, 5.0),
            "b": arm_runs({"blue_white_veil": zero, "atypical_network": down, "multicolour": zero}, 7.5)}
    q = {"criteria_probe": probe, "arms": arms,
         "runs": {"a": {"runs": ["a_g0", "a_g1"], "mean": {"colour_shift": 4.0}, "sd": {"colour_shift": 1.4}},
                  "b": {"runs": ["b"], "mean": {"colour_shift": 7.5}, "sd": {"colour_shift": 0.0}}}}
    a, b = report._structure_sentence(q, "a"), report._structure_sentence(q, "b")
    assert a.startswith("`a` adds malignant structures: veil (") and "multicolour (1/2)" in a
    assert "No clear change in network" in a and "cannot see regression" in a and "tints" not in a
    assert b.startswith("`b` adds none") and "removes network" in b and "moves by 7.5 of 255" in b
    probe["criteria"] = {c: {"can_see": False} for c in probe["criteria"]}
    assert "cannot say whether `b` adds them" in report._structure_sentence(q, "b")


# ----------------------------------------------------------------------------- memorisation

def test_memorisation_finds_copies():
    rng = np.random.default_rng(11)
    train, test = rng.normal(size=(100, 16)), rng.normal(size=(40, 16))
    synthetic = np.concatenate([rng.normal(size=(30, 16)), train[[5, 17]] + 1e-9])
    d, i = quality.nearest(synthetic, train)
    full = cdist(synthetic, train)
    assert np.allclose(d, full.min(1)) and (i == full.argmin(1)).all()
    memo = quality.memorisation(synthetic, test, train, n_closest=2)
    assert {(c["synthetic"], c["real_train"]) for c in memo["closest"]} == {(30, 5), (31, 17)}
    cut = np.percentile(cdist(test, train).min(1), 1)
    assert memo["threshold"] == pytest.approx(cut)
    assert memo["fraction_below_real_percentile"] == pytest.approx((full.min(1) < cut).mean())
    assert memo["fraction_below_real_percentile"] >= 2 / 32  # at least the two copies


# ----------------------------------------------------------------------------- features

def test_encoder_is_lite0_features_at_its_resolution(one_thread):
    rng = np.random.default_rng(12)
    images = rng.integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)
    enc = quality_stage.imagenet_encoder(resolution=64, batch_size=2)
    f = enc(images)
    assert f.shape == (5, 1280) and f.dtype == np.float64
    assert np.allclose(enc(images.transpose(0, 3, 1, 2)), f)  # NCHW input, same features
    # the plain model (BatchNorm not folded) on the same preprocessing
    model = efficientnet("tf_efficientnet_lite0", pretrained=True).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate((x - 127.0) / 128.0, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = model.forward_features(x).double().numpy()
    assert np.allclose(f, expected, rtol=1e-4, atol=1e-4)
    assert quality_stage.imagenet_encoder().resolution == 224  # the weights' native size by default
    with pytest.raises(ValueError, match="uint8"):
        enc(images.astype(np.float32))


def test_pixel_features_are_block_means_of_pixels_and_detail():
    rng = np.random.default_rng(13)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    block_mean = lambda a: a.reshape(3, 16, 4, 16, 4, 3).mean((2, 4)).transpose(0, 3, 1, 2).reshape(3, -1)
    ycc = (images / 255) @ np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5],
                                     [0.5, -0.418688, -0.081312]]).T
    detail = np.abs(ycc - uniform_filter(ycc, size=(1, 3, 3, 1), mode="nearest"))
    got = quality.pixel_features(images, 16)
    assert got.shape == (3, 2 * 16 * 16 * 3)
    assert np.allclose(got[:, :768], block_mean(images / 255)) and np.allclose(got[:, 768:], block_mean(detail))


# ----------------------------------------------------------------------------- evaluate, end to end

SEED, BENIGN, MALIGNANT, SIZE = 2, 480, 240, 48


@pytest.fixture(scope="module")
def built_in(tmp_path_factory):
    """A small built-in data set, its cache and split, and four kinds of fake 'translations':
    oracle (each benign source redrawn with a melanoma's severity: the same lesion, more malignant,
    written like its source by encode.save_like), raw (the same pixels, never JPEG-encoded),
    identity (the source itself) and copies (real training melanomas: memorised)."""
    root = tmp_path_factory.mktemp("quality")
    synth.generate(synth.SynthConfig(out=str(root / "data"), benign=BENIGN, malignant=MALIGNANT, size=SIZE,
                                     seed=SEED))
    cache = data.build_cache(data.read_index(root / "data"), SIZE, root / "cache", workers=1)
    split = data.make_split(cache, root / "splits.csv", 0.2, 0.2, seed=0)
    where = {n: s for s, names in split.items() for n in names}
    splits = np.array([where[n] for n in cache.names])
    labels = cache.targets
    plan = {r["image_name"]: r for r in synth.plan(BENIGN, MALIGNANT, SEED)}
    sources = np.flatnonzero((labels == 0) & (splits == "train"))[:60]
    rng = np.random.default_rng(0)
    paths = {r.image_name: r.path for r in data.read_index(root / "data").records}
    raw, oracle = [], []
    for row in sources:
        r = plan[cache.names[row]]
        draw = np.random.default_rng([SEED, 1, r["_index"]])
        synth.severity(draw, False, synth.DEFAULT_DIFFICULTY)  # the source's own draw, then its lesion
        les = synth.lesions.draw(draw, float(rng.beta(6, 2)), True)
        raw.append(synth.render(draw, SIZE, les, r["_patient"], synth.acquisition(SEED, r["_index"], False, 0, 0.0)))
        path = encode.save_like(Image.fromarray(raw[-1]), paths[r["image_name"]], root / "syn" / r["image_name"])
        oracle.append(data.load_image(path, SIZE))
    images = np.array(cache.images)
    mel_train = np.flatnonzero((labels == 1) & (splits == "train"))
    arms = {"oracle": quality_stage.Synthetic(np.stack(oracle), sources),
            "raw": quality_stage.Synthetic(np.stack(raw), sources),
            "identity": quality_stage.Synthetic(images[sources], sources),
            "copies": quality_stage.Synthetic(images[mel_train[:20]], sources[:20])}
    sev = quality_stage.hidden_severity(root / "data")
    return {"images": images, "labels": labels, "patients": cache.patients, "splits": splits, "arms": arms,
            "names": cache.names, "criteria": quality_stage.hidden_criteria(root / "data", cache.names),
            "severity": np.array([sev[n] for n in cache.names]), "mel_train": mel_train, "root": root}


@pytest.fixture(scope="module")
def encoder():
    return quality_stage.imagenet_encoder(resolution=96)  # smaller than 224 to keep the test quick


# The built-in lesions differ by dermoscopic structures, not by size: the severity regressor needs
# about 300 training images to see them at 48 px (validation R^2 0.14; with the 138 that
# max_images=60 gave it, -0.09)
CFG = quality_stage.QualityConfig(max_images=150, kid_subsets=20, fd_draws=3, folds=4, seed=0)


def test_evaluate_built_in_data(built_in, encoder, tmp_path):
    b = built_in
    # two GAN runs of one arm "mix": run 0 is the oracle, run 1 identity (no extra images to encode)
    arms = {"mix_g0": b["arms"]["oracle"], "raw": b["arms"]["raw"], "mix_g1": b["arms"]["identity"],
            "copies": b["arms"]["copies"]}
    res = quality_stage.evaluate(b["images"], b["labels"], b["patients"], b["splits"], arms, severity=b["severity"],
                                 out_dir=tmp_path, cfg=CFG, encoder=encoder, criteria=b["criteria"])
    json.dumps(res)  # JSON-able as it is
    assert set(res) == {"encoder", "sets", "reference", "severity_regressor", "criteria_probe", "arms", "runs",
                        "timings_s", "config"}
    assert "ImageNet" in res["encoder"]["note"]
    oracle, identity, copies = (res["arms"][a] for a in ("mix_g0", "mix_g1", "copies"))
    assert res["severity_regressor"]["r2_val"] > 0.1
    # the oracle raised severity and the scorer sees it; identity changed nothing
    shift = oracle["severity"]["predicted_shift"]  # a rise of 0.5 in truth, seen at >= 3 standard errors
    assert shift["mean"] > 3 * shift["sd"] / np.sqrt(shift["n"])
    assert oracle["severity"]["fraction_translations_above_benign_median"] > \
        oracle["severity"]["fraction_sources_above_benign_median"] + 0.2
    ts = oracle["translation_success"]
    assert ts["fraction_translations_above"] > ts["fraction_sources_above"] and ts["mean_logit_shift"] > 0
    assert identity["severity"]["predicted_shift"]["mean"] == pytest.approx(0, abs=1e-12)
    assert identity["translation_success"]["mean_logit_shift"] == pytest.approx(0, abs=1e-12)
    # distances: the oracle is closer to real melanomas than its sources; identity sits exactly at them
    kid = lambda arm, pair: arm["distances"][pair]["kid"]["mean"]
    assert kid(oracle, "synthetic_vs_real_mel_train") < kid(oracle, "sources_vs_real_mel_train")
    assert identity["distances"]["synthetic_vs_real_mel_train"] == identity["distances"]["sources_vs_real_mel_train"]
    assert identity["two_sample"]["features"]["synthetic"] == identity["two_sample"]["features"]["sources"]
    ref = res["reference"]["two_sample"]["real_benign_val_vs_real_mel_train"]["features"]
    assert ref["auc"] > 0.6 and ref["n_a"] > 80 and ref["n_b"] > 80  # ~3 standard errors above chance
    # memorisation: copies of training melanomas are found, with their originals
    assert copies["memorisation"]["fraction_below_real_percentile"] == 1.0
    first = copies["memorisation"]["closest"][0]
    assert first["distance"] < 1e-6 and first["real_train"] == b["mel_train"][first["synthetic"]]
    assert oracle["memorisation"]["fraction_below_real_percentile"] < 0.2
    assert identity["memorisation"]["fraction_below_real_percentile"] == \
        identity["memorisation"]["sources_fraction_below_real_percentile"]
    # the format shortcut: never-encoded pixels are easier to tell from real melanomas than the same
    # pixels written like their sources
    two = lambda arm: res["arms"][arm]["two_sample"]["features"]["synthetic"]["auc"]
    assert two("raw") > two("mix_g0") + 0.1
    for key, arm in res["arms"].items():
        if key == "mix_g1":  # only run 0 of an arm draws pictures
            assert "pictures" not in arm and quality_stage.picture_names(key) == {}
            continue
        for path in (arm["pictures"]["pairs"], arm["pictures"]["neighbours"], arm["pictures"]["criteria"]):
            assert Path(path).is_file() and Path(path).parent == tmp_path
            assert Path(path).name in quality_stage.picture_names(key).values()
    assert not list(tmp_path.glob("quality_mix_g1_*"))
    _check_criteria(res, b)
    _check_runs(res)
    lines = "\n".join(report._quality_lines(res))
    assert "| blue white veil |" in lines and "`mix` adds" in lines and "Added in some GAN runs only" in lines


def _check_criteria(res: dict, b: dict):
    """The probes see the clearest criteria; identity changes nothing; the oracle (each source redrawn
    with a melanoma's severity) gains criteria, and its 7-point score rises."""
    probe = res["criteria_probe"]["criteria"]
    assert set(probe) == set(quality.CRITERIA)
    val = b["splits"] == "val"
    for c in ("blue_white_veil", "regression"):  # veil and regression are the clearest at 48 px
        assert probe[c]["can_see"] and probe[c]["auc_val"] > 0.8
        assert 0 < probe[c]["prevalence_val"] < 1 and probe[c]["n_present_val"] <= b["criteria"][c][val].sum()
    for c, p in probe.items():
        assert p["can_see"] == (p["auc_val"] is not None and p["auc_val"] >= 0.7)
    identity, oracle = res["arms"]["mix_g1"]["criteria"], res["arms"]["mix_g0"]["criteria"]
    sources = b["arms"]["identity"].sources
    for c, v in identity["criteria"].items():
        assert v["true_sources"] == pytest.approx(b["criteria"][c][sources].mean())
        if "change" in v:
            assert v["change"]["mean"] == 0 and v["change"]["ci"] == [0.0, 0.0]
            assert v["present_sources"] == v["present_translations"]
    assert identity["colour_shift"]["size"] == 0
    assert oracle["seven_point"]["change"]["ci"][0] > 0
    assert oracle["criteria"]["blue_white_veil"]["change"]["ci"][0] > 0


def _check_runs(res: dict):
    """Runs grouped by arm; each figure's mean and sd over the runs as numpy computes them."""
    runs = res["runs"]
    assert list(runs) == ["mix", "raw", "copies"] and runs["mix"]["runs"] == ["mix_g0", "mix_g1"]
    assert runs["raw"]["runs"] == ["raw"]
    g0, g1 = (quality_stage.headline(res["arms"][k]) for k in ("mix_g0", "mix_g1"))
    assert set(runs["mix"]["mean"]) == set(g0) and "blue_white_veil_change" in g0 and "fd" in g0
    for k in g0:
        v = np.array([g0[k], g1[k]])
        assert runs["mix"]["mean"][k] == pytest.approx(v.mean()) and runs["mix"]["sd"][k] == pytest.approx(v.std(ddof=1))
    assert runs["raw"]["sd"]["fd"] == 0.0 and runs["raw"]["mean"] == quality_stage.headline(res["arms"]["raw"])


def test_evaluate_without_ground_truth_and_with_given_logits(built_in, encoder):
    """Real ISIC data: no hidden severity, so that item is skipped and says so; a classifier's logits
    replace the in-stage scorer."""
    b = built_in
    arms = {"oracle": b["arms"]["oracle"]}
    rng = np.random.default_rng(1)
    real_logits = np.where(b["splits"] == "test", np.nan, b["labels"] * 2.0 + rng.normal(size=len(b["labels"])))
    syn_logits = rng.normal(size=len(arms["oracle"].images)) + 1
    res = quality_stage.evaluate(b["images"], b["labels"], b["patients"], b["splits"], arms, severity=None,
                                 logits={"real": real_logits, "synthetic": {"oracle": syn_logits}}, cfg=CFG,
                                 encoder=encoder)
    assert "skipped" in res["severity_regressor"] and "skipped" in res["arms"]["oracle"]["severity"]
    assert "skipped" in res["criteria_probe"] and "skipped" in res["arms"]["oracle"]["criteria"]
    assert "Dermoscopic criteria: skipped" in "\n".join(report._quality_lines(res))
    ts = res["arms"]["oracle"]["translation_success"]
    val = b["splits"] == "val"
    expected = quality.translation_success(real_logits[val], b["labels"][val], syn_logits,
                                           real_logits[arms["oracle"].sources])
    assert ts["scorer"] == "given classifier logits" and {k: ts[k] for k in expected} == expected
    with pytest.raises(ValueError, match="logits"):
        quality_stage.evaluate(b["images"], b["labels"], b["patients"], b["splits"], arms,
                               logits={"real": real_logits}, cfg=CFG, encoder=encoder)


def test_load_translations_reads_a_translate_folder(built_in, tmp_path):
    """A folder in translate's layout (train.csv with source_image; images written like their sources)."""
    b = built_in
    paths = {r.image_name: r.path for r in data.read_index(b["root"] / "data").records}
    names = list(b["names"])
    rows = b["arms"]["oracle"].sources[:5]
    (tmp_path / "jpeg" / "train").mkdir(parents=True)
    lines = ["image_name,patient_id,target,source_image"]
    for k, row in enumerate(rows):
        src = names[row]
        encode.save_like(Image.fromarray(b["arms"]["oracle"].images[k]), paths[src],
                         tmp_path / "jpeg" / "train" / f"syn_{src}")
        lines.append(f"syn_{src},{b['patients'][row]},1,{src}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    syn = quality_stage.load_translations(tmp_path, SIZE, names)
    assert syn.images.shape == (5, SIZE, SIZE, 3) and syn.sources.tolist() == rows.tolist()
    assert np.abs(syn.images.astype(float) - b["arms"]["oracle"].images[:5]).mean() < 3  # the JPEG's loss
    with pytest.raises(ValueError, match="source_image"):
        quality_stage.load_translations(tmp_path, SIZE, names[:1])


def test_evaluate_refuses_bad_input(built_in, encoder):
    b = built_in
    bad_sources = {"x": quality_stage.Synthetic(b["arms"]["copies"].images, b["mel_train"][:20])}
    with pytest.raises(ValueError, match="not benign"):
        quality_stage.evaluate(b["images"], b["labels"], b["patients"], b["splits"], bad_sources, cfg=CFG, encoder=encoder)
    with pytest.raises(ValueError, match="multicolour"):
        quality_stage.evaluate(b["images"], b["labels"], b["patients"], b["splits"], b["arms"], cfg=CFG,
                               encoder=encoder, criteria={c: v for c, v in b["criteria"].items() if c != "multicolour"})
    with pytest.raises(ValueError, match="real_splits"):
        quality_stage.evaluate(b["images"], b["labels"], b["patients"], ["training"] * len(b["labels"]), b["arms"],
                               cfg=CFG, encoder=encoder)
