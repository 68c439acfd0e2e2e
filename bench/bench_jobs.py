"""Two one-thread training processes against one two-thread process, on this host's cores.

The pipeline's `--jobs` default (2 on a CPU) rests on this: the quick preset's models are small,
so a second intra-op thread is idle for much of a step, while a second process keeps both cores
busy. For the quick preset's classifier step (Lite0, 48 px, batch 32) and CycleGAN step (48 px,
batch 4, ngf 16, 3 blocks, residual), it times steps per second of one process with 2 threads,
then of two 1-thread processes running at once (their summed rate), and prints the ratio.

    python bench/bench_jobs.py [--steps 20]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import write_results  # noqa: E402

WORKER = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[3])
kind, steps = sys.argv[1], int(sys.argv[2])
from melano.infra import kernels
kernels.load()  # the fused InstanceNorm for the GAN's step
if kind == "classifier":
    from melano import detector
    from melano.classifier import config as C, trainer
    cfg = C.ClassifierConfig(data="", out="", arch="tf_efficientnet_lite0", size=48, pretrained=False)
    m = trainer.build_training(cfg, torch.device("cpu"), None)
    x = torch.rand(32, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(32) > 0.8).float()
    step = lambda: detector.train_step(m, (x, y), cfg)
else:
    from bench.bench_cyclegan import make_state, quick_gan, random_batches, run_steps
    from melano import cyclegan as cg, gan
    cfg = cg.CycleGANConfig(**quick_gan())
    torch.manual_seed(0)
    state = make_state(gan.build_models(cfg), cfg, "nchw_fused", torch.device("cpu"), "none")
    batch = random_batches(cfg, 1, torch.device("cpu"))
    step = lambda: run_steps("nchw_fused", state, batch, cfg, False)
for _ in range(3):
    step()
t = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps({"steps_per_s": steps / (time.perf_counter() - t)}))
"""


def workers(kind: str, steps: int, n: int, threads: int) -> list[float]:
    """n processes with `threads` threads each, started together; each one's steps per second."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    root = str(Path(__file__).resolve().parent.parent)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, kind, str(steps), root], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    rates = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:  # a worker's error, not a JSON error about its empty output
            sys.exit(f"bench_jobs: a {kind} worker failed (exit {p.returncode}):\n{err[-2000:]}")
        rates.append(json.loads(out.strip().splitlines()[-1])["steps_per_s"])
    return rates


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per process")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    for kind in ("classifier", "cyclegan"):
        one = workers(kind, args.steps, 1, cores)[0]
        two = workers(kind, args.steps, 2, max(1, cores // 2))
        rows.append({"model": kind, "one_process_threads": cores, "one_process_steps_per_s": one,
                     "two_processes_steps_per_s": two, "two_processes_total_steps_per_s": sum(two),
                     "ratio_two_over_one": sum(two) / one})
        print(f"{kind:<11} 1 x {cores} threads {one:6.2f} steps/s | 2 x {max(1, cores // 2)} threads "
              f"{sum(two):6.2f} steps/s in all | x{sum(two) / one:.2f}")
    write_results("jobs", {"steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
