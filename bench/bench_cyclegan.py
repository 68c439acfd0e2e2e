"""CycleGAN training steps per second, several ways in one run, with ratios:

    cl_fused      melano, channels_last (NHWC) models and images, fused InstanceNorm+act op
    nchw_fused    melano, NCHW, fused op (MELANO_OPS=ext)
    nchw_eager    melano, NCHW, the eager PyTorch path of the same modules (MELANO_OPS=eager)
    cl_eager      melano, channels_last, the eager path: the baseline in the quick preset's own layout
    plain_nchw, plain_cl
                  what a user would otherwise write: the same layer list with nn.InstanceNorm2d +
                  nn.ReLU / nn.LeakyReLU, in both layouts
    cl_compiled   cl_fused with torch.compile on each of the four models (on the CPU shapes whose
                  third field is True; the first step's time, compilation included, is recorded apart)

Each step is one full `melano.cyclegan.train_step` (both generators and discriminators, forward
and backward, Adam, image pools) on random images; data loading is not timed. Configurations are
timed in alternating rounds so that load drift hits all alike, and one step from the same weights
on the same batch must give the same losses everywhere before any timing is trusted.

CPU shapes: the pipeline's quick preset as it runs there (48 px, batch 4, ngf 16, 3 residual blocks,
nearest upsampling; one thread, since `--jobs 2` runs the two GANs side by side) and with 2 threads;
then 64 px (batch 4, ngf 32, 6 blocks: the quick preset when issue 14 was filed) and 128 px (batch 1,
ngf 64, 9 blocks), 2 threads.

    python bench/bench_cyclegan.py                    # CPU
    python bench/bench_cyclegan.py --profile          # CPU: where the quick preset's step spends its time
    python bench/bench_cyclegan.py --device cuda      # GPU: 256 px, batch 1, ngf 64, 9 blocks, fp32 + bf16
    python bench/bench_cyclegan.py --device cpu --rehearse  # seconds: a tiny GAN, one step, both precisions

The results (bench/results/cyclegan_<device>.json) are rewritten after each row, atomically ("complete":
false until the last), so that a run stopped by a timeout keeps the rows done. --rehearse
(bench/gpu_check.sh --rehearse) writes under build/rehearsal/ instead, never bench/results/.
"""

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, rehearsal_dir, write_results  # noqa: E402
from melano import cyclegan as cg  # noqa: E402
from melano import gan  # noqa: E402
from melano.infra.precision import Precision  # noqa: E402
from melano import ops, pipeline  # noqa: E402
from melano.infra import kernels  # noqa: E402

EAGER = "eager"
# name: (MELANO_OPS, channels_last, plain nn.InstanceNorm2d modules, torch.compile)
CONFIGS = {"cl_fused": ("ext", True, False, False), "nchw_fused": ("ext", False, False, False),
           "nchw_eager": (EAGER, False, False, False), "cl_eager": (EAGER, True, False, False),
           "plain_nchw": (EAGER, False, True, False),
           "plain_cl": (EAGER, True, True, False), "cl_compiled": ("ext", True, False, True)}


def quick_gan() -> dict:
    """The quick preset's CycleGAN settings, read from the pipeline's defaults."""
    q = pipeline.make_config("quick")
    g = q.gan
    return dict(size=g.size, batch_size=g.batch_size, ngf=g.ngf, ndf=g.ndf, n_blocks=g.n_blocks,
                upsample=g.upsample, residual=g.residual, lambda_identity=g.lambda_identity)


# (CycleGANConfig fields, torch threads, also time cl_compiled)
CPU_SHAPES = [(quick_gan(), 1, True), (quick_gan(), 2, False),
              (dict(size=64, batch_size=4, ngf=32, ndf=32, n_blocks=6), 2, True),
              (dict(size=128, batch_size=1, ngf=64, ndf=64, n_blocks=9), 2, False)]
CUDA_SHAPES = [(dict(size=256, batch_size=1, ngf=64, ndf=64, n_blocks=9), None, False)]
# --rehearse: the CUDA run's code (its precisions: none and bf16) on a tiny GAN, one step of each kind.
# One thread: on a shared 2-core host two contending threads made it 30 times slower.
REHEARSAL_SHAPES = [(dict(size=32, batch_size=1, ngf=8, ndf=8, n_blocks=1), 1, False)]
PROFILE_SHAPES = [CPU_SHAPES[0], CPU_SHAPES[2]]  # the quick preset's GAN at 1 thread, and 64 px at 2


def plain(module: nn.Module) -> nn.Module:
    """A copy with every InstanceNormAct replaced by nn.InstanceNorm2d + its activation."""
    module = copy.deepcopy(module)
    for name, child in list(module.named_children()):
        if isinstance(child, ops.InstanceNormAct):
            act = {"relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(child.negative_slope), "none": nn.Identity()}
            setattr(module, name, nn.Sequential(nn.InstanceNorm2d(child.num_features, eps=child.eps),
                                                act[child.act]))
        else:
            setattr(module, name, plain(child))
    return module


def make_state(base: nn.ModuleDict, cfg, name: str, device, amp: str):
    _, channels_last, is_plain, compiled = CONFIGS[name]
    models = (plain(base) if is_plain else copy.deepcopy(base)).to(device)
    if channels_last:
        models = models.to(memory_format=torch.channels_last)
    adam = lambda a, b: torch.optim.Adam([*models[a].parameters(), *models[b].parameters()],  # noqa: E731
                                         lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_G, opt_D = adam("G_A", "G_B"), adam("D_A", "D_B")
    if compiled:  # the optimisers hold the same parameters: compile wraps, it does not copy
        models = nn.ModuleDict({k: torch.compile(v) for k, v in models.items()})
    pools = (gan.ImagePool(cfg.pool_size, torch.Generator().manual_seed(1)),
             gan.ImagePool(cfg.pool_size, torch.Generator().manual_seed(2)))
    return gan.GAN(models, opt_G, opt_D, *pools, torch.Generator().manual_seed(3), Precision(amp, device))


def run_steps(name: str, state, batches, cfg, sync: bool) -> dict:
    mode, channels_last, _, _ = CONFIGS[name]
    os.environ["MELANO_OPS"] = mode
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for a, b in batches:
        losses = gan.train_step(state, (a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)), cfg)
    if sync:
        torch.cuda.synchronize()
    return losses


def random_batches(cfg, steps: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` seeded (A, B) batches of images in [-1, 1]: the same in every configuration."""
    g = torch.Generator().manual_seed(0)
    shape = (cfg.batch_size, 3, cfg.size, cfg.size)
    return [(torch.rand(shape, generator=g).to(device) * 2 - 1, torch.rand(shape, generator=g).to(device) * 2 - 1)
            for _ in range(steps)]


def bench_shape(shape: dict, threads: int | None, compiled: bool, args, device, amp: str) -> dict:
    if threads:
        torch.set_num_threads(threads)
    cfg = cg.CycleGANConfig(**shape)
    batches = random_batches(cfg, args.steps, device)
    torch.manual_seed(cfg.seed)
    base = gan.build_models(cfg)
    names = [name for name, c in CONFIGS.items() if (compiled or not c[3])
             and (args.configs is None or name in args.configs or name == "nchw_eager")]
    states = {name: make_state(base, cfg, name, device, amp) for name in names}
    sync = device.type == "cuda"
    first, first_s = {}, {}
    for name in names:  # the first step: warm-up, and for cl_compiled the compilation
        t = time.perf_counter()
        first[name] = run_steps(name, states[name], batches[:1], cfg, sync)
        first_s[name] = time.perf_counter() - t
    ref = first["nchw_eager"]
    # Relative, with a floor: the residual generator starts as the identity, so its cycle losses start near 0.
    worst = max(abs(first[m][k] - ref[k]) / max(1e-2, abs(ref[k])) for m in first for k in ref)
    tol = 1e-3 if amp == "none" else 5e-2
    assert worst < tol, f"the configurations' losses differ (relative {worst:.2e}): {first}"
    times = {name: [] for name in states}
    for _ in range(args.rounds):
        for name in states:  # alternate, so that load changes hit every configuration
            t = time.perf_counter()
            run_steps(name, states[name], batches, cfg, sync)
            times[name].append((time.perf_counter() - t) / len(batches))
    it_s = {name: 1 / statistics.median(v) for name, v in times.items()}
    row = {**shape, "threads": torch.get_num_threads(), "amp": amp, "steps_per_round": args.steps,
           "rounds": args.rounds, "it_s": it_s, "first_step_s": first_s, "first_step_max_rel_loss_diff": worst}
    for a, b in [("cl_fused", "nchw_fused"), ("cl_fused", "cl_eager"), ("cl_fused", "plain_nchw"),
                 ("cl_fused", "plain_cl"), ("nchw_fused", "nchw_eager"), ("cl_fused", "nchw_eager"),
                 ("cl_compiled", "cl_fused")]:
        if a in it_s and b in it_s:
            row[f"ratio_{a}_over_{b}"] = it_s[a] / it_s[b]
    return row


# Groups of the profiler's ops, by the start of their names; the rest is "other".
PROFILE_GROUPS = {"conv forward": ("aten::mkldnn_convolution",), "conv backward": ("aten::convolution_backward",),
                  "instance norm + act": ("melano::inorm_act", "GeneratedBackwardFor_melano", "aten::native_batch_norm",
                                          "aten::relu", "aten::leaky_relu", "aten::threshold_backward"),
                  "reflection pad": ("aten::reflection_pad2d",), "upsample": ("aten::upsample_nearest2d",),
                  "optimizer": ("Optimizer.step", "aten::_foreach", "aten::lerp_", "aten::addcdiv_", "aten::sqrt")}


def profile_shape(shape: dict, threads: int, names: list[str], steps: int = 5) -> dict:
    """Self CPU milliseconds per step, by group, of each configuration (after one warm-up step)."""
    from torch.profiler import ProfilerActivity, profile
    torch.set_num_threads(threads)
    cfg = cg.CycleGANConfig(**shape)
    batches = random_batches(cfg, steps, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    base = gan.build_models(cfg)
    out = {}
    for name in names:
        state = make_state(base, cfg, name, torch.device("cpu"), "none")
        run_steps(name, state, batches[:1], cfg, False)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_steps(name, state, batches, cfg, False)
        ms = {group: 0.0 for group in [*PROFILE_GROUPS, "other"]}
        for e in prof.key_averages():
            group = next((k for k, starts in PROFILE_GROUPS.items() if e.key.startswith(starts)), "other")
            ms[group] += e.self_cpu_time_total / 1e3 / steps
        out[name] = {"ms_per_step": ms, "conv_share": (ms["conv forward"] + ms["conv backward"]) / sum(ms.values())}
        print(f"{name:>12}: " + "  ".join(f"{k} {v:.1f}" for k, v in ms.items())
              + f"  (ms/step; convolutions {out[name]['conv_share']:.0%})", flush=True)
    return {**shape, "threads": threads, "steps": steps, "configs": out,
            "note": "self CPU time under torch.profiler, which inflates Python-side costs"}


def arg_parser() -> argparse.ArgumentParser:
    """The options (also read by tests/test_bench_args.py, which parses gpu_check.sh's calls)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 3 CPU, 20 CUDA)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per configuration; median reported")
    p.add_argument("--amp", nargs="+", default=None, choices=["none", "bf16", "fp16"],
                   help="precisions (default: none on CPU; none and bf16 on CUDA)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile configuration")
    p.add_argument("--quick", action="store_true", help="CPU: only the quick preset's GAN (1 and 2 threads)")
    p.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                   help="the configurations to time (default: all; nchw_eager is always timed, as the reference)")
    p.add_argument("--name", default=None, help="results name (default cyclegan_cpu / cyclegan_cuda)")
    p.add_argument("--profile", action="store_true", help="instead of timing: profile the CPU shapes' fused steps "
                                                          "in both layouts (writes cyclegan_cpu_profile.json)")
    p.add_argument("--rehearse", action="store_true",
                   help="a dry run of the CUDA run's code in seconds (bench/gpu_check.sh --rehearse): a tiny GAN, "
                        "one step per round, one round, precisions none and bf16; writes under build/rehearsal/ "
                        "($MELANO_REHEARSAL_DIR), never bench/results/")
    return p


def main(argv: list[str] | None = None):
    args = arg_parser().parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.steps = args.steps or (20 if cuda else 3)
    if args.rehearse:
        args.steps, args.rounds, args.amp = 1, 1, args.amp or ["none", "bf16"]
    info = kernels.build()
    if ops.backend(device) != "ext":
        sys.exit(f"the fused op is not available for {device}: {info.error or info.cuda_reason}")
    if args.profile:
        if cuda:
            sys.exit("--profile profiles the CPU step; drop --device cuda")
        rows = [profile_shape(shape, threads, ["nchw_fused", "cl_fused"]) for shape, threads, _ in PROFILE_SHAPES]
        return write_results("cyclegan_cpu_profile", {"unit": "self CPU ms per step", "rows": rows})
    name = args.name or ("cyclegan_cuda" if cuda else "cyclegan_cpu")
    folder = rehearsal_dir() if args.rehearse else None  # None: bench/results/
    head = {"device": torch.cuda.get_device_name() if cuda else "cpu", "unit": "steps per second",
            "ops_build": {"cuda": info.cuda, "cached": info.cached}}
    if args.rehearse:
        head["note"] = "REHEARSAL (--rehearse): a tiny GAN, one step; the rates mean nothing"
    host = machine()  # once: it times a convolution
    rows = []
    print(f"{'size':>5}{'batch':>6}{'ngf':>5}{'thr':>4}{'amp':>6}" + "".join(f"{n:>12}" for n in CONFIGS)
          + f"{'cl/nchw':>9}{'cl f/e':>9}{'cl/plain':>9}{'compiled/cl':>12}{'nchw f/e':>12}")
    cpu_shapes = CPU_SHAPES[:2] if args.quick else CPU_SHAPES
    for shape, threads, compiled in REHEARSAL_SHAPES if args.rehearse else CUDA_SHAPES if cuda else cpu_shapes:
        for amp in args.amp or (["none", "bf16"] if cuda else ["none"]):
            r = bench_shape(shape, threads, compiled and not args.no_compile, args, device, amp)
            rows.append(r)
            rate = lambda n: f"{r['it_s'][n]:>12.3f}" if n in r["it_s"] else f"{'-':>12}"  # noqa: E731
            ratio = lambda k, w: f"{r[k]:>{w - 1}.2f}x" if k in r else f"{'-':>{w}}"  # noqa: E731
            print(f"{r['size']:>5}{r['batch_size']:>6}{r['ngf']:>5}{r['threads']:>4}{amp:>6}"
                  + "".join(rate(n) for n in CONFIGS) + ratio("ratio_cl_fused_over_nchw_fused", 9)
                  + ratio("ratio_cl_fused_over_cl_eager", 9) + ratio("ratio_cl_fused_over_plain_nchw", 9)
                  + ratio("ratio_cl_compiled_over_cl_fused", 12) + ratio("ratio_nchw_fused_over_nchw_eager", 12),
                  flush=True)
            # after each row (atomically): a timeout keeps the rows done
            write_results(name, {**head, "rows": rows, "complete": False}, folder, host, quiet=True)
    os.environ.pop("MELANO_OPS", None)
    write_results(name, {**head, "rows": rows, "complete": True}, folder, host)


if __name__ == "__main__":
    main()
