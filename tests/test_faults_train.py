"""Fault injection for the trainers, translate and the pipeline: kill -9 at seeded random points,
then rerun. The final state equals an uninterrupted run's, and no folder is ever mislabelled.

Each killed command is the real command line, `python -m melano.<module> ...`, in a session of
its own: the test SIGKILLs the whole session (DataLoader and pool workers too) a random time after
the command has claimed its output folder (its PID appears in `<out>/.melano.lock`; before that it
is only importing). The delay is drawn by a seeded generator, uniformly over how long an
uninterrupted run takes from that point. After every kill the folder must hold nothing a reader
could mistake: checkpoints load and say which step they hold, and every image a train.csv lists
exists and is the image an uninterrupted run writes. Then the command is rerun (trainers with
--resume, translate with --force, the pipeline as it was) and the final state is compared with an
uninterrupted run's: weights with torch.equal, CSVs and images byte for byte, AUCs exactly.

Two kills are aimed instead of drawn, at moments random ones seldom hit: inside a checkpoint's
atomic write, and half-way through translate's images over an earlier translation.

The quick cases (one per component) run the reference and the rerun in this process and only the
killed run as a command; the `slow` ones (make test-faults) run everything as commands and kill
each case up to twice. TALLY counts cases and kills; it is printed at the end (pytest -s).
"""

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import clf_train_argv, gan_train_argv, make_data, read_csv, tree
from melano import classifier, cyclegan

ROOT = Path(__file__).resolve().parent.parent
TALLY = collections.Counter()
PATHS = {"out", "split_csv", "cache_dir", "resume", "force"}  # config fields that differ between folders

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def tally():
    yield
    print(f"\nfault injection, trainers/translate/pipeline: {dict(TALLY)}")


# ----------------------------------------------------------------------------- running and killing

# `python -c AIMED module what n argv...` runs `python -m module argv...` and SIGKILLs itself at the
# n-th event `what`: "replace:NAME" is just before the n-th atomic rename onto a file NAME (its temp
# file is written), "image" just after the n-th image file is saved.
AIMED = r"""
import os, runpy, signal, sys
module, what, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen = [0]
def event():
    seen[0] += 1
    if seen[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
if what.startswith("replace:"):
    real_replace, name = os.replace, what.split(":", 1)[1]
    def replace(src, dst, *a, **k):
        if os.path.basename(dst) == name:
            event()
        return real_replace(src, dst, *a, **k)
    os.replace = replace
elif what == "image":
    from PIL import Image
    real_save = Image.Image.save
    def save(self, *a, **k):
        real_save(self, *a, **k)
        event()
    Image.Image.save = save
sys.argv = [module, *sys.argv[4:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def command(module: str, argv: list, out: Path, kill_after: float | None = None,
            aimed: tuple[str, int] | None = None, alone: bool = False) -> int:
    """Run `python -m module argv`, which claims folder `out`. `kill_after`: SIGKILL its session that
    many seconds after the claim (`alone`: the command's process only; then what it started must
    stop by itself within 60 s); `aimed` = (event, n): it kills itself there (see AIMED).
    Returns its exit code, -9 if killed."""
    argv = [str(a) for a in argv]
    cmd = [sys.executable, "-m", module, *argv] if aimed is None else \
        [sys.executable, "-c", AIMED, module, aimed[0], str(aimed[1]), *argv]
    log = out.with_name(out.name + ".log")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "ab") as f:
        p = subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.DEVNULL, stderr=f,
                             start_new_session=True)
    lock, mine, claimed = out / ".melano.lock", f"pid={p.pid} ".encode(), None
    while p.poll() is None:
        if claimed is None and lock.exists() and lock.read_bytes().startswith(mine):
            claimed = time.time()
        if claimed is not None and kill_after is not None and time.time() - claimed >= kill_after:
            os.kill(p.pid, signal.SIGKILL) if alone else os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.003)
    rc = p.wait()
    if alone:
        assert session_ends(p.pid, 60), f"processes {module} started outlived it by 60 s"
    try:
        os.killpg(p.pid, signal.SIGKILL)  # anything of its session still alive
    except ProcessLookupError:
        pass
    if kill_after is not None or aimed is not None:
        TALLY["kills injected"] += rc == -signal.SIGKILL
        TALLY["finished before the kill"] += rc == 0
    assert rc in (0, -signal.SIGKILL), f"{module} exited with {rc}: {log.read_text()[-3000:]}"
    return rc


def session_ends(sid: int, seconds: float) -> bool:
    """Whether every process of session (and group) `sid` is gone within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(sid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def call(main, argv) -> int:
    return main([str(a) for a in argv])


def ref_call(main, argv, ref: Path) -> float:
    """An uninterrupted run in this process, into `ref`: its busy seconds (see `busy`)."""
    assert call(main, argv) == 0
    return busy(ref)


def ref_run(module: str, argv, ref: Path, plots: bool = False) -> float:
    """An uninterrupted command, into `ref`: its busy seconds (see `busy`)."""
    assert command(module, argv, ref) == 0
    return busy(ref, plots)


def busy(folder: Path, plots: bool = False) -> float:
    """Seconds from a reference run's claim of `folder` (its lock file is written then) to its last
    write there: the window for random kills. Loss plots come last and take seconds (matplotlib)
    but hold nothing a rerun needs, so they are left out unless `plots`."""
    files = [p for p in folder.rglob("*") if p.is_file() and (plots or p.suffix != ".png" or "samples" in p.parts)]
    return max(p.stat().st_mtime for p in files) - (folder / ".melano.lock").stat().st_mtime


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, where: str = "") -> None:
    """Equal nested checkpoints: tensors with torch.equal, configs up to their folder paths."""
    if isinstance(a, dict):
        drop = PATHS if where.endswith("config") else set()
        assert a.keys() - drop == b.keys() - drop, where
        for k in a.keys() - drop:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, (where, a, b)


def temp_files(out: Path) -> list[str]:
    """Files an atomic write leaves behind when killed between writing and renaming."""
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*.tmp-*"))


def draw(rng: np.random.Generator, seconds: float, done: float = 0.0) -> float:
    """A kill time over a reference run's busy window, and a little past it (the end, teardown).
    `done`: the share of the work a resumed run starts with (it has that much less to do)."""
    return float(rng.uniform(0, 1.15 * seconds * max(0.25, 1 - done)))


# ----------------------------------------------------------------------------- CycleGAN

GAN_STEPS = 10  # 8 steps per epoch of the tiny set: the runs cross an epoch (and an lr change)


@pytest.fixture(scope="module")
def gan_data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("gan") / "data", 40, 20)


def gan_argv(data, out, every: int, steps: int = GAN_STEPS, **kw) -> list[str]:
    return gan_train_argv(data, out, max_steps=steps, checkpoint_every=every, sample_every=3, **kw)


def check_killed_gan(out: Path, steps: int = GAN_STEPS) -> None:
    """A killed CycleGAN run's folder: its checkpoint loads and matches the loss log up to its step."""
    ck = out / cyclegan.CHECKPOINT
    step = load(ck)["step"] if ck.exists() else 0
    TALLY["cyclegan kills: " + ("no checkpoint yet" if not step else "mid-run" if step < steps else "at the end")] += 1
    if ck.exists():
        s = load(ck)
        assert s["format"] == "melano.cyclegan" and 1 <= s["step"] <= steps
        logged = [int(r["step"]) for r in read_csv(out / "losses.csv")]
        assert logged[:s["step"]] == list(range(1, s["step"] + 1))
    if (out / "config.json").exists():
        json.loads((out / "config.json").read_text())
    for png in (out / "samples").glob("*.png"):
        Image.open(png).verify()  # atomic: never half a PNG


def assert_same_gan(ref: Path, out: Path, steps: int = GAN_STEPS) -> None:
    assert_same(load(ref / cyclegan.CHECKPOINT), load(out / cyclegan.CHECKPOINT))
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(read_csv(ref / "losses.csv")) == drop(read_csv(out / "losses.csv"))
    assert len(read_csv(out / "losses.csv")) == steps
    assert tree(ref / "samples") == tree(out / "samples") != {}
    assert (ref / "splits.csv").read_bytes() == (out / "splits.csv").read_bytes()


def gan_kills(data: Path, tmp: Path, every: int, cases: int, kills: int, seed: int) -> None:
    ref = tmp / "ref"
    seconds = ref_run("melano.cyclegan", gan_argv(data, ref, every), ref)
    rng = np.random.default_rng(seed)
    for c in range(cases):
        out = tmp / f"case{c}"
        TALLY["cases tried"] += 1
        for k in range(kills):  # the first run, then --resume; each killed at a random point
            ck = out / cyclegan.CHECKPOINT
            done = load(ck)["step"] / GAN_STEPS if k and ck.exists() else 0.0
            command("melano.cyclegan", gan_argv(data, out, every, resume=k > 0), out,
                    kill_after=draw(rng, seconds, done))
            check_killed_gan(out)
        command("melano.cyclegan", gan_argv(data, out, every, resume=True), out)
        TALLY["temp files left by kills"] += len(temp_files(out))
        assert_same_gan(ref, out)


def test_cyclegan_killed_at_a_random_point_resumes_exactly(gan_data, tmp_path, caplog):
    ref = tmp_path / "ref"
    seconds = ref_call(cyclegan.main, gan_argv(gan_data, ref, every=1, steps=4), ref)
    out = tmp_path / "case"
    TALLY["cases tried"] += 1
    command("melano.cyclegan", gan_argv(gan_data, out, every=1, steps=4), out,
            kill_after=draw(np.random.default_rng(0), seconds))
    check_killed_gan(out, steps=4)
    assert call(cyclegan.main, gan_argv(gan_data, out, every=1, steps=4, resume=True)) == 0
    assert_same_gan(ref, out, steps=4)


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 2])
def test_cyclegan_killed_at_many_random_points(gan_data, tmp_path, every):
    gan_kills(gan_data, tmp_path, every, cases=3, kills=2, seed=every)


class Leftover(AssertionError):
    """A killed write's temp file that nothing removes."""


@pytest.mark.slow
def test_cyclegan_killed_inside_a_checkpoint_write(gan_data, tmp_path):
    ref = tmp_path / "ref"
    assert call(cyclegan.main, gan_argv(gan_data, ref, every=1, steps=4)) == 0
    out = tmp_path / "case"
    TALLY["cases tried"] += 1
    # killed with the third checkpoint (step 3) written to its temp file, not yet renamed into place
    assert command("melano.cyclegan", gan_argv(gan_data, out, every=1, steps=4), out,
                   aimed=(f"replace:{cyclegan.CHECKPOINT}", 3)) == -signal.SIGKILL
    assert load(out / cyclegan.CHECKPOINT)["step"] == 2  # the previous one, whole
    check_killed_gan(out, steps=4)
    left = temp_files(out)
    assert left and all(name.startswith(f".{cyclegan.CHECKPOINT}.tmp-") for name in left)
    assert call(cyclegan.main, gan_argv(gan_data, out, every=1, steps=4, resume=True)) == 0
    assert_same_gan(ref, out, steps=4)
    if temp_files(out):
        raise Leftover(f"left in {out} after the rerun: {temp_files(out)}")


# ----------------------------------------------------------------------------- classifier

CLF_STEPS = 10  # 7 steps per epoch of the tiny set


@pytest.fixture(scope="module")
def clf_data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("clf") / "data", 50, 30, images_per_patient=3.0)


def clf_argv(data, out, **kw) -> list[str]:
    return clf_train_argv(data, out, max_steps=CLF_STEPS, val_every=1, epochs=2, **kw)


def check_killed_classifier(out: Path, ref: Path) -> None:
    """A killed classifier run's folder: last.pt and best.pt load, and best.pt's step and AUC are
    one of the validations an uninterrupted run makes (it is labelled with what it is)."""
    history = load(ref / "last.pt")["history"]
    step = load(out / "last.pt")["step"] if (out / "last.pt").exists() else 0
    TALLY["classifier kills: " + ("no last.pt yet" if not step else "mid-run" if step < len(history)
                                  else "after the last step")] += 1
    if (out / "last.pt").exists():
        s = load(out / "last.pt")
        assert s["format"] == "melano.classifier" and s["history"] == history[:s["step"]]
    if (out / "best.pt").exists():
        b = load(out / "best.pt")
        assert {"step": b["step"], "val_auc": b["val_auc"]} in [{"step": h["step"], "val_auc": h["val_auc"]}
                                                                for h in history]


def assert_same_classifier(ref: Path, out: Path, evaluated: bool) -> None:
    for name in ("last.pt", "best.pt"):
        assert_same(load(ref / name), load(out / name), name)
    names = ["history.csv", "val_predictions.csv"] + (["test_predictions.csv"] if evaluated else [])
    for name in names:
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name
    if evaluated:
        keep = ("auc", "ci_low", "ci_high", "images", "malignant")
        m_ref, m_out = (json.loads((d / "test_metrics.json").read_text()) for d in (ref, out))
        assert {k: m_ref[k] for k in keep} == {k: m_out[k] for k in keep}
        r_ref, r_out = (json.loads((d / "result.json").read_text()) for d in (ref, out))
        assert (r_ref["best_val_auc"], r_ref["best_step"], r_ref["steps"]) == \
            (r_out["best_val_auc"], r_out["best_step"], r_out["steps"])


def test_classifier_killed_at_a_random_point_resumes_exactly(clf_data, tmp_path):
    argv = lambda out, **kw: clf_train_argv(clf_data, out, max_steps=3, val_every=1, evaluate=False, **kw)  # noqa: E731
    ref = tmp_path / "ref"
    seconds = ref_call(classifier.main, argv(ref), ref)
    out = tmp_path / "case"
    TALLY["cases tried"] += 1
    command("melano.classifier", argv(out), out, kill_after=draw(np.random.default_rng(1), seconds))
    check_killed_classifier(out, ref)
    assert call(classifier.main, argv(out, resume=True)) == 0
    assert_same_classifier(ref, out, evaluated=False)


@pytest.mark.slow
def test_classifier_killed_at_many_random_points(clf_data, tmp_path):
    ref = tmp_path / "ref"
    seconds = ref_run("melano.classifier", clf_argv(clf_data, ref), ref)
    rng = np.random.default_rng(7)
    for c in range(4):
        out = tmp_path / f"case{c}"
        TALLY["cases tried"] += 1
        for k in range(2):
            done = load(out / "last.pt")["step"] / CLF_STEPS if k and (out / "last.pt").exists() else 0.0
            command("melano.classifier", clf_argv(clf_data, out, resume=k > 0), out,
                    kill_after=draw(rng, seconds, done))
            check_killed_classifier(out, ref)
        command("melano.classifier", clf_argv(clf_data, out, resume=True), out)
        TALLY["temp files left by kills"] += len(temp_files(out))
        assert_same_classifier(ref, out, evaluated=True)


# ----------------------------------------------------------------------------- translate

@pytest.fixture(scope="module")
def generators(gan_data, tmp_path_factory):
    """Two CycleGANs trained 2 steps on the same split (seeds 5 and 6): their checkpoints."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("generators")
    ckpts = []
    for seed in (5, 6):
        out = root / f"gan{seed}"
        assert call(cyclegan.main, gan_train_argv(gan_data, out, max_steps=2, seed=seed, split_csv=root / "splits.csv",
                                                  cache_dir=root / "cache")) == 0
        ckpts.append(out / cyclegan.CHECKPOINT)
    return ckpts


def translate_argv(ckpt, data, out, *more) -> list:
    return ["translate", "--checkpoint", ckpt, "--data", data, "--out", out, "--batch-size", "2", "--device", "cpu",
            *more]


def listed(folder: Path) -> dict[str, bytes] | None:
    """What a reader of a translation sees: train.csv and the images it lists (None: no train.csv).
    Every listed image must exist."""
    if not (folder / "train.csv").exists():
        return None
    rows = read_csv(folder / "train.csv")
    images = {r["image_name"]: folder / "jpeg" / "train" / f"{r['image_name']}.jpg" for r in rows}
    missing = [n for n, p in images.items() if not p.exists()]
    assert not missing, f"train.csv lists missing images: {missing[:5]}"
    return {"train.csv": (folder / "train.csv").read_bytes(), **{n: p.read_bytes() for n, p in images.items()}}


def assert_same_translation(ref: Path, out: Path) -> None:
    assert listed(ref) == listed(out)
    assert sorted(p.name for p in (ref / "jpeg" / "train").iterdir()) == \
        sorted(p.name for p in (out / "jpeg" / "train").iterdir())  # nothing unlisted


def test_translate_killed_at_a_random_point_then_forced(generators, gan_data, tmp_path):
    ckpt = generators[0]
    ref = tmp_path / "ref"
    seconds = ref_call(cyclegan.main, translate_argv(ckpt, gan_data, ref), ref)
    want = listed(ref)
    rng = np.random.default_rng(2)
    for c in range(2):
        out = tmp_path / f"case{c}"
        TALLY["cases tried"] += 1
        command("melano.cyclegan", translate_argv(ckpt, gan_data, out), out, kill_after=draw(rng, seconds))
        seen = listed(out)
        assert seen is None or seen == want  # nothing, or the whole translation
        assert call(cyclegan.main, translate_argv(ckpt, gan_data, out, "--force")) == 0
        assert_same_translation(ref, out)


@pytest.mark.slow
def test_translate_killed_at_many_random_points(generators, gan_data, tmp_path):
    ckpt, other = generators
    ref, old = tmp_path / "ref", tmp_path / "old"
    seconds = ref_run("melano.cyclegan", translate_argv(ckpt, gan_data, ref), ref)
    command("melano.cyclegan", translate_argv(other, gan_data, old, "--limit", "9"), old)
    want, before = listed(ref), listed(old)
    rng = np.random.default_rng(3)
    for c in range(6):
        out = tmp_path / f"case{c}"
        over = c % 2 == 1  # over a smaller translation by the other model: a reader sees the old or the new
        if over:
            shutil.copytree(old, out)
        TALLY["cases tried"] += 1
        for _ in range(2):
            command("melano.cyclegan", translate_argv(ckpt, gan_data, out, "--force"), out,
                    kill_after=draw(rng, seconds))
            seen = listed(out)  # every image it lists exists
            if over and seen not in (want, before):  # a mix: test_translate_killed_over_an_earlier_translation
                TALLY["translations left mixed by a kill"] += 1
            elif not over:
                assert seen in (None, want)
        command("melano.cyclegan", translate_argv(ckpt, gan_data, out, "--force"), out)
        assert_same_translation(ref, out)


class Mixed(AssertionError):
    """A translation folder holding images of two models under one train.csv."""


def test_translate_killed_over_an_earlier_translation(generators, gan_data, tmp_path):
    ckpt, other = generators
    ref, out = tmp_path / "ref", tmp_path / "case"
    assert call(cyclegan.main, translate_argv(ckpt, gan_data, ref)) == 0
    assert call(cyclegan.main, translate_argv(other, gan_data, out)) == 0  # the other model's, same names
    want, before = listed(ref), listed(out)
    assert want.keys() == before.keys() and want != before
    TALLY["cases tried"] += 1
    assert command("melano.cyclegan", translate_argv(ckpt, gan_data, out, "--force"), out,
                   aimed=("image", 5)) == -signal.SIGKILL
    seen = listed(out)
    assert call(cyclegan.main, translate_argv(ckpt, gan_data, out, "--force")) == 0  # the rerun repairs it
    assert_same_translation(ref, out)
    if seen not in (want, before):
        mixed = sum(seen[n] != before[n] for n in before)
        raise Mixed(f"after the kill, train.csv is the old one but {mixed} of its {len(before) - 1} images are "
                    f"the new model's")


# ----------------------------------------------------------------------------- pipeline

def pipeline_argv(out) -> list:
    return ["--preset", "smoke", "--arms", "none", "cyclegan", "--seeds", "1", "--out", out, "--device", "cpu"]


def check_killed_pipeline(out: Path) -> None:
    """Every stage that says it is done holds its outputs, whole."""
    for done in out.glob("*/done.json"):
        stage = done.parent
        json.loads(done.read_text())
        if stage.name.startswith("gan"):
            assert load(stage / cyclegan.CHECKPOINT)["format"] == "melano.cyclegan"
        if stage.name.startswith("synth"):
            assert listed(stage / "images")
        if stage.name.startswith("arm_"):
            assert load(stage / "best.pt")["format"] == "melano.classifier"
            assert read_csv(stage / "test_predictions.csv")
    if (out / "metrics.json").exists():
        json.loads((out / "metrics.json").read_text())


def metrics(out: Path) -> dict:
    """metrics.json without its timings (the quality stage's too) and with the run folder's path as <out>."""
    m = json.loads((out / "metrics.json").read_text().replace(str(out), "<out>"))
    if m.get("synthetic_quality"):
        m["synthetic_quality"].pop("timings_s", None)
    return {k: v for k, v in m.items() if k not in ("timings_s", "wall_s", "host")}


def place_users_files(out: Path, data: Path) -> dict:
    """A user's own files among the pipeline's stages: a data set melano wrote (it has an owner
    file), a folder in the place of a stage of another configuration, and notes. Their tree."""
    shutil.copytree(data, out / "my_lesions")
    (out / "arm_traditional_0").mkdir()
    (out / "arm_traditional_0" / "plan.txt").write_text("run this arm next week")
    (out / "notes.txt").write_text("the first run was killed")
    return {p: tree(out / p) for p in ("my_lesions", "arm_traditional_0")} | {"notes": (out / "notes.txt").read_text()}


@pytest.mark.slow
def test_pipeline_killed_at_random_points(clf_data, tmp_path):
    # Issue 26: a user's files sit beside the stages from the first kill on, and half the kills
    # reach the pipeline's process alone: its trainers must stop by themselves, and nothing the
    # user made may change
    ref = tmp_path / "ref"
    seconds = ref_run("melano.pipeline", pipeline_argv(ref), ref, plots=True)
    want = metrics(ref)
    assert [a["name"] for a in want["arms"]] == ["none", "cyclegan"]
    rng = np.random.default_rng(4)
    for c in range(3):
        out = tmp_path / f"case{c}"
        TALLY["cases tried"] += 1
        users = None
        for k in range(2 if c else 1):
            alone = bool(rng.integers(2))
            command("melano.pipeline", pipeline_argv(out), out, kill_after=draw(rng, seconds), alone=alone)
            TALLY["pipeline kills of its process alone"] += alone
            check_killed_pipeline(out)
            if users is None and (out / ".melano.json").exists():  # a run folder the pipeline owns
                users = place_users_files(out, clf_data)
        command("melano.pipeline", pipeline_argv(out), out)
        if users is not None:
            TALLY["pipeline cases with a user's files beside the stages"] += 1
            assert {p: tree(out / p) for p in ("my_lesions", "arm_traditional_0")} | \
                {"notes": (out / "notes.txt").read_text()} == users
        got = metrics(out)
        aucs = lambda m: [s["auc"] for a in m["arms"] for s in a["seeds"]]  # noqa: E731
        assert aucs(got) == aucs(want)
        assert got == want


# ----------------------------------------------------------------------------- predict

def predict_argv(ckpt, images, out, *more) -> list:
    return ["predict", "--checkpoint", ckpt, "--images", images, "--out", out, "--device", "cpu", *more]


def run_killed(argv: list, kill_after: float | None = None, aimed: tuple[str, int] | None = None) -> int:
    """`python -m melano.classifier argv`, SIGKILLed `kill_after` seconds after it starts, or at an
    AIMED event. Its exit code (-9 if killed)."""
    cmd = [sys.executable, "-m", "melano.classifier", *map(str, argv)] if aimed is None else \
        [sys.executable, "-c", AIMED, "melano.classifier", aimed[0], str(aimed[1]), *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = p.communicate(timeout=kill_after if kill_after is not None else 120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate(timeout=60)
    assert p.returncode in (0, -signal.SIGKILL), err.decode()[-3000:]
    TALLY["predict kills injected"] += p.returncode == -signal.SIGKILL
    return p.returncode


@pytest.mark.slow
def test_predict_killed_mid_write_leaves_every_file_whole(clf_data, tmp_path):
    # Issue 26: predict --out is written atomically beside a user's files, over its own earlier
    # output; a kill at any point leaves the earlier output or the new one, whole, and the user's
    # files as they were; the rerun needs no --force (the file is still predict's)
    run = tmp_path / "clf"
    assert call(classifier.main, clf_argv(clf_data, run, evaluate=False)) == 0
    images, folder = clf_data / "jpeg" / "train", tmp_path / "results"
    folder.mkdir()
    (folder / "my_scores.csv").write_text("image,probability\nmine.jpg,0.7\n")
    out, ref = folder / "scores.csv", tmp_path / "ref.csv"
    t0 = time.monotonic()
    assert run_killed(predict_argv(run / "best.pt", images, ref)) == 0
    seconds, want = time.monotonic() - t0, ref.read_bytes()
    assert run_killed(predict_argv(run / "best.pt", images, out, "--tta")) == 0  # an earlier, other output
    earlier = out.read_bytes()
    assert earlier != want
    mine = (folder / "my_scores.csv").read_bytes()
    rng = np.random.default_rng(26)
    kills = [dict(aimed=("replace:scores.csv", 1)), dict(aimed=("replace:.melano.outputs", 1))] + \
        [dict(kill_after=float(rng.uniform(0.5, 1.1 * seconds))) for _ in range(4)]
    for kill in kills:
        run_killed(predict_argv(run / "best.pt", images, out), **kill)
        assert (folder / "my_scores.csv").read_bytes() == mine, kill
        assert out.read_bytes() in (earlier, want), kill
        if out.read_bytes() == want:  # finished before the kill: start again from the earlier output
            assert run_killed(predict_argv(run / "best.pt", images, out, "--tta")) == 0
    assert run_killed(predict_argv(run / "best.pt", images, out)) == 0
    assert out.read_bytes() == want and (folder / "my_scores.csv").read_bytes() == mine
    assert sorted(p.name for p in folder.iterdir()) == [".melano.outputs", "my_scores.csv", "scores.csv"]
