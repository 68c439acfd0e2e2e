"""Issue 15's findings in the trainers, translate, the classifier's commands and the pipeline, as
regression tests: a bad option, file or folder gets exit code 2 and one error line naming it,
before anything on disk changes; nothing a user made is overwritten or deleted; two runs never
share a folder; a checkpoint never runs code.

Each test calls a module's own `main(argv)`, as the command line does (in this process, so it is
fast); the last one runs the CLIs as real processes, to see what a user sees on the terminal.
(The data, synth and cache findings are in test_data.py, test_faults_data.py and test_outdir.py.)
"""

import csv
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import call, clf_train_argv, gan_train_argv, make_data, read_csv, refused, trained, tree
from melano import classifier, cyclegan, pipeline

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
no_cuda_only = pytest.mark.skipif(CUDA, reason="checks the message on a machine without CUDA")

pytestmark = pytest.mark.usefixtures("one_thread")


def translate_argv(ckpt, data, out, *more) -> list:
    return ["translate", "--checkpoint", ckpt, "--data", data, "--out", out, "--device", "cpu", *more]


def predict_argv(ckpt, images, *more) -> list:
    return ["predict", "--checkpoint", ckpt, "--images", images, "--device", "cpu", *more]


# ----------------------------------------------------------------------------- shared runs

CLF_DATA, CLF_RUN = (50, 30, 3.0), dict(evaluate=False)  # conftest's clf_data and clf_run


@pytest.fixture(scope="module")
def gan_data(root):
    return make_data(root / "gan_data", 40, 20)


@pytest.fixture(scope="module")
def gan_ckpt(root, gan_data):
    """A CycleGAN trained 2 steps: its checkpoint.pt."""
    trained(cyclegan.main, gan_train_argv(gan_data, root / "gan", max_steps=2, cache_dir=root / "cache"))
    return root / "gan" / "checkpoint.pt"


# ----------------------------------------------------------------------------- data loss

def test_translate_never_writes_into_a_data_folder(gan_ckpt, gan_data, tmp_path, caplog):
    # finding 1: `translate --out D` overwrote D's train.csv, exit 0
    own = shutil.copytree(gan_data, tmp_path / "own")        # the folder it translates
    by_synth = shutil.copytree(gan_data, tmp_path / "synth")  # another data set, written by melano
    foreign = shutil.copytree(gan_data, tmp_path / "foreign")  # and one melano did not write
    for f in foreign.glob(".melano*"):
        f.unlink()
    before = tree(tmp_path)
    for data, out, more in [(own, own, []), (own, own, ["--force"]), (own, own / "jpeg", ["--force"]),
                            (gan_data, by_synth, []), (gan_data, foreign, [])]:
        caplog.clear()
        assert call(cyclegan.main, translate_argv(gan_ckpt, data, out, *more)) == 2, (out, more)
        refused(caplog, out)
        assert tree(tmp_path) == before, (out, more)


@pytest.mark.parametrize("force", [[], ["--force"]])
@pytest.mark.parametrize("bad", [["--batch-size", "-1"], ["--batch-size", "0"], ["--limit", "-1"]])
def test_translate_bad_options_delete_nothing(gan_ckpt, gan_data, tmp_path, caplog, bad, force):
    # finding 2: --batch-size -1 wrote 0 images, deleted the 45 already there and exited 0
    syn = tmp_path / "syn"
    assert call(cyclegan.main, translate_argv(gan_ckpt, gan_data, syn, "--limit", "6")) == 0
    assert len(read_csv(syn / "train.csv")) == 6
    before = tree(tmp_path)
    caplog.clear()
    assert call(cyclegan.main, translate_argv(gan_ckpt, gan_data, syn, *bad, *force)) == 2
    assert refused(caplog, bad[0]).startswith(bad[0])
    assert tree(tmp_path) == before


def _start(module: str, argv: list, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", module, *map(str, argv)], cwd=log.parent, env=env,
                                stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)


def _wait_until(ready, procs: dict, what: str, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        for name, (p, log) in procs.items():
            assert p.poll() is None, f"{name} exited with {p.returncode}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} within {seconds} s"
        time.sleep(0.1)


def test_a_second_training_into_a_busy_folder_fails_at_once(root, gan_data, clf_data, tmp_path, caplog):
    # finding 4: two trainings into one --out interleaved losses.csv, or scored the other's best.pt
    gan_out, clf_out = tmp_path / "gan", tmp_path / "clf"
    cache = root / "cache"
    gan = lambda **kw: gan_train_argv(gan_data, gan_out, epochs=1000, checkpoint_every=10 ** 6,  # noqa: E731
                                      sample_every=10 ** 6, cache_dir=cache, **kw)
    clf = lambda **kw: clf_train_argv(clf_data, clf_out, epochs=1000, val_every=10 ** 6,  # noqa: E731
                                      evaluate=False, cache_dir=cache, **kw)
    procs = {"cyclegan": (_start("melano.cyclegan", gan(max_steps=None), tmp_path / "gan.log"), tmp_path / "gan.log"),
             "classifier": (_start("melano.classifier", clf(max_steps=None), tmp_path / "clf.log"),
                            tmp_path / "clf.log")}
    try:
        losses = gan_out / "losses.csv"
        _wait_until(lambda: losses.exists() and len(losses.read_text().splitlines()) >= 3
                    and (clf_out / "config.json").exists(), procs, "both trainers started")
        for name, main, argv, out in [("cyclegan", cyclegan.main, gan(max_steps=2, seed=7, resume=True), gan_out),
                                      ("classifier", classifier.main, clf(max_steps=2, seed=7, resume=True), clf_out)]:
            holder = procs[name][0]
            config = (out / "config.json").read_bytes()
            caplog.clear()
            t0 = time.monotonic()
            assert call(main, argv) == 2, name
            assert time.monotonic() - t0 < 20, name  # at once: no data loaded, nothing trained
            msg = refused(caplog, out, f"PID {holder.pid}")
            assert "in use" in msg
            assert (out / "config.json").read_bytes() == config  # the holder's, seed 5
            assert holder.poll() is None  # and the holder goes on
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    # the lock of a killed holder is stale: the next run takes the folder over
    caplog.clear()
    assert call(cyclegan.main, gan(max_steps=2, resume=True)) == 0, caplog.text[-2000:]
    assert call(classifier.main, clf(max_steps=2, resume=True)) == 0, caplog.text[-2000:]
    assert len(read_csv(gan_out / "losses.csv")) == 2 and read_csv(clf_out / "history.csv")[-1]["step"] == "2"


def test_translate_from_another_directory_reads_the_checkpoints_split(gan_data, tmp_path, monkeypatch):
    # finding 5: run from another folder, translate read that folder's runs/cyclegan/splits.csv and
    # translated validation and test images (a leak)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (b / "runs" / "cyclegan").mkdir(parents=True)
    monkeypatch.chdir(a)
    assert call(cyclegan.main, gan_train_argv(gan_data, "runs/cyclegan", max_steps=1)) == 0  # relative --out
    split = read_csv(a / "runs" / "cyclegan" / "splits.csv")
    benign = {r["image_name"] for r in read_csv(gan_data / "train.csv") if r["target"] == "0"}
    train_benign = {r["image_name"] for r in split if r["split"] == "train"} & benign
    assert benign - train_benign  # some benign images are held out, or this test could not fail
    with open(b / "runs" / "cyclegan" / "splits.csv", "w", newline="") as f:  # another experiment's:
        w = csv.DictWriter(f, list(split[0]))                                  # everything in training
        w.writeheader()
        w.writerows({**r, "split": "train"} for r in split)
    monkeypatch.chdir(b)
    assert call(cyclegan.main, translate_argv(a / "runs" / "cyclegan" / "checkpoint.pt", gan_data, "syn")) == 0
    assert {r["source_image"] for r in read_csv(b / "syn" / "train.csv")} == train_benign


CYCLEGAN_BAD = [
    (["--batch-size", "-1"], "--batch-size"), (["--size", "31"], "--size"), (["--lr", "-1"], "--lr"),
    (["--epochs", "0", "--epochs-decay", "0"], "--epochs"), (["--pool-size", "-1"], "--pool-size"),
    (["--lambda-cycle", "-5"], "--lambda-cycle"), (["--max-steps", "0"], "--max-steps"),
    (["--max-steps", "-3"], "--max-steps"), (["--workers", "-1"], "--workers"),
    (["--checkpoint-every", "0"], "--checkpoint-every"), (["--data", "{data}/train.csv"], "--data"),
    pytest.param(["--device", "cuda"], "--device", marks=no_cuda_only)]
CLASSIFIER_BAD = [
    (["--val-every", "-1"], "--val-every"), (["--drop-rate", "2"], "--drop-rate"), (["--workers", "-1"], "--workers"),
    (["--threads", "-1"], "--threads"), (["--max-steps", "0"], "--max-steps"), (["--max-steps", "-3"], "--max-steps"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "1"], "--batch-size"), (["--lr", "-1"], "--lr"),
    (["--data", "{data}/train.csv"], "--data"), pytest.param(["--device", "cuda"], "--device", marks=no_cuda_only)]
PIPELINE_BAD = [(["--gan-max-steps", "-1"], "--gan-max-steps"), (["--gan-max-steps", "0"], "--gan-max-steps"),
                (["--gan-size", "31"], "--gan-size"), (["--seeds", "0"], "--seeds"),
                (["--gan-batch-size", "0"], "--gan-batch-size")]


def _with_module(module: str, cases: list) -> list:
    """The cases (plain tuples or pytest.param) with the trainer's name in front."""
    return [pytest.param(module, *c.values, marks=c.marks, id=c.id) if hasattr(c, "values") else (module, *c)
            for c in cases]


@pytest.mark.parametrize("module,bad,option", _with_module("cyclegan", CYCLEGAN_BAD) +
                         _with_module("classifier", CLASSIFIER_BAD))
def test_trainer_bad_options(request, tmp_path, caplog, module, bad, option):
    # findings 6 and the tracebacks: each was a traceback, a raw torch error, or a "success"
    main, argv_of, data = {"cyclegan": (cyclegan.main, gan_train_argv, "gan_data"),
                           "classifier": (classifier.main, clf_train_argv, "clf_data")}[module]
    data = request.getfixturevalue(data)
    before = tree(data)
    argv = argv_of(data, tmp_path / "out", cache_dir=tmp_path / "cache") + [b.format(data=data) for b in bad]
    assert call(main, argv) == 2
    refused(caplog, option)
    assert list(tmp_path.iterdir()) == [] and tree(data) == before


@pytest.mark.parametrize("bad,option", PIPELINE_BAD)
def test_pipeline_bad_options_fail_before_any_stage(tmp_path, caplog, bad, option):
    # --gan-max-steps -1 made a report from untrained generators; --gan-size 31 failed after the data stage
    assert call(pipeline.main, ["--preset", "smoke", "--out", tmp_path / "run", *bad]) == 2
    assert refused(caplog, option).startswith(option)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [["--batch-size", "-1"], ["--batch-size", "0"]])
def test_predict_and_evaluate_bad_batch_size(clf_run, clf_data, tmp_path, caplog, bad):
    # finding 7: predict --batch-size -1 printed "wrote 0 probabilities" for 80 images, exit 0
    images = clf_data / "jpeg" / "train"
    before = tree(clf_run)
    assert call(classifier.main, predict_argv(clf_run / "best.pt", images, "--out", tmp_path / "p.csv", *bad)) == 2
    assert refused(caplog, "--batch-size").startswith("--batch-size")
    caplog.clear()
    assert call(classifier.main, ["evaluate", "--checkpoint", clf_run / "best.pt", "--out", tmp_path / "e",
                                  "--device", "cpu", "--workers", "0", *bad]) == 2
    assert refused(caplog, "--batch-size").startswith("--batch-size")
    assert list(tmp_path.iterdir()) == [] and tree(clf_run) == before


def test_a_refused_resume_changes_nothing(root, gan_ckpt, gan_data, clf_run, clf_data, caplog):
    # finding 8: a resume refused for a changed --lr still overwrote config.json
    gan_out = gan_ckpt.parent
    before = tree(gan_out)
    assert call(cyclegan.main, gan_train_argv(gan_data, gan_out, max_steps=4, lr=1e-3, resume=True,
                                              cache_dir=root / "cache")) == 2
    refused(caplog, "--lr", gan_ckpt)
    assert tree(gan_out) == before
    caplog.clear()
    before = tree(clf_run)
    assert call(classifier.main, clf_train_argv(clf_data, clf_run, max_steps=4, lr=1e-2, resume=True,
                                                evaluate=False, cache_dir=root / "cache")) == 2
    refused(caplog, "--lr", clf_run / "last.pt")
    assert tree(clf_run) == before


# ----------------------------------------------------------------------------- checkpoints

def _run_folder_with(src: Path, tmp_path: Path, name: str, content: bytes) -> Path:
    """A copy of run folder `src` whose checkpoint `name` holds `content`."""
    out = shutil.copytree(src, tmp_path / f"run-{src.name}")
    (out / name).write_bytes(content)
    return out


def test_corrupt_and_foreign_checkpoints_are_one_line(root, gan_ckpt, gan_data, clf_run, clf_data, tmp_path, caplog):
    whole = gan_ckpt.read_bytes()
    bad = {"truncated": whole[:len(whole) // 2], "garbage": np.random.default_rng(0).bytes(4096), "empty": b""}
    files = {}
    for name, content in bad.items():
        files[name] = tmp_path / f"{name}.pt"
        files[name].write_bytes(content)
    images = clf_data / "jpeg" / "train"
    cases = [(cyclegan.main, translate_argv(f, gan_data, tmp_path / "syn"), f) for f in files.values()]
    cases += [(cyclegan.main, translate_argv(clf_run / "best.pt", gan_data, tmp_path / "syn"), clf_run / "best.pt"),
              (classifier.main, ["evaluate", "--checkpoint", files["truncated"], "--device", "cpu", "--out",
                                 tmp_path / "ev"], files["truncated"]),
              (classifier.main, ["evaluate", "--checkpoint", gan_ckpt, "--device", "cpu", "--out", tmp_path / "ev"],
               gan_ckpt),
              (classifier.main, predict_argv(gan_ckpt, images), gan_ckpt),
              (classifier.main, predict_argv(files["garbage"], images), files["garbage"])]
    gan_run = _run_folder_with(gan_ckpt.parent, tmp_path, "checkpoint.pt", bad["truncated"])
    cases.append((cyclegan.main, gan_train_argv(gan_data, gan_run, max_steps=4, resume=True, cache_dir=root / "cache"),
                  gan_run / "checkpoint.pt"))
    clf_copy = _run_folder_with(clf_run, tmp_path, "last.pt", bad["truncated"])
    cases.append((classifier.main, clf_train_argv(clf_data, clf_copy, max_steps=4, resume=True, evaluate=False,
                                                  cache_dir=root / "cache"), clf_copy / "last.pt"))
    for main, argv, named in cases:
        before = tree(tmp_path)
        caplog.clear()
        assert call(main, argv) == 2, argv
        refused(caplog, named)
        assert tree(tmp_path) == before, argv


def test_a_damaged_checkpoint_is_called_damaged(gan_ckpt, gan_data, tmp_path, caplog):
    whole = gan_ckpt.read_bytes()
    for name, content in {"truncated": whole[:len(whole) // 2], "empty": b""}.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(content)
        caplog.clear()
        assert call(cyclegan.main, translate_argv(path, gan_data, tmp_path / "syn")) == 2
        msg = refused(caplog, path)
        assert re.search(r"damaged|corrupt|incomplete|truncated", msg) and "weights_only" not in msg, msg


class Evil:
    """Unpickling this creates the file `path`: code that a checkpoint must never get to run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_malicious_pickle_is_refused_and_never_runs(root, gan_ckpt, gan_data, clf_run, clf_data, tmp_path, caplog):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "melano.cyclegan", "G_A": Evil(marker), "model": Evil(marker)}, evil)
    live = tmp_path / "live.pt"  # the same payload does run when loaded unsafely: the test can fail
    torch.save({"x": Evil(tmp_path / "ran")}, live)
    torch.load(live, weights_only=False)["x"].close()
    assert (tmp_path / "ran").exists()
    payload = evil.read_bytes()
    gan_run = _run_folder_with(gan_ckpt.parent, tmp_path, "checkpoint.pt", payload)
    clf_copy = _run_folder_with(clf_run, tmp_path, "last.pt", payload)
    images = clf_data / "jpeg" / "train"
    cases = [(cyclegan.main, translate_argv(evil, gan_data, tmp_path / "syn"), evil),
             (classifier.main, ["evaluate", "--checkpoint", evil, "--device", "cpu", "--out", tmp_path / "ev"], evil),
             (classifier.main, predict_argv(evil, images), evil),
             (cyclegan.main, gan_train_argv(gan_data, gan_run, max_steps=4, resume=True, cache_dir=root / "cache"),
              gan_run / "checkpoint.pt"),
             (classifier.main, clf_train_argv(clf_data, clf_copy, max_steps=4, resume=True, evaluate=False,
                                              cache_dir=root / "cache"), clf_copy / "last.pt")]
    for main, argv, named in cases:
        before = tree(tmp_path)
        caplog.clear()
        assert call(main, argv) == 2, argv
        msg = refused(caplog, named, "weights_only=False")
        assert re.search(r"(do not|don't|never|must not)[^.;]*weights_only=False", msg), msg  # said not to ...
        assert "will likely succeed" not in msg and "re-running" not in msg.lower(), msg  # ... not torch's advice
        assert not marker.exists()
        assert tree(tmp_path) == before, argv


# ----------------------------------------------------------------------------- folders and files

@pytest.fixture
def read_only(tmp_path, monkeypatch) -> Path:
    """A folder nobody may write into. Root ignores permission bits, so then creating a folder or
    opening a file for writing under it is refused by patched os.mkdir and os.open."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:
        def inside(path) -> bool:
            return os.path.abspath(path) == str(ro) or os.path.abspath(path).startswith(str(ro) + os.sep)

        real_mkdir, real_open = os.mkdir, os.open

        def mkdir(path, *a, **k):
            if inside(path):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_mkdir(path, *a, **k)

        def open_(path, flags, *a, **k):
            if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *a, **k)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "open", open_)
    yield ro
    ro.chmod(0o755)


def _read_only_case(case, ro, root, gan_ckpt, gan_data, clf_run, clf_data):
    """(main, argv, the option its error must name) for each command writing into `ro`."""
    images = clf_data / "jpeg" / "train"
    return {
        "cyclegan --out": (cyclegan.main, gan_train_argv(gan_data, ro / "run", cache_dir=root / "cache"), "--out"),
        "cyclegan --cache-dir": (cyclegan.main, gan_train_argv(gan_data, ro.parent / "run", cache_dir=ro / "c"),
                                 "--cache-dir"),
        "classifier --out": (classifier.main, clf_train_argv(clf_data, ro / "run", cache_dir=root / "cache"), "--out"),
        "translate --out": (cyclegan.main, translate_argv(gan_ckpt, gan_data, ro / "syn"), "--out"),
        "predict --out": (classifier.main, predict_argv(clf_run / "best.pt", images, "--out", ro / "p.csv"), "--out"),
        "evaluate --out": (classifier.main, ["evaluate", "--checkpoint", clf_run / "best.pt", "--device", "cpu",
                                             "--workers", "0", "--out", ro / "e"], "--out"),
    }[case]


@pytest.mark.parametrize("case", ["cyclegan --out", "cyclegan --cache-dir", "classifier --out", "translate --out",
                                  "predict --out", "evaluate --out"])
def test_an_unwritable_folder_is_one_line_naming_the_option(case, read_only, root, gan_ckpt, gan_data, clf_run,
                                                            clf_data, caplog):
    # a read-only --out, --cache-dir or predict --out was an uncaught PermissionError everywhere
    main, argv, option = _read_only_case(case, read_only, root, gan_ckpt, gan_data, clf_run, clf_data)
    before = tree(clf_run)
    assert call(main, argv) == 2
    msg = refused(caplog, read_only, "Permission denied")
    assert option in msg, msg
    assert list(read_only.iterdir()) == [] and tree(clf_run) == before


def test_evaluate_after_the_data_moved_says_to_pass_data(clf_run, clf_data, caplog, tmp_path):
    moved = clf_data.with_name("clf_data_moved")
    clf_data.rename(moved)
    try:
        argv = ["evaluate", "--checkpoint", clf_run / "best.pt", "--device", "cpu", "--workers", "0", "--out",
                tmp_path / "ev"]
        assert call(classifier.main, argv) == 2
        refused(caplog, clf_data, "--data")
        assert call(classifier.main, argv + ["--data", moved]) == 0  # and the advice works
    finally:
        moved.rename(clf_data)


def test_a_split_of_other_data_is_refused_without_advice_to_delete_it(clf_data, tmp_path, caplog):
    from melano import data
    other = make_data(tmp_path / "other", 30, 10, seed=9)
    theirs = tmp_path / "experiment2" / "splits.csv"
    assert data.main(["split", str(other), "--out", str(theirs)]) == 0
    before = theirs.read_bytes()
    caplog.clear()
    argv = clf_train_argv(clf_data, tmp_path / "run", split_csv=theirs, cache_dir=tmp_path / "cache")
    assert call(classifier.main, argv) == 2
    msg = refused(caplog, theirs)
    assert "delete" not in msg.lower(), msg  # it is the other experiment's split: keep it
    assert theirs.read_bytes() == before


def test_translate_checks_its_out_before_any_work(gan_ckpt, gan_data, tmp_path, caplog):
    own = shutil.copytree(gan_data, tmp_path / "own")
    argv = translate_argv(gan_ckpt, own, own, "--cache-dir", tmp_path / "cache")
    assert call(cyclegan.main, argv) == 2
    refused(caplog, own)
    assert not (tmp_path / "cache").exists()  # refused before minutes of decoding at ISIC scale


# ----------------------------------------------------------------------------- the terminal

def test_the_command_line_shows_one_error_line_and_no_traceback(gan_data, clf_data, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    gan = ["melano.cyclegan", *gan_train_argv(gan_data, tmp_path / "o1", batch_size=-1)]
    cases = {
        "cyclegan train": (gan, "--batch-size"),
        "classifier train": (["melano.classifier", *clf_train_argv(clf_data, tmp_path / "o2", val_every=-1)],
                             "--val-every"),
        "translate": (["melano.cyclegan", *translate_argv(corrupt, gan_data, tmp_path / "o3")], str(corrupt)),
        "pipeline": (["melano.pipeline", "--preset", "smoke", "--gan-size", "31", "--out", tmp_path / "o4"],
                     "--gan-size"),
        "cyclegan train --debug": (gan + ["--debug"], "--batch-size"),
    }
    procs = {name: _start(argv[0], argv[1:], tmp_path / f"{i}.log")
             for i, (name, (argv, _)) in enumerate(cases.items())}
    for i, (name, p) in enumerate(procs.items()):
        assert p.wait(timeout=300) == 2, name
        err = (tmp_path / f"{i}.log").read_text()
        lines = [line for line in err.splitlines() if " ERROR " in line]
        assert len(lines) == 1 and cases[name][1] in lines[0], (name, err[-3000:])
        assert ("Traceback" in err) == name.endswith("--debug"), (name, err[-3000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["corrupt.pt", *(f"{i}.log" for i in range(5))])
