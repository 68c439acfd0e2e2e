"""The quality stage on the 2-core box: encoder speed, the whole stage at the quick preset's size,
and the format shortcut before and after `melano.encode.save_like`.

1. encoder   ImageNet Lite0 features at 224 px: the plain model vs quality.Encoder (BatchNorm folded
             into the convolutions, channels_last); images/s of wall time and per CPU-second.
2. stage     quality_stage.evaluate on data shaped like the quick preset (the built-in set at 96 px, 4000
             benign / 400 malignant, cached at 64 px, split 70/15/15) with two arms of translations
             as many as the pipeline makes (one arm the benign sources redrawn as melanomas, one the
             sources themselves); wall time per part.
3. format    can a logistic regression tell real training melanomas from "translations" by their
             file? The translations are the same kind of lesion as the real melanomas (benign sources
             redrawn with a melanoma's severity at 96 px and shrunk to the GAN's 64 px, as a GAN
             outputs them), written the old way (JPEG q95 4:4:4 at 64 px), with the source's JPEG
             settings after plain bicubic enlarging, or with encode.save_like; all read back with
             data.load_image at 64 px. References: the same 64 px pixels never encoded, and the
             lesions written exactly as the real files are (the floor). The two-sample AUC on the
             stage's pixel features (quality.pixel_features at 16 and 64) and on Lite0 features.

    python bench/bench_quality.py [--work /tmp/melano-bench-quality] [--skip-stage]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import write_results  # noqa: E402
from melano import data, encode, quality, quality_stage, synth  # noqa: E402
from melano.pretrained import efficientnet  # noqa: E402

BENIGN, MALIGNANT, DATA_SIZE, GAN_SIZE, SEED = 4000, 400, 96, 64, 0


def encoder_speed(images: np.ndarray) -> dict:
    enc = quality_stage.imagenet_encoder()
    plain = efficientnet("tf_efficientnet_lite0", pretrained=True).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate((x - 127.0) / 128.0, size=(224, 224), mode="bilinear", align_corners=False)
    rows = {}
    for name, fn in (("plain model", lambda: [plain.forward_features(x[i:i + 32]) for i in range(0, len(x), 32)]),
                     ("quality.Encoder", lambda: enc(images))):
        with torch.inference_mode():
            fn()  # warm-up
            c, t = time.process_time(), time.perf_counter()
            fn()
            c, t = time.process_time() - c, time.perf_counter() - t
        rows[name] = {"images_per_s": len(images) / t, "images_per_cpu_s": len(images) / c}
        print(f"{name:<18} {rows[name]['images_per_s']:6.1f} images/s  {rows[name]['images_per_cpu_s']:6.1f} per CPU-s")
    ratio = rows["quality.Encoder"]["images_per_cpu_s"] / rows["plain model"]["images_per_cpu_s"]
    print(f"speed-up (per CPU-s): {ratio:.2f}x")
    return {"images": len(images), "resolution": 224, "input_size": images.shape[1], "rows": rows,
            "speedup_per_cpu_s": ratio}


def build(work: Path) -> dict:
    """The quick preset's data: folder, 64 px cache, split; and the translations' raw pixels."""
    root = work / "data"
    if not (root / "train.csv").exists():
        synth.generate(synth.SynthConfig(out=str(root), benign=BENIGN, malignant=MALIGNANT, size=DATA_SIZE,
                                         seed=SEED, workers=data.default_workers()))
    index = data.read_index(root)
    cache = data.build_cache(index, GAN_SIZE, work / "cache")
    split = data.make_split(cache, work / "splits.csv", 0.15, 0.15, SEED)
    where = {n: s for s, names in split.items() for n in names}
    splits = np.array([where[n] for n in cache.names])
    labels = cache.targets
    sources = np.flatnonzero((labels == 0) & (splits == "train"))
    n_syn = sources.size - int(((labels == 1) & (splits == "train")).sum())  # the pipeline's balance
    sources = np.sort(np.random.default_rng(SEED).choice(sources, n_syn, replace=False))
    plan = {r["image_name"]: r for r in synth.plan(BENIGN, MALIGNANT, SEED)}
    raw, full = [], []
    for row in sources:  # the same lesion as the source, with a melanoma's severity, at the GAN's size
        r = plan[cache.names[row]]
        draw = np.random.default_rng([SEED, 1, r["_index"]])
        synth.severity(draw, False, synth.DEFAULT_DIFFICULTY)
        s = synth.severity(np.random.default_rng([SEED, 4, r["_index"]]), True, synth.DEFAULT_DIFFICULTY)
        les = synth.lesions.draw(draw, s, True)
        acq = synth.acquisition(SEED, r["_index"], False, 0, 0.0)
        full.append(synth.render(draw, DATA_SIZE, les, r["_patient"], acq))
        img = Image.fromarray(full[-1])  # shrunk as data.load_image shrinks the real files
        raw.append(np.asarray(img.resize((GAN_SIZE, GAN_SIZE), Image.Resampling.BILINEAR, box=(0, 0, DATA_SIZE, DATA_SIZE))))
    paths = {r.image_name: r.path for r in index.records}
    return {"cache": cache, "labels": labels, "splits": splits, "sources": sources, "raw": np.stack(raw),
            "full": np.stack(full),
            "source_paths": [paths[cache.names[i]] for i in sources], "severity": quality_stage.hidden_severity(root)}


def _written(img: Image.Image, path: Path, **settings) -> np.ndarray:
    """Write img as a JPEG file, then read it the way the pipeline reads every image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", **settings)
    return data.load_image(path, GAN_SIZE)


def format_shortcut(b: dict, work: Path, encoder: quality.Encoder) -> dict:
    variants = {k: [] for k in ("real files' pipeline", "never encoded", "old: q95 4:4:4 at 64 px",
                                "source tables, bicubic enlarging", "new: encode.save_like")}
    for i, (img, full, src) in enumerate(zip(b["raw"], b["full"], b["source_paths"])):
        with Image.open(src) as s:
            settings = encode.jpeg_settings(s)
        v = iter(variants.values())
        next(v).append(_written(Image.fromarray(full), work / "real" / f"{i}.jpg", **settings))  # the floor
        next(v).append(img)
        next(v).append(_written(Image.fromarray(img), work / "old" / f"{i}.jpg", quality=95, subsampling=0))
        next(v).append(_written(Image.fromarray(img).resize((DATA_SIZE, DATA_SIZE), Image.Resampling.BICUBIC),
                                work / "bicubic" / f"{i}.jpg", **settings))
        next(v).append(data.load_image(encode.save_like(Image.fromarray(img), src, work / "new" / f"syn_{i}"),
                                       GAN_SIZE))
    labels, splits, cache = b["labels"], b["splits"], b["cache"]
    mel = np.flatnonzero((labels == 1) & (splits == "train"))
    real, patients = np.array(cache.images[mel]), np.asarray(cache.patients)
    groups_real, groups_syn = patients[mel], patients[b["sources"]]
    pick = np.sort(np.random.default_rng(1).choice(len(b["raw"]), len(mel), replace=False))  # as many as real
    f_real = encoder(real)
    out = {}
    for name, imgs in variants.items():
        imgs = np.stack(imgs)
        row = {}
        for size in (16, 64):
            row[f"pixels_{size}"] = quality.two_sample_auc(quality.pixel_features(real, size),
                                                           quality.pixel_features(imgs, size), groups_real,
                                                           groups_syn, l2=100.0)["auc"]
        row["features"] = quality.two_sample_auc(f_real, encoder(imgs[pick]), groups_real, groups_syn[pick],
                                                 l2=100.0)["auc"]
        out[name] = row
        print(f"{name:<34} pixels 16x16 AUC {row['pixels_16']:.3f}  64x64 {row['pixels_64']:.3f}  "
              f"features {row['features']:.3f}")
    return {"real_melanomas": len(mel), "translations": len(b["raw"]), "translations_encoded_for_features": len(pick),
            "two_sample_auc": out,
            "note": "real files' pipeline = the same lesions written as the real files are (JPEG at 96 px "
                    "with the source's settings), the floor any encoding can reach"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/melano-bench-quality", help="scratch folder (data, cache, files)")
    p.add_argument("--skip-stage", action="store_true", help="skip the whole-stage timing")
    p.add_argument("--skip-format", action="store_true", help="skip the format-shortcut measurement")
    args = p.parse_args()
    work = Path(args.work)
    t = time.perf_counter()
    b = build(work)
    print(f"data and raw translations: {time.perf_counter() - t:.0f} s")
    result = {"encoder": encoder_speed(np.array(b["cache"].images[:64]))}
    cache = b["cache"]
    if not args.skip_stage:
        arms = {"redrawn": quality_stage.Synthetic(b["raw"], b["sources"]),
                "identity": quality_stage.Synthetic(np.array(cache.images[b["sources"]]), b["sources"])}
        sev = np.array([b["severity"][n] for n in cache.names])
        quality.fit_logistic(np.eye(4), np.array([0, 0, 1, 1]))  # torch.optim's one-off import, paid earlier in a pipeline
        t = time.perf_counter()
        res = quality_stage.evaluate(cache.images, b["labels"], cache.patients, b["splits"], arms, severity=sev,
                                     out_dir=work / "pictures")
        wall = time.perf_counter() - t
        print(f"stage: {wall:.1f} s ({res['timings_s']['features']:.1f} s encoding {res['sets']['encoded_images']} "
              f"images at {res['timings_s']['images_per_s']:.1f}/s)")
        result["stage"] = {"wall_s": wall, "budget_s": 60, "timings_s": res["timings_s"], "sets": res["sets"],
                           "translations_per_arm": len(b["sources"]),
                           "severity_r2_val": res["severity_regressor"]["r2_val"],
                           "arms": {a: {"kid_synthetic": v["distances"]["synthetic_vs_real_mel_train"]["kid"]["mean"],
                                        "kid_sources": v["distances"]["sources_vs_real_mel_train"]["kid"]["mean"],
                                        "two_sample_features": v["two_sample"]["features"]["synthetic"]["auc"],
                                        "predicted_severity_shift": v["severity"]["predicted_shift"]["mean"]}
                                    for a, v in res["arms"].items()}}
        (work / "stage_result.json").write_text(json.dumps(res, indent=1))
    if not args.skip_format:
        result["format"] = format_shortcut(b, work, quality_stage.imagenet_encoder())
    result["load_average_1min"] = float(open("/proc/loadavg").read().split()[0])
    write_results("quality", result)


if __name__ == "__main__":
    main()
