"""Data benchmark: synthetic generator, cache build and loader throughput (images/s).

Each row compares two things measured in this run and reports their ratio:
  synth      generator images/s on one core vs the 250 images/s required (issue 21);
  cache      build_cache with all cores vs one core (both include the JPEG decode);
  loader     an epoch from the uint8 cache vs decoding the JPEG for every item (no cache),
             and DataLoader worker counts 0 vs 2.

    python bench/bench_data.py                      # ~1 minute on 2 cores -> bench/results/data.json
    python bench/bench_data.py --calibrate          # ~8 minutes -> bench/results/data_calibration.json
    python bench/bench_data.py --calibrate --quick  # ~2 minutes -> data_calibration_quick.json

--calibrate checks the generator (melano.synth, melano.lesions) against the published figures it
is built to match, at --difficulty (default: the default), in one run; every figure is recorded
with its target and whether it holds:
  1. criteria   from the hidden truth of 2 x 20000 lesions (no rendering): each of the 7-point
                checklist's criteria alone (presence as the score: AUC <= 0.80, rates, odds ratio),
                diameter alone (AUC about 0.6), A, B, C (n_colours), D and contour alone; the order
                (multicolour and asymmetry strongest, dots/globules weakest); the share of melanomas
                under 6 mm (~30%) and with a symmetric contour (~35%); the 7-point score and Stolz's
                TDS (AUC 0.80-0.92; 7-point >= 3: ~95% sensitivity, ~75% specificity; TDS > 4.75 and
                > 5.45 reported); the oracle, the hidden severity s (AUC 0.93-0.95);
  2. images     2 x 2000 rendered 64 px images, one 80/20 split: logistic regression on the mean RGB
                (5-fold CV, AUC < 0.6), a small CNN, and the packaged ImageNet EfficientNet-Lite0
                fine-tuned at 64 px (within 0.05 of the oracle's AUC on the same test images);
  3. control    the same images with skin where the lesion is (show_lesion=False): the same small
                CNN and mean-RGB regression (AUC about 0.5: the artefacts do not leak the label);
  4. texture    24 images at 1024 px (a lesion ~300-500 px across), grey-scale in [0, 1], 32 x 32
                patches: median gradient magnitude (real dermoscopy ~0.03) and per-patch RGB std
                (~0.04), on all, skin and lesion patches; the power-spectrum slope (reported);
  5. speed      generator images/s at 128 px on one core (CPU time), >= 250.
It needs scikit-learn (a test-only dependency) and the EfficientNet-Lite0 weights package.
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine as host_machine  # noqa: E402
from melano import data, lesions, synth  # noqa: E402
from melano.infra.cli import setup_logging  # noqa: E402
from melano.infra.files import atomic_write, json_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {"cpus": data.default_workers(), "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "device": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_1min": __import__("os").getloadavg()[0]}  # other jobs share the cores


def rate(n: int, seconds: float) -> float:
    return n / max(seconds, 1e-9)


def bench_synth(n: int, size: int, required: float = 250.0) -> dict:
    rows = synth.plan(n // 2, n - n // 2, seed=0)
    list(synth.render_rows(rows[:8], size, 0, synth.DEFAULT_DIFFICULTY))  # warm-up
    t = time.process_time()  # CPU time of this one process: one core, whatever else runs
    for _ in synth.render_rows(rows, size, 0, synth.DEFAULT_DIFFICULTY):
        pass
    ips = rate(n, time.process_time() - t)
    return {"images": n, "size": size, "images_per_s_one_core": ips, "required": required, "ratio": ips / required}


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
          f"   x{out['synth']['ratio']:.2f} vs the 250/s required")
    for k, v in out["cache"]["images_per_s"].items():
        print(f"{'cache build 256->128px, ' + k:<44}{v:>12.0f}")
    print(f"{'':<44}{'':>12}   x{out['cache']['ratio_all_cores_vs_one']:.2f} all cores vs one")
    for k, v in loader.items():
        print(f"{'loader 128px, ' + k:<44}{v:>12.0f}")
    print(f"{'':<44}{'':>12}   x{out['loader']['ratio_cache_vs_jpeg']:.1f} cache vs jpeg, "
          f"x{out['loader']['ratio_workers2_vs_0']:.2f} 2 workers vs 0")
    return out


# ----------------------------------------------------------------------------------------------
# Calibration: the generator against the published figures it is built to match

def figure(value, required: str, lo: float | None = None, hi: float | None = None, check: bool | None = None,
           **extra) -> dict:
    """One measured figure: its value, the target as text, and whether it holds (None: reported only)."""
    if check is None and (lo is not None or hi is not None):
        check = (lo is None or value >= lo) and (hi is None or value <= hi)
    return {"value": value, "required": required, "min": lo, "max": hi, "holds": check, **extra}


SINGLE_CUES = {  # name in the tables -> column of synth.truth (a score: higher suggests melanoma)
    **{c: c for c in lesions.SEVEN_POINT},
    "asymmetry_A": "asymmetry", "n_colours_C": "n_colours", "n_structures_D": None,
    "border_abrupt_B": "border_abrupt", "contour_asymmetric": "contour_asymmetric", "diameter_mm": "diameter_mm"}


def criteria_stats(per_class: int, seed: int, difficulty: float) -> dict:
    """Single-criterion AUCs, the scores of the 7-point checklist and of Stolz's ABCD rule, and the
    oracle, from the hidden truth of `per_class` nevi and as many melanomas (no rendering)."""
    from sklearn.metrics import roc_auc_score

    rows = synth.plan(per_class, per_class, seed=seed, difficulty=difficulty)
    truth = synth.truth(rows, seed, difficulty)
    y = np.array([int(r["target"]) for r in rows])
    col = lambda name: np.array([float(t[name]) for t in truth])  # noqa: E731
    mal, ben = y == 1, y == 0
    cues = {}
    for name, c in SINGLE_CUES.items():
        v = col(c) if c else sum(col(f"structure_{k}") for k in lesions.STRUCTURES)
        cue = {"auc": float(roc_auc_score(y, v))}
        if set(np.unique(v)) <= {0.0, 1.0}:  # a presence flag: its rates and odds ratio
            pb, pm = v[ben].mean(), v[mal].mean()
            cue.update(benign_rate=float(pb), melanoma_rate=float(pm),
                       odds_ratio=float(pm / (1 - pm) / (pb / (1 - pb))) if 0 < pb < 1 and 0 < pm < 1 else None)
        cues[name] = cue
    for k in lesions.COLOURS:  # Stolz's colours, each alone (reported, not checked)
        v = col(f"colour_{k}")
        cues[f"colour_{k}"] = {"auc": float(roc_auc_score(y, v)), "benign_rate": float(v[ben].mean()),
                               "melanoma_rate": float(v[mal].mean())}
    by_auc = sorted(SINGLE_CUES, key=lambda n: -cues[n]["auc"])
    seven = list(lesions.SEVEN_POINT)
    out = {"lesions_per_class": per_class, "seed": seed, "single": cues, "order_by_auc": by_auc}
    checks = {}
    for c in seven:
        checks[f"auc {c}"] = figure(cues[c]["auc"], "<= 0.80 (no single criterion decides)", hi=0.80)
    checks["auc diameter alone"] = figure(cues["diameter_mm"]["auc"], "about 0.6: [0.55, 0.65]", 0.55, 0.65)
    checks["auc asymmetry A alone"] = figure(cues["asymmetry_A"]["auc"], "<= 0.80", hi=0.80)
    checks["auc n_colours C alone"] = figure(cues["n_colours_C"]["auc"], "<= 0.80", hi=0.80)
    best = max(cues[n]["auc"] for n in SINGLE_CUES)
    checks["max single-cue auc"] = figure(best, "<= 0.80 (over the 7 criteria, A, B, C, D, contour, diameter)",
                                          hi=0.80, which=by_auc[0])
    top2 = set(by_auc[:2])
    checks["multicolour and asymmetry strongest"] = figure(
        " > ".join(by_auc[:3]) + " ...", "n_colours_C and asymmetry_A are the two highest single-cue AUCs",
        check=top2 == {"n_colours_C", "asymmetry_A"})
    weakest_auc = min(seven, key=lambda c: cues[c]["auc"])
    weakest_or = min(seven, key=lambda c: cues[c]["odds_ratio"] or np.inf)
    checks["dots/globules weakest (auc)"] = figure(weakest_auc, "irregular_dots has the lowest AUC of the 7 criteria",
                                                   check=weakest_auc == "irregular_dots")
    checks["dots/globules weakest (odds ratio)"] = figure(
        weakest_or, "irregular_dots has the lowest odds ratio of the 7 criteria", check=weakest_or == "irregular_dots")
    d = col("diameter_mm")
    checks["melanomas under 6 mm"] = figure(float((d[mal] < 6).mean()), "about 30%: [0.25, 0.35]", 0.25, 0.35)
    checks["melanomas with a symmetric contour"] = figure(float((col("contour_asymmetric")[mal] == 0).mean()),
                                                          "about 35%: [0.30, 0.40]", 0.30, 0.40)
    sp, tds = col("seven_point"), col("tds")
    checks["7-point score auc"] = figure(float(roc_auc_score(y, sp)), "[0.80, 0.92]", 0.80, 0.92)
    checks["7-point >= 3 sensitivity"] = figure(float((sp[mal] >= 3).mean()), "published ~95%: [0.90, 1.00]", 0.90)
    checks["7-point >= 3 specificity"] = figure(float((sp[ben] < 3).mean()), "published ~75%: [0.70, 0.80]",
                                                0.70, 0.80)
    checks["TDS auc"] = figure(float(roc_auc_score(y, tds)), "[0.80, 0.92]", 0.80, 0.92)
    for cut in (4.75, 5.45):
        checks[f"TDS > {cut} sensitivity"] = figure(float((tds[mal] > cut).mean()), "reported")
        checks[f"TDS > {cut} specificity"] = figure(float((tds[ben] <= cut).mean()), "reported")
    checks["oracle s auc (truth set)"] = figure(float(roc_auc_score(y, col("s"))), "[0.93, 0.95]", 0.93, 0.95)
    out["checks"] = checks
    return out


def _decode(stream) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in stream])


def _images(n_per_class: int, size: int, seed: int, difficulty: float):
    """Rendered images, the same with skin where the lesion is (the control), labels, severities."""
    rows = synth.plan(n_per_class, n_per_class, seed=seed, difficulty=difficulty)
    w = data.default_workers()
    x = _decode(synth.render_rows(rows, size, seed, difficulty, workers=w))
    xc = _decode(synth.render_rows(rows, size, seed, difficulty, workers=w, show_lesion=False))
    y = np.array([int(r["target"]) for r in rows])
    return x, xc, y, synth.latent_severity(rows, seed, difficulty)


def _small_cnn(width: int) -> torch.nn.Module:
    nn = torch.nn

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.MaxPool2d(2))
    w = width
    return nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 8 * w),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * w, 1))


def _fit(net, X, Y, train, epochs, batch, opt, sched, g) -> None:
    """Mini-batch BCE training with flips and quarter turns as augmentation."""
    from melano.augment import traditional

    net.train()
    for _ in range(epochs):
        order = torch.from_numpy(train)[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order) - batch + 1, batch):
            b = order[i:i + batch]
            xb = traditional(X[b], g, max_angle=0.0, crop_p=0.0)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xb).squeeze(1), Y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


def _score(net, X, y, test) -> float:
    """Test AUC of the mean logit over the image and its left-right mirror."""
    from sklearn.metrics import roc_auc_score

    net.eval()
    with torch.no_grad():
        xt = X[torch.from_numpy(test)]
        p = sum(torch.cat([net(xt[i:i + 256].flip(3) if f else xt[i:i + 256]) for i in range(0, len(xt), 256)])
                .squeeze(1) for f in (0, 1))
    return float(roc_auc_score(y[test], p.numpy()))


def cnn_auc(x: np.ndarray, y: np.ndarray, test: np.ndarray, epochs: int, seed: int = 0) -> float:
    """Train a small CNN (flips and quarter turns as augmentation) and return its test AUC."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    X = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)
    train = np.setdiff1d(np.arange(len(x)), test)
    mean, std = X[train].mean((0, 2, 3), keepdim=True), X[train].std((0, 2, 3), keepdim=True)
    X = (X - mean) / std
    net = _small_cnn(16)
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=max(1, epochs * (len(train) // 64)))
    _fit(net, X, torch.from_numpy(y).float(), train, epochs, 64, opt, sched, g)
    return _score(net, X, y, test)


def efficientnet_auc(x: np.ndarray, y: np.ndarray, test: np.ndarray, epochs: int, seed: int = 0,
                     batch: int = 32, lr: float = 1e-3) -> float:
    """Fine-tune the packaged ImageNet EfficientNet-Lite0 (one logit) at the images' size, as
    melano.classifier builds and normalises it: AdamW (no decay on biases and BatchNorm), one-cycle
    LR, flips and quarter turns; return its test AUC."""
    from melano.efficientnet import config
    from melano.pretrained import efficientnet

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cfg = config("tf_efficientnet_lite0")
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    X = ((torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255) - mean) / std).contiguous(
        memory_format=torch.channels_last)
    train = np.setdiff1d(np.arange(len(x)), test)
    net = efficientnet("tf_efficientnet_lite0", num_classes=1, pretrained=True).to(memory_format=torch.channels_last)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": 1e-2},
                             {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(1, epochs * (len(train) // batch)),
                                                pct_start=0.15)
    _fit(net, X, torch.from_numpy(y).float(), train, epochs, batch, opt, sched, g)
    return _score(net, X, y, test)


class _CaptureShape:
    """Records the lesion geometry `synth.render` computes (wraps synth._shape while active), so
    texture statistics can tell lesion patches from skin patches exactly."""

    def __enter__(self):
        self.shapes, self._orig = [], synth._shape

        def shape(*a, **k):
            geo = self._orig(*a, **k)
            self.shapes.append(geo)
            return geo
        synth._shape = shape
        return self

    def __exit__(self, *exc):
        synth._shape = self._orig


def _spectrum_slope(grey: np.ndarray, lo: float = 1 / 64, hi: float = 1 / 4) -> float:
    """Slope of log power against log frequency, radially averaged (Hann window), over lo-hi cycles/pixel."""
    n = grey.shape[0]
    win = np.hanning(n)
    f = np.fft.fftshift(np.abs(np.fft.fft2((grey - grey.mean()) * np.outer(win, win))) ** 2)
    yy, xx = np.indices(f.shape)
    r = np.hypot(yy - n // 2, xx - n // 2).astype(np.int64)
    power = np.bincount(r.ravel(), f.ravel()) / np.maximum(np.bincount(r.ravel()), 1)
    k = np.arange(len(power))
    sel = (k >= lo * n) & (k <= hi * n)
    return float(np.polyfit(np.log(k[sel] / n), np.log(power[sel]), 1)[0])


def texture_stats(n: int, size: int, seed: int, difficulty: float, patch: int = 32) -> dict:
    """Texture at dermoscopic scale on grey-scale intensity in [0, 1] (ITU-R 601 luma): per 32x32
    patch the mean gradient magnitude (np.gradient) and the RGB standard deviation (mean of the
    three channels' stds, in [0, 1] units); medians over all patches, skin patches (no lesion, inside
    the scope's field) and lesion patches (the lesion's mask > 0.5 throughout). And the radially
    averaged power-spectrum slope of each whole image (median over images)."""
    rows = synth.plan(n - n // 2, n // 2, seed=seed, difficulty=difficulty)
    with _CaptureShape() as cap:
        images = _decode(synth.render_rows(rows, size, seed, difficulty, workers=1))
    X, Y = np.meshgrid(*(((np.arange(size) + 0.5) / size * 2 - 1,) * 2), indexing="xy")
    r = np.hypot(X, Y)
    q = size // patch
    tiles = lambda a: a[:q * patch, :q * patch].reshape(q, patch, q, patch, *a.shape[2:]).swapaxes(1, 2)  # noqa: E731
    stats = {k: {"gradient": [], "rgb_std": []} for k in ("all", "skin", "lesion")}
    slopes, grad_pixels = [], []
    for img, geo in zip(images, cap.shapes):
        rgb = img.astype(np.float32) / 255
        grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
        gy, gx = np.gradient(grey)
        mag = np.sqrt(gx * gx + gy * gy)
        grad_pixels.append(np.median(mag))
        mask = np.zeros((size, size), np.float32)
        mask[geo.ys, geo.xs] = geo.mask
        g = tiles(mag).mean((2, 3)).ravel()
        s = tiles(rgb).std((2, 3)).mean(-1).ravel()
        lesion = (tiles(mask).min((2, 3)) > 0.5).ravel()
        skin = ((tiles(mask).max((2, 3)) < 0.02) & (tiles(r).max((2, 3)) < 0.97)).ravel()
        for k, sel in (("all", np.ones_like(lesion)), ("skin", skin), ("lesion", lesion)):
            stats[k]["gradient"].extend(g[sel])
            stats[k]["rgb_std"].extend(s[sel])
        slopes.append(_spectrum_slope(grey))
    out = {"images": n, "size": size, "patch": patch, "seed": seed,
           "patches": {k: len(v["gradient"]) for k, v in stats.items()},
           "median_pixel_gradient_all": float(np.median(grad_pixels)),
           "spectrum_band_cycles_per_pixel": [1 / 64, 1 / 4],
           "old_generator": {"gradient": 0.008, "rgb_std": "0.015-0.019"}}
    checks = {}
    for k in ("all", "skin", "lesion"):
        checks[f"median patch gradient ({k})"] = figure(float(np.median(stats[k]["gradient"])),
                                                        "real ~0.03: [0.02, 0.045]", 0.02, 0.045)
        checks[f"median patch rgb std ({k})"] = figure(float(np.median(stats[k]["rgb_std"])),
                                                       "real ~0.04: [0.027, 0.06]", 0.027, 0.06)
    checks["power-spectrum slope (median)"] = figure(float(np.median(slopes)),
                                                     "reported (natural images ~ -2)",
                                                     range=[float(min(slopes)), float(max(slopes))])
    out["checks"] = checks
    return out


def run_calibration(args) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    def lr_auc(f, y):
        f = (f - f.mean(0)) / (f.std(0) + 1e-9)
        p = cross_val_predict(LogisticRegression(max_iter=1000), f, y, cv=5, method="predict_proba")[:, 1]
        return float(roc_auc_score(y, p))

    torch.set_num_threads(data.default_workers())
    d, t0, seconds = args.difficulty, time.perf_counter(), {}
    mark = lambda k, t: seconds.__setitem__(k, round(time.perf_counter() - t, 1))  # noqa: E731

    t = time.perf_counter()
    crit = criteria_stats(args.truth_per_class, 101, d)
    mark("criteria", t)
    print(f"criteria from {2 * args.truth_per_class} lesions: {seconds['criteria']} s", flush=True)

    t = time.perf_counter()
    x, xc, y, sev = _images(args.per_class, args.size, 11, d)
    test = np.random.default_rng(0).permutation(len(y))[: len(y) // 5]
    mark("render", t)
    mean_rgb = lambda a: a.reshape(len(a), -1, 3).mean(1)  # noqa: E731
    g = x.reshape(len(x), -1, 3).astype(np.float32)
    c = x[:, args.size // 4: 3 * args.size // 4, args.size // 4: 3 * args.size // 4].reshape(len(x), -1, 3)
    oracle_test = float(roc_auc_score(y[test], sev[test]))
    img = {"images": len(y), "size": args.size, "seed": 11, "test_images": len(test),
           "split": "80/20, the same test images for every model",
           "small_cnn": f"4 double-conv blocks, width 16, {args.epochs} epochs, batch 64, AdamW one-cycle 3e-3, "
                        f"flips+rot90, flip TTA",
           "efficientnet": f"tf_efficientnet_lite0, packaged ImageNet weights, {args.eff_epochs} epochs at "
                           f"{args.size} px, batch 32, AdamW 1e-3 one-cycle, wd 1e-2, flips+rot90, flip TTA",
           "extra": {"mean_std_rgb_lr_auc": lr_auc(np.c_[g.mean(1), g.std(1)], y),
                     "centre_mean_rgb_lr_auc": lr_auc(c.mean(1).astype(np.float64), y)}}
    checks = {"oracle s auc (image set, all)": figure(float(roc_auc_score(y, sev)), "[0.93, 0.95]", 0.93, 0.95),
              "oracle s auc (test images)": figure(oracle_test, "[0.93, 0.95]", 0.93, 0.95),
              "mean RGB LR auc (5-fold)": figure(lr_auc(mean_rgb(x), y), "< 0.6", hi=0.6)}
    print(f"rendered {len(y)} + {len(y)} control images at {args.size} px: {seconds['render']} s", flush=True)

    t = time.perf_counter()
    checks["small CNN auc"] = figure(cnn_auc(x, y, test, args.epochs), "reported (old generator 0.885)")
    mark("small_cnn", t)
    print(f"small CNN: {checks['small CNN auc']['value']:.3f} in {seconds['small_cnn']} s", flush=True)
    t = time.perf_counter()
    eff = efficientnet_auc(x, y, test, args.eff_epochs)
    mark("efficientnet", t)
    checks["EfficientNet-Lite0 auc"] = figure(eff, f"within 0.05 of the oracle's {oracle_test:.3f} on the same "
                                                   f"test images: >= {oracle_test - 0.05:.3f}", oracle_test - 0.05)
    print(f"EfficientNet-Lite0: {eff:.3f} in {seconds['efficientnet']} s", flush=True)
    img["checks"] = checks

    t = time.perf_counter()
    control = {"what": "the same images with skin where the lesion is (render show_lesion=False): skin, "
                       "artefacts and optics only", "checks": {
                           "small CNN auc": figure(cnn_auc(xc, y, test, args.epochs), "about 0.5: [0.45, 0.55]",
                                                   0.45, 0.55),
                           "mean RGB LR auc (5-fold)": figure(lr_auc(mean_rgb(xc), y), "about 0.5: [0.45, 0.55]",
                                                              0.45, 0.55)}}
    mark("control_cnn", t)
    print(f"control: small CNN {control['checks']['small CNN auc']['value']:.3f} in {seconds['control_cnn']} s",
          flush=True)
    del x, xc

    t = time.perf_counter()
    tex = texture_stats(args.texture_images, args.texture_size, 12, d)
    mark("texture", t)

    t = time.perf_counter()
    sp = bench_synth(args.synth_images, 128, required=250.0)
    mark("speed", t)
    speed = {**sp, "checks": {"images/s at 128 px, one core": figure(
        sp["images_per_s_one_core"], ">= 250 (CPU time of this process)", 250.0)}}
    seconds["total"] = round(time.perf_counter() - t0, 1)
    return {"difficulty": d, "quick": args.quick, "seconds": seconds, "criteria": crit, "images": img,
            "control": control, "texture": tex, "speed": speed}


def print_calibration(res: dict) -> None:
    parts = ("criteria", "images", "control", "texture", "speed")
    print(f"\n{'figure':<40}{'measured':>10}  holds  target")
    for part in parts:
        print(f"-- {part}")
        for name, f in res[part]["checks"].items():
            v = f["value"]
            v = f"{v:.3f}" if isinstance(v, float) else str(v)
            holds = {True: "yes", False: "NO", None: "-"}[f["holds"]]
            if len(v) > 10:  # a name or an ordering: on its own line
                print(f"{name:<40}{'':>10}  {holds:<5}  {f['required']}\n{'':<6}{v}")
            else:
                print(f"{name:<40}{v:>10}  {holds:<5}  {f['required']}")
    failed = [f"{p}: {n}" for p in parts for n, f in res[p]["checks"].items() if f["holds"] is False]
    print(f"\nnot holding ({len(failed)}): " + ("; ".join(failed) or "none"))
    print(f"seconds: {res['seconds']}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000, help="images in the cache/loader benchmark (1000)")
    p.add_argument("--synth-images", type=int, default=1000, help="images for the generator timing (1000)")
    p.add_argument("--calibrate", action="store_true", help="check the generator against its targets instead")
    p.add_argument("--quick", action="store_true",
                   help="calibration, shrunk for iteration: 2 x 600 images, 2 epochs, 2 x 5000 lesions' truth, "
                        "6 texture images, 300 timed images -> data_calibration_quick.json")
    p.add_argument("--truth-per-class", type=int, default=20000,
                   help="calibration: lesions per class for the criterion statistics (20000)")
    p.add_argument("--per-class", type=int, default=2000, help="calibration: rendered images per class (2000)")
    p.add_argument("--size", type=int, default=64, help="calibration: image size (64)")
    p.add_argument("--epochs", type=int, default=6, help="calibration: small CNN epochs (6)")
    p.add_argument("--eff-epochs", type=int, default=5, help="calibration: EfficientNet-Lite0 epochs (5)")
    p.add_argument("--texture-images", type=int, default=24, help="calibration: images for texture statistics (24)")
    p.add_argument("--texture-size", type=int, default=1024, help="calibration: their size (1024)")
    p.add_argument("--difficulty", type=float, default=synth.DEFAULT_DIFFICULTY,
                   help="calibration: the difficulty to measure (default: the default)")
    args = p.parse_args(argv)
    if args.quick:
        args.truth_per_class, args.per_class, args.epochs, args.eff_epochs = 5000, 600, 2, 2
        args.texture_images, args.synth_images = 6, 300
    setup_logging()
    if args.calibrate:
        res = run_calibration(args)
        print_calibration(res)
        name = "data_calibration_quick" if args.quick else "data_calibration"
        atomic_write(RESULTS / f"{name}.json", json_text(
            {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": host_machine(), **res}))
        print(f"wrote {RESULTS / f'{name}.json'}")
    else:
        atomic_write(RESULTS / "data.json", json_text(run_bench(args)))


if __name__ == "__main__":
    main()
