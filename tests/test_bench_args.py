"""`make gpu-check` runs only where a GPU is lent, rarely and against the clock: a benchmark call
that its own parser refuses would waste that run. Each `bench/*.py` call in bench/gpu_check.sh
must parse with the script's own options."""

import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `import bench.*` under a plain `pytest` too
SCRIPT = (ROOT / "bench" / "gpu_check.sh").read_text()
CALLS = re.findall(r'^step \S+ \d+ "\$PY" bench/(\w+)\.py(.*)$', SCRIPT, re.M)


def test_gpu_check_runs_the_gpu_benchmarks():
    assert {name for name, _ in CALLS} >= {"bench_ops", "bench_cyclegan"}, CALLS
    # every line that names a benchmark is a call the pattern above parses (none written another way)
    naming = [ln for ln in SCRIPT.splitlines() if re.search(r"bench/\w+\.py", ln) and not ln.lstrip().startswith("#")]
    assert len(naming) == len(CALLS), naming


@pytest.mark.parametrize("name,args", CALLS, ids=[f"{n}{a}" for n, a in CALLS])
def test_gpu_check_benchmark_calls_parse(name, args):
    parser = importlib.import_module(f"bench.{name}").arg_parser()
    parsed = parser.parse_args(shlex.split(args))  # argparse exits 2 on an unknown or malformed option
    assert parsed.device == "cuda"
