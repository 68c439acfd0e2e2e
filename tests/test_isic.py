"""The ISIC Archive (isic-cli), ISIC 2019 and HAM10000 readers, built from the sources' real header
strings on small generated images: labels, grouping, counts, licences, and the bad cases.

Oracles: the rows written here by hand (each row's expected label and group is stated beside it),
and the Kaggle-layout reader on the same images (the built-in set converted to the Archive layout).
"""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import (ARCHIVE_HEADER, ARCHIVE_MEL as MEL, call, clf_train_argv, kaggle_to_archive, read_csv,
                     refused, trained)
from melano import classifier, data, synth
from melano.data import isic

NEVI = "Benign melanocytic proliferations"
ISIC2019_HEADER = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
ISIC2019_META_HEADER = ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]
HAM_HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


# (isic_id, licence, diagnosis_1, diagnosis_2, lesion_id, patient_id) -> expected (target, group)
ARCHIVE_ROWS = [
    ("ISIC_0000001", "CC-0", "Malignant", MEL, "IL_1", "IP_1"),                      # melanoma, patient IP_1
    ("ISIC_0000002", "CC-BY", "Benign", NEVI, "IL_1", ""),                            # nevus: lesion IL_1 -> IP_1
    ("ISIC_0000003", "CC-BY", "Malignant", "Malignant adnexal epithelial proliferations - Follicular", "IL_3", ""),
    ("ISIC_0000004", "CC-BY-NC", "Benign", "Benign epidermal proliferations", "", ""),  # other benign, by image
    ("ISIC_0000005", "CC-0", "Indeterminate", "Indeterminate melanocytic proliferations", "IL_5", "IP_5"),
    ("ISIC_0000006", "CC-0", "", "", "", "IP_6"),                                     # unknown
    ("ISIC_0000007", "CC-0", "Benign", NEVI, "IL_7", "IP_7"),
]


def archive(root: Path, rows=ARCHIVE_ROWS, header=ARCHIVE_HEADER) -> Path:
    for i, r in enumerate(rows):
        image(root / f"{r[0]}.jpg", i)
    full = [[i, "Some Clinic", lic, "45", "torso", d1, d2, "", "dermoscopic", les, pat, "male"]
            for i, lic, d1, d2, les, pat in rows]
    write_csv(root / "metadata.csv", header, [[dict(zip(ARCHIVE_HEADER, r))[c] for c in header] for r in full])
    (root / "attribution.txt").write_text("Some Clinic\n")
    (root / "licenses").mkdir()
    for lic in ("CC-0", "CC-BY", "CC-BY-NC"):
        (root / "licenses" / f"{lic}.txt").write_text(f"{lic} licence text\n")
    return root


def isic2019(root: Path, truth=None, lesions=None) -> Path:
    truth = truth or [("ISIC_0000000", "MEL"), ("ISIC_0000001", "NV"), ("ISIC_0000002", "BCC"),
                      ("ISIC_0000003", "UNK"), ("ISIC_0000004", "NV"), ("ISIC_0000005_downsampled", "SCC")]
    lesions = lesions or {"ISIC_0000000": "BCN_0000001", "ISIC_0000001": "BCN_0000001", "ISIC_0000004": "HAM_0000004"}
    folder = root / isic.ISIC2019_DIR
    for i, (name, _) in enumerate(truth):
        image(folder / f"{name}.jpg", i)
    (folder / "ATTRIBUTION.txt").write_text("BCN_20000, HAM10000, MSK\n")
    (folder / "LICENSE.txt").write_text("CC-BY-NC\n")
    write_csv(root / isic.ISIC2019_CSV, ISIC2019_HEADER,
              [[n] + ["1.0" if c == k else "0.0" for c in ISIC2019_HEADER[1:]] for n, k in truth])
    write_csv(root / isic.ISIC2019_META, ISIC2019_META_HEADER,
              [[n, "55", "anterior torso", lesions.get(n, ""), "female"] for n, _ in truth])
    return root


HAM_ROWS = [("HAM_0000118", "ISIC_0027419", "bkl"), ("HAM_0000118", "ISIC_0025030", "bkl"),
            ("HAM_0002730", "ISIC_0026769", "mel"), ("HAM_0002730", "ISIC_0025661", "mel"),
            ("HAM_0001466", "ISIC_0031633", "nv"), ("HAM_0002761", "ISIC_0029176", "bcc"),
            ("HAM_0005132", "ISIC_0025837", "akiec"), ("HAM_0001396", "ISIC_0025276", "df"),
            ("HAM_0003333", "ISIC_0030001", "mel"), ("HAM_0004444", "ISIC_0030002", "mel"),
            ("HAM_0004444", "ISIC_0030003", "mel"), ("HAM_0005555", "ISIC_0030004", "nv")]


def ham(root: Path, rows=HAM_ROWS) -> Path:
    for i, (_, name, _) in enumerate(rows):
        image(root / isic.HAM_DIRS[i % 2] / f"{name}.jpg", i)  # split over the two parts
    write_csv(root / isic.HAM_CSV, HAM_HEADER, [[les, name, dx, "histo", "80.0", "male", "scalp"]
                                                for les, name, dx in rows])
    return root


def check_json(root, capsys, *flags) -> dict:
    capsys.readouterr()
    assert data.main(["check", str(root), "--json", "--workers", "1", *flags]) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------
# The three sources

def test_archive_labels_groups_counts_and_licences(tmp_path, capsys):
    root = archive(tmp_path / "archive")
    index = data.read_index(root)
    assert index.layout == "archive"
    assert index.names == ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003", "ISIC_0000004", "ISIC_0000007"]
    assert index.targets.tolist() == [1, 0, 0, 0, 0]  # the carcinoma (row 3) is a negative, as in ISIC 2020
    assert index.patients == ["IP_1", "IP_1", "IL_3", "ISIC_0000004", "IP_7"]
    assert index.records[0].extra["diagnosis_2"] == MEL and index.records[0].extra["image_type"] == "dermoscopic"
    out = check_json(root, capsys)
    assert out["rows"] == {"melanoma": 1, "nevus": 2, "other_benign": 1, "other_malignant": 1, "indeterminate": 1,
                           "unknown": 1, "left_out_by_negatives": 0}
    assert out["grouping"] == {"patient_id": 3, "lesion_id": 1, "image": 1}
    assert out["licences"] == {"CC-0": 2, "CC-BY": 2, "CC-BY-NC": 1}  # over the images kept
    assert [Path(p).name for p in out["licence_files"]] == ["CC-0.txt", "CC-BY-NC.txt", "CC-BY.txt"]
    assert out["attribution"] == str(root / "attribution.txt")
    assert (out["images"], out["malignant"], out["patients"]) == (5, 1, 4)


def test_nevi_only_leaves_the_other_lesions_out(tmp_path, capsys):
    root = archive(tmp_path / "archive")
    index = data.read_index(root, negatives="nevi")
    assert index.names == ["ISIC_0000001", "ISIC_0000002", "ISIC_0000007"] and index.targets.tolist() == [1, 0, 0]
    out = check_json(root, capsys, "--negatives", "nevi")
    assert out["rows"]["left_out_by_negatives"] == 2 and out["rows"]["other_malignant"] == 1
    assert out["negatives"] == "nevi" and out["images"] == 3


def test_archive_older_diagnosis_fields(tmp_path):
    """ISIC 2020's rows in the Archive carry the older diagnosis / benign_malignant fields."""
    root = tmp_path / "old"
    header = ["isic_id", "attribution", "copyright_license", "benign_malignant", "diagnosis", "patient_id"]
    rows = [["ISIC_1", "A", "CC-0", "malignant", "melanoma", "IP_1"], ["ISIC_2", "A", "CC-0", "benign", "nevus", "IP_1"],
            ["ISIC_3", "A", "CC-0", "benign", "unknown", "IP_2"], ["ISIC_4", "A", "CC-0", "", "", "IP_3"],
            ["ISIC_5", "A", "CC-0", "indeterminate/malignant", "", "IP_4"]]
    for i, r in enumerate(rows):
        image(root / f"{r[0]}.jpg", i)
    write_csv(root / "metadata.csv", header, rows)
    index = data.read_index(root)
    assert index.names == ["ISIC_1", "ISIC_2", "ISIC_3"] and index.targets.tolist() == [1, 0, 0]
    assert index.counts["unknown"] == 1 and index.counts["indeterminate"] == 1
    assert data.read_index(root, negatives="nevi").names == ["ISIC_1", "ISIC_2"]


def test_isic2019_one_hot_and_lesion_groups(tmp_path, capsys):
    root = isic2019(tmp_path / "2019")
    index = data.read_index(root)
    assert index.layout == "isic2019"
    assert index.names == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002", "ISIC_0000004", "ISIC_0000005_downsampled"]
    assert index.targets.tolist() == [1, 0, 0, 0, 0]
    assert index.patients == ["BCN_0000001", "BCN_0000001", "ISIC_0000002", "HAM_0000004", "ISIC_0000005_downsampled"]
    out = check_json(root, capsys)
    assert out["rows"] == {"melanoma": 1, "nevus": 2, "other_benign": 0, "other_malignant": 2, "indeterminate": 0,
                           "unknown": 1, "left_out_by_negatives": 0}
    assert out["grouping"] == {"lesion_id": 3, "image": 2}
    assert out["attribution"].endswith("ATTRIBUTION.txt") and out["licence_files"][0].endswith("LICENSE.txt")
    assert data.read_index(root, negatives="nevi").names == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000004"]


def test_ham10000_two_folders_grouped_by_lesion(tmp_path, capsys):
    root = ham(tmp_path / "ham")
    index = data.read_index(root)
    assert index.layout == "ham10000"
    assert index.names == [n for _, n, _ in HAM_ROWS] and index.patients == [les for les, _, _ in HAM_ROWS]
    assert index.targets.tolist() == [int(dx == "mel") for _, _, dx in HAM_ROWS]
    assert {Path(r.path).parent.name for r in index.records} == set(isic.HAM_DIRS)
    out = check_json(root, capsys)
    assert out["grouping"] == {"lesion_id": 12} and out["patients"] == 9
    assert (out["rows"]["other_malignant"], out["rows"]["other_benign"]) == (2, 3)
    assert out["licences"] == {} and out["attribution"] is None
    # a lesion's images stay in one split: a split by image would leak them into the test set
    split = data.make_split(index, tmp_path / "splits.csv", 0.25, 0.25, seed=1)
    where = {n: s for s, names in split.items() for n in names}
    for les in {les for les, _, _ in HAM_ROWS}:
        assert len({where[n] for l2, n, _ in HAM_ROWS if l2 == les}) == 1


def test_archive_layout_of_the_builtin_set_reads_as_the_kaggle_one(tmp_path):
    """The built-in set, converted to isic-cli's layout, gives the same images, labels, groups,
    cache and split as its Kaggle layout."""
    kag = tmp_path / "kaggle"
    synth.generate(synth.SynthConfig(out=str(kag), benign=40, malignant=16, size=32, seed=2, images_per_patient=2.0))
    arc = kaggle_to_archive(kag, tmp_path / "archive")
    a, k = data.read_index(arc), data.read_index(kag)
    assert (a.names, a.targets.tolist(), a.patients) == (k.names, k.targets.tolist(), k.patients)
    ca, ck = data.build_cache(a, 16, tmp_path / "ca"), data.build_cache(k, 16, tmp_path / "ck")
    assert np.array_equal(np.asarray(ca.images), np.asarray(ck.images))
    assert data.make_split(ca, tmp_path / "sa.csv", seed=3) == data.make_split(ck, tmp_path / "sk.csv", seed=3)
    # a classifier trained on either folder (same options, each drawing its own split) scores the same
    for folder in (kag, arc):
        trained(classifier.main, clf_train_argv(folder, tmp_path / f"run_{folder.name}", max_steps=2))
    pa, pk = (read_csv(tmp_path / f"run_{f.name}" / "test_predictions.csv") for f in (arc, kag))
    assert pa == pk and len(pa) > 0


def test_kaggle_nevi_only_uses_the_diagnosis_column(tmp_path):
    root = tmp_path / "k"
    names = ["ISIC_1", "ISIC_2", "ISIC_3", "ISIC_4"]
    for i, n in enumerate(names):
        image(root / "jpeg" / "train" / f"{n}.jpg", i)
    write_csv(root / "train.csv", ["image_name", "patient_id", "diagnosis", "target"],
              [["ISIC_1", "P1", "melanoma", 1], ["ISIC_2", "P1", "nevus", 0], ["ISIC_3", "P2", "unknown", 0],
               ["ISIC_4", "P2", "seborrheic keratosis", 0]])
    index = data.read_index(root, negatives="nevi")
    assert index.names == ["ISIC_1", "ISIC_2"] and index.counts == {"left_out_by_negatives": 2}
    assert data.read_index(root).names == names and data.read_index(root).grouping == {"patient_id": 4}


# ---------------------------------------------------------------------------------------------
# Bad input: a one-line error naming the file, or a counted skip

def _archive_without(col):
    def build(root):
        header = [c for c in ARCHIVE_HEADER if c != col]
        return archive(root, header=header)
    return build


def _edit(builder, csv_name, old, new):
    def build(root):
        builder(root)
        p = root / csv_name
        p.write_text(p.read_text().replace(old, new, 1))
        return root
    return build


BAD = {
    "archive: no isic_id": (_archive_without("isic_id"), "'isic_id'"),
    "archive: no diagnosis": (lambda r: archive(r, header=[c for c in ARCHIVE_HEADER if "diagnosis" not in c]),
                              "no diagnosis column"),
    "archive: odd diagnosis_1": (_edit(archive, "metadata.csv", "Indeterminate,", "Maybe,"), "diagnosis_1 'Maybe'"),
    "archive: duplicate id": (_edit(archive, "metadata.csv", "ISIC_0000002", "ISIC_0000001"), "appears twice"),
    "2019: no MEL column": (_edit(isic2019, isic.ISIC2019_CSV, ",MEL,", ",MELANOMA,"), "'MEL'"),
    "2019: two ones": (_edit(isic2019, isic.ISIC2019_CSV, "ISIC_0000001,0.0", "ISIC_0000001,1.0"),
                       "2 classes are 1 (MEL, NV)"),
    "2019: no one": (_edit(isic2019, isic.ISIC2019_CSV, "ISIC_0000001,0.0,1.0", "ISIC_0000001,0.0,0.0"),
                     "0 classes are 1"),
    "2019: not 0/1": (_edit(isic2019, isic.ISIC2019_CSV, "ISIC_0000001,0.0", "ISIC_0000001,0.5"), "'0.5'"),
    "2019: duplicate id": (_edit(isic2019, isic.ISIC2019_CSV, "ISIC_0000001,", "ISIC_0000000,"), "appears twice"),
    "2019: metadata without lesion_id": (_edit(isic2019, isic.ISIC2019_META, "lesion_id", "lesion"), "'lesion_id'"),
    "ham: no dx": (_edit(ham, isic.HAM_CSV, ",dx,", ",diagnosis,"), "'dx'"),
    "ham: unknown dx": (_edit(ham, isic.HAM_CSV, ",df,", ",melanoma,"), "dx 'melanoma'"),
    "ham: duplicate id": (_edit(ham, isic.HAM_CSV, "ISIC_0025030", "ISIC_0027419"), "appears twice"),
    "ham: no image folders": (lambda r: [ham(r), *(shutil.rmtree(r / d) for d in isic.HAM_DIRS)][0], "unpack"),
    "two sources in one folder": (lambda r: ham(archive(r)), "several sources"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_naming_the_problem(tmp_path, caplog, case):
    build, words = BAD[case]
    root = build(tmp_path / "d")
    with pytest.raises(ValueError) as e:
        data.read_index(root)
    assert words in str(e.value) and "\n" not in str(e.value)
    caplog.clear()
    assert call(data.main, ["check", root, "--workers", "1"]) == 2
    refused(caplog, words)


def test_missing_images_are_counted_skips(tmp_path, capsys):
    root = ham(tmp_path / "ham")
    (root / isic.HAM_DIRS[1] / "ISIC_0025030.jpg").unlink()
    index = data.read_index(root)
    assert [s.name for s in index.skipped] == ["ISIC_0025030"] and len(index) == len(HAM_ROWS) - 1
    assert "not found" in index.skipped[0].reason
    assert check_json(root, capsys)["skipped"] == ["ISIC_0025030"]
    with pytest.raises(ValueError, match="ISIC_0025030"):
        data.read_index(root, strict=True)


def test_negatives_option_is_checked(tmp_path):
    root = archive(tmp_path / "a")
    with pytest.raises(ValueError, match="negatives must be one of"):
        data.read_index(root, negatives="benign")
    fo = tmp_path / "fo"
    image(fo / "benign" / "a.jpg", 0)
    image(fo / "malignant" / "b.jpg", 1)
    with pytest.raises(ValueError, match="no diagnosis"):
        data.read_index(fo, negatives="nevi")
