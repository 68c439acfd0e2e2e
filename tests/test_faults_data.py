"""Fault injection for synth and the cache build: kill -9 at seeded random points, then rerun.

Each case forks a child that runs the real command (``melano.data.main``) in a session of its
own, and SIGKILLs the whole session after a random delay drawn from a seeded generator over
the length of an uninterrupted run (the fastest of three). (A fork starts at once: a fresh
interpreter would spend seconds importing torch before the work begins.) After each kill:
  - no folder is mislabelled: whatever a reader can open equals the old set or the new one
    (synth), or the uninterrupted build (cache), byte for byte;
  - the rerun's final state equals an uninterrupted run's, and no leftovers remain.

The quick cases run in ``make test``; the ``slow`` ones (more kills, worker pools) in
``make test-faults``.
"""

import hashlib
import multiprocessing as mp
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from melano import data, synth
from melano.infra import outdir

try:
    from tqdm.auto import tqdm  # melano.infra.cli.progress draws its bars with it when it is installed
except ImportError:
    tqdm = None

HUNG_S = 120.0  # no run here takes more than a few seconds, even on a loaded machine


def data_files(root: Path) -> dict[str, str]:
    """sha256 of train.csv and every image: what a reader sees of a data set."""
    if not (root / "train.csv").exists():
        return {}
    files = [root / "train.csv", *sorted((root / "jpeg" / "train").glob("*"))]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _child(argv: list[str], patch: str | None) -> None:
    os.setsid()  # its own session: the kill takes its pool workers too
    if tqdm is not None:
        # A fresh process makes its own bar lock; a fork shares this one's: a multiprocessing
        # semaphore that an earlier child, killed while drawing its bar, left held for good (the
        # next run then sleeps in sem_wait forever), and a thread lock that this process's tqdm
        # monitor thread may hold at the fork. Melano's pool workers draw no bars.
        tqdm.set_lock(threading.RLock())
    if patch == "die before the second rename":
        real = os.rename

        def rename(src, dst):
            if ".melano-new-" in str(src):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)

        os.rename = rename
    elif patch == "die before the old set is removed":
        shutil.rmtree = lambda path, *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    os._exit(data.main(argv))


def _kill(pid: int) -> None:
    """SIGKILL the child, then its session (the pool workers it started). A child killed before
    its setsid has no session yet: killpg alone would miss it, and it would run to the end."""
    os.kill(pid, signal.SIGKILL)  # not yet reaped, so the pid is still the child's
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run(argv: list[str], kill_after: float | None = None, patch: str | None = None) -> tuple[int, float]:
    """Run `python -m melano.data argv` in a forked child; SIGKILL it after `kill_after` seconds.
    Returns (exit code, or -9 if killed; seconds it ran). A run still going after HUNG_S seconds
    is killed and fails the test, instead of stalling it."""
    proc = mp.get_context("fork").Process(target=_child, args=(argv, patch))
    t0 = time.monotonic()
    proc.start()
    proc.join(HUNG_S if kill_after is None else kill_after)
    hung = kill_after is None and proc.exitcode is None
    if proc.exitcode is None:
        _kill(proc.pid)
        proc.join(HUNG_S)
    assert not hung, f"python -m melano.data {' '.join(argv)}: hung, killed after {HUNG_S:.0f} s"
    assert proc.exitcode is not None, f"python -m melano.data {' '.join(argv)}: survived SIGKILL"
    return proc.exitcode, time.monotonic() - t0


def fastest_run(argv_for, runs: int = 3) -> float:
    """Seconds of the fastest of `runs` uninterrupted runs of argv_for(i), each of which must
    succeed. The kill times are drawn over it: the first run is often the slowest (by up to 2x
    here), and timed alone it put some kills after the end of the later, faster runs."""
    times = []
    for i in range(runs):
        code, seconds = run(argv_for(i))
        assert code == 0, argv_for(i)
        times.append(seconds)
    return min(times)


def _synth_args(out: Path, seed: int, n: int = 60, workers: int = 1) -> list[str]:
    return ["synth", "--out", str(out), "--benign", str(n * 3 // 4), "--malignant", str(n // 4),
            "--size", "24", "--seed", str(seed), "--workers", str(workers), "--force"]


def _side_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".melano-" in p.name or ".replaced-" in p.name)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Uninterrupted runs, made once: {(seed, n, workers): (folder, its data files, seconds it
    takes)}. The seconds are the fastest of three runs, the later two replacing the set with itself,
    with the workers of the runs to kill: 2 render 200 images in 2/3 of the time 1 takes."""
    root, made = tmp_path_factory.mktemp("refs"), {}

    def get(seed: int, n: int = 60, workers: int = 1) -> tuple[Path, dict, float]:
        if (seed, n, workers) not in made:
            folder = root / f"seed{seed}-n{n}-w{workers}"
            seconds = fastest_run(lambda i: _synth_args(folder, seed, n, workers))
            made[seed, n, workers] = (folder, data_files(folder), seconds)
        return made[seed, n, workers]
    return get


def synth_kills(refs, tmp_path: Path, n_kills: int, seed: int, n: int = 60, workers: int = 1) -> dict:
    """Kill `synth --force` while it replaces set A (seed 1) with set B (seed 2), n_kills times."""
    (ref_a, a, _), (_, b, seconds) = refs(1, n), refs(2, n, workers)
    assert a and b and a != b
    out = tmp_path / "work" / "set"
    rng = np.random.default_rng(seed)
    seen = {"kills": 0, "old set": 0, "new set": 0}
    for _ in range(n_kills):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(ref_a, out)  # synth's own set A, manifest included
        code, _ = run(_synth_args(out, 2, n, workers), kill_after=float(rng.uniform(0, 0.8 * seconds)))
        seen["kills"] += code == -signal.SIGKILL
        state = data_files(out)
        assert state in (a, b), "a killed synth left a mix of two sets"  # never mislabelled
        seen["old set" if state == a else "new set"] += 1
        assert run(_synth_args(out, 2, n, workers))[0] == 0  # the rerun
        assert data_files(out) == b and _side_folders(out.parent) == []
    return seen


def test_synth_killed_at_random_points_leaves_the_old_or_the_new_set(refs, tmp_path):
    seen = synth_kills(refs, tmp_path, n_kills=3, seed=0)
    print("synth, quick:", seen)
    assert seen["kills"] >= 2, seen


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_synth_killed_at_many_random_points(refs, tmp_path, workers):
    seen = synth_kills(refs, tmp_path, n_kills=20, seed=workers, n=200, workers=workers)
    print(f"synth, {workers} worker(s):", seen)
    assert seen["kills"] >= 10 and seen["old set"] >= 5, seen


@pytest.mark.parametrize("patch", ["die before the second rename", "die before the old set is removed"])
def test_synth_killed_inside_the_swap_is_repaired(refs, tmp_path, patch):
    (ref_a, a, _), (_, b, _) = refs(1), refs(2)
    out = tmp_path / "work" / "set"
    shutil.copytree(ref_a, out)
    assert run(_synth_args(out, 2), patch=patch)[0] == -signal.SIGKILL
    if patch == "die before the second rename":
        assert not out.exists()  # for a moment no set at all, which no reader can mistake for one
        with pytest.raises(FileNotFoundError):
            data.read_index(out)
        with pytest.raises(outdir.OutputError, match="earlier synth run"):  # the next claim repairs ...
            outdir.claim(out, "synth", staged=True, can_resume=False)
        assert data_files(out) == a  # ... by putting the old set back
    else:
        assert data_files(out) == b and len(_side_folders(out.parent)) == 1  # the old set, set aside
    assert run(_synth_args(out, 2))[0] == 0
    assert data_files(out) == b and _side_folders(out.parent) == []


# ---------------------------------------------------------------------------------------------
# The cache build

def cache_kills(tmp_path: Path, n_kills: int, seed: int, n: int = 150, workers: int = 1) -> dict:
    src = tmp_path / "src"
    synth.generate(synth.SynthConfig(out=str(src), benign=n * 4 // 5, malignant=n // 5, size=32, seed=3))
    ref_dir, work = tmp_path / "ref0", tmp_path / "cache"
    argv = lambda d: ["cache", str(src), "--size", "32", "--cache-dir", str(d), "--workers", str(workers)]
    seconds = fastest_run(lambda i: argv(tmp_path / f"ref{i}"))  # a folder each: a cache found is reused
    (ref,) = [p for p in ref_dir.iterdir()]
    want = {f: (ref / f).read_bytes() for f in ("images.u8", "meta.json")}
    rng = np.random.default_rng(seed)
    seen = {"kills": 0, "finished before the kill": 0, "leftovers cleaned": 0}
    for _ in range(n_kills):
        shutil.rmtree(work, ignore_errors=True)
        code, _ = run(argv(work), kill_after=float(rng.uniform(0, 0.8 * seconds)))
        seen["kills"] += code == -signal.SIGKILL
        for p in work.iterdir() if work.exists() else []:  # whatever a reader would accept ...
            if not p.name.startswith("."):
                assert p.name == ref.name and {f: (p / f).read_bytes() for f in want} == want  # ... is whole
                seen["finished before the kill"] += 1
        leftovers = [p for p in work.iterdir() if p.name.startswith(".")] if work.exists() else []
        assert run(argv(work))[0] == 0  # the rerun
        assert sorted(p.name for p in work.iterdir()) == [ref.name]  # the killed build's temp folder is gone
        assert {f: (work / ref.name / f).read_bytes() for f in want} == want
        seen["leftovers cleaned"] += len(leftovers)
    return seen


def test_cache_build_killed_at_random_points(tmp_path):
    seen = cache_kills(tmp_path, n_kills=3, seed=0)
    print("cache, quick:", seen)
    assert seen["kills"] >= 2, seen


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_cache_build_killed_at_many_random_points(tmp_path, workers):
    seen = cache_kills(tmp_path, n_kills=20, seed=10 + workers, n=600, workers=workers)
    print(f"cache, {workers} worker(s):", seen)
    assert seen["kills"] >= 10 and seen["leftovers cleaned"] >= 8, seen
