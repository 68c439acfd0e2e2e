"""`pytest -m gpu` on the GPU machine, whose python has torch, pytest, scikit-learn, scipy and timm
but none of the dev extras: every test module must still import, or pytest collects nothing
("Interrupted: 1 error during collection") and the one GPU run of a task is lost (issue 24)."""

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("hypothesis", "expecttest")  # what the GPU machine's python lacks


def without_extras(folder: Path) -> Path:
    """A view of this python's site-packages without the dev extras (links to everything else)."""
    view = folder / "site-packages"
    view.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().lstrip("_").startswith(EXTRAS):
            (view / entry.name).symlink_to(entry)
    return view


def test_gpu_tests_collect_without_the_dev_extras(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{without_extras(tmp_path)}{os.pathsep}{ROOT}"}
    python = [sys.executable, "-S"]  # -S: no site-packages but the view
    assert subprocess.run([*python, "-c", "import hypothesis"], env=env, capture_output=True,
                          timeout=120).returncode != 0  # the view really lacks the extras
    r = subprocess.run([*python, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "error" not in out.lower(), out[-3000:]
    collected = re.search(r"(\d+)/\d+ tests collected", out)
    assert collected and int(collected.group(1)) > 300, out[-3000:]  # the GPU tests, not none
