"""Output folders: the one rule for every command that writes.

    with outdir.claim(cfg.out, "cyclegan-train", force=cfg.force, resume=cfg.resume) as out:
        out.write_text("config.json", text)                       # atomic, recorded
        out.write("last.pt", lambda f: torch.save(state, f))      # atomic, recorded

The rule:
  - A command writes only into its own folder. It refuses a folder that holds a data set, files
    melano did not write, or another command's outputs (a sub-folder another melano command wrote
    included), unless ``force``; its own earlier outputs need ``force`` (write over them) or
    ``resume`` (continue them). An empty or absent folder is fine. A folder that is, or lies
    inside, one of the command's ``data`` folders, or that holds one, is refused even with
    ``force``: nothing is ever written into ``--data``, nor where clearing outputs could reach it.
  - A refused claim changes nothing on disk. (One repair comes first: the leftovers of a swap
    that was killed half-way are put back, see ``staged``.)
  - One process per folder: ``.melano.lock`` is held with ``flock`` for the command's lifetime.
    A second process fails at once, naming the folder and the holder's PID. The kernel drops a
    flock when its process dies, so the lock file of a killed run is simply taken over. Forked
    children (Pool and DataLoader workers) drop their copies of the lock at once, so an orphaned
    worker never keeps a folder locked; they may not write. Under torchrun only rank 0 claims;
    the other ranks get a read-only `Claim` and never contend.
  - It deletes only files its manifest says this command wrote. A command that runs others in
    sub-folders (the pipeline) records each with `Claim.record_child`; then
    `foreign_files` lists what no manifest accounts for, and `clear` deletes a sub-folder only
    when that list is empty.
  - A single-file output (``predict --out x.csv``) has the same rule, per file: `check_file`
    before the work, `write_file` after it (atomic; ``.melano.outputs`` beside it records what
    the command wrote, by SHA-256, so that only its own unedited output is replaced without force).
  - ``staged=True`` (synth): the command writes a fresh folder beside the target, and leaving
    the ``with`` block swaps it into place with two renames. A killed run leaves the old folder
    or the new one, never a mix; if the kill falls between the two renames, the next claim puts
    the old folder back. The old folder is deleted if this command wrote every file in it, and
    otherwise kept beside the new one as ``<name>.replaced-<time>``.

Files in a claimed folder (all hidden, none of them counts as content):
  .melano.json   the owner: {"format", "command", "pid", "host", "created", "started"}
  .melano.files  the manifest: one relative path per line, appended *before* each file is
                 written, so a kill can leave a listed file missing but never an unlisted one
  .melano.lock   the flock target; holds "pid=<pid> host=<host> command=<command> since=<time>"
Beside a staged folder, only while it is being written: ``.<name>.melano-new-<host>-<pid>-<hex>``
and, for a moment during the swap, ``.<name>.melano-old-<host>-<pid>-<hex>``.

Standard library only (no torch), so that it is cheap to import anywhere.
"""

from __future__ import annotations

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
from typing import Callable, Iterable, Iterator, Sequence

from .files import _TEMP, _put, atomic_write, host_tag, json_text, pid_alive, remove_dead_temp_files

log = logging.getLogger("melano.outdir")

FORMAT = "melano-out/1"
OWNER, MANIFEST, LOCK = ".melano.json", ".melano.files", ".melano.lock"
OUTPUTS = ".melano.outputs"  # beside single-file outputs (see `write_file`): which files melano wrote there
MELANO_FILES = (OWNER, MANIFEST, LOCK, OUTPUTS)


class OutputError(ValueError):
    """An output folder that this command must not write into (the message says why and what to do)."""


# ----------------------------------------------------------------------------------------------
# Small helpers


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _read_json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _read_manifest(folder: Path) -> list[str]:
    """The paths in `folder`'s manifest, in order, without a line torn by a kill."""
    try:
        text = (folder / MANIFEST).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    return [p for p in lines[:-1] if p]  # the last piece is "" or a torn line


def manifest(folder: str | os.PathLike, command: str) -> list[str]:
    """What `command` recorded in `folder`'s manifest; [] if another command (or none) owns it."""
    folder = Path(folder)
    owner = _read_json(folder / OWNER) if folder.is_dir() else None
    return _read_manifest(folder) if owner is not None and owner.get("command") == command else []


def _content(folder: Path) -> list[str]:
    """Top-level entries of `folder` other than melano's own files (sorted). A sub-folder another
    melano command wrote counts too: it is not this command's to write into or clear."""
    return sorted(e.name for e in os.scandir(folder) if e.name not in MELANO_FILES)


def _describe_data_set(entries: Sequence[str]) -> str | None:
    """A short description if `folder` looks like a data set melano could read, else None."""
    marks = [n for n in ("train.csv", "jpeg", "train", "benign", "malignant") if n in entries]
    if "train.csv" in marks or {"benign", "malignant"} <= set(marks) or "jpeg" in marks:
        return " + ".join(marks)
    return None


def _within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


# ----------------------------------------------------------------------------------------------
# The lock

def _try_lock(path: Path, create: bool) -> int | None:
    """An fd holding an exclusive flock on `path`; None if another process holds it (or, without
    `create`, if the file does not exist)."""
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


def _holder(folder: Path) -> str:
    try:
        text = (folder / LOCK).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text or "pid=unknown"


def _in_use_error(folder: Path, who: str) -> OutputError:
    pid = re.search(r"pid=(\S+)", who)
    return OutputError(f"{folder} is in use by another melano process (PID {pid.group(1) if pid else '?'}; "
                       f"{who}); wait for it to finish, stop it, or choose another --out")


# ----------------------------------------------------------------------------------------------
# Staged folders: the temp folder beside the target, the swap, and the repair of a killed swap

def _side_name(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.melano-{kind}-{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _side_folders(out: Path, kind: str) -> list[tuple[Path, int]]:
    """This host's `kind` ("new" or "old") folders beside `out`, with their writer's PID."""
    pat = re.compile(rf"^\.{re.escape(out.name)}\.melano-{kind}-{re.escape(host_tag())}-(\d+)-[0-9a-f]{{8}}$")
    found = []
    if out.parent.is_dir():
        for e in os.scandir(out.parent):
            m = pat.match(e.name)
            if m and e.is_dir(follow_symlinks=False):
                found.append((Path(e.path), int(m.group(1))))
    return sorted(found)


def _foreign_files(folder: Path, command: str) -> list[str]:
    """Files in `folder` (recursively) that `command` did not write there, per its manifest."""
    return foreign_files(folder, manifest(folder, command))


def _dispose(old: Path, out: Path, command: str) -> None:
    """After a swap: delete the replaced folder if `command` wrote all of it, else keep it beside."""
    foreign = _foreign_files(old, command)
    if not foreign:
        shutil.rmtree(old)
        return
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    keep = out.with_name(f"{out.name}.replaced-{stamp}")
    if keep.exists():
        keep = out.with_name(f"{keep.name}-{uuid.uuid4().hex[:6]}")
    os.rename(old, keep)
    log.warning("%s held %d file(s) that %s did not write (e.g. %s); the previous folder was kept as %s: "
                "delete it when you no longer need it", out, len(foreign), command, foreign[0], keep)


def _repair(out: Path, command: str) -> None:
    """Undo what killed staged runs left beside `out` (only their dead writers' folders, this host)."""
    for old, pid in _side_folders(out, "old"):
        if pid_alive(pid):
            continue
        if not os.path.lexists(out):  # killed between the two renames: put the old folder back
            os.rename(old, out)
            log.warning("%s: put back the folder a killed run had moved aside", out)
        else:
            _dispose(old, out, command)
    for new, pid in _side_folders(out, "new"):
        if not pid_alive(pid):
            shutil.rmtree(new, ignore_errors=True)  # a half-written set, every file ours


# ----------------------------------------------------------------------------------------------
# What melano wrote below a folder: the one test before anything is cleared

def foreign_files(folder: Path, written: Iterable[str] = (), under: str = ".") -> list[str]:
    """Files and links under `folder`/`under` (relative to `folder`, sorted) that melano did not
    write there.

    Melano's are: `written` (paths relative to `folder`, as `Claim.written` lists them); for each
    entry "<sub>/" among them (`Claim.record_child`), what the folder <sub>'s own manifest lists,
    and the side folders of its staged writes; melano's hidden files; atomic-write temp files.
    A folder that merely carries an owner file is not enough: a data set a user made with
    `melano.data synth` has one too, and it is the user's."""
    mine, children = set(), []
    for w in written:
        if w.endswith("/"):
            children.append(Path(w.rstrip("/")))
        else:
            mine.add(w)
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
    """OutputError, naming them, if `folder`/`under` holds anything melano did not write (see
    `foreign_files`), or is a link or a file; nothing if it is absent. Reads only."""
    target = folder / under
    if not os.path.lexists(target):
        return
    if os.path.islink(target) or not target.is_dir():
        raise OutputError(f"{target} ({what}) is a link or a file that melano did not write; move it elsewhere and rerun")
    foreign = foreign_files(folder, written, under)
    if foreign:
        raise OutputError(foreign_error(target, [os.path.relpath(f, under) for f in foreign], what))


def clear(folder: Path, written: Iterable[str], under: str, what: str) -> None:
    """Delete `folder`/`under` if melano wrote every file in it (`check_clearable`); otherwise raise
    OutputError naming the others, and delete nothing."""
    written = list(written)
    check_clearable(folder, written, under, what)
    if os.path.lexists(folder / under):
        shutil.rmtree(folder / under)


def foreign_error(folder: Path, foreign: Sequence[str], what: str) -> str:
    """One line naming the files `foreign` (relative to `folder`) by their top-level entry in it:
    "notes.txt, my_set/ (8 files)"."""
    groups: dict[str, int] = {}
    for rel in foreign:
        parts = Path(rel).parts
        key = parts[0] + ("/" if len(parts) > 1 else "")
        groups[key] = groups.get(key, 0) + 1
    named = [k + (f" ({n} files)" if n > 1 else "") for k, n in sorted(groups.items())]
    more = f" and {len(named) - 4} more" if len(named) > 4 else ""
    return (f"{folder} ({what}) holds {len(foreign)} file(s) melano did not write there ({', '.join(named[:4])}"
            f"{more}); melano never deletes them: move them elsewhere and rerun")


# ----------------------------------------------------------------------------------------------
# Single-file outputs (predict --out x.csv): the same rule for one file

def check_file(path: str | os.PathLike, command: str, *, force: bool = False, inputs: Iterable = (),
               data: Sequence = (), option: str = "--out") -> Path:
    """The absolute path for `command`'s one output file, or OutputError naming `option` and the fix.

    Refused: an empty name; a folder; one of the command's own `inputs` (always); a path inside a
    `data` folder (always); an existing file that `command` did not write there (unless `force`).
    Reads only; changes nothing."""
    if not str(path).strip():
        raise OutputError(f"{option} is empty; give a file name, e.g. {option} predictions.csv")
    p = Path(os.path.abspath(path))
    if p.is_dir() or str(path).endswith(("/", os.sep)):
        raise OutputError(f"{option} {path} is a folder; give a file name inside it, e.g. {option} "
                          f"{p / 'predictions.csv'}")
    for i in inputs:
        if _same_file(p, Path(i)):
            raise OutputError(f"{option} {path} is also an input of this command ({i}); writing it would destroy "
                              f"what is being read: choose another {option}")
    clash = _data_clash(p, data, option)
    if clash is not None:
        raise clash
    for a in p.parents:
        if os.path.lexists(a) and not a.is_dir():
            raise OutputError(f"{option} {path}: {a} is a file, not a folder; choose another {option}")
    if os.path.lexists(p) and not force and not _wrote(p, command):
        raise OutputError(f"{option} {path} exists and melano's {command} did not write it; choose a new file "
                          f"name, or pass --force to replace it")
    probe_writable(p.parent, option)
    return p


def probe_writable(folder: Path, option: str) -> None:
    """PermissionError naming `option` if a file cannot be created in `folder`, or in the nearest
    folder above it that exists (where it would be created): before the work, not after."""
    while not folder.is_dir():
        folder = folder.parent
    probe = folder / f".melano-write-test-{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except OSError as e:
        raise PermissionError(f"{option} {folder}: cannot write there ({e.strerror}); choose a writable {option}") from None
    os.unlink(probe)


def write_file(path: str | os.PathLike, content: bytes | str | Callable, command: str, *, force: bool = False,
               inputs: Iterable = (), data: Sequence = (), option: str = "--out") -> Path:
    """Write `command`'s one output file atomically, after `check_file` (again: the file may have
    appeared since the command checked it before its work). The hidden file .melano.outputs beside
    it records the content's SHA-256, so that a later run of `command` may replace the file, and
    nothing else may: a user's file, or this one once a user has edited it, needs --force."""
    inputs = list(inputs)
    p = check_file(path, command, force=force, inputs=inputs, data=data, option=option)
    p.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps_of(p)
    _remove_dead_temps_of(p.parent / OUTPUTS)
    tmp = p.with_name(f".{p.name}.tmp-{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "xb") as f:  # a complete, synced file under a temp name
            _put(f, content)
            f.flush()
            os.fsync(f.fileno())
        digest = _sha256(tmp)
        with _folder_lock(p.parent):
            check_file(path, command, force=force, inputs=inputs, data=data, option=option)
            record = _read_json(p.parent / OUTPUTS) or {}
            files = record.get("files") if isinstance(record.get("files"), dict) else {}
            old = files.get(p.name) if isinstance(files.get(p.name), dict) else {}
            # keep the hash of the file still in place if it is ours: a kill before the rename leaves it
            current = _sha256(p) if old.get("command") == command and p.is_file() else None
            keep = [current] if current is not None and current in old.get("sha256", []) else []
            files[p.name] = {"command": command, "sha256": [digest] + keep}
            atomic_write(p.parent / OUTPUTS, json.dumps({"format": "melano-outputs/1", "files": files}, indent=1))
            os.replace(tmp, p)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return p


def _remove_dead_temps_of(p: Path) -> None:
    """The temp files of earlier writes of `p` whose process was killed (this host only)."""
    for e in os.scandir(p.parent):
        m = _TEMP.match(e.name)
        if m and e.name.startswith(f".{p.name}.tmp-") and m["host"] == host_tag() and not pid_alive(int(m["pid"])):
            os.unlink(e.path)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == Path(os.path.abspath(b)).resolve()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _wrote(path: Path, command: str) -> bool:
    """Whether `command` wrote `path` and nobody changed it since (per .melano.outputs beside it)."""
    files = (_read_json(path.parent / OUTPUTS) or {}).get("files")
    entry = files.get(path.name) if isinstance(files, dict) else None
    if not isinstance(entry, dict) or entry.get("command") != command or not path.is_file():
        return False
    return _sha256(path) in entry.get("sha256", [])


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself, so that two writers update .melano.outputs in turn."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Claiming a folder

class Claim:
    """A folder this process may write into: locked, owned, with a manifest of what it wrote.

    ``folder`` is where to write (for a staged claim, the temp folder until the swap); ``out`` is
    the target. Use it as a context manager, or call `close`.
    """

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

    # --- writing
    def path(self, rel: str | os.PathLike) -> Path:
        """Where `rel` goes in the folder. `rel` is relative to the folder, or a path (absolute, or
        relative to the working directory) under ``out``, such as ``Path(cfg.out) / "x.pt"``."""
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

    def _rel(self, rel: str | os.PathLike) -> str:
        return self.path(rel).relative_to(self.folder).as_posix()

    def record(self, rel: str | os.PathLike) -> Path:
        """Add `rel` to the manifest (call it *before* writing the file by other means); its path."""
        self._check_writable()
        return self.folder / self._append(self._rel(rel))

    def record_child(self, rel: str | os.PathLike) -> Path:
        """Record that a melano command run by this one (a trainer, synth, translate) writes the
        sub-folder `rel`: the files its own manifest lists count as written here (`foreign_files`).
        Call it before the command starts. Returns the folder's path."""
        self._check_writable()
        return self.folder / self._append(self._rel(rel) + "/").rstrip("/")

    def _append(self, key: str) -> str:
        with self._record_lock:
            if key not in self._written:
                with open(self.folder / MANIFEST, "a", encoding="utf-8") as f:
                    f.write(key + "\n")
                self._written[key] = None
        return key

    def write(self, rel: str | os.PathLike, content: bytes | str | Callable, fsync: bool = True) -> Path:
        """Record `rel` and write `content` (see `atomic_write`). In a staged folder, which no one
        sees until the swap, the file is written directly (a kill discards the whole folder)."""
        path = self.record(rel)
        if not self.staged:
            return atomic_write(path, content, fsync=fsync)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            _put(f, content)
        return path

    def write_bytes(self, rel: str | os.PathLike, data: bytes) -> Path:
        return self.write(rel, data)

    def write_text(self, rel: str | os.PathLike, text: str) -> Path:
        return self.write(rel, text)

    def write_json(self, rel: str | os.PathLike, obj) -> Path:
        return self.write(rel, json_text(obj))

    @property
    def written(self) -> list[str]:
        """Relative paths this command wrote (or was about to write) in the folder, in order."""
        return list(self._written)

    def _check_writable(self) -> None:
        if self.closed:
            raise RuntimeError(f"the claim on {self.out} is closed")
        if not self.writable:
            raise RuntimeError(f"{self.out}: only rank 0 writes into the output folder")

    # --- finishing
    def close(self, ok: bool = True) -> None:
        """Release the folder. A staged claim is swapped into place if `ok`, else discarded."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.staged and ok:
                self._swap()
            elif self.staged:
                shutil.rmtree(self.folder, ignore_errors=True)
        finally:
            for fd in self._lock_fds:
                os.close(fd)  # closing the last fd on the file releases the flock
            self._lock_fds = []

    def _swap(self) -> None:
        old = None
        if os.path.lexists(self.out):
            old = _side_name(self.out, "old")
            os.rename(self.out, old)
        os.rename(self.folder, self.out)  # a kill between the renames is repaired by `_repair`
        self.folder = self.out
        if old is not None:
            _dispose(old, self.out, self.command)

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
            try:
                os.close(fd)
            except OSError:
                pass
        c._lock_fds, c.writable = [], False


os.register_at_fork(after_in_child=_drop_locks_in_child)


def _data_clash(out: Path, data: Sequence[str | os.PathLike], option: str) -> OutputError | None:
    """`out` is, or lies inside, a data folder, or a data folder lies inside `out`: either way a
    command writing `out` could overwrite or delete its own input."""
    real = out.resolve()
    for d in data:
        if d is None:
            continue
        dr = Path(d).resolve()
        if _within(real, dr):
            return OutputError(f"{option} {out} is inside the data folder {d}; melano never writes into "
                               f"its input data: choose an {option} outside it")
        if _within(dr, real):
            return OutputError(f"the data folder {d} is inside {option} {out}, where this command's outputs "
                               f"could overwrite or clear it: move the data out of {out}, or choose another {option}")
    return None


def _refusal(out: Path, command: str, force: bool, resume: bool, can_resume: bool,
             data: Sequence[str | os.PathLike], option: str, check_lock: bool = True,
             can_force: bool = True) -> OutputError | None:
    """Why `command` must not write into `out`, or None. Reads only; changes nothing."""
    clash = _data_clash(out, data, option)
    if clash is not None:
        return clash
    if os.path.lexists(out) and not out.is_dir():
        return OutputError(f"{option} {out} is a file, not a folder; choose a folder for {option}")
    if not out.is_dir():
        return None
    if check_lock:
        fd = _try_lock(out / LOCK, create=False)
        if fd is None and (out / LOCK).exists():
            return _in_use_error(out, _holder(out))
        if fd is not None:
            os.close(fd)  # a lock file nobody holds: left by a finished or killed run
    for side, pid in _side_folders(out, "new") + _side_folders(out, "old"):
        if pid_alive(pid) and pid != os.getpid():
            return _in_use_error(out, f"pid={pid}, writing {side.name}")
    owner = _read_json(out / OWNER)
    entries = _content(out)
    data_set = _describe_data_set(entries)
    or_force = ", or pass --force to write there anyway" if can_force else ""
    if owner is not None and owner.get("command") == command:
        if force or resume:
            return None
        how = f"pass --force to write over it{', or --resume to continue it' if can_resume else ''}"
        return OutputError(f"{option} {out} holds the outputs of an earlier {command} run (started "
                           f"{owner.get('started', '?')}); {how}, or choose another {option}")
    if force or (owner is None and not entries):
        return None
    if owner is not None:
        what = f"a data set ({data_set}) written by {owner.get('command')}" if data_set else \
            f"the outputs of another command ({owner.get('command')})"
        return OutputError(f"{option} {out} holds {what}; choose another {option}{or_force}")
    if data_set:
        return OutputError(f"{option} {out} holds a data set ({data_set}) that melano did not write there; "
                           f"writing into it could overwrite its labels. Choose an empty or new {option}{or_force}")
    more = f" and {len(entries) - 3} more" if len(entries) > 3 else ""
    return OutputError(f"{option} {out} holds files melano did not write ({', '.join(entries[:3])}{more}); "
                       f"choose an empty or new {option}{or_force}")


def check(out: str | os.PathLike, command: str, *, force: bool = False, resume: bool = False,
          can_resume: bool = True, data: Sequence[str | os.PathLike] = (), option: str = "--out",
          can_force: bool = True) -> None:
    """Raise what `claim` would raise for these arguments (OutputError), without claiming: for a
    command that checks its output folder before long work and claims it when it has results."""
    out = Path(os.path.abspath(out))
    why = _refusal(out, command, force, resume, can_resume, data, option, can_force=can_force)
    if why is not None:
        raise why
    probe_writable(out, option)


def claim(out: str | os.PathLike, command: str, *, force: bool = False, resume: bool = False,
          can_resume: bool = True, staged: bool = False, data: Sequence[str | os.PathLike] = (),
          rank: int = 0, option: str = "--out", can_force: bool = True) -> Claim:
    """Claim folder `out` for `command` (e.g. "synth", "cyclegan-train"): check, lock, own.

    Raises `OutputError` (a ValueError) naming the folder and the fix when `out` is a file, lies
    inside one of the `data` folders, is locked by another process, holds a data set or files
    melano did not write, or holds another command's outputs (these last two unless `force`), or
    holds this command's earlier outputs (unless `force` or `resume`); PermissionError naming
    `option` when it cannot be written. `can_resume=False` leaves --resume out of the advice;
    `option` names the CLI flag in messages, and `can_force=False` leaves --force out of the advice
    (for a command without it). A refusal creates and changes nothing. `rank` > 0
    (torchrun): no checks and no lock, and the Claim refuses writes.

    `staged`: write a fresh folder beside `out`, swapped into place by `Claim.close` (see the
    module docstring). Then `resume` is not allowed: the folder always starts empty.
    """
    if rank != 0:
        return Claim(Path(out), Path(out), command, [], _read_manifest(Path(out)), staged=False, writable=False)
    if staged and resume:
        raise ValueError("a staged output folder always starts empty: it cannot be resumed")
    out = Path(os.path.abspath(out))
    if staged and _within(Path(os.getcwd()), out):
        raise OutputError(f"{option} {out} is the working directory (or holds it), and it would be replaced as "
                          f"a whole; choose a new folder for {option}, e.g. {option} data/synthetic")
    args = (out, command, force, resume, can_resume, data, option)
    _repair(out, command)
    why = _refusal(*args, can_force=can_force)
    if why is not None:
        raise why
    created, fds = not out.exists(), []
    folder, written = out, []
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _try_lock(out / LOCK, create=True)
        if fd is None:  # another process took it between the check and now: leave its folder alone
            created = False
            raise _in_use_error(out, _holder(out))
        fds.append(fd)
        why = _refusal(*args, check_lock=False, can_force=can_force)  # again, now that the folder is ours
        if why is not None:
            raise why
        _write_holder(fd, command)
        if staged:
            folder = _side_name(out, "new")
            folder.mkdir()
            fds.append(_try_lock(folder / LOCK, create=True))
            _write_holder(fds[-1], command)
            atomic_write(folder / OWNER, _owner_json(command, _now()), fsync=False)
        else:
            written = _take_ownership(out, command)
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


def _write_holder(fd: int, command: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} command={command} since={_now()}\n".encode(), 0)


def _owner_json(command: str, created: str) -> str:
    return json.dumps({"format": FORMAT, "command": command, "pid": os.getpid(), "host": socket.gethostname(),
                       "created": created, "started": _now()}, indent=2) + "\n"


def _take_ownership(out: Path, command: str) -> list[str]:
    """Write the owner file; return the manifest to continue (this command's earlier files) or a
    fresh, empty one (the folder was someone else's or nobody's). Temp files of killed writes go."""
    remove_dead_temp_files(out)
    owner = _read_json(out / OWNER)
    same = owner is not None and owner.get("command") == command
    written = _read_manifest(out) if same else []
    # rewrite the manifest without a line a kill may have torn, or empty it for a new owner
    atomic_write(out / MANIFEST, "".join(p + "\n" for p in written), fsync=False)
    atomic_write(out / OWNER, _owner_json(command, owner.get("created", _now()) if same else _now()))
    return written
