"""Labels belong to files (not to spellings of names), images the folder layout cannot read are
counted, ``check --strict`` exits 2, and oversized images are refused before they are decoded.

Oracles: the files the tests make themselves (which names are links to which file, which images
sit in subfolders, what size a PNG header declares) and a spy on Pillow's decoder.
"""

import csv
import json
import os
import warnings
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from helpers import bomb_png, make_data
from melano import data


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def reupload(root: Path, rows: list[list], images=("a", "b")) -> Path:
    """A re-upload folder (train.csv + train/) with small JPEGs of the given stems."""
    (root / "train").mkdir(parents=True)
    for n in images:
        Image.new("RGB", (16, 16), (200, 150, 120)).save(root / "train" / f"{n}.jpg")
    write_csv(root / "train.csv", ["image_name", "patient_id", "target"], rows)
    return root


def class_folders(root: Path, benign=("b1", "b2"), malignant=("m1",)) -> Path:
    """A benign/ + malignant/ folder with small JPEGs of the given stems."""
    for sub, names in (("benign", benign), ("malignant", malignant)):
        (root / sub).mkdir(parents=True)
        for n in names:
            Image.new("RGB", (16, 16), (120, 90, 60)).save(root / sub / f"{n}.jpg")
    return root


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def case_sensitive(folder: Path) -> bool:
    (folder / "probe").write_text("")
    try:
        return not (folder / "PROBE").exists()
    finally:
        (folder / "probe").unlink()


# ---------------------------------------------------------------------------------------------
# 1. Two rows that reach one file are an error naming both lines

@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("labels") / "kaggle", benign=6, malignant=2)


@pytest.mark.parametrize("spelling", ["{}.jpg", "{}.JPG", "{}.jpeg", "lower", "lower.Jpg"])
def test_a_second_label_for_a_listed_file_is_an_error_naming_both_lines(kaggle, tmp_path, spelling):
    """The reported case: `ISIC_x.jpg,...,malignant,1` appended to a train.csv that lists ISIC_x
    as benign was read as a second image, and the split put one copy in train, one in test."""
    root = tmp_path / "appended"
    root.mkdir()
    os.symlink(kaggle / "jpeg", root / "jpeg")
    rows = list(csv.DictReader(open(kaggle / "train.csv", newline="")))
    i, first = next((i, r) for i, r in enumerate(rows) if r["target"] == "0")
    name = first["image_name"]
    other = (name.lower() + spelling[5:]) if spelling.startswith("lower") else spelling.format(name)
    rows.append({**first, "image_name": other, "benign_malignant": "malignant", "target": "1"})
    write_csv(root / "train.csv", list(rows[0]), [list(r.values()) for r in rows])
    with pytest.raises(ValueError) as e:
        data.read_index(root)
    msg = str(e.value)
    assert f"lines {i + 2} ({name!r}) and {len(rows) + 1} ({other!r})" in msg
    assert str(root / "train.csv") in msg and f"{name}.jpg" in msg and "remove one of the rows" in msg


@pytest.mark.parametrize("link", ["symlink", "hardlink", "relative symlink"])
def test_two_names_linked_to_one_file_are_an_error(tmp_path, link):
    root = reupload(tmp_path / f"linked-{link.replace(' ', '-')}", [["a", "p1", 0], ["b", "p2", 1]], images=["a"])
    if link == "symlink":
        os.symlink(root / "train" / "a.jpg", root / "train" / "b.jpg")
    elif link == "relative symlink":
        os.symlink("a.jpg", root / "train" / "b.jpg")
    else:
        os.link(root / "train" / "a.jpg", root / "train" / "b.jpg")
    with pytest.raises(ValueError, match=r"train\.csv: lines 2 \('a'\) and 3 \('b'\) both name one image file"):
        data.read_index(root)


def test_a_name_in_other_letter_case_finds_its_file(tmp_path):
    root = reupload(tmp_path / "case", [["isic_0000007", "p1", 0], ["B", "p2", 1]], images=["ISIC_0000007", "b"])
    if not case_sensitive(root):
        pytest.skip("case-insensitive file system")
    index = data.read_index(root)
    assert index.names == ["isic_0000007", "B"] and not index.skipped
    assert [Path(r.path).name for r in index.records] == ["ISIC_0000007.jpg", "b.jpg"]


def test_files_that_differ_only_in_case_keep_exact_matching(tmp_path):
    root = reupload(tmp_path / "twocase", [["ab", "p1", 0], ["AB", "p2", 1], ["Ab", "p3", 1]], images=["ab", "AB"])
    if not case_sensitive(root):
        pytest.skip("case-insensitive file system")
    index = data.read_index(root)  # two files, two labels: no error
    assert [(r.image_name, Path(r.path).name) for r in index.records] == [("ab", "ab.jpg"), ("AB", "AB.jpg")]
    assert [s.name for s in index.skipped] == ["Ab"]
    assert "several files match it ignoring letter case (AB, ab)" in index.skipped[0].reason


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_file_linked_into_both_class_folders_is_an_error(tmp_path, link):
    root = class_folders(tmp_path / f"both-{link}", benign=["x"], malignant=["m1"])
    (os.symlink if link == "symlink" else os.link)(root / "benign" / "x.jpg", root / "malignant" / "y.jpg")
    with pytest.raises(ValueError) as e:
        data.read_index(root)
    msg = str(e.value)
    assert str(root / "benign" / "x.jpg") in msg and str(root / "malignant" / "y.jpg") in msg
    assert "same file" in msg and "cannot be both benign and malignant" in msg


def test_a_file_linked_twice_into_one_class_folder_is_an_error(tmp_path):
    root = class_folders(tmp_path / "twice", benign=["x"], malignant=["m1"])
    os.link(root / "benign" / "x.jpg", root / "benign" / "x2.jpg")
    with pytest.raises(ValueError, match=r"x\.jpg and .*x2\.jpg are the same file.*count twice"):
        data.read_index(root)


# ---------------------------------------------------------------------------------------------
# 2. Images the folder layout cannot read are counted skips, not silently ignored

def test_images_in_subfolders_are_counted_skips(tmp_path, capsys, caplog):
    root = class_folders(tmp_path / "nested")
    (root / "benign" / "sub").mkdir()
    Image.new("RGB", (16, 16)).save(root / "benign" / "sub" / "x.jpg")
    (root / "malignant" / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(root / "malignant" / "a" / "b" / "y.PNG")
    (root / "benign" / "sub" / "notes.txt").write_text("not an image")
    index = data.read_index(root)
    assert sorted(index.names) == ["b1", "b2", "m1"]
    assert [s.name for s in index.skipped] == ["benign/sub/x.jpg", "malignant/a/b/y.PNG"]
    reason = index.skipped[0].reason
    assert f"subfolder {root / 'benign' / 'sub'}/" in reason and f"move it up a level into {root / 'benign'}/" in reason
    with pytest.raises(ValueError, match=r"2 image\(s\) were skipped: benign/sub/x\.jpg.*strict"):
        data.read_index(root, strict=True)
    assert data.main(["check", str(root), "--json", "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == ["benign/sub/x.jpg", "malignant/a/b/y.PNG"]
    assert data.main(["check", str(root), "--strict", "--workers", "1"]) == 2
    assert data.main(["cache", str(root), "--strict", "--cache-dir", str(tmp_path / "c"), "--workers", "1"]) == 2


def test_broken_links_are_counted_skips_in_the_csv_layout(tmp_path):
    rows = [["a", "p1", 0], ["gone", "p2", 1], ["loop", "p3", 1]]
    root = reupload(tmp_path / "csvlinks", rows, images=["a"])
    os.symlink(root / "train" / "nowhere.jpg", root / "train" / "gone.jpg")
    os.symlink("loop.jpg", root / "train" / "loop.jpg")
    index = data.read_index(root)
    assert index.names == ["a"]
    assert [(s.name, s.reason.split(":")[0]) for s in index.skipped] == [("gone", "broken link"), ("loop", "link loop")]
    assert "nowhere.jpg, which does not exist" in index.skipped[0].reason
    cache = data.build_cache(index, 16, tmp_path / "c", workers=1)  # stat'ed every record: crashed on the link
    assert cache.names == ["a"]


def test_broken_links_are_counted_skips_in_the_folder_layout(tmp_path, capsys):
    root = class_folders(tmp_path / "dirlinks")
    os.symlink(root / "benign" / "deleted.jpg", root / "benign" / "d.jpg")
    os.symlink("e.png", root / "malignant" / "e.png")
    index = data.read_index(root)
    assert sorted(index.names) == ["b1", "b2", "m1"]
    assert [(s.name, s.reason.split(":")[0]) for s in index.skipped] == [("benign/d.jpg", "broken link"),
                                                                         ("malignant/e.png", "link loop")]
    assert data.main(["check", str(root), "--json", "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == ["benign/d.jpg", "malignant/e.png"]


# ---------------------------------------------------------------------------------------------
# 3. check --strict: an input error like the others, exit 2 and one line

def test_check_strict_exits_2_with_one_error_line(tmp_path, caplog):
    root = reupload(tmp_path / "strict", [["a", "p1", 0], ["gone", "p2", 1], ["b", "p3", 1]])
    assert data.main(["check", str(root), "--workers", "1"]) == 0
    assert errors(caplog) == []
    assert data.main(["check", str(root), "--strict", "--workers", "1"]) == 2
    (line,) = errors(caplog)
    assert "1 image(s) skipped" in line and "--strict makes that fatal" in line and str(root) in line


# ---------------------------------------------------------------------------------------------
# 4. Decompression bombs: refused from the header, before decoding

@pytest.fixture
def decodes(monkeypatch) -> list:
    """Every decode Pillow does (ImageFile.load) while the test runs."""
    calls, real = [], ImageFile.ImageFile.load

    def load(im):
        calls.append(im.size)
        return real(im)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


def test_an_oversized_image_is_refused_before_decoding(tmp_path, decodes):
    bomb = bomb_png(tmp_path / "bomb.png", 10_000, 10_000)  # over Pillow's warning size, 89 M pixels
    assert bomb.stat().st_size < 100_000
    with pytest.warns(Image.DecompressionBombWarning), Image.open(bomb) as im:  # what load_image silences
        assert im.size == (10_000, 10_000)  # a real image of that size, as far as Pillow can tell
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ValueError) as e:
            data.load_image(bomb, 32)
    assert str(e.value).startswith(f"{bomb}: 10000 x 10000 = 100000000 pixels, over the limit of 64000000;")
    assert "--max-pixels" in str(e.value) and "if the image is real" in str(e.value)
    assert decodes == []  # refused from the header: nothing was decoded
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert data.MAX_PIXELS == 64_000_000


def test_pillows_own_bomb_error_becomes_a_value_error_naming_the_file(tmp_path, decodes):
    bomb = bomb_png(tmp_path / "huge.png", 15_000, 12_000)  # 180 M: over Pillow's hard limit
    for limit in (data.MAX_PIXELS, 10**9):  # melano's limit cannot lift Pillow's
        with pytest.raises(ValueError, match=rf"^{bomb}: refused as a possible decompression bomb \(.*180000000"):
            data.load_image(bomb, 32, max_pixels=limit)
    assert decodes == []


def test_the_limit_is_a_keyword_and_the_default_reads_normal_images(tmp_path, decodes):
    p = tmp_path / "small.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(p)
    with pytest.raises(ValueError, match=rf"^{p}: 64 x 48 = 3072 pixels, over the limit of 3071;"):
        data.load_image(p, 16, max_pixels=3071)
    assert decodes == []
    assert data.load_image(p, 16, max_pixels=3072)[0, 0].tolist() == [10, 200, 30]  # at the limit: read
    assert data.load_image(p, 16).shape == (16, 16, 3)
    assert decodes and set(decodes) == {(64, 48)}  # the spy does see real decodes


def test_an_oversized_image_in_a_folder_is_a_counted_skip(tmp_path, capsys):
    root = reupload(tmp_path / "bombs", [["a", "p1", 0], ["bomb", "p2", 1], ["b", "p3", 1]])
    bomb_png(root / "train" / "bomb.png", 9_000, 8_000)  # 72 M pixels: under Pillow's limits, over melano's
    index = data.read_index(root)
    (bad,) = data.verify_images(index, workers=1)
    assert bad.name == "bomb" and "9000 x 8000 = 72000000 pixels, over the limit" in bad.reason
    cache = data.build_cache(index, 16, tmp_path / "c", workers=1)
    assert cache.names == ["a", "b"] and [s.name for s in cache.skipped] == ["bomb"]
    # the CLI's --max-pixels: here it refuses the 16 x 16 images too, and gives the cache another key
    assert data.main(["check", str(root), "--json", "--workers", "1", "--max-pixels", "255"]) == 2  # none usable
    assert data.main(["check", str(root), "--json", "--workers", "1", "--max-pixels", "256"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["skipped"] == ["bomb"]
    assert data.cache_key(index, 16, 256) != data.cache_key(index, 16) == data.cache_key(index, 16, data.MAX_PIXELS)
    assert data.main(["cache", str(root), "--max-pixels", "0", "--cache-dir", str(tmp_path / "c")]) == 2
