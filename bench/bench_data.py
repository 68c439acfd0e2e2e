"""Data benchmark: synthetic generator, cache build and loader throughput (images/s).

Each row compares two things measured in this run and reports their ratio:
  synth      generator images/s on one core vs the 200 images/s the issue requires;
  cache      build_cache with all cores vs one core (both include the JPEG decode);
  loader     an epoch from the uint8 cache vs decoding the JPEG for every item (no cache),
             and DataLoader worker counts 0 vs 2.

    python bench/bench_data.py                 # ~1 minute on 2 cores -> bench/results/data.json
    python bench/bench_data.py --calibrate     # a few minutes -> bench/results/data_calibration.json

--calibrate measures what the default --difficulty means: the oracle AUC of the hidden severity
(an upper bound for any classifier), a small CNN trained on balanced 64x64 images (a proxy for a
"good classifier on plenty of data"), and logistic regression on mean colour (a trivial
statistic, should be near 0.5). It needs scikit-learn (a test-only dependency).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from melano import data, synth  # noqa: E402
from melano.common import save_json, setup_logging  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {"cpus": data.default_workers(), "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "device": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_1min": __import__("os").getloadavg()[0]}  # other jobs share the cores


def rate(n: int, seconds: float) -> float:
    return n / max(seconds, 1e-9)


def bench_synth(n: int, size: int) -> dict:
    rows = synth.plan(n // 2, n - n // 2, seed=0)
    list(synth.render_rows(rows[:8], size, 0, synth.DEFAULT_DIFFICULTY))  # warm-up
    t = time.process_time()  # CPU time of this one process: one core, whatever else runs
    for _ in synth.render_rows(rows, size, 0, synth.DEFAULT_DIFFICULTY):
        pass
    ips = rate(n, time.process_time() - t)
    return {"images": n, "size": size, "images_per_s_one_core": ips, "required": 200.0, "ratio": ips / 200.0}


class JpegDataset(torch.utils.data.Dataset):
    """The no-cache baseline: decode, resize and normalise the JPEG for every item."""

    def __init__(self, index: data.Index, size: int):
        self.records, self.size = index.records, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        x = torch.from_numpy(data.load_image(self.records[i].path, self.size)).permute(2, 0, 1)
        return x.float().div_(255).sub_(0.5).div_(0.5), torch.tensor(float(self.records[i].target))


def epoch_rate(ds, batch_size: int, workers: int) -> float:
    loader = data.make_loader(ds, batch_size, shuffle=True, seed=0, workers=workers, pin_memory=False)
    t = time.perf_counter()
    n = sum(x.shape[0] for x, _ in loader)
    return rate(n, time.perf_counter() - t)


def run_bench(args) -> dict:
    torch.set_num_threads(1)
    out = {"machine": machine()}
    out["synth"] = bench_synth(args.synth_images, 128)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "isic"
        synth.generate(synth.SynthConfig(out=str(root), benign=args.images * 9 // 10,
                                         malignant=args.images - args.images * 9 // 10, size=256, seed=0))
        index = data.read_index(root)
        cache_rates = {}
        for w in (1, data.default_workers()):
            t = time.perf_counter()
            cache = data.build_cache(index, 128, Path(tmp) / f"cache{w}", workers=w)
            cache_rates[w] = rate(len(cache), time.perf_counter() - t)
        out["cache"] = {"images": len(index), "source_size": 256, "size": 128,
                        "images_per_s": {f"workers={w}": r for w, r in cache_rates.items()},
                        "ratio_all_cores_vs_one": cache_rates[data.default_workers()] / cache_rates[1]}
        ds = data.ClassifierDataset(cache, cache.names, (0.5,) * 3, (0.5,) * 3)
        loader = {f"cache, workers={w}": epoch_rate(ds, 64, w) for w in (0, 2)}
        loader["jpeg every item, workers=0"] = epoch_rate(JpegDataset(index, 128), 64, 0)
        out["loader"] = {"images": len(ds), "size": 128, "batch_size": 64, "images_per_s": loader,
                         "ratio_cache_vs_jpeg": loader["cache, workers=0"] / loader["jpeg every item, workers=0"],
                         "ratio_workers2_vs_0": loader["cache, workers=2"] / loader["cache, workers=0"],
                         "default_loader_workers": data.default_loader_workers()}
    print(f"{'what':<44}{'images/s':>12}")
    print(f"{'synth 128px, one core':<44}{out['synth']['images_per_s_one_core']:>12.0f}"
          f"   x{out['synth']['ratio']:.2f} vs the 200/s required")
    for k, v in out["cache"]["images_per_s"].items():
        print(f"{'cache build 256->128px, ' + k:<44}{v:>12.0f}")
    print(f"{'':<44}{'':>12}   x{out['cache']['ratio_all_cores_vs_one']:.2f} all cores vs one")
    for k, v in loader.items():
        print(f"{'loader 128px, ' + k:<44}{v:>12.0f}")
    print(f"{'':<44}{'':>12}   x{out['loader']['ratio_cache_vs_jpeg']:.1f} cache vs jpeg, "
          f"x{out['loader']['ratio_workers2_vs_0']:.2f} 2 workers vs 0")
    return out


# ----------------------------------------------------------------------------------------------
# Calibration of --difficulty

def _images(n_per_class: int, size: int, seed: int, difficulty: float):
    rows = synth.plan(n_per_class, n_per_class, seed=seed, difficulty=difficulty)
    x = np.stack([np.asarray(Image.open(io.BytesIO(b)))
                  for b in synth.render_rows(rows, size, seed, difficulty, workers=data.default_workers())])
    y = np.array([int(r["target"]) for r in rows])
    return x, y, synth.latent_severity(rows, seed, difficulty)


def _small_cnn(width: int) -> torch.nn.Module:
    nn = torch.nn

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.MaxPool2d(2))
    w = width
    return nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 8 * w),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * w, 1))


def cnn_auc(x: np.ndarray, y: np.ndarray, test: np.ndarray, epochs: int, seed: int = 0) -> float:
    """Train a small CNN (flips and quarter turns as augmentation) and return its test AUC."""
    from sklearn.metrics import roc_auc_score
    from melano.augment import traditional

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    X = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)
    train = np.setdiff1d(np.arange(len(x)), test)
    mean, std = X[train].mean((0, 2, 3), keepdim=True), X[train].std((0, 2, 3), keepdim=True)
    X = (X - mean) / std
    Y = torch.from_numpy(y).float()
    net = _small_cnn(16)
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    steps = epochs * (len(train) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    for _ in range(epochs):
        order = torch.from_numpy(train)[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order) - 63, 64):
            b = order[i:i + 64]
            xb = traditional(X[b], g, max_angle=0.0, crop_p=0.0)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xb).squeeze(1), Y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        xt = X[torch.from_numpy(test)]
        p = sum(net(xt.flip(3) if f else xt).squeeze(1) for f in (0, 1))
    return float(roc_auc_score(y[test], p.numpy()))


def run_calibration(args) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    def lr_auc(f, y):
        f = (f - f.mean(0)) / (f.std(0) + 1e-9)
        p = cross_val_predict(LogisticRegression(max_iter=1000), f, y, cv=5, method="predict_proba")[:, 1]
        return float(roc_auc_score(y, p))

    torch.set_num_threads(data.default_workers())
    results = []
    for d in args.difficulties:
        t = time.perf_counter()
        x, y, sev = _images(args.per_class, args.size, 11, d)
        test = np.random.default_rng(0).permutation(len(y))[: len(y) // 5]
        g = x.reshape(len(x), -1, 3).astype(np.float32)
        c = x[:, args.size // 4: 3 * args.size // 4, args.size // 4: 3 * args.size // 4].reshape(len(x), -1, 3)
        r = {"difficulty": d, "images": len(y), "size": args.size,
             "oracle_auc_all": float(roc_auc_score(y, sev)),
             "oracle_auc_test": float(roc_auc_score(y[test], sev[test])),
             "mean_rgb_lr_auc": lr_auc(g.mean(1), y),
             "mean_std_rgb_lr_auc": lr_auc(np.c_[g.mean(1), g.std(1)], y),
             "centre_mean_rgb_lr_auc": lr_auc(c.mean(1).astype(np.float64), y)}
        r["small_cnn_test_auc"] = cnn_auc(x, y, test, args.epochs)
        r["seconds"] = time.perf_counter() - t
        print(json.dumps(r), flush=True)
        results.append(r)
    return {"machine": machine(), "cnn": f"4 double-conv blocks, width 16, {args.epochs} epochs, "
                                          f"flips+rot90, 80/20 split", "results": results}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000, help="images in the cache/loader benchmark (1000)")
    p.add_argument("--synth-images", type=int, default=1000, help="images for the generator timing (1000)")
    p.add_argument("--calibrate", action="store_true", help="measure what --difficulty means instead")
    p.add_argument("--per-class", type=int, default=2500, help="calibration: images per class (2500)")
    p.add_argument("--size", type=int, default=64, help="calibration: image size (64)")
    p.add_argument("--epochs", type=int, default=8, help="calibration: CNN epochs (8)")
    p.add_argument("--difficulties", type=float, nargs="+", default=[synth.DEFAULT_DIFFICULTY],
                   help="calibration: difficulties to measure (default: the default)")
    args = p.parse_args(argv)
    setup_logging()
    if args.calibrate:
        save_json(run_calibration(args), RESULTS / "data_calibration.json")
    else:
        save_json(run_bench(args), RESULTS / "data.json")


if __name__ == "__main__":
    main()
