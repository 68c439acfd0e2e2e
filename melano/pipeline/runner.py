"""How stages run: skipped when done with the same parameters, resumed when killed, side by side
(--jobs), each training stage in a child process that a signal stops with a checkpoint."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..infra import options, outdir, signals
from ..infra.dist import pick_device
from ..infra.files import to_jsonable
from .config import PipelineConfig

log = logging.getLogger("melano.pipeline")


class Stages:
    """Runs named stages under `root`. A stage folder holds params.json (written when it starts)
    and done.json (written last, with the result). Same params and done.json: skip. Same params, no
    done.json: the stage was killed, so it resumes. Different params or --rerun: the folder is
    cleared, if the run's manifests (`claim`) list every file in it, and the stage reruns. Each run
    of a stage gets a fresh `run_id`, which the stages reading it list among their parameters."""

    def __init__(self, root: Path, claim: outdir.Claim, rerun: list[str]):
        self.root, self.claim, self.rerun, self.timings = root, claim, set(rerun), {}

    def check_places(self, stages: list[str], files: list[str]) -> None:
        check_places(self.root, self.claim.written, stages, files)

    def forced(self, name: str) -> bool:  # a group (arm_<arm>, gan, synth_ls, ...) names all its replicates
        return name in self.rerun or any(re.fullmatch(rf"{re.escape(f)}_\d+", name) for f in self.rerun)

    def run(self, name: str, params: dict, fn: Callable[[Path, bool], dict]) -> dict:
        CHILDREN.check()  # a signal came while a trainer was running: start nothing more
        folder = self.root / name
        params = to_jsonable(params)
        key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        done, started = folder / "done.json", folder / "params.json"
        same = started.exists() and json.loads(started.read_text()).get("key") == key
        if same and done.exists() and not self.forced(name):
            log.info("stage %-16s done before with the same parameters: skipped", name)
            saved = json.loads(done.read_text())
            self.timings[name] = saved["seconds"]
            return saved["result"]
        resume = same and not self.forced(name)
        if not resume:  # only what melano wrote; anything else stops the pipeline here
            outdir.clear(self.root, self.claim.written, name, f"the pipeline's {name} stage")
        self.claim.record_child(folder)  # a trainer writes its files here, in its own manifest
        folder.mkdir(parents=True, exist_ok=True)
        self.claim.write_json(started, {"key": key, "params": params})
        log.info("stage %-16s %s", name, "resuming" if resume else "running")
        t0 = time.monotonic()
        result = fn(folder, resume)
        self.timings[name] = time.monotonic() - t0
        result = {**to_jsonable(result), "run_id": uuid.uuid4().hex}
        self.claim.write_json(done, {"result": result, "seconds": self.timings[name]})
        return result

    def run_all(self, todo: list[tuple[str, dict, Callable]], jobs: int) -> list[dict]:
        """Independent stages, `jobs` at a time; their results in the order given."""
        return self.side_by_side([lambda futures, t=t: self.run(*t) for t in todo], jobs)

    @staticmethod
    def side_by_side(calls: list[Callable[[list], Any]], jobs: int) -> list:
        """Calls, `jobs` at a time and started in order, each given the futures of the calls before
        it (so it may wait for one's result); their results in order. With jobs > 1 each training
        stage starts a process and waits for it, so threads are enough; with one job they run here,
        in the main thread, where an in-process trainer can catch signals."""
        futures: list[concurrent.futures.Future] = []
        if jobs == 1:
            for call in calls:
                futures.append(concurrent.futures.Future())
                futures[-1].set_result(call(futures))
            return [f.result() for f in futures]
        # The stages that run in this process (translations, quality) take one job's share of the
        # cores, as the trainers' processes do: with torch's default of every core beside the arms,
        # quality took 79 s instead of 42 and slowed them.
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
        pool = concurrent.futures.ThreadPoolExecutor(jobs)
        try:
            for call in calls:
                futures.append(pool.submit(call, futures))
            return [f.result() for f in futures]
        finally:  # a failure or Ctrl-C starts nothing more; the stages already running finish or stop
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(threads)


def check_places(root: Path, written: list[str], stages: list[str], files: list[str]) -> None:
    """Refuse, before any work, a stage folder, cache or report file in `root` that the pipeline
    whose manifest is `written` did not write, or a stage folder holding files melano did not
    write. Reads only."""
    for name in stages + ["cache"]:
        path = root / name
        if not os.path.lexists(path):
            continue
        ours = f"{name}/params.json" in written or (name == "cache" and "cache/" in written)
        if not ours or os.path.islink(path) or not path.is_dir():
            raise outdir.OutputError(
                f"{path} is where the pipeline's {name} {'cache' if name == 'cache' else 'stage'} goes, but this "
                f"pipeline did not write it (is it your data, or a run of an older melano?); move it out of "
                f"{root}, or choose another --out")
        if name != "cache":  # the cache is only ever added to
            outdir.check_clearable(root, written, name, f"the pipeline's {name} stage")
    for f in files:
        if os.path.lexists(root / f) and f not in written:
            raise outdir.OutputError(f"{root / f} is where the pipeline writes its {f}, but this pipeline did "
                                     f"not write it; move it out of {root}, or choose another --out")


def default_jobs(device: str | None) -> int:
    """2 on a CPU host with 2 or more cores, else 1: two one-thread processes train the quick preset's
    small models faster than one two-thread process (bench/bench_jobs.py)."""
    return 2 if pick_device(device).type == "cpu" and (os.cpu_count() or 1) >= 2 else 1


def parallel(cfg: PipelineConfig) -> tuple[int, int | None, dict]:
    """(training stages at a time, CPU threads of each one's process (None: train in this one), and
    its processes for its parameters: they change its result, the global batch; left out at 1)."""
    jobs = 1 if cfg.nproc_per_node > 1 else cfg.jobs or default_jobs(cfg.device)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    return jobs, threads, {"nproc_per_node": cfg.nproc_per_node} if cfg.nproc_per_node > 1 else {}


class Children(signals.StopOnSignal):
    """SIGINT/SIGTERM to the pipeline, passed on to its trainer processes (by default SIGTERM would
    leave them running, orphaned). The first signal goes once to each, which saves after its step
    and exits 128 + signum; the pipeline starts nothing more, waits, and stops the same way (at once
    if no trainer runs). A later one goes to them too, and aborts; a copy of the first (a signal to
    the process group, which the children stay in) is the same request. One per process: CHILDREN."""

    doing = "the running training stages save a checkpoint after their step and stop"

    def __init__(self):
        super().__init__()
        self.busy: set[object] = set()  # train_process calls under way, trainer started or not
        self.live: dict[int, subprocess.Popen] = {}
        self.untold: dict[int, subprocess.Popen] = {}  # live, not yet sent the signal
        # a process forked from the pipeline (a Pool worker of an in-process stage) is no pipeline: SIGTERM
        # must end it as before. DataLoader workers of an in-process trainer keep that trainer's handler
        os.register_at_fork(after_in_child=functools.partial(self.restore, forked=True))

    def received(self, signum: int) -> None:
        self.tell()
        if not self.busy:  # no trainer to wait for. Raising while one starts could orphan it
            raise signals.Stopped(signum)

    def aborting(self, signum: int) -> None:
        for proc in list(self.live.values()):
            proc.send_signal(signum)

    def tell(self) -> None:
        """Send the signal to every live trainer not yet sent it. dict.pop is atomic: of the handler
        and a thread that has just started a trainer, exactly one sends it."""
        for pid in list(self.untold):
            proc = self.untold.pop(pid, None)
            if proc is not None:
                proc.send_signal(self.signum)

    def check(self) -> None:
        if self.signum:
            raise signals.Stopped(self.signum)

    @contextlib.contextmanager
    def start(self, cmd: list[str], **popen) -> Iterator[subprocess.Popen]:
        """subprocess.Popen(cmd, **popen), known to the handler until the block ends; none once
        the pipeline has been signalled."""
        token, proc = object(), None
        self.busy.add(token)  # before the check: a signal after it finds the stage busy and leaves it to us
        try:
            self.check()
            proc = subprocess.Popen(cmd, **popen)
            self.live[proc.pid] = self.untold[proc.pid] = proc
            if self.signum:  # it came while the trainer started
                self.tell()
            yield proc
        finally:
            if proc is not None:
                self.live.pop(proc.pid, None)
                self.untold.pop(proc.pid, None)
            self.busy.discard(token)


CHILDREN = Children()


def train_process(module: str, run_cfg, nproc: int, threads: int | None, folder: Path) -> None:
    """`<module> train <run_cfg's flags>` in a child process: under torchrun (--standalone, K
    processes) when nproc > 1, else one process with `threads` CPU threads and its output in
    folder/train.log (stages side by side would mix theirs). Raises if it fails or stops."""
    train = ["train", *options.to_flags(run_cfg)]
    if nproc > 1:  # torchrun dies with the pipeline, and its ranks with it
        cmd, env, sink = signals.child_command("torch.distributed.run", ["--standalone", "--nproc_per_node", str(nproc),
                                                                    "-m", module, *train]), None, None
    else:
        cmd, env = signals.child_command(module, train), {**os.environ, "OMP_NUM_THREADS": str(threads)}
        sink = open(folder / "train.log", "w")
    log.info("running %s", " ".join(cmd))
    with sink or contextlib.nullcontext(), CHILDREN.start(cmd, env=env, stdout=sink,
                                                          stderr=sink and subprocess.STDOUT) as proc:
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # a second signal: the trainer was told to abort too
            proc.wait()
            raise
    # 128 + n: the trainer saved its checkpoint and stopped. Any other failure after the pipeline was
    # signalled is that signal too: a trainer still importing dies of it; torchrun exits 1
    stopped = rc - 128 if rc - 128 in (signal.SIGINT, signal.SIGTERM) else CHILDREN.signum if rc else 0
    if stopped:
        log.warning("stage %s stopped by %s (exit code %d); rerun the pipeline to resume it from its checkpoint",
                    folder.name, signal.Signals(stopped).name, rc)
        raise signals.Stopped(stopped)
    if rc != 0:
        log_path = folder / "train.log"
        where = "its log is above" if sink is None else f"the end of {log_path}: {last_line(log_path)}"
        raise RuntimeError(f"{module} train exited with code {rc} ({where}); rerun the pipeline to resume the "
                           f"stage from its checkpoint")


def last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(empty)"
