"""The synthetic dermoscopy generator: layout, CSV, determinism, and how the classes separate."""

import csv
import hashlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from melano import data, synth
from melano.infra import outdir


def _digest(root: Path) -> dict[str, str]:
    """sha256 of every data file (not synth.json, which records the config, nor melano's
    bookkeeping files, which record pids and times)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "synth.json" and p.name not in outdir.MELANO_FILES}


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_layout_and_csv(tmp_path):
    rows = synth.generate(synth.SynthConfig(out=str(tmp_path), benign=50, malignant=12, size=48, seed=1))
    table = _read_csv(tmp_path / "train.csv")
    assert list(table[0].keys()) == synth.CSV_COLUMNS  # all 8 ISIC 2020 columns, in order
    assert len(table) == len(rows) == 62
    assert sum(r["target"] == "1" for r in table) == 12
    for r in table:
        img = Image.open(tmp_path / "jpeg" / "train" / f"{r['image_name']}.jpg")
        assert img.format == "JPEG" and img.size == (48, 48) and img.mode == "RGB"
        assert r["benign_malignant"] == ("malignant" if r["target"] == "1" else "benign")
        assert (r["diagnosis"] == "melanoma") == (r["target"] == "1")
        assert r["sex"] in ("male", "female", "")
        assert r["age_approx"] == "" or (0 <= int(r["age_approx"]) <= 90 and int(r["age_approx"]) % 5 == 0)
        assert r["anatom_site_general_challenge"] in synth._SITES
    # several images per patient, and each patient keeps one sex and age
    per_patient: dict[str, list[dict]] = {}
    for r in table:
        per_patient.setdefault(r["patient_id"], []).append(r)
    sizes = [len(v) for v in per_patient.values()]
    assert np.mean(sizes) >= 2.5 and max(sizes) >= 4
    for v in per_patient.values():
        assert len({r["sex"] for r in v}) == 1
    # the reader sees exactly what was written
    index = data.read_index(tmp_path)
    assert index.layout == "kaggle" and index.names == [r["image_name"] for r in table]


def test_deterministic_byte_for_byte(tmp_path):
    kw = dict(benign=20, malignant=8, size=40)
    synth.generate(synth.SynthConfig(out=str(tmp_path / "a"), seed=7, **kw))
    synth.generate(synth.SynthConfig(out=str(tmp_path / "b"), seed=7, **kw))
    synth.generate(synth.SynthConfig(out=str(tmp_path / "c"), seed=8, **kw))
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert a == b
    assert set(a) == set(c) and sum(a[k] != c[k] for k in a) >= len(a) - 1  # another seed: other images


def test_worker_processes_give_the_same_bytes(tmp_path):
    rows = synth.plan(40, 30, seed=3)
    one = list(synth.render_rows(rows, 32, 3, synth.DEFAULT_DIFFICULTY, workers=1))
    two = list(synth.render_rows(rows, 32, 3, synth.DEFAULT_DIFFICULTY, workers=2))
    assert one == two


def test_cli_writes_the_kaggle_layout(tmp_path):
    assert data.main(["synth", "--out", str(tmp_path), "--benign", "6", "--malignant", "3",
                      "--size", "32", "--seed", "2", "--difficulty", "0.2"]) == 0
    table = _read_csv(tmp_path / "train.csv")
    assert len(table) == 9 and (tmp_path / "jpeg" / "train" / f"{table[0]['image_name']}.jpg").is_file()


def test_bad_arguments():
    with pytest.raises(ValueError, match="difficulty"):
        synth.plan(10, 10, difficulty=1.5)
    with pytest.raises(ValueError, match="not both 0"):
        synth.plan(0, 0)


def _colour_histograms(x: np.ndarray, bins: int = 4) -> np.ndarray:
    """sqrt of the 4x4x4 RGB histogram of the central disk: a crude colour-and-size descriptor."""
    s = x.shape[1]
    yy, xx = np.mgrid[:s, :s]
    disk = (yy - s / 2 + 0.5) ** 2 + (xx - s / 2 + 0.5) ** 2 < (0.4 * s) ** 2
    q = (x[:, disk] // (256 // bins)).astype(np.int64)
    code = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    return np.sqrt(np.stack([np.bincount(c, minlength=bins ** 3) for c in code]) / disk.sum())


def _cv_auc(features: np.ndarray, y: np.ndarray) -> float:
    f = (features - features.mean(0)) / (features.std(0) + 1e-9)
    p = cross_val_predict(LogisticRegression(max_iter=2000), f, y, cv=5, method="predict_proba")[:, 1]
    return roc_auc_score(y, p)


def _images(n: int, difficulty: float, seed: int = 3):
    rows = synth.plan(n, n, seed=seed, difficulty=difficulty)
    x = np.stack([np.asarray(Image.open(io.BytesIO(b)))
                  for b in synth.render_rows(rows, 64, seed, difficulty)])
    return x, np.array([int(r["target"]) for r in rows]), synth.latent_severity(rows, seed, difficulty)


def test_classes_separate_by_lesion_not_by_mean_colour():
    """Mean colour alone must not give the class away; lesion colours (and size) must, and
    --difficulty must blur them. Oracles: scikit-learn's logistic regression and ROC AUC."""
    x, y, sev = _images(500, synth.DEFAULT_DIFFICULTY)
    mean_rgb = x.reshape(len(x), -1, 3).mean(1)
    assert _cv_auc(mean_rgb, y) < 0.65
    hist_auc = _cv_auc(_colour_histograms(x), y)
    assert hist_auc > 0.70
    # the hidden severity bounds any classifier: calibrated to leave a good one at ~0.90-0.95
    assert 0.92 < roc_auc_score(y, sev) < 0.97

    x2, y2, sev2 = _images(500, 0.3)
    assert _cv_auc(_colour_histograms(x2), y2) < hist_auc - 0.08
    assert roc_auc_score(y2, sev2) < roc_auc_score(y, sev) - 0.15


# ---------------------------------------------------------------------------------------------
# Output-folder safety and option checks (issue 15)

def _labels(root: Path) -> dict[str, int]:
    index = data.read_index(root)
    return dict(zip(index.names, index.targets.tolist()))


def test_a_data_set_in_out_is_refused_unless_forced(tmp_path):
    kw = dict(benign=6, malignant=3, size=24)
    synth.generate(synth.SynthConfig(out=str(tmp_path / "d"), seed=1, **kw))
    before = _digest(tmp_path / "d")
    with pytest.raises(outdir.OutputError, match=r"earlier synth run.*--force"):
        synth.generate(synth.SynthConfig(out=str(tmp_path / "d"), seed=2, **kw))
    assert _digest(tmp_path / "d") == before
    synth.generate(synth.SynthConfig(out=str(tmp_path / "d"), seed=2, force=True, **kw))
    synth.generate(synth.SynthConfig(out=str(tmp_path / "ref"), seed=2, **kw))
    assert _digest(tmp_path / "d") == _digest(tmp_path / "ref")  # the old set is gone, no mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "ref"]
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "train.csv").write_text("image_name,target\n")
    with pytest.raises(outdir.OutputError, match="holds a data set"):
        synth.generate(synth.SynthConfig(out=str(tmp_path / "user"), **kw))


def test_an_interrupted_run_leaves_the_old_set_untouched(tmp_path, monkeypatch):
    """Issue 15, finding 3: a run killed while rendering replaced images under the old train.csv
    (120 of 2,000 images carried the wrong label). Now the old set stays exactly as it was."""
    kw = dict(benign=30, malignant=10, size=24)
    out = tmp_path / "d"
    synth.generate(synth.SynthConfig(out=str(out), seed=1, **kw))
    before, labels = _digest(out), _labels(out)
    real, calls = synth._render_one, []

    def dies(job):
        calls.append(job)
        if len(calls) == 15:
            raise KeyboardInterrupt  # stands in for a kill in the middle of the run
        return real(job)

    monkeypatch.setattr(synth, "_render_one", dies)
    with pytest.raises(KeyboardInterrupt):
        synth.generate(synth.SynthConfig(out=str(out), seed=2, force=True, **kw))
    assert _digest(out) == before and _labels(out) == labels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # the half-written set is gone


@pytest.mark.parametrize("argv,pattern", [
    (["--size", "8"], "--size must be between 16 and 4096"),
    (["--benign", "-1"], "--benign and --malignant must be >= 0"),
    (["--benign", "0", "--malignant", "0"], "not both 0"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--difficulty", "0.7"], r"--difficulty must be in \[0, 0.5\]"),
    (["--difficulty", "nan"], r"--difficulty must be in \[0, 0.5\]"),
    (["--images-per-patient", "0"], "--images-per-patient .* at least 1"),
])
def test_bad_options_are_one_line_and_exit_2(tmp_path, caplog, argv, pattern):
    out = tmp_path / "d"
    assert data.main(["synth", "--out", str(out), *argv]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and re.search(pattern, errors[0]), errors
    assert not out.exists()  # checked before anything was written


def test_bad_options_from_the_command_line_print_no_traceback(tmp_path):
    """Issue 15: `synth --size 8` and `synth --benign -1` ended in a traceback. (One process: a
    fresh interpreter pays for importing torch; the other options take the same path, above.)"""
    r = subprocess.run([sys.executable, "-m", "melano.data", "synth", "--out", str(tmp_path / "d"), "--size", "8"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert "ERROR --size must be between 16 and 4096 pixels, got 8" in lines[0]


def test_the_second_centre_is_another_clinic_with_the_same_label_rates():
    """Centre 1 (the out-of-distribution test clinic): its own image names and patients, other
    lesions, a darker skin-type mix; the same number of melanomas."""
    n_b, n_m = 1500, 300
    home, away = synth.plan(n_b, n_m, seed=3), synth.plan(n_b, n_m, seed=3, centre=1)
    assert sum(r["target"] == "1" for r in home) == sum(r["target"] == "1" for r in away) == n_m
    assert not {r["image_name"] for r in home} & {r["image_name"] for r in away}
    assert not {r["patient_id"] for r in home} & {r["patient_id"] for r in away}
    s_home, s_away = synth.latent_severity(home, 3, 0.04), synth.latent_severity(away, 3, 0.04)
    assert not np.allclose(s_home, s_away)  # other lesions, drawn from the same model
    per_patient = lambda rows: {r["patient_id"]: r["_patient"]["fitzpatrick"] for r in rows}
    light = lambda rows: np.mean(np.array(list(per_patient(rows).values())) <= 2)
    assert light(home) > 0.5 and light(away) < 0.3  # centre 0: ~60% types I-II; centre 1: ~22%
    # the severity distribution of each class is the same model: compare with a two-sample KS test
    scipy_stats = pytest.importorskip("scipy.stats")
    mal = lambda rows, s: s[[r["target"] == "1" for r in rows]]
    assert scipy_stats.ks_2samp(mal(home, s_home), mal(away, s_away)).pvalue > 0.01
