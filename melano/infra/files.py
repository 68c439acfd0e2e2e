"""Atomic files: every file melano writes goes through `atomic_write`, directly or through an
output folder's `Claim.write` (which also records it in the manifest). Standard library only."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import uuid
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("melano.files")


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable, fsync: bool = True) -> Path:
    """Write `content` (bytes, str as UTF-8, or a function called with the open binary file) to a
    temp file beside `path`, then ``os.replace`` it: a kill leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return path


def host_tag() -> str:
    """This host's name without "-", so that it can sit between "-" separators in a file name."""
    return socket.gethostname().replace("-", "_") or "host"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a PID of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        pass
    return True


# A name beside `path` that says whose it is: ".<name>.<kind>-<host>-<pid>-<hex>". A kill leaves
# it behind, and the writer's PID tells a dead writer's leftover from a live one's work.
def temp_name(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def temps_beside(path: Path, kind: str = "tmp") -> list[tuple[Path, int]]:
    """This host's `temp_name(path, kind)` entries beside `path` (sorted), with their writer's PID."""
    pat = re.compile(rf"^\.{re.escape(path.name)}\.{re.escape(kind)}-{re.escape(host_tag())}-(\d+)-[0-9a-f]{{8}}$")
    if not path.parent.is_dir():
        return []
    return sorted((Path(e.path), int(m.group(1))) for e in os.scandir(path.parent) if (m := pat.match(e.name)))


_TEMP = re.compile(r"^\..+\.tmp-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def remove_dead_temp_files(folder: Path) -> None:
    """Delete, below `folder`, the temp files of `atomic_write`s killed on this host: they are
    never renamed into place, so nothing else would remove them."""
    removed = 0
    for root, _, files in os.walk(folder):
        for m in filter(None, map(_TEMP.match, files)):
            if m["host"] == host_tag() and not pid_alive(int(m["pid"])):
                os.unlink(os.path.join(root, m.string))
                removed += 1
    if removed:
        log.info("%s: removed %d temp file(s) of killed writes", folder, removed)


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, Paths and numpy scalars as plain JSON values (numpy is read duck-typed)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():  # numpy (and torch) scalars
        return obj.item()
    return obj


def json_text(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), indent=2) + "\n"
