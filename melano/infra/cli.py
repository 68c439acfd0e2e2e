"""The edge of every command: logging, progress, expected failures as one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import time
import traceback
from typing import Any, Callable, Iterable, Iterator

from . import dist
from .files import atomic_write, json_text, to_jsonable
from .signals import Stopped

log = logging.getLogger("melano")

EXIT_USAGE = 2  # bad options or input: one line on stderr, nothing changed


class UsageError(ValueError):
    """An option, file or column the user can fix; the message names it and the fix."""


def setup_logging(level: int = logging.INFO) -> None:
    """One format for every CLI. Safe to call twice."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S")


def progress(iterable: Iterable, total: int | None = None, desc: str = "", every_s: float = 10.0) -> Iterator:
    """tqdm when it is installed; otherwise a log line every `every_s` seconds."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        pass
    else:
        yield from tqdm(iterable, total=total, desc=desc, leave=False, mininterval=1.0)
        return
    last = start = time.monotonic()
    for i, item in enumerate(iterable, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            log.info("%s: %d%s (%.1f/s)", desc or "progress", i, f"/{total}" if total else "", i / (now - start))


def log_config(cfg: Any, path: str | os.PathLike | None = None) -> None:
    """Print a config dataclass and, if a path is given, save it as JSON beside the outputs."""
    d = to_jsonable(cfg)
    width = max((len(k) for k in d), default=0)
    log.info("config:\n%s", "\n".join(f"  {k:<{width}} = {v}" for k, v in d.items()))
    if path is not None:
        atomic_write(path, json_text(d))


EXPECTED = (ValueError, OSError, ImportError, FloatingPointError)  # UsageError, FileNotFoundError, ...


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
        text = " ".join(str(e).split()) or type(e).__name__
        log.error("%s", text if isinstance(e, ValueError) else f"{type(e).__name__}: {text}")
        return EXIT_USAGE
    finally:
        dist.destroy()


def add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the traceback of an expected failure")


def write_run_config(claim, cfg: Any, batch_size: int, outputs: Iterable[str]) -> None:
    """A trainer's start (rank 0): the files it will write, in its folder's manifest, and
    config.json with the global batch."""
    for rel in ("config.json", *outputs):
        claim.record(rel)
    world = dist.world_size()
    log_config({**to_jsonable(cfg), "world_size": world, "global_batch_size": world * batch_size},
               claim.path("config.json"))
