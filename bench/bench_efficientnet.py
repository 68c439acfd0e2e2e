"""EfficientNet on CPU: melano vs timm's same model, forward and training-step images/s.

Both models hold the same weights (timm's random init, loaded into melano) and are checked to give the
same logits before anything is timed. Sizes: 224 (ImageNet) and 128 (the pipeline's working size),
in the default (NCHW) memory format and in channels_last, which oneDNN runs faster on CPU.
Timings alternate between the two models, round by round, so a busy machine slows both alike.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import write_results  # noqa: E402
from melano.efficientnet import efficientnet  # noqa: E402
from melano.pretrained import load_pretrained  # noqa: E402


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def build(name: str):
    import timm
    # One logit, as in the pipeline; the same dropout and stochastic depth in both.
    ref = timm.create_model(name, num_classes=1, drop_rate=0.2, drop_path_rate=0.2)
    ours = efficientnet(name, num_classes=1, drop_rate=0.2, drop_path_rate=0.2)
    load_pretrained(ours, ref.state_dict())
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), atol=1e-5, rtol=1e-5)
    return ours, ref


def step_fns(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def forward():
        model.eval()
        with torch.no_grad():
            model(x)

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return {"forward": forward, "train_step": train_step}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["tf_efficientnet_lite0", "efficientnet_b0"],
                   help="variants to time (melano and timm names agree)")
    p.add_argument("--sizes", nargs="+", type=int, default=[224, 128], help="square input sizes")
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--formats", nargs="+", default=["contiguous", "channels_last"],
                   choices=["contiguous", "channels_last"], help="memory formats of weights and inputs")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per model (median reported)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default). 1 keeps the ratio steady on a shared machine, "
                        "where oversubscribed thread pools make multi-threaded timings erratic")
    p.add_argument("--out", default="efficientnet", help="results name: bench/results/<out>.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Random-init nets in eval mode make denormal floats, far slower on x86 than real weights' values.
    torch.set_flush_denormal(True)
    torch.manual_seed(0)

    rows = []
    print(f"{'model':<24}{'size':>5}{'format':>15}{'mode':>12}{'melano img/s':>14}{'timm img/s':>12}"
          f"{'ratio':>8}")
    for name in args.models:
        ours, ref = build(name)
        for size, fmt in [(s, f) for s in args.sizes for f in args.formats]:
            memory_format = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}[fmt]
            ours, ref = ours.to(memory_format=memory_format), ref.to(memory_format=memory_format)
            x = torch.randn(args.batch, 3, size, size).to(memory_format=memory_format)
            y = (torch.rand(args.batch, 1) < 0.5).float()
            fns = {"melano": step_fns(ours, x, y), "timm": step_fns(ref, x, y)}
            for mode in ("forward", "train_step"):
                times = {"melano": [], "timm": []}
                for who in times:  # warm-up: allocator, oneDNN primitive caches
                    fns[who][mode]()
                for _ in range(args.rounds):
                    for who in times:
                        t = time.perf_counter()
                        fns[who][mode]()
                        times[who].append(time.perf_counter() - t)
                ips = {who: args.batch / statistics.median(ts) for who, ts in times.items()}
                ratio = ips["melano"] / ips["timm"]
                rows.append({"model": name, "size": size, "format": fmt, "batch": args.batch, "mode": mode,
                             "melano_img_s": round(ips["melano"], 2), "timm_img_s": round(ips["timm"], 2),
                             "ratio_melano_over_timm": round(ratio, 3)})
                print(f"{name:<24}{size:>5}{fmt:>15}{mode:>12}{ips['melano']:>14.1f}{ips['timm']:>12.1f}"
                      f"{ratio:>7.2f}x")
    geomean = statistics.geometric_mean(r["ratio_melano_over_timm"] for r in rows)
    print(f"geometric mean ratio melano/timm over {len(rows)} rows: {geomean:.3f}x")
    import timm
    write_results(args.out, {"cpu_model": cpu_model(), "timm": timm.__version__, "rounds": args.rounds,
                             "note": "CPU timings on a shared machine; ratio > 1 means melano is faster",
                             "geomean_ratio_melano_over_timm": round(geomean, 3), "rows": rows})


if __name__ == "__main__":
    main()
