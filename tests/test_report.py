"""melano.report: the arm comparison against metrics/scikit-learn, and its refusals."""

import csv

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from melano import metrics, report, stats


def write_preds(path, names, y, p):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_name", "target", "probability"])
        w.writerows(zip(names, y, p))
    return path


@pytest.fixture
def arms(tmp_path):
    """Two seeds per arm; each arm may list the images in its own order."""
    rng = np.random.default_rng(0)
    n = 300
    names = [f"ISIC_{i:07d}" for i in range(n)]
    y = (rng.random(n) < 0.2).astype(int)
    out = {}
    for arm, signal in [("traditional", 1.0), ("oversample", 1.0), ("cyclegan", 2.0)]:
        out[arm] = []
        for k in range(2):
            p = 1 / (1 + np.exp(-(signal * y + rng.normal(size=n))))
            perm = rng.permutation(n)
            out[arm].append(write_preds(tmp_path / f"{arm}{k}.csv", [names[i] for i in perm], y[perm], p[perm]))
    return out


def aligned(path):
    names, y, p = report.read_predictions(path)
    order = np.argsort(names)
    return y[order], p[order]


def test_experiment_metrics_match_sklearn_and_delong(arms, tmp_path):
    m = report.experiment_metrics(arms, split_csv=None, n_boot=400)
    rows = {r["name"]: r for r in m["arms"]}
    for arm, paths in arms.items():
        aucs = [roc_auc_score(*aligned(p)) for p in paths]
        assert [s["auc"] for s in rows[arm]["seeds"]] == pytest.approx(aucs, abs=1e-12)
        assert rows[arm]["auc_mean"] == pytest.approx(np.mean(aucs), abs=1e-12)
        assert rows[arm]["auc_sd"] == pytest.approx(np.std(aucs, ddof=1), abs=1e-12)
        for s in rows[arm]["seeds"]:
            assert s["ci_low"] <= s["auc"] <= s["ci_high"]
    comps = {(c["a"], c["b"]): c for c in m["comparisons"]}
    assert set(comps) == {("cyclegan", "oversample"), ("cyclegan", "traditional")}  # no cyclegan_ls arm
    assert comps[("cyclegan", "oversample")]["role"] == "primary"
    y, _ = aligned(arms["cyclegan"][0])
    mean = lambda arm: np.mean([aligned(p)[1] for p in arms[arm]], axis=0)  # noqa: E731
    want = metrics.delong_test(y, mean("cyclegan"), mean("traditional"))
    c = comps[("cyclegan", "traditional")]
    assert c["p_delong_seed_mean"] == pytest.approx(want[2], rel=1e-12)
    seed_aucs = lambda arm: [roc_auc_score(*aligned(p)) for p in arms[arm]]  # noqa: E731
    assert c["delta"] == pytest.approx(np.mean(seed_aucs("cyclegan")) - np.mean(seed_aucs("traditional")))
    assert c["p"] < 0.05 and c["ci_low"] > 0 and c["covers"] == "test+training"  # signal 2.0 vs 1.0, 300 cases
    # the family's Holm adjustment, and the operating points against sklearn
    assert [c["p_holm"] for c in m["comparisons"]] == pytest.approx(list(stats.holm([c["p"] for c in m["comparisons"]])))
    from sklearn.metrics import brier_score_loss
    yt, pt = aligned(arms["traditional"][0])
    assert rows["traditional"]["seeds"][0]["operating_points"]["brier"]["estimate"] == pytest.approx(
        brier_score_loss(yt, pt), abs=1e-12)


def test_experiment_metrics_refuse_different_test_sets(arms):
    names, y, p = report.read_predictions(arms["cyclegan"][1])
    write_preds(arms["cyclegan"][1], names[:-1], y[:-1], p[:-1])
    with pytest.raises(ValueError, match="different test set"):
        report.experiment_metrics(arms, split_csv=None, n_boot=100)
    y2 = y.copy()
    y2[0] = 1 - y2[0]
    write_preds(arms["cyclegan"][1], names, y2, p)
    with pytest.raises(ValueError, match="different test set"):
        report.experiment_metrics(arms, split_csv=None, n_boot=100)


def test_read_predictions_names_bad_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,prob\na,0.1\n")
    with pytest.raises(ValueError, match="bad.csv"):
        report.read_predictions(bad)


def test_report_files(arms, tmp_path):
    m = report.experiment_metrics(arms, split_csv=None, n_boot=200)
    md = report.markdown_report({**m, "data": "synthetic", "preset": "smoke",
                                 "split_sizes": {"test": {"images": 300, "malignant": 60, "patients": 90}}})
    for r in m["arms"]:
        assert f"| {r['name']} |" in md and f"{r['auc_mean']:.3f} ± {r['auc_sd']:.3f}" in md
    assert "`cyclegan` vs `traditional` (secondary): `cyclegan` scored a higher AUC" in md
    png = report.roc_plot({a: p[0] for a, p in arms.items()}, tmp_path / "roc.png")
    assert Image.open(png).size[0] > 100
    pairs = [(Image.new("RGB", (32, 32), "red"), Image.new("RGB", (40, 40), "blue"))] * 5
    grid = Image.open(report.image_grid(pairs, tmp_path / "grid.png", pad=4, cols=2, cell=16, col_gap=8))
    assert grid.size == (2 * (2 * 16 + 12), 3 * 20 + 4)
    assert grid.getpixel((4, 4)) == (255, 0, 0) and grid.getpixel((4 + 16 + 4, 4)) == (0, 0, 255)
