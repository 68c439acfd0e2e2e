"""Run plumbing shared by the trainers: options, run folders, state, resume, RNG, signals, order.

Everything a training command needs that is not training:

    option(...)              a config field with its help, choices and range (field metadata)
    add_options(p, Config)   argparse flags made from a config dataclass's fields
    to_flags(cfg)            the exact inverse: the flags that parse back into `cfg`
    check_options(cfg)       every field's range and choices, before any work starts
    save_state / load_state  atomic checkpoints with one format marker, loaded weights-only
    amp_setup                --amp: autocast dtype and gradient scaler
    check_resume             one policy: an allow-list of fields that may change on --resume
    rng_state / set_rng_state  CPU, every CUDA device, and the trainer's own generators
    StopOnSignal             SIGINT/SIGTERM finish the step, save, and exit 128 + signal
    child_command            a child that gets SIGTERM when its parent dies, even by SIGKILL
    agree_start              every rank resumed from the same step
    epoch_order              a seeded permutation of (seed, epoch), sharded across ranks
    cli                      expected failures become one line and exit code 2

The trainers (`melano.cyclegan.train`, `melano.classifier.train`) call these in the same order:
options, run folder, resume, loop, finish.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import dist
from .common import atomic_save, load_checkpoint, to_jsonable

log = logging.getLogger("melano.run")

EXIT_USAGE = 2  # bad options or input: one line on stderr, nothing changed


class UsageError(ValueError):
    """An option, file or column the user can fix; the message names it and the fix."""


class Stopped(KeyboardInterrupt):
    """A trainer stopped by SIGINT/SIGTERM after saving its checkpoint. The process exits
    128 + signum, the shell's convention for a signal."""

    def __init__(self, signum: int, checkpoint: str | Path | None = None):
        name = signal.Signals(signum).name
        saved = f"; {checkpoint} is saved, rerun with --resume to continue" if checkpoint else ""
        super().__init__(f"stopped by {name}{saved}")
        self.signum, self.checkpoint = signum, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# ----------------------------------------------------------------------------- options

def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence | None = None,
           min: float | None = None, max: float | None = None, min_open: bool = False,
           factory: Callable | None = None, cli: bool = True) -> Any:
    """A config field: its default, its --help text, and what values are allowed.

    `min`/`max` bound numbers (`min_open`: strictly above min); None stays allowed for optional
    fields. `cli=False` keeps a field out of the command line (set by code, e.g. a pipeline)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "min": min, "max": max,
            "min_open": min_open, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(f: dataclasses.Field) -> tuple[str, bool]:
    """(base type name, optional) from the annotation string: 'int | None' -> ('int', True)."""
    parts = [p.strip() for p in str(f.type).split("|")]
    return parts[0], "None" in parts[1:]


def _parser(base: str, optional: bool, name: str) -> Callable[[str], Any]:
    convert = {"int": int, "float": float}.get(base, str)

    def parse(text: str) -> Any:
        if optional and text.strip().lower() == "none":
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag_name(name)} takes {base}, got {text!r}") from None
    parse.__name__ = base  # argparse names the type in its messages
    return parse


def add_options(p: argparse.ArgumentParser, cls: type, required: Sequence[str] = (),
                skip: Sequence[str] = ()) -> None:
    """One argparse flag per field of dataclass `cls`: --field-name, typed from its annotation,
    help and choices from its `option` metadata. Booleans get --x/--no-x; lists take several
    values; optional fields also accept 'none'. Defaults come from the dataclass."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or not meta.get("cli", True):
            continue
        base, optional = _kind(f)
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        shown = "none" if default is None else default
        help_text = meta.get("help", "")
        kw: dict[str, Any] = {"help": f"{help_text} (default: {shown})" if has_default else help_text}
        if f.name in required or not has_default:
            kw.update(required=True, help=help_text)
        if base == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif base.startswith("list"):
            kw.update(nargs="*", metavar=f.name.upper())
        else:
            kw["type"] = _parser(base, optional, f.name)
            if meta.get("choices"):
                kw["choices"] = list(meta["choices"])
        if has_default and "required" not in kw:
            kw["default"] = default
        p.add_argument(flag_name(f.name), dest=f.name, **kw)


def from_args(cls: type, args: argparse.Namespace, **overrides) -> Any:
    """The config dataclass from parsed flags (fields not on the command line keep defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **overrides})


def to_flags(cfg: Any) -> list[str]:
    """The flags that `add_options` parses back into `cfg`, exactly: every command-line field,
    None as 'none', booleans as --x or --no-x, lists as several values."""
    flags: list[str] = []
    for f in dataclasses.fields(cfg):
        if not f.metadata.get("cli", True):
            continue
        value, flag = getattr(cfg, f.name), flag_name(f.name)
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, "none" if value is None else str(value)]
    return flags


def check_options(cfg: Any, prefix: str = "") -> None:
    """Raise UsageError naming the first field outside its choices or range, as its flag."""
    for f in dataclasses.fields(cfg):
        meta, value = f.metadata, getattr(cfg, f.name)
        flag = flag_name(prefix + f.name)
        if value is None or isinstance(value, bool):
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise UsageError(f"{flag} {value!r}: choose one of {', '.join(map(str, meta['choices']))}")
        lo, hi = meta.get("min"), meta.get("max")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value:  # NaN
                raise UsageError(f"{flag} is NaN: give a number")
            if lo is not None and (value <= lo if meta.get("min_open") else value < lo):
                raise UsageError(f"{flag} must be {'>' if meta.get('min_open') else '>='} {lo}, got {value}")
            if hi is not None and value > hi:
                raise UsageError(f"{flag} must be <= {hi}, got {value}")


def split_path(cfg: Any) -> Path:
    """A trainer's split file: --split-csv, or splits.csv in its --out (never in --data)."""
    return Path(cfg.split_csv) if cfg.split_csv else Path(cfg.out) / "splits.csv"


def cache_path(cfg: Any) -> Path:
    """A trainer's image-cache folder: --cache-dir, or cache/ in its --out."""
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out) / "cache"


# ----------------------------------------------------------------------------- precision

AMP_CHOICES = ("auto", "bf16", "fp16", "none")


def amp_setup(amp: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """--amp: (autocast dtype or None, GradScaler or None). auto is bf16 on CUDA where supported,
    else fp16, and full precision on CPU; fp16 needs a scaler, bf16 does not."""
    if amp == "auto":
        amp = "none" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device; use --amp bf16 or none on CPU")
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return dtype, torch.amp.GradScaler(device.type) if amp == "fp16" else None


# ----------------------------------------------------------------------------- state

def save_state(state: dict, path: str | Path, fmt: str) -> None:
    """Write a checkpoint atomically, marked with its format (e.g. 'melano.cyclegan')."""
    atomic_save({**state, "format": fmt}, path)


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


def check_resume(saved: dict, cfg: Any, may_change: set[str], path: str | Path) -> None:
    """Refuse to resume with a config that differs from the saved one in any field outside
    `may_change`: that would silently continue a different experiment."""
    now = to_jsonable(cfg)
    diff = [f"{flag_name(k)} {saved.get(k)!r} -> {now[k]!r}" for k in now
            if k not in may_change and saved.get(k) != now[k]]
    if diff:
        raise UsageError(f"{path} was trained with other options ({'; '.join(diff)}): resume with the same "
                         f"ones, or start a new run in another --out")


def check_world(saved: dict, path: str | Path) -> None:
    n, now = saved.get("world_size", 1), dist.world_size()
    if n != now:
        raise UsageError(f"{path} was trained by {n} process(es), this run has {now}: the data order and the "
                         f"per-process random streams depend on it; resume with the same number of processes")


def rng_state(*generators: torch.Generator) -> dict:
    """The global CPU stream, every visible CUDA device's, and the given generators', as tensors
    (so a checkpoint holding them loads weights-only)."""
    state = {"cpu": torch.get_rng_state(), "generators": [g.get_state() for g in generators]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, *generators: torch.Generator) -> None:
    torch.set_rng_state(state["cpu"])
    for g, s in zip(generators, state["generators"], strict=True):
        g.set_state(s)
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def agree_start(resumed: bool, step: int, path: str | Path) -> None:
    """Every rank must start from the same checkpoint (also a barrier after reading it)."""
    starts = dist.all_gather_object((resumed, step))
    if len(set(starts)) > 1:
        raise RuntimeError(f"the ranks start from different (resumed, step) {starts}: every process must read "
                           f"the same {path}; on several nodes, put --out on a filesystem they all share")


def epoch_order(n: int, seed: int, epoch: int, take: int | None = None) -> list[int]:
    """This rank's order of the n items in `epoch`: a permutation seeded by (seed, epoch) alone,
    cut to its first `take` items, sharded across ranks as DistributedSampler does. Being a pure
    function of (seed, epoch), it lets a resumed run skip exactly the batches it has done."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return dist.shard(order[:take].tolist() if take is not None else order.tolist())


# ----------------------------------------------------------------------------- signals

REPEAT_WINDOW_S = 1.0  # a repeat of the first signal within this is the same request


def repeats(signum: int, first: int, at: float) -> bool:
    """Whether `signum` repeats the `first` signal, received at time.monotonic() `at`, soon enough
    to be the same request: a signal to a process group (Ctrl-C, `timeout`, kill -PGID) reaches a
    trainer directly and again as forwarded by melano.pipeline, and `timeout` signals its command,
    then its group. Counting those as two would abort the trainer without its checkpoint."""
    return signum == first and time.monotonic() - at < REPEAT_WINDOW_S


class StopOnSignal:
    """SIGINT/SIGTERM set `signum`; the loop finishes its step, saves, and raises Stopped.
    A second signal interrupts at once, unless it repeats the first within REPEAT_WINDOW_S (see
    `repeats`), or under torchrun, which forwards the signal it got and kills its workers itself
    after a timeout: there repeats are ignored. Handlers are installed only in the main thread
    (elsewhere signals are not delivered to Python)."""

    def __init__(self):
        self.signum, self.at, self._old = 0, 0.0, {}

    def _handler(self, signum, frame):
        if self.signum:
            if dist.world_size() > 1 or repeats(signum, self.signum, self.at):
                return
            raise KeyboardInterrupt
        self.signum, self.at = signum, time.monotonic()
        log.warning("received %s: saving a checkpoint after this step (send it again, a second later, to "
                    "abort at once)", signal.Signals(signum).name)

    def agreed(self) -> int:
        """The signal any rank received (0 if none): all ranks stop after the same step."""
        return dist.max_int(self.signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- CLI

EXPECTED = (ValueError, OSError, ImportError, FloatingPointError)  # UsageError, FileNotFoundError, ...


# Runs `python -m <module> <args>` after die_with_parent: PR_SET_PDEATHSIG survives exec and runpy.
_LAUNCH = ("import sys, runpy; from melano.run import die_with_parent; die_with_parent(int(sys.argv.pop(1))); "
           "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")


def child_command(module: str, args: Sequence[str]) -> list[str]:
    """The command line of `python -m module args` as a child of this process that stops (SIGTERM:
    a trainer saves a checkpoint and exits) when this process dies, even by SIGKILL, on Linux."""
    return [sys.executable, "-c", _LAUNCH, str(os.getpid()), module, *args]


def die_with_parent(parent: int) -> None:
    """Ask Linux for SIGTERM when the parent dies; exit at once if it has died already (before
    this process could ask). Elsewhere only the second part applies."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        sys.exit(128 + signal.SIGTERM)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, (ValueError, UsageError)) else f"{type(e).__name__}: {text}"


def cli(command: Callable[[], Any], debug: bool = False) -> int:
    """Run a CLI command: 0 on success; a Stopped trainer exits 128 + signal; an expected failure
    (bad option, missing or unreadable file, corrupt checkpoint, no CUDA) prints one line and
    exits 2. `debug` shows the traceback instead. Under torchrun, leaves the process group."""
    try:
        command()
        return 0
    except Stopped as e:
        log.warning("%s", e)
        return e.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except EXPECTED as e:
        if debug:
            traceback.print_exc()
        log.error("%s", one_line(e))
        return EXIT_USAGE
    finally:
        dist.destroy()


def add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the traceback of an expected failure")
