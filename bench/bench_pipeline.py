"""Wall time of the whole experiment, per stage: `python -m melano.pipeline --preset quick`.

Runs the preset into a fresh folder (or, with --from-run, reads a finished run's metrics.json)
and writes bench/results/pipeline_<preset>.json with each stage's seconds and the arms' AUCs.
With --gan-runs BEFORE AFTER, two other runs' GAN stages (e.g. --no-gan-channels-last and the default,
each stopped once its GANs were done, run one after the other with the kernels already built) are
recorded too, with the ratio of their wall times.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import write_results  # noqa: E402
from melano import pipeline  # noqa: E402
from melano.infra.cli import setup_logging  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="quick", choices=sorted(pipeline.PRESETS))
    p.add_argument("--from-run", default=None, help="a finished run folder (e.g. runs/quick after `make train`) "
                                                    "to record instead of running")
    p.add_argument("--command-seconds", type=float, default=None,
                   help="wall time of the whole `make train` (install included), timed outside, to record beside it")
    p.add_argument("--install-seconds", type=float, default=None,
                   help="of --command-seconds, the venv and package install, timed outside")
    p.add_argument("--build-seconds", type=float, default=None,
                   help="of --command-seconds, the kernel build (the CLI's start until its first stage), timed outside")
    p.add_argument("--gan-runs", nargs=2, default=None, metavar=("BEFORE", "AFTER"),
                   help="two run folders whose finished gan and gan_ls stages to compare")
    args = p.parse_args()
    setup_logging()
    if args.from_run:
        result = json.loads((Path(args.from_run) / "metrics.json").read_text())
    else:
        with tempfile.TemporaryDirectory() as out:
            result = pipeline.run_experiment(pipeline.make_config(args.preset, out=out))
    print(f"{'stage':<18}{'seconds':>9}")
    for stage, sec in result["timings_s"].items():
        print(f"{stage:<18}{sec:>9.0f}")
    print(f"{'pipeline wall':<18}{result['wall_s']:>9.0f}")
    budget = 15 * 60 if args.preset == "quick" else None  # the quick preset's promise on 2 CPU cores
    if budget:
        print(f"wall / 15-minute budget: {result['wall_s'] / budget:.2f}")
    arms = {a["name"]: {"auc_mean": a["auc_mean"], "auc_sd": a["auc_sd"], "steps": a.get("steps"),
                        "operating_points_mean": a.get("operating_points_mean"),
                        "seeds": [{k: s[k] for k in ("auc", "ci_low", "ci_high", "clustered_ci")} for s in a["seeds"]]}
            for a in result["arms"]}
    write_results(f"pipeline_{args.preset}", {
        "preset": args.preset, "stage_seconds": result["timings_s"], "wall_s": result["wall_s"],
        "budget_s": budget, "wall_over_budget": budget and result["wall_s"] / budget,
        "split_sizes": result["split_sizes"], "arms": arms,
        "comparisons": result["comparisons"], "make_train_seconds": args.command_seconds,
        "gan_stages_compared": args.gan_runs and compare_gans(*map(Path, args.gan_runs)),
        "gan_channels_last": result["config"].get("gan_channels_last"),
        "synthetic_quality": result.get("synthetic_quality"),  # the README's quality table
        "slow_host_projection": slow_host_projection(result["wall_s"], args)})


def compare_gans(before: Path, after: Path) -> dict:
    """Two runs' GAN stages (side by side in each): their configs, seconds, and the ratio of their walls
    (each wall taken as the longer stage's seconds: the two start together)."""
    runs = {}
    for name, folder in (("before", before), ("after", after)):
        seconds = {k: json.loads((folder / k / "done.json").read_text())["seconds"] for k in ("gan_0", "gan_ls_0")}
        params = json.loads((folder / "gan_0" / "params.json").read_text())["params"]
        runs[name] = {"run": str(folder), "channels_last": params["channels_last"], "stage_seconds": seconds,
                      "wall_s": max(seconds.values()), "steps": gan_steps(folder / "gan_0" / "losses.csv")}
    ratio = runs["before"]["wall_s"] / runs["after"]["wall_s"]
    print(f"GAN stages: {runs['before']['wall_s']:.0f} s before, {runs['after']['wall_s']:.0f} s after: {ratio:.2f}x")
    return {**runs, "wall_ratio_before_over_after": ratio}


def gan_steps(losses_csv: Path) -> int:
    return sum(1 for _ in losses_csv.open()) - 1  # one row per step after the header


# The slowest 2-core AVX2 box seen took 1.45 s for the quick-settings CycleGAN step (issue 12's
# report); this host's time for the same step is measured by reference_step_seconds.
SLOW_HOST_STEP_S = 1.45


def reference_step_seconds(rounds: int = 3, steps: int = 3) -> float:
    """This host's time, now, for the step the slow box was timed on: the CycleGAN at 64 px, batch 4,
    ngf 32, 6 blocks, NCHW, fused kernels, torch's default threads (median of `rounds`, after a warm-up
    step). Hosts of one kind differ by tens of percent from day to day, so the ratio is taken in the
    same hour as the run it scales, not from an older cyclegan_cpu.json."""
    from bench import bench_cyclegan as bc
    from melano import cyclegan as cg, gan
    from melano.infra import kernels
    kernels.load()
    cfg = cg.CycleGANConfig(size=64, batch_size=4, ngf=32, ndf=32, n_blocks=6)
    batches = bc.random_batches(cfg, steps, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    state = bc.make_state(gan.build_models(cfg), cfg, "nchw_fused", torch.device("cpu"), "none")
    bc.run_steps("nchw_fused", state, batches[:1], cfg, False)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        bc.run_steps("nchw_fused", state, batches, cfg, False)
        times.append((time.perf_counter() - t) / steps)
    return statistics.median(times)


def slow_host_projection(wall_s: float, args) -> dict:
    """This run's wall scaled by (slow box's GAN step / this host's, measured now). With the whole
    `make train` timed, also the command projected three ways: only the pipeline scaled; the kernel
    build scaled too (it is CPU-bound); everything scaled, the install included."""
    step_s = reference_step_seconds()
    factor = SLOW_HOST_STEP_S / step_s
    print(f"the reference step took {step_s:.3f} s here: x{factor:.2f} to the slowest AVX2 box, "
          f"{wall_s * factor:.0f} s projected")
    command = None
    if None not in (args.command_seconds, args.install_seconds, args.build_seconds):
        extra = factor - 1  # what scaling a measured part adds to the measured command
        command = {"measured_s": args.command_seconds, "install_s": args.install_seconds, "build_s": args.build_seconds,
                   "pipeline_scaled_s": args.command_seconds + extra * wall_s,
                   "pipeline_and_build_scaled_s": args.command_seconds + extra * (wall_s + args.build_seconds),
                   "all_scaled_s": args.command_seconds * factor}
        print("make train projected: " + ", ".join(f"{k} {v:.0f}" for k, v in command.items()))
    return {"make_train": command, "factor": factor, "slow_host_step_s": SLOW_HOST_STEP_S, "this_host_step_s": step_s,
            "reference": "the step of bench_cyclegan.py's 64-px row (nchw_fused), timed right after the run",
            "projected_wall_s": wall_s * factor, "note": "a projection by one benchmark's ratio, not a measurement "
                                                         "on that box"}


if __name__ == "__main__":
    main()
