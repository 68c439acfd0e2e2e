"""Output folders: refusals that change nothing, the flock run lock (held, stale, torchrun ranks),
the manifest and what may be deleted, the staged swap and its repair, file modes.

Oracles: the file system itself (a snapshot of every path, its bytes and its mode before and
after), real second processes for the lock, and os.stat for modes.
"""

import errno
import json
import multiprocessing as mp
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from melano.infra import files, outdir
from melano.infra.outdir import OutputError

ROOT = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict:
    """Every path under root (root included) with its bytes (files) and mode: the oracle for
    "changes nothing on disk"."""
    if not os.path.lexists(root):
        return {}
    out = {".": ("dir", stat.S_IMODE(root.stat().st_mode))}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        # a lock file's text names its latest holder (pid, time): transient, not content
        content = "lock" if p.name == outdir.LOCK else p.read_bytes() if p.is_file() else "dir"
        out[str(p.relative_to(root))] = (content, stat.S_IMODE(st.st_mode))
    return out


def data_set(root: Path) -> Path:
    (root / "jpeg" / "train").mkdir(parents=True)
    (root / "jpeg" / "train" / "a.jpg").write_bytes(b"\xff\xd8 not really")
    (root / "train.csv").write_text("image_name,target\na,1\n")
    return root


def spawn_holder(folder: Path, command: str = "trainer") -> subprocess.Popen:
    """Another process that claims `folder` and holds it until killed; returns once it holds it."""
    code = textwrap.dedent(f"""
        import sys, time
        from melano.infra import outdir
        c = outdir.claim({str(folder)!r}, {command!r}, force=True)
        c.write_text("x.txt", "held")
        print("held", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


# ---------------------------------------------------------------------------------------------
# Claiming: fresh folders, refusals, force and resume

def test_fresh_folder_is_claimed_and_owned(tmp_path):
    out = tmp_path / "run"
    with outdir.claim(out, "trainer") as c:
        c.write_text("config.json", "{}")
        c.write("sub/last.pt", lambda f: f.write(b"\0" * 10))
        assert c.written == ["config.json", "sub/last.pt"] 
        owner = json.loads((out / outdir.OWNER).read_text())
        assert owner["command"] == "trainer" and owner["pid"] == os.getpid()
        assert f"pid={os.getpid()}" in (out / outdir.LOCK).read_text()
    assert (out / outdir.MANIFEST).read_text() == "config.json\nsub/last.pt\n"
    assert (out / "sub" / "last.pt").read_bytes() == b"\0" * 10
    # no temp files left behind by the atomic writes
    assert sorted(p.name for p in out.rglob("*")) == sorted([outdir.OWNER, outdir.MANIFEST, outdir.LOCK, "config.json", "sub", "last.pt"])
    empty = tmp_path / "empty"
    empty.mkdir()
    outdir.claim(empty, "trainer").close()  # an existing empty folder is fine too


@pytest.mark.parametrize("case", ["data set", "foreign files", "other command", "same command", "a file",
                                  "inside --data"])
def test_refusals_name_the_folder_and_the_fix_and_change_nothing(tmp_path, case):
    out = tmp_path / "out"
    kw = {}
    if case == "data set":
        data_set(out)
        pattern = r"holds a data set \(train.csv \+ jpeg\).*--force"
    elif case == "foreign files":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        pattern = r"holds files melano did not write \(notes.txt\).*--force"
    elif case == "other command":
        with outdir.claim(out, "synth", staged=True, can_resume=False) as c:
            c.write_text("train.csv", "image_name,target\n")
        pattern = r"holds a data set \(train.csv\) written by synth.*--force"
    elif case == "same command":
        with outdir.claim(out, "trainer") as c:
            c.write_text("a.txt", "1")
        pattern = r"earlier trainer run .*--force to write over it, or --resume to continue it"
    elif case == "a file":
        out.write_text("x")
        pattern = r"is a file, not a folder"
        kw = {"force": True}
    else:
        data_set(tmp_path / "d")
        out = tmp_path / "d" / "runs"
        pattern = r"inside the data folder .*never writes into"
        kw = {"force": True, "data": [tmp_path / "d"]}
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match=pattern) as e:
        outdir.claim(out, "trainer", **kw)
    assert str(out) in str(e.value)
    assert snapshot(tmp_path) == before


def test_force_and_resume(tmp_path):
    out = tmp_path / "out"
    with outdir.claim(out, "trainer") as c:
        c.write_text("a.txt", "1")
    (out / "user.txt").write_text("the user's")
    with outdir.claim(out, "trainer", resume=True) as c:  # resume continues the manifest
        assert c.written == ["a.txt"]
        c.write_text("b.txt", "2")
    assert (out / "user.txt").read_text() == "the user's"
    with outdir.claim(out, "translate", force=True) as c:  # another command's: forced, fresh manifest
        assert c.written == []
        assert (out / "b.txt").exists()
    with pytest.raises(OutputError, match="earlier translate run .*--force to write over it, or choose"):
        outdir.claim(out, "translate", can_resume=False)
    foreign = tmp_path / "foreign"
    data_set(foreign)
    with outdir.claim(foreign, "translate", force=True) as c:
        c.write_text("train.csv", "image_name,target\n")  # --force: the user asked to write over it
    assert (foreign / "jpeg" / "train" / "a.jpg").exists()  # but nothing else is touched


def test_paths_stay_inside_the_folder(tmp_path):
    with outdir.claim(tmp_path / "out", "trainer") as c:
        assert c.path(tmp_path / "out" / "a" / "b.txt") == tmp_path / "out" / "a" / "b.txt"
        for bad in ["../x", tmp_path / "elsewhere.txt", outdir.LOCK, "", "a/../../x"]:
            with pytest.raises(ValueError):
                c.write_text(bad, "x")
    with pytest.raises(RuntimeError, match="closed"):
        c.write_text("late.txt", "x")


def test_atomic_files_get_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        p = outdir.atomic_write(tmp_path / "a.txt", "x")
        os.umask(0o027)
        q = outdir.atomic_write(tmp_path / "b.bin", b"y")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644 and stat.S_IMODE(q.stat().st_mode) == 0o640
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt", "b.bin"]


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path):
    p = outdir.atomic_write(tmp_path / "a.txt", "old")

    def dies(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        outdir.atomic_write(p, dies)
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_unwritable_folder_gives_one_line_naming_the_option(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *a, **k):  # as root, chmod does not stop writes: refuse them here instead
        if str(path).startswith(str(ro)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(PermissionError, match=r"--out .*ro/run: cannot write there \(Permission denied") as e:
        outdir.claim(ro / "run", "trainer")
    assert "\n" not in str(e.value) and list(ro.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The run lock

def test_a_second_process_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = spawn_holder(out)
    try:
        before = snapshot(out)
        for force, resume in ((False, False), (True, False), (False, True)):
            with pytest.raises(OutputError, match=rf"{out} is in use by another melano process \(PID {holder.pid};"):
                outdir.claim(out, "trainer", force=force, resume=resume)
        assert snapshot(out) == before
        # a torchrun rank > 0 does not contend for the lock, and may not write
        follower = outdir.claim(out, "trainer", rank=1)
        assert follower.written == ["x.txt"]
        with pytest.raises(RuntimeError, match="only rank 0 writes"):
            follower.write_text("y.txt", "no")
    finally:
        holder.kill()
        holder.wait()
    # killed with SIGKILL: the kernel released its flock, so the stale lock file is taken over
    assert holder.returncode == -signal.SIGKILL and (out / outdir.LOCK).exists()
    with outdir.claim(out, "trainer", resume=True) as c:
        assert c.written == ["x.txt"]
        assert f"pid={os.getpid()} " in (out / outdir.LOCK).read_text()


def test_the_same_process_cannot_claim_a_folder_twice(tmp_path):
    with outdir.claim(tmp_path / "run", "trainer"):
        with pytest.raises(OutputError, match=f"PID {os.getpid()}"):
            outdir.claim(tmp_path / "run", "trainer", force=True)
    outdir.claim(tmp_path / "run", "trainer", resume=True).close()  # released on close


# ---------------------------------------------------------------------------------------------
# Staged folders

def _staged(out: Path, files: dict, **kw) -> None:
    with outdir.claim(out, "synth", staged=True, can_resume=False, **kw) as c:
        assert c.folder.parent == out.resolve().parent and c.folder.name.startswith(".set.melano-new-")
        for rel, text in files.items():
            c.write_text(rel, text)


def test_staged_claim_swaps_the_new_folder_in(tmp_path):
    out = tmp_path / "set"
    _staged(out, {"train.csv": "v1", "jpeg/train/a.jpg": "A1", "jpeg/train/b.jpg": "B1"})
    assert (out / "train.csv").read_text() == "v1" and (out / outdir.MANIFEST).read_text().count("\n") == 3
    _staged(out, {"train.csv": "v2", "jpeg/train/a.jpg": "A2"}, force=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name not in outdir.MELANO_FILES) == \
        ["jpeg", "jpeg/train", "jpeg/train/a.jpg", "train.csv"]  # b.jpg went with the old set
    assert (out / "train.csv").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # nothing beside it: all of it was ours

    # an exception (or a kill) while writing leaves the old folder exactly as it was
    before = snapshot(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with outdir.claim(out, "synth", staged=True, force=True) as c:
            c.write_text("train.csv", "v3")
            raise KeyboardInterrupt
    assert snapshot(tmp_path) == before


def test_staged_claim_over_foreign_files_keeps_them_aside(tmp_path, caplog):
    out = data_set(tmp_path / "set")
    with pytest.raises(OutputError, match="holds a data set"):
        _staged(out, {"train.csv": "new"})
    _staged(out, {"train.csv": "new"}, force=True)
    assert (out / "train.csv").read_text() == "new" and not (out / "jpeg").exists()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("set.replaced-")]
    assert len(kept) == 1 and (kept[0] / "train.csv").read_text() == "image_name,target\na,1\n"
    assert (kept[0] / "jpeg" / "train" / "a.jpg").exists() and "was kept as" in caplog.text


def test_a_staged_claim_never_replaces_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "set" / "sub").mkdir(parents=True)
    for where in (tmp_path / "set", tmp_path / "set" / "sub"):
        monkeypatch.chdir(where)
        with pytest.raises(OutputError, match="is the working directory .*, and it would be replaced"):
            outdir.claim(tmp_path / "set", "synth", staged=True, force=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["set", "sub"]


def test_a_swap_killed_between_its_renames_is_put_back(tmp_path):
    out = tmp_path / "set"
    _staged(out, {"train.csv": "old"})
    before = snapshot(out)
    # what a kill between the two renames leaves: the old folder moved aside, the new one beside it
    dead = 999_999_999  # above any pid_max: never a live process
    host = files.host_tag()
    moved = tmp_path / f".set.melano-old-{host}-{dead}-0123abcd"
    os.rename(out, moved)
    new = tmp_path / f".set.melano-new-{host}-{dead}-4567cdef"
    new.mkdir()
    (new / "train.csv").write_text("half")
    other_host = tmp_path / ".set.melano-new-otherhost-12-89abcdef"  # its pids mean nothing here
    other_host.mkdir()
    with pytest.raises(OutputError, match="earlier synth run"):  # repaired first, then refused
        outdir.claim(out, "synth", staged=True, can_resume=False)
    assert snapshot(out) == before and not moved.exists() and not new.exists() and other_host.exists()


def _sleep_in_child(claim_obj, conn) -> None:
    conn.send((claim_obj._lock_fds, claim_obj.writable))
    time.sleep(60)


def test_forked_workers_do_not_keep_the_folder_locked(tmp_path):
    """A Pool or DataLoader worker inherits the lock's fd on fork; orphaned by a killed parent, it
    would keep the folder locked. Forked children drop their copies, and may not write."""
    c = outdir.claim(tmp_path / "run", "trainer")
    parent_end, child_end = mp.Pipe()
    worker = mp.get_context("fork").Process(target=_sleep_in_child, args=(c, child_end))
    worker.start()
    try:
        assert parent_end.recv() == ([], False)
        c.close()  # the parent is done (or killed) while its worker lives on
        outdir.claim(tmp_path / "run", "trainer", resume=True).close()  # not locked by the worker
    finally:
        worker.kill()
        worker.join()
