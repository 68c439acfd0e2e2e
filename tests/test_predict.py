"""predict on a Kaggle test folder (Kaggle's submission) and on any folder (the validation
operating points beside each probability).

Oracles: predict on the same files given one by one (the scores), scikit-learn's roc_curve (the
threshold that reaches a sensitivity), the csv module on the files written.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from helpers import call, read_csv, refused, tree
from melano import classifier
from melano.classifier import inference

CLF_DATA = (40, 24, 2.0)  # conftest's clf_data and clf_run (2 steps: best.pt, val_predictions.csv)


def predict_argv(ckpt, images, out, *more) -> list:
    return ["predict", "--checkpoint", ckpt, "--images", images, "--out", out, "--device", "cpu", *more]


@pytest.fixture(scope="module")
def kaggle_test(root, clf_data) -> Path:
    """A Kaggle test folder (test.csv + jpeg/test/) of 12 of the data's images, in shuffled order."""
    names = [r["image_name"] for r in read_csv(clf_data / "train.csv")][:12]
    order = [names[i] for i in np.random.default_rng(0).permutation(len(names))]
    folder = root / "kaggle_test"
    (folder / "jpeg" / "test").mkdir(parents=True)
    for n in order:
        shutil.copy(clf_data / "jpeg" / "train" / f"{n}.jpg", folder / "jpeg" / "test" / f"{n}.jpg")
    (folder / "test.csv").write_text("image_name,patient_id,sex,age_approx,anatom_site_general_challenge\n" +
                                     "".join(f"{n},IP_{i},male,45,torso\n" for i, n in enumerate(order)))
    return folder


def test_kaggle_submission_has_every_row_in_order(clf_run, kaggle_test, tmp_path):
    out = tmp_path / "submission.csv"
    assert call(classifier.main, predict_argv(clf_run / "best.pt", kaggle_test, out)) == 0
    assert out.read_text().splitlines()[0] == "image_name,target"
    rows = read_csv(out)
    order = [r["image_name"] for r in read_csv(kaggle_test / "test.csv")]
    assert [r["image_name"] for r in rows] == order  # one row per test image, test.csv's order
    probs = np.array([float(r["target"]) for r in rows])
    assert np.all((probs >= 0) & (probs <= 1)) and np.isfinite(probs).all()
    one_by_one = classifier.predict(clf_run / "best.pt", [kaggle_test / "jpeg" / "test" / f"{n}.jpg" for n in order],
                                    device="cpu")
    np.testing.assert_allclose(probs, [p for _, p in one_by_one], atol=1e-6)


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_kaggle_submission_refuses_an_unreadable_image(clf_run, kaggle_test, tmp_path, caplog, damage):
    """Kaggle rejects a submission without every row: an unreadable image stops predict (no
    --strict needed), and nothing is written."""
    folder = tmp_path / "t"
    shutil.copytree(kaggle_test, folder)
    victim = folder / "jpeg" / "test" / f"{read_csv(folder / 'test.csv')[3]['image_name']}.jpg"
    if damage == "corrupt":
        victim.write_bytes(b"not a jpeg")
    else:
        victim.unlink()
    before = tree(tmp_path)
    caplog.clear()
    assert call(classifier.main, predict_argv(clf_run / "best.pt", folder, tmp_path / "sub.csv")) == 2
    refused(caplog, victim.stem, "every")
    assert tree(tmp_path) == before


def test_threshold_at_sensitivity_matches_roc_curve():
    rng = np.random.default_rng(1)
    for n in (5, 37, 200):
        y = (rng.random(n) < 0.3).astype(int)
        y[0] = 1
        p = np.round(rng.random(n), 2)  # ties
        fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
        for s in (0.5, 0.9, 0.95, 1.0):
            assert inference.threshold_at_sensitivity(y, p, s) == thr[np.argmax(tpr >= s - 1e-12)]
            assert np.mean(p[y == 1] >= inference.threshold_at_sensitivity(y, p, s)) >= s


def test_folder_csv_carries_the_validation_operating_points(clf_run, kaggle_test, tmp_path):
    images = kaggle_test / "jpeg" / "test"
    out = tmp_path / "p.csv"
    assert call(classifier.main, predict_argv(clf_run / "best.pt", images, out)) == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["image", "probability", "threshold_sens90", "positive_sens90", "threshold_sens95",
                             "positive_sens95"]
    val = read_csv(clf_run / "val_predictions.csv")
    y, p = np.array([int(r["target"]) for r in val]), np.array([float(r["probability"]) for r in val])
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    for s in (90, 95):
        expected = thr[np.argmax(tpr >= s / 100)]
        assert {float(r[f"threshold_sens{s}"]) for r in rows} == {expected}
        assert [int(r[f"positive_sens{s}"]) for r in rows] == [int(float(r["probability"]) >= expected) for r in rows]
    assert len(rows) == 12


def test_no_operating_points_without_matching_validation_predictions(clf_run, kaggle_test, tmp_path, caplog):
    images = kaggle_test / "jpeg" / "test"
    for ckpt, more in ((clf_run / "last.pt", []), (clf_run / "best.pt", ["--tta"])):
        out = tmp_path / f"{ckpt.stem}{len(more)}.csv"
        assert call(classifier.main, predict_argv(ckpt, images, out, *more)) == 0
        assert list(read_csv(out)[0]) == ["image", "probability"]
    # validation predictions of another model beside a best.pt: not its operating points
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(clf_run / "best.pt", other / "best.pt")
    val = read_csv(clf_run / "val_predictions.csv")
    (other / "val_predictions.csv").write_text("image_name,target,probability\n" + "".join(
        f"{r['image_name']},{r['target']},{0.5 if i % 2 else 0.1}\n" for i, r in enumerate(val)))
    caplog.clear()
    assert call(classifier.main, predict_argv(other / "best.pt", images, tmp_path / "o.csv")) == 0
    assert list(read_csv(tmp_path / "o.csv")[0]) == ["image", "probability"]
    assert any("belongs to another checkpoint" in r.getMessage() for r in caplog.records)
