"""SIGTERM/SIGINT to the pipeline: every running trainer is told, saves its checkpoint and exits;
the pipeline stops with 128 + signum and one line; a rerun resumes. Real processes: the pipeline is
`python -m melano.pipeline` on a small smoke run whose two classifier stages train side by side in
child processes (--jobs 2)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from melano.infra import signals

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 25  # 4 steps an epoch on the smoke split: ~15 s per arm on 2 cores, time to signal mid-training
ARMS = ("arm_none_0", "arm_none_1")


def pipeline_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "melano.pipeline", "--preset", "smoke", "--arms", "none", "--seeds", "2",
            "--clf-epochs", str(EPOCHS), "--jobs", "2", "--device", "cpu", "--out", str(out)]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def identity(pid: int) -> tuple[str, str] | None:
    """(start time, state) of a process, None once it is gone: a pid reused later has another start time."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[19], fields[0]


def alive(pid: int, started: str) -> bool:
    now = identity(pid)
    return now is not None and now[0] == started and now[1] != "Z"


def start_and_wait_for_training(out: Path, log: Path) -> tuple[subprocess.Popen, dict[int, str]]:
    """The pipeline in a session of its own (so that cleanup can reach every process it started),
    once both classifier children are in their training loops (history.csv: past a validation)."""
    with open(log, "wb") as f:
        p = subprocess.Popen(pipeline_cmd(out), cwd=out.parent, env=env(), stdout=subprocess.DEVNULL, stderr=f,
                             start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        kids = children(p.pid)
        if len(kids) == 2 and all((out / a / "history.csv").exists() for a in ARMS):
            return p, {k: i[0] for k in kids if (i := identity(k))}
        assert p.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    pytest.fail(f"the classifier stages were not training within 60 s: {log.read_text()[-3000:]}")


def stop(p: subprocess.Popen, kids: dict[int, str], send) -> tuple[int, list[int]]:
    """Send the signal, wait for the pipeline; then the children of it still alive (then killed)."""
    try:
        send()
        rc = p.wait(timeout=60)
        left = [k for k, t in kids.items() if alive(k, t)]
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # whatever of its session is still running
        except ProcessLookupError:
            pass
        p.wait()
    return rc, left


def last_line(log: Path) -> str:
    return log.read_text().strip().splitlines()[-1]


def test_sigterm_to_the_pipeline_alone_stops_its_trainers_and_a_rerun_resumes(tmp_path):
    out, log = tmp_path / "run", tmp_path / "pipeline.log"
    p, kids = start_and_wait_for_training(out, log)
    rc, left = stop(p, kids, lambda: os.kill(p.pid, signal.SIGTERM))  # the pipeline only, not its group
    err = log.read_text()
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    assert left == [], f"children {left} of the pipeline outlived it"
    assert "SIGTERM" in last_line(log) and "Traceback" not in err, err[-3000:]
    total = EPOCHS * 4
    for a in ARMS:  # each trainer was told: it saved its step and stopped, not killed
        assert "stopped by SIGTERM" in (out / a / "train.log").read_text()
        assert 0 < torch.load(out / a / "last.pt", weights_only=True)["step"] < total
        assert not (out / a / "done.json").exists()
    # the rerun continues both stopped stages from their checkpoints
    again = subprocess.run(pipeline_cmd(out), cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    for a in ARMS:
        assert f"stage {a:<16} resuming" in again.stderr
        assert "resumed at step" in (out / a / "train.log").read_text()
        assert torch.load(out / a / "last.pt", weights_only=True)["step"] == total
    assert (out / "report.md").is_file()


def test_sigkill_to_the_pipeline_alone_stops_its_trainers_and_a_rerun_resumes(tmp_path):
    # issue 26: after kill -9 of the pipeline both trainers kept running, reparented to PID 1. Now
    # each asked Linux for SIGTERM when its parent dies (PR_SET_PDEATHSIG): it saves and stops
    out, log = tmp_path / "run", tmp_path / "pipeline.log"
    p, kids = start_and_wait_for_training(out, log)
    try:
        os.kill(p.pid, signal.SIGKILL)  # the pipeline only: it can neither forward nor clean up
        assert p.wait(timeout=60) == -signal.SIGKILL
        deadline = time.monotonic() + 60
        while any(alive(k, t) for k, t in kids.items()) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [k for k, t in kids.items() if alive(k, t)]
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert left == [], f"children {left} of the killed pipeline were still running 60 s later"
    for a in ARMS:
        assert "stopped by SIGTERM" in (out / a / "train.log").read_text()
        assert torch.load(out / a / "last.pt", weights_only=True)["step"] > 0
    again = subprocess.run(pipeline_cmd(out), cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    for a in ARMS:
        assert "resumed at step" in (out / a / "train.log").read_text()


def test_sigint_to_the_process_group_stops_each_trainer_once(tmp_path):
    # Ctrl-C reaches the pipeline and its trainers alike; the pipeline passes it on too, and a trainer
    # takes the two copies as one request: it saves its checkpoint rather than aborting
    out, log = tmp_path / "run", tmp_path / "pipeline.log"
    p, kids = start_and_wait_for_training(out, log)
    rc, left = stop(p, kids, lambda: os.killpg(p.pid, signal.SIGINT))
    err = log.read_text()
    assert rc == 128 + signal.SIGINT and left == [], err[-3000:]
    assert "SIGINT" in last_line(log) and "Traceback" not in err, err[-3000:]
    for a in ARMS:
        text = (out / a / "train.log").read_text()
        assert "stopped by SIGINT" in text and "interrupted" not in text, text[-2000:]
        assert torch.load(out / a / "last.pt", weights_only=True)["step"] > 0


def test_a_repeated_signal_is_one_request_and_a_later_one_aborts(monkeypatch):
    with signals.StopOnSignal() as s:
        try:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)  # a group signal and its forwarded copy
        except KeyboardInterrupt:
            pytest.fail("a copy of the first signal aborted the trainer")
        assert s.signum == signal.SIGTERM
        monkeypatch.setattr(signals, "REPEAT_WINDOW_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)  # sent again, later: abort at once
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
