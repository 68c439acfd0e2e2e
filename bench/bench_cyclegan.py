"""CycleGAN training iterations per second: fused InstanceNorm+activation (melano.ops, MELANO_OPS=ext)
against the composed PyTorch ops (MELANO_OPS=eager), in the same process and run.

Each iteration is one full `melano.cyclegan.train_step` (both generators and both discriminators,
forward and backward, Adam steps, image pools) on random images, so data loading is not timed.
The backend is switched at runtime through MELANO_OPS (melano.ops reads it at every call); the two
paths are timed in alternating rounds so that drift in machine load hits both alike. Before any
timing, one step from the same weights on the same batch must give the same losses on both paths.

    python bench/bench_cyclegan.py                                   # CPU: 64 and 128 px (~2 min)
    python bench/bench_cyclegan.py --device cuda --size 256          # GPU: batch 1, ngf 64, 9 blocks
"""

import argparse
import copy
import os
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiet the profiler's C++ log lines
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import write_results  # noqa: E402
from melano import cyclegan as cg  # noqa: E402
from melano import ops  # noqa: E402


NORM_ACT_OPS = re.compile(r"batch_norm|instance_norm|inorm_act|relu|threshold|clamp_min|leaky")


def norm_act_share(state, batch, cfg) -> float:
    """Share of one reference-path step's CPU op time spent in InstanceNorm and activations (their
    forward and backward): by Amdahl's law, fusing them can speed a step up by 1 / (1 - share) at most."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_steps("eager", state, [batch], cfg, None, None, False)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if NORM_ACT_OPS.search(e.key)) / total


def fresh_optim(models, cfg):
    opt_G = torch.optim.Adam(list(models["G_A"].parameters()) + list(models["G_B"].parameters()),
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_D = torch.optim.Adam(list(models["D_A"].parameters()) + list(models["D_B"].parameters()),
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    return opt_G, opt_D


def run_steps(mode, state, batches, cfg, amp_dtype, scaler, sync):
    os.environ["MELANO_OPS"] = mode
    models, opt_G, opt_D, pools, rng = state
    for real_A, real_B in batches:
        losses = cg.train_step(models, opt_G, opt_D, pools[0], pools[1], real_A, real_B, cfg, rng,
                               scaler, amp_dtype)
    if sync:
        torch.cuda.synchronize()
    return losses


def bench_size(size, args, device, amp):
    n_blocks = args.n_blocks or (9 if size >= 256 else 6)
    cfg = cg.CycleGANConfig(size=size, ngf=args.ngf, ndf=args.ndf, n_blocks=n_blocks, batch_size=args.batch_size)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(args.batch_size, 3, size, size, generator=g).to(device) * 2 - 1,
                torch.rand(args.batch_size, 3, size, size, generator=g).to(device) * 2 - 1)
               for _ in range(args.steps)]
    torch.manual_seed(cfg.seed)
    base = cg.build_models(cfg).to(device)
    states, scalers = {}, {}
    for mode in ("ext", "eager"):
        models = copy.deepcopy(base)
        states[mode] = (models, *fresh_optim(models, cfg),
                        (cg.ImagePool(cfg.pool_size, torch.Generator().manual_seed(1)),
                         cg.ImagePool(cfg.pool_size, torch.Generator().manual_seed(2))),
                        torch.Generator().manual_seed(3))
        scalers[mode] = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    sync = device.type == "cuda"
    # numbers first: one step from identical weights on the same batch
    first = {m: run_steps(m, states[m], batches[:1], cfg, amp_dtype, scalers[m], sync) for m in states}
    worst = max(abs(first["ext"][k] - first["eager"][k]) / max(1e-6, abs(first["eager"][k]))
                for k in first["ext"])
    tol = 1e-3 if amp == "none" else 5e-2
    assert worst < tol, f"fused and reference losses differ (relative {worst:.2e}): {first}"
    times = {m: [] for m in states}
    for _ in range(args.rounds):
        for m in states:  # alternate, so load changes hit both
            t = time.perf_counter()
            run_steps(m, states[m], batches, cfg, amp_dtype, scalers[m], sync)
            times[m].append((time.perf_counter() - t) / len(batches))
    it_s = {m: 1 / statistics.median(v) for m, v in times.items()}
    share = norm_act_share(states["eager"], batches[0], cfg) if device.type == "cpu" and amp == "none" else None
    return {"norm_act_share_of_reference_step": share,
            "amdahl_max_speedup": None if share is None else 1 / (1 - share),
            "size": size, "batch_size": args.batch_size, "ngf": args.ngf, "ndf": args.ndf,
            "n_blocks": n_blocks, "amp": amp, "steps_per_round": args.steps, "rounds": args.rounds,
            "fused_it_s": it_s["ext"], "reference_it_s": it_s["eager"],
            "speedup": it_s["ext"] / it_s["eager"], "first_step_max_rel_loss_diff": worst}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--size", type=int, nargs="+", default=None,
                   help="image sizes (default: 64 128 on CPU, 256 on CUDA)")
    p.add_argument("--batch-size", type=int, default=1, help="images per domain per step (default 1)")
    p.add_argument("--ngf", type=int, default=64, help="generator width (default 64)")
    p.add_argument("--ndf", type=int, default=64, help="discriminator width (default 64)")
    p.add_argument("--n-blocks", type=int, default=None, help="residual blocks (default 9 at >=256 px, else 6)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 3 CPU, 20 CUDA)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per path; median reported")
    p.add_argument("--amp", nargs="+", default=None, choices=["none", "bf16", "fp16"],
                   help="precisions (default: none on CPU; none and bf16 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--name", default=None, help="results name (default cyclegan_cpu / cyclegan_cuda)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    sizes = args.size or ([256] if cuda else [64, 128])
    args.steps = args.steps or (20 if cuda else 3)
    amps = args.amp or (["none", "bf16"] if cuda else ["none"])
    info = ops.build()
    if ops.backend(device) != "ext":
        sys.exit(f"the fused op is not available for {device}: {info.error or info.cuda_reason}")
    rows = []
    print(f"{'size':>5}{'amp':>6}{'blocks':>7}{'fused it/s':>12}{'reference it/s':>16}{'speed-up':>10}"
          f"{'norm+act share':>16}")
    for size in sizes:
        for amp in amps:
            r = bench_size(size, args, device, amp)
            rows.append(r)
            share = "-" if r["norm_act_share_of_reference_step"] is None else \
                f"{100 * r['norm_act_share_of_reference_step']:.1f}%"
            print(f"{size:>5}{amp:>6}{r['n_blocks']:>7}{r['fused_it_s']:>12.3f}{r['reference_it_s']:>16.3f}"
                  f"{r['speedup']:>9.2f}x{share:>16}", flush=True)
    os.environ.pop("MELANO_OPS", None)
    name = args.name or ("cyclegan_cuda" if cuda else "cyclegan_cpu")
    extra = {"device": torch.cuda.get_device_name() if cuda else "cpu", "ops_build": {
        "cuda": info.cuda, "cached": info.cached}}
    write_results(name, {**extra, "rows": rows})


if __name__ == "__main__":
    main()
