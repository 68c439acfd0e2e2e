"""Signals: a loop stops after its step on SIGINT/SIGTERM (a trainer saves, then exits 128 + signal),
a parent passes them on to its children, and children die with their parent."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from . import dist

log = logging.getLogger("melano.signals")


class Stopped(KeyboardInterrupt):
    """Stopped by SIGINT/SIGTERM, the checkpoint saved. The process exits 128 + signum, the
    shell's convention for a signal."""

    def __init__(self, signum: int, checkpoint: str | Path | None = None):
        saved = f"; {checkpoint} is saved, rerun with --resume to continue" if checkpoint else ""
        super().__init__(f"stopped by {signal.Signals(signum).name}{saved}")
        self.signum, self.checkpoint, self.exit_code = signum, checkpoint, 128 + signum


# The first signal repeated within this many seconds is the same request: a signal to a process
# group (Ctrl-C, `timeout`, kill -PGID) reaches a trainer directly and again as forwarded by its
# parent, and `timeout` signals its command, then its group. Counting those as two would abort the
# trainer without its checkpoint.
REPEAT_WINDOW_S = 1.0


class StopOnSignal:
    """While the block runs, the first SIGINT/SIGTERM sets `signum` and calls `received`: the loop
    finishes its step, saves, and raises Stopped. A later signal calls `aborting`, then interrupts
    at once, unless it repeats the first (REPEAT_WINDOW_S), or under torchrun, which forwards the
    signal it got and kills its workers itself after a timeout: there repeats are ignored. Handlers
    are installed only in the main thread (elsewhere Python gets no signals)."""

    doing = "saving a checkpoint after this step"  # what the first signal does, for the log

    def __init__(self):
        self.signum, self.at, self._old = 0, 0.0, {}

    def received(self, signum: int) -> None:  # the loop reads `signum` (or agreed()) itself
        pass

    def aborting(self, signum: int) -> None:
        pass

    def _handler(self, signum, frame):
        if self.signum:
            if dist.world_size() > 1 or (signum == self.signum and time.monotonic() - self.at < REPEAT_WINDOW_S):
                return
            self.aborting(signum)
            raise KeyboardInterrupt
        self.signum, self.at = signum, time.monotonic()
        log.warning("received %s: %s (send it again, a second later, to abort at once)",
                    signal.Signals(signum).name, self.doing)
        self.received(signum)

    def agreed(self) -> int:
        """The signal any rank received (0 if none): all ranks stop after the same step."""
        return dist.max_int(self.signum)

    def __enter__(self):
        self.signum = 0  # an instance used again starts afresh; after the block, `signum` still tells
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        self.restore()

    def restore(self, forked: bool = False) -> None:  # forked: in a child, only where ours is still installed
        for s, h in self._old.items():
            if not forked or signal.getsignal(s) == self._handler:
                signal.signal(s, h)
        self._old = {}


# Runs `python -m <module> <args>` after die_with_parent: PR_SET_PDEATHSIG survives exec and runpy.
_LAUNCH = ("import sys, runpy; from melano.infra.signals import die_with_parent; die_with_parent(int(sys.argv.pop(1))); "
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
