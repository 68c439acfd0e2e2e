"""Classifier training speed on CPU: Lite0 images/s at the pipeline's small sizes.

Three comparisons, each in the same run:
  1. one training step (forward, BCE, backward, AdamW) of melano's tf_efficientnet_lite0 with one
     logit, in NCHW (the baseline) against channels_last (what the classifier uses), at 1 and at
     the default number of torch threads;
  2. the same channels_last step at 1 thread with torch's own depthwise weight gradient (the
     baseline) against melano's `DepthwiseConv` (efficientnet/__init__.py), which the model uses
     where a plane is smaller than its kernel: at 48 px, the quick preset's size, that is 8 of the
     16 depthwise layers;
  3. the whole `melano.classifier.train` loop (cache reads, traditional augmentation, normalisation,
     the step) against the bare step of (1), on a synthetic folder: the data path's overhead.

    python bench/bench_classifier.py    # bench/results/classifier.json, about 2 minutes on 2 cores
"""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, time_it, write_results  # noqa: E402
from melano.classifier import ClassifierConfig, train  # noqa: E402
from melano import efficientnet as E  # noqa: E402
from melano.efficientnet import efficientnet  # noqa: E402
from melano.synth import SynthConfig, generate  # noqa: E402


def step_images_per_s(size: int, batch: int, channels_last: bool, threads: int, repeats: int,
                      torch_depthwise: bool = False) -> float:
    """Training images/s of one step; torch_depthwise: every conv through nn.Conv2d's own forward."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = efficientnet("tf_efficientnet_lite0", num_classes=1).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=fmt)
    y = (torch.rand(batch) < 0.3).float()

    def step():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    forward = E.Conv2d.forward
    if torch_depthwise:
        E.Conv2d.forward = torch.nn.Conv2d.forward
    try:
        return batch / time_it(step, repeats=repeats, warmup=2)
    finally:
        E.Conv2d.forward = forward


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[48, 64, 96], help="image sides to measure")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per case (median reported)")
    p.add_argument("--train-steps", type=int, default=20, help="steps of the end-to-end train() run")
    args = p.parse_args()
    default_threads = torch.get_num_threads()
    host = machine()  # before the timings: it measures the calibration convolution
    thread_counts = sorted({1, default_threads})

    rows = []
    print(f"{'size':>5}{'threads':>8}{'NCHW img/s':>12}{'NHWC img/s':>12}{'NHWC/NCHW':>11}")
    for size in args.sizes:
        for threads in thread_counts:
            base = step_images_per_s(size, args.batch_size, False, threads, args.repeats)
            ours = step_images_per_s(size, args.batch_size, True, threads, args.repeats)
            rows.append({"size": size, "threads": threads, "batch": args.batch_size,
                         "nchw_images_per_s": base, "channels_last_images_per_s": ours, "speedup": ours / base})
            print(f"{size:>5}{threads:>8}{base:>12.1f}{ours:>12.1f}{ours / base:>10.2f}x", flush=True)

    depthwise = []
    print(f"\n{'size':>5}{'torch dw img/s':>16}{'DepthwiseConv img/s':>21}{'ratio':>8}   (channels_last, 1 thread)")
    for size in args.sizes:
        base, ours = [], []
        for _ in range(3):  # interleaved, so that load from elsewhere hits both alike
            base.append(step_images_per_s(size, args.batch_size, True, 1, args.repeats, torch_depthwise=True))
            ours.append(step_images_per_s(size, args.batch_size, True, 1, args.repeats))
        base, ours = statistics.median(base), statistics.median(ours)
        depthwise.append({"size": size, "threads": 1, "batch": args.batch_size, "torch_depthwise_images_per_s": base,
                          "melano_depthwise_images_per_s": ours, "speedup": ours / base})
        print(f"{size:>5}{base:>16.1f}{ours:>21.1f}{ours / base:>7.2f}x", flush=True)
    torch.set_num_threads(default_threads)

    loop = []
    print(f"\n{'size':>5}{'train() img/s':>15}{'bare step img/s':>17}{'ratio':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in args.sizes:
            n = args.train_steps * args.batch_size
            data = tmp / f"data{size}"
            generate(SynthConfig(out=str(data), benign=int(0.8 * n) + 40, malignant=int(0.2 * n) + 20,
                                 size=size, seed=0, workers=2))
            cfg = ClassifierConfig(data=str(data), out=str(tmp / f"run{size}"), cache_dir=str(tmp / "cache"),
                                   size=size, batch_size=args.batch_size, epochs=3, max_steps=args.train_steps,
                                   augment="traditional", evaluate=False, workers=0)
            result = train(cfg)
            bare = next(r["channels_last_images_per_s"] for r in rows
                        if r["size"] == size and r["threads"] == default_threads)
            ratio = result.train_images_per_s / bare
            loop.append({"size": size, "batch": args.batch_size, "steps": result.steps,
                         "train_images_per_s": result.train_images_per_s, "bare_step_images_per_s": bare,
                         "ratio": ratio, "augment": "traditional", "threads": default_threads})
            print(f"{size:>5}{result.train_images_per_s:>15.1f}{bare:>17.1f}{ratio:>7.2f}x", flush=True)
    # Other jobs on a shared machine skew absolute numbers; record how busy it was.
    write_results("classifier", {"model": "tf_efficientnet_lite0 (1 logit)", "load_average_1min_at_end":
                                 os.getloadavg()[0], "step": rows, "depthwise_weight_gradient": depthwise,
                                 "train_loop": loop}, machine_info=host)


if __name__ == "__main__":
    main()
