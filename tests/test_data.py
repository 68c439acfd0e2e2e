"""The ISIC reader, bad input, the uint8 cache, the patient-grouped split, datasets and loaders.

Oracles: the csv module on the written train.csv, Pillow/numpy decodes of the same files,
torchvision's resize + center_crop for the resized cache rows.
"""

import csv
import json
import logging
import os
import pickle
import shutil
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision.io import decode_image

from melano import data, synth


@pytest.fixture(scope="module")
def isic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("isic")
    synth.generate(synth.SynthConfig(out=str(root), benign=60, malignant=20, size=48, seed=4))
    return root


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# ---------------------------------------------------------------------------------------------
# Reader

def test_kaggle_layout_matches_the_csv(isic):
    index = data.read_index(isic)
    rows = csv_rows(isic / "train.csv")
    assert index.layout == "kaggle" and not index.skipped
    assert index.names == [r["image_name"] for r in rows]
    assert index.targets.tolist() == [int(r["target"]) for r in rows]
    assert index.patients == [r["patient_id"] for r in rows]
    rec = index.records[0]
    assert Path(rec.path) == isic / "jpeg" / "train" / f"{rec.image_name}.jpg"
    assert rec.extra["anatom_site_general_challenge"] == rows[0]["anatom_site_general_challenge"]
    assert set(rec.extra) == {"sex", "age_approx", "anatom_site_general_challenge", "diagnosis", "benign_malignant"}


def test_reupload_and_folder_layouts_read_the_same_labels(isic, tmp_path):
    kaggle = data.read_index(isic)
    re = tmp_path / "re"
    (re / "train").mkdir(parents=True)
    shutil.copy(isic / "train.csv", re / "train.csv")
    for i, r in enumerate(kaggle.records):  # a mix of .jpg, .jpeg and .png
        src = Path(r.path)
        if i % 3 == 0:
            Image.open(src).save(re / "train" / f"{r.image_name}.png")
        else:
            shutil.copy(src, re / "train" / (r.image_name + (".jpeg" if i % 3 == 1 else ".jpg")))
    index = data.read_index(re)
    assert index.layout == "reupload"
    assert index.names == kaggle.names and index.targets.tolist() == kaggle.targets.tolist()
    assert index.patients == kaggle.patients

    fo = tmp_path / "fo"
    for r in kaggle.records:
        d = fo / ("malignant" if r.target else "benign")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(r.path, d / Path(r.path).name)
    index = data.read_index(fo)
    assert index.layout == "folders"
    truth = dict(zip(kaggle.names, kaggle.targets.tolist()))
    assert sorted(index.names) == sorted(truth)
    assert all(truth[n] == t for n, t in zip(index.names, index.targets.tolist()))
    assert index.patients == index.names  # no patient ids in this layout


def _csv_folder(tmp_path: Path, header, rows, images=("a", "b")) -> Path:
    (tmp_path / "train").mkdir(exist_ok=True)
    for n in images:
        Image.new("RGB", (8, 8), (200, 150, 120)).save(tmp_path / "train" / f"{n}.jpg")
    write_csv(tmp_path / "train.csv", header, rows)
    return tmp_path


@pytest.mark.parametrize("header,rows,pattern", [
    (["name", "target"], [["a", 0]], r"train\.csv: required column 'image_name' is missing"),
    (["image_name", "patient_id"], [["a", "p"]], r"train\.csv: required column 'target' is missing"),
    (["image_name", "target"], [["a", 0], ["b", 1], ["a", 1]], r"'a' appears twice, on lines 2 and 4"),
    (["image_name", "target"], [["a", 0], ["b", 2]], r"line 3 \(image 'b'\): target '2' is not 0 or 1"),
    (["image_name", "target"], [["a", "yes"]], r"line 2 \(image 'a'\): target 'yes'"),
    (["image_name", "target"], [["a", ""]], r"line 2 \(image 'a'\): target ''"),
    (["image_name", "benign_malignant", "target"], [["a", "benign", 1]], r"line 2.*contradict"),
])
def test_csv_errors_name_the_file_and_line(tmp_path, header, rows, pattern):
    root = _csv_folder(tmp_path, header, rows)
    with pytest.raises(ValueError, match=pattern):
        data.read_index(root)


def test_duplicate_files_are_errors(tmp_path):
    (tmp_path / "x").mkdir()
    root = _csv_folder(tmp_path / "x", ["image_name", "target"], [["a", 0]])
    Image.new("RGB", (8, 8)).save(root / "train" / "a.png")
    with pytest.raises(ValueError, match="duplicate image name 'a'"):
        data.read_index(root)
    fo = tmp_path / "fo"
    for sub in ("benign", "malignant"):
        (fo / sub).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(fo / sub / "same.jpg")
    with pytest.raises(ValueError, match="cannot be both benign and malignant"):
        data.read_index(fo)


def test_missing_files_are_skipped_or_fatal(tmp_path, caplog):
    root = _csv_folder(tmp_path, ["image_name", "patient_id", "target"],
                       [["a", "p1", 0], ["gone", "p2", 1], ["b", "p3", 1]])
    with caplog.at_level(logging.WARNING):
        index = data.read_index(root)
    assert index.names == ["a", "b"] and [s.name for s in index.skipped] == ["gone"]
    assert "1 image(s) are missing: gone" in caplog.text
    with pytest.raises(ValueError, match="gone.*strict"):
        data.read_index(root, strict=True)


def test_unusable_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        data.read_index(tmp_path / "nope")
    with pytest.raises(ValueError, match="unrecognised layout"):
        data.read_index(tmp_path)
    (tmp_path / "benign").mkdir()
    with pytest.raises(ValueError, match="no malignant/ folder"):
        data.read_index(tmp_path)
    shutil.rmtree(tmp_path / "benign")
    write_csv(tmp_path / "train.csv", ["image_name", "target"], [["a", 0]])
    with pytest.raises(ValueError, match="neither .*jpeg/train"):
        data.read_index(tmp_path)


# ---------------------------------------------------------------------------------------------
# Cache

def test_cache_equals_a_direct_decode(isic, tmp_path):
    index = data.read_index(isic)
    native = data.build_cache(index, 48, tmp_path, workers=1)
    assert native.names == index.names and native.targets.tolist() == index.targets.tolist()
    for r in index.records[:20]:
        ref = np.asarray(Image.open(r.path).convert("RGB"))
        np.testing.assert_array_equal(native.images[native.row(r.image_name)], ref)
    small = data.build_cache(index, 32, tmp_path, workers=1)
    assert small.path != native.path and small.images.shape == (80, 32, 32, 3)
    for r in index.records[:20]:  # torchvision oracle: resize the shorter side, centre crop
        ref = TF.resize(decode_image(r.path), 32, antialias=True).permute(1, 2, 0).numpy()
        diff = np.abs(small.images[small.row(r.image_name)].astype(int) - ref.astype(int))
        assert diff.mean() < 1.0 and diff.max() <= 12


def test_worker_pool_build_equals_serial_build(isic, tmp_path):
    index = data.read_index(isic)
    a = data.build_cache(index, 24, tmp_path / "a", workers=1)
    b = data.build_cache(index, 24, tmp_path / "b", workers=2)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))


def _png16(path: Path, a: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """A re-upload folder of odd but valid images (with their expected RGB) and broken files."""
    root = tmp_path_factory.mktemp("odd")
    d = root / "train"
    d.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    rgb = np.stack([yy * 8, xx * 8, (yy + xx) * 4], -1).astype(np.uint8)  # smooth: JPEG-friendly
    expect = {}
    Image.fromarray(rgb).convert("L").save(d / "gray.jpg", quality=95)
    g = np.asarray(Image.open(d / "gray.jpg"))
    expect["gray"] = (np.repeat(g[..., None], 3, 2), 0, 0)
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg", quality=98)
    expect["cmyk"] = (rgb, 3, 16)  # lossy: compared with the RGB it came from
    rgba = np.concatenate([rgb, rng.integers(0, 256, (32, 32, 1), dtype=np.uint8)], 2)
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    expect["rgba"] = (rgb, 0, 0)
    g16 = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
    Image.fromarray(g16).save(d / "gray16.png")
    expect["gray16"] = (np.repeat(np.round(g16 / 257).astype(np.uint8)[..., None], 3, 2), 0, 0)
    rgb16 = rng.integers(0, 65536, (32, 32, 3), dtype=np.uint16)
    _png16(d / "rgb16.png", rgb16)
    expect["rgb16"] = ((rgb16 >> 8).astype(np.uint8), 1, 1)  # high byte (or rounded)
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(d / "palette.png")
    expect["palette"] = (np.array(pal.getpalette()[:48], np.uint8).reshape(16, 3)[np.asarray(pal)], 0, 0)
    # a non-square image: resized on its shorter side and centre-cropped (torchvision oracle)
    wide = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
    wide = np.array(Image.fromarray(wide).filter(ImageFilter.GaussianBlur(4)))
    Image.fromarray(wide).save(d / "wide.png")
    t = TF.center_crop(TF.resize(torch.from_numpy(wide).permute(2, 0, 1), 32, antialias=True), 32)
    expect["wide"] = (t.permute(1, 2, 0).numpy(), 1.0, 8)  # sub-pixel crop offsets differ
    # a JPEG large enough to be decoded at a reduced DCT scale (Pillow's draft mode)
    big = np.array(Image.fromarray(rng.integers(0, 256, (160, 208, 3), dtype=np.uint8)).filter(
        ImageFilter.GaussianBlur(6)))
    Image.fromarray(big).save(d / "big.jpg", quality=95)
    t = TF.center_crop(TF.resize(decode_image(str(d / "big.jpg")), 32, antialias=True), 32)
    expect["big"] = (t.permute(1, 2, 0).numpy(), 1.0, 8)
    good = (d / "gray.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "garbage.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (d / "empty.png").write_bytes(b"")
    names = list(expect) + ["truncated", "garbage", "empty"]
    write_csv(root / "train.csv", ["image_name", "patient_id", "target"],
              [[n, f"p{i}", i % 2] for i, n in enumerate(names)])
    return root, expect


def test_conversions_and_broken_files(odd, tmp_path, caplog):
    root, expect = odd
    index = data.read_index(root)
    with caplog.at_level(logging.WARNING):
        cache = data.build_cache(index, 32, tmp_path, workers=1)
    assert sorted(s.name for s in cache.skipped) == ["empty", "garbage", "truncated"]
    assert "3 image(s) could not be decoded" in caplog.text and "truncated" in caplog.text
    assert cache.names == list(expect)  # the broken rows were compacted away, order kept
    assert cache.targets.tolist() == [i % 2 for i in range(len(expect))]
    for name, (ref, mean_tol, max_tol) in expect.items():
        diff = np.abs(cache.images[cache.row(name)].astype(int) - ref.astype(int))
        assert diff.mean() <= mean_tol and diff.max() <= max_tol, (name, diff.mean(), diff.max())
    with pytest.raises(KeyError, match="truncated"):
        cache.row("truncated")
    with pytest.raises(ValueError, match="3 image.*strict"):
        data.build_cache(index, 16, tmp_path, workers=1, strict=True)


def test_cache_is_reused_and_keyed_by_the_files(isic, tmp_path, monkeypatch):
    root = tmp_path / "copy"
    shutil.copytree(isic, root)
    index = data.read_index(root)
    first = data.build_cache(index, 16, tmp_path / "c", workers=1)
    monkeypatch.setattr(data.cache, "decode_all", lambda *a, **k: pytest.fail("rebuilt a finished cache"))
    again = data.build_cache(data.read_index(root), 16, tmp_path / "c", workers=1)
    assert again.path == first.path
    monkeypatch.undo()
    p = Path(index.records[3].path)
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))  # a changed file
    changed = data.build_cache(data.read_index(root), 16, tmp_path / "c", workers=1)
    assert changed.path != first.path


def test_a_killed_build_is_never_used(isic, tmp_path, monkeypatch):
    index = data.read_index(isic)
    real, calls = data.load_image, []

    def dies(path, size):
        calls.append(path)
        if len(calls) == 10:
            raise KeyboardInterrupt  # stands in for a kill in the middle of the build
        return real(path, size)

    monkeypatch.setattr(data.images, "load_image", dies)
    with pytest.raises(KeyboardInterrupt):
        data.build_cache(index, 16, tmp_path, workers=1)
    assert list(tmp_path.iterdir()) == []  # nothing that looks like a cache, nothing left over
    monkeypatch.undo()
    # a SIGKILLed build leaves its temporary folder: it is ignored, then cleaned up
    key = data.cache_key(index, 16)[:16]
    host = socket.gethostname().replace("-", "_")
    prefix = f".{Path(index.root).resolve().name}-16-{key}.tmp"
    stale = tmp_path / f"{prefix}-{host}-999999999-deadbeef"
    stale.mkdir()
    (stale / "images.u8").write_bytes(b"\0" * 100)
    # another node sharing the folder: its process ids mean nothing here, so its build is left alone
    other = tmp_path / f"{prefix}-othernode-999999999-deadbeef"
    other.mkdir()
    cache = data.build_cache(index, 16, tmp_path, workers=1)
    assert len(cache) == 80 and not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cache.path.name, other.name])
    with pytest.raises(FileNotFoundError, match="not a finished cache"):
        data.Cache(tmp_path / "elsewhere")


def test_cache_pickles_as_a_path(isic, tmp_path):
    cache = data.build_cache(data.read_index(isic), 32, tmp_path, workers=1)
    blob = pickle.dumps(cache)
    assert len(blob) < cache.images.nbytes / 10
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back.images[5], cache.images[5])
    assert back.row(cache.names[7]) == 7
    np.testing.assert_array_equal(cache.rows([cache.names[2], cache.names[0]]), [2, 0])
    with pytest.raises(IndexError):
        cache.rows([0, 80])


# ---------------------------------------------------------------------------------------------
# Split

class Fake:
    """Names, targets and patients without images: ISIC-like 2% positives, 1-30 images each."""

    def __init__(self, n_patients=400, seed=0, pos_rate=0.02):
        rng = np.random.default_rng(seed)
        self.names, self.patients, t = [], [], []
        for p in range(n_patients):
            k = int(rng.integers(1, 31))
            for _ in range(k):
                self.names.append(f"img{len(self.names)}")
                self.patients.append(f"pat{p}")
                t.append(int(rng.random() < pos_rate))
        self.targets = np.array(t)


def test_split_is_patient_grouped_stratified_and_seeded(tmp_path):
    fake = Fake()
    split = data.make_split(fake, tmp_path / "splits.csv", val_frac=0.15, test_frac=0.15, seed=1)
    assert sorted(sum(split.values(), [])) == sorted(fake.names)
    owner = {}
    pat = dict(zip(fake.names, fake.patients))
    for s, names in split.items():
        for n in names:
            assert owner.setdefault(pat[n], s) == s, f"patient {pat[n]} leaks into {s}"
    t = dict(zip(fake.names, fake.targets))
    n_all, pos_all = len(fake.names), int(fake.targets.sum())
    for s, frac in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(len(split[s]) / n_all - frac) < 0.03, s
        assert abs(sum(t[n] for n in split[s]) / pos_all - frac) < 0.03, s
    # the file records it; the same call reuses it; another seed draws another split
    rows = csv_rows(tmp_path / "splits.csv")
    assert {r["image_name"]: r["split"] for r in rows} == {n: s for s, v in split.items() for n in v}
    assert data.make_split(fake, tmp_path / "splits.csv", 0.15, 0.15, seed=1) == split
    assert data.load_split(tmp_path / "splits.csv", fake) == split
    assert data.make_split(fake, tmp_path / "other.csv", 0.15, 0.15, seed=2) != split


def test_split_reuse_only_when_it_matches(tmp_path):
    fake = Fake(50)
    data.make_split(fake, tmp_path / "s.csv", seed=0)
    with pytest.raises(ValueError, match="seed.*new path"):  # never advice to delete a split
        data.make_split(fake, tmp_path / "s.csv", seed=3)
    other = Fake(60)
    with pytest.raises(ValueError, match="does not match the data"):
        data.make_split(other, tmp_path / "s.csv", seed=0)
    relabelled = Fake(50)
    relabelled.targets = 1 - relabelled.targets
    with pytest.raises(ValueError, match="target"):
        data.make_split(relabelled, tmp_path / "s.csv", seed=0)
    rows = csv_rows(tmp_path / "s.csv")  # a hand-edited file that leaks a patient
    rows[1]["patient_id"] = rows[0]["patient_id"]
    rows[1]["split"] = "test" if rows[0]["split"] != "test" else "val"
    write_csv(tmp_path / "leak.csv", list(rows[0]), [list(r.values()) for r in rows])
    with pytest.raises(ValueError, match="is in both"):
        data.load_split(tmp_path / "leak.csv")


def test_tiny_sets_put_positives_in_every_split_or_say_which_split_lacks_them(tmp_path):
    fake = Fake(30, pos_rate=0.0)
    fake.targets[[0, 40, 80]] = 1  # three positive patients (patients hold 1-30 images)
    assert len({fake.patients[i] for i in (0, 40, 80)}) == 3
    split = data.make_split(fake, tmp_path / "a.csv", seed=0)
    t = dict(zip(fake.names, fake.targets))
    assert all(sum(t[n] for n in split[s]) >= 1 for s in data.SPLITS)
    fake.targets[80] = 0
    with pytest.raises(ValueError, match="'train' split would get none"):
        data.make_split(fake, tmp_path / "b.csv", seed=0)
    split = data.make_split(fake, tmp_path / "c.csv", val_frac=0.2, test_frac=0.0, seed=0)
    assert split["test"] == [] and all(sum(t[n] for n in split[s]) >= 1 for s in ("train", "val"))


# ---------------------------------------------------------------------------------------------
# Datasets and loaders

@pytest.fixture(scope="module")
def cache(isic, tmp_path_factory):
    return data.build_cache(data.read_index(isic), 32, tmp_path_factory.mktemp("cache"), workers=1)


def test_classifier_dataset_normalises_with_the_models_mean_and_std(cache):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    names = cache.names[10:20]
    ds = data.ClassifierDataset(cache, names, mean, std)
    by_row = data.ClassifierDataset(cache, range(10, 20), mean, std)
    assert len(ds) == 10
    for i in range(10):
        x, y = ds[i]
        ref = (cache.images[10 + i].astype(np.float64) / 255 - mean) / std
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
        np.testing.assert_allclose(x.numpy(), ref.transpose(2, 0, 1), atol=1e-5)
        assert y.dtype == torch.float32 and y.item() == cache.targets[10 + i]
        torch.testing.assert_close(by_row[i][0], x)
    with pytest.raises(ValueError, match="3 values"):
        data.ClassifierDataset(cache, names, (0.5,), (0.5,))


def test_unpaired_dataset(cache):
    a = [i for i in range(len(cache)) if cache.targets[i] == 0]
    b = [i for i in range(len(cache)) if cache.targets[i] == 1]
    ds = data.UnpairedDataset(cache, a, b, seed=3)
    assert len(ds) == max(len(a), len(b)) == 60
    item = ds[5]
    assert item["a_row"] == a[5] and item["b_row"] in b
    np.testing.assert_allclose(item["A"].numpy(), cache.images[a[5]].transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    assert item["A"].min() >= -1 and item["B"].max() <= 1
    epoch0 = [ds[i]["b_row"] for i in range(len(ds))]
    counts = np.bincount([b.index(r) for r in epoch0], minlength=len(b))
    assert counts.min() == 3 and counts.max() == 3  # 60 items over 20 B images: each thrice
    ds.set_epoch(1)
    epoch1 = [ds[i]["b_row"] for i in range(len(ds))]
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)  # new pairing, same coverage
    ds.set_epoch(0)
    assert [ds[i]["b_row"] for i in range(len(ds))] == epoch0  # seeded
    assert len(data.UnpairedDataset(cache, b, a)) == 60  # |B| > |A| works the same way


def test_make_loader_is_seeded_and_takes_a_sampler(cache):
    ds = data.ClassifierDataset(cache, cache.names, (0.5,) * 3, (0.5,) * 3)
    first = [y.tolist() for _, y in data.make_loader(ds, 16, shuffle=True, seed=3, workers=0)]
    again = [y.tolist() for _, y in data.make_loader(ds, 16, shuffle=True, seed=3, workers=0)]
    assert first == again and sum(map(len, first)) == 80
    x0 = next(iter(data.make_loader(ds, 16, shuffle=True, seed=3, workers=0)))[0]
    x2 = next(iter(data.make_loader(ds, 16, shuffle=True, seed=3, workers=2)))[0]
    torch.testing.assert_close(x0, x2)  # worker processes reopen the memmap: same batch
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=0)
    loader = data.make_loader(ds, 8, shuffle=True, sampler=sampler, workers=0, drop_last=True)
    assert sum(x.shape[0] for x, _ in loader) == 40
    assert data.default_loader_workers() >= 0


# ---------------------------------------------------------------------------------------------
# CLI

def test_check_cli(odd, isic, tmp_path, capsys):
    root, expect = odd
    assert data.main(["check", str(root), "--json", "--workers", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    n_pos = sum(i % 2 for i in range(len(expect)))
    assert {k: out[k] for k in ("images", "malignant", "benign", "patients", "skipped")} == {
        "images": len(expect), "malignant": n_pos, "benign": len(expect) - n_pos, "patients": len(expect),
        "skipped": ["truncated", "garbage", "empty"]}
    assert data.main(["check", str(root), "--json", "--strict", "--workers", "1"]) == 2
    capsys.readouterr()
    assert data.main(["check", str(isic), "--json", "--strict"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == []
    assert data.main(["check", str(tmp_path / "missing")]) == 2
    assert data.main(["cache", str(isic), "--size", "16", "--cache-dir", str(tmp_path / "c"), "--workers", "1"]) == 0
    assert Path(capsys.readouterr().out.strip()).parent == tmp_path / "c"
    assert data.main(["split", str(isic), "--out", str(tmp_path / "s.csv")]) == 0
    assert len(csv_rows(tmp_path / "s.csv")) == 80


def test_split_file_quotes_names_with_commas(tmp_path):
    # In the folder layout a patient id is the file stem, so it may hold a comma.
    class Data:
        names = [f"img,{i}" for i in range(40)]
        targets = np.array([i % 4 == 0 for i in range(40)], dtype=np.int64)
        patients = [f"p,{i}" for i in range(40)]

    split = data.make_split(Data, tmp_path / "splits.csv", seed=1)
    assert data.load_split(tmp_path / "splits.csv", Data) == split
    assert sorted(sum(split.values(), [])) == sorted(Data.names)


# ---------------------------------------------------------------------------------------------
# Bad input and unwritable places (issue 15): one clear error naming the file or option

def _tiny_folder(root: Path, csv_bytes: bytes) -> Path:
    (root / "train").mkdir(parents=True)
    for n in ("a", "b"):
        Image.new("RGB", (8, 8), (200, 150, 120)).save(root / "train" / f"{n}.jpg")
    (root / "train.csv").write_bytes(csv_bytes)
    return root


@pytest.mark.parametrize("boms", [0, 1, 2, 3])
def test_every_leading_bom_is_stripped(tmp_path, boms):
    """A double BOM gave "required column 'image_name' is missing (found columns: image_name, ...)"."""
    text = "image_name,patient_id,target\r\na,p1,0\r\nb,p2,1\r\n"
    root = _tiny_folder(tmp_path, b"\xef\xbb\xbf" * boms + text.encode())
    index = data.read_index(root)
    assert index.names == ["a", "b"] and index.targets.tolist() == [0, 1] and index.patients == ["p1", "p2"]


def test_a_non_utf8_csv_names_the_file_line_and_fix(tmp_path):
    text = "image_name,patient_id,anatom_site_general_challenge,target\na,p1,torso,0\nb,p2,tête,1\n"
    root = _tiny_folder(tmp_path, text.encode("latin-1"))
    with pytest.raises(ValueError, match=r"train\.csv: not UTF-8 text \(byte 0xea on line 3\).*iconv") as e:
        data.read_index(root)
    assert str(root / "train.csv") in str(e.value)


@pytest.mark.parametrize("csv_text,pattern", [
    ("image_name,target,target\na,0,1\n", r"column\(s\) 'target' appear more than once"),
    ('image_name,target\n"a,0\nb,1\n', r"line \d+: malformed CSV|required column|not 0 or 1|more cells"),
    ("image_name,target\na,0\nb," + "9" * 200_000 + "\n", r"line 3: malformed CSV \(field larger"),
])
def test_malformed_csv_is_a_value_error_naming_the_file(tmp_path, csv_text, pattern):
    root = _tiny_folder(tmp_path, csv_text.encode())
    with pytest.raises(ValueError, match=pattern) as e:
        data.read_index(root)
    assert "train.csv" in str(e.value)


def test_data_pointing_at_a_file(isic, caplog):
    with pytest.raises(NotADirectoryError, match=rf"not a folder but a file; pass the folder that holds it, {isic}"):
        data.read_index(isic / "train.csv")
    assert data.main(["check", str(isic / "train.csv")]) == 2
    assert data.main(["cache", str(isic / "train.csv"), "--cache-dir", "/nonexistent/never-made"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and all("not a folder but a file" in m for m in errors)


@pytest.fixture
def read_only(tmp_path, monkeypatch) -> Path:
    """A folder nobody may write into. As root, permission bits don't stop writes, so then
    creating anything under it is also refused by a patched os.mkdir."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:
        real = os.mkdir

        def mkdir(path, *a, **k):
            if str(path).startswith(str(ro)):
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *a, **k)

        monkeypatch.setattr(os, "mkdir", mkdir)
    yield ro
    ro.chmod(0o755)


def test_a_read_only_cache_dir_is_one_line_naming_the_option(isic, read_only, caplog):
    index = data.read_index(isic)
    for where in (read_only, read_only / "sub"):
        with pytest.raises(PermissionError, match=rf"--cache-dir {where}: cannot write there \(Permission denied"):
            data.build_cache(index, 16, where, workers=1)
    assert data.main(["cache", str(isic), "--size", "16", "--cache-dir", str(read_only), "--workers", "1"]) == 2
    assert list(read_only.iterdir()) == []


def test_writing_into_the_data_folder_is_refused(isic, caplog):
    before = sorted(str(p) for p in isic.rglob("*"))
    with pytest.raises(ValueError, match="--cache-dir .* is inside the data folder"):
        data.build_cache(data.read_index(isic), 16, isic / "cache", workers=1)
    assert data.main(["split", str(isic), "--out", str(isic / "splits.csv")]) == 2
    assert data.main(["cache", str(isic), "--cache-dir", str(isic), "--workers", "1"]) == 2
    assert sorted(str(p) for p in isic.rglob("*")) == before


@pytest.mark.parametrize("argv,option", [(["check", "{d}", "--workers", "-1"], "--workers"),
                                         (["cache", "{d}", "--workers", "-1", "--cache-dir", "{t}"], "--workers"),
                                         (["cache", "{d}", "--size", "4", "--cache-dir", "{t}"], "--size")])
def test_bad_options_name_the_option(isic, tmp_path, caplog, argv, option):
    argv = [a.format(d=isic, t=tmp_path / "c") for a in argv]
    assert data.main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(option), errors
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="--workers must be a whole number >= 0"):
        data.verify_images(data.read_index(isic), workers=-1)


def test_killed_builds_of_every_cache_key_are_cleaned(isic, tmp_path):
    """Issue 15: only the same key's leftovers were removed, so a resumed pipeline (new key) kept a
    killed build's 24.6 MB forever. Now every key's, but only melano's, and only dead writers'."""
    host = socket.gethostname().replace("-", "_")
    dead, alive = 999_999_999, os.getpid()
    made = {
        "old key, dead": (f".isic-64-{'0' * 16}.tmp-{host}-{dead}-deadbeef", False),
        "other data, dead": (f".other-set-128-{'a1' * 8}.tmp-{host}-{dead}-0badf00d", False),
        "alive": (f".isic-32-{'b' * 16}.tmp-{host}-{alive}-12345678", True),
        "other host": (f".isic-64-{'c' * 16}.tmp-othernode-{dead}-12345678", True),
        "not melano's": (f".my-notes.tmp-{host}-{dead}-12345678", True),
        "a finished cache": (f"isic-64-{'d' * 16}", True),
    }
    for name, _ in made.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "images.u8").write_bytes(b"\0" * 100)
    cache = data.build_cache(data.read_index(isic), 16, tmp_path, workers=1)
    for what, (name, kept) in made.items():
        assert (tmp_path / name).exists() == kept, what
    assert cache.path.exists()


def test_written_files_get_the_usual_mode(isic, tmp_path):
    old = os.umask(0o022)
    try:
        cache = data.build_cache(data.read_index(isic), 16, tmp_path / "c", workers=1)
        data.make_split(cache, tmp_path / "s" / "splits.csv")
    finally:
        os.umask(old)
    for p in (cache.path / "meta.json", cache.path / "images.u8", tmp_path / "s" / "splits.csv",
              tmp_path / "s" / "splits.csv.json"):
        assert p.stat().st_mode & 0o777 == 0o644, p


def test_a_damaged_cache_meta_says_to_rebuild(isic, tmp_path):
    cache = data.build_cache(data.read_index(isic), 16, tmp_path, workers=1)
    (cache.path / "meta.json").write_text('{"version": 1, "size":')
    with pytest.raises(ValueError, match="meta.json: unreadable .*delete .* and build it again"):
        data.Cache(cache.path)


def test_decoding_off_the_main_thread_forks_no_pool(tmp_path, monkeypatch):
    """A pipeline stage running in a thread beside others decodes in that thread: a pool forked
    there once hung at shutdown. From the main thread, a pool still serves large batches."""
    import threading
    from melano.data import images
    paths = []
    for i in range(70):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(paths[-1])
    pools = []
    real = images.mp.get_context
    monkeypatch.setattr(images.mp, "get_context", lambda *a: pools.append(1) or real(*a))
    out = {}
    worker = threading.Thread(target=lambda: out.update(errors=images.decode_all(paths, 8, None, None, 2, "t")))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive() and out["errors"] == {} and pools == []
    assert images.decode_all(paths, 8, None, None, 2, "t") == {} and pools == [1]
