"""Issue 26: nothing a user made is lost. The pipeline's stages, `predict` and `evaluate` follow
melano.infra.outdir's rule like the trainers: they write only into their own --out, delete only what
their manifests say they wrote, never write into (or around) --data, and change nothing when they
refuse. Each test here failed on the code before the issue. Folder names are the tests' own.
(Labels that belong to files, nested images and `check --strict` are in test_data_labels.py.)"""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import bomb_png, call, make_data, read_csv, refused, tree
from melano import classifier, pipeline
from melano.infra import outdir

pytestmark = pytest.mark.usefixtures("one_thread")


CLF_DATA = (40, 24, 2.0)  # conftest's clf_data; its clf_run scores the test split (test_predictions.csv)


# ----------------------------------------------------------------------------- the pipeline

def smoke(out, *more) -> list:
    return ["--preset", "smoke", "--device", "cpu", "--out", out, *more]


def test_a_data_set_where_a_stage_goes_is_refused_and_kept(tmp_path, caplog):
    # finding 1: a data set made by `melano.data synth --out R/gan` was deleted by the GAN stage, exit 0
    run = tmp_path / "study_run"
    make_data(run / "gan_0", 10, 6)
    before = tree(run)
    assert call(pipeline.main, smoke(run)) == 2
    refused(caplog, run, "gan_0")
    assert tree(run) == before


def test_a_folder_in_a_stage_place_of_an_earlier_run_is_refused_and_kept(tmp_path, caplog):
    # the same in a folder the pipeline owns already: its `--out` check let the stage clear it
    run = tmp_path / "earlier"
    # an earlier run's folder, claimed by another process: a claim by this one would rewrite the owner
    # and lock files with its own pid, so the trees below also check that the refusal comes first
    subprocess.run([sys.executable, "-c", f"from melano.infra import outdir; outdir.claim({str(run)!r}, 'pipeline').close()"],
                   check=True, timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    make_data(run / "gan_ls_0", 10, 6)  # written by melano (synth), but not by this pipeline
    (run / "arm_none_1").mkdir()
    (run / "arm_none_1" / "my_notes.txt").write_text("mine")
    before = tree(run)
    assert call(pipeline.main, smoke(run)) == 2
    refused(caplog, run / "gan_ls_0")  # the first of the two in the order the stages run
    assert tree(run) == before
    kept = shutil.move(run / "gan_ls_0", tmp_path / "gan_ls_0")
    before = tree(run)
    caplog.clear()
    assert call(pipeline.main, smoke(run)) == 2
    refused(caplog, run / "arm_none_1")
    assert tree(run) == before and (Path(kept) / "train.csv").is_file()


@pytest.mark.parametrize("where", ["inside", "holding"])
def test_data_inside_out_and_out_inside_data_are_refused(tmp_path, caplog, where):
    # finding 2: `--data R/data --out R` deleted R/data's images, then failed with exit 2
    if where == "inside":
        run, derm = tmp_path / "exp", tmp_path / "exp" / "data"
    else:
        derm = tmp_path / "lesions"
        run = derm / "runs"
    make_data(derm, 10, 6)
    before = tree(tmp_path)
    assert call(pipeline.main, smoke(run, "--data", derm)) == 2
    refused(caplog, derm, "--out")
    assert tree(tmp_path) == before


def test_a_stage_is_cleared_only_of_what_melano_wrote(tmp_path):
    run = tmp_path / "stages"
    with outdir.claim(run, "pipeline") as claim:
        stages = pipeline.Stages(run, claim, [])

        def stage(folder, resume):
            claim.write_text(folder / "table.csv", "a,b\n")
            with outdir.claim(claim.record_child(folder / "child"), "synth", force=True) as child:
                child.write_text("x.txt", "x")
            return {}
        stages.run("mystage", {"v": 1}, stage)
        assert outdir.foreign_files(run, claim.written, "mystage") == []
        (run / "mystage" / "notes.txt").write_text("a user's notes")
        make_data(run / "mystage" / "copied_set", 4, 2)  # melano wrote it, but not this stage
        before = tree(run)
        n = sum(p.is_file() and p.name not in outdir.MELANO_FILES for p in (run / "mystage" / "copied_set").rglob("*"))
        with pytest.raises(outdir.OutputError, match=rf"\(copied_set/ \({n} files\), notes.txt\)"):
            stages.run("mystage", {"v": 2}, stage)  # new parameters: the stage would be cleared
        assert tree(run) == before
        with pytest.raises(outdir.OutputError, match="notes.txt"):
            stages.check_places(["mystage"], [])
        (run / "mystage" / "notes.txt").unlink()
        shutil.rmtree(run / "mystage" / "copied_set")
        stages.run("mystage", {"v": 2}, stage)  # now it may: everything left is the stage's own
        assert sorted(p.name for p in (run / "mystage").iterdir() if not p.name.startswith(".")) == \
            ["child", "done.json", "params.json", "table.csv"]


def test_pipeline_without_pretrained_weights_names_both_options(tmp_path, caplog, capsys):
    # finding 7: --arch efficientnet_b0 advised calling load_pretrained(); there was no --no-pretrained
    assert call(pipeline.main, smoke(tmp_path / "b0", "--arch", "efficientnet_b0")) == 2
    msg = refused(caplog, "--arch efficientnet_b0", "--weights", "--no-pretrained")
    assert "load_pretrained" not in msg
    assert not (tmp_path / "b0").exists()
    assert call(pipeline.main, smoke(tmp_path / "b0", "--arch", "efficientnet_b0", "--no-pretrained",
                                     "--dry-run")) == 0
    assert json.loads(capsys.readouterr().out)["pretrained"] is False
    cfg = pipeline.make_config("smoke", pretrained=False)
    d = {"data": "d", "split_csv": "s", "split_sizes": {"train": {"images": 64}}}
    assert pipeline.arm_config(cfg, d, Path("c"), "none", 0, [], 0).pretrained is False


# ----------------------------------------------------------------------------- predict

def predict(ckpt, images, *more) -> list:
    return ["predict", "--checkpoint", ckpt, "--images", images, "--device", "cpu", *more]


@pytest.fixture
def photos(clf_data, tmp_path) -> Path:
    """A folder of 4 readable images."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for f in sorted((clf_data / "jpeg" / "train").iterdir())[:4]:
        shutil.copy(f, folder)
    return folder


def test_predict_replaces_only_its_own_csv(clf_run, photos, tmp_path, caplog):
    # finding 3: predict --out replaced a user's CSV, exit 0
    mine = tmp_path / "scores.csv"
    mine.write_text("image,probability\nmy_lesion.jpg,0.9\n")
    before = tree(tmp_path)
    assert call(classifier.main, predict(clf_run / "best.pt", photos, "--out", mine)) == 2
    refused(caplog, mine, "--force")
    assert tree(tmp_path) == before
    assert call(classifier.main, predict(clf_run / "best.pt", photos, "--out", mine, "--force")) == 0
    assert len(read_csv(mine)) == 4
    assert call(classifier.main, predict(clf_run / "best.pt", photos, "--out", mine)) == 0  # its own: replaced
    mine.write_text(mine.read_text() + "edited by hand,0.5\n")  # now it is the user's again
    before = tree(tmp_path)
    caplog.clear()
    assert call(classifier.main, predict(clf_run / "best.pt", photos, "--out", mine)) == 2
    refused(caplog, mine)
    assert tree(tmp_path) == before


def test_predict_never_overwrites_its_inputs(clf_run, photos, tmp_path, caplog):
    # finding 3: --out best.pt overwrote the checkpoint it read; --out images/x.jpg an image
    ckpt = shutil.copy(clf_run / "best.pt", tmp_path / "model.pt")
    image = sorted(photos.iterdir())[0]
    before = tree(tmp_path)
    for out, named in [(ckpt, ckpt), (image, image), (photos / "new.csv", photos)]:
        for force in ([], ["--force"]):
            caplog.clear()
            assert call(classifier.main, predict(ckpt, photos, "--out", out, *force)) == 2, (out, force)
            refused(caplog, named)
            assert tree(tmp_path) == before, (out, force)


def test_predict_out_messages(clf_run, photos, tmp_path, caplog):
    # finding 7: "PosixPath('.') has an empty name"; an IsADirectoryError about a temp name
    for out, says in [("", "--out is empty"), (tmp_path, "is a folder")]:
        caplog.clear()
        assert call(classifier.main, predict(clf_run / "best.pt", photos, "--out", out)) == 2
        assert says in refused(caplog, "--out")


def test_a_photo_as_checkpoint_is_called_a_photo(photos, tmp_path, caplog):
    # finding 7: --checkpoint photo.jpg said the file "holds Python objects"
    photo = sorted(photos.iterdir())[0]
    assert call(classifier.main, predict(photo, photos, "--out", tmp_path / "p.csv")) == 2
    msg = refused(caplog, photo, "JPEG image")
    assert "Python objects" not in msg


def unreadable(folder: Path) -> dict[str, str]:
    """Files predict cannot read, by name, with a word its skip line must contain."""
    good = sorted(folder.iterdir())[0]
    whole = good.read_bytes()
    (folder / "cut.jpg").write_bytes(whole[:len(whole) // 3])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    bomb_png(folder / "huge.png", 12_000, 12_000)
    os.symlink(folder / "gone.jpg", folder / "dangling.jpg")
    os.symlink(folder / "loop_b.jpg", folder / "loop_a.jpg")
    os.symlink(folder / "loop_a.jpg", folder / "loop_b.jpg")
    return {"cut.jpg": "cut.jpg", "zero.jpg": "zero.jpg", "notes.jpg": "notes.jpg", "huge.png": "pixels",
            "dangling.jpg": "broken link", "loop_a.jpg": "link loop", "loop_b.jpg": "link loop"}


def test_predict_counts_and_skips_what_it_cannot_read(clf_run, photos, tmp_path, caplog):
    # finding 5: one bad file gave exit 2 and no output; a 12000 x 12000 PNG took 711 MB and
    # "decoded" to black; broken and looping links were dropped uncounted
    good = sorted(p.name for p in photos.iterdir())
    bad = unreadable(photos)
    out = tmp_path / "scores.csv"
    caplog.set_level(logging.INFO)
    assert call(classifier.main, predict(clf_run / "best.pt", photos, "--out", out)) == 0
    assert sorted(Path(r["image"]).name for r in read_csv(out)) == good
    lines = [r.getMessage() for r in caplog.records]
    for name, word in bad.items():
        skip = [ln for ln in lines if ln.startswith(f"skipped {photos / name}")]
        assert len(skip) == 1 and word in skip[0], (name, skip)
    assert f"predict: {len(good)} image(s) scored, {len(bad)} skipped" in lines
    # the pixel limit is an option: raised, the large image is read (and it is not silently black)
    raised = tmp_path / "raised.csv"
    shutil.rmtree(photos)
    photos.mkdir()
    bomb_png(photos / "huge.png", 9_000, 8_000)
    assert call(classifier.main, predict(clf_run / "best.pt", photos, "--out", raised, "--max-pixels",
                                         "80000000")) == 0
    assert len(read_csv(raised)) == 1


def test_predict_strict_stops_at_the_first_unreadable_image(clf_run, photos, tmp_path, caplog):
    unreadable(photos)
    out = tmp_path / "scores.csv"
    assert call(classifier.main, predict(clf_run / "best.pt", photos, "--out", out, "--strict")) == 2
    refused(caplog, "--strict")
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_large_images_are_refused_before_decoding(photos):
    from melano import data
    big = bomb_png(photos / "big.png", 9_000, 8_000)
    with pytest.raises(ValueError, match="pixels"):
        data.load_image(big, 32)
    arr = data.load_image(big, 32, max_pixels=10 ** 8)
    assert arr.shape == (32, 32, 3) and arr.max() == 0  # black because the file is: decoded, not replaced
    with Image.open(sorted(photos.iterdir())[0]) as im:
        assert np.asarray(im).max() > 0


# ----------------------------------------------------------------------------- evaluate

def evaluate(ckpt, out, *more) -> list:
    return ["evaluate", "--checkpoint", ckpt, "--out", out, "--device", "cpu", "--workers", "0", *more]


@pytest.mark.parametrize("inside", [".", "sub"])
def test_evaluate_never_writes_into_the_data(clf_run, clf_data, caplog, inside):
    # finding 4: evaluate --data D --out D (and D/sub) wrote its CSV and JSON into the data folder
    before = tree(clf_data)
    assert call(classifier.main, evaluate(clf_run / "best.pt", clf_data / inside, "--data", clf_data)) == 2
    refused(caplog, clf_data)
    assert tree(clf_data) == before


def test_evaluate_keeps_a_users_predictions(clf_run, tmp_path, caplog):
    # finding 4: in a folder of foreign files it overwrote a user's test_predictions.csv, no --force
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "test_predictions.csv").write_text("image_name,target,probability\nx,1,0.5\n")
    before = tree(folder)
    assert call(classifier.main, evaluate(clf_run / "best.pt", folder)) == 2
    refused(caplog, folder, "--force")
    assert tree(folder) == before
    out = tmp_path / "scored"
    assert call(classifier.main, evaluate(clf_run / "best.pt", out)) == 0
    trainer = read_csv(clf_run / "test_predictions.csv")
    assert read_csv(out / "test_predictions.csv") == trainer  # the same split, the same scores
    caplog.clear()
    assert call(classifier.main, evaluate(clf_run / "best.pt", out)) == 2  # its own earlier outputs: --force
    refused(caplog, "--force")
    assert call(classifier.main, evaluate(clf_run / "best.pt", out, "--force")) == 0
