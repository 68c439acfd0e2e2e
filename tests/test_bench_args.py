"""`make gpu-check` runs only where a GPU is lent, rarely and against the clock: a benchmark call
that its own parser refuses would waste that run. Each `bench/*.py` call in bench/gpu_check.sh
must parse with the script's own options."""

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CALLS = re.findall(r'^step \S+ \d+ "\$PY" bench/(\w+)\.py(.*)$', (ROOT / "bench" / "gpu_check.sh").read_text(), re.M)


def test_gpu_check_runs_the_gpu_benchmarks():
    assert {name for name, _ in CALLS} >= {"bench_ops", "bench_cyclegan"}, CALLS


@pytest.mark.parametrize("name,args", CALLS, ids=[f"{n}{a}" for n, a in CALLS])
def test_gpu_check_benchmark_calls_parse(name, args):
    parser = importlib.import_module(f"bench.{name}").arg_parser()
    parsed = parser.parse_args(shlex.split(args))  # argparse exits 2 on an unknown or malformed option
    assert parsed.device == "cuda"
