"""A fuzz of the reader (`read_index`), the checker (`verify_images`, ``check --json``) and the
cache (`build_cache`) with Hypothesis: random column orders, encodings and byte-order marks,
quoting, line endings, target spellings, and odd or broken image files.

The oracle is the generated spec itself: for each row we know its label, whether its file
exists and whether the file is a good image. The property: each row is either read with its
true label or reported as skipped, and no exception escapes but the documented ones
(ValueError naming the file for a bad CSV, with the line for a bad row).

Run with ``--hypothesis-show-statistics`` to see the cases tried (events: outcome, image kinds).
"""

import contextlib
import csv
import io
import logging
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("hypothesis")  # a dev extra: the GPU machine's python lacks it, and collects the rest
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from melano import data  # noqa: E402

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

VALID_TARGETS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, " 1": 1, "0 ": 0, "1e0": 1, "+1": 1, "00": 0, "-0": 0}
BAD_TARGETS = ["2", "-1", "yes", "", "nan", "0.5", "inf", "true", "1,0"]
GOOD_KINDS = ["jpeg", "png", "gray", "rgba", "palette", "tiny", "cmyk"]
BROKEN_KINDS = ["empty", "garbage"]          # never decodable
MAYBE_KINDS = ["truncated"]                  # decodable or not, depending on where it is cut
KINDS = GOOD_KINDS + BROKEN_KINDS + MAYBE_KINDS + ["missing"]
EXTRA_COLUMNS = ["sex", "age_approx", "anatom_site_general_challenge", "diagnosis", "notes"]
ACCENTS = "éüñê"  # their Latin-1 bytes are never valid UTF-8


def _image_bytes(kind: str, cut: float) -> bytes:
    """The file content of one image kind (small, made with Pillow: an independent encoder)."""
    yy, xx = np.mgrid[:12, :16]
    rgb = np.stack([yy * 20, xx * 15, (yy + xx) * 8], -1).astype(np.uint8)
    im = Image.fromarray(rgb)
    buf = io.BytesIO()
    if kind in ("jpeg", "truncated"):
        im.save(buf, "JPEG", quality=90)
    elif kind == "png":
        im.save(buf, "PNG")
    elif kind == "gray":
        im.convert("L").save(buf, "JPEG")
    elif kind == "rgba":
        Image.fromarray(np.concatenate([rgb, rgb[..., :1]], 2), "RGBA").save(buf, "PNG")
    elif kind == "palette":
        im.quantize(8).save(buf, "PNG")
    elif kind == "tiny":
        Image.new("RGB", (1, 1), (90, 40, 30)).save(buf, "PNG")
    elif kind == "cmyk":
        im.convert("CMYK").save(buf, "JPEG")
    elif kind == "garbage":
        return bytes(np.random.default_rng(int(cut * 1e6)).integers(0, 256, 300, dtype=np.uint8))
    elif kind == "empty":
        return b""
    raw = buf.getvalue()
    return raw[: max(1, int(len(raw) * cut))] if kind == "truncated" else raw


# ---------------------------------------------------------------------------------------------
# The spec: what a folder holds, drawn by Hypothesis

name_chars = st.sampled_from("abcxyzABC0129_-., '\"" + ACCENTS)


@st.composite
def specs(draw) -> dict:
    n = draw(st.integers(1, 6))
    stems = draw(st.lists(st.text(name_chars, min_size=1, max_size=6).map(str.strip).filter(
        lambda s: s and not s.startswith(".") and not s.lower().endswith((".jpg", ".jpeg", ".png"))),
        min_size=n, max_size=n, unique_by=str.lower))  # unique also on case-insensitive file systems
    columns = ["image_name", "target"]
    columns += [c for c in ["patient_id", "benign_malignant", *EXTRA_COLUMNS] if draw(st.booleans())]
    columns = draw(st.permutations(columns))
    # one folder in four has one faulty row: a target that is not 0/1, or contradicting labels
    fault = draw(st.sampled_from(["bad target", "contradiction", None, None, None, None, None, None]))
    if fault == "contradiction" and "benign_malignant" not in columns:
        fault = None
    fault_row = draw(st.integers(0, n - 1))
    rows = []
    for i, stem in enumerate(stems):
        label = draw(st.integers(0, 1))
        bad_target = fault == "bad target" and i == fault_row
        target = draw(st.sampled_from(BAD_TARGETS)) if bad_target else \
            draw(st.sampled_from([k for k, v in VALID_TARGETS.items() if v == label]))
        bm = "other" if fault == "contradiction" and i == fault_row else \
            draw(st.sampled_from(["", "same"])) if "benign_malignant" in columns else ""
        bm_text = {"": "", "same": ["benign", "malignant"][label], "other": ["malignant", "benign"][label]}[bm]
        rows.append({
            "stem": stem, "label": label, "target": target, "bad_target": bad_target, "bm": bm,
            "bm_text": draw(st.sampled_from([bm_text, bm_text.upper(), f" {bm_text.title()} "])) if bm_text else "",
            "name": stem + draw(st.sampled_from(["", "", ".jpg"])),  # ISIC names come with or without
            "patient": draw(st.sampled_from(["", "P1", "P2", f"P-{stem}"])) if "patient_id" in columns else "",
            "kind": draw(st.sampled_from(KINDS + BROKEN_KINDS + MAYBE_KINDS * 2)),  # more broken ones
            "cut": draw(st.floats(0.05, 0.98)),
            "ext": draw(st.sampled_from([".jpg", ".jpeg", ".png", ".JPG"])),
            "extra": {c: draw(st.text(name_chars, max_size=5)) for c in EXTRA_COLUMNS},
        })
    return {"rows": rows, "columns": columns,
            "layout": draw(st.sampled_from(["kaggle", "reupload"])),
            "encoding": draw(st.sampled_from(["utf-8", "utf-8-sig", "double-bom", "latin-1"])),
            "quoting": draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])),
            "newline": draw(st.sampled_from(["\n", "\r\n"])),
            "trailing_blank": draw(st.booleans())}


def write_folder(root: Path, spec: dict) -> None:
    img_dir = root / ("jpeg/train" if spec["layout"] == "kaggle" else "train")
    img_dir.mkdir(parents=True)
    for r in spec["rows"]:
        if r["kind"] != "missing":
            (img_dir / (r["stem"] + r["ext"])).write_bytes(_image_bytes(r["kind"], r["cut"]))
    buf = io.StringIO()
    w = csv.writer(buf, quoting=spec["quoting"], lineterminator=spec["newline"])
    w.writerow(spec["columns"])
    for r in spec["rows"]:
        cell = {"image_name": r["name"], "target": r["target"], "patient_id": r["patient"],
                "benign_malignant": r["bm_text"], **r["extra"]}
        w.writerow([cell[c] for c in spec["columns"]])
    text = buf.getvalue() + (spec["newline"] if spec["trailing_blank"] else "")
    raw = {"utf-8": lambda t: t.encode(), "utf-8-sig": lambda t: t.encode("utf-8-sig"),
           "double-bom": lambda t: b"\xef\xbb\xbf" * 2 + t.encode(),
           "latin-1": lambda t: t.encode("latin-1")}[spec["encoding"]](text)
    (root / "train.csv").write_bytes(raw)
    spec["csv_is_utf8"] = spec["encoding"] != "latin-1" or text.isascii()


def expected_error(spec: dict) -> str | None:
    """The documented error this folder must raise (a regex for its message), or None."""
    if not spec["csv_is_utf8"]:
        return r"train\.csv: not UTF-8 text \(byte 0x[0-9a-f]{2} on line \d+\)"
    for line, r in enumerate(spec["rows"], start=2):
        if r["bad_target"]:
            return rf"train\.csv, line {line} \(image .*\): target .* is not 0 or 1"
        if r["bm"] == "other":
            return rf"train\.csv, line {line} \(image .*\): benign_malignant .* contradict"
    if all(r["kind"] == "missing" for r in spec["rows"]):
        return r"no usable images found"
    return None


# ---------------------------------------------------------------------------------------------
# The properties

def check_folder(spec: dict, tmp: Path) -> None:
    root = tmp / "set"
    write_folder(root, spec)
    want_error = expected_error(spec)
    for r in spec["rows"]:
        event(f"image kind: {r['kind']}")
    event(f"encoding: {spec['encoding']}")
    try:
        index = data.read_index(root)
    except ValueError as e:  # the only documented failure for a CSV folder that exists
        event(f"outcome: error ({want_error.split(':')[-1][:30] if want_error else 'unexpected'})")
        assert want_error is not None and re.search(want_error, str(e)), (str(e), want_error)
        assert str(root / "train.csv") in str(e) or "no usable images" in str(e)
        assert data.main(["check", str(root), "--json", "--workers", "1"]) == 2
        return
    assert want_error is None, f"expected an error matching {want_error!r}"
    truth = {r["name"]: r for r in spec["rows"]}
    # every row: read with its true label, or skipped as missing
    assert [rec.image_name for rec in index.records] == [r["name"] for r in spec["rows"] if r["kind"] != "missing"]
    for rec in index.records:
        r = truth[rec.image_name]
        assert rec.target == r["label"] and rec.patient_id == (r["patient"] or r["name"])
        assert Path(rec.path).name == r["stem"] + r["ext"]
        assert rec.extra == {c: r["extra"][c].strip() for c in spec["columns"] if c in EXTRA_COLUMNS} | \
            ({"benign_malignant": r["bm_text"].strip()} if "benign_malignant" in spec["columns"] else {})
    assert [s.name for s in index.skipped] == [r["name"] for r in spec["rows"] if r["kind"] == "missing"]

    # decoding: good images always decode, broken ones never; each skipped with a reason
    bad = {s.name for s in data.verify_images(index, workers=1)}
    for rec in index.records:
        kind = truth[rec.image_name]["kind"]
        assert (rec.image_name in bad) == (kind in BROKEN_KINDS) or kind in MAYBE_KINDS, (rec.image_name, kind)
        if kind in MAYBE_KINDS:
            event(f"{kind} image: {'skipped' if rec.image_name in bad else 'decoded'}")
    usable = [rec for rec in index.records if rec.image_name not in bad]
    event(f"outcome: {len(usable)} usable, {len(index.skipped) + len(bad)} skipped")

    # the check CLI agrees; the cache holds exactly the usable images, each with its true label
    assert data.main(["check", str(root), "--json", "--workers", "1"]) == (0 if usable else 2)
    if not usable:
        with pytest.raises(ValueError, match="none of the .* images could be decoded"):
            data.build_cache(index, 8, tmp / "cache", workers=1)
        return
    cache = data.build_cache(index, 8, tmp / "cache", workers=1)
    assert cache.names == [rec.image_name for rec in usable]
    assert cache.targets.tolist() == [truth[n]["label"] for n in cache.names]
    assert sorted(s.name for s in cache.skipped) == sorted([s.name for s in index.skipped] + list(bad))
    assert cache.images.shape == (len(usable), 8, 8, 3)


@contextlib.contextmanager
def fuzz_case():
    """A temp folder, with the expected warnings and check's JSON kept off the test output."""
    logger = logging.getLogger("melano")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            yield Path(tmp)
    finally:
        logger.setLevel(level)


@FAST
@given(spec=specs())
def test_each_row_is_read_with_its_true_label_or_skipped(spec):
    with fuzz_case() as tmp:
        check_folder(spec, tmp)


@pytest.mark.slow
@SLOW
@given(spec=specs())
def test_each_row_is_read_with_its_true_label_or_skipped_many(spec):
    with fuzz_case() as tmp:
        check_folder(spec, tmp)


csv_junk = st.text(st.sampled_from('ab01,"\r\n\t \ufeff\0é.'), max_size=120)
csv_rows = st.lists(st.tuples(st.sampled_from(["a", "b", "0", "1", "", '"a', "a.jpg", " b "]),
                              st.sampled_from([",", ";", ",,", ', "']),
                              st.sampled_from(["0", "1", "1.0", "x", "", '"1"']),
                              st.sampled_from(["", ",", '"', ",extra"]),
                              st.sampled_from(["\n", "\r\n", "\n\n", "\r"])),
                    min_size=1, max_size=6).map(lambda rows: "".join("".join(r) for r in rows))


@settings(FAST, max_examples=150)
@given(raw=st.binary(max_size=300) | csv_junk.map(str.encode) |
       st.tuples(st.sampled_from(["image_name,target", "target,image_name", "\ufeffimage_name,target,x"]),
                 csv_rows | csv_junk).map(lambda t: f"{t[0]}\n{t[1]}".encode()))
def test_any_csv_bytes_give_an_index_or_a_value_error_naming_the_file(raw):
    """Arbitrary bytes as train.csv: never a crash other than a ValueError naming the file."""
    with fuzz_case() as root:
        (root / "train").mkdir()
        for n in ("a", "b", "0", "1"):
            (root / "train" / f"{n}.jpg").write_bytes(_image_bytes("jpeg", 1.0))
        (root / "train.csv").write_bytes(raw)
        try:
            index = data.read_index(root)
        except ValueError as e:
            assert "train.csv" in str(e) or "no usable images" in str(e), str(e)
            event("outcome: ValueError")
            return
        event("outcome: read")
        assert set(index.targets.tolist()) <= {0, 1} and len(index) >= 1
