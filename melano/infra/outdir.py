"""Output folders: the one rule for every command that writes.

    with outdir.claim(cfg.out, "cyclegan-train", force=cfg.force, resume=cfg.resume) as out:
        out.write("last.pt", lambda f: torch.save(state, f))      # atomic, recorded in the manifest

- A command writes only into an absent or empty folder, or over its own earlier outputs with
  ``force`` or ``resume``; a data set, files melano did not write, or another command's outputs
  need ``force``; a folder that is, holds or lies inside one of its ``data`` folders, never.
  A refusal changes nothing on disk.
- One process per folder: ``.melano.lock`` is flocked while the command runs (the kernel drops
  it when the process dies; forked workers drop their copies). Under torchrun only rank 0 claims.
- It deletes only what its manifest says it wrote, appended *before* each write, so a kill never
  leaves an unlisted file; sub-folders of the commands it runs count too (`Claim.record_child`).
- ``staged=True`` (synth) writes a side folder and swaps it in with two renames: a kill leaves the
  old folder or the new one. The old one goes if this command wrote all of it, else it is kept.
- A single file (``predict --out x.csv``): `check_file` before the work, `write_file` after it;
  ``.melano.outputs`` beside it keeps the SHA-256 of what each command wrote there.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import uuid
import weakref
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .files import _TEMP, atomic_write, json_text, pid_alive, remove_dead_temp_files, temp_name, temps_beside

log = logging.getLogger("melano.outdir")

FORMAT = "melano-out/1"
# the owner {format, command, pid, host, created, started}; the manifest; the lock, naming its holder
OWNER, MANIFEST, LOCK = ".melano.json", ".melano.files", ".melano.lock"
OUTPUTS = ".melano.outputs"  # beside single-file outputs: which files melano wrote there
MELANO_FILES = (OWNER, MANIFEST, LOCK, OUTPUTS)


class OutputError(ValueError):
    """An output this command must not write (the message says why and what to do)."""


def claim(out: str | os.PathLike, command: str, *, force: bool = False, resume: bool = False,
          can_resume: bool = True, staged: bool = False, data: Sequence[str | os.PathLike] = (),
          rank: int = 0, option: str = "--out", can_force: bool = True) -> Claim:
    """Check, lock and own folder `out` for `command`, or raise OutputError (PermissionError if it
    cannot be written) naming `option` and the fix, which names --resume / --force only if
    `can_resume` / `can_force`. `rank` > 0 (torchrun): no checks, no lock, no writes."""
    if rank != 0:
        return Claim(Path(out), Path(out), command, [], _read_manifest(Path(out)), staged=False, writable=False)
    if staged and resume:
        raise ValueError("a staged output folder always starts empty: it cannot be resumed")
    out = Path(os.path.abspath(out))
    if staged and _within(Path(os.getcwd()), out):
        raise OutputError(f"{option} {out} is the working directory (or holds it), and it would be replaced as "
                          f"a whole; choose a new folder for {option}, e.g. {option} data/synthetic")
    args = (out, command, force, resume, can_resume, data, option, can_force)
    _repair(out, command)
    _refuse(*args)
    created, fds, folder = not out.exists(), [], out
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _try_lock(out / LOCK, create=True)
        if fd is None:  # another process took it between the check and now: leave its folder alone
            created = False
            raise _in_use(out)
        fds.append(fd)
        _refuse(*args, check_lock=False)  # again, now that the folder is ours
        _write_holder(fd, command)
        if staged:  # everything goes into a side folder, swapped in by `Claim.close`
            folder = temp_name(out, "melano-new")
            folder.mkdir()
            fds.append(_try_lock(folder / LOCK, create=True))
            _write_holder(fds[-1], command)
        written = _take_ownership(folder, command)
    except BaseException as e:
        for fd in fds:
            os.close(fd)
        if folder != out:
            shutil.rmtree(folder, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, PermissionError):
            raise PermissionError(f"{option} {out}: cannot write there ({e.strerror}: {e.filename}); "
                                  f"choose a writable {option}") from e
        raise
    return Claim(out, folder, command, fds, written, staged)


def check(out: str | os.PathLike, command: str, *, force: bool = False, resume: bool = False,
          can_resume: bool = True, data: Sequence[str | os.PathLike] = (), option: str = "--out",
          can_force: bool = True) -> None:
    """Raise what `claim` would raise, without claiming (before long work that ends in a claim)."""
    out = Path(os.path.abspath(out))
    _refuse(out, command, force, resume, can_resume, data, option, can_force)
    probe_writable(out, option)


def _refuse(out: Path, command: str, force: bool, resume: bool, can_resume: bool,
            data: Sequence[str | os.PathLike], option: str, can_force: bool = True, check_lock: bool = True) -> None:
    """OutputError if `command` must not write into `out`. Reads only; changes nothing."""
    _data_clash(out, data, option)
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError(f"{option} {out} is a file, not a folder; choose a folder for {option}")
    if not out.is_dir():
        return
    if check_lock:
        fd = _try_lock(out / LOCK, create=False)
        if fd is not None:
            os.close(fd)  # a lock file nobody holds: left by a finished or killed run
        elif (out / LOCK).exists():
            raise _in_use(out)
    for side, pid in temps_beside(out, "melano-new") + temps_beside(out, "melano-old"):
        if pid_alive(pid) and pid != os.getpid():
            raise _in_use(out, f"pid={pid}, writing {side.name}")
    # what the folder holds
    owner = _read_json(out / OWNER)
    entries = sorted(e.name for e in os.scandir(out) if e.name not in MELANO_FILES)
    marks = [n for n in ("train.csv", "jpeg", "train", "benign", "malignant") if n in entries]
    looks_like_data = {"train.csv", "jpeg"} & set(marks) or {"benign", "malignant"} <= set(marks)
    data_set = " + ".join(marks) if looks_like_data else None
    or_force = ", or pass --force to write there anyway" if can_force else ""
    if owner is not None and owner.get("command") == command:
        if force or resume:
            return
        how = f"pass --force to write over it{', or --resume to continue it' if can_resume else ''}"
        raise OutputError(f"{option} {out} holds the outputs of an earlier {command} run (started "
                          f"{owner.get('started', '?')}); {how}, or choose another {option}")
    if force or (owner is None and not entries):
        return
    if owner is not None:
        what = f"a data set ({data_set}) written by {owner.get('command')}" if data_set else \
            f"the outputs of another command ({owner.get('command')})"
        raise OutputError(f"{option} {out} holds {what}; choose another {option}{or_force}")
    if data_set:
        raise OutputError(f"{option} {out} holds a data set ({data_set}) that melano did not write there; "
                          f"writing into it could overwrite its labels. Choose an empty or new {option}{or_force}")
    more = f" and {len(entries) - 3} more" if len(entries) > 3 else ""
    raise OutputError(f"{option} {out} holds files melano did not write ({', '.join(entries[:3])}{more}); "
                      f"choose an empty or new {option}{or_force}")


def _data_clash(out: Path, data: Sequence[str | os.PathLike], option: str) -> None:
    """OutputError if `out` is, lies inside, or holds a data folder: it could overwrite or delete the input."""
    real = out.resolve()
    for d in data:
        if d is None:
            continue
        dr = Path(d).resolve()
        if _within(real, dr):
            raise OutputError(f"{option} {out} is inside the data folder {d}; melano never writes into "
                              f"its input data: choose an {option} outside it")
        if _within(dr, real):
            raise OutputError(f"the data folder {d} is inside {option} {out}, where this command's outputs "
                              f"could overwrite or clear it: move the data out of {out}, or choose another {option}")


def _take_ownership(out: Path, command: str) -> list[str]:
    """Write the owner file; return the manifest to continue (this command's) or a fresh one."""
    remove_dead_temp_files(out)
    owner = _read_json(out / OWNER)
    same = owner is not None and owner.get("command") == command
    written = _read_manifest(out) if same else []
    # rewrite the manifest without a line a kill may have torn, or empty it for a new owner
    atomic_write(out / MANIFEST, "".join(p + "\n" for p in written), fsync=False)
    created = owner.get("created", _now()) if same else _now()
    atomic_write(out / OWNER, json_text({"format": FORMAT, "command": command, "pid": os.getpid(),
                                         "host": socket.gethostname(), "created": created, "started": _now()}))
    return written


class Claim:
    """A locked folder this process owns, with a manifest of what it wrote. ``folder`` is where to
    write: ``out``, or a staged claim's side folder until the swap."""

    def __init__(self, out: Path, folder: Path, command: str, lock_fds: list[int], written: list[str],
                 staged: bool, writable: bool = True):
        self.out, self.folder = Path(os.path.abspath(out)), Path(os.path.abspath(folder))
        self.command = command
        self.staged, self.writable = staged, writable
        self._lock_fds = lock_fds
        self._written = dict.fromkeys(written)  # an ordered set
        self._record_lock = threading.Lock()  # the pipeline's stages record from several threads
        self.closed = False
        _HELD.add(self)

    def path(self, rel: str | os.PathLike) -> Path:
        """Where `rel` goes: relative to the folder, or a path under ``out`` (``Path(cfg.out) / "x.pt"``)."""
        p, a = Path(rel), Path(os.path.abspath(rel))
        for base in (self.out, self.folder):
            if a != base and _within(a, base):
                p = a.relative_to(base)
                break
        else:
            if p.is_absolute():
                raise ValueError(f"{rel} is not inside the output folder {self.out}")
        if not p.parts or ".." in p.parts or "\n" in str(p) or p.name in MELANO_FILES:
            raise ValueError(f"{rel!r}: not a file name inside the output folder {self.out}")
        return self.folder / p

    def record_child(self, rel: str | os.PathLike) -> Path:
        """Record, before it starts, that a melano command run by this one writes the sub-folder
        `rel`: what its own manifest lists counts as written here. Returns the folder."""
        return self.record(rel, suffix="/")

    def record(self, rel: str | os.PathLike, suffix: str = "") -> Path:
        """Add `rel` to the manifest (call it *before* writing the file by other means); its path."""
        if self.closed:
            raise RuntimeError(f"the claim on {self.out} is closed")
        if not self.writable:
            raise RuntimeError(f"{self.out}: only rank 0 writes into the output folder")
        key = self.path(rel).relative_to(self.folder).as_posix() + suffix
        with self._record_lock:
            if key not in self._written:
                with open(self.folder / MANIFEST, "a", encoding="utf-8") as f:
                    f.write(key + "\n")
                self._written[key] = None
        return self.folder / key.rstrip("/")

    def write(self, rel: str | os.PathLike, content: bytes | str | Callable, fsync: bool = True) -> Path:
        """Record `rel` and write `content` atomically (without fsync in a staged folder: a kill discards it whole)."""
        return atomic_write(self.record(rel), content, fsync=fsync and not self.staged)

    write_bytes = write_text = write  # pathlib's names

    def write_json(self, rel: str | os.PathLike, obj) -> Path:
        return self.write(rel, json_text(obj))

    @property
    def written(self) -> list[str]:  # relative paths this command wrote (or was about to), in order
        return list(self._written)

    def close(self, ok: bool = True) -> None:
        """Release the folder. A staged claim is swapped into place if `ok`, else discarded."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.staged and ok:
                old = None
                if os.path.lexists(self.out):
                    old = temp_name(self.out, "melano-old")
                    os.rename(self.out, old)
                os.rename(self.folder, self.out)  # a kill between the renames is undone by `_repair`
                self.folder = self.out
                if old is not None:
                    _dispose(old, self.out, self.command)
            elif self.staged:
                shutil.rmtree(self.folder, ignore_errors=True)
        finally:
            for fd in self._lock_fds:
                os.close(fd)  # closing the last fd on the file releases the flock
            self._lock_fds = []

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


# Claims this process holds. A forked child (a Pool or DataLoader worker) inherits the lock fds,
# and a flock lasts while any fd on it is open: a worker orphaned by a killed parent would keep
# the folder locked. So every forked child drops its copies at once, and may not write.
_HELD: "weakref.WeakSet[Claim]" = weakref.WeakSet()


def _drop_locks_in_child() -> None:
    for c in list(_HELD):
        for fd in c._lock_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        c._lock_fds, c.writable = [], False


os.register_at_fork(after_in_child=_drop_locks_in_child)


# The lock
def _try_lock(path: Path, create: bool) -> int | None:
    """An fd holding a flock on `path`; None if another process holds it (or, without `create`, no such file)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o666)
    except FileNotFoundError:
        if create:
            raise
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _write_holder(fd: int, command: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} command={command} since={_now()}\n".encode(), 0)


def _in_use(folder: Path, who: str | None = None) -> OutputError:
    """The refusal for a folder another process holds; `who` defaults to its lock file's text."""
    try:
        who = who or (folder / LOCK).read_text(encoding="utf-8", errors="replace").strip() or "pid=unknown"
    except OSError:
        who = "pid=unknown"
    pid = re.search(r"pid=(\S+)", who)
    return OutputError(f"{folder} is in use by another melano process (PID {pid.group(1) if pid else '?'}; "
                       f"{who}); wait for it to finish, stop it, or choose another --out")


# Staged folders: the side folders beside the target (files.temp_name) and the repair of a killed swap
def _dispose(old: Path, out: Path, command: str) -> None:
    """After a swap: delete the replaced folder if `command` wrote all of it, else keep it beside."""
    foreign = foreign_files(old, manifest(old, command))
    if not foreign:
        shutil.rmtree(old)
        return
    keep = out.with_name(f"{out.name}.replaced-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    if keep.exists():
        keep = out.with_name(f"{keep.name}-{uuid.uuid4().hex[:6]}")
    os.rename(old, keep)
    log.warning("%s held %d file(s) that %s did not write (e.g. %s); the previous folder was kept as %s: "
                "delete it when you no longer need it", out, len(foreign), command, foreign[0], keep)


def _repair(out: Path, command: str) -> None:
    """Undo what killed staged runs left beside `out` (only their dead writers' folders, this host)."""
    for old, pid in temps_beside(out, "melano-old"):
        if pid_alive(pid):
            continue
        if not os.path.lexists(out):  # killed between the two renames: put the old folder back
            os.rename(old, out)
            log.warning("%s: put back the folder a killed run had moved aside", out)
        else:
            _dispose(old, out, command)
    for new, pid in temps_beside(out, "melano-new"):
        if not pid_alive(pid):
            shutil.rmtree(new, ignore_errors=True)  # a half-written set, every file ours


# What melano wrote below a folder: the one test before anything is cleared
def foreign_files(folder: Path, written: Iterable[str] = (), under: str = ".") -> list[str]:
    """Files and links under `folder`/`under` (relative to `folder`) that are neither in `written`
    nor, for each "<sub>/" in it, in <sub>'s own manifest or side folders, nor melano's hidden or
    temp files. (A data set made with `melano.data synth` is the user's.)"""
    written = list(written)
    mine = {w for w in written if not w.endswith("/")}
    children = [Path(w.rstrip("/")) for w in written if w.endswith("/")]
    for c in children:
        mine.update(f"{c.as_posix()}/{p}" for p in _read_manifest(folder / c))
    side = [re.compile(rf"^{re.escape((c.parent / f'.{c.name}.melano-').as_posix())}(new|old)-[^/]+-\d+-[0-9a-f]{{8}}/")
            for c in children]
    foreign = []
    for dirpath, dirnames, filenames in os.walk(folder / under):
        rel_dir = os.path.relpath(dirpath, folder)
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]  # walk does not enter them
        for f in filenames + links:
            rel = f if rel_dir == "." else f"{rel_dir}/{f}"
            if rel in mine or f in MELANO_FILES or _TEMP.match(f) or any(p.match(rel) for p in side):
                continue
            foreign.append(rel)
    return sorted(foreign)


def check_clearable(folder: Path, written: Iterable[str], under: str, what: str) -> None:
    """OutputError if `folder`/`under` is a link, a file, or holds `foreign_files` (named by their
    top-level entry: "notes.txt, my_set/ (8 files)")."""
    target = folder / under
    if not os.path.lexists(target):
        return
    if os.path.islink(target) or not target.is_dir():
        raise OutputError(f"{target} ({what}) is a link or a file that melano did not write; move it elsewhere and rerun")
    foreign = foreign_files(folder, written, under)
    if not foreign:
        return
    parts = [Path(os.path.relpath(rel, under)).parts for rel in foreign]
    groups = collections.Counter(p[0] + ("/" if len(p) > 1 else "") for p in parts)
    named = [k + (f" ({n} files)" if n > 1 else "") for k, n in sorted(groups.items())]
    more = f" and {len(named) - 4} more" if len(named) > 4 else ""
    raise OutputError(f"{target} ({what}) holds {len(foreign)} file(s) melano did not write there "
                      f"({', '.join(named[:4])}{more}); melano never deletes them: move them elsewhere and rerun")


def clear(folder: Path, written: Iterable[str], under: str, what: str) -> None:
    """Delete `folder`/`under` if melano wrote every file in it; else OutputError, deleting nothing."""
    check_clearable(folder, list(written), under, what)
    if os.path.lexists(folder / under):
        shutil.rmtree(folder / under)


# Single-file outputs (predict --out x.csv): the same rule for one file
def check_file(path: str | os.PathLike, command: str, *, force: bool = False, inputs: Iterable = (),
               data: Sequence = (), option: str = "--out") -> Path:
    """The absolute path for `command`'s one output file, or OutputError naming `option` and the
    fix (without `force`, also for a file `command` did not write there). Reads only."""
    if not str(path).strip():
        raise OutputError(f"{option} is empty; give a file name, e.g. {option} predictions.csv")
    p = Path(os.path.abspath(path))
    if p.is_dir() or str(path).endswith(("/", os.sep)):
        raise OutputError(f"{option} {path} is a folder; give a file name inside it, e.g. {option} "
                          f"{p / 'predictions.csv'}")
    for i in inputs:
        try:
            same = os.path.samefile(p, i)
        except OSError:
            same = p.resolve() == Path(os.path.abspath(i)).resolve()
        if same:
            raise OutputError(f"{option} {path} is also an input of this command ({i}); writing it would destroy "
                              f"what is being read: choose another {option}")
    _data_clash(p, data, option)
    for a in p.parents:
        if os.path.lexists(a) and not a.is_dir():
            raise OutputError(f"{option} {path}: {a} is a file, not a folder; choose another {option}")
    if os.path.lexists(p) and not force and _own_hash(p, command) is None:
        raise OutputError(f"{option} {path} exists and melano's {command} did not write it; choose a new file "
                          f"name, or pass --force to replace it")
    probe_writable(p.parent, option)
    return p


def probe_writable(folder: Path, option: str) -> None:
    """PermissionError naming `option` if no file can be created in `folder` (or the nearest one above that exists)."""
    while not folder.is_dir():
        folder = folder.parent
    probe = temp_name(folder / "melano-write-test")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except OSError as e:
        raise PermissionError(f"{option} {folder}: cannot write there ({e.strerror}); choose a writable {option}") from None
    os.unlink(probe)


def write_file(path: str | os.PathLike, content: bytes | str, command: str, *, force: bool = False,
               inputs: Iterable = (), data: Sequence = (), option: str = "--out") -> Path:
    """Write `command`'s one output file atomically after `check_file` (again under the lock: it
    may have appeared during the work), and record its SHA-256 in .melano.outputs."""
    inputs, body = list(inputs), content.encode("utf-8") if isinstance(content, str) else content
    p = check_file(path, command, force=force, inputs=inputs, data=data, option=option)
    p.parent.mkdir(parents=True, exist_ok=True)
    for target in (p, p.parent / OUTPUTS):  # the temp files of earlier writes that were killed
        for tmp, pid in temps_beside(target):
            if not pid_alive(pid):
                os.unlink(tmp)
    lock = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # writers to this folder update .melano.outputs in turn
        check_file(path, command, force=force, inputs=inputs, data=data, option=option)
        files = _outputs(p.parent)
        old = _own_hash(p, command)  # the file in place, if ours, stays ours: a kill may fall before the rename
        digests = [hashlib.sha256(body).hexdigest()] + ([old] if old else [])
        files[p.name] = {"command": command, "sha256": digests}
        atomic_write(p.parent / OUTPUTS, json.dumps({"format": "melano-outputs/1", "files": files}, indent=1))
        atomic_write(p, body)
    finally:
        os.close(lock)  # releases the flock
    return p


def _outputs(folder: Path) -> dict[str, dict]:  # .melano.outputs: {file name: {"command": ..., "sha256": [...]}}
    files = (_read_json(folder / OUTPUTS) or {}).get("files")
    return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


def _own_hash(path: Path, command: str) -> str | None:
    """The SHA-256 of `path` if `command` wrote it and nobody changed it since (per .melano.outputs)."""
    entry = _outputs(path.parent).get(path.name, {})
    if entry.get("command") != command or not path.is_file():
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest if digest in entry.get("sha256", []) else None


# Small readers
def manifest(folder: str | os.PathLike, command: str) -> list[str]:
    """What `command` recorded in `folder`'s manifest; [] if another command (or none) owns it."""
    folder = Path(folder)
    owner = _read_json(folder / OWNER) if folder.is_dir() else None
    return _read_manifest(folder) if owner is not None and owner.get("command") == command else []


def _read_manifest(folder: Path) -> list[str]:
    """The paths in `folder`'s manifest, in order, without a line torn by a kill."""
    try:
        lines = (folder / MANIFEST).read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        return []
    return [p for p in lines[:-1] if p]  # the last piece is "" or a torn line


def _read_json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents
