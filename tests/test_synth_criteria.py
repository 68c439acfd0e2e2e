"""The built-in data set's hidden truth (melano.lesions, synth_criteria.csv): written for every
image, consistent with the published scores, and visible in the pixels when present. Each check
compares images against the truth file or against the same lesion rendered without the criterion,
never against a constant picture."""

import csv
import dataclasses

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from melano import data, lesions, synth

SEED, SIZE = 4, 96


def _rgb(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = img.astype(np.float32) / 255
    return x[..., 0], x[..., 1], x[..., 2]


def blue_grey(img) -> int:
    """Pixels bluer than they are red and neither black nor white: dermal melanin, not skin or brown."""
    r, g, b = _rgb(img)
    v = (r + g + b) / 3
    return int(((b > r + 0.02) & (v > 0.08) & (v < 0.8)).sum())


def dark_detail(img) -> float:
    """How much small structure is darker than its neighbourhood (dots, globules, lines, streaks):
    the summed depth of every pixel below the mean of the 7 x 7 pixels around it."""
    v = img.astype(np.float32).mean(-1)
    return float(np.maximum(ndimage.uniform_filter(v, 7) - v - 6, 0).sum())


def red(img) -> int:
    r, g, b = _rgb(img)
    return int(((r > g + 0.28) & (r > b + 0.2) & (r > 0.35)).sum())


def whitish(img) -> int:
    r, g, b = _rgb(img)
    return int(((np.minimum(np.minimum(r, g), b) > 0.55) & (np.maximum(np.maximum(r, g), b) -
                                                               np.minimum(np.minimum(r, g), b) < 0.18)).sum())


def very_dark(img) -> int:
    return int((img.astype(np.float32).mean(-1) < 45).sum())


# criterion -> what must grow when it is added to a lesion
VISIBLE = {"blue_white_veil": blue_grey, "irregular_dots": dark_detail, "atypical_vessels": red,
           "regression": whitish, "irregular_blotches": very_dark, "atypical_network": dark_detail,
           "irregular_streaks": dark_detail}


def pair(i: int, criterion: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Melanoma i rendered with `criterion` as its only criterion (at its drawn intensity and place,
    or 0.7 off-centre) and with none; everything else, the artefacts included, is the same draw.
    (Each criterion paints from a stream of its own, so removing one changes nothing else.)"""
    rows = []
    for keep in (True, False):
        rng, les = synth.lesion_of(SEED, i, True, synth.DEFAULT_DIFFICULTY)
        criteria = {criterion: les.criteria.get(criterion, 0.7)} if keep else {}
        places = {criterion: les.places.get(criterion, lesions.Place(1.0, 0.3, 0.45))}
        les = dataclasses.replace(les, criteria=criteria, places=places)
        acq = {**synth.acquisition(SEED, i, True, 0, 0.0), "hair": False, "bubbles": False, "ruler": False,
               "ink": False, "glare": False}
        patient = synth._patient(SEED, i)
        rows.append(synth.render(rng, SIZE, les, patient, acq))
    return rows[0], rows[1], les.criteria.get(criterion, 0.7)


@pytest.mark.parametrize("criterion", sorted(VISIBLE))
def test_each_criterion_is_visible_where_it_is_added(criterion):
    feature = VISIBLE[criterion]
    grew = []
    for i in range(24):
        with_c, without, _ = pair(i, criterion)
        grew.append(feature(with_c) > feature(without))
    assert np.mean(grew) >= 0.85, (criterion, np.mean(grew))


@pytest.fixture(scope="module")
def sample():
    """400 seeded images at 96 px and their hidden truth."""
    rows = synth.plan(200, 200, seed=SEED)
    import io
    from PIL import Image
    images = [np.asarray(Image.open(io.BytesIO(b))) for b in synth.render_rows(rows, SIZE, SEED,
                                                                               synth.DEFAULT_DIFFICULTY)]
    return images, synth.truth(rows, SEED, synth.DEFAULT_DIFFICULTY)


@pytest.mark.parametrize("criterion,feature,floor", [("blue_white_veil", blue_grey, 0.75),
                                                     ("regression", whitish, 0.7),
                                                     ("atypical_vessels", red, 0.6)])
def test_the_truth_file_matches_the_pixels(sample, criterion, feature, floor):
    images, truth = sample
    present = np.array([t[criterion] == "1" for t in truth])
    assert 10 < present.sum() < len(truth) - 10
    assert roc_auc_score(present, [feature(x) for x in images]) > floor


def test_the_truth_file_is_written_and_consistent(tmp_path):
    rows = synth.generate(synth.SynthConfig(out=str(tmp_path / "d"), benign=60, malignant=20, size=32, seed=2))
    with open(tmp_path / "d" / synth.CRITERIA_CSV, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == synth.TRUTH_COLUMNS
    assert [t["image_name"] for t in table] == [r["image_name"] for r in rows]
    for t, r in zip(table, rows):
        assert (t["phenotype"] == "melanoma") == (r["target"] == "1")
        points = sum(w * int(t[c]) for c, w in lesions.SEVEN_POINT.items())
        assert int(t["seven_point"]) == points
        c = sum(int(t[f"colour_{k}"]) for k in lesions.COLOURS)
        d = sum(int(t[f"structure_{k}"]) for k in lesions.STRUCTURES)
        assert int(t["n_colours"]) == c
        tds = 1.3 * int(t["asymmetry"]) + 0.1 * int(t["border_abrupt"]) + 0.5 * max(c, 1) + 0.5 * max(d, 1)
        assert float(t["tds"]) == pytest.approx(tds, abs=0.006)
        for k in lesions.SEVEN_POINT:
            assert (float(t[f"{k}_intensity"]) > 0) == (t[k] == "1")
    # the reader and the oracle agree with it, and a real folder has no truth (None, no error)
    assert data.read_index(tmp_path / "d").names == [t["image_name"] for t in table]
    sev = synth.latent_severity(rows, 2, synth.DEFAULT_DIFFICULTY)
    assert [float(t["s"]) for t in table] == sev.tolist()
    assert synth.read_truth(tmp_path / "d")["ISIC_0000000"]["s"] == table[0]["s"]
    (tmp_path / "d" / synth.CRITERIA_CSV).unlink()
    assert synth.read_truth(tmp_path / "d") is None


def test_artefacts_do_not_follow_the_label_unless_asked():
    def rate(artefact, malignant, bias):
        return np.mean([synth.acquisition(1, i, malignant, 0, bias)[artefact] for i in range(4000)])
    for a in synth.ARTEFACTS:
        assert abs(rate(a, True, 0.0) - rate(a, False, 0.0)) < 0.035, a
    assert rate("ruler", True, 0.8) > 2 * rate("ruler", False, 0.8)
    second = [synth.acquisition(1, i, False, 1, 0.0) for i in range(2000)]
    first = [synth.acquisition(1, i, False, 0, 0.0) for i in range(2000)]
    assert np.mean([a["corners"] for a in second]) > np.mean([a["corners"] for a in first]) + 0.2
    assert max(a["jpeg"] for a in second) < min(a["jpeg"] for a in first)


def test_size_and_contour_are_weak_cues_and_criteria_follow_severity():
    n = 3000
    truth = [lesions.draw(np.random.default_rng([9, m, i]), lesions.severity(np.random.default_rng([8, m, i]),
                                                                             bool(m), 0.04), bool(m))
             for m in (0, 1) for i in range(n)]
    y = np.repeat([0, 1], n)
    mel = [t for t in truth if t.malignant]
    assert 0.55 < roc_auc_score(y, [t.diameter_mm for t in truth]) < 0.7
    assert 0.2 < np.mean([t.diameter_mm < 6 for t in mel]) < 0.4
    assert 0.25 < np.mean([not t.contour_asymmetric for t in mel]) < 0.45
    for c in lesions.SEVEN_POINT:
        auc = roc_auc_score(y, [c in t.criteria for t in truth])
        assert 0.52 < auc <= 0.80, (c, auc)
    benign = {t.phenotype for t in truth if not t.malignant}
    assert benign == set(lesions.BENIGN_PHENOTYPES)
