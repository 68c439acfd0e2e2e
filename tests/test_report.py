"""melano.report: the arm comparison against metrics/scikit-learn, and its refusals."""

import csv

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from melano import metrics, report


def write_preds(path, names, y, p):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_name", "target", "probability"])
        w.writerows(zip(names, y, p))
    return path


@pytest.fixture
def arms(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    names = [f"ISIC_{i:07d}" for i in range(n)]
    y = (rng.random(n) < 0.2).astype(int)
    out = {}
    for arm, signal in [("none", 0.5), ("traditional", 1.0), ("cyclegan", 2.0)]:
        p = 1 / (1 + np.exp(-(signal * y + rng.normal(size=n))))
        perm = rng.permutation(n)  # each arm may list the images in its own order
        out[arm] = write_preds(tmp_path / f"{arm}.csv", [names[i] for i in perm], y[perm], p[perm])
    return out


def test_compare_arms_matches_metrics(arms):
    rows = {r["name"]: r for r in report.compare_arms(arms)}
    assert rows["traditional"]["p_value_vs_traditional"] is None
    _, yt, pt = report.read_predictions(arms["traditional"])
    _, yc, pc = report.read_predictions(arms["cyclegan"])
    assert rows["cyclegan"]["test_auc"] == pytest.approx(roc_auc_score(yc, pc), abs=1e-12)
    # Align by name before the paired test, as compare_arms must.
    nt, _, _ = report.read_predictions(arms["traditional"])
    nc, _, _ = report.read_predictions(arms["cyclegan"])
    pos = {n: i for i, n in enumerate(nc)}
    pc_aligned = pc[[pos[n] for n in nt]]
    want_p = metrics.delong_test(yt, pc_aligned, pt)[2]
    assert rows["cyclegan"]["p_value_vs_traditional"] == pytest.approx(want_p, rel=1e-12)
    assert rows["cyclegan"]["p_value_vs_traditional"] < 0.05  # signal 2.0 vs 1.0 on 300 cases
    for r in rows.values():
        assert r["ci_low"] <= r["test_auc"] <= r["ci_high"]


def test_compare_arms_refuses_different_test_sets(arms, tmp_path):
    names, y, p = report.read_predictions(arms["cyclegan"])
    write_preds(arms["cyclegan"], names[:-1], y[:-1], p[:-1])
    with pytest.raises(ValueError, match="different test set"):
        report.compare_arms(arms)
    y2 = y.copy()
    y2[0] = 1 - y2[0]
    write_preds(arms["cyclegan"], names, y2, p)
    with pytest.raises(ValueError, match="different test set"):
        report.compare_arms(arms)


def test_read_predictions_names_bad_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,prob\na,0.1\n")
    with pytest.raises(ValueError, match="bad.csv"):
        report.read_predictions(bad)


def test_report_files(arms, tmp_path):
    rows = report.compare_arms(arms)
    md = report.markdown_report({"arms": rows, "data": "synthetic", "preset": "smoke",
                                 "split_sizes": {"test": {"images": 300, "malignant": 60,
                                                          "patients": 90}}})
    for r in rows:
        assert f"| {r['name']} | {r['test_auc']:.3f} |" in md
    assert "cyclegan` scored a higher test AUC" in md
    png = report.roc_plot(arms, tmp_path / "roc.png")
    assert Image.open(png).size[0] > 100
    pairs = [(Image.new("RGB", (32, 32), "red"), Image.new("RGB", (40, 40), "blue"))] * 5
    grid = Image.open(report.sample_grid(pairs, tmp_path / "grid.png", cols=2, cell=16))
    assert grid.size == (2 * (2 * 16 + 12), 3 * 20 + 4)
    assert grid.getpixel((4, 4)) == (255, 0, 0) and grid.getpixel((4 + 16 + 4, 4)) == (0, 0, 255)
