"""Checkpoints: atomic and weights-only, marked with their format; one save/resume protocol for
both trainers.

    save(path, fmt, shared, own)              collective: gathers each rank's own state, rank 0 writes
    resume(path, fmt, what, cfg, may_change)  (checkpoint, this rank's own part), checked; or (None, None)
    restore(state, own, objects, *generators) load_state_dict into each object, and the random streams
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from . import dist
from .cli import UsageError
from .files import atomic_write, to_jsonable
from .options import flag_name


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True: a checkpoint from elsewhere can never run code."""
    kind = _not_a_checkpoint(path)
    if kind:
        raise ValueError(f"{path}: not a checkpoint but {kind}; pass a .pt file that melano wrote "
                         f"(e.g. best.pt or last.pt)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # UnpicklingError, RuntimeError on a truncated zip, EOFError, ...
        text = " ".join(str(e).split())
        if "weights_only" in text or "Unsupported global" in text:  # torch's advice to retry unsafely: dropped
            raise ValueError(f"{path}: not a loadable checkpoint, refused: it holds Python objects other than "
                             f"tensors and plain containers. "
                             f"melano never unpickles arbitrary objects; do not load this file with "
                             f"weights_only=False unless you trust whoever made it") from None
        raise ValueError(f"{path}: not a loadable checkpoint: it is corrupt, truncated, empty or another kind of "
                         f"file ({type(e).__name__}); write it again, or pass the right file") from None


def _not_a_checkpoint(path: str | os.PathLike) -> str | None:
    """What the file is, when its first bytes show it is no torch.save file (a zip archive, or a
    pickle in the legacy format); None when it may be one."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None  # torch.load raises these with their usual messages
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return None
    if not head:
        return "an empty file"
    kinds = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image"}
    return next((kind for magic, kind in kinds.items() if head.startswith(magic)),
                "another kind of file (not a PyTorch checkpoint)")


def save_state(state: dict, path: str | Path, fmt: str) -> None:
    """Write a checkpoint atomically, marked with its format (e.g. 'melano.cyclegan')."""
    atomic_write(path, lambda f: torch.save({**state, "format": fmt}, f))


def load_state(path: str | Path, fmt: str, what: str) -> dict:
    """Load a checkpoint weights-only and check its format marker; errors say what it is instead."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what}")
    state = load_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != fmt:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UsageError(f"{path}: not a {what} (its format is {found!r}, not {fmt!r})")
    return state


# ----------------------------------------------------------------------------- the trainers' protocol

def save(path: str | Path, fmt: str, shared: dict, own: dict) -> None:
    """Collective: every rank's `own` state (its random streams, pools, ...) is gathered, so that a
    resumed run continues them all. Rank 0 writes `shared`, its own part beside it, the world size
    and, under torchrun, every rank's part as "ranks". No rank goes on before the file is complete."""
    ranks, world = dist.all_gather_object(own), dist.world_size()
    if dist.is_main():
        save_state({**shared, **own, "world_size": world, **({"ranks": ranks} if world > 1 else {})}, path, fmt)
    dist.barrier()


def resume(path: str | Path, fmt: str, what: str, cfg: Any, may_change: set[str]) -> tuple[dict | None, dict | None]:
    """(checkpoint, this rank's own part) when cfg.resume and `path` exists, else (None, None): start
    afresh. Checks the config and the world size; reads only, so a refused resume changes nothing.
    Collective: every rank must start from the same step."""
    path, state = Path(path), None
    if cfg.resume and path.exists():
        state = load_state(path, fmt, what)
        # a config that differs outside `may_change` would silently continue a different experiment
        saved, now = state["config"], to_jsonable(cfg)
        diff = [f"{flag_name(k)} {saved.get(k)!r} -> {now[k]!r}" for k in now
                if k not in may_change and saved.get(k) != now[k]]
        if diff:
            raise UsageError(f"{path} was trained with other options ({'; '.join(diff)}): resume with the same "
                             f"ones, or start a new run in another --out")
        n, world = state.get("world_size", 1), dist.world_size()
        if n != world:
            raise UsageError(f"{path} was trained by {n} process(es), this run has {world}: the data order and the "
                             f"per-process random streams depend on it; resume with the same number of processes")
    starts = dist.all_gather_object((state is not None, state["step"] if state else 0))
    if len(set(starts)) > 1:  # (also a barrier after reading the file)
        raise RuntimeError(f"the ranks start from different (resumed, step) {starts}: every process must read "
                           f"the same {path}; on several nodes, put --out on a filesystem they all share")
    if state is None:
        return None, None
    return state, state["ranks"][dist.rank()] if dist.world_size() > 1 else state


def restore(state: dict, own: dict, objects: dict[str, Any], *generators: torch.Generator) -> None:
    """Load state[name] into each object (models, optimisers, precision), and this rank's random
    streams (`own["rng"]`, from `rng_state`) into the global generators and `generators`."""
    for name, obj in objects.items():
        obj.load_state_dict(state[name])
    rng = own["rng"]
    torch.set_rng_state(rng["cpu"])
    for g, s in zip(generators, rng["generators"], strict=True):
        g.set_state(s)
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def rng_state(*generators: torch.Generator) -> dict:
    """The global CPU stream, every visible CUDA device's, and the given generators', as tensors
    (so a checkpoint holding them loads weights-only)."""
    state = {"cpu": torch.get_rng_state(), "generators": [g.get_state() for g in generators]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state
