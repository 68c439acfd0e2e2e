"""Does the classifier look at the lesion? Grad-CAM on built-in data, where the lesion is known.

A small classifier (ImageNet Lite0, fine-tuned) is trained on the built-in set; on its held-out
test split, each image's Grad-CAM of the last stage (melano.saliency) is compared with the lesion's
outline as the renderer draws it (melano.synth.lesion_mask):

    energy share   the share of the map's mass inside the lesion (soft mask), against the lesion's
                   share of the image (what a map blind to the lesion would score): ratio and the
                   mean paired difference with a normal 95% CI, over the test images
    pointing game  does the map's maximum fall inside the lesion (mask > 0.5)? against the share
                   of the image inside it (chance for a peak placed at random)

Writes bench/results/saliency.json (with host_info) and bench/results/saliency_overlap.png.
About 5 CPU-minutes with the defaults (2.5 min on 2 idle cores; 7.5 min on a shared, loaded host).

    python bench/bench_saliency.py [--work /tmp/melano-bench-saliency] [--steps 120]
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS, host_info, write_results  # noqa: E402
from melano import data, saliency, synth  # noqa: E402
from melano.classifier import ClassifierConfig, inference, train  # noqa: E402
from melano.pixels import to_tensor  # noqa: E402


def arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/melano-bench-saliency", help="scratch folder (data, run, cache)")
    p.add_argument("--benign", type=int, default=500, help="benign images of the built-in set (500)")
    p.add_argument("--malignant", type=int, default=250, help="melanomas of the built-in set (250)")
    p.add_argument("--size", type=int, default=96, help="image side, data and model (96: a 3x3 last stage)")
    p.add_argument("--steps", type=int, default=120, help="classifier training steps (120)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed (0)")
    p.add_argument("--out", default=str(RESULTS), help="folder for saliency.json and saliency_overlap.png")
    p.add_argument("--reuse", action="store_true", help="measure the classifier an earlier run left in --work "
                                                        "(same options) instead of training one")
    return p


def mean_ci(x: np.ndarray) -> list[float]:
    """[mean, low, high]: a normal 95% CI of the mean."""
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    return [float(x.mean()), float(x.mean() - half), float(x.mean() + half)]


def measure(args, rows: list[dict], run: Path, cache: data.Cache) -> dict:
    """Grad-CAM of best.pt on its test split, against each image's lesion mask."""
    names, y, probs = inference.report.read_predictions(run / "test_predictions.csv")
    by_name = {r["image_name"]: r for r in rows}
    masks = torch.from_numpy(np.stack([synth.lesion_mask(by_name[n], args.size, args.seed) for n in names]))
    model, norm, _ = inference.load_classifier(run / "best.pt", "cpu")
    images = np.asarray(cache.images[cache.rows(names)])
    sign = torch.from_numpy(np.where(y == 1, 1.0, -1.0))  # each image's own class: benign's score is -logit
    cams = torch.cat([saliency.grad_cam(model, model.head, norm(to_tensor(images[i:i + 64])), sign=sign[i:i + 64])[0]
                      for i in range(0, len(names), 64)])
    energy, area = saliency.energy_share(cams, masks).numpy(), saliency.area_share(masks).numpy()
    hit, chance = saliency.pointing_game(cams, masks).numpy(), (masks > 0.5).double().mean((1, 2)).numpy()
    ok = np.isfinite(energy)  # an all-zero map has no mass to place
    groups = {"all": ok, "melanoma": ok & (y == 1), "benign": ok & (y == 0)}
    out = {g: {"images": int(m.sum()), "energy_share": mean_ci(energy[m]), "area_share": float(area[m].mean()),
               "energy_over_area": float(energy[m].mean() / area[m].mean()),
               "energy_minus_area": mean_ci(energy[m] - area[m]), "pointing_game": float(hit[m].mean()),
               "pointing_chance": float(chance[m].mean())} for g, m in groups.items()}
    out["zero_maps"] = int((~ok).sum())
    return {"summary": out, "per_image": {"energy": energy, "area": area, "y": y, "probs": probs}}


def figure(per: dict, summary: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(9, 4))
    for cls, colour, label in ((0, "tab:blue", "benign"), (1, "tab:red", "melanoma")):
        m = (per["y"] == cls) & np.isfinite(per["energy"])
        ax[0].scatter(per["area"][m], per["energy"][m], s=10, c=colour, alpha=0.6, label=label)
    ax[0].plot([0, 1], [0, 1], "k--", lw=1, label="a map blind to the lesion")
    ax[0].set(xlabel="lesion's share of the image", ylabel="share of Grad-CAM mass inside the lesion",
              xlim=(0, 1), ylim=(0, 1.02), title="energy inside the lesion")
    ax[0].legend(fontsize=8, loc="lower right")
    groups = ["all", "melanoma", "benign"]
    at = np.arange(len(groups))
    ax[1].bar(at - 0.2, [summary[g]["pointing_game"] for g in groups], 0.4, label="Grad-CAM peak in lesion")
    ax[1].bar(at + 0.2, [summary[g]["pointing_chance"] for g in groups], 0.4, label="chance (lesion area)")
    ax[1].set(xticks=at, xticklabels=groups, ylim=(0, 1.3), yticks=np.linspace(0, 1, 6), title="pointing game")
    ax[1].legend(fontsize=8, loc="upper center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = arg_parser().parse_args(argv)
    torch.set_num_threads(2)
    host = host_info()
    work, t0 = Path(args.work), time.perf_counter()
    cfg = ClassifierConfig(data=str(work / "data"), out=str(work / "run"), cache_dir=str(work / "cache"),
                           size=args.size, batch_size=32, max_steps=args.steps, val_every=args.steps, lr=1e-3,
                           pretrained=True, threads=2, workers=0, device="cpu", seed=args.seed, force=True)
    if args.reuse:
        rows = synth.plan(args.benign, args.malignant, args.seed)
        run = json.loads((work / "run" / "result.json").read_text())
        auc, best_step, t_data, t_train = run["test"]["auc"], run["best_step"], 0.0, 0.0
    else:
        rows = synth.generate(synth.SynthConfig(out=str(work / "data"), benign=args.benign, malignant=args.malignant,
                                                size=args.size, seed=args.seed, force=True, workers=2))
        t_data = time.perf_counter() - t0
        result = train(cfg)
        auc, best_step, t_train = result.test["auc"], result.best_step, time.perf_counter() - t0 - t_data
    cache = data.build_cache(data.read_index(cfg.data), args.size, cfg.cache_dir)
    m = measure(args, rows, Path(cfg.out), cache)
    s = m["summary"]
    for g in ("all", "melanoma", "benign"):
        r = s[g]
        print(f"{g:<9} n={r['images']:4d}  energy in lesion {r['energy_share'][0]:.3f} vs area {r['area_share']:.3f} "
              f"(ratio {r['energy_over_area']:.2f}; diff {r['energy_minus_area'][0]:+.3f} "
              f"[{r['energy_minus_area'][1]:+.3f}, {r['energy_minus_area'][2]:+.3f}])  pointing "
              f"{r['pointing_game']:.3f} vs chance {r['pointing_chance']:.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure(m["per_image"], s, out / "saliency_overlap.png",
           f"Grad-CAM of Lite0's last stage ({args.steps} steps, {args.size} px, test AUC {auc:.3f}) on "
           f"{s['all']['images']} built-in test images; host {host['cpu_isa']}, {host['cpus']} CPUs")
    write_results("saliency", {"config": vars(args), "test_auc": auc, "best_step": best_step,
                               "seconds": {"data": t_data, "train": t_train, "total": time.perf_counter() - t0},
                               "overlap": s, "host": host}, folder=out)
    print(json.dumps({"test_auc": auc, "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
